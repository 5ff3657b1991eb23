/*
 * test_webhook_format.c: webhook bodies: the protocol message as is, CloudEvents 1.0
 * structured JSON (attributes, time, subject forms, control events), batches as JSON arrays.
 * Bodies are parsed back with libbson's JSON reader, so each must be one valid JSON value.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "sinks/webhook_format.h"

#define TOKEN "826B021A69000000062B022C0100296E5A100400000000000000000000000000ABCDEF46645F6964"

static mc_event_t *insert_event(const bson_t *id_value, bool wall)
{
    bson_t doc = BSON_INITIALIZER, sub;
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "_id", &sub);
    BSON_APPEND_UTF8(&sub, "_data", TOKEN "0004");
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_UTF8(&doc, "operationType", "insert");
    BSON_APPEND_TIMESTAMP(&doc, "clusterTime", 1700000000, 3);
    if (wall) {
        BSON_APPEND_DATE_TIME(&doc, "wallTime", 1700000000123);
    }
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "ns", &sub);
    BSON_APPEND_UTF8(&sub, "db", "shop");
    BSON_APPEND_UTF8(&sub, "coll", "orders");
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "documentKey", &sub);
    bson_iter_t it;
    bson_iter_init(&it, id_value);
    bson_iter_next(&it);
    bson_append_iter(&sub, "_id", 3, &it);
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "fullDocument", &sub);
    bson_append_iter(&sub, "_id", 3, &it);
    BSON_APPEND_UTF8(&sub, "owner", "alice");
    bson_append_document_end(&doc, &sub);
    mc_event_t *ev = mc_event_new_change("orders", 1, &doc, "fullDocument.owner", NULL);
    bson_destroy(&doc);
    assert_non_null(ev);
    return ev;
}

/* Renders one event and parses the body back. */
static bson_t *render(mc_event_t *ev, mc__webhook_format_t fmt, const char *prefix, char **text)
{
    mc__json_buf_t b;
    mc__json_buf_init(&b, 0, 0);
    assert_int_equal(mc__webhook_body_append(&b, ev, fmt, prefix), 0);
    size_t len = 0;
    *text = mc__json_buf_steal(&b, &len);
    assert_non_null(*text);
    bson_error_t berr;
    bson_t *doc = bson_new_from_json((const uint8_t *)*text, (ssize_t)len, &berr);
    if (!doc) {
        fail_msg("not JSON (%s): %s", berr.message, *text);
    }
    return doc;
}

static const char *str_at(const bson_t *doc, const char *path)
{
    bson_iter_t it, f;
    if (!bson_iter_init(&it, doc) || !bson_iter_find_descendant(&it, path, &f) ||
        !BSON_ITER_HOLDS_UTF8(&f)) {
        return NULL;
    }
    return bson_iter_utf8(&f, NULL);
}

static void test_message_format_is_the_protocol_message(void **state)
{
    (void)state;
    bson_t *idv = BCON_NEW("v", BCON_INT32(7));
    mc_event_t *ev = insert_event(idv, true);
    char *text = NULL;
    bson_t *doc = render(ev, MC__WEBHOOK_MESSAGE, NULL, &text);
    size_t len = 0;
    assert_string_equal(text, mc_event_json(ev, &len));
    assert_string_equal(str_at(doc, "type"), "change");
    assert_string_equal(str_at(doc, "recipient"), "alice");
    assert_string_equal(mc__webhook_content_type(MC__WEBHOOK_MESSAGE, false), "application/json");
    bson_free(text);
    bson_destroy(doc);
    bson_destroy(idv);
    mc_event_unref(&ev);
}

static void test_cloudevents_attributes(void **state)
{
    (void)state;
    bson_t *idv = BCON_NEW("v", BCON_INT32(7));
    mc_event_t *ev = insert_event(idv, true);
    char *text = NULL;
    bson_t *doc = render(ev, MC__WEBHOOK_CLOUDEVENTS, NULL, &text);
    assert_string_equal(str_at(doc, "specversion"), "1.0");
    assert_string_equal(str_at(doc, "id"), mc_event_id(ev));
    assert_string_equal(str_at(doc, "source"), "/mongocast/streams/orders");
    assert_string_equal(str_at(doc, "type"), "mongodb.change.insert");
    assert_string_equal(str_at(doc, "subject"), "shop.orders/7");
    assert_string_equal(str_at(doc, "time"), "2023-11-14T22:13:20.123Z");
    assert_string_equal(str_at(doc, "datacontenttype"), "application/json");
    assert_string_equal(str_at(doc, "recipient"), "alice");
    /* data is the protocol message, the same payload as the message format. */
    assert_string_equal(str_at(doc, "data.type"), "change");
    assert_string_equal(str_at(doc, "data.id"), mc_event_id(ev));
    assert_string_equal(str_at(doc, "data.change.fullDocument.owner"), "alice");
    bson_free(text);
    bson_destroy(doc);
    mc_event_unref(&ev);
    bson_destroy(idv);

    /* Without wallTime: the cluster time's second; a custom source prefix. */
    idv = BCON_NEW("v", BCON_UTF8("order-1"));
    ev = insert_event(idv, false);
    doc = render(ev, MC__WEBHOOK_CLOUDEVENTS, "urn:shop:", &text);
    assert_string_equal(str_at(doc, "time"), "2023-11-14T22:13:20.000Z");
    assert_string_equal(str_at(doc, "source"), "urn:shop:orders");
    assert_string_equal(str_at(doc, "subject"), "shop.orders/order-1");
    bson_free(text);
    bson_destroy(doc);
    mc_event_unref(&ev);
    bson_destroy(idv);

    /* An ObjectId _id is named by its hex; other types leave the namespace alone. */
    bson_oid_t oid;
    bson_oid_init_from_string(&oid, "65a1b2c3d4e5f60718293a4b");
    idv = BCON_NEW("v", BCON_OID(&oid));
    ev = insert_event(idv, true);
    doc = render(ev, MC__WEBHOOK_CLOUDEVENTS, NULL, &text);
    assert_string_equal(str_at(doc, "subject"), "shop.orders/65a1b2c3d4e5f60718293a4b");
    bson_free(text);
    bson_destroy(doc);
    mc_event_unref(&ev);
    bson_destroy(idv);
    idv = BCON_NEW("v", "{", "a", BCON_INT32(1), "}");
    ev = insert_event(idv, true);
    doc = render(ev, MC__WEBHOOK_CLOUDEVENTS, NULL, &text);
    assert_string_equal(str_at(doc, "subject"), "shop.orders");
    bson_free(text);
    bson_destroy(doc);
    mc_event_unref(&ev);
    bson_destroy(idv);
}

static void test_cloudevents_control_events(void **state)
{
    (void)state;
    mc_event_t *ev = mc_event_new_control(MC_EVENT_RESET, "orders", 42, "history lost");
    char *text = NULL;
    bson_t *doc = render(ev, MC__WEBHOOK_CLOUDEVENTS, NULL, &text);
    assert_string_equal(str_at(doc, "type"), "mongocast.reset");
    assert_string_equal(str_at(doc, "id"), "reset-42");
    assert_null(str_at(doc, "subject"));
    assert_null(str_at(doc, "time"));
    assert_string_equal(str_at(doc, "data.reason"), "history lost");
    bson_free(text);
    bson_destroy(doc);
    mc_event_unref(&ev);
    char type[64];
    ev = mc_event_new_control(MC_EVENT_READY, "orders", 1, NULL);
    mc__cloudevents_type(ev, type, sizeof type);
    assert_string_equal(type, "mongocast.ready");
    mc_event_unref(&ev);
}

static void test_batch_is_a_json_array(void **state)
{
    (void)state;
    bson_t *idv = BCON_NEW("v", BCON_INT32(1));
    mc_event_t *ev = insert_event(idv, true);
    for (int fmt = 0; fmt <= 1; fmt++) {
        mc__json_buf_t b;
        mc__json_buf_init(&b, 0, 0);
        MC__JSON_LIT(&b, "[");
        for (int k = 0; k < 3; k++) {
            if (k) {
                MC__JSON_LIT(&b, ",");
            }
            assert_int_equal(mc__webhook_body_append(&b, ev, (mc__webhook_format_t)fmt, NULL), 0);
        }
        MC__JSON_LIT(&b, "]");
        size_t len = 0;
        char *text = mc__json_buf_steal(&b, &len);
        /* libbson reads a top-level array as a document with keys "0", "1", "2". */
        bson_error_t berr;
        bson_t *doc = bson_new_from_json((const uint8_t *)text, (ssize_t)len, &berr);
        assert_non_null(doc);
        assert_int_equal(bson_count_keys(doc), 3);
        bson_destroy(doc);
        bson_free(text);
    }
    assert_string_equal(mc__webhook_content_type(MC__WEBHOOK_CLOUDEVENTS, true),
                        "application/cloudevents-batch+json");
    mc_event_unref(&ev);
    bson_destroy(idv);
}

static void test_format_names(void **state)
{
    (void)state;
    mc__webhook_format_t f;
    assert_int_equal(mc__webhook_format_parse("message", &f, NULL), 0);
    assert_int_equal(f, MC__WEBHOOK_MESSAGE);
    assert_int_equal(mc__webhook_format_parse("cloudevents", &f, NULL), 0);
    assert_int_equal(f, MC__WEBHOOK_CLOUDEVENTS);
    mc_error_t err;
    assert_int_equal(mc__webhook_format_parse("CloudEvents", &f, &err), MC_ECONFIG);
    assert_int_equal(mc__webhook_format_parse(NULL, &f, &err), MC_ECONFIG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_message_format_is_the_protocol_message),
        cmocka_unit_test(test_cloudevents_attributes),
        cmocka_unit_test(test_cloudevents_control_events),
        cmocka_unit_test(test_batch_is_a_json_array),
        cmocka_unit_test(test_format_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
