/*
 * snapshot.c: `?snapshot=true` subscriptions (snapshot.h): the subscriber's entitled documents
 * read at one cluster time T and streamed in batches, then ready, then the stream's changes
 * after T, with no gap and no duplicate.
 *
 * Threads:
 *   - the loop thread plans a snapshot (mcd_snapshot_plan: the stream's recipient rule,
 *     pipeline, vars and filter translated to a find filter, or a 400 with the reason), starts
 *     it, moves finished batches to the connection as its send queue allows (pump) and joins
 *     the subscriber to its stream at the end (fanout.c);
 *   - snapshot workers (server.snapshot_workers threads, started on first use, each with a
 *     connection from a MongoDB client pool of their own) run the read: a find with
 *     readConcern snapshot on one session (an aggregate when the find's reply does not say
 *     the snapshot's time), then getMores, check each document as the change
 *     of its insert would be checked (the stream's server $match stages, the subscriber's
 *     routing view, per-subscriber $match stages and filter: mcd_subscription_apply(), the
 *     same code as live delivery), and render batches of compact JSON framed for the
 *     connection's transport.
 *
 * How T is chosen. The read has no atClusterTime: the server reads at its current majority
 * point and reports it (cursor.atClusterTime). Every change the stream had handed the fan-out
 * when the snapshot started is committed at or before T, so its effect is in the snapshot.
 * The subscriber stays out of the live set meanwhile; the hub's history ring keeps what
 * arrives, and at the join the ring's messages since the start are replayed, leaving out
 * changes at or before T, then live delivery skips changes at or before T until the first
 * one after it (a lagging stream may still bring some). All events of one transaction share
 * its commit's cluster time, and a snapshot contains a transaction entirely or not at all,
 * so the cut never splits one. Nothing is buffered per subscriber: when the ring no longer
 * holds everything since the start (it overflowed, or a reset cleared it), the subscriber is
 * ended with snapshot_overflow (close 4011): never a silent gap.
 *
 * Invariants:
 *   - the loop never waits for MongoDB: reads run on workers only;
 *   - memory per snapshot is bounded: one server batch (batchSize documents) on the worker,
 *     the batch being rendered (about SNAP_BATCH_BYTES plus one document), at most
 *     SNAP_QUEUE_BYTES of finished batches waiting for the loop (the worker waits for room),
 *     and in the connection at most half its send queue limit plus one batch (the pump moves
 *     a batch only below that), so a slow client slows its own read and nothing else;
 *   - a snapshot that would send more than its limit (stream max_snapshot_documents, else
 *     server.max_snapshot_documents) ends with snapshot_too_large instead of its `last`
 *     batch; the client drops what it got;
 *   - a job's subscription belongs to its connection until the connection closes; then the
 *     job owns it (the worker may still be using it) and frees it when it is done.
 */
#include "snapshot.h"

#include <inttypes.h>
#include <mongoc/mongoc.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h" /* mc__kill_cursor, mc__cursor_reply_parse */
#include "json_object.h"
#include "json_writer.h"
#include "mongocast/identity.h"
#include "mongocast/pipeline.h"
#include "sse.h"
#include "ws.h"

#define SNAP_BATCH_BYTES (512u * 1024) /* a batch message is cut after this many bytes */
#define SNAP_BATCH_DOCS 2000           /* ... or this many documents */
#define SNAP_QUEUE_BYTES (2u * 1024 * 1024) /* finished batches waiting for the loop, per job */
#define SNAP_SERVER_BATCH 2000         /* documents per find/getMore reply */
#define SNAP_PREFIX 24                 /* room before a body for its WebSocket/SSE framing */
#define SNAP_NOTICE_ROOM 256           /* a batch's own bytes around one document */
#define SNAP_MAX_DEPTH 16              /* of a query translated for the find */
#define SNAP_WORKER_NICE 10            /* the workers' nice value (the loop keeps the process's) */

static const char sse_snapshot_head[] = "event: snapshot\ndata: ";
static const char sse_oversize_head[] = "event: oversize\ndata: ";

/* The document an iterator points at, viewed in place; false for another type. */
static bool iter_doc(const bson_iter_t *it, bson_t *out)
{
    if (!BSON_ITER_HOLDS_DOCUMENT(it) && !BSON_ITER_HOLDS_ARRAY(it)) {
        return false;
    }
    uint32_t len = 0;
    const uint8_t *data = NULL;
    if (BSON_ITER_HOLDS_DOCUMENT(it)) {
        bson_iter_document(it, &len, &data);
    } else {
        bson_iter_array(it, &len, &data);
    }
    return data && bson_init_static(out, data, len);
}

/* ---- Planning: can this subscriber's slice be asked of the collection? ------------------- */

/* The fields of a change event that a document of the snapshot has, seen as the change of its
 * insert: everything else (updateDescription, the previous version, clusterTime, ...) describes
 * a write, which a snapshot document does not have. */
static bool snapshot_field(const char *path)
{
    static const char *const ok[] = {"fullDocument", "documentKey", "ns", "operationType"};
    size_t seg = strcspn(path, ".");
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        if (strlen(ok[i]) == seg && strncmp(path, ok[i], seg) == 0) {
            return true;
        }
    }
    return false;
}

/* Checks the field paths an aggregation expression reads ("$a.b" strings; "$$ROOT.a" and
 * "$$CURRENT.a" too). *bad names the first one a snapshot document lacks. */
static bool check_expr(bson_iter_t *it, int depth, const char **bad)
{
    if (depth > SNAP_MAX_DEPTH) {
        *bad = "an expression nested too deep";
        return false;
    }
    if (BSON_ITER_HOLDS_UTF8(it)) {
        const char *s = bson_iter_utf8(it, NULL);
        if (s[0] != '$') {
            return true;
        }
        const char *path = s + 1;
        if (s[1] == '$') {
            if (strncmp(s, "$$ROOT.", 7) == 0) {
                path = s + 7;
            } else if (strncmp(s, "$$CURRENT.", 10) == 0) {
                path = s + 10;
            } else if (strcmp(s, "$$ROOT") == 0 || strcmp(s, "$$CURRENT") == 0) {
                *bad = s;
                return false;
            } else {
                return true; /* $$REMOVE and the like */
            }
        }
        if (!snapshot_field(path)) {
            *bad = path;
            return false;
        }
        return true;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(it) && !BSON_ITER_HOLDS_ARRAY(it)) {
        return true;
    }
    bson_iter_t child;
    if (!bson_iter_recurse(it, &child)) {
        *bad = "a malformed expression";
        return false;
    }
    while (bson_iter_next(&child)) {
        if (strcmp(bson_iter_key(&child), "$literal") == 0) {
            continue;
        }
        if (!check_expr(&child, depth + 1, bad)) {
            return false;
        }
    }
    return true;
}

/* Checks that a query on the change event reads only what a snapshot document has. */
static bool check_query(const bson_t *q, int depth, const char **bad)
{
    bson_iter_t it;
    if (depth > SNAP_MAX_DEPTH || !bson_iter_init(&it, q)) {
        *bad = "a query nested too deep";
        return false;
    }
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "$and") == 0 || strcmp(k, "$or") == 0 || strcmp(k, "$nor") == 0) {
            bson_iter_t arr;
            if (!BSON_ITER_HOLDS_ARRAY(&it) || !bson_iter_recurse(&it, &arr)) {
                *bad = k;
                return false;
            }
            while (bson_iter_next(&arr)) {
                bson_t sub;
                if (!iter_doc(&arr, &sub) || !check_query(&sub, depth + 1, bad)) {
                    if (!*bad) {
                        *bad = k;
                    }
                    return false;
                }
            }
        } else if (strcmp(k, "$expr") == 0) {
            if (!check_expr(&it, 0, bad)) {
                return false;
            }
        } else if (strcmp(k, "$comment") == 0) {
            continue;
        } else if (k[0] == '$' || !snapshot_field(k)) {
            *bad = k;
            return false;
        }
    }
    return true;
}

/* Copies a query value, with {$var: name} replaced by its binding. */
static bool copy_value(bson_t *out, const char *key, bson_iter_t *it, const bson_t *vars,
                       int depth)
{
    if (depth > SNAP_MAX_DEPTH) {
        return false;
    }
    if (BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) {
        bson_iter_t child;
        if (!bson_iter_recurse(it, &child)) {
            return false;
        }
        bson_iter_t probe = child;
        if (BSON_ITER_HOLDS_DOCUMENT(it) && bson_iter_next(&probe) &&
            strcmp(bson_iter_key(&probe), "$var") == 0 && BSON_ITER_HOLDS_UTF8(&probe)) {
            bson_iter_t v;
            return vars && bson_iter_init_find(&v, vars, bson_iter_utf8(&probe, NULL)) &&
                   bson_append_value(out, key, -1, bson_iter_value(&v));
        }
        bson_t sub;
        bool doc = BSON_ITER_HOLDS_DOCUMENT(it);
        if (!(doc ? bson_append_document_begin(out, key, -1, &sub)
                  : bson_append_array_begin(out, key, -1, &sub))) {
            return false;
        }
        bool ok = true;
        while (ok && bson_iter_next(&child)) {
            ok = copy_value(&sub, bson_iter_key(&child), &child, vars, depth + 1);
        }
        return (doc ? bson_append_document_end(out, &sub) : bson_append_array_end(out, &sub)) &&
               ok;
    }
    return bson_append_value(out, key, -1, bson_iter_value(it));
}

/* The collection's own name of a change-event path (fullDocument.x and documentKey.x are x),
 * or NULL. */
static const char *collection_path(const char *path)
{
    if (strncmp(path, "fullDocument.", 13) == 0 && path[13]) {
        return path + 13;
    }
    if (strncmp(path, "documentKey.", 12) == 0 && path[12]) {
        return path + 12;
    }
    return NULL;
}

enum { TR_EXACT = 1, TR_WIDER = 0, TR_NO = -1 };

/* Appends to `out` the conditions of `q` (a query on the change event) as a query on the
 * collection. Where `may_drop` (the top level and its $and) a condition that cannot be
 * translated is left out, which only widens the result (TR_WIDER); elsewhere ($or, $nor)
 * it makes the whole query untranslatable (TR_NO). Documents are checked one by one on the
 * worker anyway, so a wider query costs reads, never correctness. */
static int translate(const bson_t *q, const bson_t *vars, bool may_drop, int depth, bson_t *out)
{
    bson_iter_t it;
    if (depth > SNAP_MAX_DEPTH || !bson_iter_init(&it, q)) {
        return TR_NO;
    }
    int res = TR_EXACT;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        bool logical = strcmp(k, "$and") == 0 || strcmp(k, "$or") == 0 || strcmp(k, "$nor") == 0;
        int r = TR_NO;
        if (logical && BSON_ITER_HOLDS_ARRAY(&it)) {
            bool keep = may_drop && k[1] == 'a';
            bson_t arr;
            bson_init(&arr);
            bson_iter_t child;
            r = bson_iter_recurse(&it, &child) ? TR_EXACT : TR_NO;
            uint32_t n = 0;
            while (r != TR_NO && bson_iter_next(&child)) {
                bson_t sub, tr;
                char key[16];
                if (!iter_doc(&child, &sub)) {
                    r = TR_NO;
                    break;
                }
                bson_init(&tr);
                int rr = translate(&sub, vars, keep, depth + 1, &tr);
                if (rr == TR_WIDER) {
                    r = TR_WIDER;
                } else if (rr == TR_NO) {
                    r = TR_NO;
                }
                /* An empty branch matches everything: an $and can do without it, an $or or
                 * a $nor cannot. */
                if (rr != TR_NO && (!bson_empty(&tr) || k[1] != 'a')) {
                    snprintf(key, sizeof(key), "%u", n++);
                    BSON_APPEND_DOCUMENT(&arr, key, &tr);
                }
                bson_destroy(&tr);
            }
            if (r != TR_NO && n > 0) {
                BSON_APPEND_ARRAY(out, k, &arr);
            } else if (r != TR_NO && k[1] != 'a') {
                r = TR_NO; /* every branch of an $or / $nor was left out */
            }
            bson_destroy(&arr);
        } else if (strcmp(k, "$comment") == 0) {
            r = TR_EXACT;
        } else if (k[0] != '$' && collection_path(k)) {
            r = copy_value(out, collection_path(k), &it, vars, depth) ? TR_EXACT : TR_NO;
        }
        if (r == TR_NO) {
            if (!may_drop) {
                return TR_NO;
            }
            r = TR_WIDER;
        }
        if (r == TR_WIDER) {
            res = TR_WIDER;
        }
    }
    return res;
}

/* Appends {path: identity} (the canonical identity as a BSON value of its type; an integer as
 * Int64, which the server compares with every numeric type, like the identity rule). */
static bool append_identity(bson_t *out, const char *path, const uint8_t *id, size_t len)
{
    if (len < 1) {
        return false;
    }
    switch (id[0]) {
    case 's': return bson_append_utf8(out, path, -1, (const char *)id + 1, (int)(len - 1));
    case 'i': {
        if (len != 9) {
            return false;
        }
        uint64_t u = 0;
        for (int k = 1; k < 9; k++) {
            u = u << 8 | id[k];
        }
        return bson_append_int64(out, path, -1, (int64_t)u);
    }
    case 'o': {
        if (len != 13) {
            return false;
        }
        bson_oid_t oid;
        bson_oid_init_from_data(&oid, id + 1);
        return bson_append_oid(out, path, -1, &oid);
    }
    case 'b':
        return len >= 2 &&
               bson_append_binary(out, path, -1, (bson_subtype_t)id[1], id + 2, (uint32_t)len - 2);
    default: return false;
    }
}

/* Each stage of `stages` must be a $match whose query reads only snapshot fields; its
 * translation joins `conds`. */
static int plan_stages(const bson_t *stages, const bson_t *vars, const char *which, bson_t *conds,
                       uint32_t *n_conds, mcd_refusal_t *r)
{
    bson_iter_t it;
    if (!bson_iter_init(&it, stages)) {
        return mcd_refuse(r, 400, "snapshot_not_supported", "the stream's pipeline is malformed");
    }
    uint32_t i = 0;
    while (bson_iter_next(&it)) {
        bson_t stage, q;
        bson_iter_t s;
        if (!iter_doc(&it, &stage) || !bson_iter_init(&s, &stage) ||
            !bson_iter_next(&s)) {
            return mcd_refuse(r, 400, "snapshot_not_supported", "the stream's pipeline is malformed");
        }
        const char *op = bson_iter_key(&s);
        if (strcmp(op, "$match") != 0 || !iter_doc(&s, &q)) {
            return mcd_refuse(r, 400, "snapshot_not_supported",
                              "snapshot needs a stream whose %s stages only filter (%s stage %u is "
                              "%.40s)",
                              which, which, i, op);
        }
        const char *bad = NULL;
        if (!check_query(&q, 0, &bad)) {
            return mcd_refuse(r, 400, "snapshot_not_supported",
                              "the %s stage %u reads %.80s, which a snapshot document does not "
                              "have (only fullDocument, documentKey, ns and operationType)",
                              which, i, bad ? bad : "a field");
        }
        bson_t tr;
        bson_init(&tr);
        translate(&q, vars, true, 0, &tr);
        if (!bson_empty(&tr)) {
            char key[16];
            snprintf(key, sizeof(key), "%u", (*n_conds)++);
            BSON_APPEND_DOCUMENT(conds, key, &tr);
        }
        bson_destroy(&tr);
        i++;
    }
    return 0;
}

int mcd_snapshot_plan(const mc_stream_config_t *stream, const mcd_subscription_t *sub,
                      const char *vars_json, const char *filter_json, bson_t *query,
                      mcd_refusal_t *r)
{
    bson_init(query);
    if (!stream->db || !stream->collection) {
        return mcd_refuse(r, 400, "snapshot_not_supported",
                          "snapshot needs a stream on one collection (this stream watches a "
                          "database or the cluster)");
    }
    if (stream->lookup || stream->by_collection || stream->recipient_default) {
        return mcd_refuse(r, 400, "snapshot_not_supported",
                          "snapshot is not supported with the lookup or by_collection recipient "
                          "forms (a document's recipient is not in the document)");
    }
    if (stream->history == 0) {
        return mcd_refuse(r, 400, "snapshot_not_supported",
                          "snapshot needs the stream's history (history is 0)");
    }
    if (mcd_subscription_reshapes(sub)) {
        return mcd_refuse(r, 400, "snapshot_not_supported",
                          "the stream's per-subscriber stages reshape the change: a snapshot "
                          "document could not take the same shape");
    }
    bson_t conds;
    bson_init(&conds);
    uint32_t n = 0;
    int rc = 0;
    size_t id_len = 0;
    const uint8_t *id = mcd_subscription_identity(sub, &id_len);
    if (stream->recipient) {
        const char *path = collection_path(stream->recipient);
        if (!path) {
            rc = mcd_refuse(r, 400, "snapshot_not_supported",
                            "snapshot needs the recipient under fullDocument or documentKey (it "
                            "is %.80s)",
                            stream->recipient);
            goto done;
        }
        if (id) {
            bson_t eq;
            bson_init(&eq);
            if (append_identity(&eq, path, id, id_len)) {
                BSON_APPEND_DOCUMENT(&conds, "0", &eq);
                n++;
            }
            bson_destroy(&eq);
        }
    }
    bson_t server, local, vars;
    bool have_vars = false;
    mc_error_t err = {0};
    if (mc_pipeline_split(stream->pipeline, &server, &local, &err) != 0) {
        bson_destroy(&server);
        bson_destroy(&local);
        rc = mcd_refuse(r, 400, "snapshot_not_supported", "the stream's pipeline is malformed");
        goto done;
    }
    if (vars_json && *vars_json) {
        /* The subscription parsed and checked them already. */
        have_vars = mcd_json_object_parse(vars_json, strlen(vars_json), &vars) == 0;
    }
    rc = plan_stages(&server, NULL, "pipeline", &conds, &n, r);
    if (rc == 0) {
        rc = plan_stages(&local, have_vars ? &vars : NULL, "per-subscriber", &conds, &n, r);
    }
    bson_destroy(&server);
    bson_destroy(&local);
    if (have_vars) {
        bson_destroy(&vars);
    }
    if (rc == 0 && filter_json && *filter_json) {
        bson_t f;
        const char *bad = NULL;
        if (mcd_json_object_parse(filter_json, strlen(filter_json), &f) != 0) {
            rc = mcd_refuse(r, 400, "invalid_filter", "filter must be a JSON object");
            goto done;
        }
        if (!check_query(&f, 0, &bad)) {
            rc = mcd_refuse(r, 400, "snapshot_not_supported",
                            "the filter reads %.80s, which a snapshot document does not have "
                            "(only fullDocument, documentKey, ns and operationType)",
                            bad ? bad : "a field");
        } else {
            bson_t tr;
            bson_init(&tr);
            translate(&f, NULL, true, 0, &tr);
            if (!bson_empty(&tr)) {
                char key[16];
                snprintf(key, sizeof(key), "%u", n++);
                BSON_APPEND_DOCUMENT(&conds, key, &tr);
            }
            bson_destroy(&tr);
        }
        bson_destroy(&f);
    }
    if (rc == 0 && n > 0) {
        BSON_APPEND_ARRAY(query, "$and", &conds);
    }
done:
    bson_destroy(&conds);
    return rc;
}

/* ---- Jobs ---------------------------------------------------------------------------------- */

typedef struct snap_out {
    struct snap_out *next;
    mcd_msg_t *msg;
    size_t bytes;
} snap_out_t;

enum { JOB_RUNNING = 0, JOB_DONE, JOB_FAILED };

typedef struct snap_job {
    struct snap_job *next_pending; /* the workers' queue (s->mu) */
    /* A task of another reader on these workers (a client's catch-up, catchup.c): the worker
     * runs task(task_arg) and frees this entry; nothing below is used. */
    void (*task)(void *arg);
    void *task_arg;
    struct snap_job *prev, *next;  /* the loop's list of jobs */
    mcd_snapshots_t *s;
    /* Set at the start, then read by the worker. */
    const mc_stream_config_t *cfg;
    mcd_subscription_t *sub;
    bool check_each; /* documents need the per-document check (else every one is sent) */
    bool matches_all;
    uint8_t transport;
    bson_t query;
    mc_pipeline_t *server_stages; /* the stream's server $match stages, or NULL */
    uint64_t max_docs;
    size_t max_message;
    uint64_t budget_ns;
    char *stream_json; /* the stream name as a JSON string */
    /* The loop's. */
    mcd_conn_t *conn; /* NULL once the connection closed */
    bool sub_owned;   /* the connection closed: the job frees `sub` */
    mcd_hub_t *hub;
    mcd_conn_set_t set; /* the connection while its snapshot runs (closing tells the job) */
    uint64_t seq;
    uint32_t epoch;
    /* Shared, under s->mu. */
    snap_out_t *out_head, *out_tail;
    size_t out_bytes;
    int state;
    bool cancelled;
    uint64_t at;
    uint64_t count;
    uint16_t close_code;
    char err_code[32];
    char err_reason[160];
} snap_job_t;

struct mcd_snapshots {
    uv_loop_t *loop;
    uv_async_t async;
    bool async_open;
    const mc_config_t *config;
    pthread_mutex_t mu;
    pthread_cond_t work;
    pthread_cond_t room;
    snap_job_t *pending_head, *pending_tail;
    pthread_t *threads;
    uint32_t n_threads;
    bool stopping;
    mongoc_client_pool_t *pool;
    mongoc_uri_t *uri;
    snap_job_t *jobs; /* the loop's list */
    mcd_snapshot_stats_t stats;
};

static void job_free(snap_job_t *job)
{
    while (job->out_head) {
        snap_out_t *o = job->out_head;
        job->out_head = o->next;
        mcd_msg_unref(o->msg);
        free(o);
    }
    if (job->sub_owned) {
        mcd_subscription_destroy(job->sub);
    }
    mcd_conn_set_cleanup(&job->set);
    mc_pipeline_destroy(job->server_stages);
    bson_destroy(&job->query);
    bson_free(job->stream_json);
    free(job);
}

/* Wakes the loop (any thread; s->mu held). */
static void wake_loop(mcd_snapshots_t *s)
{
    if (s->async_open) {
        uv_async_send(&s->async);
    }
}

/* The worker is done with `job` (its last access). */
static void job_finish(snap_job_t *job, int state, uint16_t close_code, const char *code,
                       const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
static void job_finish(snap_job_t *job, int state, uint16_t close_code, const char *code,
                       const char *fmt, ...)
{
    mcd_snapshots_t *s = job->s;
    pthread_mutex_lock(&s->mu);
    if (state == JOB_FAILED) {
        job->close_code = close_code;
        snprintf(job->err_code, sizeof(job->err_code), "%s", code);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(job->err_reason, sizeof(job->err_reason), fmt, ap);
        va_end(ap);
    }
    job->state = state;
    wake_loop(s);
    pthread_mutex_unlock(&s->mu);
}

/* ---- The worker's side: reading and rendering ---------------------------------------------- */

typedef struct reader {
    snap_job_t *job;
    mc__json_buf_t batch;
    uint32_t batch_docs;
    uint64_t sent; /* documents of the subscriber's slice so far */
    uint32_t at_t, at_i;
    bool finished; /* job_finish() was called: the job must not be touched again */
} reader_t;

#define rd_fail(rd, ...) ((rd)->finished = true, job_finish((rd)->job, JOB_FAILED, __VA_ARGS__))

/* Frames the body in `b` (from SNAP_PREFIX on) for the job's transport and hands it to the
 * loop, waiting while the job has SNAP_QUEUE_BYTES waiting. Returns 0, or MC_ECLOSED when the
 * job was cancelled, MC_ENOMEM. */
static int push_body(snap_job_t *job, mc__json_buf_t *b, const char *sse_head, size_t head_len)
{
    if (job->transport == MCD_T_SSE) {
        MC__JSON_LIT(b, "\n\n");
    }
    size_t len = 0;
    char *data = mc__json_buf_steal(b, &len);
    if (!data) {
        return MC_ENOMEM;
    }
    size_t off;
    if (job->transport == MCD_T_SSE) {
        off = SNAP_PREFIX - head_len;
        memcpy(data + off, sse_head, head_len);
    } else {
        uint8_t hdr[10];
        size_t h = mcd_ws_frame_header(hdr, MCD_WS_OP_TEXT, len - SNAP_PREFIX);
        off = SNAP_PREFIX - h;
        memcpy(data + off, hdr, h);
    }
    size_t bytes = len - off;
    mcd_msg_t *msg = mcd_msg_new_taken(data, off, bytes);
    snap_out_t *o = msg ? malloc(sizeof(*o)) : NULL;
    if (!o) {
        mcd_msg_unref(msg);
        return MC_ENOMEM;
    }
    o->next = NULL;
    o->msg = msg;
    o->bytes = bytes;
    mcd_snapshots_t *s = job->s;
    pthread_mutex_lock(&s->mu);
    while (!job->cancelled && job->out_bytes >= SNAP_QUEUE_BYTES) {
        pthread_cond_wait(&s->room, &s->mu);
    }
    if (job->cancelled) {
        pthread_mutex_unlock(&s->mu);
        mcd_msg_unref(msg);
        free(o);
        return MC_ECLOSED;
    }
    if (job->out_tail) {
        job->out_tail->next = o;
    } else {
        job->out_head = o;
    }
    job->out_tail = o;
    job->out_bytes += bytes;
    wake_loop(s);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

static void batch_open(reader_t *rd)
{
    mc__json_buf_init(&rd->batch, SNAP_BATCH_BYTES + 4096, 0);
    static const char pad[SNAP_PREFIX] = {0};
    mc__json_buf_append(&rd->batch, pad, SNAP_PREFIX);
    MC__JSON_LIT(&rd->batch, "{\"type\":\"snapshot\",\"stream\":");
    mc__json_buf_append(&rd->batch, rd->job->stream_json, strlen(rd->job->stream_json));
    MC__JSON_LIT(&rd->batch, ",\"documents\":[");
    rd->batch_docs = 0;
}

/* Ends the batch being rendered and hands it over; the last one says so, with the count and
 * the snapshot's cluster time. */
static int batch_flush(reader_t *rd, bool last)
{
    MC__JSON_LIT(&rd->batch, "]");
    if (last) {
        char tail[160];
        int n = snprintf(tail, sizeof(tail),
                         ",\"last\":true,\"count\":%" PRIu64
                         ",\"clusterTime\":{\"$timestamp\":{\"t\":%" PRIu32 ",\"i\":%" PRIu32 "}}",
                         rd->sent, rd->at_t, rd->at_i);
        mc__json_buf_append(&rd->batch, tail, (size_t)n);
    }
    MC__JSON_LIT(&rd->batch, "}");
    int rc = push_body(rd->job, &rd->batch, sse_snapshot_head, sizeof(sse_snapshot_head) - 1);
    mc__json_buf_destroy(&rd->batch);
    if (rc == 0 && !last) {
        batch_open(rd);
    }
    return rc;
}

/* A document too large for a message of its own: an oversize notice with its _id. */
static int push_oversize(reader_t *rd, const bson_t *doc, size_t size)
{
    mc__json_buf_t b;
    mc__json_buf_init(&b, 512, 0);
    static const char pad[SNAP_PREFIX] = {0};
    mc__json_buf_append(&b, pad, SNAP_PREFIX);
    MC__JSON_LIT(&b, "{\"type\":\"oversize\",\"stream\":");
    mc__json_buf_append(&b, rd->job->stream_json, strlen(rd->job->stream_json));
    MC__JSON_LIT(&b, ",\"snapshot\":true,\"documentKey\":");
    bson_t key;
    bson_init(&key);
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, "_id")) {
        bson_append_value(&key, "_id", 3, bson_iter_value(&it));
    }
    if (key.len > 4096) {
        MC__JSON_LIT(&b, "null");
    } else {
        mc__json_write_document(&b, &key, MC__JSON_RELAXED_COMPACT);
    }
    bson_destroy(&key);
    char tail[96];
    int n = snprintf(tail, sizeof(tail), ",\"size\":%zu,\"limit\":%zu}", size,
                     rd->job->max_message);
    mc__json_buf_append(&b, tail, (size_t)n);
    int rc = push_body(rd->job, &b, sse_oversize_head, sizeof(sse_oversize_head) - 1);
    mc__json_buf_destroy(&b);
    return rc;
}

/* Whether the subscriber is entitled to `doc`: the stream's server stages and the subscriber's
 * view of the change the document's insert would be (routing, per-subscriber stages, filter),
 * with the same code as live delivery. 1 yes, 0 no, or a negative status (the job is then
 * finished here). */
static int entitled(reader_t *rd, const bson_t *doc)
{
    snap_job_t *job = rd->job;
    bson_t change, ns, key;
    bson_init(&change);
    bson_t id;
    BSON_APPEND_DOCUMENT_BEGIN(&change, "_id", &id);
    BSON_APPEND_UTF8(&id, "_data", "00");
    bson_append_document_end(&change, &id);
    BSON_APPEND_UTF8(&change, "operationType", "insert");
    BSON_APPEND_TIMESTAMP(&change, "clusterTime", rd->at_t, rd->at_i);
    BSON_APPEND_DOCUMENT_BEGIN(&change, "ns", &ns);
    BSON_APPEND_UTF8(&ns, "db", job->cfg->db);
    BSON_APPEND_UTF8(&ns, "coll", job->cfg->collection);
    bson_append_document_end(&change, &ns);
    BSON_APPEND_DOCUMENT_BEGIN(&change, "documentKey", &key);
    bson_iter_t it;
    if (bson_iter_init_find(&it, doc, "_id")) {
        bson_append_value(&key, "_id", 3, bson_iter_value(&it));
    }
    bson_append_document_end(&change, &key);
    BSON_APPEND_DOCUMENT(&change, "fullDocument", doc);

    mc_filter_budget_t budget = {.cpu_ns = job->budget_ns};
    mc_error_t err = {0};
    int res = 1;
    if (job->server_stages) {
        int rc = mc_pipeline_test(job->server_stages, &change, &budget, &err);
        if (rc < 0 && budget.exceeded) {
            goto budget;
        }
        if (rc < 0) {
            rd_fail(rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                       "the stream's pipeline failed on a document");
            res = MC_EINVAL;
            goto out;
        }
        if (rc == 0) {
            res = 0;
            goto out;
        }
    }
    if (!job->matches_all) {
        mc_event_t *ev = mc_event_new_change(job->cfg->name, 0, &change, job->cfg->recipient, &err);
        if (!ev) {
            rd_fail(rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                       "a document cannot be checked");
            res = MC_ENOMEM;
            goto out;
        }
        bson_t own_change;
        bool own = false;
        int code = 0;
        int view = mcd_subscription_apply(job->sub, ev, &budget, &own_change, &own, &code);
        mc_event_unref(&ev);
        if (own) {
            bson_destroy(&own_change);
        }
        if (view < 0) {
            goto budget;
        }
        if (code != 0) {
            rd_fail(rd, MCD_WS_CLOSE_STREAM_FAILED, MCD_ERROR_PIPELINE,
                       "%s", MCD_ERROR_PIPELINE_REASON);
            res = MC_EINVAL;
            goto out;
        }
        res = view == MC_EVENT_VIEW_FULL ? 1 : 0;
    }
    goto out;
budget:
    rd_fail(rd, MCD_WS_CLOSE_FILTER, "filter_budget",
               "filter too expensive: %s during snapshot",
               budget.reason ? budget.reason : "CPU budget exhausted");
    res = MC_ELIMIT;
out:
    bson_destroy(&change);
    return res;
}

/* One document of the server's answer. Returns 0, or a negative status when the job is over
 * (finished here, or cancelled). */
static int take_document(reader_t *rd, const bson_t *doc)
{
    snap_job_t *job = rd->job;
    if (job->check_each) {
        int e = entitled(rd, doc);
        if (e <= 0) {
            return e;
        }
    }
    if (++rd->sent > job->max_docs) {
        rd_fail(rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_TOO_LARGE,
                   "snapshot larger than %" PRIu64 " documents (max_snapshot_documents)",
                   job->max_docs);
        return MC_ELIMIT;
    }
    /* Cut before a document that would make the batch too long: about twice its BSON size
     * in JSON is the usual case; a longer one is caught below. */
    if (rd->batch_docs && rd->batch.len + 2 * (size_t)doc->len > SNAP_BATCH_BYTES) {
        int rc = batch_flush(rd, false);
        if (rc != 0) {
            return rc;
        }
    }
    size_t mark = rd->batch.len;
    if (rd->batch_docs) {
        MC__JSON_LIT(&rd->batch, ",");
    }
    size_t start = rd->batch.len;
    mc__json_write_document(&rd->batch, doc, MC__JSON_RELAXED_COMPACT);
    size_t doc_len = rd->batch.len - start;
    if (rd->batch.err == MC__JSON_EINVALID) {
        /* libbson would refuse to render it too (invalid UTF-8): a live change of it could
         * not be sent either. */
        rd_fail(rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                   "a document cannot be rendered as JSON");
        return MC_EINVAL;
    }
    if (rd->batch.err != MC__JSON_OK || doc_len + SNAP_NOTICE_ROOM > job->max_message) {
        rd->batch.err = MC__JSON_OK;
        rd->batch.len = mark;
        rd->sent--; /* the notice stands in for it and is not counted */
        return push_oversize(rd, doc, doc_len);
    }
    rd->batch_docs++;
    if (rd->batch_docs >= SNAP_BATCH_DOCS || rd->batch.len >= SNAP_BATCH_BYTES) {
        return batch_flush(rd, false);
    }
    return 0;
}

/* Reads cursor.<batch> of `reply` into the batch; *id gets the cursor id. */
static int take_batch(reader_t *rd, const bson_t *reply, const char *which, int64_t *id)
{
    mc__cursor_reply_t r;
    bool parsed = mc__cursor_reply_parse(reply, which, &r);
    *id = r.id;
    if (!parsed) {
        rd_fail(rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                   "the server's answer has no cursor");
        return MC_EINVAL;
    }
    if (r.have_time && !rd->at_t) {
        rd->at_t = r.at_t;
        rd->at_i = r.at_i;
    }
    if (!rd->at_t) {
        return MC_ENOTFOUND; /* the caller decides: ask again, or fail */
    }
    bson_iter_t docs = r.docs;
    while (r.have_docs && bson_iter_next(&docs)) {
        bson_t doc;
        if (!iter_doc(&docs, &doc)) {
            continue;
        }
        int rc = take_document(rd, &doc);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

static bool job_cancelled(snap_job_t *job)
{
    pthread_mutex_lock(&job->s->mu);
    bool c = job->cancelled;
    pthread_mutex_unlock(&job->s->mu);
    return c;
}

/* The read's first command: a find, or the same read as an aggregate of one $match. */
static void first_command(const snap_job_t *job, bool aggregate, bson_t *cmd)
{
    bson_reinit(cmd);
    if (aggregate) {
        bson_t pipeline, stage, cursor_opt;
        BSON_APPEND_UTF8(cmd, "aggregate", job->cfg->collection);
        BSON_APPEND_ARRAY_BEGIN(cmd, "pipeline", &pipeline);
        BSON_APPEND_DOCUMENT_BEGIN(&pipeline, "0", &stage);
        BSON_APPEND_DOCUMENT(&stage, "$match", &job->query);
        bson_append_document_end(&pipeline, &stage);
        bson_append_array_end(cmd, &pipeline);
        BSON_APPEND_DOCUMENT_BEGIN(cmd, "cursor", &cursor_opt);
        BSON_APPEND_INT32(&cursor_opt, "batchSize", SNAP_SERVER_BATCH);
        bson_append_document_end(cmd, &cursor_opt);
    } else {
        BSON_APPEND_UTF8(cmd, "find", job->cfg->collection);
        BSON_APPEND_DOCUMENT(cmd, "filter", &job->query);
        BSON_APPEND_INT32(cmd, "batchSize", SNAP_SERVER_BATCH);
    }
    bson_t rcn;
    BSON_APPEND_DOCUMENT_BEGIN(cmd, "readConcern", &rcn);
    BSON_APPEND_UTF8(&rcn, "level", "snapshot");
    bson_append_document_end(cmd, &rcn);
}

static void run_job(mcd_snapshots_t *s, snap_job_t *job)
{
    const mc_stream_config_t *cfg = job->cfg; /* for after the job is finished */
    if (job_cancelled(job)) {
        job_finish(job, JOB_FAILED, 0, MCD_SNAPSHOT_FAILED, "cancelled");
        return;
    }
    mongoc_client_t *client = mongoc_client_pool_pop(s->pool);
    bson_error_t berr;
    mongoc_client_session_t *session = mongoc_client_start_session(client, NULL, &berr);
    reader_t rd = {.job = job};
    bson_t opts = BSON_INITIALIZER, cmd = BSON_INITIALIZER, reply;
    int64_t cursor = 0;
    int rc = 0;
    if (!session || !mongoc_client_session_append(session, &opts, &berr)) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                           "snapshot read cannot start a session stream=%s code=%u: %s",
                           job->cfg->name, berr.code, berr.message);
        job_finish(job, JOB_FAILED, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                   "cannot start a session");
        goto out;
    }
    batch_open(&rd);
    bool aggregate = false;
    first_command(job, aggregate, &cmd);
    bool ok = mongoc_client_read_command_with_opts(client, job->cfg->db, &cmd, NULL, &opts, &reply,
                                                   &berr);
    const char *which = "firstBatch";
    for (;;) {
        if (!ok) {
            static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
            mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                               "snapshot read failed stream=%s code=%u: %s", job->cfg->name,
                               berr.code, berr.message);
            rd_fail(&rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                    "the snapshot read failed (code %u; the reason is in the daemon's log)",
                    berr.code);
            bson_destroy(&reply);
            rc = MC_ESERVER;
            break;
        }
        rc = take_batch(&rd, &reply, which, &cursor);
        bson_destroy(&reply);
        if (rc == MC_ENOTFOUND && !aggregate) {
            /* MongoDB leaves atClusterTime out of the reply of a find that returns nothing
             * (SERVER-83472); the same read as an aggregate always says it (a find is the
             * cheaper read otherwise, on the emulator by far). Nothing was taken yet. */
            mc__kill_cursor(client, cfg, &opts, cursor);
            cursor = 0;
            aggregate = true;
            first_command(job, aggregate, &cmd);
            ok = mongoc_client_read_command_with_opts(client, job->cfg->db, &cmd, NULL, &opts,
                                                      &reply, &berr);
            continue;
        }
        if (rc == MC_ENOTFOUND) {
            rd_fail(&rd, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED,
                    "the server did not say the snapshot's cluster time (MongoDB 5.0 or later "
                    "is needed)");
            rc = MC_EINVAL;
        }
        if (rc != 0 || cursor == 0) {
            break;
        }
        if (job_cancelled(job)) {
            rc = MC_ECLOSED;
            break;
        }
        bson_reinit(&cmd);
        BSON_APPEND_INT64(&cmd, "getMore", cursor);
        BSON_APPEND_UTF8(&cmd, "collection", job->cfg->collection);
        BSON_APPEND_INT32(&cmd, "batchSize", SNAP_SERVER_BATCH);
        ok = mongoc_client_read_command_with_opts(client, job->cfg->db, &cmd, NULL, &opts, &reply,
                                                  &berr);
        which = "nextBatch";
    }
    mc__kill_cursor(client, cfg, &opts, cursor);
    if (rc == 0) {
        rc = batch_flush(&rd, true);
    } else {
        mc__json_buf_destroy(&rd.batch);
    }
    if (rc == 0) {
        pthread_mutex_lock(&s->mu);
        job->at = (uint64_t)rd.at_t << 32 | rd.at_i;
        job->count = rd.sent;
        pthread_mutex_unlock(&s->mu);
        job_finish(job, JOB_DONE, 0, "", "%s", "");
    } else if (!rd.finished) {
        job_finish(job, JOB_FAILED, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_FAILED, "%s",
                   rc == MC_ENOMEM ? "out of memory" : "cancelled");
    }
out:
    bson_destroy(&cmd);
    bson_destroy(&opts);
    mongoc_client_session_destroy(session);
    mongoc_client_pool_push(s->pool, client);
}

static void *worker_main(void *arg)
{
    mcd_snapshots_t *s = arg;
    /* Background reads (snapshots, catch-ups) yield the CPU to the loop thread, whose live
     * delivery is latency-bound: Linux nice applies per thread. Best effort. */
    (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), SNAP_WORKER_NICE);
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->stopping && !s->pending_head) {
            pthread_cond_wait(&s->work, &s->mu);
        }
        snap_job_t *job = s->pending_head;
        if (job) {
            s->pending_head = job->next_pending;
            if (!s->pending_head) {
                s->pending_tail = NULL;
            }
        }
        pthread_mutex_unlock(&s->mu);
        if (!job) {
            return NULL; /* stopping, nothing left */
        }
        if (job->task) {
            job->task(job->task_arg);
            free(job);
            continue;
        }
        run_job(s, job);
    }
}

/* ---- The loop's side ------------------------------------------------------------------------ */

static void on_async(uv_async_t *a)
{
    mcd_snapshots_pump(a->data);
}

mcd_snapshots_t *mcd_snapshots_new(uv_loop_t *loop, const mc_config_t *config)
{
    mcd_snapshots_t *s = calloc(1, sizeof(*s));
    if (!s) {
        return NULL;
    }
    s->loop = loop;
    s->config = config;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->room, NULL);
    uv_async_init(loop, &s->async, on_async);
    s->async.data = s;
    s->async_open = true;
    return s;
}

/* Starts the workers and their client pool on first use. */
static int ensure_workers(mcd_snapshots_t *s)
{
    if (s->threads) {
        return 0;
    }
    if (!s->config->mongodb_uri) {
        return MC_EINVAL;
    }
    bson_error_t berr;
    s->uri = mongoc_uri_new_with_error(s->config->mongodb_uri, &berr);
    if (!s->uri) {
        return MC_EINVAL;
    }
    if (!mongoc_uri_has_option(s->uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS)) {
        /* A snapshot is read off the loop and its client waits anyway: give a busy server
         * longer than the watchers' 5 s before the subscriber is told the read failed. */
        mongoc_uri_set_option_as_int32(s->uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 30000);
    }
    uint32_t n = s->config->server.snapshot_workers ? s->config->server.snapshot_workers : 2;
    s->pool = mongoc_client_pool_new_with_error(s->uri, &berr);
    s->threads = s->pool ? calloc(n, sizeof(*s->threads)) : NULL;
    if (!s->threads) {
        mongoc_client_pool_destroy(s->pool);
        s->pool = NULL;
        return MC_ENOMEM;
    }
    /* One client per worker, and room for the lookups a client's catch-up (catchup.c) runs
     * on the same worker (a few per stream at most); clients are made only when needed. */
    mongoc_client_pool_max_size(s->pool, n * 8);
    mongoc_client_pool_set_error_api(s->pool, MONGOC_ERROR_API_VERSION_2);
    for (uint32_t i = 0; i < n; i++) {
        if (pthread_create(&s->threads[i], NULL, worker_main, s) != 0) {
            break;
        }
        s->n_threads++;
    }
    if (!s->n_threads) {
        free(s->threads);
        s->threads = NULL;
        return MC_ENOMEM;
    }
    mc_log(MC_LOG_INFO, "server", "snapshot workers started threads=%u", s->n_threads);
    return 0;
}

static void stop_all(mcd_snapshots_t *s);

/* Puts `job` at the end of the workers' queue and wakes one of them (s->mu held). */
static void enqueue_pending(mcd_snapshots_t *s, snap_job_t *job)
{
    if (s->pending_tail) {
        s->pending_tail->next_pending = job;
    } else {
        s->pending_head = job;
    }
    s->pending_tail = job;
    pthread_cond_signal(&s->work);
}

int mcd_snapshots_submit(mcd_snapshots_t *s, void (*task)(void *arg), void *arg)
{
    snap_job_t *job = calloc(1, sizeof(*job));
    if (!job || ensure_workers(s) != 0) {
        free(job);
        return MC_ENOMEM;
    }
    job->task = task;
    job->task_arg = arg;
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        free(job);
        return MC_ECLOSED;
    }
    enqueue_pending(s, job);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

mongoc_client_pool_t *mcd_snapshots_pool(mcd_snapshots_t *s)
{
    return s->pool;
}

void mcd_snapshots_join(mcd_snapshots_t *s)
{
    if (!s) {
        return;
    }
    stop_all(s);
    for (uint32_t i = 0; i < s->n_threads; i++) {
        pthread_join(s->threads[i], NULL);
    }
    s->n_threads = 0;
}

/* The connection of a running snapshot closed: the job is cancelled and keeps the
 * subscription until its worker is done with it. */
static void conn_gone(mcd_conn_t *c)
{
    snap_job_t *job = c->snap;
    if (!job) {
        return;
    }
    c->snap = NULL;
    job->conn = NULL;
    job->sub_owned = true;
    c->sub = NULL;
    pthread_mutex_lock(&job->s->mu);
    job->cancelled = true;
    pthread_cond_broadcast(&job->s->room);
    pthread_mutex_unlock(&job->s->mu);
}

int mcd_snapshot_start(mcd_snapshots_t *s, mcd_hub_t *hub, mcd_conn_t *conn, bson_t *query)
{
    snap_job_t *job = calloc(1, sizeof(*job));
    if (!job || ensure_workers(s) != 0) {
        free(job);
        bson_destroy(query);
        mcd_conn_abort(conn);
        return MC_ENOMEM;
    }
    const mc_stream_config_t *cfg = hub->cfg;
    job->s = s;
    job->cfg = cfg;
    job->sub = conn->sub;
    job->conn = conn;
    job->hub = hub;
    job->transport = conn->transport;
    job->matches_all = mcd_subscription_matches_all(conn->sub);
    bson_steal(&job->query, query);
    job->max_docs = cfg->max_snapshot_documents ? cfg->max_snapshot_documents
                                                : s->config->server.max_snapshot_documents;
    job->max_message = hub->fanout->max_message_bytes;
    job->budget_ns = hub->fanout->filter_budget_ns;
    mc__json_buf_t name;
    mc__json_buf_init(&name, 64, 0);
    mc__json_write_string(&name, cfg->name, strlen(cfg->name));
    job->stream_json = mc__json_buf_steal(&name, NULL);
    bson_t server, local;
    mc_error_t err = {0};
    if (mc_pipeline_split(cfg->pipeline, &server, &local, &err) == 0 && !bson_empty(&server)) {
        job->server_stages = mc_pipeline_new(&server, NULL, &err);
    }
    bson_destroy(&server);
    bson_destroy(&local);
    job->check_each = !job->matches_all || job->server_stages;
    job->set.name = cfg->name;
    job->set.on_close = conn_gone;
    if (!job->stream_json || mcd_conn_set_add(&job->set, conn) != 0) {
        job_free(job);
        mcd_conn_abort(conn);
        return MC_ENOMEM;
    }
    conn->snap = job;
    job->seq = hub->ring_pushed;
    job->epoch = hub->ring_epoch;
    job->next = s->jobs;
    if (s->jobs) {
        s->jobs->prev = job;
    }
    s->jobs = job;
    s->stats.started++;
    s->stats.active++;
    pthread_mutex_lock(&s->mu);
    enqueue_pending(s, job);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* Ends a subscriber whose snapshot failed: the error message (a filter budget closes like
 * live delivery's, with 4003 and no message over WebSocket), then the close. */
static void end_subscriber(mcd_conn_t *c, const char *stream, uint16_t close_code,
                           const char *code, const char *reason)
{
    if (close_code != MCD_WS_CLOSE_FILTER) {
        mcd_conn_send_error(c, stream, code, 0, reason);
    }
    /* Cut to what a close frame carries, on purpose (the precision says so to the compiler). */
    char why[MCD_WS_MAX_CONTROL - 1];
    snprintf(why, sizeof(why), "%.*s", (int)sizeof(why) - 1,
             close_code == MCD_WS_CLOSE_FILTER ? reason : code);
    mcd_conn_close(c, close_code ? close_code : MCD_WS_CLOSE_SNAPSHOT, why, false);
}

/* The worker is done and every batch went to the connection: join it to the stream, or end it. */
static void complete(mcd_snapshots_t *s, snap_job_t *job)
{
    mcd_conn_t *c = job->conn;
    if (job->state == JOB_DONE) {
        s->stats.completed++;
        s->stats.documents += job->count;
    } else {
        s->stats.failed++;
    }
    if (!c) {
        return;
    }
    /* Out of the job's set without the close hook: the connection goes on. */
    c->snap = NULL;
    job->conn = NULL;
    mcd_conn_set_remove(c);
    const char *stream = job->cfg->name;
    if (job->state != JOB_DONE) {
        end_subscriber(c, stream, job->close_code, job->err_code, job->err_reason);
        return;
    }
    int rc = mcd_hub_join_after_snapshot(job->hub, c, job->seq, job->epoch, job->at);
    if (rc == 1) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                           "snapshot subscriber ended: the stream's history overflowed while "
                           "the snapshot was read stream=%s history=%u",
                           stream, job->cfg->history);
        end_subscriber(c, stream, MCD_WS_CLOSE_SNAPSHOT, MCD_SNAPSHOT_OVERFLOW,
                       "the stream's history overflowed while the snapshot was read: subscribe "
                       "again (or raise the stream's history)");
    } else if (rc == 0) {
        mcd_conn_start_write(c);
    }
}

void mcd_snapshots_pump(mcd_snapshots_t *s)
{
    if (!s || !s->jobs) {
        return;
    }
    snap_job_t *next;
    for (snap_job_t *job = s->jobs; job; job = next) {
        next = job->next;
        bool freed_room = false;
        int state;
        pthread_mutex_lock(&s->mu);
        for (;;) {
            snap_out_t *o = job->out_head;
            mcd_conn_t *c = job->conn;
            if (!o || (c && mcd_conn_unsent(c) >= mcd_conn_table(c)->max_queue / 2)) {
                break;
            }
            job->out_head = o->next;
            if (!job->out_head) {
                job->out_tail = NULL;
            }
            job->out_bytes -= o->bytes;
            freed_room = true;
            pthread_mutex_unlock(&s->mu);
            if (c) {
                /* Exempt from the slow-consumer limit like a replay: the pump itself keeps
                 * what waits in the connection under half of it. */
                mcd_conn_send(c, o->msg, true);
            }
            mcd_msg_unref(o->msg);
            free(o);
            pthread_mutex_lock(&s->mu);
        }
        state = job->state;
        bool drained = !job->out_head;
        if (freed_room) {
            pthread_cond_broadcast(&s->room);
        }
        pthread_mutex_unlock(&s->mu);
        if (state == JOB_RUNNING || !drained) {
            continue;
        }
        complete(s, job);
        if (job->prev) {
            job->prev->next = job->next;
        } else {
            s->jobs = job->next;
        }
        if (job->next) {
            job->next->prev = job->prev;
        }
        s->stats.active--;
        job_free(job);
    }
}

/* No more work: every job is cancelled, the workers end once the queue is empty, and nothing
 * wakes the loop any more. */
static void stop_all(mcd_snapshots_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    for (snap_job_t *job = s->jobs; job; job = job->next) {
        job->cancelled = true;
    }
    s->async_open = false;
    pthread_cond_broadcast(&s->work);
    pthread_cond_broadcast(&s->room);
    pthread_mutex_unlock(&s->mu);
}

void mcd_snapshots_close(mcd_snapshots_t *s)
{
    if (!s) {
        return;
    }
    stop_all(s);
    uv_close((uv_handle_t *)&s->async, NULL);
}

void mcd_snapshots_destroy(mcd_snapshots_t *s)
{
    if (!s) {
        return;
    }
    mcd_snapshots_join(s);
    free(s->threads);
    while (s->jobs) {
        snap_job_t *job = s->jobs;
        s->jobs = job->next;
        if (job->conn) {
            job->conn->snap = NULL;
        }
        job_free(job);
    }
    mongoc_client_pool_destroy(s->pool);
    mongoc_uri_destroy(s->uri);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->room);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

void mcd_snapshots_stats(const mcd_snapshots_t *s, mcd_snapshot_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    if (s) {
        *out = s->stats;
    }
}
