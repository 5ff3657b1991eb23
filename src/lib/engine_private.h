/*
 * engine_private.h: internal interfaces of the engine modules (queue, backoff, checkpoint,
 * token stores, event internals, watcher) and the engine's own structs.
 *
 * Sections are grouped by the thread that calls them. Cross-thread hand-off happens only in
 * the queue (watcher -> dispatch) and the checkpoint (dispatch/sinks -> checkpoint writer,
 * with back-pressure towards the watcher); everything else is owned by one thread.
 */
#ifndef MC_ENGINE_PRIVATE_H
#define MC_ENGINE_PRIVATE_H

#include <mongoc/mongoc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "mongocast/config.h"
#include "mongocast/engine.h"
#include "mongocast/error.h"
#include "mongocast/event.h"
#include "mongocast/log.h"
#include "mongocast/sink.h"

/* ---- Clock (any thread) ------------------------------------------------------------- */

int64_t mc__now_ms(void);      /* monotonic */
int64_t mc__wall_ms(void);     /* realtime, ms since epoch */
/* The CLOCK_MONOTONIC time `ms` (or `us`) from now, for pthread_cond_timedwait on the
 * library's condition variables (all created with CLOCK_MONOTONIC). A negative timeout gives
 * "now"; absurdly long ones are capped so the sum cannot overflow. */
void mc__deadline_after_ms(struct timespec *ts, int64_t ms);
void mc__deadline_after_us(struct timespec *ts, int64_t us);

/* ---- Event internals (watcher thread builds, then immutable) -------------------------- */

/* Which stream of its engine an event belongs to; set by the watcher before the event is
 * shared, -1 for events built outside an engine. */
void mc__event_set_stream_index(mc_event_t *ev, int index);
int mc__event_stream_index(const mc_event_t *ev);
/* True when the event was built with a recipient path (the message then has "recipient"). */
bool mc__event_recipient_configured(const mc_event_t *ev);

/* Renders the §4.3 message, the ENTERED and LEFT messages of mc_event_json_view(), the raw
 * change; called once by the caching accessors. The returned string is bson_malloc'ed. */
char *mc__event_render_json(const mc_event_t *ev, size_t *len);
char *mc__event_render_entered(const mc_event_t *ev, size_t *len);
char *mc__event_render_left(const mc_event_t *ev, size_t *len);
char *mc__event_render_raw(const mc_event_t *ev, size_t *len);
/* The recipient's JSON text and length (NULL when none), for the renderers. */
const char *mc__event_recipient_json(const mc_event_t *ev, size_t *len);

/* ---- Routing: who an event is for (watcher thread, before the event is shared) ---------- */

/* What a recipient path designates in one version of the document. */
typedef enum mc__vstate {
    MC__V_ABSENT = 0,     /* the event carries no such version (no pre-image) */
    MC__V_MISSING = 1,    /* the version is there, the path holds nothing */
    MC__V_FOUND = 2,      /* the path holds a value (any type) */
    MC__V_UNRESOLVED = 3, /* the version this write left is needed but not in the event */
} mc__vstate_t;

/* The values `path` designates after the write (*post) and before it (*prev, update and
 * replace only) under the rules of mc_event_new_change(). The iterators are valid when their
 * state is MC__V_FOUND and point into `change`. */
void mc__recipient_values(const bson_t *change, const char *path, bson_iter_t *post,
                          mc__vstate_t *post_st, bson_iter_t *prev, mc__vstate_t *prev_st);

/* A decided recipient. */
typedef enum mc__rstate {
    MC__R_NONE = 0,       /* owned by nobody (no value, or a value that is not an identity) */
    MC__R_KNOWN = 1,      /* the identity in the matching mc_identity_t */
    MC__R_UNRESOLVED = 2, /* could not be decided exactly: admins only, counted */
    MC__R_ABSENT = 3,     /* prev only: the event carries no previous version */
} mc__rstate_t;

typedef struct mc__routing {
    mc__rstate_t post, prev;
    mc_identity_t post_id, prev_id;
} mc__routing_t;

/* Sets the routing of an event built without a recipient path (the lookup form): the
 * recipient, the previous recipient, and the reduced change for a new owner when the write
 * moved the document. Only on the watcher thread that built the event, before it is shared.
 * On MC_ENOMEM the event is left unresolved (admins only). */
int mc__event_set_routing(mc_event_t *ev, const mc__routing_t *r);
/* The same for a path read from the event itself (a by_collection rule without a lookup);
 * *post_value (may be NULL) receives what the path held after the write. */
int mc__event_route_by_path(mc_event_t *ev, const char *path, mc__vstate_t *post_value);

/* The cluster time at the head of a resume token's _data (MongoDB's and the emulator's
 * KeyString layout); 0, 0 when the token is opaque (watcher.c). */
void mc__token_cluster_time(const bson_t *token, uint32_t *t, uint32_t *i);

/* The state of an event's recipient (MC__R_NONE for events of streams without one). */
mc__rstate_t mc__event_recipient_state(const mc_event_t *ev);

/* ---- Bounded MPSC queue (push: watcher threads; pop: dispatch thread) ----------------- */

typedef struct mc__queue mc__queue_t;
typedef void (*mc__queue_notify_fn)(void *userdata);

/* capacity >= 1. Returns NULL on allocation failure. */
mc__queue_t *mc__queue_new(size_t capacity);
/* Frees the queue; `free_item` (may be NULL) is called on every item still queued. */
void mc__queue_destroy(mc__queue_t *q, void (*free_item)(void *item));
/* Called (outside the lock) by the push that makes the queue non-empty. Set before use. */
void mc__queue_set_notify(mc__queue_t *q, mc__queue_notify_fn fn, void *userdata);
/* Blocks while full, up to timeout_ms (< 0: forever). 0, MC_EAGAIN (timed out, item not
 * queued), MC_ECLOSED (closed; item not queued). Never drops. */
int mc__queue_push(mc__queue_t *q, void *item, int64_t timeout_ms);
/* Pops up to `max` items into `items` (FIFO), waiting up to timeout_ms for the first one
 * (0: no wait; < 0: forever). Returns the count; 0 with *closed set once closed and empty. */
size_t mc__queue_pop(mc__queue_t *q, void **items, size_t max, int64_t timeout_ms,
                     bool *closed);
/* The consumer thread's pop: takes what is queued; when nothing is, lingers up to linger_us
 * (pushes do not wake it until a batch has built up), then waits without limit for the
 * next push, which wakes it at once. Returns 0 only once closed and empty (*closed set). */
size_t mc__queue_pop_batch(mc__queue_t *q, void **items, size_t max, int64_t linger_us,
                           bool *closed);
/* After close, pushes fail with MC_ECLOSED and waiting pushers wake; pops still drain. */
void mc__queue_close(mc__queue_t *q);
size_t mc__queue_len(mc__queue_t *q);
size_t mc__queue_capacity(const mc__queue_t *q);

/* ---- Backoff (owned by one thread) ---------------------------------------------------- */

typedef struct mc__backoff {
    uint32_t initial_ms; /* ceiling of the first delay */
    uint32_t max_ms;     /* cap of the ceiling */
    uint32_t attempt;    /* delays handed out since the last reset */
    uint64_t rng;        /* xorshift64* state, never 0 */
} mc__backoff_t;

void mc__backoff_init(mc__backoff_t *b, uint32_t initial_ms, uint32_t max_ms, uint64_t seed);
/* The ceiling for the current attempt: min(max_ms, initial_ms * 2^attempt). */
uint32_t mc__backoff_ceiling(const mc__backoff_t *b);
/* Full jitter: uniform in [0, ceiling], then attempt++. */
uint32_t mc__backoff_next(mc__backoff_t *b);
void mc__backoff_reset(mc__backoff_t *b);

/* ---- Checkpoint: low-watermark of acks per stream -------------------------------------
 * add/published: dispatch thread; ack: any thread; reserve: watcher thread; take_dirty:
 * checkpoint thread. All calls lock the checkpoint's mutex. */

typedef struct mc__checkpoint mc__checkpoint_t;

/* A stored/stable resume position. */
typedef struct mc__position {
    bson_t *token;        /* the resume token document ({_data: ...}); NULL = none */
    bool invalidate;      /* token is an invalidate's: restart with startAfter */
    uint32_t ct_t, ct_i;  /* clusterTime of the event, 0 when unknown */
    uint64_t seq;         /* newest event seq covered by this position (0: none) */
} mc__position_t;

void mc__position_clear(mc__position_t *p);
void mc__position_copy(mc__position_t *dst, const mc__position_t *src);

/* capacity: maximum of reserved-but-not-yet-stable events (back-pressure bound). */
mc__checkpoint_t *mc__checkpoint_new(uint32_t capacity);
void mc__checkpoint_destroy(mc__checkpoint_t *cp);
/* Sets the position loaded from the token store (not dirty). */
void mc__checkpoint_set_initial(mc__checkpoint_t *cp, const mc__position_t *pos);
/* Watcher: waits until fewer than `capacity` events are pending, then reserves a slot.
 * 0, MC_EAGAIN (timeout), MC_ECLOSED. */
int mc__checkpoint_reserve(mc__checkpoint_t *cp, int64_t timeout_ms);
/* Dispatch: registers event `seq` (must be last seq + 1, or the first) with its token
 * (copied, may be NULL) before it is published; `required` is the bitmask of durable sinks
 * that must ack it. MC_EINVAL for an out-of-order seq or a full ring (a reserve was missed). */
int mc__checkpoint_add(mc__checkpoint_t *cp, uint64_t seq, const bson_t *token, bool invalidate,
                       uint32_t ct_t, uint32_t ct_i, uint64_t required);
/* Dispatch: every sink has been offered event `seq`. */
void mc__checkpoint_published(mc__checkpoint_t *cp, uint64_t seq);
/* The same for every registered seq in [first, last], under one lock. */
void mc__checkpoint_published_range(mc__checkpoint_t *cp, uint64_t first, uint64_t last);
/* Any thread: durable sink number `bit` acked `seq`. Ignores unknown/old seqs and repeats. */
void mc__checkpoint_ack(mc__checkpoint_t *cp, uint64_t seq, int bit);
/* Dispatch: a newer position without an event (post-batch resume token of a quiet stream);
 * becomes stable once every event before it is. */
void mc__checkpoint_position(mc__checkpoint_t *cp, const bson_t *token, bool invalidate,
                             uint32_t ct_t, uint32_t ct_i);
/* Checkpoint thread: if the stable position changed since the last take, copies it into
 * *out (caller clears it with mc__position_clear) and returns true. */
bool mc__checkpoint_take_dirty(mc__checkpoint_t *cp, mc__position_t *out);
/* Marks the stable position dirty again (a write failed). */
void mc__checkpoint_set_dirty(mc__checkpoint_t *cp);
/* Copies the stable position (caller clears it). */
void mc__checkpoint_stable(mc__checkpoint_t *cp, mc__position_t *out);
/* Number of events registered but not yet stable. */
uint32_t mc__checkpoint_pending(mc__checkpoint_t *cp);
/* Waits up to timeout_ms until no event is pending. 0 or MC_EAGAIN. */
int mc__checkpoint_wait_idle(mc__checkpoint_t *cp, int64_t timeout_ms);
/* Wakes and fails every waiting reserve with MC_ECLOSED, now and later. */
void mc__checkpoint_close(mc__checkpoint_t *cp);

/* ---- Token stores (blocking: watcher threads load, checkpoint thread saves) ---------- */

typedef struct mc__token_store mc__token_store_t;

typedef struct mc__token_store_vtable {
    const char *name;
    /* Fills *out; MC_ENOTFOUND when nothing is stored for the stream. */
    int (*load)(mc__token_store_t *store, const char *stream, mc__position_t *out,
                mc_error_t *err);
    int (*save)(mc__token_store_t *store, const char *stream, const mc__position_t *pos,
                mc_error_t *err);
    void (*destroy)(mc__token_store_t *store);
} mc__token_store_vtable_t;

struct mc__token_store {
    const mc__token_store_vtable_t *vt;
};

/* Directory store: <dir>/<stream>.json per stream. Creates the directory if missing. */
mc__token_store_t *mc__token_store_file_new(const char *dir, mc_error_t *err);
/* MongoDB store: upserts {_id: stream, token, clusterTime, invalidate, updatedAt}. The pool
 * is borrowed. */
mc__token_store_t *mc__token_store_mongo_new(mongoc_client_pool_t *pool, const char *db,
                                             const char *coll, mc_error_t *err);
int mc__token_store_load(mc__token_store_t *s, const char *stream, mc__position_t *out,
                         mc_error_t *err);
int mc__token_store_save(mc__token_store_t *s, const char *stream, const mc__position_t *pos,
                         mc_error_t *err);
void mc__token_store_destroy(mc__token_store_t *s);
/* The file name used for a stream: bytes outside [A-Za-z0-9_.-] are %XX-escaped and a
 * leading '.' too, so a stream name can never escape the directory. bson_malloc'ed. */
char *mc__token_store_file_name(const char *stream);

/* ---- Engine structs (shared by engine.c, watcher.c, sink.c) --------------------------- */

#define MC__MAX_SINKS_PER_STREAM 64 /* acks are tracked in a 64-bit mask */

/* What flows through the queue. */
typedef enum mc__item_type {
    MC__ITEM_EVENT = 0,    /* ev holds a reference */
    MC__ITEM_POSITION = 1, /* a newer resume position without an event */
} mc__item_type_t;

typedef struct mc__item {
    mc__item_type_t type;
    int stream_index;
    bool embedded;        /* lives inside ev (mc__event_item()): freed with the event */
    mc_event_t *ev;       /* EVENT: holds the queue's reference */
    bson_t *token;        /* POSITION (owned) */
    bool invalidate;      /* POSITION: token is an invalidate's */
    uint32_t ct_t, ct_i;  /* POSITION: clusterTime when known */
} mc__item_t;

/* Drops the item's event reference and frees a POSITION item. */
void mc__item_free(void *item);

/* The queue item embedded in every event, so pushing an event allocates nothing. An event
 * is pushed at most once (by the watcher that built it), so the one slot is enough. */
mc__item_t *mc__event_item(mc_event_t *ev);

struct mc_sink {
    const mc_sink_type_t *type;  /* resolved by mc_engine_start() for config sinks */
    const mc_sink_config_t *cfg; /* the config entry, or NULL for mc_engine_add_sink() */
    char *name;
    mc_engine_t *engine;
    void *ctx;
    void *userdata;
    bson_t *options;
    bool *takes_stream;      /* [n_streams] */
    int *bit;                /* [n_streams]: bit in the stream's durable mask, -1 if none */
    bool init_called;        /* init() ran, so destroy() is owed whatever it returned */
    bool initialised;        /* init() succeeded */
    bool started;
    /* mc_engine_sink_stats() counters: written by the dispatch thread alone (load + store,
     * no read-modify-write needed), read by any thread. */
    _Atomic uint64_t stat_published;
    _Atomic uint64_t stat_skipped;
    _Atomic uint64_t stat_failed;
    _Atomic uint64_t stat_retries;
};

typedef struct mc__stream {
    mc_engine_t *engine;
    int index;
    const mc_stream_config_t *cfg;
    bson_t server_pipeline;  /* stages sent to MongoDB */
    pthread_t thread;
    bool thread_started;
    mc__checkpoint_t *checkpoint;
    mc_sink_t **sinks;       /* the sinks taking this stream, in config order */
    size_t n_sinks;
    uint64_t durable_mask;   /* bits of the durable sinks among them */
    uint64_t next_seq;       /* watcher thread only */

    /* Ad hoc start options (tail): used only when no stored position exists. */
    bson_t *start_token;     /* resumeAfter */
    int64_t start_at_secs;   /* startAtOperationTime */

    pthread_mutex_t lock;    /* guards status */
    mc_stream_status_t status;
    /* Per-event status fields, written by the watcher alone without the lock and merged
     * into the snapshot by mc_engine_stream_status() (status.events etc. stay 0). */
    _Atomic uint64_t stat_events;
    _Atomic uint64_t stat_last_seq;
    _Atomic int64_t stat_last_event_ms;
    /* Token-store writes, written by whichever thread runs write_positions() (the checkpoint
     * thread, then mc_engine_stop() after joining it: one writer at a time). */
    _Atomic int64_t stat_cp_written_ms;
    _Atomic int64_t stat_cp_event_ms;
    _Atomic uint64_t stat_cp_seq;
    _Atomic uint64_t stat_cp_failures;
} mc__stream_t;

typedef enum mc__engine_state {
    MC__ENGINE_NEW = 0,
    MC__ENGINE_RUNNING,
    MC__ENGINE_STOPPED,
    MC__ENGINE_FAILED, /* start failed */
} mc__engine_state_t;

#define MC__MAX_SINK_TYPES 64

struct mc_engine {
    const mc_config_t *config;
    mc_config_t *owned_config; /* ad hoc engines: built in engine.c, freed there */
    mc_engine_opts_t opts;
    mc__engine_state_t state;

    const mc_sink_type_t *types[MC__MAX_SINK_TYPES];
    size_t n_types;

    mc_sink_t **sinks;
    size_t n_sinks;

    mc__stream_t *streams;
    size_t n_streams;

    mongoc_uri_t *uri;
    mongoc_client_pool_t *pool;
    mc__token_store_t *store;
    mc__queue_t *queue;

    atomic_bool stopping;      /* watchers: leave as soon as possible */
    _Atomic int64_t stop_started_ms; /* monotonic; bounds EAGAIN retries while stopping */
    pthread_mutex_t stop_lock; /* with stop_cond: interruptible sleeps */
    pthread_cond_t stop_cond;

    pthread_t consumer;
    bool consumer_started;
    pthread_t checkpointer;
    bool checkpointer_started;
    atomic_bool checkpoint_quit;
    pthread_mutex_t cp_lock;   /* with cp_cond: wakes the checkpoint thread early */
    pthread_cond_t cp_cond;
};

/* Watcher thread entry; arg is an mc__stream_t *. */
void *mc__watcher_main(void *arg);

/* Sleeps up to ms unless the engine is stopping. Returns true when stopping. */
bool mc__engine_sleep(mc_engine_t *engine, int64_t ms);

/* Updates a stream's status (any thread) and calls on_state when the state changes. */
void mc__stream_set_state(mc__stream_t *s, mc_stream_state_t state, int server_code,
                          const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Built-in sink types (sinks/). */
extern const mc_sink_type_t mc__sink_stdout_type;
extern const mc_sink_type_t mc__sink_memory_type;

#endif
