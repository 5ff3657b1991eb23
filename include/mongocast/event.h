/*
 * mongocast/event.h: one normalised, immutable, reference-counted event of a stream.
 *
 * A watcher thread turns each change document MongoDB returns into an mc_event_t before it
 * asks for the next one (libmongoc reuses its buffer), then hands the event on. From then on
 * the event never changes: every accessor may be called from any thread without locking, and
 * one event is shared (by reference) by every sink and subscriber that receives it.
 *
 * Kinds:
 *   MC_EVENT_CHANGE      a change event (insert, update, replace, delete, drop, rename,
 *                        dropDatabase, or anything else MongoDB emits except invalidate)
 *   MC_EVENT_INVALIDATE  MongoDB invalidated the stream (the watched namespace was dropped or
 *                        renamed); the engine reopens it after the invalidate, so the stream
 *                        continues. reason: "drop", "rename", "dropDatabase" (or "invalidate"
 *                        when the cause was not seen).
 *   MC_EVENT_RESET       the stream lost its place (history lost with on_history_lost:
 *                        restart) and restarted from "now": consumers must resync.
 *   MC_EVENT_READY       the server-side change stream is open: writes from now on reach it.
 *
 * Every event of a stream carries a sequence number, 1, 2, 3, ... in delivery order within one
 * run of the engine (not persisted; use the resume token as a durable id).
 *
 * Ownership: mc_event_ref() adds a reference, mc_event_unref(&ev) drops one and sets ev to
 * NULL; the last unref frees the event. Pointers returned by accessors are borrowed and valid
 * while the caller holds a reference. Reference counting is atomic: any thread.
 */
#ifndef MONGOCAST_EVENT_H
#define MONGOCAST_EVENT_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mc_event mc_event_t;

typedef enum mc_event_kind {
    MC_EVENT_CHANGE = 0,
    MC_EVENT_INVALIDATE = 1,
    MC_EVENT_RESET = 2,
    MC_EVENT_READY = 3,
} mc_event_kind_t;

/* "change", "invalidate", "reset", "ready" (the `type` of the DESIGN §4.3 message). */
const char *mc_event_kind_name(mc_event_kind_t kind);

/*
 * Builds a change event from a change document `change` (copied; the caller keeps it).
 * `recipient_path` is the stream's dotted recipient path or NULL: when it starts with
 * "fullDocument." and the event has no fullDocument (deletes), the same path is read under
 * "fullDocumentBeforeChange." instead. A string, int32, int64, double (integral values print
 * without a fraction), decimal128 or ObjectId (24 hex digits) value becomes the recipient;
 * any other type, or a missing value, leaves it NULL.
 *
 * Errors (returns NULL and fills err with MC_EINVAL): `change` has no `_id` document with a
 * string `_data` (the resume token). A missing operationType (removed by a user $project) is
 * accepted: mc_event_operation_type() then returns NULL. An invalidate document is
 * accepted but produces kind MC_EVENT_CHANGE; use mc_event_new_invalidate() for the control
 * event. The new event has one reference.
 */
mc_event_t *mc_event_new_change(const char *stream, uint64_t seq, const bson_t *change,
                                const char *recipient_path, mc_error_t *err);

/* Builds an invalidate control event from the invalidate change document (copied) with the
 * given reason (copied; NULL means "invalidate"). Same errors as mc_event_new_change(). */
mc_event_t *mc_event_new_invalidate(const char *stream, uint64_t seq, const bson_t *change,
                                    const char *reason, mc_error_t *err);

/* Builds a reset or ready control event (kind MC_EVENT_RESET or MC_EVENT_READY; `reason` may
 * be NULL and is ignored for ready). Returns NULL only for a bad kind or a NULL stream. */
mc_event_t *mc_event_new_control(mc_event_kind_t kind, const char *stream, uint64_t seq,
                                 const char *reason);

/* Adds a reference and returns `ev` (NULL-safe). */
mc_event_t *mc_event_ref(mc_event_t *ev);

/* Drops the reference held in *ev and sets *ev to NULL. NULL-safe (ev or *ev). */
void mc_event_unref(mc_event_t **ev);

mc_event_kind_t mc_event_kind(const mc_event_t *ev);
uint64_t mc_event_seq(const mc_event_t *ev);
const char *mc_event_stream(const mc_event_t *ev);

/* The change's operationType ("insert", ..., "invalidate"); NULL for reset and ready, and
 * when the stream's pipeline removed it. */
const char *mc_event_operation_type(const mc_event_t *ev);

/* ns.db and ns.coll of the change; NULL when absent (dropDatabase has no coll; invalidate,
 * reset and ready have no namespace). */
const char *mc_event_db(const mc_event_t *ev);
const char *mc_event_coll(const mc_event_t *ev);

/* documentKey of insert/update/replace/delete; NULL otherwise. */
const bson_t *mc_event_document_key(const mc_event_t *ev);

/* The resume token: `_id._data` (the event id used by SSE, idempotency keys and `since=`) and
 * the whole `_id` document. NULL for reset and ready. */
const char *mc_event_id(const mc_event_t *ev);
const bson_t *mc_event_resume_token(const mc_event_t *ev);

/* clusterTime; returns false (and leaves *t, *i alone) when the event has none. */
bool mc_event_cluster_time(const mc_event_t *ev, uint32_t *t, uint32_t *i);

/* wallTime in milliseconds since the epoch, or INT64_MIN when absent. */
int64_t mc_event_wall_time_ms(const mc_event_t *ev);

/* The resolved recipient, or NULL. */
const char *mc_event_recipient(const mc_event_t *ev);

/* For invalidate and reset: the reason; NULL otherwise. */
const char *mc_event_reason(const mc_event_t *ev);

/* The change document as MongoDB produced it (after the server-side pipeline); NULL for
 * reset and ready. */
const bson_t *mc_event_change(const mc_event_t *ev);

/*
 * The DESIGN §4.3 message, rendered once on first use and cached (concurrent first calls are
 * safe; one rendering wins, the others are discarded):
 *   change:     {"type":"change","stream":S,"id":<_data>,"recipient":R,"change":{...}}
 *               (change in relaxed Extended JSON; "recipient" is present only when the stream
 *               has a recipient path and is null when it did not resolve)
 *   invalidate: {"type":"invalidate","stream":S,"reason":"drop"}
 *   reset:      {"type":"reset","stream":S,"reason":"..."}
 *   ready:      {"type":"ready","stream":S}
 * Returns the NUL-terminated JSON (borrowed, lives as long as the event) and its length in
 * *len when len is not NULL. Returns NULL only when memory runs out.
 */
const char *mc_event_json(mc_event_t *ev, size_t *len);

/* The change document in canonical Extended JSON (for `tail --raw`), rendered once and cached
 * like mc_event_json(). NULL for reset and ready events. */
const char *mc_event_raw_json(mc_event_t *ev, size_t *len);

/*
 * The notice that stands in for a change whose message is too big to send (`size` bytes,
 * more than the transport's `limit`, e.g. server.max_message_bytes):
 *   {"type":"oversize","stream":S,"id":<_data>,["recipient":R,]"operationType":OP,
 *    "ns":{"db":D,"coll":C},"documentKey":{...},"size":N,"limit":L}
 * in the style of mc_event_json() ("recipient" only on streams with a recipient path;
 * operationType and ns null when the pipeline removed them; documentKey null when absent or
 * longer than 4 KiB as JSON), so it is always small. Rendered on every call (callers that send
 * it to many consumers build it once). Returns a new string (release with bson_free()) and its
 * length in *len when len is not NULL; NULL for events other than changes or when memory runs
 * out. Any thread. (Additive function.)
 */
char *mc_event_oversize_json(const mc_event_t *ev, size_t size, size_t limit, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
