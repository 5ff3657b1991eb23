/*
 * redis_client.c: the asynchronous Redis connection of the Redis sinks (redis_client.h):
 * hiredis's async API on our own libuv poll adapter, a queue for commands issued while
 * disconnected, the in-flight FIFO matched to replies, timeouts, reconnects with backoff.
 *
 * Thread: the loop's thread only. Invariants:
 *   - `fly` lists the commands handed to hiredis, in the order hiredis will call back (one
 *     connection, replies in order); `wait` lists commands not yet handed over. Every command
 *     is in exactly one of them until its callback runs, then it is freed;
 *   - nothing frees the hiredis context from inside a hiredis callback: failures found there
 *     set `drop_reason` and let the tick timer drop the link on the next loop pass;
 *   - one timer (`tick`) serves every deadline (connect, oldest command, next attempt) and
 *     re-arms itself for the earliest one; a timer that fires early just re-arms.
 */
#include "sinks/redis_client.h"

#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/async.h>

#include "engine_private.h"

typedef struct cmd {
    struct cmd *next;
    char *buf; /* the formatted command until it is handed to hiredis */
    size_t len;
    mc__redis_cb cb;
    void *arg;
    uint64_t queued_ms;
    uint64_t sent_ms;
    bool internal; /* AUTH / SELECT of the handshake */
} cmd_t;

typedef struct cmd_list {
    cmd_t *head, *tail;
    size_t n;
} cmd_list_t;

/* The poll adapter of one hiredis context. It outlives the context when the poll handle's
 * close is still pending, so it is a separate allocation freed by the close callback. */
typedef struct adapter {
    redisAsyncContext *ac;
    uv_poll_t poll;
    int events;
} adapter_t;

struct mc__redis {
    uv_loop_t *loop;
    mc__redis_opts_t o;
    mc__redis_state_t state;
    redisAsyncContext *ac;
    cmd_list_t wait, fly;
    uv_timer_t tick;
    uv_getaddrinfo_t gai;
    bool gai_active;
    bool resolve_overdue; /* the connect deadline passed while resolving */
    struct addrinfo *addrs, *next_addr;
    uint64_t attempt_started_ms;
    uint64_t next_attempt_ms;
    mc__backoff_t backoff;
    int handshake_left;
    const char *drop_reason; /* a deferred drop of the link (static text) */
    char reason_buf[256];
    bool closing;
    bool tick_closed;
    void (*on_closed)(void *arg);
    void *closed_arg;
    uint64_t connects, failures;
    char last_error[256];
};

static void schedule(mc__redis_t *r);
static void start_attempt(mc__redis_t *r);

void mc__redis_opts_defaults(mc__redis_opts_t *o)
{
    if (!o->connect_timeout_ms) {
        o->connect_timeout_ms = 5000;
    }
    if (!o->command_timeout_ms) {
        o->command_timeout_ms = 10000;
    }
    if (!o->backoff_initial_ms) {
        o->backoff_initial_ms = 100;
    }
    if (!o->backoff_max_ms) {
        o->backoff_max_ms = 30000;
    }
    if (!o->max_pending) {
        o->max_pending = 65536;
    }
}

/* ---- Command lists ----------------------------------------------------------------- */

static void list_push(cmd_list_t *l, cmd_t *c)
{
    c->next = NULL;
    if (l->tail) {
        l->tail->next = c;
    } else {
        l->head = c;
    }
    l->tail = c;
    l->n++;
}

static cmd_t *list_pop(cmd_list_t *l)
{
    cmd_t *c = l->head;
    if (c) {
        l->head = c->next;
        if (!l->head) {
            l->tail = NULL;
        }
        l->n--;
    }
    return c;
}

static void finish(mc__redis_t *r, cmd_t *c, const mc__redis_result_t *res)
{
    (void)r;
    if (c->cb) {
        c->cb(c->arg, res);
    }
    redisFreeCommand(c->buf);
    free(c);
}

static void fail_cmd(mc__redis_t *r, cmd_t *c, int status, bool written, const char *message)
{
    mc__redis_result_t res = {status, MC__REDIS_TRANSIENT, written, NULL, message};
    finish(r, c, &res);
}

/* ---- State ---------------------------------------------------------------------------- */

static void set_state(mc__redis_t *r, mc__redis_state_t s, const char *why)
{
    r->state = s;
    if (why) {
        snprintf(r->last_error, sizeof r->last_error, "%s", why);
    }
    if (r->o.on_state) {
        r->o.on_state(r->o.state_arg, s, why);
    }
}

/* ---- The poll adapter ------------------------------------------------------------------ */

static void on_poll(uv_poll_t *h, int status, int events)
{
    adapter_t *a = h->data;
    if (!a->ac) {
        return;
    }
    /* An error on the socket (e.g. EBADF after a reset) is left to hiredis to find: both
     * handlers read or write and report it as a disconnect. */
    if (status < 0) {
        events = UV_READABLE | UV_WRITABLE;
    }
    if (a->ac && (events & UV_READABLE)) {
        redisAsyncHandleRead(a->ac);
    }
    if (a->ac && (events & UV_WRITABLE)) {
        redisAsyncHandleWrite(a->ac);
    }
}

/* Re-arms the poll handle only when the set of events changes: hiredis asks to add write
 * interest for every command, and uv_poll_start() would otherwise cost an epoll_ctl each. */
static void adapter_update(adapter_t *a, int events)
{
    if (events == a->events) {
        return;
    }
    a->events = events;
    if (events) {
        uv_poll_start(&a->poll, events, on_poll);
    } else {
        uv_poll_stop(&a->poll);
    }
}

static void ad_add_read(void *d)
{
    adapter_t *a = d;
    adapter_update(a, a->events | UV_READABLE);
}

static void ad_del_read(void *d)
{
    adapter_t *a = d;
    adapter_update(a, a->events & ~UV_READABLE);
}

static void ad_add_write(void *d)
{
    adapter_t *a = d;
    adapter_update(a, a->events | UV_WRITABLE);
}

static void ad_del_write(void *d)
{
    adapter_t *a = d;
    adapter_update(a, a->events & ~UV_WRITABLE);
}

static void ad_closed(uv_handle_t *h)
{
    free(h->data);
}

static void ad_cleanup(void *d)
{
    adapter_t *a = d;
    a->ac = NULL;
    uv_close((uv_handle_t *)&a->poll, ad_closed);
}

static int adapter_attach(mc__redis_t *r, redisAsyncContext *ac)
{
    adapter_t *a = calloc(1, sizeof(*a));
    if (!a) {
        return MC_ENOMEM;
    }
    if (uv_poll_init(r->loop, &a->poll, ac->c.fd) != 0) {
        free(a);
        return MC_EIO;
    }
    a->ac = ac;
    a->poll.data = a;
    ac->ev.data = a;
    ac->ev.addRead = ad_add_read;
    ac->ev.delRead = ad_del_read;
    ac->ev.addWrite = ad_add_write;
    ac->ev.delWrite = ad_del_write;
    ac->ev.cleanup = ad_cleanup;
    return 0;
}

/* ---- Link failure and reconnect ---------------------------------------------------------- */

/* The connection is gone (or never came): fail what was written, count the failure, wait
 * for the next attempt. Commands that were only waiting keep waiting for it. */
static void link_down(mc__redis_t *r, const char *why)
{
    cmd_t *c;
    while ((c = list_pop(&r->fly)) != NULL) {
        if (c->internal) {
            redisFreeCommand(c->buf);
            free(c);
            continue;
        }
        fail_cmd(r, c, MC_EIO, true, why);
    }
    r->failures++;
    r->handshake_left = 0;
    if (r->closing) {
        return;
    }
    uint32_t delay = mc__backoff_next(&r->backoff);
    r->next_attempt_ms = uv_now(r->loop) + delay;
    set_state(r, MC__REDIS_DISCONNECTED, why);
    schedule(r);
}

/* Drops the link now (not from inside a hiredis callback). */
static void drop_link(mc__redis_t *r, const char *why)
{
    if (why != r->reason_buf) {
        snprintf(r->reason_buf, sizeof r->reason_buf, "%s", why);
    }
    r->drop_reason = NULL;
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    if (ac) {
        /* Runs the callbacks of the written commands with a NULL reply (reply_cb reads
         * reason_buf), then the adapter's cleanup. */
        redisAsyncFree(ac);
    }
    link_down(r, r->reason_buf);
}

/* Asks for a drop from inside a hiredis callback: the tick timer does it next pass. */
static void defer_drop(mc__redis_t *r, const char *why)
{
    snprintf(r->reason_buf, sizeof r->reason_buf, "%s", why);
    r->drop_reason = r->reason_buf;
    schedule(r);
}

/* ---- Replies ---------------------------------------------------------------------------- */

static void reply_cb(redisAsyncContext *ac, void *reply_, void *priv)
{
    mc__redis_t *r = ac->data;
    cmd_t *c = priv;
    redisReply *reply = reply_;
    /* Replies come in order, so this is the head of `fly`; a command already failed by
     * link_down() is no longer there and gets no second callback. */
    if (r->fly.head != c) {
        return;
    }
    list_pop(&r->fly);
    if (!reply) {
        /* The context is going away (error, or our own drop): the link is dead for new
         * commands from now on, even those issued by the callbacks below. */
        if (r->state == MC__REDIS_READY) {
            r->state = MC__REDIS_CONNECTING;
        }
        const char *why =
            r->reason_buf[0] ? r->reason_buf : (ac->errstr[0] ? ac->errstr : "connection lost");
        if (c->internal) {
            redisFreeCommand(c->buf);
            free(c);
        } else {
            fail_cmd(r, c, r->closing ? MC_ECLOSED : MC_EIO, true, why);
        }
        return;
    }
    mc__redis_class_t cls = mc__redis_classify(reply);
    if (c->internal) {
        if (cls != MC__REDIS_OK) {
            char why[256];
            snprintf(why, sizeof why, "handshake refused: %.200s", reply->str ? reply->str : "");
            defer_drop(r, why);
        } else if (--r->handshake_left == 0 && !r->drop_reason) {
            /* Ready: hand over what waited, oldest first. */
            r->connects++;
            mc__backoff_reset(&r->backoff);
            r->reason_buf[0] = '\0';
            set_state(r, MC__REDIS_READY, NULL);
            r->last_error[0] = '\0';
            schedule(r);
        }
        free(c);
        return;
    }
    mc__redis_result_t res = {cls == MC__REDIS_OK ? 0 : MC_ESERVER, cls, true, reply,
                              reply->type == REDIS_REPLY_ERROR ? reply->str : "OK"};
    finish(r, c, &res);
}

/* Hands a command to hiredis; false when the context refuses it (disconnecting). */
static bool send_cmd(mc__redis_t *r, cmd_t *c)
{
    if (redisAsyncFormattedCommand(r->ac, reply_cb, c, c->buf, c->len) != REDIS_OK) {
        return false;
    }
    redisFreeCommand(c->buf);
    c->buf = NULL;
    c->sent_ms = uv_now(r->loop);
    bool was_empty = r->fly.head == NULL;
    list_push(&r->fly, c);
    if (was_empty) {
        schedule(r);
    }
    return true;
}

static void flush_waiting(mc__redis_t *r)
{
    while (r->wait.head && r->state == MC__REDIS_READY && r->ac) {
        cmd_t *c = list_pop(&r->wait);
        if (!send_cmd(r, c)) {
            /* Back at the head: the link is going down and the command waits for the next. */
            c->next = r->wait.head;
            r->wait.head = c;
            if (!r->wait.tail) {
                r->wait.tail = c;
            }
            r->wait.n++;
            break;
        }
    }
}

/* ---- Connecting --------------------------------------------------------------------------- */

static int push_internal(mc__redis_t *r, int argc, const char **argv, const size_t *lens)
{
    cmd_t *c = calloc(1, sizeof(*c));
    if (!c) {
        return MC_ENOMEM;
    }
    long n = redisFormatCommandArgv(&c->buf, argc, argv, lens);
    if (n < 0) {
        free(c);
        return MC_ENOMEM;
    }
    c->len = (size_t)n;
    c->internal = true;
    if (!send_cmd(r, c)) {
        redisFreeCommand(c->buf);
        free(c);
        return MC_EIO;
    }
    r->handshake_left++;
    return 0;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    mc__redis_t *r = ac->data;
    if (r->ac != ac) {
        return;
    }
    if (status != REDIS_OK) {
        /* hiredis frees the context after this callback returns. */
        char why[256];
        snprintf(why, sizeof why, "cannot connect: %.200s", ac->errstr);
        r->ac = NULL;
        if (r->next_addr && !r->closing) {
            start_attempt(r); /* the next address of the same name, at once */
            return;
        }
        link_down(r, why);
        return;
    }
    const mc__redis_url_t *u = &r->o.url;
    int rc = 0;
    if (u->has_password) {
        const char *argv[3] = {"AUTH", u->user, u->password};
        size_t lens[3] = {4, strlen(u->user), strlen(u->password)};
        rc = u->user[0] ? push_internal(r, 3, argv, lens)
                        : push_internal(r, 2, (const char *[]){"AUTH", u->password},
                                        (const size_t[]){4, strlen(u->password)});
    }
    if (rc == 0 && u->db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", u->db);
        rc = push_internal(r, 2, (const char *[]){"SELECT", db}, (const size_t[]){6, strlen(db)});
    }
    if (rc != 0) {
        defer_drop(r, "cannot send the handshake");
        return;
    }
    if (r->handshake_left == 0) {
        r->connects++;
        mc__backoff_reset(&r->backoff);
        r->reason_buf[0] = '\0';
        set_state(r, MC__REDIS_READY, NULL);
        r->last_error[0] = '\0';
        schedule(r);
    }
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    mc__redis_t *r = ac->data;
    (void)status;
    if (r->ac != ac) {
        return; /* our own drop_link(), already handled */
    }
    char why[256];
    snprintf(why, sizeof why, "connection lost: %.200s", ac->errstr[0] ? ac->errstr : "closed");
    r->ac = NULL;
    link_down(r, why);
}

static void connect_addr(mc__redis_t *r)
{
    struct addrinfo *ai = r->next_addr;
    r->next_addr = ai->ai_next;
    char ip[64] = "";
    if (ai->ai_family == AF_INET6) {
        uv_ip6_name((const struct sockaddr_in6 *)ai->ai_addr, ip, sizeof ip);
    } else {
        uv_ip4_name((const struct sockaddr_in *)ai->ai_addr, ip, sizeof ip);
    }
    redisAsyncContext *ac = redisAsyncConnect(ip, r->o.url.port);
    if (!ac || ac->err) {
        char why[256];
        snprintf(why, sizeof why, "cannot connect: %.200s", ac ? ac->errstr : "out of memory");
        if (ac) {
            redisAsyncFree(ac);
        }
        link_down(r, why);
        return;
    }
    if (adapter_attach(r, ac) != 0) {
        redisAsyncFree(ac);
        link_down(r, "cannot watch the socket");
        return;
    }
    ac->data = r;
    r->ac = ac;
    redisEnableKeepAlive(&ac->c);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    /* Setting the connect callback arms write interest: it fires once connect() is done. */
    redisAsyncSetConnectCallback(ac, on_connect);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    mc__redis_t *r = req->data;
    r->gai_active = false;
    if (r->closing) {
        uv_freeaddrinfo(res);
        schedule(r); /* lets close finish */
        return;
    }
    if (r->resolve_overdue) {
        r->resolve_overdue = false;
        uv_freeaddrinfo(res);
        char why[256];
        snprintf(why, sizeof why, "cannot resolve %.100s within %u ms", r->o.url.host,
                 r->o.connect_timeout_ms);
        link_down(r, why);
        return;
    }
    if (status < 0 || !res) {
        char why[256];
        snprintf(why, sizeof why, "cannot resolve %.100s: %s", r->o.url.host, uv_strerror(status));
        uv_freeaddrinfo(res);
        link_down(r, why);
        return;
    }
    uv_freeaddrinfo(r->addrs);
    r->addrs = res;
    r->next_addr = res;
    connect_addr(r);
}

static void start_attempt(mc__redis_t *r)
{
    if (r->next_addr) {
        connect_addr(r);
        return;
    }
    set_state(r, MC__REDIS_CONNECTING, NULL);
    r->attempt_started_ms = uv_now(r->loop);
    r->handshake_left = 0;
    char port[8];
    snprintf(port, sizeof port, "%d", r->o.url.port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    r->gai.data = r;
    int rc = uv_getaddrinfo(r->loop, &r->gai, on_resolved, r->o.url.host, port, &hints);
    if (rc != 0) {
        char why[256];
        snprintf(why, sizeof why, "cannot resolve %.100s: %s", r->o.url.host, uv_strerror(rc));
        link_down(r, why);
        return;
    }
    r->gai_active = true;
    schedule(r);
}

/* ---- The tick timer ------------------------------------------------------------------------ */

static void tick_closed(uv_handle_t *h)
{
    mc__redis_t *r = h->data;
    r->tick_closed = true;
    schedule(r);
}

static void finish_close(mc__redis_t *r)
{
    void (*cb)(void *) = r->on_closed;
    void *arg = r->closed_arg;
    uv_freeaddrinfo(r->addrs);
    free(r);
    if (cb) {
        cb(arg);
    }
}

static void on_tick(uv_timer_t *t)
{
    mc__redis_t *r = t->data;
    uint64_t now = uv_now(r->loop);
    if (r->drop_reason) {
        drop_link(r, r->drop_reason);
    }
    if (r->state == MC__REDIS_CONNECTING &&
        now - r->attempt_started_ms >= r->o.connect_timeout_ms) {
        if (r->gai_active) {
            /* The resolver runs on libuv's thread pool and may not be cancellable any more:
             * its callback still comes, and fails the attempt. */
            r->resolve_overdue = true;
            uv_cancel((uv_req_t *)&r->gai);
        } else {
            char why[96];
            snprintf(why, sizeof why, "connect and handshake took longer than %u ms",
                     r->o.connect_timeout_ms);
            r->next_addr = NULL;
            drop_link(r, why);
        }
    }
    if (r->fly.head && now - r->fly.head->sent_ms >= r->o.command_timeout_ms) {
        char why[96];
        snprintf(why, sizeof why, "timeout: no reply within %u ms", r->o.command_timeout_ms);
        drop_link(r, why);
    }
    while (r->wait.head && now - r->wait.head->queued_ms >= r->o.command_timeout_ms) {
        char why[128];
        snprintf(why, sizeof why, "not connected within %u ms%s%.80s", r->o.command_timeout_ms,
                 r->last_error[0] ? ": " : "", r->last_error);
        fail_cmd(r, list_pop(&r->wait), MC_EIO, false, why);
    }
    if (r->state == MC__REDIS_DISCONNECTED && !r->closing && now >= r->next_attempt_ms) {
        start_attempt(r);
    }
    if (r->state == MC__REDIS_READY) {
        flush_waiting(r);
    }
    schedule(r);
}

/* Arms the tick timer for the earliest deadline, or stops it when there is none. */
static void schedule(mc__redis_t *r)
{
    if (r->closing) {
        if (r->tick_closed && !r->gai_active) {
            finish_close(r);
        }
        return;
    }
    uint64_t now = uv_now(r->loop);
    uint64_t at = UINT64_MAX;
    if (r->drop_reason || (r->state == MC__REDIS_READY && r->wait.head)) {
        at = now;
    }
    if (r->state == MC__REDIS_CONNECTING && !r->resolve_overdue &&
        r->attempt_started_ms + r->o.connect_timeout_ms < at) {
        at = r->attempt_started_ms + r->o.connect_timeout_ms;
    }
    if (r->state == MC__REDIS_DISCONNECTED && r->next_attempt_ms < at) {
        at = r->next_attempt_ms;
    }
    if (r->fly.head && r->fly.head->sent_ms + r->o.command_timeout_ms < at) {
        at = r->fly.head->sent_ms + r->o.command_timeout_ms;
    }
    if (r->wait.head && r->wait.head->queued_ms + r->o.command_timeout_ms < at) {
        at = r->wait.head->queued_ms + r->o.command_timeout_ms;
    }
    if (at == UINT64_MAX) {
        uv_timer_stop(&r->tick);
        return;
    }
    /* Never 0: a timer re-armed for "now" from its own callback runs again in the same pass
     * of libuv's timer phase, and the loop would never reach I/O (that is where a pending
     * resolution or a reply would make progress). */
    uv_timer_start(&r->tick, on_tick, at > now ? at - now : 1, 0);
}

/* ---- Public ------------------------------------------------------------------------------------
 */

mc__redis_t *mc__redis_new(uv_loop_t *loop, const mc__redis_opts_t *opts, mc_error_t *err)
{
    if (!loop || !opts || !opts->url.host[0] || opts->url.port <= 0 || opts->url.port > 65535) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "redis client: a loop and a parsed url are needed");
        return NULL;
    }
    mc__redis_t *r = calloc(1, sizeof(*r));
    if (!r) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    r->loop = loop;
    r->o = *opts;
    mc__redis_opts_defaults(&r->o);
    mc__backoff_init(&r->backoff, r->o.backoff_initial_ms, r->o.backoff_max_ms,
                     (uint64_t)(uintptr_t)r ^ uv_hrtime());
    uv_timer_init(loop, &r->tick);
    r->tick.data = r;
    start_attempt(r);
    return r;
}

int mc__redis_command(mc__redis_t *r, int argc, const char **argv, const size_t *lens,
                      mc__redis_cb cb, void *arg)
{
    if (!r || r->closing) {
        return MC_ECLOSED;
    }
    if (r->wait.n + r->fly.n >= r->o.max_pending) {
        return MC_EAGAIN;
    }
    cmd_t *c = calloc(1, sizeof(*c));
    if (!c) {
        return MC_ENOMEM;
    }
    long n = redisFormatCommandArgv(&c->buf, argc, argv, lens);
    if (n < 0) {
        free(c);
        return MC_ENOMEM;
    }
    c->len = (size_t)n;
    c->cb = cb;
    c->arg = arg;
    c->queued_ms = uv_now(r->loop);
    if (r->state == MC__REDIS_READY && r->ac && !r->wait.head && !r->drop_reason &&
        send_cmd(r, c)) {
        return 0;
    }
    bool was_empty = r->wait.head == NULL;
    list_push(&r->wait, c);
    if (was_empty) {
        schedule(r);
    }
    return 0;
}

void mc__redis_close(mc__redis_t *r, void (*on_closed)(void *arg), void *arg)
{
    if (!r || r->closing) {
        return;
    }
    r->closing = true;
    r->on_closed = on_closed;
    r->closed_arg = arg;
    snprintf(r->reason_buf, sizeof r->reason_buf, "client closed");
    redisAsyncContext *ac = r->ac;
    r->ac = NULL;
    if (ac) {
        redisAsyncFree(ac); /* written commands fail with MC_ECLOSED in reply_cb */
    }
    cmd_t *c;
    while ((c = list_pop(&r->fly)) != NULL) {
        if (c->internal) {
            redisFreeCommand(c->buf);
            free(c);
        } else {
            fail_cmd(r, c, MC_ECLOSED, true, "client closed");
        }
    }
    while ((c = list_pop(&r->wait)) != NULL) {
        fail_cmd(r, c, MC_ECLOSED, false, "client closed");
    }
    if (r->gai_active) {
        uv_cancel((uv_req_t *)&r->gai);
    }
    r->state = MC__REDIS_CLOSED;
    uv_close((uv_handle_t *)&r->tick, tick_closed);
}

void mc__redis_status(const mc__redis_t *r, mc__redis_status_t *out)
{
    memset(out, 0, sizeof *out);
    if (!r) {
        out->state = MC__REDIS_CLOSED;
        return;
    }
    out->state = r->state;
    out->pending = r->wait.n + r->fly.n;
    out->connects = r->connects;
    out->failures = r->failures;
    snprintf(out->last_error, sizeof out->last_error, "%s", r->last_error);
}
