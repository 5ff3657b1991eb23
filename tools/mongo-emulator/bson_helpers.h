/*
 * bson_helpers.h: small BSON helpers shared by mongo-emulator's modules (agg.c, update.c,
 * changestream.c), kept apart from emulator.h so that the pure modules need no server types.
 *
 * Pure functions, any thread.
 */
#ifndef MONGO_EMULATOR_BSON_HELPERS_H
#define MONGO_EMULATOR_BSON_HELPERS_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

/* bson_iter_init_from_data that refuses a NULL `data` instead of asserting. Malformed BSON can
 * hold a zero-length sub-document, which bson_value_copy turns into a NULL pointer: such a
 * value reads as unreadable, never as a crash. */
bool emu_safe_iter_init(bson_iter_t *it, const uint8_t *data, size_t len);

/* The name MongoDB gives type `t` in its error messages and in $type ("string", "objectId",
 * "javascriptWithScope", ...); "missing" for end-of-document. Never NULL. */
const char *emu_type_name(bson_type_t t);

#endif
