/*
 * test_http.c: request reading and target parsing of src/daemon/http.c: headers kept,
 * requests split at every byte, pipelining, upgrade boundaries, limits (414, 431), bodies
 * refused, malformed requests, query percent-decoding, Bearer tokens, header token lists and
 * event id syntax.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

/* Feeds `text` in steps of `step` bytes (0: whole). Returns the result and the number of
 * bytes the request used. */
static mcd_http_result_t parse(mcd_http_req_t *req, const char *text, size_t len, size_t step,
                               size_t *used_total)
{
    mcd_http_req_init(req);
    size_t off = 0;
    *used_total = 0;
    while (off < len) {
        size_t chunk = step ? (len - off < step ? len - off : step) : len - off;
        size_t used = 0;
        mcd_http_result_t r = mcd_http_req_feed(req, text + off, chunk, &used);
        if (r != MCD_HTTP_MORE) {
            *used_total = off + used;
            return r;
        }
        assert_int_equal(used, chunk);
        off += chunk;
    }
    *used_total = off;
    return MCD_HTTP_MORE;
}

static const char ws_request[] = "GET /v1/streams/orders?since=8264&token=abc HTTP/1.1\r\n"
                                 "Host: example.com\r\n"
                                 "Upgrade: websocket\r\n"
                                 "Connection: keep-alive, Upgrade\r\n"
                                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                 "Sec-WebSocket-Version: 13\r\n"
                                 "Origin: http://localhost:8080\r\n"
                                 "X-Other: dropped\r\n"
                                 "\r\n";

static void test_websocket_request_any_split(void **state)
{
    (void)state;
    size_t len = strlen(ws_request);
    char buf[1024];
    /* frame bytes right after the request must be left for the WebSocket parser */
    memcpy(buf, ws_request, len);
    memcpy(buf + len, "\x81\x80\x01\x02\x03\x04", 6);
    for (size_t step = 0; step <= 7; step++) {
        mcd_http_req_t req;
        size_t used = 0;
        assert_int_equal(parse(&req, buf, len + 6, step, &used), MCD_HTTP_DONE);
        assert_int_equal(used, len);
        assert_true(req.upgrade);
        assert_int_equal(req.method, HTTP_GET);
        assert_string_equal(mcd_http_req_target(&req), "/v1/streams/orders?since=8264&token=abc");
        assert_string_equal(mcd_http_req_header(&req, MCD_H_HOST), "example.com");
        assert_string_equal(mcd_http_req_header(&req, MCD_H_UPGRADE), "websocket");
        assert_string_equal(mcd_http_req_header(&req, MCD_H_WS_KEY), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_string_equal(mcd_http_req_header(&req, MCD_H_WS_VERSION), "13");
        assert_string_equal(mcd_http_req_header(&req, MCD_H_ORIGIN), "http://localhost:8080");
        assert_null(mcd_http_req_header(&req, MCD_H_AUTHORIZATION));
        assert_true(mcd_http_has_token(mcd_http_req_header(&req, MCD_H_CONNECTION), "upgrade"));
        mcd_http_req_cleanup(&req);
    }
}

static void test_pipelined_keep_alive(void **state)
{
    (void)state;
    const char *two =
        "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /readyz HTTP/1.1\r\nHost: a\r\n\r\n";
    mcd_http_req_t req;
    size_t used = 0;
    assert_int_equal(parse(&req, two, strlen(two), 0, &used), MCD_HTTP_DONE);
    assert_int_equal(used, strlen("GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"));
    assert_true(req.keep_alive);
    assert_false(req.upgrade);
    assert_string_equal(mcd_http_req_target(&req), "/healthz");
    mcd_http_req_cleanup(&req);
    assert_int_equal(parse(&req, two + used, strlen(two) - used, 0, &used), MCD_HTTP_DONE);
    assert_string_equal(mcd_http_req_target(&req), "/readyz");
    mcd_http_req_cleanup(&req);
    /* HTTP/1.0 and Connection: close end keep-alive */
    const char *old = "GET / HTTP/1.0\r\n\r\n";
    assert_int_equal(parse(&req, old, strlen(old), 0, &used), MCD_HTTP_DONE);
    assert_false(req.keep_alive);
    mcd_http_req_cleanup(&req);
    const char *cl = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert_int_equal(parse(&req, cl, strlen(cl), 0, &used), MCD_HTTP_DONE);
    assert_false(req.keep_alive);
    mcd_http_req_cleanup(&req);
}

static void test_incomplete_is_more(void **state)
{
    (void)state;
    const char *part = "GET /v1/streams HTTP/1.1\r\nHost: a\r\n";
    mcd_http_req_t req;
    size_t used = 0;
    assert_int_equal(parse(&req, part, strlen(part), 0, &used), MCD_HTTP_MORE);
    mcd_http_req_cleanup(&req);
}

static void expect_error(const char *text, size_t len, int status)
{
    for (size_t step = 0; step <= 1; step++) {
        mcd_http_req_t req;
        size_t used = 0;
        assert_int_equal(parse(&req, text, len, step ? 997 : 0, &used), MCD_HTTP_ERROR);
        assert_int_equal(req.status, status);
        assert_non_null(req.error);
        mcd_http_req_cleanup(&req);
    }
}

static void test_limits(void **state)
{
    (void)state;
    size_t cap = 100000;
    char *big = malloc(cap);
    assert_non_null(big);
    /* target over 16 KiB: 414 */
    int n = snprintf(big, cap, "GET /");
    memset(big + n, 'a', MCD_HTTP_MAX_TARGET);
    n += MCD_HTTP_MAX_TARGET;
    n += snprintf(big + n, cap - (size_t)n, " HTTP/1.1\r\nHost: a\r\n\r\n");
    expect_error(big, (size_t)n, 414);
    /* target of exactly 16 KiB is fine */
    n = snprintf(big, cap, "GET /");
    memset(big + n, 'a', MCD_HTTP_MAX_TARGET - 1);
    n += MCD_HTTP_MAX_TARGET - 1;
    n += snprintf(big + n, cap - (size_t)n, " HTTP/1.1\r\nHost: a\r\n\r\n");
    mcd_http_req_t req;
    size_t used = 0;
    assert_int_equal(parse(&req, big, (size_t)n, 0, &used), MCD_HTTP_DONE);
    assert_int_equal(req.target_len, MCD_HTTP_MAX_TARGET);
    mcd_http_req_cleanup(&req);
    /* one header value over 16 KiB: 431 (a dropped header counts too) */
    n = snprintf(big, cap, "GET / HTTP/1.1\r\nX-Big: ");
    memset(big + n, 'b', MCD_HTTP_MAX_HEADER_BYTES);
    n += MCD_HTTP_MAX_HEADER_BYTES;
    n += snprintf(big + n, cap - (size_t)n, "\r\n\r\n");
    expect_error(big, (size_t)n, 431);
    /* too many headers: 431 */
    n = snprintf(big, cap, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < MCD_HTTP_MAX_HEADERS + 1; i++) {
        n += snprintf(big + n, cap - (size_t)n, "X-H%d: v\r\n", i);
    }
    n += snprintf(big + n, cap - (size_t)n, "\r\n");
    expect_error(big, (size_t)n, 431);
    free(big);
}

static void test_bad_requests(void **state)
{
    (void)state;
    const char *body = "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    expect_error(body, strlen(body), 400);
    const char *chunked =
        "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    expect_error(chunked, strlen(chunked), 400);
    const char *garbage = "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    expect_error(garbage, strlen(garbage), 400);
    const char *space = "GET /a b HTTP/1.1\r\n\r\n";
    expect_error(space, strlen(space), 400);
    const char *dup =
        "GET / HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Key: y\r\n\r\n";
    expect_error(dup, strlen(dup), 400);
    const char *smuggle =
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    expect_error(smuggle, strlen(smuggle), 400);
    /* a list header given twice is joined */
    const char *two = "GET / HTTP/1.1\r\nAccept: text/html\r\nAccept: text/event-stream\r\n\r\n";
    mcd_http_req_t req;
    size_t used = 0;
    assert_int_equal(parse(&req, two, strlen(two), 3, &used), MCD_HTTP_DONE);
    assert_string_equal(mcd_http_req_header(&req, MCD_H_ACCEPT), "text/html, text/event-stream");
    assert_true(mcd_http_has_token(mcd_http_req_header(&req, MCD_H_ACCEPT), "text/event-stream"));
    mcd_http_req_cleanup(&req);
    /* an empty kept header is present and empty */
    const char *empty = "GET / HTTP/1.1\r\nOrigin:\r\nHost: h\r\n\r\n";
    assert_int_equal(parse(&req, empty, strlen(empty), 0, &used), MCD_HTTP_DONE);
    assert_string_equal(mcd_http_req_header(&req, MCD_H_ORIGIN), "");
    assert_string_equal(mcd_http_req_header(&req, MCD_H_HOST), "h");
    mcd_http_req_cleanup(&req);
    /* other methods parse (the server answers 405) */
    const char *post = "POST /v1/streams HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_int_equal(parse(&req, post, strlen(post), 0, &used), MCD_HTTP_DONE);
    assert_int_equal(req.method, HTTP_POST);
    mcd_http_req_cleanup(&req);
}

static void test_target_parse(void **state)
{
    (void)state;
    mcd_http_target_t t;
    const char *why = NULL;
    const char *a = "/v1/streams/my%20stream?vars=%7B%22user%22%3A%22u+1%22%7D&filter=%7B%7D"
                    "&since=82AB&token=t.k.n&other=1&flag";
    assert_int_equal(mcd_http_target_parse(a, strlen(a), &t, &why), 0);
    assert_string_equal(t.path, "/v1/streams/my stream");
    assert_string_equal(t.vars, "{\"user\":\"u 1\"}");
    assert_string_equal(t.filter, "{}");
    assert_string_equal(t.since, "82AB");
    assert_string_equal(t.token, "t.k.n");
    mcd_http_target_cleanup(&t);

    /* '+' stays '+' in the path */
    const char *b = "/a+b?since=";
    assert_int_equal(mcd_http_target_parse(b, strlen(b), &t, &why), 0);
    assert_string_equal(t.path, "/a+b");
    assert_string_equal(t.since, "");
    assert_null(t.vars);
    mcd_http_target_cleanup(&t);

    const char *bad[] = {
        "/x?since=%zz",       /* bad escape */
        "/x?since=%4",        /* truncated escape */
        "/x?filter=a%00b",    /* NUL */
        "/x%",                /* bad escape in path */
        "/x?since=1&since=2", /* repeated */
        "x?since=1",          /* not origin-form */
        "http://h/x",         /* absolute-form */
        "/x#frag",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        why = NULL;
        assert_int_equal(mcd_http_target_parse(bad[i], strlen(bad[i]), &t, &why), -1);
        assert_non_null(why);
        assert_null(t.path);
    }

    char out[32];
    assert_int_equal(mcd_http_percent_decode("a%41+", 5, out, true), 3);
    assert_string_equal(out, "aA ");
    assert_int_equal(mcd_http_percent_decode("a%41+", 5, out, false), 3);
    assert_string_equal(out, "aA+");
    assert_int_equal(mcd_http_percent_decode("%", 1, out, false), -1);
}

static void test_tokens_and_ids(void **state)
{
    (void)state;
    assert_true(mcd_http_has_token("keep-alive, Upgrade", "upgrade"));
    assert_true(
        mcd_http_has_token("text/html;q=0.9, text/event-stream ; q=1", "text/event-stream"));
    assert_false(mcd_http_has_token("text/event-streamx", "text/event-stream"));
    assert_false(mcd_http_has_token(NULL, "x"));
    assert_false(mcd_http_has_token("", "x"));
    size_t len = 0;
    const char *t = mcd_http_bearer("Bearer abc.def ", &len);
    assert_non_null(t);
    assert_int_equal(len, 7);
    assert_memory_equal(t, "abc.def", 7);
    assert_non_null(mcd_http_bearer("bearer   x", &len));
    assert_null(mcd_http_bearer("Basic dXNlcjpwYXNz", &len));
    assert_null(mcd_http_bearer("Bearer", &len));
    assert_null(mcd_http_bearer("Bearer   ", &len));
    assert_null(mcd_http_bearer("Bearerabc", &len));
    assert_true(mcd_http_valid_event_id("8264A1B2C3"));
    assert_true(mcd_http_valid_event_id("deadbeef"));
    assert_false(mcd_http_valid_event_id(""));
    assert_false(mcd_http_valid_event_id(NULL));
    assert_false(mcd_http_valid_event_id("82 64"));
    assert_false(mcd_http_valid_event_id("xyz"));
    char longid[1100];
    memset(longid, 'a', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    assert_false(mcd_http_valid_event_id(longid));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_websocket_request_any_split),
        cmocka_unit_test(test_pipelined_keep_alive),
        cmocka_unit_test(test_incomplete_is_more),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_target_parse),
        cmocka_unit_test(test_tokens_and_ids),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
