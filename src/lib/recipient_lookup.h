/*
 * recipient_lookup.h: the lookup form of a stream's recipient:
 *
 *   recipient: {path: fullDocument.owned_by,
 *               lookup: {db: shop, collection: businesses, field: _id, recipient: owner}}
 *
 * The event's value at `path` (a reference, read under the same write-time rules as a plain
 * path) designates the document of db.collection whose `field` equals it ({$eq}); that
 * document's `recipient` field is the event's recipient. References and recipients are
 * compared under the identity rule (mongocast/identity.h): a reference that is not an
 * identity (null, an array, a document, a fraction, ...) designates nothing, except a DBRef
 * ({$ref, $id[, $db]}) to the lookup collection, which designates the document whose key is
 * its $id (a DBRef to another collection designates nothing). `recipient` may go through a
 * DBRef too (owner.$id).
 *
 * Exactness: the recipient is the one the lookup collection held at the event's cluster time
 * T, never a later (or cached earlier) one. The instance keeps:
 *   - a change stream on the lookup collection (its own pool client), read on the watcher
 *     thread between events, never ahead of need: before an event at T is routed, it has seen
 *     every change of the lookup collection up to T ("covered" >= T);
 *   - a cache of key -> recipient as of "covered", kept exact by applying every change it
 *     reads (no TTL; at most cache_size entries, least recently used evicted first);
 *   - a bounded log of the changes it read that are newer than the last event routed (key,
 *     time, value before, value after); resolving at T rolls back the changes newer than T.
 * On a cache miss it reads the document (readConcern majority), waits until the stream has
 * seen past that read, and replays the logged changes since then onto it.
 *
 * Fail closed: when exactness cannot be proven (a change whose previous value is unknown
 * lies between T and now: the lookup collection has no pre-images and the key was not
 * cached when it changed; a change the stream cannot attribute to a key; the log overflowed;
 * the lookup stream is down or lost its history; two documents match one reference) the
 * event has no recipient (admins only), and the caller counts it. With
 * changeStreamPreAndPostImages enabled on the lookup collection every change carries its
 * before and after values and only an unavailable lookup stream, an overflow or an ambiguous
 * reference can fail closed. `field` other than `_id` must identify at most one document
 * (a unique index).
 *
 * Thread: one instance per reader of a stream (its watcher; each catch-up thread has its own),
 * owned and used only by that thread; no locking.
 */
#ifndef MC_RECIPIENT_LOOKUP_H
#define MC_RECIPIENT_LOOKUP_H

#include <mongoc/mongoc.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "engine_private.h"
#include "mongocast/config.h"
#include "mongocast/identity.h"

#define MC__LOOKUP_LOG_MAX 65536            /* logged changes kept at most */
#define MC__LOOKUP_LOG_MAX_BYTES (32u << 20) /* ... and their bytes */
#define MC__LOOKUP_AWAIT_MS 10              /* the lookup stream's maxAwaitTimeMS */
#define MC__LOOKUP_CATCHUP_MS 5000          /* longest wait for the lookup stream per event */
#define MC__LOOKUP_RETRY_MS 1000            /* between reopen attempts of a failed stream */

typedef struct mc__recipient_lookup mc__recipient_lookup_t;

/* `cfg` and `stream` are borrowed and must outlive the instance; `pool` provides the
 * client of the lookup stream and the reads (NULL: tests that drive the ledger by hand).
 * NULL on allocation failure. */
mc__recipient_lookup_t *mc__recipient_lookup_new(const mc_recipient_lookup_t *cfg,
                                                 const char *stream, mongoc_client_pool_t *pool);
void mc__recipient_lookup_destroy(mc__recipient_lookup_t *l);

/* Cluster times as one ordered number: seconds << 32 | increment. */
static inline uint64_t mc__ct(uint32_t t, uint32_t i)
{
    return (uint64_t)t << 32 | i;
}

/* The recipient the document designated by `ref` held at cluster time `ct`: MC__R_KNOWN
 * (*out filled), MC__R_NONE (no such document, or no identity in its recipient field, or
 * `ref` is not an identity) or MC__R_UNRESOLVED (not provably exact: see above). Blocks on
 * MongoDB (the lookup stream, a read) for at most about MC__LOOKUP_CATCHUP_MS, less when
 * *stopping becomes true. Times must not go backwards between calls. */
mc__rstate_t mc__recipient_lookup_at(mc__recipient_lookup_t *l, const bson_value_t *ref,
                                     uint64_t ct, mc_identity_t *out,
                                     const atomic_bool *stopping);

/* ---- The ledger (cache + log), exposed for tests ------------------------------------- */

/* Applies one change event of the lookup collection, in stream order; moves "covered" to
 * just before its clusterTime. */
void mc__lookup_apply(mc__recipient_lookup_t *l, const bson_t *change);
/* Everything up to `ct` (inclusive) has been seen (a post-batch resume token). */
void mc__lookup_cover(mc__recipient_lookup_t *l, uint64_t ct);
/* The log is complete for changes after `ct` (the lookup stream starts there). */
void mc__lookup_start(mc__recipient_lookup_t *l, uint64_t ct);
uint64_t mc__lookup_covered(const mc__recipient_lookup_t *l);
/* Drops logged changes at or before `ct`: no later resolution asks for an earlier time. */
void mc__lookup_trim(mc__recipient_lookup_t *l, uint64_t ct);

/* Resolution at `ct` <= covered from the cache and the log: MC__R_KNOWN/NONE/UNRESOLVED, or
 * -1 when the key is not cached and nothing logged decides it (a read is needed). */
int mc__lookup_resolve_cached(mc__recipient_lookup_t *l, const mc_identity_t *key, uint64_t ct,
                              mc_identity_t *out);
/* Fills the cache after a read of `key` that found `st`/`value` (MC__R_KNOWN or MC__R_NONE)
 * and was issued when covered was `from`; covered must have passed the read since. Replays
 * the logged changes after `from`. Returns 0, or -1 when that cannot be made exact. */
int mc__lookup_fill(mc__recipient_lookup_t *l, const mc_identity_t *key, mc__rstate_t st,
                    const mc_identity_t *value, uint64_t from);

size_t mc__lookup_cache_len(const mc__recipient_lookup_t *l);
size_t mc__lookup_log_len(const mc__recipient_lookup_t *l);

/* Counters for tests and logs. */
typedef struct mc__lookup_stats {
    uint64_t hits;       /* resolved from the cache and the log */
    uint64_t misses;     /* needed a read */
    uint64_t queries;    /* reads sent (retries included) */
    uint64_t query_errors;
    uint64_t not_found;  /* reads that found no document */
    uint64_t unresolved; /* resolutions that failed closed */
    uint64_t applied;    /* lookup changes applied */
    uint64_t barriers;   /* changes that could not be attributed to a key */
    uint64_t reopens;    /* lookup stream (re)opens */
} mc__lookup_stats_t;
void mc__recipient_lookup_stats(const mc__recipient_lookup_t *l, mc__lookup_stats_t *out);

#endif
