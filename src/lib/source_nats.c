/*
 * source_nats.c: an edge stream (`source: {nats: {url, stream, subject}}`, docs/config.md
 * "Edge streams"): the stream's events come from a JetStream stream that another mongocast's
 * nats sink writes with `format: bson` (one message per event, Nats-Msg-Id = the event id,
 * in event order: the sink's Nats-Expected-Last-Msg-Id chain), instead of from a MongoDB
 * change stream. Each message is decoded back into the event the leader built
 * (edge_payload.c), routed with this node's own recipient rules and summaries
 * (recipient_rules.c, no lookups: config.c refuses them), and handed to the router exactly as
 * the watcher hands its events (router.c), so the fan-out, the history ring, `since=` and
 * every subscriber's view work as on the leader, with the same event ids.
 *
 * Thread: the stream's watcher thread (mc__watcher_main() calls mc__source_nats_main() for an
 * edge stream); libnats runs its own threads (socket, reconnect), of which only the
 * reconnected callback touches this file (an atomic counter).
 *
 * Positions. The edge's positions are the events' resume tokens, stored by the ledger like a
 * watcher's. At start the stored token is found in the JetStream stream by sequence: the
 * stream is ordered by event id (resume tokens' `_data` of one stream compare in event
 * order), so a binary search with JetStream's get-message-by-sequence (about log2(N)
 * requests) gives the first message after it. Without a stored position the edge starts
 * after the stream's last message. A stored position older than the stream's first message
 * when older messages were removed (limits) is history lost: `on_history_lost` applies
 * (`fail`, or `restart`: a `reset`, then from the first message kept).
 *
 * Reading: an ordered push consumer (libnats: flow control, heartbeats, re-created by libnats
 * on a gap) from the next sequence. After a reconnect of the connection (nats-server restarted:
 * the consumer is gone) or any error of the subscription, the edge subscribes again from its
 * own next sequence; messages at or before the newest event routed (by sequence and by id)
 * are dropped, so nothing is routed twice and nothing is skipped.
 *
 * A client's catch-up (mc__source_nats_replay(), called by mc__stream_replay() for an edge
 * stream, on the daemon's snapshot worker that runs the catch-up): a subscriber resuming after
 * an id older than the history ring. On a NATS connection of its own (the stream's reader is
 * never blocked), the id is found by the same binary search over sequences; the messages
 * after it are read one get-message request at a time (one message in memory), decoded and
 * routed by the same step as the live messages (decode_and_route(), with routing of its own)
 * and handed to the catch-up's callbacks; at the end of the stream it reports the last id as
 * its position and looks again every 100 ms until its owner joins it to the live feed or
 * cancels it. An id older than the first message kept (the stream's limits removed messages)
 * is history lost (MC_ENOTFOUND); an id no message has is refused (MC_ESERVER).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nats/nats.h>

#include "edge_payload.h"
#include "engine_private.h"
#include "recipient_rules.h"
#include "source_nats.h"

#define EDGE_NEXT_WAIT_MS 500        /* one wait for a message; stop is checked between waits */
#define EDGE_REQUEST_TIMEOUT_MS 5000 /* stream info, get-message */
#define EDGE_MISSING_PROBE 16        /* deleted sequences stepped over while searching */
#define EDGE_GATHER_MAX 64           /* messages routed together */
#define EDGE_GATHER_WAIT_MS 1        /* the wait for the next message of a burst */

typedef struct edge {
    mc__stream_t *s;
    mc_engine_t *e;
    const mc_stream_config_t *cfg;
    mc__recipients_t *rcpt;
    mc__backoff_t backoff;
    mc_log_ratelimit_t rl, rl_unresolved, rl_missing;
    natsConnection *nc;
    jsCtx *js;
    natsSubscription *sub;
    _Atomic uint64_t reconnects; /* libnats reconnected callback */
    uint64_t sub_reconnects;     /* `reconnects` when `sub` was made */
    bool positioned;             /* next_seq is known */
    uint64_t next_seq;           /* the next JetStream sequence to read */
    uint64_t open_seq;           /* the warm-up ends before this sequence: then the stream
                                    is announced open (state, `ready`) */
    bool announced;
    char *stored_id; /* the stored position's event id (NULL: none) */
    char *last_id;   /* the newest event routed in this run */
    const mc__replay_t *rp; /* a client's catch-up (mc__source_nats_replay); NULL: the edge's
                               own reader */
    const char *fail_code;
    const char *fail_reason;
} edge_t;

static bool stopping(const edge_t *g)
{
    return atomic_load(&g->e->stopping) || (g->rp && atomic_load(g->rp->cancel));
}

/* ---- Handing over, as the watcher does (watcher.c push_event, push_position) --------------- */

static bool push_event(edge_t *g, mc_event_t *ev)
{
    mc__stream_t *s = g->s;
    mc__event_set_stream_index(ev, s->index);
    atomic_store_explicit(&s->stat_last_seq, mc_event_seq(ev), memory_order_relaxed);
    if (mc_event_kind(ev) == MC_EVENT_CHANGE) {
        atomic_store_explicit(&s->stat_events,
                              atomic_load_explicit(&s->stat_events, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        atomic_store_explicit(&s->stat_last_event_ms, mc__wall_ms(), memory_order_relaxed);
    }
    return mc__route_event(s, ev) && !stopping(g);
}

static bool emit_control(edge_t *g, mc_event_kind_t kind, const char *reason)
{
    mc_event_t *ev = mc_event_new_control(kind, g->cfg->name, g->s->next_seq++, reason);
    return ev && push_event(g, ev);
}

static void set_last_id(edge_t *g, const char *id)
{
    char *copy = id ? strdup(id) : NULL;
    free(g->last_id);
    g->last_id = copy;
}

static void note_routing(edge_t *g, const mc_event_t *ev, mc__route_note_t note)
{
    if (note == MC__ROUTE_OK) {
        return;
    }
    mc__stream_t *s = g->s;
    pthread_mutex_lock(&s->lock);
    if (note == MC__ROUTE_MISSING) {
        s->status.recipient_missing++;
    } else {
        s->status.unresolved_recipients++;
    }
    pthread_mutex_unlock(&s->lock);
    const char *op = mc_event_operation_type(ev);
    mc_log_ratelimited(note == MC__ROUTE_MISSING ? &g->rl_missing : &g->rl_unresolved, MC_LOG_WARN,
                       "edge", "recipient %s stream=%s op=%s: event goes to admins only",
                       note == MC__ROUTE_MISSING ? "missing" : "unresolved", g->cfg->name,
                       op ? op : "?");
}

/* ---- The connection ------------------------------------------------------------------------ */

static void on_reconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    edge_t *g = closure;
    atomic_fetch_add(&g->reconnects, 1);
}

static void edge_disconnect(edge_t *g)
{
    if (g->sub) {
        natsSubscription_Destroy(g->sub);
        g->sub = NULL;
    }
    jsCtx_Destroy(g->js);
    g->js = NULL;
    if (g->nc) {
        natsConnection_Destroy(g->nc);
        g->nc = NULL;
    }
}

/* 0, or MC_ESERVER with the reason (retried). */
static int edge_connect(edge_t *g, mc_error_t *err)
{
    natsOptions *o = NULL;
    natsStatus st = natsOptions_Create(&o);
    if (st == NATS_OK) {
        st = natsOptions_SetURL(o, g->cfg->source_nats.url);
    }
    if (st == NATS_OK) {
        st = natsOptions_SetMaxReconnect(o, -1); /* libnats reconnects for ever */
    }
    if (st == NATS_OK) {
        st = natsOptions_SetReconnectWait(o, 250);
    }
    if (st == NATS_OK) {
        st = natsOptions_SetTimeout(o, EDGE_REQUEST_TIMEOUT_MS);
    }
    if (st == NATS_OK && !g->rp) {
        /* The edge's reader subscribes again after a reconnect; a replay's requests need no
         * telling (and its state, on its caller's stack, is gone once it returns). */
        st = natsOptions_SetReconnectedCB(o, on_reconnected, g);
    }
    if (st == NATS_OK) {
        st = natsOptions_SetName(o, g->rp ? "mongocast-edge-catchup" : "mongocast-edge");
    }
    if (st == NATS_OK) {
        st = natsConnection_Connect(&g->nc, o);
    }
    if (st == NATS_OK) {
        st = natsConnection_JetStream(&g->js, g->nc, NULL);
    }
    natsOptions_Destroy(o);
    if (st != NATS_OK) {
        edge_disconnect(g);
        /* natsStatus_GetText only: the URL (which may hold a password) is never echoed. */
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                            "cannot connect to NATS: %s", natsStatus_GetText(st));
    }
    return 0;
}

static int nats_error(const edge_t *g, mc_error_t *err, const char *what, natsStatus st,
                      jsErrCode code)
{
    return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                        "JetStream stream %s: %s: %s (code %d)", g->cfg->source_nats.stream, what,
                        natsStatus_GetText(st), (int)code);
}

/* The stream's first and last sequences and, when the filter subject is not configured, the
 * stream's one subject (a stream with several needs `subject`). */
static int stream_state(edge_t *g, uint64_t *first, uint64_t *last, char **only_subject,
                        mc_error_t *err)
{
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = EDGE_REQUEST_TIMEOUT_MS;
    natsStatus st = js_GetStreamInfo(&si, g->js, g->cfg->source_nats.stream, &jo, &code);
    if (st != NATS_OK || !si) {
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                            "JetStream stream %s: %s (code %d)%s", g->cfg->source_nats.stream,
                            natsStatus_GetText(st), (int)code,
                            st == NATS_NOT_FOUND ? ": not created yet (the leader's nats sink "
                                                   "creates it with create_stream)"
                                                 : "");
    }
    *first = si->State.FirstSeq;
    *last = si->State.LastSeq;
    if (only_subject) {
        *only_subject = NULL;
        if (si->Config && si->Config->SubjectsLen == 1) {
            *only_subject = strdup(si->Config->Subjects[0]);
        }
    }
    jsStreamInfo_Destroy(si);
    return 0;
}

/* The message at `seq`: 0 and *m (to destroy), MC_ENOTFOUND (no message there: deleted or
 * not yet written), MC_ESERVER. */
static int msg_at(edge_t *g, uint64_t seq, natsMsg **m, mc_error_t *err)
{
    jsErrCode code = 0;
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = EDGE_REQUEST_TIMEOUT_MS;
    *m = NULL;
    natsStatus st = js_GetMsg(m, g->js, g->cfg->source_nats.stream, seq, &jo, &code);
    if (st == NATS_NOT_FOUND || (st != NATS_OK && code == 10037 /* no message found */)) {
        return MC_ENOTFOUND;
    }
    if (st != NATS_OK) {
        return nats_error(g, err, "get message", st, code);
    }
    return 0;
}

/* The event id (Nats-Msg-Id) of the message at `seq`: 0 and *id (to free), MC_ENOTFOUND (no
 * message there: deleted or not yet written), MC_ESERVER. */
static int id_at(edge_t *g, uint64_t seq, char **id, mc_error_t *err)
{
    natsMsg *m = NULL;
    *id = NULL;
    int rc = msg_at(g, seq, &m, err);
    if (rc != 0) {
        return rc;
    }
    const char *v = NULL;
    if (natsMsgHeader_Get(m, "Nats-Msg-Id", &v) != NATS_OK || !v || !*v) {
        natsMsg_Destroy(m);
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "JetStream stream %s: message %" PRIu64
                            " has no Nats-Msg-Id: not written by a mongocast nats sink",
                            g->cfg->source_nats.stream, seq);
    }
    *id = strdup(v);
    natsMsg_Destroy(m);
    return *id ? 0 : MC_ENOMEM;
}

/* The id of the first message at or after `seq` (stepping over a few deleted ones), and its
 * sequence in *at. MC_ENOTFOUND when there is none up to `last`. */
static int id_from(edge_t *g, uint64_t seq, uint64_t last, uint64_t *at, char **id, mc_error_t *err)
{
    for (int i = 0; i < EDGE_MISSING_PROBE && seq <= last; i++, seq++) {
        int rc = id_at(g, seq, id, err);
        if (rc != MC_ENOTFOUND) {
            *at = seq;
            return rc;
        }
    }
    return MC_ENOTFOUND;
}

/* The first sequence in [first, last] whose message's id is after `id` (last + 1 when none),
 * by a binary search (the stream is in id order), and in *exact whether the message before it
 * has that very id. 0, or id_from()'s error (MC_EINVAL: a message without an id). */
static int seq_after(edge_t *g, const char *id, uint64_t first, uint64_t last, uint64_t *out,
                     bool *exact, mc_error_t *err)
{
    uint64_t lo = first ? first : 1, hi = last + 1;
    *exact = false;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        char *at_id = NULL;
        uint64_t at = mid;
        int rc = id_from(g, mid, hi - 1, &at, &at_id, err);
        if (rc == MC_ENOTFOUND) {
            hi = mid; /* nothing readable from mid on: treat as after */
            continue;
        }
        if (rc != 0) {
            return rc;
        }
        int cmp = mc__token_data_cmp(at_id, id);
        free(at_id);
        if (cmp > 0) {
            hi = mid;
        } else {
            /* The last such probe is the newest message at or before `id`. */
            *exact = cmp == 0;
            lo = at + 1;
        }
    }
    *out = lo;
    return 0;
}

typedef enum start_result { START_OK = 0, START_RETRY, START_LOST, START_FAILED } start_result_t;

/* The first sequence of the ring's warm-up: up to `history` messages before `from` (never
 * before the stream's first), so that the fan-out's history ring holds what a client that
 * moves here from another node (or from this node before a restart) resumes from. */
static uint64_t warm_start(const edge_t *g, uint64_t first, uint64_t from)
{
    uint64_t warm = g->cfg->history;
    uint64_t lowest = first ? first : 1;
    return from > lowest + warm ? from - warm : lowest;
}

/* Where to read from: after the stored position (binary search by id over the stream's
 * sequences), or after the stream's last message; in both cases less the ring's warm-up. */
static start_result_t find_start(edge_t *g, mc_error_t *err)
{
    uint64_t first = 0, last = 0;
    if (stream_state(g, &first, &last, NULL, err) != 0) {
        return START_RETRY;
    }
    if (!g->stored_id) {
        g->next_seq = warm_start(g, first, last + 1);
        g->open_seq = last + 1;
        if (last > 0 && g->next_seq == last + 1) {
            /* No warm-up (history: 0): every runner without a position starts here (as the
             * watcher's "now"). */
            char *id = NULL;
            uint64_t at = 0;
            int rc = id_from(g, last, last, &at, &id, err);
            if (rc == 0) {
                bson_t *tok = BCON_NEW("_data", BCON_UTF8(id));
                mc__ledger_origin(g->s, tok);
                mc__mark_t *mark = mc__mark_new(g->s->index, tok, false, 0);
                bson_destroy(tok);
                free(id);
                if (mark && !mc__route_mark(g->s, mark)) {
                    return START_RETRY;
                }
            } else if (rc != MC_ENOTFOUND) {
                return rc == MC_EINVAL ? START_FAILED : START_RETRY;
            }
        }
        mc_log(MC_LOG_INFO, "edge",
               "stream=%s starts after JetStream sequence %" PRIu64 " (ring from %" PRIu64 ")",
               g->cfg->name, last, g->next_seq);
        return START_OK;
    }
    uint64_t lo = 0;
    bool exact = false;
    int rc = seq_after(g, g->stored_id, first, last, &lo, &exact, err);
    if (rc != 0) {
        return rc == MC_EINVAL ? START_FAILED : START_RETRY;
    }
    if (lo == first && first > 1) {
        /* Everything kept is after the position, and messages before were removed: the
         * events in between may be gone. */
        mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                     "the stored position %.40s is older than the first message kept in "
                     "JetStream stream %s (sequence %" PRIu64 ")",
                     g->stored_id, g->cfg->source_nats.stream, first);
        return START_LOST;
    }
    g->next_seq = warm_start(g, first, lo);
    g->open_seq = lo;
    mc_log(MC_LOG_INFO, "edge",
           "stream=%s resumes after %.40s at JetStream sequence %" PRIu64 " (ring from %" PRIu64
           ")",
           g->cfg->name, g->stored_id, lo, g->next_seq);
    return START_OK;
}

static int subscribe(edge_t *g, mc_error_t *err)
{
    char *subject = NULL;
    if (!g->cfg->source_nats.subject) {
        uint64_t f, l;
        if (stream_state(g, &f, &l, &subject, err) != 0) {
            return MC_ESERVER;
        }
        if (!subject) {
            subject = strdup(">"); /* several subjects: every message of the stream */
            if (!subject) {
                return MC_ENOMEM;
            }
        }
    }
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = g->cfg->source_nats.stream;
    so.Ordered = true;
    so.Config.DeliverPolicy = js_DeliverByStartSequence;
    so.Config.OptStartSeq = g->next_seq;
    jsErrCode code = 0;
    g->sub_reconnects = atomic_load(&g->reconnects);
    natsStatus st = js_SubscribeSync(
        &g->sub, g->js, subject ? subject : g->cfg->source_nats.subject, NULL, &so, &code);
    free(subject);
    if (st != NATS_OK) {
        g->sub = NULL;
        return nats_error(g, err, "subscribe", st, code);
    }
    /* Bounded: what libnats buffers for this subscription before it reports a slow consumer
     * (then the edge subscribes again from its own next sequence). */
    natsSubscription_SetPendingLimits(g->sub, 65536, 256 * 1024 * 1024);
    return 0;
}

/* ---- Reading ------------------------------------------------------------------------------- */

typedef enum read_result { READ_STOP = 0, READ_AGAIN, READ_FAILED } read_result_t;

/* The stream sequence of a delivered JetStream message, read from its reply subject
 * ($JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>, or
 * the newer form with <domain>.<account hash> before <stream> and more tokens after) without
 * the allocations of natsMsg_GetMetaData(). */
static bool stream_sequence(natsMsg *m, uint64_t *seq)
{
    const char *r = natsMsg_GetReply(m);
    if (!r || strncmp(r, "$JS.ACK.", 8) != 0) {
        return false;
    }
    const char *tok[12];
    size_t len[12];
    int n = 0;
    for (const char *p = r + 8; n < 12;) {
        const char *dot = strchr(p, '.');
        tok[n] = p;
        len[n] = dot ? (size_t)(dot - p) : strlen(p);
        n++;
        if (!dot) {
            break;
        }
        p = dot + 1;
    }
    /* 7 tokens after $JS.ACK (the v1 form), or 9 and more (v2: domain, account hash first). */
    int at = n == 7 ? 3 : n >= 9 ? 5 : -1;
    if (at < 0 || len[at] == 0 || len[at] > 20) {
        return false;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < len[at]; i++) {
        char c = tok[at][i];
        if (c < '0' || c > '9' || v > (UINT64_MAX - 9) / 10) {
            return false;
        }
        v = v * 10 + (uint64_t)(c - '0');
    }
    *seq = v;
    return true;
}

/* The stream is open once the ring's warm-up is over (until then the daemon refuses its
 * subscribers: they would take the warm-up's older events for new ones). False: stop. */
static bool announce_open(edge_t *g)
{
    mc__stream_set_state(g->s, MC_STREAM_OPEN, 0, "open (JetStream stream %s)",
                         g->cfg->source_nats.stream);
    if (g->announced) {
        return true;
    }
    g->announced = true;
    mc_log(MC_LOG_INFO, "edge", "JetStream consumer open stream=%s at sequence %" PRIu64,
           g->cfg->name, g->next_seq);
    return emit_control(g, MC_EVENT_READY, NULL);
}

typedef enum take_result { TAKE_ROUTED = 0, TAKE_SKIPPED, TAKE_FAILED } take_result_t;

/* The step a live message and a replayed one share: the message at stream sequence `seq`
 * decoded back into its event (numbered as the stream's next event by the edge's own reader,
 * 0 in a replay, as the watcher's replay numbers), checked against its Nats-Msg-Id, dropped
 * when at or before the newest event taken (TAKE_SKIPPED: never twice), else routed with the
 * edge's recipient rules: TAKE_ROUTED, *out (one reference) and *note. TAKE_FAILED: a message
 * an edge cannot read (err says why). Moves next_seq past `seq`. */
static take_result_t decode_and_route(edge_t *g, natsMsg *m, uint64_t seq, mc_event_t **out,
                                      mc__route_note_t *note, mc_error_t *err)
{
    *out = NULL;
    *note = MC__ROUTE_OK;
    const char *msg_id = NULL;
    natsMsgHeader_Get(m, "Nats-Msg-Id", &msg_id);
    mc_event_t *ev = NULL;
    mc_error_t derr = {0};
    int rc = mc__edge_payload_decode((const uint8_t *)natsMsg_GetData(m),
                                     (size_t)natsMsg_GetDataLength(m), g->cfg->name,
                                     g->rp ? 0 : g->s->next_seq,
                                     mc__recipients_event_path(g->rcpt), &ev, &derr);
    if (rc != 0) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "JetStream message %" PRIu64 ": %s", seq, derr.message);
        return TAKE_FAILED;
    }
    if (!msg_id || strcmp(msg_id, mc_event_id(ev)) != 0) {
        mc_event_unref(&ev);
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "JetStream message %" PRIu64 ": its Nats-Msg-Id is not its event's id", seq);
        return TAKE_FAILED;
    }
    g->next_seq = seq + 1;
    if (g->last_id && mc__token_data_cmp(mc_event_id(ev), g->last_id) <= 0) {
        mc_event_unref(&ev); /* at or before what was taken: never twice */
        return TAKE_SKIPPED;
    }
    if (!g->rp) {
        g->s->next_seq++;
    }
    if (mc_event_kind(ev) == MC_EVENT_CHANGE) {
        *note = mc__recipients_route(g->rcpt, ev, &g->e->stopping);
    }
    set_last_id(g, mc_event_id(ev));
    *out = ev;
    return TAKE_ROUTED;
}

/* One message of the edge's own reader: taken (decode_and_route()), counted, handed to the
 * router. */
static read_result_t take_message(edge_t *g, natsMsg *m, mc_error_t *err)
{
    uint64_t seq = 0;
    if (!stream_sequence(m, &seq)) {
        return READ_AGAIN; /* not a JetStream message (a status): nothing to route */
    }
    if (seq < g->next_seq) {
        return READ_AGAIN; /* delivered again after a resubscribe */
    }
    mc_event_t *ev = NULL;
    mc__route_note_t note = MC__ROUTE_OK;
    take_result_t tr = decode_and_route(g, m, seq, &ev, &note, err);
    if (tr == TAKE_FAILED) {
        return READ_FAILED;
    }
    if (tr == TAKE_SKIPPED) {
        return READ_AGAIN;
    }
    if (mc_event_kind(ev) == MC_EVENT_CHANGE) {
        note_routing(g, ev, note);
    } else {
        pthread_mutex_lock(&g->s->lock);
        g->s->status.invalidates++;
        pthread_mutex_unlock(&g->s->lock);
    }
    if (!push_event(g, ev)) {
        return READ_STOP;
    }
    if (!g->announced && g->next_seq >= g->open_seq && !announce_open(g)) {
        return READ_STOP;
    }
    mc__backoff_reset(&g->backoff);
    return READ_AGAIN;
}

/* Reads until stop, a reason to subscribe again (READ_AGAIN), or a failure. */
static read_result_t read_loop(edge_t *g, mc_error_t *err)
{
    while (!stopping(g)) {
        if (atomic_load(&g->reconnects) != g->sub_reconnects) {
            /* The server may have restarted: its consumer is gone. Again from next_seq. */
            mc_log(MC_LOG_INFO, "edge",
                   "stream=%s reconnected to NATS, reading again from "
                   "JetStream sequence %" PRIu64,
                   g->cfg->name, g->next_seq);
            return READ_AGAIN;
        }
        natsMsg *m = NULL;
        natsStatus st = natsSubscription_NextMsg(&m, g->sub, EDGE_NEXT_WAIT_MS);
        if (st == NATS_TIMEOUT) {
            natsConnStatus cs = natsConnection_Status(g->nc);
            if (cs != NATS_CONN_STATUS_CONNECTED) {
                /* libnats is reconnecting: say so until the reconnect (then read again). */
                mc__stream_set_state(g->s, MC_STREAM_RETRYING, 0,
                                     "NATS connection lost, reconnecting");
                continue;
            }
            /* Nothing more to read: a warm-up whose last messages the subject filter left
             * out is over too. */
            if (!g->announced && !announce_open(g)) {
                return READ_STOP;
            }
            continue;
        }
        if (st != NATS_OK) {
            mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                         "JetStream subscription: %s", natsStatus_GetText(st));
            return READ_AGAIN;
        }
        /* Gathers what follows closely (a burst the leader published from one batch of its
         * change stream) and routes it together, so the fan-out sends it in one write per
         * client, as it does for a watcher's batch: what is queued already, and what comes
         * within one wait of EDGE_GATHER_WAIT_MS, at most EDGE_GATHER_MAX messages. */
        natsMsg *batch[EDGE_GATHER_MAX];
        int n = 0;
        batch[n++] = m;
        bool waited = false;
        while (n < EDGE_GATHER_MAX) {
            uint64_t queued = 0;
            natsSubscription_QueuedMsgs(g->sub, &queued);
            if (queued == 0) {
                if (waited) {
                    break;
                }
                waited = true;
            }
            if (natsSubscription_NextMsg(&batch[n], g->sub, EDGE_GATHER_WAIT_MS) != NATS_OK) {
                break;
            }
            n++;
        }
        read_result_t rr = READ_AGAIN;
        for (int i = 0; i < n; i++) {
            if (rr == READ_AGAIN) {
                rr = take_message(g, batch[i], err);
            }
            natsMsg_Destroy(batch[i]);
        }
        if (rr != READ_AGAIN) {
            return rr;
        }
    }
    return READ_STOP;
}

/* ---- The thread ---------------------------------------------------------------------------- */

static void set_failed(edge_t *g, const char *code, const char *reason, const char *detail)
{
    mc_log(MC_LOG_ERROR, "edge", "stream=%s failed: %s", g->cfg->name, detail);
    mc__stream_set_state(g->s, MC_STREAM_FAILED, 0, "%s", detail);
    g->fail_code = code;
    g->fail_reason = reason;
}

/* Waits before the next attempt; true when the engine stops meanwhile. */
static bool retry_later(edge_t *g, const mc_error_t *err)
{
    uint32_t delay = mc__backoff_next(&g->backoff);
    mc_log_ratelimited(&g->rl, MC_LOG_WARN, "edge", "stream=%s retry_in_ms=%u: %s", g->cfg->name,
                       delay, err->message);
    mc__stream_set_state(g->s, MC_STREAM_RETRYING, 0, "%s", err->message);
    return mc__engine_sleep(g->e, delay);
}

void *mc__source_nats_main(mc__stream_t *s)
{
    edge_t g;
    memset(&g, 0, sizeof g);
    g.s = s;
    g.e = s->engine;
    g.cfg = s->cfg;
    g.rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    g.rl_unresolved = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    g.rl_missing = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mc__backoff_init(&g.backoff, g.e->opts.backoff_initial_ms, g.e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)s->index * 97 + 1);
    const char *name = s->cfg->name;
    mc_error_t err = {0};
    g.rcpt = mc__recipients_new(s->cfg, name, NULL, &err);
    if (!g.rcpt) {
        set_failed(&g, MC_EVENT_ERROR_FAILED, "stream failed", err.message);
    }
    bool failed = !g.rcpt;
    if (!failed) {
        mc__position_t start = {0};
        int rc = mc__ledger_load(s, NULL, &start, &err);
        if (rc != 0) {
            set_failed(&g, MC_EVENT_ERROR_CHECKPOINT, "the stored checkpoint cannot be used",
                       err.message);
            failed = true;
        } else if (start.token && mc__token_data(start.token)) {
            g.stored_id = strdup(mc__token_data(start.token));
        }
        mc__position_clear(&start);
    }
    while (!failed && !stopping(&g)) {
        memset(&err, 0, sizeof err);
        if (!g.nc && edge_connect(&g, &err) != 0) {
            if (retry_later(&g, &err)) {
                break;
            }
            continue;
        }
        if (!g.positioned) {
            start_result_t sr = find_start(&g, &err);
            if (sr == START_FAILED) {
                set_failed(&g, MC_EVENT_ERROR_FATAL,
                           "the JetStream stream holds messages an edge cannot read", err.message);
                break;
            }
            if (sr == START_LOST && s->cfg->on_history_lost == MC_ON_HISTORY_LOST_FAIL) {
                set_failed(&g, MC_EVENT_ERROR_HISTORY_LOST,
                           "history lost: the resume point is no longer in the JetStream "
                           "stream (on_history_lost: fail)",
                           err.message);
                break;
            }
            if (sr == START_LOST) {
                mc_log(MC_LOG_WARN, "edge",
                       "stream=%s history lost, restarting from the first "
                       "message kept (on_history_lost: restart): %s",
                       name, err.message);
                pthread_mutex_lock(&s->lock);
                s->status.resets++;
                pthread_mutex_unlock(&s->lock);
                if (!emit_control(&g, MC_EVENT_RESET, "history lost")) {
                    break;
                }
                uint64_t first = 0, last = 0;
                if (stream_state(&g, &first, &last, NULL, &err) != 0) {
                    if (retry_later(&g, &err)) {
                        break;
                    }
                    continue;
                }
                g.next_seq = first;
                g.open_seq = first;
            } else if (sr == START_RETRY) {
                if (retry_later(&g, &err)) {
                    break;
                }
                continue;
            }
            g.positioned = true;
        }
        int src = subscribe(&g, &err);
        if (src == MC_ECONFIG) {
            set_failed(&g, MC_EVENT_ERROR_FATAL, "the edge stream's source is misconfigured",
                       err.message);
            break;
        }
        if (src != 0) {
            if (retry_later(&g, &err)) {
                break;
            }
            continue;
        }
        if (g.next_seq >= g.open_seq && !announce_open(&g)) {
            break; /* nothing to warm up (or a resubscription): open now */
        }
        if (!g.announced) {
            mc__stream_set_state(s, MC_STREAM_OPENING, 0,
                                 "loading the history ring from JetStream stream %s",
                                 s->cfg->source_nats.stream);
        }
        read_result_t rr = read_loop(&g, &err);
        /* Destroy only: it removes the subscription's interest, and the server then drops the
         * ephemeral consumer. natsSubscription_Unsubscribe() would also delete the consumer,
         * but in libnats 3.4 that races with the ordered consumer's own reset after a
         * reconnect (a use-after-free of the consumer's name, seen under ASan). */
        natsSubscription_Destroy(g.sub);
        g.sub = NULL;
        if (rr == READ_STOP) {
            break;
        }
        if (rr == READ_FAILED) {
            set_failed(&g, MC_EVENT_ERROR_FATAL,
                       "the JetStream stream holds messages an edge cannot read", err.message);
            break;
        }
        if (err.message[0] && retry_later(&g, &err)) {
            break;
        }
    }
    pthread_mutex_lock(&s->lock);
    bool is_failed = s->status.state == MC_STREAM_FAILED;
    pthread_mutex_unlock(&s->lock);
    if (is_failed) {
        mc_event_t *ev = mc_event_new_error(name, s->next_seq++,
                                            g.fail_code ? g.fail_code : MC_EVENT_ERROR_FAILED, 0,
                                            g.fail_reason ? g.fail_reason : "stream failed");
        if (ev) {
            push_event(&g, ev);
        }
    }
    edge_disconnect(&g);
    mc__recipients_destroy(g.rcpt);
    free(g.last_id);
    free(g.stored_id);
    return NULL;
}

/* ---- A client's catch-up (mc__source_nats_replay) ------------------------------------------ */

#define EDGE_REPLAY_IDLE_MS 100 /* at the stream's end: the wait before looking again */
#define EDGE_REPLAY_NAP_MS 20   /* slices of a wait, between which cancel is checked */

bool mc__nats_subject_matches(const char *filter, const char *subject)
{
    for (;;) {
        const char *fe = strchr(filter, '.'), *se = strchr(subject, '.');
        size_t fl = fe ? (size_t)(fe - filter) : strlen(filter);
        size_t sl = se ? (size_t)(se - subject) : strlen(subject);
        if (fl == 1 && filter[0] == '>') {
            return sl > 0;
        }
        bool any = fl == 1 && filter[0] == '*';
        if (sl == 0 || (!any && (fl != sl || memcmp(filter, subject, fl) != 0))) {
            return false;
        }
        if (!fe || !se) {
            return !fe && !se;
        }
        filter = fe + 1;
        subject = se + 1;
    }
}

/* Waits up to ms in short slices; true when the engine stops or the catch-up is cancelled. */
static bool replay_sleep(edge_t *g, uint32_t ms)
{
    for (uint32_t slept = 0; slept < ms && !stopping(g); slept += EDGE_REPLAY_NAP_MS) {
        struct timespec ts = {0, EDGE_REPLAY_NAP_MS * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return stopping(g);
}

static bool replay_retry_later(edge_t *g, const mc_error_t *err)
{
    uint32_t delay = mc__backoff_next(&g->backoff);
    mc_log_ratelimited(&g->rl, MC_LOG_WARN, "edge",
                       "client catch-up error stream=%s retry_in_ms=%u: %s", g->cfg->name, delay,
                       err->message);
    return replay_sleep(g, delay);
}

typedef enum replay_start {
    REPLAY_AT = 0,   /* next_seq is the message after the id */
    REPLAY_RETRY,    /* NATS unreachable or slow: again */
    REPLAY_LOST,     /* older than the first message kept */
    REPLAY_UNKNOWN,  /* no message has that id */
    REPLAY_UNREADABLE /* a message without an id */
} replay_start_t;

/* Finds the message whose id is `after_id` (seq_after(), as at the edge's start) and sets
 * next_seq to the sequence after it. */
static replay_start_t replay_find(edge_t *g, const char *after_id, mc_error_t *err)
{
    uint64_t first = 0, last = 0, after = 0;
    bool exact = false;
    if (stream_state(g, &first, &last, NULL, err) != 0) {
        return REPLAY_RETRY;
    }
    int rc = seq_after(g, after_id, first, last, &after, &exact, err);
    if (rc != 0) {
        return rc == MC_EINVAL ? REPLAY_UNREADABLE : REPLAY_RETRY;
    }
    if (exact) {
        g->next_seq = after;
        return REPLAY_AT;
    }
    if (after == first && first > 1) {
        mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                     "the id is older than the first message kept in JetStream stream %s "
                     "(sequence %" PRIu64 ")",
                     g->cfg->source_nats.stream, first);
        return REPLAY_LOST;
    }
    mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                 "no message of JetStream stream %s has this id", g->cfg->source_nats.stream);
    return REPLAY_UNKNOWN;
}

/* Reads from next_seq on, one get-message request per message (one message in memory at a
 * time), handing each event to the replay's owner; at the end of the stream it reports the
 * newest position (the last event's id) and looks again every EDGE_REPLAY_IDLE_MS, until the
 * owner says stop or cancels. 0: stopped; MC_ESERVER: a NATS error (retried from next_seq);
 * MC_ENOTFOUND: messages were removed before they were read; MC_EINVAL: an unreadable
 * message. */
static int replay_read(edge_t *g, mc_error_t *err)
{
    uint64_t first = 0, last = 0;
    if (stream_state(g, &first, &last, NULL, err) != 0) {
        return MC_ESERVER;
    }
    const char *filter = g->cfg->source_nats.subject;
    while (!stopping(g)) {
        if (g->next_seq > last) {
            if (!g->rp->on_position(g->rp->ud, g->last_id) ||
                replay_sleep(g, EDGE_REPLAY_IDLE_MS)) {
                return 0;
            }
            if (stream_state(g, &first, &last, NULL, err) != 0) {
                return MC_ESERVER;
            }
            continue;
        }
        natsMsg *m = NULL;
        int rc = msg_at(g, g->next_seq, &m, err);
        if (rc == MC_ENOTFOUND) {
            /* Deleted, or removed by the stream's limits since it was looked at. */
            if (stream_state(g, &first, &last, NULL, err) != 0) {
                return MC_ESERVER;
            }
            if (g->next_seq < first) {
                return mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                                    "JetStream stream %s removed message %" PRIu64
                                    " before the catch-up read it",
                                    g->cfg->source_nats.stream, g->next_seq);
            }
            g->next_seq++;
            continue;
        }
        if (rc != 0) {
            return MC_ESERVER;
        }
        const char *subject = natsMsg_GetSubject(m);
        if (filter && !(subject && mc__nats_subject_matches(filter, subject))) {
            natsMsg_Destroy(m);
            g->next_seq++; /* not of the edge's subject: the live reader skips it too */
            continue;
        }
        mc_event_t *ev = NULL;
        mc__route_note_t note = MC__ROUTE_OK;
        take_result_t tr = decode_and_route(g, m, g->next_seq, &ev, &note, err);
        natsMsg_Destroy(m);
        if (tr == TAKE_FAILED) {
            return MC_EINVAL;
        }
        if (tr == TAKE_ROUTED &&
            !g->rp->on_event(g->rp->ud, ev, note == MC__ROUTE_UNRESOLVED)) {
            return 0;
        }
        mc__backoff_reset(&g->backoff);
    }
    return 0;
}

int mc__source_nats_replay(mc__stream_t *s, const char *after_id, const mc__replay_t *rp,
                           mc_error_t *err)
{
    edge_t g;
    memset(&g, 0, sizeof g);
    g.s = s;
    g.e = s->engine;
    g.cfg = s->cfg;
    g.rp = rp;
    g.rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mc__backoff_init(&g.backoff, g.e->opts.backoff_initial_ms, g.e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)rp);
    /* Routing of its own (no lookups on an edge: the same answers as the stream's). */
    g.rcpt = mc__recipients_new(s->cfg, s->cfg->name, NULL, err);
    if (!g.rcpt) {
        return MC_ENOMEM;
    }
    set_last_id(&g, after_id); /* also: nothing at or before the id is handed over */
    int rc = g.last_id ? 0 : MC_ENOMEM;
    while (rc == 0 && !stopping(&g)) {
        memset(err, 0, sizeof *err);
        if (!g.nc && edge_connect(&g, err) != 0) {
            if (replay_retry_later(&g, err)) {
                break;
            }
            continue;
        }
        if (!g.positioned) {
            replay_start_t st = replay_find(&g, after_id, err);
            if (st == REPLAY_RETRY) {
                if (replay_retry_later(&g, err)) {
                    break;
                }
                continue;
            }
            rc = st == REPLAY_LOST      ? MC_ENOTFOUND
                 : st == REPLAY_UNKNOWN ? MC_ESERVER
                 : st == REPLAY_AT      ? 0
                                        : MC_EINVAL;
            g.positioned = rc == 0;
            continue;
        }
        int rrc = replay_read(&g, err);
        if (rrc == MC_ESERVER) {
            if (replay_retry_later(&g, err)) {
                break;
            }
            continue;
        }
        rc = rrc;
        break;
    }
    if (rc == 0) {
        memset(err, 0, sizeof *err);
    }
    edge_disconnect(&g);
    mc__recipients_destroy(g.rcpt);
    free(g.last_id);
    return rc;
}
