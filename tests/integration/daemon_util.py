"""Helpers and fixtures for the tests of the `mongocast` binary (test_daemon_*.py).

The daemon runs as a real child process: `mongocast run -c FILE` with its stdout (the stdout
sink's JSON lines) and stderr (logs) in files under the test's tmp_path, so a test can SIGKILL
it at any moment and still read everything it wrote. Every daemon started through the
`daemons` fixture is stopped at teardown, and its stderr is checked for sanitizer reports.

Configs are written as YAML whose values are JSON (JSON flow syntax is valid YAML), so pipelines
and options keep their types exactly.

Import the fixtures into a test module with `from daemon_util import *` (pytest's rootdir puts
tests/integration on sys.path through conftest.py).
"""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SANITIZER_RE, find_binary, wait_for


DAEMON_BIN = "src/daemon/mongocast"
START_TIMEOUT = 30.0  # ASan build, loaded 2-core machine
STOP_TIMEOUT = 20.0

__all__ = ["Daemon", "daemons", "mongocast_bin", "write_config", "run_cli", "read_jsonl",
           "checkpoint_token", "changes_of", "full_change", "wait_for", "fail_point", "Tail",
           "tails"]


def mongocast_bin():
    return find_binary(DAEMON_BIN)


def write_config(path, uri, streams, sinks=None, checkpoint_dir=None, interval_ms=100,
                 extra=""):
    """Writes a config file: `streams` maps names to stream dicts, `sinks` is a list of dicts
    (default: one stdout sink taking every stream)."""
    if sinks is None:
        sinks = [{"name": "out", "type": "stdout"}]
    lines = ["mongodb:", "  uri: %s" % json.dumps(uri)]
    if checkpoint_dir is not None:
        lines += ["checkpoint:", "  store: file", "  path: %s" % json.dumps(str(checkpoint_dir)),
                  "  interval_ms: %d" % interval_ms]
    lines.append("streams:")
    for name, body in streams.items():
        lines.append("  %s: %s" % (name, json.dumps(body)))
    lines.append("sinks:")
    for s in sinks:
        lines.append("  - %s" % json.dumps(s))
    if extra:
        lines.append(extra)
    if not re.search(r"^server:", extra or "", re.M):
        # `mongocast run` always serves HTTP (server.listen defaults to 127.0.0.1:8080): give
        # every test daemon a free port so that daemons never collide.
        lines.append("server: {listen: \"127.0.0.1:0\"}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def read_jsonl(path):
    """(messages, torn): the parsed JSON lines of a file, and the lines that did not parse
    (only a process killed mid-write leaves one, as the last line)."""
    msgs, torn = [], []
    try:
        data = Path(path).read_text("utf-8", "replace")
    except FileNotFoundError:
        return msgs, torn
    for line in data.split("\n"):
        if not line.strip():
            continue
        try:
            msgs.append(json.loads(line))
        except ValueError:
            torn.append(line)
    return msgs, torn


def changes_of(msgs, stream=None, op=None):
    out = []
    for m in msgs:
        if m.get("type") != "change":
            continue
        if stream and m.get("stream") != stream:
            continue
        if op and m["change"].get("operationType") != op:
            continue
        out.append(m)
    return out


def full_change(m):
    """The change event of a change message as MongoDB produced it: the message carries the
    resume token once, as "id", and leaves `_id` out of "change" when it is exactly
    {"_data": id} (docs/protocol.md, "Messages"). Asserts that the message follows that rule."""
    c = m["change"]
    assert c.get("_id") != {"_data": m["id"]}, "the token must not be sent twice: %r" % m
    if "_id" in c:
        return c  # a token of another shape stays in the change
    return {"_id": {"_data": m["id"]}, **c}


def checkpoint_token(cp_dir, stream, sink=None):
    """The stored resume token `_data` of a stream (the oldest of its sinks') in the file
    store, or of one sink for that stream (`<stream>@<sink>.json`, where that sink resumes),
    or None."""
    p = Path(cp_dir) / ("%s%s.json" % (stream, "@" + sink if sink else ""))
    try:
        doc = json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return doc.get("token", {}).get("_data")


class Daemon:
    """One `mongocast run -c CONFIG` process with stdout and stderr in files."""

    def __init__(self, config, workdir, name="mongocast", args=(), stdout_path=None, env=None,
                 stdout=None):
        """`env`: variables added to the environment (e.g. MONGOCAST_TEST_SINKS=1 for the
        fault sink types); `stdout`: a file object to use as the daemon's stdout instead of
        the file at stdout_path (e.g. the write end of a pipe)."""
        self.config = Path(config)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = Path(stdout_path) if stdout_path else self.workdir / (name + ".out")
        self.stderr_path = self.workdir / (name + ".err")
        self._out = stdout if stdout is not None else open(str(self.stdout_path), "ab")
        self._err = open(str(self.stderr_path), "ab")
        self._err_start = self.stderr_path.stat().st_size
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        self.proc = subprocess.Popen([str(mongocast_bin()), "run", "-c", str(self.config)]
                                     + list(args), stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=str(self.workdir),
                                     env=full_env)
        self.returncode = None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stderr_text(self):
        """This run's stderr (the file may hold earlier runs' too)."""
        with open(str(self.stderr_path), "rb") as f:
            f.seek(self._err_start)
            return f.read().decode("utf-8", "replace")

    def wait_stderr(self, pattern, timeout=START_TIMEOUT, count=1):
        rx = re.compile(pattern)

        def found():
            n = len(rx.findall(self.stderr_text()))
            if n >= count:
                return True
            if not self.alive():
                pytest.fail("mongocast exited with %s before logging %r; stderr:\n%s" % (
                    self.proc.returncode, pattern, self.stderr_text()[-4000:]))
            return False
        wait_for(found, timeout=timeout, interval=0.05,
                 message="mongocast stderr to match %r (stderr so far:\n%s)" % (
                     pattern, self.stderr_text()[-3000:]))

    def wait_open(self, n_streams=1, timeout=START_TIMEOUT):
        self.wait_stderr(r"change stream open stream=", timeout, count=n_streams)

    def messages(self):
        return read_jsonl(self.stdout_path)[0]

    def send(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Sends `sig` and waits; returns the exit status (negative: killed by a signal)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
                self.returncode = self.proc.returncode
                self._close()
                pytest.fail("mongocast did not exit within %.0fs of signal %d; stderr:\n%s"
                            % (timeout, sig, self.stderr_text()[-4000:]))
        self.returncode = self.proc.returncode
        self._close()
        return self.returncode

    def kill(self):
        return self.stop(signal.SIGKILL)

    def _close(self):
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass

    def sanitizer_report(self):
        text = self.stderr_text()
        m = SANITIZER_RE.search(text)
        return text[max(0, m.start() - 200):m.start() + 4000] if m else None


@pytest.fixture
def daemons(tmp_path):
    """Factory: daemons(config, name=..., args=..., stdout_path=...) starts a Daemon; all are
    stopped (SIGTERM) at teardown and must be free of sanitizer reports."""
    started = []

    def start(config, **kwargs):
        d = Daemon(config, tmp_path, **kwargs)
        started.append(d)
        return d

    yield start
    problems = []
    for d in started:
        if d.alive():
            rc = d.stop()
            if rc != 0:
                problems.append("mongocast exited %s on SIGTERM at teardown" % rc)
        report = d.sanitizer_report()
        if report:
            problems.append("mongocast sanitizer report:\n" + report)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Tail:
    """One `mongocast tail ...` process; stdout lines are collected by a thread."""

    def __init__(self, args, workdir):
        self.stderr_path = Path(workdir) / ("tail-%d.err" % int(time.time() * 1e6))
        self._err = open(str(self.stderr_path), "wb")
        self.proc = subprocess.Popen([str(mongocast_bin()), "tail"] + [str(a) for a in args],
                                     stdout=subprocess.PIPE, stderr=self._err,
                                     stdin=subprocess.DEVNULL)
        self.lines = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for raw in iter(self.proc.stdout.readline, b""):
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def stderr_text(self):
        # The child writes straight to the file; our handle is only kept open for it.
        return self.stderr_path.read_text("utf-8", "replace")

    def messages(self):
        with self._lock:
            return [json.loads(l) for l in self.lines if l.strip()]

    def wait_open(self, timeout=START_TIMEOUT):
        def opened():
            if self.proc.poll() is not None:
                pytest.fail("mongocast tail exited with %s; stderr:\n%s" % (
                    self.proc.returncode, self.stderr_text()))
            return "change stream open" in self.stderr_text()
        wait_for(opened, timeout=timeout, message="mongocast tail to open its change stream")

    def wait_messages(self, n, timeout=20.0):
        return wait_for(lambda: len(self.messages()) >= n and self.messages(), timeout=timeout,
                        message="%d lines from mongocast tail (got %d; stderr:\n%s)" % (
                            n, len(self.lines), self.stderr_text()[-2000:]))

    def stop(self, sig=signal.SIGINT, timeout=STOP_TIMEOUT):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("mongocast tail did not exit within %.0fs" % timeout)
        self._reader.join(5)
        self._err.close()
        return self.proc.returncode

    def sanitizer_report(self):
        text = self.stderr_path.read_text("utf-8", "replace")
        m = SANITIZER_RE.search(text)
        return text[max(0, m.start() - 200):m.start() + 4000] if m else None


@pytest.fixture
def tails(tmp_path):
    """Factory: tails(args...) starts `mongocast tail ARGS`; stopped and checked at teardown."""
    started = []

    def start(*args):
        t = Tail(args, tmp_path)
        started.append(t)
        return t

    yield start
    problems = []
    for t in started:
        if t.proc.poll() is None:
            t.stop()
        report = t.sanitizer_report()
        if report:
            problems.append("mongocast tail sanitizer report:\n" + report)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def run_cli(*args, timeout=60, cwd=None, env=None):
    """Runs `mongocast ARGS` to completion: CompletedProcess with text stdout/stderr."""
    p = subprocess.run([str(mongocast_bin())] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    m = SANITIZER_RE.search(p.stderr)
    if m:
        pytest.fail("mongocast %s: sanitizer report:\n%s" % (args[0], p.stderr[m.start() - 200:]))
    return p


class fail_point:
    """Context manager: configureFailPoint on enter, mode off on exit."""

    def __init__(self, client, name, mode, data):
        self.admin = client.admin
        self.name = name
        self.cmd = {"configureFailPoint": name, "mode": mode, "data": data}

    def __enter__(self):
        from bson.son import SON
        self.admin.command(SON([("configureFailPoint", self.name), ("mode", self.cmd["mode"]),
                                ("data", self.cmd["data"])]))
        return self

    def __exit__(self, *exc):
        self.admin.command({"configureFailPoint": self.name, "mode": "off"})
        return False
