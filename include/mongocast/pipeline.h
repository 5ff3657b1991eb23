/*
 * mongocast/pipeline.h: MongoDB aggregation expressions, projections and per-document pipeline
 * stages, evaluated over BSON documents without a server.
 *
 * One implementation serves mongo-emulator (aggregate, find projections, change-stream stages
 * after $changeStream, pipeline-style updates) and the mongocast daemon (stages it runs itself,
 * per subscriber, on events it has already received). Everything is compiled once and then
 * evaluated many times:
 *
 *     mc_pipeline_t *p = mc_pipeline_new(stages, NULL, &err);      // once per stream/subscriber
 *     int rc = mc_pipeline_apply(p, event, &out, &err);             // once per event
 *
 * A compiled object is immutable: one may be evaluated from several threads at once. Each
 * keeps a private copy of its specification; the caller keeps ownership of its arguments.
 *
 * Cost per evaluation is bounded by the compiled specification (at most `max_nodes` operators
 * and operands, nested at most `max_depth` deep) times the size of the input document: there
 * are no loops, variables or recursion in the supported language. Evaluation allocates only
 * for values it must build (strings, arrays and documents it creates, and the output
 * document); field paths and comparisons read the input in place. mc_pipeline_apply_budget()
 * and mc_pipeline_test() also bound it in CPU time (a subscriber's budget, mongocast/filter.h).
 *
 * Expressions: "$field.path" (through arrays, collecting values as MongoDB does), "$$ROOT",
 * "$$CURRENT", "$$REMOVE", literals (documents and arrays are evaluated element by element),
 * {$literal}, $add $subtract $multiply $divide $mod $abs $ceil $floor $trunc, $eq $ne $gt $gte
 * $lt $lte $cmp (MongoDB's BSON type order; a missing field is less than null and equal only
 * to another missing field or undefined), $and $or $not (short-circuit), $cond $ifNull $in,
 * $size $isArray $type, $concat $toString. Anything else fails to compile with code 168.
 * Stages: $match (the query language of mongocast/filter.h, including $expr), $project,
 * $addFields/$set, $unset, $replaceRoot, $replaceWith.
 *
 * Errors: MC_EINVAL (MC_ELIMIT for size limits) with domain MC_DOMAIN_MONGODB and `cause` the
 * code MongoDB uses for the same mistake (168 unknown expression, 40324 unknown stage, 16020
 * wrong number of arguments, 16554 $add on a string, 40228 $replaceRoot to a non-document, ...),
 * so that a server emulation can reply with it.
 */
#ifndef MONGOCAST_PIPELINE_H
#define MONGOCAST_PIPELINE_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

#include "mongocast/error.h"
#include "mongocast/filter.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mc_expr_opts {
    /* Maximum nesting of operators, documents and arrays; 0 means the default (100). */
    int max_depth;
    /* Maximum number of operators and operands; 0 means the default (100000). */
    size_t max_nodes;
    /* Largest value (string, array or document) evaluation may build, in bytes; 0 means
     * MongoDB's 16 MB. Exceeding it fails the evaluation with MC_ELIMIT. */
    size_t max_value_bytes;
} mc_expr_opts_t;

/* ---- expressions ---- */

typedef struct mc_expr mc_expr_t;

/* Compiles one aggregation expression (any BSON value: "$a.b", {$add: [...]}, 5, ...).
 * `opts` may be NULL. Returns NULL and fills `err` on a bad expression. */
mc_expr_t *mc_expr_new(const bson_value_t *spec, const mc_expr_opts_t *opts, mc_error_t *err);

/* Evaluates `expr` with $$ROOT and $$CURRENT bound to `root`. Returns 1 with `*out` an owned
 * copy of the value (free it with bson_value_destroy), 0 when the result is missing (a missing
 * field or $$REMOVE; `*out` is then BSON_TYPE_EOD and needs no freeing), or a negative status
 * with `err` (`*out` is then BSON_TYPE_EOD too). */
int mc_expr_eval(const mc_expr_t *expr, const bson_t *root, bson_value_t *out, mc_error_t *err);

/* Evaluates `expr` and converts the result the way $cond, $and and $expr do (false, 0, null,
 * undefined and missing are false; everything else, including "" and [], is true). Allocates
 * nothing for comparisons and field paths. Returns 0 or a negative status with `err`. */
int mc_expr_eval_bool(const mc_expr_t *expr, const bson_t *root, bool *out, mc_error_t *err);

/* NULL-safe. */
void mc_expr_destroy(mc_expr_t *expr);

/* ---- projections ---- */

typedef enum mc_projection_kind {
    MC_PROJECTION_FIND,       /* find's projection: {} keeps the whole document */
    MC_PROJECTION_PROJECT,    /* the $project stage: {} is an error (51272) */
    MC_PROJECTION_ADD_FIELDS, /* $addFields / $set */
} mc_projection_kind_t;

typedef struct mc_projection mc_projection_t;

/* Compiles a projection: inclusion or exclusion (mixing fails with 31253/31254, except _id),
 * dotted paths and sub-documents, through arrays, computed fields (appended after included
 * fields, as MongoDB does). find's $slice, $elemMatch and positional "$" are not supported
 * (code 2). `opts` may be NULL. */
mc_projection_t *mc_projection_new(const bson_t *spec, mc_projection_kind_t kind,
                                   const mc_expr_opts_t *opts, mc_error_t *err);

/* Applies the projection to `doc`; `out` is initialised here (empty on error) and the caller
 * destroys it. Returns 0 or a negative status with `err`. */
int mc_projection_apply(const mc_projection_t *proj, const bson_t *doc, bson_t *out,
                        mc_error_t *err);

/* NULL-safe. */
void mc_projection_destroy(mc_projection_t *proj);

/* ---- per-document pipelines ---- */

typedef struct mc_pipeline_opts {
    mc_expr_opts_t expr;
    /* Bound to {$var: name} placeholders in $match stages, exactly as mc_filter_opts_t.vars
     * (inside $expr a bound value is always a literal, never a field path or an operator).
     * NULL: {$var: ...} fails to compile. */
    const bson_t *vars;
} mc_pipeline_opts_t;

typedef struct mc_pipeline mc_pipeline_t;

/* Compiles `stages` (a BSON array of stage documents, or a document with keys "0", "1", ...)
 * of the per-document stages listed above. Others fail with 40324 naming the stage. `opts` may
 * be NULL. An empty pipeline passes every document unchanged. */
mc_pipeline_t *mc_pipeline_new(const bson_t *stages, const mc_pipeline_opts_t *opts,
                               mc_error_t *err);

/* Runs `doc` through the stages. Returns 1 when it comes out (`out`, initialised here, holds
 * the result), 0 when a $match drops it, or a negative status with `err`. In every case `out`
 * is initialised and the caller destroys it. */
int mc_pipeline_apply(const mc_pipeline_t *pipeline, const bson_t *doc, bson_t *out,
                      mc_error_t *err);

/* mc_pipeline_apply() within `budget` (mongocast/filter.h; NULL: none), which every stage
 * shares: $match stages count as mc_filter_match_budget() does (a regex past its limits stops
 * the evaluation), reshaping stages count every field and array element they visit and every
 * expression node they evaluate. When the budget runs out, returns MC_ELIMIT with
 * budget->exceeded and budget->reason set (`out` is then empty). */
int mc_pipeline_apply_budget(const mc_pipeline_t *pipeline, const bson_t *doc,
                             mc_filter_budget_t *budget, bson_t *out, mc_error_t *err);

/* For a pipeline of $match stages only (mc_pipeline_only_filters()): 1 when `doc` passes
 * every stage, 0 when one drops it, or a negative status with `err` (an $expr that fails to
 * evaluate, a pipeline that reshapes, or MC_ELIMIT with budget->exceeded when `budget`, which
 * may be NULL, ran out). Copies nothing. */
int mc_pipeline_test(const mc_pipeline_t *pipeline, const bson_t *doc, mc_filter_budget_t *budget,
                     mc_error_t *err);

/* Number of stages; true when every stage is a $match (the pipeline only filters, so a caller
 * may keep its own copy of a passing document instead of using `out`). */
size_t mc_pipeline_length(const mc_pipeline_t *pipeline);
bool mc_pipeline_only_filters(const mc_pipeline_t *pipeline);

/* NULL-safe. */
void mc_pipeline_destroy(mc_pipeline_t *pipeline);

#ifdef __cplusplus
}
#endif
#endif
