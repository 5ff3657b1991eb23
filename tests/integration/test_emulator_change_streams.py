"""Change-stream fidelity of mongo-emulator, measured with pymongo 3.11 against MongoDB 6.0/7.0
documented behaviour: event shapes, resume, invalidate, errors, pre-/post-images, pipelines.
Everything here except the tests marked emulator_only also runs against a real replica set."""

import datetime
import re
import time

import pytest
from bson import SON, Timestamp
from pymongo.errors import OperationFailure

from conftest import CommandRecorder

HEX_RE = re.compile(r"^[0-9A-Fa-f]+$")
AWAIT_MS = 300  # getMore wait used by tests; small so that "no more events" checks are quick


# ---- helpers ----

def next_change(stream, timeout=10.0):
    """The next change of a pymongo ChangeStream, failing the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not stream.alive:
            pytest.fail("change stream closed while waiting for an event")
        doc = stream.try_next()
        if doc is not None:
            return doc
    pytest.fail("no change event within %.0fs" % timeout)


def changes(stream, n, timeout=10.0):
    return [next_change(stream, timeout) for _ in range(n)]


def assert_no_more(stream, getmores=2):
    """A few getMores return nothing (no duplicate or stray event)."""
    for _ in range(getmores):
        doc = stream.try_next()
        assert doc is None, "unexpected extra event: %r" % (doc,)


def assert_token(tok):
    assert isinstance(tok, dict), tok
    assert isinstance(tok.get("_data"), str) and HEX_RE.match(tok["_data"]), tok
    assert set(tok) <= {"_data", "_typeBits"}, tok


def assert_common(ev, op, keys):
    assert ev["operationType"] == op
    assert set(ev.keys()) == set(keys), "%s event keys %s, expected %s" % (
        op, sorted(ev.keys()), sorted(keys))
    assert_token(ev["_id"])
    assert isinstance(ev["clusterTime"], Timestamp)
    assert isinstance(ev["wallTime"], datetime.datetime)
    # wallTime is the server's wall clock at the write: close to ours
    wall = ev["wallTime"]
    now = datetime.datetime.utcnow()
    assert abs((now - wall).total_seconds()) < 120, (now, wall)


INSERT_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "fullDocument", "ns",
               "documentKey"}
UPDATE_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "ns", "documentKey",
               "updateDescription"}
REPLACE_KEYS = INSERT_KEYS
DELETE_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "ns", "documentKey"}
DROP_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "ns"}
RENAME_KEYS = DROP_KEYS | {"to"}
INVALIDATE_KEYS = {"_id", "operationType", "clusterTime", "wallTime"}


class RawStream:
    """A change stream driven with raw aggregate/getMore commands in one explicit session, for
    options pymongo 3.11's watch() cannot send (fullDocumentBeforeChange)."""

    def __init__(self, client, db_name, coll, spec, pipeline=(), await_ms=AWAIT_MS):
        self.session = client.start_session()
        self.db = client[db_name]
        self.await_ms = await_ms
        reply = self.db.command("aggregate", coll if coll else 1,
                                pipeline=[{"$changeStream": spec}] + list(pipeline),
                                cursor={}, session=self.session)
        cur = reply["cursor"]
        self.id = cur["id"]
        self.coll = cur["ns"].split(".", 1)[1]
        self.buf = list(cur["firstBatch"])
        self.pbrt = cur.get("postBatchResumeToken")

    def next(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.buf:
            if not self.id:
                pytest.fail("raw change stream cursor closed")
            if time.monotonic() > deadline:
                pytest.fail("no change event within %.0fs" % timeout)
            self.get_more()
        return self.buf.pop(0)

    def get_more(self):
        reply = self.db.command("getMore", self.id, collection=self.coll,
                                maxTimeMS=self.await_ms, session=self.session)
        cur = reply["cursor"]
        self.id = cur["id"]
        self.buf.extend(cur["nextBatch"])
        self.pbrt = cur.get("postBatchResumeToken")
        return cur["nextBatch"]

    def close(self):
        try:
            if self.id:
                self.db.command("killCursors", self.coll, cursors=[self.id],
                                session=self.session)
        finally:
            self.session.end_session()


@pytest.fixture
def raw_streams():
    opened = []
    yield opened
    for s in opened:
        try:
            s.close()
        except Exception:
            pass


def fail_point(client, **spec):
    """configureFailPoint; skips the test when the server has no test commands."""
    cmd = SON([("configureFailPoint", spec.pop("name", "failCommand"))])
    cmd.update(spec)
    try:
        return client.admin.command(cmd)
    except OperationFailure as exc:
        if exc.code == 59:
            pytest.skip("server does not support configureFailPoint (enableTestCommands)")
        raise


@pytest.fixture
def fail_points(client):
    """Records fail point names configured by the test and switches them off at teardown."""
    names = []
    yield names
    for n in names:
        try:
            client.admin.command(SON([("configureFailPoint", n), ("mode", "off")]))
        except Exception:
            pass


# ---- event shapes ----

def test_insert_event_shape(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_one({"_id": 1, "a": {"b": [1, 2]}})
        ev = next_change(s)
    assert_common(ev, "insert", INSERT_KEYS)
    assert ev["ns"] == {"db": db.name, "coll": "c"}
    assert ev["documentKey"] == {"_id": 1}
    assert ev["fullDocument"] == {"_id": 1, "a": {"b": [1, 2]}}
    assert list(ev.keys())[0] == "_id"


def test_generated_objectid_is_in_document_key(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        oid = db.c.insert_one({"v": 1}).inserted_id
        ev = next_change(s)
    assert ev["documentKey"] == {"_id": oid}
    assert ev["fullDocument"] == {"_id": oid, "v": 1}


def test_update_event_shape_set_unset_inc(db):
    db.c.insert_one({"_id": 1, "a": 1, "b": 2, "n": 5, "sub": {"x": 1}})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.update_one({"_id": 1}, {"$set": {"a": 10, "sub.y": "new"}, "$unset": {"b": ""},
                                     "$inc": {"n": 2}})
        ev = next_change(s)
    assert_common(ev, "update", UPDATE_KEYS)
    assert ev["ns"] == {"db": db.name, "coll": "c"}
    assert ev["documentKey"] == {"_id": 1}
    ud = ev["updateDescription"]
    assert set(ud) == {"updatedFields", "removedFields", "truncatedArrays"}
    assert ud["updatedFields"] == {"a": 10, "sub.y": "new", "n": 7}
    assert ud["removedFields"] == ["b"]
    assert ud["truncatedArrays"] == []


def test_update_event_array_truncation_and_push(db):
    db.c.insert_one({"_id": 1, "array": ["foo", {"a": "bar"}, 1, 2, 3], "tags": ["x", "y"]})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.update_one({"_id": 1}, [{"$set": {"array": ["foo", {"a": "bar"}]}}])
        db.c.update_one({"_id": 1}, {"$push": {"tags": "z"}})
        trunc, push = changes(s, 2)
    assert trunc["updateDescription"] == {"updatedFields": {}, "removedFields": [],
                                          "truncatedArrays": [{"field": "array", "newSize": 2}]}
    assert type(trunc["updateDescription"]["truncatedArrays"][0]["newSize"]) is int
    # an appended element is reported under its array index, not as a whole-array rewrite
    assert push["updateDescription"]["updatedFields"] == {"tags.2": "z"}
    assert push["updateDescription"]["removedFields"] == []


def test_update_lookup_full_document(db):
    db.c.insert_one({"_id": 1, "v": 1})
    with db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as s:
        db.c.update_one({"_id": 1}, {"$set": {"v": 2}})
        ev = next_change(s)
    assert ev["fullDocument"] == {"_id": 1, "v": 2}
    assert_common(ev, "update", UPDATE_KEYS | {"fullDocument"})


def test_update_lookup_of_deleted_document_is_null(db):
    db.c.insert_one({"_id": 1, "v": 1})
    with db.c.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as s:
        db.c.update_one({"_id": 1}, {"$set": {"v": 2}})
        db.c.delete_one({"_id": 1})
        upd, dele = changes(s, 2)
    assert "fullDocument" in upd and upd["fullDocument"] is None
    assert dele["operationType"] == "delete" and "fullDocument" not in dele


def test_replace_and_delete_event_shapes(db):
    db.c.insert_one({"_id": "k", "a": 1})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.replace_one({"_id": "k"}, {"b": 2})
        db.c.delete_one({"_id": "k"})
        rep, dele = changes(s, 2)
    assert_common(rep, "replace", REPLACE_KEYS)
    assert rep["fullDocument"] == {"_id": "k", "b": 2}
    assert rep["documentKey"] == {"_id": "k"}
    assert_common(dele, "delete", DELETE_KEYS)
    assert dele["documentKey"] == {"_id": "k"}
    assert dele["ns"] == {"db": db.name, "coll": "c"}


def test_events_ordered_with_increasing_cluster_time(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        for i in range(5):
            db.c.insert_one({"_id": i})
        db.c.update_many({}, {"$set": {"u": 1}})
        db.c.delete_many({"_id": {"$lt": 2}})
        evs = changes(s, 12)
        assert_no_more(s, 1)
    assert [e["operationType"] for e in evs] == ["insert"] * 5 + ["update"] * 5 + ["delete"] * 2
    assert [e["documentKey"]["_id"] for e in evs[:5]] == list(range(5))
    times = [e["clusterTime"] for e in evs]
    assert times == sorted(times)
    assert times[0] < times[4]  # separate writes get separate cluster times
    assert len({e["_id"]["_data"] for e in evs}) == 12


def test_drop_then_invalidate_collection_stream(db):
    db.c.insert_one({"_id": 1})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    db.drop_collection("c")
    drop = next_change(s)
    inval = next_change(s)
    assert_common(drop, "drop", DROP_KEYS)
    assert drop["ns"] == {"db": db.name, "coll": "c"}
    assert_common(inval, "invalidate", INVALIDATE_KEYS)
    assert inval["clusterTime"] == drop["clusterTime"]
    assert inval["_id"] != drop["_id"]
    # the server closed the cursor (id 0): the stream is no longer alive
    assert not s.alive
    s.close()


def test_rename_then_invalidate(db):
    db.c.insert_one({"_id": 1})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    db.c.rename("c2")
    ren = next_change(s)
    inval = next_change(s)
    assert_common(ren, "rename", RENAME_KEYS)
    assert ren["ns"] == {"db": db.name, "coll": "c"}
    assert ren["to"] == {"db": db.name, "coll": "c2"}
    assert_common(inval, "invalidate", INVALIDATE_KEYS)
    assert not s.alive
    s.close()


def test_drop_database_invalidates_collection_stream(db, client):
    db.c.insert_one({"_id": 1})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    client.drop_database(db.name)
    drop = next_change(s)
    inval = next_change(s)
    assert (drop["operationType"], drop["ns"]) == ("drop", {"db": db.name, "coll": "c"})
    assert inval["operationType"] == "invalidate"
    assert not s.alive
    s.close()


def test_rename_onto_watched_collection_invalidates(db):
    db.c.insert_one({"_id": 1})
    db.src.insert_one({"_id": 2})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    db.src.rename("c", dropTarget=True)
    evs = []
    while s.alive and len(evs) < 5:
        ev = s.try_next()
        if ev is not None:
            evs.append(ev)
    assert evs[-1]["operationType"] == "invalidate", [e["operationType"] for e in evs]
    s.close()


def test_batch_size_and_pbrt_of_each_batch(db, make_client):
    rec = CommandRecorder()
    watcher = make_client(event_listeners=[rec.listener])
    with watcher[db.name].c.watch(batch_size=2, max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_many([{"_id": i} for i in range(5)])
        evs = changes(s, 5)
        tok = s.resume_token
    assert [e["documentKey"]["_id"] for e in evs] == list(range(5))
    assert tok == evs[-1]["_id"]
    batches = [e.reply["cursor"] for e in rec.succeeded if e.command_name == "getMore"]
    nonempty = [b for b in batches if b["nextBatch"]]
    assert [len(b["nextBatch"]) for b in nonempty] == [2, 2, 1]
    for b in nonempty:
        # the cached resume token comes from the PBRT: it must be the batch's last event
        assert b["postBatchResumeToken"] == b["nextBatch"][-1]["_id"]
    getmores = rec.commands("getMore")
    assert all(g.get("batchSize") == 2 for g in getmores)


def test_database_stream(db, client, db_names):
    other = client[db_names("other")]
    db.a.insert_one({"_id": 0})  # create before watching so the drop below is a plain drop
    with db.watch(max_await_time_ms=AWAIT_MS) as s:
        db.a.insert_one({"_id": 1})
        other.a.insert_one({"_id": "elsewhere"})
        db.b.insert_one({"_id": 2})
        db.drop_collection("a")
        db.b.insert_one({"_id": 3})
        evs = changes(s, 4)
        assert_no_more(s, 1)
        assert s.alive  # dropping one collection does not invalidate a database stream
    assert [(e["operationType"], e["ns"]) for e in evs] == [
        ("insert", {"db": db.name, "coll": "a"}),
        ("insert", {"db": db.name, "coll": "b"}),
        ("drop", {"db": db.name, "coll": "a"}),
        ("insert", {"db": db.name, "coll": "b"}),
    ]


def test_database_stream_drop_database_invalidates(db, client):
    db.a.insert_one({})
    db.b.insert_one({})
    s = db.watch(max_await_time_ms=AWAIT_MS)
    client.drop_database(db.name)
    evs = []
    while s.alive:
        ev = s.try_next()
        if ev is not None:
            evs.append(ev)
        assert len(evs) <= 10
    ops = [e["operationType"] for e in evs]
    assert ops == ["drop", "drop", "dropDatabase", "invalidate"], ops
    assert {e["ns"]["coll"] for e in evs[:2]} == {"a", "b"}
    assert_common(evs[2], "dropDatabase", DROP_KEYS)
    assert evs[2]["ns"] == {"db": db.name}
    assert_common(evs[3], "invalidate", INVALIDATE_KEYS)
    s.close()


def test_cluster_stream(client, db, db_names):
    other = client[db_names("other")]
    mine = [db.name, other.name]
    # filter to this test's databases: a real server's cluster stream sees everyone's writes
    pipeline = [{"$match": {"ns.db": {"$in": mine}}}]
    with client.watch(pipeline, max_await_time_ms=AWAIT_MS) as s:
        db.x.insert_one({"_id": 1})
        other.y.insert_one({"_id": 2})
        client.drop_database(other.name)
        db.x.insert_one({"_id": 3})
        evs = changes(s, 5)
        assert s.alive  # a cluster stream is never invalidated
    assert [(e["operationType"], e["ns"]) for e in evs] == [
        ("insert", {"db": db.name, "coll": "x"}),
        ("insert", {"db": other.name, "coll": "y"}),
        ("drop", {"db": other.name, "coll": "y"}),
        ("dropDatabase", {"db": other.name}),
        ("insert", {"db": db.name, "coll": "x"}),
    ]


def test_cursor_namespaces_and_pbrt(db, client):
    """The aggregate reply: ns per stream level, non-zero Int64 id, PBRT, operationTime."""
    from bson import Int64
    with client.start_session() as sess:
        r = db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={},
                       session=sess)
        assert r["cursor"]["ns"] == "%s.c" % db.name
        assert isinstance(r["cursor"]["id"], Int64) and r["cursor"]["id"] != 0
        assert r["cursor"]["firstBatch"] == []
        assert_token(r["cursor"]["postBatchResumeToken"])
        assert isinstance(r["operationTime"], Timestamp)
        db.command("killCursors", "c", cursors=[r["cursor"]["id"]], session=sess)
        r = db.command("aggregate", 1, pipeline=[{"$changeStream": {}}], cursor={},
                       session=sess)
        assert r["cursor"]["ns"] == "%s.$cmd.aggregate" % db.name
        db.command("killCursors", "$cmd.aggregate", cursors=[r["cursor"]["id"]], session=sess)
        r = client.admin.command("aggregate", 1, pipeline=[{"$changeStream": {
            "allChangesForCluster": True}}], cursor={}, session=sess)
        assert r["cursor"]["ns"] == "admin.$cmd.aggregate"
        client.admin.command("killCursors", "$cmd.aggregate", cursors=[r["cursor"]["id"]],
                             session=sess)


def test_stream_does_not_return_earlier_writes(db):
    db.c.insert_many([{"_id": i} for i in range(3)])
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_one({"_id": "after"})
        ev = next_change(s)
        assert ev["documentKey"] == {"_id": "after"}
        assert_no_more(s, 1)


# ---- resume ----

def test_resume_after_client_restart_no_loss_no_duplicate(make_client, db_name):
    writer = make_client()[db_name].c
    c1 = make_client()
    s = c1[db_name].c.watch(max_await_time_ms=AWAIT_MS)
    writer.insert_many([{"v": "a%d" % i} for i in range(3)])
    first = changes(s, 3)
    token = s.resume_token
    assert_token(token)
    s.close()
    c1.close()
    writer.insert_many([{"v": "b%d" % i} for i in range(3)])
    c2 = make_client()
    with c2[db_name].c.watch(resume_after=token, max_await_time_ms=AWAIT_MS) as s2:
        got = changes(s2, 3)
        assert_no_more(s2, 2)
    assert [e["fullDocument"]["v"] for e in first] == ["a0", "a1", "a2"]
    assert [e["fullDocument"]["v"] for e in got] == ["b0", "b1", "b2"]


def test_resume_after_a_middle_event_and_start_at_operation_time(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_many([{"_id": i} for i in range(4)])
        evs = changes(s, 4)
    with db.c.watch(resume_after=evs[1]["_id"], max_await_time_ms=AWAIT_MS) as s:
        assert [e["documentKey"]["_id"] for e in changes(s, 2)] == [2, 3]
        assert_no_more(s, 1)
    with db.c.watch(start_at_operation_time=evs[2]["clusterTime"],
                    max_await_time_ms=AWAIT_MS) as s:
        # startAtOperationTime is inclusive
        assert [e["documentKey"]["_id"] for e in changes(s, 2)] == [2, 3]
        assert_no_more(s, 1)


def test_empty_batch_pbrt_advances_and_resumes(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        assert s.try_next() is None
        t0 = s.resume_token
        db.other.insert_one({"_id": "unrelated"})
        assert s.try_next() is None
        t1 = s.resume_token
        assert_token(t1)
        assert t1 != t0, "the high-water-mark token did not advance past an unrelated write"
        assert t1["_data"] > t0["_data"]
    db.c.insert_one({"_id": "mine"})
    with db.c.watch(resume_after=t1, max_await_time_ms=AWAIT_MS) as s:
        assert next_change(s)["documentKey"] == {"_id": "mine"}
        assert_no_more(s, 1)


def test_start_after_invalidate_continues_with_recreated_collection(db):
    db.c.insert_one({"_id": "old"})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    db.drop_collection("c")
    assert next_change(s)["operationType"] == "drop"
    inval = next_change(s)
    assert inval["operationType"] == "invalidate"
    s.close()
    db.c.insert_one({"_id": "new"})
    with db.c.watch(start_after=inval["_id"], max_await_time_ms=AWAIT_MS) as s2:
        ev = next_change(s2)
        assert ev["operationType"] == "insert"
        assert ev["documentKey"] == {"_id": "new"}
        assert ev["ns"] == {"db": db.name, "coll": "c"}
        assert_no_more(s2, 1)


def test_resume_after_invalidate_token_is_260(db):
    db.c.insert_one({})
    s = db.c.watch(max_await_time_ms=AWAIT_MS)
    db.drop_collection("c")
    next_change(s)
    inval = next_change(s)
    s.close()
    with pytest.raises(OperationFailure) as ei:
        db.c.watch(resume_after=inval["_id"])
    assert ei.value.code == 260
    assert not ei.value.has_error_label("ResumableChangeStreamError")


@pytest.mark.emulator_only
def test_truncated_history_is_286(fresh_emulator, make_client, db_name):
    client = make_client(fresh_emulator.uri)
    coll = client[db_name].c
    with coll.watch(max_await_time_ms=AWAIT_MS) as s:
        coll.insert_many([{"_id": i} for i in range(6)])
        evs = changes(s, 6)
    client.admin.command(SON([("emulatorTruncateOplog", 1), ("keepLast", 2)]))
    with pytest.raises(OperationFailure) as ei:
        coll.watch(resume_after=evs[0]["_id"])
    assert ei.value.code == 286
    assert ei.value.has_error_label("NonResumableChangeStreamError")
    assert not ei.value.has_error_label("ResumableChangeStreamError")
    with pytest.raises(OperationFailure) as ei:
        coll.watch(start_at_operation_time=evs[0]["clusterTime"])
    assert ei.value.code == 286
    # a token whose successors are all still retained resumes normally
    with coll.watch(resume_after=evs[4]["_id"], max_await_time_ms=AWAIT_MS) as s:
        assert next_change(s)["documentKey"] == {"_id": 5}
        assert_no_more(s, 1)


def test_fail_command_close_connection_on_getmore_resumes_once(db_name, make_client, client,
                                                               fail_points):
    rec = CommandRecorder()
    watcher = make_client(event_listeners=[rec.listener])
    coll = client[db_name].c
    s = watcher[db_name].c.watch(max_await_time_ms=AWAIT_MS)
    coll.insert_many([{"_id": 0}, {"_id": 1}])
    got = changes(s, 2)
    fail_points.append("failCommand")
    fail_point(client, mode={"times": 1},
               data={"failCommands": ["getMore"], "closeConnection": True})
    coll.insert_many([{"_id": i} for i in range(2, 5)])
    got += changes(s, 3, timeout=20)
    assert_no_more(s, 1)
    s.close()
    assert [e["documentKey"]["_id"] for e in got] == list(range(5))
    aggs = rec.commands("aggregate")
    assert len(aggs) == 2, "the driver did not resume (fail point not applied?)"
    resumed = aggs[1]["pipeline"][0]["$changeStream"]
    assert resumed.get("resumeAfter") == got[1]["_id"]
    assert [e.command_name for e in rec.failed] == ["getMore"]


def test_fail_command_error_code_without_label_is_not_resumed(db_name, make_client, client,
                                                              fail_points):
    watcher = make_client()
    s = watcher[db_name].c.watch(max_await_time_ms=AWAIT_MS)
    fail_points.append("failCommand")
    fail_point(client, mode={"times": 1}, data={"failCommands": ["getMore"], "errorCode": 6})
    client[db_name].c.insert_one({})
    with pytest.raises(OperationFailure) as ei:
        next_change(s)
    assert ei.value.code == 6
    assert ei.value.details.get("errmsg")
    assert not ei.value.has_error_label("ResumableChangeStreamError")
    s.close()


def test_fail_get_more_after_checkout_gets_server_labels(db_name, make_client, client,
                                                         fail_points):
    rec = CommandRecorder()
    watcher = make_client(event_listeners=[rec.listener])
    s = watcher[db_name].c.watch(max_await_time_ms=AWAIT_MS)
    fail_points.append("failGetMoreAfterCursorCheckout")
    fail_point(client, name="failGetMoreAfterCursorCheckout", mode={"times": 1},
               data={"errorCode": 91})
    client[db_name].c.insert_one({"_id": "x"})
    assert next_change(s)["documentKey"] == {"_id": "x"}
    s.close()
    failed = [e for e in rec.failed if e.command_name == "getMore"]
    assert len(failed) == 1
    assert failed[0].failure["code"] == 91
    assert "ResumableChangeStreamError" in failed[0].failure.get("errorLabels", [])
    assert len(rec.commands("aggregate")) == 2


# ---- pre- and post-images ----

def _images_spec(before, after="whenAvailable"):
    spec = SON()
    if after:
        spec["fullDocument"] = after
    if before:
        spec["fullDocumentBeforeChange"] = before
    return spec


def test_pre_and_post_images_enabled(client, db, raw_streams):
    db.command("create", "img", changeStreamPreAndPostImages={"enabled": True})
    db.img.insert_one({"_id": 1, "v": 1})
    s = RawStream(client, db.name, "img", _images_spec("whenAvailable"))
    raw_streams.append(s)
    db.img.update_one({"_id": 1}, {"$set": {"v": 2}})
    db.img.replace_one({"_id": 1}, {"w": 3})
    db.img.update_one({"_id": 1}, {"$inc": {"w": 1}})
    db.img.delete_one({"_id": 1})
    db.img.insert_one({"_id": 2})
    upd, rep, upd2, dele, ins = [s.next() for _ in range(5)]
    # each pre-image is the document as it was before *that* write, though later writes
    # changed it before the events were read
    assert upd["operationType"] == "update"
    assert upd["fullDocumentBeforeChange"] == {"_id": 1, "v": 1}
    assert upd["fullDocument"] == {"_id": 1, "v": 2}
    assert rep["operationType"] == "replace"
    assert rep["fullDocumentBeforeChange"] == {"_id": 1, "v": 2}
    assert rep["fullDocument"] == {"_id": 1, "w": 3}
    assert upd2["fullDocumentBeforeChange"] == {"_id": 1, "w": 3}
    assert upd2["fullDocument"] == {"_id": 1, "w": 4}
    assert dele["operationType"] == "delete"
    assert dele["fullDocumentBeforeChange"] == {"_id": 1, "w": 4}
    assert "fullDocument" not in dele
    assert ins["operationType"] == "insert" and "fullDocumentBeforeChange" not in ins
    assert ins["fullDocument"] == {"_id": 2}


def test_images_enabled_by_collmod(client, db, raw_streams):
    db.img.insert_one({"_id": 1, "v": 1})
    db.command("collMod", "img", changeStreamPreAndPostImages={"enabled": True})
    s = RawStream(client, db.name, "img", _images_spec("required", "required"))
    raw_streams.append(s)
    db.img.update_one({"_id": 1}, {"$set": {"v": 2}})
    ev = s.next()
    assert ev["fullDocumentBeforeChange"] == {"_id": 1, "v": 1}
    assert ev["fullDocument"] == {"_id": 1, "v": 2}


def test_images_when_available_without_images_are_null(client, db, raw_streams):
    db.plain.insert_one({"_id": 1, "v": 1})
    s = RawStream(client, db.name, "plain", _images_spec("whenAvailable"))
    raw_streams.append(s)
    db.plain.update_one({"_id": 1}, {"$set": {"v": 2}})
    db.plain.delete_one({"_id": 1})
    upd, dele = s.next(), s.next()
    assert "fullDocument" in upd and upd["fullDocument"] is None
    assert "fullDocumentBeforeChange" in upd and upd["fullDocumentBeforeChange"] is None
    assert "fullDocumentBeforeChange" in dele and dele["fullDocumentBeforeChange"] is None


def test_images_off_means_field_absent(client, db, raw_streams):
    db.command("create", "img", changeStreamPreAndPostImages={"enabled": True})
    db.img.insert_one({"_id": 1, "v": 1})
    s = RawStream(client, db.name, "img", _images_spec("off", None))
    raw_streams.append(s)
    db.img.update_one({"_id": 1}, {"$set": {"v": 2}})
    ev = s.next()
    assert "fullDocumentBeforeChange" not in ev and "fullDocument" not in ev


def test_pre_image_required_without_images_is_47(client, db, raw_streams):
    db.plain.insert_one({"_id": 1, "v": 1})
    # opening the stream succeeds; the first event lacking an image fails the getMore
    s = RawStream(client, db.name, "plain", _images_spec("required", None))
    raw_streams.append(s)
    db.plain.update_one({"_id": 1}, {"$set": {"v": 2}})
    with pytest.raises(OperationFailure) as ei:
        s.next()
    assert ei.value.code == 47
    assert not ei.value.has_error_label("ResumableChangeStreamError")


def test_post_image_required_without_images_is_47(db):
    db.plain.insert_one({"_id": 1, "v": 1})
    with db.plain.watch(full_document="required", max_await_time_ms=AWAIT_MS) as s:
        db.plain.update_one({"_id": 1}, {"$set": {"v": 2}})
        with pytest.raises(OperationFailure) as ei:
            next_change(s)
    assert ei.value.code == 47


# ---- pipelines ----

def test_match_after_change_stream(db):
    pipeline = [{"$match": {"operationType": "insert", "fullDocument.k": {"$in": [1, 3]}}}]
    with db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as s:
        for k in range(1, 5):
            db.c.insert_one({"_id": k, "k": k})
        db.c.update_one({"_id": 1}, {"$set": {"k": 3}})
        evs = changes(s, 2)
        assert_no_more(s, 1)
    assert [e["fullDocument"]["k"] for e in evs] == [1, 3]


def test_match_on_update_description(db):
    db.c.insert_many([{"_id": 1}, {"_id": 2}])
    pipeline = [{"$match": {"updateDescription.updatedFields.status": "done"}}]
    with db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as s:
        db.c.update_one({"_id": 1}, {"$set": {"status": "open"}})
        db.c.update_one({"_id": 2}, {"$set": {"status": "done"}})
        ev = next_change(s)
        assert_no_more(s, 1)
    assert ev["documentKey"] == {"_id": 2}


def test_project_keeping_id(db):
    pipeline = [{"$project": {"operationType": 1, "fullDocument.k": 1}}]
    with db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_one({"_id": 1, "k": "v", "other": 2})
        ev = next_change(s)
    assert set(ev) == {"_id", "operationType", "fullDocument"}
    assert ev["fullDocument"] == {"k": "v"}
    assert_token(ev["_id"])


def test_project_removing_id_is_280(db):
    with db.c.watch([{"$project": {"_id": 0}}], max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as ei:
            next_change(s)
    assert ei.value.code == 280
    assert ei.value.has_error_label("NonResumableChangeStreamError")


@pytest.mark.parametrize("pipeline,code", [
    ([{"$changeStream": {}}, {"$frobnicate": {}}], 40324),
    ([{"$match": {}}, {"$changeStream": {}}], 40602),
    ([{"$changeStream": {"noSuchOption": 1}}], 40415),
    ([{"$changeStream": {"fullDocument": "sometimes"}}], 2),
    ([{"$changeStream": {"resumeAfter": {"_data": "zz"}}}], 9),
    ([{"$changeStream": {"resumeAfter": {"_data": 12}}}], 40647),
])
def test_change_stream_aggregate_validation(db, pipeline, code):
    db.c.insert_one({})
    with pytest.raises(OperationFailure) as ei:
        db.command("aggregate", "c", pipeline=pipeline, cursor={})
    assert ei.value.code == code


def test_resume_after_and_start_after_together_is_50865(db):
    with db.c.watch(max_await_time_ms=AWAIT_MS) as s:
        db.c.insert_one({})
        tok = next_change(s)["_id"]
    with pytest.raises(OperationFailure) as ei:
        db.command("aggregate", "c", pipeline=[{"$changeStream": {"resumeAfter": tok,
                                                                  "startAfter": tok}}],
                   cursor={})
    assert ei.value.code == 50865


@pytest.mark.emulator_only
def test_standalone_refuses_change_streams_40573(standalone_emulator, make_client):
    c = make_client(standalone_emulator.uri)
    c.t.c.insert_one({"ok": 1})  # CRUD works on a standalone
    with pytest.raises(OperationFailure) as ei:
        c.t.c.watch()
    assert ei.value.code == 40573


def test_getmore_on_killed_change_stream_cursor_is_43(db, client):
    with client.start_session() as sess:
        r = db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={},
                       session=sess)
        cid = r["cursor"]["id"]
        k = db.command("killCursors", "c", cursors=[cid], session=sess)
        assert list(k["cursorsKilled"]) == [cid]
        with pytest.raises(OperationFailure) as ei:
            db.command("getMore", cid, collection="c", session=sess)
        assert ei.value.code == 43


def test_wait_for_event_wakes_waiting_getmore(db, make_client):
    """A getMore waiting with maxAwaitTimeMS returns as soon as a write arrives."""
    import threading
    writer = make_client()[db.name].c
    with db.c.watch(max_await_time_ms=5000) as s:
        t = threading.Timer(0.3, lambda: writer.insert_one({"_id": "w"}))
        t.start()
        start = time.monotonic()
        ev = s.try_next()
        elapsed = time.monotonic() - start
        t.join()
    assert ev is not None and ev["documentKey"] == {"_id": "w"}
    assert elapsed < 3.0, "getMore did not wake up on the write (took %.2fs)" % elapsed


def test_empty_getmore_waits_about_max_await_time(db):
    with db.c.watch(max_await_time_ms=600) as s:
        start = time.monotonic()
        assert s.try_next() is None
        elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 3.0, elapsed
