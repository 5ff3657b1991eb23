"""Multi-document transactions in mongo-emulator, measured with pymongo 3.11 against MongoDB
6.0's documented behaviour: atomic commit, abort, snapshot isolation, write conflicts
(WriteConflict 112 with TransientTransactionError), the transaction state machine
(NoSuchTransaction 251, TransactionCommitted 256, TransactionTooOld 225), idempotent commit,
and the change events of a committed transaction (lsid, txnNumber, one clusterTime, tokens
ordered by txnOpIndex, resuming inside a transaction). Everything here also runs against a real
replica set (MONGODB_URI)."""

import threading
import time

import pytest
from bson import Int64, SON
from pymongo.errors import DuplicateKeyError, NotMasterError, OperationFailure

from test_emulator_change_streams import AWAIT_MS, assert_no_more, changes, next_change

TRANSIENT = "TransientTransactionError"


def labels(exc):
    return (exc.details or {}).get("errorLabels", [])


def raw_session(make_client, db):
    """(client, db, session): a session of a client of its own (so that no pooled session id
    with a used txnNumber comes back) for hand-built transaction commands, without causal
    readConcern, and that client's handle on `db`."""
    c = make_client()
    return c, c[db.name], c.start_session(causal_consistency=False)


def txn_cmd(db, session, cmd, txn_number, start=False, **extra):
    """Runs `cmd` (a SON) inside transaction `txn_number` of `session`, as a driver sends it."""
    spec = SON(cmd)
    spec["txnNumber"] = Int64(txn_number)
    if start:
        spec["startTransaction"] = True
    spec["autocommit"] = False
    spec.update(extra)
    return db.command(spec, session=session)


def end_txn(client, session, name, txn_number):
    return client.admin.command(SON([(name, 1), ("txnNumber", Int64(txn_number)),
                                     ("autocommit", False)]), session=session)


def insert_cmd(coll, *docs):
    return SON([("insert", coll), ("documents", list(docs))])


def find_cmd(coll, flt=None):
    return SON([("find", coll), ("filter", flt or {})])


def cursor_docs(reply):
    return reply["cursor"]["firstBatch"]


# ---- commit and abort ----

def test_commit_applies_all_writes_at_once(client, db):
    db.c.insert_many([{"_id": 1, "v": 0}, {"_id": 2, "v": 0}])
    with client.start_session() as s:
        with s.start_transaction():
            db.c.insert_one({"_id": 3, "v": 1}, session=s)
            db.c.update_one({"_id": 1}, {"$set": {"v": 1}}, session=s)
            db.c.delete_one({"_id": 2}, session=s)
            # the transaction sees its own writes, in natural order ...
            assert list(db.c.find({}, session=s)) == [{"_id": 1, "v": 1}, {"_id": 3, "v": 1}]
            # ... nobody else does before the commit
            assert list(db.c.find({})) == [{"_id": 1, "v": 0}, {"_id": 2, "v": 0}]
            assert db.c.count_documents({}, session=s) == 2
    assert sorted(db.c.find({}), key=lambda d: d["_id"]) == [{"_id": 1, "v": 1},
                                                             {"_id": 3, "v": 1}]


def test_abort_discards_writes_and_produces_no_event(client, db):
    db.c.insert_one({"_id": 1, "v": 0})
    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        with client.start_session() as s:
            s.start_transaction()
            db.c.insert_one({"_id": 2}, session=s)
            db.c.update_one({"_id": 1}, {"$set": {"v": 9}}, session=s)
            s.abort_transaction()
        db.c.insert_one({"_id": "marker"})
        ev = next_change(stream)
        assert ev["documentKey"] == {"_id": "marker"}
        assert "txnNumber" not in ev and "lsid" not in ev
        assert_no_more(stream)
    assert list(db.c.find({}, {"_id": 1, "v": 1})) == [{"_id": 1, "v": 0}, {"_id": "marker"}]


def test_transaction_reads_a_snapshot(client, db):
    db.c.insert_one({"_id": 1, "v": 0})
    with client.start_session() as s:
        with s.start_transaction():
            assert db.c.find_one({"_id": 1}, session=s)["v"] == 0
            db.c.update_one({"_id": 1}, {"$set": {"v": 5}})  # outside, commits at once
            db.c.insert_one({"_id": 2})
            # the transaction keeps reading the data as of its start
            assert db.c.find_one({"_id": 1}, session=s)["v"] == 0
            assert db.c.find_one({"_id": 2}, session=s) is None
            assert [d["_id"] for d in db.c.find({}, session=s)] == [1]
    assert db.c.find_one({"_id": 1})["v"] == 5


def test_with_transaction_commits_and_returns(client, db):
    with client.start_session() as s:
        result = s.with_transaction(
            lambda sess: db.c.insert_many([{"_id": i} for i in range(3)],
                                          session=sess).inserted_ids)
    assert result == [0, 1, 2]
    assert db.c.count_documents({}) == 3


def test_implicitly_created_collection(client, db):
    with client.start_session() as s:
        with s.start_transaction():
            db.fresh.insert_one({"_id": 1}, session=s)
            assert db.fresh.find_one({"_id": 1}, session=s) == {"_id": 1}
            assert "fresh" not in db.list_collection_names()
    assert db.fresh.find_one({"_id": 1}) == {"_id": 1}


# ---- write conflicts ----

def test_write_conflict_between_two_transactions(client, db):
    db.c.insert_one({"_id": 1, "v": 0})
    s1, s2 = client.start_session(), client.start_session()
    try:
        s1.start_transaction()
        s2.start_transaction()
        db.c.update_one({"_id": 1}, {"$inc": {"v": 1}}, session=s1)
        with pytest.raises(OperationFailure) as exc:
            db.c.update_one({"_id": 1}, {"$inc": {"v": 10}}, session=s2)
        assert exc.value.code == 112
        assert TRANSIENT in labels(exc.value)
        assert "WriteConflict" in exc.value.details["errmsg"]
        # the failed statement aborted s2's transaction
        with pytest.raises(OperationFailure) as exc:
            db.c.find_one({"_id": 1}, session=s2)
        assert exc.value.code == 251 and TRANSIENT in labels(exc.value)
        s2.abort_transaction()
        s1.commit_transaction()  # the first writer wins
    finally:
        s1.end_session()
        s2.end_session()
    assert db.c.find_one({"_id": 1})["v"] == 1


def test_write_conflict_with_a_write_committed_after_the_snapshot(client, db):
    db.c.insert_one({"_id": 1, "v": 0})
    with client.start_session() as s:
        s.start_transaction()
        assert db.c.find_one({"_id": 1}, session=s)["v"] == 0  # snapshot taken
        db.c.update_one({"_id": 1}, {"$set": {"v": 7}})
        with pytest.raises(OperationFailure) as exc:
            db.c.update_one({"_id": 1}, {"$set": {"v": 8}}, session=s)
        assert exc.value.code == 112 and TRANSIENT in labels(exc.value)
        s.abort_transaction()
    assert db.c.find_one({"_id": 1})["v"] == 7


def test_insert_of_an_id_inserted_after_the_snapshot_conflicts(client, db):
    db.c.insert_one({"_id": 0})
    with client.start_session() as s:
        s.start_transaction()
        db.c.find_one({"_id": 0}, session=s)
        db.c.insert_one({"_id": 1, "by": "outside"})
        with pytest.raises(OperationFailure) as exc:
            db.c.insert_one({"_id": 1, "by": "txn"}, session=s)
        assert exc.value.code == 112 and TRANSIENT in labels(exc.value)
        s.abort_transaction()


def test_write_outside_waits_for_the_transaction(client, db, make_client):
    db.c.insert_one({"_id": 1, "v": 0})
    other = make_client()
    done = []

    def writer():
        other[db.name].c.update_one({"_id": 1}, {"$inc": {"v": 100}})
        done.append(True)

    with client.start_session() as s:
        s.start_transaction()
        db.c.update_one({"_id": 1}, {"$inc": {"v": 1}}, session=s)
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.5)
        assert not done, "a write outside the transaction changed a document it holds"
        s.commit_transaction()
        t.join(10)
    assert done
    assert db.c.find_one({"_id": 1})["v"] == 101  # both, the transaction's first


def test_with_transaction_retries_a_transient_conflict(client, db):
    db.c.insert_one({"_id": 1, "v": 0})
    attempts = []
    blocker = client.start_session()

    def callback(s):
        attempts.append(1)
        if len(attempts) == 1:
            blocker.start_transaction()
            db.c.update_one({"_id": 1}, {"$set": {"by": "blocker"}}, session=blocker)
        else:
            blocker.abort_transaction()
        db.c.update_one({"_id": 1}, {"$inc": {"v": 1}}, session=s)

    try:
        with client.start_session() as s:
            s.with_transaction(callback)
    finally:
        blocker.end_session()
    assert len(attempts) == 2
    assert db.c.find_one({"_id": 1}) == {"_id": 1, "v": 1}


def test_duplicate_key_is_a_write_error_and_aborts(client, db):
    db.c.insert_one({"_id": 1})
    with client.start_session() as s:
        s.start_transaction()
        db.c.insert_one({"_id": 2}, session=s)
        with pytest.raises(DuplicateKeyError):
            db.c.insert_one({"_id": 1}, session=s)
        with pytest.raises(OperationFailure) as exc:
            db.c.insert_one({"_id": 3}, session=s)
        assert exc.value.code == 251 and TRANSIENT in labels(exc.value)
        s.abort_transaction()
    assert db.c.count_documents({}) == 1


# ---- the state machine, with the commands a driver sends ----

def test_commit_is_idempotent_and_the_outcome_sticks(client, db, make_client):
    client, db, s = raw_session(make_client, db)
    try:
        txn_cmd(db, s, insert_cmd("c", {"_id": 1}), 1, start=True)
        assert end_txn(client, s, "commitTransaction", 1)["ok"] == 1
        assert end_txn(client, s, "commitTransaction", 1)["ok"] == 1  # a retried commit
        with pytest.raises(OperationFailure) as exc:
            end_txn(client, s, "abortTransaction", 1)
        assert exc.value.code == 256  # TransactionCommitted
        with pytest.raises(OperationFailure) as exc:
            txn_cmd(db, s, insert_cmd("c", {"_id": 2}), 1)
        assert exc.value.code == 256

        txn_cmd(db, s, insert_cmd("c", {"_id": 3}), 2, start=True)
        assert end_txn(client, s, "abortTransaction", 2)["ok"] == 1
        with pytest.raises(OperationFailure) as exc:
            end_txn(client, s, "commitTransaction", 2)
        assert exc.value.code == 251 and TRANSIENT in labels(exc.value)
        with pytest.raises(OperationFailure) as exc:
            end_txn(client, s, "abortTransaction", 2)
        assert exc.value.code == 251
    finally:
        s.end_session()
    assert [d["_id"] for d in db.c.find({})] == [1]


def test_transaction_numbers(client, db, make_client):
    client, db, s = raw_session(make_client, db)
    try:
        with pytest.raises(OperationFailure) as exc:  # never started
            txn_cmd(db, s, find_cmd("c"), 5)
        assert exc.value.code == 251 and TRANSIENT in labels(exc.value)
        assert "does not match any in-progress transactions" in exc.value.details["errmsg"]
        txn_cmd(db, s, find_cmd("c"), 5, start=True)
        with pytest.raises(OperationFailure) as exc:  # the active number again
            txn_cmd(db, s, find_cmd("c"), 5, start=True)
        assert exc.value.code == 117
        with pytest.raises(OperationFailure) as exc:  # an older number
            txn_cmd(db, s, find_cmd("c"), 4, start=True)
        assert exc.value.code == 225  # TransactionTooOld
        # a newer transaction aborts the open one
        txn_cmd(db, s, insert_cmd("c", {"_id": "a"}), 5)
        txn_cmd(db, s, insert_cmd("c", {"_id": "b"}), 6, start=True)
        with pytest.raises(OperationFailure) as exc:
            end_txn(client, s, "commitTransaction", 5)
        assert exc.value.code == 225
        end_txn(client, s, "commitTransaction", 6)
    finally:
        s.end_session()
    assert [d["_id"] for d in db.c.find({})] == ["b"]


def test_session_field_errors(client, db, make_client):
    client, db, s = raw_session(make_client, db)
    try:
        with pytest.raises(OperationFailure) as exc:
            db.command(SON([("find", "c"), ("txnNumber", Int64(1)), ("autocommit", True)]),
                       session=s)
        assert exc.value.code == 72  # autocommit=true is not allowed
        with pytest.raises(OperationFailure) as exc:
            db.command(SON([("find", "c"), ("startTransaction", True)]), session=s)
        assert exc.value.code == 72
        with pytest.raises(OperationFailure) as exc:  # a read is not a retryable write
            db.command(SON([("find", "c"), ("txnNumber", Int64(1))]), session=s)
        assert exc.value.code == 50768
    finally:
        s.end_session()


def test_commands_refused_in_a_transaction(client, db, make_client):
    db.c.insert_one({"_id": 1})
    client, db, s = raw_session(make_client, db)
    try:
        with pytest.raises(OperationFailure) as exc:
            txn_cmd(db, s, SON([("count", "c")]), 1, start=True)
        assert exc.value.code == 263 and "Cannot run 'count'" in exc.value.details["errmsg"]
        with pytest.raises(OperationFailure) as exc:
            txn_cmd(db, s, SON([("aggregate", "c"), ("pipeline", [{"$changeStream": {}}]),
                                ("cursor", {})]), 2, start=True)
        assert exc.value.code == 263
        txn_cmd(db, s, find_cmd("c"), 3, start=True)
        with pytest.raises(OperationFailure) as exc:
            txn_cmd(db, s, find_cmd("c"), 3, readConcern={"level": "snapshot"})
        assert exc.value.code == 72  # readConcern only on the first command
    finally:
        s.end_session()


def test_snapshot_read_concern_at_cluster_time(client, db, make_client):
    db.c.insert_one({"_id": 1, "v": 0})
    t0 = db.command("ping")["operationTime"]
    db.c.update_one({"_id": 1}, {"$set": {"v": 1}})
    client, db, s = raw_session(make_client, db)
    try:
        r = txn_cmd(db, s, find_cmd("c"), 1, start=True,
                    readConcern={"level": "snapshot", "atClusterTime": t0})
        assert cursor_docs(r) == [{"_id": 1, "v": 0}]
        assert "atClusterTime" not in r["cursor"]  # only outside transactions
        # writing what changed after the snapshot conflicts
        with pytest.raises(OperationFailure) as exc:
            txn_cmd(db, s, SON([("update", "c"),
                                ("updates", [{"q": {"_id": 1}, "u": {"$set": {"v": 2}}}])]), 1)
        assert exc.value.code == 112
    finally:
        s.end_session()


def test_transaction_lifetime_limit(client, db):
    was = client.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=1)["was"]
    try:
        with client.start_session() as s:
            s.start_transaction()
            db.c.insert_one({"_id": 1}, session=s)
            deadline = time.monotonic() + 15
            while True:
                try:
                    db.c.find_one({}, session=s)
                except OperationFailure as exc:
                    assert exc.code == 251 and TRANSIENT in labels(exc)
                    break
                assert time.monotonic() < deadline, "transaction was never aborted"
                time.sleep(0.3)
            s.abort_transaction()
    finally:
        client.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=was)
    assert db.c.count_documents({}) == 0


# ---- change events ----

def test_committed_transaction_events(client, db):
    db.c.insert_one({"_id": 0})
    with db.watch(max_await_time_ms=AWAIT_MS) as dbs, \
            db.c.watch(max_await_time_ms=AWAIT_MS) as cs:
        with client.start_session() as s:
            with s.start_transaction():
                db.c.insert_one({"_id": 1}, session=s)
                db.other.insert_one({"_id": 2}, session=s)
                db.c.update_one({"_id": 0}, {"$set": {"v": 1}}, session=s)
                db.c.delete_one({"_id": 1}, session=s)
            lsid = s.session_id["id"]
        db.c.insert_one({"_id": "after"})
        evs = changes(dbs, 5)
        coll_evs = changes(cs, 4)
    txn = evs[:4]
    assert [e["operationType"] for e in txn] == ["insert", "insert", "update", "delete"]
    assert [e["ns"]["coll"] for e in txn] == ["c", "other", "c", "c"]
    for e in txn:
        assert list(e.keys())[:3] == ["txnNumber", "lsid", "_id"]
        assert e["txnNumber"] == 1 and isinstance(e["txnNumber"], int)
        assert e["lsid"]["id"].bytes == bytes(lsid)
        assert set(e["lsid"]) == {"id", "uid"}
        assert len(e["lsid"]["uid"]) == 32
        assert e["clusterTime"] == txn[0]["clusterTime"]
    toks = [e["_id"]["_data"] for e in evs]
    assert toks == sorted(toks) and len(set(toks)) == 5
    assert "txnNumber" not in evs[4] and evs[4]["clusterTime"] > txn[0]["clusterTime"]
    # the collection stream sees its own writes of the transaction, same tokens
    assert [e["_id"] for e in coll_evs] == [txn[0]["_id"], txn[2]["_id"], txn[3]["_id"],
                                            evs[4]["_id"]]


def test_resume_inside_a_transaction(client, db):
    with db.watch(max_await_time_ms=AWAIT_MS) as stream:
        with client.start_session() as s:
            with s.start_transaction():
                for i in range(4):
                    db.c.insert_one({"_id": i}, session=s)
        db.c.insert_one({"_id": "after"})
        evs = changes(stream, 5)
    for k in range(4):
        with db.watch(resume_after=evs[k]["_id"], max_await_time_ms=AWAIT_MS) as again:
            rest = changes(again, 4 - k)
            assert [e["_id"] for e in rest] == [e["_id"] for e in evs[k + 1:]]
            assert_no_more(again, 1)
    # startAtOperationTime at the commit time: the whole transaction
    with db.watch(start_at_operation_time=evs[0]["clusterTime"],
                  max_await_time_ms=AWAIT_MS) as again:
        assert [e["_id"] for e in changes(again, 5)] == [e["_id"] for e in evs]


def test_many_transactions_deliver_every_committed_write_once(client, db):
    """Concurrent transactions, some aborted, some conflicting: the stream has each committed
    write exactly once, grouped by transaction, never a write of an aborted one."""
    db.c.insert_many([{"_id": i, "n": 0} for i in range(10)])
    committed = []
    lock = threading.Lock()
    errors = []

    def worker(w):
        with client.start_session() as s:
            for k in range(25):
                ids = [(w * 7 + k * 3 + j) % 10 for j in range(1 + k % 4)]
                ids = sorted(set(ids))
                tag = "w%dk%d" % (w, k)
                try:
                    s.start_transaction()
                    for i in ids:
                        db.c.update_one({"_id": i}, {"$inc": {"n": 1}, "$set": {"tag": tag}},
                                        session=s)
                    if k % 5 == 4:
                        s.abort_transaction()
                        continue
                    s.commit_transaction()
                    with lock:
                        committed.append((tag, ids))
                except OperationFailure as exc:
                    if TRANSIENT not in labels(exc):
                        errors.append(exc)
                    if s.in_transaction:
                        s.abort_transaction()

    with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        n = sum(len(ids) for _, ids in committed)
        evs = changes(stream, n, timeout=20)
        assert_no_more(stream, 1)
    by_tag = {}
    for e in evs:
        assert e["operationType"] == "update"
        tag = e["updateDescription"]["updatedFields"]["tag"]
        by_tag.setdefault(tag, []).append(e)
    assert sorted(by_tag) == sorted(t for t, _ in committed)
    for tag, ids in committed:
        group = by_tag[tag]
        assert [e["documentKey"]["_id"] for e in group] == ids
        assert len({(e["clusterTime"], e["txnNumber"], e["lsid"]["id"]) for e in group}) == 1
    # the counters add up to the committed increments
    total = sum(d["n"] for d in db.c.find({}))
    assert total == n


# ---- retried commits, as drivers retry them ----

def fail_commit_once(client, **data):
    data["failCommands"] = ["commitTransaction"]
    try:
        client.admin.command(SON([("configureFailPoint", "failCommand"),
                                  ("mode", {"times": 1}), ("data", data)]))
    except OperationFailure as exc:
        if exc.code == 59:
            pytest.skip("server has no configureFailPoint (enableTestCommands)")
        raise


@pytest.mark.parametrize("failure", [{"closeConnection": True}, {"errorCode": 91}],
                         ids=["network-error", "ShutdownInProgress"])
def test_commit_is_retried_once_and_applies_once(client, db, failure):
    fail_commit_once(client, **failure)
    try:
        with db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
            with client.start_session() as s:
                with s.start_transaction():
                    db.c.insert_one({"_id": 1}, session=s)
                    db.c.insert_one({"_id": 2}, session=s)
            evs = changes(stream, 2)
            assert_no_more(stream, 1)
    finally:
        client.admin.command(SON([("configureFailPoint", "failCommand"), ("mode", "off")]))
    assert [e["documentKey"]["_id"] for e in evs] == [1, 2]
    assert db.c.count_documents({}) == 2


def test_retryable_error_label_on_commit(client, make_client, db):
    fail_commit_once(client, errorCode=91)
    c, rdb, s = raw_session(make_client, db)
    try:
        txn_cmd(rdb, s, insert_cmd("c", {"_id": 1}), 1, start=True)
        # pymongo raises code 91 as NotMasterError, with the reply in `details`
        with pytest.raises((OperationFailure, NotMasterError)) as exc:
            end_txn(c, s, "commitTransaction", 1)
        assert exc.value.details["code"] == 91
        assert "RetryableWriteError" in labels(exc.value)
        assert end_txn(c, s, "commitTransaction", 1)["ok"] == 1  # the retry commits
    finally:
        client.admin.command(SON([("configureFailPoint", "failCommand"), ("mode", "off")]))
        s.end_session()
    assert db.c.count_documents({}) == 1
