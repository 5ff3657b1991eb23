/*
 * test_update.c: mongo-emulator's update engine (update.c): every update operator, path
 * creation and array padding, MongoDB's error codes and messages, replacement and pipeline
 * updates, and the exact updateDescription shape the server's delta oplog produces
 * (including the spec test "Test array truncation"), plus emu_upsert_seed.
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
#include "update.h"

/* The update value: a document, or the array stored under "u" of {"u": [...]}. */
static bson_value_t update_value(const char *u, bson_t **holder)
{
    char *wrapped = bson_strdup_printf("{\"u\": %s}", u);
    *holder = json(wrapped);
    bson_free(wrapped);
    bson_iter_t it;
    bson_iter_init_find(&it, *holder, "u");
    return *bson_iter_value(&it);
}

static void assert_bson_eq(const bson_t *got, const char *want_json, const char *what)
{
    bson_t *want = json(want_json);
    if (!bson_equal(got, want)) {
        char *g = bson_as_relaxed_extended_json(got, NULL);
        char *w = bson_as_relaxed_extended_json(want, NULL);
        fail_msg("%s:\n  got  %s\n  want %s", what, g, w);
    }
    bson_destroy(want);
}

/* Applies `u` to `doc` and checks the result, `modified` and the updateDescription. */
static void check(const char *doc, const char *u, bool is_insert, const char *want_doc,
                  bool want_modified, const char *want_desc)
{
    bson_t *d = json(doc), *holder, out;
    bson_value_t uv = update_value(u, &holder);
    emu_update_desc_t desc;
    emu_update_desc_init(&desc);
    bool modified = !want_modified;
    mc_error_t err = {0};
    int rc = emu_update_apply(d, &uv, is_insert, &out, &desc, &modified, &err);
    if (rc != 0) {
        fail_msg("update %s on %s failed: %s", u, doc, err.message);
    }
    assert_bson_eq(&out, want_doc, u);
    if (modified != want_modified) {
        fail_msg("update %s on %s: modified=%d", u, doc, modified);
    }
    if (want_desc) {
        bson_t wrap = BSON_INITIALIZER;
        emu_update_desc_append(&desc, &wrap, "d");
        bson_iter_t it;
        bson_iter_init_find(&it, &wrap, "d");
        const uint8_t *data;
        uint32_t len;
        bson_iter_document(&it, &len, &data);
        bson_t got;
        bson_init_static(&got, data, len);
        assert_bson_eq(&got, want_desc, u);
        bson_destroy(&wrap);
    }
    emu_update_desc_cleanup(&desc);
    bson_destroy(&out);
    bson_destroy(d);
    bson_destroy(holder);
}

#define EMPTY_DESC "{\"updatedFields\": {}, \"removedFields\": [], \"truncatedArrays\": []}"
#define UPD(x) "{\"updatedFields\": " x ", \"removedFields\": [], \"truncatedArrays\": []}"

static void check_error(const char *doc, const char *u, int cause, const char *msg)
{
    bson_t *d = json(doc), *holder, out;
    bson_value_t uv = update_value(u, &holder);
    emu_update_desc_t desc;
    emu_update_desc_init(&desc);
    mc_error_t err = {0};
    bool modified = true;
    int rc = emu_update_apply(d, &uv, false, &out, &desc, &modified, &err);
    if (rc == 0) {
        fail_msg("update %s on %s should fail", u, doc);
    }
    assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
    if (err.cause != cause || !strstr(err.message, msg)) {
        fail_msg("update %s: got cause %d '%s', want %d '%s'", u, err.cause, err.message, cause,
                 msg);
    }
    assert_true(bson_empty(&out));
    assert_false(modified);
    assert_true(bson_empty(&desc.updated_fields));
    emu_update_desc_cleanup(&desc);
    bson_destroy(&out);
    bson_destroy(d);
    bson_destroy(holder);
}

static void test_set_unset(void **state)
{
    check("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"b\": 2}}", false,
          "{\"_id\": 1, \"a\": 1, \"b\": 2}", true, UPD("{\"b\": 2}"));
    check("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"a\": 1}}", false, "{\"_id\": 1, \"a\": 1}",
          false, EMPTY_DESC);
    /* int 1 -> double 1.0 is a change (binary comparison, like the server) */
    check("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"a\": 1.0}}", false, "{\"_id\": 1, \"a\": 1.0}",
          true, UPD("{\"a\": 1.0}"));
    check("{\"_id\": 1}", "{\"$set\": {\"a.b.c\": 1}}", false,
          "{\"_id\": 1, \"a\": {\"b\": {\"c\": 1}}}", true, UPD("{\"a\": {\"b\": {\"c\": 1}}}"));
    check("{\"_id\": 1, \"a\": {\"x\": 1}}", "{\"$set\": {\"a.b\": 2}}", false,
          "{\"_id\": 1, \"a\": {\"x\": 1, \"b\": 2}}", true, UPD("{\"a.b\": 2}"));
    check("{\"_id\": 1, \"a\": {\"x\": 1}}", "{\"$set\": {\"a.y.z\": 2, \"a.y.w\": 3}}", false,
          "{\"_id\": 1, \"a\": {\"x\": 1, \"y\": {\"w\": 3, \"z\": 2}}}", true,
          UPD("{\"a.y\": {\"w\": 3, \"z\": 2}}"));
    check("{\"_id\": 1, \"a\": {\"x\": 1}}", "{\"$set\": {\"a\": [1, 2]}}", false,
          "{\"_id\": 1, \"a\": [1, 2]}", true, UPD("{\"a\": [1, 2]}"));
    check("{\"_id\": 1, \"arr\": [1, 2, 3]}", "{\"$set\": {\"arr.1\": 5}}", false,
          "{\"_id\": 1, \"arr\": [1, 5, 3]}", true, UPD("{\"arr.1\": 5}"));
    check("{\"_id\": 1, \"arr\": [1]}", "{\"$set\": {\"arr.3\": 9}}", false,
          "{\"_id\": 1, \"arr\": [1, null, null, 9]}", true, UPD("{\"arr.3\": 9}"));
    check("{\"_id\": 1, \"arr\": [{\"b\": 1}]}", "{\"$set\": {\"arr.0.b\": 2}}", false,
          "{\"_id\": 1, \"arr\": [{\"b\": 2}]}", true, UPD("{\"arr.0.b\": 2}"));
    /* a numeric component on a missing field creates a document, as MongoDB does */
    check("{\"_id\": 1}", "{\"$set\": {\"a.0\": 1}}", false, "{\"_id\": 1, \"a\": {\"0\": 1}}",
          true, UPD("{\"a\": {\"0\": 1}}"));
    /* new fields are created in lexicographic order (MongoDB 5.0+) */
    check("{\"_id\": 1}", "{\"$set\": {\"z\": 1, \"b\": 1, \"a\": 1}}", false,
          "{\"_id\": 1, \"a\": 1, \"b\": 1, \"z\": 1}", true, NULL);
    check("{\"_id\": 1, \"a\": 1, \"b\": 2}", "{\"$unset\": {\"a\": \"\"}}", false,
          "{\"_id\": 1, \"b\": 2}", true,
          "{\"updatedFields\": {}, \"removedFields\": [\"a\"], \"truncatedArrays\": []}");
    check("{\"_id\": 1, \"a\": {\"b\": 1, \"c\": 1}}", "{\"$unset\": {\"a.b\": 1, \"x\": 1}}",
          false, "{\"_id\": 1, \"a\": {\"c\": 1}}", true,
          "{\"updatedFields\": {}, \"removedFields\": [\"a.b\"], \"truncatedArrays\": []}");
    check("{\"_id\": 1}", "{\"$unset\": {\"a\": 1}}", false, "{\"_id\": 1}", false, EMPTY_DESC);
    check("{\"_id\": 1, \"arr\": [1, 2]}", "{\"$unset\": {\"arr.0\": 1}}", false,
          "{\"_id\": 1, \"arr\": [null, 2]}", true, UPD("{\"arr.0\": null}"));
    check("{\"_id\": 1, \"a\": 1, \"b\": 2}", "{\"$set\": {\"c\": 3}, \"$unset\": {\"b\": 1}}",
          false, "{\"_id\": 1, \"a\": 1, \"c\": 3}", true,
          "{\"updatedFields\": {\"c\": 3}, \"removedFields\": [\"b\"], \"truncatedArrays\": []}");
    /* $set of _id to the same value is allowed and is a no-op */
    check("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"_id\": 1}}", false, "{\"_id\": 1, \"a\": 1}",
          false, EMPTY_DESC);
    /* empty operands are no-ops since MongoDB 5.0 */
    check("{\"_id\": 1}", "{\"$set\": {}}", false, "{\"_id\": 1}", false, EMPTY_DESC);
}

static void test_arithmetic(void **state)
{
    check("{\"_id\": 1, \"n\": 1}", "{\"$inc\": {\"n\": 2}}", false, "{\"_id\": 1, \"n\": 3}", true,
          UPD("{\"n\": 3}"));
    check("{\"_id\": 1}", "{\"$inc\": {\"n\": 5}}", false, "{\"_id\": 1, \"n\": 5}", true,
          UPD("{\"n\": 5}"));
    check("{\"_id\": 1, \"n\": 1}", "{\"$inc\": {\"n\": 0}}", false, "{\"_id\": 1, \"n\": 1}",
          false, EMPTY_DESC);
    check("{\"_id\": 1, \"n\": 1}", "{\"$inc\": {\"n\": 0.5}}", false, "{\"_id\": 1, \"n\": 1.5}",
          true, NULL);
    check("{\"_id\": 1, \"n\": 2147483647}", "{\"$inc\": {\"n\": 1}}", false,
          "{\"_id\": 1, \"n\": {\"$numberLong\": \"2147483648\"}}", true, NULL);
    check("{\"_id\": 1, \"n\": 3}", "{\"$mul\": {\"n\": 4}}", false, "{\"_id\": 1, \"n\": 12}",
          true, NULL);
    check("{\"_id\": 1}", "{\"$mul\": {\"n\": 4}}", false, "{\"_id\": 1, \"n\": 0}", true,
          UPD("{\"n\": 0}"));
    check("{\"_id\": 1, \"n\": 5}", "{\"$min\": {\"n\": 3}}", false, "{\"_id\": 1, \"n\": 3}", true,
          UPD("{\"n\": 3}"));
    check("{\"_id\": 1, \"n\": 5}", "{\"$min\": {\"n\": 7}}", false, "{\"_id\": 1, \"n\": 5}",
          false, EMPTY_DESC);
    check("{\"_id\": 1, \"n\": 5}", "{\"$max\": {\"n\": 7}}", false, "{\"_id\": 1, \"n\": 7}", true,
          NULL);
    /* $max across types uses the canonical order: strings sort above numbers */
    check("{\"_id\": 1, \"n\": 5}", "{\"$max\": {\"n\": \"a\"}}", false,
          "{\"_id\": 1, \"n\": \"a\"}", true, NULL);
    check("{\"_id\": 1}", "{\"$min\": {\"n\": 1}}", false, "{\"_id\": 1, \"n\": 1}", true, NULL);
    check_error("{\"_id\": 1, \"n\": \"x\"}", "{\"$inc\": {\"n\": 1}}", 14,
                "Cannot apply $inc to a value of non-numeric type. {_id: 1} has the field 'n' of "
                "non-numeric type string");
    check_error("{\"_id\": 1}", "{\"$inc\": {\"n\": \"x\"}}", 14,
                "Cannot increment with non-numeric argument: {n: \"x\"}");
    check_error("{\"_id\": 1, \"n\": {\"$numberLong\": \"9223372036854775807\"}}",
                "{\"$inc\": {\"n\": 1}}", 2, "Failed to apply $inc operations");
}

static void test_rename_currentdate_setoninsert(void **state)
{
    check("{\"_id\": 1, \"a\": 1, \"b\": 2}", "{\"$rename\": {\"a\": \"c\"}}", false,
          "{\"_id\": 1, \"b\": 2, \"c\": 1}", true,
          "{\"updatedFields\": {\"c\": 1}, \"removedFields\": [\"a\"], \"truncatedArrays\": []}");
    check("{\"_id\": 1, \"a\": {\"x\": 1}}", "{\"$rename\": {\"a.x\": \"b.y\"}}", false,
          "{\"_id\": 1, \"a\": {}, \"b\": {\"y\": 1}}", true,
          "{\"updatedFields\": {\"b\": {\"y\": 1}}, \"removedFields\": [\"a.x\"], "
          "\"truncatedArrays\": []}");
    check("{\"_id\": 1}", "{\"$rename\": {\"a\": \"b\"}}", false, "{\"_id\": 1}", false,
          EMPTY_DESC);
    check_error("{\"_id\": 1, \"a\": 1}", "{\"$rename\": {\"a\": \"a\"}}", 2,
                "The source and target field for $rename must differ");
    check_error("{\"_id\": 1, \"a\": 1}", "{\"$rename\": {\"a\": 5}}", 2,
                "The 'to' field for $rename must be a string");

    /* $currentDate: a date by default, a timestamp on request */
    bson_t *d = json("{\"_id\": 1}"), *holder, out;
    bson_value_t uv =
        update_value("{\"$currentDate\": {\"a\": true, \"b\": {\"%type\": \"timestamp\"}, "
                     "\"c\": {\"%type\": \"date\"}}}",
                     &holder);
    mc_error_t err;
    bool modified = false;
    assert_int_equal(emu_update_apply(d, &uv, false, &out, NULL, &modified, &err), 0);
    assert_true(modified);
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, &out, "a") && BSON_ITER_HOLDS_DATE_TIME(&it));
    assert_true(bson_iter_date_time(&it) > 1600000000000LL);
    assert_true(bson_iter_init_find(&it, &out, "b") && BSON_ITER_HOLDS_TIMESTAMP(&it));
    assert_true(bson_iter_init_find(&it, &out, "c") && BSON_ITER_HOLDS_DATE_TIME(&it));
    bson_destroy(&out);
    bson_destroy(holder);
    check_error("{\"_id\": 1}", "{\"$currentDate\": {\"a\": {\"%type\": \"x\"}}}", 2,
                "'date' or 'timestamp'");

    check("{\"_id\": 1}", "{\"$set\": {\"a\": 1}, \"$setOnInsert\": {\"b\": 2}}", false,
          "{\"_id\": 1, \"a\": 1}", true, NULL);
    check("{\"_id\": 1}", "{\"$set\": {\"a\": 1}, \"$setOnInsert\": {\"b\": 2}}", true,
          "{\"_id\": 1, \"a\": 1, \"b\": 2}", true, NULL);
    bson_destroy(d);
}

static void test_arrays(void **state)
{
    check("{\"_id\": 1, \"arr\": [1, 2, 3]}", "{\"$push\": {\"arr\": 4}}", false,
          "{\"_id\": 1, \"arr\": [1, 2, 3, 4]}", true, UPD("{\"arr.3\": 4}"));
    check("{\"_id\": 1, \"arr\": [1]}", "{\"$push\": {\"arr\": {\"$each\": [2, 3]}}}", false,
          "{\"_id\": 1, \"arr\": [1, 2, 3]}", true, UPD("{\"arr.1\": 2, \"arr.2\": 3}"));
    check("{\"_id\": 1}", "{\"$push\": {\"arr\": {\"x\": 1}}}", false,
          "{\"_id\": 1, \"arr\": [{\"x\": 1}]}", true, UPD("{\"arr\": [{\"x\": 1}]}"));
    check("{\"_id\": 1, \"arr\": [1, 2]}",
          "{\"$push\": {\"arr\": {\"$each\": [0], \"$position\": 0}}}", false,
          "{\"_id\": 1, \"arr\": [0, 1, 2]}", true, UPD("{\"arr\": [0, 1, 2]}"));
    check("{\"_id\": 1, \"arr\": [5, 1]}",
          "{\"$push\": {\"arr\": {\"$each\": [3], \"$sort\": 1, \"$slice\": 2}}}", false,
          "{\"_id\": 1, \"arr\": [1, 3]}", true, UPD("{\"arr\": [1, 3]}"));
    check("{\"_id\": 1, \"arr\": [1, 2, 3]}",
          "{\"$push\": {\"arr\": {\"$each\": [4], \"$slice\": -2}}}", false,
          "{\"_id\": 1, \"arr\": [3, 4]}", true, NULL);
    check("{\"_id\": 1, \"arr\": [{\"s\": 2}, {\"s\": 1}]}",
          "{\"$push\": {\"arr\": {\"$each\": [{\"s\": 3}], \"$sort\": {\"s\": -1}}}}", false,
          "{\"_id\": 1, \"arr\": [{\"s\": 3}, {\"s\": 2}, {\"s\": 1}]}", true, NULL);
    check_error("{\"_id\": 1, \"arr\": 5}", "{\"$push\": {\"arr\": 1}}", 2,
                "The field 'arr' must be an array but is of type int in document {_id: 1}");
    check_error("{\"_id\": 1, \"arr\": []}",
                "{\"$push\": {\"arr\": {\"$each\": [1], \"$bad\": 1}}}", 2,
                "Unrecognized clause in $push: $bad");

    check("{\"_id\": 1, \"arr\": [1, 2]}", "{\"$addToSet\": {\"arr\": 2}}", false,
          "{\"_id\": 1, \"arr\": [1, 2]}", false, EMPTY_DESC);
    check("{\"_id\": 1, \"arr\": [1, 2]}", "{\"$addToSet\": {\"arr\": 2.0}}", false,
          "{\"_id\": 1, \"arr\": [1, 2]}", false, EMPTY_DESC);
    check("{\"_id\": 1, \"arr\": [1, 2]}", "{\"$addToSet\": {\"arr\": {\"$each\": [2, 3, 3]}}}",
          false, "{\"_id\": 1, \"arr\": [1, 2, 3]}", true, UPD("{\"arr.2\": 3}"));
    check_error("{\"_id\": 1, \"arr\": 1}", "{\"$addToSet\": {\"arr\": 1}}", 2,
                "Cannot apply $addToSet to non-array field");

    check("{\"_id\": 1, \"arr\": [1, 2, 3, 2]}", "{\"$pull\": {\"arr\": 2}}", false,
          "{\"_id\": 1, \"arr\": [1, 3]}", true, UPD("{\"arr\": [1, 3]}"));
    check("{\"_id\": 1, \"arr\": [1, 5, 7]}", "{\"$pull\": {\"arr\": {\"$gte\": 5}}}", false,
          "{\"_id\": 1, \"arr\": [1]}", true, UPD("{\"arr\": [1]}"));
    check("{\"_id\": 1, \"arr\": [{\"a\": 1, \"b\": 1}, {\"a\": 2}]}",
          "{\"$pull\": {\"arr\": {\"a\": 1}}}", false, "{\"_id\": 1, \"arr\": [{\"a\": 2}]}", true,
          NULL);
    check("{\"_id\": 1, \"arr\": [1, 2]}", "{\"$pull\": {\"arr\": 9}}", false,
          "{\"_id\": 1, \"arr\": [1, 2]}", false, EMPTY_DESC);
    check("{\"_id\": 1, \"arr\": [1, 2, 3]}", "{\"$pullAll\": {\"arr\": [1, 3]}}", false,
          "{\"_id\": 1, \"arr\": [2]}", true, UPD("{\"arr\": [2]}"));
    check_error("{\"_id\": 1, \"arr\": [1]}", "{\"$pullAll\": {\"arr\": 1}}", 2,
                "$pullAll requires an array argument but was given a int");

    check("{\"_id\": 1, \"arr\": [1, 2, 3]}", "{\"$pop\": {\"arr\": 1}}", false,
          "{\"_id\": 1, \"arr\": [1, 2]}", true, UPD("{\"arr\": [1, 2]}"));
    check("{\"_id\": 1, \"arr\": [1, 2, 3]}", "{\"$pop\": {\"arr\": -1}}", false,
          "{\"_id\": 1, \"arr\": [2, 3]}", true, UPD("{\"arr\": [2, 3]}"));
    check("{\"_id\": 1, \"arr\": []}", "{\"$pop\": {\"arr\": 1}}", false,
          "{\"_id\": 1, \"arr\": []}", false, EMPTY_DESC);
    check_error("{\"_id\": 1, \"arr\": [1]}", "{\"$pop\": {\"arr\": 2}}", 9,
                "$pop expects 1 or -1, found: 2");
    check_error("{\"_id\": 1, \"arr\": 3}", "{\"$pop\": {\"arr\": 1}}", 14,
                "Path 'arr' contains an element of non-array type 'int'");
}

static void test_errors(void **state)
{
    check_error("{\"_id\": 1}", "{\"$foo\": {\"a\": 1}}", 9, "Unknown modifier: $foo");
    check_error("{\"_id\": 1}", "{\"$set\": {\"a\": 1}, \"b\": 2}", 9, "Unknown modifier: b");
    check_error("{\"_id\": 1}", "{\"$set\": 5}", 9,
                "Modifiers operate on fields but we found type int instead");
    check_error("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"a\": 2}, \"$inc\": {\"a.b\": 1}}", 40,
                "Updating the path 'a.b' would create a conflict at 'a'");
    check_error("{\"_id\": 1}", "{\"$set\": {\"a\": 1}, \"$unset\": {\"a\": 1}}", 40,
                "would create a conflict at 'a'");
    check_error("{\"_id\": 1}", "{\"$set\": {\"_id\": 2}}", 66,
                "Performing an update on the path '_id' would modify the immutable field '_id'");
    check_error("{\"_id\": 1}", "{\"$unset\": {\"_id\": 1}}", 66, "immutable field '_id'");
    check_error("{\"_id\": {\"a\": 1}}", "{\"$set\": {\"_id.a\": 2}}", 66, "immutable field '_id'");
    check_error("{\"_id\": 1, \"a\": 1}", "{\"$set\": {\"a.b\": 1}}", 28,
                "Cannot create field 'b' in element {a: 1}");
    check_error("{\"_id\": 1, \"a\": [1]}", "{\"$set\": {\"a.b\": 1}}", 28,
                "Cannot create field 'b' in element {a: [ 1 ]}");
    check_error("{\"_id\": 1}", "{\"$set\": {\"a..b\": 1}}", 56, "contains an empty field name");
    check_error("{\"_id\": 1}", "{\"$set\": {\"\": 1}}", 56, "An empty update path is not valid");
    check_error("{\"_id\": 1, \"a\": [1]}", "{\"$set\": {\"a.$\": 1}}", 2, "positional");
    check_error("{\"_id\": 1}", "{\"_id\": 2}", 66,
                "After applying the update, the (immutable) field '_id' was found to have been "
                "altered to _id: 2");
    check_error("{\"_id\": 1}", "[{\"$match\": {}}]", 72,
                "$match is not allowed to be used within an update");
    check_error("{\"_id\": 1}", "[{\"$set\": {\"_id\": 5}}]", 66, "(immutable) field '_id'");

    emu_update_kind_t kind;
    bson_t *holder;
    bson_value_t v = update_value("{\"$set\": {\"a\": 1}}", &holder);
    assert_int_equal(emu_update_kind(&v, &kind, NULL), 0);
    assert_int_equal(kind, EMU_UPDATE_OPERATORS);
    bson_destroy(holder);
    v = update_value("{\"a\": 1}", &holder);
    assert_int_equal(emu_update_kind(&v, &kind, NULL), 0);
    assert_int_equal(kind, EMU_UPDATE_REPLACEMENT);
    bson_destroy(holder);
    v = update_value("[{\"$set\": {\"a\": 1}}]", &holder);
    assert_int_equal(emu_update_kind(&v, &kind, NULL), 0);
    assert_int_equal(kind, EMU_UPDATE_PIPELINE);
    bson_destroy(holder);
    mc_error_t err;
    v = update_value("{\"a\": 1, \"$set\": {\"b\": 1}}", &holder);
    assert_int_equal(emu_update_kind(&v, &kind, &err), MC_EINVAL);
    assert_int_equal(err.cause, 9);
    bson_destroy(holder);
}

static void test_replacement(void **state)
{
    check("{\"_id\": 1, \"a\": 1}", "{\"b\": 2}", false, "{\"_id\": 1, \"b\": 2}", true,
          EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 1}", "{\"b\": 2, \"_id\": 1}", false, "{\"_id\": 1, \"b\": 2}", true,
          EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 1}", "{\"a\": 1}", false, "{\"_id\": 1, \"a\": 1}", false,
          EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 1}", "{}", false, "{\"_id\": 1}", true, EMPTY_DESC);
}

static void test_pipeline(void **state)
{
    /* MongoDB's change-stream spec test "Test array truncation" */
    check("{\"_id\": 1, \"a\": 1, \"array\": [\"foo\", {\"a\": \"bar\"}, 1, 2, 3]}",
          "[{\"$set\": {\"array\": [\"foo\", {\"a\": \"bar\"}]}}]", false,
          "{\"_id\": 1, \"a\": 1, \"array\": [\"foo\", {\"a\": \"bar\"}]}", true,
          "{\"updatedFields\": {}, \"removedFields\": [], \"truncatedArrays\": [{\"field\": "
          "\"array\", \"newSize\": 2}]}");
    check("{\"_id\": 1, \"a\": 1}", "[{\"$set\": {\"a\": 1}}]", false, "{\"_id\": 1, \"a\": 1}",
          false, EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 1, \"b\": 2}", "[{\"$unset\": \"b\"}, {\"$set\": {\"c\": 3}}]",
          false, "{\"_id\": 1, \"a\": 1, \"c\": 3}", true,
          "{\"updatedFields\": {\"c\": 3}, \"removedFields\": [\"b\"], \"truncatedArrays\": []}");
    /* a small sub-document is logged whole (its diff would be bigger than it) ... */
    check("{\"_id\": 1, \"a\": {\"x\": 1}}", "[{\"$set\": {\"a.x\": 2}}]", false,
          "{\"_id\": 1, \"a\": {\"x\": 2}}", true, UPD("{\"a\": {\"x\": 2}}"));
    /* ... a larger one field by field */
    check("{\"_id\": 1, \"a\": {\"x\": 1, \"y\": \"some longer string here\"}}",
          "[{\"$set\": {\"a.x\": 2}}]", false,
          "{\"_id\": 1, \"a\": {\"x\": 2, \"y\": \"some longer string here\"}}", true,
          UPD("{\"a.x\": 2}"));
    /* array element change and growth are reported per index */
    check("{\"_id\": 1, \"arr\": [\"aaaa\", \"bbbb\", \"cccc\"]}",
          "[{\"$set\": {\"arr\": [\"aaaa\", \"xxxx\", \"cccc\", \"dddd\"]}}]", false,
          "{\"_id\": 1, \"arr\": [\"aaaa\", \"xxxx\", \"cccc\", \"dddd\"]}", true,
          UPD("{\"arr.1\": \"xxxx\", \"arr.3\": \"dddd\"}"));
    check("{\"_id\": 1, \"a\": 5}", "[{\"$replaceWith\": {\"b\": \"$a\"}}]", false,
          "{\"_id\": 1, \"b\": 5}", true,
          "{\"updatedFields\": {\"b\": 5}, \"removedFields\": [\"a\"], \"truncatedArrays\": []}");
    check("{\"_id\": 1, \"a\": 5}", "[{\"$unset\": \"_id\"}]", false, "{\"_id\": 1, \"a\": 5}",
          false, EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 5}", "[{\"$project\": {\"a\": 1}}]", false, "{\"_id\": 1, \"a\": 5}",
          false, EMPTY_DESC);
    check("{\"_id\": 1, \"a\": 5}", "[{\"$addFields\": {\"b\": {\"$add\": [\"$a\", 1]}}}]", false,
          "{\"_id\": 1, \"a\": 5, \"b\": 6}", true, UPD("{\"b\": 6}"));
}

static void test_upsert_seed(void **state)
{
    bson_t *q = json("{\"a\": 1, \"b.c\": 2, \"d\": {\"$gt\": 1}, \"e\": {\"$eq\": 5}, "
                     "\"$and\": [{\"f\": \"x\"}, {\"g\": {\"$in\": [1]}}], \"_id\": 7, "
                     "\"h\": {\"k\": 1}, \"$or\": [{\"z\": 1}]}");
    bson_t out;
    mc_error_t err;
    assert_int_equal(emu_upsert_seed(q, &out, &err), 0);
    assert_bson_eq(&out,
                   "{\"_id\": 7, \"a\": 1, \"b\": {\"c\": 2}, \"e\": 5, \"f\": \"x\", "
                   "\"h\": {\"k\": 1}}",
                   "upsert seed");
    bson_destroy(&out);
    bson_destroy(q);

    q = json("{\"a\": 1, \"$and\": [{\"a\": 2}]}");
    assert_int_not_equal(emu_upsert_seed(q, &out, &err), 0);
    assert_int_equal(err.cause, 54);
    bson_destroy(&out);
    bson_destroy(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_set_unset),
        cmocka_unit_test(test_arithmetic),
        cmocka_unit_test(test_rename_currentdate_setoninsert),
        cmocka_unit_test(test_arrays),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_replacement),
        cmocka_unit_test(test_pipeline),
        cmocka_unit_test(test_upsert_seed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
