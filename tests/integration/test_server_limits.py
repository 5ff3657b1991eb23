"""The live server's bounds against one hostile client, filter or document (issue 7 items 5 to
8): a catastrophic regular expression in a subscriber's filter, requests pipelined without
reading the answers, documents bigger than the send-queue limit and than max_message_bytes,
slowloris with reconnects, the per-address limit, and a failed stream.

Each test prints what it measured (run with -s to see it). Runs `mongocast run` against the
emulator (or MONGODB_URI).
"""

import datetime
import json
import math
import socket
import threading
import time
from urllib.parse import quote

import pytest

from conftest import real_server_uri
from daemon_util import *  # noqa: F401,F403
from server_util import (RawSSE, RawWS, http_get, metrics, read_response, rss_kb, server_config,
                         start_server, stream)


def p99(samples):
    """Nearest-rank 99th percentile."""
    s = sorted(samples)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


class HealthProbe:
    """/healthz on one keep-alive connection every `period` seconds, in a thread: latencies."""

    def __init__(self, port, period=0.01):
        self.port, self.period = port, period
        self.latencies, self.errors = [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        s = None
        while not self.stop.is_set():
            try:
                if s is None:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                t0 = time.monotonic()
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _, _ = read_response(s)
                self.latencies.append(time.monotonic() - t0)
                if status != 200:
                    self.errors.append(status)
            except OSError as e:
                self.errors.append(repr(e))
                s = None
            time.sleep(self.period)
        if s:
            s.close()

    def finish(self):
        self.stop.set()
        self.thread.join(15)
        return self.latencies


def write_time(change, doc):
    """When the write happened: the change's wallTime (the server's commit time, on this
    machine's clock when the server is the emulator), else the time the test took just before
    inserting (fullDocument.t). The first excludes the test client's own insert time (BSON
    encoding of a 100 KB document on a loaded machine), which the daemon cannot influence."""
    wall = change.get("wallTime")
    if not real_server_uri() and isinstance(wall, dict) and isinstance(wall.get("$date"), str):
        return datetime.datetime.fromisoformat(wall["$date"].replace("Z", "+00:00")).timestamp()
    return doc["t"]


class Reader:
    """Reads change messages from a RawWS in a thread: (value of fullDocument.i, latency from
    the write, see write_time())."""

    def __init__(self, ws):
        self.ws = ws
        self.got, self.errors = [], []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while True:
                m = self.ws.recv_json()
                if m["type"] == "change":
                    doc = m["change"]["fullDocument"]
                    self.got.append((doc["i"], time.time() - write_time(m["change"], doc)))
        except (OSError, ConnectionError):
            pass
        except Exception as e:  # reported by the test
            self.errors.append(repr(e))


class Attacker:
    """Runs `fn(stop, result)` in a forked process, so that an attack loop never competes with
    the test's readers for the interpreter lock (their latencies measure the daemon, not this
    process). `fn` fills the dict `result`, returned by finish()."""

    def __init__(self, fn, *args):
        import multiprocessing
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.queue = ctx.Queue()

        def run():
            result = {}
            try:
                fn(self.stop, result, *args)
            except Exception as e:  # reported by the test
                result["error"] = repr(e)
            self.queue.put(result)
        self.proc = ctx.Process(target=run, daemon=True)
        self.proc.start()

    def finish(self, timeout=20):
        self.stop.set()
        result = self.queue.get(timeout=timeout)
        self.proc.join(5)
        return result


def filter_path(query):
    return "/v1/streams/s?filter=" + quote(json.dumps(query))


EVIL = {"fullDocument.s": {"$regex": "(.{1,100}){199}x"}}


def test_redos_filter_closed_with_reason_others_unaffected(tmp_path, daemons, mongo_uri, db,
                                                           db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri,
                        {"s": stream(db_name, "c", client_filters=True)})
    d, port = start_server(daemons, cfg)
    plain = RawWS(port, "/v1/streams/s")
    benign = RawWS(port, filter_path({"fullDocument.s": {"$regex": "^x"}}))
    for ws in (plain, benign):
        assert ws.recv_json()["type"] == "ready"
    readers = [Reader(plain), Reader(benign)]
    # The attacker keeps an offending WebSocket subscriber connected: as soon as one is
    # closed it opens the next, so every event meets a live evil filter.
    def attacker(stop, result):
        closes = result["closes"] = []
        while not stop.is_set():
            ws = RawWS(port, filter_path(EVIL))
            if ws.status != 101:
                closes.append(("status", ws.status))
                return
            ws.sock.settimeout(1)
            try:
                closes.append(ws.close_code())
            except socket.timeout:
                pass
            ws.close()
    attack = Attacker(attacker)
    sse = RawSSE(port, filter_path(EVIL))
    assert sse.status == 200
    assert sse.next_event()["event"] == "ready"
    wait_for(lambda: metrics(port)['mongocast_connections{transport="ws"}'] == 3,
             message="the attacker's first subscriber")
    probe = HealthProbe(port)
    sizes = [1000, 10000, 100000]
    n = 60
    for i in range(n):
        # The 'x' at the start makes the pattern backtrack exponentially from position 0.
        db.c.insert_one({"i": i, "t": time.time(), "s": "x" + "a" * (sizes[i % 3] - 1)})
        time.sleep(0.02)
    wait_for(lambda: all(len(r.got) >= n for r in readers), timeout=30,
             message="every event at the other subscribers")
    health = probe.finish()
    result = attack.finish()
    closes = result.get("closes", [])
    assert "error" not in result, result
    # The SSE subscriber's stream ends with an error event naming the reason.
    last = sse.next_event()
    assert last["event"] == "error", last
    assert last["data"]["code"] == "filter_budget", last
    assert last["data"]["reason"].startswith("filter too expensive"), last
    with pytest.raises(ConnectionError):
        sse.next_event()
    for r in readers:
        assert not r.errors, r.errors
        assert [i for i, _ in r.got[:n]] == list(range(n))
    lat = [l for r in readers for _, l in r.got[:n]]
    ws_closes = [c for c in closes if c[0] is not None]
    assert ws_closes, closes
    for code, reason in ws_closes:
        assert code == 4003 and reason.startswith("filter too expensive"), (code, reason)
    m = metrics(port)
    print("\nReDoS: %d events (1, 10, 100 KB strings), %d offending subscribers closed "
          "(4003 %r); /healthz p99 %.1f ms max %.1f ms over %d probes; other subscribers' "
          "delivery p99 %.1f ms max %.1f ms"
          % (n, m["mongocast_filter_budget_disconnects_total"], ws_closes[0][1],
             p99(health) * 1e3, max(health) * 1e3, len(health), p99(lat) * 1e3,
             max(lat) * 1e3))
    assert not probe.errors, probe.errors
    assert p99(health) < 0.05
    assert p99(lat) < 0.05
    assert m["mongocast_filter_budget_disconnects_total"] >= len(ws_closes) + 1
    assert http_get(port, "/healthz")[0] == 200
    plain.close()
    benign.close()
    sse.close()


def test_large_documents_reach_every_subscriber_oversize_as_notice(tmp_path, daemons, mongo_uri,
                                                                   db, db_name):
    # MongoDB caps a document (and a change event) at 16 MiB of BSON, so the "too big" case
    # uses a ~15 MB document against max_message_bytes lowered to 8 MiB; 1.5 MB is above the
    # default 1 MiB send-queue limit, which used to close every subscriber with 4002.
    limit = 8 * 1024 * 1024
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"max_message_bytes": limit})
    d, port = start_server(daemons, cfg)
    wss = [RawWS(port, "/v1/streams/s") for _ in range(7)]
    sses = [RawSSE(port, "/v1/streams/s") for _ in range(3)]
    for ws in wss:
        assert ws.recv_json()["type"] == "ready"
    for s in sses:
        assert s.next_event()["event"] == "ready"
    got = [[] for _ in range(10)]
    errors = []

    def read_ws(k, ws):
        try:
            ws.sock.settimeout(60)
            while len(got[k]) < 3:
                m = ws.recv_json()
                got[k].append(("ws", m["type"], m))
        except Exception as e:  # reported below
            errors.append(repr(e))

    def read_sse(k, s):
        try:
            s.sock.settimeout(60)
            while len(got[k]) < 3:
                ev = s.next_event()
                got[k].append(("sse:" + ev["event"], ev["data"]["type"], ev["data"],
                               ev.get("id")))
        except Exception as e:  # reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=read_ws, args=(k, ws)) for k, ws in enumerate(wss)]
    threads += [threading.Thread(target=read_sse, args=(7 + k, s)) for k, s in enumerate(sses)]
    for t in threads:
        t.start()
    mid = "m" * (1536 * 1024)
    big = "b" * (15 * 1000 * 1000)
    db.c.insert_one({"_id": "mid", "s": mid})
    db.c.insert_one({"_id": "big", "s": big})
    db.c.insert_one({"_id": "after", "s": "small"})
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k, msgs in enumerate(got):
        assert [m[1] for m in msgs] == ["change", "oversize", "change"], (k, [m[:2] for m in msgs])
        assert msgs[0][2]["change"]["fullDocument"]["s"] == mid
        notice = msgs[1][2]
        assert notice["documentKey"] == {"_id": "big"}
        assert notice["operationType"] == "insert"
        assert notice["ns"] == {"db": db_name, "coll": "c"}
        assert notice["limit"] == limit and notice["size"] > 15 * 1000 * 1000
        assert notice["id"] and notice["stream"] == "s"
        assert len(json.dumps(notice)) < 1024
        assert msgs[2][2]["change"]["documentKey"] == {"_id": "after"}
        if k >= 7:
            # SSE: the notice is an `oversize` event with the event's id, so that a resume
            # with Last-Event-ID goes on after it
            assert msgs[1][0] == "sse:oversize" and msgs[1][3] == notice["id"]
    m = metrics(port)
    assert m["mongocast_slow_consumer_disconnects_total"] == 0
    assert m["mongocast_oversize_events_total"] == 1
    assert m['mongocast_connections{transport="ws"}'] == 7
    # a late subscriber resuming from before the big one replays the notice, not 15 MB
    late = RawWS(port, "/v1/streams/s?since=" + got[0][0][2]["id"])
    assert late.recv_json()["type"] == "ready"
    assert late.recv_json()["type"] == "oversize"
    assert late.recv_json()["change"]["documentKey"] == {"_id": "after"}
    print("\nlarge documents: 1.5 MB delivered whole and 15 MB as an oversize notice to 7 WS + "
          "3 SSE subscribers, 0 slow-consumer closes; daemon RSS %d MB" % (rss_kb(d.pid) // 1024))
    for c in wss + sses + [late]:
        c.close()


def test_stdout_sink_prints_the_oversize_notice(tmp_path, daemons, mongo_uri, db, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"max_message_bytes": 4096},
                        sinks=[{"name": "out", "type": "stdout"}])
    d, port = start_server(daemons, cfg)
    db.c.insert_one({"_id": 1, "s": "x" * 5000})
    db.c.insert_one({"_id": 2, "s": "x" * 100})
    wait_for(lambda: len(d.messages()) >= 2, message="two lines on stdout")
    first, second = d.messages()[:2]
    assert first["type"] == "oversize" and first["documentKey"] == {"_id": 1}, first
    assert first["limit"] == 4096 and first["size"] > 5000
    assert second["type"] == "change" and second["change"]["fullDocument"]["_id"] == 2


def test_failed_stream_refuses_new_subscribers_503(tmp_path, daemons, mongo_uri, db, db_name):
    # Projecting out _id makes the server refuse the event (280 on a real server): the stream
    # fails for good; the healthy one goes on.
    cfg = server_config(tmp_path / "c.yaml", mongo_uri,
                        {"bad": stream(db_name, "c", pipeline=[{"$project": {"_id": 0}}]),
                         "good": stream(db_name, "c")})
    d, port = start_server(daemons, cfg)
    db.c.insert_one({"_id": 1})
    wait_for(lambda: json.loads(http_get(port, "/readyz")[2])["streams"]["bad"] == "failed",
             message="the stream to fail")
    # The reason is the fixed text of the stream's error message (change_stream_error), never
    # the server's own message; until that message has reached the fan-out, a generic one.
    fixed = "stream failed: the change stream failed with an error that retrying cannot fix"
    sse_headers = {"Accept": "text/event-stream"}
    wait_for(lambda: json.loads(http_get(port, "/v1/streams/bad", sse_headers)[2])["error"]
             == fixed, message="the fixed reason")
    for headers in (sse_headers,
                    {"Upgrade": "websocket", "Connection": "Upgrade",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                     "Sec-WebSocket-Version": "13"}):
        status, h, body = http_get(port, "/v1/streams/bad", headers)
        doc = json.loads(body)
        assert status == 503 and doc["code"] == "stream_failed", (status, body)
        assert doc["error"] == fixed, doc
        # the other stream still takes subscribers
        assert http_get(port, "/v1/streams/good", headers)[0] in (101, 200)
    print("\nfailed stream: 503 %s" % doc)


PIPELINE = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200


def test_pipelining_without_reading_is_cut_memory_stays_flat(tmp_path, daemons, mongo_uri, db,
                                                             db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    # A small ASan quarantine, so that RSS shows what the daemon holds rather than what the
    # sanitizer keeps of freed memory (ignored by a build without ASan).
    d, port = start_server(daemons, cfg, env={"ASAN_OPTIONS": "quarantine_size_mb=4"})
    sub = RawWS(port, "/v1/streams/s")
    assert sub.recv_json()["type"] == "ready"
    reader = Reader(sub)
    rss_start = rss_kb(d.pid)

    def attacker(stop, stats):
        # Several connections at a time, each sending GET /metrics as fast as the socket takes
        # it and never reading an answer; a connection the daemon closes is replaced.
        stats.update(connections=0, closed_by_server=0, sent=0)
        conns = []
        while not stop.is_set():
            while len(conns) < 8:
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                conns.append(s)
                stats["connections"] += 1
            for s in list(conns):
                try:
                    stats["sent"] += s.send(PIPELINE)
                except BlockingIOError:
                    pass
                except OSError:
                    stats["closed_by_server"] += 1
                    conns.remove(s)
                    s.close()
            time.sleep(0.001)
        for s in conns:
            s.close()
    attack = Attacker(attacker)
    time.sleep(0.3)  # measure while the attack is under way, not its first burst
    peak = 0
    n = 100
    for i in range(n):
        db.c.insert_one({"i": i, "t": time.time()})
        peak = max(peak, rss_kb(d.pid))
        time.sleep(0.04)
    wait_for(lambda: len(reader.got) >= n, timeout=30, message="every event at the subscriber")
    stats = attack.finish()
    assert "error" not in stats, stats
    time.sleep(2.5)  # a couple of housekeeping ticks
    rss_end = rss_kb(d.pid)
    lat = [l for _, l in reader.got[:n]]
    m = metrics(port)
    print("\npipelining: %d attacker connections, %d MB of requests sent, %d closed by the "
          "daemon (%d counted); RSS start %d MB, peak %d MB, after %d MB; subscriber delivery "
          "p99 %.1f ms max %.1f ms"
          % (stats["connections"], stats["sent"] >> 20, stats["closed_by_server"],
             m["mongocast_pipelining_disconnects_total"], rss_start >> 10, peak >> 10,
             rss_end >> 10, p99(lat) * 1e3, max(lat) * 1e3))
    assert [i for i, _ in reader.got[:n]] == list(range(n))
    assert m["mongocast_pipelining_disconnects_total"] >= 1
    assert peak < 64 * 1024, "RSS peaked at %d KiB" % peak
    assert p99(lat) < 0.05
    assert http_get(port, "/healthz")[0] == 200
    sub.close()


SECRET = "slowloris-test-secret-0123456789abcdef"


class Slowloris:
    """Holds `n` connections that each send a request head one header line at a time and never
    finish it; a connection the daemon closes is replaced at once (one thread, non-blocking)."""

    def __init__(self, port, n, period=0.5):
        import selectors
        self.port, self.n, self.period = port, n, period
        self.sel = selectors.DefaultSelector()
        self.opened = self.closed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self):
        import selectors
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, {"sent": 0})
        self.opened += 1

    def _drop(self, s):
        self.sel.unregister(s)
        s.close()
        self.closed += 1

    def _run(self):
        import selectors
        for _ in range(self.n):
            self._open()
        last_drip = time.monotonic()
        while not self.stop.is_set():
            for key, ev in self.sel.select(0.05):
                s, st = key.fileobj, key.data
                if ev & selectors.EVENT_READ:
                    try:
                        if not s.recv(4096):
                            raise ConnectionError()
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._drop(s)
                        self._open()
                        continue
                if ev & selectors.EVENT_WRITE and st["sent"] == 0:
                    try:
                        s.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                        st["sent"] = 1
                        self.sel.modify(s, selectors.EVENT_READ, st)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self._drop(s)
                        self._open()
            if time.monotonic() - last_drip > self.period:
                last_drip = time.monotonic()
                for key in list(self.sel.get_map().values()):
                    if key.data["sent"]:
                        try:
                            key.fileobj.send(b"X-a: b\r\n")
                        except OSError:
                            pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()

    def finish(self):
        self.stop.set()
        self.thread.join(10)


def test_slowloris_with_reconnects_leaves_room_for_health_and_subscribers(tmp_path, daemons,
                                                                          mongo_uri, db,
                                                                          db_name):
    from live_util import claims, hs256
    max_conns = 50
    table = max_conns + 256
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c", public=False)},
                        server={"max_connections": max_conns},
                        auth={"algorithm": "HS256", "secret": SECRET})
    d, port = start_server(daemons, cfg)
    auth = {"Authorization": "Bearer " + hs256(SECRET, claims("alice"))}
    early = RawWS(port, "/v1/streams/s", headers=auth)
    assert early.status == 101 and early.recv_json()["type"] == "ready"
    attack = Slowloris(port, 2 * table)
    wait_for(lambda: attack.opened >= 2 * table, timeout=30, message="the attack under way")
    time.sleep(0.5)
    # While the table is full of half-sent requests (and the attacker keeps replacing what
    # is closed), health checks and an authenticated subscriber still get in.
    health = []
    for _ in range(30):
        health.append(http_get(port, "/healthz")[0])
        time.sleep(0.05)
    late = RawWS(port, "/v1/streams/s", headers=auth)
    assert late.status == 101, late.head
    assert late.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 1})
    assert early.recv_json()["change"]["fullDocument"]["i"] == 1
    assert late.recv_json()["change"]["fullDocument"]["i"] == 1
    opened = attack.opened
    attack.finish()
    m = metrics(port)
    print("\nslowloris: %d connections held (table %d), %d opened, %d closed by the daemon "
          "(%d evicted); /healthz %s; authenticated subscriber 101 and its events"
          % (2 * table, table, opened, attack.closed, m["mongocast_connections_evicted_total"],
             "all 200" if set(health) == {200} else health))
    assert set(health) == {200}, health
    assert m["mongocast_connections_evicted_total"] >= table
    assert m['mongocast_connections{transport="ws"}'] == 2
    early.close()
    late.close()


def test_per_address_limit_evicts_plain_connections_refuses_past_subscribers(
        tmp_path, daemons, mongo_uri, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"max_connections_per_address": 4})
    d, port = start_server(daemons, cfg)
    time.sleep(0.3)  # the readiness probes' connections are gone
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    time.sleep(0.2)
    # a fifth connection from the same address takes the place of the oldest idle one
    assert http_get(port, "/healthz")[0] == 200
    idle[0].settimeout(5)
    assert idle[0].recv(10) == b""
    for s in idle:
        s.close()
    time.sleep(0.3)
    subs = [RawWS(port, "/v1/streams/s") for _ in range(4)]
    for ws in subs:
        assert ws.recv_json()["type"] == "ready"
    # subscribers are never evicted: with four of them, a fifth connection is refused
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    status, _, body = read_response(s)
    assert status == 503 and json.loads(body)["code"] == "too_many_connections"
    s.close()
    subs[0].close()
    wait_for(lambda: http_get(port, "/healthz")[0] == 200, message="room again")
    m = metrics(port)
    assert m["mongocast_connections_evicted_total"] >= 1
    assert m['mongocast_connections{transport="ws"}'] == 3
    for ws in subs[1:]:
        ws.close()
