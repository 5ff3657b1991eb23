/*
 * cli.c: helpers shared by the mongocast commands: the option parser, usage errors, logging
 * setup, synchronous signal handling and MongoDB client creation.
 *
 * Main thread only, except that the log handler it installs is called from any thread.
 * Invariants: signals are never handled asynchronously; after mc_cli_block_signals() the
 * process-directed SIGINT/SIGTERM/SIGHUP stay pending until mc_cli_wait_signal() takes them,
 * because every thread started later inherits the blocked mask.
 */
#include "cli.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int mc_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "mongocast %s: %s\nTry 'mongocast help %s'.\n", cmd, msg, cmd);
    return MC_EXIT_USAGE;
}

static const mc_cli_opt_t *find_long(const mc_cli_opt_t *table, const char *name, size_t len)
{
    for (const mc_cli_opt_t *o = table; o && o->name; o++) {
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0) {
            return o;
        }
    }
    return NULL;
}

static const mc_cli_opt_t *find_short(const mc_cli_opt_t *table, char c)
{
    for (const mc_cli_opt_t *o = table; o && o->name; o++) {
        if (o->short_name && o->short_name == c) {
            return o;
        }
    }
    return NULL;
}

int mc_cli_parse(const char *cmd, int argc, char **argv, const mc_cli_opt_t *table,
                 mc_cli_parsed_t *out)
{
    memset(out, 0, sizeof(*out));
    bool only_positional = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (only_positional || a[0] != '-' || a[1] == '\0') {
            if (out->n_pos >= MC_CLI_MAX_ARGS) {
                return mc_cli_usage_error(cmd, "too many arguments");
            }
            out->pos[out->n_pos++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_positional = true;
            continue;
        }
        const mc_cli_opt_t *o;
        const char *inline_value = NULL;
        if (a[1] == '-') {
            const char *name = a + 2;
            const char *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            o = find_long(table, name, len);
            if (!o) {
                return mc_cli_usage_error(cmd, "unknown option '--%.*s'", (int)len, name);
            }
            inline_value = eq ? eq + 1 : NULL;
        } else {
            if (a[2] != '\0') {
                return mc_cli_usage_error(cmd, "unknown option '%s'", a);
            }
            o = find_short(table, a[1]);
            if (!o) {
                return mc_cli_usage_error(cmd, "unknown option '%s'", a);
            }
        }
        if (out->n_opts >= MC_CLI_MAX_ARGS) {
            return mc_cli_usage_error(cmd, "too many options");
        }
        const char *value = NULL;
        if (o->has_arg) {
            if (inline_value) {
                value = inline_value;
            } else if (i + 1 < argc) {
                value = argv[++i];
            } else {
                return mc_cli_usage_error(cmd, "option '--%s' needs a value", o->name);
            }
        } else if (inline_value) {
            return mc_cli_usage_error(cmd, "option '--%s' takes no value", o->name);
        }
        out->opts[out->n_opts].id = o->id;
        out->opts[out->n_opts].value = value;
        out->n_opts++;
    }
    return 0;
}

bool mc_cli_parse_int(const char *text, int64_t min, int64_t max, int64_t *out)
{
    if (!text || !*text) {
        return false;
    }
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || !end || *end != '\0' || v < min || v > max) {
        return false;
    }
    *out = (int64_t)v;
    return true;
}

void mc_cli_setup_logging(mc_log_level_t level)
{
    mc_log_set_level(level);
    mc_log_set_handler(mc_log_stderr_handler, NULL);
    mc_log_capture_mongoc();
}

void mc_cli_block_signals(bool ignore_sigpipe)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (ignore_sigpipe) {
        /* Sinks and (later) the HTTP server get EPIPE instead of dying with the process. */
        signal(SIGPIPE, SIG_IGN);
    }
}

int mc_cli_wait_signal(int timeout_ms)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
    int sig = sigtimedwait(&set, NULL, &ts);
    return sig > 0 ? sig : 0;
}

mongoc_client_t *mc_cli_client_new(const char *uri_text, int32_t selection_ms, const char *app,
                                   bson_error_t *err)
{
    mongoc_uri_t *uri = mongoc_uri_new_with_error(uri_text, err);
    if (!uri) {
        return NULL;
    }
    const bson_t *given = mongoc_uri_get_options(uri);
    if (!given || !bson_has_field(given, MONGOC_URI_SERVERSELECTIONTIMEOUTMS)) {
        mongoc_uri_set_option_as_int32(uri, MONGOC_URI_SERVERSELECTIONTIMEOUTMS, selection_ms);
    }
    if (app && !mongoc_uri_get_appname(uri)) {
        mongoc_uri_set_appname(uri, app);
    }
    mongoc_client_t *client = mongoc_client_new_from_uri_with_error(uri, err);
    mongoc_uri_destroy(uri);
    if (client) {
        mongoc_client_set_error_api(client, MONGOC_ERROR_API_VERSION_2);
    }
    return client;
}

char *mc_cli_redact_uri(const char *uri_text)
{
    /* mongodb://user:secret@host -> mongodb://user:****@host. Only the userinfo part before
     * the first '@' of the authority can hold a password. */
    const char *scheme_end = strstr(uri_text, "://");
    if (!scheme_end) {
        return bson_strdup(uri_text);
    }
    const char *auth = scheme_end + 3;
    const char *slash = strchr(auth, '/');
    const char *at = strchr(auth, '@');
    if (!at || (slash && at > slash)) {
        return bson_strdup(uri_text);
    }
    const char *colon = memchr(auth, ':', (size_t)(at - auth));
    if (!colon) {
        return bson_strdup(uri_text);
    }
    return bson_strdup_printf("%.*s****%s", (int)(colon + 1 - uri_text), uri_text, at);
}

bool mc_cli_valid_db_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 63) {
        return false;
    }
    return strpbrk(name, "/\\.\" $") == NULL;
}

int mc_cli_register_test_sinks(mc_engine_t *engine, mc_error_t *err)
{
    const char *on = getenv("MONGOCAST_TEST_SINKS");
    if (!engine || !on || strcmp(on, "1") != 0) {
        return 0;
    }
    int rc = mc_engine_register_sink_type(engine, mc_sink_fault_type(), err);
    if (rc == 0) {
        rc = mc_engine_register_sink_type(engine, mc_sink_fault_async_type(), err);
    }
    return rc;
}
