/*
 * emulator.h: the shared state of mongo-emulator and the helpers every command module uses.
 *
 * Threads: one accept thread plus one thread per client connection (server.c). Every command
 * handler runs with `srv->lock` held; that single lock guards the catalog, the oplog, the
 * version history, sessions and transactions, all cursors, the fail points and the cluster
 * clock, so a handler sees a consistent database. A handler waits in two places only, both on
 * `srv->oplog_cond` (pthread_cond_timedwait releases the lock, so a waiter never holds up
 * another connection): a change-stream getMore with nothing to return, and a write outside
 * transactions to a document an open transaction has written (until that transaction ends;
 * the writer then redoes its statement). Fail-point blocking (blockConnection) happens before
 * the lock is taken.
 *
 * Errors inside the emulator use mc_error_t with domain MC_DOMAIN_MONGODB and `cause` set to
 * the MongoDB server error code that the client must see; `message` is the errmsg.
 */
#ifndef MONGO_EMULATOR_H
#define MONGO_EMULATOR_H

#include <bson/bson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "mongocast/error.h"

#define EMU_VERSION "7.0.0-mongo-emulator"
#define EMU_MAX_BSON_SIZE 16777216
#define EMU_MAX_MESSAGE_SIZE 48000000
#define EMU_MAX_WRITE_BATCH 100000

typedef struct emu_catalog emu_catalog_t;       /* catalog.c: databases, collections, documents */
typedef struct emu_oplog emu_oplog_t;           /* changestream.c: bounded history of changes */
typedef struct emu_cs_cursors emu_cs_cursors_t; /* changestream.c: open change-stream cursors */
typedef struct emu_cursors emu_cursors_t;       /* cursors.c: find/aggregate cursors */
typedef struct emu_failpoints emu_failpoints_t; /* failpoint.c */
typedef struct emu_history emu_history_t;       /* history.c: versions for snapshot reads */
typedef struct emu_sessions emu_sessions_t;     /* txn.c: logical sessions, transactions */
typedef struct emu_txn emu_txn_t;               /* txn.c: one multi-document transaction */

typedef struct emu_options {
    const char *bind;        /* default "127.0.0.1" */
    int port;                /* default 27017 */
    const char *replset;     /* default "rs0"; NULL with standalone */
    bool standalone;         /* answer hello as a standalone; $changeStream then fails 40573 */
    int max_wire_version;    /* 17 (6.0, default) or 21 (7.0) */
    size_t oplog_max_events; /* history kept for change streams; default 1000000 */
    const char *log_path;    /* JSON line per request and reply; NULL: no log */
    size_t snapshot_history_bytes; /* budget of the version history; 0: 256 MiB */
    int64_t snapshot_window_secs;  /* minSnapshotHistoryWindowInSeconds; 0: 300, < 0: 0 s */
} emu_options_t;

typedef struct emu_server {
    emu_options_t opts;
    char host[280]; /* "bind:port" as advertised in hosts, me and primary */

    pthread_mutex_t lock;       /* guards everything below */
    pthread_cond_t oplog_cond;  /* broadcast on every oplog append and on shutdown */
    emu_catalog_t *catalog;
    emu_oplog_t *oplog;
    emu_cs_cursors_t *cs_cursors;
    emu_cursors_t *cursors;
    emu_failpoints_t *failpoints;
    emu_history_t *history;   /* versions behind snapshot reads and transactions */
    emu_sessions_t *sessions; /* sessions with a transaction or retryable-write state */
    uint32_t clock_secs; /* last cluster time handed out (Timestamp t, i) */
    uint32_t clock_inc;
    int64_t next_cursor_id;
    int64_t next_connection_id;
    bool shutting_down;

    FILE *log; /* guarded by log_lock, not by lock */
    pthread_mutex_t log_lock;

    struct emu_net *net; /* server.c: listener and connection threads (own lock inside) */
} emu_server_t;

typedef struct emu_conn {
    emu_server_t *srv;
    int fd;
    int64_t id;          /* connectionId reported in hello */
    char app_name[128];  /* client.application.name from the handshake, "" if none */
    bool close_after_reply; /* set by a fail point: drop the connection instead of replying */
    emu_txn_t *txn;         /* the transaction the running command belongs to, or NULL */
} emu_conn_t;

/* ---- server.c / commands.c ---- */

/* Next cluster time, strictly greater than any handed out before (lock held). */
void emu_clock_tick(emu_server_t *srv, uint32_t *t, uint32_t *i);
/* Appends "$clusterTime" and "operationTime" (the last tick) to a reply (lock held). */
void emu_reply_append_cluster_time(emu_server_t *srv, bson_t *reply);
/* A new non-zero cursor id (lock held). */
int64_t emu_new_cursor_id(emu_server_t *srv);
/* The CLOCK_REALTIME instant `ms` milliseconds from now, for pthread_cond_timedwait. Any
 * thread. */
void emu_deadline_after_ms(struct timespec *ts, int64_t ms);
/* Fills `err` with the MongoDB error `code` (domain MC_DOMAIN_MONGODB) and returns MC_ESERVER,
 * so that `return emu_server_error(err, 112, "...")` reads well. Any thread. */
int emu_server_error(mc_error_t *err, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Fills `reply` as an error: ok 0, errmsg, code, codeName. Never code 0. */
void emu_reply_error(bson_t *reply, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
/* Same, from an mc_error_t (cause is the code, message the errmsg). */
void emu_reply_error_from(bson_t *reply, const mc_error_t *err);
/* Appends errorLabels: [labels...] (n labels) to an error reply. */
void emu_reply_add_labels(bson_t *reply, const char *const *labels, size_t n);
/* The codeName MongoDB uses for `code`, or "UnknownError"-style fallback. Never NULL. */
const char *emu_code_name(int code);
/* True for the retryable-writes spec's error codes (from MongoDB's NetworkError and
 * RetriableError categories): a retryable write failing with one gets the label
 * RetryableWriteError, and a change stream failing with one is resumable. */
bool emu_code_is_retriable_error(int code);
/* True when a change-stream aggregate/getMore failing with `code` gets the label
 * ResumableChangeStreamError from a real server (error_labels.cpp). */
bool emu_code_is_resumable_change_stream_error(int code);

/* ---- catalog.c (lock held) ---- */

/* The current document with this _id, or NULL. Borrowed until the lock is released. */
const bson_t *emu_catalog_find_by_id(emu_server_t *srv, const char *db, const char *coll,
                                     const bson_value_t *id);
/* True (and the collection's UUID in `uuid`) when db.coll exists. `uuid` may be NULL. */
bool emu_catalog_collection_exists(emu_server_t *srv, const char *db, const char *coll,
                                   uint8_t uuid[16]);

/* ---- failpoint.c ---- */

typedef enum emu_fp_action {
    EMU_FP_NONE = 0,  /* proceed normally */
    EMU_FP_ERROR = 1, /* `reply` holds the error to send */
    EMU_FP_CLOSE = 2, /* close the connection without replying */
} emu_fp_action_t;

/* failGetMoreAfterCursorCheckout, evaluated by a change-stream getMore once it has found its
 * cursor (lock held). On EMU_FP_ERROR the reply carries the server-computed labels (or the
 * fail point's errorLabels when it has them). */
emu_fp_action_t emu_failpoint_after_checkout(emu_conn_t *conn, bson_t *reply);

/* ---- log.c ---- */

/* Writes one JSON line {"t":..,"conn":..,"dir":"in"|"out","op":..,"doc":{...}}; no-op without a
 * log. */
void emu_log_doc(emu_server_t *srv, const emu_conn_t *conn, const char *dir, int opcode,
                 const bson_t *doc);

#endif
