/*
 * fuzz_cstoken.c: libFuzzer target for mongo-emulator's resume-token parser. The input bytes
 * are used twice: as the _data hex string of a token document (any client can send one in
 * resumeAfter/startAfter), and hex-encoded, as the decoded KeyString itself, so that the
 * structural parser sees arbitrary bytes too. Seeds live in tests/fuzz/corpus/fuzz_cstoken/.
 *
 * Single-threaded (libFuzzer). Beyond "no crash, no leak, no hang" it checks the parser's
 * promises: a failure carries a non-zero server code in the MongoDB domain, and a success
 * re-encodes (for tokens of the shape the emulator produces) to the very same bytes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cstoken.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void parse_one(const char *hex, size_t len)
{
    bson_t doc = BSON_INITIALIZER;
    bson_append_utf8(&doc, "_data", 5, hex, (int)len);
    emu_cstoken_t tok;
    mc_error_t err;
    mc_error_clear(&err);
    int rc = emu_cstoken_parse(&doc, &tok, &err);
    if (rc != 0) {
        if (err.domain != MC_DOMAIN_MONGODB || err.cause == 0 || tok.raw != NULL) {
            fprintf(stderr, "bad failure: domain %d cause %d\n", err.domain, err.cause);
            abort();
        }
    } else {
        if (tok.type == EMU_CSTOKEN_HWM && tok.version == 1 && !tok.has_uuid) {
            emu_kbuf_t b;
            emu_kbuf_init(&b);
            emu_cstoken_encode_hwm(&b, tok.ts_t, tok.ts_i);
            if (b.len != tok.raw_len || memcmp(b.data, tok.raw, b.len) != 0) {
                fprintf(stderr, "HWM token does not re-encode to itself\n");
                abort();
            }
            emu_kbuf_destroy(&b);
        }
        if (tok.event_id &&
            (tok.event_id < tok.raw || tok.event_id + tok.event_id_len > tok.raw + tok.raw_len)) {
            abort();
        }
        /* a fragment number sits after the eventIdentifier, inside the token */
        if (tok.has_fragment &&
            (!tok.event_id ||
             tok.fragment_offset != (size_t)(tok.event_id - tok.raw) + tok.event_id_len ||
             tok.fragment_offset >= tok.raw_len)) {
            abort();
        }
        if (tok.version >= 1 &&
            (tok.from_invalidate_offset == 0 || tok.from_invalidate_offset >= tok.raw_len)) {
            abort();
        }
        emu_cstoken_cleanup(&tok);
    }
    bson_destroy(&doc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096) {
        return 0;
    }
    char *text = malloc(size + 1);
    char *hex = malloc(2 * size + 1);
    if (!text || !hex) {
        abort();
    }
    for (size_t i = 0; i < size; i++) {
        text[i] = data[i] ? (char)data[i] : '0';
    }
    text[size] = '\0';
    parse_one(text, size);
    emu_cstoken_hex(data, size, hex);
    parse_one(hex, 2 * size);
    free(text);
    free(hex);
    return 0;
}
