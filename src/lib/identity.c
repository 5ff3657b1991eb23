/*
 * identity.c: the one identity rule (mongocast/identity.h): canonical identities of BSON
 * values, their comparison and their JSON spelling.
 *
 * Pure functions, any thread, no allocation except for a binary identity's JSON (rendered
 * through the Extended JSON writer) and a decimal128's string form on the stack.
 *
 * Invariant: a canonical identity is a tag byte followed by its payload; equal values under
 * the documented rule give byte-equal identities, different ones never do. Everything that
 * compares identities (routing, the lookup cache, subscribers' tokens, since replay) goes
 * through mc_identity_from_*() and compares the bytes.
 */
#include "mongocast/identity.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_writer.h"

enum {
    TAG_STRING = 's',
    TAG_INTEGER = 'i',
    TAG_OID = 'o',
    TAG_BINARY = 'b',
};

static bool put_integer(int64_t v, mc_identity_t *out)
{
    uint64_t u = (uint64_t)v;
    out->bytes[0] = TAG_INTEGER;
    for (int k = 0; k < 8; k++) {
        out->bytes[1 + k] = (uint8_t)(u >> (56 - 8 * k));
    }
    out->len = 9;
    return true;
}

/* The integer a finite double holds exactly, within int64. -0.0 is 0. */
static bool double_integer(double d, int64_t *v)
{
    /* 2^63 is exactly representable; every double below it in magnitude that is integral
     * converts without rounding. */
    if (!isfinite(d) || d != floor(d) || d < -9223372036854775808.0 ||
        d >= 9223372036854775808.0) {
        return false;
    }
    *v = (int64_t)d;
    return true;
}

/*
 * The integer a decimal128 holds exactly, within int64. Read from libbson's string form,
 * which is "[-]digits[.digits][E[+|-]digits]", "Infinity", "-Infinity" or "NaN": the value is
 * the digits (point removed) times 10^(exponent - fraction digits). Trailing zeros may be
 * dropped from the digits against a negative scale ("5.00" is 5), never non-zero ones.
 */
static bool decimal_integer(const bson_decimal128_t *dec, int64_t *v)
{
    char s[BSON_DECIMAL128_STRING];
    bson_decimal128_to_string(dec, s);
    const char *p = s;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    char digits[64];
    size_t nd = 0;
    long frac = 0;
    bool point = false;
    for (; *p && *p != 'E'; p++) {
        if (*p == '.') {
            point = true;
            continue;
        }
        if (*p < '0' || *p > '9' || nd >= sizeof(digits)) {
            return false; /* Infinity, NaN */
        }
        digits[nd++] = *p;
        if (point) {
            frac++;
        }
    }
    if (nd == 0) {
        return false;
    }
    long exp = 0;
    if (*p == 'E') {
        char *end = NULL;
        exp = strtol(p + 1, &end, 10);
        if (!end || *end) {
            return false;
        }
    }
    long scale = exp - frac;
    /* Drop trailing zeros against a negative scale; a non-zero digit left there is a
     * fraction. */
    while (scale < 0 && nd > 0 && digits[nd - 1] == '0') {
        nd--;
        scale++;
    }
    if (scale < 0 && nd > 0) {
        return false;
    }
    /* Accumulate the magnitude, then the zeros of a positive scale, with overflow checks
     * against 2^63 (the magnitude of INT64_MIN). */
    const uint64_t limit = (uint64_t)INT64_MAX + 1;
    uint64_t mag = 0;
    for (size_t k = 0; k < nd; k++) {
        uint64_t d = (uint64_t)(digits[k] - '0');
        if (mag > (limit - d) / 10) {
            return false;
        }
        mag = mag * 10 + d;
    }
    if (mag != 0) {
        for (long k = 0; k < scale; k++) {
            if (mag > limit / 10) {
                return false;
            }
            mag *= 10;
        }
    }
    if (mag == limit) {
        if (!neg) {
            return false;
        }
        *v = INT64_MIN;
        return true;
    }
    if (mag > limit) {
        return false;
    }
    *v = neg ? -(int64_t)mag : (int64_t)mag;
    return true;
}

bool mc_identity_from_value(const bson_value_t *v, mc_identity_t *out)
{
    out->len = 0;
    if (!v) {
        return false;
    }
    int64_t n;
    switch (v->value_type) {
    case BSON_TYPE_UTF8: {
        uint32_t len = v->value.v_utf8.len;
        const char *s = v->value.v_utf8.str;
        if (len > MC_IDENTITY_MAX - 1 || !bson_utf8_validate(s, len, true) ||
            memchr(s, 0xC0, len) || memchr(s, 0xC1, len)) {
            /* 0xC0 and 0xC1 never occur in UTF-8; libbson's validator lets the overlong NUL
             * C0 80 through, but no JSON spelling exists for it. */
            return false;
        }
        out->bytes[0] = TAG_STRING;
        memcpy(out->bytes + 1, s, len);
        out->len = len + 1;
        return true;
    }
    case BSON_TYPE_INT32: return put_integer(v->value.v_int32, out);
    case BSON_TYPE_INT64: return put_integer(v->value.v_int64, out);
    case BSON_TYPE_DOUBLE:
        return double_integer(v->value.v_double, &n) && put_integer(n, out);
    case BSON_TYPE_DECIMAL128:
        return decimal_integer(&v->value.v_decimal128, &n) && put_integer(n, out);
    case BSON_TYPE_OID:
        out->bytes[0] = TAG_OID;
        memcpy(out->bytes + 1, v->value.v_oid.bytes, 12);
        out->len = 13;
        return true;
    case BSON_TYPE_BINARY: {
        uint32_t len = v->value.v_binary.data_len;
        if (len > MC_IDENTITY_MAX - 2) {
            return false;
        }
        out->bytes[0] = TAG_BINARY;
        out->bytes[1] = (uint8_t)v->value.v_binary.subtype;
        if (len) {
            memcpy(out->bytes + 2, v->value.v_binary.data, len);
        }
        out->len = len + 2;
        return true;
    }
    default: return false;
    }
}

bool mc_identity_from_iter(const bson_iter_t *it, mc_identity_t *out)
{
    out->len = 0;
    return it && mc_identity_from_value(bson_iter_value((bson_iter_t *)it), out);
}

bool mc_identity_equal(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len)
{
    return a && b && a_len > 0 && a_len == b_len && memcmp(a, b, a_len) == 0;
}

/* A binary value in compact relaxed Extended JSON: rendered as {"": v} and cut out of
 * "{"":<value>}". */
static size_t binary_json(const uint8_t *id, size_t len, mc__json_buf_t *b)
{
    bson_t doc;
    bson_init(&doc);
    bool ok = bson_append_binary(&doc, "", 0, (bson_subtype_t)id[1], id + 2, (uint32_t)(len - 2));
    size_t start = b->len;
    if (ok && mc__json_write_document(b, &doc, MC__JSON_RELAXED_COMPACT) == MC__JSON_OK &&
        b->len - start > 5) {
        /* "{"":" is 4 bytes, "}" is 1. */
        memmove(b->data + start, b->data + start + 4, b->len - start - 5);
        b->len -= 5;
    } else {
        b->err = MC__JSON_EINVALID;
    }
    bson_destroy(&doc);
    return b->err ? 0 : b->len;
}

size_t mc_identity_json(const uint8_t *id, size_t len, char *out)
{
    if (!id || len == 0 || !out) {
        return 0;
    }
    mc__json_buf_t b;
    mc__json_buf_init_fixed(&b, out, MC_IDENTITY_JSON_MAX);
    switch (id[0]) {
    case TAG_STRING: mc__json_write_string(&b, (const char *)id + 1, len - 1); break;
    case TAG_INTEGER: {
        if (len != 9) {
            return 0;
        }
        uint64_t u = 0;
        for (int k = 0; k < 8; k++) {
            u = (u << 8) | id[1 + k];
        }
        char num[24];
        int n = snprintf(num, sizeof(num), "%" PRId64, (int64_t)u);
        mc__json_buf_append(&b, num, (size_t)n);
        break;
    }
    case TAG_OID: {
        if (len != 13) {
            return 0;
        }
        bson_oid_t oid;
        memcpy(oid.bytes, id + 1, 12);
        char hex[25];
        bson_oid_to_string(&oid, hex);
        MC__JSON_LIT(&b, "{\"$oid\":\"");
        mc__json_buf_append(&b, hex, 24);
        MC__JSON_LIT(&b, "\"}");
        break;
    }
    case TAG_BINARY:
        if (len < 2) {
            return 0;
        }
        binary_json(id, len, &b);
        break;
    default: return 0;
    }
    if (b.err) {
        return 0;
    }
    out[b.len] = '\0';
    return b.len;
}
