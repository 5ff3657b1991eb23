/*
 * sink_stdout.c: the "stdout" sink: one JSON line per event (`mongocast tail`, debugging,
 * piping into other tools).
 *
 * Runs on its runner's own thread (a writer thread: neither MC_SINK_ASYNC nor live), so a
 * pipe that stops reading blocks only this thread; init and destroy run on the engine's
 * start/destroy thread. Lines are collected in the sink's own 64 KiB buffer and written in
 * one go per batch (flush callback) or whenever the buffer fills, so a burst costs one or two
 * write(2)s per 64 KiB. A line longer than the buffer is written on its own, after what is
 * buffered. Each event's text is the event's cached rendering, shared with every other
 * consumer of the event.
 *
 * Pipes and sockets are written in PIPE_BUF chunks, each after poll() said the descriptor
 * takes more, so the thread notices the engine stopping (mc_sink_deadline_ms()) instead of
 * sitting in write(2) forever; files and terminals are written directly. Anything another
 * part of the process printed through stdio is flushed first, so lines never interleave.
 * A failed write fails every event whose line was in the buffer (mc_sink_fail()): EPIPE and
 * EBADF permanently (nobody will ever read them: the sink fails, or dead-letters them), other
 * errors transiently (the runner retries them in order). Events complete once the flush that
 * wrote their lines succeeded. A message longer than server.max_message_bytes is printed as
 * its `oversize` notice (mc_event_oversize_json), as the live transports send it.
 * Invariants: 0 <= used <= STDOUT_BUF_SIZE; `held` references exactly the events whose lines
 * are in the buffer; nothing buffered survives flush or drain.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../engine_private.h"

#define STDOUT_BUF_SIZE (64 * 1024)
#define MAX_HELD 2048       /* events per buffer; a full set is written out early */
#define POLL_SLICE_MS 100

typedef struct stdout_ctx {
    size_t max_line;   /* server.max_message_bytes: longer messages print their notice */
    bool raw;          /* canonical Extended JSON of the change instead of the §4.3 message */
    bool ready;        /* also print ready messages */
    bool probed;       /* fd type known */
    bool pollable;     /* a pipe or socket: write in chunks after poll() */
    FILE *out;
    size_t used;
    size_t n_held;
    mc_event_t *held[MAX_HELD];
    char buf[STDOUT_BUF_SIZE]; /* part of the engine-allocated ctx (ctx_size) */
} stdout_ctx_t;

static void probe(stdout_ctx_t *ctx)
{
    if (ctx->probed) {
        return;
    }
    ctx->probed = true;
    struct stat st;
    ctx->pollable = fstat(fileno(ctx->out), &st) == 0 && (S_ISFIFO(st.st_mode) ||
                                                           S_ISSOCK(st.st_mode));
}

/* Writes all of p[0..n) to the descriptor. 0, or an errno value (ETIMEDOUT: the engine is
 * stopping and its deadline passed while the reader did not take more, or `wait` is false and
 * the reader takes nothing right now). */
static int write_fd(mc_sink_t *sink, stdout_ctx_t *ctx, const char *p, size_t n, bool wait)
{
    int fd = fileno(ctx->out);
    while (n > 0) {
        size_t chunk = n;
        if (ctx->pollable) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int pr = poll(&pfd, 1, wait ? POLL_SLICE_MS : 0);
            if (pr < 0 && errno == EINTR) {
                continue;
            }
            if (pr == 0) {
                int64_t deadline = mc_sink_deadline_ms(sink);
                if (!wait || (deadline && mc_engine_now_ms() >= deadline)) {
                    return ETIMEDOUT;
                }
                continue;
            }
            /* With POLLOUT a pipe has a free page: a write of at most PIPE_BUF bytes goes
             * through without blocking. */
            chunk = n < PIPE_BUF ? n : PIPE_BUF;
        }
        ssize_t w = write(fd, p, chunk);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w < 0) {
            return errno;
        }
        if (w == 0) {
            return EIO;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static mc_sink_error_class_t error_class(int e)
{
    return e == EPIPE || e == EBADF ? MC_SINK_PERMANENT : MC_SINK_TRANSIENT;
}

static void release_held(stdout_ctx_t *ctx)
{
    for (size_t i = 0; i < ctx->n_held; i++) {
        mc_event_unref(&ctx->held[i]);
    }
    ctx->n_held = 0;
}

/* Writes the buffered lines out (after whatever stdio holds) and releases the events; on a
 * failure each of them is reported to the runner. Returns 0 or MC_EIO. */
static int write_out(mc_sink_t *sink, stdout_ctx_t *ctx)
{
    int e = 0;
    if (fflush(ctx->out) != 0) {
        e = errno ? errno : EIO;
        clearerr(ctx->out);
    }
    if (e == 0 && ctx->used) {
        probe(ctx);
        e = write_fd(sink, ctx, ctx->buf, ctx->used, true);
    }
    ctx->used = 0;
    if (e) {
        for (size_t i = 0; i < ctx->n_held; i++) {
            mc_sink_fail(sink, ctx->held[i], error_class(e), 0, "stdout: %s", strerror(e));
        }
    }
    release_held(ctx);
    return e ? MC_EIO : 0;
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

/* Appends the line of `ev` to the buffer, holding the event until the line is written (or,
 * when longer than the buffer, writes it on its own right away). 0, or what mc_sink_fail()
 * returns for `ev`. */
static int put_line(mc_sink_t *sink, stdout_ctx_t *ctx, mc_event_t *ev, const char *text,
                    size_t len)
{
    if (len + 1 > STDOUT_BUF_SIZE - ctx->used || ctx->n_held == MAX_HELD) {
        write_out(sink, ctx); /* failures are reported for the events they concern */
    }
    if (len + 1 > STDOUT_BUF_SIZE) {
        /* Larger than the whole buffer: on its own, right away. */
        probe(ctx);
        int e = write_fd(sink, ctx, text, len, true);
        if (e == 0) {
            e = write_fd(sink, ctx, "\n", 1, true);
        }
        return e ? mc_sink_fail(sink, ev, error_class(e), 0, "stdout: %s", strerror(e)) : 0;
    }
    memcpy(ctx->buf + ctx->used, text, len);
    ctx->buf[ctx->used + len] = '\n';
    ctx->used += len + 1;
    ctx->held[ctx->n_held++] = mc_event_ref(ev);
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
        return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "out of memory rendering the line");
    }
    if (len <= ctx->max_line || kind != MC_EVENT_CHANGE) {
        return put_line(sink, ctx, ev, text, len);
    }
    /* The notice is copied into the buffer (or written at once): freed right after. */
    char *notice = mc_event_oversize_json(ev, len, ctx->max_line, &len);
    if (!notice) {
        return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "out of memory rendering the line");
    }
    int rc = put_line(sink, ctx, ev, notice, len);
    bson_free(notice);
    return rc;
}

static void stdout_flush(mc_sink_t *sink)
{
    write_out(sink, mc_sink_ctx(sink));
}

static int stdout_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)deadline_ms; /* write_fd() reads the deadline itself */
    return write_out(sink, mc_sink_ctx(sink));
}

/* Lines still buffered when the engine is destroyed without a drain are written if the
 * descriptor takes them now (never waiting on a pipe nobody reads). */
static void stdout_destroy(mc_sink_t *sink)
{
    stdout_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->out && ctx->used) {
        probe(ctx);
        write_fd(sink, ctx, ctx->buf, ctx->used, false);
        ctx->used = 0;
    }
    release_held(ctx);
}

const mc_sink_type_t mc__sink_stdout_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "stdout",
    .flags = MC_SINK_BLOCKING,
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
