/*
 * test_event_scan.c: the one-pass field extraction of mc_event_new_change() agrees with the
 * straightforward lookups it replaced (bson_iter_init_find for each top-level field,
 * bson_iter_find_descendant for ns.db / ns.coll, the recipient rule of mc_event_new_change()
 * written out with bson_iter_find_descendant) on crafted documents: duplicate keys whose first
 * occurrence has the wrong type, ns as an array, a null or undefined fullDocument (the
 * write-time rule: deletes read the pre-image, other writes need their resulting document),
 * recipient paths outside fullDocument, every recipient type, empty path segments. Then the same on thousands of
 * random documents (fixed seed) built from those pieces in random order. Also checks that
 * the event keeps nothing that points into the caller's document (ASan: the source is freed
 * before the accessors run).
 *
 * Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

/* ---- The reference: the lookups the single pass replaced ------------------------------- */

typedef struct expect {
    bool ok;
    char *op, *db, *coll, *id, *recipient;
    bool has_ct;
    uint32_t ct_t, ct_i;
    int64_t wall_ms;
    bson_t *doc_key; /* copy, or NULL */
    bson_t *token;   /* copy */
} expect_t;

static char *dup_utf8(const bson_iter_t *it)
{
    return bson_strdup(bson_iter_utf8(it, NULL));
}

/* The recipient as mc_event_recipient() spells it, by the documented rule. */
static char *ref_recipient(const bson_t *change, const char *path)
{
    static const char prefix[] = "fullDocument.";
    const size_t plen = sizeof(prefix) - 1;
    bson_iter_t it, found;
    bool have = false;
    if (!path || !*path) {
        return NULL;
    }
    if (strncmp(path, prefix, plen) != 0) {
        have = bson_iter_init(&it, change) && bson_iter_find_descendant(&it, path, &found);
    } else if (path[plen]) {
        const char *op = NULL;
        if (bson_iter_init_find(&it, change, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
            op = bson_iter_utf8(&it, NULL);
        }
        bool full = bson_iter_init_find(&it, change, "fullDocument") &&
                    BSON_ITER_HOLDS_DOCUMENT(&it);
        bool before = bson_iter_init_find(&it, change, "fullDocumentBeforeChange") &&
                      BSON_ITER_HOLDS_DOCUMENT(&it);
        const char *top = NULL;
        if (op && strcmp(op, "delete") == 0) {
            top = before ? "fullDocumentBeforeChange" : NULL;
        } else if (full) {
            top = "fullDocument";
        }
        if (top) {
            char *p = bson_strdup_printf("%s.%s", top, path + plen);
            have = bson_iter_init(&it, change) && bson_iter_find_descendant(&it, p, &found);
            bson_free(p);
        }
    }
    mc_identity_t id;
    char json[MC_IDENTITY_JSON_MAX];
    if (have && mc_identity_from_iter(&found, &id) && mc_identity_json(id.bytes, id.len, json)) {
        return bson_strdup(json);
    }
    return NULL;
}

static expect_t reference(const bson_t *change, const char *recipient_path)
{
    expect_t x;
    memset(&x, 0, sizeof(x));
    x.wall_ms = INT64_MIN;
    bson_iter_t it;
    if (!bson_iter_init_find(&it, change, "_id") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return x;
    }
    const uint8_t *data;
    uint32_t len;
    bson_iter_document(&it, &len, &data);
    bson_t tok;
    if (!bson_init_static(&tok, data, len)) {
        return x;
    }
    bson_iter_t tk;
    if (!bson_iter_init_find(&tk, &tok, "_data") || !BSON_ITER_HOLDS_UTF8(&tk)) {
        return x;
    }
    x.ok = true;
    x.token = bson_copy(&tok);
    x.id = dup_utf8(&tk);
    if (bson_iter_init_find(&it, change, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
        x.op = dup_utf8(&it);
    }
    if (bson_iter_init_find(&it, change, "clusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        bson_iter_timestamp(&it, &x.ct_t, &x.ct_i);
        x.has_ct = true;
    }
    if (bson_iter_init_find(&it, change, "wallTime") && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        x.wall_ms = bson_iter_date_time(&it);
    }
    bson_iter_t ns;
    if (bson_iter_init(&it, change) && bson_iter_find_descendant(&it, "ns.db", &ns) &&
        BSON_ITER_HOLDS_UTF8(&ns)) {
        x.db = dup_utf8(&ns);
    }
    if (bson_iter_init(&it, change) && bson_iter_find_descendant(&it, "ns.coll", &ns) &&
        BSON_ITER_HOLDS_UTF8(&ns)) {
        x.coll = dup_utf8(&ns);
    }
    if (bson_iter_init_find(&it, change, "documentKey") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_document(&it, &len, &data);
        bson_t dk;
        if (bson_init_static(&dk, data, len)) {
            x.doc_key = bson_copy(&dk);
        }
    }
    if (recipient_path) {
        x.recipient = ref_recipient(change, recipient_path);
    }
    return x;
}

static void expect_clear(expect_t *x)
{
    bson_free(x->op);
    bson_free(x->db);
    bson_free(x->coll);
    bson_free(x->id);
    bson_free(x->recipient);
    if (x->doc_key) {
        bson_destroy(x->doc_key);
    }
    if (x->token) {
        bson_destroy(x->token);
    }
}

static void assert_same_str(const char *got, const char *want, const char *what, int n)
{
    if (!got || !want) {
        if (got != want) {
            fail_msg("case %d: %s: got %s, want %s", n, what, got ? got : "NULL",
                     want ? want : "NULL");
        }
        return;
    }
    if (strcmp(got, want) != 0) {
        fail_msg("case %d: %s: got '%s', want '%s'", n, what, got, want);
    }
}

/* Builds the event from a private copy of `change`, frees the copy, then compares. */
static void check(const bson_t *change, const char *recipient_path, int n)
{
    expect_t x = reference(change, recipient_path);
    bson_t *src = bson_copy(change);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("s", 1, src, recipient_path, &err);
    bson_destroy(src); /* nothing in the event may point into it */
    if (!x.ok) {
        if (ev) {
            fail_msg("case %d: accepted a change without a usable resume token", n);
        }
        assert_int_equal(err.code, MC_EINVAL);
        expect_clear(&x);
        return;
    }
    if (!ev) {
        fail_msg("case %d: rejected: %s", n, err.message);
    }
    assert_same_str(mc_event_operation_type(ev), x.op, "operationType", n);
    assert_same_str(mc_event_db(ev), x.db, "ns.db", n);
    assert_same_str(mc_event_coll(ev), x.coll, "ns.coll", n);
    assert_same_str(mc_event_id(ev), x.id, "id", n);
    assert_same_str(mc_event_recipient(ev), x.recipient, "recipient", n);
    uint32_t t = 0, i = 0;
    assert_int_equal(mc_event_cluster_time(ev, &t, &i), x.has_ct);
    if (x.has_ct) {
        assert_int_equal(t, x.ct_t);
        assert_int_equal(i, x.ct_i);
    }
    assert_int_equal(mc_event_wall_time_ms(ev), x.wall_ms);
    const bson_t *dk = mc_event_document_key(ev);
    assert_int_equal(dk != NULL, x.doc_key != NULL);
    if (dk) {
        assert_true(bson_equal(dk, x.doc_key));
    }
    assert_true(bson_equal(mc_event_resume_token(ev), x.token));
    assert_true(bson_equal(mc_event_change(ev), change));
    /* The message still renders from the moved pointers. */
    assert_non_null(mc_event_json(ev, NULL));
    mc_event_unref(&ev);
    expect_clear(&x);
}

/* ---- Crafted documents ------------------------------------------------------------------ */

static void append_token(bson_t *b, const char *data)
{
    bson_t id;
    bson_append_document_begin(b, "_id", 3, &id);
    BSON_APPEND_UTF8(&id, "_data", data);
    bson_append_document_end(b, &id);
}

static void test_crafted(void **state)
{
    (void)state;
    int n = 0;
    /* 1. A plain insert with every field. */
    bson_t *d = BCON_NEW("_id", "{", "_data", "8264A1", "}", "operationType", "insert",
                         "clusterTime", BCON_TIMESTAMP(1700000000, 7), "wallTime",
                         BCON_DATE_TIME(1688728273456LL), "fullDocument", "{", "_id",
                         BCON_INT32(1), "owner", "alice", "}", "ns", "{", "db", "shop", "coll",
                         "orders", "}", "documentKey", "{", "_id", BCON_INT32(1), "}");
    check(d, "fullDocument.owner", ++n);
    check(d, NULL, ++n);
    check(d, "fullDocument.missing", ++n);
    check(d, "ns.db", ++n);                 /* a path outside fullDocument */
    check(d, "documentKey._id", ++n);        /* int32 recipient */
    check(d, "fullDocument.", ++n);          /* empty last segment */
    check(d, "fullDocument", ++n);           /* the document itself: not a scalar */
    check(d, "fullDocument.owner.x", ++n);   /* descends into a string */
    check(d, "", ++n);
    bson_destroy(d);

    /* 2. First occurrence has the wrong type: later duplicates must not count. */
    d = BCON_NEW("_id", "{", "_data", "8264A2", "}", "operationType", BCON_INT32(3),
                 "operationType", "update", "clusterTime", BCON_INT64(5), "clusterTime",
                 BCON_TIMESTAMP(1, 2), "wallTime", BCON_INT64(9), "wallTime",
                 BCON_DATE_TIME(77), "ns", BCON_INT32(1), "ns", "{", "db", "x", "}",
                 "documentKey", "[", BCON_INT32(1), "]", "documentKey", "{", "_id",
                 BCON_INT32(2), "}");
    check(d, NULL, ++n);
    bson_destroy(d);

    /* 3. Duplicates inside ns, ns as an array, and the right type first. */
    d = BCON_NEW("_id", "{", "_data", "8264A3", "}", "ns", "{", "db", BCON_INT32(1), "db",
                 "late", "coll", "c1", "coll", "c2", "}", "ns", "{", "db", "second", "}");
    check(d, NULL, ++n);
    bson_destroy(d);
    d = BCON_NEW("_id", "{", "_data", "8264A4", "}", "ns", "[", "shop", "orders", "]");
    check(d, NULL, ++n);
    bson_destroy(d);

    /* 4. Write-time versions: a delete reads the pre-image; null, undefined or missing
     * fullDocument leaves other writes without a recipient. */
    d = BCON_NEW("_id", "{", "_data", "8264A5", "}", "operationType", "delete", "fullDocument",
                 BCON_NULL, "fullDocumentBeforeChange", "{", "owner", BCON_INT64(42), "}");
    check(d, "fullDocument.owner", ++n);
    bson_destroy(d);
    d = BCON_NEW("_id", "{", "_data", "8264A6", "}", "fullDocument", BCON_UNDEFINED,
                 "fullDocumentBeforeChange", "{", "owner", BCON_DOUBLE(12.0), "}");
    check(d, "fullDocument.owner", ++n);
    bson_destroy(d);
    d = BCON_NEW("_id", "{", "_data", "8264A7", "}", "fullDocumentBeforeChange", "{", "owner",
                 BCON_DOUBLE(1.5), "}", "fullDocumentBeforeChange", "{", "owner", "no", "}");
    check(d, "fullDocument.owner", ++n);
    bson_destroy(d);
    /* fullDocument present but not a document: no fallback to the pre-image. */
    d = BCON_NEW("_id", "{", "_data", "8264A8", "}", "fullDocument", BCON_INT32(5),
                 "fullDocumentBeforeChange", "{", "owner", "pre", "}");
    check(d, "fullDocument.owner", ++n);
    bson_destroy(d);
    /* First fullDocument null, a later one a document: the first decides. */
    d = BCON_NEW("_id", "{", "_data", "8264A9", "}", "fullDocument", BCON_NULL, "fullDocument",
                 "{", "owner", "later", "}", "fullDocumentBeforeChange", "{", "owner", "pre",
                 "}");
    check(d, "fullDocument.owner", ++n);
    bson_destroy(d);
    /* fullDocument as an array is not a version of a document. */
    d = BCON_NEW("_id", "{", "_data", "8264AA", "}", "fullDocument", "[", "zero", "one", "]");
    check(d, "fullDocument.1", ++n);
    bson_destroy(d);

    /* 5. Every recipient type. */
    bson_oid_t oid;
    bson_oid_init_from_string(&oid, "64a7f0c2e4b0a1b2c3d4e5f6");
    bson_decimal128_t dec;
    bson_decimal128_from_string("12.50", &dec);
    bson_t *values = BCON_NEW("a", "str", "b", BCON_INT32(-7), "c", BCON_INT64(INT64_MAX),
                              "d", BCON_DOUBLE(3.0), "e", BCON_DOUBLE(0.1), "f",
                              BCON_DOUBLE(1e300), "g", BCON_DECIMAL128(&dec), "h",
                              BCON_OID(&oid), "i", BCON_BOOL(true), "j", BCON_NULL);
    bson_iter_t vi;
    bson_iter_init(&vi, values);
    while (bson_iter_next(&vi)) {
        bson_t *c = bson_new();
        append_token(c, "8264AB");
        bson_t fd;
        bson_append_document_begin(c, "fullDocument", -1, &fd);
        bson_append_iter(&fd, "owner", -1, &vi);
        bson_append_document_end(c, &fd);
        check(c, "fullDocument.owner", ++n);
        bson_destroy(c);
    }
    bson_destroy(values);
    /* A string with an embedded NUL: every byte is part of the identity. */
    bson_t *c = bson_new();
    append_token(c, "8264AC");
    bson_t fd;
    bson_append_document_begin(c, "fullDocument", -1, &fd);
    bson_append_utf8(&fd, "owner", -1, "ab\0cd", 5);
    bson_append_document_end(c, &fd);
    check(c, "fullDocument.owner", ++n);
    bson_destroy(c);

    /* 6. Bad tokens. */
    d = BCON_NEW("operationType", "insert");
    check(d, NULL, ++n);
    bson_destroy(d);
    d = BCON_NEW("_id", "x", "_id", "{", "_data", "8264AD", "}");
    check(d, NULL, ++n); /* first _id is a string */
    bson_destroy(d);
    d = BCON_NEW("_id", "{", "_data", BCON_INT32(1), "}");
    check(d, NULL, ++n);
    bson_destroy(d);
}

/* ---- Random documents ----------------------------------------------------------------- */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

/* Appends `key` with a value of a random type (the right one about half of the time). */
static void append_piece(bson_t *b, const char *key, int right)
{
    bson_t sub;
    switch (right ? right : (int)rnd(8)) {
    case 1:
        bson_append_utf8(b, key, -1, rnd(2) ? "update" : "shop", -1);
        break;
    case 2:
        bson_append_timestamp(b, key, -1, rnd(1000), rnd(10));
        break;
    case 3:
        bson_append_date_time(b, key, -1, (int64_t)rnd(1000000) - 500);
        break;
    case 4:
        bson_append_document_begin(b, key, -1, &sub);
        if (rnd(4)) {
            bson_append_utf8(&sub, "db", -1, rnd(2) ? "d1" : "d2", -1);
        }
        if (rnd(4)) {
            bson_append_utf8(&sub, "coll", -1, "c", -1);
        }
        if (rnd(3) == 0) {
            bson_append_int32(&sub, rnd(2) ? "db" : "coll", -1, 1);
        }
        if (rnd(4)) {
            bson_append_utf8(&sub, "owner", -1, rnd(2) ? "u1" : "u2", -1);
        }
        if (rnd(3) == 0) {
            bson_append_int64(&sub, "owner", -1, rnd(100));
        }
        if (rnd(4)) {
            bson_append_int32(&sub, "_id", -1, (int32_t)rnd(100));
        }
        bson_append_document_end(b, &sub);
        break;
    case 5:
        bson_append_null(b, key, -1);
        break;
    case 6:
        bson_append_array_begin(b, key, -1, &sub);
        bson_append_utf8(&sub, "0", -1, "x", -1);
        bson_append_array_end(b, &sub);
        break;
    case 7:
        bson_append_int32(b, key, -1, (int32_t)rnd(50));
        break;
    default:
        bson_append_undefined(b, key, -1);
        break;
    }
}

static void test_random(void **state)
{
    (void)state;
    static const struct {
        const char *key;
        int type;
    } pieces[] = {
        {"operationType", 1}, {"clusterTime", 2}, {"wallTime", 3},  {"ns", 4},
        {"documentKey", 4},   {"fullDocument", 4}, {"fullDocumentBeforeChange", 4},
        {"other", 7},         {"o", 1},            {"_idx", 4},
    };
    static const char *paths[] = {"fullDocument.owner", "fullDocument._id", "ns.db",
                                  "documentKey._id", "fullDocumentBeforeChange.owner", NULL};
    const size_t np = sizeof(pieces) / sizeof(pieces[0]);
    for (int n = 0; n < 4000; n++) {
        bson_t *b = bson_new();
        size_t count = rnd(12);
        bool token_done = false;
        for (size_t k = 0; k < count; k++) {
            if (!token_done && rnd(4) == 0) {
                append_token(b, rnd(2) ? "8264B1" : "8264B2");
                token_done = true;
            }
            size_t pi = rnd((uint32_t)np);
            append_piece(b, pieces[pi].key, rnd(2) ? pieces[pi].type : 0);
        }
        if (!token_done && rnd(8)) {
            append_token(b, "8264B3");
        }
        check(b, paths[rnd(sizeof(paths) / sizeof(paths[0]))], 1000 + n);
        bson_destroy(b);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crafted),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
