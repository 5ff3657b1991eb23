"""mongo-emulator under concurrency and bad input: many change streams at once, waiting getMores
that must not block other clients, and raw sockets sending malformed wire messages. A real
mongod passes all of these too (MONGODB_URI)."""

import os
import socket
import struct
import threading
import time

import bson
import pytest
from bson import SON

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013


# ---- raw wire helpers ----

def server_address(client):
    client.admin.command("ping")
    host, port = client.address
    return host, port


def connect(addr, timeout=5.0):
    s = socket.create_connection(addr, timeout=timeout)
    s.settimeout(timeout)
    return s


def op_msg(request_id, doc, flags=0):
    body = struct.pack("<I", flags) + b"\x00" + bson.BSON.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body


def op_query(request_id, ns, doc):
    body = struct.pack("<i", 0) + ns.encode() + b"\x00" + struct.pack("<ii", 0, -1) + \
        bson.BSON.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, OP_QUERY) + body


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_reply(sock):
    """(opcode, responseTo, document) of the next reply, or None when the peer closed."""
    header = recv_exact(sock, 16)
    if header is None:
        return None
    length, _req, response_to, opcode = struct.unpack("<iiii", header)
    assert 16 <= length <= 48 * 1000 * 1000, "reply length %d" % length
    body = recv_exact(sock, length - 16)
    if body is None:
        return None
    if opcode == OP_MSG:
        assert body[4] == 0, "reply section kind %d" % body[4]
        doc = bson.BSON(body[5:]).decode()
    elif opcode == OP_REPLY:
        doc = bson.BSON(body[20:]).decode()
    else:
        pytest.fail("reply with unexpected opcode %d" % opcode)
    return opcode, response_to, doc


def closed_or_error(sock, timeout=5.0):
    """After bad input the server must either close the connection or answer with an error;
    it must never hang. Returns 'closed' or 'error'."""
    sock.settimeout(timeout)
    try:
        r = recv_reply(sock)
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except socket.timeout:
        pytest.fail("server neither replied nor closed the connection within %.0fs" % timeout)
    if r is None:
        return "closed"
    _op, _rt, doc = r
    assert doc.get("ok") in (0, 0.0), "bad input got a success reply: %r" % (doc,)
    assert doc.get("code"), "error reply without a non-zero code: %r" % (doc,)
    return "error"


def assert_serving(client, db_name):
    t0 = time.monotonic()
    coll = client[db_name].alive
    coll.insert_one({"t": t0})
    assert coll.find_one({"t": t0}) is not None
    assert time.monotonic() - t0 < 5.0


# ---- well-formed raw messages (the baseline the malformed ones are compared with) ----

def test_raw_op_msg_ping_reply(client):
    with connect(server_address(client)) as s:
        s.sendall(op_msg(4242, SON([("ping", 1), ("$db", "admin")])))
        opcode, response_to, doc = recv_reply(s)
    assert opcode == OP_MSG and response_to == 4242
    assert doc["ok"] == 1


def test_raw_op_query_hello_gets_op_reply(client):
    with connect(server_address(client)) as s:
        s.sendall(op_query(7, "admin.$cmd", SON([("isMaster", 1), ("helloOk", True)])))
        opcode, response_to, doc = recv_reply(s)
    assert opcode == OP_REPLY and response_to == 7
    assert doc["ismaster"] is True and doc["ok"] == 1
    for key in ("maxWireVersion", "minWireVersion", "maxBsonObjectSize", "maxMessageSizeBytes",
                "maxWriteBatchSize"):
        assert type(doc[key]) is int, key  # int32 on the wire (Int64 would decode as Int64)


def test_raw_op_query_other_command_is_352(client):
    with connect(server_address(client)) as s:
        s.sendall(op_query(8, "admin.$cmd", SON([("ping", 1)])))
        opcode, response_to, doc = recv_reply(s)
    assert opcode == OP_REPLY and response_to == 8
    assert doc["ok"] == 0 and doc["code"] == 352


def test_raw_pipelined_requests_answered_in_order(client):
    with connect(server_address(client)) as s:
        s.sendall(b"".join(op_msg(100 + i, SON([("ping", 1), ("$db", "admin")]))
                           for i in range(5)))
        got = [recv_reply(s)[1] for _ in range(5)]
    assert got == [100, 101, 102, 103, 104]


def test_unacknowledged_write_gets_no_reply(client, db_name):
    with connect(server_address(client)) as s:
        # moreToCome (bit 1): the server must not answer
        s.sendall(op_msg(1, SON([("insert", "w0"), ("documents", [{"_id": 1}]),
                                 ("$db", db_name), ("writeConcern", {"w": 0})]), flags=2))
        s.sendall(op_msg(2, SON([("ping", 1), ("$db", "admin")])))
        _op, response_to, _doc = recv_reply(s)
    assert response_to == 2
    assert client[db_name].w0.find_one({"_id": 1}) == {"_id": 1}


# ---- malformed input ----

def _header(length, opcode=OP_MSG, request_id=1):
    return struct.pack("<iiii", length, request_id, 0, opcode)


def _valid_ping_body():
    return struct.pack("<I", 0) + b"\x00" + bson.BSON.encode(SON([("ping", 1), ("$db", "a")]))


BAD_MESSAGES = {
    "length_too_small": _header(4) + b"\x00" * 12,
    "length_negative": _header(-20) + b"\x00" * 12,
    "length_claims_100MB": _header(100 * 1024 * 1024) + b"\x00" * 64,
    "unknown_opcode": _header(16 + 8, opcode=9999) + b"\x01" * 8,
    "op_compressed_unadvertised": _header(16 + 12, opcode=2012) + struct.pack("<iiB", 2013, 5, 9)
    + b"\x00" * 3,
    "op_msg_no_sections": _header(20) + struct.pack("<I", 0),
    "op_msg_truncated_bson": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 0) + b"\x00" + struct.pack("<i", 100) + b"\x02ping\x00"),
    "op_msg_bson_length_past_message": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 0) + b"\x00" + struct.pack("<i", 1 << 30) + b"\x10a\x00\x01\x00\x00"
        b"\x00\x00"),
    "op_msg_bad_element_type": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 0) + b"\x00" + struct.pack("<i", 12) + b"\x7fab\x00\x00\x00\x00\x00"),
    "op_msg_unknown_section_kind": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 0) + b"\x07" + bson.BSON.encode({"ping": 1})),
    "op_msg_required_unknown_flag": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 1 << 5) + b"\x00" + bson.BSON.encode(SON([("ping", 1),
                                                                     ("$db", "a")]))),
    "op_msg_kind1_size_overflow": (lambda body: _header(16 + len(body)) + body)(
        _valid_ping_body() + b"\x01" + struct.pack("<i", 1 << 29) + b"documents\x00"),
    "op_msg_checksum_flag_without_checksum": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 1) + b"\x00" + bson.BSON.encode(SON([("ping", 1)]))[:-1]),
    "op_query_unterminated_namespace": _header(16 + 12, opcode=OP_QUERY) + b"\x00" * 4 +
    b"admin.$cmd",
    "op_msg_no_db": (lambda body: _header(16 + len(body)) + body)(
        struct.pack("<I", 0) + b"\x00" + bson.BSON.encode({"ping": 1})),
    "garbage_opcode_and_body": _header(16 + 200, opcode=0x41414141) + os.urandom(200),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_malformed_message_is_refused_and_server_keeps_serving(client, db_name, name):
    msg = BAD_MESSAGES[name]
    with connect(server_address(client)) as s:
        try:
            s.sendall(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass
        outcome = closed_or_error(s)
        if name.startswith("length_"):
            # the frame itself is unusable: nothing sensible can follow on this connection
            assert outcome == "closed"
    assert_serving(client, db_name)


def test_partial_messages_and_idle_sockets_do_not_block_others(client, db_name):
    addr = server_address(client)
    socks = []
    try:
        for i in range(30):
            s = connect(addr)
            if i % 3 == 0:
                s.sendall(_header(1000) + b"\x00" * 10)  # promise 1000 bytes, send 26
            elif i % 3 == 1:
                s.sendall(b"\x10\x00")  # half a header
            socks.append(s)
        assert_serving(client, db_name)
        # abrupt close of half-sent connections must not hurt the server either
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        socks = []
        assert_serving(client, db_name)
    finally:
        for s in socks:
            s.close()


def test_oversized_document_is_refused(client, db_name):
    # pymongo refuses this itself, so send it raw: a 17 MB document inside a valid message
    big = SON([("insert", "c"), ("documents", [{"big": "x" * (17 * 1024 * 1024)}]),
               ("$db", db_name)])
    with connect(server_address(client), timeout=20) as s:
        s.sendall(op_msg(9, big))
        closed_or_error(s, timeout=20)
    assert client[db_name].c.count_documents({}) == 0
    assert_serving(client, db_name)


# ---- concurrency ----

def test_twenty_concurrent_change_streams_see_every_event_in_order(make_client, db_name):
    watcher = make_client(maxPoolSize=40)
    writer = make_client()[db_name].c
    n_streams, n_events = 20, 30
    ready = threading.Barrier(n_streams + 1, timeout=60)
    results = [None] * n_streams

    def run(i):
        try:
            with watcher[db_name].c.watch(max_await_time_ms=300) as s:
                ready.wait()
                got = []
                deadline = time.monotonic() + 60
                while len(got) < n_events + 1 and time.monotonic() < deadline:
                    ev = s.try_next()
                    if ev is not None:
                        got.append(ev)
                results[i] = got
        except Exception as exc:  # reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_streams)]
    for t in threads:
        t.start()
    ready.wait()
    for k in range(n_events):
        writer.insert_one({"_id": k})
    writer.update_one({"_id": 0}, {"$set": {"done": True}})
    for t in threads:
        t.join(90)
    for i, got in enumerate(results):
        assert not isinstance(got, Exception), "stream %d failed: %r" % (i, got)
        assert got is not None, "stream %d did not finish" % i
        keys = [e["documentKey"]["_id"] for e in got]
        assert keys == list(range(n_events)) + [0], "stream %d saw %r" % (i, keys)
        assert got[-1]["operationType"] == "update"
        tokens = [e["_id"]["_data"] for e in got]
        assert len(set(tokens)) == len(tokens)
    # all streams saw identical tokens for identical events
    first = [e["_id"] for e in results[0]]
    assert all([e["_id"] for e in r] == first for r in results)


def test_waiting_getmore_does_not_block_other_clients(make_client, db_name):
    watcher = make_client()
    other = make_client()
    box = {}

    def wait_for_change():
        with watcher[db_name].quiet.watch(max_await_time_ms=4000) as s:
            box["ready"] = time.monotonic()
            start = time.monotonic()
            box["ev"] = s.try_next()
            box["elapsed"] = time.monotonic() - start

    waiters = [threading.Thread(target=wait_for_change, daemon=True)]
    waiters[0].start()
    deadline = time.monotonic() + 10
    while "ready" not in box and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the getMore is now waiting inside the server
    t0 = time.monotonic()
    for i in range(20):
        other[db_name].busy.insert_one({"i": i})
    assert other[db_name].busy.count_documents({}) == 20
    busy_time = time.monotonic() - t0
    assert busy_time < 2.0, "writes took %.2fs while a getMore was waiting" % busy_time
    assert waiters[0].is_alive(), "the waiting getMore returned early without an event"
    other[db_name].quiet.insert_one({"_id": "wake"})
    waiters[0].join(10)
    assert box.get("ev") is not None and box["ev"]["documentKey"] == {"_id": "wake"}
    assert box["elapsed"] < 3.9
