/*
 * test_source_nats.c: the part of an edge stream's client catch-up (source_nats.c) that runs
 * without a NATS server: the subject filter a catch-up applies to the messages it reads by
 * sequence (the live reader lets the server filter), which must agree with NATS's own rules.
 * Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "source_nats.h"

static void test_subject_filter_matches_as_nats_does(void **state)
{
    (void)state;
    /* Literal subjects: token by token, whole tokens only. */
    assert_true(mc__nats_subject_matches("mongocast.items", "mongocast.items"));
    assert_false(mc__nats_subject_matches("mongocast.items", "mongocast.item"));
    assert_false(mc__nats_subject_matches("mongocast.items", "mongocast.itemsx"));
    assert_false(mc__nats_subject_matches("mongocast.items", "mongocast.items.u1"));
    assert_false(mc__nats_subject_matches("mongocast.items.u1", "mongocast.items"));
    /* `*`: exactly one token. */
    assert_true(mc__nats_subject_matches("mongocast.*.u1", "mongocast.items.u1"));
    assert_true(mc__nats_subject_matches("mongocast.items.*", "mongocast.items.u1"));
    assert_false(mc__nats_subject_matches("mongocast.items.*", "mongocast.items"));
    assert_false(mc__nats_subject_matches("mongocast.items.*", "mongocast.items.u1.x"));
    /* `>`: one or more tokens, never none. */
    assert_true(mc__nats_subject_matches(">", "a"));
    assert_true(mc__nats_subject_matches("mongocast.>", "mongocast.items"));
    assert_true(mc__nats_subject_matches("mongocast.>", "mongocast.items.u1"));
    assert_true(mc__nats_subject_matches("mongocast.items.>", "mongocast.items.u1.x.y"));
    assert_false(mc__nats_subject_matches("mongocast.items.>", "mongocast.items"));
    assert_false(mc__nats_subject_matches("mongocast.>", "other.items"));
    /* A token that only starts like a wildcard is literal. */
    assert_false(mc__nats_subject_matches("mongocast.*x", "mongocast.ax"));
    assert_true(mc__nats_subject_matches("mongocast.*x", "mongocast.*x"));
    /* Empty tokens never match. */
    assert_false(mc__nats_subject_matches("a.*", "a."));
    assert_false(mc__nats_subject_matches("a.>", "a."));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_subject_filter_matches_as_nats_does),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
