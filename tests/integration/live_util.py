"""Helpers for the live-delivery tests (test_live_*.py, test_viewer_browser.py): a daemon with
its HTTP server on a free port, JWTs (good and deliberately bad ones), raw upgrade requests
that return the refusal's status and JSON body, and WebSocket / SSE subscribers that collect
messages on a thread of their own.

Subscribers speak DESIGN §4.3 and nothing more: WebSocket text frames or SSE events, each one
JSON object; `token=` / `Authorization: Bearer`, `since=`, `vars=`, `filter=` in the query.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
import urllib.parse

import pytest

from daemon_util import Daemon, write_config, wait_for

HTTP_TIMEOUT = 10.0
START_TIMEOUT = 30.0  # ASan daemon on a loaded 2-core machine


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1 (the daemon binds it next)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def live_config(path, uri, streams, port, auth=None, allowed_origins=None, sinks=None,
                server_extra=None):
    """A config whose server listens on 127.0.0.1:`port`. `auth` is the `auth.jwt` mapping
    (or None for no auth). Default sinks: none besides the built-in WS/SSE fan-out, so a stdout
    sink does not slow anything down; pass `sinks` to add some. `server_extra`: more `server`
    options."""
    server = {"listen": "127.0.0.1:%d" % port}
    server.update(server_extra or {})
    if allowed_origins is not None:
        server["allowed_origins"] = allowed_origins
    extra = ["server: %s" % json.dumps(server)]
    if auth is not None:
        extra.append("auth: %s" % json.dumps({"jwt": auth}))
    return write_config(path, uri, streams, sinks=sinks if sinks is not None else [],
                        extra="\n".join(extra))


def http_get(port, path, headers=None, timeout=HTTP_TIMEOUT):
    """(status, headers dict with lower-case names, body bytes) of a plain GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def wait_http(port, daemon, path="/healthz", timeout=START_TIMEOUT):
    """Waits until the daemon answers `path` with 200; fails with its stderr if it dies."""
    def up():
        if not daemon.alive():
            pytest.fail("mongocast exited with %s before serving HTTP; stderr:\n%s" % (
                daemon.proc.returncode, daemon.stderr_text()[-4000:]))
        try:
            return http_get(port, path, timeout=2)[0] == 200
        except OSError:
            return False
    wait_for(up, timeout=timeout, interval=0.1,
             message="mongocast to answer GET %s on port %d" % (path, port))


def start_live(daemons, cfg, port, n_streams=1):
    """Starts `mongocast run -c cfg` and waits for its HTTP server and its change streams."""
    d = daemons(cfg)
    wait_http(port, d)
    d.wait_open(n_streams)
    return d


class LiveServer:
    """What module_server() yields: port, daemon, client (pymongo), db, coll (db["c"])."""


@contextlib.contextmanager
def module_server(cfg, tmp, port, mongo_uri, dbname, n_streams):
    """A daemon for a whole test module (the `daemons` fixture is per test): starts
    `mongocast run -c cfg` in `tmp`, waits for its HTTP server on `port` and its `n_streams`
    change streams, and yields a LiveServer. At the end it stops the daemon, drops `dbname`,
    and fails on a sanitizer report or a non-zero exit on SIGTERM."""
    import pymongo
    d = Daemon(cfg, tmp)
    s = LiveServer()
    s.port = port
    s.daemon = d
    s.client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=15000)
    s.db = s.client[dbname]
    s.coll = s.db["c"]
    try:
        wait_http(port, d)
        d.wait_open(n_streams)
        yield s
    finally:
        rc = d.stop()
        s.client.drop_database(dbname)
        s.client.close()
        report = d.sanitizer_report()
        if report:
            pytest.fail("mongocast sanitizer report:\n" + report, pytrace=False)
        if rc != 0:
            pytest.fail("mongocast exited %s on SIGTERM" % rc, pytrace=False)


# ---- JWTs ----

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims(sub, roles=None, exp_in=3600, **extra):
    now = int(time.time())
    c = {"sub": sub, "iat": now}
    if exp_in is not None:
        c["exp"] = now + exp_in
    if roles is not None:
        c["roles"] = roles
    c.update(extra)
    return c


def hs256(secret, payload, header=None):
    """A compact JWT signed with HMAC-SHA256, built by hand so that tests can also sign with
    keys a JWT library would refuse (an RSA public key PEM, for HS/RS confusion)."""
    h = {"alg": "HS256", "typ": "JWT"}
    h.update(header or {})
    key = secret if isinstance(secret, bytes) else secret.encode()
    signing_input = b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def alg_none(payload):
    """An unsigned token (alg "none", empty signature)."""
    h = {"alg": "none", "typ": "JWT"}
    return b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(payload).encode()) + "."


def rsa_keypair(tmp_path):
    """(private key PEM bytes, public key PEM path) of a fresh 2048-bit RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(pub)
    return priv, path


def rs256(private_pem, payload):
    import jwt
    return jwt.encode(payload, private_pem, algorithm="RS256")


# ---- requests for a subscription ----

def stream_path(stream, token=None, since=None, vars=None, filter=None):
    q = []
    if token is not None:
        q.append(("token", token))
    if since is not None:
        q.append(("since", since))
    if vars is not None:
        q.append(("vars", vars if isinstance(vars, str) else json.dumps(vars)))
    if filter is not None:
        q.append(("filter", filter if isinstance(filter, str) else json.dumps(filter)))
    path = "/v1/streams/" + urllib.parse.quote(stream, safe="")
    return path + ("?" + urllib.parse.urlencode(q) if q else "")


WS_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def upgrade(port, path, headers=None, sse=False):
    """Sends the opening request of a WebSocket (or, with sse=True, an SSE) subscription and
    returns (status, json body or None, raw body). For a refusal the body is the JSON of
    DESIGN §4.3; an accepted request is closed at once (101 / 200, body not read)."""
    h = dict({"Accept": "text/event-stream"} if sse else WS_HEADERS)
    h.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", path, headers=h)
        r = conn.getresponse()
        if r.status in (101, 200):
            return r.status, None, b""
        raw = r.read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = None
        return r.status, body, raw
    finally:
        conn.close()


def assert_refused(result, status, code, message_re=None, secrets=()):
    """`result` from upgrade(): the status, a JSON body {"error": str, "code": code} (nothing
    else), a message matching `message_re`, and none of `secrets` echoed back."""
    import re
    got_status, body, raw = result
    assert got_status == status, "expected HTTP %d, got %d: %r" % (status, got_status, raw)
    assert isinstance(body, dict), "refusal body is not a JSON object: %r" % raw
    assert set(body) == {"error", "code"}, "refusal body keys: %r" % body
    assert body["code"] == code, "expected code %r, got %r" % (code, body)
    assert isinstance(body["error"], str) and body["error"], body
    if message_re:
        assert re.search(message_re, body["error"]), "message %r !~ %r" % (body["error"],
                                                                          message_re)
    for s in secrets:
        assert s not in raw.decode("utf-8", "replace"), "refusal echoes a secret/token"
    return body


# ---- subscribers ----

class _Collector:
    def __init__(self, name):
        self.name = name
        self.msgs = []
        self.recv_times = []
        self.error = None
        self.closed = False
        self.close_code = None
        self._cond = threading.Condition()

    def _add(self, msg):
        now = time.time()
        with self._cond:
            self.msgs.append(msg)
            self.recv_times.append(now)
            self._cond.notify_all()

    def received(self):
        """(message, wall-clock time it was read) pairs, in arrival order."""
        with self._cond:
            return list(zip(self.msgs, self.recv_times))

    def messages(self):
        with self._cond:
            return list(self.msgs)

    def changes(self):
        return [m for m in self.messages() if m.get("type") == "change"]

    def wait(self, predicate, timeout=20.0, what="messages"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.msgs):
                if self.error is not None:
                    pytest.fail("subscriber %s failed: %r" % (self.name, self.error))
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail("subscriber %s: timed out after %.0fs waiting for %s; got %d "
                                "messages, last: %r" % (self.name, timeout, what, len(self.msgs),
                                                        self.msgs[-3:]))
                self._cond.wait(min(left, 0.2))
            return list(self.msgs)

    def wait_ready(self, timeout=20.0):
        return self.wait(lambda ms: any(m.get("type") == "ready" for m in ms), timeout, "ready")

    def wait_changes(self, n, timeout=30.0):
        return self.wait(lambda ms: sum(1 for m in ms if m.get("type") == "change") >= n,
                         timeout, "%d changes" % n)


class WsSubscriber(_Collector):
    """A WebSocket subscriber (websockets, asyncio) on a thread of its own. Every text frame is
    parsed as JSON and kept; a frame that is not JSON is a test failure."""

    def __init__(self, port, path, headers=None, name="ws", max_size=16 * 1024 * 1024):
        super().__init__(name)
        self.url = "ws://127.0.0.1:%d%s" % (port, path)
        self.max_size = max_size
        self.headers = headers or {}
        self._loop = asyncio.new_event_loop()
        self._ws = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._connected.wait(HTTP_TIMEOUT + 5):
            pytest.fail("WebSocket %s: no connection within %ss" % (self.url, HTTP_TIMEOUT))
        if self.error is not None:
            pytest.fail("WebSocket %s: %r" % (self.name, self.error))

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        # Let the library's closing handshake tasks finish before the loop is closed.
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        if pending:
            self._loop.run_until_complete(asyncio.wait(pending, timeout=5))
        for t in pending:
            t.cancel()

    async def _main(self):
        import websockets
        try:
            self._ws = await websockets.connect(self.url, extra_headers=self.headers,
                                                max_size=self.max_size,
                                                open_timeout=HTTP_TIMEOUT, ping_interval=None)
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.error = e
            self._connected.set()
            return
        self._connected.set()
        try:
            async for frame in self._ws:
                if not isinstance(frame, str):
                    self.error = "binary frame received"
                    break
                try:
                    self._add(json.loads(frame))
                except ValueError:
                    self.error = "frame is not JSON: %r" % frame[:200]
                    break
        except Exception as e:  # noqa: BLE001 - connection closed abnormally
            self.close_code = getattr(e, "code", None)
        finally:
            with self._cond:
                self.closed = True
                if self.close_code is None and self._ws is not None:
                    self.close_code = self._ws.close_code
                self._cond.notify_all()

    def close(self):
        if self._ws is not None and self._thread.is_alive():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop)
                fut.result(5)
            except Exception:  # noqa: BLE001 - already gone, or the loop just finished
                pass
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


class SseSubscriber(_Collector):
    """A Server-Sent Events subscriber (a raw HTTP/1.1 connection) on a thread of its own.
    Keeps each event's JSON `data` and checks that `id:` equals the message's id and `event:`
    its type."""

    def __init__(self, port, path, headers=None, name="sse"):
        super().__init__(name)
        self.status = None
        self.retry = None
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
        h = {"Host": "127.0.0.1:%d" % port, "Accept": "text/event-stream"}
        h.update(headers or {})
        req = "GET %s HTTP/1.1\r\n" % path + "".join("%s: %s\r\n" % kv for kv in h.items())
        self._sock.sendall((req + "\r\n").encode())
        self._file = self._sock.makefile("rb")
        status_line = self._file.readline().decode("latin-1")
        parts = status_line.split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        self.headers = {}
        while True:
            line = self._file.readline().decode("latin-1").rstrip("\r\n")
            if not line:
                break
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if self.status != 200:
            pytest.fail("SSE %s: status line %r" % (path, status_line))
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _body(self):
        """The response body as it arrives, de-chunked when Transfer-Encoding is chunked."""
        if not self._chunked:
            while True:
                b = self._file.read1(65536)
                if not b:
                    return
                yield b
        while True:
            size_line = self._file.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            chunk = self._file.read(size)
            self._file.readline()  # CRLF after the chunk
            if not chunk:
                return
            yield chunk

    def _run(self):
        ev = {}
        data = []
        pending = b""
        try:
            for block in self._body():
                pending += block
                while b"\n" in pending:
                    raw, pending = pending.split(b"\n", 1)
                    line = raw.decode("utf-8").rstrip("\r")
                    if line == "":
                        if data:
                            self._dispatch(ev, "\n".join(data))
                        ev, data = {}, []
                        continue
                    if line.startswith(":"):
                        continue  # heartbeat comment
                    field, _, value = line.partition(":")
                    if value.startswith(" "):
                        value = value[1:]
                    if field == "data":
                        data.append(value)
                    elif field in ("id", "event"):
                        ev[field] = value
                    elif field == "retry":
                        self.retry = value
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def _dispatch(self, ev, data):
        try:
            msg = json.loads(data)
        except ValueError:
            self.error = "SSE data is not JSON: %r" % data[:200]
            return
        if ev.get("event", msg.get("type")) != msg.get("type"):
            self.error = "SSE event: %r but type %r" % (ev.get("event"), msg.get("type"))
        if msg.get("type") == "change" and ev.get("id") != msg.get("id"):
            self.error = "SSE id: %r but message id %r" % (ev.get("id"), msg.get("id"))
        if msg.get("type") == "left" and "id" in ev:
            self.error = "SSE left notice with an id line: %r" % ev.get("id")
        self._add(msg)

    def close(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)


@pytest.fixture
def subscribers():
    """Factory: subscribers.ws(port, path, ...) / subscribers.sse(port, path, ...); every
    subscriber is closed at teardown."""
    made = []

    class Factory:
        @staticmethod
        def ws(port, path, headers=None, name="ws", max_size=16 * 1024 * 1024):
            s = WsSubscriber(port, path, headers, name, max_size)
            made.append(s)
            return s

        @staticmethod
        def sse(port, path, headers=None, name="sse"):
            s = SseSubscriber(port, path, headers, name)
            made.append(s)
            return s

    yield Factory
    for s in made:
        s.close()


def create_with_images(db, name):
    """Creates collection `name` with pre- and post-images on (MongoDB 6.0+ and the emulator),
    so deletes carry fullDocumentBeforeChange and whenAvailable post-images are exact."""
    db.create_collection(name, changeStreamPreAndPostImages={"enabled": True})
    return db[name]
