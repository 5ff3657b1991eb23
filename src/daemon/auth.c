/*
 * auth.c: subscriber authentication (JWT) and the WebSocket Origin allowlist (auth.h).
 *
 * Thread: mcd_auth_new() runs at start-up; afterwards the object is read-only and
 * mcd_auth_verify() may run on any thread (the loop thread in practice).
 *
 * Verification order, chosen so that nothing about a token's claims is revealed (or even
 * parsed for decisions) before its signature holds:
 *   1. shape: at most MAX_TOKEN_BYTES, exactly three non-empty base64url segments, the
 *      header and payload each exactly one JSON object without duplicate keys;
 *   2. the header's `alg` must equal the configured algorithm byte for byte; `crit` is
 *      refused (we implement no extension). The algorithm that verifies is the configured
 *      one, never the header's, so HS/RS confusion and alg "none" cannot happen;
 *   3. the signature over "header.payload", checked here with OpenSSL (HMAC-SHA256 compared
 *      in constant time, RSASSA-PKCS1-v1_5 SHA-256, ECDSA P-256 SHA-256 in the JWS R||S
 *      form). Not with libjwt: it parses the payload itself (jansson) before it checks the
 *      signature, and refuses with the same error a payload jansson rejects (an integer past
 *      2^63, a "\u0000" in a string), so such tokens were reported as "bad signature";
 *   4. claims, from our own parse of the same signed payload bytes: exp / nbf / iat with
 *      LEEWAY_S leeway, iss and aud when configured, the identity claim, `roles`.
 * Refusal messages are fixed strings: they never echo token bytes or claim values.
 *
 * Invariant: an mcd_auth_t never changes after mcd_auth_new(), so no locking is needed.
 */
#include "auth.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "json_object.h"

#define MAX_TOKEN_BYTES 8192
#define MAX_KEY_FILE_BYTES 65536
#define LEEWAY_S 60
/* RFC 7518 §3.2: an HS256 key must be at least as long as the hash output. */
#define MIN_HS256_SECRET_BYTES 32
#define MIN_RSA_BITS 2048

/* ES256 signatures are R || S, 32 bytes each (RFC 7518 §3.4); HS256 MACs are 32 bytes. */
#define ES256_SIG_BYTES 64
#define HS256_MAC_BYTES 32

typedef enum alg {
    ALG_HS256 = 1,
    ALG_RS256,
    ALG_ES256,
} alg_t;

struct mcd_auth {
    bool enabled;
    alg_t alg;
    char alg_name[8];
    unsigned char *secret; /* HS256 */
    size_t secret_len;
    EVP_PKEY *pkey; /* RS256 / ES256 */
    char *identity_claim;
    char *admin_role; /* NULL: nobody is admin */
    char *issuer;     /* NULL: not checked */
    char *audience;   /* NULL: not checked */
};

/* ---- Construction ------------------------------------------------------------------- */

static int read_key_file(const char *path, unsigned char **out, int *out_len, mc_error_t *err)
{
    /* O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO,
                            "auth.jwt.public_key_file %s: cannot open", path);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "auth.jwt.public_key_file %s: not a regular file", path);
    }
    unsigned char *buf = malloc(MAX_KEY_FILE_BYTES + 1);
    if (!buf) {
        close(fd);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    size_t n = 0;
    bool bad = false;
    while (n < MAX_KEY_FILE_BYTES + 1) {
        ssize_t r = read(fd, buf + n, MAX_KEY_FILE_BYTES + 1 - n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            bad = r < 0;
            break;
        }
        n += (size_t)r;
    }
    close(fd);
    if (bad || n == 0 || n > MAX_KEY_FILE_BYTES) {
        free(buf);
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "auth.jwt.public_key_file %s: %s", path,
                            bad      ? "read error"
                            : n == 0 ? "empty file"
                                     : "larger than 64 KiB");
    }
    buf[n] = '\0';
    *out = buf;
    *out_len = (int)n;
    return 0;
}

/* The key must be a PEM "PUBLIC KEY" of the kind the algorithm needs; finding out now turns
 * a wrong file into a start-up error instead of every token failing with "bad signature".
 * On success *out holds the key. */
static int load_public_key(const char *path, const unsigned char *pem, int len, alg_t alg,
                           EVP_PKEY **out, mc_error_t *err)
{
    BIO *bio = BIO_new_mem_buf(pem, len);
    EVP_PKEY *pkey = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (!pkey) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "auth.jwt.public_key_file %s: not a PEM public key "
                            "(-----BEGIN PUBLIC KEY-----)",
                            path);
    }
    int rc = 0;
    if (alg == ALG_RS256) {
        if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
            rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                              "auth.jwt.public_key_file %s: RS256 needs an RSA key", path);
        } else if (EVP_PKEY_get_bits(pkey) < MIN_RSA_BITS) {
            rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                              "auth.jwt.public_key_file %s: RSA key shorter than %d bits", path,
                              MIN_RSA_BITS);
        }
    } else {
        char group[64] = {0};
        size_t glen = 0;
        if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC ||
            !EVP_PKEY_get_utf8_string_param(pkey, "group", group, sizeof(group), &glen) ||
            (strcmp(group, "prime256v1") != 0 && strcmp(group, "P-256") != 0)) {
            rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                              "auth.jwt.public_key_file %s: ES256 needs an EC P-256 key", path);
        }
    }
    if (rc != 0) {
        EVP_PKEY_free(pkey);
        return rc;
    }
    *out = pkey;
    return 0;
}

static char *dup_or_null(const char *s)
{
    return s ? bson_strdup(s) : NULL;
}

mcd_auth_t *mcd_auth_new(const mc_config_t *config, mc_error_t *err)
{
    if (!config) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "mcd_auth_new: no config");
        return NULL;
    }
    mcd_auth_t *a = calloc(1, sizeof(*a));
    if (!a) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    if (!config->auth.enabled) {
        return a;
    }
    const char *alg = config->auth.algorithm ? config->auth.algorithm : "";
    if (strcmp(alg, "HS256") == 0) {
        a->alg = ALG_HS256;
    } else if (strcmp(alg, "RS256") == 0) {
        a->alg = ALG_RS256;
    } else if (strcmp(alg, "ES256") == 0) {
        a->alg = ALG_ES256;
    } else {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "auth.jwt.algorithm must be HS256, RS256 or ES256");
        goto fail;
    }
    bson_strncpy(a->alg_name, alg, sizeof(a->alg_name));
    if (a->alg == ALG_HS256) {
        const char *secret = config->auth.secret;
        if (!secret || config->auth.public_key_file) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "auth.jwt: HS256 needs secret (and no public_key_file)");
            goto fail;
        }
        size_t n = strlen(secret);
        if (n < MIN_HS256_SECRET_BYTES) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "auth.jwt.secret is too short for HS256: %zu bytes, at least %d "
                         "needed (RFC 7518 section 3.2); use a random value such as the output "
                         "of `openssl rand -base64 48`",
                         n, MIN_HS256_SECRET_BYTES);
            goto fail;
        }
        if (n > MAX_KEY_FILE_BYTES) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "auth.jwt.secret is longer than 64 KiB");
            goto fail;
        }
        a->secret = (unsigned char *)bson_strdup(secret);
        a->secret_len = n;
    } else {
        const char *path = config->auth.public_key_file;
        if (!path || config->auth.secret) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "auth.jwt: %s needs public_key_file (and no secret)", alg);
            goto fail;
        }
        unsigned char *pem = NULL;
        int len = 0;
        if (read_key_file(path, &pem, &len, err) != 0) {
            goto fail;
        }
        int rc = load_public_key(path, pem, len, a->alg, &a->pkey, err);
        free(pem);
        if (rc != 0) {
            goto fail;
        }
    }
    a->identity_claim = bson_strdup(config->auth.identity_claim && *config->auth.identity_claim
                                        ? config->auth.identity_claim
                                        : "sub");
    a->admin_role = dup_or_null(config->auth.admin_role);
    a->issuer = dup_or_null(config->auth.issuer);
    a->audience = dup_or_null(config->auth.audience);
    a->enabled = true;
    return a;
fail:
    mcd_auth_destroy(a);
    return NULL;
}

void mcd_auth_destroy(mcd_auth_t *auth)
{
    if (!auth) {
        return;
    }
    if (auth->secret) {
        /* The secret should not linger in freed heap memory. */
        OPENSSL_cleanse(auth->secret, auth->secret_len);
        bson_free(auth->secret);
    }
    EVP_PKEY_free(auth->pkey);
    bson_free(auth->identity_claim);
    bson_free(auth->admin_role);
    bson_free(auth->issuer);
    bson_free(auth->audience);
    free(auth);
}

bool mcd_auth_enabled(const mcd_auth_t *auth)
{
    return auth && auth->enabled;
}

/* ---- Token shape ------------------------------------------------------------------- */

static int b64url_value(unsigned char c)
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
    if (c == '-') {
        return 62;
    }
    if (c == '_') {
        return 63;
    }
    return -1;
}

/* Strict unpadded base64url (RFC 7515 §2): no '=', no whitespace, no stray bits, so that one
 * token has exactly one spelling. Writes at most len*3/4 bytes to out. Returns the decoded
 * length or -1. */
static long b64url_decode(const char *in, size_t len, unsigned char *out)
{
    if (len % 4 == 1) {
        return -1;
    }
    uint32_t acc = 0;
    int bits = 0;
    long n = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_value((unsigned char)in[i]);
        if (v < 0) {
            return -1;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) {
        return -1; /* non-zero leftover bits: a second spelling of the same bytes */
    }
    return n;
}

/* Decodes one segment and parses it as one JSON object without duplicate keys. */
static int segment_object(const char *seg, size_t len, bson_t *out)
{
    unsigned char buf[MAX_TOKEN_BYTES];
    long n = b64url_decode(seg, len, buf);
    if (n <= 0 || mcd_json_object_parse((const char *)buf, (size_t)n, out) != 0) {
        return -1;
    }
    if (mcd_json_has_duplicate_keys(out)) {
        /* Other readers (jansson, most JWT libraries) keep the last value, libbson's reader
         * the first: refuse the ambiguity. */
        bson_destroy(out);
        return -1;
    }
    return 0;
}

/* ---- Signature --------------------------------------------------------------------- */

/* ECDSA verification in OpenSSL takes the DER form; JWS carries R || S (RFC 7518 §3.4).
 * Returns the DER length written to der, or 0. */
static size_t es256_der(const unsigned char *sig, unsigned char *der, size_t cap)
{
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, ES256_SIG_BYTES / 2, NULL);
    BIGNUM *s = BN_bin2bn(sig + ES256_SIG_BYTES / 2, ES256_SIG_BYTES / 2, NULL);
    if (!es || !r || !s || ECDSA_SIG_set0(es, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        return 0;
    }
    /* es owns r and s now. */
    int n = i2d_ECDSA_SIG(es, NULL);
    size_t len = 0;
    if (n > 0 && (size_t)n <= cap) {
        unsigned char *p = der;
        len = (size_t)i2d_ECDSA_SIG(es, &p);
    }
    ECDSA_SIG_free(es);
    return len;
}

/* Whether `sig` signs `input` ("header.payload") under the configured algorithm and key. */
static bool signature_ok(const mcd_auth_t *a, const char *input, size_t input_len,
                         const unsigned char *sig, size_t sig_len)
{
    if (a->alg == ALG_HS256) {
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int mac_len = 0;
        if (sig_len != HS256_MAC_BYTES ||
            !HMAC(EVP_sha256(), a->secret, (int)a->secret_len, (const unsigned char *)input,
                  input_len, mac, &mac_len) ||
            mac_len != HS256_MAC_BYTES) {
            return false;
        }
        return CRYPTO_memcmp(mac, sig, HS256_MAC_BYTES) == 0;
    }
    unsigned char der[ES256_SIG_BYTES + 16];
    if (a->alg == ALG_ES256) {
        if (sig_len != ES256_SIG_BYTES) {
            return false;
        }
        sig_len = es256_der(sig, der, sizeof(der));
        if (sig_len == 0) {
            return false;
        }
        sig = der;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, a->pkey) == 1 &&
              EVP_DigestVerify(md, sig, sig_len, (const unsigned char *)input, input_len) == 1;
    EVP_MD_CTX_free(md);
    return ok;
}

/* ---- Claims ------------------------------------------------------------------------- */

typedef enum num_result {
    NUM_ABSENT = 0,
    NUM_OK,
    NUM_BAD,   /* not a number */
    NUM_RANGE, /* a number no int64 count of seconds can hold */
} num_result_t;

/* A NumericDate (RFC 7519 §2): a JSON number of seconds, fractions allowed (floored).
 * Integers past int64 arrive as doubles (json_object.c) and fail the double's range. */
static num_result_t numeric_date(const bson_t *claims, const char *name, int64_t *out)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, claims, name)) {
        return NUM_ABSENT;
    }
    switch (bson_iter_type(&it)) {
    case BSON_TYPE_INT32: *out = bson_iter_int32(&it); return NUM_OK;
    case BSON_TYPE_INT64: *out = bson_iter_int64(&it); return NUM_OK;
    case BSON_TYPE_DOUBLE: {
        double d = bson_iter_double(&it);
        if (!isfinite(d) || d > 9.0e15 || d < -9.0e15) {
            return NUM_RANGE;
        }
        *out = (int64_t)floor(d);
        return NUM_OK;
    }
    default: return NUM_BAD;
    }
}

static bool string_claim_equals(const bson_iter_t *it, const char *want)
{
    uint32_t len;
    const char *s = bson_iter_utf8(it, &len);
    return strlen(want) == len && memcmp(s, want, len) == 0;
}

/* aud may be one string or an array of strings (RFC 7519 §4.1.3); comparison is exact. */
static bool audience_ok(const bson_t *claims, const char *want)
{
    bson_iter_t it, el;
    if (!bson_iter_init_find(&it, claims, "aud")) {
        return false;
    }
    if (BSON_ITER_HOLDS_UTF8(&it)) {
        return string_claim_equals(&it, want);
    }
    if (!BSON_ITER_HOLDS_ARRAY(&it) || !bson_iter_recurse(&it, &el)) {
        return false;
    }
    while (bson_iter_next(&el)) {
        if (BSON_ITER_HOLDS_UTF8(&el) && string_claim_equals(&el, want)) {
            return true;
        }
    }
    return false;
}

/* `roles`: an array of strings, or one space-separated string (OAuth `scope` style). */
static bool has_role(const bson_t *claims, const char *role)
{
    bson_iter_t it, el;
    if (!role || !bson_iter_init_find(&it, claims, "roles")) {
        return false;
    }
    if (BSON_ITER_HOLDS_ARRAY(&it) && bson_iter_recurse(&it, &el)) {
        while (bson_iter_next(&el)) {
            if (BSON_ITER_HOLDS_UTF8(&el) && string_claim_equals(&el, role)) {
                return true;
            }
        }
        return false;
    }
    if (!BSON_ITER_HOLDS_UTF8(&it)) {
        return false;
    }
    uint32_t len;
    const char *s = bson_iter_utf8(&it, &len);
    size_t rlen = strlen(role);
    size_t i = 0;
    while (i < len) {
        while (i < len && s[i] == ' ') {
            i++;
        }
        size_t start = i;
        while (i < len && s[i] != ' ') {
            i++;
        }
        if (i - start == rlen && rlen > 0 && memcmp(s + start, role, rlen) == 0) {
            return true;
        }
    }
    return false;
}

/* The identity claim: its canonical identity (mongocast/identity.h), compared with an event's
 * recipient, and a display form. A JSON string is a string identity, a JSON integer (or an
 * integral number) an integer identity, an Extended JSON {"$oid": "<24 hex>"} an ObjectId;
 * "5" and 5 are different identities. */
static int identity(const bson_t *claims, const char *claim, mcd_identity_t *id,
                    mcd_refusal_t *r)
{
    char *out = id->subject;
    size_t cap = sizeof(id->subject);
    bson_iter_t it;
    if (!bson_iter_init_find(&it, claims, claim)) {
        return mcd_refuse(r, 401, "unauthorized", "identity claim missing");
    }
    switch (bson_iter_type(&it)) {
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *s = bson_iter_utf8(&it, &len);
        if (len == 0) {
            return mcd_refuse(r, 401, "unauthorized", "identity claim empty");
        }
        if (len >= cap) {
            return mcd_refuse(r, 401, "unauthorized", "identity claim too long");
        }
        if (memchr(s, '\0', len)) {
            /* A C string would stop at the NUL: "u3\0evil" must not become "u3". */
            return mcd_refuse(r, 401, "unauthorized", "identity claim contains NUL");
        }
        memcpy(out, s, len);
        out[len] = '\0';
        break;
    }
    case BSON_TYPE_INT32: snprintf(out, cap, "%d", bson_iter_int32(&it)); break;
    case BSON_TYPE_INT64: snprintf(out, cap, "%" PRId64, bson_iter_int64(&it)); break;
    case BSON_TYPE_DOUBLE: {
        /* JSON has one number type: 5.0 or 5e0 is the integer 5 (the identity rule). */
        double d = bson_iter_double(&it);
        if (isfinite(d) && d == floor(d) && d >= -9223372036854775808.0 &&
            d < 9223372036854775808.0) {
            snprintf(out, cap, "%" PRId64, (int64_t)d);
            break;
        }
        return mcd_refuse(r, 401, "unauthorized", "identity claim invalid");
    }
    case BSON_TYPE_OID: bson_oid_to_string(bson_iter_oid(&it), out); break;
    case BSON_TYPE_NULL: return mcd_refuse(r, 401, "unauthorized", "identity claim missing");
    default: return mcd_refuse(r, 401, "unauthorized", "identity claim invalid");
    }
    if (!mc_identity_from_iter(&it, &id->identity)) {
        return mcd_refuse(r, 401, "unauthorized", "identity claim invalid");
    }
    return 0;
}

/* Reads the NumericDate claim `name` into *out: 1 when present, 0 when absent; a value that
 * is not a number or out of range is refused (-1) with the claim's name, never its value. */
static int date_claim(const bson_t *claims, const char *name, int64_t *out, mcd_refusal_t *r)
{
    switch (numeric_date(claims, name, out)) {
    case NUM_OK: return 1;
    case NUM_ABSENT: return 0;
    case NUM_BAD: return mcd_refuse(r, 401, "unauthorized", "invalid %s claim", name);
    default: return mcd_refuse(r, 401, "unauthorized", "%s out of range", name);
    }
}

static int check_claims(const mcd_auth_t *a, const bson_t *claims, int64_t now, mcd_identity_t *id,
                        mcd_refusal_t *r)
{
    int64_t exp = 0;
    int has_exp = date_claim(claims, "exp", &exp, r);
    if (has_exp < 0) {
        return -1;
    }
    /* RFC 7519 §4.1.4/4.1.5: not accepted on or after exp, nor before nbf, give or take the
     * leeway. The bounds keep the additions from overflowing on absurd claim values. */
    if (has_exp && exp < INT64_MAX - LEEWAY_S && now >= exp + LEEWAY_S) {
        return mcd_refuse(r, 401, "unauthorized", "token expired");
    }
    /* iat only informs (§4.1.6), but a token "issued" beyond the leeway in the future comes
     * from a clock far off or from a forger's template: refused like an early nbf. */
    static const struct {
        const char *claim, *refusal;
    } not_ahead[] = {{"nbf", "token not yet valid"}, {"iat", "token issued in the future"}};
    for (size_t k = 0; k < sizeof(not_ahead) / sizeof(not_ahead[0]); k++) {
        int64_t t = 0;
        int has = date_claim(claims, not_ahead[k].claim, &t, r);
        if (has < 0) {
            return -1;
        }
        if (has && t > INT64_MIN + LEEWAY_S && t - LEEWAY_S > now) {
            return mcd_refuse(r, 401, "unauthorized", "%s", not_ahead[k].refusal);
        }
    }
    if (a->issuer) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, claims, "iss") || !BSON_ITER_HOLDS_UTF8(&it) ||
            !string_claim_equals(&it, a->issuer)) {
            return mcd_refuse(r, 401, "unauthorized", "wrong issuer");
        }
    }
    if (a->audience && !audience_ok(claims, a->audience)) {
        return mcd_refuse(r, 401, "unauthorized", "wrong audience");
    }
    if (identity(claims, a->identity_claim, id, r) != 0) {
        return -1;
    }
    id->authenticated = true;
    id->is_admin = has_role(claims, a->admin_role);
    id->expires_at = has_exp ? exp : 0;
    return 0;
}

/* ---- Verification --------------------------------------------------------------------- */

int mcd_auth_verify(const mcd_auth_t *auth, const char *token, int64_t now, mcd_identity_t *id,
                    mcd_refusal_t *r)
{
    mcd_identity_t scratch;
    if (!id) {
        id = &scratch;
    }
    memset(id, 0, sizeof(*id));
    if (!auth || !auth->enabled) {
        return mcd_refuse(r, 401, "unauthorized",
                          "tokens are not accepted: authentication is not configured");
    }
    if (!token || !*token) {
        return mcd_refuse(r, 401, "unauthorized", "missing token");
    }
    size_t len = strnlen(token, MAX_TOKEN_BYTES + 1);
    if (len > MAX_TOKEN_BYTES) {
        return mcd_refuse(r, 401, "unauthorized", "token too long");
    }
    const char *d1 = memchr(token, '.', len);
    const char *d2 = d1 ? memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - token)) : NULL;
    if (!d1 || !d2 || memchr(d2 + 1, '.', len - (size_t)(d2 + 1 - token)) || d1 == token ||
        d2 == d1 + 1) {
        return mcd_refuse(r, 401, "unauthorized", "malformed token");
    }
    bson_t header, claims;
    if (segment_object(token, (size_t)(d1 - token), &header) != 0) {
        return mcd_refuse(r, 401, "unauthorized", "malformed token");
    }
    bson_iter_t it;
    bool alg_ok = bson_iter_init_find(&it, &header, "alg") && BSON_ITER_HOLDS_UTF8(&it) &&
                  string_claim_equals(&it, auth->alg_name);
    bool crit = bson_iter_init_find(&it, &header, "crit");
    bson_destroy(&header);
    if (!alg_ok) {
        return mcd_refuse(r, 401, "unauthorized", "algorithm not allowed");
    }
    if (crit) {
        return mcd_refuse(r, 401, "unauthorized", "unsupported critical header");
    }
    /* Checked after the algorithm so that the usual unsigned token ("alg":"none" with an
     * empty signature) is reported as what it is. */
    unsigned char sig[MAX_TOKEN_BYTES];
    long sig_len = b64url_decode(d2 + 1, (size_t)(token + len - (d2 + 1)), sig);
    if (sig_len <= 0) {
        return mcd_refuse(r, 401, "unauthorized", "malformed token");
    }
    if (segment_object(d1 + 1, (size_t)(d2 - d1 - 1), &claims) != 0) {
        return mcd_refuse(r, 401, "unauthorized", "malformed token");
    }
    /* The claims are parsed (shape only) but looked at only once the signature holds. */
    if (!signature_ok(auth, token, (size_t)(d2 - token), sig, (size_t)sig_len)) {
        bson_destroy(&claims);
        return mcd_refuse(r, 401, "unauthorized", "bad signature");
    }
    int rc = check_claims(auth, &claims, now, id, r);
    bson_destroy(&claims);
    if (rc != 0) {
        memset(id, 0, sizeof(*id));
    }
    return rc;
}

int mcd_auth_subscriber(const mcd_auth_t *auth, const mc_stream_config_t *stream, const char *token,
                        int64_t now, mcd_identity_t *id, mcd_refusal_t *r)
{
    mcd_identity_t scratch;
    if (!id) {
        id = &scratch;
    }
    memset(id, 0, sizeof(*id));
    if (!stream) {
        return mcd_refuse(r, 404, "unknown_stream", "unknown stream");
    }
    bool has_token = token && *token;
    if (!mcd_auth_enabled(auth)) {
        /* Without auth nothing is authorized per subscriber; a token is refused rather than
         * ignored so that a forgotten `auth:` section fails loudly instead of silently
         * serving every recipient's events to clients that believe they are filtered. */
        if (has_token) {
            return mcd_refuse(r, 401, "unauthorized",
                              "tokens are not accepted: authentication is not configured");
        }
        id->auth_disabled = true;
        return 0;
    }
    if (has_token) {
        return mcd_auth_verify(auth, token, now, id, r);
    }
    if (stream->is_public) {
        return 0;
    }
    return mcd_refuse(r, 401, "unauthorized", "missing token");
}

bool mcd_origin_allowed(const mc_config_t *config, const char *origin)
{
    if (!origin) {
        return true;
    }
    if (!config) {
        return false;
    }
    /* Exact (case-insensitive) match only: no wildcards, no prefix or suffix tricks such as
     * https://app.example.com.evil.test. The opaque origin "null" (sandboxed iframes, file://)
     * passes only when listed literally. */
    for (size_t i = 0; i < config->server.n_allowed_origins; i++) {
        const char *allowed = config->server.allowed_origins[i];
        if (allowed && *allowed && strcasecmp(allowed, origin) == 0) {
            return true;
        }
    }
    return false;
}
