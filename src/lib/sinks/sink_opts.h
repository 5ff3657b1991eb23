/*
 * sink_opts.h: reading a sink type's options (the BSON of its config entry, mongocast/sink.h)
 * with one wording for every sink type: strings, bounded integers, booleans and enums, each
 * error naming the option and what it must be ("option timeout_ms must be an integer from 1
 * to 600000"); the engine prefixes the config position and the sink's name. Shared by the
 * redis, nats, webhook and mongodb sink types.
 *
 * Pure functions: any thread.
 */
#ifndef MC_SINKS_SINK_OPTS_H
#define MC_SINKS_SINK_OPTS_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

/* A non-empty string (no NUL inside); *out borrows the BSON's text. MC_ECONFIG otherwise. */
int mc__opt_string(const bson_iter_t *it, const char **out, mc_error_t *err);

/* The same, at most `max` bytes, copied: *out (bson_free()d first, may be NULL) becomes a
 * bson_strdup() copy. `out` may be NULL (validation only). */
int mc__opt_string_dup(const bson_iter_t *it, size_t max, char **out, mc_error_t *err);

/* An integer (int32, int64, or a double without fraction) in [min, max]. MC_ECONFIG
 * otherwise. */
int mc__opt_int(const bson_iter_t *it, int64_t min, int64_t max, int64_t *out, mc_error_t *err);

/* true or false. MC_ECONFIG otherwise. */
int mc__opt_bool(const bson_iter_t *it, bool *out, mc_error_t *err);

/* One of `names` (NULL-terminated); *out is its index. MC_ECONFIG listing them otherwise. */
int mc__opt_enum(const bson_iter_t *it, const char *const *names, int *out, mc_error_t *err);

/* "unknown option 'x' for WHERE; did you mean 'y'? (known: a, b, c)" (WHERE such as "a redis sink";
 * the suggestion only when a known name is close). `known` is NULL-terminated. Always MC_ECONFIG.
 */
int mc__opt_unknown(const char *key, const char *where, const char *const *known, mc_error_t *err);

#endif
