/*
 * test_snapshot_plan.c: how a `?snapshot=true` subscriber's slice becomes a find filter
 * (src/daemon/snapshot.c, mcd_snapshot_plan): the recipient equality by identity type, the
 * stream's $match stages and the subscriber's $var stages and filter renamed to the
 * collection's fields, what is left to the per-document check (never narrowing the query),
 * and every refusal with its reason. Main thread only.
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
#include "snapshot.h"
#include "subscription.h"
#include "test_json.h"

static mcd_identity_t ident(const bson_value_t *v, bool admin)
{
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    id.authenticated = true;
    id.is_admin = admin;
    mc_identity_from_value(v, &id.identity);
    return id;
}

static mcd_identity_t user(const char *s)
{
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = (char *)s;
    v.value.v_utf8.len = (uint32_t)strlen(s);
    return ident(&v, false);
}

static mc_stream_config_t stream_of(bson_t *pipeline, const char *recipient)
{
    return (mc_stream_config_t){
        .name = (char *)"orders",
        .db = (char *)"shop",
        .collection = (char *)"orders",
        .pipeline = pipeline,
        .recipient = (char *)recipient,
        .client_filters = true,
        .history = 100,
    };
}

/* The planned query as canonical Extended JSON, or "REFUSED <code>: <message>". */
static char *plan(const mc_stream_config_t *st, const mcd_identity_t *id, const char *vars,
                  const char *filter)
{
    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    mcd_subscription_t *sub = mcd_subscription_new(st, vars, filter, id, &r);
    if (!sub) {
        fail_msg("subscription refused %s: %s", r.code, r.message);
    }
    bson_t q;
    char *out;
    if (mcd_snapshot_plan(st, sub, vars, filter, &q, &r) != 0) {
        assert_int_equal(r.status, 400);
        size_t n = strlen(r.code) + strlen(r.message) + 16;
        out = malloc(n);
        snprintf(out, n, "REFUSED %s: %s", r.code, r.message);
    } else {
        char *j = bson_as_canonical_extended_json(&q, NULL);
        out = strdup(j);
        bson_free(j);
    }
    bson_destroy(&q);
    mcd_subscription_destroy(sub);
    return out;
}

static void expect(char *got, const char *want)
{
    if (strcmp(got, want) != 0) {
        fail_msg("got  %s\nwant %s", got, want);
    }
    free(got);
}

static void expect_refused(char *got, const char *needle)
{
    if (strncmp(got, "REFUSED snapshot_not_supported: ", 32) != 0 || !strstr(got, needle)) {
        fail_msg("expected a refusal naming \"%s\", got %s", needle, got);
    }
    free(got);
}

static void test_recipient_by_identity_type(void **state)
{
    (void)state;
    bson_t *p = json("{}");
    mc_stream_config_t st = stream_of(p, "fullDocument.owner");
    mcd_identity_t u = user("u1");
    expect(plan(&st, &u, NULL, NULL), "{ \"$and\" : [ { \"owner\" : \"u1\" } ] }");
    bson_value_t n = {.value_type = BSON_TYPE_INT32, .value.v_int32 = 42};
    mcd_identity_t num = ident(&n, false);
    expect(plan(&st, &num, NULL, NULL),
           "{ \"$and\" : [ { \"owner\" : { \"$numberLong\" : \"42\" } } ] }");
    bson_value_t o = {.value_type = BSON_TYPE_OID};
    bson_oid_init_from_string(&o.value.v_oid, "64a7f0c2e4b0a1b2c3d4e5f6");
    mcd_identity_t oid = ident(&o, false);
    expect(plan(&st, &oid, NULL, NULL),
           "{ \"$and\" : [ { \"owner\" : { \"$oid\" : \"64a7f0c2e4b0a1b2c3d4e5f6\" } } ] }");
    /* Admins see every document. */
    mcd_identity_t admin = user("root");
    admin.is_admin = true;
    expect(plan(&st, &admin, NULL, NULL), "{ }");
    /* A recipient through documentKey, and DBRef paths, are fields of the document too. */
    mc_stream_config_t dk = stream_of(p, "documentKey.tenant");
    expect(plan(&dk, &u, NULL, NULL), "{ \"$and\" : [ { \"tenant\" : \"u1\" } ] }");
    mc_stream_config_t ref = stream_of(p, "fullDocument.owner.$id");
    expect(plan(&ref, &u, NULL, NULL), "{ \"$and\" : [ { \"owner.$id\" : \"u1\" } ] }");
    bson_destroy(p);
}

static void test_stages_vars_and_filter_translated(void **state)
{
    (void)state;
    bson_t *p = json("{\"0\":{\"$match\":{\"fullDocument.status\":\"open\"}},"
                     "\"1\":{\"$match\":{\"fullDocument.tenant\":{\"$var\":\"t\"},"
                     "\"documentKey._id\":{\"$gte\":{\"$var\":\"from\"}}}}}");
    mc_stream_config_t st = stream_of(p, "fullDocument.owner");
    mcd_identity_t u = user("u2");
    expect(plan(&st, &u, "{\"t\":\"acme\",\"from\":5}",
                "{\"$or\":[{\"fullDocument.a\":1},{\"fullDocument.b\":{\"$in\":[2,3]}}]}"),
           "{ \"$and\" : [ { \"owner\" : \"u2\" }, { \"status\" : \"open\" }, { \"tenant\" : "
           "\"acme\", \"_id\" : { \"$gte\" : { \"$numberInt\" : \"5\" } } }, { \"$or\" : [ { "
           "\"a\" : { \"$numberInt\" : \"1\" } }, { \"b\" : { \"$in\" : [ { \"$numberInt\" : "
           "\"2\" }, { \"$numberInt\" : \"3\" } ] } } ] } ] }");
    bson_destroy(p);
}

static void test_untranslatable_parts_widen_never_narrow(void **state)
{
    (void)state;
    bson_t *p = json("{}");
    mc_stream_config_t st = stream_of(p, NULL);
    mcd_identity_t admin = user("root");
    admin.is_admin = true;
    /* operationType and ns are constants of the insert a snapshot document stands for: left
     * to the per-document check. At the top level the rest still narrows the read. */
    expect(plan(&st, &admin, NULL,
                "{\"operationType\":\"insert\",\"ns.coll\":\"orders\",\"fullDocument.k\":1}"),
           "{ \"$and\" : [ { \"k\" : { \"$numberInt\" : \"1\" } } ] }");
    /* Inside an $or, one branch that cannot be said of the document drops the whole $or
     * (dropping only the branch would narrow the read). */
    expect(plan(&st, &admin, NULL,
                "{\"$or\":[{\"operationType\":\"delete\"},{\"fullDocument.k\":1}]}"),
           "{ }");
    /* A branch whose every condition is left out matches everything: it stays. */
    expect(plan(&st, &admin, NULL, "{\"$or\":[{\"$comment\":\"x\"},{\"fullDocument.k\":1}]}"),
           "{ \"$and\" : [ { \"$or\" : [ {  }, { \"k\" : { \"$numberInt\" : \"1\" } } ] } ] }");
    /* A $nor must never lose a branch either. */
    expect(plan(&st, &admin, NULL, "{\"$nor\":[{\"ns.db\":\"x\"},{\"fullDocument.k\":1}]}"),
           "{ }");
    /* Whole-document comparisons stay per document. */
    expect(plan(&st, &admin, NULL, "{\"documentKey\":{\"_id\":1}}"), "{ }");
    bson_destroy(p);
}

static void test_refusals_say_why(void **state)
{
    (void)state;
    bson_t *p = json("{}");
    mcd_identity_t admin = user("root");
    admin.is_admin = true;
    mc_stream_config_t db = stream_of(p, NULL);
    db.collection = NULL;
    expect_refused(plan(&db, &admin, NULL, NULL), "one collection");
    mc_stream_config_t nohist = stream_of(p, NULL);
    nohist.history = 0;
    expect_refused(plan(&nohist, &admin, NULL, NULL), "history");
    mc_stream_config_t st = stream_of(p, NULL);
    expect_refused(plan(&st, &admin, NULL, "{\"updateDescription.updatedFields.x\":1}"),
                   "updateDescription");
    expect_refused(plan(&st, &admin, NULL, "{\"fullDocumentBeforeChange.x\":1}"),
                   "fullDocumentBeforeChange");
    expect_refused(plan(&st, &admin, NULL, "{\"$or\":[{\"clusterTime\":1}]}"), "clusterTime");
    mc_stream_config_t other = stream_of(p, "owner");
    mcd_identity_t u = user("u1");
    expect_refused(plan(&other, &u, NULL, NULL), "recipient");
    bson_destroy(p);

    bson_t *proj = json("{\"0\":{\"$project\":{\"fullDocument.secret\":0}}}");
    mc_stream_config_t reshape = stream_of(proj, NULL);
    expect_refused(plan(&reshape, &admin, NULL, NULL), "$project");
    bson_destroy(proj);

    bson_t *expr = json("{\"0\":{\"$match\":{\"$expr\":{\"$gt\":[\"$wallTime\",0]}}}}");
    mc_stream_config_t ex = stream_of(expr, NULL);
    expect_refused(plan(&ex, &admin, NULL, NULL), "wallTime");
    bson_destroy(expr);

    bson_t *ok_expr =
        json("{\"0\":{\"$match\":{\"$expr\":{\"$gt\":[\"$fullDocument.n\",{\"$literal\":"
             "\"$clusterTime\"}]}}}}");
    mc_stream_config_t ok = stream_of(ok_expr, NULL);
    expect(plan(&ok, &admin, NULL, NULL), "{ }");
    bson_destroy(ok_expr);

    bson_t *local = json("{\"0\":{\"$match\":{\"fullDocument.t\":{\"$var\":\"t\"}}},"
                         "\"1\":{\"$set\":{\"x\":1}}}");
    mc_stream_config_t loc = stream_of(local, NULL);
    expect_refused(plan(&loc, &admin, "{\"t\":1}", NULL), "reshape");
    bson_destroy(local);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recipient_by_identity_type),
        cmocka_unit_test(test_stages_vars_and_filter_translated),
        cmocka_unit_test(test_untranslatable_parts_widen_never_narrow),
        cmocka_unit_test(test_refusals_say_why),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
