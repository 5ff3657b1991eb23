"""Who may subscribe (DESIGN §4.3, reliability-notes §5.1/§5.3): every refusal happens before
the upgrade, as HTTP with the JSON body {"error": ..., "code": ...}, for WebSocket and SSE
alike, and never echoes the token.

One daemon per module with HS256 (issuer and audience checked, an Origin allowlist) and one
with RS256 for algorithm confusion. Runs unchanged against a real replica set (MONGODB_URI).
"""

import time

import pytest

from daemon_util import *  # noqa: F401,F403
from daemon_util import Daemon
from live_util import (WS_HEADERS, alg_none, assert_refused, claims, free_port, hs256,
                       http_get, live_config, rs256, rsa_keypair, stream_path, upgrade,
                       wait_http)

SECRET = "auth-test-secret-0123456789abcdef0123456789abcd"
ISS = "https://issuer.test"
AUD = "mongocast-tests"
ALLOWED = "http://app.test:8080"


def good_claims(sub="alice", **kw):
    return claims(sub, iss=ISS, aud=AUD, **kw)


class _Server:
    def __init__(self, daemon, port):
        self.daemon = daemon
        self.port = port


def _module_daemon(tmp_path_factory, mongo_uri, name, auth):
    tmp = tmp_path_factory.mktemp(name)
    port = free_port()
    db = "mct_live_auth_%s_%d" % (name, port)
    streams = {
        "private": {"db": db, "collection": "c", "recipient": "fullDocument.owner",
                    "max_await_time_ms": 100},
        "open": {"db": db, "collection": "c", "public": True, "max_await_time_ms": 100},
    }
    cfg = live_config(tmp / "c.yaml", mongo_uri, streams, port, auth=auth,
                      allowed_origins=[ALLOWED])
    d = Daemon(cfg, tmp)
    try:
        wait_http(port, d)
        d.wait_open(2)
    except BaseException:
        d.stop()
        raise
    return d, _Server(d, port)


def _finish(d):
    rc = d.stop()
    report = d.sanitizer_report()
    if report:
        pytest.fail("mongocast sanitizer report:\n" + report, pytrace=False)
    if rc != 0:
        pytest.fail("mongocast exited %s on SIGTERM" % rc, pytrace=False)


@pytest.fixture(scope="module")
def hs(tmp_path_factory, mongo_uri):
    d, srv = _module_daemon(tmp_path_factory, mongo_uri, "hs",
                            {"algorithm": "HS256", "secret": SECRET, "issuer": ISS,
                             "audience": AUD, "admin_role": "mongocast:all"})
    yield srv
    _finish(d)


@pytest.fixture(scope="module")
def rsa(tmp_path_factory):
    return rsa_keypair(tmp_path_factory.mktemp("rsa"))


@pytest.fixture(scope="module")
def rs(tmp_path_factory, mongo_uri, rsa):
    _, pub_path = rsa
    d, srv = _module_daemon(tmp_path_factory, mongo_uri, "rs",
                            {"algorithm": "RS256", "public_key_file": str(pub_path)})
    yield srv
    _finish(d)


# (id, token factory, expected message pattern). Each must be refused with 401 unauthorized.
BAD_TOKENS = [
    ("alg_none", lambda: alg_none(good_claims()), r"(?i)algorithm"),
    ("wrong_key", lambda: hs256("another-secret-0123456789abcdef0123456789", good_claims()),
     r"(?i)signature"),
    ("expired", lambda: hs256(SECRET, good_claims(exp_in=-3600)), r"(?i)expired"),
    ("wrong_audience", lambda: hs256(SECRET, claims("alice", iss=ISS, aud="someone-else")),
     r"(?i)audience"),
    ("wrong_issuer", lambda: hs256(SECRET, claims("alice", iss="https://evil.test", aud=AUD)),
     r"(?i)issuer"),
    ("not_yet_valid", lambda: hs256(SECRET, good_claims(nbf=int(time.time()) + 3600)),
     r"(?i)not yet valid"),
    ("no_identity", lambda: hs256(SECRET, {"iss": ISS, "aud": AUD,
                                           "exp": int(time.time()) + 60}), r"(?i)identity"),
    ("garbage", lambda: "not.a.jwt", None),
    ("tampered_payload", lambda: _tamper(hs256(SECRET, good_claims("bob"))), r"(?i)signature"),
    # Validly signed, each with its own reason (these used to read "bad signature").
    ("exp_2_pow_64", lambda: hs256(SECRET, good_claims(exp_in=None, exp=2 ** 64)),
     r"^exp out of range$"),
    ("nul_in_sub", lambda: hs256(SECRET, good_claims("u3\u0000evil")),
     r"^identity claim contains NUL$"),
    ("issued_in_future", lambda: hs256(SECRET, good_claims(iat=int(time.time()) + 3600)),
     r"^token issued in the future$"),
]


def _tamper(tok):
    from live_util import b64url
    import json
    h, _, s = tok.split(".")
    return h + "." + b64url(json.dumps(good_claims("admin", roles=["mongocast:all"])).encode()) \
        + "." + s


def test_no_token_is_401(hs):
    for sse in (False, True):
        assert_refused(upgrade(hs.port, stream_path("private"), sse=sse), 401, "unauthorized")


@pytest.mark.parametrize("name,make,message", BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_bad_token_is_401(hs, name, make, message):
    tok = make()
    # As ?token=, as a bearer header, over WebSocket and over SSE: the same refusal.
    for sse in (False, True):
        assert_refused(upgrade(hs.port, stream_path("private", token=tok), sse=sse), 401,
                       "unauthorized", message, secrets=[tok])
        assert_refused(upgrade(hs.port, stream_path("private"), sse=sse,
                               headers={"Authorization": "Bearer " + tok}),
                       401, "unauthorized", message, secrets=[tok])
    # A bad token is refused even where no token is needed.
    assert_refused(upgrade(hs.port, stream_path("open", token=tok)), 401, "unauthorized",
                   message, secrets=[tok])


def test_good_token_upgrades(hs):
    tok = hs256(SECRET, good_claims())
    assert upgrade(hs.port, stream_path("private", token=tok))[0] == 101
    assert upgrade(hs.port, stream_path("private"),
                   headers={"Authorization": "Bearer " + tok})[0] == 101
    assert upgrade(hs.port, stream_path("private", token=tok), sse=True)[0] == 200
    # A public stream needs no token.
    assert upgrade(hs.port, stream_path("open"))[0] == 101


def test_origin_allowlist(hs):
    tok = hs256(SECRET, good_claims())
    path = stream_path("private", token=tok)
    assert upgrade(hs.port, path, headers={"Origin": ALLOWED})[0] == 101
    assert upgrade(hs.port, path, headers={"Origin": ALLOWED.upper()})[0] == 101
    for bad in ("http://evil.test", "http://app.test:8081", "https://app.test:8080", "null",
                ALLOWED + ".evil.test"):
        assert_refused(upgrade(hs.port, path, headers={"Origin": bad}), 403,
                       "forbidden_origin", secrets=[tok])
    # The origin is checked even for public streams (cross-site WebSocket hijacking).
    assert_refused(upgrade(hs.port, stream_path("open"), headers={"Origin": "http://evil.test"}),
                   403, "forbidden_origin")


def test_unknown_stream_is_404(hs):
    tok = hs256(SECRET, good_claims())
    assert_refused(upgrade(hs.port, stream_path("nope", token=tok)), 404, "unknown_stream")
    assert_refused(upgrade(hs.port, stream_path("nope", token=tok), sse=True), 404,
                   "unknown_stream")


def test_stream_list_and_health(hs):
    import json
    status, headers, body = http_get(hs.port, "/v1/streams")
    assert status == 200
    assert headers.get("content-type", "").startswith("application/json")
    doc = json.loads(body)
    assert sorted(doc["streams"], key=lambda s: s["name"]) == [
        {"name": "open", "url": "/v1/streams/open"},
        {"name": "private", "url": "/v1/streams/private"}]
    assert http_get(hs.port, "/healthz")[0] == 200
    assert http_get(hs.port, "/readyz")[0] == 200


def test_hs_rs_confusion_is_401(rs, rsa):
    priv, pub_path = rsa
    pub_pem = pub_path.read_bytes()
    # HS256 "signed" with the server's RSA public key as the HMAC secret (libjwt #200).
    forged = hs256(pub_pem, claims("alice", roles=["mongocast:all"]))
    for sse in (False, True):
        assert_refused(upgrade(rs.port, stream_path("private", token=forged), sse=sse), 401,
                       "unauthorized", r"(?i)algorithm", secrets=[forged])
    assert_refused(upgrade(rs.port, stream_path("private", token=alg_none(claims("alice")))),
                   401, "unauthorized")
    # The real thing passes.
    good = rs256(priv, claims("alice"))
    assert upgrade(rs.port, stream_path("private", token=good))[0] == 101


def test_refusal_is_plain_http_not_an_upgrade(hs):
    """The refusal arrives as an ordinary HTTP response on the upgrade request (no 101 first)."""
    import socket
    s = socket.create_connection(("127.0.0.1", hs.port), timeout=10)
    try:
        req = "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" % stream_path("private")
        req += "".join("%s: %s\r\n" % kv for kv in WS_HEADERS.items()) + "\r\n"
        s.sendall(req.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 401"), head
    assert "sec-websocket-accept" not in head.lower()
    assert "application/json" in head.lower()
