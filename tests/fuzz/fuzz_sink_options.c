/*
 * fuzz_sink_options.c: libFuzzer target for the option parsers of the sink types (webhook,
 * mongodb, redis, nats: src/lib/sinks/sink_*.c, sink_opts.c): the input, when it is a valid
 * BSON document, is handed to each type's validate() as the sink's options (what the config
 * loader builds from YAML).
 *
 * Single-threaded (libFuzzer). Checks beyond "no crash, no leak, no hang": the result is 0 or
 * MC_ECONFIG with a non-empty message, and no message shows the value of a `secret`,
 * `password` or `token` option or of an element of `secrets` (8 bytes or longer): secrets
 * must never reach a log through an error. A message that still holds the text once the
 * secret's bytes are replaced by others shows fixed text (a secret "cloudevents" in "format must
 * be message or cloudevents"), not the secret.
 */
#define _GNU_SOURCE /* memmem */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The secret's text in msg, when the input holds that text only once (as the secret): a
 * message may quote another option (an unknown key, a header name) that happens to hold it. */
static bool contains(const bson_t *doc, const char *msg, const char *secret, uint32_t len)
{
    if (len < 8 || !memmem(msg, strlen(msg), secret, len)) {
        return false;
    }
    const uint8_t *d = bson_get_data(doc);
    const uint8_t *first = memmem(d, doc->len, secret, len);
    return first && !memmem(first + 1, doc->len - (size_t)(first + 1 - d), secret, len);
}

/* The value of a `secret` option or an element of `secrets` that `msg` shows (its text and
 * length in *out / *out_len), else false. */
static bool leaks_secret(const bson_t *doc, const char *msg, const char **out, uint32_t *out_len)
{
    bson_iter_t it, a;
    uint32_t len = 0;
    static const char *const single[] = {"secret", "password", "token"};
    for (size_t k = 0; k < sizeof(single) / sizeof(single[0]); k++) {
        if (bson_iter_init_find(&it, doc, single[k]) && BSON_ITER_HOLDS_UTF8(&it)) {
            const char *v = bson_iter_utf8(&it, &len);
            if (contains(doc, msg, v, len)) {
                *out = v;
                *out_len = len;
                return true;
            }
        }
    }
    if (bson_iter_init_find(&it, doc, "secrets") && BSON_ITER_HOLDS_ARRAY(&it) &&
        bson_iter_recurse(&it, &a)) {
        while (bson_iter_next(&a)) {
            if (BSON_ITER_HOLDS_UTF8(&a)) {
                const char *v = bson_iter_utf8(&a, &len);
                if (contains(doc, msg, v, len)) {
                    *out = v;
                    *out_len = len;
                    return true;
                }
            }
        }
    }
    return false;
}

/* Whether validate() still shows `secret`'s text when the secret's bytes in the input are
 * replaced by letters of the same length (so the text is the message's own). */
static bool fixed_text(const mc_sink_type_t *type, const bson_t *doc, const char *secret,
                       uint32_t len)
{
    uint8_t *copy = malloc(doc->len);
    if (!copy) {
        return false;
    }
    memcpy(copy, bson_get_data(doc), doc->len);
    char *at = (char *)copy + (secret - (const char *)bson_get_data(doc));
    char fill = secret[0] == 'q' ? 'r' : 'q';
    memset(at, fill, len);
    bson_t other;
    bool fixed = false;
    if (bson_init_static(&other, copy, doc->len)) {
        static mc_engine_t engine;
        mc_sink_t sink;
        memset(&sink, 0, sizeof(sink));
        sink.engine = &engine;
        sink.name = "fuzz";
        sink.type = type;
        sink.ctx = calloc(1, type->ctx_size);
        mc_error_t err;
        mc_error_clear(&err);
        if (type->validate(&sink, &other, &err) != 0) {
            fixed = memmem(err.message, strlen(err.message), secret, len) != NULL;
        }
        free(sink.ctx);
    }
    free(copy);
    return fixed;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bson_t doc;
    if (size > 65536 || !bson_init_static(&doc, data, size) ||
        !bson_validate(&doc, BSON_VALIDATE_NONE, NULL)) {
        return 0;
    }
    static mc_engine_t engine; /* no config: the mongodb loop guard has no streams to check */
    const mc_sink_type_t *types[] = {&mc__sink_webhook_type, &mc__sink_mongodb_type,
                                     &mc__sink_redis_type, &mc__sink_nats_type};
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
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
        const char *secret = NULL;
        uint32_t secret_len = 0;
        if (rc != 0 && leaks_secret(&doc, err.message, &secret, &secret_len) &&
            !fixed_text(types[t], &doc, secret, secret_len)) {
            abort();
        }
        free(ctx);
    }
    return 0;
}
