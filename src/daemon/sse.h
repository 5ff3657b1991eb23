/*
 * sse.h: Server-Sent Events framing (text/event-stream), pure functions (sse.c).
 *
 * Thread: any.
 */
#ifndef MONGOCAST_DAEMON_SSE_H
#define MONGOCAST_DAEMON_SSE_H

#include <stdint.h>

#include "mongocast.h"

/* The response head of an SSE stream (status line, headers, blank line, "retry: 2000"). */
extern const char mcd_sse_preamble[];
/* The heartbeat comment. */
#define MCD_SSE_HEARTBEAT ": heartbeat\n\n"
/* Writes "id: <id>\nevent: <type>\ndata: " for `ev` into a new buffer (*len: its length);
 * `type` NULL: the event's kind name. */
char *mcd_sse_head(const mc_event_t *ev, const char *type, uint32_t *len);

/* Writes the event that ends a subscriber's stream for a reason into out[0..cap):
 * "event: error\ndata: {"type":"error","stream":S,"code":C,"reason":R}\n\n" (no id line, so
 * Last-Event-ID keeps naming the last change). Returns its length (0 when cap is too small;
 * 512 bytes always suffice for a stream name and a reason of up to 128 bytes). */
size_t mcd_sse_error_event(char *out, size_t cap, const char *stream, const char *code,
                           const char *reason);

#endif
