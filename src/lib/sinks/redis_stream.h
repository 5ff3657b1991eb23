/*
 * redis_stream.h: writing one event into a Redis stream exactly once: `XADD` with the entry
 * ID derived from the event's position (redis_stream_id.h), and the check that turns Redis's
 * refusal of a replayed ID into "already written".
 *
 * The entry: XADD <key> [MAXLEN ~ <n>] <ms>-<seq> id <event id> type <type> stream <stream>
 * [recipient <recipient>] message <the JSON message of docs/protocol.md>, where type is the
 * change's operationType ("insert", ...) or the control event's kind ("invalidate").
 *
 * When Redis refuses the ID ("equal or smaller than the target stream top item"), two reads
 * (sent together) decide: `XRANGE key <id> <id>` and `XRANGE key - + COUNT 1`:
 *   - an entry with this ID whose `id` field is this event's id: DUPLICATE (a replay; counts
 *     as written);
 *   - an entry with this ID holding another event: COLLISION (two events mapped to one ID;
 *     permanent for this event, reported, never silent);
 *   - no entry with this ID, and the stream's first entry is after it (or the stream is
 *     empty): TRIMMED (written before and since trimmed by MAXLEN; counts as written, since
 *     this sink writes the key alone and in order);
 *   - no entry with this ID although it lies inside the kept range: GAP (a later event was
 *     written first, or someone deleted the entry; permanent for this event, reported).
 * The key must be written by this sink only: another writer using `*` IDs can push the top
 * past future positions, and the sink would then report GAP for those events rather than
 * write them.
 *
 * Threads: the loop thread of the mc__redis_t client (all functions but the pure ones).
 */
#ifndef MC_SINKS_REDIS_STREAM_H
#define MC_SINKS_REDIS_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast/error.h"
#include "mongocast/event.h"
#include "sinks/redis_client.h"
#include "sinks/redis_stream_id.h"
#include "sinks/subject_template.h"

typedef enum mc__xadd_outcome {
    MC__XADD_ADDED = 0,     /* a new entry */
    MC__XADD_DUPLICATE = 1, /* already there (replay) */
    MC__XADD_TRIMMED = 2,   /* written before, since trimmed away */
    MC__XADD_COLLISION = 3, /* permanent: another event holds this ID */
    MC__XADD_GAP = 4,       /* permanent: a later entry exists, this one never did */
    MC__XADD_FAILED = 5,    /* the command failed: see cls (transient or permanent) */
} mc__xadd_outcome_t;

/* True for the outcomes after which the event counts as written. */
static inline bool mc__xadd_written(mc__xadd_outcome_t o)
{
    return o == MC__XADD_ADDED || o == MC__XADD_DUPLICATE || o == MC__XADD_TRIMMED;
}

typedef struct mc__xadd_result {
    mc__xadd_outcome_t outcome;
    mc__redis_class_t cls; /* MC__REDIS_OK when written; the class otherwise */
    const char *message;   /* why it failed (borrowed for the callback) */
} mc__xadd_result_t;

typedef void (*mc__xadd_cb)(void *arg, const mc__xadd_result_t *res);

/* Everything one XADD needs, owned by the caller and alive until its callback has run (the
 * sink embeds one per event in flight). */
typedef struct mc__xadd_op {
    /* set by mc__xadd_prepare() */
    mc_event_t *ev; /* a reference held by the op (released by mc__xadd_op_cleanup) */
    mc__redis_stream_id_t id;
    char id_text[MC__REDIS_ID_BUF];
    char key[MC__SUBJECT_MAX + 1];
    size_t key_len;
    char maxlen_text[24];
    /* in flight */
    mc__redis_t *client;
    mc__xadd_cb cb;
    void *arg;
    int reads_left;
    bool exact_found, exact_same, first_found, read_failed;
    mc__redis_class_t read_cls;
    mc__redis_stream_id_t first;
    char why[160];
} mc__xadd_op_t;

/* Prepares the op for `ev`: renders the key with `key_template`, derives the entry ID.
 * maxlen 0 means no trimming. Errors (nothing to send; the event can never be written):
 * MC_EINVAL for an event without a position, MC_ELIMIT for a key or position past the
 * limits. Takes a reference on ev only on success. */
int mc__xadd_prepare(mc__xadd_op_t *op, const mc__subject_template_t *key_template, mc_event_t *ev,
                     uint64_t maxlen, mc_error_t *err);

/* Releases the op's event reference. NULL-safe. */
void mc__xadd_op_cleanup(mc__xadd_op_t *op);

/* Sends the XADD (and, if Redis refuses the ID, the two checking reads). Returns 0 and calls
 * cb exactly once later, or MC_EAGAIN / MC_ECLOSED / MC_ENOMEM from mc__redis_command() and
 * never calls cb. */
int mc__xadd_send(mc__redis_t *r, mc__xadd_op_t *op, mc__xadd_cb cb, void *arg);

/* Pure helpers, exposed for tests. */
bool mc__xadd_refused_as_old(const redisReply *reply);
/* The decision above from the two reads' findings. */
mc__xadd_outcome_t mc__xadd_decide(bool exact_found, bool exact_same, bool first_found,
                                   const mc__redis_stream_id_t *first,
                                   const mc__redis_stream_id_t *id);

#endif
