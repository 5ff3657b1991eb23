/*
 * history.c: the version history of documents (history.h): a ring of records in commit order,
 * bounded by a time window and a byte budget.
 *
 * Runs on connection threads with srv->lock held. Invariants: records are in non-decreasing
 * cluster-time order (a transaction's writes share one time); the retained records are the
 * seqs [first, next), stored at seq & mask; `floor` is the time of the newest record dropped,
 * so every read at a time >= floor finds all the records it must undo; `bytes` is the memory
 * held by the retained records and never exceeds the budget after a record is added; records
 * are only dropped when a write is recorded or a command starts, never while a command reads
 * (views point into them).
 *
 * Differences from MongoDB: the window is measured in the seconds of cluster times (which the
 * emulator takes from its wall clock), and the byte budget (--snapshot-history-mb) stands in
 * for WiredTiger's cache pressure, which can also end the history early.
 */
#include "history.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REC_OVERHEAD 64 /* per-record bookkeeping counted against the budget */

struct emu_history {
    emu_hist_rec_t *ring;
    size_t mask;
    uint64_t first;
    uint64_t next;
    size_t bytes;
    size_t max_bytes;
    int64_t window_secs;
    uint32_t floor_t, floor_i;
    emu_kbuf_t scratch; /* the key being built, kept to spare an allocation per write */
};

static int ts_cmp(uint32_t at, uint32_t ai, uint32_t bt, uint32_t bi)
{
    if (at != bt) {
        return at < bt ? -1 : 1;
    }
    return ai < bi ? -1 : (ai > bi ? 1 : 0);
}

uint64_t emu_key_hash(const uint8_t *key, size_t len)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t k = 0; k < len; k++) {
        h ^= key[k];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

bool emu_id_key(const bson_t *doc, emu_kbuf_t *out)
{
    bson_iter_t it;
    out->len = 0;
    if (!doc || !bson_iter_init_find(&it, doc, "_id")) {
        return false;
    }
    return emu_keystring_append_value(out, &it, 0, NULL) == 0;
}

int emu_history_init(emu_server_t *srv, mc_error_t *err)
{
    emu_history_t *h = calloc(1, sizeof *h);
    if (h) {
        h->ring = calloc(1024, sizeof *h->ring);
    }
    if (!h || !h->ring) {
        free(h);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                            "out of memory creating the version history");
    }
    h->mask = 1023;
    h->max_bytes = srv->opts.snapshot_history_bytes ? srv->opts.snapshot_history_bytes
                                                    : EMU_HISTORY_DEFAULT_MAX_BYTES;
    /* options: 0 means the default, a negative value a window of 0 seconds */
    h->window_secs = srv->opts.snapshot_window_secs == 0  ? EMU_HISTORY_DEFAULT_WINDOW_SECS
                     : srv->opts.snapshot_window_secs < 0 ? 0
                                                          : srv->opts.snapshot_window_secs;
    srv->history = h;
    return 0;
}

static emu_hist_rec_t *rec_at(emu_history_t *h, uint64_t seq)
{
    return &h->ring[seq & h->mask];
}

static size_t rec_bytes(const emu_hist_rec_t *r)
{
    return REC_OVERHEAD + r->key_len + r->id_doc_len + r->before_len;
}

static void drop_oldest(emu_history_t *h)
{
    emu_hist_rec_t *r = rec_at(h, h->first);
    h->floor_t = r->t;
    h->floor_i = r->i;
    h->bytes -= rec_bytes(r);
    free(r->key); /* the record's one block */
    memset(r, 0, sizeof *r);
    h->first++;
}

void emu_history_cleanup(emu_server_t *srv)
{
    emu_history_t *h = srv->history;
    if (!h) {
        return;
    }
    while (h->first < h->next) {
        drop_oldest(h);
    }
    free(h->ring);
    emu_kbuf_destroy(&h->scratch);
    free(h);
    srv->history = NULL;
}

static bool grow(emu_history_t *h)
{
    size_t size = h->mask + 1;
    emu_hist_rec_t *ring = calloc(size * 2, sizeof *ring);
    if (!ring) {
        return false;
    }
    for (uint64_t s = h->first; s < h->next; s++) {
        ring[s & (size * 2 - 1)] = *rec_at(h, s);
    }
    free(h->ring);
    h->ring = ring;
    h->mask = size * 2 - 1;
    return true;
}

static int64_t now_secs(const emu_server_t *srv)
{
    int64_t now = (int64_t)time(NULL);
    return now > (int64_t)srv->clock_secs ? now : (int64_t)srv->clock_secs;
}

/* Drops what the window no longer covers: records whose time is older than now - window. */
static void expire(emu_server_t *srv)
{
    emu_history_t *h = srv->history;
    int64_t oldest = now_secs(srv) - h->window_secs;
    while (h->first < h->next && (int64_t)rec_at(h, h->first)->t < oldest) {
        drop_oldest(h);
    }
}

void emu_history_record_at(emu_server_t *srv, uint32_t t, uint32_t i, const uint8_t uuid[16],
                           const bson_t *id_doc, const bson_t *before)
{
    emu_history_t *h = srv->history;
    bson_iter_t it;
    bson_t idd = BSON_INITIALIZER;
    const bson_t *ids = id_doc;

    if (!h || !id_doc || !bson_iter_init_find(&it, id_doc, "_id")) {
        bson_destroy(&idd);
        return;
    }
    if (!emu_id_key(id_doc, &h->scratch)) {
        /* An _id too deep to encode cannot be looked up; forget what came before so that no
         * read can see a state this record would have had to undo. */
        bson_destroy(&idd);
        while (h->first < h->next) {
            drop_oldest(h);
        }
        h->floor_t = t;
        h->floor_i = i;
        return;
    }
    if (bson_count_keys(id_doc) != 1) {
        bson_append_iter(&idd, "_id", 3, &it);
        ids = &idd;
    }
    if (h->next - h->first == h->mask + 1 && !grow(h)) {
        drop_oldest(h); /* out of memory: keep working with a shorter history */
    }
    /* One allocation per record: the key, then {_id}, then the document before. */
    size_t klen = h->scratch.len, blen = before ? before->len : 0;
    uint8_t *block = malloc(klen + ids->len + blen);
    if (!block) {
        bson_destroy(&idd);
        return;
    }
    emu_hist_rec_t *r = rec_at(h, h->next);
    memset(r, 0, sizeof *r);
    r->t = t;
    r->i = i;
    memcpy(r->uuid, uuid, 16);
    r->key = block;
    r->key_len = (uint32_t)klen;
    memcpy(r->key, h->scratch.data, klen);
    r->hash = emu_key_hash(r->key, klen);
    r->id_doc = block + klen;
    r->id_doc_len = ids->len;
    memcpy(r->id_doc, bson_get_data(ids), ids->len);
    if (before) {
        r->before = block + klen + ids->len;
        r->before_len = (uint32_t)blen;
        memcpy(r->before, bson_get_data(before), blen);
    }
    bson_destroy(&idd);
    h->bytes += rec_bytes(r);
    h->next++;
    while (h->bytes > h->max_bytes && h->first + 1 < h->next) {
        drop_oldest(h);
    }
    expire(srv);
}

void emu_history_record(emu_server_t *srv, const uint8_t uuid[16], const bson_t *id_doc,
                        const bson_t *before)
{
    emu_history_record_at(srv, srv->clock_secs, srv->clock_inc, uuid, id_doc, before);
}

void emu_history_expire(emu_server_t *srv)
{
    expire(srv);
}

int emu_history_check_readable(emu_server_t *srv, uint32_t t, uint32_t i, mc_error_t *err)
{
    emu_history_t *h = srv->history;
    bool too_old =
        ts_cmp(t, i, h->floor_t, h->floor_i) < 0 || (int64_t)t < now_secs(srv) - h->window_secs;
    if (too_old) {
        return mc_error_set(err, MC_ESERVER, MC_DOMAIN_MONGODB, 239,
                            "Read timestamp Timestamp(%u, %u) is older than the oldest available "
                            "timestamp.",
                            t, i);
    }
    return 0;
}

size_t emu_history_first_after(emu_server_t *srv, uint32_t t, uint32_t i)
{
    emu_history_t *h = srv->history;
    uint64_t lo = h->first, hi = h->next;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        const emu_hist_rec_t *r = rec_at(h, mid);
        if (ts_cmp(r->t, r->i, t, i) <= 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return (size_t)lo;
}

size_t emu_history_end(emu_server_t *srv)
{
    return (size_t)srv->history->next;
}

const emu_hist_rec_t *emu_history_at(emu_server_t *srv, size_t k)
{
    return rec_at(srv->history, k);
}

int64_t emu_history_set_window(emu_server_t *srv, int64_t secs)
{
    int64_t was = srv->history->window_secs;
    srv->history->window_secs = secs;
    expire(srv);
    return was;
}

int64_t emu_history_window(emu_server_t *srv)
{
    return srv->history->window_secs;
}

size_t emu_history_bytes(emu_server_t *srv)
{
    return srv->history->bytes;
}

size_t emu_history_count(emu_server_t *srv)
{
    return (size_t)(srv->history->next - srv->history->first);
}
