/*
 * test_backoff.c: capped exponential backoff with full jitter.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine_private.h"

static void test_ceiling_doubles_and_caps(void **state)
{
    (void)state;
    mc__backoff_t b;
    mc__backoff_init(&b, 100, 1000, 42);
    uint32_t expect[] = {100, 200, 400, 800, 1000, 1000, 1000};
    for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
        assert_int_equal(mc__backoff_ceiling(&b), expect[i]);
        uint32_t d = mc__backoff_next(&b);
        assert_true(d <= expect[i]);
    }
    /* Huge attempt counts saturate instead of overflowing. */
    b.attempt = 4000000000u;
    assert_int_equal(mc__backoff_ceiling(&b), 1000);
    assert_true(mc__backoff_next(&b) <= 1000);
    mc__backoff_reset(&b);
    assert_int_equal(mc__backoff_ceiling(&b), 100);
}

static void test_full_jitter_spreads(void **state)
{
    (void)state;
    mc__backoff_t b;
    mc__backoff_init(&b, 1000, 1000, 7);
    uint32_t lo = UINT32_MAX, hi = 0;
    uint64_t sum = 0;
    int buckets[10] = {0};
    const int n = 20000;
    for (int i = 0; i < n; i++) {
        uint32_t d = mc__backoff_next(&b);
        assert_true(d <= 1000);
        lo = d < lo ? d : lo;
        hi = d > hi ? d : hi;
        sum += d;
        buckets[d >= 1000 ? 9 : d / 100]++;
    }
    /* Full jitter: uniform over [0, ceiling], so both ends are reached and the mean is
     * about half the ceiling (equal jitter would never go below 500). */
    assert_true(lo < 20);
    assert_true(hi > 980);
    double mean = (double)sum / n;
    assert_true(mean > 450 && mean < 550);
    for (int k = 0; k < 10; k++) {
        assert_true(buckets[k] > n / 10 / 2);
    }
}

static void test_seeds_differ_and_zero_seed_works(void **state)
{
    (void)state;
    mc__backoff_t a, b, z;
    mc__backoff_init(&a, 1000, 1000, 1);
    mc__backoff_init(&b, 1000, 1000, 2);
    mc__backoff_init(&z, 1000, 1000, 0);
    int same = 0;
    uint32_t zlast = mc__backoff_next(&z);
    int zsame = 0;
    for (int i = 0; i < 100; i++) {
        same += mc__backoff_next(&a) == mc__backoff_next(&b);
        uint32_t zd = mc__backoff_next(&z);
        zsame += zd == zlast;
        zlast = zd;
    }
    assert_true(same < 10);   /* two streams do not retry in lock-step */
    assert_true(zsame < 10);  /* a zero seed does not get stuck */
}

static void test_degenerate_bounds(void **state)
{
    (void)state;
    mc__backoff_t b;
    mc__backoff_init(&b, 0, 0, 3);
    assert_int_equal(mc__backoff_ceiling(&b), 1);
    mc__backoff_init(&b, 500, 100, 3); /* max below initial: capped at initial */
    assert_int_equal(mc__backoff_ceiling(&b), 500);
    mc__backoff_next(&b);
    assert_int_equal(mc__backoff_ceiling(&b), 500);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ceiling_doubles_and_caps),
        cmocka_unit_test(test_full_jitter_spreads),
        cmocka_unit_test(test_seeds_differ_and_zero_seed_works),
        cmocka_unit_test(test_degenerate_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
