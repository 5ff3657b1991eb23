"""Shared fixtures for every Python integration test of mongocast.

Binaries are found under MC_BUILD_DIR (default <repo>/build). Tests talk to MongoDB through
`mongo_uri`: MONGODB_URI when it is set (a real replica set), otherwise a mongo-emulator that
this file starts on a free port. Tests that need emulator-only commands (emulatorTruncateOplog,
a fresh process, ...) use the `emulator_only` marker or fixture, which skips with a message when
MONGODB_URI is set, so the whole suite runs unchanged against a real server.

Every test gets its own database name (`db_name`), dropped at teardown, so tests never see each
other's data and can run against a shared real server.
"""

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LISTEN_RE = re.compile(r"mongo-emulator listening on (\S+):(\d+)")
SANITIZER_RE = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")
START_TIMEOUT = 20.0  # ASan builds start slowly on a loaded 2-core machine
STOP_TIMEOUT = 10.0

# libmongoc creates /dev/shm/mongoc-PID for its counters from a constructor, before main()
# can turn that off, and a process killed by a test leaves its file behind: a later process
# with the same pid then logs "Falling back to malloc for counters" on stderr, which tests that
# compare stderr exactly would read as output. No process under test needs those counters.
os.environ["MONGOC_DISABLE_SHM"] = "1"


def build_dir():
    """The CMake build directory holding the binaries under test."""
    return Path(os.environ.get("MC_BUILD_DIR", str(REPO / "build"))).resolve()


def find_binary(relpath):
    """Path of a built binary (relative to the build dir), or skip the test if it is missing."""
    path = build_dir() / relpath
    if not (path.is_file() and os.access(str(path), os.X_OK)):
        pytest.skip("binary %s not built (MC_BUILD_DIR=%s)" % (relpath, build_dir()))
    return path


def real_server_uri():
    """MONGODB_URI when the suite runs against a real deployment, else None."""
    uri = os.environ.get("MONGODB_URI", "").strip()
    return uri or None


def skip_if_real_server(what="this test"):
    if real_server_uri():
        pytest.skip("emulator-only: %s needs mongo-emulator, but MONGODB_URI is set" % what)


class ManagedProcess:
    """A child process whose stdout is drained by a thread (so it can never block on a full
    pipe) and whose stderr goes to a log file that teardown inspects for sanitizer reports."""

    def __init__(self, argv, log_dir, name, env=None):
        self.argv = [str(a) for a in argv]
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / ("%s-%s.stderr" % (name, uuid.uuid4().hex[:8]))
        self._stderr = open(str(self.stderr_path), "wb")
        self.lines = []
        self._cond = threading.Condition()
        if env is None:
            env = dict(os.environ)
        # a sanitizer report is only useful for routing a bug with its stack
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=env)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    @property
    def pid(self):
        return self.proc.pid

    def _drain(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern, timeout, start=0):
        """First stdout line (from index `start`) matching regex `pattern`: (index, match).
        Raises TimeoutError or RuntimeError (process exited) with the stderr tail."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return i, m
                    i += 1
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError("%s exited with %s before printing %r; stderr:\n%s" % (
                        self.name, self.proc.returncode, pattern, self.stderr_tail()))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%s printed no line matching %r within %.0fs; stderr:\n%s"
                                       % (self.name, pattern, timeout, self.stderr_tail()))
                self._cond.wait(min(left, 0.2))

    def stderr_text(self):
        try:
            if not self._stderr.closed:
                self._stderr.flush()
            return self.stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, n=40):
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        """Stops the process by pid (SIGTERM, then SIGKILL) and returns its exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        self._reader.join(2)
        self._stderr.close()
        return self.proc.returncode

    def sanitizer_report(self):
        text = self.stderr_text()
        m = SANITIZER_RE.search(text)
        if not m:
            return None
        return text[max(0, m.start() - 200):m.start() + 4000]


class Emulator:
    """One mongo-emulator process listening on 127.0.0.1:<free port>."""

    def __init__(self, log_dir, extra_args=(), replset="rs0"):
        self.binary = find_binary("tools/mongo-emulator/mongo-emulator")
        self.log_dir = log_dir
        self.extra_args = list(extra_args)
        self.standalone = "--standalone" in extra_args
        self.replset = None if self.standalone else replset
        self.crashes = []  # problems of earlier processes replaced by restart()
        self.process = None
        self._spawn(0)

    def _spawn(self, port):
        # MC_EMULATOR_ARGS adds options to every emulator, e.g. "--wire-version 21" (7.0)
        env_args = os.environ.get("MC_EMULATOR_ARGS", "").split()
        self.process = ManagedProcess([self.binary, "--port", str(port)] + self.extra_args +
                                      env_args,
                                      self.log_dir, "mongo-emulator")
        try:
            _, m = self.process.wait_line(LISTEN_RE.pattern, START_TIMEOUT)
        except Exception:
            self.process.stop(signal.SIGKILL)
            raise
        self.host = m.group(1)
        self.port = int(m.group(2))

    def restart(self):
        """Replaces a dead process by a new one on the same port (so URIs handed out stay
        valid) and returns the old process's problem report."""
        problem = self.stop() or "mongo-emulator died"
        self.crashes.append(problem)
        try:
            self._spawn(self.port)
        except Exception as exc:
            self.crashes.append("restart on port %d failed: %s" % (self.port, exc))
        return problem

    @property
    def pid(self):
        return self.process.pid

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    @property
    def uri(self):
        if self.standalone:
            return "mongodb://%s/?directConnection=true" % self.address
        return "mongodb://%s/?replicaSet=%s" % (self.address, self.replset)

    def alive(self):
        return self.process.alive()

    def stop(self):
        """Stops the emulator; returns a problem description (crash, sanitizer report) or None."""
        was_alive = self.process.alive()
        rc = self.process.stop()
        report = self.process.sanitizer_report()
        if report:
            return "mongo-emulator sanitizer report:\n" + report
        if not was_alive:
            return "mongo-emulator (pid %d) died during the tests, exit status %s; stderr:\n%s" % (
                self.process.pid, rc, self.process.stderr_tail())
        if rc not in (0, -signal.SIGTERM):
            return "mongo-emulator exited with status %s on SIGTERM; stderr:\n%s" % (
                rc, self.process.stderr_tail())
        return None


def _log_dir():
    return REPO / "tests" / "artifacts" / "integration"


def start_emulator(*extra_args):
    """Starts an emulator outside of a fixture (callers must call .stop())."""
    return Emulator(_log_dir(), extra_args)


def _emulator_fixture(*extra_args):
    emu = start_emulator(*extra_args)
    try:
        yield emu
    finally:
        problem = emu.stop()
        if problem:
            pytest.fail(problem, pytrace=False)


@pytest.fixture(autouse=True)
def _emulator_health(request):
    """After each test that used the shared emulator: if the test killed it (crash, sanitizer
    abort), fail this test with the report and restart the emulator so that one crash does not
    turn every later test of the module into a connection error."""
    yield
    for emu in list(_SHARED_EMULATORS):
        if emu.process is not None and not emu.alive():
            problem = emu.restart()
            pytest.fail("mongo-emulator died during this test:\n%s" % problem, pytrace=False)


_SHARED_EMULATORS = []


# ---- pytest hooks ----

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulator_only: needs mongo-emulator (skipped when MONGODB_URI is set)")


TEST_TIMEOUT = float(os.environ.get("MC_TEST_TIMEOUT", "60"))


class SuiteTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fails a test that runs longer than MC_TEST_TIMEOUT seconds (default 60) instead of
    hanging the suite: a server that never answers must show up as a failure."""
    def on_alarm(signum, frame):
        raise SuiteTimeout("test exceeded %.0fs (MC_TEST_TIMEOUT)" % TEST_TIMEOUT)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_setup(item):
    if item.get_closest_marker("emulator_only") and real_server_uri():
        pytest.skip("emulator-only test (uses emulator-specific commands or process control); "
                    "skipped because MONGODB_URI is set")


# ---- fixtures ----

@pytest.fixture(scope="module")
def emulator():
    """A mongo-emulator shared by the tests of one module. Skips when MONGODB_URI is set."""
    skip_if_real_server("the shared emulator")
    gen = _emulator_fixture()
    emu = next(gen)
    _SHARED_EMULATORS.append(emu)
    try:
        yield emu
    finally:
        _SHARED_EMULATORS.remove(emu)
        yield from gen


@pytest.fixture
def fresh_emulator():
    """A mongo-emulator of its own for one destructive test (truncating the oplog, ...)."""
    skip_if_real_server("a fresh emulator")
    yield from _emulator_fixture()


@pytest.fixture
def standalone_emulator():
    """A mongo-emulator answering hello as a standalone server (no replica set)."""
    skip_if_real_server("a standalone emulator")
    yield from _emulator_fixture("--standalone")


@pytest.fixture
def emulator_only():
    """Fixture form of the marker: request it to skip under MONGODB_URI."""
    skip_if_real_server()


@pytest.fixture(scope="module")
def mongo_uri(request):
    """The URI every test connects to: MONGODB_URI, or the module's emulator."""
    uri = real_server_uri()
    if uri:
        return uri
    return request.getfixturevalue("emulator").uri


def _new_client(uri, **kwargs):
    import pymongo
    opts = dict(serverSelectionTimeoutMS=8000, connectTimeoutMS=8000)
    opts.update(kwargs)
    return pymongo.MongoClient(uri, **opts)


@pytest.fixture
def make_client(mongo_uri):
    """Factory for extra pymongo clients (closed at teardown): make_client(**options)."""
    clients = []

    def make(uri=None, **kwargs):
        c = _new_client(uri or mongo_uri, **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(make_client):
    return make_client()


def _unique_db_name(nodeid):
    base = re.sub(r"[^A-Za-z0-9_]", "_", nodeid.split("::")[-1])[:40]
    return "mct_%s_%s" % (base, uuid.uuid4().hex[:8])


@pytest.fixture
def db_name(request, mongo_uri):
    """A database name unique to this test, dropped (with anything in it) at teardown."""
    name = _unique_db_name(request.node.nodeid)
    yield name
    _drop_databases(mongo_uri, [name])


@pytest.fixture
def db_names(request, mongo_uri):
    """Factory of more unique database names, all dropped at teardown."""
    names = []

    def make(tag=""):
        n = _unique_db_name(request.node.nodeid + tag)
        names.append(n)
        return n

    yield make
    _drop_databases(mongo_uri, names)


def _drop_databases(uri, names):
    if not names:
        return
    try:
        c = _new_client(uri, serverSelectionTimeoutMS=3000)
        try:
            for n in names:
                c.drop_database(n)
        finally:
            c.close()
    except Exception:
        # The server may be gone (a test that kills it); the data was in memory anyway.
        pass


@pytest.fixture
def db(client, db_name):
    return client[db_name]


def wait_for(predicate, timeout=5.0, interval=0.02, message="condition"):
    """Polls `predicate` until it returns a truthy value; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)


class CommandRecorder:
    """pymongo command listener recording started/succeeded/failed events (thread-safe)."""

    def __init__(self):
        from pymongo import monitoring
        self.started = []
        self.succeeded = []
        self.failed = []
        self._lock = threading.Lock()
        recorder = self

        class _Listener(monitoring.CommandListener):
            def started(self, event):
                with recorder._lock:
                    recorder.started.append(event)

            def succeeded(self, event):
                with recorder._lock:
                    recorder.succeeded.append(event)

            def failed(self, event):
                with recorder._lock:
                    recorder.failed.append(event)

        self.listener = _Listener()

    def commands(self, name):
        with self._lock:
            return [e.command for e in self.started if e.command_name == name]

    def clear(self):
        with self._lock:
            self.started.clear()
            self.succeeded.clear()
            self.failed.clear()


@pytest.fixture
def recorded_client(make_client):
    """(client, recorder): a client whose commands are recorded through APM."""
    rec = CommandRecorder()
    return make_client(event_listeners=[rec.listener]), rec
