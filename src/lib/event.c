/*
 * event.c: mc_event_t construction, reference counting and accessors.
 *
 * Built on a watcher thread from the change document libmongoc returned, before the next
 * mongoc_change_stream_next() call can overwrite it: one walk over the change's top-level keys
 * finds every field the engine and the sinks look at (operation type, namespace, token,
 * clusterTime, recipient), then the document is copied once into the event's single block,
 * so nothing parses BSON on the dispatch thread's hot path.
 *
 * Routing is decided here, from the write itself (mongocast/event.h): the recipient after the
 * write, the recipient before it when the event carries the previous version, and, when the
 * write moved the document from one owner to another, the reduced change a new owner gets
 * (built on the watcher thread, so the loop never copies BSON for it).
 *
 * Invariant: after construction (and mc__event_set_routing() on the watcher thread, before
 * the event is shared) nothing in the struct changes except the refcount, the render caches
 * (filled at most once by compare-and-swap) and the embedded queue item (owned by whoever
 * holds the event's queue reference); the last unref frees the whole block on whatever
 * thread drops it.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"
#include "summary.h"

/*
 * One event is one heap block: this struct (at a 128-byte boundary inside the block, because
 * libbson declares bson_t 128-byte aligned and the struct embeds three bson_t views), then
 * the copied change document, then the stream name, the reason and the recipient's identity
 * bytes and JSON text. op, db, coll and id point into the copied change: libbson strings are
 * NUL-terminated in place and the copy never changes. One block means one allocation on the
 * watcher thread and one cross-thread free on the dispatch thread per event, instead of a
 * dozen (each of which used to take the watcher's malloc arena lock).
 */
struct mc_event {
    void *block;               /* what malloc returned; ev lies inside it */
    atomic_uint refs;
    mc_event_kind_t kind;
    uint64_t seq;
    int stream_index;          /* see mc__event_set_stream_index() */
    bool has_doc_key;
    bool has_token;
    bool has_ct;
    bool recipient_configured; /* the stream has a recipient path */
    uint8_t post_state;        /* mc__rstate_t of the recipient */
    uint8_t prev_state;        /* mc__rstate_t of the previous recipient */
    bool entered;              /* a new owner gets the ENTERED view */
    bool left;                 /* the previous owner gets the LEFT view */
    uint32_t ct_t, ct_i;
    int64_t wall_ms;           /* INT64_MIN when absent */
    const char *stream;        /* in the block */
    const char *op;            /* operationType in the change; NULL for reset/ready/error */
    const char *db;            /* ns.db in the change, or NULL */
    const char *coll;          /* ns.coll in the change, or NULL */
    const char *id;            /* _id._data in the change */
    const uint8_t *rid;        /* recipient identity (block or routing_owned), or NULL */
    const uint8_t *pid;        /* previous recipient identity, or NULL */
    const char *rjson;         /* recipient as JSON text, or NULL */
    uint32_t rid_len, pid_len, rjson_len;
    void *routing_owned;       /* storage of mc__event_set_routing() */
    bson_t *entered_change;    /* the ENTERED view's change (owned), or NULL */
    char *summary_owned;       /* the FULL and ENTERED views' summaries, one block, or NULL */
    const char *summary;       /* FULL view's line (in summary_owned), or NULL */
    const char *summary_entered; /* ENTERED view's line, or NULL */
    uint32_t summary_len, summary_entered_len;
    const char *reason;        /* in the block */
    const char *error_code;    /* in the block; error events only */
    int server_code;           /* error events: MongoDB's code, or 0 */
    const bson_t *change;      /* &change_view, or NULL for reset/ready/error */
    /* Render caches: the text pointer is published by CAS; its length is stored before the
     * CAS by every renderer. Renderings of one event are byte-identical (pure functions of
     * immutable data), so racing renderers store the same length. */
    _Atomic(char *) json;
    _Atomic(char *) raw;
    _Atomic(char *) json_entered;
    _Atomic(char *) json_left;
    atomic_size_t json_len;
    atomic_size_t raw_len;
    atomic_size_t json_entered_len;
    atomic_size_t json_left_len;
    bson_t change_view;        /* static view of the change bytes that follow the struct */
    bson_t doc_key;            /* static view into the change */
    bson_t token;              /* static view into the change (_id) */
};

#define EVENT_ALIGN ((size_t)_Alignof(mc_event_t))

const char *mc_event_kind_name(mc_event_kind_t kind)
{
    switch (kind) {
    case MC_EVENT_CHANGE: return "change";
    case MC_EVENT_INVALIDATE: return "invalidate";
    case MC_EVENT_RESET: return "reset";
    case MC_EVENT_READY: return "ready";
    case MC_EVENT_ERROR: return "error";
    default: return "unknown";
    }
}

/* Allocates the block for an event with `extra` bytes after the struct and initialises the
 * fixed fields. The struct is placed at the first EVENT_ALIGN boundary of a plain malloc
 * block (cheaper than aligned_alloc, which takes glibc's slow path). */
static mc_event_t *event_alloc(mc_event_kind_t kind, uint64_t seq, size_t extra)
{
    if (extra > SIZE_MAX - sizeof(mc_event_t) - EVENT_ALIGN) {
        return NULL;
    }
    void *block = malloc(sizeof(mc_event_t) + EVENT_ALIGN - 1 + extra);
    if (!block) {
        return NULL;
    }
    uintptr_t at = ((uintptr_t)block + EVENT_ALIGN - 1) & ~(uintptr_t)(EVENT_ALIGN - 1);
    mc_event_t *ev = (mc_event_t *)at;
    memset(ev, 0, sizeof(*ev));
    ev->block = block;
    atomic_init(&ev->refs, 1);
    ev->kind = kind;
    ev->seq = seq;
    ev->stream_index = -1;
    ev->wall_ms = INT64_MIN;
    atomic_init(&ev->json, NULL);
    atomic_init(&ev->raw, NULL);
    atomic_init(&ev->json_entered, NULL);
    atomic_init(&ev->json_left, NULL);
    atomic_init(&ev->json_len, 0);
    atomic_init(&ev->raw_len, 0);
    atomic_init(&ev->json_entered_len, 0);
    atomic_init(&ev->json_left_len, 0);
    return ev;
}

/* Copies `s` (len bytes + NUL) to *tail and advances it; returns the copy. */
static const char *put_string(char **tail, const char *s, size_t len)
{
    char *out = *tail;
    memcpy(out, s, len);
    out[len] = '\0';
    *tail = out + len + 1;
    return out;
}

static void event_free(mc_event_t *ev)
{
    bson_free(atomic_load_explicit(&ev->json, memory_order_relaxed));
    bson_free(atomic_load_explicit(&ev->raw, memory_order_relaxed));
    bson_free(atomic_load_explicit(&ev->json_entered, memory_order_relaxed));
    bson_free(atomic_load_explicit(&ev->json_left, memory_order_relaxed));
    if (ev->entered_change) {
        bson_destroy(ev->entered_change);
    }
    free(ev->summary_owned);
    free(ev->routing_owned);
    free(ev->block);
}

/* What one walk over the change's top-level keys finds. Like bson_iter_init_find() and
 * bson_iter_find_descendant(), only the first occurrence of a key counts (a later duplicate
 * is ignored even when the first one has the wrong type). Pointers are into the caller's
 * change; they are moved into the event's copy afterwards. */
typedef struct scan {
    unsigned seen;                 /* SEEN_* bits */
    const uint8_t *id_doc;         /* _id document */
    uint32_t id_len;
    const char *op, *db, *coll;
    const uint8_t *doc_key;
    uint32_t doc_key_len;
    bool has_ct;
    uint32_t ct_t, ct_i;
    int64_t wall_ms;
    bson_iter_t full_doc;          /* first fullDocument, when SEEN_FULL_DOC */
    bson_iter_t before;            /* first fullDocumentBeforeChange, when SEEN_BEFORE */
} scan_t;

enum {
    SEEN_ID = 1u << 0,
    SEEN_OP = 1u << 1,
    SEEN_CT = 1u << 2,
    SEEN_WALL = 1u << 3,
    SEEN_NS = 1u << 4,
    SEEN_DOC_KEY = 1u << 5,
    SEEN_FULL_DOC = 1u << 6,
    SEEN_BEFORE = 1u << 7,
};

/* True the first time `bit` is claimed. */
static bool first(scan_t *sc, unsigned bit)
{
    if (sc->seen & bit) {
        return false;
    }
    sc->seen |= bit;
    return true;
}

static void scan_ns(scan_t *sc, const bson_iter_t *ns)
{
    bson_iter_t it;
    if (!(BSON_ITER_HOLDS_DOCUMENT(ns) || BSON_ITER_HOLDS_ARRAY(ns)) ||
        !bson_iter_recurse(ns, &it)) {
        return;
    }
    bool db_seen = false, coll_seen = false;
    while ((!db_seen || !coll_seen) && bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (!db_seen && strcmp(k, "db") == 0) {
            db_seen = true;
            if (BSON_ITER_HOLDS_UTF8(&it)) {
                sc->db = bson_iter_utf8(&it, NULL);
            }
        } else if (!coll_seen && strcmp(k, "coll") == 0) {
            coll_seen = true;
            if (BSON_ITER_HOLDS_UTF8(&it)) {
                sc->coll = bson_iter_utf8(&it, NULL);
            }
        }
    }
}

static void scan_change(scan_t *sc, bson_iter_t *it)
{
    while (bson_iter_next(it)) {
        const char *k = bson_iter_key(it);
        switch (k[0]) {
        case '_':
            if (strcmp(k, "_id") == 0 && first(sc, SEEN_ID) && BSON_ITER_HOLDS_DOCUMENT(it)) {
                bson_iter_document(it, &sc->id_len, &sc->id_doc);
            }
            break;
        case 'o':
            if (strcmp(k, "operationType") == 0 && first(sc, SEEN_OP) &&
                BSON_ITER_HOLDS_UTF8(it)) {
                sc->op = bson_iter_utf8(it, NULL);
            }
            break;
        case 'c':
            if (strcmp(k, "clusterTime") == 0 && first(sc, SEEN_CT) &&
                BSON_ITER_HOLDS_TIMESTAMP(it)) {
                bson_iter_timestamp(it, &sc->ct_t, &sc->ct_i);
                sc->has_ct = true;
            }
            break;
        case 'w':
            if (strcmp(k, "wallTime") == 0 && first(sc, SEEN_WALL) &&
                BSON_ITER_HOLDS_DATE_TIME(it)) {
                sc->wall_ms = bson_iter_date_time(it);
            }
            break;
        case 'n':
            if (strcmp(k, "ns") == 0 && first(sc, SEEN_NS)) {
                scan_ns(sc, it);
            }
            break;
        case 'd':
            if (strcmp(k, "documentKey") == 0 && first(sc, SEEN_DOC_KEY) &&
                BSON_ITER_HOLDS_DOCUMENT(it)) {
                bson_iter_document(it, &sc->doc_key_len, &sc->doc_key);
            }
            break;
        case 'f':
            if (strcmp(k, "fullDocument") == 0) {
                if (first(sc, SEEN_FULL_DOC)) {
                    sc->full_doc = *it;
                }
            } else if (strcmp(k, "fullDocumentBeforeChange") == 0) {
                if (first(sc, SEEN_BEFORE)) {
                    sc->before = *it;
                }
            }
            break;
        default:
            break;
        }
    }
}

/* ---- Routing ---------------------------------------------------------------------------- */

static bool op_is(const char *op, const char *name)
{
    return op && strcmp(op, name) == 0;
}

/* A version of the document (fullDocument, fullDocumentBeforeChange) is in the event when the
 * field holds a document; null (no post-image, a deleted document) means it is not. */
static bool version_present(const scan_t *sc, unsigned bit, const bson_iter_t *it)
{
    return (sc->seen & bit) && BSON_ITER_HOLDS_DOCUMENT(it);
}

static mc__vstate_t value_in(const bson_iter_t *version, const char *rest, bson_iter_t *found)
{
    bson_iter_t child;
    return bson_iter_recurse(version, &child) && bson_iter_find_descendant(&child, rest, found)
               ? MC__V_FOUND
               : MC__V_MISSING;
}

/* mc__recipient_values() on the scanned change, without walking its top level again for the
 * usual "fullDocument.<path>" recipients. */
static void scan_values(const scan_t *sc, const bson_t *change, const char *path,
                        bson_iter_t *post, mc__vstate_t *post_st, bson_iter_t *prev,
                        mc__vstate_t *prev_st)
{
    static const char prefix[] = "fullDocument.";
    *post_st = MC__V_MISSING;
    *prev_st = MC__V_ABSENT;
    if (!path || !*path) {
        return;
    }
    if (strncmp(path, prefix, sizeof(prefix) - 1) != 0) {
        bson_iter_t it;
        if (bson_iter_init(&it, change) && bson_iter_find_descendant(&it, path, post)) {
            *post_st = MC__V_FOUND;
        }
        return;
    }
    const char *rest = path + sizeof(prefix) - 1;
    if (!*rest) {
        return;
    }
    const char *op = sc->op;
    bool has_full = version_present(sc, SEEN_FULL_DOC, &sc->full_doc);
    bool has_before = version_present(sc, SEEN_BEFORE, &sc->before);
    if (op_is(op, "delete")) {
        /* A delete leaves no document: it belongs to whoever owned the last version. */
        *post_st = has_before ? value_in(&sc->before, rest, post) : MC__V_UNRESOLVED;
        return;
    }
    if (!has_full) {
        /* A write whose resulting document is not in the event (an update without a
         * post-image): reading it now would route by a later state, so nobody gets it. */
        bool writes = !op || op_is(op, "insert") || op_is(op, "update") || op_is(op, "replace");
        *post_st = writes ? MC__V_UNRESOLVED : MC__V_MISSING;
        return;
    }
    *post_st = value_in(&sc->full_doc, rest, post);
    if (has_before && (!op || op_is(op, "update") || op_is(op, "replace"))) {
        *prev_st = value_in(&sc->before, rest, prev);
    }
}

void mc__recipient_values(const bson_t *change, const char *path, bson_iter_t *post,
                          mc__vstate_t *post_st, bson_iter_t *prev, mc__vstate_t *prev_st)
{
    scan_t sc;
    memset(&sc, 0, sizeof(sc));
    bson_iter_t it;
    if (change && bson_iter_init(&it, change)) {
        scan_change(&sc, &it);
    }
    scan_values(&sc, change, path, post, post_st, prev, prev_st);
}

static mc__rstate_t rstate_of(mc__vstate_t st, const bson_iter_t *it, mc_identity_t *id)
{
    id->len = 0;
    switch (st) {
    case MC__V_FOUND: return mc_identity_from_iter(it, id) ? MC__R_KNOWN : MC__R_NONE;
    case MC__V_UNRESOLVED: return MC__R_UNRESOLVED;
    case MC__V_ABSENT: return MC__R_ABSENT;
    default: return MC__R_NONE;
    }
}

/* Which views beyond FULL the event has (see mc_event_view_for()). */
static void derive_views(const mc__routing_t *r, bool *entered, bool *left)
{
    bool same = r->post == MC__R_KNOWN && r->prev == MC__R_KNOWN &&
                mc_identity_equal(r->post_id.bytes, r->post_id.len, r->prev_id.bytes,
                                  r->prev_id.len);
    /* The new owner is entitled to the version this write made, not to the one before it
     * unless that was its own. */
    *entered = r->post == MC__R_KNOWN && r->prev != MC__R_ABSENT && !same;
    /* The old owner learns that the document left, unless who has it now is unknown (then it
     * may still be theirs, and saying anything would be a guess). */
    *left = r->prev == MC__R_KNOWN && r->post != MC__R_UNRESOLVED && !same;
}

/* Top-level fields of a change event that MongoDB itself defines and that describe only the
 * write or its result. Anything else (fullDocumentBeforeChange, fields a stream pipeline
 * added, which may be computed from the previous version) stays out of the ENTERED view. */
static bool entered_keeps(const char *k)
{
    static const char *const keep[] = {"_id",          "operationType", "clusterTime",
                                       "wallTime",     "ns",            "documentKey",
                                       "fullDocument", "txnNumber",     "lsid",
                                       "collectionUUID"};
    for (size_t i = 0; i < sizeof(keep) / sizeof(keep[0]); i++) {
        if (strcmp(k, keep[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* The change a new owner receives: MongoDB's own fields, updateDescription reduced to its
 * updatedFields (values this write set, i.e. part of the new version) with removedFields and
 * truncatedArrays emptied (they describe the previous version). First occurrence of a key
 * only, like the scan. */
static bson_t *build_entered_change(const bson_t *change)
{
    bson_t *out = bson_sized_new(change->len);
    bson_iter_t it;
    if (!bson_iter_init(&it, change)) {
        return out;
    }
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (bson_has_field(out, k)) {
            continue;
        }
        if (strcmp(k, "updateDescription") == 0) {
            bson_t ud, arr;
            bson_iter_t sub;
            bson_append_document_begin(out, k, -1, &ud);
            if (BSON_ITER_HOLDS_DOCUMENT(&it) && bson_iter_recurse(&it, &sub) &&
                bson_iter_find(&sub, "updatedFields")) {
                bson_append_iter(&ud, "updatedFields", -1, &sub);
            }
            bson_append_array_begin(&ud, "removedFields", -1, &arr);
            bson_append_array_end(&ud, &arr);
            bson_append_array_begin(&ud, "truncatedArrays", -1, &arr);
            bson_append_array_end(&ud, &arr);
            bson_append_document_end(out, &ud);
        } else if (entered_keeps(k)) {
            bson_append_iter(out, k, -1, &it);
        }
    }
    return out;
}

/* Bytes put_routing() stores. */
static size_t routing_bytes(const mc__routing_t *r, size_t rjson_len)
{
    size_t n = 0;
    if (r->post == MC__R_KNOWN) {
        n += r->post_id.len + rjson_len + 1;
    }
    if (r->prev == MC__R_KNOWN) {
        n += r->prev_id.len;
    }
    return n;
}

/* Stores the routing at *tail (routing_bytes() bytes) and derives the views; builds the
 * reduced change when a new owner gets one. ev->change_view must be set. */
static void put_routing(mc_event_t *ev, char **tail, const mc__routing_t *r, const char *rjson,
                        size_t rjson_len)
{
    ev->post_state = (uint8_t)r->post;
    ev->prev_state = (uint8_t)r->prev;
    ev->rid = ev->pid = NULL;
    ev->rjson = NULL;
    ev->rid_len = ev->pid_len = ev->rjson_len = 0;
    if (r->post == MC__R_KNOWN) {
        memcpy(*tail, r->post_id.bytes, r->post_id.len);
        ev->rid = (const uint8_t *)*tail;
        ev->rid_len = r->post_id.len;
        *tail += r->post_id.len;
        if (rjson_len) {
            ev->rjson = put_string(tail, rjson, rjson_len);
            ev->rjson_len = (uint32_t)rjson_len;
        } else {
            *tail += 1; /* counted by routing_bytes() */
        }
    }
    if (r->prev == MC__R_KNOWN) {
        memcpy(*tail, r->prev_id.bytes, r->prev_id.len);
        ev->pid = (const uint8_t *)*tail;
        ev->pid_len = r->prev_id.len;
        *tail += r->prev_id.len;
    }
    derive_views(r, &ev->entered, &ev->left);
    if (ev->entered_change) {
        bson_destroy(ev->entered_change);
        ev->entered_change = NULL;
    }
    if (ev->entered) {
        ev->entered_change = build_entered_change(&ev->change_view);
    }
}

int mc__event_set_routing(mc_event_t *ev, const mc__routing_t *r)
{
    char rjson[MC_IDENTITY_JSON_MAX];
    size_t rjson_len = 0;
    if (r->post == MC__R_KNOWN) {
        rjson_len = mc_identity_json(r->post_id.bytes, r->post_id.len, rjson);
    }
    size_t n = routing_bytes(r, rjson_len);
    char *mem = malloc(n ? n : 1);
    ev->recipient_configured = true;
    if (!mem) {
        mc__routing_t unresolved = {.post = MC__R_UNRESOLVED, .prev = MC__R_ABSENT};
        char *tail = NULL;
        put_routing(ev, &tail, &unresolved, NULL, 0);
        return MC_ENOMEM;
    }
    free(ev->routing_owned);
    ev->routing_owned = mem;
    char *tail = mem;
    put_routing(ev, &tail, r, rjson, rjson_len);
    return 0;
}

int mc__event_route_by_path(mc_event_t *ev, const char *path, mc__vstate_t *post_value)
{
    bson_iter_t post, prev;
    mc__vstate_t post_st, prev_st;
    mc__routing_t r;
    mc__recipient_values(ev->change, path, &post, &post_st, &prev, &prev_st);
    r.post = rstate_of(post_st, &post, &r.post_id);
    r.prev = rstate_of(prev_st, &prev, &r.prev_id);
    if (post_value) {
        *post_value = post_st;
    }
    return mc__event_set_routing(ev, &r);
}

static mc_event_t *einval(mc_error_t *err, const char *msg)
{
    mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "%s", msg);
    return NULL;
}

/* Builds a change or invalidate event in one block. */
static mc_event_t *event_from_change(mc_event_kind_t kind, const char *stream, uint64_t seq,
                                     const bson_t *change, const char *recipient_path,
                                     const char *reason, mc_error_t *err)
{
    bson_iter_t it;
    if (!bson_iter_init(&it, change)) {
        return einval(err, "change event is not a valid BSON document");
    }
    scan_t sc;
    memset(&sc, 0, sizeof(sc));
    sc.wall_ms = INT64_MIN;
    scan_change(&sc, &it);
    if (!sc.id_doc) {
        return einval(err, "change event has no resume token (_id document)");
    }
    bson_t token;
    if (!bson_init_static(&token, sc.id_doc, sc.id_len)) {
        return einval(err, "change event has a corrupt _id");
    }
    bson_iter_t tk;
    if (!bson_iter_init_find(&tk, &token, "_data") || !BSON_ITER_HOLDS_UTF8(&tk)) {
        return einval(err, "change event resume token has no string _data");
    }
    const char *id = bson_iter_utf8(&tk, NULL);

    /* Routing by path, decided now from the write; the identities and the recipient's text
     * go into the block. */
    mc__routing_t r;
    size_t rjson_len = 0;
    char rjson[MC_IDENTITY_JSON_MAX];
    if (recipient_path) {
        bson_iter_t post, prev;
        mc__vstate_t post_st, prev_st;
        scan_values(&sc, change, recipient_path, &post, &post_st, &prev, &prev_st);
        r.post = rstate_of(post_st, &post, &r.post_id);
        r.prev = rstate_of(prev_st, &prev, &r.prev_id);
        if (r.post == MC__R_KNOWN) {
            rjson_len = mc_identity_json(r.post_id.bytes, r.post_id.len, rjson);
        }
    } else {
        r.post = MC__R_NONE;
        r.prev = MC__R_ABSENT;
        r.post_id.len = r.prev_id.len = 0;
    }
    const uint8_t *data = bson_get_data(change);
    uint32_t len = change->len;
    size_t stream_len = strlen(stream);
    size_t reason_len = reason ? strlen(reason) : 0;
    size_t extra = (size_t)len + stream_len + 1 + (reason ? reason_len + 1 : 0) +
                   routing_bytes(&r, rjson_len);
    mc_event_t *ev = event_alloc(kind, seq, extra);
    if (!ev) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    uint8_t *copy = (uint8_t *)(ev + 1);
    memcpy(copy, data, len);
    char *tail = (char *)copy + len;
#define MOVED(p) ((p) ? (const char *)copy + ((const uint8_t *)(p) - data) : NULL)
    ev->stream = put_string(&tail, stream, stream_len);
    if (reason) {
        ev->reason = put_string(&tail, reason, reason_len);
    }
    ev->recipient_configured = recipient_path != NULL;
    /* The reduced change is built from the copy, which the event keeps. */
    bson_init_static(&ev->change_view, copy, len);
    put_routing(ev, &tail, &r, rjson, rjson_len);
    ev->op = MOVED(sc.op);
    ev->db = MOVED(sc.db);
    ev->coll = MOVED(sc.coll);
    ev->id = MOVED(id);
    ev->has_ct = sc.has_ct;
    ev->ct_t = sc.ct_t;
    ev->ct_i = sc.ct_i;
    ev->wall_ms = sc.wall_ms;
    /* The views cannot fail: the same bytes were accepted above, only their address moved. */
    ev->change = &ev->change_view;
    ev->has_token = bson_init_static(&ev->token, (const uint8_t *)MOVED(sc.id_doc), sc.id_len);
    if (sc.doc_key) {
        ev->has_doc_key = bson_init_static(&ev->doc_key, (const uint8_t *)MOVED(sc.doc_key),
                                           sc.doc_key_len);
    }
#undef MOVED
    return ev;
}

mc_event_t *mc_event_new_change(const char *stream, uint64_t seq, const bson_t *change,
                                const char *recipient_path, mc_error_t *err)
{
    if (!stream || !change) {
        return einval(err, "mc_event_new_change: stream and change are required");
    }
    return event_from_change(MC_EVENT_CHANGE, stream, seq, change, recipient_path, NULL, err);
}

mc_event_t *mc_event_new_invalidate(const char *stream, uint64_t seq, const bson_t *change,
                                    const char *reason, mc_error_t *err)
{
    if (!stream || !change) {
        return einval(err, "mc_event_new_invalidate: stream and change are required");
    }
    return event_from_change(MC_EVENT_INVALIDATE, stream, seq, change, NULL,
                             reason ? reason : "invalidate", err);
}

/* A control event: the stream name, an optional reason and an optional error code name,
 * all in the block. */
static mc_event_t *control_event(mc_event_kind_t kind, const char *stream, uint64_t seq,
                                 const char *reason, const char *code)
{
    size_t stream_len = strlen(stream);
    size_t reason_len = reason ? strlen(reason) : 0;
    size_t code_len = code ? strlen(code) : 0;
    mc_event_t *ev = event_alloc(
        kind, seq, stream_len + 1 + (reason ? reason_len + 1 : 0) + (code ? code_len + 1 : 0));
    if (!ev) {
        return NULL;
    }
    char *tail = (char *)(ev + 1);
    ev->stream = put_string(&tail, stream, stream_len);
    if (reason) {
        ev->reason = put_string(&tail, reason, reason_len);
    }
    if (code) {
        ev->error_code = put_string(&tail, code, code_len);
    }
    return ev;
}

mc_event_t *mc_event_new_control(mc_event_kind_t kind, const char *stream, uint64_t seq,
                                 const char *reason)
{
    if (!stream || (kind != MC_EVENT_RESET && kind != MC_EVENT_READY)) {
        return NULL;
    }
    if (kind == MC_EVENT_RESET && !reason) {
        reason = "reset";
    } else if (kind == MC_EVENT_READY) {
        reason = NULL;
    }
    return control_event(kind, stream, seq, reason, NULL);
}

mc_event_t *mc_event_new_error(const char *stream, uint64_t seq, const char *code, int server_code,
                               const char *reason)
{
    if (!stream) {
        return NULL;
    }
    mc_event_t *ev = control_event(MC_EVENT_ERROR, stream, seq, reason ? reason : "stream failed",
                                   code ? code : MC_EVENT_ERROR_FAILED);
    if (ev) {
        ev->server_code = server_code;
    }
    return ev;
}

mc_event_t *mc_event_ref(mc_event_t *ev)
{
    if (ev) {
        atomic_fetch_add_explicit(&ev->refs, 1, memory_order_relaxed);
    }
    return ev;
}

void mc_event_unref(mc_event_t **pev)
{
    if (!pev || !*pev) {
        return;
    }
    mc_event_t *ev = *pev;
    *pev = NULL;
    /* acq_rel: the thread that frees must see every write made before other threads let go
     * (the render caches in particular). */
    if (atomic_fetch_sub_explicit(&ev->refs, 1, memory_order_acq_rel) == 1) {
        event_free(ev);
    }
}

mc_event_kind_t mc_event_kind(const mc_event_t *ev)
{
    return ev->kind;
}

uint64_t mc_event_seq(const mc_event_t *ev)
{
    return ev->seq;
}

const char *mc_event_stream(const mc_event_t *ev)
{
    return ev->stream;
}

const char *mc_event_operation_type(const mc_event_t *ev)
{
    return ev->op;
}

const char *mc_event_db(const mc_event_t *ev)
{
    return ev->db;
}

const char *mc_event_coll(const mc_event_t *ev)
{
    return ev->coll;
}

const bson_t *mc_event_document_key(const mc_event_t *ev)
{
    return ev->has_doc_key ? &ev->doc_key : NULL;
}

const char *mc_event_id(const mc_event_t *ev)
{
    return ev->id;
}

const bson_t *mc_event_resume_token(const mc_event_t *ev)
{
    return ev->has_token ? &ev->token : NULL;
}

bool mc_event_cluster_time(const mc_event_t *ev, uint32_t *t, uint32_t *i)
{
    if (!ev->has_ct) {
        return false;
    }
    if (t) {
        *t = ev->ct_t;
    }
    if (i) {
        *i = ev->ct_i;
    }
    return true;
}

int64_t mc_event_wall_time_ms(const mc_event_t *ev)
{
    return ev->wall_ms;
}

const char *mc_event_recipient(const mc_event_t *ev)
{
    return ev->rjson;
}

const uint8_t *mc_event_recipient_identity(const mc_event_t *ev, size_t *len)
{
    if (len) {
        *len = ev->rid_len;
    }
    return ev->rid;
}

bool mc_event_recipient_unresolved(const mc_event_t *ev)
{
    return ev->recipient_configured && ev->post_state == MC__R_UNRESOLVED;
}

mc__rstate_t mc__event_recipient_state(const mc_event_t *ev)
{
    return (mc__rstate_t)ev->post_state;
}

const char *mc__event_recipient_json(const mc_event_t *ev, size_t *len)
{
    if (len) {
        *len = ev->rjson_len;
    }
    return ev->rjson;
}

mc_event_view_t mc_event_view_for(const mc_event_t *ev, const uint8_t *id, size_t id_len)
{
    if (ev->kind != MC_EVENT_CHANGE) {
        return MC_EVENT_VIEW_FULL;
    }
    if (mc_identity_equal(ev->rid, ev->rid_len, id, id_len)) {
        return ev->entered ? MC_EVENT_VIEW_ENTERED : MC_EVENT_VIEW_FULL;
    }
    if (ev->left && mc_identity_equal(ev->pid, ev->pid_len, id, id_len)) {
        return MC_EVENT_VIEW_LEFT;
    }
    return MC_EVENT_VIEW_NONE;
}

const bson_t *mc_event_change_view(const mc_event_t *ev, mc_event_view_t view)
{
    switch (view) {
    case MC_EVENT_VIEW_FULL: return ev->change;
    case MC_EVENT_VIEW_ENTERED: return ev->entered_change;
    default: return NULL;
    }
}

bool mc__event_recipient_configured(const mc_event_t *ev)
{
    return ev->recipient_configured;
}

const char *mc_event_reason(const mc_event_t *ev)
{
    return ev->reason;
}

const char *mc_event_error_code(const mc_event_t *ev)
{
    return ev->error_code;
}

int mc_event_server_code(const mc_event_t *ev)
{
    return ev->server_code;
}

const bson_t *mc_event_change(const mc_event_t *ev)
{
    return ev->change;
}

void mc__event_set_stream_index(mc_event_t *ev, int index)
{
    ev->stream_index = index;
}

int mc__event_stream_index(const mc_event_t *ev)
{
    return ev->stream_index;
}

/* First caller renders and publishes with a CAS; a racing loser frees its copy and uses the
 * winner's, so the cached text is immutable once visible. */
static const char *cached(_Atomic(char *) *slot, atomic_size_t *len_slot, const mc_event_t *ev,
                          char *(*render)(const mc_event_t *, size_t *), size_t *len)
{
    char *text = atomic_load_explicit(slot, memory_order_acquire);
    if (!text) {
        size_t n = 0;
        char *mine = render(ev, &n);
        if (!mine) {
            return NULL;
        }
        /* Every renderer stores the same length (see struct mc_event), before the CAS
         * publishes the text that readers pair it with. */
        atomic_store_explicit(len_slot, n, memory_order_relaxed);
        char *expected = NULL;
        if (atomic_compare_exchange_strong_explicit(slot, &expected, mine, memory_order_acq_rel,
                                                    memory_order_acquire)) {
            text = mine;
        } else {
            bson_free(mine);
            text = expected;
        }
    }
    if (len) {
        *len = atomic_load_explicit(len_slot, memory_order_relaxed);
    }
    return text;
}

const char *mc_event_json(mc_event_t *ev, size_t *len)
{
    return cached(&ev->json, &ev->json_len, ev, mc__event_render_json, len);
}

const char *mc_event_json_view(mc_event_t *ev, mc_event_view_t view, size_t *len)
{
    switch (view) {
    case MC_EVENT_VIEW_FULL: return mc_event_json(ev, len);
    case MC_EVENT_VIEW_ENTERED:
        return ev->entered_change ? cached(&ev->json_entered, &ev->json_entered_len, ev,
                                           mc__event_render_entered, len)
                                  : NULL;
    case MC_EVENT_VIEW_LEFT:
        return ev->left && ev->kind == MC_EVENT_CHANGE
                   ? cached(&ev->json_left, &ev->json_left_len, ev, mc__event_render_left, len)
                   : NULL;
    default: return NULL;
    }
}

const char *mc_event_raw_json(mc_event_t *ev, size_t *len)
{
    if (!ev->change) {
        return NULL;
    }
    return cached(&ev->raw, &ev->raw_len, ev, mc__event_render_raw, len);
}

int mc__event_set_summary(mc_event_t *ev, const mc__summary_t *sm)
{
    free(ev->summary_owned);
    ev->summary_owned = NULL;
    ev->summary = ev->summary_entered = NULL;
    ev->summary_len = ev->summary_entered_len = 0;
    if (!sm || ev->kind != MC_EVENT_CHANGE || !ev->change) {
        return 0;
    }
    /* Each view renders from the document it carries, so the ENTERED line never shows what
     * only the previous version had. */
    char full[MC__SUMMARY_MAX + 1], entered[MC__SUMMARY_MAX + 1];
    int nf = mc__summary_render(sm, ev->change, full, sizeof(full));
    int ne = ev->entered_change
                 ? mc__summary_render(sm, ev->entered_change, entered, sizeof(entered))
                 : -1;
    if (nf < 0 && ne < 0) {
        return 0;
    }
    char *mem = malloc((nf < 0 ? 0 : (size_t)nf + 1) + (ne < 0 ? 0 : (size_t)ne + 1));
    if (!mem) {
        return MC_ENOMEM;
    }
    ev->summary_owned = mem;
    char *tail = mem;
    if (nf >= 0) {
        ev->summary = put_string(&tail, full, (size_t)nf);
        ev->summary_len = (uint32_t)nf;
    }
    if (ne >= 0) {
        ev->summary_entered = put_string(&tail, entered, (size_t)ne);
        ev->summary_entered_len = (uint32_t)ne;
    }
    return 0;
}

const char *mc__event_summary(const mc_event_t *ev, mc_event_view_t view, size_t *len)
{
    const char *s = NULL;
    size_t n = 0;
    if (view == MC_EVENT_VIEW_FULL) {
        s = ev->summary;
        n = ev->summary_len;
    } else if (view == MC_EVENT_VIEW_ENTERED) {
        s = ev->summary_entered;
        n = ev->summary_entered_len;
    }
    if (len) {
        *len = n;
    }
    return s;
}
