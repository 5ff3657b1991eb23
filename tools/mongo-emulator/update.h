/*
 * update.h: MongoDB's update language over BSON documents, for mongo-emulator's update and
 * findAndModify commands, and the `updateDescription` of the change event each update makes.
 *
 * Pure functions, any thread, no shared state. Errors are mc_error_t with domain
 * MC_DOMAIN_MONGODB and `cause` the MongoDB code a real server answers (e.g. 9 FailedToParse
 * for an unknown modifier, 14 TypeMismatch for $inc on a string, 66 ImmutableField for a
 * change of _id, 40 ConflictingUpdateOperators).
 */
#ifndef MONGO_EMULATOR_UPDATE_H
#define MONGO_EMULATOR_UPDATE_H

#include <bson/bson.h>
#include <stdbool.h>

#include "mongocast/error.h"

typedef enum emu_update_kind {
    EMU_UPDATE_OPERATORS,   /* {$set: ..., $inc: ...} */
    EMU_UPDATE_REPLACEMENT, /* a plain document: the change event is a "replace" */
    EMU_UPDATE_PIPELINE,    /* [{$set: ...}, {$unset: ...}, ...] */
} emu_update_kind_t;

/* What changed, in the shape of a change event's updateDescription. */
typedef struct emu_update_desc {
    bson_t updated_fields;   /* {"a.b": value, ...} */
    bson_t removed_fields;   /* ["c", ...] as a BSON array */
    bson_t truncated_arrays; /* [{field: "arr", newSize: int32}, ...] as a BSON array */
} emu_update_desc_t;

void emu_update_desc_init(emu_update_desc_t *desc);
void emu_update_desc_cleanup(emu_update_desc_t *desc);
/* Appends {updatedFields, removedFields, truncatedArrays} as a sub-document named `key`. */
void emu_update_desc_append(const emu_update_desc_t *desc, bson_t *parent, const char *key);

/* Classifies `update` (the `u` of an update statement: a document or an array). Returns
 * MC_EINVAL with code 9 for a document that mixes operators and plain fields. */
int emu_update_kind(const bson_value_t *update, emu_update_kind_t *kind, mc_error_t *err);

/* Applies `update` to `doc` and writes the result to `out` (which this function initialises,
 * also on failure). Supports $set $unset $inc $mul $min $max $rename $push (with $each,
 * $slice, $position) $pull $pullAll $addToSet (with $each) $pop $currentDate $setOnInsert,
 * replacement documents (keeping _id first), and pipelines of $set/$addFields/$unset/
 * $project/$replaceRoot/$replaceWith stages. `is_insert` is true when `doc` is the seed of an
 * upsert (then $setOnInsert applies). `desc` (may be NULL) receives the updateDescription;
 * `modified` (may be NULL) is set to whether the document changed. Changing _id fails with
 * code 66. */
int emu_update_apply(const bson_t *doc, const bson_value_t *update, bool is_insert, bson_t *out,
                     emu_update_desc_t *desc, bool *modified, mc_error_t *err);

/* The seed document of an upsert: the equality conditions of `query` (top-level field: value
 * and {$eq: value}, including those inside a top-level $and), dotted paths expanded. */
int emu_upsert_seed(const bson_t *query, bson_t *out, mc_error_t *err);

#endif
