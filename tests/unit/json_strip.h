/*
 * json_strip.h: libbson's Extended JSON text without the spaces outside strings: the expected
 * output of the writer's compact mode (json_writer.c), computed here independently of it.
 * Used by tests/unit/test_json_writer.c and tests/fuzz/fuzz_json_writer.c. Header-only; the
 * result is bson_malloc'ed. Single-threaded.
 */
#ifndef MC_TEST_JSON_STRIP_H
#define MC_TEST_JSON_STRIP_H

#include <bson/bson.h>
#include <stdbool.h>

static inline char *json_strip_spaces(const char *s, size_t n, size_t *out_len)
{
    char *o = bson_malloc(n + 1);
    size_t k = 0;
    bool str = false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (str) {
            o[k++] = c;
            if (c == '\\' && i + 1 < n) {
                o[k++] = s[++i];
            } else if (c == '"') {
                str = false;
            }
        } else if (c == '"') {
            str = true;
            o[k++] = c;
        } else if (c != ' ') {
            o[k++] = c;
        }
    }
    o[k] = '\0';
    *out_len = k;
    return o;
}

#endif
