/*
 * test_catchup_join.c: where a client catch-up stands against a stream's history ring
 * (src/daemon/fanout.c, mcd_hub_catchup_state() and mcd_hub_has_id(), used by catchup.c): it
 * goes on reading while its position is before the ring's continuity floor (the oldest
 * message, or the newest one the ring dropped), joins once its position is between that floor
 * and the ring's newest message, and waits (holds) past the newest; with no engine to ask for
 * the router's head, an empty ring never proves a join. Main thread only (no loop, no engine).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fanout.h"
#include "mongocast.h"
#include "test_json.h"

/* The FULL message of a change whose id is "82" + `n` as 16 hex digits. */
static mcd_msg_t *msg_with_id(unsigned n)
{
    char doc[512];
    snprintf(doc, sizeof(doc),
             "{\"_id\":{\"_data\":\"82%016X\"},\"operationType\":\"insert\","
             "\"ns\":{\"db\":\"shop\",\"coll\":\"orders\"},\"documentKey\":{\"_id\":%u},"
             "\"fullDocument\":{\"_id\":%u}}",
             n, n, n);
    bson_t *b = json(doc);
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("orders", n, b, NULL, &err);
    bson_destroy(b);
    assert_non_null(ev);
    mcd_msg_t *m = mcd_msg_new_event(ev, 0);
    mc_event_unref(&ev);
    assert_non_null(m);
    return m;
}

static const char *id_of(unsigned n)
{
    static char buf[4][32];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof(buf[k]), "82%016X", n);
    return buf[k];
}

typedef struct fx {
    mc_config_t config;
    mc_stream_config_t stream;
    mcd_fanout_t fo;
} fx_t;

static int setup(void **state)
{
    fx_t *f = calloc(1, sizeof(*f));
    f->stream.name = "orders";
    f->stream.history = 4;
    f->config.streams = &f->stream;
    f->config.n_streams = 1;
    assert_int_equal(mcd_fanout_init(&f->fo, &f->config), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx_t *f = *state;
    mcd_fanout_cleanup(&f->fo);
    free(f);
    return 0;
}

/* Fills the ring with ids first..last (at most its capacity), as ring_push() would. */
static void fill(mcd_hub_t *hub, unsigned first, unsigned last)
{
    for (unsigned n = first; n <= last; n++) {
        hub->ring[hub->ring_len++] = msg_with_id(n);
    }
    hub->ring_pushed += last - first + 1;
}

static void test_ring_without_drops(void **state)
{
    fx_t *f = *state;
    mcd_hub_t *hub = mcd_fanout_hub(&f->fo, "orders");
    /* An empty ring (a node that just started) proves nothing without the router's head. */
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(5), false), MCD_CU_FORWARD);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(5), true), MCD_CU_FORWARD);
    fill(hub, 10, 13);
    /* Before the oldest message: what lies between is unknown here, read on. */
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(9), false), MCD_CU_FORWARD);
    /* From the oldest to the newest: join (the ring holds everything after). */
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(10), false), MCD_CU_JOIN);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(12), false), MCD_CU_JOIN);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(13), false), MCD_CU_JOIN);
    /* A position between two messages (a post-batch token, an id of no event) too. */
    char between[40];
    snprintf(between, sizeof(between), "%s00", id_of(11));
    assert_int_equal(mcd_hub_catchup_state(hub, between, false), MCD_CU_JOIN);
    /* Past the newest: the ring has to get there first (no engine: never a head join). */
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(14), false), MCD_CU_HOLD);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(14), true), MCD_CU_HOLD);

    assert_true(mcd_hub_has_id(hub, id_of(10)));
    assert_true(mcd_hub_has_id(hub, id_of(13)));
    assert_false(mcd_hub_has_id(hub, id_of(9)));
    assert_false(mcd_hub_has_id(hub, id_of(14)));
    assert_false(mcd_hub_has_id(hub, between));
}

static void test_floor_after_drops(void **state)
{
    fx_t *f = *state;
    mcd_hub_t *hub = mcd_fanout_hub(&f->fo, "orders");
    fill(hub, 20, 23);
    /* The ring dropped 19 for room: every message after 19 is still in it. */
    hub->evicted = msg_with_id(19);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(18), false), MCD_CU_FORWARD);
    assert_int_equal(mcd_hub_catchup_state(hub, id_of(19), false), MCD_CU_JOIN);
    char after19[40];
    snprintf(after19, sizeof(after19), "%s01", id_of(19));
    assert_int_equal(mcd_hub_catchup_state(hub, after19, false), MCD_CU_JOIN);
    /* Ids compare as the stream orders them: a shorter prefix sorts first. */
    assert_int_equal(mcd_hub_catchup_state(hub, "82", false), MCD_CU_FORWARD);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ring_without_drops, setup, teardown),
        cmocka_unit_test_setup_teardown(test_floor_after_drops, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
