/*
 * test_edge_payload.c: the nats sink's format: bson body (edge_payload.c). An event encoded by
 * the leader and decoded on an edge is the same event: id, kind, change bytes, invalidate
 * reason, oversize notice, and the recipient with its BSON type (an int64 owner stays an int64
 * identity, which an int32 or string owner of the same value is not). Bad bodies are refused
 * with a reason. Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "edge_payload.h"
#include "engine_private.h"

static bson_t *change_with_owner(const char *data, const char *owner_kind)
{
    bson_t *doc = BCON_NEW("_id", "{", "_data", BCON_UTF8(data), "}", "operationType",
                           BCON_UTF8("insert"), "ns", "{", "db", BCON_UTF8("shop"), "coll",
                           BCON_UTF8("orders"), "}", "documentKey", "{", "_id", BCON_INT32(1), "}");
    bson_t full;
    BSON_APPEND_DOCUMENT_BEGIN(doc, "fullDocument", &full);
    BSON_APPEND_INT32(&full, "_id", 1);
    if (!strcmp(owner_kind, "int64")) {
        BSON_APPEND_INT64(&full, "owner", 5);
    } else if (!strcmp(owner_kind, "int32")) {
        BSON_APPEND_INT32(&full, "owner", 5);
    } else {
        BSON_APPEND_UTF8(&full, "owner", "5");
    }
    BSON_APPEND_DOUBLE(&full, "price", 2.5);
    BSON_APPEND_DATE_TIME(&full, "at", 1700000000123);
    bson_append_document_end(doc, &full);
    return doc;
}

/* Encodes `ev` and decodes the body as an edge would. */
static mc_event_t *round_trip(const mc_event_t *ev, const char *path)
{
    bson_t body;
    mc_error_t err = {0};
    assert_int_equal(mc__edge_payload_encode(ev, &body, &err), 0);
    mc_event_t *out = NULL;
    assert_int_equal(
        mc__edge_payload_decode(bson_get_data(&body), body.len, "orders", 9, path, &out, &err), 0);
    bson_destroy(&body);
    return out;
}

static void test_change_round_trip_keeps_types(void **state)
{
    (void)state;
    const char *kinds[] = {"int64", "int32", "string"};
    const uint8_t *ids[3];
    size_t lens[3];
    mc_event_t *edges[3];
    for (int k = 0; k < 3; k++) {
        bson_t *doc = change_with_owner("8264ABCD0001", kinds[k]);
        mc_error_t err = {0};
        mc_event_t *leader = mc_event_new_change("orders", 3, doc, "fullDocument.owner", &err);
        assert_non_null(leader);
        mc_event_t *edge = round_trip(leader, "fullDocument.owner");
        assert_int_equal(mc_event_kind(edge), MC_EVENT_CHANGE);
        assert_string_equal(mc_event_id(edge), "8264ABCD0001");
        assert_int_equal(mc_event_seq(edge), 9);
        const bson_t *a = mc_event_change(leader), *b = mc_event_change(edge);
        assert_int_equal(a->len, b->len);
        assert_memory_equal(bson_get_data(a), bson_get_data(b), a->len);
        size_t la = 0, lb = 0;
        const uint8_t *ia = mc_event_recipient_identity(leader, &la);
        ids[k] = mc_event_recipient_identity(edge, &lb);
        lens[k] = lb;
        assert_non_null(ia);
        assert_int_equal(la, lb);
        assert_memory_equal(ia, ids[k], la);
        edges[k] = edge;
        mc_event_unref(&leader);
        bson_destroy(doc);
    }
    /* The int64 owner's identity is not the string "5"'s. */
    assert_true(lens[0] != lens[2] || memcmp(ids[0], ids[2], lens[0]) != 0);
    for (int k = 0; k < 3; k++) {
        mc_event_unref(&edges[k]);
    }
}

static void test_invalidate_and_oversize(void **state)
{
    (void)state;
    bson_t *doc = BCON_NEW("_id", "{", "_data", BCON_UTF8("8264ABCD0002"), "}", "operationType",
                           BCON_UTF8("invalidate"));
    mc_error_t err = {0};
    mc_event_t *inv = mc_event_new_invalidate("orders", 4, doc, "drop", &err);
    assert_non_null(inv);
    mc_event_t *edge = round_trip(inv, NULL);
    assert_int_equal(mc_event_kind(edge), MC_EVENT_INVALIDATE);
    assert_string_equal(mc_event_reason(edge), "drop");
    assert_string_equal(mc_event_id(edge), "8264ABCD0002");
    mc_event_unref(&edge);
    mc_event_unref(&inv);
    bson_destroy(doc);

    doc = change_with_owner("8264ABCD0003", "string");
    mc_event_t *big = mc_event_new_change("orders", 5, doc, NULL, &err);
    mc__event_set_server_oversize(big, 17000000);
    edge = round_trip(big, NULL);
    assert_int_equal(mc_event_server_oversize(edge), 17000000);
    mc_event_unref(&edge);
    mc_event_unref(&big);
    bson_destroy(doc);
}

static void expect_refused(const bson_t *body, const char *needle)
{
    mc_event_t *ev = NULL;
    mc_error_t err = {0};
    assert_int_equal(
        mc__edge_payload_decode(bson_get_data(body), body->len, "orders", 1, NULL, &ev, &err),
        MC_EINVAL);
    assert_null(ev);
    if (!strstr(err.message, needle)) {
        fail_msg("'%s' does not say '%s'", err.message, needle);
    }
}

static void test_refusals(void **state)
{
    (void)state;
    mc_event_t *ev = NULL;
    mc_error_t err = {0};
    const uint8_t json[] = "{\"type\":\"change\"}";
    assert_int_equal(mc__edge_payload_decode(json, sizeof json - 1, "orders", 1, NULL, &ev, &err),
                     MC_EINVAL);
    assert_non_null(strstr(err.message, "format: bson"));
    bson_t *change = change_with_owner("8264ABCD0004", "string");
    bson_t *v2 =
        BCON_NEW("v", BCON_INT32(2), "kind", BCON_UTF8("change"), "change", BCON_DOCUMENT(change));
    expect_refused(v2, "version");
    bson_t *kind =
        BCON_NEW("v", BCON_INT32(1), "kind", BCON_UTF8("ready"), "change", BCON_DOCUMENT(change));
    expect_refused(kind, "kind");
    bson_t *none = BCON_NEW("v", BCON_INT32(1), "kind", BCON_UTF8("change"));
    expect_refused(none, "no change document");
    bson_t *notoken = BCON_NEW("v", BCON_INT32(1), "kind", BCON_UTF8("change"), "change", "{",
                               "operationType", BCON_UTF8("insert"), "}");
    expect_refused(notoken, "unusable change");
    bson_destroy(v2);
    bson_destroy(kind);
    bson_destroy(none);
    bson_destroy(notoken);
    bson_destroy(change);
    /* Control events have no change to carry. */
    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "orders", 1, NULL);
    bson_t body;
    assert_int_equal(mc__edge_payload_encode(ready, &body, &err), MC_EINVAL);
    bson_destroy(&body);
    mc_event_unref(&ready);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_change_round_trip_keeps_types),
        cmocka_unit_test(test_invalidate_and_oversize),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
