/*
 * recipient_rules.c: a stream's recipient rules and summaries as its watcher applies them
 * (recipient_rules.h).
 *
 * Thread: the thread that owns the instance only (the stream's watcher, or a catch-up thread).
 *
 * Invariants: every rule of the config has one compiled entry (the single form is rule 0 of
 * its own); a rule's lookup points at exactly one instance of `lookups`, shared by every rule
 * with the same (db, collection, field, recipient); lookups are called in the event order of
 * the stream, which is cluster-time order, as recipient_lookup.h requires of each instance.
 */
#include "recipient_rules.h"

#include <stdlib.h>
#include <string.h>

#include "recipient_lookup.h"
#include "summary.h"

typedef struct rule {
    const char *path;               /* borrowed from the config */
    mc__recipient_lookup_t *lookup; /* into lookups, or NULL */
    mc__summary_t *summary;         /* owned; NULL: the stream's */
} rule_t;

struct mc__recipients {
    const mc_stream_config_t *cfg;
    bool by_collection;
    rule_t single;                    /* the stream's one rule (not by_collection) */
    rule_t *rules;                    /* by_collection rules, in config order */
    rule_t def;                       /* recipient.default (path NULL: none) */
    mc__summary_t *summary;           /* the stream's summary, or NULL */
    mc__recipient_lookup_t **lookups; /* distinct lookup instances */
    const mc_recipient_lookup_t **lookup_cfgs;
    size_t n_lookups;
};

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool same_lookup(const mc_recipient_lookup_t *a, const mc_recipient_lookup_t *b)
{
    return same_str(a->db, b->db) && same_str(a->collection, b->collection) &&
           same_str(a->field ? a->field : "_id", b->field ? b->field : "_id") &&
           same_str(a->recipient, b->recipient);
}

/* The shared instance for `cfg`, created on first use. NULL when memory runs out. */
static mc__recipient_lookup_t *lookup_for(mc__recipients_t *r, const mc_recipient_lookup_t *cfg,
                                          const char *stream, mongoc_client_pool_t *pool)
{
    for (size_t i = 0; i < r->n_lookups; i++) {
        if (same_lookup(r->lookup_cfgs[i], cfg)) {
            return r->lookups[i];
        }
    }
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(cfg, stream, pool);
    if (!l) {
        return NULL;
    }
    r->lookups[r->n_lookups] = l;
    r->lookup_cfgs[r->n_lookups] = cfg;
    r->n_lookups++;
    return l;
}

static int rule_init(mc__recipients_t *r, rule_t *out, const char *path,
                     const mc_recipient_lookup_t *lookup, const mc_summary_config_t *summary,
                     const char *stream, mongoc_client_pool_t *pool, mc_error_t *err)
{
    out->path = path;
    if (lookup && !(out->lookup = lookup_for(r, lookup, stream, pool))) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    if (summary && summary->n_rules > 0) {
        mc_error_t serr = {0};
        out->summary = mc__summary_new(summary, &serr);
        if (!out->summary) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "stream %s: %s",
                                stream, serr.message);
        }
    }
    return 0;
}

mc__recipients_t *mc__recipients_new(const mc_stream_config_t *cfg, const char *stream,
                                     mongoc_client_pool_t *pool, mc_error_t *err)
{
    mc__recipients_t *r = calloc(1, sizeof(*r));
    size_t max_lookups = cfg->n_by_collection + 2;
    if (!r || !(r->lookups = calloc(max_lookups, sizeof(*r->lookups))) ||
        !(r->lookup_cfgs = calloc(max_lookups, sizeof(*r->lookup_cfgs))) ||
        (cfg->n_by_collection && !(r->rules = calloc(cfg->n_by_collection, sizeof(*r->rules))))) {
        mc__recipients_destroy(r);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    r->cfg = cfg;
    r->by_collection = cfg->n_by_collection > 0 || cfg->recipient_default;
    if (cfg->summary.n_rules > 0) {
        mc_error_t serr = {0};
        r->summary = mc__summary_new(&cfg->summary, &serr);
        if (!r->summary) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "stream %s: %s", stream,
                         serr.message);
            mc__recipients_destroy(r);
            return NULL;
        }
    }
    int rc = 0;
    if (!r->by_collection) {
        rc = rule_init(r, &r->single, cfg->recipient, cfg->recipient ? cfg->lookup : NULL, NULL,
                       stream, pool, err);
    }
    for (size_t i = 0; rc == 0 && i < cfg->n_by_collection; i++) {
        const mc_recipient_rule_t *c = &cfg->by_collection[i];
        rc = rule_init(r, &r->rules[i], c->path, c->lookup, &c->summary, stream, pool, err);
    }
    if (rc == 0 && cfg->recipient_default) {
        const mc_recipient_rule_t *c = cfg->recipient_default;
        rc = rule_init(r, &r->def, c->path, c->lookup, &c->summary, stream, pool, err);
    }
    if (rc != 0) {
        mc__recipients_destroy(r);
        return NULL;
    }
    return r;
}

void mc__recipients_destroy(mc__recipients_t *r)
{
    if (!r) {
        return;
    }
    for (size_t i = 0; i < r->n_lookups; i++) {
        mc__recipient_lookup_destroy(r->lookups[i]);
    }
    if (r->rules) {
        for (size_t i = 0; i < r->cfg->n_by_collection; i++) {
            mc__summary_destroy(r->rules[i].summary);
        }
    }
    mc__summary_destroy(r->def.summary);
    mc__summary_destroy(r->summary);
    free(r->rules);
    free(r->lookups);
    free(r->lookup_cfgs);
    free(r);
}

const char *mc__recipients_event_path(const mc__recipients_t *r)
{
    return r && !r->by_collection && !r->single.lookup ? r->single.path : NULL;
}

size_t mc__recipients_lookup_count(const mc__recipients_t *r)
{
    return r ? r->n_lookups : 0;
}

static mc__rstate_t lookup_value(const rule_t *rule, mc__vstate_t st, const bson_iter_t *ref,
                                 uint64_t ct, mc_identity_t *out, const atomic_bool *stopping)
{
    out->len = 0;
    switch (st) {
    case MC__V_FOUND:
        return mc__recipient_lookup_at(rule->lookup, bson_iter_value((bson_iter_t *)ref), ct, out,
                                       stopping);
    case MC__V_UNRESOLVED: return MC__R_UNRESOLVED;
    case MC__V_ABSENT: return MC__R_ABSENT;
    default: return MC__R_NONE;
    }
}

/* The lookup form: the references after and before the write are looked up as of the
 * event's cluster time. *missing: the path held nothing usable as a reference. */
static void route_by_lookup(const rule_t *rule, mc_event_t *ev, const atomic_bool *stopping,
                            bool *missing)
{
    bson_iter_t post, prev;
    mc__vstate_t post_st, prev_st;
    mc__recipient_values(mc_event_change(ev), rule->path, &post, &post_st, &prev, &prev_st);
    uint32_t t = 0, i = 0;
    uint64_t ct = mc_event_cluster_time(ev, &t, &i) ? mc__ct(t, i) : 0;
    mc__routing_t rt;
    rt.post = lookup_value(rule, post_st, &post, ct, &rt.post_id, stopping);
    rt.prev = lookup_value(rule, prev_st, &prev, ct, &rt.prev_id, stopping);
    mc__event_set_routing(ev, &rt);
    *missing = post_st == MC__V_MISSING ||
               (post_st == MC__V_FOUND && bson_iter_type(&post) != BSON_TYPE_DOCUMENT &&
                !mc_identity_from_iter(&post, &rt.post_id));
}

/* A document event: one whose recipient comes from a document version. */
static bool document_op(const char *op)
{
    return op && (!strcmp(op, "insert") || !strcmp(op, "update") || !strcmp(op, "replace") ||
                  !strcmp(op, "delete"));
}

mc__route_note_t mc__recipients_route(mc__recipients_t *r, mc_event_t *ev,
                                      const atomic_bool *stopping)
{
    if (!r || mc_event_kind(ev) != MC_EVENT_CHANGE) {
        return MC__ROUTE_OK;
    }
    if (!r->by_collection && !r->single.path) {
        /* A stream without a recipient: only its summary. */
        if (r->summary) {
            mc__event_set_summary(ev, r->summary);
        }
        return MC__ROUTE_OK;
    }
    const rule_t *rule = &r->single;
    if (r->by_collection) {
        const mc_recipient_rule_t *c =
            mc_stream_config_rule(r->cfg, mc_event_db(ev), mc_event_coll(ev));
        rule = !c                               ? NULL
               : c == r->cfg->recipient_default ? &r->def
                                                : &r->rules[c - r->cfg->by_collection];
    }
    bool missing = false;
    if (!rule || !rule->path) {
        /* A collection without a rule: admins only, as configured (not counted). */
        mc__routing_t none = {.post = MC__R_NONE, .prev = MC__R_ABSENT};
        mc__event_set_routing(ev, &none);
    } else if (rule->lookup) {
        route_by_lookup(rule, ev, stopping, &missing);
    } else if (r->by_collection) {
        mc__vstate_t post_st = MC__V_MISSING;
        mc__event_route_by_path(ev, rule->path, &post_st);
        missing = post_st != MC__V_UNRESOLVED;
    } else {
        /* Routed when the event was built (mc__recipients_event_path()). */
        missing = true;
    }
    const mc__summary_t *summary = rule && rule->summary ? rule->summary : r->summary;
    if (summary) {
        mc__event_set_summary(ev, summary);
    }
    if (mc_event_recipient_unresolved(ev)) {
        return MC__ROUTE_UNRESOLVED;
    }
    /* `missing` said where a lookup's NONE came from; for a path, NONE is always the path. */
    if (rule && rule->path && missing && mc__event_recipient_state(ev) == MC__R_NONE &&
        document_op(mc_event_operation_type(ev))) {
        return MC__ROUTE_MISSING;
    }
    return MC__ROUTE_OK;
}
