/*
 * fuzz_json_writer.c: libFuzzer target for the one-pass Extended JSON writer. The input bytes
 * are a BSON document (bson_init_static framing, the length prefix patched to the input size).
 * It is rendered in relaxed and canonical mode by libbson 1.23 and by mc__json_render(), and
 * nested in a wrapper document (mc__json_write_embedded); any difference in bytes, length or
 * refusal aborts. Compact mode (what mongocast sends) must equal libbson's text with the
 * spaces outside strings removed (stripped here by a separate scanner), and must read back
 * through libbson's JSON parser as the same BSON as libbson's own text does. Inputs are not
 * filtered with bson_validate: documents that pass it (any flags) are a subset of what is compared
 * here, and corrupt ones must be refused the same way by both renderers (libbson's renderer
 * bounds-checks through bson_iter). The change as a message carries it (its first top-level
 * `_id` left out, mc__json_write_embedded_except) must equal libbson's compacted text of a copy
 * without that element and read back to the same BSON. Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/json_strip.h"
#include "json_writer.h"

static void mismatch(const char *what, const char *want, const char *got)
{
    fprintf(stderr, "fuzz_json_writer: %s mismatch\n libbson: %s\n    ours: %s\n", what,
            want ? want : "(NULL)", got ? got : "(NULL)");
    abort();
}

static void compare(const bson_t *doc, mc__json_mode_t mode)
{
    size_t want_len = 0, got_len = 0;
    char *want = mode == MC__JSON_CANONICAL ? bson_as_canonical_extended_json(doc, &want_len)
                                            : bson_as_relaxed_extended_json(doc, &want_len);
    char *got = mc__json_render(doc, mode, 0, &got_len, NULL);
    if ((want == NULL) != (got == NULL) ||
        (want && (want_len != got_len || memcmp(want, got, want_len) != 0))) {
        mismatch(mode == MC__JSON_CANONICAL ? "canonical" : "relaxed", want, got);
    }
    bson_free(want);
    bson_free(got);

    bson_t wrap = BSON_INITIALIZER;
    if (!bson_append_document(&wrap, "v", 1, doc)) {
        bson_destroy(&wrap);
        return;
    }
    want = mode == MC__JSON_CANONICAL ? bson_as_canonical_extended_json(&wrap, &want_len)
                                      : bson_as_relaxed_extended_json(&wrap, &want_len);
    mc__json_buf_t b;
    mc__json_buf_init(&b, 0, 0);
    MC__JSON_LIT(&b, "{ \"v\" : ");
    mc__json_write_embedded(&b, doc, mode, 0);
    MC__JSON_LIT(&b, " }");
    got = mc__json_buf_steal(&b, &got_len);
    if ((want == NULL) != (got == NULL) ||
        (want && (want_len != got_len || memcmp(want, got, want_len) != 0))) {
        mismatch(mode == MC__JSON_CANONICAL ? "embedded canonical" : "embedded relaxed", want, got);
    }
    bson_free(want);
    bson_free(got);
    bson_destroy(&wrap);
}

static void compare_compact(const bson_t *doc, mc__json_mode_t mode)
{
    size_t spaced_len = 0, got_len = 0, want_len = 0;
    char *spaced = mode == MC__JSON_CANONICAL ? bson_as_canonical_extended_json(doc, &spaced_len)
                                              : bson_as_relaxed_extended_json(doc, &spaced_len);
    char *got = mc__json_render(doc, mode | MC__JSON_COMPACT, 0, &got_len, NULL);
    if ((spaced == NULL) != (got == NULL)) {
        mismatch("compact refusal", spaced, got);
    }
    if (spaced) {
        char *want = json_strip_spaces(spaced, spaced_len, &want_len);
        if (want_len != got_len || memcmp(want, got, want_len) != 0) {
            mismatch("compact", want, got);
        }
        bson_t a, b;
        bson_error_t e;
        int pa = bson_init_from_json(&a, spaced, (ssize_t)spaced_len, &e);
        int pb = bson_init_from_json(&b, got, (ssize_t)got_len, &e);
        if (pa != pb ||
            (pa && (a.len != b.len || memcmp(bson_get_data(&a), bson_get_data(&b), a.len) != 0))) {
            mismatch("compact read back", spaced, got);
        }
        if (pa) {
            bson_destroy(&a);
            bson_destroy(&b);
        }
        bson_free(want);
    }
    bson_free(spaced);
    bson_free(got);
}

/* A message's change without its first top-level `_id` (the token the message carries as
 * "id"): what the writer leaves out must be exactly that element. */
static void compare_except_id(const bson_t *doc)
{
    bson_iter_t it;
    if (!bson_iter_init(&it, doc)) {
        return;
    }
    uint32_t skip = 0, skip_len = 0;
    bson_t copy = BSON_INITIALIZER;
    bool copied = true;
    while (bson_iter_next(&it)) {
        if (!skip && strcmp(bson_iter_key(&it), "_id") == 0) {
            skip = it.off;
            skip_len = it.next_off - it.off;
            continue;
        }
        copied = copied && bson_append_iter(&copy, NULL, 0, &it);
    }
    /* The reference is libbson's rendering of a copy without the _id; bson_append_iter does
     * not copy every element byte for byte (a code-with-scope's code is re-appended as a C
     * string, so a NUL inside it cuts it), and then there is nothing to compare with. */
    if (!skip || !copied || it.err_off || copy.len != doc->len - skip_len) {
        bson_destroy(&copy);
        return; /* no _id, corrupt, or no faithful copy: compare_compact covers the rest */
    }
    bson_t wrap = BSON_INITIALIZER;
    bson_append_document(&wrap, "change", 6, &copy);
    size_t spaced_len = 0, want_len = 0, got_len = 0;
    char *spaced = bson_as_relaxed_extended_json(&wrap, &spaced_len);
    mc__json_buf_t b;
    mc__json_buf_init(&b, 0, 0);
    MC__JSON_LIT(&b, "{\"change\":");
    mc__json_write_embedded_except(&b, doc, MC__JSON_RELAXED_COMPACT, 0, skip);
    MC__JSON_LIT(&b, "}");
    char *got = mc__json_buf_steal(&b, &got_len);
    if ((spaced == NULL) != (got == NULL)) {
        mismatch("except _id refusal", spaced, got);
    }
    if (spaced) {
        char *want = json_strip_spaces(spaced, spaced_len, &want_len);
        if (want_len != got_len || memcmp(want, got, want_len) != 0) {
            mismatch("except _id", want, got);
        }
        bson_t x, y;
        bson_error_t e;
        int px = bson_init_from_json(&x, spaced, (ssize_t)spaced_len, &e);
        int py = bson_init_from_json(&y, got, (ssize_t)got_len, &e);
        if (px != py ||
            (px && (x.len != y.len || memcmp(bson_get_data(&x), bson_get_data(&y), x.len) != 0))) {
            mismatch("except _id read back", spaced, got);
        }
        if (px) {
            bson_destroy(&x);
            bson_destroy(&y);
        }
        bson_free(want);
    }
    bson_free(spaced);
    bson_free(got);
    bson_destroy(&wrap);
    bson_destroy(&copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 5 || size > 1 << 20) {
        return 0;
    }
    /* bson_init_static needs the length prefix to match; patch it so every input is framed
     * and the fuzzer spends its time on the contents. */
    uint8_t *copy = malloc(size);
    if (!copy) {
        return 0;
    }
    memcpy(copy, data, size);
    uint32_t le = BSON_UINT32_TO_LE((uint32_t)size);
    memcpy(copy, &le, 4);
    bson_t doc;
    if (bson_init_static(&doc, copy, size)) {
        compare(&doc, MC__JSON_RELAXED);
        compare(&doc, MC__JSON_CANONICAL);
        compare_compact(&doc, MC__JSON_RELAXED);
        compare_compact(&doc, MC__JSON_CANONICAL);
        compare_except_id(&doc);
    }
    free(copy);
    return 0;
}
