/*
 * http_client.c: POST requests on libcurl's multi interface driven by a libuv loop
 * (http_client.h): the socket and timer callbacks of curl_multi_socket_action(), request
 * setup, completion, classes, url checks.
 *
 * Thread: the loop's thread only. Invariants:
 *   - every request started by mc__http_post() is in the `reqs` list and attached to the multi
 *     handle until it completes or close fails it; its callback runs exactly once, then the
 *     easy handle goes back to a small free list (connections live in the multi handle's
 *     cache, so reusing easy handles only saves allocations);
 *   - curl's "time out now" (timeout 0) is served by an idle handle in the next loop pass, not
 *     by a 0 ms timer: a timer re-armed for 0 from its own callback would run again in the same
 *     timer phase, and a 1 ms timer would add a millisecond to every request;
 *   - the client is freed only after every libuv handle it opened has been closed.
 */
#include "sinks/http_client.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FREE_EASY_MAX 64

typedef struct req {
    struct req *prev, *next;
    mc__http_t *h;
    CURL *easy;
    struct curl_slist *hdrs;
    mc__http_cb cb;
    void *arg;
    char errbuf[CURL_ERROR_SIZE];
    char body_head[MC__HTTP_ERROR_BODY_MAX + 1];
    size_t body_head_len;
} req_t;

typedef struct sock {
    uv_poll_t poll; /* first: the handle's address is the sock's */
    curl_socket_t fd;
    mc__http_t *h;
    struct sock *prev, *next;
} sock_t;

struct mc__http {
    uv_loop_t *loop;
    mc__http_opts_t o;
    char *ca_file;
    CURLM *multi;
    uv_timer_t timer;
    uv_idle_t idle; /* curl asked for "now" */
    req_t *reqs;
    size_t n_reqs;
    sock_t *socks; /* sockets curl asked us to watch */
    CURL *free_easy[FREE_EASY_MAX];
    size_t n_free_easy;
    int open_handles;
    bool closing;
    void (*on_closed)(void *arg);
    void *closed_arg;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* ---- Classes and urls ---------------------------------------------------------------- */

mc__http_class_t mc__http_classify(long status, CURLcode code)
{
    if (code != CURLE_OK || status == 0) {
        /* No complete response: the network, DNS, TLS or a timeout, never the event. */
        return MC__HTTP_TRANSIENT;
    }
    if (status >= 200 && status < 300) {
        return MC__HTTP_OK;
    }
    if (status == 408 || status == 429 || status >= 500) {
        return MC__HTTP_TRANSIENT;
    }
    return MC__HTTP_PERMANENT; /* 1xx as a final answer, 3xx (not followed), other 4xx */
}

int mc__http_url_check(const char *url, mc_error_t *err)
{
    pthread_once(&curl_once, curl_init);
    if (!url || !*url) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "url is missing");
    }
    CURLU *u = curl_url();
    if (!u) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    int rc = 0;
    char *scheme = NULL, *host = NULL, *user = NULL, *password = NULL;
    CURLUcode uc = curl_url_set(u, CURLUPART_URL, url, 0);
    if (uc != CURLUE_OK) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "url: %s",
                          curl_url_strerror(uc));
        goto out;
    }
    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    curl_url_get(u, CURLUPART_HOST, &host, 0);
    curl_url_get(u, CURLUPART_USER, &user, 0);
    curl_url_get(u, CURLUPART_PASSWORD, &password, 0);
    if (!scheme || (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "url: the scheme must be http or https");
    } else if (!host || !*host) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "url: no host");
    } else if (user || password) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "url: credentials in the url are refused (use headers)");
    }
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(user);
    curl_free(password);
    curl_url_cleanup(u);
    return rc;
}

/* ---- Handles ------------------------------------------------------------------------------ */

static void handle_closed(uv_handle_t *hd)
{
    mc__http_t *h = hd->data;
    if (hd->type == UV_POLL) {
        free(hd); /* the sock_t */
    }
    if (--h->open_handles == 0 && h->closing) {
        void (*cb)(void *) = h->on_closed;
        void *arg = h->closed_arg;
        free(h->ca_file);
        free(h);
        if (cb) {
            cb(arg);
        }
    }
}

static void check_done(mc__http_t *h);

static void on_poll(uv_poll_t *p, int status, int events)
{
    sock_t *s = (sock_t *)p;
    mc__http_t *h = s->h;
    int flags = 0;
    if (status < 0) {
        flags = CURL_CSELECT_ERR;
    } else {
        flags |= (events & UV_READABLE) ? CURL_CSELECT_IN : 0;
        flags |= (events & UV_WRITABLE) ? CURL_CSELECT_OUT : 0;
    }
    int running = 0;
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    check_done(h);
}

static void sock_close(mc__http_t *h, sock_t *s)
{
    if (s->prev) {
        s->prev->next = s->next;
    } else {
        h->socks = s->next;
    }
    if (s->next) {
        s->next->prev = s->prev;
    }
    uv_poll_stop(&s->poll);
    uv_close((uv_handle_t *)&s->poll, handle_closed);
}

/* curl closes a socket: drop its handle first (libuv must forget the fd before the number
 * can be reused by a new socket). */
static int close_socket(void *clientp, curl_socket_t fd)
{
    mc__http_t *h = clientp;
    for (sock_t *s = h->socks; s; s = s->next) {
        if (s->fd == fd) {
            sock_close(h, s);
            if (h->multi) {
                curl_multi_assign(h->multi, fd, NULL);
            }
            break;
        }
    }
    return close(fd);
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)easy;
    mc__http_t *h = userp;
    sock_t *s = socketp;
    if (what == CURL_POLL_REMOVE) {
        /* curl is done with the socket for now (e.g. an idle kept-alive connection); the
         * handle stays until curl closes the socket (close_socket), so a reused connection
         * costs no new handle. */
        if (s) {
            uv_poll_stop(&s->poll);
        }
        return 0;
    }
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || uv_poll_init_socket(h->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->fd = fd;
        s->h = h;
        s->poll.data = h;
        s->next = h->socks;
        if (h->socks) {
            h->socks->prev = s;
        }
        h->socks = s;
        h->open_handles++;
        curl_multi_assign(h->multi, fd, s);
    }
    int events = 0;
    events |= (what & CURL_POLL_IN) ? UV_READABLE : 0;
    events |= (what & CURL_POLL_OUT) ? UV_WRITABLE : 0;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void run_timeout(mc__http_t *h)
{
    int running = 0;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(h);
}

static void on_timer(uv_timer_t *t)
{
    run_timeout(t->data);
}

static void on_idle(uv_idle_t *i)
{
    mc__http_t *h = i->data;
    uv_idle_stop(i);
    run_timeout(h);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    mc__http_t *h = userp;
    if (h->closing) {
        return 0;
    }
    if (timeout_ms < 0) {
        uv_timer_stop(&h->timer);
        uv_idle_stop(&h->idle);
    } else if (timeout_ms == 0) {
        uv_timer_stop(&h->timer);
        uv_idle_start(&h->idle, on_idle);
    } else {
        uv_idle_stop(&h->idle);
        uv_timer_start(&h->timer, on_timer, (uint64_t)timeout_ms, 0);
    }
    return 0;
}

/* ---- Requests -------------------------------------------------------------------------- */

static size_t on_body(char *data, size_t size, size_t n, void *userp)
{
    req_t *r = userp;
    size_t len = size * n;
    size_t room = MC__HTTP_ERROR_BODY_MAX - r->body_head_len;
    size_t take = len < room ? len : room;
    memcpy(r->body_head + r->body_head_len, data, take);
    r->body_head_len += take;
    r->body_head[r->body_head_len] = '\0';
    return len; /* the rest is read and dropped: the connection stays reusable */
}

static void list_remove(mc__http_t *h, req_t *r)
{
    if (r->prev) {
        r->prev->next = r->next;
    } else {
        h->reqs = r->next;
    }
    if (r->next) {
        r->next->prev = r->prev;
    }
    h->n_reqs--;
}

static void recycle(mc__http_t *h, req_t *r)
{
    curl_slist_free_all(r->hdrs);
    if (r->easy) {
        if (h->n_free_easy < FREE_EASY_MAX && !h->closing) {
            curl_easy_reset(r->easy);
            h->free_easy[h->n_free_easy++] = r->easy;
        } else {
            curl_easy_cleanup(r->easy);
        }
    }
    free(r);
}

/* Makes the printable message of a finished request. */
static void message_of(const req_t *r, CURLcode code, long status, char *buf, size_t cap)
{
    if (code != CURLE_OK) {
        snprintf(buf, cap, "%s: %.200s", curl_easy_strerror(code),
                 r->errbuf[0] ? r->errbuf : "no detail");
        return;
    }
    /* The body is the receiver's text: keep it printable for logs. */
    char body[MC__HTTP_ERROR_BODY_MAX + 1];
    size_t k = 0;
    for (; k < r->body_head_len; k++) {
        unsigned char c = (unsigned char)r->body_head[k];
        body[k] = c >= 0x20 && c < 0x7F ? (char)c : '?';
    }
    body[k] = '\0';
    snprintf(buf, cap, "HTTP %ld%s%s", status, k ? ": " : "", body);
}

static void check_done(mc__http_t *h)
{
    CURLMsg *m;
    int left = 0;
    while ((m = curl_multi_info_read(h->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE) {
            continue;
        }
        req_t *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        CURLcode code = m->data.result;
        long status = 0;
        curl_off_t retry_after = -1;
        double secs = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(r->easy, CURLINFO_TOTAL_TIME, &secs);
        if (curl_easy_getinfo(r->easy, CURLINFO_RETRY_AFTER, &retry_after) != CURLE_OK ||
            retry_after <= 0) {
            retry_after = -1;
        }
        curl_multi_remove_handle(h->multi, r->easy);
        list_remove(h, r);
        char msg[320];
        message_of(r, code, status, msg, sizeof msg);
        int64_t ra = -1;
        if (retry_after > 0) {
            ra = (int64_t)retry_after * 1000;
            ra = ra > MC__HTTP_MAX_RETRY_AFTER_MS ? MC__HTTP_MAX_RETRY_AFTER_MS : ra;
        }
        mc__http_result_t res = {code == CURLE_OK ? 0 : MC_EIO,
                                 code == CURLE_OK ? status : 0,
                                 mc__http_classify(code == CURLE_OK ? status : 0, code),
                                 ra,
                                 secs,
                                 msg,
                                 code == CURLE_OPERATION_TIMEDOUT};
        r->cb(r->arg, &res);
        recycle(h, r);
    }
}

mc__http_t *mc__http_new(uv_loop_t *loop, const mc__http_opts_t *opts, mc_error_t *err)
{
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK) {
        mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, (int)curl_init_rc,
                     "libcurl initialisation failed: %s", curl_easy_strerror(curl_init_rc));
        return NULL;
    }
    mc__http_t *h = calloc(1, sizeof(*h));
    if (!h) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    h->loop = loop;
    if (opts) {
        h->o = *opts;
    }
    if (!h->o.connect_timeout_ms) {
        h->o.connect_timeout_ms = 5000;
    }
    if (!h->o.timeout_ms) {
        h->o.timeout_ms = 15000;
    }
    if (h->o.max_connections <= 0) {
        h->o.max_connections = 64;
    }
    h->ca_file = h->o.ca_file ? strdup(h->o.ca_file) : NULL;
    h->o.ca_file = h->ca_file;
    h->multi = curl_multi_init();
    if (!h->multi) {
        free(h->ca_file);
        free(h);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "curl_multi_init failed");
        return NULL;
    }
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, h->o.max_connections);
    curl_multi_setopt(h->multi, CURLMOPT_MAX_HOST_CONNECTIONS, h->o.max_connections);
    curl_multi_setopt(h->multi, CURLMOPT_MAXCONNECTS, h->o.max_connections);
    curl_multi_setopt(h->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    uv_idle_init(loop, &h->idle);
    h->idle.data = h;
    h->open_handles = 2;
    return h;
}

int mc__http_post(mc__http_t *h, const mc__http_request_t *rq, mc__http_cb cb, void *arg)
{
    if (!h || h->closing) {
        return MC_ECLOSED;
    }
    req_t *r = calloc(1, sizeof(*r));
    if (!r) {
        return MC_ENOMEM;
    }
    r->h = h;
    r->cb = cb;
    r->arg = arg;
    r->easy = h->n_free_easy ? h->free_easy[--h->n_free_easy] : curl_easy_init();
    if (!r->easy) {
        free(r);
        return MC_ENOMEM;
    }
    /* No "Expect: 100-continue": it would cost a round trip (or a 1 s wait) per request. */
    struct curl_slist *l = curl_slist_append(NULL, "Expect:");
    for (const char *const *p = rq->headers; l && p && *p; p++) {
        struct curl_slist *n = curl_slist_append(l, *p);
        if (!n) {
            curl_slist_free_all(l);
            l = NULL;
        }
        l = n;
    }
    if (!l) {
        recycle(h, r);
        return MC_ENOMEM;
    }
    r->hdrs = l;
    CURL *e = r->easy;
    curl_easy_setopt(e, CURLOPT_URL, rq->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)h->o.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)h->o.timeout_ms);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, h->o.insecure ? 0L : 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, h->o.insecure ? 0L : 2L);
    if (h->o.ca_file) {
        curl_easy_setopt(e, CURLOPT_CAINFO, h->o.ca_file);
    }
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
                     h->o.http2 ? (long)CURL_HTTP_VERSION_2TLS : (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, rq->body ? rq->body : "");
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)rq->body_len);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, h);
    if (curl_multi_add_handle(h->multi, e) != CURLM_OK) {
        recycle(h, r);
        return MC_ENOMEM;
    }
    r->next = h->reqs;
    if (h->reqs) {
        h->reqs->prev = r;
    }
    h->reqs = r;
    h->n_reqs++;
    return 0;
}

size_t mc__http_in_flight(const mc__http_t *h)
{
    return h ? h->n_reqs : 0;
}

void mc__http_close(mc__http_t *h, void (*on_closed)(void *arg), void *arg)
{
    if (!h || h->closing) {
        return;
    }
    h->closing = true;
    h->on_closed = on_closed;
    h->closed_arg = arg;
    req_t *r;
    while ((r = h->reqs) != NULL) {
        curl_multi_remove_handle(h->multi, r->easy);
        list_remove(h, r);
        mc__http_result_t res = {MC_ECLOSED, 0, MC__HTTP_TRANSIENT, -1, 0, "client closed", false};
        r->cb(r->arg, &res);
        recycle(h, r);
    }
    for (size_t k = 0; k < h->n_free_easy; k++) {
        curl_easy_cleanup(h->free_easy[k]);
    }
    h->n_free_easy = 0;
    /* Closes the cached connections; their sockets come back through socket_cb(REMOVE). */
    curl_multi_cleanup(h->multi);
    h->multi = NULL;
    while (h->socks) {
        sock_close(h, h->socks); /* those curl did not hand back during cleanup */
    }
    uv_close((uv_handle_t *)&h->timer, handle_closed);
    uv_close((uv_handle_t *)&h->idle, handle_closed);
}
