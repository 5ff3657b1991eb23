"""The fan-out's socket sends spread over several threads (server.threads).

With `threads: 2` and `threads: 4` (more threads than this machine has cores is allowed), the
loop thread still decides everything and only the system calls of each pass are made by the
pool: many WebSocket and SSE subscribers must each receive every event exactly once and in
order, a resume with `since` during writes must join the live tail without gap or duplicate, a
slow consumer is still closed with 4002 while the others get everything, the subscriber limit
(`server.max_connections`) is one limit for the whole server, and /metrics shows the threads
and per-thread sends that add up to the total. `threads: 1` keeps the single-thread path.

Runs `mongocast run` against the emulator (or MONGODB_URI).
"""

import socket
import threading
import time

from daemon_util import *  # noqa: F401,F403
from server_util import (RawSSE, RawWS, http_get, metrics, refusal, server_config,
                         resume_while_writing, start_server, stream)


def threads_daemon(tmp_path, daemons, mongo_uri, db_name, threads, history=1000, **server):
    srv = {"threads": threads}
    srv.update(server)
    cfg = server_config(tmp_path / ("t%d.yaml" % threads), mongo_uri,
                        {"s": stream(db_name, "c", history=history)}, server=srv,
                        checkpoint_dir=tmp_path / ("cp-%d" % threads))
    return start_server(daemons, cfg)


def thread_sends(m):
    return {k: v for k, v in m.items() if k.startswith("mongocast_send_thread_sends_total")}


class Reader:
    """Reads a WebSocket subscriber's change values on a thread of its own."""

    def __init__(self, ws):
        self.ws = ws
        self.values = []
        self.other = []
        self.error = None
        self.stop = threading.Event()
        ws.sock.settimeout(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                try:
                    m = self.ws.recv_json()
                except socket.timeout:
                    continue
                if m["type"] == "change":
                    self.values.append(m["change"]["fullDocument"]["i"])
                else:
                    self.other.append(m["type"])
        except Exception as e:  # reported by the test
            self.error = repr(e)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.ws.close()


def test_many_subscribers_every_event_once_in_order_metrics_add_up(tmp_path, daemons, mongo_uri,
                                                                   db, db_name):
    d, port = threads_daemon(tmp_path, daemons, mongo_uri, db_name, 4)
    assert "on 4 send threads" in d.stderr_text()
    readers = [Reader(RawWS(port, "/v1/streams/s")) for _ in range(32)]
    sse = RawSSE(port, "/v1/streams/s")
    wait_for(lambda: all(r.other == ["ready"] for r in readers), timeout=20,
             message="every subscriber to be ready")
    n = 300
    for start in range(0, n, 50):
        db.c.insert_many([{"i": i, "pad": "p" * (i % 300)} for i in range(start, start + 50)])
        time.sleep(0.02)
    wait_for(lambda: all(len(r.values) >= n for r in readers) or any(r.error for r in readers),
             timeout=60, message="every subscriber to get %d changes" % n)
    for r in readers:
        assert r.error is None, r.error
        assert r.values == list(range(n))
    got = []
    while len(got) < n:
        ev = sse.next_event()
        if ev["event"] == "change":
            got.append(ev["data"]["change"]["fullDocument"]["i"])
    assert got == list(range(n))
    time.sleep(0.3)
    for r in readers:
        assert r.values == list(range(n)), "nothing after the last change, no duplicate"
    m = metrics(port)
    assert m["mongocast_server_threads"] == 4
    per_thread = thread_sends(m)
    assert len(per_thread) == 4
    total = m['mongocast_socket_sends_total{path="uring"}'] + \
        m['mongocast_socket_sends_total{path="writev"}']
    # The pool's sends are part of every send the server made (the rest: answers and
    # continuations written directly by the loop thread).
    assert 0 < sum(per_thread.values()) <= total
    assert m["mongocast_send_parallel_passes_total"] > 0
    # 33 subscribers per pass: the send threads take part (which ones depends on timing).
    assert sum(v for k, v in per_thread.items() if 'thread="0"' not in k) > 0
    assert m['mongocast_connections{transport="ws"}'] == 32
    for r in readers:
        r.close()
    sse.close()


def test_resume_since_during_writes_no_gap_no_duplicate(tmp_path, daemons, mongo_uri, db,
                                                        db_name):
    d, port = threads_daemon(tmp_path, daemons, mongo_uri, db_name, 2)
    # Others keep the passes busy enough for the send threads to take part.
    busy = [Reader(RawWS(port, "/v1/streams/s")) for _ in range(12)]
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    db.c.insert_many([{"i": i} for i in range(10)])
    first = []
    while len(first) < 10:
        m = ws.recv_json()
        if m["type"] == "change":
            first.append(m)
    assert [m["change"]["fullDocument"]["i"] for m in first] == list(range(10))
    ws.close()

    ws2, got = resume_while_writing(port, db, first[4]["id"], 10, 70, 0.003)
    assert got == list(range(5, 70)), "resume must continue right after `since`"
    db.c.insert_one({"i": 70})
    assert ws2.recv_json()["change"]["fullDocument"]["i"] == 70
    wait_for(lambda: all(len(r.values) >= 71 for r in busy), timeout=20,
             message="the other subscribers to get everything")
    for r in busy:
        assert r.error is None and r.values == list(range(71))
        r.close()
    ws2.close()
    m = metrics(port)
    assert m['mongocast_client_resumes_total{stream="s",result="replay"}'] == 1


def test_slow_consumer_closed_4002_others_get_everything(tmp_path, daemons, mongo_uri, db,
                                                         db_name):
    limit = 262144
    d, port = threads_daemon(tmp_path, daemons, mongo_uri, db_name, 2, history=100,
                             max_send_queue_bytes=limit)
    slow = RawWS(port, "/v1/streams/s", rcvbuf=4096)
    assert slow.status == 101
    readers = [Reader(RawWS(port, "/v1/streams/s")) for _ in range(10)]
    wait_for(lambda: all(r.other == ["ready"] for r in readers), timeout=20,
             message="every subscriber to be ready")
    pad = "x" * 2000
    sent = 0
    extra = 2
    while sent < 3000 and extra > 0:
        db.c.insert_many([{"i": i, "pad": pad} for i in range(sent, sent + 50)])
        sent += 50
        wait_for(lambda: all(len(r.values) >= sent for r in readers)
                 or any(r.error for r in readers), timeout=20,
                 message="readers to receive %d events" % sent)
        if metrics(port)["mongocast_slow_consumer_disconnects_total"] >= 1:
            extra -= 1
    for r in readers:
        assert r.error is None, r.error
        assert r.values == list(range(sent))
    m = metrics(port)
    assert m["mongocast_slow_consumer_disconnects_total"] == 1
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    code, reason = slow.close_code()
    assert code == 4002, (code, reason)
    slow.close()
    assert metrics(port)['mongocast_connections{transport="ws"}'] == 10
    for r in readers:
        r.close()


def test_subscriber_limit_is_one_limit_for_all_threads(tmp_path, daemons, mongo_uri, db,
                                                       db_name):
    d, port = threads_daemon(tmp_path, daemons, mongo_uri, db_name, 2, max_connections=5)
    subs = [RawWS(port, "/v1/streams/s") for _ in range(5)]
    for ws in subs:
        assert ws.status == 101
        assert ws.recv_json()["type"] == "ready"
    assert refusal(port, "/v1/streams/s", {"Upgrade": "websocket", "Connection": "Upgrade",
                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                           "Sec-WebSocket-Version": "13"}) == \
        (503, "too_many_connections")
    assert http_get(port, "/healthz")[0] == 200  # plain HTTP has room beyond the limit
    subs[0].close()
    wait_for(lambda: metrics(port)['mongocast_connections{transport="ws"}'] == 4, timeout=10,
             message="the closed subscriber to leave")
    again = RawWS(port, "/v1/streams/s")
    assert again.status == 101
    assert again.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 1})
    for ws in subs[1:] + [again]:
        m = ws.recv_json()
        assert m["type"] == "change" and m["change"]["fullDocument"]["i"] == 1
        ws.close()


def test_one_thread_keeps_the_single_thread_path(tmp_path, daemons, mongo_uri, db, db_name):
    d, port = threads_daemon(tmp_path, daemons, mongo_uri, db_name, 1)
    assert "send threads" not in d.stderr_text()
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 7})
    m = ws.recv_json()
    assert m["change"]["fullDocument"]["i"] == 7
    met = metrics(port)
    assert met["mongocast_server_threads"] == 1
    assert thread_sends(met) == {}
    ws.close()


def test_threads_out_of_range_refused(tmp_path, mongo_uri, db_name):
    for bad in (0, 65):
        cfg = server_config(tmp_path / ("bad%d.yaml" % bad), mongo_uri,
                            {"s": stream(db_name, "c")}, server={"threads": bad})
        r = run_cli("check", "-c", str(cfg), cwd=tmp_path)
        assert r.returncode != 0
        assert "threads" in (r.stdout + r.stderr), r.stdout + r.stderr
