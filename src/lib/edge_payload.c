/*
 * edge_payload.c: the nats sink's `format: bson` body and its decoder for edge streams
 * (edge_payload.h has the format). Pure; any thread.
 */
#include "edge_payload.h"

#include <string.h>

#include "engine_private.h"

static int bad(mc_error_t *err, const char *what)
{
    return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL, "edge payload: %s", what);
}

int mc__edge_payload_encode(const mc_event_t *ev, bson_t *out, mc_error_t *err)
{
    bson_init(out);
    mc_event_kind_t kind = mc_event_kind(ev);
    const bson_t *change = mc_event_change(ev);
    if ((kind != MC_EVENT_CHANGE && kind != MC_EVENT_INVALIDATE) || !change) {
        return bad(err, "only change and invalidate events are carried");
    }
    bool ok = BSON_APPEND_INT32(out, "v", MC__EDGE_PAYLOAD_VERSION) &&
              BSON_APPEND_UTF8(out, "kind", kind == MC_EVENT_CHANGE ? "change" : "invalidate");
    if (ok && kind == MC_EVENT_INVALIDATE && mc_event_reason(ev)) {
        ok = BSON_APPEND_UTF8(out, "reason", mc_event_reason(ev));
    }
    size_t oversize = mc_event_server_oversize(ev);
    if (ok && oversize) {
        ok = BSON_APPEND_INT64(out, "oversize", (int64_t)oversize);
    }
    if (ok) {
        ok = BSON_APPEND_DOCUMENT(out, "change", change);
    }
    if (!ok) {
        return bad(err, "the event is too large for one BSON document");
    }
    return 0;
}

int mc__edge_payload_decode(const uint8_t *data, size_t len, const char *stream, uint64_t seq,
                            const char *recipient_path, mc_event_t **out, mc_error_t *err)
{
    *out = NULL;
    bson_t body;
    if (!data || !bson_init_static(&body, data, len)) {
        return bad(err, "not a BSON document (is the leader's nats sink set to format: bson?)");
    }
    bson_error_t verr;
    if (!bson_validate_with_error(&body, BSON_VALIDATE_UTF8, &verr)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "edge payload: malformed BSON document: %s", verr.message);
    }
    int32_t version = 0;
    const char *kind = NULL, *reason = NULL;
    int64_t oversize = 0;
    bson_t change;
    bool have_change = false;
    bson_iter_t it;
    if (!bson_iter_init(&it, &body)) {
        return bad(err, "malformed BSON document");
    }
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (!strcmp(k, "v") && BSON_ITER_HOLDS_INT32(&it)) {
            version = bson_iter_int32(&it);
        } else if (!strcmp(k, "kind") && BSON_ITER_HOLDS_UTF8(&it)) {
            kind = bson_iter_utf8(&it, NULL);
        } else if (!strcmp(k, "reason") && BSON_ITER_HOLDS_UTF8(&it)) {
            reason = bson_iter_utf8(&it, NULL);
        } else if (!strcmp(k, "oversize") && BSON_ITER_HOLDS_INT64(&it)) {
            oversize = bson_iter_int64(&it);
        } else if (!strcmp(k, "change") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
            uint32_t dlen = 0;
            const uint8_t *d = NULL;
            bson_iter_document(&it, &dlen, &d);
            have_change = bson_init_static(&change, d, dlen);
        }
    }
    if (version != MC__EDGE_PAYLOAD_VERSION) {
        return bad(err, "unknown version (v must be 1)");
    }
    if (!kind || (strcmp(kind, "change") != 0 && strcmp(kind, "invalidate") != 0)) {
        return bad(err, "kind must be change or invalidate");
    }
    if (!have_change) {
        return bad(err, "no change document");
    }
    /* On its own too: it is stored and sent on as it is (libbson's check of a nested
     * document within its parent can pass bytes that are not a document by themselves). */
    if (!bson_validate_with_error(&change, BSON_VALIDATE_UTF8, &verr)) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "edge payload: malformed change document: %s", verr.message);
    }
    if (oversize < 0) {
        return bad(err, "oversize must not be negative");
    }
    mc_error_t eerr = {0};
    mc_event_t *ev = strcmp(kind, "change") == 0
                         ? mc_event_new_change(stream, seq, &change, recipient_path, &eerr)
                         : mc_event_new_invalidate(stream, seq, &change, reason, &eerr);
    if (!ev) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "edge payload: unusable change: %s", eerr.message);
    }
    if (oversize > 0) {
        mc__event_set_server_oversize(ev, (size_t)oversize);
    }
    *out = ev;
    return 0;
}
