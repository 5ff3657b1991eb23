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
 *   MC_EVENT_ERROR       the stream failed for good (state MC_STREAM_FAILED: a fatal server
 *                        error, history lost with on_history_lost: fail, an unusable stored
 *                        checkpoint): it is the stream's last event in this run of the
 *                        engine. It carries a stable code name (mc_event_error_code()), the
 *                        server's numeric code when MongoDB gave one (mc_event_server_code())
 *                        and a fixed human-readable reason; the server's own error text goes
 *                        to the log and to mc_engine_stream_status(), never into the event,
 *                        because the event reaches every subscriber of the stream.
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
#include "mongocast/identity.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mc_event mc_event_t;

typedef enum mc_event_kind {
    MC_EVENT_CHANGE = 0,
    MC_EVENT_INVALIDATE = 1,
    MC_EVENT_RESET = 2,
    MC_EVENT_READY = 3,
    MC_EVENT_ERROR = 4,
} mc_event_kind_t;

/* "change", "invalidate", "reset", "ready", "error" (the `type` of the message). */
const char *mc_event_kind_name(mc_event_kind_t kind);

/*
 * Builds a change event from a change document `change` (copied; the caller keeps it).
 * `recipient_path` is the stream's dotted recipient path or NULL. The recipient is decided
 * from the document as that write left it, never from a later read:
 *   - a path "fullDocument.<p>" is read from the change's fullDocument: the inserted or
 *     replacing document, or an update's post-image (full_document whenAvailable/required).
 *     A delete is read from its pre-image (fullDocumentBeforeChange.<p>). An insert, update
 *     or replace without a fullDocument, or a delete without a pre-image, has an
 *     unresolved recipient (admins only; see mc_event_recipient_unresolved());
 *   - an update or replace that also carries a pre-image has a previous recipient, read
 *     from fullDocumentBeforeChange.<p>: when it differs from the new one the write moved
 *     the document from one owner to another (see mc_event_view_for());
 *   - any other path is read from the change as it is.
 * The value found becomes the recipient when it is an identity (mongocast/identity.h);
 * anything else, or a missing value, leaves the event without one.
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

/* The code names of an error event (mc_event_new_error(); docs/protocol.md lists them). */
#define MC_EVENT_ERROR_HISTORY_LOST "history_lost"   /* 286 with on_history_lost: fail */
#define MC_EVENT_ERROR_CHECKPOINT "checkpoint_error" /* the stored position is unusable */
#define MC_EVENT_ERROR_FATAL "change_stream_error"   /* an error that retrying cannot fix */
#define MC_EVENT_ERROR_FAILED "stream_failed"        /* any other failure */
#define MC_EVENT_ERROR_TOO_LARGE "event_too_large"   /* 10334 with on_oversize: fail (or split
                                                        on a server that cannot split) */

/* Builds an error control event (kind MC_EVENT_ERROR). `code` is a short stable name (NULL
 * means MC_EVENT_ERROR_FAILED), `server_code` MongoDB's error code or 0, `reason` a fixed
 * human-readable text (NULL means "stream failed"); both strings are copied. Returns NULL
 * only for a NULL stream or when memory runs out. */
mc_event_t *mc_event_new_error(const char *stream, uint64_t seq, const char *code, int server_code,
                               const char *reason);

/* Adds a reference and returns `ev` (NULL-safe). */
mc_event_t *mc_event_ref(mc_event_t *ev);

/* Drops the reference held in *ev and sets *ev to NULL. NULL-safe (ev or *ev). */
void mc_event_unref(mc_event_t **ev);

mc_event_kind_t mc_event_kind(const mc_event_t *ev);
uint64_t mc_event_seq(const mc_event_t *ev);
const char *mc_event_stream(const mc_event_t *ev);

/* The change's operationType ("insert", ..., "invalidate"); NULL for reset, ready and error,
 * and when the stream's pipeline removed it. */
const char *mc_event_operation_type(const mc_event_t *ev);

/* ns.db and ns.coll of the change; NULL when absent (dropDatabase has no coll; invalidate,
 * reset, ready and error have no namespace). */
const char *mc_event_db(const mc_event_t *ev);
const char *mc_event_coll(const mc_event_t *ev);

/* documentKey of insert/update/replace/delete; NULL otherwise. */
const bson_t *mc_event_document_key(const mc_event_t *ev);

/* The resume token: `_id._data` (the event id used by SSE, idempotency keys and `since=`) and
 * the whole `_id` document. NULL for reset, ready and error. */
const char *mc_event_id(const mc_event_t *ev);
const bson_t *mc_event_resume_token(const mc_event_t *ev);

/* clusterTime; returns false (and leaves *t, *i alone) when the event has none. */
bool mc_event_cluster_time(const mc_event_t *ev, uint32_t *t, uint32_t *i);

/* wallTime in milliseconds since the epoch, or INT64_MIN when absent. */
int64_t mc_event_wall_time_ms(const mc_event_t *ev);

/* The recipient as relaxed Extended JSON text of its canonical identity ("u1", 5,
 * {"$oid":"..."}; mongocast/identity.h), or NULL when the event has none. Two events
 * are for the same recipient exactly when these texts are byte-equal. */
const char *mc_event_recipient(const mc_event_t *ev);

/* The recipient's canonical identity bytes (borrowed) and their length in *len; NULL (and
 * *len 0) when the event has none. */
const uint8_t *mc_event_recipient_identity(const mc_event_t *ev, size_t *len);

/* True when the stream has a recipient but this change's could not be decided from the
 * write itself (an update without a post-image, a delete without a pre-image, a lookup that
 * could not be proven exact): it goes to admins only. */
bool mc_event_recipient_unresolved(const mc_event_t *ev);

/*
 * What a subscriber restricted to one identity receives of an event (admins and subscribers
 * of public streams receive MC_EVENT_VIEW_FULL of everything):
 *   MC_EVENT_VIEW_FULL     the event as MongoDB produced it: the identity is the recipient,
 *                          and it owned the previous version too (or the event carries none)
 *   MC_EVENT_VIEW_ENTERED  the write moved the document to this identity from another owner
 *                          (or from none, or from an owner that could not be decided): the
 *                          change without the previous version, i.e. without
 *                          fullDocumentBeforeChange, with updateDescription.removedFields and
 *                          truncatedArrays emptied, and with only MongoDB's own change fields
 *                          (_id operationType clusterTime wallTime ns documentKey fullDocument
 *                          updateDescription.updatedFields txnNumber lsid collectionUUID)
 *   MC_EVENT_VIEW_LEFT     the write moved the document away from this identity: only
 *                          {"type":"left","stream":S,"_id":<documentKey._id>}, without the new
 *                          version, the new recipient or the rest of the documentKey
 *   MC_EVENT_VIEW_NONE     nothing
 * Control events (ready, invalidate, reset) are MC_EVENT_VIEW_FULL for everyone. `id` is a
 * canonical identity (mc_identity_t bytes). Thread: any.
 */
typedef enum mc_event_view {
    MC_EVENT_VIEW_NONE = 0,
    MC_EVENT_VIEW_FULL = 1,
    MC_EVENT_VIEW_ENTERED = 2,
    MC_EVENT_VIEW_LEFT = 3,
} mc_event_view_t;

mc_event_view_t mc_event_view_for(const mc_event_t *ev, const uint8_t *id, size_t id_len);

/* The change document of a view: mc_event_change() for FULL, the reduced change for ENTERED
 * (NULL when the event has no such view), NULL for LEFT and NONE. Filters of a subscriber
 * are evaluated on exactly the document its view carries. */
const bson_t *mc_event_change_view(const mc_event_t *ev, mc_event_view_t view);

/* The message of a view, rendered once per event and view and cached like mc_event_json()
 * (FULL is mc_event_json()). ENTERED is the change message with "entered":true after
 * "recipient" (and the ENTERED view's own summary); LEFT is {"type":"left","stream":S,
 * "_id":...}. NULL for NONE, for a view the event does not have, or when memory runs out. */
const char *mc_event_json_view(mc_event_t *ev, mc_event_view_t view, size_t *len);

/* The change message of `view` (FULL or ENTERED) with `change` in place of the view's change
 * document: for a subscriber that runs pipeline stages of its own on its copy of the change
 * (the daemon's per-subscriber stages after a $var stage). Everything else (id, recipient,
 * entered, the view's summary) is the view's. Not cached: returns a new bson_malloc'ed text
 * (release with bson_free) and its length in *len, or NULL for another view, a non-change
 * event or when memory runs out. Any thread. */
char *mc_event_json_view_with_change(const mc_event_t *ev, mc_event_view_t view,
                                     const bson_t *change, size_t *len);

/* For invalidate, reset and error: the reason; NULL otherwise. */
const char *mc_event_reason(const mc_event_t *ev);

/* For error: the code name ("history_lost", ...); NULL otherwise. */
const char *mc_event_error_code(const mc_event_t *ev);

/* For error: MongoDB's error code, or 0 when the failure did not come with one. */
int mc_event_server_code(const mc_event_t *ev);

/* The change document as MongoDB produced it (after the server-side pipeline); NULL for
 * reset, ready and error. */
const bson_t *mc_event_change(const mc_event_t *ev);

/*
 * The subscriber message (docs/protocol.md), compact JSON without whitespace outside strings,
 * rendered once on first use and cached (concurrent first calls are safe; one rendering wins,
 * the others are discarded):
 *   change:     {"type":"change","stream":S,"id":<_data>,"recipient":R,"summary":L,"change":{...}}
 *               (change in relaxed Extended JSON without its _id when that is exactly
 *               {"_data": <id>}: the resume token is carried once, as "id"; a token with any
 *               other shape stays in the change. "recipient" is present only when the stream
 *               has a recipient: the identity as mc_event_recipient() spells it, or null;
 *               "summary" only when the stream's summary rendered a line for this event)
 *   invalidate: {"type":"invalidate","stream":S,"reason":"drop"}
 *   reset:      {"type":"reset","stream":S,"reason":"..."}
 *   ready:      {"type":"ready","stream":S}
 *   error:      {"type":"error","stream":S,"code":"history_lost","server_code":286,
 *                "reason":"..."} ("server_code" only when it is not 0)
 * Returns the NUL-terminated JSON (borrowed, lives as long as the event) and its length in
 * *len when len is not NULL. Returns NULL only when memory runs out.
 */
const char *mc_event_json(mc_event_t *ev, size_t *len);

/* The change document in canonical Extended JSON (for `tail --raw`), rendered once and cached
 * like mc_event_json(). NULL for reset, ready and error events. */
const char *mc_event_raw_json(mc_event_t *ev, size_t *len);

/*
 * The notice that stands in for a change whose message is too big to send (`size` bytes,
 * more than the transport's `limit`, e.g. server.max_message_bytes):
 *   {"type":"oversize","stream":S,"id":<_data>,["recipient":R,]"operationType":OP,
 *    "ns":{"db":D,"coll":C},"documentKey":{...},"size":N,"limit":L}
 * compact like mc_event_json() ("recipient" only on streams with a recipient path;
 * operationType and ns null when the pipeline removed them; documentKey null when absent or
 * longer than 4 KiB as JSON), so it is always small. Rendered on every call (callers that send
 * it to many consumers build it once). Returns a new string (release with bson_free()) and its
 * length in *len when len is not NULL; NULL for events other than changes or when memory runs
 * out. Any thread. (Additive function.)
 */
char *mc_event_oversize_json(const mc_event_t *ev, size_t size, size_t limit, size_t *len);

/*
 * The notice for the message of one view (mc_event_json_view()) that is too big to send,
 * `size` being that view's message length, so that a notice tells no more than its view:
 *   FULL     mc_event_oversize_json()
 *   ENTERED  the same with "entered":true after "recipient"; every field it carries is in
 *            the ENTERED change too, and `size` is the ENTERED message's (never the full one's,
 *            whose size would tell how big the previous owner's version was)
 *   LEFT     {"type":"left","stream":S,"_id":null,"size":N,"limit":L}: a left notice is only
 *            {type, stream, _id}, so it passes a limit only when its _id alone does
 * NULL for NONE, for ENTERED when the event has no such view, for events other than changes,
 * or when memory runs out. Any thread. (Additive function.)
 */
char *mc_event_oversize_json_view(const mc_event_t *ev, mc_event_view_t view, size_t size,
                                  size_t limit, size_t *len);

/* The notice for a subscriber's own message (mc_event_json_view_with_change(), FULL or
 * ENTERED) that is too big to send, `size` being that message's length: the view's notice,
 * but operationType, ns ({db, coll} strings) and documentKey are read from `change`, the
 * subscriber's copy, and are null where its stages removed them or made them something else
 * (or longer than 4 KiB as JSON), so that the notice carries nothing the subscriber's message
 * would not. NULL for another view, a non-change event, or when memory runs out. Any thread. */
/* Non-zero for a change event that stands in for one too large for MongoDB to return (more
 * than 16 MB with its images; the stream's on_oversize is skip): it carries only the small
 * fields (_id, operationType, clusterTime, ns, documentKey, lsid/txnNumber, the recipient
 * path), its id is a position like any event's, and every rendering of it (mc_event_json(),
 * its views, mc_event_raw_json()) is the `oversize` notice with "limit":16793600. The value is
 * the event's size as MongoDB reported it, or 1 when unknown. Any thread. (Additive.) */
size_t mc_event_server_oversize(const mc_event_t *ev);

#define MC_EVENT_SERVER_MAX_BYTES 16793600 /* MongoDB's limit on one change event */

char *mc_event_oversize_json_view_with_change(const mc_event_t *ev, mc_event_view_t view,
                                              const bson_t *change, size_t size, size_t limit,
                                              size_t *len);

#ifdef __cplusplus
}
#endif
#endif
