/*
 * dollar_json.h: BSON from JSON for the unit tests that write queries and updates as JSON
 * (test_filter.c, test_update.c). libbson's JSON reader takes {"$type": ...} and
 * {"$regex": ..., "$options": ...} as legacy extended JSON, so those tests write '%' where a
 * key starts with '$' (%type, %options) and json() puts the '$' back.
 *
 * Header-only; include it after cmocka.h (a malformed JSON literal fails the test).
 * Single-threaded.
 */
#ifndef MC_TEST_DOLLAR_JSON_H
#define MC_TEST_DOLLAR_JSON_H

#include <bson/bson.h>
#include <stdio.h>

/* Copies `src` into `dst`, renaming keys that start with '%' to start with '$'. */
static inline void dollarize(const bson_t *src, bson_t *dst)
{
    bson_iter_t it;
    bson_iter_init(&it, src);
    while (bson_iter_next(&it)) {
        char key[64];
        snprintf(key, sizeof(key), "%s", bson_iter_key(&it));
        if (key[0] == '%') {
            key[0] = '$';
        }
        if (BSON_ITER_HOLDS_DOCUMENT(&it) || BSON_ITER_HOLDS_ARRAY(&it)) {
            const uint8_t *data;
            uint32_t len;
            bson_t sub, child;
            bool doc = BSON_ITER_HOLDS_DOCUMENT(&it);
            if (doc) {
                bson_iter_document(&it, &len, &data);
                bson_append_document_begin(dst, key, -1, &child);
            } else {
                bson_iter_array(&it, &len, &data);
                bson_append_array_begin(dst, key, -1, &child);
            }
            bson_init_static(&sub, data, len);
            dollarize(&sub, &child);
            if (doc) {
                bson_append_document_end(dst, &child);
            } else {
                bson_append_array_end(dst, &child);
            }
        } else {
            bson_append_value(dst, key, -1, bson_iter_value(&it));
        }
    }
}

/* A new document from JSON with '%' keys turned into '$' keys (free with bson_destroy). */
static inline bson_t *json(const char *s)
{
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)s, -1, &e);
    if (!b) {
        fail_msg("bad JSON in test: %s: %s", s, e.message);
    }
    bson_t *out = bson_new();
    dollarize(b, out);
    bson_destroy(b);
    return out;
}

#endif
