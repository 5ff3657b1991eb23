/*
 * refusal.c: mcd_refusal_t helper. Pure function, any thread.
 */
#include "refusal.h"

#include <stdio.h>

int mcd_refuse(mcd_refusal_t *r, int status, const char *code, const char *fmt, ...)
{
    if (r) {
        va_list ap;
        va_start(ap, fmt);
        r->status = status;
        r->code = code;
        vsnprintf(r->message, sizeof(r->message), fmt, ap);
        va_end(ap);
    }
    return -1;
}
