/*
 * ws.c: RFC 6455 frame parser (client to server), frame encoder (server to client) and
 * handshake accept key. See ws.h for the rules enforced.
 *
 * Thread: the caller's (the server's loop thread); pure functions, no global state.
 * Invariants: a frame is rejected from its header alone whenever the header decides it, so
 * a frame announcing 2^62 bytes costs nothing; data payload is never buffered (it is
 * validated byte by byte and handed back in place); only a control frame split across
 * reads is copied, into at most 125 bytes.
 */
#include "ws.h"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

void mcd_ws_parser_init(mcd_ws_parser_t *p, uint32_t max_msg)
{
    memset(p, 0, sizeof(*p));
    p->max_msg = max_msg;
}

void mcd_ws_parser_cleanup(mcd_ws_parser_t *p)
{
    free(p->ctl);
    p->ctl = NULL;
}

bool mcd_ws_close_code_valid(unsigned code)
{
    if (code >= 1000 && code <= 1003) {
        return true;
    }
    if (code >= 1007 && code <= 1014) {
        return true;
    }
    return code >= 3000 && code <= 4999;
}

/* One step of the UTF-8 automaton. The second byte's range depends on the lead byte: that is
 * where overlong forms (E0, F0), surrogates (ED) and code points past U+10FFFF (F4) are
 * refused. Returns false on an invalid byte. */
static bool utf8_step(uint8_t *need, uint8_t *lo, uint8_t *hi, uint8_t b)
{
    if (*need == 0) {
        if (b < 0x80) {
            return true;
        }
        *lo = 0x80;
        *hi = 0xBF;
        if (b >= 0xC2 && b <= 0xDF) {
            *need = 1;
        } else if (b == 0xE0) {
            *need = 2;
            *lo = 0xA0;
        } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
            *need = 2;
        } else if (b == 0xED) {
            *need = 2;
            *hi = 0x9F;
        } else if (b == 0xF0) {
            *need = 3;
            *lo = 0x90;
        } else if (b >= 0xF1 && b <= 0xF3) {
            *need = 3;
        } else if (b == 0xF4) {
            *need = 3;
            *hi = 0x8F;
        } else {
            return false;
        }
        return true;
    }
    if (b < *lo || b > *hi) {
        return false;
    }
    (*need)--;
    *lo = 0x80;
    *hi = 0xBF;
    return true;
}

static bool utf8_feed(uint8_t *need, uint8_t *lo, uint8_t *hi, const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (*need == 0) {
            /* Text is mostly ASCII: skip it without the automaton. */
            while (i < n && s[i] < 0x80) {
                i++;
            }
            if (i == n) {
                break;
            }
        }
        if (!utf8_step(need, lo, hi, s[i])) {
            return false;
        }
        i++;
    }
    return true;
}

bool mcd_ws_utf8_valid(const uint8_t *s, size_t len)
{
    uint8_t need = 0, lo = 0x80, hi = 0xBF;
    return utf8_feed(&need, &lo, &hi, s, len) && need == 0;
}

static size_t fail(mcd_ws_parser_t *p, size_t consumed, mcd_ws_event_t *ev, uint16_t code,
                   const char *reason)
{
    p->failed = 1;
    p->fail_code = code;
    p->fail_reason = reason;
    ev->type = MCD_WS_EV_ERROR;
    ev->code = code;
    ev->reason = reason;
    return consumed;
}

static bool is_control(uint8_t op)
{
    return (op & 0x8) != 0;
}

/* Bytes of header needed once the first two are known. */
static size_t header_size(const uint8_t *hdr)
{
    size_t n = 2;
    uint8_t len7 = hdr[1] & 0x7F;
    if (len7 == 126) {
        n += 2;
    } else if (len7 == 127) {
        n += 8;
    }
    if (hdr[1] & 0x80) {
        n += 4;
    }
    return n;
}

/* Checks what the first two bytes decide. Returns 0 or the close code (with *why). */
static uint16_t check_first_bytes(const mcd_ws_parser_t *p, const uint8_t *hdr, const char **why)
{
    uint8_t op = hdr[0] & 0x0F;
    bool fin = (hdr[0] & 0x80) != 0;
    if (hdr[0] & 0x70) {
        *why = "reserved bits set without an extension";
        return MCD_WS_CLOSE_PROTOCOL;
    }
    if ((op >= 0x3 && op <= 0x7) || op >= 0xB) {
        *why = "reserved opcode";
        return MCD_WS_CLOSE_PROTOCOL;
    }
    if (!(hdr[1] & 0x80)) {
        *why = "client frame not masked";
        return MCD_WS_CLOSE_PROTOCOL;
    }
    if (is_control(op)) {
        if (!fin) {
            *why = "fragmented control frame";
            return MCD_WS_CLOSE_PROTOCOL;
        }
        if ((hdr[1] & 0x7F) > MCD_WS_MAX_CONTROL) {
            *why = "control frame payload over 125 bytes";
            return MCD_WS_CLOSE_PROTOCOL;
        }
        return 0;
    }
    if (op == MCD_WS_OP_CONT && !p->msg_opcode) {
        *why = "continuation frame without a message to continue";
        return MCD_WS_CLOSE_PROTOCOL;
    }
    if (op != MCD_WS_OP_CONT && p->msg_opcode) {
        *why = "new data frame inside a fragmented message";
        return MCD_WS_CLOSE_PROTOCOL;
    }
    return 0;
}

/* Header complete: decode the length and mask and check the limits. */
static uint16_t finish_header(mcd_ws_parser_t *p, const char **why)
{
    const uint8_t *h = p->hdr;
    uint8_t len7 = h[1] & 0x7F;
    uint64_t len = len7;
    size_t at = 2;
    if (len7 == 126) {
        len = ((uint64_t)h[2] << 8) | h[3];
        at = 4;
        if (len < 126) {
            *why = "non-minimal length encoding";
            return MCD_WS_CLOSE_PROTOCOL;
        }
    } else if (len7 == 127) {
        len = 0;
        for (int i = 0; i < 8; i++) {
            len = (len << 8) | h[2 + i];
        }
        at = 10;
        if (len >> 63) {
            *why = "64-bit length with the most significant bit set";
            return MCD_WS_CLOSE_PROTOCOL;
        }
        if (len <= 0xFFFF) {
            *why = "non-minimal length encoding";
            return MCD_WS_CLOSE_PROTOCOL;
        }
    }
    memcpy(p->mask, h + at, 4);
    p->mask_pos = 0;
    p->opcode = h[0] & 0x0F;
    p->fin = (h[0] & 0x80) != 0;
    if (!is_control(p->opcode)) {
        /* Both limits before a single payload byte: one huge frame or endless fragments. */
        if (len > p->max_msg || (uint64_t)p->msg_len + len > p->max_msg) {
            *why = "message larger than the server accepts";
            return MCD_WS_CLOSE_TOO_BIG;
        }
        if (p->opcode != MCD_WS_OP_CONT) {
            p->msg_opcode = p->opcode;
            p->msg_len = 0;
            p->utf8_need = 0;
        }
        p->msg_len += (uint32_t)len;
    } else {
        p->ctl_len = 0;
    }
    /* len <= max_msg (data) or <= 125 (control): it fits. */
    p->remaining = (uint32_t)len;
    p->in_payload = 1;
    p->hdr_len = 0;
    return 0;
}

static void unmask(mcd_ws_parser_t *p, uint8_t *data, size_t n)
{
    uint8_t pos = p->mask_pos;
    for (size_t i = 0; i < n; i++) {
        data[i] ^= p->mask[pos];
        pos = (pos + 1) & 3;
    }
    p->mask_pos = pos;
}

/* A complete control frame with payload `pl`/`n`: fill the event (or fail). */
static size_t control_done(mcd_ws_parser_t *p, size_t consumed, const uint8_t *pl, size_t n,
                           mcd_ws_event_t *ev)
{
    p->in_payload = 0;
    ev->data = pl;
    ev->len = n;
    if (p->opcode == MCD_WS_OP_PING) {
        ev->type = MCD_WS_EV_PING;
        return consumed;
    }
    if (p->opcode == MCD_WS_OP_PONG) {
        ev->type = MCD_WS_EV_PONG;
        return consumed;
    }
    /* close */
    if (n == 1) {
        return fail(p, consumed, ev, MCD_WS_CLOSE_PROTOCOL, "close payload of one byte");
    }
    uint16_t code = MCD_WS_CLOSE_NO_STATUS;
    if (n >= 2) {
        code = (uint16_t)((pl[0] << 8) | pl[1]);
        if (!mcd_ws_close_code_valid(code)) {
            return fail(p, consumed, ev, MCD_WS_CLOSE_PROTOCOL, "invalid close code");
        }
        if (!mcd_ws_utf8_valid(pl + 2, n - 2)) {
            return fail(p, consumed, ev, MCD_WS_CLOSE_INVALID_DATA,
                        "close reason is not valid UTF-8");
        }
        ev->data = pl + 2;
        ev->len = n - 2;
    }
    ev->type = MCD_WS_EV_CLOSE;
    ev->code = code;
    return consumed;
}

size_t mcd_ws_parse(mcd_ws_parser_t *p, uint8_t *data, size_t len, mcd_ws_event_t *ev)
{
    memset(ev, 0, sizeof(*ev));
    if (p->failed) {
        ev->type = MCD_WS_EV_ERROR;
        ev->code = p->fail_code;
        ev->reason = p->fail_reason;
        return len;
    }
    size_t used = 0;
    while (!p->in_payload) {
        if (used == len) {
            return used; /* EV_NONE: need more header bytes */
        }
        p->hdr[p->hdr_len++] = data[used++];
        if (p->hdr_len == 2) {
            const char *why = NULL;
            uint16_t code = check_first_bytes(p, p->hdr, &why);
            if (code) {
                return fail(p, used, ev, code, why);
            }
        }
        if (p->hdr_len >= 2 && p->hdr_len == header_size(p->hdr)) {
            const char *why = NULL;
            uint16_t code = finish_header(p, &why);
            if (code) {
                return fail(p, used, ev, code, why);
            }
        }
    }

    if (is_control(p->opcode)) {
        size_t n = len - used;
        if (n > p->remaining) {
            n = (size_t)p->remaining;
        }
        if (p->ctl_len == 0 && n == p->remaining) {
            /* Whole payload in this read: hand it out in place. */
            unmask(p, data + used, n);
            p->remaining = 0;
            return control_done(p, used + n, data + used, n, ev);
        }
        if (n > 0) {
            if (!p->ctl) {
                p->ctl = malloc(MCD_WS_MAX_CONTROL);
                if (!p->ctl) {
                    return fail(p, len, ev, MCD_WS_CLOSE_INTERNAL, "out of memory");
                }
            }
            unmask(p, data + used, n);
            memcpy(p->ctl + p->ctl_len, data + used, n);
            p->ctl_len = (uint8_t)(p->ctl_len + n);
            p->remaining -= n;
            used += n;
        }
        if (p->remaining > 0) {
            return used;
        }
        return control_done(p, used, p->ctl, p->ctl_len, ev);
    }

    /* Data frame payload (possibly empty). */
    size_t n = len - used;
    if (n > p->remaining) {
        n = (size_t)p->remaining;
    }
    uint8_t *chunk = data + used;
    unmask(p, chunk, n);
    if (p->msg_opcode == MCD_WS_OP_TEXT &&
        !utf8_feed(&p->utf8_need, &p->utf8_lo, &p->utf8_hi, chunk, n)) {
        return fail(p, used + n, ev, MCD_WS_CLOSE_INVALID_DATA, "invalid UTF-8 in text message");
    }
    p->remaining -= n;
    used += n;
    bool frame_done = p->remaining == 0;
    bool msg_end = frame_done && p->fin;
    if (msg_end && p->msg_opcode == MCD_WS_OP_TEXT && p->utf8_need) {
        return fail(p, used, ev, MCD_WS_CLOSE_INVALID_DATA, "text message ends inside a character");
    }
    if (n == 0 && !frame_done) {
        return used; /* nothing new */
    }
    ev->type = MCD_WS_EV_DATA;
    ev->opcode = p->msg_opcode;
    ev->data = chunk;
    ev->len = n;
    ev->message_end = msg_end;
    if (frame_done) {
        p->in_payload = 0;
        if (msg_end) {
            p->msg_opcode = 0;
            p->msg_len = 0;
        }
    }
    return used;
}

size_t mcd_ws_frame_header(uint8_t out[10], uint8_t opcode, uint64_t payload_len)
{
    out[0] = (uint8_t)(0x80 | (opcode & 0x0F));
    if (payload_len < 126) {
        out[1] = (uint8_t)payload_len;
        return 2;
    }
    if (payload_len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (uint8_t)(payload_len >> 8);
        out[3] = (uint8_t)payload_len;
        return 4;
    }
    out[1] = 127;
    for (int i = 0; i < 8; i++) {
        out[2 + i] = (uint8_t)(payload_len >> (56 - 8 * i));
    }
    return 10;
}

size_t mcd_ws_close_frame(uint8_t out[MCD_WS_MAX_CONTROL + 2], uint16_t code, const char *reason)
{
    size_t rlen = reason ? strlen(reason) : 0;
    if (rlen > MCD_WS_MAX_CONTROL - 2) {
        rlen = MCD_WS_MAX_CONTROL - 2;
        /* Never cut a character in half: back up over continuation bytes. */
        while (rlen > 0 && ((uint8_t)reason[rlen] & 0xC0) == 0x80) {
            rlen--;
        }
    }
    out[0] = 0x80 | MCD_WS_OP_CLOSE;
    out[1] = (uint8_t)(2 + rlen);
    out[2] = (uint8_t)(code >> 8);
    out[3] = (uint8_t)code;
    if (rlen) {
        memcpy(out + 4, reason, rlen);
    }
    return 4 + rlen;
}

static bool is_b64(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/';
}

int mcd_ws_accept_key(const char *key, size_t key_len, char out[29])
{
    /* 16 bytes encode to 22 significant characters and "==" padding. */
    if (key_len != 24 || key[22] != '=' || key[23] != '=') {
        return -1;
    }
    for (size_t i = 0; i < 22; i++) {
        if (!is_b64(key[i])) {
            return -1;
        }
    }
    unsigned char cat[24 + sizeof(WS_GUID) - 1];
    memcpy(cat, key, 24);
    memcpy(cat + 24, WS_GUID, sizeof(WS_GUID) - 1);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1(cat, sizeof(cat), digest);
    int n = EVP_EncodeBlock((unsigned char *)out, digest, SHA_DIGEST_LENGTH);
    if (n != 28) {
        return -1;
    }
    out[28] = '\0';
    return 0;
}
