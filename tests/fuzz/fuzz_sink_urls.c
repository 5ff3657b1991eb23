/*
 * fuzz_sink_urls.c: libFuzzer target for the text the broker sinks read from configs or from
 * the wire: the `redis://` URL parser (src/lib/sinks/redis_url.c), the NATS server-list check
 * (src/lib/sinks/nats_client.c) and the resume-token position reader
 * (src/lib/sinks/redis_stream_id.c).
 *
 * Single-threaded (libFuzzer). Checks beyond "no crash, no leak, no hang":
 *   - a refused URL reports MC_ECONFIG with a message made of fixed words only (so no part
 *     of the input, a password least of all, can reach a log through it);
 *   - an accepted URL has a non-empty host, a port in 1..65535, a db >= 0, NUL-terminated
 *     fields, and its redacted form does not depend on the password;
 *   - the NATS check refuses with MC_ECONFIG and a "nats url (server N): " message, or
 *     accepts only text with a nats:// or tls:// scheme;
 *   - the token reader either refuses or yields a version 1 or 2 and a token type 0 or 128,
 *     and the ID derived from it formats and parses back to itself.
 */
#define _GNU_SOURCE /* memmem */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sinks/nats_client.h"
#include "sinks/redis_client.h"
#include "sinks/redis_stream_id.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096) {
        return 0;
    }
    const char *s = (const char *)data;
    mc__redis_url_t u;
    mc_error_t err;
    mc_error_clear(&err);
    int rc = mc__redis_url_parse(s, size, &u, &err);
    if (rc != 0) {
        if (rc != MC_ECONFIG || err.code != MC_ECONFIG ||
            strncmp(err.message, "redis url: ", 11) != 0) {
            abort();
        }
        for (const char *m = err.message; *m; m++) {
            if ((unsigned char)*m < 0x20 || (unsigned char)*m > 0x7E) {
                abort(); /* every message is fixed ASCII text */
            }
        }
    } else {
        if (!u.host[0] || u.port < 1 || u.port > 65535 || u.db < 0 ||
            !memchr(u.host, 0, sizeof u.host) || !memchr(u.user, 0, sizeof u.user) ||
            !memchr(u.password, 0, sizeof u.password)) {
            abort();
        }
        /* The redacted form does not depend on the password at all. */
        char red[2048], red2[2048];
        mc__redis_url_redact(&u, red, sizeof red);
        mc__redis_url_t u2 = u;
        snprintf(u2.password, sizeof u2.password, "%s", u.password[0] == 'x' ? "y" : "x");
        mc__redis_url_redact(&u2, red2, sizeof red2);
        if (strcmp(red, red2) != 0) {
            abort();
        }
    }

    mc_error_clear(&err);
    rc = mc__nats_url_check(s, size, &err);
    if (rc != 0) {
        if (rc != MC_ECONFIG || strncmp(err.message, "nats url (server ", 17) != 0) {
            abort();
        }
    } else if (!memmem(s, size, "nats://", 7) && !memmem(s, size, "tls://", 6)) {
        abort();
    }

    mc__token_position_t pos;
    if (mc__token_position_parse(s, size, &pos, NULL) == 0) {
        if ((pos.version != 1 && pos.version != 2) ||
            (pos.token_type != 0 && pos.token_type != 128)) {
            abort();
        }
        mc__redis_stream_id_t id, back;
        uint32_t fragment = size ? data[0] : 0;
        if (mc__redis_stream_id_make(&pos, fragment, &id, NULL) == 0) {
            char buf[MC__REDIS_ID_BUF];
            size_t n = mc__redis_stream_id_format(&id, buf);
            if (mc__redis_stream_id_parse(buf, n, &back) != 0 ||
                mc__redis_stream_id_compare(&id, &back) != 0) {
                abort();
            }
        }
    }
    return 0;
}
