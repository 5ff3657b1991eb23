/*
 * fuzz_jwt.c: libFuzzer target for JWT verification (mcd_auth_verify) with an HS256 auth.
 * Byte 0 picks the mode: even = the rest is a compact token as received (shape, base64url,
 * header parsing, signature check); odd = the rest is "header\0payload" JSON, which is signed here
 * with the configured secret so that the claim checks (exp, nbf, iss, aud, identity, roles) run on
 * tokens whose signature holds. Every refusal must be a 401 with a message that does not
 * contain the token. Single-threaded.
 */
#include <openssl/hmac.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "../unit/b64url.h"

#define SECRET "fuzz-secret-0123456789abcdef0123456789"

static mcd_auth_t *auth;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!auth) {
        mc_config_t c;
        memset(&c, 0, sizeof(c));
        c.auth.enabled = true;
        c.auth.algorithm = (char *)"HS256";
        c.auth.secret = (char *)SECRET;
        c.auth.identity_claim = (char *)"sub";
        c.auth.admin_role = (char *)"admin";
        c.auth.issuer = (char *)"iss";
        c.auth.audience = (char *)"aud";
        auth = mcd_auth_new(&c, NULL);
        if (!auth) {
            abort();
        }
    }
    if (size < 1 || size > 16384) {
        return 0;
    }
    char *token;
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    if (data[0] & 1) {
        const uint8_t *nul = memchr(p, '\0', n);
        size_t hlen = nul ? (size_t)(nul - p) : n;
        size_t plen = nul ? n - hlen - 1 : 0;
        token = malloc(2 * n + 128);
        b64url(p, hlen, token);
        strcat(token, ".");
        b64url(nul ? nul + 1 : p, plen, token + strlen(token));
        size_t signing = strlen(token);
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int mlen = 0;
        HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (const unsigned char *)token, signing, mac,
             &mlen);
        strcat(token, ".");
        b64url(mac, mlen, token + strlen(token));
    } else {
        token = malloc(n + 1);
        memcpy(token, p, n);
        token[n] = '\0';
    }
    mcd_identity_t id;
    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    if (mcd_auth_verify(auth, token, 1700000000, &id, &r) == 0) {
        if (!id.authenticated || !id.subject[0]) {
            abort();
        }
    } else if (r.status != 401 || id.authenticated ||
               (strlen(token) >= 8 && strstr(r.message, token))) {
        abort();
    }
    free(token);
    return 0;
}
