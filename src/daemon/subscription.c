/*
 * subscription.c: one subscriber's view of a stream (subscription.h): the recipient rule, the
 * stream's per-subscriber stages (the first stage that uses {$var: name} and every stage after
 * it, in the order written) compiled with the subscriber's `vars`, and the subscriber's own
 * `filter`.
 *
 * Thread: mcd_subscription_new() and mcd_subscription_apply() run on the loop thread. A
 * subscription is immutable once built.
 *
 * Invariants:
 *   - everything a subscriber sends is parsed, validated and compiled here, once, before
 *     the upgrade; applying only reads compiled stages, within the caller's CPU budget.
 *     Stages that only filter allocate nothing (a regex's backtracking past its stack arena
 *     excepted, and a config stage's $expr when it builds a string or crosses an array);
 *     stages that reshape build the subscriber's own copy of the change;
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
#include "mongocast/pipeline.h"

#define MCD_VARS_MAX_BYTES 16384
#define MAX_CLIENT_PREDICATES 256

/* Sized to what it holds: one of these lives as long as each connection, and an idle
 * subscriber must cost well under 1 KiB. */
struct mcd_subscription {
    mc_pipeline_t *local;    /* the per-subscriber stages bound with vars; NULL when none */
    mc_filter_t *client;     /* NULL: no client filter */
    bool reshapes;           /* `local` has a stage other than $match */
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

int mcd_stream_local_stages_check(const mc_stream_config_t *stream, mc_error_t *err)
{
    return mc_stream_config_check_pipeline(stream, err);
}

/* Compiles the stream's per-subscriber stages with the subscriber's vars into sub->local. */
static int compile_local(mcd_subscription_t *sub, const mc_stream_config_t *stream,
                         const bson_t *vars, mcd_refusal_t *r)
{
    bson_t server, local;
    mc_error_t err = {0};
    int rc = mc_pipeline_split(stream->pipeline, &server, &local, &err);
    bson_destroy(&server);
    if (rc != 0) {
        bson_destroy(&local);
        /* The loader (pipeline_check.c) keeps this from happening. */
        return mcd_refuse(r, 400, "invalid_vars", "stream pipeline cannot be evaluated");
    }
    if (bson_empty(&local)) {
        bson_destroy(&local);
        return 0;
    }
    /* The stages come from the operator's config, so $expr is allowed; what the subscriber
     * binds is a value (inside $expr always a literal), never an operator. */
    mc_pipeline_opts_t opts = {.vars = vars};
    sub->local = mc_pipeline_new(&local, &opts, &err);
    bson_destroy(&local);
    if (!sub->local) {
        /* The messages name the variable ("variable n not bound") or the problem with its
         * value; they never contain document contents. */
        return mcd_refuse(r, 400, "invalid_vars", "%s", err.message);
    }
    sub->reshapes = !mc_pipeline_only_filters(sub->local);
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
    bool restrict_recipient = mc_stream_config_has_recipient(stream) && !stream->is_public &&
                              !id->auth_disabled && !id->is_admin;
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
    sub->matches_all = !sub->restrict_recipient && !sub->local && !sub->client;
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
    mc_pipeline_destroy(sub->local);
    mc_filter_destroy(sub->client);
    free(sub);
}

/* The resume token must come out of the stages as it went in: MongoDB fails a change stream
 * whose pipeline modifies _id (280), and the subscriber's own stages are judged the same way. */
static bool same_id(const bson_t *in, const bson_t *out)
{
    bson_iter_t a, b;
    if (!bson_iter_init_find(&a, in, "_id") || !bson_iter_init_find(&b, out, "_id") ||
        bson_iter_type(&a) != bson_iter_type(&b)) {
        return false;
    }
    const bson_value_t *va = bson_iter_value(&a), *vb = bson_iter_value(&b);
    return va->value_type == BSON_TYPE_DOCUMENT &&
           va->value.v_doc.data_len == vb->value.v_doc.data_len &&
           memcmp(va->value.v_doc.data, vb->value.v_doc.data, va->value.v_doc.data_len) == 0;
}

/* MongoDB's code for a stage that failed with `err`, or MCD_STAGE_ERROR. */
static int stage_error_code(const mc_error_t *err)
{
    return err->domain == MC_DOMAIN_MONGODB && err->cause > 0 ? err->cause : MCD_STAGE_ERROR;
}

int mcd_subscription_apply(const mcd_subscription_t *sub, const mc_event_t *ev,
                           mc_filter_budget_t *budget, bson_t *out, bool *own, int *error_code)
{
    *own = false;
    *error_code = 0;
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
            /* Stages and filters are not evaluated: they could only be evaluated on the new
             * owner's version, and the answer would tell the old owner something about it. */
            return view;
        }
    }
    /* The stages run on exactly the document this subscriber's view carries. */
    const bson_t *change = mc_event_change_view(ev, view);
    if (!change) {
        return MC_EVENT_VIEW_NONE;
    }
    mc_error_t err = {0};
    if (sub->local && !sub->reshapes) {
        int rc = mc_pipeline_test(sub->local, change, budget, &err);
        if (rc < 0) {
            if (budget && budget->exceeded) {
                return -1;
            }
            *error_code = stage_error_code(&err);
            return MC_EVENT_VIEW_NONE;
        }
        if (rc == 0) {
            return MC_EVENT_VIEW_NONE;
        }
    } else if (sub->local) {
        int rc = mc_pipeline_apply_budget(sub->local, change, budget, out, &err);
        if (rc <= 0 || !same_id(change, out)) {
            bson_destroy(out);
            if (rc < 0 && budget && budget->exceeded) {
                return -1;
            }
            if (rc < 0) {
                *error_code = stage_error_code(&err);
            } else if (rc > 0) {
                *error_code = 280; /* ChangeStreamFatalError: the resume token was modified */
            }
            return MC_EVENT_VIEW_NONE;
        }
        *own = true;
        change = out;
    }
    /* The client filter sees what the subscriber would receive, within what is left of the
     * same budget. */
    if (sub->client && !(budget ? mc_filter_match_budget(sub->client, change, budget)
                                : mc_filter_match(sub->client, change))) {
        if (*own) {
            bson_destroy(out);
            *own = false;
        }
        return budget && budget->exceeded ? -1 : MC_EVENT_VIEW_NONE;
    }
    return view;
}

int mcd_subscription_view_budget(const mcd_subscription_t *sub, const mc_event_t *ev,
                                 mc_filter_budget_t *budget)
{
    bson_t out;
    bool own = false;
    int code = 0;
    int view = mcd_subscription_apply(sub, ev, budget, &out, &own, &code);
    if (own) {
        bson_destroy(&out);
    }
    return view;
}

mc_event_view_t mcd_subscription_view(const mcd_subscription_t *sub, const mc_event_t *ev)
{
    return (mc_event_view_t)mcd_subscription_view_budget(sub, ev, NULL);
}

bool mcd_subscription_reshapes(const mcd_subscription_t *sub)
{
    return sub && sub->reshapes;
}

bool mcd_subscription_match(const mcd_subscription_t *sub, const mc_event_t *ev)
{
    return mcd_subscription_view(sub, ev) != MC_EVENT_VIEW_NONE;
}

bool mcd_subscription_matches_all(const mcd_subscription_t *sub)
{
    return sub && sub->matches_all;
}

const uint8_t *mcd_subscription_identity(const mcd_subscription_t *sub, size_t *len)
{
    if (!sub || !sub->restrict_recipient) {
        *len = 0;
        return NULL;
    }
    *len = sub->identity_len;
    return sub->identity;
}
