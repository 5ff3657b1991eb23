"""A stream that fails for good tells everyone who follows it (docs/protocol.md, "Messages"):
its last message is {"type":"error","stream":...,"code":...,"reason":...}, delivered to every
WebSocket and SSE subscriber and printed by the stdout sink; then WebSocket subscribers are
closed with 4010 and SSE streams end, so no client is left waiting on a dead stream. Other
streams of the same daemon go on.

Two ways to fail: a fatal error (the stream's pipeline removes the resume token: 280
ChangeStreamFatalError) runs against a real replica set too; lost history with
on_history_lost: fail needs the emulator's oplog truncation.
"""

import time

import pytest

from daemon_util import *  # noqa: F401,F403
from live_util import free_port, live_config, stream_path, subscribers, wait_http  # noqa: F401

WS_CLOSE_STREAM_FAILED = 4010


def _fatal(client, db, db_name):
    """Makes stream `bad` fail with an error retrying cannot fix: its pipeline projects the
    resume token away, so the first event is unusable."""
    db.bad.insert_one({"seq": 0})


def _history_lost(client, db, db_name):
    """Makes stream `bad` lose its history: its next getMore is held while writes go in and
    the oplog is truncated behind its position."""
    with fail_point(client, "failCommand", {"times": 1},
                    {"failCommands": ["getMore"], "blockConnection": True, "blockTimeMS": 1500,
                     "errorCode": 6, "appName": "mongocast"}):
        time.sleep(0.4)
        db.bad.insert_many([{"seq": i} for i in range(1, 4)])
        assert client[db_name].command({"emulatorTruncateOplog": 1, "keepLast": 0})["ok"] == 1
    # The held getMore fails, and the stream's resume lands in the gap: history lost.


CASES = [
    pytest.param("fatal", [{"$project": {"_id": 0}}], _fatal, "change_stream_error",
                 id="fatal_error"),
    pytest.param("history", [], _history_lost, "history_lost", id="history_lost",
                 marks=pytest.mark.emulator_only),
]


@pytest.mark.parametrize("kind, pipeline, make_it_fail, code", CASES)
def test_failed_stream_tells_subscribers_and_closes_them(tmp_path, daemons, subscribers,
                                                         mongo_uri, client, db, db_name, kind,
                                                         pipeline, make_it_fail, code):
    port = free_port()
    base = {"db": db_name, "public": True, "max_await_time_ms": 100}
    streams = {"bad": dict(base, collection="bad", pipeline=pipeline, on_history_lost="fail")}
    if kind == "fatal":
        # Not with the history case: its fail point must catch the failing stream's getMore,
        # and the truncation would take this stream's history too.
        streams["good"] = dict(base, collection="good")
    out = tmp_path / "out.jsonl"
    cfg = live_config(tmp_path / "c.yaml", mongo_uri, streams, port,
                      sinks=[{"name": "out", "type": "stdout"}])
    d = daemons(cfg, stdout_path=out)
    wait_http(port, d)
    d.wait_open(len(streams))

    ws = subscribers.ws(port, stream_path("bad"), name="ws-bad")
    sse = subscribers.sse(port, stream_path("bad"), name="sse-bad")
    good = subscribers.ws(port, stream_path("good"), name="ws-good") if kind == "fatal" else None
    for s in (ws, sse, good):
        if s:
            s.wait_ready()
    if kind == "history":
        # The stream is known to deliver before it fails.
        db.bad.insert_one({"seq": 0})
        ws.wait_changes(1)
        sse.wait_changes(1)

    make_it_fail(client, db, db_name)

    for s in (ws, sse):
        msgs = s.wait(lambda ms: any(m.get("type") == "error" for m in ms), timeout=30,
                      what="the error message")
        err = msgs[-1]
        assert err["type"] == "error", "the error message is the last one: %r" % msgs[-3:]
        assert set(err) <= {"type", "stream", "code", "server_code", "reason"}, err
        assert err["stream"] == "bad"
        assert err["code"] == code
        assert isinstance(err["reason"], str) and err["reason"]
        if code == "history_lost":
            assert err["server_code"] == 286
            assert "history lost" in err["reason"]
        else:
            assert err["server_code"] == 280
        assert [m for m in msgs if m.get("type") == "error"] == [err], "exactly one error"
        s.wait(lambda ms: s.closed, timeout=10, what="the end of the subscription")
    assert ws.close_code == WS_CLOSE_STREAM_FAILED, ws.close_code
    assert sse.closed

    # The stdout sink printed the same message, once; the daemon's log says why in full.
    printed = wait_for(lambda: [m for m in read_jsonl(out)[0] if m.get("type") == "error"],
                       timeout=10, message="the error line on stdout")
    assert printed == [ws.messages()[-1]]
    d.wait_stderr(r"history lost stream=bad code=286" if kind == "history"
                  else r"change stream failed stream=bad")

    # The other stream of the daemon is untouched.
    if good:
        db.good.insert_one({"seq": 1})
        good.wait_changes(1)
        assert not good.closed
    assert d.alive()
