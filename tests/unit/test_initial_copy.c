/*
 * test_initial_copy.c: copy positions of a sink's initial snapshot (initial_copy.c): what a
 * restart resumes from. Round trips for _ids of several BSON types, the order of the ids of
 * one copy (by document number, all before the changes after T), the "copied" position, the
 * cluster time the ledger reads from one, and every malformed form refused with a reason.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "engine_private.h"

static char *format_id(uint64_t number, const char *id_json)
{
    bson_error_t e;
    bson_t *id = bson_new_from_json((const uint8_t *)id_json, -1, &e);
    assert_non_null(id);
    mc__copy_position_t p = {.start_t = 1717171717,
                             .start_i = 7,
                             .number = number,
                             .read_t = 1717171800,
                             .read_i = 3,
                             .id_doc = id};
    char *data = mc__copy_position_format(&p);
    bson_destroy(id);
    return data;
}

static void test_round_trip(void **state)
{
    (void)state;
    static const char *const ids[] = {
        "{\"_id\": 42}",
        "{\"_id\": \"a string with \\u00e9\"}",
        "{\"_id\": {\"$oid\": \"65a1b2c3d4e5f60718293a4b\"}}",
        "{\"_id\": {\"k\": [1, 2, {\"x\": null}]}}",
        "{\"_id\": {\"$numberLong\": \"-9000000000\"}}",
    };
    for (size_t k = 0; k < sizeof(ids) / sizeof(ids[0]); k++) {
        char *data = format_id(k + 1, ids[k]);
        assert_non_null(data);
        assert_true(mc__copy_token(data));
        mc__copy_position_t p;
        mc_error_t err = {0};
        assert_int_equal(mc__copy_position_parse(data, &p, &err), 0);
        assert_int_equal(p.start_t, 1717171717);
        assert_int_equal(p.start_i, 7);
        assert_int_equal(p.read_t, 1717171800);
        assert_int_equal(p.read_i, 3);
        assert_int_equal(p.number, k + 1);
        assert_false(p.done);
        bson_error_t e;
        bson_t *want = bson_new_from_json((const uint8_t *)ids[k], -1, &e);
        assert_true(bson_equal(p.id_doc, want));
        bson_destroy(want);
        /* The ledger's clusterTime of the record is T (its future check uses it). */
        bson_t *tok = BCON_NEW("_data", BCON_UTF8(data));
        uint32_t t, i;
        assert_true(mc__token_cluster_time(tok, &t, &i));
        assert_int_equal(t, 1717171717);
        assert_int_equal(i, 7);
        bson_destroy(tok);
        mc__copy_position_clear(&p);
        bson_free(data);
    }
}

static void test_order_and_done(void **state)
{
    (void)state;
    /* Numbers order the ids whatever the _ids (here descending values). */
    char *a = format_id(9, "{\"_id\": 900}");
    char *b = format_id(10, "{\"_id\": 5}");
    char *c = format_id(300, "{\"_id\": \"a\"}");
    assert_true(mc__token_data_cmp(a, b) < 0);
    assert_true(mc__token_data_cmp(b, c) < 0);
    mc__copy_position_t d = {.start_t = 1717171717, .start_i = 7, .done = true};
    char *done = mc__copy_position_format(&d);
    assert_non_null(done);
    assert_true(mc__token_data_cmp(c, done) < 0);
    mc__copy_position_t p;
    mc_error_t err = {0};
    assert_int_equal(mc__copy_position_parse(done, &p, &err), 0);
    assert_true(p.done);
    assert_null(p.id_doc);
    assert_int_equal(p.start_t, 1717171717);
    mc__copy_position_clear(&p);
    /* Only the "copied" position says where the changes start: one increment after T. */
    uint32_t t = 0, i = 0;
    assert_true(mc__copy_changes_start(done, &t, &i));
    assert_int_equal(t, 1717171717);
    assert_int_equal(i, 8);
    assert_false(mc__copy_changes_start(c, &t, &i));
    assert_false(mc__copy_changes_start(NULL, &t, &i));
    mc__copy_position_t last = {.start_t = 5, .start_i = UINT32_MAX, .done = true};
    char *wrap = mc__copy_position_format(&last);
    assert_true(mc__copy_changes_start(wrap, &t, &i));
    assert_int_equal(t, 6);
    assert_int_equal(i, 0);
    bson_free(wrap);
    /* A change one increment after T sorts after the whole copy. */
    const char *change = "826659F605000000082B022C0100296E5A1004";
    assert_true(mc__token_data_cmp(done, change) < 0);
    assert_true(mc__token_data_cmp(a, change) < 0);
    assert_false(mc__copy_token(change));
    assert_false(mc__copy_changes_start(change, &t, &i));
    bson_free(a);
    bson_free(b);
    bson_free(c);
    bson_free(done);
}

static void test_refusals(void **state)
{
    (void)state;
    char *good = format_id(3, "{\"_id\": 42}");
    size_t n = strlen(good);
    char buf[256];
    struct {
        const char *what;
        size_t cut;        /* truncate to this length (0: keep) */
        int at;            /* change the character at this index (-1: none) */
        char to;
        const char *append;
    } cases[] = {
        {"truncated id", n - 2, -1, 0, NULL},
        {"odd length", n - 1, -1, 0, NULL},
        {"no id", 2 + 16 + 2 + 16 + 16, -1, 0, NULL},
        {"bad hex in T", 0, 5, 'G', NULL},
        {"bad hex in number", 0, 25, 'z', NULL},
        {"bad hex in read time", 0, 40, 'Q', NULL},
        {"bad hex in the id", 0, (int)n - 3, 'x', NULL},
        {"trailing bytes", 0, -1, 0, "00"},
        {"BSON length mismatch", 0, 53, '9', NULL},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        snprintf(buf, sizeof(buf), "%s%s", good, cases[k].append ? cases[k].append : "");
        if (cases[k].cut) {
            buf[cases[k].cut] = '\0';
        }
        if (cases[k].at >= 0) {
            buf[cases[k].at] = cases[k].to;
        }
        mc__copy_position_t p;
        mc_error_t err = {0};
        int rc = mc__copy_position_parse(buf, &p, &err);
        if (rc != MC_EINVAL) {
            fail_msg("%s: accepted %s", cases[k].what, buf);
        }
        assert_non_null(strstr(err.message, "copy position"));
        assert_null(p.id_doc);
        mc__copy_position_clear(&p);
    }
    /* Number 0, a done position with more after it, two fields, a resume token. */
    const char *bad[] = {
        "826659A605000000075E0000000000000000",
        "826659A605000000075EFFFFFFFFFFFFFFFF00",
        "826659A605000000075E00000000000000016659A60500000003",
        "826659A6050000000082B022C0100296E5A1004",
        "",
    };
    for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
        mc__copy_position_t p;
        mc_error_t err = {0};
        assert_int_equal(mc__copy_position_parse(bad[k], &p, &err), MC_EINVAL);
        mc__copy_position_clear(&p);
    }
    /* {_id: 1, x: 2} is no {_id} document. */
    bson_t *two = BCON_NEW("_id", BCON_INT32(1), "x", BCON_INT32(2));
    mc__copy_position_t p2 = {.start_t = 1, .number = 1, .read_t = 1, .id_doc = two};
    char *d2 = mc__copy_position_format(&p2);
    mc__copy_position_t q;
    mc_error_t err = {0};
    assert_int_equal(mc__copy_position_parse(d2, &q, &err), MC_EINVAL);
    mc__copy_position_clear(&q);
    bson_free(d2);
    bson_destroy(two);
    /* An _id too large to store is refused when formatting. */
    char big[MC__COPY_MAX_ID_BYTES + 64];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    bson_t *large = BCON_NEW("_id", BCON_UTF8(big));
    mc__copy_position_t p3 = {.start_t = 1, .number = 1, .read_t = 1, .id_doc = large};
    assert_null(mc__copy_position_format(&p3));
    bson_destroy(large);
    bson_free(good);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_order_and_done),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
