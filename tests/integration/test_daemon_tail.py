"""`mongocast tail`, `mongocast enable-images`, `version` and `help` against MongoDB (the
emulator, or MONGODB_URI).

What is asserted: tail prints one message (docs/protocol.md) per change with the exact shape
and the values the writer produced; --raw prints the change event itself in canonical Extended
JSON; argument errors exit 2 with a message naming the argument; a stream that fails exits 1
with the server's reason and code; without a server it says what it waits for and gives up after
--wait; when its stdout's reader goes away it says so and exits 1; SIGINT/SIGTERM exit 0.
"""

import json
import signal
import socket
import subprocess
import time

import pytest

from conftest import SANITIZER_RE
from daemon_util import *  # noqa: F401,F403  (fixtures: daemons, tails)
from daemon_util import START_TIMEOUT


def test_tail_prints_every_change_in_message_shape(tails, mongo_uri, db, db_name):
    t = tails(mongo_uri, "%s.items" % db_name, "--max-await-ms", "100")
    t.wait_open()
    coll = db["items"]
    coll.insert_one({"_id": 1, "name": "bolt", "qty": 5})
    coll.update_one({"_id": 1}, {"$set": {"qty": 4}, "$unset": {"name": ""}})
    coll.replace_one({"_id": 1}, {"name": "nut", "qty": 9})
    coll.delete_one({"_id": 1})
    db["other"].insert_one({"_id": 2})  # another collection: must not show up
    msgs = t.wait_messages(4)
    assert t.stop(signal.SIGINT) == 0
    msgs = t.messages()
    assert [m["change"]["operationType"] for m in msgs] == ["insert", "update", "replace",
                                                            "delete"]
    for m in msgs:
        assert set(m) == {"type", "stream", "id", "change"}, m
        assert m["type"] == "change" and m["stream"] == "tail"
        assert "_id" not in m["change"]  # the token is carried once, as "id"
        assert m["change"]["ns"] == {"db": db_name, "coll": "items"}
        assert m["change"]["documentKey"] == {"_id": 1}
        assert "$timestamp" in m["change"]["clusterTime"]
    ids = [m["id"] for m in msgs]
    assert len(set(ids)) == 4 and ids == sorted(ids), "event ids must be distinct and ordered"
    ins, upd, rep, dele = (m["change"] for m in msgs)
    # Relaxed Extended JSON: plain numbers, not {"$numberInt": ...}.
    assert ins["fullDocument"] == {"_id": 1, "name": "bolt", "qty": 5}
    assert upd["updateDescription"]["updatedFields"] == {"qty": 4}
    assert upd["updateDescription"]["removedFields"] == ["name"]
    assert "fullDocument" not in upd  # default fullDocument mode
    assert rep["fullDocument"] == {"_id": 1, "name": "nut", "qty": 9}
    assert "fullDocument" not in dele
    assert "watching %s.items" % db_name in t.stderr_text()


def test_tail_raw_prints_canonical_extended_json(tails, mongo_uri, db, db_name):
    t = tails(mongo_uri, "%s.items" % db_name, "--raw", "--full-document", "updateLookup",
              "--max-await-ms", "100")
    t.wait_open()
    db["items"].insert_one({"_id": 7, "n": 42, "big": 1 << 40, "f": 1.5})
    db["items"].update_one({"_id": 7}, {"$inc": {"n": 1}})
    t.wait_messages(2)
    assert t.stop(signal.SIGTERM) == 0
    ins, upd = t.messages()[:2]
    # The raw line is the change event itself, not the §4.3 envelope.
    assert "type" not in ins and ins["operationType"] == "insert"
    assert ins["fullDocument"] == {"_id": {"$numberInt": "7"}, "n": {"$numberInt": "42"},
                                   "big": {"$numberLong": str(1 << 40)},
                                   "f": {"$numberDouble": "1.5"}}
    assert ins["documentKey"] == {"_id": {"$numberInt": "7"}}
    assert "$numberLong" in ins["wallTime"]["$date"]
    assert set(ins["_id"]) == {"_data"}
    assert upd["operationType"] == "update"
    assert upd["updateDescription"]["updatedFields"] == {"n": {"$numberInt": "43"}}
    assert upd["fullDocument"]["n"] == {"$numberInt": "43"}  # updateLookup


def test_tail_pipeline_and_resume_after(tails, mongo_uri, db, db_name):
    pipeline = json.dumps([{"$match": {"operationType": "insert", "fullDocument.keep": True}}])
    t = tails(mongo_uri, "%s.c" % db_name, "--pipeline", pipeline, "--max-await-ms", "100")
    t.wait_open()
    db["c"].insert_many([{"_id": i, "keep": i % 2 == 0} for i in range(6)])
    db["c"].update_many({}, {"$set": {"x": 1}})
    t.wait_messages(3)
    db["c"].insert_one({"_id": 100, "keep": True})  # marker: everything before it arrived
    t.wait_messages(4)
    assert t.stop() == 0
    msgs = t.messages()
    assert [m["change"]["documentKey"]["_id"] for m in msgs] == [0, 2, 4, 100]

    # Resume after the first event: the rest comes again, and nothing before it.
    t2 = tails(mongo_uri, "%s.c" % db_name, "--pipeline", pipeline, "--resume-after",
               msgs[0]["id"], "--max-await-ms", "100")
    again = t2.wait_messages(3)
    assert t2.stop() == 0
    assert [m["change"]["documentKey"]["_id"] for m in again] == [2, 4, 100]
    assert [m["id"] for m in again] == [m["id"] for m in msgs[1:]]


def test_tail_whole_database(tails, mongo_uri, db, db_name):
    t = tails(mongo_uri, db_name, "--max-await-ms", "100")
    t.wait_open()
    db["a"].insert_one({"_id": 1})
    db["b"].insert_one({"_id": 2})
    t.wait_messages(2)
    assert t.stop() == 0
    assert [m["change"]["ns"]["coll"] for m in t.messages()] == ["a", "b"]


def test_tail_stream_failure_exits_1(tails, mongo_uri, db, db_name):
    # Projecting out _id makes the server refuse the event (280 ChangeStreamFatalError on a
    # real server); the stream fails for good and tail must say why and exit 1.
    t = tails(mongo_uri, "%s.c" % db_name, "--pipeline", '[{"$project": {"_id": 0}}]',
              "--max-await-ms", "100")
    t.wait_open()
    db["c"].insert_one({"_id": 1})
    rc = t.proc.wait(30)
    t.stop()
    assert rc == 1, t.stderr_text()
    err = t.stderr_text()
    assert "change stream failed" in err, err
    # stdout's only line is the stream's error message (the server's text is only on stderr).
    assert t.messages() == [
        {"type": "error", "stream": "tail", "code": "change_stream_error", "server_code": 280,
         "reason": "the change stream failed with an error that retrying cannot fix"}]


def test_tail_on_oversize_skip(tails, mongo_uri, db, db_name):
    """An update past MongoDB's 16 MB event limit (9 MiB document, pre- and post-image): tail
    with --on-oversize skip prints the notice, then the next change."""
    db.create_collection("big", changeStreamPreAndPostImages={"enabled": True})
    db.big.insert_one({"_id": 1, "pad": "a" * (9 << 20)})
    t = tails(mongo_uri, "%s.big" % db_name, "--full-document", "updateLookup",
              "--before-change", "whenAvailable", "--on-oversize", "skip", "--max-await-ms", "100")
    t.wait_open()
    db.big.update_one({"_id": 1}, {"$set": {"pad": "b" * (9 << 20)}})
    db.big.insert_one({"_id": 2})
    msgs = t.wait_messages(2, timeout=60)
    assert t.stop() == 0
    assert msgs[0]["type"] == "oversize" and msgs[0]["documentKey"] == {"_id": 1}
    assert msgs[0]["limit"] == 16793600
    assert msgs[1]["type"] == "change" and msgs[1]["change"]["documentKey"] == {"_id": 2}


def test_tail_exits_when_stdout_is_closed(tmp_path, mongo_uri, db, db_name):
    """The reader of tail's stdout goes away: tail says it cannot write stdout and exits 1
    (its stdout sink failed for good) instead of reading the change stream for nobody."""
    err_path = tmp_path / "tail.err"
    with open(str(err_path), "wb") as err:
        p = subprocess.Popen([str(mongocast_bin()), "tail", mongo_uri, "%s.c" % db_name,
                              "--max-await-ms", "100"], stdout=subprocess.PIPE, stderr=err,
                             stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: "change stream open" in err_path.read_text("utf-8", "replace"),
                     timeout=START_TIMEOUT, message="mongocast tail to open its change stream")
            db["c"].insert_one({"_id": 0})
            assert json.loads(p.stdout.readline())["change"]["documentKey"] == {"_id": 0}
            p.stdout.close()
            for i in range(1, 50):
                db["c"].insert_one({"_id": i})
                if p.poll() is not None:
                    break
                time.sleep(0.05)
            rc = p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = err_path.read_text("utf-8", "replace")
    assert rc == 1, text
    assert "mongocast tail: cannot write stdout: " in text, text
    assert SANITIZER_RE.search(text) is None, text


def test_tail_long_error_keeps_its_code(tails, mongo_uri, db_name):
    """The last line of a failed tail keeps the server's code, however long the server's
    message (it used to be cut at "(code 4" by the status message's fixed size)."""
    stage = "$" + "x" * 600
    t = tails(mongo_uri, "%s.c" % db_name, "--pipeline", '[{"%s": {}}]' % stage,
              "--max-await-ms", "100")
    rc = t.proc.wait(30)
    t.stop()
    assert rc == 1, t.stderr_text()
    last = [l for l in t.stderr_text().splitlines() if l.startswith("mongocast tail:")][-1]
    assert last.startswith("mongocast tail: change stream failed: code 40324: "), last
    assert t.messages()[-1]["server_code"] == 40324


def test_tail_without_a_server_says_what_it_waits_for(tmp_path):
    """No server at the URI: a hint after a few seconds, then it gives up (exit 1) once --wait
    runs out, within a bounded time."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    start = time.monotonic()
    p = run_cli("tail", "mongodb://127.0.0.1:%d/?replicaSet=rs0" % port, "db.c", "--wait", "4",
                timeout=60)
    took = time.monotonic() - start
    assert p.returncode == 1, p.stderr
    assert p.stdout == ""
    assert ("mongocast tail: waiting for a MongoDB replica set (or sharded cluster) at the URI, "
            "retrying for up to 4 s (--wait); is the server running, and does the URI name the "
            "replica set (?replicaSet=...)?") in p.stderr, p.stderr
    assert "mongocast tail: gave up: the change stream on db.c did not open within 4 s (--wait)" \
        in p.stderr, p.stderr
    # --wait, plus at most the driver's own attempts in flight (server selection, 5 s each).
    assert took < 4 + 12, took
    bad = run_cli("tail", "mongodb://127.0.0.1:1/", "db.c", "--wait", "-1")
    assert bad.returncode == 2 and "--wait: '-1' is not 0 to 86400 seconds" in bad.stderr


@pytest.mark.parametrize("args, message", [
    ([], "a MongoDB URI is required"),
    (["mongodb://h:1/", "db.c", "extra"], "unexpected argument 'extra'"),
    (["notaurl"], "invalid MongoDB URI"),
    (["mongodb://h:1/", "bad$db"], "'bad$db' is not a valid database name"),
    (["mongodb://h:1/", "db."], "'' is not a valid collection name"),
    (["mongodb://h:1/", "db.c", "--full-document", "sometimes"],
     "--full-document: unknown mode 'sometimes'"),
    (["mongodb://h:1/", "db.c", "--before-change", "on"], "--before-change: unknown mode 'on'"),
    (["mongodb://h:1/", "db.c", "--start-at", "yesterday"], "--start-at: 'yesterday' is not"),
    (["mongodb://h:1/", "db.c", "--start-at", "5", "--resume-after", "82AB"],
     "--resume-after and --start-at are mutually exclusive"),
    (["mongodb://h:1/", "db.c", "--resume-after", "xyz"], "--resume-after: 'xyz' is not an "
                                                          "event id"),
    (["mongodb://h:1/", "db.c", "--pipeline", "[{"], "--pipeline is not valid JSON"),
    (["mongodb://h:1/", "db.c", "--pipeline", '{"$match": {}}'],
     "--pipeline must be a JSON array of stages"),
    (["mongodb://h:1/", "db.c", "--pipeline", '[{"$match": {}, "$project": {}}]'],
     "must have exactly one key"),
    (["mongodb://h:1/", "db.c", "--pipeline", '[{"$match": {"a": {"$var": "x"}}}]'],
     "placeholders are bound by subscribers"),
    (["mongodb://h:1/", "db.c", "--on-oversize", "retry"],
     "--on-oversize: 'retry' is not split, skip or fail"),
    (["mongodb://h:1/", "db.c", "--bogus"], "unknown option '--bogus'"),
    (["mongodb://h:1/", "db.c", "--pipeline"], "option '--pipeline' needs a value"),
    (["mongodb://h:1/", "db.c", "--raw=yes"], "option '--raw' takes no value"),
])
def test_tail_usage_errors_exit_2(args, message):
    p = run_cli("tail", *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("mongocast tail: ")
    assert message in p.stderr, p.stderr
    assert p.stdout == ""


def test_enable_images(mongo_uri, db, db_name):
    db.create_collection("a")
    db.create_collection("b")
    p = run_cli("enable-images", mongo_uri, db_name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(p.stdout.splitlines()) == ["%s.a: ok" % db_name, "%s.b: ok" % db_name]
    for name in ("a", "b"):
        info = db.command("listCollections", filter={"name": name})["cursor"]["firstBatch"][0]
        assert info["options"]["changeStreamPreAndPostImages"] == {"enabled": True}

    db.create_collection("c")
    p = run_cli("enable-images", mongo_uri, db_name, "c", "missing")
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert lines[0] == "%s.c: ok" % db_name
    assert lines[1].startswith("%s.missing: error: " % db_name), lines

    p = run_cli("enable-images", mongo_uri, db_name + "_empty")
    assert p.returncode == 1
    assert "has no collections" in p.stderr

    p = run_cli("enable-images", mongo_uri)
    assert p.returncode == 2 and "a MongoDB URI and a database are required" in p.stderr


def test_enable_images_unreachable_server():
    p = run_cli("enable-images", "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300", "db")
    assert p.returncode == 1
    assert "cannot connect to mongodb://127.0.0.1:1/" in p.stderr


def test_version_and_help():
    p = run_cli("version")
    assert p.returncode == 0 and p.stdout.startswith("mongocast 0.1.0 (libmongoc ")
    p = run_cli("--help")
    assert p.returncode == 0
    for cmd in ("run -c FILE", "check -c FILE", "tail URI", "enable-images URI DB", "version"):
        assert "mongocast " + cmd in p.stdout
    p = run_cli("help", "tail")
    assert p.returncode == 0 and "--resume-after ID" in p.stdout
    p = run_cli("tail", "--help")
    assert p.returncode == 0 and "--before-change MODE" in p.stdout
    p = run_cli("frobnicate")
    assert p.returncode == 2 and "unknown command 'frobnicate'" in p.stderr
    p = run_cli("run")
    assert p.returncode == 2 and "a config file is required" in p.stderr
