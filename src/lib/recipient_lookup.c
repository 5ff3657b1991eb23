/*
 * recipient_lookup.c: resolves an event's recipient through another collection, with a
 * bounded LRU cache (see recipient_lookup.h for the contract and the TTLs).
 *
 * Thread: the stream's watcher thread only (it owns the instance and the client it passes).
 *
 * Invariants: the cache never holds more than cfg->cache_size entries; every entry is in the
 * hash chain of its bucket and in the LRU list exactly once; keys are the BSON encoding of
 * {"": value}, so values of different types never collide (int 5 and "5" are different
 * keys, as they are different MongoDB values). The lookup query is {field: {$eq: value}}:
 * the value comes from a user-writable document, and $eq keeps a stored {"$ne": null} from
 * acting as an operator.
 */
#include "recipient_lookup.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_private.h"

#define QUERY_ATTEMPTS 3
#define QUERY_MAX_TIME_MS 5000
#define MAX_BUCKETS (1u << 20)

typedef struct entry {
    struct entry *hnext;       /* hash chain */
    struct entry *prev, *next; /* LRU list: head = most recently used */
    uint64_t hash;
    uint8_t *key;
    uint32_t key_len;
    char *recipient; /* NULL: cached miss */
    int64_t expires_ms;
} entry_t;

struct mc__recipient_lookup {
    const mc_recipient_lookup_t *cfg;
    const char *stream;
    entry_t **buckets; /* allocated on first put */
    size_t n_buckets;  /* power of two */
    entry_t *head, *tail;
    size_t len;
    mc__lookup_stats_t stats;
    mc_log_ratelimit_t rl_miss;
    mc_log_ratelimit_t rl_error;
};

mc__recipient_lookup_t *mc__recipient_lookup_new(const mc_recipient_lookup_t *cfg,
                                                 const char *stream)
{
    if (!cfg) {
        return NULL;
    }
    mc__recipient_lookup_t *l = calloc(1, sizeof(*l));
    if (!l) {
        return NULL;
    }
    l->cfg = cfg;
    l->stream = stream ? stream : "?";
    l->rl_miss = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    l->rl_error = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    return l;
}

static void entry_free(entry_t *e)
{
    bson_free(e->key);
    bson_free(e->recipient);
    free(e);
}

void mc__recipient_lookup_destroy(mc__recipient_lookup_t *l)
{
    if (!l) {
        return;
    }
    entry_t *e = l->head;
    while (e) {
        entry_t *next = e->next;
        entry_free(e);
        e = next;
    }
    free(l->buckets);
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

/* ---- Keys ------------------------------------------------------------------------------- */

/* Values that can identify a document. Documents, arrays, null, regexes and code are not
 * keys: an array would match any element, a regex as a pattern. */
static bool usable_key(const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_UTF8:
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
    case BSON_TYPE_DECIMAL128:
    case BSON_TYPE_OID:
    case BSON_TYPE_BOOL:
    case BSON_TYPE_DATE_TIME:
    case BSON_TYPE_BINARY:
    case BSON_TYPE_TIMESTAMP: return true;
    case BSON_TYPE_DOUBLE: return isfinite(v->value.v_double);
    default: return false;
    }
}

/* The BSON bytes of {"": value}; bson_t on the stack, bytes borrowed from it. */
static bool key_bytes(const bson_value_t *v, bson_t *tmp)
{
    bson_init(tmp);
    return bson_append_value(tmp, "", 0, v);
}

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* ---- LRU cache -------------------------------------------------------------------------- */

static void lru_unlink(mc__recipient_lookup_t *l, entry_t *e)
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

static void lru_push_front(mc__recipient_lookup_t *l, entry_t *e)
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

static entry_t **chain_slot(mc__recipient_lookup_t *l, uint64_t hash, const uint8_t *key,
                            uint32_t key_len)
{
    entry_t **slot = &l->buckets[hash & (l->n_buckets - 1)];
    while (*slot && !((*slot)->hash == hash && (*slot)->key_len == key_len &&
                      memcmp((*slot)->key, key, key_len) == 0)) {
        slot = &(*slot)->hnext;
    }
    return slot;
}

static void remove_entry(mc__recipient_lookup_t *l, entry_t *e)
{
    entry_t **slot = chain_slot(l, e->hash, e->key, e->key_len);
    if (*slot == e) {
        *slot = e->hnext;
    }
    lru_unlink(l, e);
    l->len--;
    entry_free(e);
}

int mc__lookup_cache_get(mc__recipient_lookup_t *l, const bson_value_t *key, int64_t now_ms,
                         const char **recipient)
{
    if (!l->buckets) {
        return 0;
    }
    bson_t tmp;
    if (!key_bytes(key, &tmp) || tmp.len > MC__LOOKUP_MAX_KEY_BYTES) {
        bson_destroy(&tmp);
        return 0;
    }
    const uint8_t *kb = bson_get_data(&tmp);
    uint64_t h = fnv1a(kb, tmp.len);
    entry_t *e = *chain_slot(l, h, kb, tmp.len);
    bson_destroy(&tmp);
    if (!e) {
        return 0;
    }
    if (now_ms >= e->expires_ms) {
        /* Expired: drop it so the caller refreshes from MongoDB. */
        remove_entry(l, e);
        return 0;
    }
    lru_unlink(l, e);
    lru_push_front(l, e);
    *recipient = e->recipient;
    return 1;
}

void mc__lookup_cache_put(mc__recipient_lookup_t *l, const bson_value_t *key, const char *recipient,
                          int64_t now_ms, int64_t ttl_ms)
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
            return; /* no cache is slower, not wrong */
        }
        l->n_buckets = n;
    }
    bson_t tmp;
    if (!key_bytes(key, &tmp) || tmp.len > MC__LOOKUP_MAX_KEY_BYTES) {
        bson_destroy(&tmp);
        return;
    }
    const uint8_t *kb = bson_get_data(&tmp);
    uint64_t h = fnv1a(kb, tmp.len);
    entry_t **slot = chain_slot(l, h, kb, tmp.len);
    entry_t *e = *slot;
    if (e) {
        bson_free(e->recipient);
        e->recipient = recipient ? bson_strdup(recipient) : NULL;
        e->expires_ms = now_ms + ttl_ms;
        lru_unlink(l, e);
        lru_push_front(l, e);
        bson_destroy(&tmp);
        return;
    }
    e = calloc(1, sizeof(*e));
    if (!e) {
        bson_destroy(&tmp);
        return;
    }
    e->hash = h;
    e->key_len = tmp.len;
    e->key = bson_malloc(tmp.len);
    memcpy(e->key, kb, tmp.len);
    bson_destroy(&tmp);
    e->recipient = recipient ? bson_strdup(recipient) : NULL;
    e->expires_ms = now_ms + ttl_ms;
    *slot = e;
    lru_push_front(l, e);
    l->len++;
    while (l->len > cap && l->tail) {
        remove_entry(l, l->tail);
    }
}

/* ---- Query ------------------------------------------------------------------------------ */

typedef enum query_result {
    Q_FOUND = 0,
    Q_NOT_FOUND,
    Q_ERROR,
} query_result_t;

static query_result_t query_once(mc__recipient_lookup_t *l, mongoc_client_t *client,
                                 const bson_value_t *key, char **recipient, bson_error_t *err)
{
    const mc_recipient_lookup_t *c = l->cfg;
    const char *field = c->field && *c->field ? c->field : "_id";
    bson_t filter = BSON_INITIALIZER, eq, opts = BSON_INITIALIZER, proj;
    bson_append_document_begin(&filter, field, -1, &eq);
    bson_append_value(&eq, "$eq", 3, key);
    bson_append_document_end(&filter, &eq);
    bson_append_document_begin(&opts, "projection", -1, &proj);
    BSON_APPEND_INT32(&proj, c->recipient, 1);
    bson_append_document_end(&opts, &proj);
    BSON_APPEND_INT64(&opts, "limit", 1);
    BSON_APPEND_BOOL(&opts, "singleBatch", true);
    BSON_APPEND_INT64(&opts, "maxTimeMS", QUERY_MAX_TIME_MS);

    mongoc_collection_t *coll = mongoc_client_get_collection(client, c->db, c->collection);
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, &opts, NULL);
    const bson_t *doc;
    query_result_t res;
    if (mongoc_cursor_next(cur, &doc)) {
        *recipient = mc__recipient_resolve(doc, c->recipient);
        res = Q_FOUND;
    } else if (mongoc_cursor_error(cur, err)) {
        res = Q_ERROR;
    } else {
        res = Q_NOT_FOUND;
    }
    mongoc_cursor_destroy(cur);
    mongoc_collection_destroy(coll);
    bson_destroy(&filter);
    bson_destroy(&opts);
    return res;
}

static bool is_stopping(const atomic_bool *stopping)
{
    return stopping && atomic_load(stopping);
}

char *mc__recipient_lookup_resolve(mc__recipient_lookup_t *l, mongoc_client_t *client,
                                   const bson_t *change, const char *path,
                                   const atomic_bool *stopping)
{
    bson_iter_t found;
    if (!l || !client || !mc__recipient_find(change, path, &found)) {
        return NULL;
    }
    const bson_value_t *key = bson_iter_value(&found);
    if (!usable_key(key)) {
        mc_log_ratelimited(&l->rl_miss, MC_LOG_INFO, "recipient",
                           "lookup skipped stream=%s: the value at %s is not a usable key "
                           "(type 0x%02x); event goes to admins only",
                           l->stream, path, (unsigned)key->value_type);
        return NULL;
    }
    int64_t now = mc__now_ms();
    const char *cached = NULL;
    if (mc__lookup_cache_get(l, key, now, &cached)) {
        l->stats.hits++;
        return cached ? bson_strdup(cached) : NULL;
    }
    l->stats.misses++;
    bson_error_t err;
    memset(&err, 0, sizeof(err));
    for (int attempt = 0; attempt < QUERY_ATTEMPTS; attempt++) {
        if (attempt > 0) {
            if (is_stopping(stopping)) {
                break;
            }
            struct timespec ts = {0, 100000000L * attempt};
            nanosleep(&ts, NULL);
        }
        char *recipient = NULL;
        l->stats.queries++;
        query_result_t q = query_once(l, client, key, &recipient, &err);
        if (q == Q_ERROR) {
            l->stats.query_errors++;
            continue;
        }
        now = mc__now_ms();
        if (q == Q_NOT_FOUND || !recipient) {
            l->stats.not_found++;
            mc_log_ratelimited(&l->rl_miss, MC_LOG_WARN, "recipient",
                               "lookup miss stream=%s ns=%s.%s: %s; event goes to admins only",
                               l->stream, l->cfg->db, l->cfg->collection,
                               q == Q_NOT_FOUND ? "no matching document"
                                                : "document has no usable recipient field");
            mc__lookup_cache_put(l, key, NULL, now, MC__LOOKUP_NEGATIVE_TTL_MS);
            return NULL;
        }
        mc__lookup_cache_put(l, key, recipient, now, MC__LOOKUP_TTL_MS);
        return recipient;
    }
    mc_log_ratelimited(&l->rl_error, MC_LOG_WARN, "recipient",
                       "lookup failed stream=%s ns=%s.%s: %s; event goes to admins only", l->stream,
                       l->cfg->db, l->cfg->collection, err.message);
    return NULL;
}
