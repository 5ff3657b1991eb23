/*
 * sink_mongodb.c: the "mongodb" sink type: writes one document per event into a collection
 * (the activity log), `_id` = the event id, with ordered bulk inserts per runner batch.
 * Options and guarantees: docs/config.md, "Sink type mongodb"; the document, the write
 * concern, the TTL index and the loop guard are mongo_sink.c's.
 *
 * Delivery: publish() builds the event's document and keeps it; flush() (after each batch of
 * publish calls) inserts the batch in order and acks every document written or found there
 * already (a duplicate _id: a replay after a crash). A document MongoDB refuses for good is
 * failed permanently (mc_sink_fail: the runner's dead letter, or the sink fails) and the rest
 * of the batch goes on. A transient failure (network, election, write concern not satisfied)
 * is retried here, inside flush, from the first unconfirmed document, with capped full-jitter
 * backoff from the runner's retry settings, until `retry.max_attempts`/`retry.max_retry_ms`
 * run out (then that document is permanent) or the engine stops (then what is not confirmed
 * stays unacknowledged and is written again after the restart: harmless, by `_id`).
 *
 * Threads: validate/probe on the caller's thread; init/start/destroy on the engine's; publish,
 * flush and stop on the sink's own runner thread (libmongoc blocks), never two at once.
 * Invariants: docs[k] is the document of evs[k] for k < n; a document is acked only after
 * MongoDB confirmed it (written or already there) with the configured write concern.
 * Lease (lease.enabled): each document carries `leaseEpoch`, and no insert starts once the
 * lease of the event's stream ran out on this node (mc_sink_lease_valid()).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"
#include "sinks/mongo_sink.h"
#include "sinks/sink_opts.h"

typedef struct mg_opts {
    char *uri; /* NULL: the cluster the streams read */
    char *db, *collection;
    bson_t *projection;
    char *w;
    int64_t wtimeout_ms;
    bool journal;
    int64_t expire_after_seconds;
} mg_opts_t;

typedef struct mg {
    mc_sink_t *sink;
    mg_opts_t o;
    mc__mongo_projection_t *proj;
    mongoc_write_concern_t *wc;
    mongoc_client_t *client;
    mongoc_collection_t *coll;
    bool ttl_pending; /* the TTL index could not be made at start (server away): before writes */
    mc_event_t **evs;
    bson_t **docs;
    mc__mongo_outcome_t *outcomes;
    size_t n, cap;
} mg_t;

static const char *const known_opts[] = {
    "uri", "db", "collection", "projection", "write_concern", "expire_after_seconds", NULL,
};

static void opts_free(mg_opts_t *o)
{
    bson_free(o->uri);
    bson_free(o->db);
    bson_free(o->collection);
    bson_destroy(o->projection);
    bson_free(o->w);
    memset(o, 0, sizeof(*o));
}

/* write_concern: "majority" | N | {w: "majority" | N, wtimeout_ms: MS, journal: BOOL} */
static int parse_wc(bson_iter_t *it, mg_opts_t *o, mc_error_t *err)
{
    char num[16];
    if (BSON_ITER_HOLDS_UTF8(it)) {
        o->w = bson_strdup(bson_iter_utf8(it, NULL));
        return 0;
    }
    if (BSON_ITER_HOLDS_INT32(it) || BSON_ITER_HOLDS_INT64(it)) {
        snprintf(num, sizeof(num), "%" PRId64, bson_iter_as_int64(it));
        o->w = bson_strdup(num);
        return 0;
    }
    bson_iter_t d;
    if (!BSON_ITER_HOLDS_DOCUMENT(it) || !bson_iter_recurse(it, &d)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option write_concern must be \"majority\", a number of members, "
                            "or {w, wtimeout_ms, journal}");
    }
    static const char *const wc_keys[] = {"w", "wtimeout_ms", "journal", NULL};
    while (bson_iter_next(&d)) {
        const char *k = bson_iter_key(&d);
        int rc = 0;
        if (!strcmp(k, "w")) {
            if (BSON_ITER_HOLDS_UTF8(&d)) {
                bson_free(o->w);
                o->w = bson_strdup(bson_iter_utf8(&d, NULL));
            } else if (BSON_ITER_HOLDS_INT32(&d) || BSON_ITER_HOLDS_INT64(&d)) {
                snprintf(num, sizeof(num), "%" PRId64, bson_iter_as_int64(&d));
                bson_free(o->w);
                o->w = bson_strdup(num);
            } else {
                rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                  "write_concern.w must be \"majority\" or a number");
            }
        } else if (!strcmp(k, "wtimeout_ms")) {
            rc = mc__opt_int(&d, 0, 3600000, &o->wtimeout_ms, err);
        } else if (!strcmp(k, "journal")) {
            rc = mc__opt_bool(&d, &o->journal, err);
        } else {
            rc = mc__opt_unknown(k, "write_concern of a mongodb sink", wc_keys, err);
        }
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* True when the sink's uri names a host of the cluster the streams read (or has no uri). */
static bool same_cluster(const mc_engine_t *e, const char *uri)
{
    if (!uri || !e->config || !e->config->mongodb_uri) {
        return true;
    }
    mongoc_uri_t *a = mongoc_uri_new(uri), *b = mongoc_uri_new(e->config->mongodb_uri);
    bool same = false;
    for (const mongoc_host_list_t *x = a ? mongoc_uri_get_hosts(a) : NULL; x && !same;
         x = x->next) {
        for (const mongoc_host_list_t *y = b ? mongoc_uri_get_hosts(b) : NULL; y && !same;
             y = y->next) {
            same = strcasecmp(x->host, y->host) == 0 && x->port == y->port;
        }
    }
    mongoc_uri_destroy(a);
    mongoc_uri_destroy(b);
    return same;
}

/* The loop guard over the streams this sink takes. */
static int loop_guard(mc_sink_t *sink, const mg_opts_t *o, mc_error_t *err)
{
    const mc_config_t *cfg = sink->engine->config;
    if (!cfg) {
        return 0;
    }
    mc__mongo_watch_t *w = calloc(cfg->n_streams ? cfg->n_streams : 1, sizeof(*w));
    if (!w) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    size_t n = 0;
    for (size_t k = 0; k < cfg->n_streams; k++) {
        const mc_stream_config_t *s = &cfg->streams[k];
        if (mc_sink_has_stream(sink, s->name)) {
            w[n++] = (mc__mongo_watch_t){s->name, s->db, s->collection};
        }
    }
    int rc = mc__mongo_loop_check(sink->name, o->db, o->collection,
                                  same_cluster(sink->engine, o->uri), w, n, err);
    free(w);
    return rc;
}

static int parse_opts(mc_sink_t *sink, const bson_t *options, mg_opts_t *o, mc_error_t *err)
{
    memset(o, 0, sizeof(*o));
    bson_iter_t it;
    int rc = 0;
    if (options && bson_iter_init(&it, options)) {
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (!strcmp(k, "uri")) {
                rc = mc__opt_string_dup(&it, 4096, &o->uri, err);
                bson_error_t be;
                mongoc_uri_t *u = rc == 0 ? mongoc_uri_new_with_error(o->uri, &be) : NULL;
                if (rc == 0 && !u) {
                    /* libmongoc's message quotes the uri, which may hold a password. */
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option uri is not a valid MongoDB connection string");
                }
                mongoc_uri_destroy(u);
            } else if (!strcmp(k, "db")) {
                rc = mc__opt_string_dup(&it, 63, &o->db, err);
                if (rc == 0 && strpbrk(o->db, "/\\. \"$")) {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option db: '%s' is not a valid database name", o->db);
                }
            } else if (!strcmp(k, "collection")) {
                rc = mc__opt_string_dup(&it, 200, &o->collection, err);
                if (rc == 0 &&
                    (o->collection[0] == '$' || strncmp(o->collection, "system.", 7) == 0)) {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option collection: '%s' is not a collection name this sink "
                                      "may write",
                                      o->collection);
                }
            } else if (!strcmp(k, "projection")) {
                uint32_t len = 0;
                const uint8_t *data = NULL;
                if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option projection must be a map of change fields to 1");
                } else {
                    bson_iter_document(&it, &len, &data);
                    o->projection = bson_new_from_data(data, len);
                    mc__mongo_projection_t *p = mc__mongo_projection_new(o->projection, err);
                    rc = p ? 0 : MC_ECONFIG;
                    mc__mongo_projection_destroy(p);
                }
            } else if (!strcmp(k, "write_concern")) {
                rc = parse_wc(&it, o, err);
            } else if (!strcmp(k, "expire_after_seconds")) {
                rc =
                    mc__opt_int(&it, 1, (int64_t)100 * 365 * 86400, &o->expire_after_seconds, err);
            } else {
                rc = mc__opt_unknown(k, "a mongodb sink", known_opts, err);
            }
        }
    }
    if (rc == 0 && (!o->db || !o->collection)) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "options db and collection are required");
    }
    if (rc == 0) {
        mongoc_write_concern_t *wc = mc__mongo_write_concern(o->w, o->wtimeout_ms, o->journal, err);
        rc = wc ? 0 : MC_ECONFIG;
        mongoc_write_concern_destroy(wc);
    }
    if (rc == 0 && sink) {
        rc = loop_guard(sink, o, err);
    }
    if (rc != 0) {
        opts_free(o);
    }
    return rc;
}

static int mg_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    mg_opts_t o;
    int rc = parse_opts(sink, options, &o, err);
    if (rc == 0) {
        opts_free(&o);
    }
    return rc;
}

/* A client of its own for the sink's thread (or the probe), on the sink's uri or the
 * source's; timeouts bound every wait. */
static mongoc_client_t *client_for(mc_sink_t *sink, const char *uri, int64_t timeout_ms,
                                   mc_error_t *err)
{
    const char *s = uri ? uri : sink->engine->config ? sink->engine->config->mongodb_uri : NULL;
    bson_error_t be;
    mongoc_uri_t *u = s ? mongoc_uri_new_with_error(s, &be) : NULL;
    if (!u) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "no valid MongoDB uri for this sink");
        return NULL;
    }
    if (timeout_ms > 0) {
        mongoc_uri_set_option_as_int32(u, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, (int32_t)timeout_ms);
        mongoc_uri_set_option_as_int32(u, MONGOC_URI_CONNECTTIMEOUTMS, (int32_t)timeout_ms);
    }
    mongoc_uri_set_option_as_bool(u, MONGOC_URI_RETRYWRITES, true);
    mongoc_client_t *c = mongoc_client_new_from_uri_with_error(u, &be);
    mongoc_uri_destroy(u);
    if (!c) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGODB, (int)be.code, "cannot create a client");
        return NULL;
    }
    mongoc_client_set_error_api(c, MONGOC_ERROR_API_VERSION_2);
    char app[128];
    snprintf(app, sizeof(app), "mongocast-sink-%.100s", sink->name);
    mongoc_client_set_appname(c, app);
    return c;
}

static int mg_probe(mc_sink_t *sink, const bson_t *options, int64_t timeout_ms, mc_error_t *err)
{
    mg_opts_t o;
    int rc = parse_opts(sink, options, &o, err);
    if (rc != 0) {
        return rc;
    }
    mongoc_client_t *c = client_for(sink, o.uri, timeout_ms > 0 ? timeout_ms : 5000, err);
    if (!c) {
        opts_free(&o);
        return MC_ECONFIG;
    }
    /* hello opens and authenticates a connection (credentials of the uri); nothing is written. */
    bson_t cmd = BSON_INITIALIZER, reply;
    BSON_APPEND_INT32(&cmd, "hello", 1);
    bson_error_t be;
    bool ok = mongoc_client_command_simple(c, o.db, &cmd, NULL, &reply, &be);
    if (!ok) {
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGODB, (int)be.code, "%s", be.message);
    }
    bson_destroy(&cmd);
    bson_destroy(&reply);
    mongoc_client_destroy(c);
    opts_free(&o);
    return rc;
}

static int mg_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    mg_t *m = mc_sink_ctx(sink);
    m->sink = sink;
    int rc = parse_opts(sink, options, &m->o, err);
    if (rc != 0) {
        return rc;
    }
    if (m->o.projection) {
        m->proj = mc__mongo_projection_new(m->o.projection, err);
        if (!m->proj) {
            return MC_ECONFIG;
        }
    }
    m->wc = mc__mongo_write_concern(m->o.w, m->o.wtimeout_ms, m->o.journal, err);
    return m->wc ? 0 : MC_ECONFIG;
}

/* Creates the TTL index; MC_ECONFIG (another expiry on that index) is fatal, other errors
 * leave it pending (tried again before the next write). */
static int ensure_ttl(mg_t *m, mc_error_t *err)
{
    if (m->o.expire_after_seconds <= 0) {
        m->ttl_pending = false;
        return 0;
    }
    int rc = mc__mongo_ensure_ttl_index(m->coll, m->o.expire_after_seconds, err);
    m->ttl_pending = rc != 0 && rc != MC_ECONFIG;
    if (m->ttl_pending) {
        mc_log(MC_LOG_WARN, "mongodb",
               "sink=%s: TTL index not created yet (tried again before "
               "the next write): %s",
               m->sink->name, err->message);
        return 0;
    }
    return rc;
}

static int mg_start(mc_sink_t *sink, mc_error_t *err)
{
    mg_t *m = mc_sink_ctx(sink);
    m->client = client_for(sink, m->o.uri, 10000, err);
    if (!m->client) {
        return MC_ECONFIG;
    }
    m->coll = mongoc_client_get_collection(m->client, m->o.db, m->o.collection);
    mc__delivery_activate(sink, 1u << MC_SINK_OUT_WRITTEN | 1u << MC_SINK_OUT_DUPLICATE |
                                    1u << MC_SINK_OUT_TRANSIENT | 1u << MC_SINK_OUT_PERMANENT);
    mc_error_t e = {0};
    int rc = ensure_ttl(m, &e);
    if (rc != 0) {
        return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "%s", e.message);
    }
    return 0;
}

static int mg_publish(mc_sink_t *sink, mc_event_t *ev)
{
    mg_t *m = mc_sink_ctx(sink);
    if (!mc_event_id(ev)) {
        return MC_SINK_SKIP; /* ready/reset/error: no id, no place in the log */
    }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 256;
        mc_event_t **evs = realloc(m->evs, cap * sizeof(*evs));
        if (evs) {
            m->evs = evs;
        }
        bson_t **docs = realloc(m->docs, cap * sizeof(*docs));
        if (docs) {
            m->docs = docs;
        }
        mc__mongo_outcome_t *oc = realloc(m->outcomes, cap * sizeof(*oc));
        if (oc) {
            m->outcomes = oc;
        }
        if (!evs || !docs || !oc) {
            return MC_EAGAIN;
        }
        m->cap = cap;
    }
    bson_t *doc = bson_new();
    mc_error_t err = {0};
    if (mc__mongo_sink_doc(ev, m->proj, doc, &err) != 0) {
        bson_destroy(doc);
        return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s", err.message);
    }
    uint64_t epoch = mc_sink_lease_epoch(sink, ev);
    if (epoch > 0) {
        /* The fencing epoch of the lease this node publishes under (lease.enabled). */
        BSON_APPEND_INT64(doc, "leaseEpoch", (int64_t)epoch);
    }
    m->evs[m->n] = mc_event_ref(ev);
    m->docs[m->n] = doc;
    m->n++;
    return 0;
}

static void release(mg_t *m)
{
    for (size_t k = 0; k < m->n; k++) {
        mc_event_unref(&m->evs[k]);
        bson_destroy(m->docs[k]);
    }
    m->n = 0;
}

static void mg_flush(mc_sink_t *sink)
{
    mg_t *m = mc_sink_ctx(sink);
    if (m->n == 0) {
        return;
    }
    const mc_sink_runner_opts_t *ro = &sink->ropts;
    mc__backoff_t bo;
    mc__backoff_init(&bo, ro->retry_initial_ms ? ro->retry_initial_ms : 100,
                     ro->retry_max_ms ? ro->retry_max_ms : 30000,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)m);
    uint32_t attempts = 0;
    int64_t first_fail = 0;
    size_t done = 0;
    while (done < m->n) {
        mc_error_t err = {0};
        if (m->ttl_pending) {
            ensure_ttl(m, &err);
        }
        if (!mc_sink_lease_valid(sink, m->evs[done])) {
            /* The lease ran out while the batch waited or was retried: not a single write
             * more under it. Failed as transient, so the runner takes them back and its lease
             * gate drops them (the next holder writes them from the stored position). */
            for (size_t k = done; k < m->n; k++) {
                mc_sink_fail(sink, m->evs[k], MC_SINK_TRANSIENT, 0, "lease lost: not written");
            }
            break;
        }
        mc__mongo_insert_result_t res;
        memset(&res, 0, sizeof(res));
        size_t todo = m->n - done;
        int64_t t0 = mc__now_ms();
        mc__delivery_sent(sink, todo);
        int rc = mc__mongo_insert_ordered(m->coll, (const bson_t *const *)m->docs + done, todo,
                                          m->wc, m->outcomes + done, &res, &err);
        size_t ok = rc == 0 ? todo : res.failed_index;
        mc__delivery_done(sink, todo, (double)(mc__now_ms() - t0) / 1000.0, MC_SINK_OUT_WRITTEN,
                          res.written);
        mc__delivery_count(sink, MC_SINK_OUT_DUPLICATE, res.duplicates);
        for (size_t k = done; k < done + ok; k++) {
            mc_sink_ack(sink, m->evs[k]);
        }
        done += ok;
        if (rc == 0) {
            break;
        }
        attempts++;
        if (res.cls == MC__MONGO_PERMANENT) {
            mc__delivery_count(sink, MC_SINK_OUT_PERMANENT, 1);
            mc_sink_fail(sink, m->evs[done], MC_SINK_PERMANENT, 0, "%s", res.message);
            done++;
            attempts = 0;
            first_fail = 0;
            mc__backoff_reset(&bo);
            continue;
        }
        mc__delivery_count(sink, MC_SINK_OUT_TRANSIENT, 1);
        int64_t now = mc__now_ms();
        if (!first_fail) {
            first_fail = now;
        }
        if ((ro->max_attempts && attempts >= ro->max_attempts) ||
            (ro->max_retry_ms && now - first_fail >= (int64_t)ro->max_retry_ms)) {
            mc_sink_fail(sink, m->evs[done], MC_SINK_PERMANENT, 0, "gave up after %u attempts: %s",
                         attempts, res.message);
            done++;
            attempts = 0;
            first_fail = 0;
            mc__backoff_reset(&bo);
            continue;
        }
        atomic_store_explicit(&sink->stat_retries,
                              atomic_load_explicit(&sink->stat_retries, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        mc_log(MC_LOG_WARN, "mongodb", "write failed sink=%s attempt=%u: %s (retrying)", sink->name,
               attempts, res.message);
        if (mc_sink_sleep(sink, mc__backoff_next(&bo))) {
            /* Stopping: the rest stays unacknowledged and is written after the restart. */
            break;
        }
    }
    release(m);
}

static void mg_destroy(mc_sink_t *sink)
{
    mg_t *m = mc_sink_ctx(sink);
    release(m);
    free(m->evs);
    free(m->docs);
    free(m->outcomes);
    mongoc_collection_destroy(m->coll);
    mongoc_client_destroy(m->client);
    mongoc_write_concern_destroy(m->wc);
    mc__mongo_projection_destroy(m->proj);
    opts_free(&m->o);
}

const mc_sink_type_t mc__sink_mongodb_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "mongodb",
    .flags = MC_SINK_DURABLE | MC_SINK_BLOCKING,
    .ctx_size = sizeof(mg_t),
    .init = mg_init,
    .start = mg_start,
    .publish = mg_publish,
    .flush = mg_flush,
    .destroy = mg_destroy,
    .validate = mg_validate,
    .probe = mg_probe,
};
