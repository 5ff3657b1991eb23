/*
 * server_internal.h: the server object and what its parts share: listener.c (accepting),
 * http_routes.c (requests), ws_session.c and sse_session.c (subscribers), metrics.c, and
 * server.c (lifecycle). conn.h (connections and queues), fanout.h (streams) and msg.h (wire
 * messages) are the lower layers; they do not include this file.
 *
 * Thread: everything here runs on the server's loop thread only; nothing is locked.
 */
#ifndef MONGOCAST_DAEMON_SERVER_INTERNAL_H
#define MONGOCAST_DAEMON_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "auth.h"
#include "conn.h"
#include "fanout.h"
#include "http.h"
#include "mongocast.h"
#include "msg.h"
#include "server.h"
#include "catchup.h"
#include "snapshot.h"
#include "sse.h"
#include "subscription.h"
#include "tls.h"
#include "ws.h"

typedef struct mcd_timing {
    uint32_t ping_ms;    /* WebSocket ping interval (25000) */
    uint32_t pong_ms;    /* pong deadline after a ping (10000) */
    uint32_t sse_ms;     /* SSE heartbeat comment interval (15000) */
    uint32_t request_ms; /* a request must be complete this long after its first byte */
    uint32_t idle_ms;    /* keep-alive connection without a request */
    uint32_t linger_ms;  /* closing connection: time to write and read the peer's close */
    uint32_t tick_ms;    /* housekeeping sweep period */
} mcd_timing_t;

struct mcd_server {
    const mc_config_t *config;
    mcd_auth_t *auth;
    mc_engine_t *engine;
    uv_loop_t loop;
    uv_tcp_t listener;
    mcd_tls_ctx_t *tls; /* server.tls: the certificate new connections get; NULL: plain TCP */
    uv_async_t dispatch_async;
    uv_async_t stop_async;
    uv_timer_t tick;
    uv_check_t flush_check;
    pthread_t thread;
    bool thread_started;
    bool loop_ready;
    bool stopping;
    bool stopped;
    bool engine_stopped;
    uint16_t stop_code;
    int engine_rc;
    mc_error_t engine_err;
    struct sockaddr_storage listen_addr; /* parsed server.listen */
    int port;
    char address[80];
    mcd_timing_t timing;
    uint32_t max_subscribers; /* server.max_connections */
    mcd_conn_table_t table;   /* every connection; its size leaves room for plain HTTP */
    mcd_fanout_t fanout;      /* the streams' hubs */
    mcd_snapshots_t *snapshots; /* ?snapshot=true reads (snapshot.c) */
    mcd_catchups_t *catchups;   /* resumes older than the history (catchup.c) */
    char *rbuf;               /* the one read buffer all connections share */
    size_t rbuf_len;
    uint32_t accepts_left; /* connections still accepted in this loop pass */
    bool accept_waiting;   /* one is left to mcd_listener_pass() */
    unsigned threads;      /* server.threads as resolved: senders of the fan-out's writes */
    char io_note[640];     /* how sockets are written (server.io), logged at start */
    bool io_note_warn;     /* io_uring was wanted (auto) but is not available */
    char *metrics_text;    /* /metrics as rendered during the loop pass at metrics_ms */
    size_t metrics_len;
    int64_t metrics_ms;
};

/* A connection's server: its handle's loop is embedded in the server (saves a pointer in
 * every connection). */
static inline mcd_server_t *mcd_conn_server(const mcd_conn_t *c)
{
    return (mcd_server_t *)((char *)c->tcp.loop - offsetof(mcd_server_t, loop));
}

/* ---- listener.c ------------------------------------------------------------------------------ */

/* "host:port", "[v6]:port" -> sockaddr. Returns 0 or -1. */
int mcd_listener_parse(const char *listen, struct sockaddr_storage *ss);
/* Binds and listens on server.listen (on the owner's thread: the loop does not run yet) and
 * logs the address. Returns 0 or MC_EIO. */
int mcd_listener_bind(mcd_server_t *srv, mc_error_t *err);
/* Once per loop pass (the check phase): a new allowance of accepts, and the connection left
 * waiting by the last pass. */
void mcd_listener_pass(mcd_server_t *srv);

/* ---- tls_session.c --------------------------------------------------------------------------- */

/* Where a connection's plaintext goes (listener.c: by the connection's state). */
typedef void (*mcd_input_fn)(mcd_conn_t *c, char *data, size_t len);
/* What a TLS connection read: `data` holds `len` bytes of ciphertext in a buffer of `cap`
 * bytes, which is reused for the plaintext handed to `deliver`. */
void mcd_tls_input(mcd_conn_t *c, char *data, size_t len, size_t cap, mcd_input_fn deliver);

/* ---- http_routes.c --------------------------------------------------------------------------- */

/* Feeds bytes read on an HTTP connection: requests are answered in order; after an upgrade
 * the rest goes to the WebSocket session. */
void mcd_http_input(mcd_conn_t *c, char *data, size_t len);
/* {"error": message, "code": code} with `status`. Refusals keep the connection open when the
 * request allowed it (a client may retry with a token on the same connection). */
void mcd_http_refuse(mcd_conn_t *c, int status, const char *code, const char *message,
                     bool keep_alive, const char *extra);
/* Counts a refusal in /metrics (mongocast_refusals_total{status}). */
void mcd_count_refusal(mcd_stats_t *stats, int status);
/* Housekeeping of an HTTP connection: request and idle timeouts. */
void mcd_http_session_tick(mcd_conn_t *c, int64_t now);

/* ---- ws_session.c ---------------------------------------------------------------------------- */

/* Answers 101 and turns `c` into a WebSocket connection. Returns 0, or -1 (closed). */
int mcd_ws_session_start(mcd_conn_t *c, const char accept_key[29]);
void mcd_ws_input(mcd_conn_t *c, uint8_t *data, size_t len);
/* Pings, pong deadline, token expiry. */
void mcd_ws_session_tick(mcd_conn_t *c, int64_t now, int64_t wall_s);

/* ---- sse_session.c --------------------------------------------------------------------------- */

/* Answers 200 text/event-stream and turns `c` into an SSE connection. Returns 0, or -1
 * (closed). */
int mcd_sse_session_start(mcd_conn_t *c, const char *origin);
/* Heartbeat comments, token expiry. */
void mcd_sse_session_tick(mcd_conn_t *c, int64_t now, int64_t wall_s);

/* ---- metrics.c ------------------------------------------------------------------------------- */

/* Renders the Prometheus text exposition into a new buffer (*len: its length). */
char *mcd_metrics_render(mcd_server_t *srv, size_t *len);

/* The /readyz body (malloc'ed; NULL when memory runs out): {"ready": bool, "streams": {name:
 * state}, "sinks": {name: {state, durable, reason}}} with only the sinks that are not running
 * listed. *ready: every stream open and no durable sink failed (and `engine_running`). Loop
 * thread. */
char *mcd_readyz_render(mcd_server_t *srv, bool engine_running, size_t *len, bool *ready);

#endif
