"""Edge streams (`source: {nats: ...}`): a leader daemon reads MongoDB and writes its events to
a JetStream stream (nats sink, `format: bson`); two edge daemons, whose mongodb.uri points at
nothing, serve WebSocket subscribers from that JetStream stream.

- Every user subscribed to an edge receives exactly its events, in write order, with the same
  event ids as the same user subscribed to the leader, and what the writes say it must get
  (recipient routing with entered/left views; a client filter; the admin sees everything).
- nats-server is killed (SIGKILL) and restarted during the writes: the edges reconnect and
  read on from their own next sequence; nobody loses or repeats anything.
- One edge is stopped while writes go on and started again: it resumes from its checkpoint
  (found in JetStream by a binary search over sequences) with its history ring warmed from
  JetStream, so its subscribers reconnect with since=<last id> and get exactly the rest.
- A client resuming on an edge with an id older than the edge's history ring is caught up
  from JetStream (read by sequence) with its own view, then joins the live feed with no gap
  and no duplicate; an id older than what JetStream keeps gets `reset` history_lost, an id of
  no message `reset` unknown_id.
- Config validation refuses what an edge cannot do, each with a clear message.
"""

import json
import random
import re
import signal
import subprocess
import time

import pytest

from broker_util import nats_server  # noqa: F401 (fixture)
from conftest import find_binary
from daemon_util import *  # noqa: F401,F403
from live_util import (claims, create_with_images, free_port, hs256, http_get, live_config,
                       stream_path, subscribers, wait_http)  # noqa: F401 (fixture)
from test_live_isolation import USERS, apply_op, expected_for, observed, plan_ops

SECRET = "edge-secret-0123456789abcdef0123456789abcdef"
AUTH = {"algorithm": "HS256", "secret": SECRET, "admin_role": "mongocast:all"}
SEED = 20261207
N_OPS = 450
DEAD_MONGO = "mongodb://127.0.0.1:9/?replicaSet=rs0&serverSelectionTimeoutMS=200"


def leader_config(tmp_path, uri, db_name, nats_url, port):
    stream = {"db": db_name, "collection": "items", "max_await_time_ms": 100,
              "recipient": "fullDocument.owner", "full_document": "whenAvailable",
              "full_document_before_change": "whenAvailable", "client_filters": True}
    sink = {"name": "js", "type": "nats", "url": nats_url, "mode": "jetstream",
            "format": "bson", "create_stream": "EDGE", "ack_timeout_ms": 2000,
            "retry": {"initial_ms": 20, "max_ms": 300}}
    return live_config(tmp_path / "leader.yaml", uri, {"items": stream}, port, auth=AUTH,
                       sinks=[sink])


def edge_config(tmp_path, name, nats_url, port, history=10000):
    stream = {"recipient": "fullDocument.owner", "client_filters": True, "history": history,
              "source": {"nats": {"url": nats_url, "stream": "EDGE"}}}
    extra = "server: %s\nauth: %s" % (json.dumps({"listen": "127.0.0.1:%d" % port}),
                                      json.dumps({"jwt": AUTH}))
    return write_config(tmp_path / ("%s.yaml" % name), DEAD_MONGO, {"items": stream}, sinks=[],
                        checkpoint_dir=tmp_path / ("cp-" + name), interval_ms=100, extra=extra)


def start_edge(daemons, cfg, port, name):
    d = daemons(cfg, name=name)
    wait_http(port, d)
    d.wait_stderr(r"JetStream consumer open stream=items")
    return d


def subscribe_all(subscribers, port, tag, since=None):
    subs = {}
    for u in USERS:
        subs[u] = subscribers.ws(port, stream_path("items", token=hs256(SECRET, claims(u)),
                                                   since=since and since.get(u)),
                                 name="%s-%s" % (tag, u))
    subs["admin"] = subscribers.ws(
        port, stream_path("items", since=since and since.get("admin")), name=tag + "-admin",
        headers={"Authorization": "Bearer " + hs256(SECRET, claims("root",
                                                                     roles=["mongocast:all"]))})
    # u1 again, with a client filter: only its documents whose qty is below 5.
    subs["u1-filtered"] = subscribers.ws(
        port, stream_path("items", token=hs256(SECRET, claims("u1")),
                          filter={"fullDocument.qty": {"$lt": 5}},
                          since=since and since.get("u1-filtered")),
        name=tag + "-u1f")
    return subs


def expected(ops, who):
    if who != "u1-filtered":
        return expected_for(ops, who)
    # u1's inserts and updates whose document has qty < 5 (qty is set at insert: v % 17), and
    # the left notices, which the filter does not look at (they carry no document).
    qty = {}
    for kind, _id, v, _, _ in ops:
        if kind == "insert":
            qty[_id] = v % 17
    return [e for e in expected_for(ops, "u1")
            if e[0] == "left" or (e[0] in ("insert", "update") and qty[e[1]] < 5)]


def n_expected(ops, who):
    return len(expected(ops, who))


def feed(msgs):
    return [m for m in msgs if m.get("type") in ("change", "left")]


def wait_all(subs, ops, timeout=60):
    for who, s in subs.items():
        n = n_expected(ops, who)
        s.wait(lambda ms: len(feed(ms)) >= n, timeout, "%d messages" % n)


def close_all(subs, ds):
    """Subscribers first, then the daemons, each cleanly (teardown would otherwise wait for
    clients whose server went away)."""
    for sub in subs:
        sub.close()
    for d in ds:
        assert d.stop() == 0, d.stderr_text()[-3000:]


def test_edges_serve_every_view_exactly_across_a_nats_restart(tmp_path, daemons, emulator, db,
                                                              db_name, nats_server, subscribers):
    lport, e1port, e2port = free_port(), free_port(), free_port()
    coll = create_with_images(db, "items")
    leader = daemons(leader_config(tmp_path, emulator.uri, db_name, nats_server.url, lport),
                     name="leader")
    wait_http(lport, leader)
    leader.wait_open()
    e1cfg = edge_config(tmp_path, "edge1", nats_server.url, e1port)
    edge1 = start_edge(daemons, e1cfg, e1port, "edge1")
    edge2 = start_edge(daemons, edge_config(tmp_path, "edge2", nats_server.url, e2port), e2port,
                       "edge2")

    on_leader = subscribe_all(subscribers, lport, "L")
    on_e1 = subscribe_all(subscribers, e1port, "E1")
    on_e2 = subscribe_all(subscribers, e2port, "E2")
    for s in list(on_leader.values()) + list(on_e1.values()) + list(on_e2.values()):
        s.wait_ready()

    ops = plan_ops(random.Random(SEED), N_OPS)
    third = N_OPS // 3
    for op in ops[:third]:
        apply_op(coll, op)
    # nats-server dies (SIGKILL) and comes back on the same port and store while writes go on.
    nats_server.restart(signal.SIGKILL)
    for op in ops[third:2 * third]:
        apply_op(coll, op)
    wait_all(on_e1, ops[:2 * third])
    # Edge 1 stops (its subscribers lose their connection) while the rest is written, and
    # starts again: it resumes from its checkpoint, and its subscribers resume by id.
    last_ids = {who: [m for m in on_e1[who].messages() if m.get("type") == "change"][-1]["id"]
                for who in on_e1}
    got_before = {who: observed(s.messages()) for who, s in on_e1.items()}
    upto = {who: max(i for i, e in enumerate(got) if e[0] != "left") + 1
            for who, got in got_before.items()}
    assert edge1.stop() == 0
    for op in ops[2 * third:]:
        apply_op(coll, op)
    edge1 = start_edge(daemons, e1cfg, e1port, "edge1-again")
    assert re.search(r"resumes after \w+ at JetStream sequence", edge1.stderr_text()), \
        edge1.stderr_text()[-3000:]
    resumed = subscribe_all(subscribers, e1port, "E1b", since=last_ids)

    wait_all(on_leader, ops)
    wait_all(on_e2, ops)
    for who, s in resumed.items():
        n = n_expected(ops, who) - upto[who]
        s.wait(lambda ms: len(feed(ms)) >= n, 60, "%d messages" % n)
    time.sleep(0.5)  # a stray extra frame would show up now

    for who in on_leader:
        exp = expected(ops, who)
        got_leader = observed(on_leader[who].messages())
        assert got_leader == exp, "leader %s differs from the writes" % who
        assert observed(on_e2[who].messages()) == exp, "edge2 %s differs from the writes" % who
        # `left` notices carry no id: a client resuming from its last id gets the notices
        # after that event again (as from any node).
        got_e1 = got_before[who][:upto[who]] + observed(resumed[who].messages())
        assert got_e1 == exp, "edge1 %s (before + after its restart) differs from the writes" % who
        ids = [m["id"] for m in feed(on_leader[who].messages()) if "id" in m]
        assert [m["id"] for m in feed(on_e2[who].messages()) if "id" in m] == ids
        assert [m["id"] for m in feed(on_e1[who].messages()) + feed(resumed[who].messages())
                if "id" in m] == ids, who
        for m in resumed[who].messages():
            assert m.get("type") != "reset", (who, m)
    assert any(e[0] == "left" for e in expected(ops, "u2")), "the seed must hand documents over"
    for d in (leader, edge1, edge2):
        assert d.alive(), d.stderr_text()[-3000:]
    # The edges never reached MongoDB (their uri points at a closed port) and said nothing of
    # a change stream.
    for d in (edge1, edge2):
        assert "change stream open" not in d.stderr_text()
    for port in (e1port, e2port):
        status, _, body = http_get(port, "/readyz")
        assert status == 200 and json.loads(body)["streams"] == {"items": "open"}, body
    # edge2 lived through the nats-server restart: it noticed and read on from its sequence.
    assert re.search(r"stream=items reconnected to NATS, reading again from JetStream sequence",
                     edge2.stderr_text()), edge2.stderr_text()[-3000:]
    # An id older than the edge's ring (one second before its first event) goes to a catch-up
    # from JetStream, which finds no message with that id (the JetStream stream still holds its
    # first message, so nothing was removed): reset unknown_id, at once.
    first = [m["id"] for m in feed(on_e2["admin"].messages()) if "id" in m][0]
    older = first[:2] + "%08X" % (int(first[2:10], 16) - 1) + first[10:]
    old = subscribers.ws(e2port, stream_path("items", since=older), name="E2-old", headers={
        "Authorization": "Bearer " + hs256(SECRET, claims("root", roles=["mongocast:all"]))})
    old.wait(lambda ms: any(m.get("type") == "reset" for m in ms), 10, "a reset")
    assert [m["reason"] for m in old.messages() if m.get("type") == "reset"] == ["unknown_id"]
    close_all(list(on_leader.values()) + list(on_e1.values()) + list(on_e2.values()) +
              list(resumed.values()) + [old], [edge1, edge2, leader])


def expected_after(ops, who, k):
    """What `who` gets from the events after ops[k] (the filtered view reads each document's
    qty from its insert, which may be before ops[k])."""
    if who != "u1-filtered":
        return expected_for(ops[k + 1:], who)
    qty = {_id: v % 17 for kind, _id, v, _, _ in ops if kind == "insert"}
    return [e for e in expected_for(ops[k + 1:], "u1")
            if e[0] == "left" or (e[0] in ("insert", "update") and qty[e[1]] < 5)]


def nats_purge(url, stream, keep):
    exe = find_binary("tests/integration/clients/broker_client")
    out = subprocess.run([str(exe), "nats-purge", url, stream, str(keep)], capture_output=True,
                         timeout=30, check=True).stdout.decode()
    return int(out)


def test_edge_catches_a_client_up_from_jetstream_by_sequence(tmp_path, daemons, emulator, db,
                                                             db_name, nats_server, subscribers):
    # The edge's ring holds 50 events; 400 are written. Clients resume on the edge after the
    # 10th event (each with its own view: users by token, one with a client filter, the
    # admin): the edge reads the rest from JetStream by sequence, then live events follow.
    n_ops, k, n_more, n_after = 400, 9, 40, 40
    lport, eport = free_port(), free_port()
    coll = create_with_images(db, "items")
    leader = daemons(leader_config(tmp_path, emulator.uri, db_name, nats_server.url, lport),
                     name="leader")
    wait_http(lport, leader)
    leader.wait_open()
    edge = start_edge(daemons, edge_config(tmp_path, "edge", nats_server.url, eport, history=50),
                      eport, "edge")
    on_leader = subscribe_all(subscribers, lport, "L")
    admin = {"Authorization": "Bearer " + hs256(SECRET, claims("root",
                                                                 roles=["mongocast:all"]))}
    live_admin = subscribers.ws(eport, stream_path("items"), name="E-admin", headers=admin)
    for s in list(on_leader.values()) + [live_admin]:
        s.wait_ready()
    ops = plan_ops(random.Random(SEED + 1), n_ops + n_more + n_after)
    for op in ops[:n_ops]:
        apply_op(coll, op)
    wait_all(on_leader, ops[:n_ops])
    # The edge has read everything (its ring ends with the last event) before clients resume.
    live_admin.wait(lambda ms: len(feed(ms)) >= n_ops, 30, "%d messages" % n_ops)
    since = [m["id"] for m in feed(on_leader["admin"].messages())][k]
    t0 = time.monotonic()
    resumed = subscribe_all(subscribers, eport, "R", since={who: since for who in on_leader})
    # Live events while the clients catch up (the join splices them in), then after it: no gap,
    # no duplicate.
    for op in ops[n_ops:n_ops + n_more]:
        apply_op(coll, op)
    for who, s in resumed.items():
        n = len(expected_after(ops[:n_ops + n_more], who, k))
        s.wait(lambda ms: len(feed(ms)) >= n, 30, "%d messages" % n)
    caught_up_s = time.monotonic() - t0
    for op in ops[n_ops + n_more:]:
        apply_op(coll, op)
    wait_all(on_leader, ops)
    for who, s in resumed.items():
        n = len(expected_after(ops, who, k))
        s.wait(lambda ms: len(feed(ms)) >= n, 30, "%d messages" % n)
    time.sleep(0.5)  # a stray extra frame would show up now
    for who, s in resumed.items():
        exp = expected_after(ops, who, k)
        assert observed(s.messages()) == exp, "%s after its catch-up differs from the writes" % who
        # The same messages, with the same ids, as the leader's subscriber with that view got
        # after the same event.
        got_leader = observed(on_leader[who].messages())
        assert got_leader == expected(ops, who), who
        n_before = len(got_leader) - len(exp)
        assert got_leader[n_before:] == exp, who
        assert [m.get("id") for m in feed(s.messages())] == \
            [m.get("id") for m in feed(on_leader[who].messages())[n_before:]], who
        assert not any(m.get("type") == "reset" for m in s.messages()), who
    assert any(e[0] == "left" for e in expected_after(ops, "u2", k)), "the seed must hand over"
    assert len(re.findall(r"catch-up started stream=items", edge.stderr_text())) == \
        len(resumed), edge.stderr_text()[-3000:]
    assert "catch-up ended with reset" not in edge.stderr_text()

    # JetStream drops all but its newest 100 messages (as its limits would): an id before
    # them is history lost.
    assert nats_purge(nats_server.url, "EDGE", 100) > 1
    lost = subscribers.ws(eport, stream_path("items", since=since), name="lost", headers=admin)
    lost.wait(lambda ms: any(m.get("type") == "reset" for m in ms), 10, "a reset")
    assert [m["reason"] for m in lost.messages() if m.get("type") == "reset"] == ["history_lost"]
    assert edge.alive(), edge.stderr_text()[-3000:]
    print("catch-up of %d clients over %d events: %.2f s" % (len(resumed), n_ops + n_more - k - 1,
                                                             caught_up_s))
    close_all(list(on_leader.values()) + list(resumed.values()) + [live_admin, lost],
              [edge, leader])


@pytest.mark.parametrize("stream,expected", [
    ({"full_document": "whenAvailable"}, r"full_document cannot be set on an edge stream"),
    ({"ensure_images": True}, r"ensure_images cannot be set on an edge stream"),
    ({"max_snapshot_documents": 10}, r"snapshots read MongoDB"),
    ({"pipeline": [{"$match": {"operationType": "insert"}}]},
     r"stages before it run in MongoDB"),
    ({"recipient": {"path": "fullDocument.team",
                    "lookup": {"db": "d", "collection": "teams", "recipient": "owner"}}},
     r"recipient lookups cannot be used on an edge stream"),
    ({"source": {"nats": {"url": "nats://h:99999", "stream": "E"}}}, r"nats url"),
    ({"source": {"nats": {"url": "nats://h", "stream": "E.X"}}},
     r"not a valid JetStream stream name"),
    ({"source": {"nats": {"url": "nats://h", "stream": "E", "subject": "a..b"}}},
     r"not a valid NATS subject"),
    ({"source": {"nats": {"stream": "E"}}}, r"missing required key 'url'"),
])
def test_edge_config_refusals(tmp_path, stream, expected):
    body = {"recipient": "owner", "source": {"nats": {"url": "nats://127.0.0.1:4222",
                                                       "stream": "E"}}}
    body.update(stream)
    cfg = write_config(tmp_path / "c.yaml", DEAD_MONGO, {"s": body}, sinks=[])
    r = run_cli("check", "-c", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(r"c\.yaml:\d+:\d+: ", out), out
    assert re.search(expected, out), out


def test_edge_refuses_sinks_and_the_leader_sink_needs_jetstream(tmp_path):
    src = {"source": {"nats": {"url": "nats://127.0.0.1:4222", "stream": "E"}}}
    cfg = write_config(tmp_path / "c.yaml", DEAD_MONGO, {"s": src},
                       sinks=[{"name": "out", "type": "stdout"}])
    r = run_cli("check", "-c", str(cfg))
    assert r.returncode != 0 and re.search(r"sinks belong on the leader", r.stdout + r.stderr), \
        r.stdout + r.stderr
    cfg = write_config(tmp_path / "d.yaml", DEAD_MONGO, {"s": {"db": "d"}},
                       sinks=[{"name": "n", "type": "nats", "url": "nats://127.0.0.1:4222",
                               "mode": "core", "format": "bson"}])
    r = run_cli("check", "-c", str(cfg))
    assert r.returncode != 0 and re.search(r"format: bson is for edge streams",
                                           r.stdout + r.stderr), r.stdout + r.stderr


def test_check_of_an_edge_only_config_needs_no_mongodb(tmp_path):
    cfg = edge_config(tmp_path, "edge", "nats://127.0.0.1:4222", free_port())
    r = run_cli("check", "-c", str(cfg), "--timeout-ms", "500")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "every stream is an edge stream (source: nats): MongoDB not checked" in out, out


def test_edge_waits_for_nats_and_its_stream_and_refuses_subscribers_until_open(
        tmp_path, daemons, emulator, db, db_name, nats_server, subscribers):
    # NATS is down when the edge starts: the stream is retrying (readyz 503) and subscribers
    # are refused with 503 stream_loading; once NATS is back and the leader has created the
    # JetStream stream, the edge opens and serves.
    nats_server.stop()
    eport, lport = free_port(), free_port()
    edge = {"public": True, "source": {"nats": {"url": nats_server.url, "stream": "PUB"}}}
    ecfg = write_config(tmp_path / "e.yaml", DEAD_MONGO, {"items": edge}, sinks=[],
                        checkpoint_dir=tmp_path / "cp-e",
                        extra="server: {listen: \"127.0.0.1:%d\"}" % eport)
    e = daemons(ecfg, name="edge")
    wait_http(eport, e)
    e.wait_stderr(r"stream=items retry_in_ms=\d+: cannot connect to NATS")
    status, _, body = http_get(eport, "/readyz")
    assert status == 503 and json.loads(body)["streams"]["items"] == "retrying", body
    status, headers, body = http_get(eport, "/v1/streams/items", headers={
        "Accept": "text/event-stream"})
    assert status == 503 and json.loads(body)["code"] == "stream_loading", body
    assert headers.get("retry-after") == "1"

    nats_server.start()
    coll = db["items"]
    db.create_collection("items")
    lcfg = write_config(tmp_path / "l.yaml", emulator.uri,
                        {"items": {"db": db_name, "collection": "items", "public": True,
                                   "max_await_time_ms": 100}},
                        sinks=[{"name": "js", "type": "nats", "url": nats_server.url,
                                "format": "bson", "create_stream": "PUB",
                                "retry": {"initial_ms": 20, "max_ms": 300}}],
                        checkpoint_dir=tmp_path / "cp-l",
                        extra="server: {listen: \"127.0.0.1:%d\"}" % lport)
    leader = daemons(lcfg, name="leader")
    leader.wait_open()
    e.wait_stderr(r"JetStream consumer open stream=items", timeout=30)
    sub = subscribers.sse(eport, stream_path("items"), name="sse-edge")
    sub.wait_ready()
    coll.insert_many([{"_id": i, "n": i} for i in range(5)])
    got = sub.wait_changes(5)
    assert [m["change"]["fullDocument"]["n"] for m in got if m.get("type") == "change"] == \
        list(range(5))
    assert http_get(eport, "/readyz")[0] == 200
    close_all([sub], [e, leader])
