"""Pre- and post-images that survive a drop, and loud warnings when they are off.

With ensure_images the daemon turns changeStreamPreAndPostImages on at start and again when the
watched collection comes back after an invalidate, before routing events from it: after a drop
and re-creation, the next delete still reaches its owner (routed by its pre-image). A
database-level stream does the same for a collection it sees for the first time. Without
ensure_images a stream that finds images off says so: /readyz lists the reason under
"degraded", /metrics counts the events that lacked their image, the log has an error naming
the collection; the delete goes to admins only. Events whose recipient path holds nothing are
counted too. Runs unchanged against a real replica set (MongoDB 6.0+).
"""

import json
import time

from daemon_util import *  # noqa: F401,F403
from live_util import (claims, free_port, hs256, http_get, live_config, start_live, stream_path,
                       subscribers)  # noqa: F401
from server_util import metrics

SECRET = "images-secret-0123456789abcdef0123456789abcdef"
AUTH = {"algorithm": "HS256", "secret": SECRET, "admin_role": "mongocast:all"}


def images_on(db, name):
    for c in db.list_collections():
        if c["name"] == name:
            return c.get("options", {}).get("changeStreamPreAndPostImages") == {"enabled": True}
    return None  # no such collection


def stream(db_name, coll=None, **kw):
    s = {"db": db_name, "max_await_time_ms": 100, "recipient": "fullDocument.owner",
         "full_document": "whenAvailable", "full_document_before_change": "whenAvailable"}
    if coll:
        s["collection"] = coll
    s.update(kw)
    return s


def subscribe(subscribers, port, stream_name):
    alice = subscribers.ws(port, stream_path(stream_name, token=hs256(SECRET, claims("alice"))),
                           name="alice")
    admin = subscribers.ws(port, stream_path(stream_name, token=hs256(
        SECRET, claims("root", roles=["mongocast:all"]))), name="admin")
    alice.wait_ready()
    admin.wait_ready()
    return alice, admin


def ops(msgs):
    return [(m["change"]["operationType"], m["change"]["documentKey"]["_id"])
            for m in msgs if m.get("type") == "change"]


def test_drop_and_recreate_with_ensure_images(tmp_path, daemons, subscribers, db, db_name,
                                              mongo_uri):
    db.create_collection("orders")  # images off
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri,
                      {"orders": stream(db_name, "orders", ensure_images=True)}, port, auth=AUTH)
    d = start_live(daemons, cfg, port)
    assert images_on(db, "orders") is True  # turned on at start
    alice, admin = subscribe(subscribers, port, "orders")
    orders = db["orders"]
    orders.insert_one({"_id": 1, "owner": "alice"})
    orders.delete_one({"_id": 1})
    alice.wait_changes(2)

    orders.drop()
    admin.wait(lambda ms: any(m.get("type") == "invalidate" for m in ms), what="invalidate")
    # Re-created implicitly by an insert: images are off on the new collection until the
    # daemon sees it again, which it does before routing that insert.
    orders.insert_one({"_id": 2, "owner": "alice"})
    alice.wait_changes(3)
    assert images_on(db, "orders") is True
    orders.delete_one({"_id": 2})
    got = alice.wait_changes(4)
    assert ops(got) == [("insert", 1), ("delete", 1), ("insert", 2), ("delete", 2)]
    deleted = [m for m in got if m.get("type") == "change"][-1]
    assert deleted["recipient"] == "alice"
    assert deleted["change"]["fullDocumentBeforeChange"] == {"_id": 2, "owner": "alice"}
    m = metrics(port)
    assert m['mongocast_recipient_unresolved_total{stream="orders"}'] == 0
    assert m['mongocast_images_off{stream="orders"}'] == 0
    assert "turned on changeStreamPreAndPostImages" in d.stderr_text()


def test_database_stream_new_collection_with_ensure_images(tmp_path, daemons, subscribers, db,
                                                           db_name, mongo_uri):
    db.create_collection("seed")
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri,
                      {"shop": stream(db_name, ensure_images=True)}, port, auth=AUTH)
    start_live(daemons, cfg, port)
    alice, _ = subscribe(subscribers, port, "shop")
    fresh = db["fresh"]  # created by this insert, images off
    fresh.insert_one({"_id": 1, "owner": "alice"})
    alice.wait_changes(1)
    assert images_on(db, "fresh") is True
    fresh.delete_one({"_id": 1})
    got = alice.wait_changes(2)
    assert ops(got) == [("insert", 1), ("delete", 1)]


def test_images_off_is_loud(tmp_path, daemons, subscribers, db, db_name, mongo_uri):
    db.create_collection("orders")  # images off, and nobody turns them on
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"orders": stream(db_name, "orders")}, port,
                      auth=AUTH)
    d = start_live(daemons, cfg, port)
    # Found at open: the stream is open (ready) but degraded, and says why.
    status, _, body = http_get(port, "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True, ready
    assert "pre- and post-images are off on %s.orders" % db_name in ready["degraded"]["orders"]
    assert images_on(db, "orders") is False
    alice, admin = subscribe(subscribers, port, "orders")
    db["orders"].insert_one({"_id": 1, "owner": "alice"})
    db["orders"].delete_one({"_id": 1})
    db["orders"].insert_one({"_id": 2})  # no owner at all
    admin.wait_changes(3)
    time.sleep(0.5)
    # The delete carries no pre-image: admins only.
    assert ops(alice.messages()) == [("insert", 1)]
    m = metrics(port)
    assert m['mongocast_images_missing_total{stream="orders"}'] == 1
    assert m['mongocast_images_off{stream="orders"}'] == 1
    assert m['mongocast_recipient_unresolved_total{stream="orders"}'] == 1
    assert m['mongocast_recipient_missing_total{stream="orders"}'] == 1
    log = d.stderr_text()
    assert "delete event without its pre- and post-images stream=orders ns=%s.orders" % db_name \
        in log
    assert "recipient missing stream=orders op=insert" in log
    # Fixed by hand: the next event that carries its image clears the reason.
    run_cli("enable-images", mongo_uri, db_name, "orders")
    db["orders"].insert_one({"_id": 3, "owner": "alice"})
    db["orders"].delete_one({"_id": 3})
    alice.wait_changes(3)
    ready = json.loads(http_get(port, "/readyz")[2])
    assert "degraded" not in ready, ready
