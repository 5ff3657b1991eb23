/*
 * dead_letter.c: a sink's dead letter: the file form (`dead_letter: {file: PATH}`), one JSON
 * line per event that failed permanently, with the reason; and the collection form
 * (`dead_letter: {db, collection, uri}`), the same record as one document per event.
 *
 * Runs on the sink's executor thread (the only writer of its file), rarely: only for events
 * that can never be delivered. Each line is written with one write(2) on an O_APPEND
 * descriptor and fsync'ed before the runner counts the event as complete, so the stored
 * position never covers an event whose dead-letter line could still be lost in a crash.
 * Line: {"sink": S, "stream": T, "id": <event id or null>, "error": "...", "attempts": N,
 * "at": <ms since epoch>, "message": <the event's JSON message>}.
 * Collection form: the same fields (at a date, message a sub-document; a message that is not
 * a JSON object is kept as a string), `_id` "<sink>/<event id>" (a replay after a crash is a
 * duplicate key and counts as written), inserted with w: majority and journal before the
 * event counts as complete. Its client is the executor thread's own, made on the first write;
 * the write blocks that thread (for an MC_SINK_ASYNC sink, the I/O loop) for up to the
 * socket timeout (10 s), which dead letters, being rare, are allowed to cost.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_private.h"
#include "json_writer.h"

struct mc__dead_letter {
    int fd;
    char *path;
    /* Collection form (fd -1). */
    char *uri, *db, *collection;
    mongoc_client_t *client;
};

#define DL_MONGO_TIMEOUT_MS 10000

mc__dead_letter_t *mc__dead_letter_open(const char *path, mc_error_t *err)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "dead letter %s: %s", path, strerror(e));
        return NULL;
    }
    mc__dead_letter_t *dl = calloc(1, sizeof(*dl));
    if (!dl) {
        close(fd);
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    dl->fd = fd;
    dl->path = bson_strdup(path);
    return dl;
}

mc__dead_letter_t *mc__dead_letter_open_mongo(const char *uri, const char *db,
                                              const char *collection, mc_error_t *err)
{
    bson_error_t be;
    mongoc_uri_t *u = uri ? mongoc_uri_new_with_error(uri, &be) : NULL;
    if (!u) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "dead letter %s.%s: no valid MongoDB uri", db, collection);
        return NULL;
    }
    mongoc_uri_destroy(u);
    mc__dead_letter_t *dl = calloc(1, sizeof(*dl));
    if (!dl) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    dl->fd = -1;
    dl->uri = bson_strdup(uri);
    dl->db = bson_strdup(db);
    dl->collection = bson_strdup(collection);
    dl->path = bson_strdup_printf("%s.%s", db, collection);
    return dl;
}

static int write_mongo(mc__dead_letter_t *dl, const char *sink, mc_event_t *ev, const char *error,
                       uint32_t attempts, mc_error_t *err)
{
    if (!dl->client) {
        bson_error_t be;
        mongoc_uri_t *u = mongoc_uri_new_with_error(dl->uri, &be);
        if (u) {
            mongoc_uri_set_option_as_int32(u, MONGOC_URI_SERVERSELECTIONTIMEOUTMS,
                                           DL_MONGO_TIMEOUT_MS);
            mongoc_uri_set_option_as_int32(u, MONGOC_URI_SOCKETTIMEOUTMS, DL_MONGO_TIMEOUT_MS);
            dl->client = mongoc_client_new_from_uri_with_error(u, &be);
            mongoc_uri_destroy(u);
        }
        if (!dl->client) {
            return mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO,
                                "dead letter %s: cannot create a client", dl->path);
        }
        mongoc_client_set_error_api(dl->client, MONGOC_ERROR_API_VERSION_2);
        mongoc_client_set_appname(dl->client, "mongocast-dead-letter");
    }
    const char *id = mc_event_id(ev);
    size_t mlen = 0;
    const char *message = mc_event_json(ev, &mlen);
    bson_t doc = BSON_INITIALIZER;
    if (id) {
        char *key = bson_strdup_printf("%s/%s", sink, id);
        BSON_APPEND_UTF8(&doc, "_id", key);
        bson_free(key);
    }
    BSON_APPEND_UTF8(&doc, "sink", sink);
    BSON_APPEND_UTF8(&doc, "stream", mc_event_stream(ev));
    if (id) {
        BSON_APPEND_UTF8(&doc, "id", id);
    } else {
        BSON_APPEND_NULL(&doc, "id");
    }
    /* A reason may carry bytes from a remote peer: keep the document valid UTF-8. */
    if (bson_utf8_validate(error, strlen(error), false)) {
        BSON_APPEND_UTF8(&doc, "error", error);
    } else {
        BSON_APPEND_UTF8(&doc, "error", "(reason not valid UTF-8)");
    }
    BSON_APPEND_INT32(&doc, "attempts", (int32_t)attempts);
    BSON_APPEND_DATE_TIME(&doc, "at", mc__wall_ms());
    bson_t msg;
    bson_error_t be;
    if (message && bson_init_from_json(&msg, message, (ssize_t)mlen, &be)) {
        BSON_APPEND_DOCUMENT(&doc, "message", &msg);
        bson_destroy(&msg);
    } else if (message) {
        BSON_APPEND_UTF8(&doc, "message", message);
    } else {
        BSON_APPEND_NULL(&doc, "message");
    }
    mongoc_collection_t *c = mongoc_client_get_collection(dl->client, dl->db, dl->collection);
    mongoc_write_concern_t *wc = mongoc_write_concern_new();
    mongoc_write_concern_set_w(wc, MONGOC_WRITE_CONCERN_W_MAJORITY);
    mongoc_write_concern_set_journal(wc, true);
    bson_t opts = BSON_INITIALIZER, reply;
    mongoc_write_concern_append(wc, &opts);
    bool ok = mongoc_collection_insert_one(c, &doc, &opts, &reply, &be);
    int rc = 0;
    if (!ok && be.code != 11000) {
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGODB, (int)be.code, "dead letter %s: %s",
                          dl->path, be.message);
    }
    bson_destroy(&reply);
    bson_destroy(&opts);
    bson_destroy(&doc);
    mongoc_write_concern_destroy(wc);
    mongoc_collection_destroy(c);
    return rc;
}

int mc__dead_letter_write(mc__dead_letter_t *dl, const char *sink, mc_event_t *ev,
                          const char *error, uint32_t attempts, mc_error_t *err)
{
    if (dl->fd < 0) {
        return write_mongo(dl, sink, ev, error, attempts, err);
    }
    size_t mlen = 0;
    const char *message = mc_event_json(ev, &mlen);
    const char *id = mc_event_id(ev);
    const char *stream = mc_event_stream(ev);
    char num[96];
    mc__json_buf_t b;
    mc__json_buf_init(&b, 256 + mlen, 0);
    MC__JSON_LIT(&b, "{\"sink\":");
    mc__json_write_string(&b, sink, strlen(sink));
    MC__JSON_LIT(&b, ",\"stream\":");
    mc__json_write_string(&b, stream, strlen(stream));
    MC__JSON_LIT(&b, ",\"id\":");
    if (id) {
        mc__json_write_string(&b, id, strlen(id));
    } else {
        MC__JSON_LIT(&b, "null");
    }
    MC__JSON_LIT(&b, ",\"error\":");
    /* A reason may carry bytes from a remote peer: keep the line valid JSON regardless. */
    size_t before = b.len;
    if (mc__json_write_string(&b, error, strlen(error)) != MC__JSON_OK) {
        b.err = MC__JSON_OK;
        b.len = before;
        MC__JSON_LIT(&b, "\"(reason not valid UTF-8)\"");
    }
    snprintf(num, sizeof(num), ",\"attempts\":%u,\"at\":%" PRId64 ",\"message\":", attempts,
             mc__wall_ms());
    mc__json_buf_append(&b, num, strlen(num));
    if (message) {
        mc__json_buf_append(&b, message, mlen);
    } else {
        MC__JSON_LIT(&b, "null");
    }
    MC__JSON_LIT(&b, "}\n");
    size_t len = 0;
    char *line = mc__json_buf_steal(&b, &len);
    if (!line) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                            "dead letter %s: cannot render the line", dl->path);
    }
    size_t done = 0;
    int rc = 0;
    while (done < len) {
        ssize_t w = write(dl->fd, line + done, len - done);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            int e = errno;
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "dead letter %s: %s", dl->path,
                              strerror(e));
            break;
        }
        done += (size_t)w;
    }
    if (rc == 0 && fdatasync(dl->fd) != 0) {
        int e = errno;
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "dead letter %s: fsync: %s", dl->path,
                          strerror(e));
    }
    bson_free(line);
    return rc;
}

void mc__dead_letter_close(mc__dead_letter_t *dl)
{
    if (!dl) {
        return;
    }
    if (dl->fd >= 0) {
        close(dl->fd);
    }
    mongoc_client_destroy(dl->client);
    bson_free(dl->uri);
    bson_free(dl->db);
    bson_free(dl->collection);
    bson_free(dl->path);
    free(dl);
}
