/*
 * edge_payload.h: the message body of the nats sink's `format: bson`, which edge streams
 * (source_nats.c) read back into the same mc_event_t the leader's watcher built.
 *
 * The body is one BSON document: {v: 1, kind: "change" | "invalidate", change: <the change
 * document exactly as MongoDB produced it (after the server-side pipeline), every BSON type
 * kept>, reason: <invalidate reason> (invalidate only), oversize: <int64, MongoDB's size of
 * an event `on_oversize: skip` thinned> (only then)}. BSON rather than Extended JSON: the edge
 * recomputes the routing (recipient before and after, identities compared by type, see
 * identity.c), the summaries and every subscriber's stages and filter from the change, so
 * int32/int64/double, dates and binary subtypes must survive as they are.
 *
 * Pure functions, any thread.
 */
#ifndef MC_EDGE_PAYLOAD_H
#define MC_EDGE_PAYLOAD_H

#include <stddef.h>
#include <stdint.h>

#include <bson/bson.h>

#include "mongocast/error.h"
#include "mongocast/event.h"

#define MC__EDGE_PAYLOAD_VERSION 1

/* Writes the body of `ev` (a change or an invalidate with its change document) into `out`
 * (initialised here; the caller destroys it). MC_EINVAL for other kinds. */
int mc__edge_payload_encode(const mc_event_t *ev, bson_t *out, mc_error_t *err);

/* Builds the event a body describes, for mongocast stream `stream` with sequence number
 * `seq`, reading the recipient from `recipient_path` (mc__recipients_event_path(); NULL:
 * none) as mc_event_new_change() does. Returns 0 and *out (one reference), or MC_EINVAL with
 * err saying what is wrong (not a BSON document, another version, an unknown kind, no
 * change document, a change without a resume token). Never trusts `data`: any bytes give a
 * clean error. */
int mc__edge_payload_decode(const uint8_t *data, size_t len, const char *stream, uint64_t seq,
                            const char *recipient_path, mc_event_t **out, mc_error_t *err);

#endif
