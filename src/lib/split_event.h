/*
 * split_event.h: reassembles the fragments of a change event that MongoDB split with
 * $changeStreamSplitLargeEvent (on_oversize: split), or keeps only what an oversize notice
 * needs of them (on_oversize: skip).
 *
 * MongoDB splits an event larger than 16 MB into fragments {_id: <own token>, splitEvent:
 * {fragment: n, of: N}, fields...}: every top-level field but _id is in exactly one fragment,
 * and the fragments of one event come in a row, 1..N. The reassembled document has every field
 * once, in a change event's usual order (lsid, txnNumber, _id, operationType, clusterTime, ...,
 * then the rest in fragment order), without splitEvent, and its _id is the LAST fragment's
 * token: the event's position is the end of the split event, so a checkpoint never lands
 * inside it, and resuming after it (with the stage) continues after its last fragment.
 *
 * One instance per reading thread (a watcher or a catch-up), no locking. Bounded: at most
 * MC__SPLIT_MAX_FRAGMENTS fragments (MongoDB's largest possible event needs four).
 */
#ifndef MC_SPLIT_EVENT_H
#define MC_SPLIT_EVENT_H

#include <bson/bson.h>
#include <stdbool.h>
#include <stddef.h>

#include "mongocast/error.h"

#define MC__SPLIT_MAX_FRAGMENTS 16u

typedef struct mc__split {
    bson_t **frags; /* fragments kept so far (thin ones in skip mode) */
    uint32_t n;     /* fragments seen */
    uint32_t of;    /* splitEvent.of of the event being assembled; 0: none under way */
    size_t bytes;   /* the fragments' sizes as MongoDB sent them, added up */
} mc__split_t;

/* Whether `change` is a fragment (it has a splitEvent document). */
bool mc__split_is_fragment(const bson_t *change);

/* Whether fragments of an event are under way (its position must not be reported yet). */
static inline bool mc__split_pending(const mc__split_t *sp)
{
    return sp->of > 0;
}

/* Adds the next fragment. `thin`: keep only the small fields an oversize notice and routing
 * need (fields of up to 16 KiB; of fullDocument and fullDocumentBeforeChange only what
 * `recipient_path` selects, when it is "fullDocument.<p>"). *complete is set when it was the
 * last one (take it with mc__split_take()). Errors (MC_EINVAL, the state is reset): a bad
 * splitEvent, a fragment out of order (a gap, or a new event before the last one ended), more
 * than MC__SPLIT_MAX_FRAGMENTS; MC_ENOMEM. */
int mc__split_add(mc__split_t *sp, const bson_t *frag, bool thin, const char *recipient_path,
                  bool *complete, mc_error_t *err);

/* The reassembled event (caller destroys it) after the last fragment, and the fragments' total
 * size in *bytes; NULL when out of memory. Resets the state either way. */
bson_t *mc__split_take(mc__split_t *sp, size_t *bytes);

/* The resume token `_data` (into data, NUL-terminated) and the event size (*size, 0 when
 * absent) in the message of MongoDB's BSONObjectTooLarge (10334) for a change event: "BSONObj
 * size: N (0x..) is invalid. ... First element: _id: { _data: "HEX" }". _id is a change event's
 * first field, so that is the event's own token. False when the message does not have it
 * whole (a pipeline that moved _id, a message cut short) or it does not fit in cap. */
bool mc__split_too_large_token(const char *msg, char *data, size_t cap, size_t *size);

/* Drops an event under way (a reopen starts again before its first fragment). */
void mc__split_reset(mc__split_t *sp);

#endif
