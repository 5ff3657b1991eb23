/*
 * server.h: the live delivery server of the daemon (DESIGN §4.3): HTTP/1.1, WebSocket and
 * Server-Sent Events on one libuv loop, fed by the engine through the fan-out sink.
 *
 * Lifecycle (one thread, the owner, calls these in order; see cmd_run.c):
 *   srv = mcd_server_new(config, &err)        loop, hubs, auth; parses server.listen
 *   mcd_server_engine_opts(srv, &opts)         external dispatch: the loop owns dispatching
 *   engine = mc_engine_new(config, &opts, ..)
 *   mcd_server_attach(srv, engine, &err)       adds the fan-out sink (all streams)
 *   mc_engine_start(engine, ..)
 *   mcd_server_start(srv, &err)                binds server.listen (port 0: a free port),
 *                                              spawns the loop thread, starts accepting
 *   ...
 *   mcd_server_stop(srv, 1001, &err)           on the loop thread: mc_engine_stop(), then
 *                                              close every client (WebSocket close `code`),
 *                                              drain their queues (bounded) and join
 *   mc_engine_destroy(engine); mcd_server_destroy(srv);
 * A server without an engine (tests) serves the config's streams with no events.
 *
 * Threads: the loop thread owns every connection, the history rings and the fan-out; the
 * engine's watcher threads only call the notify hook (uv_async_send). mcd_server_stop() may be
 * called from any thread except the loop thread.
 *
 * Test-only timing: the environment variable MONGOCAST_TEST_TIMING (read by mcd_server_new)
 * overrides intervals, e.g. "ping_ms=300,pong_ms=500,sse_ms=300,tick_ms=50,linger_ms=500".
 * It exists so that tests need not wait 25 s for a ping; never set it in production.
 */
#ifndef MONGOCAST_DAEMON_SERVER_H
#define MONGOCAST_DAEMON_SERVER_H

#include <stdint.h>

#include "mongocast.h"

typedef struct mcd_server mcd_server_t;

/* Creates the loop, the stream hubs and the auth checker and raises RLIMIT_NOFILE's soft
 * limit to the hard one; binds nothing yet (so that config errors of the engine, which starts
 * next, are reported before a busy port). `config` is borrowed and must outlive the server.
 * Returns NULL and fills err (MC_ECONFIG: bad server.listen or auth settings, MC_ENOMEM). */
mcd_server_t *mcd_server_new(const mc_config_t *config, mc_error_t *err);

/* The port actually bound (useful with port 0); 0 before mcd_server_start(). */
int mcd_server_port(const mcd_server_t *srv);

/* Sets opts->notify and opts->notify_userdata so that the engine is dispatched on the loop. */
void mcd_server_engine_opts(mcd_server_t *srv, mc_engine_opts_t *opts);

/* Adds the fan-out sink (named "live-clients", all streams) to `engine`, which must have been
 * created with mcd_server_engine_opts() and not be started yet. Borrowed: the engine must
 * outlive mcd_server_stop(). Returns 0 or the mc_engine_add_sink() error. */
int mcd_server_attach(mcd_server_t *srv, mc_engine_t *engine, mc_error_t *err);

/* Binds and listens on server.listen, logs "server listening on HOST:PORT" and starts the
 * loop thread. Returns 0, MC_EIO (bind/listen failed: err says why) or MC_ENOMEM. On error
 * call mcd_server_stop() (it also stops an attached engine) and mcd_server_destroy(). */
int mcd_server_start(mcd_server_t *srv, mc_error_t *err);

/*
 * Shuts down from another thread and waits for it: stops accepting, stops the attached
 * engine on the loop thread (mc_engine_stop dispatches what is queued), then sends every
 * WebSocket client a close frame with `ws_code` (1001 at shutdown, 1012 at reload) after what
 * is already queued for it, ends SSE streams, and closes every connection once its queue is
 * written or after a few seconds. Returns mc_engine_stop()'s status (0 without an engine)
 * with err filled. Idempotent.
 */
int mcd_server_stop(mcd_server_t *srv, uint16_t ws_code, mc_error_t *err);

/* SIGHUP with TLS on and an unchanged config (cmd_run.c): re-reads server.tls's certificate
 * and key (the paths in `config`) for new connections; open connections keep theirs and
 * nothing else restarts. On error (unreadable file, key that does not match) the current
 * certificate stays and err says why. Owner's thread; safe while the loop runs. Returns 0,
 * MC_ECONFIG (also when TLS is off) or MC_ENOMEM. */
int mcd_server_tls_reload(mcd_server_t *srv, const mc_config_t *config, mc_error_t *err);

/* Frees the server (stops it first if needed). NULL-safe. */
void mcd_server_destroy(mcd_server_t *srv);

#endif
