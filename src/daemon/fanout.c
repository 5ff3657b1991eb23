/*
 * fanout.c: the WebSocket/SSE fan-out: a sink type the engine dispatches into, one hub per
 * stream (history ring + subscribers), and the shared wire messages.
 *
 * Thread: the server's loop thread only. The fan-out is an MC_SINK_LIVE sink and the daemon
 * runs the engine in external dispatch mode, so its runner's publish()/flush() run in
 * mc_engine_dispatch() from the loop's async callback (every other sink has its own executor
 * and never touches the loop); init/destroy run on the owner's thread and touch no loop
 * state. A live sink is never detached: a slow subscriber is cut (4002) instead, and a full
 * live queue makes the watcher wait, so no event is lost for subscribers that keep up.
 * Invariants:
 *   - encode once: every event becomes one mcd_msg_t whose WebSocket header and SSE head
 *     are built at most once; the ring and every subscriber queue hold references to it;
 *   - a subscriber is either in hub->subs (live) or not subscribed at all: replay and
 *     joining happen in one call on the loop thread, and every event the engine dispatches
 *     afterwards reaches both the ring and the live subscribers in the same publish(), so a
 *     resume has no gap and no duplicate;
 *   - the ring only holds events of the current run of the stream: a reset event clears it
 *     (ids from before it can no longer be resumed exactly).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "server_internal.h"

/* ---- Messages ------------------------------------------------------------------------------- */

mcd_msg_t *mcd_msg_new_event(mc_event_t *ev)
{
    size_t len = 0;
    const char *json = mc_event_json(ev, &len);
    if (!json || len > UINT32_MAX) {
        return NULL;
    }
    mcd_msg_t *msg = calloc(1, sizeof(*msg));
    if (!msg) {
        return NULL;
    }
    msg->refs = 1;
    msg->ev = mc_event_ref(ev);
    msg->body = json;
    msg->body_len = (uint32_t)len;
    /* SSE ends an event at a blank line, so the data must be one line. JSON only has raw
     * line breaks as insignificant whitespace (inside strings they are escaped), so turning
     * them into spaces keeps the same JSON value. */
    if (memchr(json, '\n', len) || memchr(json, '\r', len)) {
        msg->owned = malloc(len + 1);
        if (!msg->owned) {
            mc_event_unref(&msg->ev);
            free(msg);
            return NULL;
        }
        for (size_t i = 0; i < len; i++) {
            msg->owned[i] = (json[i] == '\n' || json[i] == '\r') ? ' ' : json[i];
        }
        msg->owned[len] = '\0';
        msg->body = msg->owned;
    }
    msg->ws_hdr_len = (uint8_t)mcd_ws_frame_header(msg->ws_hdr, MCD_WS_OP_TEXT, len);
    return msg;
}

mcd_msg_t *mcd_msg_new_raw(const void *bytes, size_t len)
{
    mcd_msg_t *msg = calloc(1, sizeof(*msg));
    if (!msg) {
        return NULL;
    }
    msg->owned = malloc(len ? len : 1);
    if (!msg->owned) {
        free(msg);
        return NULL;
    }
    memcpy(msg->owned, bytes, len);
    msg->refs = 1;
    msg->flags = MCD_MSG_RAW;
    msg->body = msg->owned;
    msg->body_len = (uint32_t)len;
    return msg;
}

void mcd_msg_unref(mcd_msg_t *msg)
{
    if (!msg || (msg->flags & MCD_MSG_STATIC)) {
        return;
    }
    if (--msg->refs > 0) {
        return;
    }
    mc_event_unref(&msg->ev);
    free(msg->sse_head);
    free(msg->owned);
    free(msg);
}

static const char sse_end[] = "\n\n";

size_t mcd_msg_size_any(mcd_msg_t *msg, mcd_transport_t t)
{
    if (msg->flags & MCD_MSG_RAW) {
        return msg->body_len;
    }
    if (t == MCD_T_SSE) {
        if (!msg->sse_head) {
            msg->sse_head = mcd_sse_head(msg->ev, &msg->sse_head_len);
            if (!msg->sse_head) {
                return 0;
            }
        }
        return (size_t)msg->sse_head_len + msg->body_len + 2;
    }
    return (size_t)msg->ws_hdr_len + msg->body_len;
}

unsigned mcd_msg_bufs(mcd_msg_t *msg, mcd_transport_t t, uv_buf_t out[3])
{
    if (msg->flags & MCD_MSG_RAW) {
        out[0] = uv_buf_init((char *)msg->body, msg->body_len);
        return 1;
    }
    if (t == MCD_T_SSE) {
        if (!msg->sse_head) {
            return 0; /* mcd_msg_size() builds it when the message is queued */
        }
        out[0] = uv_buf_init(msg->sse_head, msg->sse_head_len);
        out[1] = uv_buf_init((char *)msg->body, msg->body_len);
        out[2] = uv_buf_init((char *)sse_end, 2);
        return 3;
    }
    out[0] = uv_buf_init((char *)msg->ws_hdr, msg->ws_hdr_len);
    out[1] = uv_buf_init((char *)msg->body, msg->body_len);
    return 2;
}

/* ---- Hubs -------------------------------------------------------------------------------------
 */

static mcd_msg_t *control_msg(const char *stream, mc_event_kind_t kind, const char *reason)
{
    mc_event_t *ev = mc_event_new_control(kind, stream, 0, reason);
    if (!ev) {
        return NULL;
    }
    mcd_msg_t *msg = mcd_msg_new_event(ev);
    mc_event_unref(&ev);
    return msg;
}

int mcd_hub_init(mcd_hub_t *hub, mcd_server_t *srv, const mc_stream_config_t *cfg)
{
    memset(hub, 0, sizeof(*hub));
    hub->cfg = cfg;
    hub->srv = srv;
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
}

void mcd_hub_cleanup(mcd_hub_t *hub)
{
    if (hub->ring) {
        ring_clear(hub);
    }
    free(hub->ring);
    free(hub->subs);
    mcd_msg_unref(hub->ready_msg);
    mcd_msg_unref(hub->reset_msg);
    memset(hub, 0, sizeof(*hub));
}

static void ring_push(mcd_hub_t *hub, mcd_msg_t *msg)
{
    if (!hub->ring_cap) {
        return;
    }
    if (hub->ring_len == hub->ring_cap) {
        mcd_msg_unref(hub->ring[hub->ring_head]);
        hub->ring[hub->ring_head] = NULL;
        hub->ring_head = (hub->ring_head + 1) % hub->ring_cap;
        hub->ring_len--;
    }
    hub->ring[(hub->ring_head + hub->ring_len) % hub->ring_cap] = mcd_msg_ref(msg);
    hub->ring_len++;
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
    mc_engine_t *engine = hub->srv->engine;
    if (!engine) {
        return true;
    }
    mc_stream_status_t st;
    if (mc_engine_stream_status(engine, hub->cfg->name, &st) != 0) {
        return false;
    }
    return st.state == MC_STREAM_OPEN;
}

int mcd_hub_subscribe(mcd_hub_t *hub, mcd_conn_t *conn, const char *since)
{
    if (hub->n_subs == hub->subs_cap) {
        uint32_t cap = hub->subs_cap ? hub->subs_cap * 2 : 16;
        mcd_conn_t **ns = realloc(hub->subs, cap * sizeof(*ns));
        if (!ns) {
            return MC_ENOMEM;
        }
        hub->subs = ns;
        hub->subs_cap = cap;
    }
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
    if (found >= 0) {
        for (uint32_t i = (uint32_t)found + 1; i < hub->ring_len; i++) {
            mcd_msg_t *m = ring_at(hub, i);
            if (mc_event_kind(m->ev) == MC_EVENT_CHANGE &&
                !mcd_subscription_match(conn->sub, m->ev)) {
                continue;
            }
            if (mcd_conn_send(conn, m, true) != 0) {
                return -1;
            }
        }
    }
    conn->hub = hub;
    if (mcd_subscription_matches_all(conn->sub)) {
        conn->flags |= MCD_CF_MATCH_ALL;
    } else {
        conn->flags &= (uint8_t)~MCD_CF_MATCH_ALL;
    }
    conn->sub_index = hub->n_subs;
    hub->subs[hub->n_subs++] = conn;
    return 0;
}

void mcd_hub_unsubscribe(mcd_conn_t *conn)
{
    mcd_hub_t *hub = conn->hub;
    if (!hub) {
        return;
    }
    uint32_t i = conn->sub_index;
    hub->n_subs--;
    if (i != hub->n_subs) {
        hub->subs[i] = hub->subs[hub->n_subs];
        hub->subs[i]->sub_index = i;
    }
    conn->hub = NULL;
}

static void hub_publish(mcd_hub_t *hub, mc_event_t *ev)
{
    mcd_msg_t *msg = mcd_msg_new_event(ev);
    if (!msg) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
        mc_log_ratelimited(&rl, MC_LOG_ERROR, "server", "out of memory: event dropped stream=%s",
                           hub->cfg->name);
        return;
    }
    hub->events++;
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
    case MC_EVENT_READY: hub->open = true; break;
    }
    /* Subscribers flagged MCD_CF_MATCH_ALL (no recipient rule, no $var stage, no filter)
     * skip the per-subscriber match: for them mcd_subscription_match() is true for every
     * event except a change without a change document, decided here once per event. */
    bool check = kind == MC_EVENT_CHANGE;
    uint8_t skip_check = check && mc_event_change(ev) ? MCD_CF_MATCH_ALL : 0;
    /* Backwards: closing a slow consumer swaps the last subscriber into its slot, which this
     * loop has already visited. */
    for (uint32_t i = hub->n_subs; i-- > 0;) {
        mcd_conn_t *c = hub->subs[i];
        if (check && !(c->flags & skip_check) && !mcd_subscription_match(c->sub, ev)) {
            continue;
        }
        mcd_conn_send(c, msg, false);
    }
    mcd_msg_unref(msg);
}

/* ---- The sink type ------------------------------------------------------------------------------
 */

typedef struct fanout_ctx {
    mcd_server_t *srv;
} fanout_ctx_t;

static int fanout_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)options;
    fanout_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->srv = mc_sink_userdata(sink);
    if (!ctx->srv) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "the live fan-out sink needs the server as userdata");
    }
    return 0;
}

static int fanout_publish(mc_sink_t *sink, mc_event_t *ev)
{
    fanout_ctx_t *ctx = mc_sink_ctx(sink);
    mcd_hub_t *hub = mcd_server_hub(ctx->srv, mc_event_stream(ev));
    if (!hub) {
        return MC_SINK_SKIP;
    }
    ctx->srv->stats.fanout_events++;
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
