/*
 * update.c: MongoDB's update language for mongo-emulator (update, findAndModify, upserts) and
 * the updateDescription that the resulting change event carries.
 *
 * Threads: any; pure functions over their arguments.
 *
 * How it works. An operator update is parsed into (operator, path, operand) entries, checked
 * for conflicting paths (code 40), sorted by path (MongoDB 5.0+ applies updates in
 * lexicographic field order, numeric components numerically, which decides where new fields
 * land) and applied to a mutable tree. The tree is lazy: a sub-document is only exploded into
 * nodes when a path goes through it, so untouched parts of a large or deeply nested document
 * are copied as raw bytes.
 *
 * updateDescription, emulating the $v:2 delta oplog of MongoDB 6.0/7.0:
 *  - operator updates record what each operator changed, the way the server's update log
 *    builder does: $set/$inc/$mul/$min/$max/$currentDate/$setOnInsert of an existing path log
 *    that path with its new value; when a path had to be created, the topmost created field is
 *    logged with its whole new value ($set {"a.b.c": 1} on {} logs "a": {b: {c: 1}}); $unset
 *    and the source of $rename go to removedFields ($unset of an array element sets it to null
 *    and logs "arr.i": null); $push and $addToSet that only append log each new element as
 *    "arr.N"; any other array change ($pull, $pullAll, $pop, $push with $position/$sort/$slice
 *    reordering) logs the whole array. A change to the same value (binary equal) logs nothing
 *    and leaves `modified` false.
 *  - pipeline updates diff the old and new documents with the server's algorithm
 *    (doc_diff::computeDocDiff): changed fields of sub-documents and arrays are reported
 *    element-wise, new array elements as "arr.i", shrunk arrays as truncatedArrays {field,
 *    newSize}, and a sub-diff that would be larger (in BSON bytes) than the new value itself is
 *    replaced by the whole value, as the server does. Known difference: when the diff of the
 *    whole document is larger than the document, the server logs a replacement (and change
 *    streams then report "replace"); the emulator still reports an update.
 *  - replacement documents keep the original _id, put _id first and produce no description
 *    (the change event is a "replace").
 * Not supported (clear errors, code 2): positional paths ($, $[], $[id]), $bit, arithmetic on
 * decimal128 values.
 *
 * Invariants: `out` is always initialised; on error it is empty and `desc` is unchanged.
 */
#include "update.h"

#include "agg.h"
#include "bson_helpers.h"
#include "mongocast/filter.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_PATH_COMPONENTS 128
#define MAX_DIFF_DEPTH 100
#define MAX_PAD 1500000 /* MongoDB refuses to pad an array past 1500000 nulls too */

static int fail(mc_error_t *err, int cause, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static int fail(mc_error_t *err, int cause, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, MC_EINVAL, MC_DOMAIN_MONGODB, cause, fmt, ap);
    va_end(ap);
    return MC_EINVAL;
}

void emu_update_desc_init(emu_update_desc_t *desc)
{
    bson_init(&desc->updated_fields);
    bson_init(&desc->removed_fields);
    bson_init(&desc->truncated_arrays);
}

void emu_update_desc_cleanup(emu_update_desc_t *desc)
{
    bson_destroy(&desc->updated_fields);
    bson_destroy(&desc->removed_fields);
    bson_destroy(&desc->truncated_arrays);
}

void emu_update_desc_append(const emu_update_desc_t *desc, bson_t *parent, const char *key)
{
    bson_t child;
    bson_append_document_begin(parent, key, -1, &child);
    bson_append_document(&child, "updatedFields", -1, &desc->updated_fields);
    bson_append_array(&child, "removedFields", -1, &desc->removed_fields);
    bson_append_array(&child, "truncatedArrays", -1, &desc->truncated_arrays);
    bson_append_document_end(parent, &child);
}

static bool is_number(bson_type_t t)
{
    return t == BSON_TYPE_INT32 || t == BSON_TYPE_INT64 || t == BSON_TYPE_DOUBLE ||
           t == BSON_TYPE_DECIMAL128;
}

static bool binary_equal(const bson_value_t *a, const bson_value_t *b)
{
    if (a->value_type != b->value_type) {
        return false;
    }
    bson_t x = BSON_INITIALIZER, y = BSON_INITIALIZER;
    bson_append_value(&x, "", 0, a);
    bson_append_value(&y, "", 0, b);
    bool eq = x.len == y.len && memcmp(bson_get_data(&x), bson_get_data(&y), x.len) == 0;
    bson_destroy(&x);
    bson_destroy(&y);
    return eq;
}

/* A short rendering of a value for error messages. */
static void render(const bson_value_t *v, char *buf, size_t len)
{
    bson_t b = BSON_INITIALIZER;
    bson_append_value(&b, "v", 1, v);
    char *j = bson_as_relaxed_extended_json(&b, NULL);
    /* strip the {"v" : ...} wrapper */
    const char *s = j ? strstr(j, ": ") : NULL;
    snprintf(buf, len, "%s", s ? s + 2 : "?");
    size_t n = strlen(buf);
    if (n >= 2 && buf[n - 1] == '}') {
        buf[n - 2] = '\0';
    }
    bson_free(j);
    bson_destroy(&b);
}

/* ---------------------------------------------------------------- emu_update_kind */

int emu_update_kind(const bson_value_t *update, emu_update_kind_t *kind, mc_error_t *err)
{
    bson_iter_t it;
    if (update->value_type == BSON_TYPE_ARRAY) {
        *kind = EMU_UPDATE_PIPELINE;
        return 0;
    }
    if (update->value_type != BSON_TYPE_DOCUMENT ||
        !emu_safe_iter_init(&it, update->value.v_doc.data, update->value.v_doc.data_len)) {
        return fail(err, 9, "Update argument must be either an object or an array");
    }
    int ops = 0, plain = 0;
    const char *first_plain = NULL, *first_op = NULL;
    while (bson_iter_next(&it)) {
        if (bson_iter_key(&it)[0] == '$') {
            ops++;
            first_op = first_op ? first_op : bson_iter_key(&it);
        } else {
            plain++;
            first_plain = first_plain ? first_plain : bson_iter_key(&it);
        }
    }
    if (ops && plain) {
        return fail(err, 9,
                    "Unknown modifier: %s. Expected a valid update modifier or "
                    "pipeline-style update specified as an array",
                    first_plain);
    }
    *kind = ops ? EMU_UPDATE_OPERATORS : EMU_UPDATE_REPLACEMENT;
    (void)first_op;
    return 0;
}

/* ---------------------------------------------------------------- mutable tree */

typedef struct mnode mnode_t;
struct mnode {
    char *key;      /* field name (unused for array elements) */
    bson_value_t v; /* owned; for an expanded document/array only value_type is meaningful */
    bool expanded;
    mnode_t **kids;
    size_t n, cap;
};

static void mnode_free(mnode_t *m)
{
    if (!m) {
        return;
    }
    for (size_t i = 0; i < m->n; i++) {
        mnode_free(m->kids[i]);
    }
    bson_free(m->kids);
    if (!m->expanded) {
        bson_value_destroy(&m->v);
    }
    bson_free(m->key);
    bson_free(m);
}

static mnode_t *mnode_new(const char *key, const bson_value_t *v)
{
    mnode_t *m = bson_malloc0(sizeof(*m));
    m->key = bson_strdup(key ? key : "");
    if (v) {
        bson_value_copy(v, &m->v);
    } else {
        m->v.value_type = BSON_TYPE_NULL;
    }
    return m;
}

static mnode_t *mnode_new_container(const char *key, bson_type_t type)
{
    mnode_t *m = bson_malloc0(sizeof(*m));
    m->key = bson_strdup(key);
    m->v.value_type = type;
    m->expanded = true;
    return m;
}

static bool is_container(const mnode_t *m)
{
    return m->v.value_type == BSON_TYPE_DOCUMENT || m->v.value_type == BSON_TYPE_ARRAY;
}

static void mnode_push(mnode_t *m, mnode_t *kid, size_t at)
{
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 8;
        m->kids = bson_realloc(m->kids, m->cap * sizeof(mnode_t *));
    }
    if (at > m->n) {
        at = m->n;
    }
    memmove(m->kids + at + 1, m->kids + at, (m->n - at) * sizeof(mnode_t *));
    m->kids[at] = kid;
    m->n++;
}

static void mnode_remove(mnode_t *m, size_t at)
{
    mnode_free(m->kids[at]);
    memmove(m->kids + at, m->kids + at + 1, (m->n - at - 1) * sizeof(mnode_t *));
    m->n--;
}

static void expand(mnode_t *m)
{
    bson_iter_t it;
    if (m->expanded || !is_container(m)) {
        return;
    }
    if (emu_safe_iter_init(&it, m->v.value.v_doc.data, m->v.value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            mnode_push(m, mnode_new(bson_iter_key(&it), bson_iter_value(&it)), m->n);
        }
    }
    bson_type_t t = m->v.value_type;
    bson_value_destroy(&m->v);
    memset(&m->v, 0, sizeof(m->v));
    m->v.value_type = t;
    m->expanded = true;
}

static void serialize_into(const mnode_t *m, bson_t *parent, const char *key, int klen);

static void serialize_kids(const mnode_t *m, bson_t *b)
{
    for (size_t i = 0; i < m->n; i++) {
        if (m->v.value_type == BSON_TYPE_ARRAY) {
            char buf[16];
            const char *k;
            size_t kl = bson_uint32_to_string((uint32_t)i, &k, buf, sizeof(buf));
            serialize_into(m->kids[i], b, k, (int)kl);
        } else {
            serialize_into(m->kids[i], b, m->kids[i]->key, -1);
        }
    }
}

static void serialize_into(const mnode_t *m, bson_t *parent, const char *key, int klen)
{
    if (!m->expanded) {
        bson_append_value(parent, key, klen, &m->v);
        return;
    }
    bson_t child;
    if (m->v.value_type == BSON_TYPE_ARRAY) {
        bson_append_array_begin(parent, key, klen, &child);
        serialize_kids(m, &child);
        bson_append_array_end(parent, &child);
    } else {
        bson_append_document_begin(parent, key, klen, &child);
        serialize_kids(m, &child);
        bson_append_document_end(parent, &child);
    }
}

/* An owned bson_value_t of the node's current value. */
static void mnode_value(const mnode_t *m, bson_value_t *out)
{
    if (!m->expanded) {
        bson_value_copy(&m->v, out);
        return;
    }
    bson_t b = BSON_INITIALIZER;
    serialize_into(m, &b, "v", 1);
    bson_iter_t it;
    bson_iter_init(&it, &b);
    bson_iter_next(&it);
    bson_value_copy(bson_iter_value(&it), out);
    bson_destroy(&b);
}

static void mnode_set(mnode_t *m, const bson_value_t *v)
{
    for (size_t i = 0; i < m->n; i++) {
        mnode_free(m->kids[i]);
    }
    bson_free(m->kids);
    m->kids = NULL;
    m->n = m->cap = 0;
    if (!m->expanded) {
        bson_value_destroy(&m->v);
    }
    m->expanded = false;
    bson_value_copy(v, &m->v);
}

static mnode_t *mnode_from_bson(const bson_t *doc)
{
    bson_value_t v = {.value_type = BSON_TYPE_DOCUMENT};
    v.value.v_doc.data = (uint8_t *)bson_get_data(doc);
    v.value.v_doc.data_len = doc->len;
    mnode_t *m = mnode_new("", &v);
    expand(m);
    return m;
}

static ssize_t find_kid(const mnode_t *m, const char *key)
{
    for (size_t i = 0; i < m->n; i++) {
        if (strcmp(m->kids[i]->key, key) == 0) {
            return (ssize_t)i;
        }
    }
    return -1;
}

static bool parse_index(const char *s, size_t *out)
{
    size_t v = 0;
    if (!*s || strlen(s) > 9) {
        return false;
    }
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') {
            return false;
        }
        v = v * 10 + (size_t)(*p - '0');
    }
    *out = v;
    return true;
}

/* ---------------------------------------------------------------- paths */

typedef struct upath {
    char *buf;
    const char *full; /* the dotted path as written */
    size_t n;
    const char *c[MAX_PATH_COMPONENTS];
} upath_t;

static int upath_parse(upath_t *p, const char *s, mc_error_t *err)
{
    memset(p, 0, sizeof(*p));
    p->full = s;
    if (!*s) {
        return fail(err, 56, "An empty update path is not valid.");
    }
    p->buf = bson_strdup(s);
    char *c = p->buf;
    for (;;) {
        if (p->n == MAX_PATH_COMPONENTS) {
            return fail(err, 2, "The update path '%s' has too many components", s);
        }
        p->c[p->n++] = c;
        char *dot = strchr(c, '.');
        if (!dot) {
            break;
        }
        *dot = '\0';
        c = dot + 1;
    }
    for (size_t i = 0; i < p->n; i++) {
        if (!p->c[i][0]) {
            return fail(err, 56,
                        "The update path '%s' contains an empty field name, which is not allowed.",
                        s);
        }
        if (p->c[i][0] == '$') {
            if (strcmp(p->c[i], "$") == 0 || strncmp(p->c[i], "$[", 2) == 0) {
                return fail(err, 2,
                            "positional update operators ('%s' in '%s') are not supported "
                            "by mongo-emulator",
                            p->c[i], s);
            }
            return fail(err, 52,
                        "The dollar ($) prefixed field '%s' in '%s' is not allowed in "
                        "the context of an update's replacement document.",
                        p->c[i], s);
        }
    }
    return 0;
}

static void upath_free(upath_t *p)
{
    bson_free(p->buf);
    p->buf = NULL;
}

/* Component-wise path order: numeric components numerically, others bytewise. */
static int path_cmp(const upath_t *a, const upath_t *b)
{
    for (size_t i = 0; i < a->n && i < b->n; i++) {
        size_t x, y;
        int c;
        if (parse_index(a->c[i], &x) && parse_index(b->c[i], &y)) {
            c = x < y ? -1 : (x > y ? 1 : 0);
        } else {
            c = strcmp(a->c[i], b->c[i]);
        }
        if (c) {
            return c;
        }
    }
    return a->n < b->n ? -1 : (a->n > b->n ? 1 : 0);
}

/* True when `a` is `b` or a prefix of it at a component boundary. */
static bool path_prefix(const upath_t *a, const upath_t *b)
{
    if (a->n > b->n) {
        return false;
    }
    for (size_t i = 0; i < a->n; i++) {
        if (strcmp(a->c[i], b->c[i]) != 0) {
            return false;
        }
    }
    return true;
}

static char *join(const upath_t *p, size_t n)
{
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        len += strlen(p->c[i]) + 1;
    }
    char *s = bson_malloc(len + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(p->c[i]);
        if (i) {
            s[k++] = '.';
        }
        memcpy(s + k, p->c[i], l);
        k += l;
    }
    s[k] = '\0';
    return s;
}

/* ---------------------------------------------------------------- change records */

typedef struct rec {
    char *path;
    bool removed;
} rec_t;

typedef struct ustate {
    mnode_t *root;
    const bson_t *orig;
    rec_t *recs;
    size_t nrecs, caprecs;
    mc_error_t *err;
    bool is_insert;
} ustate_t;

static bool str_prefix_path(const char *a, const char *b)
{
    size_t la = strlen(a);
    return strncmp(a, b, la) == 0 && (b[la] == '\0' || b[la] == '.');
}

static void record(ustate_t *u, const char *path, bool removed)
{
    /* A change inside a path already logged as a whole value is part of that value. */
    for (size_t i = 0; i < u->nrecs; i++) {
        if (!u->recs[i].removed && str_prefix_path(u->recs[i].path, path)) {
            return;
        }
    }
    for (size_t i = 0; i < u->nrecs;) {
        if (str_prefix_path(path, u->recs[i].path)) {
            bson_free(u->recs[i].path);
            u->recs[i] = u->recs[--u->nrecs];
        } else {
            i++;
        }
    }
    if (u->nrecs == u->caprecs) {
        u->caprecs = u->caprecs ? u->caprecs * 2 : 8;
        u->recs = bson_realloc(u->recs, u->caprecs * sizeof(rec_t));
    }
    u->recs[u->nrecs].path = bson_strdup(path);
    u->recs[u->nrecs].removed = removed;
    u->nrecs++;
}

static void record_n(ustate_t *u, const upath_t *p, size_t n, bool removed)
{
    char *s = join(p, n);
    record(u, s, removed);
    bson_free(s);
}

static void id_render(ustate_t *u, char *buf, size_t len)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, u->orig, "_id")) {
        char v[200];
        render(bson_iter_value(&it), v, sizeof(v));
        snprintf(buf, len, "{_id: %s}", v);
    } else {
        snprintf(buf, len, "{}");
    }
}

/* ---------------------------------------------------------------- navigation */

typedef struct target {
    mnode_t *parent;   /* document or array holding the field */
    ssize_t idx;       /* index in parent->kids, -1 when absent */
    size_t created_at; /* component index of the first field created on the way, or SIZE_MAX */
} target_t;

static int not_viable(ustate_t *u, const upath_t *p, size_t i, const mnode_t *at)
{
    char v[200];
    bson_value_t val;
    mnode_value(at, &val);
    render(&val, v, sizeof(v));
    bson_value_destroy(&val);
    return fail(u->err, 28, "Cannot create field '%s' in element {%s: %s}", p->c[i], at->key, v);
}

/* Finds the node for path `p`. With `create`, missing intermediate documents are created and
 * arrays padded with nulls; without, a missing step leaves t->idx == -1 (or t->parent NULL). */
static int locate(ustate_t *u, const upath_t *p, bool create, target_t *t)
{
    mnode_t *cur = u->root;
    t->created_at = SIZE_MAX;
    t->parent = NULL;
    t->idx = -1;
    for (size_t i = 0; i < p->n; i++) {
        expand(cur);
        ssize_t idx = -1;
        size_t ai;
        if (cur->v.value_type == BSON_TYPE_ARRAY) {
            if (!parse_index(p->c[i], &ai)) {
                return create ? not_viable(u, p, i, cur) : 0;
            }
            if (ai < cur->n) {
                idx = (ssize_t)ai;
            } else if (create) {
                if (ai - cur->n > MAX_PAD) {
                    return fail(u->err, 2,
                                "can't backfill array to larger than 1500000 "
                                "elements");
                }
                while (cur->n < ai) {
                    mnode_push(cur, mnode_new("", NULL), cur->n);
                }
            }
        } else {
            idx = find_kid(cur, p->c[i]);
        }
        if (i == p->n - 1) {
            t->parent = cur;
            t->idx = idx;
            return 0;
        }
        if (idx < 0) {
            if (!create) {
                return 0;
            }
            if (t->created_at == SIZE_MAX) {
                t->created_at = i;
            }
            mnode_t *d = mnode_new_container(p->c[i], BSON_TYPE_DOCUMENT);
            mnode_push(cur, d, cur->n);
            cur = d;
            continue;
        }
        mnode_t *next = cur->kids[idx];
        if (!is_container(next)) {
            return create ? not_viable(u, p, i + 1, next) : 0;
        }
        cur = next;
    }
    return 0;
}

/* Sets the located field to `v` (creating it) and records the change. */
static void put(ustate_t *u, const upath_t *p, target_t *t, const bson_value_t *v)
{
    if (t->idx >= 0) {
        mnode_t *m = t->parent->kids[t->idx];
        bson_value_t old;
        mnode_value(m, &old);
        bool same = binary_equal(&old, v);
        bson_value_destroy(&old);
        if (same) {
            return;
        }
        mnode_set(m, v);
        record_n(u, p, t->created_at == SIZE_MAX ? p->n : t->created_at + 1, false);
        return;
    }
    mnode_t *m = mnode_new(p->c[p->n - 1], v);
    mnode_push(t->parent, m, t->parent->n);
    t->idx = (ssize_t)t->parent->n - 1;
    record_n(u, p, t->created_at == SIZE_MAX ? p->n : t->created_at + 1, false);
}

/* ---------------------------------------------------------------- operators */

typedef enum uop {
    OP_SET,
    OP_UNSET,
    OP_INC,
    OP_MUL,
    OP_MIN,
    OP_MAX,
    OP_RENAME,
    OP_PUSH,
    OP_PULL,
    OP_PULLALL,
    OP_ADDTOSET,
    OP_POP,
    OP_CURRENTDATE,
    OP_SETONINSERT,
} uop_t;

static const struct {
    const char *name;
    uop_t op;
} op_names[] = {
    {"$set", OP_SET},
    {"$unset", OP_UNSET},
    {"$inc", OP_INC},
    {"$mul", OP_MUL},
    {"$min", OP_MIN},
    {"$max", OP_MAX},
    {"$rename", OP_RENAME},
    {"$push", OP_PUSH},
    {"$pull", OP_PULL},
    {"$pullAll", OP_PULLALL},
    {"$addToSet", OP_ADDTOSET},
    {"$pop", OP_POP},
    {"$currentDate", OP_CURRENTDATE},
    {"$setOnInsert", OP_SETONINSERT},
};

typedef struct entry {
    uop_t op;
    const char *opname;
    upath_t path;
    upath_t to;       /* $rename */
    bson_value_t val; /* borrowed from the update document */
} entry_t;

static int arith(ustate_t *u, const entry_t *e, const bson_value_t *cur, bson_value_t *out)
{
    const bson_value_t *x = &e->val;
    bool mul = e->op == OP_MUL;
    if (cur->value_type == BSON_TYPE_DECIMAL128 || x->value_type == BSON_TYPE_DECIMAL128) {
        return fail(u->err, 2, "%s on decimal128 values is not supported by mongo-emulator",
                    e->opname);
    }
    memset(out, 0, sizeof(*out));
    if (cur->value_type == BSON_TYPE_DOUBLE || x->value_type == BSON_TYPE_DOUBLE) {
        double a = cur->value_type == BSON_TYPE_DOUBLE  ? cur->value.v_double
                   : cur->value_type == BSON_TYPE_INT32 ? cur->value.v_int32
                                                        : (double)cur->value.v_int64;
        double b = x->value_type == BSON_TYPE_DOUBLE  ? x->value.v_double
                   : x->value_type == BSON_TYPE_INT32 ? x->value.v_int32
                                                      : (double)x->value.v_int64;
        out->value_type = BSON_TYPE_DOUBLE;
        out->value.v_double = mul ? a * b : a + b;
        return 0;
    }
    int64_t a = cur->value_type == BSON_TYPE_INT32 ? cur->value.v_int32 : cur->value.v_int64;
    int64_t b = x->value_type == BSON_TYPE_INT32 ? x->value.v_int32 : x->value.v_int64;
    int64_t r;
    bool of = mul ? __builtin_mul_overflow(a, b, &r) : __builtin_add_overflow(a, b, &r);
    if (of) {
        char id[256];
        id_render(u, id, sizeof(id));
        return fail(u->err, 2,
                    "Failed to apply %s operations to current value ((NumberLong)%" PRId64
                    ") for document %s",
                    e->opname, a, id);
    }
    bool wide = cur->value_type == BSON_TYPE_INT64 || x->value_type == BSON_TYPE_INT64 ||
                r > INT32_MAX || r < INT32_MIN;
    if (wide) {
        out->value_type = BSON_TYPE_INT64;
        out->value.v_int64 = r;
    } else {
        out->value_type = BSON_TYPE_INT32;
        out->value.v_int32 = (int32_t)r;
    }
    return 0;
}

/* The array after an array operator, built by the operator; logs append-only changes element
 * by element and anything else as the whole array. */
static void put_array(ustate_t *u, const upath_t *p, target_t *t, bson_t *arr)
{
    bson_value_t nv = {.value_type = BSON_TYPE_ARRAY};
    nv.value.v_doc.data = (uint8_t *)bson_get_data(arr);
    nv.value.v_doc.data_len = arr->len;
    if (t->idx < 0) {
        put(u, p, t, &nv);
        return;
    }
    mnode_t *m = t->parent->kids[t->idx];
    bson_value_t old;
    mnode_value(m, &old);
    if (binary_equal(&old, &nv)) {
        bson_value_destroy(&old);
        return;
    }
    bson_iter_t oi, ni;
    bool append_only = true;
    uint32_t n_old = 0;
    emu_safe_iter_init(&oi, old.value.v_doc.data, old.value.v_doc.data_len);
    bson_iter_init(&ni, arr);
    while (bson_iter_next(&oi)) {
        n_old++;
        if (!bson_iter_next(&ni) || !binary_equal(bson_iter_value(&oi), bson_iter_value(&ni))) {
            append_only = false;
            break;
        }
    }
    bson_value_destroy(&old);
    if (!append_only || t->created_at != SIZE_MAX) {
        put(u, p, t, &nv);
        return;
    }
    mnode_set(m, &nv);
    char *base = join(p, p->n);
    uint32_t i = n_old;
    while (bson_iter_next(&ni)) {
        char *s = bson_strdup_printf("%s.%u", base, i++);
        record(u, s, false);
        bson_free(s);
    }
    bson_free(base);
}

static void arr_append(bson_t *arr, uint32_t *n, const bson_value_t *v)
{
    char buf[16];
    const char *k;
    size_t kl = bson_uint32_to_string((*n)++, &k, buf, sizeof(buf));
    bson_append_value(arr, k, (int)kl, v);
}

typedef struct vlist {
    bson_value_t *v; /* borrowed */
    size_t n, cap;
} vlist_t;

static void vl_push(vlist_t *l, const bson_value_t *v)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->v = bson_realloc(l->v, l->cap * sizeof(bson_value_t));
    }
    l->v[l->n++] = *v;
}

static void vl_from_array(vlist_t *l, const bson_value_t *arr)
{
    bson_iter_t it;
    if (arr && emu_safe_iter_init(&it, arr->value.v_doc.data, arr->value.v_doc.data_len)) {
        while (bson_iter_next(&it)) {
            vl_push(l, bson_iter_value(&it));
        }
    }
}

typedef struct sort_ctx {
    const bson_value_t *spec; /* number or document */
} sort_ctx_t;

/* $push's $sort: by value with a number, by fields of document elements with a document. */
static int push_sort_cmp(const sort_ctx_t *c, const bson_value_t *a, const bson_value_t *b)
{
    if (c->spec->value_type != BSON_TYPE_DOCUMENT) {
        int r = mc_bson_value_compare(a, b);
        double dir = c->spec->value_type == BSON_TYPE_INT32   ? c->spec->value.v_int32
                     : c->spec->value_type == BSON_TYPE_INT64 ? (double)c->spec->value.v_int64
                                                              : c->spec->value.v_double;
        return dir < 0 ? -r : r;
    }
    bson_t spec, da = BSON_INITIALIZER, db = BSON_INITIALIZER;
    bson_init_static(&spec, c->spec->value.v_doc.data, c->spec->value.v_doc.data_len);
    if (a->value_type == BSON_TYPE_DOCUMENT) {
        bson_destroy(&da);
        bson_init_static(&da, a->value.v_doc.data, a->value.v_doc.data_len);
    }
    if (b->value_type == BSON_TYPE_DOCUMENT) {
        bson_destroy(&db);
        bson_init_static(&db, b->value.v_doc.data, b->value.v_doc.data_len);
    }
    int r = emu_sort_compare(&spec, &da, &db);
    bson_destroy(&da);
    bson_destroy(&db);
    return r;
}

static void vl_sort(vlist_t *l, const sort_ctx_t *c)
{
    /* insertion sort: stable, and $push arrays are small */
    for (size_t i = 1; i < l->n; i++) {
        bson_value_t x = l->v[i];
        size_t j = i;
        while (j > 0 && push_sort_cmp(c, &x, &l->v[j - 1]) < 0) {
            l->v[j] = l->v[j - 1];
            j--;
        }
        l->v[j] = x;
    }
}

static bool get_int(const bson_value_t *v, int64_t *out)
{
    switch (v->value_type) {
    case BSON_TYPE_INT32: *out = v->value.v_int32; return true;
    case BSON_TYPE_INT64: *out = v->value.v_int64; return true;
    case BSON_TYPE_DOUBLE:
        if (v->value.v_double != (double)(int64_t)v->value.v_double) {
            return false;
        }
        *out = (int64_t)v->value.v_double;
        return true;
    default: return false;
    }
}

static int apply_push(ustate_t *u, const entry_t *e, target_t *t, const bson_value_t *cur)
{
    vlist_t items = {0}, all = {0};
    const bson_value_t *v = &e->val;
    bool have_slice = false, have_sort = false;
    int64_t slice = 0, position = -1;
    bool have_position = false;
    bson_value_t sort_spec = {0};
    bson_iter_t it;
    int rc = 0;
    bool modifiers = false;
    if (v->value_type == BSON_TYPE_DOCUMENT &&
        emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
        bson_iter_next(&it) && strcmp(bson_iter_key(&it), "$each") == 0) {
        modifiers = true;
    }
    if (modifiers) {
        emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len);
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            const bson_value_t *m = bson_iter_value(&it);
            if (strcmp(k, "$each") == 0) {
                if (m->value_type != BSON_TYPE_ARRAY) {
                    rc = fail(u->err, 2,
                              "The argument to $each in $push must be an array but it "
                              "was of type: %s",
                              emu_type_name(m->value_type));
                } else {
                    vl_from_array(&items, m);
                }
            } else if (strcmp(k, "$slice") == 0) {
                if (!get_int(m, &slice)) {
                    rc = fail(u->err, 2,
                              "The value for $slice must be an integer value but was "
                              "given type: %s",
                              emu_type_name(m->value_type));
                }
                have_slice = true;
            } else if (strcmp(k, "$position") == 0) {
                if (!get_int(m, &position)) {
                    rc = fail(u->err, 2,
                              "The value for $position must be an integer value, not "
                              "of type: %s",
                              emu_type_name(m->value_type));
                }
                have_position = true;
            } else if (strcmp(k, "$sort") == 0) {
                int64_t d;
                if (!(m->value_type == BSON_TYPE_DOCUMENT ||
                      (get_int(m, &d) && (d == 1 || d == -1)))) {
                    rc = fail(u->err, 2,
                              "The $sort is invalid: use 1/-1 to sort the whole "
                              "element, or {field:1/-1} to sort embedded fields");
                }
                sort_spec = *m;
                have_sort = true;
            } else {
                rc = fail(u->err, 2, "Unrecognized clause in $push: %s", k);
            }
        }
    } else {
        vl_push(&items, v);
    }
    if (rc == 0) {
        if (cur) {
            vl_from_array(&all, cur);
        }
        size_t at = all.n;
        if (have_position) {
            if (position < 0) {
                at = (size_t)(-position) >= all.n ? 0 : all.n - (size_t)(-position);
            } else if ((uint64_t)position < all.n) {
                at = (size_t)position;
            }
        }
        vlist_t merged = {0};
        for (size_t i = 0; i < at; i++) {
            vl_push(&merged, &all.v[i]);
        }
        for (size_t i = 0; i < items.n; i++) {
            vl_push(&merged, &items.v[i]);
        }
        for (size_t i = at; i < all.n; i++) {
            vl_push(&merged, &all.v[i]);
        }
        if (have_sort) {
            sort_ctx_t sc = {.spec = &sort_spec};
            vl_sort(&merged, &sc);
        }
        size_t lo = 0, hi = merged.n;
        if (have_slice) {
            if (slice >= 0) {
                hi = (uint64_t)slice < merged.n ? (size_t)slice : merged.n;
            } else {
                lo = (size_t)(-slice) >= merged.n ? 0 : merged.n - (size_t)(-slice);
            }
        }
        bson_t arr = BSON_INITIALIZER;
        uint32_t n = 0;
        for (size_t i = lo; i < hi; i++) {
            arr_append(&arr, &n, &merged.v[i]);
        }
        put_array(u, &e->path, t, &arr);
        bson_destroy(&arr);
        bson_free(merged.v);
    }
    bson_free(items.v);
    bson_free(all.v);
    return rc;
}

static bool vl_contains(const vlist_t *l, const bson_value_t *v)
{
    for (size_t i = 0; i < l->n; i++) {
        if (mc_bson_value_compare(&l->v[i], v) == 0) {
            return true;
        }
    }
    return false;
}

static int apply_add_to_set(ustate_t *u, const entry_t *e, target_t *t, const bson_value_t *cur)
{
    vlist_t items = {0}, all = {0};
    bson_iter_t it;
    const bson_value_t *v = &e->val;
    if (v->value_type == BSON_TYPE_DOCUMENT &&
        emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
        bson_iter_next(&it) && strcmp(bson_iter_key(&it), "$each") == 0) {
        if (!BSON_ITER_HOLDS_ARRAY(&it)) {
            return fail(u->err, 2,
                        "The argument to $each in $addToSet must be an array but it "
                        "was of type %s",
                        emu_type_name(bson_iter_type(&it)));
        }
        vl_from_array(&items, bson_iter_value(&it));
    } else {
        vl_push(&items, v);
    }
    if (cur) {
        vl_from_array(&all, cur);
    }
    for (size_t i = 0; i < items.n; i++) {
        if (!vl_contains(&all, &items.v[i])) {
            vl_push(&all, &items.v[i]);
        }
    }
    bson_t arr = BSON_INITIALIZER;
    uint32_t n = 0;
    for (size_t i = 0; i < all.n; i++) {
        arr_append(&arr, &n, &all.v[i]);
    }
    put_array(u, &e->path, t, &arr);
    bson_destroy(&arr);
    bson_free(items.v);
    bson_free(all.v);
    return 0;
}

static int apply_pull(ustate_t *u, const entry_t *e, target_t *t, const bson_value_t *cur)
{
    mc_filter_t *f = NULL;
    bool as_query = false;
    const bson_value_t *v = &e->val;
    vlist_t all = {0}, keep = {0};
    bool cond = v->value_type == BSON_TYPE_REGEX;
    if (e->op == OP_PULL && v->value_type == BSON_TYPE_DOCUMENT) {
        bson_iter_t it;
        cond = true;
        as_query = !(emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len) &&
                     bson_iter_next(&it) && bson_iter_key(&it)[0] == '$');
    }
    if (e->op == OP_PULLALL && v->value_type != BSON_TYPE_ARRAY) {
        return fail(u->err, 2, "$pullAll requires an array argument but was given a %s",
                    emu_type_name(v->value_type));
    }
    if (cond) {
        bson_t q = BSON_INITIALIZER;
        if (as_query) {
            bson_destroy(&q);
            bson_init_static(&q, v->value.v_doc.data, v->value.v_doc.data_len);
        } else {
            bson_append_value(&q, "x", 1, v); /* matched against {x: element} */
        }
        f = mc_filter_new(&q, NULL, u->err);
        bson_destroy(&q);
        if (!f) {
            if (u->err) {
                u->err->domain = MC_DOMAIN_MONGODB;
                u->err->code = MC_EINVAL;
            }
            return MC_EINVAL;
        }
    }
    vlist_t remove = {0};
    if (e->op == OP_PULLALL) {
        vl_from_array(&remove, v);
    }
    vl_from_array(&all, cur);
    for (size_t i = 0; i < all.n; i++) {
        const bson_value_t *x = &all.v[i];
        bool drop;
        if (e->op == OP_PULLALL) {
            drop = vl_contains(&remove, x);
        } else if (!cond) {
            drop = mc_bson_value_compare(x, v) == 0;
        } else if (as_query) {
            bson_t d;
            drop = x->value_type == BSON_TYPE_DOCUMENT &&
                   bson_init_static(&d, x->value.v_doc.data, x->value.v_doc.data_len) &&
                   mc_filter_match(f, &d);
        } else {
            bson_t d = BSON_INITIALIZER;
            bson_append_value(&d, "x", 1, x);
            drop = mc_filter_match(f, &d);
            bson_destroy(&d);
        }
        if (!drop) {
            vl_push(&keep, x);
        }
    }
    bson_t arr = BSON_INITIALIZER;
    uint32_t n = 0;
    for (size_t i = 0; i < keep.n; i++) {
        arr_append(&arr, &n, &keep.v[i]);
    }
    if (keep.n != all.n) {
        put_array(u, &e->path, t, &arr);
    }
    bson_destroy(&arr);
    bson_free(all.v);
    bson_free(keep.v);
    bson_free(remove.v);
    mc_filter_destroy(f);
    return 0;
}

static int apply_entry(ustate_t *u, const entry_t *e)
{
    target_t t;
    const upath_t *p = &e->path;
    char id[256];
    int rc;
    bool creates = e->op != OP_UNSET && e->op != OP_POP && e->op != OP_PULL &&
                   e->op != OP_PULLALL && e->op != OP_RENAME;
    if (e->op == OP_SETONINSERT && !u->is_insert) {
        return 0;
    }
    if ((rc = locate(u, p, creates, &t)) < 0) {
        return rc;
    }
    bool exists = t.parent && t.idx >= 0;
    bson_value_t cur = {0};
    if (exists) {
        mnode_value(t.parent->kids[t.idx], &cur);
    }
    rc = 0;
    switch (e->op) {
    case OP_SET:
    case OP_SETONINSERT: put(u, p, &t, &e->val); break;
    case OP_UNSET:
        if (exists) {
            if (t.parent->v.value_type == BSON_TYPE_ARRAY) {
                bson_value_t nul = {.value_type = BSON_TYPE_NULL};
                put(u, p, &t, &nul);
            } else {
                mnode_remove(t.parent, (size_t)t.idx);
                record_n(u, p, p->n, true);
            }
        }
        break;
    case OP_INC:
    case OP_MUL: {
        bson_value_t nv;
        if (!exists) {
            if (e->op == OP_INC) {
                put(u, p, &t, &e->val);
            } else {
                memset(&nv, 0, sizeof(nv));
                nv.value_type = e->val.value_type;
                put(u, p, &t, &nv); /* $mul of a missing field sets 0 of the operand's type */
            }
            break;
        }
        if (!is_number(cur.value_type)) {
            id_render(u, id, sizeof(id));
            rc = fail(u->err, 14,
                      "Cannot apply %s to a value of non-numeric type. %s has the "
                      "field '%s' of non-numeric type %s",
                      e->opname, id, p->c[p->n - 1], emu_type_name(cur.value_type));
            break;
        }
        if ((rc = arith(u, e, &cur, &nv)) == 0) {
            put(u, p, &t, &nv);
        }
        break;
    }
    case OP_MIN:
    case OP_MAX: {
        int c = exists ? mc_bson_value_compare(&e->val, &cur) : 0;
        if (!exists || (e->op == OP_MIN ? c < 0 : c > 0)) {
            put(u, p, &t, &e->val);
        }
        break;
    }
    case OP_CURRENTDATE: {
        bson_value_t nv = {0};
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        bool timestamp = false;
        if (e->val.value_type == BSON_TYPE_DOCUMENT) {
            bson_iter_t it;
            emu_safe_iter_init(&it, e->val.value.v_doc.data, e->val.value.v_doc.data_len);
            while (bson_iter_next(&it)) {
                if (strcmp(bson_iter_key(&it), "$type") == 0 && BSON_ITER_HOLDS_UTF8(&it) &&
                    strcmp(bson_iter_utf8(&it, NULL), "timestamp") == 0) {
                    timestamp = true;
                }
            }
        }
        if (timestamp) {
            nv.value_type = BSON_TYPE_TIMESTAMP;
            nv.value.v_timestamp.timestamp = (uint32_t)ts.tv_sec;
            nv.value.v_timestamp.increment = 1;
        } else {
            nv.value_type = BSON_TYPE_DATE_TIME;
            nv.value.v_datetime = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
        }
        put(u, p, &t, &nv);
        break;
    }
    case OP_PUSH:
    case OP_ADDTOSET:
        if (exists && cur.value_type != BSON_TYPE_ARRAY) {
            id_render(u, id, sizeof(id));
            rc = e->op == OP_PUSH ? fail(u->err, 2,
                                         "The field '%s' must be an array but is of type %s in "
                                         "document %s",
                                         p->full, emu_type_name(cur.value_type), id)
                                  : fail(u->err, 2,
                                         "Cannot apply $addToSet to non-array field. Field named "
                                         "'%s' has non-array type %s",
                                         p->c[p->n - 1], emu_type_name(cur.value_type));
            break;
        }
        rc = e->op == OP_PUSH ? apply_push(u, e, &t, exists ? &cur : NULL)
                              : apply_add_to_set(u, e, &t, exists ? &cur : NULL);
        break;
    case OP_PULL:
    case OP_PULLALL:
        if (!exists) {
            break;
        }
        if (cur.value_type != BSON_TYPE_ARRAY) {
            rc = fail(u->err, 2, "Cannot apply %s to a non-array value", e->opname);
            break;
        }
        rc = apply_pull(u, e, &t, &cur);
        break;
    case OP_POP: {
        if (!exists) {
            break;
        }
        if (cur.value_type != BSON_TYPE_ARRAY) {
            rc = fail(u->err, 14, "Path '%s' contains an element of non-array type '%s'", p->full,
                      emu_type_name(cur.value_type));
            break;
        }
        vlist_t all = {0};
        vl_from_array(&all, &cur);
        if (all.n) {
            bool first = e->val.value.v_int64 < 0; /* normalised at parse time */
            bson_t arr = BSON_INITIALIZER;
            uint32_t n = 0;
            for (size_t i = first ? 1 : 0; i < (first ? all.n : all.n - 1); i++) {
                arr_append(&arr, &n, &all.v[i]);
            }
            put_array(u, p, &t, &arr);
            bson_destroy(&arr);
        }
        bson_free(all.v);
        break;
    }
    case OP_RENAME: {
        if (!exists) {
            break;
        }
        if (t.parent->v.value_type == BSON_TYPE_ARRAY) {
            rc = fail(u->err, 2,
                      "The source field cannot be an array element, '%s' in doc with "
                      "%s",
                      p->full, "an array");
            break;
        }
        target_t dt;
        if ((rc = locate(u, &e->to, true, &dt)) < 0) {
            break;
        }
        if (dt.parent->v.value_type == BSON_TYPE_ARRAY) {
            rc = fail(u->err, 2,
                      "The destination field cannot be an array element, '%s' in doc "
                      "with an array",
                      e->to.full);
            break;
        }
        size_t created_at = dt.created_at;
        /* Re-locate the source: creating the destination may have moved nodes. */
        target_t st;
        locate(u, p, false, &st);
        if (st.parent && st.idx >= 0) {
            mnode_remove(st.parent, (size_t)st.idx);
            record_n(u, p, p->n, true);
        }
        if ((rc = locate(u, &e->to, true, &dt)) == 0) {
            dt.created_at = created_at; /* what the first locate created is new */
            if (dt.idx >= 0) {
                mnode_remove(dt.parent, (size_t)dt.idx);
                dt.idx = -1;
            }
            put(u, &e->to, &dt, &cur);
        }
        break;
    }
    }
    if (exists) {
        bson_value_destroy(&cur);
    }
    return rc;
}

static int op_lookup(const char *name, uop_t *op)
{
    for (size_t i = 0; i < sizeof(op_names) / sizeof(op_names[0]); i++) {
        if (strcmp(name, op_names[i].name) == 0) {
            *op = op_names[i].op;
            return 0;
        }
    }
    return -1;
}

static int validate_operand(mc_error_t *err, entry_t *e)
{
    const bson_value_t *v = &e->val;
    char buf[200];
    switch (e->op) {
    case OP_INC:
    case OP_MUL:
        if (!is_number(v->value_type)) {
            render(v, buf, sizeof(buf));
            return fail(err, 14, "Cannot %s with non-numeric argument: {%s: %s}",
                        e->op == OP_INC ? "increment" : "multiply", e->path.full, buf);
        }
        return 0;
    case OP_POP: {
        int64_t d;
        if (!is_number(v->value_type)) {
            render(v, buf, sizeof(buf));
            return fail(err, 9, "Expected a number in: %s: %s", e->path.full, buf);
        }
        if (!get_int(v, &d) || (d != 1 && d != -1)) {
            render(v, buf, sizeof(buf));
            return fail(err, 9, "$pop expects 1 or -1, found: %s", buf);
        }
        e->val.value_type = BSON_TYPE_INT64;
        e->val.value.v_int64 = d;
        return 0;
    }
    case OP_CURRENTDATE:
        if (v->value_type == BSON_TYPE_BOOL) {
            return 0;
        }
        if (v->value_type == BSON_TYPE_DOCUMENT) {
            bson_iter_t it;
            bool ok = false;
            emu_safe_iter_init(&it, v->value.v_doc.data, v->value.v_doc.data_len);
            while (bson_iter_next(&it)) {
                if (strcmp(bson_iter_key(&it), "$type") != 0) {
                    return fail(err, 2, "Unrecognized $currentDate option: %s", bson_iter_key(&it));
                }
                ok = BSON_ITER_HOLDS_UTF8(&it) &&
                     (strcmp(bson_iter_utf8(&it, NULL), "date") == 0 ||
                      strcmp(bson_iter_utf8(&it, NULL), "timestamp") == 0);
            }
            if (ok) {
                return 0;
            }
            return fail(err, 2,
                        "The '$type' string field is required to be 'date' or "
                        "'timestamp': {$currentDate: {field : {$type: 'date'}}}");
        }
        return fail(err, 2,
                    "%s is not valid type for $currentDate. Please use a boolean "
                    "('true') or a $type expression ({$type: 'timestamp/date'}).",
                    emu_type_name(v->value_type));
    case OP_RENAME:
        if (v->value_type != BSON_TYPE_UTF8) {
            render(v, buf, sizeof(buf));
            return fail(err, 2, "The 'to' field for $rename must be a string: %s: %s", e->path.full,
                        buf);
        }
        return 0;
    default: return 0;
    }
}

static void entries_free(entry_t *es, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        upath_free(&es[i].path);
        upath_free(&es[i].to);
    }
    bson_free(es);
}

static int parse_entries(const bson_value_t *update, entry_t **out, size_t *nout, mc_error_t *err)
{
    bson_iter_t it;
    entry_t *es = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    emu_safe_iter_init(&it, update->value.v_doc.data, update->value.v_doc.data_len);
    while (rc == 0 && bson_iter_next(&it)) {
        const char *opname = bson_iter_key(&it);
        uop_t op;
        if (op_lookup(opname, &op) < 0) {
            rc = strcmp(opname, "$bit") == 0
                     ? fail(err, 2, "$bit is not supported by mongo-emulator")
                     : fail(err, 9,
                            "Unknown modifier: %s. Expected a valid update modifier or "
                            "pipeline-style update specified as an array",
                            opname);
            break;
        }
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            char buf[200];
            render(bson_iter_value(&it), buf, sizeof(buf));
            rc = fail(err, 9,
                      "Modifiers operate on fields but we found type %s instead. For "
                      "example: {$mod: {<field>: ...}} not {%s: %s}",
                      emu_type_name(bson_iter_type(&it)), opname, buf);
            break;
        }
        bson_iter_t f;
        bson_iter_recurse(&it, &f);
        while (rc == 0 && bson_iter_next(&f)) {
            if (n == cap) {
                cap = cap ? cap * 2 : 8;
                es = bson_realloc(es, cap * sizeof(entry_t));
            }
            entry_t *e = &es[n++];
            memset(e, 0, sizeof(*e));
            e->op = op;
            e->opname = opname;
            e->val = *bson_iter_value(&f);
            if ((rc = upath_parse(&e->path, bson_iter_key(&f), err)) < 0 ||
                (rc = validate_operand(err, e)) < 0) {
                break;
            }
            if (op == OP_RENAME) {
                if ((rc = upath_parse(&e->to, e->val.value.v_utf8.str, err)) < 0) {
                    break;
                }
                if (strcmp(e->path.full, e->to.full) == 0) {
                    rc = fail(err, 2,
                              "The source and target field for $rename must differ: "
                              "%s: \"%s\"",
                              e->path.full, e->to.full);
                } else if (path_prefix(&e->path, &e->to) || path_prefix(&e->to, &e->path)) {
                    rc = fail(err, 2,
                              "The source and target field for $rename must not be on "
                              "the same path: %s: \"%s\"",
                              e->path.full, e->to.full);
                }
            }
        }
    }
    /* Conflicts: no path may be a prefix of (or equal to) another. */
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const upath_t *pi[2] = {&es[i].path, es[i].op == OP_RENAME ? &es[i].to : NULL};
        for (size_t j = i + 1; rc == 0 && j < n; j++) {
            const upath_t *pj[2] = {&es[j].path, es[j].op == OP_RENAME ? &es[j].to : NULL};
            for (int a = 0; rc == 0 && a < 2; a++) {
                for (int b = 0; rc == 0 && b < 2; b++) {
                    if (!pi[a] || !pj[b]) {
                        continue;
                    }
                    if (path_prefix(pi[a], pj[b])) {
                        rc = fail(err, 40,
                                  "Updating the path '%s' would create a conflict at "
                                  "'%s'",
                                  pj[b]->full, pi[a]->full);
                    } else if (path_prefix(pj[b], pi[a])) {
                        rc = fail(err, 40,
                                  "Updating the path '%s' would create a conflict at "
                                  "'%s'",
                                  pi[a]->full, pj[b]->full);
                    }
                }
            }
        }
    }
    if (rc < 0) {
        entries_free(es, n);
        return rc;
    }
    /* Apply order: by path (destination for $rename), MongoDB 5.0+ style; stable. */
    for (size_t i = 1; i < n; i++) {
        entry_t x = es[i];
        size_t j = i;
        const upath_t *kx = x.op == OP_RENAME ? &x.to : &x.path;
        while (j > 0) {
            const upath_t *kj = es[j - 1].op == OP_RENAME ? &es[j - 1].to : &es[j - 1].path;
            if (path_cmp(kx, kj) >= 0) {
                break;
            }
            es[j] = es[j - 1];
            j--;
        }
        es[j] = x;
    }
    /* upath_t holds pointers into its own buf, which moved with the struct copy: fine, since
     * buf is heap memory; `full` points into the update document. */
    *out = es;
    *nout = n;
    return 0;
}

/* ---------------------------------------------------------------- desc helpers */

static void desc_updated(emu_update_desc_t *d, const char *path, const bson_value_t *v)
{
    bson_append_value(&d->updated_fields, path, -1, v);
}

static void desc_removed(emu_update_desc_t *d, const char *path)
{
    char buf[16];
    const char *k;
    bson_uint32_to_string(bson_count_keys(&d->removed_fields), &k, buf, sizeof(buf));
    bson_append_utf8(&d->removed_fields, k, -1, path, -1);
}

static void desc_truncated(emu_update_desc_t *d, const char *path, int32_t size)
{
    char buf[16];
    const char *k;
    bson_t child;
    bson_uint32_to_string(bson_count_keys(&d->truncated_arrays), &k, buf, sizeof(buf));
    bson_append_document_begin(&d->truncated_arrays, k, -1, &child);
    bson_append_utf8(&child, "field", 5, path, -1);
    bson_append_int32(&child, "newSize", 7, size);
    bson_append_document_end(&d->truncated_arrays, &child);
}

/* Reads the value at a dotted path of the final tree (record paths always exist). */
static bool tree_get(mnode_t *root, const char *path, bson_value_t *out)
{
    upath_t p;
    if (upath_parse(&p, path, NULL) < 0) {
        upath_free(&p);
        return false;
    }
    mnode_t *cur = root;
    bool ok = true;
    for (size_t i = 0; ok && i < p.n; i++) {
        expand(cur);
        size_t ai;
        ssize_t idx;
        if (cur->v.value_type == BSON_TYPE_ARRAY) {
            idx = parse_index(p.c[i], &ai) && ai < cur->n ? (ssize_t)ai : -1;
        } else if (cur->v.value_type == BSON_TYPE_DOCUMENT) {
            idx = find_kid(cur, p.c[i]);
        } else {
            idx = -1;
        }
        if (idx < 0) {
            ok = false;
        } else {
            cur = cur->kids[idx];
        }
    }
    upath_free(&p);
    if (ok) {
        mnode_value(cur, out);
    }
    return ok;
}

static bool id_equal(const bson_t *a, const bson_t *b, bool *a_has)
{
    bson_iter_t ia, ib;
    bool ha = bson_iter_init_find(&ia, a, "_id");
    bool hb = bson_iter_init_find(&ib, b, "_id");
    *a_has = ha;
    if (ha != hb) {
        return false;
    }
    return !ha || binary_equal(bson_iter_value(&ia), bson_iter_value(&ib));
}

static int apply_operators(const bson_t *doc, const bson_value_t *update, bool is_insert,
                           bson_t *out, emu_update_desc_t *desc, bool *modified, mc_error_t *err)
{
    entry_t *es = NULL;
    size_t n = 0;
    int rc = parse_entries(update, &es, &n, err);
    if (rc < 0) {
        return rc;
    }
    ustate_t u = {.root = mnode_from_bson(doc), .orig = doc, .err = err, .is_insert = is_insert};
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = apply_entry(&u, &es[i]);
    }
    if (rc == 0) {
        serialize_kids(u.root, out);
        bool had_id;
        if (!is_insert && !id_equal(doc, out, &had_id) && had_id) {
            rc = fail(err, 66,
                      "Performing an update on the path '_id' would modify the "
                      "immutable field '_id'");
        }
    }
    if (rc == 0) {
        if (modified) {
            *modified = u.nrecs > 0;
        }
        if (desc) {
            /* removals first, then updates, in application order */
            for (size_t i = 0; i < u.nrecs; i++) {
                if (u.recs[i].removed) {
                    desc_removed(desc, u.recs[i].path);
                }
            }
            for (size_t i = 0; i < u.nrecs; i++) {
                bson_value_t v;
                if (!u.recs[i].removed && tree_get(u.root, u.recs[i].path, &v)) {
                    desc_updated(desc, u.recs[i].path, &v);
                    bson_value_destroy(&v);
                }
            }
        }
    } else {
        bson_reinit(out);
    }
    for (size_t i = 0; i < u.nrecs; i++) {
        bson_free(u.recs[i].path);
    }
    bson_free(u.recs);
    mnode_free(u.root);
    entries_free(es, n);
    return rc;
}

/* ---------------------------------------------------------------- pipeline diff */

/* A diff in the server's $v:2 format, kept as separate sections so that its BSON size can be
 * computed exactly like diff_tree's getObjSize(). */
typedef struct dsub dsub_t;
typedef struct ddiff {
    bool is_array;
    bson_t *upd;    /* doc: u/i entries {field: value}; array: {idx: value} */
    bson_t *del;    /* doc only: {field: false}; both on the heap for bson_t's alignment */
    int64_t resize; /* array only, -1 when none */
    dsub_t *subs;
    size_t nsubs, capsubs;
} ddiff_t;

struct dsub {
    char *name; /* field name or array index */
    ddiff_t *d;
};

static ddiff_t *ddiff_new(bool is_array)
{
    ddiff_t *d = bson_malloc0(sizeof(*d));
    d->is_array = is_array;
    d->upd = bson_new();
    d->del = bson_new();
    d->resize = -1;
    return d;
}

static void ddiff_free(ddiff_t *d)
{
    if (!d) {
        return;
    }
    for (size_t i = 0; i < d->nsubs; i++) {
        bson_free(d->subs[i].name);
        ddiff_free(d->subs[i].d);
    }
    bson_free(d->subs);
    bson_destroy(d->upd);
    bson_destroy(d->del);
    bson_free(d);
}

/* Serialized size of the diff: {d: {...}, u: {...}, s<field>: {...}} for documents (inserts
 * and updates counted together, each entry costs the same in either section), {a: true,
 * l: N, u<idx>: v, s<idx>: {...}} for arrays. */
static size_t ddiff_size(const ddiff_t *d)
{
    size_t sz = 5;
    bson_iter_t it;
    if (d->is_array) {
        sz += 1 + 2 + 1; /* a: true */
        if (d->resize >= 0) {
            sz += 1 + 2 + 4;
        }
        bson_iter_init(&it, d->upd);
        while (bson_iter_next(&it)) {
            /* element = type + "u<idx>\0" + value; value size from the stored element */
            sz += (size_t)(1 + 1 + bson_iter_key_len(&it) + 1);
            bson_t tmp = BSON_INITIALIZER;
            bson_append_value(&tmp, "", 0, bson_iter_value(&it));
            sz += tmp.len - 5 - 2;
            bson_destroy(&tmp);
        }
    } else {
        if (!bson_empty(d->del)) {
            sz += 1 + 2 + d->del->len;
        }
        if (!bson_empty(d->upd)) {
            sz += 1 + 2 + d->upd->len;
        }
    }
    for (size_t i = 0; i < d->nsubs; i++) {
        sz += 1 + 1 + strlen(d->subs[i].name) + 1 + ddiff_size(d->subs[i].d);
    }
    return sz;
}

static ddiff_t *compute_diff(const bson_value_t *pre, const bson_value_t *post, int depth);

static void add_sub_or_update(ddiff_t *d, const char *name, const bson_value_t *pre,
                              const bson_value_t *post, int depth)
{
    ddiff_t *sub = depth < MAX_DIFF_DEPTH ? compute_diff(pre, post, depth + 1) : NULL;
    if (!sub) {
        bson_append_value(d->upd, name, -1, post);
        return;
    }
    if (d->nsubs == d->capsubs) {
        d->capsubs = d->capsubs ? d->capsubs * 2 : 4;
        d->subs = bson_realloc(d->subs, d->capsubs * sizeof(dsub_t));
    }
    d->subs[d->nsubs].name = bson_strdup(name);
    d->subs[d->nsubs].d = sub;
    d->nsubs++;
}

/* doc_diff::computeDocDiff / computeArrayDiff: returns NULL when the diff would not be smaller
 * than the new value. */
static ddiff_t *compute_diff(const bson_value_t *pre, const bson_value_t *post, int depth)
{
    bool is_array = post->value_type == BSON_TYPE_ARRAY;
    ddiff_t *d = ddiff_new(is_array);
    bson_iter_t pi, qi;
    emu_safe_iter_init(&pi, pre->value.v_doc.data, pre->value.v_doc.data_len);
    emu_safe_iter_init(&qi, post->value.v_doc.data, post->value.v_doc.data_len);
    bool pm = bson_iter_next(&pi), qm = bson_iter_next(&qi);
    if (is_array) {
        uint32_t idx = 0;
        while (pm && qm) {
            const bson_value_t *a = bson_iter_value(&pi);
            bson_value_t b = *bson_iter_value(&qi);
            if (!binary_equal(a, &b)) {
                char key[16];
                snprintf(key, sizeof(key), "%u", idx);
                if (a->value_type == b.value_type &&
                    (a->value_type == BSON_TYPE_DOCUMENT || a->value_type == BSON_TYPE_ARRAY)) {
                    bson_value_t ac = *a;
                    add_sub_or_update(d, key, &ac, &b, depth);
                } else {
                    bson_append_value(d->upd, key, -1, &b);
                }
            }
            idx++;
            pm = bson_iter_next(&pi);
            qm = bson_iter_next(&qi);
        }
        while (qm) {
            char key[16];
            snprintf(key, sizeof(key), "%u", idx++);
            bson_append_value(d->upd, key, -1, bson_iter_value(&qi));
            qm = bson_iter_next(&qi);
        }
        if (pm) {
            d->resize = idx;
        }
    } else {
        /* Fields are matched in order; a name mismatch deletes the old field (re-inserted
         * later if it still exists), like the server. */
        bson_t deletes = BSON_INITIALIZER;
        while (pm && qm) {
            const char *pk = bson_iter_key(&pi), *qk = bson_iter_key(&qi);
            bson_value_t a = *bson_iter_value(&pi);
            bson_value_t b = *bson_iter_value(&qi);
            if (strcmp(pk, qk) == 0) {
                if (!binary_equal(&a, &b)) {
                    if (a.value_type == b.value_type &&
                        (a.value_type == BSON_TYPE_DOCUMENT || a.value_type == BSON_TYPE_ARRAY)) {
                        add_sub_or_update(d, pk, &a, &b, depth);
                    } else {
                        bson_append_value(d->upd, pk, -1, &b);
                    }
                }
                pm = bson_iter_next(&pi);
                qm = bson_iter_next(&qi);
            } else {
                bson_append_bool(&deletes, pk, -1, false);
                pm = bson_iter_next(&pi);
            }
        }
        while (pm) {
            bson_append_bool(d->del, bson_iter_key(&pi), -1, false);
            pm = bson_iter_next(&pi);
        }
        while (qm) {
            const char *qk = bson_iter_key(&qi);
            bson_append_value(d->upd, qk, -1, bson_iter_value(&qi));
            qm = bson_iter_next(&qi);
        }
        bson_iter_t di;
        bson_iter_init(&di, &deletes);
        while (bson_iter_next(&di)) {
            bson_iter_t chk;
            if (!bson_iter_init_find(&chk, d->upd, bson_iter_key(&di))) {
                bson_append_bool(d->del, bson_iter_key(&di), -1, false);
            }
        }
        bson_destroy(&deletes);
    }
    if (depth > 0 && ddiff_size(d) >= post->value.v_doc.data_len) {
        ddiff_free(d);
        return NULL;
    }
    return d;
}

static void diff_to_desc(const ddiff_t *d, const char *prefix, emu_update_desc_t *desc)
{
    bson_iter_t it;
    char *path;
    bson_iter_init(&it, d->del);
    while (bson_iter_next(&it)) {
        path = prefix ? bson_strdup_printf("%s.%s", prefix, bson_iter_key(&it))
                      : bson_strdup(bson_iter_key(&it));
        desc_removed(desc, path);
        bson_free(path);
    }
    bson_iter_init(&it, d->upd);
    while (bson_iter_next(&it)) {
        path = prefix ? bson_strdup_printf("%s.%s", prefix, bson_iter_key(&it))
                      : bson_strdup(bson_iter_key(&it));
        desc_updated(desc, path, bson_iter_value(&it));
        bson_free(path);
    }
    if (d->is_array && d->resize >= 0) {
        desc_truncated(desc, prefix ? prefix : "", (int32_t)d->resize);
    }
    for (size_t i = 0; i < d->nsubs; i++) {
        path = prefix ? bson_strdup_printf("%s.%s", prefix, d->subs[i].name)
                      : bson_strdup(d->subs[i].name);
        diff_to_desc(d->subs[i].d, path, desc);
        bson_free(path);
    }
}

/* Appends `repl` to `out` as the new version of `doc`: _id stays first and may not change, and
 * a replacement without _id keeps the original one. */
static int append_replacement(const bson_t *doc, const bson_t *repl, bson_t *out, mc_error_t *err)
{
    bson_iter_t it, oid, nid;
    bool had = bson_iter_init_find(&oid, doc, "_id");
    bool has = bson_iter_init_find(&nid, repl, "_id");
    if (had && has && !binary_equal(bson_iter_value(&oid), bson_iter_value(&nid))) {
        char v[200];
        render(bson_iter_value(&nid), v, sizeof(v));
        return fail(err, 66,
                    "After applying the update, the (immutable) field '_id' was found "
                    "to have been altered to _id: %s",
                    v);
    }
    if (had) {
        bson_append_value(out, "_id", 3, bson_iter_value(&oid));
    } else if (has) {
        bson_append_value(out, "_id", 3, bson_iter_value(&nid));
    }
    bson_iter_init(&it, repl);
    while (bson_iter_next(&it)) {
        if (strcmp(bson_iter_key(&it), "_id") != 0) {
            bson_append_value(out, bson_iter_key(&it), -1, bson_iter_value(&it));
        }
    }
    return 0;
}

static const char *const update_stages[] = {"$set",     "$addFields",   "$unset",
                                            "$project", "$replaceRoot", "$replaceWith"};

static int apply_pipeline(const bson_t *doc, const bson_value_t *update, bson_t *out,
                          emu_update_desc_t *desc, bool *modified, mc_error_t *err)
{
    bson_iter_t it;
    bson_t stages;
    bson_init_static(&stages, update->value.v_doc.data, update->value.v_doc.data_len);
    bson_iter_init(&it, &stages);
    while (bson_iter_next(&it)) {
        bson_iter_t s;
        if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &s) || !bson_iter_next(&s)) {
            return fail(err, 40323,
                        "A pipeline stage specification object must contain exactly "
                        "one field.");
        }
        bool ok = false;
        for (size_t i = 0; i < sizeof(update_stages) / sizeof(update_stages[0]); i++) {
            ok |= strcmp(bson_iter_key(&s), update_stages[i]) == 0;
        }
        if (!ok) {
            return fail(err, 72, "%s is not allowed to be used within an update",
                        bson_iter_key(&s));
        }
    }
    emu_pipeline_t *p = emu_pipeline_new(&stages, true, err);
    if (!p) {
        return MC_EINVAL;
    }
    bson_t res;
    int rc = emu_pipeline_apply_one(p, doc, &res, err);
    emu_pipeline_destroy(p);
    if (rc < 0) {
        bson_destroy(&res);
        return rc;
    }
    /* the pipeline's result replaces the document, as the server's replacement step does */
    rc = append_replacement(doc, &res, out, err);
    bson_destroy(&res);
    if (rc < 0) {
        return rc;
    }
    bool changed =
        out->len != doc->len || memcmp(bson_get_data(out), bson_get_data(doc), doc->len) != 0;
    if (modified) {
        *modified = changed;
    }
    if (desc && changed) {
        bson_value_t pre = {.value_type = BSON_TYPE_DOCUMENT}, post = pre;
        pre.value.v_doc.data = (uint8_t *)bson_get_data(doc);
        pre.value.v_doc.data_len = doc->len;
        post.value.v_doc.data = (uint8_t *)bson_get_data(out);
        post.value.v_doc.data_len = out->len;
        ddiff_t *d = compute_diff(&pre, &post, 0);
        diff_to_desc(d, NULL, desc);
        ddiff_free(d);
    }
    return 0;
}

static int apply_replacement(const bson_t *doc, const bson_value_t *update, bson_t *out,
                             bool *modified, mc_error_t *err)
{
    bson_t repl;
    bson_init_static(&repl, update->value.v_doc.data, update->value.v_doc.data_len);
    int rc = append_replacement(doc, &repl, out, err);
    if (rc < 0) {
        return rc;
    }
    if (modified) {
        *modified =
            out->len != doc->len || memcmp(bson_get_data(out), bson_get_data(doc), doc->len) != 0;
    }
    return 0;
}

int emu_update_apply(const bson_t *doc, const bson_value_t *update, bool is_insert, bson_t *out,
                     emu_update_desc_t *desc, bool *modified, mc_error_t *err)
{
    emu_update_kind_t kind;
    bson_init(out);
    if (modified) {
        *modified = false;
    }
    int rc = emu_update_kind(update, &kind, err);
    if (rc < 0) {
        return rc;
    }
    /* Work on a private description so that a failure leaves the caller's untouched. */
    emu_update_desc_t local;
    emu_update_desc_init(&local);
    switch (kind) {
    case EMU_UPDATE_OPERATORS:
        rc = apply_operators(doc, update, is_insert, out, &local, modified, err);
        break;
    case EMU_UPDATE_REPLACEMENT: rc = apply_replacement(doc, update, out, modified, err); break;
    case EMU_UPDATE_PIPELINE: rc = apply_pipeline(doc, update, out, &local, modified, err); break;
    }
    if (rc < 0) {
        bson_reinit(out);
        if (modified) {
            *modified = false;
        }
    } else if (desc) {
        bson_concat(&desc->updated_fields, &local.updated_fields);
        /* arrays: renumber while appending */
        bson_iter_t it;
        bson_iter_init(&it, &local.removed_fields);
        while (bson_iter_next(&it)) {
            desc_removed(desc, bson_iter_utf8(&it, NULL));
        }
        bson_iter_init(&it, &local.truncated_arrays);
        while (bson_iter_next(&it)) {
            bson_iter_t f;
            const char *field = "";
            int32_t size = 0;
            bson_iter_recurse(&it, &f);
            while (bson_iter_next(&f)) {
                if (strcmp(bson_iter_key(&f), "field") == 0) {
                    field = bson_iter_utf8(&f, NULL);
                } else {
                    size = bson_iter_int32(&f);
                }
            }
            desc_truncated(desc, field, size);
        }
    }
    emu_update_desc_cleanup(&local);
    return rc;
}

/* ---------------------------------------------------------------- upsert seed */

static int seed_set(mnode_t *root, const char *path, const bson_value_t *v, mc_error_t *err)
{
    upath_t p;
    ustate_t u = {.root = root, .err = err};
    target_t t;
    int rc = upath_parse(&p, path, err);
    if (rc == 0) {
        rc = locate(&u, &p, true, &t);
    }
    if (rc == 0) {
        if (t.idx >= 0) {
            rc =
                fail(err, 54, "cannot infer query fields to set, path '%s' is matched twice", path);
        } else {
            put(&u, &p, &t, v);
        }
    }
    for (size_t i = 0; i < u.nrecs; i++) {
        bson_free(u.recs[i].path);
    }
    bson_free(u.recs);
    upath_free(&p);
    return rc;
}

static int seed_from(mnode_t *root, const bson_value_t *q, int depth, mc_error_t *err)
{
    bson_iter_t it;
    if (depth > 32) {
        return 0;
    }
    emu_safe_iter_init(&it, q->value.v_doc.data, q->value.v_doc.data_len);
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        bson_value_t v = *bson_iter_value(&it);
        int rc = 0;
        if (strcmp(k, "$and") == 0 && v.value_type == BSON_TYPE_ARRAY) {
            bson_iter_t a;
            emu_safe_iter_init(&a, v.value.v_doc.data, v.value.v_doc.data_len);
            while (rc == 0 && bson_iter_next(&a)) {
                if (BSON_ITER_HOLDS_DOCUMENT(&a)) {
                    bson_value_t sub = *bson_iter_value(&a);
                    rc = seed_from(root, &sub, depth + 1, err);
                }
            }
        } else if (k[0] == '$') {
            continue;
        } else if (v.value_type == BSON_TYPE_REGEX) {
            continue;
        } else if (v.value_type == BSON_TYPE_DOCUMENT) {
            bson_iter_t o;
            emu_safe_iter_init(&o, v.value.v_doc.data, v.value.v_doc.data_len);
            if (bson_iter_next(&o) && bson_iter_key(&o)[0] == '$') {
                /* operator document: only $eq contributes */
                emu_safe_iter_init(&o, v.value.v_doc.data, v.value.v_doc.data_len);
                while (rc == 0 && bson_iter_next(&o)) {
                    if (strcmp(bson_iter_key(&o), "$eq") == 0) {
                        rc = seed_set(root, k, bson_iter_value(&o), err);
                    }
                }
            } else {
                rc = seed_set(root, k, &v, err);
            }
        } else {
            rc = seed_set(root, k, &v, err);
        }
        if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

int emu_upsert_seed(const bson_t *query, bson_t *out, mc_error_t *err)
{
    bson_init(out);
    bson_t empty = BSON_INITIALIZER;
    mnode_t *root = mnode_from_bson(&empty);
    bson_value_t q = {.value_type = BSON_TYPE_DOCUMENT};
    q.value.v_doc.data = (uint8_t *)bson_get_data(query);
    q.value.v_doc.data_len = query->len;
    int rc = seed_from(root, &q, 0, err);
    if (rc == 0) {
        /* _id first, as the server puts it */
        ssize_t id = find_kid(root, "_id");
        if (id > 0) {
            mnode_t *m = root->kids[id];
            memmove(root->kids + 1, root->kids, (size_t)id * sizeof(mnode_t *));
            root->kids[0] = m;
        }
        serialize_kids(root, out);
    }
    mnode_free(root);
    bson_destroy(&empty);
    return rc;
}
