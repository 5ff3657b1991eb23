/*
 * token_store.c: dispatch through the token-store vtable and the record format shared by
 * the file and MongoDB backends.
 *
 * Any thread; the backends document their own blocking behaviour (both block: they are
 * called from watcher threads at start and from the checkpoint thread afterwards).
 */
#include "engine_private.h"

int mc__token_store_load(mc__token_store_t *s, const char *stream, mc__position_t *out,
                         mc_error_t *err)
{
    return s->vt->load(s, stream, out, err);
}

int mc__token_store_save(mc__token_store_t *s, const char *stream, const mc__position_t *pos,
                         mc_error_t *err)
{
    if (!pos->token) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "no resume token to store for stream %s", stream);
    }
    return s->vt->save(s, stream, pos, err);
}

void mc__token_store_destroy(mc__token_store_t *s)
{
    if (s) {
        s->vt->destroy(s);
    }
}
