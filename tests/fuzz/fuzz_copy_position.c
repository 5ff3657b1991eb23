/*
 * fuzz_copy_position.c: libFuzzer target for the copy positions of a sink's initial snapshot
 * (initial_copy.c): the `_data` of a stored record that a restart resumes a copy from. The
 * bytes are the string (cut at the first NUL).
 *
 * Single-threaded (libFuzzer). Beyond "no crash, no leak, no hang": a refusal is MC_EINVAL
 * with a message; an accepted position formats back to exactly the same string (uppercase
 * hex) or, given in lowercase, to its uppercase form, and mc__copy_token() agrees that it
 * is one.
 */
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 16 * 1024) {
        return 0;
    }
    char *s = malloc(size + 1);
    if (!s) {
        return 0;
    }
    memcpy(s, data, size);
    s[size] = '\0';
    mc__copy_position_t p;
    mc_error_t err;
    mc_error_clear(&err);
    int rc = mc__copy_position_parse(s, &p, &err);
    if (rc != 0) {
        if (rc != MC_EINVAL || !err.message[0] || p.id_doc) {
            abort();
        }
    } else {
        if (!mc__copy_token(s) || (!p.done && !p.id_doc) || (p.done && p.id_doc)) {
            abort();
        }
        char *again = mc__copy_position_format(&p);
        if (!again) {
            abort();
        }
        size_t n = strlen(s);
        if (strlen(again) != n) {
            abort();
        }
        for (size_t k = 0; k < n; k++) {
            if (toupper((unsigned char)s[k]) != again[k]) {
                abort();
            }
        }
        bson_free(again);
    }
    mc__copy_position_clear(&p);
    free(s);
    return 0;
}
