/*
 * test_split_event.c: reassembling $changeStreamSplitLargeEvent fragments (split_event.c): the
 * whole event with the last fragment's token and the usual field order, thin copies for skip
 * notices (the recipient path kept from both images), every way fragments can fail to add up,
 * and the token in MongoDB's BSONObjectTooLarge message.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "split_event.h"

/* {_id: {_data: tok}, splitEvent: {fragment: n, of: of}} and then `fields` (a JSON object). */
static bson_t *fragment(const char *tok, int n, int of, const char *fields)
{
    bson_t *f = bson_new(), id, se;
    BSON_APPEND_DOCUMENT_BEGIN(f, "_id", &id);
    BSON_APPEND_UTF8(&id, "_data", tok);
    bson_append_document_end(f, &id);
    BSON_APPEND_DOCUMENT_BEGIN(f, "splitEvent", &se);
    BSON_APPEND_INT32(&se, "fragment", n);
    BSON_APPEND_INT32(&se, "of", of);
    bson_append_document_end(f, &se);
    bson_error_t e;
    bson_t *more = bson_new_from_json((const uint8_t *)fields, -1, &e);
    assert_non_null(more);
    bson_concat(f, more);
    bson_destroy(more);
    return f;
}

static int add(mc__split_t *sp, bson_t *frag, bool thin, const char *path, bool *complete)
{
    mc_error_t err = {0};
    int rc = mc__split_add(sp, frag, thin, path, complete, &err);
    bson_destroy(frag);
    if (rc != 0) {
        assert_true(strstr(err.message, "split event:") != NULL);
    }
    return rc;
}

static char *keys_of(const bson_t *doc)
{
    static char buf[512];
    buf[0] = '\0';
    bson_iter_t it;
    assert_true(bson_iter_init(&it, doc));
    while (bson_iter_next(&it)) {
        strcat(buf, bson_iter_key(&it));
        strcat(buf, ",");
    }
    return buf;
}

static void test_reassembles_in_the_usual_order(void **state)
{
    (void)state;
    mc__split_t sp = {0};
    bool done = true;
    /* MongoDB orders a fragment's fields by size: the big ones come first. */
    assert_int_equal(add(&sp, fragment("A1", 1, 3, "{\"fullDocumentBeforeChange\": {\"x\": 1}}"),
                         false, NULL, &done), 0);
    assert_false(done);
    assert_true(mc__split_pending(&sp));
    assert_int_equal(add(&sp, fragment("A2", 2, 3, "{\"fullDocument\": {\"x\": 2}, "
                                                   "\"extra\": 5}"),
                         false, NULL, &done), 0);
    assert_false(done);
    assert_int_equal(add(&sp, fragment("A3", 3, 3, "{\"txnNumber\": 4, \"documentKey\": {\"_id\": 1},"
                                                   " \"ns\": {\"db\": \"d\", \"coll\": \"c\"}, "
                                                   "\"operationType\": \"update\", \"lsid\": {}}"),
                         false, NULL, &done), 0);
    assert_true(done);
    size_t bytes = 0;
    bson_t *whole = mc__split_take(&sp, &bytes);
    assert_non_null(whole);
    assert_false(mc__split_pending(&sp));
    assert_true(bytes > 100);
    assert_string_equal(keys_of(whole), "lsid,txnNumber,_id,operationType,ns,documentKey,"
                                        "fullDocument,fullDocumentBeforeChange,extra,");
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, whole, "_id"));
    bson_iter_t sub;
    assert_true(bson_iter_recurse(&it, &sub) && bson_iter_find(&sub, "_data"));
    assert_string_equal(bson_iter_utf8(&sub, NULL), "A3"); /* the last fragment's token */
    assert_false(bson_iter_init_find(&it, whole, "splitEvent"));
    bson_destroy(whole);
}

static void test_thin_keeps_what_a_notice_needs(void **state)
{
    (void)state;
    mc__split_t sp = {0};
    bool done = false;
    char *big = malloc(40000);
    memset(big, 'x', 39999);
    big[39999] = '\0';
    char *f1 = malloc(70000);
    snprintf(f1, 70000, "{\"fullDocument\": {\"pad\": \"%s\", \"owner\": {\"id\": \"alice\", \"x\": 1}, "
             "\"n\": 3}, "
             "\"updateDescription\": {\"updatedFields\": {\"pad\": \"%.20000s\"}}}", big, big);
    assert_int_equal(add(&sp, fragment("B1", 1, 2, f1), true, "fullDocument.owner.id", &done), 0);
    snprintf(f1, 70000, "{\"fullDocumentBeforeChange\": {\"pad\": \"%s\", \"owner\": "
             "{\"id\": \"bob\"}}, \"operationType\": \"update\", \"documentKey\": {\"_id\": 1}}",
             big);
    assert_int_equal(add(&sp, fragment("B2", 2, 2, f1), true, "fullDocument.owner.id", &done), 0);
    assert_true(done);
    size_t bytes = 0;
    bson_t *thin = mc__split_take(&sp, &bytes);
    assert_true(bytes > 80000); /* the fragments' own sizes, not the thin copies' */
    assert_true(thin->len < 1024);
    char *json = bson_as_relaxed_extended_json(thin, NULL);
    /* The path first, then the image's other small fields (none here but the pad, too big). */
    assert_string_equal(json, "{ \"_id\" : { \"_data\" : \"B2\" }, \"operationType\" : \"update\", "
                              "\"documentKey\" : { \"_id\" : 1 }, \"fullDocument\" : { \"owner\" : "
                              "{ \"id\" : \"alice\" }, \"n\" : 3 }, \"fullDocumentBeforeChange\" : "
                              "{ \"owner\" : { \"id\" : \"bob\" } } }");
    bson_free(json);
    bson_destroy(thin);
    free(big);
    free(f1);
}

static void test_fragments_that_do_not_add_up(void **state)
{
    (void)state;
    mc__split_t sp = {0};
    bool done = false;
    /* Starting in the middle. */
    assert_int_equal(add(&sp, fragment("C2", 2, 2, "{\"a\": 1}"), false, NULL, &done), MC_EINVAL);
    assert_false(mc__split_pending(&sp));
    /* A gap. */
    assert_int_equal(add(&sp, fragment("C1", 1, 3, "{\"a\": 1}"), false, NULL, &done), 0);
    assert_int_equal(add(&sp, fragment("C3", 3, 3, "{\"b\": 1}"), false, NULL, &done), MC_EINVAL);
    assert_false(mc__split_pending(&sp));
    /* A repeat. */
    assert_int_equal(add(&sp, fragment("C1", 1, 2, "{\"a\": 1}"), false, NULL, &done), 0);
    assert_int_equal(add(&sp, fragment("C1", 1, 2, "{\"a\": 1}"), false, NULL, &done), MC_EINVAL);
    /* Another event's count. */
    assert_int_equal(add(&sp, fragment("C1", 1, 2, "{\"a\": 1}"), false, NULL, &done), 0);
    assert_int_equal(add(&sp, fragment("C2", 2, 3, "{\"a\": 1}"), false, NULL, &done), MC_EINVAL);
    /* Bad numbers and too many fragments. */
    assert_int_equal(add(&sp, fragment("D", 0, 2, "{}"), false, NULL, &done), MC_EINVAL);
    assert_int_equal(add(&sp, fragment("D", 3, 2, "{}"), false, NULL, &done), MC_EINVAL);
    assert_int_equal(add(&sp, fragment("D", 1, MC__SPLIT_MAX_FRAGMENTS + 1, "{}"), false, NULL,
                         &done),
                     MC_ELIMIT);
    bson_t *nosplit = bson_new_from_json((const uint8_t *)"{\"splitEvent\": {\"of\": 2}}", -1, NULL);
    assert_int_equal(add(&sp, nosplit, false, NULL, &done), MC_EINVAL);
    /* A reset mid-event (a reopen) forgets it; a fresh event then works. */
    assert_int_equal(add(&sp, fragment("E1", 1, 2, "{\"a\": 1}"), false, NULL, &done), 0);
    mc__split_reset(&sp);
    assert_int_equal(add(&sp, fragment("F1", 1, 1, "{\"a\": 1}"), false, NULL, &done), 0);
    assert_true(done);
    size_t bytes;
    bson_t *one = mc__split_take(&sp, &bytes);
    assert_non_null(one);
    bson_destroy(one);
    assert_null(mc__split_take(&sp, &bytes)); /* nothing under way */
    mc__split_reset(&sp);
}

static void test_is_fragment(void **state)
{
    (void)state;
    bson_t *f = fragment("A", 1, 1, "{}");
    assert_true(mc__split_is_fragment(f));
    bson_destroy(f);
    bson_t *e = bson_new_from_json((const uint8_t *)"{\"_id\": {\"_data\": \"A\"}, "
                                                    "\"splitEvent\": 1}", -1, NULL);
    assert_false(mc__split_is_fragment(e));
    bson_destroy(e);
}

static void test_token_in_the_too_large_message(void **state)
{
    (void)state;
    char data[64];
    size_t size = 0;
    const char *real = "Executor error during getMore :: caused by :: BSONObj size: 31457635 "
                       "(0x1E00063) is invalid. Size must be between 0 and 16793600(16MB) First "
                       "element: _id: { _data: \"8265A1B2C3000000012B022C0100296E5A1004\" }";
    assert_true(mc__split_too_large_token(real, data, sizeof(data), &size));
    assert_string_equal(data, "8265A1B2C3000000012B022C0100296E5A1004");
    assert_int_equal(size, 31457635);
    /* Cut short by the server ("..."), too long for the buffer, moved _id, no size. */
    assert_false(mc__split_too_large_token("BSONObj size: 5 First element: _id: { _data: "
                                           "\"8265A1...\" }",
                                           data, sizeof(data), &size));
    assert_int_equal(size, 5);
    assert_false(mc__split_too_large_token(real, data, 10, &size));
    assert_false(mc__split_too_large_token("BSONObj size: 9 First element: operationType: "
                                           "\"update\"",
                                           data, sizeof(data), &size));
    assert_false(mc__split_too_large_token("First element: _id: { _data: \"\" }", data,
                                           sizeof(data), &size));
    assert_int_equal(size, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reassembles_in_the_usual_order),
        cmocka_unit_test(test_thin_keeps_what_a_notice_needs),
        cmocka_unit_test(test_fragments_that_do_not_add_up),
        cmocka_unit_test(test_is_fragment),
        cmocka_unit_test(test_token_in_the_too_large_message),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
