"""Transactions through `mongocast run`, with SIGKILL at random moments.

A writer commits 1,000 multi-document transactions of 1 to 20 writes each (inserts, updates
and deletes, seeded) while the daemon, consuming the stream into a stdout sink whose output is
a file, is killed with SIGKILL four times and restarted. The events of one transaction share
the commit's clusterTime and carry lsid/txnNumber; their resume tokens differ by txnOpIndex.
The stream reads with batch_size 7, so getMore batches (and with them the sink's positions and
checkpoints) end inside transactions; each kill waits for a stored position that lies inside a
transaction (up to 8 s; checkpoints every 400 ms so that the position seen is still the stored
one when the kill lands), so restarts resume from inside one.

Checked (like test_daemon_crash.py, at the granularity of single writes):
  1. every write of every transaction is printed (no partial transaction lost);
  2. per run, ids strictly increase; a transaction's events come in txnOpIndex order;
  3. the checkpoint never covers an unprinted event (id <= T_k printed by a run <= k);
  4. duplicates only since the last checkpoint: run k+1 prints nothing with id <= T_k and
     starts with exactly the first event (over all runs) after T_k;
  5. every change carries lsid and txnNumber; each (lsid, txnNumber) has exactly its
     transaction's writes, all with one clusterTime;
  6. at least one kill left its stored position strictly inside a transaction.
Scale: 1,000 transactions (~10,500 writes); takes ~20-40 s on the ASan build. Runs against a
real replica set too (MONGODB_URI).
"""

import random
import signal
import threading
import time

from daemon_util import *  # noqa: F401,F403

N_TXN = 1000
KILLS = 4
SEED = 20261207


class TxnWriter(threading.Thread):
    """Commits N_TXN transactions; `txns[i]` = [(op, _id, (t, k)), ...] of transaction i,
    `done` counts committed ones. One session, so txnNumber grows by one per transaction."""

    def __init__(self, client, coll, rng):
        super().__init__(daemon=True)
        self.client = client
        self.coll = coll
        self.rng = rng
        self.txns = []
        self.txn_numbers = []
        self.done = 0
        self.error = None

    def run(self):
        try:
            live = []
            with self.client.start_session() as s:
                for t in range(N_TXN):
                    writes = []
                    s.start_transaction()
                    for k in range(self.rng.randint(1, 20)):
                        r = self.rng.random()
                        if r < 0.6 or not live:
                            _id = "t%d-%d" % (t, k)
                            self.coll.insert_one({"_id": _id, "w": [t, k]}, session=s)
                            writes.append(("insert", _id, (t, k)))
                            live.append(_id)
                        elif r < 0.85:
                            _id = self.rng.choice(live)
                            self.coll.update_one({"_id": _id}, {"$set": {"w": [t, k]}},
                                                 session=s)
                            writes.append(("update", _id, (t, k)))
                        else:
                            _id = live.pop(self.rng.randrange(len(live)))
                            self.coll.delete_one({"_id": _id}, session=s)
                            writes.append(("delete", _id, (t, k)))
                    s.commit_transaction()
                    self.txns.append(writes)
                    self.done = t + 1
                    if t % 50 == 49:
                        time.sleep(0.02)  # spread the load so that kills land mid-stream
        except Exception as e:  # reported by the test
            self.error = e


def identify(m, deleted_by_id):
    """(t, k) of a printed change: from the inserted document, the updated fields, or (for a
    delete, whose event has only the key) the writer's record of that delete."""
    c = m["change"]
    op = c["operationType"]
    if op == "insert":
        return tuple(c["fullDocument"]["w"])
    if op == "update":
        # w = [t, k] is unique to each write, so it is always an updated field.
        return tuple(c["updateDescription"]["updatedFields"]["w"])
    return deleted_by_id[c["documentKey"]["_id"]]


def test_sigkill_inside_transactions(tmp_path, daemons, client, mongo_uri, db, db_name):
    rng = random.Random(SEED)
    cp = tmp_path / "cp"
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100,
                              "batch_size": 7}},
                       checkpoint_dir=cp, interval_ms=400)
    db.create_collection("c")
    writer = TxnWriter(client, db.c, rng)
    step = N_TXN // (KILLS + 1)
    thresholds = [rng.randint(k * step + step // 4, (k + 1) * step - step // 4)
                  for k in range(KILLS)]
    tokens, outs = [], []
    found_inside = False

    def printed(path):
        return changes_of(read_jsonl(path)[0], "s")

    def inside_txn(token, path):
        """Whether `token` is the id of a printed event that is not its transaction's last."""
        txns = list(writer.txns)
        deleted = {_id: tk for w in txns for op, _id, tk in w if op == "delete"}
        for m in printed(path):
            if m["id"] == token:
                t, k = identify(m, deleted)
                return t < len(txns) and k < len(txns[t]) - 1
        return False

    for run in range(KILLS + 1):
        out = tmp_path / ("out-%d.jsonl" % run)
        outs.append(out)
        d = daemons(cfg, name="run%d" % run, stdout_path=out)
        d.wait_open()
        if run == 0:
            writer.start()
        if run == KILLS:
            break
        wait_for(lambda: checkpoint_token(cp, "s", "out"), timeout=30,
                 message="a first checkpoint")
        wait_for(lambda: writer.done >= thresholds[run] or writer.error, timeout=120,
                 message="writer progress")
        # Kill right after a stored position inside a transaction, if one shows up soon; the
        # last kill waits longer when none of the earlier ones found one (a loaded machine can
        # let the daemon sit caught up, its stored positions between transactions).
        wait_s = 30 if run == KILLS - 1 and not found_inside else 8
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            tok = checkpoint_token(cp, "s", "out")
            if tok and inside_txn(tok, out):
                found_inside = True
                break
            time.sleep(0.01)
        assert d.kill() == -signal.SIGKILL
        tokens.append(checkpoint_token(cp, "s", "out"))

    writer.join(180)
    assert writer.error is None, writer.error
    expected = {(t, k) for t, w in enumerate(writer.txns) for k in range(len(w))}
    deleted_by_id = {_id: tk for w in writer.txns for op, _id, tk in w if op == "delete"}

    def union():
        return {identify(m, deleted_by_id) for p in outs for m in printed(p)}

    wait_for(lambda: len(union()) >= len(expected), timeout=120, interval=0.5,
             message="all %d writes in the output" % len(expected))
    time.sleep(0.5)
    assert d.stop(signal.SIGTERM) == 0

    runs = [printed(p) for p in outs]
    for k, p in enumerate(outs):
        torn = read_jsonl(p)[1]
        assert len(torn) <= (1 if k < KILLS else 0), "run %d: torn lines %r" % (k, torn)

    # 1. every write, no partial transaction lost
    assert union() == expected, sorted(expected - union())[:20]

    # 2. order
    for k, msgs in enumerate(runs):
        ids = [m["id"] for m in msgs]
        assert all(a < b for a, b in zip(ids, ids[1:])), "run %d out of order" % k
        for a, b in zip(msgs, msgs[1:]):
            if a["change"]["txnNumber"] == b["change"]["txnNumber"]:
                assert identify(a, deleted_by_id)[1] < identify(b, deleted_by_id)[1]

    # 3 and 4: checkpoints and duplicates
    all_events = {}
    for k, msgs in enumerate(runs):
        for m in msgs:
            all_events.setdefault(m["id"], k)
    ordered_ids = sorted(all_events)
    for k, tok in enumerate(tokens):
        assert tok, "run %d stored no position" % k
        covered = [i for i in ordered_ids if i <= tok]
        assert all(all_events[i] <= k for i in covered), "checkpoint %d covers unprinted" % k
        nxt = runs[k + 1]
        assert all(m["id"] > tok for m in nxt), "run %d went back before its checkpoint" % (k + 1)
        after = [i for i in ordered_ids if i > tok]
        if nxt and after:
            assert nxt[0]["id"] == after[0], "run %d skipped or repeated after %s" % (k + 1, tok)

    # 5. lsid / txnNumber / one clusterTime per transaction
    by_txn = {}
    for msgs in runs:
        for m in msgs:
            c = m["change"]
            assert "lsid" in c and "txnNumber" in c, c
            key = (json_key(c["lsid"]), c["txnNumber"])
            by_txn.setdefault(key, {})[m["id"]] = (identify(m, deleted_by_id),
                                                   json_key(c["clusterTime"]))
    assert len(by_txn) == N_TXN
    for key, evs in by_txn.items():
        tks = sorted(tk for tk, _ in evs.values())
        t = tks[0][0]
        assert tks == [(t, k) for k in range(len(writer.txns[t]))], (key, tks)
        assert len({ct for _, ct in evs.values()}) == 1, "one clusterTime per transaction"

    # 6. restarts from inside a transaction happened
    inside = sum(1 for tok in tokens
                 if any(min(evs) <= tok < max(evs) for evs in by_txn.values()))
    assert inside >= 1, "no kill left its position inside a transaction"
    print("kills with the stored position inside a transaction: %d of %d" % (inside, KILLS))


def json_key(v):
    import json
    return json.dumps(v, sort_keys=True)
