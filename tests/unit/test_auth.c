/*
 * test_auth.c: JWT verification (src/daemon/auth.c) with tokens built here byte by byte with
 * OpenSSL, so that tests can also forge what a correct library would never produce (alg
 * none, HS/RS confusion, non-canonical base64, duplicate claims). RSA and EC key pairs are
 * generated at test time; only their public halves are written, to a temporary directory
 * removed at the end. Also the subscriber rules (mcd_auth_subscriber) and the Origin
 * allowlist. Main thread only.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "b64url.h"

#define SECRET "0123456789abcdef0123456789abcdef-test-secret"
#define NOW ((int64_t)1700000000)

static char tmpdir[64];
static char rsa_pub_path[128], rsa2_pub_path[128], ec_pub_path[128];
static EVP_PKEY *rsa_key, *rsa2_key, *ec_key;

/* ---- Token forging ------------------------------------------------------------------- */

typedef enum sig_kind {
    SIG_NONE,  /* empty signature segment */
    SIG_JUNK,  /* a non-empty signature that signs nothing */
    SIG_HMAC,  /* HMAC-SHA256 with `hmac_key` */
    SIG_RSA,   /* RSASSA-PKCS1-v1_5 SHA-256 with `pkey` */
    SIG_ECDSA, /* ECDSA P-256 SHA-256, JWS R||S form, with `pkey` */
} sig_kind_t;

/* Returns a malloc'ed compact token. */
static char *forge(const char *header, const char *payload, sig_kind_t kind, const void *hmac_key,
                   size_t hmac_len, EVP_PKEY *pkey)
{
    size_t cap = 3 * (strlen(header) + strlen(payload)) + 1024;
    char *tok = malloc(cap);
    b64url((const unsigned char *)header, strlen(header), tok);
    strcat(tok, ".");
    b64url((const unsigned char *)payload, strlen(payload), tok + strlen(tok));
    size_t signing_len = strlen(tok);
    strcat(tok, ".");
    unsigned char sig[1024];
    size_t sig_len = 0;
    if (kind == SIG_JUNK) {
        memcpy(sig, "not a signature", 15);
        sig_len = 15;
    } else if (kind == SIG_HMAC) {
        unsigned int n = 0;
        HMAC(EVP_sha256(), hmac_key, (int)hmac_len, (const unsigned char *)tok, signing_len, sig,
             &n);
        sig_len = n;
    } else if (kind == SIG_RSA || kind == SIG_ECDSA) {
        unsigned char der[1024];
        size_t der_len = sizeof(der);
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        assert_int_equal(EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, pkey), 1);
        assert_int_equal(EVP_DigestSign(md, der, &der_len, (const unsigned char *)tok, signing_len),
                         1);
        EVP_MD_CTX_free(md);
        if (kind == SIG_RSA) {
            memcpy(sig, der, der_len);
            sig_len = der_len;
        } else {
            const unsigned char *p = der;
            ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
            assert_non_null(es);
            const BIGNUM *r, *s;
            ECDSA_SIG_get0(es, &r, &s);
            BN_bn2binpad(r, sig, 32);
            BN_bn2binpad(s, sig + 32, 32);
            ECDSA_SIG_free(es);
            sig_len = 64;
        }
    }
    b64url(sig, sig_len, tok + strlen(tok));
    return tok;
}

static char *hs(const char *payload)
{
    return forge("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", payload, SIG_HMAC, SECRET, strlen(SECRET),
                 NULL);
}

/* ---- Config -------------------------------------------------------------------------- */

typedef struct fx {
    mc_config_t cfg;
    mcd_auth_t *auth;
} fx_t;

static void base_config(mc_config_t *c, const char *alg)
{
    memset(c, 0, sizeof(*c));
    c->auth.enabled = true;
    c->auth.algorithm = (char *)alg;
    c->auth.identity_claim = (char *)"sub";
    c->auth.admin_role = (char *)"mongocast:all";
    if (strcmp(alg, "HS256") == 0) {
        c->auth.secret = (char *)SECRET;
    } else if (strcmp(alg, "RS256") == 0) {
        c->auth.public_key_file = rsa_pub_path;
    } else {
        c->auth.public_key_file = ec_pub_path;
    }
}

static mcd_auth_t *make_auth(const mc_config_t *c)
{
    mc_error_t err = {0};
    mcd_auth_t *a = mcd_auth_new(c, &err);
    if (!a) {
        fail_msg("mcd_auth_new: %s", err.message);
    }
    return a;
}

/* Verifies and returns the refusal message, or "ok". */
static const char *verify(const mcd_auth_t *a, const char *tok, int64_t now, mcd_identity_t *id)
{
    static mcd_refusal_t r;
    mcd_identity_t scratch;
    memset(&r, 0, sizeof(r));
    if (mcd_auth_verify(a, tok, now, id ? id : &scratch, &r) == 0) {
        return "ok";
    }
    assert_int_equal(r.status, 401);
    assert_string_equal(r.code, "unauthorized");
    return r.message;
}

static void check(const mcd_auth_t *a, char *tok, const char *want)
{
    const char *got = verify(a, tok, NOW, NULL);
    if (strcmp(got, want) != 0) {
        fail_msg("token %s: got '%s', want '%s'", tok, got, want);
    }
    free(tok);
}

/* ---- Key pairs ------------------------------------------------------------------------- */

static void write_pub(EVP_PKEY *k, const char *path)
{
    BIO *b = BIO_new_file(path, "w");
    assert_non_null(b);
    assert_int_equal(PEM_write_bio_PUBKEY(b, k), 1);
    BIO_free(b);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mc_test_auth.XXXXXX");
    if (!mkdtemp(tmpdir)) {
        return -1;
    }
    rsa_key = EVP_RSA_gen(2048);
    rsa2_key = EVP_RSA_gen(2048);
    ec_key = EVP_EC_gen("P-256");
    if (!rsa_key || !rsa2_key || !ec_key) {
        return -1;
    }
    snprintf(rsa_pub_path, sizeof(rsa_pub_path), "%s/rsa.pem", tmpdir);
    snprintf(rsa2_pub_path, sizeof(rsa2_pub_path), "%s/rsa2.pem", tmpdir);
    snprintf(ec_pub_path, sizeof(ec_pub_path), "%s/ec.pem", tmpdir);
    write_pub(rsa_key, rsa_pub_path);
    write_pub(rsa2_key, rsa2_pub_path);
    write_pub(ec_key, ec_pub_path);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    unlink(rsa_pub_path);
    unlink(rsa2_pub_path);
    unlink(ec_pub_path);
    char p[160];
    snprintf(p, sizeof(p), "%s/bad.pem", tmpdir);
    unlink(p);
    rmdir(tmpdir);
    EVP_PKEY_free(rsa_key);
    EVP_PKEY_free(rsa2_key);
    EVP_PKEY_free(ec_key);
    return 0;
}

static int setup_hs(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    base_config(&f->cfg, "HS256");
    f->auth = make_auth(&f->cfg);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx_t *f = *state;
    mcd_auth_destroy(f->auth);
    free(f);
    return 0;
}

/* ---- Tests ----------------------------------------------------------------------------- */

static void test_hs256_good(void **state)
{
    fx_t *f = *state;
    assert_true(mcd_auth_enabled(f->auth));
    mcd_identity_t id;
    char *t = hs("{\"sub\":\"u1\",\"exp\":1700000300}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    free(t);
    assert_true(id.authenticated);
    assert_string_equal(id.subject, "u1");
    assert_false(id.is_admin);
    assert_int_equal(id.expires_at, 1700000300);
    assert_false(id.auth_disabled);
}

static void test_rs256_good_and_wrong_key(void **state)
{
    (void)state;
    mc_config_t c;
    base_config(&c, "RS256");
    mcd_auth_t *a = make_auth(&c);
    mcd_identity_t id;
    const char *hdr = "{\"alg\":\"RS256\",\"typ\":\"JWT\"}";
    char *t = forge(hdr, "{\"sub\":\"alice\",\"exp\":1700000300}", SIG_RSA, NULL, 0, rsa_key);
    assert_string_equal(verify(a, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "alice");
    free(t);
    /* Signed by another RSA key. */
    check(a, forge(hdr, "{\"sub\":\"alice\"}", SIG_RSA, NULL, 0, rsa2_key), "bad signature");
    /* One flipped payload byte under a valid signature. */
    t = forge(hdr, "{\"sub\":\"alice\"}", SIG_RSA, NULL, 0, rsa_key);
    char *dot = strchr(t, '.');
    dot[2] = dot[2] == 'A' ? 'B' : 'A';
    assert_string_not_equal(verify(a, t, NOW, NULL), "ok");
    free(t);
    mcd_auth_destroy(a);
}

static void test_es256_good_and_wrong_key(void **state)
{
    (void)state;
    mc_config_t c;
    base_config(&c, "ES256");
    mcd_auth_t *a = make_auth(&c);
    mcd_identity_t id;
    const char *hdr = "{\"alg\":\"ES256\"}";
    char *t =
        forge(hdr, "{\"sub\":\"bob\",\"roles\":[\"mongocast:all\"]}", SIG_ECDSA, NULL, 0, ec_key);
    assert_string_equal(verify(a, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "bob");
    assert_true(id.is_admin);
    assert_int_equal(id.expires_at, 0);
    free(t);
    EVP_PKEY *other = EVP_EC_gen("P-256");
    check(a, forge(hdr, "{\"sub\":\"bob\"}", SIG_ECDSA, NULL, 0, other), "bad signature");
    EVP_PKEY_free(other);
    /* An RSA-signed token claiming ES256. */
    check(a, forge(hdr, "{\"sub\":\"bob\"}", SIG_RSA, NULL, 0, rsa_key), "bad signature");
    mcd_auth_destroy(a);
}

static void test_alg_none_and_other_algs(void **state)
{
    fx_t *f = *state;
    const char *p = "{\"sub\":\"u1\"}";
    check(f->auth, forge("{\"alg\":\"none\"}", p, SIG_NONE, NULL, 0, NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"alg\":\"none\"}", p, SIG_JUNK, NULL, 0, NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"alg\":\"None\"}", p, SIG_JUNK, NULL, 0, NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"typ\":\"JWT\"}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"alg\":\"hs256\"}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"alg\":\"HS512\"}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "algorithm not allowed");
    check(f->auth, forge("{\"alg\":[\"HS256\"]}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "algorithm not allowed");
    /* We implement no JWS extension, so a critical one must be refused. */
    check(
        f->auth,
        forge("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
        "unsupported critical header");
    /* HS256 with the wrong secret. */
    check(f->auth,
          forge("{\"alg\":\"HS256\"}", p, SIG_HMAC, "another secret of the same length....", 37,
                NULL),
          "bad signature");
}

static void test_hs_rs_confusion(void **state)
{
    (void)state;
    /* RS256 configured: an attacker HMACs a token with our public key PEM as the secret. */
    mc_config_t c;
    base_config(&c, "RS256");
    mcd_auth_t *a = make_auth(&c);
    FILE *fp = fopen(rsa_pub_path, "rb");
    char pem[4096];
    size_t n = fread(pem, 1, sizeof(pem), fp);
    fclose(fp);
    check(a,
          forge("{\"alg\":\"HS256\"}", "{\"sub\":\"admin\",\"roles\":[\"mongocast:all\"]}",
                SIG_HMAC, pem, n, NULL),
          "algorithm not allowed");
    /* The same with the header claiming RS256 but carrying an HMAC: the signature fails. */
    check(a, forge("{\"alg\":\"RS256\"}", "{\"sub\":\"admin\"}", SIG_HMAC, pem, n, NULL),
          "bad signature");
    mcd_auth_destroy(a);

    /* HS256 configured: an RS256 token (validly signed with some RSA key) is refused. */
    base_config(&c, "HS256");
    a = make_auth(&c);
    check(a, forge("{\"alg\":\"RS256\"}", "{\"sub\":\"u1\"}", SIG_RSA, NULL, 0, rsa_key),
          "algorithm not allowed");
    check(a, forge("{\"alg\":\"ES256\"}", "{\"sub\":\"u1\"}", SIG_ECDSA, NULL, 0, ec_key),
          "algorithm not allowed");
    mcd_auth_destroy(a);
}

static void test_exp_nbf_leeway(void **state)
{
    fx_t *f = *state;
    char p[128];
    /* exp: refused from exp + 60 s on. */
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"exp\":%lld}", (long long)(NOW - 61));
    check(f->auth, hs(p), "token expired");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"exp\":%lld}", (long long)(NOW - 60));
    check(f->auth, hs(p), "token expired");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"exp\":%lld}", (long long)(NOW - 59));
    check(f->auth, hs(p), "ok");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"exp\":%lld.75}", (long long)(NOW - 59));
    check(f->auth, hs(p), "ok");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":\"1800000000\"}"), "invalid exp claim");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":null}"), "invalid exp claim");
    /* nbf: accepted up to 60 s early. */
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"nbf\":%lld}", (long long)(NOW + 61));
    check(f->auth, hs(p), "token not yet valid");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"nbf\":%lld}", (long long)(NOW + 60));
    check(f->auth, hs(p), "ok");
    check(f->auth, hs("{\"sub\":\"u\",\"nbf\":true}"), "invalid nbf claim");
    /* Absurd values do not overflow into acceptance or refusal. */
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":9223372036854775807}"), "ok");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":-9223372036854775807}"), "token expired");
    check(f->auth, hs("{\"sub\":\"u\",\"nbf\":9223372036854775807}"), "token not yet valid");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":1e300}"), "exp out of range");
    /* No exp at all: accepted, expires_at 0 (documented in docs/protocol.md). */
    mcd_identity_t id;
    char *t = hs("{\"sub\":\"u\"}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    assert_int_equal(id.expires_at, 0);
    free(t);
}

/* Claims whose values used to be refused with the wrong reason ("bad signature": libjwt
 * parsed the payload with jansson, which refuses integers past 2^63 and "\u0000", before it
 * checked the signature) or misread (libbson's reader wraps 2^64 to 0). Each now has its own
 * reason, given only once the signature holds. */
static void test_claim_reasons(void **state)
{
    fx_t *f = *state;
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":18446744073709551616}"), "exp out of range");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":9223372036854775808}"), "exp out of range");
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":-18446744073709551616}"), "exp out of range");
    /* 2^64 + NOW + 1000 would wrap to a valid-looking NOW + 1000. */
    check(f->auth, hs("{\"sub\":\"u\",\"exp\":18446744075409552616}"), "exp out of range");
    check(f->auth, hs("{\"sub\":\"u\",\"nbf\":18446744073709551616}"), "nbf out of range");
    check(f->auth, hs("{\"sub\":\"u\",\"nbf\":-1e300}"), "nbf out of range");
    check(f->auth, hs("{\"sub\":\"u3\\u0000evil\"}"), "identity claim contains NUL");
    check(f->auth, hs("{\"sub\":\"\\u0000\"}"), "identity claim contains NUL");
    /* An identity past int64 is a double now, not 0. */
    check(f->auth, hs("{\"sub\":18446744073709551616}"), "identity claim invalid");
    /* The same claims under a forged signature: only the signature is reported. */
    const char *h = "{\"alg\":\"HS256\"}";
    check(f->auth,
          forge(h, "{\"sub\":\"u\",\"exp\":18446744073709551616}", SIG_JUNK, NULL, 0, NULL),
          "bad signature");
    check(f->auth, forge(h, "{\"sub\":\"u3\\u0000evil\"}", SIG_JUNK, NULL, 0, NULL),
          "bad signature");
    check(f->auth,
          forge(h, "{\"sub\":\"u3\\u0000evil\"}", SIG_HMAC, "another secret of the same length....",
                37, NULL),
          "bad signature");

    /* iat: up to 60 s in the future is clock skew, beyond that the token is refused. */
    char p[160];
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"iat\":%lld}", (long long)(NOW + 61));
    check(f->auth, hs(p), "token issued in the future");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"iat\":%lld.5}", (long long)(NOW + 60));
    check(f->auth, hs(p), "ok");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"iat\":%lld,\"exp\":%lld}", (long long)(NOW - 86400),
             (long long)(NOW + 60));
    check(f->auth, hs(p), "ok");
    check(f->auth, hs("{\"sub\":\"u\",\"iat\":9223372036854775807}"), "token issued in the future");
    check(f->auth, hs("{\"sub\":\"u\",\"iat\":-9223372036854775807}"), "ok");
    check(f->auth, hs("{\"sub\":\"u\",\"iat\":18446744073709551616}"), "iat out of range");
    check(f->auth, hs("{\"sub\":\"u\",\"iat\":\"now\"}"), "invalid iat claim");
    check(f->auth, hs("{\"sub\":\"u\",\"iat\":null}"), "invalid iat claim");
    /* A token expired and issued in the future: the expiry is reported first. */
    snprintf(p, sizeof(p), "{\"sub\":\"u\",\"iat\":%lld,\"exp\":1}", (long long)(NOW + 600));
    check(f->auth, hs(p), "token expired");

    /* The reasons never carry the claim values. */
    char *t = hs("{\"sub\":\"SENSITIVE\\u0000X\",\"iat\":99999999999}");
    const char *msg = verify(f->auth, t, NOW, NULL);
    assert_null(strstr(msg, "SENSITIVE"));
    assert_null(strstr(msg, "99999999999"));
    free(t);
}

/* The signature check itself (OpenSSL, no JWT library): wrong lengths and truncations. */
static void test_signature_lengths(void **state)
{
    fx_t *f = *state;
    /* An HMAC cut to 31 bytes, or with a byte more. */
    char *t = hs("{\"sub\":\"u\"}");
    char *sig = strrchr(t, '.') + 1;
    size_t n = strlen(sig);
    assert_int_equal(n, 43);
    char shorter[256];
    memcpy(shorter, t, (size_t)(sig - t));
    unsigned char mac[33];
    memset(mac, 0, sizeof(mac));
    b64url(mac, 31, shorter + (sig - t));
    check(f->auth, strdup(shorter), "bad signature");
    b64url(mac, 33, shorter + (sig - t));
    check(f->auth, strdup(shorter), "bad signature");
    free(t);

    mc_config_t c;
    base_config(&c, "ES256");
    mcd_auth_t *a = make_auth(&c);
    const char *hdr = "{\"alg\":\"ES256\"}";
    t = forge(hdr, "{\"sub\":\"bob\",\"exp\":18446744073709551616}", SIG_ECDSA, NULL, 0, ec_key);
    assert_string_equal(verify(a, t, NOW, NULL), "exp out of range");
    free(t);
    /* R || S must be exactly 64 bytes: the DER form, or one byte short, is refused. */
    check(a, forge(hdr, "{\"sub\":\"bob\"}", SIG_RSA, NULL, 0, ec_key), "bad signature");
    t = forge(hdr, "{\"sub\":\"bob\"}", SIG_ECDSA, NULL, 0, ec_key);
    sig = strrchr(t, '.') + 1;
    assert_int_equal(strlen(sig), 86);
    sig[84] = '\0'; /* 63 bytes */
    assert_string_equal(verify(a, t, NOW, NULL), "bad signature");
    free(t);
    /* R = S = 0 */
    t = forge(hdr, "{\"sub\":\"bob\"}", SIG_ECDSA, NULL, 0, ec_key);
    sig = strrchr(t, '.') + 1;
    unsigned char zero[64] = {0};
    b64url(zero, 64, sig);
    assert_string_equal(verify(a, t, NOW, NULL), "bad signature");
    free(t);
    mcd_auth_destroy(a);

    base_config(&c, "RS256");
    a = make_auth(&c);
    t = forge("{\"alg\":\"RS256\"}", "{\"sub\":\"a\\u0000b\"}", SIG_RSA, NULL, 0, rsa_key);
    assert_string_equal(verify(a, t, NOW, NULL), "identity claim contains NUL");
    free(t);
    mcd_auth_destroy(a);
}

static void test_iss_aud(void **state)
{
    fx_t *f = *state;
    mc_config_t c = f->cfg;
    c.auth.issuer = (char *)"https://idp.example";
    c.auth.audience = (char *)"mongocast";
    mcd_auth_t *a = make_auth(&c);
    const char *iss = "\"iss\":\"https://idp.example\"";
    char p[256];
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":\"mongocast\"}", iss);
    check(a, hs(p), "ok");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":[\"other\",\"mongocast\"]}", iss);
    check(a, hs(p), "ok");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":[\"other\",\"mongocast2\"]}", iss);
    check(a, hs(p), "wrong audience");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":\"MongoCast\"}", iss);
    check(a, hs(p), "wrong audience");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s}", iss);
    check(a, hs(p), "wrong audience");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":[]}", iss);
    check(a, hs(p), "wrong audience");
    snprintf(p, sizeof(p), "{\"sub\":\"u\",%s,\"aud\":{\"0\":\"mongocast\"}}", iss);
    check(a, hs(p), "wrong audience");
    check(a, hs("{\"sub\":\"u\",\"iss\":\"https://evil.example\",\"aud\":\"mongocast\"}"),
          "wrong issuer");
    check(a, hs("{\"sub\":\"u\",\"aud\":\"mongocast\"}"), "wrong issuer");
    check(a, hs("{\"sub\":\"u\",\"iss\":[\"https://idp.example\"],\"aud\":\"mongocast\"}"),
          "wrong issuer");
    mcd_auth_destroy(a);
    /* Not configured: not checked. */
    check(f->auth, hs("{\"sub\":\"u\",\"iss\":\"whoever\",\"aud\":\"whatever\"}"), "ok");
}

static void test_identity_claim(void **state)
{
    fx_t *f = *state;
    mcd_identity_t id;
    char *t = hs("{\"sub\":42}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "42");
    free(t);
    t = hs("{\"sub\":9007199254740993}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "9007199254740993");
    free(t);
    t = hs("{\"sub\":-7.0}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "-7");
    free(t);
    check(f->auth, hs("{\"sub\":1.5}"), "identity claim invalid");
    /* The identity keeps the claim's JSON type: 42 and "42" are different identities, an
     * Extended JSON ObjectId is an ObjectId, not its hex string. */
    mcd_identity_t sid;
    t = hs("{\"sub\":\"42\"}");
    assert_string_equal(verify(f->auth, t, NOW, &sid), "ok");
    free(t);
    t = hs("{\"sub\":42}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    free(t);
    assert_string_equal(sid.subject, id.subject);
    assert_false(mc_identity_equal(sid.identity.bytes, sid.identity.len, id.identity.bytes,
                                   id.identity.len));
    t = hs("{\"sub\":42.0}");
    assert_string_equal(verify(f->auth, t, NOW, &sid), "ok");
    free(t);
    assert_true(mc_identity_equal(sid.identity.bytes, sid.identity.len, id.identity.bytes,
                                  id.identity.len));
    t = hs("{\"sub\":{\"$oid\":\"64a7f2d1aabbccddeeff0099\"}}");
    assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
    free(t);
    assert_string_equal(id.subject, "64a7f2d1aabbccddeeff0099");
    assert_int_equal(id.identity.len, 13);
    assert_int_equal(id.identity.bytes[0], 'o');
    check(f->auth, hs("{\"user\":\"u1\"}"), "identity claim missing");
    check(f->auth, hs("{\"sub\":null}"), "identity claim missing");
    check(f->auth, hs("{\"sub\":\"\"}"), "identity claim empty");
    check(f->auth, hs("{\"sub\":[\"u1\"]}"), "identity claim invalid");
    check(f->auth, hs("{\"sub\":{\"id\":\"u1\"}}"), "identity claim invalid");
    char big[600];
    memset(big, 'x', sizeof(big));
    snprintf(big, sizeof(big), "{\"sub\":\"%0300d\"}", 1);
    check(f->auth, hs(big), "identity claim too long");
    /* A configured claim other than sub. */
    mc_config_t c = f->cfg;
    c.auth.identity_claim = (char *)"uid";
    mcd_auth_t *a = make_auth(&c);
    t = hs("{\"sub\":\"ignored\",\"uid\":\"tenant-7\"}");
    assert_string_equal(verify(a, t, NOW, &id), "ok");
    assert_string_equal(id.subject, "tenant-7");
    free(t);
    check(a, hs("{\"sub\":\"u1\"}"), "identity claim missing");
    mcd_auth_destroy(a);
}

static void test_roles(void **state)
{
    fx_t *f = *state;
    mcd_identity_t id;
    struct {
        const char *payload;
        bool admin;
    } cases[] = {
        {"{\"sub\":\"u\",\"roles\":[\"reader\",\"mongocast:all\"]}", true},
        {"{\"sub\":\"u\",\"roles\":\"reader mongocast:all\"}", true},
        {"{\"sub\":\"u\",\"roles\":\"mongocast:all\"}", true},
        {"{\"sub\":\"u\",\"roles\":\"  mongocast:all  \"}", true},
        {"{\"sub\":\"u\",\"roles\":[\"mongocast:allx\"]}", false},
        {"{\"sub\":\"u\",\"roles\":\"mongocast:allx mongocast\"}", false},
        {"{\"sub\":\"u\",\"roles\":[[\"mongocast:all\"]]}", false},
        {"{\"sub\":\"u\",\"roles\":{\"a\":\"mongocast:all\"}}", false},
        {"{\"sub\":\"u\",\"role\":\"mongocast:all\"}", false},
        {"{\"sub\":\"u\"}", false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *t = hs(cases[i].payload);
        assert_string_equal(verify(f->auth, t, NOW, &id), "ok");
        if (id.is_admin != cases[i].admin) {
            fail_msg("%s: is_admin %d", cases[i].payload, id.is_admin);
        }
        free(t);
    }
    /* Without admin_role nobody is admin. */
    mc_config_t c = f->cfg;
    c.auth.admin_role = NULL;
    mcd_auth_t *a = make_auth(&c);
    char *t = hs("{\"sub\":\"u\",\"roles\":[\"mongocast:all\",\"\"]}");
    assert_string_equal(verify(a, t, NOW, &id), "ok");
    assert_false(id.is_admin);
    free(t);
    mcd_auth_destroy(a);
}

static void test_malformed_tokens(void **state)
{
    fx_t *f = *state;
    static const char *bad[] = {
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "..",
        "a..c",
        ".b.c",
        "eyJhbGciOiJIUzI1NiJ9.e30.",
        "!!!.e30.c2ln",
        "eyJhbGciOiJIUzI1NiJ9.e30=.c2ln",
        "eyJhbGciOiJIUzI1NiJ9 .e30.c2ln",
        "eyJhbGciOiJIUzI1NiJ9.e30.c2l+",
        "eyJhbGciOiJIUzI1NiJ9.e.c2ln",
        "eyJhbGciOiJIUzI1NiJ9.e31.c2ln", /* {} with non-zero stray bits */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *got = verify(f->auth, bad[i], NOW, NULL);
        if (strcmp(got, "malformed token") != 0 && strcmp(got, "missing token") != 0) {
            fail_msg("'%s': %s", bad[i], got);
        }
    }
    assert_string_equal(verify(f->auth, NULL, NOW, NULL), "missing token");
    /* Header and payload that are not one JSON object. */
    const char *p = "{\"sub\":\"u1\"}";
    check(f->auth, forge("{not json", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "malformed token");
    check(f->auth, forge("[\"HS256\"]", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "malformed token");
    check(f->auth,
          forge("{\"alg\":\"HS256\"}", "{\"sub\":", SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "malformed token");
    check(f->auth,
          forge("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\"}{\"sub\":\"admin\"}", SIG_HMAC, SECRET,
                strlen(SECRET), NULL),
          "malformed token");
    check(f->auth, forge("{\"alg\":\"HS256\"}", "[1,2]", SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "malformed token");
    /* Duplicate claims: libjwt would read the last, a naive reader the first. */
    check(f->auth,
          forge("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"sub\":\"admin\"}", SIG_HMAC, SECRET,
                strlen(SECRET), NULL),
          "malformed token");
    check(f->auth,
          forge("{\"alg\":\"none\",\"alg\":\"HS256\"}", p, SIG_HMAC, SECRET, strlen(SECRET), NULL),
          "malformed token");
    /* Too long. */
    char *huge = malloc(20000);
    memset(huge, 'A', 19999);
    huge[19999] = '\0';
    huge[100] = '.';
    huge[200] = '.';
    assert_string_equal(verify(f->auth, huge, NOW, NULL), "token too long");
    free(huge);
}

static void test_messages_never_echo_token(void **state)
{
    fx_t *f = *state;
    const char *payloads[] = {"{\"sub\":\"SENSITIVE-VALUE\",\"exp\":1}",
                              "{\"nosub\":\"SENSITIVE-VALUE\"}"};
    for (size_t i = 0; i < 2; i++) {
        char *t = hs(payloads[i]);
        mcd_refusal_t r;
        memset(&r, 0, sizeof(r));
        mcd_identity_t id;
        assert_int_equal(mcd_auth_verify(f->auth, t, NOW, &id, &r), -1);
        assert_null(strstr(r.message, "SENSITIVE"));
        assert_null(strstr(r.message, t));
        assert_false(id.authenticated);
        assert_string_equal(id.subject, "");
        free(t);
    }
    char *t =
        forge("{\"alg\":\"HS256\"}", "{\"sub\":\"SENSITIVE-VALUE\"}", SIG_JUNK, NULL, 0, NULL);
    const char *msg = verify(f->auth, t, NOW, NULL);
    assert_string_equal(msg, "bad signature");
    free(t);
}

static void test_subscriber_rules(void **state)
{
    fx_t *f = *state;
    mc_stream_config_t priv = {.name = (char *)"p", .recipient = (char *)"fullDocument.o"};
    mc_stream_config_t pub = {.name = (char *)"q", .is_public = true};
    mcd_identity_t id;
    mcd_refusal_t r;
    char *good = hs("{\"sub\":\"u1\"}");
    char *expired = hs("{\"sub\":\"u1\",\"exp\":1000}");

    assert_int_equal(mcd_auth_subscriber(f->auth, &priv, NULL, NOW, &id, &r), -1);
    assert_int_equal(r.status, 401);
    assert_string_equal(r.message, "missing token");
    assert_int_equal(mcd_auth_subscriber(f->auth, &priv, "", NOW, &id, &r), -1);
    assert_int_equal(mcd_auth_subscriber(f->auth, &priv, good, NOW, &id, &r), 0);
    assert_true(id.authenticated);
    assert_string_equal(id.subject, "u1");

    /* Public: anonymous allowed, but a token that is given must be valid. */
    assert_int_equal(mcd_auth_subscriber(f->auth, &pub, NULL, NOW, &id, &r), 0);
    assert_false(id.authenticated);
    assert_false(id.auth_disabled);
    assert_int_equal(mcd_auth_subscriber(f->auth, &pub, expired, NOW, &id, &r), -1);
    assert_string_equal(r.message, "token expired");
    assert_int_equal(mcd_auth_subscriber(f->auth, &pub, good, NOW, &id, &r), 0);
    assert_true(id.authenticated);

    /* No auth configured: everyone anonymous, tokens refused. */
    mc_config_t none;
    memset(&none, 0, sizeof(none));
    mcd_auth_t *a = make_auth(&none);
    assert_false(mcd_auth_enabled(a));
    assert_int_equal(mcd_auth_subscriber(a, &priv, NULL, NOW, &id, &r), 0);
    assert_false(id.authenticated);
    assert_true(id.auth_disabled);
    assert_int_equal(mcd_auth_subscriber(a, &priv, good, NOW, &id, &r), -1);
    assert_int_equal(r.status, 401);
    assert_int_equal(mcd_auth_verify(a, good, NOW, &id, &r), -1);
    mcd_auth_destroy(a);
    free(good);
    free(expired);
}

static void test_origin(void **state)
{
    (void)state;
    char *origins[] = {(char *)"http://localhost:8080", (char *)"https://app.example.com"};
    mc_config_t c;
    memset(&c, 0, sizeof(c));
    c.server.allowed_origins = origins;
    c.server.n_allowed_origins = 2;
    assert_true(mcd_origin_allowed(&c, NULL));
    assert_true(mcd_origin_allowed(&c, "http://localhost:8080"));
    assert_true(mcd_origin_allowed(&c, "HTTPS://App.Example.COM"));
    assert_false(mcd_origin_allowed(&c, "http://localhost:8081"));
    assert_false(mcd_origin_allowed(&c, "http://localhost"));
    assert_false(mcd_origin_allowed(&c, "https://app.example.com.evil.test"));
    assert_false(mcd_origin_allowed(&c, "https://evil.app.example.com"));
    assert_false(mcd_origin_allowed(&c, "https://app.example.com/"));
    assert_false(mcd_origin_allowed(&c, "http://app.example.com"));
    assert_false(mcd_origin_allowed(&c, "null"));
    assert_false(mcd_origin_allowed(&c, ""));
    char *with_null[] = {(char *)"null"};
    c.server.allowed_origins = with_null;
    c.server.n_allowed_origins = 1;
    assert_true(mcd_origin_allowed(&c, "null"));
    c.server.n_allowed_origins = 0;
    assert_false(mcd_origin_allowed(&c, "http://localhost:8080"));
    assert_true(mcd_origin_allowed(&c, NULL));
}

static void expect_new_error(const mc_config_t *c, const char *fragment)
{
    mc_error_t err = {0};
    mcd_auth_t *a = mcd_auth_new(c, &err);
    if (a) {
        mcd_auth_destroy(a);
        fail_msg("mcd_auth_new accepted a config that should fail with '%s'", fragment);
    }
    if (!strstr(err.message, fragment)) {
        fail_msg("error '%s' does not contain '%s'", err.message, fragment);
    }
}

static void test_bad_configs(void **state)
{
    (void)state;
    mc_config_t c;
    base_config(&c, "HS256");
    c.auth.secret = (char *)"short secret";
    expect_new_error(&c, "too short");
    base_config(&c, "HS384");
    expect_new_error(&c, "HS256, RS256 or ES256");
    base_config(&c, "RS256");
    c.auth.public_key_file = (char *)"/nonexistent/key.pem";
    expect_new_error(&c, "cannot open");
    base_config(&c, "ES256");
    c.auth.public_key_file = rsa_pub_path;
    expect_new_error(&c, "ES256 needs an EC P-256 key");
    base_config(&c, "RS256");
    c.auth.public_key_file = ec_pub_path;
    expect_new_error(&c, "RS256 needs an RSA key");
    char bad[160];
    snprintf(bad, sizeof(bad), "%s/bad.pem", tmpdir);
    FILE *fp = fopen(bad, "w");
    fputs("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n", fp);
    fclose(fp);
    c.auth.public_key_file = bad;
    expect_new_error(&c, "not a PEM public key");
    /* A private key file is not accepted as the verification key. */
    fp = fopen(bad, "w");
    BIO *b = BIO_new_fp(fp, BIO_NOCLOSE);
    PEM_write_bio_PrivateKey(b, rsa_key, NULL, NULL, 0, NULL, NULL);
    BIO_free(b);
    fclose(fp);
    expect_new_error(&c, "not a PEM public key");
    unlink(bad);
    /* A FIFO (no writer) or a directory as the key file: refused at once, never waited on. */
    assert_int_equal(mkfifo(bad, 0600), 0);
    expect_new_error(&c, "not a regular file");
    unlink(bad);
    c.auth.public_key_file = tmpdir;
    expect_new_error(&c, "not a regular file");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hs256_good, setup_hs, teardown),
        cmocka_unit_test(test_rs256_good_and_wrong_key),
        cmocka_unit_test(test_es256_good_and_wrong_key),
        cmocka_unit_test_setup_teardown(test_alg_none_and_other_algs, setup_hs, teardown),
        cmocka_unit_test(test_hs_rs_confusion),
        cmocka_unit_test_setup_teardown(test_exp_nbf_leeway, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_claim_reasons, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_signature_lengths, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_iss_aud, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_identity_claim, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_roles, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_tokens, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_messages_never_echo_token, setup_hs, teardown),
        cmocka_unit_test_setup_teardown(test_subscriber_rules, setup_hs, teardown),
        cmocka_unit_test(test_origin),
        cmocka_unit_test(test_bad_configs),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
