/*
 * filter.c: the MongoDB query matcher (mc_filter_*), used by mongo-emulator for find, update,
 * delete and change-stream $match, and by the daemon for subscriber filters.
 *
 * Threads: any. mc_filter_new() compiles a query into an immutable tree; mc_filter_match()
 * only reads that tree, so one filter can be matched from several threads at once.
 *
 * Design:
 *  - Compilation first copies the query while replacing {$var: name} placeholders (and
 *    enforcing max_depth), then parses the copy into a tree. Operand values are bson_value_t
 *    views into that private copy, so matching allocates nothing (except regex backtracking
 *    memory beyond the stack arena, see below).
 *  - Doc-level nodes (AND/OR/NOR/NOT/PATH) are evaluated against a document; predicate nodes
 *    (EQ, GT, IN, REGEX, ...) against a single value or "missing". A PATH node walks a dotted
 *    path with MongoDB's array rules: a non-numeric component applied to an array is applied to
 *    every document element; a numeric component indexes the array (and also looks up a field
 *    of that name in document elements); non-document elements and absent fields yield
 *    "missing" (so {"a.b": null} matches {a: [1]}). At the end of the path a leaf array is
 *    tested as a whole and element by element (one level), except by $size and $elemMatch.
 *  - Each operator of {a: {$gt: 1, $lt: 5}} is its own PATH node, so each may be satisfied by a
 *    different array element, as in MongoDB. $ne, $nin and $exists: false are NOT(PATH).
 *  - Comparisons bracket types: $gt/$gte/$lt/$lte only match values of the operand's canonical
 *    type class (MinKey/MaxKey operands excepted); NaN only equals NaN; null equality matches
 *    missing fields ($gte/$lte null too); undefined is not null (MongoDB 6.0+).
 *  - Regexes are PCRE2 patterns compiled once (UTF-8, PCRE2_MATCH_INVALID_UTF so that any
 *    subject is safe, PCRE2_AUTO_CALLOUT so that matching reports its progress). PCRE2's match
 *    limit applies per start position, so on a long subject it does not bound the total work;
 *    the callout counts every backtracking step of the whole call and stops it when the
 *    evaluation's budget (or, without one, RX_MAX_STEPS) runs out. Backtracking memory comes
 *    from a 32 KiB arena on the evaluating thread's stack and is bounded by the heap limit;
 *    whatever had to come from the heap is freed when the evaluation ends.
 *  - Cost: every loop of the evaluation adds units to the budget; every UNITS_PER_CHECK units
 *    (and every CALLOUTS_PER_CHECK regex steps) the thread's CPU clock is compared with the
 *    budget. Once exceeded, every function returns false at once (NOT/NOR results are then
 *    meaningless and the caller discards them).
 *  - $expr compiles its aggregation expression (expr.c) into filter->xprog and matches when
 *    the value is truthy; it is refused inside $elemMatch (MongoDB: top-level document only).
 *    An evaluation error (e.g. $add on a string) makes the document not match; the pipeline
 *    stages use mc__filter_eval() to report it instead. The budget's bookkeeping is shared
 *    with the pipeline stages' own work (mc__filter_budget_step()). The expression's evaluation steps
 *    (nodes evaluated, fields and array elements visited) go to the same budget through
 *    expr_step(), so an expensive $expr stops like an expensive regex.
 * Invariants: a compiled filter never changes; every node belongs to filter->nodes and is
 * freed from there, never recursively.
 */
#include "mongocast/filter.h"

#include "bson_util.h"
#include "expr_private.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <math.h>
#include <pcre2.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_MAX_DEPTH 64
#define MAX_PATH_COMPONENTS 128
#define MAX_REGEX_LEN 8192
#define MAX_REGEX_NEST 64       /* parentheses nesting */
#define RX_MATCH_LIMIT 1000000  /* PCRE2 match() calls per start position */
#define RX_DEPTH_LIMIT 100000   /* PCRE2 backtracking depth */
#define RX_HEAP_LIMIT_KIB 16384 /* PCRE2 backtracking memory */
#define RX_MAX_STEPS 10000000   /* regex steps per call without a CPU budget */
#define RX_ARENA_SIZE 32768     /* PCRE2 contexts + the first backtracking frames */
#define UNITS_PER_CHECK 4096    /* evaluation steps between CPU clock readings */
#define CALLOUTS_PER_CHECK 1024 /* regex steps between CPU clock readings */
#define BAD_VALUE 2
#define REGEX_INVALID 51091

/* Malformed BSON can hold a zero-length sub-document, which bson_value_copy turns into a NULL
 * pointer that bson_iter_init_from_data would assert on: treat it as unreadable instead. */
static bool safe_iter_init(bson_iter_t *it, const uint8_t *data, size_t len)
{
    return data && bson_iter_init_from_data(it, data, len);
}

typedef enum node_kind {
    N_AND, /* all kids (empty: true) */
    N_OR,  /* any kid (empty: false) */
    N_NOR,
    N_NOT,
    N_PATH, /* path + pred */
    P_EQ,
    P_LT,
    P_LTE,
    P_GT,
    P_GTE,
    P_IN,
    P_EXISTS,
    P_TYPE,
    P_REGEX,
    P_SIZE,
    P_MOD,
    P_ELEM_OBJ, /* kids[0]: doc-level node applied to each document element */
    P_ELEM_VAL, /* kids[0]: value-level node (AND of predicates) applied to each element */
    N_EXPR,     /* $expr: an aggregation expression over the whole document, true if truthy */
} node_kind_t;

typedef struct rx {
    pcre2_code *code;
    const char *pattern; /* borrowed from the query copy: used to match BSON regex values */
    char flags[8];
} rx_t;

/* The state of one evaluation (mc_filter_match_budget): its budget, the first $expr error
 * and, once a regex ran, the PCRE2 match context and match data, allocated from `arena` (on
 * the caller's stack). */
typedef struct eval {
    mc_filter_budget_t *b;
    bool stop;         /* the budget ran out: unwind */
    bool strict;       /* a regex limit stops the evaluation (else: no match) */
    bool rx_ready;     /* gc, mc, md are set up */
    uint32_t callouts; /* regex steps since the last clock reading */
    bool failed;       /* a $expr evaluation failed: the document does not match */
    const mc__xprog_t *xprog;
    mc_error_t *err; /* receives the first $expr evaluation error, or NULL */
    pcre2_general_context *gc;
    pcre2_match_context *mc;
    pcre2_match_data *md;
    size_t arena_used;
    union {
        max_align_t align;
        unsigned char bytes[RX_ARENA_SIZE];
    } arena;
} eval_t;

typedef struct node node_t;
struct node {
    node_kind_t kind;
    node_t **kids;
    size_t nkids, capkids;
    /* N_PATH */
    char *path; /* components separated by '\0' */
    size_t ncomp;
    const char **comp;
    uint32_t *comp_len;
    node_t *pred;
    /* predicates */
    bson_value_t val;
    bson_value_t *vals; /* P_IN: equality values */
    size_t nvals;
    rx_t **rxs; /* P_IN regexes, or rxs[0] for P_REGEX */
    size_t nrxs;
    bool types[256]; /* P_TYPE, indexed by (uint8_t)bson_type_t; MinKey is 0xFF */
    bool type_number;
    int64_t num, num2; /* P_SIZE count; P_MOD divisor, remainder */
    mc__xnode_t *expr; /* N_EXPR, owned by filter->xprog */
};

struct mc_filter {
    bson_t *query; /* the substituted copy that operand values point into (heap: bson_t
                    * needs 128-byte alignment, which calloc does not give) */
    node_t *root;
    node_t **nodes;
    size_t nnodes, capnodes;
    rx_t **rxs;
    size_t nrxs, caprxs;
    int npredicates;
    mc__xprog_t xprog; /* the $expr expressions */
};

typedef struct parse_ctx {
    mc_filter_t *f;
    const mc_filter_opts_t *opts;
    int max_depth;
    int in_elem_match; /* > 0 while parsing the query of an $elemMatch */
    mc_error_t *err;
} parse_ctx_t;

/* ---------------------------------------------------------------- construction helpers */

static bool grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return true;
    }
    size_t ncap = *cap ? *cap * 2 : 4;
    while (ncap < need) {
        ncap *= 2;
    }
    void *p = realloc(*arr, ncap * elem);
    if (!p) {
        return false;
    }
    *arr = p;
    *cap = ncap;
    return true;
}

static int oom(parse_ctx_t *c)
{
    return mc_error_set(c->err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
}

static node_t *node_new(parse_ctx_t *c, node_kind_t kind)
{
    mc_filter_t *f = c->f;
    if (!grow((void **)&f->nodes, &f->capnodes, f->nnodes + 1, sizeof(node_t *))) {
        oom(c);
        return NULL;
    }
    node_t *n = calloc(1, sizeof(*n));
    if (!n) {
        oom(c);
        return NULL;
    }
    n->kind = kind;
    f->nodes[f->nnodes++] = n;
    return n;
}

static int node_add(parse_ctx_t *c, node_t *parent, node_t *kid)
{
    if (!grow((void **)&parent->kids, &parent->capkids, parent->nkids + 1, sizeof(node_t *))) {
        return oom(c);
    }
    parent->kids[parent->nkids++] = kid;
    return 0;
}

static void node_free(node_t *n)
{
    free(n->kids);
    free(n->path);
    free(n->comp);
    free(n->comp_len);
    free(n->vals);
    free(n->rxs);
    free(n);
}

static int bad(parse_ctx_t *c, const char *fmt, const char *arg)
{
    return mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE, fmt, arg);
}

static int count_predicate(parse_ctx_t *c)
{
    c->f->npredicates++;
    if (c->opts && c->opts->max_predicates > 0 && c->f->npredicates > c->opts->max_predicates) {
        return mc_error_set(c->err, MC_ELIMIT, MC_DOMAIN_MONGODB, BAD_VALUE,
                            "filter has more than %d predicates", c->opts->max_predicates);
    }
    return 0;
}

static node_t *pred_new(parse_ctx_t *c, node_kind_t kind)
{
    if (count_predicate(c) < 0) {
        return NULL;
    }
    return node_new(c, kind);
}

/* ---------------------------------------------------------------- regular expressions */

static rx_t *rx_new(parse_ctx_t *c, const char *pattern, size_t len, const char *options)
{
    uint32_t copts =
        PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | PCRE2_AUTO_CALLOUT | PCRE2_NEVER_BACKSLASH_C;
    size_t nflags = 0;
    char flags[8] = {0};
    for (const char *o = options; *o; o++) {
        switch (*o) {
        case 'i': copts |= PCRE2_CASELESS; break;
        case 'm': copts |= PCRE2_MULTILINE; break;
        case 's': copts |= PCRE2_DOTALL; break;
        case 'x': copts |= PCRE2_EXTENDED; break;
        case 'u': break; /* MongoDB: accepted and redundant, UTF-8 is always on */
        default:
            mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, 51108,
                         "invalid flag in regex options: %c", *o);
            return NULL;
        }
        if (!strchr(flags, *o) && nflags < sizeof(flags) - 1) {
            flags[nflags++] = *o;
        }
    }
    if (len > MAX_REGEX_LEN || strlen(pattern) != len) {
        mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, REGEX_INVALID,
                     len > MAX_REGEX_LEN ? "Regular expression is too long"
                                         : "Regular expression cannot contain an embedded null "
                                           "byte");
        return NULL;
    }
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (!cc) {
        oom(c);
        return NULL;
    }
    pcre2_set_parens_nest_limit(cc, MAX_REGEX_NEST);
    int code = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, len, copts, &code, &offset, cc);
    pcre2_compile_context_free(cc);
    if (!re) {
        PCRE2_UCHAR msg[160];
        if (pcre2_get_error_message(code, msg, sizeof(msg)) < 0) {
            strcpy((char *)msg, "cannot compile");
        }
        /* The cost accounting (a callout before every item) makes the compiled form bigger
         * than PCRE2's own: say so when that is what ran out. */
        mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, REGEX_INVALID,
                     "Regular expression is invalid: %s%s", (const char *)msg,
                     code == PCRE2_ERROR_PATTERN_TOO_LARGE ? " (with cost accounting)" : "");
        return NULL;
    }
    mc_filter_t *f = c->f;
    rx_t *rx = calloc(1, sizeof(*rx));
    if (!rx || !grow((void **)&f->rxs, &f->caprxs, f->nrxs + 1, sizeof(rx_t *))) {
        free(rx);
        pcre2_code_free(re);
        oom(c);
        return NULL;
    }
    f->rxs[f->nrxs++] = rx;
    rx->code = re;
    rx->pattern = pattern;
    /* Sorted flags so that /x/im and /x/mi compare equal, as BSON regex options are sorted. */
    for (size_t i = 0; i < nflags; i++) {
        for (size_t j = i + 1; j < nflags; j++) {
            if (flags[j] < flags[i]) {
                char t = flags[i];
                flags[i] = flags[j];
                flags[j] = t;
            }
        }
    }
    memcpy(rx->flags, flags, sizeof(flags));
    return rx;
}

/* ---------------------------------------------------------------- cost */

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Marks `b` exceeded (the first reason stays). Returns false. */
static bool budget_exceed(mc_filter_budget_t *b, const char *why)
{
    b->exceeded = true;
    if (!b->reason) {
        b->reason = why;
    }
    return false;
}

/* Reads the clock (the budget starts at the first reading). Returns false once exceeded. */
static bool budget_clock(mc_filter_budget_t *b)
{
    if (b->exceeded) {
        return false;
    }
    if (!b->cpu_ns) {
        if (b->regex_steps > RX_MAX_STEPS) {
            return budget_exceed(b, "regular expression too expensive");
        }
        return true;
    }
    uint64_t now = thread_cpu_ns();
    if (!b->started_ns) {
        b->started_ns = now ? now : 1;
    } else if (now - b->started_ns > b->cpu_ns) {
        return budget_exceed(b, "CPU budget exhausted");
    }
    return true;
}

/* Adds `n` units of work to `b`, reading the clock every UNITS_PER_CHECK units; false once the
 * budget is exhausted. */
static inline bool budget_add(mc_filter_budget_t *b, uint32_t n)
{
    if (b->exceeded) {
        return false;
    }
    b->units += n;
    if (b->units < UNITS_PER_CHECK) {
        return true;
    }
    b->units = 0;
    return budget_clock(b);
}

bool mc__filter_budget_step(mc_filter_budget_t *b, uint32_t units)
{
    return budget_add(b, units);
}

static void budget_stop(eval_t *x, const char *why)
{
    x->stop = true;
    budget_exceed(x->b, why);
}

static bool budget_check(eval_t *x)
{
    if (!budget_clock(x->b)) {
        x->stop = true;
        return false;
    }
    return true;
}

/* Adds `n` units of work; false once the budget is exhausted. */
static inline bool step(eval_t *x, uint32_t n)
{
    if (x->stop) {
        return false;
    }
    if (!budget_add(x->b, n)) {
        x->stop = true;
        return false;
    }
    return true;
}

static int rx_callout(pcre2_callout_block *block, void *data)
{
    (void)block;
    eval_t *x = data;
    x->b->regex_steps++;
    if (++x->callouts < CALLOUTS_PER_CHECK) {
        return 0;
    }
    x->callouts = 0;
    return budget_check(x) ? 0 : PCRE2_ERROR_CALLOUT;
}

static void *arena_malloc(PCRE2_SIZE size, void *data)
{
    eval_t *x = data;
    size_t need = (size + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1);
    if (need <= RX_ARENA_SIZE - x->arena_used) {
        void *p = x->arena.bytes + x->arena_used;
        x->arena_used += need;
        return p;
    }
    return malloc(size);
}

static void arena_free(void *p, void *data)
{
    eval_t *x = data;
    unsigned char *c = p;
    if (c >= x->arena.bytes && c < x->arena.bytes + RX_ARENA_SIZE) {
        return; /* the arena goes with the evaluation */
    }
    free(p);
}

static bool rx_setup(eval_t *x)
{
    x->gc = pcre2_general_context_create(arena_malloc, arena_free, x);
    x->mc = x->gc ? pcre2_match_context_create(x->gc) : NULL;
    x->md = x->mc ? pcre2_match_data_create(1, x->gc) : NULL;
    if (!x->md) {
        return false;
    }
    pcre2_set_match_limit(x->mc, RX_MATCH_LIMIT);
    pcre2_set_depth_limit(x->mc, RX_DEPTH_LIMIT);
    pcre2_set_heap_limit(x->mc, RX_HEAP_LIMIT_KIB);
    pcre2_set_callout(x->mc, rx_callout, x);
    x->rx_ready = true;
    return true;
}

static void eval_cleanup(eval_t *x)
{
    if (x->rx_ready) {
        pcre2_match_data_free(x->md); /* frees backtracking frames that came from the heap */
    }
}

static bool rx_match_str(eval_t *x, const rx_t *rx, const char *s, uint32_t len)
{
    if (!step(x, 1 + len / 64) || (!x->rx_ready && !rx_setup(x))) {
        return false;
    }
    int rc = pcre2_match(rx->code, (PCRE2_SPTR)s, len, 0, 0, x->md, x->mc);
    if (rc >= 0) {
        return true;
    }
    if (rc == PCRE2_ERROR_NOMATCH || x->stop) {
        return false;
    }
    /* Match, depth or heap limit, or no memory: never a match; with a budget the evaluation
     * stops, so that the caller can tell the subscriber why. */
    if (x->strict) {
        budget_stop(x, "regular expression match limit");
    }
    return false;
}

static bool rx_match_value(eval_t *x, const rx_t *rx, const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_UTF8: return rx_match_str(x, rx, v->value.v_utf8.str, v->value.v_utf8.len);
    case BSON_TYPE_SYMBOL:
        return rx_match_str(x, rx, v->value.v_symbol.symbol, v->value.v_symbol.len);
    case BSON_TYPE_REGEX:
        return strcmp(v->value.v_regex.regex, rx->pattern) == 0 &&
               strcmp(v->value.v_regex.options ? v->value.v_regex.options : "", rx->flags) == 0;
    default: return false;
    }
}

/* ---------------------------------------------------------------- matching */

static bool eval_doc(eval_t *x, const node_t *n, const uint8_t *data, uint32_t len);
static bool eval_value(eval_t *x, const node_t *n, const bson_value_t *v);

static bool values_equal(const bson_value_t *a, const bson_value_t *b)
{
    return mc__bson_canon_rank(a->value_type) == mc__bson_canon_rank(b->value_type) &&
           mc_bson_value_compare(a, b) == 0;
}

static bool test_compare(const node_t *p, const bson_value_t *v)
{
    const bson_value_t *op = &p->val;
    if (!v) {
        return op->value_type == BSON_TYPE_NULL && (p->kind == P_LTE || p->kind == P_GTE);
    }
    if (mc__bson_is_number(v->value_type) && mc__bson_is_number(op->value_type)) {
        bool vn = mc__bson_value_is_nan(v), on = mc__bson_value_is_nan(op);
        if (vn || on) {
            return vn && on && (p->kind == P_LTE || p->kind == P_GTE);
        }
    }
    bool bracket_free = op->value_type == BSON_TYPE_MINKEY || op->value_type == BSON_TYPE_MAXKEY;
    if (!bracket_free &&
        mc__bson_canon_rank(v->value_type) != mc__bson_canon_rank(op->value_type)) {
        return false;
    }
    int c = mc_bson_value_compare(v, op);
    switch (p->kind) {
    case P_LT: return c < 0;
    case P_LTE: return c <= 0;
    case P_GT: return c > 0;
    case P_GTE: return c >= 0;
    default: return false;
    }
}

static bool test_pred(eval_t *x, const node_t *p, const bson_value_t *v)
{
    bson_iter_t it;
    if (!step(x, 1)) {
        return false;
    }
    switch (p->kind) {
    case P_EQ:
        if (!v) {
            return p->val.value_type == BSON_TYPE_NULL;
        }
        return values_equal(v, &p->val);
    case P_LT:
    case P_LTE:
    case P_GT:
    case P_GTE: return test_compare(p, v);
    case P_IN:
        if (!step(x, (uint32_t)(p->nvals < UNITS_PER_CHECK ? p->nvals : UNITS_PER_CHECK))) {
            return false;
        }
        for (size_t i = 0; i < p->nvals; i++) {
            if (v ? values_equal(v, &p->vals[i]) : p->vals[i].value_type == BSON_TYPE_NULL) {
                return true;
            }
        }
        if (v) {
            for (size_t i = 0; i < p->nrxs; i++) {
                if (rx_match_value(x, p->rxs[i], v)) {
                    return true;
                }
            }
        }
        return false;
    case P_EXISTS: return v != NULL;
    case P_TYPE:
        if (!v) {
            return false;
        }
        return p->types[(uint8_t)v->value_type] ||
               (p->type_number && mc__bson_is_number(v->value_type));
    case P_REGEX: return v && rx_match_value(x, p->rxs[0], v);
    case P_SIZE: {
        if (!v || v->value_type != BSON_TYPE_ARRAY) {
            return false;
        }
        int64_t n = 0;
        if (safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            while (bson_iter_next(&it)) {
                if (!step(x, 1)) {
                    return false;
                }
                n++;
            }
        }
        return n == p->num;
    }
    case P_MOD: {
        if (!v || !mc__bson_is_number(v->value_type) || mc__bson_value_is_nan(v)) {
            return false;
        }
        int64_t i64;
        if (v->value_type == BSON_TYPE_INT32) {
            i64 = v->value.v_int32;
        } else if (v->value_type == BSON_TYPE_INT64) {
            i64 = v->value.v_int64;
        } else {
            double d = mc__bson_value_as_double(v);
            if (!isfinite(d) || d >= 9.2e18 || d <= -9.2e18) {
                return false;
            }
            i64 = (int64_t)d;
        }
        if (p->num == -1) {
            return p->num2 == 0; /* avoids INT64_MIN % -1 */
        }
        return i64 % p->num == p->num2;
    }
    case P_ELEM_OBJ:
    case P_ELEM_VAL:
        if (!v || v->value_type != BSON_TYPE_ARRAY ||
            !safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            return false;
        }
        while (bson_iter_next(&it) && !x->stop) {
            const bson_value_t *e = bson_iter_value(&it);
            if (p->kind == P_ELEM_OBJ) {
                if ((e->value_type == BSON_TYPE_DOCUMENT || e->value_type == BSON_TYPE_ARRAY) &&
                    eval_doc(x, p->kids[0], e->value.v_doc.data, e->value.v_doc.data_len)) {
                    return !x->stop;
                }
            } else if (eval_value(x, p->kids[0], e)) {
                return !x->stop;
            }
        }
        return false;
    default: return false;
    }
}

static bool eval_value(eval_t *x, const node_t *n, const bson_value_t *v)
{
    if (x->stop) {
        return false;
    }
    switch (n->kind) {
    case N_AND:
        for (size_t i = 0; i < n->nkids; i++) {
            if (!eval_value(x, n->kids[i], v)) {
                return false;
            }
        }
        return !x->stop;
    case N_OR:
        for (size_t i = 0; i < n->nkids; i++) {
            if (eval_value(x, n->kids[i], v)) {
                return !x->stop;
            }
        }
        return false;
    case N_NOT: return !eval_value(x, n->kids[0], v) && !x->stop;
    default: return test_pred(x, n, v);
    }
}

static bool expands_leaf_arrays(node_kind_t k)
{
    return k != P_SIZE && k != P_ELEM_OBJ && k != P_ELEM_VAL && k != P_EXISTS;
}

static bool test_leaf(eval_t *x, const node_t *pred, const bson_value_t *v)
{
    if (test_pred(x, pred, v)) {
        return !x->stop;
    }
    if (v && v->value_type == BSON_TYPE_ARRAY && expands_leaf_arrays(pred->kind)) {
        bson_iter_t it;
        if (safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            while (bson_iter_next(&it) && !x->stop) {
                if (test_pred(x, pred, bson_iter_value(&it))) {
                    return !x->stop;
                }
            }
        }
    }
    return false;
}

static bool visit_value(eval_t *x, const node_t *pn, const bson_value_t *v, size_t ci);

static bool find_field(eval_t *x, const uint8_t *data, uint32_t len, const char *key, uint32_t klen,
                       bson_iter_t *it)
{
    if (!safe_iter_init(it, data, len)) {
        return false;
    }
    while (bson_iter_next(it)) {
        if (!step(x, 1)) {
            return false;
        }
        if (bson_iter_key_len(it) == klen && memcmp(bson_iter_key(it), key, klen) == 0) {
            return true;
        }
    }
    return false;
}

static bool visit_doc(eval_t *x, const node_t *pn, const uint8_t *data, uint32_t len, size_t ci)
{
    bson_iter_t it;
    if (!find_field(x, data, len, pn->comp[ci], pn->comp_len[ci], &it)) {
        return !x->stop && test_leaf(x, pn->pred, NULL);
    }
    return visit_value(x, pn, bson_iter_value(&it), ci + 1);
}

static bool parse_index(const char *s, uint32_t len, uint32_t *out)
{
    if (len == 0 || len > 9) {
        return false;
    }
    uint32_t v = 0;
    for (uint32_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
        v = v * 10 + (uint32_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

static bool visit_array(eval_t *x, const node_t *pn, const bson_value_t *arr, size_t ci)
{
    bson_iter_t it;
    uint32_t idx = 0; /* set when numeric; GCC -O2 cannot see that */
    bool numeric = parse_index(pn->comp[ci], pn->comp_len[ci], &idx);
    bool yielded = false;
    if (!safe_iter_init(&it, arr->value.v_doc.data, arr->value.v_doc.data_len)) {
        return test_leaf(x, pn->pred, NULL);
    }
    uint32_t i = 0;
    while (bson_iter_next(&it)) {
        if (!step(x, 1)) {
            return false;
        }
        const bson_value_t *e = bson_iter_value(&it);
        if (numeric && i == idx) {
            yielded = true;
            if (visit_value(x, pn, e, ci + 1)) {
                return !x->stop;
            }
        }
        if (e->value_type == BSON_TYPE_DOCUMENT) {
            /* With a numeric component this looks for a field named like the index. */
            if (numeric) {
                bson_iter_t f;
                if (find_field(x, e->value.v_doc.data, e->value.v_doc.data_len, pn->comp[ci],
                               pn->comp_len[ci], &f)) {
                    yielded = true;
                    if (visit_value(x, pn, bson_iter_value(&f), ci + 1)) {
                        return !x->stop;
                    }
                }
            } else {
                yielded = true;
                if (visit_doc(x, pn, e->value.v_doc.data, e->value.v_doc.data_len, ci)) {
                    return !x->stop;
                }
            }
        } else if (!numeric) {
            yielded = true;
            if (test_leaf(x, pn->pred, NULL)) {
                return !x->stop;
            }
        }
        i++;
    }
    return yielded || x->stop ? false : test_leaf(x, pn->pred, NULL);
}

static bool visit_value(eval_t *x, const node_t *pn, const bson_value_t *v, size_t ci)
{
    if (ci == pn->ncomp) {
        return test_leaf(x, pn->pred, v);
    }
    if (v->value_type == BSON_TYPE_DOCUMENT) {
        return visit_doc(x, pn, v->value.v_doc.data, v->value.v_doc.data_len, ci);
    }
    if (v->value_type == BSON_TYPE_ARRAY) {
        return visit_array(x, pn, v, ci);
    }
    return test_leaf(x, pn->pred, NULL);
}

/* Expression evaluation reports its work here (mc__xstep_t): the same units as the matcher's. */
static bool expr_step(void *ctx, uint32_t units)
{
    return step(ctx, units);
}

/* $expr: the expression's value, converted to a boolean. An evaluation error makes the
 * document not match and is reported through x->err; a budget that runs out during it stops
 * the evaluation like any other step. */
static bool eval_expr(eval_t *x, const node_t *n, const uint8_t *data, uint32_t len)
{
    mc__xval_t v;
    mc_error_t local;
    if (x->failed) {
        return false;
    }
    mc__xstep_t xs = {.step = expr_step, .ctx = x};
    if (mc__expr_eval_steps(x->xprog, n->expr, data, len, &xs, &v, x->err ? x->err : &local) < 0) {
        if (!x->stop) {
            x->failed = true;
        }
        return false;
    }
    bool t = mc__xval_truthy(&v);
    mc__xval_release(&v);
    return t && !x->stop;
}

static bool eval_doc(eval_t *x, const node_t *n, const uint8_t *data, uint32_t len)
{
    if (!step(x, 1)) {
        return false;
    }
    switch (n->kind) {
    case N_AND:
        for (size_t i = 0; i < n->nkids; i++) {
            if (!eval_doc(x, n->kids[i], data, len)) {
                return false;
            }
        }
        return !x->stop;
    case N_OR:
        for (size_t i = 0; i < n->nkids; i++) {
            if (eval_doc(x, n->kids[i], data, len)) {
                return !x->stop;
            }
        }
        return false;
    case N_NOR:
        for (size_t i = 0; i < n->nkids; i++) {
            if (eval_doc(x, n->kids[i], data, len)) {
                return false;
            }
        }
        return !x->stop;
    case N_NOT: return !eval_doc(x, n->kids[0], data, len) && !x->stop;
    case N_EXPR: return eval_expr(x, n, data, len);
    case N_PATH: return visit_doc(x, n, data, len, 0);
    default: return false;
    }
}

/* ---------------------------------------------------------------- parsing */

static int parse_query(parse_ctx_t *c, const bson_value_t *doc, int depth, node_t **out);
static int parse_ops(parse_ctx_t *c, const char *path, const bson_value_t *ops, int depth,
                     node_t *into);

static int check_depth(parse_ctx_t *c, int depth)
{
    if (depth > c->max_depth) {
        return mc_error_set(c->err, MC_ELIMIT, MC_DOMAIN_MONGODB, BAD_VALUE,
                            "filter nested deeper than %d levels", c->max_depth);
    }
    return 0;
}

static bool is_operator_doc(const bson_value_t *v)
{
    bson_iter_t it;
    return v->value_type == BSON_TYPE_DOCUMENT &&
           safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
           bson_iter_next(&it) && bson_iter_key(&it)[0] == '$';
}

/* Wraps a predicate for `path`: a PATH node at field level, the bare predicate when `path` is
 * NULL (inside a value-form $elemMatch, where predicates apply to the element itself). */
static node_t *wrap(parse_ctx_t *c, const char *path, node_t *pred)
{
    if (!pred || !path) {
        return pred;
    }
    node_t *pn = node_new(c, N_PATH);
    if (!pn) {
        return NULL;
    }
    size_t plen = strlen(path);
    pn->path = malloc(plen + 1);
    size_t ncomp = 1;
    for (size_t i = 0; i < plen; i++) {
        ncomp += path[i] == '.';
    }
    if (ncomp > MAX_PATH_COMPONENTS) {
        mc_error_set(c->err, MC_ELIMIT, MC_DOMAIN_MONGODB, BAD_VALUE,
                     "field path has more than %d components", MAX_PATH_COMPONENTS);
        return NULL;
    }
    pn->comp = calloc(ncomp, sizeof(char *));
    pn->comp_len = calloc(ncomp, sizeof(uint32_t));
    if (!pn->path || !pn->comp || !pn->comp_len) {
        oom(c);
        return NULL;
    }
    memcpy(pn->path, path, plen + 1);
    size_t k = 0, start = 0;
    for (size_t i = 0; i <= plen; i++) {
        if (i == plen || path[i] == '.') {
            pn->path[i] = '\0';
            pn->comp[k] = pn->path + start;
            pn->comp_len[k] = (uint32_t)(i - start);
            k++;
            start = i + 1;
        }
    }
    pn->ncomp = ncomp;
    pn->pred = pred;
    return pn;
}

static node_t *make_not(parse_ctx_t *c, node_t *kid)
{
    if (!kid) {
        return NULL;
    }
    node_t *n = node_new(c, N_NOT);
    if (!n || node_add(c, n, kid) < 0) {
        return NULL;
    }
    return n;
}

static node_t *eq_or_regex(parse_ctx_t *c, const bson_value_t *v)
{
    if (v->value_type == BSON_TYPE_REGEX) {
        node_t *p = pred_new(c, P_REGEX);
        if (!p) {
            return NULL;
        }
        rx_t *rx = rx_new(c, v->value.v_regex.regex, strlen(v->value.v_regex.regex),
                          v->value.v_regex.options ? v->value.v_regex.options : "");
        if (!rx) {
            return NULL;
        }
        p->rxs = malloc(sizeof(rx_t *));
        if (!p->rxs) {
            oom(c);
            return NULL;
        }
        p->rxs[0] = rx;
        p->nrxs = 1;
        return p;
    }
    if (v->value_type == BSON_TYPE_UNDEFINED) {
        mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE,
                     "cannot compare to undefined");
        return NULL;
    }
    node_t *p = pred_new(c, P_EQ);
    if (p) {
        p->val = *v;
    }
    return p;
}

static node_t *parse_in(parse_ctx_t *c, const char *op, const bson_value_t *v)
{
    bson_iter_t it;
    if (v->value_type != BSON_TYPE_ARRAY) {
        bad(c, "%s needs an array", op);
        return NULL;
    }
    node_t *p = pred_new(c, P_IN);
    if (!p || !safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        if (p) {
            bad(c, "%s: malformed array", op);
        }
        return NULL;
    }
    size_t n = 0;
    while (bson_iter_next(&it)) {
        n++;
    }
    p->vals = calloc(n ? n : 1, sizeof(bson_value_t));
    p->rxs = calloc(n ? n : 1, sizeof(rx_t *));
    if (!p->vals || !p->rxs) {
        oom(c);
        return NULL;
    }
    safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len);
    while (bson_iter_next(&it)) {
        const bson_value_t *e = bson_iter_value(&it);
        if (is_operator_doc(e)) {
            bad(c, "cannot nest $ under %s", op);
            return NULL;
        }
        if (e->value_type == BSON_TYPE_REGEX) {
            rx_t *rx = rx_new(c, e->value.v_regex.regex, strlen(e->value.v_regex.regex),
                              e->value.v_regex.options ? e->value.v_regex.options : "");
            if (!rx) {
                return NULL;
            }
            p->rxs[p->nrxs++] = rx;
        } else if (e->value_type == BSON_TYPE_UNDEFINED) {
            bad(c, "InMatchExpression equality cannot be undefined%s", "");
            return NULL;
        } else {
            p->vals[p->nvals++] = *e;
        }
    }
    return p;
}

static bool get_integral(const bson_value_t *v, int64_t *out)
{
    switch (v->value_type) {
    case BSON_TYPE_INT32: *out = v->value.v_int32; return true;
    case BSON_TYPE_INT64: *out = v->value.v_int64; return true;
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_DECIMAL128: {
        double d = mc__bson_value_as_double(v);
        if (!isfinite(d) || d != floor(d) || d > 9.0e18 || d < -9.0e18) {
            return false;
        }
        *out = (int64_t)d;
        return true;
    }
    default: return false;
    }
}

static const struct {
    const char *alias;
    int code;
} type_aliases[] = {
    {"double", 1},      {"string", 2},     {"object", 3},
    {"array", 4},       {"binData", 5},    {"undefined", 6},
    {"objectId", 7},    {"bool", 8},       {"date", 9},
    {"null", 10},       {"regex", 11},     {"dbPointer", 12},
    {"javascript", 13}, {"symbol", 14},    {"javascriptWithScope", 15},
    {"int", 16},        {"timestamp", 17}, {"long", 18},
    {"decimal", 19},    {"minKey", -1},    {"maxKey", 127},
};

static int add_type(parse_ctx_t *c, node_t *p, const bson_value_t *v)
{
    if (v->value_type == BSON_TYPE_UTF8) {
        if (strcmp(v->value.v_utf8.str, "number") == 0) {
            p->type_number = true;
            return 0;
        }
        for (size_t i = 0; i < sizeof(type_aliases) / sizeof(type_aliases[0]); i++) {
            if (strcmp(v->value.v_utf8.str, type_aliases[i].alias) == 0) {
                p->types[(uint8_t)type_aliases[i].code] = true;
                return 0;
            }
        }
        return bad(c, "Unknown type name alias: %s", v->value.v_utf8.str);
    }
    int64_t code;
    if (mc__bson_is_number(v->value_type)) {
        if (!get_integral(v, &code) || !(code == -1 || code == 127 || (code >= 1 && code <= 19))) {
            return bad(c, "Invalid numerical type code%s", "");
        }
        p->types[(uint8_t)code] = true;
        return 0;
    }
    return bad(c, "type must be represented as a number or a string%s", "");
}

static node_t *parse_type(parse_ctx_t *c, const bson_value_t *v)
{
    node_t *p = pred_new(c, P_TYPE);
    if (!p) {
        return NULL;
    }
    if (v->value_type == BSON_TYPE_ARRAY) {
        bson_iter_t it;
        size_t n = 0;
        if (safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
            while (bson_iter_next(&it)) {
                if (add_type(c, p, bson_iter_value(&it)) < 0) {
                    return NULL;
                }
                n++;
            }
        }
        if (n == 0) {
            bad(c, "%s must match at least one type", "$type");
            return NULL;
        }
        return p;
    }
    return add_type(c, p, v) < 0 ? NULL : p;
}

static node_t *parse_regex_op(parse_ctx_t *c, const bson_value_t *re, const bson_value_t *opts)
{
    const char *pattern, *flags = "";
    size_t plen;
    if (re->value_type == BSON_TYPE_REGEX) {
        pattern = re->value.v_regex.regex;
        plen = strlen(pattern);
        flags = re->value.v_regex.options ? re->value.v_regex.options : "";
        if (opts && *flags) {
            bad(c, "options set in both $regex and $options%s", "");
            return NULL;
        }
    } else if (re->value_type == BSON_TYPE_UTF8) {
        pattern = re->value.v_utf8.str;
        plen = re->value.v_utf8.len;
    } else {
        bad(c, "%s has to be a string", "$regex");
        return NULL;
    }
    if (opts) {
        if (opts->value_type != BSON_TYPE_UTF8) {
            bad(c, "%s has to be a string", "$options");
            return NULL;
        }
        flags = opts->value.v_utf8.str;
    }
    node_t *p = pred_new(c, P_REGEX);
    if (!p) {
        return NULL;
    }
    rx_t *rx = rx_new(c, pattern, plen, flags);
    p->rxs = malloc(sizeof(rx_t *));
    if (!rx || !p->rxs) {
        if (rx) {
            oom(c);
        }
        return NULL;
    }
    p->rxs[0] = rx;
    p->nrxs = 1;
    return p;
}

static bool elem_match_is_value_form(const bson_value_t *v)
{
    bson_iter_t it;
    if (!safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return false;
    }
    const char *k = bson_iter_key(&it);
    return k[0] == '$' && strcmp(k, "$and") != 0 && strcmp(k, "$or") != 0 &&
           strcmp(k, "$nor") != 0 && strcmp(k, "$where") != 0 && strcmp(k, "$expr") != 0 &&
           strcmp(k, "$comment") != 0 && strcmp(k, "$alwaysTrue") != 0 &&
           strcmp(k, "$alwaysFalse") != 0;
}

static node_t *parse_elem_match(parse_ctx_t *c, const bson_value_t *v, int depth)
{
    if (v->value_type != BSON_TYPE_DOCUMENT) {
        bad(c, "%s needs an Object", "$elemMatch");
        return NULL;
    }
    if (check_depth(c, depth + 1) < 0) {
        return NULL;
    }
    node_t *inner = NULL;
    node_t *p;
    if (elem_match_is_value_form(v)) {
        p = pred_new(c, P_ELEM_VAL);
        inner = p ? node_new(c, N_AND) : NULL;
        if (!inner || parse_ops(c, NULL, v, depth + 1, inner) < 0) {
            return NULL;
        }
    } else {
        p = pred_new(c, P_ELEM_OBJ);
        c->in_elem_match++;
        int rc = p ? parse_query(c, v, depth + 1, &inner) : MC_ENOMEM;
        c->in_elem_match--;
        if (rc < 0) {
            return NULL;
        }
    }
    return node_add(c, p, inner) < 0 ? NULL : p;
}

static int parse_all(parse_ctx_t *c, const char *path, const bson_value_t *v, int depth,
                     node_t *into)
{
    bson_iter_t it;
    if (v->value_type != BSON_TYPE_ARRAY ||
        !safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        return bad(c, "%s needs an array", "$all");
    }
    node_t *and = node_new(c, N_AND);
    if (!and) {
        return MC_ENOMEM;
    }
    int n = 0, n_elem = 0;
    while (bson_iter_next(&it)) {
        const bson_value_t *e = bson_iter_value(&it);
        bson_iter_t sub;
        node_t *pred;
        bool is_elem = e->value_type == BSON_TYPE_DOCUMENT &&
                       safe_iter_init(&sub, e->value.v_doc.data, e->value.v_doc.data_len) &&
                       bson_iter_next(&sub) && strcmp(bson_iter_key(&sub), "$elemMatch") == 0;
        n++;
        if (is_elem) {
            n_elem++;
            pred = parse_elem_match(c, bson_iter_value(&sub), depth);
        } else if (is_operator_doc(e)) {
            return bad(c, "no $ expressions in %s", "$all");
        } else {
            pred = eq_or_regex(c, e);
        }
        node_t *w = wrap(c, path, pred);
        if (!w || node_add(c, and, w) < 0) {
            return MC_EINVAL;
        }
    }
    if (n_elem && n_elem != n) {
        return bad(c, "%s/$elemMatch has to be consistent", "$all");
    }
    if (n == 0) {
        /* {$all: []} matches nothing. */
        and->kind = N_OR;
    }
    return node_add(c, into, and);
}

static const char *const unsupported_ops[] = {
    "$geoWithin",    "$geoIntersects", "$near",         "$nearSphere", "$within", "$bitsAllSet",
    "$bitsAllClear", "$bitsAnySet",    "$bitsAnyClear", "$jsonSchema", "$text",   "$sampleRate",
};

static bool in_list(const char *k, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(k, list[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* Parses an operator document {$gt: 1, $lt: 5} for `path` (NULL in value mode) and adds one
 * node per operator to `into`. */
static int parse_ops(parse_ctx_t *c, const char *path, const bson_value_t *ops, int depth,
                     node_t *into)
{
    bson_iter_t it;
    if (check_depth(c, depth) < 0) {
        return MC_ELIMIT;
    }
    if (!safe_iter_init(&it, ops->value.v_doc.data, ops->value.v_doc.data_len)) {
        return bad(c, "malformed operator document%s", "");
    }
    bson_value_t regex_v, options_v;
    const bson_value_t *regex = NULL, *options = NULL;
    while (bson_iter_next(&it)) {
        const char *op = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        node_t *n = NULL;
        if (op[0] != '$') {
            return bad(c, "unknown operator: %s", op);
        }
        if (strcmp(op, "$eq") == 0) {
            if (v->value_type == BSON_TYPE_UNDEFINED) {
                return bad(c, "cannot compare to undefined%s", "");
            }
            n = pred_new(c, P_EQ);
            if (n) {
                n->val = *v;
            }
            n = wrap(c, path, n);
        } else if (strcmp(op, "$ne") == 0) {
            if (v->value_type == BSON_TYPE_REGEX) {
                return bad(c, "Can't have regex as arg to %s", "$ne");
            }
            n = pred_new(c, P_EQ);
            if (n) {
                n->val = *v;
            }
            n = make_not(c, wrap(c, path, n));
        } else if (strcmp(op, "$gt") == 0 || strcmp(op, "$gte") == 0 || strcmp(op, "$lt") == 0 ||
                   strcmp(op, "$lte") == 0) {
            node_kind_t k =
                op[1] == 'g' ? (op[3] == 'e' ? P_GTE : P_GT) : (op[3] == 'e' ? P_LTE : P_LT);
            if (v->value_type == BSON_TYPE_UNDEFINED) {
                return bad(c, "cannot compare to undefined%s", "");
            }
            n = pred_new(c, k);
            if (n) {
                n->val = *v;
            }
            n = wrap(c, path, n);
        } else if (strcmp(op, "$in") == 0) {
            n = wrap(c, path, parse_in(c, op, v));
        } else if (strcmp(op, "$nin") == 0) {
            n = make_not(c, wrap(c, path, parse_in(c, op, v)));
        } else if (strcmp(op, "$exists") == 0) {
            bson_iter_t tmp = it;
            n = wrap(c, path, pred_new(c, P_EXISTS));
            if (n && !bson_iter_as_bool(&tmp)) {
                n = make_not(c, n);
            }
        } else if (strcmp(op, "$type") == 0) {
            n = wrap(c, path, parse_type(c, v));
        } else if (strcmp(op, "$regex") == 0) {
            regex_v = *v; /* v is the iterator's storage: keep a copy */
            regex = &regex_v;
            continue;
        } else if (strcmp(op, "$options") == 0) {
            options_v = *v;
            options = &options_v;
            continue;
        } else if (strcmp(op, "$size") == 0) {
            int64_t sz;
            if (!mc__bson_is_number(v->value_type)) {
                return bad(c, "%s needs a number", "$size");
            }
            if (!get_integral(v, &sz)) {
                return bad(c, "%s must be a whole number", "$size");
            }
            if (sz < 0) {
                return bad(c, "%s may not be negative", "$size");
            }
            n = pred_new(c, P_SIZE);
            if (n) {
                n->num = sz;
            }
            n = wrap(c, path, n);
        } else if (strcmp(op, "$mod") == 0) {
            bson_iter_t a;
            int64_t d = 0, r = 0;
            int cnt = 0;
            if (v->value_type != BSON_TYPE_ARRAY ||
                !safe_iter_init(&a, v->value.v_doc.data, v->value.v_doc.data_len)) {
                return bad(c, "malformed mod, needs to be an array%s", "");
            }
            while (bson_iter_next(&a)) {
                int64_t x;
                if (!mc__bson_is_number(bson_iter_type(&a))) {
                    return bad(c, "malformed mod, %s", "divisor and remainder must be numbers");
                }
                const bson_value_t *av = bson_iter_value(&a);
                double dv = mc__bson_value_as_double(av);
                if (!get_integral(av, &x)) {
                    if (!isfinite(dv) || dv > 9.0e18 || dv < -9.0e18) {
                        return bad(c, "malformed mod, %s", "divisor and remainder out of range");
                    }
                    x = (int64_t)dv;
                }
                if (cnt == 0) {
                    d = x;
                } else {
                    r = x;
                }
                cnt++;
            }
            if (cnt != 2) {
                return bad(c, "malformed mod, %s",
                           cnt < 2 ? "not enough elements" : "too many elements");
            }
            if (d == 0) {
                return bad(c, "divisor cannot be 0%s", "");
            }
            n = pred_new(c, P_MOD);
            if (n) {
                n->num = d;
                n->num2 = r;
            }
            n = wrap(c, path, n);
        } else if (strcmp(op, "$all") == 0) {
            int rc = parse_all(c, path, v, depth, into);
            if (rc < 0) {
                return rc;
            }
            continue;
        } else if (strcmp(op, "$elemMatch") == 0) {
            n = wrap(c, path, parse_elem_match(c, v, depth));
        } else if (strcmp(op, "$not") == 0) {
            if (v->value_type == BSON_TYPE_REGEX) {
                n = make_not(c, wrap(c, path, eq_or_regex(c, v)));
            } else if (v->value_type == BSON_TYPE_DOCUMENT) {
                bson_iter_t sub;
                if (!safe_iter_init(&sub, v->value.v_doc.data, v->value.v_doc.data_len) ||
                    !bson_iter_next(&sub)) {
                    return bad(c, "%s cannot be empty", "$not");
                }
                if (bson_iter_key(&sub)[0] != '$') {
                    return bad(c, "unknown operator: %s", bson_iter_key(&sub));
                }
                node_t *and = node_new(c, N_AND);
                if (!and || parse_ops(c, path, v, depth + 1, and) < 0) {
                    return MC_EINVAL;
                }
                n = make_not(c, and);
            } else {
                return bad(c, "%s needs a regex or a document", "$not");
            }
        } else if (strcmp(op, "$where") == 0 || strcmp(op, "$expr") == 0 ||
                   strcmp(op, "$function") == 0 || strcmp(op, "$accumulator") == 0) {
            return bad(c, "%s is not allowed in a field condition", op);
        } else if (in_list(op, unsupported_ops, sizeof(unsupported_ops) / sizeof(char *))) {
            return bad(c, "%s is not supported by this matcher", op);
        } else {
            return bad(c, "unknown operator: %s", op);
        }
        if (!n || node_add(c, into, n) < 0) {
            return c->err ? c->err->code : MC_EINVAL;
        }
    }
    if (options && !regex) {
        return bad(c, "%s needs a $regex", "$options");
    }
    if (regex) {
        node_t *n = wrap(c, path, parse_regex_op(c, regex, options));
        if (!n || node_add(c, into, n) < 0) {
            return MC_EINVAL;
        }
    }
    return 0;
}

static int parse_logical(parse_ctx_t *c, const char *op, const bson_value_t *v, int depth,
                         node_kind_t kind, node_t *into)
{
    bson_iter_t it;
    if (v->value_type != BSON_TYPE_ARRAY ||
        !safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        return bad(c, "%s must be an array", op);
    }
    node_t *n = node_new(c, kind);
    if (!n) {
        return MC_ENOMEM;
    }
    while (bson_iter_next(&it)) {
        const bson_value_t *e = bson_iter_value(&it);
        node_t *kid = NULL;
        if (e->value_type != BSON_TYPE_DOCUMENT) {
            return bad(c, "%s argument's entries must be objects", op);
        }
        int rc = parse_query(c, e, depth + 1, &kid);
        if (rc < 0) {
            return rc;
        }
        if (node_add(c, n, kid) < 0) {
            return MC_ENOMEM;
        }
    }
    if (n->nkids == 0) {
        return bad(c, "%s/$or/$nor must be a nonempty array", op);
    }
    return node_add(c, into, n);
}

/* {$expr: <aggregation expression>}: compiled into the filter's expression program. */
static int parse_expr(parse_ctx_t *c, const bson_value_t *v, int depth, node_t *into)
{
    if (c->in_elem_match) {
        return bad(c, "%s can only be applied to the top-level document", "$expr");
    }
    node_t *n = node_new(c, N_EXPR);
    if (!n) {
        return MC_ENOMEM;
    }
    int rc = mc__expr_compile(&c->f->xprog, v, depth + 1, &n->expr, c->err);
    if (rc < 0) {
        return rc;
    }
    if (count_predicate(c) < 0) {
        return MC_ELIMIT;
    }
    return node_add(c, into, n);
}

static int parse_query(parse_ctx_t *c, const bson_value_t *doc, int depth, node_t **out)
{
    bson_iter_t it;
    if (check_depth(c, depth) < 0) {
        return MC_ELIMIT;
    }
    node_t *and = node_new(c, N_AND);
    if (!and) {
        return MC_ENOMEM;
    }
    if (!safe_iter_init(&it, doc->value.v_doc.data, doc->value.v_doc.data_len)) {
        return bad(c, "malformed query document%s", "");
    }
    while (bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        int rc = 0;
        if (key[0] == '$') {
            bool code_op = strcmp(key, "$where") == 0 || strcmp(key, "$expr") == 0 ||
                           strcmp(key, "$function") == 0 || strcmp(key, "$accumulator") == 0;
            if (strcmp(key, "$and") == 0) {
                rc = parse_logical(c, key, v, depth, N_AND, and);
            } else if (strcmp(key, "$or") == 0) {
                rc = parse_logical(c, key, v, depth, N_OR, and);
            } else if (strcmp(key, "$nor") == 0) {
                rc = parse_logical(c, key, v, depth, N_NOR, and);
            } else if (strcmp(key, "$comment") == 0) {
                continue;
            } else if (strcmp(key, "$alwaysTrue") == 0 || strcmp(key, "$alwaysFalse") == 0) {
                node_t *n = node_new(c, key[7] == 'T' ? N_AND : N_OR);
                rc = n ? (count_predicate(c) < 0 ? MC_ELIMIT : node_add(c, and, n)) : MC_ENOMEM;
            } else if (code_op && c->opts && c->opts->refuse_code_operators) {
                rc = bad(c, "%s is not allowed in this filter", key);
            } else if (strcmp(key, "$expr") == 0) {
                rc = parse_expr(c, v, depth, and);
            } else if (code_op) {
                rc = bad(c, "%s is not supported by this matcher", key);
            } else if (in_list(key, unsupported_ops, sizeof(unsupported_ops) / sizeof(char *))) {
                rc = bad(c, "%s is not supported by this matcher", key);
            } else {
                rc = bad(c, "unknown top level operator: %s", key);
            }
        } else if (is_operator_doc(v)) {
            rc = parse_ops(c, key, v, depth + 1, and);
        } else {
            node_t *n = wrap(c, key, eq_or_regex(c, v));
            rc = n ? node_add(c, and, n) : MC_EINVAL;
        }
        if (rc < 0) {
            return rc;
        }
    }
    *out = and->nkids == 1 ? and->kids[0] : and;
    return 0;
}

/* ---------------------------------------------------------------- $var substitution */

static int check_var_value(parse_ctx_t *c, const char *name, const bson_value_t *v, int depth)
{
    bson_iter_t it;
    if (v->value_type == BSON_TYPE_REGEX || v->value_type == BSON_TYPE_CODE ||
        v->value_type == BSON_TYPE_CODEWSCOPE) {
        return mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE,
                            "variable %s: regular expressions and code are not allowed in "
                            "variable values",
                            name);
    }
    if (v->value_type != BSON_TYPE_DOCUMENT && v->value_type != BSON_TYPE_ARRAY) {
        return 0;
    }
    if (depth > c->max_depth) {
        return mc_error_set(c->err, MC_ELIMIT, MC_DOMAIN_MONGODB, BAD_VALUE,
                            "variable %s nested deeper than %d levels", name, c->max_depth);
    }
    if (!safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len)) {
        return bad(c, "variable %s: malformed value", name);
    }
    bool first = true;
    while (bson_iter_next(&it)) {
        if (first && v->value_type == BSON_TYPE_DOCUMENT && bson_iter_key(&it)[0] == '$') {
            return mc_error_set(c->err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE,
                                "variable %s: operators (%s) are not allowed in variable values",
                                name, bson_iter_key(&it));
        }
        first = false;
        int rc = check_var_value(c, name, bson_iter_value(&it), depth + 1);
        if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

/* Copies the elements of `src` into `dst`, replacing {$var: name} values. Inside $expr
 * (`in_expr`) the bound value becomes {$literal: value}: a string such as "$secret" or "$$ROOT"
 * from a subscriber must stay a value, never turn into a field path. */
static int substitute(parse_ctx_t *c, const uint8_t *data, uint32_t len, bson_t *dst, int depth,
                      bool in_expr)
{
    bson_iter_t it;
    if (depth > c->max_depth) {
        return mc_error_set(c->err, MC_ELIMIT, MC_DOMAIN_MONGODB, BAD_VALUE,
                            "filter nested deeper than %d levels", c->max_depth);
    }
    if (!safe_iter_init(&it, data, len)) {
        return bad(c, "malformed BSON in filter%s", "");
    }
    while (bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        int klen = (int)bson_iter_key_len(&it);
        const bson_value_t *v = bson_iter_value(&it);
        bool ok = true;
        if (v->value_type == BSON_TYPE_DOCUMENT || v->value_type == BSON_TYPE_ARRAY) {
            bson_iter_t sub;
            if (!safe_iter_init(&sub, v->value.v_doc.data, v->value.v_doc.data_len)) {
                return bad(c, "malformed BSON in filter%s", "");
            }
            if (v->value_type == BSON_TYPE_DOCUMENT && bson_iter_next(&sub) &&
                strcmp(bson_iter_key(&sub), "$var") == 0) {
                bson_iter_t rest = sub;
                if (bson_iter_next(&rest)) {
                    return bad(c, "%s must be the only field of its document", "$var");
                }
                if (!BSON_ITER_HOLDS_UTF8(&sub)) {
                    return bad(c, "%s needs a variable name (a string)", "$var");
                }
                const char *name = bson_iter_utf8(&sub, NULL);
                bson_iter_t var;
                if (!c->opts || !c->opts->vars || !bson_iter_init_find(&var, c->opts->vars, name)) {
                    return bad(c, "variable %s not bound", name);
                }
                const bson_value_t *bound = bson_iter_value(&var);
                int rc = check_var_value(c, name, bound, 0);
                if (rc < 0) {
                    return rc;
                }
                if (in_expr) {
                    bson_t lit;
                    ok = bson_append_document_begin(dst, key, klen, &lit) &&
                         bson_append_value(&lit, "$literal", 8, bound) &&
                         bson_append_document_end(dst, &lit);
                } else {
                    ok = bson_append_value(dst, key, klen, bound);
                }
            } else {
                bson_t child;
                if (v->value_type == BSON_TYPE_DOCUMENT) {
                    ok = bson_append_document_begin(dst, key, klen, &child);
                } else {
                    ok = bson_append_array_begin(dst, key, klen, &child);
                }
                if (!ok) {
                    return bad(c, "filter too large%s", "");
                }
                int rc = substitute(c, v->value.v_doc.data, v->value.v_doc.data_len, &child,
                                    depth + 1, in_expr || strcmp(key, "$expr") == 0);
                if (rc < 0) {
                    return rc;
                }
                ok = v->value_type == BSON_TYPE_DOCUMENT ? bson_append_document_end(dst, &child)
                                                         : bson_append_array_end(dst, &child);
            }
        } else {
            ok = bson_append_value(dst, key, klen, v);
        }
        if (!ok) {
            return bad(c, "filter too large%s", "");
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- public API */

mc_filter_t *mc_filter_new(const bson_t *query, const mc_filter_opts_t *opts, mc_error_t *err)
{
    if (!query) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE, "filter must be a document");
        return NULL;
    }
    mc_filter_t *f = calloc(1, sizeof(*f));
    if (!f) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    f->query = bson_new();
    parse_ctx_t c = {.f = f, .opts = opts, .err = err};
    c.max_depth = opts && opts->max_depth > 0 ? opts->max_depth : DEFAULT_MAX_DEPTH;
    mc_expr_opts_t xopts = {.max_depth = c.max_depth + 1};
    mc__xprog_init(&f->xprog, &xopts);
    if (substitute(&c, bson_get_data(query), query->len, f->query, 1, false) < 0) {
        mc_filter_destroy(f);
        return NULL;
    }
    bson_value_t root = {.value_type = BSON_TYPE_DOCUMENT};
    root.value.v_doc.data = (uint8_t *)bson_get_data(f->query);
    root.value.v_doc.data_len = f->query->len;
    if (parse_query(&c, &root, 0, &f->root) < 0) {
        mc_filter_destroy(f);
        return NULL;
    }
    return f;
}

/* One evaluation. `err` and `failed` (both may be NULL) receive a $expr evaluation error. */
static bool match(const mc_filter_t *filter, const bson_t *doc, mc_filter_budget_t *budget,
                  bool strict, mc_error_t *err, bool *failed)
{
    if (!filter || !doc || budget->exceeded) {
        return false;
    }
    eval_t x; /* the arena stays uninitialised until a regex needs it */
    x.b = budget;
    x.stop = false;
    x.strict = strict;
    x.rx_ready = false;
    x.callouts = 0;
    x.arena_used = 0;
    x.xprog = &filter->xprog;
    x.err = err;
    x.failed = false;
    bool r = eval_doc(&x, filter->root, bson_get_data(doc), doc->len);
    eval_cleanup(&x);
    if (failed) {
        *failed = x.failed;
    }
    return r && !x.stop && !x.failed;
}

bool mc_filter_match(const mc_filter_t *filter, const bson_t *doc)
{
    mc_filter_budget_t budget = {0};
    return match(filter, doc, &budget, false, NULL, NULL);
}

bool mc_filter_match_budget(const mc_filter_t *filter, const bson_t *doc,
                            mc_filter_budget_t *budget)
{
    return match(filter, doc, budget, true, NULL, NULL);
}

int mc__filter_eval(const mc_filter_t *filter, const bson_t *doc, mc_filter_budget_t *budget,
                    mc_error_t *err)
{
    if (!filter || !doc) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, BAD_VALUE, "no filter or document");
    }
    /* No budget: the work is still capped (RX_MAX_STEPS), and a regex past its limits counts
     * as no match, as with mc_filter_match(). With one, a limit stops the evaluation. */
    mc_filter_budget_t none = {0};
    bool failed = false;
    bool r = match(filter, doc, budget ? budget : &none, budget != NULL, err, &failed);
    if (budget && budget->exceeded) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT, "%s",
                            budget->reason ? budget->reason : "CPU budget exhausted");
    }
    if (failed) {
        return err && err->code < 0 ? err->code : MC_EINVAL;
    }
    return r ? 1 : 0;
}

bool mc_filter_is_empty(const mc_filter_t *filter)
{
    return !filter || filter->npredicates == 0;
}

void mc_filter_destroy(mc_filter_t *filter)
{
    if (!filter) {
        return;
    }
    for (size_t i = 0; i < filter->nnodes; i++) {
        node_free(filter->nodes[i]);
    }
    for (size_t i = 0; i < filter->nrxs; i++) {
        pcre2_code_free(filter->rxs[i]->code);
        free(filter->rxs[i]);
    }
    free(filter->nodes);
    free(filter->rxs);
    mc__xprog_free(&filter->xprog);
    bson_destroy(filter->query);
    free(filter);
}
