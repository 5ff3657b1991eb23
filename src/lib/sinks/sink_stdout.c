/*
 * sink_stdout.c: the "stdout" sink: one JSON line per event (`mongocast tail`, debugging,
 * piping into other tools).
 *
 * Dispatch thread only (init and destroy on the engine's start/destroy thread). Lines are
 * collected in the sink's own 64 KiB buffer and handed to stdio in one fwrite + fflush per
 * batch (flush callback) or whenever the buffer fills, so a burst costs one or two write(2)s
 * per 64 KiB instead of one per stdio buffer (4 KiB for /dev/null and pipes). A line longer
 * than the buffer goes to stdio directly, after what is buffered. Each event's text is the
 * event's cached rendering, shared with every other consumer of the event. A write error
 * (closed pipe, full disk) is reported to the engine as MC_EIO by the publish or drain that
 * meets it (or by the next publish when a flush met it) and logged there; the sink is not
 * durable, so nothing waits on it. A message longer than server.max_message_bytes is printed
 * as its `oversize` notice (mc_event_oversize_json), as the live transports send it.
 * Invariant: 0 <= used <= STDOUT_BUF_SIZE; nothing buffered survives flush or drain.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "../engine_private.h"

#define STDOUT_BUF_SIZE (64 * 1024)

typedef struct stdout_ctx {
    size_t max_line;   /* server.max_message_bytes: longer messages print their notice */
    bool raw;          /* canonical Extended JSON of the change instead of the §4.3 message */
    bool ready;        /* also print ready messages */
    bool write_failed; /* a flush failed: the next publish reports it */
    FILE *out;
    size_t used;
    char buf[STDOUT_BUF_SIZE]; /* part of the engine-allocated ctx (ctx_size) */
} stdout_ctx_t;

/* Hands the buffered lines to stdio and pushes them out. Returns 0 or MC_EIO. */
static int write_out(stdout_ctx_t *ctx)
{
    int rc = 0;
    if (ctx->used && fwrite(ctx->buf, 1, ctx->used, ctx->out) != ctx->used) {
        rc = MC_EIO;
    }
    ctx->used = 0;
    if (fflush(ctx->out) != 0) {
        rc = MC_EIO;
    }
    if (rc) {
        clearerr(ctx->out); /* report each failure once; a later write may succeed */
    }
    return rc;
}

static int opt_bool(const bson_t *options, const char *key, bool *out, mc_error_t *err)
{
    bson_iter_t it;
    if (!options || !bson_iter_init_find(&it, options, key)) {
        return 0;
    }
    if (!BSON_ITER_HOLDS_BOOL(&it)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be true or false", key);
    }
    *out = bson_iter_bool(&it);
    return 0;
}

static int stdout_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->out = stdout;
    mc_engine_t *engine = mc_sink_engine(sink);
    const mc_config_t *cfg = engine ? mc_engine_config(engine) : NULL;
    ctx->max_line = cfg && cfg->server.max_message_bytes ? cfg->server.max_message_bytes : 16777216;
    bson_iter_t it;
    if (options && bson_iter_init(&it, options)) {
        while (bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (strcmp(k, "raw") != 0 && strcmp(k, "ready") != 0) {
                return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                    "unknown option '%s' for sink type stdout (known: raw, "
                                    "ready)",
                                    k);
            }
        }
    }
    if (opt_bool(options, "raw", &ctx->raw, err) != 0 ||
        opt_bool(options, "ready", &ctx->ready, err) != 0) {
        return MC_ECONFIG;
    }
    return 0;
}

/* Appends one line to the buffer (or, when longer than it, hands it to stdio). */
static int put_line(stdout_ctx_t *ctx, const char *text, size_t len)
{
    int rc = 0;
    if (ctx->write_failed) {
        ctx->write_failed = false;
        rc = MC_EIO;
    }
    if (len + 1 > STDOUT_BUF_SIZE - ctx->used) {
        if (write_out(ctx) != 0) {
            rc = MC_EIO;
        }
        if (len + 1 > STDOUT_BUF_SIZE) {
            /* Larger than the whole buffer: straight to stdio (pushed out by the flush). */
            if (fwrite(text, 1, len, ctx->out) != len || fputc('\n', ctx->out) == EOF) {
                clearerr(ctx->out);
                rc = MC_EIO;
            }
            return rc;
        }
    }
    memcpy(ctx->buf + ctx->used, text, len);
    ctx->buf[ctx->used + len] = '\n';
    ctx->used += len + 1;
    return rc;
}

static int stdout_publish(mc_sink_t *sink, mc_event_t *ev)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    mc_event_kind_t kind = mc_event_kind(ev);
    const char *text;
    size_t len = 0;
    if (kind == MC_EVENT_READY && !ctx->ready) {
        return MC_SINK_SKIP;
    }
    if (ctx->raw) {
        text = mc_event_raw_json(ev, &len);
        if (!text && mc_event_change(ev) == NULL) {
            /* Control events carry no change document. Ready and error are printed as their
             * message (a reader of raw changes must still learn that the stream died); reset
             * has no raw form. */
            if (kind != MC_EVENT_READY && kind != MC_EVENT_ERROR) {
                return MC_SINK_SKIP;
            }
            text = mc_event_json(ev, &len);
        }
    } else {
        text = mc_event_json(ev, &len);
    }
    if (!text) {
        return MC_ENOMEM;
    }
    if (len <= ctx->max_line || kind != MC_EVENT_CHANGE) {
        return put_line(ctx, text, len);
    }
    char *notice = mc_event_oversize_json(ev, len, ctx->max_line, &len);
    if (!notice) {
        return MC_ENOMEM;
    }
    int rc = put_line(ctx, notice, len);
    bson_free(notice);
    return rc;
}

static void stdout_flush(mc_sink_t *sink)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    if (write_out(ctx) != 0) {
        ctx->write_failed = true;
    }
}

static int stdout_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)deadline_ms;
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    int rc = write_out(ctx);
    if (ctx->write_failed) {
        ctx->write_failed = false;
        rc = MC_EIO;
    }
    return rc;
}

/* Lines still buffered when the engine is destroyed without a drain are written, not lost. */
static void stdout_destroy(mc_sink_t *sink)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->out && ctx->used) {
        write_out(ctx);
    }
}

const mc_sink_type_t mc__sink_stdout_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "stdout",
    .flags = 0,
    .ctx_size = sizeof(stdout_ctx_t),
    .init = stdout_init,
    .publish = stdout_publish,
    .flush = stdout_flush,
    .drain = stdout_drain,
    .destroy = stdout_destroy,
};

const mc_sink_type_t *mc_sink_stdout_type(void)
{
    return &mc__sink_stdout_type;
}
