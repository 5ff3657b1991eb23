/*
 * test_server_limits.c: the live server's per-client bounds at the level of their code: the
 * oversize notice (mc_event_oversize_json) and its per-view forms (mcd_msg_view: a notice
 * tells no more than its routing view) and per-subscriber form (mcd_msg_new_own: no more than
 * the subscriber's own change), the SSE error event, the connection table's
 * eviction of plain connections and its per-address limit (conn.c), and the send-queue rule
 * that lets one large message through to a reader that keeps up while bounding what queues
 * behind it.
 *
 * Connections are driven on a private libuv loop in this thread; the send-queue cases use a
 * real loopback TCP pair with small socket buffers so that the kernel takes little.
 * Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "conn_pair.h"
#include "mongocast.h"
#include "sse.h"

/* ---- the oversize notice ------------------------------------------------------------------ */

static mc_event_t *change(const char *json, const char *recipient_path)
{
    bson_error_t berr;
    bson_t *doc = bson_new_from_json((const uint8_t *)json, -1, &berr);
    assert_non_null(doc);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", 7, doc, recipient_path, &err);
    assert_non_null(ev);
    bson_destroy(doc);
    return ev;
}

static void test_oversize_notice(void **state)
{
    (void)state;
    mc_event_t *ev = change("{\"_id\": {\"_data\": \"82AB\"}, \"operationType\": \"update\", "
                            "\"ns\": {\"db\": \"shop\", \"coll\": \"orders\"}, "
                            "\"documentKey\": {\"_id\": {\"$oid\": \"0123456789abcdef01234567\"}}, "
                            "\"fullDocument\": {\"owner\": \"u1\"}}",
                            "fullDocument.owner");
    size_t len = 0;
    char *n = mc_event_oversize_json(ev, 20000000, 16777216, &len);
    assert_non_null(n);
    assert_int_equal(strlen(n), len);
    assert_string_equal(n, "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"82AB\","
                           "\"recipient\":\"u1\",\"operationType\":\"update\",\"ns\":{"
                           "\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{"
                           "\"_id\":{\"$oid\":\"0123456789abcdef01234567\"}},"
                           "\"size\":20000000,\"limit\":16777216}");
    bson_free(n);
    mc_event_unref(&ev);

    /* No recipient path: no recipient key; a pipeline that removed ns and operationType:
     * nulls; a documentKey over 4 KiB: null, so the notice stays small. */
    char *big = malloc(6000);
    assert_non_null(big);
    memset(big, 'k', 5999);
    big[5999] = '\0';
    char *json = malloc(7000);
    assert_non_null(json);
    snprintf(json, 7000, "{\"_id\": {\"_data\": \"01\"}, \"documentKey\": {\"_id\": \"%s\"}}", big);
    ev = change(json, NULL);
    n = mc_event_oversize_json(ev, 5, 4, &len);
    assert_non_null(n);
    assert_string_equal(n, "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"01\","
                           "\"operationType\":null,\"ns\":null,\"documentKey\":null,"
                           "\"size\":5,\"limit\":4}");
    bson_free(n);
    mc_event_unref(&ev);
    free(big);
    free(json);

    /* Control events never need one. */
    ev = mc_event_new_control(MC_EVENT_READY, "orders", 1, NULL);
    assert_null(mc_event_oversize_json(ev, 10, 5, NULL));
    mc_event_unref(&ev);
}

/* An update that hands document `id_json` from u1 to u2; u1's version carries `before_extra`
 * and u2's `after_extra` (JSON members starting with a comma, or ""). */
static mc_event_t *handover(const char *id_json, const char *before_extra, const char *after_extra)
{
    size_t cap = strlen(id_json) * 3 + strlen(before_extra) + strlen(after_extra) + 1024;
    char *json = malloc(cap);
    assert_non_null(json);
    snprintf(json, cap,
             "{\"_id\": {\"_data\": \"82CD\"}, \"operationType\": \"update\", "
             "\"ns\": {\"db\": \"shop\", \"coll\": \"orders\"}, \"documentKey\": {\"_id\": %s}, "
             "\"updateDescription\": {\"updatedFields\": {\"owner\": \"u2\"}, "
             "\"removedFields\": []}, "
             "\"fullDocument\": {\"_id\": %s, \"owner\": \"u2\"%s}, "
             "\"fullDocumentBeforeChange\": {\"_id\": %s, \"owner\": \"u1\"%s}}",
             id_json, id_json, after_extra, id_json, before_extra);
    mc_event_t *ev = change(json, "fullDocument.owner");
    free(json);
    return ev;
}

static char *filled(char c, size_t n)
{
    char *s = malloc(n + 1);
    assert_non_null(s);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* server.max_message_bytes holds for each routing view's own message: u1's big version (the
 * pre-image) makes the full event too big, but not the new owner's ENTERED view; an ENTERED
 * view that is too big itself has a notice marked "entered" whose size is its own. */
static void test_oversize_per_view(void **state)
{
    (void)state;
    const size_t limit = 8192;
    char *big = filled('s', 20000);
    char extra[20100];
    snprintf(extra, sizeof(extra), ", \"secret\": \"%s\"", big);
    mc_event_t *ev = handover("7", extra, "");
    mcd_msg_t *full = mcd_msg_new_event(ev, limit);
    assert_non_null(full);
    assert_true(full->flags & MCD_MSG_OVERSIZE);
    assert_non_null(strstr(full->body, "\"type\":\"oversize\""));
    mcd_msg_t *entered = mcd_msg_view(full, MC_EVENT_VIEW_ENTERED);
    assert_non_null(entered);
    assert_false(entered->flags & MCD_MSG_OVERSIZE);
    assert_string_equal(entered->body, mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, NULL));
    assert_null(strstr(entered->body, "sss"));
    assert_ptr_equal(mcd_msg_view(full, MC_EVENT_VIEW_ENTERED), entered); /* made once */
    mcd_msg_t *left = mcd_msg_view(full, MC_EVENT_VIEW_LEFT);
    assert_non_null(left);
    assert_string_equal(left->body, "{\"type\":\"left\",\"stream\":\"orders\",\"_id\":7}");
    assert_ptr_equal(mcd_msg_view(full, MC_EVENT_VIEW_FULL), full);
    assert_null(mcd_msg_view(full, MC_EVENT_VIEW_NONE));
    mcd_msg_unref(full); /* frees the views too (ASan) */
    mc_event_unref(&ev);

    /* The new version is the big one: the ENTERED view's own notice, nothing of u1's. */
    snprintf(extra, sizeof(extra), ", \"body\": \"%s\"", big);
    ev = handover("7", ", \"note\": \"u1-only\"", extra);
    size_t full_len = 0, entered_len = 0;
    mc_event_json(ev, &full_len);
    mc_event_json_view(ev, MC_EVENT_VIEW_ENTERED, &entered_len);
    full = mcd_msg_new_event(ev, limit);
    entered = mcd_msg_view(full, MC_EVENT_VIEW_ENTERED);
    assert_true(full->flags & MCD_MSG_OVERSIZE);
    assert_true(entered->flags & MCD_MSG_OVERSIZE);
    char want[1024];
    snprintf(want, sizeof(want),
             "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"82CD\","
             "\"recipient\":\"u2\",\"entered\":true,\"operationType\":\"update\","
             "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{"
             "\"_id\":7},\"size\":%zu,\"limit\":%zu}",
             entered_len, limit);
    assert_string_equal(entered->body, want);
    assert_true(entered_len < full_len);
    /* SSE: an `oversize` event with the change's id, like the full notice. */
    assert_true(mcd_msg_size_any(entered, MCD_T_SSE) > 0);
    assert_memory_equal(entered->sse_head,
                        "id: 82CD\nevent: oversize\ndata: ", entered->sse_head_len);
    mcd_msg_unref(full);
    mc_event_unref(&ev);

    /* A left notice passes the limit only through its _id: it goes without it, still a left
     * notice (SSE: event left, no id line). */
    char id[10100];
    snprintf(id, sizeof(id), "\"%.*s\"", 10000, big);
    ev = handover(id, "", "");
    full = mcd_msg_new_event(ev, limit);
    left = mcd_msg_view(full, MC_EVENT_VIEW_LEFT);
    assert_non_null(left);
    assert_true(left->flags & MCD_MSG_OVERSIZE);
    size_t left_len = 0;
    mc_event_json_view(ev, MC_EVENT_VIEW_LEFT, &left_len);
    snprintf(want, sizeof(want),
             "{\"type\":\"left\",\"stream\":\"orders\",\"_id\":null,\"size\":%zu,"
             "\"limit\":%zu}",
             left_len, limit);
    assert_string_equal(left->body, want);
    assert_true(mcd_msg_size_any(left, MCD_T_SSE) > 0);
    assert_memory_equal(left->sse_head, "event: left\ndata: ", left->sse_head_len);
    mcd_msg_unref(full);
    mc_event_unref(&ev);

    /* The library's answers for views an event does not have. */
    ev = handover("7", "", "");
    assert_null(mc_event_oversize_json_view(ev, MC_EVENT_VIEW_NONE, 10, 5, NULL));
    mc_event_unref(&ev);
    ev = change("{\"_id\": {\"_data\": \"01\"}, \"documentKey\": {\"_id\": 1}, "
                "\"fullDocument\": {\"owner\": \"u1\"}}",
                "fullDocument.owner");
    assert_null(mc_event_oversize_json_view(ev, MC_EVENT_VIEW_ENTERED, 10, 5, NULL));
    char *n = mc_event_oversize_json_view(ev, MC_EVENT_VIEW_FULL, 10, 5, NULL);
    assert_non_null(n);
    assert_non_null(strstr(n, "\"recipient\":\"u1\",\"operationType\":null"));
    bson_free(n);
    mc_event_unref(&ev);
    free(big);
}

/* A subscriber's own message (its per-subscriber stages reshaped the change) is held to the
 * same limit: past it, its notice takes operationType, ns and documentKey from the
 * subscriber's own change, so a field its stages removed is null, never the event's; under
 * it, the message carries the subscriber's change. */
static void test_oversize_own_message(void **state)
{
    (void)state;
    const size_t limit = 8192;
    char *big = filled('s', 20000);
    char extra[20100];
    snprintf(extra, sizeof(extra), ", \"body\": \"%s\"", big);
    mc_event_t *ev = handover("7", "", extra);
    mcd_msg_t *full = mcd_msg_new_event(ev, limit);
    assert_true(full->flags & MCD_MSG_OVERSIZE);

    /* Kept: _id, operationType and the big body; removed: ns and documentKey. */
    char *own_json = malloc(20200);
    assert_non_null(own_json);
    snprintf(own_json, 20200,
             "{\"_id\": {\"_data\": \"82CD\"}, \"operationType\": \"update\", "
             "\"fullDocument\": {\"body\": \"%s\"}}",
             big);
    bson_t *own = bson_new_from_json((const uint8_t *)own_json, -1, NULL);
    assert_non_null(own);
    mcd_msg_t *m = mcd_msg_new_own(full, MC_EVENT_VIEW_ENTERED, own);
    assert_non_null(m);
    assert_true(m->flags & MCD_MSG_OVERSIZE);
    assert_true(m != full && m != mcd_msg_view(full, MC_EVENT_VIEW_ENTERED));
    size_t own_len = 0;
    char *own_msg = mc_event_json_view_with_change(ev, MC_EVENT_VIEW_ENTERED, own, &own_len);
    assert_non_null(own_msg);
    char want[1024];
    snprintf(want, sizeof(want),
             "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"82CD\","
             "\"recipient\":\"u2\",\"entered\":true,\"operationType\":\"update\","
             "\"ns\":null,\"documentKey\":null,\"size\":%zu,\"limit\":%zu}",
             own_len, limit);
    assert_string_equal(m->body, want);
    assert_true(mcd_msg_size_any(m, MCD_T_SSE) > 0);
    assert_memory_equal(m->sse_head, "id: 82CD\nevent: oversize\ndata: ", m->sse_head_len);
    bson_free(own_msg);
    mcd_msg_unref(m);
    bson_destroy(own);

    /* A stage that put something else in ns and documentKey: null too (no document key of
     * the event, nothing that is not {db, coll} strings). */
    own = bson_new_from_json((const uint8_t *)"{\"_id\": {\"_data\": \"82CD\"}, "
                                              "\"ns\": \"shop.orders\", \"documentKey\": 7}",
                             -1, NULL);
    assert_non_null(own);
    char *n = mc_event_oversize_json_view_with_change(ev, MC_EVENT_VIEW_FULL, own, 9, 8, NULL);
    assert_non_null(n);
    assert_string_equal(n, "{\"type\":\"oversize\",\"stream\":\"orders\",\"id\":\"82CD\","
                           "\"recipient\":\"u2\",\"operationType\":null,\"ns\":null,"
                           "\"documentKey\":null,\"size\":9,\"limit\":8}");
    bson_free(n);
    assert_null(mc_event_oversize_json_view_with_change(ev, MC_EVENT_VIEW_LEFT, own, 9, 8, NULL));
    /* Small enough: the subscriber's own change, not the shared message. */
    mcd_msg_t *small = mcd_msg_new_own(full, MC_EVENT_VIEW_FULL, own);
    assert_non_null(small);
    assert_false(small->flags & MCD_MSG_OVERSIZE);
    /* Its _id is the token the message carries as "id": sent once. */
    assert_non_null(strstr(small->body, "\"id\":\"82CD\",\"recipient\":\"u2\",\"change\":{"
                                        "\"ns\":\"shop.orders\",\"documentKey\":7}"));
    assert_null(mcd_msg_new_own(full, MC_EVENT_VIEW_LEFT, own));
    mcd_msg_unref(small);
    bson_destroy(own);
    mcd_msg_unref(full);
    mc_event_unref(&ev);
    free(own_json);
    free(big);
}

/* ---- the SSE error event --------------------------------------------------------------------- */

static void test_sse_error_event(void **state)
{
    (void)state;
    char out[512];
    size_t n = mcd_sse_error_event(out, sizeof(out), "or\"ders", "filter_budget",
                                   "filter too expensive:\nCPU budget exhausted");
    assert_int_equal(n, strlen(out));
    assert_string_equal(out, "event: error\ndata: {\"type\":\"error\",\"stream\":\"or\\\"ders\","
                             "\"code\":\"filter_budget\",\"reason\":\"filter too "
                             "expensive:\\u000aCPU budget exhausted\"}\n\n");
    /* exactly one blank line: the end of the event */
    assert_ptr_equal(strstr(out, "\n\n"), out + n - 2);
    /* too small a buffer: nothing rather than a cut event */
    assert_int_equal(mcd_sse_error_event(out, 40, "s", "c", "r"), 0);
}

/* ---- the table: eviction and the per-address limit --------------------------------------- */

static struct sockaddr_storage peer_v4(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    in->sin_family = AF_INET;
    assert_int_equal(inet_pton(AF_INET, ip, &in->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage peer_v4_mapped(const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    in6->sin6_family = AF_INET6;
    char mapped[64];
    snprintf(mapped, sizeof(mapped), "::ffff:%s", ip);
    assert_int_equal(inet_pton(AF_INET6, mapped, &in6->sin6_addr), 1);
    return ss;
}

static mcd_conn_t *add(mcd_conn_table_t *t, uv_loop_t *loop, const struct sockaddr_storage *p)
{
    assert_int_equal(mcd_conn_admit(t, p), 0);
    mcd_conn_t *c = mcd_conn_new(t, loop);
    assert_non_null(c);
    assert_int_equal(mcd_conn_add(c, p), 0);
    return c;
}

static bool closed(const mcd_conn_t *c)
{
    return (c->flags & MCD_CF_CLOSED) != 0;
}

static void drain(uv_loop_t *loop)
{
    while (uv_run(loop, UV_RUN_NOWAIT)) {
    }
}

static void test_eviction_and_per_address(void **state)
{
    (void)state;
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mcd_conn_table_t t;
    assert_int_equal(mcd_conn_table_init(&t, 4, 2, 65536, 1000), 0);
    struct sockaddr_storage a = peer_v4("10.0.0.1"), b = peer_v4("10.0.0.2");
    struct sockaddr_storage a6 = peer_v4_mapped("10.0.0.1");

    /* Per address: the third connection of 10.0.0.1 (IPv4-mapped counts as the same address)
     * closes that address's least recently used plain connection. */
    mcd_conn_t *a1 = add(&t, &loop, &a);
    mcd_conn_t *a2 = add(&t, &loop, &a6);
    mcd_conn_touch(a1); /* a1 answered a request: a2 is now the least recently used */
    mcd_conn_t *a3 = add(&t, &loop, &a);
    assert_true(closed(a2));
    assert_false(closed(a1) || closed(a3));
    assert_int_equal(t.stats.evicted, 1);

    /* A subscriber is never evicted: with a1 subscribed, a4 takes a3's place. */
    mcd_conn_subscribed(a1);
    mcd_conn_t *a4 = add(&t, &loop, &a);
    assert_true(closed(a3));
    assert_false(closed(a1));
    /* Both of the address's connections subscribed: a new one is refused. */
    mcd_conn_subscribed(a4);
    assert_int_equal(mcd_conn_admit(&t, &a), -1);

    /* Table full (4): another address's new connection closes the table's least recently
     * used plain one; subscribers are skipped. */
    mcd_conn_t *b1 = add(&t, &loop, &b);
    mcd_conn_t *b2 = add(&t, &loop, &b);
    assert_int_equal(t.n_conns, 4);
    struct sockaddr_storage c = peer_v4("10.0.0.3");
    mcd_conn_t *c1 = add(&t, &loop, &c);
    assert_true(closed(b1));
    assert_false(closed(b2) || closed(a1) || closed(a4) || closed(c1));
    assert_int_equal(t.n_conns, 4);
    /* An unknown address (NULL) is only held to the table. */
    mcd_conn_subscribed(b2);
    mcd_conn_subscribed(c1);
    assert_int_equal(mcd_conn_admit(&t, NULL), -1); /* four subscribers: no room */
    mcd_conn_abort(c1);
    mcd_conn_t *u = add(&t, &loop, NULL);
    assert_int_equal(t.stats.evicted, 3);

    mcd_conn_abort(a1);
    mcd_conn_abort(a4);
    mcd_conn_abort(b2);
    mcd_conn_abort(u);
    drain(&loop);
    assert_int_equal(t.n_conns, 0);
    assert_null(t.plain.head);
    for (uint32_t i = 0; i <= t.addr_mask; i++) {
        assert_null(t.addrs[i]); /* address entries leave with their last connection */
    }
    mcd_conn_table_cleanup(&t);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- the send queue -------------------------------------------------------------------------- */

typedef struct pair {
    int client; /* the peer, read (or not) by the test */
    mcd_conn_t *conn;
} pair_t;

/* A connected loopback pair whose server side is a WebSocket subscriber connection in `t`. */
static pair_t tcp_pair(mcd_conn_table_t *t, uv_loop_t *loop)
{
    pair_t p;
    p.conn = conn_pair(t, loop, &p.client);
    return p;
}

static mcd_msg_t *msg_of(size_t n)
{
    char *b = malloc(n);
    assert_non_null(b);
    memset(b, 'm', n);
    mcd_msg_t *m = mcd_msg_new_raw(b, n);
    assert_non_null(m);
    free(b);
    return m;
}

/* Reads what the peer has without blocking; returns the bytes read. */
static size_t peer_read(int fd)
{
    char buf[65536];
    size_t total = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (r <= 0) {
            return total;
        }
        total += (size_t)r;
    }
}

static void test_send_queue_large_message(void **state)
{
    (void)state;
    enum { LIMIT = 65536 };
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    mcd_conn_table_t t;
    assert_int_equal(mcd_conn_table_init(&t, 8, 0, LIMIT, 1000), 0);
    mcd_msg_t *small = msg_of(10000), *large = msg_of(4 * LIMIT), *large2 = msg_of(2 * LIMIT);

    /* A peer that never reads: small messages are refused once the queue passes the limit
     * (4002), a bounded number of them. */
    pair_t p = tcp_pair(&t, &loop);
    int sent = 0;
    while (mcd_conn_send(p.conn, small, false) == 0) {
        assert_true(++sent < 200);
    }
    assert_int_equal(p.conn->state, MCD_ST_CLOSING);
    assert_int_equal(t.stats.slow_disconnects, 1);

    /* One large message (4x the limit) is taken on an idle connection; the limit then bounds
     * what queues behind it; a second large one while the first is on its way is refused. */
    pair_t q = tcp_pair(&t, &loop);
    assert_int_equal(mcd_conn_send(q.conn, large, false), 0);
    assert_int_equal(q.conn->large_left, 4 * LIMIT);
    int behind = 0;
    while (mcd_conn_send(q.conn, small, false) == 0) {
        assert_true(++behind < 200);
    }
    /* the limit (6 of them) plus what the small socket buffers took */
    assert_true(behind >= 5 && behind <= 6 + 20);
    assert_int_equal(t.stats.slow_disconnects, 2);
    pair_t r = tcp_pair(&t, &loop);
    assert_int_equal(mcd_conn_send(r.conn, large, false), 0);
    assert_int_equal(mcd_conn_send(r.conn, large2, false), -1);
    assert_int_equal(t.stats.slow_disconnects, 3);

    /* A reader that keeps up receives large message after large message, each one whole. */
    pair_t k = tcp_pair(&t, &loop);
    size_t got = 0, want = 0;
    for (int i = 0; i < 5; i++) {
        assert_int_equal(mcd_conn_send(k.conn, large, false), 0);
        want += 4 * LIMIT;
        for (int spin = 0; got < want && spin < 100000; spin++) {
            mcd_conn_flush_dirty(&t); /* the server's check phase */
            uv_run(&loop, UV_RUN_NOWAIT);
            got += peer_read(k.client);
        }
        assert_int_equal(got, want);
        uv_run(&loop, UV_RUN_NOWAIT); /* the write callback releases the bytes */
        assert_int_equal(k.conn->large_left, 0);
        assert_int_equal(k.conn->queued_bytes, 0);
    }
    assert_int_equal(t.stats.slow_disconnects, 3);

    mcd_msg_unref(small);
    mcd_msg_unref(large);
    mcd_msg_unref(large2);
    pair_t all[] = {p, q, r, k};
    for (size_t i = 0; i < 4; i++) {
        mcd_conn_abort(all[i].conn);
        close(all[i].client);
    }
    drain(&loop);
    mcd_conn_table_cleanup(&t);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oversize_notice),
        cmocka_unit_test(test_oversize_per_view),
        cmocka_unit_test(test_oversize_own_message),
        cmocka_unit_test(test_sse_error_event),
        cmocka_unit_test(test_eviction_and_per_address),
        cmocka_unit_test(test_send_queue_large_message),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
