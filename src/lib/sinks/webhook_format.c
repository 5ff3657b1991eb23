/*
 * webhook_format.c: webhook request bodies: the protocol message or CloudEvents 1.0
 * structured JSON (webhook_format.h lists the attributes).
 *
 * Any thread. The event's message JSON is rendered once by the event and reused as is (as
 * the whole body, or as CloudEvents `data`), so a CloudEvents body costs one copy of it plus
 * the attributes. Strings from the event (stream, ids, namespaces, recipient) go through the
 * JSON string escaper; invalid UTF-8 in them makes the append fail rather than send broken
 * JSON.
 */
#include "sinks/webhook_format.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int mc__webhook_format_parse(const char *name, mc__webhook_format_t *out, mc_error_t *err)
{
    if (name && strcmp(name, "message") == 0) {
        *out = MC__WEBHOOK_MESSAGE;
        return 0;
    }
    if (name && strcmp(name, "cloudevents") == 0) {
        *out = MC__WEBHOOK_CLOUDEVENTS;
        return 0;
    }
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                        "format must be message or cloudevents");
}

const char *mc__webhook_content_type(mc__webhook_format_t fmt, bool batch)
{
    if (fmt == MC__WEBHOOK_CLOUDEVENTS) {
        return batch ? "application/cloudevents-batch+json" : "application/cloudevents+json";
    }
    return "application/json";
}

void mc__cloudevents_type(const mc_event_t *ev, char *out, size_t cap)
{
    mc_event_kind_t kind = mc_event_kind(ev);
    const char *op = mc_event_operation_type(ev);
    if (kind == MC_EVENT_CHANGE) {
        snprintf(out, cap, "mongodb.change.%s", op ? op : "unknown");
    } else if (kind == MC_EVENT_INVALIDATE) {
        snprintf(out, cap, "mongodb.change.invalidate");
    } else {
        snprintf(out, cap, "mongocast.%s", mc_event_kind_name(kind));
    }
}

/* The buffer's sticky error as a status: invalid UTF-8 in a string, or the size limit. */
static int buf_status(const mc__json_buf_t *b)
{
    if (b->err == MC__JSON_OK) {
        return 0;
    }
    return b->err == MC__JSON_ETOOBIG ? MC_ENOMEM : MC_EINVAL;
}

static void put_string(mc__json_buf_t *b, const char *s)
{
    mc__json_write_string(b, s, strlen(s));
}

/* RFC 3339 in UTC with milliseconds: 2024-05-01T12:00:00.123Z. */
static void put_time(mc__json_buf_t *b, int64_t ms)
{
    time_t secs = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
    int frac = (int)(ms - (int64_t)secs * 1000);
    struct tm tm;
    char text[48];
    if (!gmtime_r(&secs, &tm) || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999) {
        return;
    }
    int n = snprintf(text, sizeof text, ", \"time\" : \"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     frac);
    mc__json_buf_append(b, text, (size_t)n);
}

/* "/<_id>" for the simple _id types a subject can name without ambiguity. */
static void put_subject_id(const mc_event_t *ev, char *subject, size_t cap, size_t n)
{
    const bson_t *key = mc_event_document_key(ev);
    bson_iter_t it;
    if (!key || !bson_iter_init_find(&it, key, "_id")) {
        return;
    }
    switch (bson_iter_type(&it)) {
    case BSON_TYPE_UTF8: {
        uint32_t len = 0;
        const char *s = bson_iter_utf8(&it, &len);
        if (n + 1 + len < cap) {
            subject[n] = '/';
            memcpy(subject + n + 1, s, len);
            subject[n + 1 + len] = '\0';
        }
        break;
    }
    case BSON_TYPE_OID: {
        char hex[25];
        bson_oid_to_string(bson_iter_oid(&it), hex);
        snprintf(subject + n, cap - n, "/%s", hex);
        break;
    }
    case BSON_TYPE_INT32:
    case BSON_TYPE_INT64:
        snprintf(subject + n, cap - n, "/%" PRId64, bson_iter_as_int64(&it));
        break;
    default: break;
    }
}

static int append_cloudevent(mc__json_buf_t *b, mc_event_t *ev, const char *source_prefix)
{
    size_t msg_len = 0;
    const char *msg = mc_event_json(ev, &msg_len);
    if (!msg) {
        return MC_ENOMEM;
    }
    char type[96];
    mc__cloudevents_type(ev, type, sizeof type);
    const char *id = mc_event_id(ev);
    MC__JSON_LIT(b, "{ \"specversion\" : \"1.0\", \"id\" : ");
    if (id) {
        put_string(b, id);
    } else {
        /* Control events without a position: the stream and sequence identify them within
         * one run (CloudEvents requires an id; these are never retried across runs). */
        char alt[64];
        snprintf(alt, sizeof alt, "%s-%" PRIu64, mc_event_kind_name(mc_event_kind(ev)),
                 mc_event_seq(ev));
        put_string(b, alt);
    }
    MC__JSON_LIT(b, ", \"source\" : ");
    const char *prefix = source_prefix ? source_prefix : MC__CLOUDEVENTS_SOURCE_PREFIX;
    char source[512];
    snprintf(source, sizeof source, "%s%s", prefix, mc_event_stream(ev));
    put_string(b, source);
    MC__JSON_LIT(b, ", \"type\" : ");
    put_string(b, type);
    const char *db = mc_event_db(ev), *coll = mc_event_coll(ev);
    if (db) {
        /* MongoDB limits a namespace to 255 bytes; an _id string may add up to the rest. */
        char subject[1024];
        int n = snprintf(subject, sizeof subject, "%s%s%s", db, coll ? "." : "", coll ? coll : "");
        if (n > 0 && (size_t)n < sizeof subject) {
            put_subject_id(ev, subject, sizeof subject, (size_t)n);
        }
        MC__JSON_LIT(b, ", \"subject\" : ");
        put_string(b, subject);
    }
    int64_t wall = mc_event_wall_time_ms(ev);
    uint32_t t = 0, i = 0;
    if (wall != INT64_MIN) {
        put_time(b, wall);
    } else if (mc_event_cluster_time(ev, &t, &i)) {
        put_time(b, (int64_t)t * 1000);
    }
    MC__JSON_LIT(b, ", \"datacontenttype\" : \"application/json\"");
    const char *recipient = mc_event_recipient(ev);
    if (recipient) {
        /* A string recipient is its JSON text as is; other identities (a number, an
         * ObjectId) are that text as a string: CloudEvents attributes cannot be objects. */
        MC__JSON_LIT(b, ", \"recipient\" : ");
        if (recipient[0] == '"') {
            mc__json_buf_append(b, recipient, strlen(recipient));
        } else {
            put_string(b, recipient);
        }
    }
    MC__JSON_LIT(b, ", \"data\" : ");
    mc__json_buf_append(b, msg, msg_len);
    MC__JSON_LIT(b, " }");
    return buf_status(b);
}

int mc__webhook_body_append(mc__json_buf_t *b, mc_event_t *ev, mc__webhook_format_t fmt,
                            const char *source_prefix)
{
    if (fmt == MC__WEBHOOK_CLOUDEVENTS) {
        return append_cloudevent(b, ev, source_prefix);
    }
    size_t len = 0;
    const char *msg = mc_event_json(ev, &len);
    if (!msg) {
        return MC_ENOMEM;
    }
    mc__json_buf_append(b, msg, len);
    return buf_status(b);
}
