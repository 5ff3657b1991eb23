"""Stage order is the written order (RESTHeart-style `$var` streams).

A stream pipeline with a `{$var: n}` stage runs the stages before it on the server and that
stage and every later one in the daemon, per subscriber. Each case subscribes with
`vars={"n": ...}`, writes the same documents, and compares what the subscriber received with
what the server itself gives for the whole pipeline with the value written in (a change stream
opened by pymongo before the writes): the same events, in the same order, with the same
`change` bodies (relaxed Extended JSON), whichever stage comes first. Then the raw frames: the
control messages are compact JSON, as docs/protocol.md spells them. Then the limits that hold
for the per-subscriber stages: the subscriber's CPU budget and server.max_message_bytes. Runs
unchanged against a real replica set (MONGODB_URI).
"""

import json
import time

from bson import json_util

from daemon_util import *  # noqa: F401,F403
from live_util import free_port, live_config, start_live, stream_path, subscribers  # noqa: F401
from server_util import RawWS, metrics

RELAXED = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED, tz_aware=False)

DOCS = [
    {"_id": 1, "name": "pen", "price": 2, "stock": 10},
    {"_id": 2, "name": "ink", "price": 5, "stock": 3},
    {"_id": 3, "name": "pen", "price": 3, "stock": 7},
]


def substitute(pipeline, value):
    """The pipeline with {"$var": "n"} replaced by the value, as MongoDB would run it."""
    if isinstance(pipeline, dict):
        if set(pipeline) == {"$var"}:
            return value
        return {k: substitute(v, value) for k, v in pipeline.items()}
    if isinstance(pipeline, list):
        return [substitute(v, value) for v in pipeline]
    return pipeline


def write(coll):
    """Inserts, then updates and a delete (whose events carry no fullDocument: the stream has
    full_document: default, so a match on fullDocument.name drops them, here and on the
    server alike)."""
    for d in DOCS:
        coll.insert_one(dict(d))
    coll.update_one({"_id": 1}, {"$set": {"stock": 9}})
    coll.update_one({"_id": 2}, {"$set": {"stock": 2}})
    coll.delete_one({"_id": 3})


def server_side(coll, pipeline, n_expected, timeout=20.0):
    """What the server gives for `pipeline` (relaxed JSON, as the daemon sends it)."""
    out = []
    deadline = time.monotonic() + timeout
    with coll.watch(pipeline, max_await_time_ms=100) as cs:
        write(coll)
        while len(out) < n_expected and time.monotonic() < deadline:
            ev = cs.try_next()
            if ev is not None:
                out.append(json.loads(json_util.dumps(ev, json_options=RELAXED)))
        # Whatever else the server still has (nothing, when n_expected is right).
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            ev = cs.try_next()
            if ev is not None:
                out.append(json.loads(json_util.dumps(ev, json_options=RELAXED)))
    return out


CASES = {
    # $var match, then $project: the projection runs per subscriber, after its match.
    "match_then_project": ([
        {"$match": {"operationType": {"$in": ["insert", "update"]}}},
        {"$match": {"fullDocument.name": {"$var": "n"}}},
        {"$project": {"operationType": 1, "fullDocument.name": 1, "fullDocument.price": 1}},
    ], "pen", 2),
    # $project, then $var match on a field it keeps: the projection runs on the server.
    "project_then_match": ([
        {"$project": {"operationType": 1, "fullDocument.name": 1, "documentKey": 1}},
        {"$match": {"fullDocument.name": {"$var": "n"}}},
    ], "ink", 1),
    # $var match, then reshaping stages with expressions (computed by the daemon).
    "match_then_set_unset": ([
        {"$match": {"fullDocument.name": {"$var": "n"}}},
        {"$set": {"low": {"$lte": ["$fullDocument.stock", 9]},
                  "label": {"$concat": ["$fullDocument.name", "!"]}}},
        {"$unset": ["fullDocument", "wallTime", "ns"]},
    ], "pen", 2),
}


def _case(name, tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    pipeline, value, n_expected = CASES[name]
    coll_name = "c_" + name
    db.create_collection(coll_name)
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri,
                      {"s": {"db": db_name, "collection": coll_name, "public": True,
                             "max_await_time_ms": 100, "pipeline": pipeline}}, port)
    start_live(daemons, cfg, port)
    sub = subscribers.ws(port, stream_path("s", vars={"n": value}), name=name)
    sub.wait_ready()
    want = server_side(db[coll_name], substitute(pipeline, value), n_expected)
    assert len(want) == n_expected, want
    got = sub.wait_changes(n_expected)
    changes = [full_change(m) for m in got if m["type"] == "change"]
    time.sleep(0.5)
    assert len(sub.changes()) == n_expected, sub.changes()
    assert changes == want
    for m in got:
        if m["type"] == "change":
            # The message's id is the event's resume token, untouched by the stages, and
            # carried once (not again as change._id).
            assert "_id" not in m["change"]
    return changes


def test_match_then_project(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    changes = _case("match_then_project", tmp_path, daemons, subscribers, db, db_name, mongo_uri)
    assert all(set(c) == {"_id", "operationType", "fullDocument"} for c in changes), changes
    assert all(c["fullDocument"]["name"] == "pen" and "stock" not in c["fullDocument"]
               for c in changes)


def test_project_then_match(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    changes = _case("project_then_match", tmp_path, daemons, subscribers, db, db_name, mongo_uri)
    assert [c["documentKey"]["_id"] for c in changes] == [2]
    assert changes[0]["fullDocument"] == {"name": "ink"}


def test_match_then_set_unset(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    changes = _case("match_then_set_unset", tmp_path, daemons, subscribers, db, db_name, mongo_uri)
    assert [(c["documentKey"]["_id"], c["low"], c["label"]) for c in changes] == [
        (1, False, "pen!"), (3, True, "pen!")]


def test_project_removes_matched_field(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    """$project without the field, then a $var match on it: MongoDB gives nothing, and so does
    the subscriber, while another subscriber of a stream without that $project gets all."""
    db.create_collection("gone")
    port = free_port()
    pipeline = [{"$project": {"operationType": 1}},
                {"$match": {"fullDocument.name": {"$var": "n"}}}]
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {
        "s": {"db": db_name, "collection": "gone", "public": True, "max_await_time_ms": 100,
              "pipeline": pipeline},
        "all": {"db": db_name, "collection": "gone", "public": True, "max_await_time_ms": 100},
    }, port)
    start_live(daemons, cfg, port, n_streams=2)
    sub = subscribers.ws(port, stream_path("s", vars={"n": "pen"}), name="s")
    ctl = subscribers.ws(port, stream_path("all"), name="all")
    sub.wait_ready()
    ctl.wait_ready()
    assert server_side(db["gone"], substitute(pipeline, "pen"), 0) == []
    ctl.wait_changes(6)
    time.sleep(0.5)
    assert sub.changes() == []


def test_stage_error_ends_only_that_subscriber(tmp_path, daemons, subscribers, db, db_name,
                                               mongo_uri):
    """A per-subscriber stage that fails on an event ends that subscriber with an error
    message (MongoDB would fail its change stream); others of the same stream go on."""
    db.create_collection("bad")
    port = free_port()
    pipeline = [{"$match": {"fullDocument.kind": {"$var": "k"}}},
                {"$set": {"x": {"$add": ["$fullDocument.name", 1]}}}]
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {
        "s": {"db": db_name, "collection": "bad", "public": True, "max_await_time_ms": 100,
              "pipeline": pipeline}}, port)
    start_live(daemons, cfg, port)
    failing = subscribers.ws(port, stream_path("s", vars={"k": "text"}), name="failing")
    fine = subscribers.ws(port, stream_path("s", vars={"k": "number"}), name="fine")
    failing.wait_ready()
    fine.wait_ready()
    db["bad"].insert_one({"_id": 1, "kind": "text", "name": "pen"})
    db["bad"].insert_one({"_id": 2, "kind": "number", "name": 41})
    msgs = failing.wait(lambda ms: any(m["type"] == "error" for m in ms), what="error")
    err = [m for m in msgs if m["type"] == "error"][0]
    assert err == {"type": "error", "stream": "s", "code": "pipeline_error", "server_code": 16554,
                   "reason": "a pipeline stage that runs for this subscriber failed on an event"}
    failing.wait(lambda ms: failing.closed, what="close")
    assert failing.close_code == 4010
    got = fine.wait_changes(1)
    assert [m["change"]["x"] for m in got if m["type"] == "change"] == [42]


def test_control_messages_are_compact(tmp_path, daemons, db, db_name, mongo_uri):
    """The bytes on the wire, as docs/protocol.md shows them."""
    db.create_collection("raw")
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {
        "orders": {"db": db_name, "collection": "raw", "public": True,
                   "max_await_time_ms": 100}}, port)
    start_live(daemons, cfg, port)
    ws = RawWS(port, "/v1/streams/orders?since=00")
    try:
        assert ws.status == 101
        frames = [ws.recv_frame()[2] for _ in range(2)]
        # "00" is no resume token: the catch-up it asks for ends with reset unknown_id.
        assert frames == [b'{"type":"ready","stream":"orders"}',
                          b'{"type":"reset","stream":"orders","reason":"unknown_id"}']
        db["raw"].insert_one({"_id": 1, "a": [1, {"b": None}]})
        body = ws.recv_frame()[2].decode()
        assert body.startswith('{"type":"change","stream":"orders","id":"'), body
        # The token once, as "id"; the change starts with what follows its _id.
        assert ',"change":{"operationType":"insert",' in body, body
        assert '"_data"' not in body, body
        assert ' ' not in body.replace('"Z"', ''), body  # no whitespace outside strings
        assert json.loads(body)["change"]["fullDocument"] == {"_id": 1, "a": [1, {"b": None}]}
    finally:
        ws.close()


def test_expensive_stage_closed_4003_and_own_message_held_to_the_limit(
        tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    """The per-subscriber stages run within the subscriber's CPU budget, like its filter: a
    `$set` over a huge array closes that subscriber with 4003 instead of holding the loop,
    while another subscriber of the stream goes on. A reshaped message past
    server.max_message_bytes becomes that subscriber's oversize notice, which carries nothing
    its stages removed (here `ns`)."""
    db.create_collection("heavy")
    port = free_port()
    pipeline = [{"$match": {"fullDocument.kind": {"$var": "k"}}},
                {"$set": {"n": {"$size": {"$ifNull": ["$fullDocument.big", []]}}}},
                {"$unset": "ns"}]
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {
        "s": {"db": db_name, "collection": "heavy", "public": True, "max_await_time_ms": 100,
              "pipeline": pipeline}}, port,
        server_extra={"filter_budget_us": 100, "max_message_bytes": 4096})
    start_live(daemons, cfg, port)
    heavy = subscribers.ws(port, stream_path("s", vars={"k": "heavy"}), name="heavy")
    light = subscribers.ws(port, stream_path("s", vars={"k": "light"}), name="light")
    heavy.wait_ready()
    light.wait_ready()
    db["heavy"].insert_one({"_id": 1, "kind": "heavy", "big": list(range(200000))})
    db["heavy"].insert_one({"_id": 2, "kind": "light", "s": "x" * 100})
    db["heavy"].insert_one({"_id": 3, "kind": "light", "s": "x" * 5000})
    heavy.wait(lambda ms: heavy.closed, what="close")
    assert heavy.close_code == 4003
    assert heavy.changes() == []
    got = light.wait(lambda ms: sum(m["type"] in ("change", "oversize") for m in ms) >= 2,
                     what="a change and an oversize notice")
    change, notice = [m for m in got if m["type"] in ("change", "oversize")]
    assert change["type"] == "change" and change["change"]["n"] == 0
    assert "ns" not in change["change"] and change["change"]["documentKey"] == {"_id": 2}
    assert notice["type"] == "oversize", notice
    assert notice["operationType"] == "insert" and notice["ns"] is None, notice
    assert notice["documentKey"] == {"_id": 3} and notice["limit"] == 4096, notice
    assert notice["size"] > 5000 and notice["id"] != change["id"]
    m = metrics(port)
    assert m["mongocast_filter_budget_disconnects_total"] >= 1
    assert m["mongocast_oversize_events_total"] >= 1
    assert not light.closed
