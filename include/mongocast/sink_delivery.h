/*
 * mongocast/sink_delivery.h: per-sink delivery metrics of the sink types that send to a
 * remote destination (webhook, mongodb): attempts, requests, outcomes by class, requests in
 * flight and a latency histogram. Runner-level figures (lag, retries, dead letters,
 * detaches) are in mc_sink_stats_t (mongocast/engine.h).
 *
 * Thread-safe: counters are atomics written by the sink's executor thread and read by any.
 */
#ifndef MONGOCAST_SINK_DELIVERY_H
#define MONGOCAST_SINK_DELIVERY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/engine.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Outcome classes of one request (webhook) or one document write (mongodb). */
typedef enum mc_sink_outcome {
    MC_SINK_OUT_2XX = 0,    /* webhook: acknowledged */
    MC_SINK_OUT_3XX,        /* webhook: a redirect (never followed: permanent) */
    MC_SINK_OUT_4XX,        /* webhook: 408 and 429 are transient, the others permanent */
    MC_SINK_OUT_5XX,        /* webhook: transient */
    MC_SINK_OUT_TIMEOUT,    /* webhook: no complete answer within timeout_ms */
    MC_SINK_OUT_CONNECTION, /* webhook: refused, reset, DNS or TLS failure */
    MC_SINK_OUT_WRITTEN,    /* mongodb: a document inserted */
    MC_SINK_OUT_DUPLICATE,  /* mongodb: its _id was there already (a replay) */
    MC_SINK_OUT_TRANSIENT,  /* mongodb: a write that may work later */
    MC_SINK_OUT_PERMANENT,  /* mongodb: a document that can never be written */
    MC_SINK_OUT_COUNT
} mc_sink_outcome_t;

/* The label of an outcome class ("2xx", "timeout", "duplicate", ...). */
const char *mc_sink_outcome_name(mc_sink_outcome_t o);

#define MC_SINK_LATENCY_BUCKETS 12
/* Upper bounds (seconds) of the latency histogram's buckets; the last is +Inf. */
extern const double mc_sink_latency_bounds[MC_SINK_LATENCY_BUCKETS];

typedef struct mc_sink_delivery_stats {
    bool active;       /* false: the sink's type does not report these */
    uint32_t outcomes; /* bit (1 << mc_sink_outcome_t) for each class the type reports */
    uint64_t attempts; /* events tried, each attempt counted (a batch of 100: 100) */
    uint64_t requests; /* requests or write commands sent */
    uint64_t outcome[MC_SINK_OUT_COUNT];
    uint64_t in_flight; /* events in requests not answered yet */
    /* Request latency: cumulative bucket counts (le bounds above), count and sum. */
    uint64_t latency_bucket[MC_SINK_LATENCY_BUCKETS];
    uint64_t latency_count;
    double latency_sum_s;
} mc_sink_delivery_stats_t;

/* The i-th sink's delivery metrics (0 <= i < mc_engine_sink_count()). MC_ENOTFOUND for an
 * index out of range; out->active false for sink types without them. */
int mc_engine_sink_delivery_stats(mc_engine_t *engine, size_t i, mc_sink_delivery_stats_t *out);

#ifdef __cplusplus
}
#endif
#endif
