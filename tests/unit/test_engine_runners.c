/*
 * test_engine_runners.c: sink runners inside a running engine, against mongo-emulator
 * (spawned per test), with the fault-injection sink types registered through the public API:
 *   - a blocked sink is detached and holds back neither the stream nor another sink;
 *   - a detached sink catches up on its own cursor and rejoins: every event, in order, once;
 *   - its position gone from the oplog while it catches up: on_history_lost fail fails only
 *     that sink, restart gives it a reset and has it rejoin the live stream;
 *   - two sinks at different positions each resume from their own after a restart;
 *   - asynchronous acks (late, on the I/O loop) and out-of-order acks keep positions exact;
 *   - a catch-up routes recipient lookups as of each event's own time, like the shared path;
 *   - a stream that fails while a sink is detached: the sink gets the error event as it
 *     rejoins;
 *   - stored positions are checked at start: another namespace, another definition, the
 *     future are refused with the way out; a missing one is logged with the start chosen.
 *
 * Main thread plus the engine's threads; the log capture is guarded by a mutex.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mongoc/mongoc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "mongocast.h"

/* ---- Log capture ----------------------------------------------------------------------------- */

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char log_text[64 * 1024];
static size_t log_len;

static void capture(mc_log_level_t level, const char *component, const char *message, void *ud)
{
    (void)level;
    (void)ud;
    pthread_mutex_lock(&log_lock);
    int n =
        snprintf(log_text + log_len, sizeof(log_text) - log_len, "%s: %s\n", component, message);
    if (n > 0 && log_len + (size_t)n < sizeof(log_text)) {
        log_len += (size_t)n;
    }
    pthread_mutex_unlock(&log_lock);
}

static bool logged(const char *needle)
{
    pthread_mutex_lock(&log_lock);
    bool found = strstr(log_text, needle) != NULL;
    pthread_mutex_unlock(&log_lock);
    return found;
}

/* ---- Fixture --------------------------------------------------------------------------------- */

#define MAX_SINKS 3

typedef struct fixture {
    pid_t emu;
    char uri[256];
    char dir[128];
    mongoc_client_t *cli;
    char sname[8], db[8], coll[16], rpath[32];
    bson_t *pipeline;
    mc_stream_config_t stream;
    char knames[MAX_SINKS][16], ktypes[MAX_SINKS][16], files[MAX_SINKS][200];
    mc_sink_config_t sinks[MAX_SINKS];
    mc_config_t cfg;
    mc_engine_t *engine;
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
    snprintf(f->dir, sizeof(f->dir), "/tmp/mc_test_runners.XXXXXX");
    if (!mkdtemp(f->dir)) {
        return -1;
    }
    f->cli = mongoc_client_new(f->uri);
    f->pipeline = bson_new();
    snprintf(f->sname, sizeof(f->sname), "s0");
    snprintf(f->db, sizeof(f->db), "shop");
    snprintf(f->coll, sizeof(f->coll), "c0");
    f->stream = (mc_stream_config_t){.name = f->sname,
                                     .db = f->db,
                                     .collection = f->coll,
                                     .pipeline = f->pipeline,
                                     .max_await_time_ms = 100};
    f->cfg = (mc_config_t){
        .mongodb_uri = f->uri, .streams = &f->stream, .n_streams = 1, .sinks = f->sinks};
    f->cfg.checkpoint.store = MC_CHECKPOINT_FILE;
    f->cfg.checkpoint.path = f->dir;
    f->cfg.checkpoint.interval_ms = 50;
    pthread_mutex_lock(&log_lock);
    log_len = 0;
    log_text[0] = '\0';
    pthread_mutex_unlock(&log_lock);
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
    for (int k = 0; k < MAX_SINKS; k++) {
        bson_destroy(f->sinks[k].options);
        if (f->files[k][0]) {
            unlink(f->files[k]);
        }
    }
    emu_fixture_stop(f->emu);
    emu_fixture_rm_dir(f->dir);
    free(f);
    return 0;
}

#define NEED_EMULATOR()                                                                            \
    fixture_t *f = *state;                                                                         \
    if (!f) {                                                                                      \
        skip();                                                                                    \
    }

/* Sink k: `type` ("memory", "fault", "fault_async") named `name`; fault sinks write to a file
 * of their own (emptied first unless `keep`). Takes `options`. */
static void sink_file(fixture_t *f, int k, const char *name, const char *type, bson_t *options,
                      bool keep)
{
    snprintf(f->knames[k], sizeof(f->knames[k]), "%s", name);
    snprintf(f->ktypes[k], sizeof(f->ktypes[k]), "%s", type);
    if (!options) {
        options = bson_new();
    }
    if (strncmp(type, "fault", 5) == 0) {
        snprintf(f->files[k], sizeof(f->files[k]), "%s.%s.jsonl", f->dir, name);
        if (!keep) {
            unlink(f->files[k]);
        }
        BSON_APPEND_UTF8(options, "file", f->files[k]);
    }
    bson_destroy(f->sinks[k].options);
    f->sinks[k] =
        (mc_sink_config_t){.name = f->knames[k], .type = f->ktypes[k], .options = options};
    if ((size_t)k + 1 > f->cfg.n_sinks) {
        f->cfg.n_sinks = (size_t)k + 1;
    }
}

static void sink(fixture_t *f, int k, const char *name, const char *type, bson_t *options)
{
    sink_file(f, k, name, type, options, false);
}

static mc_engine_t *start(fixture_t *f)
{
    mc_error_t err = {0};
    mc_engine_opts_t opts = {
        .backoff_initial_ms = 20, .backoff_max_ms = 200, .drain_timeout_ms = 3000};
    mc_engine_t *e = mc_engine_new(&f->cfg, &opts, &err);
    if (!e) {
        fail_msg("engine_new: %s", err.message);
    }
    assert_int_equal(mc_engine_register_sink_type(e, mc_sink_fault_type(), &err), 0);
    assert_int_equal(mc_engine_register_sink_type(e, mc_sink_fault_async_type(), &err), 0);
    if (mc_engine_start(e, &err) != 0) {
        mc_engine_destroy(e);
        fail_msg("engine_start: %s", err.message);
    }
    f->engine = e;
    return e;
}

static bool wait_ready(mc_engine_t *e)
{
    for (int i = 0; i < 1000 && !mc_engine_ready(e); i++) {
        usleep(10000);
    }
    return mc_engine_ready(e);
}

static void finish(fixture_t *f)
{
    mc_engine_destroy(f->engine);
    f->engine = NULL;
}

static void run_cmd(fixture_t *f, bson_t *c)
{
    bson_error_t e;
    bson_t reply;
    bool ok = mongoc_client_command_simple(f->cli, "admin", c, NULL, &reply, &e);
    bson_destroy(&reply);
    bson_destroy(c);
    if (!ok) {
        fail_msg("command failed: %s", e.message);
    }
}

/* Inserts {_id: first..first+n-1} in batches of 500. */
static void insert_range(fixture_t *f, const char *coll, int first, int n)
{
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    for (int done = 0; done < n;) {
        int k = n - done < 500 ? n - done : 500;
        bson_t **docs = calloc((size_t)k, sizeof(*docs));
        for (int i = 0; i < k; i++) {
            docs[i] = BCON_NEW("_id", BCON_INT32(first + done + i));
        }
        bson_error_t e;
        bool ok =
            mongoc_collection_insert_many(c, (const bson_t **)docs, (size_t)k, NULL, NULL, &e);
        for (int i = 0; i < k; i++) {
            bson_destroy(docs[i]);
        }
        free(docs);
        if (!ok) {
            fail_msg("insert failed: %s", e.message);
        }
        done += k;
    }
    mongoc_collection_destroy(c);
}

/* The `fullDocument._id`s (changes) and ids of a fault sink's file, in file order. */
typedef struct lines {
    int *doc;
    char **id;
    size_t n;
    size_t resets;
} lines_t;

static void lines_free(lines_t *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->id[i]);
    }
    free(l->doc);
    free(l->id);
    memset(l, 0, sizeof(*l));
}

static lines_t read_lines(const char *path)
{
    lines_t l = {0};
    FILE *fp = fopen(path, "r");
    if (!fp) {
        return l;
    }
    size_t cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    while (getline(&line, &lcap, fp) > 0) {
        bson_t doc;
        bson_error_t err;
        if (!bson_init_from_json(&doc, line, -1, &err)) {
            continue;
        }
        bson_iter_t it;
        if (bson_iter_init_find(&it, &doc, "type") &&
            strcmp(bson_iter_utf8(&it, NULL), "reset") == 0) {
            l.resets++;
        }
        bson_iter_t v;
        if (bson_iter_init(&it, &doc) &&
            bson_iter_find_descendant(&it, "change.fullDocument._id", &v)) {
            if (l.n == cap) {
                cap = cap ? cap * 2 : 1024;
                l.doc = realloc(l.doc, cap * sizeof(int));
                l.id = realloc(l.id, cap * sizeof(char *));
            }
            l.doc[l.n] = bson_iter_int32(&v);
            bson_iter_init_find(&it, &doc, "id");
            l.id[l.n] = strdup(bson_iter_utf8(&it, NULL));
            l.n++;
        }
        bson_destroy(&doc);
    }
    free(line);
    fclose(fp);
    return l;
}

static size_t count_resets(const char *path)
{
    lines_t l = read_lines(path);
    size_t n = l.resets;
    lines_free(&l);
    return n;
}

static size_t count_lines(const char *path)
{
    lines_t l = read_lines(path);
    size_t n = l.n;
    lines_free(&l);
    return n;
}

static bool wait_lines(const char *path, size_t n, int64_t ms)
{
    for (int64_t t = 0; t < ms; t += 20) {
        if (count_lines(path) >= n) {
            return true;
        }
        usleep(20000);
    }
    return count_lines(path) >= n;
}

static mc_sink_stats_t stats_of(mc_engine_t *e, const char *name)
{
    mc_sink_stats_t st;
    memset(&st, 0, sizeof(st));
    for (size_t i = 0; i < mc_engine_sink_count(e); i++) {
        assert_int_equal(mc_engine_sink_stats(e, i, &st), 0);
        if (strcmp(st.name, name) == 0) {
            return st;
        }
    }
    fail_msg("no sink %s", name);
    return st;
}

static mc_sink_state_t wait_sink_state(mc_engine_t *e, const char *name, mc_sink_state_t want,
                                       int64_t ms)
{
    mc_sink_stats_t st = stats_of(e, name);
    for (int64_t t = 0; t < ms && st.state != want; t += 10) {
        usleep(10000);
        st = stats_of(e, name);
    }
    return st.state;
}

/* The stored `_data` of the stream (sink NULL) or of one of its sinks, "" when none. */
static const char *stored(fixture_t *f, const char *sinkname, char *out, size_t size)
{
    return emu_fixture_stored_token(f->dir, "s0", sinkname, out, size);
}

/* Every document first..first+n-1 exactly once and in order (by doc id and by event id). */
static void assert_exactly(const lines_t *l, int first, int n)
{
    if (l->n != (size_t)n) {
        fail_msg("expected %d events, got %zu", n, l->n);
    }
    for (size_t i = 0; i < l->n; i++) {
        if (l->doc[i] != first + (int)i) {
            fail_msg("event %zu is document %d, expected %d", i, l->doc[i], first + (int)i);
        }
        if (i > 0 && strcmp(l->id[i - 1], l->id[i]) >= 0) {
            fail_msg("event ids out of order at %zu", i);
        }
    }
}

/* ---- Tests ----------------------------------------------------------------------------------- */

static void test_blocked_sink_holds_back_nothing(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "mem", "memory", BCON_NEW("control", BCON_BOOL(false)));
    sink(f, 1, "stuck", "fault", BCON_NEW("block_after", BCON_INT32(0)));
    f->sinks[1].max_lag_events = 50;
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 400);
    mc_sink_t *m = mc_engine_sink(e, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 400, 10000), 0);
    assert_int_equal(wait_sink_state(e, "stuck", MC_SINK_CATCHING_UP, 5000), MC_SINK_CATCHING_UP);
    mc_sink_stats_t st = stats_of(e, "stuck");
    assert_true(st.detaches >= 1);
    assert_true(st.lag_events >= 300);
    assert_true(mc_engine_ready(e)); /* catching up is not failing */
    mc_stream_status_t ss;
    mc_engine_stream_status(e, "s0", &ss);
    assert_int_equal(ss.state, MC_STREAM_OPEN);
    /* The stuck sink's position, and the stream's (the oldest of its sinks'), stay behind
     * the memory sink's. */
    usleep(200000);
    char a[512], b[512], c[512];
    stored(f, "mem", a, sizeof(a));
    stored(f, "stuck", b, sizeof(b));
    stored(f, NULL, c, sizeof(c));
    assert_true(strcmp(b, a) < 0);
    assert_true(strcmp(c, b) <= 0);
    finish(f); /* the block ends at stop */
}

static void test_detached_sink_catches_up_in_order(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "mem", "memory", BCON_NEW("control", BCON_BOOL(false)));
    sink(f, 1, "slow", "fault",
         BCON_NEW("block_after", BCON_INT32(5), "block_ms", BCON_INT32(1500)));
    f->sinks[1].max_lag_events = 100;
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 2000);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 2000, 15000), 0);
    assert_true(wait_lines(f->files[1], 2000, 20000));
    assert_int_equal(wait_sink_state(e, "slow", MC_SINK_RUNNING, 10000), MC_SINK_RUNNING);
    assert_true(stats_of(e, "slow").detaches >= 1);
    /* Back on the shared path: new events arrive as before. */
    insert_range(f, "c0", 2000, 100);
    assert_true(wait_lines(f->files[1], 2100, 10000));
    usleep(200000);
    lines_t l = read_lines(f->files[1]);
    assert_exactly(&l, 0, 2100);
    lines_free(&l);
    finish(f);
}

static void test_history_lost_while_catching_up(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "mem", "memory", BCON_NEW("control", BCON_BOOL(false)));
    sink(f, 1, "slow", "fault",
         BCON_NEW("block_after", BCON_INT32(0), "block_ms", BCON_INT32(1500)));
    f->sinks[1].max_lag_events = 20;
    f->stream.on_history_lost = MC_ON_HISTORY_LOST_FAIL;
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 300);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 300, 10000), 0);
    run_cmd(f, BCON_NEW("emulatorTruncateOplog", BCON_INT32(1), "keepLast", BCON_INT32(5)));
    assert_int_equal(wait_sink_state(e, "slow", MC_SINK_FAILED, 10000), MC_SINK_FAILED);
    mc_sink_stats_t st = stats_of(e, "slow");
    assert_non_null(strstr(st.message, "history lost"));
    assert_false(mc_engine_ready(e)); /* a failed durable sink */
    mc_stream_status_t ss;
    mc_engine_stream_status(e, "s0", &ss);
    assert_int_equal(ss.state, MC_STREAM_OPEN); /* the stream itself goes on */
    insert_range(f, "c0", 300, 10);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 310, 5000), 0);
    finish(f);

    /* restart: the sink gets a reset and rejoins the live stream. */
    emu_fixture_rm_dir(f->dir);
    mkdir(f->dir, 0700);
    f->stream.on_history_lost = MC_ON_HISTORY_LOST_RESTART;
    sink(f, 1, "slow", "fault",
         BCON_NEW("block_after", BCON_INT32(0), "block_ms", BCON_INT32(1500), "control",
                  BCON_BOOL(true)));
    f->sinks[1].max_lag_events = 20;
    e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 1000, 300);
    /* The shared path has read everything: only the detached sink loses its history. */
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 300, 10000), 0);
    run_cmd(f, BCON_NEW("emulatorTruncateOplog", BCON_INT32(1), "keepLast", BCON_INT32(5)));
    assert_int_equal(wait_sink_state(e, "slow", MC_SINK_RUNNING, 10000), MC_SINK_RUNNING);
    for (int i = 0; i < 200 && count_resets(f->files[1]) == 0; i++) {
        usleep(20000);
    }
    lines_t l = read_lines(f->files[1]);
    assert_int_equal(l.resets, 1);
    size_t before = l.n;
    lines_free(&l);
    insert_range(f, "c0", 2000, 5);
    if (!wait_lines(f->files[1], before + 5, 5000)) {
        mc_sink_stats_t st2 = stats_of(e, "slow");
        mc_stream_status_t ss2;
        mc_engine_stream_status(e, "s0", &ss2);
        fail_msg("slow: %zu lines (before %zu), state %s (%s), lag %llu, detaches %llu, stream "
                 "%s (%s), published %llu",
                 count_lines(f->files[1]), before, mc_sink_state_name(st2.state), st2.message,
                 (unsigned long long)st2.lag_events, (unsigned long long)st2.detaches,
                 mc_stream_state_name(ss2.state), ss2.message, (unsigned long long)st2.published);
    }
    l = read_lines(f->files[1]);
    assert_int_equal(l.doc[l.n - 1], 2004);
    lines_free(&l);
    assert_true(mc_engine_ready(e));
    finish(f);
}

static void test_sinks_resume_from_their_own_positions(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "fast", "fault", NULL);
    /* Takes every event but stops acking at the 11th: its position stays at the 10th. */
    sink(f, 1, "behind", "fault_async", BCON_NEW("block_after", BCON_INT32(10)));
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 50);
    assert_true(wait_lines(f->files[0], 50, 10000));
    assert_true(wait_lines(f->files[1], 50, 10000));
    usleep(200000);
    finish(f);
    char fast[512], behind[512], whole[512];
    stored(f, "fast", fast, sizeof(fast));
    stored(f, "behind", behind, sizeof(behind));
    stored(f, NULL, whole, sizeof(whole));
    lines_t b = read_lines(f->files[1]);
    assert_int_equal(b.n, 50);
    assert_string_equal(behind, b.id[9]); /* the 10th event, the last one acked */
    lines_free(&b);
    assert_true(strcmp(behind, fast) < 0);
    assert_string_equal(whole, behind); /* the stream record: the oldest of its sinks' */

    sink_file(f, 1, "behind", "fault_async", NULL, true); /* appends to the same file */
    e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 50, 10);
    assert_true(wait_lines(f->files[0], 60, 10000));
    if (!wait_lines(f->files[1], 50 + 50, 10000)) {
        fail_msg("behind has %zu lines", count_lines(f->files[1]));
    }
    usleep(300000);
    lines_t a = read_lines(f->files[0]);
    b = read_lines(f->files[1]);
    /* "fast" got only what is new; "behind" went on right after its own position: every
     * document in order, repeating only what came after that position. */
    assert_exactly(&a, 0, 60);
    assert_int_equal(b.n, 100);
    for (size_t i = 50; i < b.n; i++) {
        assert_int_equal(b.doc[i], 10 + (int)(i - 50));
        assert_true(strcmp(b.id[i], behind) > 0);
    }
    lines_free(&a);
    lines_free(&b);
    finish(f);
}

static void test_async_and_out_of_order_acks(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "late", "fault_async",
         BCON_NEW("ack", BCON_UTF8("late"), "ack_delay_ms", BCON_INT32(20)));
    sink(f, 1, "rev", "fault", BCON_NEW("ack", BCON_UTF8("reverse")));
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 500);
    assert_true(wait_lines(f->files[0], 500, 10000));
    assert_true(wait_lines(f->files[1], 500, 10000));
    lines_t a = read_lines(f->files[0]);
    lines_t b = read_lines(f->files[1]);
    assert_exactly(&a, 0, 500);
    assert_exactly(&b, 0, 500);
    char last[512];
    snprintf(last, sizeof(last), "%s", a.id[499]);
    lines_free(&a);
    lines_free(&b);
    /* Both positions reach the last event once its acks are in. */
    char pa[512], pb[512];
    for (int i = 0; i < 200; i++) {
        if (strcmp(stored(f, "late", pa, sizeof(pa)), last) >= 0 &&
            strcmp(stored(f, "rev", pb, sizeof(pb)), last) >= 0) {
            break;
        }
        usleep(20000);
    }
    assert_true(strcmp(pa, last) >= 0);
    assert_true(strcmp(pb, last) >= 0);
    assert_int_equal(stats_of(e, "late").lag_events, 0);
    assert_int_equal(mc_engine_stop(e, NULL), 0);
    finish(f);
}

/* Inserts {_id: first+i, o: owner} for i < n into shop.items. */
static void insert_owned(fixture_t *f, int first, int n, int owner)
{
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", "items");
    for (int i = 0; i < n; i++) {
        bson_t *d = BCON_NEW("_id", BCON_INT32(first + i), "o", BCON_INT32(owner));
        bson_error_t e;
        bool ok = mongoc_collection_insert_one(c, d, NULL, NULL, &e);
        bson_destroy(d);
        if (!ok) {
            fail_msg("insert failed: %s", e.message);
        }
    }
    mongoc_collection_destroy(c);
}

static void set_owner_user(fixture_t *f, int owner, const char *user)
{
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", "owners");
    bson_t *sel = BCON_NEW("_id", BCON_INT32(owner));
    bson_t *doc = BCON_NEW("_id", BCON_INT32(owner), "user", BCON_UTF8(user));
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true));
    bson_error_t e;
    bool ok = mongoc_collection_replace_one(c, sel, doc, opts, NULL, &e);
    bson_destroy(sel);
    bson_destroy(doc);
    bson_destroy(opts);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("replace failed: %s", e.message);
    }
}

/* The recipient of each change line of a fault sink's file, by document id (NULL: none). */
static char *recipient_of(const char *path, int doc_id)
{
    FILE *fp = fopen(path, "r");
    char *line = NULL, *found = NULL;
    size_t cap = 0;
    while (fp && !found && getline(&line, &cap, fp) > 0) {
        bson_t doc;
        bson_error_t err;
        if (!bson_init_from_json(&doc, line, -1, &err)) {
            continue;
        }
        bson_iter_t it, v;
        if (bson_iter_init(&it, &doc) &&
            bson_iter_find_descendant(&it, "change.fullDocument._id", &v) &&
            bson_iter_int32(&v) == doc_id && bson_iter_init_find(&it, &doc, "recipient")) {
            found = strdup(BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : "(null)");
        }
        bson_destroy(&doc);
    }
    free(line);
    if (fp) {
        fclose(fp);
    }
    return found;
}

/* A detached sink's catch-up reads events the watcher routed long ago: it routes them again
 * as of each event's own cluster time (its own lookup stream, started at the first event it
 * reads), exactly as the shared path did, however the lookup collection changed since. */
static void test_catchup_routes_as_of_each_event(void **state)
{
    NEED_EMULATOR();
    bson_error_t e;
    bson_t *cmd = BCON_NEW("create", "owners", "changeStreamPreAndPostImages", "{", "enabled",
                           BCON_BOOL(true), "}");
    assert_true(mongoc_client_command_simple(f->cli, "shop", cmd, NULL, NULL, &e));
    bson_destroy(cmd);
    set_owner_user(f, 1, "alice");
    snprintf(f->coll, sizeof(f->coll), "items");
    snprintf(f->rpath, sizeof(f->rpath), "fullDocument.o");
    mc_recipient_lookup_t lookup = {.db = f->db,
                                    .collection = (char *)"owners",
                                    .field = (char *)"_id",
                                    .recipient = (char *)"user",
                                    .cache_size = 100};
    f->stream.recipient = f->rpath;
    f->stream.lookup = &lookup;
    sink(f, 0, "live", "fault", NULL);
    sink(f, 1, "slow", "fault",
         BCON_NEW("block_after", BCON_INT32(5), "block_ms", BCON_INT32(2000)));
    f->sinks[1].max_lag_events = 20;
    mc_engine_t *e2 = start(f);
    assert_true(wait_ready(e2));
    insert_owned(f, 0, 200, 1);
    assert_true(wait_lines(f->files[0], 200, 10000));
    /* The owner changes while "slow" is detached and has not read these events yet. */
    set_owner_user(f, 1, "bob");
    insert_owned(f, 200, 20, 1);
    assert_true(wait_lines(f->files[0], 220, 10000));
    assert_true(wait_lines(f->files[1], 220, 20000));
    assert_true(stats_of(e2, "slow").detaches >= 1);
    for (int id = 0; id < 220; id++) {
        char *a = recipient_of(f->files[0], id);
        char *b = recipient_of(f->files[1], id);
        const char *want = id < 200 ? "alice" : "bob";
        if (!a || !b || strcmp(a, want) != 0 || strcmp(b, want) != 0) {
            fail_msg("item %d: live %s, caught up %s, expected %s", id, a ? a : "-",
                     b ? b : "-", want);
        }
        free(a);
        free(b);
    }
    lines_t l = read_lines(f->files[1]);
    assert_exactly(&l, 0, 220);
    lines_free(&l);
    mc_stream_status_t ss;
    mc_engine_stream_status(e2, "s0", &ss);
    assert_int_equal(ss.unresolved_recipients, 0);
    finish(f);
    f->stream.recipient = NULL;
    f->stream.lookup = NULL;
}

static mc_stream_status_t wait_stream_failed(mc_engine_t *e);

/* Lines of a fault sink's file that are error events with `code`. */
static size_t count_errors(const char *path, const char *code)
{
    FILE *fp = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0, n = 0;
    char want[64];
    snprintf(want, sizeof(want), "\"code\":\"%s\"", code);
    while (fp && getline(&line, &cap, fp) > 0) {
        n += strstr(line, "\"type\":\"error\"") && strstr(line, want);
    }
    free(line);
    if (fp) {
        fclose(fp);
    }
    return n;
}

/* The stream fails while a sink is detached: the sink misses the error event on the shared
 * path, catches up to where the stream ended, and gets the error event as it rejoins. */
static void test_failed_stream_reaches_a_detached_sink(void **state)
{
    NEED_EMULATOR();
    sink(f, 0, "mem", "memory", NULL);
    sink(f, 1, "slow", "fault",
         BCON_NEW("block_after", BCON_INT32(5), "block_ms", BCON_INT32(2000), "control",
                  BCON_BOOL(true)));
    f->sinks[1].max_lag_events = 20;
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    insert_range(f, "c0", 0, 100);
    assert_int_equal(wait_sink_state(e, "slow", MC_SINK_CATCHING_UP, 5000), MC_SINK_CATCHING_UP);
    /* The catch-up waits for room in the blocked sink's queue: the next getMore is the
     * watcher's. */
    usleep(300000);
    run_cmd(f, BCON_NEW("configureFailPoint", "failCommand", "mode", "{", "times", BCON_INT32(1),
                        "}", "data", "{", "failCommands", "[", "getMore", "]", "errorCode",
                        BCON_INT32(280), "errorLabels", "[", "NonResumableChangeStreamError", "]",
                        "}"));
    mc_stream_status_t ss = wait_stream_failed(e);
    assert_int_equal(ss.state, MC_STREAM_FAILED);
    assert_true(wait_lines(f->files[1], 100, 10000));
    for (int i = 0; i < 300 && count_errors(f->files[1], MC_EVENT_ERROR_FATAL) == 0; i++) {
        usleep(20000);
    }
    assert_int_equal(count_errors(f->files[1], MC_EVENT_ERROR_FATAL), 1);
    lines_t l = read_lines(f->files[1]);
    assert_exactly(&l, 0, 100);
    lines_free(&l);
    assert_int_equal(wait_sink_state(e, "slow", MC_SINK_RUNNING, 5000), MC_SINK_RUNNING);
    finish(f);
}

/* A stored position replaced by hand, keeping the rest of the record. */
static void rewrite_record(fixture_t *f, const char *sinkname, const char *from, const char *to)
{
    char path[400];
    snprintf(path, sizeof(path), "%s/s0%s%s.json", f->dir, sinkname ? "@" : "",
             sinkname ? sinkname : "");
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char text[8192] = {0};
    size_t n = fread(text, 1, sizeof(text) - 1, fp);
    fclose(fp);
    assert_true(n > 0);
    char *at = strstr(text, from);
    assert_non_null(at);
    char out[8192];
    snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(out, fp);
    fclose(fp);
}

static mc_stream_status_t wait_stream_failed(mc_engine_t *e)
{
    mc_stream_status_t st;
    for (int i = 0; i < 500; i++) {
        mc_engine_stream_status(e, "s0", &st);
        if (st.state == MC_STREAM_FAILED) {
            break;
        }
        usleep(10000);
    }
    return st;
}

/* A refused record fails the stream like any failure: its sinks get the error event. */
static void assert_refused_event(mc_engine_t *e)
{
    mc_sink_t *m = mc_engine_sink(e, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 1, 5000), 0);
    mc_event_t *ev = mc_sink_memory_get(m, mc_sink_memory_count(m) - 1);
    assert_int_equal(mc_event_kind(ev), MC_EVENT_ERROR);
    assert_string_equal(mc_event_error_code(ev), MC_EVENT_ERROR_CHECKPOINT);
    mc_event_unref(&ev);
}

static void test_checkpoint_checks(void **state)
{
    NEED_EMULATOR();
    mc_log_set_handler(capture, NULL);
    mc_log_set_level(MC_LOG_INFO);
    sink(f, 0, "mem", "memory", NULL);
    mc_engine_t *e = start(f);
    assert_true(wait_ready(e));
    /* Missing: logged with the start position chosen. */
    assert_true(logged("no checkpoint for stream s0"));
    assert_true(logged("starting from now (server clusterTime "));
    insert_range(f, "c0", 0, 3);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 4, 5000), 0);
    finish(f);

    /* Another namespace. */
    snprintf(f->coll, sizeof(f->coll), "c1");
    e = start(f);
    mc_stream_status_t st = wait_stream_failed(e);
    assert_int_equal(st.state, MC_STREAM_FAILED);
    assert_non_null(strstr(st.message, "was written for shop.c0 but stream s0 now watches "
                                       "shop.c1"));
    assert_non_null(strstr(st.message, "Delete that checkpoint"));
    assert_refused_event(e);
    finish(f);
    snprintf(f->coll, sizeof(f->coll), "c0");

    /* Another definition: the events it emits would differ. */
    f->stream.full_document = MC_FULL_DOCUMENT_UPDATE_LOOKUP;
    e = start(f);
    st = wait_stream_failed(e);
    assert_int_equal(st.state, MC_STREAM_FAILED);
    assert_non_null(strstr(st.message, "another definition of stream s0 (full_document changed)"));
    assert_non_null(strstr(st.message, "\"definition\" field"));
    assert_refused_event(e);
    finish(f);
    f->stream.full_document = MC_FULL_DOCUMENT_DEFAULT;

    /* The same definition resumes (nothing was lost by the refusals). */
    insert_range(f, "c0", 3, 1);
    e = start(f);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(e, "mem"), 2, 5000), 0);
    mc_event_t *ev = mc_sink_memory_get(mc_engine_sink(e, "mem"), 1);
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, mc_event_document_key(ev), "_id"));
    assert_int_equal(bson_iter_int32(&it), 3);
    mc_event_unref(&ev);
    finish(f);

    /* From the future: a token an hour ahead of the server. */
    char tok[512];
    stored(f, "mem", tok, sizeof(tok));
    assert_true(strlen(tok) > 18);
    char future[512];
    unsigned long secs = strtoul(
        (char[]){tok[2], tok[3], tok[4], tok[5], tok[6], tok[7], tok[8], tok[9], 0}, NULL, 16);
    snprintf(future, sizeof(future), "82%08lX%s", secs + 3600, tok + 10);
    rewrite_record(f, "mem", tok, future);
    e = start(f);
    st = wait_stream_failed(e);
    assert_int_equal(st.state, MC_STREAM_FAILED);
    assert_non_null(strstr(st.message, "is from the future"));
    assert_non_null(strstr(st.message, "s0@mem.json"));
    finish(f);

    /* A record without a definition (an older mongocast) is accepted with a warning. */
    rewrite_record(f, "mem", future, tok);
    rewrite_record(f, "mem", "\"definition\"", "\"olddefinition\"");
    e = start(f);
    assert_true(wait_ready(e));
    assert_true(logged("has no stream definition"));
    finish(f);
    mc_log_set_handler(NULL, NULL);
}

int main(void)
{
    mongoc_init();
    mc_log_capture_mongoc();
    if (!emu_fixture_find()) {
        fprintf(stderr, "mongo-emulator not found: the runner engine tests are skipped\n");
    }
    signal(SIGPIPE, SIG_IGN);
    if (getenv("MC_TEST_LOG")) {
        mc_log_set_handler(mc_log_stderr_handler, NULL);
        mc_log_level_t level = MC_LOG_DEBUG;
        mc_log_level_parse(getenv("MC_TEST_LOG"), &level);
        mc_log_set_level(level);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_blocked_sink_holds_back_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_detached_sink_catches_up_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_lost_while_catching_up, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sinks_resume_from_their_own_positions, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_async_and_out_of_order_acks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_catchup_routes_as_of_each_event, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_stream_reaches_a_detached_sink, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_checks, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mongoc_cleanup();
    return rc;
}
