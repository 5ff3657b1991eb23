/*
 * subscription.h: what one subscriber of a stream receives.
 *
 * A stream's server-side change stream is shared by all its subscribers; each subscriber's
 * view is decided here, in the daemon, per event:
 *   1. recipient: on a stream with `recipient`, only what mc_event_view_for() gives the
 *      subscriber's identity: its own changes, the change that moved a document to it
 *      without the previous owner's version, a "left" notice for a document that moved away
 *      (admins see all; on a public stream the recipient only routes and never authorizes,
 *      so anonymous subscribers see every event);
 *   2. the stream's `$match` stages that use {$var: name}, bound with the subscriber's `vars`
 *      (a JSON object; an unbound name is refused with 400 "variable NAME not bound", a value
 *      holding an operator key such as {$ne: ...} with 400; these stages come from the config
 *      and may use $expr, where a bound value is always a literal);
 *   3. the subscriber's `filter` (a JSON MongoDB query over the change event, when the stream
 *      allows client filters; $where $function $accumulator $expr refused; bounded in size
 *      and depth, and in CPU time per event by mcd_subscription_view_budget()).
 * Control events (ready, invalidate, reset) always pass. Filters (2 and 3) are evaluated on
 * the change the subscriber's view carries, and not at all for a "left" notice.
 *
 * Thread: built and matched on the loop thread. Immutable after creation.
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

/* What this subscriber receives of `ev` (MC_EVENT_VIEW_NONE: nothing). Never fails; a filter
 * past its regex limits counts as not matching. */
mc_event_view_t mcd_subscription_view(const mcd_subscription_t *sub, const mc_event_t *ev);

/* mcd_subscription_view() != MC_EVENT_VIEW_NONE. */
bool mcd_subscription_match(const mcd_subscription_t *sub, const mc_event_t *ev);

/* mcd_subscription_view() within `budget` (mongocast/filter.h), which the subscriber's $var
 * stages and filter share: the view (an mc_event_view_t, MC_EVENT_VIEW_NONE when nothing), or
 * -1 when the budget ran out or a regex hit a limit (budget->reason says which). A "left"
 * notice evaluates no filter and costs nothing. A budget may span several events (a resume's
 * replay). */
int mcd_subscription_view_budget(const mcd_subscription_t *sub, const mc_event_t *ev,
                                 mc_filter_budget_t *budget);

/* True when the subscription has no condition at all (no recipient restriction, no $var
 * stage, no client filter): mcd_subscription_view() is then MC_EVENT_VIEW_FULL for every
 * event that has a change document, so the fan-out may skip calling it. False for NULL. Fixed at
 * creation. (Additive function.) */
bool mcd_subscription_matches_all(const mcd_subscription_t *sub);

/* Checks, once at start-up (`mongocast check`, `run`), that the stream's per-subscriber stages
 * (those mc_pipeline_split() keeps local because they use {$var: name}) can be evaluated by
 * the daemon: each must be a {$match: {...}} whose {$var: ...} values are well formed
 * ({$var: "<name>"} alone in its document), and no server-side stage that reshapes the event
 * ($project, $addFields, $set, $unset, $replaceRoot, $replaceWith, $redact, ...) may follow
 * one, because the daemon evaluates local stages after the whole server pipeline. Returns 0,
 * or MC_ECONFIG with "stream NAME: pipeline stage I: ..." in err. (Additive function.) */
int mcd_stream_local_stages_check(const mc_stream_config_t *stream, mc_error_t *err);

#endif
