/*
 * wire.c: parses OP_QUERY and OP_MSG requests and frames OP_REPLY / OP_MSG replies.
 *
 * Pure functions over caller-owned buffers; called by each connection thread (server.c) and
 * by the fuzz target. Invariants: no read ever goes past `len`; a request that parses has a
 * body that is valid BSON at every nesting level (at most EMU_WIRE_MAX_DEPTH deep) and, for
 * OP_MSG, a string $db no longer than EMU_WIRE_MAX_DB - 1 bytes.
 */
#include "wire.h"

#include <string.h>

static int32_t read_i32(const uint8_t *p)
{
    uint32_t v =
        (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    return (int32_t)v;
}

static void write_i32(uint8_t *p, int32_t v)
{
    uint32_t u = (uint32_t)v;
    p[0] = (uint8_t)(u & 0xff);
    p[1] = (uint8_t)((u >> 8) & 0xff);
    p[2] = (uint8_t)((u >> 16) & 0xff);
    p[3] = (uint8_t)((u >> 24) & 0xff);
}

static int fail(mc_error_t *err, int server_code, const char *msg)
{
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, server_code, "%s", msg);
}

/* Recursion is bounded by max_depth, so the stack use is too. */
static bool valid_level(const bson_t *doc, int depth, int max_depth)
{
    bson_iter_t it;

    if (depth > max_depth || !bson_iter_init(&it, doc)) {
        return false;
    }
    while (bson_iter_next(&it)) {
        bson_type_t t = bson_iter_type(&it);
        const uint8_t *data = NULL;
        uint32_t dlen = 0;
        bson_t child;

        if (t == BSON_TYPE_DOCUMENT) {
            bson_iter_document(&it, &dlen, &data);
        } else if (t == BSON_TYPE_ARRAY) {
            bson_iter_array(&it, &dlen, &data);
        } else if (t == BSON_TYPE_CODEWSCOPE) {
            uint32_t clen = 0;
            bson_iter_codewscope(&it, &clen, &dlen, &data);
        } else {
            continue;
        }
        if (!data || !bson_init_static(&child, data, dlen) ||
            !valid_level(&child, depth + 1, max_depth)) {
            return false;
        }
    }
    /* bson_iter_next stops early and records err_off on a corrupt element. */
    return it.err_off == 0;
}

bool emu_wire_bson_valid(const bson_t *doc, int max_depth)
{
    return doc && valid_level(doc, 1, max_depth);
}

int emu_wire_parse_header(const uint8_t *buf, size_t len, emu_wire_header_t *hdr, mc_error_t *err)
{
    if (len < EMU_WIRE_HEADER_LEN) {
        return fail(err, 17, "message shorter than its header");
    }
    hdr->length = read_i32(buf);
    hdr->request_id = read_i32(buf + 4);
    hdr->response_to = read_i32(buf + 8);
    hdr->opcode = read_i32(buf + 12);
    if (hdr->length < EMU_WIRE_HEADER_LEN || hdr->length > EMU_WIRE_MAX_MESSAGE) {
        return fail(err, 17, "message length out of range");
    }
    return 0;
}

/* A BSON document starting at p with at most `avail` bytes; fills `doc` as a view. Returns 0,
 * 22 (InvalidBSON) or 10334 (BSONObjectTooLarge: a real server refuses any document above
 * its internal limit while parsing the message, before any command runs). */
static int view_doc(const uint8_t *p, size_t avail, bson_t *doc, size_t *used)
{
    int32_t dlen;

    if (avail < 5) {
        return 22;
    }
    dlen = read_i32(p);
    if (dlen < 5 || (size_t)dlen > avail || !bson_init_static(doc, p, (size_t)dlen)) {
        return 22;
    }
    if (dlen > EMU_WIRE_MAX_DOCUMENT) {
        return 10334;
    }
    *used = (size_t)dlen;
    return emu_wire_bson_valid(doc, EMU_WIRE_MAX_DEPTH) ? 0 : 22;
}

static int doc_error(mc_error_t *err, int code, const char *what)
{
    if (code == 10334) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 10334,
                            "%s is larger than the maximum BSON object size", what);
    }
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGODB, 22, "%s is not valid BSON", what);
}

/* A C string inside [p, p+avail): its length, or -1 when it is not terminated there. */
static long cstring_len(const uint8_t *p, size_t avail)
{
    const uint8_t *nul = memchr(p, 0, avail);
    return nul ? (long)(nul - p) : -1;
}

static int parse_query(const uint8_t *p, size_t avail, emu_wire_request_t *req, mc_error_t *err)
{
    long nslen;
    const char *ns;
    const char *dot;
    size_t used;
    bson_t view;
    int rc;

    if (avail < 4) {
        return fail(err, 17, "OP_QUERY truncated");
    }
    req->flags = (uint32_t)read_i32(p);
    p += 4;
    avail -= 4;
    nslen = cstring_len(p, avail);
    if (nslen < 0) {
        return fail(err, 17, "OP_QUERY namespace is not terminated");
    }
    ns = (const char *)p;
    dot = memchr(ns, '.', (size_t)nslen);
    if (!dot || dot == ns || (size_t)(dot - ns) >= sizeof(req->db)) {
        return fail(err, 73, "OP_QUERY namespace is invalid");
    }
    memcpy(req->db, ns, (size_t)(dot - ns));
    req->db[dot - ns] = '\0';
    req->is_command = strcmp(dot + 1, "$cmd") == 0;
    p += nslen + 1;
    avail -= (size_t)nslen + 1;
    if (avail < 8) {
        return fail(err, 17, "OP_QUERY truncated");
    }
    p += 8; /* numberToSkip, numberToReturn: meaningless for commands */
    avail -= 8;
    rc = view_doc(p, avail, &view, &used);
    if (rc) {
        return doc_error(err, rc, "OP_QUERY query");
    }
    /* An optional field selector may follow; commands ignore it, but it must still be framed
     * correctly when present. */
    if (avail > used) {
        bson_t sel;
        size_t sel_used;
        if (view_doc(p + used, avail - used, &sel, &sel_used) || sel_used != avail - used) {
            return fail(err, 22, "OP_QUERY field selector is not valid BSON");
        }
    }
    /* Legacy drivers wrap the command as {$query: {...}, $readPreference: ...}. */
    {
        bson_iter_t it;
        if (bson_iter_init(&it, &view) && bson_iter_next(&it) &&
            strcmp(bson_iter_key(&it), "$query") == 0 && BSON_ITER_HOLDS_DOCUMENT(&it)) {
            const uint8_t *d;
            uint32_t dl;
            bson_iter_document(&it, &dl, &d);
            if (!bson_init_static(&view, d, dl)) {
                return fail(err, 22, "OP_QUERY $query is not valid BSON");
            }
        }
    }
    /* bson_t views point into themselves, so the final one is initialised in place */
    if (!bson_init_static(&req->body, bson_get_data(&view), view.len)) {
        return fail(err, 22, "OP_QUERY query is not valid BSON");
    }
    req->body_owned = false;
    return 0;
}

typedef struct sequence {
    const char *id;
    const uint8_t *docs;
    size_t docs_len;
} sequence_t;

#define MAX_SEQUENCES 8

static int merge_sequences(const bson_t *body, const sequence_t *seqs, size_t n,
                           emu_wire_request_t *req, mc_error_t *err)
{
    bson_init(&req->body);
    req->body_owned = true;
    if (!bson_concat(&req->body, body)) {
        goto too_big;
    }
    for (size_t i = 0; i < n; i++) {
        bson_t arr;
        const uint8_t *p = seqs[i].docs;
        size_t left = seqs[i].docs_len;
        uint32_t idx = 0;

        if (bson_has_field(body, seqs[i].id)) {
            emu_wire_request_cleanup(req);
            return fail(err, 40, "document sequence duplicates a field of the command body");
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(seqs[j].id, seqs[i].id) == 0) {
                emu_wire_request_cleanup(req);
                return fail(err, 40, "duplicate document sequence identifier");
            }
        }
        if (!bson_append_array_begin(&req->body, seqs[i].id, -1, &arr)) {
            goto too_big;
        }
        while (left > 0) {
            bson_t doc;
            size_t used;
            char keybuf[16];
            const char *key;
            size_t klen = bson_uint32_to_string(idx++, &key, keybuf, sizeof(keybuf));

            int rc = view_doc(p, left, &doc, &used);
            if (rc) {
                emu_wire_request_cleanup(req);
                return doc_error(err, rc, "a document of a document sequence");
            }
            if (!bson_append_document(&arr, key, (int)klen, &doc)) {
                goto too_big;
            }
            p += used;
            left -= used;
        }
        if (!bson_append_array_end(&req->body, &arr)) {
            goto too_big;
        }
    }
    return 0;

too_big:
    emu_wire_request_cleanup(req);
    return fail(err, 10334, "command with document sequences is too large");
}

static int parse_msg(const uint8_t *p, size_t avail, emu_wire_request_t *req, mc_error_t *err)
{
    sequence_t seqs[MAX_SEQUENCES];
    size_t n_seqs = 0;
    bson_t body;
    bool have_body = false;
    bson_iter_t it;

    if (avail < 4) {
        return fail(err, 17, "OP_MSG truncated");
    }
    req->flags = (uint32_t)read_i32(p);
    req->more_to_come = (req->flags & EMU_MSG_MORE_TO_COME) != 0;
    p += 4;
    avail -= 4;
    /* Bits 0-15 are "required": a server must refuse ones it does not know. */
    if (req->flags & 0xfffcu) {
        return fail(err, 223, "OP_MSG flags has reserved bits set");
    }
    if (req->flags & EMU_MSG_CHECKSUM_PRESENT) {
        if (avail < 4) {
            return fail(err, 17, "OP_MSG checksum missing");
        }
        avail -= 4; /* not verified: only libmongoc and pymongo talk to us, over loopback */
    }
    while (avail > 0) {
        uint8_t kind = *p++;
        avail--;
        if (kind == 0) {
            size_t used;
            int rc;
            if (have_body) {
                return fail(err, 40430, "OP_MSG has more than one body section");
            }
            rc = view_doc(p, avail, &body, &used);
            if (rc) {
                return doc_error(err, rc, "OP_MSG body");
            }
            have_body = true;
            p += used;
            avail -= used;
        } else if (kind == 1) {
            int32_t size;
            long idlen;
            if (avail < 4) {
                return fail(err, 17, "OP_MSG document sequence truncated");
            }
            size = read_i32(p);
            if (size < 5 || (size_t)size > avail) {
                return fail(err, 17, "OP_MSG document sequence size out of range");
            }
            idlen = cstring_len(p + 4, (size_t)size - 4);
            if (idlen <= 0) {
                return fail(err, 17, "OP_MSG document sequence identifier is invalid");
            }
            if (n_seqs == MAX_SEQUENCES) {
                return fail(err, 233, "too many document sequences in OP_MSG");
            }
            seqs[n_seqs].id = (const char *)(p + 4);
            seqs[n_seqs].docs = p + 4 + idlen + 1;
            seqs[n_seqs].docs_len = (size_t)size - 4 - (size_t)idlen - 1;
            n_seqs++;
            p += size;
            avail -= (size_t)size;
        } else {
            return fail(err, 40432, "unknown OP_MSG section kind");
        }
    }
    if (!have_body) {
        return fail(err, 40587, "OP_MSG has no body section");
    }
    if (!bson_iter_init_find(&it, &body, "$db")) {
        return fail(err, 40571, "OP_MSG requests require a $db argument");
    }
    if (!BSON_ITER_HOLDS_UTF8(&it)) {
        return fail(err, 14, "$db is not a string");
    }
    {
        uint32_t dblen;
        const char *db = bson_iter_utf8(&it, &dblen);
        if (dblen == 0 || dblen >= sizeof(req->db) || memchr(db, 0, dblen)) {
            return fail(err, 73, "invalid database name in $db");
        }
        memcpy(req->db, db, dblen);
        req->db[dblen] = '\0';
    }
    if (n_seqs == 0) {
        req->body_owned = false;
        if (!bson_init_static(&req->body, bson_get_data(&body), body.len)) {
            return fail(err, 22, "OP_MSG body is not valid BSON");
        }
        return 0;
    }
    return merge_sequences(&body, seqs, n_seqs, req, err);
}

int emu_wire_parse(const uint8_t *buf, size_t len, emu_wire_request_t *req, mc_error_t *err)
{
    int rc;

    memset(req, 0, sizeof(*req));
    rc = emu_wire_parse_header(buf, len, &req->header, err);
    if (rc) {
        return rc;
    }
    if ((size_t)req->header.length != len) {
        return fail(err, 17, "message length does not match its header");
    }
    switch (req->header.opcode) {
    case EMU_OPCODE_QUERY:
        rc = parse_query(buf + EMU_WIRE_HEADER_LEN, len - EMU_WIRE_HEADER_LEN, req, err);
        break;
    case EMU_OPCODE_MSG:
        rc = parse_msg(buf + EMU_WIRE_HEADER_LEN, len - EMU_WIRE_HEADER_LEN, req, err);
        break;
    default: return fail(err, 352, "unsupported opcode");
    }
    if (rc) {
        /* keep header and flags for the caller's error reply, nothing else */
        req->body_owned = false;
    }
    return rc;
}

void emu_wire_request_cleanup(emu_wire_request_t *req)
{
    if (req && req->body_owned) {
        bson_destroy(&req->body);
        req->body_owned = false;
    }
}

size_t emu_wire_reply_prefix(uint8_t *out, int32_t reply_opcode, int32_t request_id,
                             int32_t response_to, size_t doc_len)
{
    size_t prefix =
        reply_opcode == EMU_OPCODE_MSG ? EMU_WIRE_HEADER_LEN + 5 : EMU_WIRE_HEADER_LEN + 20;
    if (doc_len > EMU_WIRE_MAX_MESSAGE - prefix) {
        return 0;
    }
    write_i32(out, (int32_t)(prefix + doc_len));
    write_i32(out + 4, request_id);
    write_i32(out + 8, response_to);
    write_i32(out + 12, reply_opcode);
    if (reply_opcode == EMU_OPCODE_MSG) {
        write_i32(out + 16, 0);
        out[20] = 0;
    } else {
        write_i32(out + 16, 8); /* AwaitCapable, as mongod sets it */
        memset(out + 20, 0, 8); /* cursorID */
        write_i32(out + 28, 0); /* startingFrom */
        write_i32(out + 32, 1); /* numberReturned */
    }
    return prefix;
}
