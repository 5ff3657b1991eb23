"""redis-server and nats-server for the integration tests: started on a free loopback port with
their files in a directory of the test, restarted on the same port from the same files, stopped
by pid. A test whose server binary is missing is skipped.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class Broker:
    """One server process; `argv()` gives its command line for the current port."""

    binary = None

    def __init__(self, workdir, extra=()):
        if not shutil.which(self.binary):
            pytest.skip("%s is not installed (scripts/install-deps.sh)" % self.binary)
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self):
        log = open(str(self.dir / ("%s.log" % self.binary)), "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        if not wait_port(self.port):
            self.stop(signal.SIGKILL)
            raise RuntimeError("%s did not start on port %d" % (self.binary, self.port))

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def restart(self, sig=signal.SIGKILL):
        """Kills the server (SIGKILL by default: no clean shutdown) and starts it again on the
        same port from the same files."""
        self.stop(sig)
        self.start()


class RedisServer(Broker):
    binary = "redis-server"

    def argv(self):
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.dir), "--save", "", "--daemonize", "no",
                "--protected-mode", "no"] + self.extra

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port


class NatsServer(Broker):
    binary = "nats-server"

    def argv(self):
        return [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                str(self.dir / "store")] + self.extra

    @property
    def url(self):
        return "nats://127.0.0.1:%d" % self.port


@pytest.fixture
def redis_server(tmp_path):
    """redis-server with appendonly on (fsync always), so a SIGKILL loses nothing acked."""
    srv = RedisServer(tmp_path / "redis", ["--appendonly", "yes", "--appendfsync", "always"])
    yield srv
    srv.stop(signal.SIGKILL)


@pytest.fixture
def nats_server(tmp_path):
    """nats-server -js with its own store directory."""
    srv = NatsServer(tmp_path / "nats")
    yield srv
    srv.stop(signal.SIGKILL)
