#!/usr/bin/env python3
"""Daemon-level throughput of the webhook and mongodb sink types (docs/PERFORMANCE.md,
"Sink types in the daemon").

Starts mongo-emulator, a receiver (tests/integration/webhook_receiver.py as its own process,
no faults) for the webhook modes, and `mongocast run` with one stream and one sink; then
writes N documents (about SIZE bytes each) with insert_many and waits until the sink has
delivered them all (read from the daemon's /metrics). Prints one key=value line:
  mode= events= wall_s= daemon_cpu_s= ev_per_daemon_cpu_s= receiver_cpu_s= emulator_cpu_s=
CPU is user + system of each process (all threads) from /proc/PID/stat, from just before the
first insert to the last delivery; the daemon's includes reading the change stream and
building the events, the emulator's includes the inserts of the source documents (and, for
mongodb, the sink's own inserts).

Modes: webhook (one event per request, concurrency 8, order_key recipient with 100
recipients, keep-alive), webhook_batch (batch_max_events 100, concurrency 8), mongodb (into
the same emulator, w: majority).

Usage: MC_BUILD_DIR=build python3 bench/sink_daemon_bench.py MODE [--events N] [--size B]
Every child is stopped by pid.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from conftest import find_binary, start_emulator  # noqa: E402
from live_util import free_port  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def metric(port, name):
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    return float(m.group(1)) if m else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["webhook", "webhook_batch", "mongodb"])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    import pymongo

    emu = start_emulator()
    recv = daemon = None
    tmp = Path(tempfile.mkdtemp(prefix="mc-sink-bench-"))
    try:
        if a.mode.startswith("webhook"):
            recv = subprocess.Popen([sys.executable, str(ROOT / "tests/integration/webhook_receiver.py"),
                                     "--secret", SECRET], stdout=subprocess.PIPE, text=True)
            port = int(re.search(r":(\d+)$", recv.stdout.readline().strip()).group(1))
            sink = {"name": "s", "type": "webhook", "url": "http://127.0.0.1:%d/hook" % port,
                    "secret": SECRET, "concurrency": 8, "timeout_ms": 30000,
                    "order_key": "recipient"}
            if a.mode == "webhook_batch":
                sink["batch_max_events"] = 100
            done_metric = 'mongocast_sink_attempts_total{sink="s"}'
        else:
            sink = {"name": "s", "type": "mongodb", "db": "benchlog", "collection": "activity"}
            done_metric = 'mongocast_sink_outcomes_total{sink="s",class="written"}'
        import json
        http = free_port()
        cfg = tmp / "c.yaml"
        cfg.write_text("\n".join([
            "mongodb: {uri: %s}" % json.dumps(emu.uri),
            "checkpoint: {store: file, path: %s}" % json.dumps(str(tmp / "cp")),
            "server: {listen: \"127.0.0.1:%d\"}" % http,
            "streams:",
            "  s: {db: bench, collection: c, recipient: fullDocument.owner, batch_size: 1000}",
            "sinks:",
            "  - %s" % json.dumps(sink), ""]))
        client = pymongo.MongoClient(emu.uri)
        client.bench.create_collection("c")
        log = open(tmp / "daemon.log", "w")
        daemon = subprocess.Popen([str(find_binary("src/daemon/mongocast")), "run", "-c", str(cfg)],
                                  stderr=log)
        deadline = time.time() + 30
        while "change stream open" not in (tmp / "daemon.log").read_text():
            if time.time() > deadline or daemon.poll() is not None:
                sys.exit("daemon did not open its stream:\n" + (tmp / "daemon.log").read_text())
            time.sleep(0.05)
        print("daemon_pid=%d" % daemon.pid, file=sys.stderr, flush=True)
        pad = "x" * a.size
        docs = [{"n": i, "owner": "u%d" % (i % 100), "pad": pad} for i in range(a.events)]
        c0 = (cpu(daemon.pid), cpu(recv.pid) if recv else 0.0, cpu(emu.pid))
        t0 = time.time()
        for k in range(0, a.events, 1000):
            client.bench.c.insert_many(docs[k:k + 1000], ordered=True)
        while metric(http, done_metric) < a.events:
            time.sleep(0.05)
        wall = time.time() - t0
        c1 = (cpu(daemon.pid), cpu(recv.pid) if recv else 0.0, cpu(emu.pid))
        d = c1[0] - c0[0]
        print("mode=%s events=%d wall_s=%.2f daemon_cpu_s=%.2f ev_per_daemon_cpu_s=%.0f "
              "receiver_cpu_s=%.2f emulator_cpu_s=%.2f"
              % (a.mode, a.events, wall, d, a.events / d if d else 0, c1[1] - c0[1],
                 c1[2] - c0[2]), flush=True)
    finally:
        for p in (daemon, recv):
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        emu.stop()


if __name__ == "__main__":
    main()
