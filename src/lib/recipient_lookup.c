/*
 * recipient_lookup.c: resolves an event's recipient through another collection as of the
 * event's cluster time (see recipient_lookup.h for the contract and its limits).
 *
 * Thread: the thread that owns the instance only, a stream's watcher or a catch-up thread (it
 * owns the instance, its client and its change stream on the lookup collection).
 *
 * Invariants:
 *   - "covered": every change of the lookup collection with clusterTime <= covered has been
 *     applied, in stream order;
 *   - the cache holds, for each of its keys, the recipient as of covered: a change to a
 *     cached key updates it when applied, a change whose new value is unknown evicts it, a
 *     change that cannot be attributed to a key (a barrier) clears the cache. At most
 *     cache_size entries; every entry is in its hash chain and in the LRU list exactly once;
 *   - the log holds every applied change with clusterTime > complete_after, oldest first,
 *     with the key's value before (when known) and after it; at most MC__LOOKUP_LOG_MAX
 *     entries and MC__LOOKUP_LOG_MAX_BYTES (overflow drops the oldest and raises
 *     complete_after, so a resolution that would need it fails closed);
 *   - keys and values are canonical identities (mongocast/identity.h): the lookup matches with
 *     {$eq}, under which 5, 5.0 and Int64(5) find the same document, and so does the cache.
 * A resolution at T rolls back the logged changes newer than T; it answers only what the
 * cache and log prove, and "unresolved" otherwise.
 */
#include "recipient_lookup.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QUERY_ATTEMPTS 3
#define QUERY_MAX_TIME_MS 5000
#define MAX_BUCKETS (1u << 20)
#define VAL_UNKNOWN 0xff /* a value state beyond mc__rstate_t: not known */

/* A value seen by the ledger: MC__R_NONE, MC__R_KNOWN (bytes) or VAL_UNKNOWN. */
typedef struct val {
    uint8_t st;
    uint32_t len;
    const uint8_t *p;
} val_t;

typedef struct centry {
    struct centry *hnext;       /* hash chain */
    struct centry *prev, *next; /* LRU list: head = most recently used */
    uint64_t hash;
    uint64_t changed; /* clusterTime of the newest logged change of this key, 0: none */
    uint32_t key_len, val_len;
    uint8_t val_st;
    uint8_t data[]; /* key bytes, then value bytes */
} centry_t;

typedef struct lentry {
    uint64_t tc;
    bool barrier;
    uint8_t old_st, new_st;
    uint32_t key_len, old_len, new_len;
    uint8_t data[]; /* key, old value, new value */
} lentry_t;

struct mc__recipient_lookup {
    const mc_recipient_lookup_t *cfg;
    const char *stream;
    mongoc_client_pool_t *pool;
    bool field_is_id;
    /* cache */
    centry_t **buckets; /* allocated on first put */
    size_t n_buckets;   /* power of two */
    centry_t *head, *tail;
    size_t len;
    /* log: a ring of log_cap slots */
    lentry_t **log;
    uint32_t log_cap, log_head, log_len;
    size_t log_bytes;
    uint64_t complete_after;
    uint64_t covered;
    uint64_t last_barrier;
    /* the lookup stream */
    bool started;
    mongoc_client_t *client;
    mongoc_change_stream_t *cs;
    bson_t *resume;         /* where to reopen: the newest token seen, or NULL */
    bool resume_after_inv;  /* resume is an invalidate's token: reopen with startAfter */
    bson_t *last_event_tok; /* token of the newest applied event (tells HWM tokens apart) */
    bool gap;               /* reopened without continuity: the next cover restarts the log */
    int64_t retry_at_ms;
    mc__lookup_stats_t stats;
    mc_log_ratelimit_t rl_key, rl_unresolved, rl_error;
};

/* ---- Values ----------------------------------------------------------------------------- */

static val_t val_none(void)
{
    return (val_t){.st = MC__R_NONE};
}

static val_t val_unknown(void)
{
    return (val_t){.st = VAL_UNKNOWN};
}

static val_t val_of_id(const mc_identity_t *id)
{
    return (val_t){.st = MC__R_KNOWN, .len = id->len, .p = id->bytes};
}

/* The recipient value at `path` inside the document `doc_it` points at (KNOWN or NONE);
 * `tmp` holds the identity bytes. */
static val_t val_at(const bson_iter_t *doc_it, const char *path, mc_identity_t *tmp)
{
    bson_iter_t child, found;
    if (BSON_ITER_HOLDS_DOCUMENT(doc_it) && bson_iter_recurse(doc_it, &child) &&
        bson_iter_find_descendant(&child, path, &found) && mc_identity_from_iter(&found, tmp)) {
        return val_of_id(tmp);
    }
    return val_none();
}

static mc__rstate_t val_out(val_t v, mc_identity_t *out)
{
    out->len = 0;
    if (v.st == MC__R_KNOWN) {
        memcpy(out->bytes, v.p, v.len);
        out->len = v.len;
        return MC__R_KNOWN;
    }
    return v.st == MC__R_NONE ? MC__R_NONE : MC__R_UNRESOLVED;
}

/* ---- Construction ------------------------------------------------------------------------ */

mc__recipient_lookup_t *mc__recipient_lookup_new(const mc_recipient_lookup_t *cfg,
                                                 const char *stream, mongoc_client_pool_t *pool)
{
    if (!cfg || !cfg->recipient) {
        return NULL;
    }
    mc__recipient_lookup_t *l = calloc(1, sizeof(*l));
    if (!l) {
        return NULL;
    }
    l->log_cap = 64;
    l->log = calloc(l->log_cap, sizeof(*l->log));
    if (!l->log) {
        free(l);
        return NULL;
    }
    l->cfg = cfg;
    l->stream = stream ? stream : "?";
    l->pool = pool;
    l->field_is_id = !cfg->field || !*cfg->field || strcmp(cfg->field, "_id") == 0;
    l->rl_key = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    l->rl_unresolved = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    l->rl_error = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    return l;
}

static void cache_clear(mc__recipient_lookup_t *l);
static void log_clear(mc__recipient_lookup_t *l);
static void stream_close(mc__recipient_lookup_t *l);

void mc__recipient_lookup_destroy(mc__recipient_lookup_t *l)
{
    if (!l) {
        return;
    }
    stream_close(l);
    if (l->client) {
        mongoc_client_pool_push(l->pool, l->client);
    }
    cache_clear(l);
    log_clear(l);
    free(l->log);
    free(l->buckets);
    if (l->resume) {
        bson_destroy(l->resume);
    }
    if (l->last_event_tok) {
        bson_destroy(l->last_event_tok);
    }
    free(l);
}

void mc__recipient_lookup_stats(const mc__recipient_lookup_t *l, mc__lookup_stats_t *out)
{
    *out = l->stats;
}

size_t mc__lookup_cache_len(const mc__recipient_lookup_t *l)
{
    return l->len;
}

size_t mc__lookup_log_len(const mc__recipient_lookup_t *l)
{
    return l->log_len;
}

uint64_t mc__lookup_covered(const mc__recipient_lookup_t *l)
{
    return l->covered;
}

/* ---- Cache ---------------------------------------------------------------------------- */

static void lru_unlink(mc__recipient_lookup_t *l, centry_t *e)
{
    if (e->prev) {
        e->prev->next = e->next;
    } else {
        l->head = e->next;
    }
    if (e->next) {
        e->next->prev = e->prev;
    } else {
        l->tail = e->prev;
    }
    e->prev = e->next = NULL;
}

static void lru_push_front(mc__recipient_lookup_t *l, centry_t *e)
{
    e->prev = NULL;
    e->next = l->head;
    if (l->head) {
        l->head->prev = e;
    }
    l->head = e;
    if (!l->tail) {
        l->tail = e;
    }
}

static centry_t **chain_slot(mc__recipient_lookup_t *l, uint64_t hash, const uint8_t *key,
                             uint32_t key_len)
{
    centry_t **slot = &l->buckets[hash & (l->n_buckets - 1)];
    while (*slot && !((*slot)->hash == hash && (*slot)->key_len == key_len &&
                      memcmp((*slot)->data, key, key_len) == 0)) {
        slot = &(*slot)->hnext;
    }
    return slot;
}

static centry_t *cache_find(mc__recipient_lookup_t *l, const uint8_t *key, uint32_t key_len)
{
    if (!l->buckets) {
        return NULL;
    }
    return *chain_slot(l, mc__fnv1a(key, key_len), key, key_len);
}

static void cache_remove(mc__recipient_lookup_t *l, centry_t *e)
{
    centry_t **slot = chain_slot(l, e->hash, e->data, e->key_len);
    if (*slot == e) {
        *slot = e->hnext;
    }
    lru_unlink(l, e);
    l->len--;
    free(e);
}

static void cache_clear(mc__recipient_lookup_t *l)
{
    centry_t *e = l->head;
    while (e) {
        centry_t *next = e->next;
        free(e);
        e = next;
    }
    l->head = l->tail = NULL;
    l->len = 0;
    if (l->buckets) {
        memset(l->buckets, 0, l->n_buckets * sizeof(*l->buckets));
    }
}

static val_t centry_val(const centry_t *e)
{
    return (val_t){.st = e->val_st, .len = e->val_len, .p = e->data + e->key_len};
}

/* Stores key -> v (replacing any entry) with its newest change time. A failed allocation
 * leaves the key uncached, which is slower, never wrong. */
static void cache_put(mc__recipient_lookup_t *l, const uint8_t *key, uint32_t key_len, val_t v,
                      uint64_t changed)
{
    size_t cap = l->cfg->cache_size;
    if (cap == 0) {
        return;
    }
    if (!l->buckets) {
        size_t n = 16;
        while (n < cap && n < MAX_BUCKETS) {
            n <<= 1;
        }
        l->buckets = calloc(n, sizeof(*l->buckets));
        if (!l->buckets) {
            return;
        }
        l->n_buckets = n;
    }
    centry_t *old = cache_find(l, key, key_len);
    if (old) {
        if (changed < old->changed) {
            changed = old->changed;
        }
        cache_remove(l, old);
    }
    uint32_t vlen = v.st == MC__R_KNOWN ? v.len : 0;
    centry_t *e = calloc(1, sizeof(*e) + key_len + vlen);
    if (!e) {
        return;
    }
    e->hash = mc__fnv1a(key, key_len);
    e->changed = changed;
    e->key_len = key_len;
    e->val_len = vlen;
    e->val_st = v.st;
    memcpy(e->data, key, key_len);
    if (vlen) {
        memcpy(e->data + key_len, v.p, vlen);
    }
    centry_t **slot = chain_slot(l, e->hash, key, key_len);
    *slot = e;
    lru_push_front(l, e);
    l->len++;
    while (l->len > cap && l->tail) {
        cache_remove(l, l->tail);
    }
}

/* ---- Log -------------------------------------------------------------------------------- */

static lentry_t *log_at(const mc__recipient_lookup_t *l, uint32_t i)
{
    return l->log[(l->log_head + i) % l->log_cap];
}

static size_t lentry_bytes(const lentry_t *e)
{
    return sizeof(*e) + e->key_len + e->old_len + e->new_len;
}

static void log_drop_oldest(mc__recipient_lookup_t *l)
{
    lentry_t *e = l->log[l->log_head];
    l->log[l->log_head] = NULL;
    l->log_head = (l->log_head + 1) % l->log_cap;
    l->log_len--;
    l->log_bytes -= lentry_bytes(e);
    free(e);
}

static void log_clear(mc__recipient_lookup_t *l)
{
    while (l->log_len) {
        log_drop_oldest(l);
    }
}

/* Appends `e` (taken). When the log is full the oldest entries go, and with them the proof
 * for times before them (complete_after). */
static void log_push(mc__recipient_lookup_t *l, lentry_t *e)
{
    size_t add = lentry_bytes(e);
    while (l->log_len &&
           (l->log_len >= MC__LOOKUP_LOG_MAX || l->log_bytes + add > MC__LOOKUP_LOG_MAX_BYTES)) {
        uint64_t tc = log_at(l, 0)->tc;
        log_drop_oldest(l);
        if (tc > l->complete_after) {
            l->complete_after = tc;
        }
    }
    if (l->log_len == l->log_cap) {
        uint32_t cap = l->log_cap * 2;
        lentry_t **ring = calloc(cap, sizeof(*ring));
        if (!ring) {
            /* No room to prove anything before this change. */
            if (e->tc > l->complete_after) {
                l->complete_after = e->tc;
            }
            free(e);
            return;
        }
        for (uint32_t i = 0; i < l->log_len; i++) {
            ring[i] = log_at(l, i);
        }
        free(l->log);
        l->log = ring;
        l->log_cap = cap;
        l->log_head = 0;
    }
    l->log[(l->log_head + l->log_len) % l->log_cap] = e;
    l->log_len++;
    l->log_bytes += add;
}

void mc__lookup_trim(mc__recipient_lookup_t *l, uint64_t ct)
{
    while (l->log_len && log_at(l, 0)->tc <= ct) {
        log_drop_oldest(l);
    }
    if (ct > l->complete_after) {
        l->complete_after = ct;
    }
}

static val_t lentry_old(const lentry_t *e)
{
    return (val_t){.st = e->old_st, .len = e->old_len, .p = e->data + e->key_len};
}

static val_t lentry_new(const lentry_t *e)
{
    return (val_t){.st = e->new_st, .len = e->new_len, .p = e->data + e->key_len + e->old_len};
}

static bool lentry_is(const lentry_t *e, const uint8_t *key, uint32_t key_len)
{
    return !e->barrier && e->key_len == key_len && memcmp(e->data, key, key_len) == 0;
}

/* ---- Applying lookup changes -------------------------------------------------------------- */

static void barrier(mc__recipient_lookup_t *l, uint64_t tc)
{
    lentry_t *e = calloc(1, sizeof(*e));
    if (e) {
        e->tc = tc;
        e->barrier = true;
        log_push(l, e);
    } else if (tc > l->complete_after) {
        l->complete_after = tc;
    }
    cache_clear(l);
    l->last_barrier = tc;
    l->stats.barriers++;
}

/* One change of key: logs (key, tc, value before, value after) and keeps the cache exact. The
 * value before is the cached one when the key is cached (exact as of covered), else `hint`
 * (from a pre-image, or "none" for an insert, or unknown). */
static void record(mc__recipient_lookup_t *l, const mc_identity_t *key, uint64_t tc, val_t hint,
                   val_t after)
{
    centry_t *c = cache_find(l, key->bytes, key->len);
    val_t before = c ? centry_val(c) : hint;
    uint32_t olen = before.st == MC__R_KNOWN ? before.len : 0;
    uint32_t nlen = after.st == MC__R_KNOWN ? after.len : 0;
    lentry_t *e = calloc(1, sizeof(*e) + key->len + olen + nlen);
    if (!e) {
        barrier(l, tc);
        return;
    }
    e->tc = tc;
    e->key_len = key->len;
    e->old_st = before.st;
    e->old_len = olen;
    e->new_st = after.st;
    e->new_len = nlen;
    memcpy(e->data, key->bytes, key->len);
    if (olen) {
        memcpy(e->data + key->len, before.p, olen);
    }
    if (nlen) {
        memcpy(e->data + key->len + olen, after.p, nlen);
    }
    /* The cache entry may point into `before`: copy done above, now it may change. */
    if (after.st == VAL_UNKNOWN) {
        if (c) {
            cache_remove(l, c);
        }
    } else {
        cache_put(l, key->bytes, key->len, after, tc);
    }
    log_push(l, e);
}

typedef enum ud_effect {
    UD_UNTOUCHED = 0, /* the update left the path alone */
    UD_SET,           /* *value is the path's new value */
    UD_GONE,          /* the path now holds nothing, or a document/array (not an identity) */
    UD_UNKNOWN,       /* cannot tell */
} ud_effect_t;

/* `k` is `path` or one of its ancestors ("a" of "a.b"); *rest is what follows. */
static bool covers(const char *k, const char *path, const char **rest)
{
    size_t n = strlen(k);
    if (strncmp(k, path, n) != 0) {
        return false;
    }
    if (path[n] == '\0') {
        *rest = NULL;
        return true;
    }
    if (path[n] == '.') {
        *rest = path + n + 1;
        return true;
    }
    return false;
}

/* What an update's updateDescription did to `path` (a dotted path in the document). MongoDB
 * applies truncations, then removals and sets; updatedFields holds final values. */
static ud_effect_t ud_effect(const bson_t *change, const char *path, bson_iter_t *value)
{
    bson_iter_t it, ud, sub, el;
    if (!bson_iter_init_find(&it, change, "updateDescription") ||
        !BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &ud)) {
        return UD_UNKNOWN;
    }
    ud_effect_t removed = UD_UNTOUCHED;
    bool seen_updated = false;
    while (bson_iter_next(&ud)) {
        const char *uk = bson_iter_key(&ud);
        const char *rest = NULL;
        if (strcmp(uk, "updatedFields") == 0 && BSON_ITER_HOLDS_DOCUMENT(&ud)) {
            seen_updated = true;
            bson_iter_recurse(&ud, &sub);
            while (bson_iter_next(&sub)) {
                const char *k = bson_iter_key(&sub);
                if (covers(k, path, &rest)) {
                    if (!rest) {
                        *value = sub;
                        return UD_SET;
                    }
                    if ((BSON_ITER_HOLDS_DOCUMENT(&sub) || BSON_ITER_HOLDS_ARRAY(&sub)) &&
                        bson_iter_recurse(&sub, &el) &&
                        bson_iter_find_descendant(&el, rest, value)) {
                        return UD_SET;
                    }
                    return UD_GONE;
                }
                if (covers(path, k, &rest)) {
                    return UD_GONE; /* a field inside the path's value: it is a container */
                }
            }
        } else if (strcmp(uk, "removedFields") == 0 && BSON_ITER_HOLDS_ARRAY(&ud)) {
            bson_iter_recurse(&ud, &sub);
            while (bson_iter_next(&sub)) {
                if (!BSON_ITER_HOLDS_UTF8(&sub)) {
                    return UD_UNKNOWN;
                }
                const char *k = bson_iter_utf8(&sub, NULL);
                if (covers(k, path, &rest) || covers(path, k, &rest)) {
                    removed = UD_GONE;
                }
            }
        } else if (strcmp(uk, "truncatedArrays") == 0 && BSON_ITER_HOLDS_ARRAY(&ud)) {
            bson_iter_recurse(&ud, &sub);
            while (bson_iter_next(&sub)) {
                bson_iter_t f;
                if (!BSON_ITER_HOLDS_DOCUMENT(&sub) || !bson_iter_recurse(&sub, &el) ||
                    !bson_iter_find(&el, "field") || !BSON_ITER_HOLDS_UTF8(&el)) {
                    return UD_UNKNOWN;
                }
                const char *k = bson_iter_utf8(&el, NULL);
                if (!covers(k, path, &rest) && !covers(path, k, &rest)) {
                    continue;
                }
                if (!covers(k, path, &rest) || !rest) {
                    removed = UD_GONE; /* the path is the array or inside it: a container */
                    continue;
                }
                /* path = array.<index>...: gone when the index is at or past the new size. */
                char *end = NULL;
                long idx = strtol(rest, &end, 10);
                int64_t size = -1;
                if (bson_iter_recurse(&sub, &f) && bson_iter_find(&f, "newSize") &&
                    BSON_ITER_HOLDS_NUMBER(&f)) {
                    size = bson_iter_as_int64(&f);
                }
                if (end == rest || (*end != '\0' && *end != '.') || size < 0) {
                    return UD_UNKNOWN;
                }
                if (idx >= size) {
                    removed = UD_GONE;
                }
            }
        }
    }
    if (!seen_updated) {
        return UD_UNKNOWN;
    }
    return removed;
}

/* The key of a version of the lookup document (its `field`): true and *key, or false when it
 * has none that is an identity. */
static bool key_of(const mc__recipient_lookup_t *l, const bson_iter_t *doc_it, mc_identity_t *key)
{
    bson_iter_t child, found;
    key->len = 0;
    return BSON_ITER_HOLDS_DOCUMENT(doc_it) && bson_iter_recurse(doc_it, &child) &&
           bson_iter_find_descendant(&child, l->cfg->field, &found) &&
           mc_identity_from_iter(&found, key);
}

static bool find_doc(const bson_t *change, const char *name, bson_iter_t *it)
{
    return bson_iter_init_find(it, change, name) && BSON_ITER_HOLDS_DOCUMENT(it);
}

/* A write to one document of the lookup collection. */
static void apply_write(mc__recipient_lookup_t *l, const bson_t *change, const char *op,
                        uint64_t tc)
{
    const char *rpath = l->cfg->recipient;
    bool insert = strcmp(op, "insert") == 0;
    bool del = strcmp(op, "delete") == 0;
    bool update = strcmp(op, "update") == 0;
    bson_iter_t full, before, v;
    bool has_full = find_doc(change, "fullDocument", &full);
    bool has_before = find_doc(change, "fullDocumentBeforeChange", &before);
    mc_identity_t tmp_new, tmp_old, tmp_ud;

    /* The value after the write. */
    val_t after;
    ud_effect_t rec_ud = UD_UNKNOWN;
    if (del) {
        after = val_none();
    } else if (has_full) {
        after = val_at(&full, rpath, &tmp_new);
    } else if (update) {
        rec_ud = ud_effect(change, rpath, &v);
        after = rec_ud == UD_SET ? (mc_identity_from_iter(&v, &tmp_ud) ? val_of_id(&tmp_ud)
                                                                        : val_none())
                : rec_ud == UD_GONE ? val_none()
                                    : val_unknown(); /* UNTOUCHED is settled below */
    } else {
        after = val_unknown();
    }
    /* The value before, when the event says. */
    val_t hint = insert ? val_none() : has_before ? val_at(&before, rpath, &tmp_old)
                                                  : val_unknown();

    if (l->field_is_id) {
        bson_iter_t dk, id;
        mc_identity_t key;
        if (!bson_iter_init_find(&dk, change, "documentKey") || !BSON_ITER_HOLDS_DOCUMENT(&dk) ||
            !bson_iter_recurse(&dk, &id) || !bson_iter_find(&id, "_id")) {
            barrier(l, tc);
            return;
        }
        if (!mc_identity_from_iter(&id, &key)) {
            return; /* no reference can designate this document */
        }
        if (update && !has_full && rec_ud == UD_UNTOUCHED) {
            return; /* the recipient did not change */
        }
        record(l, &key, tc, hint, after);
        return;
    }

    /* `field` other than _id: the write may move the document from one key to another, so
     * both keys must be known. */
    mc_identity_t kold, knew;
    bool has_kold = false, has_knew = false, kold_known = false, knew_known = false;
    if (insert) {
        kold_known = true;
    } else if (has_before) {
        kold_known = true;
        has_kold = key_of(l, &before, &kold);
    }
    if (del) {
        knew_known = true;
    } else if (has_full) {
        knew_known = true;
        has_knew = key_of(l, &full, &knew);
    } else if (update) {
        bson_iter_t kv;
        ud_effect_t key_ud = ud_effect(change, l->cfg->field, &kv);
        if (key_ud == UD_UNTOUCHED && rec_ud == UD_UNTOUCHED) {
            return; /* neither the key nor the recipient changed */
        }
        if (key_ud == UD_UNTOUCHED && kold_known) {
            knew_known = true;
            has_knew = has_kold;
            knew = kold;
        } else if (key_ud == UD_SET) {
            knew_known = true;
            has_knew = mc_identity_from_iter(&kv, &knew);
        } else if (key_ud == UD_GONE) {
            knew_known = true;
        }
        if (rec_ud == UD_UNTOUCHED) {
            after = hint;
        }
    }
    if (!kold_known || !knew_known) {
        barrier(l, tc);
        return;
    }
    if (has_kold && has_knew && mc_identity_equal(kold.bytes, kold.len, knew.bytes, knew.len)) {
        record(l, &knew, tc, hint, after);
        return;
    }
    if (has_kold) {
        record(l, &kold, tc, hint, val_none());
    }
    if (has_knew) {
        /* Before this write no other document had this key (field identifies at most one). */
        record(l, &knew, tc, val_none(), after);
    }
}

void mc__lookup_apply(mc__recipient_lookup_t *l, const bson_t *change)
{
    bson_iter_t it;
    const char *op = NULL;
    uint64_t tc = 0;
    if (bson_iter_init_find(&it, change, "operationType") && BSON_ITER_HOLDS_UTF8(&it)) {
        op = bson_iter_utf8(&it, NULL);
    }
    if (bson_iter_init_find(&it, change, "clusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        uint32_t t, i;
        bson_iter_timestamp(&it, &t, &i);
        tc = mc__ct(t, i);
    }
    if (tc == 0) {
        /* No usable time: it cannot be placed before or after any event. */
        tc = l->covered + 1;
        barrier(l, tc);
    } else if (!op) {
        barrier(l, tc);
    } else if (strcmp(op, "insert") == 0 || strcmp(op, "update") == 0 ||
               strcmp(op, "replace") == 0 || strcmp(op, "delete") == 0) {
        apply_write(l, change, op, tc);
    } else if (strcmp(op, "drop") == 0 || strcmp(op, "rename") == 0 ||
               strcmp(op, "dropDatabase") == 0 || strcmp(op, "invalidate") == 0) {
        barrier(l, tc);
    }
    l->stats.applied++;
    if (l->gap) {
        /* The first change after a reopen from "now": none came between then and it. */
        l->gap = false;
        l->complete_after = tc - 1;
    }
    /* Other changes at the same time (a transaction) may still follow. A change at exactly
     * the high-water mark seen last is not a contradiction: mongo-emulator's mark is the next
     * cluster time it will hand out (MongoDB's is the last one it scanned); no event of the
     * watched stream can have that time, so no resolution was made at it. */
    if (tc - 1 > l->covered) {
        l->covered = tc - 1;
    }
}

void mc__lookup_cover(mc__recipient_lookup_t *l, uint64_t ct)
{
    if (l->gap) {
        /* The reopened stream has seen everything from its start, which is at or before
         * this mark; nothing before it can be proven. */
        l->gap = false;
        l->complete_after = ct;
    }
    if (ct > l->covered) {
        l->covered = ct;
    }
}

void mc__lookup_start(mc__recipient_lookup_t *l, uint64_t ct)
{
    l->started = true;
    l->covered = ct;
    l->complete_after = ct;
}

/* ---- Resolving from the ledger ------------------------------------------------------------ */

/* The value at ct of a key whose value as of covered is *current (NULL: take the cache's; -1
 * when it is not cached either). */
static int resolve(mc__recipient_lookup_t *l, const mc_identity_t *key, uint64_t ct,
                   const val_t *current, mc_identity_t *out)
{
    out->len = 0;
    if (ct < l->complete_after || ct > l->covered) {
        return MC__R_UNRESOLVED;
    }
    centry_t *c = current ? NULL : cache_find(l, key->bytes, key->len);
    if (c && c->changed <= ct && l->last_barrier <= ct) {
        /* Nothing changed this key since ct: the current value is the value at ct. */
        lru_unlink(l, c);
        lru_push_front(l, c);
        return (int)val_out(centry_val(c), out);
    }
    /* Roll back: the value at ct is the one before the first change after ct, if any. */
    for (uint32_t i = 0; i < l->log_len; i++) {
        const lentry_t *e = log_at(l, i);
        if (e->tc <= ct) {
            continue;
        }
        if (e->barrier) {
            return MC__R_UNRESOLVED;
        }
        if (lentry_is(e, key->bytes, key->len)) {
            return (int)val_out(lentry_old(e), out);
        }
    }
    if (current) {
        return (int)val_out(*current, out);
    }
    if (c) {
        lru_unlink(l, c);
        lru_push_front(l, c);
        return (int)val_out(centry_val(c), out);
    }
    return -1;
}

int mc__lookup_resolve_cached(mc__recipient_lookup_t *l, const mc_identity_t *key, uint64_t ct,
                              mc_identity_t *out)
{
    return resolve(l, key, ct, NULL, out);
}

/* mc__lookup_fill() that also hands back the value as of covered (it may point into the log
 * or `value`: use it before the log changes). */
static int fill(mc__recipient_lookup_t *l, const mc_identity_t *key, mc__rstate_t st,
                const mc_identity_t *value, uint64_t from, val_t *now)
{
    if (from < l->complete_after) {
        return -1;
    }
    val_t v = st == MC__R_KNOWN ? val_of_id(value) : val_none();
    uint64_t changed = 0;
    /* The read reflects every change up to `from` and maybe some after it; each logged
     * change after `from` sets an absolute value, so replaying them all lands on the value
     * as of covered whichever of them the read already saw. */
    for (uint32_t i = 0; i < l->log_len; i++) {
        const lentry_t *e = log_at(l, i);
        if (e->barrier) {
            if (e->tc > from) {
                return -1;
            }
            continue;
        }
        if (!lentry_is(e, key->bytes, key->len)) {
            continue;
        }
        changed = e->tc;
        if (e->tc > from) {
            val_t n = lentry_new(e);
            if (n.st == VAL_UNKNOWN) {
                return -1;
            }
            v = n;
        }
    }
    cache_put(l, key->bytes, key->len, v, changed);
    *now = v;
    return 0;
}

int mc__lookup_fill(mc__recipient_lookup_t *l, const mc_identity_t *key, mc__rstate_t st,
                    const mc_identity_t *value, uint64_t from)
{
    val_t now;
    return fill(l, key, st, value, from, &now);
}

/* ---- The lookup stream -------------------------------------------------------------------- */

static void stream_close(mc__recipient_lookup_t *l)
{
    if (l->cs) {
        mongoc_change_stream_destroy(l->cs);
        l->cs = NULL;
    }
}

static void set_bson(bson_t **slot, const bson_t *v)
{
    if (*slot) {
        bson_destroy(*slot);
    }
    *slot = v ? bson_copy(v) : NULL;
}

static bool stream_open(mc__recipient_lookup_t *l, uint64_t start_ct)
{
    if (mc__now_ms() < l->retry_at_ms) {
        return false;
    }
    if (!l->client) {
        l->client = mongoc_client_pool_try_pop(l->pool);
        if (!l->client) {
            l->retry_at_ms = mc__now_ms() + MC__LOOKUP_RETRY_MS;
            mc_log_ratelimited(&l->rl_error, MC_LOG_WARN, "recipient",
                               "lookup stream stream=%s: no free client in the pool", l->stream);
            return false;
        }
    }
    bson_t *opts = BCON_NEW("fullDocument", "whenAvailable", "fullDocumentBeforeChange",
                            "whenAvailable", "maxAwaitTimeMS", BCON_INT64(MC__LOOKUP_AWAIT_MS),
                            "batchSize", BCON_INT32(1000));
    if (l->resume) {
        BSON_APPEND_DOCUMENT(opts, l->resume_after_inv ? "startAfter" : "resumeAfter",
                             l->resume);
    } else if (!l->started) {
        BSON_APPEND_TIMESTAMP(opts, "startAtOperationTime", (uint32_t)(start_ct >> 32),
                              (uint32_t)start_ct);
    }
    bson_t pipeline = BSON_INITIALIZER;
    mongoc_collection_t *coll =
        mongoc_client_get_collection(l->client, l->cfg->db, l->cfg->collection);
    l->cs = mongoc_collection_watch(coll, &pipeline, opts);
    mongoc_collection_destroy(coll);
    bson_destroy(&pipeline);
    bson_destroy(opts);
    l->stats.reopens++;
    bson_error_t err;
    const bson_t *reply = NULL;
    if (mongoc_change_stream_error_document(l->cs, &err, &reply)) {
        stream_close(l);
        l->retry_at_ms = mc__now_ms() + MC__LOOKUP_RETRY_MS;
        if (err.code == 286 || err.code == 260 || err.code == 280) {
            /* The resume point is gone: start again from now, without the proof for what
             * lies between. */
            set_bson(&l->resume, NULL);
            l->gap = true;
            l->complete_after = UINT64_MAX; /* until the reopened stream shows where it is */
            l->retry_at_ms = 0;
            cache_clear(l);
            log_clear(l);
        }
        mc_log_ratelimited(&l->rl_error, MC_LOG_WARN, "recipient",
                           "lookup stream stream=%s ns=%s.%s cannot open (code %u): %s; events "
                           "go to admins only until it is back",
                           l->stream, l->cfg->db, l->cfg->collection, err.code, err.message);
        return false;
    }
    if (!l->started) {
        /* Everything before the first event routed is reflected in any later read. */
        mc__lookup_start(l, start_ct - 1);
    }
    return true;
}

/* One step of the lookup stream: 1 a change applied, 0 an empty batch (covered moved to its
 * post-batch token), -1 the stream failed (closed; reopened by a later call). */
static int poll_once(mc__recipient_lookup_t *l)
{
    const bson_t *doc;
    if (mongoc_change_stream_next(l->cs, &doc)) {
        bson_iter_t it;
        bool inv = bson_iter_init_find(&it, doc, "operationType") && BSON_ITER_HOLDS_UTF8(&it) &&
                   strcmp(bson_iter_utf8(&it, NULL), "invalidate") == 0;
        mc__lookup_apply(l, doc);
        const bson_t *tok = NULL;
        if (bson_iter_init_find(&it, doc, "_id") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
            uint32_t len;
            const uint8_t *data;
            bson_iter_document(&it, &len, &data);
            bson_t id;
            if (bson_init_static(&id, data, len)) {
                set_bson(&l->resume, &id);
                set_bson(&l->last_event_tok, &id);
                tok = l->resume;
            }
        }
        l->resume_after_inv = inv;
        if (inv || !tok) {
            /* The server closed the cursor; reopen right after this point. */
            stream_close(l);
        }
        return 1;
    }
    bson_error_t err;
    const bson_t *reply = NULL;
    if (mongoc_change_stream_error_document(l->cs, &err, &reply)) {
        stream_close(l);
        l->retry_at_ms = mc__now_ms() + MC__LOOKUP_RETRY_MS;
        mc_log_ratelimited(&l->rl_error, MC_LOG_WARN, "recipient",
                           "lookup stream stream=%s ns=%s.%s failed (code %u): %s; reopening",
                           l->stream, l->cfg->db, l->cfg->collection, err.code, err.message);
        return -1;
    }
    const bson_t *tok = mongoc_change_stream_get_resume_token(l->cs);
    if (tok && !bson_empty(tok)) {
        uint32_t t, i;
        mc__token_cluster_time(tok, &t, &i);
        uint64_t h = mc__ct(t, i);
        /* A high-water mark covers its own time (MongoDB scanned the oplog through it); the
         * token of the last event only what came before it. */
        if (l->last_event_tok && bson_equal(tok, l->last_event_tok)) {
            h = h ? h - 1 : 0;
        }
        if (h) {
            mc__lookup_cover(l, h);
        }
        set_bson(&l->resume, tok);
        l->resume_after_inv = false;
    }
    return 0;
}

/* Reads the lookup stream until it has seen everything up to `target` and, with
 * `need_empty`, until one empty batch came after the call started (everything the server had
 * then). False when it cannot within MC__LOOKUP_CATCHUP_MS, or when stopping. */
static bool catch_up(mc__recipient_lookup_t *l, uint64_t target, bool need_empty,
                     const atomic_bool *stopping)
{
    int64_t deadline = mc__now_ms() + MC__LOOKUP_CATCHUP_MS;
    bool empty_seen = false;
    while (l->covered < target || (need_empty && !empty_seen)) {
        if ((stopping && atomic_load(stopping)) || mc__now_ms() > deadline) {
            return false;
        }
        if (!l->cs && !stream_open(l, target)) {
            return false;
        }
        int r = poll_once(l);
        if (r < 0) {
            return false;
        }
        if (r == 0) {
            empty_seen = true;
        }
    }
    return true;
}

typedef enum read_result {
    READ_FOUND = 0, /* *st and *value set */
    READ_AMBIGUOUS,
    READ_ERROR,
} read_result_t;

/* Reads the document `ref` designates now: {find, filter {field: {$eq: ref}}} with
 * readConcern majority (what the lookup stream sees), its recipient and the read's
 * operationTime (0 when the reply has none). */
static read_result_t read_once(mc__recipient_lookup_t *l, const bson_value_t *ref,
                               mc__rstate_t *st, mc_identity_t *value, uint64_t *optime,
                               bson_error_t *err)
{
    const mc_recipient_lookup_t *c = l->cfg;
    const char *field = l->field_is_id ? "_id" : c->field;
    bson_t cmd = BSON_INITIALIZER, filter, eq, proj, opts = BSON_INITIALIZER, rc, reply;
    BSON_APPEND_UTF8(&cmd, "find", c->collection);
    bson_append_document_begin(&cmd, "filter", -1, &filter);
    bson_append_document_begin(&filter, field, -1, &eq);
    /* $eq: the value comes from a user-writable document, and a stored {"$ne": null} must
     * not act as an operator. */
    bson_append_value(&eq, "$eq", 3, ref);
    bson_append_document_end(&filter, &eq);
    bson_append_document_end(&cmd, &filter);
    bson_append_document_begin(&cmd, "projection", -1, &proj);
    /* The recipient's top-level field: a path through a DBRef (owner.$id) is read from the
     * whole DBRef, whatever a server allows in projection paths. */
    bson_append_int32(&proj, c->recipient, (int)strcspn(c->recipient, "."), 1);
    bson_append_document_end(&cmd, &proj);
    BSON_APPEND_INT64(&cmd, "limit", 2);
    BSON_APPEND_BOOL(&cmd, "singleBatch", true);
    BSON_APPEND_INT64(&cmd, "maxTimeMS", QUERY_MAX_TIME_MS);
    bson_append_document_begin(&opts, "readConcern", -1, &rc);
    BSON_APPEND_UTF8(&rc, "level", "majority");
    bson_append_document_end(&opts, &rc);

    mongoc_database_t *db = mongoc_client_get_database(l->client, c->db);
    bool ok = mongoc_database_read_command_with_opts(db, &cmd, NULL, &opts, &reply, err);
    mongoc_database_destroy(db);
    bson_destroy(&cmd);
    bson_destroy(&opts);
    read_result_t res = READ_ERROR;
    bson_iter_t it, batch;
    if (ok && bson_iter_init(&it, &reply) &&
        bson_iter_find_descendant(&it, "cursor.firstBatch", &batch) &&
        BSON_ITER_HOLDS_ARRAY(&batch) && bson_iter_recurse(&batch, &it)) {
        int n = 0;
        mc_identity_t tmp;
        val_t v = val_none();
        while (bson_iter_next(&it)) {
            if (++n == 1) {
                v = val_at(&it, c->recipient, &tmp);
            }
        }
        if (n > 1) {
            res = READ_AMBIGUOUS;
        } else {
            if (n == 0) {
                l->stats.not_found++;
            }
            *st = val_out(v, value);
            res = READ_FOUND;
        }
        *optime = 0;
        if (bson_iter_init_find(&it, &reply, "operationTime") &&
            BSON_ITER_HOLDS_TIMESTAMP(&it)) {
            uint32_t t, i;
            bson_iter_timestamp(&it, &t, &i);
            *optime = mc__ct(t, i);
        }
    } else if (ok) {
        bson_set_error(err, MONGOC_ERROR_CURSOR, MONGOC_ERROR_CURSOR_INVALID_CURSOR,
                       "find reply without cursor.firstBatch");
    }
    bson_destroy(&reply);
    return res;
}

static mc__rstate_t unresolved(mc__recipient_lookup_t *l, const char *why)
{
    l->stats.unresolved++;
    mc_log_ratelimited(&l->rl_unresolved, MC_LOG_WARN, "recipient",
                       "lookup not exact stream=%s ns=%s.%s: %s; event goes to admins only",
                       l->stream, l->cfg->db, l->cfg->collection, why);
    return MC__R_UNRESOLVED;
}

/* A reference that is a DBRef ({$ref, $id[, $db]}) designates the document whose key is its
 * $id, but only in the lookup's own collection (and database, when it names one): a DBRef to
 * another collection designates nothing here. Returns `ref` itself when it is no DBRef, the
 * $id value (pointing into `ref`'s bytes) when it designates the lookup collection, NULL
 * otherwise. */
static const bson_value_t *dbref_key(const mc__recipient_lookup_t *l, const bson_value_t *ref,
                                     bson_iter_t *scratch)
{
    if (ref->value_type != BSON_TYPE_DOCUMENT ||
        !bson_iter_init_from_data(scratch, ref->value.v_doc.data, ref->value.v_doc.data_len)) {
        return ref;
    }
    bson_iter_t f = *scratch;
    if (!bson_iter_find(&f, "$ref")) {
        return ref; /* an ordinary document: no identity, refused by the caller */
    }
    if (!BSON_ITER_HOLDS_UTF8(&f) || strcmp(bson_iter_utf8(&f, NULL), l->cfg->collection) != 0) {
        return NULL;
    }
    f = *scratch;
    if (bson_iter_find(&f, "$db") &&
        (!BSON_ITER_HOLDS_UTF8(&f) || strcmp(bson_iter_utf8(&f, NULL), l->cfg->db) != 0)) {
        return NULL;
    }
    if (!bson_iter_find(scratch, "$id")) {
        return NULL;
    }
    return bson_iter_value(scratch);
}

mc__rstate_t mc__recipient_lookup_at(mc__recipient_lookup_t *l, const bson_value_t *ref_in,
                                     uint64_t ct, mc_identity_t *out, const atomic_bool *stopping)
{
    out->len = 0;
    mc_identity_t key;
    bson_iter_t scratch;
    const bson_value_t *ref = l && ref_in ? dbref_key(l, ref_in, &scratch) : ref_in;
    if (l && ref_in && !ref) {
        mc_log_ratelimited(&l->rl_key, MC_LOG_INFO, "recipient",
                           "lookup skipped stream=%s: the reference is a DBRef to another "
                           "collection than %s.%s; event goes to admins only",
                           l->stream, l->cfg->db, l->cfg->collection);
        return MC__R_NONE;
    }
    if (!l || !ref || !mc_identity_from_value(ref, &key)) {
        if (l && ref) {
            mc_log_ratelimited(&l->rl_key, MC_LOG_INFO, "recipient",
                               "lookup skipped stream=%s: the reference is not an identity "
                               "(type 0x%02x); event goes to admins only",
                               l->stream, (unsigned)ref->value_type);
        }
        return MC__R_NONE;
    }
    if (ct == 0) {
        return unresolved(l, "the event has no clusterTime");
    }
    if (!l->pool) {
        return unresolved(l, "no client pool");
    }
    if (!catch_up(l, ct, false, stopping)) {
        return unresolved(l, "the lookup stream did not reach the event's time");
    }
    mc__lookup_trim(l, ct);
    int r = mc__lookup_resolve_cached(l, &key, ct, out);
    if (r >= 0) {
        l->stats.hits++;
        if (r == MC__R_UNRESOLVED) {
            return unresolved(l, "a change of the lookup document with an unknown previous "
                                 "value lies after the event (enable pre-images on the "
                                 "lookup collection)");
        }
        return (mc__rstate_t)r;
    }
    l->stats.misses++;
    bson_error_t err;
    memset(&err, 0, sizeof(err));
    for (int attempt = 0; attempt < QUERY_ATTEMPTS; attempt++) {
        if (attempt > 0) {
            if (stopping && atomic_load(stopping)) {
                break;
            }
            struct timespec ts = {0, 100000000L * attempt};
            nanosleep(&ts, NULL);
        }
        uint64_t from = l->covered;
        mc__rstate_t st = MC__R_NONE;
        mc_identity_t value;
        uint64_t optime = 0;
        l->stats.queries++;
        read_result_t q = read_once(l, ref, &st, &value, &optime, &err);
        if (q == READ_AMBIGUOUS) {
            return unresolved(l, "more than one lookup document matches the reference (the "
                                 "lookup field must be unique)");
        }
        if (q == READ_ERROR) {
            l->stats.query_errors++;
            continue;
        }
        if (!catch_up(l, optime, optime == 0, stopping)) {
            return unresolved(l, "the lookup stream did not reach the read's time");
        }
        val_t now;
        if (fill(l, &key, st, &value, from, &now) != 0) {
            return unresolved(l, "a change the lookup stream could not attribute lies "
                                 "between the read and now");
        }
        r = resolve(l, &key, ct, &now, out);
        if (r < 0 || r == MC__R_UNRESOLVED) {
            return unresolved(l, "a change of the lookup document with an unknown previous "
                                 "value lies after the event (enable pre-images on the "
                                 "lookup collection)");
        }
        return (mc__rstate_t)r;
    }
    mc_log_ratelimited(&l->rl_error, MC_LOG_WARN, "recipient",
                       "lookup read failed stream=%s ns=%s.%s: %s", l->stream, l->cfg->db,
                       l->cfg->collection, err.message);
    return unresolved(l, "the lookup read failed");
}
