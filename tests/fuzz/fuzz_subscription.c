/*
 * fuzz_subscription.c: libFuzzer target for a subscriber's query values: `vars` and `filter`
 * JSON as the daemon receives them, through mcd_subscription_new() (strict JSON object
 * parsing, var checks, $var binding into the stream's per-subscriber stages, with or without
 * reshaping stages after the $var stage, filter limits) and, when accepted,
 * mcd_subscription_apply() against fixed events (insert, delete with a pre-image, update,
 * control, and an update that moves a document from u2 to u1): control events always pass,
 * u2's delete never reaches u1, u1 never gets u2's version of the moved document (only the
 * ENTERED view, whose message holds nothing of it, also after reshaping, and also in the
 * oversize notice of its own message), a failed stage delivers nothing, and the view decided
 * within a CPU budget is the same unless the budget ran out. Input: byte 0 picks the identity
 * (user / admin / anonymous on a public stream / no auth), whether client filters are allowed
 * and whether the stream reshapes; the rest is "vars\0filter" (a missing part is absent).
 * Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mongocast.h"
#include "subscription.h"

#define N_EVENTS 5
static mc_event_t *events[N_EVENTS];
static bson_t *pipeline;
static bson_t *pipeline_reshaping; /* the same, then per-subscriber reshaping stages */

static void init(void)
{
    static const char *const changes[] = {
        "{\"_id\":{\"_data\":\"8201\"},\"operationType\":\"insert\",\"ns\":{\"db\":\"shop\","
        "\"coll\":\"orders\"},\"documentKey\":{\"_id\":1},\"fullDocument\":{\"_id\":1,"
        "\"owner\":\"u1\",\"tenant\":\"acme\",\"n\":5,\"tags\":[\"a\",\"b\"]}}",
        "{\"_id\":{\"_data\":\"8202\"},\"operationType\":\"delete\",\"ns\":{\"db\":\"shop\","
        "\"coll\":\"orders\"},\"documentKey\":{\"_id\":2},\"fullDocumentBeforeChange\":{"
        "\"_id\":2,\"owner\":\"u2\",\"tenant\":\"beta\",\"n\":{\"$numberLong\":\"7\"}}}",
        "{\"_id\":{\"_data\":\"8203\"},\"operationType\":\"update\",\"ns\":{\"db\":\"shop\","
        "\"coll\":\"orders\"},\"updateDescription\":{\"updatedFields\":{\"n\":6},"
        "\"removedFields\":[]},\"documentKey\":{\"_id\":1}}",
        "{\"_id\":{\"_data\":\"8205\"},\"operationType\":\"update\",\"ns\":{\"db\":\"shop\","
        "\"coll\":\"orders\"},\"updateDescription\":{\"updatedFields\":{\"owner\":\"u1\"},"
        "\"removedFields\":[\"note\"]},\"documentKey\":{\"_id\":3},\"fullDocument\":{"
        "\"_id\":3,\"owner\":\"u1\",\"tenant\":\"acme\",\"n\":5},"
        "\"fullDocumentBeforeChange\":{\"_id\":3,\"owner\":\"u2\",\"tenant\":\"beta\","
        "\"note\":\"u2-secret\",\"n\":6}}",
    };
    static const size_t change_at[] = {0, 1, 2, 4};
    for (size_t k = 0; k < 4; k++) {
        size_t i = change_at[k];
        bson_t *b = bson_new_from_json((const uint8_t *)changes[k], -1, NULL);
        events[i] = mc_event_new_change("orders", i + 1, b, "fullDocument.owner", NULL);
        bson_destroy(b);
        if (!events[i]) {
            abort();
        }
    }
    events[3] = mc_event_new_control(MC_EVENT_READY, "orders", 4, NULL);
    pipeline = bson_new_from_json(
        (const uint8_t *)"{\"0\":{\"$match\":{\"operationType\":{\"$ne\":\"drop\"}}},"
                         "\"1\":{\"$match\":{\"$or\":[{\"fullDocument.tenant\":{\"$var\":\"t\"}},"
                         "{\"fullDocument.n\":{\"$in\":{\"$var\":\"ns\"}}}]}}}",
        -1, NULL);
    pipeline_reshaping = bson_new_from_json(
        (const uint8_t *)"{\"0\":{\"$match\":{\"operationType\":{\"$ne\":\"drop\"}}},"
                         "\"1\":{\"$match\":{\"$or\":[{\"fullDocument.tenant\":{\"$var\":\"t\"}},"
                         "{\"fullDocument.n\":{\"$in\":{\"$var\":\"ns\"}}}]}},"
                         "\"2\":{\"$project\":{\"operationType\":1,\"fullDocument.owner\":1,"
                         "\"fullDocument.n\":1,\"fullDocumentBeforeChange\":1}},"
                         "\"3\":{\"$set\":{\"twice\":{\"$multiply\":[\"$fullDocument.n\",2]}}}}",
        -1, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!pipeline) {
        init();
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    uint8_t mode = data[0];
    char *buf = malloc(size + 1);
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = '\0';
    buf[size] = '\0';
    const char *vars = buf;
    size_t vlen = strlen(buf);
    const char *filter = vlen + 1 < size ? buf + vlen + 1 : NULL;

    mc_stream_config_t stream = {
        .name = (char *)"orders",
        .pipeline = (mode & 16) ? pipeline_reshaping : pipeline,
        .recipient = (char *)"fullDocument.owner",
        .client_filters = (mode & 4) == 0,
        .is_public = (mode & 3) == 2,
    };
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    bson_value_t who = {.value_type = BSON_TYPE_UTF8};
    switch (mode & 3) {
    case 0:
        id.authenticated = true;
        strcpy(id.subject, "u1");
        who.value.v_utf8.str = id.subject;
        who.value.v_utf8.len = 2;
        mc_identity_from_value(&who, &id.identity);
        break;
    case 1:
        id.authenticated = true;
        id.is_admin = true;
        strcpy(id.subject, "ops");
        who.value.v_utf8.str = id.subject;
        who.value.v_utf8.len = 3;
        mc_identity_from_value(&who, &id.identity);
        break;
    case 2: break; /* anonymous, public stream */
    default: id.auth_disabled = true; break;
    }
    mcd_refusal_t r;
    mcd_subscription_t *sub =
        mcd_subscription_new(&stream, (mode & 8) ? NULL : vars, filter, &id, &r);
    if (sub) {
        for (size_t i = 0; i < N_EVENTS; i++) {
            bson_t own;
            bool is_own = false;
            int code = 0;
            mc_event_view_t v =
                (mc_event_view_t)mcd_subscription_apply(sub, events[i], NULL, &own, &is_own, &code);
            bool m = v != MC_EVENT_VIEW_NONE;
            mc_filter_budget_t b = {.cpu_ns = 2000000};
            int vb = mcd_subscription_view_budget(sub, events[i], &b);
            if (vb < 0 ? !b.exceeded || !b.reason : vb != (int)v) {
                abort();
            }
            if (is_own) {
                /* A subscriber's own change: from its view only (never u2's version when u1
                 * is the new owner), with the event's resume token; its oversize notice says
                 * no more. */
                char *j = mc_event_json_view_with_change(events[i], v, &own, NULL);
                char *n = mc_event_oversize_json_view_with_change(events[i], v, &own, 1000, 10,
                                                                  NULL);
                if (!j || !strstr(j, "\"id\":\"82") || !n ||
                    (i == 4 && (mode & 3) == 0 && (strstr(j, "u2") || strstr(n, "u2")))) {
                    abort();
                }
                bson_free(j);
                bson_free(n);
                bson_destroy(&own);
            }
            if (code != 0 && m) {
                abort(); /* a failed stage delivers nothing */
            }
            if (i == 4 && (mode & 3) == 0) {
                if (v == MC_EVENT_VIEW_FULL || v == MC_EVENT_VIEW_LEFT) {
                    abort(); /* u1 is the new owner: never u2's version, never "left" */
                }
                const char *j = mc_event_json_view(events[i], MC_EVENT_VIEW_ENTERED, NULL);
                if (m && (!j || strstr(j, "u2"))) {
                    abort();
                }
            }
            if (i == 3 && !m) {
                abort(); /* control events always pass */
            }
            if (i == 1 && m && (mode & 3) == 0) {
                abort(); /* u2's delete must never reach u1 */
            }
        }
        mcd_subscription_destroy(sub);
    } else if (r.status < 400 || r.status > 503 || !r.code ||
               strnlen(r.message, sizeof(r.message)) >= sizeof(r.message)) {
        abort();
    }
    free(buf);
    return 0;
}
