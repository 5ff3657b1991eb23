/*
 * filter_match_both.h: the check the matcher's fuzz targets (fuzz_filter.c, fuzz_expr.c) make
 * on every compiled query: a match within a CPU budget that was not cut short agrees with the
 * plain match, and one that was cut short does not match and says why. (An input that exhausts
 * a small budget is not run unbudgeted: it would only spend the smoke run's seconds on the work
 * cap.) Single-threaded, like the targets.
 */
#ifndef MC_FUZZ_FILTER_MATCH_BOTH_H
#define MC_FUZZ_FILTER_MATCH_BOTH_H

#include "mongocast/filter.h"

static void match_both(const mc_filter_t *f, const bson_t *doc)
{
    mc_filter_budget_t b = {.cpu_ns = 2000000};
    bool budgeted = mc_filter_match_budget(f, doc, &b);
    if (b.exceeded) {
        if (budgeted || !b.reason) {
            __builtin_trap();
        }
        return;
    }
    if (mc_filter_match(f, doc) != budgeted) {
        __builtin_trap();
    }
}

#endif
