/*
 * test_recipient_rules.c: a stream's routing as its watcher applies it
 * (src/lib/recipient_rules.c): by_collection rules by path (DBRef $id segments included),
 * the default rule and collections without one, what is noted (missing recipient values vs
 * unresolved ones), per-collection and stream summaries, lookups shared between identical
 * rules, and DBRef references as lookup keys (to the lookup collection, or to another one).
 * Lookups that need a server are exercised end to end by the integration tests
 * (test_mercury.py); here the pool is NULL. Main thread only.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "recipient_rules.h"
#include "test_json.h"

static mc_config_t *load(const char *yaml)
{
    mc_error_t err = {0};
    mc_config_t *cfg = mc_config_load_string(yaml, strlen(yaml), "t.yaml", &err);
    if (!cfg) {
        fail_msg("config: %s", err.message);
    }
    return cfg;
}

/* An insert into `coll` of the document `doc_json`, built the way the watcher builds it. */
static mc_event_t *insert(mc__recipients_t *r, const char *coll, const char *doc_json)
{
    static unsigned n;
    char buf[2048];
    n++;
    snprintf(buf, sizeof(buf),
             "{\"_id\":{\"_data\":\"82%08u\"},\"operationType\":\"insert\","
             "\"clusterTime\":{\"$timestamp\":{\"t\":100,\"i\":%u}},"
             "\"ns\":{\"db\":\"mercury\",\"coll\":\"%s\"},\"documentKey\":{\"_id\":1},"
             "\"fullDocument\":%s}",
             n, n, coll, doc_json);
    bson_t *b = json(buf);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("feed", n, b, mc__recipients_event_path(r), &err);
    bson_destroy(b);
    assert_non_null(ev);
    return ev;
}

static void test_by_collection_paths(void **state)
{
    (void)state;
    mc_config_t *cfg = load("streams:\n"
                            "  feed:\n"
                            "    db: mercury\n"
                            "    summary: \"{operationType} {ns.coll}\"\n"
                            "    recipient:\n"
                            "      by_collection:\n"
                            "        notes: fullDocument.author\n"
                            "        posts:\n"
                            "          path: fullDocument.owner.$id\n"
                            "          summary: \"post {fullDocument.title}\"\n");
    mc_error_t err = {0};
    mc__recipients_t *r = mc__recipients_new(&cfg->streams[0], "feed", NULL, &err);
    assert_non_null(r);
    assert_null(mc__recipients_event_path(r)); /* routed per collection, after building */

    mc_event_t *ev = insert(r, "notes", "{\"_id\":1,\"author\":\"alice\"}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_string_equal(mc_event_recipient(ev), "\"alice\"");
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"summary\":\"insert notes\""));
    mc_event_unref(&ev);

    ev = insert(r, "posts",
                "{\"_id\":1,\"title\":\"hi\",\"owner\":{\"$ref\":\"users\","
                "\"$id\":{\"$oid\":\"64a7f2d1aabbccddeeff0011\"}}}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_string_equal(mc_event_recipient(ev), "{\"$oid\":\"64a7f2d1aabbccddeeff0011\"}");
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"summary\":\"post hi\""));
    mc_event_unref(&ev);

    /* A document event whose path holds nothing: noted as missing, admins only. */
    ev = insert(r, "notes", "{\"_id\":1}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_MISSING);
    assert_null(mc_event_recipient(ev));
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"recipient\":null"));
    mc_event_unref(&ev);

    /* A collection without a rule and no default: admins only, not noted. */
    ev = insert(r, "other", "{\"_id\":1,\"author\":\"alice\"}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_null(mc_event_recipient(ev));
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"recipient\":null"));
    mc_event_unref(&ev);
    mc__recipients_destroy(r);
    mc_config_destroy(cfg);

    /* With a default rule, other collections follow it. */
    cfg = load("streams:\n  feed:\n    db: mercury\n    recipient:\n"
               "      by_collection: {notes: fullDocument.author}\n"
               "      default: fullDocument.owner\n");
    r = mc__recipients_new(&cfg->streams[0], "feed", NULL, &err);
    ev = insert(r, "other", "{\"_id\":1,\"author\":\"alice\",\"owner\":\"bob\"}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_string_equal(mc_event_recipient(ev), "\"bob\"");
    mc_event_unref(&ev);
    mc__recipients_destroy(r);
    mc_config_destroy(cfg);
}

static void test_single_forms(void **state)
{
    (void)state;
    /* A plain path routes when the event is built; a missing value is noted. */
    mc_config_t *cfg = load("streams:\n  s:\n    db: mercury\n    collection: notes\n"
                            "    recipient: fullDocument.author\n");
    mc__recipients_t *r = mc__recipients_new(&cfg->streams[0], "s", NULL, NULL);
    assert_string_equal(mc__recipients_event_path(r), "fullDocument.author");
    mc_event_t *ev = insert(r, "notes", "{\"_id\":1,\"author\":null}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_MISSING);
    mc_event_unref(&ev);
    ev = insert(r, "notes", "{\"_id\":1,\"author\":\"a\"}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_null(strstr(mc_event_json(ev, NULL), "summary"));
    mc_event_unref(&ev);
    mc__recipients_destroy(r);
    mc_config_destroy(cfg);

    /* No recipient: no "recipient" key, only the summary. */
    cfg = load("streams:\n  s:\n    db: mercury\n    summary: \"{fullDocument.author}\"\n");
    r = mc__recipients_new(&cfg->streams[0], "s", NULL, NULL);
    ev = insert(r, "notes", "{\"_id\":1,\"author\":\"a\"}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_null(strstr(mc_event_json(ev, NULL), "recipient"));
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"summary\":\"a\""));
    mc_event_unref(&ev);
    mc__recipients_destroy(r);
    mc_config_destroy(cfg);
}

static void test_lookups_shared_and_dbref_keys(void **state)
{
    (void)state;
    mc_config_t *cfg =
        load("streams:\n  feed:\n    db: mercury\n    recipient:\n      by_collection:\n"
             "        items: {path: fullDocument.owned_by, lookup: {db: mercury, collection: "
             "businesses, recipient: owner.$id}}\n"
             "        orders: {path: fullDocument.business, lookup: {db: mercury, collection: "
             "businesses, recipient: owner.$id}}\n"
             "        tasks: {path: fullDocument.b, lookup: {db: mercury, collection: businesses, "
             "recipient: manager}}\n");
    mc__recipients_t *r = mc__recipients_new(&cfg->streams[0], "feed", NULL, NULL);
    assert_non_null(r);
    /* items and orders share one lookup (one change stream on businesses); tasks differs. */
    assert_int_equal(mc__recipients_lookup_count(r), 2);
    /* A DBRef to another collection designates nothing: no recipient, noted as nothing. */
    mc_event_t *ev =
        insert(r, "orders", "{\"_id\":1,\"business\":{\"$ref\":\"people\",\"$id\":5}}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_false(mc_event_recipient_unresolved(ev));
    assert_null(mc_event_recipient(ev));
    mc_event_unref(&ev);
    ev = insert(r, "orders",
                "{\"_id\":1,\"business\":{\"$ref\":\"businesses\",\"$db\":\"elsewhere\","
                "\"$id\":5}}");
    mc__recipients_route(r, ev, NULL);
    assert_false(mc_event_recipient_unresolved(ev));
    mc_event_unref(&ev);
    /* A DBRef to the lookup collection is a key (without a server it cannot be proven:
     * unresolved, never a guess). */
    ev = insert(r, "orders", "{\"_id\":1,\"business\":{\"$ref\":\"businesses\",\"$id\":5}}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_UNRESOLVED);
    assert_true(mc_event_recipient_unresolved(ev));
    mc_event_unref(&ev);
    /* A plain document is no key at all. */
    ev = insert(r, "orders", "{\"_id\":1,\"business\":{\"x\":5}}");
    assert_int_equal(mc__recipients_route(r, ev, NULL), MC__ROUTE_OK);
    assert_false(mc_event_recipient_unresolved(ev));
    mc_event_unref(&ev);
    mc__recipients_destroy(r);
    mc_config_destroy(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_by_collection_paths),
        cmocka_unit_test(test_single_forms),
        cmocka_unit_test(test_lookups_shared_and_dbref_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
