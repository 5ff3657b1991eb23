/*
 * sse_session.c: a Server-Sent Events subscriber after its request was accepted: the answer
 * head (with CORS for an allowed Origin) and the heartbeat and token-expiry housekeeping. The
 * event framing itself is sse.c's.
 *
 * Thread: the server's loop thread only.
 * Invariant: an SSE client sends nothing after its request; its input is read and ignored.
 */
#include <stdio.h>
#include <string.h>

#include "server_internal.h"

static mcd_msg_t heartbeat_msg = {.flags = MCD_MSG_STATIC | MCD_MSG_RAW,
                                  .body = MCD_SSE_HEARTBEAT,
                                  .body_len = sizeof(MCD_SSE_HEARTBEAT) - 1};

int mcd_sse_session_start(mcd_conn_t *c, const char *origin)
{
    mcd_server_t *srv = mcd_conn_server(c);
    char extra[512] = "";
    if (origin && srv->config->server.n_allowed_origins &&
        mcd_origin_allowed(srv->config, origin) && strlen(origin) < 300 &&
        !strpbrk(origin, "\r\n")) {
        snprintf(extra, sizeof(extra), "Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n",
                 origin);
    }
    /* The preamble's blank line ends the headers: put the CORS lines before it. */
    const char *blank = strstr(mcd_sse_preamble, "\r\n\r\n");
    size_t head_len = (size_t)(blank - mcd_sse_preamble) + 2;
    char head[1024];
    int n =
        snprintf(head, sizeof(head), "%.*s%s%s", (int)head_len, mcd_sse_preamble, extra, blank + 2);
    if (n < 0 || (size_t)n >= sizeof(head) || mcd_conn_send_raw(c, head, (size_t)n) != 0) {
        if (!(c->flags & MCD_CF_CLOSED)) {
            mcd_conn_abort(c);
        }
        return -1;
    }
    c->state = MCD_ST_SSE;
    c->next_beat_ms = (int64_t)uv_now(&srv->loop) + srv->timing.sse_ms;
    return 0;
}

void mcd_sse_session_tick(mcd_conn_t *c, int64_t now, int64_t wall_s)
{
    mcd_server_t *srv = mcd_conn_server(c);
    if (c->expires_s && wall_s >= (int64_t)c->expires_s) {
        mcd_conn_linger(c);
    } else if (now >= c->next_beat_ms) {
        if (mcd_conn_send(c, &heartbeat_msg, false) == 0) {
            c->next_beat_ms = now + srv->timing.sse_ms;
        }
    }
}
