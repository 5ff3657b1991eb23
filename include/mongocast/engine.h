/*
 * mongocast/engine.h: runs the change streams of a config and delivers their events to sinks.
 *
 * Threads (docs/ARCHITECTURE.md has the picture):
 *   - one watcher thread per stream: opens the change stream on a client from a shared
 *     mongoc_client_pool_t, normalises each change into an mc_event_t, resolves its
 *     recipient, and routes it: a reference goes into the bounded queue of every sink runner
 *     of its stream (never blocking on a sink, except for room in a live sink's queue); it
 *     resumes, reopens after invalidate and retries with backoff on its own;
 *   - one runner per sink instance (see mongocast/sink.h): a thread of its own for blocking
 *     sinks, the engine's shared I/O loop thread (libuv) for MC_SINK_ASYNC sinks, or the
 *     embedder's dispatch thread for MC_SINK_LIVE sinks when mc_engine_opts_t.notify is set
 *     (mc_engine_dispatch());
 *   - a catch-up thread per stream of a detached runner, while it catches up: the same read
 *     loop as a watcher, from the runner's own position, into the runner's queue only;
 *   - one checkpoint thread: every checkpoint.interval_ms, writes each (stream, sink)
 *     position that moved, and each stream's position (the oldest of its sinks'), to the
 *     token store (file or MongoDB).
 *
 * Lifecycle: mc_engine_new() -> [mc_engine_register_sink_type(), mc_engine_add_sink()] ->
 * [mc_engine_validate()] -> mc_engine_start() -> ... -> mc_engine_stop() ->
 * mc_engine_destroy(). Lifecycle calls must not run concurrently with each other; the status
 * and lookup functions may be called from any thread at any time between new and destroy.
 *
 * Failure policy per stream: errors libmongoc resumes are invisible; other transient errors
 * (network, election, server selection) are retried with capped exponential backoff and full
 * jitter from the last position the watcher delivered, never from "now". A stream whose
 * history was lost (286) fails or restarts (with a reset event) as its on_history_lost says;
 * other fatal errors (280, 47, auth, bad pipeline, ...) put only that stream in the FAILED
 * state with the server's message; the other streams keep running.
 */
#ifndef MONGOCAST_ENGINE_H
#define MONGOCAST_ENGINE_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/config.h"
#include "mongocast/error.h"
#include "mongocast/event.h"
#include "mongocast/sink.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mc_engine mc_engine_t;

typedef enum mc_stream_state {
    MC_STREAM_IDLE = 0,     /* engine not started */
    MC_STREAM_OPENING = 1,  /* first open in progress */
    MC_STREAM_OPEN = 2,     /* change stream open and being read */
    MC_STREAM_RETRYING = 3, /* lost; waiting for the next attempt (message says why) */
    MC_STREAM_FAILED = 4,   /* stopped for good (message says why); needs operator action */
    MC_STREAM_STOPPED = 5,  /* engine stopped */
} mc_stream_state_t;

/* "idle", "opening", "open", "retrying", "failed", "stopped". */
const char *mc_stream_state_name(mc_stream_state_t state);

/* A snapshot of one stream, copied out by mc_engine_stream_status(). */
typedef struct mc_stream_status {
    char name[128];
    mc_stream_state_t state;
    char message[512];     /* last error or state change reason; "" when none */
    int server_code;       /* MongoDB error code of the last error, 0 if none */
    uint64_t events;       /* change events delivered to the queue */
    uint64_t resumes;      /* reopens after an error (libmongoc's own resumes not counted) */
    uint64_t invalidates;  /* invalidate events seen (each followed by a reopen) */
    uint64_t resets;       /* restarts after history loss */
    uint64_t last_seq;     /* sequence number of the last event pushed */
    uint64_t stored_seq;   /* newest event covered by the stable (acked) position */
    int64_t last_event_ms; /* wall clock (ms since epoch) of the last change, 0 if none */
    bool has_position;     /* a resume position is known (stored or received) */
    /* Token-store writes of this stream's position (all 0 without a token store). A stream
     * whose position does not move has nothing new to write, so checkpoint_written_ms only
     * advances when the position does (on MongoDB even an idle stream's post-batch token
     * moves, at least every few seconds). */
    int64_t checkpoint_written_ms;   /* wall clock (ms since epoch) of the last successful
                                        write; 0 before the first one */
    int64_t checkpoint_event_ms;     /* time of the change at the position that write stored:
                                        its clusterTime (second resolution) in ms since epoch;
                                        0 when unknown */
    uint64_t checkpoint_written_seq; /* newest event covered by that write (0: none, e.g. a
                                        post-batch token before the first event) */
    uint64_t checkpoint_failures;    /* failed writes (each one is retried at the next
                                        interval) */
    uint64_t unresolved_recipients;  /* changes whose recipient could not be decided from the
                                        write (or proven through the lookup) and went to
                                        admins only (mongocast/event.h) */
    uint64_t recipient_missing;      /* insert/update/replace/delete events of a stream with a
                                        recipient whose recipient path held no identity
                                        (missing, null, another type): admins only */
    uint64_t images_missing;         /* events that lacked the pre- or post-image the stream
                                        asks for (images off on the collection, or expired) */
    char images_problem[256];        /* why images are known to be off ("" when not): the
                                        reason /readyz and mongocast check show */
    uint64_t split_events;           /* events larger than 16 MB delivered whole, reassembled
                                        from their fragments (on_oversize: split) */
    uint64_t oversize_skipped;       /* events larger than 16 MB delivered as an oversize
                                        notice (on_oversize: skip) */
} mc_stream_status_t;

/* The state of a sink's runner. */
typedef enum mc_sink_state {
    MC_SINK_IDLE = 0,        /* engine not started */
    MC_SINK_RUNNING = 1,     /* attached: takes events from the shared path */
    MC_SINK_RETRYING = 2,    /* attached, waiting to offer an event again (message says why) */
    MC_SINK_CATCHING_UP = 3, /* detached: reads the stream again from its own position */
    MC_SINK_FAILED = 4,      /* stopped for good in this run (message says why) */
    MC_SINK_STOPPED = 5,     /* engine stopped */
    MC_SINK_STANDBY = 6,     /* lease.enabled: another node holds the lease of its streams
                                and feeds it; this node publishes nothing to it */
} mc_sink_state_t;

/* "idle", "running", "retrying", "catching_up", "failed", "stopped", "standby". */
const char *mc_sink_state_name(mc_sink_state_t state);

/* Counters and state of one sink instance, copied out by mc_engine_sink_stats(). Every
 * event offered to the sink ends in exactly one of published, skipped and failed (a retried
 * event is offered once). */
typedef struct mc_sink_stats {
    const char *name;   /* the instance's name (borrowed; lives as long as the engine) */
    const char *type;   /* its type's name (borrowed; the config's spelling until
                           mc_engine_start() resolved it) */
    uint64_t published; /* publish() returned 0 */
    uint64_t skipped;   /* publish() returned MC_SINK_SKIP */
    uint64_t failed;    /* given up: dead-lettered, dropped (unclassified error of a
                           non-durable sink), or the event that failed the sink */
    uint64_t retries;   /* offers of an event again after MC_EAGAIN or a transient failure */
    /* Runner (all zero before mc_engine_start()). */
    mc_sink_state_t state;
    bool durable;           /* MC_SINK_DURABLE: a failure makes the engine not ready */
    uint64_t dead_letters;  /* events written to the dead letter */
    uint64_t detaches;      /* times the sink was detached (lag bound passed) */
    uint64_t lag_events;    /* events routed to the sink and not complete yet, including
                               (estimated) those a detached sink still has to catch up on */
    int64_t lag_ms;         /* age (by wallTime) of the oldest event the sink has not
                               completed (catching up: the age of its position, an upper
                               bound); 0 when it is up to date */
    char message[256];      /* why the state is what it is ("" when running) */
    uint64_t acked;         /* events a durable sink acknowledged (mc_sink_ack()) */
    uint64_t in_flight;     /* events published and not complete yet (awaiting their ack or
                               the flush), also counted in lag_events */
    /* initial: snapshot (docs/config.md, "Initial snapshot"): whether the sink has a copy in
     * this run (started or resumed, or found complete at start), the documents its copies
     * queued in this run, and whether every copy has read its last document. */
    bool snapshot;
    uint64_t snapshot_documents;
    bool snapshot_done;
} mc_sink_stats_t;

/* Per-sink runner settings (the config's sinks[].max_lag_events, retry, dead_letter). Zero
 * fields take the defaults. */
typedef struct mc_sink_runner_opts {
    uint32_t max_lag_events;   /* queue bound before the sink is detached; 0: 10000 (live
                                  sinks: mc_engine_opts_t.queue_capacity) */
    uint32_t retry_initial_ms; /* first backoff ceiling; 0: 100 */
    uint32_t retry_max_ms;     /* backoff cap; 0: 30000 */
    uint32_t max_attempts;     /* offers of one event before a transient failure counts as
                                  permanent; 0: unlimited */
    uint32_t max_retry_ms;     /* the same bound as time since the first failure; 0: none */
    const char *dead_letter_file; /* JSON lines of events that failed permanently; NULL: a
                                     permanent failure fails the sink */
} mc_sink_runner_opts_t;

/* Called on a watcher thread whenever a stream changes state. Must be quick and thread-safe;
 * may call mc_engine_stream_status() but no lifecycle function. */
typedef void (*mc_stream_state_cb)(mc_engine_t *engine, const char *stream,
                                   mc_stream_state_t state, const char *message,
                                   void *userdata);

/* Called (from a watcher thread) when a live sink's queue goes from empty to non-empty, in
 * external dispatch mode. Typically uv_async_send(). Must be thread-safe and must not block. */
typedef void (*mc_engine_notify_cb)(mc_engine_t *engine, void *userdata);

typedef struct mc_engine_opts {
    size_t queue_capacity;        /* queue bound of live sinks (the watcher waits for room);
                                     0: 4096 */
    uint32_t max_unacked;         /* default max_lag_events of the other sinks; 0: 10000 */
    uint32_t backoff_initial_ms;  /* watchers' reopen backoff; 0: 200 */
    uint32_t backoff_max_ms;      /* 0: 30000 */
    uint32_t drain_timeout_ms;    /* how long stop waits for sinks to drain; 0: 10000 */
    bool no_checkpoint;           /* keep positions in memory only (no token store) */
    const char *app_name;         /* sent in the MongoDB handshake; NULL: "mongocast" */
    mc_stream_state_cb on_state;  /* optional */
    void *on_state_userdata;
    /* External dispatch: when notify is set, MC_SINK_LIVE sinks run on the embedder's
     * (single) thread, which calls mc_engine_dispatch() after each notify. Other sinks keep
     * their own executors. */
    mc_engine_notify_cb notify;
    void *notify_userdata;
} mc_engine_opts_t;

/*
 * Creates an engine for `config`, which is borrowed and must stay valid and unchanged until
 * mc_engine_destroy(). `opts` may be NULL (defaults). Checks the streams (names, pipeline
 * shape) and the sinks' stream references, and connects nothing yet. Returns NULL and fills
 * err: MC_ECONFIG (bad reference or option, with the config position when known), MC_EINVAL.
 */
mc_engine_t *mc_engine_new(const mc_config_t *config, const mc_engine_opts_t *opts,
                           mc_error_t *err);

/* One ad hoc stream printed to stdout, for `mongocast tail`. Everything is copied. */
typedef struct mc_adhoc_opts {
    const char *uri;                       /* required */
    const char *db;                        /* NULL: whole cluster */
    const char *collection;                /* NULL: whole database (needs db) */
    const bson_t *pipeline;                /* BSON array of stages, or NULL */
    mc_full_document_t full_document;
    mc_before_change_t full_document_before_change;
    const char *resume_after;              /* a resume token `_data` to start after, or NULL */
    int64_t start_at_seconds;              /* > 0: startAtOperationTime Timestamp(secs, 0) */
    bool raw;                              /* print canonical Extended JSON changes */
    bool print_ready;                      /* also print the ready message */
    const char *recipient;                 /* optional recipient path */
    int32_t max_await_time_ms;             /* 0: 1000 */
    mc_on_history_lost_t on_history_lost;  /* default fail */
    const char *stream_name;               /* NULL: "tail" */
    mc_on_oversize_t on_oversize;          /* default split */
} mc_adhoc_opts_t;

/*
 * Creates an engine with one stream and one "stdout" sink and no token store: the position
 * lives in memory only. The engine owns the in-memory config it builds. Start, stop and
 * destroy it like any engine. Returns NULL and fills err (MC_EINVAL: missing uri, collection
 * without db, both resume_after and start_at_seconds, pipeline not an array of documents).
 */
mc_engine_t *mc_engine_new_adhoc(const mc_adhoc_opts_t *adhoc, const mc_engine_opts_t *opts,
                                 mc_error_t *err);

/* Makes a sink type available to this engine's config (`type: <name>`) and to
 * mc_engine_add_sink(). `type` is borrowed and must outlive the engine (normally a static
 * const). Before mc_engine_start() only. Errors: MC_EINVAL (bad abi_version, missing init or
 * publish, invalid name, engine started), MC_ECONFIG (name already registered). */
int mc_engine_register_sink_type(mc_engine_t *engine, const mc_sink_type_t *type,
                                 mc_error_t *err);

/*
 * Adds a sink instance that is not in the config: the hook through which the daemon attaches
 * its WebSocket/SSE fan-out (and embedders their own sinks). `streams` lists the stream
 * names it takes (n_streams 0: all streams); `options` (may be NULL) is passed to init;
 * `userdata` is returned by mc_sink_userdata(). Before mc_engine_start() only. The instance
 * is initialised by mc_engine_start() with the config's sinks. Returns 0, or MC_EINVAL /
 * MC_ENOTFOUND (unknown stream) / MC_ECONFIG (duplicate sink name) without side effects.
 */
int mc_engine_add_sink(mc_engine_t *engine, const mc_sink_type_t *type, const char *name,
                       const char *const *streams, size_t n_streams, const bson_t *options,
                       void *userdata, mc_error_t *err);

/* Sets the runner settings of sink `name` (config sinks take theirs from the config; this
 * overrides them). `opts` is copied. Before mc_engine_start() only. Returns 0, MC_ENOTFOUND,
 * MC_EINVAL (engine started). */
int mc_engine_set_sink_runner_opts(mc_engine_t *engine, const char *name,
                                   const mc_sink_runner_opts_t *opts, mc_error_t *err);

/*
 * Checks every sink without starting anything, for `mongocast check`: each config sink's
 * type is registered (built-in or mc_engine_register_sink_type()) and each sink accepts its
 * options, by the type's validate() when it has one, otherwise by init() and then destroy()
 * on a scratch instance (see mc_sink_type_t). Connects nothing, spawns no thread, touches no
 * token store and leaves the engine as it was: it may still be started. Before
 * mc_engine_start() only. Returns 0 or the first problem, with the message
 * mc_engine_start() would give: MC_ECONFIG ("FILE:LINE:COL: sink NAME: unknown sink type
 * 'x'" or "FILE:LINE:COL: sink NAME: <the type's option error>"; "sink NAME: ..." for sinks
 * added with mc_engine_add_sink()), MC_EINVAL (engine already started), MC_ENOMEM.
 */
int mc_engine_validate(mc_engine_t *engine, mc_error_t *err);

/*
 * Reachability of each sink whose type has a probe() (`mongocast check`): calls `report` once
 * per such sink, in config order, with the sink's name, its type's name, 0 or the probe's
 * MC_E* code, and NULL or the probe's message. Sinks without a probe are skipped. Before
 * mc_engine_start() only, after a successful mc_engine_validate(); blocks up to `timeout_ms`
 * per sink. Returns the number of sinks whose probe failed, or MC_EINVAL (started engine).
 */
typedef void (*mc_sink_probe_report_fn)(void *userdata, const char *sink_name,
                                        const char *type_name, int rc, const char *message);
int mc_engine_probe_sinks(mc_engine_t *engine, int64_t timeout_ms, mc_sink_probe_report_fn report,
                          void *userdata);

/*
 * Initialises and starts every sink, opens the token store, then spawns the watcher, consumer
 * and checkpoint threads. Returns as soon as the threads run (streams open asynchronously;
 * watch mc_engine_stream_status() or the on_state callback). On error nothing keeps running
 * and every sink already initialised is destroyed; the engine may then only be destroyed.
 * Errors: MC_EINVAL (wrong state, bad URI), MC_ECONFIG (unknown sink type, sink option
 * error), MC_EIO (checkpoint directory unusable), MC_ENOMEM.
 */
int mc_engine_start(mc_engine_t *engine, mc_error_t *err);

/*
 * Stops reading MongoDB (watchers and catch-up cursors), lets every runner deliver what it
 * already holds, retrying until the deadline, lets the sinks drain (up to drain_timeout_ms in
 * all), writes every (stream, sink) position and stream position to the token store and joins
 * all threads. Idempotent; returns 0, or MC_EAGAIN when a sink did not drain in time
 * (positions are then stored only up to what was complete), or MC_EIO when the last
 * checkpoint write failed. Any thread. In external dispatch mode, called on the dispatch
 * thread it delivers what live sinks hold itself; called on another thread (the daemon's
 * main thread, so that its loop keeps serving sockets meanwhile) it waits while the
 * dispatch thread keeps calling mc_engine_dispatch(), and gives live events up once the
 * dispatch thread stops taking them for a second.
 */
int mc_engine_stop(mc_engine_t *engine, mc_error_t *err);

/* Stops the engine if needed, destroys every sink and frees the engine. NULL-safe. */
void mc_engine_destroy(mc_engine_t *engine);

/* External dispatch only: delivers up to `max_events` events queued for MC_SINK_LIVE sinks
 * (0: all that are queued now) and flushes them. Returns the number of events delivered.
 * Call on the one dispatch thread. After mc_engine_stop() it returns 0. */
size_t mc_engine_dispatch(mc_engine_t *engine, size_t max_events);

/* Number of streams, and the i-th stream's name (borrowed, lives as long as the engine). */
size_t mc_engine_stream_count(const mc_engine_t *engine);
const char *mc_engine_stream_name(const mc_engine_t *engine, size_t i);

/* Copies stream `name`'s status into *out. Returns 0 or MC_ENOTFOUND. Any thread. */
int mc_engine_stream_status(mc_engine_t *engine, const char *name, mc_stream_status_t *out);

/* True when every stream is MC_STREAM_OPEN and no durable sink failed (for /readyz; the
 * reason of a failed sink is in its mc_sink_stats_t.message). */
bool mc_engine_ready(mc_engine_t *engine);

/* The lease of one stream on this node (docs/config.md, "lease"): with lease.enabled, of the
 * nodes running one config only the holder of a stream's lease feeds the stream's sinks
 * other than the live WebSocket/SSE fan-out. */
typedef struct mc_lease_status {
    bool enabled;          /* the stream has a lease (lease.enabled, and it has such sinks) */
    bool holder;           /* this node holds it and may publish right now */
    uint64_t epoch;        /* the fencing epoch this node holds or last held; 0: never held */
    uint64_t acquisitions; /* times this node took the lease (created, taken over) */
    uint64_t renewals;     /* successful renewals */
    uint64_t losses;       /* times it lost the lease (taken over, or not renewed in time) */
    char node_id[256];     /* this node's name in the lease documents */
} mc_lease_status_t;

/* Copies stream `name`'s lease state into *out (all zero when it has no lease). Returns 0,
 * MC_ENOTFOUND (no such stream), MC_EINVAL. Any thread. */
int mc_engine_lease_status(mc_engine_t *engine, const char *name, mc_lease_status_t *out);

/* True when every stream is FAILED or STOPPED (nothing left to run, e.g. `tail` can exit). */
bool mc_engine_finished(mc_engine_t *engine);

/* The sink instance named `name` (borrowed), or NULL. Valid after mc_engine_start(). */
mc_sink_t *mc_engine_sink(mc_engine_t *engine, const char *name);

/* Number of sink instances (config sinks in config order, then those added with
 * mc_engine_add_sink()). The table is fixed once mc_engine_start() ran. */
size_t mc_engine_sink_count(const mc_engine_t *engine);

/* Copies the counters and state of the i-th sink instance into *out. Returns 0 or
 * MC_ENOTFOUND (i out of range). Any thread, also while events flow: the counters are
 * atomics, each read on its own, so a snapshot taken mid-delivery may be one event apart
 * between fields. */
int mc_engine_sink_stats(mc_engine_t *engine, size_t i, mc_sink_stats_t *out);

/* The config the engine runs (borrowed; the built one for ad hoc engines). */
const mc_config_t *mc_engine_config(const mc_engine_t *engine);

/* Monotonic clock in milliseconds, the time base of drain deadlines. */
int64_t mc_engine_now_ms(void);

/*
 * Splits a stream pipeline (a BSON array of stages) into the stages sent to MongoDB (those
 * before the first stage with a {$var: ...} value at any depth) and the stages the daemon
 * evaluates per subscriber (that stage and every one after it), in the written order. `server_out`
 * and `local_out` are initialised here (both as arrays; either may be empty) and must be destroyed
 * by the caller with bson_destroy(), also on error. Returns 0 or MC_EINVAL (an element is not a
 * document, or a stage has not exactly one key starting with '$').
 */
int mc_pipeline_split(const bson_t *pipeline, bson_t *server_out, bson_t *local_out,
                      mc_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
