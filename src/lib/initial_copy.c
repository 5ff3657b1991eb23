/*
 * initial_copy.c: a sink's `initial: snapshot` (docs/config.md, "Initial snapshot").
 *
 * When a (stream, sink) has no stored position, a copy thread (`mccopy:<stream>`, detached,
 * counted with the catch-up threads so that stop waits for it) reads the stream's collection
 * in `_id` order at one cluster time T (`find` with readConcern snapshot, batches of
 * `initial_batch_size` on one cursor; the server's reply says T) and pushes each document, as
 * the insert change it would be, into the sink's runner only, exactly like a catch-up thread
 * (the route stays detached meanwhile, so the stream and the other sinks go on). After the
 * last document it hands over to a catch-up thread opened with startAtOperationTime T + 1,
 * which rejoins the shared path as any catch-up does: no gap and no duplicate between the
 * copy and the changes.
 *
 * Progress is the sink's ordinary position: each copied event's id is a *copy position*
 * (below) that the runner's completion and the ledger store like any resume token, through
 * the same crash-safe writes. At start the ledger hands such a record to mc__copy_plan(),
 * which resumes the copy after the last copied `_id` (at the same read time R, or, when the
 * server can no longer read at R, at a new time, still streaming from T afterwards).
 *
 * Copy position (`_data`, uppercase hex, never sent to MongoDB):
 *   "82" TTTTTTTT IIIIIIII   T: where the changes continue (sorts like a token at T)
 *   "5E"                     marker (no resume token has this byte after its timestamp)
 *   NNNNNNNNNNNNNNNN         the document's number in the copy, from 1; all F: copy done
 *   tttttttt iiiiiiii        R: the cluster time it was read at (absent when done)
 *   hex of BSON {_id: ...}   the document's _id (absent when done)
 * so a copy's events are ordered by their number, all before the changes after T.
 *
 * Threads: mc__copy_plan() and mc__copy_start_planned() run on the stream's watcher thread
 * (ledger load); the copy itself on its own thread; mc__copy_token() anywhere.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"
#include "hex.h"
#include "mongocast/pipeline.h"
#include "recipient_rules.h"

#define COPY_MARKER "5E"
#define COPY_DONE_NUMBER UINT64_MAX
#define COPY_PUSH_WAIT_MS 200
#define COPY_HEAD_POLL_MS 50
#define PREFIX_LEN (2 + 16 + 2)  /* "82" T marker */

/* What a route's copy starts from (planned on the watcher thread, taken by the thread). */
typedef struct copy_job {
    mc__stream_t *s;
    mc__runner_t *r;
    mc_sink_t *sink;
    int slot;
    uint32_t start_t, start_i; /* T (0, 0: not chosen yet) */
    uint32_t read_t, read_i;   /* R (0, 0: read at the server's current time) */
    uint64_t number;           /* documents copied before this run */
    bson_t *after;             /* {_id: last copied} or NULL */
    bool done;                 /* every document copied: only the changes after T are left */
    struct copy_job *next;
} copy_job_t;

/* Planned copies per stream, between plan and start (watcher thread only). */
static _Thread_local copy_job_t *planned;

/* ---- Copy positions --------------------------------------------------------------------- */

static bool parse_hex_u32(const char *p, uint32_t *out)
{
    uint32_t v = 0;
    for (int k = 0; k < 8; k++) {
        int d = mc__hex_value(p[k]);
        if (d < 0) {
            return false;
        }
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return true;
}

bool mc__copy_token(const char *data)
{
    return data && strlen(data) >= PREFIX_LEN + 16 && data[0] == '8' && data[1] == '2' &&
           memcmp(data + 18, COPY_MARKER, 2) == 0;
}

static int bad_position(mc_error_t *err, const char *why)
{
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "copy position: %s",
                        why);
}

int mc__copy_position_parse(const char *data, mc__copy_position_t *out, mc_error_t *err)
{
    memset(out, 0, sizeof(*out));
    uint32_t hi, lo;
    if (!mc__copy_token(data)) {
        return bad_position(err, "not a copy position");
    }
    if (!parse_hex_u32(data + 2, &out->start_t) || !parse_hex_u32(data + 10, &out->start_i) ||
        !parse_hex_u32(data + 20, &hi) || !parse_hex_u32(data + 28, &lo)) {
        return bad_position(err, "bad hex digits");
    }
    out->number = (uint64_t)hi << 32 | lo;
    const char *p = data + PREFIX_LEN + 16;
    size_t len = strlen(p);
    if (out->number == COPY_DONE_NUMBER) {
        out->done = true;
        return len == 0 ? 0 : bad_position(err, "bytes after the end of a copy");
    }
    if (out->number == 0) {
        return bad_position(err, "document number 0");
    }
    if (len < 16 + 2 * 5 || len % 2 != 0 || (len - 16) / 2 > MC__COPY_MAX_ID_BYTES) {
        return bad_position(err, "bad length");
    }
    if (!parse_hex_u32(p, &out->read_t) || !parse_hex_u32(p + 8, &out->read_i)) {
        return bad_position(err, "bad read time");
    }
    p += 16;
    len = (len - 16) / 2;
    uint8_t *bytes = malloc(len);
    if (!bytes) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    for (size_t k = 0; k < len; k++) {
        int a = mc__hex_value(p[2 * k]), b = mc__hex_value(p[2 * k + 1]);
        if (a < 0 || b < 0) {
            free(bytes);
            return bad_position(err, "bad hex digits");
        }
        bytes[k] = (uint8_t)(a << 4 | b);
    }
    bson_t doc;
    bson_iter_t it;
    bool ok = bson_init_static(&doc, bytes, len) && bson_validate(&doc, BSON_VALIDATE_NONE, NULL) &&
              bson_iter_init(&it, &doc) && bson_iter_next(&it) && !strcmp(bson_iter_key(&it), "_id") &&
              !bson_iter_next(&it);
    if (ok) {
        out->id_doc = bson_copy(&doc);
    }
    free(bytes);
    if (!ok) {
        return bad_position(err, "the _id is not one BSON document {_id: ...}");
    }
    return out->id_doc ? 0 : mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                                          "out of memory");
}

char *mc__copy_position_format(const mc__copy_position_t *p)
{
    const bson_t *idoc = p->done ? NULL : p->id_doc;
    size_t n = idoc ? idoc->len : 0;
    if (n > MC__COPY_MAX_ID_BYTES || (!p->done && !idoc)) {
        return NULL;
    }
    char *out = bson_malloc(PREFIX_LEN + 16 + 16 + 2 * n + 1);
    int w = sprintf(out, "82%08X%08X" COPY_MARKER "%016" PRIX64, p->start_t, p->start_i,
                    idoc ? p->number : COPY_DONE_NUMBER);
    if (idoc) {
        w += sprintf(out + w, "%08X%08X", p->read_t, p->read_i);
        const uint8_t *b = bson_get_data(idoc);
        static const char digits[] = "0123456789ABCDEF";
        for (size_t k = 0; k < n; k++) {
            out[w++] = digits[b[k] >> 4];
            out[w++] = digits[b[k] & 15];
        }
        out[w] = '\0';
    }
    return out;
}

void mc__copy_position_clear(mc__copy_position_t *p)
{
    bson_destroy(p->id_doc);
    memset(p, 0, sizeof(*p));
}

/* The first cluster time after T. */
static void after_time(uint32_t t, uint32_t i, uint32_t *nt, uint32_t *ni)
{
    *nt = i == UINT32_MAX ? t + 1 : t;
    *ni = i == UINT32_MAX ? 0 : i + 1;
}

bool mc__copy_changes_start(const char *data, uint32_t *t, uint32_t *i)
{
    mc__copy_position_t p = {0};
    mc_error_t err = {0};
    bool done = mc__copy_token(data) && mc__copy_position_parse(data, &p, &err) == 0 && p.done;
    if (done) {
        after_time(p.start_t, p.start_i, t, i);
    }
    mc__copy_position_clear(&p);
    return done;
}

/* Fills the job from a stored copy position. */
static int job_from_position(copy_job_t *job, const char *data, mc_error_t *err)
{
    mc__copy_position_t p;
    int rc = mc__copy_position_parse(data, &p, err);
    if (rc == 0) {
        job->start_t = p.start_t;
        job->start_i = p.start_i;
        job->read_t = p.read_t;
        job->read_i = p.read_i;
        job->done = p.done;
        job->number = p.done ? 0 : p.number;
        job->after = p.id_doc;
        p.id_doc = NULL;
    }
    mc__copy_position_clear(&p);
    return rc;
}

/* The copy position of document `number` with `_id` doc `idoc` ({_id: ...}; NULL: done). */
static char *copy_token_make(const copy_job_t *job, uint64_t number, const bson_t *idoc)
{
    mc__copy_position_t p = {.start_t = job->start_t,
                             .start_i = job->start_i,
                             .number = number,
                             .done = !idoc,
                             .read_t = job->read_t,
                             .read_i = job->read_i,
                             .id_doc = (bson_t *)idoc};
    return mc__copy_position_format(&p);
}

/* ---- Planning (watcher thread, ledger load) -------------------------------------------- */

bool mc__copy_plan(mc__stream_t *s, size_t k, const mc__position_t *own)
{
    mc__route_t *rt = &s->routes[k];
    mc_sink_t *sink = s->sinks[k];
    if (mc__runner_live(rt->runner)) {
        return false;
    }
    const char *data = own ? mc__token_data(own->token) : NULL;
    bool resume = mc__copy_token(data);
    bool fresh = !own && sink->cfg && sink->cfg->initial == MC_SINK_INITIAL_SNAPSHOT;
    if (!resume && !fresh) {
        if (own && sink->cfg && sink->cfg->initial == MC_SINK_INITIAL_SNAPSHOT) {
            /* Copied in an earlier run and streaming since: nothing left to copy. */
            atomic_store(&sink->copy_seen, true);
        }
        return false;
    }
    copy_job_t *job = calloc(1, sizeof(*job));
    if (!job) {
        mc__runner_fail_all(rt->runner, "initial snapshot of stream %s: out of memory",
                            s->cfg->name);
        rt->attached = false;
        rt->copy = true;
        return true;
    }
    job->s = s;
    job->r = rt->runner;
    job->sink = sink;
    job->slot = rt->slot;
    mc_error_t perr = {0};
    if (resume && job_from_position(job, data, &perr) != 0) {
        bson_destroy(job->after);
        free(job);
        mc__runner_fail_all(rt->runner,
                            "initial snapshot of stream %s: the stored position cannot be used "
                            "(%s); delete the sink's checkpoint to copy again",
                            s->cfg->name, perr.message);
        rt->attached = false;
        rt->copy = true;
        return true;
    }
    if (resume) {
        mc__runner_set_done(rt->runner, rt->slot, mc__mark_from_position(s->index, own), false);
    }
    rt->attached = false;
    rt->copy = true;
    mc__runner_begin_copy(rt->runner, rt->slot);
    atomic_store(&sink->copy_seen, true);
    if (!job->done) {
        atomic_fetch_add(&sink->copies_pending, 1);
    }
    job->next = planned;
    planned = job;
    return true;
}

/* ---- The copy thread ------------------------------------------------------------------- */

static bool stopping(const copy_job_t *job)
{
    return atomic_load(&job->s->engine->stopping);
}

static void job_free(copy_job_t *job)
{
    bson_destroy(job->after);
    free(job);
}

/* Pushes into the runner only (as a catch-up does), waiting for room. False: stop (the
 * runner failed or the engine stops). */
static bool push_item(copy_job_t *job, mc__pref_t *item)
{
    int rc;
    do {
        rc = mc__runner_push_wait(job->r, job->slot, item, COPY_PUSH_WAIT_MS, true);
    } while (rc == MC_EAGAIN && !stopping(job));
    mc__pref_clear(item);
    return rc == 0;
}

/* The insert change of one document, through the stream's server stages. 1: `out` holds
 * the event's change; 0: a stage drops it; negative: err. */
static int build_change(copy_job_t *job, const mc_pipeline_t *stages, const bson_t *doc,
                        const bson_iter_t *id, const char *token, bson_t *out, mc_error_t *err)
{
    const mc_stream_config_t *cfg = job->s->cfg;
    bson_t change = BSON_INITIALIZER, child;
    BSON_APPEND_DOCUMENT_BEGIN(&change, "_id", &child);
    BSON_APPEND_UTF8(&child, "_data", token);
    bson_append_document_end(&change, &child);
    BSON_APPEND_UTF8(&change, "operationType", "insert");
    BSON_APPEND_TIMESTAMP(&change, "clusterTime", job->read_t, job->read_i);
    BSON_APPEND_DOCUMENT(&change, "fullDocument", doc);
    BSON_APPEND_DOCUMENT_BEGIN(&change, "ns", &child);
    BSON_APPEND_UTF8(&child, "db", cfg->db);
    BSON_APPEND_UTF8(&child, "coll", cfg->collection);
    bson_append_document_end(&change, &child);
    BSON_APPEND_DOCUMENT_BEGIN(&change, "documentKey", &child);
    BSON_APPEND_VALUE(&child, "_id", bson_iter_value((bson_iter_t *)id));
    bson_append_document_end(&change, &child);
    int rc = 1;
    bson_t staged = BSON_INITIALIZER;
    if (stages) {
        bson_destroy(&staged);
        rc = mc_pipeline_apply(stages, &change, &staged, err);
    } else {
        bson_concat(&staged, &change);
    }
    bson_destroy(&change);
    if (rc == 1) {
        /* The marker goes last, after the stream's stages (a $project cannot remove it). */
        bson_copy_to_excluding_noinit(&staged, out, "snapshot", NULL);
        BSON_APPEND_BOOL(out, "snapshot", true);
    }
    bson_destroy(&staged);
    return rc;
}

typedef enum copy_result {
    COPY_DONE = 0,   /* every document read */
    COPY_STOP,       /* stopping, or the runner failed */
    COPY_RETRY,      /* transient: read again after the last copied _id */
    COPY_TOO_OLD,    /* R is no longer readable: read again at a new time */
    COPY_FATAL,      /* err says why */
} copy_result_t;

/* One document of a batch. */
static copy_result_t take_document(copy_job_t *job, mc__recipients_t *rcpt,
                                   const mc_pipeline_t *stages, const bson_t *doc,
                                   mc_error_t *err)
{
    bson_iter_t id;
    if (!bson_iter_init_find(&id, doc, "_id")) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "a document has no _id");
        return COPY_FATAL;
    }
    bson_t idoc = BSON_INITIALIZER;
    BSON_APPEND_VALUE(&idoc, "_id", bson_iter_value(&id));
    if (idoc.len > MC__COPY_MAX_ID_BYTES) {
        bson_destroy(&idoc);
        mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                     "a document's _id is larger than %d bytes as BSON", MC__COPY_MAX_ID_BYTES);
        return COPY_FATAL;
    }
    uint64_t number = job->number + 1;
    char *token = copy_token_make(job, number, &idoc);
    if (!token) {
        bson_destroy(&idoc);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return COPY_FATAL;
    }
    bson_t change = BSON_INITIALIZER;
    int rc = build_change(job, stages, doc, &id, token, &change, err);
    bson_free(token);
    copy_result_t res = COPY_DONE;
    if (rc < 0) {
        res = COPY_FATAL;
    } else if (rc == 1) {
        mc_event_t *ev = mc_event_new_change(job->s->cfg->name, 0, &change,
                                             mc__recipients_event_path(rcpt), err);
        if (!ev) {
            res = COPY_FATAL;
        } else {
            mc__event_set_stream_index(ev, job->s->index);
            mc__recipients_route(rcpt, ev, &job->s->engine->stopping);
            mc__pref_t item = {.ev = ev};
            if (!push_item(job, &item)) {
                res = COPY_STOP;
            } else {
                atomic_fetch_add(&job->sink->stat_copy_docs, 1);
            }
        }
    }
    bson_destroy(&change);
    if (res == COPY_DONE) {
        /* Dropped by a stage or queued: either way the copy is past this _id. */
        job->number = number;
        bson_destroy(job->after);
        job->after = bson_copy(&idoc);
    }
    bson_destroy(&idoc);
    return res;
}

/* The read's first command: documents after job->after, in _id order, at R (or now). As an
 * aggregate when the find's reply did not say its time (MongoDB leaves atClusterTime out of
 * an empty find's reply, SERVER-83472). */
static void first_command(const copy_job_t *job, bool aggregate, bson_t *cmd)
{
    const mc_stream_config_t *cfg = job->s->cfg;
    uint32_t batch = job->sink->cfg ? job->sink->cfg->initial_batch_size : 1000;
    bson_t filter = BSON_INITIALIZER, child, arr;
    if (job->after) {
        bson_iter_t it;
        bson_iter_init_find(&it, job->after, "_id");
        BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &child);
        BSON_APPEND_VALUE(&child, "$gt", bson_iter_value(&it));
        bson_append_document_end(&filter, &child);
    }
    bson_reinit(cmd);
    if (aggregate) {
        BSON_APPEND_UTF8(cmd, "aggregate", cfg->collection);
        BSON_APPEND_ARRAY_BEGIN(cmd, "pipeline", &arr);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, "0", &child);
        BSON_APPEND_DOCUMENT(&child, "$match", &filter);
        bson_append_document_end(&arr, &child);
        BSON_APPEND_DOCUMENT_BEGIN(&arr, "1", &child);
        BCON_APPEND(&child, "$sort", "{", "_id", BCON_INT32(1), "}");
        bson_append_document_end(&arr, &child);
        bson_append_array_end(cmd, &arr);
        BSON_APPEND_DOCUMENT_BEGIN(cmd, "cursor", &child);
        BSON_APPEND_INT32(&child, "batchSize", (int32_t)batch);
        bson_append_document_end(cmd, &child);
    } else {
        BSON_APPEND_UTF8(cmd, "find", cfg->collection);
        BSON_APPEND_DOCUMENT(cmd, "filter", &filter);
        BCON_APPEND(cmd, "sort", "{", "_id", BCON_INT32(1), "}");
        BSON_APPEND_INT32(cmd, "batchSize", (int32_t)batch);
    }
    BSON_APPEND_DOCUMENT_BEGIN(cmd, "readConcern", &child);
    BSON_APPEND_UTF8(&child, "level", "snapshot");
    if (job->read_t || job->read_i) {
        BSON_APPEND_TIMESTAMP(&child, "atClusterTime", job->read_t, job->read_i);
    }
    bson_append_document_end(cmd, &child);
    bson_destroy(&filter);
}

/* Reads cursor.<which> of a reply: the cursor id, the read time when the job has none yet,
 * and every document. */
static copy_result_t take_batch(copy_job_t *job, mc__recipients_t *rcpt,
                                const mc_pipeline_t *stages, const bson_t *reply,
                                const char *which, int64_t *cursor, bool *timeless,
                                mc_error_t *err)
{
    mc__cursor_reply_t r;
    bool parsed = mc__cursor_reply_parse(reply, which, &r);
    *cursor = r.id;
    if (!parsed) {
        mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, MC_ESERVER,
                     "the server's answer has no cursor");
        return COPY_RETRY;
    }
    if (r.have_time && !job->read_t && !job->read_i) {
        job->read_t = r.at_t;
        job->read_i = r.at_i;
    }
    if (!job->read_t && !job->read_i) {
        *timeless = !r.have_time;
        return COPY_RETRY; /* the caller asks again as an aggregate */
    }
    if (!job->start_t && !job->start_i) {
        job->start_t = job->read_t; /* T: the copy's first read time */
        job->start_i = job->read_i;
    }
    bson_iter_t docs = r.docs;
    while (r.have_docs && bson_iter_next(&docs)) {
        const uint8_t *data;
        uint32_t len;
        bson_t doc;
        if (!BSON_ITER_HOLDS_DOCUMENT(&docs)) {
            continue;
        }
        bson_iter_document(&docs, &len, &data);
        if (!bson_init_static(&doc, data, len)) {
            continue;
        }
        copy_result_t res = take_document(job, rcpt, stages, &doc, err);
        if (res != COPY_DONE) {
            return res;
        }
    }
    return COPY_DONE;
}

bool mc__cursor_reply_parse(const bson_t *reply, const char *which, mc__cursor_reply_t *out)
{
    memset(out, 0, sizeof(*out));
    bson_iter_t it, cur;
    if (!bson_iter_init_find(&it, reply, "cursor") || !BSON_ITER_HOLDS_DOCUMENT(&it) ||
        !bson_iter_recurse(&it, &cur)) {
        return false;
    }
    while (bson_iter_next(&cur)) {
        const char *k = bson_iter_key(&cur);
        if (!strcmp(k, "id")) {
            out->id = bson_iter_as_int64(&cur);
        } else if (!strcmp(k, which) && BSON_ITER_HOLDS_ARRAY(&cur)) {
            out->have_docs = bson_iter_recurse(&cur, &out->docs);
        } else if (!strcmp(k, "atClusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&cur)) {
            if (!out->have_time) {
                bson_iter_timestamp(&cur, &out->at_t, &out->at_i);
            }
            out->have_time = true;
        }
    }
    return true;
}

void mc__kill_cursor(mongoc_client_t *client, const mc_stream_config_t *cfg, const bson_t *opts,
                     int64_t cursor)
{
    if (cursor == 0) {
        return;
    }
    bson_t cmd = BSON_INITIALIZER, arr, reply;
    BSON_APPEND_UTF8(&cmd, "killCursors", cfg->collection);
    BSON_APPEND_ARRAY_BEGIN(&cmd, "cursors", &arr);
    BSON_APPEND_INT64(&arr, "0", cursor);
    bson_append_array_end(&cmd, &arr);
    mongoc_client_read_command_with_opts(client, cfg->db, &cmd, NULL, opts, &reply, NULL);
    bson_destroy(&reply);
    bson_destroy(&cmd);
}

/* Errors that reading again cannot fix (bad query, permissions): the sink fails. */
static bool fatal_code(uint32_t code)
{
    return code == 2 || code == 9 || code == 13 || code == 72 || code == 166 || code == 8000;
}

/* One cursor from job->after to the end (or the first error). */
static copy_result_t read_once(copy_job_t *job, mc__recipients_t *rcpt,
                               const mc_pipeline_t *stages, mc_error_t *err)
{
    mc_engine_t *e = job->s->engine;
    const mc_stream_config_t *cfg = job->s->cfg;
    mongoc_client_t *client = mongoc_client_pool_pop(e->pool);
    bson_error_t berr;
    mongoc_client_session_t *session = mongoc_client_start_session(client, NULL, &berr);
    bson_t opts = BSON_INITIALIZER, cmd = BSON_INITIALIZER, reply;
    int64_t cursor = 0;
    copy_result_t res = COPY_RETRY;
    if (!session || !mongoc_client_session_append(session, &opts, &berr)) {
        mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                     "cannot start a session: %s", berr.message);
        goto out;
    }
    bool aggregate = false;
    const char *which = "firstBatch";
    first_command(job, aggregate, &cmd);
    bool ok = mongoc_client_read_command_with_opts(client, cfg->db, &cmd, NULL, &opts, &reply,
                                                   &berr);
    for (;;) {
        if (!ok) {
            bson_destroy(&reply);
            cursor = 0;
            mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code, "code %u: %s",
                         berr.code, berr.message);
            res = berr.code == 239 || berr.code == 246 ? COPY_TOO_OLD
                  : fatal_code(berr.code)              ? COPY_FATAL
                                                       : COPY_RETRY;
            break;
        }
        bool timeless = false;
        res = take_batch(job, rcpt, stages, &reply, which, &cursor, &timeless, err);
        bson_destroy(&reply);
        if (res == COPY_RETRY && timeless && !aggregate) {
            mc__kill_cursor(client, cfg, &opts, cursor);
            cursor = 0;
            aggregate = true;
            first_command(job, aggregate, &cmd);
            ok = mongoc_client_read_command_with_opts(client, cfg->db, &cmd, NULL, &opts, &reply,
                                                      &berr);
            continue;
        }
        if (res == COPY_RETRY && timeless) {
            mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                         "the server did not say the snapshot's cluster time (MongoDB 5.0 or "
                         "later is needed)");
            res = COPY_FATAL;
        }
        if (res != COPY_DONE || cursor == 0) {
            break;
        }
        if (stopping(job)) {
            res = COPY_STOP;
            break;
        }
        bson_reinit(&cmd);
        BSON_APPEND_INT64(&cmd, "getMore", cursor);
        BSON_APPEND_UTF8(&cmd, "collection", cfg->collection);
        BSON_APPEND_INT32(&cmd, "batchSize",
                          (int32_t)(job->sink->cfg ? job->sink->cfg->initial_batch_size : 1000));
        ok = mongoc_client_read_command_with_opts(client, cfg->db, &cmd, NULL, &opts, &reply,
                                                  &berr);
        which = "nextBatch";
    }
    mc__kill_cursor(client, cfg, &opts, cursor);
out:
    bson_destroy(&cmd);
    bson_destroy(&opts);
    if (session) {
        mongoc_client_session_destroy(session);
    }
    mongoc_client_pool_push(e->pool, client);
    return res;
}

/* Waits until the stream's watcher has routed its first item, so that the catch-up after
 * the copy rejoins against a real head (an empty head would let it rejoin before the
 * watcher's own start position, which may be later than T). False when stopping. */
static bool wait_for_head(copy_job_t *job)
{
    mc__stream_t *s = job->s;
    for (;;) {
        pthread_mutex_lock(&s->route_lock);
        bool have = s->head && s->head[0];
        pthread_mutex_unlock(&s->route_lock);
        if (have) {
            return true;
        }
        if (mc__engine_sleep(s->engine, COPY_HEAD_POLL_MS)) {
            return false;
        }
    }
}

/* Runs the copy (when any is left), then hands over to the catch-up from T + 1. */
static void run_copy(copy_job_t *job)
{
    mc__stream_t *s = job->s;
    mc_engine_t *e = s->engine;
    const char *name = s->cfg->name;
    const char *sink = job->sink->name;
    mc_error_t err = {0};
    mc__recipients_t *rcpt = NULL;
    mc_pipeline_t *stages = NULL;
    bool was_done = job->done;
    if (!job->done) {
        rcpt = mc__recipients_new(s->cfg, name, e->pool, &err);
        if (rcpt && !bson_empty(&s->server_pipeline)) {
            stages = mc_pipeline_new(&s->server_pipeline, NULL, &err);
        }
        if (!rcpt || (!bson_empty(&s->server_pipeline) && !stages)) {
            mc__runner_fail_all(job->r,
                                "initial snapshot of stream %s cannot run the stream's "
                                "pipeline on documents: %s",
                                name, err.message);
            goto out;
        }
        if (job->after) {
            mc_log(MC_LOG_NOTICE, "copy",
                   "resuming initial snapshot sink=%s stream=%s after %" PRIu64
                   " documents (read at %u.%u, changes from %u.%u)",
                   sink, name, job->number, job->read_t, job->read_i, job->start_t,
                   job->start_i);
        } else {
            mc_log(MC_LOG_NOTICE, "copy", "initial snapshot starts sink=%s stream=%s", sink,
                   name);
        }
    }
    mc__backoff_t backoff;
    mc__backoff_init(&backoff, e->opts.backoff_initial_ms, e->opts.backoff_max_ms,
                     (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)job);
    mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(10000);
    while (!job->done && !stopping(job)) {
        memset(&err, 0, sizeof(err));
        copy_result_t res = read_once(job, rcpt, stages, &err);
        if (res == COPY_DONE) {
            job->done = true;
            break;
        }
        if (res == COPY_STOP) {
            goto out;
        }
        if (res == COPY_FATAL) {
            mc__runner_fail_all(job->r, "initial snapshot of stream %s failed: %s", name,
                                err.message);
            goto out;
        }
        if (res == COPY_TOO_OLD) {
            /* R left the server's snapshot history: read the rest at a new time. The changes
             * still start after T, so nothing is lost; documents changed between T and the
             * new time come in their newer state and their changes since T follow. */
            mc_log(MC_LOG_WARN, "copy",
                   "initial snapshot sink=%s stream=%s: cannot read at %u.%u any more (%s); "
                   "copying the rest at a newer time, changes still from %u.%u",
                   sink, name, job->read_t, job->read_i, err.message, job->start_t,
                   job->start_i);
            job->read_t = job->read_i = 0;
            continue;
        }
        uint32_t delay = mc__backoff_next(&backoff);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "copy",
                           "initial snapshot read error sink=%s stream=%s retry_in_ms=%u: %s",
                           sink, name, delay, err.message);
        if (mc__engine_sleep(e, delay)) {
            goto out;
        }
    }
    if (!job->done) {
        goto out;
    }
    if (!was_done) {
        /* The position that says "copied": a restart goes straight to the changes. */
        char *data = copy_token_make(job, 0, NULL);
        if (!data) {
            goto out;
        }
        bson_t token = BSON_INITIALIZER;
        BSON_APPEND_UTF8(&token, "_data", data);
        bson_free(data);
        mc__mark_t *m = mc__mark_new(s->index, &token, false, 0);
        bson_destroy(&token);
        mc__pref_t item = {.mark = m};
        if (!m || !push_item(job, &item)) {
            goto out;
        }
        atomic_fetch_sub(&job->sink->copies_pending, 1);
        mc_log(MC_LOG_NOTICE, "copy",
               "initial snapshot copied sink=%s stream=%s documents=%" PRIu64
               "; changes follow from %u.%u",
               sink, name, job->number, job->start_t, job->start_i);
    }
    if (!wait_for_head(job)) {
        goto out;
    }
    /* The changes after T: the snapshot holds every write up to T (T included). */
    uint32_t t, i;
    after_time(job->start_t, job->start_i, &t, &i);
    if (mc__catchup_spawn_at(s, job->r, job->slot, t, i) != 0) {
        mc__runner_fail_all(job->r, "cannot start the catch-up after the initial snapshot");
    }
out:
    mc_pipeline_destroy(stages);
    mc__recipients_destroy(rcpt);
}

static void *copy_main(void *arg)
{
    copy_job_t *job = arg;
    mc__thread_name("mccopy:", job->s->cfg->name);
    mc_engine_t *e = job->s->engine;
    run_copy(job);
    job_free(job);
    pthread_mutex_lock(&e->catchup_lock);
    e->catchups--;
    pthread_cond_broadcast(&e->catchup_cond);
    pthread_mutex_unlock(&e->catchup_lock);
    return NULL;
}

void mc__copy_start_planned(mc__stream_t *s)
{
    while (planned) {
        copy_job_t *job = planned;
        planned = job->next;
        mc_engine_t *e = s->engine;
        pthread_mutex_lock(&e->catchup_lock);
        e->catchups++;
        pthread_mutex_unlock(&e->catchup_lock);
        int rc = mc__thread_start_detached(copy_main, job);
        if (rc != 0) {
            mc__runner_fail_all(job->r, "cannot start the initial snapshot thread");
            job_free(job);
            pthread_mutex_lock(&e->catchup_lock);
            e->catchups--;
            pthread_cond_broadcast(&e->catchup_cond);
            pthread_mutex_unlock(&e->catchup_lock);
        }
    }
}
