/*
 * event.c: mc_event_t construction, reference counting and accessors.
 *
 * Built on a watcher thread from the change document libmongoc returned, before the next
 * mongoc_change_stream_next() call can overwrite it: one walk over the change's top-level keys
 * finds every field the engine and the sinks look at (operation type, namespace, token,
 * clusterTime, recipient), then the document is copied once into the event's single block,
 * so nothing parses BSON on the dispatch thread's hot path. Invariant: after construction
 * nothing in the struct changes except the refcount, the two render caches (filled at most
 * once by compare-and-swap) and the embedded queue item (owned by whoever holds the event's
 * queue reference); the last unref frees the whole block on whatever thread drops it.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

/*
 * One event is one heap block: this struct (at a 128-byte boundary inside the block, because
 * libbson declares bson_t 128-byte aligned and the struct embeds three bson_t views), then
 * the copied change document, then the stream name, the reason and a formatted recipient.
 * op, db, coll, id and a string recipient point into the copied change: libbson strings are
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
    uint32_t ct_t, ct_i;
    int64_t wall_ms;           /* INT64_MIN when absent */
    const char *stream;        /* in the block */
    const char *op;            /* operationType in the change; NULL for reset/ready/error */
    const char *db;            /* ns.db in the change, or NULL */
    const char *coll;          /* ns.coll in the change, or NULL */
    const char *id;            /* _id._data in the change */
    const char *recipient;     /* in the change, in the block, recipient_owned or NULL */
    char *recipient_owned;     /* bson_malloc'ed by mc__event_set_recipient_take() */
    const char *reason;        /* in the block */
    const char *error_code;    /* in the block; error events only */
    int server_code;           /* error events: MongoDB's code, or 0 */
    const bson_t *change;      /* &change_view, or NULL for reset/ready/error */
    /* Render caches: the text pointer is published by CAS; its length is stored before the
     * CAS by every renderer. Renderings of one event are byte-identical (pure functions of
     * immutable data), so racing renderers store the same length. */
    _Atomic(char *) json;
    _Atomic(char *) raw;
    atomic_size_t json_len;
    atomic_size_t raw_len;
    mc__item_t item;           /* the queue item that carries this event (engine.c) */
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
    atomic_init(&ev->json_len, 0);
    atomic_init(&ev->raw_len, 0);
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
    bson_free(ev->recipient_owned);
    free(ev->block);
}

/* Formats a recipient value. A string is returned in place (it points into the document,
 * where it is NUL-terminated); the other scalars are printed into buf. NULL when the type
 * cannot be a recipient. */
static const char *format_scalar(const bson_iter_t *it, char buf[64])
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_UTF8:
        return bson_iter_utf8(it, NULL);
    case BSON_TYPE_INT32:
        bson_snprintf(buf, 64, "%d", bson_iter_int32(it));
        return buf;
    case BSON_TYPE_INT64:
        bson_snprintf(buf, 64, "%" PRId64, bson_iter_int64(it));
        return buf;
    case BSON_TYPE_DOUBLE: {
        double d = bson_iter_double(it);
        if (!isfinite(d)) {
            return NULL;
        }
        /* Owner ids stored as doubles (JavaScript clients) should match their integer
         * spelling in a JWT claim, so integral values print without a fraction. */
        if (d == floor(d) && fabs(d) < 9007199254740992.0) {
            bson_snprintf(buf, 64, "%" PRId64, (int64_t)d);
        } else {
            bson_snprintf(buf, 64, "%.17g", d);
        }
        return buf;
    }
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        bson_iter_decimal128(it, &dec);
        _Static_assert(BSON_DECIMAL128_STRING <= 64, "decimal128 string fits the buffer");
        bson_decimal128_to_string(&dec, buf);
        return buf;
    }
    case BSON_TYPE_OID:
        bson_oid_to_string(bson_iter_oid(it), buf);
        return buf;
    default:
        return NULL;
    }
}

static bool field_present(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, doc, key) && !BSON_ITER_HOLDS_NULL(&it) &&
           !BSON_ITER_HOLDS_UNDEFINED(&it);
}

static bool iter_present(const bson_iter_t *it)
{
    return !BSON_ITER_HOLDS_NULL(it) && !BSON_ITER_HOLDS_UNDEFINED(it);
}

bool mc__recipient_find(const bson_t *change, const char *path, bson_iter_t *found)
{
    if (!change || !path || !*path) {
        return false;
    }
    static const char prefix[] = "fullDocument.";
    char *alt = NULL;
    const char *use = path;
    /* Deletes carry no fullDocument: the owner is only known from the pre-image. */
    if (strncmp(path, prefix, sizeof(prefix) - 1) == 0 && !field_present(change, "fullDocument")) {
        alt = bson_strdup_printf("fullDocumentBeforeChange.%s", path + sizeof(prefix) - 1);
        use = alt;
    }
    bson_iter_t it;
    bool ok = bson_iter_init(&it, change) && bson_iter_find_descendant(&it, use, found);
    bson_free(alt);
    return ok;
}

char *mc__recipient_resolve(const bson_t *change, const char *path)
{
    bson_iter_t found;
    char buf[64];
    const char *v = NULL;
    if (mc__recipient_find(change, path, &found)) {
        v = format_scalar(&found, buf);
    }
    return v ? bson_strdup(v) : NULL;
}

void mc__event_set_recipient_take(mc_event_t *ev, char *recipient)
{
    bson_free(ev->recipient_owned);
    ev->recipient_owned = recipient;
    ev->recipient = recipient;
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

/* mc__recipient_find() on the scanned change, without walking its top level again for the
 * usual "fullDocument.<path>" recipients. */
static bool scan_recipient(const scan_t *sc, const bson_t *change, const char *path,
                           bson_iter_t *found)
{
    static const char prefix[] = "fullDocument.";
    if (!*path) {
        return false;
    }
    if (strncmp(path, prefix, sizeof(prefix) - 1) != 0) {
        bson_iter_t it;
        return bson_iter_init(&it, change) && bson_iter_find_descendant(&it, path, found);
    }
    /* Deletes carry no fullDocument: the owner is only known from the pre-image. */
    const bson_iter_t *top = NULL;
    if ((sc->seen & SEEN_FULL_DOC) && iter_present(&sc->full_doc)) {
        top = &sc->full_doc;
    } else if (sc->seen & SEEN_BEFORE) {
        top = &sc->before;
    }
    bson_iter_t child;
    return top && (BSON_ITER_HOLDS_DOCUMENT(top) || BSON_ITER_HOLDS_ARRAY(top)) &&
           bson_iter_recurse(top, &child) &&
           bson_iter_find_descendant(&child, path + sizeof(prefix) - 1, found);
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

    /* The recipient: a string stays in the change; anything else is printed to rbuf and
     * copied into the block. */
    char rbuf[64];
    const char *rec = NULL;
    bson_iter_t found;
    if (recipient_path && scan_recipient(&sc, change, recipient_path, &found)) {
        rec = format_scalar(&found, rbuf);
    }
    const uint8_t *data = bson_get_data(change);
    uint32_t len = change->len;
    size_t stream_len = strlen(stream);
    size_t reason_len = reason ? strlen(reason) : 0;
    size_t rec_len = rec == rbuf ? strlen(rbuf) : 0;
    size_t extra = (size_t)len + stream_len + 1 + (reason ? reason_len + 1 : 0) +
                   (rec == rbuf ? rec_len + 1 : 0);
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
    if (rec == rbuf) {
        ev->recipient = put_string(&tail, rbuf, rec_len);
    } else {
        ev->recipient = MOVED(rec);
    }
    ev->recipient_configured = recipient_path != NULL;
    ev->op = MOVED(sc.op);
    ev->db = MOVED(sc.db);
    ev->coll = MOVED(sc.coll);
    ev->id = MOVED(id);
    ev->has_ct = sc.has_ct;
    ev->ct_t = sc.ct_t;
    ev->ct_i = sc.ct_i;
    ev->wall_ms = sc.wall_ms;
    /* The views cannot fail: the same bytes were accepted above, only their address moved. */
    bson_init_static(&ev->change_view, copy, len);
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
    return ev->recipient;
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

const char *mc_event_raw_json(mc_event_t *ev, size_t *len)
{
    if (!ev->change) {
        return NULL;
    }
    return cached(&ev->raw, &ev->raw_len, ev, mc__event_render_raw, len);
}

mc__item_t *mc__event_item(mc_event_t *ev)
{
    return &ev->item;
}
