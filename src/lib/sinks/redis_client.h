/*
 * redis_client.h: the Redis client of the Redis sinks: `redis://` URLs, a pipelined
 * asynchronous connection on a libuv loop (hiredis 0.14 underneath), reconnects with capped
 * full-jitter backoff, timeouts, and error classes.
 *
 * Why asynchronous: measured against a local redis-server (docs/PERFORMANCE.md, "Redis
 * client"), hiredis's async API costs the same CPU per XADD as a blocking pipeline on a thread
 * of its own, once it runs on our own libuv adapter (the one Debian's hiredis 0.14.1 ships,
 * adapters/libuv.h, re-arms its poll handle on every command: one epoll_ctl per command, half
 * the throughput). It then shares the library's I/O loop with the other asynchronous sinks
 * instead of needing a thread per sink, and replies overlap the next writes.
 *
 * Threads: everything runs on the thread of the libuv loop given to mc__redis_new(), and
 * every function except the URL helpers and mc__redis_classify() must be called on it.
 * Callbacks run on that thread too, never from inside a mc__redis_* call (so a callback may
 * issue commands or close the client).
 *
 * Guarantees:
 *   - replies are matched to commands in order (one connection, Redis answers in order);
 *     every command's callback runs exactly once: with the reply, or with an error (its class
 *     says whether the command may have run: a timeout or a dropped connection after it was
 *     written is "unknown outcome", which the caller treats as transient and retries; the
 *     sinks make such retries harmless or document them);
 *   - a server that accepts and never answers is detected: the oldest command waiting for a
 *     reply past command_timeout_ms drops the connection (all of its commands fail,
 *     transient) and the client reconnects; a connect or handshake (AUTH, SELECT) slower than
 *     connect_timeout_ms does the same;
 *   - commands issued while disconnected wait (up to max_pending commands in all, and up to
 *     command_timeout_ms each) and are written once the handshake is done; past the bound,
 *     mc__redis_command() returns MC_EAGAIN at once;
 *   - the password is never logged or put in an error message (mc__redis_url_redact()).
 */
#ifndef MC_SINKS_REDIS_CLIENT_H
#define MC_SINKS_REDIS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "mongocast/error.h"

/* ---- URLs (pure, any thread) -------------------------------------------------------- */

#define MC__REDIS_DEFAULT_PORT 6379
#define MC__REDIS_HOST_MAX 256
#define MC__REDIS_CRED_MAX 512

typedef struct mc__redis_url {
    char host[MC__REDIS_HOST_MAX];     /* name or address (IPv6 without brackets) */
    int port;                          /* 1..65535 */
    char user[MC__REDIS_CRED_MAX];     /* ACL user ("" = none: AUTH <password>) */
    char password[MC__REDIS_CRED_MAX]; /* "" = no AUTH */
    bool has_password;                 /* "redis://user:@h" sends AUTH user "" */
    int db;                            /* SELECT db when not 0; 0..2^31-1 */
} mc__redis_url_t;

/* Parses "redis://[[user]:password@]host[:port][/db]" (host may be "[v6 address]"; user and
 * password are percent-decoded and may hold any byte but NUL). Errors: MC_ECONFIG with a
 * message that never contains the password: another scheme (rediss:// is refused, hiredis
 * 0.14 has no TLS), an empty or bad host, a bad port or db, a query or fragment, a bad
 * percent escape or an escaped NUL, a part longer than its buffer. */
int mc__redis_url_parse(const char *url, size_t len, mc__redis_url_t *out, mc_error_t *err);

/* "redis://user:***@host:port/db" (password hidden) into buf; returns buf. */
const char *mc__redis_url_redact(const mc__redis_url_t *u, char *buf, size_t cap);

/* ---- Error classes ------------------------------------------------------------------ */

typedef enum mc__redis_class {
    MC__REDIS_OK = 0,
    MC__REDIS_TRANSIENT = 1, /* may succeed later: connection trouble, LOADING, OOM, ... */
    MC__REDIS_PERMANENT = 2, /* this command can never succeed as is: WRONGTYPE, syntax... */
} mc__redis_class_t;

/* Classifies a reply (NULL: no reply, i.e. a connection failure: transient). Error replies:
 * LOADING, BUSY, TRYAGAIN, MASTERDOWN, CLUSTERDOWN, READONLY, OOM, MISCONF, NOREPLICAS,
 * NOAUTH, WRONGPASS are transient; anything else (ERR ..., WRONGTYPE, NOPERM, EXECABORT, and
 * MOVED/ASK: Redis Cluster is not supported) is permanent. Non-error replies are
 * MC__REDIS_OK. */
mc__redis_class_t mc__redis_classify(const redisReply *reply);

/* ---- The asynchronous client (loop thread) ----------------------------------------- */

typedef struct mc__redis mc__redis_t;

typedef enum mc__redis_state {
    MC__REDIS_DISCONNECTED = 0, /* waiting for the next attempt (backoff) */
    MC__REDIS_CONNECTING = 1,   /* resolving, connecting, AUTH/SELECT */
    MC__REDIS_READY = 2,
    MC__REDIS_CLOSED = 3,
} mc__redis_state_t;

typedef struct mc__redis_opts {
    mc__redis_url_t url;
    uint32_t connect_timeout_ms; /* default 5000: resolve + connect + handshake */
    uint32_t command_timeout_ms; /* default 10000: a reply later than this drops the link */
    uint32_t backoff_initial_ms; /* default 100 */
    uint32_t backoff_max_ms;     /* default 30000 */
    size_t max_pending;          /* default 65536: commands queued or waiting for a reply */
    /* Optional: called on every state change and with the reason of each failed attempt
     * (`why` is NULL when the new state is READY). */
    void (*on_state)(void *arg, mc__redis_state_t state, const char *why);
    void *state_arg;
} mc__redis_opts_t;

/* Fills defaults for the zero fields (url is left alone). */
void mc__redis_opts_defaults(mc__redis_opts_t *o);

/* The outcome of one command. `reply` is borrowed for the duration of the callback (NULL
 * when the command got no reply); `status` is 0 with class MC__REDIS_OK, MC_ESERVER for an
 * error reply, MC_EIO for a connection failure or timeout, MC_ECLOSED when the client was
 * closed first; `message` says what happened (the error reply, "timeout", ...). */
typedef struct mc__redis_result {
    int status;
    mc__redis_class_t cls;
    bool maybe_done; /* the command was written: it may have run on the server */
    const redisReply *reply;
    const char *message;
} mc__redis_result_t;

typedef void (*mc__redis_cb)(void *arg, const mc__redis_result_t *res);

/* Creates a client and starts connecting at once (a failure to connect is not an error
 * here: it is retried with backoff and reported through on_state and mc__redis_status()).
 * Returns NULL (err filled) only for bad options or when memory runs out. */
mc__redis_t *mc__redis_new(uv_loop_t *loop, const mc__redis_opts_t *opts, mc_error_t *err);

/* Sends a command (argv and lengths are copied at once). Returns 0, after which `cb` runs
 * exactly once, later; MC_EAGAIN when max_pending commands are already outstanding, or
 * MC_ECLOSED after close; `cb` is then never called (libuv's rule). */
int mc__redis_command(mc__redis_t *r, int argc, const char **argv, const size_t *lens,
                      mc__redis_cb cb, void *arg);

/* Closes: fails every outstanding command (MC_ECLOSED, maybe_done for those written),
 * closes the connection and the client's handles, then frees it; `on_closed` (optional)
 * runs once that is done, on the loop thread. NULL-safe. */
void mc__redis_close(mc__redis_t *r, void (*on_closed)(void *arg), void *arg);

typedef struct mc__redis_status {
    mc__redis_state_t state;
    size_t pending;       /* commands queued + waiting for a reply */
    uint64_t connects;    /* successful handshakes */
    uint64_t failures;    /* failed attempts and dropped connections */
    char last_error[256]; /* the reason of the last failure ("" if none) */
} mc__redis_status_t;

void mc__redis_status(const mc__redis_t *r, mc__redis_status_t *out);

#endif
