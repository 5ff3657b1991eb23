/*
 * sink_opts.c: option readers shared by the broker sink types (sink_opts.h). Pure; any thread.
 */
#include <math.h>
#include <string.h>

#include "sinks/sink_opts.h"

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

int mc__opt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err)
{
    int64_t v = 0;
    bool ok = false;
    if (BSON_ITER_HOLDS_INT32(it) || BSON_ITER_HOLDS_INT64(it)) {
        v = bson_iter_as_int64(it);
        ok = true;
    } else if (BSON_ITER_HOLDS_DOUBLE(it)) {
        double d = bson_iter_double(it);
        ok = isfinite(d) && d == floor(d) && d >= -9e18 && d <= 9e18;
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

int mc__opt_enum(const bson_iter_t *it, const char *const *names, int *out, mc_error_t *err)
{
    const char *v = BSON_ITER_HOLDS_UTF8(it) ? bson_iter_utf8(it, NULL) : NULL;
    char list[200] = "";
    size_t used = 0;
    for (int i = 0; names[i]; i++) {
        if (v && strcmp(v, names[i]) == 0) {
            *out = i;
            return 0;
        }
        int w = snprintf(list + used, sizeof list - used, "%s%s", i ? " or " : "", names[i]);
        used += w > 0 && (size_t)w < sizeof list - used ? (size_t)w : 0;
    }
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "option %s must be %s",
                        bson_iter_key(it), list);
}

int mc__opt_unknown(const bson_iter_t *it, const char *type, const char *known, mc_error_t *err)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "unknown option '%.64s' for a %s sink (known: %s)", bson_iter_key(it),
                        type, known);
}
