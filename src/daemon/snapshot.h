/*
 * snapshot.h: `?snapshot=true` subscriptions: the documents a subscriber is entitled to, read
 * at one cluster time T on worker threads and streamed to its connection in batches, then the
 * live stream from T (docs/protocol.md, "Snapshot then stream").
 *
 * Thread: mcd_snapshot_plan(), mcd_snapshot_start(), mcd_snapshots_pump() and
 * mcd_snapshots_close() run on the server's loop thread; the reads run on the snapshot
 * workers (threads of their own, with a MongoDB client pool of their own), never on the loop;
 * mcd_snapshots_new()/destroy() on the owner's thread (destroy after the loop has ended).
 */
#ifndef MONGOCAST_DAEMON_SNAPSHOT_H
#define MONGOCAST_DAEMON_SNAPSHOT_H

#include <stdbool.h>
#include <stdint.h>
#include <mongoc/mongoc.h>
#include <uv.h>

#include "auth.h"
#include "conn.h"
#include "fanout.h"
#include "mongocast.h"
#include "refusal.h"

/* Close code (and error codes of the message before it) of a snapshot that cannot complete. */
#define MCD_WS_CLOSE_SNAPSHOT 4011
#define MCD_SNAPSHOT_TOO_LARGE "snapshot_too_large"
#define MCD_SNAPSHOT_OVERFLOW "snapshot_overflow"
#define MCD_SNAPSHOT_FAILED "snapshot_failed"

typedef struct mcd_snapshots mcd_snapshots_t;

/* The snapshot machinery of a server: nothing runs (no thread, no client pool) until the
 * first snapshot subscription. `async` callbacks of its own on `loop`. NULL when memory runs
 * out. */
mcd_snapshots_t *mcd_snapshots_new(uv_loop_t *loop, const mc_config_t *config);

/* What a snapshot of `stream` for this subscriber reads: fills `query` (initialised here; the
 * caller destroys it) with the find filter on the watched collection, or refuses (400
 * snapshot_not_supported with the reason, or 400 invalid_vars / invalid_filter when they do
 * not parse) when the stream's recipient rule, pipeline, `vars` or `filter` cannot be
 * translated to one. The query may be wider than the subscriber's slice (what could not be
 * translated exactly is checked per document on the worker): never narrower. */
int mcd_snapshot_plan(const mc_stream_config_t *stream, const mcd_subscription_t *sub,
                      const char *vars_json, const char *filter_json, bson_t *query,
                      mcd_refusal_t *r);

/* Starts the snapshot of `conn` (a subscriber of `hub` whose session started, not yet in the
 * hub's live set): `query` is taken over. The connection receives the snapshot batches, then
 * ready, then the changes after the snapshot's cluster time. Returns 0, or -1 when the
 * connection was closed (out of memory). */
int mcd_snapshot_start(mcd_snapshots_t *s, mcd_hub_t *hub, mcd_conn_t *conn, bson_t *query);

/* Moves batches the workers produced to their connections as their send queues allow, and
 * joins the finished snapshots to their streams. Once per loop pass and on the workers'
 * wake-ups. */
void mcd_snapshots_pump(mcd_snapshots_t *s);

/* At server stop, on the loop: cancels every snapshot and closes the wake-up handle. */
void mcd_snapshots_close(mcd_snapshots_t *s);

/* After the loop has ended: joins the workers and frees everything. NULL-safe. */
void mcd_snapshots_destroy(mcd_snapshots_t *s);

/* The workers serve other readers too (a client's catch-up, catchup.h): runs task(arg) on a
 * snapshot worker, in turn with the snapshots (starting the workers on first use). Returns 0,
 * MC_ENOMEM, or MC_ECLOSED when the server stops (task never runs). Loop thread. */
int mcd_snapshots_submit(mcd_snapshots_t *s, void (*task)(void *arg), void *arg);
/* The workers' MongoDB client pool (NULL before the first submit or snapshot). A task uses it
 * from its worker. */
mongoc_client_pool_t *mcd_snapshots_pool(mcd_snapshots_t *s);
/* At server stop, after the loop ended and before the engine is destroyed: cancels what is
 * left and waits for the workers (a task must end soon after its cancel). Owner's thread. */
void mcd_snapshots_join(mcd_snapshots_t *s);

/* Snapshots in progress, and totals, for /metrics. */
typedef struct mcd_snapshot_stats {
    uint64_t started;
    uint64_t completed;
    uint64_t failed;
    uint64_t documents;
    uint32_t active;
} mcd_snapshot_stats_t;
void mcd_snapshots_stats(const mcd_snapshots_t *s, mcd_snapshot_stats_t *out);

#endif
