"""The lease per stream (docs/config.md, "lease"): several `mongocast run` on one config, every
node serves its WebSocket/SSE clients, exactly one (the holder of the stream's lease) feeds the
mongodb sink, and when it dies another takes over from the positions it stored.

The sink writes each event as a document {_id: event id, leaseEpoch, change, ...}; a change
stream on that collection, opened before anything runs, gives the order in which MongoDB
applied the writes. Fencing holds when no write of an older epoch follows a write of a newer
one in that order.

Scaled for an ASan build on a loaded 2-core machine: 6,000 writes (the issue says 20,000), with
three SIGKILLs of the leader while writing (a fresh node started after each, so three keep
running) and one SIGSTOP of the leader for longer than the lease (the paused node must not
write after it resumes: its own monotonic deadline fenced it). The properties do not depend on
the count. The webhook test checks the same order on the mongocast-lease-epoch header across
a takeover; the other tests check the `lease` block in `mongocast check` and the release at
stop (the next node takes over at once).
"""

import re
import signal
import threading
import time

import pytest

from daemon_util import *  # noqa: F401,F403
from server_util import http_get, metrics
from webhook_receiver import receivers  # noqa: F401 (fixture)

TTL_MS, RENEW_MS = 1500, 300


def lease_config(path, uri, db_name):
    return write_config(
        path, uri,
        {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100, "batch_size": 500}},
        sinks=[{"name": "log", "type": "mongodb", "db": db_name, "collection": "activity"}],
        extra="\n".join([
            "checkpoint: {store: mongodb, db: %s, collection: checkpoints, interval_ms: 100}"
            % db_name,
            "lease: {enabled: true, db: %s, collection: leases, ttl_ms: %d, renew_ms: %d}"
            % (db_name, TTL_MS, RENEW_MS),
        ]))


def port_of(d):
    d.wait_stderr(r"server listening on 127\.0\.0\.1:\d+")
    return int(re.search(r"server listening on 127\.0\.0\.1:(\d+)", d.stderr_text()).group(1))


def holder_pid(db):
    doc = db.leases.find_one({"_id": "s"})
    if not doc or not doc.get("holder"):
        return None, doc
    return int(doc["holder"].rsplit(":", 1)[1]), doc


class Recorder:
    """Reads the sink collection's change stream in a thread: the write order."""

    def __init__(self, coll):
        self.writes = []  # (n, leaseEpoch) in the order MongoDB applied them
        self.stop = False
        self.cs = coll.watch(max_await_time_ms=100)
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            ch = self.cs.try_next()
            if ch is None:
                continue
            if ch["operationType"] == "insert":
                d = ch["fullDocument"]
                self.writes.append((d["change"]["fullDocument"]["n"], d.get("leaseEpoch"),
                                    time.monotonic()))

    def close(self):
        self.stop = True
        self.t.join(10)
        self.cs.close()


def leader_and_standby(daemons, cfg, db):
    """Starts daemon a, waits until it holds the lease, then starts daemon b (a standby):
    both with `cfg`, both with their streams open. Returns (a, b)."""
    a = daemons(cfg, name="a")
    a.wait_open()
    wait_for(lambda: holder_pid(db)[0] == a.pid, timeout=30, message="a leads")
    b = daemons(cfg, name="b")
    b.wait_open()
    return a, b


def test_lease_three_nodes_kills_and_pause_fenced(tmp_path, daemons, client, mongo_uri, db,
                                                  db_name):
    n, kills = 6000, 3
    db.create_collection("c")
    db.create_collection("activity")
    rec = Recorder(db.activity)
    cfg = lease_config(tmp_path / "c.yaml", mongo_uri, db_name)
    nodes = {}
    seq = [0]

    def start_node():
        seq[0] += 1
        d = daemons(cfg, name="node%d" % seq[0])
        nodes[d.pid] = d
        return d

    for _ in range(3):
        start_node()
    for d in list(nodes.values()):
        d.wait_open()
    wait_for(lambda: holder_pid(db)[0] in nodes, timeout=30, message="a leader")

    # Every node serves clients; the leader alone says so; the standbys are ready too.
    leader = holder_pid(db)[0]
    wait_for(lambda: all(http_get(port_of(d), "/readyz")[0] == 200 for d in nodes.values()),
             timeout=30, message="every node ready")
    for pid, d in nodes.items():
        body = http_get(port_of(d), "/readyz")[2].decode()
        role = "leader" if pid == leader else "standby"
        assert '"s":{"role":"%s"' % role in body, body
        m = metrics(port_of(d))
        assert m['mongocast_lease_holder{stream="s"}'] == (1 if pid == leader else 0)

    done = [0]

    def write():
        for start in range(0, n, 100):
            db.c.insert_many([{"n": i} for i in range(start, min(n, start + 100))])
            done[0] = min(n, start + 100)
            time.sleep(0.02)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    takeovers = []  # (seconds from the kill to the new holder, to its first write)
    thresholds = [n * (k + 1) // (kills + 2) for k in range(kills)]
    for k, th in enumerate(thresholds):
        wait_for(lambda: done[0] >= th, timeout=120, message="writer")
        old, doc = holder_pid(db)
        assert old in nodes
        old_epoch = doc["epoch"]
        assert nodes.pop(old).kill() == -9
        t0 = time.monotonic()
        start_node()
        wait_for(lambda: holder_pid(db)[0] in nodes, timeout=30, message="a new leader")
        t1 = time.monotonic()
        new, doc = holder_pid(db)
        assert doc["epoch"] == old_epoch + 1
        wait_for(lambda: any(e == old_epoch + 1 for _, e, _ in rec.writes[-500:]),
                 timeout=30, message="the new leader writes")
        t2 = min(t for _, e, t in rec.writes if e == old_epoch + 1)
        takeovers.append((t1 - t0, t2 - t0))

    # A leader paused past its lease: another takes over; resumed, it writes nothing more.
    wait_for(lambda: done[0] >= n * (kills + 1) // (kills + 2), timeout=120, message="writer")
    paused, doc = holder_pid(db)
    paused_epoch = doc["epoch"]
    nodes[paused].send(signal.SIGSTOP)
    try:
        wait_for(lambda: holder_pid(db)[0] not in (None, paused), timeout=30,
                 message="a leader instead of the paused one")
        time.sleep(0.5)
    finally:
        nodes[paused].send(signal.SIGCONT)
    nodes[paused].wait_stderr(r"lease (lost|ran out)|sink fenced", timeout=30)

    writer.join(120)
    wait_for(lambda: db.activity.count_documents({}) >= n, timeout=90, interval=0.2,
             message="every event written")
    time.sleep(1.0)  # anything a fenced node would still write
    rec.close()

    ns = sorted(x["change"]["fullDocument"]["n"] for x in db.activity.find())
    assert ns == list(range(n)), "every event exactly once in the sink (_id dedupes replays)"

    # Fencing: in write order the epochs never go back.
    epochs = [e for _, e, _ in rec.writes]
    assert None not in epochs
    back = [(i, epochs[i - 1], epochs[i]) for i in range(1, len(epochs))
            if epochs[i] < epochs[i - 1]]
    assert not back, "a write of an older epoch after a newer one: %r" % back[:5]
    assert paused_epoch + 1 in epochs  # the pause did hand the lease over
    assert len(set(epochs)) >= kills + 2  # created, 3 kills, the pause
    final, doc = holder_pid(db)
    assert doc["epoch"] == max(epochs)

    # Takeover within the lease time (plus the renew interval at which standbys look, and the
    # machine's slack); the first write follows once the new leader has caught up.
    for to_holder, to_write in takeovers:
        assert to_holder <= (TTL_MS + 2 * RENEW_MS) / 1000.0 + 2.0, takeovers
    print("takeovers (s from kill -9 to new holder, to its first write): %s" %
          ", ".join("%.2f/%.2f" % t for t in takeovers))

    # Exactly one leader now; the others on standby.
    holders = [metrics(port_of(d))['mongocast_lease_holder{stream="s"}'] for d in nodes.values()]
    assert sorted(holders) == [0] * (len(holders) - 1) + [1]


def test_lease_config_checked(tmp_path, mongo_uri, db_name):
    bad = [
        ("lease: {enabled: true}", "needs checkpoint.store: mongodb"),
        ("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl_ms: 1000, renew_ms: 500}",
         "at most a third of lease.ttl_ms"),
        ("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl_ms: 10}", "ttl_ms"),
        ("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl: 10}", "unknown key"),
    ]
    for extra, msg in bad:
        cfg = write_config(tmp_path / "c.yaml", mongo_uri, {"s": {"db": db_name}}, extra=extra)
        r = run_cli("check", "-c", str(cfg), timeout=30)
        assert r.returncode != 0, extra
        assert msg in r.stdout + r.stderr, (extra, r.stdout + r.stderr)
    # A sink's initial copy cannot be resumed by another node yet: refused with the lease.
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri, {"s": {"db": db_name, "collection": "c"}},
        sinks=[{"name": "log", "type": "mongodb", "db": db_name, "collection": "activity",
                "initial": "snapshot"}],
        extra="checkpoint: {store: mongodb}\nlease: {enabled: true}")
    r = run_cli("check", "-c", str(cfg), timeout=30)
    assert r.returncode != 0
    assert "initial: snapshot is not supported together with lease.enabled" in r.stdout + r.stderr


def test_lease_release_on_stop_hands_over_at_once(tmp_path, daemons, client, mongo_uri, db,
                                                   db_name):
    db.create_collection("c")
    cfg = lease_config(tmp_path / "c.yaml", mongo_uri, db_name)
    a, b = leader_and_standby(daemons, cfg, db)
    db.c.insert_many([{"n": i} for i in range(200)])
    wait_for(lambda: db.activity.count_documents({}) >= 200, timeout=30, message="a writes")
    epoch = holder_pid(db)[1]["epoch"]
    t0 = time.monotonic()
    assert a.stop() == 0
    assert holder_pid(db)[0] != a.pid  # released at stop
    wait_for(lambda: holder_pid(db)[0] == b.pid, timeout=10, message="b leads")
    took = time.monotonic() - t0
    assert holder_pid(db)[1]["epoch"] == epoch + 1
    db.c.insert_many([{"n": i} for i in range(200, 400)])
    wait_for(lambda: db.activity.count_documents({}) >= 400, timeout=30, message="b writes")
    docs = list(db.activity.find({"leaseEpoch": epoch + 1}))
    assert docs and min(d["change"]["fullDocument"]["n"] for d in docs) >= 0
    ns = sorted(x["change"]["fullDocument"]["n"] for x in db.activity.find())
    assert ns == list(range(400))
    # The handover does not wait for the lease to expire (the stop itself takes a while).
    assert took < 10.0


def test_lease_epoch_in_webhook_header(tmp_path, daemons, client, mongo_uri, db, db_name,
                                       receivers):
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    rcv = receivers(secrets=[secret])
    db.create_collection("c")
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}},
        sinks=[{"name": "hook", "type": "webhook", "url": rcv.url, "secret": secret}],
        extra="\n".join([
            "checkpoint: {store: mongodb, db: %s, collection: checkpoints, interval_ms: 100}"
            % db_name,
            "lease: {enabled: true, db: %s, ttl_ms: %d, renew_ms: %d}" % (db_name, TTL_MS,
                                                                         RENEW_MS)]))
    a, b = leader_and_standby(daemons, cfg, db)
    db.c.insert_many([{"n": i} for i in range(20)])
    wait_for(lambda: len([x for x in rcv.attempts if x.get("answer") == 200]) >= 20, timeout=30,
             message="20 deliveries")
    assert a.kill() == -9
    wait_for(lambda: holder_pid(db)[0] == b.pid, timeout=30, message="b leads")
    db.c.insert_many([{"n": i} for i in range(20, 40)])
    wait_for(lambda: any(x.get("lease_epoch") == "2" for x in rcv.attempts), timeout=30,
             message="b delivers")
    epochs = [x["lease_epoch"] for x in rcv.attempts]
    assert set(epochs) == {"1", "2"}, epochs
    first2 = epochs.index("2")
    assert all(e == "2" for e in epochs[first2:]), epochs  # fenced: no epoch 1 after epoch 2
    assert all(x["sig_ok"] for x in rcv.attempts)
