/*
 * test_engine_stats.c: the engine's observability and validation additions:
 *   - mc_engine_validate(): unknown sink types and bad options reported as start would
 *     (FILE:LINE:COL for config sinks), init+destroy on a scratch instance or the type's own
 *     validate(), nothing started, the engine still startable afterwards;
 *   - mc_engine_sink_count()/mc_engine_sink_stats(): published / skipped / failed / retries per
 *     sink instance while events flow (against mongo-emulator);
 *   - the checkpoint fields of mc_stream_status_t: time and position of the last successful
 *     token-store write, and failed writes counted while the store is broken.
 *
 * The validation tests need no MongoDB (nothing connects). The others spawn mongo-emulator
 * (emu_fixture.h) and are skipped when it is not built. Main thread plus the engine's threads;
 * the test sink types' counters are atomics because publish runs on the consumer thread.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mongoc/mongoc.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "mongocast.h"

#define DEAD_URI "mongodb://127.0.0.1:1/?replicaSet=rs0&serverSelectionTimeoutMS=200"

/* ---- Test sink types ------------------------------------------------------------------- */

/* Calls seen by the "probe" types, reset by each test. */
static atomic_int probe_inits, probe_destroys, probe_validates, probe_live;

typedef struct probe_ctx {
    int *resource; /* stands for what a real init acquires; destroy must free it */
} probe_ctx_t;

/* Accepts options {ok: true} only, like a real type checking its options. */
static int probe_check(const bson_t *options, mc_error_t *err)
{
    bson_iter_t it;
    if (options && bson_iter_init_find(&it, options, "ok") && BSON_ITER_HOLDS_BOOL(&it) &&
        bson_iter_bool(&it)) {
        return 0;
    }
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "probe wants ok: true");
}

static int probe_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    atomic_fetch_add(&probe_inits, 1);
    probe_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->resource = malloc(sizeof(int)); /* acquired even when the options are bad */
    atomic_fetch_add(&probe_live, 1);
    return probe_check(options, err);
}

static void probe_destroy(mc_sink_t *sink)
{
    atomic_fetch_add(&probe_destroys, 1);
    probe_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->resource) {
        free(ctx->resource);
        ctx->resource = NULL;
        atomic_fetch_sub(&probe_live, 1);
    }
}

static int probe_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    atomic_fetch_add(&probe_validates, 1);
    probe_ctx_t *ctx = mc_sink_ctx(sink);
    assert_non_null(ctx); /* a zeroed scratch ctx */
    assert_null(ctx->resource);
    return probe_check(options, err);
}

static int probe_publish(mc_sink_t *sink, mc_event_t *ev)
{
    (void)sink;
    (void)ev;
    return 0;
}

static const mc_sink_type_t probe_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "probe",
    .ctx_size = sizeof(probe_ctx_t),
    .init = probe_init,
    .publish = probe_publish,
    .destroy = probe_destroy,
};

/* The same checks, with a validate() slot: init must then never run for validation. */
static const mc_sink_type_t probe_v_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "probe-v",
    .ctx_size = sizeof(probe_ctx_t),
    .init = probe_init,
    .publish = probe_publish,
    .destroy = probe_destroy,
    .validate = probe_validate,
};

/* No ctx at all, but a destroy: it is still owed one destroy per init. */
static int noctx_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    (void)options;
    (void)err;
    atomic_fetch_add(&probe_inits, 1);
    return 0;
}

static void noctx_destroy(mc_sink_t *sink)
{
    assert_null(mc_sink_ctx(sink));
    atomic_fetch_add(&probe_destroys, 1);
}

static const mc_sink_type_t noctx_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "noctx",
    .init = noctx_init,
    .publish = probe_publish,
    .destroy = noctx_destroy,
};

/* Fails every change, skips everything else. */
static int failing_publish(mc_sink_t *sink, mc_event_t *ev)
{
    (void)sink;
    return mc_event_kind(ev) == MC_EVENT_CHANGE ? MC_EIO : MC_SINK_SKIP;
}

static int plain_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    (void)options;
    (void)err;
    return 0;
}

static const mc_sink_type_t failing_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "failing",
    .init = plain_init,
    .publish = failing_publish,
};

/* Answers MC_EAGAIN to the first offer of every event, then takes it. */
typedef struct again_ctx {
    uint64_t last_refused; /* seq; dispatch thread only */
} again_ctx_t;

static int again_publish(mc_sink_t *sink, mc_event_t *ev)
{
    again_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->last_refused != mc_event_seq(ev)) {
        ctx->last_refused = mc_event_seq(ev);
        return MC_EAGAIN;
    }
    return 0;
}

static const mc_sink_type_t again_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "again",
    .ctx_size = sizeof(again_ctx_t),
    .init = plain_init,
    .publish = again_publish,
};

/* ---- Config fixture -------------------------------------------------------------------- */

typedef struct fixture {
    pid_t emu; /* 0: no emulator (validation tests) */
    char uri[256];
    char cpdir[128];
    mongoc_client_t *cli;
    bson_t *pipeline;
    mc_stream_config_t stream;
    mc_sink_config_t sinks[3];
    bson_t *options[3];
    mc_config_t cfg;
    mc_engine_t *engine; /* destroyed by teardown, so a failed assertion leaks nothing */
} fixture_t;

/* One stream "s0" on shop.c0 and `n` config sinks (name, type, options taken). */
static void config(fixture_t *f, size_t n, ...)
{
    va_list ap;
    va_start(ap, n);
    for (size_t i = 0; i < n; i++) {
        const char *name = va_arg(ap, const char *);
        const char *type = va_arg(ap, const char *);
        f->options[i] = va_arg(ap, bson_t *);
        f->sinks[i] = (mc_sink_config_t){.name = (char *)name,
                                         .type = (char *)type,
                                         .options = f->options[i],
                                         .pos = {.line = 10 + (int)i, .col = 5}};
    }
    va_end(ap);
    f->cfg.n_sinks = n;
}

static fixture_t *fixture_new(bool emulator)
{
    fixture_t *f = calloc(1, sizeof(*f));
    if (emulator) {
        f->emu = emu_fixture_start(f->uri, sizeof(f->uri));
        if (f->emu < 0) {
            free(f);
            return NULL;
        }
        f->cli = mongoc_client_new(f->uri);
    } else {
        snprintf(f->uri, sizeof(f->uri), "%s", DEAD_URI);
    }
    snprintf(f->cpdir, sizeof(f->cpdir), "/tmp/mc_test_engine_stats.XXXXXX");
    assert_non_null(mkdtemp(f->cpdir));
    f->pipeline = bson_new();
    f->stream = (mc_stream_config_t){
        .name = "s0",
        .db = "shop",
        .collection = "c0",
        .pipeline = f->pipeline,
        .max_await_time_ms = 100,
    };
    f->cfg = (mc_config_t){.path = "conf.yaml",
                           .mongodb_uri = f->uri,
                           .streams = &f->stream,
                           .n_streams = 1,
                           .sinks = f->sinks};
    f->cfg.checkpoint.store = MC_CHECKPOINT_FILE;
    f->cfg.checkpoint.path = f->cpdir;
    f->cfg.checkpoint.interval_ms = 50;
    atomic_store(&probe_inits, 0);
    atomic_store(&probe_destroys, 0);
    atomic_store(&probe_validates, 0);
    atomic_store(&probe_live, 0);
    return f;
}

static int setup_plain(void **state)
{
    *state = fixture_new(false);
    return *state ? 0 : -1;
}

static int setup_emu(void **state)
{
    if (!emu_fixture_path[0]) {
        *state = NULL;
        return 0;
    }
    *state = fixture_new(true);
    return *state ? 0 : -1;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f) {
        return 0;
    }
    mc_engine_destroy(f->engine);
    if (f->cli) {
        mongoc_client_destroy(f->cli);
    }
    if (f->emu > 0) {
        emu_fixture_stop(f->emu);
    }
    for (size_t i = 0; i < 3; i++) {
        if (f->options[i]) {
            bson_destroy(f->options[i]);
        }
    }
    bson_destroy(f->pipeline);
    emu_fixture_rm_dir(f->cpdir);
    free(f);
    return 0;
}

#define NEED_EMULATOR()                                                                            \
    fixture_t *f = *state;                                                                         \
    if (!f) {                                                                                      \
        skip();                                                                                    \
    }

static mc_engine_t *engine_new(fixture_t *f)
{
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, NULL, &err);
    if (!f->engine) {
        fail_msg("engine_new: %s", err.message);
    }
    return f->engine;
}

/* ---- mc_engine_validate() ---------------------------------------------------------------- */

static void test_validate_accepts_builtin_sinks_and_leaves_engine_startable(void **state)
{
    fixture_t *f = *state;
    config(f, 2, "out", "stdout", BCON_NEW("raw", BCON_BOOL(true)), "mem", "memory",
           BCON_NEW("max_events", BCON_INT32(5), "auto_ack", BCON_BOOL(false)));
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_validate(e, &err), 0);
    assert_int_equal(mc_engine_validate(e, &err), 0); /* repeatable: nothing was consumed */
    /* Nothing ran: no checkpoint file was written, no stream left idle. */
    mc_stream_status_t st;
    assert_int_equal(mc_engine_stream_status(e, "s0", &st), 0);
    assert_int_equal(st.state, MC_STREAM_IDLE);
    /* The real instances were left alone: start initialises them as usual. */
    f->cfg.checkpoint.path = NULL;
    mc_engine_opts_t opts = {.no_checkpoint = true};
    mc_engine_destroy(e);
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    assert_non_null(f->engine);
    assert_int_equal(mc_engine_validate(f->engine, &err), 0);
    assert_int_equal(mc_engine_start(f->engine, &err), 0);
    mc_sink_t *mem = mc_engine_sink(f->engine, "mem");
    assert_non_null(mem);
    assert_int_equal(mc_sink_memory_ack_all(mem), 0); /* MC_EINVAL if init had not run */
    /* After start, validation is refused. */
    assert_int_equal(mc_engine_validate(f->engine, &err), MC_EINVAL);
}

static void test_validate_unknown_type_with_position(void **state)
{
    fixture_t *f = *state;
    config(f, 2, "out", "stdout", NULL, "bad", "nosuch", NULL);
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "conf.yaml:11:5: sink bad: unknown sink type 'nosuch' "
                                     "(known types: stdout, memory, redis, nats, webhook, "
                                     "mongodb)");
    /* mc_engine_start() reports exactly the same. */
    mc_error_t serr = {0};
    assert_int_equal(mc_engine_start(e, &serr), MC_ECONFIG);
    assert_string_equal(serr.message, err.message);
    /* A near miss is named. */
    mc_engine_destroy(e);
    f->engine = NULL;
    config(f, 2, "out", "stdout", NULL, "bad", "stdot", NULL);
    e = engine_new(f);
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "conf.yaml:11:5: sink bad: unknown sink type 'stdot'; did "
                                     "you mean 'stdout'? (known types: stdout, memory, redis, nats, "
                                     "webhook, mongodb)");
}

static void test_validate_bad_options_with_position(void **state)
{
    fixture_t *f = *state;
    config(f, 1, "out", "stdout", BCON_NEW("bogus", BCON_INT32(1)));
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "conf.yaml:10:5: sink out: unknown option 'bogus' for sink "
                                     "type stdout (known: raw, ready)");
    mc_engine_destroy(e);

    bson_destroy(f->options[0]);
    config(f, 1, "mem", "memory", BCON_NEW("max_events", BCON_UTF8("many")));
    e = engine_new(f);
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "conf.yaml:10:5: sink mem: "));
    assert_non_null(strstr(err.message, "max_events"));
}

static void test_validate_runs_init_then_destroy_on_scratch(void **state)
{
    fixture_t *f = *state;
    config(f, 2, "good", "probe", BCON_NEW("ok", BCON_BOOL(true)), "bad", "probe", NULL);
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_register_sink_type(e, &probe_type, &err), 0);
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "conf.yaml:11:5: sink bad: probe wants ok: true");
    /* Both instances went through init and destroy, and what init acquired was freed, also
     * for the failing one. */
    assert_int_equal(atomic_load(&probe_inits), 2);
    assert_int_equal(atomic_load(&probe_destroys), 2);
    assert_int_equal(atomic_load(&probe_live), 0);
    mc_engine_destroy(e);
    f->engine = NULL;
    /* Destroying a never-started engine owes its sinks no destroy. */
    assert_int_equal(atomic_load(&probe_destroys), 2);
}

static void test_validate_prefers_type_validate(void **state)
{
    fixture_t *f = *state;
    config(f, 2, "good", "probe-v", BCON_NEW("ok", BCON_BOOL(true)), "bad", "probe-v",
           BCON_NEW("ok", BCON_BOOL(false)));
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_register_sink_type(e, &probe_v_type, &err), 0);
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "conf.yaml:11:5: sink bad: probe wants ok: true");
    assert_int_equal(atomic_load(&probe_validates), 2);
    assert_int_equal(atomic_load(&probe_inits), 0);
    assert_int_equal(atomic_load(&probe_destroys), 0);
}

static void test_validate_added_sinks_without_position(void **state)
{
    fixture_t *f = *state;
    config(f, 1, "out", "stdout", NULL);
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    bson_t *bad = BCON_NEW("ok", BCON_BOOL(false));
    assert_int_equal(mc_engine_add_sink(e, &probe_type, "extra", NULL, 0, bad, NULL, &err), 0);
    bson_destroy(bad);
    assert_int_equal(mc_engine_validate(e, &err), MC_ECONFIG);
    assert_string_equal(err.message, "sink extra: probe wants ok: true");
    assert_int_equal(atomic_load(&probe_live), 0);
}

static void test_destroy_owed_without_ctx(void **state)
{
    fixture_t *f = *state;
    config(f, 0);
    f->cfg.checkpoint.path = NULL;
    mc_engine_opts_t opts = {.no_checkpoint = true};
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    assert_non_null(f->engine);
    assert_int_equal(mc_engine_add_sink(f->engine, &noctx_type, "n", NULL, 0, NULL, NULL, &err), 0);
    assert_int_equal(mc_engine_validate(f->engine, &err), 0);
    assert_int_equal(atomic_load(&probe_inits), 1);
    assert_int_equal(atomic_load(&probe_destroys), 1);
    assert_int_equal(mc_engine_start(f->engine, &err), 0);
    assert_int_equal(atomic_load(&probe_inits), 2);
    mc_engine_destroy(f->engine);
    f->engine = NULL;
    assert_int_equal(atomic_load(&probe_destroys), 2);
}

/* ---- Per-sink counters ------------------------------------------------------------------ */

static void insert(fixture_t *f, int id)
{
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", "c0");
    bson_t *doc = BCON_NEW("_id", BCON_INT32(id));
    bson_error_t e;
    bool ok = mongoc_collection_insert_one(c, doc, NULL, NULL, &e);
    bson_destroy(doc);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("insert failed: %s", e.message);
    }
}

static void start_and_wait_open(fixture_t *f)
{
    mc_error_t err = {0};
    if (mc_engine_start(f->engine, &err) != 0) {
        fail_msg("engine_start: %s", err.message);
    }
    for (int i = 0; i < 500 && !mc_engine_ready(f->engine); i++) {
        usleep(10000);
    }
    assert_true(mc_engine_ready(f->engine));
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

static void test_sink_stats(void **state)
{
    NEED_EMULATOR();
    config(f, 2, "all", "memory", NULL, "changes", "memory", BCON_NEW("control", BCON_BOOL(false)));
    mc_engine_t *e = engine_new(f);
    mc_error_t err = {0};
    assert_int_equal(mc_engine_add_sink(e, &failing_type, "broken", NULL, 0, NULL, NULL, &err), 0);
    assert_int_equal(mc_engine_add_sink(e, &again_type, "slow", NULL, 0, NULL, NULL, &err), 0);
    assert_int_equal(mc_engine_sink_count(e), 4);
    mc_sink_stats_t st;
    assert_int_equal(mc_engine_sink_stats(e, 4, &st), MC_ENOTFOUND);
    /* Before start: names, the config's type names, zero counters. */
    assert_int_equal(mc_engine_sink_stats(e, 1, &st), 0);
    assert_string_equal(st.name, "changes");
    assert_string_equal(st.type, "memory");
    assert_int_equal(st.published + st.skipped + st.failed + st.retries, 0);

    start_and_wait_open(f);
    mc_sink_t *all = mc_engine_sink(e, "all");
    assert_int_equal(mc_sink_memory_wait(all, 1, 5000), 0); /* ready */
    for (int i = 1; i <= 3; i++) {
        insert(f, i);
    }
    assert_int_equal(mc_sink_memory_wait(all, 4, 5000), 0);
    /* Each sink has a runner of its own that counts a batch once it is through: wait until
     * every one has been offered all four events. */
    static const char *const names[] = {"all", "changes", "broken", "slow"};
    for (size_t k = 0; k < 4; k++) {
        for (int i = 0; i < 500; i++) {
            mc_sink_stats_t s = stats_of(e, names[k]);
            if (s.published + s.skipped + s.failed >= 4) {
                break;
            }
            usleep(10000);
        }
    }
    st = stats_of(e, "all");
    assert_string_equal(st.type, "memory");
    assert_int_equal(st.published, 4); /* ready + 3 inserts */
    assert_int_equal(st.skipped, 0);
    assert_int_equal(st.failed, 0);
    st = stats_of(e, "changes");
    assert_int_equal(st.published, 3);
    assert_int_equal(st.skipped, 1); /* control: false skips ready */
    st = stats_of(e, "broken");
    assert_string_equal(st.type, "failing");
    assert_int_equal(st.published, 0);
    assert_int_equal(st.skipped, 1);
    assert_int_equal(st.failed, 3);
    st = stats_of(e, "slow");
    assert_int_equal(st.published, 4);
    assert_int_equal(st.retries, 4); /* one MC_EAGAIN per event */
    assert_int_equal(st.failed, 0);
    /* The failing sink is not durable: it held nothing back. */
    mc_stream_status_t ss;
    mc_engine_stream_status(e, "s0", &ss);
    assert_int_equal(ss.events, 3);
}

/* ---- Checkpoint status -------------------------------------------------------------------- */

static mc_stream_status_t
wait_status(mc_engine_t *e, bool (*done)(const mc_stream_status_t *, const void *), const void *arg)
{
    mc_stream_status_t st;
    for (int i = 0; i < 500; i++) {
        mc_engine_stream_status(e, "s0", &st);
        if (done(&st, arg)) {
            break;
        }
        usleep(10000);
    }
    return st;
}

static bool written_seq_at_least(const mc_stream_status_t *st, const void *arg)
{
    return st->checkpoint_written_seq >= *(const uint64_t *)arg;
}

static bool failures_at_least(const mc_stream_status_t *st, const void *arg)
{
    return st->checkpoint_failures >= *(const uint64_t *)arg;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void test_checkpoint_status(void **state)
{
    NEED_EMULATOR();
    config(f, 1, "mem", "memory", NULL);
    mc_engine_t *e = engine_new(f);
    mc_stream_status_t st;
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.checkpoint_written_ms, 0);
    assert_int_equal(st.checkpoint_written_seq, 0);
    assert_int_equal(st.checkpoint_failures, 0);
    start_and_wait_open(f);

    int64_t before = wall_ms();
    insert(f, 1); /* seq 2, after ready */
    uint64_t want = 2;
    st = wait_status(e, written_seq_at_least, &want);
    int64_t after = wall_ms();
    assert_true(st.checkpoint_written_seq >= 2);
    assert_true(st.checkpoint_written_ms >= before);
    assert_true(st.checkpoint_written_ms <= after);
    /* The stored position's clusterTime is the insert's, to the second. */
    assert_true(st.checkpoint_event_ms >= before / 1000 * 1000 - 1000);
    assert_true(st.checkpoint_event_ms <= after);
    assert_int_equal(st.checkpoint_event_ms % 1000, 0);
    assert_int_equal(st.checkpoint_failures, 0);
    char path[300];
    snprintf(path, sizeof(path), "%s/s0.json", f->cpdir);
    assert_int_equal(access(path, F_OK), 0);

    /* Break the store: its directory becomes a file, so every write fails. */
    emu_fixture_rm_dir(f->cpdir);
    FILE *fp = fopen(f->cpdir, "w");
    assert_non_null(fp);
    fclose(fp);
    mc_stream_status_t good = st;
    insert(f, 2);
    want = 2;
    st = wait_status(e, failures_at_least, &want);
    assert_true(st.checkpoint_failures >= 2); /* retried at each interval */
    assert_int_equal(st.checkpoint_written_ms, good.checkpoint_written_ms);
    assert_int_equal(st.checkpoint_written_seq, good.checkpoint_written_seq);

    /* Repair it: the next interval writes the newer position. */
    unlink(f->cpdir);
    assert_int_equal(mkdir(f->cpdir, 0700), 0);
    want = good.checkpoint_written_seq + 1;
    st = wait_status(e, written_seq_at_least, &want);
    assert_true(st.checkpoint_written_seq > good.checkpoint_written_seq);
    assert_true(st.checkpoint_written_ms >= good.checkpoint_written_ms);
    uint64_t failures = st.checkpoint_failures;
    usleep(300000);
    mc_engine_stream_status(e, "s0", &st);
    assert_int_equal(st.checkpoint_failures, failures); /* no more failures once repaired */
}

static void test_no_checkpoint_fields_without_store(void **state)
{
    NEED_EMULATOR();
    config(f, 1, "mem", "memory", NULL);
    mc_engine_opts_t opts = {.no_checkpoint = true};
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    assert_non_null(f->engine);
    start_and_wait_open(f);
    insert(f, 1);
    assert_int_equal(mc_sink_memory_wait(mc_engine_sink(f->engine, "mem"), 2, 5000), 0);
    usleep(300000);
    mc_stream_status_t st;
    mc_engine_stream_status(f->engine, "s0", &st);
    assert_true(st.stored_seq >= 2);               /* the position is known in memory ... */
    assert_int_equal(st.checkpoint_written_ms, 0); /* ... but never written */
    assert_int_equal(st.checkpoint_written_seq, 0);
    assert_int_equal(st.checkpoint_failures, 0);
}

int main(void)
{
    mongoc_init();
    mc_log_capture_mongoc();
    if (!emu_fixture_find()) {
        fprintf(stderr, "mongo-emulator not found: the engine stats tests are skipped\n");
    }
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(
            test_validate_accepts_builtin_sinks_and_leaves_engine_startable, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_validate_unknown_type_with_position, setup_plain,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_validate_bad_options_with_position, setup_plain,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_validate_runs_init_then_destroy_on_scratch,
                                        setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_validate_prefers_type_validate, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_validate_added_sinks_without_position, setup_plain,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_destroy_owed_without_ctx, setup_plain, teardown),
        cmocka_unit_test_setup_teardown(test_sink_stats, setup_emu, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_status, setup_emu, teardown),
        cmocka_unit_test_setup_teardown(test_no_checkpoint_fields_without_store, setup_emu,
                                        teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mongoc_cleanup();
    return rc;
}
