/*
 * server_internal.h: what server.c (connections, HTTP, WebSocket I/O), fanout.c (stream hubs,
 * history, shared messages), sse.c and metrics.c share.
 *
 * Thread: everything here runs on the server's loop thread only; nothing is locked and
 * reference counts are plain integers.
 */
#ifndef MONGOCAST_DAEMON_SERVER_INTERNAL_H
#define MONGOCAST_DAEMON_SERVER_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "auth.h"
#include "http.h"
#include "mongocast.h"
#include "server.h"
#include "subscription.h"
#include "ws.h"

/* ---- Shared messages (fanout.c) ---------------------------------------------------------- */

#define MCD_MSG_STATIC 0x1 /* lives as long as the server: never freed by unref */
#define MCD_MSG_RAW 0x2    /* `body` is written as is for every transport */

/* One message as it goes on the wire, built once and shared by every connection that sends
 * it (a connection's queue holds references, never copies). For an event, the WebSocket
 * frame is ws_hdr + body and the SSE event is sse_head + body + "\n\n"; both are unmasked
 * server encodings, so one message serves every subscriber of a transport. */
typedef struct mcd_msg {
    uint32_t refs;
    uint8_t flags;
    uint8_t ws_hdr_len;
    uint8_t ws_hdr[10];
    uint32_t body_len;
    uint32_t sse_head_len;
    const char *body; /* the event's §4.3 JSON (borrowed from ev) or raw bytes */
    char *sse_head;   /* "id: ..\nevent: ..\ndata: ", built on first SSE use */
    char *owned;      /* bytes this message owns (raw bytes or a sanitised JSON copy) */
    mc_event_t *ev;   /* one reference, or NULL for raw messages */
} mcd_msg_t;

typedef enum mcd_transport {
    MCD_T_HTTP = 0,
    MCD_T_WS = 1,
    MCD_T_SSE = 2,
} mcd_transport_t;

mcd_msg_t *mcd_msg_new_event(mc_event_t *ev);
mcd_msg_t *mcd_msg_new_raw(const void *bytes, size_t len);
void mcd_msg_unref(mcd_msg_t *msg);
static inline mcd_msg_t *mcd_msg_ref(mcd_msg_t *msg)
{
    msg->refs++;
    return msg;
}
/* Bytes `msg` takes on `t`; builds the SSE head on first SSE use (0 when that allocation
 * fails). Call it before mcd_msg_bufs(). */
size_t mcd_msg_size_any(mcd_msg_t *msg, mcd_transport_t t);
/* The same, inline for the per-delivery case (an event on a WebSocket). */
static inline size_t mcd_msg_size(mcd_msg_t *msg, mcd_transport_t t)
{
    if (t == MCD_T_WS && !(msg->flags & MCD_MSG_RAW)) {
        return (size_t)msg->ws_hdr_len + msg->body_len;
    }
    return mcd_msg_size_any(msg, t);
}
/* Fills up to 3 buffers for sending `msg` on `t`; returns how many. */
unsigned mcd_msg_bufs(mcd_msg_t *msg, mcd_transport_t t, uv_buf_t out[3]);

/* ---- Connections (server.c) --------------------------------------------------------------- */

typedef enum mcd_conn_state {
    MCD_ST_HTTP = 0, /* reading requests */
    MCD_ST_WS,       /* WebSocket subscriber */
    MCD_ST_SSE,      /* SSE subscriber */
    MCD_ST_CLOSING,  /* final bytes queued; then shutdown, discard input, close */
} mcd_conn_state_t;

#define MCD_CF_DIRTY 0x01     /* in the server's dirty list (write at the end of this pass) */
#define MCD_CF_CLOSED 0x02    /* uv_close() called; only close_cb remains */
#define MCD_CF_LINGER 0x04    /* close once the queue is written */
#define MCD_CF_PING_OUT 0x08  /* ping sent, pong awaited until deadline_ms */
#define MCD_CF_SHUTDOWN 0x10  /* uv_shutdown() issued */
#define MCD_CF_Q_USED 0x20    /* something was queued since the last housekeeping tick */
#define MCD_CF_MATCH_ALL 0x40 /* the subscription passes every change (fan-out skips matching) */

struct mcd_hub;

/* One TCP connection. Kept small: an idle WebSocket subscriber is this struct, its
 * subscription and nothing else (no read buffer, no HTTP parser, no queue storage beyond the
 * one inline slot).
 *
 * The send queue is a ring of q_cap (a power of two) slots at q. While at most one message
 * is queued it is the inline slot q_one (cap 1, no allocation: the common case of one event
 * per loop pass). A heap ring, once needed, stays while the connection is active, so that
 * steady traffic costs no malloc/free per delivery; the housekeeping tick returns it (and
 * the connection to q_one) after a whole tick in which nothing was queued. */
typedef struct mcd_conn {
    uv_tcp_t tcp;        /* first member: the handle's address is the conn's */
    mcd_http_req_t *req; /* while a request is being read, else NULL */
    struct mcd_hub *hub; /* subscribed stream, or NULL */
    mcd_subscription_t *sub;
    mcd_msg_t **q;        /* pending messages (ring): &q_one or a heap ring */
    mcd_msg_t *q_one;     /* the inline one-slot ring */
    int64_t deadline_ms;  /* request timeout, pong deadline or close deadline */
    int64_t next_beat_ms; /* next ping (WS) or heartbeat comment (SSE) */
    uint32_t q_head;
    uint32_t q_len;
    uint32_t q_cap;
    uint32_t queued_bytes;  /* pending + in flight (until the write callback) */
    uint32_t pending_bytes; /* in the ring, not yet handed to uv_write */
    uint32_t replay_bytes;  /* of queued_bytes, replayed history (exempt from the limit) */
    uint32_t expires_s;     /* token expiry (seconds since the epoch), 0: none */
    uint32_t table_index;   /* position in srv->conns */
    uint32_t sub_index;     /* position in hub->subs */
    uint8_t state;          /* mcd_conn_state_t */
    uint8_t transport;      /* mcd_transport_t */
    uint8_t flags;          /* MCD_CF_* */
    uint8_t n_writes;       /* uv_write requests in flight */
    mcd_ws_parser_t ws;
} mcd_conn_t;

/* Queues `msg` (a new reference) for `conn`. When the queue would pass
 * server.max_send_queue_bytes the connection is closed as a slow consumer (WS 4002) and -1
 * is returned. `replay` marks history replay bytes, which do not count against the limit
 * until they are written. Closing connections drop the message and return 0. */
int mcd_conn_send(mcd_conn_t *conn, mcd_msg_t *msg, bool replay);

/* ---- Stream hubs (fanout.c) ---------------------------------------------------------------- */

typedef struct mcd_hub {
    const mc_stream_config_t *cfg;
    mcd_server_t *srv;
    mcd_msg_t **ring;  /* history: change and invalidate messages, oldest first */
    uint32_t ring_cap; /* = stream history */
    uint32_t ring_head;
    uint32_t ring_len;
    mcd_conn_t **subs;
    uint32_t n_subs;
    uint32_t subs_cap;
    bool open;            /* the engine's last word on this stream was "ready" */
    mcd_msg_t *ready_msg; /* {"type":"ready"} for subscribers joining an open stream */
    mcd_msg_t *reset_msg; /* {"type":"reset","reason":"history"} for lost resumes */
    uint64_t events;      /* events published to the fan-out */
    uint64_t replays;     /* resumes served from history */
    uint64_t resets;      /* resumes answered with reset */
    int64_t last_wall_ms; /* wallTime of the newest change, INT64_MIN when none */
} mcd_hub_t;

int mcd_hub_init(mcd_hub_t *hub, mcd_server_t *srv, const mc_stream_config_t *cfg);
void mcd_hub_cleanup(mcd_hub_t *hub);
/* Subscribes `conn` (whose sub and transport are set): reset when `since` is not in the
 * history, ready when the stream is open, replay of what follows `since`, then live. */
int mcd_hub_subscribe(mcd_hub_t *hub, mcd_conn_t *conn, const char *since);
void mcd_hub_unsubscribe(mcd_conn_t *conn);

/* The fan-out sink type (attached with mc_engine_add_sink; userdata = the server). */
extern const mc_sink_type_t mcd_fanout_sink_type;

/* ---- The server ------------------------------------------------------------------------------ */

typedef struct mcd_timing {
    uint32_t ping_ms;    /* WebSocket ping interval (25000) */
    uint32_t pong_ms;    /* pong deadline after a ping (10000) */
    uint32_t sse_ms;     /* SSE heartbeat comment interval (15000) */
    uint32_t request_ms; /* a request must be complete this long after its first byte */
    uint32_t idle_ms;    /* keep-alive connection without a request */
    uint32_t linger_ms;  /* closing connection: time to write and read the peer's close */
    uint32_t tick_ms;    /* housekeeping sweep period */
} mcd_timing_t;

typedef struct mcd_stats {
    uint64_t deliveries[3]; /* per transport: messages queued to subscribers */
    uint64_t fanout_events; /* events the fan-out sink received */
    uint64_t slow_disconnects;
    uint64_t accepted;
    uint64_t refused[6];   /* 400, 401, 403, 404, 503, other */
    uint64_t queued_bytes; /* sum of conn->queued_bytes */
    uint32_t conns[3];     /* open connections by transport */
} mcd_stats_t;

struct mcd_server {
    const mc_config_t *config;
    mcd_auth_t *auth;
    mc_engine_t *engine;
    uv_loop_t loop;
    uv_tcp_t listener;
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
    uint32_t max_conns;       /* table size: subscribers + room for plain HTTP */
    uint32_t max_queue;       /* server.max_send_queue_bytes */
    uint32_t n_subscribers;
    mcd_conn_t **conns;
    uint32_t n_conns;
    mcd_conn_t **dirty; /* connections with bytes to write at the end of this pass */
    uint32_t n_dirty;
    uint32_t dirty_cap;
    mcd_hub_t *hubs;
    size_t n_hubs;
    mcd_stats_t stats;
    char *rbuf; /* the one read buffer all connections share */
    size_t rbuf_len;
    bool rbuf_busy;
};

mcd_hub_t *mcd_server_hub(mcd_server_t *srv, const char *stream);

/* A connection's server: its handle's loop is embedded in the server (saves a pointer in
 * every connection). */
static inline mcd_server_t *mcd_conn_server(const mcd_conn_t *c)
{
    return (mcd_server_t *)((char *)c->tcp.loop - offsetof(mcd_server_t, loop));
}

/* ---- SSE (sse.c) ---------------------------------------------------------------------------- */

/* The response head of an SSE stream (status line, headers, blank line, "retry: 2000"). */
extern const char mcd_sse_preamble[];
/* The heartbeat comment. */
#define MCD_SSE_HEARTBEAT ": heartbeat\n\n"
/* Writes "id: <id>\nevent: <type>\ndata: " for `ev` into a new buffer (*len: its length). */
char *mcd_sse_head(const mc_event_t *ev, uint32_t *len);

/* ---- Metrics (metrics.c) ------------------------------------------------------------------ */

/* Renders the Prometheus text exposition into a new buffer (*len: its length). */
char *mcd_metrics_render(mcd_server_t *srv, size_t *len);

/* The /readyz body (malloc'ed; NULL when memory runs out): {"ready": bool, "streams": {name:
 * state}, "sinks": {name: {state, durable, reason}}} with only the sinks that are not running
 * listed. *ready: every stream open and no durable sink failed (and `engine_running`). Loop
 * thread. */
char *mcd_readyz_render(mcd_server_t *srv, bool engine_running, size_t *len, bool *ready);

#endif
