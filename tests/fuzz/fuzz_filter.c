/*
 * fuzz_filter.c: libFuzzer target for the query matcher. The first input byte picks the
 * encoding of the rest: odd = JSON (bson_new_from_json, the path subscriber filters take),
 * even = raw BSON (not validated beyond its length framing, like wire input). The document is
 * compiled as a filter with the daemon's settings (refuse_code_operators, depth and predicate
 * limits, bound variables) and, when it compiles, matched against fixed documents and against
 * itself; mc_bson_value_compare is exercised on its top-level values. Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fixed_docs[0]) {
        init_docs();
    }
    if (size < 1 || size > 65536) {
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
            (void)mc_filter_match(f, fixed_docs[i]);
        }
        (void)mc_filter_match(f, q);
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
