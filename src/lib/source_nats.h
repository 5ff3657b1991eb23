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

#endif
