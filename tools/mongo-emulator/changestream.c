/*
 * changestream.c: the oplog (bounded history of changes) and MongoDB 6.0/7.0 change streams:
 * the $changeStream aggregate, getMore with awaitData, killCursors, and oplog truncation.
 *
 * Threads: runs on connection threads, always with srv->lock held (emulator.h). The only
 * blocking point is a getMore with nothing to return, which waits on srv->oplog_cond
 * (pthread_cond_timedwait releases the lock, so writers can append meanwhile).
 *
 * showExpandedEvents follows MongoDB 6.0: DDL entries (create, createIndexes, dropIndexes,
 * modify, and everything about views) are seen only by streams that ask for them, events carry
 * collectionUUID, rename an operationDescription; on 7.0 (--wire-version 21) updates also get
 * disambiguatedPaths. Known differences: no sharding events (shardCollection, ...), no
 * startIndexBuild/abortIndexBuild, no nsType (8.1+).
 *
 * Invariants:
 * - Oplog entries carry strictly increasing sequence numbers and (cluster time, txnOpIndex)
 *   pairs: the writes of one committed transaction share a cluster time and count txnOpIndex
 *   0, 1, ... in order, every other entry has a cluster time of its own. The retained entries
 *   are seq in [first_seq, next_seq), stored in a power-of-two ring at seq & mask.
 * - A cursor's position is the seq of the next entry it has not examined; a position below
 *   first_seq means history it still needed was dropped (286 ChangeStreamHistoryLost).
 * - `floor` is the earliest cluster time at which every later change is still retained:
 *   a start point before it cannot be served (286).
 * - Each entry's event document (for fullDocument "default" and no pre-image) and resume token
 *   are built once at append time and shared by every cursor; other modes copy and extend it.
 * - A cursor that is inside a waiting getMore is `busy`; killCursors on it only marks it
 *   `killed` and unlinks it, and the waiting getMore frees it when it wakes.
 * - A cursor's postBatchResumeToken never goes back: a high-water mark replaces the last
 *   returned token only when its cluster time is later (an empty batch in the middle of a
 *   transaction keeps the last event's token).
 * - With $changeStreamSplitLargeEvent, the fragments of one event are queued in the cursor and
 *   returned before any later entry is examined; each carries its own (v2) resume token.
 *
 * Differences from MongoDB: tokens are v1, as 6.0 makes them, except a split event's fragments,
 * whose fragmentNum MongoDB only allows in v2 tokens (7.0 makes every token v2). Splitting
 * follows 7.0.0: an event of up to 16793600 - 8192 bytes passes whole (later releases also count
 * the size of its resume token).
 */
#include "changestream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agg.h"
#include "bson_helpers.h"
#include "cstoken.h"

#define CS_DEFAULT_OPLOG_MAX 1000000
#define CS_DEFAULT_FIRST_BATCH 101
#define CS_DEFAULT_AWAIT_MS 1000
#define CS_MAX_AWAIT_MS (24LL * 3600 * 1000)
#define CS_BATCH_BYTES (EMU_MAX_BSON_SIZE - 64 * 1024)
#define CS_MAX_CURSORS 100000
#define CS_IDLE_TIMEOUT_MS (10LL * 60 * 1000)
/* BSONObjMaxInternalSize: an event larger than this fails the cursor with BSONObjectTooLarge. */
#define CS_MAX_EVENT_BYTES (16 * 1024 * 1024 + 16 * 1024)
/* $changeStreamSplitLargeEvent's kBSONObjMaxChangeEventSize: larger events are split. */
#define CS_MAX_SPLIT_BYTES (CS_MAX_EVENT_BYTES - 8 * 1024)

static const char *const non_resumable_label[] = {"NonResumableChangeStreamError"};

/* ---- oplog ---- */

typedef struct cs_entry {
    uint64_t seq;
    uint32_t ts_t;
    uint32_t ts_i;
    int64_t wall_ms;
    emu_op_t op;
    char *db; /* one allocation holds db, coll, to_db, to_coll */
    char *coll;
    char *to_db;
    char *to_coll;
    bool has_uuid;
    uint8_t uuid[16];
    bson_t *doc_key;    /* CRUD ops */
    bson_t *pre_image;  /* only when images were enabled */
    bson_t *post_image; /* updates, only when images were enabled */
    bson_t *event;      /* the shared event document */
    uint8_t *token;
    size_t token_len;
    bson_t *op_desc;    /* rename's operationDescription for showExpandedEvents, or NULL */
    bson_t *disamb;     /* update: the disambiguatedPaths of showExpandedEvents on 6.1+ ({}
                         * when NULL) */
    bool expanded_only; /* only streams opened with showExpandedEvents see it */
    bool view;          /* an event about a view: never seen by a collection stream */
    bool in_txn; /* written by a committed transaction */
    uint32_t txn_op_index;
    int64_t txn_number;
    bson_t *lsid; /* {id, uid} of the transaction's session */
} cs_entry_t;

struct emu_oplog {
    cs_entry_t *ring;
    size_t mask; /* ring size - 1; ring size is a power of two */
    uint64_t first_seq;
    uint64_t next_seq;
    size_t max_events;
    bool floor_set;
    uint32_t floor_t;
    uint32_t floor_i;
};

/* ---- cursors ---- */

typedef enum { SCOPE_COLL, SCOPE_DB, SCOPE_CLUSTER } cs_scope_t;
typedef enum { FD_DEFAULT, FD_UPDATE_LOOKUP, FD_WHEN_AVAILABLE, FD_REQUIRED } cs_fulldoc_t;
typedef enum { PRE_OFF, PRE_WHEN_AVAILABLE, PRE_REQUIRED } cs_pre_t;

typedef struct cs_cursor {
    int64_t id;
    cs_scope_t scope;
    char *db;
    char *coll;    /* SCOPE_COLL only */
    char *ns;      /* as replied: "db.coll", "db.$cmd.aggregate" */
    char *ns_coll; /* the part of ns after the first '.', what getMore sends as collection */
    cs_fulldoc_t full_doc;
    cs_pre_t pre;
    bool show_expanded;
    emu_pipeline_t *pipeline; /* user stages after $changeStream, or NULL */

    uint64_t pos;
    bool has_min; /* skip entries before (min_t, min_i) */
    uint32_t min_t;
    uint32_t min_i;

    /* An invalidate that must be returned next (its drop/rename was already consumed). */
    bool pending_inv;
    uint32_t inv_t;
    uint32_t inv_i;
    int64_t inv_wall;
    emu_kbuf_t inv_src_token; /* the token of the event that caused it */

    /* The last token returned, so that a high-water mark never takes the PBRT back. */
    emu_kbuf_t last_token;
    uint32_t last_t;
    uint32_t last_i;

    /* $changeStreamSplitLargeEvent (the last stage of the pipeline). */
    bool split;
    bool split_resume;          /* resuming from a fragment of the entry at pos */
    uint32_t split_resume_frag; /* that fragment's fragmentNum */
    struct cs_frag *frags;      /* fragments of the current event, returned in order */
    size_t n_frags;
    size_t next_frag;

    bool busy;
    bool killed;
    int64_t last_used_ms;
    struct cs_cursor *next;
} cs_cursor_t;

struct emu_cs_cursors {
    cs_cursor_t *head;
    size_t count;
};

/* ---- small helpers ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int ts_cmp(uint32_t at, uint32_t ai, uint32_t bt, uint32_t bi)
{
    if (at != bt) {
        return at < bt ? -1 : 1;
    }
    return ai < bi ? -1 : (ai > bi ? 1 : 0);
}

static void ts_next(uint32_t *t, uint32_t *i)
{
    if (*i == UINT32_MAX) {
        (*t)++;
        *i = 0;
    } else {
        (*i)++;
    }
}

static bool is_system(const char *coll)
{
    return coll && strncmp(coll, "system.", 7) == 0;
}

static bool is_internal_db(const char *db)
{
    return strcmp(db, "admin") == 0 || strcmp(db, "local") == 0 || strcmp(db, "config") == 0;
}

static bool str_eq(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

static int set_err(mc_error_t *err, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int set_err(mc_error_t *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, MC_ESERVER, MC_DOMAIN_MONGODB, code, fmt, ap);
    va_end(ap);
    return MC_ESERVER;
}

/* Error reply from `err`, with NonResumableChangeStreamError for the codes that carry it. */
static void reply_cs_error(bson_t *reply, const mc_error_t *err)
{
    emu_reply_error_from(reply, err);
    if (err->domain == MC_DOMAIN_MONGODB && (err->cause == 280 || err->cause == 286)) {
        emu_reply_add_labels(reply, non_resumable_label, 1);
    }
}

static void reply_ok(bson_t *reply)
{
    if (!bson_has_field(reply, "ok")) {
        BSON_APPEND_DOUBLE(reply, "ok", 1.0);
    }
}

/* A numeric field as int64: int32, int64 or an integral double. */
static bool iter_as_int64(const bson_iter_t *it, int64_t *out)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_INT32: *out = bson_iter_int32(it); return true;
    case BSON_TYPE_INT64: *out = bson_iter_int64(it); return true;
    case BSON_TYPE_DOUBLE: {
        double d = bson_iter_double(it);
        if (!(d >= -9.2e18 && d <= 9.2e18)) {
            return false;
        }
        *out = (int64_t)d;
        return true;
    }
    default: return false;
    }
}

/* A change-stream cursor's batchSize: a number, not negative. `field` and `expected` name the
 * field and its types the way the server's error for that command does. */
static bool read_batch_size(const bson_iter_t *it, const char *field, const char *expected,
                            int64_t *out, bson_t *reply)
{
    if (!iter_as_int64(it, out)) {
        emu_reply_error(reply, 14, "BSON field '%s' is the wrong type '%s', expected %s", field,
                        emu_type_name(bson_iter_type(it)), expected);
        return false;
    }
    if (*out < 0) {
        emu_reply_error(reply, 51024,
                        "BSON field 'batchSize' value must be >= 0, actual value '%lld'",
                        (long long)*out);
        return false;
    }
    return true;
}

/* ---- oplog storage ---- */

static cs_entry_t *entry_at(emu_oplog_t *log, uint64_t seq)
{
    return &log->ring[seq & log->mask];
}

static void entry_free(cs_entry_t *e)
{
    free(e->db);
    if (e->doc_key) {
        bson_destroy(e->doc_key);
    }
    if (e->pre_image) {
        bson_destroy(e->pre_image);
    }
    if (e->post_image) {
        bson_destroy(e->post_image);
    }
    if (e->event) {
        bson_destroy(e->event);
    }
    if (e->op_desc) {
        bson_destroy(e->op_desc);
    }
    if (e->disamb) {
        bson_destroy(e->disamb);
    }
    if (e->lsid) {
        bson_destroy(e->lsid);
    }
    free(e->token);
    memset(e, 0, sizeof *e);
}

static void init_floor(emu_server_t *srv)
{
    emu_oplog_t *log = srv->oplog;
    if (log->floor_set) {
        return;
    }
    /* History begins at the cluster time this emulator had handed out when it first needed
     * the oplog: everything after it is retained until dropped. */
    if (srv->clock_secs != 0) {
        log->floor_t = srv->clock_secs;
        log->floor_i = srv->clock_inc;
    } else {
        log->floor_t = (uint32_t)time(NULL);
        log->floor_i = 0;
    }
    log->floor_set = true;
}

static void drop_oldest(emu_oplog_t *log)
{
    cs_entry_t *e = entry_at(log, log->first_seq);
    log->floor_t = e->ts_t;
    log->floor_i = e->ts_i;
    ts_next(&log->floor_t, &log->floor_i);
    log->floor_set = true;
    entry_free(e);
    log->first_seq++;
}

static bool grow_ring(emu_oplog_t *log)
{
    size_t size = log->mask + 1;
    size_t nsize = size * 2;
    cs_entry_t *nring = calloc(nsize, sizeof *nring);
    if (!nring) {
        return false;
    }
    for (uint64_t s = log->first_seq; s < log->next_seq; s++) {
        nring[s & (nsize - 1)] = log->ring[s & log->mask];
    }
    free(log->ring);
    log->ring = nring;
    log->mask = nsize - 1;
    return true;
}

int emu_changestream_init(emu_server_t *srv, mc_error_t *err)
{
    emu_oplog_t *log = calloc(1, sizeof *log);
    emu_cs_cursors_t *cur = calloc(1, sizeof *cur);
    if (log) {
        log->ring = calloc(1024, sizeof *log->ring);
    }
    if (!log || !cur || !log->ring) {
        if (log) {
            free(log->ring);
        }
        free(log);
        free(cur);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                            "out of memory creating the oplog");
    }
    log->mask = 1023;
    log->first_seq = 1;
    log->next_seq = 1;
    log->max_events =
        srv->opts.oplog_max_events ? srv->opts.oplog_max_events : CS_DEFAULT_OPLOG_MAX;
    srv->oplog = log;
    srv->cs_cursors = cur;
    if (srv->clock_secs != 0) {
        init_floor(srv);
    }
    return 0;
}

static void frags_free(cs_cursor_t *c);

static void cursor_free(cs_cursor_t *c)
{
    if (!c) {
        return;
    }
    frags_free(c);
    emu_kbuf_destroy(&c->last_token);
    free(c->db);
    free(c->coll);
    free(c->ns);
    emu_pipeline_destroy(c->pipeline);
    emu_kbuf_destroy(&c->inv_src_token);
    free(c);
}

void emu_changestream_cleanup(emu_server_t *srv)
{
    if (srv->cs_cursors) {
        cs_cursor_t *c = srv->cs_cursors->head;
        while (c) {
            cs_cursor_t *next = c->next;
            cursor_free(c);
            c = next;
        }
        free(srv->cs_cursors);
        srv->cs_cursors = NULL;
    }
    if (srv->oplog) {
        emu_oplog_t *log = srv->oplog;
        while (log->first_seq < log->next_seq) {
            drop_oldest(log);
        }
        free(log->ring);
        free(log);
        srv->oplog = NULL;
    }
}

static const char *op_name(emu_op_t op)
{
    switch (op) {
    case EMU_OP_INSERT: return "insert";
    case EMU_OP_UPDATE: return "update";
    case EMU_OP_REPLACE: return "replace";
    case EMU_OP_DELETE: return "delete";
    case EMU_OP_DROP: return "drop";
    case EMU_OP_RENAME: return "rename";
    case EMU_OP_DROP_DATABASE: return "dropDatabase";
    case EMU_OP_CREATE: return "create";
    case EMU_OP_CREATE_INDEXES: return "createIndexes";
    case EMU_OP_DROP_INDEXES: return "dropIndexes";
    case EMU_OP_MODIFY: return "modify";
    default: return "unknown";
    }
}

static void append_ns(bson_t *doc, const char *key, const char *db, const char *coll)
{
    bson_t ns;
    bson_append_document_begin(doc, key, -1, &ns);
    bson_append_utf8(&ns, "db", 2, db, -1);
    if (coll) {
        bson_append_utf8(&ns, "coll", 4, coll, -1);
    }
    bson_append_document_end(doc, &ns);
}

/* The event as a real server shows it with fullDocument "default" and no pre-image. */
static void build_event(cs_entry_t *e, const emu_change_t *ch)
{
    bson_t *ev = bson_sized_new(128 + (ch->full_document ? ch->full_document->len : 0));
    if (e->in_txn) {
        /* MongoDB adds these before the resume token, so they lead the event. */
        BSON_APPEND_INT64(ev, "txnNumber", e->txn_number);
        BSON_APPEND_DOCUMENT(ev, "lsid", e->lsid);
    }
    emu_cstoken_append(ev, "_id", e->token, e->token_len);
    BSON_APPEND_UTF8(ev, "operationType", op_name(e->op));
    BSON_APPEND_TIMESTAMP(ev, "clusterTime", e->ts_t, e->ts_i);
    BSON_APPEND_DATE_TIME(ev, "wallTime", e->wall_ms);
    if ((e->op == EMU_OP_INSERT || e->op == EMU_OP_REPLACE)) {
        if (ch->full_document) {
            BSON_APPEND_DOCUMENT(ev, "fullDocument", ch->full_document);
        } else {
            BSON_APPEND_NULL(ev, "fullDocument");
        }
    }
    append_ns(ev, "ns", e->db, e->op == EMU_OP_DROP_DATABASE ? NULL : e->coll);
    if (e->op == EMU_OP_RENAME) {
        append_ns(ev, "to", e->to_db, e->to_coll);
    }
    if (e->doc_key) {
        BSON_APPEND_DOCUMENT(ev, "documentKey", e->doc_key);
    }
    if (e->expanded_only && ch->operation_description) {
        /* Only showExpandedEvents streams see these, so the shared event has them already. */
        BSON_APPEND_DOCUMENT(ev, "operationDescription", ch->operation_description);
    }
    if (e->op == EMU_OP_MODIFY && ch->state_before) {
        BSON_APPEND_DOCUMENT(ev, "stateBeforeChange", ch->state_before);
    }
    if (e->op == EMU_OP_UPDATE) {
        if (ch->update_description) {
            BSON_APPEND_DOCUMENT(ev, "updateDescription", ch->update_description);
        } else {
            bson_t ud, sub;
            BSON_APPEND_DOCUMENT_BEGIN(ev, "updateDescription", &ud);
            BSON_APPEND_DOCUMENT_BEGIN(&ud, "updatedFields", &sub);
            bson_append_document_end(&ud, &sub);
            BSON_APPEND_ARRAY_BEGIN(&ud, "removedFields", &sub);
            bson_append_array_end(&ud, &sub);
            BSON_APPEND_ARRAY_BEGIN(&ud, "truncatedArrays", &sub);
            bson_append_array_end(&ud, &sub);
            bson_append_document_end(ev, &ud);
        }
    }
    e->event = ev;
}

static char *dup_names(const emu_change_t *ch, cs_entry_t *e)
{
    size_t l1 = strlen(ch->db) + 1;
    size_t l2 = ch->coll ? strlen(ch->coll) + 1 : 0;
    size_t l3 = ch->to_db ? strlen(ch->to_db) + 1 : 0;
    size_t l4 = ch->to_coll ? strlen(ch->to_coll) + 1 : 0;
    char *p = malloc(l1 + l2 + l3 + l4);
    if (!p) {
        return NULL;
    }
    e->db = p;
    memcpy(p, ch->db, l1);
    p += l1;
    if (l2) {
        e->coll = p;
        memcpy(p, ch->coll, l2);
        p += l2;
    }
    if (l3) {
        e->to_db = p;
        memcpy(p, ch->to_db, l3);
        p += l3;
    }
    if (l4) {
        e->to_coll = p;
        memcpy(p, ch->to_coll, l4);
    }
    return e->db;
}

/* MongoDB's strict numeric path component: digits without a leading zero ("0" itself is). */
static bool numeric_component(const char *s, size_t n)
{
    if (n == 0 || (n > 1 && s[0] == '0')) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
    }
    return true;
}

/* Adds `path` to `out` when it is ambiguous (6.1+'s disambiguatedPaths): a numeric field name
 * after the first component, told apart from array indices by the containers `doc` has along
 * the path. Entries list the components, array indices as int32. */
static void add_if_ambiguous(const char *path, const bson_t *doc, bson_t *out)
{
    const char *comp[128];
    size_t len[128], n = 0;
    for (const char *p = path; n < 128;) {
        const char *dot = strchr(p, '.');
        comp[n] = p;
        len[n++] = dot ? (size_t)(dot - p) : strlen(p);
        if (!dot) {
            break;
        }
        p = dot + 1;
    }
    bool index[128] = {false}, ambiguous = false;
    bson_iter_t it;
    bool have = bson_iter_init(&it, doc);
    bson_type_t container = BSON_TYPE_DOCUMENT;
    for (size_t i = 0; i < n; i++) {
        index[i] = container == BSON_TYPE_ARRAY && numeric_component(comp[i], len[i]);
        ambiguous |= !index[i] && i > 0 && numeric_component(comp[i], len[i]);
        bool found = false;
        while (have && bson_iter_next(&it)) {
            if (bson_iter_key_len(&it) == len[i] &&
                memcmp(bson_iter_key(&it), comp[i], len[i]) == 0) {
                found = true;
                break;
            }
        }
        container = found ? bson_iter_type(&it) : BSON_TYPE_EOD;
        bson_iter_t child;
        have = found && (container == BSON_TYPE_DOCUMENT || container == BSON_TYPE_ARRAY) &&
               bson_iter_recurse(&it, &child);
        if (have) {
            it = child;
        }
    }
    if (!ambiguous) {
        return;
    }
    bson_t arr;
    bson_append_array_begin(out, path, -1, &arr);
    for (size_t i = 0; i < n; i++) {
        char key[16];
        const char *k;
        bson_uint32_to_string((uint32_t)i, &k, key, sizeof(key));
        if (index[i]) {
            bson_append_int32(&arr, k, -1, (int32_t)strtol(comp[i], NULL, 10));
        } else {
            bson_append_utf8(&arr, k, -1, comp[i], (int)len[i]);
        }
    }
    bson_append_array_end(out, &arr);
}

/* The disambiguatedPaths of an update ({updatedFields, removedFields, truncatedArrays}) whose
 * result is `post`; NULL when no path is ambiguous (the event then shows {}). */
static bson_t *disambiguated_paths(const bson_t *ud, const bson_t *post)
{
    bson_t *out = bson_new();
    bson_iter_t it, f;
    if (bson_iter_init_find(&it, ud, "updatedFields") && bson_iter_recurse(&it, &f)) {
        while (bson_iter_next(&f)) {
            add_if_ambiguous(bson_iter_key(&f), post, out);
        }
    }
    if (bson_iter_init_find(&it, ud, "removedFields") && bson_iter_recurse(&it, &f)) {
        while (bson_iter_next(&f)) {
            if (BSON_ITER_HOLDS_UTF8(&f)) {
                add_if_ambiguous(bson_iter_utf8(&f, NULL), post, out);
            }
        }
    }
    if (bson_iter_init_find(&it, ud, "truncatedArrays") && bson_iter_recurse(&it, &f)) {
        while (bson_iter_next(&f)) {
            bson_iter_t t;
            if (BSON_ITER_HOLDS_DOCUMENT(&f) && bson_iter_recurse(&f, &t) &&
                bson_iter_find(&t, "field") && BSON_ITER_HOLDS_UTF8(&t)) {
                add_if_ambiguous(bson_iter_utf8(&t, NULL), post, out);
            }
        }
    }
    if (bson_empty(out)) {
        bson_destroy(out);
        return NULL;
    }
    return out;
}

/* A committed transaction's part in one entry: MongoDB unwinds the transaction's applyOps
 * entry into one event per operation, each with the session and txnNumber. */
typedef struct cs_txn_ctx {
    const bson_t *lsid;
    int64_t txn_number;
    uint32_t op_index;
} cs_txn_ctx_t;

/* Stores `ch` as the next entry, at cluster time (t, i); `txn` NULL outside a transaction. */
static void append_at(emu_server_t *srv, const emu_change_t *ch, uint32_t t, uint32_t i,
                      const cs_txn_ctx_t *txn)
{
    emu_oplog_t *log = srv->oplog;
    size_t count = (size_t)(log->next_seq - log->first_seq);
    if (count >= log->max_events) {
        drop_oldest(log);
    } else if (count == log->mask + 1 && !grow_ring(log)) {
        drop_oldest(log); /* out of memory: keep working with a shorter history */
    }

    cs_entry_t *e = entry_at(log, log->next_seq);
    memset(e, 0, sizeof *e);
    e->seq = log->next_seq;
    e->ts_t = t;
    e->ts_i = i;
    e->wall_ms = now_ms();
    e->op = ch->op;
    if (!dup_names(ch, e)) {
        return; /* out of memory: the change is not recorded */
    }
    if (txn) {
        e->in_txn = true;
        e->txn_op_index = txn->op_index;
        e->txn_number = txn->txn_number;
        e->lsid = bson_copy(txn->lsid);
    }
    if (ch->coll_uuid && ch->op != EMU_OP_DROP_DATABASE && !ch->view) {
        e->has_uuid = true;
        memcpy(e->uuid, ch->coll_uuid, 16);
    }
    e->view = ch->view;
    e->expanded_only = ch->view || ch->op == EMU_OP_CREATE || ch->op == EMU_OP_CREATE_INDEXES ||
                       ch->op == EMU_OP_DROP_INDEXES || ch->op == EMU_OP_MODIFY;
    if (ch->op == EMU_OP_RENAME && ch->operation_description) {
        e->op_desc = bson_copy(ch->operation_description);
    }
    if (ch->op == EMU_OP_UPDATE && ch->update_description && ch->full_document) {
        e->disamb = disambiguated_paths(ch->update_description, ch->full_document);
    }
    bool crud = ch->op == EMU_OP_INSERT || ch->op == EMU_OP_UPDATE || ch->op == EMU_OP_REPLACE ||
                ch->op == EMU_OP_DELETE;
    if (crud && ch->document_key) {
        e->doc_key = bson_copy(ch->document_key);
    }
    if (crud && ch->images_enabled && ch->op != EMU_OP_INSERT && ch->pre_image) {
        e->pre_image = bson_copy(ch->pre_image);
    }
    if (ch->op == EMU_OP_UPDATE && ch->images_enabled && ch->full_document) {
        e->post_image = bson_copy(ch->full_document);
    }

    emu_kbuf_t tok;
    emu_kbuf_init(&tok);
    mc_error_t err;
    if (emu_cstoken_encode_txn_event(&tok, t, i, e->txn_op_index, false,
                                     e->has_uuid ? e->uuid : NULL, e->doc_key, &err) != 0) {
        /* A documentKey too deep to encode: fall back to a token without it, still unique by
         * its cluster time and txnOpIndex. */
        emu_cstoken_encode_txn_event(&tok, t, i, e->txn_op_index, false,
                                     e->has_uuid ? e->uuid : NULL, NULL, NULL);
    }
    e->token = tok.data;
    e->token_len = tok.len;
    build_event(e, ch);
    log->next_seq++;
}

void emu_oplog_append(emu_server_t *srv, const emu_change_t *ch)
{
    uint32_t t = 0, i = 0;

    if (!srv->oplog || !ch || !ch->db) {
        return;
    }
    init_floor(srv);
    emu_clock_tick(srv, &t, &i);
    append_at(srv, ch, t, i, NULL);
    pthread_cond_broadcast(&srv->oplog_cond);
}

void emu_oplog_append_txn(emu_server_t *srv, const emu_change_t *changes, size_t n,
                          const bson_t *lsid, int64_t txn_number)
{
    uint32_t t = 0, i = 0;

    if (!srv->oplog || n == 0) {
        return;
    }
    init_floor(srv);
    emu_clock_tick(srv, &t, &i); /* the commit's one cluster time */
    for (size_t k = 0; k < n; k++) {
        cs_txn_ctx_t txn = {lsid, txn_number, (uint32_t)k};
        if (changes[k].db) {
            append_at(srv, &changes[k], t, i, &txn);
        }
    }
    pthread_cond_broadcast(&srv->oplog_cond);
}

/* First retained seq whose cluster time is >= (t, i); next_seq when none. */
static uint64_t lower_bound(emu_oplog_t *log, uint32_t t, uint32_t i)
{
    uint64_t lo = log->first_seq, hi = log->next_seq;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        cs_entry_t *e = entry_at(log, mid);
        if (ts_cmp(e->ts_t, e->ts_i, t, i) < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* ---- cursor registry ---- */

static cs_cursor_t *cursor_find(emu_server_t *srv, int64_t id)
{
    if (!srv->cs_cursors) {
        return NULL;
    }
    for (cs_cursor_t *c = srv->cs_cursors->head; c; c = c->next) {
        if (c->id == id) {
            return c;
        }
    }
    return NULL;
}

static void cursor_unlink(emu_server_t *srv, cs_cursor_t *c)
{
    cs_cursor_t **pp = &srv->cs_cursors->head;
    while (*pp) {
        if (*pp == c) {
            *pp = c->next;
            c->next = NULL;
            srv->cs_cursors->count--;
            return;
        }
        pp = &(*pp)->next;
    }
}

static void reap_idle(emu_server_t *srv)
{
    int64_t now = now_ms();
    cs_cursor_t **pp = &srv->cs_cursors->head;
    while (*pp) {
        cs_cursor_t *c = *pp;
        if (!c->busy && now - c->last_used_ms > CS_IDLE_TIMEOUT_MS) {
            *pp = c->next;
            srv->cs_cursors->count--;
            cursor_free(c);
        } else {
            pp = &c->next;
        }
    }
}

/* ---- visibility and event production ---- */

/* 0: the stream does not see the entry; 1: it does; 2: it does and the entry invalidates it. */
static int visibility(const cs_cursor_t *c, const cs_entry_t *e)
{
    if (e->expanded_only && (!c->show_expanded || (e->view && c->scope == SCOPE_COLL))) {
        return 0;
    }
    switch (c->scope) {
    case SCOPE_COLL:
        if (e->op == EMU_OP_DROP_DATABASE) {
            return 0;
        }
        if (e->op == EMU_OP_RENAME) {
            bool src = str_eq(e->db, c->db) && str_eq(e->coll, c->coll);
            bool dst = str_eq(e->to_db, c->db) && str_eq(e->to_coll, c->coll);
            return src || dst ? 2 : 0;
        }
        if (strcmp(e->coll, c->coll) != 0 || strcmp(e->db, c->db) != 0) {
            return 0;
        }
        return e->op == EMU_OP_DROP ? 2 : 1;
    case SCOPE_DB:
        if (e->op == EMU_OP_DROP_DATABASE) {
            return strcmp(e->db, c->db) == 0 ? 2 : 0;
        }
        if (e->op == EMU_OP_RENAME) {
            return (strcmp(e->db, c->db) == 0 && !is_system(e->coll)) ||
                   (str_eq(e->to_db, c->db) && !is_system(e->to_coll));
        }
        return strcmp(e->db, c->db) == 0 && !is_system(e->coll);
    case SCOPE_CLUSTER:
    default:
        if (e->op == EMU_OP_DROP_DATABASE) {
            return !is_internal_db(e->db);
        }
        if (e->op == EMU_OP_RENAME) {
            return (!is_internal_db(e->db) && !is_system(e->coll)) ||
                   (e->to_db && !is_internal_db(e->to_db) && !is_system(e->to_coll));
        }
        return !is_internal_db(e->db) && !is_system(e->coll);
    }
}

static char *event_json(const bson_t *ev)
{
    return bson_as_relaxed_extended_json(ev, NULL);
}

/* The current version of an updated document, for fullDocument "updateLookup": the document
 * with that _id in the collection, if the collection is still the one the event came from. */
static const bson_t *lookup_current(emu_server_t *srv, const cs_entry_t *e)
{
    uint8_t uuid[16];
    bson_iter_t it;
    if (!e->doc_key || !bson_iter_init_find(&it, e->doc_key, "_id")) {
        return NULL;
    }
    if (!emu_catalog_collection_exists(srv, e->db, e->coll, uuid)) {
        return NULL;
    }
    if (e->has_uuid && memcmp(uuid, e->uuid, 16) != 0) {
        return NULL;
    }
    return emu_catalog_find_by_id(srv, e->db, e->coll, bson_iter_value(&it));
}

/* Copies `base` into `out`, inserting collectionUUID after clusterTime and, for a rename, its
 * operationDescription (showExpandedEvents); from 6.1 on (`disamb`) an update's
 * updateDescription also gets disambiguatedPaths. */
static void copy_with_uuid(const bson_t *base, const cs_entry_t *e, bool disamb, bson_t *out)
{
    bson_iter_t it;
    bson_init(out);
    if (!bson_iter_init(&it, base)) {
        return;
    }
    while (bson_iter_next(&it)) {
        if (disamb && e->op == EMU_OP_UPDATE && BSON_ITER_HOLDS_DOCUMENT(&it) &&
            strcmp(bson_iter_key(&it), "updateDescription") == 0) {
            bson_t ud, dp;
            bson_iter_t f;
            BSON_APPEND_DOCUMENT_BEGIN(out, "updateDescription", &ud);
            bson_iter_recurse(&it, &f);
            while (bson_iter_next(&f)) {
                bson_append_iter(&ud, bson_iter_key(&f), -1, &f);
            }
            BSON_APPEND_DOCUMENT_BEGIN(&ud, "disambiguatedPaths", &dp);
            if (e->disamb) {
                bson_concat(&dp, e->disamb);
            }
            bson_append_document_end(&ud, &dp);
            bson_append_document_end(out, &ud);
            continue;
        }
        bson_append_iter(out, bson_iter_key(&it), -1, &it);
        if (strcmp(bson_iter_key(&it), "clusterTime") == 0 && e->has_uuid) {
            bson_append_binary(out, "collectionUUID", -1, BSON_SUBTYPE_UUID, e->uuid, 16);
        }
    }
    if (e->op == EMU_OP_RENAME && e->op_desc) {
        BSON_APPEND_DOCUMENT(out, "operationDescription", e->op_desc);
    }
}

/* Produces the event a cursor sees for entry `e`: *out points at the shared event or at
 * `scratch` (initialised here only when used; *used_scratch tells). Returns 0 or an error. */
static int make_event(emu_server_t *srv, const cs_cursor_t *c, const cs_entry_t *e, bson_t *scratch,
                      bool *used_scratch, const bson_t **out, mc_error_t *err)
{
    bool want_post = e->op == EMU_OP_UPDATE && c->full_doc != FD_DEFAULT;
    bool want_pre = c->pre != PRE_OFF &&
                    (e->op == EMU_OP_UPDATE || e->op == EMU_OP_REPLACE || e->op == EMU_OP_DELETE);
    *used_scratch = false;
    if (!want_post && !want_pre && !c->show_expanded) {
        *out = e->event;
        return 0;
    }
    if (c->show_expanded) {
        copy_with_uuid(e->event, e, srv->opts.max_wire_version >= 18, scratch);
    } else {
        bson_init(scratch);
        bson_concat(scratch, e->event);
    }
    *used_scratch = true;
    *out = scratch;
    if (want_post) {
        const bson_t *doc = NULL;
        if (c->full_doc == FD_UPDATE_LOOKUP) {
            doc = lookup_current(srv, e);
        } else {
            doc = e->post_image;
            if (!doc && c->full_doc == FD_REQUIRED) {
                char *json = event_json(e->event);
                set_err(err, 47,
                        "Change stream was configured to require a post-image for all update "
                        "events, but the post-image was not found for event: %s",
                        json ? json : "?");
                bson_free(json);
                return MC_ESERVER;
            }
        }
        if (doc) {
            BSON_APPEND_DOCUMENT(scratch, "fullDocument", doc);
        } else {
            BSON_APPEND_NULL(scratch, "fullDocument");
        }
    }
    if (want_pre) {
        if (e->pre_image) {
            BSON_APPEND_DOCUMENT(scratch, "fullDocumentBeforeChange", e->pre_image);
        } else if (c->pre == PRE_REQUIRED) {
            char *json = event_json(e->event);
            set_err(err, 47,
                    "Change stream was configured to require a pre-image for all update, delete "
                    "and replace events, but the pre-image was not found for event: %s",
                    json ? json : "?");
            bson_free(json);
            return MC_ESERVER;
        } else {
            BSON_APPEND_NULL(scratch, "fullDocumentBeforeChange");
        }
    }
    return 0;
}

/* True when `out` still carries the event's _id unchanged. */
static bool id_unchanged(const bson_t *event, const bson_t *out)
{
    bson_iter_t a, b;
    if (!bson_iter_init_find(&a, event, "_id") || !bson_iter_init_find(&b, out, "_id")) {
        return false;
    }
    if (bson_iter_type(&a) != bson_iter_type(&b) || !BSON_ITER_HOLDS_DOCUMENT(&a)) {
        return false;
    }
    uint32_t la, lb;
    const uint8_t *da, *db;
    bson_iter_document(&a, &la, &da);
    bson_iter_document(&b, &lb, &db);
    return la == lb && memcmp(da, db, la) == 0;
}

static int id_modified_error(const bson_t *event, const bson_t *out, mc_error_t *err)
{
    bson_iter_t a, b;
    char *expected = NULL, *found = NULL;
    if (bson_iter_init_find(&a, event, "_id") && BSON_ITER_HOLDS_DOCUMENT(&a)) {
        uint32_t l;
        const uint8_t *d;
        bson_t sub;
        bson_iter_document(&a, &l, &d);
        if (bson_init_static(&sub, d, l)) {
            expected = bson_as_relaxed_extended_json(&sub, NULL);
        }
    }
    if (bson_iter_init_find(&b, out, "_id")) {
        bson_t tmp = BSON_INITIALIZER;
        bson_append_iter(&tmp, "_id", 3, &b);
        found = bson_as_relaxed_extended_json(&tmp, NULL);
        bson_destroy(&tmp);
    }
    set_err(err, 280,
            "Encountered an event whose _id field, which contains the resume token, was modified "
            "by the pipeline. Modifying the _id field of an event makes it impossible to resume "
            "the stream from that point. Only transformations that retain the unmodified _id "
            "field are allowed. Expected: { _id: %s } but found: %s",
            expected ? expected : "?", found ? found : "{ _id: missing }");
    bson_free(expected);
    bson_free(found);
    return MC_ESERVER;
}

/* ---- large events: BSONObjectTooLarge and $changeStreamSplitLargeEvent ---- */

/* One fragment of a split event, with its own resume token. */
typedef struct cs_frag {
    bson_t *doc;
    emu_kbuf_t token;
} cs_frag_t;

static void frags_free(cs_cursor_t *c)
{
    for (size_t k = 0; k < c->n_frags; k++) {
        if (c->frags[k].doc) {
            bson_destroy(c->frags[k].doc);
        }
        emu_kbuf_destroy(&c->frags[k].token);
    }
    free(c->frags);
    c->frags = NULL;
    c->n_frags = 0;
    c->next_frag = 0;
}

/* Appends `s` to `buf` (capacity `size`, position *pos), truncating at the end. */
static void put_text(char *buf, size_t size, size_t *pos, const char *s, size_t n)
{
    if (*pos >= size) {
        return;
    }
    size_t room = size - 1 - *pos;
    n = n < room ? n : room;
    memcpy(buf + *pos, s, n);
    *pos += n;
    buf[*pos] = '\0';
}

static void put_value_text(char *buf, size_t size, size_t *pos, const bson_iter_t *it, int depth);

/* An object the way MongoDB's BSONObj::toString prints it: { a: 1, b: "x" }. */
static void put_object_text(char *buf, size_t size, size_t *pos, const bson_iter_t *it, int depth)
{
    bson_iter_t child;
    bool first = true;
    if (depth > 20 || !bson_iter_recurse(it, &child)) {
        put_text(buf, size, pos, "...", 3);
        return;
    }
    while (bson_iter_next(&child)) {
        put_text(buf, size, pos, first ? "{ " : ", ", 2);
        first = false;
        const char *k = bson_iter_key(&child);
        put_text(buf, size, pos, k, strlen(k));
        put_text(buf, size, pos, ": ", 2);
        put_value_text(buf, size, pos, &child, depth + 1);
    }
    put_text(buf, size, pos, first ? "{}" : " }", 2);
}

/* One value as BSONElement::toString(full = false) prints it: strings of 160 bytes or more are
 * cut to their first 150. */
static void put_value_text(char *buf, size_t size, size_t *pos, const bson_iter_t *it, int depth)
{
    char num[64];
    switch (bson_iter_type(it)) {
    case BSON_TYPE_DOCUMENT: put_object_text(buf, size, pos, it, depth); return;
    case BSON_TYPE_UTF8: {
        uint32_t len = 0;
        const char *v = bson_iter_utf8(it, &len);
        put_text(buf, size, pos, "\"", 1);
        if (len + 1 > 160) {
            put_text(buf, size, pos, v, 150);
            put_text(buf, size, pos, "...\"", 4);
        } else {
            put_text(buf, size, pos, v, len);
            put_text(buf, size, pos, "\"", 1);
        }
        return;
    }
    case BSON_TYPE_INT32: snprintf(num, sizeof num, "%d", bson_iter_int32(it)); break;
    case BSON_TYPE_INT64: snprintf(num, sizeof num, "%lld", (long long)bson_iter_int64(it)); break;
    default: {
        bson_t tmp = BSON_INITIALIZER;
        bson_append_iter(&tmp, "v", 1, it);
        char *json = bson_as_relaxed_extended_json(&tmp, NULL);
        bson_destroy(&tmp);
        /* {"v" : <value> } */
        if (json && strlen(json) > 9) {
            put_text(buf, size, pos, json + 8, strlen(json) - 10);
        }
        bson_free(json);
        return;
    }
    }
    put_text(buf, size, pos, num, strlen(num));
}

/* Context a real server adds to an error raised while it runs the pipeline. */
static const char *exec_context(bool getmore)
{
    return getmore ? "Executor error during getMore :: caused by :: "
                   : "PlanExecutor error during aggregation :: caused by :: ";
}

/* 10334 BSONObjectTooLarge for an event past the BSON limit, worded as MongoDB's BSONObj
 * constructor does, with the event's first element. */
static int too_large_error(const bson_t *ev, bool getmore, mc_error_t *err)
{
    char first[512] = "EOO";
    size_t pos = 0;
    bson_iter_t it;
    if (bson_iter_init(&it, ev) && bson_iter_next(&it)) {
        first[0] = '\0';
        const char *k = bson_iter_key(&it);
        put_text(first, sizeof first, &pos, k, strlen(k));
        put_text(first, sizeof first, &pos, ": ", 2);
        put_value_text(first, sizeof first, &pos, &it, 0);
    }
    return set_err(err, 10334,
                   "%sBSONObj size: %u (0x%X) is invalid. Size must be between 0 and %d(16MB) "
                   "First element: %s",
                   exec_context(getmore), ev->len, ev->len, CS_MAX_EVENT_BYTES, first);
}

/* A top-level field of the event, by the size of its BSON element (type, name, value). */
typedef struct split_field {
    const char *key;
    uint32_t size;
    bson_iter_t it;
} split_field_t;

static int cmp_split_field(const void *a, const void *b)
{
    const split_field_t *x = a, *y = b;
    if (x->size != y->size) {
        return x->size < y->size ? -1 : 1;
    }
    return strcmp(x->key, y->key);
}

/* The size a fragment starts at before its fields: _id, splitEvent and the $sortKey metadata a
 * real server counts while it fills the fragment. */
static size_t fragment_base_size(const emu_kbuf_t *tok)
{
    bson_t b = BSON_INITIALIZER, se, arr;
    emu_cstoken_append(&b, "_id", tok->data, tok->len);
    BSON_APPEND_DOCUMENT_BEGIN(&b, "splitEvent", &se);
    BSON_APPEND_INT32(&se, "fragment", 1);
    BSON_APPEND_INT32(&se, "of", 0);
    bson_append_document_end(&b, &se);
    BSON_APPEND_ARRAY_BEGIN(&b, "$sortKey", &arr);
    emu_cstoken_append(&arr, "0", tok->data, tok->len);
    bson_append_array_end(&b, &arr);
    size_t n = b.len;
    bson_destroy(&b);
    return n;
}

/* The fragment token: MongoDB allows a fragmentNum only in a v2 token. */
static int fragment_token(const cs_entry_t *e, uint32_t k, emu_kbuf_t *out, mc_error_t *err)
{
    bson_t desc = BSON_INITIALIZER;
    if (e->op == EMU_OP_RENAME) {
        append_ns(&desc, "to", e->to_db, e->to_coll);
    }
    int rc = emu_cstoken_encode_fragment(out, e->ts_t, e->ts_i, e->txn_op_index,
                                         e->has_uuid ? e->uuid : NULL, op_name(e->op), e->doc_key,
                                         &desc, k, err);
    bson_destroy(&desc);
    return rc;
}

/* Splits `ev` (the event of entry `e` after the user's stages) the way MongoDB does: the fields
 * but _id, smallest first (by BSON size, then name), fill fragment after fragment up to the
 * largest event size less the size of the event's resume token; each fragment is
 * {_id: its token, splitEvent: {fragment: n, of: N}, fields...}. The first `skip` fragments are
 * dropped. Queues the rest in the cursor. */
static int split_event(cs_cursor_t *c, const cs_entry_t *e, const bson_t *ev, size_t skip,
                       bool getmore, mc_error_t *err)
{
    bson_iter_t it;
    size_t n = 0, cap = 16;
    split_field_t *f = malloc(cap * sizeof *f);
    size_t token_size = 0;
    int rc = 0;

    if (!f || !bson_iter_init(&it, ev)) {
        free(f);
        return set_err(err, 146, "out of memory splitting a change event");
    }
    while (bson_iter_next(&it)) {
        if (strcmp(bson_iter_key(&it), "_id") == 0) {
            uint32_t len = 0;
            const uint8_t *data = NULL;
            if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
                bson_iter_document(&it, &len, &data);
            }
            token_size = len;
            continue;
        }
        if (n == cap) {
            split_field_t *g = realloc(f, 2 * cap * sizeof *f);
            if (!g) {
                free(f);
                return set_err(err, 146, "out of memory splitting a change event");
            }
            f = g;
            cap *= 2;
        }
        f[n].key = bson_iter_key(&it);
        f[n].size = it.next_off - it.off;
        f[n].it = it;
        n++;
    }
    if (n == 0) {
        free(f);
        return set_err(err, 7182502,
                       "%sCannot split an empty event or an event containing solely '_id' field",
                       exec_context(getmore));
    }
    qsort(f, n, sizeof *f, cmp_split_field);

    size_t max_frag = CS_MAX_SPLIT_BYTES - token_size;
    /* Group the fields: start[g] is the first field of fragment g. */
    size_t *start = malloc((n + 1) * sizeof *start);
    cs_frag_t *frags = NULL;
    size_t groups = 0;
    emu_kbuf_t tok;
    emu_kbuf_init(&tok);
    if (!start) {
        free(f);
        return set_err(err, 146, "out of memory splitting a change event");
    }
    for (size_t k = 0; k < n;) {
        rc = fragment_token(e, (uint32_t)groups, &tok, err);
        if (rc != 0) {
            goto done;
        }
        size_t size = fragment_base_size(&tok);
        start[groups++] = k;
        do {
            size += f[k].size;
            k++;
        } while (k < n && size + f[k].size <= max_frag);
        if (size > max_frag) {
            rc = set_err(err, 7182500,
                         "%sSplitting change event failed: fragment size %zu is greater than "
                         "maximum allowed fragment size %zu",
                         exec_context(getmore), size, max_frag);
            goto done;
        }
    }
    start[groups] = n;
    if (skip >= groups) {
        rc = set_err(err, 280,
                     "%sAttempted to resume from a split event, but the resumed stream produced "
                     "a different split. Ensure that the pipeline used to resume is the same as "
                     "the original",
                     exec_context(getmore));
        goto done;
    }
    frags = calloc(groups - skip, sizeof *frags);
    if (!frags) {
        rc = set_err(err, 146, "out of memory splitting a change event");
        goto done;
    }
    for (size_t g = skip; g < groups; g++) {
        cs_frag_t *fr = &frags[g - skip];
        emu_kbuf_init(&fr->token);
        rc = fragment_token(e, (uint32_t)g, &fr->token, err);
        if (rc != 0) {
            break;
        }
        bson_t se;
        fr->doc = bson_new();
        emu_cstoken_append(fr->doc, "_id", fr->token.data, fr->token.len);
        BSON_APPEND_DOCUMENT_BEGIN(fr->doc, "splitEvent", &se);
        BSON_APPEND_INT32(&se, "fragment", (int32_t)(g + 1));
        BSON_APPEND_INT32(&se, "of", (int32_t)groups);
        bson_append_document_end(fr->doc, &se);
        for (size_t k = start[g]; k < start[g + 1]; k++) {
            bson_append_iter(fr->doc, f[k].key, -1, &f[k].it);
        }
    }
    if (rc != 0) {
        goto done;
    }
    frags_free(c);
    c->frags = frags;
    c->n_frags = groups - skip;
    c->next_frag = 0;
    frags = NULL;
done:
    if (frags) {
        for (size_t g = 0; g < groups - skip; g++) {
            if (frags[g].doc) {
                bson_destroy(frags[g].doc);
            }
            emu_kbuf_destroy(&frags[g].token);
        }
        free(frags);
    }
    emu_kbuf_destroy(&tok);
    free(start);
    free(f);
    return rc;
}

/* ---- batches ---- */

typedef struct cs_batch {
    bson_t arr;
    uint32_t n;
    size_t bytes;
    const uint8_t *last_token; /* token of the last event in the batch */
    size_t last_token_len;
    emu_kbuf_t inv_token; /* the invalidate's token when the batch ends with one */
    bool invalidated;
} cs_batch_t;

static void batch_init(cs_batch_t *b)
{
    bson_init(&b->arr);
    b->n = 0;
    b->bytes = 0;
    b->last_token = NULL;
    b->last_token_len = 0;
    emu_kbuf_init(&b->inv_token);
    b->invalidated = false;
}

static void batch_destroy(cs_batch_t *b)
{
    bson_destroy(&b->arr);
    emu_kbuf_destroy(&b->inv_token);
}

static void batch_add(cs_batch_t *b, const bson_t *doc)
{
    char keybuf[16];
    const char *key;
    size_t klen = bson_uint32_to_string(b->n, &key, keybuf, sizeof keybuf);
    bson_append_document(&b->arr, key, (int)klen, doc);
    b->n++;
    b->bytes += doc->len;
}

static void set_pending_invalidate(cs_cursor_t *c, const cs_entry_t *e)
{
    c->pending_inv = true;
    c->inv_t = e->ts_t;
    c->inv_i = e->ts_i;
    c->inv_wall = e->wall_ms;
    c->inv_src_token.len = 0;
    emu_kbuf_destroy(&c->inv_src_token);
    c->inv_src_token.data = malloc(e->token_len);
    if (c->inv_src_token.data) {
        memcpy(c->inv_src_token.data, e->token, e->token_len);
        c->inv_src_token.len = e->token_len;
        c->inv_src_token.cap = e->token_len;
    }
}

static void emit_invalidate(cs_cursor_t *c, cs_batch_t *b)
{
    emu_kbuf_t *tok = &b->inv_token;
    tok->len = 0;
    if (c->inv_src_token.len > EMU_CSTOKEN_FROM_INVALIDATE_OFFSET) {
        /* The invalidate's token is its cause's token with fromInvalidate set. */
        emu_kbuf_destroy(tok);
        tok->data = malloc(c->inv_src_token.len);
        if (tok->data) {
            memcpy(tok->data, c->inv_src_token.data, c->inv_src_token.len);
            tok->len = tok->cap = c->inv_src_token.len;
            tok->data[EMU_CSTOKEN_FROM_INVALIDATE_OFFSET] = 0x6F;
        }
    }
    if (tok->len == 0) {
        emu_cstoken_encode_event(tok, c->inv_t, c->inv_i, true, NULL, NULL, NULL);
    }
    bson_t ev = BSON_INITIALIZER;
    emu_cstoken_append(&ev, "_id", tok->data, tok->len);
    BSON_APPEND_UTF8(&ev, "operationType", "invalidate");
    BSON_APPEND_TIMESTAMP(&ev, "clusterTime", c->inv_t, c->inv_i);
    BSON_APPEND_DATE_TIME(&ev, "wallTime", c->inv_wall);
    batch_add(b, &ev);
    bson_destroy(&ev);
    b->invalidated = true;
    c->pending_inv = false;
}

static int history_lost(mc_error_t *err)
{
    return set_err(err, 286,
                   "Executor error during getMore :: caused by :: Resume of change stream was not "
                   "possible, as the resume point may no longer be in the oplog.");
}

/* Remembers the token of the last event returned (see append_pbrt). */
static void note_last_token(cs_cursor_t *c, const uint8_t *tok, size_t len, uint32_t t, uint32_t i)
{
    c->last_token.len = 0;
    if (c->last_token.cap < len) {
        uint8_t *d = realloc(c->last_token.data, len);
        if (!d) {
            return;
        }
        c->last_token.data = d;
        c->last_token.cap = len;
    }
    memcpy(c->last_token.data, tok, len);
    c->last_token.len = len;
    c->last_t = t;
    c->last_i = i;
}

/* Returns queued fragments of a split event while the batch has room. True when the batch is
 * full (and fragments remain). */
static bool emit_fragments(cs_cursor_t *c, cs_batch_t *b, int64_t limit, uint32_t t, uint32_t i)
{
    while (c->next_frag < c->n_frags) {
        cs_frag_t *fr = &c->frags[c->next_frag];
        if ((limit != 0 && (int64_t)b->n >= limit) ||
            (b->n > 0 && b->bytes + fr->doc->len > CS_BATCH_BYTES)) {
            return true;
        }
        batch_add(b, fr->doc);
        b->last_token = fr->token.data;
        b->last_token_len = fr->token.len;
        note_last_token(c, fr->token.data, fr->token.len, t, i);
        c->next_frag++;
    }
    return false;
}

/* What happens to an event that reached the end of the pipeline: 0 to return it as is; 1 when
 * it was split (its fragments are queued); an error for an event too large to return (10334
 * BSONObjectTooLarge, as a real server fails the cursor) or to split, or for a resume from a
 * fragment that does not reproduce. */
static int large_event(cs_cursor_t *c, const cs_entry_t *e, const bson_t *ev, bool getmore,
                       mc_error_t *err)
{
    if (c->split) {
        bool resuming = c->split_resume;
        c->split_resume = false;
        if (ev->len <= CS_MAX_SPLIT_BYTES) {
            if (resuming) {
                return set_err(err, 280,
                               "%sAttempted to resume from a split event fragment, but the event "
                               "in the resumed stream was not large enough to be split",
                               exec_context(getmore));
            }
            return 0;
        }
        /* Resuming from fragment k: the split drops fragments 0..k-1 and, as a real server's
         * check of the resume token does, the token's own fragment k is not returned again. */
        int rc = split_event(c, e, ev, resuming ? c->split_resume_frag : 0, getmore, err);
        if (rc == 0 && resuming) {
            c->next_frag = 1;
        }
        return rc == 0 ? 1 : rc;
    }
    if (ev->len > CS_MAX_EVENT_BYTES) {
        return too_large_error(ev, getmore, err);
    }
    return 0;
}

/* Examines entries from the cursor's position and appends what it sees, up to `limit` events
 * (0: no limit) and about 16 MB. Returns 0 or an error (the cursor must then be closed).
 * `getmore` tells which command runs it (for the context of errors). */
static int collect(emu_server_t *srv, cs_cursor_t *c, cs_batch_t *b, int64_t limit, bool getmore,
                   mc_error_t *err)
{
    emu_oplog_t *log = srv->oplog;

    if (c->n_frags > 0 && c->next_frag >= c->n_frags) {
        frags_free(c); /* every fragment went out in earlier replies */
    }
    while (!b->invalidated && (limit == 0 || (int64_t)b->n < limit)) {
        if (c->next_frag < c->n_frags) {
            if (emit_fragments(c, b, limit, c->last_t, c->last_i)) {
                break;
            }
            continue;
        }
        if (c->pending_inv) {
            emit_invalidate(c, b);
            break;
        }
        if (c->pos < log->first_seq) {
            return history_lost(err);
        }
        if (c->pos >= log->next_seq) {
            break;
        }
        cs_entry_t *e = entry_at(log, c->pos);
        if (c->has_min && ts_cmp(e->ts_t, e->ts_i, c->min_t, c->min_i) < 0) {
            c->pos++;
            continue;
        }
        int vis = visibility(c, e);
        if (vis == 0) {
            c->split_resume = false;
            c->pos++;
            continue;
        }
        bson_t scratch, piped;
        bool used_scratch = false, used_piped = false;
        const bson_t *ev = NULL;
        int rc = make_event(srv, c, e, &scratch, &used_scratch, &ev, err);
        if (rc != 0) {
            if (used_scratch) {
                bson_destroy(&scratch);
            }
            return rc;
        }
        bool keep = true;
        if (c->pipeline) {
            /* Initialised here too, so that it can be destroyed whatever the outcome. */
            bson_init(&piped);
            int prc = emu_pipeline_apply_one(c->pipeline, ev, &piped, err);
            used_piped = true;
            if (prc < 0) {
                bson_destroy(&piped);
                if (used_scratch) {
                    bson_destroy(&scratch);
                }
                return prc;
            }
            if (prc == 0) {
                keep = false;
            } else if (!id_unchanged(e->event, &piped)) {
                id_modified_error(e->event, &piped, err);
                bson_destroy(&piped);
                if (used_scratch) {
                    bson_destroy(&scratch);
                }
                return MC_ESERVER;
            } else {
                ev = &piped;
            }
        }
        int large = 0;
        if (keep) {
            large = large_event(c, e, ev, getmore, err);
            if (large < 0) {
                rc = large;
            }
        } else {
            c->split_resume = false;
        }
        if (keep && large == 0 && b->n > 0 && b->bytes + ev->len > CS_BATCH_BYTES) {
            /* Full: leave this entry for the next getMore. */
            if (used_piped) {
                bson_destroy(&piped);
            }
            if (used_scratch) {
                bson_destroy(&scratch);
            }
            break;
        } else if (keep && large == 0) {
            batch_add(b, ev);
            b->last_token = e->token;
            b->last_token_len = e->token_len;
            note_last_token(c, e->token, e->token_len, e->ts_t, e->ts_i);
        } else if (large == 1) {
            c->last_t = e->ts_t; /* the fragments' cluster time, for emit_fragments */
            c->last_i = e->ts_i;
        }
        if (used_piped) {
            bson_destroy(&piped);
        }
        if (used_scratch) {
            bson_destroy(&scratch);
        }
        if (rc != 0) {
            return rc;
        }
        c->pos++;
        if (vis == 2) {
            set_pending_invalidate(c, e);
        }
    }
    return 0;
}

/* The postBatchResumeToken after `collect`, appended as `key` to `parent`. */
static void append_pbrt(emu_server_t *srv, const cs_cursor_t *c, const cs_batch_t *b,
                        bson_t *parent)
{
    emu_oplog_t *log = srv->oplog;
    if (b->invalidated) {
        emu_cstoken_append(parent, "postBatchResumeToken", b->inv_token.data, b->inv_token.len);
        return;
    }
    if (b->n > 0 && b->last_token) {
        emu_cstoken_append(parent, "postBatchResumeToken", b->last_token, b->last_token_len);
        return;
    }
    if (c->pending_inv && c->inv_src_token.len) {
        emu_cstoken_append(parent, "postBatchResumeToken", c->inv_src_token.data,
                           c->inv_src_token.len);
        return;
    }
    /* High-water mark: every event from here on has a cluster time at or after it. */
    uint32_t t, i;
    if (c->pos >= log->first_seq && c->pos < log->next_seq) {
        cs_entry_t *e = entry_at(log, c->pos);
        t = e->ts_t;
        i = e->ts_i;
    } else {
        t = srv->clock_secs;
        i = srv->clock_inc;
        ts_next(&t, &i);
    }
    if (c->has_min && ts_cmp(t, i, c->min_t, c->min_i) < 0) {
        t = c->min_t;
        i = c->min_i;
    }
    /* Before the first write the clock may still be at zero: never hand out a mark that a
     * resume would find older than the history. */
    if (log->floor_set && ts_cmp(t, i, log->floor_t, log->floor_i) < 0) {
        t = log->floor_t;
        i = log->floor_i;
    }
    /* Never before the last event returned: inside a transaction whose remaining events this
     * stream does not see, the mark has the same cluster time as that event's token but sorts
     * before it (a resume would return those events again). */
    if (c->last_token.len && ts_cmp(t, i, c->last_t, c->last_i) <= 0) {
        emu_cstoken_append(parent, "postBatchResumeToken", c->last_token.data, c->last_token.len);
        return;
    }
    emu_kbuf_t tok;
    emu_kbuf_init(&tok);
    emu_cstoken_encode_hwm(&tok, t, i);
    emu_cstoken_append(parent, "postBatchResumeToken", tok.data, tok.len);
    emu_kbuf_destroy(&tok);
}

static void reply_batch(emu_server_t *srv, const cs_cursor_t *c, const cs_batch_t *b,
                        const char *batch_key, int64_t id, bson_t *reply)
{
    bson_t cur;
    BSON_APPEND_DOCUMENT_BEGIN(reply, "cursor", &cur);
    bson_append_array(&cur, batch_key, -1, &b->arr);
    append_pbrt(srv, c, b, &cur);
    BSON_APPEND_INT64(&cur, "id", id);
    BSON_APPEND_UTF8(&cur, "ns", c->ns);
    bson_append_document_end(reply, &cur);
    reply_ok(reply);
}

/* ---- aggregate ---- */

typedef struct cs_spec {
    cs_fulldoc_t full_doc;
    cs_pre_t pre;
    bool all_changes_for_cluster;
    bool show_expanded;
    bool has_resume_after;
    bool has_start_after;
    bool has_start_at;
    bson_t resume_after; /* static views into the command */
    bson_t start_after;
    uint32_t start_at_t;
    uint32_t start_at_i;
} cs_spec_t;

static int spec_type_error(mc_error_t *err, const char *field, const bson_iter_t *it,
                           const char *expected)
{
    return set_err(err, 14,
                   "BSON field '$changeStream.%s' is the wrong type '%s', expected type "
                   "'%s'",
                   field, emu_type_name(bson_iter_type(it)), expected);
}

static int parse_enum(const bson_iter_t *it, const char *field, const char *const *names, int n,
                      int *out, mc_error_t *err)
{
    if (!BSON_ITER_HOLDS_UTF8(it)) {
        return spec_type_error(err, field, it, "string");
    }
    const char *s = bson_iter_utf8(it, NULL);
    for (int k = 0; k < n; k++) {
        if (strcmp(s, names[k]) == 0) {
            *out = k;
            return 0;
        }
    }
    return set_err(err, 2,
                   "Enumeration value '%s' for field '$changeStream.%s' is not a valid "
                   "value.",
                   s, field);
}

static int parse_spec(const bson_iter_t *spec_it, cs_spec_t *spec, mc_error_t *err)
{
    static const char *const fd_names[] = {"default", "updateLookup", "whenAvailable", "required"};
    static const char *const pre_names[] = {"off", "whenAvailable", "required"};
    static const char *const bool_fields[] = {"allChangesForCluster",    "showExpandedEvents",
                                              "showMigrationEvents",     "showSystemEvents",
                                              "allowToRunOnConfigDB",    "allowToRunOnSystemNS",
                                              "showRawUpdateDescription"};
    bson_iter_t it;
    memset(spec, 0, sizeof *spec);
    if (!BSON_ITER_HOLDS_DOCUMENT(spec_it)) {
        return set_err(err, 50808, "$changeStream stage expects a document as argument");
    }
    bson_iter_recurse(spec_it, &it);
    while (bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        int v = 0;
        if (strcmp(key, "fullDocument") == 0) {
            if (parse_enum(&it, key, fd_names, 4, &v, err) != 0) {
                return MC_ESERVER;
            }
            spec->full_doc = (cs_fulldoc_t)v;
        } else if (strcmp(key, "fullDocumentBeforeChange") == 0) {
            if (parse_enum(&it, key, pre_names, 3, &v, err) != 0) {
                return MC_ESERVER;
            }
            spec->pre = (cs_pre_t)v;
        } else if (strcmp(key, "resumeAfter") == 0 || strcmp(key, "startAfter") == 0) {
            if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
                return spec_type_error(err, key, &it, "object");
            }
            uint32_t len;
            const uint8_t *data;
            bson_iter_document(&it, &len, &data);
            bool after = key[0] == 'r';
            if (!bson_init_static(after ? &spec->resume_after : &spec->start_after, data, len)) {
                return set_err(err, 10334, "invalid BSON in $changeStream.%s", key);
            }
            *(after ? &spec->has_resume_after : &spec->has_start_after) = true;
        } else if (strcmp(key, "startAtOperationTime") == 0) {
            if (!BSON_ITER_HOLDS_TIMESTAMP(&it)) {
                return spec_type_error(err, key, &it, "timestamp");
            }
            bson_iter_timestamp(&it, &spec->start_at_t, &spec->start_at_i);
            spec->has_start_at = true;
        } else {
            bool known = false;
            for (size_t k = 0; k < sizeof bool_fields / sizeof bool_fields[0]; k++) {
                if (strcmp(key, bool_fields[k]) == 0) {
                    known = true;
                }
            }
            if (!known) {
                return set_err(err, 40415, "BSON field '$changeStream.%s' is an unknown field.",
                               key);
            }
            if (!BSON_ITER_HOLDS_BOOL(&it)) {
                return spec_type_error(err, key, &it, "bool");
            }
            if (strcmp(key, "allChangesForCluster") == 0) {
                spec->all_changes_for_cluster = bson_iter_bool(&it);
            } else if (strcmp(key, "showExpandedEvents") == 0) {
                spec->show_expanded = bson_iter_bool(&it);
            }
        }
    }
    return 0;
}

/* Checks a $changeStreamSplitLargeEvent stage: an empty spec, and last in the pipeline. */
static int check_split_stage(const bson_iter_t *st, bool last, mc_error_t *err)
{
    bson_iter_t spec;
    if (!BSON_ITER_HOLDS_DOCUMENT(st) || !bson_iter_recurse(st, &spec) || bson_iter_next(&spec)) {
        return set_err(err, 7182800, "$changeStreamSplitLargeEvent spec should be an empty object");
    }
    if (!last) {
        return set_err(err, 7182802,
                       "$changeStreamSplitLargeEvent must be the last stage in the pipeline");
    }
    return 0;
}

/* Compiles the stages after $changeStream (pipeline[1..]); *out stays NULL when none. A final
 * $changeStreamSplitLargeEvent is not compiled but sets *split. */
static int compile_user_stages(const bson_iter_t *pipeline_it, emu_pipeline_t **out, bool *split,
                               mc_error_t *err)
{
    bson_iter_t it;
    bson_t stages = BSON_INITIALIZER;
    uint32_t n = 0;
    *out = NULL;
    *split = false;
    bson_iter_recurse(pipeline_it, &it);
    bson_iter_next(&it); /* the $changeStream stage */
    while (bson_iter_next(&it)) {
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            bson_destroy(&stages);
            return set_err(err, 14, "Each element of the 'pipeline' array must be an object");
        }
        bson_iter_t st;
        bson_iter_recurse(&it, &st);
        if (bson_iter_next(&st) && strcmp(bson_iter_key(&st), "$changeStream") == 0) {
            bson_destroy(&stages);
            return set_err(err, 40602,
                           "$changeStream is only valid as the first stage in a pipeline");
        }
        if (strcmp(bson_iter_key(&st), "$changeStreamSplitLargeEvent") == 0) {
            bson_iter_t rest = it;
            if (check_split_stage(&st, !bson_iter_next(&rest), err) != 0) {
                bson_destroy(&stages);
                return MC_ESERVER;
            }
            *split = true;
            continue;
        }
        char keybuf[16];
        const char *key;
        size_t klen = bson_uint32_to_string(n++, &key, keybuf, sizeof keybuf);
        bson_append_iter(&stages, key, (int)klen, &it);
    }
    if (n > 0) {
        *out = emu_pipeline_new(&stages, true, err);
        if (!*out) {
            bson_destroy(&stages);
            if (err && err->domain != MC_DOMAIN_MONGODB) {
                err->domain = MC_DOMAIN_MONGODB;
                err->cause = 40324;
            }
            return MC_ESERVER;
        }
    }
    bson_destroy(&stages);
    return 0;
}

/* The entry a resume token names matches it byte for byte, apart from fromInvalidate. */
static bool token_names_entry(const emu_cstoken_t *tok, const cs_entry_t *e)
{
    if (tok->has_fragment) {
        /* A fragment's token names the event it was cut from. */
        emu_kbuf_t frag;
        emu_kbuf_init(&frag);
        bool same = fragment_token(e, tok->fragment_num, &frag, NULL) == 0 &&
                    frag.len == tok->raw_len && memcmp(frag.data, tok->raw, frag.len) == 0;
        emu_kbuf_destroy(&frag);
        return same;
    }
    size_t k = tok->from_invalidate_offset;
    if (tok->raw_len != e->token_len || k == 0 || tok->raw_len <= k) {
        return false;
    }
    return memcmp(tok->raw, e->token, k) == 0 &&
           memcmp(tok->raw + k + 1, e->token + k + 1, tok->raw_len - k - 1) == 0;
}

static bool entry_can_invalidate(const cs_entry_t *e)
{
    return e->op == EMU_OP_DROP || e->op == EMU_OP_RENAME || e->op == EMU_OP_DROP_DATABASE;
}

static int resolve_start(emu_server_t *srv, cs_cursor_t *c, const cs_spec_t *spec, mc_error_t *err)
{
    emu_oplog_t *log = srv->oplog;
    init_floor(srv);

    if (spec->has_resume_after && spec->has_start_after) {
        return set_err(err, 50865,
                       "Do not specify both 'startAfter' and 'resumeAfter' as resume options.");
    }
    if (spec->has_start_at && (spec->has_resume_after || spec->has_start_after)) {
        return set_err(err, 40674,
                       "Only one type of resume option is allowed, but multiple were "
                       "found.");
    }
    if (spec->has_start_at) {
        if (ts_cmp(spec->start_at_t, spec->start_at_i, log->floor_t, log->floor_i) < 0) {
            return set_err(err, 286,
                           "Executor error during aggregate command on namespace: %s "
                           ":: caused by :: Resume of change stream was not possible, "
                           "as the resume point may no longer be in the oplog.",
                           c->ns);
        }
        c->pos = lower_bound(log, spec->start_at_t, spec->start_at_i);
        c->has_min = true;
        c->min_t = spec->start_at_t;
        c->min_i = spec->start_at_i;
        return 0;
    }
    if (!spec->has_resume_after && !spec->has_start_after) {
        c->pos = log->next_seq;
        return 0;
    }

    const bson_t *token_doc = spec->has_resume_after ? &spec->resume_after : &spec->start_after;
    emu_cstoken_t tok;
    if (emu_cstoken_parse(token_doc, &tok, err) != 0) {
        return MC_ESERVER;
    }
    int rc = 0;
    if (tok.from_invalidate && spec->has_resume_after) {
        rc = set_err(err, 260,
                     "Attempting to resume a change stream using 'resumeAfter' is not "
                     "allowed from an invalidate notification.");
        goto done;
    }
    if (c->scope == SCOPE_COLL && tok.type == EMU_CSTOKEN_EVENT && !tok.has_uuid) {
        rc = set_err(err, 260,
                     "Attempted to resume a single-collection stream, but the resume "
                     "token does not include a UUID.");
        goto done;
    }
    if (ts_cmp(tok.ts_t, tok.ts_i, log->floor_t, log->floor_i) < 0) {
        rc = set_err(err, 286,
                     "Executor error during aggregate command on namespace: %s :: "
                     "caused by :: Resume of change stream was not possible, as the "
                     "resume point may no longer be in the oplog.",
                     c->ns);
        goto done;
    }
    if (tok.has_fragment && !c->split) {
        rc = set_err(err, 280,
                     "To resume from a split event, the $changeStream pipeline must include a "
                     "$changeStreamSplitLargeEvent stage");
        goto done;
    }
    uint64_t idx = lower_bound(log, tok.ts_t, tok.ts_i);
    if (tok.type == EMU_CSTOKEN_HWM) {
        c->pos = idx;
        c->has_min = true;
        c->min_t = tok.ts_t;
        c->min_i = tok.ts_i;
        goto done;
    }
    if (idx < log->next_seq) {
        /* The writes of a transaction share the cluster time: find the one the token names
         * (resuming then goes on with the next event of the same transaction). */
        for (uint64_t k = idx; k < log->next_seq; k++) {
            cs_entry_t *e = entry_at(log, k);
            if (ts_cmp(e->ts_t, e->ts_i, tok.ts_t, tok.ts_i) != 0) {
                break;
            }
            if (!token_names_entry(&tok, e) || (tok.from_invalidate && !entry_can_invalidate(e))) {
                continue;
            }
            note_last_token(c, tok.raw, tok.raw_len, tok.ts_t, tok.ts_i);
            if (tok.has_fragment) {
                /* Split again from this event, dropping what was delivered. */
                c->pos = k;
                c->split_resume = true;
                c->split_resume_frag = tok.fragment_num;
                goto done;
            }
            c->pos = k + 1;
            if (!tok.from_invalidate && visibility(c, e) == 2) {
                /* Resuming from the event that invalidated the stream: the invalidate is
                 * what comes next. */
                set_pending_invalidate(c, e);
            }
            goto done;
        }
    } else if (ts_cmp(tok.ts_t, tok.ts_i, srv->clock_secs, srv->clock_inc) > 0) {
        /* A token from the future: wait for what comes after it. */
        c->pos = idx;
        c->has_min = true;
        c->min_t = tok.ts_t;
        c->min_i = tok.ts_i;
        ts_next(&c->min_t, &c->min_i);
        goto done;
    }
    {
        char hex[2 * 256 + 1];
        size_t n = tok.raw_len > 256 ? 256 : tok.raw_len;
        emu_cstoken_hex(tok.raw, n, hex);
        rc = set_err(err, 280,
                     "cannot resume stream; the resume token was not found. "
                     "{_data: \"%s%s\"}",
                     hex, tok.raw_len > n ? "..." : "");
    }
done:
    emu_cstoken_cleanup(&tok);
    return rc;
}

static char *str_dup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) {
        memcpy(p, s, n);
    }
    return p;
}

void emu_cs_aggregate(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    mc_error_t err;
    bson_iter_t it, pipeline_it;
    const char *coll = NULL;
    int64_t batch_size = CS_DEFAULT_FIRST_BATCH;
    cs_spec_t spec;

    mc_error_clear(&err);
    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it)) {
        emu_reply_error(reply, 9, "empty aggregate command");
        return;
    }
    if (BSON_ITER_HOLDS_UTF8(&it)) {
        coll = bson_iter_utf8(&it, NULL);
        if (coll[0] == '\0') {
            emu_reply_error(reply, 73, "Invalid namespace specified '%s.'", db);
            return;
        }
    } else {
        int64_t one = 0;
        if (!iter_as_int64(&it, &one) || one != 1) {
            emu_reply_error(reply, 73,
                            "Invalid command format: the 'aggregate' field must "
                            "specify a collection name or 1");
            return;
        }
    }
    if (!bson_iter_init_find(&pipeline_it, cmd, "pipeline") ||
        !BSON_ITER_HOLDS_ARRAY(&pipeline_it)) {
        emu_reply_error(reply, 14, "BSON field 'aggregate.pipeline' is missing or not an array");
        return;
    }
    if (!bson_iter_init_find(&it, cmd, "cursor")) {
        emu_reply_error(reply, 9,
                        "The 'cursor' option is required, except for aggregate with "
                        "the explain argument");
        return;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
        emu_reply_error(reply, 14,
                        "BSON field 'aggregate.cursor' is the wrong type '%s', "
                        "expected type 'object'",
                        emu_type_name(bson_iter_type(&it)));
        return;
    }
    {
        bson_iter_t cur;
        bson_iter_recurse(&it, &cur);
        if (bson_iter_find(&cur, "batchSize") &&
            !read_batch_size(&cur, "cursor.batchSize", "types '[long, int, decimal, double]'",
                             &batch_size, reply)) {
            return;
        }
    }
    {
        bson_iter_t st, stage;
        bson_iter_recurse(&pipeline_it, &st);
        if (!bson_iter_next(&st) || !BSON_ITER_HOLDS_DOCUMENT(&st) ||
            !bson_iter_recurse(&st, &stage) || !bson_iter_next(&stage) ||
            strcmp(bson_iter_key(&stage), "$changeStream") != 0) {
            emu_reply_error(reply, 40602,
                            "$changeStream is only valid as the first stage in a pipeline");
            return;
        }
        if (parse_spec(&stage, &spec, &err) != 0) {
            emu_reply_error_from(reply, &err);
            return;
        }
    }
    if (srv->opts.standalone) {
        emu_reply_error(reply, 40573, "The $changeStream stage is only supported on replica sets");
        return;
    }

    /* Scope and namespace rules. */
    cs_scope_t scope = coll ? SCOPE_COLL : SCOPE_DB;
    if (spec.all_changes_for_cluster) {
        if (coll || strcmp(db, "admin") != 0) {
            emu_reply_error(reply, 72,
                            "A $changeStream with 'allChangesForCluster:true' may only "
                            "be opened on the 'admin' database, and with no collection "
                            "name; found %s.%s",
                            db, coll ? coll : "$cmd.aggregate");
            return;
        }
        scope = SCOPE_CLUSTER;
    } else if (is_internal_db(db)) {
        emu_reply_error(reply, 73, "$changeStream may not be opened on the internal %s database",
                        db);
        return;
    } else if (coll && is_system(coll)) {
        emu_reply_error(reply, 73,
                        "$changeStream may not be opened on the internal %s.%s "
                        "collection",
                        db, coll);
        return;
    }

    /* Cursors nobody has touched for 10 minutes are closed, as cursorTimeoutMillis does. */
    reap_idle(srv);
    if (srv->cs_cursors->count >= CS_MAX_CURSORS) {
        emu_reply_error(reply, 96, "too many open change stream cursors (%d)", CS_MAX_CURSORS);
        return;
    }

    cs_cursor_t *c = calloc(1, sizeof *c);
    if (!c) {
        emu_reply_error(reply, 146, "out of memory");
        return;
    }
    emu_kbuf_init(&c->inv_src_token);
    emu_kbuf_init(&c->last_token);
    c->scope = scope;
    c->full_doc = spec.full_doc;
    c->pre = spec.pre;
    c->show_expanded = spec.show_expanded;
    c->db = str_dup(db);
    c->coll = coll ? str_dup(coll) : NULL;
    {
        const char *suffix = coll ? coll : "$cmd.aggregate";
        size_t n = strlen(db) + 1 + strlen(suffix) + 1;
        c->ns = malloc(n);
        if (c->ns) {
            snprintf(c->ns, n, "%s.%s", db, suffix);
            c->ns_coll = c->ns + strlen(db) + 1;
        }
    }
    if (!c->db || (coll && !c->coll) || !c->ns) {
        cursor_free(c);
        emu_reply_error(reply, 146, "out of memory");
        return;
    }
    if (compile_user_stages(&pipeline_it, &c->pipeline, &c->split, &err) != 0 ||
        resolve_start(srv, c, &spec, &err) != 0) {
        cursor_free(c);
        reply_cs_error(reply, &err);
        return;
    }

    cs_batch_t b;
    batch_init(&b);
    if (batch_size > 0 && collect(srv, c, &b, batch_size, false, &err) != 0) {
        batch_destroy(&b);
        cursor_free(c);
        reply_cs_error(reply, &err);
        return;
    }
    int64_t id = 0;
    if (!b.invalidated) {
        id = emu_new_cursor_id(srv);
        c->id = id;
        c->last_used_ms = now_ms();
        c->next = srv->cs_cursors->head;
        srv->cs_cursors->head = c;
        srv->cs_cursors->count++;
    }
    reply_batch(srv, c, &b, "firstBatch", id, reply);
    batch_destroy(&b);
    if (b.invalidated) {
        cursor_free(c);
    }
}

bool emu_cs_owns_cursor(emu_server_t *srv, int64_t cursor_id)
{
    return cursor_find(srv, cursor_id) != NULL;
}

static bool deadline_passed(const struct timespec *ts)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return now.tv_sec > ts->tv_sec || (now.tv_sec == ts->tv_sec && now.tv_nsec >= ts->tv_nsec);
}

void emu_cs_getmore(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bson_iter_t it;
    int64_t id = 0, batch_size = 0, max_time_ms = CS_DEFAULT_AWAIT_MS;
    mc_error_t err;

    mc_error_clear(&err);
    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it) || !iter_as_int64(&it, &id)) {
        emu_reply_error(reply, 14,
                        "BSON field 'getMore.getMore' is the wrong type, expected "
                        "type 'long'");
        return;
    }
    const char *coll = NULL;
    if (bson_iter_init_find(&it, cmd, "collection")) {
        if (!BSON_ITER_HOLDS_UTF8(&it)) {
            emu_reply_error(reply, 14,
                            "BSON field 'getMore.collection' is the wrong type '%s', "
                            "expected type 'string'",
                            emu_type_name(bson_iter_type(&it)));
            return;
        }
        coll = bson_iter_utf8(&it, NULL);
    } else {
        emu_reply_error(reply, 40414,
                        "BSON field 'getMore.collection' is missing but a required field");
        return;
    }
    if (bson_iter_init_find(&it, cmd, "batchSize") &&
        !read_batch_size(&it, "getMore.batchSize", "type 'long'", &batch_size, reply)) {
        return;
    }
    if (bson_iter_init_find(&it, cmd, "maxTimeMS")) {
        if (!iter_as_int64(&it, &max_time_ms)) {
            emu_reply_error(reply, 14,
                            "BSON field 'getMore.maxTimeMS' is the wrong type '%s', "
                            "expected type 'long'",
                            emu_type_name(bson_iter_type(&it)));
            return;
        }
        if (max_time_ms < 0) {
            emu_reply_error(reply, 2, "%lld value for maxTimeMS is out of range [0, 2147483647]",
                            (long long)max_time_ms);
            return;
        }
        if (max_time_ms > CS_MAX_AWAIT_MS) {
            max_time_ms = CS_MAX_AWAIT_MS;
        }
    }

    cs_cursor_t *c = cursor_find(srv, id);
    if (!c) {
        emu_reply_error(reply, 43, "cursor id %lld not found", (long long)id);
        return;
    }
    if (strcmp(db, c->db) != 0 || strcmp(coll, c->ns_coll) != 0) {
        emu_reply_error(reply, 13,
                        "Requested getMore on namespace '%s.%s', but cursor belongs to "
                        "a different namespace %s",
                        db, coll, c->ns);
        return;
    }
    if (c->busy) {
        emu_reply_error(reply, 292, "cursor id %lld is already in use", (long long)id);
        return;
    }

    emu_fp_action_t fp = emu_failpoint_after_checkout(conn, reply);
    if (fp == EMU_FP_ERROR) {
        /* A getMore that fails after checkout destroys the cursor, as on a real server. */
        cursor_unlink(srv, c);
        cursor_free(c);
        return;
    }
    if (fp == EMU_FP_CLOSE) {
        conn->close_after_reply = true;
        return;
    }

    struct timespec deadline;
    emu_deadline_after_ms(&deadline, max_time_ms);
    cs_batch_t b;
    batch_init(&b);
    c->busy = true;
    int rc = 0;
    for (;;) {
        rc = collect(srv, c, &b, batch_size, true, &err);
        if (rc != 0 || b.n > 0 || b.invalidated || srv->shutting_down || max_time_ms == 0 ||
            deadline_passed(&deadline)) {
            break;
        }
        int w = pthread_cond_timedwait(&srv->oplog_cond, &srv->lock, &deadline);
        if (c->killed) {
            break;
        }
        if (w == ETIMEDOUT) {
            rc = collect(srv, c, &b, batch_size, true, &err);
            break;
        }
    }
    c->busy = false;
    c->last_used_ms = now_ms();

    if (c->killed) {
        /* killCursors arrived while this getMore waited; it already unlinked the cursor. */
        batch_destroy(&b);
        cursor_free(c);
        emu_reply_error(reply, 237, "cursor id %lld was killed", (long long)id);
        return;
    }
    if (rc != 0) {
        batch_destroy(&b);
        cursor_unlink(srv, c);
        cursor_free(c);
        reply_cs_error(reply, &err);
        return;
    }
    reply_batch(srv, c, &b, "nextBatch", b.invalidated ? 0 : c->id, reply);
    batch_destroy(&b);
    if (b.invalidated) {
        cursor_unlink(srv, c);
        cursor_free(c);
    }
}

bool emu_cs_kill(emu_server_t *srv, int64_t cursor_id)
{
    cs_cursor_t *c = cursor_find(srv, cursor_id);
    if (!c) {
        return false;
    }
    cursor_unlink(srv, c);
    if (c->busy) {
        c->killed = true;
        pthread_cond_broadcast(&srv->oplog_cond);
    } else {
        cursor_free(c);
    }
    return true;
}

void emu_cs_truncate_oplog(emu_conn_t *conn, const bson_t *cmd, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    emu_oplog_t *log = srv->oplog;
    bson_iter_t it;
    int64_t keep = 0;

    if (bson_iter_init_find(&it, cmd, "keepLast")) {
        if (!iter_as_int64(&it, &keep) || keep < 0) {
            emu_reply_error(reply, 2, "keepLast must be a non-negative integer");
            return;
        }
    }
    init_floor(srv);
    int64_t removed = 0;
    while ((int64_t)(log->next_seq - log->first_seq) > keep) {
        drop_oldest(log);
        removed++;
    }
    BSON_APPEND_INT64(reply, "removed", removed);
    reply_ok(reply);
    pthread_cond_broadcast(&srv->oplog_cond);
}
