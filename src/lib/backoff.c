/*
 * backoff.c: capped exponential backoff with full jitter (delay uniform in [0, ceiling],
 * ceiling = min(max, initial * 2^attempt)).
 *
 * Owned by one thread (each watcher has its own). Full jitter rather than equal jitter:
 * after a primary failover every stream of every daemon retries at once, and spreading the
 * whole interval is what keeps them from arriving in lock-step. The generator is a private
 * xorshift64* so that no global rand() state is shared between threads.
 */
#include "engine_private.h"

void mc__backoff_init(mc__backoff_t *b, uint32_t initial_ms, uint32_t max_ms, uint64_t seed)
{
    b->initial_ms = initial_ms ? initial_ms : 1;
    b->max_ms = max_ms < b->initial_ms ? b->initial_ms : max_ms;
    b->attempt = 0;
    b->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
}

uint32_t mc__backoff_ceiling(const mc__backoff_t *b)
{
    uint64_t c = b->initial_ms;
    /* Shift step by step so a large attempt count saturates at max instead of overflowing. */
    for (uint32_t i = 0; i < b->attempt && c < b->max_ms; i++) {
        c <<= 1;
    }
    return c > b->max_ms ? b->max_ms : (uint32_t)c;
}

static uint64_t next_random(mc__backoff_t *b)
{
    uint64_t x = b->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

uint32_t mc__backoff_next(mc__backoff_t *b)
{
    uint32_t ceiling = mc__backoff_ceiling(b);
    if (b->attempt < UINT32_MAX) {
        b->attempt++;
    }
    return (uint32_t)(next_random(b) % ((uint64_t)ceiling + 1));
}

void mc__backoff_reset(mc__backoff_t *b)
{
    b->attempt = 0;
}
