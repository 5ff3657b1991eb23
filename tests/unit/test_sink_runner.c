/*
 * test_sink_runner.c: one sink runner driven directly (no MongoDB): events pushed as the
 * router would, a scripted test sink behind it. Covers in-order delivery with transient
 * retries, busy answers that do not count as attempts, max_attempts turning into a dead
 * letter, a permanent failure failing the sink, out-of-order acks completing only a prefix,
 * an asynchronous failure rewinding to the failed event, the queue bound, unclassified errors
 * of a non-durable sink, flush-time failures, stop with its deadline, and the lease gate
 * (a stream whose lease ran out on this node is fenced where the runner takes a batch).
 *
 * Threads: the test's main thread pushes and asserts; the runner's own thread publishes. The
 * script and the publish log are guarded by one mutex (publish runs on the runner thread).
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
#include <unistd.h>

#include "engine_private.h"

#define MAX_LOG 4096

/* ---- The scripted sink ----------------------------------------------------------------------- */

typedef struct script {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t log[MAX_LOG]; /* seqs publish() accepted, in call order */
    size_t n_log;
    mc_event_t *accepted[MAX_LOG]; /* durable + manual acks: what to ack later */
    size_t n_accepted;
    bool auto_ack;
    uint64_t transient_seq;    /* fail this seq transiently ... */
    int transient_times;       /* ... this many times (-1: always) */
    uint64_t busy_seq;         /* answer MC_EAGAIN for this seq ... */
    int busy_times;            /* ... this many times */
    uint64_t permanent_seq;    /* fail this seq permanently */
    uint64_t unclassified_seq; /* return MC_EIO (no class) for this seq once */
    bool gate_closed;          /* publish waits while closed */
    int flush_fail_times;      /* flushes that fail every buffered event (non-durable) */
    uint64_t buffered[MAX_LOG];
    mc_event_t *buffered_ev[MAX_LOG];
    size_t n_buffered;
} script_t;

static script_t S;

static void script_reset(void)
{
    pthread_mutex_destroy(&S.lock);
    pthread_cond_destroy(&S.cond);
    memset(&S, 0, sizeof(S));
    pthread_mutex_init(&S.lock, NULL);
    pthread_cond_init(&S.cond, NULL);
    S.auto_ack = true;
}

static int t_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    (void)options;
    (void)err;
    return 0;
}

static int t_publish(mc_sink_t *sink, mc_event_t *ev)
{
    uint64_t seq = mc_event_seq(ev);
    pthread_mutex_lock(&S.lock);
    while (S.gate_closed && !mc_sink_stopping(sink)) {
        pthread_cond_wait(&S.cond, &S.lock);
    }
    if (seq == S.busy_seq && S.busy_times > 0) {
        S.busy_times--;
        pthread_mutex_unlock(&S.lock);
        return MC_EAGAIN;
    }
    if (seq == S.transient_seq && S.transient_times != 0) {
        if (S.transient_times > 0) {
            S.transient_times--;
        }
        pthread_mutex_unlock(&S.lock);
        return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "scripted transient failure");
    }
    if (seq == S.permanent_seq) {
        pthread_mutex_unlock(&S.lock);
        return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "scripted permanent failure");
    }
    if (seq == S.unclassified_seq) {
        S.unclassified_seq = 0;
        pthread_mutex_unlock(&S.lock);
        return MC_EIO;
    }
    if (S.n_log < MAX_LOG) {
        S.log[S.n_log++] = seq;
    }
    bool durable = mc_sink_get_type(sink)->flags & MC_SINK_DURABLE;
    if (durable && !S.auto_ack && S.n_accepted < MAX_LOG) {
        S.accepted[S.n_accepted++] = mc_event_ref(ev);
    }
    if (!durable && S.n_buffered < MAX_LOG) {
        S.buffered_ev[S.n_buffered++] = mc_event_ref(ev);
    }
    pthread_cond_broadcast(&S.cond);
    pthread_mutex_unlock(&S.lock);
    if (durable && S.auto_ack) {
        mc_sink_ack(sink, ev);
    }
    return 0;
}

static void t_flush(mc_sink_t *sink)
{
    pthread_mutex_lock(&S.lock);
    bool fail = S.flush_fail_times > 0;
    if (fail) {
        S.flush_fail_times--;
    }
    size_t n = S.n_buffered;
    mc_event_t *evs[MAX_LOG];
    memcpy(evs, S.buffered_ev, n * sizeof(*evs));
    S.n_buffered = 0;
    pthread_mutex_unlock(&S.lock);
    for (size_t i = 0; i < n; i++) {
        if (fail) {
            mc_sink_fail(sink, evs[i], MC_SINK_TRANSIENT, 0, "scripted flush failure");
        }
        mc_event_unref(&evs[i]);
    }
}

static const mc_sink_type_t durable_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "tdurable",
    .flags = MC_SINK_DURABLE,
    .init = t_init,
    .publish = t_publish,
};

static const mc_sink_type_t plain_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "tplain",
    .flags = 0,
    .init = t_init,
    .publish = t_publish,
    .flush = t_flush,
};

/* ---- Fixture: an engine that is never started, one sink, its runner -------------------------- */

typedef struct fixture {
    char name[8];
    bson_t *pipeline;
    mc_stream_config_t stream;
    mc_config_t cfg;
    mc_engine_t *engine;
    mc_sink_t *sink;
    mc__runner_t *r;
    char dl_path[64];
} fixture_t;

static fixture_t F;

static void fixture_open(const mc_sink_type_t *type, uint32_t capacity,
                         const mc_sink_runner_opts_t *opts)
{
    script_reset();
    memset(&F, 0, sizeof(F));
    snprintf(F.name, sizeof(F.name), "s0");
    F.pipeline = bson_new();
    F.stream = (mc_stream_config_t){.name = F.name, .pipeline = F.pipeline};
    F.cfg = (mc_config_t){.mongodb_uri = "mongodb://127.0.0.1:1/?replicaSet=rs0",
                          .streams = &F.stream,
                          .n_streams = 1};
    mc_error_t err = {0};
    F.engine = mc_engine_new(&F.cfg, NULL, &err);
    assert_non_null(F.engine);
    assert_int_equal(mc_engine_add_sink(F.engine, type, "t", NULL, 0, NULL, NULL, &err), 0);
    F.sink = mc_engine_sink(F.engine, "t");
    F.sink->ropts = opts ? *opts : (mc_sink_runner_opts_t){0};
    if (!F.sink->ropts.retry_initial_ms) {
        F.sink->ropts.retry_initial_ms = 2;
    }
    if (!F.sink->ropts.retry_max_ms) {
        F.sink->ropts.retry_max_ms = 20;
    }
    F.sink->started = true;
    F.r = mc__runner_new(F.sink, MC__EXEC_THREAD, capacity, &err);
    assert_non_null(F.r);
    F.sink->runner = F.r;
    assert_int_equal(mc__runner_start(F.r, &err), 0);
}

/* Stops the runner (deadline `ms` from now) and frees everything; returns finish's result. */
static int fixture_close(int64_t ms)
{
    int64_t deadline = mc__now_ms() + ms;
    mc__runner_begin_stop(F.r, deadline);
    int rc = mc__runner_finish_stop(F.r, deadline, false);
    pthread_mutex_lock(&S.lock);
    for (size_t i = 0; i < S.n_accepted; i++) {
        mc_event_unref(&S.accepted[i]);
    }
    for (size_t i = 0; i < S.n_buffered; i++) {
        mc_event_unref(&S.buffered_ev[i]);
    }
    S.n_accepted = S.n_buffered = 0;
    pthread_mutex_unlock(&S.lock);
    mc_engine_destroy(F.engine); /* frees the sink and its runner */
    bson_destroy(F.pipeline);
    if (F.dl_path[0]) {
        unlink(F.dl_path);
    }
    return rc;
}

/* A change event with seq `seq` and a resume token that sorts by seq. */
static mc_event_t *event(uint64_t seq)
{
    char data[40];
    snprintf(data, sizeof(data), "82%016llX", (unsigned long long)(0x6000000000000000ull + seq));
    bson_t *change = BCON_NEW("_id", "{", "_data", BCON_UTF8(data), "}", "operationType", "insert",
                              "documentKey", "{", "_id", BCON_INT64((int64_t)seq), "}",
                              "fullDocument", "{", "_id", BCON_INT64((int64_t)seq), "}");
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("s0", seq, change, NULL, &err);
    bson_destroy(change);
    assert_non_null(ev);
    mc__event_set_stream_index(ev, 0);
    return ev;
}

static int push(uint64_t seq)
{
    mc__pref_t item = {.ev = event(seq)};
    int rc = mc__runner_push(F.r, 0, &item);
    mc__pref_clear(&item); /* taken on success, still ours otherwise */
    return rc;
}

static void push_range(uint64_t first, uint64_t last)
{
    for (uint64_t s = first; s <= last; s++) {
        assert_int_equal(push(s), 0);
    }
}

static bool wait_log(size_t n, int64_t ms)
{
    int64_t end = mc__now_ms() + ms;
    pthread_mutex_lock(&S.lock);
    while (S.n_log < n && mc__now_ms() < end) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&S.cond, &S.lock, &ts);
    }
    bool ok = S.n_log >= n;
    pthread_mutex_unlock(&S.lock);
    return ok;
}

/* The seq of the runner's complete position (0: none). */
static uint64_t done_seq(void)
{
    mc__pref_t p = {0};
    uint64_t seq = 0;
    mc__runner_take_done(F.r, 0, &p, NULL, &seq);
    uint64_t s = p.ev ? mc_event_seq(p.ev) : 0;
    mc__pref_clear(&p);
    return s;
}

static bool wait_done(uint64_t seq, int64_t ms)
{
    int64_t end = mc__now_ms() + ms;
    while (done_seq() != seq && mc__now_ms() < end) {
        usleep(2000);
    }
    return done_seq() == seq;
}

static mc_sink_stats_t stats(void)
{
    mc_sink_stats_t st;
    assert_int_equal(mc_engine_sink_stats(F.engine, 0, &st), 0);
    return st;
}

static void assert_log_is(uint64_t first, uint64_t last)
{
    pthread_mutex_lock(&S.lock);
    size_t n = S.n_log;
    uint64_t log[MAX_LOG];
    memcpy(log, S.log, n * sizeof(*log));
    pthread_mutex_unlock(&S.lock);
    assert_int_equal(n, last - first + 1);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(log[i], first + i);
    }
}

/* ---- Tests ----------------------------------------------------------------------------------- */

static void test_in_order_with_transient_retries(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    S.transient_seq = 2;
    S.transient_times = 3;
    push_range(1, 20);
    assert_true(wait_log(20, 5000));
    assert_log_is(1, 20); /* nothing overtook the failing event, nothing twice */
    assert_true(wait_done(20, 2000));
    mc_sink_stats_t st = stats();
    assert_int_equal(st.retries, 3);
    assert_int_equal(st.published, 20);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.state, MC_SINK_RUNNING);
    assert_int_equal(st.lag_events, 0);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_retrying_state_while_failing(void **state)
{
    (void)state;
    mc_sink_runner_opts_t o = {.retry_initial_ms = 50, .retry_max_ms = 50};
    fixture_open(&durable_type, 64, &o);
    S.transient_seq = 1;
    S.transient_times = -1;
    push_range(1, 3);
    int64_t end = mc__now_ms() + 3000;
    mc_sink_stats_t st = stats();
    while (st.state != MC_SINK_RETRYING && mc__now_ms() < end) {
        usleep(2000);
        st = stats();
    }
    assert_int_equal(st.state, MC_SINK_RETRYING);
    assert_non_null(strstr(st.message, "scripted transient failure"));
    assert_int_equal(st.lag_events, 3);
    assert_int_equal(done_seq(), 0);
    pthread_mutex_lock(&S.lock);
    S.transient_times = 0; /* the destination recovers */
    pthread_mutex_unlock(&S.lock);
    assert_true(wait_log(3, 3000));
    assert_log_is(1, 3);
    assert_true(wait_done(3, 2000));
    assert_int_equal(stats().state, MC_SINK_RUNNING);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_busy_is_not_an_attempt(void **state)
{
    (void)state;
    mc_sink_runner_opts_t o = {.max_attempts = 2};
    fixture_open(&durable_type, 64, &o);
    S.busy_seq = 2;
    S.busy_times = 5;
    push_range(1, 4);
    assert_true(wait_log(4, 5000));
    assert_log_is(1, 4);
    mc_sink_stats_t st = stats();
    assert_int_equal(st.retries, 5);
    assert_int_equal(st.failed, 0);
    assert_int_equal(st.dead_letters, 0);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_max_attempts_then_dead_letter(void **state)
{
    (void)state;
    fixture_t tmp;
    snprintf(tmp.dl_path, sizeof(tmp.dl_path), "/tmp/mc_test_runner_dl.%d", (int)getpid());
    unlink(tmp.dl_path);
    mc_sink_runner_opts_t o = {.max_attempts = 3, .dead_letter_file = tmp.dl_path};
    fixture_open(&durable_type, 64, &o);
    snprintf(F.dl_path, sizeof(F.dl_path), "%s", tmp.dl_path);
    S.transient_seq = 3;
    S.transient_times = -1;
    push_range(1, 6);
    assert_true(wait_log(5, 5000));
    assert_true(wait_done(6, 2000)); /* the dead-lettered event is complete too */
    pthread_mutex_lock(&S.lock);
    uint64_t want[] = {1, 2, 4, 5, 6};
    assert_int_equal(S.n_log, 5);
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(S.log[i], want[i]);
    }
    pthread_mutex_unlock(&S.lock);
    mc_sink_stats_t st = stats();
    assert_int_equal(st.dead_letters, 1);
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.retries, 2); /* attempts 1 and 2 retried; the 3rd gave up */
    assert_int_equal(st.state, MC_SINK_RUNNING);
    FILE *fp = fopen(F.dl_path, "r");
    assert_non_null(fp);
    char line[4096] = {0};
    assert_non_null(fgets(line, sizeof(line), fp));
    assert_null(fgets(line + strlen(line), 10, fp)); /* exactly one line */
    fclose(fp);
    assert_non_null(strstr(line, "\"sink\":\"t\""));
    assert_non_null(strstr(line, "\"attempts\":3"));
    assert_non_null(strstr(line, "scripted transient failure"));
    assert_non_null(strstr(line, "\"documentKey\":{\"_id\":3}")); /* its message, compact */
    assert_int_equal(fixture_close(1000), 0);
    unlink(tmp.dl_path);
}

static void test_permanent_without_dead_letter_fails(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    S.permanent_seq = 5;
    S.gate_closed = true; /* all queued before the failure, which closes the queue */
    push_range(1, 8);
    pthread_mutex_lock(&S.lock);
    S.gate_closed = false;
    pthread_cond_broadcast(&S.cond);
    pthread_mutex_unlock(&S.lock);
    int64_t end = mc__now_ms() + 3000;
    while (stats().state != MC_SINK_FAILED && mc__now_ms() < end) {
        usleep(2000);
    }
    mc_sink_stats_t st = stats();
    assert_int_equal(st.state, MC_SINK_FAILED);
    assert_non_null(strstr(st.message, "scripted permanent failure"));
    assert_non_null(strstr(st.message, "no dead_letter"));
    assert_true(st.durable);
    assert_int_equal(st.failed, 1);
    assert_log_is(1, 4);
    assert_int_equal(done_seq(), 4); /* the position stays right before the failed event */
    assert_int_equal(push(9), MC_ECLOSED);
    assert_true(mc__runner_failed(F.r));
    fixture_close(1000);
}

static void test_out_of_order_acks_complete_a_prefix(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    S.auto_ack = false;
    push_range(1, 6);
    assert_true(wait_log(6, 3000));
    pthread_mutex_lock(&S.lock);
    mc_event_t *acc[6];
    memcpy(acc, S.accepted, sizeof(acc));
    pthread_mutex_unlock(&S.lock);
    mc_sink_ack(F.sink, acc[2]); /* 3 */
    mc_sink_ack(F.sink, acc[0]); /* 1 */
    assert_true(wait_done(1, 1000));
    mc_sink_ack(F.sink, acc[4]); /* 5 */
    mc_sink_ack(F.sink, acc[1]); /* 2: 1..3 complete */
    assert_true(wait_done(3, 1000));
    assert_int_equal(stats().lag_events, 3);
    assert_int_equal(mc_sink_ack_seq(F.sink, "s0", 4), 0); /* by seq: 1..5 */
    assert_true(wait_done(5, 1000));
    mc_sink_ack(F.sink, acc[4]); /* a second ack is ignored */
    assert_int_equal(mc_sink_ack_seq(F.sink, "nope", 6), MC_ENOTFOUND);
    mc_sink_ack(F.sink, acc[5]);
    assert_true(wait_done(6, 1000));
    assert_int_equal(stats().lag_events, 0);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_async_failure_rewinds_to_the_failed_event(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    S.auto_ack = false;
    push_range(1, 5);
    assert_true(wait_log(5, 3000));
    pthread_mutex_lock(&S.lock);
    mc_event_t *acc[5];
    memcpy(acc, S.accepted, sizeof(acc));
    S.n_accepted = 0;
    pthread_mutex_unlock(&S.lock);
    mc_sink_ack(F.sink, acc[0]);
    mc_sink_ack(F.sink, acc[1]);
    mc_sink_ack(F.sink, acc[4]); /* 5 acked before the failure of 3 */
    assert_int_equal(mc_sink_fail(F.sink, acc[2], MC_SINK_TRANSIENT, 0, "late timeout"), MC_EIO);
    /* 3 and 4 are offered again, in order; 5 was acked, so it is not sent twice. */
    assert_true(wait_log(7, 3000));
    pthread_mutex_lock(&S.lock);
    assert_int_equal(S.log[5], 3);
    assert_int_equal(S.log[6], 4);
    mc_event_t *again[2] = {S.accepted[0], S.accepted[1]};
    S.n_accepted = 0;
    pthread_mutex_unlock(&S.lock);
    assert_int_equal(done_seq(), 2);
    mc_sink_ack(F.sink, again[0]);
    mc_sink_ack(F.sink, again[1]);
    assert_true(wait_done(5, 1000));
    usleep(50000);
    pthread_mutex_lock(&S.lock);
    assert_int_equal(S.n_log, 7);
    pthread_mutex_unlock(&S.lock);
    assert_int_equal(stats().retries, 1);
    for (int i = 0; i < 5; i++) {
        mc_event_unref(&acc[i]);
    }
    mc_event_unref(&again[0]);
    mc_event_unref(&again[1]);
    assert_int_equal(fixture_close(1000), 0);
}

/* A durable sink accepts each offer and reports the failure later (a callback): the accepted
 * publish() is not a success, so the attempts add up to max_attempts and the event goes to the
 * dead letter instead of being offered for ever. */
static void test_async_failures_count_to_max_attempts(void **state)
{
    (void)state;
    fixture_t tmp;
    snprintf(tmp.dl_path, sizeof(tmp.dl_path), "/tmp/mc_test_runner_dl_async.%d", (int)getpid());
    unlink(tmp.dl_path);
    mc_sink_runner_opts_t o = {.max_attempts = 3, .dead_letter_file = tmp.dl_path};
    fixture_open(&durable_type, 64, &o);
    snprintf(F.dl_path, sizeof(F.dl_path), "%s", tmp.dl_path);
    S.auto_ack = false;
    push_range(1, 2);
    for (size_t offers = 1; offers <= 3; offers++) {
        assert_true(wait_log(offers + 1, 3000)); /* 1, then 2 offered once more per failure */
        pthread_mutex_lock(&S.lock);
        mc_event_t *acc[MAX_LOG];
        size_t n = S.n_accepted;
        memcpy(acc, S.accepted, n * sizeof(*acc));
        S.n_accepted = 0;
        pthread_mutex_unlock(&S.lock);
        for (size_t i = 0; i < n; i++) {
            if (mc_event_seq(acc[i]) == 1) {
                mc_sink_ack(F.sink, acc[i]);
            } else {
                mc_sink_fail(F.sink, acc[i], MC_SINK_TRANSIENT, 0, "late failure");
            }
            mc_event_unref(&acc[i]);
        }
    }
    assert_true(wait_done(2, 3000)); /* the third failure gave up: dead-lettered */
    usleep(50000);
    pthread_mutex_lock(&S.lock);
    assert_int_equal(S.n_log, 4); /* 1, and 2 three times: never a fourth offer */
    pthread_mutex_unlock(&S.lock);
    mc_sink_stats_t st = stats();
    assert_int_equal(st.dead_letters, 1);
    assert_int_equal(st.retries, 2);
    FILE *fp = fopen(F.dl_path, "r");
    assert_non_null(fp);
    char line[4096] = {0};
    assert_non_null(fgets(line, sizeof(line), fp));
    fclose(fp);
    assert_non_null(strstr(line, "\"attempts\":3"));
    /* A later event fails once and then succeeds: a new count, not the old one's. */
    S.auto_ack = true;
    S.transient_seq = 3;
    S.transient_times = 2;
    push_range(3, 3);
    assert_true(wait_done(3, 5000));
    assert_int_equal(stats().dead_letters, 1);
    assert_int_equal(fixture_close(1000), 0);
    unlink(tmp.dl_path);
}

static void test_queue_is_bounded(void **state)
{
    (void)state;
    fixture_open(&durable_type, 8, NULL);
    S.gate_closed = true;
    /* One event sits in publish() behind the gate; the queue holds 8 in all. */
    uint64_t seq = 1;
    int rc;
    while ((rc = push(seq)) == 0) {
        seq++;
        assert_true(seq < 100);
    }
    assert_int_equal(rc, MC_EAGAIN);
    assert_int_equal(seq - 1, 8);
    assert_int_equal(stats().lag_events, 8);
    pthread_mutex_lock(&S.lock);
    S.gate_closed = false;
    pthread_cond_broadcast(&S.cond);
    pthread_mutex_unlock(&S.lock);
    assert_true(wait_log(8, 3000));
    assert_true(wait_done(8, 1000));
    assert_int_equal(push(9), 0); /* room again */
    assert_true(wait_log(9, 3000));
    assert_log_is(1, 9);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_unclassified_error_of_non_durable_sink_drops(void **state)
{
    (void)state;
    fixture_open(&plain_type, 64, NULL);
    S.unclassified_seq = 2;
    push_range(1, 4);
    assert_true(wait_log(3, 3000));
    assert_true(wait_done(4, 1000));
    pthread_mutex_lock(&S.lock);
    assert_int_equal(S.log[0], 1);
    assert_int_equal(S.log[1], 3);
    assert_int_equal(S.log[2], 4);
    pthread_mutex_unlock(&S.lock);
    mc_sink_stats_t st = stats();
    assert_int_equal(st.failed, 1);
    assert_int_equal(st.retries, 0);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_flush_failure_offers_the_batch_again(void **state)
{
    (void)state;
    fixture_open(&plain_type, 64, NULL);
    S.flush_fail_times = 1;
    S.gate_closed = true; /* let 1..4 queue up so that they form one batch */
    push_range(1, 4);
    pthread_mutex_lock(&S.lock);
    S.gate_closed = false;
    pthread_cond_broadcast(&S.cond);
    pthread_mutex_unlock(&S.lock);
    assert_true(wait_log(8, 3000));
    assert_true(wait_done(4, 1000));
    pthread_mutex_lock(&S.lock);
    /* The first flush failed: every event of that batch is offered again, in order. */
    uint64_t want[] = {1, 2, 3, 4, 1, 2, 3, 4};
    assert_int_equal(S.n_log, 8);
    for (size_t i = 0; i < 8; i++) {
        assert_int_equal(S.log[i], want[i]);
    }
    pthread_mutex_unlock(&S.lock);
    assert_int_equal(stats().retries, 1);
    assert_int_equal(fixture_close(1000), 0);
}

static void test_stop_delivers_then_gives_up_at_deadline(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    push_range(1, 5);
    assert_int_equal(fixture_close(2000), 0); /* everything held is delivered before stop */
    assert_log_is(1, 5);

    fixture_open(&durable_type, 64, NULL);
    S.transient_seq = 2;
    S.transient_times = -1;
    push_range(1, 3);
    assert_true(wait_log(1, 2000));
    int64_t t0 = mc__now_ms();
    assert_int_equal(fixture_close(200), MC_EAGAIN); /* 2 never works: gives up in time */
    assert_true(mc__now_ms() - t0 < 2000);
}


/* lease.enabled: the runner's gate. While the stream's lease_until is ahead, the runner
 * publishes; once it has passed (a holder that could not renew), the runner publishes nothing
 * more of that stream: it fences the slot where it takes a batch, drops what is queued, refuses
 * new pushes and shows `standby`. */
static void test_lease_gate_fences_the_slot(void **state)
{
    (void)state;
    fixture_open(&durable_type, 64, NULL);
    mc__stream_t *st = &F.engine->streams[0];
    st->leased = true;
    atomic_store(&st->lease_epoch, 7);
    atomic_store(&st->lease_until, mc__now_ms() + 60000);
    F.engine->lease = (struct mc__lease *)&F; /* only tested for NULL by the runner */
    push_range(1, 3);
    assert_true(wait_log(3, 5000));
    mc_event_t *ev = event(1);
    assert_int_equal(mc_sink_lease_epoch(F.sink, ev), 7);
    assert_true(mc_sink_lease_valid(F.sink, ev));
    /* The lease runs out on this node: nothing more goes out. */
    atomic_store(&st->lease_until, mc__now_ms() - 1);
    assert_false(mc_sink_lease_valid(F.sink, ev));
    mc_event_unref(&ev);
    for (uint64_t q = 4; q <= 6; q++) {
        /* Accepted while nobody fenced the slot yet, refused once the runner did. */
        int rc = push(q);
        assert_true(rc == 0 || rc == MC_ECLOSED);
    }
    int64_t end = mc__now_ms() + 5000;
    while (stats().state != MC_SINK_STANDBY && mc__now_ms() < end) {
        usleep(2000);
    }
    assert_int_equal(stats().state, MC_SINK_STANDBY); /* the runner fenced it itself */
    assert_true(mc__runner_fenced(F.r, 0));
    usleep(100000);
    assert_log_is(1, 3);
    assert_int_equal(push(7), MC_ECLOSED);
    assert_int_equal(done_seq(), 3); /* what it completed before stays its position */
    F.engine->lease = NULL;
    assert_int_equal(fixture_close(1000), 0);
}

int main(void)
{
    pthread_mutex_init(&S.lock, NULL);
    pthread_cond_init(&S.cond, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_in_order_with_transient_retries),
        cmocka_unit_test(test_retrying_state_while_failing),
        cmocka_unit_test(test_busy_is_not_an_attempt),
        cmocka_unit_test(test_max_attempts_then_dead_letter),
        cmocka_unit_test(test_async_failures_count_to_max_attempts),
        cmocka_unit_test(test_permanent_without_dead_letter_fails),
        cmocka_unit_test(test_out_of_order_acks_complete_a_prefix),
        cmocka_unit_test(test_async_failure_rewinds_to_the_failed_event),
        cmocka_unit_test(test_queue_is_bounded),
        cmocka_unit_test(test_unclassified_error_of_non_durable_sink_drops),
        cmocka_unit_test(test_flush_failure_offers_the_batch_again),
        cmocka_unit_test(test_stop_delivers_then_gives_up_at_deadline),
        cmocka_unit_test(test_lease_gate_fences_the_slot),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
