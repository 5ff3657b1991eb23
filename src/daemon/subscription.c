/*
 * subscription.c: one subscriber's view of a stream (subscription.h): the recipient rule, the
 * stream's per-subscriber `$match` stages bound with the subscriber's `vars`, and the
 * subscriber's own `filter`.
 *
 * Thread: mcd_subscription_new() and mcd_subscription_view() run on the loop thread;
 * mcd_stream_local_stages_check() at start-up. A subscription is immutable once built.
 *
 * Invariants:
 *   - everything a subscriber sends is parsed, validated and compiled here, once, before
 *     the upgrade; deciding a view only reads compiled filters and allocates nothing (a
 *     regex's backtracking past its stack arena excepted, and a config stage's $expr when it
 *     builds a string or crosses an array), within the caller's CPU budget;
 *   - a subscription keeps no pointer into the stream config (a reload may replace it);
 *   - fail closed: a subscriber that is neither authenticated nor on a public stream (or on
 *     a server without auth) is refused here too, even though mcd_auth_subscriber() already
 *     refuses it, so a caller that forgets that step does not leak events.
 */
#include "subscription.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_object.h"
#include "mongocast/engine.h"
#include "mongocast/filter.h"

#define MCD_VARS_MAX_BYTES 16384
#define MAX_CLIENT_PREDICATES 256
#define MAX_LOCAL_STAGES 32
#define MAX_WALK_DEPTH 100

/* Sized to what it holds: one of these lives as long as each connection, and an idle
 * subscriber must cost well under 1 KiB. */
struct mcd_subscription {
    mc_filter_t **local; /* n_local compiled $var stages; NULL when none */
    mc_filter_t *client; /* NULL: no client filter */
    uint32_t n_local;
    bool restrict_recipient; /* only what mc_event_view_for() gives `identity` */
    bool matches_all;        /* none of the three conditions: see matches_all() */
    uint16_t identity_len;   /* bytes of identity; 0 unless restrict_recipient */
    uint8_t identity[];      /* the subscriber's canonical identity (mongocast/identity.h) */
};

/* ---- vars ---------------------------------------------------------------------------- */

/* Values may be any JSON value (Extended JSON such as {"$oid": ...} becomes its BSON type),
 * but never an operator document ({"$ne": 1} would turn equality into "anything else"), a
 * regular expression (it would match as a pattern) or code. Checked at every depth and for
 * every variable, used or not, so the answer does not depend on which stages exist. */
static int check_var_value(const char *name, const bson_iter_t *it, int depth, mcd_refusal_t *r)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_REGEX:
    case BSON_TYPE_CODE:
    case BSON_TYPE_CODEWSCOPE:
    case BSON_TYPE_DBPOINTER:
    case BSON_TYPE_SYMBOL:
        return mcd_refuse(r, 400, "invalid_vars",
                          "variable %s: regular expressions and code are not allowed", name);
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: break;
    default: return 0;
    }
    if (depth >= MCD_FILTER_MAX_DEPTH) {
        return mcd_refuse(r, 400, "invalid_vars", "variable %s nested deeper than %d levels", name,
                          MCD_FILTER_MAX_DEPTH);
    }
    bson_iter_t child;
    if (!bson_iter_recurse(it, &child)) {
        return mcd_refuse(r, 400, "invalid_vars", "variable %s: malformed value", name);
    }
    bool doc = BSON_ITER_HOLDS_DOCUMENT(it);
    while (bson_iter_next(&child)) {
        if (doc && bson_iter_key(&child)[0] == '$') {
            /* The operator name is the subscriber's own input, but echo only a short,
             * printable prefix of it. */
            char op[24];
            size_t k = 0;
            for (const char *p = bson_iter_key(&child); *p && k < sizeof(op) - 1; p++) {
                op[k++] = (*p >= 0x21 && *p <= 0x7e) ? *p : '?';
            }
            op[k] = '\0';
            return mcd_refuse(r, 400, "invalid_vars",
                              "variable %s: operators (%s) are not allowed in variable values",
                              name, op);
        }
        if (check_var_value(name, &child, depth + 1, r) != 0) {
            return -1;
        }
    }
    return 0;
}

static bool printable_name(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++) {
        if ((unsigned char)s[n] < 0x21 || (unsigned char)s[n] > 0x7e || n >= 64) {
            return false;
        }
    }
    return n > 0;
}

static int parse_vars(const char *json, bson_t *out, mcd_refusal_t *r)
{
    size_t len = strlen(json);
    if (len > MCD_VARS_MAX_BYTES) {
        return mcd_refuse(r, 400, "invalid_vars", "vars larger than %d bytes", MCD_VARS_MAX_BYTES);
    }
    if (mcd_json_object_parse(json, len, out) != 0) {
        return mcd_refuse(r, 400, "invalid_vars", "vars must be a JSON object");
    }
    bson_iter_t it;
    if (!bson_iter_init(&it, out)) {
        bson_destroy(out);
        return mcd_refuse(r, 400, "invalid_vars", "vars must be a JSON object");
    }
    while (bson_iter_next(&it)) {
        const char *name = bson_iter_key(&it);
        /* Names are identifiers chosen by the operator ({$var: tenant}); a name that is not
         * short printable ASCII, or that looks like an operator, is not one of them. */
        if (!printable_name(name) || name[0] == '$') {
            bson_destroy(out);
            return mcd_refuse(r, 400, "invalid_vars", "invalid variable name");
        }
        if (check_var_value(name, &it, 0, r) != 0) {
            bson_destroy(out);
            return -1;
        }
    }
    return 0;
}

/* ---- Local stages ------------------------------------------------------------------- */

/* Walks a stage: sets *has_var when a {$var: ...} occurs and checks its form. Returns 0, or
 * -1 with a message in msg. */
static int walk_vars(bson_iter_t *it, bool is_doc, int depth, bool *has_var, char *msg, size_t cap)
{
    if (depth > MAX_WALK_DEPTH) {
        snprintf(msg, cap, "nested deeper than %d levels", MAX_WALK_DEPTH);
        return -1;
    }
    bool first = true;
    while (bson_iter_next(it)) {
        if (is_doc && strcmp(bson_iter_key(it), "$var") == 0) {
            bson_iter_t rest = *it;
            if (!first || bson_iter_next(&rest)) {
                snprintf(msg, cap, "$var must be the only field of its document");
                return -1;
            }
            uint32_t n = 0;
            if (!BSON_ITER_HOLDS_UTF8(it) || (bson_iter_utf8(it, &n), n == 0)) {
                snprintf(msg, cap, "$var needs a variable name (a non-empty string)");
                return -1;
            }
            *has_var = true;
        }
        first = false;
        if (BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) {
            bson_iter_t child;
            if (!bson_iter_recurse(it, &child)) {
                snprintf(msg, cap, "malformed BSON");
                return -1;
            }
            if (walk_vars(&child, BSON_ITER_HOLDS_DOCUMENT(it), depth + 1, has_var, msg, cap) !=
                0) {
                return -1;
            }
        }
    }
    return 0;
}

int mcd_stream_local_stages_check(const mc_stream_config_t *stream, mc_error_t *err)
{
    if (!stream) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "no stream");
    }
    const char *name = stream->name ? stream->name : "?";
    bson_t server, local;
    mc_error_t perr = {0};
    int rc = mc_pipeline_split(stream->pipeline, &server, &local, &perr);
    uint32_t n_local = bson_count_keys(&local);
    bson_destroy(&server);
    bson_destroy(&local);
    if (rc != 0) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "stream %s: %s", name,
                            perr.message);
    }
    if (n_local > MAX_LOCAL_STAGES) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "stream %s: more than %d pipeline stages use $var", name,
                            MAX_LOCAL_STAGES);
    }
    if (!stream->pipeline) {
        return 0;
    }
    /* mc_pipeline_split() vouched for the shape: every element is a one-key stage document. */
    bson_iter_t it;
    bson_iter_init(&it, stream->pipeline);
    const char *first_local = NULL;
    char first_local_idx[16] = "";
    while (bson_iter_next(&it)) {
        bson_iter_t stage, body;
        bson_iter_recurse(&it, &stage);
        bson_iter_next(&stage);
        const char *op = bson_iter_key(&stage);
        bool has_var = false;
        char msg[160] = "";
        if (BSON_ITER_HOLDS_DOCUMENT(&stage) || BSON_ITER_HOLDS_ARRAY(&stage)) {
            bson_iter_recurse(&stage, &body);
            if (walk_vars(&body, BSON_ITER_HOLDS_DOCUMENT(&stage), 1, &has_var, msg, sizeof(msg)) !=
                0) {
                return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                    "stream %s: pipeline stage %s (%s): %s", name,
                                    bson_iter_key(&it), op, msg);
            }
        }
        if (has_var) {
            if (strcmp(op, "$match") != 0 || !BSON_ITER_HOLDS_DOCUMENT(&stage)) {
                return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                    "stream %s: pipeline stage %s (%s): only $match stages "
                                    "may use $var",
                                    name, bson_iter_key(&it), op);
            }
            if (!first_local) {
                first_local = op;
                bson_strncpy(first_local_idx, bson_iter_key(&it), sizeof(first_local_idx));
            }
        } else if (first_local && strcmp(op, "$match") != 0) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "stream %s: pipeline stage %s (%s) follows stage %s, which "
                                "uses $var; $var stages are evaluated per subscriber after "
                                "the whole server-side pipeline, so put them after every "
                                "stage that reshapes the event",
                                name, bson_iter_key(&it), op, first_local_idx);
        }
    }
    return 0;
}

/* Compiles the stream's $var stages with the subscriber's vars into sub->local. */
static int compile_local(mcd_subscription_t *sub, const mc_stream_config_t *stream,
                         const bson_t *vars, mcd_refusal_t *r)
{
    bson_t server, local;
    mc_error_t err = {0};
    int rc = mc_pipeline_split(stream->pipeline, &server, &local, &err);
    bson_destroy(&server);
    if (rc != 0) {
        bson_destroy(&local);
        /* mcd_stream_local_stages_check() at start-up keeps this from happening. */
        return mcd_refuse(r, 400, "invalid_vars", "stream pipeline cannot be evaluated");
    }
    uint32_t n_stages = bson_count_keys(&local);
    if (n_stages > MAX_LOCAL_STAGES) {
        bson_destroy(&local);
        return mcd_refuse(r, 400, "invalid_vars", "stream pipeline cannot be evaluated");
    }
    if (n_stages > 0) {
        sub->local = calloc(n_stages, sizeof(*sub->local));
        if (!sub->local) {
            bson_destroy(&local);
            return mcd_refuse(r, 503, "too_many_connections", "out of memory");
        }
    }
    bson_iter_t it;
    bson_iter_init(&it, &local);
    while (bson_iter_next(&it)) {
        bson_iter_t stage;
        const uint8_t *data;
        uint32_t len;
        bson_t query;
        if (sub->n_local >= n_stages || !bson_iter_recurse(&it, &stage) ||
            !bson_iter_next(&stage) || strcmp(bson_iter_key(&stage), "$match") != 0 ||
            !BSON_ITER_HOLDS_DOCUMENT(&stage)) {
            bson_destroy(&local);
            return mcd_refuse(r, 400, "invalid_vars", "stream pipeline cannot be evaluated");
        }
        bson_iter_document(&stage, &len, &data);
        if (!bson_init_static(&query, data, len)) {
            bson_destroy(&local);
            return mcd_refuse(r, 400, "invalid_vars", "stream pipeline cannot be evaluated");
        }
        /* The stage comes from the operator's config, so $expr is allowed here; what the
         * subscriber binds is a value (the matcher makes it a literal inside $expr), and
         * $where/$function/$accumulator are not supported by the matcher at all. */
        mc_filter_opts_t opts = {
            .vars = vars,
        };
        mc_filter_t *f = mc_filter_new(&query, &opts, &err);
        if (!f) {
            bson_destroy(&local);
            /* The matcher's messages name the variable ("variable n not bound") or the
             * problem with its value; they never contain document contents. */
            return mcd_refuse(r, 400, "invalid_vars", "%s", err.message);
        }
        sub->local[sub->n_local++] = f;
    }
    bson_destroy(&local);
    return 0;
}

/* ---- Client filter ------------------------------------------------------------------- */

static int compile_client(mcd_subscription_t *sub, const char *json, mcd_refusal_t *r)
{
    size_t len = strlen(json);
    if (len > MCD_FILTER_MAX_BYTES) {
        return mcd_refuse(r, 400, "invalid_filter", "filter larger than %d bytes",
                          MCD_FILTER_MAX_BYTES);
    }
    bson_t query;
    if (mcd_json_object_parse(json, len, &query) != 0) {
        return mcd_refuse(r, 400, "invalid_filter", "filter must be a JSON object");
    }
    mc_filter_opts_t opts = {
        .max_depth = MCD_FILTER_MAX_DEPTH,
        .max_predicates = MAX_CLIENT_PREDICATES,
        .refuse_code_operators = true,
        .vars = NULL,
    };
    mc_error_t err = {0};
    sub->client = mc_filter_new(&query, &opts, &err);
    bson_destroy(&query);
    if (!sub->client) {
        return mcd_refuse(r, 400, "invalid_filter", "%s", err.message);
    }
    return 0;
}

/* ---- Public API ---------------------------------------------------------------------- */

mcd_subscription_t *mcd_subscription_new(const mc_stream_config_t *stream, const char *vars_json,
                                         const char *filter_json, const mcd_identity_t *id,
                                         mcd_refusal_t *r)
{
    static const mcd_identity_t anonymous;
    if (!stream) {
        mcd_refuse(r, 404, "unknown_stream", "unknown stream");
        return NULL;
    }
    if (!id) {
        id = &anonymous;
    }
    if (!stream->is_public && !id->authenticated && !id->auth_disabled) {
        mcd_refuse(r, 401, "unauthorized", "missing token");
        return NULL;
    }
    /* An empty query value (?filter=) means "not given". */
    if (vars_json && !*vars_json) {
        vars_json = NULL;
    }
    if (filter_json && !*filter_json) {
        filter_json = NULL;
    }
    if (filter_json && !stream->client_filters) {
        mcd_refuse(r, 400, "filters_not_allowed", "this stream does not accept filters");
        return NULL;
    }
    /* Public streams and servers without auth: the recipient routes, it never authorizes. */
    bool restrict_recipient =
        stream->recipient && !stream->is_public && !id->auth_disabled && !id->is_admin;
    /* An identity that is empty (a hand-built mcd_identity_t) matches no recipient. */
    size_t identity_len = 0;
    if (restrict_recipient && id->identity.len <= MC_IDENTITY_MAX) {
        identity_len = id->identity.len;
    }
    mcd_subscription_t *sub = calloc(1, sizeof(*sub) + identity_len);
    if (!sub) {
        mcd_refuse(r, 503, "too_many_connections", "out of memory");
        return NULL;
    }
    sub->restrict_recipient = restrict_recipient;
    sub->identity_len = (uint16_t)identity_len;
    memcpy(sub->identity, id->identity.bytes, identity_len);
    bson_t vars;
    bool have_vars = false;
    if (vars_json) {
        if (parse_vars(vars_json, &vars, r) != 0) {
            goto fail;
        }
        have_vars = true;
    }
    int rc = compile_local(sub, stream, have_vars ? &vars : NULL, r);
    if (have_vars) {
        bson_destroy(&vars);
    }
    if (rc != 0) {
        goto fail;
    }
    if (filter_json && compile_client(sub, filter_json, r) != 0) {
        goto fail;
    }
    sub->matches_all = !sub->restrict_recipient && sub->n_local == 0 && !sub->client;
    return sub;
fail:
    mcd_subscription_destroy(sub);
    return NULL;
}

void mcd_subscription_destroy(mcd_subscription_t *sub)
{
    if (!sub) {
        return;
    }
    for (size_t i = 0; i < sub->n_local; i++) {
        mc_filter_destroy(sub->local[i]);
    }
    free(sub->local);
    mc_filter_destroy(sub->client);
    free(sub);
}

/* The view `sub` gets of `ev` (mc_event_view_t), or -1 when the budget `b` (may be NULL) ran
 * out or a regex hit a limit. */
static int view_of(const mcd_subscription_t *sub, const mc_event_t *ev, mc_filter_budget_t *b)
{
    if (!sub || !ev) {
        return MC_EVENT_VIEW_NONE;
    }
    if (mc_event_kind(ev) != MC_EVENT_CHANGE) {
        return MC_EVENT_VIEW_FULL;
    }
    mc_event_view_t view = MC_EVENT_VIEW_FULL;
    if (sub->restrict_recipient) {
        /* No recipient (unresolved, lookup miss, not an identity): admins only. */
        view = mc_event_view_for(ev, sub->identity, sub->identity_len);
        if (view == MC_EVENT_VIEW_NONE) {
            return view;
        }
        if (view == MC_EVENT_VIEW_LEFT) {
            /* Filters are not evaluated: they could only be evaluated on the new owner's
             * version, and the answer would tell the old owner something about it. */
            return view;
        }
    }
    /* Filters see exactly the document this subscriber would receive. */
    const bson_t *change = mc_event_change_view(ev, view);
    if (!change) {
        return MC_EVENT_VIEW_NONE;
    }
    for (size_t i = 0; i < sub->n_local; i++) {
        if (!(b ? mc_filter_match_budget(sub->local[i], change, b)
                : mc_filter_match(sub->local[i], change))) {
            return b && b->exceeded ? -1 : MC_EVENT_VIEW_NONE;
        }
    }
    if (sub->client && !(b ? mc_filter_match_budget(sub->client, change, b)
                           : mc_filter_match(sub->client, change))) {
        return b && b->exceeded ? -1 : MC_EVENT_VIEW_NONE;
    }
    return view;
}

bool mcd_subscription_match(const mcd_subscription_t *sub, const mc_event_t *ev)
{
    return view_of(sub, ev, NULL) != MC_EVENT_VIEW_NONE;
}

mc_event_view_t mcd_subscription_view(const mcd_subscription_t *sub, const mc_event_t *ev)
{
    return (mc_event_view_t)view_of(sub, ev, NULL);
}

int mcd_subscription_view_budget(const mcd_subscription_t *sub, const mc_event_t *ev,
                                 mc_filter_budget_t *budget)
{
    return view_of(sub, ev, budget);
}

bool mcd_subscription_matches_all(const mcd_subscription_t *sub)
{
    return sub && sub->matches_all;
}
