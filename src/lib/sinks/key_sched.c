/*
 * key_sched.c: per-key ordering with bounded concurrency (key_sched.h).
 *
 * One owner thread. Structures: a record per key that has items (its FIFO of waiting items,
 * whether one of its items is in flight), found through a hash table; a FIFO of "ready" key
 * records (something waiting, nothing in flight); a small array of the items in flight with
 * their records. Items without a key get a record of their own that is never entered in the
 * table. Invariants: a record is in the ready FIFO iff it has waiting items and is not busy;
 * a record exists iff it has waiting items or is busy.
 */
#include "sinks/key_sched.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct node {
    struct node *next;
    void *item;
} node_t;

typedef struct krec {
    struct krec *hnext; /* hash chain */
    struct krec *rnext; /* ready FIFO */
    node_t *head, *tail;
    bool busy, ready, keyed;
    uint64_t hash;
    size_t klen;
    unsigned char key[];
} krec_t;

typedef struct flight {
    void *item;
    krec_t *rec;
} flight_t;

struct mc__ksched {
    size_t concurrency, max_items;
    size_t queued;
    krec_t **table;
    size_t table_size;
    krec_t *ready_head, *ready_tail;
    flight_t *flight;
    size_t n_flight;
};

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ b[i]) * 1099511628211ull;
    }
    return h;
}

mc__ksched_t *mc__ksched_new(size_t concurrency, size_t max_items)
{
    mc__ksched_t *s = calloc(1, sizeof(*s));
    if (!s) {
        return NULL;
    }
    s->concurrency = concurrency ? concurrency : 1;
    s->max_items = max_items ? max_items : 1;
    s->table_size = 16;
    while (s->table_size < s->max_items && s->table_size < 65536) {
        s->table_size <<= 1;
    }
    s->table = calloc(s->table_size, sizeof *s->table);
    s->flight = calloc(s->concurrency, sizeof *s->flight);
    if (!s->table || !s->flight) {
        mc__ksched_destroy(s);
        return NULL;
    }
    return s;
}

static void free_rec(krec_t *r)
{
    node_t *n = r->head;
    while (n) {
        node_t *next = n->next;
        free(n);
        n = next;
    }
    free(r);
}

void mc__ksched_destroy(mc__ksched_t *s)
{
    if (!s) {
        return;
    }
    /* Keyless records live only in the ready FIFO or in flight; free them first, while the
     * keyed records they are chained with are still there to read. */
    for (krec_t *r = s->ready_head; r;) {
        krec_t *next = r->rnext;
        if (!r->keyed) {
            free_rec(r);
        }
        r = next;
    }
    for (size_t i = 0; s->flight && i < s->n_flight; i++) {
        if (!s->flight[i].rec->keyed) {
            free_rec(s->flight[i].rec);
        }
    }
    for (size_t i = 0; s->table && i < s->table_size; i++) {
        krec_t *r = s->table[i];
        while (r) {
            krec_t *next = r->hnext;
            free_rec(r);
            r = next;
        }
    }
    free(s->table);
    free(s->flight);
    free(s);
}

static void make_ready(mc__ksched_t *s, krec_t *r)
{
    if (r->ready || r->busy || !r->head) {
        return;
    }
    r->ready = true;
    r->rnext = NULL;
    if (s->ready_tail) {
        s->ready_tail->rnext = r;
    } else {
        s->ready_head = r;
    }
    s->ready_tail = r;
}

static krec_t *find_or_add(mc__ksched_t *s, const void *key, size_t klen)
{
    if (!key) {
        krec_t *r = calloc(1, sizeof(*r));
        return r;
    }
    uint64_t h = hash_bytes(key, klen);
    krec_t **pp = &s->table[h & (s->table_size - 1)];
    for (krec_t *r = *pp; r; r = r->hnext) {
        if (r->hash == h && r->klen == klen && memcmp(r->key, key, klen) == 0) {
            return r;
        }
    }
    krec_t *r = calloc(1, sizeof(*r) + klen);
    if (!r) {
        return NULL;
    }
    r->keyed = true;
    r->hash = h;
    r->klen = klen;
    memcpy(r->key, key, klen);
    r->hnext = *pp;
    *pp = r;
    return r;
}

static void remove_rec(mc__ksched_t *s, krec_t *r)
{
    if (r->keyed) {
        krec_t **pp = &s->table[r->hash & (s->table_size - 1)];
        while (*pp && *pp != r) {
            pp = &(*pp)->hnext;
        }
        if (*pp) {
            *pp = r->hnext;
        }
    }
    free(r);
}

int mc__ksched_push(mc__ksched_t *s, const void *key, size_t key_len, void *item)
{
    if (!item) {
        return MC_EINVAL;
    }
    if (s->queued + s->n_flight >= s->max_items) {
        return MC_EAGAIN;
    }
    node_t *n = calloc(1, sizeof(*n));
    krec_t *r = n ? find_or_add(s, key, key_len) : NULL;
    if (!r) {
        free(n);
        return MC_ENOMEM;
    }
    n->item = item;
    if (r->tail) {
        r->tail->next = n;
    } else {
        r->head = n;
    }
    r->tail = n;
    s->queued++;
    make_ready(s, r);
    return 0;
}

void *mc__ksched_next(mc__ksched_t *s)
{
    if (s->n_flight >= s->concurrency || !s->ready_head) {
        return NULL;
    }
    krec_t *r = s->ready_head;
    s->ready_head = r->rnext;
    if (!s->ready_head) {
        s->ready_tail = NULL;
    }
    r->ready = false;
    node_t *n = r->head;
    r->head = n->next;
    if (!r->head) {
        r->tail = NULL;
    }
    void *item = n->item;
    free(n);
    s->queued--;
    r->busy = true;
    s->flight[s->n_flight].item = item;
    s->flight[s->n_flight].rec = r;
    s->n_flight++;
    return item;
}

int mc__ksched_done(mc__ksched_t *s, void *item)
{
    for (size_t i = 0; i < s->n_flight; i++) {
        if (s->flight[i].item != item) {
            continue;
        }
        krec_t *r = s->flight[i].rec;
        s->flight[i] = s->flight[--s->n_flight];
        r->busy = false;
        if (r->head) {
            make_ready(s, r);
        } else {
            remove_rec(s, r);
        }
        return 0;
    }
    return MC_ENOTFOUND;
}

size_t mc__ksched_in_flight(const mc__ksched_t *s)
{
    return s->n_flight;
}

size_t mc__ksched_queued(const mc__ksched_t *s)
{
    return s->queued;
}
