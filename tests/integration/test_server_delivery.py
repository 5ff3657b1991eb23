"""Live delivery over WebSocket and SSE (DESIGN §4.3): message shape, ready before the first
change, resume by since= and by Last-Event-ID with no gap and no duplicate (also while writes
keep arriving during the reconnect), reset when the id is too old, filters and recipients per
subscriber, refusals before the upgrade, token expiry (1008), heartbeats, and SIGTERM (1001).

Runs `mongocast run` against the emulator (or MONGODB_URI).
"""

import json
import signal
import time

import pytest

from daemon_util import *  # noqa: F401,F403
from server_util import (RawSSE, RawWS, http_get, metrics, refusal, server_config,
                         resume_while_writing, start_server, stream, ws_frame)


def change_values(msgs, field="i"):
    return [m["change"]["fullDocument"][field] for m in msgs if m["type"] == "change"]


def recv_changes(ws, n):
    out = []
    while len(out) < n:
        m = ws.recv_json()
        if m["type"] == "change":
            out.append(m)
    return out


def test_ws_and_sse_receive_changes_in_design_shape(tmp_path, daemons, mongo_uri, db, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri,
                        {"orders": stream(db_name, "orders", full_document="updateLookup")})
    d, port = start_server(daemons, cfg)
    ws = RawWS(port, "/v1/streams/orders")
    assert ws.status == 101
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in ws.head
    sse = RawSSE(port, "/v1/streams/orders")
    assert sse.status == 200
    assert sse.headers["content-type"] == "text/event-stream"
    # ready comes first, before any change
    assert ws.recv_json() == {"type": "ready", "stream": "orders"}
    ev = sse.next_event()
    assert ev["event"] == "ready" and "id" not in ev
    assert ev["data"] == {"type": "ready", "stream": "orders"}
    assert sse.retry == 2000

    db.orders.insert_one({"_id": 1, "i": 1})
    db.orders.update_one({"_id": 1}, {"$set": {"i": 2}})
    db.orders.delete_one({"_id": 1})
    ops = []
    for _ in range(3):
        m = ws.recv_json()
        assert set(m) >= {"type", "stream", "id", "change"}
        assert m["type"] == "change" and m["stream"] == "orders"
        c = m["change"]
        assert c["ns"] == {"db": db_name, "coll": "orders"}
        assert c["documentKey"] == {"_id": 1}
        assert "_id" not in c and full_change(m)["_id"] == {"_data": m["id"]}
        ops.append(c["operationType"])
        e = sse.next_event()
        assert e["event"] == "change"
        assert e["id"] == m["id"]
        assert e["data"] == m  # the same bytes on both transports
    assert ops == ["insert", "update", "delete"]
    ws.close()
    sse.close()
    wait_for(lambda: metrics(port)['mongocast_deliveries_total{transport="ws"}'] >= 4,
             message="ws deliveries counted")
    m = metrics(port)
    assert m['mongocast_deliveries_total{transport="sse"}'] >= 4
    assert m['mongocast_stream_up{stream="orders"}'] == 1
    assert m['mongocast_events_in_total{stream="orders"}'] >= 3


def test_resume_since_no_gap_no_duplicate_during_writes(tmp_path, daemons, mongo_uri, db,
                                                        db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c", history=1000)})
    d, port = start_server(daemons, cfg)
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    db.c.insert_many([{"i": i} for i in range(10)])
    first = recv_changes(ws, 10)
    assert change_values(first) == list(range(10))
    ws.close()

    # Writes keep arriving while the client reconnects: the replay and the live tail must
    # join exactly.
    ws2, got = resume_while_writing(port, db, first[4]["id"], 10, 60, 0.005)
    assert got == list(range(5, 60)), "resume must continue right after `since`"
    db.c.insert_one({"i": 60})
    assert ws2.recv_json()["change"]["fullDocument"]["i"] == 60
    ws2.close()
    m = metrics(port)
    assert m['mongocast_client_resumes_total{stream="s",result="replay"}'] == 1


def test_sse_resume_by_last_event_id_overrides_since(tmp_path, daemons, mongo_uri, db, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    d, port = start_server(daemons, cfg)
    sse = RawSSE(port, "/v1/streams/s")
    assert sse.next_event()["event"] == "ready"
    db.c.insert_many([{"i": i} for i in range(6)])
    evs = [sse.next_event() for _ in range(6)]
    assert [e["data"]["change"]["fullDocument"]["i"] for e in evs] == list(range(6))
    sse.close()
    db.c.insert_many([{"i": i} for i in range(6, 9)])
    # A browser reconnect: the URL still says since=<first>, Last-Event-ID says <third>.
    sse2 = RawSSE(port, "/v1/streams/s?since=%s" % evs[0]["id"],
                  headers={"Last-Event-ID": evs[2]["id"]})
    got = []
    while len(got) < 6:
        e = sse2.next_event()
        if e["event"] == "change":
            assert e["id"] == e["data"]["id"]
            got.append(e["data"]["change"]["fullDocument"]["i"])
    assert got == [3, 4, 5, 6, 7, 8]
    sse2.close()


def test_since_older_than_the_history(tmp_path, daemons, mongo_uri, db, db_name):
    """An id the 5-event ring no longer holds is caught up from the oplog (docs/protocol.md,
    "Resume"); one that is not a resume token at all gets reset unknown_id; with catch-up off
    (server.max_catchup_events: 0) the old answer, reset history."""
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c", history=5)})
    d, port = start_server(daemons, cfg)
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    db.c.insert_many([{"i": i} for i in range(12)])
    msgs = recv_changes(ws, 12)
    ws.close()
    # msgs[0] has left the 5-event ring: ready, the 11 changes after it, then live
    ws2 = RawWS(port, "/v1/streams/s?since=%s" % msgs[0]["id"])
    assert ws2.recv_json()["type"] == "ready"
    got = recv_changes(ws2, 11)
    assert [m["id"] for m in got] == [m["id"] for m in msgs[1:]]
    db.c.insert_one({"i": 99})
    m = ws2.recv_json()
    assert m["type"] == "change" and m["change"]["fullDocument"]["i"] == 99
    ws2.close()
    # an id that is no resume token: reset (after ready), then live
    ws3 = RawWS(port, "/v1/streams/s?since=00ff")
    assert ws3.recv_json()["type"] == "ready"
    assert ws3.recv_json() == {"type": "reset", "stream": "s", "reason": "unknown_id"}
    ws3.close()
    # the newest id replays nothing
    ws4 = RawWS(port, "/v1/streams/s?since=%s" % m["id"])
    assert ws4.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 100})
    assert ws4.recv_json()["change"]["fullDocument"]["i"] == 100
    ws4.close()
    wait_for(lambda: metrics(port)['mongocast_client_resumes_total{stream="s",result="catchup"}']
             == 1, timeout=10, message="the catch-up counted")
    assert metrics(port)['mongocast_client_resumes_total{stream="s",result="reset"}'] == 1
    d.stop()

    cfg = server_config(tmp_path / "off.yaml", mongo_uri,
                        {"s": stream(db_name, "c", history=5)},
                        server={"max_catchup_events": 0})
    d, port = start_server(daemons, cfg)
    ws5 = RawWS(port, "/v1/streams/s?since=%s" % msgs[0]["id"])
    assert ws5.recv_json() == {"type": "reset", "stream": "s", "reason": "history"}
    assert ws5.recv_json()["type"] == "ready"
    ws5.close()


def test_filters_and_vars_per_subscriber(tmp_path, daemons, mongo_uri, db, db_name):
    streams = {
        "f": stream(db_name, "c", client_filters=True),
        "v": stream(db_name, "c", pipeline=[{"$match": {"fullDocument.team": {"$var": "team"}}}]),
    }
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, streams)
    d, port = start_server(daemons, cfg)
    flt = json.dumps({"fullDocument.i": {"$gte": 3}})
    import urllib.parse
    wf = RawWS(port, "/v1/streams/f?filter=" + urllib.parse.quote(flt))
    wv = RawWS(port, "/v1/streams/v?vars=" + urllib.parse.quote(json.dumps({"team": "red"})))
    wall = RawWS(port, "/v1/streams/f")
    for w in (wf, wv, wall):
        assert w.status == 101
        assert w.recv_json()["type"] == "ready"
    db.c.insert_many([{"i": i, "team": "red" if i % 2 else "blue"} for i in range(6)])
    assert change_values(recv_changes(wall, 6)) == list(range(6))
    assert change_values(recv_changes(wf, 3)) == [3, 4, 5]
    assert change_values(recv_changes(wv, 3)) == [1, 3, 5]
    for w in (wf, wv, wall):
        w.close()
    status, code = refusal(port, "/v1/streams/v", {"Upgrade": "websocket",
                                                   "Connection": "Upgrade",
                                                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                   "Sec-WebSocket-Version": "13"})
    assert (status, code) == (400, "invalid_vars")


def test_refusals_before_upgrade(tmp_path, daemons, mongo_uri, db_name):
    streams = {"pub": stream(db_name, "c"),
               "nofilter": stream(db_name, "c", client_filters=False)}
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, streams,
                        server={"allowed_origins": ["http://good.example"]})
    d, port = start_server(daemons, cfg)
    up = {"Upgrade": "websocket", "Connection": "Upgrade",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    assert refusal(port, "/v1/streams/nope", up) == (404, "unknown_stream")
    assert refusal(port, "/v1/streams/pub") == (406, "not_acceptable")
    assert refusal(port, "/v1/streams/pub?since=xyz", up) == (400, "invalid_since")
    assert refusal(port, "/v1/streams/pub", {"Accept": "text/event-stream",
                                             "Last-Event-ID": "not-hex"}) == (400, "invalid_since")
    assert refusal(port, "/v1/streams/pub?since=%zz", up) == (400, "bad_request")
    assert refusal(port, "/v1/streams/pub", dict(up, Origin="http://evil.example")) == \
        (403, "forbidden_origin")
    assert refusal(port, "/v1/streams/nofilter?filter=%7B%7D", up) == (400, "filters_not_allowed")
    assert refusal(port, "/v1/streams/pub?filter=%7B%22%24where%22%3A1%7D", up)[0] == 400
    status, h, body = http_get(port, "/v1/streams/pub", dict(up, **{"Sec-WebSocket-Version": "8"}))
    assert status == 426 and h["sec-websocket-version"] == "13"
    assert refusal(port, "/v1/streams/pub", dict(up, **{"Sec-WebSocket-Key": "short"})) == \
        (400, "bad_handshake")
    status, h, _ = http_request_raw(port, b"POST /v1/streams HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
    assert status == 405 and h["allow"] == "GET"
    assert http_get(port, "/nope")[0] == 404
    # allowed origin and no origin are both fine
    ok = RawWS(port, "/v1/streams/pub", {"Origin": "http://good.example"})
    assert ok.status == 101
    ok.close()
    assert RawWS(port, "/v1/streams/pub").status == 101
    status, _, body = http_get(port, "/v1/streams")
    assert status == 200
    assert json.loads(body) == {"streams": [{"name": "pub", "url": "/v1/streams/pub"},
                                            {"name": "nofilter", "url": "/v1/streams/nofilter"}]}
    status, h, body = http_get(port, "/")
    assert status == 200 and h["content-type"].startswith("text/html") and b"<html" in body.lower()
    assert http_get(port, "/healthz")[0] == 200


def http_request_raw(port, raw):
    from server_util import http_request
    return http_request(port, raw)


def jwt_token(secret, sub, exp_in):
    import jwt
    claims = {"sub": sub, "exp": int(time.time()) + exp_in}
    tok = jwt.encode(claims, secret, algorithm="HS256")
    return tok.decode() if isinstance(tok, bytes) else tok


SECRET = "s" * 40


def test_auth_and_token_expiry_closes_1008(tmp_path, daemons, mongo_uri, db, db_name):
    streams = {"priv": stream(db_name, "c", public=False, recipient="fullDocument.owner")}
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, streams,
                        auth={"algorithm": "HS256", "secret": SECRET})
    d, port = start_server(daemons, cfg, env={"MONGOCAST_TEST_TIMING": "tick_ms=100"})
    up = {"Upgrade": "websocket", "Connection": "Upgrade",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    assert refusal(port, "/v1/streams/priv", up) == (401, "unauthorized")
    assert refusal(port, "/v1/streams/priv", dict(up, Authorization="Bearer x.y.z"))[0] == 401
    assert refusal(port, "/v1/streams/priv", dict(up, Authorization="Basic abc")) == \
        (401, "unauthorized")
    long_tok = jwt_token(SECRET, "u1", 3600)
    u1 = RawWS(port, "/v1/streams/priv", {"Authorization": "Bearer " + long_tok})
    assert u1.status == 101
    short = RawWS(port, "/v1/streams/priv?token=" + jwt_token(SECRET, "u2", 2))
    assert short.status == 101
    assert u1.recv_json()["type"] == "ready"
    assert short.recv_json()["type"] == "ready"
    db.c.insert_many([{"owner": "u1", "i": 1}, {"owner": "u2", "i": 2}, {"owner": "u1", "i": 3}])
    got = recv_changes(u1, 2)
    assert [m["recipient"] for m in got] == ["u1", "u1"]
    assert change_values(got) == [1, 3]
    m = short.recv_json()
    assert m["recipient"] == "u2"
    t0 = time.time()
    code, reason = short.close_code()
    assert code == 1008, (code, reason)
    assert time.time() - t0 < 5
    # the long-lived one is unaffected
    db.c.insert_one({"owner": "u1", "i": 4})
    assert u1.recv_json()["change"]["fullDocument"]["i"] == 4
    u1.close()


def test_heartbeats_ping_and_pong_timeout(tmp_path, daemons, mongo_uri, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    d, port = start_server(daemons, cfg, env={
        "MONGOCAST_TEST_TIMING": "ping_ms=300,pong_ms=600,sse_ms=300,tick_ms=50"})
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    # answering pings keeps the connection (recv_json answers them)
    ws.sock.settimeout(3)
    deadline = time.time() + 2.0
    pings = 0
    while time.time() < deadline:
        fin, op, payload = ws.recv_frame()
        if op == 0x9:
            pings += 1
            ws.send(ws_frame(0xA, payload))
    assert pings >= 3
    # our pings are answered too
    ws.send(ws_frame(0x9, b"hi"))
    while True:
        fin, op, payload = ws.recv_frame()
        if op == 0xA and payload == b"hi":
            break
        if op == 0x9:
            ws.send(ws_frame(0xA, payload))
    ws.close()
    # a client that never answers is dropped after the pong deadline
    mute = RawWS(port, "/v1/streams/s")
    t0 = time.time()
    assert mute.close_code() == (None, None)  # dropped without a close frame
    assert 0.3 < time.time() - t0 < 4
    sse = RawSSE(port, "/v1/streams/s")
    sse.next_event()
    time.sleep(1.0)
    sse.sock.setblocking(False)
    try:
        sse.buf += sse.sock.recv(65536)
    except BlockingIOError:
        pass
    assert sse.buf.count(b": heartbeat\n\n") >= 2
    sse.close()


def test_sigterm_closes_websockets_with_1001(tmp_path, daemons, mongo_uri, db, db_name):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")})
    d, port = start_server(daemons, cfg)
    clients = [RawWS(port, "/v1/streams/s") for _ in range(5)]
    sse = RawSSE(port, "/v1/streams/s")
    for c in clients:
        assert c.recv_json()["type"] == "ready"
    sse.next_event()
    db.c.insert_one({"i": 1})
    for c in clients:
        assert recv_changes(c, 1)[0]["change"]["fullDocument"]["i"] == 1
    d.send(signal.SIGTERM)
    for c in clients:
        assert c.close_code()[0] == 1001
        assert c.eof_after_close()
    with pytest.raises(ConnectionError):
        while True:
            sse.next_event()
    # one signal is enough: the daemon exits 0 on its own (a second one would force exit 1)
    assert d.proc.wait(20) == 0
    assert d.stop() == 0
    assert "stopped" in d.stderr_text()


def test_sighup_reload_restarts_the_server_with_1012(tmp_path, daemons, mongo_uri, db, db_name):
    import re
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        checkpoint_dir=tmp_path / "cp")
    d, port = start_server(daemons, cfg)
    ws = RawWS(port, "/v1/streams/s")
    assert ws.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 1})
    first = recv_changes(ws, 1)[0]
    d.send(signal.SIGHUP)
    code, reason = ws.close_code()
    assert code == 1012, (code, reason)
    ws.close()
    d.wait_stderr(r"reloaded config=")
    ports = re.findall(r"server listening on [^\s]+:(\d+)", d.stderr_text())
    assert len(ports) == 2
    port2 = int(ports[-1])
    wait_for(lambda: http_get(port2, "/readyz")[0] == 200, timeout=30, message="ready again")
    # the resume history belongs to the previous run, the oplog does not: caught up (nothing
    # after `first`), no reset, then live events
    ws2 = RawWS(port2, "/v1/streams/s?since=%s" % first["id"])
    assert ws2.recv_json()["type"] == "ready"
    db.c.insert_one({"i": 2})
    assert recv_changes(ws2, 1)[0]["change"]["fullDocument"]["i"] == 2
    ws2.close()
    assert d.stop() == 0
