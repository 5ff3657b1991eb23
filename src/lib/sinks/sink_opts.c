/*
 * sink_opts.c: option readers of the sink types (sink_opts.h). Pure; any thread.
 */
#include "sinks/sink_opts.h"

#include <math.h>
#include <string.h>

#include "config_internal.h"

int mc__sopt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err)
{
    int64_t v = 0;
    bool ok = false;
    if (BSON_ITER_HOLDS_INT32(it) || BSON_ITER_HOLDS_INT64(it)) {
        v = bson_iter_as_int64(it);
        ok = true;
    } else if (BSON_ITER_HOLDS_DOUBLE(it)) {
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

int mc__sopt_bool(const bson_iter_t *it, bool *out, mc_error_t *err)
{
    if (!BSON_ITER_HOLDS_BOOL(it)) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "option %s must be true or false", bson_iter_key(it));
    }
    *out = bson_iter_bool(it);
    return 0;
}

int mc__sopt_string(const bson_iter_t *it, size_t max, char **out, mc_error_t *err)
{
    uint32_t len = 0;
    const char *s = BSON_ITER_HOLDS_UTF8(it) ? bson_iter_utf8(it, &len) : NULL;
    if (!s || len == 0 || len > max || strlen(s) != len) {
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

int mc__sopt_unknown(const char *key, const char *const *known, mc_error_t *err)
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
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "unknown option '%.64s'%s%s%s", key, best ? "; did you mean '" : "",
                        best ? best : "", best ? "'?" : "");
}
