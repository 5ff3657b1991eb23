/*
 * token_store.c: dispatch through the token-store vtable and the record format shared by
 * the file and MongoDB backends.
 *
 * Any thread; the backends document their own blocking behaviour (both block: they are
 * called from watcher threads at start and from the checkpoint thread afterwards).
 *
 * A record is {token: {_data}, clusterTime, invalidate, definition: {ns, fingerprint,
 * options}, updatedAt} plus the backend's key fields (stream, sink). `definition` says which
 * stream definition wrote the record (ledger.c checks it at load); records written before it
 * existed have none and are accepted with a warning.
 */
#include "engine_private.h"

void mc__record_clear(mc__record_t *r)
{
    mc__position_clear(&r->pos);
    if (r->definition) {
        bson_destroy(r->definition);
    }
    r->definition = NULL;
}

int mc__record_from_bson(const bson_t *doc, const char *where, mc__record_t *out,
                         mc_error_t *err)
{
    bson_iter_t it, d;
    if (!bson_iter_init_find(&it, doc, "token") || !BSON_ITER_HOLDS_DOCUMENT(&it) ||
        !bson_iter_recurse(&it, &d) || !bson_iter_find(&d, "_data") ||
        !BSON_ITER_HOLDS_UTF8(&d)) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "%s: corrupt checkpoint: no token._data string", where);
    }
    const uint8_t *data;
    uint32_t len;
    bson_iter_document(&it, &len, &data);
    mc__record_clear(out);
    out->pos.token = bson_new_from_data(data, len);
    if (bson_iter_init_find(&it, doc, "invalidate") && BSON_ITER_HOLDS_BOOL(&it)) {
        out->pos.invalidate = bson_iter_bool(&it);
    }
    if (bson_iter_init_find(&it, doc, "clusterTime") && BSON_ITER_HOLDS_TIMESTAMP(&it)) {
        bson_iter_timestamp(&it, &out->pos.ct_t, &out->pos.ct_i);
    }
    if (bson_iter_init_find(&it, doc, "definition") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_document(&it, &len, &data);
        out->definition = bson_new_from_data(data, len);
    }
    return 0;
}

void mc__record_append(bson_t *doc, const mc__position_t *pos, const bson_t *definition)
{
    BSON_APPEND_DOCUMENT(doc, "token", pos->token);
    BSON_APPEND_TIMESTAMP(doc, "clusterTime", pos->ct_t, pos->ct_i);
    BSON_APPEND_BOOL(doc, "invalidate", pos->invalidate);
    if (definition) {
        BSON_APPEND_DOCUMENT(doc, "definition", definition);
    }
    BSON_APPEND_DATE_TIME(doc, "updatedAt", mc__wall_ms());
}

int mc__token_store_load(mc__token_store_t *s, const char *stream, const char *sink,
                         mc__record_t *out, mc_error_t *err)
{
    return s->vt->load(s, stream, sink, out, err);
}

int mc__token_store_save(mc__token_store_t *s, const char *stream, const char *sink,
                         const mc__position_t *pos, const bson_t *definition, mc_error_t *err)
{
    if (!pos->token) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "no resume token to store for stream %s", stream);
    }
    return s->vt->save(s, stream, sink, pos, definition, err);
}

void mc__token_store_destroy(mc__token_store_t *s)
{
    if (s) {
        s->vt->destroy(s);
    }
}
