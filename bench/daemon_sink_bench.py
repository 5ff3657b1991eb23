#!/usr/bin/python3
"""Daemon-level throughput of a broker sink: events per daemon CPU-second.

  bench/daemon_sink_bench.py BUILD_DIR redis|jetstream [--events N] [--size BYTES]

Mode `stdout` is the reference: the same daemon path into a stdout sink writing to a file
(no broker), i.e. what reading and building the events costs without a broker sink.

Starts mongo-emulator, the broker (redis-server with appendonly off, or nats-server -js) on
free loopback ports, runs `mongocast run` once to store a position, stops it, inserts N
documents of about BYTES bytes (insert_many batches of 1,000), then starts the daemon again
from its stored position and measures, until the broker holds the N events: the daemon's CPU (user + system, all threads, /proc/PID/stat),
the broker's CPU over the same span, and the wall time, all counted from the second daemon's
start (its start-up is charged too). The daemon's CPU therefore covers the whole path: reading the change stream from the emulator, building events, the runner and the
sink. Prints one line:
  mode=... events=N wall_s=... daemon_cpu_s=... ev_per_daemon_cpu_s=... ev_per_s=...
  broker_cpu_s=... ev_per_broker_cpu_s=...
Every child is stopped by pid.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pymongo
import redis

from bench_util import cpu_s, free_port  # noqa: E402


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.005)
    raise SystemExit("bench: timed out waiting for %s" % what)


def wait_port(port):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait(up, 20, "port %d" % port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("mode", choices=["redis", "jetstream", "stdout"])
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--max-lag", type=int, default=1000000,
                    help="the sink's max_lag_events: with the default 10,000, a backlog of "
                         "N events detaches the sink and its catch-up reads the stream again")
    a = ap.parse_args()
    build = os.path.abspath(a.build)
    work = tempfile.mkdtemp(prefix="mc-sinkbench-")
    procs = []

    def spawn(argv, name, **kw):
        log = open(os.path.join(work, name + ".log"), "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             **kw)
        procs.append(p)
        return p

    try:
        emu = spawn([build + "/tools/mongo-emulator/mongo-emulator", "--port", "0"], "emulator")
        logf = os.path.join(work, "emulator.log")
        wait(lambda: re.search(r"listening on \S+:(\d+)", open(logf).read()), 20, "emulator")
        eport = int(re.search(r"listening on \S+:(\d+)", open(logf).read()).group(1))
        uri = "mongodb://127.0.0.1:%d/?replicaSet=rs0" % eport
        bport = free_port()
        if a.mode == "stdout":  # the reference: the same daemon path into a file
            broker = None
            sink = "{name: out, type: stdout, max_lag_events: %d}" % a.max_lag

            def count():
                try:
                    with open(os.path.join(work, "daemon-second.log"), "rb") as f:
                        return f.read().count(b'"type":"change"')
                except OSError:
                    return 0
        elif a.mode == "redis":
            broker = spawn(["redis-server", "--port", str(bport), "--bind", "127.0.0.1", "--save",
                            "", "--appendonly", "no", "--dir", work], "redis")
            sink = ('{name: out, type: redis, url: "redis://127.0.0.1:%d", mode: stream, '
                    'key: "bench:{stream}", max_lag_events: %d}' % (bport, a.max_lag))
            r = redis.Redis(port=bport)
            count = lambda: r.xlen("bench:s")  # noqa: E731
        else:
            broker = spawn(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(bport), "-sd",
                            os.path.join(work, "js")], "nats")
            sink = ('{name: out, type: nats, url: "nats://127.0.0.1:%d", mode: jetstream, '
                    'create_stream: BENCH, max_lag_events: %d}' % (bport, a.max_lag))
            exe = build + "/tests/integration/clients/broker_client"

            def count():
                p = subprocess.run([exe, "nats-count", "nats://127.0.0.1:%d" % bport, "BENCH"],
                                   capture_output=True)
                return int(p.stdout or 0) if p.returncode == 0 else 0
        if broker:
            wait_port(bport)
        cfg = os.path.join(work, "c.yaml")
        with open(cfg, "w") as f:
            f.write("mongodb: {uri: \"%s\"}\n"
                    "checkpoint: {store: file, path: \"%s/cp\", interval_ms: 1000}\n"
                    "server: {listen: \"127.0.0.1:0\"}\n"
                    "streams:\n  s: {db: bench, collection: c, batch_size: 1000}\n"
                    "sinks:\n  - %s\n" % (uri, work, sink))
        daemon = build + "/src/daemon/mongocast"

        def run_daemon(tag):
            return spawn([daemon, "run", "-c", cfg], "daemon-" + tag)

        def opened(tag):
            path = os.path.join(work, "daemon-%s.log" % tag)
            return lambda: "change stream open" in open(path).read()

        client = pymongo.MongoClient(uri)
        client.bench.create_collection("c")
        d = run_daemon("first")
        wait(opened("first"), 30, "the first daemon")
        client.bench.c.insert_one({"warm": 1})
        if broker:
            wait(lambda: count() >= 1, 30, "the first event in the broker")
        d.send_signal(signal.SIGTERM)
        d.wait(30)
        pad = "x" * max(0, a.size - 60)
        for start in range(0, a.events, 1000):
            client.bench.c.insert_many([{"seq": i, "owner": "user%d" % (i % 100), "pad": pad}
                                        for i in range(start, min(a.events, start + 1000))])
        bcpu = (lambda: cpu_s(broker.pid)) if broker else (lambda: 0.0)
        b0, t0 = bcpu(), time.monotonic()
        d = run_daemon("second")
        c0 = 0.0  # from the daemon's start: its start-up is charged too (conservative)
        perf = None
        if os.environ.get("SINK_BENCH_PERF"):  # a file: `perf record -g` of the second daemon
            perf = subprocess.Popen(["perf", "record", "-g", "-p", str(d.pid), "-o",
                                     os.environ["SINK_BENCH_PERF"]], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        target = a.events + (1 if broker else 0)
        deadline = time.monotonic() + 600
        while count() < target:
            if time.monotonic() > deadline:
                raise SystemExit("bench: only %d of %d events arrived" % (count(), target))
            time.sleep(0.01 if a.mode == "redis" else 0.05)
        c1, b1, t1 = cpu_s(d.pid), bcpu(), time.monotonic()
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        n, dc, bc, wall = a.events, c1 - c0, b1 - b0, t1 - t0
        print("mode=%s events=%d wall_s=%.3f daemon_cpu_s=%.3f ev_per_daemon_cpu_s=%.0f "
              "ev_per_s=%.0f broker_cpu_s=%.3f ev_per_broker_cpu_s=%.0f"
              % (a.mode, n, wall, dc, n / dc if dc else 0, n / wall, bc, n / bc if bc else 0))
        sys.stdout.flush()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
