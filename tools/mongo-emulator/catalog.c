/*
 * catalog.c: the in-memory catalog of mongo-emulator (databases -> collections -> documents,
 * indexes) and the DDL commands over it (create, collMod, drop, dropDatabase,
 * renameCollection, listCollections, listDatabases, createIndexes, listIndexes, dropIndexes,
 * collStats, dbStats), with the change events each DDL change records: drop, rename (with the
 * operationDescription showExpandedEvents shows) and MongoDB 6.0's expanded events create,
 * createIndexes, dropIndexes and modify.
 *
 * Known differences: views are definitions only. `create` with viewOn stores one (listed by
 * listCollections, removed by drop and dropDatabase, reported to showExpandedEvents database
 * and cluster streams), but every command that needs a collection refuses a view with 166
 * instead of reading or writing through its pipeline, and collMod of a view is refused. Time
 * series and clustered collections are refused (20).
 *
 * Runs on connection threads with srv->lock held. Invariants: a database exists exactly while
 * it has a collection; every collection has the _id_ index first; every live document has an
 * _id, and every unique index (including _id_) holds exactly one entry per live document it
 * covers, so a lookup is a hash probe; documents stay in insertion order (updates keep their
 * slot), and deleted slots are reclaimed only by emu_coll_maybe_compact, which callers run
 * once they hold no slot numbers.
 */
#include "core.h"

#include "changestream.h"
#include "mongocast/identity.h"

#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct emu_index_entry {
    uint64_t hash;
    uint32_t slot; /* EMPTY_SLOT: free */
};

#define EMPTY_SLOT UINT32_MAX
#define MAX_INDEXES 64

/* A view: a definition only (see the file comment). */
typedef struct emu_view {
    char *db;
    char *name;
    bson_t *def; /* {viewOn, pipeline}, as listCollections shows its options */
    struct emu_view *next;
} emu_view_t;

struct emu_catalog {
    emu_db_t *dbs;
    emu_view_t *views;
    uint64_t rng;
};

/* ---- key encoding ---- */

/* Canonical bytes of an index key: values that MongoDB considers equal in an index (1, 1L,
 * 1.0; null and missing) encode identically. Inline storage covers ordinary keys without a
 * heap allocation. */
typedef struct keybuf {
    uint8_t *p;
    size_t len;
    size_t cap;
    bool oom;
    uint8_t inline_[192];
} keybuf_t;

static void kb_init(keybuf_t *k)
{
    k->p = k->inline_;
    k->len = 0;
    k->cap = sizeof(k->inline_);
    k->oom = false;
}

static void kb_free(keybuf_t *k)
{
    if (k->p != k->inline_) {
        bson_free(k->p);
    }
    kb_init(k);
}

static void kb_put(keybuf_t *k, const void *data, size_t n)
{
    if (k->oom) {
        return;
    }
    if (k->len + n > k->cap) {
        size_t cap = k->cap * 2;
        uint8_t *np;
        while (cap < k->len + n) {
            cap *= 2;
        }
        np = bson_malloc(cap);
        memcpy(np, k->p, k->len);
        if (k->p != k->inline_) {
            bson_free(k->p);
        }
        k->p = np;
        k->cap = cap;
    }
    memcpy(k->p + k->len, data, n);
    k->len += n;
}

static void kb_tag(keybuf_t *k, char tag)
{
    uint8_t t = (uint8_t)tag;
    kb_put(k, &t, 1);
}

static void kb_u32(keybuf_t *k, uint32_t v)
{
    kb_put(k, &v, sizeof(v));
}

/* Length first, so that adjacent variable-length values cannot run into each other ("ab", "c"
 * and "a", "bc" encode differently). */
static void kb_counted(keybuf_t *k, const void *data, uint32_t n)
{
    kb_u32(k, n);
    kb_put(k, data, n);
}

static void kb_value(keybuf_t *k, const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_INT32: {
        int64_t i = v->value.v_int32;
        kb_tag(k, 'I');
        kb_put(k, &i, sizeof(i));
        break;
    }
    case BSON_TYPE_INT64:
        kb_tag(k, 'I');
        kb_put(k, &v->value.v_int64, sizeof(int64_t));
        break;
    case BSON_TYPE_DOUBLE: {
        double d = v->value.v_double;
        if (isnan(d)) {
            kb_tag(k, 'n');
        } else if (d == floor(d) && d >= -9.2e18 && d <= 9.2e18) {
            int64_t i = (int64_t)d;
            kb_tag(k, 'I');
            kb_put(k, &i, sizeof(i));
        } else {
            kb_tag(k, 'D');
            kb_put(k, &d, sizeof(d));
        }
        break;
    }
    case BSON_TYPE_DECIMAL128: {
        /* An integral decimal is the same index key as that int or double (MongoDB compares
         * numbers by value: {_id: NumberDecimal("7")} finds _id 7). Other decimals keep
         * their bits, so a fractional decimal and an equal double still differ here. */
        mc_identity_t id;
        if (mc_identity_from_value(v, &id) && id.len == 9 && id.bytes[0] == 'i') {
            uint64_t u = 0;
            for (int b = 1; b < 9; b++) {
                u = (u << 8) | id.bytes[b];
            }
            int64_t i = (int64_t)u;
            kb_tag(k, 'I');
            kb_put(k, &i, sizeof(i));
            break;
        }
        kb_tag(k, 'X');
        kb_put(k, &v->value.v_decimal128, sizeof(v->value.v_decimal128));
        break;
    }
    case BSON_TYPE_UTF8:
        kb_tag(k, 'S');
        kb_counted(k, v->value.v_utf8.str, v->value.v_utf8.len);
        break;
    case BSON_TYPE_SYMBOL:
        kb_tag(k, 'S');
        kb_counted(k, v->value.v_symbol.symbol, v->value.v_symbol.len);
        break;
    case BSON_TYPE_NULL:
    case BSON_TYPE_UNDEFINED:
    case BSON_TYPE_EOD: kb_tag(k, 'z'); break;
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY:
        kb_tag(k, v->value_type == BSON_TYPE_DOCUMENT ? 'd' : 'a');
        kb_counted(k, v->value.v_doc.data, v->value.v_doc.data_len);
        break;
    case BSON_TYPE_BINARY:
        kb_tag(k, 'b');
        kb_tag(k, (char)v->value.v_binary.subtype);
        kb_counted(k, v->value.v_binary.data, v->value.v_binary.data_len);
        break;
    case BSON_TYPE_OID:
        kb_tag(k, 'o');
        kb_put(k, v->value.v_oid.bytes, 12);
        break;
    case BSON_TYPE_BOOL: kb_tag(k, v->value.v_bool ? 'T' : 'F'); break;
    case BSON_TYPE_DATE_TIME:
        kb_tag(k, 't');
        kb_put(k, &v->value.v_datetime, sizeof(int64_t));
        break;
    case BSON_TYPE_TIMESTAMP:
        kb_tag(k, 'p');
        kb_u32(k, v->value.v_timestamp.timestamp);
        kb_u32(k, v->value.v_timestamp.increment);
        break;
    case BSON_TYPE_REGEX:
        kb_tag(k, 'r');
        kb_put(k, v->value.v_regex.regex, strlen(v->value.v_regex.regex) + 1);
        kb_put(k, v->value.v_regex.options, strlen(v->value.v_regex.options) + 1);
        break;
    case BSON_TYPE_CODE:
        kb_tag(k, 'c');
        kb_counted(k, v->value.v_code.code, v->value.v_code.code_len);
        break;
    case BSON_TYPE_CODEWSCOPE:
        kb_tag(k, 'w');
        kb_counted(k, v->value.v_codewscope.code, v->value.v_codewscope.code_len);
        kb_put(k, v->value.v_codewscope.scope_data, v->value.v_codewscope.scope_len);
        break;
    case BSON_TYPE_DBPOINTER:
        kb_tag(k, 'P');
        kb_put(k, v->value.v_dbpointer.collection, v->value.v_dbpointer.collection_len);
        kb_put(k, v->value.v_dbpointer.oid.bytes, 12);
        break;
    case BSON_TYPE_MINKEY: kb_tag(k, 'm'); break;
    case BSON_TYPE_MAXKEY: kb_tag(k, 'M'); break;
    default: kb_tag(k, '?'); break;
    }
}

static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h ^ (h >> 29);
}

/* The key of `doc` in index `ix`. Returns false when the index does not cover the document
 * (sparse and every field missing, or a partial filter that does not match). */
static bool index_key(const emu_index_t *ix, const bson_t *doc, keybuf_t *k)
{
    bson_iter_t kit;
    bool any_present = false;

    if (ix->partial && !mc_filter_match(ix->partial, doc)) {
        return false;
    }
    bson_iter_init(&kit, &ix->key);
    while (bson_iter_next(&kit)) {
        bson_iter_t it, found;
        const char *path = bson_iter_key(&kit);
        if (bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &found)) {
            kb_value(k, bson_iter_value(&found));
            any_present = true;
        } else {
            kb_tag(k, 'z');
        }
    }
    return any_present || !ix->sparse;
}

static void id_key(const bson_value_t *id, keybuf_t *k)
{
    kb_value(k, id);
}

/* ---- unique index hash tables ---- */

static void hash_init(emu_index_hash_t *h)
{
    h->entries = NULL;
    h->cap = 0;
    h->used = 0;
}

static void hash_free(emu_index_hash_t *h)
{
    bson_free(h->entries);
    hash_init(h);
}

static void hash_put_raw(emu_index_hash_t *h, uint64_t hash, uint32_t slot)
{
    size_t mask = h->cap - 1;
    size_t i = hash & mask;
    while (h->entries[i].slot != EMPTY_SLOT) {
        i = (i + 1) & mask;
    }
    h->entries[i].hash = hash;
    h->entries[i].slot = slot;
    h->used++;
}

static void hash_grow(emu_index_hash_t *h)
{
    struct emu_index_entry *old = h->entries;
    size_t old_cap = h->cap;
    size_t cap = old_cap ? old_cap * 2 : 64;

    h->entries = bson_malloc(cap * sizeof(*h->entries));
    for (size_t i = 0; i < cap; i++) {
        h->entries[i].slot = EMPTY_SLOT;
    }
    h->cap = cap;
    h->used = 0;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].slot != EMPTY_SLOT) {
            hash_put_raw(h, old[i].hash, old[i].slot);
        }
    }
    bson_free(old);
}

static void hash_put(emu_index_hash_t *h, uint64_t hash, uint32_t slot)
{
    if ((h->used + 1) * 2 > h->cap) {
        hash_grow(h);
    }
    hash_put_raw(h, hash, slot);
}

static void hash_remove_slot(emu_index_hash_t *h, uint64_t hash, uint32_t slot)
{
    size_t mask, i, j;

    if (h->cap == 0) {
        return;
    }
    mask = h->cap - 1;
    i = hash & mask;
    while (h->entries[i].slot != slot) {
        if (h->entries[i].slot == EMPTY_SLOT) {
            return;
        }
        i = (i + 1) & mask;
    }
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    j = i;
    for (;;) {
        size_t k;
        j = (j + 1) & mask;
        if (h->entries[j].slot == EMPTY_SLOT) {
            break;
        }
        k = h->entries[j].hash & mask;
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) {
            continue;
        }
        h->entries[i] = h->entries[j];
        i = j;
    }
    h->entries[i].slot = EMPTY_SLOT;
    h->used--;
}

static long hash_find(const emu_coll_t *c, const emu_index_t *ix, const keybuf_t *key,
                      uint64_t hash, long exclude)
{
    size_t mask, i;

    if (ix->hash.cap == 0) {
        return -1;
    }
    mask = ix->hash.cap - 1;
    for (i = hash & mask; ix->hash.entries[i].slot != EMPTY_SLOT; i = (i + 1) & mask) {
        const struct emu_index_entry *e = &ix->hash.entries[i];
        if (e->hash == hash && (long)e->slot != exclude) {
            bson_t doc;
            keybuf_t other;
            bool same;
            emu_doc_view(&c->docs[e->slot], &doc);
            kb_init(&other);
            if (ix == c->indexes[0]) {
                bson_iter_t it;
                if (bson_iter_init_find(&it, &doc, "_id")) {
                    id_key(bson_iter_value(&it), &other);
                }
            } else {
                index_key(ix, &doc, &other);
            }
            same = other.len == key->len && memcmp(other.p, key->p, key->len) == 0;
            kb_free(&other);
            if (same) {
                return (long)e->slot;
            }
        }
    }
    return -1;
}

/* The key of doc for index i of c; false when not covered. */
static bool coll_key(const emu_coll_t *c, size_t i, const bson_t *doc, keybuf_t *k)
{
    if (i == 0) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "_id")) {
            return false;
        }
        id_key(bson_iter_value(&it), k);
        return true;
    }
    return index_key(c->indexes[i], doc, k);
}

/* ---- E11000 ---- */

static void append_fmt(char *buf, size_t size, size_t *pos, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static void append_fmt(char *buf, size_t size, size_t *pos, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (*pos >= size) {
        return;
    }
    va_start(ap, fmt);
    n = vsnprintf(buf + *pos, size - *pos, fmt, ap);
    va_end(ap);
    if (n > 0) {
        *pos += (size_t)n;
    }
}

void emu_format_key_value(const bson_t *key_value, char *buf, size_t size)
{
    bson_iter_t it;
    size_t pos = 0;
    bool first = true;

    buf[0] = '\0';
    append_fmt(buf, size, &pos, "{ ");
    if (bson_iter_init(&it, key_value)) {
        while (bson_iter_next(&it)) {
            append_fmt(buf, size, &pos, "%s%s: ", first ? "" : ", ", bson_iter_key(&it));
            first = false;
            switch (bson_iter_type(&it)) {
            case BSON_TYPE_UTF8:
                append_fmt(buf, size, &pos, "\"%s\"", bson_iter_utf8(&it, NULL));
                break;
            case BSON_TYPE_INT32: append_fmt(buf, size, &pos, "%d", bson_iter_int32(&it)); break;
            case BSON_TYPE_INT64:
                append_fmt(buf, size, &pos, "%lld", (long long)bson_iter_int64(&it));
                break;
            case BSON_TYPE_DOUBLE: append_fmt(buf, size, &pos, "%g", bson_iter_double(&it)); break;
            case BSON_TYPE_NULL: append_fmt(buf, size, &pos, "null"); break;
            case BSON_TYPE_BOOL:
                append_fmt(buf, size, &pos, "%s", bson_iter_bool(&it) ? "true" : "false");
                break;
            case BSON_TYPE_OID: {
                char hex[25];
                bson_oid_to_string(bson_iter_oid(&it), hex);
                append_fmt(buf, size, &pos, "ObjectId('%s')", hex);
                break;
            }
            default: {
                bson_t one = BSON_INITIALIZER;
                char *json;
                bson_append_iter(&one, "v", 1, &it);
                json = bson_as_relaxed_extended_json(&one, NULL);
                /* json is { "v" : <value> }: keep just the value */
                if (json && strlen(json) > 10) {
                    size_t l = strlen(json);
                    append_fmt(buf, size, &pos, "%.*s", (int)(l - 10), json + 8);
                }
                bson_free(json);
                bson_destroy(&one);
                break;
            }
            }
        }
    }
    append_fmt(buf, size, &pos, " }");
}

static int dup_error(const emu_coll_t *c, size_t ix, const bson_t *doc, bson_t *dup,
                     mc_error_t *err)
{
    const emu_index_t *index = c->indexes[ix];
    bson_t kv = BSON_INITIALIZER;
    bson_iter_t kit;
    char text[1024];

    bson_iter_init(&kit, &index->key);
    while (bson_iter_next(&kit)) {
        bson_iter_t it, found;
        const char *path = bson_iter_key(&kit);
        if (bson_iter_init(&it, doc) && bson_iter_find_descendant(&it, path, &found)) {
            bson_append_value(&kv, path, -1, bson_iter_value(&found));
        } else {
            bson_append_null(&kv, path, -1);
        }
    }
    emu_format_key_value(&kv, text, sizeof(text));
    if (dup) {
        BSON_APPEND_DOCUMENT(dup, "keyPattern", &index->key);
        BSON_APPEND_DOCUMENT(dup, "keyValue", &kv);
    }
    bson_destroy(&kv);
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 11000,
                        "E11000 duplicate key error collection: %s index: %s dup key: %s", c->ns,
                        index->name, text);
}

/* ---- documents ---- */

long emu_coll_find_id(const emu_coll_t *coll, const bson_value_t *id)
{
    keybuf_t k;
    long slot;
    kb_init(&k);
    id_key(id, &k);
    slot = hash_find(coll, coll->indexes[0], &k, hash_bytes(k.p, k.len), -1);
    kb_free(&k);
    return slot;
}

/* Checks every unique index for a conflict with `doc` stored at `self` (or a new slot). */
static int check_unique(const emu_coll_t *c, const bson_t *doc, long self, uint64_t *hashes,
                        bool *covered, bson_t *dup, mc_error_t *err)
{
    for (size_t i = 0; i < c->n_indexes; i++) {
        keybuf_t k;
        covered[i] = false;
        if (!c->indexes[i]->unique) {
            continue;
        }
        kb_init(&k);
        if (coll_key(c, i, doc, &k)) {
            covered[i] = true;
            hashes[i] = hash_bytes(k.p, k.len);
            if (hash_find(c, c->indexes[i], &k, hashes[i], self) >= 0) {
                kb_free(&k);
                return dup_error(c, i, doc, dup, err);
            }
        }
        kb_free(&k);
    }
    return 0;
}

static void unindex_slot(emu_coll_t *c, size_t slot)
{
    bson_t doc;
    emu_doc_view(&c->docs[slot], &doc);
    for (size_t i = 0; i < c->n_indexes; i++) {
        keybuf_t k;
        if (!c->indexes[i]->unique) {
            continue;
        }
        kb_init(&k);
        if (coll_key(c, i, &doc, &k)) {
            hash_remove_slot(&c->indexes[i]->hash, hash_bytes(k.p, k.len), (uint32_t)slot);
        }
        kb_free(&k);
    }
}

int emu_coll_insert(emu_coll_t *c, const bson_t *doc, bson_t *dup, mc_error_t *err)
{
    uint64_t hashes[MAX_INDEXES];
    bool covered[MAX_INDEXES];
    bson_iter_t it;
    int rc;
    size_t slot;

    if (!bson_iter_init_find(&it, doc, "_id")) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 2, "document has no _id");
    }
    if (c->n_slots >= EMPTY_SLOT - 1) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGODB, 146, "collection is full");
    }
    rc = check_unique(c, doc, -1, hashes, covered, dup, err);
    if (rc) {
        return rc;
    }
    if (c->n_slots == c->cap_slots) {
        size_t cap = c->cap_slots ? c->cap_slots * 2 : 16;
        c->docs = bson_realloc(c->docs, cap * sizeof(*c->docs));
        c->cap_slots = cap;
    }
    slot = c->n_slots++;
    c->docs[slot].data = bson_malloc(doc->len);
    memcpy(c->docs[slot].data, bson_get_data(doc), doc->len);
    c->docs[slot].len = doc->len;
    c->n_live++;
    c->data_bytes += doc->len;
    for (size_t i = 0; i < c->n_indexes; i++) {
        if (covered[i]) {
            hash_put(&c->indexes[i]->hash, hashes[i], (uint32_t)slot);
        }
    }
    return 0;
}

int emu_coll_replace(emu_coll_t *c, size_t slot, const bson_t *doc, bson_t *dup, mc_error_t *err)
{
    uint64_t hashes[MAX_INDEXES];
    bool covered[MAX_INDEXES];
    int rc = check_unique(c, doc, (long)slot, hashes, covered, dup, err);

    if (rc) {
        return rc;
    }
    unindex_slot(c, slot);
    c->data_bytes -= c->docs[slot].len;
    if (c->docs[slot].len != doc->len) {
        c->docs[slot].data = bson_realloc(c->docs[slot].data, doc->len);
    }
    memcpy(c->docs[slot].data, bson_get_data(doc), doc->len);
    c->docs[slot].len = doc->len;
    c->data_bytes += doc->len;
    for (size_t i = 0; i < c->n_indexes; i++) {
        if (covered[i]) {
            hash_put(&c->indexes[i]->hash, hashes[i], (uint32_t)slot);
        }
    }
    return 0;
}

void emu_coll_delete(emu_coll_t *c, size_t slot)
{
    if (slot >= c->n_slots || !c->docs[slot].data) {
        return;
    }
    unindex_slot(c, slot);
    c->data_bytes -= c->docs[slot].len;
    bson_free(c->docs[slot].data);
    c->docs[slot].data = NULL;
    c->docs[slot].len = 0;
    c->n_live--;
}

static void rebuild_index(emu_coll_t *c, size_t i)
{
    emu_index_t *ix = c->indexes[i];
    hash_free(&ix->hash);
    for (size_t s = 0; s < c->n_slots; s++) {
        bson_t doc;
        keybuf_t k;
        if (!c->docs[s].data) {
            continue;
        }
        emu_doc_view(&c->docs[s], &doc);
        kb_init(&k);
        if (coll_key(c, i, &doc, &k)) {
            hash_put(&ix->hash, hash_bytes(k.p, k.len), (uint32_t)s);
        }
        kb_free(&k);
    }
}

void emu_coll_maybe_compact(emu_coll_t *c)
{
    size_t dead = c->n_slots - c->n_live;
    size_t w = 0;

    if (c->n_live == 0) {
        for (size_t i = 0; i < c->n_indexes; i++) {
            hash_free(&c->indexes[i]->hash);
        }
        c->n_slots = 0;
        return;
    }
    if (dead < 1024 || dead < c->n_live) {
        return;
    }
    for (size_t s = 0; s < c->n_slots; s++) {
        if (c->docs[s].data) {
            c->docs[w++] = c->docs[s];
        }
    }
    c->n_slots = w;
    for (size_t i = 0; i < c->n_indexes; i++) {
        if (c->indexes[i]->unique) {
            rebuild_index(c, i);
        }
    }
}

/* ---- indexes ---- */

static void index_destroy(emu_index_t *ix)
{
    if (!ix) {
        return;
    }
    bson_free(ix->name);
    bson_destroy(&ix->key);
    bson_destroy(&ix->spec);
    mc_filter_destroy(ix->partial);
    hash_free(&ix->hash);
    free(ix);
}

static emu_index_t *id_index_new(void)
{
    emu_index_t *ix = emu_zalloc_aligned(sizeof(*ix));
    ix->name = bson_strdup("_id_");
    bson_init(&ix->key);
    BSON_APPEND_INT32(&ix->key, "_id", 1);
    bson_init(&ix->spec);
    BSON_APPEND_INT32(&ix->spec, "v", 2);
    BSON_APPEND_DOCUMENT(&ix->spec, "key", &ix->key);
    BSON_APPEND_UTF8(&ix->spec, "name", "_id_");
    ix->unique = true;
    hash_init(&ix->hash);
    return ix;
}

const char *emu_coll_index_by_key(const emu_coll_t *c, const bson_t *key)
{
    for (size_t i = 0; i < c->n_indexes; i++) {
        if (bson_equal(&c->indexes[i]->key, key)) {
            return c->indexes[i]->name;
        }
    }
    return NULL;
}

/* Same expireAfterSeconds (by value, or both absent) in an index's stored spec and a request. */
static bool same_expiry(const bson_t *have, const bson_t *want)
{
    bson_iter_t a, b;
    bool ha = bson_iter_init_find(&a, have, "expireAfterSeconds");
    bool hb = bson_iter_init_find(&b, want, "expireAfterSeconds");
    if (ha != hb) {
        return false;
    }
    return !ha || bson_iter_as_int64(&a) == bson_iter_as_int64(&b);
}

static void default_index_name(const bson_t *key, char *buf, size_t size)
{
    bson_iter_t it;
    size_t pos = 0;
    buf[0] = '\0';
    bson_iter_init(&it, key);
    while (bson_iter_next(&it)) {
        if (BSON_ITER_HOLDS_UTF8(&it)) {
            append_fmt(buf, size, &pos, "%s%s_%s", pos ? "_" : "", bson_iter_key(&it),
                       bson_iter_utf8(&it, NULL));
        } else {
            append_fmt(buf, size, &pos, "%s%s_%lld", pos ? "_" : "", bson_iter_key(&it),
                       (long long)bson_iter_as_int64(&it));
        }
    }
}

static bool spec_flag(const bson_t *spec, const char *name)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, spec, name) && bson_iter_as_bool(&it);
}

int emu_coll_add_index(emu_coll_t *c, const bson_t *spec, bool *added, mc_error_t *err)
{
    bson_iter_t it;
    bson_t key;
    char namebuf[256];
    const char *name = NULL;
    emu_index_t *ix;

    *added = false;
    if (!bson_iter_init_find(&it, spec, "key") || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 9,
                            "Error in specification %s :: caused by :: The 'key' field is a "
                            "required property of an index specification",
                            "{}");
    }
    {
        const uint8_t *d;
        uint32_t l;
        bson_iter_document(&it, &l, &d);
        bson_init_static(&key, d, l);
    }
    if (bson_count_keys(&key) == 0) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 67, "Index keys cannot be empty.");
    }
    if (bson_iter_init_find(&it, spec, "name")) {
        if (!BSON_ITER_HOLDS_UTF8(&it)) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                                "The field 'name' must be a string");
        }
        name = bson_iter_utf8(&it, NULL);
    } else {
        default_index_name(&key, namebuf, sizeof(namebuf));
        name = namebuf;
    }
    if (!name[0]) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 67, "index name cannot be empty");
    }
    for (size_t i = 0; i < c->n_indexes; i++) {
        emu_index_t *o = c->indexes[i];
        bool same_key = bson_equal(&o->key, &key);
        bool same_name = strcmp(o->name, name) == 0;
        if (same_key && same_name) {
            if (i > 0 && o->unique != spec_flag(spec, "unique")) {
                return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 86,
                                    "An existing index has the same name as the requested "
                                    "index but different options. Requested index: %s",
                                    name);
            }
            if (i > 0 && !same_expiry(&o->spec, spec)) {
                /* mongod: IndexOptionsConflict, e.g. a TTL index asked for with another
                 * expiry (changing it takes collMod). */
                return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 85,
                                    "An equivalent index already exists with the same name but "
                                    "different options. Requested index: %s",
                                    name);
            }
            return 0;
        }
        if (same_name) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 86,
                                "An existing index has the same name as the requested index "
                                "but a different key. Index name: %s",
                                name);
        }
        if (same_key && i > 0) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 85,
                                "Index already exists with a different name: %s", o->name);
        }
        if (same_key) {
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 85,
                                "Index already exists with a different name: _id_");
        }
    }
    if (c->n_indexes >= MAX_INDEXES) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 67,
                            "add index fails, too many indexes for %s key:", c->ns);
    }
    ix = emu_zalloc_aligned(sizeof(*ix));
    ix->name = bson_strdup(name);
    bson_copy_to(&key, &ix->key);
    ix->unique = spec_flag(spec, "unique");
    ix->sparse = spec_flag(spec, "sparse");
    hash_init(&ix->hash);
    if (bson_iter_init_find(&it, spec, "partialFilterExpression")) {
        bson_t pf;
        const uint8_t *d;
        uint32_t l;
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            index_destroy(ix);
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                                "partialFilterExpression must be an object");
        }
        bson_iter_document(&it, &l, &d);
        bson_init_static(&pf, d, l);
        ix->partial = mc_filter_new(&pf, NULL, err);
        if (!ix->partial) {
            index_destroy(ix);
            return MC_EINVAL;
        }
    }
    /* listIndexes shows v, key, name, then the remaining options as given */
    bson_init(&ix->spec);
    BSON_APPEND_INT32(&ix->spec, "v", 2);
    BSON_APPEND_DOCUMENT(&ix->spec, "key", &ix->key);
    BSON_APPEND_UTF8(&ix->spec, "name", ix->name);
    bson_iter_init(&it, spec);
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strcmp(k, "key") && strcmp(k, "name") && strcmp(k, "v") && strcmp(k, "ns")) {
            bson_append_iter(&ix->spec, k, -1, &it);
        }
    }
    c->indexes = bson_realloc(c->indexes, (c->n_indexes + 1) * sizeof(*c->indexes));
    c->indexes[c->n_indexes++] = ix;
    if (ix->unique) {
        /* Build it, refusing existing duplicates as a real server does. */
        size_t i = c->n_indexes - 1;
        for (size_t s = 0; s < c->n_slots; s++) {
            bson_t doc;
            keybuf_t k;
            if (!c->docs[s].data) {
                continue;
            }
            emu_doc_view(&c->docs[s], &doc);
            kb_init(&k);
            if (coll_key(c, i, &doc, &k)) {
                uint64_t h = hash_bytes(k.p, k.len);
                if (hash_find(c, ix, &k, h, -1) >= 0) {
                    int rc;
                    kb_free(&k);
                    rc = dup_error(c, i, &doc, NULL, err);
                    c->n_indexes--;
                    index_destroy(ix);
                    return rc;
                }
                hash_put(&ix->hash, h, (uint32_t)s);
            }
            kb_free(&k);
        }
    }
    *added = true;
    return 0;
}

int emu_coll_drop_index(emu_coll_t *c, const char *name, mc_error_t *err)
{
    if (strcmp(name, "_id_") == 0) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 72, "cannot drop _id index");
    }
    for (size_t i = 1; i < c->n_indexes; i++) {
        if (strcmp(c->indexes[i]->name, name) == 0) {
            index_destroy(c->indexes[i]);
            memmove(&c->indexes[i], &c->indexes[i + 1],
                    (c->n_indexes - i - 1) * sizeof(*c->indexes));
            c->n_indexes--;
            return 0;
        }
    }
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 27, "index not found with name [%s]",
                        name);
}

/* ---- catalog ---- */

emu_catalog_t *emu_catalog_new(void)
{
    emu_catalog_t *cat = bson_malloc0(sizeof(*cat));
    cat->rng = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)cat;
    return cat;
}

static void coll_destroy(emu_coll_t *c)
{
    if (!c) {
        return;
    }
    for (size_t s = 0; s < c->n_slots; s++) {
        bson_free(c->docs[s].data);
    }
    bson_free(c->docs);
    for (size_t i = 0; i < c->n_indexes; i++) {
        index_destroy(c->indexes[i]);
    }
    bson_free(c->indexes);
    bson_destroy(&c->options);
    bson_free(c->name);
    bson_free(c->ns);
    free(c);
}

static void db_destroy(emu_db_t *d)
{
    while (d->colls) {
        emu_coll_t *n = d->colls->next;
        coll_destroy(d->colls);
        d->colls = n;
    }
    bson_free(d->name);
    bson_free(d);
}

static void view_free(emu_view_t *v)
{
    bson_free(v->db);
    bson_free(v->name);
    bson_destroy(v->def);
    bson_free(v);
}

void emu_catalog_destroy(emu_catalog_t *cat)
{
    if (!cat) {
        return;
    }
    while (cat->dbs) {
        emu_db_t *n = cat->dbs->next;
        db_destroy(cat->dbs);
        cat->dbs = n;
    }
    while (cat->views) {
        emu_view_t *n = cat->views->next;
        view_free(cat->views);
        cat->views = n;
    }
    bson_free(cat);
}

int emu_check_db_name(const char *db, mc_error_t *err)
{
    size_t n = strlen(db);
    if (n == 0 || n >= 64 || strpbrk(db, "/\\. \"$")) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 73, "Invalid database name: '%s'",
                            db);
    }
    return 0;
}

int emu_check_coll_name(const char *coll, mc_error_t *err)
{
    if (!coll[0]) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 73,
                            "Invalid namespace specified: collection name is empty");
    }
    if (strchr(coll, '$') || coll[0] == '.' || strlen(coll) > 255) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 73, "Invalid collection name: %s",
                            coll);
    }
    return 0;
}

emu_db_t *emu_catalog_first_db(emu_server_t *srv)
{
    return srv->catalog->dbs;
}

emu_db_t *emu_catalog_db(emu_server_t *srv, const char *db)
{
    for (emu_db_t *d = srv->catalog->dbs; d; d = d->next) {
        if (strcmp(d->name, db) == 0) {
            return d;
        }
    }
    return NULL;
}

emu_coll_t *emu_catalog_coll(emu_server_t *srv, const char *db, const char *coll)
{
    emu_db_t *d = emu_catalog_db(srv, db);
    if (!d) {
        return NULL;
    }
    for (emu_coll_t *c = d->colls; c; c = c->next) {
        if (strcmp(c->name, coll) == 0) {
            return c;
        }
    }
    return NULL;
}

static uint64_t next_random(emu_catalog_t *cat)
{
    /* xorshift64*: UUIDs only need to be distinct, not secret */
    cat->rng ^= cat->rng >> 12;
    cat->rng ^= cat->rng << 25;
    cat->rng ^= cat->rng >> 27;
    return cat->rng * UINT64_C(2685821657736338717);
}

static void new_uuid(emu_catalog_t *cat, uint8_t uuid[16])
{
    uint64_t a = next_random(cat), b = next_random(cat);
    memcpy(uuid, &a, 8);
    memcpy(uuid + 8, &b, 8);
    uuid[6] = (uint8_t)((uuid[6] & 0x0f) | 0x40);
    uuid[8] = (uint8_t)((uuid[8] & 0x3f) | 0x80);
}

static void set_ns(emu_coll_t *c, const char *db)
{
    bson_free(c->ns);
    c->ns = bson_strdup_printf("%s.%s", db, c->name);
}

static emu_db_t *db_get_or_create(emu_server_t *srv, const char *db)
{
    emu_db_t *d = emu_catalog_db(srv, db);
    emu_db_t **tail;
    if (d) {
        return d;
    }
    d = bson_malloc0(sizeof(*d));
    d->name = bson_strdup(db);
    for (tail = &srv->catalog->dbs; *tail; tail = &(*tail)->next) {
    }
    *tail = d;
    return d;
}

static void db_link_coll(emu_db_t *d, emu_coll_t *c)
{
    emu_coll_t **tail;
    c->next = NULL;
    for (tail = &d->colls; *tail; tail = &(*tail)->next) {
    }
    *tail = c;
}

/* Unlinks c from d; removes d from the catalog when it becomes empty. */
static void db_unlink_coll(emu_server_t *srv, emu_db_t *d, emu_coll_t *c)
{
    for (emu_coll_t **p = &d->colls; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    c->next = NULL;
    if (!d->colls) {
        for (emu_db_t **p = &srv->catalog->dbs; *p; p = &(*p)->next) {
            if (*p == d) {
                *p = d->next;
                break;
            }
        }
        db_destroy(d);
    }
}

/* ---- DDL events ---- */

/* Records a DDL change that carries an operationDescription (MongoDB 6.0's expanded events,
 * and rename's description). Everything is borrowed. */
static void record_ddl(emu_server_t *srv, emu_op_t op, const char *db, const char *coll,
                       const uint8_t *uuid, const bson_t *desc, const bson_t *state_before,
                       bool view)
{
    emu_change_t ch = {.op = op,
                       .db = db,
                       .coll = coll,
                       .coll_uuid = uuid,
                       .operation_description = desc,
                       .state_before = state_before,
                       .view = view};
    emu_oplog_append(srv, &ch);
}

/* {indexes: [spec]}: createIndexes and dropIndexes describe the indexes they touched. */
static void record_index_event(emu_server_t *srv, emu_op_t op, const char *db, const emu_coll_t *c,
                               const bson_t *const *specs, size_t n)
{
    bson_t desc = BSON_INITIALIZER, arr;
    BSON_APPEND_ARRAY_BEGIN(&desc, "indexes", &arr);
    for (size_t i = 0; i < n; i++) {
        char key[16];
        const char *k;
        bson_uint32_to_string((uint32_t)i, &k, key, sizeof(key));
        bson_append_document(&arr, k, -1, specs[i]);
    }
    bson_append_array_end(&desc, &arr);
    record_ddl(srv, op, db, c->name, c->uuid, &desc, NULL, false);
    bson_destroy(&desc);
}

/* ---- views ---- */

static emu_view_t *view_find(emu_server_t *srv, const char *db, const char *name)
{
    for (emu_view_t *v = srv->catalog->views; v; v = v->next) {
        if (strcmp(v->db, db) == 0 && strcmp(v->name, name) == 0) {
            return v;
        }
    }
    return NULL;
}

static void view_unlink(emu_server_t *srv, emu_view_t *v)
{
    for (emu_view_t **p = &srv->catalog->views; *p; p = &(*p)->next) {
        if (*p == v) {
            *p = v->next;
            return;
        }
    }
}

/* Drops a view: a drop event that only showExpandedEvents database and cluster streams see. */
static void view_drop(emu_server_t *srv, emu_view_t *v)
{
    view_unlink(srv, v);
    record_ddl(srv, EMU_OP_DROP, v->db, v->name, NULL, NULL, NULL, true);
    view_free(v);
}

/* create {viewOn, pipeline}: checks the definition, stores it and records a create event. */
static int view_create(emu_server_t *srv, const char *db, const char *name, const bson_t *cmd,
                       mc_error_t *err)
{
    bson_iter_t it;
    if (emu_check_db_name(db, err) || emu_check_coll_name(name, err)) {
        return MC_EINVAL;
    }
    if (!bson_iter_init_find(&it, cmd, "viewOn") || !BSON_ITER_HOLDS_UTF8(&it) ||
        !bson_iter_utf8(&it, NULL)[0]) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                            "'viewOn' option must be a non-empty string");
    }
    if (emu_catalog_coll(srv, db, name) || view_find(srv, db, name)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 48, "Namespace %s.%s already exists",
                            db, name);
    }
    bson_t *def = bson_new();
    BSON_APPEND_UTF8(def, "viewOn", bson_iter_utf8(&it, NULL));
    if (bson_iter_init_find(&it, cmd, "pipeline")) {
        if (!BSON_ITER_HOLDS_ARRAY(&it)) {
            bson_destroy(def);
            return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                                "'pipeline' option must be an array");
        }
        bson_append_iter(def, "pipeline", -1, &it);
    } else {
        bson_t empty;
        BSON_APPEND_ARRAY_BEGIN(def, "pipeline", &empty);
        bson_append_array_end(def, &empty);
    }
    emu_view_t *v = bson_malloc0(sizeof(*v));
    v->db = bson_strdup(db);
    v->name = bson_strdup(name);
    v->def = def;
    v->next = srv->catalog->views;
    srv->catalog->views = v;
    record_ddl(srv, EMU_OP_CREATE, db, name, NULL, def, NULL, true);
    return 0;
}

bool emu_catalog_refuse_view(emu_server_t *srv, const char *command, const char *db,
                             const bson_t *cmd, bson_t *reply)
{
    static const char *const on_collections[] = {
        "insert",        "update",      "delete",        "find",      "findAndModify",
        "findandmodify", "count",       "distinct",      "aggregate", "createIndexes",
        "dropIndexes",   "listIndexes", "deleteIndexes", "collStats"};
    bson_iter_t it;
    if (!srv->catalog->views || !bson_iter_init(&it, cmd) || !bson_iter_next(&it) ||
        !BSON_ITER_HOLDS_UTF8(&it)) {
        return false;
    }
    bool listed = false;
    for (size_t i = 0; i < sizeof(on_collections) / sizeof(on_collections[0]); i++) {
        listed = listed || strcmp(command, on_collections[i]) == 0;
    }
    const char *name = bson_iter_utf8(&it, NULL);
    if (!listed || !view_find(srv, db, name)) {
        return false;
    }
    emu_reply_error(reply, 166,
                    "Namespace %s.%s is a view, not a collection (mongo-emulator keeps view "
                    "definitions but does not read or write through them)",
                    db, name);
    return true;
}

/* A snapshot read at a time before a collection was created cannot see it
 * (SnapshotUnavailable). Creating takes a tick of its own, as the create entry does on a real
 * server, so that a read at the current cluster time right after it sees the collection. */
static void set_min_visible(emu_server_t *srv, emu_coll_t *c)
{
    emu_clock_tick(srv, &c->min_t, &c->min_i);
}

static bool images_option(const bson_t *options)
{
    bson_iter_t it;
    return options && bson_iter_init(&it, options) &&
           bson_iter_find_descendant(&it, "changeStreamPreAndPostImages.enabled", &it) &&
           bson_iter_as_bool(&it);
}

emu_coll_t *emu_catalog_create(emu_server_t *srv, const char *db, const char *coll,
                               const bson_t *options, mc_error_t *err)
{
    emu_db_t *d;
    emu_coll_t *c;

    if (emu_check_db_name(db, err) || emu_check_coll_name(coll, err)) {
        return NULL;
    }
    if (emu_catalog_coll(srv, db, coll) || view_find(srv, db, coll)) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 48, "Collection %s.%s already exists.", db,
                     coll);
        return NULL;
    }
    d = db_get_or_create(srv, db);
    c = emu_zalloc_aligned(sizeof(*c));
    c->name = bson_strdup(coll);
    set_ns(c, db);
    new_uuid(srv->catalog, c->uuid);
    if (options) {
        bson_copy_to(options, &c->options);
    } else {
        bson_init(&c->options);
    }
    c->images = images_option(options);
    c->indexes = bson_malloc(sizeof(*c->indexes));
    c->indexes[0] = id_index_new();
    c->n_indexes = 1;
    set_min_visible(srv, c);
    db_link_coll(d, c);
    /* MongoDB's create oplog entry: the options, then the _id index. */
    bson_t desc;
    bson_copy_to(&c->options, &desc);
    BSON_APPEND_DOCUMENT(&desc, "idIndex", &c->indexes[0]->spec);
    record_ddl(srv, EMU_OP_CREATE, db, coll, c->uuid, &desc, NULL, false);
    bson_destroy(&desc);
    return c;
}

emu_coll_t *emu_catalog_coll_get_or_create(emu_server_t *srv, const char *db, const char *coll,
                                           bool *created, mc_error_t *err)
{
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    if (created) {
        *created = false;
    }
    if (c) {
        return c;
    }
    if (view_find(srv, db, coll)) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 166,
                     "Namespace %s.%s is a view, not a collection", db, coll);
        return NULL;
    }
    c = emu_catalog_create(srv, db, coll, NULL, err);
    if (c && created) {
        *created = true;
    }
    return c;
}

static void record_drop(emu_server_t *srv, const char *db, const emu_coll_t *c)
{
    emu_change_t ch;
    memset(&ch, 0, sizeof(ch));
    ch.op = EMU_OP_DROP;
    ch.db = db;
    ch.coll = c->name;
    ch.coll_uuid = c->uuid;
    ch.images_enabled = c->images;
    emu_oplog_append(srv, &ch);
}

void emu_catalog_drop(emu_server_t *srv, const char *db, emu_coll_t *c)
{
    emu_db_t *d = emu_catalog_db(srv, db);
    if (!d) {
        return;
    }
    record_drop(srv, db, c);
    emu_cursors_kill_ns(srv, c->ns);
    db_unlink_coll(srv, d, c);
    coll_destroy(c);
}

void emu_catalog_drop_database(emu_server_t *srv, const char *db)
{
    emu_db_t *d = emu_catalog_db(srv, db);
    emu_change_t ch;
    char *name;

    if (!d) {
        return;
    }
    name = bson_strdup(db); /* `db` may point into the database being destroyed */
    for (emu_view_t **p = &srv->catalog->views; *p;) {
        emu_view_t *v = *p;
        if (strcmp(v->db, name) == 0) {
            *p = v->next;
            view_free(v);
        } else {
            p = &v->next;
        }
    }
    while (d->colls) {
        emu_coll_t *c = d->colls;
        bool last = c->next == NULL;
        record_drop(srv, name, c);
        emu_cursors_kill_ns(srv, c->ns);
        db_unlink_coll(srv, d, c); /* frees d with its last collection */
        coll_destroy(c);
        if (last) {
            break;
        }
    }
    memset(&ch, 0, sizeof(ch));
    ch.op = EMU_OP_DROP_DATABASE;
    ch.db = name;
    emu_oplog_append(srv, &ch);
    bson_free(name);
}

int emu_catalog_rename(emu_server_t *srv, const char *db, const char *coll, const char *to_db,
                       const char *to_coll, bool drop_target, mc_error_t *err)
{
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    emu_coll_t *target;
    emu_db_t *from, *to;

    if (!c) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 26,
                            "Source collection %s.%s does not exist", db, coll);
    }
    if (emu_check_db_name(to_db, err) || emu_check_coll_name(to_coll, err)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 73,
                            "Invalid target namespace: %s.%s", to_db, to_coll);
    }
    if (strcmp(db, to_db) == 0 && strcmp(coll, to_coll) == 0) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 20,
                            "Can't rename a collection to itself");
    }
    target = emu_catalog_coll(srv, to_db, to_coll);
    if ((target && !drop_target) || view_find(srv, to_db, to_coll)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 48, "target namespace exists");
    }
    /* One oplog entry: a real server records dropTarget (the dropped collection's UUID)
     * inside the rename entry, which showExpandedEvents streams see as operationDescription. */
    bson_t desc = BSON_INITIALIZER, to_ns;
    BSON_APPEND_DOCUMENT_BEGIN(&desc, "to", &to_ns);
    BSON_APPEND_UTF8(&to_ns, "db", to_db);
    BSON_APPEND_UTF8(&to_ns, "coll", to_coll);
    bson_append_document_end(&desc, &to_ns);
    if (target) {
        BSON_APPEND_BINARY(&desc, "dropTarget", BSON_SUBTYPE_UUID, target->uuid, 16);
    }
    emu_change_t ch = {.op = EMU_OP_RENAME,
                       .db = db,
                       .coll = coll,
                       .to_db = to_db,
                       .to_coll = to_coll,
                       .coll_uuid = c->uuid,
                       .images_enabled = c->images,
                       .operation_description = &desc};
    emu_oplog_append(srv, &ch);
    bson_destroy(&desc);
    c->min_t = srv->clock_secs; /* visible to snapshot reads from the rename's tick on */
    c->min_i = srv->clock_inc;

    emu_cursors_kill_ns(srv, c->ns);
    if (target) {
        emu_cursors_kill_ns(srv, target->ns);
        db_unlink_coll(srv, emu_catalog_db(srv, to_db), target);
        coll_destroy(target);
    }
    from = emu_catalog_db(srv, db);
    to = db_get_or_create(srv, to_db); /* before unlinking, so an empty `from` cannot be reused */
    {
        char *old_name = c->name;
        c->name = bson_strdup(to_coll);
        bson_free(old_name);
    }
    if (from == to) {
        set_ns(c, to_db);
        return 0;
    }
    /* unlink from the old database without destroying c */
    for (emu_coll_t **p = &from->colls; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    c->next = NULL;
    db_link_coll(to, c);
    set_ns(c, to_db);
    if (!from->colls) {
        for (emu_db_t **p = &srv->catalog->dbs; *p; p = &(*p)->next) {
            if (*p == from) {
                *p = from->next;
                break;
            }
        }
        db_destroy(from);
    }
    return 0;
}

/* ---- emulator.h lookups ---- */

const bson_t *emu_catalog_find_by_id(emu_server_t *srv, const char *db, const char *coll,
                                     const bson_value_t *id)
{
    /* One view per thread: the result stays valid until this thread looks up again or the
     * lock is released, which covers a change-stream batch being built. */
    static _Thread_local bson_t view;
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    long slot;

    if (!c || !id) {
        return NULL;
    }
    slot = emu_coll_find_id(c, id);
    if (slot < 0) {
        return NULL;
    }
    emu_doc_view(&c->docs[slot], &view);
    return &view;
}

bool emu_catalog_collection_exists(emu_server_t *srv, const char *db, const char *coll,
                                   uint8_t uuid[16])
{
    emu_coll_t *c = emu_catalog_coll(srv, db, coll);
    if (c && uuid) {
        memcpy(uuid, c->uuid, 16);
    }
    return c != NULL;
}

/* ---- DDL commands ---- */

/* Fields every command may carry that are not options of the command itself. */
static bool is_generic_field(const char *k)
{
    static const char *const generic[] = {"$db",
                                          "lsid",
                                          "txnNumber",
                                          "$clusterTime",
                                          "$readPreference",
                                          "readConcern",
                                          "writeConcern",
                                          "comment",
                                          "apiVersion",
                                          "apiStrict",
                                          "apiDeprecationErrors",
                                          "maxTimeMS",
                                          "$audit",
                                          "$client",
                                          "autocommit",
                                          "startTransaction"};
    for (size_t i = 0; i < sizeof(generic) / sizeof(generic[0]); i++) {
        if (strcmp(k, generic[i]) == 0) {
            return true;
        }
    }
    return false;
}

static int check_images_spec(const bson_t *cmd, mc_error_t *err)
{
    bson_iter_t it, sub;
    if (!bson_iter_init_find(&it, cmd, "changeStreamPreAndPostImages")) {
        return 0;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                            "BSON field 'changeStreamPreAndPostImages' is the wrong type, "
                            "expected type 'object'");
    }
    if (!bson_iter_recurse(&it, &sub) || !bson_iter_find(&sub, "enabled")) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 40414,
                            "BSON field 'changeStreamPreAndPostImages.enabled' is missing but a "
                            "required field");
    }
    if (!BSON_ITER_HOLDS_BOOL(&sub)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 14,
                            "BSON field 'changeStreamPreAndPostImages.enabled' is the wrong "
                            "type, expected type 'bool'");
    }
    return 0;
}

void emu_cmd_create(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    bson_t options = BSON_INITIALIZER;
    bson_iter_t it;
    mc_error_t err;

    if (!name) {
        bson_destroy(&options);
        return;
    }
    if (bson_has_field(cmd, "timeseries") || bson_has_field(cmd, "clusteredIndex")) {
        emu_reply_error(reply, 20,
                        "mongo-emulator supports plain collections and view definitions only "
                        "(no time series or clustered collections)");
        bson_destroy(&options);
        return;
    }
    if (bson_has_field(cmd, "viewOn")) {
        if (view_create(conn->srv, db, name, cmd, &err)) {
            emu_reply_error_from(reply, &err);
        }
        bson_destroy(&options);
        return;
    }
    if (check_images_spec(cmd, &err)) {
        emu_reply_error_from(reply, &err);
        bson_destroy(&options);
        return;
    }
    bson_iter_init(&it, cmd);
    bson_iter_next(&it); /* the command name */
    while (bson_iter_next(&it)) {
        if (!is_generic_field(bson_iter_key(&it))) {
            bson_append_iter(&options, bson_iter_key(&it), -1, &it);
        }
    }
    if (!emu_catalog_create(conn->srv, db, name, &options, &err)) {
        emu_reply_error_from(reply, &err);
    }
    bson_destroy(&options);
}

void emu_cmd_coll_mod(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;
    bson_iter_t it;
    bson_t options = BSON_INITIALIZER;
    mc_error_t err;

    if (!name) {
        bson_destroy(&options);
        return;
    }
    c = emu_catalog_coll(conn->srv, db, name);
    if (!c) {
        emu_reply_error(reply, view_find(conn->srv, db, name) ? 166 : 26,
                        view_find(conn->srv, db, name)
                            ? "mongo-emulator does not modify views: %s.%s"
                            : "ns does not exist: %s.%s",
                        db, name);
        bson_destroy(&options);
        return;
    }
    if (check_images_spec(cmd, &err)) {
        emu_reply_error_from(reply, &err);
        bson_destroy(&options);
        return;
    }
    /* Merge: keep the old options that collMod does not mention, then the new values. */
    bson_iter_init(&it, &c->options);
    while (bson_iter_next(&it)) {
        if (!bson_has_field(cmd, bson_iter_key(&it))) {
            bson_append_iter(&options, bson_iter_key(&it), -1, &it);
        }
    }
    bson_iter_init(&it, cmd);
    bson_iter_next(&it);
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (!is_generic_field(k) && strcmp(k, "index") != 0) {
            bson_append_iter(&options, k, -1, &it);
        }
    }
    /* The modify event: what collMod asked for, and the options before it. */
    bson_t desc = BSON_INITIALIZER, before = BSON_INITIALIZER, old;
    bson_iter_init(&it, cmd);
    bson_iter_next(&it);
    while (bson_iter_next(&it)) {
        if (!is_generic_field(bson_iter_key(&it))) {
            bson_append_iter(&desc, bson_iter_key(&it), -1, &it);
        }
    }
    BSON_APPEND_DOCUMENT_BEGIN(&before, "collectionOptions", &old);
    BSON_APPEND_BINARY(&old, "uuid", BSON_SUBTYPE_UUID, c->uuid, 16);
    bson_concat(&old, &c->options);
    bson_append_document_end(&before, &old);
    bson_destroy(&c->options);
    bson_copy_to(&options, &c->options);
    bson_destroy(&options);
    c->images = images_option(&c->options);
    record_ddl(conn->srv, EMU_OP_MODIFY, db, c->name, c->uuid, &desc, &before, false);
    bson_destroy(&desc);
    bson_destroy(&before);
}

void emu_cmd_drop(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;

    if (!name) {
        return;
    }
    c = emu_catalog_coll(conn->srv, db, name);
    if (!c) {
        emu_view_t *v = view_find(conn->srv, db, name);
        if (v) {
            view_drop(conn->srv, v);
        }
        return; /* like MongoDB 7.0: dropping a missing collection succeeds */
    }
    BSON_APPEND_INT32(reply, "nIndexesWas", (int32_t)c->n_indexes);
    BSON_APPEND_UTF8(reply, "ns", c->ns);
    emu_catalog_drop(conn->srv, db, c);
}

void emu_cmd_drop_database(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    if (emu_catalog_db(conn->srv, db)) {
        emu_catalog_drop_database(conn->srv, db);
        BSON_APPEND_UTF8(reply, "dropped", db);
    }
    (void)cmd;
}

static bool split_ns(const char *ns, char *db, size_t dbsize, const char **coll)
{
    const char *dot = strchr(ns, '.');
    if (!dot || dot == ns || (size_t)(dot - ns) >= dbsize || !dot[1]) {
        return false;
    }
    memcpy(db, ns, (size_t)(dot - ns));
    db[dot - ns] = '\0';
    *coll = dot + 1;
    return true;
}

void emu_cmd_rename(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it;
    const char *from_ns, *to_ns = NULL, *from_coll, *to_coll;
    char from_db[128], to_db[128];
    bool drop_target = false;
    mc_error_t err;

    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it) || !BSON_ITER_HOLDS_UTF8(&it)) {
        emu_reply_error(reply, 14, "'renameCollection' must be of type String");
        return;
    }
    from_ns = bson_iter_utf8(&it, NULL);
    if (bson_iter_init_find(&it, cmd, "to") && BSON_ITER_HOLDS_UTF8(&it)) {
        to_ns = bson_iter_utf8(&it, NULL);
    }
    if (!to_ns) {
        emu_reply_error(reply, 14, "'to' must be of type String");
        return;
    }
    if (bson_iter_init_find(&it, cmd, "dropTarget")) {
        drop_target = bson_iter_as_bool(&it);
    }
    if (!split_ns(from_ns, from_db, sizeof(from_db), &from_coll)) {
        emu_reply_error(reply, 73, "Invalid source namespace: %s", from_ns);
        return;
    }
    if (!split_ns(to_ns, to_db, sizeof(to_db), &to_coll)) {
        emu_reply_error(reply, 73, "Invalid target namespace: %s", to_ns);
        return;
    }
    if (emu_catalog_rename(conn->srv, from_db, from_coll, to_db, to_coll, drop_target, &err)) {
        emu_reply_error_from(reply, &err);
    }
    (void)db;
}

static mc_filter_t *cmd_filter(const bson_t *cmd, bson_t *reply)
{
    bson_iter_t it;
    bson_t q;
    mc_error_t err;
    mc_filter_t *f;

    if (!bson_iter_init_find(&it, cmd, "filter") || BSON_ITER_HOLDS_NULL(&it)) {
        bson_init(&q);
    } else if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
        emu_reply_error(reply, 14,
                        "BSON field 'filter' is the wrong type, expected type "
                        "'object'");
        return NULL;
    } else {
        const uint8_t *d;
        uint32_t l;
        bson_iter_document(&it, &l, &d);
        bson_init_static(&q, d, l);
    }
    f = mc_filter_new(&q, NULL, &err);
    if (!f) {
        emu_reply_error_from(reply, &err);
    }
    return f;
}

static long batch_size_of(const bson_t *cmd)
{
    bson_iter_t it;
    if (bson_iter_init(&it, cmd) && bson_iter_find_descendant(&it, "cursor.batchSize", &it) &&
        BSON_ITER_HOLDS_NUMBER(&it)) {
        int64_t v = bson_iter_as_int64(&it);
        return v < 0 ? -1 : (long)v;
    }
    return -1;
}

static bool flag_of(const bson_t *cmd, const char *name)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, cmd, name) && bson_iter_as_bool(&it);
}

static void append_out_doc(emu_bytes_t *out, const bson_t *doc)
{
    emu_bytes_append(out, bson_get_data(doc), doc->len);
}

void emu_cmd_list_collections(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_db_t *d = emu_catalog_db(conn->srv, db);
    mc_filter_t *f = cmd_filter(cmd, reply);
    bool name_only = flag_of(cmd, "nameOnly");
    emu_bytes_t out = {0};
    char ns[300];

    if (!f) {
        return;
    }
    for (emu_coll_t *c = d ? d->colls : NULL; c; c = c->next) {
        bson_t e = BSON_INITIALIZER, sub;
        BSON_APPEND_UTF8(&e, "name", c->name);
        BSON_APPEND_UTF8(&e, "type", "collection");
        if (!name_only) {
            BSON_APPEND_DOCUMENT(&e, "options", &c->options);
            BSON_APPEND_DOCUMENT_BEGIN(&e, "info", &sub);
            BSON_APPEND_BOOL(&sub, "readOnly", false);
            BSON_APPEND_BINARY(&sub, "uuid", BSON_SUBTYPE_UUID, c->uuid, 16);
            bson_append_document_end(&e, &sub);
            BSON_APPEND_DOCUMENT(&e, "idIndex", &c->indexes[0]->spec);
        }
        if (mc_filter_match(f, &e)) {
            append_out_doc(&out, &e);
        }
        bson_destroy(&e);
    }
    for (emu_view_t *v = conn->srv->catalog->views; v; v = v->next) {
        if (strcmp(v->db, db) != 0) {
            continue;
        }
        bson_t e = BSON_INITIALIZER, sub;
        BSON_APPEND_UTF8(&e, "name", v->name);
        BSON_APPEND_UTF8(&e, "type", "view");
        if (!name_only) {
            BSON_APPEND_DOCUMENT(&e, "options", v->def);
            BSON_APPEND_DOCUMENT_BEGIN(&e, "info", &sub);
            BSON_APPEND_BOOL(&sub, "readOnly", true);
            bson_append_document_end(&e, &sub);
        }
        if (mc_filter_match(f, &e)) {
            append_out_doc(&out, &e);
        }
        bson_destroy(&e);
    }
    mc_filter_destroy(f);
    snprintf(ns, sizeof(ns), "%s.$cmd.listCollections", db);
    emu_cursor_reply_first(conn->srv, ns, out.data, out.len, batch_size_of(cmd), false, reply);
}

void emu_cmd_list_databases(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    mc_filter_t *f = cmd_filter(cmd, reply);
    bool name_only = flag_of(cmd, "nameOnly");
    bson_t arr;
    uint32_t n = 0;
    int64_t total = 0;

    if (!f) {
        return;
    }
    BSON_APPEND_ARRAY_BEGIN(reply, "databases", &arr);
    for (emu_db_t *d = emu_catalog_first_db(conn->srv); d; d = d->next) {
        bson_t e = BSON_INITIALIZER;
        int64_t size = 0;
        for (emu_coll_t *c = d->colls; c; c = c->next) {
            size += (int64_t)c->data_bytes;
        }
        /* a real server reports allocated storage: never 0 for an existing database */
        size = size < 4096 ? 4096 : size;
        BSON_APPEND_UTF8(&e, "name", d->name);
        if (!name_only) {
            BSON_APPEND_INT64(&e, "sizeOnDisk", size);
            BSON_APPEND_BOOL(&e, "empty", false);
        }
        if (mc_filter_match(f, &e)) {
            char keybuf[16];
            const char *key;
            size_t klen = bson_uint32_to_string(n++, &key, keybuf, sizeof(keybuf));
            bson_append_document(&arr, key, (int)klen, &e);
            total += size;
        }
        bson_destroy(&e);
    }
    bson_append_array_end(reply, &arr);
    if (!name_only) {
        BSON_APPEND_INT64(reply, "totalSize", total);
        BSON_APPEND_INT64(reply, "totalSizeMb", total / (1024 * 1024));
    }
    mc_filter_destroy(f);
    (void)db;
}

/* createIndexes events for the indexes from position `from` on (the ones just added). */
static void record_new_indexes(emu_server_t *srv, const char *db, const emu_coll_t *c, size_t from,
                               bool each)
{
    const bson_t *specs[MAX_INDEXES];
    size_t n = 0;
    for (size_t i = from; i < c->n_indexes && n < MAX_INDEXES; i++) {
        specs[n++] = &c->indexes[i]->spec;
    }
    if (n == 0) {
        return;
    }
    for (size_t i = 0; each && i < n; i++) {
        record_index_event(srv, EMU_OP_CREATE_INDEXES, db, c, &specs[i], 1);
    }
    if (!each) {
        record_index_event(srv, EMU_OP_CREATE_INDEXES, db, c, specs, n);
    }
}

/* Drops one index and records its dropIndexes event (one per index, as MongoDB logs them). */
static int drop_index(emu_server_t *srv, const char *db, emu_coll_t *c, const char *name,
                      mc_error_t *err)
{
    bson_t spec = BSON_INITIALIZER;
    for (size_t i = 1; i < c->n_indexes; i++) {
        if (strcmp(c->indexes[i]->name, name) == 0) {
            bson_concat(&spec, &c->indexes[i]->spec);
        }
    }
    int rc = emu_coll_drop_index(c, name, err);
    if (rc == 0) {
        const bson_t *one = &spec;
        record_index_event(srv, EMU_OP_DROP_INDEXES, db, c, &one, 1);
    }
    bson_destroy(&spec);
    return rc;
}

void emu_cmd_create_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;
    bson_iter_t it, ix;
    bool created = false;
    size_t before;
    int added_count = 0;
    mc_error_t err;

    if (!name) {
        return;
    }
    if (!bson_iter_init_find(&it, cmd, "indexes") || !BSON_ITER_HOLDS_ARRAY(&it) ||
        !bson_iter_recurse(&it, &ix)) {
        emu_reply_error(reply, 40414,
                        "BSON field 'createIndexes.indexes' is missing but a "
                        "required field");
        return;
    }
    c = emu_catalog_coll_get_or_create(conn->srv, db, name, &created, &err);
    if (!c) {
        emu_reply_error_from(reply, &err);
        return;
    }
    before = c->n_indexes;
    /* MongoDB logs one createIndexes entry per index on an empty collection, and one
     * commitIndexBuild listing every index otherwise: the events follow the same split. */
    bool each = c->n_live == 0;
    while (bson_iter_next(&ix)) {
        bson_t spec;
        const uint8_t *d;
        uint32_t l;
        bool added;
        if (!BSON_ITER_HOLDS_DOCUMENT(&ix)) {
            emu_reply_error(reply, 14, "The elements of the 'indexes' array must be objects");
            return;
        }
        bson_iter_document(&ix, &l, &d);
        bson_init_static(&spec, d, l);
        if (emu_coll_add_index(c, &spec, &added, &err)) {
            record_new_indexes(conn->srv, db, c, before, each);
            emu_reply_error_from(reply, &err);
            return;
        }
        added_count += added ? 1 : 0;
    }
    record_new_indexes(conn->srv, db, c, before, each);
    BSON_APPEND_INT32(reply, "numIndexesBefore", (int32_t)before);
    BSON_APPEND_INT32(reply, "numIndexesAfter", (int32_t)c->n_indexes);
    BSON_APPEND_BOOL(reply, "createdCollectionAutomatically", created);
    if (added_count == 0) {
        BSON_APPEND_UTF8(reply, "note", "all indexes already exist");
    }
}

void emu_cmd_list_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;
    emu_bytes_t out = {0};
    char ns[300];

    if (!name) {
        return;
    }
    c = emu_catalog_coll(conn->srv, db, name);
    if (!c) {
        emu_reply_error(reply, 26, "ns does not exist: %s.%s", db, name);
        return;
    }
    for (size_t i = 0; i < c->n_indexes; i++) {
        append_out_doc(&out, &c->indexes[i]->spec);
    }
    snprintf(ns, sizeof(ns), "%s.$cmd.listIndexes.%s", db, name);
    emu_cursor_reply_first(conn->srv, ns, out.data, out.len, batch_size_of(cmd), false, reply);
}

void emu_cmd_drop_indexes(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;
    bson_iter_t it;
    int32_t was;
    mc_error_t err;

    if (!name) {
        return;
    }
    c = emu_catalog_coll(conn->srv, db, name);
    if (!c) {
        emu_reply_error(reply, 26, "ns not found %s.%s", db, name);
        return;
    }
    was = (int32_t)c->n_indexes;
    if (!bson_iter_init_find(&it, cmd, "index")) {
        emu_reply_error(reply, 40414,
                        "BSON field 'dropIndexes.index' is missing but a required "
                        "field");
        return;
    }
    if (BSON_ITER_HOLDS_UTF8(&it) && strcmp(bson_iter_utf8(&it, NULL), "*") == 0) {
        while (c->n_indexes > 1) {
            drop_index(conn->srv, db, c, c->indexes[1]->name, &err);
        }
        BSON_APPEND_INT32(reply, "nIndexesWas", was);
        BSON_APPEND_UTF8(reply, "msg", "non-_id indexes dropped for collection");
        return;
    }
    if (BSON_ITER_HOLDS_UTF8(&it)) {
        if (drop_index(conn->srv, db, c, bson_iter_utf8(&it, NULL), &err)) {
            emu_reply_error_from(reply, &err);
            return;
        }
    } else if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_t key;
        const uint8_t *d;
        uint32_t l;
        const char *ixname;
        char keytext[512];
        bson_iter_document(&it, &l, &d);
        bson_init_static(&key, d, l);
        ixname = emu_coll_index_by_key(c, &key);
        if (!ixname) {
            emu_format_key_value(&key, keytext, sizeof(keytext));
            emu_reply_error(reply, 27, "can't find index with key: %s", keytext);
            return;
        }
        if (drop_index(conn->srv, db, c, ixname, &err)) {
            emu_reply_error_from(reply, &err);
            return;
        }
    } else if (BSON_ITER_HOLDS_ARRAY(&it)) {
        bson_iter_t names;
        /* all or nothing: check first */
        bson_iter_recurse(&it, &names);
        while (bson_iter_next(&names)) {
            const char *n = BSON_ITER_HOLDS_UTF8(&names) ? bson_iter_utf8(&names, NULL) : "";
            bool found = false;
            for (size_t i = 1; i < c->n_indexes; i++) {
                found = found || strcmp(c->indexes[i]->name, n) == 0;
            }
            if (!found) {
                emu_reply_error(reply, strcmp(n, "_id_") == 0 ? 72 : 27,
                                strcmp(n, "_id_") == 0 ? "cannot drop _id index%s"
                                                       : "index not found with name [%s]",
                                strcmp(n, "_id_") == 0 ? "" : n);
                return;
            }
        }
        bson_iter_recurse(&it, &names);
        while (bson_iter_next(&names)) {
            drop_index(conn->srv, db, c, bson_iter_utf8(&names, NULL), &err);
        }
    } else {
        emu_reply_error(reply, 14, "BSON field 'dropIndexes.index' is the wrong type");
        return;
    }
    BSON_APPEND_INT32(reply, "nIndexesWas", was);
}

void emu_cmd_coll_stats(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    const char *name = emu_cmd_collection(cmd, reply);
    emu_coll_t *c;
    bson_t sizes;

    if (!name) {
        return;
    }
    c = emu_catalog_coll(conn->srv, db, name);
    if (!c) {
        emu_reply_error(reply, 26, "Collection [%s.%s] not found.", db, name);
        return;
    }
    BSON_APPEND_UTF8(reply, "ns", c->ns);
    BSON_APPEND_INT64(reply, "size", (int64_t)c->data_bytes);
    BSON_APPEND_INT64(reply, "count", (int64_t)c->n_live);
    BSON_APPEND_INT64(reply, "avgObjSize", c->n_live ? (int64_t)(c->data_bytes / c->n_live) : 0);
    BSON_APPEND_INT64(reply, "storageSize", (int64_t)c->data_bytes);
    BSON_APPEND_INT32(reply, "nindexes", (int32_t)c->n_indexes);
    BSON_APPEND_DOCUMENT_BEGIN(reply, "indexSizes", &sizes);
    for (size_t i = 0; i < c->n_indexes; i++) {
        BSON_APPEND_INT64(&sizes, c->indexes[i]->name,
                          (int64_t)(c->indexes[i]->hash.cap * sizeof(struct emu_index_entry)));
    }
    bson_append_document_end(reply, &sizes);
}

void emu_cmd_db_stats(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_db_t *d = emu_catalog_db(conn->srv, db);
    int64_t colls = 0, objects = 0, bytes = 0, indexes = 0;

    for (emu_coll_t *c = d ? d->colls : NULL; c; c = c->next) {
        colls++;
        objects += (int64_t)c->n_live;
        bytes += (int64_t)c->data_bytes;
        indexes += (int64_t)c->n_indexes;
    }
    BSON_APPEND_UTF8(reply, "db", db);
    BSON_APPEND_INT64(reply, "collections", colls);
    BSON_APPEND_INT64(reply, "views", 0);
    BSON_APPEND_INT64(reply, "objects", objects);
    BSON_APPEND_DOUBLE(reply, "avgObjSize", objects ? (double)bytes / (double)objects : 0.0);
    BSON_APPEND_INT64(reply, "dataSize", bytes);
    BSON_APPEND_INT64(reply, "storageSize", bytes);
    BSON_APPEND_INT64(reply, "indexes", indexes);
    BSON_APPEND_INT64(reply, "totalSize", bytes);
    BSON_APPEND_DOUBLE(reply, "scaleFactor", 1.0);
    (void)cmd;
}
