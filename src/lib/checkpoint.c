/*
 * checkpoint.c: per-stream low-watermark of acknowledgements, i.e. the newest resume
 * position that is safe to store.
 *
 * Threads: the dispatch thread registers each event before publishing it (add) and marks it
 * offered to every sink (published); sinks ack from any thread; the watcher reserves a slot
 * before pushing an event (back-pressure); the checkpoint thread takes the stable position.
 * One mutex guards it all; no call blocks while holding it except the condition waits.
 *
 * Invariants: pending entries have contiguous, increasing sequence numbers starting at the
 * ring head; an entry completes when it was published and every durable sink in its
 * `required` mask acked it; the stable position only ever moves forward, to the token of the
 * newest completed entry that has one (or to a post-batch token that arrived after it).
 * Out-of-order acks are fine: completion is per entry, advancing stops at the first
 * incomplete one. `inflight` counts reservations not yet retired and never exceeds
 * `capacity`, which bounds the ring, so an add can never overflow it.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "engine_private.h"

typedef struct cp_entry {
    uint64_t seq;
    bson_t *token;         /* owned; NULL: the event carries no position (ready, reset) */
    bool invalidate;
    uint32_t ct_t, ct_i;
    uint64_t required;     /* durable sinks that must ack */
    uint64_t acked;
    bool published;
} cp_entry_t;

struct mc__checkpoint {
    pthread_mutex_t lock;
    pthread_cond_t cond;   /* broadcast when entries retire and on close */
    cp_entry_t *ring;
    uint32_t capacity;
    uint32_t head;
    uint32_t count;
    uint32_t inflight;     /* reserved and not yet retired */
    uint64_t last_added;   /* seq of the newest entry ever added; 0 = none */
    mc__position_t stable;
    bool dirty;            /* stable changed since the last take */
    bool closed;
};

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

mc__checkpoint_t *mc__checkpoint_new(uint32_t capacity)
{
    if (capacity == 0) {
        return NULL;
    }
    mc__checkpoint_t *cp = calloc(1, sizeof(*cp));
    if (!cp) {
        return NULL;
    }
    cp->ring = calloc(capacity, sizeof(cp_entry_t));
    if (!cp->ring) {
        free(cp);
        return NULL;
    }
    cp->capacity = capacity;
    pthread_mutex_init(&cp->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&cp->cond, &ca);
    pthread_condattr_destroy(&ca);
    return cp;
}

void mc__checkpoint_destroy(mc__checkpoint_t *cp)
{
    if (!cp) {
        return;
    }
    for (uint32_t i = 0; i < cp->count; i++) {
        cp_entry_t *e = &cp->ring[(cp->head + i) % cp->capacity];
        if (e->token) {
            bson_destroy(e->token);
        }
    }
    mc__position_clear(&cp->stable);
    pthread_cond_destroy(&cp->cond);
    pthread_mutex_destroy(&cp->lock);
    free(cp->ring);
    free(cp);
}

void mc__checkpoint_set_initial(mc__checkpoint_t *cp, const mc__position_t *pos)
{
    pthread_mutex_lock(&cp->lock);
    mc__position_clear(&cp->stable);
    mc__position_copy(&cp->stable, pos);
    cp->dirty = false;
    pthread_mutex_unlock(&cp->lock);
}

int mc__checkpoint_reserve(mc__checkpoint_t *cp, int64_t timeout_ms)
{
    struct timespec deadline;
    if (timeout_ms > 0) {
        mc__deadline_after_ms(&deadline, timeout_ms);
    }
    pthread_mutex_lock(&cp->lock);
    while (!cp->closed && cp->inflight >= cp->capacity) {
        if (timeout_ms == 0) {
            break;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&cp->cond, &cp->lock);
        } else if (pthread_cond_timedwait(&cp->cond, &cp->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int rc;
    if (cp->closed) {
        rc = MC_ECLOSED;
    } else if (cp->inflight >= cp->capacity) {
        rc = MC_EAGAIN;
    } else {
        cp->inflight++;
        rc = 0;
    }
    pthread_mutex_unlock(&cp->lock);
    return rc;
}

static cp_entry_t *find(mc__checkpoint_t *cp, uint64_t seq)
{
    if (cp->count == 0) {
        return NULL;
    }
    uint64_t first = cp->ring[cp->head].seq;
    if (seq < first || seq - first >= cp->count) {
        return NULL;
    }
    return &cp->ring[(cp->head + (uint32_t)(seq - first)) % cp->capacity];
}

static void set_stable_token(mc__checkpoint_t *cp, bson_t *token_take, bool invalidate,
                             uint32_t ct_t, uint32_t ct_i)
{
    if (cp->stable.token) {
        bson_destroy(cp->stable.token);
    }
    cp->stable.token = token_take;
    cp->stable.invalidate = invalidate;
    cp->stable.ct_t = ct_t;
    cp->stable.ct_i = ct_i;
    cp->dirty = true;
}

/* Retires completed entries from the head. Called with the lock held. */
static void advance(mc__checkpoint_t *cp)
{
    bool retired = false;
    while (cp->count > 0) {
        cp_entry_t *e = &cp->ring[cp->head];
        if (!e->published || (e->acked & e->required) != e->required) {
            break;
        }
        if (e->token) {
            set_stable_token(cp, e->token, e->invalidate, e->ct_t, e->ct_i);
            e->token = NULL;
        }
        cp->stable.seq = e->seq;
        cp->head = (cp->head + 1) % cp->capacity;
        cp->count--;
        if (cp->inflight > 0) {
            cp->inflight--;
        }
        retired = true;
    }
    if (retired) {
        pthread_cond_broadcast(&cp->cond);
    }
}

int mc__checkpoint_add(mc__checkpoint_t *cp, uint64_t seq, const bson_t *token, bool invalidate,
                       uint32_t ct_t, uint32_t ct_i, uint64_t required)
{
    pthread_mutex_lock(&cp->lock);
    if (seq == 0 || (cp->last_added != 0 && seq != cp->last_added + 1) ||
        cp->count >= cp->capacity) {
        pthread_mutex_unlock(&cp->lock);
        return MC_EINVAL;
    }
    cp_entry_t *e = &cp->ring[(cp->head + cp->count) % cp->capacity];
    e->seq = seq;
    e->token = token ? bson_copy(token) : NULL;
    e->invalidate = invalidate;
    e->ct_t = ct_t;
    e->ct_i = ct_i;
    e->required = required;
    e->acked = 0;
    e->published = false;
    cp->count++;
    cp->last_added = seq;
    pthread_mutex_unlock(&cp->lock);
    return 0;
}

void mc__checkpoint_published(mc__checkpoint_t *cp, uint64_t seq)
{
    pthread_mutex_lock(&cp->lock);
    cp_entry_t *e = find(cp, seq);
    if (e) {
        e->published = true;
        advance(cp);
    }
    pthread_mutex_unlock(&cp->lock);
}

void mc__checkpoint_published_range(mc__checkpoint_t *cp, uint64_t first, uint64_t last)
{
    pthread_mutex_lock(&cp->lock);
    bool any = false;
    for (uint64_t seq = first; seq <= last; seq++) {
        cp_entry_t *e = find(cp, seq);
        if (e) {
            e->published = true;
            any = true;
        }
        if (seq == UINT64_MAX) {
            break; /* seq++ would wrap */
        }
    }
    if (any) {
        advance(cp);
    }
    pthread_mutex_unlock(&cp->lock);
}

void mc__checkpoint_ack(mc__checkpoint_t *cp, uint64_t seq, int bit)
{
    if (bit < 0 || bit >= 64) {
        return;
    }
    pthread_mutex_lock(&cp->lock);
    cp_entry_t *e = find(cp, seq);
    if (e) {
        e->acked |= (uint64_t)1 << bit;
        advance(cp);
    }
    pthread_mutex_unlock(&cp->lock);
}

void mc__checkpoint_position(mc__checkpoint_t *cp, const bson_t *token, bool invalidate,
                             uint32_t ct_t, uint32_t ct_i)
{
    if (!token) {
        return;
    }
    bson_t *copy = bson_copy(token);
    pthread_mutex_lock(&cp->lock);
    if (cp->count == 0) {
        set_stable_token(cp, copy, invalidate, ct_t, ct_i);
    } else {
        /* The post-batch token lies after every pending event, so it may only become stable
         * together with the newest of them: it replaces that entry's token. */
        cp_entry_t *last = &cp->ring[(cp->head + cp->count - 1) % cp->capacity];
        if (last->token) {
            bson_destroy(last->token);
        }
        last->token = copy;
        last->invalidate = invalidate;
        if (ct_t || ct_i) {
            last->ct_t = ct_t;
            last->ct_i = ct_i;
        }
    }
    pthread_mutex_unlock(&cp->lock);
}

bool mc__checkpoint_take_dirty(mc__checkpoint_t *cp, mc__position_t *out)
{
    pthread_mutex_lock(&cp->lock);
    bool dirty = cp->dirty && cp->stable.token != NULL;
    if (dirty) {
        mc__position_copy(out, &cp->stable);
        cp->dirty = false;
    }
    pthread_mutex_unlock(&cp->lock);
    return dirty;
}

void mc__checkpoint_set_dirty(mc__checkpoint_t *cp)
{
    pthread_mutex_lock(&cp->lock);
    cp->dirty = true;
    pthread_mutex_unlock(&cp->lock);
}

void mc__checkpoint_stable(mc__checkpoint_t *cp, mc__position_t *out)
{
    pthread_mutex_lock(&cp->lock);
    mc__position_copy(out, &cp->stable);
    pthread_mutex_unlock(&cp->lock);
}

uint32_t mc__checkpoint_pending(mc__checkpoint_t *cp)
{
    pthread_mutex_lock(&cp->lock);
    uint32_t n = cp->count;
    pthread_mutex_unlock(&cp->lock);
    return n;
}

int mc__checkpoint_wait_idle(mc__checkpoint_t *cp, int64_t timeout_ms)
{
    struct timespec deadline;
    mc__deadline_after_ms(&deadline, timeout_ms > 0 ? timeout_ms : 0);
    pthread_mutex_lock(&cp->lock);
    while (cp->count > 0) {
        if (pthread_cond_timedwait(&cp->cond, &cp->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int rc = cp->count == 0 ? 0 : MC_EAGAIN;
    pthread_mutex_unlock(&cp->lock);
    return rc;
}

void mc__checkpoint_close(mc__checkpoint_t *cp)
{
    pthread_mutex_lock(&cp->lock);
    cp->closed = true;
    pthread_cond_broadcast(&cp->cond);
    pthread_mutex_unlock(&cp->lock);
}
