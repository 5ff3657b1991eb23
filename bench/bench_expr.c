/*
 * bench_expr.c: CPU cost and allocations per event of libmongocast's expression evaluator
 * (mongocast/pipeline.h) and of $expr in the matcher, on one realistic change event: what the
 * daemon pays per event and subscriber when it runs stages itself. No server needed.
 *
 * Prints one line per case: "phase=expr case=NAME ns_per_event=N allocs_per_event=N" where
 * allocations are libbson allocations (bson_malloc/bson_realloc, which the evaluator uses for
 * every value it builds), counted through bson_mem_set_vtable. Run by scripts/bench.sh
 * (BENCH_SELECT=expr); options: --iterations N (default 1000000). Single-threaded.
 */
#include <bson/bson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mongocast/filter.h"
#include "mongocast/pipeline.h"

static size_t n_allocs;

static void *count_malloc(size_t n)
{
    n_allocs++;
    return malloc(n);
}

static void *count_calloc(size_t n, size_t size)
{
    n_allocs++;
    return calloc(n, size);
}

static void *count_realloc(void *p, size_t n)
{
    n_allocs++;
    return realloc(p, n);
}

static void *count_aligned_alloc(size_t align, size_t n)
{
    n_allocs++;
    return aligned_alloc(align, n);
}

static double cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static bson_t *json(const char *s)
{
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)s, -1, &e);
    if (!b) {
        fprintf(stderr, "bench_expr: bad JSON %s: %s\n", s, e.message);
        exit(1);
    }
    return b;
}

typedef enum { K_FILTER, K_EXPR_BOOL, K_PIPELINE } kind_t;

typedef struct bench_case {
    const char *name;
    kind_t kind;
    const char *spec; /* a query, {"e": expression} or {"p": [stages]} */
} bench_case_t;

static const char *const EVENT =
    "{\"_id\": {\"_data\": \"8264A7F2D1000000012B022C0100296E5A1004\"}, "
    "\"operationType\": \"update\", \"clusterTime\": {\"$timestamp\": {\"t\": 1, \"i\": 1}}, "
    "\"wallTime\": {\"$date\": \"2023-07-07T11:11:13.456Z\"}, "
    "\"fullDocument\": {\"_id\": {\"$oid\": \"64a7f2d1aaaaaaaaaaaaaaaa\"}, "
    "\"name\": \"novel\", \"owned_by\": \"book-nook\", \"price\": 11.0, "
    "\"quantity_in_stock\": 3, \"reorder_point\": 4, \"sku\": \"BN-0042\", "
    "\"tags\": [\"books\", \"fiction\", \"paperback\"], \"supplier\": {\"name\": \"Acme\", "
    "\"country\": \"NL\"}, \"updated_at\": {\"$date\": \"2023-07-07T11:11:13.400Z\"}}, "
    "\"ns\": {\"db\": \"mercury\", \"coll\": \"inventory_items\"}, "
    "\"documentKey\": {\"_id\": {\"$oid\": \"64a7f2d1aaaaaaaaaaaaaaaa\"}}, "
    "\"updateDescription\": {\"updatedFields\": {\"quantity_in_stock\": 3}, "
    "\"removedFields\": [], \"truncatedArrays\": []}}";

static const bench_case_t CASES[] = {
    {"filter_plain", K_FILTER,
     "{\"operationType\": {\"$in\": [\"insert\", \"update\", \"replace\"]}, "
     "\"fullDocument.quantity_in_stock\": {\"$lte\": 4}}"},
    {"filter_expr_low_stock", K_FILTER,
     "{\"operationType\": {\"$in\": [\"insert\", \"update\", \"replace\"]}, "
     "\"$expr\": {\"$lte\": [\"$fullDocument.quantity_in_stock\", "
     "\"$fullDocument.reorder_point\"]}}"},
    {"expr_bool_arith", K_EXPR_BOOL,
     "{\"e\": {\"$and\": [{\"$gt\": [{\"$multiply\": [\"$fullDocument.price\", "
     "\"$fullDocument.quantity_in_stock\"]}, 10]}, {\"$in\": [\"fiction\", "
     "\"$fullDocument.tags\"]}, {\"$ne\": [{\"$ifNull\": [\"$fullDocument.discontinued\", "
     "false]}, true]}]}}"},
    {"pipeline_match_project", K_PIPELINE,
     "{\"p\": [{\"$match\": {\"$expr\": {\"$lte\": [\"$fullDocument.quantity_in_stock\", "
     "\"$fullDocument.reorder_point\"]}}}, {\"$project\": {\"operationType\": 1, "
     "\"fullDocument.name\": 1, \"fullDocument.quantity_in_stock\": 1, "
     "\"fullDocument.owned_by\": 1}}]}"},
    {"pipeline_set_summary", K_PIPELINE,
     "{\"p\": [{\"$set\": {\"summary\": {\"$concat\": [\"$fullDocument.name\", \" is low: \", "
     "{\"$toString\": \"$fullDocument.quantity_in_stock\"}, \" left\"]}}}]}"},
};

static const bson_value_t *first_value(const bson_t *b, bson_iter_t *it)
{
    if (!bson_iter_init(it, b) || !bson_iter_next(it)) {
        fprintf(stderr, "bench_expr: empty spec\n");
        exit(1);
    }
    return bson_iter_value(it);
}

static void run_case(const bench_case_t *c, const bson_t *event, long iters)
{
    bson_t *spec = json(c->spec);
    mc_error_t err = {0};
    mc_filter_t *f = NULL;
    mc_expr_t *e = NULL;
    mc_pipeline_t *p = NULL;
    bson_iter_t it;
    if (c->kind == K_FILTER) {
        f = mc_filter_new(spec, NULL, &err);
    } else if (c->kind == K_EXPR_BOOL) {
        e = mc_expr_new(first_value(spec, &it), NULL, &err);
    } else {
        const bson_value_t *v = first_value(spec, &it);
        bson_t stages;
        bson_init_static(&stages, v->value.v_doc.data, v->value.v_doc.data_len);
        p = mc_pipeline_new(&stages, NULL, &err);
    }
    if (!f && !e && !p) {
        fprintf(stderr, "bench_expr: %s: %s\n", c->name, err.message);
        exit(1);
    }
    long passed = 0;
    size_t allocs0 = n_allocs;
    double t0 = cpu_ns();
    for (long i = 0; i < iters; i++) {
        if (f) {
            passed += mc_filter_match(f, event);
        } else if (e) {
            bool b = false;
            mc_expr_eval_bool(e, event, &b, &err);
            passed += b;
        } else {
            bson_t out;
            passed += mc_pipeline_apply(p, event, &out, &err) == 1;
            bson_destroy(&out);
        }
    }
    double ns = cpu_ns() - t0;
    size_t allocs = n_allocs - allocs0;
    if (passed != iters) {
        fprintf(stderr, "bench_expr: %s: the event should pass every time (%ld of %ld)\n", c->name,
                passed, iters);
        exit(1);
    }
    printf("phase=expr case=%s ns_per_event=%.1f allocs_per_event=%.2f\n", c->name, ns / iters,
           (double)allocs / iters);
    fflush(stdout);
    mc_filter_destroy(f);
    mc_expr_destroy(e);
    mc_pipeline_destroy(p);
    bson_destroy(spec);
}

int main(int argc, char **argv)
{
    long iters = 1000000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--iterations") == 0 && i + 1 < argc) {
            iters = strtol(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: bench_expr [--iterations N]\n");
            return 2;
        }
    }
    if (iters <= 0) {
        fprintf(stderr, "bench_expr: --iterations must be positive\n");
        return 2;
    }
    static bson_mem_vtable_t vt = {.malloc = count_malloc,
                                   .calloc = count_calloc,
                                   .realloc = count_realloc,
                                   .free = free,
                                   .aligned_alloc = count_aligned_alloc};
    bson_mem_set_vtable(&vt);
    bson_t *event = json(EVENT);
    for (size_t i = 0; i < sizeof(CASES) / sizeof(CASES[0]); i++) {
        run_case(&CASES[i], event, iters);
    }
    bson_destroy(event);
    bson_mem_restore_vtable();
    return 0;
}
