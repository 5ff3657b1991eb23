/*
 * fuzz_expr.c: libFuzzer target for libmongocast's aggregation expressions, $expr in the
 * matcher, projections and per-document pipelines (mongocast/pipeline.h). The first input byte
 * picks the encoding of the rest: odd = JSON, even = raw BSON (length-framed only, like wire
 * input). The document is used four ways: as a query with $expr allowed (the config's and the
 * emulator's path), each top-level value as an expression, each array as a pipeline and each
 * document as a projection; everything that compiles is evaluated against fixed change events
 * and against the input itself, with a small value limit so that size limits are exercised.
 * Checks the result contracts (1 = a value, 0 = missing, <0 = an error with a message), and
 * that a query matched within a CPU budget (which $expr counts against) agrees with the plain
 * match whenever the budget was not exhausted.
 * Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "filter_match_both.h"
#include "mongocast/filter.h"
#include "mongocast/pipeline.h"

#define N_DOCS 4

static bson_t *fixed_docs[N_DOCS];

static void init_docs(void)
{
    static const char *const docs[N_DOCS] = {
        ("{\"_id\": {\"_data\": \"82\"}, \"operationType\": \"update\", \"fullDocument\": "
         "{\"_id\": 1, \"quantity_in_stock\": 3, \"reorder_point\": 5, \"name\": \"bolt\", "
         "\"tags\": [\"a\", {\"k\": 1}], \"at\": {\"$date\": \"2020-01-01T00:00:00Z\"}}, "
         "\"updateDescription\": {\"updatedFields\": {\"quantity_in_stock\": 3}}}"),
        "{\"a\": [{\"b\": [{\"c\": 1}, 2]}, [3], null], \"n\": {\"$numberDecimal\": \"1.5\"}}",
        ("{\"x\": 2147483647, \"y\": {\"$numberLong\": \"-9223372036854775808\"}, "
         "\"z\": -0.0, \"s\": \"\", \"nan\": {\"$numberDouble\": \"NaN\"}, \"u\": {\"$undefined\": "
         "true}}"),
        "{}",
    };
    for (size_t i = 0; i < N_DOCS; i++) {
        fixed_docs[i] = bson_new_from_json((const uint8_t *)docs[i], -1, NULL);
    }
}

static void check_error(int rc, const mc_error_t *err)
{
    if (rc < 0 && err->message[0] == '\0') {
        __builtin_trap(); /* every failure says why */
    }
}

static void run_expr(const bson_value_t *spec, const bson_t *self)
{
    mc_expr_opts_t opts = {.max_depth = 40, .max_nodes = 2000, .max_value_bytes = 4096};
    mc_error_t err = {0};
    mc_expr_t *e = mc_expr_new(spec, &opts, &err);
    if (!e) {
        check_error(MC_EINVAL, &err);
        return;
    }
    for (size_t i = 0; i <= N_DOCS; i++) {
        const bson_t *doc = i < N_DOCS ? fixed_docs[i] : self;
        bson_value_t out;
        err.message[0] = '\0';
        int rc = mc_expr_eval(e, doc, &out, &err);
        check_error(rc, &err);
        if ((rc == 1) != (out.value_type != BSON_TYPE_EOD)) {
            __builtin_trap();
        }
        if (rc == 1) {
            bson_value_destroy(&out);
        }
        bool b;
        check_error(mc_expr_eval_bool(e, doc, &b, &err), &err);
    }
    mc_expr_destroy(e);
}

static void run_pipeline(const bson_t *stages, const bson_t *self)
{
    mc_pipeline_opts_t opts = {.expr = {.max_depth = 40, .max_value_bytes = 4096}};
    mc_error_t err = {0};
    mc_pipeline_t *p = mc_pipeline_new(stages, &opts, &err);
    if (!p) {
        check_error(MC_EINVAL, &err);
        return;
    }
    for (size_t i = 0; i <= N_DOCS; i++) {
        bson_t out;
        err.message[0] = '\0';
        int rc = mc_pipeline_apply(p, i < N_DOCS ? fixed_docs[i] : self, &out, &err);
        check_error(rc, &err);
        if (rc != 1 && !bson_empty(&out)) {
            __builtin_trap(); /* a dropped or failed document leaves `out` empty */
        }
        bson_destroy(&out);
    }
    (void)mc_pipeline_only_filters(p);
    mc_pipeline_destroy(p);
}

static void run_projection(const bson_t *spec, mc_projection_kind_t kind, const bson_t *self)
{
    mc_error_t err = {0};
    mc_projection_t *p = mc_projection_new(spec, kind, NULL, &err);
    if (!p) {
        check_error(MC_EINVAL, &err);
        return;
    }
    for (size_t i = 0; i <= N_DOCS; i++) {
        bson_t out;
        err.message[0] = '\0';
        check_error(mc_projection_apply(p, i < N_DOCS ? fixed_docs[i] : self, &out, &err), &err);
        bson_destroy(&out);
    }
    mc_projection_destroy(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fixed_docs[0]) {
        init_docs();
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    bson_t *in = (data[0] & 1) ? bson_new_from_json(data + 1, (ssize_t)(size - 1), NULL)
                               : bson_new_from_data(data + 1, size - 1);
    if (!in) {
        return 0;
    }
    /* as a query: $expr allowed (config stages and the emulator), limits as the daemon's */
    mc_filter_opts_t fopts = {.max_depth = 32, .max_predicates = 200};
    mc_error_t err = {0};
    mc_filter_t *f = mc_filter_new(in, &fopts, &err);
    if (f) {
        for (size_t i = 0; i < N_DOCS; i++) {
            match_both(f, fixed_docs[i]);
        }
        match_both(f, in);
        mc_filter_destroy(f);
    } else {
        check_error(MC_EINVAL, &err);
    }
    bson_iter_t it;
    if (bson_iter_init(&it, in)) {
        int n = 0;
        while (bson_iter_next(&it) && n++ < 8) {
            const bson_value_t *v = bson_iter_value(&it);
            run_expr(v, in);
            if (v->value_type == BSON_TYPE_ARRAY || v->value_type == BSON_TYPE_DOCUMENT) {
                bson_t sub;
                if (v->value.v_doc.data &&
                    bson_init_static(&sub, v->value.v_doc.data, v->value.v_doc.data_len)) {
                    if (v->value_type == BSON_TYPE_ARRAY) {
                        run_pipeline(&sub, in);
                    } else {
                        run_projection(&sub, n & 1 ? MC_PROJECTION_FIND : MC_PROJECTION_ADD_FIELDS,
                                       in);
                    }
                }
            }
        }
    }
    bson_destroy(in);
    return 0;
}
