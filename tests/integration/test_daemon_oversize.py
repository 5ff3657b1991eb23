"""Change events larger than MongoDB's 16 MB limit, per stream `on_oversize`.

A 10 MiB document is updated to another 10 MiB value on a collection with pre- and
post-images, and the stream asks for both (full_document: updateLookup,
full_document_before_change: whenAvailable): the event (updateDescription, fullDocument and
fullDocumentBeforeChange, ~30 MiB) is past 16793600 bytes, so MongoDB fails the cursor with
BSONObjectTooLarge (10334) unless the pipeline ends with $changeStreamSplitLargeEvent.

- split: one reassembled change, whole, to a WebSocket subscriber and the stdout sink; its id
  is the last fragment's token (checked against a raw change stream with the stage), no
  fragment leaks out, the next event follows, the stored position is never a fragment inside
  it, and a restart from it goes on after it. Past server.max_message_bytes the subscriber
  gets the fan-out's own oversize notice for it instead.
- skip: an `oversize` notice with the id, documentKey, operationType, ns and the server's limit,
  routed to the document's owner, counted in /metrics, then the next events; also on a server
  that refuses the stage (40324, simulated with failCommand): then the notice's id comes from
  MongoDB's error message and the stream resumes after it.
- fail: the stream fails with its error event (code event_too_large, server_code 10334) and
  the server's message in the log, once: no retry loop.
Every case is bounded by the timeouts of its waits. Runs against a real replica set too
(MONGODB_URI; split and skip need MongoDB 6.0.9 or later, the failCommand case the emulator).
"""

import json
import signal
import time

import pytest

from daemon_util import *  # noqa: F401,F403
from live_util import (claims, free_port, hs256, live_config, start_live, stream_path,
                       subscribers, wait_http)  # noqa: F401
from server_util import metrics
from test_emulator_change_streams import RawStream, raw_streams  # noqa: F401 (fixture)

MIB = 1024 * 1024
BIG = 10 * MIB
SECRET = "oversize-secret-0123456789abcdef0123456789abcdef"
AUTH = {"algorithm": "HS256", "secret": SECRET, "admin_role": "mongocast:all"}


def stream(db_name, policy, recipient):
    """updateLookup with pre-images; a recipient stream needs the post-image (whenAvailable)
    instead, which is as large."""
    s = {"db": db_name, "collection": "big", "max_await_time_ms": 100,
         "full_document": "updateLookup", "full_document_before_change": "whenAvailable",
         "on_oversize": policy}
    if recipient:
        s.update(recipient="fullDocument.owner", full_document="whenAvailable")
    return s


@pytest.fixture
def big(db):
    db.create_collection("big", changeStreamPreAndPostImages={"enabled": True})
    db.big.insert_one({"_id": 1, "owner": "alice", "pad": "a" * BIG})
    return db.big


def start(daemons, tmp_path, mongo_uri, db_name, policy, max_message_bytes=None, cp=None,
          recipient=False):
    port = free_port()
    extra = {"max_message_bytes": max_message_bytes} if max_message_bytes else None
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"big": stream(db_name, policy, recipient)}, port,
                      auth=AUTH, sinks=[{"name": "out", "type": "stdout"}], server_extra=extra)
    if cp is not None:
        text = cfg.read_text().replace(
            "streams:", "checkpoint:\n  store: file\n  path: %s\n  interval_ms: 100\nstreams:"
            % json.dumps(str(cp)), 1)
        cfg.write_text(text)
    return start_live(daemons, cfg, port), port, cfg


def subscribe(subscribers, port, max_size=16 * MIB, admin=True):
    who = claims("root", roles=["mongocast:all"]) if admin else claims("alice")
    alice = subscribers.ws(port, stream_path("big", token=hs256(SECRET, who)),
                           name="alice", max_size=max_size)
    alice.wait_ready()
    return alice


def big_update(big):
    big.update_one({"_id": 1}, {"$set": {"pad": "b" * BIG}})
    big.insert_one({"_id": 2, "owner": "alice", "pad": "small"})


def sink_messages(d, n, timeout=60):
    wait_for(lambda: len([m for m in d.messages() if m.get("type") in ("change", "oversize")])
             >= n, timeout=timeout, interval=0.2, message="%d messages from the stdout sink" % n)
    return [m for m in d.messages() if m.get("type") in ("change", "oversize", "error")]


def fragments_of_update(client, db_name, start_after):
    """The fragments MongoDB makes of the update, read with the stage from `start_after`."""
    rs = RawStream(client, db_name, "big",
                   {"fullDocument": "updateLookup", "fullDocumentBeforeChange": "whenAvailable",
                    "resumeAfter": start_after},
                   pipeline=[{"$changeStreamSplitLargeEvent": {}}])
    try:
        frags = [rs.next(timeout=20)]
        while frags[-1]["splitEvent"]["fragment"] < frags[-1]["splitEvent"]["of"]:
            frags.append(rs.next(timeout=20))
        return frags
    finally:
        rs.close()


def test_split_delivers_one_reassembled_event(tmp_path, daemons, subscribers, client, db, db_name,
                                              mongo_uri, big):
    cp = tmp_path / "cp"
    d, port, cfg = start(daemons, tmp_path, mongo_uri, db_name, "split",
                         max_message_bytes=128 * MIB, cp=cp)
    alice = subscribe(subscribers, port, max_size=128 * MIB)
    big_update(big)
    got = alice.wait_changes(2, timeout=60)
    changes = [m for m in got if m.get("type") == "change"]
    assert [c["change"]["operationType"] for c in changes] == ["update", "insert"]
    upd = changes[0]["change"]
    assert "splitEvent" not in upd
    assert upd["fullDocument"]["pad"] == "b" * BIG
    assert upd["fullDocumentBeforeChange"]["pad"] == "a" * BIG
    assert upd["updateDescription"]["updatedFields"]["pad"] == "b" * BIG
    assert upd["documentKey"] == {"_id": 1} and upd["ns"] == {"db": db_name, "coll": "big"}
    # Usual field order (no transaction here); the resume token is carried once, as the
    # message's id, so the change leaves out its _id.
    assert "_id" not in upd
    assert list(upd)[:2] == ["operationType", "clusterTime"]

    sink = sink_messages(d, 2)
    assert [m["type"] for m in sink] == ["change", "change"]
    assert sink[0]["id"] == changes[0]["id"] and sink[0]["change"] == upd
    m = metrics(port)
    assert m['mongocast_stream_split_events_total{stream="big"}'] == 1

    # Stop; the stored position is at or after the insert (an event or a post-batch token,
    # never a fragment inside the update). A restart resumes after it.
    assert d.stop() == 0
    assert checkpoint_token(cp, "big", "out") >= changes[1]["id"]
    d2 = daemons(cfg, name="again")
    d2.wait_open()
    big.insert_one({"_id": 3, "owner": "alice"})
    wait_for(lambda: any(m.get("type") == "change" and m["change"]["documentKey"] == {"_id": 3}
                         for m in d2.messages()), timeout=30, message="the insert after restart")
    again = [m for m in d2.messages() if m.get("type") == "change"]
    assert [m["change"]["documentKey"]["_id"] for m in again] == [3]


def test_split_event_id_is_its_last_fragment(tmp_path, daemons, client, db, db_name, mongo_uri,
                                             big):
    """Checked against MongoDB's own fragments: opened from the insert before the update."""
    d, port, _ = start(daemons, tmp_path, mongo_uri, db_name, "split", max_message_bytes=128 * MIB)
    big.insert_one({"_id": 0, "owner": "bob"})
    big_update(big)
    sink = sink_messages(d, 3)
    assert [m["change"]["operationType"] for m in sink] == ["insert", "update", "insert"]
    frags = fragments_of_update(client, db_name, {"_data": sink[0]["id"]})
    assert len(frags) >= 2
    assert sink[1]["id"] == frags[-1]["_id"]["_data"]
    assert all(sink[1]["id"] != f["_id"]["_data"] for f in frags[:-1])
    fields = set()
    for f in frags:
        fields |= set(f) - {"_id", "splitEvent"}
    assert fields == set(sink[1]["change"]) - {"_id"}


def test_split_past_max_message_bytes_is_the_fanout_notice(tmp_path, daemons, subscribers, db,
                                                           db_name, mongo_uri, big):
    d, port, _ = start(daemons, tmp_path, mongo_uri, db_name, "split")  # 16 MiB messages
    alice = subscribe(subscribers, port)
    big_update(big)
    got = alice.wait(lambda ms: sum(1 for m in ms if m.get("type") in ("change", "oversize"))
                     >= 2, timeout=60, what="notice and insert")
    out = [m for m in got if m.get("type") in ("change", "oversize")]
    assert out[0]["type"] == "oversize" and out[0]["limit"] == 16 * MIB
    assert out[0]["size"] > 30 * MIB and out[0]["documentKey"] == {"_id": 1}
    assert out[1]["type"] == "change" and out[1]["change"]["documentKey"] == {"_id": 2}
    m = metrics(port)
    assert m['mongocast_stream_split_events_total{stream="big"}'] == 1


def check_notice(n, db_name, documented=True):
    assert n["type"] == "oversize" and n["stream"] == "big"
    assert n["limit"] == 16793600 and n["size"] > 16793600
    if documented:
        assert n["documentKey"] == {"_id": 1}
        assert n["operationType"] == "update"
        assert n["ns"] == {"db": db_name, "coll": "big"}
        assert n["recipient"] == "alice"


def test_skip_delivers_the_notice_then_the_next_events(tmp_path, daemons, subscribers, db,
                                                       db_name, mongo_uri, big):
    d, port, _ = start(daemons, tmp_path, mongo_uri, db_name, "skip", recipient=True)
    alice = subscribe(subscribers, port, admin=False)
    big_update(big)
    got = alice.wait(lambda ms: sum(1 for m in ms if m.get("type") in ("change", "oversize"))
                     >= 2, timeout=60, what="notice and insert")
    out = [m for m in got if m.get("type") in ("change", "oversize")]
    check_notice(out[0], db_name)
    assert out[1]["type"] == "change" and out[1]["change"]["documentKey"] == {"_id": 2}
    assert out[1]["id"] > out[0]["id"]
    sink = sink_messages(d, 2)
    assert [m["type"] for m in sink] == ["oversize", "change"]
    assert sink[0] == out[0]
    m = metrics(port)
    assert m['mongocast_stream_oversize_skipped_total{stream="big"}'] == 1
    assert "delivered as an oversize notice (on_oversize: skip)" in d.stderr_text()


def test_skip_without_the_split_stage(tmp_path, daemons, subscribers, client, db, db_name,
                                      mongo_uri, big, emulator_only):
    """A server that refuses $changeStreamSplitLargeEvent (before 6.0.9): the stream goes on
    without it, and the oversize event is skipped by the token in MongoDB's 10334 message."""
    with fail_point(client, "failCommand", {"times": 1},
                    {"failCommands": ["aggregate"], "errorCode": 40324, "appName": "mongocast"}):
        d, port, _ = start(daemons, tmp_path, mongo_uri, db_name, "skip", recipient=True)
    d.wait_stderr("does not know \\$changeStreamSplitLargeEvent")
    alice_admin = subscribers.ws(port, stream_path("big", token=hs256(
        SECRET, claims("root", roles=["mongocast:all"]))), name="admin")
    alice_admin.wait_ready()
    big_update(big)
    got = alice_admin.wait(lambda ms: sum(1 for m in ms if m.get("type") in ("change", "oversize"))
                           >= 2, timeout=60, what="notice and insert")
    out = [m for m in got if m.get("type") in ("change", "oversize")]
    check_notice(out[0], db_name, documented=False)
    assert out[0]["documentKey"] is None  # only the token is in the server's message
    assert out[1]["type"] == "change" and out[1]["change"]["documentKey"] == {"_id": 2}
    assert out[1]["id"] > out[0]["id"]
    m = metrics(port)
    assert m['mongocast_stream_oversize_skipped_total{stream="big"}'] == 1


def test_fail_fails_the_stream_once(tmp_path, daemons, subscribers, db, db_name, mongo_uri, big):
    d, port, _ = start(daemons, tmp_path, mongo_uri, db_name, "fail")
    alice = subscribe(subscribers, port)
    t0 = time.monotonic()
    big_update(big)
    got = alice.wait(lambda ms: any(m.get("type") == "error" for m in ms), timeout=60,
                     what="the error event")
    err = [m for m in got if m.get("type") == "error"][0]
    assert err["code"] == "event_too_large" and err["server_code"] == 10334
    assert not [m for m in got if m.get("type") in ("change", "oversize")]
    d.wait_stderr(r"change stream failed stream=big code=10334: .*BSONObj size: \d+")
    sink = sink_messages(d, 0)
    wait_for(lambda: any(m.get("type") == "error" for m in d.messages()), timeout=20,
             message="the sink's error event")
    time.sleep(1.0)  # would be several reopens if it retried
    text = d.stderr_text()
    assert text.count("code=10334") == 1, text[-3000:]
    assert "retry_in_ms" not in text
    assert time.monotonic() - t0 < 60
    assert d.alive()
    del sink
    assert d.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("policy", ["split", "skip"])
def test_catch_up_reads_oversize_events_the_same_way(tmp_path, daemons, db, db_name, mongo_uri,
                                                     big, policy):
    """A sink detached before the large event gets it from its catch-up thread (which runs the
    watcher's read loop from the sink's own position): the same reassembled event (split) or
    notice (skip), once, between the same neighbours."""
    port = free_port()
    path = tmp_path / "slow.jsonl"
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"big": stream(db_name, policy, False)},
                      port, sinks=[{"name": "slow", "type": "fault", "file": str(path),
                                    "block_after": 2, "block_ms": 3000, "max_lag_events": 20}],
                      server_extra={"max_message_bytes": 128 * MIB})
    d = daemons(cfg, env={"MONGOCAST_TEST_SINKS": "1"})
    wait_http(port, d)
    d.wait_open()
    big.insert_many([{"_id": 100 + i, "n": i} for i in range(40)])
    wait_for(lambda: metrics(port).get('mongocast_sink_detaches_total{sink="slow"}', 0) >= 1,
             timeout=30, message="the blocked sink is detached")
    big_update(big)

    def lines():
        return [m for m in read_jsonl(path)[0] if m.get("type") in ("change", "oversize")]
    wait_for(lambda: len(lines()) >= 42, timeout=90, interval=0.5,
             message="the detached sink catches up past the large event")
    got = lines()
    keys = [m["change"]["documentKey"]["_id"] if m["type"] == "change" else m["documentKey"]["_id"]
            for m in got]
    assert keys == [100 + i for i in range(40)] + [1, 2]
    large = got[40]
    if policy == "split":
        assert large["type"] == "change" and large["change"]["fullDocument"]["pad"] == "b" * BIG
        assert "splitEvent" not in large["change"]
    else:
        check_notice(large, db_name, documented=False)
        assert large["documentKey"] == {"_id": 1} and large["operationType"] == "update"
