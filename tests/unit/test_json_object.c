/*
 * test_json_object.c: the strict one-object JSON reader (src/daemon/json_object.c) that JWT
 * segments, `vars` and `filter` go through: integer literals int64 cannot hold become doubles
 * instead of being refused or wrapped around by libbson's reader, and nothing else changes
 * (strings, fractions, exponents, in-range integers). Main thread only.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdint.h>
#include <string.h>

#include "json_object.h"

/* Parses `json` (which must be accepted) and finds `path` in it. */
static bson_type_t value_at(const char *json, const char *path, bson_value_t *out)
{
    bson_t doc;
    if (mcd_json_object_parse(json, strlen(json), &doc) != 0) {
        fail_msg("%s: refused", json);
    }
    bson_iter_t it, found;
    assert_true(bson_iter_init(&it, &doc));
    if (!bson_iter_find_descendant(&it, path, &found)) {
        fail_msg("%s: no %s", json, path);
    }
    bson_value_copy(bson_iter_value(&found), out);
    bson_destroy(&doc);
    return out->value_type;
}

static void expect_double(const char *json, const char *path, double want)
{
    bson_value_t v;
    assert_int_equal(value_at(json, path, &v), BSON_TYPE_DOUBLE);
    assert_true(v.value.v_double == want);
}

static void expect_int64(const char *json, const char *path, int64_t want)
{
    bson_value_t v;
    assert_int_equal(value_at(json, path, &v), BSON_TYPE_INT64);
    assert_true(v.value.v_int64 == want);
}

static void expect_utf8(const char *json, const char *path, const char *want)
{
    bson_value_t v;
    assert_int_equal(value_at(json, path, &v), BSON_TYPE_UTF8);
    assert_string_equal(v.value.v_utf8.str, want);
    bson_value_destroy(&v);
}

static void expect_refused(const char *json)
{
    bson_t doc;
    if (mcd_json_object_parse(json, strlen(json), &doc) == 0) {
        bson_destroy(&doc);
        fail_msg("%s: accepted", json);
    }
}

static void test_big_integers_become_doubles(void **state)
{
    (void)state;
    /* libbson alone reads 2^64 as 0 and refuses 2^63. */
    expect_double("{\"a\":18446744073709551616}", "a", 18446744073709551616.0);
    expect_double("{\"a\":9223372036854775808}", "a", 9223372036854775808.0);
    expect_double("{\"a\":-9223372036854775809}", "a", -9223372036854775809.0);
    expect_refused("{\"a\":00018446744073709551616}"); /* leading zeros: not JSON */
    expect_double("{\"a\":123456789012345678901234567890}", "a", 123456789012345678901234567890.0);
    /* In arrays and nested documents, several in one text, next to other values. */
    const char *mixed =
        "{\"a\":[1,18446744073709551616,{\"b\":-18446744073709551616}],\"c\":36893488147419103232}";
    expect_double(mixed, "a.1", 18446744073709551616.0);
    expect_double(mixed, "a.2.b", -18446744073709551616.0);
    expect_double(mixed, "c", 36893488147419103232.0);
    bson_value_t v;
    assert_int_equal(value_at(mixed, "a.0", &v), BSON_TYPE_INT32);
}

static void test_everything_else_unchanged(void **state)
{
    (void)state;
    expect_int64("{\"a\":9223372036854775807}", "a", INT64_MAX);
    expect_int64("{\"a\":-9223372036854775808}", "a", INT64_MIN);
    expect_int64("{\"a\":2147483648}", "a", 2147483648);
    /* Digits inside strings, escaped quotes and backslashes included, are text. */
    const char *strs = "{\"18446744073709551616\":\"x\\\"18446744073709551616\\\\\","
                       "\"b\":\"\\\\\",\"c\":\"\\\"\"}";
    expect_utf8(strs, "18446744073709551616", "x\"18446744073709551616\\");
    expect_utf8(strs, "b", "\\");
    expect_utf8(strs, "c", "\"");
    /* Fractions and exponents are doubles already. */
    expect_double("{\"a\":18446744073709551616.5}", "a", 18446744073709551616.5);
    expect_double("{\"a\":1e19}", "a", 1e19);
    expect_double("{\"a\":-2E+3}", "a", -2e3);
    expect_refused("{\"a\":1e400}"); /* out of the double's range: refused as before */
    /* Still exactly one object. */
    expect_refused("{\"a\":1}{\"b\":18446744073709551616}");
    expect_refused("[18446744073709551616]");
    expect_refused("{\"a\":18446744073709551616");
    expect_refused("{\"a\":-}");
    expect_refused("{\"a\":18446744073709551616x}");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_big_integers_become_doubles),
        cmocka_unit_test(test_everything_else_unchanged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
