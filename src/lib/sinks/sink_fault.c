/*
 * sink_fault.c: the "fault" and "fault_async" sink types: durable sinks that misbehave on
 * request (block, fail N times or for a while, fail some events permanently, ack late or out
 * of order), for the tests of runners, checkpoints and the daemon. Options: mongocast/sink.h.
 *
 * Built on the public sink API only (mongocast/sink.h, event.h), as a third-party sink would
 * be; registered on request (mc_engine_register_sink_type; the daemon does it when
 * MONGOCAST_TEST_SINKS=1).
 *
 * Threads: "fault" runs on its runner's own thread; with ack: late a small acker thread of
 * its own (started in start(), joined in stop()/destroy()) acks what is due. "fault_async"
 * runs on the engine's I/O loop and acks from a loop timer, never blocking the loop ("block"
 * then means: accepted events are not acked until block_ms has passed). The counters are
 * atomics read by tests on any thread; `pending` is guarded by `lock`.
 * Invariant: an event's line is in `file` before its ack (write(2) returns first), so after a
 * kill -9 every acked event is in the file.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "mongocast/engine.h"
#include "mongocast/sink.h"

typedef enum ack_mode {
    ACK_SYNC = 0,
    ACK_LATE,
    ACK_REVERSE,
} ack_mode_t;

typedef struct held {
    mc_event_t *ev;
    int64_t due_ms;
} held_t;

typedef struct fault_ctx {
    bool async;
    char *file;
    int fd;
    bool control;
    ack_mode_t ack;
    int64_t ack_delay_ms;
    int64_t delay_ms;
    int64_t block_after;
    int64_t block_ms;
    int64_t fail_first;
    int64_t fail_for_ms;
    char *permanent_field;

    _Atomic uint64_t attempts;
    _Atomic uint64_t accepted;
    int64_t first_attempt_ms;
    bool blocked;
    int64_t hold_until_ms; /* fault_async: no acks before this (INT64_MAX: until stop) */

    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool lock_ready;
    held_t *pending;
    size_t n_pending, cap_pending;
    pthread_t acker;
    bool acker_running;
    bool quit;
    uv_timer_t timer;
    bool timer_ready;
} fault_ctx_t;

/* ---- Options --------------------------------------------------------------------------------- */

static int opt_int(const bson_iter_t *it, int64_t min, int64_t *out, mc_error_t *err)
{
    if (!BSON_ITER_HOLDS_NUMBER(it) || bson_iter_as_int64(it) < min) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be an integer >= %lld", bson_iter_key(it),
                            (long long)min);
    }
    *out = bson_iter_as_int64(it);
    return 0;
}

static int opt_string(const bson_iter_t *it, char **out, mc_error_t *err)
{
    if (!BSON_ITER_HOLDS_UTF8(it) || bson_iter_utf8(it, NULL)[0] == '\0') {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be a non-empty string", bson_iter_key(it));
    }
    if (out) {
        free(*out);
        *out = strdup(bson_iter_utf8(it, NULL));
    }
    return 0;
}

/* Parses every option into ctx (NULL: only check). */
static int parse_options(fault_ctx_t *ctx, const bson_t *options, mc_error_t *err)
{
    fault_ctx_t scratch;
    memset(&scratch, 0, sizeof(scratch));
    fault_ctx_t *c = ctx ? ctx : &scratch;
    c->ack_delay_ms = 50;
    c->block_after = -1;
    c->block_ms = -1;
    bson_iter_t it;
    int rc = 0;
    if (options && bson_iter_init(&it, options)) {
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (!strcmp(k, "file")) {
                rc = opt_string(&it, ctx ? &c->file : NULL, err);
            } else if (!strcmp(k, "permanent_field")) {
                rc = opt_string(&it, ctx ? &c->permanent_field : NULL, err);
            } else if (!strcmp(k, "control")) {
                if (!BSON_ITER_HOLDS_BOOL(&it)) {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option control must be true or false");
                } else {
                    c->control = bson_iter_bool(&it);
                }
            } else if (!strcmp(k, "ack")) {
                const char *v = BSON_ITER_HOLDS_UTF8(&it) ? bson_iter_utf8(&it, NULL) : "";
                if (!strcmp(v, "sync")) {
                    c->ack = ACK_SYNC;
                } else if (!strcmp(v, "late")) {
                    c->ack = ACK_LATE;
                } else if (!strcmp(v, "reverse")) {
                    c->ack = ACK_REVERSE;
                } else {
                    rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                      "option ack must be sync, late or reverse");
                }
            } else if (!strcmp(k, "ack_delay_ms")) {
                rc = opt_int(&it, 0, &c->ack_delay_ms, err);
            } else if (!strcmp(k, "delay_ms")) {
                rc = opt_int(&it, 0, &c->delay_ms, err);
            } else if (!strcmp(k, "block_after")) {
                rc = opt_int(&it, -1, &c->block_after, err);
            } else if (!strcmp(k, "block_ms")) {
                rc = opt_int(&it, -1, &c->block_ms, err);
            } else if (!strcmp(k, "fail_first")) {
                rc = opt_int(&it, 0, &c->fail_first, err);
            } else if (!strcmp(k, "fail_for_ms")) {
                rc = opt_int(&it, 0, &c->fail_for_ms, err);
            } else {
                rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                  "unknown option '%s' for a fault sink (known: file, control, "
                                  "ack, ack_delay_ms, delay_ms, block_after, block_ms, "
                                  "fail_first, fail_for_ms, permanent_field)",
                                  k);
            }
        }
    }
    return rc;
}

static int fault_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    return parse_options(NULL, options, err);
}

static int fault_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->fd = -1;
    ctx->async = (mc_sink_get_type(sink)->flags & MC_SINK_ASYNC) != 0;
    int rc = parse_options(ctx, options, err);
    if (rc != 0) {
        return rc;
    }
    pthread_mutex_init(&ctx->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ctx->cond, &ca);
    pthread_condattr_destroy(&ca);
    ctx->lock_ready = true;
    return 0;
}

/* ---- Acks ------------------------------------------------------------------------------------ */

static int hold(fault_ctx_t *ctx, mc_event_t *ev, int64_t due)
{
    pthread_mutex_lock(&ctx->lock);
    if (ctx->n_pending == ctx->cap_pending) {
        size_t cap = ctx->cap_pending ? ctx->cap_pending * 2 : 64;
        held_t *p = realloc(ctx->pending, cap * sizeof(*p));
        if (!p) {
            pthread_mutex_unlock(&ctx->lock);
            return MC_ENOMEM;
        }
        ctx->pending = p;
        ctx->cap_pending = cap;
    }
    ctx->pending[ctx->n_pending].ev = mc_event_ref(ev);
    ctx->pending[ctx->n_pending].due_ms = due;
    ctx->n_pending++;
    pthread_cond_broadcast(&ctx->cond);
    pthread_mutex_unlock(&ctx->lock);
    return 0;
}

/* Acks (and releases) the held events due by `now`, oldest first; `reverse`: all of them,
 * newest first. Returns the due time of the next one (INT64_MAX: none). */
static int64_t ack_due(mc_sink_t *sink, fault_ctx_t *ctx, int64_t now, bool reverse)
{
    pthread_mutex_lock(&ctx->lock);
    if (ctx->hold_until_ms > now) {
        int64_t until = ctx->hold_until_ms;
        pthread_mutex_unlock(&ctx->lock);
        return until;
    }
    size_t n = 0;
    if (reverse) {
        n = ctx->n_pending;
    } else {
        while (n < ctx->n_pending && ctx->pending[n].due_ms <= now) {
            n++;
        }
    }
    held_t *take = n ? malloc(n * sizeof(*take)) : NULL;
    if (take) {
        memcpy(take, ctx->pending, n * sizeof(*take));
        memmove(ctx->pending, ctx->pending + n, (ctx->n_pending - n) * sizeof(*take));
        ctx->n_pending -= n;
    } else {
        n = 0;
    }
    int64_t next = ctx->n_pending ? ctx->pending[0].due_ms : INT64_MAX;
    pthread_mutex_unlock(&ctx->lock);
    for (size_t i = 0; i < n; i++) {
        size_t k = reverse ? n - 1 - i : i;
        mc_sink_ack(sink, take[k].ev);
        mc_event_unref(&take[k].ev);
    }
    free(take);
    return next;
}

static void *acker_main(void *arg)
{
    mc_sink_t *sink = arg;
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    for (;;) {
        int64_t next = ack_due(sink, ctx, mc_engine_now_ms(), false);
        pthread_mutex_lock(&ctx->lock);
        if (ctx->quit) {
            pthread_mutex_unlock(&ctx->lock);
            return NULL;
        }
        int64_t wait = next == INT64_MAX ? 1000 : next - mc_engine_now_ms();
        if (wait > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_sec += wait / 1000;
            ts.tv_nsec += (long)(wait % 1000) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&ctx->cond, &ctx->lock, &ts);
        }
        pthread_mutex_unlock(&ctx->lock);
    }
}

static void on_timer(uv_timer_t *t)
{
    mc_sink_t *sink = t->data;
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    int64_t now = mc_engine_now_ms();
    int64_t next = ack_due(sink, ctx, now, false);
    if (next != INT64_MAX) {
        uv_timer_start(&ctx->timer, on_timer, (uint64_t)(next > now ? next - now : 0), 0);
    }
}

static void arm_timer(mc_sink_t *sink, fault_ctx_t *ctx, int64_t due)
{
    if (!ctx->timer_ready) {
        return;
    }
    int64_t now = mc_engine_now_ms();
    if (ctx->hold_until_ms > due) {
        due = ctx->hold_until_ms;
    }
    uint64_t left = due == INT64_MAX ? 3600000 : (uint64_t)(due > now ? due - now : 0);
    if (!uv_is_active((uv_handle_t *)&ctx->timer) || uv_timer_get_due_in(&ctx->timer) > left) {
        ctx->timer.data = sink;
        uv_timer_start(&ctx->timer, on_timer, left, 0);
    }
}

/* ---- Lifecycle ------------------------------------------------------------------------------- */

static int fault_start(mc_sink_t *sink, mc_error_t *err)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->file) {
        ctx->fd = open(ctx->file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (ctx->fd < 0) {
            int e = errno;
            return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", ctx->file, strerror(e));
        }
    }
    if (ctx->async) {
        if (uv_timer_init(mc_sink_uv_loop(sink), &ctx->timer) != 0) {
            return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "no I/O loop");
        }
        ctx->timer.data = sink;
        ctx->timer_ready = true;
    } else if (ctx->ack == ACK_LATE) {
        if (pthread_create(&ctx->acker, NULL, acker_main, sink) != 0) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno, "cannot start acker");
        }
        ctx->acker_running = true;
    }
    return 0;
}

static void stop_acker(fault_ctx_t *ctx)
{
    if (!ctx->acker_running) {
        return;
    }
    pthread_mutex_lock(&ctx->lock);
    ctx->quit = true;
    pthread_cond_broadcast(&ctx->cond);
    pthread_mutex_unlock(&ctx->lock);
    pthread_join(ctx->acker, NULL);
    ctx->acker_running = false;
}

static void fault_stop(mc_sink_t *sink)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    stop_acker(ctx);
    if (ctx->timer_ready) {
        uv_close((uv_handle_t *)&ctx->timer, NULL);
        ctx->timer_ready = false;
    }
}

static void fault_destroy(mc_sink_t *sink)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    stop_acker(ctx);
    if (ctx->fd >= 0) {
        close(ctx->fd);
    }
    for (size_t i = 0; i < ctx->n_pending; i++) {
        mc_event_unref(&ctx->pending[i].ev);
    }
    free(ctx->pending);
    free(ctx->file);
    free(ctx->permanent_field);
    if (ctx->lock_ready) {
        pthread_cond_destroy(&ctx->cond);
        pthread_mutex_destroy(&ctx->lock);
    }
}

/* ---- Delivery -------------------------------------------------------------------------------- */

static bool poisoned(const fault_ctx_t *ctx, mc_event_t *ev)
{
    const bson_t *change = mc_event_change(ev);
    bson_iter_t it, v;
    return ctx->permanent_field && change && bson_iter_init(&it, change) &&
           bson_iter_find_descendant(&it, ctx->permanent_field, &v) && BSON_ITER_HOLDS_BOOL(&v) &&
           bson_iter_bool(&v);
}

static int write_line(fault_ctx_t *ctx, mc_event_t *ev)
{
    if (ctx->fd < 0) {
        return 0;
    }
    size_t len = 0;
    const char *json = mc_event_json(ev, &len);
    if (!json) {
        return MC_ENOMEM;
    }
    char *line = malloc(len + 1);
    if (!line) {
        return MC_ENOMEM;
    }
    memcpy(line, json, len);
    line[len] = '\n';
    /* One write(2) per line: O_APPEND keeps lines whole even if two sinks share a file. */
    ssize_t w = write(ctx->fd, line, len + 1);
    free(line);
    return w == (ssize_t)(len + 1) ? 0 : MC_EIO;
}

static int fault_publish(mc_sink_t *sink, mc_event_t *ev)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    bool change = mc_event_kind(ev) == MC_EVENT_CHANGE;
    if (!change && !ctx->control) {
        return MC_SINK_SKIP;
    }
    if (change) {
        uint64_t n = atomic_fetch_add(&ctx->attempts, 1) + 1;
        int64_t now = mc_engine_now_ms();
        if (ctx->first_attempt_ms == 0) {
            ctx->first_attempt_ms = now;
        }
        if (ctx->fail_first && n <= (uint64_t)ctx->fail_first) {
            return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "fail_first: attempt %llu",
                                (unsigned long long)n);
        }
        if (ctx->fail_for_ms && now - ctx->first_attempt_ms < ctx->fail_for_ms) {
            return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "fail_for_ms: failing for %lld ms",
                                (long long)ctx->fail_for_ms);
        }
        if (poisoned(ctx, ev)) {
            return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s is true", ctx->permanent_field);
        }
        if (ctx->delay_ms && !ctx->async) {
            mc_sink_sleep(sink, ctx->delay_ms);
        }
        if (!ctx->blocked && ctx->block_after >= 0 &&
            atomic_load(&ctx->accepted) == (uint64_t)ctx->block_after) {
            ctx->blocked = true;
            if (ctx->async) {
                pthread_mutex_lock(&ctx->lock);
                ctx->hold_until_ms = ctx->block_ms < 0 ? INT64_MAX : now + ctx->block_ms;
                pthread_mutex_unlock(&ctx->lock);
            } else if (ctx->block_ms < 0) {
                while (!mc_sink_sleep(sink, 1000)) {
                }
            } else {
                mc_sink_sleep(sink, ctx->block_ms);
            }
        }
    }
    int rc = write_line(ctx, ev);
    if (rc != 0) {
        return mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "cannot write %s", ctx->file);
    }
    if (change) {
        atomic_fetch_add(&ctx->accepted, 1);
    }
    int64_t now = mc_engine_now_ms();
    switch (ctx->ack) {
    case ACK_SYNC:
        if (ctx->async && ctx->hold_until_ms > now) {
            if (hold(ctx, ev, now) == 0) {
                arm_timer(sink, ctx, now);
            }
        } else {
            mc_sink_ack(sink, ev);
        }
        break;
    case ACK_LATE:
        if (hold(ctx, ev, now + ctx->ack_delay_ms) == 0) {
            arm_timer(sink, ctx, now + ctx->ack_delay_ms);
        }
        break;
    case ACK_REVERSE: hold(ctx, ev, now); break;
    }
    return 0;
}

static void fault_flush(mc_sink_t *sink)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->ack == ACK_REVERSE) {
        ack_due(sink, ctx, mc_engine_now_ms(), true);
    }
}

static int fault_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    fault_ctx_t *ctx = mc_sink_ctx(sink);
    if (ctx->async) {
        return 0; /* the loop's timer acks what is due; the engine waits for it */
    }
    pthread_mutex_lock(&ctx->lock);
    while (ctx->n_pending > 0 && ctx->acker_running && mc_engine_now_ms() < deadline_ms) {
        pthread_mutex_unlock(&ctx->lock);
        if (mc_sink_sleep(sink, 5) && mc_engine_now_ms() >= deadline_ms) {
            pthread_mutex_lock(&ctx->lock);
            break;
        }
        pthread_mutex_lock(&ctx->lock);
    }
    int rc = ctx->n_pending ? MC_EAGAIN : 0;
    pthread_mutex_unlock(&ctx->lock);
    return rc;
}

/* The two types differ only in name and executor. */
#define FAULT_TYPE(type_name, type_flags)                                                          \
    {                                                                                              \
        .abi_version = MC_SINK_ABI_VERSION, .name = (type_name), .flags = (type_flags),            \
        .ctx_size = sizeof(fault_ctx_t), .init = fault_init, .start = fault_start,                 \
        .publish = fault_publish, .flush = fault_flush, .drain = fault_drain,                      \
        .destroy = fault_destroy, .validate = fault_validate, .stop = fault_stop,                  \
    }

static const mc_sink_type_t fault_type = FAULT_TYPE("fault", MC_SINK_DURABLE | MC_SINK_BLOCKING);
static const mc_sink_type_t fault_async_type =
    FAULT_TYPE("fault_async", MC_SINK_DURABLE | MC_SINK_ASYNC);

const mc_sink_type_t *mc_sink_fault_type(void)
{
    return &fault_type;
}

const mc_sink_type_t *mc_sink_fault_async_type(void)
{
    return &fault_async_type;
}

static fault_ctx_t *fault_ctx(mc_sink_t *sink)
{
    const mc_sink_type_t *t = sink ? mc_sink_get_type(sink) : NULL;
    return t == &fault_type || t == &fault_async_type ? mc_sink_ctx(sink) : NULL;
}

uint64_t mc_sink_fault_attempts(mc_sink_t *sink)
{
    fault_ctx_t *ctx = fault_ctx(sink);
    return ctx ? atomic_load(&ctx->attempts) : 0;
}

uint64_t mc_sink_fault_accepted(mc_sink_t *sink)
{
    fault_ctx_t *ctx = fault_ctx(sink);
    return ctx ? atomic_load(&ctx->accepted) : 0;
}
