/*
 * queue.c: the bounded multi-producer, single-consumer queue between the watcher threads and
 * the dispatch thread.
 *
 * Producers are the watcher threads, the consumer is the dispatch thread (the engine's
 * consumer thread, or the embedder's loop thread). A fixed ring of `capacity` slots under one
 * mutex with two condition variables. Invariants: 0 <= count <= capacity; items leave in the
 * order they entered. A full queue blocks the producer (up to its timeout) rather than
 * dropping: a slow sink slows the watcher down, and the watcher simply reads MongoDB later,
 * which is where the history is kept. The notify hook runs outside the lock on the
 * empty -> non-empty edge only, so an event loop gets one wakeup per burst.
 *
 * Wake-ups: a producer signals the consumer only when the consumer sleeps waiting for work
 * (WAIT_IDLE), or lingers (WAIT_LINGER, mc__queue_pop_batch()) and the queue has reached
 * `wake_at` items. A lingering consumer wakes up by itself after at most linger_us, so under
 * load the consumer takes batches instead of being woken for each item, and an idle consumer
 * is still woken by the first push at once. wake_at <= capacity, so a full queue (producers
 * blocked) always has its consumer awake.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#define WAKE_AT_ITEMS 64 /* a lingering consumer is woken once this many items wait */

typedef enum consumer_state {
    RUNNING = 0,  /* not waiting: producers need not signal */
    WAIT_IDLE,    /* waiting for the next item: every push signals */
    WAIT_LINGER,  /* waiting (timed) for a batch: pushes signal from wake_at items on */
} consumer_state_t;

#include "engine_private.h"

struct mc__queue {
    pthread_mutex_t lock;
    pthread_cond_t not_empty; /* signalled on push, broadcast on close */
    pthread_cond_t not_full;  /* signalled on pop, broadcast on close */
    void **slots;             /* ring of capacity items */
    size_t capacity;
    size_t head;              /* index of the oldest item */
    size_t count;
    bool closed;
    consumer_state_t consumer;
    size_t wake_at;
    mc__queue_notify_fn notify;
    void *notify_ud;
};

mc__queue_t *mc__queue_new(size_t capacity)
{
    if (capacity == 0) {
        return NULL;
    }
    mc__queue_t *q = calloc(1, sizeof(*q));
    if (!q) {
        return NULL;
    }
    q->slots = calloc(capacity, sizeof(void *));
    if (!q->slots) {
        free(q);
        return NULL;
    }
    q->capacity = capacity;
    q->wake_at = capacity < WAKE_AT_ITEMS ? capacity : WAKE_AT_ITEMS;
    pthread_mutex_init(&q->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->not_empty, &ca);
    pthread_cond_init(&q->not_full, &ca);
    pthread_condattr_destroy(&ca);
    return q;
}

void mc__queue_destroy(mc__queue_t *q, void (*free_item)(void *item))
{
    if (!q) {
        return;
    }
    if (free_item) {
        for (size_t i = 0; i < q->count; i++) {
            free_item(q->slots[(q->head + i) % q->capacity]);
        }
    }
    pthread_cond_destroy(&q->not_empty);
    pthread_cond_destroy(&q->not_full);
    pthread_mutex_destroy(&q->lock);
    free(q->slots);
    free(q);
}

void mc__queue_set_notify(mc__queue_t *q, mc__queue_notify_fn fn, void *userdata)
{
    pthread_mutex_lock(&q->lock);
    q->notify = fn;
    q->notify_ud = userdata;
    pthread_mutex_unlock(&q->lock);
}

/* Waits on `cond` until `ready` holds, the queue closes, or the deadline passes. Returns 0
 * when the wait ended for a reason other than the timeout. Called with the lock held. */
static int wait_until(mc__queue_t *q, pthread_cond_t *cond, bool (*ready)(const mc__queue_t *),
                      int64_t timeout_ms)
{
    struct timespec deadline;
    if (timeout_ms > 0) {
        mc__deadline_after_ms(&deadline, timeout_ms);
    }
    while (!ready(q) && !q->closed) {
        if (timeout_ms == 0) {
            return ETIMEDOUT;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(cond, &q->lock);
        } else if (pthread_cond_timedwait(cond, &q->lock, &deadline) == ETIMEDOUT) {
            return ready(q) || q->closed ? 0 : ETIMEDOUT;
        }
    }
    return 0;
}

static bool has_room(const mc__queue_t *q)
{
    return q->count < q->capacity;
}

static bool has_items(const mc__queue_t *q)
{
    return q->count > 0;
}

int mc__queue_push(mc__queue_t *q, void *item, int64_t timeout_ms)
{
    pthread_mutex_lock(&q->lock);
    if (wait_until(q, &q->not_full, has_room, timeout_ms) != 0) {
        pthread_mutex_unlock(&q->lock);
        return MC_EAGAIN;
    }
    if (q->closed) {
        pthread_mutex_unlock(&q->lock);
        return MC_ECLOSED;
    }
    q->slots[(q->head + q->count) % q->capacity] = item;
    q->count++;
    bool was_empty = q->count == 1;
    mc__queue_notify_fn fn = q->notify;
    void *ud = q->notify_ud;
    if (q->consumer == WAIT_IDLE || (q->consumer == WAIT_LINGER && q->count >= q->wake_at)) {
        pthread_cond_signal(&q->not_empty);
    }
    pthread_mutex_unlock(&q->lock);
    if (was_empty && fn) {
        fn(ud);
    }
    return 0;
}

/* Takes up to max items and unlocks. */
static size_t take_locked(mc__queue_t *q, void **items, size_t max, bool *closed)
{
    size_t n = 0;
    while (n < max && q->count > 0) {
        items[n++] = q->slots[q->head];
        q->slots[q->head] = NULL;
        q->head = (q->head + 1) % q->capacity;
        q->count--;
    }
    if (n > 0) {
        /* Several slots may have freed up: wake every waiting producer, not just one. */
        pthread_cond_broadcast(&q->not_full);
    } else if (q->closed && closed) {
        *closed = true;
    }
    pthread_mutex_unlock(&q->lock);
    return n;
}

size_t mc__queue_pop(mc__queue_t *q, void **items, size_t max, int64_t timeout_ms, bool *closed)
{
    if (closed) {
        *closed = false;
    }
    pthread_mutex_lock(&q->lock);
    q->consumer = WAIT_IDLE;
    wait_until(q, &q->not_empty, has_items, timeout_ms);
    q->consumer = RUNNING;
    return take_locked(q, items, max, closed);
}

size_t mc__queue_pop_batch(mc__queue_t *q, void **items, size_t max, int64_t linger_us,
                           bool *closed)
{
    if (closed) {
        *closed = false;
    }
    pthread_mutex_lock(&q->lock);
    /* Items already waiting are taken at once: only a sleep costs a wake-up. */
    if (q->count == 0 && !q->closed && linger_us > 0) {
        struct timespec deadline;
        mc__deadline_after_us(&deadline, linger_us);
        q->consumer = WAIT_LINGER;
        while (q->count < q->wake_at && !q->closed) {
            if (pthread_cond_timedwait(&q->not_empty, &q->lock, &deadline) == ETIMEDOUT) {
                break;
            }
        }
    }
    q->consumer = WAIT_IDLE;
    while (q->count == 0 && !q->closed) {
        pthread_cond_wait(&q->not_empty, &q->lock);
    }
    q->consumer = RUNNING;
    return take_locked(q, items, max, closed);
}

void mc__queue_close(mc__queue_t *q)
{
    pthread_mutex_lock(&q->lock);
    q->closed = true;
    pthread_cond_broadcast(&q->not_empty);
    pthread_cond_broadcast(&q->not_full);
    mc__queue_notify_fn fn = q->notify;
    void *ud = q->notify_ud;
    pthread_mutex_unlock(&q->lock);
    /* An external dispatcher must learn about the close too, to finish draining. */
    if (fn) {
        fn(ud);
    }
}

size_t mc__queue_len(mc__queue_t *q)
{
    pthread_mutex_lock(&q->lock);
    size_t n = q->count;
    pthread_mutex_unlock(&q->lock);
    return n;
}

size_t mc__queue_capacity(const mc__queue_t *q)
{
    return q->capacity;
}
