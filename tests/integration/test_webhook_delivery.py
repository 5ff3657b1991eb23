"""Webhook delivery building blocks end to end: webhook_client (the glue the webhook sink will
be: src/lib/sinks/ signing, formats, HTTP client, per-key ordering, retries, dead letters)
against the Python receiver (tests/integration/webhook_receiver.py), which checks every
signature with its own HMAC code and misbehaves on purpose.

What the sink runner adds later (the daemon killed with SIGKILL mid-way, stored positions)
is not covered here: these tests hold the delivery rules themselves.
"""

import json
import subprocess
import uuid
from collections import defaultdict

import pytest

from conftest import find_binary
from webhook_receiver import Receiver, receivers  # noqa: F401

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="
TAIL = "6E5A100400000000000000000000000000ABCDEF46645F6964002900000004"


def event_id(k):
    """The id webhook_client gives its k-th event (position 1700000000 + k/1000, k%1000 + 1)."""
    return "82%08X%08X2B022C010029%s" % (1700000000 + k // 1000, k % 1000 + 1, TAIL)


def run_client(url, tmp_path, *args, secrets=(SECRET_A,), timeout=300):
    exe = find_binary("tests/integration/clients/webhook_client")
    dead = tmp_path / ("dead-%s.jsonl" % uuid.uuid4().hex[:8])
    argv = [str(exe), "--url", url, "--dead-letter", str(dead)]
    for s in secrets:
        argv += ["--secret", s]
    argv += [str(a) for a in args]
    p = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    summary = json.loads(p.stdout.decode().strip().splitlines()[-1])
    dead_ids = [json.loads(line) for line in dead.read_text().splitlines()] if dead.exists() else []
    return summary, dead_ids




def test_faults_exactly_once_in_order_and_dead_lettered(receivers, tmp_path):
    n, keys = 800, 10
    rejected = {event_id(k) for k in (3, 77, 400, 401, 700)}
    r = receivers(secrets=[SECRET_A], fail_rate=0.12, throttle_rate=0.02, retry_after=1,
                  stall_rate=0.005, stall_seconds=1.0, reset_rate=0.03, reject_ids=rejected,
                  seed=7, keep_bodies=True)
    summary, dead = run_client(r.url, tmp_path, "--events", n, "--keys", keys,
                               "--concurrency", 8, "--timeout-ms", 400)
    assert summary["delivered"] == n - len(rejected)
    # The 400 ids, and only those, are in the dead letter, each once, with the status.
    assert sorted(d["id"] for d in dead) == sorted(rejected)
    assert all(d["status"] == 400 and "HTTP 400" in d["error"] for d in dead)

    accepted = defaultdict(int)
    per_key = defaultdict(list)  # attempt order of ids per recipient
    for a in r.attempts:
        # Every request carried a valid signature and a fresh timestamp.
        assert a["sig_ok"], a
        assert abs(a["at"] - int(a["ts"])) < 5, a
        if a["answer"] == 200:
            accepted[a["id"]] += 1
            assert a["body"]["id"] == a["id"]
            per_key[a["body"]["recipient"]].append(a["id"])
    # Every event except the rejected ones accepted; after dedupe by webhook-id exactly once.
    expected = {event_id(k) for k in range(n)} - rejected
    assert set(accepted) == expected
    # Per recipient, accepted in event order (ids of one key grow with k).
    for owner, ids in per_key.items():
        k = int(owner[len("user"):])
        want = [event_id(j) for j in range(k, n, keys) if event_id(j) not in rejected]
        firsts = list(dict.fromkeys(ids))
        assert firsts == want, owner
    # The faults happened: retries were needed and made.
    answers = defaultdict(int)
    for a in r.attempts:
        answers[str(a["answer"])] += 1
    assert answers["500"] > 40 and answers["429"] > 5 and answers["reset"] > 10
    assert summary["attempts"] > n
    # Retry-After was honoured: after a 429 the same event came back no sooner than 1 s.
    last = {}
    for a in r.attempts:
        prev = last.get(a["id"])
        if prev is not None and prev["answer"] == 429:
            assert a["at"] - prev["at"] >= 0.9, a["id"]
        last[a["id"]] = a


def test_attempts_of_one_key_never_overlap(receivers, tmp_path):
    """With several requests in flight, the attempts of one recipient's events still arrive
    strictly one event after the other: all attempts of an event before any of the next."""
    n, keys = 600, 3
    r = receivers(secrets=[SECRET_A], fail_rate=0.3, seed=11, keep_bodies=True)
    run_client(r.url, tmp_path, "--events", n, "--keys", keys, "--concurrency", 8,
               "--timeout-ms", 2000)
    by_key = defaultdict(list)
    id_key = {event_id(k): "user%d" % (k % keys) for k in range(n)}
    for a in r.attempts:
        by_key[id_key[a["id"]]].append(a["id"])
    for owner, ids in by_key.items():
        blocks = [ids[0]] + [b for a, b in zip(ids, ids[1:]) if a != b]
        assert len(blocks) == len(set(blocks)), "an event of %s came back after a later one" % owner


def test_secret_rotation_either_secret_verifies(receivers, tmp_path):
    old = receivers(secrets=[SECRET_A])
    new = receivers(secrets=[SECRET_B])
    for r in (old, new):
        summary, dead = run_client(r.url, tmp_path, "--events", 50, "--keys", 5,
                                   secrets=(SECRET_A, SECRET_B))
        assert summary["delivered"] == 50 and not dead
        assert len(r.attempts) == 50 and all(a["sig_ok"] for a in r.attempts)
    # A receiver that knows neither secret refuses (401), which is permanent: dead letter.
    other = receivers(secrets=["whsec_" + "QUJD" * 8])
    summary, dead = run_client(other.url, tmp_path, "--events", 5, "--keys", 5)
    assert summary["dead"] == 5 and summary["delivered"] == 0


def test_stalled_key_does_not_hold_other_keys(receivers, tmp_path):
    """The receiver never answers for user0's first event: that key is stuck in retries (and
    ends in the dead letter when attempts run out) while every other key is delivered."""
    n, keys = 200, 4
    r = receivers(secrets=[SECRET_A], stall_ids={event_id(0)}, stall_seconds=0.5)
    summary, dead = run_client(r.url, tmp_path, "--events", n, "--keys", keys,
                               "--concurrency", 2, "--timeout-ms", 200, "--max-attempts", 3)
    assert [d["id"] for d in dead] == [event_id(0)]
    assert "imeout" in dead[0]["error"]
    assert summary["delivered"] == n - 1
    # user0's later events were delivered only after its first one was given up on.
    last_try_0 = max(a["at"] for a in r.attempts if a["id"] == event_id(0))
    first_ok_4 = min(a["at"] for a in r.attempts if a["id"] == event_id(4) and a["answer"] == 200)
    assert first_ok_4 > last_try_0


def test_cloudevents_and_batches(receivers, tmp_path):
    r = receivers(secrets=[SECRET_A], keep_bodies=True)
    summary, _ = run_client(r.url, tmp_path, "--events", 40, "--keys", 2, "--format",
                            "cloudevents")
    assert summary["delivered"] == 40
    for a in r.attempts:
        body = a["body"]
        assert a["content_type"] == "application/cloudevents+json"
        assert body["specversion"] == "1.0" and body["id"] == a["id"]
        assert body["type"] == "mongodb.change.insert"
        assert body["source"] == "/mongocast/streams/orders"
        assert body["subject"].startswith("shop.orders/")
        assert body["data"]["id"] == a["id"]
    b = receivers(secrets=[SECRET_A], keep_bodies=True)
    summary, _ = run_client(b.url, tmp_path, "--events", 100, "--keys", 2, "--batch", 10)
    assert summary["delivered"] == 100 and summary["requests"] == 10
    seen = []
    for a in b.attempts:
        assert a["content_type"] == "application/json"
        assert isinstance(a["body"], list) and len(a["body"]) == 10
        assert a["body"][0]["id"] == a["id"]  # webhook-id: the batch's first event
        seen += [m["id"] for m in a["body"]]
    assert sorted(seen) == sorted(event_id(k) for k in range(100))
