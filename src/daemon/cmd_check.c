/*
 * cmd_check.c: `mongocast check -c FILE`: validates a config and the deployment it points at,
 * without running anything: the config (loader errors as FILE:LINE:COL: message, then the
 * engine's own checks of stream and sink references, sink types and sink options), the
 * checkpoint store, the connection,
 * the replica set, each stream's change stream (opened once and closed) and, where a stream
 * asks for them, the collection's pre-/post-images.
 *
 * Main thread only; blocking libmongoc calls with a short server selection timeout. Prints one
 * line per check on stdout ("ok", "FAIL" or "warn" first); a config error is printed exactly as
 * the loader reports it, on stderr. Invariants: nothing is written to MongoDB or to the
 * checkpoint store; the exit status is 0 only when no check failed (warnings do not count).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "tls.h"

enum { OPT_CONFIG = 1, OPT_TIMEOUT };

static const mc_cli_opt_t check_opts[] = {
    {"config", 'c', true, OPT_CONFIG},
    {"timeout-ms", 0, true, OPT_TIMEOUT},
    {NULL, 0, false, 0},
};

typedef struct checker {
    int failures;
    int warnings;
} checker_t;

static void report(checker_t *c, const char *tag, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

static void report(checker_t *c, const char *tag, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%-5s ", tag);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (strcmp(tag, "FAIL") == 0) {
        c->failures++;
    } else if (strcmp(tag, "warn") == 0) {
        c->warnings++;
    }
}

static void report_sink_probe(void *userdata, const char *sink_name, const char *type_name,
                              int rc, const char *message)
{
    if (rc == 0) {
        report(userdata, "ok", "sink %s (%s): reachable", sink_name, type_name);
    } else {
        report(userdata, "FAIL", "sink %s (%s): %s", sink_name, type_name, message);
    }
}

/* The file store creates its directory (and parents) at start: it is usable when the
 * directory, or its nearest existing ancestor, is a writable directory. */
static void check_file_store(checker_t *c, const char *dir)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s", dir);
    for (;;) {
        struct stat st;
        if (stat(path, &st) == 0) {
            if (!S_ISDIR(st.st_mode)) {
                report(c, "FAIL", "checkpoint: %s is not a directory", path);
            } else if (access(path, W_OK | X_OK) != 0) {
                report(c, "FAIL", "checkpoint: %s is not writable: %s", path, strerror(errno));
            } else if (strcmp(path, dir) == 0) {
                report(c, "ok", "checkpoint: file store %s (writable)", dir);
            } else {
                report(c, "ok", "checkpoint: file store %s (will be created in %s)", dir, path);
            }
            return;
        }
        char *slash = strrchr(path, '/');
        if (!slash) {
            snprintf(path, sizeof(path), ".");
        } else if (slash == path) {
            path[1] = '\0';
        } else {
            *slash = '\0';
        }
    }
}

static bool run_hello(checker_t *c, mongoc_client_t *client, const char *uri_shown)
{
    bson_t cmd = BSON_INITIALIZER;
    bson_t reply;
    bson_error_t err;
    BSON_APPEND_INT32(&cmd, "hello", 1);
    bool ok = mongoc_client_command_simple(client, "admin", &cmd, NULL, &reply, &err);
    bson_destroy(&cmd);
    if (!ok) {
        report(c, "FAIL", "connect %s: %s", uri_shown, err.message);
        bson_destroy(&reply);
        return false;
    }
    report(c, "ok", "connect %s", uri_shown);
    bson_iter_t it;
    if (bson_iter_init_find(&it, &reply, "setName") && BSON_ITER_HOLDS_UTF8(&it)) {
        const char *set = bson_iter_utf8(&it, NULL);
        const char *primary = "?";
        bson_iter_t pit;
        if (bson_iter_init_find(&pit, &reply, "primary") && BSON_ITER_HOLDS_UTF8(&pit)) {
            primary = bson_iter_utf8(&pit, NULL);
        }
        report(c, "ok", "replica set %s (primary %s)", set, primary);
    } else if (bson_iter_init_find(&it, &reply, "msg") && BSON_ITER_HOLDS_UTF8(&it) &&
               strcmp(bson_iter_utf8(&it, NULL), "isdbgrid") == 0) {
        report(c, "ok", "sharded cluster (mongos)");
    } else {
        report(c, "FAIL", "not a replica set: the server's hello has no setName; change "
                          "streams need a replica set or a sharded cluster");
        bson_destroy(&reply);
        return false;
    }
    bson_destroy(&reply);
    return true;
}

static const char *full_document_name(mc_full_document_t f)
{
    switch (f) {
    case MC_FULL_DOCUMENT_UPDATE_LOOKUP: return "updateLookup";
    case MC_FULL_DOCUMENT_WHEN_AVAILABLE: return "whenAvailable";
    case MC_FULL_DOCUMENT_REQUIRED: return "required";
    default: return "default";
    }
}

static const char *before_change_name(mc_before_change_t b)
{
    switch (b) {
    case MC_BEFORE_CHANGE_WHEN_AVAILABLE: return "whenAvailable";
    case MC_BEFORE_CHANGE_REQUIRED: return "required";
    default: return "off";
    }
}

static void describe_ns(const mc_stream_config_t *s, char *out, size_t cap)
{
    if (s->db && s->collection) {
        snprintf(out, cap, "%s.%s", s->db, s->collection);
    } else if (s->db) {
        snprintf(out, cap, "database %s", s->db);
    } else {
        snprintf(out, cap, "the whole cluster");
    }
}

/* Opens the stream's change stream once (the aggregate only: no event is read) so the server
 * checks the namespace, the options and the server-side pipeline stages. */
static void check_open(checker_t *c, mongoc_client_t *client, const mc_stream_config_t *s)
{
    char ns[300];
    describe_ns(s, ns, sizeof(ns));
    bson_t server, local;
    mc_error_t merr;
    if (mc_pipeline_split(s->pipeline, &server, &local, &merr) != 0) {
        report(c, "FAIL", "stream %s: pipeline: %s", s->name, merr.message);
        bson_destroy(&server);
        bson_destroy(&local);
        return;
    }
    bson_t opts = BSON_INITIALIZER;
    if (s->full_document != MC_FULL_DOCUMENT_DEFAULT) {
        BSON_APPEND_UTF8(&opts, "fullDocument", full_document_name(s->full_document));
    }
    if (s->full_document_before_change != MC_BEFORE_CHANGE_OFF) {
        BSON_APPEND_UTF8(&opts, "fullDocumentBeforeChange",
                         before_change_name(s->full_document_before_change));
    }
    /* The same shape the watcher sends: {pipeline: [...]}. */
    bson_t pipeline = BSON_INITIALIZER;
    BSON_APPEND_ARRAY(&pipeline, "pipeline", &server);
    mongoc_change_stream_t *cs;
    if (s->db && s->collection) {
        mongoc_collection_t *coll = mongoc_client_get_collection(client, s->db, s->collection);
        cs = mongoc_collection_watch(coll, &pipeline, &opts);
        mongoc_collection_destroy(coll);
    } else if (s->db) {
        mongoc_database_t *db = mongoc_client_get_database(client, s->db);
        cs = mongoc_database_watch(db, &pipeline, &opts);
        mongoc_database_destroy(db);
    } else {
        cs = mongoc_client_watch(client, &pipeline, &opts);
    }
    bson_error_t err;
    const bson_t *reply = NULL;
    if (mongoc_change_stream_error_document(cs, &err, &reply)) {
        report(c, "FAIL", "stream %s: cannot open a change stream on %s: %s (code %u)", s->name,
               ns, err.message, err.code);
    } else {
        const char *local_note = bson_empty(&local) ? ""
                                                    : " (the stages from the first $var stage on "
                                                      "run per subscriber in the daemon)";
        report(c, "ok", "stream %s: change stream opens on %s%s", s->name, ns, local_note);
    }
    mongoc_change_stream_destroy(cs);
    bson_destroy(&pipeline);
    bson_destroy(&opts);
    bson_destroy(&server);
    bson_destroy(&local);
}

static bool needs_images(const mc_stream_config_t *s, char *why, size_t cap)
{
    why[0] = '\0';
    if (s->full_document == MC_FULL_DOCUMENT_WHEN_AVAILABLE ||
        s->full_document == MC_FULL_DOCUMENT_REQUIRED) {
        snprintf(why, cap, "full_document: %s", full_document_name(s->full_document));
    }
    if (s->full_document_before_change != MC_BEFORE_CHANGE_OFF) {
        size_t n = strlen(why);
        snprintf(why + n, cap - n, "%sfull_document_before_change: %s", n ? ", " : "",
                 before_change_name(s->full_document_before_change));
    }
    return why[0] != '\0';
}

/* One collection's images, for a stream that needs them (`why`). */
static void check_images_on(checker_t *c, mongoc_client_t *client, const char *uri_shown,
                            const mc_stream_config_t *s, const char *dbname, const char *coll,
                            const char *why)
{
    bson_error_t err;
    mc_images_state_t st = mc_images_state(client, dbname, coll, &err);
    bool found = st == MC_IMAGES_OFF || st == MC_IMAGES_ON, enabled = st == MC_IMAGES_ON;
    if (st == MC_IMAGES_ERROR) {
        report(c, "FAIL", "stream %s: cannot list collections of %s: %s", s->name, dbname,
               err.message);
    } else if (enabled) {
        report(c, "ok", "stream %s: pre-/post-images enabled on %s.%s", s->name, dbname, coll);
    } else if (s->ensure_images) {
        report(c, "ok",
               "stream %s: pre-/post-images %s on %s.%s; run turns them on (ensure_images: "
               "true)%s",
               s->name, found ? "are off" : "cannot be on yet (no such collection)", dbname, coll,
               found ? "" : " once the collection exists");
    } else if (!found) {
        report(c, "FAIL",
               "stream %s: collection %s.%s does not exist, so pre-/post-images (%s) cannot "
               "be enabled; create it, then run: mongocast enable-images '%s' %s %s (or set "
               "ensure_images: true)",
               s->name, dbname, coll, why, uri_shown, dbname, coll);
    } else {
        report(c, "FAIL",
               "stream %s: pre-/post-images are not enabled on %s.%s (needed by %s); run: "
               "mongocast enable-images '%s' %s %s (or set ensure_images: true)",
               s->name, dbname, coll, why, uri_shown, dbname, coll);
    }
}

static void check_images(checker_t *c, mongoc_client_t *client, const char *uri_shown,
                         const mc_stream_config_t *s)
{
    char why[160];
    if (!needs_images(s, why, sizeof(why))) {
        return;
    }
    if (s->db && s->collection) {
        check_images_on(c, client, uri_shown, s, s->db, s->collection, why);
        return;
    }
    /* A database- or cluster-level stream: the collections its by_collection names. */
    for (size_t i = 0; i < s->n_by_collection; i++) {
        const char *key = s->by_collection[i].collection;
        char dbname[128];
        const char *coll = key;
        if (s->db) {
            snprintf(dbname, sizeof(dbname), "%s", s->db);
        } else {
            const char *dot = strchr(key, '.');
            snprintf(dbname, sizeof(dbname), "%.*s", (int)(dot - key), key);
            coll = dot + 1;
        }
        check_images_on(c, client, uri_shown, s, dbname, coll, why);
    }
    if (s->n_by_collection == 0 || s->recipient_default) {
        char ns[300];
        describe_ns(s, ns, sizeof(ns));
        if (s->ensure_images) {
            report(c, "ok",
                   "stream %s: pre-/post-images (%s) are turned on by run for the collections "
                   "of %s it sees (ensure_images: true)",
                   s->name, why, ns);
        } else {
            report(c, "warn",
                   "stream %s: pre-/post-images (%s) cannot be verified per collection for %s; "
                   "enable them on every collection it needs with: mongocast enable-images URI "
                   "DB [COLL...], or set ensure_images: true",
                   s->name, why, ns);
        }
    }
}

/* Recipient lint: a server-side stage that removes or rewrites a recipient path. */
static void lint_warning(const mc_stream_config_t *stream, size_t stage, const char *op,
                         const char *message, void *userdata)
{
    (void)stage;
    (void)op;
    report(userdata, "warn", "stream %s: %s", stream->name, message);
}

static void check_mongo_store(checker_t *c, mongoc_client_t *client, const mc_config_t *cfg)
{
    mongoc_collection_t *coll =
        mongoc_client_get_collection(client, cfg->checkpoint.db, cfg->checkpoint.collection);
    bson_t filter = BSON_INITIALIZER;
    bson_t *opts = BCON_NEW("limit", BCON_INT64(1));
    mongoc_cursor_t *cur = mongoc_collection_find_with_opts(coll, &filter, opts, NULL);
    const bson_t *doc;
    while (mongoc_cursor_next(cur, &doc)) {
    }
    bson_error_t err;
    if (mongoc_cursor_error(cur, &err)) {
        report(c, "FAIL", "checkpoint: cannot read %s.%s: %s", cfg->checkpoint.db,
               cfg->checkpoint.collection, err.message);
    } else {
        report(c, "ok", "checkpoint: mongodb store %s.%s (readable)", cfg->checkpoint.db,
               cfg->checkpoint.collection);
    }
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    bson_destroy(&filter);
    mongoc_collection_destroy(coll);
}

int mc_cmd_check(int argc, char **argv)
{
    mc_cli_parsed_t p;
    int rc = mc_cli_parse("check", argc, argv, check_opts, &p);
    if (rc != 0) {
        return rc;
    }
    const char *path = NULL;
    int64_t timeout_ms = 5000;
    for (size_t i = 0; i < p.n_opts; i++) {
        if (p.opts[i].id == OPT_CONFIG) {
            path = p.opts[i].value;
        } else if (p.opts[i].id == OPT_TIMEOUT &&
                   !mc_cli_parse_int(p.opts[i].value, 1, 600000, &timeout_ms)) {
            return mc_cli_usage_error("check", "--timeout-ms: '%s' is not 1 to 600000",
                                      p.opts[i].value);
        }
    }
    if (p.n_pos > 0) {
        return mc_cli_usage_error("check", "unexpected argument '%s'", p.pos[0]);
    }
    if (!path) {
        return mc_cli_usage_error("check", "a config file is required: -c FILE");
    }

    mc_error_t merr;
    mc_error_clear(&merr);
    mc_config_t *cfg = mc_config_load_file(path, &merr);
    if (!cfg) {
        fprintf(stderr, "%s\n", merr.message);
        return MC_EXIT_FAIL;
    }
    /* The engine's own checks (stream names, pipeline shape, sink stream references) run at
     * construction, and mc_engine_validate() checks each sink's type and options (what `run`
     * would only find out when it starts the engine); neither connects nor starts anything. */
    mc_cli_setup_logging(MC_LOG_WARN);
    mc_engine_t *probe = mc_engine_new(cfg, NULL, &merr);
    if (!probe || mc_cli_register_test_sinks(probe, &merr) != 0 ||
        mc_engine_validate(probe, &merr) != 0) {
        fprintf(stderr, "%s\n", merr.message);
        mc_engine_destroy(probe);
        mc_config_destroy(cfg);
        return MC_EXIT_FAIL;
    }

    checker_t c = {0, 0};
    report(&c, "ok", "config %s (%zu stream%s, %zu sink%s)", path, cfg->n_streams,
           cfg->n_streams == 1 ? "" : "s", cfg->n_sinks, cfg->n_sinks == 1 ? "" : "s");
    for (size_t i = 0; i < cfg->n_streams; i++) {
        mc_stream_config_lint(&cfg->streams[i], lint_warning, &c);
    }
    if (cfg->checkpoint.store == MC_CHECKPOINT_FILE) {
        check_file_store(&c, cfg->checkpoint.path ? cfg->checkpoint.path : "./data/checkpoints");
    }
    if (cfg->server.tls.enabled) {
        /* The certificate chain and the key load and belong together (what `run` needs). */
        mc_error_t terr;
        mc_error_clear(&terr);
        if (mcd_tls_check(cfg, &terr) != 0) {
            report(&c, "FAIL", "tls: %s", terr.message);
        } else {
            report(&c, "ok", "tls: certificate %s and key %s load and match",
                   cfg->server.tls.cert_file, cfg->server.tls.key_file);
        }
    }

    /* A node whose every stream is an edge stream (and whose positions are in files) never
     * reads MongoDB: nothing to connect to. */
    bool needs_mongodb = cfg->checkpoint.store == MC_CHECKPOINT_MONGODB;
    for (size_t i = 0; i < cfg->n_streams; i++) {
        needs_mongodb = needs_mongodb || !mc_stream_config_is_edge(&cfg->streams[i]);
    }
    char *shown = mc_cli_redact_uri(cfg->mongodb_uri);
    bson_error_t berr;
    mongoc_client_t *client =
        needs_mongodb
            ? mc_cli_client_new(cfg->mongodb_uri, (int32_t)timeout_ms, "mongocast-check", &berr)
            : NULL;
    if (!needs_mongodb) {
        report(&c, "ok", "every stream is an edge stream (source: nats): MongoDB not checked");
    } else if (!client) {
        report(&c, "FAIL", "connect %s: %s", shown, berr.message);
    } else if (run_hello(&c, client, shown)) {
        if (cfg->checkpoint.store == MC_CHECKPOINT_MONGODB) {
            check_mongo_store(&c, client, cfg);
        }
        for (size_t i = 0; i < cfg->n_streams; i++) {
            if (mc_stream_config_is_edge(&cfg->streams[i])) {
                /* Fed from JetStream (source: nats): nothing of it is read from MongoDB. */
                report(&c, "ok", "stream %s: edge stream (JetStream stream %s), not opened in "
                                 "MongoDB",
                       cfg->streams[i].name, cfg->streams[i].source_nats.stream);
                continue;
            }
            check_open(&c, client, &cfg->streams[i]);
            check_images(&c, client, shown, &cfg->streams[i]);
        }
    }
    /* Brokers, webhook receivers and other clusters the sinks write to: reachable (and
     * accepting the credentials) within the timeout, with the probe's reason otherwise. */
    mc_engine_probe_sinks(probe, timeout_ms, report_sink_probe, &c);
    mc_engine_destroy(probe);
    if (c.failures == 0) {
        printf("check passed%s\n", c.warnings ? " with warnings" : "");
    } else {
        printf("check failed: %d problem%s\n", c.failures, c.failures == 1 ? "" : "s");
    }
    mongoc_client_destroy(client);
    bson_free(shown);
    mc_config_destroy(cfg);
    mc_log_set_handler(NULL, NULL);
    return c.failures == 0 ? MC_EXIT_OK : MC_EXIT_FAIL;
}
