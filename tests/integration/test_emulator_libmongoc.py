"""mongo-emulator through libmongoc 1.23 (the driver the daemon uses): a pooled client watching
with ?replicaSet=rs0 (tests/integration/clients/watch_client.c), driven by pymongo writes.
Runs unchanged against a real replica set via MONGODB_URI."""

import json
import time

import pytest
from bson import SON, Timestamp, json_util
from bson.json_util import JSONOptions, JSONMode

from conftest import ManagedProcess, REPO, find_binary

CANONICAL = JSONOptions(json_mode=JSONMode.CANONICAL)
LOG_DIR = REPO / "tests" / "artifacts" / "integration"


class WatchClient:
    """A running watch_client; its stdout lines are available as they arrive."""

    def __init__(self, uri, db, coll, count, *args):
        binary = find_binary("tests/integration/clients/watch_client")
        self.proc = ManagedProcess([binary, uri, db, coll, str(count)] + list(args), LOG_DIR,
                                   "watch_client")
        self.pos = 0

    def wait_ready(self, timeout=20):
        idx, _ = self.proc.wait_line(r"^(READY|ERROR )", timeout)
        line = self.proc.lines[idx]
        self.pos = idx + 1
        assert line == "READY", "watch failed to open: %s" % self.output()
        return line

    def next_line(self, timeout=20):
        idx, _ = self.proc.wait_line(r".", timeout, start=self.pos)
        self.pos = idx + 1
        return self.proc.lines[idx]

    def next_event(self, timeout=20):
        line = self.next_line(timeout)
        while line == "EMPTY":  # --report-empty: a getMore that returned nothing
            line = self.next_line(timeout)
        assert line.startswith("{"), "expected an event, got %r\n%s" % (line, self.output())
        return json_util.loads(line)

    def finish(self, timeout=30):
        try:
            rc = self.proc.proc.wait(timeout)
        except Exception:
            self.proc.stop()
            pytest.fail("watch_client did not exit; output:\n%s" % self.output())
        self.proc.stop()
        report = self.proc.sanitizer_report()
        assert not report, report
        return rc

    def rest(self):
        """Remaining lines after the process exited."""
        lines = self.proc.lines[self.pos:]
        self.pos = len(self.proc.lines)
        return lines

    def output(self):
        return "stdout:\n%s\nstderr:\n%s" % ("\n".join(self.proc.lines),
                                             self.proc.stderr_tail())

    def kill(self):
        if self.proc.alive():
            self.proc.stop()


@pytest.fixture
def watch_client(mongo_uri):
    started = []

    def start(db, coll, count, *args):
        wc = WatchClient(mongo_uri, db, coll, count, *args)
        started.append(wc)
        return wc

    yield start
    for wc in started:
        wc.kill()


def token_arg(token):
    return json_util.dumps(token, json_options=CANONICAL)


def test_collection_watch_prints_each_change(watch_client, db):
    wc = watch_client(db.name, "c", 4)
    wc.wait_ready()
    db.c.insert_one({"_id": 1, "v": "a"})
    db.c.update_one({"_id": 1}, {"$set": {"v": "b"}, "$unset": {"gone": ""}})
    db.c.replace_one({"_id": 1}, {"w": 1})
    db.c.delete_one({"_id": 1})
    ins, upd, rep, dele = [wc.next_event() for _ in range(4)]
    assert wc.finish() == 0
    tail = wc.rest()
    assert len(tail) == 1 and tail[0].startswith("TOKEN {")

    assert ins["operationType"] == "insert"
    assert ins["fullDocument"] == {"_id": 1, "v": "a"}
    assert ins["ns"] == {"db": db.name, "coll": "c"}
    assert ins["documentKey"] == {"_id": 1}
    assert isinstance(ins["clusterTime"], Timestamp)
    assert ins["wallTime"].year >= 2020
    assert upd["operationType"] == "update"
    assert upd["updateDescription"] == {"updatedFields": {"v": "b"}, "removedFields": [],
                                        "truncatedArrays": []}
    assert rep["operationType"] == "replace" and rep["fullDocument"] == {"_id": 1, "w": 1}
    assert dele["operationType"] == "delete" and dele["documentKey"] == {"_id": 1}
    # the final cached token is the last event's token (PBRT of a batch ending in an event)
    final = json_util.loads(tail[0][len("TOKEN "):])
    assert final == dele["_id"]


def test_database_and_cluster_watch(watch_client, client, db, db_names):
    other = client[db_names("other")]
    dbw = watch_client(db.name, "-", 2)
    clw = watch_client("-", "-", 3, "--pipeline",
                       json.dumps([{"$match": {"ns.db": {"$in": [db.name, other.name]}}}]))
    dbw.wait_ready()
    clw.wait_ready()
    db.a.insert_one({"_id": 1})
    other.b.insert_one({"_id": 2})
    db.c.insert_one({"_id": 3})
    d = [dbw.next_event() for _ in range(2)]
    c = [clw.next_event() for _ in range(3)]
    assert dbw.finish() == 0 and clw.finish() == 0
    assert [(e["ns"]["coll"], e["documentKey"]["_id"]) for e in d] == [("a", 1), ("c", 3)]
    assert [(e["ns"]["db"], e["documentKey"]["_id"]) for e in c] == [
        (db.name, 1), (other.name, 2), (db.name, 3)]


def test_invalidate_then_resume_after_invalidate_token_gets_260(watch_client, db):
    """libmongoc 1.23: after the invalidate, next() returns false once; the call after that
    resumes with resumeAfter=<invalidate token>, which the server refuses with 260."""
    db.c.insert_one({"_id": 0})
    wc = watch_client(db.name, "c", 100, "--report-empty")
    wc.wait_ready()
    db.c.insert_one({"_id": 1})
    db.drop_collection("c")
    ins, drop, inval = [wc.next_event() for _ in range(3)]
    assert ins["operationType"] == "insert"
    assert drop["operationType"] == "drop"
    assert inval["operationType"] == "invalidate"
    assert wc.finish() == 2, wc.output()
    tail = wc.rest()
    assert tail[0] == "EMPTY", wc.output()
    assert tail[1].startswith("ERROR "), wc.output()
    fields = dict(kv.split("=", 1) for kv in tail[1].split(" ", 3)[1:3])
    assert fields["code"] == "260", wc.output()
    assert len(tail) <= 3 and all(not t.startswith("{") for t in tail)


def test_resume_with_token_from_previous_process(watch_client, db):
    wc = watch_client(db.name, "c", 2)
    wc.wait_ready()
    db.c.insert_many([{"_id": i} for i in range(2)])
    [wc.next_event() for _ in range(2)]
    assert wc.finish() == 0
    token = json_util.loads(wc.rest()[0][len("TOKEN "):])
    db.c.insert_many([{"_id": i} for i in range(2, 5)])
    wc2 = watch_client(db.name, "c", 3, "--resume-after", token_arg(token))
    wc2.wait_ready()
    got = [wc2.next_event()["documentKey"]["_id"] for _ in range(3)]
    assert wc2.finish() == 0
    assert got == [2, 3, 4]


def test_start_after_invalidate_token(watch_client, db):
    db.c.insert_one({"_id": 0})
    wc = watch_client(db.name, "c", 2)
    wc.wait_ready()
    db.drop_collection("c")
    wc.next_event()
    inval = wc.next_event()
    assert inval["operationType"] == "invalidate"
    wc.finish()
    db.c.insert_one({"_id": "again"})
    wc2 = watch_client(db.name, "c", 1, "--start-after", token_arg(inval["_id"]))
    wc2.wait_ready()
    assert wc2.next_event()["documentKey"] == {"_id": "again"}
    assert wc2.finish() == 0


def test_network_error_on_getmore_resumes_without_loss(watch_client, client, db):
    try:
        client.admin.command(SON([("configureFailPoint", "failCommand"),
                                  ("mode", {"times": 1}),
                                  ("data", {"failCommands": ["getMore"],
                                            "closeConnection": True,
                                            "appName": "watch_client"})]))
    except Exception as exc:
        if getattr(exc, "code", None) == 59:
            pytest.skip("server has no configureFailPoint")
        raise
    try:
        wc = watch_client(db.name, "c", 4, "--batch-size", "1")
        wc.wait_ready()
        db.c.insert_many([{"_id": i} for i in range(4)])
        got = [wc.next_event()["documentKey"]["_id"] for _ in range(4)]
        assert wc.finish() == 0, wc.output()
        assert got == [0, 1, 2, 3]
    finally:
        client.admin.command(SON([("configureFailPoint", "failCommand"), ("mode", "off")]))


def test_non_resumable_error_is_reported_with_code(watch_client, client, db):
    wc = watch_client(db.name, "c", 5, "--pipeline", json.dumps([{"$project": {"_id": 0}}]))
    wc.wait_ready()
    db.c.insert_one({"_id": 1})
    assert wc.finish() == 2
    err = wc.rest()[0]
    assert err.startswith("ERROR ") and " code=280 " in err, wc.output()


def test_bad_stage_fails_the_watch(watch_client, db):
    wc = watch_client(db.name, "c", 1, "--pipeline", json.dumps([{"$frobnicate": 1}]))
    idx, _ = wc.proc.wait_line(r"^(READY|ERROR )", 20)
    line = wc.proc.lines[idx]
    assert line.startswith("ERROR ") and " code=40324 " in line, wc.output()
    assert wc.finish() == 2


def test_full_document_update_lookup(watch_client, db):
    db.c.insert_one({"_id": 1, "n": 1})
    wc = watch_client(db.name, "c", 1, "--full-document", "updateLookup")
    wc.wait_ready()
    db.c.update_one({"_id": 1}, {"$inc": {"n": 1}})
    ev = wc.next_event()
    assert wc.finish() == 0
    assert ev["fullDocument"] == {"_id": 1, "n": 2}
    assert ev["updateDescription"]["updatedFields"] == {"n": 2}


def test_watch_is_quick_to_see_writes(watch_client, db):
    wc = watch_client(db.name, "c", 1, "--max-await-ms", "5000")
    wc.wait_ready()
    time.sleep(0.2)
    t0 = time.monotonic()
    db.c.insert_one({"_id": 1})
    wc.next_event()
    assert time.monotonic() - t0 < 3.0
    assert wc.finish() == 0


# ---- transactions, snapshot reads and large events through libmongoc ----

def run_txn_client(mongo_uri, db, *args, timeout=60):
    """Runs txn_client to completion: (exit status, stdout lines)."""
    binary = find_binary("tests/integration/clients/txn_client")
    proc = ManagedProcess([binary, mongo_uri, db.name, "c"] + list(args), LOG_DIR, "txn_client")
    try:
        rc = proc.proc.wait(timeout)
    finally:
        proc.stop()
    report = proc.sanitizer_report()
    assert not report, report
    return rc, list(proc.lines)


def test_libmongoc_transactions_and_their_events(watch_client, mongo_uri, db):
    wc = watch_client(db.name, "c", 7)
    wc.wait_ready()
    rc, lines = run_txn_client(mongo_uri, db, "commit", "3")
    assert rc == 0, lines
    assert lines[1:] == ["COMMITTED 1", "COMMITTED 2", "COMMITTED 3"]
    lsid = json_util.loads(lines[0][len("LSID "):])["id"]
    db.c.insert_one({"_id": "after"})
    evs = [wc.next_event() for _ in range(7)]
    assert wc.finish() == 0
    txns = [evs[k:k + 2] for k in (0, 2, 4)]
    for n, pair in enumerate(txns, start=1):
        assert [e["documentKey"]["_id"] for e in pair] == ["t%d-a" % n, "t%d-b" % n]
        for e in pair:
            assert e["txnNumber"] == pair[0]["txnNumber"]
            assert e["lsid"]["id"] == lsid
            assert e["clusterTime"] == pair[0]["clusterTime"]
        assert pair[0]["_id"]["_data"] < pair[1]["_id"]["_data"]
    assert [p[0]["txnNumber"] for p in txns] == sorted({p[0]["txnNumber"] for p in txns})
    assert "txnNumber" not in evs[6]


def test_libmongoc_abort_leaves_nothing(watch_client, mongo_uri, db):
    wc = watch_client(db.name, "c", 1)
    wc.wait_ready()
    rc, lines = run_txn_client(mongo_uri, db, "abort")
    assert rc == 0 and lines == ["ABORTED"], lines
    db.c.insert_one({"_id": "marker"})
    assert wc.next_event()["documentKey"] == {"_id": "marker"}
    assert wc.finish() == 0
    assert db.c.count_documents({}) == 1


def test_libmongoc_write_conflict_is_transient(mongo_uri, db):
    db.c.insert_one({"_id": "x", "n": 0})
    rc, lines = run_txn_client(mongo_uri, db, "conflict")
    assert rc == 0, lines
    assert lines == ["CONFLICT code=112 transient=1", "COMMITTED 1", "COMMITTED 2"]
    assert db.c.find_one({"_id": "x"}) == {"_id": "x", "n": 2, "by": "b"}


def test_libmongoc_snapshot_read(mongo_uri, db):
    db.c.insert_many([{"_id": i} for i in range(3)])
    written = db.command("ping")["operationTime"]
    rc, lines = run_txn_client(mongo_uri, db, "snapshot")
    assert rc == 0, lines
    assert lines[0].startswith("SNAPSHOT n=3 atClusterTime="), lines
    at = json.loads(lines[0].split("atClusterTime=", 1)[1])
    assert Timestamp(at["t"], at["i"]) >= written


def test_libmongoc_split_large_event(watch_client, client, db):
    version = tuple(client.server_info()["versionArray"][:3])
    if "mongo-emulator" not in client.server_info().get("gitVersion", "") and \
            version < (6, 0, 9):
        pytest.skip("$changeStreamSplitLargeEvent needs MongoDB 6.0.9 or later")
    db.c.insert_one({"_id": 1, "pad": "a" * (9 * 1024 * 1024)})
    wc = watch_client(db.name, "c", 3, "--full-document", "updateLookup", "--pipeline",
                      json.dumps([{"$changeStreamSplitLargeEvent": {}}]))
    wc.wait_ready()
    db.c.update_one({"_id": 1}, {"$set": {"pad": "b" * (9 * 1024 * 1024)}})
    db.c.insert_one({"_id": 2})
    first, second, after = [wc.next_event(timeout=60) for _ in range(3)]
    assert wc.finish() == 0
    assert first["splitEvent"] == {"fragment": 1, "of": 2}
    assert second["splitEvent"] == {"fragment": 2, "of": 2}
    merged = dict(first)
    merged.update(second)
    assert merged["fullDocument"]["pad"] == "b" * (9 * 1024 * 1024)
    assert merged["updateDescription"]["updatedFields"]["pad"] == "b" * (9 * 1024 * 1024)
    assert after["documentKey"] == {"_id": 2}
    # the token libmongoc keeps after the batch is the next event's, past both fragments
    token = json_util.loads(wc.rest()[0][len("TOKEN "):])
    assert token == after["_id"]
