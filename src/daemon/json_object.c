/*
 * json_object.c: one strict JSON object -> BSON (see json_object.h for why not
 * bson_init_from_json). Pure functions, any thread.
 */
#include "json_object.h"

#include <stdio.h>

#include <string.h>

int mcd_json_object_parse(const char *json, size_t len, bson_t *out)
{
    if (!json || !out) {
        return -1;
    }
    size_t i = 0;
    while (i < len && (json[i] == ' ' || json[i] == '\t' || json[i] == '\r' || json[i] == '\n')) {
        i++;
    }
    /* The reader would take "[1]" as a document with key "0"; only objects are meant here.
     * NUL bytes would let the parser and a C-string consumer see different inputs. */
    if (i == len || json[i] != '{' || memchr(json, '\0', len) != NULL) {
        return -1;
    }
    bson_json_reader_t *reader = bson_json_data_reader_new(false, 0);
    if (!reader) {
        return -1;
    }
    bson_json_data_reader_ingest(reader, (const uint8_t *)json, len);
    bson_error_t e;
    bson_init(out);
    int rc = bson_json_reader_read(reader, out, &e);
    if (rc == 1) {
        /* A second read must find nothing: trailing whitespace only. */
        bson_t extra = BSON_INITIALIZER;
        int rc2 = bson_json_reader_read(reader, &extra, &e);
        bson_destroy(&extra);
        if (rc2 != 0) {
            rc = -1;
        }
    } else {
        rc = -1;
    }
    bson_json_reader_destroy(reader);
    if (rc != 1) {
        bson_destroy(out);
        return -1;
    }
    return 0;
}

bool mcd_json_has_duplicate_keys(const bson_t *doc)
{
    bson_iter_t a, b;
    if (!bson_iter_init(&a, doc)) {
        return true;
    }
    /* Quadratic, but callers bound the key count (token claims, query objects of a few KiB). */
    while (bson_iter_next(&a)) {
        b = a;
        const char *k = bson_iter_key(&a);
        while (bson_iter_next(&b)) {
            if (strcmp(k, bson_iter_key(&b)) == 0) {
                return true;
            }
        }
    }
    return false;
}

void mcd_json_escape(char *out, size_t cap, size_t *n, const char *s)
{
    for (; *s && *n + 7 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            out[(*n)++] = '\\';
            out[(*n)++] = (char)ch;
        } else if (ch < 0x20) {
            *n += (size_t)snprintf(out + *n, cap - *n, "\\u%04x", ch);
        } else {
            out[(*n)++] = (char)ch;
        }
    }
    out[*n] = '\0';
}
