/*
 * position.c: resume positions as values (mc__position_t), as shared references (marks and
 * prefs), and the resume-token helpers every module compares positions with.
 *
 * Any thread: marks are immutable after creation and refcounted atomically like events; a
 * pref is a plain struct owned by whoever holds it.
 *
 * Ordering rule (used by the router's skip points, catch-up rejoins and the ledger's oldest
 * position): the `_data` of two resume tokens of one stream compare as strings in the order
 * of the changes. `_data` is the hex of a KeyString that starts with the clusterTime and the
 * token type, so events compare by (clusterTime, txnOpIndex, ...) and a post-batch
 * high-water mark sorts after every event it covers and before the next one. Tokens without
 * `_data` (servers before 4.2) are not comparable: callers then deliver rather than skip.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

void mc__position_clear(mc__position_t *p)
{
    if (p->token) {
        bson_destroy(p->token);
    }
    p->token = NULL;
    p->invalidate = false;
    p->ct_t = p->ct_i = 0;
    p->seq = 0;
}

void mc__position_copy(mc__position_t *dst, const mc__position_t *src)
{
    dst->token = src->token ? bson_copy(src->token) : NULL;
    dst->invalidate = src->invalidate;
    dst->ct_t = src->ct_t;
    dst->ct_i = src->ct_i;
    dst->seq = src->seq;
}

const char *mc__token_data(const bson_t *token)
{
    bson_iter_t it;
    if (token && bson_iter_init_find(&it, token, "_data") && BSON_ITER_HOLDS_UTF8(&it)) {
        return bson_iter_utf8(&it, NULL);
    }
    return NULL;
}

bool mc__token_cluster_time(const bson_t *token, uint32_t *t, uint32_t *i)
{
    *t = *i = 0;
    const char *hex = mc__token_data(token);
    if (!hex || strlen(hex) < 18 || hex[0] != '8' || hex[1] != '2') {
        return false;
    }
    uint64_t v = 0;
    for (int k = 2; k < 18; k++) {
        char c = hex[k];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                       : -1;
        if (d < 0) {
            return false;
        }
        v = (v << 4) | (uint64_t)d;
    }
    *t = (uint32_t)(v >> 32);
    *i = (uint32_t)v;
    return true;
}

int mc__token_data_cmp(const char *a, const char *b)
{
    int c = strcmp(a, b);
    return c < 0 ? -1 : c > 0;
}

/* ---- Marks ----------------------------------------------------------------------------------- */

mc__mark_t *mc__mark_new(int stream_index, const bson_t *token, bool invalidate, uint64_t seq)
{
    if (!token) {
        return NULL;
    }
    mc__mark_t *m = calloc(1, sizeof(*m));
    if (!m) {
        return NULL;
    }
    m->token = bson_copy(token);
    if (!m->token) {
        free(m);
        return NULL;
    }
    atomic_init(&m->refs, 1);
    m->stream_index = stream_index;
    m->data = mc__token_data(m->token);
    m->invalidate = invalidate;
    m->seq = seq;
    mc__token_cluster_time(m->token, &m->ct_t, &m->ct_i);
    return m;
}

mc__mark_t *mc__mark_from_position(int stream_index, const mc__position_t *pos)
{
    mc__mark_t *m = mc__mark_new(stream_index, pos->token, pos->invalidate, pos->seq);
    if (m && (pos->ct_t || pos->ct_i)) {
        m->ct_t = pos->ct_t;
        m->ct_i = pos->ct_i;
    }
    return m;
}

mc__mark_t *mc__mark_ref(mc__mark_t *m)
{
    if (m) {
        atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed);
    }
    return m;
}

void mc__mark_unref(mc__mark_t **mp)
{
    mc__mark_t *m = mp ? *mp : NULL;
    if (!m) {
        return;
    }
    *mp = NULL;
    if (atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) == 1) {
        bson_destroy(m->token);
        free(m);
    }
}

/* ---- Prefs ----------------------------------------------------------------------------------- */

const char *mc__pref_data(const mc__pref_t *p)
{
    if (p->ev) {
        return mc_event_id(p->ev);
    }
    return p->mark ? p->mark->data : NULL;
}

bool mc__pref_empty(const mc__pref_t *p)
{
    return !p->ev && !p->mark;
}

void mc__pref_clear(mc__pref_t *p)
{
    mc_event_unref(&p->ev);
    mc__mark_unref(&p->mark);
}

void mc__pref_move(mc__pref_t *dst, mc__pref_t *src)
{
    if (dst == src) {
        return;
    }
    mc__pref_clear(dst);
    *dst = *src;
    src->ev = NULL;
    src->mark = NULL;
}

void mc__pref_copy(mc__pref_t *dst, const mc__pref_t *src)
{
    dst->ev = mc_event_ref(src->ev);
    dst->mark = mc__mark_ref(src->mark);
}

void mc__pref_position(const mc__pref_t *p, mc__position_t *out)
{
    mc__position_clear(out);
    if (p->ev) {
        const bson_t *tok = mc_event_resume_token(p->ev);
        out->token = tok ? bson_copy(tok) : NULL;
        out->invalidate = mc_event_kind(p->ev) == MC_EVENT_INVALIDATE;
        if (!mc_event_cluster_time(p->ev, &out->ct_t, &out->ct_i) && tok) {
            mc__token_cluster_time(tok, &out->ct_t, &out->ct_i);
        }
        out->seq = mc_event_seq(p->ev);
    } else if (p->mark) {
        out->token = bson_copy(p->mark->token);
        out->invalidate = p->mark->invalidate;
        out->ct_t = p->mark->ct_t;
        out->ct_i = p->mark->ct_i;
        out->seq = p->mark->seq;
    }
}
