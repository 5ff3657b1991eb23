/*
 * http_client.h: the HTTP client of the webhook sink: POST requests on libcurl's multi
 * interface, driven by a libuv loop (curl_multi_socket_action), with connection reuse,
 * timeouts and the webhook status classes.
 *
 * Behaviour: HTTP/1.1 keep-alive (connections are kept in the multi handle's cache and
 * reused across requests), HTTP/2 over TLS when the server offers it (ALPN); http and https
 * only; TLS peer and host verification on unless turned off; redirects never followed;
 * connect and total timeouts per request; the response body is read and discarded except
 * its first bytes, kept for the error message.
 *
 * Classes of a finished request (mc__http_classify):
 *   2xx                                   OK: acknowledged
 *   408, 429, 5xx                         transient (Retry-After honoured, see below)
 *   timeouts, refused/reset connections, DNS failures, TLS failures  transient: never the
 *                                         event's fault; retried until the sink's bounds
 *   3xx                                   permanent: redirects are not followed, so the same
 *                                         request gets the same answer (fix the url)
 *   other 4xx                             permanent for that event
 * retry_after_ms is the server's Retry-After (seconds or an HTTP date, read by libcurl),
 * capped at MC__HTTP_MAX_RETRY_AFTER_MS, or -1 when absent.
 *
 * Threads: the loop's thread only (all functions and callbacks). A callback never runs from
 * inside mc__http_post(); mc__http_close() runs the callbacks of unfinished requests before
 * it returns (status MC_ECLOSED).
 */
#ifndef MC_SINKS_HTTP_CLIENT_H
#define MC_SINKS_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>
#include <uv.h>

#include "mongocast/error.h"

#define MC__HTTP_MAX_RETRY_AFTER_MS ((int64_t)24 * 3600 * 1000)
#define MC__HTTP_ERROR_BODY_MAX 200

typedef enum mc__http_class {
    MC__HTTP_OK = 0,
    MC__HTTP_TRANSIENT = 1,
    MC__HTTP_PERMANENT = 2,
} mc__http_class_t;

/* The class of a request that ended with libcurl result `code` and HTTP status `status`
 * (0 when no response came). */
mc__http_class_t mc__http_classify(long status, CURLcode code);

/* Checks a webhook url: http:// or https://, a host, no user:password part (secrets belong
 * in headers), parsable by libcurl. MC_ECONFIG otherwise. */
int mc__http_url_check(const char *url, mc_error_t *err);

typedef struct mc__http_opts {
    uint32_t connect_timeout_ms; /* default 5000 */
    uint32_t timeout_ms;         /* default 15000: the whole request */
    bool insecure;               /* true turns TLS verification off (tests only) */
    const char *ca_file;         /* extra CA bundle, or NULL for the system's */
    long max_connections;        /* default 64 (per client; also per host) */
    bool http2;                  /* default false: HTTP/1.1; true lets TLS negotiate h2 */
} mc__http_opts_t;

typedef struct mc__http mc__http_t;

/* NULL (err filled) when libcurl cannot be set up. */
mc__http_t *mc__http_new(uv_loop_t *loop, const mc__http_opts_t *opts, mc_error_t *err);

typedef struct mc__http_request {
    const char *url;
    const char *const *headers; /* "Name: value" lines, NULL-terminated; copied */
    const void *body;           /* borrowed until the callback has run */
    size_t body_len;
} mc__http_request_t;

typedef struct mc__http_result {
    int status;       /* 0: a response came (see http_status); MC_EIO: none;
                         MC_ECLOSED: the client was closed first */
    long http_status; /* 0 without a response */
    mc__http_class_t cls;
    int64_t retry_after_ms; /* -1: none */
    double seconds;         /* the request's total time */
    const char *message;    /* "HTTP 503: <first bytes of the body>", a curl error, ... */
    bool timed_out;         /* no complete answer within the connect or total timeout */
} mc__http_result_t;

typedef void (*mc__http_cb)(void *arg, const mc__http_result_t *res);

/* Starts a POST. 0, after which cb runs exactly once; MC_ECLOSED after close, MC_ENOMEM; cb
 * is then never called. */
int mc__http_post(mc__http_t *h, const mc__http_request_t *req, mc__http_cb cb, void *arg);

/* Requests started and not finished. */
size_t mc__http_in_flight(const mc__http_t *h);

/* Fails unfinished requests (MC_ECLOSED), closes connections and handles, frees the client;
 * on_closed (optional) runs when the last handle is closed. NULL-safe. */
void mc__http_close(mc__http_t *h, void (*on_closed)(void *arg), void *arg);

#endif
