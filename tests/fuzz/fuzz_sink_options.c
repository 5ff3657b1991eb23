/*
 * fuzz_sink_options.c: libFuzzer target for the option parsers of the webhook and mongodb
 * sink types (src/lib/sinks/sink_webhook.c, sink_mongodb.c): the input, when it is a valid
 * BSON document, is handed to each type's validate() as the sink's options (what the config
 * loader builds from YAML).
 *
 * Single-threaded (libFuzzer). Checks beyond "no crash, no leak, no hang": the result is 0 or
 * MC_ECONFIG with a non-empty message, and "whsec_" in a message is never followed by base64
 * text (a secret, or a part of one, must never reach a log through an error).
 */
#define _GNU_SOURCE /* memmem */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bson_t doc;
    if (size > 65536 || !bson_init_static(&doc, data, size) ||
        !bson_validate(&doc, BSON_VALIDATE_NONE, NULL)) {
        return 0;
    }
    static mc_engine_t engine; /* no config: the mongodb loop guard has no streams to check */
    const mc_sink_type_t *types[] = {&mc__sink_webhook_type, &mc__sink_mongodb_type};
    for (size_t t = 0; t < 2; t++) {
        mc_sink_t sink;
        memset(&sink, 0, sizeof(sink));
        sink.engine = &engine;
        sink.name = "fuzz";
        sink.type = types[t];
        void *ctx = calloc(1, types[t]->ctx_size);
        sink.ctx = ctx;
        mc_error_t err;
        mc_error_clear(&err);
        int rc = types[t]->validate(&sink, &doc, &err);
        if (rc != 0 && (rc != MC_ECONFIG || !err.message[0])) {
            abort();
        }
        /* Messages may name the form ("whsec_<base64>", "after whsec_ is"), never a secret. */
        const char *m = err.message;
        while (rc != 0 && (m = memmem(m, strlen(m), "whsec_", 6)) != NULL) {
            m += 6;
            if (*m && strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", *m)) {
                abort(); /* base64 text right after the prefix: a secret */
            }
        }
        free(ctx);
    }
    return 0;
}
