/*
 * bson_helpers.c: small BSON helpers shared by mongo-emulator's modules (see bson_helpers.h).
 *
 * Threads: any; pure functions, no state.
 */
#include "bson_helpers.h"

#include "mongocast/filter.h"

bool emu_safe_iter_init(bson_iter_t *it, const uint8_t *data, size_t len)
{
    return data && bson_iter_init_from_data(it, data, len);
}

const char *emu_type_name(bson_type_t t)
{
    return mc_bson_type_name(t);
}
