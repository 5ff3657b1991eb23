/*
 * refusal.h: why the daemon refuses a subscriber before the upgrade (DESIGN §4.3).
 *
 * Every check that can refuse a request (auth, origin, vars, filter, since, limits) fills one
 * of these; the HTTP layer turns it into `status` with the JSON body
 * {"error": message, "code": code}. `code` is a stable machine-readable string listed in
 * docs/protocol.md; `message` is for humans and never holds secrets or token contents.
 */
#ifndef MONGOCAST_DAEMON_REFUSAL_H
#define MONGOCAST_DAEMON_REFUSAL_H

#include <stdarg.h>

typedef struct mcd_refusal {
    int status;        /* 400, 401, 403, 404, 503 */
    const char *code;  /* static string: "invalid_vars", "invalid_filter", "invalid_since",
                          "unauthorized", "forbidden", "forbidden_origin", "unknown_stream",
                          "too_many_connections", "filters_not_allowed" */
    char message[256];
} mcd_refusal_t;

/* Fills `r` (when not NULL) and returns -1, so `return mcd_refuse(...)` reads well. */
int mcd_refuse(mcd_refusal_t *r, int status, const char *code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

#endif
