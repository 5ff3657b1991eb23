/*
 * conn.c: connections of the live server: the connection table (with the least recently used
 * list of plain connections and the per-address entries that making room uses), each
 * connection's send queue and its limit, batched writes, closing (linger, shutdown, abort, the
 * SSE error event), the subscriber sets, and giving memory back after a burst. See conn.h.
 *
 * Thread: the server's loop thread only. With a send pool (server.threads > 1) the system
 * calls of ring_flush()'s sends are made by the pool's threads while the loop thread waits in
 * mcd_sendpool_run(); they touch only the descriptors, the iovecs and the results, never a
 * connection (sendpool.h).
 * Invariants:
 *   - a connection holds no read buffer (reads land in the server's shared buffer and are
 *     consumed in the read callback), no HTTP parser once its request is answered, and no
 *     queue storage beyond its inline slot once it has had nothing queued for a whole
 *     housekeeping tick (an active connection keeps its ring: no malloc/free per delivery);
 *   - queued messages normally reach a socket from mcd_conn_flush_dirty() (the check phase,
 *     once per loop pass: every message queued during one pass leaves in one write per
 *     connection, by uv_try_write and, for what the kernel does not take, one uv_write) and
 *     from on_write (continuing after a write completes); exceptions that keep memory flat: a
 *     burst over a quarter of the send-queue limit within one pass, a new subscriber's first
 *     messages, and raw answers (HTTP, pong, close) to a connection with nothing queued go out
 *     at once;
 *   - a connection is freed only in on_close; after mcd_conn_abort() it is out of the table,
 *     out of its subscriber set, and ignored by every callback that still fires for it;
 *   - a connection is in the plain lists (MCD_CF_PLAIN) from its accept until it subscribes or
 *     closes, so making room never closes a subscriber; an address entry lives exactly as long
 *     as its connections (subscribers included).
 */
#include "conn.h"

#include "sse.h"

#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#define WRITE_BATCH 256 /* messages per uv_write */
#define MAX_WRITES 4    /* uv_write requests in flight per connection */
#define TRIM_AFTER_BYTES (4u << 20)

static int64_t loop_now(const mcd_conn_t *c)
{
    return (int64_t)uv_now(c->tcp.loop);
}

/* ---- The table ------------------------------------------------------------------------------ */

int mcd_conn_table_init(mcd_conn_table_t *t, uint32_t max_conns, uint32_t max_per_addr,
                        uint32_t max_queue, uint32_t linger_ms)
{
    memset(t, 0, sizeof(*t));
    t->conns = calloc(max_conns, sizeof(*t->conns));
    if (!t->conns) {
        return MC_ENOMEM;
    }
    t->max_conns = max_conns;
    t->max_queue = max_queue;
    t->linger_ms = linger_ms;
    t->max_per_addr = max_per_addr;
    if (max_per_addr) {
        uint32_t n = 64;
        while (n < max_conns && n < (1u << 20)) {
            n <<= 1;
        }
        t->addrs = calloc(n, sizeof(*t->addrs));
        if (!t->addrs) {
            return MC_ENOMEM;
        }
        t->addr_mask = n - 1;
        /* Chains an attacker cannot line up from the addresses it controls. */
        t->addr_seed = (uint32_t)uv_hrtime() ^ (uint32_t)(uintptr_t)t;
    }
    return 0;
}

static void drop_ring(mcd_conn_table_t *t);

void mcd_conn_table_cleanup(mcd_conn_table_t *t)
{
    drop_ring(t);
    free(t->conns);
    free(t->dirty);
    free(t->addrs); /* entries go with their last connection */
    t->conns = NULL;
    t->dirty = NULL;
    t->addrs = NULL;
}

mcd_conn_t *mcd_conn_new(mcd_conn_table_t *t, uv_loop_t *loop)
{
    mcd_conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        return NULL;
    }
    c->q = &c->q_one;
    c->q_cap = 1;
    uv_tcp_init(loop, &c->tcp);
    c->tcp.data = t;
    return c;
}

void mcd_conn_free_cb(uv_handle_t *h)
{
    free(h);
}

/* ---- Plain lists and addresses ---------------------------------------------------------- */

static mcd_conn_link_t *link_at(mcd_conn_t *c, size_t off)
{
    return (mcd_conn_link_t *)((char *)c + off);
}

static void list_append(mcd_conn_list_t *l, mcd_conn_t *c, size_t off)
{
    mcd_conn_link_t *k = link_at(c, off);
    k->prev = l->tail;
    k->next = NULL;
    if (l->tail) {
        link_at(l->tail, off)->next = c;
    } else {
        l->head = c;
    }
    l->tail = c;
    l->n++;
}

static void list_remove(mcd_conn_list_t *l, mcd_conn_t *c, size_t off)
{
    mcd_conn_link_t *k = link_at(c, off);
    if (k->prev) {
        link_at(k->prev, off)->next = k->next;
    } else {
        l->head = k->next;
    }
    if (k->next) {
        link_at(k->next, off)->prev = k->prev;
    } else {
        l->tail = k->prev;
    }
    k->prev = k->next = NULL;
    l->n--;
}

#define PLAIN offsetof(mcd_conn_t, plain)
#define ADDR_PLAIN offsetof(mcd_conn_t, addr_plain)

/* The address bytes of `peer` (an IPv4-mapped IPv6 address counts as its IPv4 address);
 * returns their length, 0 for an unknown family. */
static uint8_t addr_key(const struct sockaddr_storage *peer, uint8_t key[16])
{
    if (peer->ss_family == AF_INET) {
        memcpy(key, &((const struct sockaddr_in *)peer)->sin_addr, 4);
        return 4;
    }
    if (peer->ss_family == AF_INET6) {
        const uint8_t *a = ((const struct sockaddr_in6 *)peer)->sin6_addr.s6_addr;
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(a, mapped, 12) == 0) {
            memcpy(key, a + 12, 4);
            return 4;
        }
        memcpy(key, a, 16);
        return 16;
    }
    return 0;
}

static mcd_addr_t **addr_slot(mcd_conn_table_t *t, const uint8_t *key, uint8_t len)
{
    uint32_t h = 2166136261u ^ t->addr_seed; /* FNV-1a */
    for (uint8_t i = 0; i < len; i++) {
        h = (h ^ key[i]) * 16777619u;
    }
    mcd_addr_t **p = &t->addrs[h & t->addr_mask];
    while (*p && ((*p)->len != len || memcmp((*p)->key, key, len) != 0)) {
        p = &(*p)->next;
    }
    return p;
}

static mcd_addr_t *addr_find(mcd_conn_table_t *t, const struct sockaddr_storage *peer)
{
    uint8_t key[16];
    uint8_t len = peer && t->addrs ? addr_key(peer, key) : 0;
    return len ? *addr_slot(t, key, len) : NULL;
}

static void addr_release(mcd_conn_table_t *t, mcd_addr_t *a)
{
    if (--a->n > 0) {
        return;
    }
    mcd_addr_t **p = addr_slot(t, a->key, a->len);
    *p = a->next;
    free(a);
}

static void plain_remove(mcd_conn_t *c)
{
    if (!(c->flags & MCD_CF_PLAIN)) {
        return;
    }
    list_remove(&mcd_conn_table(c)->plain, c, PLAIN);
    if (c->addr) {
        list_remove(&c->addr->plain, c, ADDR_PLAIN);
    }
    c->flags &= (uint8_t)~MCD_CF_PLAIN;
}

int mcd_conn_add(mcd_conn_t *c, const struct sockaddr_storage *peer)
{
    mcd_conn_table_t *t = mcd_conn_table(c);
    uint8_t key[16];
    uint8_t len = peer && t->addrs ? addr_key(peer, key) : 0;
    if (len) {
        mcd_addr_t **p = addr_slot(t, key, len);
        if (!*p) {
            *p = calloc(1, sizeof(**p));
            if (!*p) {
                return MC_ENOMEM;
            }
            (*p)->len = len;
            memcpy((*p)->key, key, len);
        }
        c->addr = *p;
        c->addr->n++;
        list_append(&c->addr->plain, c, ADDR_PLAIN);
    }
    list_append(&t->plain, c, PLAIN);
    c->flags |= MCD_CF_PLAIN;
    c->state = MCD_ST_HTTP;
    c->transport = MCD_T_HTTP;
    c->table_index = t->n_conns;
    t->conns[t->n_conns++] = c;
    t->stats.conns[MCD_T_HTTP]++;
    t->stats.accepted++;
    return 0;
}

static void evict(mcd_conn_t *victim, const char *why)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    mcd_conn_table(victim)->stats.evicted++;
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "closed the least recently used connection that is not a subscriber "
                       "to make room (%s)",
                       why);
    mcd_conn_abort(victim);
}

int mcd_conn_admit(mcd_conn_table_t *t, const struct sockaddr_storage *peer)
{
    mcd_addr_t *a = t->max_per_addr ? addr_find(t, peer) : NULL;
    if (a && a->n >= t->max_per_addr) {
        if (!a->plain.head) {
            return -1;
        }
        evict(a->plain.head, "server.max_connections_per_address");
    }
    if (t->n_conns >= t->max_conns) {
        if (!t->plain.head) {
            return -1;
        }
        evict(t->plain.head, "connection table full");
    }
    return 0;
}

void mcd_conn_touch(mcd_conn_t *c)
{
    if (!(c->flags & MCD_CF_PLAIN)) {
        return;
    }
    mcd_conn_table_t *t = mcd_conn_table(c);
    list_remove(&t->plain, c, PLAIN);
    list_append(&t->plain, c, PLAIN);
    if (c->addr) {
        list_remove(&c->addr->plain, c, ADDR_PLAIN);
        list_append(&c->addr->plain, c, ADDR_PLAIN);
    }
}

void mcd_conn_subscribed(mcd_conn_t *c)
{
    plain_remove(c);
}

bool mcd_conn_table_trim(mcd_conn_table_t *t)
{
    /* malloc keeps freed chunks for reuse; after megabytes of queued answers or events have
     * drained (a client that stopped reading, a burst), hand them back. */
    bool trim = t->queued_peak >= TRIM_AFTER_BYTES && t->stats.queued_bytes < t->queued_peak / 4;
    if (trim) {
        malloc_trim(0);
        t->queued_peak = t->stats.queued_bytes;
    }
    return trim;
}

/* ---- Subscriber sets --------------------------------------------------------------------------
 */

int mcd_conn_set_add(mcd_conn_set_t *set, mcd_conn_t *c)
{
    if (set->n == set->cap) {
        uint32_t cap = set->cap ? set->cap * 2 : 16;
        mcd_conn_t **nv = realloc(set->v, cap * sizeof(*nv));
        if (!nv) {
            return MC_ENOMEM;
        }
        set->v = nv;
        set->cap = cap;
    }
    c->set = set;
    c->set_index = set->n;
    set->v[set->n++] = c;
    return 0;
}

void mcd_conn_set_remove(mcd_conn_t *c)
{
    mcd_conn_set_t *set = c->set;
    if (!set) {
        return;
    }
    uint32_t i = c->set_index;
    set->n--;
    if (i != set->n) {
        set->v[i] = set->v[set->n];
        set->v[i]->set_index = i;
    }
    c->set = NULL;
}

/* A closing connection leaves its set, whose owner may have to know (snapshot.c). */
static void leave_set_closing(mcd_conn_t *c)
{
    mcd_conn_set_t *set = c->set;
    mcd_conn_set_remove(c);
    if (set && set->on_close) {
        set->on_close(c);
    }
}

void mcd_conn_set_cleanup(mcd_conn_set_t *set)
{
    free(set->v);
    memset(set, 0, sizeof(*set));
}

/* ---- Send queue and writes ------------------------------------------------------------------- */

static void mark_dirty(mcd_conn_t *c)
{
    if (c->flags & (MCD_CF_DIRTY | MCD_CF_CLOSED)) {
        return;
    }
    mcd_conn_table_t *t = mcd_conn_table(c);
    if (t->n_dirty == t->dirty_cap) {
        uint32_t cap = t->dirty_cap ? t->dirty_cap * 2 : 256;
        mcd_conn_t **nd = realloc(t->dirty, cap * sizeof(*nd));
        if (!nd) {
            /* Written when its current write completes, or by the next mark. */
            return;
        }
        t->dirty = nd;
        t->dirty_cap = cap;
    }
    c->flags |= MCD_CF_DIRTY;
    t->dirty[t->n_dirty++] = c;
}

static int q_push(mcd_conn_t *c, mcd_msg_t *msg, size_t size, bool replay)
{
    if (c->q_len == c->q_cap) {
        /* Full: the inline slot, or a heap ring, overflows into a heap ring twice as big (at
         * least 8). Caps stay powers of two, so positions wrap with a mask. */
        uint32_t cap = c->q_cap > 1 ? c->q_cap * 2 : 8;
        mcd_msg_t **nq = malloc(cap * sizeof(*nq));
        if (!nq) {
            return MC_ENOMEM;
        }
        for (uint32_t i = 0; i < c->q_len; i++) {
            nq[i] = c->q[(c->q_head + i) & (c->q_cap - 1)];
        }
        if (c->q != &c->q_one) {
            free(c->q);
        }
        c->q = nq;
        c->q_cap = cap;
        c->q_head = 0;
    }
    c->q[(c->q_head + c->q_len) & (c->q_cap - 1)] = mcd_msg_ref(msg);
    c->q_len++;
    c->flags |= MCD_CF_Q_USED;
    c->queued_bytes += (uint32_t)size;
    c->pending_bytes += (uint32_t)size;
    if (replay) {
        c->replay_bytes += (uint32_t)size;
    }
    mcd_conn_table_t *t = mcd_conn_table(c);
    t->stats.queued_bytes += size;
    if (t->stats.queued_bytes > t->queued_peak) {
        t->queued_peak = t->stats.queued_bytes;
    }
    mark_dirty(c);
    return 0;
}

/* The heap ring stays when the queue empties (no malloc/free per delivery while traffic
 * flows); see q_trim() for when it goes. */
static mcd_msg_t *q_pop(mcd_conn_t *c)
{
    mcd_msg_t *m = c->q[c->q_head];
    c->q_len--;
    c->q_head = c->q_len ? (c->q_head + 1) & (c->q_cap - 1) : 0;
    return m;
}

/* Returns an empty connection's heap ring and goes back to the inline slot. */
static void q_release(mcd_conn_t *c)
{
    if (c->q != &c->q_one && c->q_len == 0) {
        free(c->q);
        c->q = &c->q_one;
        c->q_cap = 1;
        c->q_head = 0;
    }
}

/* A heap ring that stayed empty for a whole tick is released, so an idle subscriber holds no
 * queue storage beyond its inline slot. */
void mcd_conn_trim(mcd_conn_t *c)
{
    if (c->q != &c->q_one && c->q_len == 0 && !(c->flags & MCD_CF_Q_USED)) {
        q_release(c);
    }
    if (c->tls && !(c->flags & MCD_CF_Q_USED)) {
        mcd_tls_conn_trim(c->tls);
    }
    c->flags &= (uint8_t)~MCD_CF_Q_USED;
}

/* Releases queued-bytes accounting for `bytes` that left the queue (written or dropped).
 * Replayed bytes are always the oldest in the queue, so they leave first. */
static void release_bytes(mcd_conn_t *c, uint64_t bytes)
{
    c->queued_bytes -= (uint32_t)bytes;
    mcd_conn_table(c)->stats.queued_bytes -= bytes;
    c->replay_bytes = c->replay_bytes > bytes ? c->replay_bytes - (uint32_t)bytes : 0;
    /* What was queued ahead of the large message leaves first, then the message itself. */
    uint64_t ahead = c->large_ahead < bytes ? c->large_ahead : bytes;
    c->large_ahead -= (uint32_t)ahead;
    bytes -= ahead;
    c->large_left = c->large_left > bytes ? c->large_left - (uint32_t)bytes : 0;
}

/* Drops every message not yet handed to the kernel (the write in flight stays). */
static void drop_pending(mcd_conn_t *c)
{
    uint64_t bytes = 0;
    while (c->q_len) {
        mcd_msg_t *m = q_pop(c);
        bytes += mcd_msg_size(m, c->transport);
        mcd_msg_unref(m);
    }
    c->pending_bytes = 0;
    release_bytes(c, bytes);
}

void mcd_conn_send_error(mcd_conn_t *c, const char *stream, const char *code, int server_code,
                         const char *reason)
{
    mc_event_t *ev = mc_event_new_error(stream, 0, code, server_code, reason);
    mcd_msg_t *m = ev ? mcd_msg_new_event(ev, 0) : NULL;
    mc_event_unref(&ev);
    if (m) {
        mcd_conn_send(c, m, false);
        mcd_msg_unref(m);
    }
}

int mcd_conn_send_raw(mcd_conn_t *c, const void *bytes, size_t len)
{
    if (c->flags & MCD_CF_CLOSED) {
        return -1;
    }
    if (!c->q_len && !c->n_writes && !c->tls) {
        /* Nothing ahead of it: try the socket directly and copy only what it did not take
         * (handshake answers and pongs usually need no allocation). */
        uv_buf_t b = uv_buf_init((char *)bytes, (unsigned)len);
        int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (r == (int)len) {
            return 0;
        }
        if (r < 0 && r != UV_EAGAIN) {
            mcd_conn_abort(c);
            return -1;
        }
        if (r > 0) {
            bytes = (const char *)bytes + r;
            len -= (size_t)r;
        }
    }
    mcd_msg_t *m = mcd_msg_new_raw(bytes, len);
    if (!m) {
        mcd_conn_abort(c);
        return -1;
    }
    int rc = q_push(c, m, len, false);
    mcd_msg_unref(m);
    if (rc != 0) {
        mcd_conn_abort(c);
        return -1;
    }
    return 0;
}

int mcd_conn_send_static(mcd_conn_t *c, mcd_msg_t *msg)
{
    if (c->flags & MCD_CF_CLOSED) {
        return -1;
    }
    if (q_push(c, msg, msg->body_len, false) != 0) {
        mcd_conn_abort(c);
        return -1;
    }
    return 0;
}

void mcd_conn_linger(mcd_conn_t *c)
{
    c->state = MCD_ST_CLOSING;
    c->flags |= MCD_CF_LINGER;
    c->deadline_ms = loop_now(c) + mcd_conn_table(c)->linger_ms;
    mark_dirty(c);
}

void mcd_conn_close(mcd_conn_t *c, uint16_t code, const char *reason, bool drop)
{
    if (c->state == MCD_ST_CLOSING || (c->flags & MCD_CF_CLOSED)) {
        return;
    }
    const char *stream = c->set ? c->set->name : NULL;
    leave_set_closing(c);
    switch (c->transport) {
    case MCD_T_WS: {
        if (drop) {
            drop_pending(c);
        }
        uint8_t frame[MCD_WS_MAX_CONTROL + 2];
        size_t n = mcd_ws_close_frame(frame, code, reason);
        if (mcd_conn_send_raw(c, frame, n) != 0) {
            return;
        }
        mcd_conn_linger(c);
        break;
    }
    case MCD_T_SSE: {
        if (drop) {
            drop_pending(c);
        }
        /* The application's own close codes are told as an error event; the others (shutdown,
         * token expiry) just end the stream, which a client reconnects after. */
        const char *name = code == MCD_WS_CLOSE_FILTER ? "filter_budget"
                           : code == MCD_WS_CLOSE_SLOW ? "slow_consumer"
                                                       : NULL;
        if (name) {
            char ev[512];
            size_t n = mcd_sse_error_event(ev, sizeof(ev), stream ? stream : "", name,
                                           reason ? reason : "");
            if (n && mcd_conn_send_raw(c, ev, n) != 0) {
                return;
            }
        }
        mcd_conn_linger(c);
        break;
    }
    default: mcd_conn_abort(c); break;
    }
}

static void slow_consumer(mcd_conn_t *c)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    mcd_conn_table(c)->stats.slow_disconnects++;
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "slow consumer disconnected stream=%s transport=%s queued=%" PRIu32,
                       c->set ? c->set->name : "?", c->transport == MCD_T_WS ? "ws" : "sse",
                       c->queued_bytes);
    if (c->transport == MCD_T_WS) {
        mcd_conn_close(c, MCD_WS_CLOSE_SLOW, "slow consumer: send queue limit reached", true);
    } else {
        mcd_conn_abort(c);
    }
}

/* Bytes the kernel has not taken yet: our ring plus what libuv still holds of the writes in
 * flight. A write whose bytes all reached the socket buffer no longer counts, even before its
 * callback ran. */
uint64_t mcd_conn_unsent(mcd_conn_t *c)
{
    if (!c->n_writes) {
        return c->pending_bytes; /* the per-delivery case: skip the call into libuv */
    }
    return c->pending_bytes + uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

int mcd_conn_send(mcd_conn_t *c, mcd_msg_t *msg, bool replay)
{
    if ((c->flags & MCD_CF_CLOSED) || c->state == MCD_ST_CLOSING) {
        return 0;
    }
    size_t size = mcd_msg_size(msg, c->transport);
    if (size == 0) {
        mcd_conn_abort(c);
        return -1;
    }
    mcd_conn_table_t *t = mcd_conn_table(c);
    if ((uint64_t)c->queued_bytes + size > UINT32_MAX / 2) {
        /* Only a replay of a huge history of huge events gets here. */
        slow_consumer(c);
        return -1;
    }
    if (!replay) {
        /* A burst bigger than a quarter of the limit within one loop pass goes out now
         * rather than at the end of the pass, so that a fast reader is never mistaken for a
         * slow one because of how events were batched. */
        if (c->pending_bytes + size > t->max_queue / 4 && c->n_writes < MAX_WRITES) {
            mcd_conn_start_write(c);
            if (c->flags & MCD_CF_CLOSED) {
                return -1;
            }
        }
        uint64_t unsent = mcd_conn_unsent(c);
        uint64_t exempt = (uint64_t)c->replay_bytes + c->large_left;
        if (exempt > unsent) {
            exempt = unsent;
        }
        if (unsent - exempt + size > t->max_queue) {
            /* A large message (over half the limit: it may not fit behind anything) is taken
             * when no other one is on its way; the limit then bounds what queues behind it,
             * so a subscriber that keeps up receives it however big it is. */
            if (size <= t->max_queue / 2 || c->large_left) {
                slow_consumer(c);
                return -1;
            }
            c->large_ahead = c->queued_bytes;
            c->large_left = (uint32_t)size;
        }
    }
    if (q_push(c, msg, size, replay) != 0) {
        mcd_conn_abort(c);
        return -1;
    }
    if (!(msg->flags & MCD_MSG_RAW)) {
        t->stats.deliveries[c->transport]++;
    }
    return 0;
}

typedef struct mcd_wreq {
    uv_write_t req;
    mcd_conn_t *conn;
    uint64_t bytes;
    uint32_t n;
    mcd_msg_t *msgs[];
} mcd_wreq_t;

static void on_shutdown(uv_shutdown_t *req, int status)
{
    mcd_conn_t *c = req->data;
    free(req);
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    if (status < 0) {
        mcd_conn_abort(c);
    }
    /* Otherwise keep reading (and discarding) until the peer closes or the deadline: closing
     * with unread input would reset the connection and could destroy our last bytes. */
}

static void maybe_finish(mcd_conn_t *c)
{
    if (!(c->flags & MCD_CF_LINGER) || (c->flags & (MCD_CF_SHUTDOWN | MCD_CF_CLOSED)) ||
        c->n_writes || c->q_len) {
        return;
    }
    c->flags |= MCD_CF_SHUTDOWN;
    if (c->tls) {
        mcd_tls_conn_close_notify(c->tls);
        if (mcd_conn_tls_flush(c, 0) != 0) {
            return;
        }
    }
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (!req) {
        mcd_conn_abort(c);
        return;
    }
    req->data = c;
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        free(req);
        mcd_conn_abort(c);
    }
}

/* A uv_write of `bytes` queue bytes completed (plain or TLS; its request already freed):
 * the bytes leave the queue, then the connection writes on, finishes, or ends on an error. */
static void write_done(mcd_conn_t *c, uint64_t bytes, int status)
{
    release_bytes(c, bytes);
    c->n_writes--;
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    if (status < 0) {
        mcd_conn_abort(c);
        return;
    }
    if (c->q_len) {
        mcd_conn_start_write(c);
    } else {
        maybe_finish(c);
    }
}

static void on_write(uv_write_t *req, int status)
{
    mcd_wreq_t *w = (mcd_wreq_t *)req;
    mcd_conn_t *c = w->conn;
    for (uint32_t i = 0; i < w->n; i++) {
        mcd_msg_unref(w->msgs[i]);
    }
    uint64_t bytes = w->bytes;
    free(w);
    write_done(c, bytes, status);
}

/* Drops the references of `n` messages of a write that failed and closes the connection. */
static void fail_batch(mcd_conn_t *c, mcd_msg_t **batch, uint32_t n, uint64_t bytes)
{
    for (uint32_t i = 0; i < n; i++) {
        mcd_msg_unref(batch[i]);
    }
    release_bytes(c, bytes);
    mcd_conn_abort(c);
}

/* Pops up to `max` messages of c's queue into `batch` and their buffers into `bufs` (room
 * for 3 per message); returns how many, with their bytes in *total and buffers in *nb. */
static uint32_t pop_batch(mcd_conn_t *c, uint32_t max, mcd_msg_t **batch, uv_buf_t *bufs,
                          unsigned *nb, uint64_t *total)
{
    uint32_t n = c->q_len < max ? c->q_len : max;
    *total = 0;
    *nb = 0;
    for (uint32_t i = 0; i < n; i++) {
        mcd_msg_t *m = q_pop(c);
        batch[i] = m;
        *total += mcd_msg_size(m, c->transport);
        *nb += mcd_msg_bufs(m, c->transport, bufs + *nb);
    }
    c->pending_bytes -= (uint32_t)*total;
    return n;
}

/* The kernel took `written` of the `total` bytes of the n popped messages in `batch` (whose
 * buffers are bufs[0..nb)): releases the messages it took whole and hands the rest to one
 * uv_write whose request holds their references. Both write paths (writev and io_uring) end
 * here, so what reaches the socket after a short write does not depend on the path. Returns
 * 0 when everything was written, 1 when a uv_write holds the rest, -1 when the connection
 * was closed. */
static int after_write(mcd_conn_t *c, mcd_msg_t **batch, uint32_t n, uv_buf_t *bufs, unsigned nb,
                       uint64_t total, uint64_t written)
{
    uint32_t k = 0;
    uint64_t done = 0;
    while (k < n) {
        size_t sz = mcd_msg_size(batch[k], c->transport);
        if (done + sz > written) {
            break;
        }
        done += sz;
        mcd_msg_unref(batch[k]);
        k++;
    }
    release_bytes(c, done);
    if (k == n) {
        return 0;
    }
    /* Skip the bytes already written, possibly inside a buffer. */
    unsigned j = 0;
    uint64_t skip = written;
    while (skip >= bufs[j].len && skip > 0) {
        skip -= bufs[j].len;
        j++;
    }
    bufs[j].base += skip;
    bufs[j].len -= (size_t)skip;
    mcd_wreq_t *w = malloc(sizeof(*w) + (n - k) * sizeof(mcd_msg_t *));
    if (!w) {
        fail_batch(c, batch + k, n - k, total - done);
        return -1;
    }
    w->conn = c;
    w->n = n - k;
    w->bytes = total - done;
    memcpy(w->msgs, batch + k, (n - k) * sizeof(mcd_msg_t *));
    c->n_writes++;
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs + j, nb - j, on_write);
    if (rc != 0) {
        c->n_writes--;
        fail_batch(c, w->msgs, w->n, w->bytes);
        free(w);
        return -1;
    }
    return 1;
}

/* One direct write of the popped batch (writev through uv_try_write, only when nothing is in
 * flight: bytes must stay in order), then after_write(). Returns as after_write(). */
static int try_write(mcd_conn_t *c, mcd_msg_t **batch, uint32_t n, uv_buf_t *bufs, unsigned nb,
                     uint64_t total)
{
    uint64_t written = 0;
    if (c->n_writes == 0) {
        int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
        mcd_conn_table(c)->stats.writev_sends++;
        if (r > 0) {
            written = (uint64_t)r;
        } else if (r < 0 && r != UV_EAGAIN) {
            fail_batch(c, batch, n, total);
            return -1;
        }
    }
    return after_write(c, batch, n, bufs, nb, total, written);
}

/* Hands queued messages to the socket: first with uv_try_write (no allocation at all when
 * the socket takes everything, the common case), and what the kernel did not take with one
 * uv_write whose request holds the remaining messages' references. */
static void tls_start_write(mcd_conn_t *c);

void mcd_conn_start_write(mcd_conn_t *c)
{
    if (c->tls) {
        tls_start_write(c);
        return;
    }
    static uv_buf_t bufs[WRITE_BATCH * 3];
    static mcd_msg_t *batch[WRITE_BATCH];
    while (c->q_len && c->n_writes < MAX_WRITES && !(c->flags & MCD_CF_CLOSED)) {
        unsigned nb;
        uint64_t total;
        uint32_t n = pop_batch(c, WRITE_BATCH, batch, bufs, &nb, &total);
        if (try_write(c, batch, n, bufs, nb, total) < 0) {
            return;
        }
    }
}

/* ---- TLS connections ---------------------------------------------------------------------------
 * The queue holds the same shared plaintext messages as for any connection; each TLS
 * connection encrypts its own copy when it writes: up to TLS_CHUNK bytes of messages per
 * write, gathered into one buffer so that a small event is one record, not one per buffer.
 * The ciphertext goes out by uv_try_write straight from the session's output and, for what the
 * kernel does not take, one uv_write of a copy. The queue accounting is the same as for plain
 * connections: a message's bytes count as queued until the write that carries its ciphertext
 * completes, and what waits unencrypted counts as pending, so the slow-consumer limit bounds a
 * TLS connection exactly as a plain one (its ciphertext in flight is at most MAX_WRITES
 * chunks). TLS connections never go through io_uring (ring_flush skips them). */

#define TLS_CHUNK (16u * 1024) /* one full TLS record of plaintext per write */

typedef struct tls_wreq {
    uv_write_t req;
    mcd_conn_t *conn;
    uint64_t bytes; /* plaintext queue bytes this ciphertext carries */
    char data[];
} tls_wreq_t;

static void on_tls_write(uv_write_t *req, int status)
{
    tls_wreq_t *w = (tls_wreq_t *)req;
    mcd_conn_t *c = w->conn;
    uint64_t bytes = w->bytes;
    free(w);
    write_done(c, bytes, status);
}

int mcd_conn_tls_flush(mcd_conn_t *c, uint64_t bytes)
{
    if (c->flags & MCD_CF_CLOSED) {
        release_bytes(c, bytes);
        return -1;
    }
    const char *out = NULL;
    size_t len = mcd_tls_conn_output(c->tls, &out);
    size_t done = 0;
    if (len && !c->n_writes) {
        uv_buf_t b = uv_buf_init((char *)out, (unsigned)len);
        int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        mcd_conn_table(c)->stats.writev_sends++;
        if (r < 0 && r != UV_EAGAIN) {
            mcd_tls_conn_output_done(c->tls);
            release_bytes(c, bytes);
            mcd_conn_abort(c);
            return -1;
        }
        done = r > 0 ? (size_t)r : 0;
    }
    if (done == len) {
        mcd_tls_conn_output_done(c->tls);
        release_bytes(c, bytes);
        return 0;
    }
    tls_wreq_t *w = malloc(sizeof(*w) + (len - done));
    if (!w) {
        mcd_tls_conn_output_done(c->tls);
        release_bytes(c, bytes);
        mcd_conn_abort(c);
        return -1;
    }
    memcpy(w->data, out + done, len - done);
    mcd_tls_conn_output_done(c->tls);
    w->conn = c;
    w->bytes = bytes;
    c->n_writes++;
    uv_buf_t b = uv_buf_init(w->data, (unsigned)(len - done));
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_tls_write) != 0) {
        c->n_writes--;
        release_bytes(c, bytes);
        free(w);
        mcd_conn_abort(c);
        return -1;
    }
    return 0;
}

/* Encrypts queued messages, a chunk at a time, while fewer than MAX_WRITES writes are on
 * their way. Nothing is written before the handshake completes (the queue waits). */
static void tls_start_write(mcd_conn_t *c)
{
    static _Thread_local char plain[TLS_CHUNK];
    uv_buf_t bufs[3];
    if (!mcd_tls_conn_established(c->tls)) {
        return;
    }
    while (c->q_len && c->n_writes < MAX_WRITES && !(c->flags & MCD_CF_CLOSED)) {
        uint64_t total = 0;
        size_t used = 0;
        bool ok = true;
        while (ok && c->q_len && total < TLS_CHUNK) {
            mcd_msg_t *m = q_pop(c);
            unsigned nb = mcd_msg_bufs(m, c->transport, bufs);
            total += mcd_msg_size(m, c->transport);
            for (unsigned i = 0; ok && i < nb; i++) {
                if (used + bufs[i].len <= TLS_CHUNK) {
                    memcpy(plain + used, bufs[i].base, bufs[i].len);
                    used += bufs[i].len;
                    continue;
                }
                /* A large buffer: what is gathered first, then the buffer itself. */
                ok = mcd_tls_conn_encrypt(c->tls, plain, used) == 0 &&
                     mcd_tls_conn_encrypt(c->tls, bufs[i].base, bufs[i].len) == 0;
                used = 0;
            }
            mcd_msg_unref(m);
        }
        c->pending_bytes -= (uint32_t)total;
        if (ok) {
            ok = mcd_tls_conn_encrypt(c->tls, plain, used) == 0;
        }
        if (!ok) {
            static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
            mc_log_ratelimited(&rl, MC_LOG_WARN, "server", "TLS write failed: %s",
                               mcd_tls_conn_error(c->tls));
            release_bytes(c, total);
            mcd_conn_abort(c);
            return;
        }
        if (mcd_conn_tls_flush(c, total) != 0) {
            return;
        }
    }
}

/* ---- io_uring submission ------------------------------------------------------------------ */

/* libuv promises that a uv_buf_t is laid out as a struct iovec on Unix: the buffers built
 * for writev go to io_uring as they are. */
_Static_assert(sizeof(uv_buf_t) == sizeof(struct iovec) &&
                   offsetof(uv_buf_t, base) == offsetof(struct iovec, iov_base) &&
                   offsetof(uv_buf_t, len) == offsetof(struct iovec, iov_len),
               "uv_buf_t is not an iovec");

#define RING_MSGS 4096         /* messages in one submission */
#define RING_MSGS_PER_CONN 64u /* per connection and submission; more go by start_write */

/* One connection's send in a submission. */
typedef struct ring_slot {
    mcd_conn_t *c;
    uint32_t first; /* its messages: batch->msgs[first .. first + n) */
    uint32_t n;
    uint32_t first_buf; /* its buffers: batch->bufs[first_buf .. first_buf + nb) */
    unsigned nb;
    uint64_t total;
} ring_slot_t;

struct mcd_ring_batch {
    ring_slot_t *slots; /* as many as the ring takes per submission */
    uint32_t n_slots;
    uint32_t n_msgs;
    uint32_t n_bufs;
    mcd_msg_t *msgs[RING_MSGS];
    uv_buf_t bufs[RING_MSGS * 3];
};

static struct mcd_ring_batch *batch_new(unsigned room)
{
    struct mcd_ring_batch *b = calloc(1, sizeof(*b));
    ring_slot_t *slots = b ? calloc(room, sizeof(*slots)) : NULL;
    if (!slots) {
        free(b);
        return NULL;
    }
    b->slots = slots;
    return b;
}

int mcd_conn_table_use_ring(mcd_conn_table_t *t, mcd_sendring_t *ring)
{
    t->batch = batch_new(mcd_sendring_room(ring));
    if (!t->batch) {
        mcd_sendring_destroy(ring);
        return MC_ENOMEM;
    }
    t->ring = ring;
    return 0;
}

int mcd_conn_table_use_pool(mcd_conn_table_t *t, mcd_sendpool_t *pool)
{
    t->batch = batch_new(mcd_sendpool_room(pool));
    if (!t->batch) {
        mcd_sendpool_destroy(pool);
        return MC_ENOMEM;
    }
    t->pool = pool;
    return 0;
}

/* Room for more sends in this submission (ring or pool). */
static unsigned batch_room(const mcd_conn_table_t *t)
{
    return t->pool ? mcd_sendpool_room(t->pool) : mcd_sendring_room(t->ring);
}

static void drop_ring(mcd_conn_table_t *t)
{
    mcd_sendring_destroy(t->ring);
    t->ring = NULL;
    mcd_sendpool_destroy(t->pool);
    t->pool = NULL;
    if (t->batch) {
        free(t->batch->slots);
        free(t->batch);
        t->batch = NULL;
    }
}

static void ring_done(void *tag, int res, void *arg)
{
    ring_slot_t *s = tag;
    struct mcd_ring_batch *b = arg;
    mcd_conn_t *c = s->c;
    mcd_msg_t **batch = b->msgs + s->first;
    uv_buf_t *bufs = b->bufs + s->first_buf;
    if (res == MCD_SENDRING_NOT_SENT) {
        /* The kernel never saw it: the ordinary write, as if there were no ring. */
        try_write(c, batch, s->n, bufs, s->nb, s->total);
        return;
    }
    if (res < 0 && res != -EAGAIN) {
        fail_batch(c, batch, s->n, s->total);
        return;
    }
    after_write(c, batch, s->n, bufs, s->nb, s->total, res > 0 ? (uint64_t)res : 0);
}

/* ring_submit() with a pool: the sends of the submission are made by the pool's threads; the
 * results are handled here, on the loop thread, exactly as with one ring. */
static void pool_submit(mcd_conn_table_t *t)
{
    struct mcd_ring_batch *b = t->batch;
    bool uring = mcd_sendpool_uring(t->pool);
    uint64_t before = mcd_sendpool_syscalls(t->pool);
    mc_error_t err;
    uint32_t n = b->n_slots;
    int rc = mcd_sendpool_run(t->pool, ring_done, b, &err);
    if (uring) {
        t->stats.ring_submits += mcd_sendpool_syscalls(t->pool) - before;
        t->stats.ring_sends += n;
    } else {
        t->stats.writev_sends += n;
    }
    b->n_slots = b->n_msgs = b->n_bufs = 0;
    if (rc != 0) {
        mc_log(MC_LOG_ERROR, "server", "io_uring failed (%s): writing with sendmsg from now on",
               err.message);
    }
}

/* Submits the sends added so far and handles their results. */
static void ring_submit(mcd_conn_table_t *t)
{
    struct mcd_ring_batch *b = t->batch;
    if (!b->n_slots) {
        return;
    }
    if (t->pool) {
        pool_submit(t);
        return;
    }
    uint64_t before = mcd_sendring_submits(t->ring);
    mc_error_t err;
    int rc = mcd_sendring_run(t->ring, ring_done, b, &err);
    t->stats.ring_submits += mcd_sendring_submits(t->ring) - before;
    t->stats.ring_sends += b->n_slots;
    b->n_slots = b->n_msgs = b->n_bufs = 0;
    if (rc != 0) {
        mc_log(MC_LOG_ERROR, "server", "io_uring failed (%s): writing with writev from now on",
               err.message);
        drop_ring(t);
    }
}

/* The first batch of every dirty connection with nothing in flight, in one submission (or a
 * few, when the connections are more than the ring or the scratch takes at once). */
static void ring_flush(mcd_conn_table_t *t)
{
    struct mcd_ring_batch *b = t->batch;
    for (uint32_t i = 0; i < t->n_dirty && (t->ring || t->pool); i++) {
        mcd_conn_t *c = t->dirty[i];
        if (!c || (c->flags & MCD_CF_CLOSED) || !c->q_len || c->n_writes || c->tls) {
            continue; /* TLS connections: ciphertext is made per connection in start_write */
        }
        uint32_t n = c->q_len < RING_MSGS_PER_CONN ? c->q_len : RING_MSGS_PER_CONN;
        if (b->n_msgs + n > RING_MSGS || !batch_room(t)) {
            ring_submit(t);
            if (!t->ring && !t->pool) {
                return;
            }
        }
        uv_os_fd_t fd;
        if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) {
            continue; /* left to start_write, which reports the error */
        }
        ring_slot_t *s = &b->slots[b->n_slots++];
        s->c = c;
        s->first = b->n_msgs;
        s->first_buf = b->n_bufs;
        s->n = pop_batch(c, n, b->msgs + s->first, b->bufs + s->first_buf, &s->nb, &s->total);
        b->n_msgs += s->n;
        b->n_bufs += s->nb;
        const struct iovec *iov = (const struct iovec *)(b->bufs + s->first_buf);
        if (t->pool) {
            mcd_sendpool_add(t->pool, fd, iov, s->nb, s);
        } else {
            mcd_sendring_add(t->ring, fd, iov, s->nb, s);
        }
    }
    ring_submit(t);
}

void mcd_conn_flush_dirty(mcd_conn_table_t *t)
{
    if (t->ring || t->pool) {
        ring_flush(t);
    }
    /* Index loop: writing never marks connections dirty, but mcd_conn_abort() may run. */
    for (uint32_t i = 0; i < t->n_dirty; i++) {
        mcd_conn_t *c = t->dirty[i];
        if (!c) {
            continue;
        }
        c->flags &= (uint8_t)~MCD_CF_DIRTY;
        if (c->flags & MCD_CF_CLOSED) {
            continue;
        }
        if (c->q_len && c->n_writes < MAX_WRITES) {
            mcd_conn_start_write(c);
        }
        if (!(c->flags & MCD_CF_CLOSED)) {
            maybe_finish(c);
        }
    }
    t->n_dirty = 0;
}

/* ---- Connection lifetime --------------------------------------------------------------------- */

static void on_close(uv_handle_t *h)
{
    mcd_conn_t *c = (mcd_conn_t *)h;
    mcd_conn_table_t *t = mcd_conn_table(c);
    if (c->flags & MCD_CF_DIRTY) {
        /* Not expected (the check phase runs before close callbacks), but never leave a
         * dangling pointer in the list. */
        for (uint32_t i = 0; i < t->n_dirty; i++) {
            if (t->dirty[i] == c) {
                t->dirty[i] = NULL;
            }
        }
    }
    drop_pending(c);
    q_release(c);
    if (c->req) {
        mcd_http_req_cleanup(c->req);
        free(c->req);
    }
    mcd_subscription_destroy(c->sub);
    free(c->resume_skip);
    c->resume_skip = NULL;
    mcd_ws_parser_cleanup(&c->ws);
    mcd_tls_conn_free(c->tls);
    free(c);
}

void mcd_conn_abort(mcd_conn_t *c)
{
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    mcd_conn_table_t *t = mcd_conn_table(c);
    leave_set_closing(c);
    plain_remove(c);
    if (c->addr) {
        addr_release(t, c->addr);
        c->addr = NULL;
    }
    c->flags |= MCD_CF_CLOSED;
    uint32_t i = c->table_index;
    t->n_conns--;
    if (i != t->n_conns) {
        t->conns[i] = t->conns[t->n_conns];
        t->conns[i]->table_index = i;
    }
    t->stats.conns[c->transport]--;
    uv_close((uv_handle_t *)&c->tcp, on_close);
}
