/*
 * msg.c: the wire messages of msg.h: an event's message of docs/protocol.md (per routing
 * view, or a subscriber's own) framed once for WebSocket (header) and SSE (head + blank line),
 * or raw bytes (HTTP answers, control frames).
 *
 * Thread: the server's loop thread only.
 * Invariants: encode once: an event becomes one mcd_msg_t per view, whose WebSocket header and
 * SSE head are built at most once; the history ring and every subscriber queue hold
 * references to them. A view whose message passes server.max_message_bytes becomes that
 * view's oversize notice here, once, so the ring and every queue share the notice and never
 * the big message; a notice says no more than its view would have (an ENTERED notice has no
 * field of the previous owner's version, not even the full message's size). A subscriber
 * whose own stages reshape the change gets messages of its own (mcd_msg_new_own()), held to
 * the same limit, whose notice says no more than its own change would have.
 */
#include "msg.h"

#include <stdlib.h>
#include <string.h>

#include "sse.h"
#include "ws.h"

/* The message of `view` of `ev`, or, with `change`, of a subscriber's own copy of the
 * view's change (mc_event_json_view_with_change(): rendered here, never cached). */
static mcd_msg_t *msg_new(mc_event_t *ev, mc_event_view_t view, const bson_t *change,
                          size_t max_bytes)
{
    size_t len = 0;
    char *rendered = change ? mc_event_json_view_with_change(ev, view, change, &len) : NULL;
    const char *json = change ? rendered : mc_event_json_view(ev, view, &len);
    mcd_msg_t *msg = json ? calloc(1, sizeof(*msg)) : NULL;
    if (!msg) {
        bson_free(rendered);
        return NULL;
    }
    msg->refs = 1;
    msg->view = (uint8_t)view;
    msg->max_bytes = max_bytes;
    msg->ev = mc_event_ref(ev);
    if (view != MC_EVENT_VIEW_LEFT && mc_event_kind(ev) == MC_EVENT_CHANGE &&
        mc_event_server_oversize(ev)) {
        /* An event MongoDB could not return (on_oversize: skip) renders as its notice. */
        msg->flags |= MCD_MSG_OVERSIZE;
    }
    if ((max_bytes && len > max_bytes) || len > UINT32_MAX / 2) {
        /* Too big to send: a small notice in its place, built once like the message, and
         * from the subscriber's own change when it has one. */
        size_t nlen = 0;
        char *notice =
            change ? mc_event_oversize_json_view_with_change(ev, view, change, len, max_bytes, &nlen)
                   : mc_event_oversize_json_view(ev, view, len, max_bytes, &nlen);
        bson_free(rendered);
        rendered = NULL;
        msg->owned = notice ? malloc(nlen + 1) : NULL;
        if (!msg->owned) {
            bson_free(notice);
            mcd_msg_unref(msg);
            return NULL;
        }
        memcpy(msg->owned, notice, nlen + 1);
        bson_free(notice);
        msg->flags |= MCD_MSG_OVERSIZE;
        json = msg->owned;
        len = nlen;
    }
    msg->body = json;
    msg->body_len = (uint32_t)len;
    /* SSE ends an event at a blank line, so the data must be one line. JSON only has raw
     * line breaks as insignificant whitespace (inside strings they are escaped), so turning
     * them into spaces keeps the same JSON value. A subscriber's own text is copied too: the
     * message keeps it. */
    if (!msg->owned && (rendered || memchr(json, '\n', len) || memchr(json, '\r', len))) {
        msg->owned = malloc(len + 1);
        if (!msg->owned) {
            bson_free(rendered);
            mcd_msg_unref(msg);
            return NULL;
        }
        for (size_t i = 0; i < len; i++) {
            msg->owned[i] = (json[i] == '\n' || json[i] == '\r') ? ' ' : json[i];
        }
        msg->owned[len] = '\0';
        msg->body = msg->owned;
    }
    bson_free(rendered);
    msg->ws_hdr_len = (uint8_t)mcd_ws_frame_header(msg->ws_hdr, MCD_WS_OP_TEXT, len);
    return msg;
}

mcd_msg_t *mcd_msg_new_event(mc_event_t *ev, size_t max_bytes)
{
    return msg_new(ev, MC_EVENT_VIEW_FULL, NULL, max_bytes);
}

mcd_msg_t *mcd_msg_new_own(mcd_msg_t *full, mc_event_view_t view, const bson_t *change)
{
    if ((view != MC_EVENT_VIEW_FULL && view != MC_EVENT_VIEW_ENTERED) || !full->ev ||
        full->view != MC_EVENT_VIEW_FULL) {
        return NULL;
    }
    return msg_new(full->ev, view, change, full->max_bytes);
}

mcd_msg_t *mcd_msg_view(mcd_msg_t *full, mc_event_view_t view)
{
    if (view == MC_EVENT_VIEW_FULL) {
        return full;
    }
    if ((view != MC_EVENT_VIEW_ENTERED && view != MC_EVENT_VIEW_LEFT) || !full->ev ||
        full->view != MC_EVENT_VIEW_FULL) {
        return NULL;
    }
    mcd_msg_t **slot = &full->views[view == MC_EVENT_VIEW_ENTERED ? 0 : 1];
    if (!*slot) {
        *slot = msg_new(full->ev, view, NULL, full->max_bytes);
    }
    return *slot;
}

mcd_msg_t *mcd_msg_new_raw(const void *bytes, size_t len)
{
    mcd_msg_t *msg = calloc(1, sizeof(*msg));
    if (!msg) {
        return NULL;
    }
    msg->owned = malloc(len ? len : 1);
    if (!msg->owned) {
        free(msg);
        return NULL;
    }
    memcpy(msg->owned, bytes, len);
    msg->refs = 1;
    msg->flags = MCD_MSG_RAW;
    msg->body = msg->owned;
    msg->body_len = (uint32_t)len;
    return msg;
}

mcd_msg_t *mcd_msg_new_taken(char *bytes, size_t off, size_t len)
{
    mcd_msg_t *msg = len <= UINT32_MAX ? calloc(1, sizeof(*msg)) : NULL;
    if (!msg) {
        bson_free(bytes);
        return NULL;
    }
    msg->refs = 1;
    msg->flags = MCD_MSG_RAW | MCD_MSG_BSON_MEM;
    msg->owned = bytes;
    msg->body = bytes + off;
    msg->body_len = (uint32_t)len;
    return msg;
}

void mcd_msg_unref(mcd_msg_t *msg)
{
    if (!msg || (msg->flags & MCD_MSG_STATIC)) {
        return;
    }
    if (--msg->refs > 0) {
        return;
    }
    mcd_msg_unref(msg->views[0]);
    mcd_msg_unref(msg->views[1]);
    mc_event_unref(&msg->ev);
    free(msg->sse_head);
    if (msg->flags & MCD_MSG_BSON_MEM) {
        bson_free(msg->owned);
    } else {
        free(msg->owned);
    }
    free(msg);
}

/* A LEFT message has no id line: its event id names a change the subscriber did not receive,
 * and a resume from it must not skip what that subscriber missed before it. */
static char *left_sse_head(uint32_t *len)
{
    static const char head[] = "event: left\ndata: ";
    char *out = malloc(sizeof(head));
    if (out) {
        memcpy(out, head, sizeof(head));
        *len = (uint32_t)(sizeof(head) - 1);
    }
    return out;
}

static const char sse_end[] = "\n\n";

size_t mcd_msg_size_any(mcd_msg_t *msg, mcd_transport_t t)
{
    if (msg->flags & MCD_MSG_RAW) {
        return msg->body_len;
    }
    if (t == MCD_T_SSE) {
        if (!msg->sse_head) {
            /* An oversize LEFT notice is still a left notice (no id line either). */
            msg->sse_head =
                msg->view == MC_EVENT_VIEW_LEFT
                    ? left_sse_head(&msg->sse_head_len)
                    : mcd_sse_head(msg->ev, (msg->flags & MCD_MSG_OVERSIZE) ? "oversize" : NULL,
                                   &msg->sse_head_len);
            if (!msg->sse_head) {
                return 0;
            }
        }
        return (size_t)msg->sse_head_len + msg->body_len + 2;
    }
    return (size_t)msg->ws_hdr_len + msg->body_len;
}

unsigned mcd_msg_bufs(mcd_msg_t *msg, mcd_transport_t t, uv_buf_t out[3])
{
    if (msg->flags & MCD_MSG_RAW) {
        out[0] = uv_buf_init((char *)msg->body, msg->body_len);
        return 1;
    }
    if (t == MCD_T_SSE) {
        if (!msg->sse_head) {
            return 0; /* mcd_msg_size() builds it when the message is queued */
        }
        out[0] = uv_buf_init(msg->sse_head, msg->sse_head_len);
        out[1] = uv_buf_init((char *)msg->body, msg->body_len);
        out[2] = uv_buf_init((char *)sse_end, 2);
        return 3;
    }
    out[0] = uv_buf_init((char *)msg->ws_hdr, msg->ws_hdr_len);
    out[1] = uv_buf_init((char *)msg->body, msg->body_len);
    return 2;
}
