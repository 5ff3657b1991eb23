/*
 * test_summary.c: `summary` templates (src/lib/summary.c): parsing and its refusals, how each
 * BSON type is written, missing fields, literal braces, the first matching alternative, the
 * length limit at a character boundary, invalid UTF-8, and the summary of each view of an
 * event in the compact message (the `entered` view never renders from the pre-image; a `left`
 * notice has none). Main thread only.
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
#include "summary.h"
#include "test_json.h"

/* A summary of one alternative (`when` may be NULL). */
static mc__summary_t *one(const char *text, const char *when)
{
    mc_summary_rule_t rule = {.text = (char *)text, .when = when ? json(when) : NULL};
    mc_summary_config_t cfg = {.rules = &rule, .n_rules = 1};
    mc_error_t err = {0};
    mc__summary_t *s = mc__summary_new(&cfg, &err);
    if (rule.when) {
        bson_destroy(rule.when);
    }
    if (!s) {
        fail_msg("summary %s: %s", text, err.message);
    }
    return s;
}

/* The line `text` renders for the document `doc_json`; "<none>" when none. */
static const char *render(const char *text, const char *doc_json)
{
    static char out[MC__SUMMARY_MAX + 1];
    mc__summary_t *s = one(text, NULL);
    bson_t *doc = json(doc_json);
    int n = mc__summary_render(s, doc, out, sizeof(out));
    bson_destroy(doc);
    mc__summary_destroy(s);
    if (n < 0) {
        return "<none>";
    }
    assert_int_equal((size_t)n, strlen(out));
    return out;
}

static void test_values(void **state)
{
    (void)state;
    const char *doc =
        "{\"s\":\"caf\\u00e9\",\"i\":{\"$numberInt\":\"-7\"},\"l\":{\"$numberLong\":"
        "\"9007199254740993\"},"
        "\"d\":{\"$numberDouble\":\"5.0\"},\"f\":0.1,\"big\":1e300,\"nan\":{\"$numberDouble\":"
        "\"NaN\"},"
        "\"dec\":{\"$numberDecimal\":\"1.50\"},\"t\":true,\"n\":null,"
        "\"o\":{\"$oid\":\"64a7f2d1aabbccddeeff0099\"},"
        "\"date\":{\"$date\":{\"$numberLong\":\"1688728273456\"}},"
        "\"old\":{\"$date\":{\"$numberLong\":\"-1000\"}},"
        "\"sub\":{\"a\":[1,\"x\"]},\"arr\":[{\"b\":2},{\"b\":3}],"
        "\"ref\":{\"$ref\":\"users\",\"$id\":{\"$oid\":\"64a7f2d1aabbccddeeff0011\"}}}";
    assert_string_equal(render("{s}|{i}|{l}|{d}|{f}|{big}|{nan}|{dec}|{t}|{n}", doc),
                        "caf\xc3\xa9|-7|9007199254740993|5|0.1|1e+300|NaN|1.50|true|null");
    assert_string_equal(render("{o} {date} {old}", doc),
                        "64a7f2d1aabbccddeeff0099 2023-07-07T11:11:13.456Z 1969-12-31T23:59:59Z");
    assert_string_equal(render("{sub}", doc), "{\"a\":[1,\"x\"]}");
    assert_string_equal(render("{arr.1.b} {sub.a.1} {ref.$id}", doc),
                        "3 x 64a7f2d1aabbccddeeff0011");
    /* A missing field writes nothing; literal braces; text only. */
    assert_string_equal(render("[{missing}] {{x}} }}{{", doc), "[] {x} }{");
    assert_string_equal(render("plain", doc), "plain");
    assert_string_equal(render("", doc), "");
}

static void test_template_errors(void **state)
{
    (void)state;
    char msg[200];
    assert_true(mc__summary_template_check("{a.b} and {{c}}", msg, sizeof(msg)));
    assert_false(mc__summary_template_check("x {a", msg, sizeof(msg)));
    assert_string_equal(msg, "unclosed '{' at character 3 (write {{ for a literal brace)");
    assert_false(mc__summary_template_check("x } y", msg, sizeof(msg)));
    assert_false(mc__summary_template_check("{}", msg, sizeof(msg)));
    assert_false(mc__summary_template_check("{.a}", msg, sizeof(msg)));
    assert_false(mc__summary_template_check("{a.$b}", msg, sizeof(msg)));
    assert_false(mc__summary_template_check("{a{b}", msg, sizeof(msg)));
    assert_true(mc__summary_template_check("{a.$id} {a.$ref} {a.$db}", msg, sizeof(msg)));
    char many[4096] = "";
    for (int i = 0; i < MC__SUMMARY_MAX_FIELDS + 1; i++) {
        strcat(many, "{a}");
    }
    assert_false(mc__summary_template_check(many, msg, sizeof(msg)));
    assert_non_null(strstr(msg, "at most 64 fields"));
    char *huge = malloc(MC__SUMMARY_TEMPLATE_MAX + 2);
    memset(huge, 'x', MC__SUMMARY_TEMPLATE_MAX + 1);
    huge[MC__SUMMARY_TEMPLATE_MAX + 1] = '\0';
    assert_false(mc__summary_template_check(huge, msg, sizeof(msg)));
    free(huge);
    mc_summary_rule_t bad = {.text = (char *)"{"};
    mc_summary_config_t cfg = {.rules = &bad, .n_rules = 1};
    mc_error_t err = {0};
    assert_null(mc__summary_new(&cfg, &err));
    assert_non_null(strstr(err.message, "unclosed"));
    cfg.n_rules = 0;
    assert_null(mc__summary_new(&cfg, NULL));
}

static void test_limits_and_utf8(void **state)
{
    (void)state;
    /* Cut at a character boundary, with an ellipsis, within the limit. */
    char doc[8192];
    char big[3000];
    for (size_t i = 0; i + 2 < sizeof(big); i += 2) {
        big[i] = '\xc3';
        big[i + 1] = '\xa9';
    }
    big[sizeof(big) - 2] = '\0';
    snprintf(doc, sizeof(doc), "{\"s\":\"%s\"}", big);
    const char *out = render("x{s}", doc);
    size_t n = strlen(out);
    assert_true(n <= MC__SUMMARY_MAX);
    assert_string_equal(out + n - 3, "\xE2\x80\xA6");
    assert_true(bson_utf8_validate(out, n, false));
    /* Invalid UTF-8 in a document becomes U+FFFD. */
    bson_t d = BSON_INITIALIZER;
    bson_append_utf8(&d, "s", 1,
                     "a\xff"
                     "b",
                     3);
    mc__summary_t *s = one("{s}", NULL);
    char buf[MC__SUMMARY_MAX + 1];
    assert_int_equal(mc__summary_render(s, &d, buf, sizeof(buf)), 5);
    assert_string_equal(buf, "a\xEF\xBF\xBD"
                             "b");
    mc__summary_destroy(s);
    bson_destroy(&d);
    /* One line: control characters (NUL included) become spaces. */
    bson_init(&d);
    bson_append_utf8(&d, "s", 1, "a\nb\0c\td", 7);
    s = one("{s}", NULL);
    assert_int_equal(mc__summary_render(s, &d, buf, sizeof(buf)), 7);
    assert_string_equal(buf, "a b c d");
    mc__summary_destroy(s);
    bson_destroy(&d);
}

static void test_alternatives(void **state)
{
    (void)state;
    /* A delete has no fullDocument, and in $expr two missing fields compare equal: the
     * operationType condition keeps deletes out of the low-stock line. */
    bson_t *low = json("{\"operationType\":{\"$in\":[\"insert\",\"update\",\"replace\"]},"
                       "\"$expr\":{\"$lte\":[\"$fullDocument.qty\",\"$fullDocument.reorder\"]}}");
    bson_t *del = json("{\"operationType\":\"delete\"}");
    mc_summary_rule_t rules[] = {
        {.when = low, .text = (char *)"Stock low, please restock {fullDocument.name}"},
        {.when = del, .text = (char *)"{documentKey._id} removed"},
    };
    mc_summary_config_t cfg = {.rules = rules, .n_rules = 2};
    mc__summary_t *s = mc__summary_new(&cfg, NULL);
    assert_non_null(s);
    char out[MC__SUMMARY_MAX + 1];
    bson_t *a = json("{\"operationType\":\"update\",\"fullDocument\":{\"name\":\"pen\",\"qty\":2,"
                     "\"reorder\":2}}");
    bson_t *b = json("{\"operationType\":\"update\",\"fullDocument\":{\"name\":\"pen\",\"qty\":3,"
                     "\"reorder\":2}}");
    bson_t *c = json("{\"operationType\":\"delete\",\"documentKey\":{\"_id\":7}}");
    assert_true(mc__summary_render(s, a, out, sizeof(out)) > 0);
    assert_string_equal(out, "Stock low, please restock pen");
    assert_int_equal(mc__summary_render(s, b, out, sizeof(out)), -1);
    assert_true(mc__summary_render(s, c, out, sizeof(out)) > 0);
    assert_string_equal(out, "7 removed");
    mc__summary_destroy(s);
    bson_destroy(a);
    bson_destroy(b);
    bson_destroy(c);
    bson_destroy(low);
    bson_destroy(del);
}

/* An update that moves a document from alice to bob, with both images. */
static mc_event_t *moved(void)
{
    bson_t *change = json(
        "{\"_id\":{\"_data\":\"8200000001\"},\"operationType\":\"update\","
        "\"clusterTime\":{\"$timestamp\":{\"t\":1,\"i\":1}},"
        "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":7},"
        "\"updateDescription\":{\"updatedFields\":{\"owner\":\"bob\"},\"removedFields\":[\"note\"],"
        "\"truncatedArrays\":[]},"
        "\"fullDocument\":{\"_id\":7,\"owner\":\"bob\",\"item\":\"pen\"},"
        "\"fullDocumentBeforeChange\":{\"_id\":7,\"owner\":\"alice\",\"item\":\"pen\","
        "\"note\":\"secret\"}}");
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", 1, change, "fullDocument.owner", &err);
    bson_destroy(change);
    assert_non_null(ev);
    return ev;
}

static void test_event_views(void **state)
{
    (void)state;
    mc_event_t *ev = moved();
    mc__summary_t *s = one("{fullDocument.item} now {fullDocument.owner}, was "
                           "{fullDocumentBeforeChange.owner} {fullDocumentBeforeChange.note}",
                           NULL);
    assert_int_equal(mc__event_set_summary(ev, s), 0);
    mc__summary_destroy(s); /* the event keeps its rendered lines */
    const char *full = mc_event_json(ev, NULL);
    assert_non_null(strstr(full, ",\"summary\":\"pen now bob, was alice secret\",\"change\":{"));
    /* The new owner's line is rendered from what it may see: no pre-image at all. */
    const char *entered = mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL);
    assert_non_null(strstr(entered, "\"entered\":true,\"summary\":\"pen now bob, was  \","));
    assert_null(strstr(entered, "secret"));
    assert_null(strstr(entered, "alice"));
    const char *left = mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, NULL);
    assert_string_equal(left, "{\"type\":\"left\",\"stream\":\"orders\",\"_id\":7}");
    /* A subscriber's own copy of the change keeps the view's line. */
    bson_t *mine = json("{\"_id\":{\"_data\":\"8200000001\"},\"operationType\":\"update\"}");
    size_t len = 0;
    char *own = mc_event_json_view_with_change(ev, MC_EVENT_VIEW_ENTERED, mine, &len);
    assert_string_equal(own, "{\"type\":\"change\",\"stream\":\"orders\",\"id\":\"8200000001\","
                             "\"recipient\":\"bob\",\"entered\":true,\"summary\":\"pen now bob, "
                             "was  \",\"change\":{\"operationType\":\"update\"}}");
    assert_int_equal(len, strlen(own));
    bson_free(own);
    assert_null(mc_event_json_view_with_change(ev, MC_EVENT_VIEW_LEFT, mine, NULL));
    bson_destroy(mine);
    mc_event_unref(&ev);

    /* No alternative matches: no "summary" key at all. */
    ev = moved();
    s = one("x", "{\"operationType\":\"insert\"}");
    mc__event_set_summary(ev, s);
    mc__summary_destroy(s);
    assert_null(strstr(mc_event_json(ev, NULL), "summary"));
    mc_event_unref(&ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),          cmocka_unit_test(test_template_errors),
        cmocka_unit_test(test_limits_and_utf8), cmocka_unit_test(test_alternatives),
        cmocka_unit_test(test_event_views),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
