/*
 * bson_value.c: MongoDB's canonical ordering and equality of BSON values, shared by the query
 * matcher (filter.c) and, through mc_bson_value_compare(), by mongo-emulator's sorts,
 * $min/$max and $group.
 *
 * Pure functions, any thread, no allocation except the decimal128 -> double conversion (a
 * stack buffer). Invariants: the order is total and consistent with equality (compare == 0
 * for values MongoDB treats as equal: 1, 1.0 and NumberLong(1) are equal, NaN equals NaN
 * and sorts below every other number). Recursion into sub-documents is bounded by
 * MC__BSON_MAX_COMPARE_DEPTH; deeper levels fall back to a byte comparison so that hostile
 * input cannot exhaust the stack.
 */
#include "bson_util.h"

#include "mongocast/filter.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int mc__bson_canon_rank(bson_type_t type)
{
    switch (type) {
    case BSON_TYPE_MINKEY: return -1;
    case BSON_TYPE_EOD:
    case BSON_TYPE_UNDEFINED: return 0;
    case BSON_TYPE_NULL: return 5;
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
    case BSON_TYPE_DECIMAL128: return 10;
    case BSON_TYPE_UTF8:
    case BSON_TYPE_SYMBOL: return 15;
    case BSON_TYPE_DOCUMENT: return 20;
    case BSON_TYPE_ARRAY: return 25;
    case BSON_TYPE_BINARY: return 30;
    case BSON_TYPE_OID: return 35;
    case BSON_TYPE_BOOL: return 40;
    case BSON_TYPE_DATE_TIME: return 45;
    case BSON_TYPE_TIMESTAMP: return 47;
    case BSON_TYPE_REGEX: return 50;
    case BSON_TYPE_DBPOINTER: return 55;
    case BSON_TYPE_CODE: return 60;
    case BSON_TYPE_CODEWSCOPE: return 65;
    case BSON_TYPE_MAXKEY: return 100;
    default: return 101;
    }
}

const char *mc_bson_type_name(bson_type_t type)
{
    switch (type) {
    case BSON_TYPE_DOUBLE: return "double";
    case BSON_TYPE_UTF8: return "string";
    case BSON_TYPE_DOCUMENT: return "object";
    case BSON_TYPE_ARRAY: return "array";
    case BSON_TYPE_BINARY: return "binData";
    case BSON_TYPE_UNDEFINED: return "undefined";
    case BSON_TYPE_OID: return "objectId";
    case BSON_TYPE_BOOL: return "bool";
    case BSON_TYPE_DATE_TIME: return "date";
    case BSON_TYPE_NULL: return "null";
    case BSON_TYPE_REGEX: return "regex";
    case BSON_TYPE_DBPOINTER: return "dbPointer";
    case BSON_TYPE_CODE: return "javascript";
    case BSON_TYPE_SYMBOL: return "symbol";
    case BSON_TYPE_CODEWSCOPE: return "javascriptWithScope";
    case BSON_TYPE_INT32: return "int";
    case BSON_TYPE_TIMESTAMP: return "timestamp";
    case BSON_TYPE_INT64: return "long";
    case BSON_TYPE_DECIMAL128: return "decimal";
    case BSON_TYPE_MINKEY: return "minKey";
    case BSON_TYPE_MAXKEY: return "maxKey";
    default: return "missing";
    }
}

bool mc__bson_is_number(bson_type_t type)
{
    return type == BSON_TYPE_DOUBLE || type == BSON_TYPE_INT32 || type == BSON_TYPE_INT64 ||
           type == BSON_TYPE_DECIMAL128;
}

static long double decimal_to_ld(const bson_decimal128_t *d)
{
    char buf[BSON_DECIMAL128_STRING];
    bson_decimal128_to_string(d, buf);
    /* libbson prints "Infinity", "-Infinity" and "NaN", all of which strtold accepts. */
    return strtold(buf, NULL);
}

bool mc__bson_value_is_nan(const bson_value_t *v)
{
    if (v->value_type == BSON_TYPE_DOUBLE) {
        return isnan(v->value.v_double);
    }
    if (v->value_type == BSON_TYPE_DECIMAL128) {
        return isnan(decimal_to_ld(&v->value.v_decimal128));
    }
    return false;
}

double mc__bson_value_as_double(const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_DOUBLE: return v->value.v_double;
    case BSON_TYPE_INT32: return v->value.v_int32;
    case BSON_TYPE_INT64: return (double)v->value.v_int64;
    case BSON_TYPE_DECIMAL128: return (double)decimal_to_ld(&v->value.v_decimal128);
    default: return 0.0;
    }
}

static int cmp_i64(int64_t a, int64_t b)
{
    return a < b ? -1 : (a > b ? 1 : 0);
}

/* Exact comparison of an integer with a double: converting the integer to double would round
 * values above 2^53 and make distinct numbers compare equal. */
static int cmp_i64_double(int64_t i, double d)
{
    if (d >= 9223372036854775808.0) {
        return -1;
    }
    if (d < -9223372036854775808.0) {
        return 1;
    }
    int64_t t = (int64_t)d;
    if (i != t) {
        return i < t ? -1 : 1;
    }
    double frac = d - (double)t;
    return frac > 0 ? -1 : (frac < 0 ? 1 : 0);
}

static int cmp_numbers(const bson_value_t *a, const bson_value_t *b)
{
    bool an = mc__bson_value_is_nan(a), bn = mc__bson_value_is_nan(b);
    if (an || bn) {
        return an && bn ? 0 : (an ? -1 : 1);
    }
    bson_type_t ta = a->value_type, tb = b->value_type;
    if (ta == BSON_TYPE_DECIMAL128 || tb == BSON_TYPE_DECIMAL128) {
        /* Decimal128 is compared through long double: exact for the integers and short
         * decimals that occur in practice, approximate beyond ~19 significant digits. */
        long double x = ta == BSON_TYPE_DECIMAL128 ? decimal_to_ld(&a->value.v_decimal128)
                                                   : (long double)mc__bson_value_as_double(a);
        long double y = tb == BSON_TYPE_DECIMAL128 ? decimal_to_ld(&b->value.v_decimal128)
                                                   : (long double)mc__bson_value_as_double(b);
        if (ta == BSON_TYPE_INT64) {
            x = (long double)a->value.v_int64;
        }
        if (tb == BSON_TYPE_INT64) {
            y = (long double)b->value.v_int64;
        }
        return x < y ? -1 : (x > y ? 1 : 0);
    }
    if (ta != BSON_TYPE_DOUBLE && tb != BSON_TYPE_DOUBLE) {
        int64_t x = ta == BSON_TYPE_INT32 ? a->value.v_int32 : a->value.v_int64;
        int64_t y = tb == BSON_TYPE_INT32 ? b->value.v_int32 : b->value.v_int64;
        return cmp_i64(x, y);
    }
    if (ta == BSON_TYPE_DOUBLE && tb == BSON_TYPE_DOUBLE) {
        double x = a->value.v_double, y = b->value.v_double;
        return x < y ? -1 : (x > y ? 1 : 0);
    }
    if (ta == BSON_TYPE_DOUBLE) {
        int64_t y = tb == BSON_TYPE_INT32 ? b->value.v_int32 : b->value.v_int64;
        return -cmp_i64_double(y, a->value.v_double);
    }
    int64_t x = ta == BSON_TYPE_INT32 ? a->value.v_int32 : a->value.v_int64;
    return cmp_i64_double(x, b->value.v_double);
}

static int cmp_bytes(const void *a, size_t alen, const void *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, n) : 0;
    if (c) {
        return c < 0 ? -1 : 1;
    }
    return alen < blen ? -1 : (alen > blen ? 1 : 0);
}

static int sign(int v)
{
    return v < 0 ? -1 : (v > 0 ? 1 : 0);
}

int mc__bson_doc_compare(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                         int depth)
{
    bson_iter_t ia, ib;
    if (depth <= 0) {
        return cmp_bytes(a, alen, b, blen);
    }
    bool oka = mc__bson_iter_init_safe(&ia, a, alen);
    bool okb = mc__bson_iter_init_safe(&ib, b, blen);
    if (!oka || !okb) {
        return cmp_bytes(a, alen, b, blen);
    }
    for (;;) {
        bool ha = bson_iter_next(&ia);
        bool hb = bson_iter_next(&ib);
        if (!ha || !hb) {
            return ha ? 1 : (hb ? -1 : 0);
        }
        int ra = mc__bson_canon_rank(bson_iter_type(&ia));
        int rb = mc__bson_canon_rank(bson_iter_type(&ib));
        if (ra != rb) {
            return ra < rb ? -1 : 1;
        }
        int c = sign(strcmp(bson_iter_key(&ia), bson_iter_key(&ib)));
        if (c) {
            return c;
        }
        c = mc__bson_value_compare_depth(bson_iter_value(&ia), bson_iter_value(&ib), depth - 1);
        if (c) {
            return c;
        }
    }
}

int mc__bson_value_compare_depth(const bson_value_t *a, const bson_value_t *b, int depth)
{
    int ra = mc__bson_canon_rank(a->value_type), rb = mc__bson_canon_rank(b->value_type);
    if (ra != rb) {
        return ra < rb ? -1 : 1;
    }
    switch (a->value_type) {
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
    case BSON_TYPE_DECIMAL128: return cmp_numbers(a, b);
    case BSON_TYPE_UTF8:
    case BSON_TYPE_SYMBOL: {
        const char *sa, *sb;
        uint32_t la, lb;
        if (a->value_type == BSON_TYPE_UTF8) {
            sa = a->value.v_utf8.str, la = a->value.v_utf8.len;
        } else {
            sa = a->value.v_symbol.symbol, la = a->value.v_symbol.len;
        }
        if (b->value_type == BSON_TYPE_UTF8) {
            sb = b->value.v_utf8.str, lb = b->value.v_utf8.len;
        } else {
            sb = b->value.v_symbol.symbol, lb = b->value.v_symbol.len;
        }
        return cmp_bytes(sa, la, sb, lb);
    }
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY:
        return mc__bson_doc_compare(a->value.v_doc.data, a->value.v_doc.data_len,
                                    b->value.v_doc.data, b->value.v_doc.data_len, depth);
    case BSON_TYPE_BINARY:
        if (a->value.v_binary.data_len != b->value.v_binary.data_len) {
            return a->value.v_binary.data_len < b->value.v_binary.data_len ? -1 : 1;
        }
        if (a->value.v_binary.subtype != b->value.v_binary.subtype) {
            return a->value.v_binary.subtype < b->value.v_binary.subtype ? -1 : 1;
        }
        return cmp_bytes(a->value.v_binary.data, a->value.v_binary.data_len, b->value.v_binary.data,
                         b->value.v_binary.data_len);
    case BSON_TYPE_OID: return sign(memcmp(a->value.v_oid.bytes, b->value.v_oid.bytes, 12));
    case BSON_TYPE_BOOL: return (int)a->value.v_bool - (int)b->value.v_bool;
    case BSON_TYPE_DATE_TIME: return cmp_i64(a->value.v_datetime, b->value.v_datetime);
    case BSON_TYPE_TIMESTAMP:
        if (a->value.v_timestamp.timestamp != b->value.v_timestamp.timestamp) {
            return a->value.v_timestamp.timestamp < b->value.v_timestamp.timestamp ? -1 : 1;
        }
        if (a->value.v_timestamp.increment != b->value.v_timestamp.increment) {
            return a->value.v_timestamp.increment < b->value.v_timestamp.increment ? -1 : 1;
        }
        return 0;
    case BSON_TYPE_REGEX: {
        int c = sign(strcmp(a->value.v_regex.regex, b->value.v_regex.regex));
        return c ? c : sign(strcmp(a->value.v_regex.options, b->value.v_regex.options));
    }
    case BSON_TYPE_DBPOINTER: {
        uint32_t la = a->value.v_dbpointer.collection_len, lb = b->value.v_dbpointer.collection_len;
        if (la != lb) {
            return la < lb ? -1 : 1;
        }
        int c = sign(memcmp(a->value.v_dbpointer.collection, b->value.v_dbpointer.collection, la));
        return c ? c
                 : sign(memcmp(a->value.v_dbpointer.oid.bytes, b->value.v_dbpointer.oid.bytes, 12));
    }
    case BSON_TYPE_CODE:
        return cmp_bytes(a->value.v_code.code, a->value.v_code.code_len, b->value.v_code.code,
                         b->value.v_code.code_len);
    case BSON_TYPE_CODEWSCOPE: {
        int c = cmp_bytes(a->value.v_codewscope.code, a->value.v_codewscope.code_len,
                          b->value.v_codewscope.code, b->value.v_codewscope.code_len);
        if (c) {
            return c;
        }
        return mc__bson_doc_compare(
            a->value.v_codewscope.scope_data, a->value.v_codewscope.scope_len,
            b->value.v_codewscope.scope_data, b->value.v_codewscope.scope_len, depth);
    }
    default: return 0; /* MinKey, MaxKey, null, undefined: one value per rank */
    }
}

int mc_bson_value_compare(const bson_value_t *a, const bson_value_t *b)
{
    return mc__bson_value_compare_depth(a, b, MC__BSON_MAX_COMPARE_DEPTH);
}

bool mc__bson_value_binary_equal(const bson_value_t *a, const bson_value_t *b)
{
    if (a->value_type != b->value_type) {
        return false;
    }
    switch (a->value_type) {
    case BSON_TYPE_DOUBLE:
        return memcmp(&a->value.v_double, &b->value.v_double, sizeof(double)) == 0;
    case BSON_TYPE_DECIMAL128:
        return a->value.v_decimal128.high == b->value.v_decimal128.high &&
               a->value.v_decimal128.low == b->value.v_decimal128.low;
    case BSON_TYPE_INT32: return a->value.v_int32 == b->value.v_int32;
    case BSON_TYPE_INT64: return a->value.v_int64 == b->value.v_int64;
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY:
        return a->value.v_doc.data_len == b->value.v_doc.data_len &&
               memcmp(a->value.v_doc.data, b->value.v_doc.data, a->value.v_doc.data_len) == 0;
    case BSON_TYPE_CODEWSCOPE:
        return a->value.v_codewscope.scope_len == b->value.v_codewscope.scope_len &&
               memcmp(a->value.v_codewscope.scope_data, b->value.v_codewscope.scope_data,
                      a->value.v_codewscope.scope_len) == 0 &&
               mc__bson_value_compare_depth(a, b, 1) == 0;
    default: return mc__bson_value_compare_depth(a, b, MC__BSON_MAX_COMPARE_DEPTH) == 0;
    }
}
