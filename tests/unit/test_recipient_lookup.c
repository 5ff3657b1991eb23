/*
 * test_recipient_lookup.c: the lookup form of `recipient` (src/lib/recipient_lookup.c).
 *
 * The ledger alone (cache + log, driven with hand-made change events of the lookup
 * collection): values as of a cluster time by rolling back newer changes, the cache bound,
 * canonical keys (7 and 7.0 are one key), what is unknown without pre-images, barriers, the
 * fill after a read; then a randomized property test (fixed seeds) against a brute-force
 * history: with pre-images every answer is exact, without them every answer is exact or
 * "unresolved", never wrong. Then the engine end to end against mongo-emulator (spawned per
 * test by emu_fixture.h; skipped when the binary is missing): typed keys and recipients,
 * ownership moves that race ahead of the watcher, and the fail-closed case after a restart.
 * Main thread plus the engine's threads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <mongoc/mongoc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emu_fixture.h"
#include "mongocast.h"
#include "recipient_lookup.h"

/* ---- The ledger ------------------------------------------------------------------------- */

static mc_recipient_lookup_t cfg_of(const char *field, size_t cache_size)
{
    return (mc_recipient_lookup_t){.db = (char *)"shop",
                                   .collection = (char *)"b",
                                   .field = (char *)field,
                                   .recipient = (char *)"owner",
                                   .cache_size = cache_size};
}

/* Applies the change event {operationType: op, clusterTime: Timestamp(t, 1), documentKey:
 * {_id: <id_json>}, <extra>} to the ledger. */
static void lc(mc__recipient_lookup_t *l, uint32_t t, const char *op, const char *id_json,
               const char *extra)
{
    char json[1024];
    snprintf(json, sizeof(json),
             "{\"operationType\":\"%s\",\"clusterTime\":{\"$timestamp\":{\"t\":%u,\"i\":1}},"
             "\"documentKey\":{\"_id\":%s}%s%s}",
             op, t, id_json, extra && *extra ? "," : "", extra ? extra : "");
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)json, -1, &e);
    if (!b) {
        fail_msg("bad change json %s: %s", json, e.message);
    }
    mc__lookup_apply(l, b);
    bson_destroy(b);
}

static uint64_t T(uint32_t t)
{
    return mc__ct(t, 1);
}

static mc_identity_t key_json(const char *json)
{
    char doc[256];
    snprintf(doc, sizeof(doc), "{\"k\":%s}", json);
    bson_error_t e;
    bson_t *b = bson_new_from_json((const uint8_t *)doc, -1, &e);
    assert_non_null(b);
    bson_iter_t it;
    assert_true(bson_iter_init_find(&it, b, "k"));
    mc_identity_t id;
    assert_true(mc_identity_from_iter(&it, &id));
    bson_destroy(b);
    return id;
}

/* The resolution at ct as text: the owner's JSON, "none", "unresolved" or "miss". */
static const char *res(mc__recipient_lookup_t *l, const char *key, uint64_t ct, char *buf)
{
    mc_identity_t k = key_json(key), out;
    int r = mc__lookup_resolve_cached(l, &k, ct, &out);
    if (r < 0) {
        return "miss";
    }
    if (r == MC__R_UNRESOLVED) {
        return "unresolved";
    }
    if (r == MC__R_NONE) {
        return "none";
    }
    assert_true(mc_identity_json(out.bytes, out.len, buf) > 0);
    return buf;
}

static void test_rollback_to_cluster_time(void **state)
{
    (void)state;
    char b[MC_IDENTITY_JSON_MAX];
    mc_recipient_lookup_t cfg = cfg_of("_id", 100);
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    mc__lookup_start(l, T(5));
    lc(l, 10, "insert", "7", "\"fullDocument\":{\"_id\":7,\"owner\":\"alice\"}");
    /* Updates without images: the new value comes from updateDescription; the old one from
     * the cache (the insert put the key there). */
    lc(l, 20, "update", "7", "\"updateDescription\":{\"updatedFields\":{\"owner\":\"bob\"},"
                             "\"removedFields\":[]}");
    lc(l, 25, "update", "7", "\"updateDescription\":{\"updatedFields\":{\"qty\":1},"
                             "\"removedFields\":[]}");
    lc(l, 30, "update", "7", "\"updateDescription\":{\"updatedFields\":{\"owner\":5},"
                             "\"removedFields\":[]}");
    lc(l, 40, "update", "7", "\"updateDescription\":{\"updatedFields\":{},"
                             "\"removedFields\":[\"owner\"]}");
    mc__lookup_cover(l, T(50));
    assert_int_equal(mc__lookup_covered(l), T(50));
    assert_string_equal(res(l, "7", T(9), b), "none"); /* before the insert */
    assert_string_equal(res(l, "7", T(10), b), "\"alice\"");
    assert_string_equal(res(l, "7", T(19), b), "\"alice\"");
    assert_string_equal(res(l, "7", T(20), b), "\"bob\"");
    assert_string_equal(res(l, "7", T(29), b), "\"bob\"");
    assert_string_equal(res(l, "7", T(30), b), "5");
    assert_string_equal(res(l, "7", T(45), b), "none");
    /* Keys are canonical identities: 7.0 and Int64(7) are the document _id 7, "7" is not. */
    assert_string_equal(res(l, "7.0", T(30), b), "5");
    assert_string_equal(res(l, "{\"$numberLong\":\"7\"}", T(20), b), "\"bob\"");
    assert_string_equal(res(l, "\"7\"", T(20), b), "miss");
    /* Beyond what the stream has seen: unresolved, never a guess. */
    assert_string_equal(res(l, "7", T(51), b), "unresolved");
    /* Trimming drops what no later resolution needs, and refuses earlier times. */
    mc__lookup_trim(l, T(30));
    assert_int_equal(mc__lookup_log_len(l), 1);
    assert_string_equal(res(l, "7", T(30), b), "5");
    assert_string_equal(res(l, "7", T(29), b), "unresolved");
    mc__recipient_lookup_destroy(l);
}

static void test_unknown_previous_value_fails_closed(void **state)
{
    (void)state;
    char b[MC_IDENTITY_JSON_MAX];
    mc_recipient_lookup_t cfg = cfg_of("_id", 100);
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    mc__lookup_start(l, T(5));
    /* Key 8 is not cached and the change carries no pre-image: its value before t=10 is not
     * known, after it is. */
    lc(l, 10, "update", "8", "\"updateDescription\":{\"updatedFields\":{\"owner\":\"carol\"},"
                             "\"removedFields\":[]}");
    mc__lookup_cover(l, T(12));
    assert_string_equal(res(l, "8", T(7), b), "unresolved");
    assert_string_equal(res(l, "8", T(11), b), "\"carol\"");
    /* The same with a pre-image: exact. */
    lc(l, 20, "update", "9", "\"updateDescription\":{\"updatedFields\":{\"owner\":\"erin\"},"
                             "\"removedFields\":[]},"
                             "\"fullDocumentBeforeChange\":{\"_id\":9,\"owner\":\"dave\"}");
    mc__lookup_cover(l, T(21));
    assert_string_equal(res(l, "9", T(15), b), "\"dave\"");
    assert_string_equal(res(l, "9", T(20), b), "\"erin\"");
    /* A post-image decides the new value even when updateDescription says nothing useful. */
    lc(l, 30, "update", "9", "\"updateDescription\":{\"updatedFields\":{\"x.y\":1},"
                             "\"removedFields\":[]},\"fullDocument\":{\"_id\":9,\"owner\":\"f\"}");
    mc__lookup_cover(l, T(31));
    assert_string_equal(res(l, "9", T(29), b), "\"erin\"");
    assert_string_equal(res(l, "9", T(30), b), "\"f\"");
    /* Setting a parent of the path, or a field inside it. */
    lc(l, 40, "update", "9", "\"updateDescription\":{\"updatedFields\":{\"owner.name\":1},"
                             "\"removedFields\":[]}");
    mc__lookup_cover(l, T(41));
    assert_string_equal(res(l, "9", T(40), b), "none"); /* owner is now a document */
    /* A drop cannot be attributed to one key: everything before it is unknown. */
    lc(l, 50, "drop", "0", NULL);
    mc__lookup_cover(l, T(51));
    assert_int_equal(mc__lookup_cache_len(l), 0);
    assert_string_equal(res(l, "9", T(45), b), "unresolved");
    assert_string_equal(res(l, "9", T(50), b), "miss");
    mc__recipient_lookup_destroy(l);
}

static void test_fill_after_read(void **state)
{
    (void)state;
    char b[MC_IDENTITY_JSON_MAX];
    mc_recipient_lookup_t cfg = cfg_of("_id", 100);
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    /* A read issued at covered = 10 found bob; while it ran the key changed twice (the read
     * may have seen either): the changes after 10 are replayed onto it. */
    uint64_t from = T(10);
    mc_identity_t k = key_json("\"k\""), bob = key_json("\"bob\"");
    mc__lookup_start(l, T(5));
    mc__lookup_cover(l, T(10));
    lc(l, 12, "update", "\"k\"",
       "\"updateDescription\":{\"updatedFields\":{\"owner\":\"carol\"},\"removedFields\":[]}");
    lc(l, 14, "update", "\"k\"",
       "\"updateDescription\":{\"updatedFields\":{\"owner\":\"dan\"},\"removedFields\":[]}");
    mc__lookup_cover(l, T(20));
    assert_int_equal(mc__lookup_fill(l, &k, MC__R_KNOWN, &bob, from), 0);
    assert_string_equal(res(l, "\"k\"", T(20), b), "\"dan\"");
    assert_string_equal(res(l, "\"k\"", T(13), b), "\"carol\"");
    /* Before the first change: its previous value was never known (no pre-image, the key
     * was not cached then). */
    assert_string_equal(res(l, "\"k\"", T(11), b), "unresolved");
    /* A barrier after the read's start: the fill cannot be proven. */
    lc(l, 22, "rename", "0", NULL);
    mc__lookup_cover(l, T(25));
    mc_identity_t k2 = key_json("\"k2\"");
    assert_int_equal(mc__lookup_fill(l, &k2, MC__R_KNOWN, &bob, T(20)), -1);
    assert_int_equal(mc__lookup_fill(l, &k2, MC__R_KNOWN, &bob, T(22)), 0);
    assert_string_equal(res(l, "\"k2\"", T(23), b), "\"bob\"");
    mc__recipient_lookup_destroy(l);
}

static void test_cache_bound_and_other_field(void **state)
{
    (void)state;
    char b[MC_IDENTITY_JSON_MAX];
    mc_recipient_lookup_t cfg = cfg_of("_id", 4);
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    mc__lookup_start(l, T(1));
    for (uint32_t i = 0; i < 100; i++) {
        char id[16], extra[128];
        snprintf(id, sizeof(id), "%u", i);
        snprintf(extra, sizeof(extra), "\"fullDocument\":{\"_id\":%u,\"owner\":\"o%u\"}", i, i);
        lc(l, 10 + i, "insert", id, extra);
        assert_true(mc__lookup_cache_len(l) <= 4);
    }
    mc__lookup_cover(l, T(200));
    /* Evicted keys are still answered from the log while it holds them. */
    assert_string_equal(res(l, "3", T(150), b), "miss");
    assert_string_equal(res(l, "3", T(12), b), "none");
    assert_string_equal(res(l, "99", T(150), b), "\"o99\"");
    mc__recipient_lookup_destroy(l);

    /* field other than _id: without images a key change is a barrier; with them it moves
     * the document between keys exactly. */
    cfg = cfg_of("code", 100);
    l = mc__recipient_lookup_new(&cfg, "s", NULL);
    mc__lookup_start(l, T(1));
    lc(l, 10, "insert", "1", "\"fullDocument\":{\"_id\":1,\"code\":\"A\",\"owner\":\"x\"}");
    lc(l, 20, "update", "1",
       "\"updateDescription\":{\"updatedFields\":{\"code\":\"B\"},\"removedFields\":[]},"
       "\"fullDocument\":{\"_id\":1,\"code\":\"B\",\"owner\":\"x\"},"
       "\"fullDocumentBeforeChange\":{\"_id\":1,\"code\":\"A\",\"owner\":\"x\"}");
    mc__lookup_cover(l, T(30));
    assert_string_equal(res(l, "\"A\"", T(15), b), "\"x\"");
    assert_string_equal(res(l, "\"A\"", T(20), b), "none");
    assert_string_equal(res(l, "\"B\"", T(15), b), "none");
    assert_string_equal(res(l, "\"B\"", T(25), b), "\"x\"");
    /* An update that touches neither field nor recipient changes nothing. */
    lc(l, 40, "update", "1", "\"updateDescription\":{\"updatedFields\":{\"n\":1},"
                             "\"removedFields\":[]}");
    assert_string_equal(res(l, "\"B\"", T(35), b), "\"x\"");
    /* One that moves the key without images cannot be attributed. */
    lc(l, 50, "update", "1", "\"updateDescription\":{\"updatedFields\":{\"code\":\"C\"},"
                             "\"removedFields\":[]}");
    mc__lookup_cover(l, T(60));
    assert_string_equal(res(l, "\"B\"", T(45), b), "unresolved");
    assert_string_equal(res(l, "\"C\"", T(55), b), "miss");
    mc__recipient_lookup_destroy(l);
}

/* ---- The ledger against a brute-force history ------------------------------------------- */

#define PK 6   /* keys 0..5 */
#define PO 4   /* owners o0..o3, or none */
#define PMAXH 4096

typedef struct hist {
    uint32_t t[PMAXH];
    int v[PMAXH]; /* owner index, -1: none */
    int n;
} hist_t;

static uint64_t prng;
static uint32_t prnd(uint32_t n)
{
    prng ^= prng << 13;
    prng ^= prng >> 7;
    prng ^= prng << 17;
    return (uint32_t)(prng % n);
}

static int value_at(const hist_t *h, uint32_t t)
{
    int v = -1;
    for (int i = 0; i < h->n && h->t[i] <= t; i++) {
        v = h->v[i];
    }
    return v;
}

static void owner_json(int v, char *out, size_t cap)
{
    if (v < 0) {
        snprintf(out, cap, "null");
    } else {
        snprintf(out, cap, "\"o%d\"", v);
    }
}

typedef struct pending {
    char json[512];
    uint32_t t;
} pending_t;

/* One run: `images` says whether change events carry pre- and post-images. Returns the
 * number of unresolved answers; fails on any wrong one. */
static int property_run(uint64_t seed, bool images, size_t cache_size, int steps, int *answered)
{
    prng = seed;
    mc_recipient_lookup_t cfg = cfg_of("_id", cache_size);
    mc__recipient_lookup_t *l = mc__recipient_lookup_new(&cfg, "s", NULL);
    static hist_t hist[PK];
    static pending_t pend[PMAXH];
    int np = 0, pi = 0;
    bool exists[PK];
    uint32_t now = 100;
    for (int k = 0; k < PK; k++) {
        hist[k].n = 0;
        exists[k] = prnd(2);
        hist[k].t[hist[k].n] = 0;
        hist[k].v[hist[k].n++] = exists[k] ? (int)prnd(PO) : -1;
    }
    mc__lookup_start(l, T(now));
    uint32_t last_q = now;
    int unresolved = 0;
    for (int s = 0; s < steps; s++) {
        uint32_t what = prnd(10);
        int wk = (int)prnd(PK);
        if (what < 4 && np < PMAXH && hist[wk].n < PMAXH - 1) {
            /* A write. */
            int k = wk;
            int before = hist[k].v[hist[k].n - 1];
            now++;
            char o_old[32], o_new[32], extra[400];
            const char *op;
            int after;
            if (!exists[k]) {
                op = "insert";
                after = prnd(4) ? (int)prnd(PO) : -1;
                owner_json(after, o_new, sizeof(o_new));
                snprintf(extra, sizeof(extra), "\"fullDocument\":{\"_id\":%d,\"owner\":%s}", k,
                         o_new);
                exists[k] = true;
            } else if (prnd(5) == 0) {
                op = "delete";
                after = -1;
                owner_json(before, o_old, sizeof(o_old));
                if (images) {
                    snprintf(extra, sizeof(extra),
                             "\"fullDocumentBeforeChange\":{\"_id\":%d,\"owner\":%s}", k, o_old);
                } else {
                    extra[0] = '\0';
                }
                exists[k] = false;
            } else {
                op = "update";
                uint32_t kind = prnd(3);
                after = kind == 0 ? before : kind == 1 ? (int)prnd(PO) : -1;
                owner_json(after, o_new, sizeof(o_new));
                owner_json(before, o_old, sizeof(o_old));
                int n = 0;
                if (kind == 0) {
                    n = snprintf(extra, sizeof(extra),
                                 "\"updateDescription\":{\"updatedFields\":{\"q\":%u},"
                                 "\"removedFields\":[]}",
                                 now);
                } else if (kind == 1) {
                    n = snprintf(extra, sizeof(extra),
                                 "\"updateDescription\":{\"updatedFields\":{\"owner\":%s},"
                                 "\"removedFields\":[]}",
                                 o_new);
                } else {
                    n = snprintf(extra, sizeof(extra),
                                 "\"updateDescription\":{\"updatedFields\":{},"
                                 "\"removedFields\":[\"owner\"]}");
                }
                if (images) {
                    snprintf(extra + n, sizeof(extra) - (size_t)n,
                             ",\"fullDocument\":{\"_id\":%d,\"owner\":%s},"
                             "\"fullDocumentBeforeChange\":{\"_id\":%d,\"owner\":%s}",
                             k, o_new, k, o_old);
                }
            }
            hist[k].t[hist[k].n] = now;
            hist[k].v[hist[k].n++] = after;
            snprintf(pend[np].json, sizeof(pend[np].json),
                     "{\"operationType\":\"%s\",\"clusterTime\":{\"$timestamp\":{\"t\":%u,"
                     "\"i\":1}},\"documentKey\":{\"_id\":%d}%s%s}",
                     op, now, k, extra[0] ? "," : "", extra);
            pend[np].t = now;
            np++;
        } else if (what < 7) {
            /* The lookup stream delivers some of what is pending, or an empty batch. */
            int n = (int)prnd(4);
            for (int i = 0; i < n && pi < np; i++, pi++) {
                bson_error_t e;
                bson_t *b = bson_new_from_json((const uint8_t *)pend[pi].json, -1, &e);
                assert_non_null(b);
                mc__lookup_apply(l, b);
                bson_destroy(b);
            }
            if (pi == np) {
                mc__lookup_cover(l, T(now));
            }
        } else {
            /* An event at some time between the last one and what the stream covers. */
            uint64_t covered = mc__lookup_covered(l);
            uint32_t ct_max = (uint32_t)(covered >> 32);
            if ((covered & 0xffffffffu) == 0 && ct_max > 0) {
                ct_max--; /* covered = T(x) - 1 means x - 1 with increment max */
            }
            if (ct_max < last_q) {
                continue;
            }
            uint32_t q = last_q + prnd(ct_max - last_q + 1);
            last_q = q;
            int k = (int)prnd(PK);
            char kj[8];
            snprintf(kj, sizeof(kj), "%d", k);
            mc_identity_t key = key_json(kj), out;
            mc__lookup_trim(l, T(q));
            int r = mc__lookup_resolve_cached(l, &key, T(q), &out);
            if (r < 0) {
                /* A read: it sees the history at some time between now-covered and now,
                 * then the stream catches up past it. */
                uint64_t from = mc__lookup_covered(l);
                uint32_t from_t = (uint32_t)(from >> 32);
                uint32_t read_t = from_t + prnd(now - from_t + 1);
                int seen = value_at(&hist[k], read_t);
                while (pi < np && pend[pi].t <= read_t) {
                    bson_error_t e;
                    bson_t *b = bson_new_from_json((const uint8_t *)pend[pi++].json, -1, &e);
                    mc__lookup_apply(l, b);
                    bson_destroy(b);
                }
                if (pi == np) {
                    mc__lookup_cover(l, T(now));
                } else {
                    bson_error_t e;
                    bson_t *b = bson_new_from_json((const uint8_t *)pend[pi++].json, -1, &e);
                    mc__lookup_apply(l, b);
                    bson_destroy(b);
                }
                char oj[32];
                owner_json(seen, oj, sizeof(oj));
                mc_identity_t val = {.len = 0};
                if (seen >= 0) {
                    val = key_json(oj);
                }
                if (mc__lookup_fill(l, &key, seen >= 0 ? MC__R_KNOWN : MC__R_NONE, &val, from) !=
                    0) {
                    unresolved++;
                    continue;
                }
                r = mc__lookup_resolve_cached(l, &key, T(q), &out);
                if (r < 0) {
                    /* cache_size 0 keeps nothing: the fill cannot be looked up again. */
                    continue;
                }
            }
            if (r == MC__R_UNRESOLVED) {
                unresolved++;
                continue;
            }
            (*answered)++;
            int want = value_at(&hist[k], q);
            char wj[32], got[MC_IDENTITY_JSON_MAX];
            owner_json(want, wj, sizeof(wj));
            if (r == MC__R_NONE) {
                snprintf(got, sizeof(got), "null");
            } else {
                mc_identity_json(out.bytes, out.len, got);
            }
            if (strcmp(got, wj) != 0) {
                fail_msg("seed %llu images=%d step %d: key %d at %u: got %s, want %s",
                         (unsigned long long)seed, images, s, k, q, got, wj);
            }
        }
    }
    mc__recipient_lookup_destroy(l);
    return unresolved;
}

static void test_ledger_property(void **state)
{
    (void)state;
    for (uint64_t seed = 1; seed <= 12; seed++) {
        int answered = 0;
        int u = property_run(seed * 0x9E3779B97F4A7C15ull, true, seed % 3 ? 100 : 2, 3000,
                             &answered);
        /* With pre- and post-images every resolution is proven. */
        assert_int_equal(u, 0);
        assert_true(answered > 300);
        answered = 0;
        u = property_run(seed * 0x2545F4914F6CDD1Dull, false, seed % 3 ? 100 : 2, 3000,
                         &answered);
        /* Without them some are not, but none is wrong, and most are answered. */
        assert_true(answered > 300);
        assert_true(u < answered);
    }
}

/* ---- Engine against the emulator --------------------------------------------------------- */

typedef struct fixture {
    pid_t emu;
    char uri[256];
    char cpdir[128];
    mongoc_client_t *cli;
    bson_t *pipeline;
    mc_recipient_lookup_t lookup;
    mc_stream_config_t stream;
    mc_sink_config_t sink;
    mc_config_t cfg;
    mc_engine_t *engine;
} fixture_t;

static int setup(void **state)
{
    *state = NULL;
    if (!emu_fixture_path[0]) {
        return 0;
    }
    fixture_t *f = calloc(1, sizeof(*f));
    f->emu = emu_fixture_start(f->uri, sizeof(f->uri));
    if (f->emu < 0) {
        free(f);
        return -1;
    }
    snprintf(f->cpdir, sizeof(f->cpdir), "/tmp/mc-lookup-test-%d", (int)getpid());
    emu_fixture_rm_dir(f->cpdir);
    f->cli = mongoc_client_new(f->uri);
    f->pipeline = bson_new();
    f->lookup = (mc_recipient_lookup_t){.db = (char *)"shop",
                                        .collection = (char *)"businesses",
                                        .field = (char *)"_id",
                                        .recipient = (char *)"owner",
                                        .cache_size = 100};
    f->stream = (mc_stream_config_t){
        .name = (char *)"items",
        .db = (char *)"shop",
        .collection = (char *)"inventory_items",
        .pipeline = f->pipeline,
        .full_document = MC_FULL_DOCUMENT_WHEN_AVAILABLE,
        .full_document_before_change = MC_BEFORE_CHANGE_WHEN_AVAILABLE,
        .recipient = (char *)"fullDocument.owned_by",
        .lookup = &f->lookup,
        .max_await_time_ms = 200,
    };
    f->sink = (mc_sink_config_t){.name = (char *)"mem",
                                 .type = (char *)"memory",
                                 .options = BCON_NEW("control", BCON_BOOL(false))};
    f->cfg = (mc_config_t){.mongodb_uri = f->uri,
                           .streams = &f->stream,
                           .n_streams = 1,
                           .sinks = &f->sink,
                           .n_sinks = 1};
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    if (!f) {
        return 0;
    }
    mc_engine_destroy(f->engine);
    mongoc_client_destroy(f->cli);
    bson_destroy(f->pipeline);
    bson_destroy(f->sink.options);
    emu_fixture_stop(f->emu);
    emu_fixture_rm_dir(f->cpdir);
    free(f);
    return 0;
}

#define NEED_EMULATOR()                                                                            \
    fixture_t *f = *state;                                                                         \
    if (!f) {                                                                                      \
        skip();                                                                                    \
    }

static void command(fixture_t *f, bson_t *c)
{
    bson_error_t e;
    bson_t reply;
    bool ok = mongoc_client_command_simple(f->cli, "shop", c, NULL, &reply, &e);
    bson_destroy(&reply);
    bson_destroy(c);
    if (!ok) {
        fail_msg("command failed: %s", e.message);
    }
}

static void insert_json(fixture_t *f, const char *coll, const char *json)
{
    bson_error_t e;
    bson_t *doc = bson_new_from_json((const uint8_t *)json, -1, &e);
    assert_non_null(doc);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_insert_one(c, doc, NULL, NULL, &e);
    bson_destroy(doc);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("insert failed: %s", e.message);
    }
}

static void update_json(fixture_t *f, const char *coll, const char *q, const char *u)
{
    bson_error_t e;
    bson_t *qd = bson_new_from_json((const uint8_t *)q, -1, &e);
    bson_t *ud = bson_new_from_json((const uint8_t *)u, -1, &e);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_update_one(c, qd, ud, NULL, NULL, &e);
    bson_destroy(qd);
    bson_destroy(ud);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("update failed: %s", e.message);
    }
}

static void delete_json(fixture_t *f, const char *coll, const char *q)
{
    bson_error_t e;
    bson_t *qd = bson_new_from_json((const uint8_t *)q, -1, &e);
    mongoc_collection_t *c = mongoc_client_get_collection(f->cli, "shop", coll);
    bool ok = mongoc_collection_delete_one(c, qd, NULL, NULL, &e);
    bson_destroy(qd);
    mongoc_collection_destroy(c);
    if (!ok) {
        fail_msg("delete failed: %s", e.message);
    }
}

static void engine_up(fixture_t *f)
{
    mc_engine_opts_t opts = {.no_checkpoint = f->cfg.checkpoint.path == NULL};
    mc_error_t err = {0};
    f->engine = mc_engine_new(&f->cfg, &opts, &err);
    if (!f->engine) {
        fail_msg("engine_new: %s", err.message);
    }
    if (mc_engine_start(f->engine, &err) != 0) {
        fail_msg("engine_start: %s", err.message);
    }
    for (int i = 0; i < 500 && !mc_engine_ready(f->engine); i++) {
        usleep(10000);
    }
    assert_true(mc_engine_ready(f->engine));
}

static void start(fixture_t *f, bool business_images)
{
    command(f, BCON_NEW("create", "inventory_items", "changeStreamPreAndPostImages", "{", "enabled",
                        BCON_BOOL(true), "}"));
    command(f, BCON_NEW("create", "businesses", "changeStreamPreAndPostImages", "{", "enabled",
                        BCON_BOOL(business_images), "}"));
    insert_json(f, "businesses",
                "{\"_id\":{\"$oid\":\"650000000000000000000001\"},\"owner\":\"alice\"}");
    insert_json(f, "businesses", "{\"_id\":7,\"owner\":\"bob\"}");
    insert_json(f, "businesses", "{\"_id\":\"c\",\"owner\":42}");
    insert_json(f, "businesses", "{\"_id\":\"noowner\",\"name\":\"x\"}");
    engine_up(f);
}

/* "op:recipient" of the i-th event ("-" when it has none). */
static const char *at(mc_sink_t *m, size_t i, char *buf)
{
    mc_event_t *ev = mc_sink_memory_get(m, i);
    if (!ev) {
        return "(none)";
    }
    const char *op = mc_event_operation_type(ev);
    const char *r = mc_event_recipient(ev);
    snprintf(buf, 128, "%s:%s", op ? op : "?", r ? r : "-");
    mc_event_unref(&ev);
    return buf;
}

static void test_lookup_routes_events(void **state)
{
    NEED_EMULATOR();
    char b[128];
    start(f, false);
    mc_sink_t *m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items",
                "{\"_id\":1,\"owned_by\":{\"$oid\":\"650000000000000000000001\"}}");
    insert_json(f, "inventory_items", "{\"_id\":2,\"owned_by\":7}");
    insert_json(f, "inventory_items", "{\"_id\":3,\"owned_by\":\"c\"}");
    insert_json(f, "inventory_items", "{\"_id\":4,\"owned_by\":\"unknown\"}");
    insert_json(f, "inventory_items", "{\"_id\":5}");
    insert_json(f, "inventory_items", "{\"_id\":6,\"owned_by\":\"noowner\"}");
    /* Documents and arrays are never used as keys: an operator-looking document such as
     * {"$ne": null} would otherwise match the first business (libmongoc refuses to insert
     * '$' keys by default, so it is nested one level here), an array any element. */
    insert_json(f, "inventory_items", "{\"_id\":8,\"owned_by\":{\"x\":{\"$ne\":null}}}");
    insert_json(f, "inventory_items", "{\"_id\":9,\"owned_by\":[7]}");
    /* "7" is not 7, but 7.0 and Int64(7) are ($eq, and the identity rule). */
    insert_json(f, "inventory_items", "{\"_id\":10,\"owned_by\":\"7\"}");
    insert_json(f, "inventory_items", "{\"_id\":11,\"owned_by\":7.0}");
    insert_json(f, "inventory_items", "{\"_id\":12,\"owned_by\":{\"$numberLong\":\"7\"}}");
    update_json(f, "inventory_items", "{\"_id\":1}", "{\"$set\":{\"qty\":3}}");
    delete_json(f, "inventory_items", "{\"_id\":2}");
    assert_int_equal(mc_sink_memory_wait(m, 13, 10000), 0);
    assert_string_equal(at(m, 0, b), "insert:\"alice\"");
    assert_string_equal(at(m, 1, b), "insert:\"bob\"");
    assert_string_equal(at(m, 2, b), "insert:42");
    assert_string_equal(at(m, 3, b), "insert:-");
    assert_string_equal(at(m, 4, b), "insert:-");
    assert_string_equal(at(m, 5, b), "insert:-");
    assert_string_equal(at(m, 6, b), "insert:-");
    assert_string_equal(at(m, 7, b), "insert:-");
    assert_string_equal(at(m, 8, b), "insert:-");
    assert_string_equal(at(m, 9, b), "insert:\"bob\"");
    assert_string_equal(at(m, 10, b), "insert:\"bob\"");
    assert_string_equal(at(m, 11, b), "update:\"alice\"");
    /* The delete has no fullDocument: owned_by comes from the pre-image. */
    assert_string_equal(at(m, 12, b), "delete:\"bob\"");
    /* The §4.3 message carries the looked-up recipient, not the reference. */
    mc_event_t *ev = mc_sink_memory_get(m, 0);
    bson_error_t e;
    bson_t *msg = bson_new_from_json((const uint8_t *)mc_event_json(ev, NULL), -1, &e);
    mc_event_unref(&ev);
    assert_non_null(msg);
    bson_iter_t it;
    bool found = bson_iter_init_find(&it, msg, "recipient") && BSON_ITER_HOLDS_UTF8(&it) &&
                 strcmp(bson_iter_utf8(&it, NULL), "alice") == 0;
    bson_destroy(msg);
    assert_true(found);
    mc_stream_status_t st;
    assert_int_equal(mc_engine_stream_status(f->engine, "items", &st), 0);
    assert_int_equal(st.unresolved_recipients, 0);
}

/* Ownership moves written faster than the watcher routes: every event still gets the owner
 * of its own time (no TTL window, no later state), with or without a cache. */
static void check_moves_follow_writes(fixture_t *f)
{
    char b[128];
    mc_sink_t *m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items", "{\"_id\":1,\"owned_by\":7}");
    assert_int_equal(mc_sink_memory_wait(m, 1, 10000), 0);
    static const char *const owners[] = {"carol", "dave", "erin", "frank", "gina"};
    for (int i = 0; i < 5; i++) {
        char u[128], doc[64];
        snprintf(u, sizeof(u), "{\"$set\":{\"owner\":\"%s\"}}", owners[i]);
        update_json(f, "businesses", "{\"_id\":7}", u);
        snprintf(doc, sizeof(doc), "{\"_id\":%d,\"owned_by\":7}", 10 + i);
        insert_json(f, "inventory_items", doc);
    }
    assert_int_equal(mc_sink_memory_wait(m, 6, 10000), 0);
    assert_string_equal(at(m, 0, b), "insert:\"bob\"");
    for (int i = 0; i < 5; i++) {
        char want[64];
        snprintf(want, sizeof(want), "insert:\"%s\"", owners[i]);
        assert_string_equal(at(m, (size_t)i + 1, b), want);
    }
}

static void test_moves_are_exact(void **state)
{
    NEED_EMULATOR();
    start(f, false);
    check_moves_follow_writes(f);
    mc_stream_status_t st;
    assert_int_equal(mc_engine_stream_status(f->engine, "items", &st), 0);
    assert_int_equal(st.unresolved_recipients, 0);
}

static void test_moves_are_exact_without_cache(void **state)
{
    NEED_EMULATOR();
    /* cache_size 0: every event reads; pre-images keep the log's rollbacks exact. */
    f->lookup.cache_size = 0;
    start(f, true);
    check_moves_follow_writes(f);
}

/* After a restart the watcher replays from its checkpoint while the lookup collection has
 * moved on. Without pre-images on it, an event whose business changed after it (and was not
 * cached) cannot be proven: admins only, counted. With pre-images it is exact. */
static void check_restart(fixture_t *f, bool images)
{
    char b[128];
    f->cfg.checkpoint.store = MC_CHECKPOINT_FILE;
    f->cfg.checkpoint.path = f->cpdir;
    f->cfg.checkpoint.interval_ms = 50;
    start(f, images);
    mc_sink_t *m = mc_engine_sink(f->engine, "mem");
    insert_json(f, "inventory_items", "{\"_id\":1,\"owned_by\":\"c\"}");
    assert_int_equal(mc_sink_memory_wait(m, 1, 10000), 0);
    mc_engine_destroy(f->engine); /* final checkpoint after event 1 */
    f->engine = NULL;
    insert_json(f, "inventory_items", "{\"_id\":2,\"owned_by\":7}");
    update_json(f, "businesses", "{\"_id\":7}", "{\"$set\":{\"owner\":\"zoe\"}}");
    insert_json(f, "inventory_items", "{\"_id\":3,\"owned_by\":7}");
    engine_up(f);
    m = mc_engine_sink(f->engine, "mem");
    assert_int_equal(mc_sink_memory_wait(m, 2, 10000), 0);
    mc_stream_status_t st;
    assert_int_equal(mc_engine_stream_status(f->engine, "items", &st), 0);
    if (images) {
        assert_string_equal(at(m, 0, b), "insert:\"bob\"");
        assert_int_equal(st.unresolved_recipients, 0);
    } else {
        assert_string_equal(at(m, 0, b), "insert:-");
        mc_event_t *ev = mc_sink_memory_get(m, 0);
        assert_true(mc_event_recipient_unresolved(ev));
        mc_event_unref(&ev);
        assert_int_equal(st.unresolved_recipients, 1);
    }
    assert_string_equal(at(m, 1, b), "insert:\"zoe\"");
}

static void test_restart_without_images_fails_closed(void **state)
{
    NEED_EMULATOR();
    check_restart(f, false);
}

static void test_restart_with_images_is_exact(void **state)
{
    NEED_EMULATOR();
    check_restart(f, true);
}

int main(void)
{
    emu_fixture_find();
    if (getenv("MC_TEST_LOG")) {
        mc_log_set_handler(mc_log_stderr_handler, NULL);
        mc_log_set_level(MC_LOG_DEBUG);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rollback_to_cluster_time),
        cmocka_unit_test(test_unknown_previous_value_fails_closed),
        cmocka_unit_test(test_fill_after_read),
        cmocka_unit_test(test_cache_bound_and_other_field),
        cmocka_unit_test(test_ledger_property),
        cmocka_unit_test_setup_teardown(test_lookup_routes_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_moves_are_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_moves_are_exact_without_cache, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_without_images_fails_closed, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_restart_with_images_is_exact, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
