/*
 * sink_memory.c: the "memory" sink: keeps references to the events it receives, for tests,
 * benchmarks and embedders that poll instead of being called.
 *
 * publish runs on the dispatch thread; the mc_sink_memory_* readers run on any thread. One
 * mutex guards the array; a condition variable wakes mc_sink_memory_wait(). Acks are issued
 * outside that mutex (they take the checkpoint's lock), so the lock order is always
 * memory -> nothing, and a reader can never deadlock against the dispatch thread. The array
 * is bounded by max_events: when full, publish answers MC_EAGAIN, which the engine turns into
 * back-pressure, never into a lost event.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../engine_private.h"

typedef struct memory_ctx {
    pthread_mutex_t lock;
    pthread_cond_t cond;  /* broadcast on every append */
    bool lock_ready;      /* lock and cond were initialised (destroy after a failed init) */
    mc_event_t **events;  /* [n], references */
    bool *acked;          /* [n] */
    size_t n, cap;
    size_t max_events;
    bool auto_ack;
    bool control;
} memory_ctx_t;

static int memory_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    memory_ctx_t *ctx = mc_sink_ctx(sink);
    ctx->max_events = 100000;
    ctx->auto_ack = true;
    ctx->control = true;
    bson_iter_t it;
    if (options && bson_iter_init(&it, options)) {
        while (bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (strcmp(k, "auto_ack") == 0 && BSON_ITER_HOLDS_BOOL(&it)) {
                ctx->auto_ack = bson_iter_bool(&it);
            } else if (strcmp(k, "control") == 0 && BSON_ITER_HOLDS_BOOL(&it)) {
                ctx->control = bson_iter_bool(&it);
            } else if (strcmp(k, "max_events") == 0 && BSON_ITER_HOLDS_NUMBER(&it) &&
                       bson_iter_as_int64(&it) > 0 && bson_iter_as_int64(&it) <= 100000000) {
                ctx->max_events = (size_t)bson_iter_as_int64(&it);
            } else {
                return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                    "bad option '%s' for sink type memory (known: auto_ack "
                                    "bool, control bool, max_events 1..100000000)",
                                    k);
            }
        }
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

static int memory_publish(mc_sink_t *sink, mc_event_t *ev)
{
    memory_ctx_t *ctx = mc_sink_ctx(sink);
    if (!ctx->control && mc_event_kind(ev) != MC_EVENT_CHANGE) {
        return MC_SINK_SKIP;
    }
    pthread_mutex_lock(&ctx->lock);
    if (ctx->n >= ctx->max_events) {
        pthread_mutex_unlock(&ctx->lock);
        return MC_EAGAIN;
    }
    if (ctx->n == ctx->cap) {
        size_t cap = ctx->cap ? ctx->cap * 2 : 64;
        mc_event_t **evs = realloc(ctx->events, cap * sizeof(*evs));
        if (!evs) {
            pthread_mutex_unlock(&ctx->lock);
            return MC_ENOMEM;
        }
        ctx->events = evs;
        bool *acked = realloc(ctx->acked, cap * sizeof(*acked));
        if (!acked) {
            pthread_mutex_unlock(&ctx->lock);
            return MC_ENOMEM;
        }
        ctx->acked = acked;
        ctx->cap = cap;
    }
    ctx->events[ctx->n] = mc_event_ref(ev);
    ctx->acked[ctx->n] = ctx->auto_ack;
    ctx->n++;
    pthread_cond_broadcast(&ctx->cond);
    pthread_mutex_unlock(&ctx->lock);
    if (ctx->auto_ack) {
        mc_sink_ack(sink, ev);
    }
    return 0;
}

static void memory_destroy(mc_sink_t *sink)
{
    memory_ctx_t *ctx = mc_sink_ctx(sink);
    for (size_t i = 0; i < ctx->n; i++) {
        mc_event_unref(&ctx->events[i]);
    }
    free(ctx->events);
    free(ctx->acked);
    if (ctx->lock_ready) {
        pthread_cond_destroy(&ctx->cond);
        pthread_mutex_destroy(&ctx->lock);
    }
}

const mc_sink_type_t mc__sink_memory_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "memory",
    .flags = MC_SINK_DURABLE,
    .ctx_size = sizeof(memory_ctx_t),
    .init = memory_init,
    .publish = memory_publish,
    .destroy = memory_destroy,
};

const mc_sink_type_t *mc_sink_memory_type(void)
{
    return &mc__sink_memory_type;
}

static memory_ctx_t *memory_ctx(mc_sink_t *sink)
{
    if (!sink || sink->type != &mc__sink_memory_type || !sink->ctx) {
        return NULL;
    }
    memory_ctx_t *ctx = sink->ctx;
    return ctx->lock_ready ? ctx : NULL;
}

size_t mc_sink_memory_count(mc_sink_t *sink)
{
    memory_ctx_t *ctx = memory_ctx(sink);
    if (!ctx) {
        return 0;
    }
    pthread_mutex_lock(&ctx->lock);
    size_t n = ctx->n;
    pthread_mutex_unlock(&ctx->lock);
    return n;
}

mc_event_t *mc_sink_memory_get(mc_sink_t *sink, size_t i)
{
    memory_ctx_t *ctx = memory_ctx(sink);
    if (!ctx) {
        return NULL;
    }
    pthread_mutex_lock(&ctx->lock);
    mc_event_t *ev = i < ctx->n ? mc_event_ref(ctx->events[i]) : NULL;
    pthread_mutex_unlock(&ctx->lock);
    return ev;
}

int mc_sink_memory_wait(mc_sink_t *sink, size_t n, int64_t timeout_ms)
{
    memory_ctx_t *ctx = memory_ctx(sink);
    if (!ctx) {
        return MC_EINVAL;
    }
    struct timespec deadline;
    mc__deadline_after_ms(&deadline, timeout_ms);
    pthread_mutex_lock(&ctx->lock);
    while (ctx->n < n) {
        if (pthread_cond_timedwait(&ctx->cond, &ctx->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int rc = ctx->n >= n ? 0 : MC_EAGAIN;
    pthread_mutex_unlock(&ctx->lock);
    return rc;
}

/* Collects the unacked events (marking them acked) so they can be acked unlocked. */
static size_t take_unacked(memory_ctx_t *ctx, mc_event_t ***out)
{
    size_t k = 0;
    *out = NULL;
    for (size_t i = 0; i < ctx->n; i++) {
        k += !ctx->acked[i];
    }
    if (k == 0) {
        return 0;
    }
    *out = malloc(k * sizeof(**out));
    if (!*out) {
        return 0;
    }
    k = 0;
    for (size_t i = 0; i < ctx->n; i++) {
        if (!ctx->acked[i]) {
            ctx->acked[i] = true;
            (*out)[k++] = mc_event_ref(ctx->events[i]);
        }
    }
    return k;
}

static void ack_and_release(mc_sink_t *sink, mc_event_t **evs, size_t k)
{
    for (size_t i = 0; i < k; i++) {
        mc_sink_ack(sink, evs[i]);
        mc_event_unref(&evs[i]);
    }
    free(evs);
}

int mc_sink_memory_ack_all(mc_sink_t *sink)
{
    memory_ctx_t *ctx = memory_ctx(sink);
    if (!ctx) {
        return MC_EINVAL;
    }
    mc_event_t **evs;
    pthread_mutex_lock(&ctx->lock);
    size_t k = take_unacked(ctx, &evs);
    pthread_mutex_unlock(&ctx->lock);
    ack_and_release(sink, evs, k);
    return 0;
}

int mc_sink_memory_clear(mc_sink_t *sink)
{
    memory_ctx_t *ctx = memory_ctx(sink);
    if (!ctx) {
        return MC_EINVAL;
    }
    mc_event_t **evs;
    pthread_mutex_lock(&ctx->lock);
    size_t k = take_unacked(ctx, &evs);
    mc_event_t **held = ctx->events;
    size_t n = ctx->n;
    ctx->events = NULL;
    free(ctx->acked);
    ctx->acked = NULL;
    ctx->n = ctx->cap = 0;
    pthread_mutex_unlock(&ctx->lock);
    ack_and_release(sink, evs, k);
    for (size_t i = 0; i < n; i++) {
        mc_event_unref(&held[i]);
    }
    free(held);
    return 0;
}
