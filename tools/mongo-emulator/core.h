/*
 * core.h: interfaces between the core modules of mongo-emulator (server, commands, catalog,
 * crud, cursors, failpoint, log). Not a contract with the other helpers: emulator.h,
 * changestream.h, update.h and agg.h are.
 *
 * Every function below that takes an emu_server_t or a catalog object runs with srv->lock
 * held, unless its comment says otherwise.
 */
#ifndef MONGO_EMULATOR_CORE_H
#define MONGO_EMULATOR_CORE_H

#include "emulator.h"

#include <stdlib.h>
#include <string.h>
#include "mongocast/filter.h"
#include "wire.h"

/* ---- server.c (no lock needed) ---- */

/* Initialises `srv` from `opts` (copied): catalog, oplog, cursors, fail points, clock, log. */
int emu_server_init(emu_server_t *srv, const emu_options_t *opts, mc_error_t *err);
/* Binds and listens, fills srv->host and srv->opts.port (the real port for port 0), starts the
 * accept thread. */
int emu_server_start(emu_server_t *srv, mc_error_t *err);
/* Stops accepting, wakes and closes every connection, waits for their threads. Idempotent. */
void emu_server_stop(emu_server_t *srv);
void emu_server_cleanup(emu_server_t *srv);

/* ---- commands.c ---- */

typedef enum emu_handle_result {
    EMU_HANDLE_REPLY = 0, /* send `reply` (unless the request had moreToCome) */
    EMU_HANDLE_CLOSE = 1, /* close the connection without replying */
} emu_handle_result_t;

/* Runs one parsed request end to end: log, fail points (blocking without the lock), lock,
 * dispatch, cluster time, unlock. Called WITHOUT the lock by the connection thread. `reply`
 * is initialised by the caller and filled here. */
emu_handle_result_t emu_handle_request(emu_conn_t *conn, const emu_wire_request_t *req,
                                       bson_t *reply);
/* Error reply for a request that did not parse (lock not needed). */
void emu_reply_parse_error(emu_conn_t *conn, const mc_error_t *err, bson_t *reply);
/* Appends the generic "ok: 1.0" unless the reply already has "ok". */
void emu_reply_ok(bson_t *reply);
/* Wall-clock milliseconds since the epoch. Any thread. */
int64_t emu_now_ms(void);

/* Appends {"cursor": {<batch_key>: <batch>, "id": id, "ns": ns}} to reply. */
void emu_reply_cursor(bson_t *reply, const char *batch_key, const bson_t *batch, int64_t id,
                      const char *ns);
/* The collection named by a command's first element, validated; NULL and an error reply when
 * it is not a valid collection name string. */
const char *emu_cmd_collection(const bson_t *cmd, bson_t *reply);

/* A growable byte buffer (concatenated BSON documents for cursors). */
typedef struct emu_bytes {
    uint8_t *data;
    size_t len;
    size_t cap;
} emu_bytes_t;

/* Appends n bytes; false when the buffer would pass EMU_BYTES_MAX or memory runs out. */
#define EMU_BYTES_MAX ((size_t)1 << 31)
bool emu_bytes_append(emu_bytes_t *b, const void *p, size_t n);
void emu_bytes_free(emu_bytes_t *b);

/* Zeroed memory for structs that embed a bson_t by value: libbson declares bson_t 128-byte
 * aligned, more than malloc guarantees. Release with free(). Aborts when memory runs out, like
 * bson_malloc. */
static inline void *emu_zalloc_aligned(size_t size)
{
    size_t n = (size + 127) / 128 * 128;
    void *p = aligned_alloc(128, n);
    if (!p) {
        abort();
    }
    memset(p, 0, n);
    return p;
}

/* ---- catalog.c ---- */

typedef struct emu_doc {
    uint8_t *data; /* NULL: deleted slot */
    uint32_t len;
} emu_doc_t;

typedef struct emu_index_hash {
    struct emu_index_entry *entries;
    size_t cap; /* power of two, or 0 */
    size_t used;
} emu_index_hash_t;

typedef struct emu_index {
    char *name;
    bson_t key;  /* {field: 1|-1|"text"...} */
    bson_t spec; /* as listIndexes shows it */
    bool unique;
    bool sparse;
    mc_filter_t *partial;  /* partialFilterExpression, or NULL */
    emu_index_hash_t hash; /* unique indexes only */
} emu_index_t;

typedef struct emu_coll {
    char *name;
    char *ns; /* "db.coll", for messages */
    uint8_t uuid[16];
    bson_t options;  /* as create received them (and collMod changed them) */
    bool images;     /* changeStreamPreAndPostImages.enabled */
    emu_doc_t *docs; /* slots in insertion order; deleted slots have data NULL */
    size_t n_slots;
    size_t cap_slots;
    size_t n_live;
    size_t data_bytes;
    emu_index_t **indexes; /* [0] is always _id_ */
    size_t n_indexes;
    struct emu_coll *next;
    /* The earliest cluster time a snapshot read can see this collection at: the first tick after
     * it was created or renamed (MongoDB's "minimum visible snapshot"). */
    uint32_t min_t;
    uint32_t min_i;
} emu_coll_t;

typedef struct emu_db {
    char *name;
    emu_coll_t *colls; /* creation order */
    struct emu_db *next;
} emu_db_t;

emu_catalog_t *emu_catalog_new(void);
/* Commands that need a collection refuse a view (166 CommandNotSupportedOnView): true when
 * `cmd` names a view of `db` and `reply` now holds that error. */
bool emu_catalog_refuse_view(emu_server_t *srv, const char *command, const char *db,
                             const bson_t *cmd, bson_t *reply);
void emu_catalog_destroy(emu_catalog_t *cat);

/* Name checks with MongoDB's rules; fill err with code 73 InvalidNamespace. */
int emu_check_db_name(const char *db, mc_error_t *err);
int emu_check_coll_name(const char *coll, mc_error_t *err);

emu_db_t *emu_catalog_db(emu_server_t *srv, const char *db);
emu_db_t *emu_catalog_first_db(emu_server_t *srv);
emu_coll_t *emu_catalog_coll(emu_server_t *srv, const char *db, const char *coll);
/* The collection, created (with default options) when missing. NULL + err on a bad name. */
emu_coll_t *emu_catalog_coll_get_or_create(emu_server_t *srv, const char *db, const char *coll,
                                           bool *created, mc_error_t *err);
/* Creates a collection with `options` (may be NULL); 48 NamespaceExists when present. */
emu_coll_t *emu_catalog_create(emu_server_t *srv, const char *db, const char *coll,
                               const bson_t *options, mc_error_t *err);
/* Drops one collection (records the oplog entry). */
void emu_catalog_drop(emu_server_t *srv, const char *db, emu_coll_t *coll);
/* Moves a collection to a new namespace (records the rename). With drop_target an existing
 * target is dropped silently first. */
int emu_catalog_rename(emu_server_t *srv, const char *db, const char *coll, const char *to_db,
                       const char *to_coll, bool drop_target, mc_error_t *err);
/* Drops every collection of db, then the database (records the oplog entries). */
void emu_catalog_drop_database(emu_server_t *srv, const char *db);

/* A read-only view of a live slot. */
static inline void emu_doc_view(const emu_doc_t *d, bson_t *out)
{
    bson_init_static(out, d->data, d->len);
}
/* The slot of the document whose _id equals `id`, or -1. */
long emu_coll_find_id(const emu_coll_t *coll, const bson_value_t *id);
/* Inserts a copy of `doc` (which must have _id). On a unique-index violation returns
 * MC_EINVAL with cause 11000, MongoDB's E11000 message, and, when `dup` is not NULL,
 * appends {keyPattern, keyValue} to it. */
int emu_coll_insert(emu_coll_t *coll, const bson_t *doc, bson_t *dup, mc_error_t *err);
/* Replaces the document in `slot` (same _id) with a copy of `doc`; same errors. */
int emu_coll_replace(emu_coll_t *coll, size_t slot, const bson_t *doc, bson_t *dup,
                     mc_error_t *err);
void emu_coll_delete(emu_coll_t *coll, size_t slot);
/* Reclaims deleted slots when they are many; slot numbers change. */
void emu_coll_maybe_compact(emu_coll_t *coll);
/* Adds an index from a createIndexes spec; *added false when an identical one exists. */
int emu_coll_add_index(emu_coll_t *coll, const bson_t *spec, bool *added, mc_error_t *err);
/* Drops one index by name (27 IndexNotFound, 72 for _id_). */
int emu_coll_drop_index(emu_coll_t *coll, const char *name, mc_error_t *err);
/* Name of the index with this key pattern, or NULL. */
const char *emu_coll_index_by_key(const emu_coll_t *coll, const bson_t *key);
/* Appends `prefix` then "{ k: v, ... }" for the values of `key` in `doc` (E11000 style). */
void emu_format_key_value(const bson_t *key_value, char *buf, size_t size);

/* ---- crud.c: command handlers (lock held) ---- */

typedef void (*emu_cmd_fn)(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);

void emu_cmd_insert(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_update(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_delete(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_find(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_find_and_modify(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_count(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_distinct(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_aggregate(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);

/* ---- catalog.c: DDL command handlers (lock held) ---- */

void emu_cmd_create(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_coll_mod(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_drop(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_drop_database(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_rename(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_list_collections(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_list_databases(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_create_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_list_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_drop_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_coll_stats(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_db_stats(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);

/* ---- cursors.c: find/aggregate cursors (lock held) ---- */

emu_cursors_t *emu_cursors_new(void);
void emu_cursors_destroy(emu_cursors_t *cs);
/* Batches `docs` (n documents, concatenated BSON in one buffer of `len` bytes, which the
 * function takes over) into a reply {cursor: {firstBatch, id, ns}}; whatever does not fit
 * the first batch stays in a new cursor. batch_size < 0: default (101). */
void emu_cursor_reply_first(emu_server_t *srv, const char *ns, uint8_t *docs, size_t len,
                            long batch_size, bool single_batch, bson_t *reply);
/* The same for a snapshot read: with `at` ({t, i}, may be NULL) every batch of the cursor
 * carries atClusterTime, as a real server's do. The rest of the result is already computed, so
 * getMore continues at the same snapshot by construction. */
void emu_cursor_reply_first_at(emu_server_t *srv, const char *ns, uint8_t *docs, size_t len,
                               long batch_size, bool single_batch, const uint32_t *at,
                               bson_t *reply);
void emu_cmd_get_more(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_kill_cursors(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
/* Drops the cursors reading namespace ns (its collection was dropped). */
void emu_cursors_kill_ns(emu_server_t *srv, const char *ns);

/* ---- failpoint.c (lock held) ---- */

emu_failpoints_t *emu_failpoints_new(void);
void emu_failpoints_destroy(emu_failpoints_t *fps);
void emu_cmd_configure_fail_point(emu_conn_t *conn, const bson_t *cmd, const char *db,
                                  bson_t *reply);

/* What failCommand decided for one command. */
typedef struct emu_fp_decision {
    emu_fp_action_t action;   /* EMU_FP_ERROR: `error` holds the error reply */
    int block_ms;             /* > 0: sleep this long, without the lock, before anything else */
    bool write_concern_error; /* run the command, then append `wce` */
    bson_t error;
    bson_t wce;
} emu_fp_decision_t;

/* Evaluates failCommand for the command `name` in `db` (consumes times/skip). */
void emu_failpoint_check(emu_conn_t *conn, const char *name, const char *db, const bson_t *cmd,
                         emu_fp_decision_t *d);
void emu_fp_decision_cleanup(emu_fp_decision_t *d);

/* ---- log.c ---- */

int emu_log_open(emu_server_t *srv, const char *path, mc_error_t *err);
void emu_log_close(emu_server_t *srv);
/* A free-form line {"t":..,"conn":..,"event":text} (connects, disconnects, bad input). */
void emu_log_event(emu_server_t *srv, const emu_conn_t *conn, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#endif
