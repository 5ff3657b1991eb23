/*
 * test_config.c: unit tests of the configuration loader (src/lib/config.c, config_yaml.c).
 *
 * Single-threaded cmocka tests. They set environment variables named MC_TEST_* only, and every
 * broken configuration asserts the exact "FILE:LINE:COL: message" a user would see from
 * `mongocast check`. Run under ASan to catch leaks on the error paths.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config_internal.h"
#include "mongocast/config.h"

/* A file of the source tree, located from this file's own path. */
static void source_path(char *out, size_t size, const char *rel)
{
    const char *self = __FILE__;
    const char *tail = strstr(self, "tests/unit/test_config.c");
    int prefix = tail ? (int)(tail - self) : 0;
    snprintf(out, size, "%.*s%s", prefix, self, rel);
}

static mc_config_t *load(const char *yaml)
{
    mc_error_t err;
    mc_config_t *cfg = mc_config_load_string(yaml, strlen(yaml), "t.yaml", &err);
    if (!cfg) {
        print_error("unexpected error: %s\n", err.message);
    }
    assert_non_null(cfg);
    return cfg;
}

static void expect_error(const char *yaml, const char *message)
{
    mc_error_t err;
    mc_config_t *cfg = mc_config_load_string(yaml, strlen(yaml), "t.yaml", &err);
    if (cfg) {
        mc_config_destroy(cfg);
        fail_msg("expected error '%s' but the config loaded", message);
    }
    assert_int_equal(err.code, MC_ECONFIG);
    assert_string_equal(err.message, message);
}

/* The JSON of a BSON value, for compact comparisons. */
static void assert_json(const bson_t *doc, const char *want)
{
    char *json = bson_as_relaxed_extended_json(doc, NULL);
    assert_string_equal(json, want);
    bson_free(json);
}

static const char full_config[] =
    "# every option set to a non-default value\n"
    "mongodb:\n"
    "  uri: mongodb://db1.example:27017,db2.example:27017/?replicaSet=prod\n"
    "checkpoint:\n"
    "  store: mongodb\n"
    "  path: /var/lib/mongocast\n"
    "  db: ops\n"
    "  collection: positions\n"
    "  interval_ms: 250\n"
    "server:\n"
    "  listen: '[::1]:9090'\n"
    "  allowed_origins: [\"https://app.example\", https://admin.example]\n"
    "  max_connections: 500\n"
    "  max_send_queue_bytes: 0x20000\n"
    "  max_frame_bytes: 4096\n"
    "auth:\n"
    "  jwt:\n"
    "    algorithm: RS256\n"
    "    public_key_file: /etc/mongocast/jwt.pem\n"
    "    identity_claim: uid\n"
    "    admin_role: mongocast:all\n"
    "    issuer: https://issuer.example\n"
    "    audience: feeds\n"
    "log_level: debug\n"
    "streams:\n"
    "  orders:\n"
    "    db: shop\n"
    "    collection: orders\n"
    "    pipeline:\n"
    "      - $match: {operationType: {$in: [insert, update]}, fullDocument.owner: {$var: "
    "owner}}\n"
    "      - $project:\n"
    "          fullDocument: 1\n"
    "          ratio: 0.5\n"
    "          flag: true\n"
    "          none: null\n"
    "          quoted: \"42\"\n"
    "          big: 5000000000\n"
    "          neg: -7\n"
    "    full_document: required\n"
    "    full_document_before_change: required\n"
    "    recipient:\n"
    "      path: fullDocument.business_id\n"
    "      lookup: {db: shop, collection: businesses, field: code, recipient: owner, "
    "cache_size: 50}\n"
    "    public: true\n"
    "    client_filters: true\n"
    "    history: 0\n"
    "    on_history_lost: restart\n"
    "    on_oversize: skip\n"
    "    batch_size: 100\n"
    "    max_await_time_ms: 60000\n"
    "  everything: {}\n"
    "sinks:\n"
    "  - name: out\n"
    "    type: stdout\n"
    "    streams: [orders]\n"
    "    pretty: true\n"
    "  - name: cache\n"
    "    type: redis\n"
    "    url: redis://127.0.0.1:6379\n"
    "    mode: streams\n"
    "    maxlen: 1000\n"
    "    headers: {x: [1, two]}\n";

static void test_full_config(void **state)
{
    mc_config_t *cfg = load(full_config);

    assert_string_equal(cfg->path, "t.yaml");
    assert_string_equal(cfg->mongodb_uri,
                        "mongodb://db1.example:27017,db2.example:27017/?replicaSet=prod");
    assert_int_equal(cfg->checkpoint.store, MC_CHECKPOINT_MONGODB);
    assert_string_equal(cfg->checkpoint.path, "/var/lib/mongocast");
    assert_string_equal(cfg->checkpoint.db, "ops");
    assert_string_equal(cfg->checkpoint.collection, "positions");
    assert_int_equal(cfg->checkpoint.interval_ms, 250);
    assert_string_equal(cfg->server.listen, "[::1]:9090");
    assert_int_equal(cfg->server.n_allowed_origins, 2);
    assert_string_equal(cfg->server.allowed_origins[0], "https://app.example");
    assert_string_equal(cfg->server.allowed_origins[1], "https://admin.example");
    assert_int_equal(cfg->server.max_connections, 500);
    assert_int_equal(cfg->server.max_send_queue_bytes, 0x20000);
    assert_int_equal(cfg->server.max_frame_bytes, 4096);
    assert_true(cfg->auth.enabled);
    assert_string_equal(cfg->auth.algorithm, "RS256");
    assert_null(cfg->auth.secret);
    assert_string_equal(cfg->auth.public_key_file, "/etc/mongocast/jwt.pem");
    assert_string_equal(cfg->auth.identity_claim, "uid");
    assert_string_equal(cfg->auth.admin_role, "mongocast:all");
    assert_string_equal(cfg->auth.issuer, "https://issuer.example");
    assert_string_equal(cfg->auth.audience, "feeds");
    assert_string_equal(cfg->log_level, "debug");

    assert_int_equal(cfg->n_streams, 2);
    const mc_stream_config_t *s = mc_config_stream(cfg, "orders");
    assert_ptr_equal(s, &cfg->streams[0]);
    assert_string_equal(s->name, "orders");
    assert_string_equal(s->db, "shop");
    assert_string_equal(s->collection, "orders");
    assert_json(s->pipeline,
                "{ \"0\" : { \"$match\" : { \"operationType\" : { \"$in\" : [ \"insert\", "
                "\"update\" ] }, \"fullDocument.owner\" : { \"$var\" : \"owner\" } } }, \"1\" : "
                "{ \"$project\" : { \"fullDocument\" : 1, \"ratio\" : 0.5, \"flag\" : true, "
                "\"none\" : null, \"quoted\" : \"42\", \"big\" : 5000000000, \"neg\" : -7 } } }");
    /* YAML typing must give BSON types, not just JSON look-alikes. */
    bson_iter_t it;
    assert_true(bson_iter_init(&it, s->pipeline));
    assert_true(bson_iter_find_descendant(&it, "1.$project.big", &it));
    assert_int_equal(bson_iter_type(&it), BSON_TYPE_INT64);
    assert_true(bson_iter_init(&it, s->pipeline));
    assert_true(bson_iter_find_descendant(&it, "1.$project.fullDocument", &it));
    assert_int_equal(bson_iter_type(&it), BSON_TYPE_INT32);
    assert_int_equal(s->full_document, MC_FULL_DOCUMENT_REQUIRED);
    assert_int_equal(s->full_document_before_change, MC_BEFORE_CHANGE_REQUIRED);
    assert_string_equal(s->recipient, "fullDocument.business_id");
    assert_non_null(s->lookup);
    assert_string_equal(s->lookup->db, "shop");
    assert_string_equal(s->lookup->collection, "businesses");
    assert_string_equal(s->lookup->field, "code");
    assert_string_equal(s->lookup->recipient, "owner");
    assert_int_equal(s->lookup->cache_size, 50);
    assert_true(s->is_public);
    assert_true(s->client_filters);
    assert_int_equal(s->history, 0);
    assert_int_equal(s->on_history_lost, MC_ON_HISTORY_LOST_RESTART);
    assert_int_equal(s->on_oversize, MC_ON_OVERSIZE_SKIP);
    assert_int_equal(s->batch_size, 100);
    assert_int_equal(s->max_await_time_ms, 60000);
    assert_int_equal(s->pos.line, 26);
    assert_int_equal(s->pos.col, 3);

    /* The second stream has every stream default. */
    s = mc_config_stream(cfg, "everything");
    assert_non_null(s);
    assert_null(s->db);
    assert_null(s->collection);
    assert_non_null(s->pipeline);
    assert_int_equal(bson_count_keys(s->pipeline), 0);
    assert_int_equal(s->full_document, MC_FULL_DOCUMENT_DEFAULT);
    assert_int_equal(s->full_document_before_change, MC_BEFORE_CHANGE_OFF);
    assert_null(s->recipient);
    assert_null(s->lookup);
    assert_false(s->is_public);
    assert_false(s->client_filters);
    assert_int_equal(s->history, 10000);
    assert_int_equal(s->on_history_lost, MC_ON_HISTORY_LOST_FAIL);
    assert_int_equal(s->on_oversize, MC_ON_OVERSIZE_SPLIT);
    assert_int_equal(s->batch_size, 0);
    assert_int_equal(s->max_await_time_ms, 1000);
    assert_null(mc_config_stream(cfg, "nope"));

    assert_int_equal(cfg->n_sinks, 2);
    assert_string_equal(cfg->sinks[0].name, "out");
    assert_string_equal(cfg->sinks[0].type, "stdout");
    assert_int_equal(cfg->sinks[0].n_streams, 1);
    assert_string_equal(cfg->sinks[0].streams[0], "orders");
    assert_json(cfg->sinks[0].options, "{ \"pretty\" : true }");
    assert_int_equal(cfg->sinks[0].pos.line, 53);
    assert_int_equal(cfg->sinks[0].pos.col, 5);
    assert_string_equal(cfg->sinks[1].name, "cache");
    assert_string_equal(cfg->sinks[1].type, "redis");
    assert_int_equal(cfg->sinks[1].n_streams, 0);
    assert_null(cfg->sinks[1].streams);
    assert_json(cfg->sinks[1].options,
                "{ \"url\" : \"redis://127.0.0.1:6379\", \"mode\" : \"streams\", \"maxlen\" : "
                "1000, \"headers\" : { \"x\" : [ 1, \"two\" ] } }");
    mc_config_destroy(cfg);
}

static void test_defaults(void **state)
{
    unsetenv("MONGODB_URI");
    mc_config_t *cfg = load("streams:\n  all: {}\n");
    assert_string_equal(cfg->mongodb_uri, "mongodb://127.0.0.1:27017/?replicaSet=rs0");
    assert_int_equal(cfg->checkpoint.store, MC_CHECKPOINT_FILE);
    assert_string_equal(cfg->checkpoint.path, "./data/checkpoints");
    assert_string_equal(cfg->checkpoint.db, "mongocast");
    assert_string_equal(cfg->checkpoint.collection, "checkpoints");
    assert_int_equal(cfg->checkpoint.interval_ms, 1000);
    assert_string_equal(cfg->server.listen, "127.0.0.1:8080");
    assert_int_equal(cfg->server.n_allowed_origins, 0);
    assert_null(cfg->server.allowed_origins);
    assert_int_equal(cfg->server.max_connections, 10000);
    assert_int_equal(cfg->server.max_send_queue_bytes, 1048576);
    assert_int_equal(cfg->server.max_frame_bytes, 65536);
    assert_int_equal(cfg->server.max_message_bytes, 16777216);
    assert_int_equal(cfg->server.filter_budget_us, 2000);
    assert_int_equal(cfg->server.max_connections_per_address, 0);
    assert_false(cfg->server.tls.enabled);
    assert_null(cfg->server.tls.cert_file);
    assert_false(cfg->auth.enabled);
    assert_null(cfg->auth.algorithm);
    assert_string_equal(cfg->auth.identity_claim, "sub");
    assert_string_equal(cfg->log_level, "info");
    assert_int_equal(cfg->n_sinks, 0);
    assert_int_equal(cfg->n_streams, 1);
    mc_config_destroy(cfg);

    /* Without mongodb.uri, $MONGODB_URI is the default. */
    setenv("MONGODB_URI", "mongodb://10.0.0.5:27017/?replicaSet=x", 1);
    cfg = load("auth:\n  # jwt commented out\nstreams: {a: {}}\nsinks:\n");
    assert_string_equal(cfg->mongodb_uri, "mongodb://10.0.0.5:27017/?replicaSet=x");
    assert_false(cfg->auth.enabled);
    mc_config_destroy(cfg);
    unsetenv("MONGODB_URI");

    /* The plain recipient form and HS256. */
    cfg = load("auth: {jwt: {algorithm: HS256, secret: 'k'}}\n"
               "streams:\n  s: {recipient: fullDocument.owner_id}\n");
    assert_true(cfg->auth.enabled);
    assert_string_equal(cfg->auth.secret, "k");
    assert_null(cfg->auth.public_key_file);
    assert_string_equal(cfg->streams[0].recipient, "fullDocument.owner_id");
    assert_null(cfg->streams[0].lookup);
    mc_config_destroy(cfg);

    /* Lookup defaults. */
    cfg = load("streams:\n  s:\n    recipient: {path: a.b, lookup: {db: d, collection: c, "
               "recipient: owner}}\n");
    assert_string_equal(cfg->streams[0].lookup->field, "_id");
    assert_int_equal(cfg->streams[0].lookup->cache_size, 10000);
    mc_config_destroy(cfg);
}

static void test_env_interpolation(void **state)
{
    setenv("MC_TEST_DB", "shop", 1);
    setenv("MC_TEST_HISTORY", "77", 1);
    setenv("MC_TEST_PUBLIC", "true", 1);
    setenv("MC_TEST_EMPTY", "", 1);
    unsetenv("MC_TEST_UNSET");
    mc_config_t *cfg = load("streams:\n"
                            "  s:\n"
                            "    db: ${MC_TEST_DB}\n"
                            "    collection: pre_${MC_TEST_DB}_${MC_TEST_UNSET:-orders}\n"
                            "    history: ${MC_TEST_HISTORY}\n"
                            "    public: ${MC_TEST_PUBLIC}\n"
                            "    recipient: ${MC_TEST_EMPTY:-fullDocument.x}\n"
                            "    pipeline:\n"
                            "      - $match: {price: {$$gt: 5}, tag: \"$${MC_TEST_DB}\", "
                            "v: \"${MC_TEST_HISTORY}\", d: $fullDocument.a, e: cost$}\n"
                            "sinks:\n"
                            "  - {name: o, type: stdout, prefix: '${MC_TEST_EMPTY}|$$|${MC_TEST_"
                            "UNSET:-}|'}\n");
    const mc_stream_config_t *s = &cfg->streams[0];
    assert_string_equal(s->db, "shop");
    assert_string_equal(s->collection, "pre_shop_orders");
    assert_int_equal(s->history, 77);                    /* substituted before typing: an integer */
    assert_true(s->is_public);                           /* ... and a boolean */
    assert_string_equal(s->recipient, "fullDocument.x"); /* empty counts as unset for :- */
    /* Keys are never substituted; $${ is a literal ${ and any other $$ stays as written; a
     * quoted substitution stays a string. */
    assert_json(s->pipeline, "{ \"0\" : { \"$match\" : { \"price\" : { \"$$gt\" : 5 }, \"tag\" : "
                             "\"${MC_TEST_DB}\", \"v\" : \"77\", \"d\" : \"$fullDocument.a\", "
                             "\"e\" : \"cost$\" } } }");
    assert_json(cfg->sinks[0].options, "{ \"prefix\" : \"|$$||\" }");
    mc_config_destroy(cfg);

    /* Positions of substitution errors are those of the scalar holding them. */
    expect_error("streams:\n  s:\n    db: x${MC_TEST_UNSET}\n",
                 "t.yaml:3:9: environment variable MC_TEST_UNSET is not set");
    expect_error("streams:\n  s: {db: \"${MC_TEST_DB\"}\n",
                 "t.yaml:2:11: unterminated '${' (a literal '${' is written '$${')");
    expect_error("streams:\n  s:\n    db: ${1X}\n",
                 "t.yaml:3:9: invalid variable reference '${1X}' (expected ${NAME} or "
                 "${NAME:-default})");
    expect_error("streams:\n  s:\n    db: ${A-b}\n",
                 "t.yaml:3:9: invalid variable reference '${A-b}' (expected ${NAME} or "
                 "${NAME:-default})");
    /* An empty plain value after substitution is null, hence not a string. */
    expect_error("streams:\n  s: {db: '${MC_TEST_EMPTY}'}\n", "t.yaml:2:11: db must not be empty");
    expect_error("streams:\n  s:\n    db: ${MC_TEST_EMPTY}\n",
                 "t.yaml:3:9: expected a string, got an empty value");
    setenv("MC_TEST_HISTORY", "lots", 1);
    expect_error("streams:\n  s:\n    history: ${MC_TEST_HISTORY}\n",
                 "t.yaml:3:14: expected an integer, got 'lots'");
    setenv("MC_TEST_BADUTF8", "\xff\xfe", 1);
    expect_error("streams:\n  s:\n    db: ${MC_TEST_BADUTF8}\n",
                 "t.yaml:3:9: value is not valid UTF-8 after variable substitution");
}

static void test_interpolate_direct(void **state)
{
    char *out;
    size_t len;
    char msg[200];
    setenv("MC_TEST_V", "val", 1);
    unsetenv("MC_TEST_UNSET");
    static const struct {
        const char *in;
        const char *out;
    } ok[] = {
        {"", ""},
        {"plain", "plain"},
        {"${MC_TEST_V}", "val"},
        {"a${MC_TEST_V}b${MC_TEST_V}", "avalbval"},
        {"${MC_TEST_UNSET:-d:e-f}", "d:e-f"},
        {"${MC_TEST_UNSET:-}", ""},
        {"${MC_TEST_V:-d}", "val"},
        {"$$", "$$"},
        {"$$ROOT", "$$ROOT"},
        {"$$$$ROOT", "$$$$ROOT"},
        {"$${MC_TEST_V}", "${MC_TEST_V}"},
        {"$$${MC_TEST_V}", "$${MC_TEST_V}"},
        {"$", "$"},
        {"a$", "a$"},
        {"$match", "$match"},
        {"${MC_TEST_UNSET:-$}", "$"},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        int rc = mc__cfg_interpolate(ok[i].in, strlen(ok[i].in), &out, &len, msg, sizeof(msg));
        assert_int_equal(rc, 0);
        assert_string_equal(out, ok[i].out);
        assert_int_equal(len, strlen(ok[i].out));
        free(out);
    }
    assert_int_equal(mc__cfg_interpolate("${}", 3, &out, &len, msg, sizeof(msg)), -1);
    assert_null(out);
    assert_string_equal(msg, "invalid variable reference '${}' (expected ${NAME} or "
                             "${NAME:-default})");
    assert_int_equal(mc__cfg_interpolate("x${MC_TEST_V", 12, &out, &len, msg, sizeof(msg)), -1);
    assert_int_equal(mc__cfg_interpolate("${MC_TEST_UNSET}", 16, &out, &len, msg, sizeof(msg)), -1);
    assert_string_equal(msg, "environment variable MC_TEST_UNSET is not set");

    /* A huge variable cannot blow up a value. */
    size_t big = MC__CFG_MAX_VALUE + 1;
    char *huge = malloc(big + 1);
    memset(huge, 'x', big);
    huge[big] = '\0';
    setenv("MC_TEST_HUGE", huge, 1);
    free(huge);
    assert_int_equal(mc__cfg_interpolate("${MC_TEST_HUGE}", 15, &out, &len, msg, sizeof(msg)), -1);
    assert_string_equal(msg, "value is longer than 1048576 bytes after variable substitution");
    unsetenv("MC_TEST_HUGE");
}

static void test_scalar_typing(void **state)
{
    static const struct {
        const char *text;
        mc__cfg_type_t type;
    } cases[] = {
        {"", MC__CFG_NULL},       {"~", MC__CFG_NULL},           {"null", MC__CFG_NULL},
        {"NULL", MC__CFG_NULL},   {"true", MC__CFG_BOOL},        {"False", MC__CFG_BOOL},
        {"yes", MC__CFG_STRING},  {"off", MC__CFG_STRING},       {"12", MC__CFG_INT},
        {"-12", MC__CFG_INT},     {"+3", MC__CFG_INT},           {"0x1F", MC__CFG_INT},
        {"0o17", MC__CFG_INT},    {"0x", MC__CFG_STRING},        {"1.5", MC__CFG_DOUBLE},
        {".5", MC__CFG_DOUBLE},   {"1e3", MC__CFG_DOUBLE},       {"-.inf", MC__CFG_DOUBLE},
        {".nan", MC__CFG_DOUBLE}, {"1e", MC__CFG_STRING},        {"1.2.3", MC__CFG_STRING},
        {"-", MC__CFG_STRING},    {"12abc", MC__CFG_STRING},     {".", MC__CFG_STRING},
        {"-0x1", MC__CFG_STRING}, {"127.0.0.1", MC__CFG_STRING},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        mc__cfg_node_t n = {.kind = MC__CFG_SCALAR,
                            .text = (char *)cases[i].text,
                            .len = strlen(cases[i].text),
                            .plain = true};
        mc__cfg_scalar_t s;
        mc__cfg_scalar_type(&n, &s);
        if (s.type != cases[i].type) {
            fail_msg("'%s' typed %d, expected %d", cases[i].text, s.type, cases[i].type);
        }
    }
    mc__cfg_node_t n = {.kind = MC__CFG_SCALAR, .text = "0x1F", .len = 4, .plain = true};
    mc__cfg_scalar_t s;
    mc__cfg_scalar_type(&n, &s);
    assert_int_equal(s.i, 31);
    n.text = "-9223372036854775808";
    n.len = strlen(n.text);
    mc__cfg_scalar_type(&n, &s);
    assert_false(s.overflow);
    assert_true(s.i == INT64_MIN);
    n.text = "9223372036854775808";
    n.len = strlen(n.text);
    mc__cfg_scalar_type(&n, &s);
    assert_true(s.overflow);
    n.text = "true";
    n.len = 4;
    n.plain = false; /* quoted */
    mc__cfg_scalar_type(&n, &s);
    assert_int_equal(s.type, MC__CFG_STRING);
}

static void test_edit_distance(void **state)
{
    assert_int_equal(mc__cfg_edit_distance("history", "history", 2), 0);
    assert_int_equal(mc__cfg_edit_distance("histroy", "history", 2), 1); /* transposition */
    assert_int_equal(mc__cfg_edit_distance("hstory", "history", 2), 1);
    assert_int_equal(mc__cfg_edit_distance("histories", "history", 2), 3); /* capped */
    assert_int_equal(mc__cfg_edit_distance("", "ab", 2), 2);
    assert_int_equal(mc__cfg_edit_distance("abc", "xyz", 5), 3);
}

/* Broken configurations: every message is asserted exactly, position included. */
static void test_errors_structure(void **state)
{
    expect_error("", "t.yaml:1:1: the configuration is empty");
    expect_error("# only a comment\n", "t.yaml:1:1: the configuration is empty");
    expect_error("- a\n- b\n", "t.yaml:1:1: expected a mapping at the top level, got a list");
    expect_error("streams:\n  s: {db: [a}\n",
                 "t.yaml:2:13: did not find expected ',' or ']' while parsing a flow sequence at "
                 "line 2, column 11");
    expect_error("streams:\n  s:\n    db: a\n   collection: b\n",
                 "t.yaml:4:4: did not find expected key while parsing a block mapping at line 2, "
                 "column 3");
    expect_error("streams:\n  s: {}\n---\nstreams:\n  t: {}\n",
                 "t.yaml:3:1: only one YAML document is allowed");
    expect_error("log_level: info\n", "t.yaml:1:1: missing required key 'streams'");
    expect_error("streams: {}\n", "t.yaml:1:10: at least one stream is required");
    expect_error("streams:\n", "t.yaml:1:9: at least one stream is required");
    expect_error("streams: [a]\n",
                 "t.yaml:1:10: expected a mapping of stream names to streams, got a list");
    expect_error("streams:\n  orders:\n", "t.yaml:2:10: expected a mapping, got an empty value");
    expect_error("streams:\n  'bad name': {}\n",
                 "t.yaml:2:3: stream name 'bad name' must be 1 to 64 characters from A-Z a-z 0-9 "
                 "_ -");
    expect_error("streams:\n  s: {}\n  s: {}\n",
                 "t.yaml:3:3: duplicate key 's' (first defined at line 2)");
    expect_error("streams:\n  s:\n    history: 1\n    db: a\n    history: 2\n",
                 "t.yaml:5:5: duplicate key 'history' (first defined at line 3)");
    expect_error("streams:\n  ? [a, b]\n  : {}\n", "t.yaml:2:5: mapping keys must be scalars");
    expect_error("streams:\n  s: !!binary {}\n",
                 "t.yaml:2:6: unsupported YAML tag 'tag:yaml.org,2002:binary'");
    expect_error("streams:\n  s: {db: !custom x}\n",
                 "t.yaml:2:11: unsupported YAML tag '!custom' (only !!str is allowed)");
    expect_error("streams:\n  s: {db: \"a\\0b\"}\n",
                 "t.yaml:2:11: values must not contain NUL characters");
}

static void test_errors_keys(void **state)
{
    expect_error("sever:\n  listen: x\nstreams: {s: {}}\n",
                 "t.yaml:1:1: unknown key 'sever'; did you mean 'server'?");
    expect_error("streams:\n  orders:\n    db: shop\n    histroy: 5\n",
                 "t.yaml:4:5: unknown key 'histroy' in streams.orders; did you mean 'history'?");
    expect_error("streams:\n  orders:\n    fullDocument: updateLookup\n",
                 "t.yaml:3:5: unknown key 'fullDocument' in streams.orders; did you mean "
                 "'full_document'?");
    expect_error("streams:\n  orders:\n    colour: blue\n",
                 "t.yaml:3:5: unknown key 'colour' in streams.orders");
    expect_error("auth:\n  jwt:\n    algorithm: HS256\n    secret: x\n    isuer: me\n"
                 "streams: {s: {}}\n",
                 "t.yaml:5:5: unknown key 'isuer' in auth.jwt; did you mean 'issuer'?");
    expect_error("streams:\n  s:\n    recipient: {path: a, lookup: {db: d, collection: c, "
                 "recipient: r, feild: x}}\n",
                 "t.yaml:3:71: unknown key 'feild' in streams.s.recipient.lookup; did you mean "
                 "'field'?");
    expect_error("checkpoint:\n  store: mongodb\n  dbname: x\nstreams: {s: {}}\n",
                 "t.yaml:3:3: unknown key 'dbname' in checkpoint");
}

static void test_errors_types_and_bounds(void **state)
{
    expect_error("streams:\n  s:\n    public: yes please\n",
                 "t.yaml:3:13: expected a boolean, got 'yes please'");
    expect_error("streams:\n  s:\n    public: \"true\"\n",
                 "t.yaml:3:13: expected a boolean, got 'true' (a quoted value is always a string)");
    expect_error("streams:\n  s:\n    history: 10000001\n",
                 "t.yaml:3:14: history must be between 0 and 10000000");
    expect_error("streams:\n  s:\n    history: -1\n",
                 "t.yaml:3:14: history must be between 0 and 10000000");
    expect_error("streams:\n  s:\n    history: 99999999999999999999999\n",
                 "t.yaml:3:14: history must be between 0 and 10000000");
    expect_error("streams:\n  s:\n    history: 1.5\n",
                 "t.yaml:3:14: expected an integer, got '1.5'");
    expect_error("streams:\n  s:\n    max_await_time_ms: 0\n",
                 "t.yaml:3:24: max_await_time_ms must be between 1 and 60000");
    expect_error("checkpoint: {interval_ms: 5}\nstreams: {s: {}}\n",
                 "t.yaml:1:27: interval_ms must be between 10 and 600000");
    expect_error("server: {max_connections: [1]}\nstreams: {s: {}}\n",
                 "t.yaml:1:27: expected an integer, got a list");
    expect_error("server: {max_message_bytes: 4095}\nstreams: {s: {}}\n",
                 "t.yaml:1:29: max_message_bytes must be between 4096 and 268435456");
    expect_error("server: {filter_budget_us: 99}\nstreams: {s: {}}\n",
                 "t.yaml:1:28: filter_budget_us must be between 100 and 1000000");
    expect_error("server: {max_connections_per_address: -1}\nstreams: {s: {}}\n",
                 "t.yaml:1:39: max_connections_per_address must be between 0 and 1000000");
    expect_error("streams:\n  s:\n    full_document: updatelookup\n",
                 "t.yaml:3:20: full_document must be one of: default, updateLookup, "
                 "whenAvailable, required (got 'updatelookup')");
    /* Routing by a later state of the document is refused (write-time routing). */
    static const char updatelookup_msg[] =
        "full_document: updateLookup cannot be used with recipient: it reads the document as it "
        "is later, so a change could reach the next owner. Use full_document: whenAvailable (or "
        "required) with changeStreamPreAndPostImages enabled on the collection (mongocast "
        "enable-images), and full_document_before_change: whenAvailable (or required) so that "
        "deletes and ownership changes are routed from the pre-image";
    char want[600];
    snprintf(want, sizeof(want), "t.yaml:3:20: %s", updatelookup_msg);
    expect_error("streams:\n  s:\n    full_document: updateLookup\n    recipient: fullDocument.o\n",
                 want);
    snprintf(want, sizeof(want), "t.yaml:5:20: %s", updatelookup_msg);
    expect_error("streams:\n  s:\n    recipient: {path: fullDocument.b, lookup: {db: d, "
                 "collection: c, recipient: r}}\n\n    full_document: updateLookup\n",
                 want);
    mc_config_t *ok = load("streams:\n  s:\n    full_document: updateLookup\n");
    mc_config_destroy(ok);
    ok = load("streams:\n  s:\n    full_document: whenAvailable\n    recipient: fullDocument.o\n");
    mc_config_destroy(ok);
    expect_error("streams:\n  s:\n    full_document_before_change: false\n",
                 "t.yaml:3:34: full_document_before_change must be one of: off, whenAvailable, "
                 "required (got 'false')");
    expect_error("streams:\n  s:\n    on_history_lost: skip\n",
                 "t.yaml:3:22: on_history_lost must be one of: fail, restart (got 'skip')");
    expect_error("streams:\n  s:\n    on_oversize: retry\n",
                 "t.yaml:3:18: on_oversize must be one of: split, skip, fail (got 'retry')");
    expect_error("checkpoint: {store: s3}\nstreams: {s: {}}\n",
                 "t.yaml:1:21: store must be one of: file, mongodb (got 's3')");
    expect_error("log_level: verbose\nstreams: {s: {}}\n",
                 "t.yaml:1:12: log_level must be one of: error, warn, info, debug (got 'verbose')");
    expect_error("server: {allowed_origins: https://x}\nstreams: {s: {}}\n",
                 "t.yaml:1:27: expected a list of strings, got 'https://x'");
    expect_error("server: {allowed_origins: [a, {b: c}]}\nstreams: {s: {}}\n",
                 "t.yaml:1:31: expected a string, got a mapping");
    expect_error("server: {listen: 8080}\nstreams: {s: {}}\n",
                 "t.yaml:1:18: listen must be HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got "
                 "'8080'");
    expect_error("server: {listen: '::1:8080'}\nstreams: {s: {}}\n",
                 "t.yaml:1:18: listen must be HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got "
                 "'::1:8080'");
    expect_error("server: {listen: 'h:70000'}\nstreams: {s: {}}\n",
                 "t.yaml:1:18: listen must be HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got "
                 "'h:70000'");
    expect_error("mongodb: {uri: 'localhost:27017'}\nstreams: {s: {}}\n",
                 "t.yaml:1:16: uri must start with mongodb:// or mongodb+srv://");
    expect_error("mongodb: [uri]\nstreams: {s: {}}\n",
                 "t.yaml:1:10: expected a mapping, got a list");
    expect_error("streams:\n  s: {db: 'a.b'}\n",
                 "t.yaml:2:11: db 'a.b' is not a valid database name (at most 63 characters, none "
                 "of / \\ . space \" $)");
    expect_error("streams:\n  s: {db: a, collection: system.views}\n",
                 "t.yaml:2:26: collection 'system.views' is not a valid collection name (no '$', "
                 "no 'system.')");
}

static void test_errors_semantics(void **state)
{
    expect_error("streams:\n  s:\n    collection: orders\n",
                 "t.yaml:3:17: collection requires db (omit both to watch the whole cluster)");
    expect_error("auth:\n  jwt:\n    algorithm: HS256\n    secret: x\n    public_key_file: k.pem\n"
                 "streams: {s: {}}\n",
                 "t.yaml:5:22: secret and public_key_file are mutually exclusive");
    expect_error("auth:\n  jwt:\n    algorithm: HS256\n    identity_claim: sub\n"
                 "streams: {s: {}}\n",
                 "t.yaml:3:5: algorithm HS256 requires secret");
    expect_error("auth:\n  jwt:\n    algorithm: ES256\n    secret: x\nstreams: {s: {}}\n",
                 "t.yaml:4:13: algorithm ES256 requires public_key_file");
    expect_error("auth:\n  jwt:\n    secret: x\nstreams: {s: {}}\n",
                 "t.yaml:3:5: missing required key 'algorithm' in auth.jwt");
    expect_error("auth:\n  jwt:\n    algorithm: none\n    secret: x\nstreams: {s: {}}\n",
                 "t.yaml:3:16: algorithm must be one of: HS256, RS256, ES256 (got 'none')");
    expect_error("auth: {}\nstreams: {s: {}}\n", "t.yaml:1:7: missing required key 'jwt' in auth");
    expect_error("streams:\n  s:\n    recipient: {lookup: {db: d, collection: c, recipient: r}}\n",
                 "t.yaml:3:16: missing required key 'path' in streams.s.recipient");
    expect_error("streams:\n  s:\n    recipient: {path: a, lookup: {db: d, recipient: r}}\n",
                 "t.yaml:3:34: missing required key 'collection' in streams.s.recipient.lookup");
    expect_error("streams:\n  s:\n    recipient: fullDocument..owner\n",
                 "t.yaml:3:16: recipient must be a dotted field path such as "
                 "fullDocument.owner_id, got 'fullDocument..owner'");
    expect_error(
        "streams:\n  s:\n    recipient: [a]\n",
        "t.yaml:3:16: expected a dotted path or a mapping {path, lookup} or {by_collection, "
        "default}, got a list");
    expect_error("streams:\n  s:\n    pipeline: {$match: {}}\n",
                 "t.yaml:3:15: expected a list of pipeline stages, got a mapping");
    expect_error("streams:\n  s:\n    pipeline:\n      - match: {a: 1}\n",
                 "t.yaml:4:9: pipeline stage 'match' must start with '$' (e.g. $match)");
    expect_error("streams:\n  s:\n    pipeline:\n      - {$match: {a: 1}, $project: {a: 1}}\n",
                 "t.yaml:4:9: a pipeline stage must be a mapping with exactly one key such as "
                 "$match, got a mapping with several keys");
    expect_error("streams:\n  s:\n    pipeline:\n      - $group: {_id: 1}\n",
                 "t.yaml:4:9: stage '$group' is not allowed in a change stream pipeline "
                 "(allowed: $addFields, $match, $project, $replaceRoot, $replaceWith, $redact, "
                 "$set, $unset, $changeStreamSplitLargeEvent)");
    expect_error("streams:\n  s:\n    pipeline:\n      - $match: {n: 123456789012345678901}\n",
                 "t.yaml:4:21: integer 123456789012345678901 is out of range");
    expect_error("streams:\n  s:\n    pipeline:\n      - $match: {a: &x 1, b: *x}\n",
                 "t.yaml:4:30: YAML aliases (*x) are not supported: write the value out in full");
}

static void test_errors_sinks(void **state)
{
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: out, type: stdout}\n"
                 "  - {name: out, type: redis}\n",
                 "t.yaml:4:12: duplicate sink name 'out' (first defined at line 3)");
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: out, type: stdout, streams: [ordrs]}\n",
                 "t.yaml:3:41: sink 'out' refers to unknown stream 'ordrs'; did you mean "
                 "'orders'?");
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: out, type: stdout, streams: [zzz]}\n",
                 "t.yaml:3:41: sink 'out' refers to unknown stream 'zzz'");
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: out, type: stdout, streams: []}\n",
                 "t.yaml:3:40: streams must not be empty (omit it to take every stream)");
    expect_error("streams: {orders: {}}\n"
                 "sinks:\n  - {name: out, type: stdout, streams: [orders, orders]}\n",
                 "t.yaml:3:49: stream 'orders' is listed twice");
    expect_error("streams: {orders: {}}\nsinks:\n  - name: out\n    format: json\n",
                 "t.yaml:3:5: missing required key 'type' in sinks[0]");
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: 'a b', type: x}\n",
                 "t.yaml:3:12: sink name 'a b' must be 1 to 64 characters from A-Z a-z 0-9 _ -");
    expect_error("streams: {orders: {}}\nsinks: {name: out}\n",
                 "t.yaml:2:8: expected a list of sinks, got a mapping");
    expect_error("streams: {orders: {}}\nsinks:\n  - stdout\n",
                 "t.yaml:3:5: expected a mapping, got 'stdout'");
    /* Sink options keep YAML types but still refuse unrepresentable values. */
    expect_error("streams: {orders: {}}\nsinks:\n  - {name: o, type: x, n: 99999999999999999999}\n",
                 "t.yaml:3:27: integer 99999999999999999999 is out of range");
}

static void test_limits(void **state)
{
    /* Nesting: 64 levels load, 65 do not. */
    char deep[1024];
    size_t n = 0;
    n += (size_t)snprintf(deep + n, sizeof(deep) - n,
                          "streams:\n  s:\n    pipeline:\n"
                          "      - $match: ");
    /* depth so far: root, streams map, s map, pipeline seq, stage map = 5; add 59 -> 64 */
    for (int i = 0; i < 59; i++) {
        deep[n++] = '[';
    }
    for (int i = 0; i < 59; i++) {
        deep[n++] = ']';
    }
    deep[n++] = '\n';
    deep[n] = '\0';
    mc_config_t *cfg = load(deep);
    mc_config_destroy(cfg);
    n = (size_t)snprintf(deep, sizeof(deep), "streams:\n  s:\n    pipeline:\n      - $match: ");
    for (int i = 0; i < 60; i++) {
        deep[n++] = '[';
    }
    for (int i = 0; i < 60; i++) {
        deep[n++] = ']';
    }
    deep[n++] = '\n';
    deep[n] = '\0';
    expect_error(deep, "t.yaml:4:76: nesting is deeper than 64 levels");

    /* Size: refused before parsing. */
    size_t big = MC__CFG_MAX_BYTES + 1;
    char *text = malloc(big + 1);
    memset(text, '#', big);
    memcpy(text, "streams: {s: {}}\n", 17);
    text[big] = '\0';
    mc_error_t err;
    assert_null(mc_config_load_string(text, big, "big.yaml", &err));
    assert_int_equal(err.code, MC_ECONFIG);
    assert_string_equal(err.message, "big.yaml:1:1: configuration is larger than the 4 MiB limit");
    /* Exactly at the limit is accepted (the rest is a comment). */
    text[big - 1] = '\n';
    cfg = mc_config_load_string(text, big - 1, "big.yaml", &err);
    assert_non_null(cfg);
    mc_config_destroy(cfg);

    /* Through the file API the size is checked with fstat, before reading. */
    char path[] = "/tmp/mc_test_config_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, big), (ssize_t)big);
    close(fd);
    assert_null(mc_config_load_file(path, &err));
    assert_int_equal(err.code, MC_ECONFIG);
    char want[128];
    snprintf(want, sizeof(want), "%s:1:1: configuration is larger than the 4 MiB limit", path);
    assert_string_equal(err.message, want);
    unlink(path);
    free(text);

    /* Stream and sink counts are capped (each stream is a watcher thread). */
    size_t cap = 64 + 32 * (MC__CFG_MAX_STREAMS + MC__CFG_MAX_SINKS + 2);
    char *many = malloc(cap);
    n = (size_t)snprintf(many, cap, "streams:\n");
    for (int i = 0; i <= MC__CFG_MAX_STREAMS; i++) {
        n += (size_t)snprintf(many + n, cap - n, "  s%d: {}\n", i);
    }
    snprintf(want, sizeof(want), "t.yaml:%d:3: at most 1000 streams are allowed",
             MC__CFG_MAX_STREAMS + 2);
    expect_error(many, want);
    n = (size_t)snprintf(many, cap, "streams: {s: {}}\nsinks:\n");
    for (int i = 0; i <= MC__CFG_MAX_SINKS; i++) {
        n += (size_t)snprintf(many + n, cap - n, "- {name: k%d, type: t}\n", i);
    }
    snprintf(want, sizeof(want), "t.yaml:%d:3: at most 1000 sinks are allowed",
             MC__CFG_MAX_SINKS + 3);
    expect_error(many, want);
    free(many);

    /* Billion laughs: refused at the first alias, nothing is expanded. */
    expect_error("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                 "streams: {s: {}}\n",
                 "t.yaml:2:8: YAML aliases (*a) are not supported: write the value out in full");
    /* Anchors alone are harmless and ignored. */
    cfg = load("streams:\n  s: &base {db: shop}\n");
    assert_string_equal(cfg->streams[0].db, "shop");
    mc_config_destroy(cfg);

    /* Invalid UTF-8 in the file itself (a libyaml reader error, located by offset). */
    expect_error("streams:\n  s: {db: \xff}\n",
                 "t.yaml:2:11: invalid leading UTF-8 octet (byte 0xFF)");
}

static void test_load_file(void **state)
{
    mc_error_t err;
    assert_null(mc_config_load_file("/nonexistent/mongocast.yaml", &err));
    assert_int_equal(err.code, MC_EIO);
    assert_string_equal(err.message, "/nonexistent/mongocast.yaml: No such file or directory");

    /* Only regular files: a FIFO without a writer is refused at once (it used to block in
     * open), and so are directories and devices. */
    assert_null(mc_config_load_file("/tmp", &err));
    assert_int_equal(err.code, MC_EIO);
    assert_string_equal(err.message,
                        "/tmp: is a directory; the configuration must be a regular file");
    assert_null(mc_config_load_file("/dev/null", &err));
    assert_int_equal(err.code, MC_EIO);
    assert_string_equal(err.message,
                        "/dev/null: is a character device; the configuration must be a regular "
                        "file");
    char dir[] = "/tmp/mc_test_fifo_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char fifo[64];
    snprintf(fifo, sizeof(fifo), "%s/config.yaml", dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    assert_null(mc_config_load_file(fifo, &err));
    assert_int_equal(err.code, MC_EIO);
    char fifo_msg[160];
    snprintf(fifo_msg, sizeof(fifo_msg),
             "%s: is a FIFO (named pipe); the configuration must be a regular file", fifo);
    assert_string_equal(err.message, fifo_msg);
    unlink(fifo);
    rmdir(dir);

    char path[] = "/tmp/mc_test_config_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *yaml = "streams:\n  s:\n    histroy: 1\n";
    assert_int_equal(write(fd, yaml, strlen(yaml)), (ssize_t)strlen(yaml));
    close(fd);
    assert_null(mc_config_load_file(path, &err));
    char want[200];
    snprintf(want, sizeof(want),
             "%s:3:5: unknown key 'histroy' in streams.s; did you mean "
             "'history'?",
             path);
    assert_string_equal(err.message, want);
    unlink(path);

    /* The shipped example must load. */
    setenv("MONGODB_URI", "mongodb://127.0.0.1:27017/?replicaSet=rs0", 1);
    char example[1024];
    source_path(example, sizeof(example), "examples/minimal.yaml");
    mc_config_t *cfg = mc_config_load_file(example, &err);
    if (!cfg) {
        fail_msg("examples/minimal.yaml: %s", err.message);
    }
    assert_int_equal(cfg->n_streams, 1);
    assert_int_equal(cfg->n_sinks, 1);
    assert_string_equal(cfg->sinks[0].type, "stdout");
    mc_config_destroy(cfg);
    unsetenv("MONGODB_URI");
}

/* docs/config.md must document every option of the table, under its dotted name. */
static void check_documented(const char *name, void *ud)
{
    const char *doc = ud;
    char needle[200];
    snprintf(needle, sizeof(needle), "`%s`", name);
    if (!strstr(doc, needle)) {
        fail_msg("docs/config.md does not document %s", needle);
    }
}

static void test_server_tls(void **state)
{
    mc_config_t *cfg = load("server:\n  tls: {cert_file: /c.pem, key_file: /k.pem, "
                            "client_ca_file: /ca.pem, min_version: 1.3}\nstreams: {a: {}}\n");
    assert_true(cfg->server.tls.enabled);
    assert_string_equal(cfg->server.tls.cert_file, "/c.pem");
    assert_string_equal(cfg->server.tls.key_file, "/k.pem");
    assert_string_equal(cfg->server.tls.client_ca_file, "/ca.pem");
    assert_string_equal(cfg->server.tls.min_version, "1.3");
    mc_config_destroy(cfg);
    cfg = load("server:\n  tls: {cert_file: /c.pem, key_file: /k.pem}\nstreams: {a: {}}\n");
    assert_true(cfg->server.tls.enabled);
    assert_null(cfg->server.tls.client_ca_file);
    assert_string_equal(cfg->server.tls.min_version, "1.2");
    mc_config_destroy(cfg);
    expect_error("server:\n  tls: {cert_file: /c.pem}\nstreams: {a: {}}\n",
                 "t.yaml:2:8: missing required key 'key_file' in server.tls");
    expect_error("server:\n  tls: {cert_file: /c.pem, key_file: /k.pem, min_version: 1.1}\n"
                 "streams: {a: {}}\n",
                 "t.yaml:2:59: min_version must be one of: 1.2, 1.3 (got '1.1')");
}

static void test_docs_cover_options(void **state)
{
    char docs[1024];
    source_path(docs, sizeof(docs), "docs/config.md");
    FILE *f = fopen(docs, "r");
    assert_non_null(f);
    static char doc[256 * 1024];
    size_t n = fread(doc, 1, sizeof(doc) - 1, f);
    fclose(f);
    doc[n] = '\0';
    mc__cfg_each_option(check_documented, doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_config),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_env_interpolation),
        cmocka_unit_test(test_interpolate_direct),
        cmocka_unit_test(test_scalar_typing),
        cmocka_unit_test(test_edit_distance),
        cmocka_unit_test(test_errors_structure),
        cmocka_unit_test(test_errors_keys),
        cmocka_unit_test(test_errors_types_and_bounds),
        cmocka_unit_test(test_errors_semantics),
        cmocka_unit_test(test_errors_sinks),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_server_tls),
        cmocka_unit_test(test_docs_cover_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
