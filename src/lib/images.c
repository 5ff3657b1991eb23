/*
 * images.c: keeps a stream's pre- and post-images on, or says loudly that they are off
 * (images.h).
 *
 * Thread: the stream's watcher thread; it writes the stream's status fields under the
 * stream's lock. A sink's catch-up thread has its own quiet instance, which writes no status.
 *
 * Invariants: `known` holds the collections (db, coll) whose images this instance checked and
 * found on (or turned on) since they last went away (drop, rename, dropDatabase); at most
 * MAX_KNOWN entries (when full it is emptied and relearnt, one listCollections per
 * collection). `pending` is set while the watched collection of a collection-level stream is
 * not known to have its images on.
 */
#include "images.h"

#include "mongocast/images.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_KNOWN 256
#define RECHECK_MS 1000
#define NAME_MAX_LEN 255

typedef struct known {
    char db[64];
    char coll[NAME_MAX_LEN + 1];
} known_t;

struct mc__images {
    mc__stream_t *s;
    const mc_stream_config_t *cfg;
    bool want_post, want_pre, ensure;
    bool quiet; /* a catch-up's instance: no stream status, no missing-image log */
    bool pending; /* collection-level stream: its collection needs a look */
    int64_t next_check_ms;
    known_t *known; /* database- and cluster-level streams with ensure_images */
    size_t n_known;
    char problem_db[64], problem_coll[NAME_MAX_LEN + 1]; /* where images were last found off */
    mc_log_ratelimit_t rl_off, rl_missing;
};

/* ---- Status ------------------------------------------------------------------------------ */

static void set_problem(mc__images_t *im, const char *db, const char *coll, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static void set_problem(mc__images_t *im, const char *db, const char *coll, const char *fmt, ...)
{
    if (im->quiet) {
        return;
    }
    char msg[sizeof(im->s->status.images_problem)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&im->s->lock);
    bson_strncpy(im->s->status.images_problem, msg, sizeof(im->s->status.images_problem));
    pthread_mutex_unlock(&im->s->lock);
    bson_strncpy(im->problem_db, db ? db : "", sizeof(im->problem_db));
    bson_strncpy(im->problem_coll, coll ? coll : "", sizeof(im->problem_coll));
}

/* Clears the problem when it was about db.coll (NULL coll: whatever it was about). */
static void clear_problem(mc__images_t *im, const char *db, const char *coll)
{
    if (im->quiet || !im->problem_coll[0] ||
        (coll && (strcmp(im->problem_coll, coll) != 0 || strcmp(im->problem_db, db) != 0))) {
        return;
    }
    im->problem_db[0] = im->problem_coll[0] = '\0';
    pthread_mutex_lock(&im->s->lock);
    im->s->status.images_problem[0] = '\0';
    pthread_mutex_unlock(&im->s->lock);
}

/* What the stream asks for, for messages. */
static const char *wanted(const mc__images_t *im)
{
    return im->want_pre && im->want_post ? "pre- and post-images"
           : im->want_pre                ? "pre-images (full_document_before_change)"
                                         : "post-images (full_document)";
}

/* ---- Commands ----------------------------------------------------------------------------- */

/* Public (mongocast/images.h): also used by `mongocast check` and `enable-images`. */
mc_images_state_t mc_images_state(mongoc_client_t *client, const char *db, const char *coll,
                                  bson_error_t *err)
{
    mongoc_database_t *d = mongoc_client_get_database(client, db);
    bson_t opts = BSON_INITIALIZER, filter;
    BSON_APPEND_DOCUMENT_BEGIN(&opts, "filter", &filter);
    BSON_APPEND_UTF8(&filter, "name", coll);
    bson_append_document_end(&opts, &filter);
    mongoc_cursor_t *cur = mongoc_database_find_collections_with_opts(d, &opts);
    const bson_t *doc;
    mc_images_state_t st = MC_IMAGES_NO_COLLECTION;
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "name") || !BSON_ITER_HOLDS_UTF8(&it) ||
            strcmp(bson_iter_utf8(&it, NULL), coll) != 0) {
            continue; /* a server that ignored the filter */
        }
        st = MC_IMAGES_OFF;
        if (bson_iter_init(&it, doc) &&
            bson_iter_find_descendant(&it, "options.changeStreamPreAndPostImages.enabled", &it) &&
            BSON_ITER_HOLDS_BOOL(&it) && bson_iter_bool(&it)) {
            st = MC_IMAGES_ON;
        }
    }
    if (mongoc_cursor_error(cur, err)) {
        st = MC_IMAGES_ERROR;
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(&opts);
    mongoc_database_destroy(d);
    return st;
}

bool mc_images_enable(mongoc_client_t *client, const char *db, const char *coll, bson_error_t *err)
{
    bson_t cmd = BSON_INITIALIZER, cs;
    BSON_APPEND_UTF8(&cmd, "collMod", coll);
    BSON_APPEND_DOCUMENT_BEGIN(&cmd, "changeStreamPreAndPostImages", &cs);
    BSON_APPEND_BOOL(&cs, "enabled", true);
    bson_append_document_end(&cmd, &cs);
    bool ok = mongoc_client_command_simple(client, db, &cmd, NULL, NULL, err);
    bson_destroy(&cmd);
    return ok;
}

/* Looks at db.coll and, with ensure_images, turns its images on. Returns what it is now. */
static mc_images_state_t ensure(mc__images_t *im, const char *db, const char *coll)
{
    mongoc_client_t *client = mongoc_client_pool_pop(im->s->engine->pool);
    bson_error_t err;
    memset(&err, 0, sizeof(err));
    mc_images_state_t st = mc_images_state(client, db, coll, &err);
    if (st == MC_IMAGES_OFF && im->ensure) {
        if (mc_images_enable(client, db, coll, &err)) {
            mc_log(MC_LOG_NOTICE, "images",
                   "turned on changeStreamPreAndPostImages stream=%s ns=%s.%s (ensure_images)",
                   im->cfg->name, db, coll);
            st = MC_IMAGES_ON;
        } else {
            mc_log_ratelimited(&im->rl_off, MC_LOG_ERROR, "images",
                               "cannot turn on changeStreamPreAndPostImages stream=%s ns=%s.%s "
                               "(ensure_images): %s",
                               im->cfg->name, db, coll, err.message);
            set_problem(im, db, coll, "cannot turn on %s on %s.%s: %s", wanted(im), db, coll,
                        err.message);
            st = MC_IMAGES_ERROR;
        }
    } else if (st == MC_IMAGES_OFF) {
        mc_log_ratelimited(&im->rl_off, MC_LOG_ERROR, "images",
                           "%s are OFF stream=%s ns=%s.%s: updates and deletes from there reach "
                           "admins only; run mongocast enable-images URI %s %s, or set "
                           "ensure_images: true",
                           wanted(im), im->cfg->name, db, coll, db, coll);
        set_problem(im, db, coll,
                    "%s are off on %s.%s: run mongocast enable-images URI %s %s, or set "
                    "ensure_images: true",
                    wanted(im), db, coll, db, coll);
    } else if (st == MC_IMAGES_ERROR) {
        mc_log_ratelimited(&im->rl_off, MC_LOG_WARN, "images",
                           "cannot list collection options stream=%s ns=%s.%s: %s", im->cfg->name,
                           db, coll, err.message);
    }
    if (st == MC_IMAGES_ON) {
        clear_problem(im, db, coll);
    }
    mongoc_client_pool_push(im->s->engine->pool, client);
    return st;
}

/* ---- Known collections ---------------------------------------------------------------------- */

static long known_find(const mc__images_t *im, const char *db, const char *coll)
{
    for (size_t i = 0; i < im->n_known; i++) {
        if (strcmp(im->known[i].coll, coll) == 0 && strcmp(im->known[i].db, db) == 0) {
            return (long)i;
        }
    }
    return -1;
}

static void known_add(mc__images_t *im, const char *db, const char *coll)
{
    if (strlen(db) >= sizeof(im->known[0].db) || strlen(coll) > NAME_MAX_LEN) {
        return; /* not kept: looked at again next time, which is only slower */
    }
    if (im->n_known == MAX_KNOWN) {
        im->n_known = 0;
    }
    bson_strncpy(im->known[im->n_known].db, db, sizeof(im->known[0].db));
    bson_strncpy(im->known[im->n_known].coll, coll, sizeof(im->known[0].coll));
    im->n_known++;
}

static void known_remove(mc__images_t *im, const char *db, const char *coll)
{
    for (size_t i = 0; i < im->n_known;) {
        if (strcmp(im->known[i].db, db) == 0 && (!coll || strcmp(im->known[i].coll, coll) == 0)) {
            im->known[i] = im->known[--im->n_known];
        } else {
            i++;
        }
    }
}

/* ---- Hooks -------------------------------------------------------------------------------- */

mc__images_t *mc__images_new(mc__stream_t *s, bool quiet)
{
    const mc_stream_config_t *c = s->cfg;
    bool want_post = c->full_document == MC_FULL_DOCUMENT_WHEN_AVAILABLE ||
                     c->full_document == MC_FULL_DOCUMENT_REQUIRED;
    bool want_pre = c->full_document_before_change != MC_BEFORE_CHANGE_OFF;
    if (!want_post && !want_pre && !c->ensure_images) {
        return NULL;
    }
    mc__images_t *im = calloc(1, sizeof(*im));
    if (!im) {
        return NULL;
    }
    if (c->ensure_images && !c->collection &&
        !(im->known = calloc(MAX_KNOWN, sizeof(*im->known)))) {
        free(im);
        return NULL;
    }
    im->s = s;
    im->cfg = c;
    im->want_post = want_post;
    im->want_pre = want_pre;
    im->ensure = c->ensure_images;
    im->quiet = quiet;
    im->rl_off = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    im->rl_missing = (mc_log_ratelimit_t)MC_LOG_RATELIMIT_INIT(10000);
    return im;
}

void mc__images_destroy(mc__images_t *im)
{
    if (im) {
        free(im->known);
        free(im);
    }
}

/* A by_collection key as (db, coll) of the stream. */
static bool rule_ns(const mc__images_t *im, const char *key, char *db, size_t db_cap,
                    const char **coll)
{
    if (im->cfg->db) {
        bson_strncpy(db, im->cfg->db, db_cap);
        *coll = key;
        return true;
    }
    const char *dot = strchr(key, '.');
    if (!dot || (size_t)(dot - key) >= db_cap) {
        return false;
    }
    memcpy(db, key, (size_t)(dot - key));
    db[dot - key] = '\0';
    *coll = dot + 1;
    return true;
}

static void ensure_lookup(mc__images_t *im, const mc_recipient_lookup_t *l)
{
    if (l && l->db && l->collection && ensure(im, l->db, l->collection) == MC_IMAGES_ON &&
        im->known) {
        known_add(im, l->db, l->collection);
    }
}

void mc__images_on_open(mc__images_t *im, bool after_invalidate)
{
    if (!im) {
        return;
    }
    const mc_stream_config_t *c = im->cfg;
    if (c->collection) {
        mc_images_state_t st = ensure(im, c->db, c->collection);
        /* Gone after an invalidate, or off without ensure_images: look again before routing
         * events from it. */
        im->pending = st != MC_IMAGES_ON;
        im->next_check_ms = mc__now_ms() + RECHECK_MS;
        (void)after_invalidate;
    } else {
        if (im->known) {
            im->n_known = 0;
        }
        for (size_t i = 0; i < c->n_by_collection; i++) {
            char db[64];
            const char *coll;
            if (rule_ns(im, c->by_collection[i].collection, db, sizeof(db), &coll) &&
                ensure(im, db, coll) == MC_IMAGES_ON && im->known) {
                known_add(im, db, coll);
            }
        }
    }
    if (!im->ensure) {
        return;
    }
    /* Lookups stay exact through changes with unknown previous values only with images on
     * the lookup collections (recipient_lookup.h). */
    ensure_lookup(im, c->lookup);
    for (size_t i = 0; i < c->n_by_collection; i++) {
        ensure_lookup(im, c->by_collection[i].lookup);
    }
    if (c->recipient_default) {
        ensure_lookup(im, c->recipient_default->lookup);
    }
}

void mc__images_on_idle(mc__images_t *im)
{
    if (!im || !im->pending || !im->ensure || mc__now_ms() < im->next_check_ms) {
        return;
    }
    im->pending = ensure(im, im->cfg->db, im->cfg->collection) != MC_IMAGES_ON;
    im->next_check_ms = mc__now_ms() + RECHECK_MS;
}

/* The field holds null: the server had no image to give (a missing field is a stage's doing,
 * not the server's). */
static bool null_field(const bson_t *change, const char *name)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, change, name) && BSON_ITER_HOLDS_NULL(&it);
}

static bool doc_field(const bson_t *change, const char *name)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, change, name) && BSON_ITER_HOLDS_DOCUMENT(&it);
}

void mc__images_on_event(mc__images_t *im, const mc_event_t *ev)
{
    if (!im || mc_event_kind(ev) != MC_EVENT_CHANGE) {
        return;
    }
    /* Read when the event was built: no walk of the change here for most events. */
    const char *op = mc_event_operation_type(ev);
    const char *db = mc_event_db(ev);
    const char *coll = mc_event_coll(ev);
    const bson_t *change = mc_event_change(ev);
    if (!op || !db || !change) {
        return;
    }
    bool doc_op = !strcmp(op, "insert") || !strcmp(op, "update") || !strcmp(op, "replace") ||
                  !strcmp(op, "delete");
    /* A collection that by_collection does not route (and no default does) goes to admins
     * only whatever its images: nothing to turn on or to warn about. */
    if (coll && im->cfg->n_by_collection > 0 && !im->cfg->recipient_default &&
        !mc_stream_config_rule(im->cfg, db, coll)) {
        doc_op = false;
    }
    if (im->ensure && coll && doc_op) {
        if (im->cfg->collection) {
            /* An event from the watched collection: it exists (again). */
            if (im->pending) {
                im->pending = ensure(im, db, coll) != MC_IMAGES_ON;
                im->next_check_ms = mc__now_ms() + RECHECK_MS;
            }
        } else if (known_find(im, db, coll) < 0 && ensure(im, db, coll) == MC_IMAGES_ON) {
            known_add(im, db, coll);
        }
    }
    if (im->known && !strcmp(op, "dropDatabase")) {
        known_remove(im, db, NULL);
    } else if (im->known && coll && (!strcmp(op, "drop") || !strcmp(op, "rename"))) {
        /* A collection of that name may come back with its images off. */
        known_remove(im, db, coll);
    }
    if (!doc_op || !coll) {
        return;
    }
    bool needs_post = im->want_post && !strcmp(op, "update");
    bool needs_pre = im->want_pre && strcmp(op, "insert") != 0;
    if (!needs_post && !needs_pre) {
        return; /* an insert tells nothing about images */
    }
    bool missing = (needs_post && null_field(change, "fullDocument")) ||
                   (needs_pre && null_field(change, "fullDocumentBeforeChange"));
    if (!missing) {
        /* Images seen from there (a field a stage removed is no evidence either way). */
        if ((!needs_post || doc_field(change, "fullDocument")) &&
            (!needs_pre || doc_field(change, "fullDocumentBeforeChange"))) {
            clear_problem(im, db, coll);
        }
        return;
    }
    if (!im->quiet) {
        /* A catch-up re-reads events the watcher counted and reported already. */
        pthread_mutex_lock(&im->s->lock);
        im->s->status.images_missing++;
        pthread_mutex_unlock(&im->s->lock);
        mc_log_ratelimited(&im->rl_missing, MC_LOG_ERROR, "images",
                           "%s event without its %s stream=%s ns=%s.%s: it reaches admins only; "
                           "turn on changeStreamPreAndPostImages there (mongocast enable-images, "
                           "or ensure_images: true)",
                           op, wanted(im), im->cfg->name, db, coll);
    }
    set_problem(im, db, coll, "%s events from %s.%s arrive without %s", op, db, coll, wanted(im));
    if (im->ensure) {
        /* Someone turned them off (or the collection came back unseen): on again, for the
         * events after this one. */
        if (ensure(im, db, coll) == MC_IMAGES_ON && im->known && known_find(im, db, coll) < 0) {
            known_add(im, db, coll);
        }
    }
}
