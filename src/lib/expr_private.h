/*
 * expr_private.h: the aggregation-expression compiler and evaluator behind mongocast/pipeline.h,
 * for the library's own modules (filter.c's $expr, pipeline_eval.c's stages and projections).
 * Not installed, not public.
 *
 * A program (mc__xprog_t) owns the nodes of one or more compiled expressions. Nodes borrow
 * their constants and field names from the specification they were compiled from, which must
 * outlive the program (the public objects keep a private copy for that). Evaluation results
 * are views into the root document or the specification whenever possible; `owned` says when
 * a value was built and must be released.
 *
 * Pure functions over immutable programs: any thread.
 */
#ifndef MC_EXPR_PRIVATE_H
#define MC_EXPR_PRIVATE_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

#include "mongocast/error.h"
#include "mongocast/pipeline.h"

#define MC__EXPR_DEFAULT_MAX_DEPTH 100
#define MC__EXPR_DEFAULT_MAX_NODES 100000
#define MC__EXPR_DEFAULT_MAX_VALUE (16 * 1024 * 1024)

typedef struct mc__xnode mc__xnode_t;

typedef struct mc__xprog {
    mc__xnode_t **nodes;
    size_t n, cap;
    size_t max_nodes;
    int max_depth;
    size_t max_value;
} mc__xprog_t;

/* An evaluation result: a missing value has type BSON_TYPE_EOD. */
typedef struct mc__xval {
    bson_value_t v;
    bool owned; /* v's strings/buffers were allocated for it (release with mc__xval_release) */
} mc__xval_t;

/* Sets the program's limits from `opts` (NULL: defaults). */
void mc__xprog_init(mc__xprog_t *prog, const mc_expr_opts_t *opts);
/* Frees every node of the program (not the specification). */
void mc__xprog_free(mc__xprog_t *prog);

/* Compiles `spec` (borrowed for the program's lifetime) at nesting `depth` of the caller's
 * specification. Returns 0 with *out, or a negative status with `err`. */
int mc__expr_compile(mc__xprog_t *prog, const bson_value_t *spec, int depth, mc__xnode_t **out,
                     mc_error_t *err);

/* Evaluates `n` with $$ROOT/$$CURRENT bound to the document (root, root_len). */
int mc__expr_eval(const mc__xprog_t *prog, const mc__xnode_t *n, const uint8_t *root,
                  uint32_t root_len, mc__xval_t *out, mc_error_t *err);

/* A cost budget for one evaluation: step(ctx, units) is called with the work done (one unit
 * per node evaluated and per field or array element visited); when it returns false the
 * evaluation stops with MC_ELIMIT ("expression evaluation budget exhausted"). The matcher
 * and the pipeline stages pass their mc_filter_budget_t this way, so a $expr, a computed field
 * or a $replaceRoot counts against a subscriber's budget. */
typedef struct mc__xstep {
    bool (*step)(void *ctx, uint32_t units);
    void *ctx;
} mc__xstep_t;

/* Reports `units` of work to `steps` (NULL: no budget): 0, or MC_ELIMIT with `err` once the
 * budget has run out. The pipeline stages count the fields they copy this way. */
int mc__xstep_take(const mc__xstep_t *steps, uint32_t units, mc_error_t *err);

/* mc__expr_eval() within `steps` (NULL: no budget). */
int mc__expr_eval_steps(const mc__xprog_t *prog, const mc__xnode_t *n, const uint8_t *root,
                        uint32_t root_len, const mc__xstep_t *steps, mc__xval_t *out,
                        mc_error_t *err);

/* mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, cause, ...): a MongoDB error with its code. */
int mc__expr_fail(mc_error_t *err, int cause, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

void mc__xval_release(mc__xval_t *v);
bool mc__xval_truthy(const mc__xval_t *v);

/* True when `v` is a document whose first key starts with '$' (an operator expression). */
bool mc__expr_is_operator_doc(const bson_value_t *v);

/* Evaluates a compiled query (filter.c) and reports $expr evaluation errors: 1 match, 0 no
 * match, <0 error with `err`. Without `budget` (NULL) it is mc_filter_match() with the error;
 * within one it is mc_filter_match_budget(), and a budget or regex limit that stops it returns
 * MC_ELIMIT with budget->exceeded set. */
struct mc_filter;
struct mc_filter_budget;
int mc__filter_eval(const struct mc_filter *filter, const bson_t *doc,
                    struct mc_filter_budget *budget, mc_error_t *err);

/* Adds `units` of work (fields and array elements visited, nodes evaluated) to `budget`, reading
 * the thread's CPU clock as the matcher does; false once it is exhausted (budget->exceeded and
 * reason set). The pipeline stages count their work against a subscriber's budget this way. */
bool mc__filter_budget_step(struct mc_filter_budget *budget, uint32_t units);

#endif
