"""Mercury end to end with one stream: examples/mercury.yaml as shipped.

Mercury's data model: users; businesses whose `owner` is a DBRef to a user; inventory items
`owned_by` a business; orders whose `creator_id` is a business. One database-level stream
routes each collection by its own rule (a lookup of the business as of the write, then the
owner DBRef's $id) and adds a summary line, the low-stock one chosen by the seed's own $expr.
The collections start without pre-/post-images: ensure_images turns them on at start.

Alice owns one business, Bob another, Carol none; an admin sees everything. An item update
reaches Alice through the DBRef; an order delete reaches her through its pre-image; a stock
drop to the reorder point reaches her with the "Stock low, please restock ..." line; Bob only
receives his own item's change, Carol nothing. A second test routes through a path whose
value is itself a DBRef (to the lookup collection: looked up by its $id; to another: nobody).
Runs unchanged against a real replica set (MONGODB_URI, MongoDB 6.0+: the daemon's user needs
collMod).
"""

import os
import time

from bson import DBRef, ObjectId

from conftest import REPO
from daemon_util import *  # noqa: F401,F403
from live_util import (claims, free_port, hs256, live_config, start_live, stream_path,
                       subscribers)  # noqa: F401

SECRET = "mercury-secret-0123456789abcdef0123456789abcd"
ALICE, BOB, CAROL = ObjectId(), ObjectId(), ObjectId()


def token(user=None, admin=False):
    c = claims("admin", roles=["mercury:admin"]) if admin else claims("x")
    if user is not None:
        c["sub"] = {"$oid": str(user)}
    return hs256(SECRET, c)


def seed(db):
    db.users.insert_many([{"_id": ALICE, "name": "Alice"}, {"_id": BOB, "name": "Bob"},
                          {"_id": CAROL, "name": "Carol"}])
    b_alice, b_bob = ObjectId(), ObjectId()
    db.businesses.insert_many([
        {"_id": b_alice, "name": "Corner Hardware", "owner": DBRef("users", ALICE)},
        {"_id": b_bob, "name": "Book Nook", "owner": DBRef("users", BOB)},
    ])
    db.inventory_items.insert_many([
        {"_id": "hammer", "name": "Hammer", "owned_by": b_alice, "quantity_in_stock": 10,
         "reorder_point": 3},
        {"_id": "novel", "name": "Novel", "owned_by": b_bob, "quantity_in_stock": 5,
         "reorder_point": 2},
    ])
    db.orders.insert_one({"_id": "o1", "creator_id": b_alice, "total": 30, "status": "new"})


def test_mercury_feed_and_alert_one_stream(tmp_path, daemons, subscribers, db, db_name,
                                           mongo_uri):
    seed(db)  # no images on any collection yet
    port = free_port()
    env = {"MONGODB_URI": mongo_uri, "MERCURY_DB": db_name, "JWT_SECRET": SECRET,
           "MERCURY_LISTEN": "127.0.0.1:%d" % port, "MERCURY_DATA": str(tmp_path / "data")}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        d = start_live(daemons, REPO / "examples" / "mercury.yaml", port)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # ensure_images turned them on before the stream opened.
    opts = {c["name"]: c.get("options", {}) for c in db.list_collections()}
    for name in ("inventory_items", "orders", "businesses"):
        assert opts[name].get("changeStreamPreAndPostImages") == {"enabled": True}, (name, opts)

    subs = {name: subscribers.ws(port, stream_path("activity", token=tok), name=name)
            for name, tok in [("alice", token(ALICE)), ("bob", token(BOB)),
                              ("carol", token(CAROL)), ("admin", token(admin=True))]}
    for s in subs.values():
        s.wait_ready()

    items, orders = db.inventory_items, db.orders
    items.update_one({"_id": "hammer"}, {"$set": {"quantity_in_stock": 8}})
    orders.delete_one({"_id": "o1"})
    items.update_one({"_id": "hammer"}, {"$inc": {"quantity_in_stock": -5}})  # 3: reorder point
    items.update_one({"_id": "novel"}, {"$set": {"quantity_in_stock": 4}})

    admin = subs["admin"].wait_changes(4)
    alice = subs["alice"].wait_changes(3)
    bob = subs["bob"].wait_changes(1)
    time.sleep(0.5)  # anything leaked would have come with the events above
    alice = [m for m in subs["alice"].messages() if m["type"] != "ready"]
    bob = [m for m in subs["bob"].messages() if m["type"] != "ready"]
    carol = [m for m in subs["carol"].messages() if m["type"] != "ready"]
    admin = [m for m in subs["admin"].messages() if m["type"] != "ready"]

    me = {"$oid": str(ALICE)}
    assert [(m["type"], m["recipient"], m["change"]["operationType"],
             m["change"]["documentKey"]["_id"], m["summary"]) for m in alice] == [
        ("change", me, "update", "hammer", "Hammer: 8 in stock"),
        ("change", me, "delete", "o1", "Order o1 cancelled"),
        ("change", me, "update", "hammer",
         "Stock low, please restock Hammer: 3 left (reorder point 3)"),
    ]
    # The delete was routed by its pre-image, which Alice, its owner, receives.
    assert alice[1]["change"]["fullDocumentBeforeChange"]["creator_id"] is not None
    assert [(m["change"]["documentKey"]["_id"], m["summary"]) for m in bob] == [
        ("novel", "Novel: 4 in stock")]
    assert bob[0]["recipient"] == {"$oid": str(BOB)}
    assert carol == []
    assert len(admin) == 4 and all(m["type"] == "change" for m in admin)
    assert d.alive()


def test_lookup_key_that_is_a_dbref(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    """A rule whose path holds a DBRef to the lookup collection looks up its $id; a DBRef to
    another collection designates nobody (admins only)."""
    seed(db)
    b_alice = db.businesses.find_one({"name": "Corner Hardware"})["_id"]
    db.create_collection("tickets")
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"feed": {
        "db": db_name, "max_await_time_ms": 100,
        "recipient": {"by_collection": {"tickets": {
            "path": "fullDocument.business",
            "lookup": {"db": db_name, "collection": "businesses", "recipient": "owner.$id"},
            "summary": "ticket {fullDocument.title} for {fullDocument.business.$id}"}}}}},
        port, auth={"algorithm": "HS256", "secret": SECRET, "admin_role": "mercury:admin"})
    start_live(daemons, cfg, port)
    alice = subscribers.ws(port, stream_path("feed", token=token(ALICE)), name="alice")
    admin = subscribers.ws(port, stream_path("feed", token=token(admin=True)), name="admin")
    alice.wait_ready()
    admin.wait_ready()
    db.tickets.insert_one({"_id": 1, "title": "a", "business": DBRef("people", b_alice)})
    db.tickets.insert_one({"_id": 2, "title": "b", "business": DBRef("businesses", b_alice)})
    admin.wait_changes(2)
    alice.wait_changes(1)
    time.sleep(0.3)
    changes = [m for m in alice.messages() if m["type"] == "change"]
    assert [m["change"]["documentKey"]["_id"] for m in changes] == [2]
    assert changes[0]["recipient"] == {"$oid": str(ALICE)}
    assert changes[0]["summary"] == "ticket b for %s" % b_alice
