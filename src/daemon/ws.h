/*
 * ws.h: RFC 6455 for a push-only server: an incremental parser of client frames, the encoder
 * of server frames and the opening handshake's accept key.
 *
 * The parser is pure (no I/O, no clock, no allocation except a 125-byte buffer for a control
 * frame that arrives split across reads) so that it can be fuzzed and unit-tested alone. It
 * enforces every server-side must-fail rule of RFC 6455 and reports the close code to send:
 *   1002 unmasked frame, RSV bits, reserved opcode, fragmented or > 125-byte control frame,
 *        non-minimal or 63-bit length, continuation without a message, a new data frame in
 *        the middle of a fragmented message, close payload of 1 byte or invalid close code
 *   1007 invalid UTF-8 in a text message (also across fragments, detected at the first bad
 *        byte) or in a close reason
 *   1009 a frame or a reassembled message longer than the configured maximum (detected from
 *        the header, before any payload byte is read)
 * Data messages are validated and then dropped by the server; their bytes are still handed
 * out as MCD_WS_EV_DATA so that tests can check reassembly.
 *
 * Thread: whichever thread owns the parser (the server's loop thread). No global state.
 */
#ifndef MONGOCAST_DAEMON_WS_H
#define MONGOCAST_DAEMON_WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MCD_WS_OP_CONT 0x0
#define MCD_WS_OP_TEXT 0x1
#define MCD_WS_OP_BINARY 0x2
#define MCD_WS_OP_CLOSE 0x8
#define MCD_WS_OP_PING 0x9
#define MCD_WS_OP_PONG 0xA

#define MCD_WS_CLOSE_NORMAL 1000
#define MCD_WS_CLOSE_GOING_AWAY 1001
#define MCD_WS_CLOSE_PROTOCOL 1002
#define MCD_WS_CLOSE_NO_STATUS 1005 /* never sent: "the close frame had no code" */
#define MCD_WS_CLOSE_INVALID_DATA 1007
#define MCD_WS_CLOSE_POLICY 1008
#define MCD_WS_CLOSE_TOO_BIG 1009
#define MCD_WS_CLOSE_INTERNAL 1011
#define MCD_WS_CLOSE_RESTART 1012
#define MCD_WS_CLOSE_SLOW 4002
#define MCD_WS_CLOSE_FILTER 4003        /* the subscriber's filter ran out of CPU budget */
#define MCD_WS_CLOSE_STREAM_FAILED 4010 /* after an error message: the stream failed */

#define MCD_WS_MAX_CONTROL 125
#define MCD_WS_MAX_HEADER 14 /* 2 + 8 (64-bit length) + 4 (mask) */

typedef enum mcd_ws_event_type {
    MCD_WS_EV_NONE = 0, /* all input consumed, nothing complete */
    MCD_WS_EV_DATA,     /* a chunk of a text/binary message (unmasked in place) */
    MCD_WS_EV_PING,     /* a complete ping; payload to echo in a pong */
    MCD_WS_EV_PONG,     /* a complete pong */
    MCD_WS_EV_CLOSE,    /* a valid close frame: code (1005 when none) and reason */
    MCD_WS_EV_ERROR,    /* protocol violation: close with `code`; the parser stays failed */
} mcd_ws_event_type_t;

typedef struct mcd_ws_event {
    mcd_ws_event_type_t type;
    uint8_t opcode;      /* DATA: MCD_WS_OP_TEXT or MCD_WS_OP_BINARY (of the message) */
    bool message_end;    /* DATA: this chunk ends the message */
    const uint8_t *data; /* DATA chunk, PING/PONG payload, CLOSE reason (borrowed) */
    size_t len;
    uint16_t code;      /* CLOSE: received code; ERROR: code to close with */
    const char *reason; /* ERROR: static description */
} mcd_ws_event_t;

/* Parser state of one connection (64 bytes). Zero-initialise with mcd_ws_parser_init. */
typedef struct mcd_ws_parser {
    uint32_t remaining; /* payload bytes of the current frame not yet read (<= max_msg) */
    uint32_t msg_len;   /* bytes of the current data message so far (all fragments) */
    uint32_t max_msg;   /* largest frame or message accepted (1009 beyond) */
    uint8_t *ctl;       /* control payload being collected (malloc'd, 125 bytes) or NULL */
    uint8_t hdr[MCD_WS_MAX_HEADER]; /* header bytes collected so far */
    uint8_t hdr_len;
    uint8_t mask[4];
    uint8_t mask_pos;   /* index into mask of the next payload byte */
    uint8_t opcode;     /* current frame's opcode */
    uint8_t fin;        /* current frame's FIN bit */
    uint8_t in_payload; /* header complete, reading payload */
    uint8_t msg_opcode; /* TEXT/BINARY while a (fragmented) message is open, else 0 */
    uint8_t ctl_len;
    uint8_t failed;    /* an ERROR was reported; every later call reports it again */
    uint8_t utf8_need; /* continuation bytes still expected */
    uint8_t utf8_lo;   /* range of the next continuation byte (overlongs, surrogates) */
    uint8_t utf8_hi;
    uint16_t fail_code;
    const char *fail_reason;
} mcd_ws_parser_t;

/* Initialises `p` for a new connection; `max_msg` is server.max_frame_bytes. */
void mcd_ws_parser_init(mcd_ws_parser_t *p, uint32_t max_msg);

/* Frees the control buffer if any (the struct itself belongs to the caller). */
void mcd_ws_parser_cleanup(mcd_ws_parser_t *p);

/*
 * Consumes bytes from `data` (at most `len`) and stops after the first event. Returns the
 * number of bytes consumed and fills *ev. Call again with the rest of the input until it
 * returns an event of type MCD_WS_EV_NONE (then every byte was consumed). Payload bytes are
 * unmasked in place, which is why `data` is not const. Event pointers borrow either `data` or
 * the parser and are valid until the next call.
 */
size_t mcd_ws_parse(mcd_ws_parser_t *p, uint8_t *data, size_t len, mcd_ws_event_t *ev);

/* True for close codes a peer may send: 1000-1003, 1007-1014, 3000-4999. */
bool mcd_ws_close_code_valid(unsigned code);

/* True when `s` is complete, valid UTF-8 (no overlongs, surrogates or code points > U+10FFFF). */
bool mcd_ws_utf8_valid(const uint8_t *s, size_t len);

/* Writes the header of an unmasked, final server frame into `out` (10 bytes room) and returns
 * its length (2, 4 or 10). */
size_t mcd_ws_frame_header(uint8_t out[10], uint8_t opcode, uint64_t payload_len);

/* Writes a complete close frame (code and reason, the reason cut to 123 bytes at a UTF-8
 * boundary) into `out` (MCD_WS_MAX_CONTROL + 2 bytes room); returns its length. */
size_t mcd_ws_close_frame(uint8_t out[MCD_WS_MAX_CONTROL + 2], uint16_t code, const char *reason);

/* Computes Sec-WebSocket-Accept for a Sec-WebSocket-Key. Returns 0 and writes 28 characters
 * plus NUL into `out`, or -1 when the key is not the base64 encoding of 16 bytes. */
int mcd_ws_accept_key(const char *key, size_t key_len, char out[29]);

#endif
