/*
 * fuzz_filter.c: libFuzzer target for the query matcher. The first input byte picks the
 * encoding of the rest: odd = JSON (bson_new_from_json, the path subscriber filters take),
 * even = raw BSON (not validated beyond its length framing, like wire input). The document is
 * compiled as a filter with the daemon's settings (refuse_code_operators, depth and predicate
 * limits, bound variables) and, when it compiles, matched against fixed documents and against
 * itself, with and without a CPU budget (a budgeted match that is not cut short must agree
 * with the plain one); mc_bson_value_compare is exercised on its top-level values. Regular
 * expressions (PCRE2) get their own path: a mode byte, then options, then a NUL-separated
 * pattern and subject, so the fuzzer reaches pattern syntax, options and odd subjects (invalid
 * UTF-8, NULs) directly rather than through JSON escaping. Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "filter_match_both.h"
#include "mongocast/filter.h"

static bson_t *fixed_docs[4];

static void init_docs(void)
{
    static const char *const docs[] = {
        "{\"_id\": 1, \"a\": 1, \"b\": \"x\", \"c\": [1, 2, {\"d\": null}], \"e\": {\"f\": [[1]]}}",
        ("{\"operationType\": \"update\", \"fullDocument\": {\"owner\": \"u1\", \"tags\": "
         "[\"a\"]}, "
         "\"updateDescription\": {\"updatedFields\": {\"x.y\": 2.5}, \"removedFields\": []}}"),
        "{\"a\": [{\"b\": [{\"c\": 1}, 2]}, [3], null], \"n\": {\"$numberDecimal\": \"1.5\"}}",
        "{}",
    };
    for (size_t i = 0; i < 4; i++) {
        fixed_docs[i] = bson_new_from_json((const uint8_t *)docs[i], -1, NULL);
    }
}

/* data: [options byte][pattern bytes] NUL [subject bytes] */
static void fuzz_regex(const uint8_t *data, size_t size)
{
    static const char opt_chars[] = "imsxu";
    char opts[8];
    size_t no = 0;
    for (size_t i = 0; i < 5; i++) {
        if (data[0] & (1u << i)) {
            opts[no++] = opt_chars[i];
        }
    }
    if (data[0] & 0x20) {
        opts[no++] = 'l'; /* refused: must fail with a message */
    }
    opts[no] = '\0';
    data++;
    size--;
    const uint8_t *nul = memchr(data, 0, size);
    size_t plen = nul ? (size_t)(nul - data) : size;
    const uint8_t *subj = nul ? nul + 1 : data + size;
    size_t slen = nul ? size - plen - 1 : 0;
    bson_t q = BSON_INITIALIZER, op;
    BSON_APPEND_DOCUMENT_BEGIN(&q, "s", &op);
    bson_append_utf8(&op, "$regex", -1, (const char *)data, (int)plen);
    bson_append_utf8(&op, "$options", -1, opts, -1);
    bson_append_document_end(&q, &op);
    mc_error_t err;
    mc_filter_t *f = mc_filter_new(&q, NULL, &err);
    if (f) {
        bson_t d = BSON_INITIALIZER;
        bson_append_utf8(&d, "s", -1, (const char *)subj, (int)slen);
        match_both(f, &d);
        bson_destroy(&d);
        /* the subject inside an array, and as a BSON regex value */
        bson_t d2 = BSON_INITIALIZER, arr;
        BSON_APPEND_ARRAY_BEGIN(&d2, "s", &arr);
        bson_append_utf8(&arr, "0", -1, (const char *)subj, (int)slen);
        BSON_APPEND_REGEX(&arr, "1", "a", "i");
        bson_append_array_end(&d2, &arr);
        match_both(f, &d2);
        bson_destroy(&d2);
        mc_filter_destroy(f);
    } else if (err.message[0] == '\0') {
        __builtin_trap();
    }
    bson_destroy(&q);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fixed_docs[0]) {
        init_docs();
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    if ((data[0] & 3) == 2) {
        if (size > 2) {
            fuzz_regex(data + 1, size - 1);
        }
        return 0;
    }
    bson_t *q;
    if (data[0] & 1) {
        q = bson_new_from_json(data + 1, (ssize_t)(size - 1), NULL);
    } else {
        q = bson_new_from_data(data + 1, size - 1);
    }
    if (!q) {
        return 0;
    }
    static const char vars_json[] = "{\"me\": \"u1\", \"ids\": [1, 2], \"doc\": {\"k\": 1}}";
    bson_t *vars = bson_new_from_json((const uint8_t *)vars_json, -1, NULL);
    mc_filter_opts_t opts = {
        .max_depth = 32, .max_predicates = 200, .refuse_code_operators = true, .vars = vars};
    mc_error_t err;
    mc_filter_t *f = mc_filter_new(q, &opts, &err);
    if (f) {
        for (size_t i = 0; i < 4; i++) {
            match_both(f, fixed_docs[i]);
        }
        match_both(f, q);
        (void)mc_filter_is_empty(f);
        mc_filter_destroy(f);
    } else {
        /* a refused filter must say why */
        if (err.message[0] == '\0') {
            __builtin_trap();
        }
    }
    /* Comparison must be antisymmetric and reflexive on arbitrary values. */
    bson_iter_t a, b;
    if (bson_iter_init(&a, q)) {
        int n = 0;
        while (bson_iter_next(&a) && n++ < 16) {
            bson_value_t va = *bson_iter_value(&a); /* points into q; `a` stays put below */
            if (mc_bson_value_compare(&va, &va) != 0) {
                __builtin_trap();
            }
            if (bson_iter_init(&b, q)) {
                int m = 0;
                while (bson_iter_next(&b) && m++ < 16) {
                    const bson_value_t *vb = bson_iter_value(&b);
                    int x = mc_bson_value_compare(&va, vb), y = mc_bson_value_compare(vb, &va);
                    if ((x < 0 && y <= 0) || (x > 0 && y >= 0) || (x == 0 && y != 0)) {
                        __builtin_trap();
                    }
                }
            }
        }
    }
    bson_destroy(vars);
    bson_destroy(q);
    return 0;
}
