/*
 * test_cstoken.c: unit tests for mongo-emulator's change-stream resume tokens (cstoken.c):
 * the exact v1 KeyString layout, round trips, ordering, canonical documentKey encoding and
 * the server error codes for malformed tokens; the txnOpIndex of transaction events and the v2
 * tokens of split-event fragments. Single-threaded cmocka tests.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cstoken.h"

static const uint8_t probe_uuid[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xAB, 0xCD, 0xEF};

static char *hex_of(const emu_kbuf_t *b)
{
    char *hex = malloc(2 * b->len + 1);
    assert_non_null(hex);
    emu_cstoken_hex(b->data, b->len, hex);
    return hex;
}

static bson_t *token_doc(const char *hex)
{
    bson_t *doc = bson_new();
    BSON_APPEND_UTF8(doc, "_data", hex);
    return doc;
}

static void expect_parse_error(const bson_t *doc, int code)
{
    emu_cstoken_t tok;
    mc_error_t err;
    mc_error_clear(&err);
    assert_int_not_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
    assert_int_equal(err.cause, code);
    assert_true(err.message[0] != '\0');
    assert_null(tok.raw);
}

static void expect_hex_error(const char *hex, int code)
{
    bson_t *doc = token_doc(hex);
    expect_parse_error(doc, code);
    bson_destroy(doc);
}

/* The layout matches the token a real 6.0 server sends for an insert (wire capture probe). */
static void test_event_token_layout(void **state)
{
    (void)state;
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    bson_oid_t oid;
    bson_oid_init_from_string(&oid, "000000000000000000000063");
    bson_t *key = BCON_NEW("_id", BCON_OID(&oid));
    assert_int_equal(emu_cstoken_encode_event(&b, 0x6B021ADB, 7, false, probe_uuid, key, NULL), 0);
    char *hex = hex_of(&b);
    assert_string_equal(hex, "826B021ADB000000072B022C0100296E5A100400000000000000000000000000ABC"
                             "DEF46645F696400640000000000000000000000630004");
    free(hex);

    assert_int_equal(emu_cstoken_encode_event(&b, 0x6B021ADB, 7, true, probe_uuid, key, NULL), 0);
    hex = hex_of(&b);
    assert_int_equal(b.data[EMU_CSTOKEN_FROM_INVALIDATE_OFFSET], 0x6F);
    assert_string_equal(hex, "826B021ADB000000072B022C0100296F5A100400000000000000000000000000ABC"
                             "DEF46645F696400640000000000000000000000630004");
    free(hex);
    bson_destroy(key);
    emu_kbuf_destroy(&b);
}

static void test_hwm_and_drop_layout(void **state)
{
    (void)state;
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    emu_cstoken_encode_hwm(&b, 0x64A7F2D1, 1);
    char *hex = hex_of(&b);
    assert_string_equal(hex, "8264A7F2D1000000012B0229296E04");
    free(hex);

    /* drop: UUID but no documentKey; dropDatabase: neither. */
    assert_int_equal(emu_cstoken_encode_event(&b, 0x64A7F2D1, 2, false, probe_uuid, NULL, NULL), 0);
    hex = hex_of(&b);
    assert_string_equal(hex, "8264A7F2D1000000022B022C0100296E5A100400000000000000000000000000ABC"
                             "DEF04");
    free(hex);
    assert_int_equal(emu_cstoken_encode_event(&b, 0x64A7F2D1, 3, false, NULL, NULL, NULL), 0);
    hex = hex_of(&b);
    assert_string_equal(hex, "8264A7F2D1000000032B022C0100296E04");
    free(hex);
    emu_kbuf_destroy(&b);
}

static void test_round_trip(void **state)
{
    (void)state;
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    bson_t *key = BCON_NEW("_id", BCON_UTF8("abc"), "sk", BCON_INT32(-7));
    assert_int_equal(emu_cstoken_encode_event(&b, 1700000000, 42, true, probe_uuid, key, NULL), 0);
    char *hex = hex_of(&b);
    bson_t *doc = token_doc(hex);
    emu_cstoken_t tok;
    mc_error_t err;
    assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    assert_int_equal(tok.ts_t, 1700000000);
    assert_int_equal(tok.ts_i, 42);
    assert_int_equal(tok.version, 1);
    assert_int_equal(tok.type, EMU_CSTOKEN_EVENT);
    assert_int_equal(tok.txn_op_index, 0);
    assert_true(tok.from_invalidate);
    assert_true(tok.has_uuid);
    assert_memory_equal(tok.uuid, probe_uuid, 16);
    assert_non_null(tok.event_id);
    assert_int_equal(tok.raw_len, b.len);
    assert_memory_equal(tok.raw, b.data, b.len);
    /* The eventIdentifier is the encoded documentKey, ending just before the 04 terminator. */
    assert_int_equal(tok.event_id + tok.event_id_len, tok.raw + tok.raw_len - 1);
    emu_cstoken_cleanup(&tok);
    bson_destroy(doc);

    /* Lower-case hex is accepted too. */
    for (char *p = hex; *p; p++) {
        if (*p >= 'A' && *p <= 'F') {
            *p = (char)(*p - 'A' + 'a');
        }
    }
    doc = token_doc(hex);
    assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    assert_int_equal(tok.ts_i, 42);
    emu_cstoken_cleanup(&tok);
    bson_destroy(doc);
    free(hex);

    emu_cstoken_encode_hwm(&b, 5, 6);
    hex = hex_of(&b);
    doc = token_doc(hex);
    assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    assert_int_equal(tok.type, EMU_CSTOKEN_HWM);
    assert_false(tok.has_uuid);
    assert_null(tok.event_id);
    assert_int_equal(tok.ts_t, 5);
    assert_int_equal(tok.ts_i, 6);
    emu_cstoken_cleanup(&tok);
    bson_destroy(doc);
    free(hex);
    bson_destroy(key);
    emu_kbuf_destroy(&b);
}

/* Every BSON type a documentKey may hold encodes to something the parser accepts. */
static void test_all_types_round_trip(void **state)
{
    (void)state;
    bson_decimal128_t dec;
    bson_decimal128_from_string("1.5", &dec);
    bson_t scope = BSON_INITIALIZER;
    BSON_APPEND_INT32(&scope, "x", 1);
    bson_t *key = bson_new();
    BSON_APPEND_INT32(key, "i32", -123456);
    BSON_APPEND_INT64(key, "i64", INT64_MAX);
    BSON_APPEND_INT64(key, "min", INT64_MIN);
    BSON_APPEND_DOUBLE(key, "d", -2.75);
    BSON_APPEND_DOUBLE(key, "dpos", 1e300);
    BSON_APPEND_DECIMAL128(key, "dec", &dec);
    bson_append_utf8(key, "s", -1, "a\0b", 3);
    BSON_APPEND_SYMBOL(key, "sym", "sym");
    BSON_APPEND_BOOL(key, "t", true);
    BSON_APPEND_BOOL(key, "f", false);
    BSON_APPEND_NULL(key, "n");
    BSON_APPEND_UNDEFINED(key, "u");
    BSON_APPEND_MINKEY(key, "mn");
    BSON_APPEND_MAXKEY(key, "mx");
    BSON_APPEND_DATE_TIME(key, "dt", -1000);
    BSON_APPEND_TIMESTAMP(key, "ts", 1, 2);
    BSON_APPEND_REGEX(key, "re", "^a", "i");
    BSON_APPEND_CODE(key, "code", "f()");
    BSON_APPEND_CODE_WITH_SCOPE(key, "cws", "g()", &scope);
    uint8_t big[300];
    memset(big, 0x5A, sizeof big);
    BSON_APPEND_BINARY(key, "bin", BSON_SUBTYPE_BINARY, big, sizeof big);
    BSON_APPEND_BINARY(key, "uuid", BSON_SUBTYPE_UUID, probe_uuid, 16);
    bson_t sub, arr;
    BSON_APPEND_DOCUMENT_BEGIN(key, "doc", &sub);
    BSON_APPEND_ARRAY_BEGIN(&sub, "arr", &arr);
    BSON_APPEND_INT32(&arr, "0", 1);
    BSON_APPEND_UTF8(&arr, "1", "x");
    bson_append_array_end(&sub, &arr);
    bson_append_document_end(key, &sub);
    bson_oid_t oid;
    bson_oid_init_from_string(&oid, "0123456789abcdef01234567");
    BSON_APPEND_DBPOINTER(key, "dbp", "db.c", &oid);

    emu_kbuf_t b;
    emu_kbuf_init(&b);
    assert_int_equal(emu_cstoken_encode_event(&b, 9, 9, false, probe_uuid, key, NULL), 0);
    char *hex = hex_of(&b);
    bson_t *doc = token_doc(hex);
    emu_cstoken_t tok;
    mc_error_t err;
    mc_error_clear(&err);
    int rc = emu_cstoken_parse(doc, &tok, &err);
    if (rc != 0) {
        fail_msg("parse failed: %d %s", err.cause, err.message);
    }
    assert_non_null(tok.event_id);
    emu_cstoken_cleanup(&tok);

    /* Dropping the last byte, or any single byte of the key, is detected. */
    size_t n = strlen(hex);
    hex[n - 2] = '\0';
    bson_destroy(doc);
    doc = token_doc(hex);
    assert_int_not_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    bson_destroy(doc);
    free(hex);
    bson_destroy(key);
    bson_destroy(&scope);
    emu_kbuf_destroy(&b);
}

/* Equal _id values of different numeric types encode identically; different values do not. */
static void test_canonical_numbers(void **state)
{
    (void)state;
    emu_kbuf_t a, b, c;
    emu_kbuf_init(&a);
    emu_kbuf_init(&b);
    emu_kbuf_init(&c);
    bson_t *k1 = BCON_NEW("_id", BCON_INT32(1));
    bson_t *k2 = BCON_NEW("_id", BCON_DOUBLE(1.0));
    bson_t *k3 = BCON_NEW("_id", BCON_INT64(2));
    emu_cstoken_encode_event(&a, 1, 1, false, probe_uuid, k1, NULL);
    emu_cstoken_encode_event(&b, 1, 1, false, probe_uuid, k2, NULL);
    emu_cstoken_encode_event(&c, 1, 1, false, probe_uuid, k3, NULL);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.data, b.data, a.len);
    assert_int_equal(emu_cstoken_compare(a.data, a.len, c.data, c.len), -1);
    /* _id 1 is "2B02", as in real KeyString. */
    char *hex = hex_of(&a);
    assert_non_null(strstr(hex, "46"
                                "2B"
                                "5F696400"
                                "2B02"
                                "00"
                                "04"));
    free(hex);
    bson_destroy(k1);
    bson_destroy(k2);
    bson_destroy(k3);
    emu_kbuf_destroy(&a);
    emu_kbuf_destroy(&b);
    emu_kbuf_destroy(&c);
}

static int cmp_keys(const bson_t *x, const bson_t *y)
{
    emu_kbuf_t a, b;
    emu_kbuf_init(&a);
    emu_kbuf_init(&b);
    emu_cstoken_encode_event(&a, 1, 1, false, probe_uuid, x, NULL);
    emu_cstoken_encode_event(&b, 1, 1, false, probe_uuid, y, NULL);
    int r = emu_cstoken_compare(a.data, a.len, b.data, b.len);
    emu_kbuf_destroy(&a);
    emu_kbuf_destroy(&b);
    return r;
}

/* Integer keys sort numerically, strings lexicographically (with NUL before any byte). */
static void test_key_ordering(void **state)
{
    (void)state;
    int64_t vals[] = {INT64_MIN + 1, -70000, -200, -5, -1, 0, 1, 5, 200, 70000, INT64_MAX};
    size_t n = sizeof vals / sizeof vals[0];
    for (size_t i = 0; i + 1 < n; i++) {
        bson_t *x = BCON_NEW("_id", BCON_INT64(vals[i]));
        bson_t *y = BCON_NEW("_id", BCON_INT64(vals[i + 1]));
        assert_int_equal(cmp_keys(x, y), -1);
        assert_int_equal(cmp_keys(y, x), 1);
        bson_destroy(x);
        bson_destroy(y);
    }
    bson_t *s1 = bson_new(), *s2 = bson_new(), *s3 = bson_new();
    bson_append_utf8(s1, "_id", -1, "a", 1);
    bson_append_utf8(s2, "_id", -1, "a\0", 2);
    bson_append_utf8(s3, "_id", -1, "ab", 2);
    assert_int_equal(cmp_keys(s1, s2), -1);
    assert_int_equal(cmp_keys(s2, s3), -1);
    bson_destroy(s1);
    bson_destroy(s2);
    bson_destroy(s3);
}

/* Tokens sort by cluster time, a high-water mark before events at its time, an event before
 * its invalidate; and the hex strings sort the same way as the bytes. */
static void test_token_ordering(void **state)
{
    (void)state;
    emu_kbuf_t t[6];
    bson_t *key = BCON_NEW("_id", BCON_INT32(99));
    for (int i = 0; i < 6; i++) {
        emu_kbuf_init(&t[i]);
    }
    emu_cstoken_encode_hwm(&t[0], 100, 1);
    emu_cstoken_encode_event(&t[1], 100, 1, false, probe_uuid, key, NULL);
    emu_cstoken_encode_event(&t[2], 100, 1, true, probe_uuid, NULL, NULL);
    emu_cstoken_encode_hwm(&t[3], 100, 2);
    emu_cstoken_encode_event(&t[4], 100, 0xFFFFFFFF, false, NULL, NULL, NULL);
    emu_cstoken_encode_event(&t[5], 101, 0, false, probe_uuid, key, NULL);
    for (int i = 0; i + 1 < 6; i++) {
        assert_int_equal(emu_cstoken_compare(t[i].data, t[i].len, t[i + 1].data, t[i + 1].len), -1);
        char *a = hex_of(&t[i]);
        char *b = hex_of(&t[i + 1]);
        assert_true(strcmp(a, b) < 0);
        free(a);
        free(b);
    }
    for (int i = 0; i < 6; i++) {
        emu_kbuf_destroy(&t[i]);
    }
    bson_destroy(key);
}

static void test_malformed_tokens(void **state)
{
    (void)state;
    bson_t *doc = bson_new();
    expect_parse_error(doc, 40647); /* no _data */
    BSON_APPEND_INT32(doc, "_data", 5);
    expect_parse_error(doc, 40647); /* wrong type */
    bson_destroy(doc);

    doc = BCON_NEW("_data", BCON_UTF8("8264"), "_typeBits", BCON_INT32(1));
    expect_parse_error(doc, 40648);
    bson_destroy(doc);

    expect_hex_error("XYZ0", 9);
    expect_hex_error("826", 9);
    expect_hex_error("", 40649);
    expect_hex_error("04", 40649);
    expect_hex_error("8264A7F2D1", 50811);                   /* truncated timestamp */
    expect_hex_error("2B02", 50811);                         /* not starting with a Timestamp */
    expect_hex_error("8264A7F2D10000000104", 50796);         /* no version */
    expect_hex_error("8264A7F2D1000000012B0604", 50795);     /* version 3 */
    expect_hex_error("8264A7F2D1000000016E04", 50854);       /* version not an int */
    expect_hex_error("8264A7F2D1000000012B0204", 51055);     /* no tokenType */
    expect_hex_error("8264A7F2D1000000012B022B0A04", 51057); /* tokenType 5 */
    expect_hex_error("8264A7F2D1000000012B02292904", 50872); /* no fromInvalidate */
    expect_hex_error("8264A7F2D1000000012B0229292904", 50870);
    expect_hex_error("8264A7F2D1000000012B0229296F04", 6189504); /* HWM with fromInvalidate */
    /* Event token with a documentKey where the UUID belongs: 207 InvalidUUID. */
    expect_hex_error("8264A7F2D1000000012B022C0100296E462B5F6964002B020004", 207);
    /* eventIdentifier that is not an object. */
    expect_hex_error("8264A7F2D1000000012B022C0100296E5A100400000000000000000000000000ABCDEF2B0204",
                     6189503);
    /* A value after the eventIdentifier in a v1 token. */
    expect_hex_error(
        "8264A7F2D1000000012B022C0100296E5A100400000000000000000000000000ABCDEF46002B0204", 40646);
    /* Missing the end byte, and bytes after the end byte. */
    expect_hex_error("8264A7F2D1000000012B0229296E", 50811);
    expect_hex_error("8264A7F2D1000000012B0229", 50811);
    expect_hex_error("8264A7F2D1000000012B0229296E0404", 50811);
    /* An unknown type byte inside the documentKey. */
    expect_hex_error("8264A7F2D1000000012B022C0100296E5A100400000000000000000000000000ABCDEF4603"
                     "5F696400030004",
                     50811);
}

static void test_deep_key_rejected(void **state)
{
    (void)state;
    bson_t *docs[260];
    docs[259] = BCON_NEW("x", BCON_INT32(1));
    for (int i = 258; i >= 0; i--) {
        docs[i] = bson_new();
        BSON_APPEND_DOCUMENT(docs[i], "x", docs[i + 1]);
    }
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    mc_error_t err;
    assert_int_not_equal(emu_cstoken_encode_event(&b, 1, 1, false, probe_uuid, docs[0], &err), 0);
    for (int i = 0; i < 260; i++) {
        bson_destroy(docs[i]);
    }
    emu_kbuf_destroy(&b);
}

static void test_append(void **state)
{
    (void)state;
    emu_kbuf_t b;
    emu_kbuf_init(&b);
    emu_cstoken_encode_hwm(&b, 1, 2);
    bson_t doc = BSON_INITIALIZER;
    assert_true(emu_cstoken_append(&doc, "_id", b.data, b.len));
    bson_iter_t it, sub;
    assert_true(bson_iter_init_find(&it, &doc, "_id"));
    assert_true(BSON_ITER_HOLDS_DOCUMENT(&it));
    bson_iter_recurse(&it, &sub);
    assert_true(bson_iter_find(&sub, "_data"));
    assert_string_equal(bson_iter_utf8(&sub, NULL), "8200000001000000022B0229296E04");
    bson_destroy(&doc);
    emu_kbuf_destroy(&b);
}

/* The events of one transaction share the cluster time and sort by txnOpIndex (whatever their
 * documentKey), all after the events before and before the events after; the parser returns the
 * index and where the fromInvalidate byte is. */
static void test_txn_op_index_ordering(void **state)
{
    (void)state;
    static const uint32_t idx[] = {0,   1,    2,     63,    64,       127,      128,       255,
                                   256, 1000, 65535, 70000, 16777215, 16777216, 2147483647};
    enum { N = sizeof idx / sizeof idx[0] };
    emu_kbuf_t t[N + 2];
    /* Later operations get smaller keys: the order must not come from the documentKey. */
    for (int k = 0; k < N + 2; k++) {
        emu_kbuf_init(&t[k]);
    }
    bson_t *last = BCON_NEW("_id", BCON_INT32(1000000));
    assert_int_equal(
        emu_cstoken_encode_txn_event(&t[0], 500, 7, 2147483647, false, probe_uuid, last, NULL), 0);
    for (int k = 0; k < N; k++) {
        bson_t *key = BCON_NEW("_id", BCON_INT32(N - k));
        assert_int_equal(
            emu_cstoken_encode_txn_event(&t[k + 1], 500, 8, idx[k], false, probe_uuid, key, NULL),
            0);
        bson_destroy(key);
    }
    bson_t *first = BCON_NEW("_id", BCON_INT32(-5));
    assert_int_equal(
        emu_cstoken_encode_txn_event(&t[N + 1], 500, 9, 0, false, probe_uuid, first, NULL), 0);
    for (int k = 0; k + 1 < N + 2; k++) {
        assert_int_equal(emu_cstoken_compare(t[k].data, t[k].len, t[k + 1].data, t[k + 1].len), -1);
        char *a = hex_of(&t[k]);
        char *b = hex_of(&t[k + 1]);
        assert_true(strcmp(a, b) < 0);
        free(a);
        free(b);
    }
    for (int k = 0; k < N; k++) {
        char *hex = hex_of(&t[k + 1]);
        bson_t *doc = token_doc(hex);
        emu_cstoken_t tok;
        mc_error_t err;
        assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
        assert_int_equal(tok.txn_op_index, idx[k]);
        assert_int_equal(tok.ts_i, 8);
        assert_false(tok.has_fragment);
        assert_int_equal(tok.raw[tok.from_invalidate_offset], 0x6E);
        if (idx[k] == 0) {
            assert_int_equal(tok.from_invalidate_offset, EMU_CSTOKEN_FROM_INVALIDATE_OFFSET);
        }
        emu_cstoken_cleanup(&tok);
        bson_destroy(doc);
        free(hex);
    }
    /* Outside a transaction the token is exactly the plain event token. */
    emu_kbuf_t plain;
    emu_kbuf_init(&plain);
    emu_cstoken_encode_event(&plain, 500, 9, false, probe_uuid, first, NULL);
    assert_int_equal(plain.len, t[N + 1].len);
    assert_memory_equal(plain.data, t[N + 1].data, plain.len);
    emu_kbuf_destroy(&plain);
    for (int k = 0; k < N + 2; k++) {
        emu_kbuf_destroy(&t[k]);
    }
    bson_destroy(first);
    bson_destroy(last);
}

/* Fragment tokens are v2 tokens ({operationType, documentKey} identifier, fragmentNum last);
 * they parse back, order by fragment, and sort after the event's own v1 token. A fragmentNum in
 * a v1 token is refused as MongoDB refuses it (40646). */
static void test_fragment_tokens(void **state)
{
    (void)state;
    emu_kbuf_t f[4], v1;
    bson_t *key = BCON_NEW("_id", BCON_UTF8("big"));
    emu_kbuf_init(&v1);
    emu_cstoken_encode_txn_event(&v1, 700, 3, 4, false, probe_uuid, key, NULL);
    for (int k = 0; k < 4; k++) {
        emu_kbuf_init(&f[k]);
        assert_int_equal(emu_cstoken_encode_fragment(&f[k], 700, 3, 4, probe_uuid, "update", key,
                                                     NULL, (uint32_t)k, NULL),
                         0);
        char *hex = hex_of(&f[k]);
        bson_t *doc = token_doc(hex);
        emu_cstoken_t tok;
        mc_error_t err;
        assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
        assert_int_equal(tok.version, 2);
        assert_int_equal(tok.type, EMU_CSTOKEN_EVENT);
        assert_int_equal(tok.txn_op_index, 4);
        assert_true(tok.has_uuid);
        assert_true(tok.has_fragment);
        assert_int_equal(tok.fragment_num, k);
        assert_int_equal(tok.ts_t, 700);
        assert_int_equal(tok.ts_i, 3);
        /* the fragmentNum follows the eventIdentifier object */
        assert_int_equal(tok.event_id + tok.event_id_len, tok.raw + tok.fragment_offset);
        emu_cstoken_cleanup(&tok);
        bson_destroy(doc);
        free(hex);
        assert_int_equal(emu_cstoken_compare(v1.data, v1.len, f[k].data, f[k].len), -1);
        if (k > 0) {
            assert_int_equal(emu_cstoken_compare(f[k - 1].data, f[k - 1].len, f[k].data, f[k].len),
                             -1);
        }
    }
    /* Without a UUID a v2 token carries null. */
    emu_kbuf_t nouuid;
    emu_kbuf_init(&nouuid);
    assert_int_equal(
        emu_cstoken_encode_fragment(&nouuid, 700, 3, 0, NULL, "dropDatabase", NULL, NULL, 0, NULL),
        0);
    char *hex = hex_of(&nouuid);
    bson_t *doc = token_doc(hex);
    emu_cstoken_t tok;
    mc_error_t err;
    assert_int_equal(emu_cstoken_parse(doc, &tok, &err), 0);
    assert_false(tok.has_uuid);
    assert_true(tok.has_fragment);
    emu_cstoken_cleanup(&tok);
    bson_destroy(doc);
    free(hex);
    /* v1 with a trailing number: the v1 token of a fragment does not exist. */
    char *v1hex = hex_of(&v1);
    size_t n = strlen(v1hex);
    char *bad = malloc(n + 8);
    memcpy(bad, v1hex, n - 2);
    memcpy(bad + n - 2, "2B0204", 7);
    expect_hex_error(bad, 40646);
    free(bad);
    free(v1hex);
    for (int k = 0; k < 4; k++) {
        emu_kbuf_destroy(&f[k]);
    }
    emu_kbuf_destroy(&nouuid);
    emu_kbuf_destroy(&v1);
    bson_destroy(key);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_event_token_layout),
        cmocka_unit_test(test_hwm_and_drop_layout),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_all_types_round_trip),
        cmocka_unit_test(test_canonical_numbers),
        cmocka_unit_test(test_key_ordering),
        cmocka_unit_test(test_token_ordering),
        cmocka_unit_test(test_malformed_tokens),
        cmocka_unit_test(test_deep_key_rejected),
        cmocka_unit_test(test_append),
        cmocka_unit_test(test_txn_op_index_ordering),
        cmocka_unit_test(test_fragment_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
