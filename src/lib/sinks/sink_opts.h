/*
 * sink_opts.h: reading a sink type's options (the BSON of its config entry) with clear
 * errors, shared by the webhook and MongoDB-collection sink types.
 *
 * Each reader checks one value and names the option in its error ("option timeout_ms must be
 * an integer from 1 to 600000"); the engine prefixes the config position and the sink's name.
 * mc__sopt_unknown() reports an option the type does not know, with the closest known name.
 * Pure functions: any thread.
 */
#ifndef MC_SINKS_SINK_OPTS_H
#define MC_SINKS_SINK_OPTS_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stdint.h>

#include "mongocast/error.h"

/* An integer (an int32/int64, or a double without fraction) within [min, max]. */
int mc__sopt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err);

/* true or false. */
int mc__sopt_bool(const bson_iter_t *it, bool *out, mc_error_t *err);

/* A non-empty string of at most max bytes without NUL; *out is a new copy (bson_free), the
 * previous value freed. out NULL: only check. */
int mc__sopt_string(const bson_iter_t *it, size_t max, char **out, mc_error_t *err);

/* "unknown option 'urll'; did you mean 'url'?" among the NULL-terminated `known`. */
int mc__sopt_unknown(const char *key, const char *const *known, mc_error_t *err);

#endif
