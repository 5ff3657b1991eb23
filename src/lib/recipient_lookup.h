/*
 * recipient_lookup.h: the lookup form of a stream's recipient (DESIGN §4.2):
 *
 *   recipient: {path: fullDocument.owned_by,
 *               lookup: {db: shop, collection: businesses, field: _id, recipient: owner}}
 *
 * The event's value at `path` (read from the pre-image when the event has no fullDocument,
 * as for plain paths) is looked up as {<field>: {$eq: value}} in db.collection, and the
 * found document's `recipient` field becomes the event's recipient.
 *
 * Thread: one instance per stream, owned and used only by that stream's watcher thread (the
 * blocking query must never run on the loop thread); no locking.
 *
 * Cache: at most cache_size entries (0: no cache), least recently used evicted first. A found
 * recipient is trusted for MC__LOOKUP_TTL_MS, a miss (no such document, or no usable
 * recipient in it) for MC__LOOKUP_NEGATIVE_TTL_MS; after that the next event asks MongoDB
 * again. An ownership change therefore reaches routing within the TTL. Query errors are not
 * cached.
 */
#ifndef MC_RECIPIENT_LOOKUP_H
#define MC_RECIPIENT_LOOKUP_H

#include <mongoc/mongoc.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "mongocast/config.h"

#define MC__LOOKUP_TTL_MS 30000
#define MC__LOOKUP_NEGATIVE_TTL_MS 5000
#define MC__LOOKUP_MAX_KEY_BYTES 1024 /* larger keys are looked up but never cached */

typedef struct mc__recipient_lookup mc__recipient_lookup_t;

/* `cfg` and `stream` are borrowed and must outlive the instance. NULL on allocation failure. */
mc__recipient_lookup_t *mc__recipient_lookup_new(const mc_recipient_lookup_t *cfg,
                                                 const char *stream);
void mc__recipient_lookup_destroy(mc__recipient_lookup_t *l);

/* The recipient of `change` (bson_malloc'ed) or NULL (no value at `path`, a value that cannot
 * be a key, no matching document, no usable recipient field, or MongoDB kept failing).
 * Blocks on MongoDB through `client` on a cache miss; retries a failed query twice unless
 * *stopping becomes true. */
char *mc__recipient_lookup_resolve(mc__recipient_lookup_t *l, mongoc_client_t *client,
                                   const bson_t *change, const char *path,
                                   const atomic_bool *stopping);

/* ---- Cache, exposed for tests (times are caller-supplied monotonic ms) ---------------- */

/* 1 and *recipient (borrowed; NULL for a cached miss) when a fresh entry exists, else 0. */
int mc__lookup_cache_get(mc__recipient_lookup_t *l, const bson_value_t *key, int64_t now_ms,
                         const char **recipient);
/* Stores (or refreshes) key -> recipient (copied; NULL: a miss) valid until now + ttl. */
void mc__lookup_cache_put(mc__recipient_lookup_t *l, const bson_value_t *key, const char *recipient,
                          int64_t now_ms, int64_t ttl_ms);
size_t mc__lookup_cache_len(const mc__recipient_lookup_t *l);

/* Counters for tests and logs. */
typedef struct mc__lookup_stats {
    uint64_t hits, misses, queries, query_errors, not_found;
} mc__lookup_stats_t;
void mc__recipient_lookup_stats(const mc__recipient_lookup_t *l, mc__lookup_stats_t *out);

#endif
