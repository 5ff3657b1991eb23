"""What one subscriber asks for (DESIGN §4.3, subscription.h): `vars` binding the stream's
{$var: name} placeholders (and refusing operator injection), `filter` queries over the change
event (refusing code operators, oversize and over-deep queries), streams that do not allow
filters, and `since` values that are not event ids. Refusals are 400 with the JSON body
before the upgrade; accepted subscriptions receive exactly the matching changes.

One daemon per module, no auth (the streams are public). Runs unchanged against a real
replica set (MONGODB_URI).
"""

import json
import uuid

import pytest

from daemon_util import *  # noqa: F401,F403
from live_util import (assert_refused, free_port, live_config, stream_path, subscribers,  # noqa: F401
                       module_server, upgrade, wait_http)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, mongo_uri):
    tmp = tmp_path_factory.mktemp("sub")
    port = free_port()
    dbname = "mct_live_sub_%s" % uuid.uuid4().hex[:8]
    base = {"db": dbname, "collection": "c", "public": True, "max_await_time_ms": 100}
    streams = {
        "byowner": dict(base, pipeline=[
            {"$match": {"operationType": "insert", "fullDocument.owner": {"$var": "owner"}}}]),
        "twovars": dict(base, pipeline=[
            {"$match": {"fullDocument.owner": {"$var": "owner"},
                        "fullDocument.kind": {"$in": [{"$var": "kind"}, "always"]}}}]),
        "filtered": dict(base, client_filters=True),
        "nofilters": dict(base, client_filters=False),
    }
    cfg = live_config(tmp / "c.yaml", mongo_uri, streams, port)
    with module_server(cfg, tmp, port, mongo_uri, dbname, len(streams)) as s:
        yield s


def _tag():
    return uuid.uuid4().hex[:10]


def _inserted_tags(sub):
    return [m["change"]["fullDocument"]["t"] for m in sub.changes()
            if m["change"]["operationType"] == "insert"]


# ---- $var ----

@pytest.mark.parametrize("vars_value,message", [
    (None, r"variable owner not bound"),
    ({}, r"variable owner not bound"),
    ({"other": "x"}, r"variable owner not bound"),
    ({"owner": {"$ne": None}}, r"\$ne|operator"),
    ({"owner": {"$gt": ""}}, r"\$gt|operator"),
    ({"owner": {"$regex": ".*"}}, r"\$regex|operator|regular expression"),
    ("not json", None),
    ("[\"owner\"]", None),
    ("\"u1\"", None),
])
def test_vars_refused(srv, vars_value, message):
    for sse in (False, True):
        res = upgrade(srv.port, stream_path("byowner", vars=vars_value), sse=sse)
        assert_refused(res, 400, "invalid_vars", message)


def test_vars_second_variable_unbound(srv):
    assert_refused(upgrade(srv.port, stream_path("twovars", vars={"owner": "u1"})), 400,
                   "invalid_vars", r"variable kind not bound")


def test_vars_bind_per_subscriber(srv, subscribers):
    u1 = subscribers.ws(srv.port, stream_path("byowner", vars={"owner": "u1"}), name="u1")
    u2 = subscribers.sse(srv.port, stream_path("byowner", vars={"owner": "u2"}), name="u2")
    for s in (u1, u2):
        s.wait_ready()
    t = _tag()
    writes = [("u1", "a"), ("u2", "b"), ("u3", "c"), ("u1", "d"), ("u2", "f")]
    for owner, n in writes:
        srv.coll.insert_one({"owner": owner, "t": t + n})
    srv.coll.update_one({"t": t + "a"}, {"$set": {"x": 1}})  # the pipeline keeps inserts only
    u1.wait_changes(2)
    u2.wait_changes(2)
    srv.coll.insert_one({"owner": "u1", "t": t + "z"})  # a fence: everything before has arrived
    u1.wait_changes(3)
    assert _inserted_tags(u1) == [t + "a", t + "d", t + "z"]
    assert _inserted_tags(u2) == [t + "b", t + "f"]


def test_two_vars(srv, subscribers):
    s = subscribers.ws(srv.port, stream_path("twovars", vars={"owner": "u9", "kind": "k1"}))
    s.wait_ready()
    t = _tag()
    for owner, kind, n in [("u9", "k1", "a"), ("u9", "k2", "b"), ("u8", "k1", "c"),
                           ("u9", "always", "d")]:
        srv.coll.insert_one({"owner": owner, "kind": kind, "t": t + n})
    s.wait_changes(2)
    srv.coll.insert_one({"owner": "u9", "kind": "k1", "t": t + "z"})
    s.wait_changes(3)
    assert _inserted_tags(s) == [t + "a", t + "d", t + "z"]


# ---- filter ----

def _deep(n):
    q = {"fullDocument.x": 1}
    for _ in range(n):
        q = {"$and": [q]}
    return q


REFUSED_FILTERS = [
    ("where", {"$where": "sleep(5000) || true"}, r"\$where"),
    ("where_nested", {"$and": [{"operationType": "insert"}, {"$where": "true"}]}, r"\$where"),
    ("expr", {"$expr": {"$eq": ["$fullDocument.a", "$fullDocument.b"]}}, r"\$expr"),
    ("function", {"$expr": {"$function": {"body": "function(){return true}", "args": [],
                                          "lang": "js"}}}, r"\$expr|\$function"),
    ("function_field", {"fullDocument.a": {"$function": {}}}, r"\$function"),
    ("accumulator", {"fullDocument.a": {"$accumulator": {}}}, r"\$accumulator"),
    ("unknown_op", {"fullDocument.a": {"$bogus": 1}}, r"\$bogus"),
    ("not_json", "{fullDocument: ", None),
    ("not_object", "[1, 2]", None),
    ("too_deep", _deep(40), None),
    ("too_big", {"fullDocument.t": {"$in": ["x" * 100] * 200}}, None),
]


@pytest.mark.parametrize("name,query,message", REFUSED_FILTERS,
                         ids=[f[0] for f in REFUSED_FILTERS])
def test_filter_refused(srv, name, query, message):
    for sse in (False, True):
        res = upgrade(srv.port, stream_path("filtered", filter=query), sse=sse)
        if name == "too_big" and res[0] in (414, 431):
            continue  # the request line itself is over the server's limit: refused earlier
        assert_refused(res, 400, "invalid_filter", message)


def test_filters_not_allowed(srv):
    for sse in (False, True):
        res = upgrade(srv.port, stream_path("nofilters", filter={"operationType": "insert"}),
                      sse=sse)
        body = assert_refused(res, 400, "filters_not_allowed")
        assert "nofilters" in body["error"] or "filter" in body["error"]
    # Without a filter the same stream is fine.
    assert upgrade(srv.port, stream_path("nofilters"))[0] == 101


def test_filter_selects_changes(srv, subscribers):
    t = _tag()
    q = {"operationType": {"$in": ["insert", "update"]}, "fullDocument.t": {"$regex": "^" + t},
         "fullDocument.qty": {"$gt": 5}}
    big = subscribers.ws(srv.port, stream_path("filtered", filter=q), name="big")
    dels = subscribers.sse(srv.port, stream_path("filtered", filter={
        "operationType": "delete"}), name="deletes")
    every = subscribers.ws(srv.port, stream_path("filtered"), name="all")
    for s in (big, dels, every):
        s.wait_ready()
    srv.coll.insert_many([{"t": t + "a", "qty": 3}, {"t": t + "b", "qty": 9},
                          {"t": t + "c", "qty": 6}])
    srv.coll.update_one({"t": t + "a"}, {"$set": {"qty": 10}})   # now > 5: updateLookup off,
    srv.coll.delete_one({"t": t + "b"})                          # so updates carry no doc
    srv.coll.insert_one({"t": t + "z", "qty": 100})
    every.wait_changes(6)
    big.wait_changes(3)
    dels.wait_changes(1)
    got = [(m["change"]["operationType"], m["change"].get("fullDocument", {}).get("t"))
           for m in big.changes()]
    # Default full_document: updates carry no fullDocument, so the qty filter skips them.
    assert got == [("insert", t + "b"), ("insert", t + "c"), ("insert", t + "z")]
    assert [m["change"]["operationType"] for m in dels.changes()] == ["delete"]
    assert [m["change"]["operationType"] for m in every.changes()] == [
        "insert", "insert", "insert", "update", "delete", "insert"]
    # Same events, same ids, whatever the filter.
    ids = {m["id"] for m in every.changes()}
    assert {m["id"] for m in big.changes()} <= ids
    assert {m["id"] for m in dels.changes()} <= ids


# ---- since ----

@pytest.mark.parametrize("since", ["garbage", "zz" * 40, "%00", ""])
def test_bad_since_is_400(srv, since):
    res = upgrade(srv.port, stream_path("filtered", since=since))
    if since == "" and res[0] == 101:
        return  # an empty since may mean "no since"; both readings are valid
    assert_refused(res, 400, "invalid_since")


def test_since_resumes_after_the_given_event(srv, subscribers):
    first = subscribers.ws(srv.port, stream_path("filtered"), name="first")
    first.wait_ready()
    t = _tag()
    srv.coll.insert_many([{"t": t + str(i)} for i in range(5)])
    first.wait_changes(5)
    ids = [m["id"] for m in first.changes()]
    again = subscribers.sse(srv.port, stream_path("filtered", since=ids[1]), name="again")
    again.wait_changes(3)
    assert [m["id"] for m in again.changes()][:3] == ids[2:]
    assert [m["change"]["fullDocument"]["t"] for m in again.changes()][:3] == [
        t + "2", t + "3", t + "4"]
    assert not any(m.get("type") == "reset" for m in again.messages())
    json.dumps(again.messages())  # all plain JSON
