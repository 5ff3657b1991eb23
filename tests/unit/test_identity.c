/*
 * test_identity.c: the identity rule (src/lib/identity.c, mongocast/identity.h): which BSON
 * values are identities, which are the same identity, how they are spelled in JSON, and the
 * edges of the numeric rule (int64 range, -0, decimal128 exponents and trailing zeros,
 * doubles beyond 2^53). Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "mongocast/identity.h"

/* The identity of the value of {"v": <json>} (Extended JSON), or len 0. */
static mc_identity_t of(const char *json)
{
    char doc[2048];
    snprintf(doc, sizeof(doc), "{\"v\":%s}", json);
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)doc, -1, &e);
    if (!b) {
        fail_msg("bad json %s: %s", doc, e.message);
    }
    bson_iter_t it;
    mc_identity_t id;
    assert_true(bson_iter_init_find(&it, b, "v"));
    mc_identity_from_iter(&it, &id);
    bson_destroy(b);
    return id;
}

static bool same(const char *a, const char *b)
{
    mc_identity_t x = of(a), y = of(b);
    return mc_identity_equal(x.bytes, x.len, y.bytes, y.len);
}

static const char *json_of(const char *value, char *buf)
{
    mc_identity_t id = of(value);
    if (!id.len) {
        return "(none)";
    }
    size_t n = mc_identity_json(id.bytes, id.len, buf);
    assert_int_equal(n, strlen(buf));
    return buf;
}

static void test_what_is_an_identity(void **state)
{
    (void)state;
    static const char *const yes[] = {
        "\"u1\"", "\"\"", "5", "{\"$numberLong\":\"-9000000000\"}", "5.0", "-0.0",
        "{\"$numberDecimal\":\"5\"}", "{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}",
        "{\"$binary\":{\"base64\":\"AAECAw==\",\"subType\":\"04\"}}", "\"a\\u0000b\"",
    };
    static const char *const no[] = {
        "null", "true", "5.5", "{\"$numberDouble\":\"NaN\"}", "{\"$numberDouble\":\"Infinity\"}",
        "{\"$numberDecimal\":\"5.1\"}", "{\"$numberDecimal\":\"NaN\"}",
        "{\"$numberDecimal\":\"-Infinity\"}", "[\"u1\"]", "[]", "{\"a\":\"u1\"}",
        "{\"$date\":\"2024-01-01T00:00:00Z\"}", "{\"$timestamp\":{\"t\":1,\"i\":1}}",
        "{\"$regularExpression\":{\"pattern\":\"u1\",\"options\":\"\"}}", "{\"$minKey\":1}",
        "{\"$numberDouble\":\"9.3e18\"}", "{\"$numberDecimal\":\"9223372036854775808\"}",
        "{\"$numberDecimal\":\"1E+19\"}",
    };
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (of(yes[i]).len == 0) {
            fail_msg("%s should be an identity", yes[i]);
        }
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        if (of(no[i]).len != 0) {
            fail_msg("%s should not be an identity", no[i]);
        }
    }
    /* Invalid UTF-8 and over-long strings are not identities. */
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    mc_identity_t id;
    v.value.v_utf8.str = (char *)"\xff\xfe";
    v.value.v_utf8.len = 2;
    assert_false(mc_identity_from_value(&v, &id));
    v.value.v_utf8.str = (char *)"a\xc0\x80"; /* the overlong NUL has no JSON spelling */
    v.value.v_utf8.len = 3;
    assert_false(mc_identity_from_value(&v, &id));
    static char big[MC_IDENTITY_MAX + 1];
    memset(big, 'x', sizeof(big));
    v.value.v_utf8.str = big;
    v.value.v_utf8.len = MC_IDENTITY_MAX - 1;
    assert_true(mc_identity_from_value(&v, &id));
    assert_int_equal(id.len, MC_IDENTITY_MAX);
    v.value.v_utf8.len = MC_IDENTITY_MAX;
    assert_false(mc_identity_from_value(&v, &id));
    assert_int_equal(id.len, 0);
    assert_false(mc_identity_from_value(NULL, &id));
}

static void test_which_are_the_same(void **state)
{
    (void)state;
    /* One integer, four BSON types. */
    assert_true(same("5", "{\"$numberLong\":\"5\"}"));
    assert_true(same("5", "5.0"));
    assert_true(same("5", "{\"$numberDecimal\":\"5\"}"));
    assert_true(same("5", "{\"$numberDecimal\":\"5.000\"}"));
    assert_true(same("5000", "{\"$numberDecimal\":\"5E+3\"}"));
    assert_true(same("5000", "{\"$numberDecimal\":\"0.5E+4\"}"));
    assert_true(same("0", "-0.0"));
    assert_true(same("0", "{\"$numberDecimal\":\"-0\"}"));
    assert_true(same("0", "{\"$numberDecimal\":\"0E-6\"}"));
    assert_true(same("{\"$numberLong\":\"-9223372036854775808\"}",
                     "{\"$numberDecimal\":\"-9223372036854775808\"}"));
    assert_true(same("{\"$numberLong\":\"-9223372036854775808\"}", "-9.223372036854775808e18"));
    assert_true(same("{\"$numberLong\":\"9223372036854775807\"}",
                     "{\"$numberDecimal\":\"9223372036854775807\"}"));
    /* A double only equals the integer it holds exactly. */
    assert_true(same("{\"$numberLong\":\"9007199254740992\"}", "9007199254740992.0"));
    assert_false(same("{\"$numberLong\":\"9007199254740993\"}", "9007199254740992.0"));
    /* Different types, same spelling: different identities. */
    assert_false(same("5", "\"5\""));
    assert_false(same("{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}", "\"64a7f2d1aabbccddeeff0099\""));
    assert_false(same("{\"$binary\":{\"base64\":\"AAECAw==\",\"subType\":\"04\"}}",
                      "{\"$binary\":{\"base64\":\"AAECAw==\",\"subType\":\"00\"}}"));
    /* Strings byte for byte, embedded NULs included. */
    assert_false(same("\"u3\"", "\"u3\\u0000evil\""));
    assert_false(same("\"u3\"", "\"U3\""));
    assert_false(same("\"u3\"", "\"u3 \""));
    assert_true(same("\"u3\\u0000evil\"", "\"u3\\u0000evil\""));
    /* An empty identity equals nothing, not even another empty one. */
    mc_identity_t none = of("null");
    assert_false(mc_identity_equal(none.bytes, none.len, none.bytes, none.len));
    assert_false(mc_identity_equal(NULL, 0, NULL, 0));
}

static void test_json_spelling(void **state)
{
    (void)state;
    char b[MC_IDENTITY_JSON_MAX];
    assert_string_equal(json_of("\"u1\"", b), "\"u1\"");
    assert_string_equal(json_of("\"a\\u0000b\\n\\\"\"", b), "\"a\\u0000b\\n\\\"\"");
    assert_string_equal(json_of("5.0", b), "5");
    assert_string_equal(json_of("{\"$numberDecimal\":\"-1.0E+2\"}", b), "-100");
    assert_string_equal(json_of("{\"$numberLong\":\"-9223372036854775808\"}", b),
                        "-9223372036854775808");
    assert_string_equal(json_of("{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}", b),
                        "{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}");
    assert_string_equal(json_of("{\"$binary\":{\"base64\":\"AAECAw==\",\"subType\":\"04\"}}", b),
                        "{\"$binary\":{\"base64\":\"AAECAw==\",\"subType\":\"04\"}}");
    /* The longest string of control characters fits the documented buffer. */
    static char ctl[MC_IDENTITY_MAX];
    memset(ctl, 1, sizeof(ctl));
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = ctl;
    v.value.v_utf8.len = MC_IDENTITY_MAX - 1;
    mc_identity_t id;
    assert_true(mc_identity_from_value(&v, &id));
    static char out[MC_IDENTITY_JSON_MAX];
    assert_int_equal(mc_identity_json(id.bytes, id.len, out), 6 * (MC_IDENTITY_MAX - 1) + 2);
    /* Malformed identities render as nothing. */
    uint8_t bad[] = {'i', 1, 2};
    assert_int_equal(mc_identity_json(bad, sizeof(bad), out), 0);
    uint8_t unknown[] = {'?', 1};
    assert_int_equal(mc_identity_json(unknown, sizeof(unknown), out), 0);
    assert_int_equal(mc_identity_json(NULL, 0, out), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_what_is_an_identity),
        cmocka_unit_test(test_which_are_the_same),
        cmocka_unit_test(test_json_spelling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
