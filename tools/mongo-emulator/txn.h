/*
 * txn.h: logical sessions and multi-document transactions of mongo-emulator, with MongoDB 6.0's
 * rules: the session fields of a command (lsid, txnNumber, autocommit, startTransaction), the
 * transaction state machine (in progress, committed, aborted; commit is idempotent, a newer
 * txnNumber aborts an older open transaction), snapshot isolation (a transaction reads the data
 * as of its start plus its own writes) and first-writer-wins write conflicts (WriteConflict 112
 * with the TransientTransactionError label). A committed transaction appears in the oplog as one
 * entry per write, all at the commit's cluster time, with lsid, txnNumber and txnOpIndex.
 *
 * Also here: readConcern parsing (shared by every read command) and the error-label rules of
 * MongoDB's ErrorLabelBuilder for transactions and retryable writes.
 *
 * Every function runs with srv->lock held.
 */
#ifndef MONGO_EMULATOR_TXN_H
#define MONGO_EMULATOR_TXN_H

#include "emulator.h"

#include "changestream.h"

/* transactionLifetimeLimitSeconds default: older open transactions are aborted. */
#define EMU_TXN_DEFAULT_LIFETIME_SECS 60
/* Largest total size of one transaction's writes (pre- and post-images): a memory bound. */
#define EMU_TXN_MAX_BYTES ((size_t)128 * 1024 * 1024)
/* Most sessions with transaction or retryable-write state kept at once. */
#define EMU_MAX_SESSIONS 100000

/* ---- readConcern ---- */

typedef enum emu_rc_level {
    EMU_RC_LOCAL,
    EMU_RC_MAJORITY,
    EMU_RC_LINEARIZABLE,
    EMU_RC_AVAILABLE,
    EMU_RC_SNAPSHOT,
} emu_rc_level_t;

typedef struct emu_read_concern {
    bool present; /* the command had a readConcern field */
    bool has_level;
    emu_rc_level_t level;
    bool has_at; /* atClusterTime */
    uint32_t at_t, at_i;
    bool has_after; /* afterClusterTime */
    uint32_t after_t, after_i;
} emu_read_concern_t;

/* Parses and validates cmd.readConcern with the rules of MongoDB's ReadConcernArgs (errors 9,
 * 14, 72). A command without one gets present == false. */
int emu_read_concern_parse(const bson_t *cmd, emu_read_concern_t *rc, mc_error_t *err);

/* The time a read outside a transaction runs at. snapshot false: the live data. With level
 * "snapshot": atClusterTime (which must not be after the current cluster time, 72, nor before
 * the retained history, 239) or the current cluster time. Other levels read the live data after
 * checking afterClusterTime. `cmd_name` names the command in the error for commands that do
 * not support snapshot reads (all but find, aggregate and distinct). */
typedef struct emu_read_at {
    bool snapshot;
    uint32_t t, i;
} emu_read_at_t;
int emu_read_at(emu_server_t *srv, const char *cmd_name, const bson_t *cmd, bool supports_snapshot,
                emu_read_at_t *at, mc_error_t *err);

/* ---- sessions and commands ---- */

int emu_sessions_init(emu_server_t *srv, mc_error_t *err);
void emu_sessions_cleanup(emu_server_t *srv);

typedef struct emu_cmd_session {
    bool has_lsid;
    uint8_t lsid[16];
    bool has_txn_number;
    int64_t txn_number;
    bool has_autocommit; /* autocommit is only ever false when present */
    bool has_start;
    bool in_txn; /* the command runs inside a transaction (conn->txn set) */
} emu_cmd_session_t;

/* Before a command: parses the session fields and applies MongoDB's rules (the session checks,
 * the commands allowed in a transaction, the transaction state for this txnNumber, readConcern
 * only on the first command). On success sets conn->txn for the command (NULL outside a
 * transaction) and returns true; otherwise fills `reply` with the error and returns false. */
bool emu_session_begin(emu_conn_t *conn, const char *name, const char *db, const bson_t *cmd,
                       emu_cmd_session_t *cs, bson_t *reply);
/* After the command: a failed command aborts its transaction, as on a real server; the reply
 * gets the error labels MongoDB computes. Clears conn->txn. */
void emu_session_end(emu_conn_t *conn, const char *name, const bson_t *cmd,
                     const emu_cmd_session_t *cs, bson_t *reply);

/* Adds the labels of MongoDB's ErrorLabelBuilder for transactions and retryable writes
 * (TransientTransactionError, RetryableWriteError) to an error reply of `name` (or to an ok
 * reply carrying a writeConcernError), unless it already has errorLabels. */
void emu_add_txn_error_labels(const char *name, const bson_t *cmd, bson_t *reply);

void emu_cmd_commit_transaction(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
void emu_cmd_abort_transaction(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);
/* endSessions / killSessions: aborts the sessions' open transactions and forgets them. */
void emu_cmd_end_sessions(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply);

/* setParameter transactionLifetimeLimitSeconds: the previous value. */
int64_t emu_txn_set_lifetime(emu_server_t *srv, int64_t secs);
int64_t emu_txn_lifetime(emu_server_t *srv);

/* Aborts transactions older than transactionLifetimeLimitSeconds (called on every command and
 * by waiting writers). */
void emu_txn_reap(emu_server_t *srv);

/* ---- transactions, for the data commands ---- */

/* The transaction's snapshot time. */
void emu_txn_read_time(const emu_txn_t *txn, uint32_t *t, uint32_t *i);

/* The transaction's own version of a document it wrote: true when it wrote (db.coll, key);
 * *doc is then its current version, NULL when it deleted it. Versions stay valid until the
 * transaction ends. */
bool emu_txn_own_version(const emu_txn_t *txn, const char *db, const char *coll, const uint8_t *key,
                         size_t key_len, uint64_t hash, const bson_t **doc, const bson_t **id_doc);
/* Calls fn for every document of db.coll the transaction wrote (doc NULL: deleted). */
typedef void (*emu_txn_doc_fn)(void *ctx, const uint8_t *key, size_t key_len, uint64_t hash,
                               const bson_t *id_doc, const bson_t *doc);
void emu_txn_each_own(const emu_txn_t *txn, const char *db, const char *coll, emu_txn_doc_fn fn,
                      void *ctx);

/* One write of a transaction, as the data command computed it. */
typedef struct emu_txn_write {
    emu_op_t op; /* EMU_OP_INSERT, _UPDATE, _REPLACE or _DELETE */
    const char *db;
    const char *coll;
    const bson_t *pre;         /* the document before (NULL for insert) */
    const bson_t *post;        /* the document after (NULL for delete) */
    const bson_t *update_desc; /* update only */
} emu_txn_write_t;

/* Records a write in the transaction: checks for write conflicts (the document was written by
 * another open transaction, or committed by anyone after this transaction's snapshot: 112
 * WriteConflict), then makes `post` the transaction's version of the document. Copies what it
 * keeps. 257 TransactionTooLarge past EMU_TXN_MAX_BYTES. */
int emu_txn_write(emu_server_t *srv, emu_txn_t *txn, const emu_txn_write_t *w, mc_error_t *err);

/* True when an open transaction other than `self` (may be NULL) has written the document with
 * this _id in db.coll: a write outside that transaction must wait for it to end. */
bool emu_txn_doc_locked(emu_server_t *srv, const emu_txn_t *self, const char *db, const char *coll,
                        const bson_t *id_doc);
/* Waits (releasing srv->lock) until a transaction ends, the deadline passes or the server shuts
 * down. 0: try again; MC_ESERVER with 50 MaxTimeMSExpired or 11600 InterruptedAtShutdown. A
 * zero deadline (tv_sec 0) means no limit but the transactions' own lifetime. */
int emu_txn_wait(emu_conn_t *conn, const struct timespec *deadline, mc_error_t *err);

#endif
