/*
 * images.h: pre- and post-images that survive (docs/config.md, "ensure_images").
 *
 * A stream that asks for images (full_document: whenAvailable/required, or
 * full_document_before_change) routes updates and deletes by them; a collection whose
 * changeStreamPreAndPostImages is off gives events without them, which then reach admins
 * only. Dropping and re-creating a collection turns its images off again. This module:
 *   - with ensure_images: true, turns them on (collMod changeStreamPreAndPostImages
 *     {enabled: true}) where the stream needs them, as soon as it can: at
 *     every open of the change stream (the watched collection, or the by_collection
 *     collections of a database- or cluster-level stream, and the lookup collections), for
 *     each collection a database- or cluster-level stream sees for the first time (again
 *     after its drop or rename), and for a watched collection that an invalidate removed, as
 *     soon as it exists again (checked before each event and on each empty batch, at most
 *     once per second). Writes between a collection's creation and that collMod cannot have
 *     images (no server offers images for them);
 *   - without it, finds out that images are off (listCollections at open, and every event
 *     that lacks the image the stream asks for) and says so: a rate-limited error in the
 *     log, the stream status (images_missing, images_problem: /readyz and /metrics show it);
 *   - in both cases counts the events that arrived without their image.
 *
 * Thread: the stream's watcher thread, or a catch-up thread (its own quiet instance).
 * Commands use a client from the engine's pool.
 */
#ifndef MC_IMAGES_H
#define MC_IMAGES_H

#include <stdbool.h>

#include "engine_private.h"

typedef struct mc__images mc__images_t;

/* NULL when the stream needs nothing of this module (no images asked for, no ensure_images)
 * or memory runs out; every hook accepts NULL. `quiet`: a sink's catch-up thread, which
 * re-reads events the watcher saw already: it turns images on like the watcher but leaves
 * the stream's status (images_missing, images_problem) and the missing-image log line to it. */
mc__images_t *mc__images_new(mc__stream_t *s, bool quiet);
void mc__images_destroy(mc__images_t *im);

/* The change stream (re)opened; `after_invalidate`: the watched namespace went away. */
void mc__images_on_open(mc__images_t *im, bool after_invalidate);

/* A change event just built, before it is handed on: images turned on where needed (for the
 * events after it: an event's own images were decided by the server when it was written),
 * and a missing image counted and reported. */
void mc__images_on_event(mc__images_t *im, const mc_event_t *ev);

/* An empty batch: time to look again for a collection that does not exist yet. */
void mc__images_on_idle(mc__images_t *im);

#endif
