"""The Redis and NATS clients of src/lib/sinks/ end to end, driven by broker_client (the glue the
broker sinks will be: events in order, a window in flight, transient failures resent in order,
a position file as checkpoint): exactly one copy of each event, in order, while the writer is
killed with SIGKILL again and again and the broker is restarted once; and Pub/Sub routing that
no recipient value can bend.
"""

import json
import random
import signal
import subprocess
import time

import redis

from broker_util import nats_server, redis_server  # noqa: F401 (fixtures)
from conftest import find_binary

TAIL = "6E5A100400000000000000000000000000ABCDEF46645F6964002900000004"


def event_id(k):
    """The id of broker_client's k-th event (position 1700000000 + k/1000, k%1000 + 1)."""
    return "82%08X%08X2B022C010029%s" % (1700000000 + k // 1000, k % 1000 + 1, TAIL)


def entry_id(k):
    return "%d-%d" % ((1700000000 + k // 1000) * 1000, (k % 1000 + 1) << 32)


def run_with_kills(argv, posfile, total, kills, broker=None, restart_after=1, seed=3):
    """Runs argv, kills it with SIGKILL `kills` times at random moments (restarting the broker
    after kill number `restart_after`), then lets a last run finish. Returns the last output.
    Each kill must land in the middle of the work (position file strictly between its value at
    the start of that run and `total`), or the test would prove nothing."""
    rng = random.Random(seed)
    mid_run_kills = 0
    for n in range(kills):
        before = int(posfile.read_text()) if posfile.exists() else 0
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.15, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        after = int(posfile.read_text()) if posfile.exists() else 0
        mid_run_kills += p.returncode == -signal.SIGKILL and after < total
        if broker is not None and n + 1 == restart_after:
            broker.restart()
    assert mid_run_kills >= kills - 1, "the runs finished before they were killed"
    p = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return json.loads(p.stdout.decode().strip().splitlines()[-1])


def test_redis_stream_exactly_once_in_order_across_kills(redis_server, tmp_path):
    exe = find_binary("tests/integration/clients/broker_client")
    n = 100000
    pos = tmp_path / "pos"
    last = run_with_kills([str(exe), "redis-xadd", redis_server.url, "mc:{stream}", str(n),
                           str(pos)], pos, n, kills=4, broker=redis_server, restart_after=2)
    r = redis.Redis(port=redis_server.port)
    entries = r.xrange("mc:orders", "-", "+")
    assert len(entries) == n
    assert [e[0].decode() for e in entries] == [entry_id(k) for k in range(n)]
    assert [e[1][b"id"].decode() for e in entries] == [event_id(k) for k in range(n)]
    assert entries[7][1][b"recipient"] == b"user7" and entries[7][1][b"type"] == b"insert"
    # The last run resumed from its position file and replayed what came after it: the replay
    # was refused by Redis and counted as written.
    assert last["start"] > 0 and last["failed"] == 0


def test_jetstream_exactly_once_in_order_across_kills(nats_server, tmp_path):
    exe = find_binary("tests/integration/clients/broker_client")
    n = 10000
    pos = tmp_path / "pos"
    last = run_with_kills([str(exe), "nats-js", nats_server.url, str(n), str(pos)], pos, n,
                          kills=4, broker=nats_server, restart_after=2)
    assert last["failed"] == 0
    dump = subprocess.run([str(exe), "nats-dump", nats_server.url], capture_output=True,
                          timeout=120, check=True).stdout.decode().split("\n")
    ids = [line.split(" ")[1] for line in dump if line]
    assert len(ids) == n
    assert ids == [event_id(k) for k in range(n)]


def test_redis_pubsub_reaches_only_its_own_channel(redis_server):
    exe = find_binary("tests/integration/clients/broker_client")
    r = redis.Redis(port=redis_server.port)
    alice = r.pubsub()
    alice.subscribe("mongocast:orders:alice")
    every = r.pubsub()
    every.psubscribe("mongocast:orders:*")
    for ps in (alice, every):
        assert ps.get_message(timeout=5)["type"] in ("subscribe", "psubscribe")
    recipients = ["bob", "a:b", "*", "alice*", "x y", "alice\r\nPUBLISH", "alice"]
    out = subprocess.run([str(exe), "redis-publish", redis_server.url,
                          "mongocast:{stream}:{recipient}"] + recipients,
                         capture_output=True, timeout=60, check=True).stdout.decode().split()
    assert out == ["mongocast:orders:bob", "mongocast:orders:a%3Ab", "mongocast:orders:%2A",
                   "mongocast:orders:alice%2A", "mongocast:orders:x%20y",
                   "mongocast:orders:alice%0D%0APUBLISH", "mongocast:orders:alice"]
    got = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = alice.get_message(timeout=0.2)
        if m and m["type"] == "message":
            got.append(json.loads(m["data"]))
    assert [g["recipient"] for g in got] == ["alice"]
    channels = set()
    deadline = time.monotonic() + 5
    while len(channels) < len(recipients) and time.monotonic() < deadline:
        m = every.get_message(timeout=0.2)
        if m and m["type"] == "pmessage":
            channels.add(m["channel"].decode())
    assert channels == set(out)
