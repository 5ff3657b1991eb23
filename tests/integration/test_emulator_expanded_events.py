"""Change streams opened with showExpandedEvents (MongoDB 6.0's expanded events): create,
createIndexes, dropIndexes, modify, rename's operationDescription, collectionUUID, view events,
and (6.1+) disambiguatedPaths. pymongo 3.11 cannot send the option, so the streams are raw
aggregate/getMore commands. Everything except the tests marked emulator_only also runs against
a real replica set."""

import uuid

import pytest
from bson import SON
from bson.binary import Binary, UUID_SUBTYPE
from pymongo.errors import OperationFailure

from conftest import _emulator_fixture, _new_client, skip_if_real_server
from test_emulator_change_streams import (RawStream, assert_no_more, next_change,  # noqa: F401
                                          raw_streams)


ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}


def expanded(client, db_name, coll=None, pipeline=()):
    return RawStream(client, db_name, coll, SON([("showExpandedEvents", True)]), pipeline)


def coll_uuid(db, name):
    info = db.command("listCollections", filter={"name": name})["cursor"]["firstBatch"][0]
    return info["info"]["uuid"]


def as_uuid(value):
    """collectionUUID arrives as a UUID (pymongo decodes subtype 4) or as Binary."""
    if isinstance(value, Binary):
        assert value.subtype == UUID_SUBTYPE
        return uuid.UUID(bytes=bytes(value))
    assert isinstance(value, uuid.UUID), value
    return value


def server_version(client):
    return tuple(client.admin.command("buildInfo")["versionArray"][:2])


def test_ddl_event_shapes(client, db, raw_streams):
    ex = expanded(client, db.name)
    raw_streams.append(ex)
    with db.watch(max_await_time_ms=300) as plain:
        db.command("create", "c")
        c_uuid = coll_uuid(db, "c")
        db.c.create_index("x")
        db.c.insert_one({"_id": 1})
        db.command("collMod", "c", changeStreamPreAndPostImages={"enabled": True})
        db.c.drop_index("x_1")
        db.command("create", "t")
        t_uuid = coll_uuid(db, "t")
        client.admin.command("renameCollection", "%s.c" % db.name, to="%s.t" % db.name,
                             dropTarget=True)

        ev = ex.next()
        assert ev["operationType"] == "create"
        assert ev["ns"] == {"db": db.name, "coll": "c"}
        assert as_uuid(ev["collectionUUID"]) == c_uuid
        assert ev["operationDescription"] == {"idIndex": ID_INDEX}
        assert "documentKey" not in ev

        ev = ex.next()
        assert ev["operationType"] == "createIndexes"
        assert as_uuid(ev["collectionUUID"]) == c_uuid
        assert ev["operationDescription"] == {
            "indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1"}]}

        ev = ex.next()
        assert ev["operationType"] == "insert"
        assert as_uuid(ev["collectionUUID"]) == c_uuid

        ev = ex.next()
        assert ev["operationType"] == "modify"
        assert ev["operationDescription"] == {"changeStreamPreAndPostImages": {"enabled": True}}
        assert as_uuid(ev["stateBeforeChange"]["collectionOptions"]["uuid"]) == c_uuid

        ev = ex.next()
        assert ev["operationType"] == "dropIndexes"
        assert ev["operationDescription"] == {
            "indexes": [{"v": 2, "key": {"x": 1}, "name": "x_1"}]}

        ev = ex.next()
        assert ev["operationType"] == "create" and ev["ns"]["coll"] == "t"

        ev = ex.next()
        assert ev["operationType"] == "rename"
        assert ev["to"] == {"db": db.name, "coll": "t"}
        assert as_uuid(ev["collectionUUID"]) == c_uuid
        desc = ev["operationDescription"]
        assert desc["to"] == {"db": db.name, "coll": "t"}
        assert as_uuid(desc["dropTarget"]) == t_uuid

        # The same writes without the option: only the insert and the rename, as before.
        ev = next_change(plain)
        assert ev["operationType"] == "insert" and "collectionUUID" not in ev
        ev = next_change(plain)
        assert ev["operationType"] == "rename"
        assert "operationDescription" not in ev and "collectionUUID" not in ev
        assert_no_more(plain)


def test_implicit_create_and_index_build(client, db, raw_streams):
    ex = expanded(client, db.name)
    raw_streams.append(ex)
    db.c.insert_one({"_id": 1, "a": 1})
    db.command("createIndexes", "c", indexes=[{"key": {"a": 1}, "name": "a_1"},
                                              {"key": {"b": -1}, "name": "b_-1"}])
    db.command("createIndexes", "fresh", indexes=[{"key": {"a": 1}, "name": "a_1"}])
    ops = [ex.next() for _ in range(5)]
    assert [e["operationType"] for e in ops] == [
        "create", "insert", "createIndexes", "create", "createIndexes"]
    assert ops[0]["ns"]["coll"] == "c" and ops[0]["operationDescription"] == {"idIndex": ID_INDEX}
    # A collection with documents builds its indexes together: one event lists both.
    assert [i["name"] for i in ops[2]["operationDescription"]["indexes"]] == ["a_1", "b_-1"]
    assert ops[3]["ns"]["coll"] == "fresh"
    # Dropping every index: one event per index.
    db.c.drop_indexes()
    drops = [ex.next() for _ in range(2)]
    assert [e["operationType"] for e in drops] == ["dropIndexes", "dropIndexes"]
    assert sorted(e["operationDescription"]["indexes"][0]["name"] for e in drops) == [
        "a_1", "b_-1"]


def test_collection_stream_sees_its_own_ddl(client, db, raw_streams):
    db.create_collection("c")
    ex = expanded(client, db.name, "c")
    raw_streams.append(ex)
    db.c.create_index("k")
    db.other.create_index("k")
    db.command("collMod", "c")
    db.c.drop()
    ops = [ex.next()["operationType"] for _ in range(4)]
    assert ops == ["createIndexes", "modify", "drop", "invalidate"]


def test_view_events(client, db, raw_streams):
    db.create_collection("c")
    ex = expanded(client, db.name)
    raw_streams.append(ex)
    db.command("create", "v", viewOn="c", pipeline=[{"$match": {"a": 1}}])
    ev = ex.next()
    assert ev["operationType"] == "create"
    assert ev["ns"] == {"db": db.name, "coll": "v"}
    assert ev["operationDescription"] == {"viewOn": "c", "pipeline": [{"$match": {"a": 1}}]}
    assert "collectionUUID" not in ev
    info = db.command("listCollections", filter={"name": "v"})["cursor"]["firstBatch"]
    assert info[0]["type"] == "view"
    assert info[0]["options"] == {"viewOn": "c", "pipeline": [{"$match": {"a": 1}}]}
    with pytest.raises(OperationFailure) as exc:
        db.command("create", "v", viewOn="c")
    assert exc.value.code == 48
    with pytest.raises(OperationFailure) as exc:
        db.v.insert_one({"a": 1})
    assert exc.value.code == 166
    db.drop_collection("v")
    ev = ex.next()
    assert ev["operationType"] == "drop" and ev["ns"]["coll"] == "v"
    assert db.command("listCollections", filter={"name": "v"})["cursor"]["firstBatch"] == []


@pytest.mark.emulator_only
def test_emulator_refuses_reads_through_views(db):
    db.create_collection("c")
    db.command("create", "v", viewOn="c")
    with pytest.raises(OperationFailure) as exc:
        list(db.v.find())
    assert exc.value.code == 166
    assert "does not read or write through" in str(exc.value)


def test_disambiguated_paths_follow_the_server_version(client, db, raw_streams):
    db.c.insert_one({"_id": 1, "a": {"1": 1}, "arr": [{"2": 0}], "x": 0})
    ex = expanded(client, db.name, "c")
    raw_streams.append(ex)
    db.c.update_one({"_id": 1}, {"$set": {"a.1": 2, "arr.0.2": 1, "x": 1}})
    ud = ex.next()["updateDescription"]
    if server_version(client) < (6, 1):
        assert "disambiguatedPaths" not in ud
    else:
        assert ud["disambiguatedPaths"] == {"a.1": ["a", "1"], "arr.0.2": ["arr", 0, "2"]}


@pytest.fixture
def emulator_70():
    skip_if_real_server("an emulator answering as MongoDB 7.0")
    yield from _emulator_fixture("--wire-version", "21")


def test_disambiguated_paths_on_7_0(emulator_70, db_name):
    client = _new_client(emulator_70.uri)
    try:
        db = client[db_name]
        db.c.insert_one({"_id": 1, "a": {"1": 1}, "arr": [{"2": 0}, 5], "x": 0})
        s = expanded(client, db_name, "c")
        try:
            db.c.update_one({"_id": 1}, {"$set": {"a.1": 2, "arr.0.2": 1, "arr.1": 6, "x": 1}})
            ud = s.next()["updateDescription"]
            assert ud["disambiguatedPaths"] == {"a.1": ["a", "1"], "arr.0.2": ["arr", 0, "2"]}
            db.c.update_one({"_id": 1}, {"$set": {"x": 2}})
            assert s.next()["updateDescription"]["disambiguatedPaths"] == {}
        finally:
            s.close()
    finally:
        client.close()
