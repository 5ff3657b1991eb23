/*
 * catchup.c: client catch-up (catchup.h): a subscriber resuming after an id the stream's
 * history ring does not hold gets the events after it from the oplog, judged as live delivery
 * judges them, then joins the live stream with no gap and no duplicate.
 *
 * Threads:
 *   - the loop thread starts a catch-up (or answers with a reset when catch-up is off or too
 *     many run), moves what the reader produced to the connection as its send queue allows
 *     (pump), decides when it can join the stream, joins it (fanout.c) or ends it;
 *   - a snapshot worker (snapshot.h: the same threads and client pool as `?snapshot=true`,
 *     server.snapshot_workers) runs the read: mc__stream_replay() (watcher.c) opens the
 *     stream's own change stream with resumeAfter the id and builds and routes each event
 *     exactly as the stream's watcher does (recipient as of the write, lookups as of the
 *     event's cluster time on an instance of its own, summaries, split or skipped oversize
 *     events, invalidate and reopen with startAfter); each event then goes through the
 *     subscriber's view (mcd_subscription_apply(): routing view, per-subscriber stages with
 *     its `$var`s, filter, within the same CPU budget per event as live delivery) and becomes
 *     the same message live delivery would send (msg.c, the same size limit). Events the
 *     subscriber does not get still count as positions.
 *
 * The join. The reader's items carry their position (the event's id, or a post-batch token's
 * _data). The loop hands items to the connection in order and remembers the position of the
 * last one handed over (`sent`); before each it asks the hub where `sent` stands
 * (mcd_hub_catchup_state()): when every event after `sent` that reached the hub is still in
 * the ring (the ring's oldest message, or the newest it dropped, is at or before `sent`) and
 * `sent` is at or before the ring's newest, the subscriber joins: the ring's messages after
 * `sent`, then live. When `sent` is past the ring's newest, the loop holds the reader's items
 * until the ring gets there, or joins at once when the router has handed out nothing after
 * `sent` (an idle stream): live delivery then leaves out events at or before `sent`. A
 * transaction's events have distinct ids in order, so a join never splits one.
 *
 * Fail closed. On a stream whose routing uses lookups, an event whose recipient the reader
 * could not prove as of its time (recipient_lookup.c) ends the catch-up of a restricted
 * subscriber with reset catchup_unresolved rather than drop the event silently or show it.
 *
 * Limits (every queue bounded): at most CU_QUEUE_BYTES of read messages wait per catch-up
 * (the reader waits for room; twice that while the loop holds a batch it took in one go);
 * the connection gets items only while less than half its send queue limit waits there, and
 * at most CU_PASS_ITEMS per loop pass (replay bytes, exempt from the slow-consumer check); a catch-up
 * reads at most max_catchup_events stream events, must join within catchup_timeout_ms, and at
 * most server.max_catchups run or wait for a worker; beyond each: reset with its reason and
 * live delivery from then on.
 *
 * Ownership: a job belongs to the loop's list until the loop is done with it and its reader
 * has finished (`reader_done`, under cu->mu); the subscription belongs to the connection
 * until the connection closes, then to the job.
 */
#include "catchup.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h" /* mc__stream_replay, mc__now_ms */
#include "subscription.h"

#define CU_QUEUE_BYTES (2u * 1024 * 1024) /* read messages waiting for the loop, per catch-up */
#define CU_BATCH_ITEMS 128                /* the reader hands items over in batches */
#define CU_ITEM_BYTES 64                  /* what an item counts for besides its message */
#define CU_PASS_ITEMS 512 /* items one catch-up hands its connection per loop pass, so that
                             live delivery in the same pass waits for no more than that */

typedef struct cu_item {
    struct cu_item *next;
    mcd_msg_t *full; /* the event's FULL message (one reference), or NULL: a position only */
    mcd_msg_t *send; /* what the subscriber gets: `full`, a view of it (borrowed), its own
                        message (one reference, `own`), or NULL */
    bool own;
    char *pos; /* a position without a message (owned), else NULL: the event's id */
    size_t bytes;
} cu_item_t;

enum { CU_RUNNING = 0, CU_FAILED };

typedef struct cu_job {
    struct cu_job *prev, *next; /* the loop's list */
    mcd_catchups_t *cu;
    /* Set at the start, then read by the reader. */
    mc_engine_t *engine;
    const mc_stream_config_t *cfg;
    mcd_subscription_t *sub;
    char *since;
    uint64_t max_events;
    size_t max_message;
    uint64_t budget_ns;
    uint8_t transport;
    bool fail_closed; /* unresolved recipients end the catch-up (lookups, restricted sub) */
    atomic_bool cancel;
    /* The reader uses `sub` only under sub_mu and while `cancel` is false: the loop sets
     * `cancel` under it before the subscriber goes live (or the connection frees `sub`). */
    pthread_mutex_t sub_mu;
    /* The reader's own. */
    cu_item_t *b_head, *b_tail; /* the batch being filled */
    uint32_t b_items;
    size_t b_bytes;
    uint64_t read;
    /* The loop's. */
    mcd_conn_t *conn; /* NULL once the connection closed */
    bool sub_owned;
    mcd_hub_t *hub;
    mcd_conn_set_t set; /* the connection while it catches up (closing tells the job) */
    bool ready_sent;
    bool loop_done;
    int64_t deadline_ms;
    char *sent; /* position of the last item handed to the connection (NULL: the since id) */
    /* Shared, under cu->mu. */
    cu_item_t *q_head, *q_tail;
    size_t q_bytes;
    int state;
    bool reader_done;
    const char *reason; /* CU_FAILED: a reset reason, or NULL with close_code */
    uint16_t close_code;
    int error_code;       /* a per-subscriber stage's MongoDB code (pipeline_error) */
    const char *why;      /* the filter budget's reason */
    char log[200]; /* the server's reason, for the daemon's log */
} cu_job_t;

struct mcd_catchups {
    uv_loop_t *loop;
    uv_async_t async;
    bool async_open;
    const mc_config_t *config;
    mcd_snapshots_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t room;
    cu_job_t *jobs;
    mcd_catchup_stats_t stats;
    _Atomic uint64_t events;
    bool closed;
};

static void item_free(cu_item_t *it)
{
    if (it->own) {
        mcd_msg_unref(it->send);
    }
    mcd_msg_unref(it->full);
    free(it->pos);
    free(it);
}

static const char *item_pos(const cu_item_t *it)
{
    return it->pos ? it->pos : mc_event_id(it->full->ev);
}

static void items_free(cu_item_t *it)
{
    while (it) {
        cu_item_t *n = it->next;
        item_free(it);
        it = n;
    }
}

static void job_free(cu_job_t *job)
{
    items_free(job->q_head);
    items_free(job->b_head);
    if (job->sub_owned) {
        mcd_subscription_destroy(job->sub);
    }
    mcd_conn_set_cleanup(&job->set);
    pthread_mutex_destroy(&job->sub_mu);
    free(job->since);
    free(job->sent);
    free(job);
}

/* ---- The reader's side (a snapshot worker) ------------------------------------------------- */

static void wake_loop(mcd_catchups_t *cu)
{
    if (cu->async_open) {
        uv_async_send(&cu->async);
    }
}

/* Hands the batch to the loop, waiting while CU_QUEUE_BYTES wait. False when cancelled. */
static bool flush_batch(cu_job_t *job)
{
    mcd_catchups_t *cu = job->cu;
    if (!job->b_head) {
        return !atomic_load(&job->cancel);
    }
    pthread_mutex_lock(&cu->mu);
    while (!atomic_load(&job->cancel) && job->q_bytes >= CU_QUEUE_BYTES) {
        pthread_cond_wait(&cu->room, &cu->mu);
    }
    bool ok = !atomic_load(&job->cancel);
    if (ok) {
        if (job->q_tail) {
            job->q_tail->next = job->b_head;
        } else {
            job->q_head = job->b_head;
        }
        job->q_tail = job->b_tail;
        job->q_bytes += job->b_bytes;
        job->b_head = job->b_tail = NULL;
        job->b_items = 0;
        job->b_bytes = 0;
        wake_loop(cu);
    }
    pthread_mutex_unlock(&cu->mu);
    return ok;
}

/* Ends the read with a reason (any of the reader's paths; the loop acts on it). */
static void reader_fail(cu_job_t *job, const char *reason, uint16_t close_code)
{
    mcd_catchups_t *cu = job->cu;
    pthread_mutex_lock(&cu->mu);
    if (job->state == CU_RUNNING) {
        job->state = CU_FAILED;
        job->reason = reason;
        job->close_code = close_code;
    }
    wake_loop(cu);
    pthread_mutex_unlock(&cu->mu);
}

static bool add_item(cu_job_t *job, cu_item_t *it)
{
    if (job->b_tail) {
        job->b_tail->next = it;
    } else {
        job->b_head = it;
    }
    job->b_tail = it;
    job->b_bytes += it->bytes;
    if (++job->b_items >= CU_BATCH_ITEMS || job->b_bytes >= CU_QUEUE_BYTES / 8) {
        return flush_batch(job);
    }
    return !atomic_load(&job->cancel);
}

/* A position without a message: replaces the batch's last item when that is one too (only
 * the newest position of a run of events the subscriber does not get matters). */
static bool add_position(cu_job_t *job, const char *data)
{
    char *copy = strdup(data);
    if (!copy) {
        reader_fail(job, MCD_CU_RESET_FAILED, 0);
        return false;
    }
    cu_item_t *t = job->b_tail;
    if (t && !t->full) {
        free(t->pos);
        t->pos = copy;
        return !atomic_load(&job->cancel);
    }
    cu_item_t *it = calloc(1, sizeof(*it));
    if (!it) {
        free(copy);
        reader_fail(job, MCD_CU_RESET_FAILED, 0);
        return false;
    }
    it->pos = copy;
    it->bytes = CU_ITEM_BYTES;
    return add_item(job, it);
}

static bool on_position(void *ud, const char *data)
{
    cu_job_t *job = ud;
    if (data && !add_position(job, data)) {
        return false;
    }
    return flush_batch(job); /* a batch boundary or an idle cursor: the loop may join now */
}

static bool on_event(void *ud, mc_event_t *ev, bool unresolved)
{
    cu_job_t *job = ud;
    mcd_catchups_t *cu = job->cu;
    atomic_fetch_add_explicit(&cu->events, 1, memory_order_relaxed);
    bool ok = true;
    mc_event_kind_t kind = mc_event_kind(ev);
    if (++job->read > job->max_events) {
        reader_fail(job, MCD_CU_RESET_TOO_LARGE, 0);
        ok = false;
        goto out;
    }
    if (kind == MC_EVENT_CHANGE && unresolved && job->fail_closed) {
        reader_fail(job, MCD_CU_RESET_UNRESOLVED, 0);
        ok = false;
        goto out;
    }
    mcd_msg_t *full = NULL, *send = NULL;
    bool own = false;
    if (kind == MC_EVENT_CHANGE) {
        bson_t change;
        bool own_change = false;
        int code = 0;
        mc_filter_budget_t budget = {.cpu_ns = job->budget_ns};
        pthread_mutex_lock(&job->sub_mu);
        if (atomic_load(&job->cancel)) {
            pthread_mutex_unlock(&job->sub_mu);
            ok = false;
            goto out;
        }
        int view = mcd_subscription_apply(job->sub, ev, &budget, &change, &own_change, &code);
        pthread_mutex_unlock(&job->sub_mu);
        if (view < 0) {
            job->why = budget.reason ? budget.reason : "CPU budget exhausted";
            reader_fail(job, NULL, MCD_WS_CLOSE_FILTER);
            ok = false;
            goto out;
        }
        if (code != 0) {
            job->error_code = code;
            reader_fail(job, NULL, MCD_WS_CLOSE_STREAM_FAILED);
            ok = false;
            goto out;
        }
        if (view != MC_EVENT_VIEW_NONE) {
            full = mcd_msg_new_event(ev, job->max_message);
            if (full && own_change) {
                send = mcd_msg_new_own(full, (mc_event_view_t)view, &change);
                own = send != NULL;
            } else if (full) {
                send = mcd_msg_view(full, (mc_event_view_t)view);
            }
        }
        if (own_change) {
            bson_destroy(&change);
        }
        if (view != MC_EVENT_VIEW_NONE && !send) {
            mcd_msg_unref(full);
            reader_fail(job, MCD_CU_RESET_FAILED, 0);
            ok = false;
            goto out;
        }
    } else if (kind == MC_EVENT_INVALIDATE) {
        full = mcd_msg_new_event(ev, job->max_message);
        send = full;
        if (!full) {
            reader_fail(job, MCD_CU_RESET_FAILED, 0);
            ok = false;
            goto out;
        }
    }
    if (!send) {
        const char *id = mc_event_id(ev);
        ok = id ? add_position(job, id) : !atomic_load(&job->cancel);
        goto out;
    }
    cu_item_t *it = calloc(1, sizeof(*it));
    if (!it || !mc_event_id(ev)) {
        free(it);
        if (own) {
            mcd_msg_unref(send);
        }
        mcd_msg_unref(full);
        reader_fail(job, MCD_CU_RESET_FAILED, 0);
        ok = false;
        goto out;
    }
    it->full = full;
    it->send = send;
    it->own = own;
    /* The SSE head is made here, before the loop shares the message. */
    it->bytes = mcd_msg_size_any(send, (mcd_transport_t)job->transport) + CU_ITEM_BYTES;
    ok = add_item(job, it);
out:
    mc_event_unref(&ev);
    return ok;
}

static void run_catchup(void *arg)
{
    cu_job_t *job = arg;
    mcd_catchups_t *cu = job->cu;
    if (!atomic_load(&job->cancel)) {
        mc__replay_t rp = {.cancel = &job->cancel,
                           .pool = mcd_snapshots_pool(cu->workers),
                           .on_event = on_event,
                           .on_position = on_position,
                           .ud = job};
        int code = 0;
        mc_error_t err = {0};
        int rc = mc__stream_replay(job->engine, job->cfg->name, job->since, &rp, &code, &err);
        if (rc == 0) {
            flush_batch(job);
        } else {
            const char *reason = rc == MC_ENOTFOUND  ? MCD_CU_RESET_LOST
                                 : rc == MC_ESERVER ? MCD_CU_RESET_UNKNOWN
                                                    : MCD_CU_RESET_FAILED;
            pthread_mutex_lock(&cu->mu);
            snprintf(job->log, sizeof(job->log), "code %d: %.160s", code, err.message);
            pthread_mutex_unlock(&cu->mu);
            reader_fail(job, reason, 0);
        }
    }
    pthread_mutex_lock(&cu->mu);
    items_free(job->b_head); /* what a cancelled read could not hand over */
    job->b_head = job->b_tail = NULL;
    job->reader_done = true;
    wake_loop(cu);
    pthread_mutex_unlock(&cu->mu);
}

/* ---- The loop's side ------------------------------------------------------------------------ */

static void on_async(uv_async_t *a)
{
    mcd_catchups_pump(a->data);
}

mcd_catchups_t *mcd_catchups_new(uv_loop_t *loop, const mc_config_t *config,
                                 mcd_snapshots_t *workers)
{
    mcd_catchups_t *cu = calloc(1, sizeof(*cu));
    if (!cu) {
        return NULL;
    }
    cu->loop = loop;
    cu->config = config;
    cu->workers = workers;
    pthread_mutex_init(&cu->mu, NULL);
    pthread_cond_init(&cu->room, NULL);
    uv_async_init(loop, &cu->async, on_async);
    cu->async.data = cu;
    cu->async_open = true;
    return cu;
}

/* Whether routing on `cfg` asks a lookup collection (its answers as of an old event's time
 * may be unprovable). */
static bool uses_lookups(const mc_stream_config_t *cfg)
{
    if (cfg->lookup || (cfg->recipient_default && cfg->recipient_default->lookup)) {
        return true;
    }
    for (size_t i = 0; i < cfg->n_by_collection; i++) {
        if (cfg->by_collection[i].lookup) {
            return true;
        }
    }
    return false;
}

static void cancel_job(cu_job_t *job)
{
    pthread_mutex_lock(&job->sub_mu); /* waits for an event the reader is judging */
    atomic_store(&job->cancel, true);
    pthread_mutex_unlock(&job->sub_mu);
    pthread_mutex_lock(&job->cu->mu);
    atomic_store(&job->cancel, true);
    pthread_cond_broadcast(&job->cu->room);
    pthread_mutex_unlock(&job->cu->mu);
}

/* The connection of a catch-up closed (c->snap is its job while it catches up): the job keeps
 * the subscription until its reader is done with it. */
static void conn_gone_hook(mcd_conn_t *c)
{
    cu_job_t *job = c->snap;
    if (!job) {
        return;
    }
    c->snap = NULL;
    job->conn = NULL;
    job->sub_owned = true;
    c->sub = NULL;
    job->loop_done = true;
    cancel_job(job);
}

static int reset_now(mcd_catchups_t *cu, mcd_hub_t *hub, mcd_conn_t *conn, const char *reason,
                     bool ready_sent)
{
    cu->stats.reset++;
    return mcd_hub_subscribe_reset(hub, conn, reason, ready_sent);
}

int mcd_catchup_start(mcd_catchups_t *cu, mcd_hub_t *hub, mcd_conn_t *conn, const char *since)
{
    const mc_config_t *config = cu->config;
    uint64_t max_events = hub->cfg->max_catchup_events ? hub->cfg->max_catchup_events
                                                       : config->server.max_catchup_events;
    if (!max_events || !hub->fanout->engine || cu->closed) {
        /* Catch-up off: the reset of old. (An edge stream's catch-up reads JetStream.) */
        return mcd_hub_subscribe(hub, conn, since);
    }
    uint32_t max_jobs = config->server.max_catchups ? config->server.max_catchups : 64;
    if (cu->stats.active >= max_jobs) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                           "resume answered with a reset: %u catch-ups already "
                           "(server.max_catchups) stream=%s",
                           cu->stats.active, hub->cfg->name);
        return reset_now(cu, hub, conn, MCD_CU_RESET_BUSY, false);
    }
    cu_job_t *job = calloc(1, sizeof(*job));
    if (!job || !(job->since = strdup(since))) {
        free(job);
        mcd_conn_abort(conn);
        return -1;
    }
    job->cu = cu;
    job->engine = hub->fanout->engine;
    job->cfg = hub->cfg;
    job->sub = conn->sub;
    job->max_events = max_events;
    job->max_message = hub->fanout->max_message_bytes;
    job->budget_ns = hub->fanout->filter_budget_ns;
    job->transport = conn->transport;
    size_t id_len = 0;
    job->fail_closed =
        uses_lookups(hub->cfg) && mcd_subscription_identity(conn->sub, &id_len) != NULL;
    atomic_init(&job->cancel, false);
    pthread_mutex_init(&job->sub_mu, NULL);
    job->conn = conn;
    job->hub = hub;
    job->set.name = hub->cfg->name;
    job->set.on_close = conn_gone_hook;
    uint32_t timeout = config->server.catchup_timeout_ms ? config->server.catchup_timeout_ms
                                                         : 30000;
    job->deadline_ms = mc__now_ms() + timeout;
    int ready = mcd_hub_send_ready(hub, conn);
    if (ready < 0) {
        job_free(job);
        return -1;
    }
    job->ready_sent = ready == 1;
    if (mcd_conn_set_add(&job->set, conn) != 0) {
        job_free(job);
        mcd_conn_abort(conn);
        return -1;
    }
    conn->snap = job;
    job->next = cu->jobs;
    if (cu->jobs) {
        cu->jobs->prev = job;
    }
    cu->jobs = job;
    cu->stats.started++;
    cu->stats.active++;
    if (mcd_snapshots_submit(cu->workers, run_catchup, job) != 0) {
        /* No worker (out of memory, or stopping): the subscriber is told at once. */
        pthread_mutex_lock(&cu->mu);
        job->state = CU_FAILED;
        job->reason = MCD_CU_RESET_FAILED;
        job->reader_done = true;
        pthread_mutex_unlock(&cu->mu);
    }
    mc_log(MC_LOG_INFO, "server", "catch-up started stream=%s after=%.40s", hub->cfg->name,
           since);
    return 0;
}

/* Out of the job's set without the close hook: the connection goes on. */
static mcd_conn_t *release_conn(cu_job_t *job)
{
    mcd_conn_t *c = job->conn;
    job->conn = NULL;
    job->loop_done = true;
    if (c) {
        c->snap = NULL;
        mcd_conn_set_remove(c);
    }
    return c;
}

static void finish_failed(mcd_catchups_t *cu, cu_job_t *job)
{
    mcd_conn_t *c = release_conn(job);
    cancel_job(job);
    if (!c) {
        return;
    }
    if (job->reason) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(2000);
        mc_log_ratelimited(&rl, MC_LOG_NOTICE, "server",
                           "catch-up ended with reset reason=%s stream=%s read=%" PRIu64 "%s%s",
                           job->reason, job->cfg->name, job->read, job->log[0] ? ": " : "",
                           job->log);
        if (reset_now(cu, job->hub, c, job->reason, job->ready_sent) == 0) {
            mcd_conn_start_write(c);
        }
    } else if (job->close_code == MCD_WS_CLOSE_FILTER) {
        mcd_hub_end_filter_budget(job->hub, c, job->why);
    } else {
        mcd_hub_end_stage_error(job->hub, c, job->error_code);
    }
}

static void join(mcd_catchups_t *cu, cu_job_t *job)
{
    mcd_conn_t *c = release_conn(job);
    cancel_job(job);
    const char *pos = job->sent ? job->sent : job->since;
    cu->stats.joined++;
    if (mcd_hub_catchup_join(job->hub, c, pos, job->ready_sent) == 0) {
        mcd_conn_start_write(c);
    }
}

static bool set_sent(cu_job_t *job, const char *pos)
{
    size_t n = strlen(pos) + 1;
    char *s = realloc(job->sent, n);
    if (!s) {
        return false;
    }
    memcpy(s, pos, n);
    job->sent = s;
    return true;
}

/* One catch-up's share of a pump. */
static void pump_job(mcd_catchups_t *cu, cu_job_t *job, int64_t now)
{
    if (job->loop_done) {
        return;
    }
    mcd_conn_t *c = job->conn;
    const char *pos = job->sent ? job->sent : job->since;
    int st = MCD_CU_FORWARD;
    /* Take what the reader handed over at once (one lock per pass, not per item). */
    pthread_mutex_lock(&cu->mu);
    int state = job->state;
    bool drop = state == CU_FAILED && job->reason; /* a reset: what was read is moot */
    cu_item_t *list = job->q_head;
    job->q_head = job->q_tail = NULL;
    size_t taken_bytes = job->q_bytes;
    job->q_bytes = 0;
    pthread_mutex_unlock(&cu->mu);
    size_t used_bytes = 0;
    uint32_t moved = 0;
    bool budget_left = true;
    while (list) {
        st = mcd_hub_catchup_state(job->hub, pos, false);
        if (!drop && st != MCD_CU_FORWARD) {
            break;
        }
        if (!drop && (moved >= CU_PASS_ITEMS ||
                      mcd_conn_unsent(c) >= mcd_conn_table(c)->max_queue / 2)) {
            budget_left = moved < CU_PASS_ITEMS;
            break;
        }
        cu_item_t *it = list;
        list = it->next;
        used_bytes += it->bytes;
        moved++;
        int rc = 0;
        if (!drop) {
            if (!set_sent(job, item_pos(it))) {
                rc = -1;
            } else if (it->send) {
                rc = mcd_conn_send(c, it->send, true);
            }
        }
        item_free(it);
        if (rc != 0 || job->loop_done) {
            items_free(list); /* the connection was closed: conn_gone_hook ended the job */
            list = NULL;
            break;
        }
        if (job->sent) {
            pos = job->sent;
        }
    }
    pthread_mutex_lock(&cu->mu);
    if (list) {
        /* Put back what this pass did not move, ahead of what came meanwhile. */
        cu_item_t *last = list;
        while (last->next) {
            last = last->next;
        }
        last->next = job->q_head;
        if (!job->q_head) {
            job->q_tail = last;
        }
        job->q_head = list;
    }
    job->q_bytes += taken_bytes - used_bytes;
    bool drained = !job->q_head;
    state = job->state;
    if (moved) {
        pthread_cond_broadcast(&cu->room);
    }
    if (!budget_left && cu->async_open) {
        uv_async_send(&cu->async); /* another pass soon, after the loop's other work */
    }
    pthread_mutex_unlock(&cu->mu);
    bool freed = moved > 0;
    if (job->loop_done) {
        return;
    }
    if (state == CU_FAILED && (drained || job->reason)) {
        finish_failed(cu, job);
        return;
    }
    if (st == MCD_CU_JOIN ||
        ((st == MCD_CU_HOLD || drained) &&
         mcd_hub_catchup_state(job->hub, pos, true) == MCD_CU_JOIN)) {
        join(cu, job);
        return;
    }
    if (now >= job->deadline_ms) {
        pthread_mutex_lock(&cu->mu);
        job->state = CU_FAILED;
        job->reason = MCD_CU_RESET_TIMEOUT;
        pthread_mutex_unlock(&cu->mu);
        finish_failed(cu, job);
        return;
    }
    if (freed && c) {
        mcd_conn_start_write(c);
    }
}

void mcd_catchups_pump(mcd_catchups_t *cu)
{
    if (!cu || !cu->jobs) {
        return;
    }
    int64_t now = mc__now_ms();
    cu_job_t *next;
    for (cu_job_t *job = cu->jobs; job; job = next) {
        next = job->next;
        pump_job(cu, job, now);
        if (!job->loop_done) {
            continue;
        }
        pthread_mutex_lock(&cu->mu);
        bool reader_done = job->reader_done;
        pthread_mutex_unlock(&cu->mu);
        if (!reader_done) {
            continue; /* cancelled: freed once its reader has let go */
        }
        if (job->prev) {
            job->prev->next = job->next;
        } else {
            cu->jobs = job->next;
        }
        if (job->next) {
            job->next->prev = job->prev;
        }
        cu->stats.active--;
        job_free(job);
    }
}

void mcd_catchups_close(mcd_catchups_t *cu)
{
    if (!cu) {
        return;
    }
    cu->closed = true;
    for (cu_job_t *job = cu->jobs; job; job = job->next) {
        cancel_job(job);
    }
    pthread_mutex_lock(&cu->mu);
    cu->async_open = false;
    pthread_mutex_unlock(&cu->mu);
    uv_close((uv_handle_t *)&cu->async, NULL);
}

void mcd_catchups_destroy(mcd_catchups_t *cu)
{
    if (!cu) {
        return;
    }
    while (cu->jobs) {
        cu_job_t *job = cu->jobs;
        cu->jobs = job->next;
        if (job->conn) {
            job->conn->snap = NULL;
            mcd_conn_set_remove(job->conn);
        }
        job_free(job);
    }
    pthread_cond_destroy(&cu->room);
    pthread_mutex_destroy(&cu->mu);
    free(cu);
}

void mcd_catchups_stats(const mcd_catchups_t *cu, mcd_catchup_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    if (cu) {
        *out = cu->stats;
        out->events = atomic_load_explicit(&((mcd_catchups_t *)cu)->events, memory_order_relaxed);
    }
}
