/*
 * redis_stream_id.c: the event position -> Redis stream entry ID map (redis_stream_id.h has
 * the map and what it means for transactions and split events), the reading of a resume
 * token's position fields, and the text form of IDs.
 *
 * Pure functions, any thread. The token reader follows MongoDB's KeyString rules for the
 * few types that come first in a resume token (Timestamp, integers, booleans); it reads
 * nothing after fromInvalidate, so the variable-length tail (UUID, documentKey, v2 event
 * identifier) never has to be understood here.
 */
#include "sinks/redis_stream_id.h"

#include "hex.h"

#include <stdio.h>
#include <string.h>

#include <bson/bson.h>

/* KeyString type bytes used at the start of a resume token. */
enum {
    KS_ZERO = 41,
    KS_POS_1BYTE = 43,
    KS_POS_8BYTE = 50,
    KS_FALSE = 110,
    KS_TRUE = 111,
    KS_TIMESTAMP = 130,
};

/* Bytes needed up to fromInvalidate: timestamp (9), three integers of at most 9 bytes, the
 * boolean. */
#define PREFIX_MAX_BYTES (9 + 3 * 9 + 1)

static int bad_token(mc_error_t *err, const char *why)
{
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "resume token: %s", why);
}

typedef struct reader {
    const uint8_t *p;
    size_t len, pos;
} reader_t;

/* A non-negative KeyString integer: KS_ZERO, or a type byte giving the magnitude's length
 * and (value << 1) big-endian; an odd magnitude would mean a fraction follows (a double). */
static bool read_uint(reader_t *r, uint64_t *out)
{
    if (r->pos >= r->len) {
        return false;
    }
    uint8_t type = r->p[r->pos++];
    if (type == KS_ZERO) {
        *out = 0;
        return true;
    }
    if (type < KS_POS_1BYTE || type > KS_POS_8BYTE) {
        return false;
    }
    size_t n = (size_t)(type - KS_POS_1BYTE + 1);
    if (r->len - r->pos < n) {
        return false;
    }
    uint64_t m = 0;
    for (size_t k = 0; k < n; k++) {
        m = m << 8 | r->p[r->pos++];
    }
    if (m & 1) {
        return false;
    }
    *out = m >> 1;
    return true;
}

int mc__token_position_parse(const char *hex, size_t len, mc__token_position_t *out,
                             mc_error_t *err)
{
    uint8_t bytes[PREFIX_MAX_BYTES];
    if (!hex || len % 2 != 0) {
        return bad_token(err, "not an even number of hex digits");
    }
    size_t n = len / 2 < sizeof bytes ? len / 2 : sizeof bytes;
    for (size_t k = 0; k < n; k++) {
        int hi = mc__hex_value(hex[2 * k]), lo = mc__hex_value(hex[2 * k + 1]);
        if (hi < 0 || lo < 0) {
            return bad_token(err, "not a hex string");
        }
        bytes[k] = (uint8_t)(hi << 4 | lo);
    }
    reader_t r = {bytes, n, 0};
    if (n < 9 || bytes[0] != KS_TIMESTAMP) {
        return bad_token(err, "does not start with a cluster time");
    }
    memset(out, 0, sizeof *out);
    out->t =
        (uint32_t)bytes[1] << 24 | (uint32_t)bytes[2] << 16 | (uint32_t)bytes[3] << 8 | bytes[4];
    out->i =
        (uint32_t)bytes[5] << 24 | (uint32_t)bytes[6] << 16 | (uint32_t)bytes[7] << 8 | bytes[8];
    r.pos = 9;
    uint64_t version = 0, type = 0, txn = 0;
    if (!read_uint(&r, &version) || (version != 1 && version != 2)) {
        return bad_token(err, "only versions 1 and 2 are understood");
    }
    if (!read_uint(&r, &type) || (type != 128 && type != 0)) {
        return bad_token(err, "bad token type");
    }
    if (!read_uint(&r, &txn) || txn > UINT32_MAX) {
        return bad_token(err, "bad txnOpIndex");
    }
    if (r.pos >= r.len || (r.p[r.pos] != KS_FALSE && r.p[r.pos] != KS_TRUE)) {
        return bad_token(err, "bad fromInvalidate");
    }
    out->version = (int)version;
    out->token_type = (int)type;
    out->txn_op_index = (uint32_t)txn;
    out->from_invalidate = r.p[r.pos] == KS_TRUE;
    return 0;
}

int mc__redis_stream_id_make(const mc__token_position_t *pos, uint32_t fragment,
                             mc__redis_stream_id_t *out, mc_error_t *err)
{
    if (pos->token_type != 128) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "a high-water-mark token is not the position of an event");
    }
    if (pos->txn_op_index > MC__REDIS_ID_MAX_TXN_OP_INDEX) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                            "txnOpIndex %u is past %u: no stream entry ID for this event",
                            pos->txn_op_index, MC__REDIS_ID_MAX_TXN_OP_INDEX);
    }
    if (fragment > MC__REDIS_ID_MAX_FRAGMENT) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                            "fragment %u is past %u: no stream entry ID for this event", fragment,
                            MC__REDIS_ID_MAX_FRAGMENT);
    }
    out->ms = (uint64_t)pos->t * 1000u;
    out->seq = (uint64_t)pos->i << 32 | (uint64_t)pos->txn_op_index << 9 | (uint64_t)fragment << 1 |
               (pos->from_invalidate ? 1u : 0u);
    return 0;
}

/* splitEvent.fragment of a change, 0 when it was not split. */
static int fragment_of(const bson_t *change, uint32_t *fragment, mc_error_t *err)
{
    bson_iter_t it, sub;
    *fragment = 0;
    if (!change || !bson_iter_init_find(&it, change, "splitEvent")) {
        return 0;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &sub) ||
        !bson_iter_find(&sub, "fragment") || !BSON_ITER_HOLDS_NUMBER(&sub)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "splitEvent without a numeric fragment");
    }
    int64_t f = bson_iter_as_int64(&sub);
    if (f < 1 || f > MC__REDIS_ID_MAX_FRAGMENT) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                            "splitEvent.fragment %lld is out of 1..%u", (long long)f,
                            MC__REDIS_ID_MAX_FRAGMENT);
    }
    *fragment = (uint32_t)f;
    return 0;
}

int mc__redis_stream_id_from_event(const mc_event_t *ev, mc__redis_stream_id_t *out,
                                   mc_error_t *err)
{
    const char *id = mc_event_id(ev);
    if (!id) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "a %s event has no position", mc_event_kind_name(mc_event_kind(ev)));
    }
    mc__token_position_t pos;
    int rc = mc__token_position_parse(id, strlen(id), &pos, err);
    if (rc != 0) {
        return rc;
    }
    uint32_t fragment = 0;
    rc = fragment_of(mc_event_change(ev), &fragment, err);
    if (rc != 0) {
        return rc;
    }
    return mc__redis_stream_id_make(&pos, fragment, out, err);
}

size_t mc__redis_stream_id_format(const mc__redis_stream_id_t *id, char *buf)
{
    int n = snprintf(buf, MC__REDIS_ID_BUF, "%llu-%llu", (unsigned long long)id->ms,
                     (unsigned long long)id->seq);
    return n > 0 ? (size_t)n : 0;
}

static bool parse_u64(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 20) {
        return false;
    }
    uint64_t v = 0;
    for (size_t k = 0; k < len; k++) {
        if (s[k] < '0' || s[k] > '9') {
            return false;
        }
        uint64_t d = (uint64_t)(s[k] - '0');
        if (v > (UINT64_MAX - d) / 10) {
            return false;
        }
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

int mc__redis_stream_id_parse(const char *s, size_t len, mc__redis_stream_id_t *out)
{
    const char *dash = s ? memchr(s, '-', len) : NULL;
    mc__redis_stream_id_t id = {0, 0};
    bool ok = dash ? parse_u64(s, (size_t)(dash - s), &id.ms) &&
                         parse_u64(dash + 1, len - (size_t)(dash - s) - 1, &id.seq)
                   : s && parse_u64(s, len, &id.ms);
    if (!ok) {
        return MC_EINVAL;
    }
    *out = id;
    return 0;
}

int mc__redis_stream_id_compare(const mc__redis_stream_id_t *a, const mc__redis_stream_id_t *b)
{
    if (a->ms != b->ms) {
        return a->ms < b->ms ? -1 : 1;
    }
    if (a->seq != b->seq) {
        return a->seq < b->seq ? -1 : 1;
    }
    return 0;
}
