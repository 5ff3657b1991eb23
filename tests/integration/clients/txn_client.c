/*
 * txn_client.c: a small libmongoc client that the integration tests drive to check how
 * mongo-emulator serves transactions and snapshot reads to the C driver the daemon uses
 * (libmongoc 1.23, sessions, mongoc_client_session_with_transaction).
 *
 *   txn_client URI DB COLL commit N     N transactions, each inserting {_id: "tK-a"} and
 *                                       {_id: "tK-b"} through with_transaction
 *   txn_client URI DB COLL abort        one transaction that inserts, then aborts
 *   txn_client URI DB COLL conflict     two sessions write {_id: "x"}: the second gets the
 *                                       write conflict, aborts, and retries after the first
 *                                       commits
 *   txn_client URI DB COLL snapshot     find with readConcern snapshot (raw command)
 *
 * Output, one line each, flushed at once:
 *   LSID {...}                         the session's lsid (canonical Extended JSON)
 *   COMMITTED K                        transaction K committed
 *   ABORTED                            the transaction was aborted
 *   CONFLICT code=C transient=0|1      the write conflict, with its TransientTransactionError label
 *   SNAPSHOT n=N atClusterTime={...}   the snapshot read's documents and time
 *   ERROR domain=D code=C message=M    an unexpected error (exit status 2)
 * Exit status 0 on success, 64 for bad usage.
 *
 * Single thread. Invariant: every libmongoc object created is destroyed on every exit path, so
 * an ASan build of this client reports leaks in libmongoc usage rather than in the harness.
 */
#include <mongoc/mongoc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct ctx {
    mongoc_collection_t *coll;
    long k;
} ctx_t;

static void print_json_line(const char *prefix, const bson_t *doc)
{
    char *json = bson_as_canonical_extended_json(doc, NULL);
    printf("%s%s\n", prefix, json ? json : "<unprintable BSON>");
    bson_free(json);
    fflush(stdout);
}

static int fail(const bson_error_t *err)
{
    printf("ERROR domain=%u code=%u message=%s\n", err->domain, err->code, err->message);
    fflush(stdout);
    return 2;
}

/* The options of an operation in `session`. */
static bool session_opts(mongoc_client_session_t *session, bson_t *opts, bson_error_t *err)
{
    bson_init(opts);
    return mongoc_client_session_append(session, opts, err);
}

static bool insert_pair(mongoc_client_session_t *session, void *vctx, bson_t **reply,
                        bson_error_t *err)
{
    ctx_t *c = vctx;
    bson_t opts;
    bool ok = session_opts(session, &opts, err);
    for (int half = 0; ok && half < 2; half++) {
        char id[64];
        snprintf(id, sizeof id, "t%ld-%c", c->k, half ? 'b' : 'a');
        bson_t *doc = BCON_NEW("_id", BCON_UTF8(id), "k", BCON_INT64(c->k));
        ok = mongoc_collection_insert_one(c->coll, doc, &opts, NULL, err);
        bson_destroy(doc);
    }
    bson_destroy(&opts);
    (void)reply;
    return ok;
}

static int run_commit(mongoc_client_t *client, mongoc_collection_t *coll, long n)
{
    bson_error_t err;
    mongoc_client_session_t *s = mongoc_client_start_session(client, NULL, &err);
    if (!s) {
        return fail(&err);
    }
    print_json_line("LSID ", mongoc_client_session_get_lsid(s));
    int status = 0;
    for (long k = 1; k <= n && status == 0; k++) {
        ctx_t c = {coll, k};
        bson_t reply;
        if (!mongoc_client_session_with_transaction(s, insert_pair, NULL, &c, &reply, &err)) {
            status = fail(&err);
        } else {
            printf("COMMITTED %ld\n", k);
            fflush(stdout);
        }
        bson_destroy(&reply);
    }
    mongoc_client_session_destroy(s);
    return status;
}

static int run_abort(mongoc_client_t *client, mongoc_collection_t *coll)
{
    bson_error_t err;
    mongoc_client_session_t *s = mongoc_client_start_session(client, NULL, &err);
    if (!s) {
        return fail(&err);
    }
    int status = 0;
    ctx_t c = {coll, 99};
    if (!mongoc_client_session_start_transaction(s, NULL, &err) ||
        !insert_pair(s, &c, NULL, &err) || !mongoc_client_session_abort_transaction(s, &err)) {
        status = fail(&err);
    } else {
        printf("ABORTED\n");
        fflush(stdout);
    }
    mongoc_client_session_destroy(s);
    return status;
}

static bool set_x(mongoc_collection_t *coll, mongoc_client_session_t *s, const char *by,
                  bson_t *reply, bson_error_t *err)
{
    bson_t opts;
    bson_t *q = BCON_NEW("_id", BCON_UTF8("x"));
    bson_t *u =
        BCON_NEW("$set", "{", "by", BCON_UTF8(by), "}", "$inc", "{", "n", BCON_INT32(1), "}");
    bool ok = session_opts(s, &opts, err);
    if (ok) {
        ok = mongoc_collection_update_one(coll, q, u, &opts, reply, err);
    } else if (reply) {
        bson_init(reply); /* the caller destroys it whatever happened */
    }
    bson_destroy(&opts);
    bson_destroy(q);
    bson_destroy(u);
    return ok;
}

static int run_conflict(mongoc_client_t *client, mongoc_collection_t *coll)
{
    bson_error_t err;
    bson_t reply;
    int status = 0;
    mongoc_client_session_t *a = mongoc_client_start_session(client, NULL, &err);
    mongoc_client_session_t *b = a ? mongoc_client_start_session(client, NULL, &err) : NULL;
    if (!a || !b) {
        status = fail(&err);
        goto done;
    }
    if (!mongoc_client_session_start_transaction(a, NULL, &err) ||
        !mongoc_client_session_start_transaction(b, NULL, &err)) {
        status = fail(&err);
        goto done;
    }
    if (!set_x(coll, a, "a", &reply, &err)) {
        bson_destroy(&reply);
        status = fail(&err);
        goto done;
    }
    bson_destroy(&reply);
    if (set_x(coll, b, "b", &reply, &err)) {
        printf("NO CONFLICT\n");
    } else {
        printf("CONFLICT code=%u transient=%d\n", err.code,
               mongoc_error_has_label(&reply, "TransientTransactionError") ? 1 : 0);
    }
    fflush(stdout);
    bson_destroy(&reply);
    if (!mongoc_client_session_abort_transaction(b, &err) ||
        !mongoc_client_session_commit_transaction(a, NULL, &err)) {
        status = fail(&err);
        goto done;
    }
    printf("COMMITTED 1\n");
    fflush(stdout);
    if (!mongoc_client_session_start_transaction(b, NULL, &err) ||
        !set_x(coll, b, "b", NULL, &err) ||
        !mongoc_client_session_commit_transaction(b, NULL, &err)) {
        status = fail(&err);
        goto done;
    }
    printf("COMMITTED 2\n");
    fflush(stdout);
done:
    if (b) {
        mongoc_client_session_destroy(b);
    }
    if (a) {
        mongoc_client_session_destroy(a);
    }
    return status;
}

static int run_snapshot(mongoc_database_t *db, const char *coll)
{
    bson_error_t err;
    bson_t reply;
    bson_t *cmd =
        BCON_NEW("find", BCON_UTF8(coll), "readConcern", "{", "level", BCON_UTF8("snapshot"), "}");
    bool ok = mongoc_database_command_simple(db, cmd, NULL, &reply, &err);
    bson_destroy(cmd);
    int status = 0;
    bson_iter_t it, at;
    if (!ok) {
        status = fail(&err);
    } else if (bson_iter_init(&it, &reply) &&
               bson_iter_find_descendant(&it, "cursor.atClusterTime", &at) &&
               BSON_ITER_HOLDS_TIMESTAMP(&at)) {
        uint32_t t, i;
        bson_iter_t batch, el;
        int n = 0;
        bson_iter_timestamp(&at, &t, &i);
        if (bson_iter_init(&it, &reply) &&
            bson_iter_find_descendant(&it, "cursor.firstBatch", &batch) &&
            bson_iter_recurse(&batch, &el)) {
            while (bson_iter_next(&el)) {
                n++;
            }
        }
        printf("SNAPSHOT n=%d atClusterTime={\"t\":%u,\"i\":%u}\n", n, t, i);
        fflush(stdout);
    } else {
        print_json_line("ERROR no atClusterTime in ", &reply);
        status = 2;
    }
    bson_destroy(&reply);
    return status;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: txn_client URI DB COLL commit N|abort|conflict|snapshot\n");
        return 64;
    }
    const char *mode = argv[4];
    long n = argc > 5 ? strtol(argv[5], NULL, 10) : 1;
    if (n < 1 || n > 100000) {
        fprintf(stderr, "txn_client: N must be 1..100000\n");
        return 64;
    }
    mongoc_init();
    bson_error_t err;
    int status = 64;
    mongoc_uri_t *uri = mongoc_uri_new_with_error(argv[1], &err);
    mongoc_client_t *client = uri ? mongoc_client_new_from_uri(uri) : NULL;
    mongoc_database_t *db = NULL;
    mongoc_collection_t *coll = NULL;
    if (!client) {
        fprintf(stderr, "txn_client: bad URI: %s\n", uri ? argv[1] : err.message);
        goto done;
    }
    mongoc_client_set_error_api(client, MONGOC_ERROR_API_VERSION_2);
    db = mongoc_client_get_database(client, argv[2]);
    coll = mongoc_client_get_collection(client, argv[2], argv[3]);
    if (strcmp(mode, "commit") == 0) {
        status = run_commit(client, coll, n);
    } else if (strcmp(mode, "abort") == 0) {
        status = run_abort(client, coll);
    } else if (strcmp(mode, "conflict") == 0) {
        status = run_conflict(client, coll);
    } else if (strcmp(mode, "snapshot") == 0) {
        status = run_snapshot(db, argv[3]);
    } else {
        fprintf(stderr, "txn_client: unknown mode %s\n", mode);
    }
done:
    if (coll) {
        mongoc_collection_destroy(coll);
    }
    if (db) {
        mongoc_database_destroy(db);
    }
    if (client) {
        mongoc_client_destroy(client);
    }
    if (uri) {
        mongoc_uri_destroy(uri);
    }
    mongoc_cleanup();
    return status;
}
