/*
 * fuzz_subject_template.c: libFuzzer target for channel/key/subject templates
 * (src/lib/sinks/subject_template.c) with arbitrary recipient bytes.
 *
 * Input: byte 0 picks the kind (bit 0: NATS) and whether to use the default template (bit 1);
 * then the template text up to the first NUL byte; then one length byte n; then two recipient
 * values, the first n bytes and the rest (NUL and any other byte allowed).
 * Properties checked beyond "no crash, no leak, no hang":
 *   - a NATS rendering is always a valid publish subject (mc__nats_subject_valid);
 *   - rendering is injective: for a template with {recipient}, two different recipients never
 *     give the same name (an absent and an empty recipient count as the same value, as
 *     documented);
 *   - a template that compiles renders the same name twice (no hidden state).
 * Single-threaded (libFuzzer).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sinks/subject_template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int render(const mc__subject_template_t *t, const char *r, size_t rlen, char *out,
                  size_t *len)
{
    mc__subject_values_t v = {{"orders", 6}, {r, rlen}, {"shop", 4}, {NULL, 0}, {"insert", 6}};
    return mc__subject_template_render(t, &v, out, MC__SUBJECT_MAX + 1, len, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2 || size > 8192) {
        return 0;
    }
    mc__subject_kind_t kind = (data[0] & 1) ? MC__SUBJECT_NATS : MC__SUBJECT_REDIS;
    bool use_default = (data[0] & 2) != 0;
    const uint8_t *p = data + 1;
    size_t left = size - 1;
    const uint8_t *nul = memchr(p, 0, left);
    size_t tlen = nul ? (size_t)(nul - p) : left;
    char *text = malloc(tlen + 1);
    if (!text) {
        abort();
    }
    memcpy(text, p, tlen);
    text[tlen] = '\0';
    p += nul ? tlen + 1 : tlen;
    left -= nul ? tlen + 1 : tlen;

    const char *tmpl = use_default ? (kind == MC__SUBJECT_NATS ? MC__SUBJECT_DEFAULT_NATS
                                                               : MC__SUBJECT_DEFAULT_REDIS)
                                   : text;
    mc_error_t err;
    mc__subject_template_t *t = mc__subject_template_new(tmpl, kind, &err);
    if (!t) {
        if (err.code != MC_ECONFIG || use_default) {
            abort();
        }
        free(text);
        return 0;
    }
    size_t n1 = 0;
    if (left > 0) {
        n1 = p[0];
        p++;
        left--;
    }
    if (n1 > left) {
        n1 = left;
    }
    const char *r1 = (const char *)p, *r2 = (const char *)p + n1;
    size_t l1 = n1, l2 = left - n1;

    static char a[MC__SUBJECT_MAX + 1], b[MC__SUBJECT_MAX + 1], c[MC__SUBJECT_MAX + 1];
    size_t la = 0, lb = 0, lc = 0;
    int ra = render(t, r1, l1, a, &la);
    int rb = render(t, r2, l2, b, &lb);
    if ((ra != 0 && ra != MC_ELIMIT) || (rb != 0 && rb != MC_ELIMIT)) {
        abort();
    }
    if (ra == 0) {
        if (la != strlen(a) && memchr(a, 0, la) == NULL) {
            abort(); /* the reported length must match what was written */
        }
        if (kind == MC__SUBJECT_NATS && !mc__nats_subject_valid(a, la)) {
            fprintf(stderr, "invalid subject: %.*s\n", (int)la, a);
            abort();
        }
        if (render(t, r1, l1, c, &lc) != 0 || lc != la || memcmp(a, c, la) != 0) {
            abort();
        }
    }
    if (ra == 0 && rb == 0 && mc__subject_template_uses_recipient(t)) {
        bool same_value = l1 == l2 && memcmp(r1, r2, l1) == 0;
        bool same_name = la == lb && memcmp(a, b, la) == 0;
        if (same_value != same_name) {
            fprintf(stderr, "not injective: %.*s\n", (int)la, a);
            abort();
        }
    }
    mc__subject_template_destroy(t);
    free(text);
    return 0;
}
