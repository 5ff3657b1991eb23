/*
 * test_key_sched.c: per-key ordering with bounded concurrency: a randomized run checked
 * against the rules (one in flight per key, push order per key, the concurrency bound,
 * everything handed out), a blocked key not holding up the others, the item bound, keyless
 * items.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "sinks/key_sched.h"

typedef struct item {
    int key;   /* -1: no key */
    int order; /* push order within its key */
    bool out, done;
} item_t;

static void test_random_against_rules(void **state)
{
    (void)state;
    enum { N = 20000, KEYS = 13, CONC = 4 };
    item_t *items = calloc(N, sizeof *items);
    mc__ksched_t *s = mc__ksched_new(CONC, N);
    assert_non_null(s);
    int next_order[KEYS] = {0}, expect_order[KEYS] = {0};
    bool key_busy[KEYS] = {false};
    item_t *flight[CONC];
    int n_flight = 0, pushed = 0, finished = 0;
    uint64_t rng = 99;
    while (finished < N) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        int action = (int)(rng % 3);
        if (action == 0 && pushed < N) {
            item_t *it = &items[pushed++];
            it->key = (int)((rng >> 8) % (KEYS + 1)) - 1;
            if (it->key >= 0) {
                it->order = next_order[it->key]++;
                char k[8];
                snprintf(k, sizeof k, "k%d", it->key);
                assert_int_equal(mc__ksched_push(s, k, strlen(k), it), 0);
            } else {
                assert_int_equal(mc__ksched_push(s, NULL, 0, it), 0);
            }
        } else if (action == 1) {
            item_t *it = mc__ksched_next(s);
            if (it) {
                assert_false(it->out);
                assert_true(n_flight < CONC);
                if (it->key >= 0) {
                    assert_false(key_busy[it->key]);
                    assert_int_equal(it->order, expect_order[it->key]);
                    expect_order[it->key]++;
                    key_busy[it->key] = true;
                }
                it->out = true;
                flight[n_flight++] = it;
            } else if (n_flight < CONC) {
                /* Nothing handed out below the bound: every waiting item must be behind an
                 * item of its key in flight (keyless items are never blocked). */
                for (int k = 0; k < pushed; k++) {
                    if (!items[k].out) {
                        assert_true(items[k].key >= 0 && key_busy[items[k].key]);
                    }
                }
            }
        } else if (n_flight > 0) {
            int i = (int)((rng >> 16) % (uint64_t)n_flight);
            item_t *it = flight[i];
            flight[i] = flight[--n_flight];
            assert_int_equal(mc__ksched_done(s, it), 0);
            assert_int_equal(mc__ksched_done(s, it), MC_ENOTFOUND);
            if (it->key >= 0) {
                key_busy[it->key] = false;
            }
            it->done = true;
            finished++;
        }
        assert_int_equal(mc__ksched_in_flight(s), (size_t)n_flight);
    }
    for (int k = 0; k < KEYS; k++) {
        assert_int_equal(expect_order[k], next_order[k]);
    }
    assert_int_equal(mc__ksched_queued(s), 0);
    mc__ksched_destroy(s);
    free(items);
}

static void test_blocked_key_does_not_hold_others(void **state)
{
    (void)state;
    mc__ksched_t *s = mc__ksched_new(2, 100);
    int a1, a2, b1, b2, c1;
    assert_int_equal(mc__ksched_push(s, "a", 1, &a1), 0);
    assert_int_equal(mc__ksched_push(s, "a", 1, &a2), 0);
    assert_int_equal(mc__ksched_push(s, "b", 1, &b1), 0);
    assert_int_equal(mc__ksched_push(s, "b", 1, &b2), 0);
    assert_int_equal(mc__ksched_push(s, NULL, 0, &c1), 0);
    assert_ptr_equal(mc__ksched_next(s), &a1); /* a1 is "stuck" (being retried) */
    assert_ptr_equal(mc__ksched_next(s), &b1);
    assert_null(mc__ksched_next(s)); /* concurrency 2 */
    assert_int_equal(mc__ksched_done(s, &b1), 0);
    /* The next ready one in rotation: the keyless item, then b2; a2 waits behind a1. */
    assert_ptr_equal(mc__ksched_next(s), &c1);
    assert_null(mc__ksched_next(s));
    assert_int_equal(mc__ksched_done(s, &c1), 0);
    assert_ptr_equal(mc__ksched_next(s), &b2);
    assert_int_equal(mc__ksched_done(s, &b2), 0);
    assert_null(mc__ksched_next(s)); /* a2 still waits behind a1 */
    assert_int_equal(mc__ksched_done(s, &a1), 0);
    assert_ptr_equal(mc__ksched_next(s), &a2);
    assert_int_equal(mc__ksched_done(s, &a2), 0);
    assert_null(mc__ksched_next(s));
    mc__ksched_destroy(s);
}

static void test_bound_and_destroy_with_items(void **state)
{
    (void)state;
    mc__ksched_t *s = mc__ksched_new(1, 3);
    int x[4];
    assert_int_equal(mc__ksched_push(s, "k", 1, &x[0]), 0);
    assert_int_equal(mc__ksched_push(s, NULL, 0, &x[1]), 0);
    assert_int_equal(mc__ksched_push(s, "k\0z", 3, &x[2]), 0); /* keys are bytes */
    assert_int_equal(mc__ksched_push(s, "k", 1, &x[3]), MC_EAGAIN);
    assert_int_equal(mc__ksched_push(s, "k", 1, NULL), MC_EINVAL);
    assert_ptr_equal(mc__ksched_next(s), &x[0]);
    assert_null(mc__ksched_next(s));
    /* Destroy with items queued and in flight frees the scheduler's records (ASan checks). */
    mc__ksched_destroy(s);
    mc__ksched_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_against_rules),
        cmocka_unit_test(test_blocked_key_does_not_hold_others),
        cmocka_unit_test(test_bound_and_destroy_with_items),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
