/*
 * http.h: HTTP/1.1 request reading for the live server, as pure functions (fuzzed by
 * tests/fuzz/fuzz_http_request.c).
 *
 * mcd_http_req_t wraps one llhttp parser and keeps only what the server needs: the method,
 * the request target and a fixed set of headers (Host, Upgrade, Connection, Accept, Origin,
 * Authorization, Sec-WebSocket-Key, Sec-WebSocket-Version, Last-Event-ID). Other headers are
 * parsed, counted against the limits and dropped. Limits: request target 16 KiB (414), all
 * header names and values 16 KiB and 100 headers (431); requests with a body are refused
 * (400): the API is GET only. mcd_http_target_parse() splits the target into a path and the
 * query parameters the server understands (since, vars, filter, token), percent-decoded.
 *
 * Thread: the owner's (the server's loop thread). A request object is allocated only while a
 * request is being read, so idle connections hold none.
 */
#ifndef MONGOCAST_DAEMON_HTTP_H
#define MONGOCAST_DAEMON_HTTP_H

#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MCD_HTTP_MAX_TARGET 16384
#define MCD_HTTP_MAX_HEADER_BYTES 16384
#define MCD_HTTP_MAX_HEADERS 100

typedef enum mcd_http_header {
    MCD_H_HOST = 0,
    MCD_H_UPGRADE,
    MCD_H_CONNECTION,
    MCD_H_ACCEPT,
    MCD_H_ORIGIN,
    MCD_H_AUTHORIZATION,
    MCD_H_WS_KEY,
    MCD_H_WS_VERSION,
    MCD_H_LAST_EVENT_ID,
    MCD_H_COUNT
} mcd_http_header_t;

typedef enum mcd_http_result {
    MCD_HTTP_MORE = 0,  /* every byte consumed; the request is not complete yet */
    MCD_HTTP_DONE = 1,  /* a request is complete; bytes after *consumed belong to the next
                           request (keep-alive) or to the upgraded protocol */
    MCD_HTTP_ERROR = 2, /* bad request: answer req->status with req->error and close */
} mcd_http_result_t;

typedef struct mcd_http_req {
    llhttp_t parser;
    char *buf; /* target, then header values, NUL-separated (grows to the limits) */
    uint32_t buf_len;
    uint32_t buf_cap;
    uint32_t target_len; /* the target is buf[0 .. target_len) */
    uint32_t header_bytes;
    uint16_t n_headers;
    uint16_t status;   /* MCD_HTTP_ERROR: 400, 405, 413, 414, 431 ... */
    const char *error; /* MCD_HTTP_ERROR: static message */
    int cur;           /* header being read: mcd_http_header_t, or -1 (dropped) */
    char name[32];     /* current header name (longer names are never ones we keep) */
    uint8_t name_len;
    bool name_long;
    bool target_done;
    bool complete;
    bool upgrade; /* llhttp saw a valid Upgrade request */
    bool keep_alive;
    uint8_t method; /* llhttp_method_t */
    uint8_t http_minor;
    uint8_t http_major;
    struct {
        uint32_t off; /* into buf */
        uint32_t len;
        bool present;
    } h[MCD_H_COUNT];
} mcd_http_req_t;

/* Prepares `req` for reading a request (allocates nothing yet). */
void mcd_http_req_init(mcd_http_req_t *req);
/* Frees what the request holds (the struct itself belongs to the caller). */
void mcd_http_req_cleanup(mcd_http_req_t *req);

/* Feeds bytes. Returns MCD_HTTP_MORE, MCD_HTTP_DONE (*consumed: bytes that belonged to this
 * request) or MCD_HTTP_ERROR (req->status/req->error set). After DONE the request's fields
 * are readable until mcd_http_req_cleanup(). */
mcd_http_result_t mcd_http_req_feed(mcd_http_req_t *req, const char *data, size_t len,
                                    size_t *consumed);

/* A kept header's value (NUL-terminated, borrowed), or NULL when absent. */
const char *mcd_http_req_header(const mcd_http_req_t *req, mcd_http_header_t h);

/* The raw request target (NUL-terminated, borrowed). */
const char *mcd_http_req_target(const mcd_http_req_t *req);

/* True when the comma-separated header value `list` holds `token` (case-insensitive). */
bool mcd_http_has_token(const char *list, const char *token);

/* The token of an "Authorization: Bearer <token>" value, or NULL (borrowed from `value`;
 * *len receives its length). */
const char *mcd_http_bearer(const char *value, size_t *len);

/* A request target split into parts. Every string is owned and NUL-terminated. */
typedef struct mcd_http_target {
    char *path;  /* percent-decoded path */
    char *since; /* query parameters, percent-decoded ('+' is a space); NULL when absent */
    char *vars;
    char *filter;
    char *token;
    char *snapshot; /* "true" / "false" (checked by the route) */
} mcd_http_target_t;

/* Parses an origin-form target ("/path?query"). Returns 0, or -1 with a static message in
 * *why: not origin-form, bad percent-encoding, a NUL byte after decoding, a known parameter
 * given twice. Unknown parameters are ignored. */
int mcd_http_target_parse(const char *target, size_t len, mcd_http_target_t *out, const char **why);
void mcd_http_target_cleanup(mcd_http_target_t *t);

/* Percent-decodes `in` into `out` (room for in_len + 1). Returns the decoded length, or -1 on
 * a malformed escape or a decoded NUL. `plus_space` turns '+' into ' ' (query strings). */
long mcd_http_percent_decode(const char *in, size_t in_len, char *out, bool plus_space);

/* True when `s` is a plausible event id: 1 to 1024 hexadecimal digits. */
bool mcd_http_valid_event_id(const char *s);

#endif
