/*
 * watch_client.c: a small libmongoc change-stream client that the integration tests drive to
 * check how mongo-emulator behaves with the C driver the daemon uses (libmongoc 1.23, pooled
 * client, ?replicaSet=rs0).
 *
 *   watch_client URI DB COLL N [--full-document MODE] [--resume-after JSON]
 *                [--start-after JSON] [--pipeline JSON-ARRAY] [--batch-size N]
 *                [--max-await-ms MS] [--timeout-s S] [--report-empty]
 *
 * DB "-" watches the whole cluster, COLL "-" the whole database. Output, one line each, flushed
 * at once so the test can follow along:
 *   READY                         the change stream is open (the aggregate succeeded)
 *   {...}                         one change event, canonical Extended JSON
 *   EMPTY                         next() returned false without error (only with --report-empty)
 *   TOKEN {...}                   the cached resume token, printed before exiting
 *   ERROR domain=D code=C message=M   the stream failed (exit status 2)
 *   REPLY {...}                   the server reply of that error, when there is one
 *   TIMEOUT                       fewer than N events before --timeout-s (exit status 3)
 * Exit status 0 after N events, 64 for bad usage.
 *
 * Single thread: main() owns the pool, pops one client and iterates the stream. Invariant: every
 * libmongoc object created is destroyed on every exit path, so an ASan build of this client
 * reports leaks in libmongoc usage rather than in the harness.
 */
#include <mongoc/mongoc.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct options {
    const char *uri;
    const char *db;
    const char *coll;
    long count;
    const char *full_document;
    const char *resume_after;
    const char *start_after;
    const char *pipeline;
    long batch_size;
    long max_await_ms;
    long timeout_s;
    bool report_empty;
} options_t;

static void usage(void)
{
    fprintf(stderr, "usage: watch_client URI DB|- COLL|- N [--full-document MODE] "
                    "[--resume-after JSON] [--start-after JSON] [--pipeline JSON-ARRAY] "
                    "[--batch-size N] [--max-await-ms MS] [--timeout-s S] [--report-empty]\n");
}

static bool parse_long(const char *s, long min, long max, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        return false;
    }
    *out = v;
    return true;
}

static bool parse_args(int argc, char **argv, options_t *o)
{
    memset(o, 0, sizeof *o);
    o->max_await_ms = 500;
    o->timeout_s = 30;
    if (argc < 5) {
        return false;
    }
    o->uri = argv[1];
    o->db = argv[2];
    o->coll = argv[3];
    if (!parse_long(argv[4], 0, 1000000, &o->count)) {
        return false;
    }
    for (int i = 5; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--report-empty") == 0) {
            o->report_empty = true;
            continue;
        }
        if (i + 1 >= argc) {
            return false;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--full-document") == 0) {
            o->full_document = v;
        } else if (strcmp(a, "--resume-after") == 0) {
            o->resume_after = v;
        } else if (strcmp(a, "--start-after") == 0) {
            o->start_after = v;
        } else if (strcmp(a, "--pipeline") == 0) {
            o->pipeline = v;
        } else if (strcmp(a, "--batch-size") == 0) {
            if (!parse_long(v, 1, 1000000, &o->batch_size)) {
                return false;
            }
        } else if (strcmp(a, "--max-await-ms") == 0) {
            if (!parse_long(v, 1, 3600000, &o->max_await_ms)) {
                return false;
            }
        } else if (strcmp(a, "--timeout-s") == 0) {
            if (!parse_long(v, 1, 3600, &o->timeout_s)) {
                return false;
            }
        } else {
            return false;
        }
    }
    return true;
}

static void print_json_line(const char *prefix, const bson_t *doc)
{
    size_t len = 0;
    char *json = bson_as_canonical_extended_json(doc, &len);
    if (json) {
        printf("%s%s\n", prefix, json);
        bson_free(json);
    } else {
        printf("%s<unprintable BSON>\n", prefix);
    }
    fflush(stdout);
}

static void print_error(const bson_error_t *err, const bson_t *reply)
{
    printf("ERROR domain=%u code=%u message=%s\n", err->domain, err->code, err->message);
    if (reply && !bson_empty(reply)) {
        print_json_line("REPLY ", reply);
    }
    fflush(stdout);
}

/* Builds the watch options; false (with a message on stderr) for unparsable JSON. */
static bool build_opts(const options_t *o, bson_t *opts)
{
    bson_error_t err;
    if (o->full_document) {
        BSON_APPEND_UTF8(opts, "fullDocument", o->full_document);
    }
    const char *names[2] = {"resumeAfter", "startAfter"};
    const char *values[2] = {o->resume_after, o->start_after};
    for (int i = 0; i < 2; i++) {
        if (!values[i]) {
            continue;
        }
        bson_t *tok = bson_new_from_json((const uint8_t *)values[i], -1, &err);
        if (!tok) {
            fprintf(stderr, "watch_client: bad %s JSON: %s\n", names[i], err.message);
            return false;
        }
        BSON_APPEND_DOCUMENT(opts, names[i], tok);
        bson_destroy(tok);
    }
    if (o->batch_size > 0) {
        BSON_APPEND_INT32(opts, "batchSize", (int32_t)o->batch_size);
    }
    BSON_APPEND_INT64(opts, "maxAwaitTimeMS", o->max_await_ms);
    return true;
}

/* The pipeline argument: a JSON array is wrapped as {"pipeline": [...]} for libmongoc. */
static bson_t *build_pipeline(const options_t *o)
{
    bson_error_t err;
    if (!o->pipeline) {
        return bson_new();
    }
    size_t n = strlen(o->pipeline);
    char *wrapped = bson_malloc(n + 16);
    bson_snprintf(wrapped, n + 16, "{\"pipeline\": %s}", o->pipeline);
    bson_t *p = bson_new_from_json((const uint8_t *)wrapped, -1, &err);
    bson_free(wrapped);
    if (!p) {
        fprintf(stderr, "watch_client: bad pipeline JSON: %s\n", err.message);
    }
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int iterate(mongoc_change_stream_t *stream, const options_t *o)
{
    const bson_t *doc = NULL;
    const bson_t *reply = NULL;
    bson_error_t err;
    long seen = 0;
    double deadline = now_s() + (double)o->timeout_s;

    while (seen < o->count) {
        if (mongoc_change_stream_next(stream, &doc)) {
            print_json_line("", doc);
            seen++;
            continue;
        }
        if (mongoc_change_stream_error_document(stream, &err, &reply)) {
            print_error(&err, reply);
            return 2;
        }
        if (o->report_empty) {
            printf("EMPTY\n");
            fflush(stdout);
        }
        if (now_s() > deadline) {
            printf("TIMEOUT\n");
            fflush(stdout);
            return 3;
        }
    }
    const bson_t *token = mongoc_change_stream_get_resume_token(stream);
    if (token) {
        print_json_line("TOKEN ", token);
    }
    return 0;
}

int main(int argc, char **argv)
{
    options_t o;
    if (!parse_args(argc, argv, &o)) {
        usage();
        return 64;
    }

    mongoc_init();
    int status = 1;
    bson_error_t err;
    bson_t opts = BSON_INITIALIZER;
    bson_t *pipeline = NULL;
    mongoc_uri_t *uri = NULL;
    mongoc_client_pool_t *pool = NULL;
    mongoc_client_t *client = NULL;
    mongoc_database_t *db = NULL;
    mongoc_collection_t *coll = NULL;
    mongoc_change_stream_t *stream = NULL;

    uri = mongoc_uri_new_with_error(o.uri, &err);
    if (!uri) {
        fprintf(stderr, "watch_client: bad URI: %s\n", err.message);
        status = 64;
        goto done;
    }
    if (!build_opts(&o, &opts) || !(pipeline = build_pipeline(&o))) {
        status = 64;
        goto done;
    }
    pool = mongoc_client_pool_new(uri);
    if (!pool || !mongoc_client_pool_set_error_api(pool, MONGOC_ERROR_API_VERSION_2)) {
        fprintf(stderr, "watch_client: cannot create the client pool\n");
        goto done;
    }
    mongoc_client_pool_set_appname(pool, "watch_client");
    client = mongoc_client_pool_pop(pool);

    if (strcmp(o.db, "-") == 0) {
        stream = mongoc_client_watch(client, pipeline, &opts);
    } else if (strcmp(o.coll, "-") == 0) {
        db = mongoc_client_get_database(client, o.db);
        stream = mongoc_database_watch(db, pipeline, &opts);
    } else {
        coll = mongoc_client_get_collection(client, o.db, o.coll);
        stream = mongoc_collection_watch(coll, pipeline, &opts);
    }

    const bson_t *reply = NULL;
    if (mongoc_change_stream_error_document(stream, &err, &reply)) {
        print_error(&err, reply);
        status = 2;
        goto done;
    }
    printf("READY\n");
    fflush(stdout);
    status = iterate(stream, &o);

done:
    mongoc_change_stream_destroy(stream);
    mongoc_collection_destroy(coll);
    mongoc_database_destroy(db);
    if (client) {
        mongoc_client_pool_push(pool, client);
    }
    mongoc_client_pool_destroy(pool);
    mongoc_uri_destroy(uri);
    bson_destroy(pipeline);
    bson_destroy(&opts);
    mongoc_cleanup();
    return status;
}
