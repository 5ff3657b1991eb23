/*
 * sink_opts.h: reading a sink's options (the BSON of its config entry, mongocast/sink.h) with
 * the same wording for every broker sink: strings, bounded integers, booleans and enums, each
 * error naming the option and what it must be. Pure; any thread.
 */
#ifndef MC_SINKS_SINK_OPTS_H
#define MC_SINKS_SINK_OPTS_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stdint.h>

#include "mongocast/error.h"

/* A non-empty string (no NUL inside); *out borrows the BSON's text. MC_ECONFIG otherwise. */
int mc__opt_string(const bson_iter_t *it, const char **out, mc_error_t *err);

/* An integer in [min, max] (a double must be integral). MC_ECONFIG otherwise. */
int mc__opt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err);

/* true or false. MC_ECONFIG otherwise. */
int mc__opt_bool(const bson_iter_t *it, bool *out, mc_error_t *err);

/* One of `names` (NULL-terminated); *out is its index. MC_ECONFIG listing them otherwise. */
int mc__opt_enum(const bson_iter_t *it, const char *const *names, int *out, mc_error_t *err);

/* "unknown option 'x' for a redis sink (known: a, b, c)". Always MC_ECONFIG. */
int mc__opt_unknown(const bson_iter_t *it, const char *type, const char *known, mc_error_t *err);

#endif
