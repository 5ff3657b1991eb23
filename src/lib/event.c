/*
 * event.c: mc_event_t construction, reference counting and accessors.
 *
 * Built on a watcher thread from the change document libmongoc returned, before the next
 * mongoc_change_stream_next() call can overwrite it: the document is copied once and every
 * field the engine and the sinks look at (operation type, namespace, token, clusterTime,
 * recipient) is extracted then, so nothing parses BSON on the dispatch thread's hot path.
 * Invariant: after construction nothing in the struct changes except the refcount and the
 * two render caches, which are filled at most once by compare-and-swap.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

typedef struct rendered {
    size_t len;
    char *text; /* bson_malloc'ed */
} rendered_t;

struct mc_event {
    atomic_uint refs;
    mc_event_kind_t kind;
    uint64_t seq;
    int stream_index;          /* see mc__event_set_stream_index() */
    char *stream;
    char *op;                  /* operationType, NULL for reset/ready */
    char *db;                  /* ns.db or NULL */
    char *coll;                /* ns.coll or NULL */
    bson_t *change;            /* owned copy; NULL for reset/ready */
    bson_t doc_key;            /* static view into change */
    bool has_doc_key;
    bson_t token;              /* static view into change (_id) */
    bool has_token;
    char *id;                  /* _id._data */
    bool has_ct;
    uint32_t ct_t, ct_i;
    int64_t wall_ms;           /* INT64_MIN when absent */
    char *recipient;
    bool recipient_configured; /* the stream has a recipient path */
    char *reason;
    _Atomic(rendered_t *) json;
    _Atomic(rendered_t *) raw;
};

const char *mc_event_kind_name(mc_event_kind_t kind)
{
    switch (kind) {
    case MC_EVENT_CHANGE: return "change";
    case MC_EVENT_INVALIDATE: return "invalidate";
    case MC_EVENT_RESET: return "reset";
    case MC_EVENT_READY: return "ready";
    default: return "unknown";
    }
}

static mc_event_t *event_alloc(mc_event_kind_t kind, const char *stream, uint64_t seq)
{
    mc_event_t *ev = calloc(1, sizeof(*ev));
    if (!ev) {
        return NULL;
    }
    atomic_init(&ev->refs, 1);
    ev->kind = kind;
    ev->seq = seq;
    ev->stream_index = -1;
    ev->wall_ms = INT64_MIN;
    ev->stream = bson_strdup(stream);
    atomic_init(&ev->json, NULL);
    atomic_init(&ev->raw, NULL);
    return ev;
}

static void event_free(mc_event_t *ev)
{
    rendered_t *r = atomic_load(&ev->json);
    if (r) {
        bson_free(r->text);
        free(r);
    }
    r = atomic_load(&ev->raw);
    if (r) {
        bson_free(r->text);
        free(r);
    }
    bson_free(ev->stream);
    bson_free(ev->op);
    bson_free(ev->db);
    bson_free(ev->coll);
    bson_free(ev->id);
    bson_free(ev->recipient);
    bson_free(ev->reason);
    bson_destroy(ev->change);
    free(ev);
}

static int render_scalar(const bson_iter_t *it, char **out)
{
    char buf[64];
    switch (bson_iter_type(it)) {
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *s = bson_iter_utf8(it, &len);
        *out = bson_strndup(s, len);
        return 0;
    }
    case BSON_TYPE_INT32:
        bson_snprintf(buf, sizeof(buf), "%d", bson_iter_int32(it));
        break;
    case BSON_TYPE_INT64:
        bson_snprintf(buf, sizeof(buf), "%" PRId64, bson_iter_int64(it));
        break;
    case BSON_TYPE_DOUBLE: {
        double d = bson_iter_double(it);
        if (!isfinite(d)) {
            return -1;
        }
        /* Owner ids stored as doubles (JavaScript clients) should match their integer
         * spelling in a JWT claim, so integral values print without a fraction. */
        if (d == floor(d) && fabs(d) < 9007199254740992.0) {
            bson_snprintf(buf, sizeof(buf), "%" PRId64, (int64_t)d);
        } else {
            bson_snprintf(buf, sizeof(buf), "%.17g", d);
        }
        break;
    }
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        bson_iter_decimal128(it, &dec);
        char dbuf[BSON_DECIMAL128_STRING];
        bson_decimal128_to_string(&dec, dbuf);
        *out = bson_strdup(dbuf);
        return 0;
    }
    case BSON_TYPE_OID:
        bson_oid_to_string(bson_iter_oid(it), buf);
        break;
    default:
        return -1;
    }
    *out = bson_strdup(buf);
    return 0;
}

static bool field_present(const bson_t *doc, const char *key)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, doc, key) && !BSON_ITER_HOLDS_NULL(&it) &&
           !BSON_ITER_HOLDS_UNDEFINED(&it);
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
    char *out = NULL;
    if (mc__recipient_find(change, path, &found) && render_scalar(&found, &out) != 0) {
        out = NULL;
    }
    return out;
}

void mc__event_set_recipient_take(mc_event_t *ev, char *recipient)
{
    bson_free(ev->recipient);
    ev->recipient = recipient;
}

static int fill_from_change(mc_event_t *ev, const bson_t *change, mc_error_t *err)
{
    bson_iter_t it;
    const uint8_t *data;
    uint32_t len;

    ev->change = bson_copy(change);
    if (!ev->change) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "change event is not a valid BSON document");
    }
    if (!bson_iter_init_find(&it, ev->change, "_id") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "change event has no resume token (_id document)");
    }
    bson_iter_document(&it, &len, &data);
    if (!bson_init_static(&ev->token, data, len)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "change event has a corrupt _id");
    }
    ev->has_token = true;
    bson_iter_t tk;
    if (!bson_iter_init_find(&tk, &ev->token, "_data") || !BSON_ITER_HOLDS_UTF8(&tk)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "change event resume token has no string _data");
    }
    ev->id = bson_strdup(bson_iter_utf8(&tk, NULL));

    /* A user $project may drop operationType; the event is still deliverable. */
    if (bson_iter_init_find(&it, ev->change, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
        ev->op = bson_strdup(bson_iter_utf8(&it, NULL));
    }

    if (bson_iter_init_find(&it, ev->change, "clusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        bson_iter_timestamp(&it, &ev->ct_t, &ev->ct_i);
        ev->has_ct = true;
    }
    if (bson_iter_init_find(&it, ev->change, "wallTime") && BSON_ITER_HOLDS_DATE_TIME(&it)) {
        ev->wall_ms = bson_iter_date_time(&it);
    }
    bson_iter_t ns;
    if (bson_iter_init(&it, ev->change) && bson_iter_find_descendant(&it, "ns.db", &ns) &&
        BSON_ITER_HOLDS_UTF8(&ns)) {
        ev->db = bson_strdup(bson_iter_utf8(&ns, NULL));
    }
    if (bson_iter_init(&it, ev->change) && bson_iter_find_descendant(&it, "ns.coll", &ns) &&
        BSON_ITER_HOLDS_UTF8(&ns)) {
        ev->coll = bson_strdup(bson_iter_utf8(&ns, NULL));
    }
    if (bson_iter_init_find(&it, ev->change, "documentKey") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_document(&it, &len, &data);
        ev->has_doc_key = bson_init_static(&ev->doc_key, data, len);
    }
    return 0;
}

mc_event_t *mc_event_new_change(const char *stream, uint64_t seq, const bson_t *change,
                                const char *recipient_path, mc_error_t *err)
{
    if (!stream || !change) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "mc_event_new_change: stream and change are required");
        return NULL;
    }
    mc_event_t *ev = event_alloc(MC_EVENT_CHANGE, stream, seq);
    if (!ev) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    if (fill_from_change(ev, change, err) != 0) {
        event_free(ev);
        return NULL;
    }
    if (recipient_path) {
        ev->recipient_configured = true;
        ev->recipient = mc__recipient_resolve(ev->change, recipient_path);
    }
    return ev;
}

mc_event_t *mc_event_new_invalidate(const char *stream, uint64_t seq, const bson_t *change,
                                    const char *reason, mc_error_t *err)
{
    if (!stream || !change) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "mc_event_new_invalidate: stream and change are required");
        return NULL;
    }
    mc_event_t *ev = event_alloc(MC_EVENT_INVALIDATE, stream, seq);
    if (!ev) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    if (fill_from_change(ev, change, err) != 0) {
        event_free(ev);
        return NULL;
    }
    ev->reason = bson_strdup(reason ? reason : "invalidate");
    return ev;
}

mc_event_t *mc_event_new_control(mc_event_kind_t kind, const char *stream, uint64_t seq,
                                 const char *reason)
{
    if (!stream || (kind != MC_EVENT_RESET && kind != MC_EVENT_READY)) {
        return NULL;
    }
    mc_event_t *ev = event_alloc(kind, stream, seq);
    if (ev && kind == MC_EVENT_RESET) {
        ev->reason = bson_strdup(reason ? reason : "reset");
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
static const char *cached(_Atomic(rendered_t *) *slot, const mc_event_t *ev,
                          char *(*render)(const mc_event_t *, size_t *), size_t *len)
{
    rendered_t *r = atomic_load_explicit(slot, memory_order_acquire);
    if (!r) {
        rendered_t *mine = calloc(1, sizeof(*mine));
        if (!mine) {
            return NULL;
        }
        mine->text = render(ev, &mine->len);
        if (!mine->text) {
            free(mine);
            return NULL;
        }
        rendered_t *expected = NULL;
        if (atomic_compare_exchange_strong_explicit(slot, &expected, mine, memory_order_acq_rel,
                                                    memory_order_acquire)) {
            r = mine;
        } else {
            bson_free(mine->text);
            free(mine);
            r = expected;
        }
    }
    if (len) {
        *len = r->len;
    }
    return r->text;
}

const char *mc_event_json(mc_event_t *ev, size_t *len)
{
    return cached(&ev->json, ev, mc__event_render_json, len);
}

const char *mc_event_raw_json(mc_event_t *ev, size_t *len)
{
    if (!ev->change) {
        return NULL;
    }
    return cached(&ev->raw, ev, mc__event_render_raw, len);
}
