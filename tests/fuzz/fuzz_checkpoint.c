/*
 * fuzz_checkpoint.c: libFuzzer target for reading a stored checkpoint record: the bytes are
 * a checkpoint file's content (the file store parses it as Extended JSON; the MongoDB store
 * reads the same fields from a document), then the record is checked against a stream
 * definition the way a watcher does at start (namespace, fingerprint and options, clusterTime
 * against the server's). Seeds live in tests/fuzz/corpus/fuzz_checkpoint/.
 *
 * Single-threaded (libFuzzer). Beyond "no crash, no leak, no hang": a refusal is MC_ECONFIG
 * with a message, a load failure MC_EIO, and an accepted record always has a token with a
 * string _data.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 64 * 1024) {
        return 0;
    }
    bson_t doc;
    bson_error_t berr;
    if (!bson_init_from_json(&doc, (const char *)data, (ssize_t)size, &berr)) {
        return 0;
    }
    mc__record_t rec;
    memset(&rec, 0, sizeof(rec));
    mc_error_t err;
    mc_error_clear(&err);
    int rc = mc__record_from_bson(&doc, "fuzz.json", &rec, &err);
    if (rc != 0) {
        if (rc != MC_EIO || !err.message[0] || rec.pos.token) {
            abort();
        }
    } else {
        if (!rec.pos.token || !mc__token_data(rec.pos.token)) {
            abort();
        }
        uint32_t t, i;
        mc__token_cluster_time(rec.pos.token, &t, &i);
        mc__token_data_cmp(mc__token_data(rec.pos.token), "826A000000000000012B0229296E04");
        bson_t *def =
            BCON_NEW("ns", BCON_UTF8("shop.orders"), "fingerprint", BCON_UTF8("0123456789abcdef"),
                     "options", "{", "ns", BCON_UTF8("shop.orders"), "pipeline", "[", "]",
                     "fullDocument", BCON_UTF8("default"), "fullDocumentBeforeChange",
                     BCON_UTF8("off"), "recipient", BCON_NULL, "lookup", BCON_NULL, "}");
        for (int k = 0; k < 2; k++) {
            mc_error_clear(&err);
            int crc = mc__ledger_check_record("orders", def, &rec, k ? 1700000000u : 0, 5, &err);
            if (crc != 0 && (crc != MC_ECONFIG || !err.message[0])) {
                abort();
            }
        }
        bson_destroy(def);
    }
    mc__record_clear(&rec);
    bson_destroy(&doc);
    return 0;
}
