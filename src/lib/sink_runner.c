/*
 * sink_runner.c: one runner per sink instance: a bounded queue of event references, in-order
 * delivery through the sink's publish()/flush(), acknowledgements, retries with capped
 * full-jitter backoff, error classes (transient -> retry; permanent -> dead letter or the
 * sink fails), the per-stream "complete" positions the ledger stores, detaching when the
 * queue passes its bound, and the three executors that drive it.
 *
 * Threads:
 *   - producers: the stream watchers (mc__runner_push, through router.c: never blocks) and
 *     the runner's own catch-up threads (mc__runner_push_wait, which waits for room);
 *   - the executor, exactly one thread at a time: the runner's own thread (MC__EXEC_THREAD),
 *     the engine's I/O loop thread (MC__EXEC_LOOP, ioloop.c) or the embedder's dispatch thread
 *     (MC__EXEC_EXTERNAL, mc_engine_dispatch()). Only it calls the sink's publish, flush,
 *     drain and stop;
 *   - any thread: acks and failures from the sink (sink.c), detaching (the router) and
 *     failing (a catch-up thread), the ledger (checkpoint thread), status readers.
 * One mutex guards the ring and the state; the executor never holds it while a sink callback
 * runs, and takes it once per batch on the fast path (per event only when something failed).
 *
 * The ring, from head: [published, waiting for completion][unpublished]. `npub` entries are
 * published; an entry is DONE when published and (durable sinks) acked or (others) flushed
 * without a reported failure, or skipped, dead-lettered or a mark. Completed entries retire
 * from the head only, so a slot's `done` position is always a prefix: everything of that
 * stream up to it is complete. A transient failure of an entry rewinds `npub` to it, so it
 * and everything after it are offered again, in order.
 * Invariants: npub <= busy_end <= count <= cap. [npub, busy_end) is the batch the executor is
 * publishing outside the lock: nobody else moves or drops those entries, and only the
 * executor rewinds `npub`. Entries at or after `busy_end` may be dropped by any thread under
 * the lock (a detach, a failure). A slot that does not `accept` gets no shared-path entries.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "engine_private.h"

#define BATCH 256
#define LINGER_US 250     /* as the old consumer thread: at most this much added latency */
#define WAKE_AT_ITEMS 64  /* a lingering runner is woken once this many items wait */
#define BUSY_INITIAL_MS 1 /* MC_EAGAIN: a short backoff, the sink is only full */
#define BUSY_MAX_MS 100
#define STALL_MS 1000    /* external executor: how long stop waits for a silent loop */
#define ACK_SCAN_HEAD 64 /* acks look this far from the head before scanning from the tail */

enum {
    RF_PUBLISHED = 0x01,
    RF_ACKED = 0x02,
    RF_DONE = 0x04,
    RF_FAIL_T = 0x08,
    RF_FAIL_P = 0x10,
    RF_CATCHUP = 0x20, /* pushed by a catch-up thread: kept when the runner detaches again */
};

typedef struct rentry {
    mc__pref_t p;
    uint16_t slot;
    uint8_t flags;
} rentry_t;

typedef struct rslot {
    int stream_index;
    bool accept; /* the shared path may push this stream's items */
    bool catching_up;
    mc__pref_t done;         /* newest complete item with a token */
    uint64_t done_seq;       /* seq of the newest complete shared-path event */
    bool dirty;              /* done moved since the ledger took it */
    _Atomic uint64_t missed; /* items the shared path could not hand over (lag estimate) */
    bool fenced;             /* lease: another node feeds this stream (lease.c) */
    atomic_int catchups;     /* catch-up threads of this slot still running (watcher.c) */
} rslot_t;

typedef enum wait_state {
    W_RUNNING = 0, /* not waiting: producers need not signal */
    W_IDLE,        /* waiting for the next item: every push signals */
    W_LINGER,      /* waiting (timed) for a batch: pushes signal from WAKE_AT_ITEMS on */
    W_TIMED,       /* waiting for a retry: pushes do not signal */
} wait_state_t;

typedef enum outcome {
    O_PUB = 0, /* publish() accepted it */
    O_SKIP,    /* MC_SINK_SKIP */
    O_MARK,    /* a position without an event, or an entry acked before a rewind: no call */
    O_GONE,    /* given up (dead-lettered or dropped): complete */
} outcome_t;

struct mc__runner {
    mc_sink_t *sink;
    mc_engine_t *engine;
    const mc_sink_type_t *type;
    mc__exec_t exec;
    bool durable, live, v2;

    pthread_mutex_t lock;
    pthread_cond_t cond; /* the thread executor waits here; stop waits for `finished` */
    pthread_cond_t room; /* producers waiting for room; broadcast when entries retire */
    rentry_t *ring;
    uint32_t cap, head, count, npub;
    uint32_t busy_end; /* end of the batch the executor publishes (npub when idle) */
    uint32_t reserve;  /* catch-up pushes leave this much room to the shared path */
    rslot_t *slots;
    int n_slots;
    int *slot_of; /* [engine n_streams] -> slot or -1 */
    wait_state_t waiting;

    /* Retry of the first unpublished entry (executor; read under the lock). `attempts` counts
     * the failures of one entry and goes back to 0 only when that entry completes (acked,
     * flushed, skipped or dead-lettered): `retired` counts entries ever retired, and the failed
     * entry is complete once it reaches `fail_mark`. An accepted publish() is not a success
     * for a durable sink, whose failure may still come in a callback. `busy` (MC_EAGAIN) is
     * flow control, not failure, and is reset by any accepted publish() (executor only). */
    mc__backoff_t backoff, busy;
    uint32_t attempts;
    uint64_t retired, fail_mark;
    int64_t first_fail_ms;
    bool retry_pending;
    int64_t retry_at;
    int64_t hint_ms;                /* Retry-After asked by mc_sink_fail() */
    _Atomic uint32_t fails_pending; /* entries flagged RF_FAIL_* not handled yet */
    uint32_t ack_hint;              /* ring index after the last entry an ack found */
    char last_error[256];

    mc_sink_state_t state;
    char message[256];
    bool failed;

    /* Stop. */
    bool stopping;
    _Atomic int64_t deadline;
    bool drain_called;
    bool stop_called;
    bool finished;
    int drain_rc;

    pthread_t thread;
    bool thread_started;
    uv_async_t async;
    uv_timer_t timer;
    bool handles; /* async/timer initialised on the I/O loop */
    int handles_closed;
    mc__dead_letter_t *dl;
    mc_log_ratelimit_t rl;
};

static rentry_t *entry_at(mc__runner_t *r, uint32_t i)
{
    return &r->ring[(r->head + i) % r->cap];
}

/* The position of `e` from the head of the queue. */
static uint32_t index_of(const mc__runner_t *r, const rentry_t *e)
{
    return (uint32_t)(((uint32_t)(e - r->ring) + r->cap - r->head) % r->cap);
}

static void bump(_Atomic uint64_t *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static const char *stream_name(const mc__runner_t *r, int slot)
{
    return r->engine->streams[r->slots[slot].stream_index].cfg->name;
}

/* ---- Construction ---------------------------------------------------------------------------- */

mc__runner_t *mc__runner_new(mc_sink_t *sink, mc__exec_t exec, uint32_t capacity, mc_error_t *err)
{
    mc_engine_t *e = sink->engine;
    mc__runner_t *r = calloc(1, sizeof(*r));
    if (!r) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    r->sink = sink;
    r->engine = e;
    r->type = sink->type;
    r->exec = exec;
    r->durable = (sink->type->flags & MC_SINK_DURABLE) != 0;
    r->live = (sink->type->flags & MC_SINK_LIVE) != 0 && sink->type->abi_version >= 2;
    r->v2 = sink->type->abi_version >= 2;
    r->cap = capacity ? capacity : 1;
    r->reserve = r->cap >= 4 ? r->cap / 4 : 0;
    r->ring = calloc(r->cap, sizeof(rentry_t));
    r->slot_of = malloc((e->n_streams ? e->n_streams : 1) * sizeof(int));
    int n = 0;
    for (size_t i = 0; i < e->n_streams; i++) {
        n += sink->takes_stream[i];
    }
    r->slots = calloc(n ? (size_t)n : 1, sizeof(rslot_t));
    if (!r->ring || !r->slot_of || !r->slots) {
        free(r->ring);
        free(r->slot_of);
        free(r->slots);
        free(r);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < e->n_streams; i++) {
        r->slot_of[i] = -1;
        if (sink->takes_stream[i]) {
            rslot_t *s = &r->slots[r->n_slots];
            s->stream_index = (int)i;
            s->accept = true;
            atomic_init(&s->missed, 0);
            atomic_init(&s->catchups, 0);
            r->slot_of[i] = r->n_slots++;
        }
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &ca);
    pthread_cond_init(&r->room, &ca);
    pthread_condattr_destroy(&ca);
    uint64_t seed = (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)r;
    mc__backoff_init(&r->backoff, sink->ropts.retry_initial_ms, sink->ropts.retry_max_ms, seed);
    mc__backoff_init(&r->busy, BUSY_INITIAL_MS, BUSY_MAX_MS, seed ^ 0x5bd1e995u);
    atomic_init(&r->fails_pending, 0);
    atomic_init(&r->deadline, 0);
    r->state = MC_SINK_IDLE;
    r->rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    return r;
}

void mc__runner_destroy(mc__runner_t *r)
{
    if (!r) {
        return;
    }
    for (uint32_t i = 0; i < r->count; i++) {
        mc__pref_clear(&entry_at(r, i)->p);
    }
    for (int k = 0; k < r->n_slots; k++) {
        mc__pref_clear(&r->slots[k].done);
    }
    mc__dead_letter_close(r->dl);
    pthread_cond_destroy(&r->cond);
    pthread_cond_destroy(&r->room);
    pthread_mutex_destroy(&r->lock);
    free(r->ring);
    free(r->slots);
    free(r->slot_of);
    free(r);
}

mc_sink_t *mc__runner_sink(const mc__runner_t *r)
{
    return r->sink;
}

mc__exec_t mc__runner_exec(const mc__runner_t *r)
{
    return r->exec;
}

bool mc__runner_live(const mc__runner_t *r)
{
    return r->live;
}

int mc__runner_slot(const mc__runner_t *r, int stream_index)
{
    if (stream_index < 0 || (size_t)stream_index >= r->engine->n_streams) {
        return -1;
    }
    return r->slot_of[stream_index];
}

/* ---- State ----------------------------------------------------------------------------------- */

static void set_state_locked(mc__runner_t *r, mc_sink_state_t st, const char *msg)
{
    r->state = st;
    bson_strncpy(r->message, msg ? msg : "", sizeof(r->message));
}

/* The state that follows from the flags, once nothing special is going on. */
static void settle_state_locked(mc__runner_t *r)
{
    if (r->failed || r->state == MC_SINK_STOPPED) {
        return;
    }
    int fenced = 0;
    for (int k = 0; k < r->n_slots; k++) {
        if (r->slots[k].catching_up) {
            set_state_locked(r, MC_SINK_CATCHING_UP, "detached: catching up on its own cursor");
            return;
        }
        fenced += r->slots[k].fenced;
    }
    if (fenced > 0 && fenced == r->n_slots) {
        set_state_locked(r, MC_SINK_STANDBY, "another node holds the lease of its streams");
        return;
    }
    if (r->retry_pending && r->attempts > 0) {
        char msg[300];
        snprintf(msg, sizeof(msg), "retrying (attempt %u): %s", r->attempts + 1, r->last_error);
        set_state_locked(r, MC_SINK_RETRYING, msg);
        return;
    }
    set_state_locked(r, MC_SINK_RUNNING, NULL);
}

/* ---- Executor wake-ups ----------------------------------------------------------------------- */

/* After a push (lock held): wakes the executor when it waits for this. Returns true when the
 * caller must notify an external or loop executor (outside the lock). */
static bool wake_after_push_locked(mc__runner_t *r)
{
    uint32_t unpub = r->count - r->npub;
    switch (r->exec) {
    case MC__EXEC_THREAD:
        if (r->waiting == W_IDLE || (r->waiting == W_LINGER && unpub >= WAKE_AT_ITEMS)) {
            r->waiting = W_RUNNING;
            pthread_cond_signal(&r->cond);
        }
        return false;
    case MC__EXEC_LOOP:
    case MC__EXEC_EXTERNAL: return unpub == 1;
    }
    return false;
}

static void notify_executor(mc__runner_t *r)
{
    if (r->exec == MC__EXEC_LOOP && r->handles) {
        uv_async_send(&r->async);
    } else if (r->exec == MC__EXEC_EXTERNAL && r->engine->opts.notify) {
        r->engine->opts.notify(r->engine, r->engine->opts.notify_userdata);
    }
}

/* Wakes the executor whatever it waits for (detach, failure, stop). Lock held. */
static bool kick_locked(mc__runner_t *r)
{
    if (r->exec == MC__EXEC_THREAD) {
        r->waiting = W_RUNNING;
        pthread_cond_broadcast(&r->cond);
        return false;
    }
    return true;
}

/* ---- Producers ------------------------------------------------------------------------------- */

static void append_locked(mc__runner_t *r, int slot, mc__pref_t *item, uint8_t flags)
{
    rentry_t *e = entry_at(r, r->count);
    e->p = *item;
    item->ev = NULL;
    item->mark = NULL;
    e->slot = (uint16_t)slot;
    e->flags = flags;
    r->count++;
}

int mc__runner_push(mc__runner_t *r, int slot, mc__pref_t *item)
{
    pthread_mutex_lock(&r->lock);
    if (!r->slots[slot].accept || r->failed) {
        pthread_mutex_unlock(&r->lock);
        return MC_ECLOSED;
    }
    if (r->count >= r->cap) {
        pthread_mutex_unlock(&r->lock);
        return MC_EAGAIN;
    }
    append_locked(r, slot, item, 0);
    bool notify = wake_after_push_locked(r);
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
    return 0;
}

int mc__runner_push_wait(mc__runner_t *r, int slot, mc__pref_t *item, int64_t timeout_ms,
                         bool catchup)
{
    int64_t end = mc__now_ms() + timeout_ms;
    int rc = 0;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        if (r->failed || r->stopping || (!catchup && !r->slots[slot].accept) ||
            (catchup && !r->slots[slot].catching_up)) {
            rc = MC_ECLOSED;
            break;
        }
        uint32_t limit = catchup ? r->cap - r->reserve : r->cap;
        if (r->count < limit) {
            append_locked(r, slot, item, catchup ? RF_CATCHUP : 0);
            break;
        }
        int64_t left = end - mc__now_ms();
        if (left <= 0) {
            rc = MC_EAGAIN;
            break;
        }
        struct timespec ts;
        mc__deadline_after_ms(&ts, left < 200 ? left : 200);
        pthread_cond_timedwait(&r->room, &r->lock, &ts);
        if (atomic_load(&r->engine->stopping) && catchup) {
            rc = MC_ECLOSED;
            break;
        }
    }
    bool notify = rc == 0 && wake_after_push_locked(r);
    if (rc == 0 && catchup) {
        /* One item of what the shared path skipped has now been read again. */
        uint64_t m = atomic_load(&r->slots[slot].missed);
        if (m > 0) {
            atomic_store(&r->slots[slot].missed, m - 1);
        }
    }
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
    return rc;
}

static void detach_locked(mc__runner_t *r);

void mc__runner_request_detach(mc__runner_t *r)
{
    if (r->live) {
        return;
    }
    /* Right here, on the router's thread: the executor may be stuck in publish() for good,
     * and the queue must be freed all the same. */
    pthread_mutex_lock(&r->lock);
    detach_locked(r);
    pthread_mutex_unlock(&r->lock);
}

void mc__runner_begin_copy(mc__runner_t *r, int slot)
{
    pthread_mutex_lock(&r->lock);
    r->slots[slot].accept = false;
    r->slots[slot].catching_up = true;
    settle_state_locked(r);
    pthread_mutex_unlock(&r->lock);
}

void mc__runner_missed(mc__runner_t *r, int slot)
{
    atomic_fetch_add(&r->slots[slot].missed, 1);
}

void mc__runner_rejoin(mc__runner_t *r, int slot)
{
    pthread_mutex_lock(&r->lock);
    rslot_t *s = &r->slots[slot];
    bool was = s->catching_up;
    s->accept = !r->failed && !s->fenced;
    s->catching_up = false;
    atomic_store(&s->missed, 0);
    settle_state_locked(r);
    pthread_mutex_unlock(&r->lock);
    if (was) {
        mc_log(MC_LOG_NOTICE, "runner", "sink rejoined the shared path sink=%s stream=%s",
               r->sink->name, stream_name(r, slot));
    }
}

/* ---- Completion ------------------------------------------------------------------------------ */

/* Retires complete entries from the head into their slot's `done` position. Lock held. */
static void retry_over_locked(mc__runner_t *r);

static void retire_locked(mc__runner_t *r)
{
    /* While the executor publishes a batch outside the lock ([npub, busy_end)), it addresses
     * entries by their index from the head: retiring would shift them under it (an ack from
     * another thread, e.g. a libnats PubAck, during a batch). The executor retires after the
     * batch. */
    if (r->busy_end > r->npub) {
        return;
    }
    bool retired = false;
    while (r->count > 0) {
        rentry_t *e = entry_at(r, 0);
        if (!(e->flags & RF_DONE)) {
            break;
        }
        rslot_t *s = &r->slots[e->slot];
        if (e->p.ev && mc_event_seq(e->p.ev) > 0) {
            s->done_seq = mc_event_seq(e->p.ev);
        }
        if (mc__pref_data(&e->p) || (e->p.ev && mc_event_resume_token(e->p.ev)) || e->p.mark) {
            mc__pref_move(&s->done, &e->p);
            s->dirty = true;
        } else {
            /* ready / reset carry no position: the slot's position stays where it was. */
            mc__pref_clear(&e->p);
        }
        e->flags = 0;
        r->head = (r->head + 1) % r->cap;
        r->count--;
        r->npub--;
        r->busy_end--;
        r->retired++;
        retired = true;
    }
    if (retired && r->attempts > 0 && r->retired >= r->fail_mark) {
        retry_over_locked(r);
    }
    if (retired) {
        pthread_cond_broadcast(&r->room);
        if (r->stopping) {
            pthread_cond_broadcast(&r->cond);
        }
    }
}

static rentry_t *find_event_locked(mc__runner_t *r, const mc_event_t *ev, int slot, uint64_t seq)
{
    uint32_t n = r->count;
    if (ev && n > ACK_SCAN_HEAD) {
        /* Acks of a sink with many events in flight tend to follow the previous one (a batch,
         * or keys served in turn): look right after it first, so that they stay O(1) however
         * deep the ring is. */
        uint32_t from = (r->ack_hint + r->cap - r->head) % r->cap;
        for (uint32_t k = from; k < n && k < from + ACK_SCAN_HEAD; k++) {
            rentry_t *e = entry_at(r, k);
            if (e->p.ev == ev) {
                r->ack_hint = (r->head + k + 1) % r->cap;
                return e;
            }
        }
    }
    /* Acks and failures concern published entries (or the batch being published): search
     * [0, pub) first, the first few from the head (in-order acks), then the rest from its end
     * (a sink acking newest first, or acks racing ahead of a slow head); only then the
     * unpublished rest. A long queue behind a window of entries in flight then costs
     * nothing per ack. */
    uint32_t pub = r->busy_end < n ? r->busy_end : n;
    uint32_t front = pub < ACK_SCAN_HEAD ? pub : ACK_SCAN_HEAD;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = i >= pub ? i : i < front ? i : pub - 1 - (i - front);
        rentry_t *e = entry_at(r, k);
        if (!e->p.ev) {
            continue;
        }
        if (ev ? e->p.ev == ev : (e->slot == slot && mc_event_seq(e->p.ev) == seq)) {
            r->ack_hint = (r->head + k + 1) % r->cap;
            return e;
        }
    }
    return NULL;
}

void mc__runner_ack(mc__runner_t *r, const mc_event_t *ev, int stream_index, uint64_t seq)
{
    if (!r || !r->durable) {
        return;
    }
    int slot = ev ? -1 : mc__runner_slot(r, stream_index);
    if (!ev && (slot < 0 || seq == 0)) {
        return;
    }
    pthread_mutex_lock(&r->lock);
    rentry_t *e = find_event_locked(r, ev, slot, seq);
    bool notify = false;
    if (e && !(e->flags & RF_ACKED)) {
        e->flags |= RF_ACKED;
        atomic_fetch_add_explicit(&r->sink->stat_acked, 1, memory_order_relaxed);
        if ((e->flags & RF_PUBLISHED) && !(e->flags & (RF_FAIL_T | RF_FAIL_P))) {
            e->flags |= RF_DONE;
            retire_locked(r);
        }
        notify = r->stopping && kick_locked(r);
    }
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
}

int mc__runner_fail(mc__runner_t *r, const mc_event_t *ev, mc_sink_error_class_t cls,
                    int64_t retry_after_ms, const char *message)
{
    int rc = cls == MC_SINK_PERMANENT ? MC_EINVAL : MC_EIO;
    if (!r || !ev) {
        return rc;
    }
    pthread_mutex_lock(&r->lock);
    rentry_t *e = find_event_locked(r, ev, -1, 0);
    bool notify = false;
    if (e && !(e->flags & (RF_DONE | RF_FAIL_T | RF_FAIL_P))) {
        e->flags |= cls == MC_SINK_PERMANENT ? RF_FAIL_P : RF_FAIL_T;
        atomic_fetch_add(&r->fails_pending, 1);
        bson_strncpy(r->last_error, message ? message : "", sizeof(r->last_error));
        if (retry_after_ms > r->hint_ms) {
            r->hint_ms = retry_after_ms;
        }
        notify = kick_locked(r);
    }
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
    return rc;
}

/* ---- Failure handling (executor) ------------------------------------------------------------- */

static void drop_unpublished_locked(mc__runner_t *r, bool keep_catchup)
{
    uint32_t keep = r->busy_end;
    for (uint32_t i = r->busy_end; i < r->count; i++) {
        rentry_t *e = entry_at(r, i);
        if (keep_catchup && (e->flags & RF_CATCHUP) && r->slots[e->slot].catching_up) {
            if (keep != i) {
                *entry_at(r, keep) = *e;
                e->p.ev = NULL;
                e->p.mark = NULL;
            }
            keep++;
            continue;
        }
        if (e->p.ev) {
            atomic_fetch_add(&r->slots[e->slot].missed, 1);
        }
        if (e->flags & (RF_FAIL_T | RF_FAIL_P)) {
            atomic_fetch_sub(&r->fails_pending, 1);
        }
        mc__pref_clear(&e->p);
        e->flags = 0;
    }
    r->count = keep;
    pthread_cond_broadcast(&r->room);
}

static void fail_locked(mc__runner_t *r, const char *msg)
{
    if (r->failed) {
        return;
    }
    r->failed = true;
    r->retry_pending = false;
    /* What the executor is not publishing right now goes at once; the rest when its batch
     * ends. */
    drop_unpublished_locked(r, false);
    for (int k = 0; k < r->n_slots; k++) {
        r->slots[k].accept = false;
        r->slots[k].catching_up = false;
    }
    set_state_locked(r, MC_SINK_FAILED, msg);
    pthread_cond_broadcast(&r->cond);
    mc_log(MC_LOG_ERROR, "runner", "sink failed sink=%s%s: %s", r->sink->name,
           r->durable ? " (durable: the engine is not ready)" : "", msg);
}

void mc__runner_fail_all(mc__runner_t *r, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&r->lock);
    fail_locked(r, msg);
    bool notify = kick_locked(r);
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
}

/* Whether a transient failure of the first unpublished entry has run out of attempts. */
static bool retries_exhausted_locked(mc__runner_t *r, int64_t now)
{
    const mc_sink_runner_opts_t *o = &r->sink->ropts;
    if (o->max_attempts && r->attempts + 1 >= o->max_attempts) {
        return true;
    }
    return o->max_retry_ms && r->attempts > 0 && now - r->first_fail_ms >= o->max_retry_ms;
}

/* Schedules the next offer of the first unpublished entry: after a failure of entry `failed`,
 * or after a busy answer (`failed` NULL). Lock held. */
static void schedule_retry_locked(mc__runner_t *r, const rentry_t *failed)
{
    int64_t now = mc__now_ms();
    int64_t delay;
    if (!failed) {
        delay = mc__backoff_next(&r->busy);
    } else {
        if (r->attempts == 0) {
            r->first_fail_ms = now;
        }
        r->attempts++;
        r->fail_mark = r->retired + index_of(r, failed) + 1;
        delay = mc__backoff_next(&r->backoff);
        if (r->hint_ms > delay) {
            delay = r->hint_ms;
        }
        r->hint_ms = 0;
        mc_log_ratelimited(&r->rl, MC_LOG_WARN, "runner",
                           "delivery failed sink=%s attempt=%u retry_in_ms=%" PRId64 ": %s",
                           r->sink->name, r->attempts, delay, r->last_error);
    }
    bump(&r->sink->stat_retries, 1);
    r->retry_pending = true;
    r->retry_at = now + delay;
    settle_state_locked(r);
}

/* The entry whose failures `attempts` counted is complete (any thread that retires, lock
 * held): the next failure starts a new count. */
static void retry_over_locked(mc__runner_t *r)
{
    if (r->attempts == 0) {
        return;
    }
    r->attempts = 0;
    mc__backoff_reset(&r->backoff);
    settle_state_locked(r);
    mc_log(MC_LOG_NOTICE, "runner", "sink goes on delivering sink=%s", r->sink->name);
}

/* The failed entry was given up for good (executor, lock held). */
static void gave_up_locked(mc__runner_t *r)
{
    retry_over_locked(r);
    r->retry_pending = false;
    mc__backoff_reset(&r->busy);
}

/* A permanent failure of `ev` (the executor holds a reference): dead letter, or the sink fails.
 * Called without the lock. Returns true when the event was dead-lettered (it is complete). */
static bool give_up_event(mc__runner_t *r, mc_event_t *ev, const char *reason, uint32_t attempts)
{
    if (r->dl) {
        mc_error_t err = {0};
        if (mc__dead_letter_write(r->dl, r->sink->name, ev, reason, attempts, &err) == 0) {
            bump(&r->sink->stat_dead_letters, 1);
            bump(&r->sink->stat_failed, 1);
            mc_log_ratelimited(&r->rl, MC_LOG_WARN, "runner",
                               "event dead-lettered sink=%s stream=%s id=%s: %s", r->sink->name,
                               mc_event_stream(ev), mc_event_id(ev) ? mc_event_id(ev) : "-",
                               reason);
            return true;
        }
        mc__runner_fail_all(r, "cannot write the dead letter (%s) for a permanent failure: %s",
                            err.message, reason);
        bump(&r->sink->stat_failed, 1);
        return false;
    }
    bump(&r->sink->stat_failed, 1);
    mc__runner_fail_all(r, "permanent failure of event %s (stream %s; no dead_letter): %s",
                        mc_event_id(ev) ? mc_event_id(ev) : "-", mc_event_stream(ev), reason);
    return false;
}

/* give_up_event() for entry `e` with the lock held on entry and on return (released around
 * the dead letter's write; `e` stays put: only the executor removes entries). On success the
 * runner's retry state is reset for the next event. */
static bool give_up_locked(mc__runner_t *r, rentry_t *e)
{
    mc_event_t *ev = mc_event_ref(e->p.ev);
    char reason[256];
    bson_strncpy(reason, r->last_error, sizeof(reason));
    uint32_t attempts = r->attempts + 1;
    pthread_mutex_unlock(&r->lock);
    bool gone = give_up_event(r, ev, reason, attempts);
    mc_event_unref(&ev);
    pthread_mutex_lock(&r->lock);
    if (gone && !r->failed) {
        gave_up_locked(r);
    }
    return gone && !r->failed;
}

/* Handles failures reported for published entries (asynchronously, or during flush): the
 * first one in order decides. Lock held on entry and exit; may release it for a dead letter.
 * Returns true when it changed something. */
static bool handle_reported_failures_locked(mc__runner_t *r)
{
    if (atomic_load(&r->fails_pending) == 0 || r->failed) {
        return false;
    }
    for (uint32_t i = 0; i < r->npub; i++) {
        rentry_t *e = entry_at(r, i);
        if (!(e->flags & (RF_FAIL_T | RF_FAIL_P))) {
            continue;
        }
        bool permanent = (e->flags & RF_FAIL_P) != 0;
        int64_t now = mc__now_ms();
        if (!permanent && retries_exhausted_locked(r, now)) {
            permanent = true;
        }
        if (!permanent) {
            /* Offer it again, and everything published after it that is not acked. */
            for (uint32_t k = i; k < r->npub; k++) {
                rentry_t *x = entry_at(r, k);
                if (x->flags & (RF_FAIL_T | RF_FAIL_P)) {
                    atomic_fetch_sub(&r->fails_pending, 1);
                }
                x->flags &= (uint8_t) ~(RF_PUBLISHED | RF_DONE | RF_FAIL_T | RF_FAIL_P);
            }
            r->npub = i;
            r->busy_end = i; /* only called between batches */
            schedule_retry_locked(r, e);
            return true;
        }
        e->flags &= (uint8_t) ~(RF_FAIL_T | RF_FAIL_P);
        atomic_fetch_sub(&r->fails_pending, 1);
        if (give_up_locked(r, e)) {
            e->flags |= RF_DONE;
            retire_locked(r);
        }
        return true;
    }
    /* Flags on entries not published yet are read by the publish loop. */
    return false;
}

/* ---- Detach ---------------------------------------------------------------------------------- */

/* The newest entry of `slot` still held (published, or a kept catch-up entry), else the
 * slot's complete position: where its catch-up starts. Lock held. */
static void resume_point_locked(mc__runner_t *r, int slot, mc__pref_t *out)
{
    for (uint32_t i = r->count; i-- > 0;) {
        rentry_t *e = entry_at(r, i);
        if (e->slot == slot && (mc__pref_data(&e->p) || e->p.mark)) {
            mc__pref_copy(out, &e->p);
            return;
        }
    }
    mc__pref_copy(out, &r->slots[slot].done);
}

static void detach_locked(mc__runner_t *r)
{
    if (r->failed || r->live || r->stopping) {
        return;
    }
    bool any = false;
    for (int k = 0; k < r->n_slots; k++) {
        any |= r->slots[k].accept;
    }
    if (!any) {
        return;
    }
    /* Slots already catching up keep their catch-up entries; the others lose what the shared
     * path queued and not published yet, and read it again themselves. */
    drop_unpublished_locked(r, true);
    bump(&r->sink->stat_detaches, 1);
    for (int k = 0; k < r->n_slots; k++) {
        rslot_t *s = &r->slots[k];
        if (!s->accept) {
            continue;
        }
        s->accept = false;
        s->catching_up = true;
        mc__pref_t from = {0};
        resume_point_locked(r, k, &from);
        mc__stream_t *st = &r->engine->streams[s->stream_index];
        mc_log(MC_LOG_WARN, "runner",
               "sink detached: its queue passed max_lag_events=%u; it catches up on its own "
               "sink=%s stream=%s",
               r->cap, r->sink->name, st->cfg->name);
        if (mc__catchup_spawn(st, r, k, &from) != 0) {
            mc__pref_clear(&from);
            fail_locked(r, "cannot start a catch-up thread");
            return;
        }
    }
    settle_state_locked(r);
}

/* ---- Lease (lease.c) ------------------------------------------------------------------------- */

/* Drops the slot's entries that are not being published (at or after busy_end). Lock held. */
static void drop_slot_unpublished_locked(mc__runner_t *r, int slot)
{
    uint32_t keep = r->busy_end;
    for (uint32_t i = r->busy_end; i < r->count; i++) {
        rentry_t *e = entry_at(r, i);
        if (e->slot != slot) {
            if (keep != i) {
                *entry_at(r, keep) = *e;
                e->p.ev = NULL;
                e->p.mark = NULL;
            }
            keep++;
            continue;
        }
        if (e->flags & (RF_FAIL_T | RF_FAIL_P)) {
            atomic_fetch_sub(&r->fails_pending, 1);
        }
        mc__pref_clear(&e->p);
        e->flags = 0;
    }
    r->count = keep;
    if (r->npub > r->count) {
        r->npub = r->count;
    }
    pthread_cond_broadcast(&r->room);
}

static void fence_locked(mc__runner_t *r, int slot, const char *why)
{
    rslot_t *s = &r->slots[slot];
    bool was = s->fenced;
    s->fenced = true;
    s->accept = false;
    s->catching_up = false; /* its catch-up thread ends at its next push or rejoin */
    drop_slot_unpublished_locked(r, slot);
    settle_state_locked(r);
    if (!was && why) {
        mc_log(MC_LOG_NOTICE, "runner", "sink fenced sink=%s stream=%s: %s", r->sink->name,
               stream_name(r, slot), why);
    }
}

void mc__runner_fence(mc__runner_t *r, int slot, const char *why)
{
    if (!r || r->live || slot < 0 || slot >= r->n_slots) {
        return;
    }
    pthread_mutex_lock(&r->lock);
    fence_locked(r, slot, why);
    bool notify = kick_locked(r);
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
}

bool mc__runner_fenced(mc__runner_t *r, int slot)
{
    if (!r || slot < 0 || slot >= r->n_slots) {
        return false;
    }
    pthread_mutex_lock(&r->lock);
    bool f = r->slots[slot].fenced;
    pthread_mutex_unlock(&r->lock);
    return f;
}

int mc__runner_unfence(mc__runner_t *r, int slot, mc__pref_t *from)
{
    pthread_mutex_lock(&r->lock);
    rslot_t *s = &r->slots[slot];
    if (!s->fenced || r->failed || r->stopping) {
        pthread_mutex_unlock(&r->lock);
        mc__pref_clear(from);
        return 0;
    }
    if (atomic_load(&s->catchups) > 0) {
        pthread_mutex_unlock(&r->lock);
        return MC_EAGAIN;
    }
    /* What the previous holder stored is this slot's position now (the ledger writes it
     * again, harmlessly), and the catch-up reads from there. */
    mc__pref_t pos = {0};
    mc__pref_copy(&pos, from);
    mc__pref_move(&s->done, &pos);
    s->dirty = false;
    s->fenced = false;
    s->catching_up = true;
    mc__stream_t *st = &r->engine->streams[s->stream_index];
    int rc = mc__catchup_spawn(st, r, slot, from);
    if (rc != 0) {
        mc__pref_clear(from);
        fail_locked(r, "cannot start a catch-up thread");
    }
    settle_state_locked(r);
    pthread_mutex_unlock(&r->lock);
    mc_log(MC_LOG_NOTICE, "runner", "sink unfenced sink=%s stream=%s: catching up from the "
           "stored position", r->sink->name, st->cfg->name);
    return rc;
}

void mc__runner_catchup_enter(mc__runner_t *r, int slot)
{
    if (slot >= 0 && slot < r->n_slots) {
        atomic_fetch_add(&r->slots[slot].catchups, 1);
    }
}

void mc__runner_catchup_leave(mc__runner_t *r, int slot)
{
    if (slot >= 0 && slot < r->n_slots) {
        atomic_fetch_sub(&r->slots[slot].catchups, 1);
    }
}

/* The executor, when it takes a batch: fences the slots whose stream's lease ran out on this
 * node (the lease thread does it too, but it may be stuck in a request). Lock held. */
static void fence_expired_locked(mc__runner_t *r)
{
    int64_t now = mc__now_ms();
    for (int k = 0; k < r->n_slots; k++) {
        rslot_t *s = &r->slots[k];
        if (!s->fenced && !mc__stream_may_feed(&r->engine->streams[s->stream_index], now)) {
            fence_locked(r, k, "its lease ran out on this node");
        }
    }
}

/* ---- Publishing (executor) ------------------------------------------------------------------- */

/* What a publish() result means, given the entry's flags (lock held). Returns the outcome, or
 * -1 (stop the batch: busy or transient, retry scheduled), -2 (permanent: give up the event,
 * unlocked by the caller). */
static int classify_locked(mc__runner_t *r, rentry_t *e, int rc)
{
    uint8_t f = e->flags & (RF_FAIL_T | RF_FAIL_P);
    if (f) {
        e->flags &= (uint8_t) ~(RF_FAIL_T | RF_FAIL_P);
        atomic_fetch_sub(&r->fails_pending, 1);
        if (f & RF_FAIL_P || retries_exhausted_locked(r, mc__now_ms())) {
            return -2;
        }
        schedule_retry_locked(r, e);
        return -1;
    }
    if (rc == 0) {
        return O_PUB;
    }
    if (rc == MC_SINK_SKIP) {
        return O_SKIP;
    }
    if (rc == MC_EAGAIN) {
        schedule_retry_locked(r, NULL);
        return -1;
    }
    snprintf(r->last_error, sizeof(r->last_error), "publish returned %d (%s)", rc,
             rc < 0 ? mc_strerror(rc) : "undefined result");
    if (!r->durable) {
        bump(&r->sink->stat_failed, 1);
        mc_log_ratelimited(&r->rl, MC_LOG_WARN, "runner",
                           "publish failed sink=%s stream=%s seq=%" PRIu64 ": %s (dropped)",
                           r->sink->name, mc_event_stream(e->p.ev), mc_event_seq(e->p.ev),
                           r->last_error);
        return O_GONE;
    }
    if (retries_exhausted_locked(r, mc__now_ms())) {
        return -2;
    }
    schedule_retry_locked(r, e);
    return -1;
}

/* One batch: publish up to `budget` unpublished entries in order, flush, commit. Returns the
 * number of entries handled (0: nothing to do now). */
static size_t step(mc__runner_t *r, size_t budget)
{
    uint8_t outcome[BATCH];
    if (budget == 0 || budget > BATCH) {
        budget = BATCH;
    }
    pthread_mutex_lock(&r->lock);
    while (handle_reported_failures_locked(r)) {
    }
    if (r->failed) {
        if (r->count > r->npub) {
            drop_unpublished_locked(r, false);
        }
        pthread_mutex_unlock(&r->lock);
        return 0;
    }
    if (r->engine->lease && !r->live) {
        fence_expired_locked(r); /* the lease gate: nothing of a stream this node lost goes out */
    }
    if (r->retry_pending) {
        if (mc__now_ms() < r->retry_at) {
            pthread_mutex_unlock(&r->lock);
            return 0;
        }
        r->retry_pending = false;
    }
    uint32_t unpub = r->count - r->npub;
    uint32_t k = unpub < budget ? unpub : (uint32_t)budget;
    uint32_t start = r->npub;
    bool stopping_past = r->stopping && mc__now_ms() >= atomic_load(&r->deadline);
    /* Entries offered again after a rewind that the sink acked meanwhile are not sent twice. */
    bool acked[BATCH];
    for (uint32_t i = 0; i < k; i++) {
        acked[i] = (entry_at(r, start + i)->flags & RF_ACKED) != 0;
    }
    if (k > 0 && !stopping_past) {
        r->busy_end = start + k;
    }
    pthread_mutex_unlock(&r->lock);
    if (k == 0 || stopping_past) {
        return 0;
    }

    uint32_t j = 0;
    bool called = false;
    uint64_t published = 0, skipped = 0;
    for (; j < k; j++) {
        rentry_t *e = entry_at(r, start + j);
        if (e->p.mark || acked[j]) {
            outcome[j] = O_MARK;
            continue;
        }
        int rc = r->type->publish(r->sink, e->p.ev);
        called = true;
        if (atomic_load_explicit(&r->fails_pending, memory_order_acquire) == 0 &&
            (rc == 0 || rc == MC_SINK_SKIP)) {
            outcome[j] = rc == 0 ? O_PUB : O_SKIP;
            if (rc == 0) {
                published++;
            } else {
                skipped++;
            }
            if (r->busy.attempt > 0) {
                /* `busy` is written by this thread only (under the lock, for readers). An
                 * accepted publish() ends a busy spell, not a failure: see `attempts`. */
                pthread_mutex_lock(&r->lock);
                mc__backoff_reset(&r->busy);
                pthread_mutex_unlock(&r->lock);
            }
            continue;
        }
        pthread_mutex_lock(&r->lock);
        int o = classify_locked(r, e, rc);
        if (o == -2) {
            if (!give_up_locked(r, e)) {
                pthread_mutex_unlock(&r->lock);
                break; /* the sink failed: its queue is gone */
            }
            o = O_GONE;
        }
        if (o >= 0) {
            mc__backoff_reset(&r->busy);
        }
        pthread_mutex_unlock(&r->lock);
        if (o < 0) {
            break;
        }
        outcome[j] = (uint8_t)o;
        if (o == O_PUB) {
            published++;
        } else if (o == O_SKIP) {
            skipped++;
        }
    }
    if (called && r->type->flush) {
        r->type->flush(r->sink);
    }
    bump(&r->sink->stat_published, published);
    bump(&r->sink->stat_skipped, skipped);

    pthread_mutex_lock(&r->lock);
    for (uint32_t i = 0; i < j; i++) {
        rentry_t *e = entry_at(r, start + i);
        e->flags |= RF_PUBLISHED;
        if (outcome[i] != O_PUB) {
            e->flags |= RF_DONE;
        } else if (r->durable) {
            if ((e->flags & RF_ACKED) && !(e->flags & (RF_FAIL_T | RF_FAIL_P))) {
                e->flags |= RF_DONE;
            }
        } else if (!(e->flags & (RF_FAIL_T | RF_FAIL_P))) {
            e->flags |= RF_DONE; /* published and flushed */
        }
    }
    r->npub += j;
    r->busy_end = r->npub;
    if (r->failed) {
        /* What came before the failed event keeps its outcome; the failed event and the rest
         * of the queue go: the stored position never covers them. */
        retire_locked(r);
        drop_unpublished_locked(r, false);
        pthread_mutex_unlock(&r->lock);
        return j;
    }
    handle_reported_failures_locked(r);
    retire_locked(r);
    pthread_mutex_unlock(&r->lock);
    return j;
}

/* ---- Stop helpers ---------------------------------------------------------------------------- */

/* Whether the executor may stop publishing: nothing unpublished is deliverable any more. */
static bool publishing_over_locked(mc__runner_t *r, int64_t now)
{
    int64_t deadline = atomic_load(&r->deadline);
    return r->failed || r->count == r->npub || now >= deadline ||
           (r->retry_pending && r->retry_at >= deadline);
}

/* Calls drain once (lock released around it). */
static void call_drain_locked(mc__runner_t *r)
{
    if (r->drain_called) {
        return;
    }
    r->drain_called = true;
    if (r->sink->started && r->type->drain) {
        int64_t deadline = atomic_load(&r->deadline);
        pthread_mutex_unlock(&r->lock);
        int rc = r->type->drain(r->sink, deadline);
        pthread_mutex_lock(&r->lock);
        r->drain_rc = rc;
    }
}

static void call_stop_locked(mc__runner_t *r)
{
    if (r->stop_called) {
        return;
    }
    r->stop_called = true;
    if (r->v2 && r->sink->started && r->type->stop) {
        pthread_mutex_unlock(&r->lock);
        r->type->stop(r->sink);
        pthread_mutex_lock(&r->lock);
    }
}

static void finish_locked(mc__runner_t *r)
{
    r->finished = true;
    pthread_cond_broadcast(&r->cond);
    pthread_cond_broadcast(&r->room);
}

/* ---- Thread executor ------------------------------------------------------------------------- */

static void *runner_main(void *arg)
{
    mc__runner_t *r = arg;
    mc__thread_name("mcsink:", r->sink->name);
    bool lingered = false;
    for (;;) {
        size_t n = step(r, BATCH);
        pthread_mutex_lock(&r->lock);
        if (n > 0 || (atomic_load(&r->fails_pending) > 0 && !r->failed) ||
            (r->failed && r->count > r->npub)) {
            lingered = false;
            pthread_mutex_unlock(&r->lock);
            continue;
        }
        int64_t now = mc__now_ms();
        if (r->stopping && publishing_over_locked(r, now)) {
            call_drain_locked(r);
            /* Wait for the acks of what was published, up to the deadline. */
            while (r->count > 0 && r->npub == r->count && !r->failed &&
                   mc__now_ms() < atomic_load(&r->deadline)) {
                struct timespec ts;
                mc__deadline_after_ms(&ts, atomic_load(&r->deadline) - mc__now_ms());
                pthread_cond_timedwait(&r->cond, &r->lock, &ts);
            }
            call_stop_locked(r);
            finish_locked(r);
            pthread_mutex_unlock(&r->lock);
            return NULL;
        }
        struct timespec ts;
        bool timed = false;
        if (r->retry_pending) {
            int64_t until = r->retry_at;
            if (r->stopping && atomic_load(&r->deadline) < until) {
                until = atomic_load(&r->deadline);
            }
            r->waiting = W_TIMED;
            mc__deadline_after_ms(&ts, until - now);
            timed = true;
        } else if (r->count > r->npub) {
            /* Work arrived between the step and here. */
            pthread_mutex_unlock(&r->lock);
            continue;
        } else if (!lingered && !r->stopping) {
            r->waiting = W_LINGER;
            mc__deadline_after_us(&ts, LINGER_US);
            timed = true;
            lingered = true;
        } else {
            r->waiting = W_IDLE;
            if (r->stopping) {
                mc__deadline_after_ms(&ts, atomic_load(&r->deadline) - now);
                timed = true;
            }
        }
        if (timed) {
            pthread_cond_timedwait(&r->cond, &r->lock, &ts);
        } else {
            pthread_cond_wait(&r->cond, &r->lock);
        }
        if (r->waiting == W_IDLE) {
            lingered = false;
        }
        r->waiting = W_RUNNING;
        pthread_mutex_unlock(&r->lock);
    }
}

int mc__runner_start(mc__runner_t *r, mc_error_t *err)
{
    const char *dl = r->sink->ropts.dead_letter_file;
    const mc_sink_config_t *kc = r->sink->cfg;
    if (!dl && kc && kc->dead_letter_db && !r->dl) {
        r->dl = mc__dead_letter_open_mongo(kc->dead_letter_uri ? kc->dead_letter_uri
                                                                : r->engine->config->mongodb_uri,
                                           kc->dead_letter_db, kc->dead_letter_collection, err);
        if (!r->dl) {
            return err ? err->code : MC_EIO;
        }
    }
    if (dl && !r->dl) {
        r->dl = mc__dead_letter_open(dl, err);
        if (!r->dl) {
            return err ? err->code : MC_EIO;
        }
    }
    pthread_mutex_lock(&r->lock);
    set_state_locked(r, MC_SINK_RUNNING, NULL);
    settle_state_locked(r); /* standby when the lease fenced it before the start */
    pthread_mutex_unlock(&r->lock);
    if (r->exec != MC__EXEC_THREAD) {
        return 0;
    }
    if (pthread_create(&r->thread, NULL, runner_main, r) != 0) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno,
                            "sink %s: cannot start its thread", r->sink->name);
    }
    r->thread_started = true;
    return 0;
}

/* ---- Loop and external executors ------------------------------------------------------------- */

static void loop_pass(mc__runner_t *r);

static void on_async(uv_async_t *a)
{
    loop_pass(a->data);
}

static void on_timer(uv_timer_t *t)
{
    loop_pass(t->data);
}

static void on_handle_closed(uv_handle_t *h)
{
    mc__runner_t *r = h->data;
    pthread_mutex_lock(&r->lock);
    if (++r->handles_closed == 2) {
        finish_locked(r);
    }
    pthread_mutex_unlock(&r->lock);
}

/* One visit of the I/O loop: a few batches, then come back later so that other runners and
 * the sinks' own I/O get their turn. */
static void loop_pass(mc__runner_t *r)
{
    for (int round = 0; round < 8 && step(r, BATCH) > 0; round++) {
    }
    pthread_mutex_lock(&r->lock);
    if (r->finished || uv_is_closing((uv_handle_t *)&r->async)) {
        pthread_mutex_unlock(&r->lock);
        return;
    }
    int64_t now = mc__now_ms();
    if (r->stopping && publishing_over_locked(r, now)) {
        call_drain_locked(r);
        if (r->count == 0 || r->failed || now >= atomic_load(&r->deadline) || r->npub < r->count) {
            call_stop_locked(r);
            uv_close((uv_handle_t *)&r->async, on_handle_closed);
            uv_close((uv_handle_t *)&r->timer, on_handle_closed);
            pthread_mutex_unlock(&r->lock);
            return;
        }
        /* Waiting for acks: acks kick the loop; the deadline wakes it at the latest. */
        uv_timer_start(&r->timer, on_timer, (uint64_t)(atomic_load(&r->deadline) - now), 0);
        pthread_mutex_unlock(&r->lock);
        return;
    }
    if ((atomic_load(&r->fails_pending) > 0 && !r->failed) ||
        (r->count > r->npub && !r->retry_pending)) {
        uv_async_send(&r->async);
    } else if (r->retry_pending) {
        int64_t wait = r->retry_at - now;
        uv_timer_start(&r->timer, on_timer, (uint64_t)(wait > 0 ? wait : 0), 0);
    }
    pthread_mutex_unlock(&r->lock);
}

int mc__runner_loop_attach(mc__runner_t *r, void *uv_loop)
{
    int rc = uv_async_init(uv_loop, &r->async, on_async);
    if (rc == 0) {
        rc = uv_timer_init(uv_loop, &r->timer);
    }
    if (rc != 0) {
        return MC_EIO;
    }
    r->async.data = r;
    r->timer.data = r;
    r->handles = true;
    return 0;
}

size_t mc__runner_run_once(mc__runner_t *r, size_t budget)
{
    size_t total = 0;
    size_t want = budget ? budget : BATCH;
    while (total < want) {
        size_t n = step(r, want - total);
        if (n == 0) {
            break;
        }
        total += n;
    }
    pthread_mutex_lock(&r->lock);
    if (r->exec == MC__EXEC_EXTERNAL && r->stopping && !r->finished &&
        publishing_over_locked(r, mc__now_ms())) {
        call_drain_locked(r);
        call_stop_locked(r);
        finish_locked(r);
    } else if (r->exec == MC__EXEC_EXTERNAL) {
        pthread_cond_broadcast(&r->cond); /* a stop waiting elsewhere sees the progress */
    }
    pthread_mutex_unlock(&r->lock);
    return total;
}

/* ---- Stop ------------------------------------------------------------------------------------ */

void mc__runner_begin_stop(mc__runner_t *r, int64_t deadline_ms)
{
    pthread_mutex_lock(&r->lock);
    r->stopping = true;
    atomic_store(&r->deadline, deadline_ms);
    bool notify = kick_locked(r);
    pthread_cond_broadcast(&r->room);
    pthread_mutex_unlock(&r->lock);
    if (notify) {
        notify_executor(r);
    }
}

int mc__runner_finish_stop(mc__runner_t *r, int64_t deadline_ms, bool on_dispatch_thread)
{
    if (r->exec == MC__EXEC_THREAD && r->thread_started) {
        pthread_join(r->thread, NULL);
        r->thread_started = false;
    } else if (r->exec == MC__EXEC_EXTERNAL) {
        if (on_dispatch_thread) {
            /* Nobody else will dispatch: do it here until done or out of time. */
            for (;;) {
                size_t n = mc__runner_run_once(r, 0);
                pthread_mutex_lock(&r->lock);
                bool done = r->finished;
                pthread_mutex_unlock(&r->lock);
                if (done || mc__now_ms() >= deadline_ms) {
                    break;
                }
                if (n == 0) {
                    struct timespec ts = {0, 1000000};
                    nanosleep(&ts, NULL);
                }
            }
        }
        int64_t waited_from = mc__now_ms();
        pthread_mutex_lock(&r->lock);
        while (!r->finished) {
            int64_t now = mc__now_ms();
            bool no_callbacks = !r->type->drain && !(r->v2 && r->type->stop);
            if (r->count == 0 && no_callbacks) {
                finish_locked(r);
                break;
            }
            int64_t last = atomic_load(&r->engine->dispatch_last_ms);
            bool silent = now - (last > waited_from ? last : waited_from) >= STALL_MS;
            if (now >= deadline_ms || silent) {
                if (r->count > 0) {
                    mc_log(MC_LOG_INFO, "runner",
                           "live sink stops with undelivered events sink=%s events=%u",
                           r->sink->name, r->count - r->npub);
                }
                drop_unpublished_locked(r, false);
                finish_locked(r);
                break;
            }
            pthread_mutex_unlock(&r->lock);
            notify_executor(r);
            pthread_mutex_lock(&r->lock);
            struct timespec ts;
            mc__deadline_after_ms(&ts, 100);
            pthread_cond_timedwait(&r->cond, &r->lock, &ts);
        }
        pthread_mutex_unlock(&r->lock);
    } else {
        /* The loop runner finishes on the loop thread; the loop itself is stopped after. */
        pthread_mutex_lock(&r->lock);
        while (!r->finished && r->handles) {
            struct timespec ts;
            mc__deadline_after_ms(&ts, 200);
            pthread_cond_timedwait(&r->cond, &r->lock, &ts);
            if (!r->finished && mc__now_ms() >= deadline_ms + 2000) {
                /* The loop should have closed the runner by now: nudge it. */
                pthread_mutex_unlock(&r->lock);
                uv_async_send(&r->async);
                pthread_mutex_lock(&r->lock);
            }
        }
        pthread_mutex_unlock(&r->lock);
    }
    pthread_mutex_lock(&r->lock);
    int rc = (r->count > 0 || r->drain_rc != 0) ? MC_EAGAIN : 0;
    if (rc != 0) {
        mc_log(MC_LOG_WARN, "runner",
               "sink stops with incomplete events sink=%s pending=%u (redelivered after "
               "restart)",
               r->sink->name, r->count);
    }
    if (!r->failed) {
        set_state_locked(r, MC_SINK_STOPPED, NULL);
    }
    pthread_mutex_unlock(&r->lock);
    return rc;
}

/* ---- Ledger and status ----------------------------------------------------------------------- */

bool mc__runner_take_done(mc__runner_t *r, int slot, mc__pref_t *out, bool *dirty, uint64_t *seq)
{
    pthread_mutex_lock(&r->lock);
    rslot_t *s = &r->slots[slot];
    mc__pref_copy(out, &s->done);
    if (dirty) {
        *dirty = s->dirty;
        s->dirty = false;
    }
    if (seq) {
        *seq = s->done_seq;
    }
    pthread_mutex_unlock(&r->lock);
    return !mc__pref_empty(out);
}

void mc__runner_set_done(mc__runner_t *r, int slot, mc__mark_t *m, bool dirty)
{
    pthread_mutex_lock(&r->lock);
    mc__pref_t p = {.mark = m};
    mc__pref_move(&r->slots[slot].done, &p);
    r->slots[slot].dirty = dirty;
    pthread_mutex_unlock(&r->lock);
}

void mc__runner_mark_dirty(mc__runner_t *r, int slot)
{
    pthread_mutex_lock(&r->lock);
    r->slots[slot].dirty = true;
    pthread_mutex_unlock(&r->lock);
}

bool mc__runner_has_done(mc__runner_t *r, int slot)
{
    pthread_mutex_lock(&r->lock);
    bool has = !mc__pref_empty(&r->slots[slot].done);
    pthread_mutex_unlock(&r->lock);
    return has;
}

static int64_t pref_wall_ms(const mc__pref_t *p)
{
    if (p->ev) {
        int64_t w = mc_event_wall_time_ms(p->ev);
        if (w != INT64_MIN) {
            return w;
        }
        uint32_t t, i;
        return mc_event_cluster_time(p->ev, &t, &i) ? (int64_t)t * 1000 : INT64_MIN;
    }
    return p->mark && p->mark->ct_t ? (int64_t)p->mark->ct_t * 1000 : INT64_MIN;
}

void mc__runner_stats(mc__runner_t *r, mc_sink_stats_t *out)
{
    pthread_mutex_lock(&r->lock);
    out->state = r->state;
    bson_strncpy(out->message, r->message, sizeof(out->message));
    out->in_flight = r->npub;
    /* Marks (positions without an event) are rare: counted as entries, they keep this O(1). */
    uint64_t lag = r->count;
    int64_t oldest = INT64_MIN;
    for (uint32_t i = 0; i < r->count && oldest == INT64_MIN; i++) {
        rentry_t *e = entry_at(r, i);
        if (e->p.ev) {
            oldest = pref_wall_ms(&e->p);
        }
    }
    bool behind = false;
    for (int k = 0; k < r->n_slots; k++) {
        uint64_t m = atomic_load(&r->slots[k].missed);
        lag += m;
        if (r->slots[k].catching_up || m > 0) {
            behind = true;
        }
    }
    if (behind) {
        /* Detached: the oldest event not complete is right after its position. */
        for (int k = 0; k < r->n_slots; k++) {
            if (r->slots[k].catching_up) {
                int64_t w = pref_wall_ms(&r->slots[k].done);
                if (w != INT64_MIN && (oldest == INT64_MIN || w < oldest)) {
                    oldest = w;
                }
            }
        }
    }
    pthread_mutex_unlock(&r->lock);
    out->lag_events = lag;
    int64_t now = mc__wall_ms();
    out->lag_ms = lag > 0 && oldest != INT64_MIN && now > oldest ? now - oldest : 0;
}

bool mc__runner_failed(mc__runner_t *r)
{
    pthread_mutex_lock(&r->lock);
    bool f = r->failed;
    pthread_mutex_unlock(&r->lock);
    return f;
}

int64_t mc__runner_deadline(const mc__runner_t *r)
{
    return atomic_load(&((mc__runner_t *)r)->deadline);
}
