/*
 * ws_session.c: a WebSocket subscriber after the upgrade: the 101 answer, incoming frames
 * (pings answered, client messages validated and ignored, close echoed), and the ping/pong
 * and token-expiry housekeeping.
 *
 * Thread: the server's loop thread only.
 * Invariant: every frame the server writes is a complete unmasked frame queued through
 * conn.h; a close frame is the last thing a connection queues.
 */
#include <stdio.h>
#include <string.h>

#include "server_internal.h"

/* Shared frames that never change: one copy for every connection. */
static mcd_msg_t ping_msg = {
    .flags = MCD_MSG_STATIC | MCD_MSG_RAW, .body = "\x89\x00", .body_len = 2};

void mcd_ws_input(mcd_conn_t *c, uint8_t *data, size_t len)
{
    size_t off = 0;
    while (c->state == MCD_ST_WS && !(c->flags & MCD_CF_CLOSED)) {
        mcd_ws_event_t ev;
        off += mcd_ws_parse(&c->ws, data + off, len - off, &ev);
        switch (ev.type) {
        case MCD_WS_EV_NONE: return;
        case MCD_WS_EV_DATA:
            break; /* validated by the parser; the protocol has no client messages */
        case MCD_WS_EV_PING: {
            uint8_t frame[10 + MCD_WS_MAX_CONTROL];
            size_t h = mcd_ws_frame_header(frame, MCD_WS_OP_PONG, ev.len);
            memcpy(frame + h, ev.data, ev.len);
            mcd_msg_t *m = mcd_msg_new_raw(frame, h + ev.len);
            if (!m) {
                mcd_conn_abort(c);
                return;
            }
            /* Counted against the queue limit: a client flooding pings without reading the
             * pongs is a slow consumer too. */
            mcd_conn_send(c, m, false);
            mcd_msg_unref(m);
            break;
        }
        case MCD_WS_EV_PONG: c->flags &= (uint8_t)~MCD_CF_PING_OUT; break;
        case MCD_WS_EV_CLOSE:
            mcd_conn_close(c, ev.code == MCD_WS_CLOSE_NO_STATUS ? MCD_WS_CLOSE_NORMAL : ev.code,
                           NULL, true);
            return;
        case MCD_WS_EV_ERROR:
            mc_log(MC_LOG_DEBUG, "server", "websocket protocol error code=%u: %s", ev.code,
                   ev.reason);
            mcd_conn_close(c, ev.code, ev.reason, true);
            return;
        }
    }
}

int mcd_ws_session_start(mcd_conn_t *c, const char accept_key[29])
{
    mcd_server_t *srv = mcd_conn_server(c);
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept_key);
    if (mcd_conn_send_raw(c, head, (size_t)n) != 0) {
        return -1;
    }
    mcd_ws_parser_init(
        &c->ws, srv->config->server.max_frame_bytes ? srv->config->server.max_frame_bytes : 65536);
    c->state = MCD_ST_WS;
    c->next_beat_ms = (int64_t)uv_now(&srv->loop) + srv->timing.ping_ms;
    return 0;
}

void mcd_ws_session_tick(mcd_conn_t *c, int64_t now, int64_t wall_s)
{
    mcd_server_t *srv = mcd_conn_server(c);
    if (c->expires_s && wall_s >= (int64_t)c->expires_s) {
        mcd_conn_close(c, MCD_WS_CLOSE_POLICY, "token expired", true);
    } else if ((c->flags & MCD_CF_PING_OUT) && now >= c->deadline_ms) {
        /* The peer is presumed dead: no close frame, it would not be read. */
        mcd_conn_abort(c);
    } else if (now >= c->next_beat_ms && !(c->flags & MCD_CF_PING_OUT)) {
        if (mcd_conn_send(c, &ping_msg, false) == 0) {
            c->flags |= MCD_CF_PING_OUT;
            c->deadline_ms = now + srv->timing.pong_ms;
            c->next_beat_ms = now + srv->timing.ping_ms;
        }
    }
}
