"""The `redis` and `nats` sink types in the real `mongocast run` daemon.

- Redis Streams and JetStream: every event exactly once and in order in the broker while the
  daemon is killed with SIGKILL several times and the broker is restarted once. Scaled down
  from the issue's 20,000 writes / 5 kills to N_DOCS writes / KILLS kills so that each test
  stays well under a minute on a loaded 2-core CI machine with the ASan build; each kill is
  checked to land in the middle of the work (the broker holds part of the events), so every
  restart replays from a stored position behind what the broker already holds.
- Pub/Sub and core NATS: a recipient value such as `a.b`, `*`, `>` or `x y` reaches only its
  own (escaped) channel or subject.
- A broker that is down at start-up, or accepts and never answers: the sink is reported
  (`/readyz`, `/metrics`, the log), retries, delivers once the broker is back, and the live
  WebSocket feed is unaffected meanwhile.
- `mongocast check`: a bad URL or template is a config error with its position; an
  unreachable broker is reported with its reason.
Emulator only where a test restarts brokers (it runs unchanged against MONGODB_URI otherwise).
"""

import json
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis

from broker_util import NatsServer, free_port as broker_port, nats_server, redis_server  # noqa: F401
from conftest import find_binary
from daemon_util import *  # noqa: F401,F403
from live_util import free_port, http_get, live_config, subscribers, wait_http  # noqa: F401
from server_util import metrics
from test_daemon_runners import sink_state

N_DOCS = 6000
BATCH = 40
KILLS = 5


class Writer(threading.Thread):
    """Inserts {seq: 0..n-1} in order, in batches, spread over ~10 s (so that the kills land
    while it writes)."""

    def __init__(self, coll, n=N_DOCS):
        super().__init__(daemon=True)
        self.coll, self.n, self.done, self.error = coll, n, 0, None

    def run(self):
        try:
            for start in range(0, self.n, BATCH):
                self.coll.insert_many([{"seq": i, "owner": "user%d" % (i % 7), "pad": "x" * 40}
                                       for i in range(start, min(self.n, start + BATCH))])
                self.done = min(self.n, start + BATCH)
                time.sleep(0.1)
        except Exception as e:  # reported by the test
            self.error = e


def kill_loop(tmp_path, daemons, cfg, db, count, restart_broker, label):
    """Runs the daemon KILLS times, killing it with SIGKILL once the broker holds a little more
    than before (and restarting the broker after the first kill), then a last run that must
    bring the broker to N_DOCS. Returns the last daemon."""
    writer = Writer(db.c)
    db.create_collection("c")
    seen_at_kill = []
    for run in range(KILLS + 1):
        d = daemons(cfg, name="%s%d" % (label, run))
        d.wait_open()
        if run == 0:
            writer.start()
        if run == KILLS:
            break
        floor = count()
        target = min(N_DOCS - 1, floor + N_DOCS // 12)
        wait_for(lambda: count() >= target or writer.error, timeout=60, interval=0.01,
                 message="the broker to hold %d events" % target)
        assert d.kill() == -signal.SIGKILL
        seen_at_kill.append(count())
        if run == 0:
            restart_broker()
    writer.join(120)
    assert writer.error is None, writer.error
    wait_for(lambda: count() >= N_DOCS, timeout=90, interval=0.2,
             message="all %d events in the broker" % N_DOCS)
    time.sleep(0.5)  # a late duplicate would show up now
    assert all(0 < c < N_DOCS for c in seen_at_kill), seen_at_kill  # killed mid-stream
    return d


def assert_exactly_once_in_order(ids, seqs):
    assert len(ids) == N_DOCS, "%d entries for %d writes" % (len(ids), N_DOCS)
    assert len(set(ids)) == N_DOCS, "duplicate event ids"
    assert seqs == list(range(N_DOCS)), "not every write exactly once in order"
    assert ids == sorted(ids), "entries not in event order"


def test_redis_stream_exactly_once_in_order_across_kills(tmp_path, daemons, redis_server,
                                                         emulator, db, db_name):
    cfg = write_config(tmp_path / "c.yaml", emulator.uri,
                       {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}},
                       sinks=[{"name": "rs", "type": "redis", "url": redis_server.url,
                               "mode": "stream", "key": "mc:{stream}",
                               "command_timeout_ms": 2000,
                               "retry": {"initial_ms": 20, "max_ms": 300}}],
                       checkpoint_dir=tmp_path / "cp", interval_ms=100)
    r = redis.Redis(port=redis_server.port)

    def count():
        try:
            return r.xlen("mc:s")
        except redis.exceptions.ConnectionError:
            return 0

    d = kill_loop(tmp_path, daemons, cfg, db, count, redis_server.restart, "redis")
    assert d.stop() == 0
    entries = r.xrange("mc:s", "-", "+")
    ids = [e[1][b"id"].decode() for e in entries]
    msgs = [json.loads(e[1][b"message"]) for e in entries]
    assert_exactly_once_in_order(ids, [m["change"]["fullDocument"]["seq"] for m in msgs])
    assert [m["id"] for m in msgs] == ids
    first = entries[0][1]
    assert first[b"type"] == b"insert" and first[b"stream"] == b"s"
    # Entry IDs come from the events' positions: strictly increasing, in event order.
    eids = [tuple(int(x) for x in e[0].decode().split("-")) for e in entries]
    assert eids == sorted(set(eids))


def nats_dump(url, stream="ORDERS"):
    exe = find_binary("tests/integration/clients/broker_client")
    out = subprocess.run([str(exe), "nats-dump", url, stream], capture_output=True, timeout=120,
                         check=True).stdout.decode()
    rows = []
    for line in out.splitlines():
        seq, msg_id, data = line.split(" ", 2)
        rows.append((msg_id, json.loads(data)))
    return rows


def nats_count(url, stream="ORDERS"):
    exe = find_binary("tests/integration/clients/broker_client")
    p = subprocess.run([str(exe), "nats-count", url, stream], capture_output=True, timeout=30)
    return int(p.stdout.decode() or 0) if p.returncode == 0 else 0


def test_jetstream_exactly_once_in_order_across_kills(tmp_path, daemons, nats_server, emulator,
                                                      db, db_name):
    cfg = write_config(tmp_path / "c.yaml", emulator.uri,
                       {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}},
                       sinks=[{"name": "js", "type": "nats", "url": nats_server.url,
                               "mode": "jetstream", "create_stream": "ORDERS",
                               "ack_timeout_ms": 2000,
                               "retry": {"initial_ms": 20, "max_ms": 300}}],
                       checkpoint_dir=tmp_path / "cp", interval_ms=100)
    d = kill_loop(tmp_path, daemons, cfg, db, lambda: nats_count(nats_server.url),
                  nats_server.restart, "nats")
    assert d.stop() == 0
    rows = nats_dump(nats_server.url)
    ids = [r[0] for r in rows]
    assert_exactly_once_in_order(ids, [r[1]["change"]["fullDocument"]["seq"] for r in rows])
    assert [r[1]["id"] for r in rows] == ids


# ---- Routing with hostile recipients --------------------------------------------------------

HOSTILE = ["alice", "bob", "a.b", "*", ">", "x y", "a:b", "alice*"]


def recipient_stream(db_name):
    return {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100,
                  "recipient": "fullDocument.owner"}}


class NatsSub:
    """A bare NATS subscriber (the text protocol over a socket): SUB per subject, collects
    (subject, headers text, payload)."""

    def __init__(self, port, subjects):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.got = []
        self._line()  # INFO
        cmds = 'CONNECT {"verbose":false,"headers":true,"no_responders":false}\r\n'
        for k, s in enumerate(subjects):
            cmds += "SUB %s %d\r\n" % (s, k + 1)
        self.sock.sendall((cmds + "PING\r\n").encode())
        while self._line() != b"PONG":
            pass

    def _line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n + 2:
            self.buf += self.sock.recv(65536)
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def collect(self, seconds):
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                line = self._line()
            except socket.timeout:
                continue
            parts = line.split()
            if parts and parts[0] == b"HMSG":
                hlen, total = int(parts[-2]), int(parts[-1])
                raw = self._take(total)
                self.got.append((parts[1].decode(), raw[:hlen].decode(), json.loads(raw[hlen:])))
            elif parts and parts[0] == b"MSG":
                raw = self._take(int(parts[-1]))
                self.got.append((parts[1].decode(), "", json.loads(raw)))
            elif parts and parts[0] == b"PING":
                self.sock.sendall(b"PONG\r\n")
        return self.got

    def close(self):
        self.sock.close()


def test_pubsub_and_core_nats_route_hostile_recipients(tmp_path, daemons, redis_server,
                                                       nats_server, mongo_uri, db, db_name):
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, recipient_stream(db_name),
                       sinks=[{"name": "ps", "type": "redis", "url": redis_server.url,
                               "mode": "pubsub"},
                              {"name": "core", "type": "nats", "url": nats_server.url,
                               "mode": "core"}])
    r = redis.Redis(port=redis_server.port)
    alice = r.pubsub()
    alice.subscribe("mongocast:s:alice")
    every = r.pubsub()
    every.psubscribe("mongocast:s:*")
    for ps in (alice, every):
        assert ps.get_message(timeout=5)["type"] in ("subscribe", "psubscribe")
    nalice = NatsSub(nats_server.port, ["mongocast.s.alice"])
    nall = NatsSub(nats_server.port, [">"])
    d = daemons(cfg)
    d.wait_open()
    time.sleep(0.5)
    db.c.insert_many([{"owner": o, "k": k} for k, o in enumerate(HOSTILE)])

    got = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(got) < 1:
        m = alice.get_message(timeout=0.2)
        if m and m["type"] == "message":
            got.append(json.loads(m["data"]))
    channels = {}
    deadline = time.monotonic() + 10
    while len(channels) < len(HOSTILE) and time.monotonic() < deadline:
        m = every.get_message(timeout=0.2)
        if m and m["type"] == "pmessage":
            channels[m["channel"].decode()] = json.loads(m["data"])["recipient"]
    time.sleep(0.5)
    m = alice.get_message(timeout=0.5)
    assert [g["recipient"] for g in got] == ["alice"] and not (m and m["type"] == "message")
    assert channels == {
        "mongocast:s:alice": "alice", "mongocast:s:bob": "bob", "mongocast:s:a%2Eb": "a.b",
        "mongocast:s:%2A": "*", "mongocast:s:%3E": ">", "mongocast:s:x%20y": "x y",
        "mongocast:s:a%3Ab": "a:b", "mongocast:s:alice%2A": "alice*"}

    only_alice = nalice.collect(2)
    everything = nall.collect(3)
    assert [(s, p["recipient"]) for s, _, p in only_alice] == [("mongocast.s.alice", "alice")]
    subjects = {s: p["recipient"] for s, _, p in everything if s.startswith("mongocast.")}
    assert subjects == {
        "mongocast.s.alice": "alice", "mongocast.s.bob": "bob", "mongocast.s.a%2Eb": "a.b",
        "mongocast.s.%2A": "*", "mongocast.s.%3E": ">", "mongocast.s.x%20y": "x y",
        "mongocast.s.a%3Ab": "a:b", "mongocast.s.alice%2A": "alice*"}
    hdrs = [h for s, h, _ in everything if s == "mongocast.s.x%20y"][0]
    assert "Mongocast-Type: insert" in hdrs and "Mongocast-Stream: s" in hdrs
    assert "Mongocast-Recipient: x y" in hdrs
    nalice.close()
    nall.close()
    assert d.stop() == 0


# ---- Brokers that are down or silent --------------------------------------------------------

class SilentServer(threading.Thread):
    """Accepts connections and never answers."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.start()

    def run(self):
        try:
            while True:
                c, _ = self.sock.accept()
                self.conns.append(c)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("kind", ["redis-down", "redis-silent", "nats-down", "nats-silent"])
def test_unavailable_broker_is_reported_and_live_feed_goes_on(tmp_path, daemons, subscribers,
                                                              emulator, db, db_name, kind):
    silent = SilentServer() if kind.endswith("silent") else None
    bport = silent.port if silent else broker_port()
    if kind.startswith("redis"):
        sink = {"name": "b", "type": "redis", "url": "redis://127.0.0.1:%d" % bport,
                "mode": "stream", "command_timeout_ms": 1000, "connect_timeout_ms": 1000}
    else:
        sink = {"name": "b", "type": "nats", "url": "nats://127.0.0.1:%d" % bport,
                "mode": "jetstream", "create_stream": "ORDERS", "connect_timeout_ms": 1000,
                "ack_timeout_ms": 1000}
    sink["retry"] = {"initial_ms": 50, "max_ms": 500}
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", emulator.uri,
                      {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}}, port,
                      sinks=[sink])
    d = daemons(cfg)
    wait_http(port, d)
    d.wait_open()
    ws = subscribers.ws(port, "/v1/streams/s")
    ws.wait_ready()
    db.c.insert_many([{"n": i} for i in range(20)])
    ws.wait_changes(20)  # the live feed is not held up by the sink
    wait_for(lambda: sink_state(port, "b") == "retrying", timeout=30, message="retrying")
    status, _, body = http_get(port, "/readyz")
    ready = json.loads(body)
    assert status == 200, body  # retrying is not failing
    assert ready["sinks"]["b"]["state"] == "retrying"
    reason = ready["sinks"]["b"]["reason"]
    assert reason, ready
    m = metrics(port)
    wait_for(lambda: metrics(port)['mongocast_sink_retries_total{sink="b"}'] >= 2, timeout=20,
             message="retries")
    assert m['mongocast_sink_lag_events{sink="b"}'] >= 20
    assert re.search(r"(redis|nats)", d.stderr_text()), d.stderr_text()[-2000:]
    db.c.insert_many([{"n": i} for i in range(20, 30)])
    ws.wait_changes(30)
    if silent:
        silent.close()
    if kind == "redis-down":
        # The broker comes up on the same port: everything is delivered, in order.
        from broker_util import RedisServer
        srv = RedisServer.__new__(RedisServer)
        srv.binary = "redis-server"
        srv.dir = tmp_path / "redis"
        srv.dir.mkdir()
        srv.extra = []
        srv.port = bport
        srv.proc = None
        srv.start()
        try:
            r = redis.Redis(port=bport)
            wait_for(lambda: r.exists("mongocast:s") and r.xlen("mongocast:s") >= 30, timeout=30,
                     message="delivery once Redis is up")
            seqs = [json.loads(e[1][b"message"])["change"]["fullDocument"]["n"]
                    for e in r.xrange("mongocast:s")]
            assert seqs == list(range(30))
            wait_for(lambda: sink_state(port, "b") == "running", timeout=20, message="running")
            m = metrics(port)
            assert m['mongocast_sink_acked_total{sink="b"}'] >= 30
            assert m['mongocast_sink_in_flight{sink="b"}'] == 0
        finally:
            srv.stop(signal.SIGKILL)
    assert d.stop() == 0


# ---- mongocast check ------------------------------------------------------------------------

def check_config(tmp_path, sink):
    return write_config(tmp_path / "c.yaml", "mongodb://127.0.0.1:1/?replicaSet=rs0",
                        {"s": {"db": "d", "collection": "c"}}, sinks=[sink])


@pytest.mark.parametrize("sink,expected", [
    ({"name": "b", "type": "redis", "url": "http://x"}, r"c\.yaml:\d+:\d+: sink b: .*redis://"),
    ({"name": "b", "type": "redis", "url": "redis://h", "key": "a:{nope}"},
     r"c\.yaml:\d+:\d+: sink b: option key: .*nope"),
    ({"name": "b", "type": "redis", "url": "redis://h", "mode": "pubsub", "maxlen": 5},
     r"sink b: options key and maxlen are for mode: stream"),
    ({"name": "b", "type": "nats", "url": "nats://h:99999"}, r"c\.yaml:\d+:\d+: sink b: "),
    ({"name": "b", "type": "nats", "url": "nats://h", "subject": "a.*.{stream}"},
     r"sink b: option subject: "),
    ({"name": "b", "type": "nats", "url": "nats://h", "colour": 1},
     r"unknown option 'colour' for a nats sink"),
])
def test_check_reports_bad_options_with_position(tmp_path, sink, expected):
    p = run_cli("check", "-c", check_config(tmp_path, sink))
    assert p.returncode != 0
    assert re.search(expected, p.stdout + p.stderr), p.stdout + p.stderr


def test_check_reports_unreachable_brokers(tmp_path, mongo_uri, db_name, redis_server):
    dead = broker_port()
    silent = SilentServer()
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {"s": {"db": db_name, "collection": "c"}},
                       sinks=[{"name": "up", "type": "redis",
                               "url": redis_server.url + "/0"},
                              {"name": "down", "type": "redis",
                               "url": "redis://u:sekret@127.0.0.1:%d" % dead},
                              {"name": "quiet", "type": "redis",
                               "url": "redis://127.0.0.1:%d" % silent.port},
                              {"name": "ndown", "type": "nats",
                               "url": "nats://127.0.0.1:%d" % dead}])
    p = run_cli("check", "-c", cfg, "--timeout-ms", "1500")
    out = p.stdout + p.stderr
    silent.close()
    assert p.returncode != 0, out
    assert re.search(r"ok.*sink up \(redis\): reachable", out), out
    assert re.search(r"FAIL.*sink down \(redis\): .*127\.0\.0\.1:%d.*(refused|connect)" % dead,
                     out, re.I), out
    assert re.search(r"FAIL.*sink quiet \(redis\): ", out), out
    assert re.search(r"FAIL.*sink ndown \(nats\): ", out), out
    assert "sekret" not in out


def test_broker_example_config_checks(tmp_path, mongo_uri, redis_server, nats_server):
    """examples/brokers.yaml as shipped: valid, and every broker sink reachable."""
    import os
    from conftest import REPO
    example = str(REPO / "examples" / "brokers.yaml")
    env = dict(os.environ, MONGODB_URI=mongo_uri, REDIS_URL=redis_server.url,
               NATS_URL=nats_server.url)
    p = run_cli("check", "-c", example, env=env, cwd=str(tmp_path))
    out = p.stdout + p.stderr
    for name, kind in (("orders-redis-stream", "redis"), ("orders-redis-live", "redis"),
                       ("orders-jetstream", "nats"), ("orders-nats-live", "nats")):
        assert re.search(r"ok.*sink %s \(%s\): reachable" % (name, kind), out), out
    assert p.returncode == 0, out
