/*
 * mongocast/error.h: status codes and the error struct every libmongocast function uses.
 *
 * Functions return 0 (MC_OK) or a negative MC_E* status and take an optional
 * `mc_error_t *err` that, on failure, receives a code, a domain, the cause (an
 * underlying errno, server or library code) and a human-readable message. The shape follows
 * bson_error_t so that errors from libbson and libmongoc carry over without loss.
 * Constructors return NULL and fill `err`. Thread-safe: no global state.
 */
#ifndef MONGOCAST_ERROR_H
#define MONGOCAST_ERROR_H

#include <stdarg.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mc_status {
    MC_OK = 0,
    MC_EINVAL = -1,    /* bad argument, bad input or wrong state */
    MC_ENOMEM = -2,    /* allocation failed or a configured maximum was reached */
    MC_EAGAIN = -3,    /* would block / queue full: try again later */
    MC_EIO = -4,       /* file or network I/O failed; cause holds errno */
    MC_ESERVER = -5,   /* MongoDB answered with an error; cause holds the server code */
    MC_ECONFIG = -6,   /* configuration error; message is "FILE:LINE:COL: text" */
    MC_ENOTFOUND = -7, /* no such stream, sink, key or document */
    MC_ECLOSED = -8,   /* the object was stopped or closed */
    MC_EAUTH = -9,     /* authentication or authorization failed */
    MC_ELIMIT = -10,   /* an input exceeded a size, depth or count limit */
} mc_status_t;

typedef enum mc_error_domain {
    MC_DOMAIN_NONE = 0,
    MC_DOMAIN_MONGOCAST = 1, /* cause is an mc_status_t */
    MC_DOMAIN_ERRNO = 2,     /* cause is an errno value */
    MC_DOMAIN_MONGODB = 3,   /* cause is a MongoDB server error code */
    MC_DOMAIN_BSON = 4,      /* cause is a libbson/libmongoc error code */
} mc_error_domain_t;

typedef struct mc_error {
    int code;     /* an mc_status_t */
    int domain;   /* an mc_error_domain_t */
    int cause;    /* domain-specific: errno, server code, ... */
    char message[504];
} mc_error_t;

/* Fills `err` (when not NULL) and returns `code`, so that `return mc_error_set(...)` reads well. */
int mc_error_set(mc_error_t *err, int code, int domain, int cause, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;
int mc_error_vset(mc_error_t *err, int code, int domain, int cause, const char *fmt, va_list ap);

/* Clears `err` to "no error". NULL-safe. */
void mc_error_clear(mc_error_t *err);

/* A short, static English name for a status ("invalid argument", ...). Never NULL. */
const char *mc_strerror(int code);

#ifdef __cplusplus
}
#endif
#endif
