/*
 * test_agg.c: mongo-emulator's aggregation (agg.c): each stage, expressions, $group
 * accumulators, error codes, per-document mode, find projections and sort order with
 * MongoDB's array rules. Single-threaded cmocka test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "agg.h"
#include "test_json.h"

/* Runs `pipeline` (a JSON array) over the documents of `docs` (a JSON array) and compares the
 * output with `want` (a JSON array). */
static void run(const char *pipeline, const char *docs, const char *want)
{
    char *w = bson_strdup_printf("{\"p\": %s, \"d\": %s, \"w\": %s}", pipeline, docs, want);
    bson_t *all = json(w);
    bson_free(w);
    bson_iter_t it, sub;
    bson_t p, d, wa;
    const uint8_t *data;
    uint32_t len;
    bson_iter_init_find(&it, all, "p");
    bson_iter_array(&it, &len, &data);
    bson_init_static(&p, data, len);
    bson_iter_init_find(&it, all, "d");
    bson_iter_array(&it, &len, &data);
    bson_init_static(&d, data, len);
    bson_iter_init_find(&it, all, "w");
    bson_iter_array(&it, &len, &data);
    bson_init_static(&wa, data, len);

    bson_t *in[64];
    size_t n = 0;
    bson_iter_init(&sub, &d);
    while (bson_iter_next(&sub) && n < 64) {
        bson_iter_document(&sub, &len, &data);
        in[n++] = bson_new_from_data(data, len);
    }
    mc_error_t err = {0};
    emu_pipeline_t *pl = emu_pipeline_new(&p, false, &err);
    if (!pl) {
        fail_msg("pipeline %s: %s", pipeline, err.message);
    }
    bson_t **out;
    size_t n_out;
    if (emu_pipeline_run(pl, (const bson_t *const *)in, n, &out, &n_out, &err) != 0) {
        fail_msg("pipeline %s failed: %s", pipeline, err.message);
    }
    bson_t got = BSON_INITIALIZER;
    for (size_t i = 0; i < n_out; i++) {
        char key[24];
        snprintf(key, sizeof(key), "%zu", i);
        bson_append_document(&got, key, -1, out[i]);
        bson_destroy(out[i]);
    }
    bson_free(out);
    if (!bson_equal(&got, &wa)) {
        char *g = bson_as_relaxed_extended_json(&got, NULL);
        fail_msg("pipeline %s\n  got  %s\n  want %s", pipeline, g, want);
    }
    bson_destroy(&got);
    emu_pipeline_destroy(pl);
    for (size_t i = 0; i < n; i++) {
        bson_destroy(in[i]);
    }
    bson_destroy(all);
}

static void expect_pipeline_error(const char *pipeline, bool per_doc, int cause, const char *msg)
{
    char *w = bson_strdup_printf("{\"p\": %s}", pipeline);
    bson_t *all = json(w);
    bson_free(w);
    bson_iter_t it;
    const uint8_t *data;
    uint32_t len;
    bson_t p;
    bson_iter_init_find(&it, all, "p");
    bson_iter_array(&it, &len, &data);
    bson_init_static(&p, data, len);
    mc_error_t err = {0};
    emu_pipeline_t *pl = emu_pipeline_new(&p, per_doc, &err);
    if (pl) {
        /* some errors only show when a document is evaluated */
        bson_t *doc = json("{\"_id\": 1, \"a\": 5, \"s\": \"x\"}");
        bson_t out;
        int rc = emu_pipeline_apply_one(pl, doc, &out, &err);
        bson_destroy(&out);
        bson_destroy(doc);
        emu_pipeline_destroy(pl);
        if (rc >= 0) {
            fail_msg("pipeline %s should fail", pipeline);
        }
    }
    if (err.cause != cause || !strstr(err.message, msg)) {
        fail_msg("pipeline %s: got %d '%s', want %d '%s'", pipeline, err.cause, err.message, cause,
                 msg);
    }
    assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
    bson_destroy(all);
}

static void test_match_project(void **state)
{
    const char *docs = "[{\"_id\": 1, \"a\": 1, \"b\": {\"c\": 2, \"d\": 3}}, "
                       "{\"_id\": 2, \"a\": 2, \"b\": {\"c\": 4, \"d\": 5}}]";
    run("[{\"$match\": {\"a\": {\"$gt\": 1}}}]", docs,
        "[{\"_id\": 2, \"a\": 2, \"b\": {\"c\": 4, \"d\": 5}}]");
    run("[{\"$project\": {\"a\": 1}}]", docs, "[{\"_id\": 1, \"a\": 1}, {\"_id\": 2, \"a\": 2}]");
    run("[{\"$project\": {\"a\": 1, \"_id\": 0}}]", docs, "[{\"a\": 1}, {\"a\": 2}]");
    run("[{\"$project\": {\"b.c\": 1}}]", docs,
        "[{\"_id\": 1, \"b\": {\"c\": 2}}, {\"_id\": 2, \"b\": {\"c\": 4}}]");
    run("[{\"$project\": {\"b\": {\"d\": 1}}}]", docs,
        "[{\"_id\": 1, \"b\": {\"d\": 3}}, {\"_id\": 2, \"b\": {\"d\": 5}}]");
    run("[{\"$project\": {\"b\": 0, \"_id\": 0}}]", docs, "[{\"a\": 1}, {\"a\": 2}]");
    run("[{\"$project\": {\"b.c\": 0}}]", docs,
        "[{\"_id\": 1, \"a\": 1, \"b\": {\"d\": 3}}, {\"_id\": 2, \"a\": 2, \"b\": {\"d\": 5}}]");
    /* computed fields come after the included ones */
    run("[{\"$project\": {\"x\": {\"$add\": [\"$a\", \"$b.c\"]}, \"a\": 1}}]", docs,
        "[{\"_id\": 1, \"a\": 1, \"x\": 3}, {\"_id\": 2, \"a\": 2, \"x\": 6}]");
    /* inclusion through arrays keeps only the documents' fields */
    run("[{\"$project\": {\"arr.x\": 1, \"_id\": 0}}]",
        "[{\"arr\": [{\"x\": 1, \"y\": 2}, 5, {\"y\": 3}]}]", "[{\"arr\": [{\"x\": 1}, {}]}]");
    run("[{\"$project\": {\"arr.x\": 0, \"_id\": 0}}]", "[{\"arr\": [{\"x\": 1, \"y\": 2}, 5]}]",
        "[{\"arr\": [{\"y\": 2}, 5]}]");
    run("[{\"$unset\": [\"b\", \"_id\"]}]", docs, "[{\"a\": 1}, {\"a\": 2}]");
    run("[{\"$unset\": \"b.d\"}]", "[{\"_id\": 1, \"b\": {\"c\": 2, \"d\": 3}}]",
        "[{\"_id\": 1, \"b\": {\"c\": 2}}]");
}

static void test_add_fields_replace(void **state)
{
    run("[{\"$addFields\": {\"b.e\": 9, \"a\": \"$$REMOVE\", \"z\": {\"$literal\": \"$x\"}}}]",
        "[{\"_id\": 1, \"a\": 1, \"b\": {\"c\": 2}}]",
        "[{\"_id\": 1, \"b\": {\"c\": 2, \"e\": 9}, \"z\": \"$x\"}]");
    run("[{\"$set\": {\"b\": {\"e\": 9}}}]", "[{\"_id\": 1, \"b\": {\"c\": 2}}]",
        "[{\"_id\": 1, \"b\": {\"c\": 2, \"e\": 9}}]");
    run("[{\"$set\": {\"a\": 2}}]", "[{\"_id\": 1, \"a\": 1, \"q\": 0}]",
        "[{\"_id\": 1, \"a\": 2, \"q\": 0}]");
    run("[{\"$set\": {\"arr.k\": 1}}]", "[{\"_id\": 1, \"arr\": [{\"j\": 0}, 7]}]",
        "[{\"_id\": 1, \"arr\": [{\"j\": 0, \"k\": 1}, {\"k\": 1}]}]");
    run("[{\"$replaceRoot\": {\"newRoot\": \"$sub\"}}]", "[{\"_id\": 1, \"sub\": {\"x\": 1}}]",
        "[{\"x\": 1}]");
    run("[{\"$replaceWith\": {\"id\": \"$_id\", \"whole\": \"$$ROOT\"}}]", "[{\"_id\": 1}]",
        "[{\"id\": 1, \"whole\": {\"_id\": 1}}]");
    expect_pipeline_error("[{\"$replaceWith\": \"$a\"}]", false, 40228,
                          "must evaluate to an object");
}

static void test_expressions(void **state)
{
    const char *docs = "[{\"_id\": 1, \"a\": 5, \"s\": \"ab\", \"arr\": [{\"v\": 1}, {\"v\": 2}], "
                       "\"n\": null, \"t\": {\"$date\": \"2020-01-02T03:04:05.006Z\"}}]";
    run("[{\"$project\": {\"_id\": 0, "
        "\"c\": {\"$concat\": [\"$s\", \"-\", {\"$toString\": \"$a\"}]}, "
        "\"nc\": {\"$concat\": [\"$s\", \"$missing\"]}, "
        "\"sum\": {\"$add\": [\"$a\", 1, 0.5]}, \"sub\": {\"$subtract\": [\"$a\", 7]}, "
        "\"mul\": {\"$multiply\": [\"$a\", 3]}, \"eq\": {\"$eq\": [\"$a\", 5.0]}, "
        "\"gt\": {\"$gt\": [\"$s\", 100]}, \"lt\": {\"$lt\": [\"$missing\", null]}, "
        "\"and\": {\"$and\": [1, \"$a\", true]}, \"or\": {\"$or\": [0, \"$n\"]}, "
        "\"not\": {\"$not\": [\"$n\"]}, "
        "\"cond\": {\"$cond\": {\"if\": {\"$gte\": [\"$a\", 5]}, \"then\": \"big\", \"else\": "
        "\"small\"}}, "
        "\"cond2\": {\"$cond\": [false, 1, 2]}, "
        "\"ifn\": {\"$ifNull\": [\"$n\", \"$missing\", \"dflt\"]}, "
        "\"vs\": \"$arr.v\", \"lit\": {\"$literal\": {\"$add\": 1}}, \"arrl\": [\"$a\", "
        "\"$missing\"], "
        "\"ts\": {\"$toString\": \"$t\"}, "
        "\"later\": {\"$add\": [\"$t\", 1000]}}}]",
        docs,
        "[{\"c\": \"ab-5\", \"nc\": null, \"sum\": 6.5, \"sub\": -2, \"mul\": 15, \"eq\": true, "
        "\"gt\": true, \"lt\": true, \"and\": true, \"or\": false, \"not\": true, "
        "\"cond\": \"big\", \"cond2\": 2, \"ifn\": \"dflt\", \"vs\": [1, 2], "
        "\"lit\": {\"$add\": 1}, \"arrl\": [5, null], \"ts\": \"2020-01-02T03:04:05.006Z\", "
        "\"later\": {\"$date\": \"2020-01-02T03:04:06.006Z\"}}]");
    expect_pipeline_error("[{\"$project\": {\"x\": {\"$nope\": 1}}}]", false, 168,
                          "Unrecognized expression '$nope'");
    expect_pipeline_error("[{\"$project\": {\"x\": {\"$concat\": [\"$a\"]}}}]", false, 16702,
                          "$concat only supports strings");
    expect_pipeline_error("[{\"$project\": {\"x\": {\"$add\": [\"$s\", 1]}}}]", false, 16554,
                          "$add only supports numeric or date types");
    expect_pipeline_error("[{\"$project\": {\"x\": \"$$nope\"}}]", false, 17276,
                          "Use of undefined variable: nope");
}

static void test_sort_skip_limit_count(void **state)
{
    const char *docs = "[{\"_id\": 1, \"a\": 3}, {\"_id\": 2, \"a\": [1, 9]}, {\"_id\": 3}, "
                       "{\"_id\": 4, \"a\": \"x\"}, {\"_id\": 5, \"a\": 2}]";
    /* ascending: missing (null) < 1 (min of [1,9]) < 2 < 3 < "x" */
    run("[{\"$sort\": {\"a\": 1}}, {\"$project\": {\"_id\": 1}}]", docs,
        "[{\"_id\": 3}, {\"_id\": 2}, {\"_id\": 5}, {\"_id\": 1}, {\"_id\": 4}]");
    /* descending: "x" > 9 (max of [1,9]) > 3 > 2 > null */
    run("[{\"$sort\": {\"a\": -1}}, {\"$project\": {\"_id\": 1}}]", docs,
        "[{\"_id\": 4}, {\"_id\": 2}, {\"_id\": 1}, {\"_id\": 5}, {\"_id\": 3}]");
    run("[{\"$sort\": {\"_id\": -1}}, {\"$skip\": 1}, {\"$limit\": 2}, {\"$project\": {\"_id\": "
        "1}}]",
        docs, "[{\"_id\": 4}, {\"_id\": 3}]");
    run("[{\"$match\": {\"a\": {\"$type\": \"number\"}}}, {\"$count\": \"n\"}]", docs,
        "[{\"n\": 3}]");
    run("[{\"$match\": {\"zzz\": 1}}, {\"$count\": \"n\"}]", docs, "[]");
    /* compound sort: ties on the first key broken by the second */
    run("[{\"$sort\": {\"g\": 1, \"v\": -1}}]",
        "[{\"g\": 1, \"v\": 1}, {\"g\": 0, \"v\": 5}, {\"g\": 1, \"v\": 2}]",
        "[{\"g\": 0, \"v\": 5}, {\"g\": 1, \"v\": 2}, {\"g\": 1, \"v\": 1}]");
}

static void test_group(void **state)
{
    const char *docs =
        "[{\"k\": \"a\", \"v\": 1, \"s\": \"x\"}, {\"k\": \"b\", \"v\": 2.5}, "
        "{\"k\": \"a\", \"v\": 3, \"s\": \"y\"}, {\"k\": \"a\", \"v\": \"str\", \"s\": \"x\"}, "
        "{\"v\": 4}]";
    run("[{\"$group\": {\"_id\": \"$k\", \"n\": {\"$sum\": 1}, \"total\": {\"$sum\": \"$v\"}, "
        "\"avg\": {\"$avg\": \"$v\"}, \"min\": {\"$min\": \"$v\"}, \"max\": {\"$max\": \"$v\"}, "
        "\"first\": {\"$first\": \"$s\"}, \"last\": {\"$last\": \"$s\"}, "
        "\"all\": {\"$push\": \"$s\"}, \"set\": {\"$addToSet\": \"$s\"}}}]",
        docs,
        "[{\"_id\": null, \"n\": 1, \"total\": 4, \"avg\": 4.0, \"min\": 4, \"max\": 4, "
        "\"first\": null, \"last\": null, \"all\": [], \"set\": []}, "
        "{\"_id\": \"a\", \"n\": 3, \"total\": 4, \"avg\": 2.0, \"min\": 1, \"max\": \"str\", "
        "\"first\": \"x\", \"last\": \"x\", \"all\": [\"x\", \"y\", \"x\"], \"set\": [\"x\", "
        "\"y\"]}, "
        "{\"_id\": \"b\", \"n\": 1, \"total\": 2.5, \"avg\": 2.5, \"min\": 2.5, \"max\": 2.5, "
        "\"first\": null, \"last\": null, \"all\": [], \"set\": []}]");
    run("[{\"$group\": {\"_id\": null, \"c\": {\"$sum\": 1}}}]", docs,
        "[{\"_id\": null, \"c\": 5}]");
    run("[{\"$group\": {\"_id\": {\"kk\": \"$k\"}, \"c\": {\"$sum\": 1}}}, {\"$sort\": {\"c\": "
        "-1}}]",
        "[{\"k\": 1}, {\"k\": 1.0}, {\"k\": 2}]",
        "[{\"_id\": {\"kk\": 1}, \"c\": 2}, {\"_id\": {\"kk\": 2}, \"c\": 1}]");
    expect_pipeline_error("[{\"$group\": {\"c\": {\"$sum\": 1}}}]", false, 15955,
                          "a group specification must include an _id");
    expect_pipeline_error("[{\"$group\": {\"_id\": 1, \"c\": {\"$median\": 1}}}]", false, 15952,
                          "unknown group operator '$median'");
}

static void test_stage_errors(void **state)
{
    expect_pipeline_error("[{\"$bogus\": {}}]", false, 40324,
                          "Unrecognized pipeline stage name: '$bogus'");
    expect_pipeline_error("[{\"$match\": {}, \"$project\": {\"a\": 1}}]", false, 40323,
                          "exactly one field");
    expect_pipeline_error("[{\"$sort\": {\"a\": 1}}]", true, 40324, "$sort");
    expect_pipeline_error("[{\"$group\": {\"_id\": 1}}]", true, 40324, "$group");
    expect_pipeline_error("[{\"$limit\": 0}]", false, 15958, "the limit must be positive");
    expect_pipeline_error("[{\"$skip\": -1}]", false, 15956, "non-negative");
    expect_pipeline_error("[{\"$sort\": {\"a\": 2}}]", false, 15975, "$sort key ordering");
    expect_pipeline_error("[{\"$count\": \"a.b\"}]", false, 40160, "cannot contain '.'");
    expect_pipeline_error("[{\"$project\": {\"a\": 1, \"b\": 0}}]", false, 31254,
                          "Cannot do exclusion on field b in inclusion projection");
    expect_pipeline_error("[{\"$project\": {}}]", false, 51272, "at least one field");
    expect_pipeline_error("[{\"$match\": {\"a\": {\"$foo\": 1}}}]", false, 2,
                          "unknown operator: $foo");
}

static void test_per_document(void **state)
{
    bson_t *stages = json("{\"0\": {\"$match\": {\"operationType\": \"insert\"}}, "
                          "\"1\": {\"$project\": {\"fullDocument.secret\": 0}}}");
    mc_error_t err;
    emu_pipeline_t *p = emu_pipeline_new(stages, true, &err);
    assert_non_null(p);
    bson_t *ev =
        json("{\"operationType\": \"insert\", \"fullDocument\": {\"a\": 1, \"secret\": 2}}");
    bson_t out;
    assert_int_equal(emu_pipeline_apply_one(p, ev, &out, &err), 1);
    bson_t *want = json("{\"operationType\": \"insert\", \"fullDocument\": {\"a\": 1}}");
    assert_true(bson_equal(&out, want));
    bson_destroy(&out);
    bson_destroy(ev);
    ev = json("{\"operationType\": \"delete\"}");
    assert_int_equal(emu_pipeline_apply_one(p, ev, &out, &err), 0);
    bson_destroy(&out);
    bson_destroy(ev);
    bson_destroy(want);
    emu_pipeline_destroy(p);
    bson_destroy(stages);
}

static void test_find_projection(void **state)
{
    bson_t *doc =
        json("{\"_id\": 1, \"a\": 1, \"b\": {\"c\": 2, \"d\": 3}, \"e\": [{\"f\": 1, \"g\": 2}]}");
    struct {
        const char *proj, *want;
    } cases[] = {
        {"{}",
         "{\"_id\": 1, \"a\": 1, \"b\": {\"c\": 2, \"d\": 3}, \"e\": [{\"f\": 1, \"g\": 2}]}"},
        {"{\"a\": 1}", "{\"_id\": 1, \"a\": 1}"},
        {"{\"a\": true, \"_id\": 0}", "{\"a\": 1}"},
        {"{\"_id\": 0}", "{\"a\": 1, \"b\": {\"c\": 2, \"d\": 3}, \"e\": [{\"f\": 1, \"g\": 2}]}"},
        {"{\"b.c\": 1, \"e.g\": 1}", "{\"_id\": 1, \"b\": {\"c\": 2}, \"e\": [{\"g\": 2}]}"},
        {"{\"b\": 0, \"e.f\": 0}", "{\"_id\": 1, \"a\": 1, \"e\": [{\"g\": 2}]}"},
        {"{\"_id\": 1}", "{\"_id\": 1}"},
        {"{\"x\": {\"$literal\": 5}, \"a\": 1}", "{\"_id\": 1, \"a\": 1, \"x\": 5}"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bson_t *p = json(cases[i].proj), out;
        mc_error_t err;
        if (emu_projection_check(p, &err) != 0) {
            fail_msg("projection %s: %s", cases[i].proj, err.message);
        }
        assert_int_equal(emu_projection_apply(p, doc, &out, &err), 0);
        bson_t *want = json(cases[i].want);
        if (!bson_equal(&out, want)) {
            char *g = bson_as_relaxed_extended_json(&out, NULL);
            fail_msg("projection %s: got %s want %s", cases[i].proj, g, cases[i].want);
        }
        bson_destroy(want);
        bson_destroy(&out);
        bson_destroy(p);
    }
    struct {
        const char *proj;
        int cause;
        const char *msg;
    } bad[] = {
        {"{\"a\": 1, \"b\": 0}", 31254, "Cannot do exclusion on field b in inclusion projection"},
        {"{\"a\": 0, \"b\": 1}", 31253, "Cannot do inclusion on field b in exclusion projection"},
        {"{\"a\": 1, \"a.b\": 1}", 31250, "Path collision at a.b"},
        {"{\"a\": {\"$slice\": 1}}", 2, "not supported"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        bson_t *p = json(bad[i].proj), out;
        mc_error_t err = {0};
        assert_int_equal(emu_projection_check(p, &err), MC_EINVAL);
        if (err.cause != bad[i].cause || !strstr(err.message, bad[i].msg)) {
            fail_msg("projection %s: got %d '%s'", bad[i].proj, err.cause, err.message);
        }
        assert_int_equal(emu_projection_apply(p, doc, &out, &err), MC_EINVAL);
        assert_true(bson_empty(&out));
        bson_destroy(&out);
        bson_destroy(p);
    }
    bson_destroy(doc);
}

static void test_sort_compare(void **state)
{
    bson_t *spec = json("{\"a\": 1}"), *rspec = json("{\"a\": -1}");
    bson_t *x = json("{\"a\": [1, 10]}"), *y = json("{\"a\": 5}"), *m = json("{}");
    bson_t *e = json("{\"a\": []}"), *nul = json("{\"a\": null}");
    assert_true(emu_sort_compare(spec, x, y) < 0);  /* 1 < 5 */
    assert_true(emu_sort_compare(rspec, x, y) < 0); /* 10 > 5 comes first descending */
    assert_true(emu_sort_compare(spec, m, y) < 0);  /* missing sorts as null */
    assert_int_equal(emu_sort_compare(spec, m, nul), 0);
    assert_true(emu_sort_compare(spec, e, nul) < 0); /* [] sorts before null */
    assert_int_equal(emu_sort_compare(spec, y, y), 0);
    bson_t *d1 = json("{\"a\": [{\"b\": 3}, {\"b\": 1}]}"), *d2 = json("{\"a\": {\"b\": 2}}");
    bson_t *ds = json("{\"a.b\": 1}");
    assert_true(emu_sort_compare(ds, d1, d2) < 0);
    bson_destroy(spec);
    bson_destroy(rspec);
    bson_destroy(x);
    bson_destroy(y);
    bson_destroy(m);
    bson_destroy(e);
    bson_destroy(nul);
    bson_destroy(d1);
    bson_destroy(d2);
    bson_destroy(ds);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_match_project), cmocka_unit_test(test_add_fields_replace),
        cmocka_unit_test(test_expressions),   cmocka_unit_test(test_sort_skip_limit_count),
        cmocka_unit_test(test_group),         cmocka_unit_test(test_stage_errors),
        cmocka_unit_test(test_per_document),  cmocka_unit_test(test_find_projection),
        cmocka_unit_test(test_sort_compare),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
