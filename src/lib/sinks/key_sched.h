/*
 * key_sched.h: ordering per key with bounded concurrency, for sinks that deliver several
 * events at once (webhooks with `concurrency` and `order_key`).
 *
 * Items are pushed with a key (any bytes; NULL means "no key": never ordered against
 * anything). mc__ksched_next() hands out an item only when fewer than `concurrency` items are
 * in flight and no earlier item of the same key is in flight or waiting: items of one key
 * start one at a time, in push order, each after the previous one is done. Keys take turns
 * (a key with many items does not starve the others); items without a key are served in the
 * same rotation. The caller decides what "done" means (delivered, or given up on): until
 * mc__ksched_done() the key stays blocked, which is what keeps a retried item ahead of the
 * later items of its key.
 *
 * Bounds: at most `max_items` items held (queued + in flight); push answers MC_EAGAIN past
 * that. Memory: one record per key with items, freed when its last item is done.
 *
 * Not thread-safe: one owner thread (the sink's executor).
 */
#ifndef MC_SINKS_KEY_SCHED_H
#define MC_SINKS_KEY_SCHED_H

#include <stddef.h>

#include "mongocast/error.h"

typedef struct mc__ksched mc__ksched_t;

/* concurrency >= 1, max_items >= 1. NULL when memory runs out. */
mc__ksched_t *mc__ksched_new(size_t concurrency, size_t max_items);
/* Frees the scheduler (not the items). NULL-safe. */
void mc__ksched_destroy(mc__ksched_t *s);

/* Adds `item` (not NULL) under key[0..key_len) (key NULL: no key). 0, MC_EAGAIN (full),
 * MC_ENOMEM. */
int mc__ksched_push(mc__ksched_t *s, const void *key, size_t key_len, void *item);

/* The next item that may start now, or NULL. It counts as in flight until done. */
void *mc__ksched_next(mc__ksched_t *s);

/* `item` (handed out by next) is finished; its key may go on. MC_ENOTFOUND for an item
 * that is not in flight. */
int mc__ksched_done(mc__ksched_t *s, void *item);

size_t mc__ksched_in_flight(const mc__ksched_t *s);
size_t mc__ksched_queued(const mc__ksched_t *s);

#endif
