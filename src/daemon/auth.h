/*
 * auth.h: who a subscriber is. JWT verification with the configured algorithm pinned
 * (HS256 | RS256 | ES256, signatures checked with OpenSSL; a token whose header names any
 * other algorithm, "none" included, is refused), exp/nbf/iat checked with at most 60 s
 * leeway, iss/aud checked when configured, the identity taken from the configured claim and
 * admin status from the `roles` claim holding auth.jwt.admin_role. Also the WebSocket Origin
 * allowlist.
 *
 * Thread: built at start-up, then used read-only on the loop thread (safe from any thread).
 */
#ifndef MONGOCAST_DAEMON_AUTH_H
#define MONGOCAST_DAEMON_AUTH_H

#include <stdbool.h>
#include <stdint.h>

#include "mongocast/config.h"
#include "mongocast/error.h"
#include "mongocast/identity.h"
#include "refusal.h"

typedef struct mcd_auth mcd_auth_t;

typedef struct mcd_identity {
    bool authenticated;  /* false: anonymous (no token given) */
    char subject[256];   /* the identity claim's value for display and logs only (strings
                            as-is, numbers in decimal, ObjectIds in hex): never compare it */
    mc_identity_t identity; /* the claim's canonical identity (mongocast/identity.h): what an
                               event's recipient is compared with */
    bool is_admin;       /* `roles` holds admin_role */
    int64_t expires_at;  /* exp in seconds since the epoch, 0 when the token has none */
    /* Set by mcd_auth_subscriber() when the server has no `auth` section: no per-subscriber
     * authorization applies (every stream behaves as public). A zeroed identity leaves it
     * false, so an identity built by hand fails closed. (Additive field.) */
    bool auth_disabled;
} mcd_identity_t;

/* Reads config->auth (and the public key file for RS256/ES256). With auth disabled it returns
 * an object that accepts no tokens (every subscriber is anonymous). NULL + err on a bad key
 * file or algorithm. */
mcd_auth_t *mcd_auth_new(const mc_config_t *config, mc_error_t *err);
void mcd_auth_destroy(mcd_auth_t *auth);
bool mcd_auth_enabled(const mcd_auth_t *auth);

/* Verifies a compact JWT. Returns 0 and fills `id`, or -1 and fills `r` with 401
 * "unauthorized" and a safe reason ("token expired", "algorithm not allowed", "bad
 * signature", "wrong audience", "token not yet valid", "identity claim missing", ...).
 * `now` is seconds since the epoch. */
int mcd_auth_verify(const mcd_auth_t *auth, const char *token, int64_t now, mcd_identity_t *id,
                    mcd_refusal_t *r);

/* The subscriber's identity for a stream: anonymous is allowed only on public streams; a
 * token, when given, is always verified (a bad token is refused even on a public stream).
 * `token` may be NULL. Returns 0 or -1 with `r` (401). */
int mcd_auth_subscriber(const mcd_auth_t *auth, const mc_stream_config_t *stream,
                        const char *token, int64_t now, mcd_identity_t *id, mcd_refusal_t *r);

/* True when `origin` is NULL (non-browser client) or listed in server.allowed_origins
 * (exact, case-insensitive scheme://host[:port] comparison). */
bool mcd_origin_allowed(const mc_config_t *config, const char *origin);

#endif
