/*
 * test_mongo_sink.c: the MongoDB-collection sink's groundwork: the document of an event
 * (with and without a projection), projection and write-concern option errors, error
 * classes, the loop guard; and against mongo-emulator: MongoDB's ordered-insert semantics
 * (an ordered batch stops at the first E11000, an unordered one goes on), ordered inserts
 * that count a replay's duplicates as written (exactly one document per event), and the TTL
 * index.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "broker_fixture.h"
#include "emu_fixture.h"
#include "sinks/mongo_sink.h"

static bson_t *doc_of(mc_event_t *ev, const mc__mongo_projection_t *p)
{
    bson_t *d = bson_new();
    assert_int_equal(mc__mongo_sink_doc(ev, p, d, NULL), 0);
    return d;
}

static bool has(const bson_t *d, const char *path)
{
    bson_iter_t it, f;
    return bson_iter_init(&it, d) && bson_iter_find_descendant(&it, path, &f);
}

static void test_document_shape(void **state)
{
    (void)state;
    mc_event_t *ev = fx_event("orders", 1, 1700000000, 5, 0, "alice", 10);
    bson_t *d = doc_of(ev, NULL);
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, d, "_id"));
    assert_string_equal(bson_iter_utf8(&it, NULL), mc_event_id(ev));
    /* _id comes first, so the document reads like the event. */
    bson_iter_init(&it, d);
    bson_iter_next(&it);
    assert_string_equal(bson_iter_key(&it), "_id");
    const char *want[] = {"stream",
                          "type",
                          "ns.db",
                          "ns.coll",
                          "documentKey._id",
                          "recipient",
                          "clusterTime",
                          "change.operationType",
                          "change.fullDocument.owner"};
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        if (!has(d, want[k])) {
            fail_msg("no %s", want[k]);
        }
    }
    assert_true(bson_iter_init_find(&it, d, "clusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&it));
    /* The recipient is the value it was in the change (here the string), not its JSON. */
    assert_true(bson_iter_init_find(&it, d, "recipient") && BSON_ITER_HOLDS_UTF8(&it));
    assert_string_equal(bson_iter_utf8(&it, NULL), "alice");
    assert_false(has(d, "wallTime")); /* the test event has none */
    bson_destroy(d);

    /* A projection keeps only the listed paths of the change, nested as in the change. */
    bson_t *spec = BCON_NEW("operationType", BCON_INT32(1), "fullDocument.owner", BCON_BOOL(true),
                            "missing.path", BCON_INT32(1));
    mc__mongo_projection_t *p = mc__mongo_projection_new(spec, NULL);
    assert_non_null(p);
    d = doc_of(ev, p);
    assert_true(has(d, "change.operationType"));
    assert_true(has(d, "change.fullDocument.owner"));
    assert_false(has(d, "change.fullDocument.pad"));
    assert_false(has(d, "change.fullDocument._id"));
    assert_false(has(d, "change.missing"));
    assert_false(has(d, "change._id"));
    bson_destroy(d);
    mc__mongo_projection_destroy(p);
    bson_destroy(spec);
    mc_event_unref(&ev);

    /* Control events without an id have no place in the log. */
    ev = mc_event_new_control(MC_EVENT_RESET, "orders", 3, "x");
    bson_t out = BSON_INITIALIZER;
    mc_error_t err;
    assert_int_equal(mc__mongo_sink_doc(ev, NULL, &out, &err), MC_EINVAL);
    bson_destroy(&out);
    mc_event_unref(&ev);
}

static void test_option_errors(void **state)
{
    (void)state;
    const char *bad[] = {"{}",          "{\"a\": 0}",    "{\"a\": \"x\"}",
                         "{\"$a\": 1}", "{\"a..b\": 1}", "{\"a.\": 1}"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        bson_t *spec = bson_new_from_json((const uint8_t *)bad[k], -1, NULL);
        mc_error_t err;
        assert_null(mc__mongo_projection_new(spec, &err));
        assert_int_equal(err.code, MC_ECONFIG);
        bson_destroy(spec);
    }
    mc_error_t err;
    mongoc_write_concern_t *wc = mc__mongo_write_concern(NULL, 0, false, &err);
    assert_non_null(wc);
    assert_true(mongoc_write_concern_get_wmajority(wc));
    mongoc_write_concern_destroy(wc);
    wc = mc__mongo_write_concern("1", 5000, true, &err);
    assert_int_equal(mongoc_write_concern_get_w(wc), 1);
    assert_int_equal(mongoc_write_concern_get_wtimeout_int64(wc), 5000);
    assert_true(mongoc_write_concern_get_journal(wc));
    mongoc_write_concern_destroy(wc);
    assert_null(mc__mongo_write_concern("most", 0, false, &err));
    assert_null(mc__mongo_write_concern("51", 0, false, &err));
    assert_null(mc__mongo_write_concern("", 0, false, &err));
    assert_null(mc__mongo_write_concern("1", -1, false, &err));
}

static void test_classify(void **state)
{
    (void)state;
    bson_error_t e;
    memset(&e, 0, sizeof e);
    assert_int_equal(mc__mongo_classify(&e, NULL), MC__MONGO_OK);
    e.domain = MONGOC_ERROR_STREAM;
    e.code = MONGOC_ERROR_STREAM_SOCKET;
    assert_int_equal(mc__mongo_classify(&e, NULL), MC__MONGO_TRANSIENT);
    e.domain = MONGOC_ERROR_SERVER;
    e.code = 10107; /* NotWritablePrimary */
    assert_int_equal(mc__mongo_classify(&e, NULL), MC__MONGO_TRANSIENT);
    e.code = 121; /* DocumentValidationFailure */
    assert_int_equal(mc__mongo_classify(&e, NULL), MC__MONGO_PERMANENT);
    bson_t *reply = BCON_NEW("errorLabels", "[", "RetryableWriteError", "]");
    assert_int_equal(mc__mongo_classify(&e, reply), MC__MONGO_TRANSIENT);
    bson_destroy(reply);
    e.domain = MONGOC_ERROR_WRITE_CONCERN;
    e.code = 64;
    assert_int_equal(mc__mongo_classify(&e, NULL), MC__MONGO_TRANSIENT);
}

static void test_loop_guard(void **state)
{
    (void)state;
    mc__mongo_watch_t streams[] = {
        {"orders", "shop", "orders"}, {"shopdb", "shop", NULL}, {"all", NULL, NULL}};
    mc_error_t err;
    /* A collection stream on the sink's own collection, a database stream, a cluster stream. */
    assert_int_equal(mc__mongo_loop_check("log", "shop", "orders", true, streams, 1, &err),
                     MC_ECONFIG);
    assert_non_null(strstr(err.message, "stream orders watches"));
    assert_int_equal(mc__mongo_loop_check("log", "shop", "activity", true, streams, 1, &err), 0);
    assert_int_equal(mc__mongo_loop_check("log", "shop", "activity", true, streams, 2, &err),
                     MC_ECONFIG);
    assert_non_null(strstr(err.message, "shopdb"));
    assert_int_equal(mc__mongo_loop_check("log", "audit", "activity", true, streams, 2, &err), 0);
    assert_int_equal(mc__mongo_loop_check("log", "audit", "activity", true, streams, 3, &err),
                     MC_ECONFIG);
    /* Another cluster: no loop. */
    assert_int_equal(mc__mongo_loop_check("log", "shop", "orders", false, streams, 3, &err), 0);
}

/* ---- Against mongo-emulator ------------------------------------------------------------- */

typedef struct emu {
    pid_t pid;
    char uri[128];
    mongoc_client_t *client;
} emu_t;

static bool emu_start(emu_t *e)
{
    memset(e, 0, sizeof *e);
    if (!emu_fixture_find()) {
        return false;
    }
    e->pid = emu_fixture_start(e->uri, sizeof e->uri);
    if (e->pid <= 0) {
        return false;
    }
    fx_track(e->pid, true); /* killed at exit if a failed assertion skips emu_stop */
    e->client = mongoc_client_new(e->uri);
    return e->client != NULL;
}

static void emu_stop(emu_t *e)
{
    mongoc_client_destroy(e->client);
    fx_track(e->pid, false);
    emu_fixture_stop(e->pid);
}

static int64_t count(mongoc_collection_t *c)
{
    bson_t empty = BSON_INITIALIZER;
    int64_t n = mongoc_collection_count_documents(c, &empty, NULL, NULL, NULL, NULL);
    bson_destroy(&empty);
    return n;
}

/* What MongoDB does with a duplicate key in a bulk insert, which the sink relies on. */
static void test_emulator_ordered_insert_semantics(void **state)
{
    (void)state;
    emu_t e;
    if (!emu_start(&e)) {
        skip();
    }
    mongoc_collection_t *c = mongoc_client_get_collection(e.client, "t", "sem");
    for (int ordered = 1; ordered >= 0; ordered--) {
        mongoc_collection_drop(c, NULL);
        bson_t *first = BCON_NEW("_id", BCON_INT32(2));
        assert_true(mongoc_collection_insert_one(c, first, NULL, NULL, NULL));
        bson_destroy(first);
        bson_t *opts = BCON_NEW("ordered", BCON_BOOL(ordered));
        mongoc_bulk_operation_t *b = mongoc_collection_create_bulk_operation_with_opts(c, opts);
        for (int k = 0; k < 5; k++) {
            bson_t *d = BCON_NEW("_id", BCON_INT32(k));
            mongoc_bulk_operation_insert(b, d);
            bson_destroy(d);
        }
        bson_t reply;
        bson_error_t err;
        assert_int_equal(mongoc_bulk_operation_execute(b, &reply, &err), 0);
        bson_iter_t it, we;
        assert_true(bson_iter_init_find(&it, &reply, "nInserted"));
        /* Ordered: 0 and 1 went in, the batch stopped at _id 2. Unordered: 4 went in. */
        assert_int_equal(bson_iter_as_int64(&it), ordered ? 2 : 4);
        assert_true(bson_iter_init(&it, &reply) &&
                    bson_iter_find_descendant(&it, "writeErrors.0.code", &we));
        assert_int_equal(bson_iter_as_int64(&we), 11000);
        assert_true(bson_iter_init(&it, &reply) &&
                    bson_iter_find_descendant(&it, "writeErrors.0.index", &we));
        assert_int_equal(bson_iter_as_int64(&we), 2);
        assert_int_equal(count(c), ordered ? 3 : 5);
        bson_destroy(&reply);
        bson_destroy(opts);
        mongoc_bulk_operation_destroy(b);
    }
    mongoc_collection_destroy(c);
    emu_stop(&e);
}

static void test_insert_replay_exactly_once(void **state)
{
    (void)state;
    emu_t e;
    if (!emu_start(&e)) {
        skip();
    }
    mongoc_collection_t *c = mongoc_client_get_collection(e.client, "t", "activity");
    enum { N = 600 };
    mc_event_t *evs[N];
    bson_t *docs[N];
    for (int k = 0; k < N; k++) {
        evs[k] = fx_event("orders", (uint64_t)k + 1, 1700000000u + (uint32_t)k / 100,
                          (uint32_t)k % 100 + 1, 0, k % 2 ? "alice" : "bob", 50);
        docs[k] = doc_of(evs[k], NULL);
    }
    mongoc_write_concern_t *wc = mc__mongo_write_concern(NULL, 0, false, NULL);
    mc__mongo_insert_result_t res;
    mc__mongo_outcome_t out[N];
    assert_int_equal(
        mc__mongo_insert_ordered(c, (const bson_t *const *)docs, 400, wc, out, &res, NULL), 0);
    assert_int_equal(res.written, 400);
    assert_int_equal(res.round_trips, 1);
    /* A replay from event 250 to the end (as after a crash): 150 duplicates, 200 new. */
    assert_int_equal(mc__mongo_insert_ordered(c, (const bson_t *const *)docs + 250, N - 250, wc,
                                              out, &res, NULL),
                     0);
    assert_int_equal(res.duplicates, 150);
    assert_int_equal(res.written, 200);
    assert_true(res.round_trips <= 3); /* not one per duplicate */
    for (int k = 0; k < N - 250; k++) {
        assert_int_equal(out[k], k < 150 ? MC__MONGO_DUPLICATE : MC__MONGO_WRITTEN);
    }
    assert_int_equal(count(c), N);
    /* Duplicates scattered in a batch (some events written by an earlier partial attempt). */
    mongoc_collection_t *c2 = mongoc_client_get_collection(e.client, "t", "scattered");
    const bson_t *some[] = {docs[3], docs[10], docs[11], docs[50]};
    assert_int_equal(mc__mongo_insert_ordered(c2, some, 4, wc, NULL, &res, NULL), 0);
    assert_int_equal(
        mc__mongo_insert_ordered(c2, (const bson_t *const *)docs, 60, wc, out, &res, NULL), 0);
    assert_int_equal(res.duplicates, 4);
    assert_int_equal(res.written, 56);
    assert_int_equal(out[10], MC__MONGO_DUPLICATE);
    assert_int_equal(out[12], MC__MONGO_WRITTEN);
    assert_int_equal(count(c2), 60);
    /* A document the server refuses: the batch stops there, earlier ones are in. */
    mongoc_collection_t *c3 = mongoc_client_get_collection(e.client, "t", "refused");
    bson_t *bad = BCON_NEW("_id", "[", BCON_INT32(1), "]"); /* an array _id is invalid */
    const bson_t *mix[] = {docs[0], docs[1], bad, docs[2]};
    mc_error_t err;
    int rc = mc__mongo_insert_ordered(c3, mix, 4, wc, out, &res, &err);
    assert_int_equal(rc, MC_ESERVER);
    assert_true(res.failed);
    assert_int_equal(res.failed_index, 2);
    assert_int_equal(res.cls, MC__MONGO_PERMANENT);
    assert_int_equal(out[0], MC__MONGO_WRITTEN);
    assert_int_equal(out[2], MC__MONGO_FAILED);
    assert_int_equal(out[3], MC__MONGO_NOT_TRIED);
    assert_int_equal(count(c3), 2);
    bson_destroy(bad);
    mongoc_collection_destroy(c3);
    mongoc_collection_destroy(c2);
    mongoc_write_concern_destroy(wc);
    for (int k = 0; k < N; k++) {
        bson_destroy(docs[k]);
        mc_event_unref(&evs[k]);
    }
    mongoc_collection_destroy(c);
    emu_stop(&e);
}

static void test_ttl_index(void **state)
{
    (void)state;
    emu_t e;
    if (!emu_start(&e)) {
        skip();
    }
    mongoc_collection_t *c = mongoc_client_get_collection(e.client, "t", "ttl");
    mc_error_t err;
    assert_int_equal(mc__mongo_ensure_ttl_index(c, 2592000, &err), 0);
    assert_int_equal(mc__mongo_ensure_ttl_index(c, 2592000, &err), 0); /* idempotent */
    mongoc_cursor_t *cur = mongoc_collection_find_indexes_with_opts(c, NULL);
    const bson_t *ix;
    bool found = false;
    while (mongoc_cursor_next(cur, &ix)) {
        bson_iter_t it;
        if (bson_iter_init_find(&it, ix, "name") &&
            strcmp(bson_iter_utf8(&it, NULL), MC__MONGO_TTL_INDEX) == 0) {
            found = true;
            assert_true(bson_iter_init_find(&it, ix, "expireAfterSeconds"));
            assert_int_equal(bson_iter_as_int64(&it), 2592000);
            assert_true(bson_iter_init(&it, ix) &&
                        bson_iter_find_descendant(&it, "key.wallTime", &it));
        }
    }
    mongoc_cursor_destroy(cur);
    assert_true(found);
    /* Another expiry for the same index is a conflict, reported, not applied. */
    assert_int_equal(mc__mongo_ensure_ttl_index(c, 60, &err), MC_ECONFIG);
    assert_int_equal(mc__mongo_ensure_ttl_index(c, 0, &err), MC_ECONFIG);
    mongoc_collection_destroy(c);
    emu_stop(&e);
}

int main(void)
{
    mongoc_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_document_shape),
        cmocka_unit_test(test_option_errors),
        cmocka_unit_test(test_classify),
        cmocka_unit_test(test_loop_guard),
        cmocka_unit_test(test_emulator_ordered_insert_semantics),
        cmocka_unit_test(test_insert_replay_exactly_once),
        cmocka_unit_test(test_ttl_index),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mongoc_cleanup();
    return rc;
}
