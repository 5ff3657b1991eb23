/*
 * test_subscription_all.c: mcd_subscription_matches_all() (src/daemon/subscription.c), the
 * flag the fan-out uses to skip mcd_subscription_match(): it must be set only when the
 * subscription has no condition at all, and wherever it is set, matching must agree that
 * every event passes. Each condition that clears it (recipient restriction, a $var stage, a
 * client filter) is checked alone. Main thread only.
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

static uint64_t seq;

static mc_event_t *change(const char *op, const char *owner)
{
    char doc[512];
    snprintf(doc, sizeof(doc),
             "{\"_id\":{\"_data\":\"82%016llu\"},\"operationType\":\"%s\","
             "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":1},"
             "\"fullDocument\":{\"_id\":1,\"owner\":\"%s\"}}",
             (unsigned long long)++seq, op, owner);
    bson_t *b = json(doc);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", seq, b, "fullDocument.owner", &err);
    bson_destroy(b);
    if (!ev) {
        fail_msg("event: %s", err.message);
    }
    return ev;
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

static mcd_subscription_t *sub(const mc_stream_config_t *st, const char *vars, const char *filter,
                               const mcd_identity_t *id)
{
    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    mcd_subscription_t *s = mcd_subscription_new(st, vars, filter, id, &r);
    if (!s) {
        fail_msg("refused %d %s: %s", r.status, r.code, r.message);
    }
    return s;
}

/* matches_all implies match for a mix of events (and the control events). */
static void assert_consistent(const mcd_subscription_t *s)
{
    if (!mcd_subscription_matches_all(s)) {
        return;
    }
    const char *ops[] = {"insert", "update", "replace", "delete"};
    const char *owners[] = {"u1", "u2", ""};
    for (size_t i = 0; i < 4; i++) {
        for (size_t j = 0; j < 3; j++) {
            mc_event_t *ev = change(ops[i], owners[j]);
            assert_true(mcd_subscription_match(s, ev));
            mc_event_unref(&ev);
        }
    }
    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "orders", 0, NULL);
    assert_non_null(ready);
    assert_true(mcd_subscription_match(s, ready));
    mc_event_unref(&ready);
}

static void test_plain_public_stream_matches_all(void **state)
{
    (void)state;
    mc_stream_config_t st = {.name = (char *)"orders",
                             .db = (char *)"shop",
                             .collection = (char *)"orders",
                             .is_public = true,
                             .client_filters = true};
    mcd_subscription_t *s = sub(&st, NULL, NULL, NULL);
    assert_true(mcd_subscription_matches_all(s));
    assert_consistent(s);
    mcd_subscription_destroy(s);

    /* Empty query values mean "not given". */
    s = sub(&st, "", "", NULL);
    assert_true(mcd_subscription_matches_all(s));
    mcd_subscription_destroy(s);

    /* A recipient on a public stream only routes: still no condition. */
    st.recipient = (char *)"fullDocument.owner";
    s = sub(&st, NULL, NULL, NULL);
    assert_true(mcd_subscription_matches_all(s));
    assert_consistent(s);
    mcd_subscription_destroy(s);

    /* A server-side pipeline without $var is MongoDB's business, not a local condition. */
    bson_t *p = json("{\"0\":{\"$match\":{\"operationType\":\"insert\"}}}");
    st.pipeline = p;
    s = sub(&st, NULL, NULL, NULL);
    assert_true(mcd_subscription_matches_all(s));
    mcd_subscription_destroy(s);
    bson_destroy(p);

    assert_false(mcd_subscription_matches_all(NULL));
}

static void test_each_condition_clears_it(void **state)
{
    (void)state;
    mc_stream_config_t st = {.name = (char *)"orders",
                             .db = (char *)"shop",
                             .collection = (char *)"orders",
                             .client_filters = true,
                             .recipient = (char *)"fullDocument.owner"};
    mcd_identity_t u1 = user("u1", false);
    mcd_identity_t admin = user("root", true);

    /* Recipient restriction alone. */
    mcd_subscription_t *s = sub(&st, NULL, NULL, &u1);
    assert_false(mcd_subscription_matches_all(s));
    mc_event_t *other = change("insert", "u2");
    assert_false(mcd_subscription_match(s, other));
    mc_event_unref(&other);
    mcd_subscription_destroy(s);

    /* Admins are not restricted. */
    s = sub(&st, NULL, NULL, &admin);
    assert_true(mcd_subscription_matches_all(s));
    assert_consistent(s);
    mcd_subscription_destroy(s);

    /* A client filter alone. */
    s = sub(&st, NULL, "{\"operationType\":\"insert\"}", &admin);
    assert_false(mcd_subscription_matches_all(s));
    mc_event_t *upd = change("update", "u1");
    assert_false(mcd_subscription_match(s, upd));
    mc_event_unref(&upd);
    mcd_subscription_destroy(s);

    /* A $var stage alone. */
    bson_t *p = json("{\"0\":{\"$match\":{\"fullDocument.owner\":{\"$var\":\"o\"}}}}");
    st.pipeline = p;
    s = sub(&st, "{\"o\":\"u1\"}", NULL, &admin);
    assert_false(mcd_subscription_matches_all(s));
    mc_event_t *ev2 = change("insert", "u2");
    assert_false(mcd_subscription_match(s, ev2));
    mc_event_unref(&ev2);
    mcd_subscription_destroy(s);
    bson_destroy(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_public_stream_matches_all),
        cmocka_unit_test(test_each_condition_clears_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
