/*
 * split_event.c: the fragments of a split change event back into one document (split_event.h).
 *
 * Runs on the thread that reads the change stream (watcher or catch-up); one instance each
 * (mc__split_too_large_token(): any thread, pure).
 * Invariants: while an event is under way (of > 0) the fragments 1..n of it are held, in
 * order, n < of; anything else (a gap, a repeat, a new `of`) resets the state with an error,
 * because a reassembled event missing a field would be delivered as if it were whole.
 */
#include "split_event.h"

#include <stdlib.h>
#include <string.h>

/* A top-level field larger than this is left out of a thin fragment (skip mode): the notice
 * needs only small fields, and what it shows of documentKey is cut at 4 KiB anyway. */
#define THIN_FIELD_MAX (16 * 1024)
#define PATH_DEPTH_MAX 64
/* What a thin image keeps besides the recipient path: its small fields, up to this much. */
#define IMAGE_BUDGET (64 * 1024)

/* Where the fields of a change event usually stand (an unsplit event's order); fields not
 * listed follow in the order the fragments gave them. */
static const char *const field_order[] = {
    "lsid",        "txnNumber",      "_id",         "operationType",
    "clusterTime", "wallTime",       "collectionUUID", "ns",
    "to",          "documentKey",    "updateDescription", "fullDocument",
    "fullDocumentBeforeChange", NULL};

bool mc__split_is_fragment(const bson_t *change)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, change, "splitEvent") && BSON_ITER_HOLDS_DOCUMENT(&it);
}

void mc__split_reset(mc__split_t *sp)
{
    for (uint32_t k = 0; k < sp->n; k++) {
        bson_destroy(sp->frags[k]);
    }
    free(sp->frags);
    memset(sp, 0, sizeof(*sp));
}

static int split_error(mc__split_t *sp, mc_error_t *err, int code, const char *what)
{
    mc__split_reset(sp);
    return mc_error_set(err, code, MC_DOMAIN_MONGOCAST, code, "split event: %s", what);
}

/* The integer at `key` of splitEvent, or -1. */
static int64_t split_field(const bson_t *frag, const char *key)
{
    bson_iter_t it, sub;
    if (!bson_iter_init_find(&it, frag, "splitEvent") || !BSON_ITER_HOLDS_DOCUMENT(&it) ||
        !bson_iter_recurse(&it, &sub) || !bson_iter_find(&sub, key) ||
        !BSON_ITER_HOLDS_NUMBER(&sub)) {
        return -1;
    }
    return bson_iter_as_int64(&sub);
}

/* Appends to `out` the field of `doc` that the dotted `path` starts with, cut down to what the
 * path selects (for "a.b": a: {b: v}); nothing when the path does not reach a value. Arrays on
 * the way are not followed. */
static bool project_path(bson_t *out, const bson_t *doc, const char *path, int depth)
{
    const char *dot = strchr(path, '.');
    size_t seg = dot ? (size_t)(dot - path) : strlen(path);
    bson_iter_t it;
    if (depth > PATH_DEPTH_MAX || !bson_iter_init(&it, doc)) {
        return false;
    }
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (strlen(k) != seg || memcmp(k, path, seg) != 0) {
            continue;
        }
        if (!dot) {
            return bson_append_iter(out, k, -1, &it);
        }
        const uint8_t *data;
        uint32_t len;
        bson_t sub;
        if (!BSON_ITER_HOLDS_DOCUMENT(&it)) {
            return false;
        }
        bson_iter_document(&it, &len, &data);
        if (!bson_init_static(&sub, data, len)) {
            return false;
        }
        bson_t inner = BSON_INITIALIZER;
        bool ok = project_path(&inner, &sub, dot + 1, depth + 1) &&
                  bson_append_document(out, k, -1, &inner);
        bson_destroy(&inner);
        return ok;
    }
    return false;
}

/* An image, thin: the recipient path (`rest`, the part after "fullDocument.") however deep,
 * then its other small top-level fields while they fit IMAGE_BUDGET, so that the rules of a
 * by_collection or lookup recipient (whose paths the watcher does not hand over) usually find
 * their value too. */
static void thin_image(bson_t *out, const char *key, const bson_t *doc, const char *rest)
{
    bson_t img;
    bson_append_document_begin(out, key, -1, &img);
    size_t seg = 0;
    if (rest) {
        const char *dot = strchr(rest, '.');
        seg = dot ? (size_t)(dot - rest) : strlen(rest);
        project_path(&img, doc, rest, 0);
    }
    size_t used = 0;
    bson_iter_t it;
    if (bson_iter_init(&it, doc)) {
        while (bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            size_t elem = (size_t)(it.next_off - it.off);
            if ((rest && strlen(k) == seg && memcmp(k, rest, seg) == 0) ||
                elem > THIN_FIELD_MAX || used + elem > IMAGE_BUDGET) {
                continue;
            }
            used += elem;
            bson_append_iter(&img, k, -1, &it);
        }
    }
    bson_append_document_end(out, &img);
}

/* The fields of `frag` a notice needs: small ones whole, the images thin (thin_image()). */
static bson_t *thin_copy(const bson_t *frag, const char *recipient_path)
{
    bson_t *out = bson_new();
    bson_iter_t it;
    if (!out || !bson_iter_init(&it, frag)) {
        bson_destroy(out);
        return NULL;
    }
    /* The recipient is read at the same path from both images (event.c). */
    const char *rest = recipient_path && strncmp(recipient_path, "fullDocument.", 13) == 0
                           ? recipient_path + 13
                           : NULL;
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        bool image = strcmp(k, "fullDocument") == 0 || strcmp(k, "fullDocumentBeforeChange") == 0;
        if (image && BSON_ITER_HOLDS_DOCUMENT(&it)) {
            const uint8_t *data;
            uint32_t len;
            bson_t doc;
            bson_iter_document(&it, &len, &data);
            if (bson_init_static(&doc, data, len)) {
                thin_image(out, k, &doc, rest);
            }
            continue;
        }
        /* The element's whole size (type, key, value), from the iterator's offsets. */
        if ((size_t)(it.next_off - it.off) > THIN_FIELD_MAX) {
            continue;
        }
        bson_append_iter(out, k, -1, &it);
    }
    return out;
}

int mc__split_add(mc__split_t *sp, const bson_t *frag, bool thin, const char *recipient_path,
                  bool *complete, mc_error_t *err)
{
    *complete = false;
    int64_t n = split_field(frag, "fragment"), of = split_field(frag, "of");
    if (n < 1 || of < 1 || n > of) {
        return split_error(sp, err, MC_EINVAL, "splitEvent without a valid {fragment, of}");
    }
    if (of > MC__SPLIT_MAX_FRAGMENTS) {
        return split_error(sp, err, MC_ELIMIT, "more fragments than mongocast reassembles");
    }
    if ((sp->of == 0 && n != 1) || (sp->of != 0 && ((uint32_t)of != sp->of || (uint32_t)n != sp->n + 1))) {
        return split_error(sp, err, MC_EINVAL,
                           "fragments out of order (a fragment is missing or repeated)");
    }
    if (sp->of == 0) {
        sp->frags = calloc((size_t)of, sizeof(*sp->frags));
        if (!sp->frags) {
            return split_error(sp, err, MC_ENOMEM, "out of memory");
        }
        sp->of = (uint32_t)of;
    }
    bson_t *copy = thin ? thin_copy(frag, recipient_path) : bson_copy(frag);
    if (!copy) {
        return split_error(sp, err, MC_ENOMEM, "out of memory");
    }
    sp->frags[sp->n++] = copy;
    sp->bytes += frag->len;
    *complete = sp->n == sp->of;
    return 0;
}

/* Whether `key` is one of field_order's. */
static bool ordered_field(const char *key)
{
    for (size_t k = 0; field_order[k]; k++) {
        if (strcmp(key, field_order[k]) == 0) {
            return true;
        }
    }
    return false;
}

bson_t *mc__split_take(mc__split_t *sp, size_t *bytes)
{
    *bytes = sp->bytes;
    bson_t *out = sp->of > 0 && sp->n == sp->of ? bson_new() : NULL;
    bool ok = out != NULL;
    const bson_t *last = ok ? sp->frags[sp->n - 1] : NULL;
    bson_iter_t it;
    for (size_t k = 0; ok && field_order[k]; k++) {
        const char *key = field_order[k];
        if (strcmp(key, "_id") == 0) {
            ok = bson_iter_init_find(&it, last, "_id") && bson_append_iter(out, "_id", 3, &it);
            continue;
        }
        for (uint32_t f = 0; f < sp->n; f++) {
            if (bson_iter_init_find(&it, sp->frags[f], key)) {
                ok = bson_append_iter(out, key, -1, &it);
                break;
            }
        }
    }
    for (uint32_t f = 0; ok && f < sp->n; f++) {
        if (!bson_iter_init(&it, sp->frags[f])) {
            ok = false;
            break;
        }
        while (ok && bson_iter_next(&it)) {
            const char *key = bson_iter_key(&it);
            if (strcmp(key, "splitEvent") != 0 && !ordered_field(key)) {
                ok = bson_append_iter(out, key, -1, &it);
            }
        }
    }
    mc__split_reset(sp);
    if (!ok) {
        bson_destroy(out);
        return NULL;
    }
    return out;
}

bool mc__split_too_large_token(const char *msg, char *data, size_t cap, size_t *size)
{
    static const char lead[] = "First element: _id: { _data: \"";
    const char *p = strstr(msg, "BSONObj size: ");
    *size = p ? (size_t)strtoull(p + 14, NULL, 10) : 0;
    p = strstr(msg, lead);
    if (!p) {
        return false;
    }
    p += sizeof(lead) - 1;
    size_t n = strspn(p, "0123456789abcdefABCDEF");
    if (n == 0 || n >= cap || p[n] != '"') {
        return false; /* "..." when MongoDB cut a long token short */
    }
    memcpy(data, p, n);
    data[n] = '\0';
    return true;
}
