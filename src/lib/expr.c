/*
 * expr.c: MongoDB aggregation expressions (mc_expr_* and the internal mc__expr_* used by the
 * matcher's $expr and by the pipeline stages): a compiler from the BSON specification to a
 * tree of nodes, and an evaluator over one document.
 *
 * Threads: any. A compiled program is never modified after compilation; evaluation only reads
 * it and the root document.
 *
 * Design:
 *  - Compilation resolves everything that does not depend on the document: operator names (an
 *    unknown one fails with 168, as MongoDB fails at parse time), argument counts (16020),
 *    field paths split into components, variable names ($$ROOT, $$CURRENT, $$REMOVE; others
 *    fail with 17276), constants. Evaluation then never parses.
 *  - Values are views (`owned` false) into the root document or the specification whenever
 *    possible: field paths that do not cross an array, constants, comparisons and booleans
 *    allocate nothing. Strings, arrays and documents that evaluation builds are owned.
 *  - Missing is BSON_TYPE_EOD. It ranks with undefined below null in comparisons, as in
 *    MongoDB's Value ordering: {$lte: ["$missing", 5]} is true, {$eq: ["$missing", null]}
 *    is false, two missing values are equal. Arithmetic and $concat treat missing like null
 *    (the result is null); array literals turn a missing element into null; document literals
 *    omit a missing field.
 *  - $and, $or, $cond and $ifNull evaluate lazily, so an operand that would fail is not
 *    evaluated when the result is already known (MongoDB short-circuits the same way).
 *  - Arithmetic: int32 results widen to int64 and then to double on overflow; decimal128
 *    operands are computed as doubles (MongoDB would keep decimal128: a known difference).
 *    Dates: date + number, date - number, date - date (milliseconds).
 *
 * Invariants: evaluation recursion is bounded by the compiled depth (max_depth) plus the
 * number of components of a field path; every owned value is released exactly once; every
 * built value respects max_value bytes.
 */
#include "expr_private.h"

#include "bson_util.h"

#include "mongocast/filter.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_PATH_COMPONENTS 128

typedef enum xop {
    X_CONST,
    X_PATH, /* a field path from the root ($a.b, $$ROOT.a.b, $$CURRENT) */
    X_REMOVE,
    X_OBJECT,
    X_ARRAY,
    X_CONCAT,
    X_ADD,
    X_SUBTRACT,
    X_MULTIPLY,
    X_DIVIDE,
    X_MOD,
    X_ABS,
    X_CEIL,
    X_FLOOR,
    X_TRUNC,
    X_EQ,
    X_NE,
    X_GT,
    X_GTE,
    X_LT,
    X_LTE,
    X_CMP,
    X_AND,
    X_OR,
    X_NOT,
    X_COND,
    X_IFNULL,
    X_IN,
    X_SIZE,
    X_ISARRAY,
    X_TYPE,
    X_TOSTRING,
} xop_t;

struct mc__xnode {
    xop_t op;
    const char *name; /* the operator as written, for error messages */
    mc__xnode_t **kids;
    size_t nkids;
    const char **keys;  /* X_OBJECT: field names, borrowed from the specification */
    bson_value_t cval;  /* X_CONST: a view into the specification */
    char *path;         /* X_PATH: components separated by '\0' (owned) */
    const char **comp;  /* X_PATH: components */
    uint32_t *comp_len; /* X_PATH */
    size_t ncomp;       /* X_PATH: 0 for $$ROOT itself */
};

static const struct {
    const char *name;
    xop_t op;
    int min, max; /* argument count; max -1: any */
} op_table[] = {
    {"$concat", X_CONCAT, 0, -1},
    {"$add", X_ADD, 0, -1},
    {"$subtract", X_SUBTRACT, 2, 2},
    {"$multiply", X_MULTIPLY, 0, -1},
    {"$divide", X_DIVIDE, 2, 2},
    {"$mod", X_MOD, 2, 2},
    {"$abs", X_ABS, 1, 1},
    {"$ceil", X_CEIL, 1, 1},
    {"$floor", X_FLOOR, 1, 1},
    {"$trunc", X_TRUNC, 1, 1},
    {"$eq", X_EQ, 2, 2},
    {"$ne", X_NE, 2, 2},
    {"$gt", X_GT, 2, 2},
    {"$gte", X_GTE, 2, 2},
    {"$lt", X_LT, 2, 2},
    {"$lte", X_LTE, 2, 2},
    {"$cmp", X_CMP, 2, 2},
    {"$and", X_AND, 0, -1},
    {"$or", X_OR, 0, -1},
    {"$not", X_NOT, 1, 1},
    {"$cond", X_COND, 3, 3},
    {"$ifNull", X_IFNULL, 2, -1},
    {"$in", X_IN, 2, 2},
    {"$size", X_SIZE, 1, 1},
    {"$isArray", X_ISARRAY, 1, 1},
    {"$type", X_TYPE, 1, 1},
    {"$toString", X_TOSTRING, 1, 1},
};

int mc__expr_fail(mc_error_t *err, int cause, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, MC_EINVAL, MC_DOMAIN_MONGODB, cause, fmt, ap);
    va_end(ap);
    return MC_EINVAL;
}

static int too_large(mc_error_t *err, const char *what)
{
    return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 10334,
                        "%s would exceed the maximum value size", what);
}

/* ---------------------------------------------------------------- values */

static void xv_missing(mc__xval_t *x)
{
    memset(x, 0, sizeof(*x));
    x->v.value_type = BSON_TYPE_EOD;
}

static void xv_view(mc__xval_t *x, const bson_value_t *v)
{
    x->v = *v;
    x->owned = false;
}

/* Moves `from` (possibly owned) into `to`; `from` becomes a view of the same value. */
static void xv_move(mc__xval_t *to, mc__xval_t *from)
{
    *to = *from;
    from->owned = false;
}

static void xv_null(mc__xval_t *x)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_NULL;
}

static void xv_bool(mc__xval_t *x, bool b)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_BOOL;
    x->v.value.v_bool = b;
}

static void xv_int32(mc__xval_t *x, int32_t i)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_INT32;
    x->v.value.v_int32 = i;
}

static void xv_double(mc__xval_t *x, double d)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_DOUBLE;
    x->v.value.v_double = d;
}

/* Takes the buffer of a finished bson_t (document or array) as an owned value. */
static void xv_take_bson(mc__xval_t *x, bson_t *b, bson_type_t type)
{
    uint32_t len = 0;
    xv_missing(x);
    x->v.value_type = type;
    x->v.value.v_doc.data = bson_destroy_with_steal(b, true, &len);
    x->v.value.v_doc.data_len = len;
    x->owned = true;
}

/* A view of a string that lives as long as the program (a type name). */
static void xv_static_string(mc__xval_t *x, const char *s)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_UTF8;
    x->v.value.v_utf8.str = (char *)s;
    x->v.value.v_utf8.len = (uint32_t)strlen(s);
}

/* Takes `s` (allocated with bson_malloc, as bson_value_destroy expects) as an owned string. */
static void xv_take_string(mc__xval_t *x, char *s, size_t len)
{
    xv_missing(x);
    x->v.value_type = BSON_TYPE_UTF8;
    x->v.value.v_utf8.str = s;
    x->v.value.v_utf8.len = (uint32_t)len;
    x->owned = true;
}

void mc__xval_release(mc__xval_t *x)
{
    if (x->owned) {
        bson_value_destroy(&x->v);
    }
    xv_missing(x);
}

static bool is_missing(const mc__xval_t *x)
{
    return x->v.value_type == BSON_TYPE_EOD;
}

static bool nullish(const mc__xval_t *x)
{
    bson_type_t t = x->v.value_type;
    return t == BSON_TYPE_EOD || t == BSON_TYPE_NULL || t == BSON_TYPE_UNDEFINED;
}

bool mc__xval_truthy(const mc__xval_t *x)
{
    switch (x->v.value_type) {
    case BSON_TYPE_BOOL: return x->v.value.v_bool;
    case BSON_TYPE_NULL:
    case BSON_TYPE_UNDEFINED:
    case BSON_TYPE_EOD: return false;
    case BSON_TYPE_INT32: return x->v.value.v_int32 != 0;
    case BSON_TYPE_INT64: return x->v.value.v_int64 != 0;
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_DECIMAL128: return mc__bson_value_as_double(&x->v) != 0.0; /* NaN is true */
    default: return true;
    }
}

static const char *type_name(const mc__xval_t *x)
{
    return mc_bson_type_name(x->v.value_type);
}

/* ---------------------------------------------------------------- compilation */

void mc__xprog_init(mc__xprog_t *prog, const mc_expr_opts_t *opts)
{
    memset(prog, 0, sizeof(*prog));
    prog->max_depth = opts && opts->max_depth > 0 ? opts->max_depth : MC__EXPR_DEFAULT_MAX_DEPTH;
    prog->max_nodes = opts && opts->max_nodes ? opts->max_nodes : MC__EXPR_DEFAULT_MAX_NODES;
    prog->max_value =
        opts && opts->max_value_bytes ? opts->max_value_bytes : MC__EXPR_DEFAULT_MAX_VALUE;
}

static void node_free(mc__xnode_t *n)
{
    free(n->kids);
    free(n->keys);
    free(n->path);
    free(n->comp);
    free(n->comp_len);
    free(n);
}

void mc__xprog_free(mc__xprog_t *prog)
{
    for (size_t i = 0; i < prog->n; i++) {
        node_free(prog->nodes[i]);
    }
    free(prog->nodes);
    prog->nodes = NULL;
    prog->n = prog->cap = 0;
}

static int oom(mc_error_t *err)
{
    return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
}

static int node_new(mc__xprog_t *prog, xop_t op, mc__xnode_t **out, mc_error_t *err)
{
    if (prog->n >= prog->max_nodes) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 2,
                            "expression has more than %zu operators and operands", prog->max_nodes);
    }
    if (prog->n == prog->cap) {
        size_t cap = prog->cap ? prog->cap * 2 : 8;
        mc__xnode_t **nodes = realloc(prog->nodes, cap * sizeof(*nodes));
        if (!nodes) {
            return oom(err);
        }
        prog->nodes = nodes;
        prog->cap = cap;
    }
    mc__xnode_t *n = calloc(1, sizeof(*n));
    if (!n) {
        return oom(err);
    }
    n->op = op;
    prog->nodes[prog->n++] = n;
    *out = n;
    return 0;
}

bool mc__expr_is_operator_doc(const bson_value_t *v)
{
    bson_iter_t it;
    return v->value_type == BSON_TYPE_DOCUMENT &&
           mc__bson_iter_init_safe(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
           bson_iter_next(&it) && bson_iter_key(&it)[0] == '$';
}

/* Splits "a.b.c" into components; `what` is the text as written, for messages. */
static int compile_path(mc__xnode_t *n, const char *s, const char *what, mc_error_t *err)
{
    size_t len = strlen(s);
    n->path = malloc(len + 1);
    n->comp = calloc(MAX_PATH_COMPONENTS, sizeof(*n->comp));
    n->comp_len = calloc(MAX_PATH_COMPONENTS, sizeof(*n->comp_len));
    if (!n->path || !n->comp || !n->comp_len) {
        return oom(err);
    }
    memcpy(n->path, s, len + 1);
    char *c = n->path;
    for (;;) {
        if (n->ncomp == MAX_PATH_COMPONENTS) {
            return mc__expr_fail(err, 2, "field path '%s' has too many components", what);
        }
        char *dot = strchr(c, '.');
        if (dot) {
            *dot = '\0';
        }
        if (!*c) {
            return mc__expr_fail(err, 15998, "FieldPath field names may not be empty strings.");
        }
        n->comp[n->ncomp] = c;
        n->comp_len[n->ncomp] = (uint32_t)strlen(c);
        n->ncomp++;
        if (!dot) {
            return 0;
        }
        c = dot + 1;
    }
}

static int compile_string_ref(mc__xprog_t *prog, const bson_value_t *spec, mc__xnode_t **out,
                              mc_error_t *err)
{
    const char *s = spec->value.v_utf8.str;
    mc__xnode_t *n;
    if (s[1] != '$') {
        if (!s[1]) {
            return mc__expr_fail(err, 16872, "'$' by itself is not a valid FieldPath");
        }
        int nrc = node_new(prog, X_PATH, &n, err);
        if (nrc < 0) {
            return nrc;
        }
        *out = n;
        return compile_path(n, s + 1, s, err);
    }
    /* "$$NAME" or "$$NAME.sub.path" */
    const char *name = s + 2;
    size_t nlen = strcspn(name, ".");
    if (nlen == 0) {
        return mc__expr_fail(err, 16869, "empty variable names are not allowed");
    }
    bool root = (nlen == 4 && memcmp(name, "ROOT", 4) == 0) ||
                (nlen == 7 && memcmp(name, "CURRENT", 7) == 0);
    bool remove = nlen == 6 && memcmp(name, "REMOVE", 6) == 0;
    if (!root && !remove) {
        return mc__expr_fail(err, 17276, "Use of undefined variable: %.*s", (int)nlen, name);
    }
    int nrc = node_new(prog, remove ? X_REMOVE : X_PATH, &n, err);
    if (nrc < 0) {
        return nrc;
    }
    *out = n;
    if (remove || !name[nlen]) {
        return 0;
    }
    return compile_path(n, name + nlen + 1, s, err);
}

static int compile_any(mc__xprog_t *prog, const bson_value_t *spec, int depth, mc__xnode_t **out,
                       mc_error_t *err);

static int add_kid(mc__xnode_t *n, size_t *cap, mc__xnode_t *kid, const char *key, mc_error_t *err)
{
    if (n->nkids == *cap) {
        size_t ncap = *cap ? *cap * 2 : 4;
        mc__xnode_t **kids = realloc(n->kids, ncap * sizeof(*kids));
        if (!kids) {
            return oom(err);
        }
        n->kids = kids;
        if (n->op == X_OBJECT) {
            const char **keys = realloc(n->keys, ncap * sizeof(*keys));
            if (!keys) {
                return oom(err);
            }
            n->keys = keys;
        }
        *cap = ncap;
    }
    if (n->op == X_OBJECT) {
        n->keys[n->nkids] = key;
    }
    n->kids[n->nkids++] = kid;
    return 0;
}

/* The operands of an operator: the elements of an array literal, or one expression. */
static int compile_args(mc__xprog_t *prog, mc__xnode_t *n, const bson_value_t *arg, int depth,
                        mc_error_t *err)
{
    size_t cap = 0;
    mc__xnode_t *kid;
    int rc;
    if (arg->value_type != BSON_TYPE_ARRAY) {
        if ((rc = compile_any(prog, arg, depth, &kid, err)) < 0) {
            return rc;
        }
        return add_kid(n, &cap, kid, NULL, err);
    }
    bson_iter_t it;
    if (!mc__bson_iter_init_safe(&it, arg->value.v_doc.data, arg->value.v_doc.data_len)) {
        return mc__expr_fail(err, 2, "malformed expression arguments");
    }
    while (bson_iter_next(&it)) {
        if ((rc = compile_any(prog, bson_iter_value(&it), depth, &kid, err)) < 0 ||
            (rc = add_kid(n, &cap, kid, NULL, err)) < 0) {
            return rc;
        }
    }
    return 0;
}

/* {$cond: [if, then, else]} or {$cond: {if:, then:, else:}}. */
static int compile_cond(mc__xprog_t *prog, mc__xnode_t *n, const bson_value_t *arg, int depth,
                        mc_error_t *err)
{
    if (arg->value_type != BSON_TYPE_DOCUMENT) {
        return compile_args(prog, n, arg, depth, err);
    }
    const bson_value_t *parts[3] = {NULL, NULL, NULL};
    bson_value_t views[3];
    bson_iter_t it;
    if (!mc__bson_iter_init_safe(&it, arg->value.v_doc.data, arg->value.v_doc.data_len)) {
        return mc__expr_fail(err, 2, "malformed $cond");
    }
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        int slot = strcmp(k, "if") == 0     ? 0
                   : strcmp(k, "then") == 0 ? 1
                   : strcmp(k, "else") == 0 ? 2
                                            : -1;
        if (slot < 0) {
            return mc__expr_fail(err, 17083, "Unrecognized parameter to $cond: %s", k);
        }
        views[slot] = *bson_iter_value(&it);
        parts[slot] = &views[slot];
    }
    if (!parts[0] || !parts[1] || !parts[2]) {
        return mc__expr_fail(err, !parts[0] ? 17080 : (!parts[1] ? 17081 : 17082),
                             "Missing '%s' parameter to $cond",
                             !parts[0] ? "if" : (!parts[1] ? "then" : "else"));
    }
    size_t cap = 0;
    for (int i = 0; i < 3; i++) {
        mc__xnode_t *kid;
        int rc = compile_any(prog, parts[i], depth, &kid, err);
        if (rc < 0 || (rc = add_kid(n, &cap, kid, NULL, err)) < 0) {
            return rc;
        }
    }
    return 0;
}

static int compile_operator(mc__xprog_t *prog, const char *name, const bson_value_t *arg, int depth,
                            mc__xnode_t **out, mc_error_t *err)
{
    mc__xnode_t *n;
    if (strcmp(name, "$literal") == 0) {
        int nrc = node_new(prog, X_CONST, &n, err);
        if (nrc < 0) {
            return nrc;
        }
        n->cval = *arg;
        *out = n;
        return 0;
    }
    size_t k = 0, nops = sizeof(op_table) / sizeof(op_table[0]);
    while (k < nops && strcmp(op_table[k].name, name) != 0) {
        k++;
    }
    if (k == nops) {
        return mc__expr_fail(err, 168, "Unrecognized expression '%s'", name);
    }
    int nrc = node_new(prog, op_table[k].op, &n, err);
    if (nrc < 0) {
        return nrc;
    }
    n->name = op_table[k].name;
    *out = n;
    int rc = n->op == X_COND ? compile_cond(prog, n, arg, depth + 1, err)
                             : compile_args(prog, n, arg, depth + 1, err);
    if (rc < 0) {
        return rc;
    }
    int min = op_table[k].min, max = op_table[k].max;
    if (n->op == X_IFNULL && (int)n->nkids < min) {
        return mc__expr_fail(err, 1257300, "$ifNull needs at least two arguments, had: %zu",
                             n->nkids);
    }
    if ((int)n->nkids < min || (max >= 0 && (int)n->nkids > max)) {
        return mc__expr_fail(err, 16020,
                             "Expression %s takes exactly %d arguments. %zu were passed in.", name,
                             min, n->nkids);
    }
    return 0;
}

static int compile_any(mc__xprog_t *prog, const bson_value_t *spec, int depth, mc__xnode_t **out,
                       mc_error_t *err)
{
    mc__xnode_t *n;
    if (depth > prog->max_depth) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 2,
                            "expression nested deeper than %d levels", prog->max_depth);
    }
    if (spec->value_type == BSON_TYPE_UTF8 && spec->value.v_utf8.str[0] == '$') {
        return compile_string_ref(prog, spec, out, err);
    }
    if (spec->value_type != BSON_TYPE_DOCUMENT && spec->value_type != BSON_TYPE_ARRAY) {
        int nrc = node_new(prog, X_CONST, &n, err);
        if (nrc < 0) {
            return nrc;
        }
        n->cval = *spec;
        *out = n;
        return 0;
    }
    bson_iter_t it;
    if (!mc__bson_iter_init_safe(&it, spec->value.v_doc.data, spec->value.v_doc.data_len)) {
        return mc__expr_fail(err, 2, "malformed expression");
    }
    bool is_doc = spec->value_type == BSON_TYPE_DOCUMENT;
    if (is_doc && mc__expr_is_operator_doc(spec)) {
        bson_iter_next(&it);
        bson_iter_t rest = it;
        if (bson_iter_next(&rest)) {
            return mc__expr_fail(
                err, 15983, "An object representing an expression must have exactly one field");
        }
        return compile_operator(prog, bson_iter_key(&it), bson_iter_value(&it), depth, out, err);
    }
    int nrc = node_new(prog, is_doc ? X_OBJECT : X_ARRAY, &n, err);
    if (nrc < 0) {
        return nrc;
    }
    *out = n;
    size_t cap = 0;
    while (bson_iter_next(&it)) {
        mc__xnode_t *kid;
        int rc = compile_any(prog, bson_iter_value(&it), depth + 1, &kid, err);
        if (rc < 0 || (rc = add_kid(n, &cap, kid, bson_iter_key(&it), err)) < 0) {
            return rc;
        }
    }
    return 0;
}

int mc__expr_compile(mc__xprog_t *prog, const bson_value_t *spec, int depth, mc__xnode_t **out,
                     mc_error_t *err)
{
    *out = NULL;
    return compile_any(prog, spec, depth, out, err);
}

/* ---------------------------------------------------------------- evaluation */

typedef struct ectx {
    const mc__xprog_t *prog;
    bson_value_t root;
    const mc__xstep_t *steps; /* the caller's budget, or NULL */
    mc_error_t *err;
} ectx_t;

static int eval(const ectx_t *c, const mc__xnode_t *n, mc__xval_t *out);

/* Reports `units` of work (a node evaluated, a field or an array element visited) to the
 * caller's budget; MC_ELIMIT once it has run out. */
static int xstep(const ectx_t *c, uint32_t units)
{
    return mc__xstep_take(c->steps, units, c->err);
}

int mc__xstep_take(const mc__xstep_t *steps, uint32_t units, mc_error_t *err)
{
    if (steps && !steps->step(steps->ctx, units)) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                            "expression evaluation budget exhausted");
    }
    return 0;
}

/* 1 found, 0 not found, <0 the budget ran out. */
static int find_field(const ectx_t *c, const bson_value_t *doc, const char *key, uint32_t klen,
                      bson_iter_t *it)
{
    if (!mc__bson_iter_init_safe(it, doc->value.v_doc.data, doc->value.v_doc.data_len)) {
        return 0;
    }
    while (bson_iter_next(it)) {
        int rc = xstep(c, 1);
        if (rc < 0) {
            return rc;
        }
        if (bson_iter_key_len(it) == klen && memcmp(bson_iter_key(it), key, klen) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Aggregation field-path semantics (MongoDB's ExpressionFieldPath): through an array, the
 * rest of the path is applied to each element that is a document, and the results that are
 * not missing form an array; other elements, nested arrays included, are skipped. Any other
 * value before the end of the path gives missing. Every level of recursion consumes a path
 * component, so the depth is bounded by the path. */
static int path_get(const ectx_t *c, const mc__xnode_t *n, const bson_value_t *v, size_t ci,
                    mc__xval_t *out)
{
    bson_iter_t it;
    if (ci == n->ncomp) {
        xv_view(out, v);
        return 0;
    }
    if (v->value_type == BSON_TYPE_DOCUMENT) {
        int found = find_field(c, v, n->comp[ci], n->comp_len[ci], &it);
        if (found <= 0) {
            xv_missing(out);
            return found;
        }
        return path_get(c, n, bson_iter_value(&it), ci + 1, out);
    }
    if (v->value_type != BSON_TYPE_ARRAY) {
        xv_missing(out);
        return 0;
    }
    bson_t arr = BSON_INITIALIZER;
    uint32_t i = 0;
    if (mc__bson_iter_init_safe(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            const bson_value_t *e = bson_iter_value(&it);
            int rc = xstep(c, 1);
            if (rc < 0) {
                bson_destroy(&arr);
                return rc;
            }
            if (e->value_type != BSON_TYPE_DOCUMENT) {
                continue;
            }
            mc__xval_t r;
            rc = path_get(c, n, e, ci, &r);
            if (rc < 0) {
                bson_destroy(&arr);
                return rc;
            }
            if (!is_missing(&r)) {
                char key[16];
                const char *k;
                bson_uint32_to_string(i++, &k, key, sizeof(key));
                bool ok = bson_append_value(&arr, k, -1, &r.v) && arr.len <= c->prog->max_value;
                mc__xval_release(&r);
                if (!ok) {
                    bson_destroy(&arr);
                    return too_large(c->err, "a field path's array");
                }
            }
        }
    }
    xv_take_bson(out, &arr, BSON_TYPE_ARRAY);
    return 0;
}

/* Builds a document or an array literal. */
static int eval_literal(const ectx_t *c, const mc__xnode_t *n, mc__xval_t *out)
{
    bson_t b = BSON_INITIALIZER;
    for (size_t i = 0; i < n->nkids; i++) {
        mc__xval_t v;
        int rc = eval(c, n->kids[i], &v);
        if (rc < 0) {
            bson_destroy(&b);
            return rc;
        }
        bool ok = true;
        if (n->op == X_OBJECT) {
            if (!is_missing(&v)) {
                ok = bson_append_value(&b, n->keys[i], -1, &v.v);
            }
        } else {
            char key[16];
            const char *k;
            bson_uint32_to_string((uint32_t)i, &k, key, sizeof(key));
            ok = is_missing(&v) ? bson_append_null(&b, k, -1) : bson_append_value(&b, k, -1, &v.v);
        }
        mc__xval_release(&v);
        if (!ok || b.len > c->prog->max_value) {
            bson_destroy(&b);
            return too_large(c->err, n->op == X_OBJECT ? "a document" : "an array");
        }
    }
    xv_take_bson(out, &b, n->op == X_OBJECT ? BSON_TYPE_DOCUMENT : BSON_TYPE_ARRAY);
    return 0;
}

/* Evaluates every operand into `vals` (caller-provided, n->nkids long). */
static int eval_all(const ectx_t *c, const mc__xnode_t *n, mc__xval_t *vals)
{
    for (size_t i = 0; i < n->nkids; i++) {
        int rc = eval(c, n->kids[i], &vals[i]);
        if (rc < 0) {
            for (size_t j = 0; j < i; j++) {
                mc__xval_release(&vals[j]);
            }
            return rc;
        }
    }
    return 0;
}

static void release_all(mc__xval_t *vals, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        mc__xval_release(&vals[i]);
    }
}

static bool is_number(bson_type_t t)
{
    return mc__bson_is_number(t);
}

static double as_double(const mc__xval_t *x)
{
    return mc__bson_value_as_double(&x->v);
}

static int64_t as_int64(const mc__xval_t *x)
{
    switch (x->v.value_type) {
    case BSON_TYPE_INT32: return x->v.value.v_int32;
    case BSON_TYPE_INT64: return x->v.value.v_int64;
    default: {
        double d = as_double(x);
        return d >= 9.2e18 ? INT64_MAX : (d <= -9.2e18 ? INT64_MIN : (int64_t)d);
    }
    }
}

static void set_number(mc__xval_t *out, bool use_double, bool use_long, bool overflow, double d,
                       int64_t i)
{
    xv_missing(out);
    if (use_double || overflow) {
        out->v.value_type = BSON_TYPE_DOUBLE;
        out->v.value.v_double = d;
    } else if (use_long || i > INT32_MAX || i < INT32_MIN) {
        out->v.value_type = BSON_TYPE_INT64;
        out->v.value.v_int64 = i;
    } else {
        out->v.value_type = BSON_TYPE_INT32;
        out->v.value.v_int32 = (int32_t)i;
    }
}

static void set_date(mc__xval_t *out, int64_t ms)
{
    xv_missing(out);
    out->v.value_type = BSON_TYPE_DATE_TIME;
    out->v.value.v_datetime = ms;
}

/* $add, $subtract, $multiply, $divide over evaluated operands. */
static int arith(const ectx_t *c, const mc__xnode_t *n, const mc__xval_t *vals, mc__xval_t *out)
{
    size_t nv = n->nkids;
    xop_t op = n->op;
    for (size_t i = 0; i < nv; i++) {
        if (nullish(&vals[i])) {
            xv_null(out);
            return 0;
        }
    }
    int code = op == X_ADD ? 16554 : op == X_MULTIPLY ? 16555 : op == X_SUBTRACT ? 16556 : 16609;
    bool dates_ok = op == X_ADD || op == X_SUBTRACT;
    bool use_double = false, use_long = false, overflow = false;
    int n_dates = 0;
    for (size_t i = 0; i < nv; i++) {
        bson_type_t t = vals[i].v.value_type;
        if (t == BSON_TYPE_DATE_TIME &&
            (op == X_ADD || (op == X_SUBTRACT && (i == 0 || n_dates == 1)))) {
            n_dates++;
            continue;
        }
        if (!is_number(t)) {
            return mc__expr_fail(c->err, code, "%s only supports numeric%s types, not %s", n->name,
                                 dates_ok ? " or date" : "", type_name(&vals[i]));
        }
        use_double |= t == BSON_TYPE_DOUBLE || t == BSON_TYPE_DECIMAL128;
        use_long |= t == BSON_TYPE_INT64;
    }
    if (op == X_ADD && n_dates > 1) {
        return mc__expr_fail(c->err, 16612, "only one date allowed in an $add expression");
    }
    if (op == X_DIVIDE) {
        double d = as_double(&vals[1]);
        if (d == 0) {
            return mc__expr_fail(c->err, 2, "can't $divide by zero");
        }
        xv_double(out, as_double(&vals[0]) / d);
        return 0;
    }
    if (op == X_SUBTRACT) {
        if (n_dates == 2) {
            xv_missing(out);
            out->v.value_type = BSON_TYPE_INT64;
            out->v.value.v_int64 = vals[0].v.value.v_datetime - vals[1].v.value.v_datetime;
        } else if (n_dates == 1) {
            set_date(out, vals[0].v.value.v_datetime - (int64_t)llround(as_double(&vals[1])));
        } else {
            int64_t r;
            overflow = __builtin_sub_overflow(as_int64(&vals[0]), as_int64(&vals[1]), &r);
            set_number(out, use_double, use_long, overflow,
                       as_double(&vals[0]) - as_double(&vals[1]), r);
        }
        return 0;
    }
    bool mul = op == X_MULTIPLY;
    double dacc = mul ? 1 : 0;
    int64_t iacc = mul ? 1 : 0, date = 0;
    for (size_t i = 0; i < nv; i++) {
        if (vals[i].v.value_type == BSON_TYPE_DATE_TIME) {
            date = vals[i].v.value.v_datetime;
            continue;
        }
        if (mul) {
            dacc *= as_double(&vals[i]);
            overflow |= __builtin_mul_overflow(iacc, as_int64(&vals[i]), &iacc);
        } else {
            dacc += as_double(&vals[i]);
            overflow |= __builtin_add_overflow(iacc, as_int64(&vals[i]), &iacc);
        }
    }
    if (n_dates) {
        set_date(out, date + (int64_t)llround(dacc));
        return 0;
    }
    set_number(out, use_double, use_long, overflow, dacc, iacc);
    return 0;
}

static int eval_mod(const ectx_t *c, const mc__xval_t *a, const mc__xval_t *b, mc__xval_t *out)
{
    if (nullish(a) || nullish(b)) {
        xv_null(out);
        return 0;
    }
    if (!is_number(a->v.value_type) || !is_number(b->v.value_type)) {
        return mc__expr_fail(c->err, 16611, "$mod only supports numeric types, not %s and %s",
                             type_name(a), type_name(b));
    }
    bson_type_t ta = a->v.value_type, tb = b->v.value_type;
    bool dbl = ta == BSON_TYPE_DOUBLE || ta == BSON_TYPE_DECIMAL128 || tb == BSON_TYPE_DOUBLE ||
               tb == BSON_TYPE_DECIMAL128;
    if (dbl) {
        double y = as_double(b);
        if (y == 0) {
            return mc__expr_fail(c->err, 16610, "can't $mod by zero");
        }
        xv_double(out, fmod(as_double(a), y));
        return 0;
    }
    int64_t x = as_int64(a), y = as_int64(b);
    if (y == 0) {
        return mc__expr_fail(c->err, 16610, "can't $mod by zero");
    }
    int64_t r = y == -1 ? 0 : x % y; /* avoids INT64_MIN % -1 */
    bool use_long = ta == BSON_TYPE_INT64 || tb == BSON_TYPE_INT64;
    set_number(out, false, use_long, false, (double)r, r);
    return 0;
}

/* $abs, $ceil, $floor, $trunc. */
static int eval_unary_math(const ectx_t *c, const mc__xnode_t *n, const mc__xval_t *a,
                           mc__xval_t *out)
{
    if (nullish(a)) {
        xv_null(out);
        return 0;
    }
    bson_type_t t = a->v.value_type;
    if (!is_number(t)) {
        return mc__expr_fail(c->err, 28765, "%s only supports numeric types, not %s", n->name,
                             type_name(a));
    }
    if (t == BSON_TYPE_INT32 || t == BSON_TYPE_INT64) {
        int64_t i = as_int64(a);
        if (n->op != X_ABS || i >= 0) {
            xv_view(out, &a->v);
            return 0;
        }
        if (i == INT64_MIN) {
            return mc__expr_fail(c->err, 28680, "can't take $abs of long long min");
        }
        set_number(out, false, t == BSON_TYPE_INT64, false, (double)-i, -i);
        return 0;
    }
    double d = as_double(a);
    switch (n->op) {
    case X_ABS: d = fabs(d); break;
    case X_CEIL: d = ceil(d); break;
    case X_FLOOR: d = floor(d); break;
    default: d = trunc(d); break;
    }
    xv_double(out, d);
    return 0;
}

static int eval_concat(const ectx_t *c, const mc__xnode_t *n, const mc__xval_t *vals,
                       mc__xval_t *out)
{
    size_t total = 0;
    for (size_t i = 0; i < n->nkids; i++) {
        if (nullish(&vals[i])) {
            xv_null(out);
            return 0;
        }
        if (vals[i].v.value_type != BSON_TYPE_UTF8) {
            return mc__expr_fail(c->err, 16702, "$concat only supports strings, not %s",
                                 type_name(&vals[i]));
        }
        total += vals[i].v.value.v_utf8.len;
    }
    if (total > c->prog->max_value) {
        return too_large(c->err, "$concat's result");
    }
    char *s = bson_malloc(total + 1);
    size_t k = 0;
    for (size_t i = 0; i < n->nkids; i++) {
        memcpy(s + k, vals[i].v.value.v_utf8.str, vals[i].v.value.v_utf8.len);
        k += vals[i].v.value.v_utf8.len;
    }
    s[k] = '\0';
    xv_take_string(out, s, k);
    return 0;
}

static void set_cstring(mc__xval_t *out, const char *s)
{
    size_t len = strlen(s);
    char *p = bson_malloc(len + 1);
    memcpy(p, s, len + 1);
    xv_take_string(out, p, len);
}

static int eval_to_string(const ectx_t *c, mc__xval_t *a, mc__xval_t *out)
{
    char buf[64];
    const bson_value_t *v = &a->v;
    if (nullish(a)) {
        xv_null(out);
        return 0;
    }
    switch (v->value_type) {
    case BSON_TYPE_UTF8: xv_move(out, a); return 0;
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
        return mc__expr_fail(
            c->err, 241,
            "Unsupported conversion from %s to string in $convert with no onError value",
            type_name(a));
    }
    set_cstring(out, buf);
    return 0;
}

static int eval_in(const ectx_t *c, const mc__xval_t *needle, const mc__xval_t *arr,
                   mc__xval_t *out)
{
    bson_iter_t it;
    if (arr->v.value_type != BSON_TYPE_ARRAY) {
        return mc__expr_fail(c->err, 40081, "$in requires an array as a second argument, found: %s",
                             type_name(arr));
    }
    bool found = false;
    if (mc__bson_iter_init_safe(&it, arr->v.value.v_doc.data, arr->v.value.v_doc.data_len)) {
        while (!found && bson_iter_next(&it)) {
            int rc = xstep(c, 1);
            if (rc < 0) {
                return rc;
            }
            found = mc_bson_value_compare(&needle->v, bson_iter_value(&it)) == 0;
        }
    }
    xv_bool(out, found);
    return 0;
}

static int eval_size(const ectx_t *c, const mc__xval_t *a, mc__xval_t *out)
{
    bson_iter_t it;
    if (a->v.value_type != BSON_TYPE_ARRAY) {
        return mc__expr_fail(c->err, 17124,
                             "The argument to $size must be an array. Type of argument: %s",
                             type_name(a));
    }
    int32_t n = 0;
    if (mc__bson_iter_init_safe(&it, a->v.value.v_doc.data, a->v.value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            int rc = xstep(c, 1);
            if (rc < 0) {
                return rc;
            }
            n++;
        }
    }
    xv_int32(out, n);
    return 0;
}

static int compare_op(const mc__xnode_t *n, const mc__xval_t *a, const mc__xval_t *b,
                      mc__xval_t *out)
{
    /* Missing is EOD, which ranks with undefined below null: MongoDB's Value order. */
    int cmp = mc_bson_value_compare(&a->v, &b->v);
    switch (n->op) {
    case X_CMP: xv_int32(out, cmp < 0 ? -1 : (cmp > 0 ? 1 : 0)); break;
    case X_EQ: xv_bool(out, cmp == 0); break;
    case X_NE: xv_bool(out, cmp != 0); break;
    case X_GT: xv_bool(out, cmp > 0); break;
    case X_GTE: xv_bool(out, cmp >= 0); break;
    case X_LT: xv_bool(out, cmp < 0); break;
    default: xv_bool(out, cmp <= 0); break;
    }
    return 0;
}

/* Operators whose operands are all evaluated first. */
static int eval_strict(const ectx_t *c, const mc__xnode_t *n, mc__xval_t *out)
{
    mc__xval_t small[8]; /* operators rarely take more: no allocation for them */
    mc__xval_t *vals = small;
    if (n->nkids > 8) {
        vals = bson_malloc(n->nkids * sizeof(*vals));
    }
    int rc = eval_all(c, n, vals);
    if (rc < 0) {
        if (vals != small) {
            bson_free(vals);
        }
        return rc;
    }
    switch (n->op) {
    case X_CONCAT: rc = eval_concat(c, n, vals, out); break;
    case X_ADD:
    case X_SUBTRACT:
    case X_MULTIPLY:
    case X_DIVIDE: rc = arith(c, n, vals, out); break;
    case X_MOD: rc = eval_mod(c, &vals[0], &vals[1], out); break;
    case X_ABS:
    case X_CEIL:
    case X_FLOOR:
    case X_TRUNC: rc = eval_unary_math(c, n, &vals[0], out); break;
    case X_EQ:
    case X_NE:
    case X_GT:
    case X_GTE:
    case X_LT:
    case X_LTE:
    case X_CMP: rc = compare_op(n, &vals[0], &vals[1], out); break;
    case X_NOT: xv_bool(out, !mc__xval_truthy(&vals[0])); break;
    case X_IN: rc = eval_in(c, &vals[0], &vals[1], out); break;
    case X_SIZE: rc = eval_size(c, &vals[0], out); break;
    case X_ISARRAY: xv_bool(out, vals[0].v.value_type == BSON_TYPE_ARRAY); break;
    case X_TYPE: xv_static_string(out, type_name(&vals[0])); break;
    case X_TOSTRING: rc = eval_to_string(c, &vals[0], out); break;
    default: rc = mc__expr_fail(c->err, 2, "internal error: operator %d", (int)n->op); break;
    }
    release_all(vals, n->nkids);
    if (vals != small) {
        bson_free(vals);
    }
    if (rc < 0) {
        mc__xval_release(out);
    }
    return rc;
}

static int eval(const ectx_t *c, const mc__xnode_t *n, mc__xval_t *out)
{
    xv_missing(out);
    int src = xstep(c, 1);
    if (src < 0) {
        return src;
    }
    switch (n->op) {
    case X_CONST: xv_view(out, &n->cval); return 0;
    case X_REMOVE: return 0;
    case X_PATH: return path_get(c, n, &c->root, 0, out);
    case X_OBJECT:
    case X_ARRAY: return eval_literal(c, n, out);
    case X_AND:
    case X_OR: {
        bool want = n->op == X_OR; /* the value that decides the result */
        for (size_t i = 0; i < n->nkids; i++) {
            mc__xval_t v;
            int rc = eval(c, n->kids[i], &v);
            if (rc < 0) {
                return rc;
            }
            bool t = mc__xval_truthy(&v);
            mc__xval_release(&v);
            if (t == want) {
                xv_bool(out, want);
                return 0;
            }
        }
        xv_bool(out, !want);
        return 0;
    }
    case X_COND: {
        mc__xval_t cond;
        int rc = eval(c, n->kids[0], &cond);
        if (rc < 0) {
            return rc;
        }
        bool t = mc__xval_truthy(&cond);
        mc__xval_release(&cond);
        return eval(c, n->kids[t ? 1 : 2], out);
    }
    case X_IFNULL:
        for (size_t i = 0; i < n->nkids; i++) {
            int rc = eval(c, n->kids[i], out);
            if (rc < 0) {
                return rc;
            }
            if (i + 1 == n->nkids || !nullish(out)) {
                return 0; /* the last operand is returned as it is, even missing */
            }
            mc__xval_release(out);
        }
        return 0;
    default: return eval_strict(c, n, out);
    }
}

int mc__expr_eval(const mc__xprog_t *prog, const mc__xnode_t *n, const uint8_t *root,
                  uint32_t root_len, mc__xval_t *out, mc_error_t *err)
{
    return mc__expr_eval_steps(prog, n, root, root_len, NULL, out, err);
}

int mc__expr_eval_steps(const mc__xprog_t *prog, const mc__xnode_t *n, const uint8_t *root,
                        uint32_t root_len, const mc__xstep_t *steps, mc__xval_t *out,
                        mc_error_t *err)
{
    ectx_t c = {.prog = prog, .steps = steps, .err = err};
    c.root.value_type = BSON_TYPE_DOCUMENT;
    c.root.value.v_doc.data = (uint8_t *)root;
    c.root.value.v_doc.data_len = root_len;
    int rc = eval(&c, n, out);
    if (rc < 0) {
        xv_missing(out);
    }
    return rc;
}

/* ---------------------------------------------------------------- public API */

struct mc_expr {
    bson_t *spec; /* {"": <the expression>}: the nodes' constants point into it */
    mc__xprog_t prog;
    mc__xnode_t *root;
};

void mc_expr_destroy(mc_expr_t *expr)
{
    if (!expr) {
        return;
    }
    mc__xprog_free(&expr->prog);
    bson_destroy(expr->spec);
    free(expr);
}

mc_expr_t *mc_expr_new(const bson_value_t *spec, const mc_expr_opts_t *opts, mc_error_t *err)
{
    if (!spec) {
        mc__expr_fail(err, 2, "expression missing");
        return NULL;
    }
    mc_expr_t *e = calloc(1, sizeof(*e));
    if (!e) {
        oom(err);
        return NULL;
    }
    mc__xprog_init(&e->prog, opts);
    e->spec = bson_new();
    bson_iter_t it;
    if (!bson_append_value(e->spec, "", 0, spec) || !bson_iter_init(&it, e->spec) ||
        !bson_iter_next(&it)) {
        mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 10334, "expression too large");
        mc_expr_destroy(e);
        return NULL;
    }
    if (mc__expr_compile(&e->prog, bson_iter_value(&it), 0, &e->root, err) < 0) {
        mc_expr_destroy(e);
        return NULL;
    }
    return e;
}

int mc_expr_eval(const mc_expr_t *expr, const bson_t *root, bson_value_t *out, mc_error_t *err)
{
    mc__xval_t v;
    memset(out, 0, sizeof(*out));
    out->value_type = BSON_TYPE_EOD;
    if (!expr || !root) {
        return mc__expr_fail(err, 2, "no expression or document");
    }
    int rc = mc__expr_eval(&expr->prog, expr->root, bson_get_data(root), root->len, &v, err);
    if (rc < 0) {
        return rc;
    }
    if (is_missing(&v)) {
        return 0;
    }
    if (v.owned) {
        *out = v.v;
    } else {
        bson_value_copy(&v.v, out);
    }
    return 1;
}

int mc_expr_eval_bool(const mc_expr_t *expr, const bson_t *root, bool *out, mc_error_t *err)
{
    mc__xval_t v;
    *out = false;
    if (!expr || !root) {
        return mc__expr_fail(err, 2, "no expression or document");
    }
    int rc = mc__expr_eval(&expr->prog, expr->root, bson_get_data(root), root->len, &v, err);
    if (rc < 0) {
        return rc;
    }
    *out = mc__xval_truthy(&v);
    mc__xval_release(&v);
    return 0;
}
