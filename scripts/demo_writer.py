#!/usr/bin/python3
"""demo_writer.py: simulated activity for the mongocast demo (examples/demo.yaml).

A multi-user inventory app in the database `mongocast_demo`. alice and bob own two shops
each (businesses); every shop stocks items (inventory_items, owned_by = the shop's _id);
customers place orders (orders, owner_id = the shop's owner) that lower the stock. Orders move
placed -> paid -> shipped, some are cancelled (deleted, their stock returned), and items that
fall to their reorder point get restocked a little later; the demo's low_stock stream finds them
with the seed app's $expr (quantity_in_stock <= reorder_point), evaluated on the server.

    demo_writer.py URI setup     drop and recreate the demo database with its starting data
    demo_writer.py URI run [--interval S] [--seconds N] [--seed N]

It prints one line per action. Stops cleanly on SIGINT/SIGTERM. Uses Debian's
/usr/bin/python3 with pymongo 3.11.
"""

import argparse
import random
import signal
import sys
import time
import uuid

import pymongo

DB = "mongocast_demo"
SHOPS = [
    ("corner-hardware", "Corner Hardware", "alice",
     [("hammer", 12.5), ("screwdriver", 6.0), ("box of nails", 3.2), ("tape measure", 9.9)]),
    ("green-grocer", "Green Grocer", "alice",
     [("apples", 0.5), ("bananas", 0.3), ("carrots", 0.4), ("oat milk", 2.1)]),
    ("book-nook", "Book Nook", "bob",
     [("atlas", 24.0), ("cookbook", 18.0), ("novel", 11.0), ("notebook", 4.5)]),
    ("bike-shed", "Bike Shed", "bob",
     [("inner tube", 7.0), ("bell", 5.5), ("chain oil", 8.0), ("lights", 19.0)]),
]
OWNER = {bid: owner for bid, _, owner, _ in SHOPS}
LOW_STOCK = {"$expr": {"$lte": ["$quantity_in_stock", "$reorder_point"]}}


def say(msg):
    print("writer: " + msg, flush=True)


def setup(db):
    db.client.drop_database(DB)
    for name in ("businesses", "inventory_items", "orders"):
        db.create_collection(name)
    rng = random.Random(1)
    for bid, name, owner, items in SHOPS:
        db.businesses.insert_one({"_id": bid, "name": name, "owner": owner})
        for item, price in items:
            qty = rng.randint(6, 14)
            reorder = rng.randint(3, 5)
            db.inventory_items.insert_one({
                "_id": "%s/%s" % (bid, item.replace(" ", "-")), "name": item, "owned_by": bid,
                "price": price, "quantity_in_stock": qty, "reorder_point": reorder})
    say("created %d businesses (alice and bob) with %d items in database %s" % (
        db.businesses.count_documents({}), db.inventory_items.count_documents({}), DB))


def set_stock(db, item, qty):
    db.inventory_items.update_one({"_id": item["_id"]}, {"$set": {"quantity_in_stock": qty}})


def place_order(db, rng):
    bid = rng.choice(list(OWNER))
    stocked = list(db.inventory_items.find({"owned_by": bid, "quantity_in_stock": {"$gt": 0}}))
    if not stocked:
        return restock(db, rng)
    lines = []
    for item in rng.sample(stocked, min(len(stocked), rng.randint(1, 2))):
        qty = min(item["quantity_in_stock"], rng.randint(1, 3))
        lines.append((item, qty))
    order = {
        "_id": "ord-" + uuid.uuid4().hex[:8], "business_id": bid, "owner_id": OWNER[bid],
        "items": [{"item_id": it["_id"], "name": it["name"], "quantity": q,
                   "price": it["price"]} for it, q in lines],
        "total": round(sum(it["price"] * q for it, q in lines), 2), "status": "placed"}
    db.orders.insert_one(order)
    for item, qty in lines:
        left = item["quantity_in_stock"] - qty
        set_stock(db, item, left)
        if left <= item["reorder_point"]:
            say("  %s is low: %d left (reorder point %d)" % (item["_id"], left,
                                                            item["reorder_point"]))
    say("%s: order %s for %s, total %.2f" % (OWNER[bid], order["_id"], bid, order["total"]))


def advance_order(db, rng):
    open_orders = list(db.orders.find({"status": {"$in": ["placed", "paid"]}}))
    if not open_orders:
        return place_order(db, rng)
    order = rng.choice(open_orders)
    nxt = "paid" if order["status"] == "placed" else "shipped"
    db.orders.update_one({"_id": order["_id"]}, {"$set": {"status": nxt}})
    say("%s: order %s is %s" % (order["owner_id"], order["_id"], nxt))


def cancel_order(db, rng):
    open_orders = list(db.orders.find({"status": {"$in": ["placed", "paid"]}}))
    if not open_orders:
        return place_order(db, rng)
    order = rng.choice(open_orders)
    db.orders.delete_one({"_id": order["_id"]})
    for line in order["items"]:
        item = db.inventory_items.find_one({"_id": line["item_id"]})
        if item:
            set_stock(db, item, item["quantity_in_stock"] + line["quantity"])
    say("%s: order %s cancelled, stock returned" % (order["owner_id"], order["_id"]))


def restock(db, rng):
    low = list(db.inventory_items.find(LOW_STOCK))
    if not low:
        return place_order(db, rng)
    item = rng.choice(low)
    qty = item["quantity_in_stock"] + rng.randint(8, 15)
    set_stock(db, item, qty)
    say("%s: restocked %s to %d" % (OWNER[item["owned_by"]], item["_id"], qty))


ACTIONS = [(place_order, 5), (advance_order, 3), (restock, 2), (cancel_order, 1)]


def run(db, interval, seconds, seed):
    rng = random.Random(seed)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    deadline = time.monotonic() + seconds if seconds else None
    fns = [f for f, w in ACTIONS for _ in range(w)]
    while not stop and (deadline is None or time.monotonic() < deadline):
        rng.choice(fns)(db, rng)
        end = time.monotonic() + interval
        while not stop and time.monotonic() < end:
            time.sleep(min(0.1, interval))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("uri")
    ap.add_argument("command", choices=["setup", "run"])
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between actions")
    ap.add_argument("--seconds", type=float, default=0, help="stop after N seconds (0: never)")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    client = pymongo.MongoClient(a.uri, serverSelectionTimeoutMS=10000)
    db = client[DB]
    try:
        if a.command == "setup":
            setup(db)
        else:
            run(db, a.interval, a.seconds, a.seed)
    except KeyboardInterrupt:
        pass
    except pymongo.errors.PyMongoError as e:
        print("writer: MongoDB error: %s" % e, file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
