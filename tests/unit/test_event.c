/*
 * test_event.c: mc_event_t normalisation, accessors, refcounting, cached rendering, and the
 * DESIGN §4.3 message against golden fixtures (tests/unit/data/events/).
 *
 * Single-threaded except test_concurrent_first_render, which races threads on the first
 * mc_event_json() call of one event.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"
#include "mongocast/event.h"

static char *read_file(const char *name)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/events/%s", MC_TEST_DATA_DIR, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail_msg("cannot open fixture %s", path);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static bson_t *read_bson(const char *name)
{
    char *json = read_file(name);
    bson_error_t err;
    bson_t *b = bson_new_from_json((const uint8_t *)json, -1, &err);
    if (!b) {
        fail_msg("fixture %s: %s", name, err.message);
    }
    free(json);
    return b;
}

/* Drops whitespace outside JSON strings, so fixtures can be pretty-printed while key order
 * and value spelling still have to match exactly. */
static char *squeeze(const char *s)
{
    char *out = malloc(strlen(s) + 1);
    char *p = out;
    bool in_str = false;
    for (; *s; s++) {
        if (in_str) {
            *p++ = *s;
            if (*s == '\\' && s[1]) {
                *p++ = *++s;
            } else if (*s == '"') {
                in_str = false;
            }
        } else if (*s == '"') {
            in_str = true;
            *p++ = *s;
        } else if (*s != ' ' && *s != '\n' && *s != '\t' && *s != '\r') {
            *p++ = *s;
        }
    }
    *p = '\0';
    return out;
}

typedef struct golden {
    const char *op;
    const char *recipient_path;
    const char *expect_recipient; /* NULL: none */
    const char *expect_coll;      /* NULL: none */
    bool has_doc_key;
} golden_t;

static const golden_t goldens[] = {
    {"insert", "fullDocument.owner_id", "\"u1\"", "orders", true},
    {"update", "fullDocument.owner_id", "42", "orders", true},
    {"replace", "fullDocument.owner_id", "{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}", "orders", true},
    {"delete", "fullDocument.owner_id", "\"u9\"", "orders", true},
    {"drop", "fullDocument.owner_id", NULL, "orders", false},
    {"rename", NULL, NULL, "orders", false},
    {"dropDatabase", NULL, NULL, NULL, false},
};

static void check_golden(const golden_t *g)
{
    char name[128];
    snprintf(name, sizeof(name), "%s.change.json", g->op);
    bson_t *change = read_bson(name);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", 11, change, g->recipient_path, &err);
    if (!ev) {
        fail_msg("%s: %s", g->op, err.message);
    }
    assert_int_equal(mc_event_kind(ev), MC_EVENT_CHANGE);
    assert_int_equal(mc_event_seq(ev), 11);
    assert_string_equal(mc_event_stream(ev), "orders");
    assert_string_equal(mc_event_operation_type(ev), g->op);
    assert_string_equal(mc_event_db(ev), "shop");
    if (g->expect_coll) {
        assert_string_equal(mc_event_coll(ev), g->expect_coll);
    } else {
        assert_null(mc_event_coll(ev));
    }
    assert_int_equal(mc_event_document_key(ev) != NULL, g->has_doc_key);
    if (g->expect_recipient) {
        assert_non_null(mc_event_recipient(ev));
        assert_string_equal(mc_event_recipient(ev), g->expect_recipient);
    } else {
        assert_null(mc_event_recipient(ev));
    }
    uint32_t t = 0, i = 0;
    assert_true(mc_event_cluster_time(ev, &t, &i));
    assert_int_equal(t, 1688728273);
    assert_true(i >= 1 && i <= 7);
    assert_int_equal(mc_event_wall_time_ms(ev), 1688728273456LL);

    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, change, "_id"));
    bson_iter_t d;
    assert_true(bson_iter_recurse(&it, &d) && bson_iter_find(&d, "_data"));
    assert_string_equal(mc_event_id(ev), bson_iter_utf8(&d, NULL));

    snprintf(name, sizeof(name), "%s.message.json", g->op);
    char *expected_raw = read_file(name);
    char *expected = squeeze(expected_raw);
    size_t len = 0;
    const char *json = mc_event_json(ev, &len);
    assert_non_null(json);
    assert_int_equal(len, strlen(json));
    char *actual = squeeze(json);
    if (strcmp(actual, expected) != 0) {
        fail_msg("%s message mismatch\n got: %s\nwant: %s", g->op, actual, expected);
    }
    /* Rendered once: the same buffer comes back. */
    assert_ptr_equal(mc_event_json(ev, NULL), json);

    /* Raw canonical JSON parses back to exactly the input document. */
    const char *raw = mc_event_raw_json(ev, NULL);
    assert_non_null(raw);
    bson_error_t berr;
    bson_t *back = bson_new_from_json((const uint8_t *)raw, -1, &berr);
    assert_non_null(back);
    assert_true(bson_equal(back, change));
    assert_non_null(strstr(raw, "$numberLong")); /* canonical, not relaxed (wallTime) */
    assert_true(bson_equal(mc_event_change(ev), change));

    bson_destroy(back);
    free(actual);
    free(expected);
    free(expected_raw);
    mc_event_unref(&ev);
    assert_null(ev);
    bson_destroy(change);
}

static void test_golden_messages(void **state)
{
    (void)state;
    for (size_t k = 0; k < sizeof(goldens) / sizeof(goldens[0]); k++) {
        check_golden(&goldens[k]);
    }
}

static void test_invalidate_message(void **state)
{
    (void)state;
    bson_t *change = read_bson("invalidate.change.json");
    mc_error_t err;
    mc_event_t *ev = mc_event_new_invalidate("orders", 3, change, "drop", &err);
    assert_non_null(ev);
    assert_int_equal(mc_event_kind(ev), MC_EVENT_INVALIDATE);
    assert_string_equal(mc_event_reason(ev), "drop");
    assert_string_equal(mc_event_operation_type(ev), "invalidate");
    assert_non_null(mc_event_resume_token(ev));
    assert_non_null(strstr(mc_event_id(ev), "296F5A")); /* fromInvalidate token kept */
    char *want_raw = read_file("invalidate.message.json");
    char *want = squeeze(want_raw);
    char *got = squeeze(mc_event_json(ev, NULL));
    assert_string_equal(got, want);
    assert_non_null(mc_event_raw_json(ev, NULL));
    free(got);
    free(want);
    free(want_raw);
    mc_event_unref(&ev);
    bson_destroy(change);
}

static void test_control_events(void **state)
{
    (void)state;
    mc_event_t *r = mc_event_new_control(MC_EVENT_RESET, "a\"b", 5, "history lost");
    assert_non_null(r);
    assert_string_equal(mc_event_json(r, NULL),
                        "{\"type\":\"reset\",\"stream\":\"a\\\"b\",\"reason\":\"history "
                        "lost\"}");
    assert_null(mc_event_raw_json(r, NULL));
    assert_null(mc_event_change(r));
    assert_null(mc_event_id(r));
    assert_null(mc_event_operation_type(r));
    assert_false(mc_event_cluster_time(r, NULL, NULL));
    assert_int_equal(mc_event_wall_time_ms(r), INT64_MIN);
    mc_event_unref(&r);

    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "orders", 1, "ignored");
    char *got = squeeze(mc_event_json(ready, NULL));
    assert_string_equal(got, "{\"type\":\"ready\",\"stream\":\"orders\"}");
    free(got);
    assert_null(mc_event_reason(ready));
    mc_event_unref(&ready);

    assert_null(mc_event_new_control(MC_EVENT_CHANGE, "orders", 1, NULL));
    assert_null(mc_event_new_control(MC_EVENT_READY, NULL, 1, NULL));
}

/* The error message is the bytes libbson's relaxed Extended JSON gives the same document (the
 * convention of every message), with server_code only when there is one. */
static void test_error_event(void **state)
{
    (void)state;
    mc_event_t *ev = mc_event_new_error("or\"ders", 7, MC_EVENT_ERROR_HISTORY_LOST, 286,
                                        "history lost: \xc3\xa9\n");
    assert_non_null(ev);
    assert_int_equal(mc_event_kind(ev), MC_EVENT_ERROR);
    assert_string_equal(mc_event_kind_name(MC_EVENT_ERROR), "error");
    assert_int_equal(mc_event_seq(ev), 7);
    assert_string_equal(mc_event_stream(ev), "or\"ders");
    assert_string_equal(mc_event_error_code(ev), "history_lost");
    assert_int_equal(mc_event_server_code(ev), 286);
    assert_string_equal(mc_event_reason(ev), "history lost: \xc3\xa9\n");
    assert_null(mc_event_id(ev));
    assert_null(mc_event_change(ev));
    assert_null(mc_event_raw_json(ev, NULL));
    assert_null(mc_event_operation_type(ev));
    assert_null(mc_event_recipient(ev));
    bson_t *want_doc =
        BCON_NEW("type", "error", "stream", "or\"ders", "code", "history_lost", "server_code",
                 BCON_INT32(286), "reason", "history lost: \xc3\xa9\n");
    char *spaced = bson_as_relaxed_extended_json(want_doc, NULL);
    char *want = squeeze(spaced);
    bson_free(spaced);
    size_t len = 0;
    const char *got = mc_event_json(ev, &len);
    assert_string_equal(got, want);
    assert_int_equal(len, strlen(want));
    assert_string_equal(got, "{\"type\":\"error\",\"stream\":\"or\\\"ders\",\"code\":"
                             "\"history_lost\",\"server_code\":286,\"reason\":"
                             "\"history lost: \xc3\xa9\\n\"}");
    free(want);
    bson_destroy(want_doc);
    mc_event_unref(&ev);

    /* Without a server code (and with the extremes of an int) */
    ev = mc_event_new_error("s", 1, MC_EVENT_ERROR_CHECKPOINT, 0,
                            "the stored checkpoint cannot be used");
    char *sq = squeeze(mc_event_json(ev, NULL));
    assert_string_equal(sq, "{\"type\":\"error\",\"stream\":\"s\",\"code\":\"checkpoint_error\","
                            "\"reason\":\"the stored checkpoint cannot be used\"}");
    free(sq);
    mc_event_unref(&ev);
    ev = mc_event_new_error("s", 1, "x", INT32_MIN, "r");
    sq = squeeze(mc_event_json(ev, NULL));
    assert_string_equal(sq, "{\"type\":\"error\",\"stream\":\"s\",\"code\":\"x\","
                            "\"server_code\":-2147483648,\"reason\":\"r\"}");
    free(sq);
    mc_event_unref(&ev);

    /* Defaults */
    ev = mc_event_new_error("s", 2, NULL, 0, NULL);
    assert_string_equal(mc_event_error_code(ev), MC_EVENT_ERROR_FAILED);
    assert_string_equal(mc_event_reason(ev), "stream failed");
    assert_int_equal(mc_event_server_code(ev), 0);
    mc_event_unref(&ev);
    assert_null(mc_event_new_error(NULL, 1, "x", 1, "r"));

    /* Other kinds have no error code. */
    ev = mc_event_new_control(MC_EVENT_RESET, "s", 1, "history");
    assert_null(mc_event_error_code(ev));
    assert_int_equal(mc_event_server_code(ev), 0);
    mc_event_unref(&ev);
    assert_null(mc_event_new_control(MC_EVENT_ERROR, "s", 1, "r"));
}

static void test_refcount(void **state)
{
    (void)state;
    mc_event_t *ev = mc_event_new_control(MC_EVENT_READY, "s", 1, NULL);
    mc_event_t *b = mc_event_ref(ev);
    assert_ptr_equal(b, ev);
    mc_event_unref(&b);
    assert_null(b);
    /* Still alive through the first reference (ASan would flag a use after free). */
    assert_string_equal(mc_event_stream(ev), "s");
    mc_event_unref(&ev);
    mc_event_unref(&ev); /* NULL-safe */
    mc_event_unref(NULL);
    assert_null(mc_event_ref(NULL));
}

static void test_bad_change(void **state)
{
    (void)state;
    mc_error_t err = {0};
    bson_t *no_id = BCON_NEW("operationType", "insert");
    assert_null(mc_event_new_change("s", 1, no_id, NULL, &err));
    assert_int_equal(err.code, MC_EINVAL);
    assert_non_null(strstr(err.message, "resume token"));
    bson_t *bad_data = BCON_NEW("_id", "{", "_data", BCON_INT32(1), "}", "operationType",
                                "insert");
    assert_null(mc_event_new_change("s", 1, bad_data, NULL, &err));
    assert_non_null(strstr(err.message, "_data"));
    bson_t *id_str = BCON_NEW("_id", "x", "operationType", "insert");
    assert_null(mc_event_new_change("s", 1, id_str, NULL, &err));
    assert_null(mc_event_new_change(NULL, 1, id_str, NULL, &err));
    /* No operationType (projected away) is still a deliverable event. */
    bson_t *no_op = BCON_NEW("_id", "{", "_data", "00", "}");
    mc_event_t *ev = mc_event_new_change("s", 1, no_op, NULL, &err);
    assert_non_null(ev);
    assert_null(mc_event_operation_type(ev));
    mc_event_unref(&ev);
    bson_destroy(no_id);
    bson_destroy(bad_data);
    bson_destroy(id_str);
    bson_destroy(no_op);
}

static void check_recipient(const char *json, const char *path, const char *want)
{
    bson_error_t berr;
    bson_t *b = bson_new_from_json((const uint8_t *)json, -1, &berr);
    assert_non_null(b);
    mc_event_t *ev = mc_event_new_change("s", 1, b, path, NULL);
    assert_non_null(ev);
    if (want) {
        assert_non_null(mc_event_recipient(ev));
        assert_string_equal(mc_event_recipient(ev), want);
    } else {
        assert_null(mc_event_recipient(ev));
    }
    mc_event_unref(&ev);
    bson_destroy(b);
}

static void test_recipient_types(void **state)
{
    (void)state;
    const char *pre = "{\"_id\":{\"_data\":\"00\"},\"operationType\":\"update\",";
    char buf[512];
#define R(body, path, want)                                                                        \
    snprintf(buf, sizeof(buf), "%s%s}", pre, body);                                                \
    check_recipient(buf, path, want)
    /* Identities (mongocast/identity.h): integers whatever their BSON type, strings quoted. */
    R("\"fullDocument\":{\"o\":{\"$numberLong\":\"-9000000000\"}}", "fullDocument.o",
      "-9000000000");
    R("\"fullDocument\":{\"o\":{\"$numberDouble\":\"12.0\"}}", "fullDocument.o", "12");
    R("\"fullDocument\":{\"o\":{\"$numberDecimal\":\"1.20E+1\"}}", "fullDocument.o", "12");
    R("\"fullDocument\":{\"o\":\"12\"}", "fullDocument.o", "\"12\"");
    /* Not identities: fractions, booleans, documents, arrays, null. */
    R("\"fullDocument\":{\"o\":{\"$numberDouble\":\"1.5\"}}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":{\"$numberDecimal\":\"7.25\"}}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":true}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":{\"a\":1}}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":[\"u1\",\"u2\"]}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":null}", "fullDocument.o", NULL);
    R("\"fullDocument\":{\"o\":{\"a\":\"deep\"}}", "fullDocument.o.a", "\"deep\"");
    R("\"fullDocument\":{\"p\":1}", "fullDocument.o", NULL);
    /* An update without its post-image is not routed by its pre-image: the write may have
     * changed the owner. */
    R("\"fullDocument\":null,\"fullDocumentBeforeChange\":{\"o\":\"pre\"}", "fullDocument.o",
      NULL);
    /* fullDocument present: the pre-image is not consulted even if the field is missing. */
    R("\"fullDocument\":{\"x\":1},\"fullDocumentBeforeChange\":{\"o\":\"pre\"}",
      "fullDocument.o", NULL);
    /* A path outside fullDocument is read as is. */
    R("\"ns\":{\"db\":\"d\",\"coll\":\"c\"}", "ns.coll", "\"c\"");
    R("\"fullDocument\":{\"o\":\"x\"}", "", NULL);
#undef R
}

static void test_recipient_null_vs_absent(void **state)
{
    (void)state;
    bson_t *b = BCON_NEW("_id", "{", "_data", "AA", "}", "operationType", "insert");
    mc_event_t *with = mc_event_new_change("s", 1, b, "fullDocument.owner", NULL);
    mc_event_t *without = mc_event_new_change("s", 1, b, NULL, NULL);
    assert_non_null(strstr(mc_event_json(with, NULL), "\"recipient\":null"));
    assert_null(strstr(mc_event_json(without, NULL), "recipient"));
    mc_event_unref(&with);
    mc_event_unref(&without);
    bson_destroy(b);
}

/* ---- Views: what each identity receives of an event ------------------------------------ */

static bson_t *json_bson(const char *json)
{
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)json, -1, &e);
    if (!b) {
        fail_msg("bad json %s: %s", json, e.message);
    }
    return b;
}

static mc_identity_t ident(const char *value_json)
{
    char doc[256];
    snprintf(doc, sizeof(doc), "{\"v\":%s}", value_json);
    bson_t *b = json_bson(doc);
    bson_iter_t it;
    mc_identity_t id;
    assert_true(bson_iter_init_find(&it, b, "v"));
    assert_true(mc_identity_from_iter(&it, &id));
    bson_destroy(b);
    return id;
}

static mc_event_view_t view_of(const mc_event_t *ev, const char *value_json)
{
    mc_identity_t id = ident(value_json);
    return mc_event_view_for(ev, id.bytes, id.len);
}

/* An update event on document 7 whose versions are given as JSON objects (or NULL). */
static mc_event_t *update_event(const char *before, const char *after, const char *extra)
{
    char json[2048];
    snprintf(json, sizeof(json),
             "{\"_id\":{\"_data\":\"8201\"},\"operationType\":\"update\",\"clusterTime\":"
             "{\"$timestamp\":{\"t\":5,\"i\":1}},\"ns\":{\"db\":\"shop\",\"coll\":"
             "\"orders\"},\"documentKey\":{\"_id\":7},\"updateDescription\":{"
             "\"updatedFields\":{\"owner\":\"bob\",\"n\":2},\"removedFields\":[\"note\"],"
             "\"truncatedArrays\":[{\"field\":\"arr\",\"newSize\":1}],"
             "\"disambiguatedPaths\":{}}%s%s%s%s%s}",
             after ? ",\"fullDocument\":" : "", after ? after : "",
             before ? ",\"fullDocumentBeforeChange\":" : "", before ? before : "",
             extra ? extra : "");
    bson_t *b = json_bson(json);
    mc_event_t *ev = mc_event_new_change("orders", 1, b, "fullDocument.owner", NULL);
    assert_non_null(ev);
    bson_destroy(b);
    return ev;
}

/* An event MongoDB could not return (on_oversize: skip) renders as its notice in every form,
 * per view, with the server's limit; its routing is that of the change it stands for. */
static void test_server_oversize_renders_as_notice(void **state)
{
    (void)state;
    mc_event_t *ev = update_event("{\"_id\":7,\"owner\":\"alice\"}", "{\"_id\":7,\"owner\":\"bob\"}",
                                  NULL);
    assert_int_equal(mc_event_server_oversize(ev), 0);
    mc__event_set_server_oversize(ev, 31457742);
    assert_int_equal(mc_event_server_oversize(ev), 31457742);
    const char *full = mc_event_json(ev, NULL);
    assert_string_equal(full, "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"8201\","
                              "\"recipient\":\"bob\",\"operationType\":\"update\",\"ns\":{\"db\":"
                              "\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":7},\"size\":"
                              "31457742,\"limit\":16793600}");
    assert_string_equal(mc_event_raw_json(ev, NULL), full);
    const char *entered = mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL);
    assert_non_null(entered);
    assert_non_null(strstr(entered, "\"entered\":true"));
    assert_non_null(strstr(entered, "\"limit\":16793600}"));
    assert_string_equal(mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL),
                        "{\"type\":\"left\",\"stream\":\"orders\",\"_id\":7}");
    bson_t *own = json_bson("{\"operationType\":\"update\",\"secret\":1}");
    char *mine = mc_event_json_view_with_change(ev, MC_EVENT_VIEW_FULL, own, NULL);
    assert_string_equal(mine, full);
    bson_free(mine);
    bson_destroy(own);
    mc_event_unref(&ev);
}

static void test_transfer_views(void **state)
{
    (void)state;
    /* alice's version had a note; the write removed it and handed the order to bob. A
     * stream pipeline also copied the old note to a top-level field. */
    mc_event_t *ev = update_event("{\"_id\":7,\"owner\":\"alice\",\"note\":\"alice-secret\","
                                  "\"arr\":[1,2,3]}",
                                  "{\"_id\":7,\"owner\":\"bob\",\"n\":2,\"arr\":[1]}",
                                  ",\"oldNote\":\"alice-secret\"");
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_ENTERED);
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_LEFT);
    assert_int_equal(view_of(ev, "\"carol\""), MC_EVENT_VIEW_NONE);
    assert_string_equal(mc_event_recipient(ev), "\"bob\"");

    /* The new owner's change: nothing of alice's version, MongoDB's own fields kept. */
    const bson_t *entered = mc_event_change_view(ev, MC_EVENT_VIEW_ENTERED);
    assert_non_null(entered);
    assert_false(bson_has_field(entered, "fullDocumentBeforeChange"));
    assert_false(bson_has_field(entered, "oldNote"));
    assert_true(bson_has_field(entered, "fullDocument"));
    assert_true(bson_has_field(entered, "documentKey"));
    assert_true(bson_has_field(entered, "clusterTime"));
    assert_true(bson_has_field(entered, "updateDescription.updatedFields.owner"));
    assert_false(bson_has_field(entered, "updateDescription.disambiguatedPaths"));
    bson_iter_t it, sub;
    assert_true(bson_iter_init(&it, entered) &&
                bson_iter_find_descendant(&it, "updateDescription.removedFields", &sub));
    assert_true(BSON_ITER_HOLDS_ARRAY(&sub));
    uint32_t alen;
    const uint8_t *adata;
    bson_iter_array(&sub, &alen, &adata);
    assert_int_equal(alen, 5); /* empty array */
    assert_true(bson_iter_init(&it, entered) &&
                bson_iter_find_descendant(&it, "updateDescription.truncatedArrays", &sub));
    bson_iter_array(&sub, &alen, &adata);
    assert_int_equal(alen, 5);

    size_t len = 0;
    const char *ej = mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, &len);
    assert_non_null(ej);
    assert_int_equal(len, strlen(ej));
    assert_null(strstr(ej, "alice"));
    assert_null(strstr(ej, "note"));
    assert_non_null(strstr(ej, "\"recipient\":\"bob\",\"entered\":true,\"change\""));
    /* Encoded once per view. */
    assert_ptr_equal(mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL), ej);

    const char *lj = mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, &len);
    assert_string_equal(lj, "{\"type\":\"left\",\"stream\":\"orders\",\"_id\":7}");
    assert_ptr_equal(mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL), lj);
    assert_null(mc_event_change_view(ev, MC_EVENT_VIEW_LEFT));

    /* Admins get everything, alice's note included. */
    assert_ptr_equal(mc_event_json_view(ev, MC_EVENT_VIEW_FULL, NULL), mc_event_json(ev, NULL));
    assert_non_null(strstr(mc_event_json(ev, NULL), "alice-secret"));
    assert_null(mc_event_json_view(ev, MC_EVENT_VIEW_NONE, NULL));
    mc_event_unref(&ev);

    /* The same owner before and after: the whole event. */
    ev = update_event("{\"owner\":\"bob\",\"note\":\"x\"}", "{\"owner\":\"bob\"}", NULL);
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_FULL);
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_NONE);
    assert_null(mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL));
    assert_null(mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL));
    mc_event_unref(&ev);

    /* From nobody to bob: bob was not entitled to the unowned version. */
    ev = update_event("{\"note\":\"x\"}", "{\"owner\":\"bob\"}", NULL);
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_ENTERED);
    assert_null(mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL));
    mc_event_unref(&ev);

    /* From alice to nobody: alice is told it left; nobody else gets anything. */
    ev = update_event("{\"owner\":\"alice\"}", "{\"owner\":[\"a\",\"b\"]}", NULL);
    assert_null(mc_event_recipient(ev));
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_LEFT);
    assert_int_equal(view_of(ev, "\"a\""), MC_EVENT_VIEW_NONE);
    assert_false(mc_event_recipient_unresolved(ev));
    mc_event_unref(&ev);

    /* No pre-image: the previous owner is unknown; the event carries nothing of it. */
    ev = update_event(NULL, "{\"owner\":\"bob\"}", NULL);
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_FULL);
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_NONE);
    mc_event_unref(&ev);

    /* No post-image: unresolved, nobody but admins (not even the pre-image's owner). */
    ev = update_event("{\"owner\":\"alice\"}", NULL, NULL);
    assert_true(mc_event_recipient_unresolved(ev));
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_NONE);
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_NONE);
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"recipient\":null"));
    mc_event_unref(&ev);

    /* Typed identities: 5 is Int64(5) and 5.0, not "5"; "u3" is not "u3\0evil". */
    ev = update_event(NULL, "{\"owner\":{\"$numberLong\":\"5\"}}", NULL);
    assert_int_equal(view_of(ev, "5"), MC_EVENT_VIEW_FULL);
    assert_int_equal(view_of(ev, "5.0"), MC_EVENT_VIEW_FULL);
    assert_int_equal(view_of(ev, "\"5\""), MC_EVENT_VIEW_NONE);
    mc_event_unref(&ev);
    ev = update_event(NULL, "{\"owner\":\"u3\\u0000evil\"}", NULL);
    assert_int_equal(view_of(ev, "\"u3\""), MC_EVENT_VIEW_NONE);
    assert_int_equal(view_of(ev, "\"u3\\u0000evil\""), MC_EVENT_VIEW_FULL);
    assert_string_equal(mc_event_recipient(ev), "\"u3\\u0000evil\"");
    mc_event_unref(&ev);
    ev = update_event(NULL, "{\"owner\":{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}}", NULL);
    assert_int_equal(view_of(ev, "{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}"), MC_EVENT_VIEW_FULL);
    assert_int_equal(view_of(ev, "\"64a7f2d1aabbccddeeff0099\""), MC_EVENT_VIEW_NONE);
    mc_event_unref(&ev);

    /* Control events are for everyone. */
    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "orders", 1, NULL);
    assert_int_equal(view_of(ready, "\"bob\""), MC_EVENT_VIEW_FULL);
    mc_event_unref(&ready);
}

static void test_routing_set_later(void **state)
{
    (void)state;
    /* The lookup form: the event is built without a path, the watcher sets the routing. */
    bson_t *b = json_bson("{\"_id\":{\"_data\":\"8202\"},\"operationType\":\"replace\","
                  "\"documentKey\":{\"_id\":\"x\"},\"fullDocument\":{\"b\":2},"
                  "\"fullDocumentBeforeChange\":{\"b\":1,\"secret\":\"s\"}}");
    mc_event_t *ev = mc_event_new_change("items", 1, b, NULL, NULL);
    bson_destroy(b);
    mc__routing_t r = {.post = MC__R_KNOWN, .prev = MC__R_KNOWN};
    r.post_id = ident("\"bob\"");
    r.prev_id = ident("\"alice\"");
    assert_int_equal(mc__event_set_routing(ev, &r), 0);
    assert_string_equal(mc_event_recipient(ev), "\"bob\"");
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_ENTERED);
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_LEFT);
    assert_null(strstr(mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL), "secret"));
    assert_non_null(strstr(mc_event_json(ev, NULL), "\"recipient\":\"bob\""));
    assert_string_equal(mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL),
                        "{\"type\":\"left\",\"stream\":\"items\",\"_id\":\"x\"}");
    /* Set again (unresolved): the views go away. */
    mc__routing_t u = {.post = MC__R_UNRESOLVED, .prev = MC__R_ABSENT};
    assert_int_equal(mc__event_set_routing(ev, &u), 0);
    assert_true(mc_event_recipient_unresolved(ev));
    assert_int_equal(view_of(ev, "\"bob\""), MC_EVENT_VIEW_NONE);
    assert_int_equal(view_of(ev, "\"alice\""), MC_EVENT_VIEW_NONE);
    mc_event_unref(&ev);
}

#define RACERS 8
static void *race_render(void *arg)
{
    return (void *)mc_event_json(arg, NULL);
}

static void test_concurrent_first_render(void **state)
{
    (void)state;
    for (int round = 0; round < 20; round++) {
        bson_t *change = read_bson("update.change.json");
        mc_event_t *ev = mc_event_new_change("orders", 1, change, NULL, NULL);
        pthread_t th[RACERS];
        void *res[RACERS];
        for (int k = 0; k < RACERS; k++) {
            pthread_create(&th[k], NULL, race_render, mc_event_ref(ev));
        }
        for (int k = 0; k < RACERS; k++) {
            pthread_join(th[k], &res[k]);
        }
        for (int k = 0; k < RACERS; k++) {
            assert_ptr_equal(res[k], res[0]); /* one rendering shared by everyone */
            mc_event_t *tmp = ev;
            mc_event_unref(&tmp); /* drop the reference handed to racer k */
        }
        assert_ptr_equal(mc_event_json(ev, NULL), res[0]);
        mc_event_unref(&ev);
        bson_destroy(change);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_messages),
        cmocka_unit_test(test_invalidate_message),
        cmocka_unit_test(test_control_events),
        cmocka_unit_test(test_error_event),
        cmocka_unit_test(test_refcount),
        cmocka_unit_test(test_bad_change),
        cmocka_unit_test(test_recipient_types),
        cmocka_unit_test(test_recipient_null_vs_absent),
        cmocka_unit_test(test_concurrent_first_render),
        cmocka_unit_test(test_server_oversize_renders_as_notice),
        cmocka_unit_test(test_transfer_views),
        cmocka_unit_test(test_routing_set_later),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
