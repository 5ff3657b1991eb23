/*
 * test_sendring.c: the two write paths of the live server (server.io): io_uring submissions
 * (sendring.c, and conn.c's ring_flush) and writev (uv_try_write), driven on the same
 * connections with the same messages. Both must put exactly the same bytes on every socket,
 * in order, through short writes and readers that stop reading; the ring's sends never block
 * (a full socket is -EAGAIN, a bad descriptor its errno); a peer that went away closes its
 * connection on either path.
 *
 * Connections are real loopback TCP pairs with small socket buffers (so that the kernel takes
 * little and short writes happen), driven on a private libuv loop in this thread. Where the
 * kernel refuses io_uring the ring cases are skipped (the writev cases still run).
 * Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "conn_pair.h"
#include "mongocast.h"
#include "sendring.h"

enum { N_PEERS = 12, N_MSGS = 48, ROUNDS = 16 };

/* How a table writes: one writev per connection, one io_uring, or a pool of senders
 * (server.threads) with io_uring or sendmsg. */
typedef struct path {
    bool uring;
    unsigned threads; /* 1: no pool */
} path_t;

typedef struct peer {
    int client;
    mcd_conn_t *conn;
    uint8_t *got;
    size_t got_len;
    size_t got_cap;
} peer_t;

static void drain(uv_loop_t *loop)
{
    while (uv_run(loop, UV_RUN_NOWAIT)) {
    }
}

static void tcp_pair(mcd_conn_table_t *t, uv_loop_t *loop, peer_t *p)
{
    memset(p, 0, sizeof(*p));
    p->conn = conn_pair(t, loop, &p->client);
}

/* A table on `loop`, writing as `path` says; false (nothing to clean up) when the kernel
 * refuses io_uring. */
static bool table_init(mcd_conn_table_t *t, uv_loop_t *loop, path_t path)
{
    bool uring = path.uring;
    assert_int_equal(uv_loop_init(loop), 0);
    assert_int_equal(mcd_conn_table_init(t, N_PEERS + 4, 0, 16u << 20, 1000), 0);
    if (path.threads > 1) {
        mcd_sendpool_t *pool = NULL;
        mc_error_t err;
        int rc = mcd_sendpool_new(&pool, path.threads, uring, 8, &err);
        if (rc == MC_EIO && uring) {
            fprintf(stderr, "io_uring unavailable here: %s\n", err.message);
            mcd_conn_table_cleanup(t);
            assert_int_equal(uv_loop_close(loop), 0);
            return false;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(mcd_conn_table_use_pool(t, pool), 0);
        return true;
    }
    if (!uring) {
        return true;
    }
    mcd_sendring_t *r = NULL;
    mc_error_t err;
    if (mcd_sendring_new(&r, 8, &err) != 0) {
        fprintf(stderr, "io_uring unavailable here: %s\n", err.message);
        mcd_conn_table_cleanup(t);
        assert_int_equal(uv_loop_close(loop), 0);
        return false;
    }
    assert_int_equal(mcd_conn_table_use_ring(t, r), 0);
    return true;
}

/* Reads at most `max` bytes the peer has, without blocking. */
static void peer_read(peer_t *p, size_t max)
{
    uint8_t buf[65536];
    while (max > 0) {
        ssize_t r = recv(p->client, buf, max < sizeof(buf) ? max : sizeof(buf), MSG_DONTWAIT);
        if (r <= 0) {
            return;
        }
        if (p->got_len + (size_t)r > p->got_cap) {
            p->got_cap = (p->got_len + (size_t)r) * 2;
            p->got = realloc(p->got, p->got_cap);
            assert_non_null(p->got);
        }
        memcpy(p->got + p->got_len, buf, (size_t)r);
        p->got_len += (size_t)r;
        max -= (size_t)r;
    }
}

/* Message i: an event message (WebSocket header and body: two buffers) whose document is
 * padded to a size that varies from a few bytes to ~40 KiB, or, every fifth, a raw message
 * (one buffer). Every byte pattern depends on i, so a lost, repeated or reordered byte
 * range shows. */
static mcd_msg_t *message(int i)
{
    size_t pad = (size_t)((i * 7919) % 40000) + (size_t)(i % 3) * 10;
    char *p = malloc(pad + 1);
    assert_non_null(p);
    for (size_t k = 0; k < pad; k++) {
        p[k] = (char)('a' + (k + (size_t)i) % 26);
    }
    p[pad] = '\0';
    mcd_msg_t *m;
    if (i % 5 == 4) {
        m = mcd_msg_new_raw(p, pad + 1);
    } else {
        bson_t *doc = BCON_NEW("_id", "{", "_data", BCON_UTF8("82AB"), "}", "operationType",
                               BCON_UTF8("insert"), "fullDocument", "{", "i", BCON_INT32(i), "pad",
                               BCON_UTF8(p), "}");
        mc_error_t err = {0};
        mc_event_t *ev = mc_event_new_change("orders", 7, doc, NULL, &err);
        assert_non_null(ev);
        bson_destroy(doc);
        m = mcd_msg_new_event(ev, 16777216);
        mc_event_unref(&ev);
    }
    assert_non_null(m);
    free(p);
    return m;
}

/* The bytes `m` puts on a WebSocket. */
static void append_wire(uint8_t **out, size_t *len, mcd_msg_t *m)
{
    uv_buf_t b[3];
    size_t size = mcd_msg_size(m, MCD_T_WS);
    unsigned nb = mcd_msg_bufs(m, MCD_T_WS, b);
    *out = realloc(*out, *len + size);
    assert_non_null(*out);
    for (unsigned k = 0; k < nb; k++) {
        memcpy(*out + *len, b[k].base, b[k].len);
        *len += b[k].len;
    }
}

/* Sends the messages in rounds of 1 to 5 to N_PEERS connections (one loop pass each: queue,
 * then the check phase's flush), with peers 0, 3, 6.. reading everything after every pass,
 * peers 1, 4, .. at most 3000 bytes, peers 2, 5, .. nothing in odd rounds, then drains.
 * Returns false when the ring was asked for and the kernel refuses io_uring.
 * *short_writes: passes after which a connection had a uv_write in flight (the kernel took
 * part of a send). */
static bool run_path(path_t path, mcd_msg_t **msgs, peer_t peers[N_PEERS], uint64_t *sends,
                     int *short_writes)
{
    bool uring = path.uring;
    uv_loop_t loop;
    mcd_conn_table_t t;
    if (!table_init(&t, &loop, path)) {
        return false;
    }
    for (int p = 0; p < N_PEERS; p++) {
        tcp_pair(&t, &loop, &peers[p]);
    }
    *short_writes = 0;
    int next = 0;
    for (int round = 0; next < N_MSGS; round++) {
        int k = 1 + round % 5;
        for (int j = 0; j < k && next < N_MSGS; j++, next++) {
            for (int p = 0; p < N_PEERS; p++) {
                assert_int_equal(mcd_conn_send(peers[p].conn, msgs[next], false), 0);
            }
        }
        mcd_conn_flush_dirty(&t); /* the server's check phase */
        for (int p = 0; p < N_PEERS; p++) {
            if (peers[p].conn->n_writes) {
                (*short_writes)++;
            }
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        for (int p = 0; p < N_PEERS; p++) {
            if (p % 3 == 0) {
                peer_read(&peers[p], SIZE_MAX);
            } else if (p % 3 == 1) {
                peer_read(&peers[p], 3000);
            } else if (round % 2 == 0) {
                peer_read(&peers[p], SIZE_MAX);
            }
        }
    }
    for (int spin = 0; spin < 200000; spin++) {
        bool busy = false;
        mcd_conn_flush_dirty(&t);
        uv_run(&loop, UV_RUN_NOWAIT);
        for (int p = 0; p < N_PEERS; p++) {
            peer_read(&peers[p], SIZE_MAX);
            busy |= peers[p].conn->queued_bytes != 0;
        }
        if (!busy) {
            break;
        }
    }
    for (int p = 0; p < N_PEERS; p++) {
        assert_int_equal(peers[p].conn->queued_bytes, 0);
        assert_false(peers[p].conn->flags & MCD_CF_CLOSED);
    }
    assert_int_equal(t.stats.slow_disconnects, 0);
    *sends = uring ? t.stats.ring_sends : t.stats.writev_sends;
    if (path.threads > 1) {
        /* The senders' counts add up (which thread made which send depends on timing: see
         * test_pool_spreads). */
        assert_non_null(t.pool);
        assert_int_equal(mcd_sendpool_uring(t.pool), uring); /* a ring never failed */
        uint64_t sum = 0;
        for (unsigned i = 0; i < path.threads; i++) {
            sum += mcd_sendpool_sends_of(t.pool, i);
        }
        if (uring) {
            assert_int_equal(sum, t.stats.ring_sends);
        } else {
            assert_true(sum > 0 && sum <= t.stats.writev_sends); /* + continuations' writes */
        }
        assert_true(mcd_sendpool_parallel_runs(t.pool) > 0);
    }
    if (uring) {
        assert_true(path.threads > 1 || t.ring); /* it never failed */
        assert_true(t.stats.ring_submits >= 1 && t.stats.ring_submits <= t.stats.ring_sends);
    } else {
        assert_int_equal(t.stats.ring_sends, 0);
    }
    for (int p = 0; p < N_PEERS; p++) {
        mcd_conn_abort(peers[p].conn);
        close(peers[p].client);
    }
    drain(&loop);
    mcd_conn_table_cleanup(&t);
    assert_int_equal(uv_loop_close(&loop), 0);
    return true;
}

static void test_paths_write_identical_bytes(void **state)
{
    (void)state;
    mcd_msg_t *msgs[N_MSGS];
    uint8_t *want = NULL;
    size_t want_len = 0;
    for (int i = 0; i < N_MSGS; i++) {
        msgs[i] = message(i);
        append_wire(&want, &want_len, msgs[i]);
    }
    /* writev, one ring, then server.threads 2 and 4 (io_uring per sender, and sendmsg). */
    static const path_t paths[] = {{false, 1}, {true, 1}, {false, 2}, {true, 2}, {true, 4},
                                   {false, 4}};
    bool skipped = false;
    for (size_t k = 0; k < sizeof(paths) / sizeof(paths[0]); k++) {
        peer_t peers[N_PEERS];
        uint64_t sends = 0;
        int short_writes = 0;
        if (!run_path(paths[k], msgs, peers, &sends, &short_writes)) {
            skipped = true;
            continue;
        }
        for (int p = 0; p < N_PEERS; p++) {
            assert_int_equal(peers[p].got_len, want_len);
            assert_memory_equal(peers[p].got, want, want_len);
            free(peers[p].got);
        }
        assert_true(sends > 0);
        /* The small buffers make the kernel take part of some sends: the continuation path
         * (uv_write of the rest) ran on every path. */
        assert_true(short_writes > 0);
    }
    for (int i = 0; i < N_MSGS; i++) {
        mcd_msg_unref(msgs[i]);
    }
    free(want);
    if (skipped) {
        skip();
    }
}

typedef struct result {
    int n;
    int tag[8];
    int res[8];
} result_t;

static void record(void *tag, int res, void *arg)
{
    result_t *r = arg;
    r->tag[r->n] = (int)(intptr_t)tag;
    r->res[r->n] = res;
    r->n++;
}

/* Up to 256 results (the pool test's). */
typedef struct many_results {
    int n;
    int tag[256];
    int res[256];
} many_results_t;

static void record_any(void *tag, int res, void *arg)
{
    many_results_t *r = arg;
    r->tag[r->n] = (int)(intptr_t)tag;
    r->res[r->n] = res;
    r->n++;
}

static int res_of(const result_t *r, int tag)
{
    for (int i = 0; i < r->n; i++) {
        if (r->tag[i] == tag) {
            return r->res[i];
        }
    }
    return 12345;
}

/* The ring on its own: bytes from two buffers, a socket whose buffer is full (-EAGAIN at
 * once: the send never waits) and a descriptor that is not open (its errno). */
static void test_ring_results(void **state)
{
    (void)state;
    mcd_sendring_t *r = NULL;
    mc_error_t err;
    if (mcd_sendring_new(&r, 4, &err) != 0) {
        fprintf(stderr, "io_uring unavailable here: %s\n", err.message);
        skip();
    }
    assert_int_equal(mcd_sendring_room(r), 64); /* rounded up to the minimum */
    int a[2], full[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, a), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, full), 0);
    fcntl(full[0], F_SETFL, O_NONBLOCK);
    char junk[4096] = {0};
    while (send(full[0], junk, sizeof(junk), MSG_DONTWAIT) > 0) {
    }
    int closed_fd = dup(a[1]);
    close(closed_fd);
    struct iovec iov[2] = {{"hello, ", 7}, {"ring", 4}};
    mcd_sendring_add(r, a[0], iov, 2, (void *)(intptr_t)1);
    mcd_sendring_add(r, full[0], iov, 2, (void *)(intptr_t)2);
    mcd_sendring_add(r, closed_fd, iov, 2, (void *)(intptr_t)3);
    assert_int_equal(mcd_sendring_room(r), 61);
    result_t got = {0};
    assert_int_equal(mcd_sendring_run(r, record, &got, &err), 0);
    assert_int_equal(got.n, 3);
    assert_int_equal(res_of(&got, 1), 11);
    assert_int_equal(res_of(&got, 2), -EAGAIN);
    assert_int_equal(res_of(&got, 3), -EBADF);
    char buf[32] = {0};
    assert_int_equal(recv(a[1], buf, sizeof(buf), MSG_DONTWAIT), 11);
    assert_string_equal(buf, "hello, ring");
    assert_int_equal(mcd_sendring_room(r), 64);
    assert_int_equal(mcd_sendring_submits(r), 1); /* three sends, one system call */
    assert_int_equal(mcd_sendring_sends(r), 3);
    /* Nothing added: nothing submitted. */
    got.n = 0;
    assert_int_equal(mcd_sendring_run(r, record, &got, &err), 0);
    assert_int_equal(got.n, 0);
    assert_int_equal(mcd_sendring_submits(r), 1);
    mcd_sendring_destroy(r);
    mcd_sendring_destroy(NULL);
    close(a[0]);
    close(a[1]);
    close(full[0]);
    close(full[1]);
}

/* A peer that went away: the connection closes on its failed send, on either path. */
static void test_peer_gone(void **state)
{
    (void)state;
    for (int uring = 0; uring < 2; uring++) {
        uv_loop_t loop;
        mcd_conn_table_t t;
        if (!table_init(&t, &loop, (path_t){uring != 0, 1})) {
            break;
        }
        peer_t p;
        tcp_pair(&t, &loop, &p);
        /* Unread data at close makes the kernel reset the connection. */
        assert_int_equal(send(p.client, "x", 1, 0), 1);
        close(p.client);
        mcd_msg_t *m = message(1);
        /* Once closed the connection is out of the table (and freed by the loop). */
        for (int i = 0; i < 100 && t.n_conns; i++) {
            mcd_conn_send(p.conn, m, false);
            mcd_conn_flush_dirty(&t);
            uv_run(&loop, UV_RUN_NOWAIT);
        }
        assert_int_equal(t.n_conns, 0);
        if (uring) {
            assert_true(t.stats.ring_sends >= 1);
            assert_non_null(t.ring); /* a failed send is the connection's, not the ring's */
        }
        mcd_msg_unref(m);
        drain(&loop);
        mcd_conn_table_cleanup(&t);
        assert_int_equal(uv_loop_close(&loop), 0);
    }
}

/* The pool on its own: the results come back in the order the sends were added, whichever
 * thread made them (bytes, -EAGAIN for a full socket, the errno of a closed descriptor), for
 * many runs; the send threads take part (within at most 2000 runs, in practice the first
 * few); destroy stops every thread. */
static void test_pool_spreads(void **state)
{
    (void)state;
    enum { N_SOCKS = 200 };
    for (int uring = 0; uring < 2; uring++) {
        mcd_sendpool_t *p = NULL;
        mc_error_t err;
        int rc = mcd_sendpool_new(&p, 4, uring != 0, N_SOCKS + 2, &err);
        if (rc == MC_EIO && uring) {
            fprintf(stderr, "io_uring unavailable here: %s\n", err.message);
            break;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(mcd_sendpool_threads(p), 4);
        assert_int_equal(mcd_sendpool_room(p), 256);
        int sv[N_SOCKS][2];
        for (int i = 0; i < N_SOCKS; i++) {
            assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv[i]), 0);
            fcntl(sv[i][0], F_SETFL, O_NONBLOCK);
        }
        char junk[4096] = {0};
        while (send(sv[7][0], junk, sizeof(junk), MSG_DONTWAIT) > 0) {
        }
        int closed_fd = dup(sv[0][1]);
        close(closed_fd);
        char text[N_SOCKS][16];
        struct iovec iov[N_SOCKS][2];
        bool helped = false;
        int runs = 0;
        for (; runs < 2000 && !helped; runs++) {
            for (int i = 0; i < N_SOCKS; i++) {
                int len = snprintf(text[i], sizeof(text[i]), "r%d-s%d", runs, i);
                iov[i][0] = (struct iovec){"<", 1};
                iov[i][1] = (struct iovec){text[i], (size_t)len};
                mcd_sendpool_add(p, sv[i][0], iov[i], 2, (void *)(intptr_t)i);
            }
            mcd_sendpool_add(p, closed_fd, iov[0], 2, (void *)(intptr_t)N_SOCKS);
            assert_int_equal(mcd_sendpool_room(p), 256 - N_SOCKS - 1);
            many_results_t got = {0};
            assert_int_equal(mcd_sendpool_run(p, record_any, &got, &err), 0);
            assert_int_equal(got.n, N_SOCKS + 1);
            assert_int_equal(mcd_sendpool_room(p), 256);
            for (int i = 0; i <= N_SOCKS; i++) {
                assert_int_equal(got.tag[i], i); /* in the order added */
                if (i == N_SOCKS) {
                    assert_int_equal(got.res[i], -EBADF);
                } else if (i == 7) {
                    assert_int_equal(got.res[i], -EAGAIN);
                } else {
                    char buf[32] = {0};
                    assert_int_equal(got.res[i], 1 + (int)strlen(text[i]));
                    assert_int_equal(recv(sv[i][1], buf, sizeof(buf), MSG_DONTWAIT), got.res[i]);
                    assert_int_equal(buf[0], '<');
                    assert_string_equal(buf + 1, text[i]);
                }
            }
            uint64_t sum = 0;
            for (unsigned k = 0; k < 4; k++) {
                sum += mcd_sendpool_sends_of(p, k);
                helped |= k > 0 && mcd_sendpool_sends_of(p, k) > 0;
            }
            assert_int_equal(sum, (uint64_t)(runs + 1) * (N_SOCKS + 1));
        }
        assert_true(helped);
        assert_true(mcd_sendpool_parallel_runs(p) == (uint64_t)runs);
        assert_int_equal(mcd_sendpool_uring(p), uring != 0);
        mcd_sendpool_destroy(p);
        for (int i = 0; i < N_SOCKS; i++) {
            close(sv[i][0]);
            close(sv[i][1]);
        }
    }
    mcd_sendpool_destroy(NULL);
    mc_error_t err;
    mcd_sendpool_t *p = NULL;
    assert_int_equal(mcd_sendpool_new(&p, 1, false, 64, &err), MC_EINVAL);
    assert_int_equal(mcd_sendpool_new(&p, 65, false, 64, &err), MC_EINVAL);
    assert_null(p);
}

static void test_io_mode_parse(void **state)
{
    (void)state;
    assert_int_equal(mcd_io_mode_parse(NULL), MCD_IO_AUTO);
    assert_int_equal(mcd_io_mode_parse("auto"), MCD_IO_AUTO);
    assert_int_equal(mcd_io_mode_parse("uring"), MCD_IO_URING);
    assert_int_equal(mcd_io_mode_parse("writev"), MCD_IO_WRITEV);
}

int main(void)
{
    /* As the daemon does: a peer that went away costs EPIPE (writev path), not the process. */
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths_write_identical_bytes),
        cmocka_unit_test(test_ring_results),
        cmocka_unit_test(test_peer_gone),
        cmocka_unit_test(test_pool_spreads),
        cmocka_unit_test(test_io_mode_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
