/*
 * fanout.c: the WebSocket/SSE fan-out: a sink type the engine dispatches into and one hub per
 * stream (history ring + subscribers). See fanout.h.
 *
 * Thread: the server's loop thread only. The fan-out is an MC_SINK_LIVE sink and the daemon
 * runs the engine in external dispatch mode, so its runner's publish()/flush() run in
 * mc_engine_dispatch() from the loop's async callback (every other sink has its own executor
 * and never touches the loop); init/destroy run on the owner's thread and touch no loop
 * state. A live sink is never detached: a slow subscriber is cut (4002) instead, and a full
 * live queue makes the watcher wait, so no event is lost for subscribers that keep up.
 * Invariants:
 *   - encode once: every event becomes one mcd_msg_t per view a subscriber receives (FULL,
 *     and ENTERED / LEFT when a write moved a document between owners; msg.c), each with its
 *     WebSocket header and SSE head built at most once; the FULL message owns the others, the
 *     ring holds the FULL one, and every subscriber queue holds references; a view past
 *     server.max_message_bytes is that view's oversize notice;
 *   - what a subscriber gets is decided by message_for() (mcd_subscription_apply()) in one
 *     place, for live delivery and for history replay alike: a shared view message, or, when
 *     the subscriber's own stages reshape the change, a message of its own (encoded for it,
 *     held to the same size limit, never put in the ring); a subscriber whose stages fail is
 *     ended after an error message (pipeline_error, WebSocket close 4010);
 *   - a subscriber is either in hub->subs (live) or not subscribed at all: replay and
 *     joining happen in one call on the loop thread, and every event the engine dispatches
 *     afterwards reaches both the ring and the live subscribers in the same publish(), so a
 *     resume has no gap and no duplicate;
 *   - the ring only holds events of the current run of the stream: a reset event clears it
 *     (ids from before it can no longer be resumed exactly);
 *   - an error event (the stream failed) is the last a hub's subscribers get: each is ended
 *     after it (mcd_conn_close(): WebSocket close 4010, SSE end of stream), and new
 *     subscribers of the failed stream are refused (http_routes.c: 503 stream_failed);
 *   - each subscriber's stages and filter run within its own CPU budget (filter_budget_us per
 *     event, REPLAY_BUDGET events' worth for a resume's replay); one that runs out is closed
 *     (WebSocket 4003, SSE error event) and never delays the others by more than that.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout.h"
#include "engine_private.h" /* mc__token_cluster_time */

/* A resume's replay runs in one step: its filter budget is this many events' worth. */
#define REPLAY_BUDGET 32

/* ---- Hubs ---------------------------------------------------------------------------------- */

static mcd_msg_t *control_msg(const char *stream, mc_event_kind_t kind, const char *reason)
{
    mc_event_t *ev = mc_event_new_control(kind, stream, 0, reason);
    if (!ev) {
        return NULL;
    }
    mcd_msg_t *msg = mcd_msg_new_event(ev, 0);
    mc_event_unref(&ev);
    return msg;
}

static int hub_init(mcd_hub_t *hub, mcd_fanout_t *fo, const mc_stream_config_t *cfg)
{
    memset(hub, 0, sizeof(*hub));
    hub->cfg = cfg;
    hub->fanout = fo;
    hub->subs.name = cfg->name;
    hub->last_wall_ms = INT64_MIN;
    hub->ring_cap = cfg->history;
    if (hub->ring_cap) {
        hub->ring = calloc(hub->ring_cap, sizeof(*hub->ring));
        if (!hub->ring) {
            return MC_ENOMEM;
        }
    }
    hub->ready_msg = control_msg(cfg->name, MC_EVENT_READY, NULL);
    hub->reset_msg = control_msg(cfg->name, MC_EVENT_RESET, "history");
    if (!hub->ready_msg || !hub->reset_msg) {
        return MC_ENOMEM;
    }
    return 0;
}

static void ring_clear(mcd_hub_t *hub)
{
    for (uint32_t i = 0; i < hub->ring_len; i++) {
        uint32_t k = (hub->ring_head + i) % hub->ring_cap;
        mcd_msg_unref(hub->ring[k]);
        hub->ring[k] = NULL;
    }
    hub->ring_head = 0;
    hub->ring_len = 0;
    hub->ring_epoch++;
    mcd_msg_unref(hub->evicted); /* a new epoch: continuity starts at its first message */
    hub->evicted = NULL;
}

static void hub_cleanup(mcd_hub_t *hub)
{
    if (hub->ring) {
        ring_clear(hub);
    }
    free(hub->ring);
    mcd_conn_set_cleanup(&hub->subs);
    mcd_msg_unref(hub->ready_msg);
    mcd_msg_unref(hub->reset_msg);
    mcd_msg_unref(hub->error_msg);
    mcd_msg_unref(hub->evicted);
    memset(hub, 0, sizeof(*hub));
}

static void ring_push(mcd_hub_t *hub, mcd_msg_t *msg)
{
    if (!hub->ring_cap) {
        return;
    }
    if (hub->ring_len == hub->ring_cap) {
        mcd_msg_unref(hub->evicted);
        hub->evicted = hub->ring[hub->ring_head]; /* its reference */
        hub->ring[hub->ring_head] = NULL;
        hub->ring_head = (hub->ring_head + 1) % hub->ring_cap;
        hub->ring_len--;
    }
    hub->ring[(hub->ring_head + hub->ring_len) % hub->ring_cap] = mcd_msg_ref(msg);
    hub->ring_len++;
    hub->ring_pushed++;
}

static mcd_msg_t *ring_at(const mcd_hub_t *hub, uint32_t i)
{
    return hub->ring[(hub->ring_head + i) % hub->ring_cap];
}

static bool stream_open_now(mcd_hub_t *hub)
{
    if (!hub->open) {
        return false;
    }
    /* hub->open follows the ready events the loop has seen; the engine's state catches a
     * stream that has since dropped into retrying (no event announces that). If it reopens,
     * its next ready event reaches this subscriber live. */
    mc_engine_t *engine = hub->fanout->engine;
    if (!engine) {
        return true;
    }
    mc_stream_status_t st;
    if (mc_engine_stream_status(engine, hub->cfg->name, &st) != 0) {
        return false;
    }
    return st.state == MC_STREAM_OPEN;
}

/* Counts (once per event: `full` keeps the mark) and logs an event of which a message, `m`
 * (the FULL one or a view's), became an oversize notice. */
static void count_oversize(mcd_hub_t *hub, mcd_msg_t *full, const mcd_msg_t *m)
{
    if (!(m->flags & MCD_MSG_OVERSIZE) || (full->flags & MCD_MSG_COUNTED)) {
        return;
    }
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
    full->flags |= MCD_MSG_COUNTED;
    hub->fanout->oversize++;
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "event larger than server.max_message_bytes sent as an oversize notice "
                       "stream=%s limit=%zu",
                       hub->cfg->name, hub->fanout->max_message_bytes);
}

/* Closes a subscriber whose stages or filter ran out of CPU budget (or hit a regex limit). */
static void filter_too_expensive(mcd_hub_t *hub, mcd_conn_t *c, const mc_filter_budget_t *b,
                                 const char *when)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    hub->fanout->budget_disconnects++;
    const char *why = b->reason ? b->reason : "CPU budget exhausted";
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "subscriber closed: filter too expensive stream=%s reason=\"%s%s%s\"",
                       hub->cfg->name, why, *when ? " " : "", when);
    char reason[MCD_WS_MAX_CONTROL - 1];
    snprintf(reason, sizeof(reason), "filter too expensive: %s%s%s", why, *when ? " " : "", when);
    mcd_conn_close(c, MCD_WS_CLOSE_FILTER, reason, false);
}

/* A subscriber whose own stages failed on an event: it gets an error message, then its
 * subscription ends (WebSocket close 4010, SSE end of stream), as MongoDB ends a change
 * stream whose pipeline fails; the other subscribers go on. */
static void end_on_stage_error(mcd_hub_t *hub, mcd_conn_t *c, int code)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "per-subscriber pipeline stage failed stream=%s code=%d: subscriber "
                       "ended",
                       hub->cfg->name, code);
    mcd_conn_send_error(c, hub->cfg->name, MCD_ERROR_PIPELINE, code > 0 ? code : 0,
                        MCD_ERROR_PIPELINE_REASON);
    mcd_conn_close(c, MCD_WS_CLOSE_STREAM_FAILED, "pipeline error", false);
}

/* The message `c` receives of the event of `full` (a FULL message), decided the same way for
 * live delivery and history replay, within `budget`: NULL for nothing, and *ended when the
 * subscriber was ended instead (its stages failed, or its stages and filter ran out of budget,
 * `when` saying when). The result is a borrowed shared message, or, for a subscriber whose
 * stages reshape the change, its own message (*own: the caller drops the reference). A
 * message that had to become an oversize notice is counted, once per event. */
static mcd_msg_t *message_for(mcd_hub_t *hub, mcd_conn_t *c, mcd_msg_t *full,
                              mc_filter_budget_t *budget, const char *when, bool *own, bool *ended)
{
    *own = false;
    *ended = false;
    bson_t change;
    bool own_change = false;
    int code = 0;
    int view = mcd_subscription_apply(c->sub, full->ev, budget, &change, &own_change, &code);
    if (view < 0) {
        filter_too_expensive(hub, c, budget, when);
        *ended = true;
        return NULL;
    }
    if (code != 0) {
        end_on_stage_error(hub, c, code);
        *ended = true;
        return NULL;
    }
    if (view == MC_EVENT_VIEW_NONE) {
        return NULL;
    }
    mcd_msg_t *m;
    if (own_change) {
        m = mcd_msg_new_own(full, (mc_event_view_t)view, &change);
        bson_destroy(&change);
        *own = m != NULL;
    } else {
        m = mcd_msg_view(full, (mc_event_view_t)view);
    }
    if (!m) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
        mc_log_ratelimited(&rl, MC_LOG_ERROR, "server", "out of memory: message dropped stream=%s",
                           hub->cfg->name);
        return NULL;
    }
    count_oversize(hub, full, m);
    return m;
}

/* Sends `conn` what it gets of the ring's messages from index `first` on (the same decision as
 * live delivery, hub_publish, within one budget for the whole replay: it runs in one step on
 * the loop), leaving out changes at or before cluster time `after` (0: none). Returns 0, or -1
 * when the connection was ended or closed on the way. */
static int replay_from(mcd_hub_t *hub, mcd_conn_t *conn, uint32_t first, uint64_t after)
{
    mc_filter_budget_t budget = {.cpu_ns = hub->fanout->filter_budget_ns * REPLAY_BUDGET};
    for (uint32_t i = first; i < hub->ring_len; i++) {
        mcd_msg_t *full = ring_at(hub, i);
        if (after && mc_event_kind(full->ev) == MC_EVENT_CHANGE) {
            uint64_t ct = mcd_event_cluster_time(full->ev);
            if (ct && ct <= after) {
                continue;
            }
        }
        bool own, ended;
        mcd_msg_t *vm = message_for(hub, conn, full, &budget, "during replay", &own, &ended);
        if (ended) {
            return -1;
        }
        if (!vm) {
            continue;
        }
        int rc = mcd_conn_send(conn, vm, true);
        if (own) {
            mcd_msg_unref(vm);
        }
        if (rc != 0) {
            return -1;
        }
    }
    return 0;
}

/* Puts `conn` into the live set. Returns 0, or -1 (closed: out of memory). */
static int join_live(mcd_hub_t *hub, mcd_conn_t *conn)
{
    if (mcd_conn_set_add(&hub->subs, conn) != 0) {
        mcd_conn_abort(conn);
        return -1;
    }
    if (mcd_subscription_matches_all(conn->sub)) {
        conn->flags |= MCD_CF_MATCH_ALL;
    } else {
        conn->flags &= (uint8_t)~MCD_CF_MATCH_ALL;
    }
    return 0;
}

uint64_t mcd_event_cluster_time(const mc_event_t *ev)
{
    uint32_t t = 0, i = 0;
    if (!mc_event_cluster_time(ev, &t, &i)) {
        const bson_t *token = mc_event_resume_token(ev);
        if (!token || !mc__token_cluster_time(token, &t, &i)) {
            return 0;
        }
    }
    return (uint64_t)t << 32 | i;
}

int mcd_hub_join_after_snapshot(mcd_hub_t *hub, mcd_conn_t *conn, uint64_t seq, uint32_t epoch,
                                uint64_t at)
{
    if (hub->error_msg) {
        /* The stream failed while the snapshot was read: its error message ends this
         * subscriber as it ended the others. */
        if (mcd_conn_send(conn, hub->error_msg, false) == 0) {
            mcd_conn_close(conn, MCD_WS_CLOSE_STREAM_FAILED, "stream failed", false);
        }
        return -1;
    }
    uint64_t oldest = hub->ring_pushed - hub->ring_len;
    if (epoch != hub->ring_epoch || seq < oldest || !hub->ring_cap) {
        return 1;
    }
    if (stream_open_now(hub) && mcd_conn_send(conn, hub->ready_msg, false) != 0) {
        return -1;
    }
    if (replay_from(hub, conn, (uint32_t)(seq - oldest), at) != 0) {
        return -1;
    }
    conn->snap_skip = at;
    return join_live(hub, conn);
}

int mcd_hub_subscribe(mcd_hub_t *hub, mcd_conn_t *conn, const char *since)
{
    long found = -1;
    if (since) {
        /* Newest first: a client usually resumes close to the head. */
        for (uint32_t i = hub->ring_len; i-- > 0;) {
            const char *id = mc_event_id(ring_at(hub, i)->ev);
            if (id && strcmp(id, since) == 0) {
                found = (long)i;
                break;
            }
        }
        if (found < 0) {
            hub->resets++;
            if (mcd_conn_send(conn, hub->reset_msg, false) != 0) {
                return -1;
            }
        } else {
            hub->replays++;
        }
    }
    if (stream_open_now(hub) && mcd_conn_send(conn, hub->ready_msg, false) != 0) {
        return -1;
    }
    if (found >= 0 && replay_from(hub, conn, (uint32_t)found + 1, 0) != 0) {
        return -1;
    }
    return join_live(hub, conn);
}

/* ---- Catch-up joins (catchup.c) ------------------------------------------------------------ */

static const char *msg_id(const mcd_msg_t *m)
{
    const char *id = m && m->ev ? mc_event_id(m->ev) : NULL;
    return id ? id : "";
}

/* The index of the first ring message whose id sorts after `pos` (ring_len when none): ids
 * of one stream grow with the ring. */
static uint32_t ring_first_after(const mcd_hub_t *hub, const char *pos)
{
    uint32_t lo = 0, hi = hub->ring_len;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mc__token_data_cmp(msg_id(ring_at(hub, mid)), pos) <= 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

bool mcd_hub_has_id(const mcd_hub_t *hub, const char *id)
{
    if (!hub->ring_len || !id) {
        return false;
    }
    uint32_t i = ring_first_after(hub, id);
    return i > 0 && strcmp(msg_id(ring_at(hub, i - 1)), id) == 0;
}

int mcd_hub_send_ready(mcd_hub_t *hub, mcd_conn_t *conn)
{
    if (!stream_open_now(hub)) {
        return 0;
    }
    return mcd_conn_send(conn, hub->ready_msg, false) == 0 ? 1 : -1;
}

int mcd_hub_catchup_state(mcd_hub_t *hub, const char *pos, bool check_head)
{
    if (hub->ring_len) {
        /* Continuity: every event after the floor that reached the hub is in the ring. */
        const char *floor = msg_id(hub->evicted ? hub->evicted : ring_at(hub, 0));
        if (mc__token_data_cmp(pos, floor) < 0) {
            return MCD_CU_FORWARD;
        }
        if (mc__token_data_cmp(pos, msg_id(ring_at(hub, hub->ring_len - 1))) <= 0) {
            return MCD_CU_JOIN; /* everything up to pos reached the hub; the rest is in the
                                   ring or comes live */
        }
    }
    if (!check_head) {
        return hub->ring_len ? MCD_CU_HOLD : MCD_CU_FORWARD;
    }
    /* Past the ring (or no ring): joinable when the router has handed out nothing after pos;
     * what it handed out up to pos and the loop has not dispatched yet is skipped live. */
    mc_engine_t *engine = hub->fanout->engine;
    char head[1100];
    if (!engine || !mc__stream_routed_head(engine, hub->cfg->name, head, sizeof(head))) {
        return hub->ring_len ? MCD_CU_HOLD : MCD_CU_FORWARD;
    }
    if (mc__token_data_cmp(head, pos) <= 0) {
        return MCD_CU_JOIN;
    }
    return hub->ring_len ? MCD_CU_HOLD : MCD_CU_FORWARD;
}

int mcd_hub_catchup_join(mcd_hub_t *hub, mcd_conn_t *conn, const char *pos, bool ready_sent)
{
    if (hub->error_msg) {
        if (mcd_conn_send(conn, hub->error_msg, false) == 0) {
            mcd_conn_close(conn, MCD_WS_CLOSE_STREAM_FAILED, "stream failed", false);
        }
        return -1;
    }
    if (!ready_sent && mcd_hub_send_ready(hub, conn) < 0) {
        return -1;
    }
    if (replay_from(hub, conn, ring_first_after(hub, pos), 0) != 0) {
        return -1;
    }
    free(conn->resume_skip);
    conn->resume_skip = strdup(pos);
    if (!conn->resume_skip) {
        mcd_conn_abort(conn);
        return -1;
    }
    hub->catchups++;
    return join_live(hub, conn);
}

int mcd_hub_subscribe_reset(mcd_hub_t *hub, mcd_conn_t *conn, const char *reason,
                            bool ready_sent)
{
    hub->catchup_resets++;
    mcd_msg_t *m = control_msg(hub->cfg->name, MC_EVENT_RESET, reason);
    if (!m) {
        mcd_conn_abort(conn);
        return -1;
    }
    int rc = mcd_conn_send(conn, m, false);
    mcd_msg_unref(m);
    if (rc != 0 || (!ready_sent && mcd_hub_send_ready(hub, conn) < 0)) {
        return -1;
    }
    return join_live(hub, conn);
}

void mcd_hub_end_stage_error(mcd_hub_t *hub, mcd_conn_t *conn, int code)
{
    end_on_stage_error(hub, conn, code);
}

void mcd_hub_end_filter_budget(mcd_hub_t *hub, mcd_conn_t *conn, const char *why)
{
    mc_filter_budget_t b = {.reason = why};
    filter_too_expensive(hub, conn, &b, "during catch-up");
}

static void hub_publish(mcd_hub_t *hub, mc_event_t *ev)
{
    mcd_msg_t *msg = mcd_msg_new_event(ev, hub->fanout->max_message_bytes);
    if (!msg) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
        mc_log_ratelimited(&rl, MC_LOG_ERROR, "server", "out of memory: event dropped stream=%s",
                           hub->cfg->name);
        return;
    }
    hub->events++;
    count_oversize(hub, msg, msg);
    mc_event_kind_t kind = mc_event_kind(ev);
    switch (kind) {
    case MC_EVENT_CHANGE:
    case MC_EVENT_INVALIDATE:
        ring_push(hub, msg);
        if (kind == MC_EVENT_CHANGE) {
            int64_t wall = mc_event_wall_time_ms(ev);
            if (wall != INT64_MIN) {
                hub->last_wall_ms = wall;
            }
        }
        break;
    case MC_EVENT_RESET:
        if (hub->ring) {
            ring_clear(hub);
        }
        break;
    case MC_EVENT_READY:
        hub->open = true;
        mcd_msg_unref(hub->error_msg);
        hub->error_msg = NULL;
        break;
    case MC_EVENT_ERROR:
        hub->open = false;
        mcd_msg_unref(hub->error_msg);
        hub->error_msg = mcd_msg_ref(msg);
        break;
    }
    /* Subscribers flagged MCD_CF_MATCH_ALL (no recipient rule, no per-subscriber stage, no
     * filter) skip the per-subscriber decision: for them mcd_subscription_apply() is FULL for
     * every event except a change without a change document, decided here once per event.
     * The others get filter_budget_us of CPU time each for their stages and filter (one that
     * takes longer closes its subscriber). */
    bool check = kind == MC_EVENT_CHANGE;
    uint8_t skip_check = check && mc_event_change(ev) ? MCD_CF_MATCH_ALL : 0;
    /* Backwards: closing a slow consumer swaps the last subscriber into its slot, which this
     * loop has already visited. */
    uint64_t ct = UINT64_MAX; /* the change's cluster time, read once when a subscriber asks */
    for (uint32_t i = hub->subs.n; i-- > 0;) {
        mcd_conn_t *c = hub->subs.v[i];
        mcd_msg_t *m = msg;
        bool own = false;
        if (c->resume_skip && (kind == MC_EVENT_CHANGE || kind == MC_EVENT_INVALIDATE)) {
            /* Joined after a catch-up at resume_skip: an event at or before it was in the
             * catch-up (the router may still have handed the loop some). */
            const char *id = mc_event_id(ev);
            if (id && mc__token_data_cmp(id, c->resume_skip) <= 0) {
                continue;
            }
            free(c->resume_skip);
            c->resume_skip = NULL;
        }
        if (c->snap_skip && kind == MC_EVENT_CHANGE) {
            /* Joined after a snapshot at snap_skip: a change at or before it is in the
             * snapshot already. Changes come in cluster-time order, so the first one after it
             * ends the check. */
            if (ct == UINT64_MAX) {
                ct = mcd_event_cluster_time(ev);
            }
            if (ct && ct <= c->snap_skip) {
                continue;
            }
            c->snap_skip = 0;
        }
        if (check && !(c->flags & skip_check)) {
            mc_filter_budget_t budget = {.cpu_ns = hub->fanout->filter_budget_ns};
            bool ended;
            m = message_for(hub, c, msg, &budget, "", &own, &ended);
            if (!m) {
                continue;
            }
        }
        mcd_conn_send(c, m, false);
        if (own) {
            mcd_msg_unref(m);
        }
    }
    if (kind == MC_EVENT_ERROR) {
        /* The stream's last event in this run: end every subscriber once the message is
         * written rather than leave it waiting (WebSocket close 4010, SSE end of stream). */
        for (uint32_t i = hub->subs.n; i-- > 0;) {
            mcd_conn_close(hub->subs.v[i], MCD_WS_CLOSE_STREAM_FAILED, "stream failed", false);
        }
    }
    mcd_msg_unref(msg);
}

/* ---- The hubs of a config ----------------------------------------------------------------- */

int mcd_fanout_init(mcd_fanout_t *fo, const mc_config_t *config)
{
    memset(fo, 0, sizeof(*fo));
    uint32_t us = config->server.filter_budget_us ? config->server.filter_budget_us : 2000;
    fo->filter_budget_ns = (uint64_t)us * 1000;
    fo->max_message_bytes =
        config->server.max_message_bytes ? config->server.max_message_bytes : 16777216;
    fo->hubs = calloc(config->n_streams ? config->n_streams : 1, sizeof(*fo->hubs));
    if (!fo->hubs) {
        return MC_ENOMEM;
    }
    for (size_t i = 0; i < config->n_streams; i++) {
        fo->n_hubs = i + 1;
        if (hub_init(&fo->hubs[i], fo, &config->streams[i]) != 0) {
            return MC_ENOMEM;
        }
    }
    return 0;
}

void mcd_fanout_cleanup(mcd_fanout_t *fo)
{
    for (size_t i = 0; i < fo->n_hubs; i++) {
        hub_cleanup(&fo->hubs[i]);
    }
    free(fo->hubs);
    memset(fo, 0, sizeof(*fo));
}

mcd_hub_t *mcd_fanout_hub(mcd_fanout_t *fo, const char *stream)
{
    if (!stream) {
        return NULL;
    }
    for (size_t i = 0; i < fo->n_hubs; i++) {
        if (strcmp(fo->hubs[i].cfg->name, stream) == 0) {
            return &fo->hubs[i];
        }
    }
    return NULL;
}

/* ---- The sink type ------------------------------------------------------------------------------
 */

typedef struct fanout_ctx {
    mcd_fanout_t *fanout;
} fanout_ctx_t;

static int fanout_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)options;
    fanout_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->fanout = mc_sink_userdata(sink);
    if (!ctx->fanout) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "the live fan-out sink needs the fan-out as userdata");
    }
    return 0;
}

static int fanout_publish(mc_sink_t *sink, mc_event_t *ev)
{
    fanout_ctx_t *ctx = mc_sink_ctx(sink);
    mcd_hub_t *hub = mcd_fanout_hub(ctx->fanout, mc_event_stream(ev));
    if (!hub) {
        return MC_SINK_SKIP;
    }
    ctx->fanout->events++;
    hub_publish(hub, ev);
    return 0;
}

const mc_sink_type_t mcd_fanout_sink_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "live-clients",
    .flags = MC_SINK_LIVE, /* runs on the loop (mc_engine_dispatch), never detached */
    .ctx_size = sizeof(fanout_ctx_t),
    .init = fanout_init,
    .publish = fanout_publish,
};
