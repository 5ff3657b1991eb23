/*
 * watcher.c: one thread per stream that owns the change stream: open, read, normalise,
 * route, and heal; and the catch-up threads of detached sink runners, which run the same
 * read loop (same event building, recipient routing, summaries and image hooks) from a
 * runner's own position into that runner's queue only, until they can rejoin the shared path.
 *
 * Watcher thread only (one per stream), or one catch-up thread per (runner, stream) being
 * caught up; a thread shares nothing with the others except the runners' queues (through
 * router.c or mc__runner_push_wait()), the client pool and the stream's status (locked in
 * engine.c). Only the watcher changes the stream's status and counters, emits ready and
 * reset to every sink, and numbers events; catch-up events have seq 0.
 *
 * Position rules (DESIGN §1, reliability-notes §2.6):
 *   - `pos` is the newest position this watcher handed to the queue: the last event's token,
 *     or the post-batch resume token of an empty batch (so quiet streams keep a fresh
 *     position). Every reopen starts from `pos`, never from "now", unless history was lost
 *     and on_history_lost is restart.
 *   - At start `pos` is the oldest stored position of the stream's sinks (ledger.c, which
 *     also refuses records of another namespace, definition or deployment): startAfter when
 *     it is an invalidate's token, resumeAfter otherwise; with nothing stored the stream
 *     starts now (or at the ad hoc start option), and the first position the server reports
 *     becomes every sink's initial position.
 *   - After an invalidate the stream is destroyed and reopened with startAfter the
 *     invalidate token before next() is called again: libmongoc 1.23 would otherwise resume
 *     with resumeAfter that token and the server would answer 260 (wire notes §3.6).
 * Routing happens here, before an event is shared: mc_event_new_change() decides a path
 * recipient from the write itself; the lookup form (recipient_lookup.c) reads its own change
 * stream on the lookup collection up to the event's cluster time, so events must be routed
 * in stream order, one at a time, on the thread that reads them. A catch-up thread has its
 * own routing instance, whose lookup streams start at the first (older) event it reads, so
 * it routes each event as of that event's own time, exactly as the watcher did. An event
 * whose recipient cannot be decided is counted (status.unresolved_recipients, by the watcher
 * only) and logged, rate-limited. A catch-up's image hooks run quiet (images.h): the watcher
 * owns the stream's image status.
 * libmongoc resumes the errors it classifies as resumable by itself, once per error; what it
 * hands back is classified here: transient -> backoff and reopen; 286 -> on_history_lost;
 * everything else that says "this will never work" -> the stream fails, the others go on.
 * A stream that fails (a fatal error, lost history with on_history_lost: fail, a stored
 * position ledger.c refuses or cannot read, routing that cannot be set up) says so in its
 * last event, an error event (announce_failure()), with a fixed reason: the server's own text
 * goes only to the log and the stream's status. A catch-up never fails the stream: what
 * stops it fails its runner, which is reported per sink.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_private.h"
#include "images.h"
#include "recipient_rules.h"
#include "source_nats.h"
#include "split_event.h"

#define CATCHUP_PUSH_WAIT_MS 200
#define REPLAY_BATCH 1000 /* events per getMore of a client catch-up (mc__stream_replay) */

typedef enum err_class {
    ERR_TRANSIENT = 0,
    ERR_FATAL,
    ERR_HISTORY_LOST,
} err_class_t;

typedef struct watcher {
    mc__stream_t *s;
    mc_engine_t *e;
    mc__position_t pos;        /* newest position handed to the queue, when it is a token */
    mc_event_t *pos_ev;        /* ... or a reference to the newest event pushed (see pos_token) */
    const char *last_op;       /* operationType of the previous event (invalidate reason) */
    char last_op_buf[32];
    bool first_open;           /* the ad hoc start option applies only before any position */
    mc__backoff_t backoff;
    mc_log_ratelimit_t rl;
    mc_log_ratelimit_t rl_unresolved;
    mc_log_ratelimit_t rl_missing;
    mc__recipients_t *rcpt; /* the stream's recipient rules, lookups and summaries (a catch-up
                               has its own: its lookups follow its own, older, events) */
    mc__images_t *images;   /* pre-/post-images kept on or watched; NULL: not needed */
    /* Why the stream failed, for its error event: static strings (NULL: the generic code and
     * reason) and MongoDB's code or 0. */
    const char *fail_code;
    const char *fail_reason;
    int fail_server_code;
    /* on_oversize (split_event.h): fragments of the event being read, and whether the server
     * refused $changeStreamSplitLargeEvent (MongoDB before 6.0.9: 40324), after which the
     * stream is opened without it and an oversize event fails the cursor with 10334. */
    mc__split_t split;
    bool split_refused;
    mc__runner_t *cu;          /* catch-up mode: the runner it reads for; NULL: the watcher */
    int cu_slot;
    uint32_t cu_at_t, cu_at_i; /* catch-up without a position: startAtOperationTime (an
                                  initial copy's time; 0, 0: none) */
    bool rejoined;             /* catch-up: back on the shared path, stop reading */
    bool rp_unresolved;        /* replay: routing could not decide the event being pushed */
    const mc__replay_t *rp;    /* replay mode (a daemon's client catch-up): events go to its
                                  callbacks; NULL otherwise */
    mongoc_client_pool_t *pool; /* where cursors come from: the engine's, or a replay's own */
} watcher_t;

static bool stopping(const watcher_t *w)
{
    return atomic_load(&w->e->stopping) || (w->rp && atomic_load(w->rp->cancel));
}

/* Only the stream's own watcher counts, numbers and reports; a catch-up or a replay re-reads
 * what it counted already. */
static bool is_watcher(const watcher_t *w)
{
    return !w->cu && !w->rp;
}

static void stream_count(mc__stream_t *s, uint64_t *field, uint64_t add)
{
    pthread_mutex_lock(&s->lock);
    *field += add;
    pthread_mutex_unlock(&s->lock);
}

/* The wall clock for last_event_ms: the coarse clock (a few ms of resolution, which a status
 * field does not need more of) is a plain memory read, and this runs for every event. */
static int64_t status_wall_ms(void)
{
#ifdef CLOCK_REALTIME_COARSE
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME_COARSE, &ts) == 0) {
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    }
#endif
    return mc__wall_ms();
}

/* ---- Pushing ----------------------------------------------------------------------------- */

/* The next sequence number: the watcher numbers its stream's events; a catch-up re-reads
 * events the shared path numbered already, so its events carry 0. */
static uint64_t next_seq(watcher_t *w)
{
    return is_watcher(w) ? w->s->next_seq++ : 0;
}

/* Catch-up: pushes into the runner's queue (waiting for room), then rejoins the shared path
 * if it has caught up. False: stop reading (rejoined, the runner failed, or stopping). */
static bool catchup_push(watcher_t *w, mc__pref_t *item)
{
    const char *data = mc__pref_data(item);
    char *keep = data ? bson_strdup(data) : NULL;
    int rc;
    do {
        rc = mc__runner_push_wait(w->cu, w->cu_slot, item, CATCHUP_PUSH_WAIT_MS, true);
    } while (rc == MC_EAGAIN && !stopping(w));
    mc__pref_clear(item);
    bool ok = rc == 0;
    if (ok && keep && mc__route_rejoin(w->s, w->cu, w->cu_slot, keep, false)) {
        w->rejoined = true;
        ok = false;
    }
    bson_free(keep);
    return ok;
}

/* Takes `ev`. The watcher routes it to the stream's runners (router.c: never blocks on a
 * sink, only on room in a live one); a catch-up pushes it into its runner. False when the
 * reader must stop (engine stopping; catch-up rejoined or its runner gone). */
static bool push_event(watcher_t *w, mc_event_t *ev)
{
    mc__stream_t *s = w->s;
    mc__event_set_stream_index(ev, s->index);
    if (w->rp) {
        bool unresolved = w->rp_unresolved;
        w->rp_unresolved = false;
        return w->rp->on_event(w->rp->ud, ev, unresolved) && !stopping(w);
    }
    if (w->cu) {
        mc__pref_t item = {.ev = ev};
        return catchup_push(w, &item);
    }
    /* This watcher is the only writer of its stream's counters: plain stores, no lock. */
    atomic_store_explicit(&s->stat_last_seq, mc_event_seq(ev), memory_order_relaxed);
    if (mc_event_kind(ev) == MC_EVENT_CHANGE) {
        atomic_store_explicit(&s->stat_events,
                              atomic_load_explicit(&s->stat_events, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        atomic_store_explicit(&s->stat_last_event_ms, status_wall_ms(), memory_order_relaxed);
    }
    return mc__route_event(s, ev) && !stopping(w);
}

static bool push_position(watcher_t *w, const bson_t *token)
{
    if (w->rp) {
        return w->rp->on_position(w->rp->ud, mc__token_data(token)) && !stopping(w);
    }
    uint64_t seq = w->cu ? 0 : atomic_load_explicit(&w->s->stat_last_seq, memory_order_relaxed);
    mc__mark_t *m = mc__mark_new(w->s->index, token, false, seq);
    if (!m) {
        return false;
    }
    if (w->cu) {
        mc__pref_t item = {.mark = m};
        return catchup_push(w, &item);
    }
    return mc__route_mark(w->s, m) && !stopping(w);
}

/* The watcher's position: an owned token (stored checkpoint, post-batch token, ad hoc
 * start) or the newest event pushed, referenced rather than copied (events are immutable). */
static const bson_t *pos_token(const watcher_t *w)
{
    return w->pos_ev ? mc_event_resume_token(w->pos_ev) : w->pos.token;
}

static void set_pos(watcher_t *w, const bson_t *token, bool invalidate)
{
    mc__position_clear(&w->pos);
    mc_event_unref(&w->pos_ev);
    w->pos.token = token ? bson_copy(token) : NULL;
    w->pos.invalidate = invalidate;
}

static void set_pos_event(watcher_t *w, mc_event_t *ev, bool invalidate)
{
    mc__position_clear(&w->pos);
    mc_event_unref(&w->pos_ev);
    w->pos_ev = mc_event_ref(ev);
    w->pos.invalidate = invalidate;
}

/* ---- Opening ------------------------------------------------------------------------------ */

static const char *full_document_name(mc_full_document_t v)
{
    switch (v) {
    case MC_FULL_DOCUMENT_UPDATE_LOOKUP: return "updateLookup";
    case MC_FULL_DOCUMENT_WHEN_AVAILABLE: return "whenAvailable";
    case MC_FULL_DOCUMENT_REQUIRED: return "required";
    default: return NULL;
    }
}

static const char *before_change_name(mc_before_change_t v)
{
    switch (v) {
    case MC_BEFORE_CHANGE_WHEN_AVAILABLE: return "whenAvailable";
    case MC_BEFORE_CHANGE_REQUIRED: return "required";
    default: return NULL;
    }
}

static bson_t *build_opts(watcher_t *w)
{
    const mc_stream_config_t *c = w->s->cfg;
    bson_t *opts = bson_new();
    const char *fd = full_document_name(c->full_document);
    if (fd) {
        BSON_APPEND_UTF8(opts, "fullDocument", fd);
    }
    const char *bc = before_change_name(c->full_document_before_change);
    if (bc) {
        BSON_APPEND_UTF8(opts, "fullDocumentBeforeChange", bc);
    }
    int32_t batch = c->batch_size;
    if (w->rp && (batch <= 0 || batch > REPLAY_BATCH)) {
        batch = REPLAY_BATCH; /* a replay reads a backlog: bounded work per getMore */
    }
    if (batch > 0) {
        BSON_APPEND_INT32(opts, "batchSize", batch);
    }
    BSON_APPEND_INT64(opts, "maxAwaitTimeMS", c->max_await_time_ms > 0 ? c->max_await_time_ms : 1000);
    const bson_t *pos = pos_token(w);
    if (pos) {
        BSON_APPEND_DOCUMENT(opts, w->pos.invalidate ? "startAfter" : "resumeAfter", pos);
    } else if (w->cu && (w->cu_at_t || w->cu_at_i)) {
        BSON_APPEND_TIMESTAMP(opts, "startAtOperationTime", w->cu_at_t, w->cu_at_i);
    } else if (w->first_open && w->s->start_at_secs > 0) {
        BSON_APPEND_TIMESTAMP(opts, "startAtOperationTime", (uint32_t)w->s->start_at_secs, 0);
    }
    return opts;
}

/* Whether the stream's own server stages end with $changeStreamSplitLargeEvent. */
static bool pipeline_splits(const bson_t *pipeline)
{
    bson_iter_t it, st;
    bool last = false;
    if (!bson_iter_init(&it, pipeline)) {
        return false;
    }
    while (bson_iter_next(&it)) {
        last = BSON_ITER_HOLDS_DOCUMENT(&it) && bson_iter_recurse(&it, &st) &&
               bson_iter_next(&st) &&
               strcmp(bson_iter_key(&st), "$changeStreamSplitLargeEvent") == 0;
    }
    return last;
}

/* Whether this open adds $changeStreamSplitLargeEvent: on_oversize split and skip, unless the
 * server refused it or the stream's pipeline has it already. Fragment tokens need the stage to
 * resume from (280 otherwise), so every open of such a stream has it. */
static bool adds_split_stage(const watcher_t *w)
{
    return w->s->cfg->on_oversize != MC_ON_OVERSIZE_FAIL && !w->split_refused &&
           !pipeline_splits(&w->s->server_pipeline);
}

static mongoc_change_stream_t *open_stream(watcher_t *w, mongoc_client_t *client)
{
    const mc_stream_config_t *c = w->s->cfg;
    bson_t *opts = build_opts(w);
    const bson_t *pipeline = &w->s->server_pipeline;
    bson_t with_split = BSON_INITIALIZER;
    /* A reopen starts before the first fragment of an event that was under way. */
    mc__split_reset(&w->split);
    if (adds_split_stage(w)) {
        bson_concat(&with_split, pipeline);
        char key[16];
        const char *k;
        bson_uint32_to_string(bson_count_keys(pipeline), &k, key, sizeof(key));
        bson_t st, empty;
        bson_append_document_begin(&with_split, k, -1, &st);
        bson_append_document_begin(&st, "$changeStreamSplitLargeEvent", -1, &empty);
        bson_append_document_end(&st, &empty);
        bson_append_document_end(&with_split, &st);
        pipeline = &with_split;
    }
    mongoc_change_stream_t *cs;
    if (c->db && c->collection) {
        mongoc_collection_t *coll = mongoc_client_get_collection(client, c->db, c->collection);
        cs = mongoc_collection_watch(coll, pipeline, opts);
        mongoc_collection_destroy(coll);
    } else if (c->db) {
        mongoc_database_t *db = mongoc_client_get_database(client, c->db);
        cs = mongoc_database_watch(db, pipeline, opts);
        mongoc_database_destroy(db);
    } else {
        cs = mongoc_client_watch(client, pipeline, opts);
    }
    bson_destroy(&with_split);
    bson_destroy(opts);
    return cs;
}

/* ---- Errors ------------------------------------------------------------------------------- */

static bool fatal_server_code(int code)
{
    switch (code) {
    case 2:     /* BadValue: bad fullDocument value, ... */
    case 9:     /* FailedToParse: token not hex */
    case 11:    /* UserNotFound */
    case 13:    /* Unauthorized */
    case 18:    /* AuthenticationFailed */
    case 47:    /* NoMatchingDocument: required pre/post-image missing */
    case 72:    /* InvalidOptions */
    case 73:    /* InvalidNamespace */
    case 260:   /* InvalidResumeToken */
    case 280:   /* ChangeStreamFatalError: token not found, _id projected out */
    case 10334: /* BSONObjectTooLarge: the event can never be read */
    case 40324: /* unrecognized pipeline stage */
    case 40415: /* unknown field */
    case 40573: /* not a replica set */
    case 40602: /* $changeStream not first */
    case 40647: /* bad resume token */
    case 40649:
    case 40674: /* conflicting start options */
    case 50811: /* KeyString format error: a malformed resume token */
    case 50865:
    case 7182500: /* a split event's single field larger than a fragment */
    case 7182800: /* $changeStreamSplitLargeEvent spec */
    case 7182802: /* $changeStreamSplitLargeEvent not last */
        return true;
    default:
        return false;
    }
}

static err_class_t classify(const bson_error_t *e, const bson_t *reply, int *server_code)
{
    *server_code = 0;
    bool server = e->domain == MONGOC_ERROR_SERVER || e->domain == MONGOC_ERROR_QUERY ||
                  (reply && !bson_empty(reply) && e->code != 0 &&
                   e->domain != MONGOC_ERROR_STREAM && e->domain != MONGOC_ERROR_CLIENT &&
                   e->domain != MONGOC_ERROR_SERVER_SELECTION);
    if (server) {
        *server_code = (int)e->code;
        if (e->code == 286) {
            return ERR_HISTORY_LOST;
        }
        if (fatal_server_code((int)e->code)) {
            return ERR_FATAL;
        }
        if (reply && mongoc_error_has_label(reply, "NonResumableChangeStreamError")) {
            return ERR_FATAL;
        }
        return ERR_TRANSIENT;
    }
    if (e->domain == MONGOC_ERROR_CLIENT && e->code == MONGOC_ERROR_CLIENT_AUTHENTICATE) {
        return ERR_FATAL;
    }
    if (e->domain == MONGOC_ERROR_CURSOR && e->code == MONGOC_ERROR_CHANGE_STREAM_NO_RESUME_TOKEN) {
        return ERR_FATAL;
    }
    if (e->domain == MONGOC_ERROR_COMMAND && e->code == MONGOC_ERROR_COMMAND_INVALID_ARG) {
        return ERR_FATAL;
    }
    return ERR_TRANSIENT;
}

/* ---- The loop ------------------------------------------------------------------------------ */

static bool emit_control(watcher_t *w, mc_event_kind_t kind, const char *reason)
{
    mc_event_t *ev = mc_event_new_control(kind, w->s->cfg->name, next_seq(w), reason);
    return ev && push_event(w, ev);
}

/* Remembers why the stream fails (its state, set by the caller, has the details). */
static void note_failure(watcher_t *w, const char *code, int server_code, const char *reason)
{
    w->fail_code = code;
    w->fail_server_code = server_code;
    w->fail_reason = reason;
}

/* A failed stream's last event: one error event to every sink and subscriber, so that none is
 * left waiting on a stream that will not deliver again. Every exit into MC_STREAM_FAILED gets
 * one, including failures nobody noted (then with the generic code). */
static void announce_failure(watcher_t *w)
{
    mc__stream_t *s = w->s;
    if (w->cu) {
        return; /* a catch-up never fails the stream; its runner's failure is the sink's */
    }
    pthread_mutex_lock(&s->lock);
    bool failed = s->status.state == MC_STREAM_FAILED;
    pthread_mutex_unlock(&s->lock);
    if (!failed) {
        return;
    }
    mc_event_t *ev = mc_event_new_error(s->cfg->name, next_seq(w), w->fail_code,
                                        w->fail_server_code, w->fail_reason);
    if (ev) {
        push_event(w, ev);
    }
}

static const char *invalidate_reason(const watcher_t *w)
{
    if (w->last_op && (strcmp(w->last_op, "drop") == 0 || strcmp(w->last_op, "rename") == 0 ||
                       strcmp(w->last_op, "dropDatabase") == 0)) {
        return w->last_op;
    }
    return "invalidate";
}

/* With the MongoDB token store, a database or cluster stream would see the engine's own
 * checkpoint upserts and deliver them, and every delivery would cause another upsert: an
 * endless trickle. Those events only move the position on. */
static bool is_own_checkpoint_write(const watcher_t *w, const bson_t *doc)
{
    const mc_config_t *c = w->e->config;
    if (!w->e->store || c->checkpoint.store != MC_CHECKPOINT_MONGODB || !c->checkpoint.db ||
        !c->checkpoint.collection || w->s->cfg->collection) {
        return false;
    }
    bson_iter_t it, v;
    if (!bson_iter_init(&it, doc) || !bson_iter_find_descendant(&it, "ns.db", &v) ||
        !BSON_ITER_HOLDS_UTF8(&v) || strcmp(bson_iter_utf8(&v, NULL), c->checkpoint.db) != 0) {
        return false;
    }
    return bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, "ns.coll", &v) &&
           BSON_ITER_HOLDS_UTF8(&v) &&
           strcmp(bson_iter_utf8(&v, NULL), c->checkpoint.collection) == 0;
}

/* ---- Routing ----------------------------------------------------------------------------- */

/* An event routing could not decide (unresolved), or a document event whose recipient path
 * held nothing (a stage may have removed it): counted and logged (rate-limited, each kind on
 * its own), and left to admins. */
static void note_routing(watcher_t *w, const mc_event_t *ev, mc__route_note_t note)
{
    if (note == MC__ROUTE_OK) {
        return;
    }
    const char *op = mc_event_operation_type(ev);
    const char *why;
    /* The watcher counted this event already when a catch-up re-reads it: the counters stay
     * the watcher's; the log line (rate-limited) still says what the catch-up found. */
    if (note == MC__ROUTE_MISSING) {
        if (is_watcher(w)) {
            stream_count(w->s, &w->s->status.recipient_missing, 1);
        }
        why = "the recipient path holds no identity (missing, null, or removed by a pipeline "
              "stage: see mongocast check)";
    } else {
        if (is_watcher(w)) {
            stream_count(w->s, &w->s->status.unresolved_recipients, 1);
        }
        why = mc__event_recipient_state(ev) == MC__R_UNRESOLVED && op && strcmp(op, "delete") == 0
                  ? "a delete without a pre-image (full_document_before_change), or a lookup "
                    "that could not be proven exact"
                  : "a write without its resulting document (an update needs full_document: "
                    "whenAvailable or required), or a lookup that could not be proven exact";
    }
    mc_log_ratelimited(
        note == MC__ROUTE_MISSING ? &w->rl_missing : &w->rl_unresolved, MC_LOG_WARN, "watcher",
        "recipient %s stream=%s%s%s op=%s ns=%s.%s: %s; event goes to admins only",
        note == MC__ROUTE_MISSING ? "missing" : "unresolved", w->s->cfg->name,
        w->cu ? " catch-up sink=" : "", w->cu ? mc_sink_name(mc__runner_sink(w->cu)) : "",
        op ? op : "?", mc_event_db(ev) ? mc_event_db(ev) : "?",
        mc_event_coll(ev) ? mc_event_coll(ev) : "?", why);
}

/* Keeps the server's reply of a failed call (an empty document when there is none). */
static void keep_reply(bson_t *out, const bson_t *reply)
{
    bson_destroy(out);
    if (reply) {
        bson_copy_to(reply, out);
    } else {
        bson_init(out);
    }
}

/* Whether opening `cs` failed; then err and reply say why. */
static bool open_failed(mongoc_change_stream_t *cs, bson_error_t *err, bson_t *reply)
{
    const bson_t *r = NULL;
    memset(err, 0, sizeof(*err));
    if (!mongoc_change_stream_error_document(cs, err, &r)) {
        return false;
    }
    keep_reply(reply, r);
    return true;
}

/* Frees what a watcher or catch-up thread holds when it leaves. */
static void watcher_cleanup(watcher_t *w, bson_t *reply)
{
    bson_destroy(reply);
    mc__split_reset(&w->split);
    mc__position_clear(&w->pos);
    mc_event_unref(&w->pos_ev);
    mc__recipients_destroy(w->rcpt);
    mc__images_destroy(w->images);
}

/* ---- Oversize events (on_oversize) --------------------------------------------------------- */

static bool skips_oversize(const watcher_t *w)
{
    return w->s->cfg->on_oversize == MC_ON_OVERSIZE_SKIP;
}

/* Takes one fragment of a split event. *whole: the event once its last fragment is in (the
 * full event for split, only what its notice needs for skip), NULL before. Returns 0, or -1
 * with err set (fragments that do not add up: reading on would deliver a partial event). */
static int take_fragment(watcher_t *w, const bson_t *frag, bson_t **whole, size_t *bytes,
                         bson_error_t *err)
{
    mc_error_t serr = {0};
    bool complete = false;
    *whole = NULL;
    if (mc__split_add(&w->split, frag, skips_oversize(w), mc__recipients_event_path(w->rcpt),
                      &complete, &serr) != 0) {
        bson_set_error(err, MONGOC_ERROR_CURSOR, MONGOC_ERROR_CHANGE_STREAM_NO_RESUME_TOKEN,
                       "%s", serr.message);
        return -1;
    }
    if (!complete) {
        return 0;
    }
    *whole = mc__split_take(&w->split, bytes);
    if (!*whole) {
        bson_set_error(err, MONGOC_ERROR_CURSOR, MONGOC_ERROR_CHANGE_STREAM_NO_RESUME_TOKEN,
                       "out of memory reassembling a split event");
        return -1;
    }
    return 0;
}

/* A reassembled event: counted (by the watcher), and for skip turned into its notice. */
static void note_split(watcher_t *w, mc_event_t *ev, size_t bytes)
{
    bool skip = skips_oversize(w);
    if (skip) {
        mc__event_set_server_oversize(ev, bytes);
    }
    if (is_watcher(w)) {
        stream_count(w->s, skip ? &w->s->status.oversize_skipped : &w->s->status.split_events,
                     1);
    }
    mc_log_ratelimited(&w->rl, skip ? MC_LOG_WARN : MC_LOG_INFO, "watcher",
                       "event larger than 16 MB stream=%s%s id=%.60s bytes=%zu: %s", w->s->cfg->name,
                       w->cu ? " (catch-up)" : "", mc_event_id(ev), bytes,
                       skip ? "delivered as an oversize notice (on_oversize: skip)"
                            : "reassembled from its fragments (on_oversize: split)");
}

/* on_oversize: skip on a server without $changeStreamSplitLargeEvent: the cursor failed with
 * 10334 on the event after the position. Its token is in the server's message; the notice
 * carries it (documentKey and the rest are unknown: null) and the stream resumes after it
 * (a resume skips the token's own event without returning it, so it is never read again).
 * False when the token cannot be learned: the stream fails rather than retry forever. */
static bool skip_too_large(watcher_t *w, const bson_error_t *err)
{
    char data[1024];
    size_t size = 0;
    if (!skips_oversize(w) || !mc__split_too_large_token(err->message, data, sizeof(data), &size)) {
        return false;
    }
    bson_t stub = BSON_INITIALIZER, id;
    BSON_APPEND_DOCUMENT_BEGIN(&stub, "_id", &id);
    BSON_APPEND_UTF8(&id, "_data", data);
    bson_append_document_end(&stub, &id);
    mc_error_t eerr = {0};
    mc_event_t *ev = mc_event_new_change(w->s->cfg->name, next_seq(w), &stub,
                                         mc__recipients_event_path(w->rcpt), &eerr);
    bson_destroy(&stub);
    if (!ev) {
        return false;
    }
    note_split(w, ev, size);
    set_pos_event(w, ev, false);
    push_event(w, ev);
    return true;
}

/* The server refused the stage this open added (MongoDB before 6.0.9 and 7.0: 40324). The
 * stream goes on without it; an event past 16 MB then fails the cursor (10334), which skip
 * handles through the server's message and split cannot: it fails the stream. True when the
 * caller should reopen at once. */
static bool split_stage_refused(watcher_t *w, int code)
{
    if (code != 40324 || !adds_split_stage(w)) {
        return false;
    }
    w->split_refused = true;
    mc_log(MC_LOG_WARN, "watcher",
           "stream=%s: the server does not know $changeStreamSplitLargeEvent (MongoDB 6.0.9 or "
           "7.0 needed); going on without it: an event larger than 16 MB will %s",
           w->s->cfg->name,
           skips_oversize(w) ? "be skipped with a notice that has only its id"
                             : "fail the stream (on_oversize: split cannot split it here)");
    return true;
}

typedef enum read_result {
    READ_STOP = 0,   /* engine stopping */
    READ_REOPEN,     /* invalidate seen: reopen at once with startAfter */
    READ_ERROR,      /* error: see err/reply */
} read_result_t;

/* Reads until stop, invalidate or error. On error fills *err and copies the reply. */
static read_result_t read_loop(watcher_t *w, mongoc_change_stream_t *cs, bson_error_t *err,
                               bson_t *reply_out)
{
    mc__stream_t *s = w->s;
    const bson_t *doc;
    while (!stopping(w)) {
        if (mongoc_change_stream_next(cs, &doc)) {
            bson_iter_t it;
            const char *op = NULL;
            if (bson_iter_init_find(&it, doc, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
                op = bson_iter_utf8(&it, NULL);
            }
            mc_error_t eerr = {0};
            if (op && strcmp(op, "invalidate") == 0) {
                mc_event_t *ev = mc_event_new_invalidate(s->cfg->name, next_seq(w), doc,
                                                         invalidate_reason(w), &eerr);
                if (!ev) {
                    bson_set_error(err, MONGOC_ERROR_CURSOR, MONGOC_ERROR_CHANGE_STREAM_NO_RESUME_TOKEN,
                                   "invalidate event unusable: %s", eerr.message);
                    return READ_ERROR;
                }
                set_pos_event(w, ev, true);
                mc_log(MC_LOG_NOTICE, "watcher", "invalidated stream=%s reason=%s, reopening%s",
                       s->cfg->name, mc_event_reason(ev), w->cu ? " (catch-up)" : "");
                if (is_watcher(w)) {
                    stream_count(s, &s->status.invalidates, 1);
                }
                w->last_op = NULL;
                if (!push_event(w, ev)) {
                    return READ_STOP;
                }
                return READ_REOPEN;
            }
            if (is_own_checkpoint_write(w, doc)) {
                const bson_t *tok = mongoc_change_stream_get_resume_token(cs);
                if (tok && !bson_empty(tok)) {
                    set_pos(w, tok, false);
                    if (!push_position(w, tok)) {
                        return READ_STOP;
                    }
                }
                continue;
            }
            bson_t *whole = NULL;
            size_t whole_bytes = 0;
            if (mc__split_is_fragment(doc)) {
                int frc = take_fragment(w, doc, &whole, &whole_bytes, err);
                if (frc < 0) {
                    return READ_ERROR;
                }
                if (!whole) {
                    continue; /* more fragments to come; no position inside a split event */
                }
                doc = whole;
                op = NULL;
                if (bson_iter_init_find(&it, doc, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
                    op = bson_iter_utf8(&it, NULL);
                }
            }
            mc_event_t *ev = mc_event_new_change(s->cfg->name, next_seq(w), doc,
                                                 mc__recipients_event_path(w->rcpt), &eerr);
            if (!ev) {
                bson_destroy(whole);
                bson_set_error(err, MONGOC_ERROR_CURSOR, MONGOC_ERROR_CHANGE_STREAM_NO_RESUME_TOKEN,
                               "change event unusable: %s", eerr.message);
                return READ_ERROR;
            }
            if (whole) {
                note_split(w, ev, whole_bytes);
            }
            mc__images_on_event(w->images, ev);
            mc__route_note_t note = mc__recipients_route(w->rcpt, ev, &w->e->stopping);
            w->rp_unresolved = note == MC__ROUTE_UNRESOLVED;
            note_routing(w, ev, note);
            set_pos_event(w, ev, false);
            if (op) {
                bson_strncpy(w->last_op_buf, op, sizeof(w->last_op_buf));
                w->last_op = w->last_op_buf;
            }
            bson_destroy(whole);
            if (!push_event(w, ev)) {
                return READ_STOP;
            }
            mc__backoff_reset(&w->backoff);
            continue;
        }
        const bson_t *reply = NULL;
        if (mongoc_change_stream_error_document(cs, err, &reply)) {
            keep_reply(reply_out, reply);
            return READ_ERROR;
        }
        mc__images_on_idle(w->images);
        if (mc__split_pending(&w->split)) {
            continue; /* inside a split event: a fragment's token is no position */
        }
        /* An empty batch: the post-batch resume token moves on even when nothing matched. */
        const bson_t *tok = mongoc_change_stream_get_resume_token(cs);
        const bson_t *pos = pos_token(w);
        if (tok && !bson_empty(tok) && !(pos && bson_equal(tok, pos))) {
            set_pos(w, tok, false);
            if (!push_position(w, tok)) {
                return READ_STOP;
            }
        } else if (w->cu && pos && mc__route_rejoin(s, w->cu, w->cu_slot, mc__token_data(pos),
                                                     false)) {
            /* A catch-up at the end of the oplog with nothing new: it has caught up. */
            w->rejoined = true;
            return READ_STOP;
        } else if (w->rp && !w->rp->on_position(w->rp->ud, pos ? mc__token_data(pos) : NULL)) {
            return READ_STOP; /* a replay at the end with nothing new: its owner may join */
        }
        mc__backoff_reset(&w->backoff);
    }
    return READ_STOP;
}

/* Loads and checks the stored positions (ledger.c) on the watcher's first client. Returns 0,
 * MC_ESERVER (the server cannot be reached: retried like an open error) or another error
 * (refused or unreadable: the stream fails, err says why). */
static int load_start_position(watcher_t *w, mongoc_client_t *client, mc_error_t *err)
{
    mc__position_t start = {0};
    int rc = mc__ledger_load(w->s, client, &start, err);
    if (rc != 0) {
        return rc;
    }
    mc__position_clear(&w->pos);
    if (start.token) {
        w->pos = start;
    } else if (w->s->start_token) {
        w->pos.token = bson_copy(w->s->start_token);
    }
    return 0;
}

/* What a watcher or catch-up loop does after one open-and-read. */
typedef enum cycle_next {
    CYCLE_STOP,   /* the engine stops */
    CYCLE_AGAIN,  /* reopen at once (invalidate, the split stage refused, an event skipped) */
    CYCLE_FAILED, /* an error: *cls and *code say which */
} cycle_next_t;

/* Ends one cycle of the read loops shared by the watcher and the catch-up threads: releases
 * the cursor and the client, then decides between stopping, reopening at once and handling
 * an error. Sets *after_invalidate when an invalidate ended the read. */
static cycle_next_t end_cycle(watcher_t *w, mongoc_change_stream_t *cs, mongoc_client_t *client,
                              read_result_t rr, bson_error_t *err, const bson_t *reply,
                              bool *after_invalidate, err_class_t *cls, int *code)
{
    mongoc_change_stream_destroy(cs);
    mongoc_client_pool_push(w->pool, client);
    if (rr == READ_STOP) {
        return CYCLE_STOP;
    }
    if (rr == READ_REOPEN) {
        *after_invalidate = true;
        return CYCLE_AGAIN;
    }
    *code = 0;
    *cls = classify(err, reply, code);
    if (split_stage_refused(w, *code) || (*code == 10334 && skip_too_large(w, err))) {
        return CYCLE_AGAIN; /* without the stage, or after the skipped event */
    }
    return CYCLE_FAILED;
}

void *mc__watcher_main(void *arg)
{
    mc__stream_t *s = arg;
    mc__thread_name("mcwatch:", s->cfg->name);
    if (mc_stream_config_is_edge(s->cfg)) {
        return mc__source_nats_main(s); /* an edge stream: JetStream instead of MongoDB */
    }
    watcher_t w;
    memset(&w, 0, sizeof(w));
    w.s = s;
    w.e = s->engine;
    w.pool = w.e->pool;
    w.first_open = true;
    w.rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_unresolved = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_missing = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mc__backoff_init(&w.backoff, w.e->opts.backoff_initial_ms, w.e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)s->index * 97 + 1);
    const char *name = s->cfg->name;
    mc_error_t rerr = {0};
    w.rcpt = mc__recipients_new(s->cfg, name, w.e->pool, &rerr);
    w.images = mc__images_new(s, false);

    bool failed = false;
    if (!w.rcpt) {
        /* A stream that cannot route must not deliver unrouted events. */
        mc_log(MC_LOG_ERROR, "watcher", "cannot set up routing stream=%s: %s", name, rerr.message);
        mc__stream_set_state(s, MC_STREAM_FAILED, 0, "cannot set up routing: %s", rerr.message);
        note_failure(&w, MC_EVENT_ERROR_FAILED, 0, "stream failed");
        failed = true;
    }
    bool loaded = false;
    bool after_error = false, after_invalidate = false;
    bson_t reply = BSON_INITIALIZER;

    while (!failed && !stopping(&w)) {
        mongoc_client_t *client = mongoc_client_pool_pop(w.e->pool);
        if (!loaded) {
            mc_error_t lerr = {0};
            int lrc = load_start_position(&w, client, &lerr);
            if (lrc == MC_ESERVER) {
                mongoc_client_pool_push(w.e->pool, client);
                uint32_t delay = mc__backoff_next(&w.backoff);
                mc_log_ratelimited(&w.rl, MC_LOG_WARN, "watcher",
                                   "stream=%s retry_in_ms=%u: %s", name, delay, lerr.message);
                mc__stream_set_state(s, MC_STREAM_RETRYING, 0, "%s", lerr.message);
                if (mc__engine_sleep(w.e, delay)) {
                    break;
                }
                continue;
            }
            if (lrc != 0) {
                mongoc_client_pool_push(w.e->pool, client);
                /* Starting from "now" here would silently skip every change since the last
                 * run; the operator has to decide (the message says how). */
                mc_log(MC_LOG_ERROR, "watcher", "stream=%s cannot start: %s", name, lerr.message);
                mc__stream_set_state(s, MC_STREAM_FAILED, 0, "%s", lerr.message);
                note_failure(&w, MC_EVENT_ERROR_CHECKPOINT, 0,
                             "the stored checkpoint cannot be used");
                break;
            }
            loaded = true;
        }
        mongoc_change_stream_t *cs = open_stream(&w, client);
        bson_error_t err;
        read_result_t rr;
        if (open_failed(cs, &err, &reply)) {
            rr = READ_ERROR;
        } else {
            w.first_open = false;
            /* Images on (or their absence noted) before anything is routed or announced. */
            mc__images_on_open(w.images, after_invalidate);
            after_invalidate = false;
            if (after_error) {
                stream_count(s, &s->status.resumes, 1);
                after_error = false;
            }
            pthread_mutex_lock(&s->lock);
            bool was_open = s->status.state == MC_STREAM_OPEN;
            pthread_mutex_unlock(&s->lock);
            if (!was_open) {
                mc__stream_set_state(s, MC_STREAM_OPEN, 0, "open");
                mc_log(MC_LOG_INFO, "watcher", "change stream open stream=%s", name);
                if (!emit_control(&w, MC_EVENT_READY, NULL)) {
                    mongoc_change_stream_destroy(cs);
                    mongoc_client_pool_push(w.e->pool, client);
                    break;
                }
            }
            const bson_t *first = pos_token(&w) ? NULL : mongoc_change_stream_get_resume_token(cs);
            if (first && !bson_empty(first)) {
                /* Opened from "now": the position the server reports is where every sink
                 * without one starts (and catches up from, should it detach early). */
                mc__ledger_origin(s, first);
                set_pos(&w, first, false);
                if (!push_position(&w, first)) {
                    mongoc_change_stream_destroy(cs);
                    mongoc_client_pool_push(w.e->pool, client);
                    break;
                }
            }
            rr = read_loop(&w, cs, &err, &reply);
        }
        int code = 0;
        err_class_t cls = ERR_TRANSIENT;
        cycle_next_t next =
            end_cycle(&w, cs, client, rr, &err, &reply, &after_invalidate, &cls, &code);
        if (next == CYCLE_STOP) {
            break;
        }
        if (next == CYCLE_AGAIN) {
            continue;
        }
        if (cls == ERR_HISTORY_LOST && s->cfg->on_history_lost == MC_ON_HISTORY_LOST_RESTART) {
            mc_log(MC_LOG_WARN, "watcher",
                   "history lost stream=%s code=%d: restarting from now (on_history_lost: "
                   "restart); changes in between are lost: %s",
                   name, code, err.message);
            stream_count(s, &s->status.resets, 1);
            set_pos(&w, NULL, false);
            w.last_op = NULL;
            if (!emit_control(&w, MC_EVENT_RESET, "history lost")) {
                break;
            }
            mc__stream_set_state(s, MC_STREAM_OPENING, code, "restarting after history loss");
            after_error = true;
            continue;
        }
        if (cls == ERR_HISTORY_LOST) {
            mc_log(MC_LOG_ERROR, "watcher",
                   "history lost stream=%s code=%d: the resume point is no longer in the oplog; "
                   "stream stopped (on_history_lost: fail). Remove its checkpoint or set "
                   "on_history_lost: restart to go on from now: %s",
                   name, code, err.message);
            mc__stream_set_state(s, MC_STREAM_FAILED, code,
                                 "history lost (code 286): resume point no longer in the oplog; "
                                 "on_history_lost is fail: %s",
                                 err.message);
            note_failure(&w, MC_EVENT_ERROR_HISTORY_LOST, code,
                         "history lost: the resume point is no longer in the oplog "
                         "(on_history_lost: fail)");
            break;
        }
        if (cls == ERR_FATAL) {
            mc_log(MC_LOG_ERROR, "watcher", "change stream failed stream=%s code=%d: %s", name,
                   code, err.message);
            /* The code first: the status message has a fixed size and the server's message
             * (up to bson_error_t's 504 bytes) would push a trailing code out of it. */
            mc__stream_set_state(s, MC_STREAM_FAILED, code, "code %d: %s", code, err.message);
            if (code == 10334) {
                note_failure(&w, MC_EVENT_ERROR_TOO_LARGE, code,
                             "a change event is larger than MongoDB's 16 MB limit (on_oversize "
                             "is fail, or the server cannot split events)");
            } else {
                note_failure(&w, MC_EVENT_ERROR_FATAL, code,
                             "the change stream failed with an error that retrying cannot fix");
            }
            break;
        }
        uint32_t delay = mc__backoff_next(&w.backoff);
        mc_log_ratelimited(&w.rl, MC_LOG_WARN, "watcher",
                           "change stream error stream=%s domain=%u code=%u retry_in_ms=%u: %s",
                           name, err.domain, err.code, delay, err.message);
        mc__stream_set_state(s, MC_STREAM_RETRYING, code, "%s", err.message);
        after_error = true;
        if (mc__engine_sleep(w.e, delay)) {
            break;
        }
    }
    announce_failure(&w);
    watcher_cleanup(&w, &reply);
    return NULL;
}

/* ---- Catch-up threads ---------------------------------------------------------------------- */

typedef struct catchup_arg {
    mc__stream_t *s;
    mc__runner_t *r;
    int slot;
    mc__pref_t from;
    uint32_t at_t, at_i; /* without `from`: startAtOperationTime */
} catchup_arg_t;

static void catchup_done(mc_engine_t *e)
{
    pthread_mutex_lock(&e->catchup_lock);
    e->catchups--;
    pthread_cond_broadcast(&e->catchup_cond);
    pthread_mutex_unlock(&e->catchup_lock);
}

/* Reads the stream from the runner's position into the runner only, until it can rejoin the
 * shared path; the stream's on_history_lost decides what a lost position means for it. */
static void *catchup_main(void *arg)
{
    catchup_arg_t *a = arg;
    mc__stream_t *s = a->s;
    mc__thread_name("mccatchup:", s->cfg->name);
    watcher_t w;
    memset(&w, 0, sizeof(w));
    w.s = s;
    w.e = s->engine;
    w.cu = a->r;
    w.cu_slot = a->slot;
    w.cu_at_t = a->at_t;
    w.cu_at_i = a->at_i;
    bool at_time = a->at_t || a->at_i;
    w.pool = w.e->pool;
    w.rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_unresolved = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_missing = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mc__backoff_init(&w.backoff, w.e->opts.backoff_initial_ms, w.e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)a->r);
    const char *name = s->cfg->name;
    const char *sink = mc_sink_name(mc__runner_sink(a->r));
    /* Routing of its own: its lookups start at the first event it reads, as the watcher's do
     * after a restart, so an old event is routed as of its own cluster time. */
    mc_error_t rerr = {0};
    w.rcpt = mc__recipients_new(s->cfg, name, w.e->pool, &rerr);
    w.images = mc__images_new(s, true);
    mc__pref_position(&a->from, &w.pos);
    mc__pref_clear(&a->from);
    if (!w.rcpt) {
        mc__runner_fail_all(a->r, "cannot catch up on stream %s: cannot set up routing: %s",
                            name, rerr.message);
        mc__position_clear(&w.pos);
    } else if (!w.pos.token && at_time) {
        mc_log(MC_LOG_NOTICE, "watcher", "catching up sink=%s stream=%s from clusterTime %u.%u",
               sink, name, w.cu_at_t, w.cu_at_i);
    } else if (!w.pos.token) {
        mc__runner_fail_all(a->r, "cannot catch up on stream %s: no position to resume from",
                            name);
    } else {
        mc_log(MC_LOG_NOTICE, "watcher", "catching up sink=%s stream=%s from=%.40s", sink, name,
               mc__token_data(w.pos.token) ? mc__token_data(w.pos.token) : "?");
    }
    bson_t reply = BSON_INITIALIZER;
    bool after_invalidate = false;
    while ((w.pos.token || (at_time && w.rcpt)) && !stopping(&w) && !w.rejoined) {
        mongoc_client_t *client = mongoc_client_pool_pop(w.e->pool);
        mongoc_change_stream_t *cs = open_stream(&w, client);
        bson_error_t err;
        read_result_t rr;
        if (open_failed(cs, &err, &reply)) {
            rr = READ_ERROR;
        } else {
            mc__images_on_open(w.images, after_invalidate);
            after_invalidate = false;
            rr = read_loop(&w, cs, &err, &reply);
        }
        int code = 0;
        err_class_t cls = ERR_TRANSIENT;
        cycle_next_t next =
            end_cycle(&w, cs, client, rr, &err, &reply, &after_invalidate, &cls, &code);
        if (next == CYCLE_STOP) {
            break;
        }
        if (next == CYCLE_AGAIN) {
            continue;
        }
        if (cls == ERR_HISTORY_LOST && s->cfg->on_history_lost == MC_ON_HISTORY_LOST_RESTART) {
            mc_log(MC_LOG_WARN, "watcher",
                   "history lost while catching up sink=%s stream=%s code=%d: the sink gets a "
                   "reset and rejoins the live stream (on_history_lost: restart); changes in "
                   "between are lost for it: %s",
                   sink, name, code, err.message);
            mc_event_t *ev = mc_event_new_control(MC_EVENT_RESET, name, 0, "history lost");
            mc__pref_t item = {.ev = ev};
            if (ev) {
                mc__event_set_stream_index(ev, s->index);
            }
            if (!ev || mc__runner_push_wait(a->r, a->slot, &item, 5000, true) != 0) {
                mc__pref_clear(&item);
            }
            mc__route_rejoin(s, a->r, a->slot, NULL, true);
            break;
        }
        if (cls == ERR_HISTORY_LOST) {
            mc__runner_fail_all(a->r,
                                "history lost while catching up on stream %s (code %d): its "
                                "position is no longer in the oplog and on_history_lost is "
                                "fail. Delete its checkpoint or set on_history_lost: restart: %s",
                                name, code, err.message);
            break;
        }
        if (cls == ERR_FATAL) {
            mc__runner_fail_all(a->r, "catching up on stream %s failed (code %d): %s", name,
                                code, err.message);
            break;
        }
        uint32_t delay = mc__backoff_next(&w.backoff);
        mc_log_ratelimited(&w.rl, MC_LOG_WARN, "watcher",
                           "catch-up error sink=%s stream=%s code=%u retry_in_ms=%u: %s", sink,
                           name, err.code, delay, err.message);
        if (mc__engine_sleep(w.e, delay)) {
            break;
        }
    }
    watcher_cleanup(&w, &reply);
    mc_engine_t *e = w.e;
    mc__runner_catchup_leave(a->r, a->slot); /* counted in by mc__catchup_spawn() */
    free(a);
    catchup_done(e);
    return NULL;
}

int mc__thread_start_detached(void *(*fn)(void *), void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int rc = pthread_create(&t, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    return rc;
}

static int spawn_catchup(mc__stream_t *s, mc__runner_t *r, int slot, mc__pref_t *from,
                         uint32_t at_t, uint32_t at_i)
{
    catchup_arg_t *a = calloc(1, sizeof(*a));
    if (!a) {
        return MC_ENOMEM;
    }
    a->s = s;
    a->r = r;
    a->slot = slot;
    a->at_t = at_t;
    a->at_i = at_i;
    if (from) {
        mc__pref_move(&a->from, from);
    }
    mc_engine_t *e = s->engine;
    pthread_mutex_lock(&e->catchup_lock);
    e->catchups++;
    pthread_mutex_unlock(&e->catchup_lock);
    mc__runner_catchup_enter(r, slot);
    int rc = mc__thread_start_detached(catchup_main, a);
    if (rc != 0) {
        if (from) {
            mc__pref_move(from, &a->from);
        }
        mc__pref_clear(&a->from);
        free(a);
        mc__runner_catchup_leave(r, slot);
        catchup_done(e);
        return MC_ENOMEM;
    }
    return 0;
}

int mc__catchup_spawn(mc__stream_t *s, mc__runner_t *r, int slot, mc__pref_t *from)
{
    const char *data = mc__pref_data(from);
    uint32_t t, i;
    if (mc__copy_changes_start(data, &t, &i)) {
        /* Detached right after an initial copy, before any change completed: its position
         * is "copied at T", which is no resume token; the changes start after T. */
        mc__pref_clear(from);
        return spawn_catchup(s, r, slot, NULL, t, i);
    }
    if (mc__copy_token(data)) {
        return MC_EINVAL; /* inside a copy: cannot happen (the slot takes no shared input) */
    }
    return spawn_catchup(s, r, slot, from, 0, 0);
}

int mc__catchup_spawn_at(mc__stream_t *s, mc__runner_t *r, int slot, uint32_t t, uint32_t i)
{
    return spawn_catchup(s, r, slot, NULL, t, i);
}

/* ---- Replays (a daemon's client catch-up) ---------------------------------------------------- */

int mc__stream_replay(mc_engine_t *e, const char *stream, const char *after_id,
                      const mc__replay_t *rp, int *server_code, mc_error_t *err)
{
    *server_code = 0;
    mc__stream_t *s = NULL;
    for (size_t k = 0; k < e->n_streams; k++) {
        if (strcmp(e->streams[k].cfg->name, stream) == 0) {
            s = &e->streams[k];
        }
    }
    if (!s || !after_id || !*after_id) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "no stream %s, or no id to resume after", stream ? stream : "?");
    }
    if (mc_stream_config_is_edge(s->cfg)) {
        return mc__source_nats_replay(s, after_id, rp, err); /* JetStream, by sequence */
    }
    watcher_t w;
    memset(&w, 0, sizeof(w));
    w.s = s;
    w.e = e;
    w.rp = rp;
    w.pool = rp->pool;
    w.rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_unresolved = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    w.rl_missing = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mc__backoff_init(&w.backoff, e->opts.backoff_initial_ms, e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)rp);
    /* Routing of its own, as a sink's catch-up has: its lookups follow the (older) events it
     * reads, so each is routed as of its own cluster time, or found unresolved. No image
     * hooks: the watcher owns the stream's image status. */
    w.rcpt = mc__recipients_new(s->cfg, stream, rp->pool, err);
    if (!w.rcpt) {
        return MC_ENOMEM;
    }
    w.pos.token = bson_new();
    BSON_APPEND_UTF8(w.pos.token, "_data", after_id);
    bson_t reply = BSON_INITIALIZER;
    int rc = 0;
    bool after_invalidate = false;
    while (!stopping(&w)) {
        mongoc_client_t *client = mongoc_client_pool_pop(w.pool);
        mongoc_change_stream_t *cs = open_stream(&w, client);
        bson_error_t berr;
        read_result_t rr;
        if (open_failed(cs, &berr, &reply)) {
            rr = READ_ERROR;
        } else {
            after_invalidate = false;
            rr = read_loop(&w, cs, &berr, &reply);
        }
        int code = 0;
        err_class_t cls = ERR_TRANSIENT;
        cycle_next_t next =
            end_cycle(&w, cs, client, rr, &berr, &reply, &after_invalidate, &cls, &code);
        if (next == CYCLE_STOP) {
            break;
        }
        if (next == CYCLE_AGAIN) {
            continue;
        }
        *server_code = code;
        if (cls == ERR_HISTORY_LOST) {
            rc = mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGODB, code,
                              "the id is no longer in the oplog: %s", berr.message);
            break;
        }
        if (cls == ERR_FATAL) {
            rc = mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, code,
                              "the server refused to resume after the id: %s", berr.message);
            break;
        }
        uint32_t delay = mc__backoff_next(&w.backoff);
        mc_log_ratelimited(&w.rl, MC_LOG_WARN, "watcher",
                           "client catch-up error stream=%s code=%u retry_in_ms=%u: %s", stream,
                           berr.code, delay, berr.message);
        /* Short sleeps: the owner's cancel (its time limit) is checked between them. */
        for (uint32_t slept = 0; slept < delay && !stopping(&w); slept += 50) {
            struct timespec ts = {0, 50 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    watcher_cleanup(&w, &reply);
    return rc;
}
