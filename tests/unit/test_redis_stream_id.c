/*
 * test_redis_stream_id.c: resume-token positions -> Redis stream entry IDs: token decoding
 * (v1, v2, real captures, malformed), the map and its limits, strict order in stream order
 * (transactions, split events, invalidates), and the text form of IDs.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "sinks/redis_stream_id.h"

/* ---- A small KeyString writer for test tokens (the module only reads them) ------------- */

typedef struct tokbuf {
    char hex[512];
    size_t n;
} tokbuf_t;

static void put_byte(tokbuf_t *b, unsigned v)
{
    snprintf(b->hex + b->n, sizeof b->hex - b->n, "%02X", v & 0xFF);
    b->n += 2;
}

static void put_uint(tokbuf_t *b, uint64_t v)
{
    if (v == 0) {
        put_byte(b, 0x29);
        return;
    }
    uint64_t m = v << 1;
    int n = 1;
    while (n < 8 && (m >> (8 * n)) != 0) {
        n++;
    }
    put_byte(b, (unsigned)(0x2B - 1 + n));
    for (int i = n - 1; i >= 0; i--) {
        put_byte(b, (unsigned)(m >> (8 * i)));
    }
}

/* A v1 (or v2) event token with a fixed UUID and documentKey {_id: 7} as the tail. */
static const char *token(int version, uint32_t t, uint32_t i, uint32_t txn, bool inv)
{
    static tokbuf_t b;
    b.n = 0;
    put_byte(&b, 0x82);
    for (int k = 3; k >= 0; k--) {
        put_byte(&b, t >> (8 * k));
    }
    for (int k = 3; k >= 0; k--) {
        put_byte(&b, i >> (8 * k));
    }
    put_uint(&b, (uint64_t)version);
    put_uint(&b, 128);
    put_uint(&b, txn);
    put_byte(&b, inv ? 0x6F : 0x6E);
    const char *tail = "5A100400000000000000000000000000ABCDEF46645F69640029000004";
    strcpy(b.hex + b.n, tail);
    return b.hex;
}

static mc__redis_stream_id_t id_of(const char *hex, uint32_t fragment)
{
    mc__token_position_t pos;
    mc_error_t err;
    if (mc__token_position_parse(hex, strlen(hex), &pos, &err) != 0) {
        fail_msg("%s: %s", hex, err.message);
    }
    mc__redis_stream_id_t id;
    assert_int_equal(mc__redis_stream_id_make(&pos, fragment, &id, &err), 0);
    return id;
}

static void test_real_tokens(void **state)
{
    (void)state;
    /* Captured from a server: clusterTime (0x6B021A69, 6), an insert, not from invalidate. */
    const char *insert = "826B021A69000000062B022C0100296E5A100400000000000000000000000000ABCDEF46"
                         "645F696400640000000000000000000000020004";
    mc__token_position_t pos;
    assert_int_equal(mc__token_position_parse(insert, strlen(insert), &pos, NULL), 0);
    assert_int_equal(pos.t, 0x6B021A69u);
    assert_int_equal(pos.i, 6);
    assert_int_equal(pos.version, 1);
    assert_int_equal(pos.token_type, 128);
    assert_int_equal(pos.txn_op_index, 0);
    assert_false(pos.from_invalidate);
    /* The invalidate that follows a drop (fromInvalidate 6F). */
    const char *inval = "826B021ADB000000072B022C0100296F5A100400000000000000000000000000ABCDEF46"
                        "645F696400640000000000000000000000630004";
    assert_int_equal(mc__token_position_parse(inval, strlen(inval), &pos, NULL), 0);
    assert_true(pos.from_invalidate);
    /* Lower-case hex is accepted too. */
    char lower[200];
    strcpy(lower, insert);
    for (char *p = lower; *p; p++) {
        *p = (char)((*p >= 'A' && *p <= 'F') ? *p + 32 : *p);
    }
    assert_int_equal(mc__token_position_parse(lower, strlen(lower), &pos, NULL), 0);
    assert_int_equal(pos.t, 0x6B021A69u);

    mc__redis_stream_id_t id = id_of(insert, 0);
    char buf[MC__REDIS_ID_BUF];
    mc__redis_stream_id_format(&id, buf);
    char want[64];
    snprintf(want, sizeof want, "%llu-%llu", 0x6B021A69ull * 1000, 6ull << 32);
    assert_string_equal(buf, want);
}

static void test_txn_op_index_and_versions(void **state)
{
    (void)state;
    uint32_t txns[] = {0, 1, 63, 64, 127, 128, 300, 65535, 65536, MC__REDIS_ID_MAX_TXN_OP_INDEX};
    for (size_t k = 0; k < sizeof txns / sizeof txns[0]; k++) {
        for (int version = 1; version <= 2; version++) {
            const char *hex = token(version, 1700000000, 9, txns[k], false);
            mc__token_position_t pos;
            assert_int_equal(mc__token_position_parse(hex, strlen(hex), &pos, NULL), 0);
            assert_int_equal(pos.txn_op_index, txns[k]);
            assert_int_equal(pos.version, version);
            mc__redis_stream_id_t id = id_of(hex, 0);
            assert_true(id.ms == 1700000000000ull);
            assert_true(id.seq == (9ull << 32 | (uint64_t)txns[k] << 9));
        }
    }
    /* Past the limits: no ID, a permanent error. */
    const char *hex = token(1, 1, 1, MC__REDIS_ID_MAX_TXN_OP_INDEX + 1, false);
    mc__token_position_t pos;
    assert_int_equal(mc__token_position_parse(hex, strlen(hex), &pos, NULL), 0);
    mc__redis_stream_id_t id;
    mc_error_t err;
    assert_int_equal(mc__redis_stream_id_make(&pos, 0, &id, &err), MC_ELIMIT);
    hex = token(1, 1, 1, 0, false);
    assert_int_equal(mc__token_position_parse(hex, strlen(hex), &pos, NULL), 0);
    assert_int_equal(mc__redis_stream_id_make(&pos, 256, &id, &err), MC_ELIMIT);
    assert_int_equal(mc__redis_stream_id_make(&pos, 255, &id, &err), 0);
    /* A high-water mark is not an event. */
    pos.token_type = 0;
    assert_int_equal(mc__redis_stream_id_make(&pos, 0, &id, &err), MC_EINVAL);
}

static void test_malformed_tokens(void **state)
{
    (void)state;
    const char *bad[] = {
        "",
        "8",
        "82",
        "826B021A6900000006",                   /* no version */
        "826B021A69000000062B",                 /* truncated integer */
        "826B021A69000000062B062C0100296E04",   /* version 3 */
        "826B021A69000000292C0100296E04",       /* version 0 (no token type) */
        "826B021A69000000062B022B02296E04",     /* token type 1 */
        "826B021A69000000062B022C0100292904",   /* no boolean */
        "826B021A69000000062B022C01002B036E04", /* odd magnitude: a double, not an integer */
        "716B021A69000000062B022C0100296E04",   /* not a Timestamp */
        "82XB021A69000000062B022C0100296E04",   /* not hex */
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        mc__token_position_t pos;
        mc_error_t err;
        mc_error_clear(&err);
        int rc = mc__token_position_parse(bad[k], strlen(bad[k]), &pos, &err);
        if (rc != MC_EINVAL) {
            fail_msg("token %zu (%s) accepted", k, bad[k]);
        }
        assert_non_null(strstr(err.message, "resume token"));
    }
}

typedef struct position {
    uint32_t t, i, txn, frag;
    bool inv;
} position_t;

static int cmp_position(const void *a, const void *b)
{
    const position_t *x = a, *y = b;
    uint32_t ka[] = {x->t, x->i, x->txn, x->frag, x->inv};
    uint32_t kb[] = {y->t, y->i, y->txn, y->frag, y->inv};
    for (int k = 0; k < 5; k++) {
        if (ka[k] != kb[k]) {
            return ka[k] < kb[k] ? -1 : 1;
        }
    }
    return 0;
}

/* Positions in stream order (cluster time, txnOpIndex, fragment, fromInvalidate) give strictly
 * increasing IDs; and the order of v1 token strings agrees with it. */
static void test_strictly_increasing_in_stream_order(void **state)
{
    (void)state;
    enum { N = 20000 };
    position_t *p = calloc(N, sizeof *p);
    assert_non_null(p);
    uint64_t rng = 0x12345678;
    for (int k = 0; k < N; k++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        /* Few distinct values per field so that ties on the leading fields are common. */
        p[k].t = 1700000000u + (uint32_t)(rng % 3);
        p[k].i = (uint32_t)((rng >> 8) % 4) * 0x3FFFFFFFu;
        p[k].txn = (uint32_t)((rng >> 16) % 5) * (MC__REDIS_ID_MAX_TXN_OP_INDEX / 4);
        /* A position is either a split event's (fragments) or a drop's (then possibly the
         * invalidate after it), never both: drops are never split. */
        bool drop = ((p[k].t + p[k].i + p[k].txn) & 1) != 0;
        p[k].frag = drop ? 0 : (uint32_t)((rng >> 24) % 3) * 127;
        p[k].inv = drop && ((rng >> 32) & 1) != 0;
    }
    qsort(p, N, sizeof *p, cmp_position);
    mc__redis_stream_id_t prev = {0, 0};
    char prev_tok[512] = "";
    for (int k = 0; k < N; k++) {
        char tok[512];
        strcpy(tok, token(1, p[k].t, p[k].i, p[k].txn, p[k].inv));
        mc__redis_stream_id_t id = id_of(tok, p[k].frag);
        int c = k == 0 ? 1 : mc__redis_stream_id_compare(&id, &prev);
        int same = k > 0 && cmp_position(&p[k], &p[k - 1]) == 0;
        if (same) {
            assert_int_equal(c, 0); /* a deterministic function: a replay gets the same ID */
        } else {
            assert_int_equal(c, 1);
        }
        /* Fragments share their event's token, hence "not before" rather than "after". */
        assert_true(k == 0 || strcmp(tok, prev_tok) >= 0);
        prev = id;
        strcpy(prev_tok, tok);
    }
    free(p);
}

static mc_event_t *change_event(const char *hex, int fragment, int of)
{
    bson_t doc = BSON_INITIALIZER, idd, se;
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "_id", &idd);
    BSON_APPEND_UTF8(&idd, "_data", hex);
    bson_append_document_end(&doc, &idd);
    BSON_APPEND_UTF8(&doc, "operationType", "update");
    if (fragment >= 0) {
        BSON_APPEND_DOCUMENT_BEGIN(&doc, "splitEvent", &se);
        BSON_APPEND_INT32(&se, "fragment", fragment);
        BSON_APPEND_INT32(&se, "of", of);
        bson_append_document_end(&doc, &se);
    }
    mc_event_t *ev = mc_event_new_change("s", 1, &doc, NULL, NULL);
    bson_destroy(&doc);
    assert_non_null(ev);
    return ev;
}

static void test_from_event(void **state)
{
    (void)state;
    const char *hex = token(2, 1700000001, 5, 3, false);
    mc_event_t *ev = change_event(hex, -1, 0);
    mc__redis_stream_id_t id;
    assert_int_equal(mc__redis_stream_id_from_event(ev, &id, NULL), 0);
    assert_true(id.ms == 1700000001000ull && id.seq == (5ull << 32 | 3u << 9));
    mc_event_unref(&ev);
    /* Fragments 1..3 of one split event: consecutive, after the position's own slot. */
    mc__redis_stream_id_t prev = id;
    for (int f = 1; f <= 3; f++) {
        ev = change_event(hex, f, 3);
        assert_int_equal(mc__redis_stream_id_from_event(ev, &id, NULL), 0);
        assert_true(id.seq == (5ull << 32 | 3u << 9 | (uint64_t)f << 1));
        assert_int_equal(mc__redis_stream_id_compare(&id, &prev), 1);
        prev = id;
        mc_event_unref(&ev);
    }
    /* A malformed splitEvent is an error, not fragment 0 (which would collide). */
    ev = change_event(hex, 0, 3);
    mc_error_t err;
    assert_int_equal(mc__redis_stream_id_from_event(ev, &id, &err), MC_ELIMIT);
    mc_event_unref(&ev);
    /* Control events without a position have no ID. */
    ev = mc_event_new_control(MC_EVENT_RESET, "s", 2, "x");
    assert_int_equal(mc__redis_stream_id_from_event(ev, &id, &err), MC_EINVAL);
    mc_event_unref(&ev);
}

static void test_format_and_parse(void **state)
{
    (void)state;
    mc__redis_stream_id_t id = {UINT64_MAX, UINT64_MAX}, back;
    char buf[MC__REDIS_ID_BUF];
    size_t n = mc__redis_stream_id_format(&id, buf);
    assert_int_equal(n, strlen("18446744073709551615-18446744073709551615"));
    assert_int_equal(mc__redis_stream_id_parse(buf, n, &back), 0);
    assert_int_equal(mc__redis_stream_id_compare(&id, &back), 0);
    assert_int_equal(mc__redis_stream_id_parse("5", 1, &back), 0);
    assert_true(back.ms == 5 && back.seq == 0);
    const char *bad[] = {"",
                         "-",
                         "1-",
                         "-1",
                         "a-1",
                         "1-2-3",
                         " 1-2",
                         "+1-2",
                         "18446744073709551616-0",
                         "1-18446744073709551616"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        if (mc__redis_stream_id_parse(bad[k], strlen(bad[k]), &back) != MC_EINVAL) {
            fail_msg("\"%s\" parsed", bad[k]);
        }
    }
    mc__redis_stream_id_t a = {1, 2}, b = {1, 3}, c = {2, 0};
    assert_int_equal(mc__redis_stream_id_compare(&a, &b), -1);
    assert_int_equal(mc__redis_stream_id_compare(&c, &b), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_real_tokens),
        cmocka_unit_test(test_txn_op_index_and_versions),
        cmocka_unit_test(test_malformed_tokens),
        cmocka_unit_test(test_strictly_increasing_in_stream_order),
        cmocka_unit_test(test_from_event),
        cmocka_unit_test(test_format_and_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
