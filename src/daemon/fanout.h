/*
 * fanout.h: the WebSocket/SSE fan-out: one hub per stream (history ring + live subscribers)
 * and the sink type the engine dispatches into.
 *
 * Thread: the server's loop thread only (the engine runs in external dispatch mode, so it
 * calls the sink there); init/cleanup on the owner's thread.
 * Dependencies point one way: the fan-out knows connections only through conn.h (queue a
 * message, join or leave a subscriber set) and nothing of the server that owns it.
 */
#ifndef MONGOCAST_DAEMON_FANOUT_H
#define MONGOCAST_DAEMON_FANOUT_H

#include <stdbool.h>
#include <stdint.h>

#include "conn.h"
#include "mongocast.h"
#include "msg.h"

struct mcd_fanout;

typedef struct mcd_hub {
    const mc_stream_config_t *cfg;
    struct mcd_fanout *fanout;
    mcd_msg_t **ring;  /* history: change and invalidate messages, oldest first */
    uint32_t ring_cap; /* = stream history */
    uint32_t ring_head;
    uint32_t ring_len;
    mcd_conn_set_t subs;  /* live subscribers */
    bool open;            /* the engine's last word on this stream was "ready" */
    mcd_msg_t *ready_msg; /* {"type":"ready"} for subscribers joining an open stream */
    mcd_msg_t *reset_msg; /* {"type":"reset","reason":"history"} for lost resumes */
    mcd_msg_t *error_msg; /* the stream's failure (its error message) until it is ready again */
    uint64_t events;      /* events published to the fan-out */
    uint64_t replays;     /* resumes served from history */
    uint64_t resets;      /* resumes answered with reset */
    int64_t last_wall_ms; /* wallTime of the newest change, INT64_MIN when none */
    uint64_t ring_pushed; /* messages ever pushed into the ring (snapshot joins count from it) */
    uint32_t ring_epoch;  /* times the ring was cleared (a reset) */
    mcd_msg_t *evicted;   /* the newest message the ring dropped for room in this epoch, or
                             NULL: every event after it that reached the hub is in the ring
                             (catch-up joins, catchup.c) */
    uint64_t catchups;       /* resumes served by a catch-up that joined the stream */
    uint64_t catchup_resets; /* resumes whose catch-up ended in a reset */
} mcd_hub_t;

/* The hubs of every stream of a config, and the engine that feeds them (NULL in tests). */
typedef struct mcd_fanout {
    mcd_hub_t *hubs;
    size_t n_hubs;
    mc_engine_t *engine;
    uint64_t filter_budget_ns;   /* server.filter_budget_us, per subscriber and event */
    size_t max_message_bytes;    /* server.max_message_bytes */
    uint64_t oversize;           /* events sent as an oversize notice */
    uint64_t events;             /* events the fan-out sink received */
    uint64_t budget_disconnects; /* subscribers closed for an expensive filter */
} mcd_fanout_t;

/* One hub per stream of `config` (borrowed). Returns 0 or MC_ENOMEM (then call cleanup). */
int mcd_fanout_init(mcd_fanout_t *fo, const mc_config_t *config);
void mcd_fanout_cleanup(mcd_fanout_t *fo);
/* The hub of `stream`, or NULL. */
mcd_hub_t *mcd_fanout_hub(mcd_fanout_t *fo, const char *stream);

/* Subscribes `conn` (whose sub and transport are set): reset when `since` is not in the
 * history, ready when the stream is open, replay of what follows `since`, then live. Returns
 * 0, or -1 when the connection was closed on the way (slow consumer, out of memory). */
int mcd_hub_subscribe(mcd_hub_t *hub, mcd_conn_t *conn, const char *since);

/* Joins `conn` after its snapshot at cluster time `at` (Timestamp t << 32 | i) finished: the
 * stream's failure when it failed meanwhile (then the subscriber is ended), ready when the
 * stream is open, the changes the ring got since it held `seq` messages (hub->ring_pushed when
 * the snapshot started, in ring epoch `epoch`) that are after `at`, then live delivery, which
 * skips changes at or before `at` (a lagging stream may still bring some). Returns 0, -1 when
 * the connection was closed on the way, or 1 when the ring no longer holds everything since
 * `seq` (it overflowed, or a reset cleared it): the caller ends the subscriber. */
int mcd_hub_join_after_snapshot(mcd_hub_t *hub, mcd_conn_t *conn, uint64_t seq, uint32_t epoch,
                                uint64_t at);

/* ---- Catch-up joins (catchup.c): a resume after an id the ring does not hold ------------- */

/* Whether the ring holds a message with this event id. */
bool mcd_hub_has_id(const mcd_hub_t *hub, const char *id);

/* Sends ready when the stream is open. Returns 1 (sent), 0 (not open), -1 (closed). */
int mcd_hub_send_ready(mcd_hub_t *hub, mcd_conn_t *conn);

/* Where a catch-up at position `pos` (the id of the last event it handed the connection, or a
 * post-batch token's _data) stands against the stream as this hub has it:
 *   MCD_CU_FORWARD: the ring cannot prove continuity from `pos` (it starts later): go on;
 *   MCD_CU_HOLD: `pos` is past the ring's newest message but the router has handed out items
 *     after it: wait (hand the connection nothing more) until they reach the ring;
 *   MCD_CU_JOIN: join now (mcd_hub_catchup_join): every event after `pos` is in the ring or
 *     still to come. `check_head`: also compare with the router's newest item (takes the
 *     stream's route lock; for an empty ring or `pos` past it). */
enum { MCD_CU_FORWARD = 0, MCD_CU_HOLD, MCD_CU_JOIN };
int mcd_hub_catchup_state(mcd_hub_t *hub, const char *pos, bool check_head);

/* Joins `conn` (not in the live set) after its catch-up at `pos` (mcd_hub_catchup_state()
 * said MCD_CU_JOIN): the stream's failure when it failed meanwhile (then the subscriber is
 * ended), ready unless `ready_sent`, the ring's messages after `pos`, then live delivery,
 * which leaves out events at or before `pos`. Returns 0, or -1 when the connection was closed
 * on the way. */
int mcd_hub_catchup_join(mcd_hub_t *hub, mcd_conn_t *conn, const char *pos, bool ready_sent);

/* Subscribes `conn` live after {"type":"reset","reason":<reason>} (a catch-up that could not
 * be served), with ready unless `ready_sent`. Returns 0, or -1 when the connection was closed. */
int mcd_hub_subscribe_reset(mcd_hub_t *hub, mcd_conn_t *conn, const char *reason,
                            bool ready_sent);

/* Ends a subscriber as live delivery does when its own stages fail (pipeline_error, 4010) or
 * its stages and filter run out of CPU budget (4003, `why` says how). */
void mcd_hub_end_stage_error(mcd_hub_t *hub, mcd_conn_t *conn, int code);
void mcd_hub_end_filter_budget(mcd_hub_t *hub, mcd_conn_t *conn, const char *why);

/* The cluster time of a change (Timestamp t << 32 | i): its clusterTime field, else its resume
 * token's; 0 when neither says. */
uint64_t mcd_event_cluster_time(const mc_event_t *ev);

/* The fan-out sink type (attached with mc_engine_add_sink; userdata = the mcd_fanout_t). */
extern const mc_sink_type_t mcd_fanout_sink_type;

#endif
