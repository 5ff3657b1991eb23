/*
 * cli.h: what the mongocast commands share: exit codes, the option parser, signal waiting,
 * MongoDB connection helpers and the entry point of every command.
 *
 * Every command runs on the main thread. Commands that start an engine block SIGINT, SIGTERM
 * and SIGHUP in the main thread before any other thread exists (threads inherit the mask),
 * then collect them synchronously with mc_cli_wait_signal(): no code runs in signal handlers.
 */
#ifndef MONGOCAST_DAEMON_CLI_H
#define MONGOCAST_DAEMON_CLI_H

#include <mongoc/mongoc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mongocast.h"

/* Exit statuses of every command. */
#define MC_EXIT_OK 0
#define MC_EXIT_FAIL 1  /* the command ran and failed (bad config, stream failed, ...) */
#define MC_EXIT_USAGE 2 /* bad command line */

/* ---- Option parsing ------------------------------------------------------------------ */

/* One option a command accepts: "--name VALUE", "--name=VALUE" or a flag "--name". */
typedef struct mc_cli_opt {
    const char *name;  /* without the leading dashes */
    char short_name;   /* 'c' for -c, or 0 */
    bool has_arg;
    int id;            /* returned in mc_cli_parsed_t */
} mc_cli_opt_t;

#define MC_CLI_MAX_ARGS 64

typedef struct mc_cli_parsed {
    struct {
        int id;
        const char *value; /* NULL for flags */
    } opts[MC_CLI_MAX_ARGS];
    size_t n_opts;
    const char *pos[MC_CLI_MAX_ARGS]; /* positional arguments in order */
    size_t n_pos;
} mc_cli_parsed_t;

/*
 * Splits argv (the arguments after the command name) into options from `table` (terminated
 * by an entry with name NULL) and positional arguments; "--" ends the options. Returns 0, or
 * prints "mongocast CMD: <problem>" on stderr and returns MC_EXIT_USAGE (unknown option,
 * missing value, too many arguments).
 */
int mc_cli_parse(const char *cmd, int argc, char **argv, const mc_cli_opt_t *table,
                 mc_cli_parsed_t *out);

/* Prints "mongocast CMD: <message>" and "Try 'mongocast help CMD'." on stderr; returns
 * MC_EXIT_USAGE. */
int mc_cli_usage_error(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Parses a whole decimal integer in [min, max]; false on anything else. */
bool mc_cli_parse_int(const char *text, int64_t min, int64_t max, int64_t *out);

/* ---- Logging ----------------------------------------------------------------------------- */

/* Installs the stderr log handler (library and libmongoc messages) at `level`. */
void mc_cli_setup_logging(mc_log_level_t level);

/* ---- Signals ----------------------------------------------------------------------------- */

/* Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (call before starting threads) and
 * ignores SIGPIPE when `ignore_sigpipe`. */
void mc_cli_block_signals(bool ignore_sigpipe);

/* Waits up to timeout_ms for one of the blocked signals; returns its number or 0. */
int mc_cli_wait_signal(int timeout_ms);

/* ---- MongoDB ----------------------------------------------------------------------------- */

/* A client for `uri_text` whose server selection gives up after `selection_ms` unless the URI
 * sets serverSelectionTimeoutMS itself. NULL with a message in err->message on a bad URI. */
mongoc_client_t *mc_cli_client_new(const char *uri_text, int32_t selection_ms, const char *app,
                                   bson_error_t *err);

/* The URI with any password replaced by "****", for messages (bson_free it). */
char *mc_cli_redact_uri(const char *uri_text);

/* True when `name` is a usable database name (non-empty, < 64 bytes, none of / \ . " $ space). */
bool mc_cli_valid_db_name(const char *name);

/* ---- Test sinks ---------------------------------------------------------------------------- */

/* When the environment variable MONGOCAST_TEST_SINKS is "1", registers the fault-injection
 * sink types ("fault", "fault_async", mongocast/sink.h) with `engine`, so that tests can put
 * them in a config; otherwise does nothing (they stay unknown types). Returns 0 or the
 * registration error. */
int mc_cli_register_test_sinks(mc_engine_t *engine, mc_error_t *err);

/* ---- Commands ---------------------------------------------------------------------------- */

int mc_cmd_run(int argc, char **argv);
int mc_cmd_check(int argc, char **argv);
int mc_cmd_tail(int argc, char **argv);
int mc_cmd_enable_images(int argc, char **argv);

#endif
