/*
 * redis_stream_id.h: Redis stream entry IDs derived from an event's position in its change
 * stream, so that a replay after a crash is refused by Redis itself.
 *
 * Redis refuses `XADD key <ms>-<seq> ...` when the ID is not greater than the stream's top
 * ID (it remembers the top even after trimming). If every event maps to an ID and the map is
 * strictly increasing in stream order, then writing the events in order makes a replayed
 * event fail with that error, and the sink counts it as already written.
 *
 * The map, from the resume token (v1 or v2 KeyString: clusterTime (t, i), txnOpIndex,
 * fromInvalidate) and the change's `splitEvent.fragment`:
 *
 *     ms  = t * 1000                       (the cluster time's second, as Unix milliseconds)
 *     seq = i << 32 | txnOpIndex << 9 | fragment << 1 | fromInvalidate
 *
 * with fragment 0 for an event that was not split and 1..255 for the fragments of one that
 * was, txnOpIndex < 2^23. Order: events of one change stream come in resume-token order,
 * i.e. by (t, i), then txnOpIndex, then (for split events) fragment; an invalidate carries
 * the token of the drop/rename that caused it with fromInvalidate set, so it sorts right
 * after it. Hence (ms, seq) is strictly increasing in stream order:
 *   - transactions: every event of one committed transaction has the commit's cluster time
 *     and its own txnOpIndex (0, 1, 2, ...), so they get consecutive IDs in one `ms` and
 *     nothing from a later write can sort between them;
 *   - split events ($changeStreamSplitLargeEvent): each fragment is its own entry, ordered
 *     by fragment number; a replay that stops inside a split event is refused fragment by
 *     fragment exactly like whole events;
 *   - XRANGE by time works at one-second granularity (ms is a real Unix time).
 * Limits (an event past them gets no ID: MC_ELIMIT, a permanent failure for that event):
 * txnOpIndex >= 2^23 (a transaction of more than 8 million operations) and fragment > 255.
 * Events without a position (ready, reset, error) get no ID either (MC_EINVAL).
 * It assumes what a replica set guarantees: one stream never has two events with the same
 * (clusterTime, txnOpIndex, fragment, fromInvalidate). The sink checks a refused ID against
 * the entry stored under it (mc__redis_xadd_*), so a violation is reported, never silent.
 *
 * Pure functions, any thread.
 */
#ifndef MC_SINKS_REDIS_STREAM_ID_H
#define MC_SINKS_REDIS_STREAM_ID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"
#include "mongocast/event.h"

#define MC__REDIS_ID_MAX_TXN_OP_INDEX ((1u << 23) - 1)
#define MC__REDIS_ID_MAX_FRAGMENT 255u
/* "<20 digits>-<20 digits>" and a NUL. */
#define MC__REDIS_ID_BUF 42

typedef struct mc__redis_stream_id {
    uint64_t ms;
    uint64_t seq;
} mc__redis_stream_id_t;

/* The fields of a resume token that give its position (its start, before the UUID). */
typedef struct mc__token_position {
    uint32_t t, i;  /* clusterTime */
    int version;    /* 1 or 2 */
    int token_type; /* 128 event, 0 high-water mark */
    uint32_t txn_op_index;
    bool from_invalidate;
} mc__token_position_t;

/* Decodes the position fields of a resume token given as its `_data` hex string (upper or
 * lower case). Only what comes before the collection UUID is read, so any v1 or v2 token
 * decodes. Errors: MC_EINVAL (not hex, not a v1/v2 KeyString token, truncated). */
int mc__token_position_parse(const char *hex, size_t len, mc__token_position_t *out,
                             mc_error_t *err);

/* The ID of the position `pos` for fragment `fragment` (0: not split). MC_EINVAL for a
 * high-water-mark token, MC_ELIMIT past the limits above. */
int mc__redis_stream_id_make(const mc__token_position_t *pos, uint32_t fragment,
                             mc__redis_stream_id_t *out, mc_error_t *err);

/* The ID of an event (its resume token and `splitEvent.fragment`). MC_EINVAL for events
 * without a resume token; the errors of the two functions above. */
int mc__redis_stream_id_from_event(const mc_event_t *ev, mc__redis_stream_id_t *out,
                                   mc_error_t *err);

/* Writes "<ms>-<seq>" and a NUL into buf (MC__REDIS_ID_BUF bytes) and returns the length. */
size_t mc__redis_stream_id_format(const mc__redis_stream_id_t *id, char *buf);

/* Parses "<ms>-<seq>" or "<ms>" (seq 0) as Redis prints and accepts them. MC_EINVAL for
 * anything else (sign, spaces, overflow past 2^64 - 1). */
int mc__redis_stream_id_parse(const char *s, size_t len, mc__redis_stream_id_t *out);

/* -1, 0, 1 as a is before, equal to, after b. */
int mc__redis_stream_id_compare(const mc__redis_stream_id_t *a, const mc__redis_stream_id_t *b);

#endif
