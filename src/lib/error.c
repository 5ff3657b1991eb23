/*
 * error.c: mc_error_t helpers. Pure functions, any thread.
 */
#include "mongocast/error.h"

#include <stdio.h>
#include <string.h>

int mc_error_vset(mc_error_t *err, int code, int domain, int cause, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code;
        err->domain = domain;
        err->cause = cause;
        vsnprintf(err->message, sizeof(err->message), fmt, ap);
    }
    return code;
}

int mc_error_set(mc_error_t *err, int code, int domain, int cause, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, code, domain, cause, fmt, ap);
    va_end(ap);
    return code;
}

void mc_error_clear(mc_error_t *err)
{
    if (err) {
        memset(err, 0, sizeof(*err));
    }
}

const char *mc_strerror(int code)
{
    switch (code) {
    case MC_OK: return "ok";
    case MC_EINVAL: return "invalid argument";
    case MC_ENOMEM: return "out of memory";
    case MC_EAGAIN: return "try again";
    case MC_EIO: return "I/O error";
    case MC_ESERVER: return "server error";
    case MC_ECONFIG: return "configuration error";
    case MC_ENOTFOUND: return "not found";
    case MC_ECLOSED: return "closed";
    case MC_EAUTH: return "not authorized";
    case MC_ELIMIT: return "limit exceeded";
    default: return "unknown error";
    }
}
