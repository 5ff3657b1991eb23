/*
 * agg.c: mongo-emulator's aggregation pipelines, find projections and sort order (aggregate,
 * find, change-stream stages after $changeStream, and pipeline-style updates through
 * update.c).
 *
 * Threads: any; a compiled pipeline is immutable, results are fresh documents.
 *
 * The per-document stages ($match $project $addFields/$set $unset $replaceRoot $replaceWith),
 * aggregation expressions and projections are libmongocast's (mongocast/pipeline.h), the same
 * code the daemon runs: a pipeline here is a sequence of runs of per-document stages, each
 * compiled as one mc_pipeline_t, and of the stages that need the whole set of documents, which
 * live here: $sort, $skip, $limit, $group (accumulators $sum $avg $min $max $first $last $push
 * $addToSet; groups are emitted ordered by _id, where MongoDB's order is unspecified) and
 * $count. Stages are compiled in the order written, so the first bad stage is the one
 * reported, as by MongoDB.
 *
 * Invariants: every document built here is finished (no open sub-document) before it is
 * returned; values taken from expressions are owned copies (bson_value_destroy); recursion
 * over user documents in sort keys follows the sort path, not the data alone.
 */
#include "agg.h"

#include "bson_helpers.h"

#include "mongocast/filter.h"
#include "mongocast/pipeline.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PATH_COMPONENTS 128

static int fail(mc_error_t *err, int cause, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int fail(mc_error_t *err, int cause, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, MC_EINVAL, MC_DOMAIN_MONGODB, cause, fmt, ap);
    va_end(ap);
    return MC_EINVAL;
}

static bool is_number(bson_type_t t)
{
    return t == BSON_TYPE_INT32 || t == BSON_TYPE_INT64 || t == BSON_TYPE_DOUBLE ||
           t == BSON_TYPE_DECIMAL128;
}

static double as_double(const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_INT32: return v->value.v_int32;
    case BSON_TYPE_INT64: return (double)v->value.v_int64;
    case BSON_TYPE_DOUBLE: return v->value.v_double;
    case BSON_TYPE_DECIMAL128: {
        char buf[BSON_DECIMAL128_STRING];
        bson_decimal128_to_string(&v->value.v_decimal128, buf);
        return strtod(buf, NULL);
    }
    default: return 0;
    }
}

static void value_null(bson_value_t *out)
{
    memset(out, 0, sizeof(*out));
    out->value_type = BSON_TYPE_NULL;
}

/* ---------------------------------------------------------------- field paths */

typedef struct path {
    char *buf;
    size_t n;
    const char *comp[MAX_PATH_COMPONENTS];
} path_t;

static int path_parse(path_t *p, const char *s, mc_error_t *err)
{
    memset(p, 0, sizeof(*p));
    p->buf = bson_strdup(s);
    char *c = p->buf;
    for (;;) {
        if (p->n == MAX_PATH_COMPONENTS) {
            bson_free(p->buf);
            p->buf = NULL;
            return fail(err, 2, "field path '%s' has too many components", s);
        }
        p->comp[p->n++] = c;
        char *dot = strchr(c, '.');
        if (!dot) {
            break;
        }
        *dot = '\0';
        c = dot + 1;
    }
    for (size_t i = 0; i < p->n; i++) {
        if (!p->comp[i][0]) {
            bson_free(p->buf);
            p->buf = NULL;
            return fail(err, 15998, "FieldPath field names may not be empty strings.");
        }
    }
    return 0;
}

static void path_free(path_t *p)
{
    bson_free(p->buf);
    p->buf = NULL;
}

static bool doc_find(const uint8_t *data, uint32_t len, const char *key, bson_iter_t *it)
{
    if (!emu_safe_iter_init(it, data, len)) {
        return false;
    }
    while (bson_iter_next(it)) {
        if (strcmp(bson_iter_key(it), key) == 0) {
            return true;
        }
    }
    return false;
}

/* ---------------------------------------------------------------- sort */

typedef struct sort_best {
    bson_value_t v;
    bool have;
    bool asc;
} sort_best_t;

static void sort_offer(sort_best_t *b, const bson_value_t *v)
{
    if (!b->have) {
        b->v = *v;
        b->have = true;
        return;
    }
    int c = mc_bson_value_compare(v, &b->v);
    if ((b->asc && c < 0) || (!b->asc && c > 0)) {
        b->v = *v;
    }
}

/* Collects the candidate sort keys of `path` (MongoDB: ascending sorts by the smallest,
 * descending by the largest value reachable; missing sorts as null; [] as undefined). */
static void sort_collect(const bson_value_t *v, const path_t *p, size_t ci, sort_best_t *b)
{
    static const bson_value_t null_v = {.value_type = BSON_TYPE_NULL};
    static const bson_value_t undef_v = {.value_type = BSON_TYPE_UNDEFINED};
    bson_iter_t it;
    if (ci == p->n) {
        if (v->value_type == BSON_TYPE_ARRAY) {
            bool any = false;
            if (emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
                while (bson_iter_next(&it)) {
                    any = true;
                    sort_offer(b, bson_iter_value(&it));
                }
            }
            if (!any) {
                sort_offer(b, &undef_v);
            }
        } else {
            sort_offer(b, v);
        }
        return;
    }
    if (v->value_type == BSON_TYPE_DOCUMENT) {
        if (doc_find(v->value.v_doc.data, v->value.v_doc.data_len, p->comp[ci], &it)) {
            sort_collect(bson_iter_value(&it), p, ci + 1, b);
        } else {
            sort_offer(b, &null_v);
        }
        return;
    }
    if (v->value_type == BSON_TYPE_ARRAY) {
        bool any = false;
        if (emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            while (bson_iter_next(&it)) {
                const bson_value_t *e = bson_iter_value(&it);
                if (e->value_type == BSON_TYPE_DOCUMENT) {
                    any = true;
                    sort_collect(e, p, ci, b);
                }
            }
        }
        if (!any) {
            sort_offer(b, &null_v);
        }
        return;
    }
    sort_offer(b, &null_v);
}

int emu_sort_compare(const bson_t *sort_spec, const bson_t *a, const bson_t *b)
{
    bson_iter_t it;
    if (!sort_spec || !bson_iter_init(&it, sort_spec)) {
        return 0;
    }
    bson_value_t va = {.value_type = BSON_TYPE_DOCUMENT}, vb = {.value_type = BSON_TYPE_DOCUMENT};
    va.value.v_doc.data = (uint8_t *)bson_get_data(a);
    va.value.v_doc.data_len = a->len;
    vb.value.v_doc.data = (uint8_t *)bson_get_data(b);
    vb.value.v_doc.data_len = b->len;
    while (bson_iter_next(&it)) {
        bool asc = true;
        if (is_number(bson_iter_type(&it))) {
            asc = as_double(bson_iter_value(&it)) >= 0;
        }
        path_t p;
        if (path_parse(&p, bson_iter_key(&it), NULL) < 0) {
            continue;
        }
        sort_best_t ka = {.asc = asc}, kb = {.asc = asc};
        sort_collect(&va, &p, 0, &ka);
        sort_collect(&vb, &p, 0, &kb);
        path_free(&p);
        int c = mc_bson_value_compare(&ka.v, &kb.v);
        if (c) {
            return asc ? c : -c;
        }
    }
    return 0;
}

static int sort_spec_check(const bson_value_t *spec, mc_error_t *err)
{
    bson_iter_t it;
    int n = 0;
    if (spec->value_type != BSON_TYPE_DOCUMENT ||
        !emu_safe_iter_init(&it, spec->value.v_doc.data, spec->value.v_doc.data_len)) {
        return fail(err, 15973, "the $sort key specification must be an object");
    }
    while (bson_iter_next(&it)) {
        const bson_value_t *v = bson_iter_value(&it);
        double d = is_number(v->value_type) ? as_double(v) : 0;
        if (d != 1 && d != -1) {
            return fail(err, 15975,
                        "$sort key ordering must be 1 (for ascending) or -1 (for "
                        "descending)");
        }
        path_t p;
        if (path_parse(&p, bson_iter_key(&it), err) < 0) {
            return MC_EINVAL;
        }
        path_free(&p);
        n++;
    }
    if (n == 0) {
        return fail(err, 15976, "$sort stage must have at least one sort key");
    }
    return 0;
}

/* ---------------------------------------------------------------- pipeline */

typedef enum stage_kind {
    S_DOC, /* a run of per-document stages */
    S_SORT,
    S_SKIP,
    S_LIMIT,
    S_GROUP,
    S_COUNT,
} stage_kind_t;

typedef struct acc_spec {
    char *field;
    char op[16];
    mc_expr_t *expr;
} acc_spec_t;

typedef struct stage {
    stage_kind_t kind;
    char name[32];
    mc_pipeline_t *doc;  /* S_DOC */
    mc_expr_t *group_id; /* S_GROUP */
    bson_t *sort;
    int64_t num;
    char *count_field;
    acc_spec_t *accs;
    size_t naccs;
} stage_t;

struct emu_pipeline {
    stage_t *stages;
    size_t n, cap;
};

static void stage_cleanup(stage_t *s)
{
    mc_pipeline_destroy(s->doc);
    mc_expr_destroy(s->group_id);
    if (s->sort) {
        bson_destroy(s->sort);
    }
    bson_free(s->count_field);
    for (size_t i = 0; i < s->naccs; i++) {
        bson_free(s->accs[i].field);
        mc_expr_destroy(s->accs[i].expr);
    }
    bson_free(s->accs);
}

void emu_pipeline_destroy(emu_pipeline_t *p)
{
    if (!p) {
        return;
    }
    for (size_t i = 0; i < p->n; i++) {
        stage_cleanup(&p->stages[i]);
    }
    bson_free(p->stages);
    bson_free(p);
}

static stage_t *stage_push(emu_pipeline_t *p)
{
    if (p->n == p->cap) {
        p->cap = p->cap ? p->cap * 2 : 4;
        p->stages = bson_realloc(p->stages, p->cap * sizeof(stage_t));
    }
    stage_t *s = &p->stages[p->n++];
    memset(s, 0, sizeof(*s));
    return s;
}

static int parse_group(stage_t *s, const bson_value_t *v, mc_error_t *err)
{
    bson_iter_t it;
    bool have_id = false;
    if (v->value_type != BSON_TYPE_DOCUMENT ||
        !emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        return fail(err, 15947, "a group's fields must be specified in an object");
    }
    size_t cap = 0;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "_id") == 0) {
            mc_expr_destroy(s->group_id); /* a repeated _id: the last one wins */
            if (!(s->group_id = mc_expr_new(bson_iter_value(&it), NULL, err))) {
                return MC_EINVAL;
            }
            have_id = true;
            continue;
        }
        if (strchr(k, '.')) {
            return fail(err, 40235, "The field name '%s' cannot contain '.'", k);
        }
        if (k[0] == '$') {
            return fail(err, 40236, "The field name '%s' cannot be an operator name", k);
        }
        bson_iter_t acc;
        if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &acc) ||
            !bson_iter_next(&acc)) {
            return fail(err, 40234, "The field '%s' must be an accumulator object", k);
        }
        const char *op = bson_iter_key(&acc);
        static const char *const ops[] = {"$sum",   "$avg",  "$min",  "$max",
                                          "$first", "$last", "$push", "$addToSet"};
        bool known = false;
        for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
            known |= strcmp(op, ops[i]) == 0;
        }
        if (!known) {
            return fail(err, 15952, "unknown group operator '%s'", op);
        }
        bson_iter_t more = acc;
        if (bson_iter_next(&more)) {
            return fail(err, 40238, "The field '%s' must specify one accumulator", k);
        }
        if (s->naccs == cap) {
            cap = cap ? cap * 2 : 4;
            s->accs = bson_realloc(s->accs, cap * sizeof(acc_spec_t));
        }
        acc_spec_t *a = &s->accs[s->naccs++];
        memset(a, 0, sizeof(*a));
        a->field = bson_strdup(k);
        bson_strncpy(a->op, op, sizeof(a->op));
        if (!(a->expr = mc_expr_new(bson_iter_value(&acc), NULL, err))) {
            return MC_EINVAL;
        }
    }
    if (!have_id) {
        return fail(err, 15955, "a group specification must include an _id");
    }
    return 0;
}

static int get_count(const bson_value_t *v, const char *stage, int64_t *out, mc_error_t *err)
{
    double d = is_number(v->value_type) ? as_double(v) : -1;
    if (!is_number(v->value_type) || d != floor(d) || d < 0 || d > 9.0e18) {
        return fail(err, strcmp(stage, "$limit") == 0 ? 15957 : 15956,
                    "invalid argument to %s stage: Expected a non-negative integer", stage);
    }
    *out = (int64_t)d;
    if (strcmp(stage, "$limit") == 0 && *out == 0) {
        return fail(err, 15958, "the limit must be positive");
    }
    return 0;
}

/* The name of a stage that needs the whole set of documents, or NULL for anything else
 * (per-document stages, unknown stages and malformed ones, which libmongocast reports). */
static const char *set_level_name(const bson_value_t *sv)
{
    static const char *const names[] = {"$sort", "$skip", "$limit", "$group", "$count"};
    bson_iter_t it;
    if (sv->value_type != BSON_TYPE_DOCUMENT ||
        !emu_safe_iter_init(&it, sv->value.v_doc.data, sv->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return NULL;
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(bson_iter_key(&it), names[i]) == 0) {
            return names[i];
        }
    }
    return NULL;
}

static int parse_set_stage(stage_t *s, const bson_value_t *sv, bool per_doc, mc_error_t *err)
{
    bson_iter_t it;
    emu_safe_iter_init(&it, sv->value.v_doc.data, sv->value.v_doc.data_len);
    bson_iter_next(&it);
    bson_iter_t more = it;
    if (bson_iter_next(&more)) {
        return fail(err, 40323,
                    "A pipeline stage specification object must contain exactly "
                    "one field.");
    }
    const char *name = bson_iter_key(&it);
    bson_value_t v = *bson_iter_value(&it);
    bson_strncpy(s->name, name, sizeof(s->name));
    if (per_doc) {
        return fail(err, 40324, "%s is not permitted in a $changeStream pipeline", name);
    }
    if (strcmp(name, "$sort") == 0) {
        s->kind = S_SORT;
        if (sort_spec_check(&v, err) < 0) {
            return MC_EINVAL;
        }
        s->sort = bson_new_from_data(v.value.v_doc.data, v.value.v_doc.data_len);
        return 0;
    }
    if (strcmp(name, "$skip") == 0 || strcmp(name, "$limit") == 0) {
        s->kind = name[1] == 's' ? S_SKIP : S_LIMIT;
        return get_count(&v, name, &s->num, err);
    }
    if (strcmp(name, "$group") == 0) {
        s->kind = S_GROUP;
        return parse_group(s, &v, err);
    }
    s->kind = S_COUNT;
    if (v.value_type != BSON_TYPE_UTF8) {
        return fail(err, 40156, "the count field must be a non-empty string");
    }
    const char *f = v.value.v_utf8.str;
    if (!f[0]) {
        return fail(err, 40157, "the count field must be a non-empty string");
    }
    if (f[0] == '$') {
        return fail(err, 40158, "the count field cannot be a $-prefixed path");
    }
    if (strchr(f, '.')) {
        return fail(err, 40160, "the count field cannot contain '.'");
    }
    s->count_field = bson_strdup(f);
    return 0;
}

/* Compiles the per-document stages collected in `run` (then emptied) as one stage. */
static int flush_run(emu_pipeline_t *p, bson_t *run, uint32_t *n_run, mc_error_t *err)
{
    if (*n_run == 0) {
        return 0;
    }
    stage_t *s = stage_push(p);
    s->kind = S_DOC;
    bson_strncpy(s->name, "per-document stages", sizeof(s->name));
    s->doc = mc_pipeline_new(run, NULL, err);
    bson_reinit(run);
    *n_run = 0;
    return s->doc ? 0 : MC_EINVAL;
}

emu_pipeline_t *emu_pipeline_new(const bson_t *stages, bool per_document_only, mc_error_t *err)
{
    bson_iter_t it;
    if (!stages || !bson_iter_init(&it, stages)) {
        fail(err, 14, "'pipeline' option must be specified as an array");
        return NULL;
    }
    emu_pipeline_t *p = bson_malloc0(sizeof(*p));
    bson_t run = BSON_INITIALIZER;
    uint32_t n_run = 0;
    int rc = 0;
    while (rc == 0 && bson_iter_next(&it)) {
        const bson_value_t *sv = bson_iter_value(&it);
        if (!set_level_name(sv)) {
            char key[16];
            const char *k;
            bson_uint32_to_string(n_run++, &k, key, sizeof(key));
            bson_append_value(&run, k, -1, sv);
            continue;
        }
        rc = flush_run(p, &run, &n_run, err);
        if (rc == 0) {
            rc = parse_set_stage(stage_push(p), sv, per_document_only, err);
        }
    }
    if (rc == 0) {
        rc = flush_run(p, &run, &n_run, err);
    }
    bson_destroy(&run);
    if (rc < 0) {
        emu_pipeline_destroy(p);
        return NULL;
    }
    return p;
}

int emu_pipeline_apply_one(const emu_pipeline_t *p, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    bson_t cur;
    bson_copy_to(doc, &cur);
    for (size_t i = 0; i < p->n; i++) {
        const stage_t *s = &p->stages[i];
        bson_t next;
        int rc = s->kind == S_DOC
                     ? mc_pipeline_apply(s->doc, &cur, &next, err)
                     : (bson_init(&next),
                        fail(err, 40324, "%s cannot be applied to one document", s->name));
        bson_destroy(&cur);
        if (rc <= 0) {
            bson_destroy(&next);
            bson_init(out);
            return rc;
        }
        bson_steal(&cur, &next); /* a plain struct copy would break libbson's self-pointer */
    }
    bson_steal(out, &cur);
    return 1;
}

/* ---- set-level stages */

typedef struct docvec {
    bson_t **d;
    size_t n, cap;
} docvec_t;

static void dv_push(docvec_t *v, bson_t *d)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 16;
        v->d = bson_realloc(v->d, v->cap * sizeof(bson_t *));
    }
    v->d[v->n++] = d;
}

static void dv_free(docvec_t *v)
{
    for (size_t i = 0; i < v->n; i++) {
        bson_destroy(v->d[i]);
    }
    bson_free(v->d);
    v->d = NULL;
    v->n = v->cap = 0;
}

/* Stable merge sort (MongoDB's $sort keeps no particular order for ties; stability makes the
 * emulator deterministic). */
typedef int (*cmp_fn)(const void *ctx, const void *a, const void *b);

static void merge_sort(void **items, void **tmp, size_t n, cmp_fn cmp, const void *ctx)
{
    if (n < 2) {
        return;
    }
    size_t h = n / 2;
    merge_sort(items, tmp, h, cmp, ctx);
    merge_sort(items + h, tmp, n - h, cmp, ctx);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) {
        tmp[k++] = cmp(ctx, items[j], items[i]) < 0 ? items[j++] : items[i++];
    }
    while (i < h) {
        tmp[k++] = items[i++];
    }
    while (j < n) {
        tmp[k++] = items[j++];
    }
    memcpy(items, tmp, n * sizeof(void *));
}

static int doc_sort_cmp(const void *ctx, const void *a, const void *b)
{
    return emu_sort_compare((const bson_t *)ctx, (const bson_t *)a, (const bson_t *)b);
}

typedef struct gitem {
    bson_value_t key;
    bson_t *doc; /* borrowed */
} gitem_t;

static int gitem_cmp(const void *ctx, const void *a, const void *b)
{
    return mc_bson_value_compare(&((const gitem_t *)a)->key, &((const gitem_t *)b)->key);
}

typedef struct acc_state {
    bson_value_t val;
    bool have;
    double dsum;
    int64_t isum;
    bool sum_double, sum_long, overflow;
    int64_t count;
    bson_t *arr; /* heap: bson_t needs an alignment that malloc'd arrays do not give */
    uint32_t arr_n;
} acc_state_t;

static void acc_add(const acc_spec_t *a, acc_state_t *st, const bson_value_t *v, bool missing)
{
    const char *op = a->op;
    if (strcmp(op, "$sum") == 0 || strcmp(op, "$avg") == 0) {
        if (missing || !is_number(v->value_type)) {
            return;
        }
        st->count++;
        st->dsum += as_double(v);
        if (v->value_type == BSON_TYPE_DOUBLE || v->value_type == BSON_TYPE_DECIMAL128) {
            st->sum_double = true;
        } else {
            int64_t x = v->value_type == BSON_TYPE_INT32 ? v->value.v_int32 : v->value.v_int64;
            st->sum_long |= v->value_type == BSON_TYPE_INT64;
            st->overflow |= __builtin_add_overflow(st->isum, x, &st->isum);
        }
    } else if (strcmp(op, "$min") == 0 || strcmp(op, "$max") == 0) {
        if (missing || v->value_type == BSON_TYPE_NULL || v->value_type == BSON_TYPE_UNDEFINED) {
            return;
        }
        int c = st->have ? mc_bson_value_compare(v, &st->val) : 0;
        if (!st->have || (op[2] == 'i' ? c < 0 : c > 0)) {
            if (st->have) {
                bson_value_destroy(&st->val);
            }
            bson_value_copy(v, &st->val);
            st->have = true;
        }
    } else if (strcmp(op, "$first") == 0 || strcmp(op, "$last") == 0) {
        if (st->have && op[1] == 'f') {
            return;
        }
        if (st->have) {
            bson_value_destroy(&st->val);
        }
        if (missing) {
            value_null(&st->val);
        } else {
            bson_value_copy(v, &st->val);
        }
        st->have = true;
    } else { /* $push, $addToSet */
        if (missing) {
            return;
        }
        if (op[1] == 'a') {
            bson_iter_t it;
            bson_iter_init(&it, st->arr);
            while (bson_iter_next(&it)) {
                if (mc_bson_value_compare(bson_iter_value(&it), v) == 0) {
                    return;
                }
            }
        }
        char key[16];
        const char *k;
        bson_uint32_to_string(st->arr_n++, &k, key, sizeof(key));
        bson_append_value(st->arr, k, -1, v);
    }
}

static void acc_finish(const acc_spec_t *a, acc_state_t *st, bson_t *out)
{
    const char *op = a->op;
    if (strcmp(op, "$sum") == 0) {
        if (st->sum_double || st->overflow) {
            bson_append_double(out, a->field, -1, st->dsum);
        } else if (st->sum_long || st->isum > INT32_MAX || st->isum < INT32_MIN) {
            bson_append_int64(out, a->field, -1, st->isum);
        } else {
            bson_append_int32(out, a->field, -1, (int32_t)st->isum);
        }
    } else if (strcmp(op, "$avg") == 0) {
        if (st->count) {
            bson_append_double(out, a->field, -1, st->dsum / (double)st->count);
        } else {
            bson_append_null(out, a->field, -1);
        }
    } else if (strcmp(op, "$push") == 0 || strcmp(op, "$addToSet") == 0) {
        bson_append_array(out, a->field, -1, st->arr);
    } else if (st->have) {
        bson_append_value(out, a->field, -1, &st->val);
    } else {
        bson_append_null(out, a->field, -1);
    }
}

static int run_group(const stage_t *s, docvec_t *in, docvec_t *out, mc_error_t *err)
{
    gitem_t *items = bson_malloc0((in->n ? in->n : 1) * sizeof(gitem_t));
    void **ptrs = bson_malloc((in->n ? in->n : 1) * sizeof(void *));
    void **tmp = bson_malloc((in->n ? in->n : 1) * sizeof(void *));
    int rc = 0;
    size_t n = 0;
    for (; n < in->n; n++) {
        items[n].doc = in->d[n];
        rc = mc_expr_eval(s->group_id, in->d[n], &items[n].key, err);
        if (rc < 0) {
            break;
        }
        if (rc == 0) {
            value_null(&items[n].key); /* a missing _id groups as null */
        }
        rc = 0;
        ptrs[n] = &items[n];
    }
    if (rc == 0) {
        merge_sort(ptrs, tmp, n, gitem_cmp, NULL);
        acc_state_t *st = bson_malloc0((s->naccs ? s->naccs : 1) * sizeof(acc_state_t));
        size_t i = 0;
        while (rc == 0 && i < n) {
            gitem_t *first = ptrs[i];
            for (size_t a = 0; a < s->naccs; a++) {
                memset(&st[a], 0, sizeof(st[a]));
                st[a].arr = bson_new();
            }
            size_t j = i;
            for (; j < n && rc == 0; j++) {
                gitem_t *g = ptrs[j];
                if (mc_bson_value_compare(&g->key, &first->key) != 0) {
                    break;
                }
                for (size_t a = 0; a < s->naccs && rc == 0; a++) {
                    bson_value_t v;
                    rc = mc_expr_eval(s->accs[a].expr, g->doc, &v, err);
                    if (rc >= 0) {
                        acc_add(&s->accs[a], &st[a], &v, rc == 0);
                        rc = 0;
                    }
                    if (v.value_type != BSON_TYPE_EOD) {
                        bson_value_destroy(&v);
                    }
                }
            }
            bson_t *d = bson_new();
            bson_append_value(d, "_id", 3, &first->key);
            for (size_t a = 0; a < s->naccs; a++) {
                acc_finish(&s->accs[a], &st[a], d);
                if (st[a].have) {
                    bson_value_destroy(&st[a].val);
                }
                bson_destroy(st[a].arr);
            }
            dv_push(out, d);
            i = j;
        }
        bson_free(st);
    }
    for (size_t i = 0; i < n; i++) {
        bson_value_destroy(&items[i].key);
    }
    bson_free(items);
    bson_free(ptrs);
    bson_free(tmp);
    return rc;
}

int emu_pipeline_run(const emu_pipeline_t *p, const bson_t *const *docs, size_t n, bson_t ***out,
                     size_t *n_out, mc_error_t *err)
{
    docvec_t cur = {0};
    *out = NULL;
    *n_out = 0;
    for (size_t i = 0; i < n; i++) {
        dv_push(&cur, bson_copy(docs[i]));
    }
    for (size_t si = 0; si < p->n; si++) {
        const stage_t *s = &p->stages[si];
        docvec_t next = {0};
        int rc = 0;
        switch (s->kind) {
        case S_SORT: {
            void **tmp = bson_malloc((cur.n ? cur.n : 1) * sizeof(void *));
            merge_sort((void **)cur.d, tmp, cur.n, doc_sort_cmp, s->sort);
            bson_free(tmp);
            continue;
        }
        case S_SKIP:
        case S_LIMIT: {
            size_t lo =
                s->kind == S_SKIP ? (size_t)(s->num < (int64_t)cur.n ? s->num : (int64_t)cur.n) : 0;
            size_t hi = s->kind == S_LIMIT
                            ? (size_t)(s->num < (int64_t)cur.n ? s->num : (int64_t)cur.n)
                            : cur.n;
            for (size_t i = 0; i < cur.n; i++) {
                if (i >= lo && i < hi) {
                    dv_push(&next, cur.d[i]);
                } else {
                    bson_destroy(cur.d[i]);
                }
            }
            bson_free(cur.d);
            cur = next;
            continue;
        }
        case S_GROUP: rc = run_group(s, &cur, &next, err); break;
        case S_COUNT:
            if (cur.n) {
                bson_t *d = bson_new();
                if (cur.n > INT32_MAX) {
                    bson_append_int64(d, s->count_field, -1, (int64_t)cur.n);
                } else {
                    bson_append_int32(d, s->count_field, -1, (int32_t)cur.n);
                }
                dv_push(&next, d);
            }
            break;
        case S_DOC:
            for (size_t i = 0; i < cur.n && rc == 0; i++) {
                bson_t o;
                int r = mc_pipeline_apply(s->doc, cur.d[i], &o, err);
                if (r == 1) {
                    dv_push(&next, bson_copy(&o));
                }
                bson_destroy(&o);
                rc = r < 0 ? r : 0;
            }
            break;
        }
        dv_free(&cur);
        cur = next;
        if (rc < 0) {
            dv_free(&cur);
            return rc;
        }
    }
    *out = cur.d;
    *n_out = cur.n;
    if (!*out) {
        *out = bson_malloc0(sizeof(bson_t *));
    }
    return 0;
}

/* ---------------------------------------------------------------- find projections */

int emu_projection_check(const bson_t *projection, mc_error_t *err)
{
    if (!projection) {
        return 0;
    }
    mc_projection_t *p = mc_projection_new(projection, MC_PROJECTION_FIND, NULL, err);
    if (!p) {
        return MC_EINVAL;
    }
    mc_projection_destroy(p);
    return 0;
}

int emu_projection_apply(const bson_t *projection, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    if (!projection || bson_empty(projection)) {
        bson_copy_to(doc, out);
        return 0;
    }
    mc_projection_t *p = mc_projection_new(projection, MC_PROJECTION_FIND, NULL, err);
    if (!p) {
        bson_init(out);
        return MC_EINVAL;
    }
    int rc = mc_projection_apply(p, doc, out, err);
    mc_projection_destroy(p);
    return rc < 0 ? MC_EINVAL : 0;
}
