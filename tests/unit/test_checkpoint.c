/*
 * test_checkpoint.c: the per-stream low-watermark: the stored position advances only past
 * events published to every sink and acked by every durable sink, in order, whatever order
 * the acks arrive in; post-batch tokens; invalidate flags; back-pressure reservations.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <string.h>

#include "engine_private.h"

static bson_t *tok(const char *data)
{
    return BCON_NEW("_data", BCON_UTF8(data));
}

/* Asserts the stable position's token _data (NULL: none) and seq. */
static void assert_stable(mc__checkpoint_t *cp, const char *data, uint64_t seq)
{
    mc__position_t p = {0};
    mc__checkpoint_stable(cp, &p);
    if (!data) {
        assert_null(p.token);
    } else {
        assert_non_null(p.token);
        bson_iter_t it;
        assert_true(bson_iter_init_find(&it, p.token, "_data"));
        assert_string_equal(bson_iter_utf8(&it, NULL), data);
    }
    assert_int_equal(p.seq, seq);
    mc__position_clear(&p);
}

static void add(mc__checkpoint_t *cp, uint64_t seq, const char *data, uint64_t required)
{
    assert_int_equal(mc__checkpoint_reserve(cp, 0), 0);
    bson_t *t = data ? tok(data) : NULL;
    assert_int_equal(mc__checkpoint_add(cp, seq, t, false, 100, (uint32_t)seq, required), 0);
    if (t) {
        bson_destroy(t);
    }
}

static void test_no_durable_sinks_advance_on_publish(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(16);
    mc__position_t p = {0};
    assert_false(mc__checkpoint_take_dirty(cp, &p));
    add(cp, 1, "A", 0);
    add(cp, 2, "B", 0);
    assert_stable(cp, NULL, 0); /* added is not published */
    mc__checkpoint_published(cp, 2);
    assert_stable(cp, NULL, 0); /* 1 still unpublished: nothing moves past it */
    mc__checkpoint_published(cp, 1);
    assert_stable(cp, "B", 2);
    assert_true(mc__checkpoint_take_dirty(cp, &p));
    assert_int_equal(p.seq, 2);
    assert_int_equal(p.ct_i, 2);
    mc__position_clear(&p);
    assert_false(mc__checkpoint_take_dirty(cp, &p)); /* taken: clean until it moves again */
    mc__checkpoint_set_dirty(cp);                    /* a failed write re-marks it */
    assert_true(mc__checkpoint_take_dirty(cp, &p));
    mc__position_clear(&p);
    assert_int_equal(mc__checkpoint_pending(cp), 0);
    mc__checkpoint_destroy(cp);
}

/* The dispatch thread marks a run of events published under one lock: same outcome as one
 * call per event, including for durable entries that still wait for an ack and for seqs
 * outside the ring. */
static void test_published_range(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(16);
    add(cp, 1, "A", 0);
    add(cp, 2, NULL, 0); /* a control event without a token */
    add(cp, 3, "C", 0x1);
    add(cp, 4, "D", 0);
    mc__checkpoint_published_range(cp, 2, 4);
    assert_stable(cp, NULL, 0); /* 1 is not published: nothing moves */
    mc__checkpoint_published_range(cp, 1, 1);
    assert_stable(cp, "A", 2); /* 3 waits for its durable ack; 2 carries no token */
    assert_int_equal(mc__checkpoint_pending(cp), 2);
    mc__checkpoint_ack(cp, 3, 0);
    assert_stable(cp, "D", 4);
    assert_int_equal(mc__checkpoint_pending(cp), 0);
    add(cp, 5, "E", 0);
    mc__checkpoint_published_range(cp, 3, 9); /* old and unknown seqs are ignored */
    assert_stable(cp, "E", 5);
    mc__checkpoint_destroy(cp);
}

static void test_low_watermark_out_of_order_acks(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(16);
    const uint64_t both = 0x3; /* durable sinks with bits 0 and 1 */
    add(cp, 1, "A", both);
    add(cp, 2, "B", both);
    add(cp, 3, "C", both);
    for (uint64_t s = 1; s <= 3; s++) {
        mc__checkpoint_published(cp, s);
    }
    assert_stable(cp, NULL, 0); /* published but unacked */
    mc__checkpoint_ack(cp, 3, 0);
    mc__checkpoint_ack(cp, 3, 1);
    mc__checkpoint_ack(cp, 2, 1);
    assert_stable(cp, NULL, 0); /* 1 is the low-watermark */
    mc__checkpoint_ack(cp, 1, 0);
    assert_stable(cp, NULL, 0); /* sink 1 has not acked 1 */
    mc__checkpoint_ack(cp, 1, 0); /* a repeated ack changes nothing */
    assert_stable(cp, NULL, 0);
    mc__checkpoint_ack(cp, 1, 1);
    assert_stable(cp, "A", 1); /* 2 still lacks sink 0 */
    mc__checkpoint_ack(cp, 2, 0);
    assert_stable(cp, "C", 3); /* 2 and 3 complete together */
    assert_int_equal(mc__checkpoint_pending(cp), 0);
    /* Acks for retired or unknown seqs and bad bits are ignored. */
    mc__checkpoint_ack(cp, 2, 0);
    mc__checkpoint_ack(cp, 99, 0);
    mc__checkpoint_ack(cp, 3, 64);
    mc__checkpoint_ack(cp, 3, -1);
    assert_stable(cp, "C", 3);
    mc__checkpoint_destroy(cp);
}

static void test_ack_before_publish_and_unrequired_bits(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(4);
    add(cp, 1, "A", 0x1);
    mc__checkpoint_ack(cp, 1, 0); /* a sink may ack inside publish(), before published */
    assert_stable(cp, NULL, 0);
    mc__checkpoint_published(cp, 1);
    assert_stable(cp, "A", 1);
    add(cp, 2, "B", 0x1);
    mc__checkpoint_published(cp, 2);
    mc__checkpoint_ack(cp, 2, 5); /* a bit that is not required does not complete it */
    assert_stable(cp, "A", 1);
    mc__checkpoint_ack(cp, 2, 0);
    assert_stable(cp, "B", 2);
    mc__checkpoint_destroy(cp);
}

static void test_control_events_keep_token(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(8);
    add(cp, 1, "A", 0);
    add(cp, 2, NULL, 0); /* e.g. ready or reset: no position of its own */
    mc__checkpoint_published(cp, 1);
    mc__checkpoint_published(cp, 2);
    assert_stable(cp, "A", 2);
    mc__checkpoint_destroy(cp);
}

static void test_post_batch_positions(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(8);
    bson_t *h1 = tok("H1");
    /* Quiet stream: nothing pending, the post-batch token is stable at once. */
    mc__checkpoint_position(cp, h1, false, 0, 0);
    assert_stable(cp, "H1", 0);
    mc__position_t p = {0};
    assert_true(mc__checkpoint_take_dirty(cp, &p));
    mc__position_clear(&p);

    /* With an event pending, the newer token waits for that event. */
    add(cp, 1, "A", 0x1);
    mc__checkpoint_published(cp, 1);
    bson_t *h2 = tok("H2");
    mc__checkpoint_position(cp, h2, false, 0, 0);
    assert_stable(cp, "H1", 0);
    mc__checkpoint_ack(cp, 1, 0);
    assert_stable(cp, "H2", 1);
    mc__checkpoint_position(cp, NULL, false, 0, 0); /* ignored */
    assert_stable(cp, "H2", 1);
    bson_destroy(h1);
    bson_destroy(h2);
    mc__checkpoint_destroy(cp);
}

static void test_invalidate_flag(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(8);
    assert_int_equal(mc__checkpoint_reserve(cp, 0), 0);
    bson_t *t = tok("INV");
    assert_int_equal(mc__checkpoint_add(cp, 1, t, true, 5, 6, 0), 0);
    mc__checkpoint_published(cp, 1);
    mc__position_t p = {0};
    assert_true(mc__checkpoint_take_dirty(cp, &p));
    assert_true(p.invalidate);
    assert_int_equal(p.ct_t, 5);
    assert_int_equal(p.ct_i, 6);
    mc__position_clear(&p);
    /* The post-batch token after the reopen is an ordinary one. */
    bson_t *h = tok("H");
    mc__checkpoint_position(cp, h, false, 0, 0);
    assert_true(mc__checkpoint_take_dirty(cp, &p));
    assert_false(p.invalidate);
    mc__position_clear(&p);
    bson_destroy(t);
    bson_destroy(h);
    mc__checkpoint_destroy(cp);
}

static void test_sequence_rules(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(2);
    assert_int_equal(mc__checkpoint_add(cp, 0, NULL, false, 0, 0, 0), MC_EINVAL);
    assert_int_equal(mc__checkpoint_add(cp, 5, NULL, false, 0, 0, 0), 0);
    assert_int_equal(mc__checkpoint_add(cp, 7, NULL, false, 0, 0, 0), MC_EINVAL); /* gap */
    assert_int_equal(mc__checkpoint_add(cp, 5, NULL, false, 0, 0, 0), MC_EINVAL); /* repeat */
    assert_int_equal(mc__checkpoint_add(cp, 6, NULL, false, 0, 0, 0), 0);
    assert_int_equal(mc__checkpoint_add(cp, 7, NULL, false, 0, 0, 0), MC_EINVAL); /* full */
    mc__checkpoint_destroy(cp);
}

static void test_initial_position(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(4);
    mc__position_t init = {0};
    init.token = tok("STORED");
    init.invalidate = true;
    mc__checkpoint_set_initial(cp, &init);
    mc__position_t p = {0};
    assert_false(mc__checkpoint_take_dirty(cp, &p)); /* loaded, not changed: no rewrite */
    assert_stable(cp, "STORED", 0);
    mc__position_clear(&init);
    mc__checkpoint_destroy(cp);
}

typedef struct reserver {
    mc__checkpoint_t *cp;
    int rc;
    int64_t waited;
} reserver_t;

static void *reserve_thread(void *arg)
{
    reserver_t *r = arg;
    int64_t t0 = mc__now_ms();
    r->rc = mc__checkpoint_reserve(r->cp, 5000);
    r->waited = mc__now_ms() - t0;
    return NULL;
}

static void test_backpressure_reserve(void **state)
{
    (void)state;
    mc__checkpoint_t *cp = mc__checkpoint_new(2);
    add(cp, 1, "A", 0x1);
    add(cp, 2, "B", 0x1);
    assert_int_equal(mc__checkpoint_reserve(cp, 0), MC_EAGAIN);
    assert_int_equal(mc__checkpoint_reserve(cp, 60), MC_EAGAIN);
    reserver_t r = {cp, 99, 0};
    pthread_t th;
    pthread_create(&th, NULL, reserve_thread, &r);
    struct timespec ts = {0, 150 * 1000000L};
    nanosleep(&ts, NULL);
    mc__checkpoint_published(cp, 1);
    mc__checkpoint_published(cp, 2);
    assert_int_equal(mc__checkpoint_pending(cp), 2);
    mc__checkpoint_ack(cp, 1, 0); /* retiring event 1 frees a slot and wakes the watcher */
    pthread_join(th, NULL);
    assert_int_equal(r.rc, 0);
    assert_true(r.waited >= 100);
    assert_int_equal(mc__checkpoint_wait_idle(cp, 50), MC_EAGAIN); /* 2 still unacked */
    mc__checkpoint_ack(cp, 2, 0);
    assert_int_equal(mc__checkpoint_wait_idle(cp, 50), 0);

    /* Close wakes a blocked reserve with ECLOSED. */
    assert_int_equal(mc__checkpoint_reserve(cp, 0), 0); /* fills the second slot */
    r.rc = 99;
    pthread_create(&th, NULL, reserve_thread, &r);
    nanosleep(&ts, NULL);
    mc__checkpoint_close(cp);
    pthread_join(th, NULL);
    assert_int_equal(r.rc, MC_ECLOSED);
    assert_int_equal(mc__checkpoint_reserve(cp, 0), MC_ECLOSED);
    mc__checkpoint_destroy(cp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_durable_sinks_advance_on_publish),
        cmocka_unit_test(test_published_range),
        cmocka_unit_test(test_low_watermark_out_of_order_acks),
        cmocka_unit_test(test_ack_before_publish_and_unrequired_bits),
        cmocka_unit_test(test_control_events_keep_token),
        cmocka_unit_test(test_post_batch_positions),
        cmocka_unit_test(test_invalidate_flag),
        cmocka_unit_test(test_sequence_rules),
        cmocka_unit_test(test_initial_position),
        cmocka_unit_test(test_backpressure_reserve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
