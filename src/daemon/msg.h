/*
 * msg.h: one message as it goes on the wire (an event rendered once, or raw bytes), shared by
 * every connection that sends it.
 *
 * Thread: the server's loop thread only; reference counts are plain integers.
 * Invariant: a message never changes once built, except that its SSE head is built on first
 * SSE use (mcd_msg_size_any()), before any connection queues it for SSE.
 */
#ifndef MONGOCAST_DAEMON_MSG_H
#define MONGOCAST_DAEMON_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "mongocast.h"

#define MCD_MSG_STATIC 0x1   /* lives as long as the server: never freed by unref */
#define MCD_MSG_RAW 0x2      /* `body` is written as is for every transport */
#define MCD_MSG_OVERSIZE 0x4 /* `body` is the event's oversize notice (SSE event: oversize) */

/* One message, built once and shared by every connection that sends it (a connection's queue
 * holds references, never copies). For an event, the WebSocket frame is ws_hdr + body and the
 * SSE event is sse_head + body + "\n\n"; both are unmasked server encodings, so one message
 * serves every subscriber of a transport. */
typedef struct mcd_msg {
    uint32_t refs;
    uint8_t flags;
    uint8_t ws_hdr_len;
    uint8_t ws_hdr[10];
    uint32_t body_len;
    uint32_t sse_head_len;
    const char *body; /* the event's §4.3 JSON (borrowed from ev) or raw bytes */
    char *sse_head;   /* "id: ..\nevent: ..\ndata: ", built on first SSE use */
    char *owned;      /* bytes this message owns (raw bytes or a sanitised JSON copy) */
    mc_event_t *ev;   /* one reference, or NULL for raw messages */
} mcd_msg_t;

typedef enum mcd_transport {
    MCD_T_HTTP = 0,
    MCD_T_WS = 1,
    MCD_T_SSE = 2,
} mcd_transport_t;

/* The message of `ev`, or its oversize notice when the message is longer than `max_bytes`
 * (0: no limit). NULL when memory runs out. */
mcd_msg_t *mcd_msg_new_event(mc_event_t *ev, size_t max_bytes);
mcd_msg_t *mcd_msg_new_raw(const void *bytes, size_t len);
void mcd_msg_unref(mcd_msg_t *msg);
static inline mcd_msg_t *mcd_msg_ref(mcd_msg_t *msg)
{
    msg->refs++;
    return msg;
}
/* Bytes `msg` takes on `t`; builds the SSE head on first SSE use (0 when that allocation
 * fails). Call it before mcd_msg_bufs(). */
size_t mcd_msg_size_any(mcd_msg_t *msg, mcd_transport_t t);
/* The same, inline for the per-delivery case (an event on a WebSocket). */
static inline size_t mcd_msg_size(mcd_msg_t *msg, mcd_transport_t t)
{
    if (t == MCD_T_WS && !(msg->flags & MCD_MSG_RAW)) {
        return (size_t)msg->ws_hdr_len + msg->body_len;
    }
    return mcd_msg_size_any(msg, t);
}
/* Fills up to 3 buffers for sending `msg` on `t`; returns how many. */
unsigned mcd_msg_bufs(mcd_msg_t *msg, mcd_transport_t t, uv_buf_t out[3]);

#endif
