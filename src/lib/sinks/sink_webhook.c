/*
 * sink_webhook.c: the "webhook" sink type: POSTs each event (or a batch of events) to one url,
 * signed per Standard Webhooks v1, on the engine's I/O loop (MC_SINK_ASYNC | MC_SINK_DURABLE).
 * Options and guarantees: docs/config.md, "Sink type webhook".
 *
 * Built from the clients of this directory: http_client.c (libcurl multi on the loop),
 * webhook_sign.c (signatures), webhook_format.c (bodies), key_sched.c (order per key).
 *
 * Delivery: publish() takes a reference to the event and queues it in the key scheduler;
 * flush() (after each batch of publish calls) and every finished request start what may start:
 * up to `concurrency` requests at once, each with up to batch_max_events events handed out by
 * the scheduler. A request's outcome decides for all its events: 2xx acks them
 * (mc_sink_ack), a permanent answer (3xx, 4xx other than 408/429) fails them permanently
 * (mc_sink_fail: the runner writes the dead letter), except that a batch of several events is
 * first split and each event sent alone, so that only the event the receiver refuses is
 * dead-lettered. A transient outcome (408, 429, 5xx, timeout, connection error) is retried
 * HERE, on a timer of the request, with capped full-jitter backoff from the runner's
 * `retry.initial_ms`/`retry.max_ms` and at least the receiver's Retry-After, until
 * `retry.max_attempts` / `retry.max_retry_ms` run out (then permanent, "gave up after N
 * attempts: <last error>"). The request's events stay in flight in the scheduler meanwhile,
 * so later events of the same order key wait and other keys go on (why the retries are not
 * left to the runner: its transient path re-offers every later unacknowledged event and holds
 * every key, see docs/ARCHITECTURE.md).
 *
 * Every attempt carries webhook-id (the event id; for a batch "batch_" + a digest of its
 * event ids), a fresh webhook-timestamp and the signatures of every configured secret, and
 * with lease.enabled mongocast-lease-epoch (the fencing epoch, mc_sink_lease_epoch()).
 *
 * Threads: validate/probe on the caller's thread (no state); init/destroy on the engine's;
 * start, publish, flush, drain, stop and every callback on the I/O loop thread. ctx is owned
 * by that thread from start() on: no locks.
 * Invariants: every item is in `items` (a list) from publish until it is acked, failed or
 * released at stop; an item is in the scheduler (queued or in flight) until its request's
 * outcome is final for it; at most `concurrency` requests exist; the position moves only when
 * the runner has every earlier event complete (its rule), so a crash redelivers at most what
 * was in flight, with the same webhook-id.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "engine_private.h"
#include "json_writer.h"
#include "sinks/http_client.h"
#include "sinks/key_sched.h"
#include "sinks/sink_opts.h"
#include "sinks/webhook_format.h"
#include "sinks/webhook_sign.h"

#define WH_MAX_HEADERS 32
#define WH_HEADER_MAX 4096
#define WH_MAX_CONCURRENCY 256
#define WH_MAX_BATCH 10000
#define WH_BATCH_ID_LEN 38 /* "batch_" + 32 hex digits */

typedef enum order_key {
    ORDER_RECIPIENT = 0,
    ORDER_DOCUMENT,
    ORDER_NONE,
} order_key_t;

typedef struct wh_opts {
    char *url;
    char **headers; /* "Name: value" lines */
    size_t n_headers;
    char *secrets[MC__WEBHOOK_MAX_SECRETS];
    size_t n_secrets;
    int64_t connect_timeout_ms, timeout_ms;
    bool tls_verify, http2;
    char *ca_file;
    mc__webhook_format_t format;
    char *source_prefix;
    int64_t batch_max_events, batch_max_bytes;
    int64_t concurrency;
    order_key_t order_key;
    int64_t max_pending;
} wh_opts_t;

typedef struct item {
    struct item *prev, *next; /* ctx->items */
    mc_event_t *ev;
} item_t;

typedef struct job {
    uv_timer_t timer; /* first member: its close callback frees the job */
    struct wh *w;
    struct job *prev, *next; /* ctx->jobs */
    item_t **items;
    size_t n;
    bool splitting; /* a refused batch: its events go one by one from `pos` */
    size_t pos;
    uint32_t attempts;
    int64_t first_fail_ms;
    mc__backoff_t backoff;
    mc__json_buf_t body; /* empty while the event's own message is the body */
    const char *body_ptr;
    size_t body_len;
    const char *id; /* webhook-id: the event's id, or batch_id */
    char batch_id[WH_BATCH_ID_LEN + 1];
    size_t sending; /* events of the request in flight (0: none) */
    bool timer_init, closing;
} job_t;

typedef struct wh {
    mc_sink_t *sink;
    wh_opts_t o;
    mc__http_t *http;
    mc__ksched_t *sched;
    mc__webhook_signer_t *signer;
    item_t *items; /* every item held */
    size_t n_items;
    job_t *jobs;             /* every job not freed */
    size_t requests;         /* jobs with a request in flight or a retry pending */
    item_t *carry;           /* handed out by the scheduler, did not fit the last batch */
    const char *const *hdrs; /* per-request header array scratch */
    bool stopped;
    mc_log_ratelimit_t rl;
} wh_t;

/* ---- Options --------------------------------------------------------------------------------- */

static const char *const known_opts[] = {
    "url",
    "headers",
    "secret",
    "secrets",
    "connect_timeout_ms",
    "timeout_ms",
    "tls_verify",
    "ca_file",
    "http2",
    "format",
    "source_prefix",
    "batch_max_events",
    "batch_max_bytes",
    "concurrency",
    "order_key",
    "max_pending_events",
    NULL,
};

static void opts_free(wh_opts_t *o)
{
    bson_free(o->url);
    for (size_t k = 0; k < o->n_headers; k++) {
        bson_free(o->headers[k]);
    }
    bson_free(o->headers);
    for (size_t k = 0; k < o->n_secrets; k++) {
        if (o->secrets[k]) {
            memset(o->secrets[k], 0, strlen(o->secrets[k]));
        }
        bson_free(o->secrets[k]);
    }
    bson_free(o->ca_file);
    bson_free(o->source_prefix);
    memset(o, 0, sizeof(*o));
}

static bool token_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+.^_`|~-", c) != NULL);
}

/* A custom header: a token name that the sink does not set itself, a value without control
 * bytes. Errors name the header, never its value (it may be a credential). */
static int parse_headers(bson_iter_t *it, wh_opts_t *o, mc_error_t *err)
{
    static const char *const reserved[] = {
        "webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-length",
        "host",       "transfer-encoding", "connection",        "expect",       "mongocast-lease-epoch",
        NULL};
    bson_iter_t h;
    if (!BSON_ITER_HOLDS_DOCUMENT(it) || !bson_iter_recurse(it, &h)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option headers must be a map of header names to strings");
    }
    while (bson_iter_next(&h)) {
        const char *name = bson_iter_key(&h);
        size_t nlen = strlen(name);
        bool ok = nlen > 0 && nlen <= 64;
        for (size_t k = 0; ok && k < nlen; k++) {
            ok = token_char((unsigned char)name[k]);
        }
        if (!ok) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "headers: '%.64s' is not a valid header name", name);
        }
        for (size_t k = 0; reserved[k]; k++) {
            if (strcasecmp(name, reserved[k]) == 0) {
                return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                    "headers: %s is set by the sink itself", name);
            }
        }
        uint32_t vlen = 0;
        const char *v = BSON_ITER_HOLDS_UTF8(&h) ? bson_iter_utf8(&h, &vlen) : NULL;
        ok = v && vlen <= WH_HEADER_MAX;
        for (uint32_t k = 0; ok && k < vlen; k++) {
            unsigned char c = (unsigned char)v[k];
            ok = c >= 0x20 && c != 0x7F;
        }
        if (!ok) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "headers: the value of %s must be a string of at most %d "
                                "printable bytes",
                                name, WH_HEADER_MAX);
        }
        if (o->n_headers >= WH_MAX_HEADERS) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "headers: at most %d headers", WH_MAX_HEADERS);
        }
        char **grown = bson_realloc(o->headers, (o->n_headers + 1) * sizeof(char *));
        o->headers = grown;
        o->headers[o->n_headers++] = bson_strdup_printf("%s: %s", name, v);
    }
    return 0;
}

static int parse_secret(const bson_iter_t *it, wh_opts_t *o, mc_error_t *err)
{
    if (o->n_secrets >= MC__WEBHOOK_MAX_SECRETS) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "at most %d secrets",
                            MC__WEBHOOK_MAX_SECRETS);
    }
    if (!BSON_ITER_HOLDS_UTF8(it)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "a secret must be a string \"whsec_<base64>\"");
    }
    o->secrets[o->n_secrets++] = bson_strdup(bson_iter_utf8(it, NULL));
    return 0;
}

static int parse_opts(const bson_t *options, wh_opts_t *o, mc_error_t *err)
{
    memset(o, 0, sizeof(*o));
    o->connect_timeout_ms = 5000;
    o->timeout_ms = 15000;
    o->tls_verify = true;
    o->batch_max_events = 1;
    o->batch_max_bytes = 1 << 20;
    o->concurrency = 1;
    o->order_key = ORDER_RECIPIENT;
    o->max_pending = 10000;
    bson_iter_t it;
    int rc = 0;
    bool have_secret = false, have_secrets = false;
    if (options && bson_iter_init(&it, options)) {
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (!strcmp(k, "url")) {
                rc = mc__opt_string_dup(&it, 4096, &o->url, err);
            } else if (!strcmp(k, "headers")) {
                rc = parse_headers(&it, o, err);
            } else if (!strcmp(k, "secret")) {
                have_secret = true;
                rc = parse_secret(&it, o, err);
            } else if (!strcmp(k, "secrets")) {
                have_secrets = true;
                bson_iter_t a;
                if (!BSON_ITER_HOLDS_ARRAY(&it) || !bson_iter_recurse(&it, &a)) {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option secrets must be a list of \"whsec_...\" strings");
                }
                while (rc == 0 && bson_iter_next(&a)) {
                    rc = parse_secret(&a, o, err);
                }
            } else if (!strcmp(k, "connect_timeout_ms")) {
                rc = mc__opt_int(&it, 1, 600000, &o->connect_timeout_ms, err);
            } else if (!strcmp(k, "timeout_ms")) {
                rc = mc__opt_int(&it, 1, 600000, &o->timeout_ms, err);
            } else if (!strcmp(k, "tls_verify")) {
                rc = mc__opt_bool(&it, &o->tls_verify, err);
            } else if (!strcmp(k, "ca_file")) {
                rc = mc__opt_string_dup(&it, 4096, &o->ca_file, err);
            } else if (!strcmp(k, "http2")) {
                rc = mc__opt_bool(&it, &o->http2, err);
            } else if (!strcmp(k, "format")) {
                const char *f = BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : "";
                rc = mc__webhook_format_parse(f, &o->format, err);
            } else if (!strcmp(k, "source_prefix")) {
                rc = mc__opt_string_dup(&it, 256, &o->source_prefix, err);
            } else if (!strcmp(k, "batch_max_events")) {
                rc = mc__opt_int(&it, 1, WH_MAX_BATCH, &o->batch_max_events, err);
            } else if (!strcmp(k, "batch_max_bytes")) {
                rc = mc__opt_int(&it, 1024, 64 << 20, &o->batch_max_bytes, err);
            } else if (!strcmp(k, "concurrency")) {
                rc = mc__opt_int(&it, 1, WH_MAX_CONCURRENCY, &o->concurrency, err);
            } else if (!strcmp(k, "max_pending_events")) {
                rc = mc__opt_int(&it, 1, 1000000, &o->max_pending, err);
            } else if (!strcmp(k, "order_key")) {
                const char *v = BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : "";
                if (!strcmp(v, "recipient")) {
                    o->order_key = ORDER_RECIPIENT;
                } else if (!strcmp(v, "document")) {
                    o->order_key = ORDER_DOCUMENT;
                } else if (!strcmp(v, "none")) {
                    o->order_key = ORDER_NONE;
                } else {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option order_key must be recipient, document or none");
                }
            } else {
                rc = mc__opt_unknown(k, "a webhook sink", known_opts, err);
            }
        }
    }
    if (rc == 0 && !o->url) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "option url is required (http:// or https://)");
    }
    if (rc == 0) {
        rc = mc__http_url_check(o->url, err);
    }
    if (rc == 0 && have_secret && have_secrets) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "give either secret or secrets, not both");
    }
    if (rc == 0 && o->n_secrets == 0) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "option secret (or secrets, for rotation) is required: "
                          "\"whsec_<base64 of 24 to 64 random bytes>\"");
    }
    if (rc == 0) {
        mc__webhook_signer_t *s =
            mc__webhook_signer_new((const char *const *)o->secrets, o->n_secrets, err);
        rc = s ? 0 : MC_ECONFIG;
        mc__webhook_signer_destroy(s);
    }
    if (rc == 0 && o->connect_timeout_ms > o->timeout_ms) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "connect_timeout_ms (%" PRId64 ") must not exceed timeout_ms (%" PRId64
                          ")",
                          o->connect_timeout_ms, o->timeout_ms);
    }
    if (rc != 0) {
        opts_free(o);
    }
    return rc;
}

static int wh_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    wh_opts_t o;
    int rc = parse_opts(options, &o, err);
    if (rc == 0) {
        opts_free(&o);
    }
    return rc;
}

/* ---- Probe: a TCP connection to the url's host and port -------------------------------------- */

static int wh_probe(mc_sink_t *sink, const bson_t *options, int64_t timeout_ms, mc_error_t *err)
{
    (void)sink;
    wh_opts_t o;
    int rc = parse_opts(options, &o, err);
    if (rc != 0) {
        return rc;
    }
    CURLU *u = curl_url();
    char *host = NULL, *port = NULL;
    if (!u || curl_url_set(u, CURLUPART_URL, o.url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "cannot parse url");
        goto done;
    }
    /* An IPv6 literal comes back in brackets. */
    char h[256];
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        snprintf(h, sizeof(h), "%.*s", (int)(hl - 2), host + 1);
    } else {
        snprintf(h, sizeof(h), "%s", host);
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(h, port, &hints, &res);
    if (g != 0) {
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "resolve %s: %s", h,
                          gai_strerror(g));
        goto done;
    }
    int64_t end = mc__now_ms() + (timeout_ms > 0 ? timeout_ms : o.connect_timeout_ms);
    rc = MC_EIO;
    char why[160] = "no address";
    for (struct addrinfo *a = res; a && rc != 0; a = a->ai_next) {
        int fd =
            socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            snprintf(why, sizeof(why), "%s", strerror(errno));
            continue;
        }
        int c = connect(fd, a->ai_addr, a->ai_addrlen);
        if (c != 0 && errno == EINPROGRESS) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int64_t left = end - mc__now_ms();
            int pr = poll(&p, 1, left > 0 ? (int)left : 0);
            if (pr == 0) {
                snprintf(why, sizeof(why), "no connection within %" PRId64 " ms",
                         timeout_ms > 0 ? timeout_ms : o.connect_timeout_ms);
                close(fd);
                continue;
            }
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            c = soerr ? -1 : 0;
            errno = soerr;
        }
        if (c == 0) {
            rc = 0;
        } else {
            snprintf(why, sizeof(why), "%s", strerror(errno));
        }
        close(fd);
    }
    freeaddrinfo(res);
    if (rc != 0) {
        mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "connect %s:%s: %s", h, port, why);
    }
done:
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    opts_free(&o);
    return rc;
}

/* ---- Lifecycle ------------------------------------------------------------------------------- */

static int wh_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    wh_t *w = mc_sink_ctx(sink);
    w->sink = sink;
    w->rl = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    return parse_opts(options, &w->o, err);
}

static int wh_start(mc_sink_t *sink, mc_error_t *err)
{
    wh_t *w = mc_sink_ctx(sink);
    mc__http_opts_t ho = {
        .connect_timeout_ms = (uint32_t)w->o.connect_timeout_ms,
        .timeout_ms = (uint32_t)w->o.timeout_ms,
        .insecure = !w->o.tls_verify,
        .ca_file = w->o.ca_file,
        .max_connections = w->o.concurrency,
        .http2 = w->o.http2,
    };
    w->http = mc__http_new(mc_sink_uv_loop(sink), &ho, err);
    if (!w->http) {
        return err ? err->code : MC_EIO;
    }
    /* One request at a time (concurrency 1) keeps every event in stream order: the scheduler
     * then only cuts batches, so no key is needed. */
    size_t per = (size_t)w->o.concurrency * (size_t)w->o.batch_max_events;
    w->sched = mc__ksched_new(per, (size_t)w->o.max_pending);
    w->signer = mc__webhook_signer_new((const char *const *)w->o.secrets, w->o.n_secrets, err);
    w->hdrs = bson_malloc0((w->o.n_headers + 6) * sizeof(char *));
    if (!w->sched || !w->signer) {
        return err && err->code ? err->code : MC_ENOMEM;
    }
    mc__delivery_activate(sink, 1u << MC_SINK_OUT_2XX | 1u << MC_SINK_OUT_3XX |
                                    1u << MC_SINK_OUT_4XX | 1u << MC_SINK_OUT_5XX |
                                    1u << MC_SINK_OUT_TIMEOUT | 1u << MC_SINK_OUT_CONNECTION);
    return 0;
}

static void item_release(wh_t *w, item_t *it)
{
    if (it->prev) {
        it->prev->next = it->next;
    } else {
        w->items = it->next;
    }
    if (it->next) {
        it->next->prev = it->prev;
    }
    w->n_items--;
    mc_event_unref(&it->ev);
    free(it);
}

static void job_freed(uv_handle_t *h)
{
    free(h); /* the job: its timer is its first member */
}

/* Ends a job: its events are no longer in flight (their outcomes were reported, or they are
 * left for the runner to redeliver after a restart when stopping). */
static void job_end(wh_t *w, job_t *j)
{
    for (size_t k = 0; k < j->n; k++) {
        if (j->items[k]) {
            mc__ksched_done(w->sched, j->items[k]);
            item_release(w, j->items[k]);
        }
    }
    free(j->items);
    mc__json_buf_destroy(&j->body);
    if (j->prev) {
        j->prev->next = j->next;
    } else {
        w->jobs = j->next;
    }
    if (j->next) {
        j->next->prev = j->prev;
    }
    w->requests--;
    if (j->timer_init) {
        j->closing = true;
        uv_close((uv_handle_t *)&j->timer, job_freed);
    } else {
        free(j);
    }
}

static void pump(wh_t *w);

static const void *order_key_of(const wh_t *w, mc_event_t *ev, bson_t *tmp, size_t *len,
                                bool *tmp_used)
{
    if (w->o.concurrency == 1 || w->o.order_key == ORDER_NONE) {
        return NULL;
    }
    if (w->o.order_key == ORDER_RECIPIENT) {
        const uint8_t *id = mc_event_recipient_identity(ev, len);
        return id && *len ? id : NULL;
    }
    /* document: namespace and documentKey, as bytes. */
    const bson_t *dk = mc_event_document_key(ev);
    const char *db = mc_event_db(ev), *coll = mc_event_coll(ev);
    if (!dk || !db) {
        return NULL;
    }
    bson_init(tmp);
    *tmp_used = true;
    BSON_APPEND_UTF8(tmp, "d", db);
    BSON_APPEND_UTF8(tmp, "c", coll ? coll : "");
    BSON_APPEND_DOCUMENT(tmp, "k", dk);
    *len = tmp->len;
    return bson_get_data(tmp);
}

static int wh_publish(mc_sink_t *sink, mc_event_t *ev)
{
    wh_t *w = mc_sink_ctx(sink);
    const char *id = mc_event_id(ev);
    if (!id || !*id) {
        return MC_SINK_SKIP; /* ready/reset/error: no id, no place in a webhook stream */
    }
    if (w->stopped) {
        return MC_EAGAIN;
    }
    item_t *it = calloc(1, sizeof(*it));
    if (!it) {
        return MC_EAGAIN;
    }
    it->ev = mc_event_ref(ev);
    bson_t tmp;
    bool tmp_used = false;
    size_t klen = 0;
    const void *key = order_key_of(w, ev, &tmp, &klen, &tmp_used);
    int rc = mc__ksched_push(w->sched, key, klen, it);
    if (tmp_used) {
        bson_destroy(&tmp);
    }
    if (rc != 0) {
        mc_event_unref(&it->ev);
        free(it);
        return MC_EAGAIN; /* max_pending_events held: the runner offers it again soon */
    }
    it->next = w->items;
    if (w->items) {
        w->items->prev = it;
    }
    w->items = it;
    w->n_items++;
    return 0;
}

static void wh_flush(mc_sink_t *sink)
{
    pump(mc_sink_ctx(sink));
}

/* ---- Requests -------------------------------------------------------------------------------- */

/* The body of the request about to go: the whole job, or its event `pos` when splitting. */
static int build_body(wh_t *w, job_t *j, item_t **evs, size_t n)
{
    bool batch = w->o.batch_max_events > 1;
    mc__json_buf_destroy(&j->body);
    mc__json_buf_init(&j->body, 0, 0);
    if (!batch && w->o.format == MC__WEBHOOK_MESSAGE) {
        /* The event's cached message is the body: no copy. */
        size_t len = 0;
        j->body_ptr = mc_event_json(evs[0]->ev, &len);
        j->body_len = len;
        return j->body_ptr ? 0 : MC_ENOMEM;
    }
    if (batch) {
        MC__JSON_LIT(&j->body, "[");
    }
    for (size_t k = 0; k < n; k++) {
        if (k) {
            MC__JSON_LIT(&j->body, ",");
        }
        int rc = mc__webhook_body_append(&j->body, evs[k]->ev, w->o.format, w->o.source_prefix);
        if (rc != 0) {
            return rc;
        }
    }
    if (batch) {
        MC__JSON_LIT(&j->body, "]");
    }
    if (j->body.err != MC__JSON_OK) {
        return MC_ENOMEM;
    }
    j->body_ptr = j->body.data;
    j->body_len = j->body.len;
    return 0;
}

/* webhook-id: the event id alone; a batch's is "batch_" and 32 hex digits of SHA-256 over its
 * event ids, so that the same events always make the same id (receivers dedupe on it) and
 * different batches never share one. */
static void make_id(wh_t *w, job_t *j, item_t **evs, size_t n)
{
    if (w->o.batch_max_events == 1) {
        j->id = mc_event_id(evs[0]->ev);
        return;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    bool ok = c && EVP_DigestInit_ex(c, EVP_sha256(), NULL) == 1;
    for (size_t k = 0; ok && k < n; k++) {
        const char *id = mc_event_id(evs[k]->ev);
        ok = EVP_DigestUpdate(c, id, strlen(id) + 1) == 1;
    }
    ok = ok && EVP_DigestFinal_ex(c, md, &mdlen) == 1 && mdlen >= 16;
    EVP_MD_CTX_free(c);
    if (!ok) {
        memset(md, 0, sizeof(md)); /* not reached in practice; still a valid, stable id */
    }
    static const char hex[] = "0123456789abcdef";
    memcpy(j->batch_id, "batch_", 6);
    for (size_t k = 0; k < 16; k++) {
        j->batch_id[6 + 2 * k] = hex[md[k] >> 4];
        j->batch_id[7 + 2 * k] = hex[md[k] & 15];
    }
    j->batch_id[WH_BATCH_ID_LEN] = '\0';
    j->id = j->batch_id;
}

static void on_response(void *arg, const mc__http_result_t *res);
static void on_retry(uv_timer_t *t);

static void start_timer(wh_t *w, job_t *j, int64_t delay_ms)
{
    if (!j->timer_init) {
        uv_timer_init(mc_sink_uv_loop(w->sink), &j->timer);
        j->timer.data = j;
        j->timer_init = true;
    }
    uv_timer_start(&j->timer, on_retry, (uint64_t)delay_ms, 0);
}

/* The runner's counter of offers again (mongocast_sink_retries_total): this sink retries
 * itself, on the same executor thread that the runner writes it from. */
static void bump_retries(mc_sink_t *sink)
{
    atomic_store_explicit(&sink->stat_retries,
                          atomic_load_explicit(&sink->stat_retries, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* The final outcome of events evs[0..n) of job j: ack, or a permanent failure with `why`. */
static void settle(wh_t *w, job_t *j, size_t from, size_t n, bool ok, const char *why)
{
    for (size_t k = from; k < from + n; k++) {
        item_t *it = j->items[k];
        if (ok) {
            mc_sink_ack(w->sink, it->ev);
        } else {
            mc_sink_fail(w->sink, it->ev, MC_SINK_PERMANENT, 0, "%s", why);
        }
        mc__ksched_done(w->sched, it);
        item_release(w, it);
        j->items[k] = NULL;
    }
}

static void attempt(wh_t *w, job_t *j)
{
    size_t from = j->splitting ? j->pos : 0;
    size_t n = j->splitting ? 1 : j->n;
    item_t **evs = j->items + from;
    if (j->attempts == 0 || j->splitting) {
        if (build_body(w, j, evs, n) != 0) {
            settle(w, j, from, n, false, "cannot render the body (invalid UTF-8 or too large)");
            goto next;
        }
        make_id(w, j, evs, n);
    }
    int64_t ts = mc__wall_ms() / 1000;
    char sig[MC__WEBHOOK_SIG_HEADER_MAX];
    size_t siglen = 0;
    mc_error_t err = {0};
    if (mc__webhook_sign(w->signer, j->id, strlen(j->id), ts, j->body_ptr, j->body_len, sig,
                         &siglen, &err) != 0) {
        settle(w, j, from, n, false, err.message);
        goto next;
    }
    char h_ts[48], h_sig[MC__WEBHOOK_SIG_HEADER_MAX + 24], h_ct[96];
    char *h_id = bson_strdup_printf("webhook-id: %s", j->id);
    snprintf(h_ts, sizeof(h_ts), "webhook-timestamp: %" PRId64, ts);
    snprintf(h_sig, sizeof(h_sig), "webhook-signature: %s", sig);
    snprintf(h_ct, sizeof(h_ct), "Content-Type: %s",
             mc__webhook_content_type(w->o.format, w->o.batch_max_events > 1));
    const char **hdrs = (const char **)w->hdrs;
    size_t h = 0;
    hdrs[h++] = h_ct;
    hdrs[h++] = h_id;
    hdrs[h++] = h_ts;
    hdrs[h++] = h_sig;
    for (size_t k = 0; k < w->o.n_headers; k++) {
        hdrs[h++] = w->o.headers[k];
    }
    /* lease.enabled: the fencing epoch this node sends under (of the first event's stream). */
    char h_epoch[64];
    uint64_t epoch = mc_sink_lease_epoch(w->sink, evs[0]->ev);
    if (epoch > 0) {
        snprintf(h_epoch, sizeof(h_epoch), "mongocast-lease-epoch: %" PRIu64, epoch);
        hdrs[h++] = h_epoch; /* room: hdrs holds n_headers + 6 */
    }
    hdrs[h] = NULL;
    mc__http_request_t rq = {w->o.url, hdrs, j->body_ptr, j->body_len};
    int prc = mc__http_post(w->http, &rq, on_response, j); /* copies the headers */
    bson_free(h_id);
    if (prc != 0) {
        /* Out of memory (or closed: stopping): try again shortly; at stop the events are
         * left to the restart. */
        if (!w->stopped) {
            start_timer(w, j, 100);
        }
        return;
    }
    j->attempts++;
    j->sending = n;
    mc__delivery_sent(w->sink, n);
    return;
next:
    if (j->splitting && ++j->pos < j->n) {
        j->attempts = 0;
        attempt(w, j);
    } else {
        job_end(w, j);
    }
}

static void on_retry(uv_timer_t *t)
{
    job_t *j = t->data;
    if (!j->w->stopped) {
        attempt(j->w, j);
    }
}

static mc_sink_outcome_t outcome_of(const mc__http_result_t *res)
{
    if (res->http_status >= 200 && res->http_status < 600) {
        return (mc_sink_outcome_t)(MC_SINK_OUT_2XX + (res->http_status / 100 - 2));
    }
    return res->timed_out ? MC_SINK_OUT_TIMEOUT : MC_SINK_OUT_CONNECTION;
}

static bool exhausted(const wh_t *w, const job_t *j, int64_t now)
{
    const mc_sink_runner_opts_t *o = &w->sink->ropts;
    return (o->max_attempts && j->attempts >= o->max_attempts) ||
           (o->max_retry_ms && now - j->first_fail_ms >= (int64_t)o->max_retry_ms);
}

static void on_response(void *arg, const mc__http_result_t *res)
{
    job_t *j = arg;
    wh_t *w = j->w;
    size_t n = j->sending;
    size_t from = j->splitting ? j->pos : 0;
    j->sending = 0;
    if (res->status == MC_ECLOSED) {
        /* Stopping: these events stay unacknowledged and are delivered again after the
         * restart, with the same webhook-id. */
        mc__delivery_done(w->sink, n, res->seconds, MC_SINK_OUT_CONNECTION, 0);
        job_end(w, j);
        return;
    }
    mc__delivery_done(w->sink, n, res->seconds, outcome_of(res), 1);
    if (res->cls == MC__HTTP_OK) {
        settle(w, j, from, n, true, NULL);
    } else if (res->cls == MC__HTTP_PERMANENT && n > 1) {
        /* A refused batch: send its events one at a time, so that only the refused one goes
         * to the dead letter. */
        j->splitting = true;
        j->pos = 0;
        j->attempts = 0;
        mc__backoff_reset(&j->backoff);
        attempt(w, j);
        pump(w);
        return;
    } else if (res->cls == MC__HTTP_PERMANENT) {
        settle(w, j, from, n, false, res->message);
    } else {
        int64_t now = mc__now_ms();
        if (j->first_fail_ms == 0) {
            j->first_fail_ms = now;
        }
        if (exhausted(w, j, now)) {
            char why[400];
            snprintf(why, sizeof(why), "gave up after %u attempts: %s", j->attempts, res->message);
            settle(w, j, from, n, false, why);
        } else {
            int64_t delay = mc__backoff_next(&j->backoff);
            if (res->retry_after_ms > delay) {
                delay = res->retry_after_ms;
            }
            bump_retries(w->sink);
            mc_log_ratelimited(&w->rl, MC_LOG_WARN, "webhook",
                               "delivery failed sink=%s id=%s attempt=%u retry_in_ms=%" PRId64
                               ": %s",
                               w->sink->name, j->id, j->attempts, delay, res->message);
            start_timer(w, j, delay);
            return;
        }
    }
    /* This request's events are final: the next event of a split batch, or the job ends. */
    if (j->splitting && ++j->pos < j->n) {
        j->attempts = 0;
        j->first_fail_ms = 0;
        mc__backoff_reset(&j->backoff);
        attempt(w, j);
    } else {
        job_end(w, j);
    }
    pump(w);
}

/* Starts requests while fewer than `concurrency` exist and the scheduler hands out events. */
static void pump(wh_t *w)
{
    while (!w->stopped && w->requests < (size_t)w->o.concurrency) {
        item_t *first = w->carry ? w->carry : mc__ksched_next(w->sched);
        w->carry = NULL;
        if (!first) {
            return;
        }
        size_t cap = (size_t)w->o.batch_max_events;
        job_t *j = calloc(1, sizeof(*j));
        item_t **items = calloc(cap, sizeof(item_t *));
        if (!j || !items) {
            free(j);
            free(items);
            w->carry = first;
            return;
        }
        j->w = w;
        j->items = items;
        j->items[j->n++] = first;
        size_t bytes = 0;
        mc_event_json(first->ev, &bytes);
        while (j->n < cap) {
            item_t *it = mc__ksched_next(w->sched);
            if (!it) {
                break;
            }
            size_t len = 0;
            mc_event_json(it->ev, &len);
            if (bytes + len > (size_t)w->o.batch_max_bytes) {
                w->carry = it;
                break;
            }
            bytes += len;
            j->items[j->n++] = it;
        }
        const mc_sink_runner_opts_t *ro = &w->sink->ropts;
        mc__backoff_init(&j->backoff, ro->retry_initial_ms ? ro->retry_initial_ms : 100,
                         ro->retry_max_ms ? ro->retry_max_ms : 30000,
                         (uint64_t)mc__wall_ms() * 2654435761u + (uint64_t)(uintptr_t)j);
        mc__json_buf_init(&j->body, 0, 0);
        j->next = w->jobs;
        if (w->jobs) {
            w->jobs->prev = j;
        }
        w->jobs = j;
        w->requests++;
        attempt(w, j);
    }
}

static int wh_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)deadline_ms;
    pump(mc_sink_ctx(sink)); /* the engine runs the loop until the acks are in */
    return 0;
}

static void wh_stop(mc_sink_t *sink)
{
    wh_t *w = mc_sink_ctx(sink);
    w->stopped = true;
    /* Requests in flight end with MC_ECLOSED (job_end through on_response); jobs waiting for
     * a retry end here. Their events stay unacknowledged: redelivered after a restart. */
    mc__http_close(w->http, NULL, NULL);
    w->http = NULL;
    while (w->jobs) {
        job_end(w, w->jobs);
    }
    if (w->carry) {
        mc__ksched_done(w->sched, w->carry);
        w->carry = NULL;
    }
    while (w->items) {
        item_release(w, w->items);
    }
}

static void wh_destroy(mc_sink_t *sink)
{
    wh_t *w = mc_sink_ctx(sink);
    if (!w->stopped && w->http) {
        /* Never started on a loop that ran: nothing in flight. */
        mc__http_close(w->http, NULL, NULL);
    }
    while (w->items) {
        item_release(w, w->items);
    }
    mc__ksched_destroy(w->sched);
    mc__webhook_signer_destroy(w->signer);
    bson_free((void *)w->hdrs);
    opts_free(&w->o);
}

const mc_sink_type_t mc__sink_webhook_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "webhook",
    .flags = MC_SINK_DURABLE | MC_SINK_ASYNC,
    .ctx_size = sizeof(wh_t),
    .init = wh_init,
    .start = wh_start,
    .publish = wh_publish,
    .flush = wh_flush,
    .drain = wh_drain,
    .destroy = wh_destroy,
    .validate = wh_validate,
    .stop = wh_stop,
    .probe = wh_probe,
};
