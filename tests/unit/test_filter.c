/*
 * test_filter.c: the query matcher (mc_filter_*) and mc_bson_value_compare against MongoDB's
 * documented semantics: array rules, null/missing, type bracketing, numeric cross-type
 * equality, $elemMatch versus plain dotted matching, operator errors, limits and $var.
 * Single-threaded cmocka test.
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

#include "dollar_json.h"
#include "mongocast/filter.h"

typedef struct mcase {
    const char *filter;
    const char *doc;
    bool expect;
} mcase_t;

static void run_cases(const mcase_t *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bson_t *q = json(cases[i].filter), *d = json(cases[i].doc);
        mc_error_t err = {0};
        mc_filter_t *f = mc_filter_new(q, NULL, &err);
        if (!f) {
            fail_msg("filter %s failed to compile: %s", cases[i].filter, err.message);
        }
        bool got = mc_filter_match(f, d);
        if (got != cases[i].expect) {
            fail_msg("filter %s on %s: expected %s", cases[i].filter, cases[i].doc,
                     cases[i].expect ? "match" : "no match");
        }
        mc_filter_destroy(f);
        bson_destroy(q);
        bson_destroy(d);
    }
}

#define RUN(cases) run_cases(cases, sizeof(cases) / sizeof(cases[0]))

static void test_equality(void **state)
{
    static const mcase_t cases[] = {
        {"{}", "{\"a\": 1}", true},
        {"{\"a\": 1}", "{\"a\": 1}", true},
        {"{\"a\": 1}", "{\"a\": 2}", false},
        {"{\"a\": 1}", "{\"b\": 1}", false},
        /* numeric cross-type equality */
        {"{\"a\": 1}", "{\"a\": 1.0}", true},
        {"{\"a\": 1}", "{\"a\": {\"$numberLong\": \"1\"}}", true},
        {"{\"a\": {\"$numberDecimal\": \"1.0\"}}", "{\"a\": 1}", true},
        {"{\"a\": 1.5}", "{\"a\": 1}", false},
        {"{\"a\": \"1\"}", "{\"a\": 1}", false},
        /* a scalar matches an array element; whole-array equality; no deep expansion */
        {"{\"a\": 2}", "{\"a\": [1, 2, 3]}", true},
        {"{\"a\": 4}", "{\"a\": [1, 2, 3]}", false},
        {"{\"a\": [1, 2]}", "{\"a\": [1, 2]}", true},
        {"{\"a\": [2, 1]}", "{\"a\": [1, 2]}", false},
        {"{\"a\": [1, 2]}", "{\"a\": [[1, 2], 3]}", true},
        {"{\"a\": 1}", "{\"a\": [[1, 2]]}", false},
        /* sub-document equality is exact, including field order */
        {"{\"a\": {\"b\": 1, \"c\": 2}}", "{\"a\": {\"b\": 1, \"c\": 2}}", true},
        {"{\"a\": {\"b\": 1, \"c\": 2}}", "{\"a\": {\"c\": 2, \"b\": 1}}", false},
        {"{\"a\": {\"b\": 1}}", "{\"a\": {\"b\": 1, \"c\": 2}}", false},
        {"{\"a\": {\"b\": 1}}", "{\"a\": [{\"b\": 1}, 5]}", true},
        /* dotted paths */
        {"{\"a.b\": 1}", "{\"a\": {\"b\": 1}}", true},
        {"{\"a.b\": 1}", "{\"a\": [{\"b\": 2}, {\"b\": 1}]}", true},
        {"{\"a.b\": 1}", "{\"a\": [{\"b\": [0, 1]}]}", true},
        {"{\"a.b.c\": 1}", "{\"a\": [{\"b\": [{\"c\": 1}]}]}", true},
        {"{\"a.b\": 1}", "{\"a\": [[{\"b\": 1}]]}", false},
        {"{\"a.1\": 5}", "{\"a\": [4, 5]}", true},
        {"{\"a.0\": 5}", "{\"a\": [4, 5]}", false},
        {"{\"a.0.b\": 1}", "{\"a\": [{\"b\": 1}, {\"b\": 2}]}", true},
        {"{\"a.1.b\": 1}", "{\"a\": [{\"b\": 1}, {\"b\": 2}]}", false},
        {"{\"a.0.0\": 7}", "{\"a\": [[7, 8]]}", true},
        {"{\"a.0\": 1}", "{\"a\": [{\"0\": 1}]}", true},
        {"{\"a.0\": 1}", "{\"a\": {\"0\": 1}}", true},
        {"{\"a.b\": 1}", "{\"a\": 1}", false},
        /* explicit $eq behaves like implicit equality, except with regexes */
        {"{\"a\": {\"$eq\": 2}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$eq\": [1, 2]}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$eq\": {\"%regex\": \"x\"}}}", "{\"a\": \"x\"}", false},
        {"{\"a\": {\"$eq\": {\"$regularExpression\": {\"pattern\": \"x\", \"options\": \"\"}}}}",
         "{\"a\": \"x\"}", false},
        {"{\"a\": {\"$eq\": {\"$regularExpression\": {\"pattern\": \"x\", \"options\": \"\"}}}}",
         "{\"a\": {\"$regularExpression\": {\"pattern\": \"x\", \"options\": \"\"}}}", true},
        /* a document whose first key is not an operator is an equality, even with $ later */
        {"{\"a\": {\"b\": 1, \"$c\": 2}}", "{\"a\": {\"b\": 1, \"$c\": 2}}", true},
        {"{\"a\": 1, \"$comment\": \"hi\"}", "{\"a\": 1}", true},
    };
    RUN(cases);
}

static void test_null_missing(void **state)
{
    static const mcase_t cases[] = {
        {"{\"a\": null}", "{\"a\": null}", true},
        {"{\"a\": null}", "{\"b\": 1}", true},
        {"{\"a\": null}", "{\"a\": 0}", false},
        {"{\"a\": null}", "{\"a\": {\"$undefined\": true}}", false},
        {"{\"a\": null}", "{\"a\": [1, null]}", true},
        {"{\"a\": null}", "{\"a\": []}", false},
        {"{\"a.b\": null}", "{\"a\": [{\"b\": 1}, {\"c\": 1}]}", true},
        {"{\"a.b\": null}", "{\"a\": [{\"b\": 1}]}", false},
        {"{\"a.b\": null}", "{\"a\": [1, 2]}", true},
        {"{\"a.b\": null}", "{\"a\": 5}", true},
        {"{\"a\": {\"$ne\": null}}", "{\"b\": 1}", false},
        {"{\"a\": {\"$ne\": null}}", "{\"a\": 1}", true},
        {"{\"a\": {\"$in\": [null, 5]}}", "{}", true},
        {"{\"a\": {\"$nin\": [null]}}", "{}", false},
        {"{\"a\": {\"$gte\": null}}", "{}", true},
        {"{\"a\": {\"$lte\": null}}", "{\"a\": null}", true},
        {"{\"a\": {\"$gt\": null}}", "{\"a\": null}", false},
        {"{\"a\": {\"$lt\": null}}", "{}", false},
        {"{\"a\": {\"$exists\": true}}", "{\"a\": null}", true},
        {"{\"a\": {\"$exists\": true}}", "{\"b\": 1}", false},
        {"{\"a\": {\"$exists\": false}}", "{\"b\": 1}", true},
        {"{\"a\": {\"$exists\": 0}}", "{\"a\": 1}", false},
        {"{\"a.b\": {\"$exists\": true}}", "{\"a\": [{\"c\": 1}, {\"b\": null}]}", true},
        {"{\"a.b\": {\"$exists\": false}}", "{\"a\": [{\"c\": 1}, {\"b\": null}]}", false},
        {"{\"a.b\": {\"$exists\": true}}", "{\"a\": [1, 2]}", false},
        {"{\"a.1\": {\"$exists\": true}}", "{\"a\": [1]}", false},
        {"{\"a.1\": {\"$exists\": true}}", "{\"a\": [1, 2]}", true},
    };
    RUN(cases);
}

static void test_comparisons(void **state)
{
    static const mcase_t cases[] = {
        {"{\"a\": {\"$gt\": 1}}", "{\"a\": 2}", true},
        {"{\"a\": {\"$gt\": 1}}", "{\"a\": 1}", false},
        {"{\"a\": {\"$gte\": 1}}", "{\"a\": 1.0}", true},
        {"{\"a\": {\"$lt\": 1}}", "{\"a\": 0.5}", true},
        {"{\"a\": {\"$lte\": 1}}", "{\"a\": {\"$numberLong\": \"2\"}}", false},
        /* type bracketing: strings are never greater than numbers, and vice versa */
        {"{\"a\": {\"$gt\": 1}}", "{\"a\": \"zzz\"}", false},
        {"{\"a\": {\"$lt\": \"a\"}}", "{\"a\": 5}", false},
        {"{\"a\": {\"$gt\": \"a\"}}", "{\"a\": \"b\"}", true},
        {"{\"a\": {\"$lt\": \"b\"}}", "{\"a\": \"B\"}", true},
        {"{\"a\": {\"$gt\": 1}}", "{\"a\": null}", false},
        {"{\"a\": {\"$gt\": 1}}", "{\"a\": true}", false},
        {"{\"a\": {\"$gt\": {\"$date\": \"2020-01-01T00:00:00Z\"}}}",
         "{\"a\": {\"$date\": \"2021-01-01T00:00:00Z\"}}", true},
        {"{\"a\": {\"$gt\": {\"$date\": \"2020-01-01T00:00:00Z\"}}}", "{\"a\": 9999999999999}",
         false},
        /* arrays: any element may satisfy, each operator independently */
        {"{\"a\": {\"$gt\": 5}}", "{\"a\": [1, 10]}", true},
        {"{\"a\": {\"$gt\": 1, \"$lt\": 5}}", "{\"a\": [0, 10]}", true},
        {"{\"a\": {\"$elemMatch\": {\"$gt\": 1, \"$lt\": 5}}}", "{\"a\": [0, 10]}", false},
        {"{\"a\": {\"$elemMatch\": {\"$gt\": 1, \"$lt\": 5}}}", "{\"a\": [0, 3]}", true},
        {"{\"a\": {\"$gt\": [1]}}", "{\"a\": [2]}", true},
        /* NaN */
        {"{\"a\": {\"$gt\": 0}}", "{\"a\": NaN}", false},
        {"{\"a\": {\"$lt\": 0}}", "{\"a\": NaN}", false},
        {"{\"a\": {\"$gte\": NaN}}", "{\"a\": NaN}", true},
        {"{\"a\": NaN}", "{\"a\": NaN}", true},
        /* large integers against doubles are exact */
        {"{\"a\": {\"$gt\": 9007199254740992.0}}",
         "{\"a\": {\"$numberLong\": \"9007199254740993\"}}", true},
        {"{\"a\": {\"$ne\": 1}}", "{\"a\": [1, 2]}", false},
        {"{\"a\": {\"$ne\": 3}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$ne\": [1, 2]}}", "{\"a\": [1, 2]}", false},
        {"{\"a\": {\"$gt\": {\"$minKey\": 1}}}", "{\"a\": \"x\"}", true},
        {"{\"a\": {\"$lt\": {\"$maxKey\": 1}}}", "{\"a\": 5}", true},
    };
    RUN(cases);
}

static void test_in_nin_regex(void **state)
{
    static const mcase_t cases[] = {
        {"{\"a\": {\"$in\": [1, 2]}}", "{\"a\": 2}", true},
        {"{\"a\": {\"$in\": [1, 2]}}", "{\"a\": [5, 1]}", true},
        {"{\"a\": {\"$in\": []}}", "{\"a\": 1}", false},
        {"{\"a\": {\"$in\": [[1, 2]]}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$in\": [{\"$regularExpression\": {\"pattern\": \"^ab\", \"options\": "
         "\"\"}}]}}",
         "{\"a\": \"abc\"}", true},
        {"{\"a\": {\"$nin\": [1, 2]}}", "{\"a\": 3}", true},
        {"{\"a\": {\"$nin\": [1, 2]}}", "{\"a\": [3, 2]}", false},
        {"{\"a\": {\"$nin\": [1, 2]}}", "{}", true},
        {"{\"a\": {\"%regex\": \"^a.c$\"}}", "{\"a\": \"abc\"}", true},
        {"{\"a\": {\"%regex\": \"^a.c$\"}}", "{\"a\": \"a\\nc\"}", false},
        {"{\"a\": {\"%regex\": \"^a.c$\", \"%options\": \"s\"}}", "{\"a\": \"a\\nc\"}", true},
        {"{\"a\": {\"%regex\": \"ABC\", \"%options\": \"i\"}}", "{\"a\": \"xabcx\"}", true},
        {"{\"a\": {\"%regex\": \"ABC\"}}", "{\"a\": \"xabcx\"}", false},
        {"{\"a\": {\"%regex\": \"^b\", \"%options\": \"m\"}}", "{\"a\": \"a\\nb\"}", true},
        {"{\"a\": {\"%regex\": \"^b\"}}", "{\"a\": \"a\\nb\"}", false},
        {"{\"a\": {\"%regex\": \"a b # comment\", \"%options\": \"x\"}}", "{\"a\": \"ab\"}", true},
        {"{\"a\": {\"%regex\": \"^\\\\d+$\"}}", "{\"a\": \"123\"}", true},
        {"{\"a\": {\"%regex\": \"^\\\\d+$\"}}", "{\"a\": \"12a\"}", false},
        {"{\"a\": {\"%regex\": \"^\\\\w+\\\\s\\\\S$\"}}", "{\"a\": \"ab_1 x\"}", true},
        {"{\"a\": {\"%regex\": \"^(?:ab)+$\"}}", "{\"a\": \"abab\"}", true},
        {"{\"a\": {\"%regex\": \"[\\\\d]x\"}}", "{\"a\": \"5x\"}", true},
        {"{\"a\": {\"%regex\": \"^a+?b$\"}}", "{\"a\": \"aab\"}", true},
        {"{\"a\": {\"%regex\": \"^\\\\d+-\\\\d{2,3}$\"}}", "{\"a\": \"1-234\"}", true},
        {"{\"a\": {\"%regex\": \"^\\\\d+-\\\\d{2,3}$\"}}", "{\"a\": \"1-2345\"}", false},
        {"{\"a\": {\"%regex\": \"^[]a]+$\"}}", "{\"a\": \"]a]\"}", true},
        {"{\"a\": {\"%regex\": \"^(x|y)*z\"}}", "{\"a\": \"xyxz\"}", true},
        {"{\"a\": {\"%regex\": \"b\"}}", "{\"a\": [\"x\", \"abc\"]}", true},
        {"{\"a\": {\"%regex\": \"1\"}}", "{\"a\": 1}", false},
        {"{\"a\": {\"$regularExpression\": {\"pattern\": \"^x\", \"options\": \"i\"}}}",
         "{\"a\": \"XY\"}", true},
        {"{\"a\": {\"$regularExpression\": {\"pattern\": \"^x\", \"options\": \"\"}}}",
         "{\"a\": {\"$symbol\": \"xy\"}}", true},
        {"{\"a\": {\"$not\": {\"$regularExpression\": {\"pattern\": \"^x\", \"options\": \"\"}}}}",
         "{\"a\": \"xy\"}", false},
        {"{\"a\": {\"$not\": {\"$regularExpression\": {\"pattern\": \"^x\", \"options\": \"\"}}}}",
         "{\"a\": \"yy\"}", true},
    };
    RUN(cases);
}

static void test_type_size_all_mod(void **state)
{
    static const mcase_t cases[] = {
        {"{\"a\": {\"%type\": \"string\"}}", "{\"a\": \"x\"}", true},
        {"{\"a\": {\"%type\": \"number\"}}", "{\"a\": {\"$numberLong\": \"5\"}}", true},
        {"{\"a\": {\"%type\": \"number\"}}", "{\"a\": \"5\"}", false},
        {"{\"a\": {\"%type\": \"int\"}}", "{\"a\": 5.5}", false},
        {"{\"a\": {\"%type\": \"double\"}}", "{\"a\": 5.5}", true},
        {"{\"a\": {\"%type\": \"array\"}}", "{\"a\": []}", true},
        {"{\"a\": {\"%type\": \"string\"}}", "{\"a\": [1, \"x\"]}", true},
        {"{\"a\": {\"%type\": [\"bool\", \"null\"]}}", "{\"a\": null}", true},
        {"{\"a\": {\"%type\": \"null\"}}", "{}", false},
        {"{\"a\": {\"%type\": \"minKey\"}}", "{\"a\": {\"$minKey\": 1}}", true},
        {"{\"a\": {\"%type\": \"objectId\"}}", "{\"a\": {\"$oid\": \"0123456789abcdef01234567\"}}",
         true},
        {"{\"a\": {\"$size\": 2}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$size\": 1}}", "{\"a\": [[1, 2]]}", true},
        {"{\"a\": {\"$size\": 2}}", "{\"a\": [[1, 2]]}", false},
        {"{\"a\": {\"$size\": 0}}", "{}", false},
        {"{\"a.b\": {\"$size\": 2}}", "{\"a\": [{\"b\": [1, 2]}]}", true},
        {"{\"a\": {\"$all\": [1, 2]}}", "{\"a\": [2, 3, 1]}", true},
        {"{\"a\": {\"$all\": [1, 2]}}", "{\"a\": [2, 3]}", false},
        {"{\"a\": {\"$all\": []}}", "{\"a\": [1]}", false},
        {"{\"a\": {\"$all\": [5]}}", "{\"a\": 5}", true},
        {"{\"a\": {\"$all\": [[1, 2]]}}", "{\"a\": [1, 2]}", true},
        {"{\"a\": {\"$all\": [{\"$elemMatch\": {\"b\": 1}}, {\"$elemMatch\": {\"c\": 2}}]}}",
         "{\"a\": [{\"b\": 1}, {\"c\": 2}]}", true},
        {"{\"a\": {\"$all\": [{\"$elemMatch\": {\"b\": 1, \"c\": 2}}]}}",
         "{\"a\": [{\"b\": 1}, {\"c\": 2}]}", false},
        {"{\"a\": {\"$mod\": [4, 1]}}", "{\"a\": 9}", true},
        {"{\"a\": {\"$mod\": [4, 1]}}", "{\"a\": 10}", false},
        {"{\"a\": {\"$mod\": [4, 1]}}", "{\"a\": [8, 5]}", true},
    };
    RUN(cases);
}

/* {$type: <number>} cannot be written in extended JSON (it reads as legacy binary). */
static void test_type_numeric(void **state)
{
    bson_t q = BSON_INITIALIZER, ops, d = BSON_INITIALIZER;
    BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &ops);
    BSON_APPEND_INT32(&ops, "$type", 2);
    bson_append_document_end(&q, &ops);
    mc_filter_t *f = mc_filter_new(&q, NULL, NULL);
    assert_non_null(f);
    BSON_APPEND_UTF8(&d, "a", "x");
    assert_true(mc_filter_match(f, &d));
    bson_reinit(&d);
    BSON_APPEND_INT32(&d, "a", 2);
    assert_false(mc_filter_match(f, &d));
    mc_filter_destroy(f);

    bson_reinit(&q);
    BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &ops);
    BSON_APPEND_DOUBLE(&ops, "$type", 127.0);
    bson_append_document_end(&q, &ops);
    f = mc_filter_new(&q, NULL, NULL);
    assert_non_null(f);
    bson_reinit(&d);
    BSON_APPEND_MAXKEY(&d, "a");
    assert_true(mc_filter_match(f, &d));
    mc_filter_destroy(f);

    const int bad_codes[] = {0, 20, 99, -2};
    for (size_t i = 0; i < 4; i++) {
        mc_error_t err = {0};
        bson_reinit(&q);
        BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &ops);
        BSON_APPEND_INT32(&ops, "$type", bad_codes[i]);
        bson_append_document_end(&q, &ops);
        assert_null(mc_filter_new(&q, NULL, &err));
        assert_string_equal(err.message, "Invalid numerical type code");
    }
    bson_destroy(&q);
    bson_destroy(&d);
}

static void test_elem_match_and_logic(void **state)
{
    static const mcase_t cases[] = {
        /* plain dotted matching may combine different elements; $elemMatch may not */
        {"{\"a.b\": 1, \"a.c\": 2}", "{\"a\": [{\"b\": 1}, {\"c\": 2}]}", true},
        {"{\"a\": {\"$elemMatch\": {\"b\": 1, \"c\": 2}}}", "{\"a\": [{\"b\": 1}, {\"c\": 2}]}",
         false},
        {"{\"a\": {\"$elemMatch\": {\"b\": 1, \"c\": 2}}}", "{\"a\": [{\"b\": 1, \"c\": 2}]}",
         true},
        {"{\"a\": {\"$elemMatch\": {\"b\": {\"$gt\": 1}}}}", "{\"a\": [{\"b\": 0}, {\"b\": 5}]}",
         true},
        {"{\"a\": {\"$elemMatch\": {\"b\": 1}}}", "{\"a\": {\"b\": 1}}", false},
        {"{\"a\": {\"$elemMatch\": {\"$or\": [{\"b\": 1}, {\"c\": 1}]}}}", "{\"a\": [{\"c\": 1}]}",
         true},
        {"{\"a\": {\"$elemMatch\": {\"$eq\": 1}}}", "{\"a\": [[1]]}", false},
        {"{\"a\": {\"$elemMatch\": {\"$elemMatch\": {\"$eq\": 1}}}}", "{\"a\": [[1]]}", true},
        {"{\"a\": {\"$elemMatch\": {\"$not\": {\"$gt\": 5}}}}", "{\"a\": [9, 3]}", true},
        {"{\"a\": {\"$elemMatch\": {\"$not\": {\"$gt\": 5}}}}", "{\"a\": [9, 7]}", false},
        {"{\"a\": {\"$not\": {\"$gt\": 5}}}", "{\"a\": [9, 3]}", false},
        {"{\"a\": {\"$not\": {\"$gt\": 5}}}", "{\"b\": 1}", true},
        {"{\"$or\": [{\"a\": 1}, {\"b\": 2}]}", "{\"b\": 2}", true},
        {"{\"$or\": [{\"a\": 1}, {\"b\": 2}]}", "{\"b\": 3}", false},
        {"{\"$and\": [{\"a\": 1}, {\"b\": 2}]}", "{\"a\": 1, \"b\": 2}", true},
        {"{\"$and\": [{\"a\": 1}, {\"b\": 2}]}", "{\"a\": 1}", false},
        {"{\"$nor\": [{\"a\": 1}, {\"b\": 2}]}", "{\"a\": 2}", true},
        {"{\"$nor\": [{\"a\": 1}, {\"b\": 2}]}", "{\"a\": 1}", false},
        {"{\"a\": 1, \"$or\": [{\"b\": 1}, {\"c\": 1}]}", "{\"a\": 1, \"c\": 1}", true},
        {"{\"$alwaysFalse\": 1}", "{}", false},
        /* change-event shaped query */
        {"{\"operationType\": {\"$in\": [\"insert\", \"update\"]}, \"fullDocument.owner\": \"u1\"}",
         "{\"operationType\": \"update\", \"fullDocument\": {\"owner\": \"u1\"}}", true},
    };
    RUN(cases);
}

typedef struct ecase {
    const char *filter;
    const char *msg; /* substring of the error message */
} ecase_t;

static void test_errors(void **state)
{
    static const ecase_t cases[] = {
        {"{\"a\": {\"$foo\": 1}}", "unknown operator: $foo"},
        {"{\"$foo\": 1}", "unknown top level operator: $foo"},
        {"{\"a\": {\"$gt\": 1, \"b\": 1}}", "unknown operator: b"},
        {"{\"a\": {\"$in\": 1}}", "$in needs an array"},
        {"{\"a\": {\"$nin\": {\"x\": 1}}}", "$nin needs an array"},
        {"{\"a\": {\"$in\": [{\"$gt\": 1}]}}", "cannot nest $ under $in"},
        {"{\"$and\": []}", "must be a nonempty array"},
        {"{\"$or\": {\"a\": 1}}", "must be an array"},
        {"{\"$or\": [1]}", "entries must be objects"},
        {"{\"a\": {\"$not\": {}}}", "$not cannot be empty"},
        {"{\"a\": {\"$not\": 5}}", "$not needs a regex or a document"},
        {"{\"a\": {\"$size\": -1}}", "may not be negative"},
        {"{\"a\": {\"$size\": 1.5}}", "whole number"},
        {"{\"a\": {\"%type\": \"nope\"}}", "Unknown type name alias: nope"},
        {"{\"a\": {\"%options\": \"i\"}}", "$options needs a $regex"},
        {"{\"a\": {\"%regex\": \"(\"}}", "Regular expression is invalid"},
        {"{\"a\": {\"%regex\": \"x\", \"%options\": \"q\"}}", "invalid flag in regex options"},
        {"{\"a\": {\"%regex\": \"x\", \"%options\": \"l\"}}", "invalid flag in regex options: l"},
        {"{\"a\": {\"%regex\": \"((a{100}){100}){100}\"}}", "too large"},
        {"{\"a\": {\"%regex\": \"^a+++\"}}", "quantifier does not follow a repeatable item"},
        {"{\"a\": {\"%regex\": \"*a\"}}", "quantifier does not follow a repeatable item"},
        {"{\"a\": {\"%regex\": \"a\\\\C\"}}", "Regular expression is invalid"},
        {"{\"a\": {\"%regex\": \"(?<=a+)b\"}}", "Regular expression is invalid"},
        {"{\"a\": {\"%regex\": \"[z-a]\"}}", "Regular expression is invalid: range out of order"},
        {"{\"a\": {\"$elemMatch\": 1}}", "$elemMatch needs an Object"},
        {"{\"a\": {\"$all\": [{\"$elemMatch\": {\"b\": 1}}, 2]}}", "has to be consistent"},
        {"{\"a\": {\"$mod\": [0, 1]}}", "divisor cannot be 0"},
        {"{\"a\": {\"$mod\": [1]}}", "not enough elements"},
        {"{\"$where\": \"true\"}", "$where is not supported"},
        {"{\"a\": {\"$near\": [0, 0]}}", "$near is not supported"},
        {"{\"a\": {\"$var\": \"x\"}}", "variable x not bound"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bson_t *q = json(cases[i].filter);
        mc_error_t err = {0};
        mc_filter_t *f = mc_filter_new(q, NULL, &err);
        if (f) {
            fail_msg("filter %s compiled but should fail", cases[i].filter);
        }
        if (!strstr(err.message, cases[i].msg)) {
            fail_msg("filter %s: message '%s' lacks '%s'", cases[i].filter, err.message,
                     cases[i].msg);
        }
        assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
        assert_true(err.code == MC_EINVAL || err.code == MC_ELIMIT);
        bson_destroy(q);
    }
    /* The unknown-operator error carries MongoDB's BadValue code. */
    bson_t *q = json("{\"a\": {\"$foo\": 1}}");
    mc_error_t err = {0};
    assert_null(mc_filter_new(q, NULL, &err));
    assert_int_equal(err.code, MC_EINVAL);
    assert_int_equal(err.cause, 2);
    assert_string_equal(err.message, "unknown operator: $foo");
    bson_destroy(q);
}

static void test_code_operators_and_limits(void **state)
{
    const char *code[] = {"{\"$where\": \"1\"}", "{\"$expr\": {\"$eq\": [1, 1]}}",
                          "{\"$function\": {}}", "{\"$accumulator\": {}}",
                          "{\"$or\": [{\"$where\": \"1\"}]}"};
    mc_filter_opts_t opts = {.refuse_code_operators = true};
    for (size_t i = 0; i < sizeof(code) / sizeof(code[0]); i++) {
        bson_t *q = json(code[i]);
        mc_error_t err = {0};
        assert_null(mc_filter_new(q, &opts, &err));
        assert_int_equal(err.code, MC_EINVAL);
        assert_non_null(strstr(err.message, "is not allowed in this filter"));
        bson_destroy(q);
    }

    /* max_predicates */
    opts = (mc_filter_opts_t){.max_predicates = 2};
    bson_t *q = json("{\"a\": 1, \"b\": 2, \"c\": 3}");
    mc_error_t err = {0};
    assert_null(mc_filter_new(q, &opts, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    bson_destroy(q);
    q = json("{\"a\": 1, \"b\": 2}");
    mc_filter_t *f = mc_filter_new(q, &opts, &err);
    assert_non_null(f);
    mc_filter_destroy(f);
    bson_destroy(q);

    /* max_depth: nested $and and nested equality documents both count */
    opts = (mc_filter_opts_t){.max_depth = 4};
    q = json("{\"$and\": [{\"$and\": [{\"$and\": [{\"$and\": [{\"$and\": [{\"a\": 1}]}]}]}]}]}");
    assert_null(mc_filter_new(q, &opts, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    bson_destroy(q);
    q = json("{\"a\": {\"b\": {\"c\": {\"d\": {\"e\": {\"f\": 1}}}}}}");
    assert_null(mc_filter_new(q, &opts, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    bson_destroy(q);
    q = json("{\"a\": {\"b\": 1}}");
    f = mc_filter_new(q, &opts, &err);
    assert_non_null(f);
    mc_filter_destroy(f);
    bson_destroy(q);

    /* default depth limit (64) protects against deeply nested input */
    char buf[4096];
    size_t n = 0;
    for (int i = 0; i < 90; i++) {
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, "{\"a\": ");
    }
    n += (size_t)snprintf(buf + n, sizeof(buf) - n, "1");
    for (int i = 0; i < 90; i++) {
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, "}");
    }
    q = json(buf);
    assert_null(mc_filter_new(q, NULL, &err));
    assert_int_equal(err.code, MC_ELIMIT);
    bson_destroy(q);
}

static void test_vars(void **state)
{
    bson_t *vars = json("{\"me\": \"u1\", \"ids\": [1, 2], \"evil\": {\"$ne\": \"x\"}, "
                        "\"doc\": {\"k\": 1}, \"deep\": [{\"$gt\": 1}], "
                        "\"re\": {\"$regularExpression\": {\"pattern\": \".*\", \"options\": "
                        "\"\"}}}");
    mc_filter_opts_t opts = {.vars = vars, .refuse_code_operators = true};
    mc_error_t err = {0};

    bson_t *q = json("{\"owner\": {\"$var\": \"me\"}, \"n\": {\"$in\": {\"$var\": \"ids\"}}}");
    mc_filter_t *f = mc_filter_new(q, &opts, &err);
    assert_non_null(f);
    bson_t *d1 = json("{\"owner\": \"u1\", \"n\": 2}");
    bson_t *d2 = json("{\"owner\": \"u2\", \"n\": 2}");
    bson_t *d3 = json("{\"owner\": \"u1\", \"n\": 3}");
    assert_true(mc_filter_match(f, d1));
    assert_false(mc_filter_match(f, d2));
    assert_false(mc_filter_match(f, d3));
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(d1);
    bson_destroy(d2);
    bson_destroy(d3);

    q = json("{\"a\": {\"$var\": \"doc\"}}");
    f = mc_filter_new(q, &opts, &err);
    assert_non_null(f);
    d1 = json("{\"a\": {\"k\": 1}}");
    assert_true(mc_filter_match(f, d1));
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(d1);

    const char *refused[][2] = {
        {"{\"owner\": {\"$var\": \"nobody\"}}", "variable nobody not bound"},
        {"{\"owner\": {\"$var\": \"evil\"}}", "operators ($ne) are not allowed"},
        {"{\"owner\": {\"$var\": \"deep\"}}", "operators ($gt) are not allowed"},
        {"{\"owner\": {\"$var\": \"re\"}}", "regular expressions"},
        {"{\"owner\": {\"$var\": 5}}", "needs a variable name"},
    };
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        q = json(refused[i][0]);
        assert_null(mc_filter_new(q, &opts, &err));
        assert_int_equal(err.code, MC_EINVAL);
        if (!strstr(err.message, refused[i][1])) {
            fail_msg("%s: '%s' lacks '%s'", refused[i][0], err.message, refused[i][1]);
        }
        bson_destroy(q);
    }
    bson_destroy(vars);
}

static void test_is_empty(void **state)
{
    bson_t *q = json("{\"$comment\": \"x\"}");
    mc_filter_t *f = mc_filter_new(q, NULL, NULL);
    assert_true(mc_filter_is_empty(f));
    bson_t *d = json("{\"z\": 1}");
    assert_true(mc_filter_match(f, d));
    mc_filter_destroy(f);
    bson_destroy(q);
    q = json("{\"a\": 1}");
    f = mc_filter_new(q, NULL, NULL);
    assert_false(mc_filter_is_empty(f));
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(d);
    mc_filter_destroy(NULL);
}

/* Sorted ascending by MongoDB's canonical order; each adjacent pair must compare < 0. */
static void test_value_compare(void **state)
{
    bson_t *d =
        json("{\"v\": [{\"$minKey\": 1}, null, {\"$numberDouble\": \"NaN\"}, "
             "{\"$numberDouble\": \"-Infinity\"}, -5, {\"$numberLong\": \"-4\"}, 1.5, "
             "{\"$numberDecimal\": \"2.5\"}, 3, \"\", \"A\", \"a\", \"ab\", {}, "
             "{\"a\": 1}, {\"b\": 0}, {\"a\": \"x\"}, [], [1], [1, 2], [2], "
             "{\"$binary\": {\"base64\": \"AQ==\", \"subType\": \"01\"}}, "
             "{\"$binary\": {\"base64\": \"AgI=\", \"subType\": \"00\"}}, "
             "{\"$oid\": \"000000000000000000000001\"}, "
             "{\"$oid\": \"000000000000000000000002\"}, false, true, "
             "{\"$date\": {\"$numberLong\": \"-1\"}}, {\"$date\": {\"$numberLong\": \"5\"}}, "
             "{\"$timestamp\": {\"t\": 1, \"i\": 5}}, {\"$timestamp\": {\"t\": 2, \"i\": 1}}, "
             "{\"$regularExpression\": {\"pattern\": \"a\", \"options\": \"\"}}, "
             "{\"$maxKey\": 1}]}");
    bson_iter_t it, arr;
    assert_true(bson_iter_init_find(&it, d, "v"));
    assert_true(bson_iter_recurse(&it, &arr));
    bson_value_t prev;
    bool have = false;
    int idx = 0;
    while (bson_iter_next(&arr)) {
        bson_value_t cur;
        bson_value_copy(bson_iter_value(&arr), &cur);
        if (have) {
            int c = mc_bson_value_compare(&prev, &cur);
            if (c >= 0) {
                fail_msg("element %d not greater than element %d", idx, idx - 1);
            }
            assert_true(mc_bson_value_compare(&cur, &prev) > 0);
            bson_value_destroy(&prev);
        }
        assert_int_equal(mc_bson_value_compare(&cur, &cur), 0);
        prev = cur;
        have = true;
        idx++;
    }
    bson_value_destroy(&prev);
    bson_destroy(d);

    /* Cross-type numeric equality. */
    bson_value_t a = {.value_type = BSON_TYPE_INT32, .value.v_int32 = 7};
    bson_value_t b = {.value_type = BSON_TYPE_DOUBLE, .value.v_double = 7.0};
    bson_value_t c = {.value_type = BSON_TYPE_INT64, .value.v_int64 = 7};
    assert_int_equal(mc_bson_value_compare(&a, &b), 0);
    assert_int_equal(mc_bson_value_compare(&b, &c), 0);
    b.value.v_double = 7.000001;
    assert_true(mc_bson_value_compare(&a, &b) < 0);
    /* string vs symbol compare as strings */
    bson_value_t s1 = {.value_type = BSON_TYPE_UTF8};
    s1.value.v_utf8.str = "abc";
    s1.value.v_utf8.len = 3;
    bson_value_t s2 = {.value_type = BSON_TYPE_SYMBOL};
    s2.value.v_symbol.symbol = "abc";
    s2.value.v_symbol.len = 3;
    assert_int_equal(mc_bson_value_compare(&s1, &s2), 0);
}

static void test_reuse_and_many_docs(void **state)
{
    bson_t *q = json("{\"tags\": {\"$all\": [\"a\", \"b\"]}, \"n\": {\"$gte\": 10}}");
    mc_filter_t *f = mc_filter_new(q, NULL, NULL);
    assert_non_null(f);
    int matched = 0;
    for (int i = 0; i < 1000; i++) {
        bson_t d = BSON_INITIALIZER;
        BSON_APPEND_INT32(&d, "n", i % 20);
        bson_t arr;
        BSON_APPEND_ARRAY_BEGIN(&d, "tags", &arr);
        BSON_APPEND_UTF8(&arr, "0", "a");
        if (i % 2) {
            BSON_APPEND_UTF8(&arr, "1", "b");
        }
        bson_append_array_end(&d, &arr);
        matched += mc_filter_match(f, &d);
        bson_destroy(&d);
    }
    /* i odd and i % 20 >= 10: 5 of every 20 */
    assert_int_equal(matched, 250);
    mc_filter_destroy(f);
    bson_destroy(q);
}

/* PCRE2 semantics MongoDB has and the POSIX translation lacked. */
static void test_regex_pcre2(void **state)
{
    static const mcase_t cases[] = {
        /* lookaround, backreferences, inline flags, atomic groups, possessive and lazy */
        {"{\"a\": {\"%regex\": \"a(?=b)\"}}", "{\"a\": \"ab\"}", true},
        {"{\"a\": {\"%regex\": \"a(?=b)\"}}", "{\"a\": \"ac\"}", false},
        {"{\"a\": {\"%regex\": \"(?<!x)y\"}}", "{\"a\": \"xy\"}", false},
        {"{\"a\": {\"%regex\": \"(?<!x)y\"}}", "{\"a\": \"zy\"}", true},
        {"{\"a\": {\"%regex\": \"^(ab)\\\\1$\"}}", "{\"a\": \"abab\"}", true},
        {"{\"a\": {\"%regex\": \"^(ab)\\\\1$\"}}", "{\"a\": \"abac\"}", false},
        {"{\"a\": {\"%regex\": \"(?i)^abc$\"}}", "{\"a\": \"ABC\"}", true},
        {"{\"a\": {\"%regex\": \"^(?>a+)b\"}}", "{\"a\": \"aab\"}", true},
        {"{\"a\": {\"%regex\": \"^a++a\"}}", "{\"a\": \"aaa\"}", false},
        {"{\"a\": {\"%regex\": \"^a.*?c\"}}", "{\"a\": \"abcbc\"}", true},
        {"{\"a\": {\"%regex\": \"[\\\\]\\\\-]\"}}", "{\"a\": \"-\"}", true},
        {"{\"a\": {\"%regex\": \"\\\\bcat\\\\b\"}}", "{\"a\": \"a cat here\"}", true},
        {"{\"a\": {\"%regex\": \"\\\\bcat\\\\b\"}}", "{\"a\": \"concatenate\"}", false},
        /* UTF-8: a character is one '.', and i folds non-ASCII letters */
        {"{\"a\": {\"%regex\": \"^.$\"}}", "{\"a\": \"\\u00e9\"}", true},
        {"{\"a\": {\"%regex\": \"^\\u00c9T\\u00c9$\", \"%options\": \"i\"}}",
         "{\"a\": \"\\u00e9t\\u00e9\"}", true},
        {"{\"a\": {\"%regex\": \"^\\u00c9T\\u00c9$\"}}", "{\"a\": \"\\u00e9t\\u00e9\"}", false},
        /* u is accepted (redundant); options combine; m and s are independent */
        {"{\"a\": {\"%regex\": \"^b.c$\", \"%options\": \"ums\"}}", "{\"a\": \"a\\nb\\nc\"}", true},
        {"{\"a\": {\"%regex\": \"^b.c$\", \"%options\": \"m\"}}", "{\"a\": \"a\\nb\\nc\"}", false},
        {"{\"a\": {\"%regex\": \"a$\"}}", "{\"a\": \"a\\n\"}", true},
        /* x: white space and # comments ignored, escaped and bracketed space kept */
        {"{\"a\": {\"%regex\": \"^ a \\\\  [ ] b # c\\n$\", \"%options\": \"x\"}}",
         "{\"a\": \"a  b\"}", true},
    };
    RUN(cases);
}

static bson_t *utf8_doc(const char *key, const char *bytes, size_t len)
{
    bson_t *d = bson_new();
    bson_append_utf8(d, key, -1, bytes, (int)len); /* libbson does not validate here */
    return d;
}

/* Patterns are checked when compiled; subjects are never trusted. */
static void test_regex_limits_and_bad_utf8(void **state)
{
    const char *bad[] = {"a\xff", "\xc3(", "(?:a"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        bson_t q = BSON_INITIALIZER, op;
        BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &op);
        bson_append_utf8(&op, "$regex", -1, bad[i], -1);
        bson_append_document_end(&q, &op);
        mc_error_t err = {0};
        assert_null(mc_filter_new(&q, NULL, &err));
        assert_int_equal(err.cause, 51091);
        assert_non_null(strstr(err.message, "Regular expression is invalid"));
        bson_destroy(&q);
    }
    /* length, embedded NUL, nesting */
    char big[8194];
    memset(big, 'c', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    char nest[2 * 65 + 2];
    size_t n = 0;
    for (int i = 0; i < 65; i++) {
        nest[n++] = '(';
    }
    nest[n++] = 'a';
    for (int i = 0; i < 65; i++) {
        nest[n++] = ')';
    }
    nest[n] = '\0';
    struct {
        const char *p;
        int len;
        const char *msg;
    } cases[] = {
        {big, 8193, "Regular expression is too long"},
        {"ab\0c", 4, "embedded null"},
        {nest, -1, "parentheses are too deeply nested"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        bson_t q = BSON_INITIALIZER, op;
        BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &op);
        bson_append_utf8(&op, "$regex", -1, cases[i].p, cases[i].len);
        bson_append_document_end(&q, &op);
        mc_error_t err = {0};
        assert_null(mc_filter_new(&q, NULL, &err));
        if (!strstr(err.message, cases[i].msg)) {
            fail_msg("case %zu: '%s' lacks '%s'", i, err.message, cases[i].msg);
        }
        bson_destroy(&q);
    }
    big[8000] = '\0'; /* a long literal still compiles */
    bson_t q = BSON_INITIALIZER, op;
    BSON_APPEND_DOCUMENT_BEGIN(&q, "a", &op);
    BSON_APPEND_UTF8(&op, "$regex", big);
    bson_append_document_end(&q, &op);
    mc_filter_t *f = mc_filter_new(&q, NULL, NULL);
    assert_non_null(f);
    mc_filter_destroy(f);
    bson_destroy(&q);

    /* Invalid UTF-8 in a subject: never an error, an invalid sequence matches nothing. */
    struct {
        const char *filter;
        const char *bytes;
        size_t len;
        bool expect;
    } subj[] = {
        {"{\"a\": {\"%regex\": \"b$\"}}",
         "\xff\xfe"
         "b",
         3, true},
        {"{\"a\": {\"%regex\": \"^.b\"}}",
         "\xff"
         "b",
         2, false},
        {"{\"a\": {\"%regex\": \"^.*$\", \"%options\": \"s\"}}", "a\xc3", 2, false},
        {"{\"a\": {\"%regex\": \"x\"}}", "\xe2\x82", 2, false},
        {"{\"a\": {\"%regex\": \"a\"}}",
         "\x00"
         "a",
         2, true},
    };
    for (size_t i = 0; i < sizeof(subj) / sizeof(subj[0]); i++) {
        bson_t *fq = json(subj[i].filter);
        bson_t *d = utf8_doc("a", subj[i].bytes, subj[i].len);
        mc_filter_t *ff = mc_filter_new(fq, NULL, NULL);
        assert_non_null(ff);
        if (mc_filter_match(ff, d) != subj[i].expect) {
            fail_msg("subject case %zu: expected %d", i, subj[i].expect);
        }
        mc_filter_destroy(ff);
        bson_destroy(d);
        bson_destroy(fq);
    }
}

static bson_t *string_doc(const char *key, char first, char fill, size_t len)
{
    char *s = malloc(len + 1);
    assert_non_null(s);
    memset(s, fill, len);
    s[0] = first;
    s[len] = '\0';
    bson_t *d = bson_new();
    BSON_APPEND_UTF8(d, key, s);
    free(s);
    return d;
}

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Catastrophic patterns stop at the budget (or, without one, at the work cap) instead of
 * running for minutes; ordinary filters are untouched by a budget. */
static void test_budget(void **state)
{
    /* The pattern: exponential backtracking from the one 'x' at the start. The other
     * one costs just under PCRE2's per-position match limit at every start position, which is
     * why the work is counted across positions. */
    static const char *const evil[] = {"{\"s\": {\"%regex\": \"(.{1,100}){199}x\"}}",
                                       "{\"s\": {\"%regex\": \"(?:a|a){1,14}(?=x)\"}}"};
    bson_t *d = string_doc("s", 'x', 'a', 100000);
    for (size_t i = 0; i < 2; i++) {
        bson_t *q = json(evil[i]);
        mc_filter_t *f = mc_filter_new(q, NULL, NULL);
        assert_non_null(f);
        mc_filter_budget_t b = {.cpu_ns = 5000000};
        uint64_t t0 = cpu_ns();
        assert_false(mc_filter_match_budget(f, d, &b));
        uint64_t used = cpu_ns() - t0;
        assert_true(b.exceeded);
        assert_string_equal(b.reason, "CPU budget exhausted");
        /* Unbounded, this takes minutes; the margin covers the steps between clock readings
         * and a slow sanitizer build. */
        assert_true(used < 500000000u);
        /* An exhausted budget answers at once. */
        assert_false(mc_filter_match_budget(f, d, &b));
        /* Without a budget: bounded by the work cap, and counted as no match. */
        t0 = cpu_ns();
        assert_false(mc_filter_match(f, d));
        assert_true(cpu_ns() - t0 < 5000000000u);
        mc_filter_destroy(f);
        bson_destroy(q);
    }
    bson_destroy(d);

    /* PCRE2's own limits (here the match limit, hit at one start position before the budget)
     * stop a budgeted evaluation too, with their reason. */
    bson_t *q = json("{\"s\": {\"%regex\": \"(.{1,100}){199}x\"}}");
    mc_filter_t *f = mc_filter_new(q, NULL, NULL);
    d = string_doc("s", 'x', 'a', 1000);
    mc_filter_budget_t b = {.cpu_ns = 60000000000u};
    assert_false(mc_filter_match_budget(f, d, &b));
    assert_true(b.exceeded);
    assert_string_equal(b.reason, "regular expression match limit");
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(d);

    /* No regex at all: a wide document and many predicates run out of budget too. */
    bson_t *yes;
    bson_t *wide = bson_new();
    bson_t arr;
    BSON_APPEND_ARRAY_BEGIN(wide, "a", &arr);
    for (int i = 0; i < 200000; i++) {
        char k[16];
        const char *key;
        bson_uint32_to_string((uint32_t)i, &key, k, sizeof(k));
        bson_t el;
        bson_append_document_begin(&arr, key, -1, &el);
        BSON_APPEND_INT32(&el, "x", i);
        bson_append_document_end(&arr, &el);
    }
    bson_append_array_end(wide, &arr);
    char filter[4096];
    size_t n = (size_t)snprintf(filter, sizeof(filter), "{\"$or\": [");
    for (int i = 0; i < 60; i++) {
        n += (size_t)snprintf(filter + n, sizeof(filter) - n, "%s{\"a.x\": -%d}", i ? "," : "",
                              i + 1);
    }
    snprintf(filter + n, sizeof(filter) - n, "]}");
    q = json(filter);
    f = mc_filter_new(q, NULL, NULL);
    assert_non_null(f);
    b = (mc_filter_budget_t){.cpu_ns = 1000000};
    assert_false(mc_filter_match_budget(f, wide, &b));
    assert_true(b.exceeded);
    /* The same filter within a generous budget completes, with the right answer. */
    b = (mc_filter_budget_t){.cpu_ns = 60000000000u};
    assert_false(mc_filter_match_budget(f, wide, &b));
    assert_false(b.exceeded);
    mc_filter_destroy(f);
    bson_destroy(q);

    /* $expr counts against the same budget: the work of an expression (here a field path
     * through the 200,000 array elements and a $in over the result) stops it like a regex's. */
    q = json("{\"$expr\": {\"$in\": [199999, \"$a.x\"]}}");
    f = mc_filter_new(q, NULL, NULL);
    assert_non_null(f);
    b = (mc_filter_budget_t){.cpu_ns = 1};
    assert_false(mc_filter_match_budget(f, wide, &b));
    assert_true(b.exceeded);
    assert_string_equal(b.reason, "CPU budget exhausted");
    /* Within a generous budget, and without one, the answer is there. */
    b = (mc_filter_budget_t){.cpu_ns = 60000000000u};
    assert_true(mc_filter_match_budget(f, wide, &b));
    assert_false(b.exceeded);
    assert_true(mc_filter_match(f, wide));
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(wide);
    /* A small $expr within a small budget: never exceeded. */
    q = json("{\"$expr\": {\"$gt\": [\"$qty\", \"$min\"]}}");
    f = mc_filter_new(q, NULL, NULL);
    yes = json("{\"qty\": 5, \"min\": 2}");
    for (int i = 0; i < 2000; i++) {
        b = (mc_filter_budget_t){.cpu_ns = 1000000};
        assert_true(mc_filter_match_budget(f, yes, &b));
        assert_false(b.exceeded);
    }
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(yes);

    /* An ordinary filter within a small budget, many times: never exceeded, same answers. */
    q = json("{\"fullDocument.owner\": \"u1\", \"fullDocument.t\": {\"%regex\": \"^ord\", "
             "\"%options\": \"i\"}}");
    f = mc_filter_new(q, NULL, NULL);
    yes = json("{\"fullDocument\": {\"owner\": \"u1\", \"t\": \"Order 7\"}}");
    bson_t *no = json("{\"fullDocument\": {\"owner\": \"u1\", \"t\": \"invoice\"}}");
    for (int i = 0; i < 2000; i++) {
        b = (mc_filter_budget_t){.cpu_ns = 1000000};
        assert_true(mc_filter_match_budget(f, yes, &b));
        assert_false(mc_filter_match_budget(f, no, &b));
        assert_false(b.exceeded);
    }
    mc_filter_destroy(f);
    bson_destroy(q);
    bson_destroy(yes);
    bson_destroy(no);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_equality),
        cmocka_unit_test(test_null_missing),
        cmocka_unit_test(test_comparisons),
        cmocka_unit_test(test_in_nin_regex),
        cmocka_unit_test(test_type_size_all_mod),
        cmocka_unit_test(test_type_numeric),
        cmocka_unit_test(test_elem_match_and_logic),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_code_operators_and_limits),
        cmocka_unit_test(test_vars),
        cmocka_unit_test(test_is_empty),
        cmocka_unit_test(test_value_compare),
        cmocka_unit_test(test_reuse_and_many_docs),
        cmocka_unit_test(test_regex_pcre2),
        cmocka_unit_test(test_regex_limits_and_bad_utf8),
        cmocka_unit_test(test_budget),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
