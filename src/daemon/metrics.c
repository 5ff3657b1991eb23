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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
};

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

char *mcd_metrics_render(mcd_server_t *srv, size_t *len)
{
    out_t o = {.cap = 8192};
    o.buf = malloc(o.cap);
    if (!o.buf) {
        return NULL;
    }
    o.buf[0] = '\0';
    const mcd_stats_t *st = &srv->stats;
    int64_t now = (int64_t)time(NULL) * 1000;
    /* Millisecond wall clock for the checkpoint age, which is short (about the checkpoint
     * interval) and would be off by up to a second with time(). */
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    int64_t now_ms = (int64_t)rt.tv_sec * 1000 + rt.tv_nsec / 1000000;
    char l[400];

    size_t n = srv->n_hubs;
    mc_stream_status_t *ss = calloc(n ? n : 1, sizeof(*ss));
    bool *have = calloc(n ? n : 1, sizeof(*have));
    if (!ss || !have) {
        free(ss);
        free(have);
        free(o.buf);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        have[i] = srv->engine &&
                  mc_engine_stream_status(srv->engine, srv->hubs[i].cfg->name, &ss[i]) == 0;
    }

    help(&o, "mongocast_events_in_total", "counter", "Change events read from MongoDB per stream.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_events_in_total{stream=\"%s\"} %" PRIu64 "\n",
            label(srv->hubs[i].cfg->name, l, sizeof(l)),
            have[i] ? ss[i].events : srv->hubs[i].events);
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
            st->fanout_events);
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
    help(&o, "mongocast_queued_bytes", "gauge",
         "Bytes queued for live subscribers and not yet written to their sockets.");
    put(&o, "mongocast_queued_bytes %" PRIu64 "\n", st->queued_bytes);
    help(&o, "mongocast_slow_consumer_disconnects_total", "counter",
         "Subscribers disconnected because their send queue passed "
         "server.max_send_queue_bytes.");
    put(&o, "mongocast_slow_consumer_disconnects_total %" PRIu64 "\n", st->slow_disconnects);

    help(&o, "mongocast_stream_subscribers", "gauge", "Live subscribers per stream.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_stream_subscribers{stream=\"%s\"} %u\n",
            label(srv->hubs[i].cfg->name, l, sizeof(l)), srv->hubs[i].n_subs);
    }
    help(&o, "mongocast_stream_lag_seconds", "gauge",
         "Now minus the wallTime of the stream's newest change.");
    for (size_t i = 0; i < n; i++) {
        int64_t wall = srv->hubs[i].last_wall_ms;
        if (wall == INT64_MIN && have[i] && ss[i].last_event_ms > 0) {
            wall = ss[i].last_event_ms;
        }
        if (wall == INT64_MIN) {
            continue;
        }
        double lag = (double)(now - wall) / 1000.0;
        put(&o, "mongocast_stream_lag_seconds{stream=\"%s\"} %.3f\n",
            label(srv->hubs[i].cfg->name, l, sizeof(l)), lag < 0 ? 0.0 : lag);
    }
    help(&o, "mongocast_stream_resumes_total", "counter",
         "Change stream reopens after an error (the driver's own resumes not counted).");
    for (size_t i = 0; i < n; i++) {
        if (have[i]) {
            put(&o, "mongocast_stream_resumes_total{stream=\"%s\"} %" PRIu64 "\n",
                label(srv->hubs[i].cfg->name, l, sizeof(l)), ss[i].resumes);
        }
    }
    help(&o, "mongocast_client_resumes_total", "counter",
         "Subscriber resumes (since= or Last-Event-ID): replayed from history or answered "
         "with reset.");
    for (size_t i = 0; i < n; i++) {
        label(srv->hubs[i].cfg->name, l, sizeof(l));
        put(&o, "mongocast_client_resumes_total{stream=\"%s\",result=\"replay\"} %" PRIu64 "\n", l,
            srv->hubs[i].replays);
        put(&o, "mongocast_client_resumes_total{stream=\"%s\",result=\"reset\"} %" PRIu64 "\n", l,
            srv->hubs[i].resets);
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
            label(srv->hubs[i].cfg->name, l, sizeof(l)), age < 0 ? 0.0 : age);
    }
    help(&o, "mongocast_checkpoint_write_failures_total", "counter",
         "Failed writes of the stream's resume position to the checkpoint store (each is "
         "retried at the next interval).");
    for (size_t i = 0; i < n; i++) {
        if (have[i]) {
            put(&o, "mongocast_checkpoint_write_failures_total{stream=\"%s\"} %" PRIu64 "\n",
                label(srv->hubs[i].cfg->name, l, sizeof(l)), ss[i].checkpoint_failures);
        }
    }
    help(&o, "mongocast_stream_up", "gauge", "1 when the stream's change stream is open.");
    for (size_t i = 0; i < n; i++) {
        put(&o, "mongocast_stream_up{stream=\"%s\"} %d\n",
            label(srv->hubs[i].cfg->name, l, sizeof(l)),
            have[i] && ss[i].state == MC_STREAM_OPEN ? 1 : 0);
    }
    free(ss);
    free(have);
    free(sks);
    free(sk_ok);
    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}

char *mcd_readyz_render(mcd_server_t *srv, bool engine_running, size_t *len, bool *ready)
{
    out_t o = {.cap = 1024};
    o.buf = malloc(o.cap);
    if (!o.buf) {
        return NULL;
    }
    o.buf[0] = '\0';
    *ready = engine_running && srv->engine && mc_engine_ready(srv->engine);
    put(&o, "{\"ready\":%s,\"streams\":{", *ready ? "true" : "false");
    for (size_t i = 0; i < srv->n_hubs; i++) {
        const char *state = "stopped";
        mc_stream_status_t st;
        if (srv->engine && mc_engine_stream_status(srv->engine, srv->hubs[i].cfg->name, &st) == 0) {
            state = mc_stream_state_name(st.state);
        }
        put(&o, "%s", i ? "," : "");
        json_string(&o, srv->hubs[i].cfg->name);
        put(&o, ":\"%s\"", state);
    }
    put(&o, "}");
    /* Sinks that are not plainly running, with the reason (a failed durable one is why the
     * daemon is not ready). */
    size_t n_sinks = srv->engine ? mc_engine_sink_count(srv->engine) : 0;
    bool first = true;
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
    if (o.failed) {
        free(o.buf);
        return NULL;
    }
    *len = o.len;
    return o.buf;
}
