/*
 * test_json.h: BSON from a JSON literal for the unit tests (libbson's Extended JSON reader);
 * a malformed literal fails the test. Header-only; include it after cmocka.h.
 * Single-threaded.
 */
#ifndef MC_TEST_JSON_H
#define MC_TEST_JSON_H

#include <bson/bson.h>

static inline bson_t *json(const char *s)
{
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)s, -1, &e);
    if (!b) {
        fail_msg("bad test JSON %s: %s", s, e.message);
    }
    return b;
}

#endif
