/*
 * pipeline_eval.c: per-document aggregation stages and projections over BSON documents
 * (mc_pipeline_* and mc_projection_* of mongocast/pipeline.h): $match, $project,
 * $addFields/$set, $unset, $replaceRoot, $replaceWith, and find-style projections.
 *
 * Threads: any. Compiled pipelines and projections are immutable; every application builds a
 * fresh output document.
 *
 * Design:
 *  - A pipeline keeps one private copy of its stages; projection trees, expressions (one
 *    program shared by every stage) and $match filters are compiled from it once.
 *  - Projections are trees of path components: inclusion or exclusion (mixing fails with
 *    31253/31254), _id included unless _id: 0, dotted paths and sub-documents, through arrays
 *    (inclusion drops non-document array elements, as MongoDB does), computed fields in
 *    inclusion projections appended after the included fields (as MongoDB does). $addFields
 *    is the same tree in "add" mode (a computed field replaces a field in place or is
 *    appended); $unset is an exclusion projection.
 *  - Applying a pipeline alternates between two scratch documents: $match stages filter the
 *    current document in place, reshaping stages write the other scratch document, and the
 *    last one becomes the output without a copy.
 *
 *  - Within a caller's budget (mc_pipeline_apply_budget(), a subscriber's CPU budget),
 *    $match stages are matched like mc_filter_match_budget(), and reshaping stages report
 *    every field and array element they visit and every expression node they evaluate to the
 *    same budget, so an expensive $project or $set stops like an expensive filter.
 *
 * Invariants: every document built here is finished (no open sub-document) before it is
 * returned; recursion follows the projection tree (bounded by the specification's depth),
 * never the data alone; the values computed into one output add up to at most max_value bytes.
 */
#include "mongocast/pipeline.h"

#include "bson_util.h"
#include "expr_private.h"

#include "mongocast/filter.h"

#include <stdlib.h>
#include <string.h>

#define MAX_SPEC_DEPTH 100
#define MAX_PATH_COMPONENTS 128

static int too_large(mc_error_t *err)
{
    return mc_error_set(err, MC_ELIMIT, MC_DOMAIN_MONGODB, 10334,
                        "the document built by the pipeline would exceed the maximum size");
}

static bool doc_find(const bson_value_t *doc, const char *key, bson_iter_t *it)
{
    if (!mc__bson_iter_init_safe(it, doc->value.v_doc.data, doc->value.v_doc.data_len)) {
        return false;
    }
    while (bson_iter_next(it)) {
        if (strcmp(bson_iter_key(it), key) == 0) {
            return true;
        }
    }
    return false;
}

/* Bytes a value adds to a document (close enough to bound output sizes). */
static size_t value_size(const bson_value_t *v)
{
    switch (v->value_type) {
    case BSON_TYPE_UTF8: return v->value.v_utf8.len + 5;
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: return v->value.v_doc.data_len;
    case BSON_TYPE_BINARY: return v->value.v_binary.data_len + 5;
    default: return 16;
    }
}

/* ---------------------------------------------------------------- projection trees */

typedef enum pkind { PK_INCLUDE, PK_EXCLUDE, PK_COMPUTED, PK_SUB } pkind_t;

typedef struct pnode pnode_t;
struct pnode {
    char *name;
    pkind_t kind;
    mc__xnode_t *expr; /* PK_COMPUTED, owned by the program */
    pnode_t **kids;
    size_t nkids, cap;
};

typedef enum pmode { PM_INCLUSION, PM_EXCLUSION, PM_ADD } pmode_t;

typedef struct projection {
    pnode_t root; /* PK_SUB */
    pmode_t mode;
    bool exclude_id; /* inclusion projections: _id: 0 */
    bool include_id; /* exclusion projections: _id kept unless _id: 0 */
} projection_t;

static void pnode_free_kids(pnode_t *n)
{
    for (size_t i = 0; i < n->nkids; i++) {
        pnode_free_kids(n->kids[i]);
        bson_free(n->kids[i]->name);
        bson_free(n->kids[i]);
    }
    bson_free(n->kids);
    n->kids = NULL;
    n->nkids = n->cap = 0;
}

static pnode_t *pnode_child(pnode_t *n, const char *name, size_t len)
{
    for (size_t i = 0; i < n->nkids; i++) {
        if (strlen(n->kids[i]->name) == len && memcmp(n->kids[i]->name, name, len) == 0) {
            return n->kids[i];
        }
    }
    return NULL;
}

static pnode_t *pnode_add(pnode_t *n, const char *name, size_t len, pkind_t kind)
{
    if (n->nkids == n->cap) {
        n->cap = n->cap ? n->cap * 2 : 4;
        n->kids = bson_realloc(n->kids, n->cap * sizeof(pnode_t *));
    }
    pnode_t *k = bson_malloc0(sizeof(*k));
    k->name = bson_strndup(name, len);
    k->kind = kind;
    n->kids[n->nkids++] = k;
    return k;
}

/* Inserts `path` (dotted) with leaf kind; fails with code 31250 on a path collision. */
static int proj_insert(mc__xprog_t *prog, pnode_t *root, const char *path, pkind_t kind,
                       const bson_value_t *expr, int spec_depth, mc_error_t *err)
{
    pnode_t *n = root;
    const char *p = path;
    int depth = 0;
    if (!*path) {
        return mc__expr_fail(err, 40352, "FieldPath cannot be constructed with empty string");
    }
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        if (len == 0) {
            return mc__expr_fail(err, 15998, "FieldPath field names may not be empty strings.");
        }
        if (p[0] == '$') {
            return mc__expr_fail(err, 16410, "FieldPath field names may not start with '$'.");
        }
        if (++depth > MAX_PATH_COMPONENTS) {
            return mc__expr_fail(err, 2, "projection path too long");
        }
        pnode_t *k = pnode_child(n, p, len);
        if (!dot) {
            if (k) {
                return mc__expr_fail(err, 31250, "Path collision at %s", path);
            }
            k = pnode_add(n, p, len, kind);
            return expr ? mc__expr_compile(prog, expr, spec_depth, &k->expr, err) : 0;
        }
        if (!k) {
            k = pnode_add(n, p, len, PK_SUB);
        } else if (k->kind != PK_SUB) {
            return mc__expr_fail(err, 31250, "Path collision at %s", path);
        }
        n = k;
        p = dot + 1;
    }
}

/* find's own projection operators ($slice, $elemMatch, $meta), or NULL. */
static const char *find_projection_operator(const bson_value_t *v)
{
    bson_iter_t it;
    if (!mc__bson_iter_init_safe(&it, v->value.v_doc.data, v->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return NULL;
    }
    const char *k = bson_iter_key(&it);
    if (strcmp(k, "$slice") == 0) {
        return "$slice";
    }
    if (strcmp(k, "$elemMatch") == 0) {
        return "$elemMatch";
    }
    if (strcmp(k, "$meta") == 0) {
        return "$meta";
    }
    return NULL;
}

/* Parses a $project/find projection (mode PM_INCLUSION/PM_EXCLUSION decided here) or an
 * $addFields spec (mode PM_ADD). `prefix` is the dotted path of a nested spec document. */
static int proj_parse_fields(mc__xprog_t *prog, projection_t *pr, const bson_value_t *spec,
                             const char *prefix, bool add, bool find, int depth, int *n_incl,
                             int *n_excl, mc_error_t *err)
{
    bson_iter_t it;
    if (depth > MAX_SPEC_DEPTH) {
        return mc__expr_fail(err, 2, "projection nested too deeply");
    }
    if (!mc__bson_iter_init_safe(&it, spec->value.v_doc.data, spec->value.v_doc.data_len)) {
        return mc__expr_fail(err, 2, "malformed projection");
    }
    while (bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        char *full = prefix ? bson_strdup_printf("%s.%s", prefix, key) : bson_strdup(key);
        int rc = 0;
        bool is_id = strcmp(full, "_id") == 0;
        if (key[0] == '$') {
            rc = find && (strcmp(key, "$slice") == 0 || strcmp(key, "$elemMatch") == 0)
                     ? mc__expr_fail(
                           err, 2, "projection operator %s is not supported by mongo-emulator", key)
                     : mc__expr_fail(err, 16410,
                                     "FieldPath field names may not start with '$'. "
                                     "Consider using $getField or $setField.");
        } else if (find && mc__expr_is_operator_doc(v) && find_projection_operator(v)) {
            rc = mc__expr_fail(err, 2, "projection operator %s is not supported by mongo-emulator",
                               find_projection_operator(v));
        } else if (add) {
            if (v->value_type == BSON_TYPE_DOCUMENT && !mc__expr_is_operator_doc(v) &&
                v->value.v_doc.data_len > 5) {
                rc =
                    proj_parse_fields(prog, pr, v, full, add, find, depth + 1, n_incl, n_excl, err);
            } else {
                rc = proj_insert(prog, &pr->root, full, PK_COMPUTED, v, depth + 1, err);
            }
        } else if (v->value_type == BSON_TYPE_DOCUMENT && !mc__expr_is_operator_doc(v)) {
            if (v->value.v_doc.data_len <= 5) {
                rc = mc__expr_fail(err, 51270,
                                   "An empty sub-projection is not a valid value. Found "
                                   "empty object at path");
            } else {
                rc =
                    proj_parse_fields(prog, pr, v, full, add, find, depth + 1, n_incl, n_excl, err);
            }
        } else if (v->value_type == BSON_TYPE_BOOL || mc__bson_is_number(v->value_type)) {
            bool incl = v->value_type == BSON_TYPE_BOOL ? v->value.v_bool
                                                        : mc__bson_value_as_double(v) != 0;
            if (is_id) {
                pr->exclude_id = !incl;
                pr->include_id = incl;
            } else {
                (*(incl ? n_incl : n_excl))++;
                rc = proj_insert(prog, &pr->root, full, incl ? PK_INCLUDE : PK_EXCLUDE, NULL, 0,
                                 err);
                if (rc == 0 && *n_incl && *n_excl) {
                    rc = incl
                             ? mc__expr_fail(
                                   err, 31253,
                                   "Cannot do inclusion on field %s in exclusion projection", full)
                             : mc__expr_fail(
                                   err, 31254,
                                   "Cannot do exclusion on field %s in inclusion projection", full);
                }
            }
        } else {
            if (is_id) {
                pr->include_id = false;
                pr->exclude_id = true; /* replaced by the computed value */
            }
            (*n_incl)++;
            rc = proj_insert(prog, &pr->root, full, PK_COMPUTED, v, depth + 1, err);
            if (rc == 0 && *n_excl) {
                rc = mc__expr_fail(
                    err, 31252,
                    "Invalid $project :: caused by :: Cannot use expression other than "
                    "$meta in exclusion projection");
            }
        }
        bson_free(full);
        if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

static int projection_parse(mc__xprog_t *prog, projection_t *pr, const bson_value_t *spec,
                            pmode_t forced, bool find, mc_error_t *err)
{
    memset(pr, 0, sizeof(*pr));
    int n_incl = 0, n_excl = 0;
    if (spec->value_type != BSON_TYPE_DOCUMENT) {
        return mc__expr_fail(err, 2, "projection must be an object");
    }
    int rc =
        proj_parse_fields(prog, pr, spec, NULL, forced == PM_ADD, find, 0, &n_incl, &n_excl, err);
    if (rc < 0) {
        pnode_free_kids(&pr->root);
        return rc;
    }
    if (forced == PM_ADD) {
        pr->mode = PM_ADD;
    } else if (forced == PM_EXCLUSION) {
        pr->mode = PM_EXCLUSION;
    } else if (n_incl > 0) {
        pr->mode = PM_INCLUSION;
    } else if (n_excl > 0 || pr->exclude_id) {
        pr->mode = PM_EXCLUSION;
    } else if (pr->include_id) {
        pr->mode = PM_INCLUSION; /* {_id: 1} alone keeps only _id */
    } else if (!find) {
        return mc__expr_fail(err, 51272,
                             "Invalid $project :: caused by :: projection specification must "
                             "have at least one field");
    } else {
        pr->mode = PM_EXCLUSION; /* find with {} returns whole documents */
    }
    if (pr->mode == PM_EXCLUSION && pr->exclude_id && !pnode_child(&pr->root, "_id", 3)) {
        proj_insert(prog, &pr->root, "_id", PK_EXCLUDE, NULL, 0, err);
    }
    return 0;
}

static void projection_free(projection_t *pr)
{
    pnode_free_kids(&pr->root);
}

typedef struct papply {
    const mc__xprog_t *prog;
    const uint8_t *root; /* the document computed fields see as $$ROOT */
    uint32_t root_len;
    size_t computed_bytes;
    const mc__xstep_t *steps; /* the caller's budget, or NULL */
    mc_error_t *err;
} papply_t;

static int apply_level(papply_t *a, const pnode_t *spec, pmode_t mode, const bson_value_t *in,
                       bson_t *out, bool top, const projection_t *pr);

static int append_computed(papply_t *a, const pnode_t *k, bson_t *out)
{
    mc__xval_t v;
    int rc = mc__expr_eval_steps(a->prog, k->expr, a->root, a->root_len, a->steps, &v, a->err);
    if (rc == 0 && v.v.value_type != BSON_TYPE_EOD) {
        /* Computed values are what can make the output larger than the input: their total
         * is bounded like one value. */
        a->computed_bytes += value_size(&v.v);
        if (a->computed_bytes > a->prog->max_value || !bson_append_value(out, k->name, -1, &v.v)) {
            rc = too_large(a->err);
        }
    }
    mc__xval_release(&v);
    return rc;
}

/* Builds the value a SUB node produces where the input has nothing usable (only computed
 * descendants create fields). Returns 1 when something was appended under `name`. */
static int build_fresh(papply_t *a, const pnode_t *k, bson_t *out)
{
    bson_t child;
    bson_append_document_begin(out, k->name, -1, &child);
    for (size_t i = 0; i < k->nkids; i++) {
        const pnode_t *g = k->kids[i];
        int rc = 0;
        if (g->kind == PK_COMPUTED) {
            rc = append_computed(a, g, &child);
        } else if (g->kind == PK_SUB) {
            rc = build_fresh(a, g, &child);
        }
        if (rc < 0) {
            bson_append_document_end(out, &child);
            return rc;
        }
    }
    bson_append_document_end(out, &child);
    return 0;
}

static bool has_computed(const pnode_t *k)
{
    if (k->kind == PK_COMPUTED) {
        return true;
    }
    for (size_t i = 0; i < k->nkids; i++) {
        if (has_computed(k->kids[i])) {
            return true;
        }
    }
    return false;
}

/* Applies a SUB node to an array value: each element is projected on its own. */
static int apply_array(papply_t *a, const pnode_t *k, pmode_t mode, const bson_value_t *arr,
                       bson_t *out)
{
    bson_t child;
    bson_iter_t it;
    uint32_t i = 0;
    bson_append_array_begin(out, k->name, -1, &child);
    if (mc__bson_iter_init_safe(&it, arr->value.v_doc.data, arr->value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            const bson_value_t *e = bson_iter_value(&it);
            int src = mc__xstep_take(a->steps, 1, a->err);
            if (src < 0) {
                bson_append_array_end(out, &child);
                return src;
            }
            char key[16];
            const char *ks;
            bson_uint32_to_string(i, &ks, key, sizeof(key));
            if (e->value_type == BSON_TYPE_DOCUMENT) {
                bson_t sub;
                bson_append_document_begin(&child, ks, -1, &sub);
                int rc = apply_level(a, k, mode, e, &sub, false, NULL);
                bson_append_document_end(&child, &sub);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            } else if (e->value_type == BSON_TYPE_ARRAY) {
                pnode_t tmp = *k;
                tmp.name = (char *)ks;
                int rc = apply_array(a, &tmp, mode, e, &child);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            } else if (mode == PM_EXCLUSION) {
                bson_append_value(&child, ks, -1, e);
                i++;
            } else if (mode == PM_ADD || has_computed(k)) {
                /* A scalar element becomes a document of the computed fields. */
                pnode_t tmp = *k;
                tmp.name = (char *)ks;
                int rc = build_fresh(a, &tmp, &child);
                if (rc < 0) {
                    bson_append_array_end(out, &child);
                    return rc;
                }
                i++;
            }
        }
    }
    bson_append_array_end(out, &child);
    return 0;
}

static int apply_level(papply_t *a, const pnode_t *spec, pmode_t mode, const bson_value_t *in,
                       bson_t *out, bool top, const projection_t *pr)
{
    bson_iter_t it;
    size_t nk = spec->nkids;
    bool seen_small[32] = {false};
    bool *seen = nk <= 32 ? seen_small : bson_malloc0(nk * sizeof(bool));
    int rc = 0;
    if (top && mode == PM_INCLUSION && !pr->exclude_id) {
        /* _id comes first in inclusion projections. */
        bson_iter_t idit;
        if (doc_find(in, "_id", &idit) && !pnode_child((pnode_t *)spec, "_id", 3)) {
            bson_append_value(out, "_id", 3, bson_iter_value(&idit));
        }
    }
    if (!mc__bson_iter_init_safe(&it, in->value.v_doc.data, in->value.v_doc.data_len)) {
        if (seen != seen_small) {
            bson_free(seen);
        }
        return mc__expr_fail(a->err, 2, "malformed document");
    }
    while (rc == 0 && bson_iter_next(&it)) {
        const char *key = bson_iter_key(&it);
        const bson_value_t *v = bson_iter_value(&it);
        const pnode_t *k = NULL;
        if ((rc = mc__xstep_take(a->steps, 1, a->err)) < 0) {
            break;
        }
        for (size_t i = 0; i < nk; i++) {
            if (strcmp(spec->kids[i]->name, key) == 0) {
                k = spec->kids[i];
                seen[i] = true;
                break;
            }
        }
        if (top && mode == PM_INCLUSION && strcmp(key, "_id") == 0 && !k) {
            continue; /* already emitted first, or excluded */
        }
        if (!k) {
            if (mode != PM_INCLUSION) {
                bson_append_value(out, key, -1, v);
            }
            continue;
        }
        switch (k->kind) {
        case PK_INCLUDE: bson_append_value(out, key, -1, v); break;
        case PK_EXCLUDE: break;
        case PK_COMPUTED:
            if (mode == PM_ADD) {
                rc = append_computed(a, k, out); /* in place, keeps the field's position */
            } else {
                if (seen) {
                    for (size_t i = 0; i < nk; i++) {
                        if (spec->kids[i] == k) {
                            seen[i] = false; /* appended after the included fields */
                        }
                    }
                }
            }
            break;
        case PK_SUB:
            if (v->value_type == BSON_TYPE_DOCUMENT) {
                bson_t child;
                bson_append_document_begin(out, key, -1, &child);
                rc = apply_level(a, k, mode, v, &child, false, pr);
                bson_append_document_end(out, &child);
            } else if (v->value_type == BSON_TYPE_ARRAY) {
                rc = apply_array(a, k, mode, v, out);
            } else if (mode == PM_EXCLUSION) {
                bson_append_value(out, key, -1, v);
            } else if (mode == PM_ADD || has_computed(k)) {
                rc = build_fresh(a, k, out);
            }
            break;
        }
    }
    for (size_t i = 0; rc == 0 && i < nk; i++) {
        const pnode_t *k = spec->kids[i];
        if (seen[i]) {
            continue;
        }
        if (k->kind == PK_COMPUTED) {
            rc = append_computed(a, k, out);
        } else if (k->kind == PK_SUB &&
                   (mode == PM_ADD || (mode == PM_INCLUSION && has_computed(k)))) {
            rc = build_fresh(a, k, out);
        }
    }
    if (seen != seen_small) {
        bson_free(seen);
    }
    return rc;
}

/* Writes the projection of `doc` into `out` (initialised and empty; emptied again on error),
 * within `steps` (NULL: no budget). */
static int projection_write(const mc__xprog_t *prog, const projection_t *pr, const bson_t *doc,
                            const mc__xstep_t *steps, bson_t *out, mc_error_t *err)
{
    bson_value_t in = {.value_type = BSON_TYPE_DOCUMENT};
    in.value.v_doc.data = (uint8_t *)bson_get_data(doc);
    in.value.v_doc.data_len = doc->len;
    papply_t a = {.prog = prog,
                  .root = bson_get_data(doc),
                  .root_len = doc->len,
                  .steps = steps,
                  .err = err};
    int rc = apply_level(&a, &pr->root, pr->mode, &in, out, true, pr);
    if (rc < 0) {
        bson_reinit(out);
    }
    return rc;
}

/* ---------------------------------------------------------------- public projections */

struct mc_projection {
    bson_t *spec; /* private copy: computed fields' constants point into it */
    mc__xprog_t prog;
    projection_t proj;
};

void mc_projection_destroy(mc_projection_t *p)
{
    if (!p) {
        return;
    }
    projection_free(&p->proj);
    mc__xprog_free(&p->prog);
    bson_destroy(p->spec);
    free(p);
}

static void doc_value(const bson_t *b, bson_value_t *v)
{
    memset(v, 0, sizeof(*v));
    v->value_type = BSON_TYPE_DOCUMENT;
    v->value.v_doc.data = (uint8_t *)bson_get_data(b);
    v->value.v_doc.data_len = b->len;
}

mc_projection_t *mc_projection_new(const bson_t *spec, mc_projection_kind_t kind,
                                   const mc_expr_opts_t *opts, mc_error_t *err)
{
    if (!spec) {
        mc__expr_fail(err, 2, "projection must be an object");
        return NULL;
    }
    mc_projection_t *p = calloc(1, sizeof(*p));
    if (!p) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    mc__xprog_init(&p->prog, opts);
    p->spec = bson_copy(spec);
    bson_value_t v;
    doc_value(p->spec, &v);
    pmode_t mode = kind == MC_PROJECTION_ADD_FIELDS ? PM_ADD : PM_INCLUSION;
    if (projection_parse(&p->prog, &p->proj, &v, mode, kind == MC_PROJECTION_FIND, err) < 0) {
        mc_projection_destroy(p);
        return NULL;
    }
    return p;
}

int mc_projection_apply(const mc_projection_t *p, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    bson_init(out);
    if (!p || !doc) {
        return mc__expr_fail(err, 2, "no projection or document");
    }
    return projection_write(&p->prog, &p->proj, doc, NULL, out, err);
}

/* ---------------------------------------------------------------- pipelines */

typedef enum stage_kind { S_MATCH, S_PROJECT, S_ADD_FIELDS, S_REPLACE } stage_kind_t;

typedef struct stage {
    stage_kind_t kind;
    mc_filter_t *filter; /* S_MATCH */
    projection_t proj;   /* S_PROJECT, S_ADD_FIELDS */
    mc__xnode_t *expr;   /* S_REPLACE: newRoot */
} stage_t;

struct mc_pipeline {
    bson_t *spec; /* private copy of the stages: expressions point into it */
    mc__xprog_t prog;
    stage_t *stages;
    size_t n;
    bool only_filters;
};

void mc_pipeline_destroy(mc_pipeline_t *p)
{
    if (!p) {
        return;
    }
    for (size_t i = 0; i < p->n; i++) {
        mc_filter_destroy(p->stages[i].filter);
        projection_free(&p->stages[i].proj);
    }
    free(p->stages);
    mc__xprog_free(&p->prog);
    bson_destroy(p->spec);
    free(p);
}

/* $unset: "a" or ["a", "b.c"], as an exclusion projection. */
static int parse_unset(mc_pipeline_t *p, stage_t *s, const bson_value_t *v, mc_error_t *err)
{
    bson_t spec = BSON_INITIALIZER;
    int rc = 0;
    s->kind = S_PROJECT;
    if (v->value_type == BSON_TYPE_UTF8) {
        bson_append_int32(&spec, v->value.v_utf8.str, -1, 0);
    } else if (v->value_type == BSON_TYPE_ARRAY) {
        bson_iter_t a;
        if (!mc__bson_iter_init_safe(&a, v->value.v_doc.data, v->value.v_doc.data_len)) {
            rc = mc__expr_fail(err, 31002, "$unset specification must be a string or an array");
        }
        while (rc == 0 && bson_iter_next(&a)) {
            if (!BSON_ITER_HOLDS_UTF8(&a)) {
                rc = mc__expr_fail(
                    err, 31120,
                    "$unset specification must be a string or an array containing only "
                    "string values");
            } else {
                bson_append_int32(&spec, bson_iter_utf8(&a, NULL), -1, 0);
            }
        }
    } else {
        rc = mc__expr_fail(err, 31002, "$unset specification must be a string or an array");
    }
    if (rc == 0 && bson_count_keys(&spec) == 0) {
        rc = mc__expr_fail(
            err, 31119,
            "$unset specification must be a string or an array with at least one field");
    }
    if (rc == 0) {
        bson_value_t sv;
        doc_value(&spec, &sv);
        rc = projection_parse(&p->prog, &s->proj, &sv, PM_EXCLUSION, false, err);
    }
    bson_destroy(&spec);
    return rc;
}

static int parse_stage(mc_pipeline_t *p, stage_t *s, const bson_value_t *sv,
                       const mc_pipeline_opts_t *opts, mc_error_t *err)
{
    bson_iter_t it;
    if (sv->value_type != BSON_TYPE_DOCUMENT ||
        !mc__bson_iter_init_safe(&it, sv->value.v_doc.data, sv->value.v_doc.data_len) ||
        !bson_iter_next(&it)) {
        return mc__expr_fail(
            err, 40323, "A pipeline stage specification object must contain exactly one field.");
    }
    bson_iter_t more = it;
    if (bson_iter_next(&more)) {
        return mc__expr_fail(
            err, 40323, "A pipeline stage specification object must contain exactly one field.");
    }
    const char *name = bson_iter_key(&it);
    const bson_value_t *v = bson_iter_value(&it);
    if (strcmp(name, "$match") == 0) {
        s->kind = S_MATCH;
        if (v->value_type != BSON_TYPE_DOCUMENT) {
            return mc__expr_fail(err, 15959, "the match filter must be an expression in an object");
        }
        bson_t q;
        if (!bson_init_static(&q, v->value.v_doc.data, v->value.v_doc.data_len)) {
            return mc__expr_fail(err, 15959, "the match filter must be an expression in an object");
        }
        mc_filter_opts_t fopts = {.vars = opts ? opts->vars : NULL};
        s->filter = mc_filter_new(&q, &fopts, err);
        if (!s->filter) {
            if (err) {
                err->domain = MC_DOMAIN_MONGODB;
            }
            return err && err->code < 0 ? err->code : MC_EINVAL;
        }
        return 0;
    }
    if (strcmp(name, "$project") == 0) {
        s->kind = S_PROJECT;
        return projection_parse(&p->prog, &s->proj, v, PM_INCLUSION, false, err);
    }
    if (strcmp(name, "$addFields") == 0 || strcmp(name, "$set") == 0) {
        s->kind = S_ADD_FIELDS;
        if (v->value_type != BSON_TYPE_DOCUMENT) {
            return mc__expr_fail(err, 40272, "%s specification stage must be an object", name);
        }
        return projection_parse(&p->prog, &s->proj, v, PM_ADD, false, err);
    }
    if (strcmp(name, "$unset") == 0) {
        return parse_unset(p, s, v, err);
    }
    if (strcmp(name, "$replaceRoot") == 0) {
        s->kind = S_REPLACE;
        bson_iter_t r;
        if (v->value_type != BSON_TYPE_DOCUMENT ||
            !mc__bson_iter_init_safe(&r, v->value.v_doc.data, v->value.v_doc.data_len) ||
            !bson_iter_next(&r) || strcmp(bson_iter_key(&r), "newRoot") != 0) {
            return mc__expr_fail(err, 40231, "no newRoot specified for the $replaceRoot stage");
        }
        return mc__expr_compile(&p->prog, bson_iter_value(&r), 1, &s->expr, err);
    }
    if (strcmp(name, "$replaceWith") == 0) {
        s->kind = S_REPLACE;
        return mc__expr_compile(&p->prog, v, 1, &s->expr, err);
    }
    return mc__expr_fail(err, 40324, "Unrecognized pipeline stage name: '%s'", name);
}

mc_pipeline_t *mc_pipeline_new(const bson_t *stages, const mc_pipeline_opts_t *opts,
                               mc_error_t *err)
{
    bson_iter_t it;
    if (!stages || !bson_iter_init(&it, stages)) {
        mc__expr_fail(err, 14, "'pipeline' option must be specified as an array");
        return NULL;
    }
    mc_pipeline_t *p = calloc(1, sizeof(*p));
    if (!p) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    mc__xprog_init(&p->prog, opts ? &opts->expr : NULL);
    p->spec = bson_copy(stages);
    p->only_filters = true;
    uint32_t count = bson_count_keys(p->spec);
    if (count) {
        p->stages = calloc(count, sizeof(*p->stages));
        if (!p->stages) {
            mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
            mc_pipeline_destroy(p);
            return NULL;
        }
    }
    bson_iter_init(&it, p->spec);
    while (p->n < count && bson_iter_next(&it)) {
        stage_t *s = &p->stages[p->n++];
        if (parse_stage(p, s, bson_iter_value(&it), opts, err) < 0) {
            mc_pipeline_destroy(p);
            return NULL;
        }
        p->only_filters &= s->kind == S_MATCH;
    }
    return p;
}

int mc_pipeline_test(const mc_pipeline_t *p, const bson_t *doc, mc_filter_budget_t *budget,
                     mc_error_t *err)
{
    if (!p || !doc || !p->only_filters) {
        return mc__expr_fail(err, 2, "mc_pipeline_test needs a pipeline of $match stages");
    }
    int rc = 1;
    for (size_t i = 0; i < p->n && rc == 1; i++) {
        rc = mc__filter_eval(p->stages[i].filter, doc, budget, err);
    }
    return rc;
}

size_t mc_pipeline_length(const mc_pipeline_t *p)
{
    return p ? p->n : 0;
}

bool mc_pipeline_only_filters(const mc_pipeline_t *p)
{
    return !p || p->only_filters;
}

/* Applies one reshaping stage to `doc`, writing `out` (initialised by the caller). */
static int reshape(const mc_pipeline_t *p, const stage_t *s, const bson_t *doc,
                   const mc__xstep_t *steps, bson_t *out, mc_error_t *err)
{
    if (s->kind != S_REPLACE) {
        return projection_write(&p->prog, &s->proj, doc, steps, out, err);
    }
    mc__xval_t v;
    int rc = mc__expr_eval_steps(&p->prog, s->expr, bson_get_data(doc), doc->len, steps, &v, err);
    if (rc < 0) {
        return rc;
    }
    if (v.v.value_type != BSON_TYPE_DOCUMENT) {
        bool missing = v.v.value_type == BSON_TYPE_EOD;
        rc = mc__expr_fail(
            err, 40228,
            "'replacement document' must evaluate to an object, but resulting value was: "
            "%s. Type of resulting value: '%s'.",
            missing ? "MISSING" : "a non-object", mc_bson_type_name(v.v.value_type));
    } else {
        bson_t view;
        if (bson_init_static(&view, v.v.value.v_doc.data, v.v.value.v_doc.data_len)) {
            bson_concat(out, &view);
        } else {
            rc = mc__expr_fail(err, 2, "malformed document");
        }
    }
    mc__xval_release(&v);
    return rc;
}

/* The reshaping stages' work goes to the caller's budget (mc__xstep_t over
 * mc__filter_budget_step()). */
static bool budget_step(void *ctx, uint32_t units)
{
    return mc__filter_budget_step(ctx, units);
}

int mc_pipeline_apply(const mc_pipeline_t *p, const bson_t *doc, bson_t *out, mc_error_t *err)
{
    return mc_pipeline_apply_budget(p, doc, NULL, out, err);
}

int mc_pipeline_apply_budget(const mc_pipeline_t *p, const bson_t *doc, mc_filter_budget_t *budget,
                             bson_t *out, mc_error_t *err)
{
    if (!p || !doc) {
        bson_init(out);
        return mc__expr_fail(err, 2, "no pipeline or document");
    }
    mc__xstep_t xs = {.step = budget_step, .ctx = budget};
    const mc__xstep_t *steps = budget ? &xs : NULL;
    bson_t scratch[2];
    bool used[2] = {false, false};
    const bson_t *cur = doc;
    int next = 0, rc = 1;
    for (size_t i = 0; i < p->n && rc == 1; i++) {
        const stage_t *s = &p->stages[i];
        if (s->kind == S_MATCH) {
            rc = mc__filter_eval(s->filter, cur, budget, err);
            continue;
        }
        bson_t *dst = &scratch[next];
        if (used[next]) {
            bson_reinit(dst);
        } else {
            bson_init(dst);
            used[next] = true;
        }
        int r = reshape(p, s, cur, steps, dst, err);
        rc = r < 0 ? r : 1;
        cur = dst;
        next ^= 1;
    }
    if (rc == 1 && cur != doc) {
        int k = cur == &scratch[0] ? 0 : 1;
        bson_steal(out, &scratch[k]);
        used[k] = false;
    } else if (rc == 1) {
        bson_copy_to(doc, out);
    } else {
        bson_init(out);
    }
    for (int k = 0; k < 2; k++) {
        if (used[k]) {
            bson_destroy(&scratch[k]);
        }
    }
    return rc;
}
