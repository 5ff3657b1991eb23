/*
 * delivery.h: the counters behind mongocast/sink_delivery.h, embedded in every mc_sink_t
 * (engine_private.h) and written by the sink types that report them (webhook, mongodb).
 *
 * Threads: one writer per sink (its executor thread: load + store, no read-modify-write
 * needed), readers anywhere (relaxed atomics: each figure is exact, a set of them may be
 * from slightly different moments).
 */
#ifndef MC_SINKS_DELIVERY_H
#define MC_SINKS_DELIVERY_H

#include <stdatomic.h>
#include <stdint.h>

#include "mongocast/sink_delivery.h"

typedef struct mc__delivery {
    _Atomic uint32_t outcomes; /* 0 until a sink type activates them */
    _Atomic uint64_t attempts, requests, in_flight;
    _Atomic uint64_t outcome[MC_SINK_OUT_COUNT];
    _Atomic uint64_t bucket[MC_SINK_LATENCY_BUCKETS]; /* per bucket, not cumulative */
    _Atomic uint64_t latency_count;
    _Atomic uint64_t latency_sum_us;
} mc__delivery_t;

typedef struct mc_sink mc_sink_t;

/* Turns the metrics on for `sink` with the classes it reports (1 << mc_sink_outcome_t). */
void mc__delivery_activate(mc_sink_t *sink, uint32_t outcomes);
/* A request of `events` events sent. */
void mc__delivery_sent(mc_sink_t *sink, uint64_t events);
/* It ended after `seconds` with outcome class `o`, counted `n` times (events or documents). */
void mc__delivery_done(mc_sink_t *sink, uint64_t events, double seconds, mc_sink_outcome_t o,
                       uint64_t n);
/* Adds n to one outcome class without a request (mongodb: per document). */
void mc__delivery_count(mc_sink_t *sink, mc_sink_outcome_t o, uint64_t n);

#endif
