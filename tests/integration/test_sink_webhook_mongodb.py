"""The webhook and mongodb sink types in a real `mongocast run`: delivery under receiver faults
and SIGKILLs of the daemon, exactly once after dedupe (webhook-id / _id), order per order_key,
dead letters, signatures and secret rotation, the TTL index, the loop guard, and a receiver that
never answers.

Scaled down from the issue's wording so that each test stays well under a minute on a loaded
2-core machine: the kill tests write 1,500 (webhook) and 3,000 (mongodb) documents instead of
10,000, with the same 3 SIGKILLs while writing; the properties (no loss, no double after dedupe,
order per key, only the refused ids dead-lettered) do not depend on the count. Receiver faults
are drawn per attempt (seeded): 500, 429 with Retry-After, stalls past the sink's timeout,
connection resets, and 400 for chosen documents.
"""

import json
import random
import socket
import threading
import time

from daemon_util import *  # noqa: F401,F403
from live_util import free_port, live_config, subscribers, wait_http  # noqa: F401
from server_util import metrics
from webhook_receiver import receivers  # noqa: F401

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_dGVzdC1zZWNyZXQtbnVtYmVyLXR3by0xMjM0NTY="




def n_of(msg):
    return msg["change"]["fullDocument"]["n"]


def kill_schedule(daemons, config, start, thresholds, name):
    """Starts the daemon, then the writer (`start()` -> (thread, done)), kills the daemon with
    SIGKILL once the writer passes each threshold, and leaves the last run going. Returns the
    last daemon and the writer thread."""
    d = None
    for run in range(len(thresholds) + 1):
        d = daemons(config, name="%s%d" % (name, run))
        d.wait_open()
        if run == 0:
            t, writer_done = start()
        if run == len(thresholds):
            return d, t
        wait_for(lambda: writer_done[0] >= thresholds[run], timeout=60, message="writer")
        time.sleep(0.3)
        assert d.kill() == -9
    return d, t


def start_writer(coll, n, docs_of, per_batch=50, pause=0.03):
    done = [0]

    def run():
        for start in range(0, n, per_batch):
            coll.insert_many([docs_of(i) for i in range(start, min(n, start + per_batch))])
            done[0] = min(n, start + per_batch)
            time.sleep(pause)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def test_webhook_faults_and_kills_exactly_once_in_order(tmp_path, daemons, receivers, client,
                                                       mongo_uri, db, db_name):
    n, owners, kills = 1500, 8, 3
    rng = random.Random(1105)
    rejected = set(rng.sample(range(n), 6))

    def reject_if(body):
        try:
            return json.loads(body)["change"]["fullDocument"]["n"] in rejected
        except (ValueError, KeyError, TypeError):
            return False

    recv = receivers(secrets=[SECRET_A], fail_rate=0.04, throttle_rate=0.02, retry_after=1,
                     stall_rate=0.01, stall_seconds=1.0, reset_rate=0.02, seed=7,
                     keep_bodies=True, reject_if=reject_if)
    cp = tmp_path / "cp"
    db.create_collection("c")
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "recipient": "fullDocument.owner",
               "max_await_time_ms": 100}},
        sinks=[{"name": "hook", "type": "webhook", "url": recv.url, "secret": SECRET_A,
                "timeout_ms": 500, "connect_timeout_ms": 200, "concurrency": 4,
                "order_key": "recipient", "retry": {"initial_ms": 20, "max_ms": 200},
                "dead_letter": {"db": db_name, "collection": "dead"}}],
        checkpoint_dir=cp, interval_ms=100)
    thresholds = [n * (k + 1) // (kills + 2) for k in range(kills)]
    d, t = kill_schedule(daemons, cfg,
                         lambda: start_writer(db.c, n, lambda i: {"n": i, "owner": "u%d" % (i % owners)}),
                         thresholds, "hook")
    t.join(60)

    def accepted():
        return {r["id"]: r for r in list(recv.attempts) if r["answer"] == 200}

    wait_for(lambda: len(accepted()) >= n - len(rejected), timeout=60, interval=0.2,
             message="every event accepted")
    wait_for(lambda: db.dead.count_documents({}) >= len(rejected), timeout=30,
             message="dead letters")
    assert d.stop() == 0
    attempts = list(recv.attempts)
    ok = [r for r in attempts if r["answer"] == 200]
    # Exactly once after dedupe by webhook-id; the id is the event's.
    by_id = {}
    for r in ok:
        assert r["body"]["id"] == r["id"]
        by_id.setdefault(r["id"], r)
    ns = sorted(n_of(r["body"]) for r in by_id.values())
    assert ns == sorted(set(range(n)) - rejected)
    # Per order key (the recipient), first acceptances in stream order.
    per_owner = {}
    for r in ok:
        if r["id"] in by_id and by_id[r["id"]] is r:
            per_owner.setdefault(r["body"]["recipient"], []).append(n_of(r["body"]))
    for owner, seq in per_owner.items():
        assert seq == sorted(seq), "owner %s out of order" % owner
    # Signatures all valid, timestamps fresh (the attempt's own time).
    assert all(r["sig_ok"] for r in attempts)
    assert all(abs(r["at"] - int(r["ts"])) < 5 for r in attempts)
    # The faults happened, and the refused documents (only they) are in the dead letter.
    answers = {r["answer"] for r in attempts}
    assert {500, 429, 400, "stall", "reset"} <= answers
    dead = list(db.dead.find())
    assert {x["message"]["change"]["fullDocument"]["n"] for x in dead} == rejected
    assert all(x["sink"] == "hook" and "HTTP 400" in x["error"] for x in dead)
    assert "whsec_" not in d.stderr_text()


def test_secret_rotation_batches_and_cloudevents(tmp_path, daemons, receivers, mongo_uri, db,
                                                 db_name):
    """Two secrets: a receiver that knows either one verifies every request. Batched
    CloudEvents: each request is a JSON array whose webhook-id is derived from its events."""
    old = receivers(secrets=[SECRET_A], keep_bodies=True)
    new = receivers(secrets=[SECRET_B], keep_bodies=True)
    db.create_collection("c")
    sinks = [{"name": name, "type": "webhook", "url": r.url, "secrets": [SECRET_A, SECRET_B],
              "format": "cloudevents", "batch_max_events": 25}
             for name, r in (("old", old), ("new", new))]
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}},
                       sinks=sinks, checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open()
    n = 200
    db.c.insert_many([{"n": i} for i in range(n)])
    for r in (old, new):
        wait_for(lambda: sum(len(a["body"]) for a in list(r.attempts) if a["answer"] == 200) >= n,
                 timeout=30, message="batches")
        assert all(a["sig_ok"] and a["answer"] == 200 for a in r.attempts)
        events = [e for a in r.attempts for e in a["body"]]
        assert [e["data"]["change"]["fullDocument"]["n"] for e in events] == list(range(n))
        assert all(e["type"] == "mongodb.change.insert" and e["specversion"] == "1.0"
                   for e in events)
        assert all(a["id"].startswith("batch_") for a in r.attempts)
        assert len(r.attempts) < n  # batched
    assert d.stop() == 0


def test_receiver_that_never_answers_holds_up_nothing(tmp_path, daemons, receivers, subscribers,
                                                      mongo_uri, db, db_name):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (the kernel does), reads nothing, never answers
    good = receivers(secrets=[SECRET_A], keep_bodies=True)
    port = free_port()
    db.create_collection("c")
    cfg = live_config(tmp_path / "c.yaml", mongo_uri,
                      {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}}, port,
                      sinks=[{"name": "silent", "type": "webhook", "secret": SECRET_A,
                              "url": "http://127.0.0.1:%d/x" % silent.getsockname()[1],
                              "timeout_ms": 60000, "concurrency": 2},
                             {"name": "good", "type": "webhook", "secret": SECRET_A,
                              "url": good.url}])
    d = daemons(cfg)
    wait_http(port, d)
    d.wait_open()
    ws = subscribers.ws(port, "/v1/streams/s", name="ws")
    ws.wait_ready()
    n = 300
    t0 = time.time()
    for i in range(n):
        db.c.insert_one({"n": i})
    ws.wait_changes(n, timeout=20)
    wait_for(lambda: len([a for a in list(good.attempts) if a["answer"] == 200]) >= n,
             timeout=20, message="the healthy receiver has every event")
    assert time.time() - t0 < 15
    got = [n_of(a["body"]) for a in good.attempts if a["answer"] == 200]
    assert got == list(range(n))
    m = metrics(port)
    assert m['mongocast_sink_in_flight{sink="silent"}'] >= 1
    assert m['mongocast_sink_outcomes_total{sink="good",class="2xx"}'] == n
    assert d.stop(timeout=30) == 0
    silent.close()


def test_mongodb_sink_kills_exactly_once_ttl(tmp_path, daemons, client, mongo_uri, db, db_name):
    n, kills = 3000, 3
    cp = tmp_path / "cp"
    db.create_collection("c")
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "recipient": "fullDocument.owner",
               "max_await_time_ms": 100, "batch_size": 500}},
        sinks=[{"name": "log", "type": "mongodb", "db": db_name, "collection": "activity",
                "expire_after_seconds": 2592000}],
        checkpoint_dir=cp, interval_ms=100)
    thresholds = [n * (k + 1) // (kills + 2) for k in range(kills)]
    d, t = kill_schedule(daemons, cfg,
                         lambda: start_writer(db.c, n, lambda i: {"n": i, "owner": "u%d" % (i % 5)},
                                              per_batch=100),
                         thresholds, "mg")
    t.join(60)
    wait_for(lambda: db.activity.count_documents({}) >= n, timeout=60, interval=0.2,
             message="every event written")
    assert d.stop() == 0
    docs = list(db.activity.find())
    assert len(docs) == n
    assert sorted(x["change"]["fullDocument"]["n"] for x in docs) == list(range(n))
    x = docs[0]
    assert x["stream"] == "s" and x["type"] == "insert" and x["ns"] == {"db": db_name, "coll": "c"}
    assert x["recipient"] == "u%d" % (x["change"]["fullDocument"]["n"] % 5)
    assert "documentKey" in x and "clusterTime" in x
    ttl = [ix for ix in db.activity.list_indexes() if ix["name"] == "mongocast_ttl"]
    assert ttl and ttl[0]["expireAfterSeconds"] == 2592000 and dict(ttl[0]["key"]) == {"wallTime": 1}


def test_mongodb_sink_loop_guard_refuses_check_and_run(tmp_path, mongo_uri, db_name):
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri, {"watch": {"db": db_name}},
        sinks=[{"name": "log", "type": "mongodb", "db": db_name, "collection": "activity"}])
    for cmd in ("check", "run"):
        r = run_cli(cmd, "-c", str(cfg), timeout=30)
        assert r.returncode != 0
        err = r.stdout + r.stderr
        assert "sink log writes into %s.activity" % db_name in err, err
        assert "stream watch" in err, err


def test_bad_options_are_clear(tmp_path, mongo_uri, db_name):
    cases = [
        ({"type": "webhook", "url": "ftp://x", "secret": SECRET_A}, "http"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x"}, "option secret"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x", "secret": "whsec_bad!"}, "secret"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x", "secret": SECRET_A,
          "order_key": "user"}, "order_key must be"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x", "secret": SECRET_A,
          "timeuot_ms": 5}, "did you mean 'timeout_ms'"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x", "secret": SECRET_A,
          "headers": {"webhook-id": "x"}}, "set by the sink"),
        ({"type": "mongodb", "db": db_name}, "db and collection are required"),
        ({"type": "mongodb", "db": db_name, "collection": "a", "write_concern": "most"},
         "write_concern.w"),
        ({"type": "webhook", "url": "http://127.0.0.1:1/x", "secret": SECRET_A,
          "dead_letter": {"db": db_name}}, "both db and collection"),
    ]
    for opts, needle in cases:
        sink = dict(name="k", **opts)
        cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                           {"s": {"db": db_name, "collection": "c"}}, sinks=[sink])
        r = run_cli("check", "-c", str(cfg), timeout=30)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and needle in out, (opts, out)
        assert "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" not in out


def test_check_probes_both_sink_types(tmp_path, receivers, mongo_uri, db_name):
    good = receivers(secrets=[SECRET_A])
    closed = free_port()
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri, {"s": {"db": db_name, "collection": "c"}},
        sinks=[{"name": "up", "type": "webhook", "url": good.url, "secret": SECRET_A},
               {"name": "down", "type": "webhook", "url": "http://127.0.0.1:%d/" % closed,
                "secret": SECRET_A},
               {"name": "log", "type": "mongodb", "db": db_name, "collection": "a"}])
    r = run_cli("check", "-c", str(cfg), timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Connection refused" in out, out
    assert not good.attempts  # a probe sends no request


def test_retry_after_fresh_timestamps_and_exhaustion(tmp_path, daemons, receivers, mongo_uri, db,
                                                     db_name):
    """A 429's Retry-After is waited for; every attempt has its own timestamp and signature
    and the same webhook-id; a receiver that always fails makes each event go to the dead
    letter after retry.max_attempts, with the last status in the reason."""
    slow = receivers(secrets=[SECRET_A], throttle_rate=0.25, retry_after=1, seed=3,
                     keep_bodies=True)
    broken = receivers(secrets=[SECRET_A], fail_rate=1.0)
    dead = tmp_path / "dead.jsonl"
    db.create_collection("c")
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}},
        sinks=[{"name": "slow", "type": "webhook", "url": slow.url, "secret": SECRET_A,
                "retry": {"initial_ms": 10, "max_ms": 20}},
               {"name": "broken", "type": "webhook", "url": broken.url, "secret": SECRET_A,
                "retry": {"initial_ms": 10, "max_ms": 20, "max_attempts": 3},
                "dead_letter": {"file": str(dead)}}],
        checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open()
    n = 12
    db.c.insert_many([{"n": i} for i in range(n)])
    wait_for(lambda: len([a for a in list(slow.attempts) if a["answer"] == 200]) >= n,
             timeout=40, message="slow receiver has every event")
    wait_for(lambda: dead.exists() and len(dead.read_text().splitlines()) >= n, timeout=30,
             message="every event of the broken receiver dead-lettered")
    assert d.stop() == 0
    by_id = {}
    for a in slow.attempts:
        by_id.setdefault(a["id"], []).append(a)
    throttled = 0
    for tries in by_id.values():
        for prev, nxt in zip(tries, tries[1:]):
            if prev["answer"] == 429:
                throttled += 1
                assert nxt["at"] - prev["at"] >= 0.95, "Retry-After not honoured"
                assert int(nxt["ts"]) >= int(prev["ts"])
    assert throttled >= 1
    assert [a["body"]["change"]["fullDocument"]["n"] for a in slow.attempts
            if a["answer"] == 200] == list(range(n))
    lines = [json.loads(x) for x in dead.read_text().splitlines()]
    assert sorted(x["message"]["change"]["fullDocument"]["n"] for x in lines) == list(range(n))
    assert all("gave up after 3 attempts: HTTP 500" in x["error"] for x in lines)
    # exactly 3 attempts per event at the broken receiver
    counts = {}
    for a in broken.attempts:
        counts[a["id"]] = counts.get(a["id"], 0) + 1
    assert sorted(counts.values()) == [3] * n
