/*
 * listener.c: the listening socket: parsing server.listen, binding, accepting connections
 * into the connection table (making room by closing the least recently used connection that
 * is not a subscriber, when the table or the client's address is at its limit; refusing only
 * when every connection in the way is a subscriber), and routing what a connection reads to
 * its session (HTTP requests or WebSocket frames), through its TLS session first when
 * server.tls is on (tls_session.c).
 *
 * Thread: mcd_listener_parse() and mcd_listener_bind() run on the owner's thread before the
 * loop runs; everything else on the loop thread.
 * Invariant: every read lands in the server's one shared buffer and is consumed before the
 * read callback returns.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server_internal.h"

#define LISTEN_BACKLOG 4096
#define ACCEPT_PER_PASS 64

/* "host:port", "[v6]:port" -> sockaddr. */
int mcd_listener_parse(const char *listen, struct sockaddr_storage *ss)
{
    char host[256];
    const char *colon;
    if (listen[0] == '[') {
        const char *rb = strchr(listen, ']');
        if (!rb || rb[1] != ':' || (size_t)(rb - listen - 1) >= sizeof(host)) {
            return -1;
        }
        memcpy(host, listen + 1, (size_t)(rb - listen - 1));
        host[rb - listen - 1] = '\0';
        colon = rb + 1;
    } else {
        colon = strrchr(listen, ':');
        if (!colon || (size_t)(colon - listen) >= sizeof(host)) {
            return -1;
        }
        memcpy(host, listen, (size_t)(colon - listen));
        host[colon - listen] = '\0';
    }
    char *end = NULL;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535) {
        return -1;
    }
    if (!*host || strcmp(host, "*") == 0) {
        strcpy(host, "0.0.0.0");
    }
    if (strcmp(host, "localhost") == 0) {
        strcpy(host, "127.0.0.1");
    }
    if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)ss) == 0) {
        return 0;
    }
    if (uv_ip6_addr(host, (int)port, (struct sockaddr_in6 *)ss) == 0) {
        return 0;
    }
    return -1;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    mcd_conn_t *c = (mcd_conn_t *)h;
    mcd_server_t *srv = mcd_conn_server(c);
    /* Every read is consumed before the read callback returns, so one buffer serves all. */
    *buf = uv_buf_init(srv->rbuf, (unsigned)srv->rbuf_len);
}

/* Plaintext read on a connection, to its session. */
static void route_input(mcd_conn_t *c, char *data, size_t len)
{
    switch (c->state) {
    case MCD_ST_HTTP: mcd_http_input(c, data, len); break;
    case MCD_ST_WS: mcd_ws_input(c, (uint8_t *)data, len); break;
    default: break; /* SSE clients have nothing to say; closing connections are drained */
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    mcd_conn_t *c = (mcd_conn_t *)s;
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    if (nread < 0) {
        mcd_conn_abort(c);
        return;
    }
    if (nread == 0) {
        return;
    }
    if (c->tls) {
        /* Decrypted in place, then routed below (tls_session.c). */
        mcd_tls_input(c, buf->base, (size_t)nread, mcd_conn_server(c)->rbuf_len, route_input);
        return;
    }
    route_input(c, buf->base, (size_t)nread);
}

/* Takes the connection libuv has accepted into the table. */
static void accept_one(mcd_server_t *srv)
{
    mcd_conn_t *c = mcd_conn_new(&srv->table, &srv->loop);
    if (!c) {
        return;
    }
    if (uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, mcd_conn_free_cb);
        return;
    }
    struct sockaddr_storage peer;
    int plen = sizeof(peer);
    bool known = uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&peer, &plen) == 0;
    if (srv->tls && !srv->stopping && !(c->tls = mcd_tls_conn_new(srv->tls))) {
        uv_close((uv_handle_t *)&c->tcp, mcd_conn_free_cb); /* out of memory */
        return;
    }
    if (srv->stopping || mcd_conn_admit(&srv->table, known ? &peer : NULL) != 0 ||
        mcd_conn_add(c, known ? &peer : NULL) != 0) {
        /* No room that a plain connection could give up: a best-effort answer without
         * reading the request, then close. */
        static const char body[] = "{\"error\":\"connection limit reached, retry later\","
                                   "\"code\":\"too_many_connections\"}";
        char full[512];
        int n = snprintf(full, sizeof(full),
                         "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\nRetry-After: 5\r\n\r\n%s",
                         sizeof(body) - 1, body);
        uv_buf_t b = uv_buf_init(full, (unsigned)n);
        if (!c->tls) { /* a TLS client cannot read it before a handshake: just closed */
            uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        }
        mcd_tls_conn_free(c->tls);
        mcd_count_refusal(&srv->table.stats, 503);
        uv_close((uv_handle_t *)&c->tcp, mcd_conn_free_cb);
        return;
    }
    c->deadline_ms = (int64_t)uv_now(&srv->loop) + srv->timing.request_ms;
    uv_tcp_nodelay(&c->tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        mcd_conn_abort(c);
    }
}

/* libuv accepts every pending connection in one go. Under a connection storm that is hundreds
 * per loop pass, each of which may evict the least recently used plain connection, before any
 * of them is read: a client that connected a moment ago would be closed before its request
 * was looked at. So at most ACCEPT_PER_PASS are taken per pass; leaving one un-accepted makes
 * libuv stop watching the listener until mcd_listener_pass() takes it. */
static void on_connection(uv_stream_t *listener, int status)
{
    mcd_server_t *srv = listener->data;
    if (status < 0) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "server", "accept failed: %s", uv_strerror(status));
        return;
    }
    if (srv->accepts_left == 0) {
        srv->accept_waiting = true;
        return;
    }
    srv->accepts_left--;
    accept_one(srv);
}

void mcd_listener_pass(mcd_server_t *srv)
{
    srv->accepts_left = ACCEPT_PER_PASS;
    if (srv->accept_waiting && !srv->stopping) {
        srv->accept_waiting = false;
        srv->accepts_left--;
        accept_one(srv);
    }
}

int mcd_listener_bind(mcd_server_t *srv, mc_error_t *err)
{
    const char *listen = srv->config->server.listen ? srv->config->server.listen : "127.0.0.1:8080";
    srv->accepts_left = ACCEPT_PER_PASS;
    int rc = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&srv->listen_addr, 0);
    if (rc == 0) {
        rc = uv_listen((uv_stream_t *)&srv->listener, LISTEN_BACKLOG, on_connection);
    }
    if (rc != 0) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, -rc, "cannot listen on %s: %s", listen,
                            uv_strerror(rc));
    }
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&bound, &blen);
    char ip[64] = "?";
    if (bound.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&bound, ip, sizeof(ip));
        srv->port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
        snprintf(srv->address, sizeof(srv->address), "[%s]:%d", ip, srv->port);
    } else {
        uv_ip4_name((struct sockaddr_in *)&bound, ip, sizeof(ip));
        srv->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
        snprintf(srv->address, sizeof(srv->address), "%s:%d", ip, srv->port);
    }
    mc_log(MC_LOG_NOTICE, "server", "server listening on %s max_connections=%u%s", srv->address,
           srv->max_subscribers, srv->tls ? " tls=on" : "");
    if (srv->tls) {
        char what[512];
        mcd_tls_ctx_describe(srv->tls, what, sizeof(what));
        mc_log(MC_LOG_NOTICE, "server", "TLS certificate: %s", what);
    }
    return 0;
}
