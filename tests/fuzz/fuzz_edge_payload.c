/*
 * fuzz_edge_payload.c: libFuzzer target for the edge payload decoder (edge_payload.c), which
 * reads what arrives from JetStream on an edge stream: the input is a message body. Beyond "no
 * crash, no leak, no hang" it checks the module's promises: a decoded event is a change or an
 * invalidate whose id is its change's `_id._data`, and encoding it again gives a body that
 * decodes to the same id, kind, recipient and change bytes (what the leader's nats sink
 * publishes is what the edge rebuilds); a refusal always says why. Single-threaded (libFuzzer).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edge_payload.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "edge payload: %s\n", what);
        abort();
    }
}

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The first byte picks the recipient path, so routing runs on the decoded change too. */
    static const char *const paths[] = {NULL, "fullDocument.owner", "documentKey._id", "a.b.c"};
    const char *path = size ? paths[data[0] % 4] : NULL;
    const uint8_t *body = size ? data + 1 : data;
    size_t len = size ? size - 1 : 0;
    mc_event_t *ev = NULL;
    mc_error_t err = {0};
    int rc = mc__edge_payload_decode(body, len, "s", 7, path, &ev, &err);
    if (rc != 0) {
        check(ev == NULL && err.message[0] != '\0', "a refusal without a reason, or with an event");
        return 0;
    }
    check(ev != NULL, "no event");
    mc_event_kind_t kind = mc_event_kind(ev);
    check(kind == MC_EVENT_CHANGE || kind == MC_EVENT_INVALIDATE, "another kind");
    const bson_t *change = mc_event_change(ev);
    check(change && mc_event_id(ev), "no change or no id");
    bson_iter_t it;
    check(bson_iter_init(&it, change) && bson_iter_find_descendant(&it, "_id._data", &it) &&
              BSON_ITER_HOLDS_UTF8(&it) && !strcmp(bson_iter_utf8(&it, NULL), mc_event_id(ev)),
          "the id is not the change's _id._data");

    bson_t again;
    mc_error_t eerr = {0};
    check(mc__edge_payload_encode(ev, &again, &eerr) == 0, "a decoded event does not encode");
    mc_event_t *ev2 = NULL;
    if (mc__edge_payload_decode(bson_get_data(&again), again.len, "s", 7, path, &ev2, &eerr) != 0) {
        fprintf(stderr, "edge payload: an encoded event does not decode: %s\n", eerr.message);
        abort();
    }
    const bson_t *change2 = mc_event_change(ev2);
    check(mc_event_kind(ev2) == kind && !strcmp(mc_event_id(ev2), mc_event_id(ev)) &&
              same_str(mc_event_recipient(ev2), mc_event_recipient(ev)) &&
              change2->len == change->len &&
              memcmp(bson_get_data(change2), bson_get_data(change), change->len) == 0 &&
              mc_event_server_oversize(ev2) == mc_event_server_oversize(ev),
          "the round trip changed the event");
    bson_destroy(&again);
    mc_event_unref(&ev2);
    mc_event_unref(&ev);
    return 0;
}
