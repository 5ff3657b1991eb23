"""Crash safety of `mongocast run`: SIGKILL at random moments while a writer inserts 20,000
documents, restart each time, and check the output against the checkpoint files.

Runs unchanged against a real replica set (MONGODB_URI): it only inserts and reads files.
"""

import random
import signal
import threading
import time

from daemon_util import *  # noqa: F401,F403

N_DOCS = 20000
BATCH = 250
KILLS = 4
SEED = 20240611


class Writer(threading.Thread):
    """Inserts {seq: 0..N-1} in order with insert_many batches; `done` counts inserted docs."""

    def __init__(self, coll):
        super().__init__(daemon=True)
        self.coll = coll
        self.done = 0
        self.error = None

    def run(self):
        try:
            for start in range(0, N_DOCS, BATCH):
                self.coll.insert_many([{"seq": i, "pad": "x" * 20}
                                       for i in range(start, min(N_DOCS, start + BATCH))])
                self.done = min(N_DOCS, start + BATCH)
                time.sleep(0.01)  # spread the load so that kills land mid-stream
        except Exception as e:  # reported by the test
            self.error = e


def test_sigkill_during_inserts_loses_nothing(tmp_path, daemons, mongo_uri, db, db_name):
    """Every insert reaches the output at least once, in order, and duplicates come only from
    after the last checkpoint.

    Setup: stream `s` on the written collection, file checkpoint store written every 150 ms,
    stdout sink into out-K.jsonl for run K (K = 0..4). Runs 0-3 are SIGKILLed when the writer
    has passed a random number of documents (seeded), run 4 is stopped with SIGTERM once
    everything arrived. Right after each kill, the stdout sink's checkpoint file (s@out.json)
    is read: that token T_k is the last position run k stored for the sink, and the one run
    k+1 resumes it from. The stream's own record (s.json, the oldest of its sinks') must never
    lie ahead of it.

    Ordering: event ids (`_id._data`, the resume token) are KeyString hex, whose string order is
    the oplog order (clusterTime first), and a checkpoint token compares the same way whether it
    is an event's id or a post-batch high-water mark.

    Assertions:
      1. Completeness: the union of all runs holds every seq 0..19,999.
      2. Order: within each run, seqs strictly increase (one document per seq, so this is the
         per-document order too); the first occurrences across runs form 0..19,999 in order.
      3. The checkpoint never covers an unprinted event: every event whose id <= T_k was printed
         by some run <= k (printed = a complete JSON line in that run's output).
      4. Duplicates only since the last checkpoint: no event printed after restart k has
         id <= T_k, and the first event printed after restart k is exactly the first event
         (over all runs) whose id > T_k: resuming neither skips nor goes back.
      A torn last line (SIGKILL during write(2)) is allowed once per killed run and counts as
      not printed.
    """
    rng = random.Random(SEED)
    cp = tmp_path / "cp"
    cfg = write_config(tmp_path / "c.yaml", mongo_uri,
                       {"s": {"db": db_name, "collection": "c", "max_await_time_ms": 100,
                              "batch_size": 500}},
                       checkpoint_dir=cp, interval_ms=150)
    db.create_collection("c")
    writer = Writer(db.c)
    step = N_DOCS // (KILLS + 1)
    thresholds = [rng.randint(k * step + step // 4, (k + 1) * step - step // 4)
                  for k in range(KILLS)]
    extra_delays = [rng.uniform(0.0, 0.25) for _ in range(KILLS)]
    tokens = []  # T_k
    outs = []
    for run in range(KILLS + 1):
        out = tmp_path / ("out-%d.jsonl" % run)
        outs.append(out)
        d = daemons(cfg, name="run%d" % run, stdout_path=out)
        d.wait_open()
        if run == 0:
            writer.start()
        if run == KILLS:
            break
        # Restarting from "now" without any stored position would be data loss by design, so
        # the first kill waits until a first position is stored.
        wait_for(lambda: checkpoint_token(cp, "s", "out"), timeout=30,
                 message="a first checkpoint")
        wait_for(lambda: writer.done >= thresholds[run] or writer.error or
                 writer.done >= N_DOCS, timeout=120, message="writer progress")
        time.sleep(extra_delays[run])
        assert d.kill() == -signal.SIGKILL
        tokens.append(checkpoint_token(cp, "s", "out"))
        stream_tok = checkpoint_token(cp, "s")
        assert stream_tok and stream_tok <= tokens[-1], (stream_tok, tokens[-1])

    writer.join(180)
    assert writer.error is None, writer.error
    assert not writer.is_alive()

    def printed_runs():
        runs = []
        for k, path in enumerate(outs):
            msgs, torn = read_jsonl(path)
            runs.append((changes_of(msgs, "s"), torn))
        return runs

    def union_seqs():
        return {m["change"]["fullDocument"]["seq"] for r, _ in printed_runs() for m in r}

    wait_for(lambda: len(union_seqs()) >= N_DOCS, timeout=180, interval=0.5,
             message="all %d inserts in the output" % N_DOCS)
    time.sleep(0.5)
    assert d.stop(signal.SIGTERM) == 0

    runs = printed_runs()
    # Torn lines only at the very end of a killed run's file, at most one.
    for k, (_, torn) in enumerate(runs):
        assert len(torn) <= (1 if k < KILLS else 0), "run %d: torn lines %r" % (k, torn)
        if torn:
            text = outs[k].read_text()
            assert text.endswith(torn[0]), "run %d: a torn line that is not the last" % k

    # 1. completeness
    all_seqs = union_seqs()
    assert all_seqs == set(range(N_DOCS)), "missing seqs: %s" % sorted(
        set(range(N_DOCS)) - all_seqs)[:20]
    # 2. order
    first_seen = []
    seen = set()
    for k, (msgs, _) in enumerate(runs):
        s = [m["change"]["fullDocument"]["seq"] for m in msgs]
        assert all(a < b for a, b in zip(s, s[1:])), "run %d printed out of order" % k
        for x in s:
            if x not in seen:
                seen.add(x)
                first_seen.append(x)
    assert first_seen == list(range(N_DOCS))

    # Every distinct event (id -> seq), in id order.
    events = {}
    for msgs, _ in runs:
        for m in msgs:
            events[m["id"]] = m["change"]["fullDocument"]["seq"]
    ids_sorted = sorted(events)
    assert [events[i] for i in ids_sorted] == list(range(N_DOCS)), "id order != insert order"

    duplicates = 0
    for k, tok in enumerate(tokens):
        assert tok, "no checkpoint after kill %d" % k
        printed_upto_k = {m["id"] for msgs, _ in runs[:k + 1] for m in msgs}
        # 3. nothing at or before the checkpoint was left unprinted
        covered = [i for i in ids_sorted if i <= tok]
        unprinted = [events[i] for i in covered if i not in printed_upto_k]
        assert not unprinted, ("kill %d: checkpoint %s covers seqs never printed before the "
                               "kill: %s" % (k, tok, unprinted[:10]))
        # 4. after restart k: strictly after the checkpoint, starting right after it
        after = [m["id"] for msgs, _ in runs[k + 1:] for m in msgs]
        assert after, "nothing printed after restart %d" % k
        behind = [events[i] for i in after if i <= tok]
        assert not behind, "restart %d re-sent events at or before its checkpoint: %s" % (
            k, behind[:10])
        successor = next(i for i in ids_sorted if i > tok)
        assert after[0] == successor, (
            "restart %d resumed at seq %d, expected seq %d (first event after the checkpoint)"
            % (k, events[after[0]], events[successor]))
        duplicates += len({m["id"] for m in runs[k + 1][0]} & printed_upto_k)
    # Not an assertion on a number chosen in advance: recorded for the reader of the log.
    print("kills at writer progress %s; duplicates after restarts: %d" % (thresholds, duplicates))
