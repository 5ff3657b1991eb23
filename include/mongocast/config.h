/*
 * mongocast/config.h: the parsed mongocast configuration (docs/config.md).
 *
 * mc_config_load_file() reads YAML (libyaml), replaces ${VAR} and ${VAR:-default} from the
 * environment, checks every key against a table of options (type, default, bounds), and
 * returns a plain immutable struct. Errors are MC_ECONFIG with the message
 * "FILE:LINE:COL: text" (unknown keys get a "did you mean ...?"). Any thread; no global state.
 * A loaded config is read-only and may be shared between threads.
 */
#ifndef MONGOCAST_CONFIG_H
#define MONGOCAST_CONFIG_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mc_full_document {
    MC_FULL_DOCUMENT_DEFAULT = 0,
    MC_FULL_DOCUMENT_UPDATE_LOOKUP,
    MC_FULL_DOCUMENT_WHEN_AVAILABLE,
    MC_FULL_DOCUMENT_REQUIRED,
} mc_full_document_t;

typedef enum mc_before_change {
    MC_BEFORE_CHANGE_OFF = 0,
    MC_BEFORE_CHANGE_WHEN_AVAILABLE,
    MC_BEFORE_CHANGE_REQUIRED,
} mc_before_change_t;

typedef enum mc_on_history_lost {
    MC_ON_HISTORY_LOST_FAIL = 0,
    MC_ON_HISTORY_LOST_RESTART,
} mc_on_history_lost_t;

/* What a stream does with a change event larger than MongoDB's 16 MB limit (docs/config.md,
 * on_oversize). SPLIT is 0 so that a zeroed stream config (an ad hoc engine) gets the default. */
typedef enum mc_on_oversize {
    MC_ON_OVERSIZE_SPLIT = 0, /* $changeStreamSplitLargeEvent, fragments reassembled */
    MC_ON_OVERSIZE_SKIP,      /* an oversize notice in its place, counted */
    MC_ON_OVERSIZE_FAIL,      /* the stream fails (code event_too_large) */
} mc_on_oversize_t;

/* What a sink does before its first change when it has no stored position for a stream
 * (docs/config.md, "Initial snapshot"). NONE is 0: a zeroed sink config keeps today's start. */
typedef enum mc_sink_initial {
    MC_SINK_INITIAL_NONE = 0, /* start with the stream */
    MC_SINK_INITIAL_SNAPSHOT, /* copy the watched collection at one cluster time T, then the
                                 changes after T */
} mc_sink_initial_t;

typedef enum mc_checkpoint_store {
    MC_CHECKPOINT_FILE = 0,
    MC_CHECKPOINT_MONGODB,
} mc_checkpoint_store_t;

/* Where a value came from, for error messages raised after loading (e.g. by a sink type). */
typedef struct mc_config_pos {
    int line; /* 1-based; 0 when unknown */
    int col;  /* 1-based */
} mc_config_pos_t;

/* recipient: {path: ..., lookup: {db, collection, field, recipient}} */
typedef struct mc_recipient_lookup {
    char *db;
    char *collection;
    char *field;     /* field of the looked-up document matched against the path's value */
    char *recipient; /* field of the looked-up document that holds the recipient (may go
                        through a DBRef: owner.$id) */
    uint32_t cache_size;
} mc_recipient_lookup_t;

/* One alternative of a `summary`: the first whose `when` matches the change is rendered. */
typedef struct mc_summary_rule {
    bson_t *when; /* a query on the change event (NULL: always) */
    char *text;   /* the template, "{fullDocument.name} is low" (docs/config.md, "Summary") */
    mc_config_pos_t pos;
} mc_summary_rule_t;

/* A `summary`: a template string, or a list of {when, text} alternatives. n_rules == 0: none. */
typedef struct mc_summary_config {
    mc_summary_rule_t *rules;
    size_t n_rules;
} mc_summary_config_t;

/* One entry of recipient.by_collection (or recipient.default): how events of one collection
 * are routed, and optionally their own summary. */
typedef struct mc_recipient_rule {
    char *collection;              /* the by_collection key ("coll", or "db.coll" on a
                                      cluster-level stream); NULL for `default` */
    char *path;                    /* dotted path in the change event (required) */
    mc_recipient_lookup_t *lookup; /* NULL: the path holds the recipient itself */
    mc_summary_config_t summary;   /* n_rules == 0: the stream's summary */
    mc_config_pos_t pos;
} mc_recipient_rule_t;

typedef struct mc_stream_config {
    char *name;        /* the key under streams:; served at /v1/streams/<name> */
    char *db;          /* NULL: whole cluster */
    char *collection;  /* NULL: whole database (or cluster) */
    bson_t *pipeline;  /* BSON array of stages, possibly with {$var: name} values; never NULL */
    mc_full_document_t full_document;
    mc_before_change_t full_document_before_change;
    char *recipient;                 /* dotted path, or NULL */
    mc_recipient_lookup_t *lookup;   /* NULL unless recipient uses the lookup form */
    /* recipient: {by_collection: {COLL: rule, ...}, default: rule}: a rule per collection of a
     * database- or cluster-level stream (then `recipient` and `lookup` are NULL); events of
     * a collection without a rule follow recipient_default, or go to admins only when it is
     * NULL. Use mc_stream_config_has_recipient() to ask whether a stream routes at all. */
    mc_recipient_rule_t *by_collection;
    size_t n_by_collection;
    mc_recipient_rule_t *recipient_default;
    mc_summary_config_t summary; /* the human line of each change message; may be empty */
    bool ensure_images;          /* turn on changeStreamPreAndPostImages where needed */
    bool is_public;
    bool client_filters;
    uint32_t history;                /* events kept for client resume */
    mc_on_history_lost_t on_history_lost;
    mc_on_oversize_t on_oversize;
    int32_t batch_size;              /* 0: server default */
    int32_t max_await_time_ms;       /* default 1000 */
    uint32_t max_snapshot_documents; /* 0: server.max_snapshot_documents */
    uint32_t max_catchup_events;     /* 0: server.max_catchup_events */
    mc_config_pos_t pos;
    /* source: {nats: {url, stream, subject}}: an edge stream, fed from a JetStream stream
     * that another mongocast's nats sink (format: bson) writes, instead of from MongoDB
     * (docs/config.md, "Edge streams"). NULL url: the stream watches MongoDB. */
    struct {
        char *url;     /* server list, as the nats sink takes it */
        char *stream;  /* the JetStream stream */
        char *subject; /* filter subject inside it; NULL: every subject */
    } source_nats;
} mc_stream_config_t;

typedef struct mc_sink_config {
    char *name;
    char *type;      /* "stdout", "memory", "redis", ... */
    char **streams;  /* names of the streams this sink takes; all streams when n_streams == 0 */
    size_t n_streams;
    bson_t *options; /* every other key of the sink entry, for the sink type to interpret */
    /* The sink's runner (0 / NULL: the engine's defaults, see mc_sink_runner_opts_t). */
    uint32_t max_lag_events;
    struct {
        uint32_t initial_ms;
        uint32_t max_ms;
        uint32_t max_attempts;
        uint32_t max_retry_ms;
    } retry;
    char *dead_letter_file; /* dead_letter: {file: PATH} */
    char *dead_letter_db;   /* dead_letter: {db, collection, uri}: a collection instead */
    char *dead_letter_collection;
    char *dead_letter_uri;  /* NULL: mongodb.uri */
    mc_sink_initial_t initial;   /* initial: none | snapshot */
    uint32_t initial_batch_size; /* documents per server batch of the initial copy */
    mc_config_pos_t pos;
} mc_sink_config_t;

typedef struct mc_config {
    char *path; /* the file it was loaded from, or the name given to load_string */
    char *mongodb_uri;
    struct {
        mc_checkpoint_store_t store;
        char *path;       /* file store: directory, one file per stream */
        char *db;         /* mongodb store */
        char *collection; /* mongodb store */
        uint32_t interval_ms; /* how often positions are written; default 1000 */
    } checkpoint;
    struct {
        char *listen; /* "host:port" */
        char **allowed_origins;
        size_t n_allowed_origins;
        uint32_t max_connections;
        uint32_t max_send_queue_bytes;
        uint32_t max_frame_bytes;
        uint32_t max_message_bytes; /* larger events become an oversize notice; 16 MiB */
        uint32_t filter_budget_us;  /* per subscriber and event; 2000 */
        uint32_t max_connections_per_address; /* 0: no limit */
        uint32_t max_snapshot_documents;      /* per ?snapshot=true; 0: refused */
        uint32_t snapshot_workers;            /* snapshot reader threads; 2 */
        uint32_t max_catchup_events; /* events one client catch-up may read; 0: catch-up off */
        uint32_t max_catchups;       /* client catch-ups running or waiting for a worker */
        uint32_t catchup_timeout_ms; /* a catch-up that has not joined the stream by then resets */
        char *io; /* how sockets are written: "auto" | "uring" | "writev"; default "auto" */
        struct {
            bool enabled;         /* the server.tls section is present: the listener speaks TLS */
            char *cert_file;      /* PEM certificate chain (leaf first) */
            char *key_file;       /* PEM private key of the leaf certificate */
            char *client_ca_file; /* PEM CAs a client certificate must chain to; NULL: none asked */
            char *min_version;    /* "1.2" (default) | "1.3" */
        } tls;
        uint32_t threads; /* send threads of the fan-out (1..64); 0: the online cores */
    } server;
    struct {
        bool enabled;
        char *algorithm; /* HS256 | RS256 | ES256 */
        char *secret;
        char *public_key_file;
        char *identity_claim; /* default "sub" */
        char *admin_role;
        char *issuer;   /* NULL: not checked */
        char *audience; /* NULL: not checked */
    } auth;
    /* lease: one holder per stream feeds the stream's sinks other than the live WebSocket/SSE
     * fan-out (docs/config.md, "lease"). Needs checkpoint.store: mongodb. */
    struct {
        bool enabled;
        char *db;         /* default "mongocast" */
        char *collection; /* default "leases": one document per stream, _id the stream name */
        uint32_t ttl_ms;  /* how long a lease lasts without renewal; default 10000 */
        uint32_t renew_ms; /* how often the holder renews (and others look); default ttl/4 */
        char *node_id;    /* NULL: "<hostname>:<pid>" */
    } lease;
    char *log_level; /* error | warn | info | debug; default info */
    mc_stream_config_t *streams;
    size_t n_streams;
    mc_sink_config_t *sinks;
    size_t n_sinks;
} mc_config_t;

/* Loads and validates a YAML file. Returns NULL with MC_ECONFIG ("FILE:LINE:COL: message")
 * or MC_EIO ("FILE: No such file or directory"). */
mc_config_t *mc_config_load_file(const char *path, mc_error_t *err);
/* Same from memory; `name` stands for the file name in messages. */
mc_config_t *mc_config_load_string(const char *yaml, size_t len, const char *name, mc_error_t *err);
/* NULL-safe. */
void mc_config_destroy(mc_config_t *config);
/* The stream named `name`, or NULL. */
const mc_stream_config_t *mc_config_stream(const mc_config_t *config, const char *name);

/* True when the stream is an edge stream (source: {nats: ...}), fed by JetStream. */
bool mc_stream_config_is_edge(const mc_stream_config_t *stream);

/* True when the stream routes its events to recipients (any recipient form). */
bool mc_stream_config_has_recipient(const mc_stream_config_t *stream);

/* The by_collection rule for events of `db`.`coll` (the key is "coll" on a database-level
 * stream, "db.coll" on a cluster-level one), else recipient_default; NULL when neither (the
 * event then has no recipient) or the stream has no by_collection. */
const mc_recipient_rule_t *mc_stream_config_rule(const mc_stream_config_t *stream, const char *db,
                                                 const char *coll);

/* Checks the stream's pipeline as the loader does: the stages from the first one that uses
 * {$var: name} on run in the daemon, per subscriber, in the order written, so each must be a
 * stage mongocast/pipeline.h runs, $var only in $match stages ({$var: "<name>"} alone in its
 * document), and each must compile. Returns 0, or MC_ECONFIG with "stream NAME: pipeline
 * stage I: ..." in err (for configs built by hand; loaded ones are already checked). */
int mc_stream_config_check_pipeline(const mc_stream_config_t *stream, mc_error_t *err);

/* Recipient lint: calls `fn` once per pipeline stage that removes or rewrites a field the
 * recipient is read from (a $project that excludes it or does not include it, $unset, $set /
 * $addFields of it, $replaceRoot / $replaceWith, ...), with the stage's index, its name and a
 * human-readable warning. Every recipient path of the stream is checked (by_collection rules
 * and the default too). Returns the number of warnings. Pure; any thread. */
typedef void (*mc_config_warn_fn)(const mc_stream_config_t *stream, size_t stage, const char *op,
                                  const char *message, void *userdata);
size_t mc_stream_config_lint(const mc_stream_config_t *stream, mc_config_warn_fn fn,
                             void *userdata);

#ifdef __cplusplus
}
#endif
#endif
