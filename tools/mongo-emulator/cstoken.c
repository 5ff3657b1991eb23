/*
 * cstoken.c: encoding, decoding and validation of change-stream resume tokens.
 *
 * Runs on any thread (pure functions, no shared state). Invariants:
 * - every token this file encodes parses back with emu_cstoken_parse();
 * - the encoding of a documentKey is canonical (equal keys give equal bytes, numbers compare
 *   by value as MongoDB does for _id), so "is this the event of the token" is a byte compare;
 * - the parser never reads past the decoded buffer and bounds its recursion, so any string a
 *   client sends is either accepted or refused with a server-style error code.
 */
#include "cstoken.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* KeyString type bytes (MongoDB key_string.cpp CType values). */
enum {
    KS_MINKEY = 10,
    KS_UNDEFINED = 15,
    KS_NULL = 20,
    KS_NAN = 30,
    KS_NEG_LARGE = 31, /* private: non-integral negative doubles, decimals, INT64_MIN */
    KS_NEG_8BYTE = 32,
    KS_NEG_1BYTE = 39,
    KS_ZERO = 41,
    KS_POS_1BYTE = 43,
    KS_POS_8BYTE = 50,
    KS_POS_LARGE = 51, /* private: non-integral positive doubles and decimals */
    KS_STRING = 60,
    KS_OBJECT = 70,
    KS_ARRAY = 80,
    KS_BINDATA = 90,
    KS_OID = 100,
    KS_FALSE = 110,
    KS_TRUE = 111,
    KS_DATE = 120,
    KS_TIMESTAMP = 130,
    KS_REGEX = 140,
    KS_DBREF = 150,
    KS_CODE = 160,
    KS_CODEWSCOPE = 170,
    KS_MAXKEY = 240,
    KS_END = 4,
};

/* Sub-markers after KS_NEG_LARGE / KS_POS_LARGE. */
enum { LARGE_DOUBLE = 1, LARGE_DECIMAL = 2, LARGE_INT64_MIN = 3 };

#define KS_MAX_DEPTH 200

/* Codes a real server uses for malformed tokens (resume_token.cpp). */
#define CODE_KEYSTRING_FORMAT 50811

static int token_error(mc_error_t *err, int code, const char *msg)
{
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, code, "%s", msg);
}

void emu_kbuf_init(emu_kbuf_t *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void emu_kbuf_destroy(emu_kbuf_t *b)
{
    free(b->data);
    emu_kbuf_init(b);
}

static void kbuf_reserve(emu_kbuf_t *b, size_t more)
{
    if (b->len + more <= b->cap) {
        return;
    }
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + more) {
        cap *= 2;
    }
    uint8_t *d = realloc(b->data, cap);
    if (!d) {
        abort(); /* out of memory: the emulator cannot continue meaningfully */
    }
    b->data = d;
    b->cap = cap;
}

static void kbuf_put(emu_kbuf_t *b, const void *p, size_t n)
{
    kbuf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void kbuf_byte(emu_kbuf_t *b, uint8_t c)
{
    kbuf_reserve(b, 1);
    b->data[b->len++] = c;
}

static void kbuf_be32(emu_kbuf_t *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    kbuf_put(b, x, 4);
}

static void kbuf_be64(emu_kbuf_t *b, uint64_t v)
{
    kbuf_be32(b, (uint32_t)(v >> 32));
    kbuf_be32(b, (uint32_t)v);
}

/* Strings: NUL bytes are escaped as 00 FF and the string ends with a lone 00, which keeps
 * bytewise order equal to string order. */
static void put_string(emu_kbuf_t *b, const char *s, size_t len)
{
    kbuf_reserve(b, len + 1);
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '\0') {
            kbuf_byte(b, 0);
            kbuf_byte(b, 0xFF);
        } else {
            kbuf_byte(b, (uint8_t)s[i]);
        }
    }
    kbuf_byte(b, 0);
}

/* Integers: type byte by magnitude length, then (magnitude << 1) big-endian in that many bytes
 * (inverted for negatives), exactly as KeyString does for integral values. */
static void put_integer(emu_kbuf_t *b, int64_t v)
{
    if (v == 0) {
        kbuf_byte(b, KS_ZERO);
        return;
    }
    if (v == INT64_MIN) {
        kbuf_byte(b, KS_NEG_LARGE);
        kbuf_byte(b, LARGE_INT64_MIN);
        kbuf_be64(b, 0);
        return;
    }
    bool neg = v < 0;
    uint64_t m = (uint64_t)(neg ? -v : v) << 1;
    int n = 1;
    while (n < 8 && (m >> (8 * n)) != 0) {
        n++;
    }
    kbuf_byte(b, (uint8_t)(neg ? KS_NEG_1BYTE + 1 - n : KS_POS_1BYTE - 1 + n));
    for (int i = n - 1; i >= 0; i--) {
        uint8_t c = (uint8_t)(m >> (8 * i));
        kbuf_byte(b, neg ? (uint8_t)~c : c);
    }
}

static void put_double(emu_kbuf_t *b, double d)
{
    if (isnan(d)) {
        kbuf_byte(b, KS_NAN);
        return;
    }
    /* Integral doubles encode like the equal integer: _id 1.0 and _id 1 are the same key. */
    if (d >= -9.2233720368547758e18 && d < 9.2233720368547758e18 && d == floor(d)) {
        put_integer(b, (int64_t)d);
        return;
    }
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    if (d < 0) {
        kbuf_byte(b, KS_NEG_LARGE);
        kbuf_byte(b, LARGE_DOUBLE);
        kbuf_be64(b, ~bits);
    } else {
        kbuf_byte(b, KS_POS_LARGE);
        kbuf_byte(b, LARGE_DOUBLE);
        kbuf_be64(b, bits);
    }
}

static int put_object_body(emu_kbuf_t *b, const uint8_t *data, uint32_t len, int depth,
                           mc_error_t *err);

static int put_array_body(emu_kbuf_t *b, const uint8_t *data, uint32_t len, int depth,
                          mc_error_t *err)
{
    bson_iter_t it;
    if (!bson_iter_init_from_data(&it, data, len)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 10334, "invalid BSON array");
    }
    while (bson_iter_next(&it)) {
        int rc = emu_keystring_append_value(b, &it, depth + 1, err);
        if (rc != 0) {
            return rc;
        }
    }
    kbuf_byte(b, 0);
    return 0;
}

int emu_keystring_append_value(emu_kbuf_t *b, const bson_iter_t *it, int depth, mc_error_t *err)
{
    if (depth > KS_MAX_DEPTH) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 15, "documentKey nested too deeply");
    }
    uint32_t len = 0;
    const uint8_t *data = NULL;
    switch (bson_iter_type(it)) {
    case BSON_TYPE_MINKEY: kbuf_byte(b, KS_MINKEY); return 0;
    case BSON_TYPE_MAXKEY: kbuf_byte(b, KS_MAXKEY); return 0;
    case BSON_TYPE_UNDEFINED: kbuf_byte(b, KS_UNDEFINED); return 0;
    case BSON_TYPE_NULL: kbuf_byte(b, KS_NULL); return 0;
    case BSON_TYPE_INT32: put_integer(b, bson_iter_int32(it)); return 0;
    case BSON_TYPE_INT64: put_integer(b, bson_iter_int64(it)); return 0;
    case BSON_TYPE_DOUBLE: put_double(b, bson_iter_double(it)); return 0;
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        bson_iter_decimal128(it, &dec);
        kbuf_byte(b, KS_POS_LARGE);
        kbuf_byte(b, LARGE_DECIMAL);
        kbuf_be64(b, dec.high);
        kbuf_be64(b, dec.low);
        return 0;
    }
    case BSON_TYPE_UTF8: {
        const char *s = bson_iter_utf8(it, &len);
        kbuf_byte(b, KS_STRING);
        put_string(b, s, len);
        return 0;
    }
    case BSON_TYPE_SYMBOL: {
        const char *s = bson_iter_symbol(it, &len);
        kbuf_byte(b, KS_STRING);
        put_string(b, s, len);
        return 0;
    }
    case BSON_TYPE_DOCUMENT:
        bson_iter_document(it, &len, &data);
        kbuf_byte(b, KS_OBJECT);
        return put_object_body(b, data, len, depth, err);
    case BSON_TYPE_ARRAY:
        bson_iter_array(it, &len, &data);
        kbuf_byte(b, KS_ARRAY);
        return put_array_body(b, data, len, depth, err);
    case BSON_TYPE_BINARY: {
        bson_subtype_t sub;
        bson_iter_binary(it, &sub, &len, &data);
        kbuf_byte(b, KS_BINDATA);
        if (len < 0xFF) {
            kbuf_byte(b, (uint8_t)len);
        } else {
            kbuf_byte(b, 0xFF);
            kbuf_be32(b, len);
        }
        kbuf_byte(b, (uint8_t)sub);
        kbuf_put(b, data, len);
        return 0;
    }
    case BSON_TYPE_OID:
        kbuf_byte(b, KS_OID);
        kbuf_put(b, bson_iter_oid(it)->bytes, 12);
        return 0;
    case BSON_TYPE_BOOL: kbuf_byte(b, bson_iter_bool(it) ? KS_TRUE : KS_FALSE); return 0;
    case BSON_TYPE_DATE_TIME:
        kbuf_byte(b, KS_DATE);
        kbuf_be64(b, (uint64_t)bson_iter_date_time(it) ^ (UINT64_C(1) << 63));
        return 0;
    case BSON_TYPE_TIMESTAMP: {
        uint32_t t, i;
        bson_iter_timestamp(it, &t, &i);
        kbuf_byte(b, KS_TIMESTAMP);
        kbuf_be32(b, t);
        kbuf_be32(b, i);
        return 0;
    }
    case BSON_TYPE_REGEX: {
        const char *opts = NULL;
        const char *pat = bson_iter_regex(it, &opts);
        kbuf_byte(b, KS_REGEX);
        kbuf_put(b, pat, strlen(pat) + 1);
        kbuf_put(b, opts, strlen(opts) + 1);
        return 0;
    }
    case BSON_TYPE_DBPOINTER: {
        const char *coll = NULL;
        const bson_oid_t *oid = NULL;
        bson_iter_dbpointer(it, &len, &coll, &oid);
        kbuf_byte(b, KS_DBREF);
        kbuf_be32(b, len);
        kbuf_put(b, coll, len);
        kbuf_put(b, oid->bytes, 12);
        return 0;
    }
    case BSON_TYPE_CODE: {
        const char *s = bson_iter_code(it, &len);
        kbuf_byte(b, KS_CODE);
        put_string(b, s, len);
        return 0;
    }
    case BSON_TYPE_CODEWSCOPE: {
        uint32_t scope_len = 0;
        const uint8_t *scope = NULL;
        const char *s = bson_iter_codewscope(it, &len, &scope_len, &scope);
        kbuf_byte(b, KS_CODEWSCOPE);
        put_string(b, s, len);
        return put_object_body(b, scope, scope_len, depth, err);
    }
    case BSON_TYPE_EOD:
    default:
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 2, "unsupported BSON type %d",
                            (int)bson_iter_type(it));
    }
}

/* Object elements are: type byte, field name (C string), then the value with its own type
 * byte; a 00 ends the object. */
static int put_object_body(emu_kbuf_t *b, const uint8_t *data, uint32_t len, int depth,
                           mc_error_t *err)
{
    bson_iter_t it;
    if (!bson_iter_init_from_data(&it, data, len)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 10334, "invalid BSON document");
    }
    while (bson_iter_next(&it)) {
        size_t mark = b->len;
        int rc = emu_keystring_append_value(b, &it, depth + 1, err);
        if (rc != 0) {
            return rc;
        }
        /* Move the value's type byte in front of the name: type, name, type, payload. */
        uint8_t type = b->data[mark];
        const char *key = bson_iter_key(&it);
        size_t klen = strlen(key) + 1;
        kbuf_reserve(b, klen + 1);
        memmove(b->data + mark + 1 + klen, b->data + mark, b->len - mark);
        b->data[mark] = type;
        memcpy(b->data + mark + 1, key, klen);
        b->len += klen + 1;
    }
    kbuf_byte(b, 0);
    return 0;
}

static void put_header(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i, int version, int type,
                       uint32_t txn_op_index)
{
    kbuf_byte(out, KS_TIMESTAMP);
    kbuf_be32(out, ts_t);
    kbuf_be32(out, ts_i);
    put_integer(out, version);
    put_integer(out, type);
    put_integer(out, txn_op_index);
}

static void put_uuid(emu_kbuf_t *out, const uint8_t *uuid)
{
    kbuf_byte(out, KS_BINDATA);
    kbuf_byte(out, 16);
    kbuf_byte(out, BSON_SUBTYPE_UUID);
    kbuf_put(out, uuid, 16);
}

int emu_cstoken_encode_txn_event(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i,
                                 uint32_t txn_op_index, bool from_invalidate, const uint8_t *uuid,
                                 const bson_t *document_key, mc_error_t *err)
{
    out->len = 0;
    put_header(out, ts_t, ts_i, 1, EMU_CSTOKEN_EVENT, txn_op_index);
    kbuf_byte(out, from_invalidate ? KS_TRUE : KS_FALSE);
    if (uuid) {
        put_uuid(out, uuid);
    }
    if (document_key) {
        kbuf_byte(out, KS_OBJECT);
        int rc = put_object_body(out, bson_get_data(document_key), document_key->len, 0, err);
        if (rc != 0) {
            return rc;
        }
    }
    kbuf_byte(out, KS_END);
    return 0;
}

int emu_cstoken_encode_event(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i, bool from_invalidate,
                             const uint8_t *uuid, const bson_t *document_key, mc_error_t *err)
{
    return emu_cstoken_encode_txn_event(out, ts_t, ts_i, 0, from_invalidate, uuid, document_key,
                                        err);
}

int emu_cstoken_encode_fragment(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i,
                                uint32_t txn_op_index, const uint8_t *uuid, const char *op_type,
                                const bson_t *document_key, const bson_t *op_description,
                                uint32_t fragment_num, mc_error_t *err)
{
    out->len = 0;
    put_header(out, ts_t, ts_i, 2, EMU_CSTOKEN_EVENT, txn_op_index);
    kbuf_byte(out, KS_FALSE);
    if (uuid) {
        put_uuid(out, uuid);
    } else {
        kbuf_byte(out, KS_NULL);
    }
    /* The eventIdentifier is an object, encoded like any key: build it, then encode it. */
    bson_t ident = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&ident, "operationType", op_type ? op_type : "");
    if (document_key) {
        BSON_APPEND_DOCUMENT(&ident, "documentKey", document_key);
    } else {
        bson_t empty = BSON_INITIALIZER;
        BSON_APPEND_DOCUMENT(&ident, "operationDescription",
                             op_description ? op_description : &empty);
        bson_destroy(&empty);
    }
    kbuf_byte(out, KS_OBJECT);
    int rc = put_object_body(out, bson_get_data(&ident), ident.len, 0, err);
    bson_destroy(&ident);
    if (rc != 0) {
        return rc;
    }
    put_integer(out, fragment_num);
    kbuf_byte(out, KS_END);
    return 0;
}

void emu_cstoken_encode_hwm(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i)
{
    out->len = 0;
    put_header(out, ts_t, ts_i, 1, EMU_CSTOKEN_HWM, 0);
    kbuf_byte(out, KS_FALSE);
    kbuf_byte(out, KS_END);
}

void emu_cstoken_hex(const uint8_t *bytes, size_t len, char *hex)
{
    static const char digits[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        hex[2 * i] = digits[bytes[i] >> 4];
        hex[2 * i + 1] = digits[bytes[i] & 15];
    }
    hex[2 * len] = '\0';
}

bool emu_cstoken_append(bson_t *parent, const char *key, const uint8_t *bytes, size_t len)
{
    char stackbuf[256];
    char *hex = 2 * len + 1 <= sizeof stackbuf ? stackbuf : malloc(2 * len + 1);
    if (!hex) {
        return false;
    }
    emu_cstoken_hex(bytes, len, hex);
    bson_t child;
    bool ok = bson_append_document_begin(parent, key, -1, &child) &&
              bson_append_utf8(&child, "_data", 5, hex, (int)(2 * len)) &&
              bson_append_document_end(parent, &child);
    if (hex != stackbuf) {
        free(hex);
    }
    return ok;
}

int emu_cstoken_compare(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len)
{
    size_t n = a_len < b_len ? a_len : b_len;
    int c = n ? memcmp(a, b, n) : 0;
    if (c != 0) {
        return c < 0 ? -1 : 1;
    }
    return a_len < b_len ? -1 : (a_len > b_len ? 1 : 0);
}

/* ---- parsing ---- */

typedef struct ks_reader {
    const uint8_t *p;
    size_t len;
    size_t pos;
} ks_reader_t;

static bool rd_need(const ks_reader_t *r, size_t n)
{
    return r->len - r->pos >= n;
}

/* Skips a NUL-terminated string with 00 FF escapes. */
static bool skip_string(ks_reader_t *r)
{
    while (r->pos < r->len) {
        uint8_t c = r->p[r->pos++];
        if (c == 0) {
            if (r->pos < r->len && r->p[r->pos] == 0xFF) {
                r->pos++;
                continue;
            }
            return true;
        }
    }
    return false;
}

static bool skip_cstring(ks_reader_t *r)
{
    while (r->pos < r->len) {
        if (r->p[r->pos++] == 0) {
            return true;
        }
    }
    return false;
}

static bool skip_payload(ks_reader_t *r, uint8_t type, int depth);

static bool skip_object_body(ks_reader_t *r, int depth)
{
    if (depth > KS_MAX_DEPTH) {
        return false;
    }
    for (;;) {
        if (!rd_need(r, 1)) {
            return false;
        }
        uint8_t t = r->p[r->pos++];
        if (t == 0) {
            return true;
        }
        if (!skip_cstring(r) || !rd_need(r, 1) || r->p[r->pos] != t) {
            return false;
        }
        r->pos++;
        if (!skip_payload(r, t, depth + 1)) {
            return false;
        }
    }
}

static bool skip_payload(ks_reader_t *r, uint8_t type, int depth)
{
    if (depth > KS_MAX_DEPTH) {
        return false;
    }
    switch (type) {
    case KS_MINKEY:
    case KS_MAXKEY:
    case KS_UNDEFINED:
    case KS_NULL:
    case KS_NAN:
    case KS_ZERO:
    case KS_TRUE:
    case KS_FALSE: return true;
    case KS_NEG_LARGE:
    case KS_POS_LARGE: {
        if (!rd_need(r, 1)) {
            return false;
        }
        uint8_t m = r->p[r->pos++];
        size_t n = m == LARGE_DECIMAL ? 16 : (m == LARGE_DOUBLE || m == LARGE_INT64_MIN ? 8 : 0);
        if (n == 0 || !rd_need(r, n)) {
            return false;
        }
        r->pos += n;
        return true;
    }
    case KS_STRING:
    case KS_CODE: return skip_string(r);
    case KS_OBJECT: return skip_object_body(r, depth);
    case KS_ARRAY:
        for (;;) {
            if (!rd_need(r, 1)) {
                return false;
            }
            uint8_t t = r->p[r->pos++];
            if (t == 0) {
                return true;
            }
            if (!skip_payload(r, t, depth + 1)) {
                return false;
            }
        }
    case KS_BINDATA: {
        if (!rd_need(r, 1)) {
            return false;
        }
        size_t n = r->p[r->pos++];
        if (n == 0xFF) {
            if (!rd_need(r, 4)) {
                return false;
            }
            n = ((size_t)r->p[r->pos] << 24) | ((size_t)r->p[r->pos + 1] << 16) |
                ((size_t)r->p[r->pos + 2] << 8) | r->p[r->pos + 3];
            r->pos += 4;
        }
        if (!rd_need(r, 1) || !rd_need(r, 1 + n)) {
            return false;
        }
        r->pos += 1 + n;
        return true;
    }
    case KS_OID:
        if (!rd_need(r, 12)) {
            return false;
        }
        r->pos += 12;
        return true;
    case KS_DATE:
    case KS_TIMESTAMP:
        if (!rd_need(r, 8)) {
            return false;
        }
        r->pos += 8;
        return true;
    case KS_REGEX: return skip_cstring(r) && skip_cstring(r);
    case KS_DBREF: {
        if (!rd_need(r, 4)) {
            return false;
        }
        size_t n = ((size_t)r->p[r->pos] << 24) | ((size_t)r->p[r->pos + 1] << 16) |
                   ((size_t)r->p[r->pos + 2] << 8) | r->p[r->pos + 3];
        r->pos += 4;
        if (!rd_need(r, n) || !rd_need(r, n + 12)) {
            return false;
        }
        r->pos += n + 12;
        return true;
    }
    case KS_CODEWSCOPE: return skip_string(r) && skip_object_body(r, depth);
    default:
        if (type >= KS_NEG_8BYTE && type <= KS_NEG_1BYTE) {
            size_t n = (size_t)(KS_NEG_1BYTE + 1 - type);
            if (!rd_need(r, n)) {
                return false;
            }
            r->pos += n;
            return true;
        }
        if (type >= KS_POS_1BYTE && type <= KS_POS_8BYTE) {
            size_t n = (size_t)(type - KS_POS_1BYTE + 1);
            if (!rd_need(r, n)) {
                return false;
            }
            r->pos += n;
            return true;
        }
        return false;
    }
}

/* Reads one element that must be an integer; sets *is_int false when the element is another
 * (valid) type, returns false on a format error. */
static bool read_integer(ks_reader_t *r, int64_t *out, bool *is_int)
{
    if (!rd_need(r, 1)) {
        return false;
    }
    uint8_t type = r->p[r->pos];
    *is_int = true;
    if (type == KS_ZERO) {
        r->pos++;
        *out = 0;
        return true;
    }
    bool pos_int = type >= KS_POS_1BYTE && type <= KS_POS_8BYTE;
    bool neg_int = type >= KS_NEG_8BYTE && type <= KS_NEG_1BYTE;
    if (!pos_int && !neg_int) {
        *is_int = false;
        r->pos++;
        return skip_payload(r, type, 0);
    }
    size_t n = pos_int ? (size_t)(type - KS_POS_1BYTE + 1) : (size_t)(KS_NEG_1BYTE + 1 - type);
    r->pos++;
    if (!rd_need(r, n)) {
        return false;
    }
    uint64_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = r->p[r->pos++];
        c = neg_int ? (uint8_t)~c : c;
        if (i == 0 && c == 0) {
            return false; /* not the shortest encoding: only canonical tokens are accepted */
        }
        m = (m << 8) | c;
    }
    if (m & 1) {
        *is_int = false; /* a fractional part would follow: not an integer */
        return false;
    }
    m >>= 1;
    *out = neg_int ? -(int64_t)m : (int64_t)m;
    return true;
}

/* True at the end marker, and past the end of the buffer (a truncated token, which the final
 * "exactly one end byte" check then reports). */
static bool at_end(const ks_reader_t *r)
{
    return !rd_need(r, 1) || r->p[r->pos] == KS_END;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

void emu_cstoken_cleanup(emu_cstoken_t *tok)
{
    if (tok) {
        free(tok->raw);
        tok->raw = NULL;
        tok->raw_len = 0;
        tok->event_id = NULL;
        tok->event_id_len = 0;
    }
}

static int parse_fail(emu_cstoken_t *out, mc_error_t *err, int code, const char *msg)
{
    emu_cstoken_cleanup(out);
    return token_error(err, code, msg);
}

int emu_cstoken_parse(const bson_t *token, emu_cstoken_t *out, mc_error_t *err)
{
    memset(out, 0, sizeof *out);
    bson_iter_t it;
    char *json = NULL;
    if (!bson_iter_init_find(&it, token, "_data") || !BSON_ITER_HOLDS_UTF8(&it)) {
        json = bson_as_relaxed_extended_json(token, NULL);
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 40647,
                     "Bad resume token: _data of missing or of wrong type. Expected string, got "
                     "%.400s",
                     json ? json : "?");
        bson_free(json);
        return MC_EINVAL;
    }
    bson_iter_t tb;
    if (bson_iter_init_find(&tb, token, "_typeBits")) {
        bson_subtype_t sub = BSON_SUBTYPE_BINARY;
        if (BSON_ITER_HOLDS_BINARY(&tb)) {
            bson_iter_binary(&tb, &sub, NULL, NULL);
        }
        if (!BSON_ITER_HOLDS_BINARY(&tb) || sub != BSON_SUBTYPE_BINARY) {
            return token_error(err, 40648, "Bad resume token: _typeBits of wrong type");
        }
    }
    uint32_t hex_len = 0;
    const char *hex = bson_iter_utf8(&it, &hex_len);
    if (hex_len % 2 != 0) {
        return token_error(err, 9, "resume token string was not a valid hex string");
    }
    for (uint32_t i = 0; i < hex_len; i++) {
        if (hexval(hex[i]) < 0) {
            return token_error(err, 9, "resume token string was not a valid hex string");
        }
    }
    if (hex_len == 0) {
        return token_error(err, 40649, "invalid empty resume token");
    }
    if (hex_len / 2 > EMU_CSTOKEN_MAX_BYTES) {
        return token_error(err, 40646, "invalid oversized resume token");
    }
    out->raw_len = hex_len / 2;
    out->raw = malloc(out->raw_len);
    if (!out->raw) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "out of memory");
    }
    for (size_t i = 0; i < out->raw_len; i++) {
        out->raw[i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
    }

    ks_reader_t r = {out->raw, out->raw_len, 0};
    if (out->raw[out->raw_len - 1] != KS_END && out->raw_len > 1) {
        return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                          "KeyString format error: the resume token does not end with 04");
    }
    if (at_end(&r)) {
        return parse_fail(out, err, 40649, "invalid empty resume token");
    }
    if (r.p[0] != KS_TIMESTAMP || !rd_need(&r, 9)) {
        return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                          "Invalid resume token: clusterTime is not a Timestamp");
    }
    out->ts_t = (uint32_t)r.p[1] << 24 | (uint32_t)r.p[2] << 16 | (uint32_t)r.p[3] << 8 | r.p[4];
    out->ts_i = (uint32_t)r.p[5] << 24 | (uint32_t)r.p[6] << 16 | (uint32_t)r.p[7] << 8 | r.p[8];
    r.pos = 9;

    int64_t v = 0;
    bool is_int = false;
    if (at_end(&r)) {
        return parse_fail(out, err, 50796, "Resume Token does not contain version");
    }
    if (!read_integer(&r, &v, &is_int)) {
        return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                          "KeyString format error in resume token");
    }
    if (!is_int) {
        return parse_fail(out, err, 50854, "Invalid resume token: wrong type for version");
    }
    if (v < 0 || v > 2) {
        return parse_fail(out, err, 50795,
                          "Invalid Resume Token: only supports version 0, 1 and 2");
    }
    out->version = (int)v;

    out->type = EMU_CSTOKEN_EVENT;
    if (out->version >= 1) {
        if (at_end(&r)) {
            return parse_fail(out, err, 51055, "Resume Token does not contain tokenType");
        }
        if (!read_integer(&r, &v, &is_int)) {
            return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                              "KeyString format error in resume token");
        }
        if (!is_int) {
            return parse_fail(out, err, 51056, "Resume Token tokenType is not an int.");
        }
        if (v != EMU_CSTOKEN_EVENT && v != EMU_CSTOKEN_HWM) {
            mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 51057, "Token type %lld not recognized",
                         (long long)v);
            emu_cstoken_cleanup(out);
            return MC_EINVAL;
        }
        out->type = (int)v;
    }

    if (at_end(&r)) {
        return parse_fail(out, err, 50793, "Resume Token does not contain txnOpIndex");
    }
    if (!read_integer(&r, &v, &is_int)) {
        return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                          "KeyString format error in resume token");
    }
    if (!is_int || v > INT32_MAX) {
        return parse_fail(out, err, 50855, "Resume Token txnOpIndex is not an integer");
    }
    if (v < 0) {
        return parse_fail(out, err, 50794,
                          "Invalid Resume Token: txnOpIndex should be non-negative");
    }
    out->txn_op_index = (uint32_t)v;

    if (out->version >= 1) {
        if (at_end(&r)) {
            return parse_fail(out, err, 50872, "Resume Token does not contain fromInvalidate");
        }
        uint8_t t = r.p[r.pos++];
        if (t != KS_TRUE && t != KS_FALSE) {
            if (!skip_payload(&r, t, 0)) {
                return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                                  "KeyString format error in resume token");
            }
            return parse_fail(out, err, 50870, "Resume Token fromInvalidate is not a boolean.");
        }
        out->from_invalidate = t == KS_TRUE;
        out->from_invalidate_offset = r.pos - 1;
    }

    if (!at_end(&r)) {
        /* UUID (v2 may carry an explicit null instead). */
        uint8_t t = r.p[r.pos];
        if (t == KS_NULL && out->version >= 2) {
            r.pos++;
        } else if (t == KS_BINDATA && rd_need(&r, 3 + 16) && r.p[r.pos + 1] == 16 &&
                   r.p[r.pos + 2] == BSON_SUBTYPE_UUID) {
            memcpy(out->uuid, r.p + r.pos + 3, 16);
            out->has_uuid = true;
            r.pos += 3 + 16;
        } else {
            r.pos++;
            if (!skip_payload(&r, t, 0)) {
                return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                                  "KeyString format error in resume token");
            }
            return parse_fail(out, err, 207,
                              "Invalid resume token: the collection UUID is not a UUID");
        }
        if (!at_end(&r)) {
            if (out->type == EMU_CSTOKEN_HWM) {
                return parse_fail(out, err, 6189504, "Invalid high water mark token");
            }
            size_t start = r.pos;
            uint8_t et = r.p[r.pos++];
            if (!skip_payload(&r, et, 0)) {
                return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                                  "KeyString format error in resume token");
            }
            if (et != KS_OBJECT) {
                return parse_fail(out, err, 6189503,
                                  "Resume Token eventIdentifier is not an object");
            }
            out->event_id = out->raw + start;
            out->event_id_len = r.pos - start;
            if (out->version >= 2 && !at_end(&r)) {
                bool frag_int = false;
                size_t frag_at = r.pos;
                if (!read_integer(&r, &v, &frag_int) || !frag_int || v < 0 || v > INT32_MAX) {
                    return parse_fail(out, err, 7182501,
                                      "Resume token 'fragmentNum' must be a non-negative integer.");
                }
                out->has_fragment = true;
                out->fragment_num = (uint32_t)v;
                out->fragment_offset = frag_at;
            }
        }
    }
    if (!at_end(&r)) {
        size_t before = r.pos;
        uint8_t t = r.p[r.pos++];
        if (!skip_payload(&r, t, 0) || before == r.pos) {
            return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                              "KeyString format error in resume token");
        }
        return parse_fail(out, err, 40646, "invalid oversized resume token");
    }
    if (r.pos + 1 != r.len) {
        return parse_fail(out, err, CODE_KEYSTRING_FORMAT,
                          "KeyString format error: unexpected bytes after the end of the token");
    }
    if (out->type == EMU_CSTOKEN_HWM && (out->txn_op_index > 0 || out->from_invalidate)) {
        return parse_fail(out, err, 6189504, "Invalid high water mark token");
    }
    if (out->version <= 1 && !out->has_uuid && out->event_id) {
        return parse_fail(out, err, 50788,
                          "Unexpected resume token with a eventIdentifier but no UUID");
    }
    return 0;
}
