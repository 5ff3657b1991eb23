/*
 * fuzz_routing.c: libFuzzer target for write-time routing and the recipient lookup's ledger,
 * which read change events (server data, shaped by user documents):
 *   - every top-level value's identity (mongocast/identity.h) renders as JSON that parses back
 *     to the same identity (decimal128 and double edges included);
 *   - mc_event_new_change() with a recipient path: the views of a few identities are
 *     consistent (ENTERED only for the recipient and without fullDocumentBeforeChange, LEFT
 *     only with a previous recipient) and every view renders;
 *   - mc__lookup_apply() with resolutions and trims in between keeps the cache bounded and
 *     never crashes on malformed updateDescriptions, keys or times.
 * Input: byte 0 picks the lookup field (_id or code) and cache size; the rest is a sequence
 * of BSON documents (each its own length-prefixed bytes). Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mongocast.h"
#include "recipient_lookup.h"

static void check_identity(const bson_iter_t *it)
{
    mc_identity_t id, back;
    if (!mc_identity_from_iter(it, &id)) {
        return;
    }
    if (id.bytes[0] == 'b' && id.bytes[1] == BSON_SUBTYPE_BINARY_DEPRECATED) {
        return; /* the old binary subtype nests a length that JSON does not spell */
    }
    static char json[MC_IDENTITY_JSON_MAX];
    size_t n = mc_identity_json(id.bytes, id.len, json);
    if (n == 0 || n != strlen(json)) {
        abort();
    }
    char *doc = bson_strdup_printf("{\"v\": %s}", json);
    bson_t *b = bson_new_from_json((const uint8_t *)doc, -1, NULL);
    bson_iter_t v;
    if (!b || !bson_iter_init_find(&v, b, "v") || !mc_identity_from_iter(&v, &back) ||
        !mc_identity_equal(id.bytes, id.len, back.bytes, back.len)) {
        abort(); /* the JSON spelling of an identity names the same identity */
    }
    bson_destroy(b);
    bson_free(doc);
}

static mc_identity_t ident(const char *s)
{
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = (char *)s;
    v.value.v_utf8.len = (uint32_t)strlen(s);
    mc_identity_t id;
    mc_identity_from_value(&v, &id);
    return id;
}

static void check_event(const bson_t *change)
{
    mc_event_t *ev = mc_event_new_change("s", 1, change, "fullDocument.owner", NULL);
    if (!ev) {
        return;
    }
    static const char *const who[] = {"u1", "u2", "7"};
    size_t rlen = 0;
    const uint8_t *rid = mc_event_recipient_identity(ev, &rlen);
    for (size_t i = 0; i < 3; i++) {
        mc_identity_t id = ident(who[i]);
        mc_event_view_t v = mc_event_view_for(ev, id.bytes, id.len);
        bool is_recipient = mc_identity_equal(rid, rlen, id.bytes, id.len);
        if ((v == MC_EVENT_VIEW_FULL || v == MC_EVENT_VIEW_ENTERED) && !is_recipient) {
            abort();
        }
        if (v == MC_EVENT_VIEW_ENTERED) {
            const bson_t *c = mc_event_change_view(ev, v);
            if (!c || bson_has_field(c, "fullDocumentBeforeChange")) {
                abort();
            }
        }
        if (v == MC_EVENT_VIEW_LEFT && is_recipient) {
            abort();
        }
    }
    for (int v = MC_EVENT_VIEW_FULL; v <= MC_EVENT_VIEW_LEFT; v++) {
        mc_event_json_view(ev, (mc_event_view_t)v, NULL);
    }
    mc_event_unref(&ev);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 65536) {
        return 0;
    }
    mc_recipient_lookup_t cfg = {.db = (char *)"d",
                                 .collection = (char *)"c",
                                 .field = (char *)((data[0] & 1) ? "code" : "_id"),
                                 .recipient = (char *)"owner",
                                 .cache_size = (data[0] >> 1) & 7};
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    if (!l) {
        abort();
    }
    mc__lookup_start(l, 0);
    uint64_t t = 0;
    size_t off = 1;
    while (off + 5 <= size) {
        uint32_t len;
        memcpy(&len, data + off, 4);
        len = BSON_UINT32_FROM_LE(len);
        if (len < 5 || len > size - off) {
            break;
        }
        bson_t doc;
        if (bson_init_static(&doc, data + off, len)) {
            bson_iter_t it;
            if (bson_iter_init(&it, &doc)) {
                while (bson_iter_next(&it)) {
                    check_identity(&it);
                }
            }
            check_event(&doc);
            mc__lookup_apply(l, &doc);
            if (mc__lookup_cache_len(l) > cfg.cache_size) {
                abort();
            }
            /* Resolve the document's own key at what is covered, then move on. */
            uint64_t covered = mc__lookup_covered(l);
            if (covered >= t) {
                t = covered;
                bson_iter_t k;
                mc_identity_t key, out;
                if (bson_iter_init(&it, &doc) && bson_iter_find_descendant(&it, "documentKey._id",
                                                                            &k) &&
                    mc_identity_from_iter(&k, &key)) {
                    mc__lookup_resolve_cached(l, &key, t, &out);
                }
                if (len & 1) {
                    mc__lookup_trim(l, t);
                } else {
                    mc__lookup_cover(l, covered + (len & 0xff));
                }
            }
        }
        off += len;
    }
    mc__recipient_lookup_destroy(l);
    return 0;
}
