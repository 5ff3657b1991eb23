/*
 * fuzz_summary.c: libFuzzer target for `summary` templates (src/lib/summary.c). Input:
 * "template\0document-json" (the document part may be missing or not JSON; then a fixed
 * change event is used). The template is checked and compiled; the checker and the compiler
 * must agree; a compiled template renders the document into a line that is NUL-terminated,
 * at most MC__SUMMARY_MAX bytes, valid UTF-8 without NUL (the line goes into a JSON message)
 * and the same on a second rendering. Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "summary.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 16384) {
        return 0;
    }
    char *buf = malloc(size + 2);
    memcpy(buf, data, size);
    buf[size] = buf[size + 1] = '\0';
    const char *text = buf;
    size_t tlen = strlen(buf);
    const char *json = tlen < size ? buf + tlen + 1 : "";

    char msg[240];
    bool ok = mc__summary_template_check(text, msg, sizeof(msg));
    mc_summary_rule_t rule = {.text = (char *)text};
    mc_summary_config_t cfg = {.rules = &rule, .n_rules = 1};
    mc_error_t err = {0};
    mc__summary_t *s = mc__summary_new(&cfg, &err);
    if ((s != NULL) != ok) {
        fprintf(stderr, "checker and compiler disagree on %s\n", text);
        abort();
    }
    if (s) {
        bson_error_t e;
        bson_t *doc = bson_new_from_json((const uint8_t *)json, -1, &e);
        if (!doc) {
            doc = bson_new_from_json(
                (const uint8_t *)"{\"operationType\":\"update\",\"fullDocument\":{\"name\":\"x\"}}",
                -1, NULL);
        }
        char a[MC__SUMMARY_MAX + 1], b[MC__SUMMARY_MAX + 1];
        int na = mc__summary_render(s, doc, a, sizeof(a));
        int nb = mc__summary_render(s, doc, b, sizeof(b));
        if (na < 0 || na > MC__SUMMARY_MAX || (size_t)na != strlen(a) || na != nb ||
            memcmp(a, b, (size_t)na) != 0 || !bson_utf8_validate(a, (size_t)na, false)) {
            fprintf(stderr, "bad rendering of %s: %d\n", text, na);
            abort();
        }
        bson_destroy(doc);
        mc__summary_destroy(s);
    }
    free(buf);
    return 0;
}
