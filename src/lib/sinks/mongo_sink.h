/*
 * mongo_sink.h: the groundwork of the MongoDB-collection sink (the activity log): the
 * document written per event, ordered bulk inserts where a duplicate `_id` on replay counts
 * as already written, the write concern option, the TTL index, and the loop guard.
 *
 * The document of an event (one per event; `_id` makes a replay harmless):
 *   {_id: <event id>, stream, type (operationType, or the control event's kind),
 *    ns: {db, coll}, documentKey, recipient, clusterTime (Timestamp), wallTime (Date),
 *    change: <the change document, or only the fields of `projection`>}
 * Fields the event lacks are left out (recipient without one, ns and documentKey for
 * control events, wallTime before MongoDB 6.0). A projection lists dotted paths of the
 * change to keep, e.g. {fullDocument: 1, "updateDescription.updatedFields": 1}; only
 * inclusion (1 or true) is supported.
 *
 * TTL: an index {wallTime: 1} named "mongocast_ttl" with expireAfterSeconds; documents
 * without wallTime never expire.
 *
 * Threads: the projection and the pure functions from any thread; the writes and the index
 * call block on MongoDB (libmongoc) and run on the sink's own thread.
 */
#ifndef MC_SINKS_MONGO_SINK_H
#define MC_SINKS_MONGO_SINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <mongoc/mongoc.h>

#include "mongocast/error.h"
#include "mongocast/event.h"

#define MC__MONGO_TTL_INDEX "mongocast_ttl"
/* MongoDB's batch limit for one write command; larger batches are split. */
#define MC__MONGO_MAX_BATCH 100000

typedef struct mc__mongo_projection mc__mongo_projection_t;

/* Checks and compiles a projection document. MC_ECONFIG: empty, a value other than 1/true,
 * a path starting with '$', an empty path part, more than 64 paths or 32 levels. */
mc__mongo_projection_t *mc__mongo_projection_new(const bson_t *spec, mc_error_t *err);
void mc__mongo_projection_destroy(mc__mongo_projection_t *p);

/* Builds the document of `ev` into `out` (initialised by the caller, appended to).
 * `proj` may be NULL (the whole change). MC_EINVAL for an event without an id (ready, reset,
 * error: they have no place in the log). */
int mc__mongo_sink_doc(const mc_event_t *ev, const mc__mongo_projection_t *proj, bson_t *out,
                       mc_error_t *err);

/* Parses the write concern option: "majority" (default when NULL), a number of members
 * (0..50), with an optional wtimeout_ms (0: none) and journal flag. MC_ECONFIG for others.
 * The result is mongoc-owned: destroy with mongoc_write_concern_destroy(). */
mongoc_write_concern_t *mc__mongo_write_concern(const char *w, int64_t wtimeout_ms, bool journal,
                                                mc_error_t *err);

typedef enum mc__mongo_class {
    MC__MONGO_OK = 0,
    MC__MONGO_TRANSIENT = 1, /* network, timeouts, elections, write concern not satisfied */
    MC__MONGO_PERMANENT = 2, /* this document can never be written (validation, size...) */
} mc__mongo_class_t;

/* The class of a failed write: libmongoc's error (domain/code) plus the server reply (its
 * labels: RetryableWriteError is transient). */
mc__mongo_class_t mc__mongo_classify(const bson_error_t *e, const bson_t *reply);

/* The outcome of one document of a batch. */
typedef enum mc__mongo_outcome {
    MC__MONGO_WRITTEN = 0,
    MC__MONGO_DUPLICATE = 1, /* E11000 on _id: a replay, already written */
    MC__MONGO_FAILED = 2,
    MC__MONGO_NOT_TRIED = 3, /* after the first failure of an ordered batch */
} mc__mongo_outcome_t;

typedef struct mc__mongo_insert_result {
    size_t written, duplicates;
    size_t failed_index; /* the first failed document, when `failed` */
    bool failed;
    mc__mongo_class_t cls; /* of that failure */
    char message[256];
    size_t round_trips; /* insert commands sent */
} mc__mongo_insert_result_t;

/* Inserts docs[0..n) in order (ordered bulk writes with the write concern `wc`, NULL: the
 * collection's). A duplicate key on _id stops MongoDB's ordered batch at that document: it
 * counts as written (a replay), one lookup ({_id: {$in: rest}}) takes the other documents
 * already present out of the batch, and the rest is sent again; never a lost or doubled
 * document. Stops at the first other failure: then every document before failed_index is
 * written or was a duplicate, `outcomes` (optional, n entries) tells each one, and MC_EIO
 * (transient) or MC_ESERVER (permanent) is returned. A failure without a document-level
 * error (network, write concern not satisfied) leaves the whole rest unconfirmed: retrying
 * it is safe. Only string _ids (event ids) are matched by the lookup. */
int mc__mongo_insert_ordered(mongoc_collection_t *coll, const bson_t *const *docs, size_t n,
                             const mongoc_write_concern_t *wc, mc__mongo_outcome_t *outcomes,
                             mc__mongo_insert_result_t *res, mc_error_t *err);

/* Creates the TTL index on wallTime (expire_after_seconds > 0). An existing index of that name
 * with another expiry is reported (MC_ECONFIG, MongoDB's IndexOptionsConflict), not changed. */
int mc__mongo_ensure_ttl_index(mongoc_collection_t *coll, int64_t expire_after_seconds,
                               mc_error_t *err);

/* A stream as the loop guard sees it: what it watches (db NULL: the whole cluster; coll
 * NULL: the whole database). */
typedef struct mc__mongo_watch {
    const char *stream;
    const char *db;
    const char *coll;
} mc__mongo_watch_t;

/* The loop guard: MC_ECONFIG when a sink writing into db.coll of the cluster its streams
 * read (same_cluster) takes a stream that watches that namespace: every write would come
 * back as a change and be written again, forever. The message names the stream. */
int mc__mongo_loop_check(const char *sink, const char *db, const char *coll, bool same_cluster,
                         const mc__mongo_watch_t *streams, size_t n, mc_error_t *err);

#endif
