/*
 * event_json.c: renders an event as the subscriber message of docs/protocol.md (and its
 * ENTERED and LEFT views, mongocast/event.h) and as raw canonical Extended JSON.
 *
 * Runs on whichever thread first asks for the text (usually the dispatch thread); the result
 * is cached in the event by event.c. The message is written straight into one buffer by the
 * one-pass writer (json_writer.c), sized from the change's BSON length: no intermediate
 * message document. Every message is compact JSON (no whitespace outside strings): the bytes
 * are libbson 1.23's relaxed Extended JSON of the message document {type, stream, id,
 * [recipient], [entered], [summary], change} with the spaces outside strings removed, except
 * that the change leaves out its `_id` when that is exactly {_data: id} (the resume token is
 * carried once, as "id"; the raw form keeps the whole change). Where
 * libbson would refuse the message (invalid UTF-8 in the change or the recipient), the
 * message still goes out with "change": null and an "error" field rather than being lost
 * silently; only a stream name or id that cannot be rendered yields NULL. The `oversize`
 * notice that stands in for a message too big to send (mc_event_oversize_json, per routing
 * view mc_event_oversize_json_view, and for a subscriber's own reshaped change
 * mc_event_oversize_json_view_with_change) is rendered here too, per call, compact as well.
 */
#include <stdio.h>

#include "engine_private.h"
#include "json_writer.h"
#include "summary.h"

static void put_field_string(mc__json_buf_t *b, const char *s)
{
    mc__json_write_string(b, s, strlen(s));
}

/* `,"recipient":R` on streams with a recipient path (R: the identity's JSON, or null). */
static void put_recipient(mc__json_buf_t *b, const mc_event_t *ev)
{
    if (!mc__event_recipient_configured(ev)) {
        return;
    }
    size_t len = 0;
    const char *recipient = mc__event_recipient_json(ev, &len);
    MC__JSON_LIT(b, ",\"recipient\":");
    if (recipient) {
        /* Already JSON: the identity's canonical spelling (identity.c). */
        mc__json_buf_append(b, recipient, len);
    } else {
        MC__JSON_LIT(b, "null");
    }
}

static char *render_server_oversize(const mc_event_t *ev, mc_event_view_t view, size_t *len);

/* The fallback when the change cannot be rendered: the message without a recipient. */
static char *render_change_error(const mc_event_t *ev, size_t *len)
{
    mc__json_buf_t b;
    mc__json_buf_init(&b, 256, 0);
    MC__JSON_LIT(&b, "{\"type\":\"change\",\"stream\":");
    put_field_string(&b, mc_event_stream(ev));
    MC__JSON_LIT(&b, ",\"id\":");
    put_field_string(&b, mc_event_id(ev));
    MC__JSON_LIT(&b, ",\"change\":null,\"error\":"
                     "\"change event could not be rendered as JSON\"}");
    return mc__json_buf_steal(&b, len);
}

/* The offset (bson_iter_t.off) of the change's first top-level `_id` when it is exactly
 * {_data: <id>}, the resume token the message already carries as "id"; 0 otherwise (then the
 * change keeps its _id: a token with more fields, or none, is sent as it is). */
static uint32_t token_element(const bson_t *change, const char *id, size_t id_len)
{
    bson_iter_t it, tok;
    if (!bson_iter_init_find(&it, change, "_id") || !BSON_ITER_HOLDS_DOCUMENT(&it) ||
        !bson_iter_recurse(&it, &tok) || !bson_iter_next(&tok) ||
        strcmp(bson_iter_key(&tok), "_data") != 0 || !BSON_ITER_HOLDS_UTF8(&tok)) {
        return 0;
    }
    uint32_t len = 0;
    const char *data = bson_iter_utf8(&tok, &len);
    if (len != id_len || memcmp(data, id, id_len) != 0 || bson_iter_next(&tok)) {
        return 0;
    }
    return it.off;
}

/* The change message of `view` (FULL, or ENTERED with "entered") carrying `change`: the
 * view's own change document, or a subscriber's copy of it (mc_event_json_view_with_change). */
static char *render_change_message(const mc_event_t *ev, mc_event_view_t view, const bson_t *change,
                                   size_t *len)
{
    bool entered = view == MC_EVENT_VIEW_ENTERED;
    size_t summary_len = 0;
    const char *summary = mc__event_summary(ev, view, &summary_len);
    const char *stream = mc_event_stream(ev);
    const char *id = mc_event_id(ev);
    size_t recipient_len = 0;
    mc__event_recipient_json(ev, &recipient_len);
    if (!change || !id) {
        return NULL; /* a change event always has both (mc_event_new_change checks) */
    }
    size_t stream_len = strlen(stream), id_len = strlen(id);
    /* Relaxed JSON of a typical change is about 1.3x its BSON size; the envelope adds the
     * three strings and ~80 bytes of keys and punctuation. One allocation in the usual case. */
    mc__json_buf_t b;
    mc__json_buf_init(&b,
                      (size_t)change->len + change->len / 2 + stream_len + id_len + recipient_len +
                          summary_len + summary_len / 8 + 128,
                      0);
    MC__JSON_LIT(&b, "{\"type\":\"change\",\"stream\":");
    mc__json_write_string(&b, stream, stream_len);
    MC__JSON_LIT(&b, ",\"id\":");
    mc__json_write_string(&b, id, id_len);
    put_recipient(&b, ev);
    if (entered) {
        MC__JSON_LIT(&b, ",\"entered\":true");
    }
    if (summary) {
        MC__JSON_LIT(&b, ",\"summary\":");
        mc__json_write_string(&b, summary, summary_len);
    }
    MC__JSON_LIT(&b, ",\"change\":");
    /* The change is a value inside the top-level message document: parent depth 0. Its _id
     * is the token "id" already carries: sent once (docs/protocol.md, "Messages"). */
    mc__json_write_embedded_except(&b, change, MC__JSON_RELAXED_COMPACT, 0,
                                   token_element(change, id, id_len));
    MC__JSON_LIT(&b, "}");
    char *s = mc__json_buf_steal(&b, len);
    return s ? s : render_change_error(ev, len);
}

char *mc__event_render_json(const mc_event_t *ev, size_t *len)
{
    mc_event_kind_t kind = mc_event_kind(ev);
    if (kind == MC_EVENT_CHANGE) {
        if (mc_event_server_oversize(ev)) {
            return render_server_oversize(ev, MC_EVENT_VIEW_FULL, len);
        }
        return render_change_message(ev, MC_EVENT_VIEW_FULL, mc_event_change(ev), len);
    }
    const char *reason = mc_event_reason(ev);
    mc__json_buf_t b;
    mc__json_buf_init(&b, 128 + strlen(mc_event_stream(ev)) + (reason ? strlen(reason) : 0), 0);
    MC__JSON_LIT(&b, "{\"type\":");
    put_field_string(&b, mc_event_kind_name(kind));
    MC__JSON_LIT(&b, ",\"stream\":");
    put_field_string(&b, mc_event_stream(ev));
    if (kind == MC_EVENT_ERROR) {
        /* Code first: a client switches on it; the reason is for people. */
        MC__JSON_LIT(&b, ",\"code\":");
        put_field_string(&b, mc_event_error_code(ev));
        if (mc_event_server_code(ev) != 0) {
            char num[16];
            int n = snprintf(num, sizeof(num), "%d", mc_event_server_code(ev));
            MC__JSON_LIT(&b, ",\"server_code\":");
            mc__json_buf_append(&b, num, (size_t)n);
        }
    }
    if ((kind == MC_EVENT_INVALIDATE || kind == MC_EVENT_RESET || kind == MC_EVENT_ERROR) &&
        reason) {
        MC__JSON_LIT(&b, ",\"reason\":");
        put_field_string(&b, reason);
    }
    MC__JSON_LIT(&b, "}");
    return mc__json_buf_steal(&b, len);
}

char *mc__event_render_entered(const mc_event_t *ev, size_t *len)
{
    if (mc_event_server_oversize(ev)) {
        return render_server_oversize(ev, MC_EVENT_VIEW_ENTERED, len);
    }
    return render_change_message(ev, MC_EVENT_VIEW_ENTERED,
                                 mc_event_change_view(ev, MC_EVENT_VIEW_ENTERED), len);
}

char *mc_event_json_view_with_change(const mc_event_t *ev, mc_event_view_t view,
                                     const bson_t *change, size_t *len)
{
    if (!ev || !change || mc_event_kind(ev) != MC_EVENT_CHANGE ||
        (view != MC_EVENT_VIEW_FULL && view != MC_EVENT_VIEW_ENTERED)) {
        return NULL;
    }
    if (mc_event_server_oversize(ev)) {
        /* A subscriber's stages never see what MongoDB could not return. */
        return render_server_oversize(ev, view, len);
    }
    return render_change_message(ev, view, change, len);
}

/* {"type":"left","stream":S,"_id":<documentKey._id or null>}: rare, so built as a document
 * and rendered by the writer. */
char *mc__event_render_left(const mc_event_t *ev, size_t *len)
{
    bson_t msg;
    bson_init(&msg);
    BSON_APPEND_UTF8(&msg, "type", "left");
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    const bson_t *key = mc_event_document_key(ev);
    bson_iter_t it;
    if (key && bson_iter_init_find(&it, key, "_id")) {
        bson_append_iter(&msg, "_id", 3, &it);
    } else {
        BSON_APPEND_NULL(&msg, "_id");
    }
    char *s = mc__json_render(&msg, MC__JSON_RELAXED_COMPACT, 0, len, NULL);
    bson_destroy(&msg);
    return s;
}

char *mc__event_render_raw(const mc_event_t *ev, size_t *len)
{
    if (mc_event_server_oversize(ev)) {
        return render_server_oversize(ev, MC_EVENT_VIEW_FULL, len);
    }
    const bson_t *change = mc_event_change(ev);
    if (!change) {
        return NULL;
    }
    return mc__json_render(change, MC__JSON_CANONICAL_COMPACT, 0, len, NULL);
}

/* A field of the notice longer than this as JSON (a huge _id or shard key, or a string a
 * subscriber's stage put in place of operationType or ns) is null in the notice, which must
 * stay small whatever the event. */
#define OVERSIZE_FIELD_MAX 4096

/* What an oversize notice says of the change: from the event (its view carries the same), or
 * from a subscriber's own copy. NULL fields are null in the notice. */
typedef struct notice_fields {
    const char *op, *db, *coll;
    uint32_t op_len, db_len, coll_len;
    const bson_t *key;
} notice_fields_t;

/* Undoes what was written since `before` and writes null when it failed or is too long. */
static void null_unless_fits(mc__json_buf_t *b, size_t before)
{
    if (b->err != MC__JSON_OK || b->len - before > OVERSIZE_FIELD_MAX) {
        b->len = before;
        b->err = MC__JSON_OK;
        MC__JSON_LIT(b, "null");
    }
}

static void put_notice_string(mc__json_buf_t *b, const char *s, uint32_t len)
{
    size_t before = b->len;
    if (!s) {
        MC__JSON_LIT(b, "null");
        return;
    }
    mc__json_write_string(b, s, len);
    null_unless_fits(b, before);
}

static char *render_oversize(const mc_event_t *ev, mc_event_view_t view, const notice_fields_t *f,
                             size_t size, size_t limit, size_t *len)
{
    mc__json_buf_t b;
    mc__json_buf_init(&b, 512, 0);
    if (view == MC_EVENT_VIEW_LEFT) {
        /* Only an _id too big for the limit makes a left notice oversize: it goes without. */
        MC__JSON_LIT(&b, "{\"type\":\"left\",\"stream\":");
        put_field_string(&b, mc_event_stream(ev));
        MC__JSON_LIT(&b, ",\"_id\":null");
    } else {
        MC__JSON_LIT(&b, "{\"type\":\"oversize\",\"stream\":");
        put_field_string(&b, mc_event_stream(ev));
        MC__JSON_LIT(&b, ",\"id\":");
        put_field_string(&b, mc_event_id(ev));
        put_recipient(&b, ev);
        if (view == MC_EVENT_VIEW_ENTERED) {
            MC__JSON_LIT(&b, ",\"entered\":true");
        }
        MC__JSON_LIT(&b, ",\"operationType\":");
        put_notice_string(&b, f->op, f->op_len);
        MC__JSON_LIT(&b, ",\"ns\":");
        size_t before = b.len;
        if (f->db) {
            MC__JSON_LIT(&b, "{\"db\":");
            mc__json_write_string(&b, f->db, f->db_len);
            if (f->coll) {
                MC__JSON_LIT(&b, ",\"coll\":");
                mc__json_write_string(&b, f->coll, f->coll_len);
            }
            MC__JSON_LIT(&b, "}");
            null_unless_fits(&b, before);
        } else {
            MC__JSON_LIT(&b, "null");
        }
        MC__JSON_LIT(&b, ",\"documentKey\":");
        before = b.len;
        if (f->key) {
            mc__json_write_embedded(&b, f->key, MC__JSON_RELAXED_COMPACT, 0);
            null_unless_fits(&b, before);
        } else {
            MC__JSON_LIT(&b, "null");
        }
    }
    char num[64];
    int n = snprintf(num, sizeof(num), ",\"size\":%zu,\"limit\":%zu}", size, limit);
    mc__json_buf_append(&b, num, (size_t)n);
    return mc__json_buf_steal(&b, len);
}

char *mc_event_oversize_json(const mc_event_t *ev, size_t size, size_t limit, size_t *len)
{
    return mc_event_oversize_json_view(ev, MC_EVENT_VIEW_FULL, size, limit, len);
}

char *mc_event_oversize_json_view(const mc_event_t *ev, mc_event_view_t view, size_t size,
                                  size_t limit, size_t *len)
{
    if (!ev || mc_event_kind(ev) != MC_EVENT_CHANGE || !mc_event_id(ev) ||
        !mc_event_change_view(ev, view == MC_EVENT_VIEW_LEFT ? MC_EVENT_VIEW_FULL : view)) {
        return NULL;
    }
    notice_fields_t f = {
        .op = mc_event_operation_type(ev),
        .db = mc_event_db(ev),
        .coll = mc_event_coll(ev),
        .key = mc_event_document_key(ev),
    };
    f.op_len = f.op ? (uint32_t)strlen(f.op) : 0;
    f.db_len = f.db ? (uint32_t)strlen(f.db) : 0;
    f.coll_len = f.coll ? (uint32_t)strlen(f.coll) : 0;
    return render_oversize(ev, view, &f, size, limit, len);
}

/* The notice of an event MongoDB could not return (mc_event_server_oversize()): the same
 * notice as for a message too big to send, with the server's size and limit. */
static char *render_server_oversize(const mc_event_t *ev, mc_event_view_t view, size_t *len)
{
    return mc_event_oversize_json_view(ev, view, mc_event_server_oversize(ev),
                                       MC_EVENT_SERVER_MAX_BYTES, len);
}

/* The string at `key` of the document `it` points into, or NULL. */
static const char *find_utf8(const bson_iter_t *doc, const char *key, uint32_t *len)
{
    bson_iter_t it = *doc;
    if (!bson_iter_find(&it, key) || !BSON_ITER_HOLDS_UTF8(&it)) {
        return NULL;
    }
    return bson_iter_utf8(&it, len);
}

char *mc_event_oversize_json_view_with_change(const mc_event_t *ev, mc_event_view_t view,
                                              const bson_t *change, size_t size, size_t limit,
                                              size_t *len)
{
    if (!ev || !change || mc_event_kind(ev) != MC_EVENT_CHANGE || !mc_event_id(ev) ||
        (view != MC_EVENT_VIEW_FULL && view != MC_EVENT_VIEW_ENTERED)) {
        return NULL;
    }
    /* Only what the subscriber's own change still has: a field its stages removed or
     * replaced with something else is null, never the event's. */
    notice_fields_t f = {0};
    bson_iter_t top, it, ns;
    bson_t key;
    if (bson_iter_init(&top, change)) {
        f.op = find_utf8(&top, "operationType", &f.op_len);
        it = top;
        if (bson_iter_find(&it, "ns") && BSON_ITER_HOLDS_DOCUMENT(&it) &&
            bson_iter_recurse(&it, &ns)) {
            f.db = find_utf8(&ns, "db", &f.db_len);
            f.coll = f.db ? find_utf8(&ns, "coll", &f.coll_len) : NULL;
        }
        it = top;
        if (bson_iter_find(&it, "documentKey") && BSON_ITER_HOLDS_DOCUMENT(&it)) {
            const uint8_t *data;
            uint32_t dlen;
            bson_iter_document(&it, &dlen, &data);
            if (bson_init_static(&key, data, dlen)) {
                f.key = &key;
            }
        }
    }
    return render_oversize(ev, view, &f, size, limit, len);
}
