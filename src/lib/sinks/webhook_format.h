/*
 * webhook_format.h: the bodies a webhook sink sends: the JSON message of docs/protocol.md
 * (format "message") or a CloudEvents 1.0 event in structured JSON mode (format
 * "cloudevents"), one event per request or a JSON array of events (batching).
 *
 * CloudEvents attributes of an event:
 *   specversion      "1.0"
 *   id               the event id (the resume token's _data), the same as webhook-id
 *   source           "<source prefix><stream>" (default prefix "/mongocast/streams/")
 *   type             "mongodb.change.<operationType>" for changes ("mongodb.change.insert"),
 *                    "mongodb.change.invalidate", "mongocast.reset", "mongocast.ready",
 *                    "mongocast.error" for control events
 *   subject          "<db>.<coll>", followed by "/<_id>" when documentKey._id is a string,
 *                    an ObjectId (24 hex digits) or an integer; absent without a namespace
 *   time             wallTime as RFC 3339 UTC with milliseconds, else the cluster time's
 *                    second; absent when the event has neither
 *   datacontenttype  "application/json"
 *   recipient        (extension attribute) the event's recipient, when it has one: a string
 *                    as itself, another identity as its Extended JSON text ("{\"$oid\":...}")
 *   data             the JSON message of docs/protocol.md, exactly as the "message" format
 *                    sends it, so both formats carry the same payload
 *
 * Any thread; the functions only read the event (its message JSON is rendered once and
 * cached by the event itself).
 */
#ifndef MC_SINKS_WEBHOOK_FORMAT_H
#define MC_SINKS_WEBHOOK_FORMAT_H

#include <stdbool.h>
#include <stddef.h>

#include "json_writer.h"
#include "mongocast/error.h"
#include "mongocast/event.h"

typedef enum mc__webhook_format {
    MC__WEBHOOK_MESSAGE = 0,
    MC__WEBHOOK_CLOUDEVENTS = 1,
} mc__webhook_format_t;

#define MC__CLOUDEVENTS_SOURCE_PREFIX "/mongocast/streams/"

/* "message" / "cloudevents" -> the format; MC_ECONFIG for anything else. */
int mc__webhook_format_parse(const char *name, mc__webhook_format_t *out, mc_error_t *err);

/* The Content-Type of a body with one event (batch false) or a JSON array (batch true). */
const char *mc__webhook_content_type(mc__webhook_format_t fmt, bool batch);

/* Appends one event to `b` in format `fmt` (`source_prefix` NULL: the default). Returns 0,
 * MC_ENOMEM (the message could not be rendered, or the buffer's maximum was reached) or
 * MC_EINVAL (a string of the event is not valid UTF-8). After an error the buffer keeps it
 * (sticky) and must be reset before reuse. */
int mc__webhook_body_append(mc__json_buf_t *b, mc_event_t *ev, mc__webhook_format_t fmt,
                            const char *source_prefix);

/* The CloudEvents type of an event ("mongodb.change.insert", ...) into out (cap bytes). */
void mc__cloudevents_type(const mc_event_t *ev, char *out, size_t cap);

#endif
