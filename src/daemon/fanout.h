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

/* The cluster time of a change (Timestamp t << 32 | i): its clusterTime field, else its resume
 * token's; 0 when neither says. */
uint64_t mcd_event_cluster_time(const mc_event_t *ev);

/* The fan-out sink type (attached with mc_engine_add_sink; userdata = the mcd_fanout_t). */
extern const mc_sink_type_t mcd_fanout_sink_type;

#endif
