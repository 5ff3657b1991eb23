/*
 * server.c: the live delivery server: TCP listener, connection table, HTTP/1.1 routing,
 * WebSocket and SSE connections, write batching, timers and shutdown. See server.h.
 *
 * Thread: the loop thread runs everything below except mcd_server_new/start/stop/destroy
 * and mcd_server_engine_opts/attach, which run on the owner's thread (stop only signals the
 * loop and joins it). The engine's watcher threads only call notify_cb (uv_async_send).
 * Invariants:
 *   - a connection holds no read buffer (all reads land in srv->rbuf and are consumed in the
 *     read callback), no HTTP parser once its request is answered, and no queue storage
 *     beyond its inline slot once it has had nothing queued for a whole housekeeping tick
 *     (an active connection keeps its ring: no malloc/free per delivery);
 *   - queued messages normally reach a socket from flush_cb (the check phase, once per loop
 *     pass: every message queued during one pass leaves in one write per connection, by
 *     uv_try_write and, for what the kernel does not take, one uv_write) and from on_write
 *     (continuing after a write completes); exceptions that keep memory flat: a burst over a
 *     quarter of the send-queue limit within one pass, a new subscriber's first messages,
 *     and raw answers (HTTP, pong, close) to a connection with nothing queued go out at once;
 *   - refusals (400/401/403/404/406/426/503) are plain HTTP answers before any upgrade;
 *   - a connection is freed only in close_cb; after conn_abort() it is out of the table,
 *     out of its hub, and ignored by every callback that still fires for it.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "server_internal.h"
#include "viewer.h"

#define READ_BUF_SIZE 65536
#define WRITE_BATCH 256      /* messages per uv_write */
#define MAX_WRITES 4         /* uv_write requests in flight per connection */
#define DISPATCH_BUDGET 1024 /* events per loop pass before I/O gets a turn */
#define HTTP_ONLY_ROOM 256   /* connections beyond max_connections for plain HTTP */
#define LISTEN_BACKLOG 4096

static const mcd_timing_t default_timing = {
    .ping_ms = 25000,
    .pong_ms = 10000,
    .sse_ms = 15000,
    .request_ms = 10000,
    .idle_ms = 60000,
    .linger_ms = 3000,
    .tick_ms = 1000,
};

/* Shared frames that never change: one copy for every connection. */
static mcd_msg_t ping_msg = {
    .flags = MCD_MSG_STATIC | MCD_MSG_RAW, .body = "\x89\x00", .body_len = 2};
static mcd_msg_t heartbeat_msg = {.flags = MCD_MSG_STATIC | MCD_MSG_RAW,
                                  .body = MCD_SSE_HEARTBEAT,
                                  .body_len = sizeof(MCD_SSE_HEARTBEAT) - 1};

static void conn_abort(mcd_conn_t *c);
static void start_write(mcd_conn_t *c);

static int64_t loop_now(mcd_server_t *srv)
{
    return (int64_t)uv_now(&srv->loop);
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

mcd_hub_t *mcd_server_hub(mcd_server_t *srv, const char *stream)
{
    if (!stream) {
        return NULL;
    }
    for (size_t i = 0; i < srv->n_hubs; i++) {
        if (strcmp(srv->hubs[i].cfg->name, stream) == 0) {
            return &srv->hubs[i];
        }
    }
    return NULL;
}

/* ---- JSON helpers --------------------------------------------------------------------------- */

/* Appends `s` as a JSON string body (without quotes) to out[*n..cap). Truncates silently. */
static void json_escape(char *out, size_t cap, size_t *n, const char *s)
{
    for (; *s && *n + 7 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            out[(*n)++] = '\\';
            out[(*n)++] = (char)ch;
        } else if (ch < 0x20) {
            *n += (size_t)snprintf(out + *n, cap - *n, "\\u%04x", ch);
        } else {
            out[(*n)++] = (char)ch;
        }
    }
    out[*n] = '\0';
}

/* ---- Send queue and writes --------------------------------------------------------------------
 */

static void mark_dirty(mcd_conn_t *c)
{
    if (c->flags & (MCD_CF_DIRTY | MCD_CF_CLOSED)) {
        return;
    }
    mcd_server_t *srv = mcd_conn_server(c);
    if (srv->n_dirty == srv->dirty_cap) {
        uint32_t cap = srv->dirty_cap ? srv->dirty_cap * 2 : 256;
        mcd_conn_t **nd = realloc(srv->dirty, cap * sizeof(*nd));
        if (!nd) {
            /* Written when its current write completes, or by the next mark. */
            return;
        }
        srv->dirty = nd;
        srv->dirty_cap = cap;
    }
    c->flags |= MCD_CF_DIRTY;
    srv->dirty[srv->n_dirty++] = c;
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
    mcd_conn_server(c)->stats.queued_bytes += size;
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

/* Housekeeping: a heap ring that stayed empty for a whole tick is released, so an idle
 * subscriber holds no queue storage beyond its inline slot. */
static void q_trim(mcd_conn_t *c)
{
    if (c->q != &c->q_one && c->q_len == 0 && !(c->flags & MCD_CF_Q_USED)) {
        q_release(c);
    }
    c->flags &= (uint8_t)~MCD_CF_Q_USED;
}

/* Releases queued-bytes accounting for `bytes` that left the queue (written or dropped).
 * Replayed bytes are always the oldest in the queue, so they leave first. */
static void release_bytes(mcd_conn_t *c, uint64_t bytes)
{
    c->queued_bytes -= (uint32_t)bytes;
    mcd_conn_server(c)->stats.queued_bytes -= bytes;
    c->replay_bytes = c->replay_bytes > bytes ? c->replay_bytes - (uint32_t)bytes : 0;
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

/* Queues raw bytes (HTTP answers, close and pong frames): never refused for size. */
static int send_raw(mcd_conn_t *c, const void *bytes, size_t len)
{
    if (c->flags & MCD_CF_CLOSED) {
        return -1;
    }
    if (!c->q_len && !c->n_writes) {
        /* Nothing ahead of it: try the socket directly and copy only what it did not take
         * (handshake answers and pongs usually need no allocation). */
        uv_buf_t b = uv_buf_init((char *)bytes, (unsigned)len);
        int r = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        if (r == (int)len) {
            return 0;
        }
        if (r < 0 && r != UV_EAGAIN) {
            conn_abort(c);
            return -1;
        }
        if (r > 0) {
            bytes = (const char *)bytes + r;
            len -= (size_t)r;
        }
    }
    mcd_msg_t *m = mcd_msg_new_raw(bytes, len);
    if (!m) {
        conn_abort(c);
        return -1;
    }
    int rc = q_push(c, m, len, false);
    mcd_msg_unref(m);
    if (rc != 0) {
        conn_abort(c);
        return -1;
    }
    return 0;
}

static void linger(mcd_conn_t *c)
{
    c->state = MCD_ST_CLOSING;
    c->flags |= MCD_CF_LINGER;
    c->deadline_ms = loop_now(mcd_conn_server(c)) + mcd_conn_server(c)->timing.linger_ms;
    mark_dirty(c);
}

/* Sends a close frame after what is queued (or instead of it with drop) and closes. */
static void ws_close(mcd_conn_t *c, uint16_t code, const char *reason, bool drop)
{
    if (c->state == MCD_ST_CLOSING || (c->flags & MCD_CF_CLOSED)) {
        return;
    }
    mcd_hub_unsubscribe(c);
    if (drop) {
        drop_pending(c);
    }
    uint8_t frame[MCD_WS_MAX_CONTROL + 2];
    size_t n = mcd_ws_close_frame(frame, code, reason);
    if (send_raw(c, frame, n) != 0) {
        return;
    }
    linger(c);
}

static void slow_consumer(mcd_conn_t *c)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    mcd_server_t *srv = mcd_conn_server(c);
    srv->stats.slow_disconnects++;
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "slow consumer disconnected stream=%s transport=%s queued=%" PRIu32,
                       c->hub ? c->hub->cfg->name : "?", c->transport == MCD_T_WS ? "ws" : "sse",
                       c->queued_bytes);
    if (c->transport == MCD_T_WS) {
        ws_close(c, MCD_WS_CLOSE_SLOW, "slow consumer: send queue limit reached", true);
    } else {
        conn_abort(c);
    }
}

/* Bytes the kernel has not taken yet: our ring plus what libuv still holds of the writes in
 * flight. A write whose bytes all reached the socket buffer no longer counts, even before its
 * callback ran. */
static uint64_t unsent_bytes(mcd_conn_t *c)
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
        conn_abort(c);
        return -1;
    }
    mcd_server_t *srv = mcd_conn_server(c);
    if ((uint64_t)c->queued_bytes + size > UINT32_MAX / 2) {
        /* Only a replay of a huge history of huge events gets here. */
        slow_consumer(c);
        return -1;
    }
    if (!replay) {
        /* A burst bigger than a quarter of the limit within one loop pass goes out now
         * rather than at the end of the pass, so that a fast reader is never mistaken for a
         * slow one because of how events were batched. */
        if (c->pending_bytes + size > srv->max_queue / 4 && c->n_writes < MAX_WRITES) {
            start_write(c);
            if (c->flags & MCD_CF_CLOSED) {
                return -1;
            }
        }
        uint64_t unsent = unsent_bytes(c);
        uint64_t exempt = c->replay_bytes < unsent ? c->replay_bytes : unsent;
        if (unsent - exempt + size > srv->max_queue) {
            slow_consumer(c);
            return -1;
        }
    }
    if (q_push(c, msg, size, replay) != 0) {
        conn_abort(c);
        return -1;
    }
    if (!(msg->flags & MCD_MSG_RAW)) {
        srv->stats.deliveries[c->transport]++;
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
        conn_abort(c);
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
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (!req) {
        conn_abort(c);
        return;
    }
    req->data = c;
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        free(req);
        conn_abort(c);
    }
}

static void on_write(uv_write_t *req, int status)
{
    mcd_wreq_t *w = (mcd_wreq_t *)req;
    mcd_conn_t *c = w->conn;
    for (uint32_t i = 0; i < w->n; i++) {
        mcd_msg_unref(w->msgs[i]);
    }
    release_bytes(c, w->bytes);
    free(w);
    c->n_writes--;
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    if (status < 0) {
        conn_abort(c);
        return;
    }
    if (c->q_len) {
        start_write(c);
    } else {
        maybe_finish(c);
    }
}

/* Hands queued messages to the socket: first with uv_try_write (no allocation at all when
 * the socket takes everything, the common case), and what the kernel did not take with one
 * uv_write whose request holds the remaining messages' references. */
static void start_write(mcd_conn_t *c)
{
    static uv_buf_t bufs[WRITE_BATCH * 3];
    static mcd_msg_t *batch[WRITE_BATCH];
    while (c->q_len && c->n_writes < MAX_WRITES && !(c->flags & MCD_CF_CLOSED)) {
        uint32_t n = c->q_len < WRITE_BATCH ? c->q_len : WRITE_BATCH;
        uint64_t total = 0;
        unsigned nb = 0;
        for (uint32_t i = 0; i < n; i++) {
            mcd_msg_t *m = q_pop(c);
            batch[i] = m;
            total += mcd_msg_size(m, c->transport);
            nb += mcd_msg_bufs(m, c->transport, bufs + nb);
        }
        c->pending_bytes -= (uint32_t)total;
        uint64_t written = 0;
        if (c->n_writes == 0) {
            /* Only when nothing is in flight: bytes must stay in order. */
            int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nb);
            if (r > 0) {
                written = (uint64_t)r;
            } else if (r < 0 && r != UV_EAGAIN) {
                for (uint32_t i = 0; i < n; i++) {
                    mcd_msg_unref(batch[i]);
                }
                release_bytes(c, total);
                conn_abort(c);
                return;
            }
        }
        /* Release the messages the kernel took whole. */
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
            continue;
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
            for (uint32_t i = k; i < n; i++) {
                mcd_msg_unref(batch[i]);
            }
            release_bytes(c, total - done);
            conn_abort(c);
            return;
        }
        w->conn = c;
        w->n = n - k;
        w->bytes = total - done;
        memcpy(w->msgs, batch + k, (n - k) * sizeof(mcd_msg_t *));
        c->n_writes++;
        int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs + j, nb - j, on_write);
        if (rc != 0) {
            c->n_writes--;
            for (uint32_t i = 0; i < w->n; i++) {
                mcd_msg_unref(w->msgs[i]);
            }
            release_bytes(c, w->bytes);
            free(w);
            conn_abort(c);
            return;
        }
    }
}

static void flush_cb(uv_check_t *h)
{
    mcd_server_t *srv = h->data;
    /* Index loop: start_write() never marks connections dirty, but conn_abort() may run. */
    for (uint32_t i = 0; i < srv->n_dirty; i++) {
        mcd_conn_t *c = srv->dirty[i];
        if (!c) {
            continue;
        }
        c->flags &= (uint8_t)~MCD_CF_DIRTY;
        if (c->flags & MCD_CF_CLOSED) {
            continue;
        }
        if (c->q_len && c->n_writes < MAX_WRITES) {
            start_write(c);
        }
        if (!(c->flags & MCD_CF_CLOSED)) {
            maybe_finish(c);
        }
    }
    srv->n_dirty = 0;
}

/* ---- Connection lifetime --------------------------------------------------------------------- */

static void on_close(uv_handle_t *h)
{
    mcd_conn_t *c = (mcd_conn_t *)h;
    mcd_server_t *srv = mcd_conn_server(c);
    if (c->flags & MCD_CF_DIRTY) {
        /* Not expected (the check phase runs before close callbacks), but never leave a
         * dangling pointer in the list. */
        for (uint32_t i = 0; i < srv->n_dirty; i++) {
            if (srv->dirty[i] == c) {
                srv->dirty[i] = NULL;
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
    mcd_ws_parser_cleanup(&c->ws);
    free(c);
}

static void conn_abort(mcd_conn_t *c)
{
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    mcd_server_t *srv = mcd_conn_server(c);
    c->flags |= MCD_CF_CLOSED;
    mcd_hub_unsubscribe(c);
    uint32_t i = c->table_index;
    srv->n_conns--;
    if (i != srv->n_conns) {
        srv->conns[i] = srv->conns[srv->n_conns];
        srv->conns[i]->table_index = i;
    }
    srv->stats.conns[c->transport]--;
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

/* ---- HTTP answers ------------------------------------------------------------------------------
 */

static const char *status_text(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

static void count_refusal(mcd_server_t *srv, int status)
{
    int k = status == 400   ? 0
            : status == 401 ? 1
            : status == 403 ? 2
            : status == 404 ? 3
            : status == 503 ? 4
                            : 5;
    srv->stats.refused[k]++;
}

/* Queues a complete answer. `body_static` bodies (the viewer page) are sent without a copy.
 * Without keep-alive, the connection closes once the answer is written. */
static void respond(mcd_conn_t *c, int status, const char *ctype, const char *extra,
                    const char *body, size_t len, bool body_static, bool keep_alive)
{
    char head[1024];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: %s\r\n%s\r\n",
                     status, status_text(status), ctype, len, keep_alive ? "keep-alive" : "close",
                     extra ? extra : "");
    if (n < 0 || (size_t)n >= sizeof(head)) {
        conn_abort(c);
        return;
    }
    if (body_static) {
        static mcd_msg_t page;
        if (send_raw(c, head, (size_t)n) != 0) {
            return;
        }
        page.flags = MCD_MSG_STATIC | MCD_MSG_RAW;
        page.body = body;
        page.body_len = (uint32_t)len;
        if (q_push(c, &page, len, false) != 0) {
            conn_abort(c);
            return;
        }
    } else {
        char *all = malloc((size_t)n + len);
        if (!all) {
            conn_abort(c);
            return;
        }
        memcpy(all, head, (size_t)n);
        if (len) {
            memcpy(all + n, body, len);
        }
        int rc = send_raw(c, all, (size_t)n + len);
        free(all);
        if (rc != 0) {
            return;
        }
    }
    if (!keep_alive) {
        linger(c);
    }
}

static void respond_json(mcd_conn_t *c, int status, const char *json, bool keep_alive,
                         const char *extra)
{
    respond(c, status, "application/json", extra, json, strlen(json), false, keep_alive);
}

/* {"error": message, "code": code} with `status`. Refusals keep the connection open when the
 * request allowed it (a client may retry with a token on the same connection). */
static void refuse(mcd_conn_t *c, int status, const char *code, const char *message,
                   bool keep_alive, const char *extra)
{
    char body[768];
    size_t n = 0;
    n += (size_t)snprintf(body, sizeof(body), "{\"error\":\"");
    json_escape(body, sizeof(body) - 64, &n, message);
    n += (size_t)snprintf(body + n, sizeof(body) - n, "\",\"code\":\"%s\"}", code);
    count_refusal(mcd_conn_server(c), status);
    mc_log(MC_LOG_DEBUG, "server", "refused status=%d code=%s", status, code);
    respond_json(c, status, body, keep_alive, extra);
}

/* ---- Routes -------------------------------------------------------------------------------- */

static void route_streams(mcd_conn_t *c, bool keep_alive)
{
    mcd_server_t *srv = mcd_conn_server(c);
    size_t cap = 64 + srv->n_hubs * 600;
    char *body = malloc(cap);
    if (!body) {
        conn_abort(c);
        return;
    }
    size_t n = (size_t)snprintf(body, cap, "{\"streams\":[");
    for (size_t i = 0; i < srv->n_hubs; i++) {
        const char *name = srv->hubs[i].cfg->name;
        n += (size_t)snprintf(body + n, cap - n, "%s{\"name\":\"", i ? "," : "");
        json_escape(body, cap, &n, name);
        n += (size_t)snprintf(body + n, cap - n, "\",\"url\":\"/v1/streams/");
        json_escape(body, cap, &n, name);
        n += (size_t)snprintf(body + n, cap - n, "\"}");
    }
    n += (size_t)snprintf(body + n, cap - n, "]}");
    respond(c, 200, "application/json", NULL, body, n, false, keep_alive);
    free(body);
}

static void route_readyz(mcd_conn_t *c, bool keep_alive)
{
    mcd_server_t *srv = mcd_conn_server(c);
    size_t n = 0;
    bool ready = false;
    char *body = mcd_readyz_render(srv, !srv->engine_stopped, &n, &ready);
    if (!body) {
        conn_abort(c);
        return;
    }
    respond(c, ready ? 200 : 503, "application/json", NULL, body, n, false, keep_alive);
    free(body);
}

static void route_metrics(mcd_conn_t *c, bool keep_alive)
{
    size_t len = 0;
    char *text = mcd_metrics_render(mcd_conn_server(c), &len);
    if (!text) {
        conn_abort(c);
        return;
    }
    respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, text, len, false, keep_alive);
    free(text);
}

static void route_subscribe(mcd_conn_t *c, mcd_http_req_t *req, mcd_http_target_t *t,
                            mcd_hub_t *hub)
{
    mcd_server_t *srv = mcd_conn_server(c);
    bool ka = req->keep_alive;
    const char *upgrade = mcd_http_req_header(req, MCD_H_UPGRADE);
    const char *origin = mcd_http_req_header(req, MCD_H_ORIGIN);
    bool ws = upgrade && mcd_http_has_token(upgrade, "websocket");
    bool sse =
        !ws && mcd_http_has_token(mcd_http_req_header(req, MCD_H_ACCEPT), "text/event-stream");
    char accept_key[29];
    if (upgrade && !ws) {
        refuse(c, 400, "bad_request", "only the websocket upgrade is supported", false, NULL);
        return;
    }
    if (!ws && !sse) {
        refuse(c, 406, "not_acceptable",
               "open this URL as a WebSocket (Upgrade: websocket) or as an event stream "
               "(Accept: text/event-stream)",
               ka, NULL);
        return;
    }
    if (srv->stats.conns[MCD_T_WS] + srv->stats.conns[MCD_T_SSE] >= srv->max_subscribers) {
        refuse(c, 503, "too_many_connections", "connection limit reached, retry later", false,
               "Retry-After: 5\r\n");
        return;
    }
    if (ws) {
        const char *version = mcd_http_req_header(req, MCD_H_WS_VERSION);
        const char *key = mcd_http_req_header(req, MCD_H_WS_KEY);
        if (!req->upgrade ||
            !mcd_http_has_token(mcd_http_req_header(req, MCD_H_CONNECTION), "upgrade")) {
            refuse(c, 400, "bad_handshake", "Connection must include Upgrade", false, NULL);
            return;
        }
        if (!mcd_http_req_header(req, MCD_H_HOST) || req->http_major != 1 || req->http_minor < 1) {
            refuse(c, 400, "bad_handshake", "WebSocket needs HTTP/1.1 and a Host header", false,
                   NULL);
            return;
        }
        if (!version || strcmp(version, "13") != 0) {
            refuse(c, 426, "unsupported_version", "Sec-WebSocket-Version must be 13", false,
                   "Sec-WebSocket-Version: 13\r\n");
            return;
        }
        if (!key || mcd_ws_accept_key(key, strlen(key), accept_key) != 0) {
            refuse(c, 400, "bad_handshake", "Sec-WebSocket-Key must be 16 bytes in base64", false,
                   NULL);
            return;
        }
        if (!mcd_origin_allowed(srv->config, origin)) {
            refuse(c, 403, "forbidden_origin", "origin not allowed", false, NULL);
            return;
        }
    }

    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    char *token = NULL;
    const char *authz = mcd_http_req_header(req, MCD_H_AUTHORIZATION);
    if (t->token) {
        token = strdup(t->token);
    } else if (authz) {
        size_t tlen = 0;
        const char *b = mcd_http_bearer(authz, &tlen);
        if (!b) {
            refuse(c, 401, "unauthorized", "Authorization must be \"Bearer <token>\"", ka, NULL);
            return;
        }
        token = strndup(b, tlen);
    }
    if ((t->token || authz) && !token) {
        conn_abort(c);
        return;
    }
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    int rc = mcd_auth_subscriber(srv->auth, hub->cfg, token, (int64_t)time(NULL), &id, &r);
    free(token);
    if (rc != 0) {
        refuse(c, r.status ? r.status : 401, r.code ? r.code : "unauthorized", r.message, ka, NULL);
        return;
    }
    const char *since = t->since;
    const char *last_id = sse ? mcd_http_req_header(req, MCD_H_LAST_EVENT_ID) : NULL;
    if (last_id && *last_id) {
        since = last_id; /* the browser's reconnect knows better than the original URL */
    }
    if (since && !mcd_http_valid_event_id(since)) {
        refuse(c, 400, "invalid_since", "since must be an event id (hexadecimal)", ka, NULL);
        return;
    }
    mcd_subscription_t *sub = mcd_subscription_new(hub->cfg, t->vars, t->filter, &id, &r);
    if (!sub) {
        refuse(c, r.status ? r.status : 400, r.code ? r.code : "bad_request", r.message, ka, NULL);
        return;
    }

    if (ws) {
        char head[256];
        int n = snprintf(head, sizeof(head),
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                         accept_key);
        if (send_raw(c, head, (size_t)n) != 0) {
            mcd_subscription_destroy(sub);
            return;
        }
        mcd_ws_parser_init(&c->ws, srv->config->server.max_frame_bytes
                                       ? srv->config->server.max_frame_bytes
                                       : 65536);
        c->state = MCD_ST_WS;
        c->next_beat_ms = loop_now(srv) + srv->timing.ping_ms;
    } else {
        char extra[512] = "";
        if (origin && srv->config->server.n_allowed_origins &&
            mcd_origin_allowed(srv->config, origin) && strlen(origin) < 300 &&
            !strpbrk(origin, "\r\n")) {
            snprintf(extra, sizeof(extra), "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n",
                     origin);
        }
        /* The preamble's blank line ends the headers: put the CORS lines before it. */
        const char *blank = strstr(mcd_sse_preamble, "\r\n\r\n");
        size_t head_len = (size_t)(blank - mcd_sse_preamble) + 2;
        char head[1024];
        int n = snprintf(head, sizeof(head), "%.*s%s%s", (int)head_len, mcd_sse_preamble, extra,
                         blank + 2);
        if (n < 0 || (size_t)n >= sizeof(head) || send_raw(c, head, (size_t)n) != 0) {
            mcd_subscription_destroy(sub);
            if (!(c->flags & MCD_CF_CLOSED)) {
                conn_abort(c);
            }
            return;
        }
        c->state = MCD_ST_SSE;
        c->next_beat_ms = loop_now(srv) + srv->timing.sse_ms;
    }
    srv->stats.conns[MCD_T_HTTP]--;
    c->transport = ws ? MCD_T_WS : MCD_T_SSE;
    srv->stats.conns[c->transport]++;
    c->sub = sub;
    c->deadline_ms = 0;
    c->expires_s =
        id.expires_at > 0 ? (uint32_t)(id.expires_at > UINT32_MAX ? UINT32_MAX : id.expires_at) : 0;
    if (mcd_hub_subscribe(hub, c, since) != 0) {
        if (!(c->flags & MCD_CF_CLOSED) && c->state != MCD_ST_CLOSING) {
            conn_abort(c);
        }
        return;
    }
    /* Write ready (and any replay) now: a burst of new subscribers then never holds queue
     * storage at the same time. */
    start_write(c);
}

static void handle_request(mcd_conn_t *c, mcd_http_req_t *req)
{
    mcd_server_t *srv = mcd_conn_server(c);
    bool ka = req->keep_alive && !srv->stopping;
    if (req->method != HTTP_GET) {
        count_refusal(srv, 405);
        respond_json(c, 405,
                     "{\"error\":\"only GET is supported\",\"code\":\"method_not_allowed\"}", ka,
                     "Allow: GET\r\n");
        return;
    }
    const char *raw = mcd_http_req_target(req);
    mcd_http_target_t t;
    const char *why = NULL;
    if (mcd_http_target_parse(raw, req->target_len, &t, &why) != 0) {
        refuse(c, 400, "bad_request", why, false, NULL);
        return;
    }
    const char *prefix = "/v1/streams/";
    size_t plen = strlen(prefix);
    if (strcmp(t.path, "/") == 0) {
        size_t len = 0;
        const char *page = mcd_viewer_page(&len);
        respond(c, 200, "text/html; charset=utf-8", NULL, page, len, true, ka);
    } else if (strcmp(t.path, "/healthz") == 0) {
        respond_json(c, 200, "{\"status\":\"ok\"}", ka, NULL);
    } else if (strcmp(t.path, "/readyz") == 0) {
        route_readyz(c, ka);
    } else if (strcmp(t.path, "/metrics") == 0) {
        route_metrics(c, ka);
    } else if (strcmp(t.path, "/v1/streams") == 0 || strcmp(t.path, "/v1/streams/") == 0) {
        route_streams(c, ka);
    } else if (strncmp(t.path, prefix, plen) == 0) {
        mcd_hub_t *hub = mcd_server_hub(srv, t.path + plen);
        if (!hub) {
            refuse(c, 404, "unknown_stream", "no such stream", ka, NULL);
        } else if (srv->stopping) {
            refuse(c, 503, "shutting_down", "the server is shutting down", false, NULL);
        } else {
            route_subscribe(c, req, &t, hub);
        }
    } else {
        refuse(c, 404, "not_found", "no such endpoint", ka, NULL);
    }
    mcd_http_target_cleanup(&t);
}

/* ---- Reading -------------------------------------------------------------------------------- */

static void ws_input(mcd_conn_t *c, uint8_t *data, size_t len)
{
    size_t off = 0;
    while (c->state == MCD_ST_WS && !(c->flags & MCD_CF_CLOSED)) {
        mcd_ws_event_t ev;
        off += mcd_ws_parse(&c->ws, data + off, len - off, &ev);
        switch (ev.type) {
        case MCD_WS_EV_NONE: return;
        case MCD_WS_EV_DATA:
            break; /* validated by the parser; the protocol has no client messages */
        case MCD_WS_EV_PING: {
            uint8_t frame[10 + MCD_WS_MAX_CONTROL];
            size_t h = mcd_ws_frame_header(frame, MCD_WS_OP_PONG, ev.len);
            memcpy(frame + h, ev.data, ev.len);
            mcd_msg_t *m = mcd_msg_new_raw(frame, h + ev.len);
            if (!m) {
                conn_abort(c);
                return;
            }
            /* Counted against the queue limit: a client flooding pings without reading the
             * pongs is a slow consumer too. */
            mcd_conn_send(c, m, false);
            mcd_msg_unref(m);
            break;
        }
        case MCD_WS_EV_PONG: c->flags &= (uint8_t)~MCD_CF_PING_OUT; break;
        case MCD_WS_EV_CLOSE:
            ws_close(c, ev.code == MCD_WS_CLOSE_NO_STATUS ? MCD_WS_CLOSE_NORMAL : ev.code, NULL,
                     true);
            return;
        case MCD_WS_EV_ERROR:
            mc_log(MC_LOG_DEBUG, "server", "websocket protocol error code=%u: %s", ev.code,
                   ev.reason);
            ws_close(c, ev.code, ev.reason, true);
            return;
        }
    }
}

static void http_input(mcd_conn_t *c, char *data, size_t len)
{
    mcd_server_t *srv = mcd_conn_server(c);
    while (len > 0 && c->state == MCD_ST_HTTP && !(c->flags & MCD_CF_CLOSED)) {
        if (!c->req) {
            c->req = malloc(sizeof(*c->req));
            if (!c->req) {
                conn_abort(c);
                return;
            }
            mcd_http_req_init(c->req);
            c->deadline_ms = loop_now(srv) + srv->timing.request_ms;
        }
        size_t used = 0;
        mcd_http_result_t r = mcd_http_req_feed(c->req, data, len, &used);
        if (r == MCD_HTTP_MORE) {
            return;
        }
        mcd_http_req_t *req = c->req;
        c->req = NULL;
        if (r == MCD_HTTP_ERROR) {
            refuse(c, req->status, "bad_request", req->error ? req->error : "bad request", false,
                   NULL);
        } else {
            handle_request(c, req);
            data += used;
            len -= used;
            if (c->state == MCD_ST_HTTP) {
                c->deadline_ms = loop_now(srv) + srv->timing.idle_ms;
            }
        }
        mcd_http_req_cleanup(req);
        free(req);
        if (r == MCD_HTTP_ERROR) {
            return;
        }
    }
    if (len > 0 && c->state == MCD_ST_WS && !(c->flags & MCD_CF_CLOSED)) {
        ws_input(c, (uint8_t *)data, len);
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    mcd_conn_t *c = (mcd_conn_t *)h;
    mcd_server_t *srv = mcd_conn_server(c);
    /* Every read is consumed before the read callback returns, so one buffer serves all. */
    *buf = uv_buf_init(srv->rbuf, (unsigned)srv->rbuf_len);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    mcd_conn_t *c = (mcd_conn_t *)s;
    if (c->flags & MCD_CF_CLOSED) {
        return;
    }
    if (nread < 0) {
        conn_abort(c);
        return;
    }
    if (nread == 0) {
        return;
    }
    switch (c->state) {
    case MCD_ST_HTTP: http_input(c, buf->base, (size_t)nread); break;
    case MCD_ST_WS: ws_input(c, (uint8_t *)buf->base, (size_t)nread); break;
    default: break; /* SSE clients have nothing to say; closing connections are drained */
    }
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_connection(uv_stream_t *listener, int status)
{
    mcd_server_t *srv = listener->data;
    if (status < 0) {
        static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
        mc_log_ratelimited(&rl, MC_LOG_WARN, "server", "accept failed: %s", uv_strerror(status));
        return;
    }
    mcd_conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        return;
    }
    c->q = &c->q_one;
    c->q_cap = 1;
    uv_tcp_init(&srv->loop, &c->tcp);
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, free_handle);
        return;
    }
    if (srv->stopping || srv->n_conns >= srv->max_conns) {
        /* Table full: a best-effort answer without reading the request, then close. */
        static const char body[] = "{\"error\":\"connection limit reached, retry later\","
                                   "\"code\":\"too_many_connections\"}";
        char full[512];
        int n = snprintf(full, sizeof(full),
                         "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\nRetry-After: 5\r\n\r\n%s",
                         sizeof(body) - 1, body);
        uv_buf_t b = uv_buf_init(full, (unsigned)n);
        uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
        count_refusal(srv, 503);
        uv_close((uv_handle_t *)&c->tcp, free_handle);
        return;
    }
    c->state = MCD_ST_HTTP;
    c->transport = MCD_T_HTTP;
    c->table_index = srv->n_conns;
    srv->conns[srv->n_conns++] = c;
    srv->stats.conns[MCD_T_HTTP]++;
    srv->stats.accepted++;
    c->deadline_ms = loop_now(srv) + srv->timing.request_ms;
    uv_tcp_nodelay(&c->tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0) {
        conn_abort(c);
    }
}

/* ---- Timers -----------------------------------------------------------------------------------
 */

static void close_server_handles(mcd_server_t *srv)
{
    uv_close((uv_handle_t *)&srv->tick, NULL);
    uv_close((uv_handle_t *)&srv->flush_check, NULL);
    uv_close((uv_handle_t *)&srv->dispatch_async, NULL);
    uv_close((uv_handle_t *)&srv->stop_async, NULL);
}

static void on_tick(uv_timer_t *t)
{
    mcd_server_t *srv = t->data;
    int64_t now = loop_now(srv);
    int64_t wall_s = wall_ms() / 1000;
    for (uint32_t i = srv->n_conns; i-- > 0;) {
        mcd_conn_t *c = srv->conns[i];
        q_trim(c);
        switch (c->state) {
        case MCD_ST_HTTP:
            if (c->deadline_ms && now >= c->deadline_ms) {
                if (c->req) {
                    refuse(c, 408, "request_timeout", "request not complete in time", false, NULL);
                } else {
                    conn_abort(c);
                }
            }
            break;
        case MCD_ST_WS:
            if (c->expires_s && wall_s >= (int64_t)c->expires_s) {
                ws_close(c, MCD_WS_CLOSE_POLICY, "token expired", true);
            } else if ((c->flags & MCD_CF_PING_OUT) && now >= c->deadline_ms) {
                /* The peer is presumed dead: no close frame, it would not be read. */
                conn_abort(c);
            } else if (now >= c->next_beat_ms && !(c->flags & MCD_CF_PING_OUT)) {
                if (mcd_conn_send(c, &ping_msg, false) == 0) {
                    c->flags |= MCD_CF_PING_OUT;
                    c->deadline_ms = now + srv->timing.pong_ms;
                    c->next_beat_ms = now + srv->timing.ping_ms;
                }
            }
            break;
        case MCD_ST_SSE:
            if (c->expires_s && wall_s >= (int64_t)c->expires_s) {
                linger(c);
            } else if (now >= c->next_beat_ms) {
                if (mcd_conn_send(c, &heartbeat_msg, false) == 0) {
                    c->next_beat_ms = now + srv->timing.sse_ms;
                }
            }
            break;
        case MCD_ST_CLOSING:
            if (now >= c->deadline_ms) {
                conn_abort(c);
            }
            break;
        }
    }
    if (srv->stopping && srv->n_conns == 0 && !srv->stopped) {
        srv->stopped = true;
        close_server_handles(srv);
    }
}

/* ---- Engine dispatch and stop ------------------------------------------------------------------
 */

static void on_dispatch(uv_async_t *a)
{
    mcd_server_t *srv = a->data;
    if (!srv->engine || srv->engine_stopped) {
        return;
    }
    size_t n = mc_engine_dispatch(srv->engine, DISPATCH_BUDGET);
    if (n >= DISPATCH_BUDGET) {
        /* The engine only notifies on empty -> non-empty: come back for the rest after this
         * pass's I/O. */
        uv_async_send(&srv->dispatch_async);
    }
}

static void notify_cb(mc_engine_t *engine, void *userdata)
{
    (void)engine;
    mcd_server_t *srv = userdata;
    uv_async_send(&srv->dispatch_async);
}

static void on_stop(uv_async_t *a)
{
    mcd_server_t *srv = a->data;
    if (srv->stopping) {
        return;
    }
    srv->stopping = true;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    if (srv->engine && !srv->engine_stopped) {
        /* On this thread: the loop is the engine's dispatch thread. What is still queued is
         * dispatched into the subscribers' queues before their close frames. */
        srv->engine_rc = mc_engine_stop(srv->engine, &srv->engine_err);
        srv->engine_stopped = true;
    }
    const char *reason =
        srv->stop_code == MCD_WS_CLOSE_RESTART ? "server restarting" : "server shutting down";
    for (uint32_t i = srv->n_conns; i-- > 0;) {
        mcd_conn_t *c = srv->conns[i];
        switch (c->state) {
        case MCD_ST_HTTP:
            if (!c->n_writes && !c->q_len) {
                conn_abort(c);
            } else {
                linger(c);
            }
            break;
        case MCD_ST_WS: ws_close(c, srv->stop_code, reason, false); break;
        case MCD_ST_SSE:
            mcd_hub_unsubscribe(c);
            linger(c);
            break;
        default: break;
        }
    }
    uv_timer_start(&srv->tick, on_tick, 20, 20);
}

/* ---- Lifecycle --------------------------------------------------------------------------------
 */

static void parse_test_timing(mcd_timing_t *t)
{
    const char *env = getenv("MONGOCAST_TEST_TIMING");
    if (!env || !*env) {
        return;
    }
    static const struct {
        const char *name;
        size_t off;
    } keys[] = {
        {"ping_ms", offsetof(mcd_timing_t, ping_ms)},
        {"pong_ms", offsetof(mcd_timing_t, pong_ms)},
        {"sse_ms", offsetof(mcd_timing_t, sse_ms)},
        {"request_ms", offsetof(mcd_timing_t, request_ms)},
        {"idle_ms", offsetof(mcd_timing_t, idle_ms)},
        {"linger_ms", offsetof(mcd_timing_t, linger_ms)},
        {"tick_ms", offsetof(mcd_timing_t, tick_ms)},
    };
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", env);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) {
            continue;
        }
        *eq = '\0';
        char *end = NULL;
        unsigned long v = strtoul(eq + 1, &end, 10);
        if (*end || v == 0 || v > 3600000) {
            continue;
        }
        for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
            if (strcmp(tok, keys[k].name) == 0) {
                *(uint32_t *)((char *)t + keys[k].off) = (uint32_t)v;
            }
        }
    }
    mc_log(MC_LOG_WARN, "server",
           "MONGOCAST_TEST_TIMING is set (test-only): ping_ms=%u pong_ms=%u sse_ms=%u tick_ms=%u",
           t->ping_ms, t->pong_ms, t->sse_ms, t->tick_ms);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t old = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0) {
            mc_log(MC_LOG_INFO, "server", "raised open-file limit from %lu to %lu",
                   (unsigned long)old, (unsigned long)rl.rlim_max);
        }
    }
}

/* "host:port", "[v6]:port" -> sockaddr. */
static int parse_listen(const char *listen, struct sockaddr_storage *ss)
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

mcd_server_t *mcd_server_new(const mc_config_t *config, mc_error_t *err)
{
    mcd_server_t *srv = calloc(1, sizeof(*srv));
    if (!srv) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    /* A peer that disappears mid-write must cost an EPIPE, not the process. */
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    srv->config = config;
    srv->timing = default_timing;
    parse_test_timing(&srv->timing);
    srv->max_subscribers = config->server.max_connections ? config->server.max_connections : 10000;
    srv->max_conns = srv->max_subscribers + HTTP_ONLY_ROOM;
    srv->max_queue =
        config->server.max_send_queue_bytes ? config->server.max_send_queue_bytes : 1048576;
    srv->rbuf_len = READ_BUF_SIZE;
    srv->rbuf = malloc(srv->rbuf_len);
    srv->conns = calloc(srv->max_conns, sizeof(*srv->conns));
    srv->hubs = calloc(config->n_streams ? config->n_streams : 1, sizeof(*srv->hubs));
    if (!srv->rbuf || !srv->conns || !srv->hubs) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        goto fail_early;
    }
    for (size_t i = 0; i < config->n_streams; i++) {
        if (mcd_hub_init(&srv->hubs[i], srv, &config->streams[i]) != 0) {
            srv->n_hubs = i + 1;
            mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
            goto fail_early;
        }
        srv->n_hubs = i + 1;
    }
    srv->auth = mcd_auth_new(config, err);
    if (!srv->auth) {
        goto fail_early;
    }
    if (uv_loop_init(&srv->loop) != 0) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "cannot create event loop");
        goto fail_early;
    }
    srv->loop_ready = true;
    uv_tcp_init(&srv->loop, &srv->listener);
    uv_async_init(&srv->loop, &srv->dispatch_async, on_dispatch);
    uv_async_init(&srv->loop, &srv->stop_async, on_stop);
    uv_timer_init(&srv->loop, &srv->tick);
    uv_check_init(&srv->loop, &srv->flush_check);
    srv->listener.data = srv;
    srv->dispatch_async.data = srv;
    srv->stop_async.data = srv;
    srv->tick.data = srv;
    srv->flush_check.data = srv;

    const char *listen = config->server.listen ? config->server.listen : "127.0.0.1:8080";
    if (parse_listen(listen, &srv->listen_addr) != 0) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "server.listen: cannot parse '%s' (HOST:PORT)", listen);
        goto fail_loop;
    }
    uv_timer_start(&srv->tick, on_tick, srv->timing.tick_ms, srv->timing.tick_ms);
    uv_check_start(&srv->flush_check, flush_cb);
    return srv;

fail_loop:
    /* Nothing ran yet: close the handles and let the loop finish them. */
    srv->stopping = true;
    srv->stopped = true;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    close_server_handles(srv);
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    uv_loop_close(&srv->loop);
    srv->loop_ready = false;
fail_early:
    for (size_t i = 0; i < srv->n_hubs; i++) {
        mcd_hub_cleanup(&srv->hubs[i]);
    }
    mcd_auth_destroy(srv->auth);
    free(srv->hubs);
    free(srv->conns);
    free(srv->rbuf);
    free(srv);
    return NULL;
}

int mcd_server_port(const mcd_server_t *srv)
{
    return srv->port;
}

void mcd_server_engine_opts(mcd_server_t *srv, mc_engine_opts_t *opts)
{
    opts->notify = notify_cb;
    opts->notify_userdata = srv;
}

int mcd_server_attach(mcd_server_t *srv, mc_engine_t *engine, mc_error_t *err)
{
    int rc =
        mc_engine_add_sink(engine, &mcd_fanout_sink_type, "live-clients", NULL, 0, NULL, srv, err);
    if (rc == 0) {
        srv->engine = engine;
    }
    return rc;
}

static void *loop_main(void *arg)
{
    mcd_server_t *srv = arg;
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    return NULL;
}

/* Binds and listens on server.listen (on the owner's thread: the loop does not run yet). */
static int bind_listener(mcd_server_t *srv, mc_error_t *err)
{
    const char *listen = srv->config->server.listen ? srv->config->server.listen : "127.0.0.1:8080";
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
    mc_log(MC_LOG_NOTICE, "server", "server listening on %s max_connections=%u", srv->address,
           srv->max_subscribers);
    return 0;
}

int mcd_server_start(mcd_server_t *srv, mc_error_t *err)
{
    if (srv->thread_started) {
        return 0;
    }
    int rc = bind_listener(srv, err);
    if (rc != 0) {
        return rc;
    }
    if (pthread_create(&srv->thread, NULL, loop_main, srv) != 0) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno,
                            "cannot start the server thread");
    }
    srv->thread_started = true;
    return 0;
}

int mcd_server_stop(mcd_server_t *srv, uint16_t ws_code, mc_error_t *err)
{
    if (!srv || !srv->loop_ready) {
        return 0;
    }
    if (!srv->stopped || srv->thread_started) {
        srv->stop_code = ws_code ? ws_code : MCD_WS_CLOSE_GOING_AWAY;
        if (srv->thread_started) {
            uv_async_send(&srv->stop_async);
            pthread_join(srv->thread, NULL);
            srv->thread_started = false;
        } else {
            /* Never started: the caller's thread plays the loop thread for the shutdown. */
            uv_async_send(&srv->stop_async);
            uv_run(&srv->loop, UV_RUN_DEFAULT);
        }
    }
    if (srv->engine_rc != 0 && err) {
        *err = srv->engine_err;
    }
    return srv->engine_rc;
}

void mcd_server_destroy(mcd_server_t *srv)
{
    if (!srv) {
        return;
    }
    if (srv->loop_ready) {
        mcd_server_stop(srv, MCD_WS_CLOSE_GOING_AWAY, NULL);
        uv_loop_close(&srv->loop);
    }
    for (size_t i = 0; i < srv->n_hubs; i++) {
        mcd_hub_cleanup(&srv->hubs[i]);
    }
    mcd_auth_destroy(srv->auth);
    free(srv->hubs);
    free(srv->conns);
    free(srv->dirty);
    free(srv->rbuf);
    free(srv);
}
