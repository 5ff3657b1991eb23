/*
 * hex.h: hexadecimal digits (internal). Pure, any thread.
 */
#ifndef MC_HEX_H
#define MC_HEX_H

/* The value of a hex digit (either case), or -1. */
static inline int mc__hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

#endif
