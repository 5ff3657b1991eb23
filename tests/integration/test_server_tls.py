"""TLS on the listener (server.tls): wss:// and https:// (SSE, plain routes) with a test CA made
by the `openssl` CLI at test time; refusals (a client that does not trust the certificate, a
plain HTTP request on the TLS port, garbage bytes, a client without a certificate when
client_ca_file asks for one) that leave the daemon serving; the certificate reloaded on SIGHUP
while open connections keep theirs, and a bad key refused with the old certificate kept;
`mongocast check` on the certificate and key.
"""

import asyncio
import json
import random
import shutil
import signal
import socket
import ssl
import time

import pytest
import requests
import websockets

from daemon_util import *  # noqa: F401,F403
from server_util import RawSSE, server_config, start_server, stream
from tls_util import client_ctx, make_cert, make_pki


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


# ---- daemon --------------------------------------------------------------------------------

def start_tls(daemons, tmp_path, mongo_uri, db_name, tls, env=None):
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"tls": tls}, checkpoint_dir=tmp_path / "cp")
    d, port = start_server(daemons, cfg, env=env, ready=False)  # /readyz is HTTPS here
    assert "tls=on" in d.stderr_text()
    return d, port, cfg


def tls_cfg(cert):
    return {"cert_file": str(cert[0]), "key_file": str(cert[1])}


def https_get(port, path, ca_pem, cert=None, timeout=10):
    return requests.get("https://127.0.0.1:%d%s" % (port, path), verify=str(ca_pem), cert=(
        (str(cert[0]), str(cert[1])) if cert else None), timeout=timeout)


def wait_ready(port, ca_pem, cert=None):
    deadline = time.monotonic() + 30
    while True:
        try:
            if https_get(port, "/readyz", ca_pem, cert).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "/readyz over https never answered 200"
        time.sleep(0.1)


def peer_cn(port, ca_pem):
    """The CN of the certificate the server presents to a new connection."""
    ctx = client_ctx(ca_pem)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return subject["commonName"]


def tls_metrics(port, ca_pem, cert=None):
    body = https_get(port, "/metrics", ca_pem, cert).text
    out = {}
    for line in body.splitlines():
        if line.startswith("mongocast_tls_handshakes_total"):
            k, v = line.rsplit(" ", 1)
            out[k.split('"')[1]] = int(float(v))
    return out


class TlsSSE(RawSSE):
    """RawSSE (server_util.py) over a TLS socket that trusts `ca_pem`."""

    def __init__(self, port, path, ca_pem, timeout=15.0):
        ctx = client_ctx(ca_pem)
        super().__init__(port, path, timeout=timeout,
                         wrap=lambda raw: ctx.wrap_socket(raw, server_hostname="127.0.0.1"))


async def _ws_open(port, ctx):
    ws = await websockets.connect("wss://127.0.0.1:%d/v1/streams/s" % port, ssl=ctx,
                                  open_timeout=10, max_size=None)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "ready", first
    return ws


async def _ws_changes(ws, n):
    out = []
    while len(out) < n:
        m = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if m.get("type") == "change":
            out.append(m["change"]["fullDocument"]["i"])
    return out


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# ---- tests ---------------------------------------------------------------------------------

def test_wss_and_https_sse_and_clean_refusals(tmp_path, daemons, mongo_uri, db, db_name, pki):
    # request_ms is also the handshake timeout: short, so that incomplete garbage is closed
    # within the test.
    d, port, _ = start_tls(daemons, tmp_path, mongo_uri, db_name, tls_cfg(pki["server"]),
                           env={"MONGOCAST_TEST_TIMING": "request_ms=1500"})
    ca = pki["ca"][0]
    wait_ready(port, ca)
    assert https_get(port, "/healthz", ca).status_code == 200
    assert https_get(port, "/v1/streams", ca).json()["streams"][0]["name"] == "s"
    # the viewer page over https
    page = https_get(port, "/", ca)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(_ws_open(port, client_ctx(ca)))
    sse = TlsSSE(port, "/v1/streams/s", ca)
    assert sse.status == 200
    assert sse.headers["content-type"].startswith("text/event-stream")

    def sse_changes(n):
        got = []
        while len(got) < n:
            ev = sse.next_event()
            if ev.get("event") == "change":
                got.append(ev["data"]["change"]["fullDocument"]["i"])
        return got

    # Big and small events: several TLS records per message, several messages per record.
    db.c.insert_many([{"i": i, "pad": "x" * (40000 if i % 7 == 0 else 10)} for i in range(50)])
    assert loop.run_until_complete(_ws_changes(ws, 50)) == list(range(50))
    assert sse_changes(50) == list(range(50))

    # A client that does not trust the certificate: the handshake fails, the daemon goes on.
    with pytest.raises(ssl.SSLCertVerificationError):
        peer_cn(port, pki["other_ca"][0])
    with pytest.raises(requests.exceptions.SSLError):
        https_get(port, "/healthz", pki["other_ca"][0])

    # Plain HTTP on the TLS port: a plaintext 400 that says why, then the connection closes.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data
    assert json.loads(body)["code"] == "tls_required"

    # Garbage: random bytes, a TLS record header followed by noise, records that never
    # complete, a flood. Every connection is closed by the server: at once when the bytes
    # cannot be TLS, after the handshake timeout when they are an unfinished record.
    rnd = random.Random(12)
    payloads = [bytes(rnd.getrandbits(8) for _ in range(n)) for n in (1, 7, 300, 5000)]
    payloads += [b"\x16\x03\x01\x40\x00" + bytes(rnd.getrandbits(8) for _ in range(2000)),
                 b"\x16\x03\x01\x00\x05\x01\x00\x00\x01",
                 b"\x16\x03\x03" + b"\xff" * 70000,
                 b"\x17\x03\x03\x00\x10" + b"\x00" * 16]
    socks = []
    for p in payloads:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            s.sendall(p)
        except (ConnectionResetError, BrokenPipeError):
            pass
        socks.append(s)
    for i, s in enumerate(socks):
        t0 = time.monotonic()
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            pytest.fail("garbage payload %d: the connection was not closed" % i)
        finally:
            s.close()
        assert time.monotonic() - t0 < 8
    assert d.alive()

    # Everything still works: the open subscribers keep receiving, new handshakes succeed.
    db.c.insert_many([{"i": i} for i in range(50, 60)])
    assert loop.run_until_complete(_ws_changes(ws, 10)) == list(range(50, 60))
    assert sse_changes(10) == list(range(50, 60))
    ws2 = loop.run_until_complete(_ws_open(port, client_ctx(ca)))
    loop.run_until_complete(ws2.close())
    loop.run_until_complete(ws.close())
    sse.close()
    m = tls_metrics(port, ca)
    assert m["ok"] >= 6 and m["failed"] >= 4, m
    assert d.stop() == 0


def test_sighup_reloads_the_certificate_without_dropping_connections(
        tmp_path, daemons, mongo_uri, db, db_name, pki):
    live = pki["dir"] / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(pki["server"][0], cert)
    shutil.copy(pki["server"][1], key)
    d, port, _ = start_tls(daemons, tmp_path, mongo_uri, db_name, tls_cfg((cert, key)))
    ca = pki["ca"][0]
    wait_ready(port, ca)
    assert peer_cn(port, ca) == "server-1"
    loop = asyncio.new_event_loop()
    ws = loop.run_until_complete(_ws_open(port, client_ctx(ca)))
    db.c.insert_many([{"i": i} for i in range(5)])
    assert loop.run_until_complete(_ws_changes(ws, 5)) == list(range(5))

    # A new certificate (the config file is unchanged): new connections get it, the open one
    # keeps receiving on its session.
    second = make_cert(pki["dir"], pki["ca"], "server-2")
    shutil.copy(second[0], cert)
    shutil.copy(second[1], key)
    d.send(signal.SIGHUP)
    d.wait_stderr(r"reloaded TLS certificate only")
    assert "server restarting" not in d.stderr_text()
    assert peer_cn(port, ca) == "server-2"
    db.c.insert_many([{"i": i} for i in range(5, 10)])
    assert loop.run_until_complete(_ws_changes(ws, 5)) == list(range(5, 10))

    # A bad key (garbage, then a valid key of another certificate): refused, clearly logged,
    # the running certificate stays.
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    d.send(signal.SIGHUP)
    d.wait_stderr(r"TLS reload refused, keeping the running certificate and configuration: "
                  r"server\.tls\.key_file")
    shutil.copy(pki["server"][1], key)  # server-1's key with server-2's certificate
    d.send(signal.SIGHUP)
    d.wait_stderr(r"key_file .* does not match the certificate")
    assert peer_cn(port, ca) == "server-2"
    db.c.insert_many([{"i": i} for i in range(10, 15)])
    assert loop.run_until_complete(_ws_changes(ws, 5)) == list(range(10, 15))
    assert https_get(port, "/healthz", ca).status_code == 200
    loop.run_until_complete(ws.close())
    assert d.stop() == 0


def test_client_certificates_when_client_ca_file_is_set(tmp_path, daemons, mongo_uri, db_name,
                                                        pki):
    client = make_cert(pki["dir"], pki["ca"], "client-1", client=True)
    stranger = make_cert(pki["dir"], pki["other_ca"], "client-2", client=True)
    tls = tls_cfg(pki["server"])
    tls.update({"client_ca_file": str(pki["ca"][0]), "min_version": "1.3"})
    d, port, _ = start_tls(daemons, tmp_path, mongo_uri, db_name, tls)
    ca = pki["ca"][0]
    wait_ready(port, ca, client)
    assert https_get(port, "/healthz", ca, client).status_code == 200
    for cert in (None, stranger):
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            https_get(port, "/healthz", ca, cert)
    # TLS 1.2 is below min_version 1.3.
    ctx = client_ctx(ca, client)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(100)
    assert d.alive()
    m = tls_metrics(port, ca, client)
    assert m["failed"] >= 3, m
    assert d.stop() == 0


def test_check_and_start_refuse_bad_tls_files(tmp_path, mongo_uri, db_name, pki):
    other = make_cert(pki["dir"], pki["ca"], "server-3")
    good = server_config(tmp_path / "good.yaml", mongo_uri, {"s": stream(db_name, "c")},
                         server={"tls": tls_cfg(pki["server"])}, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", good)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok    tls: certificate" in p.stdout

    bad = server_config(tmp_path / "bad.yaml", mongo_uri, {"s": stream(db_name, "c")},
                        server={"tls": {"cert_file": str(pki["server"][0]),
                                        "key_file": str(other[1])}},
                        checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", bad)
    assert p.returncode != 0
    assert "FAIL  tls: server.tls.key_file %s does not match" % other[1] in p.stdout, p.stdout

    missing = server_config(tmp_path / "missing.yaml", mongo_uri, {"s": stream(db_name, "c")},
                            server={"tls": {"cert_file": str(tmp_path / "nope.pem"),
                                            "key_file": str(other[1])}},
                            checkpoint_dir=tmp_path / "cp")
    p = run_cli("run", "-c", missing, timeout=60)
    assert p.returncode != 0
    assert "server.tls.cert_file %s: cannot open" % (tmp_path / "nope.pem") in p.stderr, p.stderr
