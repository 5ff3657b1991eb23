/*
 * redis_url.c: parsing and redacting `redis://[[user]:password@]host[:port][/db]` URLs, and
 * classifying Redis error replies (redis_client.h).
 *
 * Pure functions, any thread. The parser works on a length-delimited input (a URL from the
 * config may come from ${VAR} interpolation and is treated as untrusted), never reads past
 * it, writes only into the fixed buffers of mc__redis_url_t, and builds error messages from
 * positions and fixed words only, so a password can never reach a log line through them.
 */
#include "sinks/redis_client.h"

#include "hex.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static int url_error(mc_error_t *err, const char *what)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "redis url: %s", what);
}

/* Percent-decodes s[0..n) into out (cap bytes with the NUL). False on a bad escape, an
 * escaped or raw NUL, or overflow. */
static bool decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= n) {
                return false;
            }
            int hi = mc__hex_value(s[i + 1]), lo = mc__hex_value(s[i + 2]);
            if (hi < 0 || lo < 0) {
                return false;
            }
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        if (c == '\0' || o + 1 >= cap) {
            return false;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    return true;
}

static bool parse_int(const char *s, size_t n, long max, long *out)
{
    if (n == 0 || n > 10) {
        return false;
    }
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
        v = v * 10 + (s[i] - '0');
    }
    if (v > max) {
        return false;
    }
    *out = v;
    return true;
}

static bool host_byte_ok(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

int mc__redis_url_parse(const char *url, size_t len, mc__redis_url_t *out, mc_error_t *err)
{
    static const char scheme[] = "redis://";
    memset(out, 0, sizeof *out);
    out->port = MC__REDIS_DEFAULT_PORT;
    if (!url) {
        return url_error(err, "missing");
    }
    if (memchr(url, '\0', len)) {
        return url_error(err, "contains a NUL byte");
    }
    if (len >= 9 && strncasecmp(url, "rediss://", 9) == 0) {
        return url_error(err, "rediss:// (TLS) is not supported by this build's hiredis 0.14");
    }
    if (len < sizeof scheme - 1 || strncasecmp(url, scheme, sizeof scheme - 1) != 0) {
        return url_error(err, "must start with redis://");
    }
    const char *p = url + sizeof scheme - 1, *end = url + len;
    if (memchr(p, '?', (size_t)(end - p)) || memchr(p, '#', (size_t)(end - p))) {
        return url_error(err, "query strings and fragments are not supported");
    }
    /* Authority ends at the first '/' after the last '@' (a password may hold a raw '/'
     * only percent-encoded, so the first '/' after '@' is the path). */
    const char *at = NULL;
    for (const char *q = p; q < end; q++) {
        if (*q == '@') {
            at = q;
        }
    }
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        size_t ulen = colon ? (size_t)(colon - p) : (size_t)(at - p);
        if (!decode(p, ulen, out->user, sizeof out->user)) {
            return url_error(err, "bad user name (escapes, NUL or length)");
        }
        if (colon) {
            if (!decode(colon + 1, (size_t)(at - colon - 1), out->password, sizeof out->password)) {
                return url_error(err, "bad password (escapes, NUL or length)");
            }
            out->has_password = true;
        } else if (ulen > 0) {
            /* "redis://secret@host": the only part given is the password (the common
             * pre-ACL form), not a user without one. */
            memcpy(out->password, out->user, sizeof out->password);
            out->user[0] = '\0';
            out->has_password = true;
        }
        p = at + 1;
    }
    const char *slash = memchr(p, '/', (size_t)(end - p));
    const char *hend = slash ? slash : end;
    const char *port_start = NULL;
    if (p < hend && *p == '[') {
        const char *rb = memchr(p, ']', (size_t)(hend - p));
        if (!rb || rb == p + 1) {
            return url_error(err, "bad [IPv6] host");
        }
        size_t hl = (size_t)(rb - p - 1);
        if (hl >= sizeof out->host) {
            return url_error(err, "host too long");
        }
        for (size_t i = 0; i < hl; i++) {
            char c = p[1 + i];
            if (mc__hex_value(c) < 0 && c != ':' && c != '.') {
                return url_error(err, "bad [IPv6] host");
            }
        }
        memcpy(out->host, p + 1, hl);
        out->host[hl] = '\0';
        if (rb + 1 < hend) {
            if (rb[1] != ':') {
                return url_error(err, "unexpected text after ]");
            }
            port_start = rb + 2;
        }
    } else {
        const char *colon = memchr(p, ':', (size_t)(hend - p));
        const char *host_end = colon ? colon : hend;
        size_t hl = (size_t)(host_end - p);
        if (hl == 0) {
            return url_error(err, "empty host");
        }
        if (hl >= sizeof out->host) {
            return url_error(err, "host too long");
        }
        for (size_t i = 0; i < hl; i++) {
            if (!host_byte_ok((unsigned char)p[i])) {
                return url_error(err, "bad host name");
            }
        }
        memcpy(out->host, p, hl);
        out->host[hl] = '\0';
        port_start = colon ? colon + 1 : NULL;
    }
    if (port_start) {
        long port = 0;
        if (!parse_int(port_start, (size_t)(hend - port_start), 65535, &port) || port == 0) {
            return url_error(err, "port must be 1 to 65535");
        }
        out->port = (int)port;
    }
    if (slash && slash + 1 < end) {
        long db = 0;
        if (!parse_int(slash + 1, (size_t)(end - slash - 1), 2147483647L, &db)) {
            return url_error(err, "the path must be a database number");
        }
        out->db = (int)db;
    }
    return 0;
}

const char *mc__redis_url_redact(const mc__redis_url_t *u, char *buf, size_t cap)
{
    bool v6 = strchr(u->host, ':') != NULL;
    snprintf(buf, cap, "redis://%s%s%s%s%s%s:%d/%d", u->user, u->has_password ? ":***" : "",
             u->user[0] || u->has_password ? "@" : "", v6 ? "[" : "", u->host, v6 ? "]" : "",
             u->port, u->db);
    return buf;
}

/* Error prefixes after which a retry can succeed without anyone changing the command. */
static const char *const transient_prefixes[] = {
    "LOADING", "BUSY",    "TRYAGAIN",   "MASTERDOWN", "CLUSTERDOWN", "READONLY",
    "OOM",     "MISCONF", "NOREPLICAS", "NOAUTH",     "WRONGPASS",
};

mc__redis_class_t mc__redis_classify(const redisReply *reply)
{
    if (!reply) {
        return MC__REDIS_TRANSIENT;
    }
    if (reply->type != REDIS_REPLY_ERROR) {
        return MC__REDIS_OK;
    }
    const char *s = reply->str ? reply->str : "";
    for (size_t k = 0; k < sizeof transient_prefixes / sizeof transient_prefixes[0]; k++) {
        size_t n = strlen(transient_prefixes[k]);
        if (strncmp(s, transient_prefixes[k], n) == 0 && (s[n] == ' ' || s[n] == '\0')) {
            return MC__REDIS_TRANSIENT;
        }
    }
    return MC__REDIS_PERMANENT;
}
