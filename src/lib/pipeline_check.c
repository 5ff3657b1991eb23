/*
 * pipeline_check.c: what the loader and `check` verify about a stream's pipeline beyond its
 * YAML shape:
 *   - stage order: the stages before the first stage that uses {$var: name} run on the
 *     server; that stage and every one after it run in the daemon, per subscriber, in the
 *     order written (mc_pipeline_split()). Each of those must be a stage the daemon runs
 *     (mongocast/pipeline.h), $var only in $match stages and well formed, and each must
 *     compile; otherwise the config is refused with the reason (never reordered);
 *   - the recipient lint (mc_stream_config_lint()): warnings for server-side stages that
 *     remove or rewrite a field a recipient is read from (routing happens on what the server
 *     returns, before any per-subscriber stage).
 *
 * Thread: pure functions over a config; any thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_internal.h"
#include "mongocast/engine.h"
#include "mongocast/pipeline.h"

#define MAX_LOCAL_STAGES 32
#define MAX_WALK_DEPTH 100
#define MAX_VARS 64

/* Stages mongocast/pipeline.h runs: the only ones allowed after a $var stage. */
static const char *const daemon_stages[] = {"$match", "$project",     "$addFields",   "$set",
                                            "$unset", "$replaceRoot", "$replaceWith", NULL};

static bool is_daemon_stage(const char *op)
{
    for (size_t i = 0; daemon_stages[i]; i++) {
        if (strcmp(daemon_stages[i], op) == 0) {
            return true;
        }
    }
    return false;
}

static int fail_at(mc_error_t *err, size_t *bad, size_t stage, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static int fail_at(mc_error_t *err, size_t *bad, size_t stage, const char *fmt, ...)
{
    char msg[420];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (bad) {
        *bad = stage;
    }
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "%s", msg);
}

/* Walks a stage body: collects the names of its {$var: name} values into `vars` (a document
 * of name: null) and checks their form. Returns 0, or -1 with a message in msg. */
static int walk_vars(bson_iter_t *it, bool is_doc, int depth, bson_t *vars, bool *has_var,
                     char *msg, size_t cap)
{
    if (depth > MAX_WALK_DEPTH) {
        snprintf(msg, cap, "nested deeper than %d levels", MAX_WALK_DEPTH);
        return -1;
    }
    bool first = true;
    while (bson_iter_next(it)) {
        if (is_doc && strcmp(bson_iter_key(it), "$var") == 0) {
            bson_iter_t rest = *it;
            if (!first || bson_iter_next(&rest)) {
                snprintf(msg, cap, "$var must be the only field of its document");
                return -1;
            }
            uint32_t n = 0;
            const char *name = BSON_ITER_HOLDS_UTF8(it) ? bson_iter_utf8(it, &n) : NULL;
            if (!name || n == 0 || memchr(name, '\0', n)) {
                snprintf(msg, cap, "$var needs a variable name (a non-empty string)");
                return -1;
            }
            *has_var = true;
            bson_iter_t dup;
            if (!bson_iter_init_find(&dup, vars, name)) {
                if (bson_count_keys(vars) >= MAX_VARS) {
                    snprintf(msg, cap, "more than %d different variables", MAX_VARS);
                    return -1;
                }
                bson_append_null(vars, name, (int)n);
            }
        }
        first = false;
        if (BSON_ITER_HOLDS_DOCUMENT(it) || BSON_ITER_HOLDS_ARRAY(it)) {
            bson_iter_t child;
            if (!bson_iter_recurse(it, &child)) {
                snprintf(msg, cap, "malformed BSON");
                return -1;
            }
            if (walk_vars(&child, BSON_ITER_HOLDS_DOCUMENT(it), depth + 1, vars, has_var, msg,
                          cap) != 0) {
                return -1;
            }
        }
    }
    return 0;
}

/* The stage document at `it` (a pipeline element) and its operator name. */
static const char *stage_op(const bson_iter_t *it, bson_iter_t *body)
{
    bson_iter_t stage;
    if (!BSON_ITER_HOLDS_DOCUMENT(it) || !bson_iter_recurse(it, &stage) ||
        !bson_iter_next(&stage)) {
        return NULL;
    }
    *body = stage;
    return bson_iter_key(&stage);
}

int mc__stream_pipeline_check(const bson_t *pipeline, size_t *bad, mc_error_t *err)
{
    bson_t server, local;
    mc_error_t perr = {0};
    int rc = mc_pipeline_split(pipeline, &server, &local, &perr);
    uint32_t n_server = bson_count_keys(&server);
    uint32_t n_local = bson_count_keys(&local);
    bson_destroy(&server);
    bson_destroy(&local);
    if (rc != 0) {
        return fail_at(err, bad, 0, "%s", perr.message);
    }
    if (!pipeline || n_local == 0) {
        return 0;
    }
    if (n_local > MAX_LOCAL_STAGES) {
        return fail_at(err, bad, n_server + MAX_LOCAL_STAGES,
                       "at most %d stages may follow a $var stage (they run per subscriber)",
                       MAX_LOCAL_STAGES);
    }
    /* Pass 1: forms, and the variable names (bound to null to compile each stage). */
    bson_t vars = BSON_INITIALIZER;
    bson_iter_t it;
    bson_iter_init(&it, pipeline);
    size_t i = 0;
    for (; bson_iter_next(&it); i++) {
        bson_iter_t body;
        const char *op = stage_op(&it, &body);
        if (!op || i < n_server) {
            continue;
        }
        char msg[200] = "";
        bool has_var = false;
        if (BSON_ITER_HOLDS_DOCUMENT(&body) || BSON_ITER_HOLDS_ARRAY(&body)) {
            bson_iter_t child;
            bson_iter_recurse(&body, &child);
            if (walk_vars(&child, BSON_ITER_HOLDS_DOCUMENT(&body), 1, &vars, &has_var, msg,
                          sizeof(msg)) != 0) {
                bson_destroy(&vars);
                return fail_at(err, bad, i, "%s: %s", op, msg);
            }
        }
        if (has_var && strcmp(op, "$match") != 0) {
            bson_destroy(&vars);
            return fail_at(err, bad, i, "%s: only $match stages may use $var", op);
        }
        if (!is_daemon_stage(op)) {
            bson_destroy(&vars);
            return fail_at(err, bad, i,
                           "%s cannot follow a $var stage: the stages from the first $var stage "
                           "on run in the daemon, per subscriber, in the order written, and the "
                           "daemon runs only $match, $project, $addFields, $set, $unset, "
                           "$replaceRoot and $replaceWith. Move %s before the $var stage (it "
                           "then runs on the server) or remove it",
                           op, op);
        }
    }
    /* Pass 2: each stage compiles as the daemon will run it. */
    mc_pipeline_opts_t popts = {.vars = &vars};
    bson_iter_init(&it, pipeline);
    for (i = 0; bson_iter_next(&it); i++) {
        if (i < n_server) {
            continue;
        }
        bson_iter_t body;
        const char *op = stage_op(&it, &body);
        const uint8_t *data;
        uint32_t len;
        bson_iter_document(&it, &len, &data);
        bson_t one = BSON_INITIALIZER, stage;
        if (bson_init_static(&stage, data, len)) {
            BSON_APPEND_DOCUMENT(&one, "0", &stage);
        }
        mc_error_t cerr = {0};
        mc_pipeline_t *p = mc_pipeline_new(&one, &popts, &cerr);
        bson_destroy(&one);
        if (!p) {
            bson_destroy(&vars);
            return fail_at(err, bad, i, "%s (runs per subscriber, after a $var stage): %s",
                           op ? op : "stage", cerr.message);
        }
        mc_pipeline_destroy(p);
    }
    bson_destroy(&vars);
    return 0;
}

int mc_stream_config_check_pipeline(const mc_stream_config_t *stream, mc_error_t *err)
{
    if (!stream) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "no stream");
    }
    size_t bad = 0;
    mc_error_t perr = {0};
    if (mc__stream_pipeline_check(stream->pipeline, &bad, &perr) != 0) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "stream %s: pipeline stage %zu: %s", stream->name ? stream->name : "?",
                            bad, perr.message);
    }
    return 0;
}

/* ---- Recipient lint ----------------------------------------------------------------------- */

/* `outer` is `inner` or one of its parents. */
static bool path_covers(const char *outer, const char *inner)
{
    size_t n = strlen(outer);
    return strncmp(outer, inner, n) == 0 && (inner[n] == '\0' || inner[n] == '.');
}

/* How a $project or $addFields names a field. */
typedef enum leaf_kind { LEAF_INCLUDE, LEAF_EXCLUDE, LEAF_COMPUTED } leaf_kind_t;

static leaf_kind_t leaf_kind(const bson_iter_t *it)
{
    switch (bson_iter_type(it)) {
    case BSON_TYPE_BOOL: return bson_iter_bool(it) ? LEAF_INCLUDE : LEAF_EXCLUDE;
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
    case BSON_TYPE_DOUBLE:
    case BSON_TYPE_DECIMAL128: return bson_iter_as_bool(it) ? LEAF_INCLUDE : LEAF_EXCLUDE;
    default: return LEAF_COMPUTED;
    }
}

/* A sub-document that is an expression ({$concat: ...}) rather than nested field names. */
static bool is_expression_doc(const bson_iter_t *it)
{
    bson_iter_t child;
    return BSON_ITER_HOLDS_DOCUMENT(it) && bson_iter_recurse(it, &child) &&
           bson_iter_next(&child) && bson_iter_key(&child)[0] == '$';
}

typedef struct proj_scan {
    const char *path; /* the recipient path */
    bool exclusion;   /* some non-_id leaf excludes */
    bool includes;    /* an inclusion leaf covers the path */
    bool partial;     /* an inclusion leaf lies inside the path */
    bool computed;    /* a computed leaf covers the path or lies inside it */
    bool excludes;    /* an exclusion leaf covers the path or lies inside it */
    int depth;
} proj_scan_t;

static void scan_projection(proj_scan_t *ps, bson_iter_t *it, const char *prefix)
{
    if (++ps->depth > MAX_WALK_DEPTH) {
        ps->depth--;
        return;
    }
    while (bson_iter_next(it)) {
        char key[1024];
        int n = snprintf(key, sizeof(key), "%s%s%s", prefix, *prefix ? "." : "", bson_iter_key(it));
        if (n < 0 || (size_t)n >= sizeof(key)) {
            continue;
        }
        if (BSON_ITER_HOLDS_DOCUMENT(it) && !is_expression_doc(it)) {
            bson_iter_t child;
            if (bson_iter_recurse(it, &child)) {
                scan_projection(ps, &child, key);
            }
            continue;
        }
        leaf_kind_t k = leaf_kind(it);
        bool is_id = strcmp(key, "_id") == 0;
        bool covers = path_covers(key, ps->path);
        bool inside = path_covers(ps->path, key) && !covers;
        if (k == LEAF_EXCLUDE && !is_id) {
            ps->exclusion = true;
        }
        if (!covers && !inside) {
            continue;
        }
        switch (k) {
        case LEAF_INCLUDE:
            if (covers) {
                ps->includes = true;
            } else {
                ps->partial = true;
            }
            break;
        case LEAF_EXCLUDE: ps->excludes = true; break;
        case LEAF_COMPUTED: ps->computed = true; break;
        }
    }
    ps->depth--;
}

/* Why `op` (its body at `body`) removes or rewrites `path`, or NULL when it leaves it alone. */
static const char *stage_effect(const char *op, const bson_iter_t *body, const char *path,
                                char *buf, size_t cap)
{
    if (strcmp(op, "$project") == 0 && BSON_ITER_HOLDS_DOCUMENT(body)) {
        proj_scan_t ps = {.path = path};
        bson_iter_t child;
        bson_iter_recurse(body, &child);
        scan_projection(&ps, &child, "");
        if (ps.computed) {
            snprintf(buf, cap, "computes a new value for %s", path);
        } else if (ps.excludes) {
            snprintf(buf, cap, "excludes %s", path);
        } else if (!ps.exclusion && ps.partial && !ps.includes) {
            snprintf(buf, cap, "keeps only part of %s", path);
        } else if (!ps.exclusion && !ps.includes) {
            snprintf(buf, cap, "does not include %s", path);
        } else {
            return NULL;
        }
        return buf;
    }
    if (strcmp(op, "$unset") == 0) {
        bson_iter_t one = *body, arr;
        bool array = BSON_ITER_HOLDS_ARRAY(body) && bson_iter_recurse(body, &arr);
        bson_iter_t *cur = array ? &arr : &one;
        bool more = array ? bson_iter_next(cur) : true;
        while (more) {
            if (BSON_ITER_HOLDS_UTF8(cur)) {
                const char *k = bson_iter_utf8(cur, NULL);
                if (path_covers(k, path) || path_covers(path, k)) {
                    snprintf(buf, cap, "removes %s", path);
                    return buf;
                }
            }
            more = array && bson_iter_next(cur);
        }
        return NULL;
    }
    if ((strcmp(op, "$set") == 0 || strcmp(op, "$addFields") == 0) &&
        BSON_ITER_HOLDS_DOCUMENT(body)) {
        proj_scan_t ps = {.path = path};
        bson_iter_t child;
        bson_iter_recurse(body, &child);
        scan_projection(&ps, &child, "");
        if (ps.computed || ps.includes || ps.partial || ps.excludes) {
            snprintf(buf, cap, "sets %s", path);
            return buf;
        }
        return NULL;
    }
    if (strcmp(op, "$replaceRoot") == 0 || strcmp(op, "$replaceWith") == 0) {
        snprintf(buf, cap,
                 "replaces the whole change event, so %s is whatever the new root "
                 "holds there",
                 path);
        return buf;
    }
    if (strcmp(op, "$redact") == 0) {
        snprintf(buf, cap, "may remove %s", path);
        return buf;
    }
    return NULL;
}

/* Every recipient path of the stream, in config order; returns how many (at most max). */
static size_t recipient_paths(const mc_stream_config_t *s, const char **out, size_t max)
{
    size_t n = 0;
    if (s->recipient && n < max) {
        out[n++] = s->recipient;
    }
    for (size_t i = 0; i < s->n_by_collection && n < max; i++) {
        out[n++] = s->by_collection[i].path;
    }
    if (s->recipient_default && s->recipient_default->path && n < max) {
        out[n++] = s->recipient_default->path;
    }
    return n;
}

size_t mc_stream_config_lint(const mc_stream_config_t *stream, mc_config_warn_fn fn, void *userdata)
{
    if (!stream || !stream->pipeline || !mc_stream_config_has_recipient(stream)) {
        return 0;
    }
    const char *paths[64];
    size_t n_paths = recipient_paths(stream, paths, 64);
    bson_t server, local;
    mc_error_t perr = {0};
    int rc = mc_pipeline_split(stream->pipeline, &server, &local, &perr);
    bson_destroy(&local);
    if (rc != 0) {
        bson_destroy(&server);
        return 0;
    }
    /* Routing reads the event the server returns: only the server-side stages matter (the
     * per-subscriber ones run after routing). */
    size_t warnings = 0;
    bson_iter_t it;
    bson_iter_init(&it, &server);
    for (size_t i = 0; bson_iter_next(&it); i++) {
        bson_iter_t body;
        const char *op = stage_op(&it, &body);
        if (!op) {
            continue;
        }
        for (size_t p = 0; p < n_paths; p++) {
            bool seen = false;
            for (size_t q = 0; q < p; q++) {
                seen |= strcmp(paths[q], paths[p]) == 0;
            }
            char what[300];
            if (seen || !stage_effect(op, &body, paths[p], what, sizeof(what))) {
                continue;
            }
            char msg[480];
            snprintf(msg, sizeof(msg),
                     "pipeline stage %zu (%s) %s, the path the recipient is read from: events "
                     "without it go to admins only. Keep the field, or route on a path the "
                     "stage leaves alone",
                     i, op, what);
            warnings++;
            if (fn) {
                fn(stream, i, op, msg, userdata);
            }
        }
    }
    bson_destroy(&server);
    return warnings;
}
