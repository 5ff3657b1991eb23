/*
 * ledger.c: the positions that are safe to store: one per (stream, sink), each sink's newest
 * complete event with everything before it (kept by its runner), and one per stream, the
 * oldest of its sinks' (where the watcher resumes). Loads and checks them at start, writes
 * them at every checkpoint interval.
 *
 * Threads: mc__ledger_load() and mc__ledger_origin() run on the stream's watcher thread
 * before it routes anything; mc__ledger_write() on the checkpoint thread (and once more in
 * mc_engine_stop() after joining it: one writer at a time); mc__ledger_stream_position() on
 * any thread (it only reads runners under their locks).
 *
 * Start rules: the watcher opens from the oldest stored sink position; each sink skips what
 * it had already completed (the router's skip point). A sink without a record of its own
 * (new in the config, or a store written before per-sink records existed) starts with the
 * stream, from the stream record. A record is refused, failing only its stream, when it was
 * written for another namespace, by another definition of the stream (pipeline, document
 * images or recipient rules changed: the path, lookup, by_collection or default; summaries
 * are not part of it), or carries a clusterTime ahead of the server's (another
 * deployment): resuming from it would silently deliver the wrong changes or nothing at all.
 * A record without a definition (written before definitions existed) is accepted with a
 * warning and gains one at its next write.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

#define MAX_OPTIONS_BYTES (16 * 1024) /* larger stream options are stored as a fingerprint only */
/* A post-batch high-water mark legitimately lies just after the newest operation (the next
 * clock tick), so a stored position may lead the server's clusterTime a little. Real
 * deployment mix-ups differ by far more; a few seconds ahead costs at most a few seconds of
 * silence, never wrong data. */
#define FUTURE_SLACK_SECS 5

/* ---- Definitions ----------------------------------------------------------------------------- */

static const char *full_document_word(mc_full_document_t v)
{
    switch (v) {
    case MC_FULL_DOCUMENT_UPDATE_LOOKUP: return "updateLookup";
    case MC_FULL_DOCUMENT_WHEN_AVAILABLE: return "whenAvailable";
    case MC_FULL_DOCUMENT_REQUIRED: return "required";
    default: return "default";
    }
}

static const char *before_change_word(mc_before_change_t v)
{
    switch (v) {
    case MC_BEFORE_CHANGE_WHEN_AVAILABLE: return "whenAvailable";
    case MC_BEFORE_CHANGE_REQUIRED: return "required";
    default: return "off";
    }
}

static void stream_ns(const mc_stream_config_t *c, char *out, size_t size)
{
    if (c->db && c->collection) {
        snprintf(out, size, "%s.%s", c->db, c->collection);
    } else if (c->db) {
        snprintf(out, size, "%s", c->db);
    } else {
        out[0] = '\0';
    }
}

static const char *describe_ns(const char *ns)
{
    return *ns ? ns : "the whole cluster";
}

static void append_lookup(bson_t *doc, const mc_recipient_lookup_t *l)
{
    if (!l) {
        BSON_APPEND_NULL(doc, "lookup");
        return;
    }
    bson_t lk;
    BSON_APPEND_DOCUMENT_BEGIN(doc, "lookup", &lk);
    BSON_APPEND_UTF8(&lk, "db", l->db ? l->db : "");
    BSON_APPEND_UTF8(&lk, "collection", l->collection ? l->collection : "");
    BSON_APPEND_UTF8(&lk, "field", l->field ? l->field : "_id");
    BSON_APPEND_UTF8(&lk, "recipient", l->recipient ? l->recipient : "");
    bson_append_document_end(doc, &lk);
}

/* A recipient rule as {path, lookup} under `key`. Its summary is not part of it: a summary
 * changes the text of later messages, never which events are delivered or to whom. */
static void append_rule(bson_t *doc, const char *key, const mc_recipient_rule_t *r)
{
    bson_t rule;
    BSON_APPEND_DOCUMENT_BEGIN(doc, key, &rule);
    BSON_APPEND_UTF8(&rule, "path", r->path ? r->path : "");
    append_lookup(&rule, r->lookup);
    bson_append_document_end(doc, &rule);
}

int mc__ledger_definition(mc__stream_t *s, mc_error_t *err)
{
    const mc_stream_config_t *c = s->cfg;
    char ns[400];
    stream_ns(c, ns, sizeof(ns));
    /* What changes the events a stream emits (never history, batch sizes, access rules). */
    bson_t options = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&options, "ns", ns);
    BSON_APPEND_ARRAY(&options, "pipeline", &s->server_pipeline);
    BSON_APPEND_UTF8(&options, "fullDocument", full_document_word(c->full_document));
    BSON_APPEND_UTF8(&options, "fullDocumentBeforeChange",
                     before_change_word(c->full_document_before_change));
    if (c->recipient) {
        BSON_APPEND_UTF8(&options, "recipient", c->recipient);
    } else {
        BSON_APPEND_NULL(&options, "recipient");
    }
    append_lookup(&options, c->lookup);
    /* Per-collection rules (recipient.by_collection, recipient.default) only when present, so
     * the fingerprint of a stream with one recipient rule does not depend on them. */
    if (c->n_by_collection > 0) {
        bson_t rules;
        BSON_APPEND_DOCUMENT_BEGIN(&options, "byCollection", &rules);
        for (size_t k = 0; k < c->n_by_collection; k++) {
            append_rule(&rules, c->by_collection[k].collection, &c->by_collection[k]);
        }
        bson_append_document_end(&options, &rules);
    }
    if (c->recipient_default) {
        append_rule(&options, "recipientDefault", c->recipient_default);
    }
    char fp[17];
    snprintf(fp, sizeof(fp), "%016" PRIx64, mc__fnv1a(bson_get_data(&options), options.len));
    s->definition = bson_new();
    if (!s->definition) {
        bson_destroy(&options);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    BSON_APPEND_UTF8(s->definition, "ns", ns);
    BSON_APPEND_UTF8(s->definition, "fingerprint", fp);
    if (options.len <= MAX_OPTIONS_BYTES) {
        BSON_APPEND_DOCUMENT(s->definition, "options", &options);
    }
    bson_destroy(&options);
    return 0;
}

static const char *def_string(const bson_t *def, const char *key)
{
    bson_iter_t it;
    if (def && bson_iter_init_find(&it, def, key) && BSON_ITER_HOLDS_UTF8(&it)) {
        return bson_iter_utf8(&it, NULL);
    }
    return NULL;
}

/* Names the stored options that differ from the current ones ("pipeline, recipient"), or
 * "the stream's options" when the record keeps only a fingerprint. */
static void changed_options(const bson_t *stored_def, const bson_t *now_def, char *out, size_t size)
{
    static const char *const keys[] = {"pipeline",  "fullDocument", "fullDocumentBeforeChange",
                                       "recipient", "lookup",       "byCollection",
                                       "recipientDefault"};
    static const char *const names[] = {
        "pipeline",         "full_document",          "full_document_before_change",
        "recipient",        "recipient.lookup",       "recipient.by_collection",
        "recipient.default"};
    bson_iter_t a, b;
    bson_t sa, sb;
    const uint8_t *d;
    uint32_t n;
    out[0] = '\0';
    if (!bson_iter_init_find(&a, stored_def, "options") || !BSON_ITER_HOLDS_DOCUMENT(&a) ||
        !bson_iter_init_find(&b, now_def, "options") || !BSON_ITER_HOLDS_DOCUMENT(&b)) {
        snprintf(out, size, "the stream's options");
        return;
    }
    bson_iter_document(&a, &n, &d);
    bson_init_static(&sa, d, n);
    bson_iter_document(&b, &n, &d);
    bson_init_static(&sb, d, n);
    size_t used = 0;
    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        bson_iter_t x, y;
        bool hx = bson_iter_init_find(&x, &sa, keys[k]);
        bool hy = bson_iter_init_find(&y, &sb, keys[k]);
        bool same = hx == hy;
        if (same && hx) {
            const bson_value_t *vx = bson_iter_value(&x);
            const bson_value_t *vy = bson_iter_value(&y);
            bson_t dx, dy;
            if (vx->value_type != vy->value_type) {
                same = false;
            } else if (vx->value_type == BSON_TYPE_UTF8) {
                same = strcmp(vx->value.v_utf8.str, vy->value.v_utf8.str) == 0;
            } else if ((vx->value_type == BSON_TYPE_DOCUMENT ||
                        vx->value_type == BSON_TYPE_ARRAY) &&
                       bson_init_static(&dx, vx->value.v_doc.data, vx->value.v_doc.data_len) &&
                       bson_init_static(&dy, vy->value.v_doc.data, vy->value.v_doc.data_len)) {
                same = bson_equal(&dx, &dy);
            }
        }
        if (!same) {
            used += (size_t)snprintf(out + used, used < size ? size - used : 0, "%s%s",
                                     used ? ", " : "", names[k]);
        }
    }
    if (!out[0]) {
        snprintf(out, size, "the stream's options");
    }
}

int mc__ledger_check_record(const char *name, const bson_t *definition, const mc__record_t *rec,
                            uint32_t server_t, uint32_t server_i, mc_error_t *err)
{
    if (!rec->definition) {
        mc_log(MC_LOG_WARN, "checkpoint",
               "checkpoint has no stream definition (written by an older mongocast); "
               "accepted, it gains one at the next write stream=%s record=%s",
               name, rec->where);
    } else {
        const char *ns = def_string(rec->definition, "ns");
        const char *now_ns = def_string(definition, "ns");
        if (ns && now_ns && strcmp(ns, now_ns) != 0) {
            return mc_error_set(
                err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                "checkpoint %s was written for %s but stream %s now watches %s: refusing to "
                "resume from another namespace's position. Delete that checkpoint to start "
                "the stream from now, or restore its db/collection",
                rec->where, describe_ns(ns), name, describe_ns(now_ns));
        }
        const char *fp = def_string(rec->definition, "fingerprint");
        const char *now_fp = def_string(definition, "fingerprint");
        if (fp && now_fp && strcmp(fp, now_fp) != 0) {
            char changed[200];
            changed_options(rec->definition, definition, changed, sizeof(changed));
            return mc_error_set(
                err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                "checkpoint %s was written by another definition of stream %s (%s changed), "
                "so its position may not match what the stream emits now. Delete it to start "
                "from now, restore the previous definition, or remove its \"definition\" field "
                "to resume from it anyway",
                rec->where, name, changed);
        }
    }
    uint32_t t = rec->pos.ct_t, i = rec->pos.ct_i;
    uint32_t tt, ti;
    if (mc__token_cluster_time(rec->pos.token, &tt, &ti)) {
        t = tt;
        i = ti;
    }
    if (server_t && t > server_t + FUTURE_SLACK_SECS) {
        return mc_error_set(
            err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
            "checkpoint %s of stream %s is from the future: its clusterTime Timestamp(%u, %u) "
            "is more than %d s ahead of the server's Timestamp(%u, %u), so it belongs to "
            "another deployment (or the database was restored from a backup). Delete it to "
            "start the stream from now",
            rec->where, name, t, i, FUTURE_SLACK_SECS, server_t, server_i);
    }
    return 0;
}

/* The server's clusterTime, from a ping's operationTime or $clusterTime (0, 0 when it gives
 * neither). MC_ESERVER when the server cannot be reached. */
static int server_time(mongoc_client_t *client, uint32_t *t, uint32_t *i, mc_error_t *err)
{
    *t = *i = 0;
    bson_t *cmd = BCON_NEW("ping", BCON_INT32(1));
    bson_t reply;
    bson_error_t berr;
    bool ok = mongoc_client_command_simple(client, "admin", cmd, NULL, &reply, &berr);
    bson_destroy(cmd);
    if (!ok) {
        bson_destroy(&reply);
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                            "cannot reach the server to check the checkpoint: %s", berr.message);
    }
    bson_iter_t it;
    if (bson_iter_init_find(&it, &reply, "operationTime") && BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        bson_iter_timestamp(&it, t, i);
    } else if (bson_iter_init(&it, &reply) &&
               bson_iter_find_descendant(&it, "$clusterTime.clusterTime", &it) &&
               BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        bson_iter_timestamp(&it, t, i);
    }
    bson_destroy(&reply);
    return 0;
}

static void describe_position(const mc__position_t *p, char *out, size_t size)
{
    const char *data = mc__token_data(p->token);
    uint32_t t = p->ct_t, i = p->ct_i;
    mc__token_cluster_time(p->token, &t, &i);
    snprintf(out, size, "%s %.40s%s (clusterTime %u.%u)",
             p->invalidate ? "startAfter" : "resumeAfter", data ? data : "?",
             data && strlen(data) > 40 ? "..." : "", t, i);
}

int mc__ledger_load(mc__stream_t *s, mongoc_client_t *client, mc__position_t *start,
                    mc_error_t *err)
{
    mc_engine_t *e = s->engine;
    const char *name = s->cfg->name;
    mc__position_clear(start);
    if (!e->store) {
        /* Nothing stored, nothing to resume: initial copies start from scratch. */
        pthread_mutex_lock(&s->route_lock);
        for (size_t k = 0; k < s->n_sinks; k++) {
            mc__copy_plan(s, k, NULL);
        }
        pthread_mutex_unlock(&s->route_lock);
        mc__copy_start_planned(s);
        return 0;
    }
    uint32_t st = 0, si = 0;
    /* An edge stream (source_nats.c) has no MongoDB to ask: no "from the future" check. */
    int rc = client ? server_time(client, &st, &si, err) : 0;
    if (rc != 0) {
        return rc;
    }
    size_t n = s->n_sinks;
    mc__record_t *recs = calloc(n + 1, sizeof(*recs));
    bool *have = calloc(n + 1, sizeof(bool));
    if (!recs || !have) {
        free(recs);
        free(have);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    /* recs[n]: the stream record; recs[k]: sink k's. Live sinks have none. */
    for (size_t k = 0; k <= n && rc == 0; k++) {
        mc__runner_t *r = k < n ? s->routes[k].runner : NULL;
        if (r && mc__runner_live(r)) {
            continue;
        }
        mc_error_t lerr = {0};
        int lrc =
            mc__token_store_load(e->store, name, k < n ? s->sinks[k]->name : NULL, &recs[k], &lerr);
        if (lrc == 0) {
            have[k] = true;
            rc = mc__ledger_check_record(name, s->definition, &recs[k], st, si, err);
        } else if (lrc != MC_ENOTFOUND) {
            /* Starting from "now" here would silently skip every change since the last
             * run; the operator has to decide. */
            rc = mc_error_set(err, MC_EIO, lerr.domain, lerr.cause, "cannot read checkpoint: %s",
                              lerr.message);
        }
    }
    if (rc == 0) {
        /* The oldest sink position; the stream record only when no sink has one. */
        int oldest = -1;
        for (size_t k = 0; k < n; k++) {
            if (!have[k] || mc__copy_token(mc__token_data(recs[k].pos.token))) {
                continue; /* an initial copy's progress: its sink streams from the copy's time */
            }
            const char *d = mc__token_data(recs[k].pos.token);
            const char *o = oldest >= 0 ? mc__token_data(recs[oldest].pos.token) : NULL;
            if (oldest < 0 || (d && o && mc__token_data_cmp(d, o) < 0)) {
                oldest = (int)k;
            }
        }
        if (oldest < 0 && have[n] && !mc__copy_token(mc__token_data(recs[n].pos.token))) {
            oldest = (int)n;
        }
        char where[200] = "";
        if (oldest >= 0) {
            mc__position_copy(start, &recs[oldest].pos);
            describe_position(start, where, sizeof(where));
            mc_log(MC_LOG_INFO, "checkpoint", "resuming from stored position stream=%s %s%s%s",
                   name, where, oldest < (int)n ? " sink=" : "",
                   oldest < (int)n ? s->sinks[oldest]->name : "");
        } else if (s->start_token || s->start_at_secs > 0) {
            mc_log(MC_LOG_NOTICE, "checkpoint",
                   "no checkpoint for stream %s: starting at the requested position", name);
        } else {
            mc_log(MC_LOG_NOTICE, "checkpoint",
                   "no checkpoint for stream %s (%s): starting from now (server clusterTime "
                   "%u.%u)",
                   name, recs[n].where, st, si);
        }
        const char *start_data = mc__token_data(start->token);
        pthread_mutex_lock(&s->route_lock);
        for (size_t k = 0; k < n; k++) {
            mc__route_t *rt = &s->routes[k];
            const mc__position_t *own = have[k] ? &recs[k].pos : NULL;
            if (mc__copy_plan(s, k, own)) {
                if (own) {
                    mc__position_clear(&s->sink_written[k]);
                    mc__position_copy(&s->sink_written[k], own);
                }
                continue;
            }
            if (own) {
                mc__position_clear(&s->sink_written[k]);
                mc__position_copy(&s->sink_written[k], own);
                mc__runner_set_done(rt->runner, rt->slot, mc__mark_from_position(s->index, own),
                                    false);
                const char *d = mc__token_data(own->token);
                if (d && start_data && mc__token_data_cmp(d, start_data) > 0) {
                    free(rt->skip_until);
                    rt->skip_until = strdup(d);
                }
            } else if (start->token) {
                mc__runner_set_done(rt->runner, rt->slot, mc__mark_from_position(s->index, start),
                                    !mc__runner_live(rt->runner));
                if (!mc__runner_live(rt->runner)) {
                    mc_log(MC_LOG_NOTICE, "checkpoint",
                           "sink %s has no checkpoint for stream %s: it starts with the "
                           "stream at %s",
                           s->sinks[k]->name, name, where);
                }
            }
        }
        pthread_mutex_unlock(&s->route_lock);
        mc__copy_start_planned(s);
    }
    for (size_t k = 0; k <= n; k++) {
        mc__record_clear(&recs[k]);
    }
    free(recs);
    free(have);
    if (rc != 0) {
        mc__position_clear(start);
    }
    return rc;
}

void mc__ledger_origin(mc__stream_t *s, const bson_t *token)
{
    for (size_t k = 0; k < s->n_sinks; k++) {
        mc__route_t *rt = &s->routes[k];
        if (!rt->copy && !mc__runner_has_done(rt->runner, rt->slot)) {
            mc__runner_set_done(rt->runner, rt->slot, mc__mark_new(s->index, token, false, 0),
                                !mc__runner_live(rt->runner));
        }
    }
}

/* ---- The stream's position ------------------------------------------------------------------- */

/* The oldest of two positions by token (an empty one loses). */
static bool older(const mc__position_t *a, const mc__position_t *b)
{
    const char *da = mc__token_data(a->token);
    const char *db = mc__token_data(b->token);
    return da && (!db || mc__token_data_cmp(da, db) < 0);
}

void mc__ledger_stream_position(mc__stream_t *s, mc__position_t *out)
{
    mc__pref_t oldest = {0};
    uint64_t oldest_seq = 0;
    mc__position_clear(out);
    if (s->n_sinks == 0) {
        pthread_mutex_lock(&s->route_lock);
        mc__pref_copy(&oldest, &s->routed);
        pthread_mutex_unlock(&s->route_lock);
    }
    for (size_t k = 0; k < s->n_sinks; k++) {
        mc__runner_t *r = s->sinks[k]->runner;
        if (!r) {
            continue;
        }
        mc__pref_t p = {0};
        uint64_t seq = 0;
        int slot = mc__runner_slot(r, s->index);
        if (slot < 0 || !mc__runner_take_done(r, slot, &p, NULL, &seq)) {
            mc__pref_clear(&p);
            continue;
        }
        const char *d = mc__pref_data(&p);
        const char *o = mc__pref_data(&oldest);
        if (mc__copy_token(d)) {
            /* An initial copy in progress: no place in the change stream yet. */
            mc__pref_clear(&p);
            continue;
        }
        if (mc__pref_empty(&oldest) || (d && o && mc__token_data_cmp(d, o) < 0)) {
            mc__pref_move(&oldest, &p);
            oldest_seq = seq;
        } else {
            if (d && o && mc__token_data_cmp(d, o) == 0 && seq < oldest_seq) {
                oldest_seq = seq;
            }
            mc__pref_clear(&p);
        }
    }
    mc__pref_position(&oldest, out);
    if (s->n_sinks > 0) {
        out->seq = oldest_seq;
    }
    mc__pref_clear(&oldest);
}

/* ---- Writes ---------------------------------------------------------------------------------- */

int mc__ledger_write(mc_engine_t *e)
{
    static _Thread_local mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
    int result = 0;
    if (!e->store) {
        return 0;
    }
    for (size_t i = 0; i < e->n_streams; i++) {
        mc__stream_t *s = &e->streams[i];
        /* lease.enabled: only the holder of the stream's lease stores its positions (the
         * others' sinks do not move; lease.c). */
        if (!mc__stream_may_feed(s, mc__now_ms())) {
            continue;
        }
        /* Each sink's own position first: the stream's is derived from them. */
        for (size_t k = 0; k < s->n_sinks; k++) {
            mc__runner_t *r = s->sinks[k]->runner;
            if (!r || mc__runner_live(r)) {
                continue;
            }
            int slot = mc__runner_slot(r, s->index);
            mc__pref_t p = {0};
            bool dirty = false;
            if (!mc__runner_take_done(r, slot, &p, &dirty, NULL) || !dirty) {
                mc__pref_clear(&p);
                continue;
            }
            mc__position_t pos = {0};
            mc__pref_position(&p, &pos);
            mc__pref_clear(&p);
            mc_error_t err = {0};
            if (!pos.token) {
                mc__position_clear(&pos);
                continue;
            }
            if (mc__token_store_save(e->store, s->cfg->name, s->sinks[k]->name, &pos, s->definition,
                                     &err) != 0) {
                mc__runner_mark_dirty(r, slot);
                atomic_fetch_add(&s->stat_cp_failures, 1);
                mc_log_ratelimited(&rl, MC_LOG_WARN, "checkpoint",
                                   "write failed stream=%s sink=%s: %s", s->cfg->name,
                                   s->sinks[k]->name, err.message);
                result = MC_EIO;
                mc__position_clear(&pos);
            } else {
                mc__position_clear(&s->sink_written[k]);
                s->sink_written[k] = pos;
            }
        }
        /* The stream record: the oldest of what the sinks have stored (so that it never lies
         * ahead of any sink's record) and of the live sinks' positions. */
        mc__position_t pos = {0};
        if (s->n_sinks == 0) {
            mc__ledger_stream_position(s, &pos);
        }
        for (size_t k = 0; k < s->n_sinks; k++) {
            mc__runner_t *r = s->sinks[k]->runner;
            mc__position_t cand = {0};
            if (r && mc__runner_live(r)) {
                mc__pref_t p = {0};
                uint64_t seq = 0;
                mc__runner_take_done(r, mc__runner_slot(r, s->index), &p, NULL, &seq);
                mc__pref_position(&p, &cand);
                cand.seq = seq;
                mc__pref_clear(&p);
            } else {
                mc__position_copy(&cand, &s->sink_written[k]);
            }
            if (mc__copy_token(mc__token_data(cand.token))) {
                /* An initial copy resumes from its own record, not from the stream's. */
                mc__position_clear(&cand);
                continue;
            }
            if (!cand.token) {
                mc__position_clear(&cand);
                if (!(r && mc__runner_live(r))) {
                    /* A sink with nothing stored yet holds the stream record back. */
                    mc__position_clear(&pos);
                    break;
                }
                continue;
            }
            if (!pos.token || older(&cand, &pos)) {
                mc__position_clear(&pos);
                pos = cand;
            } else {
                mc__position_clear(&cand);
            }
        }
        const char *d = mc__token_data(pos.token);
        const char *w = mc__token_data(s->written.token);
        bool moved = d && (!w || strcmp(d, w) != 0 || pos.invalidate != s->written.invalidate);
        if (moved) {
            mc_error_t err = {0};
            if (mc__token_store_save(e->store, s->cfg->name, NULL, &pos, s->definition, &err) !=
                0) {
                atomic_fetch_add(&s->stat_cp_failures, 1);
                mc_log_ratelimited(&rl, MC_LOG_WARN, "checkpoint", "write failed stream=%s: %s",
                                   s->cfg->name, err.message);
                result = MC_EIO;
            } else {
                atomic_store_explicit(&s->stat_cp_event_ms, (int64_t)pos.ct_t * 1000,
                                      memory_order_relaxed);
                atomic_store_explicit(&s->stat_cp_seq, pos.seq, memory_order_relaxed);
                /* Last, so a reader that sees the new time also sees the position it stored
                 * (readers load it first). */
                atomic_store_explicit(&s->stat_cp_written_ms, mc__wall_ms(), memory_order_release);
                mc_log(MC_LOG_DEBUG, "checkpoint", "stored stream=%s seq=%" PRIu64, s->cfg->name,
                       pos.seq);
                mc__position_clear(&s->written);
                mc__position_copy(&s->written, &pos);
            }
        }
        mc__position_clear(&pos);
    }
    return result;
}
