/*
 * engine_private.h: internal interfaces of the engine modules (router, sink runners and
 * their executors, ledger, token stores, backoff, event internals, watcher) and the engine's
 * own structs.
 *
 * Sections are grouped by the thread that calls them. Cross-thread hand-off happens in the
 * runners' queues (watcher or catch-up thread -> executor; acks from any thread), in the
 * router's per-stream lock (watcher vs. a catch-up thread rejoining) and in the ledger
 * (runners -> checkpoint writer); everything else is owned by one thread.
 * Lock order: stream route_lock -> runner lock -> (nothing). No lock is held while a sink
 * callback runs.
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
#include "sinks/delivery.h"

/* ---- Clock (any thread) ------------------------------------------------------------- */

int64_t mc__now_ms(void);      /* monotonic */
int64_t mc__wall_ms(void);     /* realtime, ms since epoch */
/* The CLOCK_MONOTONIC time `ms` (or `us`) from now, for pthread_cond_timedwait on the
 * library's condition variables (all created with CLOCK_MONOTONIC). A negative timeout gives
 * "now"; absurdly long ones are capped so the sum cannot overflow. */
void mc__deadline_after_ms(struct timespec *ts, int64_t ms);
void mc__deadline_after_us(struct timespec *ts, int64_t us);
/* Names the calling thread "<prefix><name>" (15 characters at most), e.g. "mcsink:out". */
void mc__thread_name(const char *prefix, const char *name);

/* FNV-1a, 64 bits: hash-table keys and stable fingerprints (not a defence against chosen
 * input). Any thread. */
static inline uint64_t mc__fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ---- Event internals (watcher thread builds, then immutable) -------------------------- */

/* Which stream of its engine an event belongs to; set by the watcher before the event is
 * shared, -1 for events built outside an engine. */
void mc__event_set_stream_index(mc_event_t *ev, int index);
int mc__event_stream_index(const mc_event_t *ev);
/* Marks a change event built from what the watcher could learn of an event too large for
 * MongoDB to return (on_oversize: skip): it renders as an `oversize` notice (event_json.c).
 * `size`: the size MongoDB reported or the fragments added up (0: unknown). Before the event
 * is shared. */
void mc__event_set_server_oversize(mc_event_t *ev, size_t size);
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

/* The state of an event's recipient (MC__R_NONE for events of streams without one). */
mc__rstate_t mc__event_recipient_state(const mc_event_t *ev);

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

/* ---- Positions and marks (any thread) --------------------------------------------------- */

/* A stored/stable resume position (a copy; owned by whoever holds the struct). */
typedef struct mc__position {
    bson_t *token;        /* the resume token document ({_data: ...}); NULL = none */
    bool invalidate;      /* token is an invalidate's: restart with startAfter */
    uint32_t ct_t, ct_i;  /* clusterTime of the event, 0 when unknown */
    uint64_t seq;         /* newest event seq covered by this position (0: none / unknown) */
} mc__position_t;

void mc__position_clear(mc__position_t *p);
void mc__position_copy(mc__position_t *dst, const mc__position_t *src);

/* The clusterTime a resume token starts with (KeyString "82" + 8 hex secs + 8 hex inc, as
 * MongoDB's and the emulator's tokens do); false and 0, 0 when the token is opaque. */
bool mc__token_cluster_time(const bson_t *token, uint32_t *t, uint32_t *i);
/* The token's `_data` string, or NULL. */
const char *mc__token_data(const bson_t *token);
/* Order of two resume tokens of one stream by their `_data` (KeyString hex compares in oplog
 * order; a post-batch high-water mark sorts after every event it covers). */
int mc__token_data_cmp(const char *a, const char *b);

/* A position without an event (a post-batch token, a loaded checkpoint), refcounted so that
 * every runner of a stream can hold it like an event. Immutable after mc__mark_new(). */
typedef struct mc__mark {
    atomic_int refs;
    int stream_index;
    bson_t *token;        /* owned, never NULL */
    const char *data;     /* the token's _data, or NULL */
    bool invalidate;
    uint32_t ct_t, ct_i;
    uint64_t seq;         /* seq of the newest event routed before it (0: none) */
} mc__mark_t;

mc__mark_t *mc__mark_new(int stream_index, const bson_t *token, bool invalidate, uint64_t seq);
mc__mark_t *mc__mark_from_position(int stream_index, const mc__position_t *pos);
mc__mark_t *mc__mark_ref(mc__mark_t *m);
void mc__mark_unref(mc__mark_t **m);

/* What a runner's queue entry or a position holds: an event or a mark (one reference). */
typedef struct mc__pref {
    mc_event_t *ev;
    mc__mark_t *mark;
} mc__pref_t;

const char *mc__pref_data(const mc__pref_t *p);
bool mc__pref_empty(const mc__pref_t *p);
/* Drops the reference; the pref becomes empty. */
void mc__pref_clear(mc__pref_t *p);
/* Replaces *dst by `src` (its reference is taken). */
void mc__pref_move(mc__pref_t *dst, mc__pref_t *src);
/* dst = a new reference to what src holds. */
void mc__pref_copy(mc__pref_t *dst, const mc__pref_t *src);
/* Fills *out with a copy of the position (token NULL when empty or a tokenless event). */
void mc__pref_position(const mc__pref_t *p, mc__position_t *out);

/* ---- Token stores (blocking: watcher threads load, the checkpoint thread saves) -------- */

typedef struct mc__token_store mc__token_store_t;

/* One stored record: the position of a stream (sink NULL) or of one sink for a stream, with
 * the stream definition that wrote it (NULL when the record predates definitions). */
typedef struct mc__record {
    mc__position_t pos;
    bson_t *definition; /* {ns, fingerprint, options}; owned */
    char where[300];    /* the file or document, for messages ("dir/s.json") */
} mc__record_t;

void mc__record_clear(mc__record_t *r);

typedef struct mc__token_store_vtable {
    const char *name;
    /* Fills *out; MC_ENOTFOUND when nothing is stored (out->where is still set). */
    int (*load)(mc__token_store_t *store, const char *stream, const char *sink,
                mc__record_t *out, mc_error_t *err);
    int (*save)(mc__token_store_t *store, const char *stream, const char *sink,
                const mc__position_t *pos, const bson_t *definition, mc_error_t *err);
    void (*destroy)(mc__token_store_t *store);
} mc__token_store_vtable_t;

struct mc__token_store {
    const mc__token_store_vtable_t *vt;
};

/* Directory store: <dir>/<stream>.json per stream and <dir>/<stream>@<sink>.json per sink of
 * a stream. Creates the directory if missing. */
mc__token_store_t *mc__token_store_file_new(const char *dir, mc_error_t *err);
/* MongoDB store: {_id: stream, ...} per stream and {_id: {stream, sink}, ...} per sink, each
 * with token, clusterTime, invalidate, definition and updatedAt. The pool is borrowed. */
mc__token_store_t *mc__token_store_mongo_new(mongoc_client_pool_t *pool, const char *db,
                                             const char *coll, mc_error_t *err);
int mc__token_store_load(mc__token_store_t *s, const char *stream, const char *sink,
                         mc__record_t *out, mc_error_t *err);
int mc__token_store_save(mc__token_store_t *s, const char *stream, const char *sink,
                         const mc__position_t *pos, const bson_t *definition, mc_error_t *err);
void mc__token_store_destroy(mc__token_store_t *s);
/* The file name used for a stream (sink NULL) or a (stream, sink) pair: bytes outside
 * [A-Za-z0-9_.-] are %XX-escaped and a leading '.' too, so a name can never escape the
 * directory, and the '@' between stream and sink is never part of either. bson_malloc'ed. */
char *mc__token_store_file_name(const char *stream, const char *sink);
/* Reads the shared record fields (token, clusterTime, invalidate, definition) from a stored
 * document into *out. MC_EIO with a message naming `where` when the token is missing. */
int mc__record_from_bson(const bson_t *doc, const char *where, mc__record_t *out,
                         mc_error_t *err);
/* Appends the shared record fields to `doc`. */
void mc__record_append(bson_t *doc, const mc__position_t *pos, const bson_t *definition);

/* ---- Dead letter (a runner's executor thread) ------------------------------------------- */

typedef struct mc__dead_letter mc__dead_letter_t;

/* Opens (creating, appending) the file. NULL and err on failure. */
mc__dead_letter_t *mc__dead_letter_open(const char *path, mc_error_t *err);
/* Appends {"sink","stream","id","error","attempts","at","message"} as one line and fsyncs it.
 * 0 or MC_EIO. */
int mc__dead_letter_write(mc__dead_letter_t *dl, const char *sink, mc_event_t *ev,
                          const char *error, uint32_t attempts, mc_error_t *err);
void mc__dead_letter_close(mc__dead_letter_t *dl);
/* The collection form (`dead_letter: {db, collection, uri}`): the same record as a document
 * (message as a sub-document, at as a date, _id "<sink>/<event id>" so a replay is a duplicate
 * and counts as written), inserted with w: majority. Connects lazily (on the first write). */
mc__dead_letter_t *mc__dead_letter_open_mongo(const char *uri, const char *db,
                                              const char *collection, mc_error_t *err);

/* ---- Engine structs (shared by engine.c, watcher.c, router.c, sink_runner.c, ...) --------- */

#define MC__MAX_SINKS_PER_STREAM 64 /* routes per stream (each event is one ref per route) */

typedef struct mc__runner mc__runner_t;

struct mc_sink {
    const mc_sink_type_t *type;  /* resolved by mc_engine_start() for config sinks */
    const mc_sink_config_t *cfg; /* the config entry, or NULL for mc_engine_add_sink() */
    char *name;
    mc_engine_t *engine;
    void *ctx;
    void *userdata;
    bson_t *options;
    bool *takes_stream;      /* [n_streams] */
    bool init_called;        /* init() ran, so destroy() is owed whatever it returned */
    bool initialised;        /* init() succeeded */
    bool started;
    mc_sink_runner_opts_t ropts; /* resolved runner settings (strings point into cfg or
                                    ropts_dead_letter) */
    char *ropts_dead_letter;     /* owned copy for mc_engine_set_sink_runner_opts() */
    mc__runner_t *runner;        /* from mc_engine_start() on */
    /* mc_engine_sink_stats() counters: written by the sink's executor thread alone (load +
     * store, no read-modify-write needed), read by any thread. */
    _Atomic uint64_t stat_published;
    _Atomic uint64_t stat_skipped;
    _Atomic uint64_t stat_failed;
    _Atomic uint64_t stat_retries;
    _Atomic uint64_t stat_dead_letters;
    _Atomic uint64_t stat_detaches;
    mc__delivery_t delivery; /* webhook / mongodb request metrics (sinks/delivery.h) */
    _Atomic uint64_t stat_acked; /* any thread (acks): fetch_add */
    /* initial: snapshot (initial_copy.c): documents queued by this run's copies, copies not
     * finished yet, and whether the sink has (had) a copy at all. Any thread. */
    _Atomic uint64_t stat_copy_docs;
    _Atomic int copies_pending;
    _Atomic bool copy_seen;
};

/* One (stream, runner) edge of the router. Guarded by the stream's route_lock. */
typedef struct mc__route {
    mc__runner_t *runner;
    int slot;           /* the stream's index among the runner's streams */
    bool attached;      /* the shared path hands this runner the stream's items */
    char *skip_until;   /* _data: items up to it are skipped (the runner already has them:
                           its stored position at start, its catch-up's end at a rejoin) */
    bool copy;          /* an initial copy (initial_copy.c) feeds this runner first: the
                           stream's start position is not its own */
} mc__route_t;

typedef struct mc__stream {
    mc_engine_t *engine;
    int index;
    const mc_stream_config_t *cfg;
    bson_t server_pipeline;  /* stages sent to MongoDB */
    bson_t *definition;      /* {ns, fingerprint, options}: stored with every checkpoint */
    pthread_t thread;
    bool thread_started;
    mc_sink_t **sinks;       /* the sinks taking this stream, in config order */
    size_t n_sinks;
    uint64_t next_seq;       /* watcher thread only */

    /* Router state (router.c), guarded by route_lock. */
    pthread_mutex_t route_lock;
    mc__route_t *routes;     /* [n_sinks], same order as sinks */
    char *head;              /* _data of the newest item routed; "" before any */
    size_t head_cap;
    mc__pref_t routed;       /* the newest item with a token routed (position of a stream
                                without sinks) */
    mc__pref_t final;        /* the stream's error event once it failed, for the runners that
                                were detached then and rejoin later */

    /* Ledger (ledger.c): written by the checkpoint thread (and by stop after joining it). */
    mc__position_t written;  /* the stream record last stored */
    mc__position_t *sink_written; /* [n_sinks]: each sink's record last stored (or loaded) */

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
    /* Token-store writes, written by whichever thread runs the ledger writes (the checkpoint
     * thread, then mc_engine_stop() after joining it: one writer at a time). */
    _Atomic int64_t stat_cp_written_ms;
    _Atomic int64_t stat_cp_event_ms;
    _Atomic uint64_t stat_cp_seq;
    _Atomic uint64_t stat_cp_failures;

    /* Lease (lease.c; config lease.enabled): whether this node may feed the stream's sinks
     * other than the live fan-out. `leased` is fixed at start (a lease is kept for the stream:
     * it has such sinks); lease_until is the monotonic time (mc__now_ms) until which this
     * node may publish to them and store their positions, written by the lease thread, read
     * by the runners' executors and the checkpoint thread; lease_epoch is the fencing epoch
     * of the lease this node holds (or last held), 0 before any. */
    bool leased;
    _Atomic int64_t lease_until;
    _Atomic uint64_t lease_epoch;
} mc__stream_t;

/* Whether this node may feed stream `s`'s leased sinks at monotonic time `now` (always true
 * for a stream without a lease). Any thread. */
static inline bool mc__stream_may_feed(mc__stream_t *s, int64_t now)
{
    return !s->leased || now < atomic_load_explicit(&s->lease_until, memory_order_acquire);
}

typedef enum mc__engine_state {
    MC__ENGINE_NEW = 0,
    MC__ENGINE_RUNNING,
    MC__ENGINE_STOPPED,
    MC__ENGINE_FAILED, /* start failed */
} mc__engine_state_t;

#define MC__MAX_SINK_TYPES 64

typedef struct mc__ioloop mc__ioloop_t;

struct mc_engine {
    const mc_config_t *config;
    mc_config_t *owned_config; /* ad hoc engines: built in engine.c, freed there */
    mc_engine_opts_t opts;
    /* Written by the thread that starts and stops the engine; read by the embedder's dispatch
     * thread too (mc_engine_dispatch() during a stop): atomic. */
    _Atomic mc__engine_state_t state;

    const mc_sink_type_t *types[MC__MAX_SINK_TYPES];
    size_t n_types;

    mc_sink_t **sinks;
    size_t n_sinks;

    mc__stream_t *streams;
    size_t n_streams;

    mongoc_uri_t *uri;
    mongoc_client_pool_t *pool;
    mc__token_store_t *store;
    mc__ioloop_t *ioloop;      /* NULL unless some sink is MC_SINK_ASYNC */

    atomic_bool stopping;      /* watchers, catch-ups, retries: leave as soon as possible */
    _Atomic int64_t stop_started_ms;
    pthread_mutex_t stop_lock; /* with stop_cond: interruptible sleeps */
    pthread_cond_t stop_cond;

    /* Catch-up threads (detached threads; stop waits until none is left). */
    pthread_mutex_t catchup_lock;
    pthread_cond_t catchup_cond;
    int catchups;

    /* External dispatch: the thread that last called mc_engine_dispatch(), so that stop
     * knows whether it runs there. */
    _Atomic bool dispatch_seen;
    pthread_t dispatch_thread;
    _Atomic int64_t dispatch_last_ms;

    struct mc__lease *lease; /* lease.c; NULL unless lease.enabled and some stream needs one */

    pthread_t checkpointer;
    bool checkpointer_started;
    atomic_bool checkpoint_quit;
    pthread_mutex_t cp_lock;   /* with cp_cond: wakes the checkpoint thread early */
    pthread_cond_t cp_cond;
};

/* ---- Watcher and catch-up threads (watcher.c) ------------------------------------------- */

/* Watcher thread entry; arg is an mc__stream_t *. */
void *mc__watcher_main(void *arg);

/* Starts `fn(arg)` on a detached thread (a catch-up, a sink's initial copy). Returns
 * pthread_create()'s result: 0, or an errno value when nothing was started. Any thread. */
int mc__thread_start_detached(void *(*fn)(void *), void *arg);

/* Starts a detached catch-up thread that reads stream `s` for runner `r` (its stream slot
 * `slot`) from `from` (taken; an empty pref: from the stream's start) until it can rejoin the
 * shared path. Counted in engine->catchups. Returns 0 or MC_ENOMEM (nothing started; the
 * caller fails the runner). */
int mc__catchup_spawn(mc__stream_t *s, mc__runner_t *r, int slot, mc__pref_t *from);

/* The same from a cluster time instead of a position: startAtOperationTime (t, i) until the
 * first position is read (a sink's initial copy hands over to the stream this way). */
int mc__catchup_spawn_at(mc__stream_t *s, mc__runner_t *r, int slot, uint32_t t, uint32_t i);

/* ---- Initial snapshot of a sink (initial_copy.c) ---------------------------------------- */

/* Whether a resume token's `_data` is a copy position: the progress of a sink's initial
 * snapshot (docs/config.md, "Initial snapshot"), never sent to MongoDB. Any thread. */
bool mc__copy_token(const char *data);
/* A copy position, parsed (docs/config.md, "Initial snapshot", Ids). */
typedef struct mc__copy_position {
    uint32_t start_t, start_i; /* T: the changes continue after it */
    uint64_t number;           /* the document's number in the copy, from 1 */
    bool done;                 /* the "copied" position: no document, no read time */
    uint32_t read_t, read_i;   /* R: the time the document was read at */
    bson_t *id_doc;            /* {_id: <the document's _id>} (owned; NULL when done) */
} mc__copy_position_t;
#define MC__COPY_MAX_ID_BYTES 2048 /* a larger {_id} cannot make a copy position */
/* 0, or MC_EINVAL with the reason (not a copy position, malformed). Any thread. */
int mc__copy_position_parse(const char *data, mc__copy_position_t *out, mc_error_t *err);
/* The `_data` (bson_malloc'ed), or NULL when id_doc is larger than MC__COPY_MAX_ID_BYTES. */
char *mc__copy_position_format(const mc__copy_position_t *p);
void mc__copy_position_clear(mc__copy_position_t *p);
/* Where the changes after a finished copy start: true and T + 1 in (*t, *i) when `data` is a
 * "copied" position (a sink detached right after its copy catches up from there). */
bool mc__copy_changes_start(const char *data, uint32_t *t, uint32_t *i);
/* Watcher thread, in mc__ledger_load() with the route lock held, before anything is routed:
 * decides whether route k starts with an initial copy (its sink has initial: snapshot and
 * `own`, its stored record, is NULL) or resumes one (`own` is a copy position). Then the
 * route is detached, its runner slot waits for the copy, and true is returned. */
bool mc__copy_plan(mc__stream_t *s, size_t k, const mc__position_t *own);
/* Watcher thread, after the route lock is released: starts the copies planned. */
void mc__copy_start_planned(mc__stream_t *s);
/* Ends `cursor` (0: none) on the stream's collection, left open by a snapshot read that stopped
 * early, with the read's `opts` (its session); the reply is ignored. Also the daemon's
 * `?snapshot=true` reads' (snapshot.c). Any thread, on the caller's client. */
void mc__kill_cursor(mongoc_client_t *client, const mc_stream_config_t *cfg, const bson_t *opts,
                     int64_t cursor);
/* What a cursor reply (find, aggregate, getMore) says: cursor.id, the array cursor.<which>
 * (docs, when have_docs), and cursor.atClusterTime (at_t, at_i, when have_time; MongoDB leaves
 * it out of an empty find's reply, SERVER-83472). Also the daemon's snapshot reads'. */
typedef struct mc__cursor_reply {
    int64_t id;
    bool have_docs;
    bson_iter_t docs;
    bool have_time;
    uint32_t at_t, at_i;
} mc__cursor_reply_t;
/* Fills *out (zeroed first); false when the reply has no cursor document. Any thread. */
bool mc__cursor_reply_parse(const bson_t *reply, const char *which, mc__cursor_reply_t *out);

/* A replay: the daemon's catch-up of one client that resumes after an id the server's history
 * no longer holds. The callbacks run on the replaying thread (a daemon worker). */
typedef struct mc__replay {
    const atomic_bool *cancel;  /* the reader stops soon after this turns true */
    mongoc_client_pool_t *pool; /* the cursors' and the lookups' clients (the caller's; not
                                   used on an edge stream, which reads JetStream) */
    /* Each change or invalidate event after the id, in stream order, built and routed exactly
     * as the watcher builds and routes it (recipient as of the write, lookups as of the
     * event's cluster time, summaries, split or skipped oversize events); `unresolved`: its
     * recipient could not be decided (a lookup that could not be proven). Takes `ev`.
     * False: stop reading. */
    bool (*on_event)(void *ud, mc_event_t *ev, bool unresolved);
    /* A position without an event (a post-batch token; NULL data: none yet), also after an
     * empty batch when nothing moved, so the owner can check its limits. False: stop. */
    bool (*on_position)(void *ud, const char *data);
    void *ud;
} mc__replay_t;

/* Reads stream `stream` of a started engine from the change after event id `after_id`
 * (resumeAfter {_data: after_id}, with the stream's own namespace, server stages and split
 * stage) on the calling thread, handing events to `rp`, until a callback says stop, `cancel`
 * turns true or the engine stops (0), or the server refuses: MC_ENOTFOUND (history lost, 286:
 * the id is no longer in the oplog), MC_ESERVER (another error that retrying cannot fix, such
 * as 280 for an id of no event of this stream), with *server_code MongoDB's code. Transient
 * errors are retried with backoff from the last position. MC_EINVAL: no such stream. On an
 * edge stream, mc__source_nats_replay() (source_nats.h) reads the JetStream stream instead,
 * with the same results (MC_ENOTFOUND: older than the first message kept; MC_ESERVER: no
 * message has the id; *server_code 0). */
int mc__stream_replay(mc_engine_t *e, const char *stream, const char *after_id,
                      const mc__replay_t *rp, int *server_code, mc_error_t *err);

/* Sleeps up to ms unless the engine is stopping. Returns true when stopping. */
bool mc__engine_sleep(mc_engine_t *engine, int64_t ms);

/* Updates a stream's status (any thread) and calls on_state when the state changes. */
void mc__stream_set_state(mc__stream_t *s, mc_stream_state_t state, int server_code,
                          const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* ---- Router (router.c; watcher threads, and catch-up threads to rejoin) ----------------- */

/* Hands `ev` (taken) to every attached runner of its stream; a runner whose queue is full is
 * detached (never waited for), except a live one, for which the watcher waits. Returns false
 * only when the engine stops while waiting (the event was not routed to every runner). */
bool mc__route_event(mc__stream_t *s, mc_event_t *ev);
/* The same for a position without an event (taken). */
bool mc__route_mark(mc__stream_t *s, mc__mark_t *m);
/* Catch-up thread: if the catch-up has reached the shared path's newest item (`data` >= it),
 * reattaches the route of `r` with skip_until = data and returns true. `force` reattaches
 * whatever the position (history lost and restarted: skip nothing). A runner that rejoins a
 * stream which failed meanwhile gets the stream's error event then. */
bool mc__route_rejoin(mc__stream_t *s, mc__runner_t *r, int slot, const char *data, bool force);
/* Any thread: copies the `_data` of the newest item the router handed out for `stream` (""
 * before any) into buf. False when there is no such stream or buf is too small. */
bool mc__stream_routed_head(mc_engine_t *e, const char *stream, char *buf, size_t len);
/* Engine start/stop: builds and frees the stream's routes. */
int mc__route_init(mc__stream_t *s);
void mc__route_cleanup(mc__stream_t *s);

/* ---- Sink runners (sink_runner.c) -------------------------------------------------------- */

typedef enum mc__exec {
    MC__EXEC_THREAD = 0, /* a thread of its own */
    MC__EXEC_LOOP,       /* the engine's shared I/O loop */
    MC__EXEC_EXTERNAL,   /* the embedder's dispatch thread (mc_engine_dispatch) */
} mc__exec_t;

/* Builds the runner of `sink` (its streams are those sink->takes_stream marks). */
mc__runner_t *mc__runner_new(mc_sink_t *sink, mc__exec_t exec, uint32_t capacity,
                             mc_error_t *err);
void mc__runner_destroy(mc__runner_t *r);
/* Opens the dead letter and starts the executor (thread, or handles on the I/O loop, which
 * must not run yet). */
int mc__runner_start(mc__runner_t *r, mc_error_t *err);
mc__exec_t mc__runner_exec(const mc__runner_t *r);
mc_sink_t *mc__runner_sink(const mc__runner_t *r);
bool mc__runner_live(const mc__runner_t *r);
int mc__runner_slot(const mc__runner_t *r, int stream_index);

/* Router: appends an item (taken on success) of stream slot `slot`. 0, MC_EAGAIN (full),
 * MC_ECLOSED (the runner does not accept the stream: detached or failed). Never blocks. */
int mc__runner_push(mc__runner_t *r, int slot, mc__pref_t *item);
/* Waits up to timeout_ms for room, then pushes. `catchup`: a catch-up thread's push, which
 * leaves room for the shared path and is refused (MC_ECLOSED) once the runner failed or
 * stopped accepting catch-up input. Returns 0, MC_EAGAIN (timed out), MC_ECLOSED. */
int mc__runner_push_wait(mc__runner_t *r, int slot, mc__pref_t *item, int64_t timeout_ms,
                         bool catchup);
/* Ledger load (watcher thread, before the stream routes anything): the slot takes input only
 * from its initial copy, then from the catch-up that follows it (as if detached). */
void mc__runner_begin_copy(mc__runner_t *r, int slot);
/* Router: the shared path detaches the runner (queue full). */
void mc__runner_request_detach(mc__runner_t *r);
/* Router, holding the stream's route lock: the stream slot takes shared-path items again. */
void mc__runner_rejoin(mc__runner_t *r, int slot);
/* Router: an item of the slot was not handed over (detached); for the lag estimate. */
void mc__runner_missed(mc__runner_t *r, int slot);
/* Fails the runner for good (this run) with a reason. Any thread. */
void mc__runner_fail_all(mc__runner_t *r, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Acks and failures from the sink (sink.c). Any thread. */
void mc__runner_ack(mc__runner_t *r, const mc_event_t *ev, int stream_index, uint64_t seq);
int mc__runner_fail(mc__runner_t *r, const mc_event_t *ev, mc_sink_error_class_t cls,
                    int64_t retry_after_ms, const char *message);

/* External and loop executors: one pass (a batch of at most `budget` items, 0: a default).
 * Returns the number of items handled. */
size_t mc__runner_run_once(mc__runner_t *r, size_t budget);
/* Loop executor: creates the runner's handles on the I/O loop (before it runs). */
int mc__runner_loop_attach(mc__runner_t *r, void *uv_loop);

/* Stop: no more input will come (watchers and catch-ups are joined); deliver what is held
 * until `deadline_ms`, drain the sink, then stop it. begin wakes the executor; finish waits
 * for it (joining a thread runner) and returns 0 or MC_EAGAIN (not everything completed). */
void mc__runner_begin_stop(mc__runner_t *r, int64_t deadline_ms);
int mc__runner_finish_stop(mc__runner_t *r, int64_t deadline_ms, bool on_dispatch_thread);

/* Ledger: the slot's newest complete position (a new reference; empty when none) and
 * whether it moved since the last take (then cleared). */
bool mc__runner_take_done(mc__runner_t *r, int slot, mc__pref_t *out, bool *dirty,
                          uint64_t *seq);
/* Ledger at start: the slot's initial position (taken; dirty: write it at the next interval).
 * Only before the stream routes anything. */
void mc__runner_set_done(mc__runner_t *r, int slot, mc__mark_t *m, bool dirty);
/* Whether the slot has a position yet. */
bool mc__runner_has_done(mc__runner_t *r, int slot);
/* A write of the slot's position failed: write it again next time. */
void mc__runner_mark_dirty(mc__runner_t *r, int slot);
/* 0 while running; the stop deadline once stopping (mc_sink_deadline_ms()). */
int64_t mc__runner_deadline(const mc__runner_t *r);
/* Status API. */
void mc__runner_stats(mc__runner_t *r, mc_sink_stats_t *out);
bool mc__runner_failed(mc__runner_t *r);

/* Lease (lease.c): the runner's part, on the lease thread (unfence) and the executor (fence
 * when the stream's lease_until passed). A fenced slot takes nothing from the shared path, its
 * unpublished entries are dropped and its catch-up ends; published entries still complete.
 * Runners of live sinks are never fenced. */
void mc__runner_fence(mc__runner_t *r, int slot, const char *why);
/* Lease thread: the slot feeds again from `from` (taken; the position the previous holder
 * stored): its position becomes `from` and a catch-up reads the stream from there until it
 * rejoins the shared path. MC_EAGAIN while an earlier catch-up of the slot has not ended yet
 * (try again later), MC_ENOMEM (the runner failed), 0. */
int mc__runner_unfence(mc__runner_t *r, int slot, mc__pref_t *from);
bool mc__runner_fenced(mc__runner_t *r, int slot);
/* Catch-up threads of a slot, counted by mc__catchup_spawn() (enter, before the thread
 * starts; leave on failure) and by the thread as it ends (leave), so that an unfence never
 * runs two at once. Any thread; lock-free (the spawner may hold the runner's lock). */
void mc__runner_catchup_enter(mc__runner_t *r, int slot);
void mc__runner_catchup_leave(mc__runner_t *r, int slot);

/* ---- The engine's I/O loop (ioloop.c) ---------------------------------------------------- */

mc__ioloop_t *mc__ioloop_new(mc_error_t *err);
void *mc__ioloop_uv(mc__ioloop_t *l);
/* Starts the loop thread (after every async sink's start() and runner handles). */
int mc__ioloop_start(mc__ioloop_t *l, mc_error_t *err);
bool mc__ioloop_running(const mc__ioloop_t *l);
/* Closes every handle still open, lets the loop run their close callbacks, joins the thread
 * (or runs the loop here when it never started). Idempotent. */
void mc__ioloop_stop(mc__ioloop_t *l);
void mc__ioloop_destroy(mc__ioloop_t *l);

/* ---- Ledger (ledger.c) -------------------------------------------------------------------- */

/* Engine start: the stream's definition record ({ns, fingerprint, options}). */
int mc__ledger_definition(mc__stream_t *s, mc_error_t *err);
/* Watcher thread, before the first open: loads the stream's and its sinks' records, refuses
 * any from another namespace, another definition or the future (server clusterTime from
 * `client`; NULL for an edge stream: no such check), and sets each runner's initial position and skip point. *start gets the
 * position the watcher opens from (token NULL: none stored). Returns 0, MC_ECONFIG (refused:
 * err says why and what to do), MC_EIO (unreadable), MC_ESERVER (cannot reach the server:
 * transient). Logs the start position chosen. */
int mc__ledger_load(mc__stream_t *s, mongoc_client_t *client, mc__position_t *start,
                    mc_error_t *err);
/* Checks one loaded record of stream `name` against the stream's `definition`: 0, or
 * MC_ECONFIG with the reason and the operator's way out in err (another namespace, another
 * definition, a clusterTime more than a few seconds ahead of the server's `server_t`; 0:
 * unknown, not checked). A record without a definition passes (logged). Any thread. */
int mc__ledger_check_record(const char *name, const bson_t *definition, const mc__record_t *rec,
                            uint32_t server_t, uint32_t server_i, mc_error_t *err);
/* Watcher thread, right after an open without a stored position: the first position the
 * change stream reported becomes the initial position of every runner that has none. */
void mc__ledger_origin(mc__stream_t *s, const bson_t *token);
/* The stream's position: the oldest of its runners' complete positions. */
void mc__ledger_stream_position(mc__stream_t *s, mc__position_t *out);
/* Checkpoint thread (and stop): writes what moved. 0 or MC_EIO (a write failed; retried at
 * the next call). */
int mc__ledger_write(mc_engine_t *e);

/* ---- Lease (lease.c) --------------------------------------------------------------------
 * One lease document per stream that has sinks other than the live fan-out, in
 * lease.db.lease.collection: {_id: <stream>, holder, epoch, version, expiresAt, renewedAt,
 * ttlMs}. The lease thread (mclease) renews what it holds and watches the rest. */

/* What the lease document says (as read). */
typedef struct mc__lease_doc {
    bool exists;
    char holder[256]; /* "" once released */
    int64_t epoch;    /* fencing epoch: +1 at every change of holder */
    int64_t version;  /* +1 at every write (renewal, takeover, release) */
} mc__lease_doc_t;

typedef enum mc__lease_action {
    MC__LEASE_WAIT = 0, /* nothing to write now */
    MC__LEASE_CREATE,   /* no document: insert one with this node as holder, epoch 1 */
    MC__LEASE_TAKE,     /* take over (epoch+1) on condition {epoch, version} unchanged */
} mc__lease_action_t;

/* The per-stream state machine, pure and clock-free (times are the caller's mc__now_ms()
 * values), so that it can be tested with a fake clock. One thread. */
typedef struct mc__lease_fsm {
    int64_t ttl_ms, renew_ms, margin_ms;
    bool held;
    int64_t epoch, version; /* held: what this node wrote last */
    int64_t deadline;       /* held: stop publishing at this time (monotonic) */
    int64_t next_renew;     /* held: when to renew */
    bool seen;              /* not held: the version observed and since when */
    int64_t seen_epoch, seen_version, seen_since;
} mc__lease_fsm_t;

void mc__lease_fsm_init(mc__lease_fsm_t *f, int64_t ttl_ms, int64_t renew_ms);
/* Not held: the document as read at `now` (the time the answer arrived). Returns what to do;
 * for TAKE the condition is f->seen_epoch / f->seen_version. */
mc__lease_action_t mc__lease_fsm_observe(mc__lease_fsm_t *f, const mc__lease_doc_t *doc,
                                         int64_t now);
/* A create, takeover or renewal sent at `sent` succeeded with (epoch, version). */
void mc__lease_fsm_acquired(mc__lease_fsm_t *f, int64_t sent, int64_t epoch, int64_t version);
void mc__lease_fsm_renewed(mc__lease_fsm_t *f, int64_t sent, int64_t version);
/* A renewal failed (no answer, an error): try again a third of renew_ms later. */
void mc__lease_fsm_renew_failed(mc__lease_fsm_t *f, int64_t now);
/* The document no longer names this node with its epoch (another took over), or the
 * deadline passed without a renewal. */
void mc__lease_fsm_lost(mc__lease_fsm_t *f);
/* Whether this node may publish at `now`. */
bool mc__lease_fsm_may_publish(const mc__lease_fsm_t *f, int64_t now);
/* When the lease thread should look at this stream again. */
int64_t mc__lease_fsm_next_wake(const mc__lease_fsm_t *f, int64_t now);

typedef struct mc__lease mc__lease_t;

/* Engine start (after the runners are built, before any thread): marks the leased streams,
 * fences their runners. NULL when there is nothing to lease (lease disabled, or no stream
 * with such sinks); err on failure. */
mc__lease_t *mc__lease_new(mc_engine_t *e, mc_error_t *err);
/* Starts the lease thread (after the runners and watchers). */
int mc__lease_start(mc__lease_t *l, mc_error_t *err);
/* Engine stop, after the runners stopped and the last checkpoint: ends the thread, then
 * releases every lease held (a successor takes over without waiting for the expiry). */
void mc__lease_stop(mc__lease_t *l);
void mc__lease_destroy(mc__lease_t *l);

/* Built-in sink types (sinks/). */
extern const mc_sink_type_t mc__sink_stdout_type;
extern const mc_sink_type_t mc__sink_memory_type;
extern const mc_sink_type_t mc__sink_redis_type; /* sinks/sink_redis.c */
extern const mc_sink_type_t mc__sink_nats_type;  /* sinks/sink_nats.c */
extern const mc_sink_type_t mc__sink_webhook_type; /* sinks/sink_webhook.c */
extern const mc_sink_type_t mc__sink_mongodb_type; /* sinks/sink_mongodb.c */

#endif
