/*
 * config.c: mongocast configuration loader (docs/config.md). Reads a YAML file
 * or buffer through config_yaml.c, then types and validates the node tree against the option
 * tables below, which are the single source of truth for every key's type, default, bounds
 * and whether it is required.
 *
 * Runs on whichever thread calls mc_config_load_*; no global state, so concurrent loads are
 * safe. Invariants: a returned mc_config_t is complete (defaults applied, cross-field rules
 * checked, every stream has a non-NULL pipeline, every sink has non-NULL options) and owns
 * all of its memory; on any failure everything built so far is freed through
 * mc_config_destroy, so a partially filled config must always be destroyable.
 */
#include "mongocast/config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config_internal.h"
#include "mongocast/engine.h"
#include "sinks/nats_client.h"
#include "mongocast/filter.h"
#include "summary.h"

#define DEFAULT_MONGODB_URI "mongodb://127.0.0.1:27017/?replicaSet=rs0"
#define MAX_TABLE_OPTS 20
#define MAX_BY_COLLECTION 1000
#define MAX_STRING 65536

/* Enum options are written through an int pointer. */
_Static_assert(sizeof(mc_full_document_t) == sizeof(int), "enum size");
_Static_assert(sizeof(mc_before_change_t) == sizeof(int), "enum size");
_Static_assert(sizeof(mc_on_history_lost_t) == sizeof(int), "enum size");
_Static_assert(sizeof(mc_on_oversize_t) == sizeof(int), "enum size");
_Static_assert(sizeof(mc_checkpoint_store_t) == sizeof(int), "enum size");
_Static_assert(sizeof(mc_sink_initial_t) == sizeof(int), "enum size");

typedef struct cfg_ctx {
    const char *name;
    mc_error_t *err;
    mc_config_t *config;
} cfg_ctx_t;

typedef enum opt_type {
    OPT_STRING,      /* char *; bounds are length bounds */
    OPT_BOOL,        /* bool */
    OPT_UINT32,      /* uint32_t */
    OPT_INT32,       /* int32_t */
    OPT_ENUM,        /* int, the index in `choices` */
    OPT_ENUM_STRING, /* char *, one of `choices` */
    OPT_STRING_LIST, /* char ** at offset, size_t count at count_offset */
    OPT_SECTION,     /* nested mapping whose options share this table's base */
    OPT_CUSTOM,      /* parsed by `parse` */
} opt_type_t;

typedef struct opt opt_t;
typedef struct opt_table opt_table_t;

typedef int (*opt_parse_fn)(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *value,
                            void *base, const char *where);
typedef int (*opt_validate_fn)(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *value);
typedef int (*table_check_fn)(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                              const mc__cfg_node_t *const *found);
typedef int (*table_other_fn)(cfg_ctx_t *ctx, const mc__cfg_node_t *key,
                              const mc__cfg_node_t *value, void *base);

struct opt {
    const char *name;
    opt_type_t type;
    size_t offset;
    size_t count_offset;
    bool required;
    const char *def_str;
    int64_t def_num;
    int64_t min;
    int64_t max;
    const char *const *choices; /* NULL-terminated */
    const opt_table_t *section; /* OPT_SECTION, or the item table of an OPT_CUSTOM */
    opt_parse_fn parse;
    opt_validate_fn validate; /* extra check of a string value */
    const char *doc;
};

struct opt_table {
    const opt_t *opts;
    size_t n_opts;
    const char *item_suffix; /* how docs name one item of this table: ".*", "[]" or "" */
    table_check_fn check;    /* cross-field rules, run once every option is parsed */
    table_other_fn other;    /* keys not in the table; NULL: they are errors */
};

#define N_OPTS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- errors ----------------------------------------------------------------------------- */

static int fail(cfg_ctx_t *ctx, const mc__cfg_node_t *at, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int fail(cfg_ctx_t *ctx, const mc__cfg_node_t *at, const char *fmt, ...)
{
    char msg[420];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return mc_error_set(ctx->err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "%s:%d:%d: %s",
                        ctx->name, at ? at->line : 1, at ? at->col : 1, msg);
}

static int fail_nomem(cfg_ctx_t *ctx)
{
    return mc_error_set(ctx->err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "%s: out of memory",
                        ctx->name);
}

/* What a node looks like, for "expected X, got Y". */
static const char *describe(const mc__cfg_node_t *n, char *buf, size_t size)
{
    if (n->kind == MC__CFG_MAP) {
        return "a mapping";
    }
    if (n->kind == MC__CFG_SEQ) {
        return "a list";
    }
    if (n->len == 0) {
        return "an empty value";
    }
    if (n->len > 60) {
        snprintf(buf, size, "'%.57s...'", n->text);
    } else {
        snprintf(buf, size, "'%s'", n->text);
    }
    return buf;
}

static int fail_type(cfg_ctx_t *ctx, const mc__cfg_node_t *n, const char *expected)
{
    char buf[80];
    /* `public: "true"` is the classic surprise: say why a boolean-looking value is not one. */
    bool quoted = n->kind == MC__CFG_SCALAR && !n->plain && n->len > 0 &&
                  (!strcmp(expected, "a boolean") || !strcmp(expected, "an integer"));
    return fail(ctx, n, "expected %s, got %s%s", expected, describe(n, buf, sizeof(buf)),
                quoted ? " (a quoted value is always a string)" : "");
}

static bool is_null(const mc__cfg_node_t *n)
{
    mc__cfg_scalar_t s;
    if (n->kind != MC__CFG_SCALAR) {
        return false;
    }
    mc__cfg_scalar_type(n, &s);
    return s.type == MC__CFG_NULL;
}

/* ---- generic YAML -> BSON (pipelines, sink options) --------------------------------------- */

static int append_node(cfg_ctx_t *ctx, bson_t *doc, const char *key, size_t key_len,
                       const mc__cfg_node_t *n)
{
    bool ok = true;
    int rc = 0;

    if (n->kind == MC__CFG_MAP || n->kind == MC__CFG_SEQ) {
        bson_t child;
        bool is_map = n->kind == MC__CFG_MAP;
        ok = is_map ? bson_append_document_begin(doc, key, (int)key_len, &child)
                    : bson_append_array_begin(doc, key, (int)key_len, &child);
        if (!ok) {
            return fail(ctx, n, "value is too large");
        }
        if (is_map) {
            for (size_t i = 0; rc == 0 && i + 1 < n->n_items; i += 2) {
                rc = append_node(ctx, &child, n->items[i]->text, n->items[i]->len, n->items[i + 1]);
            }
        } else {
            for (size_t i = 0; rc == 0 && i < n->n_items; i++) {
                char idx[16];
                const char *k;
                size_t kl = bson_uint32_to_string((uint32_t)i, &k, idx, sizeof(idx));
                rc = append_node(ctx, &child, k, kl, n->items[i]);
            }
        }
        /* Always close the child so the parent is consistent even when we give up. */
        ok = is_map ? bson_append_document_end(doc, &child) : bson_append_array_end(doc, &child);
        if (rc == 0 && !ok) {
            rc = fail(ctx, n, "value is too large");
        }
        return rc;
    }

    mc__cfg_scalar_t s;
    mc__cfg_scalar_type(n, &s);
    switch (s.type) {
    case MC__CFG_NULL: ok = bson_append_null(doc, key, (int)key_len); break;
    case MC__CFG_BOOL: ok = bson_append_bool(doc, key, (int)key_len, s.b); break;
    case MC__CFG_INT:
        if (s.overflow) {
            return fail(ctx, n, "integer %.40s is out of range", n->text);
        }
        if (s.i >= INT32_MIN && s.i <= INT32_MAX) {
            ok = bson_append_int32(doc, key, (int)key_len, (int32_t)s.i);
        } else {
            ok = bson_append_int64(doc, key, (int)key_len, s.i);
        }
        break;
    case MC__CFG_DOUBLE: ok = bson_append_double(doc, key, (int)key_len, s.d); break;
    case MC__CFG_STRING: ok = bson_append_utf8(doc, key, (int)key_len, n->text, (int)n->len); break;
    }
    return ok ? 0 : fail(ctx, n, "value is too large");
}

/* ---- value validators ------------------------------------------------------------------- */

static int validate_db_name(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    if (v->len > 63 || strpbrk(v->text, "/\\. \"$")) {
        return fail(ctx, v,
                    "%s '%.80s' is not a valid database name (at most 63 characters, "
                    "none of / \\ . space \" $)",
                    opt->name, v->text);
    }
    return 0;
}

static int validate_collection_name(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    if (strchr(v->text, '$') || !strncmp(v->text, "system.", 7)) {
        return fail(ctx, v, "%s '%.80s' is not a valid collection name (no '$', no 'system.')",
                    opt->name, v->text);
    }
    return 0;
}

/* A segment that starts with '$' is allowed only when it is a DBRef field: $id, $ref, $db
 * (owner.$id reaches the ObjectId of a DBRef, as MongoDB's own field paths allow). */
static bool dbref_segment(const char *p)
{
    size_t n = strcspn(p, ".");
    return (n == 3 && (!strncmp(p, "$id", 3) || !strncmp(p, "$db", 3))) ||
           (n == 4 && !strncmp(p, "$ref", 4));
}

/* A dotted path into a document: non-empty segments, none starting with '$' except the DBRef
 * fields. */
static int validate_field_path(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    const char *p = v->text;
    bool segment_start = true;
    for (; *p; p++) {
        if (*p == '.') {
            if (segment_start) {
                break;
            }
            segment_start = true;
        } else {
            if (segment_start && *p == '$' && !dbref_segment(p)) {
                break;
            }
            segment_start = false;
        }
    }
    if (*p || segment_start) {
        return fail(ctx, v,
                    "%s must be a dotted field path such as fullDocument.owner_id, got "
                    "'%.80s'",
                    opt->name, v->text);
    }
    return 0;
}

static int validate_uri(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    if (strncmp(v->text, "mongodb://", 10) && strncmp(v->text, "mongodb+srv://", 14)) {
        return fail(ctx, v, "%s must start with mongodb:// or mongodb+srv://", opt->name);
    }
    return 0;
}

static int validate_listen(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    const char *colon = strrchr(v->text, ':');
    bool ok = colon && colon != v->text;
    if (ok) {
        const char *port = colon + 1;
        size_t digits = strspn(port, "0123456789");
        ok = digits >= 1 && digits <= 5 && port[digits] == '\0' && atoi(port) <= 65535;
    }
    if (ok) {
        size_t host_len = (size_t)(colon - v->text);
        bool bracketed = v->text[0] == '[' && v->text[host_len - 1] == ']' && host_len > 2;
        /* An IPv6 host must be bracketed, or its colons would be read as the port separator. */
        ok = bracketed || !memchr(v->text, ':', host_len);
    }
    if (!ok) {
        return fail(ctx, v, "%s must be HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080), got '%.80s'",
                    opt->name, v->text);
    }
    return 0;
}

static bool valid_name(const char *s, size_t len)
{
    if (len < 1 || len > 64) {
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

/* ---- table-driven parsing --------------------------------------------------------------- */

static int parse_table(cfg_ctx_t *ctx, const opt_table_t *t, const mc__cfg_node_t *map, void *base,
                       const char *where);

static void *field(void *base, size_t offset)
{
    return (char *)base + offset;
}

static int set_string(cfg_ctx_t *ctx, char **slot, const char *value)
{
    char *copy = bson_strdup(value);
    if (!copy) {
        return fail_nomem(ctx);
    }
    bson_free(*slot);
    *slot = copy;
    return 0;
}

static int apply_defaults(cfg_ctx_t *ctx, const opt_table_t *t, void *base)
{
    for (size_t i = 0; i < t->n_opts; i++) {
        const opt_t *o = &t->opts[i];
        void *p = field(base, o->offset);
        switch (o->type) {
        case OPT_STRING:
        case OPT_ENUM_STRING:
            if (o->def_str && set_string(ctx, p, o->def_str) != 0) {
                return -1;
            }
            break;
        case OPT_BOOL: *(bool *)p = o->def_num != 0; break;
        case OPT_UINT32: *(uint32_t *)p = (uint32_t)o->def_num; break;
        case OPT_INT32: *(int32_t *)p = (int32_t)o->def_num; break;
        case OPT_ENUM: *(int *)p = (int)o->def_num; break;
        case OPT_SECTION:
            if (apply_defaults(ctx, o->section, base) != 0) {
                return -1;
            }
            break;
        case OPT_STRING_LIST:
        case OPT_CUSTOM: break;
        }
    }
    return 0;
}

/* A scalar usable as text: plain numbers and booleans count (a database may be named 2024),
 * null and collections do not. */
static int need_text(cfg_ctx_t *ctx, const mc__cfg_node_t *v, const char *expected)
{
    if (v->kind != MC__CFG_SCALAR || is_null(v)) {
        return fail_type(ctx, v, expected);
    }
    return 0;
}

static int parse_string(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, char **slot)
{
    if (need_text(ctx, v, "a string") != 0) {
        return -1;
    }
    int64_t max = o->max ? o->max : MAX_STRING;
    if ((int64_t)v->len < o->min) {
        return fail(ctx, v, "%s must not be empty", o->name);
    }
    if ((int64_t)v->len > max) {
        return fail(ctx, v, "%s must be at most %lld characters long", o->name, (long long)max);
    }
    if (o->validate && o->validate(ctx, o, v) != 0) {
        return -1;
    }
    return set_string(ctx, slot, v->text);
}

static int parse_integer(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, int64_t *out)
{
    mc__cfg_scalar_t s;
    if (v->kind != MC__CFG_SCALAR) {
        return fail_type(ctx, v, "an integer");
    }
    mc__cfg_scalar_type(v, &s);
    if (s.type != MC__CFG_INT) {
        return fail_type(ctx, v, "an integer");
    }
    if (s.overflow || s.i < o->min || s.i > o->max) {
        return fail(ctx, v, "%s must be between %lld and %lld", o->name, (long long)o->min,
                    (long long)o->max);
    }
    *out = s.i;
    return 0;
}

static int parse_enum(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, int *index)
{
    char allowed[200] = "";
    size_t used = 0;
    if (v->kind == MC__CFG_SCALAR) {
        for (int i = 0; o->choices[i]; i++) {
            if (!strcmp(v->text, o->choices[i])) {
                *index = i;
                return 0;
            }
        }
    }
    for (int i = 0; o->choices[i]; i++) {
        int w =
            snprintf(allowed + used, sizeof(allowed) - used, "%s%s", i ? ", " : "", o->choices[i]);
        if (w < 0 || (size_t)w >= sizeof(allowed) - used) {
            break;
        }
        used += (size_t)w;
    }
    char buf[80];
    return fail(ctx, v, "%s must be one of: %s (got %s)", o->name, allowed,
                describe(v, buf, sizeof(buf)));
}

static int parse_string_list(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base)
{
    char ***slot = field(base, o->offset);
    size_t *count = field(base, o->count_offset);
    if (v->kind != MC__CFG_SEQ) {
        return fail_type(ctx, v, "a list of strings");
    }
    for (size_t i = 0; i < v->n_items; i++) {
        const mc__cfg_node_t *item = v->items[i];
        if (need_text(ctx, item, "a string") != 0) {
            return -1;
        }
        if (item->len == 0) {
            return fail(ctx, item, "%s must not hold empty strings", o->name);
        }
        if (item->len > MAX_STRING) {
            return fail(ctx, item, "%s entries must be at most %d characters long", o->name,
                        MAX_STRING);
        }
    }
    char **list = bson_malloc0((v->n_items + 1) * sizeof(char *));
    *slot = list;
    *count = v->n_items;
    for (size_t i = 0; i < v->n_items; i++) {
        list[i] = bson_strdup(v->items[i]->text);
    }
    return 0;
}

static int parse_value(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                       const char *where)
{
    void *p = field(base, o->offset);
    int64_t n;
    int idx;

    switch (o->type) {
    case OPT_STRING: return parse_string(ctx, o, v, p);
    case OPT_BOOL: {
        mc__cfg_scalar_t s;
        if (v->kind == MC__CFG_SCALAR) {
            mc__cfg_scalar_type(v, &s);
            if (s.type == MC__CFG_BOOL) {
                *(bool *)p = s.b;
                return 0;
            }
        }
        return fail_type(ctx, v, "a boolean");
    }
    case OPT_UINT32:
        if (parse_integer(ctx, o, v, &n) != 0) {
            return -1;
        }
        *(uint32_t *)p = (uint32_t)n;
        return 0;
    case OPT_INT32:
        if (parse_integer(ctx, o, v, &n) != 0) {
            return -1;
        }
        *(int32_t *)p = (int32_t)n;
        return 0;
    case OPT_ENUM:
        if (parse_enum(ctx, o, v, &idx) != 0) {
            return -1;
        }
        *(int *)p = idx;
        return 0;
    case OPT_ENUM_STRING:
        if (parse_enum(ctx, o, v, &idx) != 0) {
            return -1;
        }
        return set_string(ctx, p, o->choices[idx]);
    case OPT_STRING_LIST: return parse_string_list(ctx, o, v, base);
    case OPT_SECTION: {
        char sub[160];
        snprintf(sub, sizeof(sub), "%s%s%s", where, *where ? "." : "", o->name);
        return parse_table(ctx, o->section, v, base, sub);
    }
    case OPT_CUSTOM: return o->parse(ctx, o, v, base, where);
    }
    return 0;
}

/* Lower-case, without '_' and '-', so that fullDocument or max-await-time-ms find their key. */
static void squash(const char *in, char *out, size_t size)
{
    size_t j = 0;
    for (; *in && j + 1 < size; in++) {
        if (*in != '_' && *in != '-') {
            out[j++] = (char)tolower((unsigned char)*in);
        }
    }
    out[j] = '\0';
}

static const char *suggest(const opt_table_t *t, const char *key)
{
    const char *best = NULL;
    size_t best_d = 3;
    char sk[80], so[80];
    squash(key, sk, sizeof(sk));
    for (size_t i = 0; i < t->n_opts; i++) {
        size_t d = mc__cfg_edit_distance(key, t->opts[i].name, 2);
        squash(t->opts[i].name, so, sizeof(so));
        if (strlen(key) < sizeof(sk) && !strcmp(sk, so)) {
            d = 0;
        }
        if (d < best_d) {
            best_d = d;
            best = t->opts[i].name;
        }
    }
    return best;
}

static int parse_table(cfg_ctx_t *ctx, const opt_table_t *t, const mc__cfg_node_t *map, void *base,
                       const char *where)
{
    const mc__cfg_node_t *found[MAX_TABLE_OPTS] = {0};

    if (map->kind != MC__CFG_MAP) {
        return fail_type(ctx, map, "a mapping");
    }
    /* Pass 1, in document order: every key must be known (or be handed to `other`). */
    for (size_t i = 0; i + 1 < map->n_items; i += 2) {
        const mc__cfg_node_t *key = map->items[i];
        size_t j = 0;
        while (j < t->n_opts && strcmp(key->text, t->opts[j].name) != 0) {
            j++;
        }
        if (j < t->n_opts) {
            found[j] = map->items[i + 1];
            continue;
        }
        if (t->other) {
            if (t->other(ctx, key, map->items[i + 1], base) != 0) {
                return -1;
            }
            continue;
        }
        const char *hint = suggest(t, key->text);
        char in[180] = "";
        if (*where) {
            snprintf(in, sizeof(in), " in %s", where);
        }
        if (hint) {
            return fail(ctx, key, "unknown key '%.80s'%s; did you mean '%s'?", key->text, in, hint);
        }
        return fail(ctx, key, "unknown key '%.80s'%s", key->text, in);
    }
    /* Pass 2, in table order, so that e.g. streams exist before sinks refer to them. */
    for (size_t j = 0; j < t->n_opts; j++) {
        const opt_t *o = &t->opts[j];
        /* An emptied section ("auth:" with its body commented out) counts as absent. */
        if (found[j] && o->type == OPT_SECTION && is_null(found[j])) {
            found[j] = NULL;
        }
        if (!found[j]) {
            if (o->required) {
                return fail(ctx, map, "missing required key '%s'%s%s", o->name,
                            *where ? " in " : "", where);
            }
            continue;
        }
        if (parse_value(ctx, o, found[j], base, where) != 0) {
            return -1;
        }
    }
    if (t->check) {
        return t->check(ctx, map, base, found);
    }
    return 0;
}

/* The node given for option `name` in a table's `found` array. */
static const mc__cfg_node_t *found_node(const opt_table_t *t, const mc__cfg_node_t *const *found,
                                        const char *name)
{
    for (size_t i = 0; i < t->n_opts; i++) {
        if (!strcmp(t->opts[i].name, name)) {
            return found[i];
        }
    }
    return NULL;
}

/* ---- option tables ---------------------------------------------------------------------- */

static const char *const full_document_names[] = {"default", "updateLookup", "whenAvailable",
                                                  "required", NULL};
static const char *const before_change_names[] = {"off", "whenAvailable", "required", NULL};
static const char *const history_lost_names[] = {"fail", "restart", NULL};
static const char *const oversize_names[] = {"split", "skip", "fail", NULL};
static const char *const store_names[] = {"file", "mongodb", NULL};
static const char *const algorithm_names[] = {"HS256", "RS256", "ES256", NULL};
static const char *const log_level_names[] = {"error", "warn", "info", "debug", NULL};
static const char *const server_io_names[] = {"auto", "uring", "writev", NULL};
static const char *const tls_version_names[] = {"1.2", "1.3", NULL};

/* MongoDB accepts only these stages after $changeStream. */
static const char *const change_stream_stages[] = {"$addFields",
                                                   "$match",
                                                   "$project",
                                                   "$replaceRoot",
                                                   "$replaceWith",
                                                   "$redact",
                                                   "$set",
                                                   "$unset",
                                                   "$changeStreamSplitLargeEvent",
                                                   NULL};

static int parse_pipeline(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                          const char *where)
{
    bson_t **slot = field(base, o->offset);
    if (v->kind != MC__CFG_SEQ) {
        return fail_type(ctx, v, "a list of pipeline stages");
    }
    bson_t *pipeline = bson_new();
    bson_destroy(*slot);
    *slot = pipeline;
    for (size_t i = 0; i < v->n_items; i++) {
        const mc__cfg_node_t *stage = v->items[i];
        char buf[80];
        if (stage->kind != MC__CFG_MAP || stage->n_items != 2) {
            return fail(ctx, stage,
                        "a pipeline stage must be a mapping with exactly one key such "
                        "as $match, got %s",
                        stage->kind == MC__CFG_MAP ? "a mapping with several keys"
                                                   : describe(stage, buf, sizeof(buf)));
        }
        const mc__cfg_node_t *key = stage->items[0];
        if (key->text[0] != '$') {
            return fail(ctx, key, "pipeline stage '%.80s' must start with '$' (e.g. $match)",
                        key->text);
        }
        size_t k = 0;
        while (change_stream_stages[k] && strcmp(change_stream_stages[k], key->text) != 0) {
            k++;
        }
        if (!change_stream_stages[k]) {
            return fail(ctx, key,
                        "stage '%.80s' is not allowed in a change stream pipeline (allowed: "
                        "$addFields, $match, $project, $replaceRoot, $replaceWith, $redact, $set, "
                        "$unset, $changeStreamSplitLargeEvent)",
                        key->text);
        }
        char idx[16];
        const char *ik;
        size_t kl = bson_uint32_to_string((uint32_t)i, &ik, idx, sizeof(idx));
        bson_t doc;
        if (!bson_append_document_begin(pipeline, ik, (int)kl, &doc)) {
            return fail(ctx, stage, "pipeline is too large");
        }
        int rc = append_node(ctx, &doc, key->text, key->len, stage->items[1]);
        bool ok = bson_append_document_end(pipeline, &doc);
        if (rc != 0) {
            return -1;
        }
        if (!ok) {
            return fail(ctx, stage, "pipeline is too large");
        }
    }
    return 0;
}

static const opt_t lookup_opts[] = {
    {.name = "db",
     .type = OPT_STRING,
     .offset = offsetof(mc_recipient_lookup_t, db),
     .required = true,
     .min = 1,
     .validate = validate_db_name,
     .doc = "database of the collection that maps the path's value to a recipient"},
    {.name = "collection",
     .type = OPT_STRING,
     .offset = offsetof(mc_recipient_lookup_t, collection),
     .required = true,
     .min = 1,
     .validate = validate_collection_name,
     .doc = "collection looked up"},
    {.name = "field",
     .type = OPT_STRING,
     .offset = offsetof(mc_recipient_lookup_t, field),
     .def_str = "_id",
     .min = 1,
     .validate = validate_field_path,
     .doc = "field of the looked-up document matched against the path's value"},
    {.name = "recipient",
     .type = OPT_STRING,
     .offset = offsetof(mc_recipient_lookup_t, recipient),
     .required = true,
     .min = 1,
     .validate = validate_field_path,
     .doc = "field of the looked-up document that holds the recipient"},
    {.name = "cache_size",
     .type = OPT_UINT32,
     .offset = offsetof(mc_recipient_lookup_t, cache_size),
     .def_num = 10000,
     .min = 0,
     .max = 10000000,
     .doc = "lookup keys cached (LRU), kept exact by a change stream on the lookup "
            "collection; 0 disables the cache"},
};
static const opt_table_t lookup_table = {lookup_opts, N_OPTS(lookup_opts), "", NULL, NULL};

/* The lookup of a recipient form; o->offset locates the mc_recipient_lookup_t pointer in the
 * stream (single form) or in a by_collection rule. */
static int parse_lookup(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                        const char *where)
{
    mc_recipient_lookup_t **slot = field(base, o->offset);
    char sub[200];
    if (!*slot) {
        *slot = bson_malloc0(sizeof(**slot));
        if (apply_defaults(ctx, &lookup_table, *slot) != 0) {
            return -1;
        }
    }
    snprintf(sub, sizeof(sub), "%s.lookup", where);
    return parse_table(ctx, &lookup_table, v, *slot, sub);
}

/* ---- summary ---------------------------------------------------------------------------- */

static const opt_t summary_rule_opts[] = {
    {.name = "when",
     .type = OPT_CUSTOM,
     .doc = "a query on the change event; this alternative is used when it matches"},
    {.name = "text", .type = OPT_CUSTOM, .required = true, .doc = "the template"},
};
/* Only for the documentation walk: summary alternatives are parsed by parse_summary(). */
static const opt_table_t summary_rule_table = {summary_rule_opts, N_OPTS(summary_rule_opts), "[]",
                                               NULL, NULL};

static int summary_text(cfg_ctx_t *ctx, const mc__cfg_node_t *v, mc_summary_rule_t *r)
{
    if (need_text(ctx, v, "a summary template (a string)") != 0) {
        return -1;
    }
    char msg[240];
    if (!mc__summary_template_check(v->text, msg, sizeof(msg))) {
        return fail(ctx, v, "summary: %s", msg);
    }
    r->text = bson_strdup(v->text);
    r->pos.line = v->line;
    r->pos.col = v->col;
    return 0;
}

static int summary_when(cfg_ctx_t *ctx, const mc__cfg_node_t *v, mc_summary_rule_t *r)
{
    if (v->kind != MC__CFG_MAP) {
        return fail_type(ctx, v, "a query (a mapping) such as {operationType: update}");
    }
    bson_t wrap = BSON_INITIALIZER;
    if (append_node(ctx, &wrap, "q", 1, v) != 0) {
        bson_destroy(&wrap);
        return -1;
    }
    bson_iter_t it;
    const uint8_t *data;
    uint32_t len;
    bson_iter_init_find(&it, &wrap, "q");
    bson_iter_document(&it, &len, &data);
    r->when = bson_new_from_data(data, len);
    bson_destroy(&wrap);
    mc_error_t ferr = {0};
    mc_filter_t *f = r->when ? mc_filter_new(r->when, NULL, &ferr) : NULL;
    if (!f) {
        return fail(ctx, v, "summary when: %s", r->when ? ferr.message : "out of memory");
    }
    mc_filter_destroy(f);
    return 0;
}

/* summary: "template" | [{when: query, text: "template"}, ...]; o->offset locates the
 * mc_summary_config_t (in the stream or in a by_collection rule). */
static int parse_summary(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                         const char *where)
{
    (void)where;
    mc_summary_config_t *sc = field(base, o->offset);
    if (v->kind == MC__CFG_SCALAR) {
        sc->rules = bson_malloc0(sizeof(*sc->rules));
        sc->n_rules = 1;
        return summary_text(ctx, v, &sc->rules[0]);
    }
    if (v->kind != MC__CFG_SEQ || v->n_items == 0) {
        return fail_type(ctx, v, "a template string or a list of {when, text}");
    }
    if (v->n_items > MC__SUMMARY_MAX_RULES) {
        return fail(ctx, v->items[MC__SUMMARY_MAX_RULES],
                    "a summary may have at most %d "
                    "alternatives",
                    MC__SUMMARY_MAX_RULES);
    }
    sc->rules = bson_malloc0(v->n_items * sizeof(*sc->rules));
    for (size_t i = 0; i < v->n_items; i++) {
        const mc__cfg_node_t *item = v->items[i];
        mc_summary_rule_t *r = &sc->rules[sc->n_rules++];
        if (item->kind == MC__CFG_SCALAR) {
            if (summary_text(ctx, item, r) != 0) {
                return -1;
            }
            continue;
        }
        if (item->kind != MC__CFG_MAP) {
            return fail_type(ctx, item, "a template string or a mapping {when, text}");
        }
        const mc__cfg_node_t *when = NULL, *text = NULL;
        for (size_t k = 0; k + 1 < item->n_items; k += 2) {
            const mc__cfg_node_t *key = item->items[k];
            if (!strcmp(key->text, "when")) {
                when = item->items[k + 1];
            } else if (!strcmp(key->text, "text")) {
                text = item->items[k + 1];
            } else {
                const char *hint = suggest(&summary_rule_table, key->text);
                return fail(ctx, key, "unknown key '%.80s' in a summary alternative%s%s%s",
                            key->text, hint ? "; did you mean '" : "", hint ? hint : "",
                            hint ? "'?" : "");
            }
        }
        if (!text) {
            return fail(ctx, item, "missing required key 'text' in a summary alternative");
        }
        if (summary_text(ctx, text, r) != 0 || (when && summary_when(ctx, when, r) != 0)) {
            return -1;
        }
        if (!when && i + 1 < v->n_items) {
            return fail(ctx, item,
                        "a summary alternative without 'when' matches every event, "
                        "so the ones after it are never used: put it last");
        }
    }
    return 0;
}

/* ---- recipient -------------------------------------------------------------------------- */

/* One rule of by_collection (and the default): a path, an optional lookup, a summary. */
static const opt_t rule_opts[] = {
    {.name = "path",
     .type = OPT_STRING,
     .offset = offsetof(mc_recipient_rule_t, path),
     .required = true,
     .min = 1,
     .validate = validate_field_path,
     .doc = "dotted path in the change event: the recipient, or the value looked up"},
    {.name = "lookup",
     .type = OPT_CUSTOM,
     .offset = offsetof(mc_recipient_rule_t, lookup),
     .parse = parse_lookup,
     .section = &lookup_table,
     .doc = "where to find the recipient for the path's value"},
    {.name = "summary",
     .type = OPT_CUSTOM,
     .offset = offsetof(mc_recipient_rule_t, summary),
     .parse = parse_summary,
     .section = &summary_rule_table,
     .doc = "the human line of this collection's messages (instead of the stream's)"},
};
static const opt_table_t rule_table = {rule_opts, N_OPTS(rule_opts), ".*", NULL, NULL};
static const opt_table_t default_rule_table = {rule_opts, N_OPTS(rule_opts), "", NULL, NULL};

/* A rule: a dotted path, or a mapping {path, lookup, summary}. */
static int parse_rule(cfg_ctx_t *ctx, const opt_table_t *t, const mc__cfg_node_t *v,
                      mc_recipient_rule_t *r, const char *where)
{
    r->pos.line = v->line;
    r->pos.col = v->col;
    if (v->kind == MC__CFG_MAP) {
        return parse_table(ctx, t, v, r, where);
    }
    if (v->kind != MC__CFG_SCALAR || is_null(v)) {
        return fail_type(ctx, v, "a dotted path or a mapping {path, lookup, summary}");
    }
    static const opt_t as_path = {
        .name = "path", .type = OPT_STRING, .min = 1, .validate = validate_field_path};
    return parse_string(ctx, &as_path, v, &r->path);
}

static int parse_by_collection(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                               const char *where)
{
    (void)o;
    mc_stream_config_t *s = base;
    if (v->kind != MC__CFG_MAP || v->n_items == 0) {
        return fail_type(ctx, v, "a mapping of collection names to recipient rules");
    }
    size_t n = v->n_items / 2;
    if (n > MAX_BY_COLLECTION) {
        return fail(ctx, v->items[2 * MAX_BY_COLLECTION],
                    "by_collection may name at most %d "
                    "collections",
                    MAX_BY_COLLECTION);
    }
    s->by_collection = bson_malloc0(n * sizeof(*s->by_collection));
    for (size_t i = 0; i < n; i++) {
        const mc__cfg_node_t *key = v->items[2 * i];
        mc_recipient_rule_t *r = &s->by_collection[s->n_by_collection++];
        if (key->len == 0 || strchr(key->text, '$') || !strncmp(key->text, "system.", 7)) {
            return fail(ctx, key, "by_collection key '%.80s' is not a valid collection name",
                        key->text);
        }
        r->collection = bson_strdup(key->text);
        char sub[240];
        snprintf(sub, sizeof(sub), "%s.recipient.by_collection.%.80s", where, key->text);
        if (parse_rule(ctx, &rule_table, v->items[2 * i + 1], r, sub) != 0) {
            return -1;
        }
    }
    return 0;
}

static int parse_default(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                         const char *where)
{
    (void)o;
    mc_stream_config_t *s = base;
    s->recipient_default = bson_malloc0(sizeof(*s->recipient_default));
    char sub[200];
    snprintf(sub, sizeof(sub), "%s.recipient.default", where);
    return parse_rule(ctx, &default_rule_table, v, s->recipient_default, sub);
}

static int check_recipient(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                           const mc__cfg_node_t *const *found);

/* The mapping form of recipient shares mc_stream_config_t as its base: {path, lookup}, or
 * {by_collection, default}. */
static const opt_t recipient_opts[] = {
    {.name = "path",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, recipient),
     .min = 1,
     .validate = validate_field_path,
     .doc = "dotted path in the change event whose value is looked up"},
    {.name = "lookup",
     .type = OPT_CUSTOM,
     .offset = offsetof(mc_stream_config_t, lookup),
     .parse = parse_lookup,
     .section = &lookup_table,
     .doc = "where to find the recipient for the path's value"},
    {.name = "by_collection",
     .type = OPT_CUSTOM,
     .parse = parse_by_collection,
     .section = &rule_table,
     .doc = "a recipient rule per collection (database- or cluster-level streams)"},
    {.name = "default",
     .type = OPT_CUSTOM,
     .parse = parse_default,
     .section = &default_rule_table,
     .doc = "the rule of collections by_collection does not name; omitted: admins only"},
};
static const opt_table_t recipient_table = {recipient_opts, N_OPTS(recipient_opts), "",
                                            check_recipient, NULL};

static int check_recipient(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                           const mc__cfg_node_t *const *found)
{
    const mc_stream_config_t *s = base;
    const mc__cfg_node_t *path = found_node(&recipient_table, found, "path");
    const mc__cfg_node_t *lookup = found_node(&recipient_table, found, "lookup");
    const mc__cfg_node_t *by = found_node(&recipient_table, found, "by_collection");
    const mc__cfg_node_t *def = found_node(&recipient_table, found, "default");
    if (by || def) {
        if (path || lookup) {
            return fail(ctx, path ? path : lookup,
                        "recipient takes either path (with lookup) or by_collection (with "
                        "default), not both");
        }
        if (!by) {
            return fail(ctx, def,
                        "recipient.default needs by_collection (for one rule for "
                        "every collection, write recipient: {path, lookup})");
        }
        return 0;
    }
    if (!path) {
        return fail(ctx, map, "missing required key 'path' in streams.%s.recipient", s->name);
    }
    return 0;
}

static int parse_recipient(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                           const char *where)
{
    mc_stream_config_t *s = base;
    if (v->kind == MC__CFG_MAP) {
        char sub[160];
        snprintf(sub, sizeof(sub), "%s.recipient", where);
        return parse_table(ctx, &recipient_table, v, base, sub);
    }
    if (v->kind != MC__CFG_SCALAR || is_null(v)) {
        return fail_type(ctx, v,
                         "a dotted path or a mapping {path, lookup} or {by_collection, "
                         "default}");
    }
    static const opt_t as_path = {
        .name = "recipient", .type = OPT_STRING, .min = 1, .validate = validate_field_path};
    return parse_string(ctx, &as_path, v, &s->recipient);
}

/* ---- source: {nats: ...} (edge streams, source_nats.c) ----------------------------------- */

static int validate_nats_url(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    (void)opt;
    mc_error_t err = {0};
    if (mc__nats_url_check(v->text, v->len, &err) != 0) {
        return fail(ctx, v, "%s", err.message);
    }
    return 0;
}

/* A JetStream stream name: no whitespace, '.', '*', '>', path separators or control bytes. */
static int validate_js_stream_name(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    for (size_t i = 0; i < v->len; i++) {
        unsigned char c = (unsigned char)v->text[i];
        if (c <= ' ' || c == 0x7f || strchr(".*>/\\", c)) {
            return fail(ctx, v,
                        "%s '%.80s' is not a valid JetStream stream name (no spaces, '.', '*', "
                        "'>', '/', '\\' or control bytes)",
                        opt->name, v->text);
        }
    }
    return 0;
}

/* A NATS subject (wildcards allowed): tokens separated by '.', none empty, no whitespace. */
static int validate_nats_subject(cfg_ctx_t *ctx, const opt_t *opt, const mc__cfg_node_t *v)
{
    bool token_start = true;
    for (size_t i = 0; i < v->len; i++) {
        unsigned char c = (unsigned char)v->text[i];
        if (c <= ' ' || c == 0x7f || (c == '.' && token_start)) {
            return fail(ctx, v, "%s '%.80s' is not a valid NATS subject", opt->name, v->text);
        }
        token_start = c == '.';
    }
    if (token_start) {
        return fail(ctx, v, "%s '%.80s' is not a valid NATS subject", opt->name, v->text);
    }
    return 0;
}

static const opt_t source_nats_opts[] = {
    {.name = "url",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, source_nats.url),
     .required = true,
     .min = 1,
     .max = 4096,
     .validate = validate_nats_url,
     .doc = "NATS server list: nats://[user[:password]@]host[:port], comma-separated"},
    {.name = "stream",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, source_nats.stream),
     .required = true,
     .min = 1,
     .max = 255,
     .validate = validate_js_stream_name,
     .doc = "the JetStream stream the leader's nats sink (format: bson) writes"},
    {.name = "subject",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, source_nats.subject),
     .min = 1,
     .max = 2048,
     .validate = validate_nats_subject,
     .doc = "only messages of this subject (wildcards allowed); default: every message"},
};
static const opt_table_t source_nats_table = {source_nats_opts, N_OPTS(source_nats_opts), "",
                                              NULL, NULL};

static const opt_t source_opts[] = {
    {.name = "nats",
     .type = OPT_SECTION,
     .required = true,
     .section = &source_nats_table,
     .doc = "take the stream's events from a JetStream stream (an edge stream)"},
};
static const opt_table_t source_table = {source_opts, N_OPTS(source_opts), "", NULL, NULL};

/* An edge stream takes its events as the leader's watcher read them: what shapes the read
 * from MongoDB is the leader's to set, and nothing may need MongoDB on the edge. */
static int check_edge_stream(cfg_ctx_t *ctx, mc_stream_config_t *s,
                             const mc__cfg_node_t *const *found);

static int check_stream(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                        const mc__cfg_node_t *const *found);

static const opt_t stream_opts[] = {
    {.name = "db",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, db),
     .min = 1,
     .validate = validate_db_name,
     .doc = "database to watch; omit to watch the whole cluster"},
    {.name = "collection",
     .type = OPT_STRING,
     .offset = offsetof(mc_stream_config_t, collection),
     .min = 1,
     .validate = validate_collection_name,
     .doc = "collection to watch (needs db); omit to watch the whole database"},
    {.name = "pipeline",
     .type = OPT_CUSTOM,
     .offset = offsetof(mc_stream_config_t, pipeline),
     .parse = parse_pipeline,
     .doc = "change-stream pipeline stages; {$var: name} is kept"},
    {.name = "full_document",
     .type = OPT_ENUM,
     .offset = offsetof(mc_stream_config_t, full_document),
     .def_num = MC_FULL_DOCUMENT_DEFAULT,
     .choices = full_document_names,
     .doc = "fullDocument option of the change stream"},
    {.name = "full_document_before_change",
     .type = OPT_ENUM,
     .offset = offsetof(mc_stream_config_t, full_document_before_change),
     .def_num = MC_BEFORE_CHANGE_OFF,
     .choices = before_change_names,
     .doc = "fullDocumentBeforeChange option (pre-images)"},
    {.name = "recipient",
     .type = OPT_CUSTOM,
     .parse = parse_recipient,
     .section = &recipient_table,
     .doc = "dotted path to the recipient, or {path, lookup}"},
    {.name = "public",
     .type = OPT_BOOL,
     .offset = offsetof(mc_stream_config_t, is_public),
     .def_num = 0,
     .doc = "true: subscribers need no token"},
    {.name = "client_filters",
     .type = OPT_BOOL,
     .offset = offsetof(mc_stream_config_t, client_filters),
     .def_num = 0,
     .doc = "subscribers may pass ?filter="},
    {.name = "history",
     .type = OPT_UINT32,
     .offset = offsetof(mc_stream_config_t, history),
     .def_num = 10000,
     .min = 0,
     .max = 10000000,
     .doc = "events kept for client resume"},
    {.name = "max_snapshot_documents",
     .type = OPT_UINT32,
     .offset = offsetof(mc_stream_config_t, max_snapshot_documents),
     .def_num = 0,
     .min = 0,
     .max = 100000000,
     .doc = "documents one ?snapshot=true may send; 0: server.max_snapshot_documents"},
    {.name = "max_catchup_events",
     .type = OPT_UINT32,
     .offset = offsetof(mc_stream_config_t, max_catchup_events),
     .def_num = 0,
     .min = 0,
     .max = 100000000,
     .doc = "stream events one client catch-up may read; 0: server.max_catchup_events"},
    {.name = "on_history_lost",
     .type = OPT_ENUM,
     .offset = offsetof(mc_stream_config_t, on_history_lost),
     .def_num = MC_ON_HISTORY_LOST_FAIL,
     .choices = history_lost_names,
     .doc = "what to do when the resume point fell off the oplog"},
    {.name = "on_oversize",
     .type = OPT_ENUM,
     .offset = offsetof(mc_stream_config_t, on_oversize),
     .def_num = MC_ON_OVERSIZE_SPLIT,
     .choices = oversize_names,
     .doc = "what to do with a change event larger than MongoDB's 16 MB limit"},
    {.name = "batch_size",
     .type = OPT_INT32,
     .offset = offsetof(mc_stream_config_t, batch_size),
     .def_num = 0,
     .min = 0,
     .max = 1000000,
     .doc = "change-stream batchSize; 0: server default"},
    {.name = "max_await_time_ms",
     .type = OPT_INT32,
     .offset = offsetof(mc_stream_config_t, max_await_time_ms),
     .def_num = 1000,
     .min = 1,
     .max = 60000,
     .doc = "maxAwaitTimeMS of each getMore"},
    {.name = "summary",
     .type = OPT_CUSTOM,
     .offset = offsetof(mc_stream_config_t, summary),
     .parse = parse_summary,
     .section = &summary_rule_table,
     .doc = "a human line per change message: a template, or a list of {when, text}"},
    {.name = "ensure_images",
     .type = OPT_BOOL,
     .offset = offsetof(mc_stream_config_t, ensure_images),
     .def_num = 0,
     .doc = "turn on changeStreamPreAndPostImages on the watched (and lookup) collections"},
    {.name = "source",
     .type = OPT_SECTION,
     .section = &source_table,
     .doc = "where the events come from: {nats: {url, stream, subject}} instead of MongoDB"},
};
static const opt_table_t stream_table = {stream_opts, N_OPTS(stream_opts), ".*", check_stream,
                                         NULL};

/* Where the pipeline's stage `i` was written (the pipeline node's i-th item). */
static const mc__cfg_node_t *stage_node(const mc__cfg_node_t *pipeline, size_t i,
                                        const mc__cfg_node_t *fallback)
{
    return pipeline && pipeline->kind == MC__CFG_SEQ && i < pipeline->n_items ? pipeline->items[i]
                                                                              : fallback;
}

static int check_stream(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                        const mc__cfg_node_t *const *found)
{
    mc_stream_config_t *s = base;
    if (s->collection && !s->db) {
        return fail(ctx, found_node(&stream_table, found, "collection"),
                    "collection requires db (omit both to watch the whole cluster)");
    }
    const mc__cfg_node_t *recipient = found_node(&stream_table, found, "recipient");
    if (s->n_by_collection > 0 && s->collection) {
        return fail(ctx, recipient,
                    "recipient.by_collection needs a database- or cluster-level stream (this "
                    "stream watches one collection: write recipient: PATH or {path, lookup})");
    }
    for (size_t i = 0; i < s->n_by_collection; i++) {
        const mc_recipient_rule_t *r = &s->by_collection[i];
        const char *dot = strchr(r->collection, '.');
        if (!s->db && (!dot || dot == r->collection || !dot[1])) {
            return fail(ctx, recipient,
                        "recipient.by_collection key '%.80s': on a cluster-level stream (no "
                        "db) keys are DB.COLLECTION",
                        r->collection);
        }
        for (size_t j = 0; j < i; j++) {
            if (!strcmp(s->by_collection[j].collection, r->collection)) {
                return fail(ctx, recipient, "recipient.by_collection names '%.80s' twice",
                            r->collection);
            }
        }
    }
    if (mc_stream_config_has_recipient(s) && s->full_document == MC_FULL_DOCUMENT_UPDATE_LOOKUP) {
        /* updateLookup reads the document when the event is read, not as the write left it:
         * a later owner would receive an earlier owner's write. */
        return fail(ctx, found_node(&stream_table, found, "full_document"),
                    "full_document: updateLookup cannot be used with recipient: it reads the "
                    "document as it is later, so a change could reach the next owner. Use "
                    "full_document: whenAvailable (or required) with changeStreamPreAndPostImages "
                    "enabled on the collection (mongocast enable-images), and "
                    "full_document_before_change: whenAvailable (or required) so that deletes "
                    "and ownership changes are routed from the pre-image");
    }
    if (!s->pipeline) {
        s->pipeline = bson_new();
    }
    if (s->source_nats.url && check_edge_stream(ctx, s, found) != 0) {
        return -1;
    }
    /* Stages after a $var stage run in the daemon, per subscriber: each must be one the
     * daemon can run, written as the daemon will run it. */
    mc_error_t perr = {0};
    size_t bad = 0;
    if (mc__stream_pipeline_check(s->pipeline, &bad, &perr) != 0) {
        const mc__cfg_node_t *pipeline = found_node(&stream_table, found, "pipeline");
        return fail(ctx, stage_node(pipeline, bad, pipeline ? pipeline : map), "%s", perr.message);
    }
    return 0;
}

static int check_edge_stream(cfg_ctx_t *ctx, mc_stream_config_t *s,
                             const mc__cfg_node_t *const *found)
{
    /* Options of the read from MongoDB: the leader's stream has them. */
    static const char *const leader_only[] = {"full_document",   "full_document_before_change",
                                              "ensure_images",   "on_oversize",
                                              "batch_size",      "max_await_time_ms",
                                              "max_snapshot_documents"};
    for (size_t i = 0; i < sizeof(leader_only) / sizeof(leader_only[0]); i++) {
        const mc__cfg_node_t *n = found_node(&stream_table, found, leader_only[i]);
        if (n) {
            return fail(ctx, n,
                        "%s cannot be set on an edge stream (source: nats): %s", leader_only[i],
                        !strcmp(leader_only[i], "max_snapshot_documents")
                            ? "snapshots read MongoDB, which an edge never does"
                            : "the leader's stream reads MongoDB and sets it");
        }
    }
    const mc__cfg_node_t *recipient = found_node(&stream_table, found, "recipient");
    bool lookup = s->lookup != NULL || (s->recipient_default && s->recipient_default->lookup);
    for (size_t i = 0; i < s->n_by_collection; i++) {
        lookup = lookup || s->by_collection[i].lookup != NULL;
    }
    if (lookup) {
        return fail(ctx, recipient,
                    "recipient lookups cannot be used on an edge stream (source: nats): they "
                    "read MongoDB as of each event's time. Route by a path the change carries");
    }
    bson_t server, local;
    mc_error_t perr = {0};
    int rc = mc_pipeline_split(s->pipeline, &server, &local, &perr);
    bool has_server_stages = rc == 0 && !bson_empty(&server);
    bson_destroy(&server);
    bson_destroy(&local);
    if (has_server_stages) {
        const mc__cfg_node_t *pipeline = found_node(&stream_table, found, "pipeline");
        return fail(ctx, pipeline,
                    "an edge stream (source: nats) runs only per-subscriber stages (from the "
                    "first {$var} stage on): stages before it run in MongoDB, so put them in "
                    "the leader's stream");
    }
    return 0;
}

bool mc_stream_config_is_edge(const mc_stream_config_t *stream)
{
    return stream && stream->source_nats.url != NULL;
}

static int parse_streams(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                         const char *where)
{
    mc_config_t *cfg = base;
    if (v->kind == MC__CFG_SCALAR && is_null(v)) {
        return fail(ctx, v, "at least one stream is required");
    }
    if (v->kind != MC__CFG_MAP) {
        return fail_type(ctx, v, "a mapping of stream names to streams");
    }
    size_t n = v->n_items / 2;
    if (n == 0) {
        return fail(ctx, v, "at least one stream is required");
    }
    if (n > MC__CFG_MAX_STREAMS) {
        return fail(ctx, v->items[2 * MC__CFG_MAX_STREAMS], "at most %d streams are allowed",
                    MC__CFG_MAX_STREAMS);
    }
    cfg->streams = bson_malloc0(n * sizeof(*cfg->streams));
    cfg->n_streams = n;
    for (size_t i = 0; i < n; i++) {
        const mc__cfg_node_t *key = v->items[2 * i];
        mc_stream_config_t *s = &cfg->streams[i];
        char sub[160];
        if (!valid_name(key->text, key->len)) {
            return fail(ctx, key,
                        "stream name '%.80s' must be 1 to 64 characters from "
                        "A-Z a-z 0-9 _ -",
                        key->text);
        }
        s->name = bson_strdup(key->text);
        s->pos.line = key->line;
        s->pos.col = key->col;
        if (apply_defaults(ctx, &stream_table, s) != 0) {
            return -1;
        }
        snprintf(sub, sizeof(sub), "streams.%s", key->text);
        if (parse_table(ctx, &stream_table, v->items[2 * i + 1], s, sub) != 0) {
            return -1;
        }
    }
    return 0;
}

static int sink_option(cfg_ctx_t *ctx, const mc__cfg_node_t *key, const mc__cfg_node_t *value,
                       void *base)
{
    mc_sink_config_t *sk = base;
    return append_node(ctx, sk->options, key->text, key->len, value);
}

static int check_sink(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                      const mc__cfg_node_t *const *found);

static const opt_t sink_retry_opts[] = {
    {.name = "initial_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, retry.initial_ms),
     .def_num = 100,
     .min = 1,
     .max = 3600000,
     .doc = "ceiling of the first retry delay (full jitter: a delay is uniform in [0, ceiling])"},
    {.name = "max_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, retry.max_ms),
     .def_num = 30000,
     .min = 1,
     .max = 86400000,
     .doc = "cap of the retry delay ceiling, which doubles per attempt"},
    {.name = "max_attempts",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, retry.max_attempts),
     .def_num = 0,
     .min = 0,
     .max = 1000000000,
     .doc = "offers of one event before a transient failure counts as permanent; 0: no limit"},
    {.name = "max_retry_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, retry.max_retry_ms),
     .def_num = 0,
     .min = 0,
     .max = 2000000000,
     .doc = "time since an event first failed after which it counts as permanent; 0: none"},
};
static const opt_table_t sink_retry_table = {sink_retry_opts, N_OPTS(sink_retry_opts), "", NULL,
                                             NULL};

static int check_dead_letter(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                             const mc__cfg_node_t *const *found);

static const opt_t sink_dead_letter_opts[] = {
    {.name = "file",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, dead_letter_file),
     .min = 1,
     .max = 4096,
     .doc = "file that receives events which failed permanently, one JSON line each"},
    {.name = "db",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, dead_letter_db),
     .min = 1,
     .max = 63,
     .doc = "database of the dead-letter collection (with collection; instead of file)"},
    {.name = "collection",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, dead_letter_collection),
     .min = 1,
     .max = 200,
     .doc = "collection that receives events which failed permanently, one document each"},
    {.name = "uri",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, dead_letter_uri),
     .min = 1,
     .max = 4096,
     .doc = "cluster of the dead-letter collection; default mongodb.uri"},
};
static const opt_table_t sink_dead_letter_table = {
    sink_dead_letter_opts, N_OPTS(sink_dead_letter_opts), "", check_dead_letter, NULL};

/* Exactly one form: {file} or {db, collection[, uri]}. */
static int check_dead_letter(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                             const mc__cfg_node_t *const *found)
{
    const mc_sink_config_t *sk = base;
    bool coll_form = sk->dead_letter_db || sk->dead_letter_collection || sk->dead_letter_uri;
    if (sk->dead_letter_file && coll_form) {
        return fail(ctx, found_node(&sink_dead_letter_table, found, "file"),
                    "dead_letter takes either file or {db, collection}, not both");
    }
    if (!sk->dead_letter_file && !coll_form) {
        return fail(ctx, map, "dead_letter needs file: PATH, or db and collection");
    }
    if (coll_form && (!sk->dead_letter_db || !sk->dead_letter_collection)) {
        return fail(ctx, map, "dead_letter needs both db and collection");
    }
    if (sk->dead_letter_db && strpbrk(sk->dead_letter_db, "/\\. \"$")) {
        return fail(ctx, found_node(&sink_dead_letter_table, found, "db"),
                    "dead_letter.db '%.64s' is not a valid database name", sk->dead_letter_db);
    }
    if (sk->dead_letter_collection && (sk->dead_letter_collection[0] == '$' ||
                                       strncmp(sk->dead_letter_collection, "system.", 7) == 0)) {
        return fail(ctx, found_node(&sink_dead_letter_table, found, "collection"),
                    "dead_letter.collection '%.64s' is not a collection a sink may write",
                    sk->dead_letter_collection);
    }
    return 0;
}

static const char *const sink_initial_names[] = {"none", "snapshot", NULL};

static const opt_t sink_opts[] = {
    {.name = "name",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, name),
     .required = true,
     .min = 1,
     .doc = "unique name of the sink (A-Z a-z 0-9 _ -, 1 to 64)"},
    {.name = "type",
     .type = OPT_STRING,
     .offset = offsetof(mc_sink_config_t, type),
     .required = true,
     .min = 1,
     .max = 64,
     .doc = "sink type: stdout, redis, webhook, ..."},
    {.name = "streams",
     .type = OPT_STRING_LIST,
     .offset = offsetof(mc_sink_config_t, streams),
     .count_offset = offsetof(mc_sink_config_t, n_streams),
     .doc = "names of the streams this sink takes; omit for every stream"},
    {.name = "max_lag_events",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, max_lag_events),
     .def_num = 10000,
     .min = 1,
     .max = 1000000,
     .doc = "events queued for the sink before it is detached and catches up on its own"},
    {.name = "retry",
     .type = OPT_SECTION,
     .section = &sink_retry_table,
     .doc = "how the sink's runner retries transient failures"},
    {.name = "dead_letter",
     .type = OPT_SECTION,
     .section = &sink_dead_letter_table,
     .doc = "where events that fail permanently go; without it such a failure fails the sink"},
    {.name = "initial",
     .type = OPT_ENUM,
     .offset = offsetof(mc_sink_config_t, initial),
     .def_num = MC_SINK_INITIAL_NONE,
     .choices = sink_initial_names,
     .doc = "none | snapshot: copy the watched collection first when the sink has no position"},
    {.name = "initial_batch_size",
     .type = OPT_UINT32,
     .offset = offsetof(mc_sink_config_t, initial_batch_size),
     .def_num = 1000,
     .min = 1,
     .max = 100000,
     .doc = "documents per server batch of the initial snapshot copy"},
};
static const opt_table_t sink_table = {sink_opts, N_OPTS(sink_opts), "[]", check_sink, sink_option};

/* initial: snapshot copies one collection per stream: every stream the sink takes must
 * watch a collection, and the sink type must accept events without a change-stream
 * position (Redis stream entry IDs are derived from one). */
static int check_sink_initial(cfg_ctx_t *ctx, const mc_sink_config_t *sk,
                              const mc__cfg_node_t *node)
{
    const mc_config_t *cfg = ctx->config;
    if (sk->initial != MC_SINK_INITIAL_SNAPSHOT) {
        return 0;
    }
    if (!strcmp(sk->type, "redis")) {
        return fail(ctx, node,
                    "sink '%s': initial: snapshot is not supported by type redis (its stream "
                    "entry IDs come from change-stream positions, which copied documents do not "
                    "have)",
                    sk->name);
    }
    for (size_t k = 0; k < cfg->n_streams; k++) {
        const mc_stream_config_t *st = &cfg->streams[k];
        bool takes = sk->n_streams == 0;
        for (size_t i = 0; i < sk->n_streams && !takes; i++) {
            takes = !strcmp(sk->streams[i], st->name);
        }
        if (takes && (!st->db || !st->collection)) {
            return fail(ctx, node,
                        "sink '%s': initial: snapshot copies one collection per stream, but "
                        "stream '%.80s' watches a whole %s",
                        sk->name, st->name, st->db ? "database" : "cluster");
        }
    }
    return 0;
}

static int check_sink(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                      const mc__cfg_node_t *const *found)
{
    mc_sink_config_t *sk = base;
    const mc_config_t *cfg = ctx->config;
    const mc__cfg_node_t *name = found_node(&sink_table, found, "name");
    const mc__cfg_node_t *list = found_node(&sink_table, found, "streams");

    if (!valid_name(sk->name, strlen(sk->name))) {
        return fail(ctx, name, "sink name '%.80s' must be 1 to 64 characters from A-Z a-z 0-9 _ -",
                    sk->name);
    }
    for (const mc_sink_config_t *other = cfg->sinks; other < sk; other++) {
        if (!strcmp(other->name, sk->name)) {
            return fail(ctx, name, "duplicate sink name '%s' (first defined at line %d)", sk->name,
                        other->pos.line);
        }
    }
    if (list && list->n_items == 0) {
        return fail(ctx, list, "streams must not be empty (omit it to take every stream)");
    }
    for (size_t i = 0; i < sk->n_streams; i++) {
        const mc__cfg_node_t *item = list->items[i];
        for (size_t j = 0; j < i; j++) {
            if (!strcmp(sk->streams[j], sk->streams[i])) {
                return fail(ctx, item, "stream '%.80s' is listed twice", sk->streams[i]);
            }
        }
        if (mc_config_stream(cfg, sk->streams[i])) {
            continue;
        }
        const char *hint = NULL;
        size_t best = 3;
        for (size_t k = 0; k < cfg->n_streams; k++) {
            size_t d = mc__cfg_edit_distance(sk->streams[i], cfg->streams[k].name, 2);
            if (d < best) {
                best = d;
                hint = cfg->streams[k].name;
            }
        }
        if (hint) {
            return fail(ctx, item, "sink '%s' refers to unknown stream '%.80s'; did you mean '%s'?",
                        sk->name, sk->streams[i], hint);
        }
        return fail(ctx, item, "sink '%s' refers to unknown stream '%.80s'", sk->name,
                    sk->streams[i]);
    }
    /* A sink that falls behind catches up by reading MongoDB again: not on an edge. */
    for (size_t k = 0; k < cfg->n_streams; k++) {
        const mc_stream_config_t *st = &cfg->streams[k];
        bool takes = sk->n_streams == 0;
        for (size_t i = 0; i < sk->n_streams && !takes; i++) {
            takes = !strcmp(sk->streams[i], st->name);
        }
        if (takes && mc_stream_config_is_edge(st)) {
            return fail(ctx, list ? list : name,
                        "sink '%s' takes edge stream '%s' (source: nats): sinks belong on the "
                        "leader, which reads MongoDB%s",
                        sk->name, st->name,
                        sk->n_streams == 0 ? " (list the sink's streams without it)" : "");
        }
    }
    return check_sink_initial(ctx, sk, found_node(&sink_table, found, "initial"));
}

static int parse_sinks(cfg_ctx_t *ctx, const opt_t *o, const mc__cfg_node_t *v, void *base,
                       const char *where)
{
    mc_config_t *cfg = base;
    if (is_null(v)) {
        return 0;
    }
    if (v->kind != MC__CFG_SEQ) {
        return fail_type(ctx, v, "a list of sinks");
    }
    if (v->n_items == 0) {
        return 0;
    }
    if (v->n_items > MC__CFG_MAX_SINKS) {
        return fail(ctx, v->items[MC__CFG_MAX_SINKS], "at most %d sinks are allowed",
                    MC__CFG_MAX_SINKS);
    }
    cfg->sinks = bson_malloc0(v->n_items * sizeof(*cfg->sinks));
    for (size_t i = 0; i < v->n_items; i++) {
        const mc__cfg_node_t *item = v->items[i];
        mc_sink_config_t *sk = &cfg->sinks[i];
        char sub[40];
        /* Counted as it goes so that check_sink sees only earlier sinks as "others". */
        cfg->n_sinks = i + 1;
        sk->pos.line = item->line;
        sk->pos.col = item->col;
        sk->options = bson_new();
        snprintf(sub, sizeof(sub), "sinks[%zu]", i);
        if (apply_defaults(ctx, &sink_table, sk) != 0 ||
            parse_table(ctx, &sink_table, item, sk, sub) != 0) {
            return -1;
        }
    }
    return 0;
}

static int check_jwt(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                     const mc__cfg_node_t *const *found);

static const opt_t jwt_opts[] = {
    {.name = "algorithm",
     .type = OPT_ENUM_STRING,
     .offset = offsetof(mc_config_t, auth.algorithm),
     .required = true,
     .choices = algorithm_names,
     .doc = "the only algorithm accepted (pinned): HS256 | RS256 | ES256"},
    {.name = "secret",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.secret),
     .min = 1,
     .doc = "HS256 shared secret"},
    {.name = "public_key_file",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.public_key_file),
     .min = 1,
     .doc = "RS256/ES256 PEM public key file"},
    {.name = "identity_claim",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.identity_claim),
     .def_str = "sub",
     .min = 1,
     .doc = "claim compared with an event's recipient"},
    {.name = "admin_role",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.admin_role),
     .min = 1,
     .doc = "a token whose roles hold this sees every event"},
    {.name = "issuer",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.issuer),
     .min = 1,
     .doc = "required iss claim"},
    {.name = "audience",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, auth.audience),
     .min = 1,
     .doc = "required aud claim"},
};
static const opt_table_t jwt_table = {jwt_opts, N_OPTS(jwt_opts), "", check_jwt, NULL};

static int check_jwt(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                     const mc__cfg_node_t *const *found)
{
    mc_config_t *cfg = base;
    const mc__cfg_node_t *secret = found_node(&jwt_table, found, "secret");
    const mc__cfg_node_t *key_file = found_node(&jwt_table, found, "public_key_file");
    bool hmac = !strcmp(cfg->auth.algorithm, "HS256");

    if (secret && key_file) {
        const mc__cfg_node_t *later =
            (key_file->line > secret->line ||
             (key_file->line == secret->line && key_file->col > secret->col))
                ? key_file
                : secret;
        return fail(ctx, later, "secret and public_key_file are mutually exclusive");
    }
    if (hmac && !secret) {
        return fail(ctx, key_file ? key_file : map, "algorithm HS256 requires secret");
    }
    if (!hmac && !key_file) {
        return fail(ctx, secret ? secret : map, "algorithm %s requires public_key_file",
                    cfg->auth.algorithm);
    }
    return 0;
}

static int check_auth(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                      const mc__cfg_node_t *const *found)
{
    ((mc_config_t *)base)->auth.enabled = true;
    return 0;
}

static const opt_t auth_opts[] = {
    {.name = "jwt",
     .type = OPT_SECTION,
     .section = &jwt_table,
     .required = true,
     .doc = "JSON Web Token verification"},
};
static const opt_table_t auth_table = {auth_opts, N_OPTS(auth_opts), "", check_auth, NULL};

static const opt_t mongodb_opts[] = {
    {.name = "uri",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, mongodb_uri),
     .min = 1,
     .validate = validate_uri,
     .doc = "connection string; default $MONGODB_URI, else " DEFAULT_MONGODB_URI},
};
static const opt_table_t mongodb_table = {mongodb_opts, N_OPTS(mongodb_opts), "", NULL, NULL};

static const opt_t checkpoint_opts[] = {
    {.name = "store",
     .type = OPT_ENUM,
     .offset = offsetof(mc_config_t, checkpoint.store),
     .def_num = MC_CHECKPOINT_FILE,
     .choices = store_names,
     .doc = "where resume positions are kept: file | mongodb"},
    {.name = "path",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, checkpoint.path),
     .def_str = "./data/checkpoints",
     .min = 1,
     .max = 4096,
     .doc = "file store: directory, one file per stream"},
    {.name = "db",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, checkpoint.db),
     .def_str = "mongocast",
     .min = 1,
     .validate = validate_db_name,
     .doc = "mongodb store: database"},
    {.name = "collection",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, checkpoint.collection),
     .def_str = "checkpoints",
     .min = 1,
     .validate = validate_collection_name,
     .doc = "mongodb store: collection"},
    {.name = "interval_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, checkpoint.interval_ms),
     .def_num = 1000,
     .min = 10,
     .max = 600000,
     .doc = "how often positions are written"},
};
static const opt_table_t checkpoint_table = {checkpoint_opts, N_OPTS(checkpoint_opts), "", NULL,
                                             NULL};

static int check_server_tls(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                            const mc__cfg_node_t *const *found)
{
    ((mc_config_t *)base)->server.tls.enabled = true;
    return 0;
}

static const opt_t server_tls_opts[] = {
    {.name = "cert_file",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, server.tls.cert_file),
     .required = true,
     .min = 1,
     .max = 4096,
     .doc = "PEM certificate chain of the server, leaf first; re-read on SIGHUP"},
    {.name = "key_file",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, server.tls.key_file),
     .required = true,
     .min = 1,
     .max = 4096,
     .doc = "PEM private key of that certificate (unencrypted); re-read on SIGHUP"},
    {.name = "client_ca_file",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, server.tls.client_ca_file),
     .min = 1,
     .max = 4096,
     .doc = "PEM CA certificates: when set, every client must present a certificate they signed"},
    {.name = "min_version",
     .type = OPT_ENUM_STRING,
     .offset = offsetof(mc_config_t, server.tls.min_version),
     .def_str = "1.2",
     .choices = tls_version_names,
     .doc = "1.2 | 1.3: the oldest TLS version accepted"},
};
static const opt_table_t server_tls_table = {server_tls_opts, N_OPTS(server_tls_opts), "",
                                             check_server_tls, NULL};

static const opt_t server_opts[] = {
    {.name = "listen",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, server.listen),
     .def_str = "127.0.0.1:8080",
     .min = 1,
     .max = 300,
     .validate = validate_listen,
     .doc = "HOST:PORT of the HTTP/WebSocket/SSE server; port 0 picks a free port"},
    {.name = "allowed_origins",
     .type = OPT_STRING_LIST,
     .offset = offsetof(mc_config_t, server.allowed_origins),
     .count_offset = offsetof(mc_config_t, server.n_allowed_origins),
     .doc = "WebSocket Origin allowlist; a request without Origin is allowed"},
    {.name = "max_connections",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_connections),
     .def_num = 10000,
     .min = 1,
     .max = 1000000,
     .doc = "simultaneous clients; more get 503"},
    {.name = "max_send_queue_bytes",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_send_queue_bytes),
     .def_num = 1048576,
     .min = 4096,
     .max = 1073741824,
     .doc = "per-client backlog before a slow consumer is cut"},
    {.name = "max_frame_bytes",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_frame_bytes),
     .def_num = 65536,
     .min = 1024,
     .max = 16777216,
     .doc = "largest incoming WebSocket message"},
    {.name = "max_message_bytes",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_message_bytes),
     .def_num = 16777216,
     .min = 4096,
     .max = 268435456,
     .doc = "largest message sent; a bigger event becomes an oversize notice"},
    {.name = "filter_budget_us",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.filter_budget_us),
     .def_num = 2000,
     .min = 100,
     .max = 1000000,
     .doc = "CPU time a subscriber's filter may take per event before it is closed"},
    {.name = "max_connections_per_address",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_connections_per_address),
     .def_num = 0,
     .min = 0,
     .max = 1000000,
     .doc = "connections one client address may hold; 0: no limit"},
    {.name = "max_snapshot_documents",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_snapshot_documents),
     .def_num = 100000,
     .min = 0,
     .max = 100000000,
     .doc = "documents one ?snapshot=true subscription may send; 0: snapshots refused"},
    {.name = "snapshot_workers",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.snapshot_workers),
     .def_num = 2,
     .min = 1,
     .max = 64,
     .doc = "threads (and MongoDB connections) that read snapshots"},
    {.name = "threads",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.threads),
     .def_num = 0,
     .min = 1,
     .max = 64,
     .doc = "threads that make the socket sends of the fan-out; default: the online cores"},
    {.name = "max_catchup_events",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_catchup_events),
     .def_num = 100000,
     .min = 0,
     .max = 100000000,
     .doc = "stream events one client catch-up (a resume older than the history) may read; 0: "
            "no catch-up, such a resume gets a reset"},
    {.name = "max_catchups",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.max_catchups),
     .def_num = 64,
     .min = 1,
     .max = 100000,
     .doc = "client catch-ups running on the snapshot workers or waiting for one; beyond: reset"},
    {.name = "catchup_timeout_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, server.catchup_timeout_ms),
     .def_num = 30000,
     .min = 100,
     .max = 3600000,
     .doc = "time a client catch-up may take to join the live stream; beyond: reset"},
    {.name = "io",
     .type = OPT_ENUM_STRING,
     .offset = offsetof(mc_config_t, server.io),
     .def_str = "auto",
     .choices = server_io_names,
     .doc = "auto | uring | writev: how sockets are written (io_uring batches, or writev)"},
    {.name = "tls",
     .type = OPT_SECTION,
     .section = &server_tls_table,
     .doc = "TLS on the listener (https://, wss://); omit for plain TCP"},
};
static const opt_table_t server_table = {server_opts, N_OPTS(server_opts), "", NULL, NULL};


static int check_lease(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                       const mc__cfg_node_t *const *found);

static const opt_t lease_opts[] = {
    {.name = "enabled",
     .type = OPT_BOOL,
     .offset = offsetof(mc_config_t, lease.enabled),
     .def_num = 0,
     .doc = "one node per stream (the lease holder) feeds the sinks; needs checkpoint.store: "
            "mongodb"},
    {.name = "db",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, lease.db),
     .def_str = "mongocast",
     .min = 1,
     .validate = validate_db_name,
     .doc = "database of the lease documents"},
    {.name = "collection",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, lease.collection),
     .def_str = "leases",
     .min = 1,
     .validate = validate_collection_name,
     .doc = "collection of the lease documents (one per stream, _id: the stream's name)"},
    {.name = "ttl_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, lease.ttl_ms),
     .def_num = 10000,
     .min = 300,
     .max = 600000,
     .doc = "how long a lease lasts without renewal; another node takes over after it"},
    {.name = "renew_ms",
     .type = OPT_UINT32,
     .offset = offsetof(mc_config_t, lease.renew_ms),
     .def_num = 0,
     .min = 0,
     .max = 200000,
     .doc = "how often the holder renews and the others look; 0: ttl_ms / 4; at most ttl_ms / 3"},
    {.name = "node_id",
     .type = OPT_STRING,
     .offset = offsetof(mc_config_t, lease.node_id),
     .min = 1,
     .max = 200,
     .doc = "this node's name in the lease documents; default <hostname>:<pid>"},
};
static const opt_table_t lease_table = {lease_opts, N_OPTS(lease_opts), "", check_lease, NULL};

static int check_lease(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                       const mc__cfg_node_t *const *found)
{
    mc_config_t *cfg = base;
    if (cfg->lease.renew_ms == 0) {
        cfg->lease.renew_ms = cfg->lease.ttl_ms / 4;
    }
    if (cfg->lease.renew_ms > cfg->lease.ttl_ms / 3) {
        return fail(ctx, found[4] ? found[4] : map,
                    "lease.renew_ms (%u) must be at most a third of lease.ttl_ms (%u): the "
                    "holder must be able to miss a renewal and still renew before it stops "
                    "publishing",
                    cfg->lease.renew_ms, cfg->lease.ttl_ms);
    }
    return 0;
}

static int check_root(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                      const mc__cfg_node_t *const *found);

static const opt_t root_opts[] = {
    {.name = "mongodb",
     .type = OPT_SECTION,
     .section = &mongodb_table,
     .doc = "the MongoDB deployment to watch"},
    {.name = "checkpoint",
     .type = OPT_SECTION,
     .section = &checkpoint_table,
     .doc = "where resume positions are stored"},
    {.name = "server",
     .type = OPT_SECTION,
     .section = &server_table,
     .doc = "the HTTP/WebSocket/SSE server"},
    {.name = "auth",
     .type = OPT_SECTION,
     .section = &auth_table,
     .doc = "subscriber authentication; omit for none"},
    {.name = "log_level",
     .type = OPT_ENUM_STRING,
     .offset = offsetof(mc_config_t, log_level),
     .def_str = "info",
     .choices = log_level_names,
     .doc = "error | warn | info | debug"},
    {.name = "streams",
     .type = OPT_CUSTOM,
     .parse = parse_streams,
     .section = &stream_table,
     .required = true,
     .doc = "the change streams, by name"},
    {.name = "sinks",
     .type = OPT_CUSTOM,
     .parse = parse_sinks,
     .section = &sink_table,
     .doc = "where events go besides WebSocket/SSE subscribers"},
    {.name = "lease",
     .type = OPT_SECTION,
     .section = &lease_table,
     .doc = "several nodes on one config: one lease holder per stream feeds the sinks"},
};
static const opt_table_t root_table = {root_opts, N_OPTS(root_opts), "", check_root, NULL};

static int check_root(cfg_ctx_t *ctx, const mc__cfg_node_t *map, void *base,
                      const mc__cfg_node_t *const *found)
{
    mc_config_t *cfg = base;
    if (!cfg->mongodb_uri) {
        /* The documented default is ${MONGODB_URI:-mongodb://127.0.0.1:27017/?replicaSet=rs0}. */
        const char *env = getenv("MONGODB_URI");
        const char *uri = env && *env ? env : DEFAULT_MONGODB_URI;
        if (strncmp(uri, "mongodb://", 10) && strncmp(uri, "mongodb+srv://", 14)) {
            return fail(ctx, map, "MONGODB_URI must start with mongodb:// or mongodb+srv://");
        }
        if (set_string(ctx, &cfg->mongodb_uri, uri) != 0) {
            return -1;
        }
    }
    if (cfg->lease.enabled && cfg->checkpoint.store != MC_CHECKPOINT_MONGODB) {
        return fail(ctx, found[7] ? found[7] : map,
                    "lease.enabled needs checkpoint.store: mongodb (the node that takes a lease "
                    "over resumes the sinks from the positions the previous holder stored)");
    }
    for (size_t i = 0; cfg->lease.enabled && i < cfg->n_sinks; i++) {
        if (cfg->sinks[i].initial == MC_SINK_INITIAL_SNAPSHOT) {
            /* A takeover in the middle of a copy would resume a copy position through the
             * catch-up path, which cannot; not supported until the copy runs on the holder. */
            return fail(ctx, found[7] ? found[7] : map,
                        "sink '%s': initial: snapshot is not supported together with "
                        "lease.enabled yet (a takeover during the copy cannot resume it); copy "
                        "with a single node first, then enable the lease",
                        cfg->sinks[i].name);
        }
    }
    return 0;
}

/* ---- public API ------------------------------------------------------------------------- */

static void each_option(const opt_table_t *t, const char *prefix,
                        void (*fn)(const char *dotted_name, void *ud), void *ud)
{
    for (size_t i = 0; i < t->n_opts; i++) {
        const opt_t *o = &t->opts[i];
        char name[160];
        snprintf(name, sizeof(name), "%s%s%s", prefix, *prefix ? "." : "", o->name);
        fn(name, ud);
        if (o->section) {
            char sub[170];
            snprintf(sub, sizeof(sub), "%s%s", name, o->section->item_suffix);
            each_option(o->section, sub, fn, ud);
        }
    }
}

void mc__cfg_each_option(void (*fn)(const char *dotted_name, void *ud), void *ud)
{
    each_option(&root_table, "", fn, ud);
}

mc_config_t *mc_config_load_string(const char *yaml, size_t len, const char *name, mc_error_t *err)
{
    mc__cfg_node_t *root = NULL;
    cfg_ctx_t ctx = {name ? name : "<string>", err, NULL};

    mc_error_clear(err);
    if (!yaml && len) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "%s: no input", ctx.name);
        return NULL;
    }
    if (mc__cfg_parse(yaml ? yaml : "", len, ctx.name, &root, err) != 0) {
        return NULL;
    }
    mc_config_t *cfg = bson_malloc0(sizeof(*cfg));
    ctx.config = cfg;
    cfg->path = bson_strdup(ctx.name);
    if (root->kind != MC__CFG_MAP) {
        fail_type(&ctx, root, "a mapping at the top level");
        goto fail;
    }
    if (apply_defaults(&ctx, &root_table, cfg) != 0 ||
        parse_table(&ctx, &root_table, root, cfg, "") != 0) {
        goto fail;
    }
    mc__cfg_node_free(root);
    return cfg;
fail:
    mc__cfg_node_free(root);
    mc_config_destroy(cfg);
    return NULL;
}

/* What a path that is not a regular file is, for the error message. */
static const char *file_kind(mode_t mode)
{
    if (S_ISDIR(mode)) {
        return "a directory";
    }
    if (S_ISFIFO(mode)) {
        return "a FIFO (named pipe)";
    }
    if (S_ISCHR(mode)) {
        return "a character device";
    }
    if (S_ISBLK(mode)) {
        return "a block device";
    }
    if (S_ISSOCK(mode)) {
        return "a socket";
    }
    return "not a regular file";
}

mc_config_t *mc_config_load_file(const char *path, mc_error_t *err)
{
    mc_error_clear(err);
    if (!path) {
        mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "no configuration file given");
        return NULL;
    }
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (forever, in
     * `check -c FIFO`); the file type is then checked on what was opened, not on the path. A
     * configuration is read again on reload, so only a regular file will do. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    char *buf = NULL;
    size_t len = 0;
    int e = 0;
    if (fd < 0) {
        e = errno;
        goto io_error;
    }
    if (fstat(fd, &st) != 0) {
        e = errno;
        close(fd);
        goto io_error;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                     "%s: is %s; the configuration must be a regular file", path,
                     file_kind(st.st_mode));
        return NULL;
    }
    if (st.st_size > (off_t)MC__CFG_MAX_BYTES) {
        close(fd);
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                     "%s:1:1: configuration is larger than the %u MiB limit", path,
                     MC__CFG_MAX_BYTES / (1024u * 1024u));
        return NULL;
    }
    /* Read one byte past the limit: the file may have grown since fstat. */
    buf = bson_malloc(MC__CFG_MAX_BYTES + 1);
    while (len < MC__CFG_MAX_BYTES + 1) {
        ssize_t n = read(fd, buf + len, MC__CFG_MAX_BYTES + 1 - len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            e = errno;
            close(fd);
            bson_free(buf);
            goto io_error;
        }
        if (n == 0) {
            break;
        }
        len += (size_t)n;
    }
    close(fd);
    mc_config_t *cfg = mc_config_load_string(buf, len, path, err);
    bson_free(buf);
    return cfg;

io_error : {
    char msg[128];
    if (strerror_r(e, msg, sizeof(msg)) != 0) {
        snprintf(msg, sizeof(msg), "error %d", e);
    }
    mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", path, msg);
    return NULL;
}
}

static void free_list(char **list, size_t n)
{
    if (list) {
        for (size_t i = 0; i < n; i++) {
            bson_free(list[i]);
        }
        bson_free(list);
    }
}

static void free_lookup(mc_recipient_lookup_t *l)
{
    if (l) {
        bson_free(l->db);
        bson_free(l->collection);
        bson_free(l->field);
        bson_free(l->recipient);
        bson_free(l);
    }
}

static void free_summary(mc_summary_config_t *sc)
{
    for (size_t i = 0; i < sc->n_rules; i++) {
        bson_destroy(sc->rules[i].when);
        bson_free(sc->rules[i].text);
    }
    bson_free(sc->rules);
    sc->rules = NULL;
    sc->n_rules = 0;
}

static void free_rule(mc_recipient_rule_t *r)
{
    bson_free(r->collection);
    bson_free(r->path);
    free_lookup(r->lookup);
    free_summary(&r->summary);
}

void mc_config_destroy(mc_config_t *config)
{
    if (!config) {
        return;
    }
    bson_free(config->path);
    bson_free(config->mongodb_uri);
    bson_free(config->checkpoint.path);
    bson_free(config->checkpoint.db);
    bson_free(config->checkpoint.collection);
    bson_free(config->lease.db);
    bson_free(config->lease.collection);
    bson_free(config->lease.node_id);
    bson_free(config->server.listen);
    free_list(config->server.allowed_origins, config->server.n_allowed_origins);
    bson_free(config->server.io);
    bson_free(config->server.tls.cert_file);
    bson_free(config->server.tls.key_file);
    bson_free(config->server.tls.client_ca_file);
    bson_free(config->server.tls.min_version);
    bson_free(config->auth.algorithm);
    bson_free(config->auth.secret);
    bson_free(config->auth.public_key_file);
    bson_free(config->auth.identity_claim);
    bson_free(config->auth.admin_role);
    bson_free(config->auth.issuer);
    bson_free(config->auth.audience);
    bson_free(config->log_level);
    for (size_t i = 0; i < config->n_streams; i++) {
        mc_stream_config_t *s = &config->streams[i];
        bson_free(s->name);
        bson_free(s->db);
        bson_free(s->collection);
        bson_destroy(s->pipeline);
        bson_free(s->recipient);
        free_lookup(s->lookup);
        for (size_t k = 0; k < s->n_by_collection; k++) {
            free_rule(&s->by_collection[k]);
        }
        bson_free(s->by_collection);
        if (s->recipient_default) {
            free_rule(s->recipient_default);
            bson_free(s->recipient_default);
        }
        free_summary(&s->summary);
        bson_free(s->source_nats.url);
        bson_free(s->source_nats.stream);
        bson_free(s->source_nats.subject);
    }
    bson_free(config->streams);
    for (size_t i = 0; i < config->n_sinks; i++) {
        mc_sink_config_t *sk = &config->sinks[i];
        bson_free(sk->name);
        bson_free(sk->type);
        free_list(sk->streams, sk->n_streams);
        bson_destroy(sk->options);
        bson_free(sk->dead_letter_file);
        bson_free(sk->dead_letter_db);
        bson_free(sk->dead_letter_collection);
        bson_free(sk->dead_letter_uri);
    }
    bson_free(config->sinks);
    bson_free(config);
}

const mc_stream_config_t *mc_config_stream(const mc_config_t *config, const char *name)
{
    if (!config || !name) {
        return NULL;
    }
    for (size_t i = 0; i < config->n_streams; i++) {
        if (config->streams[i].name && !strcmp(config->streams[i].name, name)) {
            return &config->streams[i];
        }
    }
    return NULL;
}

bool mc_stream_config_has_recipient(const mc_stream_config_t *stream)
{
    return stream &&
           (stream->recipient || stream->n_by_collection > 0 || stream->recipient_default);
}

const mc_recipient_rule_t *mc_stream_config_rule(const mc_stream_config_t *stream, const char *db,
                                                 const char *coll)
{
    if (!stream || (stream->n_by_collection == 0 && !stream->recipient_default)) {
        return NULL;
    }
    if (coll) {
        size_t db_len = db ? strlen(db) : 0;
        for (size_t i = 0; i < stream->n_by_collection; i++) {
            const char *key = stream->by_collection[i].collection;
            if (stream->db) {
                if (!strcmp(key, coll)) {
                    return &stream->by_collection[i];
                }
            } else if (db && !strncmp(key, db, db_len) && key[db_len] == '.' &&
                       !strcmp(key + db_len + 1, coll)) {
                return &stream->by_collection[i];
            }
        }
    }
    return stream->recipient_default;
}
