/*
 * view.c: collections as of a cluster time (view.h), built from the live catalog, the version
 * history and a transaction's own writes.
 *
 * Runs on connection threads with srv->lock held. Building a view of a collection with n live
 * documents and k documents changed since the view's time costs O(n + k log k + h), h being the
 * history records after that time; a lookup by _id costs O(h). Invariant: every document of the
 * view appears once: a document changed since the view's time is shown in its older version (or
 * not at all) and a document of the transaction in its newest version, never both.
 *
 * Differences from MongoDB 6.0: a collection dropped after the view's time reads as empty (as
 * on 6.0; 7.0's point-in-time catalog would still show it); index definitions are not versioned
 * (the emulator scans, so only unique-index checks could tell).
 */
#include "view.h"

#include "core.h"
#include "history.h"
#include "txn.h"

#include <stdlib.h>
#include <string.h>

/* One _id whose version in the view is not the live one. */
typedef struct override {
    const uint8_t *key;
    uint32_t key_len;
    uint64_t hash;
    const uint8_t *id_doc; /* {_id: v}, to find the live slot */
    uint32_t id_doc_len;
    const uint8_t *doc; /* the version in the view; NULL: none */
    uint32_t doc_len;
    long slot;    /* live slot it replaces, or -1 */
    uint32_t seq; /* orders the ones that replace no live slot: restored, then inserted */
} override_t;

/* An open-addressing set of overrides keyed by _id key. */
typedef struct omap {
    override_t *v;
    size_t n;
    size_t cap; /* power of two */
} omap_t;

static int ts_cmp(uint32_t at, uint32_t ai, uint32_t bt, uint32_t bi)
{
    if (at != bt) {
        return at < bt ? -1 : 1;
    }
    return ai < bi ? -1 : (ai > bi ? 1 : 0);
}

static bool omap_grow(omap_t *m)
{
    size_t cap = m->cap ? m->cap * 2 : 64;
    override_t *v = calloc(cap, sizeof *v);
    if (!v) {
        return false;
    }
    for (size_t k = 0; k < m->cap; k++) {
        if (m->v[k].key) {
            size_t p = m->v[k].hash & (cap - 1);
            while (v[p].key) {
                p = (p + 1) & (cap - 1);
            }
            v[p] = m->v[k];
        }
    }
    free(m->v);
    m->v = v;
    m->cap = cap;
    return true;
}

/* The entry for `key`: existing (*fresh false) or new and zeroed but for the key (*fresh true).
 * NULL when memory runs out. */
static override_t *omap_slot(omap_t *m, const uint8_t *key, uint32_t len, uint64_t hash,
                             bool *fresh)
{
    if ((m->n + 1) * 2 > m->cap && !omap_grow(m)) {
        return NULL;
    }
    size_t p = hash & (m->cap - 1);
    while (m->v[p].key) {
        if (m->v[p].hash == hash && m->v[p].key_len == len && memcmp(m->v[p].key, key, len) == 0) {
            *fresh = false;
            return &m->v[p];
        }
        p = (p + 1) & (m->cap - 1);
    }
    memset(&m->v[p], 0, sizeof m->v[p]);
    m->v[p].key = key;
    m->v[p].key_len = len;
    m->v[p].hash = hash;
    m->v[p].slot = -1;
    m->n++;
    *fresh = true;
    return &m->v[p];
}

static bool view_push(emu_view_t *v, const uint8_t *data, uint32_t len)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        emu_vdoc_t *d = realloc(v->docs, cap * sizeof *d);
        if (!d) {
            return false;
        }
        v->docs = d;
        v->cap = cap;
    }
    v->docs[v->n].data = data;
    v->docs[v->n].len = len;
    v->n++;
    return true;
}

void emu_view_free(emu_view_t *v)
{
    if (v) {
        free(v->docs);
        memset(v, 0, sizeof *v);
    }
}

static int check_visible(emu_server_t *srv, const emu_coll_t *c, uint32_t t, uint32_t i,
                         mc_error_t *err)
{
    if (c && ts_cmp(t, i, c->min_t, c->min_i) < 0) {
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, 246,
                            "Unable to read from a snapshot due to pending collection catalog "
                            "changes; please retry the operation. Snapshot timestamp is "
                            "Timestamp(%u, %u). Collection minimum is Timestamp(%u, %u)",
                            t, i, c->min_t, c->min_i);
    }
    return emu_history_check_readable(srv, t, i, err);
}

typedef struct own_ctx {
    omap_t *m;
    uint32_t count;
    bool oom;
} own_ctx_t;

/* The transaction's version wins over anything the history says. */
static void add_own(void *ctx, const uint8_t *key, size_t key_len, uint64_t hash,
                    const bson_t *id_doc, const bson_t *doc)
{
    own_ctx_t *o = ctx;
    bool fresh;
    override_t *e = omap_slot(o->m, key, (uint32_t)key_len, hash, &fresh);
    if (!e) {
        o->oom = true;
        return;
    }
    /* The transaction lists its documents newest first: the oldest gets the smallest seq. */
    e->seq = UINT32_MAX - o->count++;
    e->id_doc = bson_get_data(id_doc);
    e->id_doc_len = id_doc->len;
    e->doc = doc ? bson_get_data(doc) : NULL;
    e->doc_len = doc ? doc->len : 0;
}

static int cmp_slot(const void *a, const void *b)
{
    const override_t *x = *(const override_t *const *)a;
    const override_t *y = *(const override_t *const *)b;
    if (x->slot != y->slot) {
        return x->slot < y->slot ? -1 : 1;
    }
    return x->seq < y->seq ? -1 : (x->seq > y->seq ? 1 : 0);
}

static long live_slot(const emu_coll_t *c, const uint8_t *id_doc, uint32_t len)
{
    bson_t d;
    bson_iter_t it;
    if (!c || !bson_init_static(&d, id_doc, len) || !bson_iter_init_find(&it, &d, "_id")) {
        return -1;
    }
    return emu_coll_find_id(c, bson_iter_value(&it));
}

static int oom(mc_error_t *err)
{
    return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "out of memory building a view");
}

int emu_view_build(emu_server_t *srv, const char *db, const char *coll, uint32_t t, uint32_t i,
                   const emu_txn_t *txn, emu_view_t *out, mc_error_t *err)
{
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    omap_t m = {0};
    override_t **order = NULL;
    size_t n_order = 0;
    int rc = 0;

    memset(out, 0, sizeof *out);
    rc = check_visible(srv, c, t, i, err);
    if (rc != 0) {
        return rc;
    }
    if (txn) {
        own_ctx_t o = {&m, 0, false};
        emu_txn_each_own(txn, db, coll, add_own, &o);
        if (o.oom) {
            rc = oom(err);
            goto done;
        }
    }
    if (c) {
        /* The oldest record after t of each _id holds its version at t. */
        size_t end = emu_history_end(srv);
        for (size_t k = emu_history_first_after(srv, t, i); k < end; k++) {
            const emu_hist_rec_t *r = emu_history_at(srv, k);
            if (memcmp(r->uuid, c->uuid, 16) != 0) {
                continue;
            }
            bool fresh;
            override_t *e = omap_slot(&m, r->key, r->key_len, r->hash, &fresh);
            if (!e) {
                rc = oom(err);
                goto done;
            }
            if (fresh) {
                e->seq = (uint32_t)(k & 0x7fffffff);
                e->id_doc = r->id_doc;
                e->id_doc_len = r->id_doc_len;
                e->doc = r->before;
                e->doc_len = r->before_len;
            }
        }
    }
    if (m.n > 0) {
        order = malloc(m.n * sizeof *order);
        if (!order) {
            rc = oom(err);
            goto done;
        }
        for (size_t k = 0; k < m.cap; k++) {
            if (m.v[k].key) {
                m.v[k].slot = live_slot(c, m.v[k].id_doc, m.v[k].id_doc_len);
                order[n_order++] = &m.v[k];
            }
        }
        qsort(order, n_order, sizeof *order, cmp_slot);
    }
    /* Live documents in natural order, each replaced by its version in the view... */
    size_t next = 0;
    while (next < n_order && order[next]->slot < 0) {
        next++;
    }
    size_t first_live = next;
    if (c) {
        for (size_t s = 0; s < c->n_slots; s++) {
            if (next < n_order && order[next]->slot == (long)s) {
                override_t *e = order[next++];
                if (e->doc && !view_push(out, e->doc, e->doc_len)) {
                    rc = oom(err);
                    goto done;
                }
                continue;
            }
            if (c->docs[s].data && !view_push(out, c->docs[s].data, c->docs[s].len)) {
                rc = oom(err);
                goto done;
            }
        }
    }
    /* ...then the versions of documents that are not live any more (or not yet). */
    for (size_t k = 0; k < first_live; k++) {
        if (order[k]->doc && !view_push(out, order[k]->doc, order[k]->doc_len)) {
            rc = oom(err);
            goto done;
        }
    }
done:
    free(order);
    free(m.v);
    if (rc != 0) {
        emu_view_free(out);
    }
    return rc;
}

/* The oldest history record of (uuid, key) after (t, i), or NULL. */
static const emu_hist_rec_t *first_change_after(emu_server_t *srv, const uint8_t uuid[16],
                                                const uint8_t *key, size_t key_len, uint64_t hash,
                                                uint32_t t, uint32_t i)
{
    size_t end = emu_history_end(srv);
    for (size_t k = emu_history_first_after(srv, t, i); k < end; k++) {
        const emu_hist_rec_t *r = emu_history_at(srv, k);
        if (r->hash == hash && r->key_len == key_len && memcmp(r->key, key, key_len) == 0 &&
            memcmp(r->uuid, uuid, 16) == 0) {
            return r;
        }
    }
    return NULL;
}

bool emu_view_changed_since(emu_server_t *srv, const uint8_t uuid[16], const uint8_t *key,
                            size_t key_len, uint64_t hash, uint32_t t, uint32_t i)
{
    return first_change_after(srv, uuid, key, key_len, hash, t, i) != NULL;
}

int emu_view_find_id(emu_server_t *srv, const char *db, const char *coll, uint32_t t, uint32_t i,
                     const emu_txn_t *txn, const bson_value_t *id, emu_vdoc_t *out, bool *found,
                     mc_error_t *err)
{
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    emu_kbuf_t key;
    bson_t idd = BSON_INITIALIZER;
    int rc;

    *found = false;
    rc = check_visible(srv, c, t, i, err);
    if (rc != 0) {
        bson_destroy(&idd);
        return rc;
    }
    bson_append_value(&idd, "_id", 3, id);
    emu_kbuf_init(&key);
    if (!emu_id_key(&idd, &key)) {
        bson_destroy(&idd);
        emu_kbuf_destroy(&key);
        return 0; /* an _id too deep to have been stored */
    }
    uint64_t hash = emu_key_hash(key.data, key.len);
    const bson_t *own = NULL;
    if (txn && emu_txn_own_version(txn, db, coll, key.data, key.len, hash, &own, NULL)) {
        if (own) {
            out->data = bson_get_data(own);
            out->len = own->len;
            *found = true;
        }
    } else if (c) {
        const emu_hist_rec_t *r = first_change_after(srv, c->uuid, key.data, key.len, hash, t, i);
        if (r) {
            if (r->before) {
                out->data = r->before;
                out->len = r->before_len;
                *found = true;
            }
        } else {
            long slot = emu_coll_find_id(c, id);
            if (slot >= 0) {
                out->data = c->docs[slot].data;
                out->len = c->docs[slot].len;
                *found = true;
            }
        }
    }
    bson_destroy(&idd);
    emu_kbuf_destroy(&key);
    return 0;
}
