/*
 * tls.c: TLS on the listener with OpenSSL 3 (see tls.h): the reloadable certificate context and
 * each connection's session over two memory BIOs (libuv reads ciphertext into the input BIO;
 * what OpenSSL writes to the output BIO is handed back to conn.c, which writes it).
 *
 * Threads: context construction, reload and check run on the owner's (main) thread; the
 * current SSL_CTX is read under `lock` by the loop thread(s) when they accept. A connection's
 * session is used only by its loop thread.
 * Invariants: a connection's SSL holds its own reference to the SSL_CTX it was created with,
 * so a reload never changes or frees the context of an open connection; a failed reload
 * leaves the current context untouched; before the handshake completes at most
 * MAX_INPUT_BEFORE_HANDSHAKE bytes of unprocessed input are held per connection.
 */
#include "tls.h"

#include <openssl/buffer.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_INPUT_BEFORE_HANDSHAKE (64u * 1024)
/* Output BIOs up to this size are reused as they are (see mcd_tls_conn_output_done()). */
#define SMALL_OUTPUT (8u * 1024)

struct mcd_tls_ctx {
    pthread_mutex_t lock;
    SSL_CTX *current; /* what new connections get */
};

struct mcd_tls_conn {
    SSL *ssl;
    BIO *in;  /* owned by ssl */
    BIO *out; /* owned by ssl */
    bool established;
    bool sniffed; /* the first input byte was looked at */
    unsigned long err; /* OpenSSL's error of the failure, 0: none recorded */
    int ssl_err;       /* SSL_get_error() of the failure */
};

/* ---- Context -------------------------------------------------------------------------------- */

/* OpenSSL's most recent error as text (and the queue cleared). */
static void last_ssl_error(char *buf, size_t size)
{
    unsigned long e = 0, last;
    while ((last = ERR_get_error()) != 0) {
        e = last;
    }
    if (e) {
        ERR_error_string_n(e, buf, size);
    } else {
        snprintf(buf, size, "unknown error");
    }
}

/* A key protected by a passphrase is refused instead of OpenSSL asking on the terminal. */
static int no_passphrase(char *buf, int size, int rwflag, void *userdata)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)userdata;
    return 0;
}

static int check_regular(const char *what, const char *path, mc_error_t *err)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "server.tls.%s %s: cannot open", what, path);
    }
    if (!S_ISREG(st.st_mode)) {
        /* A FIFO would block the reading thread. */
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "server.tls.%s %s: not a regular file", what, path);
    }
    return 0;
}

static int ssl_fail(mc_error_t *err, const char *what, const char *path)
{
    char why[256];
    last_ssl_error(why, sizeof(why));
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "server.tls.%s %s: %s",
                        what, path, why);
}

/* A new SSL_CTX from the files of server.tls. */
static int build_ctx(const mc_config_t *cfg, SSL_CTX **out, mc_error_t *err)
{
    *out = NULL;
    const char *cert = cfg->server.tls.cert_file;
    const char *key = cfg->server.tls.key_file;
    const char *ca = cfg->server.tls.client_ca_file;
    if (!cert || !key) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "server.tls needs cert_file and key_file");
    }
    int rc = check_regular("cert_file", cert, err);
    if (rc == 0) {
        rc = check_regular("key_file", key, err);
    }
    if (rc == 0 && ca) {
        rc = check_regular("client_ca_file", ca, err);
    }
    if (rc != 0) {
        return rc;
    }
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                            "cannot create a TLS context (out of memory)");
    }
    bool tls13 = cfg->server.tls.min_version && strcmp(cfg->server.tls.min_version, "1.3") == 0;
    SSL_CTX_set_min_proto_version(ctx, tls13 ? TLS1_3_VERSION : TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_TICKET);
    /* No session resumption: every connection makes a full handshake (no cache to bound). */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    /* An idle connection gives its record buffers back. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        rc = ssl_fail(err, "cert_file", cert);
    } else if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH) {
            ERR_clear_error();
            rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                              "server.tls.key_file %s does not match the certificate of %s",
                              key, cert);
        } else {
            rc = ssl_fail(err, "key_file", key);
        }
    } else if (SSL_CTX_check_private_key(ctx) != 1) {
        ERR_clear_error();
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                          "server.tls.key_file %s does not match the certificate of %s", key,
                          cert);
    } else if (ca) {
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca);
        if (!names || SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
            sk_X509_NAME_pop_free(names, X509_NAME_free);
            rc = ssl_fail(err, "client_ca_file", ca);
        } else {
            SSL_CTX_set_client_CA_list(ctx, names);
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
        }
    }
    if (rc != 0) {
        SSL_CTX_free(ctx);
        return rc;
    }
    *out = ctx;
    return 0;
}

int mcd_tls_ctx_new(const mc_config_t *cfg, mcd_tls_ctx_t **out, mc_error_t *err)
{
    *out = NULL;
    SSL_CTX *ctx = NULL;
    int rc = build_ctx(cfg, &ctx, err);
    if (rc != 0) {
        return rc;
    }
    mcd_tls_ctx_t *t = calloc(1, sizeof(*t));
    if (!t || pthread_mutex_init(&t->lock, NULL) != 0) {
        free(t);
        SSL_CTX_free(ctx);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    t->current = ctx;
    *out = t;
    return 0;
}

int mcd_tls_ctx_reload(mcd_tls_ctx_t *t, const mc_config_t *cfg, mc_error_t *err)
{
    SSL_CTX *ctx = NULL;
    int rc = build_ctx(cfg, &ctx, err);
    if (rc != 0) {
        return rc;
    }
    pthread_mutex_lock(&t->lock);
    SSL_CTX *old = t->current;
    t->current = ctx;
    pthread_mutex_unlock(&t->lock);
    SSL_CTX_free(old); /* open connections hold their own references */
    return 0;
}

void mcd_tls_ctx_destroy(mcd_tls_ctx_t *t)
{
    if (!t) {
        return;
    }
    SSL_CTX_free(t->current);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

int mcd_tls_check(const mc_config_t *cfg, mc_error_t *err)
{
    if (!cfg->server.tls.enabled) {
        return 0;
    }
    SSL_CTX *ctx = NULL;
    int rc = build_ctx(cfg, &ctx, err);
    SSL_CTX_free(ctx);
    return rc;
}

void mcd_tls_ctx_describe(mcd_tls_ctx_t *t, char *buf, size_t size)
{
    snprintf(buf, size, "?");
    pthread_mutex_lock(&t->lock);
    X509 *x = SSL_CTX_get0_certificate(t->current);
    if (x) {
        char subject[256] = "?";
        X509_NAME_oneline(X509_get_subject_name(x), subject, sizeof(subject));
        char until[64] = "?";
        BIO *b = BIO_new(BIO_s_mem());
        if (b && ASN1_TIME_print(b, X509_get0_notAfter(x)) == 1) {
            int n = BIO_read(b, until, (int)sizeof(until) - 1);
            until[n > 0 ? n : 0] = '\0';
        }
        BIO_free(b);
        snprintf(buf, size, "subject=%s not_after=\"%s\"", subject, until);
    }
    pthread_mutex_unlock(&t->lock);
}

/* ---- Connection ----------------------------------------------------------------------------- */

mcd_tls_conn_t *mcd_tls_conn_new(mcd_tls_ctx_t *t)
{
    mcd_tls_conn_t *tc = calloc(1, sizeof(*tc));
    if (!tc) {
        return NULL;
    }
    pthread_mutex_lock(&t->lock);
    tc->ssl = SSL_new(t->current); /* takes its own reference to the context */
    pthread_mutex_unlock(&t->lock);
    tc->in = BIO_new(BIO_s_mem());
    tc->out = BIO_new(BIO_s_mem());
    if (!tc->ssl || !tc->in || !tc->out) {
        BIO_free(tc->in);
        BIO_free(tc->out);
        SSL_free(tc->ssl);
        free(tc);
        return NULL;
    }
    /* An empty input means "wait for more", not end of file. */
    BIO_set_mem_eof_return(tc->in, -1);
    BIO_set_mem_eof_return(tc->out, -1);
    SSL_set_bio(tc->ssl, tc->in, tc->out);
    SSL_set_accept_state(tc->ssl);
    return tc;
}

void mcd_tls_conn_free(mcd_tls_conn_t *tc)
{
    if (!tc) {
        return;
    }
    SSL_free(tc->ssl); /* frees both BIOs and drops the context reference */
    free(tc);
}

int mcd_tls_conn_put(mcd_tls_conn_t *tc, const void *data, size_t len)
{
    return len <= INT32_MAX && BIO_write(tc->in, data, (int)len) == (int)len ? 0 : -1;
}

bool mcd_tls_conn_established(const mcd_tls_conn_t *tc)
{
    return tc->established;
}

static mcd_tls_feed_result_t failed(mcd_tls_conn_t *tc, int ssl_err)
{
    tc->ssl_err = ssl_err;
    unsigned long e = 0, last;
    while ((last = ERR_get_error()) != 0) {
        e = last;
    }
    tc->err = e;
    return MCD_TLS_FAILED;
}

/* Does the input start like an HTTP/1 request line ("GET /", "POST ...")? A TLS record
 * starts with its content type (22 for a handshake), never an upper-case letter. */
static bool looks_like_http(mcd_tls_conn_t *tc)
{
    char *p = NULL;
    long n = BIO_get_mem_data(tc->in, &p);
    if (n <= 0 || !p) {
        return false;
    }
    long i = 0;
    while (i < n && i < 8 && p[i] >= 'A' && p[i] <= 'Z') {
        i++;
    }
    return i >= 3 && (i == n || p[i] == ' ');
}

mcd_tls_feed_result_t mcd_tls_conn_feed(mcd_tls_conn_t *tc, char *out, size_t cap, size_t *got)
{
    *got = 0;
    if (!tc->established) {
        if (!tc->sniffed && BIO_ctrl_pending(tc->in) > 0) {
            tc->sniffed = true;
            if (looks_like_http(tc)) {
                return MCD_TLS_PLAINTEXT;
            }
        }
        ERR_clear_error();
        int r = SSL_do_handshake(tc->ssl);
        if (r == 1) {
            tc->established = true;
            return MCD_TLS_HANDSHAKE_DONE;
        }
        int e = SSL_get_error(tc->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            return BIO_ctrl_pending(tc->in) > MAX_INPUT_BEFORE_HANDSHAKE ? MCD_TLS_TOO_MUCH
                                                                          : MCD_TLS_MORE;
        }
        return failed(tc, e);
    }
    if (BIO_ctrl_pending(tc->in) == 0 && !SSL_has_pending(tc->ssl)) {
        return MCD_TLS_MORE; /* nothing buffered: no need to ask OpenSSL */
    }
    ERR_clear_error();
    int n = SSL_read(tc->ssl, out, cap > INT32_MAX ? INT32_MAX : (int)cap);
    if (n > 0) {
        *got = (size_t)n;
        return MCD_TLS_MORE;
    }
    int e = SSL_get_error(tc->ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        return MCD_TLS_MORE;
    }
    if (e == SSL_ERROR_ZERO_RETURN) {
        return MCD_TLS_CLOSED;
    }
    return failed(tc, e);
}

const char *mcd_tls_conn_error(const mcd_tls_conn_t *tc)
{
    static _Thread_local char buf[256];
    if (tc->err) {
        ERR_error_string_n(tc->err, buf, sizeof(buf));
    } else if (tc->ssl_err == SSL_ERROR_SYSCALL) {
        snprintf(buf, sizeof(buf), "unexpected end of the TLS stream");
    } else {
        snprintf(buf, sizeof(buf), "TLS error %d", tc->ssl_err);
    }
    return buf;
}

int mcd_tls_conn_encrypt(mcd_tls_conn_t *tc, const void *data, size_t len)
{
    if (len == 0) {
        return 0;
    }
    if (len > INT32_MAX) {
        return -1;
    }
    ERR_clear_error();
    /* The output is a memory BIO: the whole write is encrypted at once. */
    int r = SSL_write(tc->ssl, data, (int)len);
    if (r != (int)len) {
        failed(tc, SSL_get_error(tc->ssl, r));
        return -1;
    }
    return 0;
}

void mcd_tls_conn_close_notify(mcd_tls_conn_t *tc)
{
    if (tc->established) {
        ERR_clear_error();
        SSL_shutdown(tc->ssl);
        ERR_clear_error();
    }
}

size_t mcd_tls_conn_output(mcd_tls_conn_t *tc, const char **data)
{
    char *p = NULL;
    long n = BIO_get_mem_data(tc->out, &p);
    *data = p;
    return n > 0 ? (size_t)n : 0;
}

/* A fresh, empty output BIO instead of the current one (which must hold nothing unwritten). */
static bool replace_output(mcd_tls_conn_t *tc)
{
    BIO *fresh = BIO_new(BIO_s_mem());
    if (!fresh) {
        return false;
    }
    BIO_set_mem_eof_return(fresh, -1);
    SSL_set0_wbio(tc->ssl, fresh); /* frees the old one */
    tc->out = fresh;
    return true;
}

void mcd_tls_conn_trim(mcd_tls_conn_t *tc)
{
    BUF_MEM *bm = NULL;
    BIO_get_mem_ptr(tc->out, &bm);
    if (bm && bm->length == 0 && bm->max > SMALL_OUTPUT) {
        replace_output(tc);
    }
}

void mcd_tls_conn_output_done(mcd_tls_conn_t *tc)
{
    /* Resetting a memory BIO clears its whole allocation, not just what was written: a
     * buffer that a burst made large, and that now carries little, is replaced by a fresh
     * one instead (so a reset never clears more than four times what it carried, and an
     * idle connection does not keep the burst's memory). */
    BUF_MEM *bm = NULL;
    BIO_get_mem_ptr(tc->out, &bm);
    if (bm && bm->max > SMALL_OUTPUT && bm->length < bm->max / 4 && replace_output(tc)) {
        return;
    }
    (void)BIO_reset(tc->out);
}
