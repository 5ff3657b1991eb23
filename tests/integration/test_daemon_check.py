"""`mongocast check -c FILE` (and `run -c FILE` on a bad file).

Broken configs: each file below is wrong in one way; check must print exactly the loader's
"FILE:LINE:COL: message" on stderr, nothing on stdout, and exit 1 without connecting anywhere
(the URI points at a closed port, so a check that tried to connect would print a connect line).
`run` must refuse the same files the same way.

Good configs: check connects, verifies the replica set, opens each stream's change stream once,
verifies pre-/post-images where a stream needs them, prints one line per check and exits 0 or 1.
"""

import os
import re

import pytest

from daemon_util import *  # noqa: F401,F403

DEAD = "mongodb://127.0.0.1:1/?replicaSet=rs0&serverSelectionTimeoutMS=300"
ALLOWED = ("$addFields, $match, $project, $replaceRoot, $replaceWith, $redact, $set, $unset, "
           "$changeStreamSplitLargeEvent")

# (name, file content, expected message after "FILE:")
BROKEN = [
    ("typo", "streams:\n  orders:\n    db: shop\n    colection: orders\n",
     "4:5: unknown key 'colection' in streams.orders; did you mean 'collection'?"),
    ("no_streams", "mongodb:\n  uri: %s\n" % DEAD,
     "1:1: missing required key 'streams'"),
    ("top_level_typo", "stream:\n  a: {db: shop}\n",
     "1:1: unknown key 'stream'; did you mean 'streams'?"),
    ("bad_enum", "streams:\n  orders: {db: shop, collection: orders, full_document: sometimes}\n",
     "2:57: full_document must be one of: default, updateLookup, whenAvailable, required "
     "(got 'sometimes')"),
    ("bad_stage", "streams:\n  orders:\n    db: shop\n    pipeline:\n      - $lookup: {from: x}\n",
     "5:9: stage '$lookup' is not allowed in a change stream pipeline (allowed: %s)" % ALLOWED),
    ("stage_two_keys",
     "streams:\n  a:\n    db: shop\n    pipeline:\n      - {$match: {a: 1}, $project: {b: 1}}\n",
     "5:9: a pipeline stage must be a mapping with exactly one key such as $match, got a "
     "mapping with several keys"),
    ("sink_unknown_stream",
     "streams:\n  orders: {db: shop}\nsinks:\n  - {name: out, type: stdout, streams: [ordrs]}\n",
     "4:41: sink 'out' refers to unknown stream 'ordrs'; did you mean 'orders'?"),
    ("interval_out_of_range", "checkpoint:\n  interval_ms: 5\nstreams:\n  a: {db: shop}\n",
     "2:16: interval_ms must be between 10 and 600000"),
    ("yaml_syntax", "streams:\n  a: {db: shop\n",
     "3:1: did not find expected ',' or '}' while parsing a flow mapping at line 2, column 6"),
    ("collection_without_db", "streams:\n  a: {collection: orders}\n",
     "2:19: collection requires db (omit both to watch the whole cluster)"),
    ("uri_scheme", "mongodb:\n  uri: http://localhost\nstreams:\n  a: {db: shop}\n",
     "2:8: uri must start with mongodb:// or mongodb+srv://"),
    ("unset_env", "mongodb:\n  uri: ${MC_TEST_SURELY_UNSET_VAR}\nstreams:\n  a: {db: shop}\n",
     "2:8: environment variable MC_TEST_SURELY_UNSET_VAR is not set"),
    ("yes_is_not_bool", "streams:\n  a: {db: shop, public: yes}\n",
     "2:25: expected a boolean, got 'yes'"),
    ("duplicate_sink",
     "streams:\n  a: {db: shop}\nsinks:\n  - {name: out, type: stdout}\n"
     "  - {name: out, type: stdout}\n",
     "5:12: duplicate sink name 'out' (first defined at line 4)"),
    ("stage_after_var_the_daemon_cannot_run",
     "streams:\n  a:\n    db: shop\n    pipeline:\n      - $match: {fullDocument.n: {$var: n}}\n"
     "      - $redact: $$PRUNE\n",
     "6:9: $redact cannot follow a $var stage: the stages from the first $var stage on run in "
     "the daemon, per subscriber, in the order written, and the daemon runs only $match, "
     "$project, $addFields, $set, $unset, $replaceRoot and $replaceWith. Move $redact before "
     "the $var stage (it then runs on the server) or remove it"),
    ("bad_summary", "streams:\n  a:\n    db: shop\n    summary: \"{fullDocument.name is low\"\n",
     "4:14: summary: unclosed '{' at character 1 (write {{ for a literal brace)"),
    ("by_collection_on_a_collection",
     "streams:\n  a:\n    db: shop\n    collection: c\n    recipient: {by_collection: "
     "{c: x.y}}\n",
     "5:16: recipient.by_collection needs a database- or cluster-level stream (this stream "
     "watches one collection: write recipient: PATH or {path, lookup})"),
    ("bad_stream_name", "streams:\n  \"bad name\": {db: shop}\n",
     "2:3: stream name 'bad name' must be 1 to 64 characters from A-Z a-z 0-9 _ -"),
    ("bad_policy", "streams:\n  a: {db: shop, on_history_lost: ignore}\n",
     "2:34: on_history_lost must be one of: fail, restart (got 'ignore')"),
    ("jwt_without_secret", "auth:\n  jwt:\n    algorithm: HS256\nstreams:\n  a: {db: shop}\n",
     "3:5: algorithm HS256 requires secret"),
    ("sink_without_type", "streams:\n  a: {db: shop}\nsinks:\n  - {name: out}\n",
     "4:5: missing required key 'type' in sinks[0]"),
    ("bad_db_name", "streams:\n  a: {db: \"sh.op\"}\n",
     "2:11: db 'sh.op' is not a valid database name (at most 63 characters, none of / \\ . "
     "space \" $)"),
]


@pytest.mark.parametrize("name, text, expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_check_broken_config(tmp_path, name, text, expected):
    path = tmp_path / ("%s.yaml" % name)
    path.write_text(text)
    p = run_cli("check", "-c", path, cwd=tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == ""
    assert p.stderr == "%s:%s\n" % (path, expected)
    # run refuses the same file with the same single line, before starting anything.
    r = run_cli("run", "-c", path, cwd=tmp_path, timeout=30)
    assert r.returncode == 1
    assert r.stderr == "%s:%s\n" % (path, expected)


def test_check_missing_file(tmp_path):
    p = run_cli("check", "-c", tmp_path / "nope.yaml")
    assert p.returncode == 1
    assert p.stderr == "%s: No such file or directory\n" % (tmp_path / "nope.yaml")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_check_and_run_refuse_non_regular_files(tmp_path, kind):
    """A FIFO without a writer used to block check (and run) forever in open(2); a directory
    or a device is no configuration either. Both commands refuse at once, naming the path."""
    path = tmp_path / "config.yaml"
    if kind == "fifo":
        os.mkfifo(str(path))
        what = "a FIFO (named pipe)"
    else:
        path.mkdir()
        what = "a directory"
    want = "%s: is %s; the configuration must be a regular file\n" % (path, what)
    for cmd in ("check", "run"):
        p = run_cli(cmd, "-c", path, cwd=tmp_path, timeout=20)
        assert p.returncode == 1, (cmd, p.stdout, p.stderr)
        assert p.stdout == ""
        assert p.stderr == want, cmd


SINK_ERRORS = [
    ("unknown_type", "  - {name: out, type: stdout}\n  - {name: bad, type: nosuch}\n",
     "8:5: sink bad: unknown sink type 'nosuch' (known types: stdout, memory, redis, nats, "
     "webhook, mongodb)"),
    ("stdout_option", "  - {name: out, type: stdout, rwa: true}\n",
     "7:5: sink out: unknown option 'rwa' for sink type stdout (known: raw, ready)"),
    ("stdout_option_type", "  - {name: out, type: stdout, raw: 1}\n",
     "7:5: sink out: option raw must be true or false"),
    ("memory_option", "  - {name: m, type: memory, max_events: 0}\n",
     "7:5: sink m: bad option 'max_events' for sink type memory (known: auto_ack bool, "
     "control bool, max_events 1..100000000)"),
]


@pytest.mark.parametrize("name, sinks, expected", SINK_ERRORS, ids=[e[0] for e in SINK_ERRORS])
def test_sink_errors_with_position(tmp_path, name, sinks, expected):
    """Sink types and options are checked by the sink types themselves (the config loader does
    not know them): check validates them without starting anything, and run refuses the same
    file with the same FILE:LINE:COL line when it starts the engine."""
    path = tmp_path / ("%s.yaml" % name)
    path.write_text("mongodb:\n  uri: %s\ncheckpoint: {path: ./cp}\nstreams:\n  a: {db: shop}\n"
                    "sinks:\n%s" % (DEAD, sinks))
    p = run_cli("check", "-c", path, cwd=tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == ""  # refused before connecting anywhere
    assert p.stderr == "%s:%s\n" % (path, expected)
    assert not (tmp_path / "cp").exists()  # validation started nothing, created nothing
    r = run_cli("run", "-c", path, cwd=tmp_path, timeout=30)
    assert r.returncode == 1
    assert r.stderr == "%s:%s\n" % (path, expected)


def _lines(stdout):
    return [l for l in stdout.splitlines() if l.strip()]


def test_check_good_config(tmp_path, mongo_uri, db, db_name):
    db.create_collection("orders")
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {
        "orders": {"db": db_name, "collection": "orders", "full_document": "updateLookup"},
        "everything": {"db": db_name},
    }, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = _lines(p.stdout)
    assert lines[0] == "ok    config %s (2 streams, 1 sink)" % cfg
    assert lines[1].startswith("ok    checkpoint: file store %s" % (tmp_path / "cp"))
    assert lines[2].startswith("ok    connect ")
    assert re.match(r"ok    (replica set \S+ \(primary \S+\)|sharded cluster)", lines[3])
    assert lines[4] == "ok    stream orders: change stream opens on %s.orders" % db_name
    assert lines[5] == "ok    stream everything: change stream opens on database %s" % db_name
    assert lines[6] == "check passed"
    assert len(lines) == 7


def test_check_pre_post_images(tmp_path, mongo_uri, db, db_name):
    db.create_collection("plain")
    db.create_collection("imaged", changeStreamPreAndPostImages={"enabled": True})
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {
        "needs": {"db": db_name, "collection": "plain",
                  "full_document_before_change": "required"},
        "has": {"db": db_name, "collection": "imaged", "full_document": "whenAvailable",
                "full_document_before_change": "whenAvailable"},
        "dbwide": {"db": db_name, "full_document_before_change": "whenAvailable"},
        "missing": {"db": db_name, "collection": "nope", "full_document": "required"},
    }, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 1, p.stdout
    out = p.stdout
    assert ("FAIL  stream needs: pre-/post-images are not enabled on %s.plain (needed by "
            "full_document_before_change: required); run: mongocast enable-images '%s' %s "
            "plain" % (db_name, mongo_uri, db_name)) in out
    assert "ok    stream has: pre-/post-images enabled on %s.imaged" % db_name in out
    assert ("warn  stream dbwide: pre-/post-images (full_document_before_change: "
            "whenAvailable) cannot be verified per collection for database %s" % db_name) in out
    assert "FAIL  stream missing: collection %s.nope does not exist" % db_name in out
    assert _lines(out)[-1] == "check failed: 2 problems"

    # Fix it the way check says, and check passes (with the database-wide warning).
    fix = run_cli("enable-images", mongo_uri, db_name, "plain")
    assert fix.returncode == 0 and fix.stdout == "%s.plain: ok\n" % db_name
    db.create_collection("nope", changeStreamPreAndPostImages={"enabled": True})
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 0, p.stdout
    assert _lines(p.stdout)[-1] == "check passed with warnings"


def test_check_ensure_images_by_collection_and_lint(tmp_path, mongo_uri, db, db_name):
    """ensure_images turns a missing image into an ok line (run turns them on); the
    collections a database-level stream names in by_collection are checked one by one; a
    server-side stage that removes the recipient path is a warning."""
    db.create_collection("plain")
    db.create_collection("imaged", changeStreamPreAndPostImages={"enabled": True})
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {
        "ensured": {"db": db_name, "collection": "plain", "ensure_images": True,
                    "full_document_before_change": "whenAvailable"},
        "feed": {"db": db_name, "full_document": "whenAvailable",
                 "pipeline": [{"$project": {"operationType": 1, "fullDocument.name": 1}}],
                 "recipient": {"by_collection": {"imaged": "fullDocument.owner",
                                                 "plain": "fullDocument.owner"}}},
    }, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    out = p.stdout
    assert ("ok    stream ensured: pre-/post-images are off on %s.plain; run turns them on "
            "(ensure_images: true)" % db_name) in out
    assert "ok    stream feed: pre-/post-images enabled on %s.imaged" % db_name in out
    assert ("FAIL  stream feed: pre-/post-images are not enabled on %s.plain (needed by "
            "full_document: whenAvailable)" % db_name) in out
    assert ("warn  stream feed: pipeline stage 0 ($project) does not include fullDocument.owner, "
            "the path the recipient is read from: events without it go to admins only") in out
    assert p.returncode == 1, out
    # Nothing was written: check never turns images on itself.
    opts = {c["name"]: c.get("options", {}) for c in db.list_collections()}
    assert "changeStreamPreAndPostImages" not in opts["plain"]


def test_check_rejected_pipeline(tmp_path, mongo_uri, db_name):
    """A stage the loader allows but the server refuses for this stream: check opens the
    change stream and reports the server's error."""
    cfg = write_config(tmp_path / "c.yaml", mongo_uri, {
        "bad": {"db": db_name, "collection": "c",
                "pipeline": [{"$match": {"$where": "true"}}]},
    }, checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 1, p.stdout
    assert ("FAIL  stream bad: cannot open a change stream on %s.c: " % db_name) in p.stdout


def test_check_unreachable(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", DEAD, {"a": {"db": "shop"}},
                       checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, "--timeout-ms", "300", cwd=tmp_path)
    assert p.returncode == 1
    lines = _lines(p.stdout)
    assert lines[2].startswith("FAIL  connect mongodb://127.0.0.1:1/")
    assert lines[-1] == "check failed: 1 problem"


def test_check_not_a_replica_set(tmp_path, standalone_emulator):
    cfg = write_config(tmp_path / "c.yaml", standalone_emulator.uri, {"a": {"db": "shop"}},
                       checkpoint_dir=tmp_path / "cp")
    p = run_cli("check", "-c", cfg, cwd=tmp_path)
    assert p.returncode == 1
    assert ("FAIL  not a replica set: the server's hello has no setName; change streams need a "
            "replica set or a sharded cluster") in p.stdout
