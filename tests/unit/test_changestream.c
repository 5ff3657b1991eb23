/*
 * test_changestream.c: unit tests for mongo-emulator's oplog and change-stream cursors
 * (changestream.c), driven directly through the changestream.h contract.
 *
 * The collaborators changestream.c calls (cluster clock, cursor ids, error replies, catalog
 * lookups, the after-checkout fail point and the per-document pipeline) are replaced here by
 * small fakes with the same signatures, so these tests exercise the change-stream logic alone:
 * start points, resume tokens, visibility, invalidation, images, PBRTs, history loss, waits.
 * Because the fakes define every symbol changestream.o needs from other modules, the linker
 * never pulls commands.o, catalog.o, agg.o or failpoint.o out of libmongoemu; if
 * changestream.c starts calling another core function, this test fails to link (loudly) until
 * a fake for it is added here.
 * Single-threaded except the awaitData test, which appends from a second thread.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "agg.h"
#include "changestream.h"
#include "cstoken.h"

/* ---- fakes for the collaborators ---- */

void emu_clock_tick(emu_server_t *srv, uint32_t *t, uint32_t *i)
{
    srv->clock_inc++;
    *t = srv->clock_secs;
    *i = srv->clock_inc;
}

void emu_deadline_after_ms(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int64_t emu_new_cursor_id(emu_server_t *srv)
{
    return ++srv->next_cursor_id * 1000;
}

void emu_reply_error(bson_t *reply, int code, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    bson_reinit(reply);
    BSON_APPEND_DOUBLE(reply, "ok", 0.0);
    BSON_APPEND_UTF8(reply, "errmsg", msg);
    BSON_APPEND_INT32(reply, "code", code);
}

void emu_reply_error_from(bson_t *reply, const mc_error_t *err)
{
    emu_reply_error(reply, err->domain == MC_DOMAIN_MONGODB ? err->cause : 2, "%s", err->message);
}

void emu_reply_add_labels(bson_t *reply, const char *const *labels, size_t n)
{
    bson_t arr;
    BSON_APPEND_ARRAY_BEGIN(reply, "errorLabels", &arr);
    for (size_t i = 0; i < n; i++) {
        BSON_APPEND_UTF8(&arr, "0", labels[i]);
    }
    bson_append_array_end(reply, &arr);
}

/* The catalog: at most one live document, in db.coll with fake_uuid. */
static bson_t *fake_doc;
static const uint8_t fake_uuid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

const bson_t *emu_catalog_find_by_id(emu_server_t *srv, const char *db, const char *coll,
                                     const bson_value_t *id)
{
    (void)srv;
    bson_iter_t it;
    if (fake_doc && strcmp(db, "db") == 0 && strcmp(coll, "coll") == 0 &&
        bson_iter_init_find(&it, fake_doc, "_id") && id->value_type == BSON_TYPE_INT32 &&
        bson_iter_int32(&it) == id->value.v_int32) {
        return fake_doc;
    }
    return NULL;
}

bool emu_catalog_collection_exists(emu_server_t *srv, const char *db, const char *coll,
                                   uint8_t uuid[16])
{
    (void)srv;
    if (strcmp(db, "db") == 0 && strcmp(coll, "coll") == 0) {
        if (uuid) {
            memcpy(uuid, fake_uuid, 16);
        }
        return true;
    }
    return false;
}

static emu_fp_action_t fake_fp_action;

emu_fp_action_t emu_failpoint_after_checkout(emu_conn_t *conn, bson_t *reply)
{
    (void)conn;
    if (fake_fp_action == EMU_FP_ERROR) {
        emu_reply_error(reply, 91,
                        "Failing command via 'failGetMoreAfterCursorCheckout' failpoint");
    }
    return fake_fp_action;
}

/* The pipeline: {$match: {operationType: "x"}} keeps only that type; {$project: {_id: 0}}
 * removes _id; {$addFields: {_id: 1}} replaces it. Enough to drive changestream.c. */
struct emu_pipeline {
    char match_op[32];
    bool drop_id;
    bool replace_id;
};

emu_pipeline_t *emu_pipeline_new(const bson_t *stages, bool per_document_only, mc_error_t *err)
{
    assert_true(per_document_only);
    emu_pipeline_t *p = calloc(1, sizeof *p);
    bson_iter_t it, st, arg;
    bson_iter_init(&it, stages);
    while (bson_iter_next(&it)) {
        bson_iter_recurse(&it, &st);
        bson_iter_next(&st);
        const char *name = bson_iter_key(&st);
        if (strcmp(name, "$match") == 0) {
            bson_iter_recurse(&st, &arg);
            bson_iter_find(&arg, "operationType");
            snprintf(p->match_op, sizeof p->match_op, "%s", bson_iter_utf8(&arg, NULL));
        } else if (strcmp(name, "$project") == 0) {
            p->drop_id = true;
        } else if (strcmp(name, "$addFields") == 0) {
            p->replace_id = true;
        } else {
            free(p);
            mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 40324,
                         "Unrecognized pipeline stage name: '%s'", name);
            return NULL;
        }
    }
    return p;
}

void emu_pipeline_destroy(emu_pipeline_t *p)
{
    free(p);
}

int emu_pipeline_apply_one(const emu_pipeline_t *p, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    (void)err;
    bson_iter_t it;
    if (p->match_op[0]) {
        bson_iter_init_find(&it, doc, "operationType");
        if (strcmp(bson_iter_utf8(&it, NULL), p->match_op) != 0) {
            return 0;
        }
    }
    bson_init(out);
    bson_iter_init(&it, doc);
    while (bson_iter_next(&it)) {
        if (strcmp(bson_iter_key(&it), "_id") == 0 && (p->drop_id || p->replace_id)) {
            if (p->replace_id) {
                BSON_APPEND_INT32(out, "_id", 1);
            }
            continue;
        }
        bson_append_iter(out, NULL, 0, &it);
    }
    return 1;
}

/* ---- fixture ---- */

typedef struct fixture {
    emu_server_t srv;
    emu_conn_t conn;
} fixture_t;

static int setup_opts(void **state, size_t max_events, bool standalone)
{
    fixture_t *f = calloc(1, sizeof *f);
    f->srv.opts.oplog_max_events = max_events;
    f->srv.opts.standalone = standalone;
    f->srv.clock_secs = 1700000000;
    f->srv.clock_inc = 0;
    pthread_mutex_init(&f->srv.lock, NULL);
    pthread_cond_init(&f->srv.oplog_cond, NULL);
    mc_error_t err;
    assert_int_equal(emu_changestream_init(&f->srv, &err), 0);
    f->conn.srv = &f->srv;
    fake_fp_action = EMU_FP_NONE;
    *state = f;
    return 0;
}

static int setup(void **state)
{
    return setup_opts(state, 1000, false);
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    emu_changestream_cleanup(&f->srv);
    pthread_cond_destroy(&f->srv.oplog_cond);
    pthread_mutex_destroy(&f->srv.lock);
    if (fake_doc) {
        bson_destroy(fake_doc);
        fake_doc = NULL;
    }
    free(f);
    return 0;
}

/* ---- helpers ---- */

static void append_crud(fixture_t *f, emu_op_t op, const char *db, const char *coll, int id, int v,
                        bool images)
{
    bson_t *key = BCON_NEW("_id", BCON_INT32(id));
    bson_t *doc = BCON_NEW("_id", BCON_INT32(id), "v", BCON_INT32(v));
    bson_t *pre = BCON_NEW("_id", BCON_INT32(id), "v", BCON_INT32(v - 1));
    bson_t *ud = BCON_NEW("updatedFields", "{", "v", BCON_INT32(v), "}", "removedFields", "[", "]",
                          "truncatedArrays", "[", "]");
    emu_change_t ch = {
        .op = op,
        .db = db,
        .coll = coll,
        .coll_uuid = fake_uuid,
        .document_key = key,
        .full_document = op == EMU_OP_DELETE ? NULL : doc,
        .pre_image = op == EMU_OP_INSERT ? NULL : pre,
        .images_enabled = images,
        .update_description = op == EMU_OP_UPDATE ? ud : NULL,
    };
    emu_oplog_append(&f->srv, &ch);
    bson_destroy(key);
    bson_destroy(doc);
    bson_destroy(pre);
    bson_destroy(ud);
}

static void insert(fixture_t *f, const char *db, const char *coll, int id)
{
    append_crud(f, EMU_OP_INSERT, db, coll, id, 1, false);
}

static void append_ddl(fixture_t *f, emu_op_t op, const char *db, const char *coll,
                       const char *to_db, const char *to_coll)
{
    emu_change_t ch = {.op = op,
                       .db = db,
                       .coll = coll,
                       .to_db = to_db,
                       .to_coll = to_coll,
                       .coll_uuid = op == EMU_OP_DROP_DATABASE ? NULL : fake_uuid};
    emu_oplog_append(&f->srv, &ch);
}

/* Runs aggregate {aggregate: coll|1, pipeline: [{$changeStream: spec}, stages...],
 * cursor: {batchSize?}} on db; the reply is returned (caller destroys). */
static bson_t *aggregate(fixture_t *f, const char *db, const char *coll, const bson_t *spec,
                         const bson_t *stages, int batch_size)
{
    bson_t cmd = BSON_INITIALIZER, pipe, st, cur;
    if (coll) {
        BSON_APPEND_UTF8(&cmd, "aggregate", coll);
    } else {
        BSON_APPEND_INT32(&cmd, "aggregate", 1);
    }
    BSON_APPEND_ARRAY_BEGIN(&cmd, "pipeline", &pipe);
    BSON_APPEND_DOCUMENT_BEGIN(&pipe, "0", &st);
    if (spec) {
        BSON_APPEND_DOCUMENT(&st, "$changeStream", spec);
    } else {
        bson_t empty = BSON_INITIALIZER;
        BSON_APPEND_DOCUMENT(&st, "$changeStream", &empty);
    }
    bson_append_document_end(&pipe, &st);
    if (stages) {
        bson_iter_t it;
        bson_iter_init(&it, stages);
        int k = 1;
        while (bson_iter_next(&it)) {
            char key[16];
            snprintf(key, sizeof key, "%d", k++);
            bson_append_iter(&pipe, key, -1, &it);
        }
    }
    bson_append_array_end(&cmd, &pipe);
    BSON_APPEND_DOCUMENT_BEGIN(&cmd, "cursor", &cur);
    if (batch_size >= 0) {
        BSON_APPEND_INT32(&cur, "batchSize", batch_size);
    }
    bson_append_document_end(&cmd, &cur);
    BSON_APPEND_UTF8(&cmd, "$db", db);
    bson_t *reply = bson_new();
    pthread_mutex_lock(&f->srv.lock);
    emu_cs_aggregate(&f->conn, &cmd, db, reply);
    pthread_mutex_unlock(&f->srv.lock);
    bson_destroy(&cmd);
    return reply;
}

static bson_t *getmore(fixture_t *f, const char *db, const char *coll, int64_t id, int batch,
                       int max_time_ms)
{
    bson_t *cmd = BCON_NEW("getMore", BCON_INT64(id), "collection", BCON_UTF8(coll));
    if (batch > 0) {
        BSON_APPEND_INT64(cmd, "batchSize", batch);
    }
    if (max_time_ms >= 0) {
        BSON_APPEND_INT64(cmd, "maxTimeMS", max_time_ms);
    }
    bson_t *reply = bson_new();
    pthread_mutex_lock(&f->srv.lock);
    emu_cs_getmore(&f->conn, cmd, db, reply);
    pthread_mutex_unlock(&f->srv.lock);
    bson_destroy(cmd);
    return reply;
}

static int reply_code(const bson_t *reply)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, reply, "code")) {
        return 0;
    }
    return bson_iter_int32(&it);
}

static bool reply_has_label(const bson_t *reply, const char *label)
{
    bson_iter_t it, arr;
    if (!bson_iter_init_find(&it, reply, "errorLabels")) {
        return false;
    }
    bson_iter_recurse(&it, &arr);
    while (bson_iter_next(&arr)) {
        if (strcmp(bson_iter_utf8(&arr, NULL), label) == 0) {
            return true;
        }
    }
    return false;
}

static void expect_error(bson_t *reply, int code)
{
    int got = reply_code(reply);
    if (got != code) {
        char *json = bson_as_relaxed_extended_json(reply, NULL);
        fail_msg("expected code %d, got %s", code, json);
    }
    bson_destroy(reply);
}

typedef struct batch_view {
    int64_t id;
    char ns[128];
    bson_t batch; /* static view into the reply */
    int n;
    char pbrt[512];
} batch_view_t;

static void view(const bson_t *reply, batch_view_t *v)
{
    bson_iter_t it, cur;
    memset(v, 0, sizeof *v);
    if (!bson_iter_init_find(&it, reply, "cursor")) {
        char *json = bson_as_relaxed_extended_json(reply, NULL);
        fail_msg("no cursor in reply: %s", json);
    }
    bson_iter_recurse(&it, &cur);
    int field = 0;
    while (bson_iter_next(&cur)) {
        const char *k = bson_iter_key(&cur);
        if (strcmp(k, "firstBatch") == 0 || strcmp(k, "nextBatch") == 0) {
            assert_int_equal(field, 0);
            uint32_t len;
            const uint8_t *data;
            bson_iter_array(&cur, &len, &data);
            bson_init_static(&v->batch, data, len);
            v->n = (int)bson_count_keys(&v->batch);
        } else if (strcmp(k, "postBatchResumeToken") == 0) {
            assert_int_equal(field, 1);
            bson_iter_t t;
            bson_iter_recurse(&cur, &t);
            assert_true(bson_iter_find(&t, "_data"));
            snprintf(v->pbrt, sizeof v->pbrt, "%s", bson_iter_utf8(&t, NULL));
        } else if (strcmp(k, "id") == 0) {
            assert_int_equal(field, 2);
            assert_true(BSON_ITER_HOLDS_INT64(&cur));
            v->id = bson_iter_int64(&cur);
        } else if (strcmp(k, "ns") == 0) {
            assert_int_equal(field, 3);
            snprintf(v->ns, sizeof v->ns, "%s", bson_iter_utf8(&cur, NULL));
        }
        field++;
    }
    assert_int_equal(field, 4);
}

/* The i-th event of a batch (static view). */
static void event_at(const batch_view_t *v, int i, bson_t *ev)
{
    bson_iter_t it;
    char key[16];
    snprintf(key, sizeof key, "%d", i);
    assert_true(bson_iter_init_find(&it, &v->batch, key));
    uint32_t len;
    const uint8_t *data;
    bson_iter_document(&it, &len, &data);
    bson_init_static(ev, data, len);
}

static const char *str_field(const bson_t *doc, const char *path)
{
    bson_iter_t it, f;
    if (bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &f) &&
        BSON_ITER_HOLDS_UTF8(&f)) {
        return bson_iter_utf8(&f, NULL);
    }
    return NULL;
}

static bool has_field(const bson_t *doc, const char *path)
{
    bson_iter_t it, f;
    return bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &f);
}

static bool field_is_null(const bson_t *doc, const char *path)
{
    bson_iter_t it, f;
    return bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &f) &&
           BSON_ITER_HOLDS_NULL(&f);
}

static int int_field(const bson_t *doc, const char *path)
{
    bson_iter_t it, f;
    assert_true(bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &f));
    return bson_iter_int32(&f);
}

/* Keys of a document joined with ',' (checks field order). */
static void keys_of(const bson_t *doc, char *out, size_t cap)
{
    bson_iter_t it;
    out[0] = '\0';
    bson_iter_init(&it, doc);
    while (bson_iter_next(&it)) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, "%s%s", n ? "," : "", bson_iter_key(&it));
    }
}

static bson_t *token_spec(const char *option, const char *hex)
{
    return BCON_NEW(option, "{", "_data", BCON_UTF8(hex), "}");
}

static void event_token(const bson_t *ev, char *out, size_t cap)
{
    snprintf(out, cap, "%s", str_field(ev, "_id._data"));
}

/* ---- tests ---- */

static void test_open_empty(void **state)
{
    fixture_t *f = *state;
    insert(f, "db", "coll", 1); /* before the stream: not returned */
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    assert_int_equal(v.n, 0);
    assert_true(v.id != 0);
    assert_string_equal(v.ns, "db.coll");
    /* A high-water mark token after the existing entry. */
    assert_non_null(strstr(v.pbrt, "2B0229296E04"));
    bson_destroy(r);

    r = aggregate(f, "db", NULL, NULL, NULL, -1);
    view(r, &v);
    assert_string_equal(v.ns, "db.$cmd.aggregate");
    bson_destroy(r);
    bson_t *spec = BCON_NEW("allChangesForCluster", BCON_BOOL(true));
    r = aggregate(f, "admin", NULL, spec, NULL, -1);
    view(r, &v);
    assert_string_equal(v.ns, "admin.$cmd.aggregate");
    bson_destroy(r);
    bson_destroy(spec);
}

static void test_insert_event_shape(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);

    append_crud(f, EMU_OP_INSERT, "db", "coll", 7, 1, false);
    append_crud(f, EMU_OP_UPDATE, "db", "coll", 7, 2, false);
    append_crud(f, EMU_OP_REPLACE, "db", "coll", 7, 3, false);
    append_crud(f, EMU_OP_DELETE, "db", "coll", 7, 4, false);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 4);
    assert_int_equal(v.id, id);
    char keys[256];
    bson_t ev;
    event_at(&v, 0, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,fullDocument,ns,documentKey");
    assert_string_equal(str_field(&ev, "operationType"), "insert");
    assert_string_equal(str_field(&ev, "ns.db"), "db");
    assert_string_equal(str_field(&ev, "ns.coll"), "coll");
    assert_int_equal(int_field(&ev, "documentKey._id"), 7);
    assert_int_equal(int_field(&ev, "fullDocument.v"), 1);
    event_at(&v, 1, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys,
                        "_id,operationType,clusterTime,wallTime,ns,documentKey,updateDescription");
    assert_int_equal(int_field(&ev, "updateDescription.updatedFields.v"), 2);
    event_at(&v, 2, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "replace");
    assert_int_equal(int_field(&ev, "fullDocument.v"), 3);
    event_at(&v, 3, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,ns,documentKey");
    /* PBRT is the last event's token. */
    char tok[512];
    event_token(&ev, tok, sizeof tok);
    assert_string_equal(v.pbrt, tok);
    /* Tokens increase. */
    bson_t ev0;
    char tok0[512];
    event_at(&v, 0, &ev0);
    event_token(&ev0, tok0, sizeof tok0);
    assert_true(strcmp(tok0, tok) < 0);
    bson_destroy(r);
}

static void test_batch_size_and_hwm(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    char hwm1[512];
    snprintf(hwm1, sizeof hwm1, "%s", v.pbrt);
    bson_destroy(r);
    for (int i = 0; i < 5; i++) {
        insert(f, "db", "coll", i);
    }
    r = getmore(f, "db", "coll", id, 2, 0);
    view(r, &v);
    assert_int_equal(v.n, 2);
    bson_t ev;
    event_at(&v, 0, &ev);
    assert_int_equal(int_field(&ev, "documentKey._id"), 0);
    bson_destroy(r);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 3);
    event_at(&v, 0, &ev);
    assert_int_equal(int_field(&ev, "documentKey._id"), 2);
    bson_destroy(r);
    /* Events elsewhere advance the high-water mark of an empty batch. */
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 0);
    char hwm2[512];
    snprintf(hwm2, sizeof hwm2, "%s", v.pbrt);
    bson_destroy(r);
    insert(f, "db", "other", 1);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 0);
    assert_true(strcmp(hwm1, hwm2) < 0);
    assert_true(strcmp(hwm2, v.pbrt) < 0);
    bson_destroy(r);
}

static void test_first_batch_and_resume(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    for (int i = 0; i < 4; i++) {
        insert(f, "db", "coll", i);
    }
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    bson_t ev;
    char tok1[512];
    event_at(&v, 1, &ev);
    event_token(&ev, tok1, sizeof tok1);
    bson_destroy(r);

    /* resumeAfter event 1: events 2 and 3 in the first batch, limited by batchSize. */
    bson_t *spec = token_spec("resumeAfter", tok1);
    r = aggregate(f, "db", "coll", spec, NULL, 1);
    view(r, &v);
    assert_int_equal(v.n, 1);
    event_at(&v, 0, &ev);
    assert_int_equal(int_field(&ev, "documentKey._id"), 2);
    bson_destroy(r);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    view(r, &v);
    assert_int_equal(v.n, 2);
    bson_destroy(r);
    bson_destroy(spec);

    /* startAtOperationTime: events at or after that time. */
    bson_iter_t it;
    r = getmore(f, "db", "coll", id, 0, 0);
    bson_destroy(r);
    spec = bson_new();
    BSON_APPEND_TIMESTAMP(spec, "startAtOperationTime", 1700000000, 3);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    view(r, &v);
    assert_int_equal(v.n, 2);
    event_at(&v, 0, &ev);
    assert_true(bson_iter_init_find(&it, &ev, "clusterTime"));
    uint32_t t, i;
    bson_iter_timestamp(&it, &t, &i);
    assert_int_equal(i, 3);
    bson_destroy(r);
    bson_destroy(spec);

    /* The HWM PBRT of an empty batch resumes exactly where it left off. */
    r = aggregate(f, "db", "coll", NULL, NULL, -1);
    view(r, &v);
    bson_destroy(r);
    insert(f, "db", "coll", 50);
    spec = token_spec("resumeAfter", v.pbrt);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    view(r, &v);
    assert_int_equal(v.n, 1);
    event_at(&v, 0, &ev);
    assert_int_equal(int_field(&ev, "documentKey._id"), 50);
    bson_destroy(r);
    bson_destroy(spec);
}

static void test_drop_invalidates(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    insert(f, "db", "coll", 1);
    append_ddl(f, EMU_OP_DROP, "db", "coll", NULL, NULL);
    insert(f, "db", "coll", 2);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 3);
    assert_int_equal(v.id, 0);
    bson_t ev;
    char keys[256], drop_tok[512], inv_tok[512];
    event_at(&v, 1, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,ns");
    assert_string_equal(str_field(&ev, "operationType"), "drop");
    event_token(&ev, drop_tok, sizeof drop_tok);
    event_at(&v, 2, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime");
    assert_string_equal(str_field(&ev, "operationType"), "invalidate");
    event_token(&ev, inv_tok, sizeof inv_tok);
    assert_string_equal(v.pbrt, inv_tok);
    /* Same token apart from fromInvalidate (6E -> 6F at byte 15). */
    assert_int_equal(strlen(drop_tok), strlen(inv_tok));
    assert_memory_equal(drop_tok, inv_tok, 30);
    assert_memory_equal(drop_tok + 30, "6E", 2);
    assert_memory_equal(inv_tok + 30, "6F", 2);
    assert_string_equal(drop_tok + 32, inv_tok + 32);
    bson_destroy(r);
    /* The cursor is gone. */
    expect_error(getmore(f, "db", "coll", id, 0, 0), 43);

    /* resumeAfter the invalidate: 260 without labels. */
    bson_t *spec = token_spec("resumeAfter", inv_tok);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    assert_false(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 260);
    bson_destroy(spec);
    /* startAfter the invalidate: a new stream after it (sees the insert of _id 2). */
    spec = token_spec("startAfter", inv_tok);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_true(v.id != 0);
    event_at(&v, 0, &ev);
    assert_int_equal(int_field(&ev, "documentKey._id"), 2);
    bson_destroy(r);
    bson_destroy(spec);
    /* resumeAfter the drop: the invalidate comes next. */
    spec = token_spec("resumeAfter", drop_tok);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.id, 0);
    event_at(&v, 0, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "invalidate");
    bson_destroy(r);
    bson_destroy(spec);
}

static void test_invalidate_across_batches(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    append_ddl(f, EMU_OP_RENAME, "db", "coll", "db", "renamed");
    r = getmore(f, "db", "coll", id, 1, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.id, id);
    bson_t ev;
    event_at(&v, 0, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "rename");
    assert_string_equal(str_field(&ev, "to.coll"), "renamed");
    char keys[256];
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,ns,to");
    bson_destroy(r);
    r = getmore(f, "db", "coll", id, 1, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.id, 0);
    event_at(&v, 0, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "invalidate");
    bson_destroy(r);

    /* A rename onto the watched collection invalidates too. */
    r = aggregate(f, "db", "target", NULL, NULL, -1);
    view(r, &v);
    id = v.id;
    bson_destroy(r);
    append_ddl(f, EMU_OP_RENAME, "db", "src", "db", "target");
    r = getmore(f, "db", "target", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 2);
    assert_int_equal(v.id, 0);
    bson_destroy(r);
}

static void test_database_and_cluster_streams(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", NULL, NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t dbid = v.id;
    bson_destroy(r);
    bson_t *spec = BCON_NEW("allChangesForCluster", BCON_BOOL(true));
    r = aggregate(f, "admin", NULL, spec, NULL, -1);
    bson_destroy(spec);
    view(r, &v);
    int64_t clid = v.id;
    bson_destroy(r);

    insert(f, "db", "a", 1);
    insert(f, "db", "system.views", 1);
    insert(f, "other", "b", 1);
    insert(f, "admin", "x", 1);
    insert(f, "local", "x", 1);
    append_ddl(f, EMU_OP_DROP, "db", "a", NULL, NULL);
    append_ddl(f, EMU_OP_DROP_DATABASE, "db", NULL, NULL, NULL);
    insert(f, "db", "c", 1);

    r = getmore(f, "db", "$cmd.aggregate", dbid, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 4); /* insert a, drop a, dropDatabase, invalidate */
    assert_int_equal(v.id, 0);
    bson_t ev;
    event_at(&v, 2, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "dropDatabase");
    assert_false(has_field(&ev, "ns.coll"));
    event_at(&v, 3, &ev);
    assert_string_equal(str_field(&ev, "operationType"), "invalidate");
    bson_destroy(r);

    r = getmore(f, "admin", "$cmd.aggregate", clid, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 5); /* db.a, other.b, drop, dropDatabase, db.c */
    assert_int_equal(v.id, clid);
    event_at(&v, 1, &ev);
    assert_string_equal(str_field(&ev, "ns.db"), "other");
    event_at(&v, 4, &ev);
    assert_string_equal(str_field(&ev, "ns.coll"), "c");
    bson_destroy(r);
}

static void test_images(void **state)
{
    fixture_t *f = *state;
    bson_t *lookup = BCON_NEW("fullDocument", BCON_UTF8("updateLookup"));
    bson_t *avail = BCON_NEW("fullDocument", BCON_UTF8("whenAvailable"), "fullDocumentBeforeChange",
                             BCON_UTF8("whenAvailable"));
    bson_t *req = BCON_NEW("fullDocument", BCON_UTF8("required"));
    bson_t *req_pre = BCON_NEW("fullDocumentBeforeChange", BCON_UTF8("required"));
    bson_t *r;
    batch_view_t v;
    int64_t ids[4];
    const bson_t *specs[4] = {lookup, avail, req, req_pre};
    for (int i = 0; i < 4; i++) {
        r = aggregate(f, "db", "coll", specs[i], NULL, -1);
        view(r, &v);
        ids[i] = v.id;
        bson_destroy(r);
    }
    fake_doc = BCON_NEW("_id", BCON_INT32(1), "current", BCON_BOOL(true));
    append_crud(f, EMU_OP_UPDATE, "db", "coll", 1, 5, true);
    append_crud(f, EMU_OP_UPDATE, "db", "coll", 2, 6, false);
    append_crud(f, EMU_OP_DELETE, "db", "coll", 1, 7, true);

    bson_t ev;
    char keys[256];
    r = getmore(f, "db", "coll", ids[0], 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 3);
    event_at(&v, 0, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,ns,documentKey,"
                              "updateDescription,fullDocument");
    assert_true(has_field(&ev, "fullDocument.current"));
    event_at(&v, 1, &ev);
    assert_true(field_is_null(&ev, "fullDocument")); /* _id 2 is not in the collection */
    event_at(&v, 2, &ev);
    assert_false(has_field(&ev, "fullDocument"));
    bson_destroy(r);

    r = getmore(f, "db", "coll", ids[1], 0, 0);
    view(r, &v);
    event_at(&v, 0, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,ns,documentKey,"
                              "updateDescription,fullDocument,fullDocumentBeforeChange");
    assert_int_equal(int_field(&ev, "fullDocument.v"), 5);
    assert_int_equal(int_field(&ev, "fullDocumentBeforeChange.v"), 4);
    event_at(&v, 1, &ev);
    assert_true(field_is_null(&ev, "fullDocument"));
    assert_true(field_is_null(&ev, "fullDocumentBeforeChange"));
    event_at(&v, 2, &ev);
    assert_int_equal(int_field(&ev, "fullDocumentBeforeChange.v"), 6);
    bson_destroy(r);

    /* required post-image: the first update has one, the second does not -> 47 on the batch. */
    r = getmore(f, "db", "coll", ids[2], 1, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    bson_destroy(r);
    r = getmore(f, "db", "coll", ids[2], 0, 0);
    assert_false(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 47);
    expect_error(getmore(f, "db", "coll", ids[2], 0, 0), 43);
    r = getmore(f, "db", "coll", ids[3], 0, 0);
    expect_error(r, 47);

    bson_destroy(lookup);
    bson_destroy(avail);
    bson_destroy(req);
    bson_destroy(req_pre);
}

static void test_history_lost(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    for (int i = 0; i < 3; i++) {
        insert(f, "db", "coll", i);
    }
    r = getmore(f, "db", "coll", id, 1, 0);
    view(r, &v);
    bson_t ev;
    char tok0[512];
    event_at(&v, 0, &ev);
    event_token(&ev, tok0, sizeof tok0);
    bson_destroy(r);

    bson_t *cmd = BCON_NEW("emulatorTruncateOplog", BCON_INT32(1), "keepLast", BCON_INT32(1));
    r = bson_new();
    pthread_mutex_lock(&f->srv.lock);
    emu_cs_truncate_oplog(&f->conn, cmd, r);
    pthread_mutex_unlock(&f->srv.lock);
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, r, "removed"));
    assert_int_equal(bson_iter_as_int64(&it), 2);
    bson_destroy(r);
    bson_destroy(cmd);

    /* The open cursor needed event 1, which is gone. */
    r = getmore(f, "db", "coll", id, 0, 0);
    assert_true(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 286);
    /* Resuming from event 0 or from a time before the history: 286. */
    bson_t *spec = token_spec("resumeAfter", tok0);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    assert_true(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 286);
    bson_destroy(spec);
    spec = bson_new();
    BSON_APPEND_TIMESTAMP(spec, "startAtOperationTime", 1700000000, 1);
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 286);
    bson_destroy(spec);

    /* A token inside the retained history that names no event: 280. */
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    bson_t *key = BCON_NEW("_id", BCON_INT32(12345));
    emu_cstoken_encode_event(&b, 1700000000, 3, false, fake_uuid, key, NULL);
    char hex[512];
    emu_cstoken_hex(b.data, b.len, hex);
    spec = token_spec("resumeAfter", hex);
    r = aggregate(f, "db", "coll", spec, NULL, -1);
    assert_true(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 280);
    bson_destroy(spec);
    bson_destroy(key);
    emu_kbuf_destroy(&b);
}

static void test_ring_drops_oldest(void **state)
{
    fixture_t *f = *state; /* oplog of 5 entries */
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    for (int i = 0; i < 5; i++) {
        insert(f, "db", "coll", i);
    }
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 5);
    bson_destroy(r);
    for (int i = 5; i < 11; i++) {
        insert(f, "db", "coll", i); /* 6 more: one the cursor needs falls out */
    }
    expect_error(getmore(f, "db", "coll", id, 0, 0), 286);
    r = aggregate(f, "db", "coll", NULL, NULL, -1);
    view(r, &v);
    id = v.id;
    bson_destroy(r);
    for (int i = 0; i < 3000; i++) {
        insert(f, "db", "coll", i); /* far more than the oplog holds, but the cursor keeps up */
        if (i % 4 == 3) {
            r = getmore(f, "db", "coll", id, 0, 0);
            view(r, &v);
            assert_int_equal(v.n, 4);
            bson_destroy(r);
        }
    }
}

static void test_validation_errors(void **state)
{
    fixture_t *f = *state;
    bson_t *spec = BCON_NEW("bogus", BCON_INT32(1));
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 40415);
    bson_destroy(spec);
    spec = BCON_NEW("fullDocument", BCON_UTF8("sometimes"));
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 2);
    bson_destroy(spec);
    spec = BCON_NEW("fullDocumentBeforeChange", BCON_INT32(1));
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 14);
    bson_destroy(spec);
    spec = BCON_NEW("allChangesForCluster", BCON_BOOL(true));
    expect_error(aggregate(f, "db", NULL, spec, NULL, -1), 72);
    expect_error(aggregate(f, "admin", "coll", spec, NULL, -1), 72);
    bson_destroy(spec);
    expect_error(aggregate(f, "admin", NULL, NULL, NULL, -1), 73);
    expect_error(aggregate(f, "local", "oplog.rs", NULL, NULL, -1), 73);
    expect_error(aggregate(f, "config", NULL, NULL, NULL, -1), 73);
    expect_error(aggregate(f, "db", "system.views", NULL, NULL, -1), 73);
    spec = BCON_NEW("resumeAfter", "{", "_data", BCON_UTF8("82"), "}", "startAfter", "{", "_data",
                    BCON_UTF8("82"), "}");
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 50865);
    bson_destroy(spec);
    spec = BCON_NEW("resumeAfter", "{", "_data", BCON_UTF8("82"), "}", "startAtOperationTime",
                    BCON_TIMESTAMP(1, 1));
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 40674);
    bson_destroy(spec);
    spec = BCON_NEW("resumeAfter", "{", "_data", BCON_INT32(1), "}");
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 40647);
    bson_destroy(spec);
    spec = BCON_NEW("resumeAfter", "{", "_data", BCON_UTF8("zz"), "}");
    expect_error(aggregate(f, "db", "coll", spec, NULL, -1), 9);
    bson_destroy(spec);
    bson_t *stages = BCON_NEW("0", "{", "$changeStream", "{", "}", "}");
    expect_error(aggregate(f, "db", "coll", NULL, stages, -1), 40602);
    bson_destroy(stages);
    stages = BCON_NEW("0", "{", "$unsupported", BCON_UTF8("foo"), "}");
    expect_error(aggregate(f, "db", "coll", NULL, stages, -1), 40324);
    bson_destroy(stages);
    /* No cursor was left open by any of these. */
    expect_error(getmore(f, "db", "coll", 1000, 0, 0), 43);
}

static void test_standalone(void **state)
{
    fixture_t *f = *state;
    expect_error(aggregate(f, "db", "coll", NULL, NULL, -1), 40573);
}

static void test_pipeline(void **state)
{
    fixture_t *f = *state;
    bson_t *stages =
        BCON_NEW("0", "{", "$match", "{", "operationType", BCON_UTF8("delete"), "}", "}");
    bson_t *r = aggregate(f, "db", "coll", NULL, stages, -1);
    bson_destroy(stages);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    stages = BCON_NEW("0", "{", "$project", "{", "_id", BCON_INT32(0), "}", "}");
    r = aggregate(f, "db", "coll", NULL, stages, -1);
    bson_destroy(stages);
    view(r, &v);
    int64_t noid = v.id;
    bson_destroy(r);
    stages = BCON_NEW("0", "{", "$addFields", "{", "_id", BCON_INT32(1), "}", "}");
    r = aggregate(f, "db", "coll", NULL, stages, -1);
    bson_destroy(stages);
    view(r, &v);
    int64_t newid = v.id;
    bson_destroy(r);

    insert(f, "db", "coll", 1);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 0); /* filtered out, yet the position moved past it */
    bson_destroy(r);
    append_crud(f, EMU_OP_DELETE, "db", "coll", 1, 0, false);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    bson_destroy(r);
    append_ddl(f, EMU_OP_DROP, "db", "coll", NULL, NULL);
    /* The drop is filtered by $match but the invalidate bypasses user stages. */
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.id, 0);
    bson_destroy(r);

    r = getmore(f, "db", "coll", noid, 0, 0);
    assert_true(reply_has_label(r, "NonResumableChangeStreamError"));
    expect_error(r, 280);
    r = getmore(f, "db", "coll", newid, 0, 0);
    expect_error(r, 280);
}

static void test_getmore_errors_and_kill(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    expect_error(getmore(f, "db", "other", id, 0, 0), 13);
    expect_error(getmore(f, "db", "coll", id + 1, 0, 0), 43);
    pthread_mutex_lock(&f->srv.lock);
    assert_true(emu_cs_owns_cursor(&f->srv, id));
    assert_true(emu_cs_kill(&f->srv, id));
    assert_false(emu_cs_kill(&f->srv, id));
    assert_false(emu_cs_owns_cursor(&f->srv, id));
    pthread_mutex_unlock(&f->srv.lock);

    r = aggregate(f, "db", "coll", NULL, NULL, -1);
    view(r, &v);
    id = v.id;
    bson_destroy(r);
    fake_fp_action = EMU_FP_ERROR;
    expect_error(getmore(f, "db", "coll", id, 0, 0), 91);
    fake_fp_action = EMU_FP_NONE;
    expect_error(getmore(f, "db", "coll", id, 0, 0), 43);

    r = aggregate(f, "db", "coll", NULL, NULL, -1);
    view(r, &v);
    id = v.id;
    bson_destroy(r);
    fake_fp_action = EMU_FP_CLOSE;
    r = getmore(f, "db", "coll", id, 0, 0);
    assert_true(f->conn.close_after_reply);
    bson_destroy(r);
    fake_fp_action = EMU_FP_NONE;
    r = getmore(f, "db", "coll", id, 0, 0); /* still open after a closed connection */
    view(r, &v);
    assert_int_equal(v.id, id);
    bson_destroy(r);
}

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

typedef struct writer_arg {
    fixture_t *f;
    int delay_ms;
} writer_arg_t;

static void *writer(void *p)
{
    writer_arg_t *a = p;
    struct timespec ts = {0, (long)a->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&a->f->srv.lock);
    insert(a->f, "db", "coll", 42);
    pthread_mutex_unlock(&a->f->srv.lock);
    return NULL;
}

static void test_await_data(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);

    double t0 = mono_ms();
    r = getmore(f, "db", "coll", id, 0, 150);
    double waited = mono_ms() - t0;
    view(r, &v);
    assert_int_equal(v.n, 0);
    assert_true(waited >= 140 && waited < 2000);
    bson_destroy(r);

    /* An insert from another thread wakes the waiting getMore long before maxTimeMS. */
    pthread_t th;
    writer_arg_t arg = {f, 50};
    pthread_create(&th, NULL, writer, &arg);
    t0 = mono_ms();
    r = getmore(f, "db", "coll", id, 0, 5000);
    waited = mono_ms() - t0;
    pthread_join(th, NULL);
    view(r, &v);
    assert_int_equal(v.n, 1);
    assert_true(waited < 2500);
    bson_destroy(r);

    /* Shutdown ends the wait too. */
    f->srv.shutting_down = true;
    t0 = mono_ms();
    r = getmore(f, "db", "coll", id, 0, 5000);
    assert_true(mono_ms() - t0 < 1000);
    bson_destroy(r);
}

typedef struct killer_arg {
    fixture_t *f;
    int64_t id;
    bool killed;
} killer_arg_t;

static void *killer(void *p)
{
    killer_arg_t *a = p;
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&a->f->srv.lock);
    a->killed = emu_cs_kill(&a->f->srv, a->id);
    pthread_mutex_unlock(&a->f->srv.lock);
    return NULL;
}

/* killCursors while a getMore waits on that cursor: the getMore ends at once with 237 and the
 * cursor is freed exactly once (ASan checks the latter). */
static void test_kill_while_waiting(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    bson_destroy(r);
    killer_arg_t arg = {f, v.id, false};
    pthread_t th;
    pthread_create(&th, NULL, killer, &arg);
    double t0 = mono_ms();
    r = getmore(f, "db", "coll", v.id, 0, 5000);
    double waited = mono_ms() - t0;
    pthread_join(th, NULL);
    assert_true(arg.killed);
    assert_true(waited < 2500);
    expect_error(r, 237);
    expect_error(getmore(f, "db", "coll", v.id, 0, 0), 43);
}

/* Delivery cost: events appended once, read back by one cursor in batches of 1,000. Reported,
 * and checked against a floor far below the 200,000 events/s goal so that a slow or sanitized
 * build does not fail it while an accidental O(n^2) path still does. */
static void test_throughput(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    const int n = 100000;
    bson_t *key = bson_new();
    bson_t *doc = bson_new();
    char pad[150];
    memset(pad, 'x', sizeof pad - 1);
    pad[sizeof pad - 1] = '\0';
    for (int i = 0; i < n; i++) {
        bson_reinit(key);
        bson_reinit(doc);
        BSON_APPEND_INT32(key, "_id", i);
        BSON_APPEND_INT32(doc, "_id", i);
        BSON_APPEND_UTF8(doc, "pad", pad);
        emu_change_t ch = {.op = EMU_OP_INSERT,
                           .db = "db",
                           .coll = "coll",
                           .coll_uuid = fake_uuid,
                           .document_key = key,
                           .full_document = doc};
        emu_oplog_append(&f->srv, &ch);
    }
    bson_destroy(key);
    bson_destroy(doc);
    double t0 = mono_ms();
    int got = 0;
    while (got < n) {
        r = getmore(f, "db", "coll", id, 1000, 0);
        view(r, &v);
        assert_int_equal(v.n, 1000);
        got += v.n;
        bson_destroy(r);
    }
    double ms = mono_ms() - t0;
    double rate = got / (ms / 1000.0);
    print_message("change-event delivery: %d events in %.1f ms = %.0f events/s\n", got, ms, rate);
    assert_true(rate > 20000);
}

static int setup_small(void **state)
{
    return setup_opts(state, 5, false);
}

static int setup_big(void **state)
{
    return setup_opts(state, 200000, false);
}

static int setup_standalone(void **state)
{
    return setup_opts(state, 100, true);
}

/* ---- transactions ---- */

static const uint8_t txn_lsid_id[16] = {0xAA, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* One committed transaction: op k writes _id ids[k] in db.colls[k] (insert, or the op given). */
static void append_txn(fixture_t *f, const emu_op_t *ops, const char *const *colls, const int *ids,
                       int n, int64_t txn_number)
{
    emu_change_t ch[8];
    bson_t *keys[8], *docs[8], *pres[8], *uds[8];
    assert_true(n <= 8);
    for (int k = 0; k < n; k++) {
        keys[k] = BCON_NEW("_id", BCON_INT32(ids[k]));
        docs[k] = BCON_NEW("_id", BCON_INT32(ids[k]), "v", BCON_INT32(k));
        pres[k] = BCON_NEW("_id", BCON_INT32(ids[k]), "v", BCON_INT32(-1));
        uds[k] = BCON_NEW("updatedFields", "{", "v", BCON_INT32(k), "}", "removedFields", "[", "]",
                          "truncatedArrays", "[", "]");
        memset(&ch[k], 0, sizeof ch[k]);
        ch[k].op = ops[k];
        ch[k].db = "db";
        ch[k].coll = colls[k];
        ch[k].coll_uuid = fake_uuid;
        ch[k].document_key = keys[k];
        ch[k].full_document = ops[k] == EMU_OP_DELETE ? NULL : docs[k];
        ch[k].pre_image = ops[k] == EMU_OP_INSERT ? NULL : pres[k];
        ch[k].update_description = ops[k] == EMU_OP_UPDATE ? uds[k] : NULL;
    }
    bson_t *lsid = BCON_NEW("id", BCON_BIN(BSON_SUBTYPE_UUID, txn_lsid_id, 16));
    emu_oplog_append_txn(&f->srv, ch, (size_t)n, lsid, txn_number);
    bson_destroy(lsid);
    for (int k = 0; k < n; k++) {
        bson_destroy(keys[k]);
        bson_destroy(docs[k]);
        bson_destroy(pres[k]);
        bson_destroy(uds[k]);
    }
}

static uint32_t token_txn_index(const bson_t *ev)
{
    bson_iter_t it;
    uint32_t len;
    const uint8_t *data;
    bson_t tok_doc;
    emu_cstoken_t tok;
    mc_error_t err;
    assert_true(bson_iter_init_find(&it, ev, "_id"));
    bson_iter_document(&it, &len, &data);
    bson_init_static(&tok_doc, data, len);
    assert_int_equal(emu_cstoken_parse(&tok_doc, &tok, &err), 0);
    uint32_t idx = tok.txn_op_index;
    emu_cstoken_cleanup(&tok);
    return idx;
}

static void ts_field(const bson_t *doc, const char *key, uint32_t *t, uint32_t *i)
{
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, doc, key));
    bson_iter_timestamp(&it, t, i);
}

static const emu_op_t txn_ops[4] = {EMU_OP_INSERT, EMU_OP_INSERT, EMU_OP_UPDATE, EMU_OP_DELETE};
static const char *const txn_colls[4] = {"coll", "other", "coll", "coll"};
static const int txn_ids[4] = {10, 11, 10, 12};

/* A committed transaction: one event per write, txnNumber and lsid first, one cluster time,
 * tokens ordered by txnOpIndex (with the gaps of the writes a stream does not see). */
static void test_txn_events(void **state)
{
    fixture_t *f = *state;
    batch_view_t v;
    bson_t *r = aggregate(f, "db", "coll", NULL, NULL, -1);
    view(r, &v);
    int64_t coll_id = v.id;
    bson_destroy(r);
    r = aggregate(f, "db", NULL, NULL, NULL, -1);
    view(r, &v);
    int64_t db_id = v.id;
    bson_destroy(r);

    append_txn(f, txn_ops, txn_colls, txn_ids, 4, 7);
    insert(f, "db", "coll", 13);

    r = getmore(f, "db", "coll", coll_id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 4);
    bson_t ev;
    char keys[256], prev[512] = "", tok[512];
    uint32_t t0, i0, t, i;
    static const uint32_t want_idx[3] = {0, 2, 3};
    static const char *const want_op[3] = {"insert", "update", "delete"};
    for (int k = 0; k < 3; k++) {
        event_at(&v, k, &ev);
        keys_of(&ev, keys, sizeof keys);
        if (k == 0) {
            assert_string_equal(keys, "txnNumber,lsid,_id,operationType,clusterTime,wallTime,"
                                      "fullDocument,ns,documentKey");
            ts_field(&ev, "clusterTime", &t0, &i0);
        }
        assert_string_equal(str_field(&ev, "operationType"), want_op[k]);
        bson_iter_t it;
        assert_true(bson_iter_init_find(&it, &ev, "txnNumber") && BSON_ITER_HOLDS_INT64(&it));
        assert_int_equal(bson_iter_int64(&it), 7);
        assert_true(bson_iter_init(&it, &ev) && bson_iter_find_descendant(&it, "lsid.id", &it));
        bson_subtype_t sub;
        uint32_t len;
        const uint8_t *data;
        bson_iter_binary(&it, &sub, &len, &data);
        assert_int_equal(sub, BSON_SUBTYPE_UUID);
        assert_memory_equal(data, txn_lsid_id, 16);
        ts_field(&ev, "clusterTime", &t, &i);
        assert_int_equal(t, t0);
        assert_int_equal(i, i0);
        assert_int_equal(token_txn_index(&ev), want_idx[k]);
        event_token(&ev, tok, sizeof tok);
        assert_true(strcmp(prev, tok) < 0);
        snprintf(prev, sizeof prev, "%s", tok);
    }
    /* The write after the transaction: a later time, no transaction fields. */
    event_at(&v, 3, &ev);
    keys_of(&ev, keys, sizeof keys);
    assert_string_equal(keys, "_id,operationType,clusterTime,wallTime,fullDocument,ns,documentKey");
    ts_field(&ev, "clusterTime", &t, &i);
    assert_true(i > i0);
    event_token(&ev, tok, sizeof tok);
    assert_true(strcmp(prev, tok) < 0);
    bson_destroy(r);

    /* The database stream sees every write of the transaction, txnOpIndex 0..3. */
    r = getmore(f, "db", "$cmd.aggregate", db_id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 5);
    for (int k = 0; k < 4; k++) {
        event_at(&v, k, &ev);
        assert_int_equal(token_txn_index(&ev), (uint32_t)k);
        assert_string_equal(str_field(&ev, "ns.coll"), txn_colls[k]);
    }
    bson_destroy(r);
}

/* Resuming after an event in the middle of a transaction resumes at the transaction's next
 * event (not after the whole transaction, nor at its start). */
static void test_txn_resume_inside(void **state)
{
    fixture_t *f = *state;
    bson_t *r = aggregate(f, "db", NULL, NULL, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    append_txn(f, txn_ops, txn_colls, txn_ids, 4, 3);
    insert(f, "db", "coll", 13);
    r = getmore(f, "db", "$cmd.aggregate", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 5);
    char toks[5][512];
    for (int k = 0; k < 5; k++) {
        bson_t ev;
        event_at(&v, k, &ev);
        event_token(&ev, toks[k], sizeof toks[k]);
    }
    bson_destroy(r);
    for (int from = 0; from < 4; from++) {
        bson_t *spec = token_spec("resumeAfter", toks[from]);
        r = aggregate(f, "db", NULL, spec, NULL, -1);
        view(r, &v);
        assert_int_equal(v.n, 4 - from);
        for (int k = 0; k < v.n; k++) {
            bson_t ev;
            char tok[512];
            event_at(&v, k, &ev);
            event_token(&ev, tok, sizeof tok);
            assert_string_equal(tok, toks[from + 1 + k]);
        }
        bson_destroy(r);
        /* batchSize 0: nothing returned, and inside the transaction the PBRT is the resume
         * token itself, not a mark at the transaction's time that would sort before it. */
        r = aggregate(f, "db", NULL, spec, NULL, 0);
        view(r, &v);
        assert_int_equal(v.n, 0);
        if (from < 3) {
            assert_string_equal(v.pbrt, toks[from]);
        } else {
            assert_true(strcmp(v.pbrt, toks[from]) > 0 && strcmp(v.pbrt, toks[4]) < 0);
        }
        bson_destroy(r);
        bson_destroy(spec);
    }
}

/* A stream that sees only the first write of a transaction: the batches after it keep that
 * event's token as their PBRT until the cluster time moves past the transaction. */
static void test_txn_pbrt_never_goes_back(void **state)
{
    fixture_t *f = *state;
    bson_t *stages =
        BCON_NEW("0", "{", "$match", "{", "operationType", BCON_UTF8("insert"), "}", "}");
    bson_t *r = aggregate(f, "db", "coll", NULL, stages, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    append_txn(f, txn_ops, txn_colls, txn_ids, 4, 1);
    r = getmore(f, "db", "coll", id, 1, 0);
    view(r, &v);
    assert_int_equal(v.n, 1);
    char tok[512];
    snprintf(tok, sizeof tok, "%s", v.pbrt);
    bson_destroy(r);
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 0);
    assert_true(strcmp(tok, v.pbrt) <= 0);
    bson_destroy(r);
    bson_destroy(stages);
}

/* ---- large events ---- */

/* A document of about `mb` MB: {_id: id, pad: "xxx..."}. */
static bson_t *big_doc(int id, size_t mb, char fill)
{
    size_t n = mb * 1024 * 1024;
    char *pad = malloc(n + 1);
    memset(pad, fill, n);
    pad[n] = '\0';
    bson_t *d = BCON_NEW("_id", BCON_INT32(id));
    bson_append_utf8(d, "pad", 3, pad, (int)n);
    free(pad);
    return d;
}

/* An update of _id 1 whose event, with pre- and post-images, is about 18 MB. */
static void append_big_update(fixture_t *f)
{
    bson_t *key = BCON_NEW("_id", BCON_INT32(1));
    bson_t *pre = big_doc(1, 9, 'a');
    bson_t *post = big_doc(1, 9, 'b');
    bson_t *ud = BCON_NEW("updatedFields", "{", "x", BCON_INT32(1), "}", "removedFields", "[", "]",
                          "truncatedArrays", "[", "]");
    emu_change_t ch = {.op = EMU_OP_UPDATE,
                       .db = "db",
                       .coll = "coll",
                       .coll_uuid = fake_uuid,
                       .document_key = key,
                       .full_document = post,
                       .pre_image = pre,
                       .images_enabled = true,
                       .update_description = ud};
    emu_oplog_append(&f->srv, &ch);
    bson_destroy(key);
    bson_destroy(pre);
    bson_destroy(post);
    bson_destroy(ud);
}

static bson_t *images_spec(const char *option, const char *hex)
{
    bson_t *spec = BCON_NEW("fullDocument", BCON_UTF8("whenAvailable"), "fullDocumentBeforeChange",
                            BCON_UTF8("whenAvailable"));
    if (option) {
        bson_t tok;
        BSON_APPEND_DOCUMENT_BEGIN(spec, option, &tok);
        BSON_APPEND_UTF8(&tok, "_data", hex);
        bson_append_document_end(spec, &tok);
    }
    return spec;
}

static const char *errmsg_of(const bson_t *reply)
{
    return str_field(reply, "errmsg");
}

/* Without $changeStreamSplitLargeEvent an event past 16793600 bytes fails the cursor with
 * BSONObjectTooLarge, worded as MongoDB words it (context, size, hex size, first element). */
static void test_event_too_large(void **state)
{
    fixture_t *f = *state;
    bson_t *spec = images_spec(NULL, NULL);
    bson_t *r = aggregate(f, "db", "coll", spec, NULL, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    char hwm[512];
    snprintf(hwm, sizeof hwm, "%s", v.pbrt);
    bson_destroy(r);
    append_big_update(f);
    r = getmore(f, "db", "coll", id, 0, 0);
    const char *msg = errmsg_of(r);
    assert_non_null(msg);
    assert_int_equal(reply_code(r), 10334);
    assert_non_null(strstr(msg, "Executor error during getMore :: caused by :: BSONObj size: "));
    unsigned size = 0, hex = 0;
    const char *p = strstr(msg, "BSONObj size: ");
    assert_int_equal(sscanf(p, "BSONObj size: %u (0x%X)", &size, &hex), 2);
    assert_true(size > 18000000 && size < 19500000);
    assert_int_equal(size, hex);
    assert_non_null(strstr(msg, ") is invalid. Size must be between 0 and 16793600(16MB) First "
                                "element: _id: { _data: \"82"));
    assert_false(reply_has_label(r, "ResumableChangeStreamError"));
    bson_destroy(r);
    expect_error(getmore(f, "db", "coll", id, 0, 0), 43); /* the cursor is gone */

    /* Already in the oplog when the stream opens: the aggregate fails the same way. */
    bson_t *from = token_spec("startAfter", hwm);
    bson_concat(from, spec);

    r = aggregate(f, "db", "coll", from, NULL, -1);
    assert_int_equal(reply_code(r), 10334);
    assert_non_null(strstr(errmsg_of(r), "PlanExecutor error during aggregation :: caused by :: "
                                         "BSONObj size: "));
    bson_destroy(r);
    bson_destroy(from);
    bson_destroy(spec);
}

static bson_t *split_stage(void)
{
    return BCON_NEW("0", "{", "$changeStreamSplitLargeEvent", "{", "}", "}");
}

/* Size in bytes of the element `key` of `doc`. */
static uint32_t element_size(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, doc, key));
    return it.next_off - it.off;
}

/* $changeStreamSplitLargeEvent: fragments {_id, splitEvent: {fragment, of}, fields...}, the
 * fields smallest first; each fragment has its own token, the PBRT follows them, and a stream
 * resumed from a fragment's token goes on with the next fragment. */
static void test_split_large_event(void **state)
{
    fixture_t *f = *state;
    bson_t *spec = images_spec(NULL, NULL);
    bson_t *stages = split_stage();
    bson_t *r = aggregate(f, "db", "coll", spec, stages, -1);
    batch_view_t v;
    view(r, &v);
    int64_t id = v.id;
    bson_destroy(r);
    append_big_update(f);
    insert(f, "db", "coll", 2);

    char tok[2][512];
    bson_t frag;
    char keys[512];
    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 1); /* a fragment fills a batch */
    event_at(&v, 0, &frag);
    keys_of(&frag, keys, sizeof keys);
    assert_int_equal(int_field(&frag, "splitEvent.fragment"), 1);
    assert_int_equal(int_field(&frag, "splitEvent.of"), 2);
    assert_true(frag.len <= 16793600 - 8 * 1024);
    /* _id, splitEvent, then the fields by size: the small ones and one of the two images. */
    assert_non_null(strstr(keys, "_id,splitEvent,"));
    uint32_t prev = 0;
    bson_iter_t it;
    bson_iter_init(&it, &frag);
    bson_iter_next(&it);
    bson_iter_next(&it);
    while (bson_iter_next(&it)) {
        uint32_t sz = element_size(&frag, bson_iter_key(&it));
        assert_true(sz >= prev);
        prev = sz;
    }
    bool first_has_post = has_field(&frag, "fullDocument");
    assert_true(first_has_post != has_field(&frag, "fullDocumentBeforeChange"));
    assert_true(has_field(&frag, "operationType") && has_field(&frag, "updateDescription") &&
                has_field(&frag, "documentKey") && has_field(&frag, "ns"));
    event_token(&frag, tok[0], sizeof tok[0]);
    assert_string_equal(v.pbrt, tok[0]);
    bson_destroy(r);

    r = getmore(f, "db", "coll", id, 0, 0);
    view(r, &v);
    assert_int_equal(v.n, 2); /* the second fragment, then the next event */
    event_at(&v, 0, &frag);
    keys_of(&frag, keys, sizeof keys);
    assert_int_equal(int_field(&frag, "splitEvent.fragment"), 2);
    assert_int_equal(int_field(&frag, "splitEvent.of"), 2);
    assert_string_equal(keys, first_has_post ? "_id,splitEvent,fullDocumentBeforeChange"
                                             : "_id,splitEvent,fullDocument");
    event_token(&frag, tok[1], sizeof tok[1]);
    assert_true(strcmp(tok[0], tok[1]) < 0);
    bson_t next;
    event_at(&v, 1, &next);
    assert_int_equal(int_field(&next, "documentKey._id"), 2);
    char next_tok[512];
    event_token(&next, next_tok, sizeof next_tok);
    assert_true(strcmp(tok[1], next_tok) < 0);
    bson_destroy(r);

    /* Resuming from fragment 1 gives fragment 2 (the same token) first. */
    bson_t *from = images_spec("resumeAfter", tok[0]);
    r = aggregate(f, "db", "coll", from, stages, -1);
    view(r, &v);
    assert_true(v.n >= 1);
    event_at(&v, 0, &frag);
    char again[512];
    event_token(&frag, again, sizeof again);
    assert_string_equal(again, tok[1]);
    bson_destroy(r);
    bson_destroy(from);
    /* Resuming from the last fragment goes on after the event. */
    from = images_spec("resumeAfter", tok[1]);
    r = aggregate(f, "db", "coll", from, stages, -1);
    view(r, &v);
    assert_int_equal(v.n, 1);
    event_at(&v, 0, &next);
    assert_int_equal(int_field(&next, "documentKey._id"), 2);
    bson_destroy(r);
    bson_destroy(from);
    /* A fragment token needs the stage. */
    from = images_spec("resumeAfter", tok[0]);
    r = aggregate(f, "db", "coll", from, NULL, -1);
    assert_true(reply_has_label(r, "NonResumableChangeStreamError"));
    assert_non_null(strstr(errmsg_of(r), "must include a $changeStreamSplitLargeEvent stage"));
    expect_error(r, 280);
    bson_destroy(from);
    /* A smaller event cannot be split again: resuming from a fragment of one that is not large
     * any more (a different pipeline) fails. */
    bson_t *small = BCON_NEW("fullDocument", BCON_UTF8("whenAvailable"));
    bson_t *resume = token_spec("resumeAfter", tok[0]);
    bson_concat(small, resume);
    bson_destroy(resume);
    r = aggregate(f, "db", "coll", small, stages, -1);
    assert_non_null(strstr(errmsg_of(r), "was not large enough to be split"));
    expect_error(r, 280);
    bson_destroy(small);
    bson_destroy(stages);
    bson_destroy(spec);
}

static void test_split_stage_errors(void **state)
{
    fixture_t *f = *state;
    bson_t *stages =
        BCON_NEW("0", "{", "$changeStreamSplitLargeEvent", "{", "x", BCON_INT32(1), "}", "}");
    expect_error(aggregate(f, "db", "coll", NULL, stages, -1), 7182800);
    bson_destroy(stages);
    stages = BCON_NEW("0", "{", "$changeStreamSplitLargeEvent", "{", "}", "}", "1", "{", "$match",
                      "{", "operationType", BCON_UTF8("insert"), "}", "}");
    expect_error(aggregate(f, "db", "coll", NULL, stages, -1), 7182802);
    bson_destroy(stages);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_open_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_insert_event_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_size_and_hwm, setup, teardown),
        cmocka_unit_test_setup_teardown(test_first_batch_and_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drop_invalidates, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalidate_across_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_database_and_cluster_streams, setup, teardown),
        cmocka_unit_test_setup_teardown(test_images, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_lost, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ring_drops_oldest, setup_small, teardown),
        cmocka_unit_test_setup_teardown(test_validation_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_standalone, setup_standalone, teardown),
        cmocka_unit_test_setup_teardown(test_pipeline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_getmore_errors_and_kill, setup, teardown),
        cmocka_unit_test_setup_teardown(test_await_data, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill_while_waiting, setup, teardown),
        cmocka_unit_test_setup_teardown(test_throughput, setup_big, teardown),
        cmocka_unit_test_setup_teardown(test_txn_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_resume_inside, setup, teardown),
        cmocka_unit_test_setup_teardown(test_txn_pbrt_never_goes_back, setup, teardown),
        cmocka_unit_test_setup_teardown(test_event_too_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_large_event, setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_stage_errors, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
