/*
 * test_subscription.c: what one subscriber receives (src/daemon/subscription.c): $var binding
 * and its refusals (unbound, operator injection, bad JSON, size), client filters and their
 * refusals (code operators at any depth, depth and size limits, filters_not_allowed), the
 * recipient rule (isolation, admins, public streams, deletes routed through the pre-image),
 * control events, the start-up check of $var stages, per-subscriber stages in the order
 * written, and those stages within the subscriber's CPU budget. Main thread only.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mongocast.h"
#include "subscription.h"
#include "test_json.h"

/* ---- Helpers --------------------------------------------------------------------------- */

static uint64_t seq;

/* A change event with the given operationType, owner and tenant (NULL: field absent). For
 * "delete" the owner lives only in the pre-image, as MongoDB reports it. */
static mc_event_t *change(const char *op, const char *owner, const char *tenant)
{
    char doc[1024];
    char fields[256] = "\"_id\":1";
    if (owner) {
        snprintf(fields + strlen(fields), sizeof(fields) - strlen(fields), ",\"owner\":\"%s\"",
                 owner);
    }
    if (tenant) {
        snprintf(fields + strlen(fields), sizeof(fields) - strlen(fields), ",\"tenant\":\"%s\"",
                 tenant);
    }
    bool del = strcmp(op, "delete") == 0;
    snprintf(doc, sizeof(doc),
             "{\"_id\":{\"_data\":\"82%016llu\"},\"operationType\":\"%s\","
             "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":1},"
             "\"%s\":{%s}}",
             (unsigned long long)++seq, op, del ? "fullDocumentBeforeChange" : "fullDocument",
             fields);
    bson_t *b = json(doc);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", seq, b, "fullDocument.owner", &err);
    bson_destroy(b);
    if (!ev) {
        fail_msg("event: %s", err.message);
    }
    return ev;
}

typedef struct fx {
    mc_stream_config_t stream;
    bson_t *pipeline;
} fx_t;

static int setup(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    f->pipeline = json("{\"0\":{\"$match\":{\"operationType\":{\"$ne\":\"drop\"}}},"
                       "\"1\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}}}");
    f->stream = (mc_stream_config_t){
        .name = (char *)"orders",
        .db = (char *)"shop",
        .collection = (char *)"orders",
        .pipeline = f->pipeline,
        .recipient = (char *)"fullDocument.owner",
        .client_filters = true,
    };
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx_t *f = *state;
    bson_destroy(f->pipeline);
    free(f);
    return 0;
}

static void set_pipeline(fx_t *f, const char *p)
{
    bson_destroy(f->pipeline);
    f->pipeline = json(p);
    f->stream.pipeline = f->pipeline;
}

static mcd_identity_t user(const char *subject, bool admin)
{
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    id.authenticated = true;
    id.is_admin = admin;
    snprintf(id.subject, sizeof(id.subject), "%s", subject);
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = (char *)subject;
    v.value.v_utf8.len = (uint32_t)strlen(subject);
    mc_identity_from_value(&v, &id.identity);
    return id;
}

static mcd_subscription_t *ok_sub(fx_t *f, const char *vars, const char *filter,
                                  const mcd_identity_t *id)
{
    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    mcd_subscription_t *s = mcd_subscription_new(&f->stream, vars, filter, id, &r);
    if (!s) {
        fail_msg("refused %d %s: %s (vars=%s filter=%s)", r.status, r.code, r.message,
                 vars ? vars : "-", filter ? filter : "-");
    }
    return s;
}

/* Expects a refusal with status and code; returns its message (static). */
static const char *refused(fx_t *f, const char *vars, const char *filter, const mcd_identity_t *id,
                           int status, const char *code)
{
    static mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    mcd_subscription_t *s = mcd_subscription_new(&f->stream, vars, filter, id, &r);
    if (s) {
        mcd_subscription_destroy(s);
        fail_msg("accepted vars=%s filter=%s", vars ? vars : "-", filter ? filter : "-");
    }
    if (r.status != status || strcmp(r.code, code) != 0) {
        fail_msg("vars=%s filter=%s: got %d %s (%s), want %d %s", vars ? vars : "-",
                 filter ? filter : "-", r.status, r.code, r.message, status, code);
    }
    return r.message;
}

static bool sees(const mcd_subscription_t *s, mc_event_t *ev)
{
    bool b = mcd_subscription_match(s, ev);
    mc_event_unref(&ev);
    return b;
}

/* ---- vars ------------------------------------------------------------------------------- */

static void test_var_binding(void **state)
{
    fx_t *f = *state;
    mcd_identity_t admin = user("root", true);
    mcd_subscription_t *s = ok_sub(f, "{\"t\":\"acme\"}", NULL, &admin);
    assert_true(sees(s, change("insert", "u1", "acme")));
    assert_false(sees(s, change("insert", "u1", "beta")));
    assert_false(sees(s, change("insert", "u1", NULL)));
    mcd_subscription_destroy(s);
    /* Unused extra variables are fine; types are kept (a number does not match a string). */
    s = ok_sub(f, "{\"t\":1,\"unused\":\"x\"}", NULL, &admin);
    assert_false(sees(s, change("insert", "u1", "1")));
    mcd_subscription_destroy(s);
    /* Extended JSON binds typed values. */
    set_pipeline(f, "{\"0\":{\"$match\":{\"fullDocument.owner\":{\"$in\":{\"$var\":\"ids\"}}}}}");
    s = ok_sub(f, "{\"ids\":[\"u1\",\"u3\"]}", NULL, &admin);
    assert_true(sees(s, change("insert", "u1", NULL)));
    assert_true(sees(s, change("insert", "u3", NULL)));
    assert_false(sees(s, change("insert", "u2", NULL)));
    mcd_subscription_destroy(s);
}

/* A stream's own $var stage may use $expr (the config is trusted); what a subscriber binds
 * stays a value there: "$fullDocument.owner" is a string, not a field path to every owner. */
static void test_var_in_expr(void **state)
{
    fx_t *f = *state;
    mcd_identity_t admin = user("root", true);
    set_pipeline(f, "{\"0\":{\"$match\":{\"$expr\":{\"$eq\":[\"$fullDocument.owner\","
                    "{\"$var\":\"o\"}]}}}}");
    mcd_subscription_t *s = ok_sub(f, "{\"o\":\"u1\"}", NULL, &admin);
    assert_true(sees(s, change("insert", "u1", NULL)));
    assert_false(sees(s, change("insert", "u2", NULL)));
    mcd_subscription_destroy(s);
    s = ok_sub(f, "{\"o\":\"$fullDocument.owner\"}", NULL, &admin);
    assert_false(sees(s, change("insert", "u1", NULL)));
    assert_false(sees(s, change("insert", "u2", NULL)));
    mcd_subscription_destroy(s);
}

static void test_unbound_and_bad_vars(void **state)
{
    fx_t *f = *state;
    mcd_identity_t u = user("u1", false);
    assert_string_equal(refused(f, NULL, NULL, &u, 400, "invalid_vars"), "variable t not bound");
    assert_string_equal(refused(f, "{}", NULL, &u, 400, "invalid_vars"), "variable t not bound");
    assert_string_equal(refused(f, "{\"T\":\"acme\"}", NULL, &u, 400, "invalid_vars"),
                        "variable t not bound");
    static const char *not_objects[] = {
        "[\"acme\"]", "1", "\"t\"", "{\"t\":", "{\"t\":1}{}", "{\"t\":1} x", "null", "{'t':1}"};
    for (size_t i = 0; i < sizeof(not_objects) / sizeof(not_objects[0]); i++) {
        assert_string_equal(refused(f, not_objects[i], NULL, &u, 400, "invalid_vars"),
                            "vars must be a JSON object");
    }
    char *big = malloc(20000);
    snprintf(big, 20000, "{\"t\":\"%0*d\"}", 16400, 0);
    const char *m = refused(f, big, NULL, &u, 400, "invalid_vars");
    assert_non_null(strstr(m, "larger than 16384"));
    free(big);
    /* Just under the limit is fine. */
    big = malloc(20000);
    snprintf(big, 20000, "{\"t\":\"%0*d\"}", 16000, 0);
    mcd_subscription_t *s = ok_sub(f, big, NULL, &u);
    mcd_subscription_destroy(s);
    free(big);
}

static void test_operator_injection(void **state)
{
    fx_t *f = *state;
    mcd_identity_t u = user("u1", false);
    static const char *inject[] = {
        "{\"t\":{\"$ne\":1}}",
        "{\"t\":{\"$ne\":null}}",
        "{\"t\":{\"$gt\":\"\"}}",
        "{\"t\":{\"$exists\":true}}",
        "{\"t\":{\"$in\":[\"acme\",\"beta\"]}}",
        "{\"t\":{\"a\":{\"$gt\":1}}}",
        "{\"t\":[{\"$ne\":1}]}",
        "{\"t\":\"acme\",\"other\":{\"$where\":\"sleep(5000)\"}}",
    };
    for (size_t i = 0; i < sizeof(inject) / sizeof(inject[0]); i++) {
        const char *m = refused(f, inject[i], NULL, &u, 400, "invalid_vars");
        if (!strstr(m, "operators")) {
            fail_msg("%s: %s", inject[i], m);
        }
    }
    /* Regular expressions (legacy and canonical Extended JSON) would match as patterns. */
    assert_non_null(strstr(refused(f, "{\"t\":{\"$regex\":\".*\"}}", NULL, &u, 400, "invalid_vars"),
                           "regular expressions"));
    assert_non_null(strstr(refused(f,
                                   "{\"t\":{\"$regularExpression\":{\"pattern\":\".\","
                                   "\"options\":\"\"}}}",
                                   NULL, &u, 400, "invalid_vars"),
                           "regular expressions"));
    assert_non_null(
        strstr(refused(f, "{\"t\":{\"$code\":\"1\"}}", NULL, &u, 400, "invalid_vars"), "code"));
    assert_string_equal(refused(f, "{\"$where\":\"1\"}", NULL, &u, 400, "invalid_vars"),
                        "invalid variable name");
    /* Deep nesting of plain values is bounded too. */
    char deep[256] = "{\"t\":";
    for (int i = 0; i < 20; i++) {
        strcat(deep, "[");
    }
    strcat(deep, "1");
    for (int i = 0; i < 20; i++) {
        strcat(deep, "]");
    }
    strcat(deep, "}");
    assert_non_null(strstr(refused(f, deep, NULL, &u, 400, "invalid_vars"), "deeper"));
}

/* ---- client filters ------------------------------------------------------------------- */

static void test_client_filter(void **state)
{
    fx_t *f = *state;
    set_pipeline(f, "{}");
    mcd_identity_t admin = user("root", true);
    mcd_subscription_t *s = ok_sub(f, NULL, "{\"operationType\":\"insert\"}", &admin);
    assert_true(sees(s, change("insert", "u1", NULL)));
    assert_false(sees(s, change("update", "u1", NULL)));
    mcd_subscription_destroy(s);
    s = ok_sub(f, NULL,
               "{\"$or\":[{\"fullDocument.tenant\":{\"$in\":[\"a\",\"b\"]}},"
               "{\"fullDocumentBeforeChange.tenant\":\"c\"}]}",
               &admin);
    assert_true(sees(s, change("insert", "u1", "b")));
    assert_true(sees(s, change("delete", "u1", "c")));
    assert_false(sees(s, change("insert", "u1", "c")));
    mcd_subscription_destroy(s);
    /* Extended JSON values and regexes are fine in filters. */
    s = ok_sub(f, NULL, "{\"fullDocument.owner\":{\"$regex\":\"^u[12]$\"}}", &admin);
    assert_true(sees(s, change("insert", "u2", NULL)));
    assert_false(sees(s, change("insert", "u12", NULL)));
    mcd_subscription_destroy(s);
    /* Empty means absent. */
    s = ok_sub(f, "", "", &admin);
    assert_true(sees(s, change("update", "u1", NULL)));
    mcd_subscription_destroy(s);

    f->stream.client_filters = false;
    assert_string_equal(
        refused(f, NULL, "{\"operationType\":\"insert\"}", &admin, 400, "filters_not_allowed"),
        "this stream does not accept filters");
}

static void test_filter_refusals(void **state)
{
    fx_t *f = *state;
    set_pipeline(f, "{}");
    mcd_identity_t u = user("u1", false);
    static const char *code_ops[] = {
        "{\"$where\":\"sleep(5000)\"}",
        "{\"$expr\":{\"$eq\":[1,1]}}",
        "{\"$function\":{\"body\":\"1\",\"args\":[],\"lang\":\"js\"}}",
        "{\"$accumulator\":{}}",
        "{\"$and\":[{\"a\":1},{\"$where\":\"1\"}]}",
        "{\"$or\":[{\"$and\":[{\"$nor\":[{\"$expr\":{\"$gt\":[\"$a\",1]}}]}]}]}",
        "{\"$nor\":[{\"$function\":{}}]}",
    };
    for (size_t i = 0; i < sizeof(code_ops) / sizeof(code_ops[0]); i++) {
        const char *m = refused(f, NULL, code_ops[i], &u, 400, "invalid_filter");
        if (!strstr(m, "not allowed")) {
            fail_msg("%s: %s", code_ops[i], m);
        }
    }
    /* Code operators in field position or inside $elemMatch are not accepted either. */
    refused(f, NULL, "{\"a\":{\"$elemMatch\":{\"$where\":\"1\"}}}", &u, 400, "invalid_filter");
    refused(f, NULL, "{\"a\":{\"$where\":\"1\"}}", &u, 400, "invalid_filter");
    refused(f, NULL, "{\"a\":{\"$not\":{\"$expr\":1}}}", &u, 400, "invalid_filter");
    refused(f, NULL, "{\"a\":{\"$foo\":1}}", &u, 400, "invalid_filter");
    refused(f, NULL, "{\"a\":{\"$var\":\"t\"}}", &u, 400, "invalid_filter");
    /* Not one object. */
    static const char *not_objects[] = {"[]", "1", "{\"a\":1}{\"$where\":\"1\"}", "{", "nul"};
    for (size_t i = 0; i < sizeof(not_objects) / sizeof(not_objects[0]); i++) {
        assert_string_equal(refused(f, NULL, not_objects[i], &u, 400, "invalid_filter"),
                            "filter must be a JSON object");
    }
    /* Depth counts BSON nesting (each $and adds an array and a document): 7 nested $and
     * reach level 15 of MCD_FILTER_MAX_DEPTH (16) and pass, 8 reach 17 and do not. */
    char q[1024];
    for (int depth = 7; depth <= 8; depth++) {
        q[0] = '\0';
        for (int i = 0; i < depth; i++) {
            strcat(q, "{\"$and\":[");
        }
        strcat(q, "{\"a\":1}");
        for (int i = 0; i < depth; i++) {
            strcat(q, "]}");
        }
        mcd_refusal_t r;
        mcd_subscription_t *s = mcd_subscription_new(&f->stream, NULL, q, &u, &r);
        if (depth == 7) {
            if (!s) {
                fail_msg("depth 7 refused: %s", r.message);
            }
            mcd_subscription_destroy(s);
        } else {
            assert_null(s);
            assert_string_equal(r.code, "invalid_filter");
            assert_non_null(strstr(r.message, "deeper"));
        }
    }
    /* Size. */
    char *big = malloc(MCD_FILTER_MAX_BYTES + 100);
    snprintf(big, MCD_FILTER_MAX_BYTES + 100, "{\"a\":\"%0*d\"}", MCD_FILTER_MAX_BYTES, 0);
    assert_non_null(strstr(refused(f, NULL, big, &u, 400, "invalid_filter"), "larger than"));
    free(big);
    /* Predicate count is bounded too. */
    big = malloc(20000);
    strcpy(big, "{\"$or\":[");
    for (int i = 0; i < 300; i++) {
        sprintf(big + strlen(big), "%s{\"f%d\":1}", i ? "," : "", i);
    }
    strcat(big, "]}");
    assert_non_null(strstr(refused(f, NULL, big, &u, 400, "invalid_filter"), "predicates"));
    free(big);
}

/* ---- recipients ----------------------------------------------------------------------- */

static void test_recipient_isolation(void **state)
{
    fx_t *f = *state;
    set_pipeline(f, "{}");
    mcd_identity_t u1 = user("u1", false), u2 = user("u2", false), admin = user("ops", true);
    mcd_subscription_t *s1 = ok_sub(f, NULL, NULL, &u1);
    mcd_subscription_t *s2 = ok_sub(f, NULL, NULL, &u2);
    mcd_subscription_t *sa = ok_sub(f, NULL, NULL, &admin);
    assert_true(sees(s1, change("insert", "u1", NULL)));
    assert_false(sees(s2, change("insert", "u1", NULL)));
    assert_true(sees(sa, change("insert", "u1", NULL)));
    assert_false(sees(s1, change("update", "u2", NULL)));
    assert_true(sees(s2, change("update", "u2", NULL)));
    /* Prefixes and case do not match. */
    assert_false(sees(s1, change("insert", "u10", NULL)));
    assert_false(sees(s1, change("insert", "U1", NULL)));
    /* No recipient (field absent): admins only. */
    assert_false(sees(s1, change("insert", NULL, NULL)));
    assert_false(sees(s2, change("insert", NULL, NULL)));
    assert_true(sees(sa, change("insert", NULL, NULL)));
    /* A delete is routed through the pre-image. */
    assert_true(sees(s1, change("delete", "u1", NULL)));
    assert_false(sees(s2, change("delete", "u1", NULL)));
    assert_true(sees(sa, change("delete", "u1", NULL)));
    /* A client filter cannot widen what the recipient rule allows. */
    mcd_subscription_t *sf = ok_sub(f, NULL, "{\"fullDocument.owner\":\"u2\"}", &u1);
    assert_false(sees(sf, change("insert", "u2", NULL)));
    assert_false(sees(sf, change("insert", "u1", NULL)));
    mcd_subscription_destroy(sf);
    /* Control events always pass. */
    assert_true(sees(s1, mc_event_new_control(MC_EVENT_READY, "orders", 99, NULL)));
    assert_true(sees(s2, mc_event_new_control(MC_EVENT_RESET, "orders", 100, "history lost")));
    bson_t *inv = json("{\"_id\":{\"_data\":\"82AA\"},\"operationType\":\"invalidate\"}");
    assert_true(sees(s1, mc_event_new_invalidate("orders", 101, inv, "drop", NULL)));
    bson_destroy(inv);
    mcd_subscription_destroy(s1);
    mcd_subscription_destroy(s2);
    mcd_subscription_destroy(sa);

    /* Anonymous on a private stream: refused here too (fail closed). */
    mcd_identity_t anon;
    memset(&anon, 0, sizeof(anon));
    refused(f, NULL, NULL, &anon, 401, "unauthorized");
    refused(f, NULL, NULL, NULL, 401, "unauthorized");
    /* ...unless the server runs without auth: then nothing restricts. */
    anon.auth_disabled = true;
    mcd_subscription_t *sn = ok_sub(f, NULL, NULL, &anon);
    assert_true(sees(sn, change("insert", "u1", NULL)));
    assert_true(sees(sn, change("insert", NULL, NULL)));
    mcd_subscription_destroy(sn);
}

static void test_public_stream(void **state)
{
    fx_t *f = *state;
    set_pipeline(f, "{}");
    f->stream.is_public = true;
    mcd_identity_t anon, u1 = user("u1", false);
    memset(&anon, 0, sizeof(anon));
    mcd_subscription_t *sa = ok_sub(f, NULL, NULL, &anon);
    mcd_subscription_t *s1 = ok_sub(f, NULL, NULL, &u1);
    assert_true(sees(sa, change("insert", "u1", NULL)));
    assert_true(sees(sa, change("insert", "u2", NULL)));
    assert_true(sees(sa, change("insert", NULL, NULL)));
    assert_true(sees(s1, change("insert", "u2", NULL)));
    mcd_subscription_destroy(sa);
    mcd_subscription_destroy(s1);
    /* A stream without recipient never restricts authenticated users either. */
    f->stream.is_public = false;
    f->stream.recipient = NULL;
    s1 = ok_sub(f, NULL, NULL, &u1);
    assert_true(sees(s1, change("insert", "u2", NULL)));
    mcd_subscription_destroy(s1);
}

static void test_var_and_filter_and_recipient_combined(void **state)
{
    fx_t *f = *state;
    mcd_identity_t u1 = user("u1", false);
    mcd_subscription_t *s = ok_sub(f, "{\"t\":\"acme\"}", "{\"operationType\":\"insert\"}", &u1);
    assert_true(sees(s, change("insert", "u1", "acme")));
    assert_false(sees(s, change("update", "u1", "acme")));
    assert_false(sees(s, change("insert", "u2", "acme")));
    assert_false(sees(s, change("insert", "u1", "beta")));
    mcd_subscription_destroy(s);
}

/* An update that hands document 9 from `from` to `to`; the old version carries a note. */
static mc_event_t *moved(const char *from, const char *to, const char *tenant)
{
    char doc[1024];
    snprintf(doc, sizeof(doc),
             "{\"_id\":{\"_data\":\"82%016llu\"},\"operationType\":\"update\","
             "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":9},"
             "\"updateDescription\":{\"updatedFields\":{\"owner\":\"%s\"},"
             "\"removedFields\":[\"note\"]},"
             "\"fullDocument\":{\"_id\":9,\"owner\":\"%s\",\"tenant\":\"%s\"},"
             "\"fullDocumentBeforeChange\":{\"_id\":9,\"owner\":\"%s\",\"tenant\":\"%s\","
             "\"note\":\"secret\"}}",
             (unsigned long long)++seq, to, to, tenant, from, tenant);
    bson_t *b = json(doc);
    mc_event_t *ev = mc_event_new_change("orders", seq, b, "fullDocument.owner", NULL);
    bson_destroy(b);
    assert_non_null(ev);
    return ev;
}

static mc_event_view_t view(const mcd_subscription_t *s, mc_event_t *ev)
{
    mc_event_view_t v = mcd_subscription_view(s, ev);
    mc_event_unref(&ev);
    return v;
}

static void test_ownership_transfer_views(void **state)
{
    fx_t *f = *state;
    mcd_identity_t u1 = user("u1", false), u2 = user("u2", false), admin = user("ops", true);
    mcd_subscription_t *s1 = ok_sub(f, "{\"t\":\"acme\"}", NULL, &u1);
    mcd_subscription_t *s2 = ok_sub(f, "{\"t\":\"acme\"}", NULL, &u2);
    mcd_subscription_t *sa = ok_sub(f, "{\"t\":\"acme\"}", NULL, &admin);
    assert_int_equal(view(s1, moved("u2", "u1", "acme")), MC_EVENT_VIEW_ENTERED);
    assert_int_equal(view(s2, moved("u2", "u1", "acme")), MC_EVENT_VIEW_LEFT);
    assert_int_equal(view(sa, moved("u2", "u1", "acme")), MC_EVENT_VIEW_FULL);
    /* The stream's $var stage is evaluated on what each one receives; "left" is not filtered
     * (its filter could only be evaluated on the new owner's version). */
    assert_int_equal(view(s1, moved("u2", "u1", "beta")), MC_EVENT_VIEW_NONE);
    assert_int_equal(view(s2, moved("u2", "u1", "beta")), MC_EVENT_VIEW_LEFT);
    mcd_subscription_destroy(s1);
    mcd_subscription_destroy(s2);
    mcd_subscription_destroy(sa);
    /* A filter cannot probe the previous owner's version: it sees the ENTERED change. */
    set_pipeline(f, "{}");
    s1 = ok_sub(f, NULL, "{\"fullDocumentBeforeChange.note\":\"secret\"}", &u1);
    assert_int_equal(view(s1, moved("u2", "u1", "acme")), MC_EVENT_VIEW_NONE);
    mcd_subscription_destroy(s1);
    s1 = ok_sub(f, NULL, "{\"updateDescription.removedFields\":\"note\"}", &u1);
    assert_int_equal(view(s1, moved("u2", "u1", "acme")), MC_EVENT_VIEW_NONE);
    mcd_subscription_destroy(s1);
    sa = ok_sub(f, NULL, "{\"fullDocumentBeforeChange.note\":\"secret\"}", &admin);
    assert_int_equal(view(sa, moved("u2", "u1", "acme")), MC_EVENT_VIEW_FULL);
    mcd_subscription_destroy(sa);
    /* Within a budget: the same views, and a budget that has run out stops the subscriber
     * whose view needs a filter (-1), but not a "left" notice, which evaluates none. */
    s1 = ok_sub(f, NULL, "{\"fullDocument.tenant\":\"acme\"}", &u1);
    s2 = ok_sub(f, NULL, "{\"fullDocument.tenant\":\"acme\"}", &u2);
    mc_filter_budget_t b = {.cpu_ns = 60000000000u};
    mc_event_t *ev = moved("u2", "u1", "acme");
    assert_int_equal(mcd_subscription_view_budget(s1, ev, &b), MC_EVENT_VIEW_ENTERED);
    assert_int_equal(mcd_subscription_view_budget(s2, ev, &b), MC_EVENT_VIEW_LEFT);
    assert_false(b.exceeded);
    b = (mc_filter_budget_t){.cpu_ns = 1, .exceeded = true, .reason = "CPU budget exhausted"};
    assert_int_equal(mcd_subscription_view_budget(s1, ev, &b), -1);
    assert_int_equal(mcd_subscription_view_budget(s2, ev, &b), MC_EVENT_VIEW_LEFT);
    mc_event_unref(&ev);
    /* Not the recipient of either version: nothing, and no filter runs. */
    ev = moved("u2", "u1", "acme");
    mcd_identity_t u3 = user("u3", false);
    mcd_subscription_t *s3 = ok_sub(f, NULL, "{\"fullDocument.tenant\":\"acme\"}", &u3);
    assert_int_equal(mcd_subscription_view_budget(s3, ev, &b), MC_EVENT_VIEW_NONE);
    mc_event_unref(&ev);
    mcd_subscription_destroy(s1);
    mcd_subscription_destroy(s2);
    mcd_subscription_destroy(s3);
    /* Typed identities: a token whose claim is the number 7 is not the string "7". */
    mcd_identity_t n7 = user("x", false);
    bson_value_t seven = {.value_type = BSON_TYPE_INT32};
    seven.value.v_int32 = 7;
    assert_true(mc_identity_from_value(&seven, &n7.identity));
    mcd_subscription_t *sn = ok_sub(f, NULL, NULL, &n7);
    assert_false(sees(sn, change("insert", "7", NULL)));
    mcd_subscription_destroy(sn);
    mcd_identity_t s7 = user("7", false);
    sn = ok_sub(f, NULL, NULL, &s7);
    assert_true(sees(sn, change("insert", "7", NULL)));
    mcd_subscription_destroy(sn);
    /* A hand-built identity without a canonical form matches nothing. */
    mcd_identity_t bare;
    memset(&bare, 0, sizeof(bare));
    bare.authenticated = true;
    snprintf(bare.subject, sizeof(bare.subject), "u1");
    sn = ok_sub(f, NULL, NULL, &bare);
    assert_false(sees(sn, change("insert", "u1", NULL)));
    mcd_subscription_destroy(sn);
}

/* ---- start-up check ------------------------------------------------------------------- */

static void expect_stage_check(fx_t *f, const char *pipeline, const char *fragment)
{
    set_pipeline(f, pipeline);
    mc_error_t err = {0};
    int rc = mcd_stream_local_stages_check(&f->stream, &err);
    if (!fragment) {
        if (rc != 0) {
            fail_msg("%s: %s", pipeline, err.message);
        }
        return;
    }
    if (rc != MC_ECONFIG || !strstr(err.message, fragment)) {
        fail_msg("%s: rc %d '%s', want '%s'", pipeline, rc, err.message, fragment);
    }
}

static void test_local_stages_check(void **state)
{
    fx_t *f = *state;
    expect_stage_check(f, "{}", NULL);
    expect_stage_check(f,
                       "{\"0\":{\"$project\":{\"fullDocument\":1,\"operationType\":1}},"
                       "\"1\":{\"$match\":{\"fullDocument.t\":{\"$var\":\"t\"}}},"
                       "\"2\":{\"$match\":{\"operationType\":\"insert\"}}}",
                       NULL);
    expect_stage_check(f, "{\"0\":{\"$addFields\":{\"x\":{\"$var\":\"t\"}}}}",
                       "only $match stages may use $var");
    expect_stage_check(f, "{\"0\":{\"$match\":{\"a\":{\"$var\":1}}}}", "variable name");
    expect_stage_check(f, "{\"0\":{\"$match\":{\"a\":{\"$var\":\"\"}}}}", "variable name");
    expect_stage_check(f, "{\"0\":{\"$match\":{\"a\":{\"$var\":\"t\",\"x\":1}}}}", "only field");
    expect_stage_check(f, "{\"0\":{\"$match\":{\"a\":{\"x\":1,\"$var\":\"t\"}}}}", "only field");
    /* Stages after a $var stage run per subscriber, in the written order. */
    expect_stage_check(f,
                       "{\"0\":{\"$match\":{\"a\":{\"$var\":\"t\"}}},"
                       "\"1\":{\"$project\":{\"a\":1}}}",
                       NULL);
    expect_stage_check(f,
                       "{\"0\":{\"$match\":{\"a\":{\"$var\":\"t\"}}},"
                       "\"1\":{\"$redact\":\"$$KEEP\"}}",
                       "pipeline stage 1: $redact cannot follow a $var stage");
    expect_stage_check(f,
                       "{\"0\":{\"$match\":{\"a\":{\"$var\":\"t\"}}},"
                       "\"1\":{\"$project\":{}}}",
                       "pipeline stage 1: $project (runs per subscriber, after a $var stage)");
    expect_stage_check(f,
                       "{\"0\":{\"$match\":{\"a\":{\"$var\":\"t\"}}},"
                       "\"1\":{\"$set\":{\"x\":{\"$nope\":1}}}}",
                       "Unrecognized expression");
    /* Before the first $var stage anything MongoDB takes runs on the server. */
    expect_stage_check(f,
                       "{\"0\":{\"$redact\":\"$$KEEP\"},"
                       "\"1\":{\"$match\":{\"a\":{\"$var\":\"t\"}}}}",
                       NULL);
    expect_stage_check(f, "{\"0\":{\"$match\":{\"a\":1},\"$project\":{}}}", "exactly one key");
    f->stream.pipeline = NULL;
    mc_error_t err = {0};
    assert_int_equal(mcd_stream_local_stages_check(&f->stream, &err), 0);
}

/* ---- Per-subscriber stages in the written order -------------------------------------- */

/* What `sub` receives of `ev` as compact JSON of its change (NULL: nothing), the view and the
 * error code; takes `ev`. */
static char *receive(mcd_subscription_t *sub, mc_event_t *ev, mc_event_view_t *view, int *code)
{
    bson_t out;
    bool own = false;
    *view = (mc_event_view_t)mcd_subscription_apply(sub, ev, NULL, &out, &own, code);
    char *text = NULL;
    if (*view != MC_EVENT_VIEW_NONE) {
        const bson_t *c = own ? &out : mc_event_change_view(ev, *view);
        text = bson_as_relaxed_extended_json(c, NULL);
    }
    if (own) {
        bson_destroy(&out);
    }
    mc_event_unref(&ev);
    return text;
}

static void test_stage_order(void **state)
{
    fx_t *f = *state;
    mcd_identity_t bob = user("bob", false);
    mc_event_view_t view;
    int code;
    /* $var match, then $project: the projection runs per subscriber after its match. */
    set_pipeline(f, "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
                    "\"1\":{\"$project\":{\"fullDocument.owner\":1,\"operationType\":1}}}");
    mcd_subscription_t *s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
    assert_true(mcd_subscription_reshapes(s));
    assert_false(mcd_subscription_matches_all(s));
    char *got = receive(s, change("insert", "bob", "a"), &view, &code);
    assert_int_equal(view, MC_EVENT_VIEW_FULL);
    assert_int_equal(code, 0);
    assert_non_null(got);
    assert_non_null(strstr(got, "\"owner\" : \"bob\""));
    assert_null(strstr(got, "tenant"));
    assert_null(strstr(got, "\"ns\""));
    assert_non_null(strstr(got, "\"_data\""));
    bson_free(got);
    assert_null(receive(s, change("insert", "bob", "b"), &view, &code));
    assert_int_equal(code, 0);
    /* Routing still decides first: another owner's event never reaches the stages. */
    assert_null(receive(s, change("insert", "eve", "a"), &view, &code));
    mcd_subscription_destroy(s);
    /* A client filter sees what the stages produced (tenant is gone). */
    s = ok_sub(f, "{\"t\":\"a\"}", "{\"fullDocument.tenant\":\"a\"}", &bob);
    assert_null(receive(s, change("insert", "bob", "a"), &view, &code));
    mcd_subscription_destroy(s);

    /* $project, then $var match: the projection runs on the server, the match here; a match
     * on a field the projection removed matches nothing, as in MongoDB. */
    set_pipeline(f, "{\"0\":{\"$project\":{\"fullDocument.owner\":1}},"
                    "\"1\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}}}");
    s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
    assert_false(mcd_subscription_reshapes(s));
    mcd_subscription_destroy(s);

    /* A stage that changes _id ends the subscription as MongoDB ends the stream (280). */
    set_pipeline(f, "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
                    "\"1\":{\"$project\":{\"_id\":0,\"operationType\":1}}}");
    s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
    assert_null(receive(s, change("insert", "bob", "a"), &view, &code));
    assert_int_equal(code, 280);
    mcd_subscription_destroy(s);
    /* ... and so does one that fails to evaluate ($add on a string: 16554). */
    set_pipeline(f, "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
                    "\"1\":{\"$set\":{\"x\":{\"$add\":[\"$fullDocument.tenant\",1]}}}}");
    s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
    assert_null(receive(s, change("insert", "bob", "a"), &view, &code));
    assert_int_equal(code, 16554);
    /* Control events pass untouched. */
    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "orders", 1, NULL);
    assert_int_equal(mcd_subscription_view(s, ready), MC_EVENT_VIEW_FULL);
    mc_event_unref(&ready);
    mcd_subscription_destroy(s);
}

/* An insert by bob of tenant "a" whose document has `n` more fields and an array of `n`
 * numbers: work for a stage that grows with the document. */
static mc_event_t *big_change(int n)
{
    bson_t *b = json("{\"_id\":{\"_data\":\"82AA\"},\"operationType\":\"insert\","
                     "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":1}}");
    bson_t doc, arr;
    BSON_APPEND_DOCUMENT_BEGIN(b, "fullDocument", &doc);
    BSON_APPEND_INT32(&doc, "_id", 1);
    BSON_APPEND_UTF8(&doc, "owner", "bob");
    BSON_APPEND_UTF8(&doc, "tenant", "a");
    BSON_APPEND_ARRAY_BEGIN(&doc, "tags", &arr);
    for (int i = 0; i < n; i++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", i);
        BSON_APPEND_INT32(&arr, key, i);
    }
    bson_append_array_end(&doc, &arr);
    for (int i = 0; i < n; i++) {
        char key[16];
        snprintf(key, sizeof(key), "f%d", i);
        BSON_APPEND_INT32(&doc, key, i);
    }
    bson_append_document_end(b, &doc);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", ++seq, b, "fullDocument.owner", &err);
    bson_destroy(b);
    if (!ev) {
        fail_msg("event: %s", err.message);
    }
    return ev;
}

/* The reshaping stages count against the subscriber's CPU budget like its filters: an
 * expression over a large array, or a projection over a document with many fields, stops
 * with -1 and the budget's reason when the budget is too small, and gives the same result as
 * without a budget when it is large enough. A stage error is still an error, not a budget. */
static void test_stage_budget(void **state)
{
    fx_t *f = *state;
    mcd_identity_t bob = user("bob", false);
    static const char *const pipelines[] = {
        "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
        "\"1\":{\"$set\":{\"n\":{\"$size\":\"$fullDocument.tags\"}}}}",
        "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
        "\"1\":{\"$project\":{\"fullDocument.f9999\":1}}}",
        /* Only filters: the $match with $expr runs under the same budget. */
        "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
        "\"1\":{\"$match\":{\"$expr\":{\"$gt\":[{\"$size\":\"$fullDocument.tags\"},1]}}}}",
    };
    mc_event_t *ev = big_change(10000);
    for (size_t i = 0; i < sizeof(pipelines) / sizeof(pipelines[0]); i++) {
        set_pipeline(f, pipelines[i]);
        mcd_subscription_t *s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
        assert_int_equal(mcd_subscription_reshapes(s), i < 2);
        bson_t out;
        bool own = false;
        int code = 0;
        mc_filter_budget_t b = {.cpu_ns = 1};
        assert_int_equal(mcd_subscription_apply(s, ev, &b, &out, &own, &code), -1);
        assert_false(own);
        assert_int_equal(code, 0);
        assert_true(b.exceeded);
        assert_string_equal(b.reason, "CPU budget exhausted");
        b = (mc_filter_budget_t){.cpu_ns = 60000000000u};
        assert_int_equal(mcd_subscription_apply(s, ev, &b, &out, &own, &code),
                         MC_EVENT_VIEW_FULL);
        assert_false(b.exceeded);
        assert_int_equal(code, 0);
        assert_int_equal(own, i < 2);
        if (own) {
            bson_iter_t it;
            assert_true(i == 0 ? bson_iter_init_find(&it, &out, "n") &&
                                     bson_iter_int32(&it) == 10000
                               : bson_iter_init_find(&it, &out, "fullDocument") &&
                                     bson_count_keys(&out) == 2);
            bson_destroy(&out);
        }
        mcd_subscription_destroy(s);
    }
    mc_event_unref(&ev);
    /* A failing stage within a budget is a stage error (16554), not the budget. */
    set_pipeline(f, "{\"0\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"}}},"
                    "\"1\":{\"$set\":{\"x\":{\"$add\":[\"$fullDocument.tenant\",1]}}}}");
    mcd_subscription_t *s = ok_sub(f, "{\"t\":\"a\"}", NULL, &bob);
    mc_filter_budget_t b = {.cpu_ns = 60000000000u};
    ev = change("insert", "bob", "a");
    bson_t out;
    bool own = false;
    int code = 0;
    assert_int_equal(mcd_subscription_apply(s, ev, &b, &out, &own, &code), MC_EVENT_VIEW_NONE);
    assert_int_equal(code, 16554);
    assert_false(b.exceeded);
    mc_event_unref(&ev);
    mcd_subscription_destroy(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_var_binding, setup, teardown),
        cmocka_unit_test_setup_teardown(test_var_in_expr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unbound_and_bad_vars, setup, teardown),
        cmocka_unit_test_setup_teardown(test_operator_injection, setup, teardown),
        cmocka_unit_test_setup_teardown(test_client_filter, setup, teardown),
        cmocka_unit_test_setup_teardown(test_filter_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_recipient_isolation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_public_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ownership_transfer_views, setup, teardown),
        cmocka_unit_test_setup_teardown(test_var_and_filter_and_recipient_combined, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_local_stages_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stage_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stage_budget, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
