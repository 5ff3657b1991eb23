/*
 * agg.h: aggregation pipelines, projections and sorts for mongo-emulator.
 *
 * A pipeline is compiled once (emu_pipeline_new) and then either run over a whole set of
 * documents (the aggregate command: $match $project $addFields $set $unset $replaceRoot
 * $replaceWith $sort $skip $limit $group $count) or applied to one document at a time (the
 * stages a change stream may carry after $changeStream: the per-document ones only).
 * Per-document stages, expressions and projections are libmongocast's (mongocast/pipeline.h);
 * $group's accumulators are $sum $avg $min $max $first $last $push $addToSet.
 *
 * Pure functions, any thread. Errors: mc_error_t, domain MC_DOMAIN_MONGODB, `cause` the
 * server's code (40324 unrecognized stage, 15958/... for bad stage arguments, 2 BadValue).
 */
#ifndef MONGO_EMULATOR_AGG_H
#define MONGO_EMULATOR_AGG_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

#include "mongocast/error.h"

typedef struct emu_pipeline emu_pipeline_t;

/* `stages` is a BSON array of stage documents (without any $changeStream stage). With
 * `per_document_only`, stages that need the whole set ($sort $skip $limit $group $count) are
 * refused with code 40324-style errors naming the stage. */
emu_pipeline_t *emu_pipeline_new(const bson_t *stages, bool per_document_only, mc_error_t *err);
void emu_pipeline_destroy(emu_pipeline_t *p);

/* Runs the pipeline over `n` borrowed documents. On success `*out` is a malloc'd array of
 * `*n_out` new documents (free each with bson_destroy, then free the array). */
int emu_pipeline_run(const emu_pipeline_t *p, const bson_t *const *docs, size_t n, bson_t ***out,
                     size_t *n_out, mc_error_t *err);

/* Per-document application: returns 1 and fills `out` (initialised by the function) when the
 * document passes, 0 when a $match drops it, or a negative status with `err`. */
int emu_pipeline_apply_one(const emu_pipeline_t *p, const bson_t *doc, bson_t *out, mc_error_t *err);

/* find's projection: inclusion or exclusion (not both, except _id), dotted paths. */
int emu_projection_apply(const bson_t *projection, const bson_t *doc, bson_t *out, mc_error_t *err);
/* Validates a projection spec once, so that find can fail before scanning. */
int emu_projection_check(const bson_t *projection, mc_error_t *err);

/* Orders two documents by a sort spec {field: 1|-1, ...} (MongoDB's array rules: ascending
 * uses an array's smallest element, descending its largest). Returns <0, 0, >0. */
int emu_sort_compare(const bson_t *sort_spec, const bson_t *a, const bson_t *b);

#endif
