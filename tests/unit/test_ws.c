/*
 * test_ws.c: the RFC 6455 parser, encoder and handshake of src/daemon/ws.c: every server-side
 * must-fail case with its close code, fragmentation, masking, UTF-8 across fragments, control
 * frames split across reads, limits, and the accept key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "ws.h"

#define MAX_MSG 65536

/* Builds a client frame. len_mode: 0 minimal, 1 force 16-bit, 2 force 64-bit length. */
static size_t frame(uint8_t *out, int fin, int rsv, int op, bool masked, const void *payload,
                    size_t len, int len_mode)
{
    static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
    size_t n = 0;
    out[n++] = (uint8_t)((fin ? 0x80 : 0) | (rsv << 4) | op);
    uint8_t m = masked ? 0x80 : 0;
    if (len < 126 && len_mode == 0) {
        out[n++] = m | (uint8_t)len;
    } else if (len <= 0xFFFF && len_mode != 2) {
        out[n++] = m | 126;
        out[n++] = (uint8_t)(len >> 8);
        out[n++] = (uint8_t)len;
    } else {
        out[n++] = m | 127;
        for (int i = 0; i < 8; i++) {
            out[n++] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
        }
    }
    if (masked) {
        memcpy(out + n, key, 4);
        n += 4;
    }
    const uint8_t *p = payload;
    for (size_t i = 0; i < len; i++) {
        out[n + i] = masked ? (uint8_t)(p[i] ^ key[i & 3]) : p[i];
    }
    return n + len;
}

typedef struct collected {
    mcd_ws_event_type_t types[64];
    uint16_t codes[64];
    size_t n;
    uint8_t text[4096]; /* reassembled data of every message */
    size_t text_len;
    int messages;
    uint8_t ctl[128]; /* payload of the last control frame */
    size_t ctl_len;
} collected_t;

/* Feeds `data` in chunks of `step` bytes (0: all at once) and records every event until an
 * error or a close. Returns the last event type. */
static mcd_ws_event_type_t feed(mcd_ws_parser_t *p, uint8_t *data, size_t len, size_t step,
                                collected_t *c)
{
    memset(c, 0, sizeof(*c));
    size_t off = 0;
    mcd_ws_event_type_t last = MCD_WS_EV_NONE;
    while (off < len) {
        size_t chunk = step ? (len - off < step ? len - off : step) : len - off;
        size_t done = 0;
        for (;;) {
            mcd_ws_event_t ev;
            done += mcd_ws_parse(p, data + off + done, chunk - done, &ev);
            if (ev.type == MCD_WS_EV_NONE) {
                assert_int_equal(done, chunk);
                break;
            }
            assert_true(c->n < 64);
            c->types[c->n] = ev.type;
            c->codes[c->n] = ev.code;
            c->n++;
            last = ev.type;
            if (ev.type == MCD_WS_EV_DATA) {
                assert_true(c->text_len + ev.len <= sizeof(c->text));
                memcpy(c->text + c->text_len, ev.data, ev.len);
                c->text_len += ev.len;
                if (ev.message_end) {
                    c->messages++;
                }
            } else if (ev.type == MCD_WS_EV_PING || ev.type == MCD_WS_EV_PONG ||
                       ev.type == MCD_WS_EV_CLOSE) {
                memcpy(c->ctl, ev.data, ev.len);
                c->ctl_len = ev.len;
            }
            if (ev.type == MCD_WS_EV_ERROR || ev.type == MCD_WS_EV_CLOSE) {
                return last;
            }
        }
        off += chunk;
    }
    return last;
}

/* One frame, fed whole and byte by byte: must fail with `code`. */
static void expect_fail(uint8_t *buf, size_t n, uint16_t code)
{
    for (int pass = 0; pass < 2; pass++) {
        uint8_t copy[70000];
        memcpy(copy, buf, n);
        mcd_ws_parser_t p;
        mcd_ws_parser_init(&p, MAX_MSG);
        collected_t c;
        assert_int_equal(feed(&p, copy, n, pass ? 1 : 0, &c), MCD_WS_EV_ERROR);
        assert_int_equal(c.codes[c.n - 1], code);
        /* A failed parser stays failed. */
        mcd_ws_event_t ev;
        uint8_t more[2] = {0x81, 0x80};
        mcd_ws_parse(&p, more, 2, &ev);
        assert_int_equal(ev.type, MCD_WS_EV_ERROR);
        assert_int_equal(ev.code, code);
        mcd_ws_parser_cleanup(&p);
    }
}

static void test_accept_key(void **state)
{
    (void)state;
    char out[29];
    /* The example of RFC 6455 section 1.3. */
    const char *key = "dGhlIHNhbXBsZSBub25jZQ==";
    assert_int_equal(mcd_ws_accept_key(key, strlen(key), out), 0);
    assert_string_equal(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_int_equal(mcd_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ", 22, out), -1);
    assert_int_equal(mcd_ws_accept_key("dGhlIHNhbXBsZSBub25jZQ=x", 24, out), -1);
    assert_int_equal(mcd_ws_accept_key("dGhlIHNhbXBsZSBub2!jZQ==", 24, out), -1);
    assert_int_equal(mcd_ws_accept_key("dGhlIHNhbXBsZSBub25jZXhhaGE=", 28, out), -1);
}

static void test_masked_text(void **state)
{
    (void)state;
    uint8_t buf[256];
    size_t n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, "Hello", 5, 0);
    for (size_t step = 0; step <= 3; step++) {
        uint8_t copy[256];
        memcpy(copy, buf, n);
        mcd_ws_parser_t p;
        mcd_ws_parser_init(&p, MAX_MSG);
        collected_t c;
        feed(&p, copy, n, step, &c);
        assert_int_equal(c.messages, 1);
        assert_int_equal(c.text_len, 5);
        assert_memory_equal(c.text, "Hello", 5);
        mcd_ws_parser_cleanup(&p);
    }
}

static void test_lengths_16_and_64_bit(void **state)
{
    (void)state;
    static uint8_t payload[70000], buf[70100];
    for (size_t i = 0; i < sizeof(payload); i++) {
        payload[i] = (uint8_t)('a' + i % 26);
    }
    size_t sizes[] = {0, 125, 126, 65535};
    for (size_t k = 0; k < 4; k++) {
        size_t n = frame(buf, 1, 0, MCD_WS_OP_BINARY, true, payload, sizes[k], 0);
        mcd_ws_parser_t p;
        mcd_ws_parser_init(&p, MAX_MSG);
        collected_t c;
        memset(&c, 0, sizeof(c));
        size_t off = 0, got = 0;
        int msgs = 0;
        for (;;) {
            mcd_ws_event_t ev;
            off += mcd_ws_parse(&p, buf + off, n - off, &ev);
            if (ev.type == MCD_WS_EV_NONE) {
                break;
            }
            assert_int_equal(ev.type, MCD_WS_EV_DATA);
            assert_memory_equal(ev.data, payload + got, ev.len);
            got += ev.len;
            msgs += ev.message_end;
        }
        assert_int_equal(got, sizes[k]);
        assert_int_equal(msgs, 1);
    }
    /* 65536 bytes needs the 64-bit form; the limit is raised to allow it. */
    size_t n = frame(buf, 1, 0, MCD_WS_OP_BINARY, true, payload, 65536, 0);
    assert_int_equal(buf[1] & 0x7f, 127);
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, 70000);
    size_t off = 0, got = 0;
    for (;;) {
        mcd_ws_event_t ev;
        off += mcd_ws_parse(&p, buf + off, n - off, &ev);
        if (ev.type == MCD_WS_EV_NONE) {
            break;
        }
        assert_int_equal(ev.type, MCD_WS_EV_DATA);
        got += ev.len;
    }
    assert_int_equal(got, 65536);
}

static void test_unmasked_fails_1002(void **state)
{
    (void)state;
    uint8_t buf[64];
    size_t n = frame(buf, 1, 0, MCD_WS_OP_TEXT, false, "hi", 2, 0);
    expect_fail(buf, n, 1002);
    n = frame(buf, 1, 0, MCD_WS_OP_PING, false, "", 0, 0);
    expect_fail(buf, n, 1002);
}

static void test_rsv_bits_fail_1002(void **state)
{
    (void)state;
    for (int rsv = 1; rsv <= 7; rsv++) {
        uint8_t buf[64];
        size_t n = frame(buf, 1, rsv, MCD_WS_OP_TEXT, true, "hi", 2, 0);
        expect_fail(buf, n, 1002);
        n = frame(buf, 1, rsv, MCD_WS_OP_PING, true, "", 0, 0);
        expect_fail(buf, n, 1002);
    }
}

static void test_reserved_opcodes_fail_1002(void **state)
{
    (void)state;
    int ops[] = {3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF};
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        uint8_t buf[64];
        size_t n = frame(buf, 1, 0, ops[i], true, "x", 1, 0);
        expect_fail(buf, n, 1002);
    }
}

static void test_control_frame_rules_1002(void **state)
{
    (void)state;
    uint8_t buf[256], payload[126];
    memset(payload, 'p', sizeof(payload));
    /* fragmented ping / pong / close */
    int ops[] = {MCD_WS_OP_PING, MCD_WS_OP_PONG, MCD_WS_OP_CLOSE};
    for (int i = 0; i < 3; i++) {
        size_t n = frame(buf, 0, 0, ops[i], true, "ab", 2, 0);
        expect_fail(buf, n, 1002);
    }
    /* 126-byte ping (Autobahn 2.5) */
    size_t n = frame(buf, 1, 0, MCD_WS_OP_PING, true, payload, 126, 0);
    expect_fail(buf, n, 1002);
    /* 125 bytes is fine and echoed */
    n = frame(buf, 1, 0, MCD_WS_OP_PING, true, payload, 125, 0);
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, MAX_MSG);
    collected_t c;
    assert_int_equal(feed(&p, buf, n, 0, &c), MCD_WS_EV_PING);
    assert_int_equal(c.ctl_len, 125);
    assert_memory_equal(c.ctl, payload, 125);
    mcd_ws_parser_cleanup(&p);
}

static void test_control_split_across_reads(void **state)
{
    (void)state;
    uint8_t buf[256];
    size_t n = frame(buf, 1, 0, MCD_WS_OP_PING, true, "ping-payload", 12, 0);
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, MAX_MSG);
    collected_t c;
    assert_int_equal(feed(&p, buf, n, 1, &c), MCD_WS_EV_PING);
    assert_int_equal(c.ctl_len, 12);
    assert_memory_equal(c.ctl, "ping-payload", 12);
    mcd_ws_parser_cleanup(&p);
}

static void test_fragmentation_with_interleaved_ping(void **state)
{
    (void)state;
    uint8_t buf[512];
    size_t n = 0;
    n += frame(buf + n, 0, 0, MCD_WS_OP_TEXT, true, "Hel", 3, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_PING, true, "pp", 2, 0);
    n += frame(buf + n, 0, 0, MCD_WS_OP_CONT, true, "", 0, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_CONT, true, "lo!", 3, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_TEXT, true, "next", 4, 0);
    for (size_t step = 0; step <= 2; step++) {
        uint8_t copy[512];
        memcpy(copy, buf, n);
        mcd_ws_parser_t p;
        mcd_ws_parser_init(&p, MAX_MSG);
        collected_t c;
        feed(&p, copy, n, step, &c);
        assert_int_equal(c.messages, 2);
        assert_int_equal(c.text_len, 10);
        assert_memory_equal(c.text, "Hello!next", 10);
        int pings = 0;
        for (size_t i = 0; i < c.n; i++) {
            pings += c.types[i] == MCD_WS_EV_PING;
            assert_int_not_equal(c.types[i], MCD_WS_EV_ERROR);
        }
        assert_int_equal(pings, 1);
        mcd_ws_parser_cleanup(&p);
    }
}

static void test_continuation_rules_1002(void **state)
{
    (void)state;
    uint8_t buf[128];
    /* continuation with nothing to continue */
    size_t n = frame(buf, 1, 0, MCD_WS_OP_CONT, true, "x", 1, 0);
    expect_fail(buf, n, 1002);
    n = frame(buf, 0, 0, MCD_WS_OP_CONT, true, "x", 1, 0);
    expect_fail(buf, n, 1002);
    /* a new text frame in the middle of a fragmented message */
    n = frame(buf, 0, 0, MCD_WS_OP_TEXT, true, "a", 1, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_TEXT, true, "b", 1, 0);
    expect_fail(buf, n, 1002);
    n = frame(buf, 0, 0, MCD_WS_OP_BINARY, true, "a", 1, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_BINARY, true, "b", 1, 0);
    expect_fail(buf, n, 1002);
}

static void test_utf8(void **state)
{
    (void)state;
    uint8_t buf[256];
    /* valid: U+1F600 split inside the code point across two fragments */
    const uint8_t smile[] = {0xF0, 0x9F, 0x98, 0x80};
    size_t n = frame(buf, 0, 0, MCD_WS_OP_TEXT, true, smile, 2, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_CONT, true, smile + 2, 2, 0);
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, MAX_MSG);
    collected_t c;
    feed(&p, buf, n, 1, &c);
    assert_int_equal(c.messages, 1);
    assert_memory_equal(c.text, smile, 4);
    mcd_ws_parser_cleanup(&p);

    /* invalid byte in a single frame */
    const uint8_t bad1[] = {'a', 0xC0, 0x80};
    n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, bad1, 3, 0);
    expect_fail(buf, n, 1007);
    /* surrogate U+D800 */
    const uint8_t bad2[] = {0xED, 0xA0, 0x80};
    n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, bad2, 3, 0);
    expect_fail(buf, n, 1007);
    /* beyond U+10FFFF */
    const uint8_t bad3[] = {0xF4, 0x90, 0x80, 0x80};
    n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, bad3, 4, 0);
    expect_fail(buf, n, 1007);
    /* invalid across fragments: lead byte ends fragment 1, fragment 2 starts with ASCII */
    const uint8_t lead[] = {'o', 'k', 0xE2};
    n = frame(buf, 0, 0, MCD_WS_OP_TEXT, true, lead, 3, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_CONT, true, "x", 1, 0);
    expect_fail(buf, n, 1007);
    /* message ends inside a character */
    n = frame(buf, 0, 0, MCD_WS_OP_TEXT, true, lead, 3, 0);
    n += frame(buf + n, 1, 0, MCD_WS_OP_CONT, true, "", 0, 0);
    expect_fail(buf, n, 1007);
    /* fail fast: the error comes before the rest of a long frame arrives */
    uint8_t big[300];
    memset(big, 'a', sizeof(big));
    big[10] = 0xFF;
    n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, big, 200, 0);
    mcd_ws_parser_init(&p, MAX_MSG);
    mcd_ws_event_t ev;
    uint8_t copy[256];
    memcpy(copy, buf, n);
    size_t used = mcd_ws_parse(&p, copy, 8 + 20, &ev); /* header + 20 payload bytes */
    assert_true(used <= 28);
    assert_int_equal(ev.type, MCD_WS_EV_ERROR);
    assert_int_equal(ev.code, 1007);
    mcd_ws_parser_cleanup(&p);
    /* binary messages are not UTF-8 checked */
    n = frame(buf, 1, 0, MCD_WS_OP_BINARY, true, bad1, 3, 0);
    mcd_ws_parser_init(&p, MAX_MSG);
    feed(&p, buf, n, 0, &c);
    assert_int_equal(c.messages, 1);
    mcd_ws_parser_cleanup(&p);

    assert_true(mcd_ws_utf8_valid((const uint8_t *)"caf\xc3\xa9", 5));
    assert_false(mcd_ws_utf8_valid((const uint8_t *)"caf\xc3", 4));
    assert_false(mcd_ws_utf8_valid((const uint8_t *)"\xe0\x80\xaf", 3)); /* overlong */
}

static void test_close_frames(void **state)
{
    (void)state;
    uint8_t buf[256], pl[200];
    /* one-byte payload */
    size_t n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, "\x03", 1, 0);
    expect_fail(buf, n, 1002);
    /* invalid codes */
    unsigned bad[] = {0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        pl[0] = (uint8_t)(bad[i] >> 8);
        pl[1] = (uint8_t)bad[i];
        n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, pl, 2, 0);
        expect_fail(buf, n, 1002);
    }
    /* valid codes come back as CLOSE with the code and reason */
    unsigned good[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009,
                       1010, 1011, 3000, 3999, 4000, 4999};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        pl[0] = (uint8_t)(good[i] >> 8);
        pl[1] = (uint8_t)good[i];
        memcpy(pl + 2, "bye", 3);
        n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, pl, 5, 0);
        mcd_ws_parser_t p;
        mcd_ws_parser_init(&p, MAX_MSG);
        collected_t c;
        assert_int_equal(feed(&p, buf, n, 0, &c), MCD_WS_EV_CLOSE);
        assert_int_equal(c.codes[c.n - 1], good[i]);
        assert_int_equal(c.ctl_len, 3);
        assert_memory_equal(c.ctl, "bye", 3);
        mcd_ws_parser_cleanup(&p);
    }
    /* empty close: "no status" */
    n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, "", 0, 0);
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, MAX_MSG);
    collected_t c;
    assert_int_equal(feed(&p, buf, n, 0, &c), MCD_WS_EV_CLOSE);
    assert_int_equal(c.codes[c.n - 1], 1005);
    mcd_ws_parser_cleanup(&p);
    /* invalid UTF-8 reason */
    pl[0] = 0x03;
    pl[1] = 0xE8;
    pl[2] = 0xFF;
    n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, pl, 3, 0);
    expect_fail(buf, n, 1007);
    /* 124-byte reason: a 126-byte close frame is a control frame over 125 */
    memset(pl + 2, 'r', 124);
    n = frame(buf, 1, 0, MCD_WS_OP_CLOSE, true, pl, 126, 0);
    expect_fail(buf, n, 1002);
}

static void test_length_encoding_rules(void **state)
{
    (void)state;
    uint8_t buf[300], pl[200];
    memset(pl, 'a', sizeof(pl));
    /* 16-bit form for 5 bytes, 64-bit form for 1000 bytes: non-minimal */
    size_t n = frame(buf, 1, 0, MCD_WS_OP_TEXT, true, pl, 5, 1);
    expect_fail(buf, n, 1002);
    /* 64-bit form for 1000 bytes */
    uint8_t h[14] = {0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0x03, 0xE8, 1, 2, 3, 4};
    expect_fail(h, 14, 1002);
    /* most significant bit set */
    uint8_t h2[14] = {0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4};
    expect_fail(h2, 14, 1002);
}

static void test_too_big_1009_from_header(void **state)
{
    (void)state;
    /* A frame announcing 2^40 bytes: refused after its 14 header bytes, nothing allocated. */
    uint8_t h[14] = {0x82, 0x80 | 127, 0, 0, 0x01, 0, 0, 0, 0, 0, 9, 9, 9, 9};
    mcd_ws_parser_t p;
    mcd_ws_parser_init(&p, MAX_MSG);
    mcd_ws_event_t ev;
    size_t used = mcd_ws_parse(&p, h, sizeof(h), &ev);
    assert_int_equal(used, 14);
    assert_int_equal(ev.type, MCD_WS_EV_ERROR);
    assert_int_equal(ev.code, 1009);
    assert_null(p.ctl);
    mcd_ws_parser_cleanup(&p);
    /* just over the limit in the 16-bit form */
    mcd_ws_parser_init(&p, 1024);
    uint8_t h16[8] = {0x81, 0x80 | 126, 0x04, 0x01, 1, 2, 3, 4};
    used = mcd_ws_parse(&p, h16, sizeof(h16), &ev);
    assert_int_equal(ev.type, MCD_WS_EV_ERROR);
    assert_int_equal(ev.code, 1009);
    mcd_ws_parser_cleanup(&p);
    /* fragments adding up past the limit */
    static uint8_t buf[4000], pl[700];
    memset(pl, 'z', sizeof(pl));
    size_t n = frame(buf, 0, 0, MCD_WS_OP_TEXT, true, pl, 600, 0);
    n += frame(buf + n, 0, 0, MCD_WS_OP_CONT, true, pl, 600, 0);
    mcd_ws_parser_init(&p, 1024);
    collected_t c;
    assert_int_equal(feed(&p, buf, n, 0, &c), MCD_WS_EV_ERROR);
    assert_int_equal(c.codes[c.n - 1], 1009);
    /* only the first fragment's bytes were handed out */
    assert_int_equal(c.text_len, 600);
    mcd_ws_parser_cleanup(&p);
}

static void test_encoder(void **state)
{
    (void)state;
    uint8_t h[10];
    assert_int_equal(mcd_ws_frame_header(h, MCD_WS_OP_TEXT, 5), 2);
    assert_int_equal(h[0], 0x81);
    assert_int_equal(h[1], 5);
    assert_int_equal(mcd_ws_frame_header(h, MCD_WS_OP_TEXT, 126), 4);
    assert_int_equal(h[1], 126);
    assert_int_equal((h[2] << 8) | h[3], 126);
    assert_int_equal(mcd_ws_frame_header(h, MCD_WS_OP_BINARY, 65536), 10);
    assert_int_equal(h[0], 0x82);
    assert_int_equal(h[1], 127);
    assert_int_equal(h[7], 1);
    uint8_t cf[MCD_WS_MAX_CONTROL + 2];
    size_t n = mcd_ws_close_frame(cf, 4002, "slow");
    assert_int_equal(n, 8);
    assert_int_equal(cf[0], 0x88);
    assert_int_equal(cf[1], 6);
    assert_int_equal((cf[2] << 8) | cf[3], 4002);
    /* long reasons are cut to 123 bytes without splitting a character */
    char reason[200];
    memset(reason, 'a', 122);
    strcpy(reason + 122, "\xc3\xa9\xc3\xa9");
    n = mcd_ws_close_frame(cf, 1000, reason);
    assert_true(n <= MCD_WS_MAX_CONTROL + 2);
    assert_true(mcd_ws_utf8_valid(cf + 4, n - 4));
    assert_int_equal(n - 4, 122);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_key),
        cmocka_unit_test(test_masked_text),
        cmocka_unit_test(test_lengths_16_and_64_bit),
        cmocka_unit_test(test_unmasked_fails_1002),
        cmocka_unit_test(test_rsv_bits_fail_1002),
        cmocka_unit_test(test_reserved_opcodes_fail_1002),
        cmocka_unit_test(test_control_frame_rules_1002),
        cmocka_unit_test(test_control_split_across_reads),
        cmocka_unit_test(test_fragmentation_with_interleaved_ping),
        cmocka_unit_test(test_continuation_rules_1002),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_close_frames),
        cmocka_unit_test(test_length_encoding_rules),
        cmocka_unit_test(test_too_big_1009_from_header),
        cmocka_unit_test(test_encoder),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
