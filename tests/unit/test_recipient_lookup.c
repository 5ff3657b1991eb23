/*
 * test_recipient_lookup.c: the lookup form of `recipient` (src/lib/recipient_lookup.c).
 *
 * The cache alone (LRU bound, TTL expiry, cached misses, typed keys), then the engine end to
 * end against mongo-emulator (spawned per test by emu_fixture.h; skipped when the binary is
 * missing): inventory_items.owned_by -> businesses._id -> owner for inserts,
 * updates and deletes (pre-image), numeric and ObjectId keys, misses, values that are not
 * keys (an operator-looking document stored in the item), the TTL cache's staleness, and
 * cache_size 0. Main thread plus the engine's threads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mongoc/mongoc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "mongocast.h"
#include "recipient_lookup.h"

/* ---- Cache ------------------------------------------------------------------------------ */

static bson_value_t str_value(const char *s)
{
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = (char *)s;
    v.value.v_utf8.len = (uint32_t)strlen(s);
    return v;
}

static bson_value_t int_value(int32_t i)
{
    bson_value_t v = {.value_type = BSON_TYPE_INT32};
    v.value.v_int32 = i;
    return v;
}

static const char *get(mc__recipient_lookup_t *l, bson_value_t k, int64_t now)
{
    const char *r = NULL;
    if (!mc__lookup_cache_get(l, &k, now, &r)) {
        return "(absent)";
    }
    return r ? r : "(miss)";
}

static void test_cache_lru_and_ttl(void **state)
{
    (void)state;
    mc_recipient_lookup_t cfg = {.db = (char *)"shop",
                                 .collection = (char *)"b",
                                 .field = (char *)"_id",
                                 .recipient = (char *)"owner",
                                 .cache_size = 2};
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s");
    assert_string_equal(get(l, str_value("a"), 0), "(absent)");
    mc__recipient_lookup_destroy(l);

    l = mc__recipient_lookup_new(&cfg, "s");
    bson_value_t a = str_value("a"), b = str_value("b"), c = str_value("c");
    mc__lookup_cache_put(l, &a, "alice", 1000, 100);
    mc__lookup_cache_put(l, &b, NULL, 1000, 50);
    assert_int_equal(mc__lookup_cache_len(l), 2);
    assert_string_equal(get(l, a, 1010), "alice");
    assert_string_equal(get(l, b, 1010), "(miss)");
    /* a was used after b: adding c evicts b, the least recently used. */
    assert_string_equal(get(l, a, 1020), "alice");
    mc__lookup_cache_put(l, &c, "carol", 1030, 100);
    assert_int_equal(mc__lookup_cache_len(l), 2);
    assert_string_equal(get(l, b, 1030), "(absent)");
    assert_string_equal(get(l, a, 1030), "alice");
    assert_string_equal(get(l, c, 1030), "carol");
    /* TTL: valid before 1000 + 100, gone at it (and removed). */
    assert_string_equal(get(l, a, 1099), "alice");
    assert_string_equal(get(l, a, 1100), "(absent)");
    assert_int_equal(mc__lookup_cache_len(l), 1);
    /* A put refreshes value and expiry. */
    mc__lookup_cache_put(l, &c, "carl", 1120, 100);
    assert_string_equal(get(l, c, 1200), "carl");
    assert_int_equal(mc__lookup_cache_len(l), 1);
    /* Typed keys: 5 and "5" are different values. */
    bson_value_t five = int_value(5), sfive = str_value("5");
    mc__lookup_cache_put(l, &five, "int-owner", 1200, 100);
    assert_string_equal(get(l, sfive, 1200), "(absent)");
    assert_string_equal(get(l, five, 1200), "int-owner");
    mc__recipient_lookup_destroy(l);

    /* cache_size 0: nothing is kept. */
    cfg.cache_size = 0;
    l = mc__recipient_lookup_new(&cfg, "s");
    mc__lookup_cache_put(l, &a, "alice", 0, 1000);
    assert_int_equal(mc__lookup_cache_len(l), 0);
    assert_string_equal(get(l, a, 1), "(absent)");
    mc__recipient_lookup_destroy(l);

    /* Many keys through a small cache stay bounded. */
    cfg.cache_size = 16;
    l = mc__recipient_lookup_new(&cfg, "s");
    for (int i = 0; i < 1000; i++) {
        bson_value_t k = int_value(i);
        mc__lookup_cache_put(l, &k, "o", i, 1000000);
        assert_true(mc__lookup_cache_len(l) <= 16);
    }
    assert_string_equal(get(l, int_value(999), 1000), "o");
    assert_string_equal(get(l, int_value(984), 1000), "o");
    assert_string_equal(get(l, int_value(983), 1000), "(absent)");
    mc__recipient_lookup_destroy(l);
}

/* ---- Engine against the emulator --------------------------------------------------------- */

typedef struct fixture {
    pid_t emu;
    char uri[256];
    mongoc_client_t *cli;
    bson_t *pipeline;
    mc_recipient_lookup_t lookup;
    mc_stream_config_t stream;
    mc_sink_config_t sink;
    mc_config_t cfg;
    mc_engine_t *engine;
} fixture_t;

static int setup(void **state)
{
    *state = NULL;
    if (!emu_fixture_path[0]) {
        return 0;
    }
    fixture_t *f = calloc(1, sizeof(*f));
    f->emu = emu_fixture_start(f->uri, sizeof(f->uri));
    if (f->emu < 0) {
        free(f);
        return -1;
    }
    f->cli = mongoc_client_new(f->uri);
    f->pipeline = bson_new();
    f->lookup = (mc_recipient_lookup_t){.db = (char *)"shop",
                                        .collection = (char *)"businesses",
                                        .field = (char *)"_id",
                                        .recipient = (char *)"owner",
                                        .cache_size = 100};
    f->stream = (mc_stream_config_t){
        .name = (char *)"items",
        .db = (char *)"shop",
        .collection = (char *)"inventory_items",
        .pipeline = f->pipeline,
        .full_document = MC_FULL_DOCUMENT_UPDATE_LOOKUP,
        .full_document_before_change = MC_BEFORE_CHANGE_WHEN_AVAILABLE,
        .recipient = (char *)"fullDocument.owned_by",
        .lookup = &f->lookup,
        .max_await_time_ms = 200,
    };
    f->sink = (mc_sink_config_t){.name = (char *)"mem",
                                 .type = (char *)"memory",
                                 .options = BCON_NEW("control", BCON_BOOL(false))};
    f->cfg = (mc_config_t){.mongodb_uri = f->uri,
                           .streams = &f->stream,
                           .n_streams = 1,
                           .sinks = &f->sink,
                           .n_sinks = 1};
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f) {
        return 0;
    }
    mc_engine_destroy(f->engine);
    mongoc_client_destroy(f->cli);
    bson_destroy(f->pipeline);
    bson_destroy(f->sink.options);
    emu_fixture_stop(f->emu);
    free(f);
    return 0;
}

#define NEED_EMULATOR()                                                                            \
    fixture_t *f = *state;                                                                         \
    if (!f) {                                                                                      \
        skip();                                                                                    \
    }

static void command(fixture_t *f, bson_t *c)
{
    bson_error_t e;
    bson_t reply;
    bool ok = mongoc_client_command_simple(f->cli, "shop", c, NULL, &reply, &e);
    bson_destroy(&reply);
    bson_destroy(c);
    if (!ok) {
        fail_msg("command failed: %s", e.message);
    }
}

static void insert_json(fixture_t *f, const char *coll, const char *json)
{
    bson_error_t e;
    bson_t *doc = bson_new_from_json((const uint8_t *)json, -1, &e);
    assert_non_null(doc);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_insert_one(c, doc, NULL, NULL, &e);
    bson_destroy(doc);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("insert failed: %s", e.message);
    }
}

static void update_json(fixture_t *f, const char *coll, const char *q, const char *u)
{
    bson_error_t e;
    bson_t *qd = bson_new_from_json((const uint8_t *)q, -1, &e);
    bson_t *ud = bson_new_from_json((const uint8_t *)u, -1, &e);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_update_one(c, qd, ud, NULL, NULL, &e);
    bson_destroy(qd);
    bson_destroy(ud);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("update failed: %s", e.message);
    }
}

static void delete_json(fixture_t *f, const char *coll, const char *q)
{
    bson_error_t e;
    bson_t *qd = bson_new_from_json((const uint8_t *)q, -1, &e);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_delete_one(c, qd, NULL, NULL, &e);
    bson_destroy(qd);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("delete failed: %s", e.message);
    }
}

static void start(fixture_t *f)
{
    command(f, BCON_NEW("create", "inventory_items", "changeStreamPreAndPostImages", "{", "enabled",
                        BCON_BOOL(true), "}"));
    insert_json(f, "businesses",
                "{\"_id\":{\"$oid\":\"650000000000000000000001\"},\"owner\":\"alice\"}");
    insert_json(f, "businesses", "{\"_id\":7,\"owner\":\"bob\"}");
    insert_json(f, "businesses", "{\"_id\":\"c\",\"owner\":42}");
    insert_json(f, "businesses", "{\"_id\":\"noowner\",\"name\":\"x\"}");
    mc_engine_opts_t opts = {.no_checkpoint = true};
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    if (!f->engine) {
        fail_msg("engine_new: %s", err.message);
    }
    if (mc_engine_start(f->engine, &err) != 0) {
        fail_msg("engine_start: %s", err.message);
    }
    for (int i = 0; i < 500 && !mc_engine_ready(f->engine); i++) {
        usleep(10000);
    }
    assert_true(mc_engine_ready(f->engine));
}

/* "op:recipient" of the i-th event ("-" when it has none). */
static const char *at(mc_sink_t *m, size_t i, char *buf)
{
    mc_event_t *ev = mc_sink_memory_get(m, i);
    if (!ev) {
        return "(none)";
    }
    const char *op = mc_event_operation_type(ev);
    const char *r = mc_event_recipient(ev);
    snprintf(buf, 128, "%s:%s", op ? op : "?", r ? r : "-");
    mc_event_unref(&ev);
    return buf;
}

static void test_lookup_routes_events(void **state)
{
    NEED_EMULATOR();
    char b[128];
    start(f);
    mc_sink_t *m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items",
                "{\"_id\":1,\"owned_by\":{\"$oid\":\"650000000000000000000001\"}}");
    insert_json(f, "inventory_items", "{\"_id\":2,\"owned_by\":7}");
    insert_json(f, "inventory_items", "{\"_id\":3,\"owned_by\":\"c\"}");
    insert_json(f, "inventory_items", "{\"_id\":4,\"owned_by\":\"unknown\"}");
    insert_json(f, "inventory_items", "{\"_id\":5}");
    insert_json(f, "inventory_items", "{\"_id\":6,\"owned_by\":\"noowner\"}");
    /* Documents and arrays are never used as keys: an operator-looking document such as
     * {"$ne": null} would otherwise match the first business (libmongoc refuses to insert
     * '$' keys by default, so it is nested one level here), an array any element. */
    insert_json(f, "inventory_items", "{\"_id\":8,\"owned_by\":{\"x\":{\"$ne\":null}}}");
    insert_json(f, "inventory_items", "{\"_id\":9,\"owned_by\":[7]}");
    /* "7" is not 7. */
    insert_json(f, "inventory_items", "{\"_id\":10,\"owned_by\":\"7\"}");
    update_json(f, "inventory_items", "{\"_id\":1}", "{\"$set\":{\"qty\":3}}");
    delete_json(f, "inventory_items", "{\"_id\":2}");
    assert_int_equal(mc_sink_memory_wait(m, 11, 10000), 0);
    assert_string_equal(at(m, 0, b), "insert:alice");
    assert_string_equal(at(m, 1, b), "insert:bob");
    assert_string_equal(at(m, 2, b), "insert:42");
    assert_string_equal(at(m, 3, b), "insert:-");
    assert_string_equal(at(m, 4, b), "insert:-");
    assert_string_equal(at(m, 5, b), "insert:-");
    assert_string_equal(at(m, 6, b), "insert:-");
    assert_string_equal(at(m, 7, b), "insert:-");
    assert_string_equal(at(m, 8, b), "insert:-");
    assert_string_equal(at(m, 9, b), "update:alice");
    /* The delete has no fullDocument: owned_by comes from the pre-image. */
    assert_string_equal(at(m, 10, b), "delete:bob");
    /* The §4.3 message carries the looked-up recipient, not the reference. */
    mc_event_t *ev = mc_sink_memory_get(m, 0);
    bson_error_t e;
    bson_t *msg = bson_new_from_json((const uint8_t *)mc_event_json(ev, NULL), -1, &e);
    mc_event_unref(&ev);
    assert_non_null(msg);
    bson_iter_t it;
    bool found = bson_iter_init_find(&it, msg, "recipient") && BSON_ITER_HOLDS_UTF8(&it) &&
                 strcmp(bson_iter_utf8(&it, NULL), "alice") == 0;
    bson_destroy(msg);
    assert_true(found);
}

static void test_cache_ttl_staleness_and_no_cache(void **state)
{
    NEED_EMULATOR();
    char b[128];
    start(f);
    mc_sink_t *m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items", "{\"_id\":1,\"owned_by\":7}");
    assert_int_equal(mc_sink_memory_wait(m, 1, 10000), 0);
    /* Ownership moves; within the TTL the cached owner still routes (documented). */
    update_json(f, "businesses", "{\"_id\":7}", "{\"$set\":{\"owner\":\"carol\"}}");
    insert_json(f, "inventory_items", "{\"_id\":2,\"owned_by\":7}");
    assert_int_equal(mc_sink_memory_wait(m, 2, 10000), 0);
    assert_string_equal(at(m, 0, b), "insert:bob");
    assert_string_equal(at(m, 1, b), "insert:bob");
    mc_engine_destroy(f->engine);
    f->engine = NULL;

    /* cache_size 0: every event asks MongoDB, so the change is seen at once. */
    f->lookup.cache_size = 0;
    mc_engine_opts_t opts = {.no_checkpoint = true};
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    assert_non_null(f->engine);
    assert_int_equal(mc_engine_start(f->engine, &err), 0);
    for (int i = 0; i < 500 && !mc_engine_ready(f->engine); i++) {
        usleep(10000);
    }
    m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items", "{\"_id\":3,\"owned_by\":7}");
    assert_int_equal(mc_sink_memory_wait(m, 1, 10000), 0);
    assert_string_equal(at(m, 0, b), "insert:carol");
    update_json(f, "businesses", "{\"_id\":7}", "{\"$set\":{\"owner\":\"dave\"}}");
    insert_json(f, "inventory_items", "{\"_id\":4,\"owned_by\":7}");
    assert_int_equal(mc_sink_memory_wait(m, 2, 10000), 0);
    assert_string_equal(at(m, 1, b), "insert:dave");
}

int main(void)
{
    emu_fixture_find();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_lru_and_ttl),
        cmocka_unit_test_setup_teardown(test_lookup_routes_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cache_ttl_staleness_and_no_cache, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
