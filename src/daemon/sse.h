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
/* Writes "id: <id>\nevent: <type>\ndata: " for `ev` into a new buffer (*len: its length). */
char *mcd_sse_head(const mc_event_t *ev, uint32_t *len);

#endif
