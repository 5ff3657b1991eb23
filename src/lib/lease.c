/*
 * lease.c: one lease per stream, kept in MongoDB, so that of N nodes running one config
 * exactly one (the holder) feeds the stream's sinks other than the live WebSocket/SSE
 * fan-out (every node serves its own clients), and another takes over from the positions
 * the holder stored when it dies.
 *
 * Threads: the lease thread (`mclease`) reads, creates, takes over, renews and releases the
 * lease documents and fences/unfences the runners; the runners' executors and the
 * checkpoint thread only read mc__stream_t.lease_until (mc__stream_may_feed()); status
 * readers read atomics.
 *
 * The document, per stream: {_id: <stream>, holder: <node id>, epoch, version, expiresAt,
 * renewedAt, ttlMs}. `epoch` is the fencing token: +1 at every change of holder, and written
 * by the sinks with each record (mc_sink_lease_epoch()); `version` is +1 at every write.
 *
 * Timing argument (why two nodes never publish at once, whatever the wall clocks say).
 * Only monotonic clocks are compared, each with itself; expiresAt is informative.
 *  - The holder sends a renewal at S (its monotonic clock) and, if the conditional update
 *    {holder: me, epoch: E} matched, may publish until S + ttl - margin (margin = ttl / 4).
 *    A renewal that fails or times out extends nothing; a takeover or create counts from the
 *    moment it was sent, too.
 *  - Another node takes over only when it has seen the same {epoch, version} for a whole ttl
 *    on its own clock, counted from the moment the read that showed it returned, and only by
 *    an update conditional on that {epoch, version}. The write that set the version happened
 *    after the holder's S and before that read returned, so the takeover happens at real
 *    time >= S + ttl, while the holder stopped at S + ttl - margin: a margin of ttl / 4
 *    (2.5 s by default) for clock rate differences (ppm) and for a write already started at
 *    the deadline (the runner checks the gate when it takes a batch: a batch taken just
 *    before the deadline may land up to one write's duration after it). Any renewal the
 *    holder makes meanwhile changes the version and defeats the takeover.
 *  - A released lease (holder "", written by a node at stop after its runners stopped) is
 *    taken at once.
 *  - The gate closes by time alone (the runners and the ledger compare lease_until with the
 *    clock), so a holder whose lease thread is stuck in a request still stops in time; the
 *    lease thread then fences the runners (drops their queues) as soon as it runs.
 * MongoDB writes use {w: "majority"} and reads {readConcern: majority}, so a lease change
 * cannot be rolled back by a failover.
 *
 * Takeover: the new holder loads each sink's stored position (the token store, which must be
 * MongoDB) and the runner catches up from it on its own cursor, then rejoins the shared path
 * (sink_runner.c, mc__runner_unfence()). Events after the last stored position are delivered
 * again (at-least-once; event ids are the dedupe keys).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_private.h"

/* ---- The state machine (pure) ---------------------------------------------------------- */

void mc__lease_fsm_init(mc__lease_fsm_t *f, int64_t ttl_ms, int64_t renew_ms)
{
    memset(f, 0, sizeof(*f));
    f->ttl_ms = ttl_ms;
    f->renew_ms = renew_ms > 0 ? renew_ms : ttl_ms / 4;
    f->margin_ms = ttl_ms / 4;
}

mc__lease_action_t mc__lease_fsm_observe(mc__lease_fsm_t *f, const mc__lease_doc_t *doc,
                                         int64_t now)
{
    if (f->held) {
        return MC__LEASE_WAIT;
    }
    if (!doc->exists) {
        f->seen = false;
        return MC__LEASE_CREATE;
    }
    bool same = f->seen && f->seen_epoch == doc->epoch && f->seen_version == doc->version;
    if (!same) {
        f->seen = true;
        f->seen_epoch = doc->epoch;
        f->seen_version = doc->version;
        f->seen_since = now;
    }
    if (doc->holder[0] == '\0') {
        return MC__LEASE_TAKE; /* released: its holder stopped publishing before */
    }
    return now - f->seen_since >= f->ttl_ms ? MC__LEASE_TAKE : MC__LEASE_WAIT;
}

void mc__lease_fsm_acquired(mc__lease_fsm_t *f, int64_t sent, int64_t epoch, int64_t version)
{
    f->held = true;
    f->seen = false;
    f->epoch = epoch;
    f->version = version;
    f->deadline = sent + f->ttl_ms - f->margin_ms;
    f->next_renew = sent + f->renew_ms;
}

void mc__lease_fsm_renewed(mc__lease_fsm_t *f, int64_t sent, int64_t version)
{
    if (!f->held) {
        return;
    }
    f->version = version;
    int64_t d = sent + f->ttl_ms - f->margin_ms;
    if (d > f->deadline) {
        f->deadline = d;
    }
    f->next_renew = sent + f->renew_ms;
}

void mc__lease_fsm_renew_failed(mc__lease_fsm_t *f, int64_t now)
{
    int64_t retry = f->renew_ms / 3 > 20 ? f->renew_ms / 3 : 20;
    f->next_renew = now + retry;
}

void mc__lease_fsm_lost(mc__lease_fsm_t *f)
{
    f->held = false;
    f->deadline = 0;
    f->seen = false;
}

bool mc__lease_fsm_may_publish(const mc__lease_fsm_t *f, int64_t now)
{
    return f->held && now < f->deadline;
}

int64_t mc__lease_fsm_next_wake(const mc__lease_fsm_t *f, int64_t now)
{
    if (f->held) {
        int64_t t = f->next_renew < f->deadline ? f->next_renew : f->deadline;
        return t > now ? t : now + 1;
    }
    int64_t t = now + f->renew_ms;
    int64_t take = f->seen_since + f->ttl_ms;
    if (f->seen && take > now && take < t) {
        t = take; /* the takeover is due then (a past one was tried already: wait a period) */
    }
    return t;
}

/* ---- The lease thread ------------------------------------------------------------------- */

typedef struct lease_stream {
    mc__stream_t *s;
    mc__lease_fsm_t fsm;
    bool unfence_pending; /* acquired: some runner slots still wait to be unfenced */
    _Atomic bool holder;  /* for status readers */
    _Atomic uint64_t acquisitions, renewals, losses;
} lease_stream_t;

struct mc__lease {
    mc_engine_t *e;
    char node_id[256];
    char *db, *coll;
    lease_stream_t *st; /* [e->n_streams]; st[i].s NULL when stream i has no lease */
    /* A client of its own (lease thread, then mc__lease_stop after the join) whose socket
     * timeout is half the ttl: a request that hangs must not keep a standby from looking or a
     * holder from trying again (the engine's pool waits up to 5 minutes for an answer). */
    mongoc_client_pool_t *pool;
    mongoc_client_t *client; /* popped from `pool` for the lease's whole life */
    pthread_t thread;
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool quit;
    mc_log_ratelimit_t rl;
};

static bool runner_leased(mc__runner_t *r)
{
    return r && !mc__runner_live(r);
}

mc__lease_t *mc__lease_new(mc_engine_t *e, mc_error_t *err)
{
    const mc_config_t *cfg = e->config;
    if (!cfg || !cfg->lease.enabled) {
        return NULL;
    }
    for (size_t i = 0; i < e->n_streams; i++) {
        atomic_init(&e->streams[i].lease_until, INT64_MAX);
        atomic_init(&e->streams[i].lease_epoch, 0);
    }
    if (!e->store) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "lease.enabled needs a token store (checkpoint.store: mongodb)");
        return NULL;
    }
    mc__lease_t *l = calloc(1, sizeof(*l));
    if (l) {
        l->st = calloc(e->n_streams ? e->n_streams : 1, sizeof(lease_stream_t));
    }
    if (!l || !l->st) {
        free(l);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    l->e = e;
    if (cfg->lease.node_id) {
        bson_strncpy(l->node_id, cfg->lease.node_id, sizeof(l->node_id));
    } else {
        char host[200] = "";
        if (gethostname(host, sizeof(host) - 1) != 0 || !host[0]) {
            bson_strncpy(host, "localhost", sizeof(host));
        }
        snprintf(l->node_id, sizeof(l->node_id), "%s:%ld", host, (long)getpid());
    }
    l->db = bson_strdup(cfg->lease.db ? cfg->lease.db : "mongocast");
    l->coll = bson_strdup(cfg->lease.collection ? cfg->lease.collection : "leases");
    int64_t ttl = cfg->lease.ttl_ms ? cfg->lease.ttl_ms : 10000;
    int64_t renew = cfg->lease.renew_ms ? cfg->lease.renew_ms : ttl / 4;
    pthread_mutex_init(&l->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&l->cond, &ca);
    pthread_condattr_destroy(&ca);
    l->rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    mongoc_uri_t *uri = mongoc_uri_copy(e->uri);
    int32_t io_ms = (int32_t)(ttl / 2 > 100 ? ttl / 2 : 100);
    mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SOCKETTIMEOUTMS, io_ms);
    mongoc_uri_set_option_as_int32(uri, MONGOC_URI_CONNECTTIMEOUTMS, io_ms);
    mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, io_ms);
    bson_error_t cerr;
    /* A pool (of one client): its background monitoring has no 5 s cooldown after a failed
     * server selection, which a single-threaded client has. */
    l->pool = mongoc_client_pool_new_with_error(uri, &cerr);
    mongoc_uri_destroy(uri);
    if (!l->pool) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_BSON, (int)cerr.code, "lease: %s", cerr.message);
        mc__lease_destroy(l);
        return NULL;
    }
    mongoc_client_pool_set_error_api(l->pool, MONGOC_ERROR_API_VERSION_2);
    mongoc_client_pool_set_appname(l->pool, "mongocast-lease");
    mongoc_client_pool_max_size(l->pool, 1);
    l->client = mongoc_client_pool_pop(l->pool);
    size_t n = 0;
    for (size_t i = 0; i < e->n_streams; i++) {
        mc__stream_t *s = &e->streams[i];
        bool any = false;
        for (size_t k = 0; k < s->n_sinks; k++) {
            any |= runner_leased(s->sinks[k]->runner);
        }
        if (!any) {
            continue;
        }
        lease_stream_t *ls = &l->st[i];
        ls->s = s;
        mc__lease_fsm_init(&ls->fsm, ttl, renew);
        s->leased = true;
        atomic_store(&s->lease_until, 0);
        for (size_t k = 0; k < s->n_sinks; k++) {
            mc__runner_t *r = s->sinks[k]->runner;
            if (runner_leased(r)) {
                mc__runner_fence(r, mc__runner_slot(r, s->index), NULL);
            }
        }
        n++;
    }
    if (n == 0) {
        mc__lease_destroy(l);
        return NULL;
    }
    mc_log(MC_LOG_INFO, "lease", "leases on streams=%zu node=%s ttl_ms=%" PRId64
           " renew_ms=%" PRId64 " collection=%s.%s",
           n, l->node_id, ttl, renew, l->db, l->coll);
    return l;
}

/* Outcome of one conditional write. */
typedef enum write_rc { LW_OK = 0, LW_NOMATCH, LW_ERROR } write_rc_t;

static void append_times(bson_t *set, int64_t ttl_ms)
{
    int64_t now = mc__wall_ms();
    BSON_APPEND_DATE_TIME(set, "renewedAt", now);
    BSON_APPEND_DATE_TIME(set, "expiresAt", now + ttl_ms);
    BSON_APPEND_INT64(set, "ttlMs", ttl_ms);
}

static bson_t *majority_opts(void)
{
    bson_t *opts = bson_new();
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    mongoc_write_concern_set_wmajority(wc, 5000);
    mongoc_write_concern_append(wc, opts);
    mongoc_write_concern_destroy(wc);
    return opts;
}

/* update_one(filter, {$set: set}) with w: majority: matched or not, or an error. */
static write_rc_t update_doc(mc__lease_t *l, mongoc_collection_t *coll, const bson_t *filter,
                             const bson_t *set, bson_error_t *berr)
{
    bson_t update = BSON_INITIALIZER;
    BSON_APPEND_DOCUMENT(&update, "$set", set);
    bson_t *opts = majority_opts();
    bson_t reply;
    bool ok = mongoc_collection_update_one(coll, filter, &update, opts, &reply, berr);
    write_rc_t rc = LW_ERROR;
    if (ok) {
        bson_iter_t it;
        int64_t matched = 0;
        if (bson_iter_init_find(&it, &reply, "matchedCount") && BSON_ITER_HOLDS_NUMBER(&it)) {
            matched = bson_iter_as_int64(&it);
        }
        rc = matched > 0 ? LW_OK : LW_NOMATCH;
    }
    (void)l;
    bson_destroy(&reply);
    bson_destroy(opts);
    bson_destroy(&update);
    return rc;
}

/* The options of a find of at most one document at read concern majority (the lease record,
 * the previous holder's position). The caller destroys them. */
static bson_t *find_one_majority_opts(void)
{
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1));
    mongoc_read_concern_t *rc = mongoc_read_concern_new();
    mongoc_read_concern_set_level(rc, MONGOC_READ_CONCERN_LEVEL_MAJORITY);
    mongoc_read_concern_append(rc, opts);
    mongoc_read_concern_destroy(rc);
    return opts;
}

static int read_doc(mongoc_collection_t *coll, const char *stream, mc__lease_doc_t *out,
                    bson_error_t *berr)
{
    memset(out, 0, sizeof(*out));
    bson_t filter = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&filter, "_id", stream);
    bson_t *opts = find_one_majority_opts();
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, opts, NULL);
    const bson_t *doc;
    int result = 0;
    if (mongoc_cursor_next(cur, &doc)) {
        out->exists = true;
        bson_iter_t it;
        if (bson_iter_init_find(&it, doc, "holder") && BSON_ITER_HOLDS_UTF8(&it)) {
            bson_strncpy(out->holder, bson_iter_utf8(&it, NULL), sizeof(out->holder));
        }
        if (bson_iter_init_find(&it, doc, "epoch") && BSON_ITER_HOLDS_NUMBER(&it)) {
            out->epoch = bson_iter_as_int64(&it);
        }
        if (bson_iter_init_find(&it, doc, "version") && BSON_ITER_HOLDS_NUMBER(&it)) {
            out->version = bson_iter_as_int64(&it);
        }
    } else if (mongoc_cursor_error(cur, berr)) {
        result = MC_ESERVER;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(&filter);
    return result;
}

/* The holder's gate for the runners and the ledger. */
static void publish_gate(lease_stream_t *ls)
{
    mc__stream_t *s = ls->s;
    if (ls->fsm.held) {
        atomic_store(&s->lease_epoch, (uint64_t)ls->fsm.epoch);
        atomic_store_explicit(&s->lease_until, ls->fsm.deadline, memory_order_release);
    } else {
        atomic_store_explicit(&s->lease_until, 0, memory_order_release);
    }
    atomic_store(&ls->holder, ls->fsm.held);
}

static void fence_stream(lease_stream_t *ls, const char *why)
{
    mc__stream_t *s = ls->s;
    ls->unfence_pending = false;
    for (size_t k = 0; k < s->n_sinks; k++) {
        mc__runner_t *r = s->sinks[k]->runner;
        if (runner_leased(r)) {
            mc__runner_fence(r, mc__runner_slot(r, s->index), why);
        }
    }
}

/* The (stream, sink) record the previous holder stored (token_store_mongo.c's layout), read
 * through the lease's own client. 0, MC_ENOTFOUND, MC_ESERVER or MC_EIO (err says why). */
static int load_position(mc__lease_t *l, const char *stream, const char *sink, mc__record_t *out,
                         mc_error_t *err)
{
    const mc_config_t *cfg = l->e->config;
    const char *db = cfg->checkpoint.db ? cfg->checkpoint.db : "mongocast";
    const char *cname = cfg->checkpoint.collection ? cfg->checkpoint.collection : "checkpoints";
    snprintf(out->where, sizeof(out->where), "%s.%s {_id: {stream: \"%s\", sink: \"%s\"}}", db,
             cname, stream, sink);
    mongoc_collection_t *coll = mongoc_client_get_collection(l->client, db, cname);
    bson_t filter = BSON_INITIALIZER, id;
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &id);
    BSON_APPEND_UTF8(&id, "stream", stream);
    BSON_APPEND_UTF8(&id, "sink", sink);
    bson_append_document_end(&filter, &id);
    bson_t *opts = find_one_majority_opts();
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, opts, NULL);
    const bson_t *doc;
    bson_error_t berr;
    int result = MC_ENOTFOUND;
    if (mongoc_cursor_next(cur, &doc)) {
        result = mc__record_from_bson(doc, out->where, out, err);
    } else if (mongoc_cursor_error(cur, &berr)) {
        result = mc_error_set(err, MC_ESERVER, MC_DOMAIN_BSON, (int)berr.code, "%s: %s",
                              out->where, berr.message);
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(&filter);
    mongoc_collection_destroy(coll);
    return result;
}

/* After an acquisition: every leased runner of the stream resumes from its stored position.
 * Returns true when all are done. */
static bool unfence_stream(mc__lease_t *l, lease_stream_t *ls)
{
    mc__stream_t *s = ls->s;
    bool all = true;
    for (size_t k = 0; k < s->n_sinks; k++) {
        mc__runner_t *r = s->sinks[k]->runner;
        if (!runner_leased(r)) {
            continue;
        }
        int slot = mc__runner_slot(r, s->index);
        if (!mc__runner_fenced(r, slot) || mc__runner_failed(r)) {
            continue;
        }
        mc__record_t rec = {0};
        mc_error_t err = {0};
        mc__pref_t from = {0};
        int rc = load_position(l, s->cfg->name, s->sinks[k]->name, &rec, &err);
        if (rc == 0) {
            mc_error_t cerr = {0};
            if (mc__ledger_check_record(s->cfg->name, s->definition, &rec, 0, 0, &cerr) != 0) {
                mc__runner_fail_all(r, "stored position refused at lease takeover: %s",
                                    cerr.message);
                mc__record_clear(&rec);
                continue;
            }
            from.mark = mc__mark_from_position(s->index, &rec.pos);
        } else if (rc == MC_ENOTFOUND) {
            /* Nothing stored yet: the sink starts where this node's stream started. */
            if (!mc__runner_take_done(r, slot, &from, NULL, NULL) || mc__pref_empty(&from)) {
                mc__pref_clear(&from);
                all = false; /* the watcher has not opened yet: later */
                mc__record_clear(&rec);
                continue;
            }
        } else {
            mc_log_ratelimited(&l->rl, MC_LOG_WARN, "lease",
                               "cannot load the stored position of sink=%s stream=%s: %s",
                               s->sinks[k]->name, s->cfg->name, err.message);
            all = false;
            mc__record_clear(&rec);
            continue;
        }
        mc__record_clear(&rec);
        if (mc__pref_empty(&from)) {
            all = false;
            continue;
        }
        rc = mc__runner_unfence(r, slot, &from);
        mc__pref_clear(&from);
        if (rc == MC_EAGAIN) {
            all = false;
        }
    }
    return all;
}

static void lease_lost(mc__lease_t *l, lease_stream_t *ls, const char *why)
{
    mc__lease_fsm_lost(&ls->fsm);
    publish_gate(ls);
    atomic_fetch_add(&ls->losses, 1);
    fence_stream(ls, why);
    mc_log(MC_LOG_WARN, "lease", "lease lost stream=%s node=%s: %s; its sinks stop here",
           ls->s->cfg->name, l->node_id, why);
}

static void lease_acquired(mc__lease_t *l, lease_stream_t *ls, int64_t sent, int64_t epoch,
                           int64_t version, const char *how)
{
    mc__lease_fsm_acquired(&ls->fsm, sent, epoch, version);
    publish_gate(ls);
    atomic_fetch_add(&ls->acquisitions, 1);
    ls->unfence_pending = true;
    mc_log(MC_LOG_NOTICE, "lease", "lease acquired stream=%s node=%s epoch=%" PRId64 " (%s)",
           ls->s->cfg->name, l->node_id, epoch, how);
}

static void step_stream(mc__lease_t *l, lease_stream_t *ls, mongoc_collection_t *coll)
{
    mc__lease_fsm_t *f = &ls->fsm;
    const char *name = ls->s->cfg->name;
    bson_error_t berr = {0};
    int64_t now = mc__now_ms();
    if (f->held && now >= f->deadline) {
        lease_lost(l, ls, "not renewed in time");
    }
    if (f->held && now >= f->next_renew) {
        bson_t filter = BSON_INITIALIZER, set = BSON_INITIALIZER;
        BSON_APPEND_UTF8(&filter, "_id", name);
        BSON_APPEND_UTF8(&filter, "holder", l->node_id);
        BSON_APPEND_INT64(&filter, "epoch", f->epoch);
        BSON_APPEND_INT64(&set, "version", f->version + 1);
        append_times(&set, f->ttl_ms);
        int64_t sent = mc__now_ms();
        write_rc_t rc = update_doc(l, coll, &filter, &set, &berr);
        bson_destroy(&filter);
        bson_destroy(&set);
        if (rc == LW_OK) {
            mc__lease_fsm_renewed(f, sent, f->version + 1);
            publish_gate(ls);
            atomic_fetch_add(&ls->renewals, 1);
        } else if (rc == LW_NOMATCH) {
            lease_lost(l, ls, "another node took the lease over");
        } else {
            mc__lease_fsm_renew_failed(f, mc__now_ms());
            mc_log_ratelimited(&l->rl, MC_LOG_WARN, "lease",
                               "renewal failed stream=%s (publishing stops in %" PRId64
                               " ms unless a renewal succeeds): %s",
                               name, f->deadline - mc__now_ms(), berr.message);
        }
    }
    if (!f->held) {
        mc__lease_doc_t doc;
        if (read_doc(coll, name, &doc, &berr) != 0) {
            mc_log_ratelimited(&l->rl, MC_LOG_WARN, "lease", "cannot read the lease stream=%s: %s",
                               name, berr.message);
            return;
        }
        mc__lease_action_t a = mc__lease_fsm_observe(f, &doc, mc__now_ms());
        int64_t sent = mc__now_ms();
        if (a == MC__LEASE_CREATE) {
            bson_t ins = BSON_INITIALIZER;
            BSON_APPEND_UTF8(&ins, "_id", name);
            BSON_APPEND_UTF8(&ins, "holder", l->node_id);
            BSON_APPEND_INT64(&ins, "epoch", 1);
            BSON_APPEND_INT64(&ins, "version", 1);
            append_times(&ins, f->ttl_ms);
            bson_t *opts = majority_opts();
            if (mongoc_collection_insert_one(coll, &ins, opts, NULL, &berr)) {
                lease_acquired(l, ls, sent, 1, 1, "created");
            } else if (berr.code != 11000) {
                mc_log_ratelimited(&l->rl, MC_LOG_WARN, "lease",
                                   "cannot create the lease stream=%s: %s", name, berr.message);
            }
            bson_destroy(opts);
            bson_destroy(&ins);
        } else if (a == MC__LEASE_TAKE) {
            bson_t filter = BSON_INITIALIZER, set = BSON_INITIALIZER;
            BSON_APPEND_UTF8(&filter, "_id", name);
            BSON_APPEND_INT64(&filter, "epoch", f->seen_epoch);
            BSON_APPEND_INT64(&filter, "version", f->seen_version);
            int64_t epoch = f->seen_epoch + 1, version = f->seen_version + 1;
            BSON_APPEND_UTF8(&set, "holder", l->node_id);
            BSON_APPEND_INT64(&set, "epoch", epoch);
            BSON_APPEND_INT64(&set, "version", version);
            append_times(&set, f->ttl_ms);
            bool released = doc.holder[0] == '\0';
            write_rc_t rc = update_doc(l, coll, &filter, &set, &berr);
            bson_destroy(&filter);
            bson_destroy(&set);
            if (rc == LW_OK) {
                char how[320];
                snprintf(how, sizeof(how), "%s%.256s", released ? "released by its holder" :
                         "expired: not renewed by ", released ? "" : doc.holder);
                lease_acquired(l, ls, sent, epoch, version, how);
            } else if (rc == LW_ERROR) {
                mc_log_ratelimited(&l->rl, MC_LOG_WARN, "lease",
                                   "cannot take the lease over stream=%s: %s", name, berr.message);
            }
        }
    }
    if (f->held && ls->unfence_pending && unfence_stream(l, ls)) {
        ls->unfence_pending = false;
    }
}

static void *lease_main(void *arg)
{
    mc__lease_t *l = arg;
    mc__thread_name("mclease", "");
    mc_engine_t *e = l->e;
    for (;;) {
        pthread_mutex_lock(&l->lock);
        bool quit = l->quit;
        pthread_mutex_unlock(&l->lock);
        if (quit) {
            break;
        }
        mongoc_collection_t *coll = mongoc_client_get_collection(l->client, l->db, l->coll);
        int64_t wake = INT64_MAX;
        for (size_t i = 0; i < e->n_streams; i++) {
            lease_stream_t *ls = &l->st[i];
            if (!ls->s) {
                continue;
            }
            step_stream(l, ls, coll);
            int64_t now = mc__now_ms();
            int64_t t = mc__lease_fsm_next_wake(&ls->fsm, now);
            if (ls->unfence_pending && t > now + 50) {
                t = now + 50;
            }
            if (t < wake) {
                wake = t;
            }
        }
        mongoc_collection_destroy(coll);
        pthread_mutex_lock(&l->lock);
        int64_t left = wake - mc__now_ms();
        if (!l->quit && left > 0) {
            struct timespec ts;
            mc__deadline_after_ms(&ts, left);
            pthread_cond_timedwait(&l->cond, &l->lock, &ts);
        }
        pthread_mutex_unlock(&l->lock);
    }
    return NULL;
}

int mc__lease_start(mc__lease_t *l, mc_error_t *err)
{
    if (!l) {
        return 0;
    }
    if (pthread_create(&l->thread, NULL, lease_main, l) != 0) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno, "cannot start the lease thread");
    }
    l->started = true;
    return 0;
}

void mc__lease_stop(mc__lease_t *l)
{
    if (!l || !l->started) {
        return;
    }
    pthread_mutex_lock(&l->lock);
    l->quit = true;
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->lock);
    pthread_join(l->thread, NULL);
    l->started = false;
    /* The runners have stopped: nothing is published any more, so the leases can go now and a
     * successor need not wait for them to expire. */
    mongoc_collection_t *coll = mongoc_client_get_collection(l->client, l->db, l->coll);
    for (size_t i = 0; i < l->e->n_streams; i++) {
        lease_stream_t *ls = &l->st[i];
        if (!ls->s || !ls->fsm.held) {
            continue;
        }
        bson_t filter = BSON_INITIALIZER, set = BSON_INITIALIZER;
        BSON_APPEND_UTF8(&filter, "_id", ls->s->cfg->name);
        BSON_APPEND_UTF8(&filter, "holder", l->node_id);
        BSON_APPEND_INT64(&filter, "epoch", ls->fsm.epoch);
        BSON_APPEND_UTF8(&set, "holder", "");
        BSON_APPEND_INT64(&set, "version", ls->fsm.version + 1);
        BSON_APPEND_DATE_TIME(&set, "releasedAt", mc__wall_ms());
        bson_error_t berr;
        if (update_doc(l, coll, &filter, &set, &berr) == LW_OK) {
            mc_log(MC_LOG_INFO, "lease", "lease released stream=%s epoch=%" PRId64,
                   ls->s->cfg->name, ls->fsm.epoch);
        }
        bson_destroy(&filter);
        bson_destroy(&set);
        mc__lease_fsm_lost(&ls->fsm);
        publish_gate(ls);
    }
    mongoc_collection_destroy(coll);
}

void mc__lease_destroy(mc__lease_t *l)
{
    if (!l) {
        return;
    }
    if (l->client) {
        mongoc_client_pool_push(l->pool, l->client);
    }
    if (l->pool) {
        mongoc_client_pool_destroy(l->pool);
    }
    pthread_mutex_destroy(&l->lock);
    pthread_cond_destroy(&l->cond);
    bson_free(l->db);
    bson_free(l->coll);
    free(l->st);
    free(l);
}

/* ---- Status (any thread) ----------------------------------------------------------------- */

int mc_engine_lease_status(mc_engine_t *engine, const char *stream, mc_lease_status_t *out)
{
    if (!engine || !stream || !out) {
        return MC_EINVAL;
    }
    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        if (strcmp(s->cfg->name, stream) != 0) {
            continue;
        }
        mc__lease_t *l = engine->lease;
        if (!l || !l->st[i].s) {
            return 0;
        }
        lease_stream_t *ls = &l->st[i];
        out->enabled = true;
        out->holder = atomic_load(&ls->holder) && mc__stream_may_feed(s, mc__now_ms());
        out->epoch = atomic_load(&s->lease_epoch);
        out->acquisitions = atomic_load(&ls->acquisitions);
        out->renewals = atomic_load(&ls->renewals);
        out->losses = atomic_load(&ls->losses);
        bson_strncpy(out->node_id, l->node_id, sizeof(out->node_id));
        return 0;
    }
    return MC_ENOTFOUND;
}
