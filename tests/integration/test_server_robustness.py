"""The live server under hostile or heavy clients: RFC 6455 must-fail cases (each on its own
raw connection, each with its close code, the daemon serving on), a slow consumer closed with
4002 while 20 others get everything and the daemon's memory stays bounded, the connection
limits (503 for subscribers, eviction of idle plain connections), HTTP limits, and 1,000 concurrent WebSocket subscribers each receiving every
event.

Runs `mongocast run` against the emulator (or MONGODB_URI).
"""

import asyncio
import json
import socket
import struct
import threading
import time

import pytest

from daemon_util import *  # noqa: F401,F403
from server_util import (RawSSE, RawWS, http_get, http_request, metrics, refusal, rss_kb,
                         server_config, start_server, stream, ws_frame)


def recv_changes(ws, n):
    out = []
    while len(out) < n:
        m = ws.recv_json()
        if m["type"] == "change":
            out.append(m)
    return out


CASES = [
    # (name, bytes sent after the handshake, expected close code)
    ("unmasked", ws_frame(0x1, b"hi", masked=False), 1002),
    ("rsv1", ws_frame(0x1, b"hi", rsv=4), 1002),
    ("rsv3_on_ping", ws_frame(0x9, b"", rsv=1), 1002),
    ("opcode_3", ws_frame(0x3, b"x"), 1002),
    ("opcode_11", ws_frame(0xB, b"x"), 1002),
    ("fragmented_ping", ws_frame(0x9, b"ab", fin=False), 1002),
    ("ping_126_bytes", ws_frame(0x9, b"p" * 126), 1002),
    ("invalid_utf8", ws_frame(0x1, b"ok\xc0\xaf"), 1007),
    ("utf8_invalid_across_fragments",
     ws_frame(0x1, b"ok\xe2", fin=False) + ws_frame(0x0, b"x"), 1007),
    ("close_one_byte", ws_frame(0x8, b"\x03"), 1002),
    ("close_code_1005", ws_frame(0x8, struct.pack(">H", 1005)), 1002),
    ("close_code_999", ws_frame(0x8, struct.pack(">H", 999)), 1002),
    ("close_code_2000", ws_frame(0x8, struct.pack(">H", 2000)), 1002),
    ("continuation_without_start", ws_frame(0x0, b"x"), 1002),
    ("new_data_mid_fragmentation",
     ws_frame(0x1, b"a", fin=False) + ws_frame(0x1, b"b"), 1002),
    ("non_minimal_length", bytes([0x81, 0x80 | 126, 0, 5]) + b"\x01\x02\x03\x04" + b"hello",
     1002),
    # announces 2^40 bytes and sends none: refused from the header alone
    ("too_big_announced", bytes([0x82, 0x80 | 127, 0, 0, 1, 0, 0, 0, 0, 0]) + b"\x01\x02\x03\x04",
     1009),
    ("too_big_fragments", ws_frame(0x2, b"z" * 800, fin=False) + ws_frame(0x0, b"z" * 800), 1009),
]


def test_rfc6455_must_fail_cases_each_close_with_their_code(tmp_path, daemons, mongo_uri, db,
                                                            db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"max_frame_bytes": 1024})
    d, port = start_server(daemons, cfg)
    watcher = RawWS(port, "/v1/streams/s")
    assert watcher.recv_json()["type"] == "ready"
    for name, data, code in CASES:
        ws = RawWS(port, "/v1/streams/s")
        assert ws.status == 101, name
        ws.send(data)
        got, reason = ws.close_code()
        assert got == code, "%s: expected close %d, got %s (%s)" % (name, code, got, reason)
        assert ws.eof_after_close(), name
        ws.close()
    # valid close: echoed with the same code
    ws = RawWS(port, "/v1/streams/s")
    ws.send(ws_frame(0x8, struct.pack(">H", 4000) + b"bye"))
    assert ws.close_code()[0] == 4000
    ws.close()
    # empty close: answered with 1000
    ws = RawWS(port, "/v1/streams/s")
    ws.send(ws_frame(0x8, b""))
    assert ws.close_code()[0] == 1000
    ws.close()
    # ping (split over two writes) gets a pong with the same payload; text/binary messages are
    # accepted and ignored
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    ping = ws_frame(0x9, b"are you there")
    ws.send(ping[:5])
    time.sleep(0.05)
    ws.send(ping[5:] + ws_frame(0x1, "h\u00e9llo".encode(), fin=False) +
            ws_frame(0x0, b" world") + ws_frame(0x2, b"\xff\x00"))
    fin, op, payload = ws.recv_frame()
    assert (op, payload) == (0xA, b"are you there")
    # the daemon kept serving throughout
    db.c.insert_one({"i": 1})
    assert recv_changes(watcher, 1)[0]["change"]["fullDocument"]["i"] == 1
    assert recv_changes(ws, 1)[0]["change"]["fullDocument"]["i"] == 1
    assert http_get(port, "/healthz")[0] == 200
    ws.close()
    watcher.close()


def test_slow_consumer_closed_4002_others_get_everything(tmp_path, daemons, mongo_uri, db,
                                                         db_name):
    limit = 262144
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c", history=100)},
                        server={"max_send_queue_bytes": limit})
    d, port = start_server(daemons, cfg)
    # The slow client asks for a tiny receive window and then stops reading.
    slow = RawWS(port, "/v1/streams/s", rcvbuf=4096)
    assert slow.status == 101
    readers = [RawWS(port, "/v1/streams/s") for _ in range(20)]
    for r in readers:
        assert r.recv_json()["type"] == "ready"
    rss_before = rss_kb(d.pid)
    batch, max_events = 50, 3000
    pad = "x" * 2000
    received = [[] for _ in readers]
    errors = []
    stop = threading.Event()

    def read_all(i, r):
        try:
            while not stop.is_set():
                m = r.recv_json()
                if m["type"] == "change":
                    received[i].append(m["change"]["fullDocument"]["i"])
        except socket.timeout:
            pass
        except Exception as e:  # reported below
            errors.append(repr(e))
    for r in readers:
        r.sock.settimeout(2)
    threads = [threading.Thread(target=read_all, args=(i, r)) for i, r in enumerate(readers)]
    for t in threads:
        t.start()
    # Paced so that the readers keep up: only the client that stopped reading falls behind.
    sent = 0
    extra_batches = 2
    while sent < max_events and extra_batches > 0:
        db.c.insert_many([{"i": i, "pad": pad} for i in range(sent, sent + batch)])
        sent += batch
        wait_for(lambda: all(len(g) >= sent for g in received) or errors, timeout=20,
                 message="readers to receive %d events" % sent)
        assert not errors, errors
        if metrics(port)["mongocast_slow_consumer_disconnects_total"] >= 1:
            extra_batches -= 1
    stop.set()
    for t in threads:
        t.join(5)
    assert not errors, errors
    assert metrics(port)["mongocast_slow_consumer_disconnects_total"] == 1
    for got in received:
        assert got == list(range(sent))
    # The slow client now reads what the kernel buffered, then the close frame.
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    code, reason = slow.close_code()
    assert code == 4002, (code, reason)
    slow.close()
    m = metrics(port)
    assert m['mongocast_connections{transport="ws"}'] == 20
    assert m["mongocast_queued_bytes"] < 21 * limit
    # Megabytes went to 21 clients: memory must not have grown by anything near the bytes
    # delivered, only by the shared history and bounded queues.
    delivered_kb = sent * 2 * 21
    grown_kb = rss_kb(d.pid) - rss_before
    assert grown_kb < 40 * 1024, "RSS grew by %d KiB (delivered %d KiB)" % (grown_kb, delivered_kb)
    for r in readers:
        r.close()


def test_connection_limit_503(tmp_path, daemons, mongo_uri, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"max_connections": 3})
    d, port = start_server(daemons, cfg)
    held = [RawWS(port, "/v1/streams/s") for _ in range(2)] + [RawSSE(port, "/v1/streams/s")]
    assert all(c.status in (101, 200) for c in held)
    up = {"Upgrade": "websocket", "Connection": "Upgrade",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    assert refusal(port, "/v1/streams/s", up) == (503, "too_many_connections")
    assert refusal(port, "/v1/streams/s", {"Accept": "text/event-stream"}) == \
        (503, "too_many_connections")
    # plain HTTP still works at the limit
    assert http_get(port, "/healthz")[0] == 200
    held[0].close()
    wait_for(lambda: metrics(port)['mongocast_connections{transport="ws"}'] == 1,
             message="closed subscriber to leave the table")
    again = RawWS(port, "/v1/streams/s")
    assert again.status == 101
    # Plain connections get 256 slots beyond the subscriber limit. Past the whole table a new
    # connection takes the place of the least recently used one that is not a subscriber:
    # the oldest idle connection is closed, the new one is served, subscribers stay.
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(255)]
    # 255 idle + this scrape: every plain slot is taken while it runs
    wait_for(lambda: metrics(port)['mongocast_connections{transport="http"}'] == 256,
             message="idle connections in the table")
    idle.append(socket.create_connection(("127.0.0.1", port)))
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    from server_util import read_response
    assert read_response(extra)[0] == 200
    extra.close()
    idle[0].settimeout(5)
    assert idle[0].recv(10) == b""  # the oldest idle connection was closed
    m = metrics(port)
    assert m["mongocast_connections_evicted_total"] >= 1
    assert m['mongocast_connections{transport="ws"}'] == 2
    assert m['mongocast_connections{transport="sse"}'] == 1
    for s in idle:
        s.close()
    again.close()
    for c in held[1:]:
        c.close()


def test_http_limits_and_timeouts(tmp_path, daemons, mongo_uri, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    d, port = start_server(daemons, cfg, env={"MONGOCAST_TEST_TIMING":
                                               "request_ms=500,idle_ms=800,tick_ms=50"})
    status, h, body = http_request(port, b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and json.loads(body)["code"] == "bad_request"
    status, _, _ = http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 17000 +
                                b"\r\n\r\n")
    assert status == 431
    status, _, _ = http_request(port, b"GARBAGE\r\n\r\n")
    assert status == 400
    status, _, _ = http_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert status == 400
    # a request that never completes gets 408 and is closed
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    from server_util import read_response
    assert read_response(s)[0] == 408
    assert s.recv(100) == b""
    s.close()
    # keep-alive: two requests on one connection, then the idle connection is closed
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/streams HTTP/1.1\r\nHost: x\r\n\r\n")
    t0 = time.time()
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    # both answers, in order, then the idle connection is closed (idle_ms=800)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.index(b'{"status":"ok"}') < data.index(b'{"streams":[{"name":"s"')
    assert 0.5 < time.time() - t0 < 4
    s.close()


def test_thousand_websocket_subscribers_receive_every_event(tmp_path, daemons, mongo_uri, db,
                                                            db_name):
    import websockets
    n_clients, n_events = 1000, 20
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    d, port = start_server(daemons, cfg)
    url = "ws://127.0.0.1:%d/v1/streams/s" % port

    async def run():
        sem = asyncio.Semaphore(200)

        async def connect():
            async with sem:
                ws = await websockets.connect(url, max_queue=None, ping_interval=None,
                                              open_timeout=30)
                assert json.loads(await ws.recv())["type"] == "ready"
                return ws
        clients = await asyncio.gather(*[connect() for _ in range(n_clients)])
        assert metrics(port)['mongocast_connections{transport="ws"}'] == n_clients
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: db.c.insert_many([{"i": i} for i in range(n_events)]))

        async def collect(ws):
            got = []
            while len(got) < n_events:
                m = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if m["type"] == "change":
                    got.append(m["change"]["fullDocument"]["i"])
            return got
        results = await asyncio.gather(*[collect(ws) for ws in clients])
        await asyncio.gather(*[ws.close() for ws in clients])
        return results
    t0 = time.time()
    results = asyncio.run(run())
    assert all(r == list(range(n_events)) for r in results)
    assert time.time() - t0 < 50
    m = metrics(port)
    assert m['mongocast_deliveries_total{transport="ws"}'] >= n_clients * (n_events + 1)
