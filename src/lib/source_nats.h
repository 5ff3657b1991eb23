/*
 * source_nats.h: edge streams (source_nats.c): a stream fed from a JetStream stream written
 * by another mongocast's nats sink (format: bson) instead of from MongoDB.
 */
#ifndef MC_SOURCE_NATS_H
#define MC_SOURCE_NATS_H

#include "engine_private.h"

/* The body of an edge stream's watcher thread (mc__watcher_main() calls it when the stream
 * has source.nats): loads the stored position, finds it in the JetStream stream, reads from
 * there and routes every event until the engine stops; ends a failed stream with its error
 * event, as the watcher does. */
void *mc__source_nats_main(mc__stream_t *s);

/* mc__stream_replay() for an edge stream (engine_private.h: the same contract), on the
 * calling thread with a NATS connection of its own: the events after `after_id` read from the
 * JetStream stream by sequence, decoded and routed as the edge's reader does, handed to `rp`
 * (rp->pool is not used); at the end of the stream, on_position(the last id) every 100 ms
 * until a callback says stop or `cancel` turns true or the engine stops (0). MC_ENOTFOUND:
 * the id is older than the first message the JetStream stream keeps (history lost, or
 * messages removed before they were read); MC_ESERVER: no message has that id; MC_EINVAL: a
 * message an edge cannot read; MC_ENOMEM. NATS errors are retried with backoff. */
/* Whether NATS subject `subject` matches the subject filter `filter` (`*`: any one token,
 * `>` as the last token: one or more tokens). Any thread. */
bool mc__nats_subject_matches(const char *filter, const char *subject);

int mc__source_nats_replay(mc__stream_t *s, const char *after_id, const mc__replay_t *rp,
                           mc_error_t *err);

#endif
