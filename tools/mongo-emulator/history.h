/*
 * history.h: the version history behind snapshot reads (readConcern "snapshot", with or without
 * atClusterTime) and behind transactions' snapshots and write-conflict checks.
 *
 * Every committed write of a document appends one record: the cluster time of the write, the
 * collection's UUID, the document's _id and the document as it was just before (or "absent").
 * Reading a collection as of time T is then the current documents with every record newer than
 * T undone (the oldest such record of each _id holds the version at T). Records are dropped
 * oldest first when they are older than the snapshot window (minSnapshotHistoryWindowInSeconds,
 * 300 s by default, settable with setParameter) or when the history passes its byte budget; the
 * history then cannot serve reads before the newest dropped record (SnapshotTooOld, 239), as
 * WiredTiger cannot once its oldest timestamp has moved on.
 *
 * Every function runs with srv->lock held.
 */
#ifndef MONGO_EMULATOR_HISTORY_H
#define MONGO_EMULATOR_HISTORY_H

#include "emulator.h"

#include "cstoken.h"

typedef struct emu_history emu_history_t;

typedef struct emu_hist_rec {
    uint32_t t, i;    /* cluster time of the write */
    uint8_t uuid[16]; /* collection */
    uint8_t *key;     /* canonical KeyString of the _id value (see emu_id_key) */
    uint32_t key_len;
    uint64_t hash;   /* of key */
    uint8_t *id_doc; /* {_id: value} */
    uint32_t id_doc_len;
    uint8_t *before; /* the document before the write; NULL: it did not exist */
    uint32_t before_len;
} emu_hist_rec_t;

/* Defaults: the window of MongoDB's minSnapshotHistoryWindowInSeconds, and a byte budget that
 * keeps the emulator's memory bounded under any write load. */
#define EMU_HISTORY_DEFAULT_WINDOW_SECS 300
#define EMU_HISTORY_DEFAULT_MAX_BYTES ((size_t)256 * 1024 * 1024)

int emu_history_init(emu_server_t *srv, mc_error_t *err);
void emu_history_cleanup(emu_server_t *srv);

/* The canonical key of the _id of `doc` (a document or {_id: v}); false when it has none. Equal
 * _id values (1, 1.0, NumberLong(1)) give equal bytes, as in MongoDB's _id index. */
bool emu_id_key(const bson_t *doc, emu_kbuf_t *out);
/* FNV-1a of a key, shared by every table keyed by _id. */
uint64_t emu_key_hash(const uint8_t *key, size_t len);

/* Records a write of the document with id `id_doc` ({_id: v} or the whole document) in the
 * collection `uuid` at the current cluster time (the tick the write's oplog entry took).
 * `before` is the document before the write, NULL for an insert. Copies what it keeps. */
void emu_history_record(emu_server_t *srv, const uint8_t uuid[16], const bson_t *id_doc,
                        const bson_t *before);
/* Same, at an explicit cluster time (a transaction's commit time for each of its writes). */
void emu_history_record_at(emu_server_t *srv, uint32_t t, uint32_t i, const uint8_t uuid[16],
                           const bson_t *id_doc, const bson_t *before);

/* 0 when the history can serve reads at (t, i); else MC_ESERVER with 239 SnapshotTooOld in
 * `err` (a time before the oldest retained version, or outside the window). Frees nothing: a
 * command may hold views into the records. */
int emu_history_check_readable(emu_server_t *srv, uint32_t t, uint32_t i, mc_error_t *err);
/* Drops the records the window no longer covers; called when a command starts (and when a
 * write is recorded), while no view is alive. */
void emu_history_expire(emu_server_t *srv);

/* Iteration over the retained records newer than (t, i), oldest first:
 *   for (size_t k = emu_history_first_after(srv, t, i); k < emu_history_end(srv); k++)
 *       rec = emu_history_at(srv, k);
 * Indexes stay valid until the next record is added (no write happens while a reader runs). */
size_t emu_history_first_after(emu_server_t *srv, uint32_t t, uint32_t i);
size_t emu_history_end(emu_server_t *srv);
const emu_hist_rec_t *emu_history_at(emu_server_t *srv, size_t k);

/* setParameter minSnapshotHistoryWindowInSeconds: the previous value. */
int64_t emu_history_set_window(emu_server_t *srv, int64_t secs);
int64_t emu_history_window(emu_server_t *srv);

/* Memory in use and the number of retained records (serverStatus, tests). */
size_t emu_history_bytes(emu_server_t *srv);
size_t emu_history_count(emu_server_t *srv);

#endif
