/*
 * fuzz_wire.c: libFuzzer target over mongo-emulator's wire parser (tools/mongo-emulator/wire.c).
 *
 * Single-threaded. Each input is tried twice: as sent (so the length checks see arbitrary
 * headers) and with its length field patched to the input size (so the fuzzer reaches the
 * OP_QUERY / OP_MSG section parsing instead of stopping at framing). Whatever parses must keep
 * the parser's promise: the body is valid BSON at every level, then it is walked in full and
 * rendered as JSON, which would trip ASan on any out-of-bounds view.
 */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

static void walk(const bson_t *doc, int depth)
{
    bson_iter_t it;
    if (depth > EMU_WIRE_MAX_DEPTH || !bson_iter_init(&it, doc)) {
        abort();
    }
    while (bson_iter_next(&it)) {
        if (BSON_ITER_HOLDS_DOCUMENT(&it) || BSON_ITER_HOLDS_ARRAY(&it)) {
            bson_t child;
            const uint8_t *d;
            uint32_t l;
            if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
                bson_iter_document(&it, &l, &d);
            } else {
                bson_iter_array(&it, &l, &d);
            }
            if (!bson_init_static(&child, d, l)) {
                abort();
            }
            walk(&child, depth + 1);
        }
    }
    if (it.err_off != 0) {
        abort();
    }
}

static void try_parse(const uint8_t *data, size_t size)
{
    emu_wire_request_t req;
    mc_error_t err;

    if (emu_wire_parse(data, size, &req, &err) != 0) {
        if (err.cause == 0) {
            abort(); /* every failure must name the server code to answer with */
        }
        return;
    }
    if (!emu_wire_bson_valid(&req.body, EMU_WIRE_MAX_DEPTH)) {
        abort();
    }
    walk(&req.body, 1);
    {
        char *json = bson_as_canonical_extended_json(&req.body, NULL);
        bson_free(json);
    }
    if (req.header.opcode == EMU_OPCODE_MSG && strlen(req.db) == 0) {
        abort();
    }
    {
        uint8_t prefix[EMU_WIRE_REPLY_PREFIX_MAX];
        emu_wire_reply_prefix(prefix, EMU_OPCODE_MSG, 1, req.header.request_id, req.body.len);
        emu_wire_reply_prefix(prefix, EMU_OPCODE_REPLY, 1, req.header.request_id, req.body.len);
    }
    emu_wire_request_cleanup(&req);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *copy;

    if (size > EMU_WIRE_MAX_MESSAGE) {
        return 0;
    }
    if (size >= EMU_WIRE_HEADER_LEN) {
        emu_wire_header_t h;
        mc_error_t err;
        emu_wire_parse_header(data, size, &h, &err);
    }
    /* malloc'd copies so ASan sees the exact bounds */
    copy = malloc(size ? size : 1);
    if (!copy) {
        return 0;
    }
    memcpy(copy, data, size);
    try_parse(copy, size);
    if (size >= 4) {
        uint32_t n = (uint32_t)size;
        copy[0] = (uint8_t)(n & 0xff);
        copy[1] = (uint8_t)((n >> 8) & 0xff);
        copy[2] = (uint8_t)((n >> 16) & 0xff);
        copy[3] = (uint8_t)((n >> 24) & 0xff);
        try_parse(copy, size);
    }
    free(copy);
    return 0;
}
