/*
 * mongocast/filter.h: MongoDB query matching over BSON documents.
 *
 * One matcher serves mongo-emulator (find, update, delete, change-stream $match) and the
 * mongocast daemon (subscriber `filter=` queries and `$match` stages with `{$var: name}`).
 * A query is compiled once with mc_filter_new() and then matched many times; a compiled
 * filter is immutable, so one filter may be matched from several threads at once.
 *
 * Supported: implicit equality, $eq $ne $gt $gte $lt $lte $in $nin $exists $type $and $or
 * $nor $not $regex (with $options i m s x) $size $all $elemMatch, dotted paths with MongoDB's
 * array semantics (a path through an array matches if any element matches; numeric path
 * components index arrays), and comparisons in MongoDB's canonical BSON type order.
 * $expr takes the aggregation expressions of mongocast/pipeline.h (comparisons of two fields,
 * arithmetic, $cond, ...) at the top level of the query (not inside $elemMatch); a document
 * whose expression fails to evaluate (e.g. $add on a string) does not match.
 */
#ifndef MONGOCAST_FILTER_H
#define MONGOCAST_FILTER_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

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

/* True when `doc` matches. Never fails: a document that cannot match returns false. */
bool mc_filter_match(const mc_filter_t *filter, const bson_t *doc);

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
