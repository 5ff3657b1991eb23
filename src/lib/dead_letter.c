/*
 * dead_letter.c: the file form of a sink's dead letter (`dead_letter: {file: PATH}`): one
 * JSON line per event that failed permanently, with the reason.
 *
 * Runs on the sink's executor thread (the only writer of its file), rarely: only for events
 * that can never be delivered. Each line is written with one write(2) on an O_APPEND
 * descriptor and fsync'ed before the runner counts the event as complete, so the stored
 * position never covers an event whose dead-letter line could still be lost in a crash.
 * Line: {"sink": S, "stream": T, "id": <event id or null>, "error": "...", "attempts": N,
 * "at": <ms since epoch>, "message": <the event's JSON message>}.
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
};

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

int mc__dead_letter_write(mc__dead_letter_t *dl, const char *sink, mc_event_t *ev,
                          const char *error, uint32_t attempts, mc_error_t *err)
{
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
    close(dl->fd);
    bson_free(dl->path);
    free(dl);
}
