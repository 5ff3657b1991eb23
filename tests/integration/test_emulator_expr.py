"""$expr and aggregation expressions through the server: find, aggregate and change-stream
$match stages (MongoDB runs them; so does mongo-emulator, with libmongocast's evaluator), and the
daemon's stream pipelines that carry them (`tail --pipeline`, `check`). Everything here also runs
against a real replica set."""

import signal

import pytest
from pymongo.errors import OperationFailure

from daemon_util import *  # noqa: F401,F403  (fixtures: tails; run_cli, write_config)
from test_emulator_change_streams import assert_no_more, next_change

LOW_STOCK = {"$expr": {"$lte": ["$fullDocument.quantity_in_stock",
                                "$fullDocument.reorder_point"]}}
ITEMS = [
    {"_id": 1, "quantity_in_stock": 2, "reorder_point": 5},
    {"_id": 2, "quantity_in_stock": 5, "reorder_point": 5},
    {"_id": 3, "quantity_in_stock": 9, "reorder_point": 5},
    {"_id": 4, "reorder_point": 5},                       # missing < 5
    {"_id": 5, "quantity_in_stock": 1},                   # 1 > missing
    {"_id": 6, "quantity_in_stock": None, "reorder_point": 0},  # null < 0
    {"_id": 7, "quantity_in_stock": "3", "reorder_point": 5},   # a string > any number
]


def test_find_and_aggregate_with_expr(db):
    db.items.insert_many(ITEMS)
    q = {"$expr": {"$lte": ["$quantity_in_stock", "$reorder_point"]}}
    assert sorted(d["_id"] for d in db.items.find(q)) == [1, 2, 4, 6]
    got = list(db.items.aggregate([
        {"$match": q},
        {"$project": {"_id": 1, "short": {"$subtract": ["$reorder_point", "$quantity_in_stock"]},
                      "kind": {"$cond": [{"$eq": ["$quantity_in_stock", None]}, "null",
                                         {"$type": "$quantity_in_stock"}]}}},
        {"$sort": {"_id": 1}}]))
    assert got == [{"_id": 1, "short": 3, "kind": "int"}, {"_id": 2, "short": 0, "kind": "int"},
                   {"_id": 4, "short": None, "kind": "missing"},
                   {"_id": 6, "short": None, "kind": "null"}]
    with pytest.raises(OperationFailure) as exc:
        list(db.items.aggregate([{"$project": {"x": {"$nosuchop": 1}}}]))
    assert exc.value.code == 168
    with pytest.raises(OperationFailure) as exc:
        list(db.items.aggregate([{"$project": {"x": {"$add": ["$quantity_in_stock", 1]}}}]))
    assert exc.value.code == 16554  # item 7 holds a string


def test_change_stream_match_with_expr(db):
    db.items.insert_many([{"_id": i, "quantity_in_stock": 10, "reorder_point": 3}
                          for i in range(1, 4)])
    pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]},
                            **LOW_STOCK}}]
    with db.items.watch(pipeline, full_document="updateLookup", max_await_time_ms=300) as s:
        db.items.update_one({"_id": 1}, {"$set": {"quantity_in_stock": 4}})  # still above
        db.items.update_one({"_id": 2}, {"$set": {"quantity_in_stock": 3}})  # at the point
        db.items.insert_one({"_id": 9, "quantity_in_stock": 0, "reorder_point": 1})
        db.items.delete_one({"_id": 3})  # no fullDocument: filtered by operationType
        ev = next_change(s)
        assert ev["operationType"] == "update" and ev["documentKey"] == {"_id": 2}
        ev = next_change(s)
        assert ev["operationType"] == "insert" and ev["documentKey"] == {"_id": 9}
        assert_no_more(s)


def test_tail_pipeline_with_expr(tails, mongo_uri, db, db_name):
    db.items.insert_one({"_id": 1, "quantity_in_stock": 10, "reorder_point": 3})
    pipeline = '[{"$match": {"operationType": "update", "$expr": {"$lte": [' \
               '"$fullDocument.quantity_in_stock", "$fullDocument.reorder_point"]}}}]'
    t = tails(mongo_uri, "%s.items" % db_name, "--full-document", "updateLookup",
              "--pipeline", pipeline, "--max-await-ms", "100")
    t.wait_open()
    db.items.update_one({"_id": 1}, {"$set": {"quantity_in_stock": 5}})
    db.items.update_one({"_id": 1}, {"$set": {"quantity_in_stock": 2}})
    t.wait_messages(1)
    assert t.stop(signal.SIGINT) == 0
    msgs = t.messages()
    # updateLookup reads the document when the event is read, not as of the write: when both
    # updates are written before the first event is read (a loaded machine), the first one is
    # looked up at 2 as well and passes the $expr, as on MongoDB. Never a document at 5.
    assert [m["change"]["fullDocument"]["quantity_in_stock"] for m in msgs] in ([2], [2, 2])
    assert msgs[-1]["change"]["updateDescription"]["updatedFields"] == {"quantity_in_stock": 2}


def test_check_accepts_expr_in_stream_pipeline(tmp_path, mongo_uri, db, db_name):
    db.create_collection("items")
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {
        "low": {"db": db_name, "collection": "items", "full_document": "updateLookup",
                "pipeline": [{"$match": {"operationType": "update", **LOW_STOCK}}]},
    }, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok    stream low: change stream opens on %s.items" % db_name in p.stdout
