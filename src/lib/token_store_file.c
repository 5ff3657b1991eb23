/*
 * token_store_file.c: resume positions stored as one small JSON file per stream
 * (<stream>.json: the stream's position, the oldest of its sinks') and one per sink of a
 * stream (<stream>@<sink>.json: where that sink resumes).
 *
 * Each file is one line of compact canonical Extended JSON (what mongocast writes
 * everywhere); load also reads libbson's spaced form of older files.
 *
 * Blocking; called from watcher threads (load, once at start) and the checkpoint thread
 * (save). Different records use different files, so no locking is needed between them.
 * Crash safety: a save writes <name>.json.tmp, fsyncs it, renames it over <name>.json and
 * fsyncs the directory. rename() is atomic, so after a crash at any point the file holds
 * either the previous position or the new one, never a torn mix; a leftover .tmp is ignored
 * by load and overwritten by the next save. An unreadable or corrupt file is an error, never
 * "start from now": that would silently skip changes.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_private.h"
#include "json_writer.h"

#define MAX_FILE_BYTES (1024 * 1024)

typedef struct file_store {
    mc__token_store_t base;
    char *dir;
} file_store_t;

static char *escape_into(char *p, const char *name)
{
    for (size_t i = 0; name[i]; i++) {
        unsigned char c = (unsigned char)name[i];
        bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                     c == '_' || c == '-' || (c == '.' && i > 0);
        if (plain) {
            *p++ = (char)c;
        } else {
            p += sprintf(p, "%%%02X", c);
        }
    }
    return p;
}

char *mc__token_store_file_name(const char *stream, const char *sink)
{
    size_t n = strlen(stream) + (sink ? strlen(sink) + 1 : 0);
    char *out = bson_malloc(n * 3 + sizeof(".json"));
    char *p = escape_into(out, stream);
    if (sink) {
        *p++ = '@';
        p = escape_into(p, sink);
    }
    strcpy(p, ".json");
    return out;
}

static int mkdir_p(const char *dir, mc_error_t *err)
{
    char *tmp = bson_strdup(dir);
    size_t len = strlen(tmp);
    while (len > 1 && tmp[len - 1] == '/') {
        tmp[--len] = '\0';
    }
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
                int e = errno;
                mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", tmp, strerror(e));
                bson_free(tmp);
                return MC_EIO;
            }
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
        int e = errno;
        mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", tmp, strerror(e));
        bson_free(tmp);
        return MC_EIO;
    }
    struct stat st;
    if (stat(tmp, &st) != 0 || !S_ISDIR(st.st_mode)) {
        mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, ENOTDIR, "%s: not a directory", tmp);
        bson_free(tmp);
        return MC_EIO;
    }
    bson_free(tmp);
    return 0;
}

static char *path_for(const file_store_t *fs, const char *stream, const char *sink,
                      const char *suffix)
{
    char *name = mc__token_store_file_name(stream, sink);
    char *path = bson_strdup_printf("%s/%s%s", fs->dir, name, suffix);
    bson_free(name);
    return path;
}

static int file_load(mc__token_store_t *store, const char *stream, const char *sink,
                     mc__record_t *out, mc_error_t *err)
{
    file_store_t *fs = (file_store_t *)store;
    char *path = path_for(fs, stream, sink, "");
    bson_strncpy(out->where, path, sizeof(out->where));
    int rc = 0;
    char *buf = NULL;
    bson_t doc = BSON_INITIALIZER;
    /* O_NONBLOCK: a FIFO put in place of the file must not hang the watcher in open(). */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        rc = e == ENOENT ? MC_ENOTFOUND : MC_EIO;
        mc_error_set(err, rc, MC_DOMAIN_ERRNO, e, "%s: %s", path, strerror(e));
        goto done;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_FILE_BYTES) {
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_ELIMIT,
                          "%s: checkpoint file unreadable, not a regular file or larger than "
                          "%d bytes",
                          path, MAX_FILE_BYTES);
        goto done;
    }
    buf = bson_malloc((size_t)st.st_size + 1);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            break;
        }
        got += (size_t)r;
    }
    buf[got] = '\0';
    bson_error_t berr;
    bson_destroy(&doc);
    if (!bson_init_from_json(&doc, buf, (ssize_t)got, &berr)) {
        bson_init(&doc);
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_BSON, (int)berr.code,
                          "%s: corrupt checkpoint file: %s", path, berr.message);
        goto done;
    }
    rc = mc__record_from_bson(&doc, path, out, err);
done:
    if (fd >= 0) {
        close(fd);
    }
    bson_destroy(&doc);
    bson_free(buf);
    bson_free(path);
    return rc;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int file_save(mc__token_store_t *store, const char *stream, const char *sink,
                     const mc__position_t *pos, const bson_t *definition, mc_error_t *err)
{
    file_store_t *fs = (file_store_t *)store;
    bson_t doc = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&doc, "stream", stream);
    if (sink) {
        BSON_APPEND_UTF8(&doc, "sink", sink);
    }
    mc__record_append(&doc, pos, definition);
    size_t jlen = 0;
    char *json = mc__json_render(&doc, MC__JSON_CANONICAL_COMPACT, 0, &jlen, NULL);
    bson_destroy(&doc);
    if (!json) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "stream %s: resume token cannot be rendered as JSON", stream);
    }
    char *tmp = path_for(fs, stream, sink, ".tmp");
    char *final = path_for(fs, stream, sink, "");
    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", tmp, strerror(e));
        goto done;
    }
    if (write_all(fd, json, jlen) != 0 || write_all(fd, "\n", 1) != 0 || fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", tmp, strerror(e));
        goto done;
    }
    if (close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "%s: %s", tmp, strerror(e));
        goto done;
    }
    if (rename(tmp, final) != 0) {
        int e = errno;
        unlink(tmp);
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "rename %s: %s", final, strerror(e));
        goto done;
    }
    /* The rename itself lives in the directory: without this fsync a power loss can bring
     * back the old name even though the new data blocks reached the disk. */
    int dfd = open(fs->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        if (fsync(dfd) != 0) {
            int e = errno;
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "fsync %s: %s", fs->dir,
                              strerror(e));
        }
        close(dfd);
    }
done:
    bson_free(json);
    bson_free(tmp);
    bson_free(final);
    return rc;
}

static void file_destroy(mc__token_store_t *store)
{
    file_store_t *fs = (file_store_t *)store;
    bson_free(fs->dir);
    free(fs);
}

static const mc__token_store_vtable_t file_vtable = {
    .name = "file",
    .load = file_load,
    .save = file_save,
    .destroy = file_destroy,
};

mc__token_store_t *mc__token_store_file_new(const char *dir, mc_error_t *err)
{
    if (!dir || !*dir) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "checkpoint.path is required for the file store");
        return NULL;
    }
    if (mkdir_p(dir, err) != 0) {
        return NULL;
    }
    file_store_t *fs = calloc(1, sizeof(*fs));
    if (!fs) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    fs->base.vt = &file_vtable;
    fs->dir = bson_strdup(dir);
    return &fs->base;
}
