/*
 * summary.c: `summary` templates (summary.h): compiled once, rendered once per event and
 * view on the watcher thread that builds the event.
 *
 * Thread: compilation on the config loader's thread (to check) and on the thread that routes
 * (a stream's watcher, or a catch-up thread: to use); rendering there. A compiled summary is
 * immutable.
 *
 * Invariants: a template's parts point into its own copy of the text; rendering never writes
 * more than MC__SUMMARY_MAX bytes (plus the NUL) and always leaves valid UTF-8; the cost of one
 * rendering is bounded by the template (at most MC__SUMMARY_MAX_FIELDS lookups, each a walk of
 * the change's keys) plus the `when` queries (compiled by filter.c).
 */
#include "summary.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json_writer.h"
#include "mongocast/filter.h"

#define ELLIPSIS "\xE2\x80\xA6" /* U+2026, what a cut line ends with */

typedef struct part {
    bool field;    /* a {path} placeholder, else literal text */
    const char *s; /* into the template's copy; NUL-terminated for fields */
    size_t len;
} part_t;

typedef struct alt {
    mc_filter_t *when; /* NULL: always */
    char *text;        /* owned copy; field paths are cut out of it in place */
    part_t *parts;
    size_t n_parts;
} alt_t;

struct mc__summary {
    alt_t *alts;
    size_t n_alts;
};

/* ---- Templates ---------------------------------------------------------------------------- */

/* A placeholder's path: non-empty segments, none starting with '$' except the DBRef fields
 * $id, $ref and $db (the same rule as recipient paths). */
static bool valid_path(const char *p, size_t n)
{
    size_t seg = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || p[i] == '.') {
            size_t len = i - seg;
            if (len == 0) {
                return false;
            }
            if (p[seg] == '$' && !((len == 3 && (memcmp(p + seg, "$id", 3) == 0 ||
                                                 memcmp(p + seg, "$db", 3) == 0)) ||
                                   (len == 4 && memcmp(p + seg, "$ref", 4) == 0))) {
                return false;
            }
            seg = i + 1;
        } else if (p[i] == '{' || p[i] == '}' || (unsigned char)p[i] < 0x20) {
            return false;
        }
    }
    return true;
}

/* Splits `text` into parts (when `out` is not NULL, writing field paths' NULs into `text`).
 * Returns the number of parts, or -1 with a message. */
static long parse(char *text, part_t *out, char *msg, size_t cap)
{
    size_t n = strlen(text);
    if (n > MC__SUMMARY_TEMPLATE_MAX) {
        snprintf(msg, cap, "a summary template may be at most %d bytes long",
                 MC__SUMMARY_TEMPLATE_MAX);
        return -1;
    }
    long parts = 0;
    size_t fields = 0;
    size_t lit_start = 0;
    size_t i = 0;
#define FLUSH_LITERAL(end)                                                                         \
    do {                                                                                           \
        if ((end) > lit_start) {                                                                   \
            if (out) {                                                                             \
                out[parts] = (part_t){false, text + lit_start, (end)-lit_start};                   \
            }                                                                                      \
            parts++;                                                                               \
        }                                                                                          \
    } while (0)
    while (i < n) {
        char c = text[i];
        if ((c == '{' || c == '}') && i + 1 < n && text[i + 1] == c) {
            /* {{ and }}: one literal brace; the literal so far ends after the first one. */
            FLUSH_LITERAL(i + 1);
            i += 2;
            lit_start = i;
            continue;
        }
        if (c == '}') {
            snprintf(msg, cap, "'}' at character %zu closes nothing (write }} for a literal brace)",
                     i + 1);
            return -1;
        }
        if (c != '{') {
            i++;
            continue;
        }
        const char *close = memchr(text + i + 1, '}', n - i - 1);
        if (!close) {
            snprintf(msg, cap, "unclosed '{' at character %zu (write {{ for a literal brace)",
                     i + 1);
            return -1;
        }
        size_t plen = (size_t)(close - (text + i + 1));
        if (!valid_path(text + i + 1, plen)) {
            snprintf(msg, cap,
                     "'{%.*s}' at character %zu is not a field path such as {fullDocument.name}",
                     (int)(plen > 60 ? 60 : plen), text + i + 1, i + 1);
            return -1;
        }
        if (++fields > MC__SUMMARY_MAX_FIELDS) {
            snprintf(msg, cap, "a summary template may hold at most %d fields",
                     MC__SUMMARY_MAX_FIELDS);
            return -1;
        }
        FLUSH_LITERAL(i);
        if (out) {
            out[parts] = (part_t){true, text + i + 1, plen};
        }
        parts++;
        i += plen + 2;
        lit_start = i;
    }
    FLUSH_LITERAL(n);
#undef FLUSH_LITERAL
    if (out) {
        /* Field paths become C strings for bson_iter_find_descendant(): the closing brace is
         * overwritten, and no literal part reaches into it. */
        for (long k = 0; k < parts; k++) {
            if (out[k].field) {
                ((char *)out[k].s)[out[k].len] = '\0';
            }
        }
    }
    return parts;
}

bool mc__summary_template_check(const char *text, char *msg, size_t cap)
{
    char *copy = bson_strdup(text ? text : "");
    long n = parse(copy, NULL, msg, cap);
    bson_free(copy);
    return n >= 0;
}

static void alt_cleanup(alt_t *a)
{
    mc_filter_destroy(a->when);
    bson_free(a->text);
    free(a->parts);
}

void mc__summary_destroy(mc__summary_t *s)
{
    if (!s) {
        return;
    }
    for (size_t i = 0; i < s->n_alts; i++) {
        alt_cleanup(&s->alts[i]);
    }
    free(s->alts);
    free(s);
}

mc__summary_t *mc__summary_new(const mc_summary_config_t *cfg, mc_error_t *err)
{
    if (!cfg || cfg->n_rules == 0) {
        return NULL;
    }
    mc__summary_t *s = calloc(1, sizeof(*s));
    if (!s || !(s->alts = calloc(cfg->n_rules, sizeof(*s->alts)))) {
        free(s);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < cfg->n_rules; i++) {
        const mc_summary_rule_t *r = &cfg->rules[i];
        alt_t *a = &s->alts[s->n_alts++];
        char msg[200];
        a->text = bson_strdup(r->text ? r->text : "");
        long n = parse(a->text, NULL, msg, sizeof(msg));
        if (n < 0) {
            mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "summary: %s", msg);
            goto fail;
        }
        a->parts = calloc(n ? (size_t)n : 1, sizeof(*a->parts));
        if (!a->parts) {
            mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
            goto fail;
        }
        a->n_parts = (size_t)parse(a->text, a->parts, msg, sizeof(msg));
        if (r->when) {
            mc_error_t ferr = {0};
            a->when = mc_filter_new(r->when, NULL, &ferr);
            if (!a->when) {
                mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "summary when: %s",
                             ferr.message);
                goto fail;
            }
        }
    }
    return s;
fail:
    mc__summary_destroy(s);
    return NULL;
}

/* ---- Rendering ------------------------------------------------------------------------------ */

typedef struct out {
    char *p;
    size_t len;
    size_t cap; /* usable bytes, the NUL excluded */
    bool cut;
} out_t;

/* Appends valid UTF-8 (invalid sequences become U+FFFD, control characters a space: it is
 * one line of text); once the line is full it ends with an ellipsis at a character boundary
 * and takes nothing more. */
static void put(out_t *o, const char *s, size_t n)
{
    static const char replacement[] = "\xEF\xBF\xBD";
    size_t i = 0;
    while (i < n && !o->cut) {
        size_t k = mc__json_utf8_char_len((const uint8_t *)s + i, n - i);
        unsigned char first = (unsigned char)s[i];
        bool control = k == 1 && (first < 0x20 || first == 0x7f);
        const char *c = control ? " " : k ? s + i : replacement;
        size_t clen = control ? 1 : k ? k : 3;
        if (o->len + clen > o->cap - (sizeof(ELLIPSIS) - 1)) {
            /* Room for the ellipsis is always kept: the cut line still ends with it. */
            memcpy(o->p + o->len, ELLIPSIS, sizeof(ELLIPSIS) - 1);
            o->len += sizeof(ELLIPSIS) - 1;
            o->cut = true;
            return;
        }
        memcpy(o->p + o->len, c, clen);
        o->len += clen;
        i += k ? k : 1;
    }
}

static void put_double(out_t *o, double d)
{
    char tmp[40];
    if (isnan(d)) {
        put(o, "NaN", 3);
        return;
    }
    if (isinf(d)) {
        put(o, d > 0 ? "Infinity" : "-Infinity", d > 0 ? 8 : 9);
        return;
    }
    /* The shortest spelling that reads back as the same double (5.0 prints as 5). */
    int n = 0;
    for (int prec = 1; prec <= 17; prec++) {
        n = snprintf(tmp, sizeof(tmp), "%.*g", prec, d);
        if (strtod(tmp, NULL) == d) {
            break;
        }
    }
    put(o, tmp, (size_t)n);
}

static void put_date(out_t *o, int64_t ms)
{
    int64_t secs = ms / 1000;
    int64_t rem = ms % 1000;
    if (rem < 0) {
        rem += 1000;
        secs -= 1;
    }
    time_t t = (time_t)secs;
    struct tm tm;
    char tmp[64];
    if (!gmtime_r(&t, &tm)) {
        int n = snprintf(tmp, sizeof(tmp), "%lld", (long long)ms);
        put(o, tmp, (size_t)n);
        return;
    }
    size_t n = strftime(tmp, sizeof(tmp), "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(tmp + n, sizeof(tmp) - n, rem ? ".%03dZ" : "Z", (int)rem);
    put(o, tmp, n);
}

/* Any other value as compact relaxed Extended JSON: rendered as {"":v} and cut out. */
static void put_json(out_t *o, const bson_iter_t *it)
{
    bson_t doc;
    bson_init(&doc);
    if (bson_append_iter(&doc, "", 0, it)) {
        mc__json_buf_t b;
        mc__json_buf_init(&b, 0, 4 * MC__SUMMARY_MAX);
        mc__json_write_document(&b, &doc, MC__JSON_RELAXED_COMPACT);
        if (b.err == MC__JSON_OK && b.len > 5) {
            put(o, b.data + 4, b.len - 5); /* {"": ... } */
        } else if (b.err == MC__JSON_ETOOBIG) {
            put(o, ELLIPSIS, sizeof(ELLIPSIS) - 1);
        }
        mc__json_buf_destroy(&b);
    }
    bson_destroy(&doc);
}

static void put_value(out_t *o, const bson_iter_t *it)
{
    char tmp[64];
    int n;
    switch (bson_iter_type(it)) {
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *s = bson_iter_utf8(it, &len);
        put(o, s, len);
        return;
    }
    case BSON_TYPE_SYMBOL: {
        uint32_t len;
        const char *s = bson_iter_symbol(it, &len);
        put(o, s, len);
        return;
    }
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
        n = snprintf(tmp, sizeof(tmp), "%lld", (long long)bson_iter_as_int64(it));
        put(o, tmp, (size_t)n);
        return;
    case BSON_TYPE_DOUBLE: put_double(o, bson_iter_double(it)); return;
    case BSON_TYPE_DECIMAL128: {
        bson_decimal128_t dec;
        char str[BSON_DECIMAL128_STRING];
        bson_iter_decimal128(it, &dec);
        bson_decimal128_to_string(&dec, str);
        put(o, str, strlen(str));
        return;
    }
    case BSON_TYPE_BOOL:
        if (bson_iter_bool(it)) {
            put(o, "true", 4);
        } else {
            put(o, "false", 5);
        }
        return;
    case BSON_TYPE_NULL:
    case BSON_TYPE_UNDEFINED: put(o, "null", 4); return;
    case BSON_TYPE_OID: {
        char hex[25];
        bson_oid_to_string(bson_iter_oid(it), hex);
        put(o, hex, 24);
        return;
    }
    case BSON_TYPE_DATE_TIME: put_date(o, bson_iter_date_time(it)); return;
    default: put_json(o, it); return;
    }
}

static void render_alt(const alt_t *a, const bson_t *change, out_t *o)
{
    for (size_t i = 0; i < a->n_parts && !o->cut; i++) {
        const part_t *p = &a->parts[i];
        if (!p->field) {
            put(o, p->s, p->len);
            continue;
        }
        bson_iter_t it, found;
        if (bson_iter_init(&it, change) && bson_iter_find_descendant(&it, p->s, &found)) {
            put_value(o, &found);
        }
    }
}

int mc__summary_render(const mc__summary_t *s, const bson_t *change, char *buf, size_t cap)
{
    if (!s || !change || cap < 2) {
        return -1;
    }
    for (size_t i = 0; i < s->n_alts; i++) {
        const alt_t *a = &s->alts[i];
        if (a->when && !mc_filter_match(a->when, change)) {
            continue;
        }
        out_t o = {buf, 0, (cap - 1 < MC__SUMMARY_MAX ? cap - 1 : MC__SUMMARY_MAX), false};
        render_alt(a, change, &o);
        buf[o.len] = '\0';
        return (int)o.len;
    }
    return -1;
}
