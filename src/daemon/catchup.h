/*
 * catchup.h: a subscriber that resumes after an event id the stream's history ring does not
 * hold (another node's event, one older than the ring, one from before a restart) is caught
 * up from the oplog: a change stream opened after that id on a snapshot worker, each event
 * built, routed and judged exactly as live delivery would (docs/protocol.md, "Resume"), then
 * joined to the live stream with no gap and no duplicate.
 *
 * Thread: every function here runs on the server's loop thread, except that the reads run on
 * the snapshot workers (snapshot.h, mcd_snapshots_submit()), never on the loop;
 * mcd_catchups_new()/destroy() on the owner's thread (destroy after the workers were joined).
 */
#ifndef MONGOCAST_DAEMON_CATCHUP_H
#define MONGOCAST_DAEMON_CATCHUP_H

#include <stdint.h>
#include <uv.h>

#include "conn.h"
#include "fanout.h"
#include "snapshot.h"

/* The reasons of the reset a catch-up that cannot be served ends with (docs/protocol.md). */
#define MCD_CU_RESET_OFF "history"               /* catch-up turned off (max_catchup_events 0) */
#define MCD_CU_RESET_LOST "history_lost"         /* the id is no longer in the oplog (286) */
#define MCD_CU_RESET_UNKNOWN "unknown_id"        /* no event of this stream has that id */
#define MCD_CU_RESET_TOO_LARGE "catchup_too_large" /* more than max_catchup_events to read */
#define MCD_CU_RESET_BUSY "catchup_busy"         /* max_catchups catch-ups already */
#define MCD_CU_RESET_TIMEOUT "catchup_timeout"   /* not joined within catchup_timeout_ms */
#define MCD_CU_RESET_UNRESOLVED "catchup_unresolved" /* a lookup could not be proven as of an
                                                        old event's time */
#define MCD_CU_RESET_FAILED "catchup_failed"     /* out of memory, or the server stops */

typedef struct mcd_catchups mcd_catchups_t;

/* The catch-up machinery of a server, reading on `workers`. An own wake-up handle on `loop`.
 * NULL when memory runs out. */
mcd_catchups_t *mcd_catchups_new(uv_loop_t *loop, const mc_config_t *config,
                                 mcd_snapshots_t *workers);

/* Subscribes `conn` (a subscriber of `hub` whose session started, not in the live set) that
 * resumes after `since`, an id the ring does not hold: a catch-up, or, when catch-up is off or
 * past its limits, a reset and live delivery. Returns 0, or -1 when the connection was
 * closed on the way. */
int mcd_catchup_start(mcd_catchups_t *cu, mcd_hub_t *hub, mcd_conn_t *conn, const char *since);

/* Moves what the workers read to the connections as their send queues allow, joins the
 * caught-up subscribers to their streams, ends those past their limits. Once per loop pass. */
void mcd_catchups_pump(mcd_catchups_t *cu);

/* At server stop, on the loop: cancels every catch-up and closes the wake-up handle. */
void mcd_catchups_close(mcd_catchups_t *cu);

/* After the workers were joined (mcd_snapshots_join()): frees everything. NULL-safe. */
void mcd_catchups_destroy(mcd_catchups_t *cu);

typedef struct mcd_catchup_stats {
    uint64_t started;
    uint64_t joined;
    uint64_t reset;  /* ended in a reset (any reason) */
    uint64_t events; /* events the catch-ups read */
    uint32_t active;
} mcd_catchup_stats_t;
void mcd_catchups_stats(const mcd_catchups_t *cu, mcd_catchup_stats_t *out);

#endif
