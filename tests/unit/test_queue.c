/*
 * test_queue.c: the bounded MPSC queue: FIFO order, bound, blocking push with timeout
 * (back-pressure instead of drops), close semantics, notify edge, several producers
 * against one consumer without loss or reordering per producer, and the consumer thread's
 * batching pop (linger, early wake at wake_at items, idle wake on the first push, close).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "engine_private.h"

static void test_fifo_and_bound(void **state)
{
    (void)state;
    assert_null(mc__queue_new(0));
    mc__queue_t *q = mc__queue_new(3);
    int v[4] = {1, 2, 3, 4};
    assert_int_equal(mc__queue_push(q, &v[0], 0), 0);
    assert_int_equal(mc__queue_push(q, &v[1], 0), 0);
    assert_int_equal(mc__queue_push(q, &v[2], 0), 0);
    assert_int_equal(mc__queue_len(q), 3);
    /* Full: a non-waiting push fails with EAGAIN and does not enqueue. */
    assert_int_equal(mc__queue_push(q, &v[3], 0), MC_EAGAIN);
    int64_t t0 = mc__now_ms();
    assert_int_equal(mc__queue_push(q, &v[3], 120), MC_EAGAIN);
    int64_t waited = mc__now_ms() - t0;
    assert_true(waited >= 100 && waited < 2000);
    assert_int_equal(mc__queue_len(q), 3);

    void *items[8];
    size_t n = mc__queue_pop(q, items, 2, 0, NULL);
    assert_int_equal(n, 2);
    assert_ptr_equal(items[0], &v[0]);
    assert_ptr_equal(items[1], &v[1]);
    /* Wrap around the ring. */
    assert_int_equal(mc__queue_push(q, &v[3], 0), 0);
    assert_int_equal(mc__queue_push(q, &v[0], 0), 0);
    n = mc__queue_pop(q, items, 8, 0, NULL);
    assert_int_equal(n, 3);
    assert_ptr_equal(items[0], &v[2]);
    assert_ptr_equal(items[1], &v[3]);
    assert_ptr_equal(items[2], &v[0]);
    /* Empty pop with timeout returns nothing after waiting. */
    t0 = mc__now_ms();
    bool closed = true;
    assert_int_equal(mc__queue_pop(q, items, 8, 80, &closed), 0);
    assert_false(closed);
    assert_true(mc__now_ms() - t0 >= 60);
    mc__queue_destroy(q, NULL);
}

typedef struct slow_consumer {
    mc__queue_t *q;
    int64_t delay_ms;
    void *got;
} slow_consumer_t;

static void *pop_later(void *arg)
{
    slow_consumer_t *c = arg;
    struct timespec ts = {0, (long)c->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    void *items[1];
    mc__queue_pop(c->q, items, 1, -1, NULL);
    c->got = items[0];
    return NULL;
}

static void test_blocking_push_waits_for_room(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(1);
    int a = 1, b = 2;
    assert_int_equal(mc__queue_push(q, &a, 0), 0);
    slow_consumer_t c = {q, 150, NULL};
    pthread_t th;
    pthread_create(&th, NULL, pop_later, &c);
    int64_t t0 = mc__now_ms();
    /* Blocks until the consumer makes room, then succeeds: back-pressure, not a drop. */
    assert_int_equal(mc__queue_push(q, &b, 5000), 0);
    assert_true(mc__now_ms() - t0 >= 100);
    pthread_join(th, NULL);
    assert_ptr_equal(c.got, &a);
    void *items[2];
    assert_int_equal(mc__queue_pop(q, items, 2, 0, NULL), 1);
    assert_ptr_equal(items[0], &b);
    mc__queue_destroy(q, NULL);
}

typedef struct closer {
    mc__queue_t *q;
    int rc;
} closer_t;

static void *push_blocked(void *arg)
{
    closer_t *c = arg;
    static int x;
    c->rc = mc__queue_push(c->q, &x, -1);
    return NULL;
}

static void test_close(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(1);
    int a = 1;
    assert_int_equal(mc__queue_push(q, &a, 0), 0);
    closer_t c = {q, 99};
    pthread_t th;
    pthread_create(&th, NULL, push_blocked, &c);
    struct timespec ts = {0, 50 * 1000000L};
    nanosleep(&ts, NULL);
    mc__queue_close(q); /* wakes the producer blocked forever */
    pthread_join(th, NULL);
    assert_int_equal(c.rc, MC_ECLOSED);
    assert_int_equal(mc__queue_push(q, &a, 0), MC_ECLOSED);
    /* Items queued before the close still drain, then the queue reports closed. */
    void *items[2];
    bool closed = false;
    assert_int_equal(mc__queue_pop(q, items, 2, -1, &closed), 1);
    assert_false(closed);
    assert_int_equal(mc__queue_pop(q, items, 2, -1, &closed), 0);
    assert_true(closed);
    mc__queue_destroy(q, NULL);
}

static int notified;
static void count_notify(void *ud)
{
    (void)ud;
    notified++;
}

static void free_int(void *p)
{
    free(p);
}

static void test_notify_edge_and_destroy_frees(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(8);
    mc__queue_set_notify(q, count_notify, NULL);
    notified = 0;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(mc__queue_push(q, malloc(4), 0), 0);
    }
    assert_int_equal(notified, 1); /* only on empty -> non-empty */
    void *items[8];
    size_t n = mc__queue_pop(q, items, 8, 0, NULL);
    for (size_t i = 0; i < n; i++) {
        free(items[i]);
    }
    assert_int_equal(mc__queue_push(q, malloc(4), 0), 0);
    assert_int_equal(mc__queue_push(q, malloc(4), 0), 0);
    assert_int_equal(notified, 2);
    mc__queue_destroy(q, free_int); /* ASan: the two queued blocks must be freed */
}

#define PRODUCERS 4
#define PER_PRODUCER 5000

typedef struct producer {
    mc__queue_t *q;
    int id;
} producer_t;

static void *produce(void *arg)
{
    producer_t *p = arg;
    for (intptr_t i = 0; i < PER_PRODUCER; i++) {
        intptr_t v = (intptr_t)p->id * 1000000 + i + 1;
        assert_int_equal(mc__queue_push(p->q, (void *)v, -1), 0);
    }
    return NULL;
}

static void test_many_producers_one_consumer(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(16); /* small: producers block a lot */
    pthread_t th[PRODUCERS];
    producer_t p[PRODUCERS];
    for (int k = 0; k < PRODUCERS; k++) {
        p[k].q = q;
        p[k].id = k;
        pthread_create(&th[k], NULL, produce, &p[k]);
    }
    intptr_t next[PRODUCERS] = {0};
    size_t total = 0;
    void *items[7];
    while (total < PRODUCERS * PER_PRODUCER) {
        size_t n = mc__queue_pop(q, items, 7, 2000, NULL);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++) {
            intptr_t v = (intptr_t)items[i];
            int id = (int)(v / 1000000);
            assert_true(id >= 0 && id < PRODUCERS);
            /* Per producer, values arrive in the order pushed, with no gap. */
            assert_int_equal(v % 1000000, next[id] + 1);
            next[id]++;
        }
        total += n;
    }
    for (int k = 0; k < PRODUCERS; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(next[k], PER_PRODUCER);
    }
    assert_int_equal(mc__queue_len(q), 0);
    mc__queue_destroy(q, NULL);
}

/* ---- mc__queue_pop_batch ------------------------------------------------------------ */

typedef struct batch_consumer {
    mc__queue_t *q;
    int64_t linger_us;
    size_t n;
    bool closed;
    int64_t elapsed_ms;
    void *items[16];
} batch_consumer_t;

static void *batch_consume(void *arg)
{
    batch_consumer_t *c = arg;
    int64_t t0 = mc__now_ms();
    c->n = mc__queue_pop_batch(c->q, c->items, 16, c->linger_us, &c->closed);
    c->elapsed_ms = mc__now_ms() - t0;
    return NULL;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void test_pop_batch_takes_waiting_items_at_once(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(128);
    int v[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(mc__queue_push(q, &v[i], 0), 0);
    }
    void *items[16];
    bool closed = true;
    int64_t t0 = mc__now_ms();
    /* A long linger must not delay items that are already there. */
    assert_int_equal(mc__queue_pop_batch(q, items, 2, 5 * 1000 * 1000, &closed), 2);
    assert_false(closed);
    assert_ptr_equal(items[0], &v[0]);
    assert_ptr_equal(items[1], &v[1]);
    assert_int_equal(mc__queue_pop_batch(q, items, 16, 5 * 1000 * 1000, &closed), 1);
    assert_ptr_equal(items[0], &v[2]);
    assert_true(mc__now_ms() - t0 < 1000);
    mc__queue_destroy(q, NULL);
}

static void test_pop_batch_lingers_for_a_batch(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(128); /* wake_at: 64 */
    batch_consumer_t c = {.q = q, .linger_us = 300 * 1000};
    pthread_t th;
    pthread_create(&th, NULL, batch_consume, &c);
    sleep_ms(30);
    int v[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(mc__queue_push(q, &v[i], 0), 0);
    }
    pthread_join(th, NULL);
    /* The pushes did not wake the lingering consumer one by one: it took all three at the
     * end of its linger. */
    assert_int_equal(c.n, 3);
    assert_ptr_equal(c.items[0], &v[0]);
    assert_ptr_equal(c.items[2], &v[2]);
    assert_true(c.elapsed_ms >= 250);
    assert_true(c.elapsed_ms < 3000);
    mc__queue_destroy(q, NULL);
}

static void test_pop_batch_wakes_early_when_batch_is_full(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(8); /* wake_at = capacity: a full queue wakes it */
    batch_consumer_t c = {.q = q, .linger_us = 20 * 1000 * 1000};
    pthread_t th;
    pthread_create(&th, NULL, batch_consume, &c);
    sleep_ms(30);
    int v[8];
    for (int i = 0; i < 8; i++) {
        assert_int_equal(mc__queue_push(q, &v[i], 0), 0);
    }
    pthread_join(th, NULL);
    assert_int_equal(c.n, 8);
    assert_true(c.elapsed_ms < 5000); /* far below the 20 s linger */
    for (int i = 0; i < 8; i++) {
        assert_ptr_equal(c.items[i], &v[i]);
    }
    mc__queue_destroy(q, NULL);
}

static void test_pop_batch_idle_consumer_wakes_on_push(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(128);
    batch_consumer_t c = {.q = q, .linger_us = 10 * 1000}; /* linger ends long before */
    pthread_t th;
    pthread_create(&th, NULL, batch_consume, &c);
    sleep_ms(200);
    int v = 7;
    int64_t pushed = mc__now_ms();
    assert_int_equal(mc__queue_push(q, &v, 0), 0);
    pthread_join(th, NULL);
    int64_t woke_after = mc__now_ms() - pushed;
    /* Past its linger the consumer sleeps untimed and the one push wakes it at once. */
    assert_int_equal(c.n, 1);
    assert_ptr_equal(c.items[0], &v);
    assert_true(c.elapsed_ms >= 180);
    assert_true(woke_after < 1000);
    mc__queue_destroy(q, NULL);
}

static void test_pop_batch_close(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(128);
    batch_consumer_t c = {.q = q, .linger_us = 20 * 1000 * 1000};
    pthread_t th;
    pthread_create(&th, NULL, batch_consume, &c);
    sleep_ms(30);
    mc__queue_close(q); /* wakes the lingering consumer */
    pthread_join(th, NULL);
    assert_int_equal(c.n, 0);
    assert_true(c.closed);
    assert_true(c.elapsed_ms < 5000);
    /* Closed with items left: they are still drained, then closed is reported. */
    mc__queue_t *q2 = mc__queue_new(4);
    int v = 1;
    assert_int_equal(mc__queue_push(q2, &v, 0), 0);
    mc__queue_close(q2);
    void *items[4];
    bool closed = true;
    assert_int_equal(mc__queue_pop_batch(q2, items, 4, 1000, &closed), 1);
    assert_false(closed);
    assert_int_equal(mc__queue_pop_batch(q2, items, 4, 1000, &closed), 0);
    assert_true(closed);
    mc__queue_destroy(q, NULL);
    mc__queue_destroy(q2, NULL);
}

static void test_pop_batch_many_producers(void **state)
{
    (void)state;
    mc__queue_t *q = mc__queue_new(16);
    pthread_t th[PRODUCERS];
    producer_t p[PRODUCERS];
    for (int k = 0; k < PRODUCERS; k++) {
        p[k].q = q;
        p[k].id = k;
        pthread_create(&th[k], NULL, produce, &p[k]);
    }
    intptr_t next[PRODUCERS] = {0};
    size_t total = 0;
    void *items[7];
    while (total < PRODUCERS * PER_PRODUCER) {
        bool closed = false;
        size_t n = mc__queue_pop_batch(q, items, 7, 250, &closed);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++) {
            intptr_t v = (intptr_t)items[i];
            int id = (int)(v / 1000000);
            assert_true(id >= 0 && id < PRODUCERS);
            assert_int_equal(v % 1000000, next[id] + 1);
            next[id]++;
        }
        total += n;
    }
    for (int k = 0; k < PRODUCERS; k++) {
        pthread_join(th[k], NULL);
        assert_int_equal(next[k], PER_PRODUCER);
    }
    mc__queue_destroy(q, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fifo_and_bound),
        cmocka_unit_test(test_blocking_push_waits_for_room),
        cmocka_unit_test(test_close),
        cmocka_unit_test(test_notify_edge_and_destroy_frees),
        cmocka_unit_test(test_many_producers_one_consumer),
        cmocka_unit_test(test_pop_batch_takes_waiting_items_at_once),
        cmocka_unit_test(test_pop_batch_lingers_for_a_batch),
        cmocka_unit_test(test_pop_batch_wakes_early_when_batch_is_full),
        cmocka_unit_test(test_pop_batch_idle_consumer_wakes_on_push),
        cmocka_unit_test(test_pop_batch_close),
        cmocka_unit_test(test_pop_batch_many_producers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
