/*
 * cmd_run.c: `mongocast run -c FILE`: loads the config, runs an engine and the live delivery
 * server (HTTP/WebSocket/SSE, server.c) for it, reloads both on SIGHUP and drains them on
 * SIGTERM/SIGINT.
 *
 * Threads: the main thread owns the config, the engine and the server and does every
 * lifecycle call, including mc_engine_stop(); the engine runs its watcher, sink-runner,
 * I/O-loop and checkpoint threads, and the server's libuv loop thread runs only the live
 * fan-out (external dispatch: the engine's notify hook wakes the loop, which calls
 * mc_engine_dispatch()). The fault-injection sink types are registered when
 * MONGOCAST_TEST_SINKS=1 (tests only).
 * Signals are blocked before any thread starts and taken synchronously by the main loop
 * (sigtimedwait), so no work happens in a signal handler. During the final drain a small
 * watchdog thread waits for a second SIGTERM/SIGINT and then exits at once (an operator's
 * "really stop now").
 *
 * Shutdown (SIGTERM/SIGINT): mc_engine_stop() on the main thread (what was read is
 * delivered, sinks drain, final checkpoint; the loop keeps running meanwhile), then
 * mcd_server_stop() closes every WebSocket client with 1001 after what was queued for it and
 * ends SSE streams; the process exits 0.
 *
 * Reload (SIGHUP): the new config is checked first, its server.tls certificate and key
 * included (an invalid one never stops anything). With TLS on and a config file identical to
 * the running one, only the certificate and key are re-read (certificate rotation): new
 * connections get the new one, open connections keep going on theirs, nothing restarts.
 * Otherwise the server and the engine are both stopped (WebSocket clients get 1012 "server
 * restarting", so they reconnect; the resume history is per run and starts empty) and a new
 * server and engine start from the new config, listening on its server.listen. If they fail
 * to start, the previous config is started again.
 *
 * Invariants: at most one engine and one server run at a time; a reload stops the old engine
 * (which writes its final checkpoint) before the new one starts, so the new one resumes every
 * stream from its stored position. The config an engine and a server run outlives them (both
 * borrow it).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "server.h"
#include "tls.h"

enum { OPT_CONFIG = 1, OPT_LOG_LEVEL };

static const mc_cli_opt_t run_opts[] = {
    {"config", 'c', true, OPT_CONFIG},
    {"log-level", 0, true, OPT_LOG_LEVEL},
    {NULL, 0, false, 0},
};

typedef struct daemon_state {
    const char *config_path;
    bool cli_level_set;
    mc_log_level_t cli_level;
    mc_config_t *config;
    char *config_text; /* the file's bytes when `config` was loaded (NULL: unreadable) */
    mc_engine_t *engine;
    mcd_server_t *server;
} daemon_state_t;

static void apply_log_level(const daemon_state_t *d, const mc_config_t *cfg)
{
    mc_log_level_t level = MC_LOG_INFO;
    if (d->cli_level_set) {
        level = d->cli_level;
    } else if (cfg && cfg->log_level) {
        /* The loader only accepts known names, so a parse failure keeps the default. */
        mc_log_level_parse(cfg->log_level, &level);
    }
    mc_log_set_level(level);
}

/* Creates the server (binding server.listen) and an engine dispatched on its loop, and
 * starts both. On failure nothing keeps running and err says why. */
static int start_runtime(const mc_config_t *cfg, mcd_server_t **server_out,
                         mc_engine_t **engine_out, mc_error_t *err)
{
    mcd_server_t *server = mcd_server_new(cfg, err);
    if (!server) {
        return -1;
    }
    mc_engine_opts_t opts;
    memset(&opts, 0, sizeof(opts));
    opts.app_name = "mongocast";
    mcd_server_engine_opts(server, &opts);
    mc_engine_t *engine = mc_engine_new(cfg, &opts, err);
    if (!engine || mc_cli_register_test_sinks(engine, err) != 0 ||
        mcd_server_attach(server, engine, err) != 0 || mc_engine_start(engine, err) != 0 ||
        mcd_server_start(server, err) != 0) {
        /* Stops the engine too when it did start (on this thread: the loop never ran). */
        mcd_server_stop(server, 1001, NULL);
        mc_engine_destroy(engine);
        mcd_server_destroy(server);
        return -1;
    }
    *server_out = server;
    *engine_out = engine;
    return 0;
}

/* Stops and frees the running server and engine; returns the mc_engine_stop() status. The
 * engine stops first, on this thread: its runners drain and its final checkpoint is written
 * while the loop keeps serving sockets and dispatching what is left for the live fan-out;
 * then the server closes its clients after the last events. */
static int stop_runtime(daemon_state_t *d, const char *why, uint16_t ws_code)
{
    mc_error_t err;
    mc_error_clear(&err);
    mc_log(MC_LOG_NOTICE, "daemon", "stopping engine (%s): draining sinks, final checkpoint",
           why);
    int rc = mc_engine_stop(d->engine, &err);
    mcd_server_stop(d->server, ws_code, NULL);
    if (rc == MC_EAGAIN) {
        mc_log(MC_LOG_WARN, "daemon",
               "sinks did not drain in time; positions stored up to what was acknowledged: %s",
               err.message);
    } else if (rc != 0) {
        mc_log(MC_LOG_ERROR, "daemon", "final checkpoint failed: %s", err.message);
    }
    mc_engine_destroy(d->engine);
    mcd_server_destroy(d->server);
    d->engine = NULL;
    d->server = NULL;
    return rc;
}

/* Recipient lint (mc_stream_config_lint), once per start: the same warnings `check` prints. */
static void lint_warning(const mc_stream_config_t *stream, size_t stage, const char *op,
                         const char *message, void *userdata)
{
    (void)stage;
    (void)op;
    (void)userdata;
    mc_log(MC_LOG_WARN, "config", "stream %s: %s", stream->name, message);
}

/* Counts every sink instance the engine runs (the config's and the live fan-out), as the
 * engine's own "started" line does, and names them. */
static void log_started(const daemon_state_t *d, const char *what)
{
    const mc_config_t *cfg = d->config;
    for (size_t i = 0; i < cfg->n_streams; i++) {
        mc_stream_config_lint(&cfg->streams[i], lint_warning, NULL);
    }
    char names[512] = "";
    size_t used = 0, n = d->engine ? mc_engine_sink_count(d->engine) : 0;
    for (size_t i = 0; i < n; i++) {
        mc_sink_stats_t st;
        if (mc_engine_sink_stats(d->engine, i, &st) != 0 || used >= sizeof(names)) {
            continue;
        }
        int w = snprintf(names + used, sizeof(names) - used, "%s%s", i ? "," : "", st.name);
        used += w > 0 ? (size_t)w : 0;
    }
    mc_log(MC_LOG_NOTICE, "daemon", "%s config=%s streams=%zu sinks=%zu (%s) pid=%ld", what,
           cfg->path ? cfg->path : "?", cfg->n_streams, n, names, (long)getpid());
}

#define MAX_CONFIG_TEXT (16u << 20)

/* The whole file as a NUL-terminated string, or NULL (not a regular file, unreadable, larger
 * than 16 MiB). Only compared with a later read: does a reload change anything but the TLS
 * files? O_NONBLOCK: a FIFO put in the file's place must not block the main thread. */
static char *read_config_text(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        return NULL;
    }
    struct stat st;
    char *buf = NULL;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= (off_t)MAX_CONFIG_TEXT) {
        buf = malloc(MAX_CONFIG_TEXT + 1);
    }
    size_t n = 0;
    while (buf && n <= MAX_CONFIG_TEXT) {
        ssize_t r = read(fd, buf + n, MAX_CONFIG_TEXT + 1 - n);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            free(buf);
            buf = NULL;
        }
        if (r <= 0) {
            break;
        }
        n += (size_t)r;
    }
    close(fd);
    if (buf && n > MAX_CONFIG_TEXT) {
        free(buf);
        buf = NULL;
    }
    if (buf) {
        buf[n] = '\0';
    }
    return buf;
}

/* SIGHUP with TLS on and the config file unchanged: new certificate for new connections,
 * everything else keeps running. */
static void reload_tls_only(daemon_state_t *d, mc_config_t *cfg)
{
    mc_error_t err;
    mc_error_clear(&err);
    if (mcd_server_tls_reload(d->server, cfg, &err) != 0) {
        mc_log(MC_LOG_ERROR, "daemon",
               "TLS reload refused, keeping the running certificate and configuration: %s",
               err.message);
    } else {
        mc_log(MC_LOG_NOTICE, "daemon",
               "reloaded TLS certificate only (config unchanged); open connections keep theirs");
    }
    mc_config_destroy(cfg);
}

/* SIGHUP: replace the running engine by one for the file's current content, or keep the
 * running one when the file is not usable. Returns false only when nothing runs any more. */
static bool reload(daemon_state_t *d)
{
    mc_error_t err;
    mc_error_clear(&err);
    mc_log(MC_LOG_NOTICE, "daemon", "SIGHUP: reloading %s", d->config_path);
    mc_config_t *cfg = mc_config_load_file(d->config_path, &err);
    if (!cfg) {
        mc_log(MC_LOG_ERROR, "daemon", "reload failed, keeping the running configuration: %s",
               err.message);
        return true;
    }
    /* Check the new config before stopping anything (the engine checks streams, sinks and
     * pipelines; the server's own settings are checked when it starts). */
    mc_engine_t *probe = mc_engine_new(cfg, NULL, &err);
    if (!probe) {
        mc_log(MC_LOG_ERROR, "daemon", "reload failed, keeping the running configuration: %s",
               err.message);
        mc_config_destroy(cfg);
        return true;
    }
    mc_engine_destroy(probe);
    char *text = read_config_text(d->config_path);
    if (cfg->server.tls.enabled && d->config->server.tls.enabled && text && d->config_text &&
        strcmp(text, d->config_text) == 0) {
        free(text);
        reload_tls_only(d, cfg);
        return true;
    }
    if (mcd_tls_check(cfg, &err) != 0) {
        mc_log(MC_LOG_ERROR, "daemon", "reload failed, keeping the running configuration: %s",
               err.message);
        free(text);
        mc_config_destroy(cfg);
        return true;
    }
    stop_runtime(d, "reload", 1012);
    apply_log_level(d, cfg);
    if (start_runtime(cfg, &d->server, &d->engine, &err) == 0) {
        mc_config_destroy(d->config);
        d->config = cfg;
        free(d->config_text);
        d->config_text = text;
        log_started(d, "reloaded");
        return true;
    }
    mc_log(MC_LOG_ERROR, "daemon",
           "the new configuration failed to start (%s); going back to the previous one",
           err.message);
    mc_config_destroy(cfg);
    free(text);
    apply_log_level(d, d->config);
    mc_error_clear(&err);
    if (start_runtime(d->config, &d->server, &d->engine, &err) != 0) {
        mc_log(MC_LOG_ERROR, "daemon", "cannot restart the previous configuration: %s",
               err.message);
        return false;
    }
    log_started(d, "restarted");
    return true;
}

static void *second_signal_watchdog(void *arg)
{
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    int sig = 0;
    if (sigwait(&set, &sig) == 0) {
        static const char msg[] = "mongocast: second signal during shutdown, exiting now\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof(msg) - 1);
        (void)w;
        _exit(MC_EXIT_FAIL);
    }
    return NULL;
}

int mc_cmd_run(int argc, char **argv)
{
    mc_cli_parsed_t p;
    int rc = mc_cli_parse("run", argc, argv, run_opts, &p);
    if (rc != 0) {
        return rc;
    }
    daemon_state_t d;
    memset(&d, 0, sizeof(d));
    for (size_t i = 0; i < p.n_opts; i++) {
        if (p.opts[i].id == OPT_CONFIG) {
            d.config_path = p.opts[i].value;
        } else if (p.opts[i].id == OPT_LOG_LEVEL) {
            if (mc_log_level_parse(p.opts[i].value, &d.cli_level) != 0) {
                return mc_cli_usage_error("run",
                                          "unknown log level '%s' (error, warn, notice, info, "
                                          "debug, trace)",
                                          p.opts[i].value);
            }
            d.cli_level_set = true;
        }
    }
    if (p.n_pos > 0) {
        return mc_cli_usage_error("run", "unexpected argument '%s'", p.pos[0]);
    }
    if (!d.config_path) {
        return mc_cli_usage_error("run", "a config file is required: -c FILE");
    }

    mc_error_t err;
    mc_error_clear(&err);
    d.config = mc_config_load_file(d.config_path, &err);
    if (!d.config) {
        fprintf(stderr, "%s\n", err.message);
        return MC_EXIT_FAIL;
    }
    d.config_text = read_config_text(d.config_path);
    mc_cli_setup_logging(MC_LOG_INFO);
    apply_log_level(&d, d.config);
    /* Before the engine spawns its threads, so that they all inherit the blocked mask. */
    mc_cli_block_signals(true);

    if (start_runtime(d.config, &d.server, &d.engine, &err) != 0) {
        if (err.code == MC_ECONFIG) {
            /* Same form as a loader error: FILE:LINE:COL: message, nothing else. */
            fprintf(stderr, "%s\n", err.message);
        } else {
            mc_log(MC_LOG_ERROR, "daemon", "cannot start: %s", err.message);
        }
        mc_config_destroy(d.config);
        free(d.config_text);
        return MC_EXIT_FAIL;
    }
    log_started(&d, "running");

    int status = MC_EXIT_OK;
    for (;;) {
        int sig = mc_cli_wait_signal(1000);
        if (sig == 0) {
            continue;
        }
        if (sig == SIGHUP) {
            if (!reload(&d)) {
                status = MC_EXIT_FAIL;
                break;
            }
            continue;
        }
        pthread_t watchdog;
        if (pthread_create(&watchdog, NULL, second_signal_watchdog, NULL) == 0) {
            pthread_detach(watchdog);
        }
        /* A drain timeout still stored every acknowledged position: a clean stop. A failed
         * checkpoint write did not, and the operator must know. */
        if (stop_runtime(&d, sig == SIGINT ? "SIGINT" : "SIGTERM", 1001) == MC_EIO) {
            status = MC_EXIT_FAIL;
        }
        break;
    }
    mc_config_destroy(d.config);
    free(d.config_text);
    mc_log(MC_LOG_NOTICE, "daemon", "stopped");
    mc_log_set_handler(NULL, NULL);
    return status;
}
