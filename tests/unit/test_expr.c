/*
 * test_expr.c: libmongocast's aggregation expressions (mc_expr_*), $expr in the matcher and
 * per-document pipelines (mc_pipeline_*) against MongoDB's documented semantics: BSON type
 * order in comparisons, missing versus null, field paths through arrays, arithmetic types and
 * overflow, truthiness, short-circuit evaluation, compile-time errors and limits.
 * Single-threaded cmocka test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "dollar_json.h"
#include "mongocast/filter.h"
#include "mongocast/pipeline.h"

/* The value of key "e" in `holder` (a document built from JSON). */
static bson_value_t field(const bson_t *holder, const char *key)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, holder, key)) {
        fail_msg("no key %s", key);
    }
    return *bson_iter_value(&it);
}

static mc_expr_t *compile(const char *expr_json, bson_t **holder)
{
    char *w = bson_strdup_printf("{\"e\": %s}", expr_json);
    *holder = json(w);
    bson_free(w);
    bson_value_t spec = field(*holder, "e");
    mc_error_t err = {0};
    mc_expr_t *e = mc_expr_new(&spec, NULL, &err);
    if (!e) {
        fail_msg("expression %s failed to compile: %s", expr_json, err.message);
    }
    return e;
}

/* Evaluates `expr` on `doc` and checks the result: `want` is a JSON value compared exactly
 * (type included), or NULL for "missing". */
static void check(const char *expr, const char *doc, const char *want)
{
    bson_t *holder, *d = json(doc);
    mc_expr_t *e = compile(expr, &holder);
    bson_value_t got;
    mc_error_t err = {0};
    int rc = mc_expr_eval(e, d, &got, &err);
    if (rc < 0) {
        fail_msg("%s on %s failed: %s", expr, doc, err.message);
    }
    if (!want) {
        if (rc != 0) {
            bson_t g = BSON_INITIALIZER;
            bson_append_value(&g, "v", 1, &got);
            fail_msg("%s on %s: want missing, got %s", expr, doc,
                     bson_as_relaxed_extended_json(&g, NULL));
        }
    } else {
        if (rc != 1) {
            fail_msg("%s on %s: want %s, got missing", expr, doc, want);
        }
        char *w = bson_strdup_printf("{\"v\": %s}", want);
        bson_t *wb = json(w), g = BSON_INITIALIZER;
        bson_append_value(&g, "v", 1, &got);
        if (!bson_equal(&g, wb)) {
            char *gs = bson_as_canonical_extended_json(&g, NULL);
            char *ws = bson_as_canonical_extended_json(wb, NULL);
            fail_msg("%s on %s:\n  got  %s\n  want %s", expr, doc, gs, ws);
        }
        bson_destroy(&g);
        bson_destroy(wb);
        bson_free(w);
        bson_value_destroy(&got);
    }
    mc_expr_destroy(e);
    bson_destroy(holder);
    bson_destroy(d);
}

/* `expr` fails: at compile time or at evaluation on `doc`, with `cause` and `msg`. */
static void check_error(const char *expr, const char *doc, int cause, const char *msg)
{
    char *w = bson_strdup_printf("{\"e\": %s}", expr);
    bson_t *holder = json(w), *d = json(doc);
    bson_free(w);
    bson_value_t spec = field(holder, "e");
    mc_error_t err = {0};
    mc_expr_t *e = mc_expr_new(&spec, NULL, &err);
    if (e) {
        bson_value_t got;
        int rc = mc_expr_eval(e, d, &got, &err);
        if (rc >= 0) {
            fail_msg("%s on %s should fail", expr, doc);
        }
        assert_int_equal(got.value_type, BSON_TYPE_EOD);
    }
    if (err.cause != cause || !strstr(err.message, msg)) {
        fail_msg("%s: got %d '%s', want %d '%s'", expr, err.cause, err.message, cause, msg);
    }
    assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
    mc_expr_destroy(e);
    bson_destroy(holder);
    bson_destroy(d);
}

/* MongoDB's comparison order: MinKey < missing/undefined < null < numbers < string < object <
 * array < binData < ObjectId < bool < date < timestamp < regex < MaxKey. */
static void test_type_order(void **state)
{
    (void)state;
    const char *ladder[] = {
        "{\"$minKey\": 1}",
        "null",
        "-1.5",
        "\"\"",
        "{\"$literal\": {}}",
        "{\"$literal\": []}",
        "{\"$binary\": {\"base64\": \"\", \"subType\": \"00\"}}",
        "{\"$oid\": \"000000000000000000000000\"}",
        "false",
        "{\"$date\": {\"$numberLong\": \"-1\"}}",
        "{\"$timestamp\": {\"t\": 0, \"i\": 0}}",
        "{\"$regularExpression\": {\"pattern\": \"\", \"options\": \"\"}}",
        "{\"$maxKey\": 1}",
    };
    size_t n = sizeof(ladder) / sizeof(ladder[0]);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < n; j++) {
            char *e = bson_strdup_printf("{\"$cmp\": [%s, %s]}", ladder[i], ladder[j]);
            check(e, "{}", i < j ? "-1" : (i > j ? "1" : "0"));
            bson_free(e);
        }
    }
    /* numbers compare by value across int32, int64, double and decimal128 */
    check("{\"$eq\": [1, 1.0]}", "{}", "true");
    check("{\"$eq\": [{\"$numberLong\": \"1\"}, 1]}", "{}", "true");
    check("{\"$eq\": [{\"$numberDecimal\": \"2.50\"}, 2.5]}", "{}", "true");
    check("{\"$lt\": [{\"$numberLong\": \"9007199254740993\"}, 9007199254740992.0]}", "{}",
          "false");
    check("{\"$gt\": [\"$a\", \"$b\"]}", "{\"a\": \"b\", \"b\": \"abc\"}", "true");
    /* no type bracketing: a string is greater than any number */
    check("{\"$gt\": [\"1\", 1000]}", "{}", "true");
    check("{\"$lt\": [\"$a\", 5]}", "{\"a\": null}", "true");
    /* arrays are compared as values, not element by element as in find */
    check("{\"$eq\": [\"$a\", 2]}", "{\"a\": [1, 2]}", "false");
    check("{\"$gt\": [\"$a\", 1000]}", "{\"a\": [1]}", "true");
    check("{\"$eq\": [\"$a\", [1, 2]]}", "{\"a\": [1, 2]}", "true");
    check("{\"$lt\": [[1, 2], [1, 3]]}", "{}", "true");
    /* NaN equals NaN and sorts below every other number */
    check("{\"$eq\": [\"$n\", \"$n\"]}", "{\"n\": {\"$numberDouble\": \"NaN\"}}", "true");
    check("{\"$lt\": [\"$n\", -1e308]}", "{\"n\": {\"$numberDouble\": \"NaN\"}}", "true");
}

/* "If a field is missing from a document, $ne treats the missing field as a distinct value,
 * separate from null. $ne considers two missing fields equivalent to each other" (MongoDB's
 * $ne documentation); missing sorts below null, so {$lt: ["$missing", x]} is true for every x
 * above null (SERVER-74344 describes the same for $expr). */
static void test_missing_and_null(void **state)
{
    (void)state;
    check("{\"$eq\": [\"$x\", null]}", "{}", "false");
    check("{\"$ne\": [\"$x\", null]}", "{}", "true");
    check("{\"$eq\": [\"$x\", \"$y\"]}", "{}", "true");
    check("{\"$eq\": [\"$x\", null]}", "{\"x\": null}", "true");
    check("{\"$lt\": [\"$x\", null]}", "{}", "true");
    check("{\"$lte\": [\"$x\", 5]}", "{}", "true");
    check("{\"$gte\": [\"$x\", 5]}", "{}", "false");
    check("{\"$lt\": [\"$x\", \"r\"]}", "{}", "true");
    check("{\"$gt\": [\"$x\", {\"$minKey\": 1}]}", "{}", "true");
    check("{\"$cmp\": [\"$x\", null]}", "{}", "-1");
    /* missing and undefined have the same rank and are equal */
    check("{\"$eq\": [\"$x\", \"$u\"]}", "{\"u\": {\"$undefined\": true}}", "true");
    /* the low-stock test of the Mercury seed, on events with and without the fields */
    const char *low = "{\"$lte\": [\"$fullDocument.quantity_in_stock\", "
                      "\"$fullDocument.reorder_point\"]}";
    check(low, "{\"fullDocument\": {\"quantity_in_stock\": 3, \"reorder_point\": 5}}", "true");
    check(low, "{\"fullDocument\": {\"quantity_in_stock\": 5, \"reorder_point\": 5}}", "true");
    check(low, "{\"fullDocument\": {\"quantity_in_stock\": 6, \"reorder_point\": 5}}", "false");
    check(low, "{\"fullDocument\": {\"reorder_point\": 5}}", "true");
    check(low, "{\"fullDocument\": {\"quantity_in_stock\": 1}}", "false");
    check(low, "{\"operationType\": \"delete\"}", "true"); /* missing <= missing */
    check(low, "{\"fullDocument\": {\"quantity_in_stock\": null, \"reorder_point\": 5}}", "true");
    /* arithmetic and $concat: null or missing operands give null */
    check("{\"$add\": [1, \"$x\"]}", "{}", "null");
    check("{\"$add\": [1, null]}", "{}", "null");
    check("{\"$concat\": [\"a\", \"$x\"]}", "{}", "null");
    check("{\"$subtract\": [\"$x\", 1]}", "{\"x\": {\"$undefined\": true}}", "null");
    /* a missing operand of a literal: null in arrays, absent in documents */
    check("[\"$x\", 1]", "{}", "[null, 1]");
    check("{\"a\": \"$x\", \"b\": 1}", "{}", "{\"b\": 1}");
    /* $ifNull: the first operand that is neither null nor missing; else the last as is */
    check("{\"$ifNull\": [\"$x\", \"$n\", \"dflt\"]}", "{\"n\": null}", "\"dflt\"");
    check("{\"$ifNull\": [\"$x\", 0]}", "{\"x\": false}", "false");
    check("{\"$ifNull\": [\"$x\", \"$y\"]}", "{}", NULL);
    check("\"$$REMOVE\"", "{}", NULL);
    check("{\"%type\": \"$x\"}", "{}", "\"missing\"");
    check("{\"%type\": \"$x\"}", "{\"x\": null}", "\"null\"");
    check("{\"$in\": [\"$x\", [null]]}", "{}", "false");
    check("{\"$in\": [\"$x\", [null]]}", "{\"x\": null}", "true");
}

static void test_field_paths(void **state)
{
    (void)state;
    const char *doc = "{\"_id\": 1, \"a\": {\"b\": {\"c\": 7}}, "
                      "\"arr\": [{\"v\": 1}, {\"w\": 2}, 5, {\"v\": [3]}, [{\"v\": 4}]]}";
    check("\"$a.b.c\"", doc, "7");
    check("\"$a.b\"", doc, "{\"c\": 7}");
    check("\"$a.z\"", doc, NULL);
    check("\"$a.b.c.d\"", doc, NULL); /* through a scalar */
    /* through arrays: one value per document element; missing values, scalars and nested
     * arrays are dropped (MongoDB's ExpressionFieldPath::evaluatePathArray) */
    check("\"$arr.v\"", doc, "[1, [3]]");
    check("\"$arr.0\"", doc, "[]"); /* numeric components are field names here */
    check("\"$$ROOT.a.b.c\"", doc, "7");
    check("\"$$CURRENT.a.b.c\"", doc, "7");
    check("\"$$ROOT\"", "{\"x\": 1}", "{\"x\": 1}");
    check("{\"$literal\": \"$a\"}", doc, "\"$a\"");
    check("{\"$size\": \"$arr\"}", doc, "5");
    check("{\"$isArray\": [\"$arr\"]}", doc, "true");
    check("{\"$isArray\": \"$a\"}", doc, "false");
    check("{\"%type\": \"$a.b.c\"}", doc, "\"int\"");
    check("{\"$in\": [5, \"$arr\"]}", doc, "true");
    check("{\"$in\": [{\"v\": 1}, \"$arr\"]}", doc, "true");
    check("{\"$in\": [6, \"$arr\"]}", doc, "false");
}

static void test_arithmetic(void **state)
{
    (void)state;
    check("{\"$add\": [1, 2]}", "{}", "3");
    check("{\"$add\": [1, 2.5]}", "{}", "3.5");
    check("{\"$add\": [1, {\"$numberLong\": \"2\"}]}", "{}", "{\"$numberLong\": \"3\"}");
    check("{\"$add\": [2147483647, 1]}", "{}", "{\"$numberLong\": \"2147483648\"}");
    check("{\"$add\": [{\"$numberLong\": \"9223372036854775807\"}, 1]}", "{}",
          "9.2233720368547758e+18");
    check("{\"$add\": []}", "{}", "0");
    check("{\"$multiply\": [\"$a\", 3]}", "{\"a\": 5}", "15");
    check("{\"$multiply\": []}", "{}", "1");
    check("{\"$subtract\": [5, 7]}", "{}", "-2");
    check("{\"$divide\": [7, 2]}", "{}", "3.5");
    check("{\"$divide\": [6, 3]}", "{}", "2.0");
    check("{\"$mod\": [7, 3]}", "{}", "1");
    check("{\"$mod\": [-7, 3]}", "{}", "-1");
    check("{\"$mod\": [7.5, 2]}", "{}", "1.5");
    check("{\"$mod\": [{\"$numberLong\": \"7\"}, 3]}", "{}", "{\"$numberLong\": \"1\"}");
    check("{\"$abs\": -5}", "{}", "5");
    check("{\"$abs\": [-2147483648]}", "{}", "{\"$numberLong\": \"2147483648\"}");
    check("{\"$abs\": -2.5}", "{}", "2.5");
    check("{\"$abs\": null}", "{}", "null");
    check("{\"$ceil\": 2.1}", "{}", "3.0");
    check("{\"$floor\": -2.1}", "{}", "-3.0");
    check("{\"$trunc\": -2.7}", "{}", "-2.0");
    check("{\"$floor\": 4}", "{}", "4");
    /* dates: date + ms, date - ms, date - date */
    const char *d = "{\"t\": {\"$date\": \"2020-01-02T03:04:05.006Z\"}, "
                    "\"u\": {\"$date\": \"2020-01-02T03:04:04.006Z\"}}";
    check("{\"$add\": [\"$t\", 1000]}", d, "{\"$date\": \"2020-01-02T03:04:06.006Z\"}");
    check("{\"$subtract\": [\"$t\", 1000]}", d, "{\"$date\": \"2020-01-02T03:04:04.006Z\"}");
    check("{\"$subtract\": [\"$t\", \"$u\"]}", d, "{\"$numberLong\": \"1000\"}");
    check("{\"$toString\": \"$t\"}", d, "\"2020-01-02T03:04:05.006Z\"");
    check("{\"$concat\": [\"a\", {\"$toString\": 5}, \"$s\"]}", "{\"s\": \"z\"}", "\"a5z\"");
    check_error("{\"$add\": [\"$s\", 1]}", "{\"s\": \"x\"}", 16554,
                "$add only supports numeric or date types, not string");
    check_error("{\"$add\": [\"$t\", \"$t\"]}", d, 16612, "only one date allowed");
    check_error("{\"$divide\": [1, 0]}", "{}", 2, "can't $divide by zero");
    check_error("{\"$mod\": [1, 0]}", "{}", 16610, "can't $mod by zero");
    check_error("{\"$mod\": [\"a\", 2]}", "{}", 16611, "$mod only supports numeric types");
    check_error("{\"$abs\": \"a\"}", "{}", 28765, "$abs only supports numeric types, not string");
    check_error("{\"$concat\": [\"a\", 1]}", "{}", 16702, "$concat only supports strings, not int");
    check_error("{\"$size\": \"$x\"}", "{}", 17124, "must be an array. Type of argument: missing");
    check_error("{\"$in\": [1, \"$x\"]}", "{\"x\": 1}", 40081, "requires an array");
}

static void test_logic(void **state)
{
    (void)state;
    /* false, 0, null, undefined and missing are false; everything else is true */
    check("{\"$and\": [1, \"x\", [], {\"$literal\": {}}, \"\", -0.5, true]}", "{}", "true");
    check("{\"$or\": [0, false, null, \"$x\", 0.0, {\"$numberLong\": \"0\"}]}", "{}", "false");
    check("{\"$and\": []}", "{}", "true");
    check("{\"$or\": []}", "{}", "false");
    check("{\"$not\": [\"$x\"]}", "{}", "true");
    check("{\"$not\": {\"$numberDecimal\": \"0\"}}", "{}", "true");
    check("{\"$not\": [{\"$numberDouble\": \"NaN\"}]}", "{}", "false");
    check("{\"$cond\": {\"if\": {\"$gte\": [\"$a\", 5]}, \"then\": \"big\", \"else\": \"small\"}}",
          "{\"a\": 5}", "\"big\"");
    check("{\"$cond\": [\"$a\", 1, 2]}", "{}", "2");
    /* short circuit: the failing operand is never evaluated */
    check("{\"$and\": [false, {\"$divide\": [1, 0]}]}", "{}", "false");
    check("{\"$or\": [true, {\"$divide\": [1, 0]}]}", "{}", "true");
    check("{\"$cond\": [true, 1, {\"$divide\": [1, 0]}]}", "{}", "1");
    check("{\"$ifNull\": [1, {\"$divide\": [1, 0]}]}", "{}", "1");
    check_error("{\"$and\": [true, {\"$divide\": [1, 0]}]}", "{}", 2, "can't $divide by zero");
}

static void test_compile_errors(void **state)
{
    (void)state;
    check_error("{\"$nope\": 1}", "{}", 168, "Unrecognized expression '$nope'");
    check_error("{\"$eq\": [1]}", "{}", 16020, "Expression $eq takes exactly 2 arguments. 1 were");
    check_error("{\"$eq\": \"$a\"}", "{}", 16020, "takes exactly 2 arguments");
    check_error("{\"$not\": [1, 2]}", "{}", 16020, "Expression $not takes exactly 1 arguments");
    check_error("{\"$ifNull\": [1]}", "{}", 1257300, "$ifNull needs at least two arguments");
    check_error("{\"$cond\": {\"if\": 1, \"then\": 2}}", "{}", 17082, "Missing 'else'");
    check_error("{\"$cond\": {\"if\": 1, \"then\": 2, \"else\": 3, \"x\": 4}}", "{}", 17083,
                "Unrecognized parameter to $cond: x");
    check_error("{\"$add\": [1], \"$sub\": 1}", "{}", 15983, "exactly one field");
    check_error("\"$$nope\"", "{}", 17276, "Use of undefined variable: nope");
    check_error("\"$$\"", "{}", 16869, "empty variable names");
    check_error("\"$\"", "{}", 16872, "'$' by itself");
    check_error("\"$a..b\"", "{}", 15998, "may not be empty");
    /* an unknown operator deep inside a literal is found at compile time too */
    check_error("{\"a\": [1, {\"b\": {\"$function\": {}}}]}", "{}", 168, "'$function'");
}

static void test_limits(void **state)
{
    (void)state;
    bson_t *h = json("{\"e\": {\"$add\": [1, 2, 3, 4, 5]}, "
                     "\"deep\": {\"$not\": {\"$not\": {\"$not\": {\"$not\": 1}}}}, "
                     "\"cat\": {\"$concat\": [\"$s\", \"$s\", \"$s\"]}}");
    mc_error_t err = {0};
    bson_value_t v = field(h, "e");
    mc_expr_opts_t few = {.max_nodes = 4};
    assert_null(mc_expr_new(&v, &few, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    v = field(h, "deep");
    mc_expr_opts_t shallow = {.max_depth = 2};
    assert_null(mc_expr_new(&v, &shallow, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    /* a built value larger than max_value_bytes fails the evaluation, not the process */
    v = field(h, "cat");
    mc_expr_opts_t small = {.max_value_bytes = 20};
    mc_expr_t *e = mc_expr_new(&v, &small, &err);
    assert_non_null(e);
    bson_t *d = json("{\"s\": \"0123456789\"}");
    bson_value_t out;
    assert_int_equal(mc_expr_eval(e, d, &out, &err), MC_ELIMIT);
    bson_destroy(d);
    d = json("{\"s\": \"012345\"}");
    assert_int_equal(mc_expr_eval(e, d, &out, &err), 1);
    bson_value_destroy(&out);
    bson_destroy(d);
    mc_expr_destroy(e);
    mc_expr_destroy(NULL);
    bson_destroy(h);
}

static void test_eval_bool(void **state)
{
    (void)state;
    bson_t *h;
    mc_expr_t *e = compile("{\"$gt\": [\"$a\", \"$b\"]}", &h);
    bson_t *yes = json("{\"a\": 2, \"b\": 1}"), *no = json("{\"a\": 1, \"b\": 2}");
    bool r = false;
    mc_error_t err;
    assert_int_equal(mc_expr_eval_bool(e, yes, &r, &err), 0);
    assert_true(r);
    assert_int_equal(mc_expr_eval_bool(e, no, &r, &err), 0);
    assert_false(r);
    mc_expr_destroy(e);
    bson_destroy(h);
    bson_destroy(yes);
    bson_destroy(no);
}

/* ---- $expr in the matcher */

static bool matches(const char *filter, const char *doc)
{
    bson_t *q = json(filter), *d = json(doc);
    mc_error_t err = {0};
    mc_filter_t *f = mc_filter_new(q, NULL, &err);
    if (!f) {
        fail_msg("filter %s: %s", filter, err.message);
    }
    bool r = mc_filter_match(f, d);
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(d);
    return r;
}

static void test_filter_expr(void **state)
{
    (void)state;
    const char *low = "{\"operationType\": {\"$in\": [\"insert\", \"update\", \"replace\"]}, "
                      "\"$expr\": {\"$lte\": [\"$fullDocument.quantity_in_stock\", "
                      "\"$fullDocument.reorder_point\"]}}";
    assert_true(matches(low, "{\"operationType\": \"update\", \"fullDocument\": "
                             "{\"quantity_in_stock\": 2, \"reorder_point\": 5}}"));
    assert_false(matches(low, "{\"operationType\": \"update\", \"fullDocument\": "
                              "{\"quantity_in_stock\": 9, \"reorder_point\": 5}}"));
    assert_false(matches(low, "{\"operationType\": \"delete\"}"));
    /* $expr inside $and/$or/$nor, a bare field path, a constant */
    assert_true(matches("{\"$or\": [{\"a\": 5}, {\"$expr\": {\"$eq\": [\"$b\", \"$c\"]}}]}",
                        "{\"b\": 1, \"c\": 1.0}"));
    assert_false(matches("{\"$nor\": [{\"$expr\": \"$b\"}]}", "{\"b\": 1}"));
    assert_true(matches("{\"$nor\": [{\"$expr\": \"$b\"}]}", "{\"b\": 0}"));
    assert_true(matches("{\"$expr\": true}", "{}"));
    assert_false(matches("{\"$expr\": \"$x\"}", "{}"));
    /* an evaluation error: no match from mc_filter_match, never a crash */
    assert_false(matches("{\"$expr\": {\"$add\": [\"$s\", 1]}}", "{\"s\": \"x\"}"));
    assert_false(matches("{\"$nor\": [{\"$expr\": {\"$add\": [\"$s\", 1]}}]}", "{\"s\": \"x\"}"));

    mc_error_t err = {0};
    bson_t *q = json("{\"$expr\": {\"$bogus\": 1}}");
    assert_null(mc_filter_new(q, NULL, &err));
    assert_int_equal(err.cause, 168);
    bson_destroy(q);
    /* top level only: not inside $elemMatch */
    q = json("{\"a\": {\"$elemMatch\": {\"$expr\": {\"$eq\": [1, 1]}}}}");
    assert_null(mc_filter_new(q, NULL, &err));
    assert_non_null(strstr(err.message, "top-level"));
    bson_destroy(q);
    /* subscriber filters keep refusing it */
    q = json("{\"$expr\": {\"$eq\": [1, 1]}}");
    mc_filter_opts_t refuse = {.refuse_code_operators = true};
    assert_null(mc_filter_new(q, &refuse, &err));
    assert_non_null(strstr(err.message, "$expr is not allowed"));
    bson_destroy(q);
}

/* A bound variable inside $expr is a value: "$secret" must not read the field secret. */
static void test_filter_expr_vars(void **state)
{
    (void)state;
    bson_t *vars = json("{\"who\": \"$secret\", \"n\": 3}");
    bson_t *q = json("{\"$expr\": {\"$and\": [{\"$eq\": [\"$owner\", {\"$var\": \"who\"}]}, "
                     "{\"$gte\": [\"$qty\", {\"$var\": \"n\"}]}]}}");
    mc_filter_opts_t opts = {.vars = vars};
    mc_error_t err = {0};
    mc_filter_t *f = mc_filter_new(q, &opts, &err);
    assert_non_null(f);
    bson_t *leak = json("{\"owner\": \"alice\", \"secret\": \"alice\", \"qty\": 5}");
    bson_t *exact = json("{\"owner\": \"$secret\", \"qty\": 5}");
    bson_t *few = json("{\"owner\": \"$secret\", \"qty\": 2}");
    assert_false(mc_filter_match(f, leak));
    assert_true(mc_filter_match(f, exact));
    assert_false(mc_filter_match(f, few));
    mc_filter_destroy(f);
    bson_destroy(leak);
    bson_destroy(exact);
    bson_destroy(few);
    bson_destroy(q);
    bson_destroy(vars);
}

/* ---- pipelines */

static mc_pipeline_t *pipeline(const char *stages_json, const bson_t *vars)
{
    char *w = bson_strdup_printf("{\"p\": %s}", stages_json);
    bson_t *h = json(w);
    bson_free(w);
    bson_iter_t it;
    const uint8_t *data;
    uint32_t len;
    bson_t stages;
    bson_iter_init_find(&it, h, "p");
    bson_iter_array(&it, &len, &data);
    bson_init_static(&stages, data, len);
    mc_pipeline_opts_t opts = {.vars = vars};
    mc_error_t err = {0};
    mc_pipeline_t *p = mc_pipeline_new(&stages, &opts, &err);
    bson_destroy(h); /* the pipeline keeps its own copy */
    if (!p) {
        fail_msg("pipeline %s: %s", stages_json, err.message);
    }
    return p;
}

static void expect_apply(const mc_pipeline_t *p, const char *doc, int want_rc, const char *want)
{
    bson_t *d = json(doc), out;
    mc_error_t err = {0};
    int rc = mc_pipeline_apply(p, d, &out, &err);
    if (rc != want_rc) {
        fail_msg("%s: rc %d (%s), want %d", doc, rc, err.message, want_rc);
    }
    if (want) {
        bson_t *w = json(want);
        if (!bson_equal(&out, w)) {
            fail_msg("%s: got %s want %s", doc, bson_as_relaxed_extended_json(&out, NULL), want);
        }
        bson_destroy(w);
    } else {
        assert_true(bson_empty(&out));
    }
    bson_destroy(&out);
    bson_destroy(d);
}

static void test_pipeline(void **state)
{
    (void)state;
    /* RESTHeart's order: a $var match, then a projection; and the reverse */
    bson_t *vars = json("{\"n\": \"book\"}");
    mc_pipeline_t *p = pipeline("[{\"$match\": {\"fullDocument.name\": {\"$var\": \"n\"}}}, "
                                "{\"$project\": {\"fullDocument.name\": 1}}]",
                                vars);
    assert_int_equal(mc_pipeline_length(p), 2);
    assert_false(mc_pipeline_only_filters(p));
    expect_apply(p, "{\"_id\": 1, \"fullDocument\": {\"name\": \"book\", \"qty\": 1}}", 1,
                 "{\"_id\": 1, \"fullDocument\": {\"name\": \"book\"}}");
    expect_apply(p, "{\"_id\": 2, \"fullDocument\": {\"name\": \"pen\"}}", 0, NULL);
    mc_pipeline_destroy(p);
    p = pipeline("[{\"$project\": {\"fullDocument.qty\": 1}}, "
                 "{\"$match\": {\"fullDocument.name\": {\"$var\": \"n\"}}}]",
                 vars);
    expect_apply(p, "{\"_id\": 1, \"fullDocument\": {\"name\": \"book\", \"qty\": 1}}", 0, NULL);
    mc_pipeline_destroy(p);
    bson_destroy(vars);

    p = pipeline("[{\"$match\": {\"$expr\": {\"$gt\": [\"$a\", 1]}}}]", NULL);
    assert_true(mc_pipeline_only_filters(p));
    expect_apply(p, "{\"a\": 2}", 1, "{\"a\": 2}");
    expect_apply(p, "{\"a\": 1}", 0, NULL);
    mc_pipeline_destroy(p);

    p = pipeline(
        "[{\"$set\": {\"low\": {\"$lte\": [\"$q\", \"$r\"]}, \"q\": \"$$REMOVE\"}}, "
        "{\"$match\": {\"low\": true}}, {\"$unset\": \"r\"}, "
        "{\"$replaceWith\": {\"doc\": \"$$ROOT\", \"k\": {\"$concat\": [\"k\", \"$id\"]}}}]",
        NULL);
    expect_apply(p, "{\"id\": \"1\", \"q\": 1, \"r\": 2}", 1,
                 "{\"doc\": {\"id\": \"1\", \"low\": true}, \"k\": \"k1\"}");
    expect_apply(p, "{\"id\": \"1\", \"q\": 3, \"r\": 2}", 0, NULL);
    /* an evaluation error is reported, with MongoDB's code */
    bson_t *d = json("{\"id\": 5, \"q\": 1, \"r\": 2}"), out;
    mc_error_t err = {0};
    assert_true(mc_pipeline_apply(p, d, &out, &err) < 0);
    assert_int_equal(err.cause, 16702);
    assert_true(bson_empty(&out));
    bson_destroy(&out);
    bson_destroy(d);
    mc_pipeline_destroy(p);

    p = pipeline("[{\"$match\": {\"$expr\": {\"$divide\": [1, \"$z\"]}}}]", NULL);
    d = json("{\"z\": 0}");
    assert_true(mc_pipeline_apply(p, d, &out, &err) < 0);
    assert_int_equal(err.cause, 2);
    bson_destroy(&out);
    bson_destroy(d);
    mc_pipeline_destroy(p);

    p = pipeline("[]", NULL);
    expect_apply(p, "{\"a\": 1}", 1, "{\"a\": 1}");
    mc_pipeline_destroy(p);
    mc_pipeline_destroy(NULL);

    /* unknown and set-level stages are refused with MongoDB's code */
    bson_t *bad = json("{\"0\": {\"$sort\": {\"a\": 1}}}");
    assert_null(mc_pipeline_new(bad, NULL, &err));
    assert_int_equal(err.cause, 40324);
    bson_destroy(bad);
}

static void test_projection(void **state)
{
    (void)state;
    bson_t *spec = json("{\"a\": 1, \"s\": {\"$add\": [\"$a\", \"$b.c\"]}}");
    bson_t *doc = json("{\"_id\": 7, \"a\": 1, \"b\": {\"c\": 2}}"), out;
    mc_error_t err = {0};
    mc_projection_t *p = mc_projection_new(spec, MC_PROJECTION_PROJECT, NULL, &err);
    assert_non_null(p);
    assert_int_equal(mc_projection_apply(p, doc, &out, &err), 0);
    bson_t *want = json("{\"_id\": 7, \"a\": 1, \"s\": 3}");
    assert_true(bson_equal(&out, want));
    bson_destroy(&out);
    bson_destroy(want);
    mc_projection_destroy(p);
    bson_destroy(spec);
    spec = json("{}");
    assert_null(mc_projection_new(spec, MC_PROJECTION_PROJECT, NULL, &err));
    assert_int_equal(err.cause, 51272);
    p = mc_projection_new(spec, MC_PROJECTION_FIND, NULL, &err);
    assert_non_null(p);
    assert_int_equal(mc_projection_apply(p, doc, &out, &err), 0);
    assert_true(bson_equal(&out, doc));
    bson_destroy(&out);
    mc_projection_destroy(p);
    bson_destroy(spec);
    bson_destroy(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_order),  cmocka_unit_test(test_missing_and_null),
        cmocka_unit_test(test_field_paths), cmocka_unit_test(test_arithmetic),
        cmocka_unit_test(test_logic),       cmocka_unit_test(test_compile_errors),
        cmocka_unit_test(test_limits),      cmocka_unit_test(test_eval_bool),
        cmocka_unit_test(test_filter_expr), cmocka_unit_test(test_filter_expr_vars),
        cmocka_unit_test(test_pipeline),    cmocka_unit_test(test_projection),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
