/*
 * token_store_mongo.c: resume positions stored in a MongoDB collection, one document per
 * stream: {_id: <stream>, token: {_data: ...}, clusterTime, invalidate, updatedAt}.
 *
 * Blocking; watcher threads load at start, the checkpoint thread saves. Each call pops its
 * own client from the engine's pool (mongoc clients are not thread-safe; the pool is), so
 * concurrent calls for different streams never share a client. Saves are upserts with
 * {w: "majority"} so that a position is not reported stored before it survives a failover.
 */
#include <stdlib.h>

#include "engine_private.h"

typedef struct mongo_store {
    mc__token_store_t base;
    mongoc_client_pool_t *pool; /* borrowed */
    char *db;
    char *coll;
} mongo_store_t;

static int mongo_load(mc__token_store_t *store, const char *stream, mc__position_t *out,
                      mc_error_t *err)
{
    mongo_store_t *ms = (mongo_store_t *)store;
    mongoc_client_t *client = mongoc_client_pool_pop(ms->pool);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, ms->db, ms->coll);
    bson_t *filter = BCON_NEW("_id", BCON_UTF8(stream));
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1));
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, filter, opts, NULL);
    const bson_t *doc;
    int rc = MC_ENOTFOUND;
    bson_error_t berr;
    if (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it, d;
        if (bson_iter_init_find(&it, doc, "token") && BSON_ITER_HOLDS_DOCUMENT(&it) &&
            bson_iter_recurse(&it, &d) && bson_iter_find(&d, "_data") &&
            BSON_ITER_HOLDS_UTF8(&d)) {
            const uint8_t *data;
            uint32_t len;
            bson_iter_document(&it, &len, &data);
            mc__position_clear(out);
            out->token = bson_new_from_data(data, len);
            if (bson_iter_init_find(&it, doc, "invalidate") && BSON_ITER_HOLDS_BOOL(&it)) {
                out->invalidate = bson_iter_bool(&it);
            }
            if (bson_iter_init_find(&it, doc, "clusterTime") &&
                BSON_ITER_HOLDS_TIMESTAMP(&it)) {
                bson_iter_timestamp(&it, &out->ct_t, &out->ct_i);
            }
            rc = 0;
        } else {
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                              "%s.%s: checkpoint of stream %s has no token._data string",
                              ms->db, ms->coll, stream);
        }
    } else if (mongoc_cursor_error(cur, &berr)) {
        rc = mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                          "loading checkpoint from %s.%s: %s", ms->db, ms->coll, berr.message);
    } else {
        mc_error_set(err, MC_ENOTFOUND, MC_DOMAIN_MONGOCAST, MC_ENOTFOUND,
                     "no checkpoint for stream %s", stream);
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(filter);
    mongoc_collection_destroy(coll);
    mongoc_client_pool_push(ms->pool, client);
    return rc;
}

static int mongo_save(mc__token_store_t *store, const char *stream, const mc__position_t *pos,
                      mc_error_t *err)
{
    mongo_store_t *ms = (mongo_store_t *)store;
    mongoc_client_t *client = mongoc_client_pool_pop(ms->pool);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, ms->db, ms->coll);
    bson_t *filter = BCON_NEW("_id", BCON_UTF8(stream));
    bson_t update = BSON_INITIALIZER;
    bson_t set;
    BSON_APPEND_DOCUMENT_BEGIN(&update, "$set", &set);
    BSON_APPEND_DOCUMENT(&set, "token", pos->token);
    BSON_APPEND_TIMESTAMP(&set, "clusterTime", pos->ct_t, pos->ct_i);
    BSON_APPEND_BOOL(&set, "invalidate", pos->invalidate);
    BSON_APPEND_DATE_TIME(&set, "updatedAt", mc__wall_ms());
    bson_append_document_end(&update, &set);
    bson_t *opts = BCON_NEW("upsert", BCON_BOOL(true), "writeConcern", "{", "w",
                            BCON_UTF8("majority"), "}");
    bson_error_t berr;
    int rc = 0;
    if (!mongoc_collection_update_one(coll, filter, &update, opts, NULL, &berr)) {
        rc = mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, (int)berr.code,
                          "saving checkpoint of stream %s to %s.%s: %s", stream, ms->db,
                          ms->coll, berr.message);
    }
    bson_destroy(opts);
    bson_destroy(&update);
    bson_destroy(filter);
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
