/*
 * changestream.h: the oplog (a bounded history of changes) and change-stream cursors.
 *
 * Writers (the CRUD and DDL commands) record each change with emu_oplog_append(); the
 * change-stream commands turn the oplog into MongoDB 6.0/7.0 change events: resume tokens,
 * invalidation, pre- and post-images, postBatchResumeToken, awaitData getMore.
 * Every function here runs with srv->lock held (see emulator.h).
 */
#ifndef MONGO_EMULATOR_CHANGESTREAM_H
#define MONGO_EMULATOR_CHANGESTREAM_H

#include "emulator.h"

typedef enum emu_op {
    EMU_OP_INSERT,
    EMU_OP_UPDATE,
    EMU_OP_REPLACE,
    EMU_OP_DELETE,
    EMU_OP_DROP,          /* one per dropped collection, also for each collection of a dropDatabase */
    EMU_OP_RENAME,        /* db.coll renamed to to_db.to_coll */
    EMU_OP_DROP_DATABASE, /* after the EMU_OP_DROP of each of its collections */
    /* Seen only by streams opened with showExpandedEvents (MongoDB 6.0's expanded events): */
    EMU_OP_CREATE,         /* a collection (or a view) was created, explicitly or implicitly */
    EMU_OP_CREATE_INDEXES, /* operation_description: {indexes: [spec, ...]} */
    EMU_OP_DROP_INDEXES,   /* operation_description: {indexes: [spec]} */
    EMU_OP_MODIFY,         /* collMod; state_before: {collectionOptions: {...}} */
} emu_op_t;

/* One change as a writer describes it. Everything is borrowed; emu_oplog_append copies. */
typedef struct emu_change {
    emu_op_t op;
    const char *db;
    const char *coll;          /* NULL for EMU_OP_DROP_DATABASE */
    const char *to_db;         /* EMU_OP_RENAME only */
    const char *to_coll;       /* EMU_OP_RENAME only */
    const uint8_t *coll_uuid;  /* 16 bytes; the collection's UUID (NULL for dropDatabase) */
    const bson_t *document_key;     /* insert/update/replace/delete: {_id: ...} */
    const bson_t *full_document;    /* insert/replace: the new document; update: the post-image */
    const bson_t *pre_image;        /* update/replace/delete: the document before the write */
    bool images_enabled;            /* changeStreamPreAndPostImages was on for the collection */
    const bson_t *update_description; /* update: {updatedFields, removedFields, truncatedArrays} */
    /* DDL events: the event's operationDescription (rename: shown only with
     * showExpandedEvents), and for modify its stateBeforeChange. */
    const bson_t *operation_description;
    const bson_t *state_before;
    bool view; /* the namespace is a view: only database and cluster streams with
                * showExpandedEvents see it, and it has no collectionUUID */
} emu_change_t;

/* Creates and destroys the oplog and cursor tables in srv (called once at start and exit). */
int emu_changestream_init(emu_server_t *srv, mc_error_t *err);
void emu_changestream_cleanup(emu_server_t *srv);

/* Records one change: takes the next cluster time, stores the entry (dropping the oldest when
 * the oplog is full) and wakes waiting getMores. */
void emu_oplog_append(emu_server_t *srv, const emu_change_t *change);

/* Records the writes of one committed transaction: one cluster time for all of them,
 * txnOpIndex 0..n-1 in order, and `lsid` ({id, uid}) and `txnNumber` on each event, as
 * MongoDB's change streams unwind a transaction's applyOps entry. */
void emu_oplog_append_txn(emu_server_t *srv, const emu_change_t *changes, size_t n,
                          const bson_t *lsid, int64_t txn_number);

/* aggregate whose pipeline[0] is {$changeStream: ...}. */
void emu_cs_aggregate(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
/* True when `cursor_id` is an open change-stream cursor. */
bool emu_cs_owns_cursor(emu_server_t *srv, int64_t cursor_id);
/* getMore on a change-stream cursor; may wait up to maxTimeMS (default 1000) for events. */
void emu_cs_getmore(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
/* Closes a change-stream cursor; false when it is not one. */
bool emu_cs_kill(emu_server_t *srv, int64_t cursor_id);
/* {emulatorTruncateOplog: 1, keepLast: N}: keep only the newest N entries. */
void emu_cs_truncate_oplog(emu_conn_t *conn, const bson_t *cmd, bson_t *reply);

#endif
