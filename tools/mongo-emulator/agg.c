/*
 * agg.c: aggregation pipelines, aggregation expressions, find projections and sort order for
 * mongo-emulator (aggregate, find, change-stream stages after $changeStream, and pipeline-style
 * updates through update.c).
 *
 * Threads: any; a compiled pipeline is immutable, results are fresh documents.
 *
 * Supported stages: $match (mc_filter), $project, $addFields/$set, $unset, $replaceRoot,
 * $replaceWith (per document) and $sort, $skip, $limit, $group, $count (whole set).
 * Expressions: "$path" (through arrays, collecting values as MongoDB does), "$$ROOT",
 * "$$CURRENT", "$$REMOVE", literals (documents and arrays are evaluated element by element),
 * {$literal}, $concat, $add, $subtract, $multiply, $divide, $eq, $ne, $gt, $gte, $lt, $lte,
 * $cmp, $and, $or, $not, $cond, $ifNull, $toString. Anything else fails with code 168
 * (InvalidPipelineOperator, "Unrecognized expression '$x'").
 * Accumulators ($group): $sum $avg $min $max $first $last $push $addToSet.
 * Projections: inclusion or exclusion (mixing fails with 31253/31254), _id included unless
 * _id: 0, dotted paths and sub-documents, through arrays (inclusion drops non-document array
 * elements, as MongoDB does), computed fields in inclusion projections (appended after the
 * included fields, like MongoDB). Find projections' $slice, $elemMatch and positional "$" are
 * not supported (code 2).
 * $group emits its groups ordered by _id (MongoDB's order is unspecified).
 *
 * Invariants: every document built here is finished (no open sub-document) before it is
 * returned; expression values are owned copies (bson_value_destroy); recursion over user
 * documents is bounded by the depth of the projection/expression spec, not of the data.
 */
#include "agg.h"

#include "bson_helpers.h"

#include "mongocast/filter.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SPEC_DEPTH 100
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

static bool truthy(const bson_value_t *v, bool missing)
{
    if (missing) {
        return false;
    }
    switch (v->value_type) {
    case BSON_TYPE_BOOL: return v->value.v_bool;
    case BSON_TYPE_NULL:
    case BSON_TYPE_UNDEFINED:
    case BSON_TYPE_EOD: return false;
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_DECIMAL128: return as_double(v) != 0.0;
    default: return true;
    }
}

/* Makes an owned document/array value from a finished bson_t (consumes nothing). */
static void value_from_bson(const bson_t *b, bson_type_t type, bson_value_t *out)
{
    memset(out, 0, sizeof(*out));
    out->value_type = type;
    out->value.v_doc.data_len = b->len;
    out->value.v_doc.data = bson_malloc(b->len);
    memcpy(out->value.v_doc.data, bson_get_data(b), b->len);
}

static void value_null(bson_value_t *out)
{
    memset(out, 0, sizeof(*out));
    out->value_type = BSON_TYPE_NULL;
}

static void value_clear(bson_value_t *v)
{
    bson_value_destroy(v);
    value_null(v);
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

/* Aggregation field path semantics: through an array, the path is applied to each element and
 * the results (missing ones dropped, non-documents dropped) form an array. */
static bool expr_path_get(const bson_value_t *v, const path_t *p, size_t ci, bson_value_t *out)
{
    if (ci == p->n) {
        bson_value_copy(v, out);
        return true;
    }
    if (v->value_type == BSON_TYPE_DOCUMENT) {
        bson_iter_t it;
        if (!doc_find(v->value.v_doc.data, v->value.v_doc.data_len, p->comp[ci], &it)) {
            return false;
        }
        return expr_path_get(bson_iter_value(&it), p, ci + 1, out);
    }
    if (v->value_type == BSON_TYPE_ARRAY) {
        bson_t arr = BSON_INITIALIZER;
        bson_iter_t it;
        uint32_t i = 0;
        if (emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            while (bson_iter_next(&it)) {
                const bson_value_t *e = bson_iter_value(&it);
                bson_value_t r;
                if ((e->value_type == BSON_TYPE_DOCUMENT || e->value_type == BSON_TYPE_ARRAY) &&
                    expr_path_get(e, p, ci, &r)) {
                    char key[16];
                    const char *k;
                    bson_uint32_to_string(i++, &k, key, sizeof(key));
                    bson_append_value(&arr, k, -1, &r);
                    bson_value_destroy(&r);
                }
            }
        }
        value_from_bson(&arr, BSON_TYPE_ARRAY, out);
        bson_destroy(&arr);
        return true;
    }
    return false;
}

/* ---------------------------------------------------------------- expressions */

typedef struct ectx {
    const bson_value_t *root;
    mc_error_t *err;
    int depth;
} ectx_t;

static int eval(ectx_t *c, const bson_value_t *e, bson_value_t *out, bool *missing);

/* Evaluates the operands of an operator: an array gives its elements, anything else one. */
static int eval_args(ectx_t *c, const bson_value_t *arg, bson_value_t *vals, bool *miss, size_t max,
                     size_t *n)
{
    *n = 0;
    if (arg->value_type != BSON_TYPE_ARRAY) {
        int rc = eval(c, arg, &vals[0], &miss[0]);
        if (rc == 0) {
            *n = 1;
        }
        return rc;
    }
    bson_iter_t it;
    if (!emu_safe_iter_init(&it, arg->value.v_doc.data, arg->value.v_doc.data_len)) {
        return fail(c->err, 2, "malformed expression arguments");
    }
    while (bson_iter_next(&it)) {
        if (*n == max) {
            for (size_t i = 0; i < *n; i++) {
                bson_value_destroy(&vals[i]);
            }
            *n = 0;
            return fail(c->err, 16020, "Expression has too many arguments (max %zu)", max);
        }
        int rc = eval(c, bson_iter_value(&it), &vals[*n], &miss[*n]);
        if (rc < 0) {
            for (size_t i = 0; i < *n; i++) {
                bson_value_destroy(&vals[i]);
            }
            *n = 0;
            return rc;
        }
        (*n)++;
    }
    return 0;
}

static void free_args(bson_value_t *vals, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        bson_value_destroy(&vals[i]);
    }
}

#define MAX_ARGS 64

static bool nullish(const bson_value_t *v, bool missing)
{
    return missing || v->value_type == BSON_TYPE_NULL || v->value_type == BSON_TYPE_UNDEFINED;
}

static void set_number(bson_value_t *out, bool use_double, bool use_long, bool overflow, double d,
                       int64_t i)
{
    if (use_double || overflow) {
        out->value_type = BSON_TYPE_DOUBLE;
        out->value.v_double = d;
    } else if (use_long || i > INT32_MAX || i < INT32_MIN) {
        out->value_type = BSON_TYPE_INT64;
        out->value.v_int64 = i;
    } else {
        out->value_type = BSON_TYPE_INT32;
        out->value.v_int32 = (int32_t)i;
    }
}

static int64_t as_int64(const bson_value_t *v)
{
    return v->value_type == BSON_TYPE_INT32   ? v->value.v_int32
           : v->value_type == BSON_TYPE_INT64 ? v->value.v_int64
                                              : (int64_t)as_double(v);
}

/* $add, $subtract, $multiply, $divide: null or missing operands give null; int32 results
 * widen to int64 and then to double on overflow; dates: date + ms, date - ms, date - date. */
static int arith(ectx_t *c, const char *op, bson_value_t *vals, bool *miss, size_t n,
                 bson_value_t *out)
{
    value_null(out);
    bool is_add = strcmp(op, "$add") == 0, is_mul = strcmp(op, "$multiply") == 0;
    bool binary = !is_add && !is_mul;
    if (binary && n != 2) {
        return fail(c->err, 16020, "Expression %s takes exactly 2 arguments. %zu were passed in.",
                    op, n);
    }
    for (size_t i = 0; i < n; i++) {
        if (nullish(&vals[i], miss[i])) {
            return 0;
        }
    }
    int code = is_add ? 16554 : (is_mul ? 16555 : (op[1] == 's' ? 16556 : 16609));
    bool use_double = false, use_long = false, overflow = false;
    int n_dates = 0;
    for (size_t i = 0; i < n; i++) {
        bson_type_t t = vals[i].value_type;
        if (t == BSON_TYPE_DATE_TIME &&
            (is_add || (op[1] == 's' && i == 0) || (op[1] == 's' && i == 1 && n_dates == 1))) {
            n_dates++;
            continue;
        }
        if (!is_number(t)) {
            return fail(c->err, code, "%s only supports numeric%s types, not %s", op,
                        is_add || op[1] == 's' ? " or date" : "",
                        t == BSON_TYPE_UTF8 ? "string" : "this type");
        }
        use_double |= t == BSON_TYPE_DOUBLE || t == BSON_TYPE_DECIMAL128;
        use_long |= t == BSON_TYPE_INT64;
    }
    if (is_add && n_dates > 1) {
        return fail(c->err, 16612, "only one date allowed in an $add expression");
    }
    if (strcmp(op, "$divide") == 0) {
        double d = as_double(&vals[1]);
        if (d == 0) {
            return fail(c->err, 2, "can't $divide by zero");
        }
        out->value_type = BSON_TYPE_DOUBLE;
        out->value.v_double = as_double(&vals[0]) / d;
        return 0;
    }
    if (!is_add && !is_mul) { /* $subtract */
        if (n_dates == 2) {
            out->value_type = BSON_TYPE_INT64;
            out->value.v_int64 = vals[0].value.v_datetime - vals[1].value.v_datetime;
        } else if (n_dates == 1) {
            out->value_type = BSON_TYPE_DATE_TIME;
            out->value.v_datetime =
                vals[0].value.v_datetime - (int64_t)llround(as_double(&vals[1]));
        } else {
            int64_t r;
            overflow = __builtin_sub_overflow(as_int64(&vals[0]), as_int64(&vals[1]), &r);
            set_number(out, use_double, use_long, overflow,
                       as_double(&vals[0]) - as_double(&vals[1]), r);
        }
        return 0;
    }
    double dacc = is_mul ? 1 : 0;
    int64_t iacc = is_mul ? 1 : 0, date = 0;
    for (size_t i = 0; i < n; i++) {
        if (vals[i].value_type == BSON_TYPE_DATE_TIME) {
            date = vals[i].value.v_datetime;
            continue;
        }
        if (is_mul) {
            dacc *= as_double(&vals[i]);
            overflow |= __builtin_mul_overflow(iacc, as_int64(&vals[i]), &iacc);
        } else {
            dacc += as_double(&vals[i]);
            overflow |= __builtin_add_overflow(iacc, as_int64(&vals[i]), &iacc);
        }
    }
    if (n_dates) {
        out->value_type = BSON_TYPE_DATE_TIME;
        out->value.v_datetime = date + (int64_t)llround(dacc);
        return 0;
    }
    set_number(out, use_double, use_long, overflow, dacc, iacc);
    return 0;
}

static void set_string(bson_value_t *out, const char *s, size_t len)
{
    memset(out, 0, sizeof(*out));
    out->value_type = BSON_TYPE_UTF8;
    out->value.v_utf8.str = bson_malloc(len + 1);
    memcpy(out->value.v_utf8.str, s, len);
    out->value.v_utf8.str[len] = '\0';
    out->value.v_utf8.len = (uint32_t)len;
}

static int to_string(ectx_t *c, const bson_value_t *v, bool missing, bson_value_t *out)
{
    char buf[64];
    if (nullish(v, missing)) {
        value_null(out);
        return 0;
    }
    switch (v->value_type) {
    case BSON_TYPE_UTF8: bson_value_copy(v, out); return 0;
    case BSON_TYPE_INT32: snprintf(buf, sizeof(buf), "%" PRId32, v->value.v_int32); break;
    case BSON_TYPE_INT64: snprintf(buf, sizeof(buf), "%" PRId64, v->value.v_int64); break;
    case BSON_TYPE_DOUBLE: snprintf(buf, sizeof(buf), "%.17g", v->value.v_double); break;
    case BSON_TYPE_DECIMAL128: bson_decimal128_to_string(&v->value.v_decimal128, buf); break;
    case BSON_TYPE_BOOL:
        snprintf(buf, sizeof(buf), "%s", v->value.v_bool ? "true" : "false");
        break;
    case BSON_TYPE_OID: bson_oid_to_string(&v->value.v_oid, buf); break;
    case BSON_TYPE_DATE_TIME: {
        int64_t ms = v->value.v_datetime;
        time_t secs = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
        struct tm tm;
        gmtime_r(&secs, &tm);
        size_t k = strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf + k, sizeof(buf) - k, ".%03dZ", (int)(((ms % 1000) + 1000) % 1000));
        break;
    }
    default:
        return fail(c->err, 241,
                    "Unsupported conversion to string in $convert with no onError "
                    "value");
    }
    /* MongoDB prints integral doubles without an exponent or fraction ("2", not "2.0"). */
    set_string(out, buf, strlen(buf));
    return 0;
}

static int eval_operator(ectx_t *c, const char *op, const bson_value_t *arg, bson_value_t *out,
                         bool *missing)
{
    bson_value_t vals[MAX_ARGS];
    bool miss[MAX_ARGS];
    size_t n = 0;
    int rc;
    *missing = false;
    value_null(out);
    if (strcmp(op, "$literal") == 0) {
        bson_value_copy(arg, out);
        return 0;
    }
    if (strcmp(op, "$cond") == 0) {
        const bson_value_t *parts[3] = {NULL, NULL, NULL};
        bson_iter_t it;
        bson_value_t copies[3];
        if (arg->value_type == BSON_TYPE_ARRAY || arg->value_type == BSON_TYPE_DOCUMENT) {
            size_t i = 0;
            emu_safe_iter_init(&it, arg->value.v_doc.data, arg->value.v_doc.data_len);
            while (bson_iter_next(&it)) {
                int slot = -1;
                if (arg->value_type == BSON_TYPE_ARRAY) {
                    slot = i < 3 ? (int)i : -1;
                    i++;
                } else {
                    const char *k = bson_iter_key(&it);
                    slot = strcmp(k, "if") == 0     ? 0
                           : strcmp(k, "then") == 0 ? 1
                           : strcmp(k, "else") == 0 ? 2
                                                    : -1;
                    if (slot < 0) {
                        return fail(c->err, 17083, "Unrecognized parameter to $cond: %s", k);
                    }
                }
                if (slot < 0) {
                    return fail(c->err, 16020, "Expression $cond takes exactly 3 arguments.");
                }
                copies[slot] = *bson_iter_value(&it);
                parts[slot] = &copies[slot];
            }
        }
        if (!parts[0] || !parts[1] || !parts[2]) {
            return fail(c->err, 17080, "Missing 'if', 'then' or 'else' parameter to $cond");
        }
        bson_value_t cond;
        bool cm;
        if ((rc = eval(c, parts[0], &cond, &cm)) < 0) {
            return rc;
        }
        bool t = truthy(&cond, cm);
        bson_value_destroy(&cond);
        return eval(c, parts[t ? 1 : 2], out, missing);
    }
    if ((rc = eval_args(c, arg, vals, miss, MAX_ARGS, &n)) < 0) {
        return rc;
    }
    if (strcmp(op, "$concat") == 0) {
        size_t total = 0;
        for (size_t i = 0; i < n; i++) {
            if (nullish(&vals[i], miss[i])) {
                free_args(vals, n);
                return 0;
            }
            if (vals[i].value_type != BSON_TYPE_UTF8) {
                free_args(vals, n);
                return fail(c->err, 16702, "$concat only supports strings, not %s",
                            is_number(vals[i].value_type) ? "number" : "this type");
            }
            total += vals[i].value.v_utf8.len;
        }
        char *s = bson_malloc(total + 1);
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            memcpy(s + k, vals[i].value.v_utf8.str, vals[i].value.v_utf8.len);
            k += vals[i].value.v_utf8.len;
        }
        s[k] = '\0';
        out->value_type = BSON_TYPE_UTF8;
        out->value.v_utf8.str = s;
        out->value.v_utf8.len = (uint32_t)k;
    } else if (strcmp(op, "$add") == 0 || strcmp(op, "$subtract") == 0 ||
               strcmp(op, "$multiply") == 0 || strcmp(op, "$divide") == 0) {
        rc = arith(c, op, vals, miss, n, out);
    } else if (strcmp(op, "$eq") == 0 || strcmp(op, "$ne") == 0 || strcmp(op, "$gt") == 0 ||
               strcmp(op, "$gte") == 0 || strcmp(op, "$lt") == 0 || strcmp(op, "$lte") == 0 ||
               strcmp(op, "$cmp") == 0) {
        if (n != 2) {
            rc = fail(c->err, 16020, "Expression %s takes exactly 2 arguments. %zu were passed in.",
                      op, n);
        } else {
            /* Missing compares below null, as in MongoDB's Value ordering. */
            bson_value_t eod = {.value_type = BSON_TYPE_EOD};
            int cmp = mc_bson_value_compare(miss[0] ? &eod : &vals[0], miss[1] ? &eod : &vals[1]);
            if (miss[0] && miss[1]) {
                cmp = 0;
            }
            if (strcmp(op, "$cmp") == 0) {
                out->value_type = BSON_TYPE_INT32;
                out->value.v_int32 = cmp < 0 ? -1 : (cmp > 0 ? 1 : 0);
            } else {
                bool r = strcmp(op, "$eq") == 0    ? cmp == 0
                         : strcmp(op, "$ne") == 0  ? cmp != 0
                         : strcmp(op, "$gt") == 0  ? cmp > 0
                         : strcmp(op, "$gte") == 0 ? cmp >= 0
                         : strcmp(op, "$lt") == 0  ? cmp < 0
                                                   : cmp <= 0;
                out->value_type = BSON_TYPE_BOOL;
                out->value.v_bool = r;
            }
        }
    } else if (strcmp(op, "$and") == 0 || strcmp(op, "$or") == 0) {
        bool is_and = op[1] == 'a', r = is_and;
        for (size_t i = 0; i < n; i++) {
            bool t = truthy(&vals[i], miss[i]);
            if (is_and && !t) {
                r = false;
            } else if (!is_and && t) {
                r = true;
            }
        }
        out->value_type = BSON_TYPE_BOOL;
        out->value.v_bool = r;
    } else if (strcmp(op, "$not") == 0) {
        if (n != 1) {
            rc = fail(c->err, 16020,
                      "Expression $not takes exactly 1 arguments. %zu were passed "
                      "in.",
                      n);
        } else {
            out->value_type = BSON_TYPE_BOOL;
            out->value.v_bool = !truthy(&vals[0], miss[0]);
        }
    } else if (strcmp(op, "$ifNull") == 0) {
        if (n < 2) {
            rc = fail(c->err, 1257300, "$ifNull needs at least two arguments, had: %zu", n);
        } else {
            size_t pick = n - 1;
            for (size_t i = 0; i + 1 < n; i++) {
                if (!nullish(&vals[i], miss[i])) {
                    pick = i;
                    break;
                }
            }
            if (miss[pick]) {
                *missing = true;
            } else {
                bson_value_copy(&vals[pick], out);
            }
        }
    } else if (strcmp(op, "$toString") == 0) {
        if (n != 1) {
            rc = fail(c->err, 16020, "Expression $toString takes exactly 1 arguments.");
        } else {
            rc = to_string(c, &vals[0], miss[0], out);
        }
    } else {
        rc = fail(c->err, 168, "Unrecognized expression '%s'", op);
    }
    free_args(vals, n);
    return rc;
}

static int eval(ectx_t *c, const bson_value_t *e, bson_value_t *out, bool *missing)
{
    *missing = false;
    value_null(out);
    if (c->depth > MAX_SPEC_DEPTH) {
        return fail(c->err, 2, "expression nested too deeply");
    }
    if (e->value_type == BSON_TYPE_UTF8 && e->value.v_utf8.str[0] == '$') {
        const char *s = e->value.v_utf8.str;
        path_t p;
        const bson_value_t *base = c->root;
        size_t start = 0;
        int rc;
        if (s[1] == '$') {
            if ((rc = path_parse(&p, s + 2, c->err)) < 0) {
                return rc;
            }
            if (strcmp(p.comp[0], "REMOVE") == 0) {
                path_free(&p);
                *missing = true;
                return 0;
            }
            if (strcmp(p.comp[0], "ROOT") != 0 && strcmp(p.comp[0], "CURRENT") != 0) {
                rc = fail(c->err, 17276, "Use of undefined variable: %s", p.comp[0]);
                path_free(&p);
                return rc;
            }
            start = 1;
        } else if ((rc = path_parse(&p, s + 1, c->err)) < 0) {
            return rc;
        }
        *missing = !expr_path_get(base, &p, start, out);
        if (*missing) {
            value_null(out);
        }
        path_free(&p);
        return 0;
    }
    if (e->value_type == BSON_TYPE_DOCUMENT || e->value_type == BSON_TYPE_ARRAY) {
        bson_iter_t it;
        if (!emu_safe_iter_init(&it, e->value.v_doc.data, e->value.v_doc.data_len)) {
            return fail(c->err, 2, "malformed expression");
        }
        bool is_doc = e->value_type == BSON_TYPE_DOCUMENT;
        bson_iter_t first = it;
        if (is_doc && bson_iter_next(&first) && bson_iter_key(&first)[0] == '$') {
            bson_iter_t rest = first;
            if (bson_iter_next(&rest)) {
                return fail(c->err, 15983,
                            "An object representing an expression must have exactly one field");
            }
            c->depth++;
            int rc = eval_operator(c, bson_iter_key(&first), bson_iter_value(&first), out, missing);
            c->depth--;
            return rc;
        }
        bson_t b = BSON_INITIALIZER;
        uint32_t i = 0;
        c->depth++;
        while (bson_iter_next(&it)) {
            bson_value_t v;
            bool m;
            int rc = eval(c, bson_iter_value(&it), &v, &m);
            if (rc < 0) {
                bson_destroy(&b);
                c->depth--;
                return rc;
            }
            if (is_doc) {
                if (!m) {
                    bson_append_value(&b, bson_iter_key(&it), -1, &v);
                }
            } else {
                char key[16];
                const char *k;
                bson_uint32_to_string(i++, &k, key, sizeof(key));
                if (m) {
                    bson_append_null(&b, k, -1);
                } else {
                    bson_append_value(&b, k, -1, &v);
                }
            }
            bson_value_destroy(&v);
        }
        c->depth--;
        value_from_bson(&b, e->value_type, out);
        bson_destroy(&b);
        return 0;
    }
    bson_value_copy(e, out);
    return 0;
}

static int eval_doc_expr(const bson_value_t *e, const bson_t *doc, bson_value_t *out, bool *missing,
                         mc_error_t *err)
{
    bson_value_t root = {.value_type = BSON_TYPE_DOCUMENT};
    root.value.v_doc.data = (uint8_t *)bson_get_data(doc);
    root.value.v_doc.data_len = doc->len;
    ectx_t c = {.root = &root, .err = err};
    return eval(&c, e, out, missing);
}

/* ---------------------------------------------------------------- projection trees */

typedef enum pkind { PK_INCLUDE, PK_EXCLUDE, PK_COMPUTED, PK_SUB } pkind_t;

typedef struct pnode pnode_t;
struct pnode {
    char *name;
    pkind_t kind;
    bson_value_t expr; /* PK_COMPUTED: owned copy */
    pnode_t **kids;
    size_t nkids, cap;
};

typedef enum pmode { PM_INCLUSION, PM_EXCLUSION, PM_ADD } pmode_t;

typedef struct projection {
    pnode_t root; /* PK_SUB */
    pmode_t mode;
    bool exclude_id; /* inclusion projections: _id: 0 */
    bool include_id; /* exclusion projections: _id kept unless _id: 0 */
} projection_t;

static void pnode_free_kids(pnode_t *n)
{
    for (size_t i = 0; i < n->nkids; i++) {
        pnode_free_kids(n->kids[i]);
        bson_free(n->kids[i]->name);
        if (n->kids[i]->kind == PK_COMPUTED) {
            bson_value_destroy(&n->kids[i]->expr);
        }
        bson_free(n->kids[i]);
    }
    bson_free(n->kids);
    n->kids = NULL;
    n->nkids = n->cap = 0;
}

static pnode_t *pnode_child(pnode_t *n, const char *name, size_t len)
{
    for (size_t i = 0; i < n->nkids; i++) {
        if (strlen(n->kids[i]->name) == len && memcmp(n->kids[i]->name, name, len) == 0) {
            return n->kids[i];
        }
    }
    return NULL;
}

static pnode_t *pnode_add(pnode_t *n, const char *name, size_t len, pkind_t kind)
{
    if (n->nkids == n->cap) {
        n->cap = n->cap ? n->cap * 2 : 4;
        n->kids = bson_realloc(n->kids, n->cap * sizeof(pnode_t *));
    }
    pnode_t *k = bson_malloc0(sizeof(*k));
    k->name = bson_strndup(name, len);
    k->kind = kind;
    n->kids[n->nkids++] = k;
    return k;
}

/* Inserts `path` (dotted) with leaf kind; fails with code 31250 on a path collision. */
static int proj_insert(pnode_t *root, const char *path, pkind_t kind, const bson_value_t *expr,
                       mc_error_t *err)
{
    pnode_t *n = root;
    const char *p = path;
    int depth = 0;
    if (!*path) {
        return fail(err, 40352, "FieldPath cannot be constructed with empty string");
    }
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0) {
            return fail(err, 15998, "FieldPath field names may not be empty strings.");
        }
        if (p[0] == '$') {
            return fail(err, 16410, "FieldPath field names may not start with '$'.");
        }
        if (++depth > MAX_PATH_COMPONENTS) {
            return fail(err, 2, "projection path too long");
        }
        pnode_t *k = pnode_child(n, p, len);
        if (!dot) {
            if (k) {
                return fail(err, 31250, "Path collision at %s", path);
            }
            k = pnode_add(n, p, len, kind);
            if (expr) {
                bson_value_copy(expr, &k->expr);
            }
            return 0;
        }
        if (!k) {
            k = pnode_add(n, p, len, PK_SUB);
        } else if (k->kind != PK_SUB) {
            return fail(err, 31250, "Path collision at %s", path);
        }
        n = k;
        p = dot + 1;
    }
}

static bool is_expression_doc(const bson_value_t *v)
{
    bson_iter_t it;
    return v->value_type == BSON_TYPE_DOCUMENT &&
           emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
           bson_iter_next(&it) && bson_iter_key(&it)[0] == '$';
}

/* find's own projection operators ($slice, $elemMatch, $meta), or NULL. */
static const char *find_projection_operator(const bson_value_t *v)
{
    bson_iter_t it;
    if (!emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return NULL;
    }
    const char *k = bson_iter_key(&it);
    if (strcmp(k, "$slice") == 0) {
        return "$slice";
    }
    if (strcmp(k, "$elemMatch") == 0) {
        return "$elemMatch";
    }
    if (strcmp(k, "$meta") == 0) {
        return "$meta";
    }
    return NULL;
}

/* Parses a $project/find projection (mode PM_INCLUSION/PM_EXCLUSION decided here) or an
 * $addFields spec (mode PM_ADD). `prefix` is the dotted path of a nested spec document. */
static int proj_parse_fields(projection_t *pr, const bson_value_t *spec, const char *prefix,
                             bool add, bool find, int depth, int *n_incl, int *n_excl,
                             mc_error_t *err)
{
    bson_iter_t it;
    if (depth > MAX_SPEC_DEPTH) {
        return fail(err, 2, "projection nested too deeply");
    }
    if (!emu_safe_iter_init(&it, spec->value.v_doc.data, spec->value.v_doc.data_len)) {
        return fail(err, 2, "malformed projection");
    }
    while (bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        char *full = prefix ? bson_strdup_printf("%s.%s", prefix, key) : bson_strdup(key);
        int rc = 0;
        bool is_id = strcmp(full, "_id") == 0;
        if (key[0] == '$') {
            rc =
                find && (strcmp(key, "$slice") == 0 || strcmp(key, "$elemMatch") == 0)
                    ? fail(err, 2, "projection operator %s is not supported by mongo-emulator", key)
                    : fail(err, 16410,
                           "FieldPath field names may not start with '$'. "
                           "Consider using $getField or $setField.");
        } else if (find && is_expression_doc(v) && find_projection_operator(v)) {
            rc = fail(err, 2, "projection operator %s is not supported by mongo-emulator",
                      find_projection_operator(v));
        } else if (add) {
            if (v->value_type == BSON_TYPE_DOCUMENT && !is_expression_doc(v) &&
                v->value.v_doc.data_len > 5) {
                rc = proj_parse_fields(pr, v, full, add, find, depth + 1, n_incl, n_excl, err);
            } else {
                rc = proj_insert(&pr->root, full, PK_COMPUTED, v, err);
            }
        } else if (v->value_type == BSON_TYPE_DOCUMENT && !is_expression_doc(v)) {
            if (v->value.v_doc.data_len <= 5) {
                rc = fail(err, 51270,
                          "An empty sub-projection is not a valid value. Found "
                          "empty object at path");
            } else {
                rc = proj_parse_fields(pr, v, full, add, find, depth + 1, n_incl, n_excl, err);
            }
        } else if (v->value_type == BSON_TYPE_BOOL || is_number(v->value_type)) {
            bool incl = v->value_type == BSON_TYPE_BOOL ? v->value.v_bool : as_double(v) != 0;
            if (is_id) {
                pr->exclude_id = !incl;
                pr->include_id = incl;
            } else {
                (*(incl ? n_incl : n_excl))++;
                rc = proj_insert(&pr->root, full, incl ? PK_INCLUDE : PK_EXCLUDE, NULL, err);
                if (rc == 0 && *n_incl && *n_excl) {
                    rc =
                        incl
                            ? fail(err, 31253,
                                   "Cannot do inclusion on field %s in exclusion projection", full)
                            : fail(err, 31254,
                                   "Cannot do exclusion on field %s in inclusion projection", full);
                }
            }
        } else {
            if (is_id) {
                pr->include_id = false;
                pr->exclude_id = true; /* replaced by the computed value */
            }
            (*n_incl)++;
            rc = proj_insert(&pr->root, full, PK_COMPUTED, v, err);
            if (rc == 0 && *n_excl) {
                rc = fail(err, 31252,
                          "Invalid $project :: caused by :: Cannot use expression other than "
                          "$meta in exclusion projection");
            }
        }
        bson_free(full);
        if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

static int projection_parse(projection_t *pr, const bson_value_t *spec, pmode_t forced, bool find,
                            mc_error_t *err)
{
    memset(pr, 0, sizeof(*pr));
    int n_incl = 0, n_excl = 0;
    if (spec->value_type != BSON_TYPE_DOCUMENT) {
        return fail(err, 2, "projection must be an object");
    }
    int rc = proj_parse_fields(pr, spec, NULL, forced == PM_ADD, find, 0, &n_incl, &n_excl, err);
    if (rc < 0) {
        pnode_free_kids(&pr->root);
        return rc;
    }
    if (forced == PM_ADD) {
        pr->mode = PM_ADD;
    } else if (forced == PM_EXCLUSION) {
        pr->mode = PM_EXCLUSION;
    } else if (n_incl > 0) {
        pr->mode = PM_INCLUSION;
    } else if (n_excl > 0 || pr->exclude_id) {
        pr->mode = PM_EXCLUSION;
    } else if (pr->include_id) {
        pr->mode = PM_INCLUSION; /* {_id: 1} alone keeps only _id */
    } else if (!find) {
        return fail(err, 51272,
                    "Invalid $project :: caused by :: projection specification must "
                    "have at least one field");
    } else {
        pr->mode = PM_EXCLUSION; /* find with {} returns whole documents */
    }
    if (pr->mode == PM_EXCLUSION && pr->exclude_id && !pnode_child(&pr->root, "_id", 3)) {
        proj_insert(&pr->root, "_id", PK_EXCLUDE, NULL, err);
    }
    return 0;
}

static void projection_free(projection_t *pr)
{
    pnode_free_kids(&pr->root);
}

typedef struct papply {
    const bson_t *root_doc;
    mc_error_t *err;
} papply_t;

static int apply_level(papply_t *a, const pnode_t *spec, pmode_t mode, const bson_value_t *in,
                       bson_t *out, bool top, const projection_t *pr);

static int append_computed(papply_t *a, const pnode_t *k, bson_t *out)
{
    bson_value_t v;
    bool m;
    int rc = eval_doc_expr(&k->expr, a->root_doc, &v, &m, a->err);
    if (rc == 0 && !m) {
        bson_append_value(out, k->name, -1, &v);
    }
    bson_value_destroy(&v);
    return rc;
}

/* Builds the value a SUB node produces where the input has nothing usable (only computed
 * descendants create fields). Returns 1 when something was appended under `name`. */
static int build_fresh(papply_t *a, const pnode_t *k, bson_t *out)
{
    bson_t child;
    bson_append_document_begin(out, k->name, -1, &child);
    for (size_t i = 0; i < k->nkids; i++) {
        const pnode_t *g = k->kids[i];
        int rc = 0;
        if (g->kind == PK_COMPUTED) {
            rc = append_computed(a, g, &child);
        } else if (g->kind == PK_SUB) {
            rc = build_fresh(a, g, &child);
        }
        if (rc < 0) {
            bson_append_document_end(out, &child);
            return rc;
        }
    }
    bson_append_document_end(out, &child);
    return 0;
}

static bool has_computed(const pnode_t *k)
{
    if (k->kind == PK_COMPUTED) {
        return true;
    }
    for (size_t i = 0; i < k->nkids; i++) {
        if (has_computed(k->kids[i])) {
            return true;
        }
    }
    return false;
}

/* Applies a SUB node to an array value: each element is projected on its own. */
static int apply_array(papply_t *a, const pnode_t *k, pmode_t mode, const bson_value_t *arr,
                       bson_t *out)
{
    bson_t child;
    bson_iter_t it;
    uint32_t i = 0;
    bson_append_array_begin(out, k->name, -1, &child);
    if (emu_safe_iter_init(&it, arr->value.v_doc.data, arr->value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            const bson_value_t *e = bson_iter_value(&it);
            char key[16];
            const char *ks;
            bson_uint32_to_string(i, &ks, key, sizeof(key));
            if (e->value_type == BSON_TYPE_DOCUMENT) {
                bson_t sub;
                bson_append_document_begin(&child, ks, -1, &sub);
                int rc = apply_level(a, k, mode, e, &sub, false, NULL);
                bson_append_document_end(&child, &sub);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            } else if (e->value_type == BSON_TYPE_ARRAY) {
                pnode_t tmp = *k;
                tmp.name = (char *)ks;
                int rc = apply_array(a, &tmp, mode, e, &child);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            } else if (mode == PM_EXCLUSION) {
                bson_append_value(&child, ks, -1, e);
                i++;
            } else if (mode == PM_ADD || has_computed(k)) {
                /* A scalar element becomes a document of the computed fields. */
                pnode_t tmp = *k;
                tmp.name = (char *)ks;
                int rc = build_fresh(a, &tmp, &child);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            }
        }
    }
    bson_append_array_end(out, &child);
    return 0;
}

static int apply_level(papply_t *a, const pnode_t *spec, pmode_t mode, const bson_value_t *in,
                       bson_t *out, bool top, const projection_t *pr)
{
    bson_iter_t it;
    size_t nk = spec->nkids;
    bool *seen = nk ? bson_malloc0(nk * sizeof(bool)) : NULL;
    int rc = 0;
    if (top && mode == PM_INCLUSION && !pr->exclude_id) {
        /* _id comes first in inclusion projections. */
        bson_iter_t idit;
        if (doc_find(in->value.v_doc.data, in->value.v_doc.data_len, "_id", &idit) &&
            !pnode_child((pnode_t *)spec, "_id", 3)) {
            bson_append_value(out, "_id", 3, bson_iter_value(&idit));
        }
    }
    if (!emu_safe_iter_init(&it, in->value.v_doc.data, in->value.v_doc.data_len)) {
        bson_free(seen);
        return fail(a->err, 2, "malformed document");
    }
    while (rc == 0 && bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        const pnode_t *k = NULL;
        for (size_t i = 0; i < nk; i++) {
            if (strcmp(spec->kids[i]->name, key) == 0) {
                k = spec->kids[i];
                seen[i] = true;
                break;
            }
        }
        if (top && mode == PM_INCLUSION && strcmp(key, "_id") == 0 && !k) {
            continue; /* already emitted first, or excluded */
        }
        if (!k) {
            if (mode != PM_INCLUSION) {
                bson_append_value(out, key, -1, v);
            }
            continue;
        }
        switch (k->kind) {
        case PK_INCLUDE: bson_append_value(out, key, -1, v); break;
        case PK_EXCLUDE: break;
        case PK_COMPUTED:
            if (mode == PM_ADD) {
                rc = append_computed(a, k, out); /* in place, keeps the field's position */
            } else {
                if (seen) {
                    for (size_t i = 0; i < nk; i++) {
                        if (spec->kids[i] == k) {
                            seen[i] = false; /* appended after the included fields */
                        }
                    }
                }
            }
            break;
        case PK_SUB:
            if (v->value_type == BSON_TYPE_DOCUMENT) {
                bson_t child;
                bson_append_document_begin(out, key, -1, &child);
                rc = apply_level(a, k, mode, v, &child, false, pr);
                bson_append_document_end(out, &child);
            } else if (v->value_type == BSON_TYPE_ARRAY) {
                rc = apply_array(a, k, mode, v, out);
            } else if (mode == PM_EXCLUSION) {
                bson_append_value(out, key, -1, v);
            } else if (mode == PM_ADD || has_computed(k)) {
                rc = build_fresh(a, k, out);
            }
            break;
        }
    }
    for (size_t i = 0; rc == 0 && i < nk; i++) {
        const pnode_t *k = spec->kids[i];
        if (seen[i]) {
            continue;
        }
        if (k->kind == PK_COMPUTED) {
            rc = append_computed(a, k, out);
        } else if (k->kind == PK_SUB &&
                   (mode == PM_ADD || (mode == PM_INCLUSION && has_computed(k)))) {
            rc = build_fresh(a, k, out);
        }
    }
    bson_free(seen);
    return rc;
}

static int projection_apply(const projection_t *pr, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    bson_value_t in = {.value_type = BSON_TYPE_DOCUMENT};
    in.value.v_doc.data = (uint8_t *)bson_get_data(doc);
    in.value.v_doc.data_len = doc->len;
    papply_t a = {.root_doc = doc, .err = err};
    bson_init(out);
    int rc = apply_level(&a, &pr->root, pr->mode, &in, out, true, pr);
    if (rc < 0) {
        bson_reinit(out);
    }
    return rc;
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
    S_MATCH,
    S_PROJECT,
    S_ADDFIELDS,
    S_REPLACE,
    S_SORT,
    S_SKIP,
    S_LIMIT,
    S_GROUP,
    S_COUNT,
} stage_kind_t;

typedef struct acc_spec {
    char *field;
    char op[16];
    bson_value_t expr;
} acc_spec_t;

typedef struct stage {
    stage_kind_t kind;
    char name[32];
    mc_filter_t *filter;
    projection_t proj;
    bson_value_t expr; /* $replaceRoot newRoot, $group _id */
    bson_t *sort;
    int64_t num;
    char *count_field;
    acc_spec_t *accs;
    size_t naccs;
} stage_t;

struct emu_pipeline {
    stage_t *stages;
    size_t n;
};

static void stage_cleanup(stage_t *s)
{
    mc_filter_destroy(s->filter);
    projection_free(&s->proj);
    bson_value_destroy(&s->expr);
    if (s->sort) {
        bson_destroy(s->sort);
    }
    bson_free(s->count_field);
    for (size_t i = 0; i < s->naccs; i++) {
        bson_free(s->accs[i].field);
        bson_value_destroy(&s->accs[i].expr);
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
            bson_value_copy(bson_iter_value(&it), &s->expr);
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
        bson_value_copy(bson_iter_value(&acc), &a->expr);
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

static int parse_stage(stage_t *s, const bson_value_t *sv, bool per_doc, mc_error_t *err)
{
    bson_iter_t it;
    if (sv->value_type != BSON_TYPE_DOCUMENT ||
        !emu_safe_iter_init(&it, sv->value.v_doc.data, sv->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return fail(err, 40323,
                    "A pipeline stage specification object must contain exactly "
                    "one field.");
    }
    bson_iter_t more = it;
    if (bson_iter_next(&more)) {
        return fail(err, 40323,
                    "A pipeline stage specification object must contain exactly "
                    "one field.");
    }
    const char *name = bson_iter_key(&it);
    bson_value_t v = *bson_iter_value(&it);
    bson_strncpy(s->name, name, sizeof(s->name));
    bool set_level = strcmp(name, "$sort") == 0 || strcmp(name, "$skip") == 0 ||
                     strcmp(name, "$limit") == 0 || strcmp(name, "$group") == 0 ||
                     strcmp(name, "$count") == 0;
    if (set_level && per_doc) {
        return fail(err, 40324, "%s is not permitted in a $changeStream pipeline", name);
    }
    if (strcmp(name, "$match") == 0) {
        s->kind = S_MATCH;
        if (v.value_type != BSON_TYPE_DOCUMENT) {
            return fail(err, 15959, "the match filter must be an expression in an object");
        }
        bson_t q;
        bson_init_static(&q, v.value.v_doc.data, v.value.v_doc.data_len);
        s->filter = mc_filter_new(&q, NULL, err);
        if (!s->filter) {
            if (err) {
                err->domain = MC_DOMAIN_MONGODB;
                err->code = MC_EINVAL;
            }
            return MC_EINVAL;
        }
        return 0;
    }
    if (strcmp(name, "$project") == 0) {
        s->kind = S_PROJECT;
        return projection_parse(&s->proj, &v, PM_INCLUSION, false, err);
    }
    if (strcmp(name, "$addFields") == 0 || strcmp(name, "$set") == 0) {
        s->kind = S_ADDFIELDS;
        if (v.value_type != BSON_TYPE_DOCUMENT) {
            return fail(err, 40272, "%s specification stage must be an object", name);
        }
        return projection_parse(&s->proj, &v, PM_ADD, false, err);
    }
    if (strcmp(name, "$unset") == 0) {
        s->kind = S_PROJECT;
        bson_t spec = BSON_INITIALIZER;
        int rc = 0;
        if (v.value_type == BSON_TYPE_UTF8) {
            bson_append_int32(&spec, v.value.v_utf8.str, -1, 0);
        } else if (v.value_type == BSON_TYPE_ARRAY) {
            bson_iter_t a;
            emu_safe_iter_init(&a, v.value.v_doc.data, v.value.v_doc.data_len);
            while (bson_iter_next(&a)) {
                if (!BSON_ITER_HOLDS_UTF8(&a)) {
                    rc = fail(err, 31120,
                              "$unset specification must be a string or an array "
                              "containing only string values");
                    break;
                }
                bson_append_int32(&spec, bson_iter_utf8(&a, NULL), -1, 0);
            }
        } else {
            rc = fail(err, 31002, "$unset specification must be a string or an array");
        }
        if (rc == 0 && bson_count_keys(&spec) == 0) {
            rc = fail(err, 31119,
                      "$unset specification must be a string or an array with at "
                      "least one field");
        }
        if (rc == 0) {
            bson_value_t sv2 = {.value_type = BSON_TYPE_DOCUMENT};
            sv2.value.v_doc.data = (uint8_t *)bson_get_data(&spec);
            sv2.value.v_doc.data_len = spec.len;
            rc = projection_parse(&s->proj, &sv2, PM_EXCLUSION, false, err);
        }
        bson_destroy(&spec);
        return rc;
    }
    if (strcmp(name, "$replaceRoot") == 0) {
        s->kind = S_REPLACE;
        bson_iter_t r;
        if (v.value_type != BSON_TYPE_DOCUMENT ||
            !emu_safe_iter_init(&r, v.value.v_doc.data, v.value.v_doc.data_len) ||
            !bson_iter_next(&r) || strcmp(bson_iter_key(&r), "newRoot") != 0) {
            return fail(err, 40231, "no newRoot specified for the $replaceRoot stage");
        }
        bson_value_copy(bson_iter_value(&r), &s->expr);
        return 0;
    }
    if (strcmp(name, "$replaceWith") == 0) {
        s->kind = S_REPLACE;
        bson_value_copy(&v, &s->expr);
        return 0;
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
    if (strcmp(name, "$count") == 0) {
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
    return fail(err, 40324, "Unrecognized pipeline stage name: '%s'", name);
}

emu_pipeline_t *emu_pipeline_new(const bson_t *stages, bool per_document_only, mc_error_t *err)
{
    bson_iter_t it;
    if (!stages || !bson_iter_init(&it, stages)) {
        fail(err, 14, "'pipeline' option must be specified as an array");
        return NULL;
    }
    emu_pipeline_t *p = bson_malloc0(sizeof(*p));
    size_t cap = 0;
    while (bson_iter_next(&it)) {
        if (p->n == cap) {
            cap = cap ? cap * 2 : 4;
            p->stages = bson_realloc(p->stages, cap * sizeof(stage_t));
        }
        stage_t *s = &p->stages[p->n++];
        memset(s, 0, sizeof(*s));
        if (parse_stage(s, bson_iter_value(&it), per_document_only, err) < 0) {
            emu_pipeline_destroy(p);
            return NULL;
        }
    }
    return p;
}

/* Applies a per-document stage. Returns 1 (out filled), 0 (dropped) or <0. */
static int stage_apply_one(const stage_t *s, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    bson_init(out); /* always initialised, so callers can always bson_destroy(out) */
    switch (s->kind) {
    case S_MATCH:
        if (!mc_filter_match(s->filter, doc)) {
            return 0;
        }
        bson_concat(out, doc);
        return 1;
    case S_PROJECT:
    case S_ADDFIELDS: return projection_apply(&s->proj, doc, out, err) < 0 ? MC_EINVAL : 1;
    case S_REPLACE: {
        bson_value_t v;
        bool m;
        bson_init(out);
        int rc = eval_doc_expr(&s->expr, doc, &v, &m, err);
        if (rc < 0) {
            return rc;
        }
        if (m || v.value_type != BSON_TYPE_DOCUMENT) {
            bson_value_destroy(&v);
            return fail(err, 40228,
                        "'replacement document' must evaluate to an object, but "
                        "resulting value was: %s. Type of resulting value: '%s'.",
                        m ? "MISSING" : "a non-object", m ? "missing" : "non-object");
        }
        bson_t tmp;
        bson_init_static(&tmp, v.value.v_doc.data, v.value.v_doc.data_len);
        bson_concat(out, &tmp);
        bson_value_destroy(&v);
        return 1;
    }
    default: return fail(err, 40324, "%s cannot be applied to one document", s->name);
    }
}

int emu_pipeline_apply_one(const emu_pipeline_t *p, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    bson_t cur;
    bson_init(&cur);
    bson_concat(&cur, doc);
    for (size_t i = 0; i < p->n; i++) {
        bson_t next;
        int rc = stage_apply_one(&p->stages[i], &cur, &next, err);
        bson_destroy(&cur);
        if (rc <= 0) {
            bson_destroy(&next);
            bson_init(out);
            return rc;
        }
        bson_steal(&cur, &next); /* a plain struct copy would break libbson's self-pointer */
    }
    bson_init(out);
    bson_concat(out, &cur);
    bson_destroy(&cur);
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
        bool m;
        items[n].doc = in->d[n];
        rc = eval_doc_expr(&s->expr, in->d[n], &items[n].key, &m, err);
        if (rc < 0) {
            break;
        }
        if (m) {
            value_clear(&items[n].key);
        }
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
                    bool m;
                    rc = eval_doc_expr(&s->accs[a].expr, g->doc, &v, &m, err);
                    if (rc == 0) {
                        acc_add(&s->accs[a], &st[a], &v, m);
                    }
                    bson_value_destroy(&v);
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
        default:
            for (size_t i = 0; i < cur.n && rc == 0; i++) {
                bson_t o;
                int r = stage_apply_one(s, cur.d[i], &o, err);
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
    projection_t pr;
    if (!projection) {
        return 0;
    }
    bson_value_t v = {.value_type = BSON_TYPE_DOCUMENT};
    v.value.v_doc.data = (uint8_t *)bson_get_data(projection);
    v.value.v_doc.data_len = projection->len;
    int rc = projection_parse(&pr, &v, PM_INCLUSION, true, err);
    projection_free(&pr);
    return rc;
}

int emu_projection_apply(const bson_t *projection, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    projection_t pr;
    if (!projection || bson_empty(projection)) {
        bson_init(out);
        bson_concat(out, doc);
        return 0;
    }
    bson_value_t v = {.value_type = BSON_TYPE_DOCUMENT};
    v.value.v_doc.data = (uint8_t *)bson_get_data(projection);
    v.value.v_doc.data_len = projection->len;
    int rc = projection_parse(&pr, &v, PM_INCLUSION, true, err);
    if (rc < 0) {
        bson_init(out);
        projection_free(&pr);
        return rc;
    }
    rc = projection_apply(&pr, doc, out, err);
    projection_free(&pr);
    return rc;
}
