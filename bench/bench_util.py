"""bench_util.py: helpers shared by the Python benchmarks in bench/ (run by the benchmark's own
process, one thread): a free loopback port (the integration tests' broker_util.free_port), a
process's CPU seconds, a WebSocket handshake on a raw socket, and starting the emulator and waiting for the daemon's stream, as
bench_catchup.py and bench_snapshot.py do. Import it from a script in bench/ (the script's
folder is on sys.path)."""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))

from broker_util import free_port  # noqa: E402,F401  (re-exported for the benches)


def cpu_s(pid):
    """User plus system CPU seconds of process `pid`, all threads (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_emulator(emu_bin, work, oplog_max_events):
    """Starts the mongo-emulator on a port of its choice (stderr in WORK/emu.err) and returns
    the process; emulator_uri() then reads its address. The caller stops it by pid."""
    return subprocess.Popen([emu_bin, "--port", "0", "--oplog-max-events",
                             str(oplog_max_events)],
                            stdout=subprocess.PIPE,
                            stderr=open(os.path.join(work, "emu.err"), "wb"))


def emulator_uri(emu):
    """The replica-set URI the emulator `emu` (start_emulator) announces on its first line."""
    line = emu.stdout.readline().decode()
    m = re.search(r"listening on (\S+):(\d+)", line)
    if not m:
        raise RuntimeError("emulator did not start: %r" % line)
    return "mongodb://%s:%s/?replicaSet=rs0" % (m.group(1), m.group(2))


def wait_stream_open(daemon, work, timeout=30):
    """Waits until the daemon `daemon` (stderr in WORK/daemon.err) logs that its change stream
    is open; raises when it exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        with open(os.path.join(work, "daemon.err"), "rb") as f:
            if b"change stream open" in f.read():
                return
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError("daemon did not open its stream (see %s)" % work)
        time.sleep(0.1)


def ws_handshake(sock, path):
    """Sends a WebSocket upgrade for `path` on the connected `sock` and reads the response
    head a byte at a time (nothing after it is consumed); raises unless it is 101."""
    sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n" % path).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = sock.recv(1)
        if not b:
            raise EOFError("no handshake")
        head += b
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError("refused: %r" % head[:200])
