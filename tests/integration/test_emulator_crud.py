"""CRUD fidelity of mongo-emulator, measured with pymongo 3.11 against MongoDB's documented
behaviour (the same assertions hold against a real 6.0/7.0 replica set via MONGODB_URI)."""

import pymongo
import pytest
from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure


def test_insert_one_generates_objectid(db):
    res = db.c.insert_one({"a": 1})
    assert res.acknowledged
    assert isinstance(res.inserted_id, ObjectId)
    doc = db.c.find_one({"_id": res.inserted_id})
    assert doc == {"_id": res.inserted_id, "a": 1}
    assert list(doc.keys())[0] == "_id"


def test_insert_keeps_field_order_and_types(db):
    from bson import Int64, Decimal128, Binary, Timestamp
    import datetime
    now = datetime.datetime(2024, 5, 1, 12, 0, 0, 123000)
    doc = {"_id": "k", "z": 1, "a": Int64(2), "m": 1.5, "s": "x", "n": None, "b": True,
           "d": now, "arr": [1, "two", {"three": 3}], "sub": {"y": 1, "x": 2},
           "dec": Decimal128("1.10"), "bin": Binary(b"\x00\x01", 0x80), "ts": Timestamp(5, 6)}
    db.c.insert_one(doc)
    got = db.c.find_one({"_id": "k"})
    assert list(got.keys()) == list(doc.keys())
    assert got == doc
    assert isinstance(got["a"], Int64) and isinstance(got["z"], int)
    assert list(got["sub"].keys()) == ["y", "x"]


def test_insert_many_ids(db):
    res = db.c.insert_many([{"_id": 1}, {"_id": "two"}, {"x": 3}])
    assert res.inserted_ids[:2] == [1, "two"]
    assert isinstance(res.inserted_ids[2], ObjectId)
    assert db.c.count_documents({}) == 3


def test_duplicate_key_insert_one(db):
    db.c.insert_one({"_id": 7})
    with pytest.raises(DuplicateKeyError) as ei:
        db.c.insert_one({"_id": 7, "other": True})
    assert ei.value.code == 11000
    assert "E11000" in str(ei.value)
    assert db.c.find_one({"_id": 7}) == {"_id": 7}


def test_duplicate_key_insert_many_ordered_stops(db):
    with pytest.raises(BulkWriteError) as ei:
        db.c.insert_many([{"_id": 1}, {"_id": 1}, {"_id": 2}])
    details = ei.value.details
    assert details["nInserted"] == 1
    assert len(details["writeErrors"]) == 1
    assert details["writeErrors"][0]["index"] == 1
    assert details["writeErrors"][0]["code"] == 11000
    assert sorted(d["_id"] for d in db.c.find()) == [1]


def test_duplicate_key_insert_many_unordered_continues(db):
    with pytest.raises(BulkWriteError) as ei:
        db.c.insert_many([{"_id": 1}, {"_id": 1}, {"_id": 2}], ordered=False)
    details = ei.value.details
    assert details["nInserted"] == 2
    assert [e["index"] for e in details["writeErrors"]] == [1]
    assert sorted(d["_id"] for d in db.c.find()) == [1, 2]


def test_update_changing_id_is_immutable_field_66(db):
    db.c.insert_many([{"_id": 1}, {"_id": 2}])
    # _id is immutable: changing it is an error (code 66 ImmutableField)
    with pytest.raises(OperationFailure) as ei:
        db.c.update_one({"_id": 1}, {"$set": {"_id": 2}})
    assert ei.value.code == 66


# ---- update operators ----

@pytest.fixture
def one(db):
    db.c.insert_one({"_id": 1, "a": 1, "s": "x", "arr": [1, 2, 3], "sub": {"p": 1}})
    return db.c


def test_update_set_nested_and_new(one):
    r = one.update_one({"_id": 1}, {"$set": {"sub.q": 2, "new.deep.f": True, "a": 10}})
    assert (r.matched_count, r.modified_count) == (1, 1)
    assert one.find_one() == {"_id": 1, "a": 10, "s": "x", "arr": [1, 2, 3],
                              "sub": {"p": 1, "q": 2}, "new": {"deep": {"f": True}}}


def test_update_set_same_value_is_not_a_modification(one):
    r = one.update_one({"_id": 1}, {"$set": {"a": 1}})
    assert (r.matched_count, r.modified_count) == (1, 0)


def test_update_unset(one):
    r = one.update_one({"_id": 1}, {"$unset": {"s": "", "sub.p": 1, "missing": 1}})
    assert r.modified_count == 1
    assert one.find_one() == {"_id": 1, "a": 1, "arr": [1, 2, 3], "sub": {}}


def test_update_inc_and_mul(one):
    one.update_one({"_id": 1}, {"$inc": {"a": 5, "fresh": 2}, "$mul": {"sub.p": 3}})
    d = one.find_one()
    assert d["a"] == 6 and d["fresh"] == 2 and d["sub"]["p"] == 3


def test_update_inc_non_numeric_fails(one):
    with pytest.raises(OperationFailure) as ei:
        one.update_one({"_id": 1}, {"$inc": {"s": 1}})
    assert ei.value.code == 14  # TypeMismatch


def test_update_min_max(one):
    one.update_one({"_id": 1}, {"$min": {"a": 0}, "$max": {"sub.p": 9}})
    d = one.find_one()
    assert d["a"] == 0 and d["sub"]["p"] == 9
    r = one.update_one({"_id": 1}, {"$min": {"a": 5}})
    assert r.modified_count == 0


def test_update_rename(one):
    one.update_one({"_id": 1}, {"$rename": {"s": "t"}})
    d = one.find_one()
    assert "s" not in d and d["t"] == "x"


def test_update_push_each_pull_addtoset_pop(one):
    one.update_one({"_id": 1}, {"$push": {"arr": 4}})
    one.update_one({"_id": 1}, {"$push": {"arr": {"$each": [5, 6]}}})
    assert one.find_one()["arr"] == [1, 2, 3, 4, 5, 6]
    one.update_one({"_id": 1}, {"$pull": {"arr": {"$gte": 5}}})
    assert one.find_one()["arr"] == [1, 2, 3, 4]
    one.update_one({"_id": 1}, {"$addToSet": {"arr": 2}})
    one.update_one({"_id": 1}, {"$addToSet": {"arr": 9}})
    assert one.find_one()["arr"] == [1, 2, 3, 4, 9]
    one.update_one({"_id": 1}, {"$pop": {"arr": -1}})
    assert one.find_one()["arr"] == [2, 3, 4, 9]


def test_update_pipeline_form(one):
    one.update_one({"_id": 1}, [{"$set": {"b": "$a", "arr": [7]}}, {"$unset": "s"}])
    d = one.find_one()
    assert d["b"] == 1 and d["arr"] == [7] and "s" not in d


def test_update_unknown_operator_fails(one):
    with pytest.raises(OperationFailure) as ei:
        one.update_one({"_id": 1}, {"$frobnicate": {"a": 1}})
    assert ei.value.code == 9  # FailedToParse: Unknown modifier


def test_update_no_match(db):
    r = db.c.update_one({"_id": "nope"}, {"$set": {"a": 1}})
    assert (r.matched_count, r.modified_count, r.upserted_id) == (0, 0, None)


def test_upsert_inserts_from_filter_and_set_on_insert(db):
    r = db.c.update_one({"k": 5, "t": {"$gt": 1}}, {"$set": {"v": 1}, "$setOnInsert": {"c": 0}},
                        upsert=True)
    assert r.matched_count == 0 and isinstance(r.upserted_id, ObjectId)
    assert db.c.find_one({"_id": r.upserted_id}) == {"_id": r.upserted_id, "k": 5, "v": 1, "c": 0}
    r2 = db.c.update_one({"k": 5}, {"$set": {"v": 2}, "$setOnInsert": {"c": 99}}, upsert=True)
    assert r2.matched_count == 1 and r2.upserted_id is None
    assert db.c.find_one({"k": 5})["c"] == 0


def test_upsert_with_id_in_filter(db):
    r = db.c.update_one({"_id": "fixed"}, {"$inc": {"n": 1}}, upsert=True)
    assert r.upserted_id == "fixed"
    assert db.c.find_one() == {"_id": "fixed", "n": 1}


def test_update_many_multi(db):
    db.c.insert_many([{"g": 1, "n": 0}, {"g": 1, "n": 0}, {"g": 2, "n": 0}])
    r = db.c.update_many({"g": 1}, {"$inc": {"n": 1}})
    assert (r.matched_count, r.modified_count) == (2, 2)
    assert sorted(d["n"] for d in db.c.find()) == [0, 1, 1]
    r = db.c.update_one({"g": 1}, {"$inc": {"n": 1}})
    assert r.modified_count == 1
    assert sorted(d["n"] for d in db.c.find()) == [0, 1, 2]


def test_replace_one_keeps_id(db):
    db.c.insert_one({"_id": 1, "a": 1, "b": 2})
    r = db.c.replace_one({"a": 1}, {"c": 3})
    assert (r.matched_count, r.modified_count) == (1, 1)
    assert db.c.find_one() == {"_id": 1, "c": 3}


def test_replace_one_upsert(db):
    r = db.c.replace_one({"_id": 42}, {"v": "new"}, upsert=True)
    assert r.upserted_id == 42
    assert db.c.find_one() == {"_id": 42, "v": "new"}


def test_replace_with_operator_is_rejected_by_driver_and_server(db):
    with pytest.raises(ValueError):
        db.c.replace_one({}, {"$set": {"a": 1}})
    db.c.insert_one({"_id": 1})
    # A raw update whose document mixes operators and fields fails per statement: the server
    # parses the modifiers while executing, so the command is ok:1 with a writeError 9.
    res = db.command("update", "c", updates=[{"q": {"_id": 1}, "u": {"$set": {"a": 1}, "b": 2}}])
    assert res["n"] == 0
    assert [e["code"] for e in res["writeErrors"]] == [9]
    assert "Unknown modifier: b" in res["writeErrors"][0]["errmsg"]
    assert db.c.find_one({"_id": 1}) == {"_id": 1}


def test_delete_one_and_many(db):
    db.c.insert_many([{"g": 1}, {"g": 1}, {"g": 1}, {"g": 2}])
    assert db.c.delete_one({"g": 1}).deleted_count == 1
    assert db.c.count_documents({"g": 1}) == 2
    assert db.c.delete_many({"g": 1}).deleted_count == 2
    assert db.c.delete_many({"g": 1}).deleted_count == 0
    assert db.c.delete_many({}).deleted_count == 1
    assert db.c.count_documents({}) == 0


# ---- find ----

@pytest.fixture
def people(db):
    docs = [
        {"_id": 1, "name": "ann", "age": 31, "tags": ["a", "b"], "addr": {"city": "Oslo"}},
        {"_id": 2, "name": "bob", "age": 25, "tags": ["b"], "addr": {"city": "Rome"}},
        {"_id": 3, "name": "cid", "age": 40, "tags": [], "addr": {"city": "Oslo"}, "x": None},
        {"_id": 4, "name": "dan", "age": 25},
        {"_id": 5, "name": "eve", "age": 52.5, "tags": ["c", "a"]},
    ]
    db.people.insert_many(docs)
    return db.people


def ids(cursor):
    return [d["_id"] for d in cursor]


@pytest.mark.parametrize("flt,expected", [
    ({}, [1, 2, 3, 4, 5]),
    ({"age": 25}, [2, 4]),
    ({"age": {"$gt": 30}}, [1, 3, 5]),
    ({"age": {"$gte": 31, "$lt": 45}}, [1, 3]),
    ({"age": {"$lte": 25}}, [2, 4]),
    ({"age": {"$ne": 25}}, [1, 3, 5]),
    ({"name": {"$in": ["ann", "eve", "zed"]}}, [1, 5]),
    ({"name": {"$nin": ["ann", "eve"]}}, [2, 3, 4]),
    ({"tags": "a"}, [1, 5]),
    ({"tags": {"$all": ["a", "b"]}}, [1]),
    ({"tags": {"$size": 0}}, [3]),
    ({"addr.city": "Oslo"}, [1, 3]),
    ({"addr": {"city": "Rome"}}, [2]),
    ({"tags": {"$exists": False}}, [4]),
    ({"x": None}, [1, 2, 3, 4, 5]),
    ({"x": {"$exists": True}}, [3]),
    ({"$or": [{"age": 40}, {"name": "bob"}]}, [2, 3]),
    ({"$and": [{"age": 25}, {"name": "dan"}]}, [4]),
    ({"$nor": [{"age": 25}, {"tags": "a"}]}, [3]),
    ({"age": {"$not": {"$gt": 30}}}, [2, 4]),
    ({"name": {"$regex": "^[ab]"}}, [1, 2]),
    ({"age": {"$type": "double"}}, [5]),
    ({"age": {"$mod": [5, 0]}}, [2, 3, 4]),
    ({"tags": {"$elemMatch": {"$eq": "c"}}}, [5]),
])
def test_find_filters(people, flt, expected):
    assert sorted(ids(people.find(flt))) == expected


def test_find_unknown_operator_is_an_error(people):
    with pytest.raises(OperationFailure) as ei:
        list(people.find({"age": {"$frob": 1}}))
    assert ei.value.code == 2  # BadValue: unknown operator


def test_find_projection_include_exclude(people):
    assert people.find_one({"_id": 1}, {"name": 1}) == {"_id": 1, "name": "ann"}
    assert people.find_one({"_id": 1}, {"name": 1, "_id": 0}) == {"name": "ann"}
    assert people.find_one({"_id": 1}, {"addr.city": 1}) == {"_id": 1, "addr": {"city": "Oslo"}}
    assert people.find_one({"_id": 2}, {"tags": 0, "addr": 0}) == {"_id": 2, "name": "bob",
                                                                 "age": 25}


def test_find_sort_skip_limit(people):
    assert ids(people.find().sort("age", pymongo.DESCENDING))[:3] == [5, 3, 1]
    assert ids(people.find().sort([("age", 1), ("_id", -1)])) == [4, 2, 1, 3, 5]
    assert ids(people.find().sort([("age", -1), ("_id", 1)])) == [5, 3, 1, 2, 4]
    assert ids(people.find().sort("name", 1).skip(1).limit(2)) == [2, 3]
    assert ids(people.find().sort("_id", 1).skip(10)) == []
    assert ids(people.find({"age": 25}).sort("_id", -1).limit(1)) == [4]


def test_find_sort_arrays_and_missing(people):
    # ascending: an empty array sorts before a missing field, arrays sort by their smallest
    # element (BSON comparison order; ties broken by the second key)
    got = ids(people.find({}, {"x": 1}).sort([("tags", 1), ("_id", 1)]))
    assert got == [3, 4, 1, 5, 2]


def test_find_batch_size_and_getmore(db, recorded_client):
    client, rec = recorded_client
    coll = client[db.name].many
    coll.insert_many([{"_id": i} for i in range(250)])
    rec.clear()
    got = ids(coll.find().sort("_id", 1).batch_size(40))
    assert got == list(range(250))
    finds = rec.commands("find")
    getmores = rec.commands("getMore")
    assert len(finds) == 1 and len(getmores) == 6  # 40 in firstBatch, then 6 getMores
    firsts = [e.reply for e in rec.succeeded if e.command_name == "find"]
    assert len(firsts[0]["cursor"]["firstBatch"]) == 40
    assert firsts[0]["cursor"]["ns"] == "%s.many" % db.name
    last = [e.reply for e in rec.succeeded if e.command_name == "getMore"][-1]
    assert last["cursor"]["id"] == 0


def test_find_default_first_batch_is_101(db, recorded_client):
    client, rec = recorded_client
    coll = client[db.name].many
    coll.insert_many([{"_id": i} for i in range(150)])
    rec.clear()
    assert len(list(coll.find())) == 150
    first = [e.reply for e in rec.succeeded if e.command_name == "find"][0]
    assert len(first["cursor"]["firstBatch"]) == 101 and first["cursor"]["id"] != 0


def test_getmore_unknown_cursor_is_43(db):
    db.c.insert_one({})
    with pytest.raises(OperationFailure) as ei:
        db.command("getMore", 123456789, collection="c")
    assert ei.value.code == 43


def test_killcursors(db, client):
    coll = client[db.name].many
    coll.insert_many([{"_id": i} for i in range(20)])
    # one explicit session for the cursor and the commands on it, as a real server requires
    with client.start_session() as sess:
        cur = coll.find(session=sess).batch_size(5)
        next(cur)
        cid = cur.cursor_id
        assert cid
        reply = client[db.name].command("killCursors", "many", cursors=[cid], session=sess)
        assert list(reply["cursorsKilled"]) == [cid]
        with pytest.raises(OperationFailure) as ei:
            client[db.name].command("getMore", cid, collection="many", session=sess)
        assert ei.value.code == 43
        reply = client[db.name].command("killCursors", "many", cursors=[cid], session=sess)
        assert list(reply["cursorsNotFound"]) == [cid]


# ---- find-and-modify ----

def test_find_one_and_update(db):
    db.c.insert_many([{"_id": 1, "n": 1, "g": "a"}, {"_id": 2, "n": 5, "g": "a"}])
    before = db.c.find_one_and_update({"g": "a"}, {"$inc": {"n": 1}}, sort=[("n", -1)])
    assert before == {"_id": 2, "n": 5, "g": "a"}
    after = db.c.find_one_and_update({"_id": 1}, {"$inc": {"n": 1}},
                                     return_document=ReturnDocument.AFTER,
                                     projection={"n": 1, "_id": 0})
    assert after == {"n": 2}
    assert db.c.find_one_and_update({"_id": 99}, {"$set": {"n": 0}}) is None
    up = db.c.find_one_and_update({"_id": 99}, {"$set": {"n": 0}}, upsert=True,
                                  return_document=ReturnDocument.AFTER)
    assert up == {"_id": 99, "n": 0}


def test_find_one_and_replace_and_delete(db):
    db.c.insert_many([{"_id": 1, "v": "a"}, {"_id": 2, "v": "b"}])
    old = db.c.find_one_and_replace({"v": "a"}, {"v": "z"})
    assert old == {"_id": 1, "v": "a"}
    assert db.c.find_one({"_id": 1}) == {"_id": 1, "v": "z"}
    new = db.c.find_one_and_replace({"_id": 2}, {"w": 1}, return_document=ReturnDocument.AFTER)
    assert new == {"_id": 2, "w": 1}
    gone = db.c.find_one_and_delete({}, sort=[("_id", -1)])
    assert gone == {"_id": 2, "w": 1}
    assert ids(db.c.find()) == [1]
    assert db.c.find_one_and_delete({"_id": 5}) is None


def test_count_documents_and_estimated(people):
    assert people.count_documents({}) == 5
    assert people.count_documents({"age": 25}) == 2
    assert people.count_documents({}, skip=1, limit=3) == 3
    assert people.count_documents({"age": {"$gt": 100}}) == 0
    assert people.estimated_document_count() == 5


def test_aggregate_group_count(people):
    got = list(people.aggregate([
        {"$match": {"age": {"$lt": 50}}},
        {"$group": {"_id": "$age", "n": {"$sum": 1}, "names": {"$push": "$name"}}},
        {"$sort": {"_id": 1}},
    ]))
    assert got == [{"_id": 25, "n": 2, "names": ["bob", "dan"]},
                   {"_id": 31, "n": 1, "names": ["ann"]},
                   {"_id": 40, "n": 1, "names": ["cid"]}]
    assert list(people.aggregate([{"$match": {"age": 25}}, {"$count": "total"}])) == \
        [{"total": 2}]
    total = list(people.aggregate([{"$group": {"_id": None, "s": {"$sum": "$age"},
                                               "mx": {"$max": "$age"}}}]))
    assert total == [{"_id": None, "s": 173.5, "mx": 52.5}]


def test_aggregate_unknown_stage_is_40324(people):
    with pytest.raises(OperationFailure) as ei:
        list(people.aggregate([{"$frobnicate": {}}]))
    assert ei.value.code == 40324


# ---- indexes ----

def test_create_index_unique_enforced(db):
    name = db.c.create_index("email", unique=True)
    assert name == "email_1"
    info = db.c.index_information()
    assert set(info) == {"_id_", "email_1"}
    assert info["email_1"]["key"] == [("email", 1)] and info["email_1"].get("unique") is True
    db.c.insert_one({"email": "a@x"})
    with pytest.raises(DuplicateKeyError) as ei:
        db.c.insert_one({"email": "a@x"})
    assert ei.value.code == 11000
    db.c.insert_one({"email": "b@x"})
    with pytest.raises(DuplicateKeyError):
        db.c.update_one({"email": "b@x"}, {"$set": {"email": "a@x"}})
    assert db.c.count_documents({}) == 2


def test_create_unique_index_over_duplicates_fails(db):
    db.c.insert_many([{"k": 1}, {"k": 1}])
    with pytest.raises(OperationFailure) as ei:
        db.c.create_index("k", unique=True)
    assert ei.value.code == 11000
    assert "k_1" not in db.c.index_information()


def test_drop_index(db):
    db.c.create_index([("a", 1), ("b", -1)])
    assert "a_1_b_-1" in db.c.index_information()
    db.c.drop_index("a_1_b_-1")
    assert set(db.c.index_information()) == {"_id_"}
    with pytest.raises(OperationFailure) as ei:
        db.c.drop_index("a_1_b_-1")
    assert ei.value.code == 27  # IndexNotFound


# ---- catalog ----

def test_list_collection_and_database_names(client, db):
    assert db.list_collection_names() == []
    db.one.insert_one({})
    db.create_collection("two")
    assert sorted(db.list_collection_names()) == ["one", "two"]
    assert db.name in client.list_database_names()
    # create with different options than the existing collection: NamespaceExists
    with pytest.raises(OperationFailure) as ei:
        db.command("create", "two", capped=True, size=4096)
    assert ei.value.code == 48


def test_drop_collection_and_database(client, db):
    db.c.insert_one({"a": 1})
    db.drop_collection("c")
    assert "c" not in db.list_collection_names()
    assert db.c.count_documents({}) == 0
    db.drop_collection("never_existed")  # not an error for the driver
    db.d.insert_one({})
    client.drop_database(db.name)
    assert db.name not in client.list_database_names()


def test_rename_collection(db):
    db.src.insert_many([{"_id": 1}, {"_id": 2}])
    db.src.rename("dst")
    assert db.list_collection_names() == ["dst"]
    assert ids(db.dst.find().sort("_id", 1)) == [1, 2]
    db.other.insert_one({"_id": "o"})
    with pytest.raises(OperationFailure) as ei:
        db.dst.rename("other")
    assert ei.value.code == 48  # NamespaceExists
    db.dst.rename("other", dropTarget=True)
    assert ids(db.other.find().sort("_id", 1)) == [1, 2]
    with pytest.raises(OperationFailure) as ei:
        db.missing.rename("whatever")
    assert ei.value.code == 26  # NamespaceNotFound


def test_unknown_command_is_59(db):
    with pytest.raises(OperationFailure) as ei:
        db.command("frobnicateTheDatabase", 1)
    assert ei.value.code == 59


def test_build_info_and_hello(client):
    info = client.admin.command("buildInfo")
    assert isinstance(info["version"], str)
    assert [int(x) for x in info["versionArray"][:2]] >= [6, 0]
    hello = client.admin.command("hello")
    assert hello["isWritablePrimary"] is True
    assert hello["setName"]
    assert hello["maxWireVersion"] >= 17
