/*
 * crud.c: the data commands of mongo-emulator: insert, update, delete, find, findAndModify,
 * count, distinct and aggregate (without $changeStream), on the live data, on a snapshot
 * (readConcern "snapshot") or inside a transaction.
 *
 * Runs on connection threads with srv->lock held. A command works on a target: the live
 * collection (refs are slot numbers), or a view of it as of a cluster time (refs index the
 * view; view.h), which a transaction's writes also go through (txn.h: they stay private until
 * commit). Invariants: every successful live write records exactly one oplog entry and one
 * history record after the catalog has accepted it, so a change stream never sees a write that
 * failed; slot numbers collected for a statement stay valid through it because only
 * emu_coll_maybe_compact moves documents, and it runs after the statement; a live write never
 * changes a document an open transaction has written: it waits (releasing the lock) for the
 * transaction to end and then redoes its statement from the start. Queries of the form
 * {_id: value} use the _id hash (or a by-_id view lookup) instead of a scan.
 */
#include "core.h"

#include "agg.h"
#include "changestream.h"
#include "history.h"
#include "txn.h"
#include "update.h"
#include "view.h"

#include <string.h>
#include <time.h>

#define ALL_MATCHES ((size_t)-1)
/* ---- small helpers ---- */

static bool view_field_doc(const bson_t *cmd, const char *name, bson_t *out)
{
    bson_iter_t it;
    const uint8_t *d;
    uint32_t l;
    if (!bson_iter_init_find(&it, cmd, name) || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return false;
    }
    bson_iter_document(&it, &l, &d);
    return bson_init_static(out, d, l);
}

static bool view_iter_doc(const bson_iter_t *it, bson_t *out)
{
    const uint8_t *d;
    uint32_t l;
    if (BSON_ITER_HOLDS_DOCUMENT(it)) {
        bson_iter_document(it, &l, &d);
    } else if (BSON_ITER_HOLDS_ARRAY(it)) {
        bson_iter_array(it, &l, &d);
    } else {
        return false;
    }
    return bson_init_static(out, d, l);
}

static bool flag(const bson_t *doc, const char *name, bool dflt)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, doc, name) ? bson_iter_as_bool(&it) : dflt;
}

static void append_idx_key(bson_t *arr, uint32_t i, const bson_t *doc)
{
    char keybuf[16];
    const char *key;
    size_t klen = bson_uint32_to_string(i, &key, keybuf, sizeof(keybuf));
    bson_append_document(arr, key, (int)klen, doc);
}

static void ns_of(char *buf, size_t size, const char *db, const char *coll)
{
    snprintf(buf, size, "%s.%s", db, coll);
}

/* ---- matching ---- */

typedef struct matcher {
    mc_filter_t *filter;
    bool by_id;
    bson_value_t id; /* borrowed from the query */
} matcher_t;

static bool is_plain_value(const bson_iter_t *it)
{
    bson_type_t t = bson_iter_type(it);
    if (t == BSON_TYPE_ARRAY || t == BSON_TYPE_REGEX) {
        return false;
    }
    if (t == BSON_TYPE_DOCUMENT) {
        bson_iter_t child;
        /* {$op: ...} is an operator expression, not an embedded document */
        if (bson_iter_recurse(it, &child) && bson_iter_next(&child) &&
            bson_iter_key(&child)[0] == '$') {
            return false;
        }
    }
    return true;
}

static int matcher_init(matcher_t *m, const bson_t *q, mc_error_t *err)
{
    bson_iter_t it;

    memset(m, 0, sizeof(*m));
    if (bson_count_keys(q) == 1 && bson_iter_init_find(&it, q, "_id")) {
        if (is_plain_value(&it)) {
            m->by_id = true;
            m->id = *bson_iter_value(&it);
        } else if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
            bson_iter_t op;
            if (bson_iter_recurse(&it, &op) && bson_iter_next(&op) &&
                strcmp(bson_iter_key(&op), "$eq") == 0 && is_plain_value(&op)) {
                bson_iter_t more = op;
                if (!bson_iter_next(&more)) {
                    m->by_id = true;
                    m->id = *bson_iter_value(&op);
                }
            }
        }
    }
    /* Compiled even for _id lookups, so that a malformed query fails the same way. */
    m->filter = mc_filter_new(q, NULL, err);
    return m->filter ? 0 : MC_EINVAL;
}

static void matcher_cleanup(matcher_t *m)
{
    mc_filter_destroy(m->filter);
    m->filter = NULL;
}

typedef struct slots {
    size_t *v;
    size_t n;
    size_t cap;
} slots_t;

static void slots_push(slots_t *s, size_t slot)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 16;
        s->v = bson_realloc(s->v, s->cap * sizeof(*s->v));
    }
    s->v[s->n++] = slot;
}

/* ---- targets ---- */

typedef enum { VIEW_NONE, VIEW_FULL, VIEW_ONE } view_kind_t;

/* Where a command reads and writes. */
typedef struct target {
    emu_conn_t *conn;
    emu_server_t *srv;
    const char *db;
    const char *name;
    emu_coll_t *coll; /* live target: the collection (NULL while it does not exist) */
    emu_txn_t *txn;   /* the command's transaction: reads see its writes, writes go to it */
    bool is_view;     /* reads come from a view at (t, i); refs index v.docs */
    uint32_t t, i;
    emu_view_t v;
    view_kind_t v_kind;
} target_t;

static void tgt_init(target_t *t, emu_conn_t *conn, const char *db, const char *name)
{
    memset(t, 0, sizeof *t);
    t->conn = conn;
    t->srv = conn->srv;
    t->db = db;
    t->name = name;
    t->txn = conn->txn;
    if (t->txn) {
        t->is_view = true;
        emu_txn_read_time(t->txn, &t->t, &t->i);
    } else {
        t->coll = emu_catalog_coll(t->srv, db, name);
    }
}

/* A read target: inside a transaction its view; with readConcern snapshot a view at that time
 * (*at_out set, for the reply's atClusterTime); otherwise the live collection. */
static bool tgt_init_read(target_t *t, emu_conn_t *conn, const char *db, const char *name,
                          const char *cmd_name, const bson_t *cmd, bool supports_snapshot,
                          uint32_t at_out[2], bool *has_at, bson_t *reply)
{
    mc_error_t err;
    tgt_init(t, conn, db, name);
    *has_at = false;
    if (t->txn) {
        return true;
    }
    emu_read_at_t at;
    if (emu_read_at(t->srv, cmd_name, cmd, supports_snapshot, &at, &err) != 0) {
        emu_reply_error_from(reply, &err);
        return false;
    }
    if (at.snapshot) {
        t->is_view = true;
        t->t = at.t;
        t->i = at.i;
        at_out[0] = at.t;
        at_out[1] = at.i;
        *has_at = true;
    }
    return true;
}

static void tgt_cleanup(target_t *t)
{
    emu_view_free(&t->v);
    t->v_kind = VIEW_NONE;
}

/* After a write: the view no longer shows the data, and a live collection may have been
 * created (or, after a wait, dropped). */
static void tgt_refresh(target_t *t)
{
    if (t->is_view) {
        emu_view_free(&t->v);
        t->v_kind = VIEW_NONE;
    } else {
        t->coll = emu_catalog_coll(t->srv, t->db, t->name);
    }
}

static void tgt_doc(const target_t *t, size_t ref, bson_t *out)
{
    if (t->is_view) {
        bson_init_static(out, t->v.docs[ref].data, t->v.docs[ref].len);
    } else {
        emu_doc_view(&t->coll->docs[ref], out);
    }
}

/* Collects up to `limit` refs of matching documents, in natural order. */
static int tgt_collect(target_t *t, const matcher_t *m, size_t limit, slots_t *out, mc_error_t *err)
{
    out->n = 0;
    if (limit == 0) {
        return 0;
    }
    if (!t->is_view) {
        const emu_coll_t *c = t->coll;
        if (!c) {
            return 0;
        }
        if (m->by_id) {
            long slot = emu_coll_find_id(c, &m->id);
            if (slot >= 0) {
                slots_push(out, (size_t)slot);
            }
            return 0;
        }
        for (size_t s = 0; s < c->n_slots && out->n < limit; s++) {
            bson_t doc;
            if (!c->docs[s].data) {
                continue;
            }
            emu_doc_view(&c->docs[s], &doc);
            if (mc_filter_match(m->filter, &doc)) {
                slots_push(out, s);
            }
        }
        return 0;
    }
    if (m->by_id) {
        emu_vdoc_t d;
        bool found = false;
        tgt_cleanup(t);
        if (emu_view_find_id(t->srv, t->db, t->name, t->t, t->i, t->txn, &m->id, &d, &found, err) !=
            0) {
            return MC_ESERVER;
        }
        t->v_kind = VIEW_ONE;
        if (found) {
            t->v.docs = malloc(sizeof *t->v.docs);
            if (!t->v.docs) {
                return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "out of memory");
            }
            t->v.docs[0] = d;
            t->v.n = t->v.cap = 1;
            slots_push(out, 0);
        }
        return 0;
    }
    if (t->v_kind != VIEW_FULL) {
        tgt_cleanup(t);
        if (emu_view_build(t->srv, t->db, t->name, t->t, t->i, t->txn, &t->v, err) != 0) {
            return MC_ESERVER;
        }
        t->v_kind = VIEW_FULL;
    }
    for (size_t k = 0; k < t->v.n && out->n < limit; k++) {
        bson_t doc;
        bson_init_static(&doc, t->v.docs[k].data, t->v.docs[k].len);
        if (mc_filter_match(m->filter, &doc)) {
            slots_push(out, k);
        }
    }
    return 0;
}

/* Stable bottom-up merge sort of refs by a sort spec. */
static void sort_slots(const target_t *t, const bson_t *spec, slots_t *s)
{
    size_t n = s->n;
    size_t *a = s->v, *b;

    if (n < 2) {
        return;
    }
    b = bson_malloc(n * sizeof(*b));
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                bson_t x, y;
                tgt_doc(t, a[i], &x);
                tgt_doc(t, a[j], &y);
                if (emu_sort_compare(spec, &y, &x) < 0) {
                    b[k++] = a[j++];
                } else {
                    b[k++] = a[i++];
                }
            }
            while (i < mid) {
                b[k++] = a[i++];
            }
            while (j < hi) {
                b[k++] = a[j++];
            }
        }
        {
            size_t *tmp = a;
            a = b;
            b = tmp;
        }
    }
    if (a != s->v) {
        memcpy(s->v, a, n * sizeof(*a));
        b = a;
    }
    bson_free(b);
}

/* ---- waiting for transactions ---- */

/* The deadline of a command's maxTimeMS; tv_sec 0 when it has none. */
static void cmd_deadline(const bson_t *cmd, struct timespec *ts)
{
    bson_iter_t it;
    ts->tv_sec = 0;
    ts->tv_nsec = 0;
    if (bson_iter_init_find(&it, cmd, "maxTimeMS") && BSON_ITER_HOLDS_NUMBER(&it) &&
        bson_iter_as_int64(&it) > 0) {
        emu_deadline_after_ms(ts, bson_iter_as_int64(&it));
    }
}

/* For a live write about to change `doc`: 0 when no open transaction has written it; MC_EAGAIN
 * after waiting for one to end (the caller redoes its statement: the lock was released, so
 * collections and slots may have changed); MC_ESERVER when the wait failed (maxTimeMS, shutdown).
 */
static int wait_doc_unlocked(target_t *t, const bson_t *doc, const struct timespec *deadline,
                             mc_error_t *err)
{
    if (t->txn || !emu_txn_doc_locked(t->srv, NULL, t->db, t->name, doc)) {
        return 0;
    }
    if (emu_txn_wait(t->conn, deadline, err) != 0) {
        return MC_ESERVER;
    }
    tgt_refresh(t);
    return MC_EAGAIN;
}

static int wait_refs_unlocked(target_t *t, const slots_t *s, const struct timespec *deadline,
                              mc_error_t *err)
{
    for (size_t k = 0; k < s->n; k++) {
        bson_t doc;
        tgt_doc(t, s->v[k], &doc);
        int rc = wait_doc_unlocked(t, &doc, deadline, err);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* ---- _id handling ---- */

static int check_id_value(const bson_iter_t *it, mc_error_t *err)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_ARRAY:
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 53,
                            "The '_id' value cannot be of type array");
    case BSON_TYPE_REGEX:
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 53, "can't use a regex for _id");
    case BSON_TYPE_UNDEFINED:
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 53, "can't use a undefined for _id");
    default: return 0;
    }
}

/* Makes `doc` ready to store: _id present (a new ObjectId when missing) and first, as mongod
 * stores it. Returns the document to store: `doc` itself when it already fits, else `tmp`
 * (initialised here; the caller destroys it when *used_tmp). */
static const bson_t *with_id_first(const bson_t *doc, bson_t *tmp, bool *used_tmp, mc_error_t *err)
{
    bson_iter_t it;
    bool first = true;
    bool found = false;

    *used_tmp = false;
    if (bson_iter_init(&it, doc)) {
        while (bson_iter_next(&it)) {
            if (strcmp(bson_iter_key(&it), "_id") == 0) {
                found = true;
                if (check_id_value(&it, err)) {
                    return NULL;
                }
                break;
            }
            first = false;
        }
    }
    if (found && first) {
        return doc;
    }
    bson_init(tmp);
    *used_tmp = true;
    if (found) {
        bson_append_iter(tmp, "_id", 3, &it);
    } else {
        bson_oid_t oid;
        bson_oid_init(&oid, NULL);
        BSON_APPEND_OID(tmp, "_id", &oid);
    }
    bson_iter_init(&it, doc);
    while (bson_iter_next(&it)) {
        if (strcmp(bson_iter_key(&it), "_id") != 0) {
            bson_append_iter(tmp, NULL, 0, &it);
        }
    }
    return tmp;
}

static void document_key_of(const bson_t *doc, bson_t *dk)
{
    bson_iter_t it;
    bson_init(dk);
    if (bson_iter_init_find(&it, doc, "_id")) {
        bson_append_iter(dk, "_id", 3, &it);
    }
}

static int check_size(const bson_t *doc, mc_error_t *err)
{
    if (doc->len > EMU_MAX_BSON_SIZE) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 10334,
                            "object to insert too large. size in bytes: %u, max size: %d", doc->len,
                            EMU_MAX_BSON_SIZE);
    }
    return 0;
}

/* ---- oplog and history ---- */

/* Records a live write: the change event (pre-image only where images are enabled) and the
 * version history (the document before, always). `before` is NULL for an insert. */
static void record(emu_server_t *srv, emu_op_t op, const char *db, const emu_coll_t *c,
                   const bson_t *doc_for_key, const bson_t *full, const bson_t *before,
                   const bson_t *update_desc)
{
    emu_change_t ch;
    bson_t dk;

    document_key_of(doc_for_key, &dk);
    memset(&ch, 0, sizeof(ch));
    ch.op = op;
    ch.db = db;
    ch.coll = c->name;
    ch.coll_uuid = c->uuid;
    ch.document_key = &dk;
    ch.full_document = full;
    ch.pre_image = c->images ? before : NULL;
    ch.images_enabled = c->images;
    ch.update_description = update_desc;
    emu_oplog_append(srv, &ch);
    emu_history_record(srv, c->uuid, &dk, before);
    bson_destroy(&dk);
}

/* The E11000 error for a duplicate _id, as the catalog words it for unique indexes. */
static int dup_id_error(const target_t *t, const bson_t *doc, bson_t *dup, mc_error_t *err)
{
    bson_t kv = BSON_INITIALIZER, kp = BSON_INITIALIZER;
    bson_iter_t it;
    char text[1024];
    if (bson_iter_init_find(&it, doc, "_id")) {
        bson_append_iter(&kv, "_id", 3, &it);
    }
    BSON_APPEND_INT32(&kp, "_id", 1);
    emu_format_key_value(&kv, text, sizeof text);
    if (dup) {
        BSON_APPEND_DOCUMENT(dup, "keyPattern", &kp);
        BSON_APPEND_DOCUMENT(dup, "keyValue", &kv);
    }
    bson_destroy(&kv);
    bson_destroy(&kp);
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 11000,
                        "E11000 duplicate key error collection: %s.%s index: _id_ dup key: %s",
                        t->db, t->name, text);
}

/* Inserts `store` (with _id first, size checked) into the target. */
static int tgt_insert(target_t *t, const bson_t *store, bson_t *dup,
                      const struct timespec *deadline, mc_error_t *err)
{
    if (t->txn) {
        bson_iter_t it;
        emu_vdoc_t d;
        bool found = false;
        if (!bson_iter_init_find(&it, store, "_id")) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 2, "document has no _id");
        }
        if (emu_view_find_id(t->srv, t->db, t->name, t->t, t->i, t->txn, bson_iter_value(&it), &d,
                             &found, err) != 0) {
            return MC_ESERVER;
        }
        if (found) {
            return dup_id_error(t, store, dup, err);
        }
        emu_txn_write_t w = {EMU_OP_INSERT, t->db, t->name, NULL, store, NULL};
        int rc = emu_txn_write(t->srv, t->txn, &w, err);
        tgt_refresh(t);
        return rc;
    }
    int rc = wait_doc_unlocked(t, store, deadline, err);
    if (rc != 0) {
        return rc;
    }
    /* t->coll stays valid while the lock is held; waits refresh it (tgt_refresh). */
    emu_coll_t *c =
        t->coll ? t->coll : emu_catalog_coll_get_or_create(t->srv, t->db, t->name, NULL, err);
    if (!c) {
        return MC_EINVAL;
    }
    t->coll = c;
    rc = emu_coll_insert(c, store, dup, err);
    if (rc == 0) {
        record(t->srv, EMU_OP_INSERT, t->db, c, store, store, NULL, NULL);
    }
    return rc;
}

/* ---- write errors ---- */

typedef struct write_result {
    int32_t n;
    int32_t n_modified;
    bson_t write_errors;
    uint32_t n_errors;
    bson_t upserted;
    uint32_t n_upserted;
} write_result_t;

static void wr_init(write_result_t *wr)
{
    memset(wr, 0, sizeof(*wr));
    bson_init(&wr->write_errors);
    bson_init(&wr->upserted);
}

static void wr_cleanup(write_result_t *wr)
{
    bson_destroy(&wr->write_errors);
    bson_destroy(&wr->upserted);
}

static void wr_error(write_result_t *wr, uint32_t index, const mc_error_t *err, const bson_t *extra)
{
    bson_t e = BSON_INITIALIZER;
    int code = err->domain == MC_DOMAIN_MONGODB && err->cause ? err->cause : 2;
    BSON_APPEND_INT32(&e, "index", (int32_t)index);
    BSON_APPEND_INT32(&e, "code", code);
    if (extra) {
        bson_concat(&e, extra);
    }
    BSON_APPEND_UTF8(&e, "errmsg", err->message);
    append_idx_key(&wr->write_errors, wr->n_errors++, &e);
    bson_destroy(&e);
}

static void wr_finish(write_result_t *wr, bson_t *reply, bool with_modified)
{
    BSON_APPEND_INT32(reply, "n", wr->n);
    if (with_modified) {
        if (wr->n_upserted) {
            BSON_APPEND_ARRAY(reply, "upserted", &wr->upserted);
        }
        BSON_APPEND_INT32(reply, "nModified", wr->n_modified);
    }
    if (wr->n_errors) {
        BSON_APPEND_ARRAY(reply, "writeErrors", &wr->write_errors);
    }
}

/* The statements array of a write command; false (and an error reply) when malformed. */
static bool statements(const bson_t *cmd, const char *cmdname, const char *field,
                       bson_iter_t *items, uint32_t *count, bson_t *reply)
{
    bson_iter_t it, probe;
    uint32_t n = 0;

    if (!bson_iter_init_find(&it, cmd, field)) {
        emu_reply_error(reply, 40414, "BSON field '%s.%s' is missing but a required field", cmdname,
                        field);
        return false;
    }
    if (!BSON_ITER_HOLDS_ARRAY(&it)) {
        emu_reply_error(reply, 14,
                        "BSON field '%s.%s' is the wrong type '%s', expected type "
                        "'array'",
                        cmdname, field, "non-array");
        return false;
    }
    bson_iter_recurse(&it, &probe);
    while (bson_iter_next(&probe)) {
        if (!BSON_ITER_HOLDS_DOCUMENT(&probe)) {
            emu_reply_error(reply, 14,
                            "BSON field '%s.%s.%u' is the wrong type, expected "
                            "type 'object'",
                            cmdname, field, n);
            return false;
        }
        n++;
    }
    if (n == 0 || n > EMU_MAX_WRITE_BATCH) {
        emu_reply_error(reply, 16,
                        "Write batch sizes must be between 1 and %d. Got %u "
                        "operations.",
                        EMU_MAX_WRITE_BATCH, n);
        return false;
    }
    bson_iter_recurse(&it, items);
    *count = n;
    return true;
}

/* ---- insert ---- */

/* Errors of the transaction machinery (WriteConflict, SnapshotTooOld, ...) and failed waits
 * fail the whole command; per-document errors (duplicate key, bad document) are write errors.
 * By convention the former come back as MC_ESERVER. */
static bool fails_command(int rc)
{
    return rc == MC_ESERVER;
}

void emu_cmd_insert(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bool ordered = flag(cmd, "ordered", true);
    bson_iter_t items;
    uint32_t count, i = 0;
    write_result_t wr;
    mc_error_t err;
    target_t t;
    struct timespec deadline;

    if (!name || !statements(cmd, "insert", "documents", &items, &count, reply)) {
        return;
    }
    if (emu_check_db_name(db, &err) || emu_check_coll_name(name, &err)) {
        emu_reply_error_from(reply, &err);
        return;
    }
    cmd_deadline(cmd, &deadline);
    tgt_init(&t, conn, db, name);
    wr_init(&wr);
    for (; bson_iter_next(&items); i++) {
        bson_t doc, tmp, dup = BSON_INITIALIZER;
        bool used_tmp = false;
        const bson_t *store;
        int rc;

        view_iter_doc(&items, &doc);
        store = with_id_first(&doc, &tmp, &used_tmp, &err);
        rc = store ? check_size(store, &err) : MC_EINVAL;
        while (rc == 0 && (rc = tgt_insert(&t, store, &dup, &deadline, &err)) == MC_EAGAIN) {
            bson_reinit(&dup);
            rc = 0;
        }
        if (rc == 0) {
            wr.n++;
        } else if (!fails_command(rc)) {
            wr_error(&wr, i, &err, &dup);
        }
        bson_destroy(&dup);
        if (used_tmp) {
            bson_destroy(&tmp);
        }
        if (fails_command(rc)) {
            emu_reply_error_from(reply, &err);
            wr_cleanup(&wr);
            tgt_cleanup(&t);
            return;
        }
        /* In a transaction the first write error ends the batch (and the transaction). */
        if (rc && (ordered || t.txn)) {
            break;
        }
    }
    wr_finish(&wr, reply, false);
    wr_cleanup(&wr);
    tgt_cleanup(&t);
}

/* ---- update ---- */

static int id_changed(const bson_t *before, const bson_t *after, mc_error_t *err)
{
    bson_iter_t a, b;
    if (!bson_iter_init_find(&a, before, "_id")) {
        return 0;
    }
    if (!bson_iter_init_find(&b, after, "_id") ||
        mc_bson_value_compare(bson_iter_value(&a), bson_iter_value(&b)) != 0 ||
        bson_iter_type(&a) != bson_iter_type(&b)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 66,
                            "After applying the update, the (immutable) field '_id' was found "
                            "to have been altered");
    }
    return 0;
}

/* Applies `u` to the document at `ref`: stores it (live, or in the transaction) and records
 * the change. *modified tells whether the document changed. `before_copy` and `after_copy`
 * (may be NULL) receive the old and the new document. Views keep their refs valid through it:
 * a transaction's earlier versions live as long as the transaction. */
static int tgt_update(target_t *t, size_t ref, const bson_value_t *u, emu_update_kind_t kind,
                      bool *modified, bson_t *before_copy, bson_t *after_copy, bson_t *dup,
                      mc_error_t *err)
{
    bson_t old, updated;
    emu_update_desc_t desc;
    bool changed = false;
    int rc;

    tgt_doc(t, ref, &old);
    emu_update_desc_init(&desc);
    rc = emu_update_apply(&old, u, false, &updated, &desc, &changed, err);
    if (rc == 0) {
        rc = id_changed(&old, &updated, err);
    }
    if (rc == 0) {
        rc = check_size(&updated, err);
    }
    if (rc == 0 && before_copy) {
        bson_copy_to(&old, before_copy);
    }
    if (rc == 0 && changed) {
        emu_op_t op = kind == EMU_UPDATE_REPLACEMENT ? EMU_OP_REPLACE : EMU_OP_UPDATE;
        bson_t wrap = BSON_INITIALIZER, ud;
        const bson_t *udp = NULL;
        if (op == EMU_OP_UPDATE) {
            bson_iter_t it;
            emu_update_desc_append(&desc, &wrap, "u");
            if (bson_iter_init_find(&it, &wrap, "u") && view_iter_doc(&it, &ud)) {
                udp = &ud;
            }
        }
        if (t->txn) {
            emu_txn_write_t w = {op, t->db, t->name, &old, &updated, udp};
            rc = emu_txn_write(t->srv, t->txn, &w, err);
        } else {
            /* the replace overwrites the old bytes: keep them for the pre-image and history */
            bson_t pre;
            bson_copy_to(&old, &pre);
            rc = emu_coll_replace(t->coll, ref, &updated, dup, err);
            if (rc == 0) {
                record(t->srv, op, t->db, t->coll, &updated, &updated, &pre, udp);
            }
            bson_destroy(&pre);
        }
        bson_destroy(&wrap);
        if (rc != 0 && before_copy) {
            bson_destroy(before_copy);
        }
    }
    if (rc == 0 && after_copy) {
        bson_copy_to(&updated, after_copy);
    }
    *modified = rc == 0 && changed;
    bson_destroy(&updated);
    emu_update_desc_cleanup(&desc);
    return rc;
}

/* Builds and inserts the upsert document; fills `id_doc` with its {_id}. MC_EAGAIN: waited for
 * a transaction, redo the statement. */
static int tgt_upsert(target_t *t, const bson_t *q, const bson_value_t *u, emu_update_kind_t kind,
                      bson_t *id_doc, bson_t *after_copy, bson_t *dup,
                      const struct timespec *deadline, mc_error_t *err)
{
    bson_t seed, built, tmp;
    const bson_t *store;
    bool used_tmp = false;
    int rc;

    rc = emu_upsert_seed(q, &seed, err);
    if (rc) {
        return rc;
    }
    if (kind == EMU_UPDATE_REPLACEMENT) {
        bson_t repl;
        bson_iter_t it;
        bson_init(&built);
        bson_init_static(&repl, u->value.v_doc.data, u->value.v_doc.data_len);
        if (!bson_has_field(&repl, "_id") && bson_iter_init_find(&it, &seed, "_id")) {
            bson_append_iter(&built, "_id", 3, &it);
        }
        bson_concat(&built, &repl);
    } else {
        rc = emu_update_apply(&seed, u, true, &built, NULL, NULL, err);
        if (rc == 0) {
            rc = id_changed(&seed, &built, err);
        }
    }
    bson_destroy(&seed);
    if (rc) {
        bson_destroy(&built);
        return rc;
    }
    store = with_id_first(&built, &tmp, &used_tmp, err);
    rc = store ? check_size(store, err) : MC_EINVAL;
    if (rc == 0) {
        rc = tgt_insert(t, store, dup, deadline, err);
        if (rc == 0) {
            document_key_of(store, id_doc);
            if (after_copy) {
                bson_copy_to(store, after_copy);
            }
        }
    }
    if (used_tmp) {
        bson_destroy(&tmp);
    }
    bson_destroy(&built);
    return rc;
}

static int update_value(const bson_t *stmt, bson_value_t *u, emu_update_kind_t *kind,
                        mc_error_t *err)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, stmt, "u") ||
        !(BSON_ITER_HOLDS_DOCUMENT(&it) || BSON_ITER_HOLDS_ARRAY(&it))) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                            "BSON field 'update.updates.u' is missing or not an object or "
                            "array");
    }
    *u = *bson_iter_value(&it);
    return emu_update_kind(u, kind, err);
}

/* Collects a write statement's matches and, outside transactions, waits until no open
 * transaction holds one of them. MC_EAGAIN: waited, collect again. */
static int collect_for_write(target_t *t, const matcher_t *m, size_t limit, slots_t *out,
                             const struct timespec *deadline, mc_error_t *err)
{
    int rc = tgt_collect(t, m, limit, out, err);
    if (rc == 0 && !t->txn) {
        rc = wait_refs_unlocked(t, out, deadline, err);
    }
    return rc;
}

void emu_cmd_update(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bool ordered = flag(cmd, "ordered", true);
    bson_iter_t items;
    uint32_t count, i = 0;
    write_result_t wr;
    slots_t slots = {0};
    target_t t;
    struct timespec deadline;

    if (!name || !statements(cmd, "update", "updates", &items, &count, reply)) {
        return;
    }
    cmd_deadline(cmd, &deadline);
    tgt_init(&t, conn, db, name);
    wr_init(&wr);
    for (; bson_iter_next(&items); i++) {
        bson_t stmt, q, dup = BSON_INITIALIZER;
        bson_value_t u;
        emu_update_kind_t kind = EMU_UPDATE_OPERATORS;
        bool multi, upsert;
        matcher_t m = {0};
        mc_error_t err;
        int rc = 0;

        view_iter_doc(&items, &stmt);
        multi = flag(&stmt, "multi", false);
        upsert = flag(&stmt, "upsert", false);
        if (!view_field_doc(&stmt, "q", &q)) {
            rc = mc_error_set(&err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                              "BSON field 'update.updates.q' is missing or not an object");
        }
        if (rc == 0) {
            rc = update_value(&stmt, &u, &kind, &err);
        }
        if (rc == 0 && bson_has_field(&stmt, "arrayFilters")) {
            rc = mc_error_set(&err, MC_EINVAL, MC_DOMAIN_MONGODB, 2,
                              "mongo-emulator does not support arrayFilters");
        }
        if (rc == 0 && multi && kind == EMU_UPDATE_REPLACEMENT) {
            rc = mc_error_set(&err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                              "multi update is not supported for replacement-style update");
        }
        if (rc == 0) {
            rc = matcher_init(&m, &q, &err);
        }
        while (rc == 0) {
            rc = collect_for_write(&t, &m, multi ? ALL_MATCHES : 1, &slots, &deadline, &err);
            if (rc == MC_EAGAIN) {
                rc = 0;
                continue;
            }
            for (size_t k = 0; k < slots.n && rc == 0; k++) {
                bool modified;
                rc = tgt_update(&t, slots.v[k], &u, kind, &modified, NULL, NULL, &dup, &err);
                if (rc == 0) {
                    wr.n++;
                    wr.n_modified += modified ? 1 : 0;
                }
            }
            if (rc == 0 && slots.n == 0 && upsert) {
                bson_t id_doc = BSON_INITIALIZER;
                rc = tgt_upsert(&t, &q, &u, kind, &id_doc, NULL, &dup, &deadline, &err);
                if (rc == 0) {
                    bson_t e = BSON_INITIALIZER;
                    BSON_APPEND_INT32(&e, "index", (int32_t)i);
                    bson_concat(&e, &id_doc);
                    append_idx_key(&wr.upserted, wr.n_upserted++, &e);
                    bson_destroy(&e);
                    wr.n++;
                }
                bson_destroy(&id_doc);
                if (rc == MC_EAGAIN) {
                    rc = 0;
                    bson_reinit(&dup);
                    continue;
                }
            }
            break;
        }
        tgt_refresh(&t);
        matcher_cleanup(&m);
        if (rc && !fails_command(rc)) {
            wr_error(&wr, i, &err, &dup);
        }
        bson_destroy(&dup);
        if (fails_command(rc)) {
            emu_reply_error_from(reply, &err);
            goto out;
        }
        if (rc && (ordered || t.txn)) {
            break;
        }
    }
    wr_finish(&wr, reply, true);
out:
    bson_free(slots.v);
    wr_cleanup(&wr);
    tgt_cleanup(&t);
}

/* ---- delete ---- */

static int tgt_delete(target_t *t, size_t ref, mc_error_t *err)
{
    bson_t doc;
    tgt_doc(t, ref, &doc);
    if (t->txn) {
        emu_txn_write_t w = {EMU_OP_DELETE, t->db, t->name, &doc, NULL, NULL};
        return emu_txn_write(t->srv, t->txn, &w, err);
    }
    /* recorded first: the pre-image is read from the stored bytes that the delete frees */
    record(t->srv, EMU_OP_DELETE, t->db, t->coll, &doc, NULL, &doc, NULL);
    emu_coll_delete(t->coll, ref);
    return 0;
}

void emu_cmd_delete(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bool ordered = flag(cmd, "ordered", true);
    bson_iter_t items;
    uint32_t count, i = 0;
    write_result_t wr;
    slots_t slots = {0};
    target_t t;
    struct timespec deadline;

    if (!name || !statements(cmd, "delete", "deletes", &items, &count, reply)) {
        return;
    }
    cmd_deadline(cmd, &deadline);
    tgt_init(&t, conn, db, name);
    wr_init(&wr);
    for (; bson_iter_next(&items); i++) {
        bson_t stmt, q;
        bson_iter_t it;
        int64_t limit = 0;
        matcher_t m = {0};
        mc_error_t err;
        int rc = 0;

        view_iter_doc(&items, &stmt);
        if (!view_field_doc(&stmt, "q", &q)) {
            rc = mc_error_set(&err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                              "BSON field 'delete.deletes.q' is missing or not an object");
        }
        if (rc == 0 && bson_iter_init_find(&it, &stmt, "limit")) {
            limit = bson_iter_as_int64(&it);
            if (limit != 0 && limit != 1) {
                rc = mc_error_set(&err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                                  "The limit field in delete objects must be 0 or 1. Got %lld",
                                  (long long)limit);
            }
        }
        if (rc == 0) {
            rc = matcher_init(&m, &q, &err);
        }
        while (rc == 0) {
            rc = collect_for_write(&t, &m, limit == 1 ? 1 : ALL_MATCHES, &slots, &deadline, &err);
            if (rc == MC_EAGAIN) {
                rc = 0;
                continue;
            }
            for (size_t k = 0; k < slots.n && rc == 0; k++) {
                rc = tgt_delete(&t, slots.v[k], &err);
                if (rc == 0) {
                    wr.n++;
                }
            }
            if (!t.txn && t.coll) {
                emu_coll_maybe_compact(t.coll);
            }
            break;
        }
        tgt_refresh(&t);
        matcher_cleanup(&m);
        if (fails_command(rc)) {
            emu_reply_error_from(reply, &err);
            goto out;
        }
        if (rc) {
            wr_error(&wr, i, &err, NULL);
            if (ordered || t.txn) {
                break;
            }
        }
    }
    wr_finish(&wr, reply, false);
out:
    bson_free(slots.v);
    wr_cleanup(&wr);
    tgt_cleanup(&t);
}

/* ---- find ---- */

static bool opt_doc(const bson_t *cmd, const char *name, bson_t *out, bson_t *reply,
                    const char *cmdname)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, cmd, name) || BSON_ITER_HOLDS_NULL(&it)) {
        bson_init(out);
        return true;
    }
    if (!view_iter_doc(&it, out) || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        emu_reply_error(reply, 14,
                        "BSON field '%s.%s' is the wrong type, expected type "
                        "'object'",
                        cmdname, name);
        return false;
    }
    return true;
}

static bool opt_int(const bson_t *cmd, const char *name, int64_t *out, bson_t *reply,
                    const char *cmdname)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, cmd, name) || BSON_ITER_HOLDS_NULL(&it)) {
        return true;
    }
    if (!BSON_ITER_HOLDS_NUMBER(&it)) {
        emu_reply_error(reply, 14, "BSON field '%s.%s' is the wrong type, expected a number",
                        cmdname, name);
        return false;
    }
    *out = bson_iter_as_int64(&it);
    return true;
}

/* Appends the documents of `slots` [from, to) to `out`, projected when `proj` has keys. */
static int emit_docs(const target_t *t, const slots_t *s, size_t from, size_t to,
                     const bson_t *proj, emu_bytes_t *out, mc_error_t *err)
{
    bool project = proj && !bson_empty(proj);
    for (size_t k = from; k < to; k++) {
        bson_t doc;
        tgt_doc(t, s->v[k], &doc);
        if (project) {
            bson_t p;
            if (emu_projection_apply(proj, &doc, &p, err)) {
                return MC_EINVAL;
            }
            if (!emu_bytes_append(out, bson_get_data(&p), p.len)) {
                bson_destroy(&p);
                return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "result set too large");
            }
            bson_destroy(&p);
        } else if (!emu_bytes_append(out, bson_get_data(&doc), doc.len)) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "result set too large");
        }
    }
    return 0;
}

void emu_cmd_find(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    const char *name = emu_cmd_collection(cmd, reply);
    bson_t filter, sort, proj;
    int64_t skip = 0, limit = 0, batch = -1;
    bool single, has_at = false;
    uint32_t at[2];
    matcher_t m;
    slots_t slots = {0};
    emu_bytes_t out = {0};
    mc_error_t err;
    char ns[400];
    size_t from, to;
    target_t t;

    if (!name || !opt_doc(cmd, "filter", &filter, reply, "find") ||
        !opt_doc(cmd, "sort", &sort, reply, "find") ||
        !opt_doc(cmd, "projection", &proj, reply, "find") ||
        !opt_int(cmd, "skip", &skip, reply, "find") ||
        !opt_int(cmd, "limit", &limit, reply, "find") ||
        !opt_int(cmd, "batchSize", &batch, reply, "find")) {
        return;
    }
    single = flag(cmd, "singleBatch", false);
    if (skip < 0) {
        emu_reply_error(reply, 51024, "BSON field 'skip' value must be >= 0, actual value '%lld'",
                        (long long)skip);
        return;
    }
    if (limit < 0) {
        /* legacy negative limit: one batch of at most |limit| */
        limit = -limit;
        single = true;
    }
    if (batch < -1) {
        emu_reply_error(reply, 51024,
                        "BSON field 'batchSize' value must be >= 0, actual value '%lld'",
                        (long long)batch);
        return;
    }
    if (flag(cmd, "tailable", false)) {
        emu_reply_error(reply, 2,
                        "error processing query: tailable cursor requested on non "
                        "capped collection");
        return;
    }
    if (!bson_empty(&proj) && emu_projection_check(&proj, &err)) {
        emu_reply_error_from(reply, &err);
        return;
    }
    if (!tgt_init_read(&t, conn, db, name, "find", cmd, true, at, &has_at, reply)) {
        return;
    }
    if (matcher_init(&m, &filter, &err)) {
        emu_reply_error_from(reply, &err);
        tgt_cleanup(&t);
        return;
    }
    ns_of(ns, sizeof(ns), db, name);
    int rc =
        tgt_collect(&t, &m, bson_empty(&sort) && limit > 0 ? (size_t)(skip + limit) : ALL_MATCHES,
                    &slots, &err);
    if (rc == 0 && !bson_empty(&sort)) {
        sort_slots(&t, &sort, &slots);
    }
    from = (size_t)skip < slots.n ? (size_t)skip : slots.n;
    to = limit > 0 && (size_t)limit < slots.n - from ? from + (size_t)limit : slots.n;
    if (rc != 0 || emit_docs(&t, &slots, from, to, &proj, &out, &err)) {
        emu_reply_error_from(reply, &err);
        emu_bytes_free(&out);
    } else {
        if (limit > 0 && batch > limit) {
            batch = limit;
        }
        /* Like mongod (SERVER-83472), a snapshot find that returns nothing does not say its
         * atClusterTime (aggregate does). */
        emu_cursor_reply_first_at(srv, ns, out.data, out.len, (long)batch, single,
                                  has_at && out.len > 0 ? at : NULL, reply);
    }
    bson_free(slots.v);
    matcher_cleanup(&m);
    tgt_cleanup(&t);
}

/* ---- findAndModify ---- */

static void append_value_doc(bson_t *reply, const bson_t *doc, const bson_t *fields,
                             mc_error_t *err, bool *failed)
{
    if (!doc) {
        BSON_APPEND_NULL(reply, "value");
        return;
    }
    if (fields && !bson_empty(fields)) {
        bson_t p;
        if (emu_projection_apply(fields, doc, &p, err)) {
            *failed = true;
            return;
        }
        BSON_APPEND_DOCUMENT(reply, "value", &p);
        bson_destroy(&p);
    } else {
        BSON_APPEND_DOCUMENT(reply, "value", doc);
    }
}

void emu_cmd_find_and_modify(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bson_t query, sort, fields, leo = BSON_INITIALIZER, value_doc, dup = BSON_INITIALIZER;
    bool remove, want_new, upsert, have_value = false, failed = false;
    bson_value_t u;
    emu_update_kind_t kind = EMU_UPDATE_OPERATORS;
    matcher_t m;
    slots_t slots = {0};
    mc_error_t err;
    int rc = 0;
    bson_iter_t it;
    target_t t;
    struct timespec deadline;

    memset(&u, 0, sizeof(u));

    if (!name || !opt_doc(cmd, "query", &query, reply, "findAndModify") ||
        !opt_doc(cmd, "sort", &sort, reply, "findAndModify") ||
        !opt_doc(cmd, "fields", &fields, reply, "findAndModify")) {
        bson_destroy(&leo);
        bson_destroy(&dup);
        return;
    }
    remove = flag(cmd, "remove", false);
    want_new = flag(cmd, "new", false);
    upsert = flag(cmd, "upsert", false);
    if (remove && bson_has_field(cmd, "update")) {
        emu_reply_error(reply, 9, "Cannot specify both an update and remove=true");
        goto out;
    }
    if (!remove && !bson_has_field(cmd, "update")) {
        emu_reply_error(reply, 9, "Either an update or remove=true must be specified");
        goto out;
    }
    if (remove && (want_new || upsert)) {
        emu_reply_error(reply, 9,
                        "Cannot specify both new=true and remove=true; 'remove' always "
                        "returns the deleted document");
        goto out;
    }
    if (bson_has_field(cmd, "arrayFilters")) {
        emu_reply_error(reply, 2, "mongo-emulator does not support arrayFilters");
        goto out;
    }
    if (!remove) {
        bson_iter_init_find(&it, cmd, "update");
        if (!(BSON_ITER_HOLDS_DOCUMENT(&it) || BSON_ITER_HOLDS_ARRAY(&it))) {
            emu_reply_error(reply, 14, "Update argument must be either an object or an array");
            goto out;
        }
        u = *bson_iter_value(&it);
        if (emu_update_kind(&u, &kind, &err)) {
            emu_reply_error_from(reply, &err);
            goto out;
        }
    }
    if (!bson_empty(&fields) && emu_projection_check(&fields, &err)) {
        emu_reply_error_from(reply, &err);
        goto out;
    }
    if (matcher_init(&m, &query, &err)) {
        emu_reply_error_from(reply, &err);
        goto out;
    }
    cmd_deadline(cmd, &deadline);
    tgt_init(&t, conn, db, name);
    for (;;) {
        rc =
            collect_for_write(&t, &m, bson_empty(&sort) ? 1 : ALL_MATCHES, &slots, &deadline, &err);
        if (rc == MC_EAGAIN) {
            continue;
        }
        if (rc != 0) {
            break;
        }
        if (slots.n > 1) {
            sort_slots(&t, &sort, &slots);
        }
        if (slots.n > 0 && remove) {
            bson_t doc;
            tgt_doc(&t, slots.v[0], &doc);
            bson_copy_to(&doc, &value_doc);
            have_value = true;
            rc = tgt_delete(&t, slots.v[0], &err);
            if (rc == 0 && !t.txn) {
                emu_coll_maybe_compact(t.coll);
            }
            if (rc == 0) {
                BSON_APPEND_INT32(&leo, "n", 1);
            }
        } else if (slots.n > 0) {
            bool modified;
            rc = tgt_update(&t, slots.v[0], &u, kind, &modified, want_new ? NULL : &value_doc,
                            want_new ? &value_doc : NULL, &dup, &err);
            if (rc == 0) {
                have_value = true;
                BSON_APPEND_INT32(&leo, "n", 1);
                BSON_APPEND_BOOL(&leo, "updatedExisting", true);
            }
        } else if (upsert && !remove) {
            bson_t id_doc = BSON_INITIALIZER;
            rc = tgt_upsert(&t, &query, &u, kind, &id_doc, want_new ? &value_doc : NULL, &dup,
                            &deadline, &err);
            if (rc == 0) {
                have_value = want_new;
                BSON_APPEND_INT32(&leo, "n", 1);
                BSON_APPEND_BOOL(&leo, "updatedExisting", false);
                if (bson_iter_init_find(&it, &id_doc, "_id")) {
                    bson_append_iter(&leo, "upserted", -1, &it);
                }
            }
            bson_destroy(&id_doc);
            if (rc == MC_EAGAIN) {
                bson_reinit(&dup);
                continue;
            }
        } else {
            BSON_APPEND_INT32(&leo, "n", 0);
            if (!remove) {
                BSON_APPEND_BOOL(&leo, "updatedExisting", false);
            }
        }
        break;
    }
    if (rc) {
        if (have_value) {
            bson_destroy(&value_doc);
            have_value = false;
        }
        emu_reply_error_from(reply, &err);
        if (!bson_empty(&dup)) {
            bson_concat(reply, &dup);
        }
    } else {
        BSON_APPEND_DOCUMENT(reply, "lastErrorObject", &leo);
        append_value_doc(reply, have_value ? &value_doc : NULL, &fields, &err, &failed);
        if (failed) {
            emu_reply_error_from(reply, &err);
        }
    }
    if (have_value) {
        bson_destroy(&value_doc);
    }
    bson_free(slots.v);
    matcher_cleanup(&m);
    tgt_cleanup(&t);
out:
    bson_destroy(&leo);
    bson_destroy(&dup);
}

/* ---- count, distinct ---- */

void emu_cmd_count(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bson_t query;
    int64_t skip = 0, limit = 0, n;
    matcher_t m;
    slots_t slots = {0};
    mc_error_t err;
    target_t t;
    bool has_at;
    uint32_t at[2];

    if (!name || !opt_doc(cmd, "query", &query, reply, "count") ||
        !opt_int(cmd, "skip", &skip, reply, "count") ||
        !opt_int(cmd, "limit", &limit, reply, "count")) {
        return;
    }
    if (skip < 0) {
        emu_reply_error(reply, 2, "skip value is negative in count query");
        return;
    }
    if (!tgt_init_read(&t, conn, db, name, "count", cmd, false, at, &has_at, reply)) {
        return;
    }
    if (bson_empty(&query) && !t.is_view) {
        n = t.coll ? (int64_t)t.coll->n_live : 0;
    } else {
        if (matcher_init(&m, &query, &err)) {
            emu_reply_error_from(reply, &err);
            tgt_cleanup(&t);
            return;
        }
        int rc = tgt_collect(&t, &m, ALL_MATCHES, &slots, &err);
        n = (int64_t)slots.n;
        bson_free(slots.v);
        matcher_cleanup(&m);
        if (rc != 0) {
            emu_reply_error_from(reply, &err);
            tgt_cleanup(&t);
            return;
        }
    }
    tgt_cleanup(&t);
    n = n > skip ? n - skip : 0;
    if (limit != 0) {
        int64_t l = limit < 0 ? -limit : limit;
        n = n < l ? n : l;
    }
    BSON_APPEND_INT32(reply, "n", (int32_t)n);
}

typedef struct value_ref {
    bson_value_t v;
} value_ref_t;

static int compare_values(const void *a, const void *b)
{
    return mc_bson_value_compare(&((const value_ref_t *)a)->v, &((const value_ref_t *)b)->v);
}

void emu_cmd_distinct(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bson_t query, arr;
    bson_iter_t it;
    const char *key;
    matcher_t m;
    slots_t slots = {0};
    mc_error_t err;
    value_ref_t *vals = NULL;
    size_t n = 0, cap = 0;
    uint32_t out = 0;
    target_t t;
    bool has_at;
    uint32_t at[2];

    if (!name || !opt_doc(cmd, "query", &query, reply, "distinct")) {
        return;
    }
    if (!bson_iter_init_find(&it, cmd, "key") || !BSON_ITER_HOLDS_UTF8(&it)) {
        emu_reply_error(reply, 40414,
                        "BSON field 'distinct.key' is missing but a required "
                        "field");
        return;
    }
    key = bson_iter_utf8(&it, NULL);
    if (!tgt_init_read(&t, conn, db, name, "distinct", cmd, true, at, &has_at, reply)) {
        return;
    }
    if (matcher_init(&m, &query, &err)) {
        emu_reply_error_from(reply, &err);
        tgt_cleanup(&t);
        return;
    }
    if (tgt_collect(&t, &m, ALL_MATCHES, &slots, &err) != 0) {
        emu_reply_error_from(reply, &err);
        bson_free(slots.v);
        matcher_cleanup(&m);
        tgt_cleanup(&t);
        return;
    }
    for (size_t k = 0; k < slots.n; k++) {
        bson_t doc;
        bson_iter_t di, found;
        tgt_doc(&t, slots.v[k], &doc);
        if (!bson_iter_init(&di, &doc) || !bson_iter_find_descendant(&di, key, &found)) {
            continue;
        }
        if (BSON_ITER_HOLDS_ARRAY(&found)) {
            bson_iter_t el;
            bson_iter_recurse(&found, &el);
            while (bson_iter_next(&el)) {
                if (n == cap) {
                    cap = cap ? cap * 2 : 64;
                    vals = bson_realloc(vals, cap * sizeof(*vals));
                }
                vals[n++].v = *bson_iter_value(&el);
            }
        } else {
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                vals = bson_realloc(vals, cap * sizeof(*vals));
            }
            vals[n++].v = *bson_iter_value(&found);
        }
    }
    if (n > 1) {
        qsort(vals, n, sizeof(*vals), compare_values);
    }
    BSON_APPEND_ARRAY_BEGIN(reply, "values", &arr);
    for (size_t k = 0; k < n; k++) {
        if (k > 0 && mc_bson_value_compare(&vals[k - 1].v, &vals[k].v) == 0) {
            continue;
        }
        {
            char keybuf[16];
            const char *ak;
            size_t klen = bson_uint32_to_string(out++, &ak, keybuf, sizeof(keybuf));
            bson_append_value(&arr, ak, (int)klen, &vals[k].v);
        }
    }
    bson_append_array_end(reply, &arr);
    if (has_at) {
        BSON_APPEND_TIMESTAMP(reply, "atClusterTime", at[0], at[1]);
    }
    bson_free(vals);
    bson_free(slots.v);
    matcher_cleanup(&m);
    tgt_cleanup(&t);
}

/* ---- aggregate ---- */

void emu_cmd_aggregate(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bson_iter_t it;
    const char *name;
    bson_t stages, cursor_opt, first_match;
    emu_pipeline_t *p;
    mc_error_t err;
    bson_t *views = NULL;
    const bson_t **ptrs = NULL;
    bson_t **results = NULL;
    size_t n_results = 0;
    emu_bytes_t out = {0};
    long batch = -1;
    char ns[400];
    matcher_t m;
    slots_t slots = {0};
    target_t t;
    bool has_at;
    uint32_t at[2];

    bson_iter_init(&it, cmd);
    bson_iter_next(&it);
    if (!BSON_ITER_HOLDS_UTF8(&it)) {
        emu_reply_error(reply, 73,
                        "mongo-emulator supports {aggregate: 1} only with "
                        "$changeStream");
        return;
    }
    name = emu_cmd_collection(cmd, reply);
    if (!name) {
        return;
    }
    if (!bson_iter_init_find(&it, cmd, "pipeline") || !BSON_ITER_HOLDS_ARRAY(&it)) {
        emu_reply_error(reply, 14, "'pipeline' option must be specified as an array");
        return;
    }
    view_iter_doc(&it, &stages);
    if (flag(cmd, "explain", false)) {
        emu_reply_error(reply, 20, "mongo-emulator does not support explain");
        return;
    }
    if (!view_field_doc(cmd, "cursor", &cursor_opt)) {
        emu_reply_error(reply, 9,
                        "The 'cursor' option is required, except for aggregate with the "
                        "explain argument");
        return;
    }
    if (bson_iter_init_find(&it, &cursor_opt, "batchSize") && BSON_ITER_HOLDS_NUMBER(&it)) {
        int64_t b = bson_iter_as_int64(&it);
        if (b < 0) {
            emu_reply_error(reply, 51024,
                            "BSON field 'batchSize' value must be >= 0, actual "
                            "value '%lld'",
                            (long long)b);
            return;
        }
        batch = (long)b;
    }
    p = emu_pipeline_new(&stages, false, &err);
    if (!p) {
        emu_reply_error_from(reply, &err);
        return;
    }
    if (!tgt_init_read(&t, conn, db, name, "aggregate", cmd, true, at, &has_at, reply)) {
        emu_pipeline_destroy(p);
        return;
    }
    /* A leading $match is applied here first, so that a selective pipeline over a large
     * collection does not need a view of every document. */
    bson_init(&first_match);
    {
        bson_iter_t st, first;
        bson_t q;
        if (bson_iter_init(&st, &stages) && bson_iter_next(&st) && BSON_ITER_HOLDS_DOCUMENT(&st) &&
            bson_iter_recurse(&st, &first) && bson_iter_next(&first) &&
            strcmp(bson_iter_key(&first), "$match") == 0 && view_iter_doc(&first, &q) &&
            BSON_ITER_HOLDS_DOCUMENT(&first)) {
            mc_filter_t *probe = mc_filter_new(&q, NULL, NULL);
            if (probe) {
                bson_concat(&first_match, &q);
            }
            mc_filter_destroy(probe);
        }
    }
    int rc = matcher_init(&m, &first_match, &err);
    if (rc == 0) {
        rc = tgt_collect(&t, &m, ALL_MATCHES, &slots, &err);
        matcher_cleanup(&m);
    }
    if (rc == 0 && slots.n) {
        /* bson_t asks for 128-byte alignment, which malloc does not give. */
        views = emu_zalloc_aligned(slots.n * sizeof(*views));
        ptrs = bson_malloc(slots.n * sizeof(*ptrs));
        for (size_t k = 0; k < slots.n; k++) {
            tgt_doc(&t, slots.v[k], &views[k]);
            ptrs[k] = &views[k];
        }
    }
    if (rc != 0 || emu_pipeline_run(p, ptrs, slots.n, &results, &n_results, &err)) {
        emu_reply_error_from(reply, &err);
    } else {
        bool ok = true;
        for (size_t k = 0; k < n_results; k++) {
            ok = ok && emu_bytes_append(&out, bson_get_data(results[k]), results[k]->len);
            bson_destroy(results[k]);
        }
        bson_free(results);
        if (!ok) {
            emu_bytes_free(&out);
            emu_reply_error(reply, 146, "aggregation result too large");
        } else {
            ns_of(ns, sizeof(ns), db, name);
            emu_cursor_reply_first_at(srv, ns, out.data, out.len, batch, false, has_at ? at : NULL,
                                      reply);
        }
    }
    bson_destroy(&first_match);
    free(views);
    bson_free(ptrs);
    bson_free(slots.v);
    emu_pipeline_destroy(p);
    tgt_cleanup(&t);
}
