/*
 * fuzz_tls_input.c: libFuzzer target for what a TLS connection reads before (and instead of)
 * a handshake (src/daemon/tls.c: mcd_tls_conn_put/feed, the plain-HTTP sniffing, the bound on
 * input before the handshake). The first input byte picks how the rest is split into reads
 * (as TCP may split it); every read goes through the session as tls_session.c drives it.
 * Checked invariants: plaintext never exceeds the buffer; a session that failed, saw plain
 * HTTP, too much input or close_notify is not fed again; a failed handshake leaves the
 * session not established with a reason; the output (alerts) is readable and can be
 * released. The certificate is a self-signed P-256 one made at the first call into a
 * temporary directory. Single-threaded.
 */
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static mcd_tls_ctx_t *make_ctx(void)
{
    static char dir[64] = "/tmp/mc-fuzz-tls-XXXXXX";
    if (!mkdtemp(dir)) {
        abort();
    }
    char cert[128], key[128];
    snprintf(cert, sizeof(cert), "%s/cert.pem", dir);
    snprintf(key, sizeof(key), "%s/key.pem", dir);
    EVP_PKEY *pkey = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"fuzz", -1, -1,
                               0);
    X509_set_issuer_name(x, name);
    X509_set_pubkey(x, pkey);
    X509_sign(x, pkey, EVP_sha256());
    FILE *f = fopen(cert, "w");
    PEM_write_X509(f, x);
    fclose(f);
    f = fopen(key, "w");
    PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(pkey);
    mc_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.server.tls.enabled = true;
    cfg.server.tls.cert_file = cert;
    cfg.server.tls.key_file = key;
    cfg.server.tls.min_version = "1.2";
    mcd_tls_ctx_t *ctx = NULL;
    mc_error_t err;
    if (mcd_tls_ctx_new(&cfg, &ctx, &err) != 0) {
        abort();
    }
    unlink(cert);
    unlink(key);
    rmdir(dir);
    return ctx;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mcd_tls_ctx_t *ctx;
    if (!ctx) {
        ctx = make_ctx();
    }
    if (size < 1) {
        return 0;
    }
    size_t step = data[0] ? data[0] * 7u : size;
    data++;
    size--;
    mcd_tls_conn_t *s = mcd_tls_conn_new(ctx);
    if (!s) {
        return 0;
    }
    static char plain[4096];
    bool done = false;
    for (size_t off = 0; off < size && !done; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (mcd_tls_conn_put(s, data + off, n) != 0) {
            abort();
        }
        for (;;) {
            size_t got = 0;
            mcd_tls_feed_result_t r = mcd_tls_conn_feed(s, plain, sizeof(plain), &got);
            if (got > sizeof(plain)) {
                abort();
            }
            if (r == MCD_TLS_HANDSHAKE_DONE || (r == MCD_TLS_MORE && got > 0)) {
                continue;
            }
            if (r == MCD_TLS_FAILED && !mcd_tls_conn_established(s) &&
                strlen(mcd_tls_conn_error(s)) == 0) {
                abort();
            }
            done = r != MCD_TLS_MORE;
            break;
        }
        const char *out = NULL;
        size_t len = mcd_tls_conn_output(s, &out);
        if (len && !out) {
            abort();
        }
        volatile char sink = len ? out[len - 1] : 0;
        (void)sink;
        mcd_tls_conn_output_done(s);
    }
    mcd_tls_conn_free(s);
    return 0;
}
