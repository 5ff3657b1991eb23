/*
 * test_json_writer.c: differential tests of the one-pass Extended JSON writer
 * (src/lib/json_writer.c) against libbson 1.23's own renderer, which is the specification:
 * every case renders the same document with bson_as_relaxed_extended_json() /
 * bson_as_canonical_extended_json() and with mc__json_render(), and the two results must be
 * byte-identical (or both refused). The nested form (mc__json_write_embedded) is checked the
 * same way inside a wrapper document, and the event message (mc_event_json /
 * mc_event_raw_json) against the message document the library used to build for libbson.
 * A few absolute expectations pin behaviour that both renderers share, so a change of the
 * installed libbson cannot silently move the target.
 *
 * Single-threaded. Random documents come from a fixed seed, so failures reproduce.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"
#include "json_strip.h"
#include "json_writer.h"
#include "mongocast/event.h"

/* ---- Comparison helpers ------------------------------------------------------------------ */

static size_t comparisons;
static size_t refused; /* documents both renderers refused */

static char *libbson_render(const bson_t *doc, mc__json_mode_t mode, size_t *len)
{
    return mode == MC__JSON_CANONICAL ? bson_as_canonical_extended_json(doc, len)
                                      : bson_as_relaxed_extended_json(doc, len);
}

static void report_mismatch(const char *what, const char *want, size_t want_len, const char *got,
                            size_t got_len)
{
    size_t i = 0;
    while (want && got && i < want_len && i < got_len && want[i] == got[i]) {
        i++;
    }
    fail_msg("%s differs at byte %zu\n libbson: %.*s\n    ours: %.*s", what, i,
             want ? (int)(want_len > i + 60 ? 60 : want_len - i) : 6, want ? want + i : "(NULL)",
             got ? (int)(got_len > i + 60 ? 60 : got_len - i) : 6, got ? got + i : "(NULL)");
}

/* Compact mode: libbson's text stripped, byte for byte, and it reads back (with libbson's
 * parser) as the same BSON as the spaced text does. */
static void check_compact(const bson_t *doc, mc__json_mode_t mode)
{
    size_t want_len = 0, got_len = 0, spaced_len = 0;
    char *spaced = libbson_render(doc, mode, &spaced_len);
    char *got = mc__json_render(doc, mode | MC__JSON_COMPACT, 0, &got_len, NULL);
    comparisons++;
    if (!spaced || !got) {
        if (spaced || got) {
            report_mismatch("compact (refusal)", spaced, spaced_len, got, got_len);
        }
        bson_free(spaced);
        bson_free(got);
        return;
    }
    char *want = json_strip_spaces(spaced, spaced_len, &want_len);
    if (want_len != got_len || memcmp(want, got, want_len) != 0) {
        report_mismatch("compact", want, want_len, got, got_len);
    }
    bson_t a, b;
    bson_error_t e;
    bool pa = bson_init_from_json(&a, spaced, (ssize_t)spaced_len, &e);
    bool pb = bson_init_from_json(&b, got, (ssize_t)got_len, &e);
    assert_int_equal(pa, pb);
    if (pa) {
        assert_true(a.len == b.len && memcmp(bson_get_data(&a), bson_get_data(&b), a.len) == 0);
        bson_destroy(&a);
        bson_destroy(&b);
    }
    bson_free(want);
    bson_free(spaced);
    bson_free(got);
}

/* Renders doc both ways, in one mode, whole and nested; asserts identical bytes. Returns
 * whether libbson accepted it. */
static bool check_mode(const bson_t *doc, mc__json_mode_t mode)
{
    size_t want_len = 0, got_len = 0;
    char *want = libbson_render(doc, mode, &want_len);
    int err = 0;
    char *got = mc__json_render(doc, mode, 0, &got_len, &err);
    comparisons++;
    if (!want || !got) {
        if (want || got) {
            report_mismatch(mode == MC__JSON_CANONICAL ? "canonical (refusal)"
                                                       : "relaxed (refusal)",
                            want, want_len, got, got_len);
        }
        assert_int_equal(err, MC__JSON_EINVALID);
        assert_int_equal(got_len, 0);
    } else if (want_len != got_len || memcmp(want, got, want_len) != 0) {
        report_mismatch(mode == MC__JSON_CANONICAL ? "canonical" : "relaxed", want, want_len, got,
                        got_len);
    } else {
        assert_int_equal(err, MC__JSON_OK);
        assert_int_equal(strlen(got), got_len);
    }
    bool accepted = want != NULL;
    bson_free(want);
    bson_free(got);

    /* Nested: { "v" : doc } rendered by libbson vs. our prefix + embedded + suffix. */
    bson_t wrap = BSON_INITIALIZER;
    assert_true(bson_append_document(&wrap, "v", 1, doc));
    want = libbson_render(&wrap, mode, &want_len);
    mc__json_buf_t b;
    mc__json_buf_init(&b, 16, 0);
    MC__JSON_LIT(&b, "{ \"v\" : ");
    mc__json_write_embedded(&b, doc, mode, 0);
    MC__JSON_LIT(&b, " }");
    got = mc__json_buf_steal(&b, &got_len);
    comparisons++;
    if ((want == NULL) != (got == NULL) ||
        (want && (want_len != got_len || memcmp(want, got, want_len) != 0))) {
        report_mismatch("embedded", want, want_len, got, got_len);
    }
    bson_free(want);
    bson_free(got);
    bson_destroy(&wrap);
    return accepted;
}

static bool check_doc(const bson_t *doc)
{
    bool a = check_mode(doc, MC__JSON_RELAXED);
    bool b = check_mode(doc, MC__JSON_CANONICAL);
    check_compact(doc, MC__JSON_RELAXED);
    check_compact(doc, MC__JSON_CANONICAL);
    assert_int_equal(a, b);
    if (!a) {
        refused++;
    }
    return a;
}

/* Our relaxed rendering of doc (asserted identical to libbson's); caller frees. */
static char *relaxed_of(const bson_t *doc)
{
    check_doc(doc);
    return mc__json_render(doc, MC__JSON_RELAXED, 0, NULL, NULL);
}

/* A document holding one element whose value bytes are given raw (for values libbson's
 * append API cannot produce: embedded NULs in code, unsorted regex options, corrupt BSON). */
static bson_t *raw_element_doc(uint8_t type, const char *key, const void *val, size_t vlen)
{
    size_t klen = strlen(key);
    size_t total = 4 + 1 + klen + 1 + vlen + 1;
    uint8_t *buf = calloc(1, total);
    assert_non_null(buf);
    uint32_t le = BSON_UINT32_TO_LE((uint32_t)total);
    memcpy(buf, &le, 4);
    buf[4] = type;
    memcpy(buf + 5, key, klen + 1);
    memcpy(buf + 6 + klen, val, vlen);
    bson_t *doc = bson_new_from_data(buf, total);
    assert_non_null(doc);
    free(buf);
    return doc;
}

/* Length-prefixed BSON string value: int32 (n + 1), bytes, NUL. Returns its size. */
static size_t bson_str(uint8_t *out, const char *s, size_t n)
{
    uint32_t le = BSON_UINT32_TO_LE((uint32_t)(n + 1));
    memcpy(out, &le, 4);
    memcpy(out + 4, s, n);
    out[4 + n] = 0;
    return 4 + n + 1;
}

/* Appends `doc`'s elements, keys as they are, as an array value (bson_append_array warns
 * when the first key is not "0"; libbson renders such arrays all the same). */
static void append_as_array(bson_t *parent, const char *key, const bson_t *doc)
{
    bson_t child;
    assert_true(bson_append_array_begin(parent, key, -1, &child));
    assert_true(bson_concat(&child, doc));
    assert_true(bson_append_array_end(parent, &child));
}

/* ---- Every type ---------------------------------------------------------------------------- */

static void append_all_types(bson_t *d)
{
    bson_oid_t oid;
    bson_oid_init_from_string(&oid, "64a7f2d1aabbccddeeff0011");
    bson_decimal128_t dec;
    bson_t sub = BSON_INITIALIZER, arr = BSON_INITIALIZER, scope = BSON_INITIALIZER;
    BSON_APPEND_INT32(&sub, "x", 1);
    BSON_APPEND_UTF8(&arr, "0", "a");
    BSON_APPEND_BOOL(&arr, "1", false);
    BSON_APPEND_INT64(&scope, "n", 7);

    BSON_APPEND_DOUBLE(d, "double", 1.5);
    BSON_APPEND_DOUBLE(d, "double_integral", 1.0);
    BSON_APPEND_UTF8(d, "string", "h\xc3\xa9llo \"w\"\n");
    BSON_APPEND_DOCUMENT(d, "document", &sub);
    BSON_APPEND_ARRAY(d, "array", &arr);
    bson_t empty = BSON_INITIALIZER;
    BSON_APPEND_DOCUMENT(d, "empty_document", &empty);
    BSON_APPEND_ARRAY(d, "empty_array", &empty);
    static const uint8_t bin[] = {0, 1, 2, 0xfb, 0xff, 0xfe, 0x7f};
    for (unsigned st = 0; st <= 9; st++) {
        char key[32];
        snprintf(key, sizeof(key), "binary_%u", st);
        assert_true(bson_append_binary(d, key, -1, (bson_subtype_t)st, bin, sizeof(bin)));
    }
    assert_true(bson_append_binary(d, "binary_user_80", -1, BSON_SUBTYPE_USER, bin, 4));
    assert_true(bson_append_binary(d, "binary_user_ff", -1, (bson_subtype_t)0xff, bin, 5));
    for (size_t n = 0; n <= 6; n++) { /* every padding case */
        char key[32];
        snprintf(key, sizeof(key), "binary_len_%zu", n);
        assert_true(bson_append_binary(d, key, -1, BSON_SUBTYPE_BINARY, bin, (uint32_t)n));
    }
    BSON_APPEND_UNDEFINED(d, "undefined");
    BSON_APPEND_OID(d, "oid", &oid);
    BSON_APPEND_BOOL(d, "true", true);
    BSON_APPEND_BOOL(d, "false", false);
    BSON_APPEND_DATE_TIME(d, "date", 1688728273456LL);
    BSON_APPEND_DATE_TIME(d, "date_whole_second", 1688728273000LL);
    BSON_APPEND_DATE_TIME(d, "date_negative", -1);
    BSON_APPEND_NULL(d, "null");
    BSON_APPEND_REGEX(d, "regex", "^a\"b\\\\c/$", "xusmli");
    BSON_APPEND_REGEX(d, "regex_no_options", "a", "");
    assert_true(bson_append_dbpointer(d, "dbpointer", -1, "db.coll\"x", &oid));
    BSON_APPEND_CODE(d, "code", "function() { return \"x\"; }");
    BSON_APPEND_SYMBOL(d, "symbol", "sym\tbol");
    BSON_APPEND_CODE_WITH_SCOPE(d, "code_w_scope", "f(n)", &scope);
    BSON_APPEND_CODE_WITH_SCOPE(d, "code_w_empty_scope", "g()", &empty);
    BSON_APPEND_INT32(d, "int32", -2147483647 - 1);
    BSON_APPEND_INT32(d, "int32_max", 2147483647);
    BSON_APPEND_TIMESTAMP(d, "timestamp", 4294967295u, 4294967295u);
    BSON_APPEND_TIMESTAMP(d, "timestamp_zero", 0, 0);
    BSON_APPEND_INT64(d, "int64", INT64_MIN);
    BSON_APPEND_INT64(d, "int64_max", INT64_MAX);
    static const char *decimals[] = {"0",
                                     "-0",
                                     "1.5",
                                     "NaN",
                                     "Infinity",
                                     "-Infinity",
                                     "1E+6111",
                                     "1.000000000000000000000000000000000E-6143",
                                     "-1234567890123456789012345678901234",
                                     "1.23E-7"};
    for (size_t i = 0; i < sizeof(decimals) / sizeof(decimals[0]); i++) {
        char key[32];
        snprintf(key, sizeof(key), "decimal_%zu", i);
        assert_true(bson_decimal128_from_string(decimals[i], &dec));
        BSON_APPEND_DECIMAL128(d, key, &dec);
    }
    BSON_APPEND_MAXKEY(d, "maxkey");
    BSON_APPEND_MINKEY(d, "minkey");
    bson_destroy(&sub);
    bson_destroy(&arr);
    bson_destroy(&scope);
}

static void test_every_type(void **state)
{
    (void)state;
    bson_t d = BSON_INITIALIZER;
    append_all_types(&d);
    assert_true(check_doc(&d));

    /* Also every type inside an array, and the whole set nested twice. */
    bson_t outer = BSON_INITIALIZER, arr = BSON_INITIALIZER;
    bson_iter_t it;
    assert_true(bson_iter_init(&it, &d));
    for (int i = 0; bson_iter_next(&it); i++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", i);
        assert_true(bson_append_iter(&arr, key, -1, &it));
    }
    BSON_APPEND_ARRAY(&outer, "all", &arr);
    BSON_APPEND_DOCUMENT(&outer, "again", &d);
    assert_true(check_doc(&outer));

    /* Absolute spot checks of shared behaviour. */
    char *s = relaxed_of(&d);
    assert_non_null(strstr(s, "\"double_integral\" : 1.0,"));
    assert_non_null(strstr(s, "\"empty_document\" : {  }, \"empty_array\" : [  ]"));
    assert_non_null(strstr(s, "\"options\" : \"ilmsux\""));
    assert_non_null(strstr(s, "\"date\" : { \"$date\" : \"2023-07-07T11:11:13.456Z\" }"));
    assert_non_null(strstr(s, "\"date_whole_second\" : { \"$date\" : \"2023-07-07T11:11:13Z\" }"));
    assert_non_null(strstr(s, "{ \"$date\" : { \"$numberLong\" : \"-1\" } }"));
    assert_non_null(strstr(s, "\"int64\" : -9223372036854775808,"));
    assert_non_null(strstr(s, "\"subType\" : \"ff\""));
    assert_non_null(strstr(s, "\"binary_len_1\" : { \"$binary\" : { \"base64\" : \"AA==\""));
    bson_free(s);
    s = mc__json_render(&d, MC__JSON_CANONICAL, 0, NULL, NULL);
    assert_non_null(strstr(s, "\"double_integral\" : { \"$numberDouble\" : \"1.0\" }"));
    assert_non_null(strstr(s, "\"int32\" : { \"$numberInt\" : \"-2147483648\" }"));
    bson_free(s);

    bson_t empty = BSON_INITIALIZER;
    s = relaxed_of(&empty);
    assert_string_equal(s, "{ }");
    bson_free(s);
    bson_destroy(&empty);
    bson_destroy(&arr);
    bson_destroy(&outer);
    bson_destroy(&d);
}

/* ---- Strings --------------------------------------------------------------------------- */

static void check_string_everywhere(const char *s, size_t n)
{
    /* As a string value, code, symbol, as a key (no NUL possible), regex pattern and
     * dbpointer name (C strings), and code-with-scope code. */
    bson_t d = BSON_INITIALIZER;
    assert_true(bson_append_utf8(&d, "s", 1, s, (int)n));
    assert_true(bson_append_symbol(&d, "y", 1, s, (int)n));
    check_doc(&d);
    bson_destroy(&d);

    uint8_t val[512];
    assert_true(n < 200);
    size_t vlen = bson_str(val, s, n);
    bson_t *code = raw_element_doc(BSON_TYPE_CODE, "c", val, vlen);
    check_doc(code);
    bson_destroy(code);

    /* code with scope: int32 total, string, empty scope document */
    uint8_t cws[512];
    size_t sl = bson_str(cws + 4, s, n);
    static const uint8_t empty_doc[] = {5, 0, 0, 0, 0};
    memcpy(cws + 4 + sl, empty_doc, 5);
    uint32_t total = BSON_UINT32_TO_LE((uint32_t)(4 + sl + 5));
    memcpy(cws, &total, 4);
    bson_t *cw = raw_element_doc(BSON_TYPE_CODEWSCOPE, "w", cws, 4 + sl + 5);
    check_doc(cw);
    bson_destroy(cw);

    /* dbpointer: the name may hold NULs (validated whole, printed up to the first NUL) */
    uint8_t dbp[512];
    size_t dl = bson_str(dbp, s, n);
    memset(dbp + dl, 0xab, 12);
    bson_t *db = raw_element_doc(BSON_TYPE_DBPOINTER, "p", dbp, dl + 12);
    check_doc(db);
    bson_destroy(db);

    if (memchr(s, 0, n) == NULL) {
        bson_t k = BSON_INITIALIZER;
        assert_true(bson_append_int32(&k, s, (int)n, 1));
        check_doc(&k);
        bson_destroy(&k);
        /* the same key in an array: validated though not printed */
        bson_t a = BSON_INITIALIZER;
        append_as_array(&a, "arr", &k);
        check_doc(&a);
        bson_destroy(&a);

        uint8_t rx[512];
        memcpy(rx, s, n);
        rx[n] = 0;
        memcpy(rx + n + 1, "i", 2);
        bson_t *r = raw_element_doc(BSON_TYPE_REGEX, "r", rx, n + 3);
        check_doc(r);
        bson_destroy(r);
    }
}

static void test_strings(void **state)
{
    (void)state;
    for (int c = 0; c < 256; c++) {
        char s[4] = {'a', (char)c, 'b', 0};
        check_string_everywhere(s, 3);
        check_string_everywhere(s + 1, 1);
    }
    static const struct {
        const char *s;
        size_t n;
    } cases[] = {
        {"", 0},
        {"plain ascii text that is longer than eight bytes", 48},
        {"quote\" back\\slash /slash", 24},
        {"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15"
         "\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x7f",
         32},
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf \xef\xbf\xbf", 21},
        {"\xe2\x80\xa8\xe2\x80\xa9", 6}, /* U+2028/2029 stay raw */
        {"emb\0edded NUL", 13},
        {"\0", 1},
        {"ab\0\0cd", 6},
        {"\xc0\x80", 2}, /* overlong NUL */
        {"x\xc0\x80y", 4},
        {"\xc0\xaf", 2},         /* overlong '/' */
        {"\xe0\x80\xaf", 3},     /* overlong 3-byte */
        {"\xf0\x80\x80\xaf", 4}, /* overlong 4-byte */
        {"\xed\xa0\x80", 3},     /* surrogate */
        {"\xed\xbf\xbf", 3},
        {"\xf4\x90\x80\x80", 4}, /* > U+10FFFF */
        {"\xf5\x80\x80\x80", 4},
        {"\xf8\x88\x80\x80\x80", 5},
        {"\x80", 1}, /* lone continuation */
        {"\xc3", 1}, /* truncated */
        {"abc\xe2\x82", 5},
        {"\xfe\xff", 2},
        {"12345678\xc3\xa9", 10}, /* multi-byte right after a plain word */
        {"1234567\"", 8},
        {"1234567\\89abcdef\x1f", 17},
        {"ok\0\xc0\x80", 5}, /* dbpointer: C0 80 after the NUL is accepted there */
        {"ok\0\xff", 4},     /* dbpointer: invalid after the NUL still refuses */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        check_string_everywhere(cases[i].s, cases[i].n);
    }

    /* Absolute checks of the escaping both renderers share. */
    bson_t d = BSON_INITIALIZER;
    bson_append_utf8(&d, "k\x01", 2, "\x01\x1f\x7f/\"\\\b\f\n\r\t", 11);
    bson_append_utf8(&d, "n", 1, "a\0b", 3);
    char *s = relaxed_of(&d);
    assert_string_equal(s, "{ \"k\\u0001\" : \"\\u0001\\u001f\x7f/\\\"\\\\\\b\\f\\n\\r\\t\", "
                           "\"n\" : \"a\\u0000b\" }");
    bson_free(s);
    bson_destroy(&d);
    bson_init(&d);
    bson_append_utf8(&d, "bad", 3, "\xff", 1);
    assert_null(mc__json_render(&d, MC__JSON_RELAXED, 0, NULL, NULL));
    check_doc(&d);
    bson_destroy(&d);

    /* mc__json_write_string on its own */
    mc__json_buf_t b;
    mc__json_buf_init(&b, 0, 0);
    assert_int_equal(mc__json_write_string(&b, "a\"\xc3\xa9", 4), MC__JSON_OK);
    size_t len = 0;
    s = mc__json_buf_steal(&b, &len);
    assert_string_equal(s, "\"a\\\"\xc3\xa9\"");
    assert_int_equal(len, 7);
    bson_free(s);
    mc__json_buf_init(&b, 0, 0);
    assert_int_equal(mc__json_write_string(&b, "\xc3", 1), MC__JSON_EINVALID);
    assert_null(mc__json_buf_steal(&b, &len));
    assert_int_equal(len, 0);
}

/* ---- Numbers and dates ------------------------------------------------------------------ */

static void test_doubles(void **state)
{
    (void)state;
    const double values[] = {0.0,
                             -0.0,
                             1.0,
                             -1.0,
                             0.1,
                             -0.1,
                             0.25,
                             0.5,
                             0.0625,
                             0.03125,
                             1.5,
                             12345.75,
                             -12345.0625,
                             1e15,
                             1e16,
                             1e17,
                             1e20,
                             1e21,
                             1e22,
                             123456789012345680.0,
                             9007199254740991.0,
                             9007199254740992.0,
                             9007199254740993.0,
                             4503599627370495.5,
                             2251799813685247.75,
                             1125899906842623.875,
                             562949953421311.9375,
                             281474976710655.96875,
                             -140737488355327.984375,
                             1e308,
                             -1e308,
                             1.7976931348623157e308,
                             2.2250738585072014e-308,
                             5e-324,
                             -5e-324,
                             1e-4,
                             1.5e-4,
                             0.00001,
                             3.141592653589793,
                             2.718281828459045,
                             1.0 / 3.0,
                             100.0,
                             4294967296.0,
                             NAN,
                             -NAN,
                             INFINITY,
                             -INFINITY};
    bson_t d = BSON_INITIALIZER;
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        char key[16];
        snprintf(key, sizeof(key), "%zu", i);
        BSON_APPEND_DOUBLE(&d, key, values[i]);
    }
    /* Every multiple of 1/16 in a range, and values around the fast path's limits. */
    for (int i = -300; i <= 300; i++) {
        char key[16];
        snprintf(key, sizeof(key), "q%d", i);
        BSON_APPEND_DOUBLE(&d, key, i / 16.0);
        snprintf(key, sizeof(key), "t%d", i);
        BSON_APPEND_DOUBLE(&d, key, ldexp(1.0, i));
        snprintf(key, sizeof(key), "m%d", i);
        BSON_APPEND_DOUBLE(&d, key, 9007199254740992.0 + i * 2.0);
    }
    check_doc(&d);
    char *s = relaxed_of(&d);
    assert_non_null(strstr(s, "\"0\" : 0.0, \"1\" : -0.0, \"2\" : 1.0,"));
    assert_non_null(strstr(s, "\"4\" : 0.10000000000000000555,"));
    assert_non_null(strstr(s, "\"17\" : 1e+21,"));
    assert_non_null(strstr(s, "{ \"$numberDouble\" : \"NaN\" }, \"44\" : { \"$numberDouble\" : "
                              "\"NaN\" }, \"45\" : { \"$numberDouble\" : \"Infinity\" }"));
    bson_free(s);
    bson_destroy(&d);
}

static void test_dates(void **state)
{
    (void)state;
    const int64_t values[] = {INT64_MIN,
                              -62135596800001LL,
                              -1000,
                              -1,
                              0,
                              1,
                              999,
                              1000,
                              68169600000LL,     /* 1972-02-29 */
                              951782400000LL,    /* 2000-02-29 */
                              951868800000LL,    /* 2000-03-01 */
                              4107542400000LL,   /* 2100-03-01 */
                              4102444799999LL,   /* 2099-12-31T23:59:59.999 */
                              253402300799999LL, /* 9999-12-31T23:59:59.999 */
                              253402300800000LL, /* 10000-01-01 */
                              253402300800001LL,
                              2534023008000000LL,
                              INT64_MAX / 1000 * 1000,
                              INT64_MAX};
    bson_t d = BSON_INITIALIZER;
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        char key[16];
        snprintf(key, sizeof(key), "%zu", i);
        BSON_APPEND_DATE_TIME(&d, key, values[i]);
    }
    /* One value in every month for 120 years around the epoch's range, odd milliseconds. */
    for (int64_t ms = 0; ms < 4000000000000LL; ms += 2629746000LL + 17) {
        char key[24];
        snprintf(key, sizeof(key), "r%" PRId64, ms);
        BSON_APPEND_DATE_TIME(&d, key, ms);
    }
    check_doc(&d);
    char *s = relaxed_of(&d);
    /* libbson 1.23 prints dates past 9999 as ISO-8601 with a five-digit year (it only falls
     * back to $numberLong for negative values). */
    assert_non_null(strstr(s, "\"13\" : { \"$date\" : \"9999-12-31T23:59:59.999Z\" }"));
    assert_non_null(strstr(s, "\"14\" : { \"$date\" : \"10000-01-01T00:00:00Z\" }"));
    assert_non_null(strstr(s, "\"9\" : { \"$date\" : \"2000-02-29T00:00:00Z\" }"));
    bson_free(s);
    bson_destroy(&d);
}

/* ---- Nesting --------------------------------------------------------------------------- */

/* A chain of `depth` documents (or arrays) each holding the next, innermost {"x": 1}. */
static bson_t *nested(int depth, bool arrays, bool alternate)
{
    bson_t *cur = BCON_NEW("x", BCON_INT32(1));
    for (int i = 0; i < depth; i++) {
        bson_t *next = bson_new();
        bool as_array = alternate ? (i % 2 == 0) : arrays;
        if (as_array) {
            append_as_array(next, "0", cur);
        } else {
            bson_append_document(next, "d", 1, cur);
        }
        bson_destroy(cur);
        cur = next;
    }
    return cur;
}

static void test_nesting(void **state)
{
    (void)state;
    const int depths[] = {1, 2, 99, 100, 101, 198, 199, 200, 201, 202, 250};
    for (size_t i = 0; i < sizeof(depths) / sizeof(depths[0]); i++) {
        for (int kind = 0; kind < 3; kind++) {
            bson_t *d = nested(depths[i], kind == 1, kind == 2);
            check_doc(d);
            bson_destroy(d);
        }
    }
    /* Depth 100 is rendered in full; past 200 levels libbson (and we) print "{ ... }". */
    bson_t *d = nested(100, false, false);
    char *s = relaxed_of(d);
    assert_null(strstr(s, "..."));
    assert_non_null(strstr(s, "\"x\" : 1"));
    bson_free(s);
    bson_destroy(d);
    d = nested(250, false, false);
    s = relaxed_of(d);
    assert_non_null(strstr(s, "{ ... }"));
    bson_free(s);
    bson_destroy(d);

    /* Code-with-scope chains: each scope restarts the depth; chains deeper than the writer's
     * own limit go through libbson for that value. */
    for (int chain = 1; chain <= 9; chain++) {
        bson_t *scope = nested(chain * 30, false, true);
        for (int i = 0; i < chain; i++) {
            bson_t *next = bson_new();
            BSON_APPEND_CODE_WITH_SCOPE(next, "w", "f()", scope);
            BSON_APPEND_UTF8(next, "s", "t\n");
            bson_destroy(scope);
            scope = next;
        }
        check_doc(scope);
        bson_destroy(scope);
    }
}

/* ---- Corrupt and odd BSON --------------------------------------------------------------- */

static void check_raw_bytes(const uint8_t *data, size_t len)
{
    bson_t doc;
    if (bson_init_static(&doc, data, len)) {
        check_doc(&doc);
    }
}

static void test_corrupt(void **state)
{
    (void)state;
    /* nested document whose last byte is not NUL: libbson prints nothing for the value */
    static const uint8_t bad_trailer[] = {0x16, 0,    0,   0, 0x03, 'a', 0, 0x05, 0, 0, 0,
                                          0x01, 0x10, 'b', 0, 0x01, 0,   0, 0,    0, 0, 0};
    uint8_t buf[64];
    memcpy(buf, bad_trailer, sizeof(bad_trailer));
    buf[0] = (uint8_t)sizeof(bad_trailer);
    check_raw_bytes(buf, sizeof(bad_trailer));
    /* first type byte 0 at top level: libbson says "{ }" */
    static const uint8_t eod_first[] = {0x0c, 0, 0, 0, 0x00, 0x10, 'a', 0, 1, 0, 0, 0};
    check_raw_bytes(eod_first, sizeof(eod_first));
    /* the same nested: corrupt */
    static const uint8_t nested_eod[] = {0x14, 0,    0,    0,   0x03, 'd', 0, 0x0c, 0, 0,
                                         0,    0x00, 0x10, 'a', 0,    1,   0, 0,    0, 0};
    check_raw_bytes(nested_eod, sizeof(nested_eod));
    /* unknown type byte */
    static const uint8_t unknown[] = {0x0c, 0, 0, 0, 0x42, 'a', 0, 1, 0, 0, 0, 0};
    check_raw_bytes(unknown, sizeof(unknown));
    /* bool that is not 0/1 */
    static const uint8_t bad_bool[] = {0x09, 0, 0, 0, 0x08, 'a', 0, 2, 0};
    check_raw_bytes(bad_bool, sizeof(bad_bool));
    /* string length past the end */
    static const uint8_t bad_str[] = {0x0e, 0, 0, 0, 0x02, 'a', 0, 0x40, 0, 0, 0, 'x', 0, 0};
    check_raw_bytes(bad_str, sizeof(bad_str));
    /* invalid UTF-8 key, at top level and as an array index */
    static const uint8_t bad_key[] = {0x0b, 0, 0, 0, 0x0a, 0xff, 0, 0x0a, 'b', 0, 0};
    check_raw_bytes(bad_key, sizeof(bad_key));
    /* regex with unsorted, duplicate and unknown options */
    static const uint8_t rx[] = {'a', 0, 'x', 'x', 'q', 'u', 'i', 'm', 'i', 0};
    bson_t *r = raw_element_doc(BSON_TYPE_REGEX, "r", rx, sizeof(rx));
    check_doc(r);
    bson_destroy(r);
    /* code with scope whose scope is not a valid document (trailing byte): nothing printed */
    uint8_t cws[64];
    size_t sl = bson_str(cws + 4, "f()", 3);
    static const uint8_t bad_scope[] = {6, 0, 0, 0, 0, 1};
    memcpy(cws + 4 + sl, bad_scope, sizeof(bad_scope));
    uint32_t total = BSON_UINT32_TO_LE((uint32_t)(4 + sl + sizeof(bad_scope)));
    memcpy(cws, &total, 4);
    bson_t *cw = raw_element_doc(BSON_TYPE_CODEWSCOPE, "w", cws, 4 + sl + sizeof(bad_scope));
    check_doc(cw);
    bson_destroy(cw);
    /* ... and with an invalid code string too: refused */
    sl = bson_str(cws + 4, "\xff", 1);
    memcpy(cws + 4 + sl, bad_scope, sizeof(bad_scope));
    total = BSON_UINT32_TO_LE((uint32_t)(4 + sl + sizeof(bad_scope)));
    memcpy(cws, &total, 4);
    cw = raw_element_doc(BSON_TYPE_CODEWSCOPE, "w", cws, 4 + sl + sizeof(bad_scope));
    check_doc(cw);
    bson_destroy(cw);
    /* scope whose first type byte is 0: "{ }", as a whole document */
    sl = bson_str(cws + 4, "f()", 3);
    static const uint8_t eod_scope[] = {6, 0, 0, 0, 0, 0};
    memcpy(cws + 4 + sl, eod_scope, sizeof(eod_scope));
    total = BSON_UINT32_TO_LE((uint32_t)(4 + sl + sizeof(eod_scope)));
    memcpy(cws, &total, 4);
    cw = raw_element_doc(BSON_TYPE_CODEWSCOPE, "w", cws, 4 + sl + sizeof(eod_scope));
    check_doc(cw);
    bson_destroy(cw);

    /* Every truncation and every single-byte change of a document of all types. */
    bson_t d = BSON_INITIALIZER;
    append_all_types(&d);
    const uint8_t *data = bson_get_data(&d);
    uint8_t *copy = malloc(d.len);
    assert_non_null(copy);
    for (uint32_t i = 4; i < d.len; i += 3) {
        memcpy(copy, data, d.len);
        copy[i] ^= (uint8_t)(0x5a + i);
        check_raw_bytes(copy, d.len);
    }
    free(copy);
    bson_destroy(&d);
}

/* ---- Random documents ------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint32_t rnd_below(uint32_t n)
{
    return (uint32_t)(rnd() % n);
}

/* Random text: mostly printable ASCII, with escapes, multi-byte UTF-8 and (when `bad`) a
 * chance of invalid bytes. `nul` allows embedded NUL bytes. */
static size_t rnd_text(char *out, size_t max, bool bad, bool nul)
{
    static const char *pieces[] = {"\"",
                                   "\\",
                                   "/",
                                   "\n",
                                   "\t",
                                   "\x01",
                                   "\x1f",
                                   "\x7f",
                                   "\xc3\xa9",
                                   "\xe2\x82\xac",
                                   "\xf0\x9f\x98\x80",
                                   "\xe2\x80\xa8",
                                   " ",
                                   "$",
                                   "."};
    static const char *bad_pieces[] = {"\xff", "\xc0\x80", "\xed\xa0\x80",
                                       "\xc3", "\x80",     "\xf4\x90\x80\x80"};
    size_t n = 0;
    size_t want = rnd_below(4) == 0 ? rnd_below(200) : rnd_below(24);
    while (n < want && n + 8 < max) {
        uint32_t r = rnd_below(100);
        if (r < 70) {
            out[n++] = (char)(' ' + rnd_below(95));
        } else if (r < 95) {
            const char *p = pieces[rnd_below(sizeof(pieces) / sizeof(pieces[0]))];
            size_t k = strlen(p);
            memcpy(out + n, p, k);
            n += k;
        } else if (r < 97 && nul) {
            out[n++] = 0;
        } else if (bad && rnd_below(8) == 0) {
            const char *p = bad_pieces[rnd_below(sizeof(bad_pieces) / sizeof(bad_pieces[0]))];
            size_t k = strlen(p);
            memcpy(out + n, p, k);
            n += k;
        } else {
            out[n++] = (char)('a' + rnd_below(26));
        }
    }
    out[n] = 0;
    return n;
}

static double rnd_double(void)
{
    switch (rnd_below(8)) {
    case 0: return (double)(int64_t)rnd() / 16.0;
    case 1: return (double)(int32_t)rnd() / (double)(1 + rnd_below(1000));
    case 2: {
        uint64_t bits = rnd();
        double d;
        memcpy(&d, &bits, sizeof(d));
        return d; /* anything, NaN payloads and subnormals included */
    }
    case 3: return (double)(int32_t)rnd();
    case 4: return ldexp((double)(rnd() >> 11), (int)rnd_below(200) - 100);
    case 5: return (double)rnd_below(100000) / 100.0;
    case 6: return rnd_below(2) ? -0.0 : 0.0;
    default: return (double)(int64_t)rnd();
    }
}

static void rnd_doc(bson_t *d, int depth, bool array, bool bad);

static void rnd_value(bson_t *d, const char *key, int klen, int depth, bool bad)
{
    char text[512];
    size_t n;
    bson_oid_t oid;
    for (int i = 0; i < 12; i++) {
        oid.bytes[i] = (uint8_t)rnd();
    }
    uint32_t t = rnd_below(depth < 6 ? 22 : 19);
    switch (t) {
    case 0: bson_append_double(d, key, klen, rnd_double()); break;
    case 1:
    case 2:
        n = rnd_text(text, sizeof(text), bad, true);
        bson_append_utf8(d, key, klen, text, (int)n);
        break;
    case 3: {
        uint8_t bin[64];
        uint32_t bn = rnd_below(40);
        for (uint32_t i = 0; i < bn; i++) {
            bin[i] = (uint8_t)rnd();
        }
        static const uint8_t subtypes[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x80, 0x9c, 0xff};
        bson_append_binary(d, key, klen, (bson_subtype_t)subtypes[rnd_below(sizeof(subtypes))], bin,
                           bn);
        break;
    }
    case 4: bson_append_undefined(d, key, klen); break;
    case 5: bson_append_oid(d, key, klen, &oid); break;
    case 6: bson_append_bool(d, key, klen, rnd_below(2)); break;
    case 7: {
        int64_t ms;
        switch (rnd_below(4)) {
        case 0: ms = (int64_t)rnd(); break;
        case 1: ms = -(int64_t)rnd_below(100000000); break;
        case 2: ms = 253402300800000LL - 5000 + rnd_below(10000); break;
        default: ms = (int64_t)(rnd() % 4102444800000ULL); break;
        }
        bson_append_date_time(d, key, klen, ms);
        break;
    }
    case 8: bson_append_null(d, key, klen); break;
    case 9: {
        static const char *opts[] = {"", "i", "mx", "ilmsux", "su"};
        rnd_text(text, 64, bad, false);
        bson_append_regex(d, key, klen, text, opts[rnd_below(5)]);
        break;
    }
    case 10:
        rnd_text(text, 64, bad, false);
        bson_append_dbpointer(d, key, klen, text, &oid);
        break;
    case 11:
        rnd_text(text, 64, bad, false);
        bson_append_code(d, key, klen, text);
        break;
    case 12:
        n = rnd_text(text, 64, bad, true);
        bson_append_symbol(d, key, klen, text, (int)n);
        break;
    case 13: bson_append_int32(d, key, klen, (int32_t)rnd()); break;
    case 14: bson_append_timestamp(d, key, klen, (uint32_t)rnd(), (uint32_t)rnd()); break;
    case 15: bson_append_int64(d, key, klen, (int64_t)rnd()); break;
    case 16: {
        bson_decimal128_t dec = {.low = rnd(), .high = rnd()};
        if (rnd_below(2)) {
            char s[64];
            snprintf(s, sizeof(s), "%d.%03uE%d", (int)(int32_t)rnd() % 100000, rnd_below(1000),
                     (int)rnd_below(80) - 40);
            bson_decimal128_from_string(s, &dec);
        }
        bson_append_decimal128(d, key, klen, &dec);
        break;
    }
    case 17: bson_append_maxkey(d, key, klen); break;
    case 18: bson_append_minkey(d, key, klen); break;
    case 19:
    case 20: {
        bson_t sub;
        bool arr = t == 20;
        if (arr) {
            bson_append_array_begin(d, key, klen, &sub);
        } else {
            bson_append_document_begin(d, key, klen, &sub);
        }
        rnd_doc(&sub, depth + 1, arr, bad);
        if (arr) {
            bson_append_array_end(d, &sub);
        } else {
            bson_append_document_end(d, &sub);
        }
        break;
    }
    default: {
        bson_t scope = BSON_INITIALIZER;
        rnd_doc(&scope, depth + 1, false, bad);
        rnd_text(text, 64, bad, false);
        bson_append_code_with_scope(d, key, klen, text, &scope);
        bson_destroy(&scope);
        break;
    }
    }
}

static void rnd_doc(bson_t *d, int depth, bool array, bool bad)
{
    uint32_t count = rnd_below(depth == 0 ? 12 : 6);
    for (uint32_t i = 0; i < count; i++) {
        char key[128];
        int klen;
        if (array) {
            klen = snprintf(key, sizeof(key), "%u", i);
        } else {
            klen = (int)rnd_text(key, 48, bad && rnd_below(4) == 0, false);
        }
        rnd_value(d, key, klen, depth, bad);
    }
}

static void test_random_documents(void **state)
{
    (void)state;
    rng_state = 0x6d6f6e676f636173ULL; /* fixed seed: "mongocas" */
    size_t before = comparisons, refused_before = refused;
    const int docs = 12000;
    for (int i = 0; i < docs; i++) {
        bson_t d = BSON_INITIALIZER;
        bool bad = rnd_below(10) == 0; /* one document in ten may hold invalid UTF-8 */
        rnd_doc(&d, 0, false, bad);
        check_doc(&d);
        bson_destroy(&d);
    }
    size_t refusals = refused - refused_before;
    print_message("random documents: %d, comparisons: %zu, refused by both: %zu\n", docs,
                  comparisons - before, refusals);
    /* The generator must exercise both outcomes. */
    assert_true(refusals > 100);
    assert_true(refusals < (size_t)docs / 5);
}

/* ---- Buffer maximum ---------------------------------------------------------------------- */

static void test_maximum(void **state)
{
    (void)state;
    bson_t d = BSON_INITIALIZER;
    append_all_types(&d);
    size_t want_len = 0;
    char *want = bson_as_relaxed_extended_json(&d, &want_len);
    size_t len = 0;
    int err = 0;
    char *got = mc__json_render(&d, MC__JSON_RELAXED, want_len, &len, &err);
    assert_non_null(got); /* exactly at the maximum */
    assert_int_equal(len, want_len);
    assert_string_equal(got, want);
    bson_free(got);
    got = mc__json_render(&d, MC__JSON_RELAXED, want_len - 1, &len, &err);
    assert_null(got);
    assert_int_equal(err, MC__JSON_ETOOBIG);
    assert_int_equal(len, 0);
    got = mc__json_render(&d, MC__JSON_RELAXED, 10, &len, &err);
    assert_null(got);
    assert_int_equal(err, MC__JSON_ETOOBIG);
    bson_free(want);
    bson_destroy(&d);
}

/* ---- Event messages --------------------------------------------------------------------- */

/* `change` as the message carries it: without its first top-level `_id` when that is
 * exactly {"_data": id} (docs/protocol.md: the token is sent once, as "id"). */
static void append_change_as_sent(bson_t *msg, const bson_t *change, const char *id)
{
    bson_t out;
    bson_append_document_begin(msg, "change", 6, &out);
    bson_iter_t it;
    bool dropped = false;
    if (bson_iter_init(&it, change)) {
        while (bson_iter_next(&it)) {
            if (!dropped && strcmp(bson_iter_key(&it), "_id") == 0) {
                dropped = true; /* only the first _id can be the token */
                bson_t tok;
                bson_t *want = BCON_NEW("_data", BCON_UTF8(id));
                uint32_t len = 0;
                const uint8_t *data = NULL;
                if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
                    bson_iter_document(&it, &len, &data);
                }
                bool is_token = data && bson_init_static(&tok, data, len) && bson_equal(&tok, want);
                bson_destroy(want);
                if (is_token) {
                    continue;
                }
            }
            bson_append_iter(&out, NULL, 0, &it);
        }
    }
    bson_append_document_end(msg, &out);
}

/* The message as libbson renders the message document (with the error fallback); the
 * message mongocast sends is this text without the spaces outside strings. */
static char *old_message(mc_event_t *ev)
{
    bson_t msg = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&msg, "type", "change");
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    BSON_APPEND_UTF8(&msg, "id", mc_event_id(ev));
    if (mc__event_recipient_configured(ev)) {
        if (mc_event_recipient(ev)) {
            /* The recipient's JSON, read back as BSON, renders the same through libbson. */
            char *doc = bson_strdup_printf("{\"r\": %s}", mc_event_recipient(ev));
            bson_error_t e;
            bson_t *r = bson_new_from_json((const uint8_t *)doc, -1, &e);
            bson_iter_t it;
            if (!r || !bson_iter_init_find(&it, r, "r")) {
                fail_msg("recipient %s is not JSON: %s", mc_event_recipient(ev), e.message);
            }
            bson_append_iter(&msg, "recipient", -1, &it);
            bson_destroy(r);
            bson_free(doc);
        } else {
            BSON_APPEND_NULL(&msg, "recipient");
        }
    }
    append_change_as_sent(&msg, mc_event_change(ev), mc_event_id(ev));
    char *s = bson_as_relaxed_extended_json(&msg, NULL);
    bson_destroy(&msg);
    if (s) {
        return s;
    }
    bson_init(&msg);
    BSON_APPEND_UTF8(&msg, "type", "change");
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    BSON_APPEND_UTF8(&msg, "id", mc_event_id(ev));
    BSON_APPEND_NULL(&msg, "change");
    BSON_APPEND_UTF8(&msg, "error", "change event could not be rendered as JSON");
    s = bson_as_relaxed_extended_json(&msg, NULL);
    bson_destroy(&msg);
    return s;
}

static void check_event(const char *stream, const bson_t *change, const char *path)
{
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change(stream, 1, change, path, &err);
    if (!ev) {
        fail_msg("mc_event_new_change: %s", err.message);
    }
    char *spaced = old_message(ev);
    size_t len = 0, want_len = 0;
    char *want = spaced ? json_strip_spaces(spaced, strlen(spaced), &want_len) : NULL;
    bson_free(spaced);
    const char *got = mc_event_json(ev, &len);
    if (!want || !got || strcmp(want, got) != 0 || len != strlen(want)) {
        fail_msg("message differs\n  old: %s\n  new: %s", want ? want : "(NULL)",
                 got ? got : "(NULL)");
    }
    char *spaced_raw = bson_as_canonical_extended_json(change, NULL);
    size_t raw_len = 0;
    char *want_raw =
        spaced_raw ? json_strip_spaces(spaced_raw, strlen(spaced_raw), &raw_len) : NULL;
    bson_free(spaced_raw);
    const char *raw = mc_event_raw_json(ev, &len);
    if ((want_raw == NULL) != (raw == NULL) || (raw && strcmp(want_raw, raw) != 0)) {
        fail_msg("raw differs\n  old: %s\n  new: %s", want_raw ? want_raw : "(NULL)",
                 raw ? raw : "(NULL)");
    }
    comparisons += 2;
    bson_free(want);
    bson_free(want_raw);
    mc_event_unref(&ev);
}

static void test_event_messages(void **state)
{
    (void)state;
    rng_state = 0x6576656e74730a0aULL;
    static const char *owners[] = {"u1", "we\"ird\\owner\n", "\xc3\xa9t\xc3\xa9", "bad\xff", ""};
    for (int i = 0; i < 600; i++) {
        bson_t full = BSON_INITIALIZER;
        const char *owner = owners[i % 5];
        BSON_APPEND_UTF8(&full, "owner", owner);
        rnd_doc(&full, 1, false, i % 7 == 0);
        /* The token: {_data} (left out of the message), or with another field after or
         * before _data (kept), or an _id that is not first. */
        bson_t *change = bson_new();
        if (i % 4 == 3) {
            BSON_APPEND_UTF8(change, "operationType", "insert");
        }
        bson_t tok;
        BSON_APPEND_DOCUMENT_BEGIN(change, "_id", &tok);
        if (i % 8 == 5) {
            BSON_APPEND_INT32(&tok, "_typeBits", 1);
        }
        BSON_APPEND_UTF8(&tok, "_data", "8264A7F2D1000000012B022C01");
        if (i % 8 == 1) {
            BSON_APPEND_BINARY(&tok, "_typeBits", BSON_SUBTYPE_BINARY, (const uint8_t *)"\x01", 1);
        }
        bson_append_document_end(change, &tok);
        bson_t *rest = BCON_NEW("operationType", "insert", "clusterTime",
                                BCON_TIMESTAMP(1688728273, 1), "wallTime",
                                BCON_DATE_TIME(1688728273456LL), "ns", "{", "db", "shop", "coll",
                                "orders", "}");
        bson_concat(change, rest);
        bson_destroy(rest);
        BSON_APPEND_DOCUMENT(change, "fullDocument", &full);
        const char *path = i % 3 == 0 ? NULL : (i % 3 == 1 ? "fullDocument.owner" : "nope.x");
        check_event(i % 2 ? "orders" : "str\"eam \xe2\x82\xac", change, path);
        bson_destroy(change);
        bson_destroy(&full);
    }
    /* An empty change (only the token): an empty change object. */
    bson_t *tiny = BCON_NEW("_id", "{", "_data", "00", "}");
    check_event("s", tiny, NULL);
    mc_error_t terr = {0};
    mc_event_t *tev = mc_event_new_change("s", 1, tiny, NULL, &terr);
    assert_non_null(tev);
    assert_string_equal(mc_event_json(tev, NULL),
                        "{\"type\":\"change\",\"stream\":\"s\",\"id\":\"00\",\"change\":{}}");
    /* The raw form is the whole change, token included. */
    assert_string_equal(mc_event_raw_json(tev, NULL), "{\"_id\":{\"_data\":\"00\"}}");
    mc_event_unref(&tev);
    bson_destroy(tiny);

    /* The message for a change with invalid UTF-8 keeps the event with an error field. */
    bson_t *bad = BCON_NEW("_id", "{", "_data", "00", "}");
    bson_append_utf8(bad, "x", 1, "\xff", 1);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("s", 1, bad, NULL, &err);
    assert_non_null(ev);
    assert_string_equal(mc_event_json(ev, NULL),
                        "{\"type\":\"change\",\"stream\":\"s\",\"id\":\"00\",\"change\":"
                        "null,\"error\":\"change event could not be rendered as JSON\"}");
    assert_null(mc_event_raw_json(ev, NULL));
    mc_event_unref(&ev);
    bson_destroy(bad);

    /* Control events */
    mc_event_t *r = mc_event_new_control(MC_EVENT_RESET, "a\"b\x01", 5, "lost \xc3\xa9");
    assert_string_equal(mc_event_json(r, NULL), "{\"type\":\"reset\",\"stream\":"
                                                "\"a\\\"b\\u0001\",\"reason\":\"lost \xc3\xa9\"}");
    mc_event_unref(&r);
    r = mc_event_new_control(MC_EVENT_READY, "orders", 5, NULL);
    assert_string_equal(mc_event_json(r, NULL), "{\"type\":\"ready\",\"stream\":\"orders\"}");
    mc_event_unref(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_type),       cmocka_unit_test(test_strings),
        cmocka_unit_test(test_doubles),          cmocka_unit_test(test_dates),
        cmocka_unit_test(test_nesting),          cmocka_unit_test(test_corrupt),
        cmocka_unit_test(test_random_documents), cmocka_unit_test(test_maximum),
        cmocka_unit_test(test_event_messages),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    fprintf(stderr, "json_writer: %zu byte-for-byte comparisons with libbson\n", comparisons);
    return rc;
}
