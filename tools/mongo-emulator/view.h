/*
 * view.h: a collection as of a cluster time, for snapshot reads and transactions.
 *
 * A view is the live documents of a collection with every committed write newer than the view's
 * time undone from the version history (history.h), and, for a transaction, its own writes on
 * top. The documents stay where the live collection keeps them (natural order); a document whose
 * version at that time differs takes the place of the live one.
 *
 * Views borrow the bytes they show from the catalog, the history and the transaction, so one is
 * valid only until the next write to any of them; commands build them, use them and drop them
 * within one command. Every function runs with srv->lock held.
 */
#ifndef MONGO_EMULATOR_VIEW_H
#define MONGO_EMULATOR_VIEW_H

#include "emulator.h"

typedef struct emu_vdoc {
    const uint8_t *data;
    uint32_t len;
} emu_vdoc_t;

typedef struct emu_view {
    emu_vdoc_t *docs;
    size_t n;
    size_t cap;
} emu_view_t;

/* The documents of db.coll as of (t, i), with `txn`'s own writes on top (txn may be NULL).
 * Errors: 239 SnapshotTooOld (history gone), 246 SnapshotUnavailable (the collection was created
 * or renamed after that time), 146 out of memory. A collection that does not exist gives an
 * empty view (plus the transaction's inserts into it). */
int emu_view_build(emu_server_t *srv, const char *db, const char *coll, uint32_t t, uint32_t i,
                   const emu_txn_t *txn, emu_view_t *out, mc_error_t *err);
/* The document whose _id equals `id` in that view: *found false when there is none. */
int emu_view_find_id(emu_server_t *srv, const char *db, const char *coll, uint32_t t, uint32_t i,
                     const emu_txn_t *txn, const bson_value_t *id, emu_vdoc_t *out, bool *found,
                     mc_error_t *err);
void emu_view_free(emu_view_t *v);

/* True when a committed write changed the document with this _id key in collection `uuid`
 * after (t, i) (a transaction's write-conflict check). */
bool emu_view_changed_since(emu_server_t *srv, const uint8_t uuid[16], const uint8_t *key,
                            size_t key_len, uint64_t hash, uint32_t t, uint32_t i);

#endif
