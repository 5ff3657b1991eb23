"""A sink's `initial: snapshot` (docs/config.md, "Initial snapshot") in a real `mongocast run`.

- The mongodb sink copies a 4,000-document collection and then streams, with a writer
  replacing, deleting and inserting documents the whole time, and the daemon is killed with
  SIGKILL twice during the copy and once while streaming. At the end the activity log holds
  every document of the snapshot exactly once, every change after the snapshot's time exactly
  once (compared with a change stream read by the test from that time), and applying it gives
  the source collection's final state. The restarts resume the copy after the last copied
  `_id` (the log says after how many documents, and the documents a restarted run copies are
  counted in /metrics: fewer than what was left, never the whole collection again).
  The copy is slowed down by a failCommand that makes each insert into the activity log wait,
  and a small max_lag_events, so that the kills land inside it.
- The message shape on the stdout sink (operationType insert, `snapshot: true`, the
  stream's $match and recipient applied), then a live change.
- `mongocast check` refuses the option where it cannot work.
"""

import random
import re
import threading
import time

from bson.timestamp import Timestamp

from daemon_util import *  # noqa: F401,F403
from live_util import free_port, live_config, wait_http
from server_util import metrics

N = 4000


def copy_time(data):
    """T of a copy position (its first 8 bytes after "82")."""
    return Timestamp(int(data[2:10], 16), int(data[10:18], 16))


def is_copy(doc):
    return doc["change"].get("snapshot") is True


class Writer(threading.Thread):
    """Replaces, deletes and inserts documents of `coll` at a steady pace until stopped."""

    def __init__(self, coll, seed=5):
        super().__init__(daemon=True)
        self.coll = coll
        self.rng = random.Random(seed)
        self.stop_flag = False
        self.ops = 0
        self.changes = 0  # writes that changed something (each makes one change event)
        self.next_id = N

    def run(self):
        while not self.stop_flag:
            r = self.rng.random()
            k = self.rng.randrange(self.next_id)
            if r < 0.6:
                res = self.coll.replace_one({"_id": k}, {"n": k, "v": self.ops, "pad": "y" * 50})
                self.changes += res.matched_count
            elif r < 0.8:
                self.changes += self.coll.delete_one({"_id": k}).deleted_count
            else:
                self.coll.insert_one({"_id": self.next_id, "n": self.next_id, "v": self.ops})
                self.next_id += 1
                self.changes += 1
            self.ops += 1
            time.sleep(0.004)


def test_initial_snapshot_survives_kills_during_copy_and_stream(tmp_path, daemons, client,
                                                                mongo_uri, db, db_name):
    db.c.insert_many([{"_id": i, "n": i, "v": -1, "pad": "x" * 100} for i in range(N)])
    port = free_port()
    cfg = live_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100}}, port,
        sinks=[{"name": "log", "type": "mongodb", "db": db_name, "collection": "activity",
                "initial": "snapshot", "initial_batch_size": 50, "max_lag_events": 40}])
    text = cfg.read_text().replace(
        "streams:", "checkpoint: {store: file, path: %s, interval_ms: 100}\nstreams:"
        % str(tmp_path / "cp"), 1)
    cfg.write_text(text)

    def copied():
        return db.activity.count_documents({"change.snapshot": True})

    def run_metric(name):
        return metrics(port).get('%s{sink="log"}' % name)

    writer = Writer(db.c)
    slow = fail_point(client, "failCommand", "alwaysOn",
                      {"failCommands": ["insert"], "namespace": "%s.activity" % db_name,
                       "blockConnection": True, "blockTimeMS": 10})
    with slow:
        # Run 1: killed during the copy.
        d = daemons(cfg, name="run1")
        wait_http(port, d)
        writer.start()
        wait_for(lambda: copied() >= 600, timeout=40, interval=0.05, message="copy under way")
        assert run_metric("mongocast_sink_snapshot_done") == 0
        assert d.kill() == -9
        at_kill1 = copied()
        assert at_kill1 < N

        # Run 2: resumes after the last stored _id, killed during the copy again.
        d = daemons(cfg, name="run2")
        wait_http(port, d)
        d.wait_stderr(r"resuming initial snapshot sink=log stream=s after \d+ documents")
        resumed = int(re.search(r"resuming initial snapshot sink=log stream=s after (\d+) ",
                                d.stderr_text()).group(1))
        assert 0 < resumed <= at_kill1
        wait_for(lambda: copied() >= at_kill1 + 600, timeout=40, interval=0.05,
                 message="copy goes on")
        assert run_metric("mongocast_sink_snapshot_done") == 0
        # Never started over: what this run copied so far continues from `resumed`.
        assert run_metric("mongocast_sink_snapshot_documents_total") < N - resumed
        assert d.kill() == -9
        at_kill2 = copied()
        assert at_kill2 < N

    # Run 3: resumes again, finishes the copy, streams; killed while streaming.
    d = daemons(cfg, name="run3")
    wait_http(port, d)
    d.wait_stderr(r"resuming initial snapshot sink=log stream=s after \d+ documents")
    resumed2 = int(re.findall(r"resuming initial snapshot sink=log stream=s after (\d+) ",
                              d.stderr_text())[-1])
    assert resumed2 > resumed
    wait_for(lambda: run_metric("mongocast_sink_snapshot_done") == 1, timeout=40, interval=0.1,
             message="copy done")
    in_run3 = run_metric("mongocast_sink_snapshot_documents_total")
    # Only the rest: the documents after the last stored _id (a few inserted before T too).
    assert 0 < in_run3 < N - resumed2 + 50
    time.sleep(1.0)
    assert d.kill() == -9

    # Run 4: the writer stops; everything must arrive.
    d = daemons(cfg, name="run4")
    wait_http(port, d)
    time.sleep(0.5)
    writer.stop_flag = True
    writer.join(10)
    assert writer.ops > 300
    final = {x["_id"]: x for x in db.c.find()}

    docs = list(db.activity.find())
    copies = [x for x in docs if is_copy(x)]
    t = copy_time(copies[0]["_id"])
    assert all(copy_time(x["_id"]) == t for x in copies)

    # Every change after T, read by the test itself from T + 1 to the end (the writer has
    # stopped: the first empty batch is the end).
    expected_ids = []
    with db.c.watch(start_at_operation_time=Timestamp(t.time, t.inc + 1),
                    max_await_time_ms=200) as cs:
        while True:
            ch = cs.try_next()
            if ch is None:
                break
            expected_ids.append(ch["_id"]["_data"])
    assert 300 < len(expected_ids) <= writer.changes

    def changes_logged():
        return db.activity.count_documents({"change.snapshot": {"$ne": True}})

    wait_for(lambda: changes_logged() >= len(expected_ids), timeout=40, interval=0.2,
             message="every change after T in the activity log")
    assert d.stop() == 0
    docs = list(db.activity.find())
    copies = [x for x in docs if is_copy(x)]
    changes = [x for x in docs if not is_copy(x)]
    assert sorted(x["_id"] for x in changes) == sorted(expected_ids)
    # Each document of the snapshot exactly once (ids are the dedupe key of the log).
    keys = [x["documentKey"]["_id"] for x in copies]
    assert len(keys) == len(set(keys))
    assert all(x["type"] == "insert" and x["clusterTime"] == t for x in copies)

    # Applying the log in order gives the source's final state.
    state = {}
    for x in sorted(docs, key=lambda x: x["_id"]):
        key = x["documentKey"]["_id"]
        if x["type"] == "delete":
            state.pop(key, None)
        else:
            doc = dict(x["change"]["fullDocument"])
            state[key] = doc
    assert state == final


def test_stdout_shape_stages_and_live_changes(tmp_path, daemons, mongo_uri, db, db_name):
    """The copy is each document as the insert change it would be, through the stream's
    $match, with the recipient routed from it, `snapshot: true`, in _id order; then the live
    changes after T, and a restart with a stored position copies nothing again."""
    db.c.insert_many([{"_id": i, "n": i, "owner": "u%d" % (i % 3), "keep": i % 2 == 0}
                      for i in range(40)])
    cfg = write_config(
        tmp_path / "c.yaml", mongo_uri,
        {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100,
               "recipient": "fullDocument.owner",
               "pipeline": [{"$match": {"$or": [{"fullDocument.keep": True},
                                                {"operationType": "delete"}]}}]}},
        sinks=[{"name": "out", "type": "stdout", "initial": "snapshot",
                "initial_batch_size": 7}],
        checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg, name="first")
    d.wait_stderr(r"initial snapshot copied sink=out stream=s documents=40")
    wait_for(lambda: "catching up sink=out stream=s from clusterTime" in d.stderr_text(),
             timeout=20, message="the changes after the copy")
    db.c.insert_one({"_id": 100, "n": 100, "owner": "u1", "keep": True})
    db.c.insert_one({"_id": 101, "n": 101, "owner": "u1", "keep": False})
    db.c.delete_one({"_id": 2})
    wait_for(lambda: len(changes_of(d.messages())) >= 20 + 2, timeout=20,
             message="copy and live changes")
    msgs = changes_of(d.messages())
    copies = [m for m in msgs if m["change"].get("snapshot") is True]
    assert [m["change"]["fullDocument"]["n"] for m in copies] == list(range(0, 40, 2))
    for m in copies:
        ch = m["change"]
        assert ch["operationType"] == "insert"
        assert ch["ns"] == {"db": db_name, "coll": "c"}
        assert ch["documentKey"] == {"_id": ch["fullDocument"]["_id"]}
        assert m["recipient"] == ch["fullDocument"]["owner"]
        assert "_id" not in ch and m["id"].startswith("82")
    assert [m["id"] for m in copies] == sorted(m["id"] for m in copies)
    live = [m for m in msgs if m["change"].get("snapshot") is not True]
    assert [m["change"]["operationType"] for m in live] == ["insert", "delete"]
    assert all(m["id"] > copies[-1]["id"] for m in live)
    assert d.stop() == 0

    # A restart: the sink has a stream position now, nothing is copied again.
    out2 = tmp_path / "second.jsonl"
    d2 = daemons(cfg, name="second", stdout_path=out2)
    d2.wait_open()
    db.c.insert_one({"_id": 102, "n": 102, "owner": "u2", "keep": True})
    wait_for(lambda: len(changes_of(d2.messages())) >= 1, timeout=20, message="a change")
    time.sleep(0.5)
    msgs2 = changes_of(d2.messages())
    assert [m["change"]["fullDocument"]["n"] for m in msgs2] == [102]
    assert "initial snapshot starts" not in d2.stderr_text()
    assert d2.stop() == 0


def test_check_refuses_initial_snapshot_where_it_cannot_work(tmp_path, mongo_uri, db_name):
    cases = [
        ({"watch": {"db": db_name}}, {"name": "k", "type": "stdout", "initial": "snapshot"},
         "stream 'watch' watches a whole database"),
        ({"s": {"db": db_name, "collection": "c"}},
         {"name": "k", "type": "redis", "url": "redis://127.0.0.1:1", "initial": "snapshot"},
         "not supported by type redis"),
        ({"s": {"db": db_name, "collection": "c"}},
         {"name": "k", "type": "stdout", "initial": "copy"}, "initial"),
        ({"s": {"db": db_name, "collection": "c"}},
         {"name": "k", "type": "stdout", "initial": "snapshot", "initial_batch_size": 0},
         "initial_batch_size"),
    ]
    for streams, sink, needle in cases:
        cfg = write_config(tmp_path / "c.yaml", mongo_uri, streams, sinks=[sink])
        r = run_cli("check", "-c", str(cfg), timeout=30)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and needle in out, (sink, out)
    ok = write_config(tmp_path / "ok.yaml", mongo_uri, {"s": {"db": db_name, "collection": "c"}},
                      sinks=[{"name": "k", "type": "stdout", "initial": "snapshot"}])
    r = run_cli("check", "-c", str(ok), timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _slow_copy_config(tmp_path, mongo_uri, db_name, out):
    """A config whose one sink (`fault`, writing to `out`, 2 ms a message, batches of 100,
    initial: snapshot) copies stream s slowly enough to be stopped in the middle."""
    return write_config(
        tmp_path / "c.yaml", mongo_uri, {"s": {"db": db_name, "collection": "c",
                                               "max_await_time_ms": 100}},
        sinks=[{"name": "f", "type": "fault", "file": str(out), "delay_ms": 2,
                "initial": "snapshot", "initial_batch_size": 100, "max_lag_events": 50}],
        checkpoint_dir=tmp_path / "cp")


def _changes_in(out):
    """The change messages the fault sink wrote to `out` so far."""
    msgs, _ = read_jsonl(out) if out.exists() else ([], [])
    return [m for m in msgs if m.get("type") == "change"]


def test_sigterm_during_copy_then_resume(tmp_path, daemons, mongo_uri, db, db_name):
    """A clean stop in the middle of the copy (the copy thread ends with the engine, the final
    checkpoint keeps its progress), then a restart copies only the rest: every document once
    in the sink's file, the numbers of the resumed run continuing where the first stopped."""
    n = 1500
    db.c.insert_many([{"_id": i, "n": i} for i in range(n)])
    out = tmp_path / "fault.jsonl"
    cfg = _slow_copy_config(tmp_path, mongo_uri, db_name, out)
    env = {"MONGOCAST_TEST_SINKS": "1"}

    def copied_lines():
        return _changes_in(out)

    d = daemons(cfg, name="first", env=env)
    wait_for(lambda: len(copied_lines()) >= 300, timeout=30, interval=0.05, message="copying")
    assert d.stop() == 0
    first = len(copied_lines())
    assert first < n
    d2 = daemons(cfg, name="second", env=env)
    d2.wait_stderr(r"initial snapshot copied sink=f stream=s documents=%d" % n, timeout=40)
    resumed = int(re.search(r"resuming initial snapshot sink=f stream=s after (\d+) ",
                            d2.stderr_text()).group(1))
    # A clean stop stores the last completed document: nothing is copied twice.
    assert resumed == first
    wait_for(lambda: len(copied_lines()) >= n, timeout=30, message="every document")
    assert d2.stop() == 0
    got = [m["change"]["fullDocument"]["n"] for m in copied_lines()]
    assert got == list(range(n))


def test_read_time_lost_after_restart_continues_at_a_newer_time(tmp_path, daemons, client,
                                                                mongo_uri, db, db_name):
    """The copy is killed, then the server's snapshot history no longer reaches its read time
    (SnapshotTooOld): the restart copies the rest at a newer time and still delivers every
    change after the original T, so the sink ends with every document and every change."""
    n = 1500
    db.c.insert_many([{"_id": i, "n": i, "v": 0} for i in range(n)])
    out = tmp_path / "fault.jsonl"
    cfg = _slow_copy_config(tmp_path, mongo_uri, db_name, out)
    env = {"MONGOCAST_TEST_SINKS": "1"}

    def lines():
        return _changes_in(out)

    d = daemons(cfg, name="first", env=env)
    wait_for(lambda: len(lines()) >= 300, timeout=30, interval=0.05, message="copying")
    assert d.kill() == -9
    assert len(lines()) < n
    was = client.admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=1)["was"]
    try:
        # Changes after T, made while the daemon is down (the first below the copy's
        # position, the last above it), then the read time leaves the history.
        db.c.update_one({"_id": 1}, {"$set": {"v": 1}})
        db.c.update_one({"_id": n - 1}, {"$set": {"v": 1}})
        db.c.insert_one({"_id": n, "n": n, "v": 1})
        time.sleep(2.5)
        db.c.update_one({"_id": 2}, {"$set": {"v": 2}})
        d2 = daemons(cfg, name="second", env=env)
        d2.wait_stderr(r"initial snapshot copied sink=f stream=s", timeout=40)
        assert "cannot read at" in d2.stderr_text()
        wait_for(lambda: len([m for m in lines() if m["change"].get("snapshot") is not True])
                 >= 4, timeout=30, message="the changes after T")
        assert d2.stop() == 0
    finally:
        client.admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=was)
    msgs = lines()
    copies = {m["change"]["documentKey"]["_id"] for m in msgs if m["change"].get("snapshot")}
    # Every document of T is copied (the one inserted after T may come in the newer copy).
    assert set(range(n)) <= copies
    changes = [m["change"] for m in msgs if m["change"].get("snapshot") is not True]
    keys = [(c["operationType"], c["documentKey"]["_id"]) for c in changes]
    assert keys == [("update", 1), ("update", n - 1), ("insert", n), ("update", 2)]
