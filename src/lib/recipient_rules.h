/*
 * recipient_rules.h: a stream's routing as its watcher runs it: which rule decides an event's
 * recipient (the stream's one path or {path, lookup}, or the by_collection rule of the
 * event's collection, or the default), the lookup instances those rules share, and the
 * summary each event gets.
 *
 *   recipient:
 *     by_collection:
 *       inventory_items: {path: fullDocument.owned_by,
 *                         lookup: {db: mercury, collection: businesses, recipient: owner.$id}}
 *       orders: {path: fullDocument.creator_id,
 *                lookup: {db: mercury, collection: businesses, recipient: owner.$id}}
 *
 * Rules whose lookups are the same (database, collection, field, recipient) share one
 * mc__recipient_lookup_t, so each lookup collection is followed by one change stream and one
 * cache, exact as recipient_lookup.h describes; different lookups each have their own. An
 * event of a collection no rule names, with no default, has no recipient (admins only) and is
 * not counted as unresolved: the configuration says so.
 *
 * Thread: one instance per reader of a stream, built and used only by that thread: the
 * stream's watcher, and each catch-up thread of a detached sink (its own instance, so its
 * lookups follow the older events it reads).
 */
#ifndef MC_RECIPIENT_RULES_H
#define MC_RECIPIENT_RULES_H

#include <mongoc/mongoc.h>
#include <stdatomic.h>

#include "engine_private.h"
#include "mongocast/config.h"
#include "mongocast/error.h"

typedef struct mc__recipients mc__recipients_t;

/* NULL with `err` when a summary does not compile or memory runs out. `cfg` is borrowed and
 * must outlive the instance; `pool` serves the lookups (NULL: tests without a server). */
mc__recipients_t *mc__recipients_new(const mc_stream_config_t *cfg, const char *stream,
                                     mongoc_client_pool_t *pool, mc_error_t *err);
void mc__recipients_destroy(mc__recipients_t *r);

/* The path to build events with (mc_event_new_change() routes by it at once): the stream's
 * one plain path, or NULL when routing needs a lookup or a per-collection rule. */
const char *mc__recipients_event_path(const mc__recipients_t *r);

/* What routing found worth telling the operator about. */
typedef enum mc__route_note {
    MC__ROUTE_OK = 0,
    MC__ROUTE_UNRESOLVED, /* the recipient could not be decided (mc_event_recipient_unresolved) */
    MC__ROUTE_MISSING,    /* a document event whose recipient path holds nothing usable (no
                             field, null, no identity): a pipeline stage may have removed it */
} mc__route_note_t;

/* Finishes the routing of a change event built with mc__recipients_event_path() (lookups,
 * per-collection rules) and stores its summary. May block on MongoDB for a lookup (bounded;
 * less once *stopping is true). */
mc__route_note_t mc__recipients_route(mc__recipients_t *r, mc_event_t *ev,
                                      const atomic_bool *stopping);

/* The lookup instances (for tests and stats). */
size_t mc__recipients_lookup_count(const mc__recipients_t *r);

#endif
