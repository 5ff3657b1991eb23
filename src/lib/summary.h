/*
 * summary.h: the `summary` of a stream or of a by_collection rule: a human line rendered from
 * the change event's fields into each change message (docs/config.md, "Summary").
 *
 *   summary: "{fullDocument.name} is low: {fullDocument.quantity_in_stock} left"
 *   summary:
 *     - when: {$expr: {$lte: ["$fullDocument.quantity_in_stock", "$fullDocument.reorder_point"]}}
 *       text: "Stock low, please restock {fullDocument.name}"
 *     - text: "{fullDocument.name}: {operationType}"
 *
 * A template is literal text with {dotted.path} placeholders ({{ and }} for literal braces),
 * compiled once (mc__summary_template_check() at config load for the position of a mistake,
 * mc__summary_new() on the watcher thread) and rendered once per event and view from the
 * change document that view carries, so a view never renders a field it withholds (the
 * `entered` view has no fullDocumentBeforeChange). The first alternative whose `when` (a
 * query over the change event, $expr allowed) matches is rendered; none: no summary.
 *
 * Values: strings as they are, integers in decimal, doubles in their shortest round-trip
 * form, decimal128 as its string, booleans true/false, null as "null", a missing field as
 * nothing, ObjectIds as 24 hex digits, dates in ISO 8601 (UTC), anything else (documents,
 * arrays, binary ...) as compact relaxed Extended JSON. Invalid UTF-8 becomes U+FFFD and a
 * control character (line breaks and NUL included) a space. The rendered line is at most
 * MC__SUMMARY_MAX bytes (cut at a character boundary, "..." added).
 *
 * Thread: a compiled summary is immutable: any thread may render with it.
 */
#ifndef MC_SUMMARY_H
#define MC_SUMMARY_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

#include "mongocast/config.h"
#include "mongocast/error.h"
#include "mongocast/event.h"

#define MC__SUMMARY_MAX 1024          /* bytes of one rendered line */
#define MC__SUMMARY_TEMPLATE_MAX 4096 /* bytes of one template */
#define MC__SUMMARY_MAX_FIELDS 64     /* placeholders in one template */
#define MC__SUMMARY_MAX_RULES 32      /* alternatives of one summary */

typedef struct mc__summary mc__summary_t;

/* Checks one template. Returns true, or false with a message naming the problem and the
 * 1-based character where it is ("unclosed '{' at character 7"). */
bool mc__summary_template_check(const char *text, char *msg, size_t cap);

/* Compiles a summary (its templates and `when` queries). NULL with `err` when it is invalid;
 * NULL without an error when cfg has no alternative. */
mc__summary_t *mc__summary_new(const mc_summary_config_t *cfg, mc_error_t *err);
void mc__summary_destroy(mc__summary_t *s);

/* Renders the line for `change` into out (cap >= MC__SUMMARY_MAX + 1 bytes, NUL-terminated).
 * Returns its length, or -1 when no alternative matches (no summary; an empty line is 0). */
int mc__summary_render(const mc__summary_t *s, const bson_t *change, char *out, size_t cap);

/* Renders the summary of each view an event has (FULL, and ENTERED when a write moved the
 * document to a new owner) and stores it in the event. Watcher thread, after the routing is
 * set and before the event is shared. NULL `s` leaves the event without one. Returns 0 or
 * MC_ENOMEM (the event then has no summary). */
int mc__event_set_summary(mc_event_t *ev, const mc__summary_t *s);

/* The stored line of a view (NULL when the view has none) and its length. */
const char *mc__event_summary(const mc_event_t *ev, mc_event_view_t view, size_t *len);

#endif
