/*
 * fuzz_subscription.c: libFuzzer target for a subscriber's query values: `vars` and `filter`
 * JSON as the daemon receives them, through mcd_subscription_new() (strict JSON object
 * parsing, var checks, $var binding into the stream's local $match stages, filter limits)
 * and, when accepted, mcd_subscription_view() against fixed events (insert, delete with a
 * pre-image, update, control, and an update that moves a document from u2 to u1): control
 * events always pass, u2's delete never reaches u1, and u1 never gets u2's version of the
 * moved document (only the ENTERED view, whose message holds nothing of it); the view decided
 * within a CPU budget (mcd_subscription_view_budget) is the same unless the budget ran out.
 * Input: byte 0 picks the identity (user / admin / anonymous on a public stream / no auth) and
 * whether client filters are allowed; the rest is
 * "vars\0filter" (a missing part is absent). Single-threaded.
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
        .pipeline = pipeline,
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
            mc_event_view_t v = mcd_subscription_view(sub, events[i]);
            bool m = v != MC_EVENT_VIEW_NONE;
            mc_filter_budget_t b = {.cpu_ns = 2000000};
            int vb = mcd_subscription_view_budget(sub, events[i], &b);
            if (vb < 0 ? !b.exceeded || !b.reason : vb != (int)v) {
                abort();
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
