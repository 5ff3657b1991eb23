/*
 * nats_client.h: the NATS client of the NATS sinks, on libnats (Debian's 3.4.1): connection
 * options (servers, user/password, token, NKey seed, credentials file), core publish
 * (at-most-once), JetStream asynchronous publish with Nats-Msg-Id = the event id and one
 * callback per message, optional creation of the JetStream stream with its duplicate window,
 * reconnects with capped full-jitter backoff, timeouts, and error classes.
 *
 * Threads. libnats runs threads of its own (socket reader, flusher, reconnect, a delivery
 * thread for the PubAck inbox, a timer thread). Its libuv adapter (nats/adapters/libuv.h)
 * only moves socket reads and writes onto a loop: PubAcks would still be delivered on a
 * libnats thread, and the adapter needs per-thread registration, so it is not used. Hence:
 *   - mc__nats_new(), mc__nats_destroy(), mc__nats_ensure_stream(): the owner's thread
 *     (ensure_stream blocks for a request/reply round trip, up to the request timeout);
 *   - mc__nats_publish() and mc__nats_js_publish(): any one thread at a time; neither blocks
 *     (publishes are buffered by libnats, also while reconnecting, up to reconnect_buf_bytes;
 *     past max_pending JetStream publishes in flight, MC_EAGAIN);
 *   - JetStream callbacks run on a libnats thread (the PubAck delivery or timer thread),
 *     exactly once per accepted publish, in no guaranteed order across subjects; on_state runs
 *     on libnats threads as well. Callbacks must not call mc__nats_destroy().
 *
 * Guarantees: a PubAck that never comes (a server that accepts and then says nothing, a lost
 * reply) fails that message after ack_timeout_ms (transient; "maybe done": the message may
 * be stored, so a retry is deduplicated by its Nats-Msg-Id inside the stream's duplicate
 * window); a connected server that stops answering PINGs is dropped and reconnected; a
 * PubAck with duplicate=true is reported as MC__NATS_DUPLICATE (already stored).
 * Secrets (password, token, seeds) are never logged or put in messages.
 */
#ifndef MC_SINKS_NATS_CLIENT_H
#define MC_SINKS_NATS_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nats/nats.h>

#include "mongocast/error.h"

/* Checks a server list as libnats takes it: "nats://[user[:pass]@]host[:port]" (or tls://),
 * several separated by commas. MC_ECONFIG with a message naming the item's position and
 * what is wrong (never its text: it may hold a password). */
int mc__nats_url_check(const char *urls, size_t len, mc_error_t *err);

typedef enum mc__nats_class {
    MC__NATS_OK = 0,
    MC__NATS_TRANSIENT = 1,
    MC__NATS_PERMANENT = 2,
} mc__nats_class_t;

/* Classifies a publish failure from its libnats status and JetStream error code (0 when
 * none). Permanent: NATS_MAX_PAYLOAD, NATS_INVALID_SUBJECT, NATS_INVALID_ARG, NATS_NOT_PERMITTED
 * and the JetStream codes that no retry can change (message larger than the stream allows,
 * wrong expected sequence, invalid stream). Everything else is transient (disconnected,
 * timeout, no responders: no stream takes the subject yet, storage full, and a wrong expected
 * last message id: the message before it is still to come). */
mc__nats_class_t mc__nats_classify(natsStatus s, int js_code);

typedef enum mc__nats_state {
    MC__NATS_CONNECTING = 0,
    MC__NATS_CONNECTED = 1,
    MC__NATS_RECONNECTING = 2,
    MC__NATS_CLOSED = 3,
} mc__nats_state_t;

typedef struct mc__nats_opts {
    const char *url; /* server list (mc__nats_url_check) */
    const char *user, *password;
    const char *token;
    const char *nkey_public, *nkey_seed_file; /* NKey: public key + seed file */
    const char *creds_file;                   /* user JWT + seed (.creds) */
    uint32_t connect_timeout_ms;              /* default 5000 */
    uint32_t ack_timeout_ms;                  /* default 10000: JetStream PubAck wait per message */
    uint32_t ping_interval_ms;   /* default 10000 (two unanswered PINGs drop the link) */
    uint32_t backoff_initial_ms; /* default 100 */
    uint32_t backoff_max_ms;     /* default 30000 */
    int max_pending;             /* default 65536 JetStream publishes in flight */
    int reconnect_buf_bytes;     /* default 64 MiB buffered while disconnected */
    void (*on_state)(void *arg, mc__nats_state_t state, const char *why);
    void *state_arg;
} mc__nats_opts_t;

typedef struct mc__nats mc__nats_t;

/* Creates the client and starts connecting; a server that is down is retried in the
 * background (publishes are buffered meanwhile). NULL (err filled) for bad options, an
 * unreadable seed or creds file, or when memory runs out. */
mc__nats_t *mc__nats_new(const mc__nats_opts_t *opts, mc_error_t *err);

/* Fails every JetStream publish still in flight (MC_ECLOSED), closes the connection and
 * waits (bounded) until libnats will call nothing of ours again. NULL-safe. */
void mc__nats_destroy(mc__nats_t *n);

/* Headers sent with every message (NULL members are left out). Values are written with
 * control bytes and '%' percent-encoded so that no value can end a header line. */
typedef struct mc__nats_headers {
    const char *type;      /* Mongocast-Type */
    const char *stream;    /* Mongocast-Stream */
    const char *recipient; /* Mongocast-Recipient */
    size_t recipient_len;
} mc__nats_headers_t;

/* Core publish (at-most-once). 0, or MC_EAGAIN (transient: disconnected with a full reconnect
 * buffer), MC_EINVAL (permanent: payload too large, invalid subject), MC_ENOMEM; err says
 * which. */
int mc__nats_publish(mc__nats_t *n, const char *subject, const mc__nats_headers_t *h,
                     const void *data, size_t len, mc_error_t *err);

typedef enum mc__nats_outcome {
    MC__NATS_STORED = 0,    /* PubAck: stored as a new message */
    MC__NATS_DUPLICATE = 1, /* PubAck with duplicate=true: already stored */
    MC__NATS_FAILED = 2,    /* see cls */
} mc__nats_outcome_t;

typedef struct mc__nats_result {
    mc__nats_outcome_t outcome;
    mc__nats_class_t cls;
    int status;          /* 0, MC_EIO (failure), MC_ECLOSED (client destroyed first) */
    uint64_t sequence;   /* the stream sequence of a PubAck */
    const char *message; /* what failed (borrowed for the callback) */
    int js_code;         /* the JetStream error code of a refusal (0: none), e.g.
                            MC__NATS_JS_WRONG_LAST_MSG_ID */
} mc__nats_result_t;

/* The server's code for "wrong last msg ID" (Nats-Expected-Last-Msg-Id did not match; the
 * server's JSStreamWrongLastMsgIDErrF, not named in libnats 3.4's headers). */
#define MC__NATS_JS_WRONG_LAST_MSG_ID 10070

typedef void (*mc__nats_cb)(void *arg, const mc__nats_result_t *res);

/* JetStream asynchronous publish with header Nats-Msg-Id = msg_id (required, non-empty).
 * `expected_last_id` (optional) adds Nats-Expected-Last-Msg-Id: the stream then stores the
 * message only right after that one, which keeps a stream in event order when a message is
 * lost in transit and a later one arrives first (the later one is refused, transient, and
 * sent again after the lost one). nats-server (2.9) checks the expectation before the
 * duplicate id, so a replay that does not follow the stream's last message is refused with
 * js_code MC__NATS_JS_WRONG_LAST_MSG_ID ("wrong last msg ID: <last>") rather than answered as
 * a duplicate: the caller decides from <last> (sink_nats.c). Use it only when this publisher
 * alone writes the stream.
 * Returns 0, after which cb runs exactly once on a libnats thread; or MC_EAGAIN (max_pending
 * in flight, or libnats's own bound), MC_ECLOSED, MC_EINVAL (permanent: see err), and cb is
 * never called. */
int mc__nats_js_publish(mc__nats_t *n, const char *subject, const char *msg_id,
                        const char *expected_last_id, const mc__nats_headers_t *h, const void *data,
                        size_t len, mc__nats_cb cb, void *arg, mc_error_t *err);

/* Creates the JetStream stream `name` capturing `subjects` (file storage) with the given
 * duplicate window, unless a stream of that name exists (then it is left as it is, and
 * *created is false; a different duplicate window is reported in err->message with rc 0).
 * Blocking. MC_EIO / MC_ESERVER on failure. */
int mc__nats_ensure_stream(mc__nats_t *n, const char *name, const char *const *subjects,
                           int n_subjects, int64_t duplicate_window_ms, bool *created,
                           mc_error_t *err);

typedef struct mc__nats_status {
    mc__nats_state_t state;
    int64_t in_flight;
    uint64_t reconnects;
    char last_error[256];
} mc__nats_status_t;

void mc__nats_status(mc__nats_t *n, mc__nats_status_t *out);

#endif
