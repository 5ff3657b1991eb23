/*
 * mongocast/filter.h: MongoDB query matching over BSON documents.
 *
 * One matcher serves mongo-emulator (find, update, delete, change-stream $match) and the
 * mongocast daemon (subscriber `filter=` queries and `$match` stages with `{$var: name}`).
 * A query is compiled once with mc_filter_new() and then matched many times; a compiled
 * filter is immutable, so one filter may be matched from several threads at once.
 *
 * Supported: implicit equality, $eq $ne $gt $gte $lt $lte $in $nin $exists $type $and $or
 * $nor $not $regex (with $options i m s x u) $size $all $elemMatch, dotted paths with
 * MongoDB's array semantics (a path through an array matches if any element matches; numeric
 * path components index arrays), and comparisons in MongoDB's canonical BSON type order.
 *
 * Regular expressions are PCRE2 (the engine MongoDB uses since 6.1) in UTF-8 mode: i caseless,
 * m multiline (^ and $ at line breaks), s dotall (. matches a newline), x extended (white space
 * and # comments ignored), u accepted and redundant (UTF-8 is always on), any other flag
 * refused with "invalid flag in regex options: F" (51108). A pattern is at most 8192 bytes,
 * valid UTF-8, without NUL bytes, nested at most 64 parentheses deep, without \C; a bad one
 * fails to compile with "Regular expression is invalid: <PCRE2's reason>" (51091). Matching is
 * bounded: PCRE2's match limit (1,000,000 per start position), depth limit (100,000) and heap
 * limit (16 MiB), and a cap on the total work of one evaluation (see mc_filter_budget_t).
 * Subject strings that are not valid UTF-8 are matched safely (an invalid sequence matches
 * nothing).
 *
 * $expr takes the aggregation expressions of mongocast/pipeline.h (comparisons of two fields,
 * arithmetic, $cond, ...) at the top level of the query (not inside $elemMatch); a document
 * whose expression fails to evaluate (e.g. $add on a string) does not match. Its evaluation
 * counts against the same budget as the rest of the query.
 */
#ifndef MONGOCAST_FILTER_H
#define MONGOCAST_FILTER_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mc_filter mc_filter_t;

typedef struct mc_filter_opts {
    /* Maximum nesting depth of operators and sub-documents; 0 means the default (64). */
    int max_depth;
    /* Maximum number of predicates (leaf conditions); 0 means unlimited. */
    int max_predicates;
    /* Refuse $where, $function, $accumulator and $expr with MC_EINVAL (subscriber input:
     * an expression's cost is not bounded by a predicate count). */
    bool refuse_code_operators;
    /* Variables: when not NULL, a value of the form {$var: "name"} in the query is replaced
     * by the value bound to "name" in this document. An unbound name fails with MC_EINVAL and
     * the message "variable NAME not bound"; a bound value that is a document whose first key
     * starts with '$' fails with MC_EINVAL (operator injection). Inside $expr a bound value is
     * always a literal ({$literal: value}), never a field path. When NULL, {$var: ...} is
     * an error too. */
    const bson_t *vars;
} mc_filter_opts_t;

/* Compiles `query` (a MongoDB query document). `opts` may be NULL. Returns NULL and fills
 * `err` (MC_EINVAL, message like MongoDB's: "unknown operator: $foo") on a bad query.
 * The query is copied; the caller keeps ownership of `query`. */
mc_filter_t *mc_filter_new(const bson_t *query, const mc_filter_opts_t *opts, mc_error_t *err);

/* True when `doc` matches. Never fails: a document that cannot match returns false. A
 * regular expression whose evaluation passes a limit counts as not matching (as with
 * MongoDB before 6.1); use mc_filter_match_budget() to be told instead. */
bool mc_filter_match(const mc_filter_t *filter, const bson_t *doc);

/* A cost budget for evaluating filters on one document, shared by every
 * mc_filter_match_budget() call that gets the same struct (e.g. a subscriber's several
 * filters on one event), and by pipeline stages run with mc_pipeline_apply_budget()
 * (mongocast/pipeline.h), which count their work the same way. Zero-initialise it and set
 * `cpu_ns`.
 *
 * Cost is measured as CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID, so a loaded
 * machine does not make a cheap filter look expensive), read only every few thousand steps of
 * work (document fields and array elements visited, values compared, PCRE2 backtracking
 * steps): an evaluation that stays that small never reads the clock, and the budget is
 * counted from the first reading. Without `cpu_ns` the work is still capped (about ten million
 * regex steps per call) so that no evaluation can run unbounded. */
typedef struct mc_filter_budget {
    uint64_t cpu_ns; /* CPU time the evaluations may use; 0: no time limit */
    /* Out: set when an evaluation stopped early (its result is then meaningless) and why:
     * "CPU budget exhausted", "regular expression match limit", "regular expression too
     * expensive" (static strings). A regex limit stops the evaluation only here; plain
     * mc_filter_match() counts it as no match. */
    bool exceeded;
    const char *reason;
    /* Private bookkeeping. */
    uint64_t started_ns;
    uint64_t regex_steps;
    uint32_t units;
} mc_filter_budget_t;

/* Like mc_filter_match() within `budget` (not NULL). Returns false with budget->exceeded set
 * when the budget or a regex limit ran out; a budget that is already exceeded returns false
 * at once. Any thread, like mc_filter_match(). */
bool mc_filter_match_budget(const mc_filter_t *filter, const bson_t *doc,
                            mc_filter_budget_t *budget);

/* True when the query has no conditions (matches every document). */
bool mc_filter_is_empty(const mc_filter_t *filter);

/* NULL-safe. */
void mc_filter_destroy(mc_filter_t *filter);

/* Compares two BSON values in MongoDB's canonical sort order (MinKey < null < numbers <
 * string/symbol < object < array < binData < ObjectId < bool < date < timestamp < regex <
 * MaxKey; numbers compare by value across int32/int64/double/decimal128). Returns <0, 0, >0. */
int mc_bson_value_compare(const bson_value_t *a, const bson_value_t *b);

/* MongoDB's name of a BSON type, as the $type operators use it ("int", "objectId", "date",
 * ...); "missing" for BSON_TYPE_EOD (how expressions represent a missing field) and for
 * unknown types. A static string. */
const char *mc_bson_type_name(bson_type_t type);

#ifdef __cplusplus
}
#endif
#endif
