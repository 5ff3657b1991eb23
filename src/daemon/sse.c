/*
 * sse.c: Server-Sent Events framing (text/event-stream).
 *
 * Each message is "id: <event id>\nevent: <type>\ndata: <json>\n\n"; control messages that
 * have no id (ready, reset, error) omit the id line so that a browser's Last-Event-ID keeps
 * naming the last change it saw. The stream starts with "retry: 2000" and a comment line is
 * sent as heartbeat. The head of a message is built once per event (msg.c caches it).
 *
 * Thread: any (pure functions, constant data).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sse.h"

#include "json_object.h"

const char mcd_sse_preamble[] = "HTTP/1.1 200 OK\r\n"
                                "Content-Type: text/event-stream\r\n"
                                "Cache-Control: no-cache\r\n"
                                "Connection: keep-alive\r\n"
                                "X-Accel-Buffering: no\r\n"
                                "\r\n"
                                "retry: 2000\n\n";

char *mcd_sse_head(const mc_event_t *ev, const char *type, uint32_t *len)
{
    const char *id = mc_event_id(ev);
    if (!type) {
        type = mc_event_kind_name(mc_event_kind(ev));
    }
    /* Event ids are hex resume tokens; anything with a line break could end the field. */
    if (id && strpbrk(id, "\r\n")) {
        id = NULL;
    }
    size_t cap = 32 + strlen(type) + (id ? strlen(id) : 0);
    char *out = malloc(cap);
    if (!out) {
        return NULL;
    }
    int n;
    if (id) {
        n = snprintf(out, cap, "id: %s\nevent: %s\ndata: ", id, type);
    } else {
        n = snprintf(out, cap, "event: %s\ndata: ", type);
    }
    if (n < 0 || (size_t)n >= cap) {
        free(out);
        return NULL;
    }
    *len = (uint32_t)n;
    return out;
}

size_t mcd_sse_error_event(char *out, size_t cap, const char *stream, const char *code,
                           const char *reason)
{
    size_t n = 0;
    int w = snprintf(out, cap, "event: error\ndata: {\"type\":\"error\",\"stream\":\"");
    if (w < 0 || (size_t)w >= cap || cap < 64) {
        return 0;
    }
    n = (size_t)w;
    /* Escaped JSON never holds a raw line break, so the data stays one line. */
    mcd_json_escape(out, cap - 48, &n, stream);
    n += (size_t)snprintf(out + n, cap - n, "\",\"code\":\"%s\",\"reason\":\"", code);
    mcd_json_escape(out, cap - 8, &n, reason);
    w = snprintf(out + n, cap - n, "\"}\n\n");
    if (w < 0 || (size_t)w >= cap - n) {
        return 0;
    }
    return n + (size_t)w;
}
