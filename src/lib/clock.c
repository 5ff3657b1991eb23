/*
 * clock.c: monotonic milliseconds for timeouts and deadlines, wall-clock milliseconds for
 * stored timestamps, and the absolute CLOCK_MONOTONIC deadlines that pthread_cond_timedwait
 * needs (every condition variable of the library is created with CLOCK_MONOTONIC); and the
 * names the library's threads carry in `top -H` and /proc. Any thread; no state.
 */
#include <stdio.h>
#include <time.h>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

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

/* Caps a relative timeout at about 30 years so that adding it to the clock can never
 * overflow time_t: a caller asking for "practically forever" gets exactly that. */
#define MAX_DEADLINE_SECS ((int64_t)1000000000)

static void deadline_after(struct timespec *ts, int64_t secs, long nsecs)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    if (secs < 0 || nsecs < 0) {
        return; /* a deadline in the past is simply "now" */
    }
    if (secs > MAX_DEADLINE_SECS) {
        secs = MAX_DEADLINE_SECS;
    }
    ts->tv_sec += (time_t)secs;
    ts->tv_nsec += nsecs;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

void mc__deadline_after_ms(struct timespec *ts, int64_t ms)
{
    deadline_after(ts, ms / 1000, (long)(ms % 1000) * 1000000L);
}

void mc__deadline_after_us(struct timespec *ts, int64_t us)
{
    deadline_after(ts, us / 1000000, (long)(us % 1000000) * 1000L);
}

void mc__thread_name(const char *prefix, const char *name)
{
#if defined(__linux__)
    char buf[16]; /* the kernel keeps 15 characters */
    snprintf(buf, sizeof(buf), "%s%s", prefix, name ? name : "");
    prctl(PR_SET_NAME, buf, 0, 0, 0);
#else
    (void)prefix;
    (void)name;
#endif
}
