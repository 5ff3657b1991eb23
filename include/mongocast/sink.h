/*
 * mongocast/sink.h: the interface every destination of events implements.
 *
 * A sink type is a const vtable (mc_sink_type_t) with a name that configs refer to
 * (`type: stdout`). The engine creates one instance (mc_sink_t) per `sinks:` entry, or per
 * mc_engine_add_sink() call, and zero-allocates `ctx_size` bytes of private state for it
 * (mc_sink_ctx()). Built-in types: "stdout", "memory", "webhook" and "mongodb" (registered in every engine), and
 * "fault" / "fault_async" (fault injection for tests, registered on request:
 * mc_sink_fault_type()). Embedders add their own with mc_engine_register_sink_type() (see
 * examples/embed_minimal.c).
 *
 * Runners: the engine gives every instance a runner (docs/ARCHITECTURE.md): a bounded queue
 * of event references, filled by the stream's watcher thread, and an executor that calls
 * publish()/flush() in order, one event at a time. A runner retries what the sink refused
 * (MC_EAGAIN, transient failures) itself, with capped full-jitter backoff, and never lets a
 * later event overtake an earlier one. Which executor runs a sink depends on its flags:
 *   - MC_SINK_ASYNC: the engine's shared I/O loop thread (libuv; mc_sink_uv_loop()). publish
 *     must never block: it starts the work and reports the outcome later with mc_sink_ack()
 *     or mc_sink_fail() from the loop's callbacks. For hiredis, libcurl multi, libnats with
 *     its libuv adapter, or anything else that plugs into a uv_loop_t.
 *   - MC_SINK_LIVE: the embedder's dispatch thread, through mc_engine_dispatch() (the daemon's
 *     libuv loop for the WebSocket/SSE fan-out), when mc_engine_opts_t.notify is set;
 *     otherwise a thread of its own. A live sink has no stored position, is never detached and
 *     never waits: a full live queue makes the watcher wait instead (back-pressure).
 *   - anything else (MC_SINK_BLOCKING or not): a thread of its own, so publish may block
 *     (a synchronous client, a pipe). Long waits should use mc_sink_sleep(), which returns
 *     early when the engine stops.
 * A runner whose queue passes its `max_lag_events` is detached: its queue is freed, the
 * stream and the other sinks go on, and the runner catches up by reading the change stream
 * again from its own position with a cursor of its own, then rejoins the shared path without
 * gap or duplicate. Events read by such a catch-up cursor have sequence number 0.
 *
 * Threads and order:
 *   - init, start and destroy run on the thread that calls mc_engine_start() /
 *     mc_engine_destroy() (start failures are reported by mc_engine_start()); validate, or
 *     init and destroy on a scratch instance, on the thread that calls mc_engine_validate().
 *     For MC_SINK_ASYNC sinks, start runs before the I/O loop thread does, so it may create
 *     handles on mc_sink_uv_loop().
 *   - publish, flush, drain and stop run on the sink's executor thread, never on two threads
 *     at once. Events of one stream reach publish() in order; events of different streams
 *     may interleave.
 *   - mc_sink_ack() and mc_sink_fail() may be called from any thread, also from inside
 *     publish().
 *
 * Validation (`mongocast check`): mc_engine_validate() checks a sink's options without
 * running anything. It calls the type's validate() when the type has one; otherwise it calls
 * init() on a scratch instance and destroy() right after. So init() must either be free of
 * side effects outside its ctx (parse and store options, init locks) or have them fully
 * undone by destroy(); files are opened, connections made and workers spawned in start(). A
 * type that cannot keep init that cheap provides validate().
 *
 * Delivery and positions: every sink instance except live ones has a stored position per
 * stream it takes (the newest event it completed with everything before it), written by the
 * checkpoint thread to the token store, and resumes from it after a restart or a crash. An
 * event is complete for a sink when it was skipped, dead-lettered, or (durable sinks,
 * MC_SINK_DURABLE) acknowledged with mc_sink_ack(), or (other sinks) published and followed
 * by a flush() that reported no failure. The watcher reads each stream from the oldest
 * position any of its sinks needs; each sink skips what it already completed.
 *
 * Errors (what publish() returns, or reports later with mc_sink_fail()):
 *   0                 accepted (durable sinks ack it later, or now, with mc_sink_ack());
 *   MC_SINK_SKIP      not taken (e.g. a control event it ignores); complete at once;
 *   MC_EAGAIN         busy right now: offered again soon (a short backoff), never dropped;
 *   mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, ...)  retried with the sink's backoff, in order,
 *                     until it succeeds or `retry.max_attempts` / `retry.max_retry_ms` run out
 *                     (then it is handled as permanent);
 *   mc_sink_fail(sink, ev, MC_SINK_PERMANENT, ...)  this event can never be delivered: it goes
 *                     to the sink's dead letter (`dead_letter: {file: PATH}`) and delivery goes
 *                     on, or, without a dead letter, the sink fails (state failed, its
 *                     position stays at the event; a durable failed sink makes the engine not
 *                     ready);
 *   other < 0         unclassified: a durable sink's event is retried as transient; a
 *                     non-durable sink's event is logged, counted as failed and dropped (the
 *                     behaviour of ABI version 1, kept for both versions).
 * A failure reported with mc_sink_fail() after publish() returned 0 (an asynchronous client)
 * is handled the same way; a transient one makes the runner offer that event again, and then
 * every event it had published after it that is not acknowledged yet (at-least-once: the
 * receiving end dedupes by event id).
 *
 * ABI versions: version 2 added MC_SINK_ASYNC, MC_SINK_LIVE, stop(), mc_sink_fail() and the
 * runner; version 1 types still register and run (on a thread of their own) with the error
 * rules above, and their struct is never read past `validate`.
 */
#ifndef MONGOCAST_SINK_H
#define MONGOCAST_SINK_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"
#include "mongocast/event.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MC_SINK_ABI_VERSION 2

/* Flags of a sink type. */
#define MC_SINK_DURABLE 0x1u  /* completion is its acks (at-least-once); failed => not ready */
#define MC_SINK_BLOCKING 0x2u /* publish may block (every non-async, non-live sink gets a
                                 thread of its own anyway; kept for ABI version 1) */
#define MC_SINK_ASYNC 0x4u    /* ABI 2: runs on the engine's shared I/O loop (libuv) */
#define MC_SINK_LIVE 0x8u     /* ABI 2: a live feed on the embedder's dispatch thread: no
                                 stored position, never detached (see above) */

/* publish() return value (positive, so it is never mistaken for an error): the sink did not
 * take this event (e.g. a control event it ignores) and will not ack it. */
#define MC_SINK_SKIP 1

typedef struct mc_sink mc_sink_t;
typedef struct mc_engine mc_engine_t;

/* The class of a delivery failure (ABI 2, mc_sink_fail()). */
typedef enum mc_sink_error_class {
    MC_SINK_TRANSIENT = 1, /* may work later: retried, in order */
    MC_SINK_PERMANENT = 2, /* can never work for this event: dead letter, or the sink fails */
} mc_sink_error_class_t;

typedef struct mc_sink_type {
    uint32_t abi_version; /* MC_SINK_ABI_VERSION (1 is still accepted) */
    const char *name;     /* type name used in configs; [a-z0-9_.-]+, unique per engine */
    uint32_t flags;       /* MC_SINK_DURABLE | MC_SINK_BLOCKING | MC_SINK_ASYNC | MC_SINK_LIVE */
    size_t ctx_size;      /* bytes of zeroed private state per instance; may be 0 */

    /* Required. Checks and stores the instance's options (`options` is the BSON of every key
     * of the sink's config entry other than name/type/streams and the runner's own keys
     * (max_lag_events, retry, dead_letter), an empty document when there are none; borrowed:
     * copy what you keep). On failure return MC_EINVAL/MC_ECONFIG and fill err; destroy() is
     * still called afterwards, on the partly initialised ctx. */
    int (*init)(mc_sink_t *sink, const bson_t *options, mc_error_t *err);

    /* Optional. Connects or spawns workers once every sink is initialised; an error makes
     * mc_engine_start() fail. */
    int (*start)(mc_sink_t *sink, mc_error_t *err);

    /* Required. Borrows `ev` (mc_event_ref() it to keep it). Returns 0, MC_SINK_SKIP,
     * MC_EAGAIN or an error, as described above. */
    int (*publish)(mc_sink_t *sink, mc_event_t *ev);

    /* Optional. Called after each batch of publish() calls (write out buffered output). A
     * failure to write is reported with mc_sink_fail() for each event it concerns, before
     * flush returns; events not failed by then are complete for a non-durable sink. */
    void (*flush)(mc_sink_t *sink);

    /* Optional. Called during mc_engine_stop() after the last publish(): finish or give up
     * on pending work before the monotonic deadline `deadline_ms` (see mc_engine_now_ms()).
     * Return 0 when everything accepted was delivered (and acked), MC_EAGAIN on timeout.
     * MC_SINK_ASYNC sinks must not block here: start the flushing and return; the engine
     * keeps the loop running until every accepted event is acked or the deadline passes. */
    int (*drain)(mc_sink_t *sink, int64_t deadline_ms);

    /* Optional. Frees what ctx holds (not ctx itself). Cannot fail. */
    void (*destroy)(mc_sink_t *sink);

    /* Optional (appended to ABI 1: initialisers that predate it leave it NULL). Checks
     * `options` exactly as init() would and reports the same errors, with no side effect at
     * all. Called by mc_engine_validate() on a scratch instance (zeroed ctx_size bytes, the
     * real name, streams and userdata) instead of init(); neither init() nor destroy() is
     * called for that instance, so validate must acquire nothing that destroy would free. */
    int (*validate)(mc_sink_t *sink, const bson_t *options, mc_error_t *err);

    /* ABI 2, optional. Runs once during mc_engine_stop(), after drain, on the sink's executor
     * thread: release what start() acquired there (close connections; MC_SINK_ASYNC sinks
     * uv_close() their handles, which the engine then lets the loop finish). */
    void (*stop)(mc_sink_t *sink);

    /* ABI 2, optional. `mongocast check`'s reachability test: parses `options` as validate()
     * does, connects to what they point at (and authenticates) within `timeout_ms`, and lets
     * go of everything before returning, on the calling thread, with no lasting side effect
     * (it must not create streams, keys or indexes). Called on a scratch instance like
     * validate() (zeroed ctx, never init()ed). Returns 0 when reachable, otherwise an MC_E*
     * code with err saying why ("connect 127.0.0.1:6390: Connection refused", "no reply
     * within 2000 ms"); never puts a secret into err. */
    int (*probe)(mc_sink_t *sink, const bson_t *options, int64_t timeout_ms, mc_error_t *err);
} mc_sink_type_t;

/* The instance's private state (ctx_size bytes, zeroed at creation); NULL when ctx_size is 0. */
void *mc_sink_ctx(mc_sink_t *sink);

/* The instance's name (config `name:`). */
const char *mc_sink_name(const mc_sink_t *sink);

const mc_sink_type_t *mc_sink_get_type(const mc_sink_t *sink);

/* The engine the instance belongs to. */
mc_engine_t *mc_sink_engine(const mc_sink_t *sink);

/* The userdata given to mc_engine_add_sink() (NULL for sinks from the config). */
void *mc_sink_userdata(const mc_sink_t *sink);

/* True when the instance receives the events of stream `stream`. */
bool mc_sink_has_stream(const mc_sink_t *sink, const char *stream);

/*
 * Acknowledges durable delivery of `ev` (an event this sink accepted from publish()).
 * Idempotent: a second ack of the same event, an ack from a non-durable sink, or an ack of
 * an event the runner no longer holds (completed, or dropped when the sink was detached) are
 * ignored. Acks may come in any order; the stored position only moves over a prefix of
 * complete events. Any thread.
 */
void mc_sink_ack(mc_sink_t *sink, const mc_event_t *ev);

/* The same by stream name and sequence number, for sinks that keep only those (events of a
 * catch-up cursor have seq 0: ack those with mc_sink_ack()). Returns 0, MC_ENOTFOUND for an
 * unknown stream. */
int mc_sink_ack_seq(mc_sink_t *sink, const char *stream, uint64_t seq);

/*
 * ABI 2: reports that delivering `ev` failed, with its class and a reason (kept for the
 * sink's status, the log and the dead letter; never put secrets in it). Inside publish(),
 * return its result: `return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "HTTP %d", s);`.
 * Later (asynchronous clients), call it instead of mc_sink_ack() for an event publish()
 * accepted. `retry_after_ms` > 0 asks a transient retry to wait at least that long (a
 * server's Retry-After); 0 uses the sink's backoff. Returns MC_EIO (transient) or MC_EINVAL
 * (permanent), so that the value can be returned from publish() as is. Any thread.
 */
int mc_sink_fail(mc_sink_t *sink, const mc_event_t *ev, mc_sink_error_class_t cls,
                 int64_t retry_after_ms, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

/* ABI 2: the engine's shared I/O loop (a uv_loop_t *) for MC_SINK_ASYNC sinks; NULL for other
 * sinks. Valid from start() until stop(); use it only on the loop's thread (or in start()). */
void *mc_sink_uv_loop(mc_sink_t *sink);

/* ABI 2: the sink's position for `stream` right now: the resume token `_data` of the newest
 * item of that stream it completed with everything before it (what the checkpoint stores for
 * it). Before the sink's first event of the stream in this run, that is the position it
 * resumed from: its stored position after a restart, or the stream's starting point (often a
 * high-water mark rather than an event's id). Written NUL-terminated into buf. Returns 0,
 * MC_ENOTFOUND when the sink has no position for that stream (yet, or does not take it),
 * MC_ELIMIT when cap is too small. Any thread. */
int mc_sink_position(mc_sink_t *sink, const char *stream, char *buf, size_t cap);

/* The fencing epoch under which this node publishes `ev` (lease.enabled, docs/config.md
 * "lease"): the epoch of the lease this node holds on the event's stream, incremented at every
 * change of holder, so that a record written with it tells which holder wrote it (records of
 * an older epoch never follow records of a newer one in write order, unless a write took
 * longer than the lease's safety margin). 0 when the stream has no lease (or `ev` is NULL).
 * Any thread; meant for publish()/flush() of the sink that received `ev`. */
uint64_t mc_sink_lease_epoch(const mc_sink_t *sink, const mc_event_t *ev);

/* False when the event's stream has a lease and this node may no longer publish under it (its
 * lease expired or was taken over): a sink that is about to write a batch it built earlier
 * may check this right before the write and fail the batch as transient instead (the runner
 * drops it). True without a lease. Any thread. */
bool mc_sink_lease_valid(const mc_sink_t *sink, const mc_event_t *ev);

/* Sleeps up to `ms` on the calling thread unless the engine stops first. Returns true when the
 * engine is stopping (then give up and return from publish/drain). For blocking sinks. */
bool mc_sink_sleep(mc_sink_t *sink, int64_t ms);

/* True once mc_engine_stop() has begun. Any thread. */
bool mc_sink_stopping(const mc_sink_t *sink);

/* 0 while the engine runs; once mc_engine_stop() has begun, the monotonic time
 * (mc_engine_now_ms()) by which the sink should have delivered what it holds and give up
 * waiting (e.g. on a pipe that does not drain). Any thread. */
int64_t mc_sink_deadline_ms(const mc_sink_t *sink);

/* ---- The built-in "memory" sink (tests and embedders) ---------------------------------
 * Type "memory", flags MC_SINK_DURABLE. Keeps references to the events it receives, up to
 * `max_events` (option, default 100000; then publish returns MC_EAGAIN until
 * mc_sink_memory_clear() makes room). Option `auto_ack` (default true) acks each event in
 * publish(); with auto_ack false, acks wait for mc_sink_memory_ack_all(). Option `control`
 * (default true) keeps ready/reset/invalidate events too; false skips them.
 * All functions below are thread-safe; they return MC_EINVAL when `sink` is not a memory sink.
 */
const mc_sink_type_t *mc_sink_memory_type(void);

/* Number of events held. */
size_t mc_sink_memory_count(mc_sink_t *sink);

/* A new reference to the i-th event held (0-based), or NULL when out of range. */
mc_event_t *mc_sink_memory_get(mc_sink_t *sink, size_t i);

/* Waits until at least `n` events are held or `timeout_ms` passes. Returns 0 or MC_EAGAIN. */
int mc_sink_memory_wait(mc_sink_t *sink, size_t n, int64_t timeout_ms);

/* Acks every event held that was not acked yet. */
int mc_sink_memory_ack_all(mc_sink_t *sink);

/* Drops every event held (acking the unacked ones first). */
int mc_sink_memory_clear(mc_sink_t *sink);

/* ---- The built-in "stdout" sink ---------------------------------------------------------
 * Type "stdout", not durable, on a writer thread of its own. One JSON line per event on
 * standard output, buffered and written after each batch; a pipe that stops reading blocks
 * only this thread (the runner detaches once its queue passes max_lag_events and catches up
 * when the pipe drains). Options:
 *   raw: false    true prints the change document in canonical Extended JSON instead of the
 *                 message (control events other than invalidate are then not printed)
 *   ready: false  true also prints {"type":"ready",...} lines
 * Change, invalidate and reset messages are always printed (unless raw). A closed pipe
 * (EPIPE) is a permanent failure (the sink fails unless it has a dead letter); other write
 * errors are transient.
 */
const mc_sink_type_t *mc_sink_stdout_type(void);

/* ---- Fault injection: "fault" and "fault_async" (tests) -------------------------------------
 * Durable sink types that misbehave on request, for testing runners, checkpoints and the
 * daemon. Not registered by default: mc_engine_register_sink_type(e, mc_sink_fault_type())
 * (the daemon registers both when the environment variable MONGOCAST_TEST_SINKS=1 is set).
 * "fault" runs on a thread of its own and may block; "fault_async" runs on the engine's I/O
 * loop and acks from loop timers. Both are built on the public API only. Options:
 *   file: PATH            append each accepted event's §4.3 JSON message as one line, in the
 *                         order publish() accepted them (written before it is acked)
 *   control: false        also take ready/reset/invalidate (default: skipped)
 *   ack: sync             sync (in publish) | late (ack_delay_ms later) | reverse (held and
 *                         acked newest first at each flush, i.e. out of order)
 *   ack_delay_ms: 50      for ack: late
 *   delay_ms: 0           sleep this long in every publish (a slow destination)
 *   block_after: -1       when the change with this 0-based index arrives, block (fault: in
 *                         publish; fault_async: stop acking) for block_ms
 *   block_ms: -1          how long; -1 until the engine stops
 *   fail_first: 0         the first N publish attempts of changes fail (transient)
 *   fail_for_ms: 0        every publish attempt of a change fails (transient) until this long
 *                         after the first attempt
 *   permanent_field: ""   a change whose value at this dotted path is true fails permanently
 * Counters for tests: mc_sink_fault_attempts() (publish calls for changes) and
 * mc_sink_fault_accepted() (changes accepted); both return 0 for other sinks.
 */
const mc_sink_type_t *mc_sink_fault_type(void);
const mc_sink_type_t *mc_sink_fault_async_type(void);
uint64_t mc_sink_fault_attempts(mc_sink_t *sink);
uint64_t mc_sink_fault_accepted(mc_sink_t *sink);

#ifdef __cplusplus
}
#endif
#endif
