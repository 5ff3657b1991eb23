/*
 * tls.h: TLS on the listener (server.tls): the server's certificate context, reloadable while
 * connections keep the one they started with, and the TLS state of one connection, driven
 * through memory BIOs so that libuv keeps doing every socket read and write and the loop never
 * blocks.
 *
 * Threads: mcd_tls_ctx_new(), mcd_tls_ctx_reload(), mcd_tls_ctx_destroy() and mcd_tls_check()
 * run on the owner's (main) thread; a connection's functions run on the loop thread that owns
 * the connection. The current SSL_CTX is handed out under a mutex with a reference of its own
 * (SSL_new takes one), so any number of loop threads may accept while a reload swaps it;
 * OpenSSL allows an SSL_CTX to be shared read-only between threads.
 */
#ifndef MONGOCAST_DAEMON_TLS_H
#define MONGOCAST_DAEMON_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast.h"

typedef struct mcd_tls_ctx mcd_tls_ctx_t;
typedef struct mcd_tls_conn mcd_tls_conn_t;

/* Builds a context from server.tls: loads the certificate chain and the key, checks that they
 * match (and the client CA file when set). Returns 0 or MC_ECONFIG / MC_ENOMEM with the file
 * and OpenSSL's reason in *err. */
int mcd_tls_ctx_new(const mc_config_t *cfg, mcd_tls_ctx_t **out, mc_error_t *err);
/* Re-reads the files named by `cfg` (server.tls) into a new SSL_CTX and makes it the one new
 * connections get; connections already open keep theirs until they close. On any error
 * nothing changes (the old certificate stays) and *err says why. Returns 0 or as
 * mcd_tls_ctx_new(). */
int mcd_tls_ctx_reload(mcd_tls_ctx_t *t, const mc_config_t *cfg, mc_error_t *err);
/* Drops the server's reference; open connections keep theirs. NULL is fine. */
void mcd_tls_ctx_destroy(mcd_tls_ctx_t *t);
/* `mongocast check` and reload: the files of server.tls load and match (nothing kept).
 * Returns 0 when TLS is off or everything loads. */
int mcd_tls_check(const mc_config_t *cfg, mc_error_t *err);
/* Subject and expiry of the current certificate, for logs ("CN=x, expires ..."). */
void mcd_tls_ctx_describe(mcd_tls_ctx_t *t, char *buf, size_t size);

/* ---- One connection (its loop thread) ------------------------------------------------------ */

/* A server-side TLS session for a new connection, on the current certificate. NULL: out of
 * memory. */
mcd_tls_conn_t *mcd_tls_conn_new(mcd_tls_ctx_t *t);
void mcd_tls_conn_free(mcd_tls_conn_t *tc);

/* What mcd_tls_conn_feed() found. */
typedef enum mcd_tls_feed_result {
    MCD_TLS_MORE = 0,    /* consumed; plaintext (if any) is in the caller's buffer */
    MCD_TLS_HANDSHAKE_DONE, /* the handshake completed with this input */
    MCD_TLS_FAILED,      /* handshake failed or a record was bad: send the output, close */
    MCD_TLS_CLOSED,      /* the peer sent close_notify */
    MCD_TLS_PLAINTEXT,   /* the first bytes are a plain HTTP request, not TLS */
    MCD_TLS_TOO_MUCH,    /* more unprocessed input than allowed before the handshake */
} mcd_tls_feed_result_t;

/* Hands `len` bytes read from the socket to the session (copied into its input BIO). */
int mcd_tls_conn_put(mcd_tls_conn_t *tc, const void *data, size_t len);
/* Advances the handshake, or decrypts into out[0..cap): *got is set to the plaintext length
 * (0 when nothing complete is there yet). Call again while *got > 0. */
mcd_tls_feed_result_t mcd_tls_conn_feed(mcd_tls_conn_t *tc, char *out, size_t cap, size_t *got);
bool mcd_tls_conn_established(const mcd_tls_conn_t *tc);
/* The reason of the last MCD_TLS_FAILED, for logs. */
const char *mcd_tls_conn_error(const mcd_tls_conn_t *tc);

/* Encrypts len plaintext bytes into the output. Returns 0, or -1 (the session failed). */
int mcd_tls_conn_encrypt(mcd_tls_conn_t *tc, const void *data, size_t len);
/* Queues close_notify into the output (after an established session only). */
void mcd_tls_conn_close_notify(mcd_tls_conn_t *tc);
/* The ciphertext waiting to be written: its bytes (valid until the next call on tc) and length. */
size_t mcd_tls_conn_output(mcd_tls_conn_t *tc, const char **data);
/* Forgets the output once the caller has written or copied it all. */
void mcd_tls_conn_output_done(mcd_tls_conn_t *tc);
/* Housekeeping of an idle connection: gives back an output buffer a burst made large. */
void mcd_tls_conn_trim(mcd_tls_conn_t *tc);

#endif
