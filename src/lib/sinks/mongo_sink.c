/*
 * mongo_sink.c: the MongoDB-collection sink's groundwork (mongo_sink.h): projections, the
 * document of an event, write concerns, ordered inserts that step over duplicate _ids, the
 * TTL index, error classes, the loop guard.
 *
 * Threads: projections are immutable once built (any thread); inserts and the index call
 * block on libmongoc, on the caller's thread (the sink's own). Invariant of the insert loop:
 * every document of todo[0..next) is written or was a duplicate; each round trip sends
 * todo[next..len) as one ordered batch and advances `next` past everything the server
 * inserted; a duplicate _id advances it by one more and triggers one lookup that takes the
 * other already-present documents out of the list, so a replayed batch costs about three
 * round trips, not one per duplicate.
 */
#include "sinks/mongo_sink.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PATHS 64
#define MAX_DEPTH 32

/* A projection as a tree: each node is one path part; a leaf takes the whole value. */
typedef struct pnode {
    char *name;
    bool leaf;
    struct pnode *children;
    size_t n_children, cap;
} pnode_t;

struct mc__mongo_projection {
    pnode_t root;
};

static void pnode_free(pnode_t *n)
{
    for (size_t i = 0; i < n->n_children; i++) {
        pnode_free(&n->children[i]);
    }
    free(n->children);
    free(n->name);
}

void mc__mongo_projection_destroy(mc__mongo_projection_t *p)
{
    if (p) {
        pnode_free(&p->root);
        free(p);
    }
}

static pnode_t *child(pnode_t *n, const char *name, size_t len)
{
    for (size_t i = 0; i < n->n_children; i++) {
        if (strlen(n->children[i].name) == len && memcmp(n->children[i].name, name, len) == 0) {
            return &n->children[i];
        }
    }
    if (n->n_children == n->cap) {
        size_t cap = n->cap ? n->cap * 2 : 4;
        pnode_t *c = realloc(n->children, cap * sizeof *c);
        if (!c) {
            return NULL;
        }
        n->children = c;
        n->cap = cap;
    }
    pnode_t *c = &n->children[n->n_children];
    memset(c, 0, sizeof *c);
    c->name = strndup(name, len);
    if (!c->name) {
        return NULL;
    }
    n->n_children++;
    return c;
}

static int proj_error(mc_error_t *err, const char *what, const char *path)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "projection%s%.100s%s: %s", path ? " \"" : "", path ? path : "",
                        path ? "\"" : "", what);
}

mc__mongo_projection_t *mc__mongo_projection_new(const bson_t *spec, mc_error_t *err)
{
    mc__mongo_projection_t *p = calloc(1, sizeof(*p));
    bson_iter_t it;
    size_t n = 0;
    if (!p || !spec || !bson_iter_init(&it, spec)) {
        free(p);
        proj_error(err, "must be a document", NULL);
        return NULL;
    }
    while (bson_iter_next(&it)) {
        const char *path = bson_iter_key(&it);
        bool include = (BSON_ITER_HOLDS_BOOL(&it) && bson_iter_bool(&it)) ||
                       (BSON_ITER_HOLDS_NUMBER(&it) && bson_iter_as_int64(&it) == 1);
        if (!include) {
            proj_error(err, "only inclusion (1 or true) is supported", path);
            goto fail;
        }
        if (++n > MAX_PATHS) {
            proj_error(err, "more than 64 paths", NULL);
            goto fail;
        }
        pnode_t *node = &p->root;
        const char *part = path;
        int depth = 0;
        for (;;) {
            const char *dot = strchr(part, '.');
            size_t len = dot ? (size_t)(dot - part) : strlen(part);
            if (len == 0 || part[0] == '$' || ++depth > MAX_DEPTH) {
                proj_error(err, "bad path (empty part, '$', or deeper than 32)", path);
                goto fail;
            }
            node = child(node, part, len);
            if (!node) {
                mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
                goto fail;
            }
            if (node->leaf) {
                break; /* a shorter path already takes the whole value */
            }
            if (!dot) {
                node->leaf = true;
                break;
            }
            part = dot + 1;
        }
    }
    if (n == 0) {
        proj_error(err, "is empty", NULL);
        goto fail;
    }
    return p;
fail:
    mc__mongo_projection_destroy(p);
    return NULL;
}

/* Appends to `out` the parts of `doc` that `node`'s children select. */
static void project(const pnode_t *node, const uint8_t *data, uint32_t len, bson_t *out)
{
    bson_t doc;
    if (!bson_init_static(&doc, data, len)) {
        return;
    }
    for (size_t i = 0; i < node->n_children; i++) {
        const pnode_t *c = &node->children[i];
        bson_iter_t it;
        if (!bson_iter_init_find(&it, &doc, c->name)) {
            continue;
        }
        if (c->leaf) {
            bson_append_iter(out, c->name, -1, &it);
        } else if (BSON_ITER_HOLDS_DOCUMENT(&it)) {
            /* Paths are followed through documents only (not through arrays). */
            const uint8_t *sub = NULL;
            uint32_t sub_len = 0;
            bson_iter_document(&it, &sub_len, &sub);
            bson_t child_out;
            bson_append_document_begin(out, c->name, -1, &child_out);
            project(c, sub, sub_len, &child_out);
            bson_append_document_end(out, &child_out);
        }
    }
}

/* The recipient as the value it was in the change (string, integer, ObjectId, binary), from
 * its canonical identity (mongocast/identity.h), so the log can be queried by it directly. */
static void append_recipient(bson_t *out, const mc_event_t *ev)
{
    size_t len = 0;
    const uint8_t *id = mc_event_recipient_identity(ev, &len);
    if (!id || len < 1) {
        return;
    }
    const uint8_t *p = id + 1;
    size_t n = len - 1;
    switch (id[0]) {
    case 's': bson_append_utf8(out, "recipient", -1, (const char *)p, (int)n); break;
    case 'i':
        if (n == 8) {
            uint64_t v = 0;
            for (size_t k = 0; k < 8; k++) {
                v = v << 8 | p[k];
            }
            BSON_APPEND_INT64(out, "recipient", (int64_t)v);
        }
        break;
    case 'o':
        if (n == 12) {
            bson_oid_t oid;
            bson_oid_init_from_data(&oid, p);
            BSON_APPEND_OID(out, "recipient", &oid);
        }
        break;
    case 'b':
        if (n >= 1) {
            bson_append_binary(out, "recipient", -1, (bson_subtype_t)p[0], p + 1,
                               (uint32_t)(n - 1));
        }
        break;
    default: break;
    }
}

int mc__mongo_sink_doc(const mc_event_t *ev, const mc__mongo_projection_t *proj, bson_t *out,
                       mc_error_t *err)
{
    const char *id = mc_event_id(ev);
    if (!id) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "a %s event has no id: not written",
                            mc_event_kind_name(mc_event_kind(ev)));
    }
    const char *type = mc_event_operation_type(ev);
    if (!type || mc_event_kind(ev) != MC_EVENT_CHANGE) {
        type = mc_event_kind_name(mc_event_kind(ev));
    }
    BSON_APPEND_UTF8(out, "_id", id);
    BSON_APPEND_UTF8(out, "stream", mc_event_stream(ev));
    BSON_APPEND_UTF8(out, "type", type);
    if (mc_event_db(ev)) {
        bson_t ns;
        BSON_APPEND_DOCUMENT_BEGIN(out, "ns", &ns);
        BSON_APPEND_UTF8(&ns, "db", mc_event_db(ev));
        if (mc_event_coll(ev)) {
            BSON_APPEND_UTF8(&ns, "coll", mc_event_coll(ev));
        }
        bson_append_document_end(out, &ns);
    }
    if (mc_event_document_key(ev)) {
        BSON_APPEND_DOCUMENT(out, "documentKey", mc_event_document_key(ev));
    }
    append_recipient(out, ev);
    uint32_t t = 0, i = 0;
    if (mc_event_cluster_time(ev, &t, &i)) {
        BSON_APPEND_TIMESTAMP(out, "clusterTime", t, i);
    }
    int64_t wall = mc_event_wall_time_ms(ev);
    if (wall != INT64_MIN) {
        BSON_APPEND_DATE_TIME(out, "wallTime", wall);
    }
    const bson_t *change = mc_event_change(ev);
    if (change) {
        if (proj) {
            bson_t sub;
            BSON_APPEND_DOCUMENT_BEGIN(out, "change", &sub);
            project(&proj->root, bson_get_data(change), change->len, &sub);
            bson_append_document_end(out, &sub);
        } else {
            BSON_APPEND_DOCUMENT(out, "change", change);
        }
    }
    return 0;
}

mongoc_write_concern_t *mc__mongo_write_concern(const char *w, int64_t wtimeout_ms, bool journal,
                                                mc_error_t *err)
{
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    if (!w || strcmp(w, "majority") == 0) {
        mongoc_write_concern_set_w(wc, MONGOC_WRITE_CONCERN_W_MAJORITY);
    } else {
        char *end = NULL;
        long n = strtol(w, &end, 10);
        if (!*w || *end || n < 0 || n > 50) {
            mongoc_write_concern_destroy(wc);
            mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                         "write_concern.w must be \"majority\" or a number from 0 to 50");
            return NULL;
        }
        mongoc_write_concern_set_w(wc, (int32_t)n);
    }
    if (wtimeout_ms < 0) {
        mongoc_write_concern_destroy(wc);
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "write_concern.wtimeout_ms must be >= 0");
        return NULL;
    }
    if (wtimeout_ms > 0) {
        mongoc_write_concern_set_wtimeout_int64(wc, wtimeout_ms);
    }
    if (journal) {
        mongoc_write_concern_set_journal(wc, true);
    }
    return wc;
}

/* Server codes after which the same write can succeed later: elections, shutdowns, network
 * trouble seen by the server, time limits, write concern not (yet) satisfied, conflicts,
 * and Unauthorized (a configuration matter, never the document's fault). */
static const int transient_codes[] = {6,   7,   13,  50,   64,    89,    91,    112,   133,
                                      134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436};

mc__mongo_class_t mc__mongo_classify(const bson_error_t *e, const bson_t *reply)
{
    bson_iter_t it, labels;
    if (reply && bson_iter_init_find(&it, reply, "errorLabels") && BSON_ITER_HOLDS_ARRAY(&it) &&
        bson_iter_recurse(&it, &labels)) {
        while (bson_iter_next(&labels)) {
            if (BSON_ITER_HOLDS_UTF8(&labels) &&
                strcmp(bson_iter_utf8(&labels, NULL), "RetryableWriteError") == 0) {
                return MC__MONGO_TRANSIENT;
            }
        }
    }
    if (!e || e->code == 0) {
        return MC__MONGO_OK;
    }
    if (e->domain == MONGOC_ERROR_STREAM || e->domain == MONGOC_ERROR_SERVER_SELECTION ||
        e->domain == MONGOC_ERROR_PROTOCOL || e->domain == MONGOC_ERROR_CLIENT) {
        return MC__MONGO_TRANSIENT;
    }
    if (e->domain == MONGOC_ERROR_WRITE_CONCERN) {
        return MC__MONGO_TRANSIENT;
    }
    for (size_t k = 0; k < sizeof transient_codes / sizeof transient_codes[0]; k++) {
        if ((int)e->code == transient_codes[k]) {
            return MC__MONGO_TRANSIENT;
        }
    }
    return MC__MONGO_PERMANENT;
}

/* True when a write error is a duplicate key on _id (not on another unique index). */
static bool dup_on_id(const bson_t *we)
{
    bson_iter_t it, kp;
    if (bson_iter_init_find(&it, we, "keyPattern") && BSON_ITER_HOLDS_DOCUMENT(&it) &&
        bson_iter_recurse(&it, &kp)) {
        return bson_iter_next(&kp) && strcmp(bson_iter_key(&kp), "_id") == 0 &&
               !bson_iter_next(&kp);
    }
    return bson_iter_init_find(&it, we, "errmsg") && BSON_ITER_HOLDS_UTF8(&it) &&
           strstr(bson_iter_utf8(&it, NULL), "index: _id_ ") != NULL;
}

/* The first write error of a bulk reply: its index, code and the error document. */
static bool first_write_error(const bson_t *reply, uint32_t *index, int32_t *code, bson_t *we)
{
    bson_iter_t it, arr;
    if (!bson_iter_init_find(&it, reply, "writeErrors") || !BSON_ITER_HOLDS_ARRAY(&it) ||
        !bson_iter_recurse(&it, &arr) || !bson_iter_next(&arr) || !BSON_ITER_HOLDS_DOCUMENT(&arr)) {
        return false;
    }
    const uint8_t *data = NULL;
    uint32_t len = 0;
    bson_iter_document(&arr, &len, &data);
    if (!bson_init_static(we, data, len)) {
        return false;
    }
    bson_iter_t f;
    *index = bson_iter_init_find(&f, we, "index") ? (uint32_t)bson_iter_as_int64(&f) : 0;
    *code = bson_iter_init_find(&f, we, "code") ? (int32_t)bson_iter_as_int64(&f) : 0;
    return true;
}

/* Marks as duplicates the documents of todo[from..*n) whose _id already exists (one find),
 * and removes them from the list, keeping the order of the others. */
static bool drop_existing(mongoc_collection_t *coll, const bson_t *const *docs, size_t *todo,
                          size_t from, size_t *n, mc__mongo_outcome_t *outcomes,
                          mc__mongo_insert_result_t *res)
{
    bson_t filter = BSON_INITIALIZER, id, in;
    BSON_APPEND_DOCUMENT_BEGIN(&filter, "_id", &id);
    BSON_APPEND_ARRAY_BEGIN(&id, "$in", &in);
    char key[16];
    for (size_t k = from; k < *n; k++) {
        bson_iter_t it;
        if (bson_iter_init_find(&it, docs[todo[k]], "_id")) {
            const char *kp;
            bson_uint32_to_string((uint32_t)(k - from), &kp, key, sizeof key);
            bson_append_iter(&in, kp, -1, &it);
        }
    }
    bson_append_array_end(&id, &in);
    bson_append_document_end(&filter, &id);
    bson_t *opts = BCON_NEW("projection", "{", "_id", BCON_INT32(1), "}");
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, opts, NULL);
    bson_destroy(&filter);
    bson_destroy(opts);
    res->round_trips++;
    /* The replayed part of a batch is short and comes first, so a linear match is fine. */
    const bson_t *found;
    bool *exists = calloc(*n - from + 1, sizeof *exists);
    if (!exists) {
        mongoc_cursor_destroy(cur);
        return false;
    }
    while (mongoc_cursor_next(cur, &found)) {
        bson_iter_t a, b;
        if (!bson_iter_init_find(&a, found, "_id")) {
            continue;
        }
        for (size_t k = from; k < *n; k++) {
            if (!exists[k - from] && bson_iter_init_find(&b, docs[todo[k]], "_id") &&
                bson_iter_type(&a) == bson_iter_type(&b) && bson_iter_type(&a) == BSON_TYPE_UTF8 &&
                strcmp(bson_iter_utf8(&a, NULL), bson_iter_utf8(&b, NULL)) == 0) {
                exists[k - from] = true;
                break;
            }
        }
    }
    bool ok = !mongoc_cursor_error(cur, NULL);
    mongoc_cursor_destroy(cur);
    if (ok) {
        size_t w = from;
        for (size_t k = from; k < *n; k++) {
            if (exists[k - from]) {
                if (outcomes) {
                    outcomes[todo[k]] = MC__MONGO_DUPLICATE;
                }
                res->duplicates++;
            } else {
                todo[w++] = todo[k];
            }
        }
        *n = w;
    }
    free(exists);
    return ok;
}

int mc__mongo_insert_ordered(mongoc_collection_t *coll, const bson_t *const *docs, size_t n,
                             const mongoc_write_concern_t *wc, mc__mongo_outcome_t *outcomes,
                             mc__mongo_insert_result_t *res, mc_error_t *err)
{
    memset(res, 0, sizeof *res);
    for (size_t k = 0; outcomes && k < n; k++) {
        outcomes[k] = MC__MONGO_NOT_TRIED;
    }
    /* todo[next..len): the documents still to write, in order (duplicates found by a lookup
     * are taken out). */
    size_t *todo = malloc((n ? n : 1) * sizeof *todo);
    if (!todo) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    for (size_t k = 0; k < n; k++) {
        todo[k] = k;
    }
    size_t next = 0, len = n;
    int rc = 0;
    while (next < len) {
        bson_t opts = BSON_INITIALIZER;
        BSON_APPEND_BOOL(&opts, "ordered", true);
        if (wc) {
            mongoc_write_concern_append((mongoc_write_concern_t *)wc, &opts);
        }
        mongoc_bulk_operation_t *bulk =
            mongoc_collection_create_bulk_operation_with_opts(coll, &opts);
        bson_destroy(&opts);
        size_t end = len - next > MC__MONGO_MAX_BATCH ? next + MC__MONGO_MAX_BATCH : len;
        bson_error_t e;
        memset(&e, 0, sizeof e);
        bool ok = true;
        /* No client-side validation: the documents hold what MongoDB itself returned, and
         * libmongoc's default checks refuse field names with '$' or '.', which MongoDB 5.0+
         * allows in documents (and they cost a UTF-8 pass over every byte). */
        bson_t iopts = BSON_INITIALIZER;
        BSON_APPEND_BOOL(&iopts, "validate", false);
        for (size_t k = next; k < end && ok; k++) {
            ok = mongoc_bulk_operation_insert_with_opts(bulk, docs[todo[k]], &iopts, &e);
        }
        bson_destroy(&iopts);
        bson_t reply;
        uint32_t ran = ok ? mongoc_bulk_operation_execute(bulk, &reply, &e) : 0;
        if (!ok) {
            bson_init(&reply);
        }
        res->round_trips++;
        mongoc_bulk_operation_destroy(bulk);
        if (ran) {
            for (size_t k = next; k < end; k++) {
                if (outcomes) {
                    outcomes[todo[k]] = MC__MONGO_WRITTEN;
                }
            }
            res->written += end - next;
            next = end;
            bson_destroy(&reply);
            continue;
        }
        uint32_t idx = 0;
        int32_t code = 0;
        bson_t we;
        bool has_we = first_write_error(&reply, &idx, &code, &we);
        if (has_we) {
            /* Ordered: everything before the failing document went in. */
            size_t stop = next + idx;
            for (size_t k = next; k < stop && k < end; k++) {
                if (outcomes) {
                    outcomes[todo[k]] = MC__MONGO_WRITTEN;
                }
            }
            res->written += stop - next;
            next = stop;
            if (code == 11000 && dup_on_id(&we) && stop < end) {
                /* A replay: this one is there already. The rest of a replay is usually there
                 * too: one lookup finds which, instead of one failed batch per duplicate. */
                if (outcomes) {
                    outcomes[todo[stop]] = MC__MONGO_DUPLICATE;
                }
                res->duplicates++;
                next = stop + 1;
                bson_destroy(&reply);
                if (next < len && !drop_existing(coll, docs, todo, next, &len, outcomes, res)) {
                    /* The lookup failed: the ordered inserts still get it right, slower. */
                }
                continue;
            }
        }
        res->failed = true;
        res->failed_index = next < len ? todo[next] : n;
        if (has_we) {
            bson_error_t we_err;
            memset(&we_err, 0, sizeof we_err);
            we_err.domain = MONGOC_ERROR_SERVER;
            we_err.code = (uint32_t)code;
            res->cls = mc__mongo_classify(&we_err, &reply);
        } else {
            /* No document-level error: the whole batch is unconfirmed (network, or the
             * write concern not satisfied); retrying it is safe (duplicates count). */
            res->cls = mc__mongo_classify(&e, &reply);
            if (res->cls == MC__MONGO_OK) {
                res->cls = MC__MONGO_TRANSIENT;
            }
        }
        snprintf(res->message, sizeof res->message, "%.200s (code %d)",
                 e.message[0] ? e.message : "write failed", has_we ? code : (int)e.code);
        if (outcomes && next < len) {
            outcomes[todo[next]] = MC__MONGO_FAILED;
        }
        bson_destroy(&reply);
        rc = mc_error_set(err, res->cls == MC__MONGO_PERMANENT ? MC_ESERVER : MC_EIO,
                          MC_DOMAIN_MONGODB, has_we ? code : (int)e.code, "%s", res->message);
        break;
    }
    free(todo);
    return rc;
}

int mc__mongo_ensure_ttl_index(mongoc_collection_t *coll, int64_t expire_after_seconds,
                               mc_error_t *err)
{
    if (expire_after_seconds <= 0) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "expire_after_seconds must be > 0");
    }
    bson_t cmd = BSON_INITIALIZER, indexes, index, key;
    BSON_APPEND_UTF8(&cmd, "createIndexes", mongoc_collection_get_name(coll));
    BSON_APPEND_ARRAY_BEGIN(&cmd, "indexes", &indexes);
    BSON_APPEND_DOCUMENT_BEGIN(&indexes, "0", &index);
    BSON_APPEND_DOCUMENT_BEGIN(&index, "key", &key);
    BSON_APPEND_INT32(&key, "wallTime", 1);
    bson_append_document_end(&index, &key);
    BSON_APPEND_UTF8(&index, "name", MC__MONGO_TTL_INDEX);
    BSON_APPEND_INT64(&index, "expireAfterSeconds", expire_after_seconds);
    bson_append_document_end(&indexes, &index);
    bson_append_array_end(&cmd, &indexes);
    bson_t reply;
    bson_error_t e;
    bool ok = mongoc_collection_write_command_with_opts(coll, &cmd, NULL, &reply, &e);
    bson_destroy(&cmd);
    bson_destroy(&reply);
    if (ok) {
        return 0;
    }
    int code = (e.code == 85 || e.code == 86) ? MC_ECONFIG : MC_EIO;
    return mc_error_set(err, code, MC_DOMAIN_MONGODB, (int)e.code, "TTL index %s: %s",
                        MC__MONGO_TTL_INDEX, e.message);
}

int mc__mongo_loop_check(const char *sink, const char *db, const char *coll, bool same_cluster,
                         const mc__mongo_watch_t *streams, size_t n, mc_error_t *err)
{
    if (!same_cluster) {
        return 0;
    }
    for (size_t k = 0; k < n; k++) {
        const mc__mongo_watch_t *w = &streams[k];
        bool watches =
            !w->db || (strcmp(w->db, db) == 0 && (!w->coll || strcmp(w->coll, coll) == 0));
        if (watches) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "sink %s writes into %s.%s, which its stream %s watches: every "
                                "write would come back as a change (an endless loop); write "
                                "into another database, or narrow the stream",
                                sink, db, coll, w->stream);
        }
    }
    return 0;
}
