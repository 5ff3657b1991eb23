/*
 * clock.c: monotonic milliseconds for timeouts and deadlines, wall-clock milliseconds for
 * stored timestamps. Any thread.
 */
#include <time.h>

#include "engine_private.h"

int64_t mc__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mc__wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mc_engine_now_ms(void)
{
    return mc__now_ms();
}
