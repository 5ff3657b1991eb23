/*
 * test_nats_client.c: the NATS client against a real `nats-server -js` on a free loopback
 * port with its own store directory: server lists, error classes, stream creation with a
 * duplicate window, JetStream publish acknowledged per message, duplicates by Nats-Msg-Id,
 * a server restart in the middle, core publish reaching only its own subject (hostile
 * recipients included), a server down at start, a server that accepts and never answers,
 * token and user/password authentication, and destroy with publishes in flight.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>

#include "broker_fixture.h"
#include "sinks/nats_client.h"
#include "sinks/subject_template.h"

/* ---- No server --------------------------------------------------------------------- */

static void test_url_check(void **state)
{
    (void)state;
    const char *good[] = {"nats://127.0.0.1:4222",   "nats://h",
                          "tls://a.example:1",       "nats://u:p@h:2,nats://[::1]:3",
                          " nats://h:4 , nats://k ", "nats://h/"};
    for (size_t k = 0; k < sizeof good / sizeof good[0]; k++) {
        mc_error_t err;
        if (mc__nats_url_check(good[k], strlen(good[k]), &err) != 0) {
            fail_msg("\"%s\" refused: %s", good[k], err.message);
        }
    }
    struct {
        const char *url;
        const char *needle;
    } bad[] = {
        {"", "missing"},          {"h:4222", "expected nats://"},
        {"http://h", "scheme"},   {"nats://", "empty host"},
        {"nats://h:0", "port"},   {"nats://h:65536", "port"},
        {"nats://h:x", "port"},   {"nats://h/x", "paths"},
        {"nats://h h", "spaces"}, {"nats://u:secretpw@h:1,nats://", "server 2"},
        {"nats://[::1", "IPv6"},  {"nats://h!", "bad host"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        mc_error_t err;
        mc_error_clear(&err);
        if (mc__nats_url_check(bad[k].url, strlen(bad[k].url), &err) != MC_ECONFIG) {
            fail_msg("\"%s\" accepted", bad[k].url);
        }
        if (!strstr(err.message, bad[k].needle)) {
            fail_msg("\"%s\": \"%s\" lacks \"%s\"", bad[k].url, err.message, bad[k].needle);
        }
        assert_null(strstr(err.message, "secretpw"));
    }
    assert_int_equal(mc__nats_url_check("nats://h\0x", 10, NULL), MC_ECONFIG);
}

static void test_classify(void **state)
{
    (void)state;
    assert_int_equal(mc__nats_classify(NATS_OK, 0), MC__NATS_OK);
    assert_int_equal(mc__nats_classify(NATS_TIMEOUT, 0), MC__NATS_TRANSIENT);
    assert_int_equal(mc__nats_classify(NATS_NO_RESPONDERS, 0), MC__NATS_TRANSIENT);
    assert_int_equal(mc__nats_classify(NATS_CONNECTION_DISCONNECTED, 0), MC__NATS_TRANSIENT);
    assert_int_equal(mc__nats_classify(NATS_ERR, JSStreamStoreFailedErr), MC__NATS_TRANSIENT);
    assert_int_equal(mc__nats_classify(NATS_MAX_PAYLOAD, 0), MC__NATS_PERMANENT);
    assert_int_equal(mc__nats_classify(NATS_INVALID_SUBJECT, 0), MC__NATS_PERMANENT);
    assert_int_equal(mc__nats_classify(NATS_ERR, JSStreamMessageExceedsMaximumErr),
                     MC__NATS_PERMANENT);
    assert_int_equal(mc__nats_classify(NATS_ERR, JSStreamWrongLastSequenceErr), MC__NATS_PERMANENT);
}

/* ---- Results collected from libnats threads ----------------------------------------- */

typedef struct acks {
    pthread_mutex_t lock;
    int n, stored, duplicate, transient, permanent, closed;
    char last[256];
} acks_t;

static acks_t acks = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, ""};

static void acks_reset(void)
{
    pthread_mutex_lock(&acks.lock);
    acks.n = acks.stored = acks.duplicate = acks.transient = acks.permanent = acks.closed = 0;
    acks.last[0] = '\0';
    pthread_mutex_unlock(&acks.lock);
}

/* One callback result per published message: per-slot outcome for retries. */
typedef struct slot {
    int outcome; /* -1 pending, else mc__nats_outcome_t */
    int cls;
} slot_t;

static void on_ack(void *arg, const mc__nats_result_t *res)
{
    slot_t *s = arg;
    pthread_mutex_lock(&acks.lock);
    acks.n++;
    if (res->status == MC_ECLOSED) {
        acks.closed++;
    } else if (res->outcome == MC__NATS_STORED) {
        acks.stored++;
    } else if (res->outcome == MC__NATS_DUPLICATE) {
        acks.duplicate++;
    } else if (res->cls == MC__NATS_PERMANENT) {
        acks.permanent++;
    } else {
        acks.transient++;
    }
    if (res->message) {
        snprintf(acks.last, sizeof acks.last, "%s", res->message);
    }
    if (s) {
        s->cls = res->cls;
        s->outcome = res->outcome;
    }
    pthread_mutex_unlock(&acks.lock);
}

static int acks_count(void)
{
    pthread_mutex_lock(&acks.lock);
    int n = acks.n;
    pthread_mutex_unlock(&acks.lock);
    return n;
}

static bool wait_acks(int n, int timeout_ms)
{
    int64_t deadline = fx_now_ms() + timeout_ms;
    while (acks_count() < n && fx_now_ms() < deadline) {
        usleep(2000);
    }
    return acks_count() >= n;
}

static mc__nats_t *client_for(int port, uint32_t ack_timeout_ms, mc__nats_opts_t *extra)
{
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port);
    mc__nats_opts_t o;
    if (extra) {
        o = *extra;
    } else {
        memset(&o, 0, sizeof o);
    }
    o.url = url;
    o.ack_timeout_ms = ack_timeout_ms;
    o.connect_timeout_ms = o.connect_timeout_ms ? o.connect_timeout_ms : 2000;
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 200;
    mc_error_t err;
    mc__nats_t *n = mc__nats_new(&o, &err);
    if (!n) {
        fail_msg("mc__nats_new: %s", err.message);
    }
    return n;
}

static bool wait_connected(mc__nats_t *n, int timeout_ms)
{
    int64_t deadline = fx_now_ms() + timeout_ms;
    mc__nats_status_t st;
    do {
        mc__nats_status(n, &st);
        if (st.state == MC__NATS_CONNECTED) {
            return true;
        }
        usleep(5000);
    } while (fx_now_ms() < deadline);
    return false;
}

/* Messages stored in a stream, read with a plain libnats connection (test oracle). */
static int64_t stream_msgs(int port, const char *name)
{
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port);
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    jsStreamInfo *si = NULL;
    int64_t n = -1;
    if (natsConnection_ConnectTo(&nc, url) == NATS_OK &&
        natsConnection_JetStream(&js, nc, NULL) == NATS_OK &&
        js_GetStreamInfo(&si, js, name, NULL, NULL) == NATS_OK) {
        n = (int64_t)si->State.Msgs;
    }
    jsStreamInfo_Destroy(si);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return n;
}

static const char *const SUBJECTS[] = {"mongocast.orders", "mongocast.orders.*"};

/* Publishes messages [from, to) with ids "ev-<k>", resending transient failures (as a runner
 * would) until each has a final outcome. */
static void publish_range(mc__nats_t *n, int from, int to, int timeout_ms)
{
    int count = to - from;
    slot_t *slots = calloc((size_t)count, sizeof *slots);
    for (int k = 0; k < count; k++) {
        slots[k].outcome = MC__NATS_FAILED;
        slots[k].cls = MC__NATS_TRANSIENT;
    }
    int64_t deadline = fx_now_ms() + timeout_ms;
    for (;;) {
        int sent = 0, pending = 0;
        for (int k = 0; k < count; k++) {
            pthread_mutex_lock(&acks.lock);
            bool resend = slots[k].outcome == MC__NATS_FAILED && slots[k].cls == MC__NATS_TRANSIENT;
            bool waiting = slots[k].outcome == -1;
            if (resend) {
                slots[k].outcome = -1;
            }
            pthread_mutex_unlock(&acks.lock);
            pending += waiting;
            if (!resend) {
                continue;
            }
            char id[32], body[64], subj[64];
            snprintf(id, sizeof id, "ev-%d", from + k);
            snprintf(body, sizeof body, "{\"n\":%d}", from + k);
            snprintf(subj, sizeof subj, "mongocast.orders.u%d", (from + k) % 7);
            mc__nats_headers_t h = {"insert", "orders", "u", 1};
            int rc = mc__nats_js_publish(n, subj, id, NULL, &h, body, strlen(body), on_ack,
                                         &slots[k], NULL);
            if (rc != 0) {
                pthread_mutex_lock(&acks.lock);
                slots[k].outcome = MC__NATS_FAILED; /* not accepted: try again next round */
                pthread_mutex_unlock(&acks.lock);
            } else {
                sent++;
            }
        }
        if ((sent == 0 && pending == 0) || fx_now_ms() > deadline) {
            break;
        }
        usleep(20000);
    }
    for (int k = 0; k < count; k++) {
        if (slots[k].outcome != MC__NATS_STORED && slots[k].outcome != MC__NATS_DUPLICATE) {
            fail_msg("message %d ended with outcome %d class %d (%s)", from + k, slots[k].outcome,
                     slots[k].cls, acks.last);
        }
    }
    free(slots);
}

static void test_jetstream_dedupe_and_restart(void **state)
{
    (void)state;
    fx_nats_t srv = {0};
    if (!fx_nats_start(&srv, 0, NULL)) {
        skip();
    }
    mc__nats_t *n = client_for(srv.port, 2000, NULL);
    assert_true(wait_connected(n, 5000));
    bool created = false;
    mc_error_t err;
    assert_int_equal(mc__nats_ensure_stream(n, "ORDERS", (const char *const *)SUBJECTS, 2, 120000,
                                            &created, &err),
                     0);
    assert_true(created);
    mc_error_clear(&err);
    assert_int_equal(mc__nats_ensure_stream(n, "ORDERS", (const char *const *)SUBJECTS, 2, 60000,
                                            &created, &err),
                     0);
    assert_false(created);
    assert_non_null(strstr(err.message, "duplicate window of 120000 ms"));

    acks_reset();
    publish_range(n, 0, 2000, 30000);
    assert_int_equal(acks.stored, 2000);
    assert_int_equal(stream_msgs(srv.port, "ORDERS"), 2000);
    /* A replay inside the duplicate window: every PubAck says duplicate, nothing is added. */
    acks_reset();
    publish_range(n, 1500, 2000, 30000);
    assert_int_equal(acks.duplicate, 500);
    assert_int_equal(acks.stored, 0);
    assert_int_equal(stream_msgs(srv.port, "ORDERS"), 2000);

    /* The server is killed and restarted from its store while messages are in flight: each
     * message ends stored exactly once (resends are deduplicated), none is lost. */
    acks_reset();
    fx_nats_stop(&srv, SIGKILL);
    assert_true(fx_nats_start(&srv, srv.port, NULL));
    publish_range(n, 1800, 3000, 60000);
    assert_int_equal(stream_msgs(srv.port, "ORDERS"), 3000);
    mc__nats_status_t st;
    mc__nats_status(n, &st);
    assert_true(st.reconnects >= 1);
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);
}

static void test_no_stream_for_subject_is_transient(void **state)
{
    (void)state;
    fx_nats_t srv = {0};
    if (!fx_nats_start(&srv, 0, NULL)) {
        skip();
    }
    mc__nats_t *n = client_for(srv.port, 2000, NULL);
    assert_true(wait_connected(n, 5000));
    acks_reset();
    slot_t s = {-1, 0};
    assert_int_equal(
        mc__nats_js_publish(n, "nobody.listens", "x-1", NULL, NULL, "{}", 2, on_ack, &s, NULL), 0);
    assert_true(wait_acks(1, 10000));
    assert_int_equal(acks.transient, 1);
    assert_non_null(strstr(acks.last, "o responders"));
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);
}

/* A plain subscriber collecting what reaches one subject. */
typedef struct inbox {
    natsConnection *nc;
    natsSubscription *sub;
} inbox_t;

static void inbox_open(inbox_t *in, int port, const char *subject)
{
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port);
    assert_int_equal(natsConnection_ConnectTo(&in->nc, url), NATS_OK);
    assert_int_equal(natsConnection_SubscribeSync(&in->sub, in->nc, subject), NATS_OK);
    assert_int_equal(natsConnection_Flush(in->nc), NATS_OK);
}

/* The next message's data (static buffer), or NULL after timeout_ms. */
static const char *inbox_next(inbox_t *in, int timeout_ms, char *hdr_recipient, size_t cap)
{
    static char buf[256];
    natsMsg *m = NULL;
    if (natsSubscription_NextMsg(&m, in->sub, timeout_ms) != NATS_OK) {
        return NULL;
    }
    snprintf(buf, sizeof buf, "%.*s", natsMsg_GetDataLength(m), natsMsg_GetData(m));
    const char *v = NULL;
    if (hdr_recipient) {
        hdr_recipient[0] = '\0';
        if (natsMsgHeader_Get(m, "Mongocast-Recipient", &v) == NATS_OK) {
            snprintf(hdr_recipient, cap, "%s", v);
        }
    }
    natsMsg_Destroy(m);
    return buf;
}

static void inbox_close(inbox_t *in)
{
    natsSubscription_Destroy(in->sub);
    natsConnection_Destroy(in->nc);
}

static void test_core_publish_reaches_only_its_subject(void **state)
{
    (void)state;
    fx_nats_t srv = {0};
    if (!fx_nats_start(&srv, 0, NULL)) {
        skip();
    }
    mc__nats_t *n = client_for(srv.port, 2000, NULL);
    assert_true(wait_connected(n, 5000));
    inbox_t alice, all;
    inbox_open(&alice, srv.port, "mongocast.orders.alice");
    inbox_open(&all, srv.port, "mongocast.orders.>");
    mc__subject_template_t *t =
        mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    const char *recipients[] = {"bob", "a.b", "*", ">", "x y", "alice\r\nX: 1", "alice"};
    for (size_t k = 0; k < sizeof recipients / sizeof recipients[0]; k++) {
        mc__subject_values_t v = {{"orders", 6},
                                  {recipients[k], strlen(recipients[k])},
                                  {NULL, 0},
                                  {NULL, 0},
                                  {"insert", 6}};
        char subj[MC__SUBJECT_MAX + 1];
        size_t len = 0;
        assert_int_equal(mc__subject_template_render(t, &v, subj, sizeof subj, &len, NULL), 0);
        char body[32];
        snprintf(body, sizeof body, "m%zu", k);
        mc__nats_headers_t h = {"insert", "orders", recipients[k], strlen(recipients[k])};
        mc_error_t err;
        if (mc__nats_publish(n, subj, &h, body, strlen(body), &err) != 0) {
            fail_msg("publish to %s: %s", subj, err.message);
        }
    }
    /* alice's subscriber gets alice's message only (none of the hostile look-alikes). */
    char rec[128];
    const char *m = inbox_next(&alice, 3000, rec, sizeof rec);
    assert_non_null(m);
    assert_string_equal(m, "m6");
    assert_string_equal(rec, "alice");
    assert_null(inbox_next(&alice, 300, NULL, 0));
    /* Every message arrived, each on its own single token under mongocast.orders. */
    int got = 0;
    bool saw_escaped_header = false;
    while ((m = inbox_next(&all, 1000, rec, sizeof rec)) != NULL) {
        got++;
        saw_escaped_header |= strcmp(rec, "alice%0D%0AX: 1") == 0;
    }
    assert_int_equal(got, 7);
    assert_true(saw_escaped_header);
    inbox_close(&alice);
    inbox_close(&all);
    mc__subject_template_destroy(t);
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);
}

static void test_down_at_start_then_up(void **state)
{
    (void)state;
    if (!fx_have("nats-server")) {
        skip();
    }
    int port = fx_free_port();
    mc__nats_t *n = client_for(port, 20000, NULL);
    mc__nats_status_t st;
    mc__nats_status(n, &st);
    assert_int_not_equal(st.state, MC__NATS_CONNECTED);
    /* Not connected: a JetStream publish is refused as transient (libnats cannot send headers
     * before the server's INFO), so the caller retries; nothing is accepted and lost. */
    acks_reset();
    slot_t s = {-1, 0};
    mc_error_t err;
    assert_int_equal(mc__nats_js_publish(n, "mongocast.orders.a", "early-1", NULL, NULL, "{}", 2,
                                         on_ack, &s, &err),
                     MC_EAGAIN);
    assert_non_null(strstr(err.message, "not connected"));
    assert_int_equal(acks_count(), 0);
    fx_nats_t srv = {0};
    assert_true(fx_nats_start(&srv, port, NULL));
    assert_true(wait_connected(n, 10000));
    bool created = false;
    assert_int_equal(mc__nats_ensure_stream(n, "ORDERS", (const char *const *)SUBJECTS, 2, 120000,
                                            &created, NULL),
                     0);
    publish_range(n, 0, 10, 20000);
    assert_int_equal(acks.stored, 10);
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);
}

/* A server that accepts TCP and never sends its INFO: the client never counts as connected
 * and says why; publishes are refused (transient) instead of waiting forever. */
static void test_silent_server(void **state)
{
    (void)state;
    int port = 0;
    int lfd = fx_silent_listen(&port);
    assert_true(lfd >= 0);
    mc__nats_opts_t o;
    memset(&o, 0, sizeof o);
    o.connect_timeout_ms = 300;
    mc__nats_t *n = client_for(port, 500, &o);
    usleep(1000000);
    mc__nats_status_t st;
    mc__nats_status(n, &st);
    assert_int_not_equal(st.state, MC__NATS_CONNECTED);
    mc_error_t err;
    assert_int_equal(mc__nats_js_publish(n, "mongocast.orders.a", "s-1", NULL, NULL, "{}", 2,
                                         on_ack, NULL, &err),
                     MC_EAGAIN);
    mc__nats_destroy(n);
    close(lfd);
}

/* A connected server that stops answering (SIGSTOP): each PubAck times out (transient), and
 * destroy hands back what is still in flight, each callback exactly once. */
static void test_stalled_server(void **state)
{
    (void)state;
    fx_nats_t srv = {0};
    if (!fx_nats_start(&srv, 0, NULL)) {
        skip();
    }
    mc__nats_t *n = client_for(srv.port, 400, NULL);
    assert_true(wait_connected(n, 5000));
    bool created = false;
    assert_int_equal(mc__nats_ensure_stream(n, "ORDERS", (const char *const *)SUBJECTS, 2, 120000,
                                            &created, NULL),
                     0);
    kill(srv.pid, SIGSTOP);
    acks_reset();
    static slot_t slots[20];
    int64_t t0 = fx_now_ms();
    for (int k = 0; k < 20; k++) {
        char id[16];
        snprintf(id, sizeof id, "st-%d", k);
        slots[k].outcome = -1;
        assert_int_equal(mc__nats_js_publish(n, "mongocast.orders.x", id, NULL, NULL, "{}", 2,
                                             on_ack, &slots[k], NULL),
                         0);
    }
    assert_true(wait_acks(20, 10000));
    assert_int_equal(acks.transient, 20);
    assert_true(fx_now_ms() - t0 >= 300);
    assert_non_null(strstr(acks.last, "Timeout"));
    /* Now with a long ack timeout: destroy fails the ones in flight, once each. */
    mc__nats_destroy(n);
    n = client_for(srv.port, 60000, NULL);
    kill(srv.pid, SIGCONT);
    assert_true(wait_connected(n, 5000));
    kill(srv.pid, SIGSTOP);
    acks_reset();
    for (int k = 0; k < 20; k++) {
        char id[16];
        snprintf(id, sizeof id, "sd-%d", k);
        slots[k].outcome = -1;
        assert_int_equal(mc__nats_js_publish(n, "mongocast.orders.x", id, NULL, NULL, "{}", 2,
                                             on_ack, &slots[k], NULL),
                         0);
    }
    usleep(200000);
    assert_int_equal(acks_count(), 0);
    mc__nats_destroy(n);
    assert_int_equal(acks.closed, 20);
    assert_int_equal(acks.n, 20);
    kill(srv.pid, SIGCONT);
    fx_nats_cleanup(&srv);
}

static void test_auth(void **state)
{
    (void)state;
    fx_nats_t srv = {0};
    const char *tok[] = {"--auth", "t0ken-xyz", NULL};
    if (!fx_nats_start(&srv, 0, tok)) {
        skip();
    }
    mc__nats_opts_t o;
    memset(&o, 0, sizeof o);
    o.token = "t0ken-xyz";
    mc__nats_t *n = client_for(srv.port, 2000, &o);
    assert_true(wait_connected(n, 5000));
    mc__nats_destroy(n);
    o.token = "wrong";
    n = client_for(srv.port, 2000, &o);
    assert_false(wait_connected(n, 1000));
    mc__nats_status_t st;
    mc__nats_status(n, &st);
    assert_null(strstr(st.last_error, "wrong"));
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);

    const char *up[] = {"--user", "svc", "--pass", "pw1", NULL};
    assert_true(fx_nats_start(&srv, 0, up));
    memset(&o, 0, sizeof o);
    o.user = "svc";
    o.password = "pw1";
    n = client_for(srv.port, 2000, &o);
    assert_true(wait_connected(n, 5000));
    mc__nats_destroy(n);
    fx_nats_cleanup(&srv);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_check),
        cmocka_unit_test(test_classify),
        cmocka_unit_test(test_jetstream_dedupe_and_restart),
        cmocka_unit_test(test_no_stream_for_subject_is_transient),
        cmocka_unit_test(test_core_publish_reaches_only_its_subject),
        cmocka_unit_test(test_down_at_start_then_up),
        cmocka_unit_test(test_silent_server),
        cmocka_unit_test(test_stalled_server),
        cmocka_unit_test(test_auth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
