/*
 * delivery.c: per-sink delivery metrics (mongocast/sink_delivery.h, sinks/delivery.h).
 * Writers: the sink's executor thread only; readers: any thread (relaxed atomics).
 */
#include <math.h>
#include <string.h>

#include "engine_private.h"

const double mc_sink_latency_bounds[MC_SINK_LATENCY_BUCKETS] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, INFINITY,
};

static const char *const outcome_names[MC_SINK_OUT_COUNT] = {
    "2xx",        "3xx",     "4xx",       "5xx",       "timeout",
    "connection", "written", "duplicate", "transient", "permanent",
};

const char *mc_sink_outcome_name(mc_sink_outcome_t o)
{
    return (unsigned)o < MC_SINK_OUT_COUNT ? outcome_names[o] : "unknown";
}

static void add(_Atomic uint64_t *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

void mc__delivery_activate(mc_sink_t *sink, uint32_t outcomes)
{
    atomic_store(&sink->delivery.outcomes, outcomes);
}

void mc__delivery_sent(mc_sink_t *sink, uint64_t events)
{
    add(&sink->delivery.attempts, events);
    add(&sink->delivery.requests, 1);
    add(&sink->delivery.in_flight, events);
}

void mc__delivery_done(mc_sink_t *sink, uint64_t events, double seconds, mc_sink_outcome_t o,
                       uint64_t n)
{
    mc__delivery_t *d = &sink->delivery;
    uint64_t f = atomic_load_explicit(&d->in_flight, memory_order_relaxed);
    atomic_store_explicit(&d->in_flight, f > events ? f - events : 0, memory_order_relaxed);
    size_t b = 0;
    while (b + 1 < MC_SINK_LATENCY_BUCKETS && seconds > mc_sink_latency_bounds[b]) {
        b++;
    }
    add(&d->bucket[b], 1);
    add(&d->latency_count, 1);
    add(&d->latency_sum_us, seconds > 0 ? (uint64_t)(seconds * 1e6) : 0);
    mc__delivery_count(sink, o, n);
}

void mc__delivery_count(mc_sink_t *sink, mc_sink_outcome_t o, uint64_t n)
{
    if ((unsigned)o < MC_SINK_OUT_COUNT) {
        add(&sink->delivery.outcome[o], n);
    }
}

int mc_engine_sink_delivery_stats(mc_engine_t *engine, size_t i, mc_sink_delivery_stats_t *out)
{
    if (!engine || !out || i >= engine->n_sinks) {
        return MC_ENOTFOUND;
    }
    const mc__delivery_t *d = &engine->sinks[i]->delivery;
    memset(out, 0, sizeof(*out));
    out->outcomes = atomic_load_explicit(&d->outcomes, memory_order_relaxed);
    out->active = out->outcomes != 0;
    out->attempts = atomic_load_explicit(&d->attempts, memory_order_relaxed);
    out->requests = atomic_load_explicit(&d->requests, memory_order_relaxed);
    out->in_flight = atomic_load_explicit(&d->in_flight, memory_order_relaxed);
    for (size_t k = 0; k < MC_SINK_OUT_COUNT; k++) {
        out->outcome[k] = atomic_load_explicit(&d->outcome[k], memory_order_relaxed);
    }
    uint64_t cum = 0;
    for (size_t k = 0; k < MC_SINK_LATENCY_BUCKETS; k++) {
        cum += atomic_load_explicit(&d->bucket[k], memory_order_relaxed);
        out->latency_bucket[k] = cum;
    }
    out->latency_count = atomic_load_explicit(&d->latency_count, memory_order_relaxed);
    out->latency_sum_s =
        (double)atomic_load_explicit(&d->latency_sum_us, memory_order_relaxed) / 1e6;
    return 0;
}
