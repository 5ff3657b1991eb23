/*
 * webhook_sign.h: Standard Webhooks v1 signatures (symmetric, HMAC-SHA256).
 *
 * Each request carries three headers:
 *   webhook-id:        the event id (the same on every retry; receivers dedupe on it)
 *   webhook-timestamp: the attempt's Unix time in seconds (new on every retry)
 *   webhook-signature: "v1,<base64 HMAC-SHA256(key, id + "." + timestamp + "." + body)>",
 *                      one per configured secret, separated by spaces (secret rotation: a
 *                      receiver that knows any one of the secrets can verify)
 * Secrets have the form "whsec_<base64 of 24 to 64 random bytes>"; the key is the decoded
 * bytes. The signer keeps the decoded keys only; nothing here logs or prints them, and error
 * messages name a secret by its position, never by its text.
 *
 * A signer is immutable after mc__webhook_signer_new(): any thread may sign with it.
 */
#ifndef MC_SINKS_WEBHOOK_SIGN_H
#define MC_SINKS_WEBHOOK_SIGN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#define MC__WEBHOOK_MAX_SECRETS 8
#define MC__WEBHOOK_KEY_MIN 24
#define MC__WEBHOOK_KEY_MAX 64
/* One "v1,<44 base64 chars>" signature plus its separating space. */
#define MC__WEBHOOK_SIG_LEN 48
/* Room for the whole header value with the most secrets, and a NUL. */
#define MC__WEBHOOK_SIG_HEADER_MAX (MC__WEBHOOK_MAX_SECRETS * MC__WEBHOOK_SIG_LEN + 1)
/* Default accepted clock difference when verifying (the reference libraries use 5 min). */
#define MC__WEBHOOK_TOLERANCE_SECS 300

typedef struct mc__webhook_signer mc__webhook_signer_t;

/* Decodes `n` secrets (1..MC__WEBHOOK_MAX_SECRETS). Errors (NULL, MC_ECONFIG): no secret,
 * too many, a secret without the "whsec_" prefix, not strict base64, or a key outside 24..64
 * bytes; the message names the secret's index only. */
mc__webhook_signer_t *mc__webhook_signer_new(const char *const *secrets, size_t n, mc_error_t *err);
void mc__webhook_signer_destroy(mc__webhook_signer_t *s);
size_t mc__webhook_signer_count(const mc__webhook_signer_t *s);

/* Writes the webhook-signature header value (NUL-terminated) for message `id` at `timestamp`
 * with `body` into out (at least MC__WEBHOOK_SIG_HEADER_MAX bytes) and returns its length in
 * *len. Errors: MC_EINVAL when id is empty or contains '.' (the signed content would be
 * ambiguous) or timestamp is negative; MC_ENOMEM when OpenSSL fails. */
int mc__webhook_sign(const mc__webhook_signer_t *s, const char *id, size_t id_len,
                     int64_t timestamp, const void *body, size_t body_len, char *out, size_t *len,
                     mc_error_t *err);

/* Receiver side (tests, examples): 0 when `header` holds at least one v1 signature that
 * matches under one of the signer's keys (constant-time compare) and |now - timestamp| is
 * within tolerance_secs; MC_EAUTH otherwise (err says which check failed). */
int mc__webhook_verify(const mc__webhook_signer_t *s, const char *id, size_t id_len,
                       int64_t timestamp, const void *body, size_t body_len, const char *header,
                       int64_t now, int64_t tolerance_secs, mc_error_t *err);

#endif
