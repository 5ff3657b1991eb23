/*
 * test_wire.c: unit tests for mongo-emulator's wire parser and reply framing (wire.c):
 * OP_QUERY and OP_MSG parsing (kind-1 sequences merged under their identifier, checksum,
 * moreToCome, $query unwrapping) and the server code of every malformed-input error.
 * Single-threaded cmocka tests over hand-built byte buffers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "wire.h"

typedef struct msgbuf {
    uint8_t data[4096];
    size_t len;
} msgbuf_t;

static void put(msgbuf_t *m, const void *p, size_t n)
{
    assert_true(m->len + n <= sizeof(m->data));
    memcpy(m->data + m->len, p, n);
    m->len += n;
}

static void put_i32(msgbuf_t *m, int32_t v)
{
    uint8_t b[4] = {(uint8_t)(v & 0xff), (uint8_t)((v >> 8) & 0xff), (uint8_t)((v >> 16) & 0xff),
                    (uint8_t)(((uint32_t)v >> 24) & 0xff)};
    put(m, b, 4);
}

static void set_i32(msgbuf_t *m, size_t at, int32_t v)
{
    m->data[at] = (uint8_t)(v & 0xff);
    m->data[at + 1] = (uint8_t)((v >> 8) & 0xff);
    m->data[at + 2] = (uint8_t)((v >> 16) & 0xff);
    m->data[at + 3] = (uint8_t)(((uint32_t)v >> 24) & 0xff);
}

static void begin(msgbuf_t *m, int32_t opcode, int32_t request_id)
{
    m->len = 0;
    put_i32(m, 0); /* length, patched by finish() */
    put_i32(m, request_id);
    put_i32(m, 0);
    put_i32(m, opcode);
}

static void finish(msgbuf_t *m)
{
    set_i32(m, 0, (int32_t)m->len);
}

static void put_doc(msgbuf_t *m, const bson_t *doc)
{
    put(m, bson_get_data(doc), doc->len);
}

static void put_sequence(msgbuf_t *m, const char *id, const bson_t *const *docs, size_t n)
{
    size_t start = m->len;
    uint8_t kind = 1;
    put(m, &kind, 1);
    put_i32(m, 0);
    put(m, id, strlen(id) + 1);
    for (size_t i = 0; i < n; i++) {
        put_doc(m, docs[i]);
    }
    set_i32(m, start + 1, (int32_t)(m->len - start - 1));
}

static void build_msg(msgbuf_t *m, uint32_t flags, const bson_t *body)
{
    uint8_t kind = 0;
    begin(m, EMU_OPCODE_MSG, 42);
    put_i32(m, (int32_t)flags);
    put(m, &kind, 1);
    put_doc(m, body);
}

static void expect_error(const msgbuf_t *m, int code)
{
    emu_wire_request_t req;
    mc_error_t err;
    mc_error_clear(&err);
    assert_int_equal(emu_wire_parse(m->data, m->len, &req, &err), MC_EINVAL);
    assert_int_equal(err.domain, MC_DOMAIN_MONGODB);
    assert_int_equal(err.cause, code);
    emu_wire_request_cleanup(&req);
}

static void test_op_query_handshake(void **state)
{
    msgbuf_t m;
    bson_t *q = BCON_NEW("isMaster", BCON_INT32(1), "helloOk", BCON_BOOL(true));
    emu_wire_request_t req;
    mc_error_t err;
    bson_iter_t it;
    (void)state;

    begin(&m, EMU_OPCODE_QUERY, 7);
    put_i32(&m, 4);
    put(&m, "admin.$cmd", 11);
    put_i32(&m, 0);
    put_i32(&m, -1);
    put_doc(&m, q);
    finish(&m);
    assert_int_equal(emu_wire_parse(m.data, m.len, &req, &err), 0);
    assert_int_equal(req.header.request_id, 7);
    assert_int_equal(req.header.opcode, EMU_OPCODE_QUERY);
    assert_int_equal(req.flags, 4);
    assert_string_equal(req.db, "admin");
    assert_true(req.is_command);
    assert_false(req.body_owned);
    assert_true(bson_iter_init(&it, &req.body) && bson_iter_next(&it));
    assert_string_equal(bson_iter_key(&it), "isMaster");
    assert_true(bson_equal(&req.body, q));
    emu_wire_request_cleanup(&req);
    bson_destroy(q);
}

static void test_op_query_unwraps_query_and_flags_non_command(void **state)
{
    msgbuf_t m;
    bson_t *q = BCON_NEW("$query", "{", "ismaster", BCON_INT32(1), "}", "$readPreference", "{",
                         "mode", "primary", "}");
    emu_wire_request_t req;
    mc_error_t err;
    bson_iter_t it;
    (void)state;

    begin(&m, EMU_OPCODE_QUERY, 8);
    put_i32(&m, 0);
    put(&m, "db.coll", 8);
    put_i32(&m, 0);
    put_i32(&m, -1);
    put_doc(&m, q);
    finish(&m);
    assert_int_equal(emu_wire_parse(m.data, m.len, &req, &err), 0);
    assert_string_equal(req.db, "db");
    assert_false(req.is_command);
    assert_true(bson_iter_init(&it, &req.body) && bson_iter_next(&it));
    assert_string_equal(bson_iter_key(&it), "ismaster");
    assert_int_equal(bson_count_keys(&req.body), 1);
    emu_wire_request_cleanup(&req);
    bson_destroy(q);
}

static void test_op_msg_body_only(void **state)
{
    msgbuf_t m;
    bson_t *b = BCON_NEW("ping", BCON_INT32(1), "$db", "admin");
    emu_wire_request_t req;
    mc_error_t err;
    (void)state;

    build_msg(&m, 0, b);
    finish(&m);
    assert_int_equal(emu_wire_parse(m.data, m.len, &req, &err), 0);
    assert_string_equal(req.db, "admin");
    assert_false(req.more_to_come);
    assert_false(req.body_owned);
    assert_true(bson_equal(&req.body, b));
    emu_wire_request_cleanup(&req);
    bson_destroy(b);
}

static void test_op_msg_sequences_are_merged(void **state)
{
    msgbuf_t m;
    bson_t *b = BCON_NEW("insert", "coll", "ordered", BCON_BOOL(true), "$db", "db");
    bson_t *d0 = BCON_NEW("_id", BCON_INT32(1), "x", BCON_INT32(1));
    bson_t *d1 = BCON_NEW("_id", BCON_INT32(2), "a", "[", BCON_INT32(1), "]");
    bson_t *u0 = BCON_NEW("q", "{", "}", "u", "{", "}");
    const bson_t *docs[] = {d0, d1};
    const bson_t *upd[] = {u0};
    emu_wire_request_t req;
    mc_error_t err;
    bson_iter_t it, arr;
    (void)state;

    build_msg(&m, EMU_MSG_CHECKSUM_PRESENT | EMU_MSG_MORE_TO_COME, b);
    put_sequence(&m, "documents", docs, 2);
    put_sequence(&m, "extra", upd, 1);
    put_i32(&m, 0x12345678); /* the checksum, which the parser skips */
    finish(&m);
    assert_int_equal(emu_wire_parse(m.data, m.len, &req, &err), 0);
    assert_true(req.more_to_come);
    assert_true(req.body_owned);
    assert_string_equal(req.db, "db");
    assert_true(bson_iter_init_find(&it, &req.body, "documents"));
    assert_true(BSON_ITER_HOLDS_ARRAY(&it));
    assert_true(bson_iter_recurse(&it, &arr));
    assert_true(bson_iter_next(&arr));
    assert_string_equal(bson_iter_key(&arr), "0");
    {
        const uint8_t *d;
        uint32_t l;
        bson_t got;
        bson_iter_document(&arr, &l, &d);
        assert_true(bson_init_static(&got, d, l));
        assert_true(bson_equal(&got, d0));
    }
    assert_true(bson_iter_next(&arr));
    assert_string_equal(bson_iter_key(&arr), "1");
    assert_false(bson_iter_next(&arr));
    assert_true(bson_iter_init_find(&it, &req.body, "extra"));
    assert_true(bson_iter_init_find(&it, &req.body, "insert"));
    assert_int_equal(bson_count_keys(&req.body), 5);
    emu_wire_request_cleanup(&req);
    emu_wire_request_cleanup(&req); /* idempotent */
    bson_destroy(b);
    bson_destroy(d0);
    bson_destroy(d1);
    bson_destroy(u0);
}

static void test_framing_errors(void **state)
{
    msgbuf_t m;
    bson_t *b = BCON_NEW("ping", BCON_INT32(1), "$db", "admin");
    emu_wire_header_t h;
    mc_error_t err;
    (void)state;

    /* length field disagrees with the buffer */
    build_msg(&m, 0, b);
    finish(&m);
    set_i32(&m, 0, (int32_t)m.len + 1);
    expect_error(&m, 17);
    /* header claims more than maxMessageSizeBytes, or less than a header */
    set_i32(&m, 0, 100 * 1024 * 1024);
    assert_int_equal(emu_wire_parse_header(m.data, m.len, &h, &err), MC_EINVAL);
    assert_int_equal(err.cause, 17);
    set_i32(&m, 0, 5);
    assert_int_equal(emu_wire_parse_header(m.data, m.len, &h, &err), MC_EINVAL);
    assert_int_equal(emu_wire_parse_header(m.data, 10, &h, &err), MC_EINVAL);
    /* an opcode the emulator does not speak */
    build_msg(&m, 0, b);
    finish(&m);
    set_i32(&m, 12, EMU_OPCODE_COMPRESSED);
    expect_error(&m, 352);
    bson_destroy(b);
}

static void test_op_msg_errors(void **state)
{
    msgbuf_t m;
    bson_t *b = BCON_NEW("ping", BCON_INT32(1), "$db", "admin");
    bson_t *nodb = BCON_NEW("ping", BCON_INT32(1));
    bson_t *intdb = BCON_NEW("ping", BCON_INT32(1), "$db", BCON_INT32(3));
    bson_t *ins = BCON_NEW("insert", "c", "documents", "[", "]", "$db", "db");
    bson_t *d0 = BCON_NEW("_id", BCON_INT32(1));
    const bson_t *docs[] = {d0};
    (void)state;

    build_msg(&m, 0, nodb);
    finish(&m);
    expect_error(&m, 40571);
    build_msg(&m, 0, intdb);
    finish(&m);
    expect_error(&m, 14);
    /* reserved "required" flag bit */
    build_msg(&m, 1u << 3, b);
    finish(&m);
    expect_error(&m, 223);
    /* truncated body: a document that claims more bytes than remain */
    build_msg(&m, 0, b);
    m.len -= 3;
    finish(&m);
    expect_error(&m, 22);
    /* two bodies */
    build_msg(&m, 0, b);
    {
        uint8_t kind = 0;
        put(&m, &kind, 1);
        put_doc(&m, b);
    }
    finish(&m);
    expect_error(&m, 40430);
    /* unknown section kind */
    build_msg(&m, 0, b);
    {
        uint8_t kind = 7;
        put(&m, &kind, 1);
    }
    finish(&m);
    expect_error(&m, 40432);
    /* a sequence whose size runs past the message */
    build_msg(&m, 0, b);
    put_sequence(&m, "documents", docs, 1);
    set_i32(&m, m.len - d0->len - strlen("documents") - 1 - 4, 1000);
    finish(&m);
    expect_error(&m, 17);
    /* a sequence that duplicates a body field */
    build_msg(&m, 0, ins);
    put_sequence(&m, "documents", docs, 1);
    finish(&m);
    expect_error(&m, 40);
    /* checksum flag without room for the checksum */
    begin(&m, EMU_OPCODE_MSG, 1);
    put_i32(&m, EMU_MSG_CHECKSUM_PRESENT);
    finish(&m);
    expect_error(&m, 17);
    /* no body at all */
    begin(&m, EMU_OPCODE_MSG, 1);
    put_i32(&m, 0);
    finish(&m);
    expect_error(&m, 40587);
    bson_destroy(b);
    bson_destroy(nodb);
    bson_destroy(intdb);
    bson_destroy(ins);
    bson_destroy(d0);
}

static void test_corrupt_and_deep_bson(void **state)
{
    msgbuf_t m;
    bson_t *b = BCON_NEW("ping", BCON_INT32(1), "x", "{", "s", "abcd", "}", "$db", "admin");
    bson_t deep;
    bson_t *levels[EMU_WIRE_MAX_DEPTH + 2];
    (void)state;

    /* corrupt the nested string's length: the outer frame stays intact */
    build_msg(&m, 0, b);
    finish(&m);
    {
        /* header 16 + flags 4 + kind 1 + doc len 4 + "ping" element (1+5+4) + "x" (1+2) +
         * inner doc len 4 + string type and key (1+2) = the string length field */
        size_t at = 16 + 4 + 1 + 4 + 10 + 3 + 4 + 3;
        set_i32(&m, at, 200);
    }
    expect_error(&m, 22);

    /* nesting deeper than EMU_WIRE_MAX_DEPTH is refused */
    levels[0] = bson_new();
    for (int i = 1; i < EMU_WIRE_MAX_DEPTH + 2; i++) {
        levels[i] = bson_new();
        BSON_APPEND_DOCUMENT(levels[i], "a", levels[i - 1]);
    }
    bson_init(&deep);
    BSON_APPEND_INT32(&deep, "ping", 1);
    BSON_APPEND_DOCUMENT(&deep, "x", levels[EMU_WIRE_MAX_DEPTH + 1]);
    BSON_APPEND_UTF8(&deep, "$db", "admin");
    assert_false(emu_wire_bson_valid(&deep, EMU_WIRE_MAX_DEPTH));
    assert_true(emu_wire_bson_valid(levels[10], EMU_WIRE_MAX_DEPTH));
    if (deep.len + 32 <= sizeof(m.data)) {
        build_msg(&m, 0, &deep);
        finish(&m);
        expect_error(&m, 22);
    }
    for (int i = 0; i < EMU_WIRE_MAX_DEPTH + 2; i++) {
        bson_destroy(levels[i]);
    }
    bson_destroy(&deep);
    bson_destroy(b);
}

static void test_oversized_document(void **state)
{
    size_t big = EMU_WIRE_MAX_DOCUMENT + 64;
    size_t total = 16 + 4 + 1 + big;
    uint8_t *buf = calloc(1, total);
    bson_t doc;
    emu_wire_request_t req;
    mc_error_t err;
    (void)state;

    /* {"$db": "admin", "b": <binary filling the rest>} built by hand */
    assert_non_null(buf);
    {
        uint8_t *p = buf + 21;
        size_t blen = big - 28;
        p[0] = (uint8_t)(big & 0xff);
        p[1] = (uint8_t)((big >> 8) & 0xff);
        p[2] = (uint8_t)((big >> 16) & 0xff);
        p[3] = (uint8_t)((big >> 24) & 0xff);
        memcpy(p + 4, "\x02$db\0\x06\0\0\0admin\0", 15);
        p[19] = 0x05;
        memcpy(p + 20, "b\0", 2);
        p[22] = (uint8_t)(blen & 0xff);
        p[23] = (uint8_t)((blen >> 8) & 0xff);
        p[24] = (uint8_t)((blen >> 16) & 0xff);
        p[25] = (uint8_t)((blen >> 24) & 0xff);
        p[26] = 0;
        assert_true(27 + blen + 1 == big);
        assert_true(bson_init_static(&doc, p, big));
    }
    buf[0] = (uint8_t)(total & 0xff);
    buf[1] = (uint8_t)((total >> 8) & 0xff);
    buf[2] = (uint8_t)((total >> 16) & 0xff);
    buf[3] = (uint8_t)((total >> 24) & 0xff);
    buf[12] = (uint8_t)(EMU_OPCODE_MSG & 0xff);
    buf[13] = (uint8_t)(EMU_OPCODE_MSG >> 8);
    assert_int_equal(emu_wire_parse(buf, total, &req, &err), MC_EINVAL);
    assert_int_equal(err.cause, 10334);
    free(buf);
}

static int32_t get_i32(const uint8_t *p)
{
    return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                     ((uint32_t)p[3] << 24));
}

static void test_reply_prefix(void **state)
{
    uint8_t p[EMU_WIRE_REPLY_PREFIX_MAX];
    size_t n;
    (void)state;

    n = emu_wire_reply_prefix(p, EMU_OPCODE_MSG, 5, 42, 100);
    assert_int_equal(n, 21);
    assert_int_equal(get_i32(p), 121);
    assert_int_equal(get_i32(p + 4), 5);
    assert_int_equal(get_i32(p + 8), 42);
    assert_int_equal(get_i32(p + 12), EMU_OPCODE_MSG);
    assert_int_equal(get_i32(p + 16), 0);
    assert_int_equal(p[20], 0);

    n = emu_wire_reply_prefix(p, EMU_OPCODE_REPLY, 6, 43, 100);
    assert_int_equal(n, 36);
    assert_int_equal(get_i32(p), 136);
    assert_int_equal(get_i32(p + 8), 43);
    assert_int_equal(get_i32(p + 12), EMU_OPCODE_REPLY);
    assert_int_equal(get_i32(p + 16), 8);
    assert_int_equal(get_i32(p + 20), 0);
    assert_int_equal(get_i32(p + 24), 0);
    assert_int_equal(get_i32(p + 28), 0);
    assert_int_equal(get_i32(p + 32), 1);

    assert_int_equal(emu_wire_reply_prefix(p, EMU_OPCODE_MSG, 1, 1, EMU_WIRE_MAX_MESSAGE), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_query_handshake),
        cmocka_unit_test(test_op_query_unwraps_query_and_flags_non_command),
        cmocka_unit_test(test_op_msg_body_only),
        cmocka_unit_test(test_op_msg_sequences_are_merged),
        cmocka_unit_test(test_framing_errors),
        cmocka_unit_test(test_op_msg_errors),
        cmocka_unit_test(test_corrupt_and_deep_bson),
        cmocka_unit_test(test_oversized_document),
        cmocka_unit_test(test_reply_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
