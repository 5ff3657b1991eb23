/*
 * metrics.c: /metrics in the Prometheus text exposition format (version 0.0.4), and the
 * body of /readyz (streams' states, and every sink that is not running with its reason).
 *
 * Thread: the server's loop thread (reads the server's counters without locks; the engine's
 * per-stream status is copied out with mc_engine_stream_status(), which is thread-safe).
 * Per-sink counters come from mc_engine_sink_stats() (atomics, so also safe while the
 * library's own consumer thread dispatches) and the checkpoint age from the time of the last
 * successful token-store write that mc_engine_stream_status() reports.
 * Invariants: the output is rebuilt on every scrape from counters that only grow (…_total)
 * or from current gauges; nothing is cached between scrapes.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mongocast/sink_delivery.h"
#include "server_internal.h"

typedef struct out {
    char *buf;
    size_t len;
    size_t cap;
    bool failed;
} out_t;

static void put(out_t *o, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void put(out_t *o, const char *fmt, ...)
{
    if (o->failed) {
        return;
    }
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = true;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2 + (size_t)n;
        char *nb = realloc(o->buf, cap);
        if (!nb) {
            o->failed = true;
            return;
        }
        o->buf = nb;
        o->cap = cap;
    }
}

/* Label values escape backslash, double quote and line feed. */
static const char *label(const char *s, char *tmp, size_t cap)
{
    size_t n = 0;
    for (; *s && n + 3 < cap; s++) {
        if (*s == '\\' || *s == '"') {
            tmp[n++] = '\\';
            tmp[n++] = *s;
        } else if (*s == '\n') {
            tmp[n++] = '\\';
            tmp[n++] = 'n';
        } else {
            tmp[n++] = *s;
        }
    }
    tmp[n] = '\0';
    return tmp;
}

/* The per-sink families that are one number per sink (mc_sink_stats_t fields). */
static double lag_events(const mc_sink_stats_t *s)
{
    return (double)s->lag_events;
}
static double lag_seconds(const mc_sink_stats_t *s)
{
    return (double)s->lag_ms / 1000.0;
}
static double retries(const mc_sink_stats_t *s)
{
    return (double)s->retries;
}
static double dead_letters(const mc_sink_stats_t *s)
{
    return (double)s->dead_letters;
}
static double detaches(const mc_sink_stats_t *s)
{
    return (double)s->detaches;
}
static double acked(const mc_sink_stats_t *s)
{
    return (double)s->acked;
}
static double in_flight(const mc_sink_stats_t *s)
{
    return (double)s->in_flight;
}

typedef struct sink_family {
    const char *name, *type, *help;
    double (*value)(const mc_sink_stats_t *s);
    bool seconds; /* printed with milliseconds; counts as integers */
} sink_family_t;

static const sink_family_t sink_families[] = {
    {"mongocast_sink_lag_events", "gauge",
     "Events routed to the sink and not complete yet (an estimate while it catches up).",
     lag_events, false},
    {"mongocast_sink_lag_seconds", "gauge",
     "Age (by wallTime) of the oldest event the sink has not completed; 0 when up to date.",
     lag_seconds, true},
    {"mongocast_sink_retries_total", "counter",
     "Offers of an event again after a transient failure or a busy answer, per sink.", retries,
     false},
    {"mongocast_sink_dead_letters_total", "counter",
     "Events that failed permanently and went to the sink's dead letter.", dead_letters, false},
    {"mongocast_sink_detaches_total", "counter",
     "Times the sink passed max_lag_events and was detached to catch up on its own.", detaches,
     false},
    {"mongocast_sink_acked_total", "counter",
     "Events a durable sink acknowledged (e.g. Redis replied, JetStream sent its PubAck).", acked,
     false},
    {"mongocast_sink_in_flight", "gauge",
     "Events published to the sink and not complete yet (awaiting their ack or flush; a "
     "webhook's or mongodb sink's events in requests not answered yet, retries included).",
     in_flight, false},
};

static void help(out_t *o, const char *name, const char *type, const char *text);

/* The request metrics of the sinks that report them (webhook, mongodb: sink_delivery.h). */
static void delivery_metrics(out_t *o, mc_engine_t *engine, const mc_sink_stats_t *sks,
                             const bool *sk_ok, size_t n_sinks)
{
    mc_sink_delivery_stats_t *ds = calloc(n_sinks ? n_sinks : 1, sizeof(*ds));
    if (!ds) {
        o->failed = true;
        return;
    }
    bool any = false;
    for (size_t k = 0; k < n_sinks; k++) {
        ds[k].active = sk_ok[k] && mc_engine_sink_delivery_stats(engine, k, &ds[k]) == 0 &&
                       ds[k].active;
        any |= ds[k].active;
    }
    char l[300];
    if (any) {
        static const struct {
            const char *name, *type, *help;
            size_t offset;
        } plain[] = {
            {"mongocast_sink_attempts_total", "counter",
             "Events tried by the sink, each attempt counted (a batch of 100 counts 100).",
             offsetof(mc_sink_delivery_stats_t, attempts)},
            {"mongocast_sink_requests_total", "counter",
             "Requests (webhook) or insert commands (mongodb) sent by the sink.",
             offsetof(mc_sink_delivery_stats_t, requests)},
        };
        for (size_t f = 0; f < sizeof(plain) / sizeof(plain[0]); f++) {
            help(o, plain[f].name, plain[f].type, plain[f].help);
            for (size_t k = 0; k < n_sinks; k++) {
                if (ds[k].active) {
                    uint64_t v;
                    memcpy(&v, (const char *)&ds[k] + plain[f].offset, sizeof(v));
                    put(o, "%s{sink=\"%s\"} %" PRIu64 "\n", plain[f].name,
                        label(sks[k].name, l, sizeof(l)), v);
                }
            }
        }
        help(o, "mongocast_sink_outcomes_total", "counter",
             "Outcomes by class: requests (webhook: 2xx, 3xx, 4xx, 5xx, timeout, connection) or "
             "documents (mongodb: written, duplicate, transient, permanent).");
        for (size_t k = 0; k < n_sinks; k++) {
            for (int c = 0; ds[k].active && c < MC_SINK_OUT_COUNT; c++) {
                if (ds[k].outcomes & (1u << c)) {
                    put(o, "mongocast_sink_outcomes_total{sink=\"%s\",class=\"%s\"} %" PRIu64
                           "\n",
                        label(sks[k].name, l, sizeof(l)),
                        mc_sink_outcome_name((mc_sink_outcome_t)c), ds[k].outcome[c]);
                }
            }
        }
        help(o, "mongocast_sink_request_seconds", "histogram",
             "Time from sending a request (or insert command) to its answer.");
        for (size_t k = 0; k < n_sinks; k++) {
            if (!ds[k].active) {
                continue;
            }
            label(sks[k].name, l, sizeof(l));
            for (int b = 0; b < MC_SINK_LATENCY_BUCKETS; b++) {
                if (b + 1 < MC_SINK_LATENCY_BUCKETS) {
                    put(o, "mongocast_sink_request_seconds_bucket{sink=\"%s\",le=\"%g\"} %" PRIu64
                           "\n",
                        l, mc_sink_latency_bounds[b], ds[k].latency_bucket[b]);
                } else {
                    put(o, "mongocast_sink_request_seconds_bucket{sink=\"%s\",le=\"+Inf\"} %" PRIu64
                           "\n",
                        l, ds[k].latency_bucket[b]);
                }
            }
            put(o, "mongocast_sink_request_seconds_sum{sink=\"%s\"} %.6f\n", l,
                ds[k].latency_sum_s);
            put(o, "mongocast_sink_request_seconds_count{sink=\"%s\"} %" PRIu64 "\n", l,
                ds[k].latency_count);
        }
    }
    free(ds);
}

/* A JSON string (quotes, backslashes and control characters escaped). */
static void json_string(out_t *o, const char *s)
{
    put(o, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            put(o, "\\%c", c);
        } else if (c < 0x20) {
            put(o, "\\u%04x", c);
        } else {
            put(o, "%c", c);
        }
    }
    put(o, "\"");
}

static void help(out_t *o, const char *name, const char *type, const char *text)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
}

static bool out_init(out_t *o, size_t cap)
{
    *o = (out_t){.cap = cap, .buf = malloc(cap)};
    if (o->buf) {
        o->buf[0] = '\0';
    }
    return o->buf != NULL;
}

/* The text built, or NULL (freed) when memory ran out on the way. */
static char *out_finish(out_t *o, size_t *len)
{
    if (o->failed) {
        free(o->buf);
        return NULL;
    }
    *len = o->len;
    return o->buf;
}

/* Every stream's status, in hub order: ss[i] is valid when have[i]. False when memory runs
 * out (nothing to free then). */
static bool read_streams(mcd_server_t *srv, mc_stream_status_t **ss, bool **have)
{
    size_t n = srv->fanout.n_hubs;
    *ss = calloc(n ? n : 1, sizeof(**ss));
    *have = calloc(n ? n : 1, sizeof(**have));
    if (!*ss || !*have) {
        free(*ss);
        free(*have);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        (*have)[i] = srv->engine && mc_engine_stream_status(srv->engine,
                                                            srv->fanout.hubs[i].cfg->name,
                                                            &(*ss)[i]) == 0;
    }
    return true;
}

/* A metric without labels: its HELP and TYPE lines and its one sample. */
static void scalar(out_t *o, const char *name, const char *type, const char *text, uint64_t v)
{
    help(o, name, type, text);
    put(o, "%s %" PRIu64 "\n", name, v);
}

/* A counter of the engine's per-stream status (the uint64_t at `field` of
 * mc_stream_status_t): its HELP and TYPE lines and one sample per stream whose status was
 * read (have[i]). */
static void stream_counter(out_t *o, const mcd_server_t *srv, const mc_stream_status_t *ss,
                           const bool *have, const char *name, const char *text, size_t field)
{
    char l[400];
    help(o, name, "counter", text);
    for (size_t i = 0; i < srv->fanout.n_hubs; i++) {
        if (have[i]) {
            uint64_t v;
            memcpy(&v, (const char *)&ss[i] + field, sizeof(v));
            put(o, "%s{stream=\"%s\"} %" PRIu64 "\n", name,
                label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)), v);
        }
    }
}


/* lease.enabled: per leased stream, whether this node holds the lease and its counters. */
static void lease_metrics(out_t *o, mcd_server_t *srv, char *l, size_t lcap)
{
    size_t n = srv->fanout.n_hubs;
    mc_lease_status_t *ls = calloc(n ? n : 1, sizeof(*ls));
    bool any = false;
    for (size_t i = 0; ls && srv->engine && i < n; i++) {
        if (mc_engine_lease_status(srv->engine, srv->fanout.hubs[i].cfg->name, &ls[i]) != 0) {
            ls[i].enabled = false;
        }
        any |= ls[i].enabled;
    }
    if (!any) {
        free(ls);
        return;
    }
    static const struct {
        const char *name, *type, *help;
        size_t off;
        bool is_bool;
    } fams[] = {
        {"mongocast_lease_holder", "gauge",
         "1 when this node holds the stream's lease and feeds its sinks (other than the "
         "WebSocket/SSE clients), 0 on standby.",
         offsetof(mc_lease_status_t, holder), true},
        {"mongocast_lease_epoch", "gauge",
         "The fencing epoch of the stream's lease this node holds or last held (0: never).",
         offsetof(mc_lease_status_t, epoch), false},
        {"mongocast_lease_acquisitions_total", "counter",
         "Times this node took the stream's lease (created or taken over).",
         offsetof(mc_lease_status_t, acquisitions), false},
        {"mongocast_lease_renewals_total", "counter", "Successful renewals of the stream's lease.",
         offsetof(mc_lease_status_t, renewals), false},
        {"mongocast_lease_losses_total", "counter",
         "Times this node lost the stream's lease (taken over, or not renewed in time).",
         offsetof(mc_lease_status_t, losses), false},
    };
    for (size_t f = 0; f < sizeof(fams) / sizeof(fams[0]); f++) {
        help(o, fams[f].name, fams[f].type, fams[f].help);
        for (size_t i = 0; i < n; i++) {
            if (!ls[i].enabled) {
                continue;
            }
            const char *p = (const char *)&ls[i] + fams[f].off;
            uint64_t v = fams[f].is_bool ? (uint64_t)(*(const bool *)p) : *(const uint64_t *)p;
            put(o, "%s{stream=\"%s\"} %" PRIu64 "\n", fams[f].name,
                label(srv->fanout.hubs[i].cfg->name, l, lcap), v);
        }
    }
    free(ls);
}

char *mcd_metrics_render(mcd_server_t *srv, size_t *len)
{
    out_t o;
    if (!out_init(&o, 8192)) {
        return NULL;
    }
    const mcd_stats_t *st = &srv->table.stats;
    int64_t now = (int64_t)time(NULL) * 1000;
    /* Millisecond wall clock for the checkpoint age, which is short (about the checkpoint
     * interval) and would be off by up to a second with time(). */
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    int64_t now_ms = (int64_t)rt.tv_sec * 1000 + rt.tv_nsec / 1000000;
    char l[400];

    size_t n = srv->fanout.n_hubs;
    mc_stream_status_t *ss;
    bool *have;
    if (!read_streams(srv, &ss, &have)) {
        free(o.buf);
        return NULL;
    }

    help(&o, "mongocast_events_in_total", "counter", "Change events read from MongoDB per stream.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_events_in_total{stream=\"%s\"} %" PRIu64 "\n",
            label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)),
            have[i] ? ss[i].events : srv->fanout.hubs[i].events);
    }
    help(&o, "mongocast_events_out_total", "counter",
         "Events (changes and control events) a sink accepted, per sink instance; the live "
         "WebSocket/SSE fan-out is sink \"live-clients\".");
    /* One snapshot per sink for every family below (each snapshot takes the runner's lock). */
    size_t n_sinks = srv->engine ? mc_engine_sink_count(srv->engine) : 0;
    mc_sink_stats_t *sks = calloc(n_sinks ? n_sinks : 1, sizeof(*sks));
    bool *sk_ok = calloc(n_sinks ? n_sinks : 1, sizeof(*sk_ok));
    if (!sks || !sk_ok) {
        free(sks);
        free(sk_ok);
        free(ss);
        free(have);
        free(o.buf);
        return NULL;
    }
    for (size_t k = 0; k < n_sinks; k++) {
        sk_ok[k] = mc_engine_sink_stats(srv->engine, k, &sks[k]) == 0;
    }
    mc_sink_stats_t sk;
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k]) {
            sk = sks[k];
            put(&o, "mongocast_events_out_total{sink=\"%s\"} %" PRIu64 "\n",
                label(sk.name, l, sizeof(l)), sk.published);
        }
    }
    if (!srv->engine) {
        /* A server without an engine (tests) still counts what its fan-out received. */
        put(&o, "mongocast_events_out_total{sink=\"live-clients\"} %" PRIu64 "\n",
            srv->fanout.events);
    }
    help(&o, "mongocast_events_skipped_total", "counter",
         "Events a sink did not take (e.g. control events it ignores), per sink instance.");
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k]) {
            sk = sks[k];
            put(&o, "mongocast_events_skipped_total{sink=\"%s\"} %" PRIu64 "\n",
                label(sk.name, l, sizeof(l)), sk.skipped);
        }
    }
    help(&o, "mongocast_publish_failures_total", "counter",
         "Events a sink gave up on (dead-lettered, dropped, or the one that failed the sink), "
         "per sink instance.");
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k]) {
            sk = sks[k];
            put(&o, "mongocast_publish_failures_total{sink=\"%s\"} %" PRIu64 "\n",
                label(sk.name, l, sizeof(l)), sk.failed);
        }
    }
    help(&o, "mongocast_sink_state", "gauge",
         "1 for the sink runner's current state (running, retrying, catching_up, failed), 0 "
         "for the others.");
    static const mc_sink_state_t states[] = {MC_SINK_RUNNING, MC_SINK_RETRYING,
                                             MC_SINK_CATCHING_UP, MC_SINK_FAILED};
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k]) {
            sk = sks[k];
            label(sk.name, l, sizeof(l));
            for (size_t j = 0; j < sizeof(states) / sizeof(states[0]); j++) {
                put(&o, "mongocast_sink_state{sink=\"%s\",state=\"%s\"} %d\n", l,
                    mc_sink_state_name(states[j]), sk.state == states[j] ? 1 : 0);
            }
        }
    }
    for (size_t f = 0; f < sizeof(sink_families) / sizeof(sink_families[0]); f++) {
        const sink_family_t *fam = &sink_families[f];
        help(&o, fam->name, fam->type, fam->help);
        for (size_t k = 0; k < n_sinks; k++) {
            if (sk_ok[k]) {
                put(&o, "%s{sink=\"%s\"} ", fam->name, label(sks[k].name, l, sizeof(l)));
                put(&o, fam->seconds ? "%.3f\n" : "%.0f\n", fam->value(&sks[k]));
            }
        }
    }
    help(&o, "mongocast_sink_snapshot_documents_total", "counter",
         "Documents the sink's initial snapshot (initial: snapshot) queued in this run, over "
         "its streams; only sinks with an initial snapshot.");
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k] && sks[k].snapshot) {
            put(&o, "mongocast_sink_snapshot_documents_total{sink=\"%s\"} %" PRIu64 "\n",
                label(sks[k].name, l, sizeof(l)), sks[k].snapshot_documents);
        }
    }
    help(&o, "mongocast_sink_snapshot_done", "gauge",
         "1 when every initial snapshot of the sink has read its last document (also when that "
         "happened in an earlier run), 0 while one is copying.");
    for (size_t k = 0; k < n_sinks; k++) {
        if (sk_ok[k] && sks[k].snapshot) {
            put(&o, "mongocast_sink_snapshot_done{sink=\"%s\"} %d\n",
                label(sks[k].name, l, sizeof(l)), sks[k].snapshot_done ? 1 : 0);
        }
    }
    if (srv->engine) {
        delivery_metrics(&o, srv->engine, sks, sk_ok, n_sinks);
    }
    help(&o, "mongocast_deliveries_total", "counter",
         "Messages queued to live subscribers, per transport.");
    put(&o, "mongocast_deliveries_total{transport=\"ws\"} %" PRIu64 "\n", st->deliveries[MCD_T_WS]);
    put(&o, "mongocast_deliveries_total{transport=\"sse\"} %" PRIu64 "\n",
        st->deliveries[MCD_T_SSE]);
    help(&o, "mongocast_connections", "gauge", "Open connections per transport.");
    put(&o, "mongocast_connections{transport=\"http\"} %u\n", st->conns[MCD_T_HTTP]);
    put(&o, "mongocast_connections{transport=\"ws\"} %u\n", st->conns[MCD_T_WS]);
    put(&o, "mongocast_connections{transport=\"sse\"} %u\n", st->conns[MCD_T_SSE]);
    help(&o, "mongocast_connections_accepted_total", "counter", "TCP connections accepted.");
    put(&o, "mongocast_connections_accepted_total %" PRIu64 "\n", st->accepted);
    help(&o, "mongocast_refusals_total", "counter",
         "Requests answered with an error status before any upgrade.");
    static const char *const statuses[] = {"400", "401", "403", "404", "503", "other"};
    for (int k = 0; k < 6; k++) {
        put(&o, "mongocast_refusals_total{status=\"%s\"} %" PRIu64 "\n", statuses[k],
            st->refused[k]);
    }
    scalar(&o, "mongocast_queued_bytes", "gauge",
           "Bytes queued for live subscribers and not yet written to their sockets.",
           st->queued_bytes);
    scalar(&o, "mongocast_slow_consumer_disconnects_total", "counter",
           "Subscribers disconnected because their send queue passed "
           "server.max_send_queue_bytes.",
           st->slow_disconnects);
    scalar(&o, "mongocast_connections_evicted_total", "counter",
           "Connections that were not subscribers closed to make room for a new connection "
           "(full table, or server.max_connections_per_address).",
           st->evicted);
    if (srv->tls) {
        help(&o, "mongocast_tls_handshakes_total", "counter",
             "TLS handshakes on the listener (server.tls): ok, or failed (bad or untrusted "
             "client certificate, unsupported version, garbage, plain HTTP on the TLS port).");
        put(&o, "mongocast_tls_handshakes_total{result=\"ok\"} %" PRIu64 "\n",
            st->tls_handshakes_ok);
        put(&o, "mongocast_tls_handshakes_total{result=\"failed\"} %" PRIu64 "\n",
            st->tls_handshakes_failed);
    }
    help(&o, "mongocast_server_io", "gauge",
         "How sockets are written (server.io): 1 for the mode in use, uring or writev.");
    bool uring = srv->table.ring || (srv->table.pool && mcd_sendpool_uring(srv->table.pool));
    put(&o, "mongocast_server_io{mode=\"%s\"} 1\n", uring ? "uring" : "writev");
    scalar(&o, "mongocast_server_threads", "gauge",
           "Threads that make the fan-out's socket sends (server.threads): the loop thread "
           "and the send threads.",
           (uint64_t)(srv->table.pool ? mcd_sendpool_threads(srv->table.pool) : 1));
    if (srv->table.pool) {
        help(&o, "mongocast_send_thread_sends_total", "counter",
             "Sends made by each sender of server.threads (thread 0 is the loop thread); "
             "they add up to the socket sends of the check phase.");
        for (unsigned i = 0; i < mcd_sendpool_threads(srv->table.pool); i++) {
            put(&o, "mongocast_send_thread_sends_total{thread=\"%u\"} %" PRIu64 "\n", i,
                mcd_sendpool_sends_of(srv->table.pool, i));
        }
        scalar(&o, "mongocast_send_parallel_passes_total", "counter",
               "Loop passes whose sends were spread over the send threads (a pass with only a "
               "few sends is made by the loop thread alone).",
               mcd_sendpool_parallel_runs(srv->table.pool));
    }
    help(&o, "mongocast_socket_sends_total", "counter",
         "Writes of queued bytes handed to the kernel: path writev is one writev(2) call each, "
         "path uring one send submitted through io_uring.");
    put(&o, "mongocast_socket_sends_total{path=\"writev\"} %" PRIu64 "\n", st->writev_sends);
    put(&o, "mongocast_socket_sends_total{path=\"uring\"} %" PRIu64 "\n", st->ring_sends);
    scalar(&o, "mongocast_io_uring_submits_total", "counter",
           "io_uring_enter calls that submitted sends (one per loop pass, more with more "
           "connections than one submission takes).",
           st->ring_submits);
    scalar(&o, "mongocast_pipelining_disconnects_total", "counter",
           "Connections closed for pipelining requests without reading the answers.",
           st->pipelining);
    scalar(&o, "mongocast_filter_budget_disconnects_total", "counter",
           "Subscribers closed because their filter and per-subscriber stages passed "
           "server.filter_budget_us on an event (or a regular-expression limit).",
           srv->fanout.budget_disconnects);
    scalar(&o, "mongocast_oversize_events_total", "counter",
           "Events whose message (in any routing view) passed server.max_message_bytes and "
           "went to live subscribers as an oversize notice.",
           srv->fanout.oversize);
    mcd_snapshot_stats_t snap;
    mcd_snapshots_stats(srv->snapshots, &snap);
    scalar(&o, "mongocast_snapshots_active", "gauge",
           "?snapshot=true subscriptions whose snapshot is being read or sent.", snap.active);
    help(&o, "mongocast_snapshots_total", "counter",
         "Snapshots started, and how they ended (completed: joined to the stream; failed: "
         "too large, history overflow, read error, closed by the client).");
    put(&o, "mongocast_snapshots_total{result=\"completed\"} %" PRIu64 "\n", snap.completed);
    put(&o, "mongocast_snapshots_total{result=\"failed\"} %" PRIu64 "\n", snap.failed);
    scalar(&o, "mongocast_snapshot_documents_total", "counter",
           "Documents sent in completed snapshots.", snap.documents);
    mcd_catchup_stats_t cus;
    mcd_catchups_stats(srv->catchups, &cus);
    scalar(&o, "mongocast_catchups_active", "gauge",
           "Resumes older than the history being caught up from the oplog.", cus.active);
    help(&o, "mongocast_catchups_total", "counter",
         "Catch-ups started for resumes older than the history, and how they ended (joined: "
         "the subscriber went live with no gap; reset: a limit or an unusable id).");
    put(&o, "mongocast_catchups_total{result=\"joined\"} %" PRIu64 "\n", cus.joined);
    put(&o, "mongocast_catchups_total{result=\"reset\"} %" PRIu64 "\n", cus.reset);
    scalar(&o, "mongocast_catchup_events_total", "counter",
           "Stream events read by catch-ups.", cus.events);

    help(&o, "mongocast_stream_subscribers", "gauge", "Live subscribers per stream.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_stream_subscribers{stream=\"%s\"} %u\n",
            label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)), srv->fanout.hubs[i].subs.n);
    }
    help(&o, "mongocast_stream_lag_seconds", "gauge",
         "Now minus the wallTime of the stream's newest change.");
    for (size_t i = 0; i < n; i++) {
        int64_t wall = srv->fanout.hubs[i].last_wall_ms;
        if (wall == INT64_MIN && have[i] && ss[i].last_event_ms > 0) {
            wall = ss[i].last_event_ms;
        }
        if (wall == INT64_MIN) {
            continue;
        }
        double lag = (double)(now - wall) / 1000.0;
        put(&o, "mongocast_stream_lag_seconds{stream=\"%s\"} %.3f\n",
            label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)), lag < 0 ? 0.0 : lag);
    }
    stream_counter(&o, srv, ss, have, "mongocast_stream_resumes_total",
                   "Change stream reopens after an error (the driver's own resumes not counted).",
                   offsetof(mc_stream_status_t, resumes));
    stream_counter(&o, srv, ss, have, "mongocast_recipient_unresolved_total",
                   "Changes whose recipient could not be decided from the write (or proven "
                   "through the lookup) and went to admins only.",
                   offsetof(mc_stream_status_t, unresolved_recipients));
    stream_counter(&o, srv, ss, have, "mongocast_recipient_missing_total",
                   "Document events of a stream with a recipient whose recipient path held no "
                   "identity (missing, null, another type; a pipeline stage may have removed "
                   "it): admins only.",
                   offsetof(mc_stream_status_t, recipient_missing));
    stream_counter(&o, srv, ss, have, "mongocast_images_missing_total",
                   "Events that arrived without the pre- or post-image the stream asks for.",
                   offsetof(mc_stream_status_t, images_missing));
    stream_counter(&o, srv, ss, have, "mongocast_stream_split_events_total",
                   "Change events larger than MongoDB's 16 MB limit delivered whole, "
                   "reassembled from $changeStreamSplitLargeEvent fragments (on_oversize: split).",
                   offsetof(mc_stream_status_t, split_events));
    stream_counter(&o, srv, ss, have, "mongocast_stream_oversize_skipped_total",
                   "Change events larger than MongoDB's 16 MB limit delivered as an oversize "
                   "notice (on_oversize: skip).",
                   offsetof(mc_stream_status_t, oversize_skipped));
    help(&o, "mongocast_images_off", "gauge",
         "1 while the stream knows that images it asks for are off somewhere (see /readyz).");
    for (size_t i = 0; i < n; i++) {
        if (have[i]) {
            put(&o, "mongocast_images_off{stream=\"%s\"} %d\n",
                label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)),
                ss[i].images_problem[0] ? 1 : 0);
        }
    }
    help(&o, "mongocast_client_resumes_total", "counter",
         "Subscriber resumes (since= or Last-Event-ID): replayed from history, caught up from "
         "the oplog and joined, or answered with reset (catch-up off, or a catch-up that "
         "could not be served).");
    for (size_t i = 0; i < n; i++) {
        label(srv->fanout.hubs[i].cfg->name, l, sizeof(l));
        put(&o, "mongocast_client_resumes_total{stream=\"%s\",result=\"replay\"} %" PRIu64 "\n", l,
            srv->fanout.hubs[i].replays);
        put(&o, "mongocast_client_resumes_total{stream=\"%s\",result=\"catchup\"} %" PRIu64 "\n",
            l, srv->fanout.hubs[i].catchups);
        put(&o, "mongocast_client_resumes_total{stream=\"%s\",result=\"reset\"} %" PRIu64 "\n", l,
            srv->fanout.hubs[i].resets + srv->fanout.hubs[i].catchup_resets);
    }
    help(&o, "mongocast_checkpoint_age_seconds", "gauge",
         "Seconds since the stream's resume position was last written to the checkpoint "
         "store; absent before the first write.");
    for (size_t i = 0; i < n; i++) {
        if (!have[i] || ss[i].checkpoint_written_ms <= 0) {
            continue;
        }
        double age = (double)(now_ms - ss[i].checkpoint_written_ms) / 1000.0;
        put(&o, "mongocast_checkpoint_age_seconds{stream=\"%s\"} %.3f\n",
            label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)), age < 0 ? 0.0 : age);
    }
    stream_counter(&o, srv, ss, have, "mongocast_checkpoint_write_failures_total",
                   "Failed writes of the stream's resume position to the checkpoint store (each "
                   "is retried at the next interval).",
                   offsetof(mc_stream_status_t, checkpoint_failures));
    lease_metrics(&o, srv, l, sizeof(l));
    help(&o, "mongocast_stream_up", "gauge", "1 when the stream's change stream is open.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_stream_up{stream=\"%s\"} %d\n",
            label(srv->fanout.hubs[i].cfg->name, l, sizeof(l)),
            have[i] && ss[i].state == MC_STREAM_OPEN ? 1 : 0);
    }
    free(ss);
    free(have);
    free(sks);
    free(sk_ok);
    return out_finish(&o, len);
}

char *mcd_readyz_render(mcd_server_t *srv, bool engine_running, size_t *len, bool *ready)
{
    out_t o;
    mc_stream_status_t *ss;
    bool *have;
    if (!out_init(&o, 1024)) {
        return NULL;
    }
    if (!read_streams(srv, &ss, &have)) {
        free(o.buf);
        return NULL;
    }
    *ready = engine_running && srv->engine && mc_engine_ready(srv->engine);
    size_t n = srv->fanout.n_hubs;
    put(&o, "{\"ready\":%s,\"streams\":{", *ready ? "true" : "false");
    for (size_t i = 0; i < n; i++) {
        put(&o, "%s", i ? "," : "");
        json_string(&o, srv->fanout.hubs[i].cfg->name);
        put(&o, ":\"%s\"", have[i] ? mc_stream_state_name(ss[i].state) : "stopped");
    }
    put(&o, "}");
    /* Streams that run but cannot route everything: pre-/post-images off (images.c). Ready
     * still means "every change stream is open"; these say what is degraded. */
    bool first = true;
    for (size_t i = 0; i < n; i++) {
        if (!have[i] || !ss[i].images_problem[0]) {
            continue;
        }
        put(&o, "%s", first ? ",\"degraded\":{" : ",");
        first = false;
        json_string(&o, srv->fanout.hubs[i].cfg->name);
        put(&o, ":");
        json_string(&o, ss[i].images_problem);
    }
    put(&o, "%s", first ? "" : "}");
    /* lease.enabled: this node's role per leased stream (a standby node is ready: it serves
     * its clients; only the leader feeds the other sinks). */
    first = true;
    mc_lease_status_t lst;
    for (size_t i = 0; srv->engine && i < n; i++) {
        if (mc_engine_lease_status(srv->engine, srv->fanout.hubs[i].cfg->name, &lst) != 0 ||
            !lst.enabled) {
            continue;
        }
        if (first) {
            put(&o, ",\"lease\":{\"node\":");
            json_string(&o, lst.node_id);
            put(&o, ",\"streams\":{");
        } else {
            put(&o, ",");
        }
        first = false;
        json_string(&o, srv->fanout.hubs[i].cfg->name);
        put(&o, ":{\"role\":\"%s\",\"epoch\":%" PRIu64 "}", lst.holder ? "leader" : "standby",
            lst.epoch);
    }
    put(&o, "%s", first ? "" : "}}");
    /* Sinks that are not plainly running, with the reason (a failed durable one is why the
     * daemon is not ready). */
    size_t n_sinks = srv->engine ? mc_engine_sink_count(srv->engine) : 0;
    first = true;
    mc_sink_stats_t sk;
    for (size_t k = 0; k < n_sinks; k++) {
        if (mc_engine_sink_stats(srv->engine, k, &sk) != 0 || sk.state == MC_SINK_RUNNING ||
            sk.state == MC_SINK_IDLE || sk.state == MC_SINK_STOPPED) {
            continue;
        }
        put(&o, "%s", first ? ",\"sinks\":{" : ",");
        first = false;
        json_string(&o, sk.name);
        put(&o, ":{\"state\":\"%s\",\"durable\":%s,\"reason\":", mc_sink_state_name(sk.state),
            sk.durable ? "true" : "false");
        json_string(&o, sk.message);
        put(&o, "}");
    }
    put(&o, "%s}", first ? "" : "}");
    free(ss);
    free(have);
    return out_finish(&o, len);
}
