/*
 * mongocast/sink.h: the interface every destination of events implements.
 *
 * A sink type is a const vtable (mc_sink_type_t) with a name that configs refer to
 * (`type: stdout`). The engine creates one instance (mc_sink_t) per `sinks:` entry, or per
 * mc_engine_add_sink() call, and zero-allocates `ctx_size` bytes of private state for it
 * (mc_sink_ctx()). Built-in types: "stdout" and "memory"; embedders add their own with
 * mc_engine_register_sink_type() (see examples/embed_minimal.c).
 *
 * Threads and order:
 *   - init, start and destroy run on the thread that calls mc_engine_start() /
 *     mc_engine_destroy() (start failures are reported by mc_engine_start()); validate, or
 *     init and destroy on a scratch instance, on the thread that calls mc_engine_validate().
 *
 * Validation (`mongocast check`): mc_engine_validate() checks a sink's options without
 * running anything. It calls the type's validate() when the type has one; otherwise it calls
 * init() on a scratch instance and destroy() right after. So init() must either be free of
 * side effects outside its ctx (parse and store options, init locks) or have them fully
 * undone by destroy(); files are opened, connections made and workers spawned in start(). A
 * type that cannot keep init that cheap provides validate().
 *   - publish, flush and drain run on the engine's dispatch thread (one thread for all sinks;
 *     the consumer thread today, the daemon's libuv loop thread when it owns dispatching).
 *     Events of one stream reach publish() in sequence order; events of different streams
 *     may interleave. publish must not block for long: a sink whose work blocks (network
 *     round trips, disk) sets MC_SINK_BLOCKING and hands the work to its own thread.
 *   - mc_sink_ack() may be called from any thread, including from inside publish().
 *
 * Delivery and checkpoints: a sink type with MC_SINK_DURABLE must acknowledge every event it
 * accepted, once it is safely delivered; the stream's stored resume position advances only
 * to the newest event acknowledged by every durable sink of the stream (and published to all
 * its sinks). Non-durable sinks (stdout, WebSocket/SSE fan-out) count as done when publish()
 * returns. A durable sink that never acks holds back the stream: after a bounded number of
 * unacknowledged events the watcher stops reading (backpressure), it never drops events.
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

#define MC_SINK_ABI_VERSION 1

/* Flags of a sink type. */
#define MC_SINK_DURABLE 0x1u  /* acks gate the stored resume position (at-least-once) */
#define MC_SINK_BLOCKING 0x2u /* does blocking work on its own worker thread */

/* publish() return value (positive, so it is never mistaken for an error): the sink did not
 * take this event (e.g. a control event it ignores) and will not ack it. */
#define MC_SINK_SKIP 1

typedef struct mc_sink mc_sink_t;
typedef struct mc_engine mc_engine_t;

typedef struct mc_sink_type {
    uint32_t abi_version; /* MC_SINK_ABI_VERSION */
    const char *name;     /* type name used in configs; [a-z0-9_.-]+, unique per engine */
    uint32_t flags;       /* MC_SINK_DURABLE | MC_SINK_BLOCKING */
    size_t ctx_size;      /* bytes of zeroed private state per instance; may be 0 */

    /* Required. Checks and stores the instance's options (`options` is the BSON of every key
     * of the sink's config entry other than name/type/streams, an empty document when there
     * are none; borrowed: copy what you keep). On failure return MC_EINVAL/MC_ECONFIG and
     * fill err; destroy() is still called afterwards, on the partly initialised ctx. */
    int (*init)(mc_sink_t *sink, const bson_t *options, mc_error_t *err);

    /* Optional. Connects or spawns workers once every sink is initialised; an error makes
     * mc_engine_start() fail. */
    int (*start)(mc_sink_t *sink, mc_error_t *err);

    /* Required. Borrows `ev` (mc_event_ref() it to keep it). Returns:
     *   0            accepted (durable sinks ack it later, or now, with mc_sink_ack());
     *   MC_SINK_SKIP not taken, nothing to ack;
     *   MC_EAGAIN    full right now: the engine waits briefly and offers the same event again,
     *                which slows the stream down (backpressure) but never drops the event;
     *   other < 0    failed: logged; a durable sink's missing ack then holds the stream's
     *                stored position at this event (it is redelivered after a restart). */
    int (*publish)(mc_sink_t *sink, mc_event_t *ev);

    /* Optional. Called after each batch of publish() calls (write out buffered output). */
    void (*flush)(mc_sink_t *sink);

    /* Optional. Called during mc_engine_stop() after the last publish(): finish or give up
     * on pending work before the monotonic deadline `deadline_ms` (see mc_engine_now_ms()).
     * Return 0 when everything accepted was delivered (and acked), MC_EAGAIN on timeout. */
    int (*drain)(mc_sink_t *sink, int64_t deadline_ms);

    /* Optional. Frees what ctx holds (not ctx itself). Cannot fail. */
    void (*destroy)(mc_sink_t *sink);

    /* Optional (appended to ABI 1: initialisers that predate it leave it NULL). Checks
     * `options` exactly as init() would and reports the same errors, with no side effect at
     * all. Called by mc_engine_validate() on a scratch instance (zeroed ctx_size bytes, the
     * real name, streams and userdata) instead of init(); neither init() nor destroy() is
     * called for that instance, so validate must acquire nothing that destroy would free. */
    int (*validate)(mc_sink_t *sink, const bson_t *options, mc_error_t *err);
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
 * an event that is already below the stored position are ignored. Any thread.
 */
void mc_sink_ack(mc_sink_t *sink, const mc_event_t *ev);

/* The same by stream name and sequence number, for sinks that keep only those. Returns 0,
 * MC_ENOTFOUND for an unknown stream. */
int mc_sink_ack_seq(mc_sink_t *sink, const char *stream, uint64_t seq);

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
 * Type "stdout", not durable. One JSON line per event on standard output, buffered and
 * flushed after each batch. Options:
 *   raw: false    true prints the change document in canonical Extended JSON instead of the
 *                 message (control events other than invalidate are then not printed)
 *   ready: false  true also prints {"type":"ready",...} lines
 * Change, invalidate and reset messages are always printed (unless raw).
 */
const mc_sink_type_t *mc_sink_stdout_type(void);

#ifdef __cplusplus
}
#endif
#endif
