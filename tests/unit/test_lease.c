/*
 * test_lease.c: the lease per stream (lease.c): the state machine with a fake clock (create,
 * renew, expiry, takeover only after a whole ttl of the same version, release, loss), the
 * `lease:` config block, and two engines on one config against mongo-emulator: one feeds the
 * memory sink, the other stands by and takes over from the stored position when the first
 * stops (its events then carry the next fencing epoch).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "engine_private.h"
#include "mongocast/config.h"
#include "mongocast/engine.h"
#include "mongocast/sink.h"

/* ---- The state machine ------------------------------------------------------------------------ */

static mc__lease_doc_t doc_of(const char *holder, int64_t epoch, int64_t version)
{
    mc__lease_doc_t d = {.exists = true, .epoch = epoch, .version = version};
    snprintf(d.holder, sizeof(d.holder), "%s", holder);
    return d;
}

static void test_fsm_create_renew_expire(void **state)
{
    (void)state;
    mc__lease_fsm_t f;
    mc__lease_fsm_init(&f, 1000, 250);
    assert_int_equal(f.margin_ms, 250);
    mc__lease_doc_t none = {0};
    assert_int_equal(mc__lease_fsm_observe(&f, &none, 0), MC__LEASE_CREATE);
    assert_false(mc__lease_fsm_may_publish(&f, 0));
    /* Created by a request sent at t=10: may publish until 10 + 1000 - 250. */
    mc__lease_fsm_acquired(&f, 10, 1, 1);
    assert_true(mc__lease_fsm_may_publish(&f, 10));
    assert_true(mc__lease_fsm_may_publish(&f, 759));
    assert_false(mc__lease_fsm_may_publish(&f, 760));
    assert_int_equal(mc__lease_fsm_next_wake(&f, 20), 260);
    /* A renewal sent at 260 moves the deadline from its send time, not its answer's. */
    mc__lease_fsm_renewed(&f, 260, 2);
    assert_int_equal(f.deadline, 1010);
    assert_int_equal(f.version, 2);
    assert_int_equal(mc__lease_fsm_next_wake(&f, 300), 510);
    /* A failed renewal is tried again a third of renew_ms later. */
    mc__lease_fsm_renew_failed(&f, 300);
    assert_int_equal(mc__lease_fsm_next_wake(&f, 300), 383);
    /* A late answer of an older renewal never moves the deadline back. */
    mc__lease_fsm_renewed(&f, 200, 3);
    assert_int_equal(f.deadline, 1010);
    /* No renewal succeeds: the gate closes by time alone. */
    assert_true(mc__lease_fsm_may_publish(&f, 1009));
    assert_false(mc__lease_fsm_may_publish(&f, 1010));
    /* Held: observing does nothing. */
    mc__lease_doc_t d = doc_of("me", 1, 3);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 1100), MC__LEASE_WAIT);
    mc__lease_fsm_lost(&f);
    assert_false(f.held);
    assert_false(mc__lease_fsm_may_publish(&f, 1100));
}

static void test_fsm_takeover_after_a_whole_ttl_of_one_version(void **state)
{
    (void)state;
    mc__lease_fsm_t f;
    mc__lease_fsm_init(&f, 1000, 0);
    assert_int_equal(f.renew_ms, 250);
    mc__lease_doc_t d = doc_of("other", 4, 17);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 5000), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_next_wake(&f, 5000), 5250);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 5999), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_next_wake(&f, 5900), 6000);
    /* The holder renews (the version moves): the wait starts again from this read. */
    d = doc_of("other", 4, 18);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 5999), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 6500), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 6998), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 6999), MC__LEASE_TAKE);
    /* The takeover is conditional on what was seen; it succeeds with the next epoch. */
    assert_int_equal(f.seen_epoch, 4);
    assert_int_equal(f.seen_version, 18);
    /* Past the takeover time (the takeover failed to reach MongoDB): the next look is a period
     * later, not at once (no busy loop while MongoDB does not answer). */
    assert_int_equal(mc__lease_fsm_next_wake(&f, 7100), 7350);
    mc__lease_fsm_acquired(&f, 7000, 5, 19);
    assert_true(f.held);
    assert_int_equal(f.epoch, 5);
    assert_true(mc__lease_fsm_may_publish(&f, 7749));
    assert_false(mc__lease_fsm_may_publish(&f, 7750));
    /* Another node took it over meanwhile: lost, and the wait starts from scratch. */
    mc__lease_fsm_lost(&f);
    d = doc_of("third", 6, 20);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 7100), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 8099), MC__LEASE_WAIT);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 8100), MC__LEASE_TAKE);
}

static void test_fsm_released_lease_is_taken_at_once(void **state)
{
    (void)state;
    mc__lease_fsm_t f;
    mc__lease_fsm_init(&f, 10000, 2500);
    mc__lease_doc_t d = doc_of("", 3, 40);
    assert_int_equal(mc__lease_fsm_observe(&f, &d, 100), MC__LEASE_TAKE);
    assert_int_equal(f.seen_epoch, 3);
    assert_int_equal(f.seen_version, 40);
    /* The safety margin: a quarter of the ttl. */
    mc__lease_fsm_acquired(&f, 100, 4, 41);
    assert_int_equal(f.deadline, 100 + 7500);
}

/* ---- The config block -------------------------------------------------------------------------- */

static mc_config_t *load(const char *extra, mc_error_t *err)
{
    char yaml[1024];
    snprintf(yaml, sizeof(yaml),
             "mongodb: {uri: \"mongodb://127.0.0.1:1/?replicaSet=rs0\"}\n%s\n"
             "streams: {s: {db: shop, collection: c0}}\n"
             "sinks: [{name: out, type: stdout}]\n",
             extra);
    return mc_config_load_string(yaml, strlen(yaml), "t.yaml", err);
}

static void test_config(void **state)
{
    (void)state;
    mc_error_t err = {0};
    mc_config_t *c = load("", &err);
    assert_non_null(c);
    assert_false(c->lease.enabled);
    mc_config_destroy(c);
    c = load("checkpoint: {store: mongodb}\nlease: {enabled: true}", &err);
    assert_non_null(c);
    assert_true(c->lease.enabled);
    assert_int_equal(c->lease.ttl_ms, 10000);
    assert_int_equal(c->lease.renew_ms, 2500);
    assert_string_equal(c->lease.db, "mongocast");
    assert_string_equal(c->lease.collection, "leases");
    assert_null(c->lease.node_id);
    mc_config_destroy(c);
    c = load("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl_ms: 900, renew_ms: 300, "
             "node_id: n1, db: d, collection: l}",
             &err);
    assert_non_null(c);
    assert_int_equal(c->lease.renew_ms, 300);
    assert_string_equal(c->lease.node_id, "n1");
    mc_config_destroy(c);
    assert_null(load("lease: {enabled: true}", &err));
    assert_non_null(strstr(err.message, "needs checkpoint.store: mongodb"));
    assert_null(load("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl_ms: 900, "
                     "renew_ms: 301}",
                     &err));
    assert_non_null(strstr(err.message, "at most a third"));
    assert_null(load("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl_ms: 299}", &err));
    assert_null(load("checkpoint: {store: mongodb}\nlease: {enabled: true, ttl: 1}", &err));
    assert_non_null(strstr(err.message, "unknown key"));
}

/* ---- Two engines on one config ---------------------------------------------------------------- */

static char emu_uri[256];
static pid_t emu_pid = -1;

static mc_engine_t *engine_for(const char *node, mc_config_t **cfg_out)
{
    char yaml[1500];
    snprintf(yaml, sizeof(yaml),
             "mongodb: {uri: \"%s\"}\n"
             "checkpoint: {store: mongodb, db: lt, collection: cp, interval_ms: 50}\n"
             "lease: {enabled: true, db: lt, collection: leases, ttl_ms: 600, renew_ms: 150, "
             "node_id: %s}\n"
             "streams: {s: {db: shop, collection: c0, max_await_time_ms: 100}}\n"
             "sinks: [{name: mem, type: memory, control: false}]\n",
             emu_uri, node);
    mc_error_t err = {0};
    mc_config_t *cfg = mc_config_load_string(yaml, strlen(yaml), "t.yaml", &err);
    if (!cfg) {
        fail_msg("config: %s", err.message);
    }
    mc_engine_t *e = mc_engine_new(cfg, NULL, &err);
    assert_non_null(e);
    assert_int_equal(mc_engine_start(e, &err), 0);
    *cfg_out = cfg;
    return e;
}

static bool wait_holder(mc_engine_t *e, bool want, int64_t timeout_ms)
{
    int64_t end = mc__now_ms() + timeout_ms;
    mc_lease_status_t st;
    while (mc__now_ms() < end) {
        if (mc_engine_lease_status(e, "s", &st) == 0 && st.holder == want) {
            return true;
        }
        usleep(10000);
    }
    return false;
}

static bool wait_open(mc_engine_t *e)
{
    int64_t end = mc__now_ms() + 10000;
    mc_stream_status_t st;
    while (mc__now_ms() < end) {
        if (mc_engine_stream_status(e, "s", &st) == 0 && st.state == MC_STREAM_OPEN) {
            return true;
        }
        usleep(10000);
    }
    return false;
}

static void insert_n(mongoc_client_t *cli, int first, int n)
{
    mongoc_collection_t *c = mongoc_client_get_collection(cli, "shop", "c0");
    for (int i = first; i < first + n; i++) {
        bson_t *d = BCON_NEW("_id", BCON_INT32(i));
        bson_error_t e;
        assert_true(mongoc_collection_insert_one(c, d, NULL, NULL, &e));
        bson_destroy(d);
    }
    mongoc_collection_destroy(c);
}

static int id_of(mc_event_t *ev)
{
    bson_iter_t it;
    const bson_t *ch = mc_event_change(ev);
    if (ch && bson_iter_init_find(&it, ch, "documentKey") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
        bson_iter_t sub;
        if (bson_iter_recurse(&it, &sub) && bson_iter_find(&sub, "_id")) {
            return bson_iter_int32(&sub);
        }
    }
    return -1;
}

static void test_two_engines_one_feeds_then_hands_over(void **state)
{
    (void)state;
    if (emu_pid < 0) {
        skip();
    }
    mongoc_client_t *cli = mongoc_client_new(emu_uri);
    mc_config_t *ca, *cb;
    mc_engine_t *a = engine_for("A", &ca);
    assert_true(wait_holder(a, true, 10000));
    mc_engine_t *b = engine_for("B", &cb);
    mc_sink_t *ma = mc_engine_sink(a, "mem"), *mb = mc_engine_sink(b, "mem");
    mc_sink_stats_t st;
    /* B stands by: its sink says so, and gets nothing. */
    int64_t end = mc__now_ms() + 5000;
    do {
        usleep(10000);
        mc_engine_sink_stats(b, 0, &st);
    } while (st.state != MC_SINK_STANDBY && mc__now_ms() < end);
    assert_int_equal(st.state, MC_SINK_STANDBY);
    /* Without a stored position a stream starts from now: write once both are open. */
    assert_true(wait_open(a));
    assert_true(wait_open(b));
    insert_n(cli, 0, 50);
    assert_int_equal(mc_sink_memory_wait(ma, 50, 10000), 0);
    usleep(300000);
    assert_int_equal(mc_sink_memory_count(mb), 0);
    mc_lease_status_t ls;
    assert_int_equal(mc_engine_lease_status(a, "s", &ls), 0);
    assert_true(ls.enabled && ls.holder);
    assert_int_equal(ls.epoch, 1);
    assert_string_equal(ls.node_id, "A");
    mc_event_t *first = mc_sink_memory_get(ma, 0);
    assert_int_equal(mc_sink_lease_epoch(ma, first), 1);
    assert_true(mc_sink_lease_valid(ma, first));
    mc_event_unref(&first);
    assert_int_equal(mc_engine_lease_status(b, "s", &ls), 0);
    assert_true(ls.enabled && !ls.holder);

    /* A stops: it stores its final positions and releases; B takes over at once, from there. */
    int64_t t0 = mc__now_ms();
    mc_error_t err = {0};
    assert_int_equal(mc_engine_stop(a, &err), 0);
    assert_true(wait_holder(b, true, 3000));
    assert_true(mc__now_ms() - t0 < 3000);
    insert_n(cli, 50, 50);
    assert_int_equal(mc_sink_memory_wait(mb, 50, 10000), 0);
    usleep(300000);
    assert_int_equal(mc_sink_memory_count(mb), 50); /* nothing A had completed again */
    for (size_t i = 0; i < 50; i++) {
        mc_event_t *ev = mc_sink_memory_get(mb, i);
        assert_int_equal(id_of(ev), 50 + (int)i);
        assert_int_equal(mc_sink_lease_epoch(mb, ev), 2);
        mc_event_unref(&ev);
    }
    mc_engine_sink_stats(b, 0, &st);
    assert_int_equal(st.state, MC_SINK_RUNNING);
    mc_engine_destroy(a);
    mc_engine_destroy(b);
    mc_config_destroy(ca);
    mc_config_destroy(cb);
    mongoc_client_destroy(cli);
}

int main(void)
{
    mongoc_init();
    signal(SIGPIPE, SIG_IGN);
    if (getenv("MC_TEST_LOG")) {
        mc_log_set_handler(mc_log_stderr_handler, NULL);
    }
    if (emu_fixture_find()) {
        emu_pid = emu_fixture_start(emu_uri, sizeof(emu_uri));
    } else {
        fprintf(stderr, "mongo-emulator not found: the engine lease test is skipped\n");
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fsm_create_renew_expire),
        cmocka_unit_test(test_fsm_takeover_after_a_whole_ttl_of_one_version),
        cmocka_unit_test(test_fsm_released_lease_is_taken_at_once),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_two_engines_one_feeds_then_hands_over),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    if (emu_pid > 0) {
        emu_fixture_stop(emu_pid);
    }
    mongoc_cleanup();
    return rc;
}
