/*
 * webhook_sign.c: Standard Webhooks v1 signing and verification (webhook_sign.h).
 *
 * Any thread: a signer is immutable after creation; each signature uses its own OpenSSL MAC
 * context. The HMAC input is fed in pieces (id, ".", timestamp, ".", body) so the body, which
 * may be large, is never copied. Keys are wiped (OPENSSL_cleanse) when the signer is freed.
 */
#include "sinks/webhook_sign.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#define PREFIX "whsec_"

struct mc__webhook_signer {
    EVP_MAC *mac;
    size_t n;
    struct {
        uint8_t bytes[MC__WEBHOOK_KEY_MAX];
        size_t len;
    } keys[MC__WEBHOOK_MAX_SECRETS];
};

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Strict standard base64 (RFC 4648 §4) with padding: the length is a multiple of 4, '=' only
 * at the end, and unused bits are zero, so one key has exactly one text form. Returns the
 * decoded length or -1. */
static long b64_decode(const char *in, size_t len, uint8_t *out, size_t cap)
{
    if (len == 0 || len % 4 != 0) {
        return -1;
    }
    size_t pad = in[len - 1] == '=' ? (in[len - 2] == '=' ? 2 : 1) : 0;
    size_t n = len / 4 * 3 - pad;
    if (n > cap) {
        return -1;
    }
    size_t o = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            bool is_pad = i + (size_t)k >= len - pad;
            v[k] = is_pad ? 0 : b64_value((unsigned char)in[i + (size_t)k]);
            if (v[k] < 0) {
                return -1;
            }
        }
        uint32_t w =
            (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        uint8_t b[3] = {(uint8_t)(w >> 16), (uint8_t)(w >> 8), (uint8_t)w};
        for (int k = 0; k < 3 && o < n; k++) {
            out[o++] = b[k];
        }
        if (i + 4 == len && ((pad == 1 && (w & 0xFF)) || (pad == 2 && (w & 0xFFFF)))) {
            return -1; /* non-zero bits under the padding */
        }
    }
    return (long)n;
}

void mc__webhook_signer_destroy(mc__webhook_signer_t *s)
{
    if (s) {
        EVP_MAC_free(s->mac);
        OPENSSL_cleanse(s->keys, sizeof s->keys);
        free(s);
    }
}

static mc__webhook_signer_t *signer_fail(mc__webhook_signer_t *s, mc_error_t *err, int code,
                                         const char *fmt, size_t index)
{
    mc__webhook_signer_destroy(s);
    mc_error_set(err, code, MC_DOMAIN_MONGOCAST, code, fmt, index);
    return NULL;
}

mc__webhook_signer_t *mc__webhook_signer_new(const char *const *secrets, size_t n, mc_error_t *err)
{
    if (n == 0 || n > MC__WEBHOOK_MAX_SECRETS) {
        return signer_fail(NULL, err, MC_ECONFIG, "between 1 and 8 secrets are needed (got %zu)",
                           n);
    }
    mc__webhook_signer_t *s = calloc(1, sizeof(*s));
    if (!s) {
        return signer_fail(NULL, err, MC_ENOMEM, "out of memory (%zu)", n);
    }
    s->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (!s->mac) {
        return signer_fail(s, err, MC_ENOMEM, "OpenSSL has no HMAC (%zu)", n);
    }
    for (size_t k = 0; k < n; k++) {
        const char *sec = secrets[k];
        size_t plen = strlen(PREFIX);
        if (!sec || strncmp(sec, PREFIX, plen) != 0) {
            return signer_fail(s, err, MC_ECONFIG,
                               "secret %zu: expected the form whsec_<base64 key>", k + 1);
        }
        long kl =
            b64_decode(sec + plen, strlen(sec + plen), s->keys[k].bytes, sizeof s->keys[k].bytes);
        if (kl < 0 && strlen(sec + plen) * 3 / 4 > MC__WEBHOOK_KEY_MAX) {
            return signer_fail(s, err, MC_ECONFIG, "secret %zu: the key is longer than 64 bytes",
                               k + 1);
        }
        if (kl < 0) {
            return signer_fail(s, err, MC_ECONFIG,
                               "secret %zu: the part after whsec_ is not valid base64", k + 1);
        }
        if (kl < MC__WEBHOOK_KEY_MIN) {
            return signer_fail(s, err, MC_ECONFIG,
                               "secret %zu: the key must be 24 to 64 random bytes", k + 1);
        }
        s->keys[k].len = (size_t)kl;
    }
    s->n = n;
    return s;
}

size_t mc__webhook_signer_count(const mc__webhook_signer_t *s)
{
    return s ? s->n : 0;
}

/* HMAC-SHA256(key, id "." timestamp "." body) into mac[32]. */
static bool hmac(const mc__webhook_signer_t *s, size_t k, const char *id, size_t id_len,
                 const char *ts, size_t ts_len, const void *body, size_t body_len, uint8_t *mac)
{
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(s->mac);
    if (!ctx) {
        return false;
    }
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    size_t out_len = 0;
    bool ok = EVP_MAC_init(ctx, s->keys[k].bytes, s->keys[k].len, params) &&
              EVP_MAC_update(ctx, (const unsigned char *)id, id_len) &&
              EVP_MAC_update(ctx, (const unsigned char *)".", 1) &&
              EVP_MAC_update(ctx, (const unsigned char *)ts, ts_len) &&
              EVP_MAC_update(ctx, (const unsigned char *)".", 1) &&
              (body_len == 0 || EVP_MAC_update(ctx, body, body_len)) &&
              EVP_MAC_final(ctx, mac, &out_len, 32) && out_len == 32;
    EVP_MAC_CTX_free(ctx);
    return ok;
}

static int check_id(const char *id, size_t id_len, int64_t timestamp, mc_error_t *err)
{
    if (!id || id_len == 0 || memchr(id, '.', id_len) || timestamp < 0) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "webhook-id must be non-empty without '.', the timestamp >= 0");
    }
    return 0;
}

int mc__webhook_sign(const mc__webhook_signer_t *s, const char *id, size_t id_len,
                     int64_t timestamp, const void *body, size_t body_len, char *out, size_t *len,
                     mc_error_t *err)
{
    int rc = check_id(id, id_len, timestamp, err);
    if (rc != 0) {
        return rc;
    }
    char ts[24];
    int ts_len = snprintf(ts, sizeof ts, "%" PRId64, timestamp);
    size_t n = 0;
    for (size_t k = 0; k < s->n; k++) {
        uint8_t mac[32];
        if (!hmac(s, k, id, id_len, ts, (size_t)ts_len, body, body_len, mac)) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                                "HMAC-SHA256 failed");
        }
        if (k > 0) {
            out[n++] = ' ';
        }
        memcpy(out + n, "v1,", 3);
        n += 3;
        n += (size_t)EVP_EncodeBlock((unsigned char *)out + n, mac, sizeof mac);
        OPENSSL_cleanse(mac, sizeof mac);
    }
    out[n] = '\0';
    if (len) {
        *len = n;
    }
    return 0;
}

int mc__webhook_verify(const mc__webhook_signer_t *s, const char *id, size_t id_len,
                       int64_t timestamp, const void *body, size_t body_len, const char *header,
                       int64_t now, int64_t tolerance_secs, mc_error_t *err)
{
    int rc = check_id(id, id_len, timestamp, err);
    if (rc != 0) {
        return mc_error_set(err, MC_EAUTH, MC_DOMAIN_MONGOCAST, MC_EAUTH, "bad webhook-id");
    }
    if (timestamp < now - tolerance_secs) {
        return mc_error_set(err, MC_EAUTH, MC_DOMAIN_MONGOCAST, MC_EAUTH, "message too old");
    }
    if (timestamp > now + tolerance_secs) {
        return mc_error_set(err, MC_EAUTH, MC_DOMAIN_MONGOCAST, MC_EAUTH,
                            "message timestamp too new");
    }
    char ts[24];
    int ts_len = snprintf(ts, sizeof ts, "%" PRId64, timestamp);
    /* One expected signature per key, compared with every "v1," entry of the header. */
    char expected[MC__WEBHOOK_MAX_SECRETS][48];
    for (size_t k = 0; k < s->n; k++) {
        uint8_t mac[32];
        if (!hmac(s, k, id, id_len, ts, (size_t)ts_len, body, body_len, mac)) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                                "HMAC-SHA256 failed");
        }
        EVP_EncodeBlock((unsigned char *)expected[k], mac, sizeof mac);
    }
    const char *p = header ? header : "";
    bool match = false;
    while (*p) {
        while (*p == ' ') {
            p++;
        }
        const char *end = strchr(p, ' ');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == 47 && strncmp(p, "v1,", 3) == 0) {
            for (size_t k = 0; k < s->n; k++) {
                match |= CRYPTO_memcmp(p + 3, expected[k], 44) == 0;
            }
        }
        p += n;
    }
    OPENSSL_cleanse(expected, sizeof expected);
    if (!match) {
        return mc_error_set(err, MC_EAUTH, MC_DOMAIN_MONGOCAST, MC_EAUTH, "no matching signature");
    }
    return 0;
}
