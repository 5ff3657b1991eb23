"""`mongocast run`: signals, reload, invalidation, resumable errors, history loss and quiet
streams, observed from the outside: the stdout sink's JSON lines, the checkpoint files and the
daemon's log on stderr.

Every test runs against the emulator or, unchanged, against a real replica set (MONGODB_URI;
fail points need enableTestCommands). Parts that use emulator-only commands skip there.
"""

import signal
import time

import pytest

from conftest import real_server_uri
from daemon_util import *  # noqa: F401,F403

FAST = {"max_await_time_ms": 100}


def stream(db, coll, **kw):
    s = {"db": db, "collection": coll}
    s.update(FAST)
    s.update(kw)
    return s


def seqs(msgs, stream_name):
    return [m["change"]["fullDocument"]["seq"] for m in changes_of(msgs, stream_name, "insert")]


def wait_seqs(d, stream_name, n, timeout=30):
    wait_for(lambda: len(seqs(d.messages(), stream_name)) >= n, timeout=timeout,
             message="%d inserts on stream %s (got %d; stderr tail:\n%s)" % (
                 n, stream_name, len(seqs(d.messages(), stream_name)), d.stderr_text()[-2000:]))
    return seqs(d.messages(), stream_name)


def test_sigterm_drains_and_restart_has_no_duplicates(tmp_path, daemons, mongo_uri, db,
                                                      db_name):
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                       checkpoint_dir=tmp_path / "cp")
    out = tmp_path / "out.jsonl"
    d = daemons(cfg, stdout_path=out)
    d.wait_open()
    db.c.insert_many([{"seq": i} for i in range(100)])
    wait_seqs(d, "s", 100)
    assert d.stop(signal.SIGTERM) == 0
    assert "stopping engine (SIGTERM)" in d.stderr_text()
    # Written while the daemon is down: must come after the restart, once.
    db.c.insert_many([{"seq": i} for i in range(100, 150)])
    d2 = daemons(cfg, stdout_path=out)
    d2.wait_open()
    db.c.insert_many([{"seq": i} for i in range(150, 200)])
    got = wait_seqs(d2, "s", 200)
    assert d2.stop(signal.SIGINT) == 0
    got = seqs(d2.messages(), "s")
    assert got == list(range(200)), "graceful stop must give no loss and no duplicate"


def test_sighup_reload(tmp_path, daemons, mongo_uri, db, db_name):
    cfg_path = tmp_path / "c.yaml"
    write_config(cfg_path, mongo_uri, {"a": stream(db_name, "a")}, checkpoint_dir=tmp_path / "cp")
    good = cfg_path.read_text()
    d = daemons(cfg_path)
    d.wait_open()
    db.a.insert_many([{"seq": i} for i in range(10)])
    wait_seqs(d, "a", 10)

    # An invalid file is reported and the running configuration stays.
    cfg_path.write_text(good.replace("streams:", "streams:\n  broken: {colection: x}"))
    d.send(signal.SIGHUP)
    d.wait_stderr(r"reload failed, keeping the running configuration: %s:\d+:\d+: unknown key "
                  r"'colection'" % cfg_path)
    db.a.insert_many([{"seq": i} for i in range(10, 20)])
    wait_seqs(d, "a", 20)

    # A valid one replaces it: a new stream appears, the old one continues from its position.
    write_config(cfg_path, mongo_uri, {"a": stream(db_name, "a"), "b": stream(db_name, "b")},
                 checkpoint_dir=tmp_path / "cp")
    d.send(signal.SIGHUP)
    d.wait_stderr(r"reloaded config=")
    d.wait_open(n_streams=3)  # a (first run), then a and b
    db.a.insert_many([{"seq": i} for i in range(20, 30)])
    db.b.insert_many([{"seq": i} for i in range(5)])
    wait_seqs(d, "a", 30)
    wait_seqs(d, "b", 5)
    assert d.alive()
    assert d.stop() == 0
    msgs = d.messages()
    assert seqs(msgs, "a") == list(range(30)), "reload must neither lose nor repeat events"
    assert seqs(msgs, "b") == list(range(5))


def test_drop_and_recreate_gives_invalidate_then_new_events(tmp_path, daemons, mongo_uri, db,
                                                            db_name):
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"s": stream(db_name, "c"), "other": stream(db_name, "o")},
                       checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open(2)
    db.c.insert_one({"seq": 0})
    wait_seqs(d, "s", 1)
    db.drop_collection("c")
    db.c.insert_one({"seq": 1})  # recreates the collection
    db.o.insert_one({"seq": 0})
    wait_seqs(d, "s", 2)
    db.c.insert_one({"seq": 2})
    wait_seqs(d, "s", 3)
    msgs = [m for m in d.messages() if m["stream"] == "s"]
    kinds = [(m["type"], m.get("change", {}).get("operationType")) for m in msgs]
    assert kinds == [("change", "insert"), ("change", "drop"), ("invalidate", None),
                     ("change", "insert"), ("change", "insert")], kinds
    assert msgs[2] == {"type": "invalidate", "stream": "s", "reason": "drop"}
    assert seqs(msgs, "s") == [0, 1, 2]
    assert seqs(d.messages(), "other") == [0]


# (id, fail point name, mode, data): each must be survived with no loss and no duplicate.
FAULTS = [
    ("getmore_close_connection_twice", "failCommand", {"times": 2},
     {"failCommands": ["getMore"], "closeConnection": True, "appName": "mongocast"}),
    ("getmore_cursor_not_found", "failCommand", {"times": 1},
     {"failCommands": ["getMore"], "errorCode": 43, "appName": "mongocast"}),
    ("getmore_host_unreachable_without_label", "failCommand", {"times": 1},
     {"failCommands": ["getMore"], "errorCode": 6, "appName": "mongocast"}),
    ("getmore_labelled_after_checkout", "failGetMoreAfterCursorCheckout", {"times": 1},
     {"errorCode": 91}),
    ("getmore_resumable_label", "failCommand", {"times": 1},
     {"failCommands": ["getMore"], "errorCode": 50,
      "errorLabels": ["ResumableChangeStreamError"], "appName": "mongocast"}),
]


def _set_fp(client, name, mode, data):
    cmd = {"configureFailPoint": name, "mode": mode}
    if data is not None:
        cmd["data"] = data
    return client.admin.command(cmd)


def _fp_off(client, name):
    """Turns the fail point off; returns how often it fired (the reply's count)."""
    return _set_fp(client, name, "off", None).get("count")


def _write_and_verify(d, db, stream_name, n, batches=10):
    per = n // batches
    for b in range(batches):
        db.c.insert_many([{"seq": b * per + i} for i in range(per)])
        time.sleep(0.05)  # let several getMores happen while the fault is armed
    wait_seqs(d, stream_name, n + 1)
    time.sleep(0.3)  # a duplicate would arrive right behind the last event
    got = seqs(d.messages(), stream_name)
    # -1 is the warm-up insert that proved the stream open before the fault was armed.
    assert got == [-1] + list(range(n)), "expected every insert exactly once, in order"


@pytest.mark.parametrize("fid, fp, mode, data", FAULTS, ids=[f[0] for f in FAULTS])
def test_resumable_getmore_errors(tmp_path, daemons, mongo_uri, client, db, db_name, fid, fp,
                                  mode, data):
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                       checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open()
    db.c.insert_one({"seq": -1})
    wait_for(lambda: changes_of(d.messages(), "s"), timeout=20, message="first event")
    _set_fp(client, fp, mode, data)
    try:
        _write_and_verify(d, db, "s", 200)
    finally:
        fired = _fp_off(client, fp)
    if fired is not None:
        assert fired >= 1, "the fail point never fired: the test proved nothing"
    if fid == "getmore_host_unreachable_without_label":
        # Not resumable inside libmongoc: the engine retries from its own position.
        assert "change stream error stream=s" in d.stderr_text()
    assert d.alive()


def test_resume_aggregate_fails_once(tmp_path, daemons, mongo_uri, client, db, db_name):
    """getMore fails with a labelled error (libmongoc resumes), and that resume aggregate fails
    too (216, not retried by libmongoc): the engine backs off and reopens from its position."""
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {"s": stream(db_name, "c")},
                       checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open()
    db.c.insert_one({"seq": -1})
    wait_for(lambda: changes_of(d.messages(), "s"), timeout=20, message="first event")
    _set_fp(client, "failCommand", {"times": 1},
            {"failCommands": ["aggregate"], "errorCode": 216, "appName": "mongocast"})
    _set_fp(client, "failGetMoreAfterCursorCheckout", {"times": 1}, {"errorCode": 91})
    try:
        _write_and_verify(d, db, "s", 200)
    finally:
        fired_gm = _fp_off(client, "failGetMoreAfterCursorCheckout")
        fired_agg = _fp_off(client, "failCommand")
    if fired_agg is not None:
        assert fired_gm >= 1 and fired_agg >= 1
    assert "code=216" in d.stderr_text() or "ElectionInProgress" in d.stderr_text()


def test_quiet_stream_token_advances(tmp_path, daemons, mongo_uri, db, db_name):
    """A stream with no matching events still moves its stored position forward (post-batch
    resume tokens) while other collections are written, so a restart never has to resume from
    an old point that may have left the oplog."""
    cp = tmp_path / "cp"
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"quiet": stream(db_name, "q"), "busy": stream(db_name, "b")},
                       checkpoint_dir=cp, interval_ms=100)
    d = daemons(cfg)
    d.wait_open(2)
    db.b.insert_one({"seq": 0})
    first = wait_for(lambda: checkpoint_token(cp, "quiet"), timeout=20,
                     message="a checkpoint file for the quiet stream")
    seen = [first]
    deadline = time.monotonic() + 20
    i = 1
    while time.monotonic() < deadline and len(set(seen)) < 3:
        db.b.insert_many([{"seq": i + k} for k in range(10)])
        i += 10
        time.sleep(0.3)
        seen.append(checkpoint_token(cp, "quiet"))
    distinct = []
    for t in seen:
        if t and (not distinct or distinct[-1] != t):
            distinct.append(t)
    assert len(distinct) >= 3, "quiet stream's stored token did not advance: %r" % distinct
    assert distinct == sorted(distinct), "stored tokens must only move forward"
    assert changes_of(d.messages(), "quiet") == []
    # The busy stream's events happened before the quiet token's last value.
    last_busy = changes_of(d.messages(), "busy")[-1]["id"]
    db.b.insert_one({"seq": i})
    wait_for(lambda: (checkpoint_token(cp, "quiet") or "") > last_busy, timeout=20,
             message="the quiet stream's token to pass the busy stream's events")


@pytest.mark.emulator_only
def test_history_lost_while_stopped(tmp_path, daemons, mongo_uri, client, db, db_name):
    """Both policies at once: while the daemon is down the oplog loses everything after the
    stored positions (emulatorTruncateOplog). On restart, stream `failing` (on_history_lost:
    fail) stops with a clear log line and delivers nothing more but its error message; stream
    `restarting` (restart) sends a reset and then new events; a stream without history
    problems (`fresh`, added at the restart) keeps delivering."""
    cp = tmp_path / "cp"
    cfg = tmp_path / "c.yaml"
    streams = {"failing": stream(db_name, "f", on_history_lost="fail"),
               "restarting": stream(db_name, "r", on_history_lost="restart")}
    write_config(cfg, mongo_uri, streams, checkpoint_dir=cp)
    out = tmp_path / "out.jsonl"
    d = daemons(cfg, stdout_path=out)
    d.wait_open(2)
    db.f.insert_one({"seq": 0})
    db.r.insert_one({"seq": 0})
    wait_seqs(d, "failing", 1)
    wait_seqs(d, "restarting", 1)
    assert d.stop() == 0
    before = len(d.messages())

    db.f.insert_one({"seq": 1})
    db.r.insert_one({"seq": 1})
    assert client[db_name].command({"emulatorTruncateOplog": 1, "keepLast": 0})["ok"] == 1

    streams["fresh"] = stream(db_name, "n")
    write_config(cfg, mongo_uri, streams, checkpoint_dir=cp)
    d2 = daemons(cfg, stdout_path=out)
    d2.wait_stderr(r"history lost stream=failing code=286: the resume point is no longer in the "
                   r"oplog; stream stopped \(on_history_lost: fail\)")
    d2.wait_stderr(r"history lost stream=restarting code=286: restarting from now")
    d2.wait_stderr(r"change stream open stream=restarting")
    d2.wait_stderr(r"change stream open stream=fresh")
    db.r.insert_one({"seq": 2})
    db.n.insert_one({"seq": 0})
    db.f.insert_one({"seq": 2})
    wait_seqs(d2, "restarting", 2)
    wait_seqs(d2, "fresh", 1)
    time.sleep(0.5)
    after = d2.messages()[before:]
    r_msgs = [m for m in after if m["stream"] == "restarting"]
    assert r_msgs[0] == {"type": "reset", "stream": "restarting", "reason": "history lost"}
    assert seqs(r_msgs, "restarting") == [2], "only changes after the restart (1 was lost)"
    # The failed stream's only message is its error, the last word on it.
    assert [m for m in after if m["stream"] == "failing"] == [
        {"type": "error", "stream": "failing", "code": "history_lost", "server_code": 286,
         "reason": "history lost: the resume point is no longer in the oplog "
                   "(on_history_lost: fail)"}]
    assert seqs(after, "fresh") == [0]
    assert d2.alive()


@pytest.mark.emulator_only
def test_history_lost_while_running_on_restart_policy(tmp_path, daemons, mongo_uri, client,
                                                      db, db_name):
    """The oplog is truncated while the daemon runs and one stream's resume point falls out
    before it read the entries (the stream's getMore is held by a blocking fail point). With
    on_history_lost: restart the stream sends a reset and continues; nothing is printed for
    the lost entries."""
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"r": stream(db_name, "r", on_history_lost="restart")},
                       checkpoint_dir=tmp_path / "cp")
    d = daemons(cfg)
    d.wait_open()
    db.r.insert_one({"seq": 0})
    wait_seqs(d, "r", 1)
    # Hold the daemon's next getMores long enough to write and truncate behind its back.
    _set_fp(client, "failCommand", {"times": 1},
            {"failCommands": ["getMore"], "blockConnection": True, "blockTimeMS": 1500,
             "errorCode": 6, "appName": "mongocast"})
    try:
        time.sleep(0.4)
        db.r.insert_many([{"seq": i} for i in range(1, 6)])
        client[db_name].command({"emulatorTruncateOplog": 1, "keepLast": 0})
        d.wait_stderr(r"history lost stream=r code=286: restarting from now", timeout=30)
    finally:
        _fp_off(client, "failCommand")
    d.wait_open(2)
    db.r.insert_one({"seq": 6})
    wait_seqs(d, "r", 2)
    msgs = [m for m in d.messages() if m["stream"] == "r"]
    assert {"type": "reset", "stream": "r", "reason": "history lost"} in msgs
    assert seqs(msgs, "r") == [0, 6]
