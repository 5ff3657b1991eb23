/*
 * fuzz_snapshot_plan.c: libFuzzer target for the `?snapshot=true` plan (src/daemon/snapshot.c):
 * a subscriber's `vars` and `filter` JSON through mcd_subscription_new() and, when accepted,
 * mcd_snapshot_plan(), which checks the fields the stages and filter read and translates them
 * to a find filter on the collection. Property: the plan never narrows the slice: for each of
 * a few fixed documents that the subscriber is entitled to (its view of the change the
 * document's insert would be, by mcd_subscription_apply()), the planned query, compiled with
 * the same matcher, matches the document. Input: byte 0 picks the identity (user u1 or admin);
 * the rest is "vars\0filter" (a missing part is absent). Single-threaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mongocast.h"
#include "mongocast/filter.h"
#include "snapshot.h"
#include "subscription.h"

#define N_DOCS 5
static bson_t *pipeline;
static bson_t *docs[N_DOCS];
static bson_t *changes[N_DOCS];

static void init(void)
{
    static const char *const json[N_DOCS] = {
        "{\"_id\":1,\"owner\":\"u1\",\"tenant\":\"acme\",\"n\":5,\"tags\":[\"a\",\"b\"]}",
        "{\"_id\":2,\"owner\":\"u2\",\"tenant\":\"acme\",\"n\":{\"$numberLong\":\"7\"}}",
        "{\"_id\":\"s\",\"owner\":\"u1\",\"tenant\":\"beta\",\"a\":{\"b\":[1,{\"c\":2}]}}",
        "{\"_id\":{\"k\":1},\"owner\":[\"u1\"],\"tenant\":\"acme\",\"n\":5.5}",
        "{\"_id\":4,\"tenant\":null,\"n\":{\"$numberDecimal\":\"5\"},\"x\":\"u1\"}",
    };
    pipeline = bson_new_from_json(
        (const uint8_t *)"{\"0\":{\"$match\":{\"ns.coll\":\"orders\"}},"
                         "\"1\":{\"$match\":{\"$or\":[{\"fullDocument.tenant\":{\"$var\":\"t\"}},"
                         "{\"fullDocument.n\":{\"$in\":{\"$var\":\"ns\"}}}]}}}",
        -1, NULL);
    for (int i = 0; i < N_DOCS; i++) {
        docs[i] = bson_new_from_json((const uint8_t *)json[i], -1, NULL);
        bson_iter_t it;
        bson_iter_init_find(&it, docs[i], "_id");
        changes[i] = bson_new();
        bson_t id, ns, key;
        BSON_APPEND_DOCUMENT_BEGIN(changes[i], "_id", &id);
        BSON_APPEND_UTF8(&id, "_data", "00");
        bson_append_document_end(changes[i], &id);
        BSON_APPEND_UTF8(changes[i], "operationType", "insert");
        BSON_APPEND_DOCUMENT_BEGIN(changes[i], "ns", &ns);
        BSON_APPEND_UTF8(&ns, "db", "shop");
        BSON_APPEND_UTF8(&ns, "coll", "orders");
        bson_append_document_end(changes[i], &ns);
        BSON_APPEND_DOCUMENT_BEGIN(changes[i], "documentKey", &key);
        bson_append_value(&key, "_id", 3, bson_iter_value(&it));
        bson_append_document_end(changes[i], &key);
        BSON_APPEND_DOCUMENT(changes[i], "fullDocument", docs[i]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!pipeline) {
        init();
    }
    if (size < 1 || size > 65536) {
        return 0;
    }
    bool admin = data[0] & 1;
    char *text = malloc(size);
    memcpy(text, data + 1, size - 1);
    text[size - 1] = '\0';
    const char *vars = text;
    size_t vlen = strlen(text);
    const char *filter = vlen + 1 < size - 1 ? text + vlen + 1 : NULL;
    if (!*vars) {
        vars = NULL;
    }

    mc_stream_config_t st = {
        .name = (char *)"orders",
        .db = (char *)"shop",
        .collection = (char *)"orders",
        .pipeline = pipeline,
        .recipient = (char *)"fullDocument.owner",
        .client_filters = true,
        .history = 10,
    };
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    id.authenticated = true;
    id.is_admin = admin;
    bson_value_t v = {.value_type = BSON_TYPE_UTF8};
    v.value.v_utf8.str = (char *)"u1";
    v.value.v_utf8.len = 2;
    mc_identity_from_value(&v, &id.identity);
    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    mcd_subscription_t *sub = mcd_subscription_new(&st, vars, filter, &id, &r);
    if (!sub) {
        free(text);
        return 0;
    }
    bson_t q;
    if (mcd_snapshot_plan(&st, sub, vars, filter, &q, &r) == 0) {
        mc_filter_opts_t opts = {.max_depth = 64, .max_predicates = 4096};
        mc_error_t err = {0};
        mc_filter_t *f = mc_filter_new(&q, &opts, &err);
        for (int i = 0; f && i < N_DOCS; i++) {
            mc_event_t *ev = mc_event_new_change("orders", 0, changes[i], st.recipient, NULL);
            bson_t out;
            bool own = false;
            int code = 0;
            int view = ev ? mcd_subscription_apply(sub, ev, NULL, &out, &own, &code) : 0;
            if (own) {
                bson_destroy(&out);
            }
            mc_event_unref(&ev);
            if (view == MC_EVENT_VIEW_FULL && code == 0 && !mc_filter_match(f, docs[i])) {
                abort(); /* the plan would leave out a document the subscriber is entitled to */
            }
        }
        mc_filter_destroy(f);
    }
    bson_destroy(&q);
    mcd_subscription_destroy(sub);
    free(text);
    return 0;
}
