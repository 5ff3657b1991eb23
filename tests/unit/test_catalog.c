/*
 * test_catalog.c: unit tests for mongo-emulator's catalog (catalog.c): the _id hash under
 * heavy insert/delete/compaction, numeric _id equality (1 == 1L == 1.0), unique secondary
 * indexes (compound, sparse, E11000 text and keyPattern/keyValue), index management errors,
 * and rename/drop keeping collection UUIDs. Single-threaded cmocka tests over a server state
 * that is initialised but never listens.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core.h"

static int setup(void **state)
{
    emu_server_t *srv = emu_zalloc_aligned(sizeof(*srv));
    emu_options_t opts;
    mc_error_t err;

    memset(&opts, 0, sizeof(opts));
    opts.oplog_max_events = 1000;
    if (emu_server_init(srv, &opts, &err) != 0) {
        free(srv);
        return -1;
    }
    *state = srv;
    return 0;
}

static int teardown(void **state)
{
    emu_server_t *srv = *state;
    emu_server_cleanup(srv);
    free(srv);
    return 0;
}

static bson_value_t int_value(int64_t v, int kind)
{
    bson_value_t val;
    memset(&val, 0, sizeof(val));
    if (kind == 0) {
        val.value_type = BSON_TYPE_INT32;
        val.value.v_int32 = (int32_t)v;
    } else if (kind == 1) {
        val.value_type = BSON_TYPE_INT64;
        val.value.v_int64 = v;
    } else {
        val.value_type = BSON_TYPE_DOUBLE;
        val.value.v_double = (double)v;
    }
    return val;
}

static int insert_id(emu_coll_t *c, int64_t id, int kind, mc_error_t *err)
{
    bson_t doc = BSON_INITIALIZER;
    bson_value_t v = int_value(id, kind);
    int rc;
    bson_append_value(&doc, "_id", 3, &v);
    BSON_APPEND_UTF8(&doc, "pad", "some payload to make documents differ in size");
    rc = emu_coll_insert(c, &doc, NULL, err);
    bson_destroy(&doc);
    return rc;
}

static void test_id_hash_under_churn(void **state)
{
    emu_server_t *srv = *state;
    mc_error_t err;
    emu_coll_t *c = emu_catalog_create(srv, "db", "churn", NULL, &err);
    enum { N = 6000 };
    static bool live[N];
    uint64_t rng = 12345;

    assert_non_null(c);
    for (int64_t i = 0; i < N; i++) {
        assert_int_equal(insert_id(c, i, (int)(i % 3), &err), 0);
        live[i] = true;
    }
    assert_int_equal(c->n_live, N);
    /* 1, 1L and 1.0 are the same _id */
    assert_int_equal(insert_id(c, 17, 2, &err), MC_EINVAL);
    assert_int_equal(err.cause, 11000);
    assert_string_equal(err.message,
                        "E11000 duplicate key error collection: db.churn index: _id_ dup key: "
                        "{ _id: 17 }");
    /* delete about 70% in a scattered order */
    for (int round = 0; round < 3 * N; round++) {
        long slot;
        bson_value_t v;
        int64_t id;
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        id = (int64_t)((rng >> 33) % N);
        if (!live[id] || (rng >> 20) % 10 >= 7) {
            continue;
        }
        v = int_value(id, (int)((rng >> 40) % 3));
        slot = emu_coll_find_id(c, &v);
        assert_true(slot >= 0);
        emu_coll_delete(c, (size_t)slot);
        live[id] = false;
    }
    for (int pass = 0; pass < 2; pass++) {
        size_t n_live = 0;
        for (int64_t i = 0; i < N; i++) {
            bson_value_t v = int_value(i, (int)((i + pass) % 3));
            long slot = emu_coll_find_id(c, &v);
            if (live[i]) {
                bson_t doc;
                bson_iter_t it;
                assert_true(slot >= 0);
                emu_doc_view(&c->docs[slot], &doc);
                assert_true(bson_iter_init_find(&it, &doc, "_id"));
                assert_int_equal(bson_iter_as_int64(&it), i);
                n_live++;
            } else {
                assert_int_equal(slot, -1);
            }
        }
        assert_int_equal(n_live, c->n_live);
        emu_coll_maybe_compact(c); /* the second pass checks the rebuilt index */
    }
    assert_int_equal(c->n_slots, c->n_live);
    /* deleted ids are free again, live ones are still taken */
    for (int64_t i = 0; i < N; i++) {
        int rc = insert_id(c, i, 1, &err);
        assert_int_equal(rc, live[i] ? MC_EINVAL : 0);
    }
    assert_int_equal(c->n_live, N);
    /* insertion order survives compaction: slot order is ascending for the kept documents */
    {
        int64_t prev = -1;
        for (size_t s = 0; s < c->n_slots; s++) {
            bson_t doc;
            bson_iter_t it;
            int64_t id;
            emu_doc_view(&c->docs[s], &doc);
            bson_iter_init_find(&it, &doc, "_id");
            id = bson_iter_as_int64(&it);
            if (live[id]) {
                assert_true(id > prev);
                prev = id;
            }
        }
    }
}

static void test_unique_compound_sparse(void **state)
{
    emu_server_t *srv = *state;
    mc_error_t err;
    emu_coll_t *c = emu_catalog_create(srv, "db", "uniq", NULL, &err);
    bson_t *spec = BCON_NEW("key", "{", "a", BCON_INT32(1), "b", BCON_INT32(1), "}", "name",
                            "a_1_b_1", "unique", BCON_BOOL(true), "sparse", BCON_BOOL(true));
    bson_t *d1 = BCON_NEW("_id", BCON_INT32(1), "a", BCON_INT32(1), "b", "x");
    bson_t *d2 = BCON_NEW("_id", BCON_INT32(2), "a", BCON_DOUBLE(1.0), "b", "x");
    bson_t *d3 = BCON_NEW("_id", BCON_INT32(3), "other", BCON_INT32(1));
    bson_t *d4 = BCON_NEW("_id", BCON_INT32(4), "other", BCON_INT32(2));
    bson_t *d5 = BCON_NEW("_id", BCON_INT32(5), "a", BCON_INT32(1), "b", "y");
    bson_t *d5moved = BCON_NEW("_id", BCON_INT32(5), "a", BCON_INT32(1), "b", "x");
    bson_t *d1moved = BCON_NEW("_id", BCON_INT32(1), "a", BCON_INT32(2), "b", "x");
    bson_t dup = BSON_INITIALIZER;
    bool added;
    bson_iter_t it;
    long slot5;

    assert_non_null(c);
    assert_int_equal(emu_coll_add_index(c, spec, &added, &err), 0);
    assert_true(added);
    assert_int_equal(emu_coll_add_index(c, spec, &added, &err), 0);
    assert_false(added);
    assert_int_equal(emu_coll_insert(c, d1, NULL, &err), 0);
    assert_int_equal(emu_coll_insert(c, d2, &dup, &err), MC_EINVAL);
    assert_int_equal(err.cause, 11000);
    assert_string_equal(err.message, "E11000 duplicate key error collection: db.uniq index: "
                                     "a_1_b_1 dup key: { a: 1, b: \"x\" }");
    assert_true(bson_iter_init_find(&it, &dup, "keyPattern"));
    assert_true(bson_iter_init_find(&it, &dup, "keyValue"));
    /* sparse: documents without any key field are not indexed, so they never collide */
    assert_int_equal(emu_coll_insert(c, d3, NULL, &err), 0);
    assert_int_equal(emu_coll_insert(c, d4, NULL, &err), 0);
    assert_int_equal(emu_coll_insert(c, d5, NULL, &err), 0);
    /* a replacement into a taken key fails and leaves the document alone */
    {
        bson_value_t five = int_value(5, 0);
        bson_t now;
        slot5 = emu_coll_find_id(c, &five);
        assert_true(slot5 >= 0);
        assert_int_equal(emu_coll_replace(c, (size_t)slot5, d5moved, NULL, &err), MC_EINVAL);
        assert_int_equal(err.cause, 11000);
        emu_doc_view(&c->docs[slot5], &now);
        assert_true(bson_equal(&now, d5));
    }
    /* moving d1 away frees its key for d5 */
    {
        bson_value_t one = int_value(1, 0);
        long slot1 = emu_coll_find_id(c, &one);
        assert_int_equal(emu_coll_replace(c, (size_t)slot1, d1moved, NULL, &err), 0);
        assert_int_equal(emu_coll_replace(c, (size_t)slot5, d5moved, NULL, &err), 0);
    }
    bson_destroy(&dup);
    bson_destroy(spec);
    bson_destroy(d1);
    bson_destroy(d2);
    bson_destroy(d3);
    bson_destroy(d4);
    bson_destroy(d5);
    bson_destroy(d5moved);
    bson_destroy(d1moved);
}

static void test_index_management_errors(void **state)
{
    emu_server_t *srv = *state;
    mc_error_t err;
    emu_coll_t *c = emu_catalog_create(srv, "db", "ix", NULL, &err);
    bson_t *d1 = BCON_NEW("_id", BCON_INT32(1), "k", BCON_INT32(7));
    bson_t *d2 = BCON_NEW("_id", BCON_INT32(2), "k", BCON_INT32(7));
    bson_t *uniq =
        BCON_NEW("key", "{", "k", BCON_INT32(1), "}", "name", "k_1", "unique", BCON_BOOL(true));
    bson_t *plain = BCON_NEW("key", "{", "k", BCON_INT32(1), "}", "name", "k_1");
    bson_t *renamed = BCON_NEW("key", "{", "k", BCON_INT32(1), "}", "name", "other");
    bson_t *samename = BCON_NEW("key", "{", "z", BCON_INT32(1), "}", "name", "k_1");
    bson_t *nokey = BCON_NEW("name", "x");
    bool added;

    assert_int_equal(emu_coll_insert(c, d1, NULL, &err), 0);
    assert_int_equal(emu_coll_insert(c, d2, NULL, &err), 0);
    /* building a unique index over duplicates fails and leaves no index behind */
    assert_int_equal(emu_coll_add_index(c, uniq, &added, &err), MC_EINVAL);
    assert_int_equal(err.cause, 11000);
    assert_int_equal(c->n_indexes, 1);
    assert_int_equal(emu_coll_add_index(c, plain, &added, &err), 0);
    assert_true(added);
    assert_int_equal(c->n_indexes, 2);
    assert_int_equal(emu_coll_add_index(c, renamed, &added, &err), MC_EINVAL);
    assert_int_equal(err.cause, 85);
    assert_int_equal(emu_coll_add_index(c, samename, &added, &err), MC_EINVAL);
    assert_int_equal(err.cause, 86);
    assert_int_equal(emu_coll_add_index(c, nokey, &added, &err), MC_EINVAL);
    assert_int_equal(err.cause, 9);
    assert_int_equal(emu_coll_drop_index(c, "_id_", &err), MC_EINVAL);
    assert_int_equal(err.cause, 72);
    assert_int_equal(emu_coll_drop_index(c, "nope", &err), MC_EINVAL);
    assert_int_equal(err.cause, 27);
    assert_int_equal(emu_coll_drop_index(c, "k_1", &err), 0);
    assert_int_equal(c->n_indexes, 1);
    bson_destroy(d1);
    bson_destroy(d2);
    bson_destroy(uniq);
    bson_destroy(plain);
    bson_destroy(renamed);
    bson_destroy(samename);
    bson_destroy(nokey);
}

static void test_names_rename_drop(void **state)
{
    emu_server_t *srv = *state;
    mc_error_t err;
    uint8_t uuid_before[16], uuid_after[16];
    bson_t *doc = BCON_NEW("_id", "k", "v", BCON_INT32(1));
    bson_value_t key;
    emu_coll_t *a = emu_catalog_create(srv, "rdb", "a", NULL, &err);

    assert_non_null(a);
    assert_null(emu_catalog_create(srv, "rdb", "a", NULL, &err));
    assert_int_equal(err.cause, 48);
    assert_null(emu_catalog_create(srv, "bad.db", "a", NULL, &err));
    assert_int_equal(err.cause, 73);
    assert_null(emu_catalog_create(srv, "rdb", "x$y", NULL, &err));
    assert_int_equal(err.cause, 73);
    assert_null(emu_catalog_create(srv, "rdb", "", NULL, &err));
    assert_int_equal(err.cause, 73);
    assert_int_equal(emu_coll_insert(a, doc, NULL, &err), 0);
    assert_non_null(emu_catalog_create(srv, "rdb", "b", NULL, &err));
    assert_true(emu_catalog_collection_exists(srv, "rdb", "a", uuid_before));

    assert_int_equal(emu_catalog_rename(srv, "rdb", "missing", "rdb", "z", false, &err), MC_EINVAL);
    assert_int_equal(err.cause, 26);
    assert_int_equal(emu_catalog_rename(srv, "rdb", "a", "rdb", "b", false, &err), MC_EINVAL);
    assert_int_equal(err.cause, 48);
    assert_int_equal(emu_catalog_rename(srv, "rdb", "a", "rdb", "a", false, &err), MC_EINVAL);
    assert_int_equal(err.cause, 20);
    /* across databases, onto an existing target */
    assert_non_null(emu_catalog_create(srv, "other", "t", NULL, &err));
    assert_int_equal(emu_catalog_rename(srv, "rdb", "a", "other", "t", true, &err), 0);
    assert_false(emu_catalog_collection_exists(srv, "rdb", "a", NULL));
    assert_true(emu_catalog_collection_exists(srv, "other", "t", uuid_after));
    assert_memory_equal(uuid_before, uuid_after, 16);
    assert_string_equal(emu_catalog_coll(srv, "other", "t")->ns, "other.t");
    memset(&key, 0, sizeof(key));
    key.value_type = BSON_TYPE_UTF8;
    key.value.v_utf8.str = (char *)"k";
    key.value.v_utf8.len = 1;
    assert_non_null(emu_catalog_find_by_id(srv, "other", "t", &key));
    assert_null(emu_catalog_find_by_id(srv, "rdb", "a", &key));

    emu_catalog_drop_database(srv, "other");
    assert_null(emu_catalog_db(srv, "other"));
    assert_non_null(emu_catalog_db(srv, "rdb"));
    emu_catalog_drop(srv, "rdb", emu_catalog_coll(srv, "rdb", "b"));
    assert_null(emu_catalog_db(srv, "rdb")); /* a database exists only with collections */
    bson_destroy(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_id_hash_under_churn, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unique_compound_sparse, setup, teardown),
        cmocka_unit_test_setup_teardown(test_index_management_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_names_rename_drop, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
