"""The live viewer page (`/`) in a real browser: Debian's Chromium driven by playwright-core
(tests/browser/viewer.test.mjs). This file starts the emulator (or uses MONGODB_URI) and the
daemon, mints the tokens, and performs the MongoDB writes the browser script asks for over
stdio (`STEP name` -> `OK`). The screenshot lands in tests/artifacts/viewer.png.

Chromium (scripts/install-deps.sh --browser) and tests/browser/node_modules (npm install) are
installed by `make integration` / `make test` (the Makefile's browser-deps target). When they
are missing this test FAILS, loudly: a viewer that was never run in a browser is not tested.
"""

import os
import queue
import shutil
import socket
import subprocess
import threading
import time

import pytest

from conftest import REPO
from daemon_util import *  # noqa: F401,F403
from live_util import (claims, create_with_images, free_port, hs256, http_get, live_config,
                       start_live)
from tls_util import client_ctx, make_pki

BROWSER_DIR = REPO / "tests" / "browser"
ARTIFACTS = REPO / "tests" / "artifacts"
SECRET = "viewer-test-secret-0123456789abcdef0123456789"
CHROMIUM = "/usr/bin/chromium"
NODE_TIMEOUT = 240.0


def _require_browser_tools():
    problems = []
    if not os.access(CHROMIUM, os.X_OK):
        problems.append("%s is missing (run scripts/install-deps.sh --browser)" % CHROMIUM)
    if not shutil.which("node"):
        problems.append("node is missing (apt-get install nodejs)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        problems.append("tests/browser/node_modules/playwright-core is missing "
                        "(cd tests/browser && npm install --no-audit --no-fund)")
    if problems:
        pytest.fail("the browser test cannot run: " + "; ".join(problems) +
                    " -- `make browser-deps` installs both", pytrace=False)


def test_viewer_page_served(tmp_path, daemons, mongo_uri, db_name):
    """`/` serves the embedded page as HTML (no browser needed for this part)."""
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri,
                      {"items": {"db": db_name, "collection": "items", "public": True,
                                 "max_await_time_ms": 100}}, port)
    start_live(daemons, cfg, port)
    status, headers, body = http_get(port, "/")
    assert status == 200
    assert headers.get("content-type", "").startswith("text/html"), headers
    assert body == (REPO / "src" / "daemon" / "viewer.html").read_bytes()


def test_viewer_in_chromium(tmp_path, daemons, mongo_uri, db, db_name):
    _run_viewer(tmp_path, daemons, mongo_uri, db, db_name, tls=False)


def test_viewer_in_chromium_over_tls(tmp_path, daemons, mongo_uri, db, db_name):
    """server.tls: the page loads from https:// and its subscription goes over wss://."""
    _run_viewer(tmp_path, daemons, mongo_uri, db, db_name, tls=True)


def _start_tls(daemons, cfg, ca_pem, port):
    d = daemons(cfg)
    d.wait_stderr(r"server listening on .* tls=on")
    d.wait_open(1)
    ctx = client_ctx(ca_pem)

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
    wait_for(up, timeout=30, interval=0.1, message="mongocast /readyz over https")
    return d


def _run_viewer(tmp_path, daemons, mongo_uri, db, db_name, tls):
    _require_browser_tools()
    port = free_port()
    base = "%s://127.0.0.1:%d" % ("https" if tls else "http", port)
    server_extra = None
    if tls:
        pki = make_pki(tmp_path)
        server_extra = {"tls": {"cert_file": str(pki["server"][0]),
                                "key_file": str(pki["server"][1])}}
    create_with_images(db, "items")
    stream = {"db": db_name, "collection": "items", "max_await_time_ms": 100,
              "recipient": "fullDocument.owner", "full_document": "whenAvailable",
              "full_document_before_change": "whenAvailable",
              # The human line under each row (the name may hold HTML: shown as text).
              "summary": "{fullDocument.name} ({operationType})"}
    # The page's own origin is the only one allowed: the browser sends it on the upgrade.
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"items": stream}, port,
                      auth={"algorithm": "HS256", "secret": SECRET,
                            "admin_role": "mongocast:all"},
                      allowed_origins=[base], server_extra=server_extra)
    state = {"daemon": _start_tls(daemons, cfg, pki["ca"][0], port) if tls
             else start_live(daemons, cfg, port)}

    def restart():
        assert state["daemon"].stop() == 0
        state["daemon"] = start_live(daemons, cfg, port)

    coll = db["items"]
    steps = {
        "insert-1": lambda: (
            coll.insert_one({"_id": "a1", "owner": "alice",
                             "name": "<img src=x onerror=window.__xss=1>"}),
            coll.insert_one({"_id": "b1", "owner": "bob", "name": "bob's"}),
            coll.insert_one({"_id": "a2", "owner": "alice", "name": "second"})),
        "insert-2": lambda: coll.insert_one({"_id": "a3", "owner": "alice", "quantity": 3}),
        "update-delete": lambda: (
            coll.update_one({"_id": "a3"}, {"$set": {"quantity": 7}}),
            coll.delete_one({"_id": "b1"}),  # bob's: must not show up
            coll.delete_one({"_id": "a3"})),
        "restart-daemon": restart,
        "insert-3": lambda: coll.insert_one({"_id": "a4", "owner": "alice"}),
    }

    env = dict(os.environ)
    env.update({
        "MC_VIEWER_URL": base + "/",
        "MC_VIEWER_STREAM": "items",
        "MC_TOKEN_ALICE": hs256(SECRET, claims("alice")),
        "MC_TOKEN_BAD": hs256("not-the-secret-" + SECRET, claims("alice")),
        "MC_ARTIFACTS": str(ARTIFACTS),
        "MC_VIEWER_TLS": "1" if tls else "0",
    })
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["node", str(BROWSER_DIR / "viewer.test.mjs")], cwd=str(REPO),
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)],
                              daemon=True)
    reader.start()
    transcript = []
    deadline = time.monotonic() + NODE_TIMEOUT
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("browser test timed out after %.0fs; output:\n%s" % (
                    NODE_TIMEOUT, "".join(transcript)))
            if line is None:
                break
            transcript.append(line)
            if line.startswith("STEP "):
                name = line[5:].strip()
                try:
                    steps[name]()
                    answer = "OK"
                except Exception as e:  # noqa: BLE001 - reported to the browser script
                    answer = "ERR %s: %r" % (name, e)
                    transcript.append("harness: %s\n" % answer)
                proc.stdin.write(answer + "\n")
                proc.stdin.flush()
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(transcript)
    assert rc == 0, "browser test failed (exit %s):\n%s\ndaemon stderr tail:\n%s" % (
        rc, out, state["daemon"].stderr_text()[-3000:])
    assert "all checks passed" in out
    assert (ARTIFACTS / ("viewer-tls.png" if tls else "viewer.png")).stat().st_size > 1000
    if tls:
        # The page and its WebSocket both went over TLS (no plain request reached the port).
        assert "plain HTTP request on the TLS port" not in state["daemon"].stderr_text()
