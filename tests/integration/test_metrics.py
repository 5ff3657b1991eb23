"""/metrics for the engine's own counters (docs/protocol.md, "Metrics"): events out per sink
instance (a config stdout sink next to the live fan-out "live-clients"), events a sink skipped,
and the checkpoint age (time since the last successful write to the checkpoint store) with the
write-failure counter, also while the store is broken.

Runs `mongocast run` against the emulator (or MONGODB_URI).
"""

import shutil
import time

from daemon_util import *  # noqa: F401,F403
from server_util import RawWS, metrics, server_config, start_server, stream

OUT = 'mongocast_events_out_total{sink="%s"}'
SKIPPED = 'mongocast_events_skipped_total{sink="%s"}'
FAILED = 'mongocast_publish_failures_total{sink="%s"}'
AGE = 'mongocast_checkpoint_age_seconds{stream="%s"}'
CP_FAILED = 'mongocast_checkpoint_write_failures_total{stream="%s"}'


def test_events_out_per_sink_and_checkpoint_age(tmp_path, daemons, mongo_uri, db, db_name):
    cp = tmp_path / "cp"
    cfg = server_config(tmp_path / "c.yaml", mongo_uri, {"orders": stream(db_name, "orders")},
                        sinks=[{"name": "out", "type": "stdout"}], checkpoint_dir=cp)
    d, port = start_server(daemons, cfg)
    ws = RawWS(port, "/v1/streams/orders")
    assert ws.recv_json()["type"] == "ready"

    db.orders.insert_many([{"_id": i} for i in range(5)])
    for _ in range(5):
        assert ws.recv_json()["type"] == "change"
    wait_for(lambda: metrics(port).get(OUT % "out", 0) >= 5, message="stdout sink counted")
    wait_for(lambda: checkpoint_token(cp, "orders") is not None, message="checkpoint written")
    wait_for(lambda: AGE % "orders" in metrics(port), message="checkpoint age exported")
    m = metrics(port)
    # stdout printed the five changes and skipped the ready message it does not print.
    assert m[OUT % "out"] == 5
    assert m[SKIPPED % "out"] == 1
    assert m[FAILED % "out"] == 0
    assert len(changes_of(d.messages())) == 5
    # The live fan-out took the ready message and the five changes.
    assert m[OUT % "live-clients"] == 6
    assert m[SKIPPED % "live-clients"] == 0
    # Existing per-transport delivery counters are still there (ready + 5 to one client).
    assert m['mongocast_deliveries_total{transport="ws"}'] >= 6
    # Checkpoints are written every 100 ms here: the last one is recent.
    assert 0 <= m[AGE % "orders"] < 5
    assert m[CP_FAILED % "orders"] == 0

    # Break the store: the age grows and failed writes are counted.
    shutil.rmtree(str(cp))
    cp.write_text("not a directory")
    db.orders.insert_one({"_id": 100})
    assert ws.recv_json()["type"] == "change"
    wait_for(lambda: metrics(port)[CP_FAILED % "orders"] >= 2, message="failed writes counted")
    time.sleep(1.2)
    broken = metrics(port)
    assert broken[AGE % "orders"] >= 1.0
    assert broken[OUT % "out"] == 6

    # Repair it: the next write brings the age back down and failures stop growing.
    cp.unlink()
    cp.mkdir()
    wait_for(lambda: metrics(port)[AGE % "orders"] < 1.0, message="age back to fresh")
    assert checkpoint_token(cp, "orders") is not None
    ws.close()
    assert d.stop() == 0
