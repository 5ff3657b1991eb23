/*
 * test_redis_client.c: the Redis client and the exactly-once XADD against a real
 * redis-server started on a free loopback port: URLs, error classes, pipelined replies in
 * order, AUTH and SELECT, a server that is down at start, a server that accepts and never
 * answers, a restart with appendonly on, and every outcome of a refused entry ID.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "broker_fixture.h"
#include "sinks/redis_client.h"
#include "sinks/redis_stream.h"

/* ---- URLs and classes (no server) ----------------------------------------------------- */

static void test_url_parse(void **state)
{
    (void)state;
    mc__redis_url_t u;
    const char *s = "redis://127.0.0.1:7000/3";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 7000);
    assert_int_equal(u.db, 3);
    assert_false(u.has_password);
    s = "redis://alice:p%40ss%3Aw%2Frd@cache.example:6380";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    assert_string_equal(u.user, "alice");
    assert_string_equal(u.password, "p@ss:w/rd");
    assert_string_equal(u.host, "cache.example");
    assert_int_equal(u.db, 0);
    s = "redis://:secret@[::1]/0";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 6379);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "secret");
    s = "redis://secret@h";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    assert_string_equal(u.password, "secret");
    assert_string_equal(u.user, "");
    s = "REDIS://h/";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    char red[700];
    s = "redis://bob:hunter2@h:1/2";
    assert_int_equal(mc__redis_url_parse(s, strlen(s), &u, NULL), 0);
    assert_string_equal(mc__redis_url_redact(&u, red, sizeof red), "redis://bob:***@h:1/2");

    const char *bad[] = {
        "",
        "http://h",
        "rediss://h",
        "redis://",
        "redis://:pw@",
        "redis://h:0",
        "redis://h:65536",
        "redis://h:x",
        "redis://h/x",
        "redis://h/-1",
        "redis://h/1?timeout=3",
        "redis://h#f",
        "redis://u:p%zz@h",
        "redis://u:p%00@h",
        "redis://u:p%4@h",
        "redis://[::1",
        "redis://[]:1",
        "redis://[::1]x",
        "redis://h h",
        "redis://h/99999999999",
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        mc_error_t err;
        mc_error_clear(&err);
        if (mc__redis_url_parse(bad[k], strlen(bad[k]), &u, &err) != MC_ECONFIG) {
            fail_msg("\"%s\" was accepted", bad[k]);
        }
        assert_non_null(strstr(err.message, "redis url"));
        assert_null(strstr(err.message, "p%"));
    }
    /* An embedded NUL is refused, not read as the end. */
    assert_int_equal(mc__redis_url_parse("redis://h\0x", 11, &u, NULL), MC_ECONFIG);
}

static void test_classify(void **state)
{
    (void)state;
    redisReply r;
    memset(&r, 0, sizeof r);
    assert_int_equal(mc__redis_classify(NULL), MC__REDIS_TRANSIENT);
    r.type = REDIS_REPLY_STATUS;
    r.str = "OK";
    assert_int_equal(mc__redis_classify(&r), MC__REDIS_OK);
    r.type = REDIS_REPLY_ERROR;
    const char *transient[] = {"LOADING Redis is loading",
                               "OOM command not allowed",
                               "BUSY x",
                               "READONLY You can't write",
                               "MISCONF x",
                               "NOAUTH Authentication required.",
                               "TRYAGAIN",
                               "MASTERDOWN x",
                               "WRONGPASS invalid"};
    for (size_t k = 0; k < sizeof transient / sizeof transient[0]; k++) {
        r.str = (char *)transient[k];
        assert_int_equal(mc__redis_classify(&r), MC__REDIS_TRANSIENT);
    }
    const char *permanent[] = {"ERR syntax error", "WRONGTYPE Operation against a key",
                               "NOPERM this user", "MOVED 3999 127.0.0.1:6381",
                               "LOADINGX",         "EXECABORT x"};
    for (size_t k = 0; k < sizeof permanent / sizeof permanent[0]; k++) {
        r.str = (char *)permanent[k];
        assert_int_equal(mc__redis_classify(&r), MC__REDIS_PERMANENT);
    }
    r.str = "ERR The ID specified in XADD is equal or smaller than the target stream top item";
    assert_true(mc__xadd_refused_as_old(&r));
    r.str = "ERR syntax error";
    assert_false(mc__xadd_refused_as_old(&r));
}

static void test_xadd_decide(void **state)
{
    (void)state;
    mc__redis_stream_id_t id = {10, 5}, before = {10, 4}, after = {11, 0};
    assert_int_equal(mc__xadd_decide(true, true, true, &before, &id), MC__XADD_DUPLICATE);
    assert_int_equal(mc__xadd_decide(true, false, true, &before, &id), MC__XADD_COLLISION);
    assert_int_equal(mc__xadd_decide(false, false, false, NULL, &id), MC__XADD_TRIMMED);
    assert_int_equal(mc__xadd_decide(false, false, true, &after, &id), MC__XADD_TRIMMED);
    assert_int_equal(mc__xadd_decide(false, false, true, &before, &id), MC__XADD_GAP);
    assert_int_equal(mc__xadd_decide(false, false, true, &id, &id), MC__XADD_GAP);
}

/* ---- Against redis-server --------------------------------------------------------------- */

typedef struct recorder {
    int n, ok, transient, permanent, closed;
    int order_errors;
    int next_expected;
    bool maybe_done_seen;
    char last_message[256];
    char last_value[64];
} recorder_t;

typedef struct tagged {
    recorder_t *rec;
    int index;
} tagged_t;

static void on_reply(void *arg, const mc__redis_result_t *res)
{
    tagged_t *t = arg;
    recorder_t *rec = t->rec;
    if (t->index != rec->next_expected) {
        rec->order_errors++;
    }
    rec->next_expected = t->index + 1;
    rec->n++;
    if (res->status == MC_ECLOSED) {
        rec->closed++;
    } else if (res->cls == MC__REDIS_OK) {
        rec->ok++;
        if (res->reply && res->reply->type == REDIS_REPLY_STRING) {
            snprintf(rec->last_value, sizeof rec->last_value, "%.*s", (int)res->reply->len,
                     res->reply->str);
        }
    } else if (res->cls == MC__REDIS_TRANSIENT) {
        rec->transient++;
    } else {
        rec->permanent++;
    }
    rec->maybe_done_seen |= res->maybe_done;
    snprintf(rec->last_message, sizeof rec->last_message, "%s", res->message ? res->message : "");
}

static mc__redis_t *client_for(uv_loop_t *loop, const char *url, uint32_t cmd_timeout_ms)
{
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    assert_int_equal(mc__redis_url_parse(url, strlen(url), &o.url, NULL), 0);
    o.command_timeout_ms = cmd_timeout_ms;
    o.connect_timeout_ms = 2000;
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 200;
    mc_error_t err;
    mc__redis_t *r = mc__redis_new(loop, &o, &err);
    assert_non_null(r);
    return r;
}

static bool closed_flag;
static void on_closed(void *arg)
{
    (void)arg;
    closed_flag = true;
}

static void close_client(uv_loop_t *loop, mc__redis_t *r)
{
    closed_flag = false;
    mc__redis_close(r, on_closed, NULL);
    assert_true(fx_run_until(loop, &closed_flag, 5000));
    uv_run(loop, UV_RUN_NOWAIT); /* let the adapter's close callbacks run */
}

static int count_done(recorder_t *rec)
{
    return rec->n;
}

static void wait_n(uv_loop_t *loop, recorder_t *rec, int n, int timeout_ms)
{
    int64_t deadline = fx_now_ms() + timeout_ms;
    while (count_done(rec) < n && fx_now_ms() < deadline) {
        uv_run(loop, UV_RUN_NOWAIT);
        usleep(500);
    }
}

static void test_pipeline_in_order(void **state)
{
    (void)state;
    fx_redis_t srv = {0};
    if (!fx_redis_start(&srv, 0, NULL)) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    mc__redis_t *r = client_for(&loop, url, 5000);
    enum { N = 5000 };
    static tagged_t tags[N];
    recorder_t rec = {0};
    for (int k = 0; k < N; k++) {
        tags[k].rec = &rec;
        tags[k].index = k;
        const char *argv[] = {"INCR", "counter"};
        size_t lens[] = {4, 7};
        assert_int_equal(mc__redis_command(r, 2, argv, lens, on_reply, &tags[k]), 0);
    }
    wait_n(&loop, &rec, N, 20000);
    assert_int_equal(rec.n, N);
    assert_int_equal(rec.ok, N);
    assert_int_equal(rec.order_errors, 0);
    /* GET sees every INCR. */
    recorder_t rec2 = {0};
    tagged_t t = {&rec2, 0};
    const char *argv[] = {"GET", "counter"};
    size_t lens[] = {3, 7};
    assert_int_equal(mc__redis_command(r, 2, argv, lens, on_reply, &t), 0);
    wait_n(&loop, &rec2, 1, 5000);
    assert_string_equal(rec2.last_value, "5000");
    mc__redis_status_t st;
    mc__redis_status(r, &st);
    assert_int_equal(st.state, MC__REDIS_READY);
    assert_int_equal(st.connects, 1);
    assert_int_equal(st.pending, 0);
    /* A permanent error is classified as such and the connection stays up. */
    const char *bad[] = {"XADD", "counter", "*", "a", "b"};
    size_t bad_lens[] = {4, 7, 1, 1, 1};
    recorder_t rec3 = {0};
    tagged_t t3 = {&rec3, 0};
    assert_int_equal(mc__redis_command(r, 5, bad, bad_lens, on_reply, &t3), 0);
    wait_n(&loop, &rec3, 1, 5000);
    assert_int_equal(rec3.permanent, 1);
    assert_non_null(strstr(rec3.last_message, "WRONGTYPE"));
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

static void test_auth_and_select(void **state)
{
    (void)state;
    fx_redis_t srv = {0};
    const char *extra[] = {"--requirepass", "s3cr:et@", "--user", "alice", "on",
                           ">alicepw",      "~*",       "&*",     "+@all", NULL};
    if (!fx_redis_start(&srv, 0, extra)) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[128];
    /* Password-only AUTH with SELECT 5, the password percent-encoded. */
    snprintf(url, sizeof url, "redis://:s3cr%%3Aet%%40@127.0.0.1:%d/5", srv.port);
    mc__redis_t *r = client_for(&loop, url, 5000);
    recorder_t rec = {0};
    tagged_t t = {&rec, 0};
    const char *set[] = {"SET", "where", "db5"};
    size_t set_lens[] = {3, 5, 3};
    assert_int_equal(mc__redis_command(r, 3, set, set_lens, on_reply, &t), 0);
    wait_n(&loop, &rec, 1, 5000);
    assert_int_equal(rec.ok, 1);
    close_client(&loop, r);
    /* An ACL user sees the key in db 5, not in db 0. */
    snprintf(url, sizeof url, "redis://alice:alicepw@127.0.0.1:%d/5", srv.port);
    r = client_for(&loop, url, 5000);
    recorder_t rec2 = {0};
    tagged_t t2 = {&rec2, 0};
    const char *get[] = {"GET", "where"};
    size_t get_lens[] = {3, 5};
    assert_int_equal(mc__redis_command(r, 2, get, get_lens, on_reply, &t2), 0);
    wait_n(&loop, &rec2, 1, 5000);
    assert_string_equal(rec2.last_value, "db5");
    close_client(&loop, r);
    /* A wrong password: the handshake is refused, the reason is kept (without the password),
     * commands wait and then fail as transient. */
    snprintf(url, sizeof url, "redis://alice:wrongpw@127.0.0.1:%d/5", srv.port);
    r = client_for(&loop, url, 600);
    recorder_t rec3 = {0};
    tagged_t t3 = {&rec3, 0};
    assert_int_equal(mc__redis_command(r, 2, get, get_lens, on_reply, &t3), 0);
    wait_n(&loop, &rec3, 1, 5000);
    assert_int_equal(rec3.transient, 1);
    mc__redis_status_t st;
    mc__redis_status(r, &st);
    assert_int_not_equal(st.state, MC__REDIS_READY);
    if (!strstr(st.last_error, "handshake refused")) {
        fail_msg("last error: %s", st.last_error);
    }
    assert_null(strstr(st.last_error, "wrongpw"));
    assert_true(st.failures >= 1);
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

static void test_down_at_start_then_up(void **state)
{
    (void)state;
    if (!fx_have("redis-server")) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    int port = fx_free_port();
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    mc__redis_t *r = client_for(&loop, url, 8000);
    recorder_t rec = {0};
    static tagged_t tags[10];
    for (int k = 0; k < 10; k++) {
        tags[k].rec = &rec;
        tags[k].index = k;
        const char *argv[] = {"RPUSH", "l", "x"};
        size_t lens[] = {5, 1, 1};
        assert_int_equal(mc__redis_command(r, 3, argv, lens, on_reply, &tags[k]), 0);
    }
    fx_run_for(&loop, 300);
    mc__redis_status_t st;
    mc__redis_status(r, &st);
    assert_int_equal(rec.n, 0); /* waiting, not failed */
    assert_int_equal(st.pending, 10);
    assert_true(st.failures >= 1);
    assert_non_null(strstr(st.last_error, "cannot connect"));
    fx_redis_t srv = {0};
    assert_true(fx_redis_start(&srv, port, NULL));
    wait_n(&loop, &rec, 10, 8000);
    assert_int_equal(rec.ok, 10);
    assert_int_equal(rec.order_errors, 0);
    mc__redis_status(r, &st);
    assert_int_equal(st.state, MC__REDIS_READY);
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

static void test_silent_server_times_out(void **state)
{
    (void)state;
    int port = 0;
    int lfd = fx_silent_listen(&port);
    assert_true(lfd >= 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    mc__redis_t *r = client_for(&loop, url, 300);
    recorder_t rec = {0};
    tagged_t t = {&rec, 0};
    const char *argv[] = {"PING"};
    size_t lens[] = {4};
    int64_t t0 = fx_now_ms();
    assert_int_equal(mc__redis_command(r, 1, argv, lens, on_reply, &t), 0);
    wait_n(&loop, &rec, 1, 5000);
    int64_t took = fx_now_ms() - t0;
    assert_int_equal(rec.transient, 1);
    assert_true(rec.maybe_done_seen); /* it was written: it might have run */
    assert_non_null(strstr(rec.last_message, "timeout"));
    assert_true(took >= 250 && took < 3000);
    mc__redis_status_t st;
    mc__redis_status(r, &st);
    assert_true(st.failures >= 1);
    /* Commands issued after the drop are bounded by max_pending and the timeout too. */
    close_client(&loop, r);
    uv_loop_close(&loop);
    close(lfd);
}

/* The loop's cached time can be far behind when the first pass runs (a busy owner thread):
 * the connect deadline has then passed while the address is still being resolved. The client
 * must neither spin in the timer phase nor give up: it fails that attempt and connects on the
 * next one. */
static void test_stale_loop_time_at_start(void **state)
{
    (void)state;
    fx_redis_t srv = {0};
    if (!fx_redis_start(&srv, 0, NULL)) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    char url[64];
    snprintf(url, sizeof url, "redis://localhost:%d", srv.port);
    assert_int_equal(mc__redis_url_parse(url, strlen(url), &o.url, NULL), 0);
    o.connect_timeout_ms = 100;
    o.backoff_initial_ms = 10;
    mc__redis_t *r = mc__redis_new(&loop, &o, NULL);
    usleep(300000);
    recorder_t rec = {0};
    tagged_t t = {&rec, 0};
    const char *argv[] = {"PING"};
    size_t lens[] = {4};
    assert_int_equal(mc__redis_command(r, 1, argv, lens, on_reply, &t), 0);
    wait_n(&loop, &rec, 1, 10000);
    assert_int_equal(rec.ok, 1);
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

static void test_max_pending_and_close(void **state)
{
    (void)state;
    uv_loop_t loop;
    uv_loop_init(&loop);
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    int port = fx_free_port();
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    assert_int_equal(mc__redis_url_parse(url, strlen(url), &o.url, NULL), 0);
    o.max_pending = 3;
    o.backoff_initial_ms = 1000;
    mc__redis_t *r = mc__redis_new(&loop, &o, NULL);
    recorder_t rec = {0};
    static tagged_t tags[3];
    const char *argv[] = {"PING"};
    size_t lens[] = {4};
    for (int k = 0; k < 3; k++) {
        tags[k].rec = &rec;
        tags[k].index = k;
        assert_int_equal(mc__redis_command(r, 1, argv, lens, on_reply, &tags[k]), 0);
    }
    assert_int_equal(mc__redis_command(r, 1, argv, lens, on_reply, &tags[0]), MC_EAGAIN);
    closed_flag = false;
    mc__redis_close(r, on_closed, NULL);
    assert_int_equal(rec.closed, 3); /* every outstanding command got its one callback */
    assert_true(fx_run_until(&loop, &closed_flag, 5000));
    uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(uv_loop_close(&loop), 0); /* no handle left behind */
}

/* ---- Exactly-once XADD --------------------------------------------------------------------- */

typedef struct xrec {
    int n;
    int outcomes[8];
    int cls[3];
    int retries;
    char last[200];
} xrec_t;

/* One event's XADD as a runner would drive it: resent after a transient failure. */
typedef struct xslot {
    mc__xadd_op_t op;
    xrec_t *x;
    bool done;  /* a final outcome came back */
    bool retry; /* a transient failure: send again */
} xslot_t;

static void on_xadd_done(void *arg, const mc__xadd_result_t *res)
{
    xslot_t *s = arg;
    if (res->outcome == MC__XADD_FAILED && res->cls == MC__REDIS_TRANSIENT) {
        s->retry = true;
        s->x->retries++;
        return;
    }
    s->done = true;
    s->x->n++;
    s->x->outcomes[res->outcome]++;
    s->x->cls[res->cls]++;
    snprintf(s->x->last, sizeof s->x->last, "%s", res->message ? res->message : "");
}

/* XADDs events with positions (1700000000 + k/3, k % 3 + 1) for k in [from, to) until each
 * has a final outcome (transient failures are resent, in order, as a runner does). */
static void xadd_range(uv_loop_t *loop, mc__redis_t *r, const mc__subject_template_t *tmpl,
                       int from, int to, uint64_t maxlen, xrec_t *x)
{
    int n = to - from;
    xslot_t *slots = calloc((size_t)n, sizeof *slots);
    for (int k = 0; k < n; k++) {
        int pos = from + k;
        mc_event_t *ev = fx_event("orders", (uint64_t)pos + 1, 1700000000u + (uint32_t)pos / 3,
                                  (uint32_t)pos % 3 + 1, 0, pos % 2 ? "alice" : "bob", 100);
        assert_int_equal(mc__xadd_prepare(&slots[k].op, tmpl, ev, maxlen, NULL), 0);
        mc_event_unref(&ev);
        slots[k].x = x;
        slots[k].retry = true;
    }
    int64_t deadline = fx_now_ms() + 30000;
    for (;;) {
        bool all_done = true, waiting = false;
        for (int k = 0; k < n; k++) {
            all_done &= slots[k].done;
            waiting |= !slots[k].done && !slots[k].retry;
        }
        if (all_done || fx_now_ms() > deadline) {
            break;
        }
        if (!waiting) {
            /* Everything outstanding came back; resend the failed ones in order. */
            for (int k = 0; k < n; k++) {
                if (slots[k].retry) {
                    slots[k].retry = false;
                    assert_int_equal(mc__xadd_send(r, &slots[k].op, on_xadd_done, &slots[k]), 0);
                }
            }
        }
        uv_run(loop, UV_RUN_NOWAIT);
        usleep(500);
    }
    for (int k = 0; k < n; k++) {
        assert_true(slots[k].done);
        mc__xadd_op_cleanup(&slots[k].op);
    }
    free(slots);
}

/* Runs one raw command on a blocking hiredis connection (test oracle). */
static redisReply *oracle(int port, const char *fmt, ...)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return rep;
}

static long long xlen(int port, const char *key)
{
    redisReply *rep = oracle(port, "XLEN %s", key);
    assert_non_null(rep);
    long long n = rep->integer;
    freeReplyObject(rep);
    return n;
}

static void test_xadd_exactly_once_across_restart(void **state)
{
    (void)state;
    fx_redis_t srv = {0};
    const char *aof[] = {"--appendonly", "yes", "--appendfsync", "always", NULL};
    if (!fx_redis_start(&srv, 0, aof)) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    mc__redis_t *r = client_for(&loop, url, 5000);
    mc__subject_template_t *tmpl = mc__subject_template_new("mc:{stream}", MC__SUBJECT_REDIS, NULL);
    xrec_t x = {0};
    xadd_range(&loop, r, tmpl, 0, 300, 0, &x);
    assert_int_equal(x.outcomes[MC__XADD_ADDED], 300);
    /* Kill Redis (not a clean shutdown), restart it from its append-only file. */
    fx_redis_stop(&srv, SIGKILL);
    assert_true(fx_redis_start(&srv, srv.port, aof));
    /* A replay of the last 100 and 100 new ones: the replay is refused by Redis and counted as
     * written, the new ones are added; the client reconnected on its own. */
    xrec_t y = {0};
    xadd_range(&loop, r, tmpl, 200, 400, 0, &y);
    assert_int_equal(y.outcomes[MC__XADD_DUPLICATE], 100);
    assert_int_equal(y.outcomes[MC__XADD_ADDED], 100);
    assert_int_equal(xlen(srv.port, "mc:orders"), 400);
    /* Entries are in position order with the documented fields. */
    redisReply *rep = oracle(srv.port, "XRANGE mc:orders - + COUNT 2");
    assert_int_equal(rep->elements, 2);
    char want[64];
    snprintf(want, sizeof want, "%llu-%llu", 1700000000000ull, 1ull << 32);
    assert_string_equal(rep->element[0]->element[0]->str, want);
    redisReply *f = rep->element[0]->element[1];
    assert_string_equal(f->element[0]->str, "id");
    assert_string_equal(f->element[2]->str, "type");
    assert_string_equal(f->element[3]->str, "insert");
    assert_string_equal(f->element[4]->str, "stream");
    assert_string_equal(f->element[5]->str, "orders");
    assert_string_equal(f->element[6]->str, "recipient");
    assert_string_equal(f->element[7]->str, "bob");
    assert_string_equal(f->element[8]->str, "message");
    assert_non_null(strstr(f->element[9]->str, "\"type\":\"change\""));
    freeReplyObject(rep);
    mc__subject_template_destroy(tmpl);
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

static void test_xadd_refusal_outcomes(void **state)
{
    (void)state;
    fx_redis_t srv = {0};
    const char *small_nodes[] = {"--stream-node-max-entries", "4", NULL};
    if (!fx_redis_start(&srv, 0, small_nodes)) {
        skip();
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", srv.port);
    mc__redis_t *r = client_for(&loop, url, 5000);
    /* Trimmed: with MAXLEN ~ 8 the oldest entries go; replaying them is "already written". */
    mc__subject_template_t *tmpl = mc__subject_template_new("t:{stream}", MC__SUBJECT_REDIS, NULL);
    xrec_t x = {0};
    xadd_range(&loop, r, tmpl, 0, 40, 8, &x);
    assert_int_equal(x.outcomes[MC__XADD_ADDED], 40);
    assert_true(xlen(srv.port, "t:orders") < 40);
    xrec_t y = {0};
    xadd_range(&loop, r, tmpl, 0, 40, 8, &y);
    assert_int_equal(y.outcomes[MC__XADD_TRIMMED] + y.outcomes[MC__XADD_DUPLICATE], 40);
    assert_true(y.outcomes[MC__XADD_TRIMMED] > 0);
    assert_true(y.outcomes[MC__XADD_DUPLICATE] > 0);
    mc__subject_template_destroy(tmpl);

    /* Collision: another event already sits under this position's ID. */
    tmpl = mc__subject_template_new("c:{stream}", MC__SUBJECT_REDIS, NULL);
    char id0[64];
    snprintf(id0, sizeof id0, "%llu-%llu", 1700000000000ull, 1ull << 32);
    freeReplyObject(oracle(srv.port, "XADD c:orders %s id someone-else", id0));
    xrec_t z = {0};
    xadd_range(&loop, r, tmpl, 0, 1, 0, &z);
    assert_int_equal(z.outcomes[MC__XADD_COLLISION], 1);
    assert_int_equal(z.cls[MC__REDIS_PERMANENT], 1);
    assert_non_null(strstr(z.last, "another event"));
    mc__subject_template_destroy(tmpl);

    /* Gap: entries before and after this position exist, this one never did. */
    tmpl = mc__subject_template_new("g:{stream}", MC__SUBJECT_REDIS, NULL);
    freeReplyObject(oracle(srv.port, "XADD g:orders 1-1 id early"));
    freeReplyObject(oracle(srv.port, "XADD g:orders 9999999999999-0 id late"));
    xrec_t g = {0};
    xadd_range(&loop, r, tmpl, 0, 1, 0, &g);
    assert_int_equal(g.outcomes[MC__XADD_GAP], 1);
    assert_int_equal(g.cls[MC__REDIS_PERMANENT], 1);
    mc__subject_template_destroy(tmpl);

    /* A key holding another type: a permanent failure of the XADD itself. */
    freeReplyObject(oracle(srv.port, "SET w:orders x"));
    tmpl = mc__subject_template_new("w:{stream}", MC__SUBJECT_REDIS, NULL);
    xrec_t w = {0};
    xadd_range(&loop, r, tmpl, 0, 1, 0, &w);
    assert_int_equal(w.outcomes[MC__XADD_FAILED], 1);
    assert_int_equal(w.cls[MC__REDIS_PERMANENT], 1);

    /* Events without a position cannot be prepared at all. */
    mc_event_t *ev = mc_event_new_control(MC_EVENT_RESET, "orders", 1, "x");
    mc__xadd_op_t op;
    mc_error_t err;
    assert_int_equal(mc__xadd_prepare(&op, tmpl, ev, 0, &err), MC_EINVAL);
    mc_event_unref(&ev);
    mc__subject_template_destroy(tmpl);
    close_client(&loop, r);
    uv_loop_close(&loop);
    fx_redis_cleanup(&srv);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_parse),
        cmocka_unit_test(test_classify),
        cmocka_unit_test(test_xadd_decide),
        cmocka_unit_test(test_pipeline_in_order),
        cmocka_unit_test(test_auth_and_select),
        cmocka_unit_test(test_down_at_start_then_up),
        cmocka_unit_test(test_silent_server_times_out),
        cmocka_unit_test(test_stale_loop_time_at_start),
        cmocka_unit_test(test_max_pending_and_close),
        cmocka_unit_test(test_xadd_exactly_once_across_restart),
        cmocka_unit_test(test_xadd_refusal_outcomes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
