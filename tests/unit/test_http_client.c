/*
 * test_http_client.c: the webhook HTTP client against a scripted HTTP/1.1 server running on a
 * thread of this test (loopback, free port): status classes, Retry-After in seconds and as a
 * date, redirects not followed, keep-alive reuse, a stalled server timing out, a reset
 * connection, a refused connection, concurrency, no "Expect: 100-continue", close with
 * requests in flight, and url checks.
 */
#define _GNU_SOURCE /* strcasestr */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <poll.h>

#include "broker_fixture.h"
#include "sinks/http_client.h"

/* ---- The scripted server ------------------------------------------------------------- */

typedef enum action { ANSWER, STALL, RESET } action_t;

typedef struct script {
    action_t action;
    int status;
    const char *headers; /* extra header lines, each ending in \r\n */
} script_t;

typedef struct server {
    int lfd, port;
    pthread_t thread;
    volatile bool quit;
    pthread_mutex_t lock;
    script_t (*script)(int request_index);
    int connections, requests;
    bool saw_expect;
    char last_headers[2048];
    size_t last_body_len;
} server_t;

static server_t srv;

/* Reads one request (headers + Content-Length body); false on EOF or error. */
static bool read_request(int fd, char *hdrs, size_t cap, size_t *body_len)
{
    size_t n = 0;
    char *end = NULL;
    while (!end) {
        if (n + 1 >= cap) {
            return false;
        }
        ssize_t r = recv(fd, hdrs + n, cap - 1 - n, 0);
        if (r <= 0) {
            return false;
        }
        n += (size_t)r;
        hdrs[n] = '\0';
        end = strstr(hdrs, "\r\n\r\n");
    }
    size_t head = (size_t)(end + 4 - hdrs);
    const char *cl = strcasestr(hdrs, "content-length:");
    size_t want = cl ? (size_t)strtoul(cl + 15, NULL, 10) : 0;
    size_t have = n - head;
    char sink[65536];
    while (have < want) {
        ssize_t r = recv(fd, sink, sizeof sink < want - have ? sizeof sink : want - have, 0);
        if (r <= 0) {
            return false;
        }
        have += (size_t)r;
    }
    *body_len = want;
    hdrs[head] = '\0';
    return true;
}

static void *serve_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char hdrs[8192];
    size_t body_len = 0;
    while (!srv.quit && read_request(fd, hdrs, sizeof hdrs, &body_len)) {
        pthread_mutex_lock(&srv.lock);
        int idx = srv.requests++;
        srv.saw_expect |= strcasestr(hdrs, "\r\nexpect:") != NULL;
        snprintf(srv.last_headers, sizeof srv.last_headers, "%.2000s", hdrs);
        srv.last_body_len = body_len;
        pthread_mutex_unlock(&srv.lock);
        script_t s = srv.script(idx);
        if (s.action == STALL) {
            while (!srv.quit) {
                struct pollfd p = {fd, POLLIN, 0};
                if (poll(&p, 1, 50) > 0) {
                    char c;
                    if (recv(fd, &c, 1, MSG_PEEK) <= 0) {
                        break; /* the client gave up */
                    }
                }
            }
            break;
        }
        if (s.action == RESET) {
            struct linger l = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
            break;
        }
        char resp[1024];
        const char *body = s.status >= 400 ? "something went wrong\n\x01" : "";
        int len = snprintf(resp, sizeof resp, "HTTP/1.1 %d X\r\nContent-Length: %zu\r\n%s\r\n%s",
                           s.status, strlen(body), s.headers ? s.headers : "", body);
        if (send(fd, resp, (size_t)len, MSG_NOSIGNAL) != len) {
            break;
        }
    }
    close(fd);
    return NULL;
}

static void *serve(void *arg)
{
    (void)arg;
    while (!srv.quit) {
        struct pollfd p = {srv.lfd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0) {
            continue;
        }
        int fd = accept(srv.lfd, NULL, NULL);
        if (fd < 0) {
            continue;
        }
        pthread_mutex_lock(&srv.lock);
        srv.connections++;
        pthread_mutex_unlock(&srv.lock);
        pthread_t t;
        pthread_create(&t, NULL, serve_conn, (void *)(intptr_t)fd);
        pthread_detach(t);
    }
    return NULL;
}

static script_t always_200(int i)
{
    (void)i;
    return (script_t){ANSWER, 200, NULL};
}

static void server_start(script_t (*script)(int))
{
    memset(&srv, 0, sizeof srv);
    pthread_mutex_init(&srv.lock, NULL);
    srv.script = script ? script : always_200;
    srv.lfd = fx_silent_listen(&srv.port);
    assert_true(srv.lfd >= 0);
    /* Room for every connection the client may open at once: a full backlog drops SYNs,
     * which the client sees as a connect timeout, not what these tests are about. */
    listen(srv.lfd, 512);
    pthread_create(&srv.thread, NULL, serve, NULL);
}

static void server_stop(void)
{
    srv.quit = true;
    pthread_join(srv.thread, NULL);
    close(srv.lfd);
    usleep(100000); /* connection threads notice `quit` */
}

/* ---- Client side --------------------------------------------------------------------- */

typedef struct outcome {
    bool done;
    mc__http_result_t res;
    char message[400];
} outcome_t;

static void on_done(void *arg, const mc__http_result_t *res)
{
    outcome_t *o = arg;
    assert_false(o->done); /* exactly once */
    o->done = true;
    o->res = *res;
    snprintf(o->message, sizeof o->message, "%s", res->message ? res->message : "");
    o->res.message = o->message;
}

static uv_loop_t loop;

static mc__http_t *client(uint32_t timeout_ms)
{
    mc__http_opts_t o;
    memset(&o, 0, sizeof o);
    o.timeout_ms = timeout_ms;
    o.connect_timeout_ms = 5000;
    mc__http_t *h = mc__http_new(&loop, &o, NULL);
    assert_non_null(h);
    return h;
}

static bool closed;
static void on_closed(void *arg)
{
    (void)arg;
    closed = true;
}

static void close_client(mc__http_t *h)
{
    closed = false;
    mc__http_close(h, on_closed, NULL);
    assert_true(fx_run_until(&loop, &closed, 5000));
}

/* Posts one request and runs the loop until its callback. */
static outcome_t post_one(mc__http_t *h, int port, const char *body, size_t len)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/hook", port);
    const char *hdrs[] = {"Content-Type: application/json", "webhook-id: msg_1", NULL};
    mc__http_request_t rq = {url, hdrs, body, len};
    outcome_t o;
    memset(&o, 0, sizeof o);
    assert_int_equal(mc__http_post(h, &rq, on_done, &o), 0);
    assert_false(o.done); /* never from inside post */
    assert_true(fx_run_until(&loop, &o.done, 10000));
    return o;
}

static int statuses[] = {200, 204, 500, 503, 408, 429, 400, 404, 410, 301, 302};
static script_t by_table(int i)
{
    int st = statuses[i % (int)(sizeof statuses / sizeof statuses[0])];
    const char *h = NULL;
    if (st == 503) {
        h = "Retry-After: 7\r\n";
    } else if (st == 301 || st == 302) {
        h = "Location: http://127.0.0.1:1/elsewhere\r\n";
    }
    return (script_t){ANSWER, st, h};
}

static void test_status_classes(void **state)
{
    (void)state;
    uv_loop_init(&loop);
    server_start(by_table);
    mc__http_t *h = client(5000);
    mc__http_class_t want[] = {MC__HTTP_OK,        MC__HTTP_OK,        MC__HTTP_TRANSIENT,
                               MC__HTTP_TRANSIENT, MC__HTTP_TRANSIENT, MC__HTTP_TRANSIENT,
                               MC__HTTP_PERMANENT, MC__HTTP_PERMANENT, MC__HTTP_PERMANENT,
                               MC__HTTP_PERMANENT, MC__HTTP_PERMANENT};
    for (size_t k = 0; k < sizeof statuses / sizeof statuses[0]; k++) {
        outcome_t o = post_one(h, srv.port, "{}", 2);
        assert_int_equal(o.res.status, 0);
        assert_int_equal(o.res.http_status, statuses[k]);
        if (o.res.cls != want[k]) {
            fail_msg("HTTP %d classified %d", statuses[k], o.res.cls);
        }
        if (statuses[k] == 503) {
            assert_int_equal(o.res.retry_after_ms, 7000);
        } else {
            assert_int_equal(o.res.retry_after_ms, -1);
        }
        if (statuses[k] >= 400) {
            /* the body's start, made printable */
            assert_non_null(strstr(o.message, "something went wrong"));
            assert_null(strchr(o.message, '\x01'));
        }
    }
    /* Redirects were not followed (one request each), and everything went over one
     * kept-alive connection. */
    assert_int_equal(srv.requests, (int)(sizeof statuses / sizeof statuses[0]));
    assert_int_equal(srv.connections, 1);
    close_client(h);
    server_stop();
    uv_loop_close(&loop);
}

static script_t date_429(int i)
{
    (void)i;
    static char hdr[128];
    time_t t = time(NULL) + 30;
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(hdr, sizeof hdr, "Retry-After: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    return (script_t){ANSWER, 429, hdr};
}

static void test_retry_after_date(void **state)
{
    (void)state;
    uv_loop_init(&loop);
    server_start(date_429);
    mc__http_t *h = client(5000);
    outcome_t o = post_one(h, srv.port, "{}", 2);
    assert_int_equal(o.res.cls, MC__HTTP_TRANSIENT);
    assert_true(o.res.retry_after_ms >= 25000 && o.res.retry_after_ms <= 31000);
    close_client(h);
    server_stop();
    uv_loop_close(&loop);
}

static script_t stall_all(int i)
{
    (void)i;
    return (script_t){STALL, 0, NULL};
}

static script_t reset_all(int i)
{
    (void)i;
    return (script_t){RESET, 0, NULL};
}

static void test_stall_reset_refused(void **state)
{
    (void)state;
    uv_loop_init(&loop);
    server_start(stall_all);
    mc__http_t *h = client(300);
    int64_t t0 = fx_now_ms();
    outcome_t o = post_one(h, srv.port, "{}", 2);
    int64_t took = fx_now_ms() - t0;
    assert_int_equal(o.res.status, MC_EIO);
    assert_int_equal(o.res.cls, MC__HTTP_TRANSIENT);
    assert_non_null(strstr(o.message, "imeout"));
    assert_true(took >= 250 && took < 5000);
    close_client(h);
    server_stop();

    server_start(reset_all);
    h = client(5000);
    o = post_one(h, srv.port, "{}", 2);
    assert_int_equal(o.res.status, MC_EIO);
    assert_int_equal(o.res.cls, MC__HTTP_TRANSIENT);
    close_client(h);
    server_stop();

    h = client(5000);
    o = post_one(h, fx_free_port(), "{}", 2);
    assert_int_equal(o.res.status, MC_EIO);
    assert_int_equal(o.res.cls, MC__HTTP_TRANSIENT);
    assert_non_null(strstr(o.message, "onnect"));
    close_client(h);
    uv_loop_close(&loop);
}

static void test_concurrency_large_bodies_and_close(void **state)
{
    (void)state;
    uv_loop_init(&loop);
    server_start(always_200);
    mc__http_t *h = client(10000);
    enum { N = 200 };
    static outcome_t outs[N];
    size_t big = 64 * 1024;
    char *body = malloc(big);
    memset(body, 'x', big);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/hook", srv.port);
    const char *hdrs[] = {"Content-Type: application/json", NULL};
    for (int k = 0; k < N; k++) {
        memset(&outs[k], 0, sizeof outs[k]);
        mc__http_request_t rq = {url, hdrs, body, big};
        assert_int_equal(mc__http_post(h, &rq, on_done, &outs[k]), 0);
    }
    assert_int_equal(mc__http_in_flight(h), N);
    int64_t deadline = fx_now_ms() + 30000;
    int done = 0;
    while (done < N && fx_now_ms() < deadline) {
        uv_run(&loop, UV_RUN_NOWAIT);
        done = 0;
        for (int k = 0; k < N; k++) {
            done += outs[k].done;
        }
    }
    assert_int_equal(done, N);
    for (int k = 0; k < N; k++) {
        if (outs[k].res.http_status != 200) {
            fail_msg("request %d: %s", k, outs[k].message);
        }
    }
    assert_false(srv.saw_expect);
    assert_int_equal(srv.last_body_len, big);
    assert_true(srv.connections <= 64);
    /* Requests still in flight when the client closes: each gets MC_ECLOSED, once. */
    for (int k = 0; k < 10; k++) {
        memset(&outs[k], 0, sizeof outs[k]);
        mc__http_request_t rq = {url, hdrs, body, big};
        assert_int_equal(mc__http_post(h, &rq, on_done, &outs[k]), 0);
    }
    closed = false;
    mc__http_close(h, on_closed, NULL);
    for (int k = 0; k < 10; k++) {
        assert_true(outs[k].done);
        assert_int_equal(outs[k].res.status, MC_ECLOSED);
    }
    assert_true(fx_run_until(&loop, &closed, 5000));
    uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(uv_loop_close(&loop), 0); /* every handle closed */
    free(body);
    server_stop();
}

static void test_url_check(void **state)
{
    (void)state;
    assert_int_equal(mc__http_url_check("https://hooks.example.com/a?b=c", NULL), 0);
    assert_int_equal(mc__http_url_check("http://127.0.0.1:8080/hook", NULL), 0);
    const char *bad[] = {"",        "ftp://h/x", "https://user:pw@h/x",
                         "http://", "not a url", "file:///etc/passwd"};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        mc_error_t err;
        if (mc__http_url_check(bad[k], &err) != MC_ECONFIG) {
            fail_msg("\"%s\" accepted", bad[k]);
        }
        assert_null(strstr(err.message, "pw"));
    }
    assert_int_equal(mc__http_url_check(NULL, NULL), MC_ECONFIG);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_classes),
        cmocka_unit_test(test_retry_after_date),
        cmocka_unit_test(test_stall_reset_refused),
        cmocka_unit_test(test_concurrency_large_bodies_and_close),
        cmocka_unit_test(test_url_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
