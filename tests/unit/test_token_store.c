/*
 * test_token_store.c: the file token store: round trip of stream and (stream, sink) records
 * with their stream definition, one file per record, safe file names, crash-safe replacement
 * (a torn .tmp never wins), corrupt files and non-regular files as errors, compact records
 * (older spaced ones load); the stream definition and the recipient rules it covers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_private.h"

static char dir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/mc_test_token_store.XXXXXX");
    if (!mkdtemp(dir)) {
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d))) {
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                char p[600];
                snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
                unlink(p);
            }
        }
        closedir(d);
    }
    rmdir(dir);
    return 0;
}

static void write_text(const char *name, const char *text)
{
    char p[600];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static mc__position_t make_pos(const char *data, bool inval, uint32_t t, uint32_t i)
{
    mc__position_t p = {0};
    p.token = BCON_NEW("_data", BCON_UTF8(data));
    p.invalidate = inval;
    p.ct_t = t;
    p.ct_i = i;
    return p;
}

static void test_round_trip(void **state)
{
    (void)state;
    mc_error_t err = {0};
    mc__token_store_t *s = mc__token_store_file_new(dir, &err);
    assert_non_null(s);
    mc__record_t out = {0};
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), MC_ENOTFOUND);

    mc__position_t a = make_pos("8264AAAA", false, 1700000000, 3);
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &a, NULL, &err), 0);
    mc__position_t b = make_pos("8264BBBB", true, 1700000001, 1);
    assert_int_equal(mc__token_store_save(s, "users", NULL, &b, NULL, &err), 0);

    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, a.token));
    assert_false(out.pos.invalidate);
    assert_int_equal(out.pos.ct_t, 1700000000);
    assert_int_equal(out.pos.ct_i, 3);
    mc__record_clear(&out);
    assert_int_equal(mc__token_store_load(s, "users", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, b.token));
    assert_true(out.pos.invalidate);
    mc__record_clear(&out);

    /* Overwrite: the newest save wins, no .tmp is left behind. */
    mc__position_t c = make_pos("8264CCCC", false, 1700000002, 0);
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &c, NULL, &err), 0);
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, c.token));
    mc__record_clear(&out);
    char p[600];
    snprintf(p, sizeof(p), "%s/orders.json.tmp", dir);
    assert_int_not_equal(access(p, F_OK), 0);

    /* A new store object over the same directory sees the same data (process restart). */
    mc__token_store_destroy(s);
    s = mc__token_store_file_new(dir, &err);
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, c.token));
    mc__record_clear(&out);

    /* A position without a token is refused, not written as garbage. */
    mc__position_t none = {0};
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &none, NULL, &err), MC_EINVAL);

    mc__position_clear(&a);
    mc__position_clear(&b);
    mc__position_clear(&c);
    mc__token_store_destroy(s);
}

static void test_crash_leftovers_and_corruption(void **state)
{
    (void)state;
    mc_error_t err = {0};
    mc__token_store_t *s = mc__token_store_file_new(dir, &err);
    mc__position_t a = make_pos("GOOD", false, 10, 1);
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &a, NULL, &err), 0);

    /* A crash mid-write leaves a torn tmp file: load ignores it and keeps the last good
     * position; the next save replaces the tmp and succeeds. */
    write_text("orders.json.tmp", "{\"stream\":\"orders\",\"tok");
    mc__record_t out = {0};
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, a.token));
    mc__record_clear(&out);
    mc__position_t b = make_pos("NEWER", false, 11, 1);
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &b, NULL, &err), 0);
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, b.token));
    mc__record_clear(&out);

    /* A corrupt checkpoint is an error (never silently "start from now"). */
    write_text("broken.json", "{\"token\": {\"_data\": ");
    assert_int_equal(mc__token_store_load(s, "broken", NULL, &out, &err), MC_EIO);
    assert_non_null(strstr(err.message, "corrupt"));
    write_text("notoken.json", "{\"token\": {\"x\": 1}}");
    assert_int_equal(mc__token_store_load(s, "notoken", NULL, &out, &err), MC_EIO);
    assert_non_null(strstr(err.message, "_data"));
    assert_null(out.pos.token);

    mc__position_clear(&a);
    mc__position_clear(&b);
    mc__token_store_destroy(s);
}

static void test_file_names_stay_inside(void **state)
{
    (void)state;
    char *n = mc__token_store_file_name("../../etc/passwd", NULL);
    assert_null(strchr(n, '/'));
    assert_int_not_equal(n[0], '.');
    bson_free(n);
    n = mc__token_store_file_name("orders.v2-x_y", NULL);
    assert_string_equal(n, "orders.v2-x_y.json");
    bson_free(n);
    n = mc__token_store_file_name(".hidden", NULL);
    assert_string_equal(n, "%2Ehidden.json");
    bson_free(n);
    n = mc__token_store_file_name("a b", NULL);
    assert_string_equal(n, "a%20b.json");
    bson_free(n);

    mc_error_t err = {0};
    mc__token_store_t *s = mc__token_store_file_new(dir, &err);
    mc__position_t a = make_pos("X", false, 1, 1);
    assert_int_equal(mc__token_store_save(s, "../escape", NULL, &a, NULL, &err), 0);
    char p[600];
    snprintf(p, sizeof(p), "%s/%%2E.%%2Fescape.json", dir);
    assert_int_equal(access(p, F_OK), 0);
    mc__record_t out = {0};
    assert_int_equal(mc__token_store_load(s, "../escape", NULL, &out, &err), 0);
    mc__record_clear(&out);
    mc__position_clear(&a);
    mc__token_store_destroy(s);
}

static void test_directory_handling(void **state)
{
    (void)state;
    mc_error_t err = {0};
    char nested[400];
    snprintf(nested, sizeof(nested), "%s/a/b", dir);
    mc__token_store_t *s = mc__token_store_file_new(nested, &err);
    assert_non_null(s); /* created with parents */
    mc__position_t a = make_pos("X", false, 1, 1);
    assert_int_equal(mc__token_store_save(s, "s", NULL, &a, NULL, &err), 0);
    mc__token_store_destroy(s);
    char p[600];
    snprintf(p, sizeof(p), "%s/s.json", nested);
    unlink(p);
    rmdir(nested);
    snprintf(p, sizeof(p), "%s/a", dir);
    rmdir(p);

    /* A path through a regular file is an I/O error with the path in the message. */
    write_text("plainfile", "x");
    char bad[400];
    snprintf(bad, sizeof(bad), "%s/plainfile/sub", dir);
    assert_null(mc__token_store_file_new(bad, &err));
    assert_int_equal(err.code, MC_EIO);
    assert_non_null(strstr(err.message, "plainfile"));
    assert_null(mc__token_store_file_new("", &err));
    assert_int_equal(err.code, MC_ECONFIG);
    mc__position_clear(&a);
}

/* Per-sink records live beside the stream's, and carry the definition that wrote them. */
static void test_sink_records_and_definition(void **state)
{
    (void)state;
    mc_error_t err = {0};
    mc__token_store_t *s = mc__token_store_file_new(dir, &err);
    mc__position_t a = make_pos("8264AAAA", false, 1700000000, 3);
    mc__position_t b = make_pos("8264BBBB", false, 1700000005, 1);
    bson_t *def = BCON_NEW("ns", BCON_UTF8("shop.orders"), "fingerprint", BCON_UTF8("0123abcd"));
    assert_int_equal(mc__token_store_save(s, "orders", NULL, &a, def, &err), 0);
    assert_int_equal(mc__token_store_save(s, "orders", "hook", &b, def, &err), 0);
    char p[600];
    snprintf(p, sizeof(p), "%s/orders@hook.json", dir);
    assert_int_equal(access(p, F_OK), 0);

    mc__record_t out = {0};
    assert_int_equal(mc__token_store_load(s, "orders", "hook", &out, &err), 0);
    assert_true(bson_equal(out.pos.token, b.token));
    assert_non_null(out.definition);
    assert_true(bson_equal(out.definition, def));
    assert_non_null(strstr(out.where, "orders@hook.json"));
    mc__record_clear(&out);
    assert_int_equal(mc__token_store_load(s, "orders", NULL, &out, &err), 0);
    assert_true(bson_equal(out.pos.token, a.token));
    mc__record_clear(&out);
    /* Another sink of the same stream has no record of its own. */
    assert_int_equal(mc__token_store_load(s, "orders", "other", &out, &err), MC_ENOTFOUND);
    assert_null(out.definition);

    /* '@' inside a name is escaped: stream "a@b" never collides with stream "a", sink "b". */
    char *n = mc__token_store_file_name("a@b", NULL);
    assert_string_equal(n, "a%40b.json");
    bson_free(n);
    n = mc__token_store_file_name("a", "b@c");
    assert_string_equal(n, "a@b%40c.json");
    bson_free(n);

    /* A record written before definitions existed loads without one. */
    write_text("legacy.json", "{\"stream\":\"legacy\",\"token\":{\"_data\":\"82AA\"}}");
    assert_int_equal(mc__token_store_load(s, "legacy", NULL, &out, &err), 0);
    assert_null(out.definition);
    mc__record_clear(&out);

    /* Records are written as one compact line; libbson's spaced form (older files) loads. */
    snprintf(p, sizeof(p), "%s/orders@hook.json", dir);
    FILE *fp = fopen(p, "r");
    assert_non_null(fp);
    char text[2048] = {0};
    assert_true(fread(text, 1, sizeof(text) - 1, fp) > 0);
    fclose(fp);
    assert_non_null(strstr(text, "{\"stream\":\"orders\",\"sink\":\"hook\",\"token\":{"));
    assert_null(strstr(text, " : "));
    assert_ptr_equal(strchr(text, '\n'), text + strlen(text) - 1);
    write_text("spaced.json", "{ \"stream\" : \"spaced\", \"token\" : { \"_data\" : \"82AB\" } }\n");
    assert_int_equal(mc__token_store_load(s, "spaced", NULL, &out, &err), 0);
    assert_string_equal(mc__token_data(out.pos.token), "82AB");
    mc__record_clear(&out);

    /* A FIFO in place of a record is refused without blocking in open(). */
    snprintf(p, sizeof(p), "%s/fifo.json", dir);
    assert_int_equal(mkfifo(p, 0600), 0);
    assert_int_equal(mc__token_store_load(s, "fifo", NULL, &out, &err), MC_EIO);
    assert_non_null(strstr(err.message, "regular"));

    bson_destroy(def);
    mc__position_clear(&a);
    mc__position_clear(&b);
    mc__token_store_destroy(s);
}

/* A stream's definition covers its per-collection recipient rules (a change refuses the
 * record and names them), never its summaries. */
static void test_definition_covers_recipient_rules(void **state)
{
    (void)state;
    mc_recipient_lookup_t lk = {.db = "shop", .collection = "businesses", .field = "_id",
                                .recipient = "owner.$id"};
    mc_summary_rule_t sum_a = {.text = "{fullDocument.name}"}, sum_b = {.text = "changed"};
    mc_recipient_rule_t rules[2] = {
        {.collection = "items", .path = "fullDocument.owned_by", .lookup = &lk,
         .summary = {.rules = &sum_a, .n_rules = 1}},
        {.collection = "orders", .path = "fullDocument.creator_id"}};
    mc_stream_config_t cfg = {.name = "s", .db = "shop", .by_collection = rules,
                              .n_by_collection = 2};
    mc__stream_t a = {.cfg = &cfg}, b = {.cfg = &cfg}, c = {.cfg = &cfg};
    bson_init(&a.server_pipeline);
    bson_init(&b.server_pipeline);
    bson_init(&c.server_pipeline);
    mc_error_t err = {0};
    assert_int_equal(mc__ledger_definition(&a, &err), 0);
    /* Another summary: the same definition. */
    rules[0].summary.rules = &sum_b;
    assert_int_equal(mc__ledger_definition(&b, &err), 0);
    assert_true(bson_equal(a.definition, b.definition));
    /* Another path in one rule: refused, and the message says what changed. */
    rules[1].path = "fullDocument.buyer_id";
    assert_int_equal(mc__ledger_definition(&c, &err), 0);
    assert_false(bson_equal(a.definition, c.definition));
    mc__record_t rec = {.pos = make_pos("82AA", false, 0, 0), .definition = a.definition};
    snprintf(rec.where, sizeof(rec.where), "dir/s.json");
    assert_int_equal(mc__ledger_check_record("s", c.definition, &rec, 0, 0, &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "recipient.by_collection changed"));
    assert_int_equal(mc__ledger_check_record("s", b.definition, &rec, 0, 0, &err), 0);
    mc__position_clear(&rec.pos);
    bson_destroy(a.definition);
    bson_destroy(b.definition);
    bson_destroy(c.definition);
    bson_destroy(&a.server_pipeline);
    bson_destroy(&b.server_pipeline);
    bson_destroy(&c.server_pipeline);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_crash_leftovers_and_corruption, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file_names_stay_inside, setup, teardown),
        cmocka_unit_test_setup_teardown(test_directory_handling, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sink_records_and_definition, setup, teardown),
        cmocka_unit_test_setup_teardown(test_definition_covers_recipient_rules, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
