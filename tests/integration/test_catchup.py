"""Catch-up from the oplog for resumes the history ring does not hold (docs/protocol.md,
"Resume"; src/daemon/catchup.c): a subscriber that resumes after an id older than the ring
receives exactly what a live subscriber with the same view (its `$var`s, its filter) received
after that id, then the live stream with no gap and no duplicate; limits end a catch-up with a
reset and its reason.

The stream keeps a history of 50 messages, so every resume below from more than 50 events back
is served by a catch-up. The issue asks for a catch-up 50,000 events back; under the ASan build
on a loaded 2-core machine this file uses 4,000 (the catch-up reads every one of them: the
subscriber's view keeps about one in four), which keeps the file well under a minute.
"""

import json
import time
import uuid

import pytest

from daemon_util import *  # noqa: F401,F403
from daemon_util import Daemon, wait_for
from live_util import (free_port, http_get, live_config, module_server, stream_path,  # noqa: F401
                       subscribers, wait_http)
from conftest import real_server_uri

N_FAR = 4000
HISTORY = 50


@pytest.fixture(scope="module")
def srv(tmp_path_factory, mongo_uri):
    tmp = tmp_path_factory.mktemp("catchup")
    port = free_port()
    dbname = "mct_catchup_%s" % uuid.uuid4().hex[:8]
    base = {"db": dbname, "collection": "c", "public": True, "max_await_time_ms": 100,
            "history": HISTORY}
    streams = {
        # A per-subscriber stage with a $var, and client filters on top.
        "byteam": dict(base, client_filters=True, full_document="updateLookup", pipeline=[
            {"$match": {"operationType": {"$in": ["insert", "update"]}}},
            {"$match": {"fullDocument.team": {"$var": "team"}}}]),
        "small": dict(base, max_catchup_events=30),
    }
    cfg = live_config(tmp / "c.yaml", mongo_uri, streams, port,
                      server_extra={"catchup_timeout_ms": 20000})
    with module_server(cfg, tmp, port, mongo_uri, dbname, len(streams)) as s:
        yield s


def _ids(msgs):
    return [m["id"] for m in msgs if m.get("type") == "change"]


def _metric(port, name):
    body = http_get(port, "/metrics")[2].decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_far_catchup_equals_live_view(srv, subscribers):
    """A resume N_FAR events back, with a $var stage and a client filter: the catch-up sends
    exactly what a live subscriber with the same view received after that id, in order, then
    both get the same live changes (the splice has no gap and no duplicate)."""
    vars_ = {"team": "red"}
    flt = {"fullDocument.n": {"$mod": [2, 0]}}
    # An anchor event every subscriber sees: the id to resume after.
    everything = subscribers.ws(srv.port, stream_path("byteam", vars={"team": "anchor"}),
                                name="anchor")
    live = subscribers.ws(srv.port, stream_path("byteam", vars=vars_, filter=flt), name="live")
    everything.wait_ready()
    live.wait_ready()
    srv.coll.insert_one({"team": "anchor", "n": -1})
    since = _ids(everything.wait_changes(1))[0]
    teams = ["red", "blue"]
    batch = []
    for n in range(N_FAR):
        batch.append({"team": teams[(n // 3) % 2], "n": n})
        if len(batch) == 500:
            srv.coll.insert_many(batch, ordered=True)
            batch = []
    if batch:
        srv.coll.insert_many(batch, ordered=True)
    # Updates too (full_document: updateLookup): changes whose filter field moved.
    srv.coll.update_many({"n": {"$lt": 40}}, {"$inc": {"n": 1}})
    srv.coll.insert_one({"team": "red", "n": 10 ** 6})  # the end marker
    done = lambda ms: any(m.get("type") == "change" and  # noqa: E731
                          m["change"]["fullDocument"]["n"] == 10 ** 6 for m in ms)
    live.wait(done, 40, "the end marker")
    expected_n = len(live.changes())
    assert expected_n > N_FAR // 8
    before = _metric(srv.port, "mongocast_catchups_total{result=\"joined\"}")

    resumed = subscribers.ws(srv.port, stream_path("byteam", since=since, vars=vars_,
                                                   filter=flt), name="resumed")
    resumed.wait_changes(expected_n, timeout=40)
    msgs = resumed.messages()
    assert not any(m.get("type") == "reset" for m in msgs), msgs[:5]
    assert _ids(msgs) == _ids(live.messages())
    # The same message, byte for byte as JSON values (views, summaries, shapes).
    assert [m for m in msgs if m.get("type") == "change"] == live.changes()
    wait_for(lambda: _metric(srv.port, "mongocast_catchups_total{result=\"joined\"}") > before,
             timeout=20, message="the catch-up to join the live stream")

    # Live after the join: both get the same new changes, once each.
    srv.coll.insert_many([{"team": "red", "n": 100000 + k} for k in range(0, 20, 2)])
    live.wait_changes(expected_n + 10)
    resumed.wait_changes(expected_n + 10)
    time.sleep(0.5)
    assert _ids(resumed.messages()) == _ids(live.messages())


def test_catchup_from_an_idle_stream_joins(srv, subscribers):
    """A catch-up that reaches the end of the oplog on a quiet stream joins at once (the
    router has handed out nothing after it), then gets live changes exactly once."""
    first = subscribers.ws(srv.port, stream_path("byteam", vars={"team": "quiet"}), name="first")
    first.wait_ready()
    srv.coll.insert_many([{"team": "quiet", "n": k} for k in range(HISTORY + 20)])
    got = first.wait_changes(HISTORY + 20)
    since = _ids(got)[0]
    resumed = subscribers.ws(srv.port, stream_path("byteam", since=since,
                                                   vars={"team": "quiet"}), name="resumed")
    resumed.wait_changes(HISTORY + 19)
    wait_for(lambda: any(m.get("type") == "ready" for m in resumed.messages()), timeout=10,
             message="ready")
    srv.coll.insert_one({"team": "quiet", "n": -5})
    first.wait_changes(HISTORY + 21)
    resumed.wait_changes(HISTORY + 20)
    time.sleep(0.5)
    assert _ids(resumed.messages()) == _ids(first.messages())[1:]


def _reset_reason(sub, timeout=20):
    msgs = sub.wait(lambda ms: any(m.get("type") == "reset" for m in ms), timeout, "reset")
    return [m for m in msgs if m.get("type") == "reset"][0]["reason"]


def test_too_many_events_resets(srv, subscribers):
    """More than the stream's max_catchup_events to read: reset catchup_too_large, then live."""
    first = subscribers.ws(srv.port, stream_path("small"), name="first")
    first.wait_ready()
    srv.coll.insert_many([{"team": "x", "n": k} for k in range(HISTORY + 40)])
    since = _ids(first.wait_changes(HISTORY + 40))[0]
    sub = subscribers.ws(srv.port, stream_path("small", since=since), name="big")
    assert _reset_reason(sub) == "catchup_too_large"
    srv.coll.insert_one({"team": "x", "n": -1})
    sub.wait(lambda ms: any(m.get("type") == "change" and m["change"]["fullDocument"]["n"] == -1
                            for m in ms), 20, "the live change after the reset")


def test_unknown_id_resets(srv, subscribers):
    """An id older than the history that names no event of this stream (a real event's token
    with another documentKey): reset unknown_id (the server's 280)."""
    first = subscribers.ws(srv.port, stream_path("small"), name="first")
    first.wait_ready()
    srv.coll.insert_many([{"team": "x", "n": k} for k in range(HISTORY + 5)])
    real = _ids(first.wait_changes(HISTORY + 5))[0]  # no longer in the ring
    k = len(real) - 10  # inside the documentKey's ObjectId
    fake = real[:k] + ("0" if real[k] != "0" else "1") + real[k + 1:]
    sub = subscribers.ws(srv.port, stream_path("small", since=fake), name="fake")
    assert _reset_reason(sub) == "unknown_id"


@pytest.mark.emulator_only
def test_history_lost_resets(srv, subscribers):
    """An id no longer in the oplog (the emulator's emulatorTruncateOplog): reset
    history_lost."""
    first = subscribers.ws(srv.port, stream_path("small"), name="first")
    first.wait_ready()
    srv.coll.insert_many([{"team": "x", "n": k} for k in range(HISTORY + 10)])
    since = _ids(first.wait_changes(HISTORY + 10))[0]  # no longer in the ring
    srv.client.admin.command({"emulatorTruncateOplog": 1, "keepLast": 0})
    sub = subscribers.ws(srv.port, stream_path("small", since=since), name="lost")
    assert _reset_reason(sub) == "history_lost"


@pytest.mark.parametrize("images", [True, False], ids=["preimages", "no-preimages"])
def test_lookup_recipient_catchup_routes_as_of_each_event(tmp_path, mongo_uri, daemons,
                                                          subscribers, images):
    """A lookup recipient (orders -> businesses.owner): the owner of a business changes half
    way. With pre-images on the lookup collection, a catch-up over both halves routes every
    old order as of its own cluster time, with the catch-up's own lookup (which reads the
    current owner and rolls the lookup collection's changes back to each event's time): the
    resumed alice and bob receive exactly what they received live, and neither gets the other's
    orders. Without pre-images the owner before the change cannot be proven for old events:
    the catch-up fails closed with reset catchup_unresolved (never a leak, never a silent
    gap)."""
    import pymongo
    from live_util import claims, hs256
    secret = "catchup-lookup-secret-0123456789abcdef0123456789"
    db = "mct_cu_lookup_%s" % uuid.uuid4().hex[:8]
    port = free_port()
    streams = {"orders": {"db": db, "collection": "orders", "history": 20,
                          "max_await_time_ms": 100,
                          "recipient": {"path": "fullDocument.biz",
                                        "lookup": {"db": db, "collection": "businesses",
                                                   "field": "_id", "recipient": "owner"}}}}
    cfg = live_config(tmp_path / "l.yaml", mongo_uri, streams, port,
                      auth={"algorithm": "HS256", "secret": secret, "admin_role": "admin"})
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=15000)
    if images:
        client[db].create_collection("businesses",
                                     changeStreamPreAndPostImages={"enabled": True})
    client[db]["businesses"].insert_one({"_id": "b1", "owner": "alice"})
    d = daemons(cfg)
    wait_http(port, d)
    d.wait_open(1)
    tok = {u: hs256(secret, claims(u)) for u in ("alice", "bob")}
    admin = subscribers.ws(port, stream_path("orders", token=hs256(
        secret, claims("root", roles=["admin"]))), name="admin")
    live = {u: subscribers.ws(port, stream_path("orders", token=tok[u]), name=u)
            for u in tok}
    admin.wait_ready()
    for s in live.values():
        s.wait_ready()
    orders = client[db]["orders"]
    orders.insert_one({"biz": "b1", "n": -1})
    since = _ids(admin.wait_changes(1))[0]
    for n in range(60):
        orders.insert_one({"biz": "b1", "n": n})
    client[db]["businesses"].update_one({"_id": "b1"}, {"$set": {"owner": "bob"}})
    for n in range(60, 120):
        orders.insert_one({"biz": "b1", "n": n})
    admin.wait_changes(121)
    live["alice"].wait_changes(61)
    live["bob"].wait_changes(60)
    time.sleep(0.5)
    assert [c["change"]["fullDocument"]["n"] for c in live["alice"].changes()] == \
        list(range(-1, 60))
    resumed = {u: subscribers.ws(port, stream_path("orders", token=tok[u], since=since),
                                 name="resumed-" + u) for u in tok}
    if not images:
        for u in tok:
            assert _reset_reason(resumed[u]) == "catchup_unresolved"
            # The first order after `since` is already unprovable: nothing was shown.
            assert resumed[u].changes() == []
        client.drop_database(db)
        client.close()
        return
    resumed["alice"].wait_changes(60)
    resumed["bob"].wait_changes(60)
    time.sleep(0.5)
    for u in tok:
        msgs = resumed[u].messages()
        assert not any(m.get("type") == "reset" for m in msgs), msgs[:3]
        assert _ids(msgs) == _ids(live[u].messages())[1 if u == "alice" else 0:]
    client.drop_database(db)
    client.close()


def test_busy_and_sse_resume(tmp_path, mongo_uri, daemons, subscribers):
    """server.max_catchups: 1. A catch-up whose client reads nothing stalls on its own bounded
    queue and keeps its slot: a second resume gets reset catchup_busy (then live). Once the
    stalled client leaves, an SSE client resuming with Last-Event-ID is caught up."""
    import pymongo
    from server_util import RawWS
    db = "mct_cu_busy_%s" % uuid.uuid4().hex[:8]
    port = free_port()
    cfg = live_config(tmp_path / "b.yaml", mongo_uri,
                      {"s": {"db": db, "collection": "c", "public": True, "history": 5,
                             "max_await_time_ms": 100}}, port,
                      server_extra={"max_catchups": 1})
    d = daemons(cfg)
    wait_http(port, d)
    d.wait_open(1)
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=15000)
    first = subscribers.ws(port, stream_path("s"), name="first")
    first.wait_ready()
    pad = "x" * 2000
    for k in range(0, 3000, 500):
        client[db]["c"].insert_many([{"n": n, "pad": pad} for n in range(k, k + 500)])
    ids = _ids(first.wait_changes(3000, timeout=40))
    # About 6 MB to catch up: more than the catch-up's queue and the connection's half.
    stalled = RawWS(port, "/v1/streams/s?since=%s" % ids[0], rcvbuf=4096)
    wait_for(lambda: _metric(port, "mongocast_catchups_active") == 1, timeout=10,
             message="the stalled catch-up")
    time.sleep(0.5)
    busy = subscribers.ws(port, stream_path("s", since=ids[1]), name="busy")
    assert _reset_reason(busy) == "catchup_busy"
    stalled.sock.close()
    wait_for(lambda: _metric(port, "mongocast_catchups_active") == 0, timeout=10,
             message="the stalled catch-up to end with its connection")
    sse = subscribers.sse(port, stream_path("s"), headers={"Last-Event-ID": ids[2990]},
                          name="sse")
    sse.wait_changes(9)
    time.sleep(0.3)
    assert _ids(sse.messages()) == ids[2991:]
    client.drop_database(db)
    client.close()


def test_catchup_resumes_inside_a_transaction(srv, subscribers):
    """The writes of one transaction share its commit's cluster time but have distinct ids in
    order: a resume after the third write of a transaction older than the history gets exactly
    the rest of it, then what followed."""
    vars_ = {"team": "tx"}
    live = subscribers.ws(srv.port, stream_path("byteam", vars=vars_), name="live")
    live.wait_ready()
    with srv.client.start_session() as s:
        with s.start_transaction():
            for n in range(10):
                srv.coll.insert_one({"team": "tx", "n": n}, session=s)
    srv.coll.insert_many([{"team": "pad", "n": k} for k in range(HISTORY + 10)])
    srv.coll.insert_one({"team": "tx", "n": 10})
    got = live.wait_changes(11)
    ids = _ids(got)
    cts = [m["change"]["clusterTime"]["$timestamp"] for m in got[:10] if m["type"] == "change"]
    assert all(ct == cts[0] for ct in cts)  # one transaction
    resumed = subscribers.ws(srv.port, stream_path("byteam", since=ids[2], vars=vars_),
                             name="resumed")
    resumed.wait_changes(8)
    time.sleep(0.3)
    msgs = resumed.messages()
    assert not any(m.get("type") == "reset" for m in msgs)
    assert _ids(msgs) == ids[3:]
    assert [m["change"]["fullDocument"]["n"] for m in msgs if m["type"] == "change"] == \
        list(range(3, 11))
