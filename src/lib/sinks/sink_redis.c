/*
 * sink_redis.c: the "redis" sink type: events into Redis Streams (`mode: stream`, XADD with
 * the entry ID derived from the event's position, durable, a replay refused by Redis counts
 * as written) or Redis Pub/Sub (`mode: pubsub`, PUBLISH, at-most-once), over the pipelined
 * asynchronous client of redis_client.c.
 *
 * Threads: MC_SINK_ASYNC. validate/init/destroy on the engine's thread (pure: options only);
 * start creates the client on the engine's I/O loop (mc_sink_uv_loop()) before that loop's
 * thread runs; publish, the reply callbacks, drain and stop run on the loop thread. probe
 * runs on `mongocast check`'s thread with a loop of its own.
 *
 * Delivery: every accepted event holds one op (its event reference, the XADD arguments) until
 * its reply callback ran; at most `max_in_flight` ops exist (then MC_EAGAIN). Stream mode acks
 * an event when Redis stored it (ADDED) or refused it as already there (DUPLICATE, TRIMMED);
 * a failed command is reported with its class (connection trouble and timeouts: transient,
 * the runner resends it and everything after it in order; WRONGTYPE, COLLISION, GAP:
 * permanent). Pub/Sub mode is at-most-once: an event is acked as soon as its PUBLISH is
 * handed to the client (the type is MC_SINK_DURABLE for stream mode's sake), and a PUBLISH
 * lost with a dropped connection is not sent again; while the client has no connection,
 * publish refuses events (transient) so that they wait in the runner, visible as `retrying`,
 * instead of being dropped.
 * Invariants: n_in_flight equals the number of ops whose callback has not run; an op is
 * freed only by its callback.
 */
#include <stdio.h>
#include <strings.h>
#include <stdlib.h>
#include <string.h>

#include "../engine_private.h"
#include "sinks/redis_stream.h"
#include "sinks/sink_opts.h"

enum { MODE_STREAM = 0, MODE_PUBSUB = 1 };

#define DEFAULT_MAX_IN_FLIGHT 1024

typedef struct redis_ctx {
    int mode;
    mc__redis_opts_t copts;
    mc__subject_template_t *tmpl;
    uint64_t maxlen;
    int64_t max_in_flight;
    mc__redis_t *client;
    int64_t n_in_flight;
} redis_ctx_t;

typedef struct redis_op {
    mc_sink_t *sink;
    redis_ctx_t *ctx;
    mc_event_t *ev;   /* pubsub: our reference */
    mc__xadd_op_t x;  /* stream: holds its own reference */
} redis_op_t;

/* ---- Options --------------------------------------------------------------------------------- */

static const char *const modes[] = {"stream", "pubsub", NULL};
static const char *const known_opts[] = {
    "url", "mode", "key", "channel", "maxlen", "connect_timeout_ms", "command_timeout_ms",
    "max_in_flight", NULL,
};

/* Parses into ctx; templates are compiled only when `compile` (validate checks them too). */
static int parse(redis_ctx_t *c, const bson_t *options, mc_error_t *err)
{
    memset(c, 0, sizeof *c);
    c->max_in_flight = DEFAULT_MAX_IN_FLIGHT;
    const char *url = NULL, *key = NULL, *channel = NULL;
    bson_iter_t it;
    int rc = 0;
    int64_t v = 0;
    if (options && bson_iter_init(&it, options)) {
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (!strcmp(k, "url")) {
                rc = mc__opt_string(&it, &url, err);
            } else if (!strcmp(k, "mode")) {
                rc = mc__opt_enum(&it, modes, &c->mode, err);
            } else if (!strcmp(k, "key")) {
                rc = mc__opt_string(&it, &key, err);
            } else if (!strcmp(k, "channel")) {
                rc = mc__opt_string(&it, &channel, err);
            } else if (!strcmp(k, "maxlen")) {
                rc = mc__opt_int(&it, 0, INT64_MAX, &v, err);
                c->maxlen = (uint64_t)v;
            } else if (!strcmp(k, "connect_timeout_ms")) {
                rc = mc__opt_int(&it, 1, 600000, &v, err);
                c->copts.connect_timeout_ms = (uint32_t)v;
            } else if (!strcmp(k, "command_timeout_ms")) {
                rc = mc__opt_int(&it, 1, 3600000, &v, err);
                c->copts.command_timeout_ms = (uint32_t)v;
            } else if (!strcmp(k, "max_in_flight")) {
                rc = mc__opt_int(&it, 1, 65536, &c->max_in_flight, err);
            } else {
                rc = mc__opt_unknown(bson_iter_key(&it), "a redis sink", known_opts, err);
            }
        }
    }
    if (rc != 0) {
        return rc;
    }
    if (!url) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option url is required (redis://[user:password@]host:port/db)");
    }
    if (c->mode == MODE_PUBSUB && (key || c->maxlen)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "options key and maxlen are for mode: stream (pubsub uses channel)");
    }
    if (c->mode == MODE_STREAM && channel) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option channel is for mode: pubsub (stream uses key)");
    }
    rc = mc__redis_url_parse(url, strlen(url), &c->copts.url, err);
    if (rc != 0) {
        return rc;
    }
    const char *text = c->mode == MODE_PUBSUB ? channel : key;
    mc_error_t terr;
    c->tmpl = mc__subject_template_new(text ? text : MC__SUBJECT_DEFAULT_REDIS, MC__SUBJECT_REDIS,
                                       &terr);
    if (!c->tmpl) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "option %s: %s",
                            c->mode == MODE_PUBSUB ? "channel" : "key", terr.message);
    }
    /* A refused XADD sends two reads to check it: room for them on top of every XADD. */
    c->copts.max_pending = 3 * (size_t)c->max_in_flight + 16;
    return 0;
}

static void ctx_clear(redis_ctx_t *c)
{
    mc__subject_template_destroy(c->tmpl);
    c->tmpl = NULL;
    /* The password lives in the options struct: do not leave it in freed memory. */
    explicit_bzero(&c->copts.url, sizeof c->copts.url);
}

static int redis_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    redis_ctx_t c;
    int rc = parse(&c, options, err);
    ctx_clear(&c);
    return rc;
}

static int redis_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    return parse(mc_sink_ctx(sink), options, err);
}

static void redis_destroy(mc_sink_t *sink)
{
    ctx_clear(mc_sink_ctx(sink));
}

/* ---- Running (loop thread) --------------------------------------------------------------------- */

static void on_state(void *arg, mc__redis_state_t state, const char *why)
{
    mc_sink_t *sink = arg;
    if (state == MC__REDIS_READY) {
        mc_log(MC_LOG_INFO, "sink", "redis connected sink=%s", mc_sink_name(sink));
    } else if (why && state == MC__REDIS_DISCONNECTED) {
        mc_log(MC_LOG_WARN, "sink", "redis unreachable sink=%s: %s (retrying)", mc_sink_name(sink),
               why);
    }
}

static int redis_start(mc_sink_t *sink, mc_error_t *err)
{
    redis_ctx_t *c = mc_sink_ctx(sink);
    c->copts.on_state = on_state;
    c->copts.state_arg = sink;
    c->client = mc__redis_new(mc_sink_uv_loop(sink), &c->copts, err);
    return c->client ? 0 : MC_EINVAL;
}

static void op_free(redis_op_t *op)
{
    op->ctx->n_in_flight--;
    mc__xadd_op_cleanup(&op->x);
    mc_event_unref(&op->ev);
    free(op);
}

static void on_xadd(void *arg, const mc__xadd_result_t *res)
{
    redis_op_t *op = arg;
    mc_event_t *ev = op->x.ev;
    if (mc__xadd_written(res->outcome)) {
        mc_sink_ack(op->sink, ev);
    } else {
        mc_sink_fail(op->sink, ev,
                     res->cls == MC__REDIS_PERMANENT || res->outcome == MC__XADD_COLLISION ||
                             res->outcome == MC__XADD_GAP
                         ? MC_SINK_PERMANENT
                         : MC_SINK_TRANSIENT,
                     0, "redis XADD %s: %s", op->x.id_text, res->message ? res->message : "failed");
    }
    op_free(op);
}

static void on_publish(void *arg, const mc__redis_result_t *res)
{
    redis_op_t *op = arg;
    if (res->status != 0 && res->status != MC_ECLOSED) {
        /* At-most-once: the event was acked when it was handed over; not sent again. */
        mc_log(MC_LOG_WARN, "sink", "redis PUBLISH lost sink=%s id=%.40s: %s",
               mc_sink_name(op->sink), mc_event_id(op->ev) ? mc_event_id(op->ev) : "-",
               res->message ? res->message : "failed");
    }
    op_free(op);
}

static int not_connected(mc_sink_t *sink, redis_ctx_t *c, mc_event_t *ev)
{
    mc__redis_status_t st;
    mc__redis_status(c->client, &st);
    if (st.state != MC__REDIS_DISCONNECTED) {
        return 0;
    }
    return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "redis not connected: %s",
                        st.last_error[0] ? st.last_error : "connecting");
}

static int publish_pubsub(mc_sink_t *sink, redis_ctx_t *c, redis_op_t *op, mc_event_t *ev)
{
    mc__subject_values_t v;
    mc__subject_values_from_event(&v, ev);
    char chan[MC__SUBJECT_MAX + 1];
    size_t clen = 0, mlen = 0;
    mc_error_t err;
    if (mc__subject_template_render(c->tmpl, &v, chan, sizeof chan, &clen, &err) != 0) {
        return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "channel: %s", err.message);
    }
    const char *msg = mc_event_json(ev, &mlen);
    const char *argv[] = {"PUBLISH", chan, msg ? msg : ""};
    size_t lens[] = {7, clen, msg ? mlen : 0};
    op->ev = mc_event_ref(ev);
    int rc = mc__redis_command(c->client, 3, argv, lens, on_publish, op);
    if (rc != 0) {
        mc_event_unref(&op->ev);
    } else {
        mc_sink_ack(sink, ev);
    }
    return rc;
}

static int redis_publish(mc_sink_t *sink, mc_event_t *ev)
{
    redis_ctx_t *c = mc_sink_ctx(sink);
    mc_event_kind_t kind = mc_event_kind(ev);
    if (kind == MC_EVENT_READY || (c->mode == MODE_STREAM && !mc_event_resume_token(ev))) {
        return MC_SINK_SKIP; /* stream entries need a position: reset/error have none */
    }
    if (c->n_in_flight >= c->max_in_flight) {
        return MC_EAGAIN;
    }
    int rc = not_connected(sink, c, ev);
    if (rc != 0) {
        return rc;
    }
    redis_op_t *op = calloc(1, sizeof *op);
    if (!op) {
        return MC_EAGAIN;
    }
    op->sink = sink;
    op->ctx = c;
    if (c->mode == MODE_PUBSUB) {
        rc = publish_pubsub(sink, c, op, ev);
    } else {
        mc_error_t err;
        if (mc__xadd_prepare(&op->x, c->tmpl, ev, c->maxlen, &err) != 0) {
            free(op);
            return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s", err.message);
        }
        rc = mc__xadd_send(c->client, &op->x, on_xadd, op);
    }
    if (rc != 0) {
        if (rc == MC_EIO || rc == MC_EINVAL) {
            free(op); /* publish_pubsub reported it already */
            return rc;
        }
        mc__xadd_op_cleanup(&op->x);
        free(op);
        return rc == MC_ECLOSED ? mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "redis closed")
                                : MC_EAGAIN;
    }
    c->n_in_flight++;
    return 0;
}

static int redis_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)sink;
    (void)deadline_ms;
    return 0; /* commands are written as they come; the engine runs the loop for the replies */
}

static void redis_stop(mc_sink_t *sink)
{
    redis_ctx_t *c = mc_sink_ctx(sink);
    mc__redis_close(c->client, NULL, NULL);
    c->client = NULL;
}

/* ---- probe (mongocast check's thread, a loop of its own) ---------------------------------------- */

typedef struct probe_state {
    bool ready, replied, closed;
    int status;
    char why[256];
} probe_state_t;

static void probe_on_state(void *arg, mc__redis_state_t state, const char *why)
{
    probe_state_t *p = arg;
    if (state == MC__REDIS_READY) {
        p->ready = true;
    } else if (why) {
        snprintf(p->why, sizeof p->why, "%s", why);
    }
}

static void probe_on_ping(void *arg, const mc__redis_result_t *res)
{
    probe_state_t *p = arg;
    p->replied = true;
    p->status = res->status;
    if (res->status != 0) {
        snprintf(p->why, sizeof p->why, "PING: %s", res->message ? res->message : "failed");
    }
}

static void probe_on_closed(void *arg)
{
    ((probe_state_t *)arg)->closed = true;
}

static int redis_probe(mc_sink_t *sink, const bson_t *options, int64_t timeout_ms,
                       mc_error_t *err)
{
    (void)sink;
    redis_ctx_t c;
    int rc = parse(&c, options, err);
    if (rc != 0) {
        ctx_clear(&c);
        return rc;
    }
    uint32_t t = timeout_ms > 0 && timeout_ms < 600000 ? (uint32_t)timeout_ms : 5000;
    probe_state_t p = {0};
    c.copts.connect_timeout_ms = t;
    c.copts.command_timeout_ms = t;
    c.copts.backoff_initial_ms = t; /* one attempt within the timeout */
    c.copts.backoff_max_ms = t;
    c.copts.on_state = probe_on_state;
    c.copts.state_arg = &p;
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) {
        ctx_clear(&c);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "cannot make a loop");
    }
    mc__redis_t *r = mc__redis_new(&loop, &c.copts, err);
    rc = r ? 0 : MC_EINVAL;
    if (r) {
        const char *argv[] = {"PING"};
        size_t lens[] = {4};
        rc = mc__redis_command(r, 1, argv, lens, probe_on_ping, &p);
        int64_t deadline = mc__now_ms() + (int64_t)t;
        while (rc == 0 && !p.replied && mc__now_ms() < deadline) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        char where[MC__REDIS_HOST_MAX + 64];
        mc__redis_url_redact(&c.copts.url, where, sizeof where);
        if (rc != 0 || !p.replied || p.status != 0) {
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "%s: %s", where,
                              p.why[0] ? p.why : "no reply within the timeout");
        }
        mc__redis_close(r, probe_on_closed, &p);
        while (!p.closed) {
            uv_run(&loop, UV_RUN_ONCE);
        }
    }
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_loop_close(&loop);
    ctx_clear(&c);
    return rc;
}

const mc_sink_type_t mc__sink_redis_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "redis",
    .flags = MC_SINK_ASYNC | MC_SINK_DURABLE, /* pubsub acks at once: see the top */
    .ctx_size = sizeof(redis_ctx_t),
    .init = redis_init,
    .start = redis_start,
    .publish = redis_publish,
    .drain = redis_drain,
    .destroy = redis_destroy,
    .validate = redis_validate,
    .stop = redis_stop,
    .probe = redis_probe,
};
