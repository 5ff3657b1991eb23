"""Large documents and large change events in mongo-emulator, measured with pymongo 3.11
against MongoDB's behaviour: 16 MiB documents, change events past 16793600 bytes failing the
cursor with BSONObjectTooLarge (10334, with the server's message), and
$changeStreamSplitLargeEvent (fragments with splitEvent {fragment, of}, each with its own resume
token, resuming from a fragment). Also runs against a real replica set (MONGODB_URI); the split
stage needs MongoDB 6.0.9 or later there."""

import re

import pytest
from pymongo.errors import OperationFailure

from test_emulator_change_streams import RawStream, raw_streams  # noqa: F401 (fixture)

MIB = 1024 * 1024
SPLIT = [{"$changeStreamSplitLargeEvent": {}}]
EVENT_FIELDS = {"operationType", "clusterTime", "wallTime", "ns", "documentKey",
                "updateDescription", "fullDocument", "fullDocumentBeforeChange"}
TOO_LARGE_RE = re.compile(
    r"^Executor error during getMore :: caused by :: BSONObj size: (\d+) \(0x([0-9A-F]+)\) is "
    r"invalid\. Size must be between 0 and 16793600\(16MB\) First element: _id: "
    r"\{ _data: \"[0-9A-F]+(\.\.\.)?\" \}$")


def padded(_id, n, fill="x"):
    return {"_id": _id, "pad": fill * n}


@pytest.fixture
def big(client, db):
    """A collection with pre- and post-images holding one 9 MiB document (_id 1)."""
    db.command("create", "big", changeStreamPreAndPostImages={"enabled": True})
    db.big.insert_one(padded(1, 9 * MIB, "a"))
    return db.big


def needs_split_stage(client):
    version = tuple(client.server_info()["versionArray"][:3])
    if "mongo-emulator" not in client.server_info().get("gitVersion", "") and \
            version < (6, 0, 9):
        pytest.skip("$changeStreamSplitLargeEvent needs MongoDB 6.0.9 or later")


def images_stream(client, db, pipeline=(), **extra):
    spec = {"fullDocument": "whenAvailable", "fullDocumentBeforeChange": "whenAvailable"}
    spec.update(extra)
    return RawStream(client, db.name, "big", spec, pipeline=list(pipeline))


def test_hello_advertises_the_limits(client):
    hello = client.admin.command("isMaster")
    assert hello["maxBsonObjectSize"] == 16 * MIB
    assert hello["maxMessageSizeBytes"] == 48000000
    assert hello["logicalSessionTimeoutMinutes"] == 30


def test_a_16_mib_document_and_its_event(db):
    doc = padded(1, 16 * MIB - 24)  # exactly 16777216 bytes of BSON
    with db.c.watch(max_await_time_ms=300) as stream:
        db.c.insert_one(doc)
        ev = stream.next()
    assert db.c.find_one({"_id": 1})["pad"] == doc["pad"]
    # the event is larger than 16 MiB but within the 16793600 bytes a server returns
    assert ev["fullDocument"]["pad"] == doc["pad"]


def test_oversize_event_fails_the_cursor(client, db, big, raw_streams):
    s = images_stream(client, db)
    raw_streams.append(s)
    big.update_one({"_id": 1}, {"$set": {"n": 1}})  # two 9 MiB images: an 18 MiB event
    with pytest.raises(OperationFailure) as exc:
        s.next()
    assert exc.value.code == 10334
    assert exc.value.details["codeName"] == "BSONObjectTooLarge"
    m = TOO_LARGE_RE.match(exc.value.details["errmsg"])
    assert m, exc.value.details["errmsg"]
    assert int(m.group(1)) == int(m.group(2), 16) > 18 * MIB
    assert "ResumableChangeStreamError" not in exc.value.details.get("errorLabels", [])
    with pytest.raises(OperationFailure) as exc:  # the cursor is gone: no endless retry
        s.get_more()
    assert exc.value.code == 43
    s.id = 0


def test_split_large_event_into_fragments(client, db, big, raw_streams):
    needs_split_stage(client)
    s = images_stream(client, db, SPLIT)
    raw_streams.append(s)
    big.update_one({"_id": 1}, {"$set": {"n": 1}})
    db.big.insert_one({"_id": 2})
    first, second, after = s.next(), s.next(), s.next()
    assert first["splitEvent"] == {"fragment": 1, "of": 2}
    assert second["splitEvent"] == {"fragment": 2, "of": 2}
    assert list(first)[:2] == ["_id", "splitEvent"] and list(second)[:2] == ["_id",
                                                                             "splitEvent"]
    assert first["_id"] != second["_id"]
    assert first["_id"]["_data"] < second["_id"]["_data"] < after["_id"]["_data"]
    assert "splitEvent" not in after and after["documentKey"] == {"_id": 2}
    # every field of the event is in exactly one fragment, the smallest ones first
    fields = [k for k in first if k not in ("_id", "splitEvent")] + \
             [k for k in second if k not in ("_id", "splitEvent")]
    assert sorted(fields) == sorted(EVENT_FIELDS)
    event = dict(first)
    event.update(second)
    assert event["operationType"] == "update"
    assert event["documentKey"] == {"_id": 1}
    assert event["fullDocumentBeforeChange"] == padded(1, 9 * MIB, "a")
    assert event["fullDocument"] == dict(padded(1, 9 * MIB, "a"), n=1)
    assert event["updateDescription"]["updatedFields"] == {"n": 1}
    # fields go by the size of their BSON element, name included: the pre-image's longer name
    # outweighs the post-image's extra field, so it is the larger one and goes alone
    assert list(second) == ["_id", "splitEvent", "fullDocumentBeforeChange"]
    assert list(first)[-1] == "fullDocument"


def test_resume_from_a_fragment(client, db, big, raw_streams):
    needs_split_stage(client)
    s = images_stream(client, db, SPLIT)
    raw_streams.append(s)
    # images and updatedFields of 9 MiB each: three fragments
    big.update_one({"_id": 1}, {"$set": {"pad": "b" * (9 * MIB)}})
    db.big.insert_one({"_id": 2})
    frags = [s.next() for _ in range(3)]
    after = s.next()
    assert [f["splitEvent"] for f in frags] == [{"fragment": k, "of": 3} for k in (1, 2, 3)]
    assert frags[2]["_id"] == s.pbrt or after["_id"] == s.pbrt
    for k in range(3):
        again = images_stream(client, db, SPLIT, resumeAfter=frags[k]["_id"])
        raw_streams.append(again)
        rest = [again.next() for _ in range(2 - k)]
        assert [f["_id"] for f in rest] == [f["_id"] for f in frags[k + 1:]]
        assert again.next()["_id"] == after["_id"]
    # a fragment's token can only resume a stream that splits
    with pytest.raises(OperationFailure) as exc:
        images_stream(client, db, resumeAfter=frags[0]["_id"])
    assert exc.value.code == 280


def test_small_events_pass_the_split_stage_unchanged(client, db, raw_streams):
    needs_split_stage(client)
    s = RawStream(client, db.name, "c", {}, pipeline=SPLIT)
    raw_streams.append(s)
    db.c.insert_one({"_id": 1})
    ev = s.next()
    assert "splitEvent" not in ev and ev["fullDocument"] == {"_id": 1}


@pytest.mark.parametrize("pipeline,code", [
    ([{"$changeStreamSplitLargeEvent": {"x": 1}}], 7182800),
    ([{"$changeStreamSplitLargeEvent": {}}, {"$match": {"operationType": "insert"}}], 7182802),
])
def test_split_stage_validation(client, db, pipeline, code):
    needs_split_stage(client)
    with pytest.raises(OperationFailure) as exc:
        db.command("aggregate", "c", pipeline=[{"$changeStream": {}}] + pipeline, cursor={})
    assert exc.value.code == code


def test_split_stage_outside_a_change_stream(client, db):
    needs_split_stage(client)
    db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as exc:
        db.command("aggregate", "c", pipeline=SPLIT, cursor={})
    assert exc.value.code == 20
