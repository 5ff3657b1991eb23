/*
 * cstoken.h: change-stream resume tokens ({_data: "<uppercase hex>"}) for mongo-emulator.
 *
 * The bytes follow MongoDB's v1 KeyString layout for resume tokens (resume_token.cpp):
 * Timestamp clusterTime, int version (1), int tokenType (128 event, 0 high-water mark),
 * int txnOpIndex, bool fromInvalidate, [BinData(4) collection UUID], [eventIdentifier, the
 * documentKey as a KeyString object], end byte 0x04. Integers, strings, objects, ObjectIds,
 * booleans, dates, timestamps and binData use the real KeyString type bytes, so tokens look
 * like a real server's and compare correctly as hex strings (clusterTime first). A few rare
 * value types (non-integral doubles, decimals, int64 minimum) use a private but decodable
 * encoding: drivers treat tokens as opaque.
 *
 * Pure functions, any thread. Parse errors carry the server code a real mongod uses
 * (40647, 9, 40649, 50795, ...) in mc_error_t.cause with domain MC_DOMAIN_MONGODB.
 */
#ifndef MONGO_EMULATOR_CSTOKEN_H
#define MONGO_EMULATOR_CSTOKEN_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#define EMU_CSTOKEN_EVENT 128
#define EMU_CSTOKEN_HWM 0
/* Offset of the fromInvalidate byte in every token this module encodes (txnOpIndex 0). */
#define EMU_CSTOKEN_FROM_INVALIDATE_OFFSET 15
/* Longest token accepted by the parser, in decoded bytes (a token embeds a documentKey, which
 * is bounded by the BSON document size). */
#define EMU_CSTOKEN_MAX_BYTES (16 * 1024 * 1024)

/* A growable byte buffer (data is malloc'd; free with emu_kbuf_destroy). */
typedef struct emu_kbuf {
    uint8_t *data;
    size_t len;
    size_t cap;
} emu_kbuf_t;

void emu_kbuf_init(emu_kbuf_t *b);
void emu_kbuf_destroy(emu_kbuf_t *b);

/* The decoded fields of a token. `raw` (owned) holds the decoded bytes; `event_id` points into
 * it (the KeyString of the eventIdentifier, NULL when the token has none). */
typedef struct emu_cstoken {
    uint32_t ts_t;
    uint32_t ts_i;
    int version;
    int type; /* EMU_CSTOKEN_EVENT or EMU_CSTOKEN_HWM */
    uint32_t txn_op_index;
    bool from_invalidate;
    bool has_uuid;
    uint8_t uuid[16];
    const uint8_t *event_id;
    size_t event_id_len;
    uint8_t *raw;
    size_t raw_len;
    size_t from_invalidate_offset; /* index of the fromInvalidate byte in raw (version >= 1) */
    bool has_fragment;             /* a v2 token of one fragment of a split event */
    uint32_t fragment_num;
    size_t fragment_offset; /* where the fragmentNum starts in raw (has_fragment only) */
} emu_cstoken_t;

/* Encodes an event token. `uuid` may be NULL (dropDatabase); `document_key` may be NULL
 * (drop, rename, dropDatabase). Fails (MC_ELIMIT) only when the key nests deeper than 200. */
int emu_cstoken_encode_event(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i, bool from_invalidate,
                             const uint8_t *uuid, const bson_t *document_key, mc_error_t *err);
/* The same for an event of a committed transaction: `txn_op_index` is the operation's index in
 * the transaction (0 outside one). Tokens of one transaction share the cluster time and sort by
 * this index, as MongoDB's do. */
int emu_cstoken_encode_txn_event(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i,
                                 uint32_t txn_op_index, bool from_invalidate, const uint8_t *uuid,
                                 const bson_t *document_key, mc_error_t *err);
/* A version 2 token for fragment `fragment_num` (0-based) of a split event: MongoDB only allows
 * a fragmentNum in v2 tokens, whose eventIdentifier is {operationType, documentKey} (or
 * {operationType, operationDescription} when `document_key` is NULL; `op_description` may be
 * NULL then) and whose missing UUID is an explicit null. */
int emu_cstoken_encode_fragment(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i,
                                uint32_t txn_op_index, const uint8_t *uuid, const char *op_type,
                                const bson_t *document_key, const bson_t *op_description,
                                uint32_t fragment_num, mc_error_t *err);
/* Encodes a high-water-mark token: events at or after (ts_t, ts_i). */
void emu_cstoken_encode_hwm(emu_kbuf_t *out, uint32_t ts_t, uint32_t ts_i);

/* Appends the KeyString encoding of one BSON value (the iterator's current element). */
int emu_keystring_append_value(emu_kbuf_t *out, const bson_iter_t *it, int depth, mc_error_t *err);

/* Writes 2*len uppercase hex characters plus a NUL into `hex` (capacity >= 2*len+1). */
void emu_cstoken_hex(const uint8_t *bytes, size_t len, char *hex);
/* Appends {_data: "<hex>"} under `key` to `parent`. */
bool emu_cstoken_append(bson_t *parent, const char *key, const uint8_t *bytes, size_t len);

/* Parses and validates a resume token document. On failure returns MC_EINVAL and `err`
 * carries the server code. On success the caller frees with emu_cstoken_cleanup. */
int emu_cstoken_parse(const bson_t *token, emu_cstoken_t *out, mc_error_t *err);
void emu_cstoken_cleanup(emu_cstoken_t *tok);

/* Orders two encoded tokens the way their hex strings sort. */
int emu_cstoken_compare(const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len);

#endif
