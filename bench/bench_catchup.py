#!/usr/bin/env python3
"""Client catch-up from the oplog (docs/PERFORMANCE.md, "Catch-up from the oplog"): how fast
one subscriber resuming CU_EVENTS events back is replayed, and what that does to live delivery
to other subscribers of the same daemon.

Usage: bench/bench_catchup.py BUILD_DIR   (a release build)
Environment: CU_EVENTS (100000), CU_RUNS (3), CU_LIVE_SUBS (10), CU_RATE (500 events/s written
             during the latency windows), CU_WINDOW_S (4).

Starts a mongo-emulator (--oplog-max-events CU_EVENTS + 50000) and `mongocast run` with one
public stream (history 1000, so a resume CU_EVENTS back is a catch-up), on free loopback ports.
An anchor event gives the id to resume after; CU_EVENTS small documents are then loaded. Each
run has two windows of CU_WINDOW_S seconds in which a writer thread inserts CU_RATE documents
per second (each carrying its write time) and CU_LIVE_SUBS WebSocket subscribers (one selector
loop in this process) note each change's delivery latency (receive time minus write time):
  - baseline: live load only;
  - catch-up: the same (ending when the catch-up has finished), while a separate process resumes with since=<anchor> and reads
    frames as fast as it can (counting change frames, no JSON parsing) until it has
    CU_EVENTS changes (it counts the frames' opening bytes rather than parsing them).
Each run prints:
  run=N catchup_events=... catchup_s=... catchup_events_per_s=... live_p50_ms_base=...
  live_p99_ms_base=... live_p50_ms_catchup=... live_p99_ms_catchup=... p99_ratio=...
  from_commit_p99_ms_base=... from_commit_p99_ms_catchup=... from_commit_p99_ratio=...
  daemon_cpu_s=... emulator_cpu_s=...
(live_*: receive time minus the writer's clock before insert_many, which includes waiting for
the emulator, one lock around every command, behind the catch-up's getMores; from_commit_*:
receive time minus the change's wallTime, set when the emulator applied the write, ms
resolution.)
Both servers are stopped by pid at the end.
"""

import datetime
import json
import multiprocessing
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pymongo

from bench_util import (cpu_s, emulator_uri, free_port, start_emulator,  # noqa: E402
                        wait_stream_open, ws_handshake)


def ws_connect(port, query):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ws_handshake(sock, "/v1/streams/s%s" % query)
    return sock


class Frames:
    """Incremental WebSocket frame parser (server frames are unmasked)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        buf = self.buf
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            n = buf[pos + 1] & 0x7F
            off = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from(">H", buf, pos + 2)[0]
                off = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from(">Q", buf, pos + 2)[0]
                off = 10
            if end - pos < off + n:
                break
            out.append(bytes(buf[pos + off:pos + off + n]))
            pos += off + n
        del buf[:pos]  # once per read, not per frame
        return out


def catchup_reader(port, since, want, q):
    """Separate process: resume after `since`, count change frames until `want` (by counting
    the frames' opening bytes in what arrives, so the client's own CPU stays small)."""
    t0 = time.monotonic()
    sock = ws_connect(port, "?since=" + since)
    change, reset = b'{"type":"change"', b'{"type":"reset"'
    got = resets = 0
    tail = b""
    while got < want:
        data = sock.recv(1 << 20)
        if not data:
            break
        # The previous read's last len(marker)-1 bytes cannot hold a whole marker, so a
        # marker cut by a read boundary is counted once, here.
        chunk = tail + data
        got += chunk.count(change)
        resets += chunk.count(reset)
        tail = chunk[-(len(reset) - 1):]
    q.put((got, time.monotonic() - t0, resets))
    sock.close()


def live_window(port, n_subs, coll, rate, seconds, stop_early=None):
    """Live subscribers + writer for `seconds`; returns the list of latencies (s)."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n_subs):
        s = ws_connect(port, "")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, Frames())
        socks.append(s)
    time.sleep(0.3)
    lat = []
    stop = threading.Event()

    def writer():
        interval = 0.01
        per = max(1, int(rate * interval))
        nxt = time.time()
        while not stop.is_set():
            now = time.time()
            coll.insert_many([{"live": True, "t": now} for _ in range(per)], ordered=True)
            nxt += interval
            d = nxt - time.time()
            if d > 0:
                time.sleep(d)

    wt = threading.Thread(target=writer)
    wt.start()
    t_start = time.monotonic()
    end = t_start + seconds
    while time.monotonic() < end:
        if stop_early and time.monotonic() - t_start > 0.5 and stop_early():
            break
        for key, _ in sel.select(0.05):
            try:
                data = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            now = time.time()
            for f in key.data.feed(data):
                if f.startswith(b'{"type":"change"') and b'"live":true' in f:
                    m = json.loads(f)
                    wall = m["change"]["wallTime"]["$date"]
                    if isinstance(wall, str):
                        wall = datetime.datetime.strptime(
                            wall, "%Y-%m-%dT%H:%M:%S.%fZ" if "." in wall
                            else "%Y-%m-%dT%H:%M:%SZ").replace(
                            tzinfo=datetime.timezone.utc).timestamp()
                    else:
                        wall = wall / 1000.0
                    lat.append((now - m["change"]["fullDocument"]["t"], now - wall))
    stop.set()
    wt.join()
    for s in socks:
        sel.unregister(s)
        s.close()
    return lat


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build = os.path.abspath(sys.argv[1])
    n_events = int(os.environ.get("CU_EVENTS", "100000"))
    runs = int(os.environ.get("CU_RUNS", "3"))
    n_live = int(os.environ.get("CU_LIVE_SUBS", "10"))
    rate = int(os.environ.get("CU_RATE", "500"))
    window = float(os.environ.get("CU_WINDOW_S", "4"))
    emu_bin = os.path.join(build, "tools/mongo-emulator/mongo-emulator")
    daemon_bin = os.path.join(build, "src/daemon/mongocast")
    work = tempfile.mkdtemp(prefix="bench-catchup-")
    oplog = n_events + 50000 + runs * int(rate * window * 3)
    emu = start_emulator(emu_bin, work, oplog)
    daemon = None
    try:
        uri = emulator_uri(emu)
        client = pymongo.MongoClient(uri)
        coll = client.bench.cu
        port = free_port()
        cfg = os.path.join(work, "c.yaml")
        with open(cfg, "w") as f:
            f.write("mongodb:\n  uri: %s\n" % json.dumps(uri))
            f.write("server: %s\n" % json.dumps({"listen": "127.0.0.1:%d" % port,
                                                 "max_catchup_events": n_events * 10,
                                                 "catchup_timeout_ms": 600000}))
            f.write("streams:\n  s: %s\n" % json.dumps(
                {"db": "bench", "collection": "cu", "public": True, "history": 1000,
                 "max_await_time_ms": 100}))
            f.write("sinks: []\n")
        daemon = subprocess.Popen([daemon_bin, "run", "-c", cfg], stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(work, "daemon.err"), "wb"), cwd=work)
        wait_stream_open(daemon, work)
        anchor = ws_connect(port, "")
        time.sleep(0.3)
        coll.insert_one({"anchor": True})
        fr = Frames()
        since = None
        while since is None:
            for f in fr.feed(anchor.recv(65536)):
                if f.startswith(b'{"type":"change"'):
                    since = json.loads(f)["id"]
        anchor.close()
        t0 = time.monotonic()
        for start in range(0, n_events, 10000):
            coll.insert_many([{"owner": "u%d" % (i % 100), "n": i}
                              for i in range(start, min(n_events, start + 10000))],
                             ordered=False)
        print("loaded events=%d seconds=%.1f" % (n_events, time.monotonic() - t0), flush=True)
        time.sleep(2.0)
        for r in range(runs):
            base = live_window(port, n_live, coll, rate, window)
            d0, e0 = cpu_s(daemon.pid), cpu_s(emu.pid)
            q = multiprocessing.Queue()
            p = multiprocessing.Process(target=catchup_reader, args=(port, since, n_events, q))
            p.start()
            # Live load while the catch-up runs (the window ends when it has finished).
            during = live_window(port, n_live, coll, rate, 120, lambda: not p.is_alive())
            got, secs, resets = q.get(timeout=600)
            p.join(30)
            d1, e1 = cpu_s(daemon.pid), cpu_s(emu.pid)
            if got < n_events or resets:
                raise RuntimeError("catch-up got %d changes, %d resets" % (got, resets))
            bw = [x[0] for x in base]
            cw = [x[0] for x in during]
            bs = [x[1] for x in base]
            cs = [x[1] for x in during]
            b99, c99 = pct(bw, 99), pct(cw, 99)
            print("run=%d catchup_events=%d catchup_s=%.3f catchup_events_per_s=%.0f "
                  "live_n_base=%d live_p50_ms_base=%.2f live_p99_ms_base=%.2f live_n_catchup=%d "
                  "live_p50_ms_catchup=%.2f live_p99_ms_catchup=%.2f p99_ratio=%.2f "
                  "from_commit_p99_ms_base=%.1f from_commit_p99_ms_catchup=%.1f "
                  "from_commit_p99_ratio=%.2f daemon_cpu_s=%.2f emulator_cpu_s=%.2f" % (
                      r + 1, got, secs, got / secs, len(bw), pct(bw, 50) * 1e3, b99 * 1e3,
                      len(cw), pct(cw, 50) * 1e3, c99 * 1e3, c99 / b99, pct(bs, 99) * 1e3,
                      pct(cs, 99) * 1e3, pct(cs, 99) / pct(bs, 99), d1 - d0, e1 - e0),
                  flush=True)
            time.sleep(1.0)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        if emu.poll() is not None:
            print("emulator exited with %s (see %s)" % (emu.returncode, work), flush=True)
        emu.send_signal(signal.SIGTERM)
        emu.wait(30)


if __name__ == "__main__":
    main()
