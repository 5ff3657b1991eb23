/*
 * event_json.c: renders an event as the DESIGN §4.3 subscriber message and as raw canonical
 * Extended JSON.
 *
 * Runs on whichever thread first asks for the text (usually the dispatch thread); the result
 * is cached in the event by event.c. The message is assembled as BSON and rendered by libbson
 * in one pass, so string escaping of stream names, ids and documents is libbson's, never
 * hand-rolled. If the change cannot be rendered (libbson refuses invalid UTF-8), the message
 * still goes out with "change": null and an "error" field rather than being lost silently.
 */
#include "engine_private.h"

static char *render_doc(const bson_t *doc, size_t *len)
{
    size_t n = 0;
    char *s = bson_as_relaxed_extended_json(doc, &n);
    if (s && len) {
        *len = n;
    }
    return s;
}

static char *render_change_message(const mc_event_t *ev, size_t *len)
{
    bson_t msg = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&msg, "type", "change");
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    BSON_APPEND_UTF8(&msg, "id", mc_event_id(ev));
    if (mc__event_recipient_configured(ev)) {
        if (mc_event_recipient(ev)) {
            BSON_APPEND_UTF8(&msg, "recipient", mc_event_recipient(ev));
        } else {
            BSON_APPEND_NULL(&msg, "recipient");
        }
    }
    BSON_APPEND_DOCUMENT(&msg, "change", mc_event_change(ev));
    char *s = render_doc(&msg, len);
    bson_destroy(&msg);
    if (s) {
        return s;
    }
    bson_init(&msg);
    BSON_APPEND_UTF8(&msg, "type", "change");
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    BSON_APPEND_UTF8(&msg, "id", mc_event_id(ev));
    BSON_APPEND_NULL(&msg, "change");
    BSON_APPEND_UTF8(&msg, "error", "change event could not be rendered as JSON");
    s = render_doc(&msg, len);
    bson_destroy(&msg);
    return s;
}

char *mc__event_render_json(const mc_event_t *ev, size_t *len)
{
    mc_event_kind_t kind = mc_event_kind(ev);
    if (kind == MC_EVENT_CHANGE) {
        return render_change_message(ev, len);
    }
    bson_t msg = BSON_INITIALIZER;
    BSON_APPEND_UTF8(&msg, "type", mc_event_kind_name(kind));
    BSON_APPEND_UTF8(&msg, "stream", mc_event_stream(ev));
    if ((kind == MC_EVENT_INVALIDATE || kind == MC_EVENT_RESET) && mc_event_reason(ev)) {
        BSON_APPEND_UTF8(&msg, "reason", mc_event_reason(ev));
    }
    char *s = render_doc(&msg, len);
    bson_destroy(&msg);
    return s;
}

char *mc__event_render_raw(const mc_event_t *ev, size_t *len)
{
    const bson_t *change = mc_event_change(ev);
    if (!change) {
        return NULL;
    }
    size_t n = 0;
    char *s = bson_as_canonical_extended_json(change, &n);
    if (s && len) {
        *len = n;
    }
    return s;
}
