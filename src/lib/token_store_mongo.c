/*
 * token_store_mongo.c: resume positions stored in a MongoDB collection: one document per
 * stream, {_id: <stream>, token: {_data: ...}, clusterTime, invalidate, definition,
 * updatedAt} (the stream's position, the oldest of its sinks'), and one per sink of a stream,
 * {_id: {stream: <stream>, sink: <sink>}, ...the same fields} (where that sink resumes).
 *
 * Blocking; watcher threads load at start, the checkpoint thread saves. Each call pops its
 * own client from the engine's pool (mongoc clients are not thread-safe; the pool is), so
 * concurrent calls for different streams never share a client. Saves are upserts with
 * {w: "majority"} so that a position is not reported stored before it survives a failover.
 */
#include <stdio.h>
#include <stdlib.h>

#include "engine_private.h"

typedef struct mongo_store {
    mc__token_store_t base;
    mongoc_client_pool_t *pool; /* borrowed */
    char *db;
    char *coll;
} mongo_store_t;

/* The record's _id: the stream name (the layout before per-sink records, kept so that old
 * stream records still load), or {stream, sink}. */
static void append_id(bson_t *doc, const char *stream, const char *sink)
{
    if (!sink) {
        BSON_APPEND_UTF8(doc, "_id", stream);
        return;
    }
    bson_t id;
    BSON_APPEND_DOCUMENT_BEGIN(doc, "_id", &id);
    BSON_APPEND_UTF8(&id, "stream", stream);
    BSON_APPEND_UTF8(&id, "sink", sink);
    bson_append_document_end(doc, &id);
}

static int mongo_load(mc__token_store_t *store, const char *stream, const char *sink,
                      mc__record_t *out, mc_error_t *err)
{
    mongo_store_t *ms = (mongo_store_t *)store;
    if (sink) {
        snprintf(out->where, sizeof(out->where), "%s.%s {_id: {stream: \"%s\", sink: \"%s\"}}",
                 ms->db, ms->coll, stream, sink);
    } else {
        snprintf(out->where, sizeof(out->where), "%s.%s {_id: \"%s\"}", ms->db, ms->coll,
                 stream);
    }
    mongoc_client_t *client = mongoc_client_pool_pop(ms->pool);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, ms->db, ms->coll);
    bson_t filter = BSON_INITIALIZER;
    append_id(&filter, stream, sink);
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1));
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, opts, NULL);
    const bson_t *doc;
    int rc = MC_ENOTFOUND;
    bson_error_t berr;
    if (mongoc_cursor_next(cur, &doc)) {
        rc = mc__record_from_bson(doc, out->where, out, err);
    } else if (mongoc_cursor_error(cur, &berr)) {
        rc = mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                          "loading checkpoint from %s.%s: %s", ms->db, ms->coll, berr.message);
    } else {
        mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND, "no checkpoint at %s",
                     out->where);
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(&filter);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(ms->pool, client);
    return rc;
}

static int mongo_save(mc__token_store_t *store, const char *stream, const char *sink,
                      const mc__position_t *pos, const bson_t *definition, mc_error_t *err)
{
    mongo_store_t *ms = (mongo_store_t *)store;
    mongoc_client_t *client = mongoc_client_pool_pop(ms->pool);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, ms->db, ms->coll);
    bson_t filter = BSON_INITIALIZER;
    append_id(&filter, stream, sink);
    bson_t update = BSON_INITIALIZER;
    bson_t set;
    BSON_APPEND_DOCUMENT_BEGIN(&update, "$set", &set);
    BSON_APPEND_UTF8(&set, "stream", stream);
    if (sink) {
        BSON_APPEND_UTF8(&set, "sink", sink);
    }
    mc__record_append(&set, pos, definition);
    bson_append_document_end(&update, &set);
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true), "writeConcern", "{", "w",
                            BCON_UTF8("majority"), "}");
    bson_error_t berr;
    int rc = 0;
    if (!mongoc_collection_update_one(coll, &filter, &update, opts, NULL, &berr)) {
        rc = mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                          "saving checkpoint of stream %s%s%s to %s.%s: %s", stream,
                          sink ? " sink " : "", sink ? sink : "", ms->db, ms->coll, berr.message);
    }
    bson_destroy(opts);
    bson_destroy(&update);
    bson_destroy(&filter);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(ms->pool, client);
    return rc;
}

static void mongo_destroy(mc__token_store_t *store)
{
    mongo_store_t *ms = (mongo_store_t *)store;
    bson_free(ms->db);
    bson_free(ms->coll);
    free(ms);
}

static const mc__token_store_vtable_t mongo_vtable = {
    .name = "mongodb",
    .load = mongo_load,
    .save = mongo_save,
    .destroy = mongo_destroy,
};

mc__token_store_t *mc__token_store_mongo_new(mongoc_client_pool_t *pool, const char *db,
                                             const char *coll, mc_error_t *err)
{
    if (!pool || !db || !*db || !coll || !*coll) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "checkpoint.db and checkpoint.collection are required for the mongodb "
                     "store");
        return NULL;
    }
    mongo_store_t *ms = calloc(1, sizeof(*ms));
    if (!ms) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    ms->base.vt = &mongo_vtable;
    ms->pool = pool;
    ms->db = bson_strdup(db);
    ms->coll = bson_strdup(coll);
    return &ms->base;
}
