/*
 * config_yaml.c: YAML text -> positioned node tree for the configuration loader, plus the
 * ${VAR} substitution and the scalar typing rules (see config_internal.h, docs/config.md).
 *
 * Runs on whichever thread loads a configuration; no global state. The input is hostile until
 * proven otherwise: it is bounded in size (MC__CFG_MAX_BYTES), depth (MC__CFG_MAX_DEPTH), node
 * count and expanded size, and aliases are refused outright so that "billion laughs" style
 * expansion cannot happen. Invariants of the produced tree: every mapping key is a scalar,
 * no mapping holds a key twice, no scalar holds an embedded NUL or invalid UTF-8, and every
 * scalar value (not key) has had ${VAR} substitution applied exactly once.
 */
#include "config_internal.h"

#include <bson/bson.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

typedef struct yaml_ctx {
    const char *name;
    const char *input;
    size_t input_len;
    mc_error_t *err;
    size_t n_nodes;
    size_t total_bytes;
} yaml_ctx_t;

static int fail_at(yaml_ctx_t *ctx, int line, int col, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static int fail_at(yaml_ctx_t *ctx, int line, int col, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return mc_error_set(ctx->err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "%s:%d:%d: %s",
                        ctx->name, line, col, msg);
}

void mc__cfg_node_free(mc__cfg_node_t *node)
{
    if (!node) {
        return;
    }
    for (size_t i = 0; i < node->n_items; i++) {
        mc__cfg_node_free(node->items[i]);
    }
    free(node->items);
    free(node->text);
    free(node);
}

/* ---- ${VAR} substitution ---------------------------------------------------------------- */

typedef struct sbuf {
    char *data;
    size_t len;
    size_t cap;
    size_t max;
} sbuf_t;

static int sbuf_add(sbuf_t *b, const char *s, size_t n)
{
    if (n > b->max - b->len) {
        return -1;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        char *p = realloc(b->data, cap);
        if (!p) {
            return -1;
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static bool is_name_start(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static bool is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

int mc__cfg_interpolate(const char *in, size_t len, char **out, size_t *out_len, char *msg,
                        size_t msg_size)
{
    sbuf_t b = {NULL, 0, 0, MC__CFG_MAX_VALUE};
    size_t i = 0;

    *out = NULL;
    if (sbuf_add(&b, "", 0) != 0) {
        snprintf(msg, msg_size, "out of memory");
        return -1;
    }
    while (i < len) {
        const char *dollar = memchr(in + i, '$', len - i);
        size_t run = dollar ? (size_t)(dollar - (in + i)) : len - i;
        if (sbuf_add(&b, in + i, run) != 0) {
            goto too_long;
        }
        i += run;
        if (i >= len) {
            break;
        }
        /* in[i] == '$' */
        /* "$${" is a literal "${". Any other "$$" stays as written, so that aggregation
         * variables such as $$ROOT and $$NOW need no escaping in pipelines. */
        if (i + 2 < len && in[i + 1] == '$' && in[i + 2] == '{') {
            if (sbuf_add(&b, "${", 2) != 0) {
                goto too_long;
            }
            i += 3;
            continue;
        }
        if (i + 1 >= len || in[i + 1] != '{') {
            /* A lone '$' is literal so that "$match" or "$fullDocument.x" need no escaping. */
            if (sbuf_add(&b, "$", 1) != 0) {
                goto too_long;
            }
            i++;
            continue;
        }
        const char *start = in + i + 2;
        const char *close = memchr(start, '}', len - (i + 2));
        if (!close) {
            snprintf(msg, msg_size, "unterminated '${' (a literal '${' is written '$${')");
            goto fail;
        }
        size_t inner = (size_t)(close - start);
        size_t name_len = 0;
        if (inner > 0 && is_name_start(start[0])) {
            name_len = 1;
            while (name_len < inner && is_name_char(start[name_len])) {
                name_len++;
            }
        }
        bool has_default = false;
        if (name_len == 0 || name_len > 255 ||
            (name_len < inner &&
             !(inner - name_len >= 2 && start[name_len] == ':' && start[name_len + 1] == '-'))) {
            snprintf(msg, msg_size,
                     "invalid variable reference '${%.*s}' (expected ${NAME} or "
                     "${NAME:-default})",
                     (int)(inner > 60 ? 60 : inner), start);
            goto fail;
        }
        has_default = name_len < inner;
        char name[256];
        memcpy(name, start, name_len);
        name[name_len] = '\0';
        const char *value = getenv(name);
        if (!value || (value[0] == '\0' && has_default)) {
            if (!has_default) {
                snprintf(msg, msg_size, "environment variable %s is not set", name);
                goto fail;
            }
            const char *def = start + name_len + 2;
            if (sbuf_add(&b, def, (size_t)(close - def)) != 0) {
                goto too_long;
            }
        } else if (sbuf_add(&b, value, strlen(value)) != 0) {
            goto too_long;
        }
        i = (size_t)(close - in) + 1;
    }
    *out = b.data;
    *out_len = b.len;
    return 0;

too_long:
    snprintf(msg, msg_size, "value is longer than %u bytes after variable substitution",
             MC__CFG_MAX_VALUE);
fail:
    free(b.data);
    return -1;
}

/* ---- scalar typing ---------------------------------------------------------------------- */

static bool all_digits(const char *s, size_t n, int base)
{
    if (n == 0) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= '0' && c <= '9' && (base != 8 || c <= '7')) ||
                  (base == 16 && ((c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')));
        if (!ok) {
            return false;
        }
    }
    return true;
}

static bool parse_int(const char *s, size_t n, mc__cfg_scalar_t *out)
{
    size_t i = 0;
    bool neg = false;
    int base = 10;
    if (n > 0 && (s[0] == '-' || s[0] == '+')) {
        neg = s[0] == '-';
        i = 1;
    }
    if (n - i > 2 && s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'o')) {
        /* YAML 1.2 core: 0x and 0o carry no sign. */
        if (i != 0) {
            return false;
        }
        base = s[i + 1] == 'x' ? 16 : 8;
        i += 2;
    }
    if (!all_digits(s + i, n - i, base)) {
        return false;
    }
    uint64_t v = 0;
    bool overflow = false;
    for (; i < n; i++) {
        char c = s[i];
        unsigned d = (c >= '0' && c <= '9')   ? (unsigned)(c - '0')
                     : (c >= 'a' && c <= 'f') ? (unsigned)(c - 'a' + 10)
                                              : (unsigned)(c - 'A' + 10);
        if (v > (UINT64_MAX - d) / (uint64_t)base) {
            overflow = true;
            break;
        }
        v = v * (uint64_t)base + d;
    }
    out->type = MC__CFG_INT;
    if (overflow || (!neg && v > (uint64_t)INT64_MAX) || (neg && v > (uint64_t)INT64_MAX + 1)) {
        out->overflow = true;
        return true;
    }
    out->i = neg ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    return true;
}

static bool parse_float(const char *s, size_t n, mc__cfg_scalar_t *out)
{
    size_t i = 0;
    if (n > 0 && (s[0] == '-' || s[0] == '+')) {
        i = 1;
    }
    const char *rest = s + i;
    size_t rn = n - i;
    if ((rn == 4) && (!strcmp(rest, ".inf") || !strcmp(rest, ".Inf") || !strcmp(rest, ".INF"))) {
        out->type = MC__CFG_DOUBLE;
        out->d = s[0] == '-' ? -INFINITY : INFINITY;
        return true;
    }
    if (i == 0 && (!strcmp(s, ".nan") || !strcmp(s, ".NaN") || !strcmp(s, ".NAN"))) {
        out->type = MC__CFG_DOUBLE;
        out->d = NAN;
        return true;
    }
    /* [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )? */
    size_t j = 0, int_digits = 0, frac_digits = 0;
    while (j < rn && rest[j] >= '0' && rest[j] <= '9') {
        j++;
        int_digits++;
    }
    if (j < rn && rest[j] == '.') {
        j++;
        while (j < rn && rest[j] >= '0' && rest[j] <= '9') {
            j++;
            frac_digits++;
        }
    }
    if (int_digits == 0 && frac_digits == 0) {
        return false;
    }
    if (j < rn && (rest[j] == 'e' || rest[j] == 'E')) {
        j++;
        if (j < rn && (rest[j] == '-' || rest[j] == '+')) {
            j++;
        }
        size_t exp_digits = 0;
        while (j < rn && rest[j] >= '0' && rest[j] <= '9') {
            j++;
            exp_digits++;
        }
        if (exp_digits == 0) {
            return false;
        }
    }
    if (j != rn) {
        return false;
    }
    out->type = MC__CFG_DOUBLE;
    out->d = strtod(s, NULL);
    return true;
}

void mc__cfg_scalar_type(const mc__cfg_node_t *node, mc__cfg_scalar_t *out)
{
    memset(out, 0, sizeof(*out));
    out->type = MC__CFG_STRING;
    if (!node->plain) {
        return;
    }
    const char *s = node->text;
    size_t n = node->len;
    static const char *const nulls[] = {"", "~", "null", "Null", "NULL"};
    static const char *const trues[] = {"true", "True", "TRUE"};
    static const char *const falses[] = {"false", "False", "FALSE"};
    for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++) {
        if (!strcmp(s, nulls[i])) {
            out->type = MC__CFG_NULL;
            return;
        }
    }
    for (size_t i = 0; i < sizeof(trues) / sizeof(trues[0]); i++) {
        if (!strcmp(s, trues[i]) || !strcmp(s, falses[i])) {
            out->type = MC__CFG_BOOL;
            out->b = s[0] == 't' || s[0] == 'T';
            return;
        }
    }
    if (parse_int(s, n, out)) {
        return;
    }
    if (parse_float(s, n, out)) {
        return;
    }
    out->type = MC__CFG_STRING;
}

/* ---- edit distance ---------------------------------------------------------------------- */

size_t mc__cfg_edit_distance(const char *a, const char *b, size_t cap)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) {
        return cap + 1;
    }
    if ((la > lb ? la - lb : lb - la) > cap) {
        return cap + 1;
    }
    /* Three rolling rows are enough for the transposition term of optimal string alignment. */
    size_t rows[3][65];
    size_t *prev2 = rows[0], *prev = rows[1], *cur = rows[2];
    for (size_t j = 0; j <= lb; j++) {
        prev[j] = j;
    }
    for (size_t i = 1; i <= la; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            size_t best = prev[j] + 1;
            if (cur[j - 1] + 1 < best) {
                best = cur[j - 1] + 1;
            }
            if (prev[j - 1] + cost < best) {
                best = prev[j - 1] + cost;
            }
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                prev2[j - 2] + 1 < best) {
                best = prev2[j - 2] + 1;
            }
            cur[j] = best;
        }
        size_t *t = prev2;
        prev2 = prev;
        prev = cur;
        cur = t;
    }
    return prev[lb] > cap ? cap + 1 : prev[lb];
}

/* ---- tree building ---------------------------------------------------------------------- */

static mc__cfg_node_t *node_new(yaml_ctx_t *ctx, mc__cfg_kind_t kind, yaml_mark_t mark)
{
    if (++ctx->n_nodes > MC__CFG_MAX_NODES) {
        fail_at(ctx, (int)mark.line + 1, (int)mark.column + 1,
                "configuration has more than %d YAML nodes", MC__CFG_MAX_NODES);
        return NULL;
    }
    mc__cfg_node_t *n = calloc(1, sizeof(*n));
    if (!n) {
        fail_at(ctx, (int)mark.line + 1, (int)mark.column + 1, "out of memory");
        return NULL;
    }
    n->kind = kind;
    n->line = (int)mark.line + 1;
    n->col = (int)mark.column + 1;
    return n;
}

static int node_append(yaml_ctx_t *ctx, mc__cfg_node_t *parent, mc__cfg_node_t *child)
{
    if (parent->n_items == parent->cap_items) {
        size_t cap = parent->cap_items ? parent->cap_items * 2 : 8;
        mc__cfg_node_t **p = realloc(parent->items, cap * sizeof(*p));
        if (!p) {
            return fail_at(ctx, child->line, child->col, "out of memory");
        }
        parent->items = p;
        parent->cap_items = cap;
    }
    parent->items[parent->n_items++] = child;
    return 0;
}

static bool tag_is(const yaml_char_t *tag, const char *want)
{
    return tag && !strcmp((const char *)tag, want);
}

typedef struct key_ref {
    const mc__cfg_node_t *key;
} key_ref_t;

static int key_cmp(const void *a, const void *b)
{
    const mc__cfg_node_t *ka = ((const key_ref_t *)a)->key;
    const mc__cfg_node_t *kb = ((const key_ref_t *)b)->key;
    int c = strcmp(ka->text, kb->text);
    if (c) {
        return c;
    }
    /* Ties broken by position so that the report names the later duplicate. */
    if (ka->line != kb->line) {
        return ka->line < kb->line ? -1 : 1;
    }
    return ka->col < kb->col ? -1 : (ka->col > kb->col);
}

/* Sorting keeps duplicate detection O(n log n) for hostile mappings with many keys. */
static int check_duplicate_keys(yaml_ctx_t *ctx, const mc__cfg_node_t *map)
{
    size_t n = map->n_items / 2;
    if (n < 2) {
        return 0;
    }
    key_ref_t *refs = malloc(n * sizeof(*refs));
    if (!refs) {
        return fail_at(ctx, map->line, map->col, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        refs[i].key = map->items[2 * i];
    }
    qsort(refs, n, sizeof(*refs), key_cmp);
    const mc__cfg_node_t *dup = NULL, *first = NULL;
    for (size_t i = 1; i < n; i++) {
        if (!strcmp(refs[i].key->text, refs[i - 1].key->text)) {
            /* Report the earliest second occurrence in document order. */
            const mc__cfg_node_t *k = refs[i].key;
            if (!dup || k->line < dup->line || (k->line == dup->line && k->col < dup->col)) {
                size_t f = i - 1;
                while (f > 0 && !strcmp(refs[f - 1].key->text, k->text)) {
                    f--;
                }
                dup = k;
                first = refs[f].key;
            }
        }
    }
    free(refs);
    if (dup) {
        return fail_at(ctx, dup->line, dup->col, "duplicate key '%.80s' (first defined at line %d)",
                       dup->text, first->line);
    }
    return 0;
}

static void offset_to_position(const yaml_ctx_t *ctx, size_t offset, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < offset && i < ctx->input_len; i++) {
        unsigned char c = (unsigned char)ctx->input[i];
        if (c == '\n') {
            (*line)++;
            *col = 1;
        } else if ((c & 0xC0) != 0x80) {
            (*col)++;
        }
    }
}

static int syntax_error(yaml_ctx_t *ctx, const yaml_parser_t *p)
{
    int line, col;
    const char *problem = p->problem ? p->problem : "invalid YAML";
    if (p->error == YAML_READER_ERROR) {
        offset_to_position(ctx, p->problem_offset, &line, &col);
        if (p->problem_value != -1) {
            return fail_at(ctx, line, col, "%s (byte 0x%02X)", problem, p->problem_value & 0xFF);
        }
        return fail_at(ctx, line, col, "%s", problem);
    }
    if (p->error == YAML_MEMORY_ERROR) {
        return fail_at(ctx, 1, 1, "out of memory while parsing YAML");
    }
    line = (int)p->problem_mark.line + 1;
    col = (int)p->problem_mark.column + 1;
    if (p->context) {
        return fail_at(ctx, line, col, "%s %s at line %d, column %d", problem, p->context,
                       (int)p->context_mark.line + 1, (int)p->context_mark.column + 1);
    }
    return fail_at(ctx, line, col, "%s", problem);
}

/* Builds the scalar node for a SCALAR event; `is_key` scalars are not substituted. */
static mc__cfg_node_t *scalar_node(yaml_ctx_t *ctx, const yaml_event_t *ev, bool is_key)
{
    const yaml_char_t *tag = ev->data.scalar.tag;
    int line = (int)ev->start_mark.line + 1, col = (int)ev->start_mark.column + 1;
    bool tagged_str = tag_is(tag, "tag:yaml.org,2002:str") || tag_is(tag, "!");
    if (tag && !tagged_str) {
        fail_at(ctx, line, col, "unsupported YAML tag '%.80s' (only !!str is allowed)",
                (const char *)tag);
        return NULL;
    }
    const char *raw = (const char *)ev->data.scalar.value;
    size_t raw_len = ev->data.scalar.length;
    if (memchr(raw, '\0', raw_len)) {
        fail_at(ctx, line, col, "values must not contain NUL characters");
        return NULL;
    }
    mc__cfg_node_t *n = node_new(ctx, MC__CFG_SCALAR, ev->start_mark);
    if (!n) {
        return NULL;
    }
    n->plain = !tag && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    if (is_key) {
        n->text = malloc(raw_len + 1);
        if (!n->text) {
            fail_at(ctx, line, col, "out of memory");
            mc__cfg_node_free(n);
            return NULL;
        }
        memcpy(n->text, raw, raw_len);
        n->text[raw_len] = '\0';
        n->len = raw_len;
    } else {
        char msg[300];
        if (mc__cfg_interpolate(raw, raw_len, &n->text, &n->len, msg, sizeof(msg)) != 0) {
            fail_at(ctx, line, col, "%s", msg);
            mc__cfg_node_free(n);
            return NULL;
        }
        if (memchr(n->text, '\0', n->len)) {
            fail_at(ctx, line, col, "values must not contain NUL characters");
            mc__cfg_node_free(n);
            return NULL;
        }
        if (!bson_utf8_validate(n->text, n->len, false)) {
            fail_at(ctx, line, col, "value is not valid UTF-8 after variable substitution");
            mc__cfg_node_free(n);
            return NULL;
        }
    }
    if (n->len > MC__CFG_MAX_TOTAL - ctx->total_bytes) {
        fail_at(ctx, line, col, "configuration is larger than %u bytes after variable substitution",
                MC__CFG_MAX_TOTAL);
        mc__cfg_node_free(n);
        return NULL;
    }
    ctx->total_bytes += n->len;
    return n;
}

int mc__cfg_parse(const char *yaml, size_t len, const char *name, mc__cfg_node_t **root,
                  mc_error_t *err)
{
    yaml_ctx_t ctx = {name, yaml, len, err, 0, 0};
    yaml_parser_t parser;
    yaml_event_t ev;
    mc__cfg_node_t *stack[MC__CFG_MAX_DEPTH + 1];
    size_t depth = 0;
    mc__cfg_node_t *top = NULL;
    int documents = 0;
    int rc = MC_ECONFIG;
    bool done = false;

    *root = NULL;
    if (len > MC__CFG_MAX_BYTES) {
        return fail_at(&ctx, 1, 1, "configuration is larger than the %u MiB limit",
                       MC__CFG_MAX_BYTES / (1024u * 1024u));
    }
    if (!yaml_parser_initialize(&parser)) {
        return fail_at(&ctx, 1, 1, "out of memory");
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);

    while (!done) {
        if (!yaml_parser_parse(&parser, &ev)) {
            syntax_error(&ctx, &parser);
            goto out;
        }
        int line = (int)ev.start_mark.line + 1, col = (int)ev.start_mark.column + 1;
        mc__cfg_node_t *parent = depth ? stack[depth - 1] : NULL;
        bool is_key = parent && parent->kind == MC__CFG_MAP && parent->n_items % 2 == 0;
        mc__cfg_node_t *node = NULL;

        switch (ev.type) {
        case YAML_STREAM_END_EVENT: done = true; break;
        case YAML_DOCUMENT_START_EVENT:
            if (++documents > 1) {
                fail_at(&ctx, line, col, "only one YAML document is allowed");
                yaml_event_delete(&ev);
                goto out;
            }
            break;
        case YAML_ALIAS_EVENT:
            fail_at(&ctx, line, col,
                    "YAML aliases (*%.60s) are not supported: write the value out in full",
                    (const char *)ev.data.alias.anchor);
            yaml_event_delete(&ev);
            goto out;
        case YAML_SCALAR_EVENT:
            node = scalar_node(&ctx, &ev, is_key);
            if (!node) {
                yaml_event_delete(&ev);
                goto out;
            }
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT: {
            bool is_map = ev.type == YAML_MAPPING_START_EVENT;
            const yaml_char_t *tag =
                is_map ? ev.data.mapping_start.tag : ev.data.sequence_start.tag;
            if (is_key) {
                fail_at(&ctx, line, col, "mapping keys must be scalars");
                yaml_event_delete(&ev);
                goto out;
            }
            if (tag && !tag_is(tag, is_map ? "tag:yaml.org,2002:map" : "tag:yaml.org,2002:seq")) {
                fail_at(&ctx, line, col, "unsupported YAML tag '%.80s'", (const char *)tag);
                yaml_event_delete(&ev);
                goto out;
            }
            if (depth >= MC__CFG_MAX_DEPTH) {
                fail_at(&ctx, line, col, "nesting is deeper than %d levels", MC__CFG_MAX_DEPTH);
                yaml_event_delete(&ev);
                goto out;
            }
            node = node_new(&ctx, is_map ? MC__CFG_MAP : MC__CFG_SEQ, ev.start_mark);
            if (!node) {
                yaml_event_delete(&ev);
                goto out;
            }
            break;
        }
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            if (ev.type == YAML_MAPPING_END_EVENT && check_duplicate_keys(&ctx, parent) != 0) {
                yaml_event_delete(&ev);
                goto out;
            }
            depth--;
            break;
        default: break;
        }
        yaml_event_delete(&ev);

        if (node) {
            if (parent) {
                if (node_append(&ctx, parent, node) != 0) {
                    mc__cfg_node_free(node);
                    goto out;
                }
            } else {
                top = node;
            }
            if (node->kind != MC__CFG_SCALAR) {
                stack[depth++] = node;
            }
        }
    }
    if (!top) {
        fail_at(&ctx, 1, 1, "the configuration is empty");
        goto out;
    }
    *root = top;
    top = NULL;
    rc = 0;
out:
    mc__cfg_node_free(top);
    yaml_parser_delete(&parser);
    return rc;
}
