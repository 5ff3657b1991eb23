/*
 * bson_util.h: internal BSON helpers of libmongocast (canonical type order, numeric
 * comparison, value equality). Pure functions, any thread. Not installed, not public.
 */
#ifndef MC_BSON_UTIL_H
#define MC_BSON_UTIL_H

#include <bson/bson.h>
#include <stdbool.h>

/* Nesting depth beyond which comparisons stop recursing and compare raw bytes instead, so that
 * a hostile deeply nested document cannot exhaust the stack. MongoDB itself refuses documents
 * nested deeper than 180 levels, so real data never reaches it. */
#define MC__BSON_MAX_COMPARE_DEPTH 200

/* MongoDB's canonical type rank (MinKey -1 < undefined 0 < null 5 < numbers 10 < string and
 * symbol 15 < object 20 < array 25 < binData 30 < ObjectId 35 < bool 40 < date 45 <
 * timestamp 47 < regex 50 < dbPointer 55 < code 60 < code with scope 65 < MaxKey 100). */
int mc__bson_canon_rank(bson_type_t type);

/* bson_iter_init_from_data that refuses a NULL buffer: malformed BSON can hold a zero-length
 * sub-document, which bson_value_copy turns into a NULL pointer that libbson would assert on. */
static inline bool mc__bson_iter_init_safe(bson_iter_t *it, const uint8_t *data, size_t len)
{
    return data && bson_iter_init_from_data(it, data, len);
}

/* True for int32, int64, double and decimal128. */
bool mc__bson_is_number(bson_type_t type);

/* True for a double or decimal128 NaN. */
bool mc__bson_value_is_nan(const bson_value_t *v);

/* Numeric value as a double (decimal128 through its string form); 0 for non-numbers. */
double mc__bson_value_as_double(const bson_value_t *v);

/* Same as mc_bson_value_compare() with an explicit depth budget. */
int mc__bson_value_compare_depth(const bson_value_t *a, const bson_value_t *b, int depth);

/* Compares two documents (or two arrays) given as raw BSON, element by element, in MongoDB's
 * order: canonical type, then field name, then value; the shorter one first. */
int mc__bson_doc_compare(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                         int depth);

/* Same type and the same bytes (MongoDB's binaryEqual without the field name). */
bool mc__bson_value_binary_equal(const bson_value_t *a, const bson_value_t *b);

#endif
