/*
 * conn.h: one client connection of the live server, the table that holds them all, and the
 * connection's send queue (the small interface the fan-out and the HTTP/WebSocket/SSE sessions
 * write through).
 *
 * Thread: the server's loop thread only; nothing is locked.
 * Invariants: see conn.c.
 */
#ifndef MONGOCAST_DAEMON_CONN_H
#define MONGOCAST_DAEMON_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http.h"
#include "msg.h"
#include "sendpool.h"
#include "sendring.h"
#include "subscription.h"
#include "tls.h"
#include "ws.h"

typedef enum mcd_conn_state {
    MCD_ST_HTTP = 0, /* reading requests */
    MCD_ST_WS,       /* WebSocket subscriber */
    MCD_ST_SSE,      /* SSE subscriber */
    MCD_ST_CLOSING,  /* final bytes queued; then shutdown, discard input, close */
} mcd_conn_state_t;

#define MCD_CF_DIRTY 0x01     /* in the table's dirty list (write at the end of this pass) */
#define MCD_CF_CLOSED 0x02    /* uv_close() called; only close_cb remains */
#define MCD_CF_LINGER 0x04    /* close once the queue is written */
#define MCD_CF_PING_OUT 0x08  /* ping sent, pong awaited until deadline_ms */
#define MCD_CF_SHUTDOWN 0x10  /* uv_shutdown() issued */
#define MCD_CF_Q_USED 0x20    /* something was queued since the last housekeeping tick */
#define MCD_CF_MATCH_ALL 0x40 /* the subscription passes every change (fan-out skips matching) */
#define MCD_CF_PLAIN 0x80 /* never a subscriber: in the table's (and its address's) plain list */

typedef struct mcd_conn mcd_conn_t;

/* Links of a connection in a list of connections. */
typedef struct mcd_conn_link {
    mcd_conn_t *prev;
    mcd_conn_t *next;
} mcd_conn_link_t;

/* A list of connections, oldest first. */
typedef struct mcd_conn_list {
    mcd_conn_t *head;
    mcd_conn_t *tail;
    uint32_t n;
} mcd_conn_list_t;

/* The connections of one client address (when server.max_connections_per_address is set). */
typedef struct mcd_addr {
    struct mcd_addr *next; /* hash chain */
    uint32_t n;            /* connections, subscribers included */
    uint8_t len;           /* 4 (IPv4, also for IPv4-mapped IPv6) or 16 */
    uint8_t key[16];
    mcd_conn_list_t plain; /* its connections that are not subscribers, oldest first */
} mcd_addr_t;

/* A set of connections: a stream's live subscribers. A connection is in at most one set, and
 * closing it takes it out (conn.c), so the set's owner never meets a closed connection. */
typedef struct mcd_conn_set {
    mcd_conn_t **v;
    uint32_t n;
    uint32_t cap;
    const char *name; /* for logs: the stream's name */
    /* Called when a connection leaves the set because it closes (not for
     * mcd_conn_set_remove() by the set's owner); NULL: nothing to do. */
    void (*on_close)(mcd_conn_t *c);
} mcd_conn_set_t;

/* One TCP connection. Kept small: an idle WebSocket subscriber is this struct, its
 * subscription and nothing else (no read buffer, no HTTP parser, no queue storage beyond the
 * one inline slot).
 *
 * The send queue is a ring of q_cap (a power of two) slots at q. While at most one message
 * is queued it is the inline slot q_one (cap 1, no allocation: the common case of one event
 * per loop pass). A heap ring, once needed, stays while the connection is active, so that
 * steady traffic costs no malloc/free per delivery; the housekeeping tick returns it (and
 * the connection to q_one) after a whole tick in which nothing was queued.
 *
 * tcp.data points to the connection table. */
struct mcd_conn {
    uv_tcp_t tcp;        /* first member: the handle's address is the conn's */
    mcd_http_req_t *req; /* while a request is being read, else NULL */
    mcd_conn_set_t *set; /* the stream's subscribers this connection is one of, or NULL */
    mcd_subscription_t *sub;
    void *snap;        /* the snapshot (snapshot.c) or catch-up (catchup.c) being read for
                          this subscriber, or NULL */
    uint64_t snap_skip; /* after a snapshot: skip changes at or before this cluster time */
    char *resume_skip;  /* after a catch-up (catchup.c): skip events whose id is at or before
                           this one (owned; freed with the connection) */
    mcd_conn_link_t plain;      /* in the table's plain list (MCD_CF_PLAIN) */
    mcd_conn_link_t addr_plain; /* in addr->plain (MCD_CF_PLAIN and addr) */
    mcd_addr_t *addr;           /* its address's entry, or NULL (no per-address limit) */
    mcd_tls_conn_t *tls;        /* its TLS session (server.tls), NULL: plain TCP */
    mcd_msg_t **q;              /* pending messages (ring): &q_one or a heap ring */
    mcd_msg_t *q_one;           /* the inline one-slot ring */
    int64_t deadline_ms;        /* request timeout, pong deadline or close deadline */
    int64_t next_beat_ms;       /* next ping (WS) or heartbeat comment (SSE) */
    uint32_t q_head;
    uint32_t q_len;
    uint32_t q_cap;
    uint32_t queued_bytes;  /* pending + in flight (until the write callback) */
    uint32_t pending_bytes; /* in the ring, not yet handed to uv_write */
    uint32_t replay_bytes;  /* of queued_bytes, replayed history (exempt from the limit) */
    uint32_t large_left;    /* of queued_bytes, the one large message (exempt from the limit) */
    uint32_t large_ahead;   /* of queued_bytes, what was queued ahead of that message */
    uint32_t expires_s;     /* token expiry (seconds since the epoch), 0: none */
    uint32_t table_index;   /* position in the table */
    uint32_t set_index;     /* position in set->v */
    uint8_t state;          /* mcd_conn_state_t */
    uint8_t transport;      /* mcd_transport_t */
    uint8_t flags;          /* MCD_CF_* */
    uint8_t n_writes;       /* uv_write requests in flight */
    uint8_t pipelined;      /* HTTP answers queued since the peer last read everything */
    mcd_ws_parser_t ws;
};

typedef struct mcd_stats {
    uint64_t deliveries[3]; /* per transport: messages queued to subscribers */
    uint64_t slow_disconnects;
    uint64_t accepted;
    uint64_t refused[6];   /* 400, 401, 403, 404, 503, other */
    uint64_t queued_bytes; /* sum of conn->queued_bytes */
    uint64_t evicted;      /* connections closed to make room for new ones */
    uint64_t pipelining;   /* connections closed for pipelining without reading */
    uint64_t writev_sends; /* writes made directly (uv_try_write: one writev each) */
    uint64_t ring_sends;   /* sends submitted through io_uring */
    uint64_t ring_submits; /* io_uring_enter calls that submitted them */
    uint64_t tls_handshakes_ok;
    uint64_t tls_handshakes_failed; /* bad or wrong-CA handshakes, plain HTTP, timeouts */
    uint32_t conns[3];     /* open connections by transport */
} mcd_stats_t;

/* Every connection of one server, the limits that apply to them, and the list of connections
 * with bytes to write at the end of the current loop pass. */
typedef struct mcd_conn_table {
    mcd_conn_t **conns;
    uint32_t n_conns;
    uint32_t max_conns;    /* table size */
    uint32_t max_per_addr; /* server.max_connections_per_address; 0: no address tracking */
    mcd_conn_list_t plain; /* connections that are not subscribers, least recently used first */
    mcd_addr_t **addrs;    /* address hash (max_per_addr only): addr_mask + 1 chains */
    uint32_t addr_mask;
    uint32_t addr_seed;
    uint64_t queued_peak; /* stats.queued_bytes' high-water mark since the last trim */
    mcd_conn_t **dirty;
    uint32_t n_dirty;
    uint32_t dirty_cap;
    uint32_t max_queue;           /* server.max_send_queue_bytes */
    uint32_t linger_ms;           /* closing connection: time to write and read the peer's close */
    mcd_sendring_t *ring;         /* io_uring sends (server.io), NULL: writev */
    mcd_sendpool_t *pool;         /* sends spread over threads (server.threads > 1), or NULL */
    struct mcd_ring_batch *batch; /* the sends of one submission (with ring) */
    mcd_stats_t stats;
} mcd_conn_table_t;

/* From now on the first batch of each dirty connection goes out through `pool` (taken over,
 * destroyed with the table): the sends of one pass are made by several threads (sendpool.h).
 * Exclusive with a ring. Returns 0 or MC_ENOMEM (the pool is then destroyed). */
int mcd_conn_table_use_pool(mcd_conn_table_t *t, mcd_sendpool_t *pool);

/* Allocates room for `max_conns` connections (and, with `max_per_addr`, the address hash).
 * Returns 0 or MC_ENOMEM. */
int mcd_conn_table_init(mcd_conn_table_t *t, uint32_t max_conns, uint32_t max_per_addr,
                        uint32_t max_queue, uint32_t linger_ms);
/* Frees the table's arrays and its ring (the connections must be gone). */
void mcd_conn_table_cleanup(mcd_conn_table_t *t);
/* From now on the table's connections are written through `ring` (taken over; destroyed
 * with the table, or at once if the ring fails later: then writes go back to writev).
 * Returns 0 or MC_ENOMEM (the ring is then destroyed and writev stays). */
int mcd_conn_table_use_ring(mcd_conn_table_t *t, mcd_sendring_t *ring);

static inline mcd_conn_table_t *mcd_conn_table(const mcd_conn_t *c)
{
    return (mcd_conn_table_t *)c->tcp.data;
}

/* A new connection on `loop`, not yet accepted nor in the table; NULL when out of memory.
 * Free it with uv_close(&c->tcp, mcd_conn_free_cb) until mcd_conn_add() took it. */
mcd_conn_t *mcd_conn_new(mcd_conn_table_t *t, uv_loop_t *loop);
void mcd_conn_free_cb(uv_handle_t *h);
/* Puts an accepted connection into the table as an HTTP connection, at the tail of the plain
 * lists (the caller made room: mcd_conn_admit()). `peer` may be NULL. Returns 0 or MC_ENOMEM
 * (then the connection is not in the table). */
int mcd_conn_add(mcd_conn_t *c, const struct sockaddr_storage *peer);

/* Makes room for a new connection from `peer` (NULL: unknown): over the per-address limit the
 * address's least recently used plain connection is closed, in a full table the table's.
 * Returns 0 (room made, or there was room), or -1 when nothing can be closed (every
 * connection in the way is a subscriber): then refuse the new one. */
int mcd_conn_admit(mcd_conn_table_t *t, const struct sockaddr_storage *peer);

/* A plain connection answered a request: it becomes the most recently used. */
void mcd_conn_touch(mcd_conn_t *c);

/* The connection became a subscriber: out of the plain lists (never evicted). */
void mcd_conn_subscribed(mcd_conn_t *c);

/* Bytes queued for `c` that the kernel has not taken yet. */
uint64_t mcd_conn_unsent(mcd_conn_t *c);

/* Housekeeping: gives freed memory back to the system once a burst of queued bytes (abusive
 * or not) has drained. Returns true when it did. */
bool mcd_conn_table_trim(mcd_conn_table_t *t);

/* Queues `msg` (a new reference) for `conn`. When the queue would pass
 * server.max_send_queue_bytes the connection is closed as a slow consumer (WS 4002) and -1
 * is returned. Exempt from the limit: history replay bytes (`replay`) until they are written,
 * and one message larger than half the limit at a time, taken when it does not fit (the limit
 * then bounds what queues behind it). So a connection holds at most the limit plus one
 * message (at most server.max_message_bytes). Closing connections drop the message and
 * return 0. */
int mcd_conn_send(mcd_conn_t *conn, mcd_msg_t *msg, bool replay);

/* Queues an error event of `stream` for `c` (mc_event_new_error(): `code`, MongoDB's
 * `server_code` or 0, `reason`), as the last message before the caller closes the
 * subscription. Out of memory, nothing is queued (the close still tells the client). */
void mcd_conn_send_error(mcd_conn_t *c, const char *stream, const char *code, int server_code,
                         const char *reason);

/* Queues raw bytes (HTTP answers, close and pong frames, copied unless the socket takes them
 * at once; always queued on a TLS connection, whose bytes are encrypted in order when it
 * writes): never refused for size. Returns 0, or -1 when the connection was closed. */
int mcd_conn_send_raw(mcd_conn_t *c, const void *bytes, size_t len);

/* Queues a static message (never freed) after what is queued. Returns 0 or -1 (closed). */
int mcd_conn_send_static(mcd_conn_t *c, mcd_msg_t *msg);

/* Hands what is queued to the socket now instead of at the end of this loop pass. */
void mcd_conn_start_write(mcd_conn_t *c);

/* The connection closes once its queue is written, or after linger_ms. */
void mcd_conn_linger(mcd_conn_t *c);

/* Closes now: out of the table and its set at once, freed in the close callback. */
void mcd_conn_abort(mcd_conn_t *c);

/* Leaves the subscriber set and closes as the transport allows: a WebSocket gets a close frame
 * with `code` and `reason` after what is queued (instead of it with `drop`), an SSE stream
 * ends after what is queued, a plain HTTP connection is aborted. */
void mcd_conn_close(mcd_conn_t *c, uint16_t code, const char *reason, bool drop);

/* Housekeeping: returns an idle connection's heap ring (see mcd_conn_t). */
void mcd_conn_trim(mcd_conn_t *c);

/* TLS connections (server.tls): what the session wrote to its output (handshake messages,
 * records, alerts) goes to the socket after what is already on its way; `bytes` of the send
 * queue's accounting are released once it is written. Returns 0, or -1 (closed). */
int mcd_conn_tls_flush(mcd_conn_t *c, uint64_t bytes);

/* Writes every dirty connection (the loop's check phase): with a ring, the first batch of
 * each connection that has nothing in flight goes out in one io_uring submission for all of
 * them; the rest, and everything without a ring, by mcd_conn_start_write(). */
void mcd_conn_flush_dirty(mcd_conn_table_t *t);

/* Adds `c` to `set`. Returns 0 or MC_ENOMEM. */
int mcd_conn_set_add(mcd_conn_set_t *set, mcd_conn_t *c);
/* Takes `c` out of its set (no-op when it is in none). */
void mcd_conn_set_remove(mcd_conn_t *c);
void mcd_conn_set_cleanup(mcd_conn_set_t *set);

#endif
