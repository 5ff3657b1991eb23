/*
 * sink_stdout.c: the "stdout" sink: one JSON line per event (`mongocast tail`, debugging,
 * piping into other tools).
 *
 * Dispatch thread only. Output goes through stdio's buffer and is flushed once per batch
 * (flush callback), not per line, so a burst costs one write(2) per batch. Each event's
 * text is the event's cached rendering, shared with every other consumer of the event. A
 * write error (closed pipe, full disk) is reported to the engine as MC_EIO and logged
 * there; the sink is not durable, so nothing waits on it.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "../engine_private.h"

typedef struct stdout_ctx {
    bool raw;   /* canonical Extended JSON of the change instead of the §4.3 message */
    bool ready; /* also print ready messages */
    FILE *out;
} stdout_ctx_t;

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
            /* reset and ready carry no change document: only ready has a raw form. */
            if (kind != MC_EVENT_READY) {
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
    if (fwrite(text, 1, len, ctx->out) != len || fputc('\n', ctx->out) == EOF) {
        return MC_EIO;
    }
    return 0;
}

static void stdout_flush(mc_sink_t *sink)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    fflush(ctx->out);
}

static int stdout_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)deadline_ms;
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    return fflush(ctx->out) == 0 ? 0 : MC_EIO;
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
};

const mc_sink_type_t *mc_sink_stdout_type(void)
{
    return &mc__sink_stdout_type;
}
