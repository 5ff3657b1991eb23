/*
 * log.c: the --log FILE request/reply journal of mongo-emulator, one JSON object per line
 * (documents in relaxed Extended JSON), in the spirit of the probe captures in
 * shared/reference/wire-captures.
 *
 * Any thread; srv->log_lock (not srv->lock) serialises writers so logging never extends the
 * time the server lock is held. Without --log every function returns at once, before any
 * JSON conversion, so the hot path pays nothing.
 */
#include "core.h"

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>

int emu_log_open(emu_server_t *srv, const char *path, mc_error_t *err)
{
    srv->log = NULL;
    if (!path) {
        return 0;
    }
    srv->log = fopen(path, "a");
    if (!srv->log) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, errno, "cannot open log %s: %s", path,
                            strerror(errno));
    }
    setvbuf(srv->log, NULL, _IOLBF, 0);
    return 0;
}

void emu_log_close(emu_server_t *srv)
{
    if (srv->log) {
        fclose(srv->log);
        srv->log = NULL;
    }
}

static void timestamp(char *buf, size_t size)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03dZ", (int)(ts.tv_nsec / 1000000L) % 1000);
}

static const char *op_name(int opcode)
{
    switch (opcode) {
    case EMU_OPCODE_MSG: return "OP_MSG";
    case EMU_OPCODE_QUERY: return "OP_QUERY";
    case EMU_OPCODE_REPLY: return "OP_REPLY";
    default: return "OTHER";
    }
}

void emu_log_doc(emu_server_t *srv, const emu_conn_t *conn, const char *dir, int opcode,
                 const bson_t *doc)
{
    char ts[40];
    char *json;

    if (!srv->log) {
        return;
    }
    json = bson_as_relaxed_extended_json(doc, NULL);
    timestamp(ts, sizeof(ts));
    pthread_mutex_lock(&srv->log_lock);
    fprintf(srv->log, "{\"t\":\"%s\",\"conn\":%lld,\"dir\":\"%s\",\"op\":\"%s\",\"doc\":%s}\n", ts,
            conn ? (long long)conn->id : 0LL, dir, op_name(opcode), json ? json : "null");
    pthread_mutex_unlock(&srv->log_lock);
    bson_free(json);
}

void emu_log_event(emu_server_t *srv, const emu_conn_t *conn, const char *fmt, ...)
{
    char text[512], escaped[1100], ts[40];
    size_t o = 0;
    va_list ap;

    if (!srv->log) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    for (const unsigned char *p = (const unsigned char *)text; *p && o + 7 < sizeof(escaped); p++) {
        if (*p == '"' || *p == '\\') {
            escaped[o++] = '\\';
            escaped[o++] = (char)*p;
        } else if (*p < 0x20) {
            o += (size_t)snprintf(escaped + o, sizeof(escaped) - o, "\\u%04x", *p);
        } else {
            escaped[o++] = (char)*p;
        }
    }
    escaped[o] = '\0';
    timestamp(ts, sizeof(ts));
    pthread_mutex_lock(&srv->log_lock);
    fprintf(srv->log, "{\"t\":\"%s\",\"conn\":%lld,\"event\":\"%s\"}\n", ts,
            conn ? (long long)conn->id : 0LL, escaped);
    pthread_mutex_unlock(&srv->log_lock);
}
