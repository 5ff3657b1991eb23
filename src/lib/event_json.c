/*
 * event_json.c: renders an event as the subscriber message of docs/protocol.md (and its
 * ENTERED and LEFT views, mongocast/event.h) and as raw canonical Extended JSON.
 *
 * Runs on whichever thread first asks for the text (usually the dispatch thread); the result
 * is cached in the event by event.c. The message is written straight into one buffer by the
 * one-pass writer (json_writer.c), sized from the change's BSON length: no intermediate
 * message document. Every message is compact JSON (no whitespace outside strings): the bytes
 * are libbson 1.23's relaxed Extended JSON of the message document {type, stream, id,
 * [recipient], [entered], [summary], change} with the spaces outside strings removed. Where
 * libbson would refuse the message (invalid UTF-8 in the change or the recipient), the
 * message still goes out with "change": null and an "error" field rather than being lost
 * silently; only a stream name or id that cannot be rendered yields NULL.
 */
#include "engine_private.h"
#include "json_writer.h"
#include "summary.h"

static void put_field_string(mc__json_buf_t *b, const char *s)
{
    mc__json_write_string(b, s, strlen(s));
}

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
    const char *recipient = mc__event_recipient_json(ev, &recipient_len);
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
    if (mc__event_recipient_configured(ev)) {
        MC__JSON_LIT(&b, ",\"recipient\":");
        if (recipient) {
            /* Already JSON: the identity's canonical spelling (identity.c). */
            mc__json_buf_append(&b, recipient, recipient_len);
        } else {
            MC__JSON_LIT(&b, "null");
        }
    }
    if (entered) {
        MC__JSON_LIT(&b, ",\"entered\":true");
    }
    if (summary) {
        MC__JSON_LIT(&b, ",\"summary\":");
        mc__json_write_string(&b, summary, summary_len);
    }
    MC__JSON_LIT(&b, ",\"change\":");
    /* The change is a value inside the top-level message document: parent depth 0. */
    mc__json_write_embedded(&b, change, MC__JSON_RELAXED_COMPACT, 0);
    MC__JSON_LIT(&b, "}");
    char *s = mc__json_buf_steal(&b, len);
    return s ? s : render_change_error(ev, len);
}

char *mc__event_render_json(const mc_event_t *ev, size_t *len)
{
    mc_event_kind_t kind = mc_event_kind(ev);
    if (kind == MC_EVENT_CHANGE) {
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
    const bson_t *change = mc_event_change(ev);
    if (!change) {
        return NULL;
    }
    return mc__json_render(change, MC__JSON_CANONICAL_COMPACT, 0, len, NULL);
}
