/*
 * test_tls.c: the listener's TLS layer (src/daemon/tls.c) without sockets: a client SSL and a
 * server session (mcd_tls_conn_t) exchange bytes through memory; certificates are made here
 * with the OpenSSL API into a temporary directory. Covers the handshake and records both
 * ways (one large message as several records), plain HTTP and garbage on the TLS port, the
 * certificate reload (open sessions keep theirs, new ones get the new one, a bad key or a
 * missing file is refused and the current certificate stays) and mcd_tls_check().
 *
 * Thread: the test's main thread only.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tls.h"

static char dir[64];

/* A self-signed P-256 certificate for `cn`: dir/<name>.pem and dir/<name>.key. */
static void make_cert(const char *name, const char *cn)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    assert_non_null(key);
    X509 *x = X509_new();
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_NAME *subject = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, subject);
    X509_set_pubkey(x, key);
    assert_true(X509_sign(x, key, EVP_sha256()) > 0);
    char path[128];
    snprintf(path, sizeof(path), "%s/%s.pem", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    PEM_write_X509(f, x);
    fclose(f);
    snprintf(path, sizeof(path), "%s/%s.key", dir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(key);
}

static char cert_path[128], key_path[128];

/* A config whose server.tls names dir/<cert>.pem and dir/<key>.key. */
static mc_config_t *config_for(const char *cert, const char *key)
{
    static mc_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    snprintf(cert_path, sizeof(cert_path), "%s/%s.pem", dir, cert);
    snprintf(key_path, sizeof(key_path), "%s/%s.key", dir, key);
    cfg.server.tls.enabled = true;
    cfg.server.tls.cert_file = cert_path;
    cfg.server.tls.key_file = key_path;
    cfg.server.tls.min_version = "1.2";
    return &cfg;
}

static int setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/mc-test-tls-XXXXXX");
    assert_non_null(mkdtemp(dir));
    make_cert("a", "server-a");
    make_cert("b", "server-b");
    return 0;
}

static int teardown(void **state)
{
    const char *names[] = {"a.pem", "a.key", "b.pem", "b.key"};
    char path[128];
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
    return 0;
}

/* ---- A client over memory ------------------------------------------------------------------ */

typedef struct client {
    SSL_CTX *ctx;
    SSL *ssl;
    BIO *in;  /* what the server sent */
    BIO *out; /* what the client sends */
} client_t;

static void client_init(client_t *c)
{
    c->ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
    c->ssl = SSL_new(c->ctx);
    c->in = BIO_new(BIO_s_mem());
    c->out = BIO_new(BIO_s_mem());
    BIO_set_mem_eof_return(c->in, -1);
    BIO_set_mem_eof_return(c->out, -1);
    SSL_set_bio(c->ssl, c->in, c->out);
    SSL_set_connect_state(c->ssl);
}

static void client_free(client_t *c)
{
    SSL_free(c->ssl);
    SSL_CTX_free(c->ctx);
}

/* Moves the server's output to the client. */
static void server_to_client(mcd_tls_conn_t *s, client_t *c)
{
    const char *data = NULL;
    size_t n = mcd_tls_conn_output(s, &data);
    if (n) {
        assert_int_equal(BIO_write(c->in, data, (int)n), (int)n);
    }
    mcd_tls_conn_output_done(s);
}

/* Moves the client's output to the server and feeds it; returns the last result and appends
 * plaintext to got (up to cap). */
static mcd_tls_feed_result_t client_to_server(client_t *c, mcd_tls_conn_t *s, char *got,
                                              size_t cap, size_t *got_len)
{
    char buf[65536];
    int n;
    while ((n = BIO_read(c->out, buf, sizeof(buf))) > 0) {
        assert_int_equal(mcd_tls_conn_put(s, buf, (size_t)n), 0);
    }
    mcd_tls_feed_result_t r;
    for (;;) {
        size_t len = 0;
        char plain[65536];
        r = mcd_tls_conn_feed(s, plain, sizeof(plain), &len);
        if (r == MCD_TLS_HANDSHAKE_DONE) {
            continue;
        }
        if (r != MCD_TLS_MORE || len == 0) {
            break;
        }
        if (got) {
            assert_true(*got_len + len <= cap);
            memcpy(got + *got_len, plain, len);
            *got_len += len;
        }
    }
    return r;
}

/* Runs the handshake to its end; returns the CN of the certificate the client was shown. */
static void handshake(client_t *c, mcd_tls_conn_t *s, char *cn, size_t cn_size)
{
    for (int i = 0; i < 10 && !(SSL_is_init_finished(c->ssl) && mcd_tls_conn_established(s));
         i++) {
        SSL_do_handshake(c->ssl);
        assert_int_equal(client_to_server(c, s, NULL, 0, NULL), MCD_TLS_MORE);
        server_to_client(s, c);
    }
    assert_true(SSL_is_init_finished(c->ssl));
    assert_true(mcd_tls_conn_established(s));
    X509 *peer = SSL_get1_peer_certificate(c->ssl);
    assert_non_null(peer);
    X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, (int)cn_size);
    X509_free(peer);
}

/* ---- Tests ---------------------------------------------------------------------------------- */

static void test_handshake_and_records(void **state)
{
    mcd_tls_ctx_t *ctx = NULL;
    mc_error_t err;
    assert_int_equal(mcd_tls_ctx_new(config_for("a", "a"), &ctx, &err), 0);
    mcd_tls_conn_t *s = mcd_tls_conn_new(ctx);
    assert_non_null(s);
    client_t c;
    client_init(&c);
    char cn[64] = "";
    handshake(&c, s, cn, sizeof(cn));
    assert_string_equal(cn, "server-a");

    /* Client -> server. */
    assert_int_equal(SSL_write(c.ssl, "GET / HTTP/1.1\r\n\r\n", 18), 18);
    char got[300000];
    size_t got_len = 0;
    assert_int_equal(client_to_server(&c, s, got, sizeof(got), &got_len), MCD_TLS_MORE);
    assert_int_equal(got_len, 18);
    assert_memory_equal(got, "GET / HTTP/1.1\r\n\r\n", 18);

    /* Server -> client: a small message and one of 100 KB (seven records). */
    static char big[100000];
    for (size_t i = 0; i < sizeof(big); i++) {
        big[i] = (char)('a' + i % 26);
    }
    assert_int_equal(mcd_tls_conn_encrypt(s, "hi", 2), 0);
    assert_int_equal(mcd_tls_conn_encrypt(s, big, sizeof(big)), 0);
    server_to_client(s, &c);
    size_t n = 0;
    int r;
    while ((r = SSL_read(c.ssl, got + n, (int)(sizeof(got) - n))) > 0) {
        n += (size_t)r;
    }
    assert_int_equal(n, 2 + sizeof(big));
    assert_memory_equal(got, "hi", 2);
    assert_memory_equal(got + 2, big, sizeof(big));
    /* After the burst the output buffer is empty and can be trimmed while idle. */
    const char *out = NULL;
    assert_int_equal(mcd_tls_conn_output(s, &out), 0);
    mcd_tls_conn_trim(s);
    assert_int_equal(mcd_tls_conn_encrypt(s, "x", 1), 0);
    server_to_client(s, &c);
    char one = 0;
    assert_int_equal(SSL_read(c.ssl, &one, 1), 1);
    assert_int_equal(one, 'x');

    /* close_notify from the client ends the session. */
    SSL_shutdown(c.ssl);
    assert_int_equal(client_to_server(&c, s, NULL, 0, NULL), MCD_TLS_CLOSED);
    client_free(&c);
    mcd_tls_conn_free(s);
    mcd_tls_ctx_destroy(ctx);
}

static void test_plain_http_and_garbage(void **state)
{
    mcd_tls_ctx_t *ctx = NULL;
    mc_error_t err;
    assert_int_equal(mcd_tls_ctx_new(config_for("a", "a"), &ctx, &err), 0);
    char plain[1024];
    size_t len;

    /* A plain HTTP request line. */
    mcd_tls_conn_t *s = mcd_tls_conn_new(ctx);
    assert_int_equal(mcd_tls_conn_put(s, "GET /healthz HTTP/1.1\r\n", 23), 0);
    assert_int_equal(mcd_tls_conn_feed(s, plain, sizeof(plain), &len), MCD_TLS_PLAINTEXT);
    mcd_tls_conn_free(s);

    /* Part of a TLS record header: wait for more. */
    s = mcd_tls_conn_new(ctx);
    assert_int_equal(mcd_tls_conn_put(s, "\x16\x03\x01", 3), 0);
    assert_int_equal(mcd_tls_conn_feed(s, plain, sizeof(plain), &len), MCD_TLS_MORE);
    assert_int_equal(len, 0);
    mcd_tls_conn_free(s);

    /* Bytes that are not TLS: the handshake fails with a reason and an alert to send. */
    static const unsigned char junk[] = {0x00, 0x01, 0x02, 0xff, 0xfe, 0x10, 0x20, 0x30, 0x40};
    s = mcd_tls_conn_new(ctx);
    assert_int_equal(mcd_tls_conn_put(s, junk, sizeof(junk)), 0);
    assert_int_equal(mcd_tls_conn_feed(s, plain, sizeof(plain), &len), MCD_TLS_FAILED);
    assert_true(strlen(mcd_tls_conn_error(s)) > 0);
    assert_false(mcd_tls_conn_established(s));
    mcd_tls_conn_free(s);

    /* A record type that is not a handshake before the handshake. */
    static const unsigned char app_data[] = {0x17, 0x03, 0x03, 0x00, 0x02, 0x00, 0x00};
    s = mcd_tls_conn_new(ctx);
    assert_int_equal(mcd_tls_conn_put(s, app_data, sizeof(app_data)), 0);
    assert_int_equal(mcd_tls_conn_feed(s, plain, sizeof(plain), &len), MCD_TLS_FAILED);
    mcd_tls_conn_free(s);
    mcd_tls_ctx_destroy(ctx);
}

static void test_reload_keeps_open_sessions(void **state)
{
    mcd_tls_ctx_t *ctx = NULL;
    mc_error_t err;
    assert_int_equal(mcd_tls_ctx_new(config_for("a", "a"), &ctx, &err), 0);
    mcd_tls_conn_t *before = mcd_tls_conn_new(ctx);

    assert_int_equal(mcd_tls_ctx_reload(ctx, config_for("b", "b"), &err), 0);
    mcd_tls_conn_t *after = mcd_tls_conn_new(ctx);
    char desc[512];
    mcd_tls_ctx_describe(ctx, desc, sizeof(desc));
    assert_non_null(strstr(desc, "CN=server-b"));

    /* A key that belongs to another certificate, then a missing file: refused, b stays. */
    assert_int_equal(mcd_tls_ctx_reload(ctx, config_for("a", "b"), &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "does not match the certificate"));
    mc_config_t *missing = config_for("b", "b");
    missing->server.tls.key_file = "/nonexistent/key.pem";
    assert_int_equal(mcd_tls_ctx_reload(ctx, missing, &err), MC_ECONFIG);
    assert_string_equal(err.message, "server.tls.key_file /nonexistent/key.pem: cannot open");
    mcd_tls_conn_t *later = mcd_tls_conn_new(ctx);

    /* The session made before the reload still shows a; the others b. */
    client_t c1, c2, c3;
    char cn1[64] = "", cn2[64] = "", cn3[64] = "";
    client_init(&c1);
    client_init(&c2);
    client_init(&c3);
    handshake(&c1, before, cn1, sizeof(cn1));
    handshake(&c2, after, cn2, sizeof(cn2));
    handshake(&c3, later, cn3, sizeof(cn3));
    assert_string_equal(cn1, "server-a");
    assert_string_equal(cn2, "server-b");
    assert_string_equal(cn3, "server-b");

    /* The server's context goes; open sessions keep theirs. */
    mcd_tls_ctx_destroy(ctx);
    assert_int_equal(mcd_tls_conn_encrypt(before, "still", 5), 0);
    server_to_client(before, &c1);
    char buf[8];
    assert_int_equal(SSL_read(c1.ssl, buf, sizeof(buf)), 5);
    client_free(&c1);
    client_free(&c2);
    client_free(&c3);
    mcd_tls_conn_free(before);
    mcd_tls_conn_free(after);
    mcd_tls_conn_free(later);
}

static void test_check(void **state)
{
    mc_error_t err;
    mc_config_t *cfg = config_for("a", "a");
    assert_int_equal(mcd_tls_check(cfg, &err), 0);
    cfg = config_for("a", "b");
    assert_int_equal(mcd_tls_check(cfg, &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "does not match"));
    /* A certificate file that holds a key: no certificate in it. */
    cfg = config_for("a", "a");
    cfg->server.tls.cert_file = key_path;
    assert_int_equal(mcd_tls_check(cfg, &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "server.tls.cert_file"));
    /* A directory is not a certificate file. */
    cfg = config_for("a", "a");
    cfg->server.tls.cert_file = dir;
    assert_int_equal(mcd_tls_check(cfg, &err), MC_ECONFIG);
    assert_non_null(strstr(err.message, "not a regular file"));
    /* TLS off: nothing to check. */
    cfg->server.tls.enabled = false;
    assert_int_equal(mcd_tls_check(cfg, &err), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_handshake_and_records),
        cmocka_unit_test(test_plain_http_and_garbage),
        cmocka_unit_test(test_reload_keeps_open_sessions),
        cmocka_unit_test(test_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
