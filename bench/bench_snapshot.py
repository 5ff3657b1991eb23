#!/usr/bin/env python3
"""Snapshot throughput: `?snapshot=true` of SNAP_DOCS documents of SNAP_DOC_BYTES bytes to one
WebSocket subscriber (docs/PERFORMANCE.md, "Snapshot then stream").

Usage: bench/bench_snapshot.py BUILD_DIR   (a release build: build/)
Environment: SNAP_DOCS (1000000), SNAP_DOC_BYTES (1024), SNAP_RUNS (3),
             SNAP_WORKERS (server.snapshot_workers, 2).

Starts a mongo-emulator (--oplog-max-events 10000, so that loading does not also keep a
million insert events) on a free loopback port, loads the documents with pymongo, then starts
`mongocast run` with one public stream on the collection, and for each run opens a WebSocket
with snapshot=true, reads frames as fast as it can (counting bytes; only the last batch, which
carries `count`, is parsed), and stops at the last batch. Each run prints one line:

  run=N docs=... seconds=... docs_per_s=... mb_per_s=... daemon_cpu_s=... emulator_cpu_s=...
  client_cpu_s=... daemon_rss_mb=... daemon_peak_rss_mb=...

(CPU times are the processes' user+system time during the run, from /proc; daemon_peak_rss_mb
is the daemon's VmHWM so far; daemon_rss_mb its VmRSS at the end of the run.) Both processes
are stopped by pid at the end.
"""

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pymongo

from bench_util import (cpu_s, emulator_uri, free_port, start_emulator,  # noqa: E402
                        wait_stream_open, ws_handshake)


def status_mb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return -1.0


def recv_exact(sock, n, buf):
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return view


def snapshot_once(port):
    """Reads one snapshot; returns (documents, bytes, seconds)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    ws_handshake(sock, "/v1/streams/snap?snapshot=true")
    buf = bytearray(64 << 20)
    total = 0
    while True:
        h = bytes(recv_exact(sock, 2, buf))
        n = h[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", bytes(recv_exact(sock, 2, buf)))[0]
        elif n == 127:
            n = struct.unpack(">Q", bytes(recv_exact(sock, 8, buf)))[0]
        if n > len(buf):
            buf = bytearray(n)
        payload = recv_exact(sock, n, buf)
        total += n + 2
        if h[0] & 0x0F == 0x8:
            raise RuntimeError("closed: %r" % bytes(payload[:120]))
        tail = bytes(payload[-200:])
        if b'"last":true' in tail:
            msg = json.loads(bytes(payload))
            secs = time.monotonic() - t0
            sock.close()
            return msg["count"], total, secs
        if b'"type":"error"' in bytes(payload[:40]):
            raise RuntimeError("error: %r" % bytes(payload[:300]))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build = os.path.abspath(sys.argv[1])
    n_docs = int(os.environ.get("SNAP_DOCS", "1000000"))
    doc_bytes = int(os.environ.get("SNAP_DOC_BYTES", "1024"))
    runs = int(os.environ.get("SNAP_RUNS", "3"))
    workers = int(os.environ.get("SNAP_WORKERS", "2"))
    emu_bin = os.path.join(build, "tools/mongo-emulator/mongo-emulator")
    daemon_bin = os.path.join(build, "src/daemon/mongocast")
    work = tempfile.mkdtemp(prefix="bench-snapshot-")
    emu = start_emulator(emu_bin, work, 10000)
    daemon = None
    try:
        uri = emulator_uri(emu)
        client = pymongo.MongoClient(uri)
        coll = client.bench.snap
        # A document of about doc_bytes BSON bytes: _id, a few fields, padding.
        pad = "x" * max(0, doc_bytes - 80)
        t0 = time.monotonic()
        batch = 10000
        for start in range(0, n_docs, batch):
            coll.insert_many([{"_id": i, "owner": "u%d" % (i % 100), "n": i, "flag": True,
                               "pad": pad} for i in range(start, min(n_docs, start + batch))],
                             ordered=False)
        load_s = time.monotonic() - t0
        print("loaded docs=%d doc_bytes=%d seconds=%.1f" % (n_docs, doc_bytes, load_s),
              flush=True)
        port = free_port()
        cfg = os.path.join(work, "c.yaml")
        with open(cfg, "w") as f:
            f.write("mongodb:\n  uri: %s\n" % json.dumps(uri))
            f.write("checkpoint: {store: file, path: %s}\n" % json.dumps(os.path.join(work, "cp")))
            f.write("server: %s\n" % json.dumps({"listen": "127.0.0.1:%d" % port,
                                                 "max_snapshot_documents": n_docs + 1,
                                                 "snapshot_workers": workers}))
            f.write("streams:\n  snap: %s\n" % json.dumps(
                {"db": "bench", "collection": "snap", "public": True, "history": 1000}))
            f.write("sinks: []\n")
        err = open(os.path.join(work, "daemon.err"), "wb")
        daemon = subprocess.Popen([daemon_bin, "run", "-c", cfg], stdout=subprocess.DEVNULL,
                                  stderr=err, cwd=work)
        wait_stream_open(daemon, work)
        print("daemon_rss_idle_mb=%.1f" % status_mb(daemon.pid, "VmRSS"), flush=True)
        for r in range(runs):
            d0, e0 = cpu_s(daemon.pid), cpu_s(emu.pid)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            count, nbytes, secs = snapshot_once(port)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            d1, e1 = cpu_s(daemon.pid), cpu_s(emu.pid)
            client = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
            if count != n_docs:
                raise RuntimeError("snapshot had %d documents, expected %d" % (count, n_docs))
            print("run=%d docs=%d seconds=%.3f docs_per_s=%.0f mb_per_s=%.1f daemon_cpu_s=%.2f "
                  "emulator_cpu_s=%.2f client_cpu_s=%.2f daemon_rss_mb=%.1f daemon_peak_rss_mb=%.1f" % (
                      r + 1, count, secs, count / secs, nbytes / secs / 1e6, d1 - d0, e1 - e0,
                      client,
                      status_mb(daemon.pid, "VmRSS"), status_mb(daemon.pid, "VmHWM")),
                  flush=True)
            time.sleep(1.0)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        emu.send_signal(signal.SIGTERM)
        emu.wait(30)


if __name__ == "__main__":
    main()
