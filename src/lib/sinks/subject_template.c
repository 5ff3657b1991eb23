/*
 * subject_template.c: compiling and rendering channel, key and subject templates
 * (subject_template.h has the rules and the escaping).
 *
 * Pure functions; a compiled template is immutable, so any thread may render it.
 * Invariants: the template is stored as tokens (the text between separators), each a list of
 * segments (literal text or a placeholder); every check that makes rendering safe is done
 * once here at compile time, so rendering only escapes values, counts bytes and never fails
 * for any other reason than length.
 */
#include "sinks/subject_template.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef enum seg_kind {
    SEG_LITERAL = 0,
    SEG_STREAM,
    SEG_RECIPIENT,
    SEG_DB,
    SEG_COLL,
    SEG_TYPE,
} seg_kind_t;

static const struct {
    const char *name;
    seg_kind_t kind;
} placeholders[] = {
    {"stream", SEG_STREAM}, {"recipient", SEG_RECIPIENT}, {"db", SEG_DB},
    {"coll", SEG_COLL},     {"type", SEG_TYPE},
};

typedef struct segment {
    seg_kind_t kind;
    size_t off, len; /* SEG_LITERAL: bytes of the template text */
} segment_t;

typedef struct token {
    size_t first, count; /* its segments */
    bool only_recipient; /* every segment is {recipient}: left out when they are empty */
} token_t;

struct mc__subject_template {
    mc__subject_kind_t kind;
    char sep;
    char *text;
    segment_t *segs;
    size_t n_segs;
    token_t *tokens;
    size_t n_tokens;
    bool uses_recipient;
};

/* The bytes escaping keeps as they are. '%' is not among them: it starts every escape, and a
 * lone '%' stands for an empty value, so every byte of a rendered value decodes one way. */
static bool raw_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
}

size_t mc__subject_escape(const char *in, size_t len, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (raw_byte(c)) {
            out[n++] = (char)c;
        } else {
            out[n++] = '%';
            out[n++] = hex[c >> 4];
            out[n++] = hex[c & 15];
        }
    }
    return n;
}

bool mc__nats_subject_valid(const char *s, size_t len)
{
    if (len == 0) {
        return false;
    }
    size_t tok_start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            if (i == tok_start) {
                return false; /* empty token: leading, trailing or doubled '.' */
            }
            tok_start = i + 1;
            continue;
        }
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c == 0x7F || c == '*' || c == '>') {
            return false;
        }
    }
    return true;
}

static int compile_error(mc_error_t *err, const char *text, size_t col, const char *what)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "template \"%.200s\", column %zu: %s", text, col + 1, what);
}

void mc__subject_template_destroy(mc__subject_template_t *t)
{
    if (t) {
        free(t->text);
        free(t->segs);
        free(t->tokens);
        free(t);
    }
}

static bool literal_byte_ok(mc__subject_kind_t kind, unsigned char c)
{
    if (c < 0x20 || c == 0x7F || c == '%') {
        return false;
    }
    if (kind == MC__SUBJECT_NATS) {
        return c != ' ' && c != '*' && c != '>';
    }
    return true;
}

/* Reads the placeholder whose '{' is at text[i]; sets *kind and returns the index of its '}'. */
static int parse_placeholder(const char *text, size_t i, seg_kind_t *kind, size_t *end,
                             mc_error_t *err)
{
    const char *close = strchr(text + i + 1, '}');
    const char *open = strchr(text + i + 1, '{');
    if (!close || (open && open < close)) {
        return compile_error(err, text, i, "'{' without a matching '}'");
    }
    size_t name_len = (size_t)(close - (text + i + 1));
    for (size_t k = 0; k < sizeof(placeholders) / sizeof(placeholders[0]); k++) {
        if (strlen(placeholders[k].name) == name_len &&
            memcmp(placeholders[k].name, text + i + 1, name_len) == 0) {
            *kind = placeholders[k].kind;
            *end = (size_t)(close - text);
            return 0;
        }
    }
    return compile_error(err, text, i,
                         "unknown placeholder (known: {stream}, {recipient}, {db}, {coll}, "
                         "{type})");
}

/* Checks one token's segments: no two placeholders without a byte between them that a
 * rendered value never contains. */
static int check_token(const mc__subject_template_t *t, const token_t *tok, size_t col,
                       mc_error_t *err)
{
    bool after_placeholder = false;
    for (size_t k = tok->first; k < tok->first + tok->count; k++) {
        const segment_t *s = &t->segs[k];
        if (s->kind != SEG_LITERAL) {
            if (after_placeholder) {
                return compile_error(err, t->text, col,
                                     "two placeholders need a separator between them (a byte "
                                     "other than letters, digits, '_' and '-', e.g. ':')");
            }
            after_placeholder = true;
            continue;
        }
        for (size_t b = 0; b < s->len; b++) {
            if (!raw_byte((unsigned char)t->text[s->off + b])) {
                after_placeholder = false;
            }
        }
    }
    return 0;
}

mc__subject_template_t *mc__subject_template_new(const char *text, mc__subject_kind_t kind,
                                                 mc_error_t *err)
{
    if (!text || !*text) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "template is empty");
        return NULL;
    }
    size_t n = strlen(text);
    if (n > MC__SUBJECT_MAX) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "template is longer than %d bytes", MC__SUBJECT_MAX);
        return NULL;
    }
    mc__subject_template_t *t = calloc(1, sizeof(*t));
    if (!t) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    t->kind = kind;
    t->sep = kind == MC__SUBJECT_NATS ? '.' : ':';
    t->text = strdup(text);
    /* At most one segment per byte and one token per byte, plus one. */
    t->segs = calloc(n + 1, sizeof(*t->segs));
    t->tokens = calloc(n + 1, sizeof(*t->tokens));
    if (!t->text || !t->segs || !t->tokens) {
        mc__subject_template_destroy(t);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }

    token_t *tok = &t->tokens[0];
    size_t tok_col = 0;
    t->n_tokens = 1;
    for (size_t i = 0; i <= n; i++) {
        char c = text[i];
        if (i == n || c == t->sep) {
            tok->only_recipient = tok->count > 0;
            for (size_t k = tok->first; k < tok->first + tok->count; k++) {
                tok->only_recipient = tok->only_recipient && t->segs[k].kind == SEG_RECIPIENT;
            }
            if (check_token(t, tok, tok_col, err) != 0) {
                goto fail;
            }
            if (kind == MC__SUBJECT_NATS && tok->count == 0) {
                compile_error(err, text, i,
                              "empty subject token (leading, trailing or doubled '.')");
                goto fail;
            }
            if (i == n) {
                break;
            }
            tok = &t->tokens[t->n_tokens++];
            tok->first = t->n_segs;
            tok_col = i + 1;
            continue;
        }
        segment_t *s = &t->segs[t->n_segs];
        if (c == '{') {
            size_t end = 0;
            if (parse_placeholder(text, i, &s->kind, &end, err) != 0) {
                goto fail;
            }
            t->uses_recipient = t->uses_recipient || s->kind == SEG_RECIPIENT;
            t->n_segs++;
            tok->count++;
            i = end;
            continue;
        }
        if (c == '}') {
            compile_error(err, text, i, "'}' without a matching '{'");
            goto fail;
        }
        if (!literal_byte_ok(kind, (unsigned char)c)) {
            compile_error(err, text, i,
                          kind == MC__SUBJECT_NATS
                              ? "not allowed in a subject template (control bytes, spaces, "
                                "'*', '>' and '%' are refused)"
                              : "not allowed in a template (control bytes and '%' are refused)");
            goto fail;
        }
        /* Extend the current literal segment, or start one. */
        if (tok->count > 0 && t->segs[t->n_segs - 1].kind == SEG_LITERAL &&
            t->segs[t->n_segs - 1].off + t->segs[t->n_segs - 1].len == i) {
            t->segs[t->n_segs - 1].len++;
        } else {
            s->kind = SEG_LITERAL;
            s->off = i;
            s->len = 1;
            t->n_segs++;
            tok->count++;
        }
    }

    /* Only tokens made of {recipient} can disappear; if all of them do, nothing is left. */
    bool keeps_something = false;
    for (size_t k = 0; k < t->n_tokens; k++) {
        keeps_something = keeps_something || !t->tokens[k].only_recipient;
    }
    if (!keeps_something) {
        compile_error(err, text, 0, "renders an empty name for events without a recipient");
        goto fail;
    }
    return t;

fail:
    mc__subject_template_destroy(t);
    return NULL;
}

bool mc__subject_template_uses_recipient(const mc__subject_template_t *t)
{
    return t && t->uses_recipient;
}

static const mc__bytes_t *value_of(const mc__subject_values_t *v, seg_kind_t kind)
{
    switch (kind) {
    case SEG_STREAM: return &v->stream;
    case SEG_RECIPIENT: return &v->recipient;
    case SEG_DB: return &v->db;
    case SEG_COLL: return &v->coll;
    case SEG_TYPE: return &v->type;
    case SEG_LITERAL: break;
    }
    return NULL;
}

static bool empty(const mc__bytes_t *b)
{
    return !b || !b->p || b->len == 0;
}

int mc__subject_template_render(const mc__subject_template_t *t, const mc__subject_values_t *v,
                                char *out, size_t cap, size_t *len, mc_error_t *err)
{
    size_t limit = cap > 0 ? cap - 1 : 0;
    if (limit > MC__SUBJECT_MAX) {
        limit = MC__SUBJECT_MAX;
    }
    size_t n = 0;
    bool first = true;
    for (size_t k = 0; k < t->n_tokens; k++) {
        const token_t *tok = &t->tokens[k];
        if (tok->only_recipient && empty(&v->recipient)) {
            continue;
        }
        if (!first) {
            if (n + 1 > limit) {
                goto too_long;
            }
            out[n++] = t->sep;
        }
        first = false;
        for (size_t s = tok->first; s < tok->first + tok->count; s++) {
            const segment_t *seg = &t->segs[s];
            if (seg->kind == SEG_LITERAL) {
                if (n + seg->len > limit) {
                    goto too_long;
                }
                memcpy(out + n, t->text + seg->off, seg->len);
                n += seg->len;
                continue;
            }
            const mc__bytes_t *val = value_of(v, seg->kind);
            if (empty(val)) {
                if (n + 1 > limit) {
                    goto too_long;
                }
                out[n++] = '%';
                continue;
            }
            /* Worst case 3 bytes per byte; checked before writing, so out never overflows. */
            if (val->len > (limit - n) / 3) {
                size_t need = 0;
                for (size_t b = 0; b < val->len && n + need <= limit; b++) {
                    need += raw_byte((unsigned char)val->p[b]) ? 1 : 3;
                }
                if (n + need > limit) {
                    goto too_long;
                }
            }
            n += mc__subject_escape(val->p, val->len, out + n);
        }
    }
    if (cap > 0) {
        out[n] = '\0';
    }
    if (len) {
        *len = n;
    }
    return 0;

too_long:
    if (cap > 0) {
        out[0] = '\0';
    }
    return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                        "rendered name longer than %zu bytes", limit);
}

static mc__bytes_t str_value(const char *s)
{
    mc__bytes_t b = {s, s ? strlen(s) : 0};
    return b;
}

/* A string recipient is its own bytes (`alice`, not the JSON text `"alice"`; taken from its
 * canonical identity, mongocast/identity.h, so escapes are real bytes); other identities are
 * their JSON text (`5`, `{"$oid":"..."}`). So the string "5" and the number 5 share a name. */
static mc__bytes_t recipient_value(const mc_event_t *ev)
{
    size_t len = 0;
    const uint8_t *id = mc_event_recipient_identity(ev, &len);
    if (id && len >= 1 && id[0] == 's') {
        mc__bytes_t b = {(const char *)id + 1, len - 1};
        return b;
    }
    return str_value(mc_event_recipient(ev));
}

void mc__subject_values_from_event(mc__subject_values_t *v, const mc_event_t *ev)
{
    const char *type = mc_event_operation_type(ev);
    if (!type || mc_event_kind(ev) != MC_EVENT_CHANGE) {
        type = mc_event_kind_name(mc_event_kind(ev));
    }
    v->stream = str_value(mc_event_stream(ev));
    v->recipient = recipient_value(ev);
    v->db = str_value(mc_event_db(ev));
    v->coll = str_value(mc_event_coll(ev));
    v->type = str_value(type);
}
