/*
 * msg.h: one message as it goes on the wire (an event rendered once per routing view, or raw
 * bytes), shared by every connection that sends it.
 *
 * Thread: the server's loop thread only; reference counts are plain integers.
 * Invariant: a message never changes once built, except that its SSE head is built on first
 * SSE use (mcd_msg_size_any()), before any connection queues it for SSE, that a FULL message
 * gains its ENTERED and LEFT messages on first use (mcd_msg_view()), and the fan-out's
 * MCD_MSG_COUNTED mark.
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
#define MCD_MSG_OVERSIZE 0x4 /* `body` is the view's oversize notice (SSE event: oversize) */
#define MCD_MSG_COUNTED 0x8  /* FULL: the fan-out counted the event as oversize */
#define MCD_MSG_BSON_MEM 0x10 /* `owned` came from bson_malloc (freed with bson_free) */

/* One message, built once and shared by every connection that sends it (a connection's queue
 * holds references, never copies). For an event, the WebSocket frame is ws_hdr + body and the
 * SSE event is sse_head + body + "\n\n"; both are unmasked server encodings, so one message
 * serves every subscriber of a transport. An event has one message per view
 * (mongocast/event.h): the FULL one is made for every event and owns the ENTERED and LEFT
 * ones, made on first use (an ownership change), so each view is encoded once for live
 * delivery and history replay alike. Each view is held to the size limit on its own: a view
 * whose message is too big becomes that view's oversize notice. */
typedef struct mcd_msg {
    uint32_t refs;
    uint8_t flags;
    uint8_t view; /* mc_event_view_t of body */
    uint8_t ws_hdr_len;
    uint8_t ws_hdr[10];
    struct mcd_msg *views[2]; /* FULL only: the ENTERED and LEFT messages, or NULL */
    size_t max_bytes;         /* the size limit the message (and its views) were made with */
    uint32_t body_len;
    uint32_t sse_head_len;
    const char *body; /* the event's message JSON (borrowed from ev) or raw bytes */
    char *sse_head;   /* "id: ..\nevent: ..\ndata: ", built on first SSE use */
    char *owned;      /* bytes this message owns (raw bytes or a sanitised JSON copy) */
    mc_event_t *ev;   /* one reference, or NULL for raw messages */
} mcd_msg_t;

typedef enum mcd_transport {
    MCD_T_HTTP = 0,
    MCD_T_WS = 1,
    MCD_T_SSE = 2,
} mcd_transport_t;

/* The message of `ev` (its FULL view), or its oversize notice when the message is longer
 * than `max_bytes` (0: no limit). NULL when memory runs out. */
mcd_msg_t *mcd_msg_new_event(mc_event_t *ev, size_t max_bytes);
/* The message of `view` of the event of `full` (a FULL message): `full` itself, or the view's
 * message owned by `full` (made on first use, held to the same limit, and then its oversize
 * notice when it is longer: mc_event_oversize_json_view()). Borrowed; NULL when the event has
 * no such view or memory runs out. */
mcd_msg_t *mcd_msg_view(mcd_msg_t *full, mc_event_view_t view);
/* A subscriber's own message of the event of `full` (a FULL message): the message of `view`
 * (FULL or ENTERED) carrying `change`, the subscriber's copy of the view's change made by its
 * own stages, held to the limit of `full` (past it: its oversize notice,
 * mc_event_oversize_json_view_with_change()). Owned by the caller (one reference); never
 * shared with other subscribers or put in the history ring. NULL for another view or when
 * memory runs out. */
mcd_msg_t *mcd_msg_new_own(mcd_msg_t *full, mc_event_view_t view, const bson_t *change);
mcd_msg_t *mcd_msg_new_raw(const void *bytes, size_t len);
/* A raw message that takes over `bytes` (bson_malloc'ed, e.g. a json_writer buffer) and sends
 * `len` bytes from `off`: a message framed by its maker for one transport (snapshot batches,
 * built on a worker thread; the loop thread takes them over). Frees `bytes` and returns NULL
 * when memory runs out. Any thread. */
mcd_msg_t *mcd_msg_new_taken(char *bytes, size_t off, size_t len);
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
