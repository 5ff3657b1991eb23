/*
 * http.c: reads one HTTP/1.1 request with llhttp into an mcd_http_req_t and splits its
 * target into path and query parameters. See http.h.
 *
 * Thread: the caller's (the server's loop thread). No global mutable state: the llhttp
 * settings are a const table.
 * Invariants: every byte kept is counted against a limit before it is stored, so a request
 * costs at most MCD_HTTP_MAX_TARGET + 2 * MCD_HTTP_MAX_HEADER_BYTES bytes however it is
 * split into reads; llhttp runs in strict mode (no lenient flags), so request smuggling
 * shapes (bad chunking, conflicting Content-Length) are errors.
 */
#include "http.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define BUF_MAX (MCD_HTTP_MAX_TARGET + 2 * MCD_HTTP_MAX_HEADER_BYTES + 64)

static const struct {
    const char *name;
    bool list; /* repeated headers are joined with ", " (RFC 9110 list syntax) */
} kept_headers[MCD_H_COUNT] = {
    [MCD_H_HOST] = {"host", false},
    [MCD_H_UPGRADE] = {"upgrade", true},
    [MCD_H_CONNECTION] = {"connection", true},
    [MCD_H_ACCEPT] = {"accept", true},
    [MCD_H_ORIGIN] = {"origin", false},
    [MCD_H_AUTHORIZATION] = {"authorization", false},
    [MCD_H_WS_KEY] = {"sec-websocket-key", false},
    [MCD_H_WS_VERSION] = {"sec-websocket-version", false},
    [MCD_H_LAST_EVENT_ID] = {"last-event-id", false},
};

static int req_error(mcd_http_req_t *req, uint16_t status, const char *why)
{
    if (!req->status) {
        req->status = status;
        req->error = why;
    }
    return -1;
}

/* Appends bytes to buf, growing it up to BUF_MAX. */
static int buf_append(mcd_http_req_t *req, const char *at, size_t len)
{
    if ((size_t)req->buf_len + len + 1 > BUF_MAX) {
        return req_error(req, 431, "request header fields too large");
    }
    if (req->buf_len + len + 1 > req->buf_cap) {
        size_t cap = req->buf_cap ? req->buf_cap : 256;
        while (cap < req->buf_len + len + 1) {
            cap *= 2;
        }
        if (cap > BUF_MAX) {
            cap = BUF_MAX;
        }
        char *nb = realloc(req->buf, cap);
        if (!nb) {
            return req_error(req, 503, "out of memory");
        }
        req->buf = nb;
        req->buf_cap = (uint32_t)cap;
    }
    memcpy(req->buf + req->buf_len, at, len);
    req->buf_len += (uint32_t)len;
    req->buf[req->buf_len] = '\0';
    return 0;
}

/* Ends the current string with a NUL that later appends do not overwrite. */
static int terminate(mcd_http_req_t *req)
{
    if (buf_append(req, "", 0) != 0) {
        return -1;
    }
    req->buf_len++;
    return 0;
}

static mcd_http_req_t *req_of(llhttp_t *p)
{
    return p->data;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    mcd_http_req_t *req = req_of(p);
    if (req->buf_len + len > MCD_HTTP_MAX_TARGET) {
        return req_error(req, 414, "request target too long");
    }
    return buf_append(req, at, len);
}

static int on_url_complete(llhttp_t *p)
{
    mcd_http_req_t *req = req_of(p);
    req->target_len = req->buf_len;
    req->target_done = true;
    /* Keep the target NUL-terminated: header values start after its NUL. */
    return terminate(req);
}

static int count_header_bytes(mcd_http_req_t *req, size_t len)
{
    req->header_bytes += (uint32_t)len;
    if (req->header_bytes > MCD_HTTP_MAX_HEADER_BYTES) {
        return req_error(req, 431, "request header fields too large");
    }
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    mcd_http_req_t *req = req_of(p);
    if (count_header_bytes(req, len) != 0) {
        return -1;
    }
    if (req->name_len + len >= sizeof(req->name)) {
        req->name_long = true;
        return 0;
    }
    memcpy(req->name + req->name_len, at, len);
    req->name_len = (uint8_t)(req->name_len + len);
    return 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    mcd_http_req_t *req = req_of(p);
    if (++req->n_headers > MCD_HTTP_MAX_HEADERS) {
        return req_error(req, 431, "too many header fields");
    }
    req->cur = -1;
    if (!req->name_long) {
        req->name[req->name_len] = '\0';
        for (int i = 0; i < MCD_H_COUNT; i++) {
            if (strcasecmp(req->name, kept_headers[i].name) == 0) {
                req->cur = i;
                break;
            }
        }
    }
    req->name_len = 0;
    req->name_long = false;
    if (req->cur < 0) {
        return 0;
    }
    if (req->h[req->cur].present) {
        if (!kept_headers[req->cur].list) {
            return req_error(req, 400, "duplicate header field");
        }
        /* Start the joined value with a copy of the earlier one. */
        uint32_t start = req->buf_len;
        uint32_t off = req->h[req->cur].off, olen = req->h[req->cur].len;
        if (buf_append(req, "", 0) != 0) {
            return -1;
        }
        if (req->buf_len + olen + 2 + 1 > BUF_MAX) {
            return req_error(req, 431, "request header fields too large");
        }
        /* buf may move in buf_append: copy through a temporary. */
        char *old = malloc(olen + 1);
        if (!old) {
            return req_error(req, 503, "out of memory");
        }
        memcpy(old, req->buf + off, olen);
        int rc = buf_append(req, old, olen);
        free(old);
        if (rc != 0 || buf_append(req, ", ", 2) != 0) {
            return -1;
        }
        req->h[req->cur].off = start;
    } else {
        req->h[req->cur].off = req->buf_len;
    }
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    mcd_http_req_t *req = req_of(p);
    if (count_header_bytes(req, len) != 0) {
        return -1;
    }
    if (req->cur < 0) {
        return 0;
    }
    return buf_append(req, at, len);
}

static int on_header_value_complete(llhttp_t *p)
{
    mcd_http_req_t *req = req_of(p);
    if (req->cur < 0) {
        return 0;
    }
    req->h[req->cur].len = req->buf_len - req->h[req->cur].off;
    req->h[req->cur].present = true;
    req->cur = -1;
    return terminate(req);
}

static int on_headers_complete(llhttp_t *p)
{
    mcd_http_req_t *req = req_of(p);
    if ((p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0)) {
        return req_error(req, 400, "request body not allowed");
    }
    req->method = p->method;
    req->http_major = p->http_major;
    req->http_minor = p->http_minor;
    req->keep_alive = llhttp_should_keep_alive(p) != 0;
    req->upgrade = p->upgrade != 0;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    (void)at;
    (void)len;
    return req_error(req_of(p), 400, "request body not allowed");
}

static int on_message_complete(llhttp_t *p)
{
    req_of(p)->complete = true;
    /* Pause so that the caller sees exactly where this request ends. */
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void mcd_http_req_init(mcd_http_req_t *req)
{
    memset(req, 0, sizeof(*req));
    llhttp_init(&req->parser, HTTP_REQUEST, &settings);
    req->parser.data = req;
    req->cur = -1;
}

void mcd_http_req_cleanup(mcd_http_req_t *req)
{
    free(req->buf);
    req->buf = NULL;
    req->buf_len = req->buf_cap = 0;
}

mcd_http_result_t mcd_http_req_feed(mcd_http_req_t *req, const char *data, size_t len,
                                    size_t *consumed)
{
    *consumed = 0;
    if (req->status) {
        return MCD_HTTP_ERROR;
    }
    if (req->complete) {
        return MCD_HTTP_DONE;
    }
    llhttp_errno_t e = llhttp_execute(&req->parser, data, len);
    if (e == HPE_OK) {
        *consumed = len;
        return MCD_HTTP_MORE;
    }
    if ((e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) && req->complete) {
        const char *pos = llhttp_get_error_pos(&req->parser);
        *consumed = pos && pos >= data && pos <= data + len ? (size_t)(pos - data) : len;
        return MCD_HTTP_DONE;
    }
    if (!req->status) {
        req->status = 400;
        req->error = e == HPE_INVALID_METHOD ? "unknown method" : "malformed request";
    }
    return MCD_HTTP_ERROR;
}

const char *mcd_http_req_header(const mcd_http_req_t *req, mcd_http_header_t h)
{
    if ((int)h < 0 || h >= MCD_H_COUNT || !req->h[h].present) {
        return NULL;
    }
    return req->buf + req->h[h].off;
}

const char *mcd_http_req_target(const mcd_http_req_t *req)
{
    return req->buf && req->target_done ? req->buf : "";
}

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

bool mcd_http_has_token(const char *list, const char *token)
{
    if (!list || !token) {
        return false;
    }
    size_t tlen = strlen(token);
    const char *s = list;
    while (*s) {
        while (*s == ',' || is_ows(*s)) {
            s++;
        }
        const char *start = s;
        while (*s && *s != ',') {
            s++;
        }
        const char *end = s;
        while (end > start && is_ows(end[-1])) {
            end--;
        }
        /* Media types carry parameters: "text/event-stream; q=1". */
        const char *semi = memchr(start, ';', (size_t)(end - start));
        if (semi) {
            end = semi;
            while (end > start && is_ows(end[-1])) {
                end--;
            }
        }
        if ((size_t)(end - start) == tlen && strncasecmp(start, token, tlen) == 0) {
            return true;
        }
    }
    return false;
}

const char *mcd_http_bearer(const char *value, size_t *len)
{
    if (!value) {
        return NULL;
    }
    while (is_ows(*value)) {
        value++;
    }
    if (strncasecmp(value, "bearer", 6) != 0 || !is_ows(value[6])) {
        return NULL;
    }
    const char *t = value + 6;
    while (is_ows(*t)) {
        t++;
    }
    size_t n = strlen(t);
    while (n > 0 && is_ows(t[n - 1])) {
        n--;
    }
    if (n == 0) {
        return NULL;
    }
    if (len) {
        *len = n;
    }
    return t;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

long mcd_http_percent_decode(const char *in, size_t in_len, char *out, bool plus_space)
{
    size_t o = 0;
    for (size_t i = 0; i < in_len; i++) {
        char c = in[i];
        if (c == '%') {
            if (i + 2 >= in_len) {
                return -1;
            }
            int hi = hexval(in[i + 1]), lo = hexval(in[i + 2]);
            if (hi < 0 || lo < 0) {
                return -1;
            }
            c = (char)(hi * 16 + lo);
            i += 2;
        } else if (c == '+' && plus_space) {
            c = ' ';
        }
        if (c == '\0') {
            return -1;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    return (long)o;
}

static int set_param(char **slot, const char *v, size_t vlen, const char **why)
{
    if (*slot) {
        *why = "query parameter given twice";
        return -1;
    }
    char *s = malloc(vlen + 1);
    if (!s) {
        *why = "out of memory";
        return -1;
    }
    if (mcd_http_percent_decode(v, vlen, s, true) < 0) {
        free(s);
        *why = "malformed percent-encoding in the query";
        return -1;
    }
    *slot = s;
    return 0;
}

int mcd_http_target_parse(const char *target, size_t len, mcd_http_target_t *out, const char **why)
{
    memset(out, 0, sizeof(*out));
    if (len == 0 || target[0] != '/') {
        *why = "request target must be an absolute path";
        return -1;
    }
    const char *q = memchr(target, '?', len);
    size_t plen = q ? (size_t)(q - target) : len;
    const char *frag = memchr(target, '#', len);
    if (frag) {
        *why = "fragment in request target";
        return -1;
    }
    out->path = malloc(plen + 1);
    if (!out->path) {
        *why = "out of memory";
        return -1;
    }
    if (mcd_http_percent_decode(target, plen, out->path, false) < 0) {
        *why = "malformed percent-encoding in the path";
        goto fail;
    }
    if (q) {
        const char *s = q + 1, *end = target + len;
        while (s < end) {
            const char *amp = memchr(s, '&', (size_t)(end - s));
            const char *pe = amp ? amp : end;
            const char *eq = memchr(s, '=', (size_t)(pe - s));
            const char *name = s;
            size_t nlen = (size_t)((eq ? eq : pe) - s);
            const char *v = eq ? eq + 1 : pe;
            size_t vlen = (size_t)(pe - v);
            char **slot = NULL;
            if (nlen == 5 && memcmp(name, "since", 5) == 0) {
                slot = &out->since;
            } else if (nlen == 4 && memcmp(name, "vars", 4) == 0) {
                slot = &out->vars;
            } else if (nlen == 6 && memcmp(name, "filter", 6) == 0) {
                slot = &out->filter;
            } else if (nlen == 5 && memcmp(name, "token", 5) == 0) {
                slot = &out->token;
            } else if (nlen == 8 && memcmp(name, "snapshot", 8) == 0) {
                slot = &out->snapshot;
            }
            if (slot && set_param(slot, v, vlen, why) != 0) {
                goto fail;
            }
            s = pe + 1;
        }
    }
    return 0;
fail:
    mcd_http_target_cleanup(out);
    return -1;
}

void mcd_http_target_cleanup(mcd_http_target_t *t)
{
    free(t->path);
    free(t->since);
    free(t->vars);
    free(t->filter);
    free(t->token);
    free(t->snapshot);
    memset(t, 0, sizeof(*t));
}

bool mcd_http_valid_event_id(const char *s)
{
    if (!s || !*s) {
        return false;
    }
    size_t n = 0;
    for (; s[n]; n++) {
        if (hexval(s[n]) < 0 || n >= 1024) {
            return false;
        }
    }
    return true;
}
