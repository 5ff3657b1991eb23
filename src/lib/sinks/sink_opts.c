/*
 * sink_opts.c: option readers shared by the sink types (sink_opts.h). Pure; any thread.
 */
#include "sinks/sink_opts.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "config_internal.h"

static int bad(mc_error_t *err, const bson_iter_t *it, const char *what)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "option %s must be %s",
                        bson_iter_key(it), what);
}

int mc__opt_string(const bson_iter_t *it, const char **out, mc_error_t *err)
{
    uint32_t len = 0;
    const char *s = BSON_ITER_HOLDS_UTF8(it) ? bson_iter_utf8(it, &len) : NULL;
    if (!s || len == 0 || strlen(s) != len) {
        return bad(err, it, "a non-empty string");
    }
    *out = s;
    return 0;
}

int mc__opt_string_dup(const bson_iter_t *it, size_t max, char **out, mc_error_t *err)
{
    const char *s = NULL;
    if (mc__opt_string(it, &s, err) != 0 || strlen(s) > max) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be a non-empty string of at most %zu bytes",
                            bson_iter_key(it), max);
    }
    if (out) {
        bson_free(*out);
        *out = bson_strdup(s);
    }
    return 0;
}

int mc__opt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err)
{
    int64_t v = 0;
    bool ok = false;
    if (BSON_ITER_HOLDS_INT32(it) || BSON_ITER_HOLDS_INT64(it)) {
        v = bson_iter_as_int64(it);
        ok = true;
    } else if (BSON_ITER_HOLDS_DOUBLE(it)) {
        /* Integral doubles only, and only where a double holds every integer exactly. */
        double d = bson_iter_double(it);
        ok = isfinite(d) && d == floor(d) && d >= -9e15 && d <= 9e15;
        v = ok ? (int64_t)d : 0;
    }
    if (!ok || v < min || v > max) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be an integer from %lld to %lld", bson_iter_key(it),
                            (long long)min, (long long)max);
    }
    *out = v;
    return 0;
}

int mc__opt_bool(const bson_iter_t *it, bool *out, mc_error_t *err)
{
    if (!BSON_ITER_HOLDS_BOOL(it)) {
        return bad(err, it, "true or false");
    }
    *out = bson_iter_bool(it);
    return 0;
}

/* "a, b, c" (or "a or b" with sep " or ") into list, truncated to its size. */
static void join(const char *const *names, const char *sep, char *list, size_t size)
{
    size_t used = 0;
    list[0] = '\0';
    for (size_t i = 0; names[i] && used < size; i++) {
        int w = snprintf(list + used, size - used, "%s%s", i ? sep : "", names[i]);
        used += w > 0 ? (size_t)w : 0;
    }
}

int mc__opt_enum(const bson_iter_t *it, const char *const *names, int *out, mc_error_t *err)
{
    const char *v = BSON_ITER_HOLDS_UTF8(it) ? bson_iter_utf8(it, NULL) : NULL;
    for (int i = 0; v && names[i]; i++) {
        if (strcmp(v, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    char list[200];
    join(names, " or ", list, sizeof list);
    return bad(err, it, list);
}

int mc__opt_unknown(const char *key, const char *where, const char *const *known, mc_error_t *err)
{
    const char *best = NULL;
    size_t best_d = 3;
    for (size_t i = 0; known[i]; i++) {
        size_t d = mc__cfg_edit_distance(key, known[i], 2);
        if (d < best_d) {
            best_d = d;
            best = known[i];
        }
    }
    char list[400];
    join(known, ", ", list, sizeof list);
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "unknown option '%.64s' for %s%s%s%s (known: %s)", key, where,
                        best ? "; did you mean '" : "", best ? best : "", best ? "'?" : "", list);
}
