/*
 * subscription.h: what one subscriber of a stream receives.
 *
 * A stream's server-side change stream is shared by all its subscribers; each subscriber's
 * view is decided here, in the daemon, per event:
 *   1. recipient: on a stream with a recipient, only what mc_event_view_for() gives the
 *      subscriber's identity: its own changes, the change that moved a document to it
 *      without the previous owner's version, a "left" notice for a document that moved away
 *      (admins see all; on a public stream the recipient only routes and never authorizes,
 *      so anonymous subscribers see every event);
 *   2. the stream's per-subscriber stages: the first stage that uses {$var: name} and every
 *      stage after it, in the order written (mc_pipeline_split()), compiled once per
 *      subscriber with its `vars` (a JSON object; an unbound name is refused with 400
 *      "variable NAME not bound", a value holding an operator key such as {$ne: ...} with
 *      400; these stages come from the config and may use $expr, where a bound value is always
 *      a literal). They run on the change the subscriber's view carries; when they reshape
 *      it ($project, $set, ...) the subscriber receives its own copy in its message. A stage
 *      that fails on an event, or that changes the event's _id (MongoDB's 280), ends the
 *      subscription as MongoDB would end the change stream;
 *   3. the subscriber's `filter` (a JSON MongoDB query, when the stream allows client
 *      filters; $where $function $accumulator $expr refused; bounded in size and depth),
 *      evaluated on what 1 and 2 produced.
 * Stages and filter (2 and 3) share one CPU budget per event (mcd_subscription_apply() with
 * a budget): a subscriber whose stages or filter run past it is told so instead of delaying
 * the others. Control events (ready, invalidate, reset, error) always pass; nothing is
 * evaluated for a "left" notice.
 *
 * Thread: built and applied on the loop thread. Immutable after creation.
 */
#ifndef MONGOCAST_DAEMON_SUBSCRIPTION_H
#define MONGOCAST_DAEMON_SUBSCRIPTION_H

#include <stdbool.h>
#include <stddef.h>

#include "auth.h"
#include "mongocast/config.h"
#include "mongocast/event.h"
#include "mongocast/filter.h"
#include "refusal.h"

#define MCD_FILTER_MAX_BYTES 16384
#define MCD_FILTER_MAX_DEPTH 16

typedef struct mcd_subscription mcd_subscription_t;

/* `vars_json` and `filter_json` are the raw (URL-decoded) query values, or NULL when absent.
 * `id` is the subscriber's identity (from mcd_auth_subscriber). Returns NULL and fills `r`
 * (400 invalid_vars / invalid_filter / filters_not_allowed, 403 forbidden). */
mcd_subscription_t *mcd_subscription_new(const mc_stream_config_t *stream, const char *vars_json,
                                         const char *filter_json, const mcd_identity_t *id,
                                         mcd_refusal_t *r);
void mcd_subscription_destroy(mcd_subscription_t *sub);

/* A per-subscriber stage failed without a MongoDB error code (see mcd_subscription_apply). */
#define MCD_STAGE_ERROR (-1)
/* The error message such a subscriber receives before its subscription ends. */
#define MCD_ERROR_PIPELINE "pipeline_error"
#define MCD_ERROR_PIPELINE_REASON                                                                  \
    "a pipeline stage that runs for this subscriber failed on an event"

/* What this subscriber receives of `ev`: the view (an mc_event_view_t, MC_EVENT_VIEW_NONE for
 * nothing), or -1 when `budget` (mongocast/filter.h; NULL: no CPU limit), which the
 * subscriber's stages and filter share, ran out or a regex hit a limit (budget->reason says
 * which). A budget may span several events (a resume's replay). When the subscriber's stages
 * reshape the change, *own is set and `out` (initialised here) holds its copy of the change,
 * which the caller destroys. When a stage fails on the event (or changes its _id), returns
 * MC_EVENT_VIEW_NONE with *error_code MongoDB's code for the failure (280 for a changed _id)
 * or MCD_STAGE_ERROR: the caller ends the subscription. A "left" notice evaluates nothing and
 * costs nothing. */
int mcd_subscription_apply(const mcd_subscription_t *sub, const mc_event_t *ev,
                           mc_filter_budget_t *budget, bson_t *out, bool *own, int *error_code);

/* mcd_subscription_apply() without the copy and the error: the view, or -1 when `budget` ran
 * out. */
int mcd_subscription_view_budget(const mcd_subscription_t *sub, const mc_event_t *ev,
                                 mc_filter_budget_t *budget);

/* mcd_subscription_apply() without a budget, the copy and the error: just the view (a regex
 * past its limits counts as not matching). */
mc_event_view_t mcd_subscription_view(const mcd_subscription_t *sub, const mc_event_t *ev);

/* mcd_subscription_view() != MC_EVENT_VIEW_NONE. */
bool mcd_subscription_match(const mcd_subscription_t *sub, const mc_event_t *ev);

/* True when the subscription has no condition at all (no recipient restriction, no
 * per-subscriber stage, no client filter): mcd_subscription_view() is then
 * MC_EVENT_VIEW_FULL for every event that has a change document, so the fan-out may skip
 * calling it. False for NULL. Fixed at creation. */
bool mcd_subscription_matches_all(const mcd_subscription_t *sub);

/* True when the subscriber's stages reshape the change: its messages are its own, built
 * from mcd_subscription_apply()'s copy, not the shared ones. */
bool mcd_subscription_reshapes(const mcd_subscription_t *sub);

/* The canonical identity (mongocast/identity.h) this subscriber's changes are restricted to
 * (*len bytes, possibly 0: it matches no recipient), or NULL when it is not restricted (admins,
 * public streams, streams without recipient, servers without auth). */
const uint8_t *mcd_subscription_identity(const mcd_subscription_t *sub, size_t *len);

/* Checks, once at start-up, the stream's per-subscriber stages (mc_stream_config_check_pipeline;
 * the loader already did for a loaded config). Returns 0, or MC_ECONFIG with "stream NAME:
 * pipeline stage I: ..." in err. */
int mcd_stream_local_stages_check(const mc_stream_config_t *stream, mc_error_t *err);

#endif
