/*
 * fuzz_split_event.c: libFuzzer target for the reassembly of split change events
 * (split_event.c), which reads what the server sends: the input after its first byte is a
 * sequence of BSON documents fed as fragments (whole or thin copies, by the first byte's low
 * bit, with a recipient path), and the whole input, as text, is read as a BSONObjectTooLarge
 * message. Single-threaded (libFuzzer).
 *
 * Beyond "no crash, no leak, no hang" it checks the module's promises: a reassembled event is
 * valid BSON with an _id and no splitEvent; an error leaves nothing under way; a token read from
 * a message is a non-empty hex string that fits the buffer.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "split_event.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_whole(const bson_t *whole)
{
    bson_iter_t it;
    if (!bson_validate(whole, BSON_VALIDATE_NONE, NULL) || !bson_iter_init_find(&it, whole, "_id") ||
        bson_iter_init_find(&it, whole, "splitEvent")) {
        fprintf(stderr, "reassembled event without _id or with splitEvent\n");
        abort();
    }
}

/* bson_validate() on the fragment and on each nested document and array on its own: libbson's
 * check of a whole document passes some nested bytes that are not a document when read alone
 * (an element of an unknown type inside a subdocument), which libmongoc would never hand over
 * from a server reply and which a copy of that subdocument then shows as invalid. */
static bool valid_deep(const bson_t *b, int depth)
{
    bson_iter_t it;
    if (depth > 100 || !bson_validate(b, BSON_VALIDATE_NONE, NULL) || !bson_iter_init(&it, b)) {
        return false;
    }
    while (bson_iter_next(&it)) {
        const uint8_t *d = NULL;
        uint32_t len = 0;
        if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
            bson_iter_document(&it, &len, &d);
        } else if (BSON_ITER_HOLDS_ARRAY(&it)) {
            bson_iter_array(&it, &len, &d);
        } else {
            continue;
        }
        bson_t sub;
        if (!d || !bson_init_static(&sub, d, len) || !valid_deep(&sub, depth + 1)) {
            return false;
        }
    }
    return true;
}

static void fragments(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return;
    }
    bool thin = data[0] & 1;
    bson_reader_t *r = bson_reader_new_from_data(data + 1, size - 1);
    const bson_t *doc;
    bool eof = false;
    mc__split_t sp = {0};
    int n = 0;
    while (n++ < 64 && (doc = bson_reader_read(r, &eof)) != NULL) {
        if (!valid_deep(doc, 0)) {
            /* libmongoc hands over only documents it could read; the checks on the result
             * below assume valid fragments (the module copies values, it does not repair). */
            continue;
        }
        bool complete = false;
        mc_error_t err = {0};
        int rc = mc__split_add(&sp, doc, thin, "fullDocument.a.b", &complete, &err);
        if (rc != 0) {
            if (mc__split_pending(&sp) || err.message[0] == '\0') {
                fprintf(stderr, "error left state behind or said nothing\n");
                abort();
            }
            continue;
        }
        if (complete) {
            size_t bytes = 0;
            bson_t *whole = mc__split_take(&sp, &bytes);
            if (whole) {
                check_whole(whole);
                bson_destroy(whole);
            }
        }
    }
    mc__split_reset(&sp);
    bson_reader_destroy(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fragments(data, size);
    char *text = malloc(size + 1);
    if (!text) {
        return 0;
    }
    memcpy(text, data, size);
    text[size] = '\0';
    char tok[128];
    size_t n = 0;
    if (mc__split_too_large_token(text, tok, sizeof(tok), &n)) {
        size_t len = strlen(tok);
        if (len == 0 || len >= sizeof(tok) || strspn(tok, "0123456789abcdefABCDEF") != len) {
            fprintf(stderr, "bad token read from a message\n");
            abort();
        }
    }
    free(text);
    return 0;
}
