#!/usr/bin/env python3
"""Fan-out through a JetStream edge vs a node fed by MongoDB (docs/PERFORMANCE.md, "Edge
fan-out").

Per run and mode, a fresh mongo-emulator (and for `edge` a fresh nats-server -js with a tmp
store) and daemons with generated configs (one public stream on bench.fanout):
  direct  one `mongocast run` on the emulator; bench_fanout's clients subscribe to it.
  edge    a leader `mongocast run` on the emulator with a nats sink (jetstream, format: bson)
          and no subscribers, and an edge `mongocast run` (source: nats, mongodb.uri pointing
          at nothing) that bench_fanout's clients subscribe to.
bench_fanout throughput writes EVENTS documents into the emulator and measures deliveries per
CPU-second of the serving daemon (the direct node, or the edge), from the first insert to the
last delivery. Modes alternate within each run so that both see the same machine. Prints each
run's line with mode=, then the medians (min-max) and the edge/direct ratio.

Usage: MC_BUILD_DIR=build python3 bench/edge_fanout_bench.py [--runs 5] [--clients 200]
       [--procs 2] [--events 10000] [--rate 2000] [--size 200]
Every child is stopped by pid.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from broker_util import free_port as nats_port, wait_port  # noqa: E402
from conftest import find_binary, start_emulator  # noqa: E402

DEAD_MONGO = "mongodb://127.0.0.1:9/?replicaSet=rs0"


def start_daemon(tmp, name, lines, wait_for):
    cfg = tmp / ("%s.yaml" % name)
    cfg.write_text("\n".join(lines) + "\n")
    log = tmp / ("%s.log" % name)
    env = dict(os.environ, MONGOC_DISABLE_SHM="1")
    with open(log, "w") as f:
        p = subprocess.Popen([str(find_binary("src/daemon/mongocast")), "run", "-c", str(cfg)],
                             stderr=f, stdout=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while not re.search(wait_for, log.read_text()):
        if time.time() > deadline or p.poll() is not None:
            sys.exit("%s did not start:\n%s" % (name, log.read_text()[-3000:]))
        time.sleep(0.05)
    return p


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def one(mode, a):
    emu = start_emulator()
    tmp = Path(tempfile.mkdtemp(prefix="mc-edge-bench-"))
    procs = []
    nats = None
    try:
        http = nats_port()
        stream = {"db": "bench", "collection": "fanout", "public": True}
        base = ["checkpoint: {store: file, path: %s}" % json.dumps(str(tmp / ("cp-" + mode))),
                "server: {listen: \"127.0.0.1:%d\", max_connections: 20000}" % http]
        if mode == "direct":
            serving = start_daemon(tmp, "direct", ["mongodb: {uri: %s}" % json.dumps(emu.uri)] +
                                   base + ["streams:", "  fan: %s" % json.dumps(stream),
                                           "sinks: []"], r"change stream open stream=fan")
            procs.append(serving)
        else:
            nport = nats_port()
            nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nport),
                                     "-sd", str(tmp / "nats")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            if not wait_port(nport):
                sys.exit("nats-server did not start")
            url = "nats://127.0.0.1:%d" % nport
            sink = {"name": "js", "type": "nats", "url": url, "mode": "jetstream",
                    "format": "bson", "create_stream": "FAN"}
            leader = start_daemon(
                tmp, "leader",
                ["mongodb: {uri: %s}" % json.dumps(emu.uri),
                 "checkpoint: {store: file, path: %s}" % json.dumps(str(tmp / "cp-leader")),
                 "server: {listen: \"127.0.0.1:%d\"}" % nats_port(),
                 "streams:", "  fan: %s" % json.dumps(stream), "sinks:", "  - " + json.dumps(sink)],
                r"change stream open stream=fan")
            procs.append(leader)
            edge = {"public": True, "source": {"nats": {"url": url, "stream": "FAN"}}}
            deadline = time.time() + 30
            serving = None
            while serving is None:
                # The edge waits for the JetStream stream the leader's sink creates.
                serving = start_daemon(tmp, "edge", ["mongodb: {uri: %s}" % json.dumps(DEAD_MONGO)]
                                       + base + ["streams:", "  fan: %s" % json.dumps(edge),
                                                 "sinks: []"],
                                       r"JetStream consumer open stream=fan")
                if time.time() > deadline:
                    sys.exit("edge did not open")
            procs.append(serving)
        out = subprocess.run(
            [str(find_binary("bench/bench_fanout")), "throughput",
             "--url", "ws://127.0.0.1:%d/v1/streams/fan" % http, "--uri", emu.uri,
             "--daemon-pid", str(serving.pid), "--emulator-pid", str(emu.pid),
             "--clients", str(a.clients), "--procs", str(a.procs), "--events", str(a.events),
             "--rate", str(a.rate), "--batch", "10", "--size", str(a.size)],
            capture_output=True, text=True, timeout=600)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        if "phase=" not in line:
            sys.exit("bench_fanout failed (%s): %s %s" % (out.returncode, out.stdout[-2000:],
                                                         out.stderr[-2000:]))
        # An incomplete run (clients closed as slow consumers on a loaded machine) is printed
        # and left out of the medians.
        return "mode=%s %s" % (mode, line)
    finally:
        for p in reversed(procs):
            stop(p)
        if nats and nats.poll() is None:
            nats.send_signal(signal.SIGTERM)
            nats.wait(20)
        emu.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--size", type=int, default=200)
    a = ap.parse_args()
    results = {"direct": [], "edge": []}
    for _ in range(a.runs):
        for mode in ("direct", "edge"):
            line = one(mode, a)
            print(line, flush=True)
            m = re.search(r"deliveries_per_daemon_cpu_s=([0-9.]+)", line)
            if m and " complete=1 " in line:
                results[mode].append(float(m.group(1)))
    med = {}
    for mode, v in results.items():
        if v:
            med[mode] = statistics.median(v)
            print("%s: deliveries per serving-daemon CPU-second, median %.0f (%.0f - %.0f), %d "
                  "complete runs of %d" % (mode, med[mode], min(v), max(v), len(v), a.runs))
    if med.get("direct"):
        print("edge/direct ratio of medians: %.2f" % (med.get("edge", 0) / med["direct"]))


if __name__ == "__main__":
    main()
