/*
 * wire.h: MongoDB wire-protocol framing for mongo-emulator, as pure functions over byte buffers.
 *
 * Nothing here touches a socket or the server state, so the parser can be fuzzed on its own
 * (tests/fuzz/fuzz_wire.c). Any thread. Every length read from the wire is checked against the
 * buffer before it is used, and every BSON document is validated (structure and nesting depth)
 * before it is handed to the command layer, so later code may iterate it freely.
 */
#ifndef MONGO_EMULATOR_WIRE_H
#define MONGO_EMULATOR_WIRE_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#define EMU_OPCODE_REPLY 1
#define EMU_OPCODE_QUERY 2004
#define EMU_OPCODE_COMPRESSED 2012
#define EMU_OPCODE_MSG 2013

#define EMU_MSG_CHECKSUM_PRESENT 0x1u
#define EMU_MSG_MORE_TO_COME 0x2u
#define EMU_MSG_EXHAUST_ALLOWED 0x10000u

#define EMU_WIRE_HEADER_LEN 16
/* Largest message accepted or produced (the hello reply's maxMessageSizeBytes). */
#define EMU_WIRE_MAX_MESSAGE 48000000
/* Largest single document in a request: the 16 MB user limit plus the 16 KB of headroom a
 * server allows for command envelopes (BSONObjMaxInternalSize). */
#define EMU_WIRE_MAX_DOCUMENT (16 * 1024 * 1024 + 16 * 1024)
/* Deepest document nesting accepted in a request; a real server refuses deeper objects too,
 * and it keeps every recursive walk over request documents far from the stack limit. */
#define EMU_WIRE_MAX_DEPTH 180
/* Longest database name kept from a request (MongoDB allows 63 characters). */
#define EMU_WIRE_MAX_DB 128

typedef struct emu_wire_header {
    int32_t length;
    int32_t request_id;
    int32_t response_to;
    int32_t opcode;
} emu_wire_header_t;

typedef struct emu_wire_request {
    emu_wire_header_t header;
    uint32_t flags;           /* OP_MSG flagBits, or OP_QUERY flags */
    bool more_to_come;        /* OP_MSG moreToCome: the client expects no reply */
    bool is_command;          /* OP_QUERY: the namespace was "<db>.$cmd" */
    char db[EMU_WIRE_MAX_DB]; /* OP_MSG: $db; OP_QUERY: the part of the namespace before '.' */
    /* The command. With document sequences, an owned document holding the kind-0 body plus
     * one array per sequence under its identifier; without them, a read-only view of the
     * input buffer (so the request must not outlive the buffer). */
    bson_t body;
    bool body_owned;
} emu_wire_request_t;

/* Reads the 16-byte header at `buf` (len >= 16) and checks that its length lies in
 * [16, EMU_WIRE_MAX_MESSAGE]. Returns 0 or MC_EINVAL (cause 17 ProtocolError). */
int emu_wire_parse_header(const uint8_t *buf, size_t len, emu_wire_header_t *hdr, mc_error_t *err);

/* Parses one complete message (header included; `len` must equal the header's length).
 * Handles OP_QUERY and OP_MSG (kind 0 and kind 1 sections, checksum skipped). On failure
 * returns MC_EINVAL with `cause` the server code to answer with (17 ProtocolError,
 * 22 InvalidBSON, 40571 missing $db, 352 for opcodes the emulator does not speak); `req`
 * then needs no cleanup, but req->header and req->flags are filled when they could be read
 * so that the caller can still answer in the right format. */
int emu_wire_parse(const uint8_t *buf, size_t len, emu_wire_request_t *req, mc_error_t *err);

/* Releases what emu_wire_parse allocated. NULL-safe, idempotent. */
void emu_wire_request_cleanup(emu_wire_request_t *req);

/* True when `doc` is structurally valid BSON nested at most `max_depth` levels deep. */
bool emu_wire_bson_valid(const bson_t *doc, int max_depth);

/* Writes the bytes that precede a reply document: the header, then for OP_MSG the flag bits
 * (0) and the kind-0 byte, for OP_REPLY the flags (AwaitCapable), cursor id 0, startingFrom 0
 * and numberReturned 1. `reply_opcode` is EMU_OPCODE_MSG or EMU_OPCODE_REPLY. `out` needs
 * EMU_WIRE_REPLY_PREFIX_MAX bytes. Returns the number of bytes written, or 0 when the message
 * would exceed EMU_WIRE_MAX_MESSAGE. */
#define EMU_WIRE_REPLY_PREFIX_MAX 36
size_t emu_wire_reply_prefix(uint8_t *out, int32_t reply_opcode, int32_t request_id,
                             int32_t response_to, size_t doc_len);

#endif
