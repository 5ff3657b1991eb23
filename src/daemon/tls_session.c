/*
 * tls_session.c: what a TLS connection reads: the ciphertext goes into its session (tls.c),
 * the handshake advances, and the plaintext records are handed to the connection's session
 * (HTTP requests, WebSocket frames) exactly as a plain connection's reads are. Refuses a plain
 * HTTP request on the TLS port with a plaintext 400, and a failed handshake with OpenSSL's
 * alert, then closes.
 *
 * Thread: the loop thread that owns the connection.
 * Invariant: like a plain read, everything read is consumed before the read callback returns:
 * the ciphertext is copied into the session's input BIO, every complete record is decrypted
 * into the same (shared) read buffer and delivered at once; only an incomplete record stays
 * in the session, and before the handshake at most 64 KiB (tls.c).
 */
#include "server_internal.h"

static void count_failed(mcd_conn_t *c, const char *why)
{
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    mcd_conn_table(c)->stats.tls_handshakes_failed++;
    mc_log_ratelimited(&rl, MC_LOG_INFO, "server", "TLS handshake refused: %s", why);
}

void mcd_tls_input(mcd_conn_t *c, char *data, size_t len, size_t cap, mcd_input_fn deliver)
{
    if (c->state == MCD_ST_CLOSING) {
        return; /* drained until the peer closes, as for plain connections */
    }
    if (mcd_tls_conn_put(c->tls, data, len) != 0) {
        mcd_conn_abort(c);
        return;
    }
    for (;;) {
        size_t got = 0;
        mcd_tls_feed_result_t r = mcd_tls_conn_feed(c->tls, data, cap, &got);
        switch (r) {
        case MCD_TLS_MORE:
            if (got) {
                deliver(c, data, got);
                if (c->flags & MCD_CF_CLOSED) {
                    return;
                }
                continue;
            }
            /* Handshake messages or alerts the session wrote while reading. */
            mcd_conn_tls_flush(c, 0);
            return;
        case MCD_TLS_HANDSHAKE_DONE: {
            mcd_server_t *srv = mcd_conn_server(c);
            mcd_conn_table(c)->stats.tls_handshakes_ok++;
            /* The request gets its own full time after the handshake. */
            c->deadline_ms = (int64_t)uv_now(c->tcp.loop) + srv->timing.request_ms;
            if (mcd_conn_tls_flush(c, 0) != 0) {
                return;
            }
            continue;
        }
        case MCD_TLS_PLAINTEXT:
            /* A plain HTTP client on the TLS port: tell it in its own language (as nginx does),
             * then close. The connection is plain TCP from here on. */
            count_failed(c, "plain HTTP request on the TLS port");
            mcd_tls_conn_free(c->tls);
            c->tls = NULL;
            mcd_http_refuse(c, 400, "tls_required",
                            "this port speaks TLS: use https:// or wss://", false, NULL);
            return;
        case MCD_TLS_TOO_MUCH:
            count_failed(c, "too much input before the handshake completed");
            mcd_conn_abort(c);
            return;
        case MCD_TLS_FAILED:
            if (!mcd_tls_conn_established(c->tls)) {
                count_failed(c, mcd_tls_conn_error(c->tls));
                /* OpenSSL's alert tells the client why; then close. */
                if (mcd_conn_tls_flush(c, 0) == 0) {
                    mcd_conn_linger(c);
                }
                return;
            }
            {
                static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
                mc_log_ratelimited(&rl, MC_LOG_INFO, "server", "TLS connection failed: %s",
                                   mcd_tls_conn_error(c->tls));
            }
            mcd_conn_abort(c);
            return;
        case MCD_TLS_CLOSED:
            /* close_notify from the peer: nothing more will come. */
            mcd_conn_abort(c);
            return;
        }
    }
}
