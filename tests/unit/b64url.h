/*
 * b64url.h: base64url without padding (RFC 7515 §2), for the tests that build JWTs byte by
 * byte (unit/test_auth.c, fuzz/fuzz_jwt.c). Header-only; pure, any thread.
 */
#ifndef MC_TEST_B64URL_H
#define MC_TEST_B64URL_H

#include <stddef.h>
#include <stdint.h>

/* Encodes `len` bytes into `out`, which needs room for (len + 2) / 3 * 4 + 1 bytes; the result
 * is NUL-terminated. */
static inline void b64url(const unsigned char *in, size_t len, char *out)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len) {
            v |= (uint32_t)in[i + 1] << 8;
        }
        if (i + 2 < len) {
            v |= in[i + 2];
        }
        out[o++] = tbl[(v >> 18) & 63];
        out[o++] = tbl[(v >> 12) & 63];
        if (i + 1 < len) {
            out[o++] = tbl[(v >> 6) & 63];
        }
        if (i + 2 < len) {
            out[o++] = tbl[v & 63];
        }
    }
    out[o] = '\0';
}

#endif
