"""Helpers for the tests of the live delivery server (test_server_*.py): configs with a
`server:` section, starting `mongocast run` and finding its port, a raw HTTP client, a raw
WebSocket client (to send frames no library would send and to read close codes exactly), an
SSE reader and a /metrics parser.

Everything talks to 127.0.0.1 only; the daemon binds port 0 and logs the port it got.
"""

import base64
import json
import os
import re
import socket
import struct
import threading
import time

import pytest

from daemon_util import write_config, wait_for

LISTEN_RE = re.compile(r"server listening on [^\s]+:(\d+)")


def server_config(path, uri, streams, server=None, auth=None, sinks=None, checkpoint_dir=None):
    """A config whose `server:` section listens on a free port; `server` adds keys."""
    srv = {"listen": "127.0.0.1:0"}
    srv.update(server or {})
    extra = ["server:"] + ["  %s: %s" % (k, json.dumps(v)) for k, v in srv.items()]
    if auth:
        extra += ["auth:", "  jwt: %s" % json.dumps(auth)]
    return write_config(path, uri, streams, sinks=sinks if sinks is not None else [],
                        checkpoint_dir=checkpoint_dir, extra="\n".join(extra))


def start_server(daemons, cfg, env=None, ready=True):
    """Starts `mongocast run -c cfg` (with extra environment) and returns (daemon, port)."""
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        d = daemons(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    d.wait_stderr(LISTEN_RE.pattern)
    port = int(LISTEN_RE.search(d.stderr_text()).group(1))
    if ready:
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, timeout=30,
                 message="/readyz to answer 200 (stderr:\n%s)" % d.stderr_text()[-2000:])
    return d, port


def stream(db, coll, **kw):
    s = {"db": db, "collection": coll, "max_await_time_ms": 100, "public": True}
    s.update(kw)
    return s


# ---- HTTP ----

def read_response(sock, timeout=10.0):
    """Reads one HTTP response: (status, headers dict (lower-case names), body bytes)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head: %r" % data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:n]


def http_request(port, raw, timeout=10.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(raw)
        return read_response(s, timeout)
    finally:
        s.close()


def http_get(port, path, headers=None, timeout=10.0):
    """GET with Connection: close: (status, headers, body). Connection errors -> (0, {}, b'')."""
    h = {"Host": "127.0.0.1:%d" % port, "Connection": "close"}
    h.update(headers or {})
    raw = "GET %s HTTP/1.1\r\n%s\r\n" % (path, "".join("%s: %s\r\n" % kv for kv in h.items()))
    try:
        return http_request(port, raw.encode(), timeout)
    except OSError:
        return 0, {}, b""


def refusal(port, path, headers=None):
    """(status, code) of a refused request, with the JSON body checked."""
    status, h, body = http_get(port, path, headers)
    assert h.get("content-type") == "application/json", (status, h, body)
    doc = json.loads(body)
    assert set(doc) == {"error", "code"}, doc
    return status, doc["code"]


def metrics(port):
    """/metrics as {'name{labels}': value}."""
    status, _, body = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


# ---- WebSocket (raw) ----

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def ws_frame(op, payload=b"", fin=True, rsv=0, masked=True, mask=b"\x01\x02\x03\x04",
             length=None):
    """A client frame; `length` overrides the announced payload length."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload) if length is None else length
    m = 0x80 if masked else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if masked:
        return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + payload


class RawWS:
    """A WebSocket client on a plain socket: handshake, frames in and out, close codes."""

    def __init__(self, port, path, headers=None, rcvbuf=None, timeout=10.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        h = {"Host": "127.0.0.1:%d" % port, "Upgrade": "websocket", "Connection": "Upgrade",
             "Sec-WebSocket-Key": WS_KEY, "Sec-WebSocket-Version": "13"}
        h.update(headers or {})
        raw = "GET %s HTTP/1.1\r\n%s\r\n" % (
            path, "".join("%s: %s\r\n" % kv for kv in h.items() if kv[1] is not None))
        self.sock.sendall(raw.encode())
        self.buf = b""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            data += chunk
        head, _, self.buf = data.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        self.head = head.decode("latin-1")

    def send(self, data):
        self.sock.sendall(data)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def recv_frame(self):
        """(fin, opcode, payload) of the next server frame (which must be unmasked)."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        off = 2
        if n == 126:
            self._need(4)
            n = struct.unpack(">H", self.buf[2:4])[0]
            off = 4
        elif n == 127:
            self._need(10)
            n = struct.unpack(">Q", self.buf[2:10])[0]
            off = 10
        self._need(off + n)
        payload = self.buf[off:off + n]
        self.buf = self.buf[off + n:]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_json(self):
        """The next text message as JSON (pings are answered, pongs skipped)."""
        while True:
            fin, op, payload = self.recv_frame()
            if op == 0x9:
                self.send(ws_frame(0xA, payload))
                continue
            if op == 0xA:
                continue
            assert op == 0x1 and fin, (op, payload)
            return json.loads(payload)

    def close_code(self):
        """Reads until a close frame: (code, reason); (None, None) on EOF without one."""
        try:
            while True:
                fin, op, payload = self.recv_frame()
                if op == 0x8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    return code, payload[2:].decode("utf-8", "replace")
        except (ConnectionError, OSError):
            return None, None

    def eof_after_close(self, timeout=5.0):
        """True when the server closes the TCP connection after its close frame."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---- SSE (raw) ----

class RawSSE:
    """An EventSource-like reader on a plain socket: response head, then events."""

    def __init__(self, port, path, headers=None, timeout=10.0, wrap=None):
        """`wrap`, when given, turns the connected socket into the one to use (TLS)."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if wrap:
            self.sock = wrap(self.sock)
        h = {"Host": "127.0.0.1:%d" % port, "Accept": "text/event-stream"}
        h.update(headers or {})
        raw = "GET %s HTTP/1.1\r\n%s\r\n" % (path, "".join("%s: %s\r\n" % kv for kv in h.items()))
        self.sock.sendall(raw.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the response head")
            data += chunk
        head, _, self.buf = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {l.partition(":")[0].lower(): l.partition(":")[2].strip()
                        for l in lines[1:]}
        self.retry = None
        self.comments = 0

    def next_event(self):
        """{'id':..., 'event':..., 'data': parsed JSON} of the next event; comments and retry
        lines are recorded, not returned."""
        while True:
            while b"\n\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("stream closed")
                self.buf += chunk
            block, _, self.buf = self.buf.partition(b"\n\n")
            ev = {}
            data = []
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                    continue
                k, _, v = line.partition(":")
                v = v[1:] if v.startswith(" ") else v
                if k == "retry":
                    self.retry = int(v)
                elif k == "data":
                    data.append(v)
                elif k in ("id", "event"):
                    ev[k] = v
            if data:
                ev["data"] = json.loads("\n".join(data))
                return ev

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def resume_while_writing(port, db, since, start, end, pause):
    """Resumes stream `s` after id `since` (its event i=4) on a new RawWS while a thread inserts
    {i: start..end-1} into db.c, `pause` seconds apart. Returns the RawWS and the `i`s of the
    first end - 5 changes it got (anything else it gets must be `ready`)."""
    def writer():
        for i in range(start, end):
            db.c.insert_one({"i": i})
            time.sleep(pause)
    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.05)
    ws = RawWS(port, "/v1/streams/s?since=%s" % since)
    got = []
    while len(got) < end - 5:
        m = ws.recv_json()
        if m["type"] == "change":
            got.append(m["change"]["fullDocument"]["i"])
        else:
            assert m["type"] == "ready"
    t.join()
    return ws, got


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
