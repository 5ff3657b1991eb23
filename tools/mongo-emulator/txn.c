/*
 * txn.c: logical sessions, multi-document transactions and readConcern (txn.h).
 *
 * Runs on connection threads with srv->lock held; emu_txn_wait alone releases it, inside
 * pthread_cond_timedwait on srv->oplog_cond (broadcast by every commit, abort and oplog append).
 *
 * Model. A transaction reads the data as of its snapshot time (the cluster time when it started,
 * or its atClusterTime) plus its own writes, and keeps its writes private until commit: each one
 * is an operation in `ops` (in statement order, with pre- and post-image) and the document's
 * current version in the transaction is a txn_doc in the lock table. A document in the lock
 * table is locked: another transaction writing it gets WriteConflict at once, a write outside
 * transactions waits until the owner ends (MongoDB's first-writer-wins). Commit applies the
 * operations to the catalog in order, then appends them to the oplog as one transaction (one
 * cluster time, txnOpIndex in order) and to the version history; if applying fails midway, the
 * applied ones are undone from their pre-images, so a transaction is all or nothing.
 *
 * Invariants: a session has at most one open transaction, and only while its state is
 * SES_TXN_OPEN; every txn_doc in the lock table belongs to an open transaction and is freed when
 * it ends; a transaction's bytes never exceed EMU_TXN_MAX_BYTES; at most EMU_MAX_SESSIONS
 * sessions exist.
 *
 * Differences from MongoDB 6.0:
 * - create and createIndexes are refused in a transaction (263); MongoDB runs them.
 * - Unique indexes other than _id_ are checked when the transaction commits: a violation then
 *   fails commitTransaction with WriteConflict (112, TransientTransactionError) and applies
 *   nothing, where MongoDB reports DuplicateKey at the statement.
 * - drop and renameCollection do not wait for transactions that wrote the collection; such a
 *   transaction's commit fails with WriteConflict instead.
 * - A retried retryable write (same txnNumber) runs again; MongoDB replays its first result.
 * - No prepared transactions, no txnRetryCounter, no recoveryToken (single node only).
 * - Only sessions that sent a txnNumber are tracked (at most EMU_MAX_SESSIONS); the lsid's uid
 *   is always the unauthenticated user's, SHA-256 of "".
 * - A transaction holds at most EMU_TXN_MAX_BYTES of pre- and post-images (257
 *   TransactionTooLarge); MongoDB 6.0 bounds it by cache pressure.
 */
#include "txn.h"

#include "bson_helpers.h"
#include "core.h"
#include "history.h"
#include "view.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#define SESSION_BUCKETS 4096
#define SESSION_IDLE_MS (30LL * 60 * 1000) /* logicalSessionTimeoutMinutes */

typedef enum ses_state {
    SES_NONE,          /* no txnNumber used yet */
    SES_RETRYABLE,     /* the active txnNumber belongs to retryable writes */
    SES_TXN_OPEN,      /* a transaction is in progress */
    SES_TXN_COMMITTED, /* the active transaction committed */
    SES_TXN_ABORTED,   /* the active transaction aborted */
} ses_state_t;

typedef struct emu_session emu_session_t;

typedef struct txn_op {
    emu_op_t op;
    char *db;
    char *coll;
    bool has_uuid; /* the collection existed when the transaction wrote it */
    uint8_t uuid[16];
    bson_t *doc_key;
    bson_t *pre;
    bson_t *post;
    bson_t *update_desc;
} txn_op_t;

/* The transaction's current version of one document; also the document's lock. */
typedef struct txn_doc {
    struct txn_doc *next_hash;
    struct txn_doc *next_own;
    emu_txn_t *owner;
    char *ns; /* "db\0coll\0" as one allocation: db then coll */
    size_t db_len;
    uint8_t *key;
    uint32_t key_len;
    uint64_t hash;
    const bson_t *id_doc; /* borrowed from the op that first wrote it */
    const bson_t *doc;    /* borrowed from the newest op; NULL: deleted */
} txn_doc_t;

struct emu_txn {
    emu_session_t *session;
    int64_t txn_number;
    uint32_t read_t, read_i;
    int64_t started_ms;
    txn_op_t *ops;
    size_t n_ops;
    size_t cap_ops;
    size_t bytes;
    txn_doc_t *docs;
    emu_txn_t *prev_open;
    emu_txn_t *next_open;
};

struct emu_session {
    uint8_t id[16];
    int64_t active; /* the active txnNumber, -1 before any */
    ses_state_t state;
    emu_txn_t *txn; /* SES_TXN_OPEN only */
    int64_t last_use_ms;
    struct emu_session *next;
};

struct emu_sessions {
    emu_session_t *buckets[SESSION_BUCKETS];
    size_t count;
    txn_doc_t **locks;
    size_t lock_mask;
    size_t lock_count;
    emu_txn_t *open; /* open transactions, for the lifetime reaper */
    int64_t lifetime_secs;
};

/* SHA-256 of the empty string: the uid MongoDB gives sessions of unauthenticated clients. */
static const uint8_t no_auth_uid[32] = {
    0xE3, 0xB0, 0xC4, 0x42, 0x98, 0xFC, 0x1C, 0x14, 0x9A, 0xFB, 0xF4, 0xC8, 0x99, 0x6F, 0xB9, 0x24,
    0x27, 0xAE, 0x41, 0xE4, 0x64, 0x9B, 0x93, 0x4C, 0xA4, 0x95, 0x99, 0x1B, 0x78, 0x52, 0xB8, 0x55};

static int ts_cmp(uint32_t at, uint32_t ai, uint32_t bt, uint32_t bi)
{
    if (at != bt) {
        return at < bt ? -1 : 1;
    }
    return ai < bi ? -1 : (ai > bi ? 1 : 0);
}

static char *str_dup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = bson_malloc(n);
    memcpy(p, s, n);
    return p;
}

/* ---- readConcern ---- */

static const char *const level_names[] = {"local", "majority", "linearizable", "available",
                                          "snapshot"};

int emu_read_concern_parse(const bson_t *cmd, emu_read_concern_t *rc, mc_error_t *err)
{
    bson_iter_t it, f;
    memset(rc, 0, sizeof *rc);
    if (!bson_iter_init_find(&it, cmd, "readConcern")) {
        return 0;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return emu_server_error(err, 9, "readConcern field should be an object");
    }
    rc->present = true;
    bson_iter_recurse(&it, &f);
    while (bson_iter_next(&f)) {
        const char *k = bson_iter_key(&f);
        if (strcmp(k, "level") == 0) {
            if (!BSON_ITER_HOLDS_UTF8(&f)) {
                return emu_server_error(err, 14,
                                        "\"level\" had the wrong type. Expected string, found %s",
                                        emu_type_name(bson_iter_type(&f)));
            }
            const char *s = bson_iter_utf8(&f, NULL);
            bool known = false;
            for (int l = 0; l < 5; l++) {
                if (strcmp(s, level_names[l]) == 0) {
                    rc->level = (emu_rc_level_t)l;
                    known = true;
                }
            }
            if (!known) {
                return emu_server_error(err, 9,
                                        "readConcern.level must be either 'local', 'majority', "
                                        "'linearizable', 'available', or 'snapshot'");
            }
            rc->has_level = true;
        } else if (strcmp(k, "atClusterTime") == 0 || strcmp(k, "afterClusterTime") == 0) {
            if (!BSON_ITER_HOLDS_TIMESTAMP(&f)) {
                return emu_server_error(err, 14,
                                        "\"%s\" had the wrong type. Expected timestamp, found %s",
                                        k, emu_type_name(bson_iter_type(&f)));
            }
            if (k[1] == 't') {
                bson_iter_timestamp(&f, &rc->at_t, &rc->at_i);
                rc->has_at = true;
            } else {
                bson_iter_timestamp(&f, &rc->after_t, &rc->after_i);
                rc->has_after = true;
            }
        } else if (strcmp(k, "afterOpTime") == 0 || strcmp(k, "provenance") == 0 ||
                   strcmp(k, "$_allowTransactionTableSnapshot") == 0) {
            /* accepted and ignored: a single node is always up to date */
        } else {
            return emu_server_error(err, 72, "Unrecognized option in readConcern: %s", k);
        }
    }
    if (rc->has_after && rc->has_at) {
        return emu_server_error(
            err, 72,
            "Specifying a timestamp for readConcern snapshot in a causally consistent "
            "session is not allowed. See "
            "https://docs.mongodb.com/manual/core/read-isolation-consistency-recency/"
            "#causal-consistency");
    }
    emu_rc_level_t level = rc->has_level ? rc->level : EMU_RC_LOCAL;
    if (rc->has_after && level != EMU_RC_MAJORITY && level != EMU_RC_LOCAL &&
        level != EMU_RC_SNAPSHOT) {
        return emu_server_error(
            err, 72,
            "afterClusterTime field can be set only if level is equal to majority, "
            "local, or snapshot");
    }
    if (rc->has_at && level != EMU_RC_SNAPSHOT) {
        return emu_server_error(
            err, 72, "atClusterTime field can be set only if level is equal to snapshot");
    }
    if (rc->has_at && rc->at_t == 0 && rc->at_i == 0) {
        return emu_server_error(err, 72, "atClusterTime cannot be a null timestamp");
    }
    if (rc->has_after && rc->after_t == 0 && rc->after_i == 0) {
        return emu_server_error(err, 72, "afterClusterTime cannot be a null timestamp");
    }
    return 0;
}

/* MongoDB refuses a target time the cluster has not reached yet. */
static int check_not_future(emu_server_t *srv, const char *what, uint32_t t, uint32_t i,
                            mc_error_t *err)
{
    if (ts_cmp(t, i, srv->clock_secs, srv->clock_inc) > 0) {
        return emu_server_error(
            err, 72,
            "readConcern %s value must not be greater than the current clusterTime. "
            "Requested clusterTime: Timestamp(%u, %u); current clusterTime: "
            "Timestamp(%u, %u)",
            what, t, i, srv->clock_secs, srv->clock_inc);
    }
    return 0;
}

int emu_read_at(emu_server_t *srv, const char *cmd_name, const bson_t *cmd, bool supports_snapshot,
                emu_read_at_t *at, mc_error_t *err)
{
    emu_read_concern_t rc;
    memset(at, 0, sizeof *at);
    if (emu_read_concern_parse(cmd, &rc, err) != 0) {
        return MC_ESERVER;
    }
    if (rc.has_after && check_not_future(srv, "afterClusterTime", rc.after_t, rc.after_i, err)) {
        return MC_ESERVER;
    }
    if (!rc.has_level || rc.level != EMU_RC_SNAPSHOT) {
        return 0;
    }
    if (!supports_snapshot) {
        return emu_server_error(
            err, 72,
            "Command %s does not support { readConcern: { level: \"snapshot\" } } :: "
            "caused by :: read concern snapshot not supported",
            cmd_name);
    }
    if (srv->opts.standalone) {
        return emu_server_error(
            err, 123, "node needs to be a replica set member to use readConcern: snapshot");
    }
    if (rc.has_at) {
        if (check_not_future(srv, "atClusterTime", rc.at_t, rc.at_i, err) != 0) {
            return MC_ESERVER;
        }
        at->t = rc.at_t;
        at->i = rc.at_i;
    } else {
        /* The majority-committed snapshot: on a single node, everything written so far. */
        at->t = srv->clock_secs;
        at->i = srv->clock_inc;
        if (rc.has_after && ts_cmp(at->t, at->i, rc.after_t, rc.after_i) < 0) {
            at->t = rc.after_t;
            at->i = rc.after_i;
        }
    }
    if (emu_history_check_readable(srv, at->t, at->i, err) != 0) {
        return MC_ESERVER;
    }
    at->snapshot = true;
    return 0;
}

/* ---- sessions ---- */

int emu_sessions_init(emu_server_t *srv, mc_error_t *err)
{
    emu_sessions_t *s = calloc(1, sizeof *s);
    if (s) {
        s->locks = calloc(256, sizeof *s->locks);
    }
    if (!s || !s->locks) {
        free(s);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                            "out of memory creating the session table");
    }
    s->lock_mask = 255;
    s->lifetime_secs = EMU_TXN_DEFAULT_LIFETIME_SECS;
    srv->sessions = s;
    return 0;
}

static size_t bucket_of(const uint8_t id[16])
{
    uint64_t h;
    memcpy(&h, id + 8, sizeof h); /* version-4 UUIDs are random here */
    return (size_t)(h % SESSION_BUCKETS);
}

static void txn_free(emu_server_t *srv, emu_txn_t *txn);

void emu_sessions_cleanup(emu_server_t *srv)
{
    emu_sessions_t *s = srv->sessions;
    if (!s) {
        return;
    }
    for (size_t b = 0; b < SESSION_BUCKETS; b++) {
        emu_session_t *ses = s->buckets[b];
        while (ses) {
            emu_session_t *next = ses->next;
            if (ses->txn) {
                txn_free(srv, ses->txn);
            }
            free(ses);
            ses = next;
        }
    }
    free(s->locks);
    free(s);
    srv->sessions = NULL;
}

static emu_session_t *session_find(emu_server_t *srv, const uint8_t id[16])
{
    for (emu_session_t *ses = srv->sessions->buckets[bucket_of(id)]; ses; ses = ses->next) {
        if (memcmp(ses->id, id, 16) == 0) {
            return ses;
        }
    }
    return NULL;
}

static void session_unlink(emu_server_t *srv, emu_session_t *victim)
{
    emu_session_t **pp = &srv->sessions->buckets[bucket_of(victim->id)];
    while (*pp) {
        if (*pp == victim) {
            *pp = victim->next;
            srv->sessions->count--;
            return;
        }
        pp = &(*pp)->next;
    }
}

/* Forgets sessions idle for longer than logicalSessionTimeoutMinutes (their transactions are
 * long gone: the lifetime limit is far shorter). */
static void expire_sessions(emu_server_t *srv)
{
    int64_t now = emu_now_ms();
    for (size_t b = 0; b < SESSION_BUCKETS; b++) {
        emu_session_t **pp = &srv->sessions->buckets[b];
        while (*pp) {
            emu_session_t *ses = *pp;
            if (!ses->txn && now - ses->last_use_ms > SESSION_IDLE_MS) {
                *pp = ses->next;
                srv->sessions->count--;
                free(ses);
            } else {
                pp = &ses->next;
            }
        }
    }
}

static emu_session_t *session_get(emu_server_t *srv, const uint8_t id[16], mc_error_t *err)
{
    emu_session_t *ses = session_find(srv, id);
    if (!ses) {
        if (srv->sessions->count >= EMU_MAX_SESSIONS) {
            expire_sessions(srv);
        }
        if (srv->sessions->count >= EMU_MAX_SESSIONS) {
            emu_server_error(
                err, 261,
                "Unable to add session into the cache because the number of active sessions "
                "is too high");
            return NULL;
        }
        ses = calloc(1, sizeof *ses);
        if (!ses) {
            emu_server_error(err, 146, "out of memory");
            return NULL;
        }
        memcpy(ses->id, id, 16);
        ses->active = -1;
        size_t b = bucket_of(id);
        ses->next = srv->sessions->buckets[b];
        srv->sessions->buckets[b] = ses;
        srv->sessions->count++;
    }
    ses->last_use_ms = emu_now_ms();
    return ses;
}

/* The session as MongoDB prints it in messages: { id: UUID("..."), uid: BinData(0, ...) }. */
static void session_text(const uint8_t id[16], char *buf, size_t size)
{
    char uid[65];
    emu_cstoken_hex(no_auth_uid, 32, uid);
    snprintf(
        buf, size,
        "{ id: UUID(\"%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\"), "
        "uid: BinData(0, %s) }",
        id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7], id[8], id[9], id[10], id[11],
        id[12], id[13], id[14], id[15], uid);
}

/* ---- the lock table ---- */

static uint64_t doc_hash(const char *db, const char *coll, uint64_t key_hash)
{
    uint64_t h = key_hash;
    h ^= emu_key_hash((const uint8_t *)db, strlen(db)) * 31;
    h ^= emu_key_hash((const uint8_t *)coll, strlen(coll)) * 131;
    return h;
}

static bool doc_is(const txn_doc_t *d, const char *db, const char *coll, const uint8_t *key,
                   size_t key_len)
{
    return d->key_len == key_len && memcmp(d->key, key, key_len) == 0 && strcmp(d->ns, db) == 0 &&
           strcmp(d->ns + d->db_len + 1, coll) == 0;
}

static txn_doc_t *lock_find(emu_sessions_t *s, const char *db, const char *coll, const uint8_t *key,
                            size_t key_len, uint64_t key_hash)
{
    uint64_t h = doc_hash(db, coll, key_hash);
    for (txn_doc_t *d = s->locks[h & s->lock_mask]; d; d = d->next_hash) {
        if (doc_is(d, db, coll, key, key_len)) {
            return d;
        }
    }
    return NULL;
}

static void lock_grow(emu_sessions_t *s)
{
    size_t size = (s->lock_mask + 1) * 2;
    txn_doc_t **nb = calloc(size, sizeof *nb);
    if (!nb) {
        return; /* longer chains, still correct */
    }
    for (size_t b = 0; b <= s->lock_mask; b++) {
        txn_doc_t *d = s->locks[b];
        while (d) {
            txn_doc_t *next = d->next_hash;
            uint64_t h = doc_hash(d->ns, d->ns + d->db_len + 1, d->hash);
            d->next_hash = nb[h & (size - 1)];
            nb[h & (size - 1)] = d;
            d = next;
        }
    }
    free(s->locks);
    s->locks = nb;
    s->lock_mask = size - 1;
}

static void lock_remove(emu_sessions_t *s, txn_doc_t *d)
{
    uint64_t h = doc_hash(d->ns, d->ns + d->db_len + 1, d->hash);
    txn_doc_t **pp = &s->locks[h & s->lock_mask];
    while (*pp) {
        if (*pp == d) {
            *pp = d->next_hash;
            s->lock_count--;
            return;
        }
        pp = &(*pp)->next_hash;
    }
}

/* ---- transactions ---- */

static void op_free(txn_op_t *op)
{
    bson_free(op->db);
    bson_free(op->coll);
    if (op->doc_key) {
        bson_destroy(op->doc_key);
    }
    if (op->pre) {
        bson_destroy(op->pre);
    }
    if (op->post) {
        bson_destroy(op->post);
    }
    if (op->update_desc) {
        bson_destroy(op->update_desc);
    }
}

/* Releases a transaction: its locks, its operations and its place in the open list. */
static void txn_free(emu_server_t *srv, emu_txn_t *txn)
{
    emu_sessions_t *s = srv->sessions;
    txn_doc_t *d = txn->docs;
    while (d) {
        txn_doc_t *next = d->next_own;
        lock_remove(s, d);
        free(d->ns);
        free(d->key);
        free(d);
        d = next;
    }
    for (size_t k = 0; k < txn->n_ops; k++) {
        op_free(&txn->ops[k]);
    }
    free(txn->ops);
    if (txn->prev_open) {
        txn->prev_open->next_open = txn->next_open;
    } else if (s->open == txn) {
        s->open = txn->next_open;
    }
    if (txn->next_open) {
        txn->next_open->prev_open = txn->prev_open;
    }
    if (txn->session && txn->session->txn == txn) {
        txn->session->txn = NULL;
    }
    free(txn);
}

/* Ends the session's open transaction without applying it. Waiting writers wake up. */
static void txn_abort(emu_server_t *srv, emu_session_t *ses)
{
    if (ses->txn) {
        txn_free(srv, ses->txn);
        ses->txn = NULL;
        pthread_cond_broadcast(&srv->oplog_cond);
    }
    if (ses->state == SES_TXN_OPEN) {
        ses->state = SES_TXN_ABORTED;
    }
}

static emu_txn_t *txn_start(emu_server_t *srv, emu_session_t *ses, int64_t txn_number, uint32_t t,
                            uint32_t i)
{
    emu_txn_t *txn = calloc(1, sizeof *txn);
    if (!txn) {
        return NULL;
    }
    txn->session = ses;
    txn->txn_number = txn_number;
    txn->read_t = t;
    txn->read_i = i;
    txn->started_ms = emu_now_ms();
    txn->next_open = srv->sessions->open;
    if (txn->next_open) {
        txn->next_open->prev_open = txn;
    }
    srv->sessions->open = txn;
    ses->txn = txn;
    ses->state = SES_TXN_OPEN;
    ses->active = txn_number;
    return txn;
}

void emu_txn_reap(emu_server_t *srv)
{
    emu_sessions_t *s = srv->sessions;
    int64_t now = emu_now_ms();
    emu_txn_t *txn = s->open;
    while (txn) {
        emu_txn_t *next = txn->next_open;
        if (now - txn->started_ms > s->lifetime_secs * 1000) {
            txn_abort(srv, txn->session);
        }
        txn = next;
    }
}

int64_t emu_txn_set_lifetime(emu_server_t *srv, int64_t secs)
{
    int64_t was = srv->sessions->lifetime_secs;
    srv->sessions->lifetime_secs = secs;
    emu_txn_reap(srv);
    return was;
}

int64_t emu_txn_lifetime(emu_server_t *srv)
{
    return srv->sessions->lifetime_secs;
}

void emu_txn_read_time(const emu_txn_t *txn, uint32_t *t, uint32_t *i)
{
    *t = txn->read_t;
    *i = txn->read_i;
}

bool emu_txn_own_version(const emu_txn_t *txn, const char *db, const char *coll, const uint8_t *key,
                         size_t key_len, uint64_t hash, const bson_t **doc, const bson_t **id_doc)
{
    (void)hash;
    for (const txn_doc_t *d = txn->docs; d; d = d->next_own) {
        if (d->hash == hash && doc_is(d, db, coll, key, key_len)) {
            *doc = d->doc;
            if (id_doc) {
                *id_doc = d->id_doc;
            }
            return true;
        }
    }
    return false;
}

void emu_txn_each_own(const emu_txn_t *txn, const char *db, const char *coll, emu_txn_doc_fn fn,
                      void *ctx)
{
    for (const txn_doc_t *d = txn->docs; d; d = d->next_own) {
        if (strcmp(d->ns, db) == 0 && strcmp(d->ns + d->db_len + 1, coll) == 0) {
            fn(ctx, d->key, d->key_len, d->hash, d->id_doc, d->doc);
        }
    }
}

static int write_conflict(mc_error_t *err)
{
    return emu_server_error(
        err, 112,
        "WriteConflict error: this operation conflicted with another operation. Please "
        "retry your operation or multi-document transaction.");
}

static bson_t *copy_or_null(const bson_t *b)
{
    return b ? bson_copy(b) : NULL;
}

int emu_txn_write(emu_server_t *srv, emu_txn_t *txn, const emu_txn_write_t *w, mc_error_t *err)
{
    emu_sessions_t *s = srv->sessions;
    const bson_t *with_id = w->post ? w->post : w->pre;
    emu_kbuf_t key;
    bson_iter_t it;
    int rc = 0;

    if (!with_id || !bson_iter_init_find(&it, with_id, "_id")) {
        return emu_server_error(err, 2, "document has no _id");
    }
    emu_kbuf_init(&key);
    if (!emu_id_key(with_id, &key)) {
        emu_kbuf_destroy(&key);
        return emu_server_error(err, 15, "_id nested too deeply");
    }
    uint64_t kh = emu_key_hash(key.data, key.len);
    txn_doc_t *d = lock_find(s, w->db, w->coll, key.data, key.len, kh);
    emu_coll_t *c = emu_catalog_coll(srv, w->db, w->coll);
    if (d && d->owner != txn) {
        rc = write_conflict(err);
        goto done;
    }
    if (!d && c) {
        /* First write of this document by the transaction: anybody who committed a version
         * after the snapshot wins. */
        if (emu_history_check_readable(srv, txn->read_t, txn->read_i, err) != 0) {
            rc = MC_ESERVER;
            goto done;
        }
        if (emu_view_changed_since(srv, c->uuid, key.data, key.len, kh, txn->read_t, txn->read_i)) {
            rc = write_conflict(err);
            goto done;
        }
    }
    size_t add = (w->pre ? w->pre->len : 0) + (w->post ? w->post->len : 0);
    if (txn->bytes + add > EMU_TXN_MAX_BYTES) {
        rc = emu_server_error(
            err, 257,
            "Total size of all transaction operations must be less than %zu. Actual "
            "size is %zu",
            EMU_TXN_MAX_BYTES, txn->bytes + add);
        goto done;
    }
    if (txn->n_ops == txn->cap_ops) {
        size_t cap = txn->cap_ops ? txn->cap_ops * 2 : 8;
        txn_op_t *ops = realloc(txn->ops, cap * sizeof *ops);
        if (!ops) {
            rc = emu_server_error(err, 146, "out of memory");
            goto done;
        }
        txn->ops = ops;
        txn->cap_ops = cap;
    }
    txn_op_t *op = &txn->ops[txn->n_ops];
    memset(op, 0, sizeof *op);
    op->op = w->op;
    op->db = str_dup(w->db);
    op->coll = str_dup(w->coll);
    if (c) {
        op->has_uuid = true;
        memcpy(op->uuid, c->uuid, 16);
    }
    op->doc_key = bson_new();
    bson_append_iter(op->doc_key, "_id", 3, &it);
    op->pre = copy_or_null(w->pre);
    op->post = copy_or_null(w->post);
    op->update_desc = copy_or_null(w->update_desc);
    txn->n_ops++;
    txn->bytes += add;

    if (!d) {
        size_t dl = strlen(w->db), cl = strlen(w->coll);
        d = calloc(1, sizeof *d);
        char *ns = malloc(dl + cl + 2);
        if (!d || !ns) {
            free(d);
            free(ns);
            rc = emu_server_error(err, 146, "out of memory");
            goto done;
        }
        memcpy(ns, w->db, dl + 1);
        memcpy(ns + dl + 1, w->coll, cl + 1);
        d->ns = ns;
        d->db_len = dl;
        d->owner = txn;
        d->key = key.data; /* taken over */
        d->key_len = (uint32_t)key.len;
        d->hash = kh;
        emu_kbuf_init(&key);
        d->id_doc = op->doc_key;
        d->next_own = txn->docs;
        txn->docs = d;
        uint64_t h = doc_hash(w->db, w->coll, kh);
        d->next_hash = s->locks[h & s->lock_mask];
        s->locks[h & s->lock_mask] = d;
        if (++s->lock_count > 2 * (s->lock_mask + 1)) {
            lock_grow(s);
        }
    }
    d->doc = op->post;
done:
    emu_kbuf_destroy(&key);
    return rc;
}

bool emu_txn_doc_locked(emu_server_t *srv, const emu_txn_t *self, const char *db, const char *coll,
                        const bson_t *id_doc)
{
    emu_sessions_t *s = srv->sessions;
    emu_kbuf_t key;
    if (s->lock_count == 0) {
        return false;
    }
    emu_kbuf_init(&key);
    bool locked = false;
    if (emu_id_key(id_doc, &key)) {
        txn_doc_t *d = lock_find(s, db, coll, key.data, key.len, emu_key_hash(key.data, key.len));
        locked = d && d->owner != self;
    }
    emu_kbuf_destroy(&key);
    return locked;
}

int emu_txn_wait(emu_conn_t *conn, const struct timespec *deadline, mc_error_t *err)
{
    emu_server_t *srv = conn->srv;
    struct timespec now, until;

    clock_gettime(CLOCK_REALTIME, &now);
    /* Wake at least once a second to let the lifetime limit abort a forgotten transaction. */
    until = now;
    until.tv_sec += 1;
    if (deadline->tv_sec != 0 &&
        (deadline->tv_sec < until.tv_sec ||
         (deadline->tv_sec == until.tv_sec && deadline->tv_nsec < until.tv_nsec))) {
        until = *deadline;
    }
    if (srv->shutting_down) {
        return emu_server_error(err, 11600, "interrupted at shutdown");
    }
    int w = pthread_cond_timedwait(&srv->oplog_cond, &srv->lock, &until);
    if (srv->shutting_down) {
        return emu_server_error(err, 11600, "interrupted at shutdown");
    }
    emu_txn_reap(srv);
    if (w == ETIMEDOUT && deadline->tv_sec != 0) {
        clock_gettime(CLOCK_REALTIME, &now);
        if (now.tv_sec > deadline->tv_sec ||
            (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec)) {
            return emu_server_error(err, 50, "operation exceeded time limit");
        }
    }
    return 0;
}

/* ---- commit ---- */

static long slot_of(emu_coll_t *c, const bson_t *doc_key)
{
    bson_iter_t it;
    if (!c || !bson_iter_init_find(&it, doc_key, "_id")) {
        return -1;
    }
    return emu_coll_find_id(c, bson_iter_value(&it));
}

/* Applies one operation to the catalog; `*cp` gets its collection. */
static int apply_op(emu_server_t *srv, const txn_op_t *op, emu_coll_t **cp, mc_error_t *err)
{
    emu_coll_t *c = emu_catalog_coll(srv, op->db, op->coll);
    if (op->has_uuid && (!c || memcmp(c->uuid, op->uuid, 16) != 0)) {
        /* The collection was dropped or replaced since the transaction wrote to it. */
        return write_conflict(err);
    }
    if (!c && op->op == EMU_OP_INSERT) {
        c = emu_catalog_coll_get_or_create(srv, op->db, op->coll, NULL, err);
        if (!c) {
            return MC_ESERVER;
        }
    }
    *cp = c;
    if (!c) {
        return write_conflict(err);
    }
    if (op->op == EMU_OP_INSERT) {
        if (emu_coll_insert(c, op->post, NULL, err) != 0) {
            return err && err->domain == MC_DOMAIN_MONGODB && err->cause == 11000
                       ? write_conflict(err)
                       : MC_ESERVER;
        }
        return 0;
    }
    long slot = slot_of(c, op->doc_key);
    if (slot < 0) {
        return write_conflict(err);
    }
    if (op->op == EMU_OP_DELETE) {
        emu_coll_delete(c, (size_t)slot);
        return 0;
    }
    if (emu_coll_replace(c, (size_t)slot, op->post, NULL, err) != 0) {
        return write_conflict(err);
    }
    return 0;
}

/* Undoes an applied operation from its pre-image (the inverse always fits: it restores a
 * state the catalog had a moment ago). */
static void undo_op(emu_server_t *srv, const txn_op_t *op)
{
    emu_coll_t *c = emu_catalog_coll(srv, op->db, op->coll);
    long slot = slot_of(c, op->doc_key);
    switch (op->op) {
    case EMU_OP_INSERT:
        if (slot >= 0) {
            emu_coll_delete(c, (size_t)slot);
        }
        break;
    case EMU_OP_DELETE:
        if (c && op->pre) {
            emu_coll_insert(c, op->pre, NULL, NULL);
        }
        break;
    default:
        if (slot >= 0 && op->pre) {
            emu_coll_replace(c, (size_t)slot, op->pre, NULL, NULL);
        }
        break;
    }
}

/* The lsid of the session as the oplog (and so each change event) records it: the client's
 * id plus the uid of the (unauthenticated) user. */
static void event_lsid(bson_t *out, const uint8_t id[16])
{
    bson_init(out);
    BSON_APPEND_BINARY(out, "id", BSON_SUBTYPE_UUID, id, 16);
    BSON_APPEND_BINARY(out, "uid", BSON_SUBTYPE_BINARY, no_auth_uid, sizeof no_auth_uid);
}

static int txn_commit(emu_server_t *srv, emu_session_t *ses, mc_error_t *err)
{
    emu_txn_t *txn = ses->txn;
    size_t n = txn->n_ops;
    emu_coll_t **colls = n ? calloc(n, sizeof *colls) : NULL;
    emu_change_t *ch = n ? calloc(n, sizeof *ch) : NULL;
    int rc = 0;

    if (n && (!colls || !ch)) {
        free(colls);
        free(ch);
        return emu_server_error(err, 146, "out of memory committing the transaction");
    }
    size_t applied = 0;
    for (; applied < n; applied++) {
        rc = apply_op(srv, &txn->ops[applied], &colls[applied], err);
        if (rc != 0) {
            break;
        }
    }
    if (rc != 0) {
        while (applied > 0) {
            applied--;
            undo_op(srv, &txn->ops[applied]);
        }
        free(colls);
        free(ch);
        return rc;
    }
    for (size_t k = 0; k < n; k++) {
        const txn_op_t *op = &txn->ops[k];
        emu_coll_t *c = colls[k];
        ch[k].op = op->op;
        ch[k].db = op->db;
        ch[k].coll = op->coll;
        ch[k].coll_uuid = c->uuid;
        ch[k].document_key = op->doc_key;
        ch[k].full_document = op->post;
        ch[k].pre_image = c->images ? op->pre : NULL;
        ch[k].images_enabled = c->images;
        ch[k].update_description = op->update_desc;
    }
    if (n > 0) {
        bson_t lsid;
        event_lsid(&lsid, ses->id);
        emu_oplog_append_txn(srv, ch, n, &lsid, txn->txn_number);
        bson_destroy(&lsid);
        for (size_t k = 0; k < n; k++) {
            emu_history_record(srv, colls[k]->uuid, txn->ops[k].doc_key, txn->ops[k].pre);
        }
        for (size_t k = 0; k < n; k++) {
            if (k == 0 || colls[k] != colls[k - 1]) {
                emu_coll_maybe_compact(colls[k]);
            }
        }
    }
    free(colls);
    free(ch);
    txn_free(srv, txn);
    ses->txn = NULL;
    ses->state = SES_TXN_COMMITTED;
    pthread_cond_broadcast(&srv->oplog_cond);
    return 0;
}

/* ---- commands ---- */

static bool is_retryable_write_command(const char *name)
{
    return strcmp(name, "insert") == 0 || strcmp(name, "update") == 0 ||
           strcmp(name, "delete") == 0 || strcmp(name, "findAndModify") == 0 ||
           strcmp(name, "findandmodify") == 0;
}

static bool is_commit_or_abort(const char *name)
{
    return strcmp(name, "commitTransaction") == 0 || strcmp(name, "abortTransaction") == 0;
}

/* MongoDB 6.0's allowlist of commands that may run in a transaction (create and createIndexes
 * are on it too; the emulator refuses them, see docs/ARCHITECTURE.md). */
static bool allowed_in_txn(const char *name)
{
    static const char *const ok[] = {"abortTransaction", "aggregate",     "commitTransaction",
                                     "delete",           "distinct",      "find",
                                     "findandmodify",    "findAndModify", "getMore",
                                     "insert",           "killCursors",   "update"};
    for (size_t k = 0; k < sizeof ok / sizeof ok[0]; k++) {
        if (strcmp(name, ok[k]) == 0) {
            return true;
        }
    }
    return false;
}

/* An optional boolean session field: *present and *value; 14 for another type. */
static int bool_field(const bson_t *cmd, const char *name, bool *present, bool *value,
                      mc_error_t *err)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, cmd, name)) {
        return 0;
    }
    if (!BSON_ITER_HOLDS_BOOL(&it)) {
        return emu_server_error(
            err, 14,
            "BSON field 'OperationSessionInfo.%s' is the wrong type '%s', expected "
            "type 'bool'",
            name, emu_type_name(bson_iter_type(&it)));
    }
    *present = true;
    *value = bson_iter_bool(&it);
    return 0;
}

/* Reads lsid, txnNumber, autocommit and startTransaction with their types checked. */
static int parse_session_fields(const bson_t *cmd, emu_cmd_session_t *cs, bool *autocommit,
                                bool *start, mc_error_t *err)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, cmd, "lsid")) {
        bson_iter_t f;
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            return emu_server_error(
                err, 14,
                "BSON field 'OperationSessionInfo.lsid' is the wrong type '%s', "
                "expected type 'object'",
                emu_type_name(bson_iter_type(&it)));
        }
        bson_iter_recurse(&it, &f);
        if (!bson_iter_find(&f, "id")) {
            return emu_server_error(
                err, 40414,
                "BSON field 'OperationSessionInfo.lsid.id' is missing but a required "
                "field");
        }
        bson_subtype_t sub = BSON_SUBTYPE_BINARY;
        uint32_t len = 0;
        const uint8_t *data = NULL;
        if (BSON_ITER_HOLDS_BINARY(&f)) {
            bson_iter_binary(&f, &sub, &len, &data);
        }
        if (!BSON_ITER_HOLDS_BINARY(&f) || sub != BSON_SUBTYPE_UUID || len != 16) {
            return emu_server_error(err, 207,
                                    "BSON field 'OperationSessionInfo.lsid.id' must be a UUID");
        }
        memcpy(cs->lsid, data, 16);
        cs->has_lsid = true;
    }
    if (bson_iter_init_find(&it, cmd, "txnNumber")) {
        if (BSON_ITER_HOLDS_INT64(&it)) {
            cs->txn_number = bson_iter_int64(&it);
        } else if (BSON_ITER_HOLDS_INT32(&it)) {
            cs->txn_number = bson_iter_int32(&it);
        } else {
            return emu_server_error(
                err, 14,
                "BSON field 'OperationSessionInfo.txnNumber' is the wrong type '%s', "
                "expected type 'long'",
                emu_type_name(bson_iter_type(&it)));
        }
        cs->has_txn_number = true;
    }
    if (bool_field(cmd, "autocommit", &cs->has_autocommit, autocommit, err) != 0 ||
        bool_field(cmd, "startTransaction", &cs->has_start, start, err) != 0) {
        return MC_ESERVER;
    }
    return 0;
}

/* The checks of MongoDB's initializeOperationSessionInfo. */
static int check_session_fields(emu_server_t *srv, const emu_cmd_session_t *cs, bool autocommit,
                                bool start, mc_error_t *err)
{
    if (!cs->has_lsid && cs->has_txn_number) {
        return emu_server_error(err, 72,
                                "Transaction number requires a session ID to also be specified");
    }
    if (cs->has_txn_number && srv->opts.standalone) {
        return emu_server_error(
            err, 20, "Transaction numbers are only allowed on a replica set member or mongos");
    }
    if (cs->has_txn_number && cs->txn_number < 0) {
        return emu_server_error(err, 72, "Transaction number cannot be negative");
    }
    if (!cs->has_txn_number && cs->has_autocommit) {
        return emu_server_error(
            err, 72, "'autocommit' field requires a transaction number to also be specified");
    }
    if (cs->has_autocommit && autocommit) {
        return emu_server_error(err, 72, "Specifying autocommit=true is not allowed.");
    }
    if (!cs->has_autocommit && cs->has_start) {
        return emu_server_error(err, 72,
                                "'startTransaction' field requires 'autocommit' field to also be "
                                "specified");
    }
    if (cs->has_start && !start) {
        return emu_server_error(err, 72, "Specifying startTransaction=false is not allowed.");
    }
    return 0;
}

/* The command's session. A txnNumber older than the session's active one is refused with
 * TransactionTooOld (225), worded for a retryable write or for a transaction. */
static emu_session_t *session_for(emu_server_t *srv, const emu_cmd_session_t *cs, bool retryable,
                                  mc_error_t *err)
{
    emu_session_t *ses = session_get(srv, cs->lsid, err);
    if (ses && cs->txn_number < ses->active) {
        char text[200];
        session_text(cs->lsid, text, sizeof text);
        if (retryable) {
            emu_server_error(err, 225,
                             "Retryable write with txnNumber %lld is prohibited on session %s "
                             "because a newer transaction with txnNumber %lld has already started "
                             "on this session.",
                             (long long)cs->txn_number, text, (long long)ses->active);
        } else {
            emu_server_error(err, 225,
                             "Cannot start transaction %lld on session %s because a newer "
                             "transaction %lld has already started.",
                             (long long)cs->txn_number, text, (long long)ses->active);
        }
        return NULL;
    }
    return ses;
}

/* A retryable write's txnNumber (the emulator does not replay a retried write's result). */
static int begin_retryable(emu_server_t *srv, const char *name, const emu_cmd_session_t *cs,
                           mc_error_t *err)
{
    if (!is_retryable_write_command(name) && !is_commit_or_abort(name)) {
        return emu_server_error(
            err, 50768,
            "txnNumber may only be provided for multi-document transactions and "
            "retryable write commands. autocommit:false was not provided, and %s is "
            "not a retryable write command.",
            name);
    }
    if (is_commit_or_abort(name)) {
        return 0; /* the command itself reports that it needs a transaction */
    }
    emu_session_t *ses = session_for(srv, cs, true, err);
    if (!ses) {
        return MC_ESERVER;
    }
    if (cs->txn_number > ses->active) {
        txn_abort(srv, ses);
        ses->active = cs->txn_number;
        ses->state = SES_RETRYABLE;
    } else if (ses->state != SES_RETRYABLE) {
        return emu_server_error(err, 217,
                                "Cannot retry a retryable write that has been converted into a "
                                "transaction");
    }
    return 0;
}

/* readConcern on the first command of a transaction: its snapshot time. */
static int txn_read_time(emu_server_t *srv, const bson_t *cmd, uint32_t *t, uint32_t *i,
                         mc_error_t *err)
{
    emu_read_concern_t rc;
    if (emu_read_concern_parse(cmd, &rc, err) != 0) {
        return MC_ESERVER;
    }
    if (rc.has_level && rc.level != EMU_RC_LOCAL && rc.level != EMU_RC_MAJORITY &&
        rc.level != EMU_RC_SNAPSHOT) {
        return emu_server_error(
            err, 72,
            "The readConcern level must be either 'local' (default), 'majority' or "
            "'snapshot' in order to run in a transaction");
    }
    if (rc.has_after && check_not_future(srv, "afterClusterTime", rc.after_t, rc.after_i, err)) {
        return MC_ESERVER;
    }
    *t = srv->clock_secs;
    *i = srv->clock_inc;
    if (rc.has_at) {
        if (check_not_future(srv, "atClusterTime", rc.at_t, rc.at_i, err) != 0) {
            return MC_ESERVER;
        }
        *t = rc.at_t;
        *i = rc.at_i;
        return emu_history_check_readable(srv, *t, *i, err);
    }
    return 0;
}

static int begin_in_txn(emu_conn_t *conn, const char *name, const char *db, const bson_t *cmd,
                        emu_cmd_session_t *cs, mc_error_t *err)
{
    emu_server_t *srv = conn->srv;
    if (strcmp(name, "count") == 0) {
        return emu_server_error(
            err, 263,
            "Cannot run 'count' in a multi-document transaction. Please see "
            "http://dochub.mongodb.org/core/transaction-count for a recommended "
            "alternative.");
    }
    if (!allowed_in_txn(name)) {
        return emu_server_error(err, 263, "Cannot run '%s' in a multi-document transaction.", name);
    }
    if (strcmp(db, "config") == 0 || strcmp(db, "local") == 0 ||
        (strcmp(db, "admin") == 0 && !is_commit_or_abort(name))) {
        return emu_server_error(
            err, 263, "Cannot run command against the '%s' database in a transaction.", db);
    }
    emu_session_t *ses = session_for(srv, cs, false, err);
    if (!ses) {
        return MC_ESERVER;
    }
    if (cs->has_start) {
        if (cs->txn_number == ses->active) {
            return emu_server_error(
                err, 117,
                "Only servers in a sharded cluster can start a new transaction at the "
                "active transaction number");
        }
        uint32_t t = 0, i = 0;
        if (txn_read_time(srv, cmd, &t, &i, err) != 0) {
            return MC_ESERVER;
        }
        txn_abort(srv, ses); /* a newer transaction aborts the open one */
        if (!txn_start(srv, ses, cs->txn_number, t, i)) {
            return emu_server_error(err, 146, "out of memory starting a transaction");
        }
    } else {
        if (cs->txn_number != ses->active || ses->state == SES_RETRYABLE ||
            ses->state == SES_NONE) {
            return emu_server_error(err, 251,
                                    "Given transaction number %lld does not match any in-progress "
                                    "transactions. The active transaction number is %lld",
                                    (long long)cs->txn_number, (long long)ses->active);
        }
        if (ses->state == SES_TXN_ABORTED) {
            return emu_server_error(err, 251,
                                    "Transaction with { txnNumber: %lld } has been aborted.",
                                    (long long)cs->txn_number);
        }
        if (ses->state == SES_TXN_COMMITTED && strcmp(name, "commitTransaction") != 0) {
            return emu_server_error(err, 256,
                                    "Transaction with { txnNumber: %lld } has been committed.",
                                    (long long)cs->txn_number);
        }
        if (bson_has_field(cmd, "readConcern")) {
            return emu_server_error(err, 72,
                                    "Only the first command in a transaction may specify a "
                                    "readConcern");
        }
    }
    if (!is_commit_or_abort(name) && bson_has_field(cmd, "writeConcern")) {
        return emu_server_error(err, 72, "Cannot set write concern after starting a transaction.");
    }
    conn->txn = ses->txn;
    cs->in_txn = true;
    return 0;
}

bool emu_session_begin(emu_conn_t *conn, const char *name, const char *db, const bson_t *cmd,
                       emu_cmd_session_t *cs, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    mc_error_t err;
    bool autocommit = false, start = false;
    int rc;

    memset(cs, 0, sizeof *cs);
    conn->txn = NULL;
    mc_error_clear(&err);
    emu_history_expire(srv);
    if (srv->sessions->open) {
        emu_txn_reap(srv);
    }
    rc = parse_session_fields(cmd, cs, &autocommit, &start, &err);
    if (rc == 0) {
        rc = check_session_fields(srv, cs, autocommit, start, &err);
    }
    if (rc == 0 && cs->has_txn_number) {
        rc = cs->has_autocommit ? begin_in_txn(conn, name, db, cmd, cs, &err)
                                : begin_retryable(srv, name, cs, &err);
    }
    if (rc != 0) {
        emu_reply_error_from(reply, &err);
        conn->txn = NULL;
        return false;
    }
    return true;
}

static int reply_code(const bson_t *reply, bool *is_error)
{
    bson_iter_t it;
    *is_error = bson_iter_init_find(&it, reply, "ok") && !bson_iter_as_bool(&it);
    if (*is_error && bson_iter_init_find(&it, reply, "code")) {
        return (int)bson_iter_as_int64(&it);
    }
    return 0;
}

void emu_session_end(emu_conn_t *conn, const char *name, const bson_t *cmd,
                     const emu_cmd_session_t *cs, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    if (cs->in_txn && !is_commit_or_abort(name)) {
        bool is_error = false;
        reply_code(reply, &is_error);
        /* A failed statement (command error or write error) aborts the transaction. */
        if (is_error || bson_has_field(reply, "writeErrors")) {
            emu_session_t *ses = session_find(srv, cs->lsid);
            if (ses && ses->active == cs->txn_number && ses->state == SES_TXN_OPEN) {
                txn_abort(srv, ses);
            }
        }
    }
    emu_add_txn_error_labels(name, cmd, reply);
    conn->txn = NULL;
}

/* ---- error labels ---- */

static bool is_transient_code(int code, bool has_wce, bool commit_or_abort)
{
    switch (code) {
    case 112: /* WriteConflict */
    case 24:  /* LockTimeout */
    case 267: /* PreparedTransactionInProgress */ return true;
    case 239: /* SnapshotTooOld */
    case 246: /* SnapshotUnavailable */
    case 63:  /* StaleShardVersion */
    case 150: /* StaleEpoch */
    case 13388: /* StaleConfig */ return true;
    default: break;
    }
    if (commit_or_abort) {
        return code == 251 && !has_wce;
    }
    return code == 251 || emu_code_is_retriable_error(code);
}

void emu_add_txn_error_labels(const char *name, const bson_t *cmd, bson_t *reply)
{
    bson_iter_t it;
    bool is_error = false;
    int code = reply_code(reply, &is_error);
    int wce_code = 0;

    if (bson_has_field(reply, "errorLabels") || !bson_has_field(cmd, "txnNumber")) {
        return;
    }
    if (bson_iter_init_find(&it, reply, "writeConcernError") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_t c;
        if (bson_iter_recurse(&it, &c) && bson_iter_find(&c, "code")) {
            wce_code = (int)bson_iter_as_int64(&c);
        }
    }
    if (!is_error && wce_code == 0) {
        return;
    }
    bool autocommit = bson_has_field(cmd, "autocommit");
    bool commit_or_abort = is_commit_or_abort(name);
    const char *label = NULL;
    if (autocommit && is_error && is_transient_code(code, wce_code != 0, commit_or_abort)) {
        label = "TransientTransactionError";
    } else if ((!autocommit || commit_or_abort) &&
               ((is_error && emu_code_is_retriable_error(code)) ||
                emu_code_is_retriable_error(wce_code))) {
        label = "RetryableWriteError";
    }
    if (label) {
        emu_reply_add_labels(reply, &label, 1);
    }
}

/* ---- commitTransaction, abortTransaction, endSessions ---- */

static emu_session_t *command_session(emu_conn_t *conn, const bson_t *cmd, int64_t *txn_number)
{
    emu_cmd_session_t cs;
    bool autocommit = false, start = false;
    mc_error_t err;
    memset(&cs, 0, sizeof cs);
    if (parse_session_fields(cmd, &cs, &autocommit, &start, &err) != 0 || !cs.has_lsid ||
        !cs.has_txn_number || !cs.has_autocommit) {
        return NULL;
    }
    *txn_number = cs.txn_number;
    return session_find(conn->srv, cs.lsid);
}

void emu_cmd_commit_transaction(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    int64_t txn_number = -1;
    emu_session_t *ses = command_session(conn, cmd, &txn_number);
    mc_error_t err;
    (void)db;
    if (!ses || ses->active != txn_number) {
        emu_reply_error(reply, 125, "commitTransaction must be run within a transaction");
        return;
    }
    if (ses->state == SES_TXN_COMMITTED) {
        return; /* a retried commit: the outcome is known */
    }
    if (ses->state != SES_TXN_OPEN || !ses->txn) {
        emu_reply_error(reply, 251, "Transaction with { txnNumber: %lld } has been aborted.",
                        (long long)txn_number);
        return;
    }
    mc_error_clear(&err);
    if (txn_commit(conn->srv, ses, &err) != 0) {
        txn_abort(conn->srv, ses);
        emu_reply_error_from(reply, &err);
    }
}

void emu_cmd_abort_transaction(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    int64_t txn_number = -1;
    emu_session_t *ses = command_session(conn, cmd, &txn_number);
    (void)db;
    if (!ses || ses->active != txn_number) {
        emu_reply_error(reply, 125, "abortTransaction must be run within a transaction");
        return;
    }
    if (ses->state == SES_TXN_OPEN) {
        txn_abort(conn->srv, ses);
    }
}

void emu_cmd_end_sessions(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bson_iter_t it, el;
    (void)db;
    (void)reply;
    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it) || !BSON_ITER_HOLDS_ARRAY(&it)) {
        return; /* killSessions with a pattern, or nothing to do */
    }
    bson_iter_recurse(&it, &el);
    while (bson_iter_next(&el)) {
        bson_iter_t f;
        bson_subtype_t sub;
        uint32_t len = 0;
        const uint8_t *data = NULL;
        if (!BSON_ITER_HOLDS_DOCUMENT(&el) || !bson_iter_recurse(&el, &f) ||
            !bson_iter_find(&f, "id") || !BSON_ITER_HOLDS_BINARY(&f)) {
            continue;
        }
        bson_iter_binary(&f, &sub, &len, &data);
        if (len != 16) {
            continue;
        }
        emu_session_t *ses = session_find(srv, data);
        if (ses) {
            txn_abort(srv, ses);
            session_unlink(srv, ses);
            free(ses);
        }
    }
}
