/*
 * test_subject_template.c: channel/key/subject templates: compile errors, rendering, the
 * escaping of hostile values, the empty-recipient rule, length limits and injectivity.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "sinks/subject_template.h"

static mc__bytes_t B(const char *s)
{
    mc__bytes_t b = {s, s ? strlen(s) : 0};
    return b;
}

static mc__subject_values_t values(const char *stream, const char *recipient)
{
    mc__subject_values_t v = {B(stream), B(recipient), B("shop"), B("orders"), B("insert")};
    return v;
}

/* Renders `tmpl` with `v` and returns a static copy of the result ("<error>" on failure). */
static const char *render(const char *tmpl, mc__subject_kind_t kind, const mc__subject_values_t *v)
{
    static char out[MC__SUBJECT_MAX + 1];
    mc_error_t err;
    mc__subject_template_t *t = mc__subject_template_new(tmpl, kind, &err);
    assert_non_null(t);
    size_t len = 0;
    int rc = mc__subject_template_render(t, v, out, sizeof out, &len, &err);
    mc__subject_template_destroy(t);
    if (rc != 0) {
        return "<error>";
    }
    assert_int_equal(len, strlen(out));
    return out;
}

static void test_defaults(void **state)
{
    (void)state;
    mc__subject_values_t v = values("orders", "alice");
    assert_string_equal(render(MC__SUBJECT_DEFAULT_REDIS, MC__SUBJECT_REDIS, &v),
                        "mongocast:orders:alice");
    assert_string_equal(render(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, &v),
                        "mongocast.orders.alice");
    /* No recipient (absent or empty): the recipient token goes with its separator. */
    v.recipient = B(NULL);
    assert_string_equal(render(MC__SUBJECT_DEFAULT_REDIS, MC__SUBJECT_REDIS, &v),
                        "mongocast:orders");
    assert_string_equal(render(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, &v), "mongocast.orders");
    v.recipient = B("");
    assert_string_equal(render(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, &v), "mongocast.orders");
    /* At the start of the template it takes the separator after it. */
    assert_string_equal(render("{recipient}.x.{stream}", MC__SUBJECT_NATS, &v), "x.orders");
}

static void test_all_placeholders(void **state)
{
    (void)state;
    mc__subject_values_t v = values("s", "r");
    assert_string_equal(render("app.{db}.{coll}.{type}.{stream}.{recipient}", MC__SUBJECT_NATS, &v),
                        "app.shop.orders.insert.s.r");
    assert_string_equal(render("ev-{type}:{db}/{coll}", MC__SUBJECT_REDIS, &v),
                        "ev-insert:shop/orders");
    /* An absent value other than a whole recipient token renders as a lone '%'. */
    v.coll = B(NULL);
    assert_string_equal(render("app.{db}.{coll}", MC__SUBJECT_NATS, &v), "app.shop.%");
    v.recipient = B(NULL);
    assert_string_equal(render("user-{recipient}.x", MC__SUBJECT_NATS, &v), "user-%.x");
}

static void test_hostile_recipients_are_escaped(void **state)
{
    (void)state;
    struct {
        const char *in;
        const char *nats;
    } cases[] = {
        {"a.b", "mongocast.orders.a%2Eb"},
        {"*", "mongocast.orders.%2A"},
        {">", "mongocast.orders.%3E"},
        {"x y", "mongocast.orders.x%20y"},
        {"%41", "mongocast.orders.%2541"},
        {"user_1-a", "mongocast.orders.user_1-a"},
        {"\xc3\xa9", "mongocast.orders.%C3%A9"},
        {"a\r\nPUB x 1", "mongocast.orders.a%0D%0APUB%20x%201"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mc__subject_values_t v = values("orders", cases[i].in);
        const char *s = render(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, &v);
        assert_string_equal(s, cases[i].nats);
        assert_true(mc__nats_subject_valid(s, strlen(s)));
    }
    /* Redis: ':' cannot add a level, and glob bytes cannot reach a pattern subscriber. */
    mc__subject_values_t v = values("orders", "a:b*?[x]");
    assert_string_equal(render(MC__SUBJECT_DEFAULT_REDIS, MC__SUBJECT_REDIS, &v),
                        "mongocast:orders:a%3Ab%2A%3F%5Bx%5D");
    /* NUL bytes are data, not an end: "u3\0evil" is not "u3". */
    v.recipient.p = "u3\0evil";
    v.recipient.len = 7;
    assert_string_equal(render(MC__SUBJECT_DEFAULT_REDIS, MC__SUBJECT_REDIS, &v),
                        "mongocast:orders:u3%00evil");
}

static void test_compile_errors(void **state)
{
    (void)state;
    struct {
        const char *tmpl;
        mc__subject_kind_t kind;
        const char *needle;
    } bad[] = {
        {"", MC__SUBJECT_REDIS, "empty"},
        {"a.{nope}", MC__SUBJECT_NATS, "unknown placeholder"},
        {"a.{stream", MC__SUBJECT_NATS, "without a matching '}'"},
        {"a.{str{eam}", MC__SUBJECT_NATS, "without a matching '}'"},
        {"a}b", MC__SUBJECT_REDIS, "'}' without"},
        {"a..b", MC__SUBJECT_NATS, "empty subject token"},
        {".a", MC__SUBJECT_NATS, "empty subject token"},
        {"a.", MC__SUBJECT_NATS, "empty subject token"},
        {"a.*", MC__SUBJECT_NATS, "not allowed"},
        {"a.>", MC__SUBJECT_NATS, "not allowed"},
        {"a b", MC__SUBJECT_NATS, "not allowed"},
        {"a%b", MC__SUBJECT_REDIS, "not allowed"},
        {"a\tb", MC__SUBJECT_REDIS, "not allowed"},
        {"{db}{coll}", MC__SUBJECT_REDIS, "separator between them"},
        {"x.{db}-{coll}", MC__SUBJECT_NATS, "separator between them"},
        {"{recipient}", MC__SUBJECT_NATS, "renders an empty name"},
        {"{recipient}:{recipient}", MC__SUBJECT_REDIS, "renders an empty name"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mc_error_t err;
        mc_error_clear(&err);
        mc__subject_template_t *t = mc__subject_template_new(bad[i].tmpl, bad[i].kind, &err);
        if (t) {
            fail_msg("template %zu \"%s\" compiled", i, bad[i].tmpl);
        }
        assert_int_equal(err.code, MC_ECONFIG);
        if (!strstr(err.message, bad[i].needle)) {
            fail_msg("template \"%s\": message \"%s\" lacks \"%s\"", bad[i].tmpl, err.message,
                     bad[i].needle);
        }
    }
    /* Good ones, including separators inside a token and spaces in Redis names. */
    const char *good_redis[] = {"{db}.{coll}", "{db}/{coll}:{recipient}", "a::b",
                                "events {stream}"};
    for (size_t i = 0; i < sizeof good_redis / sizeof good_redis[0]; i++) {
        mc__subject_template_t *t =
            mc__subject_template_new(good_redis[i], MC__SUBJECT_REDIS, NULL);
        assert_non_null(t);
        mc__subject_template_destroy(t);
    }
    mc__subject_template_t *t = mc__subject_template_new("x.{db}+{coll}", MC__SUBJECT_NATS, NULL);
    assert_non_null(t);
    assert_false(mc__subject_template_uses_recipient(t));
    mc__subject_template_destroy(t);
    t = mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    assert_true(mc__subject_template_uses_recipient(t));
    mc__subject_template_destroy(t);
}

static void test_length_limit(void **state)
{
    (void)state;
    static char big[MC__SUBJECT_MAX + 10];
    mc__subject_template_t *t =
        mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    assert_non_null(t);
    char out[MC__SUBJECT_MAX + 1];
    mc_error_t err;
    size_t len = 0;
    /* Exactly at the limit: "mongocast.orders." is 17 bytes; 2031 raw bytes fill it. */
    memset(big, 'a', MC__SUBJECT_MAX - 17);
    mc__subject_values_t v = values("orders", NULL);
    v.recipient.p = big;
    v.recipient.len = MC__SUBJECT_MAX - 17;
    assert_int_equal(mc__subject_template_render(t, &v, out, sizeof out, &len, &err), 0);
    assert_int_equal(len, MC__SUBJECT_MAX);
    v.recipient.len++;
    assert_int_equal(mc__subject_template_render(t, &v, out, sizeof out, &len, &err), MC_ELIMIT);
    /* An escaped value that only overflows because of the escapes. */
    memset(big, '.', 700);
    v.recipient.len = 700; /* 2100 bytes escaped */
    assert_int_equal(mc__subject_template_render(t, &v, out, sizeof out, &len, &err), MC_ELIMIT);
    /* A small caller buffer bounds the output too. */
    char small[8];
    v.recipient = B("alice");
    assert_int_equal(mc__subject_template_render(t, &v, small, sizeof small, &len, &err),
                     MC_ELIMIT);
    assert_string_equal(small, "");
    mc__subject_template_destroy(t);
}

static int cmp_subject(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Every single-byte and two-byte recipient renders to a distinct, valid subject. */
static void test_injective_on_short_values(void **state)
{
    (void)state;
    mc__subject_template_t *t =
        mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    assert_non_null(t);
    /* 1 + 256 + 65536 values; subjects are compared through a sorted array. */
    size_t n = 1 + 256 + 65536;
    char(*subjects)[32] = calloc(n, 32);
    assert_non_null(subjects);
    size_t k = 0;
    for (int width = 0; width <= 2; width++) {
        size_t count = width == 0 ? 1 : width == 1 ? 256 : 65536;
        for (size_t x = 0; x < count; x++) {
            char r[2] = {(char)(x & 0xFF), (char)(x >> 8)};
            mc__subject_values_t v = values("orders", NULL);
            v.recipient.p = r;
            v.recipient.len = (size_t)width;
            size_t len = 0;
            assert_int_equal(mc__subject_template_render(t, &v, subjects[k], 32, &len, NULL), 0);
            assert_true(mc__nats_subject_valid(subjects[k], len));
            k++;
        }
    }
    qsort(subjects, n, 32, cmp_subject);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(subjects[i - 1], subjects[i]) == 0) {
            fail_msg("two recipients render as %s", subjects[i]);
        }
    }
    free(subjects);
    mc__subject_template_destroy(t);
}

static void test_nats_subject_valid(void **state)
{
    (void)state;
    assert_true(mc__nats_subject_valid("a", 1));
    assert_true(mc__nats_subject_valid("a.b-c_d.%20", 11));
    assert_false(mc__nats_subject_valid("", 0));
    assert_false(mc__nats_subject_valid("a..b", 4));
    assert_false(mc__nats_subject_valid("a.", 2));
    assert_false(mc__nats_subject_valid("a.*", 3));
    assert_false(mc__nats_subject_valid("a.>", 3));
    assert_false(mc__nats_subject_valid("a b", 3));
    assert_false(mc__nats_subject_valid("a\0b", 3));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_all_placeholders),
        cmocka_unit_test(test_hostile_recipients_are_escaped),
        cmocka_unit_test(test_compile_errors),
        cmocka_unit_test(test_length_limit),
        cmocka_unit_test(test_injective_on_short_values),
        cmocka_unit_test(test_nats_subject_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
