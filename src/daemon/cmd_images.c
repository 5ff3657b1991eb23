/*
 * cmd_images.c: `mongocast enable-images URI DB [COLL...]`: turns on pre- and post-images
 * (collMod changeStreamPreAndPostImages: {enabled: true}) so that streams with
 * full_document_before_change or full_document whenAvailable/required get them.
 *
 * Main thread only; blocking libmongoc calls. Invariants: one line per collection on stdout
 * ("DB.COLL: ok" or "DB.COLL: error: <server message>"); collections whose name starts with
 * "system." and views are never touched when no collection is named; the exit status is 1 when
 * any collection failed or there was nothing to do.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

#define MAX_COLLECTIONS 100000

static bool ping(mongoc_client_t *client, bson_error_t *err)
{
    bson_t cmd = BSON_INITIALIZER;
    BSON_APPEND_INT32(&cmd, "ping", 1);
    bool ok = mongoc_client_command_simple(client, "admin", &cmd, NULL, NULL, err);
    bson_destroy(&cmd);
    return ok;
}

/* Names of DB's collections (not views, not system.*), in the server's order. Returns the
 * count, or -1 with err filled. */
static long list_collections(mongoc_database_t *db, char ***names_out, bson_error_t *err)
{
    bson_t *opts = BCON_NEW("filter", "{", "type", BCON_UTF8("collection"), "}", "nameOnly",
                            BCON_BOOL(true));
    mongoc_cursor_t *cur = mongoc_database_find_collections_with_opts(db, opts);
    char **names = NULL;
    long n = 0, cap = 0;
    const bson_t *doc;
    while (mongoc_cursor_next(cur, &doc)) {
        bson_iter_t it;
        if (!bson_iter_init_find(&it, doc, "name") || !BSON_ITER_HOLDS_UTF8(&it)) {
            continue;
        }
        const char *name = bson_iter_utf8(&it, NULL);
        bson_iter_t t;
        if (bson_iter_init_find(&t, doc, "type") && BSON_ITER_HOLDS_UTF8(&t) &&
            strcmp(bson_iter_utf8(&t, NULL), "collection") != 0) {
            continue; /* a server that ignored the filter: views cannot have images */
        }
        if (strncmp(name, "system.", 7) == 0 || n >= MAX_COLLECTIONS) {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            names = bson_realloc(names, (size_t)cap * sizeof(char *));
        }
        names[n++] = bson_strdup(name);
    }
    bool failed = mongoc_cursor_error(cur, err);
    mongoc_cursor_destroy(cur);
    bson_destroy(opts);
    if (failed) {
        for (long i = 0; i < n; i++) {
            bson_free(names[i]);
        }
        bson_free(names);
        return -1;
    }
    *names_out = names;
    return n;
}

static bool enable_one(mongoc_client_t *client, const char *dbname, const char *coll)
{
    bson_error_t err;
    bool ok = mc_images_enable(client, dbname, coll, &err);
    if (ok) {
        printf("%s.%s: ok\n", dbname, coll);
    } else {
        printf("%s.%s: error: %s\n", dbname, coll, err.message);
    }
    fflush(stdout);
    return ok;
}

int mc_cmd_enable_images(int argc, char **argv)
{
    static const mc_cli_opt_t no_opts[] = {{NULL, 0, false, 0}};
    mc_cli_parsed_t p;
    int rc = mc_cli_parse("enable-images", argc, argv, no_opts, &p);
    if (rc != 0) {
        return rc;
    }
    if (p.n_pos < 2) {
        return mc_cli_usage_error("enable-images", "a MongoDB URI and a database are required");
    }
    const char *dbname = p.pos[1];
    if (!mc_cli_valid_db_name(dbname)) {
        return mc_cli_usage_error("enable-images", "'%s' is not a valid database name", dbname);
    }
    for (size_t i = 2; i < p.n_pos; i++) {
        if (!*p.pos[i] || strchr(p.pos[i], '$')) {
            return mc_cli_usage_error("enable-images", "'%s' is not a valid collection name",
                                      p.pos[i]);
        }
    }
    mc_cli_setup_logging(MC_LOG_WARN);
    bson_error_t err;
    mongoc_client_t *client = mc_cli_client_new(p.pos[0], 5000, "mongocast-admin", &err);
    if (!client) {
        mc_log_set_handler(NULL, NULL);
        return mc_cli_usage_error("enable-images", "invalid MongoDB URI: %s", err.message);
    }
    int status = MC_EXIT_OK;
    char *shown = mc_cli_redact_uri(p.pos[0]);
    mongoc_database_t *db = mongoc_client_get_database(client, dbname);
    if (!ping(client, &err)) {
        fprintf(stderr, "mongocast enable-images: cannot connect to %s: %s\n", shown,
                err.message);
        status = MC_EXIT_FAIL;
    } else if (p.n_pos > 2) {
        for (size_t i = 2; i < p.n_pos; i++) {
            if (!enable_one(client, dbname, p.pos[i])) {
                status = MC_EXIT_FAIL;
            }
        }
    } else {
        char **names = NULL;
        long n = list_collections(db, &names, &err);
        if (n < 0) {
            fprintf(stderr, "mongocast enable-images: cannot list the collections of %s: %s\n",
                    dbname, err.message);
            status = MC_EXIT_FAIL;
        } else if (n == 0) {
            fprintf(stderr, "mongocast enable-images: database %s has no collections; nothing "
                            "to enable\n",
                    dbname);
            status = MC_EXIT_FAIL;
        }
        for (long i = 0; i < n; i++) {
            if (!enable_one(client, dbname, names[i])) {
                status = MC_EXIT_FAIL;
            }
            bson_free(names[i]);
        }
        bson_free(names);
    }
    mongoc_database_destroy(db);
    mongoc_client_destroy(client);
    bson_free(shown);
    mc_log_set_handler(NULL, NULL);
    return status;
}
