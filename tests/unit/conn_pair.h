/*
 * conn_pair.h: a live-server connection on a real loopback TCP connection, for the tests that
 * drive conn.c on a private libuv loop (test_server_limits.c, test_sendring.c): the server side
 * becomes a WebSocket subscriber connection in the given table, the client side is a plain
 * socket the test reads (or does not). Both socket buffers are small (4 KiB asked), so the
 * kernel takes little and writes are cut short. Header-only (cmocka asserts); single-threaded.
 */
#ifndef MC_TEST_CONN_PAIR_H
#define MC_TEST_CONN_PAIR_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"

/* Returns the server-side connection; *client gets the peer's socket. */
static inline mcd_conn_t *conn_pair(mcd_conn_table_t *t, uv_loop_t *loop, int *client)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(l >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t slen = sizeof(sa);
    assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(l, 1), 0);
    assert_int_equal(getsockname(l, (struct sockaddr *)&sa, &slen), 0);
    *client = socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096;
    setsockopt(*client, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    assert_int_equal(connect(*client, (struct sockaddr *)&sa, sizeof(sa)), 0);
    int fd = accept(l, NULL, NULL);
    assert_true(fd >= 0);
    close(l);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    mcd_conn_t *c = mcd_conn_new(t, loop);
    assert_non_null(c);
    assert_int_equal(uv_tcp_open(&c->tcp, fd), 0);
    assert_int_equal(mcd_conn_add(c, NULL), 0);
    mcd_conn_subscribed(c);
    c->state = MCD_ST_WS;
    c->transport = MCD_T_WS;
    return c;
}

#endif
