/*
 * nats_client.c: the NATS client of the NATS sinks (nats_client.h): libnats options,
 * core and JetStream publishing, the PubAck-to-callback table, stream creation, server-list
 * checking, error classes.
 *
 * Threads: see nats_client.h. `lock` guards the in-flight table, the state and the counters;
 * it is never held while calling into libnats or into a caller's callback.
 * Invariants:
 *   - every JetStream publish that mc__nats_js_publish() accepted has one entry in `table`
 *     (keyed by its Nats-Msg-Id) until its callback is about to run; the entry is removed by
 *     whoever runs the callback (the PubAck handler, or destroy for the messages libnats
 *     hands back), so the callback runs exactly once;
 *   - destroy frees the client only when libnats can call none of our handlers any more:
 *     the table is empty, no handler is running (`in_handler`), and the closed callback ran.
 * Connections are owned by a supervisor thread: it connects (blocking, in its own thread),
 * and when libnats closes a connection for good it starts over with a new one after a
 * backoff. libnats 3.4.1 does close for good in cases its own reconnect logic cannot handle,
 * e.g. a first connect to a server that accepts TCP but never sends INFO ("no server
 * available"), or repeated authentication errors; its reconnects of an established
 * connection (MaxReconnect -1, our backoff as the delay) are used as they are.
 */
#include "sinks/nats_client.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

#define MSG_ID_HEADER "Nats-Msg-Id"
#define DESTROY_WAIT_MS 5000

typedef struct entry {
    struct entry *next;
    mc__nats_cb cb;
    void *arg;
    char id[]; /* the Nats-Msg-Id */
} entry_t;

struct mc__nats {
    mc__nats_opts_t o;
    natsOptions *nopts;

    /* The current connection and its JetStream context, NULL while there is none. Publishers
     * hold conn_lock for reading while they use them; the supervisor swaps them under the
     * write lock. */
    pthread_rwlock_t conn_lock;
    natsConnection *nc;
    jsCtx *js;
    pthread_t supervisor;
    bool supervisor_started;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    entry_t **table;
    size_t table_size; /* a power of two */
    int64_t in_flight;
    int in_handler;
    bool closing;
    bool nc_closed; /* the current connection's closed callback ran */
    mc__nats_state_t state;
    uint64_t reconnects;
    char last_error[256];
    mc__backoff_t backoff;
};

/* ---- Server lists -------------------------------------------------------------------- */

static int url_error(mc_error_t *err, size_t item, const char *what)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "nats url (server %zu): %s", item, what);
}

static bool host_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

/* One "scheme://[user[:pass]@]host[:port]" item of s[0..n). */
static int check_one(const char *s, size_t n, size_t item, mc_error_t *err)
{
    while (n > 0 && s[0] == ' ') {
        s++, n--;
    }
    while (n > 0 && s[n - 1] == ' ') {
        n--;
    }
    const char *sep = NULL;
    for (size_t i = 0; i + 2 < n; i++) {
        if (s[i] == ':' && s[i + 1] == '/' && s[i + 2] == '/') {
            sep = s + i;
            break;
        }
    }
    if (!sep) {
        return url_error(err, item, "expected nats://host[:port] or tls://host[:port]");
    }
    size_t slen = (size_t)(sep - s);
    if (!((slen == 4 && strncmp(s, "nats", 4) == 0) || (slen == 3 && strncmp(s, "tls", 3) == 0))) {
        return url_error(err, item, "the scheme must be nats or tls");
    }
    const char *p = sep + 3, *end = s + n;
    const char *at = NULL;
    for (const char *q = p; q < end; q++) {
        if (*q == '@') {
            at = q;
        }
        if ((unsigned char)*q < 0x21 || *q == '/' || *q == '?' || *q == '#') {
            if (*q == '/' && q + 1 == end) {
                end = q; /* a trailing slash is harmless */
                break;
            }
            return url_error(err, item, "spaces, control bytes, paths and queries are not allowed");
        }
    }
    if (at) {
        p = at + 1;
    }
    if (p == end) {
        return url_error(err, item, "empty host");
    }
    const char *port = NULL;
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(end - p));
        if (!rb || rb == p + 1) {
            return url_error(err, item, "bad [IPv6] host");
        }
        for (const char *q = p + 1; q < rb; q++) {
            if (!((*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f') ||
                  (*q >= 'A' && *q <= 'F') || *q == ':' || *q == '.')) {
                return url_error(err, item, "bad [IPv6] host");
            }
        }
        if (rb + 1 < end) {
            if (rb[1] != ':') {
                return url_error(err, item, "unexpected text after ]");
            }
            port = rb + 2;
        }
    } else {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        const char *hend = colon ? colon : end;
        if (hend == p) {
            return url_error(err, item, "empty host");
        }
        for (const char *q = p; q < hend; q++) {
            if (!host_byte((unsigned char)*q)) {
                return url_error(err, item, "bad host name");
            }
        }
        port = colon ? colon + 1 : NULL;
    }
    if (port) {
        long v = 0;
        if (port == end || end - port > 5) {
            return url_error(err, item, "port must be 1 to 65535");
        }
        for (const char *q = port; q < end; q++) {
            if (*q < '0' || *q > '9') {
                return url_error(err, item, "port must be 1 to 65535");
            }
            v = v * 10 + (*q - '0');
        }
        if (v < 1 || v > 65535) {
            return url_error(err, item, "port must be 1 to 65535");
        }
    }
    return 0;
}

int mc__nats_url_check(const char *urls, size_t len, mc_error_t *err)
{
    if (!urls || len == 0) {
        return url_error(err, 1, "missing");
    }
    if (memchr(urls, '\0', len)) {
        return url_error(err, 1, "contains a NUL byte");
    }
    size_t item = 1, start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || urls[i] == ',') {
            int rc = check_one(urls + start, i - start, item, err);
            if (rc != 0) {
                return rc;
            }
            item++;
            start = i + 1;
        }
    }
    return 0;
}

/* ---- Classes ----------------------------------------------------------------------------- */

mc__nats_class_t mc__nats_classify(natsStatus s, int js_code)
{
    switch (js_code) {
    case JSStreamMessageExceedsMaximumErr:
    case JSStreamWrongLastSequenceErr:
    case JSStreamSequenceNotMatchErr:
    case JSStreamNotMatchErr:
    case JSStreamInvalidErr:
    case JSStreamInvalidConfig:
    case JSBadRequestErr: return MC__NATS_PERMANENT;
    default: break;
    }
    switch (s) {
    case NATS_OK: return js_code ? MC__NATS_TRANSIENT : MC__NATS_OK;
    case NATS_MAX_PAYLOAD:
    case NATS_INVALID_SUBJECT:
    case NATS_INVALID_ARG:
    case NATS_NOT_PERMITTED: return MC__NATS_PERMANENT;
    default: return MC__NATS_TRANSIENT;
    }
}

static int status_of(mc__nats_class_t cls, natsStatus s)
{
    if (cls == MC__NATS_PERMANENT) {
        return MC_EINVAL;
    }
    if (s == NATS_CONNECTION_CLOSED) {
        return MC_ECLOSED;
    }
    if (s == NATS_NO_MEMORY) {
        return MC_ENOMEM;
    }
    return MC_EAGAIN;
}

/* ---- State (libnats threads) ------------------------------------------------------------ */

static void set_state(mc__nats_t *n, mc__nats_state_t s, const char *why)
{
    pthread_mutex_lock(&n->lock);
    n->state = s;
    if (s == MC__NATS_CONNECTED) {
        n->last_error[0] = '\0';
        mc__backoff_reset(&n->backoff);
    } else if (why) {
        snprintf(n->last_error, sizeof n->last_error, "%s", why);
    }
    bool closing = n->closing;
    pthread_mutex_unlock(&n->lock);
    if (n->o.on_state && !closing) {
        n->o.on_state(n->o.state_arg, s, why);
    }
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    mc__nats_t *n = closure;
    (void)nc;
    pthread_mutex_lock(&n->lock);
    n->reconnects++;
    pthread_mutex_unlock(&n->lock);
    set_state(n, MC__NATS_CONNECTED, NULL);
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    const char *txt = NULL;
    natsStatus s = natsConnection_GetLastError(nc, &txt);
    char why[200];
    snprintf(why, sizeof why, "disconnected: %.150s",
             txt && *txt ? txt : (s != NATS_OK ? natsStatus_GetText(s) : "connection lost"));
    set_state(closure, MC__NATS_RECONNECTING, why);
}

static void on_closed(natsConnection *nc, void *closure)
{
    mc__nats_t *n = closure;
    const char *txt = NULL;
    natsConnection_GetLastError(nc, &txt);
    char why[200];
    snprintf(why, sizeof why, "connection closed: %.150s", txt && *txt ? txt : "closed");
    set_state(n, MC__NATS_RECONNECTING, why);
    pthread_mutex_lock(&n->lock);
    n->nc_closed = true;
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->lock);
}

static void on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    (void)nc;
    (void)sub;
    mc__nats_t *n = closure;
    pthread_mutex_lock(&n->lock);
    snprintf(n->last_error, sizeof n->last_error, "%s", natsStatus_GetText(err));
    pthread_mutex_unlock(&n->lock);
}

/* libnats asks how long to wait before reconnect attempt `attempts` (also for a first
 * connect that failed): capped full jitter, as everywhere in mongocast. */
static int64_t reconnect_delay(natsConnection *nc, int attempts, void *closure)
{
    mc__nats_t *n = closure;
    (void)nc;
    (void)attempts;
    pthread_mutex_lock(&n->lock);
    int64_t d = mc__backoff_next(&n->backoff);
    pthread_mutex_unlock(&n->lock);
    return d;
}

/* ---- The in-flight table -------------------------------------------------------------------- */

static size_t hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    }
    return (size_t)h;
}

/* Removes and returns the oldest entry for `id` (locked). */
static entry_t *table_take(mc__nats_t *n, const char *id)
{
    entry_t **pp = &n->table[hash(id) & (n->table_size - 1)];
    entry_t *found = NULL, **found_pp = NULL;
    for (; *pp; pp = &(*pp)->next) {
        if (strcmp((*pp)->id, id) == 0) {
            found = *pp; /* keep looking: the last one in the chain is the oldest */
            found_pp = pp;
        }
    }
    if (found) {
        *found_pp = found->next;
        n->in_flight--;
    }
    return found;
}

static void run_cb(entry_t *e, mc__nats_outcome_t outcome, mc__nats_class_t cls, int status,
                   uint64_t seq, const char *message, int js_code)
{
    mc__nats_result_t res = {outcome, cls, status, seq, message, js_code};
    e->cb(e->arg, &res);
    free(e);
}

static void on_pub_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    mc__nats_t *n = closure;
    (void)js;
    const char *id = NULL;
    natsMsgHeader_Get(msg, MSG_ID_HEADER, &id);
    pthread_mutex_lock(&n->lock);
    n->in_handler++;
    entry_t *e = id ? table_take(n, id) : NULL;
    pthread_mutex_unlock(&n->lock);
    if (e) {
        if (pa) {
            run_cb(e, pa->Duplicate ? MC__NATS_DUPLICATE : MC__NATS_STORED, MC__NATS_OK, 0,
                   pa->Sequence, NULL, 0);
        } else {
            natsStatus s = pae ? pae->Err : NATS_ERR;
            int code = pae ? (int)pae->ErrCode : 0;
            char why[256];
            snprintf(why, sizeof why, "%s%s%.230s", natsStatus_GetText(s),
                     pae && pae->ErrText && *pae->ErrText ? ": " : "",
                     pae && pae->ErrText ? pae->ErrText : "");
            run_cb(e, MC__NATS_FAILED, mc__nats_classify(s, code), MC_EIO, 0, why, code);
        }
    }
    natsMsg_Destroy(msg);
    pthread_mutex_lock(&n->lock);
    n->in_handler--;
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->lock);
}

/* ---- Create and destroy -----------------------------------------------------------------------
 */

static void opts_defaults(mc__nats_opts_t *o)
{
    if (!o->connect_timeout_ms) {
        o->connect_timeout_ms = 5000;
    }
    if (!o->ack_timeout_ms) {
        o->ack_timeout_ms = 10000;
    }
    if (!o->ping_interval_ms) {
        o->ping_interval_ms = 10000;
    }
    if (!o->backoff_initial_ms) {
        o->backoff_initial_ms = 100;
    }
    if (!o->backoff_max_ms) {
        o->backoff_max_ms = 30000;
    }
    if (o->max_pending <= 0) {
        o->max_pending = 65536;
    }
    if (o->reconnect_buf_bytes <= 0) {
        o->reconnect_buf_bytes = 64 * 1024 * 1024;
    }
}

static mc__nats_t *create_fail(mc__nats_t *n, mc_error_t *err, natsStatus s, const char *what)
{
    const char *detail = nats_GetLastError(NULL);
    mc_error_set(err, s == NATS_NO_MEMORY ? MC_ENOMEM : MC_ECONFIG, MC_DOMAIN_MONGOCAST, (int)s,
                 "nats: %s: %s%s%.200s", what, natsStatus_GetText(s), detail && *detail ? ": " : "",
                 detail ? detail : "");
    if (n) {
        natsOptions_Destroy(n->nopts);
        free(n->table);
        pthread_rwlock_destroy(&n->conn_lock);
        pthread_cond_destroy(&n->cond);
        pthread_mutex_destroy(&n->lock);
        free(n);
    }
    return NULL;
}

/* Waits until `done(n)` holds (locked) or ms pass (ms < 0: no limit). */
static bool wait_until(mc__nats_t *n, bool (*done)(mc__nats_t *), int64_t ms)
{
    struct timespec ts;
    mc__deadline_after_ms(&ts, ms < 0 ? INT64_MAX / 4 : ms);
    while (!done(n)) {
        if (pthread_cond_timedwait(&n->cond, &n->lock, &ts) != 0) {
            return done(n);
        }
    }
    return true;
}

static bool handlers_done(mc__nats_t *n)
{
    return n->in_flight == 0 && n->in_handler == 0;
}

static bool closed_or_closing(mc__nats_t *n)
{
    return n->nc_closed || n->closing;
}

static bool nc_closed(mc__nats_t *n)
{
    return n->nc_closed;
}

/* Hands every message libnats still waits a PubAck for back to its caller (callbacks run
 * here, with `status`), then drops the JetStream context. The caller holds no lock. */
static void release_js(mc__nats_t *n, jsCtx *js, int status, const char *why)
{
    if (!js) {
        return;
    }
    pthread_mutex_lock(&n->lock);
    bool any = n->in_flight > 0;
    pthread_mutex_unlock(&n->lock);
    natsMsgList pending = {NULL, 0};
    /* Only with something in flight: libnats 3.4.1 dereferences its pending table, which
     * exists only after a first asynchronous publish. */
    if (any && js_PublishAsyncGetPendingList(&pending, js) == NATS_OK) {
        for (int k = 0; k < pending.Count; k++) {
            const char *id = NULL;
            natsMsgHeader_Get(pending.Msgs[k], MSG_ID_HEADER, &id);
            pthread_mutex_lock(&n->lock);
            entry_t *e = id ? table_take(n, id) : NULL;
            pthread_mutex_unlock(&n->lock);
            if (e) {
                run_cb(e, MC__NATS_FAILED, MC__NATS_TRANSIENT, status, 0, why, 0);
            }
        }
        natsMsgList_Destroy(&pending);
    }
    jsCtx_Destroy(js);
}

/* Opens a connection and its JetStream context (blocking, supervisor thread). */
static natsStatus open_conn(mc__nats_t *n, natsConnection **nc, jsCtx **js)
{
    *nc = NULL;
    *js = NULL;
    natsStatus s = natsConnection_Connect(nc, n->nopts);
    if (s == NATS_OK) {
        jsOptions jo;
        jsOptions_Init(&jo);
        jo.Wait = n->o.connect_timeout_ms;
        jo.PublishAsync.MaxPending = n->o.max_pending;
        jo.PublishAsync.AckHandler = on_pub_ack;
        jo.PublishAsync.AckHandlerClosure = n;
        jo.PublishAsync.StallWait = 1; /* never block the caller: past the bound, MC_EAGAIN */
        s = natsConnection_JetStream(js, *nc, &jo);
    }
    if (s != NATS_OK) {
        natsConnection_Destroy(*nc);
        *nc = NULL;
    }
    return s;
}

static void *supervisor_main(void *arg)
{
    mc__nats_t *n = arg;
    pthread_mutex_lock(&n->lock);
    while (!n->closing) {
        pthread_mutex_unlock(&n->lock);
        natsConnection *nc = NULL;
        jsCtx *js = NULL;
        natsStatus s = open_conn(n, &nc, &js);
        pthread_mutex_lock(&n->lock);
        if (s != NATS_OK) {
            const char *detail = nats_GetLastError(NULL);
            snprintf(n->last_error, sizeof n->last_error, "cannot connect: %s%s%.150s",
                     natsStatus_GetText(s), detail && *detail ? ": " : "", detail ? detail : "");
            int64_t delay = mc__backoff_next(&n->backoff);
            struct timespec ts;
            mc__deadline_after_ms(&ts, delay);
            while (!n->closing && pthread_cond_timedwait(&n->cond, &n->lock, &ts) == 0) {
            }
            continue;
        }
        n->nc_closed = false;
        pthread_mutex_unlock(&n->lock);
        pthread_rwlock_wrlock(&n->conn_lock);
        n->nc = nc;
        n->js = js;
        pthread_rwlock_unlock(&n->conn_lock);
        set_state(n, MC__NATS_CONNECTED, NULL);

        /* Until libnats gives this connection up, or destroy begins. */
        pthread_mutex_lock(&n->lock);
        wait_until(n, closed_or_closing, -1);
        if (n->closing) {
            break; /* destroy takes it from here */
        }
        pthread_mutex_unlock(&n->lock);
        pthread_rwlock_wrlock(&n->conn_lock);
        n->nc = NULL;
        n->js = NULL;
        pthread_rwlock_unlock(&n->conn_lock);
        release_js(n, js, MC_EIO, "connection closed");
        natsConnection_Destroy(nc);
        pthread_mutex_lock(&n->lock);
        int64_t delay = mc__backoff_next(&n->backoff);
        struct timespec ts;
        mc__deadline_after_ms(&ts, delay);
        while (!n->closing && pthread_cond_timedwait(&n->cond, &n->lock, &ts) == 0) {
        }
    }
    pthread_mutex_unlock(&n->lock);
    return NULL;
}

mc__nats_t *mc__nats_new(const mc__nats_opts_t *opts, mc_error_t *err)
{
    if (!opts || !opts->url) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "nats: url is required");
        return NULL;
    }
    int rc = mc__nats_url_check(opts->url, strlen(opts->url), err);
    if (rc != 0) {
        return NULL;
    }
    mc__nats_t *n = calloc(1, sizeof(*n));
    if (!n) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    n->o = *opts;
    opts_defaults(&n->o);
    pthread_mutex_init(&n->lock, NULL);
    pthread_rwlock_init(&n->conn_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&n->cond, &ca);
    pthread_condattr_destroy(&ca);
    n->table_size = 1;
    while (n->table_size < (size_t)n->o.max_pending * 2) {
        n->table_size <<= 1;
    }
    n->table = calloc(n->table_size, sizeof *n->table);
    mc__backoff_init(&n->backoff, n->o.backoff_initial_ms, n->o.backoff_max_ms,
                     (uint64_t)(uintptr_t)n ^ (uint64_t)mc__now_ms());
    if (!n->table) {
        return create_fail(n, err, NATS_NO_MEMORY, "table");
    }
    const mc__nats_opts_t *o = &n->o;
    natsStatus s = natsOptions_Create(&n->nopts);
    if (s == NATS_OK) {
        s = natsOptions_SetURL(n->nopts, o->url);
    }
    if (s == NATS_OK && o->user) {
        s = natsOptions_SetUserInfo(n->nopts, o->user, o->password ? o->password : "");
    }
    if (s == NATS_OK && o->token) {
        s = natsOptions_SetToken(n->nopts, o->token);
    }
    if (s == NATS_OK && o->nkey_public) {
        s = natsOptions_SetNKeyFromSeed(n->nopts, o->nkey_public, o->nkey_seed_file);
    }
    if (s == NATS_OK && o->creds_file) {
        s = natsOptions_SetUserCredentialsFromFiles(n->nopts, o->creds_file, NULL);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetTimeout(n->nopts, o->connect_timeout_ms);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetPingInterval(n->nopts, o->ping_interval_ms);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxPingsOut(n->nopts, 2);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxReconnect(n->nopts, -1);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetCustomReconnectDelay(n->nopts, reconnect_delay, n);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectBufSize(n->nopts, o->reconnect_buf_bytes);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetDisconnectedCB(n->nopts, on_disconnected, n);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectedCB(n->nopts, on_reconnected, n);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetClosedCB(n->nopts, on_closed, n);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetErrorHandler(n->nopts, on_async_error, n);
    }
    if (s != NATS_OK) {
        return create_fail(n, err, s, "options");
    }
    n->state = MC__NATS_CONNECTING;
    if (pthread_create(&n->supervisor, NULL, supervisor_main, n) != 0) {
        return create_fail(n, err, NATS_SYS_ERROR, "cannot start the connection thread");
    }
    n->supervisor_started = true;
    return n;
}

void mc__nats_destroy(mc__nats_t *n)
{
    if (!n) {
        return;
    }
    pthread_mutex_lock(&n->lock);
    n->closing = true;
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->lock);
    /* Bounded: the supervisor is at most inside one connect (connect_timeout_ms per server). */
    if (n->supervisor_started) {
        pthread_join(n->supervisor, NULL);
    }
    pthread_rwlock_wrlock(&n->conn_lock);
    natsConnection *nc = n->nc;
    jsCtx *js = n->js;
    n->nc = NULL;
    n->js = NULL;
    pthread_rwlock_unlock(&n->conn_lock);

    release_js(n, js, MC_ECLOSED, "client closed");
    pthread_mutex_lock(&n->lock);
    bool quiet = wait_until(n, handlers_done, DESTROY_WAIT_MS);
    pthread_mutex_unlock(&n->lock);
    if (nc) {
        natsConnection_Close(nc);
        pthread_mutex_lock(&n->lock);
        quiet = wait_until(n, nc_closed, DESTROY_WAIT_MS) && quiet;
        pthread_mutex_unlock(&n->lock);
    }
    natsConnection_Destroy(nc);
    natsOptions_Destroy(n->nopts);
    if (!quiet) {
        /* libnats might still call a handler with `n`: leaking it is the safe choice. */
        mc_log(MC_LOG_ERROR, "nats", "client not quiet after %d ms; leaking its state",
               DESTROY_WAIT_MS);
        return;
    }
    for (size_t i = 0; i < n->table_size; i++) {
        entry_t *e = n->table[i];
        while (e) {
            entry_t *next = e->next;
            run_cb(e, MC__NATS_FAILED, MC__NATS_TRANSIENT, MC_ECLOSED, 0, "client closed", 0);
            e = next;
        }
    }
    free(n->table);
    pthread_rwlock_destroy(&n->conn_lock);
    pthread_cond_destroy(&n->cond);
    pthread_mutex_destroy(&n->lock);
    free(n);
}

/* ---- Publishing ---------------------------------------------------------------------------------
 */

/* Header values: control bytes and '%' as %XX, so a value can never end its line. */
static const char *header_value(const char *v, size_t len, char *buf, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (size_t i = 0; i < len && o + 4 < cap; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c < 0x20 || c == 0x7F || c == '%') {
            buf[o++] = '%';
            buf[o++] = hex[c >> 4];
            buf[o++] = hex[c & 15];
        } else {
            buf[o++] = (char)c;
        }
    }
    buf[o] = '\0';
    return buf;
}

static natsStatus build_msg(natsMsg **msg, const char *subject, const mc__nats_headers_t *h,
                            const void *data, size_t len)
{
    natsStatus s = natsMsg_Create(msg, subject, NULL, data, (int)len);
    if (s == NATS_OK && h && h->type) {
        s = natsMsgHeader_Set(*msg, "Mongocast-Type", h->type);
    }
    if (s == NATS_OK && h && h->stream) {
        s = natsMsgHeader_Set(*msg, "Mongocast-Stream", h->stream);
    }
    if (s == NATS_OK && h && h->recipient) {
        char buf[3 * 1024 + 8];
        s = natsMsgHeader_Set(*msg, "Mongocast-Recipient",
                              header_value(h->recipient, h->recipient_len, buf, sizeof buf));
    }
    return s;
}

/* No connection right now (the supervisor is connecting): transient. */
static int not_connected(mc__nats_t *n, mc_error_t *err)
{
    char last[sizeof n->last_error];
    pthread_mutex_lock(&n->lock);
    memcpy(last, n->last_error, sizeof last);
    pthread_mutex_unlock(&n->lock);
    return mc_error_set(err, MC_EAGAIN, MC_DOMAIN_MONGOCAST, (int)NATS_CONNECTION_DISCONNECTED,
                        "nats: not connected%s%.300s (transient)", last[0] ? ": " : "", last);
}

static int publish_error(natsStatus s, int code, mc_error_t *err, const char *what)
{
    mc__nats_class_t cls = mc__nats_classify(s, code);
    int rc = status_of(cls, s);
    return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, (int)s, "nats %s: %s (%s)", what,
                        natsStatus_GetText(s),
                        cls == MC__NATS_PERMANENT ? "permanent" : "transient");
}

int mc__nats_publish(mc__nats_t *n, const char *subject, const mc__nats_headers_t *h,
                     const void *data, size_t len, mc_error_t *err)
{
    if (len > INT32_MAX) {
        return publish_error(NATS_MAX_PAYLOAD, 0, err, "publish");
    }
    natsMsg *msg = NULL;
    natsStatus s = build_msg(&msg, subject, h, data, len);
    if (s == NATS_OK) {
        pthread_rwlock_rdlock(&n->conn_lock);
        s = n->nc ? natsConnection_PublishMsg(n->nc, msg) : NATS_CONNECTION_DISCONNECTED;
        pthread_rwlock_unlock(&n->conn_lock);
    }
    natsMsg_Destroy(msg);
    if (s == NATS_CONNECTION_DISCONNECTED) {
        return not_connected(n, err);
    }
    return s == NATS_OK ? 0 : publish_error(s, 0, err, "publish");
}

int mc__nats_js_publish(mc__nats_t *n, const char *subject, const char *msg_id,
                        const char *expected_last_id, const mc__nats_headers_t *h, const void *data,
                        size_t len, mc__nats_cb cb, void *arg, mc_error_t *err)
{
    if (!msg_id || !*msg_id || !cb) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "nats: a message id and a callback are required");
    }
    if (len > INT32_MAX) {
        return publish_error(NATS_MAX_PAYLOAD, 0, err, "JetStream publish");
    }
    size_t id_len = strlen(msg_id);
    entry_t *e = malloc(sizeof(*e) + id_len + 1);
    if (!e) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    e->cb = cb;
    e->arg = arg;
    memcpy(e->id, msg_id, id_len + 1);
    pthread_mutex_lock(&n->lock);
    if (n->closing) {
        pthread_mutex_unlock(&n->lock);
        free(e);
        return MC_ECLOSED;
    }
    if (n->in_flight >= n->o.max_pending) {
        pthread_mutex_unlock(&n->lock);
        free(e);
        return MC_EAGAIN;
    }
    /* Entered before publishing: the PubAck may come back before js_PublishMsgAsync returns. */
    size_t b = hash(msg_id) & (n->table_size - 1);
    e->next = n->table[b];
    n->table[b] = e;
    n->in_flight++;
    pthread_mutex_unlock(&n->lock);

    natsMsg *msg = NULL;
    natsStatus s = build_msg(&msg, subject, h, data, len);
    if (s == NATS_OK) {
        jsPubOptions po;
        jsPubOptions_Init(&po);
        po.MsgId = msg_id;
        po.ExpectLastMsgId = expected_last_id;
        po.MaxWait = n->o.ack_timeout_ms;
        pthread_rwlock_rdlock(&n->conn_lock);
        s = n->js ? js_PublishMsgAsync(n->js, &msg, &po) : NATS_CONNECTION_DISCONNECTED;
        pthread_rwlock_unlock(&n->conn_lock);
    }
    natsMsg_Destroy(msg); /* NULL when libnats took it */
    if (s == NATS_OK) {
        return 0;
    }
    pthread_mutex_lock(&n->lock);
    entry_t *mine = table_take(n, msg_id);
    pthread_mutex_unlock(&n->lock);
    free(mine);
    if (s == NATS_CONNECTION_DISCONNECTED) {
        return not_connected(n, err);
    }
    /* A stall past StallWait means libnats's own bound of messages in flight is reached. */
    return publish_error(s == NATS_TIMEOUT ? NATS_INSUFFICIENT_BUFFER : s, 0, err,
                         "JetStream publish");
}

/* ---- Streams ----------------------------------------------------------------------------------
 */

static int ensure_stream(jsCtx *js, const char *name, const char *const *subjects, int n_subjects,
                         int64_t duplicate_window_ms, bool *created, mc_error_t *err);

int mc__nats_ensure_stream(mc__nats_t *n, const char *name, const char *const *subjects,
                           int n_subjects, int64_t duplicate_window_ms, bool *created,
                           mc_error_t *err)
{
    *created = false;
    pthread_rwlock_rdlock(&n->conn_lock);
    jsCtx *js = n->js;
    if (!js) {
        pthread_rwlock_unlock(&n->conn_lock);
        return not_connected(n, err);
    }
    int rc = ensure_stream(js, name, subjects, n_subjects, duplicate_window_ms, created, err);
    pthread_rwlock_unlock(&n->conn_lock);
    return rc;
}

static int ensure_stream(jsCtx *js, const char *name, const char *const *subjects, int n_subjects,
                         int64_t duplicate_window_ms, bool *created, mc_error_t *err)
{
    jsStreamInfo *si = NULL;
    jsErrCode code = 0;
    natsStatus s = js_GetStreamInfo(&si, js, name, NULL, &code);
    if (s == NATS_OK && si) {
        int64_t have = si->Config ? si->Config->Duplicates / 1000000 : 0;
        if (have != duplicate_window_ms) {
            mc_error_set(err, 0, MC_DOMAIN_MONGOCAST, 0,
                         "stream %s exists with a duplicate window of %" PRId64 " ms (not %" PRId64
                         " ms); left as it is",
                         name, have, duplicate_window_ms);
        }
        jsStreamInfo_Destroy(si);
        return 0;
    }
    if (s != NATS_NOT_FOUND && code != JSStreamNotFoundErr) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, (int)s,
                            "nats: cannot look up stream %s: %s (code %d)", name,
                            natsStatus_GetText(s), (int)code);
    }
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = name;
    cfg.Subjects = (const char **)subjects;
    cfg.SubjectsLen = n_subjects;
    cfg.Storage = js_FileStorage;
    cfg.Duplicates = duplicate_window_ms * 1000000;
    code = 0;
    s = js_AddStream(&si, js, &cfg, NULL, &code);
    jsStreamInfo_Destroy(si);
    if (s != NATS_OK) {
        const char *detail = nats_GetLastError(NULL);
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGOCAST, (int)code,
                            "nats: cannot create stream %s: %s (code %d) %.200s", name,
                            natsStatus_GetText(s), (int)code, detail ? detail : "");
    }
    *created = true;
    return 0;
}

void mc__nats_status(mc__nats_t *n, mc__nats_status_t *out)
{
    memset(out, 0, sizeof *out);
    if (!n) {
        out->state = MC__NATS_CLOSED;
        return;
    }
    pthread_mutex_lock(&n->lock);
    out->state = n->state;
    out->in_flight = n->in_flight;
    out->reconnects = n->reconnects;
    snprintf(out->last_error, sizeof out->last_error, "%s", n->last_error);
    pthread_mutex_unlock(&n->lock);
}
