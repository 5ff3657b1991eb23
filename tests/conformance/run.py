#!/usr/bin/python3
"""Runner for MongoDB's unified test format, covering what the change-stream specification tests
use. It measures how faithfully mongo-emulator (or a real server) behaves like MongoDB 6.0/7.0
when driven by pymongo 3.11.

Usage: /usr/bin/python3 tests/conformance/run.py [-k SUBSTRING] [--file NAME] [-v]

Test data: $MC_CONFORMANCE_DIR, else <repo>/../shared/conformance/change-streams (never copied
into this repository). Server: $MONGODB_URI if set, else mongo-emulator from $MC_BUILD_DIR
(default <repo>/build) started here on free ports: one replica-set instance, plus a
--standalone instance for the tests that require a 'single' topology.

$MC_EMULATOR_ARGS adds options to the emulators started here (e.g. "--wire-version 21").

Output: one line per test, "PASS|FAIL|SKIP file:description [reason]", then
"N passed, N failed, N skipped". Exit status 1 if any test failed.

What pymongo 3.11 cannot express is sent as raw commands: change streams with
fullDocumentBeforeChange, comment or showExpandedEvents (which neither pymongo 3.11 nor
libmongoc 1.23, the daemon's driver, can send) are opened with a raw aggregate and iterated with
raw getMore commands in one session, with the change-stream spec's resume rules.
"""

import argparse
import copy
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pymongo
from bson import SON, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson import json_util
from bson.binary import Binary
from pymongo import monitoring
from pymongo.errors import (ConnectionFailure, CursorNotFound, OperationFailure, PyMongoError)

REPO = Path(__file__).resolve().parents[2]
ITERATE_TIMEOUT = 20.0
LISTEN_RE = re.compile(r"mongo-emulator listening on (\S+):(\d+)")
MISSING = object()


class Skip(Exception):
    """The test cannot run here; the message says why."""


class TestFailure(Exception):
    """An assertion of the test failed."""


class ClientSideError(Exception):
    """An error the driver (or this runner acting as one) raises without a server reply."""


# ---------------------------------------------------------------------------------------------
# servers

class EmulatorProcess:
    def __init__(self, binary, extra):
        # MC_EMULATOR_ARGS adds options, e.g. "--wire-version 21" to emulate MongoDB 7.0
        extra = extra + os.environ.get("MC_EMULATOR_ARGS", "").split()
        env = dict(os.environ)
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        self.proc = subprocess.Popen([str(binary), "--port", "0"] + extra,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env)
        self.stderr_lines = []
        self._t = threading.Thread(target=self._drain_stderr, daemon=True)
        self._t.start()
        deadline = time.monotonic() + 20
        self.address = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                break
            m = LISTEN_RE.search(line)
            if m:
                self.address = "%s:%s" % (m.group(1), m.group(2))
                break
        if not self.address:
            self.stop()
            raise RuntimeError("mongo-emulator %s did not start: %s" % (
                " ".join(extra), "".join(self.stderr_lines[-20:])))
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stdout(self):
        for _ in iter(self.proc.stdout.readline, b""):
            pass

    def _drain_stderr(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._t.join(2)
        return self.proc.returncode

    def sanitizer_report(self):
        text = "".join(self.stderr_lines)
        m = re.search(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:", text)
        return text[m.start():m.start() + 3000] if m else None


class Server:
    """One deployment the tests can run against: its URI, version and topology type."""

    def __init__(self, uri, process=None):
        self.uri = uri
        self.process = process
        c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=15000)
        try:
            info = c.admin.command("buildInfo")
            hello = c.admin.command("ismaster")
        finally:
            c.close()
        arr = info.get("versionArray")
        if arr:
            self.version = tuple(int(x) for x in list(arr)[:3])
        else:
            self.version = parse_version(info["version"])
        self.version_string = info.get("version", ".".join(map(str, self.version)))
        if hello.get("msg") == "isdbgrid":
            self.topology = "sharded"
        elif hello.get("setName"):
            self.topology = "replicaset"
        else:
            self.topology = "single"
        self.max_wire_version = hello.get("maxWireVersion", 0)

    def internal_client(self):
        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10000)


class Servers:
    """The replica set under test and, lazily, a standalone for topology 'single' tests."""

    def __init__(self, build_dir):
        self.build_dir = build_dir
        self.processes = []
        uri = os.environ.get("MONGODB_URI", "").strip()
        self.real = bool(uri)
        self._standalone = None
        self._standalone_tried = False
        if self.real:
            self.main = Server(uri)
        else:
            self.main = self._start_emulator([])

    def _binary(self):
        b = self.build_dir / "tools" / "mongo-emulator" / "mongo-emulator"
        if not (b.is_file() and os.access(str(b), os.X_OK)):
            raise RuntimeError("mongo-emulator not found at %s (build it, or set MC_BUILD_DIR "
                               "or MONGODB_URI)" % b)
        return b

    def _start_emulator(self, extra):
        proc = EmulatorProcess(self._binary(), extra)
        self.processes.append(proc)
        if "--standalone" in extra:
            uri = "mongodb://%s/?directConnection=true" % proc.address
        else:
            uri = "mongodb://%s/?replicaSet=rs0" % proc.address
        return Server(uri, proc)

    def standalone(self):
        if self.real:
            return None
        if not self._standalone_tried:
            self._standalone_tried = True
            self._standalone = self._start_emulator(["--standalone"])
        return self._standalone

    def check_alive(self, server):
        """After a test: if `server` is an emulator that died, start a replacement (so one crash
        does not fail every later test) and return the dead one's report, else None."""
        proc = server.process
        if proc is None or proc.alive():
            return None
        report = proc.sanitizer_report() or "exit status %s: %s" % (
            proc.proc.returncode, "".join(proc.stderr_lines[-20:]))
        self.processes.remove(proc)
        proc.stop()
        standalone = server is self._standalone
        replacement = self._start_emulator(["--standalone"] if standalone else [])
        if standalone:
            self._standalone = replacement
        else:
            self.main = replacement
        return report

    def candidates(self):
        yield self.main
        if not self.real:
            yield "standalone"

    def stop(self):
        problems = []
        for p in self.processes:
            was_alive = p.alive()
            rc = p.stop()
            rep = p.sanitizer_report()
            if rep:
                problems.append("mongo-emulator sanitizer report:\n" + rep)
            elif not was_alive:
                problems.append("mongo-emulator died during the run (status %s): %s" % (
                    rc, "".join(p.stderr_lines[-20:])))
        return problems


def parse_version(s):
    parts = []
    for piece in str(s).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group(0)))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts[:3])


def requirement_ok(req, server):
    """(True, None) or (False, reason) for one runOnRequirement object."""
    if "minServerVersion" in req and server.version < parse_version(req["minServerVersion"]):
        return False, "needs server >= %s (server is %s)" % (req["minServerVersion"],
                                                              server.version_string)
    if "maxServerVersion" in req and server.version > parse_version(req["maxServerVersion"]):
        return False, "needs server <= %s (server is %s)" % (req["maxServerVersion"],
                                                              server.version_string)
    if "topologies" in req:
        tops = req["topologies"]
        ok = server.topology in tops or (server.topology == "sharded" and
                                         "sharded-replicaset" in tops)
        if not ok:
            return False, "needs topology %s (server is %s)" % ("/".join(tops), server.topology)
    if req.get("serverless") == "require":
        return False, "needs a serverless deployment"
    if req.get("auth") is True:
        return False, "needs authentication"
    if req.get("csfle"):
        return False, "needs client-side field level encryption"
    if "serverParameters" in req:
        return False, "checks serverParameters (not supported by this runner)"
    return True, None


def requirements_ok(reqs, server):
    if not reqs:
        return True, None
    reasons = []
    for r in reqs:
        ok, why = requirement_ok(r, server)
        if ok:
            return True, None
        reasons.append(why)
    return False, "; ".join(reasons)


# ---------------------------------------------------------------------------------------------
# matching (unified test format rules: extra fields are allowed only in root-level documents)

TYPE_CHECKS = {
    "double": lambda v: isinstance(v, float),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "binData": lambda v: isinstance(v, (Binary, bytes)) or type(v).__name__ == "UUID",
    "undefined": lambda v: False,
    "objectId": lambda v: isinstance(v, ObjectId),
    "bool": lambda v: isinstance(v, bool),
    "date": lambda v: isinstance(v, datetime.datetime),
    "null": lambda v: v is None,
    "regex": lambda v: isinstance(v, Regex) or type(v).__name__ == "Pattern",
    "dbPointer": lambda v: False,
    "javascript": lambda v: isinstance(v, Code) and v.scope is None,
    "symbol": lambda v: False,
    "javascriptWithScope": lambda v: isinstance(v, Code) and v.scope is not None,
    "int": lambda v: isinstance(v, int) and not isinstance(v, (bool, Int64)),
    "timestamp": lambda v: isinstance(v, Timestamp),
    "long": lambda v: isinstance(v, Int64),
    "decimal": lambda v: isinstance(v, Decimal128),
    "minKey": lambda v: isinstance(v, MinKey),
    "maxKey": lambda v: isinstance(v, MaxKey),
    "number": lambda v: isinstance(v, (int, float, Decimal128)) and not isinstance(v, bool),
}


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def special_operator(exp):
    if isinstance(exp, dict) and len(exp) == 1:
        k = next(iter(exp))
        if isinstance(k, str) and k.startswith("$$"):
            return k
    return None


def show(v):
    try:
        return json_util.dumps(v)
    except Exception:
        return repr(v)


def match(exp, act, path, root, entities):
    """Raises TestFailure when `act` does not match `exp`. `act` may be MISSING."""
    op = special_operator(exp)
    if op:
        arg = exp[op]
        if op == "$$exists":
            if (act is not MISSING) != bool(arg):
                raise TestFailure("%s: expected %s" % (path, "present" if arg else "absent"))
            return
        if op == "$$unsetOrMatches":
            if act is MISSING or (root and act is None):
                return
            return match(arg, act, path, root, entities)
        if act is MISSING:
            raise TestFailure("%s: missing (expected %s)" % (path, show(exp)))
        if op == "$$type":
            names = arg if isinstance(arg, list) else [arg]
            for n in names:
                if n not in TYPE_CHECKS:
                    raise TestFailure("%s: unknown $$type %r" % (path, n))
            if not any(TYPE_CHECKS[n](act) for n in names):
                raise TestFailure("%s: %s is not of type %s" % (path, show(act), names))
            return
        if op == "$$matchesEntity":
            return match(entities.get(arg), act, path, root, entities)
        if op == "$$matchesHexBytes":
            if bytes(act) != bytes.fromhex(arg):
                raise TestFailure("%s: bytes differ" % path)
            return
        if op == "$$sessionLsid":
            sess = entities.get(arg)
            if sess is None or act != sess.session_id:
                raise TestFailure("%s: lsid is not that of session %s" % (path, arg))
            return
        if op == "$$lte":
            if not is_number(act) or act > arg:
                raise TestFailure("%s: %s is not <= %s" % (path, show(act), arg))
            return
        if op == "$$matchAsDocument":
            if not isinstance(act, str):
                raise TestFailure("%s: not a JSON string" % path)
            return match(arg, json_util.loads(act), path, False, entities)
        if op == "$$matchAsRoot":
            return match(arg, act, path, True, entities)
        raise TestFailure("%s: unsupported special operator %s" % (path, op))

    if act is MISSING:
        raise TestFailure("%s: missing (expected %s)" % (path, show(exp)))
    if isinstance(exp, dict):
        if not isinstance(act, dict):
            raise TestFailure("%s: expected a document, got %s" % (path, show(act)))
        for k, v in exp.items():
            match(v, act.get(k, MISSING), "%s.%s" % (path, k), False, entities)
        if not root:
            extra = [k for k in act if k not in exp]
            if extra:
                raise TestFailure("%s: unexpected field(s) %s in %s" % (path, extra, show(act)))
        return
    if isinstance(exp, list):
        if not isinstance(act, list):
            raise TestFailure("%s: expected an array, got %s" % (path, show(act)))
        if len(exp) != len(act):
            raise TestFailure("%s: expected %d elements, got %d: %s" % (
                path, len(exp), len(act), show(act)))
        for i, (e, a) in enumerate(zip(exp, act)):
            match(e, a, "%s[%d]" % (path, i), False, entities)
        return
    if isinstance(exp, bool) or isinstance(act, bool):
        if not (isinstance(exp, bool) and isinstance(act, bool) and exp == act):
            raise TestFailure("%s: expected %s, got %s" % (path, show(exp), show(act)))
        return
    if is_number(exp):
        if not is_number(act) or exp != act:
            raise TestFailure("%s: expected %s, got %s" % (path, show(exp), show(act)))
        return
    if exp != act:
        raise TestFailure("%s: expected %s, got %s" % (path, show(exp), show(act)))


# ---------------------------------------------------------------------------------------------
# entities

class EventRecorder(monitoring.CommandListener):
    def __init__(self, observe, ignore, sensitive):
        self.observe = set(observe)
        self.ignore = set(ignore) | {"configureFailPoint"}
        if not sensitive:
            self.ignore |= {"authenticate", "saslStart", "saslContinue", "getnonce",
                            "createUser", "updateUser", "copydbgetnonce", "copydbsaslstart",
                            "copydb", "hello", "ismaster", "isMaster"}
        self.events = []
        self.lock = threading.Lock()

    def _add(self, kind, event):
        if kind in self.observe and event.command_name not in self.ignore:
            with self.lock:
                self.events.append((kind, event))

    def started(self, event):
        self._add("commandStartedEvent", event)

    def succeeded(self, event):
        self._add("commandSucceededEvent", event)

    def failed(self, event):
        self._add("commandFailedEvent", event)


class ClientEntity:
    def __init__(self, spec, server):
        self.recorder = None
        kwargs = dict(serverSelectionTimeoutMS=10000)
        observe = spec.get("observeEvents", [])
        unsupported = [e for e in observe if e not in ("commandStartedEvent",
                                                       "commandSucceededEvent",
                                                       "commandFailedEvent")]
        if unsupported:
            raise Skip("observeEvents %s not supported by this runner" % unsupported)
        if observe:
            self.recorder = EventRecorder(observe, spec.get("ignoreCommandMonitoringEvents", []),
                                          spec.get("observeSensitiveCommands", False))
            kwargs["event_listeners"] = [self.recorder]
        for k, v in spec.get("uriOptions", {}).items():
            kwargs[k] = v
        if "serverApi" in spec:
            raise Skip("serverApi needs pymongo >= 3.12")
        self.client = pymongo.MongoClient(server.uri, **kwargs)
        self.max_wire_version = server.max_wire_version

    def close(self):
        self.client.close()


def concern_options(opts):
    out = {}
    if not opts:
        return out
    from pymongo.read_concern import ReadConcern
    from pymongo.write_concern import WriteConcern
    if "readConcern" in opts:
        out["read_concern"] = ReadConcern(**opts["readConcern"])
    if "writeConcern" in opts:
        wc = dict(opts["writeConcern"])
        if "wtimeoutMS" in wc:
            wc["wtimeout"] = wc.pop("wtimeoutMS")
        out["write_concern"] = WriteConcern(**wc)
    if "readPreference" in opts:
        from pymongo.read_preferences import read_pref_mode_from_name, make_read_preference
        rp = opts["readPreference"]
        out["read_preference"] = make_read_preference(
            read_pref_mode_from_name(rp["mode"]), None)
    return out


# ---------------------------------------------------------------------------------------------
# change streams sent as raw commands (for options pymongo 3.11 cannot send)

def is_resumable(exc, wire):
    if isinstance(exc, (ConnectionFailure, CursorNotFound)):
        return True
    if isinstance(exc, OperationFailure):
        if exc.code == 43:
            return True
        if wire >= 9:
            return exc.has_error_label("ResumableChangeStreamError")
    return False


class RawChangeStream:
    """A change stream over raw aggregate/getMore commands, following the change-stream spec's
    token caching and resume rules (one resume attempt per getMore failure)."""

    def __init__(self, client_entity, target, db_name, coll_name, pipeline, args):
        self.client = client_entity.client
        self.wire = client_entity.max_wire_version
        self.db = self.client[db_name]
        self.target = target  # "collection" | "database" | "client"
        self.coll_name = coll_name
        self.pipeline = list(pipeline)
        self.args = args
        self.session = self.client.start_session(causal_consistency=False)
        self.uses_start_after = "startAfter" in args
        self.token = args.get("startAfter", args.get("resumeAfter"))
        self.start_at = args.get("startAtOperationTime")
        self.returned_any = False
        self.buf = []
        self.id = 0
        self.ns_coll = None
        self.pbrt = None
        self.closed = False
        self._aggregate(initial=True)

    def _spec(self, initial):
        spec = SON()
        for k in ("fullDocument", "fullDocumentBeforeChange"):
            if k in self.args:
                spec[k] = self.args[k]
        if initial:
            for k in ("resumeAfter", "startAfter", "startAtOperationTime"):
                if k in self.args:
                    spec[k] = self.args[k]
        elif self.token is not None:
            key = "startAfter" if self.uses_start_after and not self.returned_any \
                else "resumeAfter"
            spec[key] = self.token
        elif self.start_at is not None:
            spec["startAtOperationTime"] = self.start_at
        if self.target == "client":
            spec["allChangesForCluster"] = True
        if "showExpandedEvents" in self.args:
            spec["showExpandedEvents"] = self.args["showExpandedEvents"]
        return spec

    def _aggregate(self, initial):
        cmd = SON([("aggregate", self.coll_name if self.target == "collection" else 1),
                   ("pipeline", [{"$changeStream": self._spec(initial)}] + self.pipeline)])
        cursor = {}
        if "batchSize" in self.args:
            cursor["batchSize"] = self.args["batchSize"]
        cmd["cursor"] = cursor
        for k in ("comment", "collation"):
            if k in self.args:
                cmd[k] = self.args[k]
        reply = self.db.command(cmd, session=self.session)
        cur = reply["cursor"]
        self.id = cur["id"]
        self.ns_coll = cur["ns"].split(".", 1)[1]
        self.buf = list(cur["firstBatch"])
        self.pbrt = cur.get("postBatchResumeToken")
        if not self.buf:
            if self.pbrt is not None:
                self.token = self.pbrt
            elif self.token is None and self.start_at is None and self.wire >= 7:
                self.start_at = reply.get("operationTime")

    def _get_more(self):
        cmd = SON([("getMore", Int64(self.id)), ("collection", self.ns_coll)])
        if "batchSize" in self.args:
            cmd["batchSize"] = Int64(self.args["batchSize"])
        if "maxAwaitTimeMS" in self.args:
            cmd["maxTimeMS"] = Int64(self.args["maxAwaitTimeMS"])
        if "comment" in self.args and self.wire >= 9:
            cmd["comment"] = self.args["comment"]
        reply = self.db.command(cmd, session=self.session)
        cur = reply["cursor"]
        self.id = cur["id"]
        self.buf = list(cur["nextBatch"])
        self.pbrt = cur.get("postBatchResumeToken")

    def _kill(self):
        if self.id:
            try:
                self.db.command("killCursors", self.ns_coll, cursors=[Int64(self.id)],
                                session=self.session)
            except PyMongoError:
                pass
            self.id = 0

    @property
    def alive(self):
        return not self.closed and (bool(self.buf) or bool(self.id))

    def try_next(self):
        if not self.buf and self.id:
            try:
                self._get_more()
            except PyMongoError as exc:
                if not is_resumable(exc, self.wire):
                    raise
                self._kill()
                self._aggregate(initial=False)
            if not self.buf and self.pbrt is not None:
                self.token = self.pbrt
                self.start_at = None
        if not self.buf:
            return None
        doc = self.buf.pop(0)
        if "_id" not in doc:
            self.close()
            raise ClientSideError("Cannot provide resume functionality when the resume token "
                                  "is missing.")
        self.token = self.pbrt if (not self.buf and self.pbrt is not None) else doc["_id"]
        self.start_at = None
        self.returned_any = True
        return doc

    def close(self):
        if not self.closed:
            self.closed = True
            self._kill()
            self.session.end_session()


# ---------------------------------------------------------------------------------------------
# one test

def op_result_update(r):
    return {"matchedCount": r.matched_count, "modifiedCount": r.modified_count,
            "upsertedCount": 0 if r.upserted_id is None else 1,
            "upsertedId": r.upserted_id}


class TestRun:
    def __init__(self, file_doc, test, server, verbose):
        self.file = file_doc
        self.test = test
        self.server = server
        self.verbose = verbose
        self.entities = {}
        self.entity_kind = {}
        self.fail_points = []  # (client entity id, fail point name)
        self.streams = []

    # -- setup --

    def create_entities(self, specs):
        for item in specs:
            kind, spec = next(iter(item.items()))
            eid = spec["id"]
            if kind == "client":
                ent = ClientEntity(spec, self.server)
            elif kind == "database":
                client = self.entities[spec["client"]].client
                ent = client.get_database(spec["databaseName"],
                                          **concern_options(spec.get("databaseOptions")))
            elif kind == "collection":
                db = self.entities[spec["database"]]
                ent = db.get_collection(spec["collectionName"],
                                        **concern_options(spec.get("collectionOptions")))
            else:
                raise Skip("entity type %s not supported by this runner" % kind)
            self.entities[eid] = ent
            self.entity_kind[eid] = kind

    def load_initial_data(self, data):
        if not data:
            return
        c = self.server.internal_client()
        try:
            for coll in data:
                db = c.get_database(coll["databaseName"])
                db.drop_collection(coll["collectionName"])
                db.command(SON([("create", coll["collectionName"])] +
                               list(coll.get("createOptions", {}).items())))
                if coll["documents"]:
                    db[coll["collectionName"]].insert_many(copy.deepcopy(coll["documents"]))
        finally:
            c.close()

    # -- operations --

    def run_operations(self, ops):
        for op in ops:
            self.run_operation(op)

    def run_operation(self, op):
        name, obj = op["name"], op["object"]
        args = op.get("arguments", {})
        expect_error = op.get("expectError")
        try:
            result = self.dispatch(name, obj, args)
        except (TestFailure, Skip):
            raise
        except Exception as exc:
            if expect_error is None:
                if op.get("ignoreResultAndError"):
                    return
                raise TestFailure("%s on %s raised %s: %s" % (name, obj, type(exc).__name__,
                                                              describe_error(exc)))
            check_error(expect_error, exc, self.entities)
            return
        if expect_error is not None:
            raise TestFailure("%s on %s succeeded (result %s) but an error was expected: %s" % (
                name, obj, show(result), show(expect_error)))
        if "expectResult" in op:
            act = MISSING if result is None and name not in ("iterateOnce",) else result
            try:
                match(op["expectResult"], act, "result", True, self.entities)
            except TestFailure as f:
                raise TestFailure("%s on %s: %s" % (name, obj, f))
        if "saveResultAsEntity" in op:
            self.entities[op["saveResultAsEntity"]] = result

    def dispatch(self, name, obj, args):
        if obj == "testRunner":
            return self.runner_operation(name, args)
        target = self.entities.get(obj)
        if target is None:
            raise TestFailure("unknown entity %s" % obj)
        kind = self.entity_kind.get(obj, "changeStream")
        method = getattr(self, "op_%s" % name, None)
        if method is None:
            raise Skip("operation %s is not supported by this runner" % name)
        return method(target, kind, args)

    def runner_operation(self, name, args):
        if name == "failPoint":
            ent = self.entities[args["client"]]
            fp = SON(args["failPoint"])
            ent.client.admin.command(fp)
            self.fail_points.append((args["client"], fp["configureFailPoint"]))
            return None
        raise Skip("testRunner operation %s is not supported by this runner" % name)

    def op_createChangeStream(self, target, kind, args):
        args = dict(args)
        pipeline = args.pop("pipeline", [])
        raw = any(k in args for k in ("fullDocumentBeforeChange", "comment",
                                      "showExpandedEvents"))
        known = {"fullDocument", "fullDocumentBeforeChange", "resumeAfter", "startAfter",
                 "startAtOperationTime", "batchSize", "maxAwaitTimeMS", "comment",
                 "showExpandedEvents", "collation"}
        unknown = set(args) - known
        if unknown:
            raise Skip("createChangeStream options %s not supported" % sorted(unknown))
        if raw:
            if kind == "collection":
                ent = self._client_entity_of(target.database.client)
                s = RawChangeStream(ent, "collection", target.database.name, target.name,
                                    pipeline, args)
            elif kind == "database":
                s = RawChangeStream(self._client_entity_of(target.client), "database",
                                    target.name, None, pipeline, args)
            else:
                s = RawChangeStream(target, "client", "admin", None, pipeline, args)
        else:
            kw = {}
            mapping = {"fullDocument": "full_document", "resumeAfter": "resume_after",
                       "startAfter": "start_after", "batchSize": "batch_size",
                       "startAtOperationTime": "start_at_operation_time",
                       "maxAwaitTimeMS": "max_await_time_ms", "collation": "collation"}
            for k, v in args.items():
                kw[mapping[k]] = v
            watcher = target.client if kind == "client" else target
            s = watcher.watch(pipeline, **kw)
        self.streams.append(s)
        return s

    def _client_entity_of(self, client):
        for eid, kind in self.entity_kind.items():
            if kind == "client" and self.entities[eid].client is client:
                return self.entities[eid]
        raise TestFailure("no client entity for %r" % client)

    def op_iterateUntilDocumentOrError(self, stream, kind, args):
        deadline = time.monotonic() + ITERATE_TIMEOUT
        while time.monotonic() < deadline:
            if not stream.alive:
                raise ClientSideError("change stream is closed")
            doc = stream.try_next()
            if doc is not None:
                return doc
        raise TestFailure("iterateUntilDocumentOrError: no document or error within %.0fs" %
                          ITERATE_TIMEOUT)

    def op_iterateOnce(self, stream, kind, args):
        return stream.try_next()

    def op_close(self, target, kind, args):
        target.close()
        return None

    def op_insertOne(self, coll, kind, args):
        r = coll.insert_one(copy.deepcopy(args["document"]))
        return {"insertedId": r.inserted_id}

    def op_insertMany(self, coll, kind, args):
        r = coll.insert_many(copy.deepcopy(args["documents"]), ordered=args.get("ordered", True))
        return {"insertedIds": {str(i): v for i, v in enumerate(r.inserted_ids)}}

    def op_updateOne(self, coll, kind, args):
        return op_result_update(coll.update_one(args["filter"], args["update"],
                                                upsert=args.get("upsert", False)))

    def op_updateMany(self, coll, kind, args):
        return op_result_update(coll.update_many(args["filter"], args["update"],
                                                 upsert=args.get("upsert", False)))

    def op_replaceOne(self, coll, kind, args):
        return op_result_update(coll.replace_one(args["filter"], args["replacement"],
                                                 upsert=args.get("upsert", False)))

    def op_deleteOne(self, coll, kind, args):
        return {"deletedCount": coll.delete_one(args["filter"]).deleted_count}

    def op_deleteMany(self, coll, kind, args):
        return {"deletedCount": coll.delete_many(args["filter"]).deleted_count}

    def op_find(self, coll, kind, args):
        args = dict(args)
        flt = args.pop("filter", {})
        kw = {}
        for k, py in (("sort", "sort"), ("limit", "limit"), ("skip", "skip"),
                      ("batchSize", "batch_size"), ("projection", "projection")):
            if k in args:
                v = args[k]
                kw[py] = list(v.items()) if k == "sort" else v
        return list(coll.find(flt, **kw))

    def op_aggregate(self, target, kind, args):
        return list(target.aggregate(args["pipeline"]))

    def op_countDocuments(self, coll, kind, args):
        return coll.count_documents(args["filter"])

    def op_dropCollection(self, db, kind, args):
        db.drop_collection(args["collection"])
        return None

    def op_createCollection(self, db, kind, args):
        args = dict(args)
        name = args.pop("collection")
        db.command(SON([("create", name)] + list(args.items())))
        return None

    def op_rename(self, coll, kind, args):
        kw = {}
        if "dropTarget" in args:
            kw["dropTarget"] = args["dropTarget"]
        coll.rename(args["to"], **kw)
        return None

    def op_createIndex(self, coll, kind, args):
        kw = {k: v for k, v in args.items() if k != "keys"}
        return coll.create_index(list(args["keys"].items()), **kw)

    def op_dropIndex(self, coll, kind, args):
        coll.drop_index(args["name"])
        return None

    def op_runCommand(self, db, kind, args):
        if "readPreference" in args:
            raise Skip("runCommand with readPreference not supported by this runner")
        return db.command(SON(args["command"]))

    # -- assertions --

    def check_events(self, expected_lists):
        for spec in expected_lists:
            if spec.get("eventType", "command") != "command":
                raise Skip("eventType %s not supported" % spec.get("eventType"))
            ent = self.entities[spec["client"]]
            actual = list(ent.recorder.events) if ent.recorder else []
            exp = spec["events"]
            if spec.get("ignoreExtraEvents"):
                if len(actual) < len(exp):
                    raise TestFailure("client %s: expected at least %d events, got %d: %s" % (
                        spec["client"], len(exp), len(actual), describe_events(actual)))
                actual = actual[:len(exp)]
            elif len(actual) != len(exp):
                raise TestFailure("client %s: expected %d events, got %d: %s" % (
                    spec["client"], len(exp), len(actual), describe_events(actual)))
            for i, (e, (kind, ev)) in enumerate(zip(exp, actual)):
                ekind, body = next(iter(e.items()))
                where = "event %d of client %s" % (i, spec["client"])
                if ekind != kind:
                    raise TestFailure("%s: expected %s, got %s (%s)" % (where, ekind, kind,
                                                                       ev.command_name))
                try:
                    if "commandName" in body and body["commandName"] != ev.command_name:
                        raise TestFailure("commandName %s, expected %s" % (
                            ev.command_name, body["commandName"]))
                    if "databaseName" in body and body["databaseName"] != ev.database_name:
                        raise TestFailure("databaseName %s, expected %s" % (
                            ev.database_name, body["databaseName"]))
                    if "command" in body:
                        match(body["command"], ev.command, "command", True, self.entities)
                    if "reply" in body:
                        match(body["reply"], ev.reply, "reply", True, self.entities)
                    for k in ("hasServiceId", "hasServerConnectionId"):
                        if k in body:
                            raise Skip("%s not supported by pymongo 3.11" % k)
                except TestFailure as f:
                    raise TestFailure("%s (%s): %s" % (where, ev.command_name, f))

    def check_outcome(self, outcome):
        c = self.server.internal_client()
        try:
            for coll in outcome:
                docs = list(c[coll["databaseName"]][coll["collectionName"]].find(
                    sort=[("_id", 1)]))
                match(coll["documents"], docs, "outcome", False, self.entities)
        finally:
            c.close()

    # -- lifecycle --

    def run(self):
        try:
            self.create_entities(self.file.get("createEntities", []))
            self.load_initial_data(self.file.get("initialData"))
            self.run_operations(self.test["operations"])
            if "expectEvents" in self.test:
                self.check_events(self.test["expectEvents"])
            if "outcome" in self.test:
                self.check_outcome(self.test["outcome"])
        finally:
            self.cleanup()

    def cleanup(self):
        for s in self.streams:
            try:
                s.close()
            except Exception:
                pass
        for cid, name in self.fail_points:
            try:
                self.entities[cid].client.admin.command(
                    SON([("configureFailPoint", name), ("mode", "off")]))
            except Exception:
                try:
                    c = self.server.internal_client()
                    c.admin.command(SON([("configureFailPoint", name), ("mode", "off")]))
                    c.close()
                except Exception:
                    pass
        for eid, kind in self.entity_kind.items():
            if kind == "client":
                try:
                    self.entities[eid].close()
                except Exception:
                    pass


def describe_error(exc):
    if isinstance(exc, OperationFailure):
        d = exc.details or {}
        return "code %s (%s) labels %s: %s" % (exc.code, d.get("codeName"),
                                               d.get("errorLabels", []), d.get("errmsg", exc))
    return str(exc)


def describe_events(actual):
    return ", ".join("%s:%s" % (k.replace("command", "").replace("Event", ""), e.command_name)
                     for k, e in actual)


def is_server_error(exc):
    return isinstance(exc, OperationFailure) and exc.code is not None and \
        not isinstance(exc, ClientSideError)


def check_error(expect, exc, entities):
    server = is_server_error(exc)
    desc = "%s: %s" % (type(exc).__name__, describe_error(exc))
    if expect.get("isError") is False:
        raise TestFailure("unexpected error %s" % desc)
    if "isClientError" in expect:
        if expect["isClientError"] == server:
            raise TestFailure("expected a %s error, got %s" % (
                "client" if expect["isClientError"] else "server", desc))
    if "isTimeoutError" in expect:
        raise Skip("isTimeoutError not supported by pymongo 3.11")
    if "errorContains" in expect:
        if expect["errorContains"].lower() not in str(exc).lower():
            raise TestFailure("error %s does not contain %r" % (desc, expect["errorContains"]))
    if "errorCode" in expect:
        if not server or exc.code != expect["errorCode"]:
            raise TestFailure("expected error code %s, got %s" % (expect["errorCode"], desc))
    if "errorCodeName" in expect:
        name = (exc.details or {}).get("codeName") if server else None
        if name != expect["errorCodeName"]:
            raise TestFailure("expected codeName %s, got %s (%s)" % (expect["errorCodeName"],
                                                                    name, desc))
    labels = []
    if isinstance(exc, PyMongoError):
        labels = [l for l in ("ResumableChangeStreamError", "NonResumableChangeStreamError",
                              "RetryableWriteError", "TransientTransactionError",
                              "UnknownTransactionCommitResult")
                  if exc.has_error_label(l)]
        labels += [l for l in (getattr(exc, "details", None) or {}).get("errorLabels", [])
                   if l not in labels]
    for l in expect.get("errorLabelsContain", []):
        if l not in labels:
            raise TestFailure("error labels %s lack %s (%s)" % (labels, l, desc))
    for l in expect.get("errorLabelsOmit", []):
        if l in labels:
            raise TestFailure("error labels %s contain %s (%s)" % (labels, l, desc))
    if "expectResult" in expect:
        raise Skip("expectError.expectResult not supported by this runner")


# ---------------------------------------------------------------------------------------------
# driver

def conformance_dir():
    env = os.environ.get("MC_CONFORMANCE_DIR")
    if env:
        return Path(env)
    return (REPO.parent / "shared" / "conformance" / "change-streams").resolve()


def load_files(directory, only):
    files = []
    for p in sorted(directory.glob("*.json")):
        if only and only not in p.name:
            continue
        with open(str(p), "r", encoding="utf-8") as f:
            files.append((p.name, json_util.loads(f.read())))
    return files


def schema_ok(version):
    # the runner implements the parts of schema 1.x these files use; unknown fields that
    # matter make a test SKIP or FAIL with a message rather than pass silently
    return str(version).split(".")[0] == "1"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="keyword", help="run tests whose description contains this")
    ap.add_argument("--file", help="run files whose name contains this")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks")
    opts = ap.parse_args(argv)

    directory = conformance_dir()
    if not directory.is_dir():
        print("conformance data missing: %s not found (set MC_CONFORMANCE_DIR); "
              "all conformance tests skipped" % directory)
        print("0 passed, 0 failed, 0 skipped")
        return 0

    build_dir = Path(os.environ.get("MC_BUILD_DIR", str(REPO / "build"))).resolve()
    try:
        servers = Servers(build_dir)
    except Exception as exc:
        print("FAIL setup: cannot start or reach the server: %s" % exc)
        print("0 passed, 1 failed, 0 skipped")
        return 1

    passed = failed = skipped = 0
    try:
        main_srv = servers.main
        sys.stderr.write("# server %s (%s, wire %s) %s\n" % (
            main_srv.version_string, main_srv.topology, main_srv.max_wire_version, main_srv.uri))
        for fname, doc in load_files(directory, opts.file):
            for test in doc["tests"]:
                label = "%s:%s" % (fname, test["description"])
                if opts.keyword and opts.keyword not in test["description"]:
                    continue
                status, reason = run_one(doc, test, servers, opts)
                if status == "PASS":
                    passed += 1
                    print("PASS %s" % label)
                elif status == "SKIP":
                    skipped += 1
                    print("SKIP %s [%s]" % (label, reason))
                else:
                    failed += 1
                    print("FAIL %s [%s]" % (label, reason))
                sys.stdout.flush()
    finally:
        for problem in servers.stop():
            failed += 1
            print("FAIL server: %s" % problem)
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


def run_one(doc, test, servers, opts):
    if not schema_ok(doc.get("schemaVersion", "1.0")):
        return "SKIP", "schemaVersion %s not supported" % doc.get("schemaVersion")
    if test.get("skipReason"):
        return "SKIP", test["skipReason"]
    server, reason = None, None
    for cand in servers.candidates():
        if cand == "standalone":
            # only start a standalone emulator when the requirements could accept one
            if not needs_single(doc, test):
                continue
            try:
                cand = servers.standalone()
            except Exception as exc:
                return "FAIL", "cannot start a standalone emulator: %s" % exc
        ok, why = requirements_ok(doc.get("runOnRequirements"), cand)
        if ok:
            ok, why = requirements_ok(test.get("runOnRequirements"), cand)
        if ok:
            server = cand
            break
        reason = reason or why
    if server is None:
        return "SKIP", reason
    run = TestRun(doc, test, server, opts.verbose)
    status, detail = "PASS", None
    try:
        run.run()
    except Skip as s:
        status, detail = "SKIP", str(s)
    except TestFailure as f:
        status, detail = "FAIL", str(f)
    except Exception as exc:
        detail = "%s: %s" % (type(exc).__name__, describe_error(exc))
        if opts.verbose:
            detail += "\n" + traceback.format_exc()
        status = "FAIL"
    crash = servers.check_alive(server)
    if crash:
        return "FAIL", "mongo-emulator died during this test (restarted): %s" % crash
    return status, detail


def needs_single(doc, test):
    for reqs in (doc.get("runOnRequirements"), test.get("runOnRequirements")):
        if not reqs:
            continue
        if not any("topologies" not in r or "single" in r["topologies"] for r in reqs):
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
