/*
 * fuzz_http_request.c: libFuzzer target for the request-reading path of the live server
 * (src/daemon/http.c): the llhttp callbacks that keep the target and the known headers under
 * the limits, then what the server does with a complete request: split the target into path
 * and query parameters (percent-decoding), check the event id syntax, extract a Bearer token,
 * look for header tokens (Upgrade, Connection, Accept) and compute the WebSocket accept key.
 * The first byte picks how the input is split into reads; pipelined requests are followed up
 * to 8 deep. Checked invariants: consumption never exceeds the input, a completed request's
 * target respects the limit and kept headers are NUL-terminated strings. Single-threaded.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "ws.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void inspect(mcd_http_req_t *req)
{
    const char *target = mcd_http_req_target(req);
    if (strlen(target) != req->target_len || req->target_len > MCD_HTTP_MAX_TARGET) {
        abort();
    }
    mcd_http_target_t t;
    const char *why = NULL;
    if (mcd_http_target_parse(target, req->target_len, &t, &why) == 0) {
        if (!t.path || t.path[0] != '/') {
            abort();
        }
        mcd_http_valid_event_id(t.since);
        mcd_http_target_cleanup(&t);
    } else if (!why || t.path) {
        abort();
    }
    for (int h = 0; h < MCD_H_COUNT; h++) {
        const char *v = mcd_http_req_header(req, (mcd_http_header_t)h);
        if (v && strlen(v) > MCD_HTTP_MAX_HEADER_BYTES * 2) {
            abort();
        }
    }
    size_t len = 0;
    const char *tok = mcd_http_bearer(mcd_http_req_header(req, MCD_H_AUTHORIZATION), &len);
    if (tok && len == 0) {
        abort();
    }
    mcd_http_has_token(mcd_http_req_header(req, MCD_H_UPGRADE), "websocket");
    mcd_http_has_token(mcd_http_req_header(req, MCD_H_CONNECTION), "upgrade");
    mcd_http_has_token(mcd_http_req_header(req, MCD_H_ACCEPT), "text/event-stream");
    mcd_http_valid_event_id(mcd_http_req_header(req, MCD_H_LAST_EVENT_ID));
    const char *key = mcd_http_req_header(req, MCD_H_WS_KEY);
    if (key) {
        char accept[29];
        mcd_ws_accept_key(key, strlen(key), accept);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    size_t step = data[0] ? data[0] : 0;
    const char *in = (const char *)data + 1;
    size_t len = size - 1;
    size_t off = 0;
    for (int n = 0; n < 8 && off < len; n++) {
        mcd_http_req_t req;
        mcd_http_req_init(&req);
        mcd_http_result_t r = MCD_HTTP_MORE;
        while (off < len) {
            size_t chunk = step ? (len - off < step ? len - off : step) : len - off;
            size_t used = 0;
            r = mcd_http_req_feed(&req, in + off, chunk, &used);
            if (used > chunk) {
                abort();
            }
            off += used;
            if (r != MCD_HTTP_MORE) {
                break;
            }
            if (used != chunk) {
                abort();
            }
        }
        if (r == MCD_HTTP_DONE) {
            inspect(&req);
        } else if (r == MCD_HTTP_ERROR && (req.status < 400 || !req.error)) {
            abort();
        }
        mcd_http_req_cleanup(&req);
        if (r != MCD_HTTP_DONE) {
            break;
        }
    }
    return 0;
}
