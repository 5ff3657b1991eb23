/*
 * server.c: the live delivery server's lifecycle: the loop and its thread, the housekeeping
 * tick, engine dispatch on the loop, and shutdown. See server.h. The work is split by concern:
 * listener.c (accepting), conn.c (connections, queues, writes), http_routes.c (requests and
 * refusals), ws_session.c and sse_session.c (subscribers), fanout.c (streams), msg.c (shared
 * messages), metrics.c.
 *
 * Thread: the loop thread runs everything below except mcd_server_new/start/stop/destroy
 * and mcd_server_engine_opts/attach, which run on the owner's thread (stop only signals the
 * loop and joins it). The engine's watcher threads only call notify_cb (uv_async_send).
 * Invariant: after on_stop the loop accepts nothing, and it ends once every connection is
 * closed (each within linger_ms).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "server_internal.h"

#define READ_BUF_SIZE 65536
#define DISPATCH_BUDGET 1024 /* events per loop pass before I/O gets a turn */
#define HTTP_ONLY_ROOM 256   /* connections beyond max_connections for plain HTTP */

static const mcd_timing_t default_timing = {
    .ping_ms = 25000,
    .pong_ms = 10000,
    .sse_ms = 15000,
    .request_ms = 10000,
    .idle_ms = 60000,
    .linger_ms = 3000,
    .tick_ms = 1000,
};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void flush_cb(uv_check_t *h)
{
    mcd_server_t *srv = h->data;
    mcd_snapshots_pump(srv->snapshots); /* batches the connections have room for now */
    mcd_catchups_pump(srv->catchups);   /* catch-up events, joins, limits */
    mcd_conn_flush_dirty(&srv->table);
    mcd_listener_pass(srv);
}

/* ---- Timers -----------------------------------------------------------------------------------
 */

static void close_server_handles(mcd_server_t *srv)
{
    uv_close((uv_handle_t *)&srv->tick, NULL);
    uv_close((uv_handle_t *)&srv->flush_check, NULL);
    uv_close((uv_handle_t *)&srv->dispatch_async, NULL);
    uv_close((uv_handle_t *)&srv->stop_async, NULL);
}

static void on_tick(uv_timer_t *t)
{
    mcd_server_t *srv = t->data;
    int64_t now = (int64_t)uv_now(&srv->loop);
    int64_t wall_s = wall_ms() / 1000;
    for (uint32_t i = srv->table.n_conns; i-- > 0;) {
        mcd_conn_t *c = srv->table.conns[i];
        mcd_conn_trim(c);
        switch (c->state) {
        case MCD_ST_HTTP: mcd_http_session_tick(c, now); break;
        case MCD_ST_WS: mcd_ws_session_tick(c, now, wall_s); break;
        case MCD_ST_SSE: mcd_sse_session_tick(c, now, wall_s); break;
        case MCD_ST_CLOSING:
            if (now >= c->deadline_ms) {
                mcd_conn_abort(c);
            }
            break;
        }
    }
    mcd_conn_table_trim(&srv->table);
    if (srv->stopping && srv->table.n_conns == 0 && !srv->stopped) {
        srv->stopped = true;
        close_server_handles(srv);
    }
}

/* ---- Engine dispatch and stop ------------------------------------------------------------------
 */

static void on_dispatch(uv_async_t *a)
{
    mcd_server_t *srv = a->data;
    if (!srv->engine || srv->engine_stopped) {
        return;
    }
    size_t n = mc_engine_dispatch(srv->engine, DISPATCH_BUDGET);
    if (n >= DISPATCH_BUDGET) {
        /* The engine only notifies on empty -> non-empty: come back for the rest after this
         * pass's I/O. */
        uv_async_send(&srv->dispatch_async);
    }
}

static void notify_cb(mc_engine_t *engine, void *userdata)
{
    (void)engine;
    mcd_server_t *srv = userdata;
    uv_async_send(&srv->dispatch_async);
}

static void on_stop(uv_async_t *a)
{
    mcd_server_t *srv = a->data;
    if (srv->stopping) {
        return;
    }
    srv->stopping = true;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    if (srv->engine && !srv->engine_stopped) {
        /* On this thread: the loop is the engine's dispatch thread. What is still queued is
         * dispatched into the subscribers' queues before their close frames. */
        srv->engine_rc = mc_engine_stop(srv->engine, &srv->engine_err);
        srv->engine_stopped = true;
    }
    const char *reason =
        srv->stop_code == MCD_WS_CLOSE_RESTART ? "server restarting" : "server shutting down";
    for (uint32_t i = srv->table.n_conns; i-- > 0;) {
        mcd_conn_t *c = srv->table.conns[i];
        switch (c->state) {
        case MCD_ST_HTTP:
            if (!c->n_writes && !c->q_len) {
                mcd_conn_abort(c);
            } else {
                mcd_conn_linger(c);
            }
            break;
        case MCD_ST_WS:
        case MCD_ST_SSE: mcd_conn_close(c, srv->stop_code, reason, false); break;
        default: break;
        }
    }
    mcd_snapshots_close(srv->snapshots);
    mcd_catchups_close(srv->catchups);
    uv_timer_start(&srv->tick, on_tick, 20, 20);
}

/* ---- Lifecycle --------------------------------------------------------------------------------
 */

static void parse_test_timing(mcd_timing_t *t)
{
    const char *env = getenv("MONGOCAST_TEST_TIMING");
    if (!env || !*env) {
        return;
    }
    static const struct {
        const char *name;
        size_t off;
    } keys[] = {
        {"ping_ms", offsetof(mcd_timing_t, ping_ms)},
        {"pong_ms", offsetof(mcd_timing_t, pong_ms)},
        {"sse_ms", offsetof(mcd_timing_t, sse_ms)},
        {"request_ms", offsetof(mcd_timing_t, request_ms)},
        {"idle_ms", offsetof(mcd_timing_t, idle_ms)},
        {"linger_ms", offsetof(mcd_timing_t, linger_ms)},
        {"tick_ms", offsetof(mcd_timing_t, tick_ms)},
    };
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", env);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) {
            continue;
        }
        *eq = '\0';
        char *end = NULL;
        unsigned long v = strtoul(eq + 1, &end, 10);
        if (*end || v == 0 || v > 3600000) {
            continue;
        }
        for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
            if (strcmp(tok, keys[k].name) == 0) {
                *(uint32_t *)((char *)t + keys[k].off) = (uint32_t)v;
            }
        }
    }
    mc_log(MC_LOG_WARN, "server",
           "MONGOCAST_TEST_TIMING is set (test-only): ping_ms=%u pong_ms=%u sse_ms=%u tick_ms=%u",
           t->ping_ms, t->pong_ms, t->sse_ms, t->tick_ms);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t old = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0) {
            mc_log(MC_LOG_INFO, "server", "raised open-file limit from %lu to %lu",
                   (unsigned long)old, (unsigned long)rl.rlim_max);
        }
    }
}

/* server.threads: the configured number, or the online cores (at most 64). */
static unsigned send_threads(const mc_config_t *config)
{
    if (config->server.threads) {
        return config->server.threads;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MCD_SENDPOOL_MAX_THREADS ? MCD_SENDPOOL_MAX_THREADS : (unsigned)n;
}

/* server.threads > 1: the table's sends go through a pool of that many senders, each with its
 * own io_uring when server.io allows it (else sendmsg). Returns 0, MC_ECONFIG (uring refused)
 * or MC_ENOMEM. */
static int setup_pool(mcd_server_t *srv, mcd_io_mode_t mode, mc_error_t *err)
{
    unsigned threads = srv->threads;
    mcd_sendpool_t *pool = NULL;
    mc_error_t why = {0};
    int rc = MC_EIO;
    if (mode != MCD_IO_WRITEV) {
        rc = mcd_sendpool_new(&pool, threads, true, srv->table.max_conns, &why);
        if (rc != 0 && rc != MC_EIO) {
            return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "%s", why.message);
        }
        if (rc != 0 && mode == MCD_IO_URING) {
            return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                                "server.io: uring, but io_uring is not available here (%s)",
                                why.message);
        }
    }
    bool uring = rc == 0;
    if (!uring) {
        mc_error_t e2;
        rc = mcd_sendpool_new(&pool, threads, false, srv->table.max_conns, &e2);
        if (rc != 0) {
            return mc_error_set(err, rc, MC_DOMAIN_MONGOCAST, rc, "%s", e2.message);
        }
    }
    unsigned room = mcd_sendpool_room(pool);
    if (mcd_conn_table_use_pool(&srv->table, pool) != 0) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    if (uring) {
        snprintf(srv->io_note, sizeof(srv->io_note),
                 "socket writes: io_uring on %u send threads, up to %u sends per pass "
                 "(server.io: %s, server.threads: %u)",
                 threads, room, mode == MCD_IO_URING ? "uring" : "auto", threads);
    } else if (mode == MCD_IO_WRITEV) {
        snprintf(srv->io_note, sizeof(srv->io_note),
                 "socket writes: sendmsg on %u send threads (server.io: writev, "
                 "server.threads: %u)",
                 threads, threads);
    } else {
        srv->io_note_warn = true;
        snprintf(srv->io_note, sizeof(srv->io_note),
                 "socket writes: sendmsg on %u send threads, io_uring is not available here (%s)",
                 threads, why.message);
    }
    return 0;
}

/* server.io: io_uring for the table's writes when the kernel allows it (auto, uring), else
 * writev; uring refuses to start without it. Decided once, here; the choice is logged when the
 * server starts (a config that fails later, e.g. on a sink, then prints only its error). */
static int setup_io(mcd_server_t *srv, mc_error_t *err)
{
    mcd_io_mode_t mode = mcd_io_mode_parse(srv->config->server.io);
    srv->threads = send_threads(srv->config);
    if (srv->threads > 1) {
        return setup_pool(srv, mode, err);
    }
    if (mode == MCD_IO_WRITEV) {
        snprintf(srv->io_note, sizeof(srv->io_note), "socket writes: writev (server.io: writev)");
        return 0;
    }
    mcd_sendring_t *ring = NULL;
    mc_error_t why;
    int rc = mcd_sendring_new(&ring, srv->table.max_conns, &why);
    if (rc == 0) {
        rc = mcd_conn_table_use_ring(&srv->table, ring);
        if (rc != 0) {
            mc_error_set(&why, rc, MC_DOMAIN_MONGOCAST, rc, "out of memory");
        }
    }
    if (rc == 0) {
        snprintf(srv->io_note, sizeof(srv->io_note),
                 "socket writes: io_uring, up to %u sends per submission (server.io: %s)",
                 mcd_sendring_room(srv->table.ring), mode == MCD_IO_URING ? "uring" : "auto");
        return 0;
    }
    if (mode == MCD_IO_URING) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "server.io: uring, but io_uring is not available here (%s)",
                            why.message);
    }
    srv->io_note_warn = true;
    snprintf(srv->io_note, sizeof(srv->io_note),
             "socket writes: writev, io_uring is not available here (%s)", why.message);
    return 0;
}

mcd_server_t *mcd_server_new(const mc_config_t *config, mc_error_t *err)
{
    mcd_server_t *srv = calloc(1, sizeof(*srv));
    if (!srv) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    /* A peer that disappears mid-write must cost an EPIPE, not the process. */
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    srv->config = config;
    srv->timing = default_timing;
    parse_test_timing(&srv->timing);
    srv->max_subscribers = config->server.max_connections ? config->server.max_connections : 10000;
    uint32_t max_queue =
        config->server.max_send_queue_bytes ? config->server.max_send_queue_bytes : 1048576;
    srv->rbuf_len = READ_BUF_SIZE;
    srv->rbuf = malloc(srv->rbuf_len);
    if (!srv->rbuf ||
        mcd_conn_table_init(&srv->table, srv->max_subscribers + HTTP_ONLY_ROOM,
                            config->server.max_connections_per_address, max_queue,
                            srv->timing.linger_ms) != 0 ||
        mcd_fanout_init(&srv->fanout, config) != 0) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        goto fail_early;
    }
    if (setup_io(srv, err) != 0) {
        goto fail_early;
    }
    if (config->server.tls.enabled && mcd_tls_ctx_new(config, &srv->tls, err) != 0) {
        goto fail_early;
    }
    srv->auth = mcd_auth_new(config, err);
    if (!srv->auth) {
        goto fail_early;
    }
    if (uv_loop_init(&srv->loop) != 0) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "cannot create event loop");
        goto fail_early;
    }
    srv->loop_ready = true;
    uv_tcp_init(&srv->loop, &srv->listener);
    uv_async_init(&srv->loop, &srv->dispatch_async, on_dispatch);
    uv_async_init(&srv->loop, &srv->stop_async, on_stop);
    uv_timer_init(&srv->loop, &srv->tick);
    uv_check_init(&srv->loop, &srv->flush_check);
    srv->listener.data = srv;
    srv->dispatch_async.data = srv;
    srv->stop_async.data = srv;
    srv->tick.data = srv;
    srv->flush_check.data = srv;

    const char *listen = config->server.listen ? config->server.listen : "127.0.0.1:8080";
    if (mcd_listener_parse(listen, &srv->listen_addr) != 0) {
        mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                     "server.listen: cannot parse '%s' (HOST:PORT)", listen);
        goto fail_loop;
    }
    srv->snapshots = mcd_snapshots_new(&srv->loop, config);
    srv->catchups = srv->snapshots ? mcd_catchups_new(&srv->loop, config, srv->snapshots) : NULL;
    if (!srv->snapshots || !srv->catchups) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        goto fail_loop;
    }
    uv_timer_start(&srv->tick, on_tick, srv->timing.tick_ms, srv->timing.tick_ms);
    uv_check_start(&srv->flush_check, flush_cb);
    return srv;

fail_loop:
    /* Nothing ran yet: close the handles and let the loop finish them. */
    srv->stopping = true;
    srv->stopped = true;
    uv_close((uv_handle_t *)&srv->listener, NULL);
    close_server_handles(srv);
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    uv_loop_close(&srv->loop);
    srv->loop_ready = false;
fail_early:
    mcd_fanout_cleanup(&srv->fanout);
    mcd_auth_destroy(srv->auth);
    mcd_conn_table_cleanup(&srv->table);
    mcd_tls_ctx_destroy(srv->tls);
    free(srv->rbuf);
    free(srv);
    return NULL;
}

int mcd_server_port(const mcd_server_t *srv)
{
    return srv->port;
}

void mcd_server_engine_opts(mcd_server_t *srv, mc_engine_opts_t *opts)
{
    opts->notify = notify_cb;
    opts->notify_userdata = srv;
}

int mcd_server_attach(mcd_server_t *srv, mc_engine_t *engine, mc_error_t *err)
{
    int rc = mc_engine_add_sink(engine, &mcd_fanout_sink_type, "live-clients", NULL, 0, NULL,
                                &srv->fanout, err);
    if (rc == 0) {
        srv->engine = engine;
        srv->fanout.engine = engine;
    }
    return rc;
}

static void *loop_main(void *arg)
{
    mcd_server_t *srv = arg;
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    return NULL;
}

int mcd_server_start(mcd_server_t *srv, mc_error_t *err)
{
    if (srv->thread_started) {
        return 0;
    }
    mc_log(srv->io_note_warn ? MC_LOG_WARN : MC_LOG_INFO, "server", "%s", srv->io_note);
    int rc = mcd_listener_bind(srv, err);
    if (rc != 0) {
        return rc;
    }
    if (pthread_create(&srv->thread, NULL, loop_main, srv) != 0) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno,
                            "cannot start the server thread");
    }
    srv->thread_started = true;
    return 0;
}

int mcd_server_stop(mcd_server_t *srv, uint16_t ws_code, mc_error_t *err)
{
    if (!srv || !srv->loop_ready) {
        return 0;
    }
    if (!srv->stopped || srv->thread_started) {
        srv->stop_code = ws_code ? ws_code : MCD_WS_CLOSE_GOING_AWAY;
        if (srv->thread_started) {
            uv_async_send(&srv->stop_async);
            pthread_join(srv->thread, NULL);
            srv->thread_started = false;
            /* Catch-up reads use the engine: they end before the caller destroys it. */
            mcd_snapshots_join(srv->snapshots);
        } else {
            /* Never started: the caller's thread plays the loop thread for the shutdown. */
            uv_async_send(&srv->stop_async);
            uv_run(&srv->loop, UV_RUN_DEFAULT);
        }
    }
    if (srv->engine_rc != 0 && err) {
        *err = srv->engine_err;
    }
    return srv->engine_rc;
}

int mcd_server_tls_reload(mcd_server_t *srv, const mc_config_t *config, mc_error_t *err)
{
    if (!srv->tls) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG,
                            "server.tls is not configured");
    }
    int rc = mcd_tls_ctx_reload(srv->tls, config, err);
    if (rc == 0) {
        char what[512];
        mcd_tls_ctx_describe(srv->tls, what, sizeof(what));
        mc_log(MC_LOG_NOTICE, "server", "TLS certificate reloaded for new connections: %s", what);
    }
    return rc;
}

void mcd_server_destroy(mcd_server_t *srv)
{
    if (!srv) {
        return;
    }
    if (srv->loop_ready) {
        mcd_server_stop(srv, MCD_WS_CLOSE_GOING_AWAY, NULL);
        uv_loop_close(&srv->loop);
    }
    mcd_snapshots_destroy(srv->snapshots); /* after the loop: joins the workers */
    mcd_catchups_destroy(srv->catchups);   /* after the workers */
    mcd_fanout_cleanup(&srv->fanout);
    mcd_auth_destroy(srv->auth);
    mcd_conn_table_cleanup(&srv->table);
    mcd_tls_ctx_destroy(srv->tls); /* after the loop: every connection is closed */
    free(srv->metrics_text);
    free(srv->rbuf);
    free(srv);
}
