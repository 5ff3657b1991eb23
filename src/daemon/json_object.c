/*
 * json_object.c: one strict JSON object -> BSON (see json_object.h for why not
 * bson_init_from_json). Pure functions, any thread.
 */
#include "json_object.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An integer literal (`digits`, `n` of them, sign apart) that int64 cannot hold. */
static bool beyond_int64(const char *digits, size_t n, bool negative)
{
    static const char max[] = "9223372036854775807", min[] = "9223372036854775808";
    while (n > 1 && *digits == '0') {
        digits++;
        n--;
    }
    if (n != sizeof(max) - 1) {
        return n > sizeof(max) - 1;
    }
    return memcmp(digits, negative ? min : max, n) > 0;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Calls found(json, end, ctx) for each integer literal outside strings that int64 cannot
 * hold (`end`: just after its last digit); returns how many there were. */
static size_t find_big_integers(const char *json, size_t len,
                                void (*found)(const char *, size_t, void *), void *ctx)
{
    size_t count = 0;
    bool in_string = false;
    for (size_t i = 0; i < len;) {
        char c = json[i];
        if (in_string) {
            in_string = c != '"';
            i += c == '\\' ? 2 : 1;
            continue;
        }
        if (c == '"') {
            in_string = true;
            i++;
            continue;
        }
        if (c != '-' && !is_digit(c)) {
            i++;
            continue;
        }
        /* A number: sign, digits, then a fraction or exponent makes it a double. */
        size_t d = i + (c == '-' ? 1 : 0);
        size_t end = d;
        while (end < len && is_digit(json[end])) {
            end++;
        }
        bool fraction = end < len && (json[end] == '.' || json[end] == 'e' || json[end] == 'E');
        if (!fraction && end > d && beyond_int64(json + d, end - d, c == '-')) {
            count++;
            if (found) {
                found(json, end, ctx);
            }
        }
        while (fraction && end < len &&
               (is_digit(json[end]) || json[end] == '.' || json[end] == 'e' || json[end] == 'E' ||
                json[end] == '+' || json[end] == '-')) {
            end++;
        }
        i = end > i ? end : i + 1;
    }
    return count;
}

typedef struct widen {
    char *out;
    size_t o;      /* bytes written to out */
    size_t copied; /* bytes of the input copied so far */
} widen_t;

static void widen_one(const char *json, size_t end, void *ctx)
{
    widen_t *w = ctx;
    memcpy(w->out + w->o, json + w->copied, end - w->copied);
    w->o += end - w->copied;
    memcpy(w->out + w->o, ".0", 2);
    w->o += 2;
    w->copied = end;
}

/* libbson 1.23's JSON reader misreads integer literals past int64: 2^63 to 2^64-1 are
 * refused, and from 2^64 on they wrap (18446744073709551616 reads as 0, so a JWT `exp` or a
 * filter value would silently change). Such a literal gets ".0" appended, which makes it
 * the double MongoDB's relaxed Extended JSON reads it as. Returns 0 with *out NULL when
 * nothing needs rewriting, 0 with the rewritten text in *out (free() it), or -1 when memory
 * ran out. */
static int widen_big_integers(const char *json, size_t len, char **out, size_t *out_len)
{
    *out = NULL;
    size_t n = find_big_integers(json, len, NULL, NULL);
    if (n == 0) {
        return 0;
    }
    widen_t w = {malloc(len + 2 * n), 0, 0};
    if (!w.out) {
        return -1;
    }
    find_big_integers(json, len, widen_one, &w);
    memcpy(w.out + w.o, json + w.copied, len - w.copied);
    *out = w.out;
    *out_len = w.o + len - w.copied;
    return 0;
}

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
    char *widened = NULL;
    if (widen_big_integers(json, len, &widened, &len) != 0) {
        return -1;
    }
    if (widened) {
        json = widened;
    }
    bson_json_reader_t *reader = bson_json_data_reader_new(false, 0);
    if (!reader) {
        free(widened);
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
    free(widened);
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
