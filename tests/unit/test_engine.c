/*
 * test_engine.c: the engine end to end against mongo-emulator (spawned as a child process
 * per test): events in order with sequence numbers and recipients, invalidate-and-continue,
 * restart from the stored token (also right after an invalidate: startAfter), history lost
 * (fail / restart), retry after an error libmongoc does not resume, fatal errors isolated to
 * one stream, durable acks gating the checkpoint, and back-pressure without loss.
 *
 * The emulator binary is found next to the build tree (tools/mongo-emulator/mongo-emulator
 * relative to this executable's ../..) or through MC_EMULATOR; the tests are skipped when
 * neither exists. Main thread plus the engine's threads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mongoc/mongoc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "mongocast.h"

typedef struct fixture {
    pid_t emu;
    char uri[256];
    char cpdir[128];
    mongoc_client_t *cli;
    /* config storage */
    char names[2][32], dbs[2][32], colls[2][32], rpath[32];
    bson_t *pipeline;
    mc_stream_config_t streams[2];
    char kname[16], ktype[16];
    mc_sink_config_t sink;
    mc_config_t cfg;
    mc_engine_t *engine; /* owned here so a failed assertion cannot leak a running engine */
} fixture_t;

static int setup(void **state)
{
    if (!emu_fixture_path[0]) {
        return 0;
    }
    fixture_t *f = calloc(1, sizeof(*f));
    f->emu = emu_fixture_start(f->uri, sizeof(f->uri));
    if (f->emu < 0) {
        free(f);
        return -1;
    }
    snprintf(f->cpdir, sizeof(f->cpdir), "/tmp/mc_test_engine.XXXXXX");
    if (!mkdtemp(f->cpdir)) {
        return -1;
    }
    f->cli = mongoc_client_new(f->uri);
    f->pipeline = bson_new();
    for (int i = 0; i < 2; i++) {
        snprintf(f->names[i], 32, "s%d", i);
        snprintf(f->dbs[i], 32, "shop");
        snprintf(f->colls[i], 32, "c%d", i);
        f->streams[i] = (mc_stream_config_t){
            .name = f->names[i],
            .db = f->dbs[i],
            .collection = f->colls[i],
            .pipeline = f->pipeline,
            .full_document = MC_FULL_DOCUMENT_UPDATE_LOOKUP,
            .full_document_before_change = MC_BEFORE_CHANGE_WHEN_AVAILABLE,
            .recipient = f->rpath,
            .max_await_time_ms = 200,
        };
    }
    snprintf(f->rpath, sizeof(f->rpath), "fullDocument.owner");
    snprintf(f->kname, sizeof(f->kname), "mem");
    snprintf(f->ktype, sizeof(f->ktype), "memory");
    f->sink = (mc_sink_config_t){.name = f->kname, .type = f->ktype};
    f->cfg = (mc_config_t){.mongodb_uri = f->uri, .streams = f->streams, .n_streams = 1,
                           .sinks = &f->sink, .n_sinks = 1};
    f->cfg.checkpoint.store = MC_CHECKPOINT_FILE;
    f->cfg.checkpoint.path = f->cpdir;
    f->cfg.checkpoint.interval_ms = 100;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f) {
        return 0;
    }
    mc_engine_destroy(f->engine);
    mongoc_client_destroy(f->cli);
    bson_destroy(f->pipeline);
    bson_destroy(f->sink.options);
    emu_fixture_stop(f->emu);
    emu_fixture_rm_dir(f->cpdir);
    free(f);
    return 0;
}

#define NEED_EMULATOR()                                                                            \
    fixture_t *f = *state;                                                                         \
    if (!f) {                                                                                      \
        skip();                                                                                    \
    }

static void run(fixture_t *f, const char *db, bson_t *c)
{
    bson_error_t e;
    bson_t reply;
    bool ok = mongoc_client_command_simple(f->cli, db, c, NULL, &reply, &e);
    bson_destroy(&reply);
    bson_destroy(c);
    if (!ok) {
        fail_msg("command failed: %s", e.message);
    }
}

static void insert(fixture_t *f, const char *coll, int id, const char *owner)
{
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bson_t *doc = BCON_NEW("_id", BCON_INT32(id), "owner", BCON_UTF8(owner));
    bson_error_t e;
    bool ok = mongoc_collection_insert_one(c, doc, NULL, NULL, &e);
    bson_destroy(doc);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("insert failed: %s", e.message);
    }
}

static mc_engine_t *start(fixture_t *f)
{
    mc_error_t err = {0};
    mc_engine_t *e = mc_engine_new(&f->cfg, NULL, &err);
    if (!e) {
        fail_msg("engine_new: %s", err.message);
    }
    if (mc_engine_start(e, &err) != 0) {
        mc_engine_destroy(e);
        fail_msg("engine_start: %s", err.message);
    }
    f->engine = e;
    for (int i = 0; i < 500 && !mc_engine_ready(e); i++) {
        usleep(10000);
    }
    return e;
}

static void finish(fixture_t *f)
{
    mc_engine_destroy(f->engine);
    f->engine = NULL;
}

static mc_stream_state_t wait_state(mc_engine_t *e, const char *s, mc_stream_state_t want,
                                    mc_stream_status_t *st)
{
    for (int i = 0; i < 500; i++) {
        mc_engine_stream_status(e, s, st);
        if (st->state == want) {
            break;
        }
        usleep(10000);
    }
    return st->state;
}

/* "insert", "ready", ... of the i-th held event, written into buf. */
static const char *what(mc_sink_t *m, size_t i, char *buf)
{
    mc_event_t *ev = mc_sink_memory_get(m, i);
    if (!ev) {
        return "(none)";
    }
    const char *op = mc_event_kind(ev) == MC_EVENT_CHANGE ? mc_event_operation_type(ev)
                                                          : mc_event_kind_name(mc_event_kind(ev));
    snprintf(buf, 64, "%s", op ? op : "?");
    mc_event_unref(&ev);
    return buf;
}

/* The recipient of the i-th event; a string recipient without its JSON quotes. */
static const char *recipient_at(mc_sink_t *m, size_t i, char *buf)
{
    mc_event_t *ev = mc_sink_memory_get(m, i);
    const char *r = ev ? mc_event_recipient(ev) : NULL;
    if (r && r[0] == '"') {
        snprintf(buf, 64, "%.*s", (int)strlen(r) - 2, r + 1);
    } else {
        snprintf(buf, 64, "%s", r ? r : "-");
    }
    mc_event_unref(&ev);
    return buf;
}

static void test_changes_in_order(void **state)
{
    NEED_EMULATOR();
    char b[64];
    run(f, "shop", BCON_NEW("create", "c0", "changeStreamPreAndPostImages", "{", "enabled",
                            BCON_BOOL(true), "}"));
    mc_engine_t *e = start(f);
    assert_true(mc_engine_ready(e));
    mc_sink_t *m = mc_engine_sink(e, "mem");
    insert(f, "c0", 1, "u1");
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", "c0");
    bson_t *q = BCON_NEW("_id", BCON_INT32(1));
    bson_t *u = BCON_NEW("$set", "{", "qty", BCON_INT32(2), "}");
    bson_error_t uerr, derr;
    bool updated = mongoc_collection_update_one(c, q, u, NULL, NULL, &uerr);
    bool deleted = mongoc_collection_delete_one(c, q, NULL, NULL, &derr);
    bson_destroy(q);
    bson_destroy(u);
    mongoc_collection_destroy(c);
    if (!updated || !deleted) {
        fail_msg("update/delete failed: %s", !updated ? uerr.message : derr.message);
    }
    assert_int_equal(mc_sink_memory_wait(m, 4, 5000), 0);
    assert_string_equal(what(m, 0, b), "ready");
    assert_string_equal(what(m, 1, b), "insert");
    assert_string_equal(what(m, 2, b), "update");
    assert_string_equal(what(m, 3, b), "delete");
    for (size_t i = 0; i < 4; i++) {
        mc_event_t *ev = mc_sink_memory_get(m, i);
        assert_int_equal(mc_event_seq(ev), i + 1);
        mc_event_unref(&ev);
    }
    /* updateLookup gives the update its owner; the delete's comes from the pre-image. */
    assert_string_equal(recipient_at(m, 1, b), "u1");
    assert_string_equal(recipient_at(m, 2, b), "u1");
    assert_string_equal(recipient_at(m, 3, b), "u1");
    mc_stream_status_t st;
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.events, 3);
    finish(f);
}

static void test_invalidate_then_continue_and_restart(void **state)
{
    NEED_EMULATOR();
    char b[64];
    /* A long await so no post-batch token replaces the invalidate token before we stop, even
     * on a loaded machine (stop waits for the pending next() to return, at most this long). */
    f->streams[0].max_await_time_ms = 6000;
    mc_engine_t *e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    insert(f, "c0", 1, "u1");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", "c0");
    bson_error_t err;
    assert_true(mongoc_collection_drop(c, &err));
    mongoc_collection_destroy(c);
    assert_int_equal(mc_sink_memory_wait(m, 4, 5000), 0);
    assert_string_equal(what(m, 2, b), "drop");
    assert_string_equal(what(m, 3, b), "invalidate");
    mc_event_t *inv = mc_sink_memory_get(m, 3);
    assert_string_equal(mc_event_reason(inv), "drop");
    char inv_id[256];
    snprintf(inv_id, sizeof(inv_id), "%s", mc_event_id(inv));
    mc_event_unref(&inv);
    assert_int_equal(mc_engine_stop(e, NULL), 0);
    finish(f);
    /* The stored position is the invalidate's token, or a later high-water mark when the
     * reopened stream already answered an empty batch before the stop (a loaded machine):
     * never anything before the invalidate. */
    char path[300];
    snprintf(path, sizeof(path), "%s/s0.json", f->cpdir);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char text[2048] = {0};
    size_t nread = fread(text, 1, sizeof(text) - 1, fp);
    fclose(fp);
    assert_true(nread > 0);
    bson_t stored;
    bson_error_t jerr;
    assert_true(bson_init_from_json(&stored, text, -1, &jerr));
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, &stored, "invalidate"));
    bool stored_invalidate = bson_iter_bool(&it);
    assert_true(bson_iter_init(&it, &stored) && bson_iter_find_descendant(&it, "token._data", &it));
    const char *stored_id = bson_iter_utf8(&it, NULL);
    if (stored_invalidate) {
        assert_string_equal(stored_id, inv_id);
    } else {
        assert_true(strcmp(stored_id, inv_id) > 0);
    }
    bson_destroy(&stored);
    /* Make the restart start from the invalidate token itself, so that it must use
     * startAfter (resumeAfter an invalidate token fails with 260). The stream record is
     * written as an older version did (no definition) and the sink's own record removed, so
     * the sink starts from the stream record: the upgrade path. */
    fp = fopen(path, "w");
    assert_non_null(fp);
    fprintf(fp, "{\"stream\": \"s0\", \"token\": {\"_data\": \"%s\"}, \"invalidate\": true}",
            inv_id);
    fclose(fp);
    char sink_path[300];
    snprintf(sink_path, sizeof(sink_path), "%s/s0@mem.json", f->cpdir);
    assert_int_equal(unlink(sink_path), 0);

    /* Restart: startAfter the invalidate token (resumeAfter would fail with 260). */
    insert(f, "c0", 2, "u2");
    e = start(f);
    m = mc_engine_sink(e, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    assert_string_equal(what(m, 0, b), "ready");
    assert_string_equal(what(m, 1, b), "insert");
    assert_string_equal(recipient_at(m, 1, b), "u2");
    insert(f, "c0", 3, "u3");
    assert_int_equal(mc_sink_memory_wait(m, 3, 5000), 0);
    assert_string_equal(recipient_at(m, 2, b), "u3");
    mc_stream_status_t st;
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.state, MC_STREAM_OPEN);
    finish(f);
}

static void test_restart_resumes_exactly(void **state)
{
    NEED_EMULATOR();
    char b[64];
    mc_engine_t *e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    insert(f, "c0", 1, "u1");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    finish(f); /* destroy stops: drain + final checkpoint */
    insert(f, "c0", 2, "u2");
    insert(f, "c0", 3, "u3");
    e = start(f);
    m = mc_engine_sink(e, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 3, 5000), 0);
    usleep(300000);
    assert_int_equal(mc_sink_memory_count(m), 3); /* no replay of _id 1 */
    assert_string_equal(recipient_at(m, 1, b), "u2");
    assert_string_equal(recipient_at(m, 2, b), "u3");
    finish(f);
}

/* The error event a failed stream ends with: the last event the sink holds. */
static void expect_error_event(mc_sink_t *m, const char *stream, const char *code, int server_code)
{
    mc_event_t *ev = NULL;
    for (int i = 0; i < 500; i++) {
        size_t n = mc_sink_memory_count(m);
        ev = n ? mc_sink_memory_get(m, n - 1) : NULL;
        if (ev && mc_event_kind(ev) == MC_EVENT_ERROR && strcmp(mc_event_stream(ev), stream) == 0) {
            break;
        }
        mc_event_unref(&ev);
        usleep(10000);
    }
    if (!ev) {
        fail_msg("no error event for stream %s", stream);
    }
    assert_string_equal(mc_event_error_code(ev), code);
    assert_int_equal(mc_event_server_code(ev), server_code);
    assert_non_null(mc_event_reason(ev));
    mc_event_unref(&ev);
}

static void test_history_lost(void **state)
{
    NEED_EMULATOR();
    char b[64];
    mc_engine_t *e = start(f);
    insert(f, "c0", 1, "u1");
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 2, 5000), 0);
    finish(f);
    for (int i = 10; i < 20; i++) {
        insert(f, "c0", i, "x");
    }
    run(f, "admin", BCON_NEW("emulatorTruncateOplog", BCON_INT32(1), "keepLast", BCON_INT32(2)));

    f->streams[0].on_history_lost = MC_ON_HISTORY_LOST_FAIL;
    e = start(f);
    mc_stream_status_t st;
    assert_int_equal(wait_state(e, "s0", MC_STREAM_FAILED, &st), MC_STREAM_FAILED);
    assert_int_equal(st.server_code, 286);
    assert_non_null(strstr(st.message, "history lost"));
    assert_true(mc_engine_finished(e));
    /* The stream never opened: its only event is the error. */
    expect_error_event(mc_engine_sink(e, "mem"), "s0", MC_EVENT_ERROR_HISTORY_LOST, 286);
    assert_int_equal(mc_sink_memory_count(mc_engine_sink(e, "mem")), 1);
    finish(f);

    f->streams[0].on_history_lost = MC_ON_HISTORY_LOST_RESTART;
    e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    assert_string_equal(what(m, 0, b), "reset");
    assert_string_equal(what(m, 1, b), "ready");
    insert(f, "c0", 30, "u30");
    assert_int_equal(mc_sink_memory_wait(m, 3, 5000), 0);
    assert_string_equal(recipient_at(m, 2, b), "u30");
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.resets, 1);
    finish(f);
}

/* A stored checkpoint that cannot be read fails the stream (starting from "now" would skip
 * what happened since), and the stream's error event says so. */
static void test_unreadable_checkpoint(void **state)
{
    NEED_EMULATOR();
    char path[256];
    snprintf(path, sizeof(path), "%s/s0.json", f->cpdir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("{ not json", fp);
    fclose(fp);
    mc_error_t err = {0};
    mc_engine_t *e = mc_engine_new(&f->cfg, NULL, &err);
    assert_non_null(e);
    f->engine = e;
    assert_int_equal(mc_engine_start(e, &err), 0);
    mc_stream_status_t st;
    assert_int_equal(wait_state(e, "s0", MC_STREAM_FAILED, &st), MC_STREAM_FAILED);
    expect_error_event(mc_engine_sink(e, "mem"), "s0", MC_EVENT_ERROR_CHECKPOINT, 0);
    finish(f);
}

static void test_retry_after_unresumed_error(void **state)
{
    NEED_EMULATOR();
    char b[64];
    mc_engine_t *e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    insert(f, "c0", 1, "u1");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    /* 216 carries no resumable label: libmongoc gives up, the engine retries itself. */
    run(f, "admin",
        BCON_NEW("configureFailPoint", "failCommand", "mode", "{", "times", BCON_INT32(1), "}",
                 "data", "{", "failCommands", "[", "getMore", "]", "errorCode",
                 BCON_INT32(216), "}"));
    usleep(500000);
    insert(f, "c0", 2, "u2");
    insert(f, "c0", 3, "u3");
    assert_int_equal(mc_sink_memory_wait(m, 5, 8000), 0);
    usleep(300000);
    size_t n = mc_sink_memory_count(m);
    int seen[4] = {0};
    for (size_t i = 0; i < n; i++) {
        const char *r = recipient_at(m, i, b);
        if (r[0] == 'u') {
            seen[atoi(r + 1)]++;
        }
    }
    /* Every change exactly once: resumed from the last delivered token, not from now. */
    assert_int_equal(seen[1], 1);
    assert_int_equal(seen[2], 1);
    assert_int_equal(seen[3], 1);
    mc_stream_status_t st;
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.resumes, 1);
    assert_int_equal(st.state, MC_STREAM_OPEN);
    finish(f);
}

static void test_fatal_error_isolated(void **state)
{
    NEED_EMULATOR();
    f->cfg.n_streams = 2;
    mc_engine_t *e = start(f);
    assert_true(mc_engine_ready(e));
    run(f, "admin",
        BCON_NEW("configureFailPoint", "failCommand", "mode", "{", "times", BCON_INT32(1), "}",
                 "data", "{", "failCommands", "[", "getMore", "]", "errorCode",
                 BCON_INT32(280), "errorLabels", "[", "NonResumableChangeStreamError", "]",
                 "}"));
    mc_stream_status_t s0, s1;
    for (int i = 0; i < 500; i++) {
        mc_engine_stream_status(e, "s0", &s0);
        mc_engine_stream_status(e, "s1", &s1);
        if (s0.state == MC_STREAM_FAILED || s1.state == MC_STREAM_FAILED) {
            break;
        }
        usleep(10000);
    }
    usleep(300000);
    mc_engine_stream_status(e, "s0", &s0);
    mc_engine_stream_status(e, "s1", &s1);
    /* Exactly one stream took the failure; the other keeps running and delivering. */
    assert_true((s0.state == MC_STREAM_FAILED) != (s1.state == MC_STREAM_FAILED));
    mc_stream_status_t *failed = s0.state == MC_STREAM_FAILED ? &s0 : &s1;
    const char *alive = s0.state == MC_STREAM_FAILED ? "c1" : "c0";
    assert_int_equal(failed->server_code, 280);
    assert_non_null(strstr(failed->message, "failCommand"));
    assert_false(mc_engine_ready(e));
    assert_false(mc_engine_finished(e));
    mc_sink_t *m = mc_engine_sink(e, "mem");
    expect_error_event(m, failed == &s0 ? "s0" : "s1", MC_EVENT_ERROR_FATAL, 280);
    size_t before = mc_sink_memory_count(m);
    insert(f, alive, 7, "u7");
    assert_int_equal(mc_sink_memory_wait(m, before + 1, 5000), 0);
    finish(f);
}

static const char *stored_token(fixture_t *f, const char *stream, const char *sink, char *out,
                                size_t size)
{
    return emu_fixture_stored_token(f->cpdir, stream, sink, out, size);
}

static void test_durable_ack_gates_checkpoint(void **state)
{
    NEED_EMULATOR();
    f->sink.options = BCON_NEW("auto_ack", BCON_BOOL(false));
    mc_engine_t *e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    insert(f, "c0", 1, "u1");
    assert_int_equal(mc_sink_memory_wait(m, 2, 5000), 0);
    mc_event_t *ev = mc_sink_memory_get(m, 1);
    char id[256];
    snprintf(id, sizeof(id), "%s", mc_event_id(ev));
    mc_event_unref(&ev);
    usleep(600000); /* several checkpoint intervals and empty batches */
    mc_stream_status_t st;
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.stored_seq, 0); /* ready and insert unacked: nothing is stable */
    /* What is stored (the position the stream opened at) lies before the unacked insert,
     * for the stream and for the sink. */
    char tok[1024];
    assert_true(strcmp(stored_token(f, "s0", NULL, tok, sizeof(tok)), id) < 0);
    assert_true(strcmp(stored_token(f, "s0", "mem", tok, sizeof(tok)), id) < 0);

    assert_int_equal(mc_sink_memory_ack_all(m), 0);
    usleep(600000);
    mc_engine_stream_status(e, "s0", &st);
    assert_true(st.stored_seq >= 2);
    assert_true(strcmp(stored_token(f, "s0", NULL, tok, sizeof(tok)), id) >= 0);
    assert_true(strcmp(stored_token(f, "s0", "mem", tok, sizeof(tok)), id) >= 0);
    finish(f);
}

static void test_backpressure_without_loss(void **state)
{
    NEED_EMULATOR();
    char b[64];
    f->sink.options = BCON_NEW("max_events", BCON_INT32(3), "control", BCON_BOOL(false));
    mc_engine_t *e = start(f);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    for (int i = 1; i <= 8; i++) {
        insert(f, "c0", i, "u");
    }
    assert_int_equal(mc_sink_memory_wait(m, 3, 5000), 0);
    usleep(400000);
    assert_int_equal(mc_sink_memory_count(m), 3); /* full: the sink holds back the stream */
    int got = 0;
    int expect_id = 1;
    for (int round = 0; round < 10 && got < 8; round++) {
        size_t n = mc_sink_memory_count(m);
        for (size_t i = 0; i < n; i++) {
            mc_event_t *ev = mc_sink_memory_get(m, i);
            bson_iter_t it;
            assert_true(bson_iter_init_find(&it, mc_event_document_key(ev), "_id"));
            assert_int_equal(bson_iter_int32(&it), expect_id); /* in order, none skipped */
            expect_id++;
            got++;
            mc_event_unref(&ev);
        }
        mc_sink_memory_clear(m);
        if (got < 8) {
            mc_sink_memory_wait(m, 1, 3000);
            usleep(200000);
        }
    }
    assert_int_equal(got, 8);
    (void)b;
    finish(f);
}

int main(void)
{
    mongoc_init();
    mc_log_capture_mongoc(); /* libmongoc's chatter goes to our (unset) handler: silence */
    if (!emu_fixture_find()) {
        fprintf(stderr, "mongo-emulator not found: engine tests are skipped\n");
    }
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_changes_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_invalidate_then_continue_and_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_resumes_exactly, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_lost, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreadable_checkpoint, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retry_after_unresumed_error, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fatal_error_isolated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_durable_ack_gates_checkpoint, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backpressure_without_loss, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mongoc_cleanup();
    return rc;
}
