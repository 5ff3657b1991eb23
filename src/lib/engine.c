/*
 * engine.c: mc_engine_t: builds streams and sinks from a config, validates sinks without
 * starting them (`mongocast check`), starts and stops the watchers, the sink runners and
 * their executors, the I/O loop and the checkpoint thread, owns the lifecycle, and answers
 * the status API.
 *
 * Threads: lifecycle functions run on the caller's thread; watcher threads run watcher.c
 * (and route through router.c); sink runners run sink_runner.c on their executors (their own
 * threads, the I/O loop of ioloop.c, or the embedder's thread in mc_engine_dispatch()); the
 * checkpoint thread runs checkpoint_main() -> ledger.c.
 *
 * Invariants: the stream, sink, runner and route tables are built before any thread starts
 * and never change afterwards, so threads read them without locks. Stop order: watchers and
 * catch-up threads first (no more input), then every runner delivers what it holds until the
 * drain deadline, then the I/O loop, then the final ledger write: the stored positions cover
 * exactly what the sinks completed.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config_internal.h"
#include "engine_private.h"

#define DEFAULT_LIVE_CAPACITY 4096
#define DEFAULT_MAX_LAG 10000
#define DEFAULT_RETRY_INITIAL_MS 100
#define DEFAULT_RETRY_MAX_MS 30000

/* ---- Pipeline split ------------------------------------------------------------------- */

static bool contains_var(bson_iter_t *it, int depth)
{
    if (depth > 100) {
        return true; /* absurdly deep: keep it local rather than recursing further */
    }
    while (bson_iter_next(it)) {
        if (strcmp(bson_iter_key(it), "$var") == 0) {
            return true;
        }
        if (BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) {
            bson_iter_t child;
            if (bson_iter_recurse(it, &child) && contains_var(&child, depth + 1)) {
                return true;
            }
        }
    }
    return false;
}

int mc_pipeline_split(const bson_t *pipeline, bson_t *server_out, bson_t *local_out,
                      mc_error_t *err)
{
    bson_init(server_out);
    bson_init(local_out);
    if (!pipeline) {
        return 0;
    }
    bson_iter_t it;
    if (!bson_iter_init(&it, pipeline)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "pipeline is not valid BSON");
    }
    uint32_t ns = 0, nl = 0;
    bool local = false;
    while (bson_iter_next(&it)) {
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                                "pipeline stage %s is not a document", bson_iter_key(&it));
        }
        const uint8_t *data;
        uint32_t len;
        bson_iter_document(&it, &len, &data);
        bson_t stage;
        if (!bson_init_static(&stage, data, len) || bson_count_keys(&stage) != 1) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                                "pipeline stage %s must have exactly one key",
                                bson_iter_key(&it));
        }
        bson_iter_t sit;
        bson_iter_init(&sit, &stage);
        bson_iter_next(&sit);
        if (bson_iter_key(&sit)[0] != '$') {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                                "pipeline stage %s: '%s' is not a stage name (must start with "
                                "$)",
                                bson_iter_key(&it), bson_iter_key(&sit));
        }
        bson_iter_init(&sit, &stage);
        /* Stage order is the written order: once a stage needs a subscriber's vars, it and
         * every stage after it run in the daemon (pipeline_check.c vouches they can). */
        local = local || contains_var(&sit, 0);
        char key[16];
        const char *k;
        bson_uint32_to_string(local ? nl++ : ns++, &k, key, sizeof(key));
        bson_append_document(local ? local_out : server_out, k, -1, &stage);
    }
    return 0;
}

/* ---- Streams and status ----------------------------------------------------------------- */

const char *mc_stream_state_name(mc_stream_state_t state)
{
    switch (state) {
    case MC_STREAM_IDLE: return "idle";
    case MC_STREAM_OPENING: return "opening";
    case MC_STREAM_OPEN: return "open";
    case MC_STREAM_RETRYING: return "retrying";
    case MC_STREAM_FAILED: return "failed";
    case MC_STREAM_STOPPED: return "stopped";
    default: return "unknown";
    }
}

void mc__stream_set_state(mc__stream_t *s, mc_stream_state_t state, int server_code,
                          const char *fmt, ...)
{
    char msg[sizeof(s->status.message)];
    msg[0] = '\0';
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_lock(&s->lock);
    bool changed = s->status.state != state;
    /* A failed stream stays failed (only a restart of the engine clears it). */
    if (s->status.state == MC_STREAM_FAILED && state != MC_STREAM_FAILED) {
        pthread_mutex_unlock(&s->lock);
        return;
    }
    s->status.state = state;
    if (fmt) {
        bson_strncpy(s->status.message, msg, sizeof(s->status.message));
    }
    if (server_code) {
        s->status.server_code = server_code;
    }
    pthread_mutex_unlock(&s->lock);
    mc_engine_t *e = s->engine;
    if (changed && e->opts.on_state) {
        e->opts.on_state(e, s->cfg->name, state, msg, e->opts.on_state_userdata);
    }
}

static mc__stream_t *find_stream(mc_engine_t *engine, const char *name)
{
    for (size_t i = 0; i < engine->n_streams; i++) {
        if (strcmp(engine->streams[i].cfg->name, name) == 0) {
            return &engine->streams[i];
        }
    }
    return NULL;
}

size_t mc_engine_stream_count(const mc_engine_t *engine)
{
    return engine->n_streams;
}

const char *mc_engine_stream_name(const mc_engine_t *engine, size_t i)
{
    return i < engine->n_streams ? engine->streams[i].cfg->name : NULL;
}

int mc_engine_stream_status(mc_engine_t *engine, const char *name, mc_stream_status_t *out)
{
    mc__stream_t *s = name ? find_stream(engine, name) : NULL;
    if (!s) {
        return MC_ENOTFOUND;
    }
    pthread_mutex_lock(&s->lock);
    *out = s->status;
    pthread_mutex_unlock(&s->lock);
    out->events = atomic_load_explicit(&s->stat_events, memory_order_relaxed);
    out->last_seq = atomic_load_explicit(&s->stat_last_seq, memory_order_relaxed);
    out->last_event_ms = atomic_load_explicit(&s->stat_last_event_ms, memory_order_relaxed);
    out->checkpoint_written_ms = atomic_load_explicit(&s->stat_cp_written_ms,
                                                      memory_order_acquire);
    out->checkpoint_event_ms = atomic_load_explicit(&s->stat_cp_event_ms, memory_order_relaxed);
    out->checkpoint_written_seq = atomic_load_explicit(&s->stat_cp_seq, memory_order_relaxed);
    out->checkpoint_failures = atomic_load_explicit(&s->stat_cp_failures, memory_order_relaxed);
    mc__position_t pos = {0};
    if (engine->state == MC__ENGINE_RUNNING || engine->state == MC__ENGINE_STOPPED) {
        mc__ledger_stream_position(s, &pos);
    }
    out->stored_seq = pos.seq;
    if (pos.token) {
        out->has_position = true;
    }
    mc__position_clear(&pos);
    return 0;
}

static mc_stream_state_t stream_state(mc__stream_t *s)
{
    pthread_mutex_lock(&s->lock);
    mc_stream_state_t st = s->status.state;
    pthread_mutex_unlock(&s->lock);
    return st;
}

bool mc_engine_ready(mc_engine_t *engine)
{
    for (size_t i = 0; i < engine->n_streams; i++) {
        if (stream_state(&engine->streams[i]) != MC_STREAM_OPEN) {
            return false;
        }
    }
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        if (sink->runner && (sink->type->flags & MC_SINK_DURABLE) &&
            mc__runner_failed(sink->runner)) {
            return false;
        }
    }
    return engine->n_streams > 0;
}

const char *mc_sink_state_name(mc_sink_state_t state)
{
    switch (state) {
    case MC_SINK_IDLE: return "idle";
    case MC_SINK_RUNNING: return "running";
    case MC_SINK_RETRYING: return "retrying";
    case MC_SINK_CATCHING_UP: return "catching_up";
    case MC_SINK_FAILED: return "failed";
    case MC_SINK_STOPPED: return "stopped";
    case MC_SINK_STANDBY: return "standby";
    default: return "unknown";
    }
}

bool mc_engine_finished(mc_engine_t *engine)
{
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc_stream_state_t st = stream_state(&engine->streams[i]);
        if (st != MC_STREAM_FAILED && st != MC_STREAM_STOPPED) {
            return false;
        }
    }
    return true;
}

mc_sink_t *mc_engine_sink(mc_engine_t *engine, const char *name)
{
    for (size_t i = 0; i < engine->n_sinks; i++) {
        if (strcmp(engine->sinks[i]->name, name) == 0) {
            return engine->sinks[i];
        }
    }
    return NULL;
}

size_t mc_engine_sink_count(const mc_engine_t *engine)
{
    return engine ? engine->n_sinks : 0;
}

int mc_engine_sink_stats(mc_engine_t *engine, size_t i, mc_sink_stats_t *out)
{
    if (!engine || !out || i >= engine->n_sinks) {
        return MC_ENOTFOUND;
    }
    mc_sink_t *sink = engine->sinks[i];
    memset(out, 0, sizeof(*out));
    out->name = sink->name;
    out->type = sink->type ? sink->type->name : sink->cfg->type;
    out->durable = sink->type && (sink->type->flags & MC_SINK_DURABLE);
    out->published = atomic_load_explicit(&sink->stat_published, memory_order_relaxed);
    out->skipped = atomic_load_explicit(&sink->stat_skipped, memory_order_relaxed);
    out->failed = atomic_load_explicit(&sink->stat_failed, memory_order_relaxed);
    out->retries = atomic_load_explicit(&sink->stat_retries, memory_order_relaxed);
    out->dead_letters = atomic_load_explicit(&sink->stat_dead_letters, memory_order_relaxed);
    out->detaches = atomic_load_explicit(&sink->stat_detaches, memory_order_relaxed);
    out->acked = atomic_load_explicit(&sink->stat_acked, memory_order_relaxed);
    out->snapshot = atomic_load(&sink->copy_seen);
    out->snapshot_documents = atomic_load(&sink->stat_copy_docs);
    out->snapshot_done = out->snapshot && atomic_load(&sink->copies_pending) == 0;
    if (sink->runner) {
        mc__runner_stats(sink->runner, out);
    } else {
        out->state = MC_SINK_IDLE;
    }
    return 0;
}

const mc_config_t *mc_engine_config(const mc_engine_t *engine)
{
    return engine->config;
}

bool mc__engine_sleep(mc_engine_t *engine, int64_t ms)
{
    struct timespec deadline;
    mc__deadline_after_ms(&deadline, ms);
    pthread_mutex_lock(&engine->stop_lock);
    while (!atomic_load(&engine->stopping)) {
        if (pthread_cond_timedwait(&engine->stop_cond, &engine->stop_lock, &deadline) ==
            ETIMEDOUT) {
            break;
        }
    }
    pthread_mutex_unlock(&engine->stop_lock);
    return atomic_load(&engine->stopping);
}

/* ---- Construction ------------------------------------------------------------------------ */

static bool valid_type_name(const char *name)
{
    if (!name || !*name || strlen(name) > 64) {
        return false;
    }
    for (const char *p = name; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' || *p == '.' ||
              *p == '-')) {
            return false;
        }
    }
    return true;
}

/* ABI 1 and 2; the version-2 flags only with version 2, and a sink runs on one executor. */
static bool valid_abi(const mc_sink_type_t *type)
{
    if (type->abi_version < 1 || type->abi_version > MC_SINK_ABI_VERSION) {
        return false;
    }
    uint32_t v2_flags = MC_SINK_ASYNC | MC_SINK_LIVE;
    if (type->abi_version < 2 && (type->flags & v2_flags)) {
        return false;
    }
    return (type->flags & v2_flags) != v2_flags;
}

static const mc_sink_type_t *find_type(const mc_engine_t *engine, const char *name)
{
    for (size_t i = 0; i < engine->n_types; i++) {
        if (strcmp(engine->types[i]->name, name) == 0) {
            return engine->types[i];
        }
    }
    return NULL;
}

int mc_engine_register_sink_type(mc_engine_t *engine, const mc_sink_type_t *type,
                                 mc_error_t *err)
{
    if (!engine || !type) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "engine and type are required");
    }
    if (engine->state != MC__ENGINE_NEW) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "sink types must be registered before mc_engine_start()");
    }
    if (!valid_abi(type) || !type->init || !type->publish || !valid_type_name(type->name)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "sink type '%s' is invalid (abi_version %u, expected 1 to %u; "
                            "init and publish are required; name must match [a-z0-9_.-]{1,64}; "
                            "MC_SINK_ASYNC and MC_SINK_LIVE need version 2 and exclude each "
                            "other)",
                            type->name ? type->name : "(null)", type->abi_version,
                            MC_SINK_ABI_VERSION);
    }
    if (find_type(engine, type->name)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "sink type '%s' is already registered", type->name);
    }
    if (engine->n_types >= MC__MAX_SINK_TYPES) {
        return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                            "too many sink types (max %d)", MC__MAX_SINK_TYPES);
    }
    engine->types[engine->n_types++] = type;
    return 0;
}

static void sink_free(mc_sink_t *sink)
{
    if (!sink) {
        return;
    }
    if (sink->init_called && sink->type->destroy) {
        sink->type->destroy(sink);
    }
    mc__runner_destroy(sink->runner);
    free(sink->ctx);
    bson_free(sink->name);
    bson_destroy(sink->options);
    free(sink->takes_stream);
    bson_free(sink->ropts_dead_letter);
    free(sink);
}

static mc_sink_t *sink_alloc(mc_engine_t *engine, const char *name, const bson_t *options)
{
    mc_sink_t *sink = calloc(1, sizeof(*sink));
    if (!sink) {
        return NULL;
    }
    sink->engine = engine;
    sink->name = bson_strdup(name);
    sink->options = options ? bson_copy(options) : bson_new();
    sink->takes_stream = calloc(engine->n_streams ? engine->n_streams : 1, sizeof(bool));
    if (!sink->options || !sink->takes_stream) {
        sink_free(sink);
        return NULL;
    }
    atomic_init(&sink->stat_published, 0);
    atomic_init(&sink->stat_skipped, 0);
    atomic_init(&sink->stat_failed, 0);
    atomic_init(&sink->stat_retries, 0);
    atomic_init(&sink->stat_dead_letters, 0);
    atomic_init(&sink->stat_detaches, 0);
    atomic_init(&sink->stat_acked, 0);
    atomic_init(&sink->stat_copy_docs, 0);
    atomic_init(&sink->copies_pending, 0);
    atomic_init(&sink->copy_seen, false);
    return sink;
}

static int append_sink(mc_engine_t *engine, mc_sink_t *sink)
{
    mc_sink_t **sinks = realloc(engine->sinks, (engine->n_sinks + 1) * sizeof(*sinks));
    if (!sinks) {
        return MC_ENOMEM;
    }
    engine->sinks = sinks;
    engine->sinks[engine->n_sinks++] = sink;
    return 0;
}

/* Binds a sink to the named streams (all when n == 0). Returns the index of an unknown
 * stream name, or -1 when all were found. */
static int bind_streams(mc_engine_t *engine, mc_sink_t *sink, char *const *names, size_t n)
{
    if (n == 0) {
        for (size_t i = 0; i < engine->n_streams; i++) {
            sink->takes_stream[i] = true;
        }
        return -1;
    }
    for (size_t k = 0; k < n; k++) {
        mc__stream_t *s = names[k] ? find_stream(engine, names[k]) : NULL;
        if (!s) {
            return (int)k;
        }
        sink->takes_stream[s->index] = true;
    }
    return -1;
}

static const char *config_name(const mc_config_t *config)
{
    return config->path ? config->path : "config";
}

static void engine_free(mc_engine_t *engine);
static void free_owned_config(mc_config_t *c);

mc_engine_t *mc_engine_new(const mc_config_t *config, const mc_engine_opts_t *opts,
                           mc_error_t *err)
{
    if (!config) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "config is required");
        return NULL;
    }
    if (!config->mongodb_uri) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "%s: mongodb.uri is required", config_name(config));
        return NULL;
    }
    if (config->n_streams == 0) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "%s: no streams configured", config_name(config));
        return NULL;
    }
    mc_engine_t *engine = calloc(1, sizeof(*engine));
    if (!engine) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    engine->config = config;
    if (opts) {
        engine->opts = *opts;
    }
    mc_engine_opts_t *o = &engine->opts;
    if (!o->queue_capacity) {
        o->queue_capacity = DEFAULT_LIVE_CAPACITY;
    }
    if (!o->max_unacked) {
        o->max_unacked = DEFAULT_MAX_LAG;
    }
    if (!o->backoff_initial_ms) {
        o->backoff_initial_ms = 200;
    }
    if (!o->backoff_max_ms) {
        o->backoff_max_ms = 30000;
    }
    if (!o->drain_timeout_ms) {
        o->drain_timeout_ms = 10000;
    }
    atomic_init(&engine->stopping, false);
    atomic_init(&engine->checkpoint_quit, false);
    atomic_init(&engine->stop_started_ms, 0);
    atomic_init(&engine->dispatch_seen, false);
    atomic_init(&engine->dispatch_last_ms, 0);
    pthread_mutex_init(&engine->stop_lock, NULL);
    pthread_mutex_init(&engine->cp_lock, NULL);
    pthread_mutex_init(&engine->catchup_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&engine->stop_cond, &ca);
    pthread_cond_init(&engine->cp_cond, &ca);
    pthread_cond_init(&engine->catchup_cond, &ca);
    pthread_condattr_destroy(&ca);
    engine->types[engine->n_types++] = &mc__sink_stdout_type;
    engine->types[engine->n_types++] = &mc__sink_memory_type;
    engine->types[engine->n_types++] = &mc__sink_redis_type;
    engine->types[engine->n_types++] = &mc__sink_nats_type;
    engine->types[engine->n_types++] = &mc__sink_webhook_type;
    engine->types[engine->n_types++] = &mc__sink_mongodb_type;

    bson_error_t berr;
    engine->uri = mongoc_uri_new_with_error(config->mongodb_uri, &berr);
    if (!engine->uri) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_BSON, (int)berr.code,
                     "%s: mongodb.uri is invalid: %s", config_name(config), berr.message);
        goto fail;
    }

    engine->streams = calloc(config->n_streams, sizeof(mc__stream_t));
    if (!engine->streams) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < config->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        const mc_stream_config_t *sc = &config->streams[i];
        s->engine = engine;
        s->index = (int)i;
        s->cfg = sc;
        s->next_seq = 1;
        atomic_init(&s->stat_events, 0);
        atomic_init(&s->stat_last_seq, 0);
        atomic_init(&s->stat_last_event_ms, 0);
        atomic_init(&s->stat_cp_written_ms, 0);
        atomic_init(&s->stat_cp_event_ms, 0);
        atomic_init(&s->stat_cp_seq, 0);
        atomic_init(&s->stat_cp_failures, 0);
        atomic_init(&s->lease_until, INT64_MAX);
        atomic_init(&s->lease_epoch, 0);
        bson_init(&s->server_pipeline);
        pthread_mutex_init(&s->lock, NULL);
        pthread_mutex_init(&s->route_lock, NULL);
        engine->n_streams = i + 1; /* from here on engine_free() cleans this stream up */
        if (!sc->name || !*sc->name) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "%s:%d:%d: stream without a name", config_name(config), sc->pos.line,
                         sc->pos.col);
            goto fail;
        }
        if (sc->collection && !sc->db) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "%s:%d:%d: stream %s: collection needs db", config_name(config),
                         sc->pos.line, sc->pos.col, sc->name);
            goto fail;
        }
        bson_t local;
        mc_error_t perr;
        bson_destroy(&s->server_pipeline);
        if (mc_pipeline_split(sc->pipeline, &s->server_pipeline, &local, &perr) != 0) {
            bson_destroy(&local);
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "%s:%d:%d: stream %s: %s",
                         config_name(config), sc->pos.line, sc->pos.col, sc->name,
                         perr.message);
            goto fail;
        }
        bson_destroy(&local);
        for (size_t j = 0; j < i; j++) {
            if (strcmp(engine->streams[j].cfg->name, sc->name) == 0) {
                mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                             "%s:%d:%d: duplicate stream name %s", config_name(config),
                             sc->pos.line, sc->pos.col, sc->name);
                goto fail;
            }
        }
        bson_strncpy(s->status.name, sc->name, sizeof(s->status.name));
        s->status.state = MC_STREAM_IDLE;
    }

    for (size_t i = 0; i < config->n_sinks; i++) {
        const mc_sink_config_t *kc = &config->sinks[i];
        if (!kc->name || !kc->type) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "%s:%d:%d: sink needs a name and a type", config_name(config),
                         kc->pos.line, kc->pos.col);
            goto fail;
        }
        if (mc_engine_sink(engine, kc->name)) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "%s:%d:%d: duplicate sink name %s", config_name(config), kc->pos.line,
                         kc->pos.col, kc->name);
            goto fail;
        }
        mc_sink_t *sink = sink_alloc(engine, kc->name, kc->options);
        if (!sink || append_sink(engine, sink) != 0) {
            sink_free(sink);
            mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
            goto fail;
        }
        sink->cfg = kc;
        sink->ropts.max_lag_events = kc->max_lag_events;
        sink->ropts.retry_initial_ms = kc->retry.initial_ms;
        sink->ropts.retry_max_ms = kc->retry.max_ms;
        sink->ropts.max_attempts = kc->retry.max_attempts;
        sink->ropts.max_retry_ms = kc->retry.max_retry_ms;
        sink->ropts.dead_letter_file = kc->dead_letter_file;
        int bad = bind_streams(engine, sink, kc->streams, kc->n_streams);
        if (bad >= 0) {
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "%s:%d:%d: sink %s: unknown stream '%s'", config_name(config),
                         kc->pos.line, kc->pos.col, kc->name, kc->streams[bad]);
            goto fail;
        }
    }
    return engine;
fail:
    engine_free(engine);
    return NULL;
}

int mc_engine_add_sink(mc_engine_t *engine, const mc_sink_type_t *type, const char *name,
                       const char *const *streams, size_t n_streams, const bson_t *options,
                       void *userdata, mc_error_t *err)
{
    if (!engine || !type || !name || !*name || (n_streams && !streams)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "engine, type and name are required");
    }
    if (engine->state != MC__ENGINE_NEW) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "sinks must be added before mc_engine_start()");
    }
    if (!valid_abi(type) || !type->init || !type->publish) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "sink type '%s' is invalid", type->name ? type->name : "(null)");
    }
    if (mc_engine_sink(engine, name)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "duplicate sink name %s", name);
    }
    for (size_t k = 0; k < n_streams; k++) {
        if (!streams[k] || !find_stream(engine, streams[k])) {
            return mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                                "sink %s: unknown stream '%s'", name,
                                streams[k] ? streams[k] : "(null)");
        }
    }
    mc_sink_t *sink = sink_alloc(engine, name, options);
    if (!sink) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    sink->type = type;
    sink->userdata = userdata;
    bind_streams(engine, sink, (char *const *)streams, n_streams);
    if (append_sink(engine, sink) != 0) {
        sink_free(sink);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    return 0;
}

int mc_engine_set_sink_runner_opts(mc_engine_t *engine, const char *name,
                                   const mc_sink_runner_opts_t *opts, mc_error_t *err)
{
    if (!engine || !name || !opts) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "engine, name and opts are required");
    }
    if (engine->state != MC__ENGINE_NEW) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "runner settings must be set before mc_engine_start()");
    }
    mc_sink_t *sink = mc_engine_sink(engine, name);
    if (!sink) {
        return mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                            "no sink named %s", name);
    }
    bson_free(sink->ropts_dead_letter);
    sink->ropts_dead_letter = opts->dead_letter_file ? bson_strdup(opts->dead_letter_file) : NULL;
    sink->ropts = *opts;
    sink->ropts.dead_letter_file = sink->ropts_dead_letter;
    return 0;
}

/* ---- External dispatch (the embedder's loop thread) --------------------------------------- */

size_t mc_engine_dispatch(mc_engine_t *engine, size_t max_events)
{
    if (!engine || engine->state != MC__ENGINE_RUNNING) {
        return 0;
    }
    if (!atomic_load(&engine->dispatch_seen)) {
        engine->dispatch_thread = pthread_self();
        atomic_store(&engine->dispatch_seen, true);
    }
    atomic_store(&engine->dispatch_last_ms, mc__now_ms());
    size_t total = 0;
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc__runner_t *r = engine->sinks[k]->runner;
        if (r && mc__runner_exec(r) == MC__EXEC_EXTERNAL) {
            size_t budget = max_events ? (max_events > total ? max_events - total : 0) : 0;
            if (max_events && budget == 0) {
                break;
            }
            for (;;) {
                size_t n = mc__runner_run_once(r, budget);
                total += n;
                if (n == 0 || (max_events && total >= max_events)) {
                    break;
                }
                budget = max_events ? max_events - total : 0;
            }
        }
    }
    return total;
}

/* ---- Checkpoint thread ----------------------------------------------------------------- */

static void *checkpoint_main(void *arg)
{
    mc_engine_t *engine = arg;
    mc__thread_name("mccheckpoint", NULL);
    uint32_t interval = engine->config->checkpoint.interval_ms;
    if (interval == 0) {
        interval = 1000;
    }
    while (!atomic_load(&engine->checkpoint_quit)) {
        struct timespec deadline;
        mc__deadline_after_ms(&deadline, interval);
        pthread_mutex_lock(&engine->cp_lock);
        while (!atomic_load(&engine->checkpoint_quit)) {
            if (pthread_cond_timedwait(&engine->cp_cond, &engine->cp_lock, &deadline) ==
                ETIMEDOUT) {
                break;
            }
        }
        pthread_mutex_unlock(&engine->cp_lock);
        if (atomic_load(&engine->checkpoint_quit)) {
            break; /* the final write happens in mc_engine_stop(), after draining */
        }
        mc__ledger_write(engine);
    }
    return NULL;
}

/* ---- Start / stop / destroy -------------------------------------------------------------- */

/* A sink's error as start and validate report it: with the config position when the sink
 * comes from the config. A type answering > 0 (not an error code) gets MC_ECONFIG. */
static int report_sink_error(const mc_engine_t *engine, const mc_sink_t *sink, int rc,
                             const char *message, mc_error_t *err)
{
    if (rc >= 0) {
        rc = MC_ECONFIG;
    }
    if (sink->cfg) {
        return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "%s:%d:%d: sink %s: %s",
                            config_name(engine->config), sink->cfg->pos.line,
                            sink->cfg->pos.col, sink->name, message);
    }
    return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "sink %s: %s", sink->name, message);
}

/* The sink's type: set for mc_engine_add_sink() sinks, looked up by name for config sinks
 * (NULL when no type of that name is registered). */
static const mc_sink_type_t *sink_type(const mc_engine_t *engine, const mc_sink_t *sink)
{
    return sink->type ? sink->type : find_type(engine, sink->cfg->type);
}

/* "unknown sink type 'stdot'; did you mean 'stdout'? (known types: stdout, memory)". */
static int unknown_type_error(const mc_engine_t *engine, const mc_sink_t *sink, mc_error_t *err)
{
    char known[240] = "";
    size_t used = 0;
    const char *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; i < engine->n_types && used < sizeof(known); i++) {
        const char *name = engine->types[i]->name;
        int w = snprintf(known + used, sizeof(known) - used, "%s%s", i ? ", " : "", name);
        used += w > 0 ? (size_t)w : 0;
        size_t d = mc__cfg_edit_distance(sink->cfg->type, name, 2);
        if (d < best_d) {
            best_d = d;
            best = name;
        }
    }
    char msg[400];
    snprintf(msg, sizeof(msg), "unknown sink type '%.80s'%s%s%s (known types: %s)", sink->cfg->type,
             best ? "; did you mean '" : "", best ? best : "", best ? "'?" : "", known);
    return report_sink_error(engine, sink, MC_ECONFIG, msg, err);
}

/* Runs the type's option checks on a scratch copy of `sink`: the copy shares the name,
 * options and stream tables (read-only here) but has its own zeroed ctx, so the real
 * instance is untouched and can still be initialised by mc_engine_start(). */
/* A copy of `sink` that validate() and probe() may use: zeroed ctx, never initialised. */
static int scratch_sink(const mc_sink_t *sink, const mc_sink_type_t *type, mc_sink_t *scratch,
                        mc_error_t *err)
{
    *scratch = *sink;
    scratch->type = type;
    scratch->ctx = NULL;
    scratch->init_called = scratch->initialised = scratch->started = false;
    if (type->ctx_size) {
        scratch->ctx = calloc(1, type->ctx_size);
        if (!scratch->ctx) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        }
    }
    return 0;
}

static int validate_sink(mc_engine_t *engine, mc_sink_t *sink, const mc_sink_type_t *type,
                         mc_error_t *err)
{
    mc_sink_t scratch;
    int rc = scratch_sink(sink, type, &scratch, err);
    if (rc != 0) {
        return rc;
    }
    mc_error_t serr = {0};
    if (type->validate) {
        rc = type->validate(&scratch, scratch.options, &serr);
    } else {
        rc = type->init(&scratch, scratch.options, &serr);
        if (type->destroy) {
            type->destroy(&scratch);
        }
    }
    free(scratch.ctx);
    return rc == 0 ? 0 : report_sink_error(engine, sink, rc, serr.message, err);
}

int mc_engine_validate(mc_engine_t *engine, mc_error_t *err)
{
    if (!engine || engine->state != MC__ENGINE_NEW) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "mc_engine_validate: engine was already started");
    }
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        const mc_sink_type_t *type = sink_type(engine, sink);
        if (!type) {
            return unknown_type_error(engine, sink, err);
        }
        int rc = validate_sink(engine, sink, type, err);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

int mc_engine_probe_sinks(mc_engine_t *engine, int64_t timeout_ms, mc_sink_probe_report_fn report,
                          void *userdata)
{
    if (!engine || engine->state != MC__ENGINE_NEW || !report) {
        return MC_EINVAL;
    }
    int failed = 0;
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        const mc_sink_type_t *type = sink_type(engine, sink);
        if (!type || type->abi_version < 2 || !type->probe) {
            continue;
        }
        mc_sink_t scratch;
        mc_error_t perr = {0};
        int rc = scratch_sink(sink, type, &scratch, &perr);
        if (rc == 0) {
            rc = type->probe(&scratch, scratch.options, timeout_ms, &perr);
            if (rc != 0 && perr.message[0] == '\0') {
                mc_error_set(&perr, rc, MC_DOMAIN_MONGOCAST, rc, "unreachable");
            }
        }
        free(scratch.ctx);
        failed += rc != 0;
        report(userdata, sink->name, type->name, rc, rc == 0 ? NULL : perr.message);
    }
    return failed;
}

static int resolve_and_init_sinks(mc_engine_t *engine, mc_error_t *err)
{
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        sink->type = sink_type(engine, sink);
        if (!sink->type) {
            return unknown_type_error(engine, sink, err);
        }
    }
    /* Per-stream sink lists, before any init so a failing init leaves consistent tables for
     * engine_free(). */
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        size_t n = 0;
        for (size_t k = 0; k < engine->n_sinks; k++) {
            n += engine->sinks[k]->takes_stream[i];
        }
        if (n > MC__MAX_SINKS_PER_STREAM) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "stream %s has %zu sinks (max %d)", s->cfg->name, n,
                                MC__MAX_SINKS_PER_STREAM);
        }
        s->sinks = calloc(n ? n : 1, sizeof(mc_sink_t *));
        if (!s->sinks) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        }
        for (size_t k = 0; k < engine->n_sinks; k++) {
            mc_sink_t *sink = engine->sinks[k];
            if (sink->takes_stream[i]) {
                s->sinks[s->n_sinks++] = sink;
            }
        }
        if (s->n_sinks == 0) {
            mc_log(MC_LOG_WARN, "engine", "stream has no sinks stream=%s", s->cfg->name);
        }
    }
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        if (sink->type->ctx_size) {
            sink->ctx = calloc(1, sink->type->ctx_size);
            if (!sink->ctx) {
                return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                                    "out of memory");
            }
        }
        mc_error_t serr = {0};
        sink->init_called = true;
        int rc = sink->type->init(sink, sink->options, &serr);
        if (rc != 0) {
            return report_sink_error(engine, sink, rc, serr.message, err);
        }
        sink->initialised = true;
    }
    return 0;
}

static mc__exec_t executor_of(const mc_engine_t *engine, const mc_sink_type_t *type)
{
    if (type->abi_version >= 2 && (type->flags & MC_SINK_ASYNC)) {
        return MC__EXEC_LOOP;
    }
    if (type->abi_version >= 2 && (type->flags & MC_SINK_LIVE) && engine->opts.notify) {
        return MC__EXEC_EXTERNAL;
    }
    return MC__EXEC_THREAD;
}

/* Runner settings: the config's (or mc_engine_set_sink_runner_opts()'s), defaults for zeros. */
static void resolve_runner_opts(const mc_engine_t *engine, mc_sink_t *sink)
{
    mc_sink_runner_opts_t *o = &sink->ropts;
    if (!o->max_lag_events) {
        o->max_lag_events = engine->opts.max_unacked;
    }
    if (!o->retry_initial_ms) {
        o->retry_initial_ms = DEFAULT_RETRY_INITIAL_MS;
    }
    if (!o->retry_max_ms) {
        o->retry_max_ms = DEFAULT_RETRY_MAX_MS;
    }
}

/* Runners, their executors' resources, the streams' routes and definitions. Before any
 * sink's start(), so that async sinks find the I/O loop. */
static int build_runners(mc_engine_t *engine, mc_error_t *err)
{
    for (size_t k = 0; k < engine->n_sinks; k++) {
        if (executor_of(engine, engine->sinks[k]->type) == MC__EXEC_LOOP && !engine->ioloop) {
            engine->ioloop = mc__ioloop_new(err);
            if (!engine->ioloop) {
                return err ? err->code : MC_EIO;
            }
        }
    }
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        resolve_runner_opts(engine, sink);
        mc__exec_t exec = executor_of(engine, sink->type);
        bool live = sink->type->abi_version >= 2 && (sink->type->flags & MC_SINK_LIVE);
        uint32_t cap = live ? (uint32_t)engine->opts.queue_capacity : sink->ropts.max_lag_events;
        sink->runner = mc__runner_new(sink, exec, cap, err);
        if (!sink->runner) {
            return err ? err->code : MC_ENOMEM;
        }
        if (exec == MC__EXEC_LOOP &&
            mc__runner_loop_attach(sink->runner, mc__ioloop_uv(engine->ioloop)) != 0) {
            return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO,
                                "sink %s: cannot attach to the I/O loop", sink->name);
        }
    }
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        if (mc__route_init(s) != 0) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        }
        int rc = mc__ledger_definition(s, err);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

static void join_watchers(mc_engine_t *engine)
{
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        if (s->thread_started) {
            pthread_join(s->thread, NULL);
            s->thread_started = false;
        }
    }
    /* Catch-up threads are detached: wait until the last one has left. */
    pthread_mutex_lock(&engine->catchup_lock);
    while (engine->catchups > 0) {
        pthread_cond_wait(&engine->catchup_cond, &engine->catchup_lock);
    }
    pthread_mutex_unlock(&engine->catchup_lock);
}

static void signal_stop(mc_engine_t *engine)
{
    atomic_store(&engine->stop_started_ms, mc__now_ms());
    pthread_mutex_lock(&engine->stop_lock);
    atomic_store(&engine->stopping, true);
    pthread_cond_broadcast(&engine->stop_cond);
    pthread_mutex_unlock(&engine->stop_lock);
}

static void stop_checkpointer(mc_engine_t *engine)
{
    if (!engine->checkpointer_started) {
        return;
    }
    pthread_mutex_lock(&engine->cp_lock);
    atomic_store(&engine->checkpoint_quit, true);
    pthread_cond_broadcast(&engine->cp_cond);
    pthread_mutex_unlock(&engine->cp_lock);
    pthread_join(engine->checkpointer, NULL);
    engine->checkpointer_started = false;
}

/* Every runner delivers what it holds until the deadline, drains and stops. Returns 0 or
 * MC_EAGAIN (some sink did not complete everything). */
static int stop_runners(mc_engine_t *engine, int64_t deadline)
{
    int result = 0;
    for (size_t k = 0; k < engine->n_sinks; k++) {
        if (engine->sinks[k]->runner) {
            mc__runner_begin_stop(engine->sinks[k]->runner, deadline);
        }
    }
    bool on_dispatch = atomic_load(&engine->dispatch_seen) &&
                       pthread_equal(pthread_self(), engine->dispatch_thread);
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc__runner_t *r = engine->sinks[k]->runner;
        if (!r) {
            continue;
        }
        if (mc__runner_exec(r) == MC__EXEC_LOOP && !mc__ioloop_running(engine->ioloop)) {
            continue; /* closed below, where the loop runs once more on this thread */
        }
        if (mc__runner_finish_stop(r, deadline, on_dispatch) != 0) {
            result = MC_EAGAIN;
        }
    }
    mc__ioloop_stop(engine->ioloop);
    return result;
}

int mc_engine_start(mc_engine_t *engine, mc_error_t *err)
{
    if (!engine || engine->state != MC__ENGINE_NEW) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "mc_engine_start: engine was already started");
    }
    const mc_config_t *config = engine->config;
    int rc = resolve_and_init_sinks(engine, err);
    if (rc == 0) {
        rc = build_runners(engine, err);
    }
    if (rc != 0) {
        goto fail;
    }
    /* Without an explicit serverSelectionTimeoutMS a watcher could sit 30 s in server
     * selection while the engine is asked to stop; 5 s keeps shutdown prompt. */
    if (!mongoc_uri_has_option(engine->uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS)) {
        mongoc_uri_set_option_as_int32(engine->uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, 5000);
    }
    bson_error_t berr;
    engine->pool = mongoc_client_pool_new_with_error(engine->uri, &berr);
    if (!engine->pool) {
        rc = mc_error_set(err, MC_ECONFIG, MC_DOMAIN_BSON, (int)berr.code,
                          "mongodb.uri: %s", berr.message);
        goto fail;
    }
    mongoc_client_pool_set_error_api(engine->pool, MONGOC_ERROR_API_VERSION_2);
    mongoc_client_pool_set_appname(engine->pool,
                                   engine->opts.app_name ? engine->opts.app_name : "mongocast");
    /* One client per watcher, one per catch-up cursor that may run (a detached sink catches
     * up on each of its streams), the token store and a little slack: a pool that is too
     * small would make a thread block in pop() until another returns its client. */
    size_t clients = engine->n_streams + 4;
    for (size_t k = 0; k < engine->n_sinks; k++) {
        for (size_t i = 0; i < engine->n_streams; i++) {
            clients += engine->sinks[k]->takes_stream[i];
        }
    }
    mongoc_client_pool_max_size(engine->pool, (uint32_t)clients);

    if (!engine->opts.no_checkpoint) {
        if (config->checkpoint.store == MC_CHECKPOINT_MONGODB) {
            engine->store = mc__token_store_mongo_new(engine->pool, config->checkpoint.db,
                                                      config->checkpoint.collection, err);
        } else {
            engine->store = mc__token_store_file_new(config->checkpoint.path, err);
        }
        if (!engine->store) {
            rc = err ? err->code : MC_EIO;
            goto fail;
        }
    }
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_sink_t *sink = engine->sinks[k];
        if (sink->type->start) {
            mc_error_t serr = {0};
            rc = sink->type->start(sink, &serr);
            if (rc != 0) {
                mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "sink %s: %s", sink->name,
                             serr.message);
                goto fail;
            }
        }
        sink->started = true;
    }
    /* Leases: the leased streams' runners start fenced, before any thread can feed them. */
    if (!engine->opts.no_checkpoint && config->lease.enabled) {
        mc_error_t lerr = {0};
        engine->lease = mc__lease_new(engine, &lerr);
        if (!engine->lease && lerr.code) {
            rc = mc_error_set(err, lerr.code, MC_DOMAIN_MONGOCAST, lerr.code, "%s", lerr.message);
            goto fail;
        }
    }
    engine->state = MC__ENGINE_RUNNING;
    for (size_t k = 0; k < engine->n_sinks; k++) {
        mc_error_t serr = {0};
        rc = mc__runner_start(engine->sinks[k]->runner, &serr);
        if (rc != 0) {
            mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "sink %s: %s", engine->sinks[k]->name,
                         serr.message);
            goto fail_running;
        }
    }
    if (engine->ioloop && (rc = mc__ioloop_start(engine->ioloop, err)) != 0) {
        goto fail_running;
    }
    if (!engine->opts.no_checkpoint) {
        if (pthread_create(&engine->checkpointer, NULL, checkpoint_main, engine) != 0) {
            rc = mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno, "cannot start thread");
            goto fail_running;
        }
        engine->checkpointer_started = true;
    }
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        mc__stream_set_state(s, MC_STREAM_OPENING, 0, "opening");
        if (pthread_create(&s->thread, NULL, mc__watcher_main, s) != 0) {
            rc = mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno, "cannot start thread");
            goto fail_running;
        }
        s->thread_started = true;
    }
    if ((rc = mc__lease_start(engine->lease, err)) != 0) {
        goto fail_running;
    }
    mc_log(MC_LOG_INFO, "engine", "started streams=%zu sinks=%zu", engine->n_streams,
           engine->n_sinks);
    return 0;

fail_running:
    signal_stop(engine);
    join_watchers(engine);
    stop_runners(engine, mc__now_ms());
    stop_checkpointer(engine);
    mc__lease_stop(engine->lease);
fail:
    mc__ioloop_stop(engine->ioloop);
    engine->state = MC__ENGINE_FAILED;
    return rc ? rc : MC_EINVAL;
}

int mc_engine_stop(mc_engine_t *engine, mc_error_t *err)
{
    if (!engine || engine->state != MC__ENGINE_RUNNING) {
        return 0;
    }
    int result = 0;
    signal_stop(engine);
    join_watchers(engine);
    int64_t deadline = mc__now_ms() + engine->opts.drain_timeout_ms;
    if (stop_runners(engine, deadline) != 0) {
        result = MC_EAGAIN;
    }
    stop_checkpointer(engine);
    if (engine->store && mc__ledger_write(engine) != 0) {
        result = MC_EIO;
    }
    /* Last: the lease gate stayed open for the drain and the final positions; released now. */
    mc__lease_stop(engine->lease);
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_set_state(&engine->streams[i], MC_STREAM_STOPPED, 0, NULL);
    }
    engine->state = MC__ENGINE_STOPPED;
    if (result == MC_EAGAIN) {
        mc_error_set(err, MC_EAGAIN, MC_DOMAIN_MONGOCAST, MC_EAGAIN,
                     "some sinks did not drain; positions stored up to what they completed");
    } else if (result == MC_EIO) {
        mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "final checkpoint write failed");
    }
    mc_log(MC_LOG_INFO, "engine", "stopped");
    return result;
}

static void engine_free(mc_engine_t *engine)
{
    for (size_t k = 0; k < engine->n_sinks; k++) {
        sink_free(engine->sinks[k]);
    }
    free(engine->sinks);
    for (size_t i = 0; i < engine->n_streams; i++) {
        mc__stream_t *s = &engine->streams[i];
        bson_destroy(&s->server_pipeline);
        if (s->definition) {
            bson_destroy(s->definition);
        }
        mc__route_cleanup(s);
        mc__position_clear(&s->written);
        free(s->sinks);
        if (s->start_token) {
            bson_destroy(s->start_token);
        }
        pthread_mutex_destroy(&s->lock);
        pthread_mutex_destroy(&s->route_lock);
    }
    free(engine->streams);
    mc__lease_destroy(engine->lease);
    mc__ioloop_destroy(engine->ioloop);
    mc__token_store_destroy(engine->store);
    if (engine->pool) {
        mongoc_client_pool_destroy(engine->pool);
    }
    mongoc_uri_destroy(engine->uri);
    pthread_cond_destroy(&engine->stop_cond);
    pthread_cond_destroy(&engine->cp_cond);
    pthread_cond_destroy(&engine->catchup_cond);
    pthread_mutex_destroy(&engine->stop_lock);
    pthread_mutex_destroy(&engine->cp_lock);
    pthread_mutex_destroy(&engine->catchup_lock);
    free_owned_config(engine->owned_config);
    free(engine);
}

void mc_engine_destroy(mc_engine_t *engine)
{
    if (!engine) {
        return;
    }
    mc_engine_stop(engine, NULL);
    engine_free(engine);
}

/* ---- Ad hoc engines (tail) --------------------------------------------------------------- */

/* The ad hoc config is allocated here and freed here: it never reaches mc_config_destroy(),
 * so it does not depend on how config.c allocates. */
static void free_owned_config(mc_config_t *c)
{
    if (!c) {
        return;
    }
    for (size_t i = 0; i < c->n_streams; i++) {
        mc_stream_config_t *s = &c->streams[i];
        bson_free(s->name);
        bson_free(s->db);
        bson_free(s->collection);
        bson_free(s->recipient);
        bson_destroy(s->pipeline);
    }
    free(c->streams);
    for (size_t i = 0; i < c->n_sinks; i++) {
        mc_sink_config_t *k = &c->sinks[i];
        bson_free(k->name);
        bson_free(k->type);
        bson_free(k->dead_letter_file);
        for (size_t j = 0; j < k->n_streams; j++) {
            bson_free(k->streams[j]);
        }
        free(k->streams);
        bson_destroy(k->options);
    }
    free(c->sinks);
    bson_free(c->path);
    bson_free(c->mongodb_uri);
    free(c);
}

mc_engine_t *mc_engine_new_adhoc(const mc_adhoc_opts_t *adhoc, const mc_engine_opts_t *opts,
                                 mc_error_t *err)
{
    if (!adhoc || !adhoc->uri) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "a MongoDB URI is required");
        return NULL;
    }
    if (adhoc->collection && !adhoc->db) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "a collection needs a database");
        return NULL;
    }
    if (adhoc->resume_after && adhoc->start_at_seconds > 0) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "resume_after and start_at_seconds are mutually exclusive");
        return NULL;
    }
    if (adhoc->start_at_seconds < 0 || adhoc->start_at_seconds > UINT32_MAX) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "start_at_seconds out of range");
        return NULL;
    }
    mc_config_t *c = calloc(1, sizeof(*c));
    if (!c) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    c->path = bson_strdup("tail");
    c->mongodb_uri = bson_strdup(adhoc->uri);
    c->checkpoint.interval_ms = 1000;
    c->streams = calloc(1, sizeof(mc_stream_config_t));
    c->sinks = calloc(1, sizeof(mc_sink_config_t));
    if (!c->streams || !c->sinks) {
        free_owned_config(c);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    c->n_streams = 1;
    mc_stream_config_t *s = &c->streams[0];
    s->name = bson_strdup(adhoc->stream_name ? adhoc->stream_name : "tail");
    s->db = adhoc->db ? bson_strdup(adhoc->db) : NULL;
    s->collection = adhoc->collection ? bson_strdup(adhoc->collection) : NULL;
    s->pipeline = adhoc->pipeline ? bson_copy(adhoc->pipeline) : bson_new();
    s->full_document = adhoc->full_document;
    s->full_document_before_change = adhoc->full_document_before_change;
    s->recipient = adhoc->recipient ? bson_strdup(adhoc->recipient) : NULL;
    s->on_history_lost = adhoc->on_history_lost;
    s->on_oversize = adhoc->on_oversize;
    s->max_await_time_ms = adhoc->max_await_time_ms > 0 ? adhoc->max_await_time_ms : 1000;
    s->history = 0;
    c->n_sinks = 1;
    mc_sink_config_t *k = &c->sinks[0];
    k->name = bson_strdup("stdout");
    k->type = bson_strdup("stdout");
    k->options = BCON_NEW("raw", BCON_BOOL(adhoc->raw), "ready", BCON_BOOL(adhoc->print_ready));

    mc_engine_opts_t o = {0};
    if (opts) {
        o = *opts;
    }
    o.no_checkpoint = true;
    mc_engine_t *engine = mc_engine_new(c, &o, err);
    if (!engine) {
        free_owned_config(c);
        return NULL;
    }
    engine->owned_config = c;
    mc__stream_t *st = &engine->streams[0];
    if (adhoc->resume_after) {
        st->start_token = BCON_NEW("_data", BCON_UTF8(adhoc->resume_after));
    }
    st->start_at_secs = adhoc->start_at_seconds;
    return engine;
}
