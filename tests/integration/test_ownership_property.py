"""Randomized ownership property test: every subscriber receives exactly what the documented
routing rules entitle it to, and never a value of a version it did not own.

For each stream form (a plain path, a nested path, the lookup form) one seeded run of 2,000
operations, written with pymongo bulk writes that mix inserts, updates that move documents
between 50 owners (and updates that keep the owner but spell it differently), replaces and
deletes; for the lookup form also moves of the lookup documents (businesses) between owners,
interleaved with the item writes so that the daemon routes events after the lookup collection
has already moved on. Owners include look-alike values that are different identities (7 and
"7", an ObjectId and its hex string, "u3" and "u3\\0evil", Int64(2^53+1) and the double 2^53)
and the same identity in different BSON types (7, Int64(7), 7.0, Decimal128("7")), plus values
that are no identity at all (null, a missing field, arrays, documents, 7.5, true).

The expected messages of every subscriber are computed from the operations alone (writes are
issued by one thread in order, so the model knows every document's owner at every write):
  - insert: the owner gets the change; delete: the owner of the deleted version gets it;
  - update/replace that keeps the owner (same identity): the owner gets the change;
  - update/replace that moves the document: the new owner gets it with "entered": true and
    nothing of the previous version, the previous owner gets {"type":"left","_id":...};
  - admins get every change as MongoDB produced it; documents owned by nobody, by a value that
    is no identity, or by an identity nobody subscribed with reach admins only.
Every document version carries random secrets; each message a subscriber receives may hold
only secrets of the versions it is entitled to for that event.

Then every subscriber resumes with since=<the first event's id>: the replay must apply exactly
the same rules. All subscribers (about a hundred WebSockets) share one asyncio loop.

Runs unchanged against a real replica set with MONGODB_URI (MongoDB 6.0+: pre-/post-images).
Setting MC_PROPERTY_REPORT=1 prints the measured counts (unexpected, missed, leaked).
MC_PROPERTY_MEASURE=1 only measures (for comparing builds): it prints the counts instead of
failing, skips subscribers whose token the daemon refuses, and MC_PROPERTY_FULL_DOCUMENT
overrides the stream's full_document (e.g. updateLookup, which this build refuses);
MC_PROPERTY_LOOKUP_IMAGES=0 leaves pre-/post-images off on the lookup collection (events the
daemon cannot prove then fail closed: admins only).
"""

import asyncio
import json
import os
import random
import re
import threading
import time

import pytest
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.objectid import ObjectId
from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne

from daemon_util import *  # noqa: F401,F403
from live_util import (create_with_images, free_port, hs256, http_get, live_config,
                       start_live, stream_path)

SECRET = "ownership-property-secret-0123456789abcdef"
MEASURE = os.environ.get("MC_PROPERTY_MEASURE") == "1"
N_OPS = int(os.environ.get("MC_PROPERTY_OPS", "2000"))
SEEDS = {"path": 7001, "nested": 7002, "lookup": 7003}
SECRET_RE = re.compile(r"sec-[0-9a-f]{10}")

OID_A = ObjectId("64a7f2d1aabbccddeeff0001")
OID_B = ObjectId("64a7f2d1aabbccddeeff0002")
# The 50 identities that subscribe (one WebSocket each, live and again for the replay).
IDENTITIES = (["u%d" % i for i in range(40)] +
              ["7", 7, "12", 12, OID_A, str(OID_A), OID_B, str(OID_B), "U3", 2 ** 53 + 1])
MISSING = object()
# Owner values nobody subscribes with: no identity at all, or an identity without subscriber
# that looks like one that has a subscriber.
ODD_OWNERS = [None, MISSING, ["u1", "u2"], {"id": "u1"}, 7.5, True, "u3\x00evil", "u3 ",
              float(2 ** 53), Decimal128("7.5")]


def canon(v):
    """The identity of an owner value under the documented rule (None: no identity)."""
    if v is MISSING or v is None or isinstance(v, bool):
        return None
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, int):  # int and Int64
        return ("i", int(v)) if -2 ** 63 <= int(v) < 2 ** 63 else None
    if isinstance(v, float):
        return ("i", int(v)) if v.is_integer() and -2 ** 63 <= v < 2 ** 63 else None
    if isinstance(v, Decimal128):
        d = v.to_decimal()
        if d.is_finite() and d == d.to_integral_value() and -2 ** 63 <= int(d) < 2 ** 63:
            return ("i", int(d))
        return None
    if isinstance(v, ObjectId):
        return ("o", v.binary)
    return None


def spell(rng, ident):
    """A BSON spelling of an identity value: integers in any numeric type that holds them."""
    if isinstance(ident, int):
        options = [Int64(ident), Decimal128(str(ident))]
        if ident < 2 ** 31:
            options.append(ident)
        if float(ident) == ident:
            options.append(float(ident))
        return rng.choice(options)
    return ident


def claim(ident):
    """The identity claim of a token: a JSON string, number, or Extended JSON ObjectId."""
    if isinstance(ident, ObjectId):
        return {"$oid": str(ident)}
    return ident


def recipient_json(ident):
    """How the message's "recipient" spells an identity (relaxed Extended JSON, parsed)."""
    return claim(ident)


class Secrets:
    def __init__(self, rng):
        self.rng = rng
        self.seen = set()

    def new(self):
        while True:
            s = "sec-%010x" % self.rng.getrandbits(40)
            if s not in self.seen:
                self.seen.add(s)
                return s


def tokens_of(doc):
    return set(SECRET_RE.findall(repr(doc)))


# ---- the writes and the model -------------------------------------------------------------

class Plan:
    """The operations of one run and, per item event, what the rules say about it."""

    def __init__(self, form, seed, n_ops):
        self.form = form
        self.rng = random.Random(seed)
        self.secrets = Secrets(self.rng)
        self.docs = {}        # _id -> current document (a python dict, as stored)
        self.businesses = {}  # canonical key -> (stored _id, owner value or MISSING)
        self.batches = []     # [(collection name, [pymongo ops])]
        self.events = []      # one dict per item change, in write order
        self.next_id = 0
        if form == "lookup":
            self._make_businesses()
        for v in range(n_ops):
            self._one(v)

    # owners and references
    def _owner(self):
        if self.rng.random() < 0.85:
            return spell(self.rng, self.rng.choice(IDENTITIES))
        return self.rng.choice(ODD_OWNERS)

    def _make_businesses(self):
        ids = [1, 2, 3, 4, 5, 6, "1", "2", "3", ObjectId("64a7f2d1aabbccddeeff0c01"),
               ObjectId("64a7f2d1aabbccddeeff0c02"), "b7", "b8", "b9"]
        docs = []
        for _id in ids:
            owner = self._owner()
            doc = {"_id": _id}
            if owner is not MISSING:
                doc["owner"] = owner
            self.businesses[canon(_id)] = (_id, owner)
            docs.append(InsertOne(doc))
        self.setup_businesses = docs

    def _ref(self):
        """A reference to a business (spelled in any numeric type), or an odd one."""
        if self.rng.random() < 0.9:
            _id, _ = self.businesses[self.rng.choice(sorted(self.businesses, key=repr))]
            return spell(self.rng, _id) if isinstance(_id, int) else _id
        return self.rng.choice([None, MISSING, [1], "nonexistent", 7.5, {"b": 1}])

    def owner_of(self, doc):
        """The identity that owns a stored version right now (the model's write time)."""
        if doc is None:
            return None
        if self.form == "path":
            return canon(doc.get("owner", MISSING))
        if self.form == "nested":
            o = doc.get("meta", {})
            o = o.get("owner", {}) if isinstance(o, dict) else {}
            return canon(o.get("id", MISSING)) if isinstance(o, dict) else None
        ref = canon(doc.get("biz", MISSING))
        if ref is None or ref not in self.businesses:
            return None
        return canon(self.businesses[ref][1])

    # building versions
    def _version(self, _id, v, owner):
        doc = {"_id": _id, "v": v, "secret": self.secrets.new()}
        if self.form == "path":
            if owner is not MISSING:
                doc["owner"] = owner
        elif self.form == "nested":
            meta = {"tag": self.secrets.new()}
            if owner is not MISSING:
                meta["owner"] = {"id": owner, "since": v}
            doc["meta"] = meta
        else:
            if owner is not MISSING:
                doc["biz"] = owner
        if self.rng.random() < 0.5:
            doc["extra"] = self.secrets.new()
        return doc

    def _new_owner_value(self):
        return self._ref() if self.form == "lookup" else self._owner()

    def _emit(self, coll, op):
        if self.batches and self.batches[-1][0] == coll and len(self.batches[-1][1]) < \
                self.batch_limit:
            self.batches[-1][1].append(op)
        else:
            self.batch_limit = self.rng.randint(1, 40)
            self.batches.append((coll, [op]))

    def _event(self, op, _id, v, before, after):
        pre = self.owner_of(before) if before is not None else None
        post = self.owner_of(after) if after is not None else None
        if op == "delete":
            post = pre
        self.events.append({
            "op": op, "_id": _id, "v": v,
            "pre": pre, "post": post,
            "pre_tokens": tokens_of(before) if before is not None else set(),
            "post_tokens": tokens_of(after) if after is not None else set(),
        })

    def _one(self, v):
        r = self.rng.random()
        if self.form == "lookup" and r < 0.10:
            self._move_business(v)
            return
        if not self.docs or r < 0.30:
            _id = "d%05d" % self.next_id
            self.next_id += 1
            doc = self._version(_id, v, self._new_owner_value())
            self.docs[_id] = doc
            self._emit("items", InsertOne(dict(doc)))
            self._event("insert", _id, v, None, doc)
            return
        _id = self.rng.choice(sorted(self.docs))
        before = self.docs[_id]
        if r < 0.80:
            self._update(_id, v, before)
        elif r < 0.88:
            after = self._version(_id, v, self._new_owner_value())
            self.docs[_id] = after
            self._emit("items", ReplaceOne({"_id": _id}, dict(after)))
            self._event("replace", _id, v, before, after)
        else:
            del self.docs[_id]
            self._emit("items", DeleteOne({"_id": _id}))
            self._event("delete", _id, None, before, None)

    def _update(self, _id, v, before):
        after = {k: val for k, val in before.items()}
        sets = {"v": v, "secret": self.secrets.new()}
        unsets = {}
        kind = self.rng.random()
        if kind < 0.5:
            # A move: every secret of the old version goes (owner-bearing fields rewritten).
            if self.rng.random() < 0.15:
                new = self._same_identity_respelled(before)
            else:
                new = self._new_owner_value()
            if "extra" in after:
                unsets["extra"] = ""
                del after["extra"]
            if self.form == "path":
                if new is MISSING:
                    unsets["owner"] = ""
                    after.pop("owner", None)
                else:
                    sets["owner"] = new
                    after["owner"] = new
            elif self.form == "nested":
                tag = self.secrets.new()
                style = self.rng.random()
                if new is MISSING:
                    unsets["meta.owner"] = ""
                    sets["meta.tag"] = tag
                    after["meta"] = {"tag": tag}
                elif style < 0.5:
                    sets["meta.owner.id"] = new
                    sets["meta.tag"] = tag
                    meta = dict(after.get("meta", {}))
                    owner = dict(meta.get("owner", {}))
                    owner["id"] = new
                    meta["owner"] = owner
                    meta["tag"] = tag
                    after["meta"] = meta
                else:
                    meta = {"owner": {"id": new, "since": v}, "tag": tag}
                    sets["meta"] = meta
                    after["meta"] = meta
            else:
                if new is MISSING:
                    unsets["biz"] = ""
                    after.pop("biz", None)
                else:
                    sets["biz"] = new
                    after["biz"] = new
        elif kind < 0.75:
            extra = self.secrets.new()
            sets["extra"] = extra
            after["extra"] = extra
        elif "extra" in after:
            unsets["extra"] = ""
            del after["extra"]
        after.update({"v": v, "secret": sets["secret"]})
        # Key order as MongoDB keeps it: existing fields in place, new ones appended.
        self.docs[_id] = after
        update = {"$set": sets}
        if unsets:
            update["$unset"] = unsets
        self._emit("items", UpdateOne({"_id": _id}, update))
        self._event("update", _id, v, before, after)

    def _current(self, doc):
        """The owner-bearing value of a stored version (the reference for the lookup form)."""
        if self.form == "path":
            return doc.get("owner", MISSING)
        if self.form == "nested":
            return doc.get("meta", {}).get("owner", {}).get("id", MISSING)
        return doc.get("biz", MISSING)

    def _same_identity_respelled(self, before):
        """The same identity in another BSON type, for an update that must not count as a
        move (7 -> 7.0 -> Int64(7) -> Decimal128("7"))."""
        cur = self._current(before)
        ident = canon(cur)
        if ident is not None and ident[0] == "i":
            return spell(self.rng, ident[1])
        return cur

    def _move_business(self, v):
        key = self.rng.choice(sorted(self.businesses, key=repr))
        _id, _ = self.businesses[key]
        owner = self._owner()
        if owner is MISSING:
            op = UpdateOne({"_id": _id}, {"$unset": {"owner": ""}, "$set": {"n": v}})
        else:
            op = UpdateOne({"_id": _id}, {"$set": {"owner": owner, "n": v}})
        self.businesses[key] = (_id, owner)
        self._emit("businesses", op)


def expected_for(plan, ident):
    """(messages, allowed secrets per message) for one identity (None: an admin)."""
    me = canon(ident) if ident is not None else None
    out, allowed = [], []
    for e in plan.events:
        op, pre, post = e["op"], e["pre"], e["post"]
        if ident is None:
            out.append(("full", op, e["_id"], e["v"]))
            allowed.append(e["pre_tokens"] | e["post_tokens"])
            continue
        if op == "insert":
            if post is not None and post == me:
                out.append(("full", op, e["_id"], e["v"]))
                allowed.append(e["post_tokens"])
        elif op == "delete":
            if pre is not None and pre == me:
                out.append(("full", op, e["_id"], None))
                allowed.append(e["pre_tokens"])
        elif pre == post:
            if post is not None and post == me:
                out.append(("full", op, e["_id"], e["v"]))
                allowed.append(e["pre_tokens"] | e["post_tokens"])
        else:
            if post is not None and post == me:
                out.append(("entered", op, e["_id"], e["v"]))
                allowed.append(e["post_tokens"])
            elif pre is not None and pre == me:
                out.append(("left", None, e["_id"], None))
                allowed.append(set())
    return out, allowed


def observed(msgs):
    out = []
    for raw, m in msgs:
        t = m.get("type")
        if t == "left":
            out.append((("left", None, m.get("_id"), None), raw, m))
        elif t == "change":
            ch = m["change"]
            op = ch["operationType"]
            v = None if op == "delete" else (ch.get("fullDocument") or {}).get("v")
            kind = "entered" if m.get("entered") else "full"
            out.append(((kind, op, ch["documentKey"]["_id"], v), raw, m))
    return out


# ---- many WebSocket subscribers on one asyncio loop ---------------------------------------

class Hub:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.subs = []

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect_all(self, specs):
        """specs: [(name, url)]; returns Sub objects once every one is connected."""
        async def one(name, url):
            import websockets
            ws = await websockets.connect(url, max_size=64 * 1024 * 1024, ping_interval=None,
                                          open_timeout=30, close_timeout=2)
            sub = Sub(name, ws)
            sub.task = asyncio.ensure_future(sub.read())
            return sub

        async def all_():
            return await asyncio.gather(*(one(n, u) for n, u in specs),
                                        return_exceptions=MEASURE)

        subs = self.run(all_(), timeout=120)
        subs = [s if isinstance(s, Sub) else None for s in subs]
        self.subs += [s for s in subs if s]
        return subs

    def close(self):
        async def shut():
            for s in self.subs:
                try:
                    await s.ws.close()
                except Exception:  # noqa: BLE001 - already gone
                    pass
        try:
            self.run(shut(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Sub:
    def __init__(self, name, ws):
        self.name = name
        self.ws = ws
        self.msgs = []  # (raw text, parsed)
        self.lock = threading.Lock()

    async def read(self):
        try:
            async for frame in self.ws:
                with self.lock:
                    self.msgs.append((frame, json.loads(frame)))
        except Exception:  # noqa: BLE001 - closed at teardown
            pass

    def snapshot(self):
        with self.lock:
            return list(self.msgs)

    def count(self, types=("change", "left")):
        with self.lock:
            return sum(1 for _, m in self.msgs if m.get("type") in types)

    def ready(self):
        with self.lock:
            return any(m.get("type") == "ready" for _, m in self.msgs)


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.1)


# ---- the test -------------------------------------------------------------------------------

STREAM_FORMS = {
    "path": "fullDocument.owner",
    "nested": "fullDocument.meta.owner.id",
    "lookup": None,  # set per test: the mapping with the database name
}


def entitlement(plan, ident):
    """Per event key (op, _id, v): the secrets this identity may see in it (None: the event
    is not for it at all), whatever the message shape. Deletes are keyed by _id alone."""
    me = canon(ident)
    out = {}
    for e in plan.events:
        key = (e["op"], e["_id"], e["v"])
        ok = set()
        mine = False
        if e["post"] is not None and e["post"] == me:
            ok |= e["post_tokens"] if e["op"] != "delete" else e["pre_tokens"]
            mine = True
        if e["pre"] is not None and e["pre"] == me:
            ok |= e["pre_tokens"]
            mine = True
        out[key] = ok if mine else None
    return out


def compare(plan, subs_by_ident, report):
    """Checks every subscriber. Returns (unexpected, missed, leaked, problems) where
      unexpected: received messages outside the exact expected sequence (wrong view, wrong
        event, wrong order, wrong "recipient");
      missed: expected messages not received;
      leaked: messages about an event the subscriber had no part in (misrouted), or carrying
        a secret of a version it did not own, or a left notice carrying more than _id.
    With report, also prints view-independent counts: misrouted, leaked, events whose
    resulting version the subscriber owned that never reached it, and moves away that the
    previous owner was not told about."""
    unexpected = missed = leaked = misrouted = missed_events = missed_left = 0
    problems = []
    for ident, sub in subs_by_ident:
        if sub is None:
            continue  # refused by the daemon (measure mode only)
        want, _ = expected_for(plan, ident)
        got = observed(sub.snapshot())
        got_keys = [g[0] for g in got]
        if ident is not None:
            ent = entitlement(plan, ident)
            me = canon(ident)
            about = {(k[1], k[2], k[3]) for k in got_keys if k[0] != "left"}
            lefts = [k[2] for k in got_keys if k[0] == "left"]
            for e in plan.events:
                key = (e["op"], e["_id"], e["v"])
                if e["post"] is not None and e["post"] == me and key not in about:
                    missed_events += 1
                if e["op"] in ("update", "replace") and e["pre"] is not None and \
                        e["pre"] == me and e["post"] != me:
                    if e["_id"] in lefts:
                        lefts.remove(e["_id"])
                    else:
                        missed_left += 1
            for key, raw, m in got:
                if key[0] == "left":
                    if set(m) != {"type", "stream", "_id"} or SECRET_RE.search(raw):
                        leaked += 1
                        problems.append("%s: left message carries more: %r" % (sub.name, m))
                    continue
                ok = ent.get((key[1], key[2], key[3]))
                if ok is None:
                    misrouted += 1
                    leaked += 1
                    if len(problems) < 8:
                        problems.append("%s: received %r, an event it had no part in" %
                                        (sub.name, key))
                    continue
                foreign = set(SECRET_RE.findall(raw)) - ok
                if foreign:
                    leaked += 1
                    if len(problems) < 8:
                        problems.append("%s: %r carries secrets of another owner's version: "
                                        "%s" % (sub.name, key, sorted(foreign)[:3]))
                if m.get("recipient") != recipient_json(ident):
                    unexpected += 1
                    problems.append("%s: recipient %r" % (sub.name, m.get("recipient")))
        if got_keys != want:
            rest = list(want)
            for k in got_keys:
                if k in rest:
                    rest.remove(k)
                else:
                    unexpected += 1
            missed += len(rest)
            if len(problems) < 8:
                first = next((i for i, (a, b) in enumerate(zip(got_keys, want)) if a != b),
                             min(len(got_keys), len(want)))
                problems.append("%s: %d received, %d expected; first difference at %d: got %r, "
                                "want %r" % (sub.name, len(got_keys), len(want), first,
                                             got_keys[first:first + 2], want[first:first + 2]))
    if report:
        print("\nownership %s: %d events; exact sequence: unexpected %d, missed %d; "
              "misrouted %d, leaked %d, owner never told %d, left not told %d" % (
                  plan.form, len(plan.events), unexpected, missed, misrouted, leaked,
                  missed_events, missed_left))
    return unexpected, missed, leaked, problems


@pytest.mark.parametrize("form", ["path", "nested", "lookup"])
def test_ownership_property(form, tmp_path, daemons, mongo_uri, db, db_name):
    report = MEASURE or os.environ.get("MC_PROPERTY_REPORT") == "1"
    plan = Plan(form, SEEDS[form], N_OPS)
    # The plan must exercise what it claims to.
    ops = {e["op"] for e in plan.events}
    assert ops == {"insert", "update", "replace", "delete"}, ops
    moves = [e for e in plan.events if e["op"] in ("update", "replace") and e["pre"] != e["post"]]
    assert len(moves) > N_OPS // 10, "too few ownership moves: %d" % len(moves)

    coll = create_with_images(db, "items")
    stream = {"db": db_name, "collection": "items", "max_await_time_ms": 100,
              "full_document": os.environ.get("MC_PROPERTY_FULL_DOCUMENT", "whenAvailable"),
              "full_document_before_change": "whenAvailable",
              "history": 4 * N_OPS}
    if form == "lookup":
        if os.environ.get("MC_PROPERTY_LOOKUP_IMAGES", "1") == "1":
            create_with_images(db, "businesses")
        db.businesses.bulk_write(plan.setup_businesses, ordered=True)
        stream["recipient"] = {"path": "fullDocument.biz",
                               "lookup": {"db": db_name, "collection": "businesses",
                                          "field": "_id", "recipient": "owner"}}
    else:
        stream["recipient"] = STREAM_FORMS[form]
    port = free_port()
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, {"items": stream}, port,
                      auth={"algorithm": "HS256", "secret": SECRET,
                            "admin_role": "mongocast:all"})
    d = start_live(daemons, cfg, port)

    now = int(time.time())

    def token(ident, admin=False):
        c = {"sub": "root" if admin else claim(ident), "iat": now, "exp": now + 3600}
        if admin:
            c["roles"] = ["mongocast:all"]
        return hs256(SECRET, c)

    base = "ws://127.0.0.1:%d" % port
    hub = Hub()
    try:
        specs = [("admin", base + stream_path("items", token=token(None, admin=True)))]
        specs += [("id-%r" % (i,), base + stream_path("items", token=token(i)))
                  for i in IDENTITIES]
        live = hub.connect_all(specs)
        wait_until(lambda: all(s.ready() for s in live if s), 60, "every subscriber's ready")

        t0 = time.monotonic()
        for name, batch in plan.batches:
            db[name].bulk_write(batch, ordered=True)
        write_s = time.monotonic() - t0

        idents = [None] + IDENTITIES
        expected_counts = [len(expected_for(plan, i)[0]) for i in idents]
        wait_until(lambda: live[0].count() >= expected_counts[0], 180, "the admin's events")
        for s, n in zip(live, expected_counts):
            if s and not MEASURE:
                wait_until(lambda: s.count() >= n, 30, "%s's %d messages" % (s.name, n))
        time.sleep(3 if MEASURE else 0.5)  # a stray late message would show up by now
        u, m, leaks, problems = compare(plan, list(zip(idents, live)), report)
        metrics = http_get(port, "/metrics")[2].decode()
        unresolved = re.search(r'^mongocast_recipient_unresolved_total\{stream="items"\} (\d+)$',
                               metrics, re.M)
        if report:
            print("unresolved (admins only): %s" % (unresolved.group(1) if unresolved else "?"))
        if MEASURE:
            print("\n".join(problems))
            print("subscribers refused: %d" % sum(1 for s in live if s is None))
            return
        assert (u, m, leaks) == (0, 0, 0), "\n".join(problems)
        assert unresolved and unresolved.group(1) == "0", metrics

        # Resume from the first event: the history replay follows the same rules.
        first_id = next(msg["id"] for _, msg in live[0].snapshot() if msg.get("type") ==
                        "change")
        rspecs = [("replay-" + n, url + "&since=" + first_id) for n, url in specs]
        replay = hub.connect_all(rspecs)
        rest = Plan.__new__(Plan)
        rest.form, rest.events = plan.form, plan.events[1:]
        rcounts = [len(expected_for(rest, i)[0]) for i in idents]
        for s, n in zip(replay, rcounts):
            wait_until(lambda: s.count() >= n, 60, "%s's %d replayed messages" % (s.name, n))
        time.sleep(0.3)
        for s in replay:
            assert not any(msg.get("type") == "reset" for _, msg in s.snapshot()), s.name
        u, m, leaks, problems = compare(rest, list(zip(idents, replay)), report)
        assert (u, m, leaks) == (0, 0, 0), "replay:\n" + "\n".join(problems)
        if report:
            print("ownership %s: %d writes in %d bulk calls took %.1fs" % (
                form, N_OPS, len(plan.batches), write_s))
        assert d.alive()
    finally:
        hub.close()
