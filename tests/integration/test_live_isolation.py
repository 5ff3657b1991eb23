"""Per-subscriber isolation on a recipient stream, as a property test with a fixed seed.

Three users and an admin subscribe over WebSocket, and the second user also over SSE. A
seeded random mix of inserts, updates (some of which hand a document to another owner) and
deletes runs on the stream's collection. From the writes alone the test derives, for every
subscriber, the exact sequence it must receive: each user exactly the changes whose recipient
is that user (the owner after an insert or update, the owner before a delete, read from the
pre-image), in write order; an update that hands a document over reaches its new owner marked
"entered" and its previous owner as a "left" notice; the admin every change; nobody anything
else. Documents owned by someone who is not subscribed, or by nobody, go to the admin only.

The collection has pre- and post-images on and the stream uses full_document: whenAvailable,
so each event's fullDocument is the document right after that write (the daemon refuses
updateLookup on a recipient stream: it would read a later state). Runs unchanged against a
real replica set (MONGODB_URI; MongoDB 6.0+ for pre-/post-images). The randomized, larger
version of this test is test_ownership_property.py.
"""

import random
import time

from daemon_util import *  # noqa: F401,F403
from live_util import (claims, create_with_images, free_port, hs256, live_config, start_live,
                       stream_path, subscribers)  # noqa: F401 (fixture)
from server_util import metrics

SECRET = "isolation-secret-0123456789abcdef0123456789ab"
SEED = 20240611
N_OPS = 300
USERS = ["u1", "u2", "u3"]
OWNERS = USERS + ["u4", None]  # u4 never subscribes; None: a document without an owner


def plan_ops(rng, n):
    """The writes, and per write the change it must produce:
    (op, _id, version, recipient, previous recipient). `version` is the write's index, stored
    in the document so that each received insert/update names the write it came from."""
    live = {}  # _id -> owner
    next_id = 0
    ops = []
    for v in range(n):
        r = rng.random()
        if not live or r < 0.45:
            _id = "d%04d" % next_id
            next_id += 1
            owner = rng.choice(OWNERS)
            live[_id] = owner
            ops.append(("insert", _id, v, owner, owner))
        elif r < 0.8:
            _id = rng.choice(sorted(live))
            before = live[_id]
            if rng.random() < 0.3:
                live[_id] = rng.choice(OWNERS)  # handed over: the new owner receives it
            ops.append(("update", _id, v, live[_id], before))
        else:
            _id = rng.choice(sorted(live))
            owner = live.pop(_id)
            ops.append(("delete", _id, v, owner, owner))
    return ops


def apply_op(coll, op):
    kind, _id, v, owner, _ = op
    if kind == "insert":
        doc = {"_id": _id, "v": v, "qty": v % 17}
        if owner is not None:
            doc["owner"] = owner
        coll.insert_one(doc)
    elif kind == "update":
        if owner is None:
            coll.update_one({"_id": _id}, {"$set": {"v": v}, "$unset": {"owner": ""}})
        else:
            coll.update_one({"_id": _id}, {"$set": {"v": v, "owner": owner}})
    else:
        coll.delete_one({"_id": _id})


def observed(msgs):
    """What a subscriber got, in the terms of plan_ops: (op, _id, version or None, recipient,
    entered) for changes, ("left", _id) for left notices."""
    out = []
    for m in msgs:
        if m.get("type") == "left":
            out.append(("left", m["_id"]))
            continue
        if m.get("type") != "change":
            continue
        ch = m["change"]
        op = ch["operationType"]
        _id = ch["documentKey"]["_id"]
        if op == "delete":
            v = None
        else:
            v = ch["fullDocument"]["v"]
        if m.get("entered"):
            assert "fullDocumentBeforeChange" not in ch, m
        out.append((op, _id, v, m.get("recipient"), bool(m.get("entered"))))
    return out


def expected_for(ops, who):
    exp = []
    for kind, _id, v, owner, before in ops:
        v = None if kind == "delete" else v
        moved = kind == "update" and before != owner
        if who == "admin":
            exp.append((kind, _id, v, owner, False))
        elif owner == who:
            exp.append((kind, _id, v, owner, moved))
        elif moved and before == who:
            exp.append(("left", _id))
    return exp


def test_each_subscriber_gets_exactly_its_events_in_order(tmp_path, daemons, mongo_uri, db,
                                                         db_name, subscribers):
    port = free_port()
    coll = create_with_images(db, "items")
    stream = {"db": db_name, "collection": "items", "max_await_time_ms": 100,
              "recipient": "fullDocument.owner", "full_document": "whenAvailable",
              "full_document_before_change": "whenAvailable", "history": 10000}
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"items": stream}, port,
                      auth={"algorithm": "HS256", "secret": SECRET,
                            "admin_role": "mongocast:all"})
    d = start_live(daemons, cfg, port)

    subs = {}
    for u in USERS:
        subs[u] = subscribers.ws(port, stream_path("items", token=hs256(SECRET, claims(u))),
                                 name="ws-" + u)
    subs["admin"] = subscribers.ws(port, stream_path("items"), name="ws-admin", headers={
        "Authorization": "Bearer " + hs256(SECRET, claims("root", roles=["mongocast:all"]))})
    sse_u2 = subscribers.sse(port, stream_path("items", token=hs256(SECRET, claims("u2"))),
                             name="sse-u2")
    everyone = dict(subs, **{"sse-u2": sse_u2})
    for s in everyone.values():
        s.wait_ready()

    ops = plan_ops(random.Random(SEED), N_OPS)
    kinds = {k for k, _, _, _, _ in ops}
    assert kinds == {"insert", "update", "delete"}, "the seed must exercise every operation"
    assert any(o is None for _, _, _, o, _ in ops) and any(o == "u4" for _, _, _, o, _ in ops)
    assert any(k == "update" and o != b and b in USERS for k, _, _, o, b in ops)
    for op in ops:
        apply_op(coll, op)

    subs["admin"].wait_changes(N_OPS, timeout=60)
    for who, s in everyone.items():
        user = "u2" if who == "sse-u2" else who
        n = len(expected_for(ops, user))
        s.wait(lambda ms: sum(1 for m in ms if m.get("type") in ("change", "left")) >= n,
               30, "%d messages" % n)
    # Anything wrongly routed would have been sent before the admin's last event (one stream,
    # one order), but leave a moment for a stray late frame to show up.
    time.sleep(0.5)

    for who, s in everyone.items():
        user = "u2" if who == "sse-u2" else who
        got = observed(s.messages())
        exp = expected_for(ops, user)
        assert got == exp, "%s: %d changes received, %d expected; first difference at %s" % (
            who, len(got), len(exp),
            next((i for i, (a, b) in enumerate(zip(got, exp)) if a != b), min(len(got), len(exp))))
        for m in s.messages():
            assert m.get("stream") == "items", m
            if m.get("type") == "change":
                assert isinstance(m.get("id"), str) and m["id"], m
    # Per user, the two transports agree exactly, ids included.
    assert [m["id"] for m in sse_u2.changes()] == [m["id"] for m in subs["u2"].changes()]
    # Every user-owned event reached its user, and the union of the users' feeds is exactly
    # the admin's feed minus the events of u4 / nobody.
    admin_ids = [m["id"] for m in subs["admin"].changes()]
    assert len(set(admin_ids)) == N_OPS, "event ids must be unique"
    users_ids = set()
    for u in USERS:
        users_ids |= {m["id"] for m in subs[u].changes()}
    orphan = sum(1 for _, _, _, o, _ in ops if o not in USERS)
    assert len(users_ids) == N_OPS - orphan
    assert d.alive()


def test_oversize_notice_per_view_tells_no_more_than_the_view(tmp_path, daemons, mongo_uri, db,
                                                             db_name, subscribers):
    # server.max_message_bytes applies to each routing view's own message. A document handed
    # from u1 to u2 while it drops a big field: the full event (with u1's big version as the
    # pre-image) is too big, so the admin gets an oversize notice, but u2's "entered" view
    # carries only the new, small version and arrives whole. Handed back with a big field,
    # u1's entered view is too big too: its notice is marked "entered" and its size is that of
    # the entered message, not of the full one (which would tell u1 how big u2's version was).
    # The left notices stay small and arrive as they are.
    limit = 16384
    port = free_port()
    coll = create_with_images(db, "items")
    stream = {"db": db_name, "collection": "items", "max_await_time_ms": 100,
              "recipient": "fullDocument.owner", "full_document": "whenAvailable",
              "full_document_before_change": "whenAvailable"}
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"items": stream}, port,
                      auth={"algorithm": "HS256", "secret": SECRET,
                            "admin_role": "mongocast:all"},
                      server_extra={"max_message_bytes": limit})
    start_live(daemons, cfg, port)
    u1 = subscribers.ws(port, stream_path("items", token=hs256(SECRET, claims("u1"))), name="u1")
    u2 = subscribers.sse(port, stream_path("items", token=hs256(SECRET, claims("u2"))), name="u2")
    admin = subscribers.ws(port, stream_path("items"), name="admin", headers={
        "Authorization": "Bearer " + hs256(SECRET, claims("root", roles=["mongocast:all"]))})
    for s in (u1, u2, admin):
        s.wait_ready()

    coll.insert_one({"_id": 1, "owner": "u1", "big": "a" * (2 * limit)})
    coll.update_one({"_id": 1}, {"$set": {"owner": "u2"}, "$unset": {"big": ""}})
    coll.update_one({"_id": 1}, {"$set": {"owner": "u1", "big": "b" * (2 * limit)}})

    def routed(ms):
        return [m for m in ms if m.get("type") in ("change", "oversize", "left")]
    got_admin = routed(admin.wait(lambda ms: len(routed(ms)) >= 3, 30, "3 events"))
    got_u1 = routed(u1.wait(lambda ms: len(routed(ms)) >= 3, 30, "3 events"))
    got_u2 = routed(u2.wait(lambda ms: len(routed(ms)) >= 2, 30, "2 events"))
    time.sleep(0.3)  # room for a stray message
    assert len(routed(admin.messages())) == 3 and len(routed(u1.messages())) == 3
    assert len(routed(u2.messages())) == 2

    # the admin: three full events, each too big (the second through its pre-image)
    assert [m["type"] for m in got_admin] == ["oversize"] * 3, got_admin
    for m in got_admin:
        assert m["limit"] == limit and m["size"] > limit and "entered" not in m, m
        assert m["documentKey"] == {"_id": 1}
    # u2: entered, small enough to arrive whole, without u1's version; then left
    entered, left = got_u2
    assert entered["type"] == "change" and entered["entered"] is True, entered
    assert entered["id"] == got_admin[1]["id"] and entered["recipient"] == "u2"
    assert "fullDocumentBeforeChange" not in entered["change"]
    assert entered["change"]["fullDocument"] == {"_id": 1, "owner": "u2"}
    assert left == {"type": "left", "stream": "items", "_id": 1}, left
    # u1: its own insert's notice, the left notice, then its entered view's own notice
    own, gone, back = got_u1
    assert own["type"] == "oversize" and own["id"] == got_admin[0]["id"]
    assert own["size"] == got_admin[0]["size"] and own["recipient"] == "u1"
    assert gone == {"type": "left", "stream": "items", "_id": 1}, gone
    assert back["type"] == "oversize" and back["entered"] is True, back
    assert back["id"] == got_admin[2]["id"] and back["recipient"] == "u1"
    assert limit < back["size"] < got_admin[2]["size"], (back, got_admin[2])
    assert set(back) == {"type", "stream", "id", "recipient", "entered", "operationType", "ns",
                         "documentKey", "size", "limit"}, back
    m = metrics(port)
    assert m["mongocast_oversize_events_total"] == 3
