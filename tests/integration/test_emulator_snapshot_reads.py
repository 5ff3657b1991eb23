"""Snapshot reads in mongo-emulator (readConcern {level: "snapshot"}, with or without
atClusterTime, outside transactions) measured with pymongo 3.11 against MongoDB 6.0's
behaviour: the data as of the cluster time, atClusterTime in the replies, getMore on the same
snapshot, SnapshotTooOld (239) beyond the history window, InvalidOptions (72) for a future time,
and the way a snapshot at T composes with a change stream (startAtOperationTime). Everything but
the tests marked emulator_only also runs against a real replica set (MONGODB_URI)."""

import threading
import time

import pytest
from bson import SON, Timestamp
from pymongo.errors import OperationFailure

from conftest import real_server_uri, start_emulator
from test_emulator_change_streams import AWAIT_MS, assert_no_more, next_change


def op_time(db):
    return db.command("ping")["operationTime"]


def snapshot_find(db, coll, at=None, **extra):
    rc = {"level": "snapshot"}
    if at is not None:
        rc["atClusterTime"] = at
    cmd = SON([("find", coll), ("readConcern", rc)])
    cmd.update(extra)
    return db.command(cmd)


def next_ts(ts):
    return Timestamp(ts.time, ts.inc + 1)


def all_docs(reply, db, coll):
    """Every document of a find/aggregate reply, following the cursor with getMore."""
    cur = reply["cursor"]
    docs = list(cur.get("firstBatch", []))
    cid = cur["id"]
    while cid:
        more = db.command("getMore", cid, collection=coll, batchSize=2)["cursor"]
        docs.extend(more["nextBatch"])
        cid = more["id"]
    return docs


def test_find_at_cluster_time_sees_the_past(db):
    db.c.insert_many([{"_id": i, "v": 0} for i in range(4)])
    t0 = op_time(db)
    db.c.update_one({"_id": 1}, {"$set": {"v": 1}})
    db.c.delete_one({"_id": 2})
    db.c.insert_one({"_id": 9, "v": 9})
    db.c.replace_one({"_id": 3}, {"w": 3})
    r = snapshot_find(db, "c", t0)
    assert r["cursor"]["atClusterTime"] == t0
    assert sorted(r["cursor"]["firstBatch"], key=lambda d: d["_id"]) == [
        {"_id": i, "v": 0} for i in range(4)]
    # by _id, with a filter, and now
    assert snapshot_find(db, "c", t0, filter={"_id": 2})["cursor"]["firstBatch"] == [
        {"_id": 2, "v": 0}]
    assert snapshot_find(db, "c", t0, filter={"_id": 9})["cursor"]["firstBatch"] == []
    assert snapshot_find(db, "c", t0, filter={"v": 0}, sort={"_id": -1},
                         limit=2)["cursor"]["firstBatch"] == [{"_id": 3, "v": 0},
                                                              {"_id": 2, "v": 0}]
    now = snapshot_find(db, "c")
    assert sorted(d["_id"] for d in now["cursor"]["firstBatch"]) == [0, 1, 3, 9]


def test_snapshot_without_at_cluster_time_reports_its_time(db):
    db.c.insert_one({"_id": 1})
    written = op_time(db)
    r = snapshot_find(db, "c")
    at = r["cursor"]["atClusterTime"]
    assert isinstance(at, Timestamp) and at >= written
    db.c.insert_one({"_id": 2})
    # the reported time names exactly the data that was read
    assert snapshot_find(db, "c", at)["cursor"]["firstBatch"] == [{"_id": 1}]
    # like mongod (SERVER-83472), a find that returns nothing does not say its time; an
    # aggregate does
    empty = snapshot_find(db, "c", filter={"_id": 99})
    assert empty["cursor"]["firstBatch"] == []
    if not real_server_uri():  # a later server may fix it
        assert "atClusterTime" not in empty["cursor"]
    r = db.command(SON([("aggregate", "c"), ("pipeline", [{"$match": {"_id": 99}}]),
                        ("cursor", {}), ("readConcern", {"level": "snapshot"})]))
    assert r["cursor"]["firstBatch"] == [] and isinstance(r["cursor"]["atClusterTime"],
                                                          Timestamp)


def test_each_version_of_a_document_at_its_time(db):
    times = []
    db.c.insert_one({"_id": 1, "v": 0})
    times.append(op_time(db))
    for v in range(1, 6):
        db.c.update_one({"_id": 1}, {"$set": {"v": v}})
        times.append(op_time(db))
    db.c.delete_one({"_id": 1})
    gone = op_time(db)
    for v, t in enumerate(times):
        assert snapshot_find(db, "c", t)["cursor"]["firstBatch"] == [{"_id": 1, "v": v}]
    assert snapshot_find(db, "c", gone)["cursor"]["firstBatch"] == []


def test_get_more_continues_at_the_same_snapshot(db):
    db.c.insert_many([{"_id": i} for i in range(7)])
    t0 = op_time(db)
    r = snapshot_find(db, "c", t0, batchSize=2)
    assert r["cursor"]["id"] != 0
    db.c.delete_many({})
    db.c.insert_many([{"_id": 100 + i} for i in range(3)])
    more = db.command("getMore", r["cursor"]["id"], collection="c", batchSize=3)["cursor"]
    assert more.get("atClusterTime", t0) == t0
    rest = all_docs({"cursor": {"firstBatch": more["nextBatch"], "id": more["id"]}}, db, "c")
    got = r["cursor"]["firstBatch"] + rest
    assert sorted(d["_id"] for d in got) == list(range(7))


def test_aggregate_and_distinct_at_cluster_time(db):
    db.c.insert_many([{"_id": i, "k": i % 3} for i in range(6)])
    t0 = op_time(db)
    db.c.update_many({}, {"$set": {"k": 7}})
    r = db.command(SON([("aggregate", "c"),
                        ("pipeline", [{"$match": {"k": {"$lt": 2}}},
                                      {"$group": {"_id": "$k", "n": {"$sum": 1}}},
                                      {"$sort": {"_id": 1}}]),
                        ("cursor", {}),
                        ("readConcern", {"level": "snapshot", "atClusterTime": t0})]))
    assert r["cursor"]["atClusterTime"] == t0
    assert r["cursor"]["firstBatch"] == [{"_id": 0, "n": 2}, {"_id": 1, "n": 2}]
    d = db.command(SON([("distinct", "c"), ("key", "k"),
                        ("readConcern", {"level": "snapshot", "atClusterTime": t0})]))
    assert sorted(d["values"]) == [0, 1, 2]
    assert d["atClusterTime"] == t0


def test_future_cluster_time_is_refused(db):
    db.c.insert_one({"_id": 1})
    now = op_time(db)
    with pytest.raises(OperationFailure) as exc:
        snapshot_find(db, "c", Timestamp(now.time + 3600, 1))
    assert exc.value.code == 72
    assert "must not be greater than the current clusterTime" in exc.value.details["errmsg"]


def test_read_concern_errors(db):
    db.c.insert_one({"_id": 1})
    now = op_time(db)
    with pytest.raises(OperationFailure) as exc:  # atClusterTime needs level snapshot
        db.command(SON([("find", "c"), ("readConcern", {"level": "majority",
                                                        "atClusterTime": now})]))
    assert exc.value.code == 72
    with pytest.raises(OperationFailure) as exc:
        db.command(SON([("find", "c"), ("readConcern", {"level": "snapshot",
                                                        "atClusterTime": now,
                                                        "afterClusterTime": now})]))
    assert exc.value.code == 72
    with pytest.raises(OperationFailure) as exc:
        db.command(SON([("find", "c"), ("readConcern", {"level": "bogus"})]))
    assert exc.value.code == 9
    with pytest.raises(OperationFailure) as exc:  # count has no snapshot reads
        db.command(SON([("count", "c"), ("readConcern", {"level": "snapshot"})]))
    assert exc.value.code == 72


def test_collection_created_after_the_snapshot(db):
    db.a.insert_one({"_id": 1})
    t0 = op_time(db)
    db.b.insert_one({"_id": 1})
    try:
        r = snapshot_find(db, "b", t0)
        # a server with point-in-time catalog reads answers with what existed: nothing
        assert real_server_uri() and r["cursor"]["firstBatch"] == []
    except OperationFailure as exc:
        assert exc.code == 246  # SnapshotUnavailable
        assert "Collection minimum is" in exc.details["errmsg"]


def test_snapshot_too_old_past_the_window(client, db):
    was = client.admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=1)["was"]
    try:
        db.c.insert_one({"_id": 1})
        t0 = op_time(db)
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.5)
            db.c.insert_one({})  # moves a real server's stable (and so oldest) timestamp
            try:
                snapshot_find(db, "c", t0)
            except OperationFailure as exc:
                assert exc.code == 239  # SnapshotTooOld
                assert ("Read timestamp Timestamp(%d, %d) is older than the oldest available "
                        "timestamp." % (t0.time, t0.inc)) in exc.details["errmsg"]
                break
            assert time.monotonic() < deadline, "the history was never trimmed"
        # a recent time still reads
        assert snapshot_find(db, "c", op_time(db))["cursor"]["firstBatch"]
    finally:
        client.admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=was)


@pytest.mark.emulator_only
def test_history_byte_budget_bounds_memory(make_client):
    emu = start_emulator("--snapshot-history-mb", "1")
    try:
        c = make_client(emu.uri)
        db = c.budget
        db.c.insert_one({"_id": 1, "pad": ""})
        t0 = op_time(db)
        for k in range(40):  # 40 versions of 64 KB: more than the 1 MB budget keeps
            db.c.update_one({"_id": 1}, {"$set": {"pad": "x" * 65536, "k": k}})
        recent = op_time(db)
        db.c.update_one({"_id": 1}, {"$set": {"k": 99}})
        with pytest.raises(OperationFailure) as exc:
            snapshot_find(db, "c", t0)
        assert exc.value.code == 239
        assert snapshot_find(db, "c", recent)["cursor"]["firstBatch"][0]["k"] == 39
    finally:
        problem = emu.stop()
        assert not problem, problem


def test_snapshot_then_change_stream_has_no_gap_and_no_duplicate(client, db):
    """A reader loads the collection at T and then follows the change stream from the first
    cluster time after T: applying the events to the snapshot gives the collection, with
    nothing missed and nothing applied twice, while a writer keeps writing."""
    db.c.insert_many([{"_id": i, "v": 0} for i in range(50)])
    stop = threading.Event()
    writes = []

    def writer():
        k = 0
        while not stop.is_set():
            i = k % 60
            if k % 7 == 3:
                db.c.delete_one({"_id": i})
            elif k % 5 == 0:
                db.c.replace_one({"_id": i}, {"v": k}, upsert=True)
            else:
                db.c.update_one({"_id": i}, {"$inc": {"v": 1}}, upsert=True)
            writes.append(k)
            k += 1
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.2)
        r = snapshot_find(db, "c", batchSize=10)
        at = r["cursor"]["atClusterTime"]
        view = {d["_id"]: d for d in all_docs(r, db, "c")}
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
    assert len(writes) > 20
    marker = db.marker.insert_one({}).inserted_id
    # startAtOperationTime T would return the write at T again: it is already in the snapshot
    with db.watch(start_at_operation_time=next_ts(at), full_document="updateLookup",
                  max_await_time_ms=AWAIT_MS) as stream:
        while True:
            ev = next_change(stream)
            assert ev["clusterTime"] > at
            if ev["ns"]["coll"] == "marker":
                assert ev["documentKey"]["_id"] == marker
                break
            key = ev["documentKey"]["_id"]
            if ev["operationType"] == "delete":
                view.pop(key, None)
            elif ev["operationType"] in ("insert", "replace"):
                view[key] = ev["fullDocument"]
            else:
                doc = dict(view[key])  # an update of a document the view must have
                doc.update(ev["updateDescription"]["updatedFields"])
                view[key] = doc
        assert_no_more(stream, 1)
    assert view == {d["_id"]: d for d in db.c.find({})}
    with db.watch(start_at_operation_time=at, max_await_time_ms=AWAIT_MS) as stream:
        first = next_change(stream)["clusterTime"]
        # the snapshot's time is the last write's, which the stream from T returns again (a
        # real server's periodic no-op writes can move the snapshot past it)
        assert first == at if not real_server_uri() else first >= at
