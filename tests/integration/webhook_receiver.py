#!/usr/bin/env python3
"""A webhook receiver for tests and benchmarks (Python standard library only).

It checks every request's Standard Webhooks signature with its own HMAC code (not mongocast's),
and can misbehave on purpose:
  --fail-rate P       answer 500 with probability P
  --throttle-rate P   answer 429 with `Retry-After: <--retry-after>` with probability P
  --stall-rate P      read the request, then say nothing for --stall-seconds and close
  --reset-rate P      read the request, then reset the connection (RST)
  --reject-ids IDS    answer 400 for these webhook-ids (comma-separated), always
  --stall-ids IDS     stall (as above) for these webhook-ids, always
(in-process only: reject_if, a function of the body that answers 400 when it returns True)
Faults are drawn from a random generator seeded with --seed, per attempt.

Every attempt is appended to --log as one JSON line:
  {"id", "ts", "sig_ok", "answer", "body_sha", "at"}
where answer is the status sent (200, 400, 429, 500) or "stall" / "reset", and a 200 line also
carries "body" (the parsed JSON body) when --keep-bodies is given.

Run as a program it prints "webhook-receiver listening on 127.0.0.1:PORT" and serves until
SIGTERM/SIGINT. Tests may also import Receiver and run it in-process.
"""

import argparse
import base64
import hashlib
import hmac
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def decode_secret(secret):
    """The HMAC key of a whsec_ secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("secret must start with whsec_")
    return base64.b64decode(secret[len("whsec_"):], validate=True)


def verify(keys, msg_id, timestamp, body, header, now=None, tolerance=300):
    """True when `header` holds a v1 signature of msg_id.timestamp.body under one of `keys`
    and the timestamp is within `tolerance` seconds of now."""
    now = time.time() if now is None else now
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs(now - ts) > tolerance:
        return False
    signed = msg_id.encode() + b"." + str(ts).encode() + b"." + body
    expected = [base64.b64encode(hmac.new(k, signed, hashlib.sha256).digest()) for k in keys]
    for part in (header or "").split(" "):
        if not part.startswith("v1,"):
            continue
        got = part[3:].encode()
        if any(hmac.compare_digest(got, e) for e in expected):
            return True
    return False


class Receiver:
    """A threaded HTTP/1.1 (keep-alive) server on 127.0.0.1:<free port>."""

    def __init__(self, secrets, log_path=None, fail_rate=0.0, throttle_rate=0.0, retry_after=1,
                 stall_rate=0.0, stall_seconds=5.0, reset_rate=0.0, reject_ids=(), seed=1,
                 keep_bodies=False, tolerance=300, stall_ids=(), reject_if=None):
        self.keys = [decode_secret(s) for s in secrets]
        self.fail_rate = fail_rate
        self.throttle_rate = throttle_rate
        self.retry_after = retry_after
        self.stall_rate = stall_rate
        self.stall_seconds = stall_seconds
        self.reset_rate = reset_rate
        self.reject_ids = set(reject_ids)
        self.stall_ids = set(stall_ids)
        self.reject_if = reject_if  # body bytes -> True: answer 400 (ids not known up front)
        self.keep_bodies = keep_bodies
        self.tolerance = tolerance
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.attempts = []  # every attempt's record, in arrival order
        self.log = open(log_path, "a", buffering=1) if log_path else None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                pass

            def do_POST(self):
                receiver.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = None

    @property
    def url(self):
        return "http://127.0.0.1:%d/hook" % self.port

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        if self.log:
            self.log.close()

    def _draw(self):
        with self.lock:
            x = self.rng.random()
        for name, rate in (("stall", self.stall_rate), ("reset", self.reset_rate),
                           ("throttle", self.throttle_rate), ("fail", self.fail_rate)):
            if x < rate:
                return name
            x -= rate
        return None

    def _record(self, rec):
        with self.lock:
            self.attempts.append(rec)
            if self.log:
                self.log.write(json.dumps(rec) + "\n")

    def handle(self, h):
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        msg_id = h.headers.get("webhook-id") or ""
        ts = h.headers.get("webhook-timestamp") or ""
        sig = h.headers.get("webhook-signature") or ""
        ok = verify(self.keys, msg_id, ts, body, sig, tolerance=self.tolerance)
        rec = {"id": msg_id, "ts": ts, "sig_ok": ok, "at": time.time(),
               "body_sha": hashlib.sha256(body).hexdigest()[:16],
               "content_type": h.headers.get("Content-Type"),
               "lease_epoch": h.headers.get("mongocast-lease-epoch")}
        if msg_id in self.reject_ids or (self.reject_if and self.reject_if(body)):
            rec["answer"] = 400
            self._record(rec)
            return self._answer(h, 400, b'{"error":"rejected"}')
        fault = "stall" if msg_id in self.stall_ids else self._draw()
        if fault == "stall":
            rec["answer"] = "stall"
            self._record(rec)
            time.sleep(self.stall_seconds)
            h.close_connection = True
            return None
        if fault == "reset":
            rec["answer"] = "reset"
            self._record(rec)
            # SO_LINGER with a zero timeout turns close() into a reset
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            return None
        if fault == "throttle":
            rec["answer"] = 429
            self._record(rec)
            return self._answer(h, 429, b"slow down", {"Retry-After": str(self.retry_after)})
        if fault == "fail":
            rec["answer"] = 500
            self._record(rec)
            return self._answer(h, 500, b"oops")
        if not ok:
            rec["answer"] = 401
            self._record(rec)
            return self._answer(h, 401, b"bad signature")
        rec["answer"] = 200
        if self.keep_bodies:
            try:
                rec["body"] = json.loads(body)
            except ValueError:
                rec["body"] = None
        self._record(rec)
        return self._answer(h, 200, b"")

    @staticmethod
    def _answer(h, status, body, headers=None):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if body:
            h.wfile.write(body)


try:
    import pytest

    @pytest.fixture
    def receivers():
        """Factory of in-process receivers (Receiver(**kw), started), all stopped at teardown."""
        started = []

        def make(**kw):
            r = Receiver(**kw).start()
            started.append(r)
            return r

        yield make
        for r in started:
            r.stop()
except ImportError:  # run as a program without pytest
    pass

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--secret", action="append", required=True)
    p.add_argument("--log")
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--throttle-rate", type=float, default=0.0)
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--stall-seconds", type=float, default=5.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--reject-ids", default="")
    p.add_argument("--stall-ids", default="")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-bodies", action="store_true")
    a = p.parse_args(argv)
    r = Receiver(a.secret, a.log, a.fail_rate, a.throttle_rate, a.retry_after, a.stall_rate,
                 a.stall_seconds, a.reset_rate, [x for x in a.reject_ids.split(",") if x],
                 a.seed, a.keep_bodies, stall_ids=[x for x in a.stall_ids.split(",") if x])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    r.start()
    print("webhook-receiver listening on 127.0.0.1:%d" % r.port, flush=True)
    done.wait()
    r.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
