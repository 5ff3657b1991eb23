/*
 * fuzz_config.c: libFuzzer target for the configuration loader. The input is YAML text given
 * to mc_config_load_string(); seeds live in tests/fuzz/corpus/fuzz_config/.
 *
 * Single-threaded (libFuzzer). Beyond "no crash, no leak, no hang" it checks the loader's
 * promises: a failure always carries MC_ECONFIG and a "fuzz.yaml:LINE:COL: " prefix, and a
 * success always yields valid BSON pipelines/options and consistent counts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mongocast/config.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    /* Give ${VAR} references something to find, deterministically. */
    setenv("MC_FUZZ_STR", "shop", 1);
    setenv("MC_FUZZ_INT", "42", 1);
    setenv("MC_FUZZ_EMPTY", "", 1);
    setenv("MC_FUZZ_DOLLAR", "${MC_FUZZ_STR}$$", 1);
    unsetenv("MONGODB_URI");
    return 0;
}

static void check_position_prefix(const char *msg)
{
    static const char prefix[] = "fuzz.yaml:";
    if (strncmp(msg, prefix, sizeof(prefix) - 1) != 0) {
        fprintf(stderr, "bad error prefix: %s\n", msg);
        abort();
    }
    const char *p = msg + sizeof(prefix) - 1;
    char *end;
    long line = strtol(p, &end, 10);
    if (end == p || *end != ':' || line < 1) {
        fprintf(stderr, "bad error line: %s\n", msg);
        abort();
    }
    p = end + 1;
    long col = strtol(p, &end, 10);
    if (end == p || strncmp(end, ": ", 2) != 0 || col < 1) {
        fprintf(stderr, "bad error column: %s\n", msg);
        abort();
    }
}

static void check_bson(const bson_t *doc)
{
    size_t offset;
    if (!doc || !bson_validate(doc, BSON_VALIDATE_UTF8, &offset)) {
        fprintf(stderr, "invalid BSON produced\n");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mc_error_t err;
    mc_config_t *cfg = mc_config_load_string((const char *)data, size, "fuzz.yaml", &err);
    if (!cfg) {
        if (err.code != MC_ECONFIG) {
            fprintf(stderr, "unexpected code %d: %s\n", err.code, err.message);
            abort();
        }
        check_position_prefix(err.message);
        return 0;
    }
    if (cfg->n_streams == 0 || !cfg->mongodb_uri || !cfg->server.listen || !cfg->log_level) {
        abort();
    }
    for (size_t i = 0; i < cfg->n_streams; i++) {
        const mc_stream_config_t *s = &cfg->streams[i];
        check_bson(s->pipeline);
        if (mc_config_stream(cfg, s->name) != s || (s->collection && !s->db)) {
            abort();
        }
    }
    for (size_t i = 0; i < cfg->n_sinks; i++) {
        const mc_sink_config_t *sk = &cfg->sinks[i];
        check_bson(sk->options);
        for (size_t j = 0; j < sk->n_streams; j++) {
            if (!mc_config_stream(cfg, sk->streams[j])) {
                abort();
            }
        }
    }
    if (cfg->auth.enabled && !cfg->auth.algorithm) {
        abort();
    }
    mc_config_destroy(cfg);
    return 0;
}
