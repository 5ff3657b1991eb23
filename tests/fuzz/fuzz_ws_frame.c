/*
 * fuzz_ws_frame.c: libFuzzer target for the WebSocket frame parser (src/daemon/ws.c). The
 * first input byte picks the message limit and how the rest is split into reads (as TCP may
 * split it); the rest is fed through mcd_ws_parse like the server does. Checked invariants:
 * every call consumes at most what it was given, an EV_NONE consumes everything, a complete
 * text message is valid UTF-8, no message passes the limit, and a failed parser stays failed
 * with a close code of 1002, 1007 or 1009. Also exercises the close-frame encoder and the
 * handshake key on the same bytes. Single-threaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

#define MSG_CAP 70000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    static const uint64_t limits[] = {1024, 65536, 125, 16};
    uint64_t max_msg = limits[data[0] & 3];
    size_t step = (data[0] >> 2) == 0 ? 0 : (size_t)(data[0] >> 2);
    data++;
    size--;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) {
        return 0;
    }
    memcpy(buf, data, size);
    static uint8_t msg[MSG_CAP];
    size_t msg_len = 0;
    bool msg_text = false;

    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, max_msg);
    size_t off = 0;
    bool failed = false;
    while (off < size && !failed) {
        size_t chunk = step ? (size - off < step ? size - off : step) : size - off;
        size_t done = 0;
        for (;;) {
            mcd_ws_event_t ev;
            size_t used = mcd_ws_parse(&p, buf + off + done, chunk - done, &ev);
            if (used > chunk - done) {
                abort();
            }
            done += used;
            if (ev.type == MCD_WS_EV_NONE) {
                if (done != chunk) {
                    abort();
                }
                break;
            }
            if (ev.type == MCD_WS_EV_ERROR) {
                if (ev.code != 1002 && ev.code != 1007 && ev.code != 1009) {
                    abort();
                }
                mcd_ws_event_t again;
                uint8_t x[3] = {0x81, 0x81, 0};
                mcd_ws_parse(&p, x, sizeof(x), &again);
                if (again.type != MCD_WS_EV_ERROR || again.code != ev.code) {
                    abort();
                }
                failed = true;
                break;
            }
            if (ev.type == MCD_WS_EV_DATA) {
                if (msg_len == 0) {
                    msg_text = ev.opcode == MCD_WS_OP_TEXT;
                }
                if (msg_len + ev.len > max_msg) {
                    abort();
                }
                if (msg_len + ev.len <= MSG_CAP) {
                    memcpy(msg + msg_len, ev.data, ev.len);
                }
                msg_len += ev.len;
                if (ev.message_end) {
                    if (msg_text && msg_len <= MSG_CAP && !mcd_ws_utf8_valid(msg, msg_len)) {
                        abort();
                    }
                    msg_len = 0;
                }
            } else if (ev.type == MCD_WS_EV_PING || ev.type == MCD_WS_EV_PONG) {
                if (ev.len > MCD_WS_MAX_CONTROL) {
                    abort();
                }
            } else if (ev.type == MCD_WS_EV_CLOSE) {
                if (ev.code != MCD_WS_CLOSE_NO_STATUS && !mcd_ws_close_code_valid(ev.code)) {
                    abort();
                }
                if (!mcd_ws_utf8_valid(ev.data, ev.len)) {
                    abort();
                }
            }
        }
        off += chunk;
    }
    mcd_ws_parser_cleanup(&p);

    /* Encoders and the handshake on the same bytes. */
    char reason[200];
    size_t rl = size < sizeof(reason) - 1 ? size : sizeof(reason) - 1;
    memcpy(reason, data, rl);
    reason[rl] = '\0';
    uint8_t cf[MCD_WS_MAX_CONTROL + 2];
    size_t n = mcd_ws_close_frame(cf, 1000, reason);
    if (n > sizeof(cf) || cf[1] != n - 2) {
        abort();
    }
    char accept[29];
    mcd_ws_accept_key((const char *)data, size, accept);
    free(buf);
    return 0;
}
