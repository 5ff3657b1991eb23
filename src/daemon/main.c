/*
 * main.c: the mongocast command line: picks the command (run, check, tail, enable-images,
 * version, help) and prints help. Each command lives in its own cmd_*.c file.
 *
 * Main thread only. Invariants: mongoc_init() runs before any command touches libmongoc and
 * mongoc_cleanup() after it returns, once; exit statuses are MC_EXIT_OK (0), MC_EXIT_FAIL (1)
 * and MC_EXIT_USAGE (2) for every command.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "cli.h"

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *synopsis;
    const char *help;
} command_t;

static const command_t commands[] = {
    {"run", mc_cmd_run, "run -c FILE [--log-level LEVEL]",
     "Runs the daemon: watches every stream of the config and delivers its events to the\n"
     "sinks. Logs go to stderr.\n"
     "\n"
     "  -c, --config FILE    the YAML config (see docs/config.md)\n"
     "  --log-level LEVEL    error | warn | notice | info | debug | trace (overrides log_level)\n"
     "\n"
     "Signals: SIGTERM/SIGINT stop reading, drain the sinks, write the final checkpoint and\n"
     "exit 0. SIGHUP reloads the config file: an invalid file is reported and the running\n"
     "configuration stays; a valid one replaces it (streams continue from their stored\n"
     "positions).\n"},
    {"check", mc_cmd_check, "check -c FILE",
     "Validates the config (errors as FILE:LINE:COL: message), connects to MongoDB, verifies\n"
     "that it is a replica set (or sharded cluster), opens each stream's change stream once and\n"
     "verifies that pre-/post-images are enabled where a stream asks for them\n"
     "(full_document whenAvailable/required, full_document_before_change\n"
     "whenAvailable/required). Prints one line per check; exits 0 when all pass, 1 otherwise.\n"
     "\n"
     "  -c, --config FILE    the YAML config\n"
     "  --timeout-ms MS      server selection timeout (default 5000)\n"},
    {"tail", mc_cmd_tail,
     "tail URI [DB[.COLL]] [--pipeline JSON] [--full-document MODE] [--before-change MODE]\n"
     "          [--resume-after ID | --start-at SECONDS] [--raw] [--wait SECONDS]",
     "Prints each change of a collection, a database (DB) or the whole cluster (no DB) as\n"
     "one JSON line on stdout:\n"
     "  {\"type\":\"change\",\"stream\":\"tail\",\"id\":...,\"change\":{...}}\n"
     "or with --raw the change event itself in canonical Extended JSON. Progress and errors\n"
     "go to stderr. Exits 0 on SIGINT/SIGTERM, 1 when the change stream fails, when stdout\n"
     "cannot be written any more (its reader went away), or when the stream does not open\n"
     "within --wait seconds (a server that is not there).\n"
     "\n"
     "  --pipeline JSON         stages after $changeStream, a JSON array: '[{\"$match\": ...}]'\n"
     "  --full-document MODE    default | updateLookup | whenAvailable | required\n"
     "  --before-change MODE    off | whenAvailable | required\n"
     "  --resume-after ID       start after this event id (a resume token's _data)\n"
     "  --start-at SECONDS      start at this cluster time (seconds since the epoch)\n"
     "  --raw                   print the whole change event in canonical Extended JSON\n"
     "  --ready                 also print {\"type\":\"ready\"} once the stream is open\n"
     "  --on-history-lost P     fail (default) | restart\n"
     "  --max-await-ms MS       maxAwaitTimeMS of each getMore (default 1000)\n"
     "  --log-level LEVEL       stderr verbosity (default notice)\n"
     "  --wait SECONDS          give up (exit 1) when the change stream has not opened\n"
     "                          within this time (default 30; 0: wait until interrupted)\n"},
    {"enable-images", mc_cmd_enable_images, "enable-images URI DB [COLL...]",
     "Runs collMod {changeStreamPreAndPostImages: {enabled: true}} on the named collections of\n"
     "DB, or on every non-system collection of DB when none is named. Prints one line per\n"
     "collection (ok or the server's error); exits 1 if any failed.\n"},
    {"version", NULL, "version", "Prints the version of mongocast and of its libraries.\n"},
    {"help", NULL, "help [COMMAND]", "Prints this help, or the help of one command.\n"},
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static const command_t *find_command(const char *name)
{
    for (size_t i = 0; i < N_COMMANDS; i++) {
        if (strcmp(commands[i].name, name) == 0) {
            return &commands[i];
        }
    }
    return NULL;
}

static void print_usage(FILE *out)
{
    fprintf(out, "mongocast %s: MongoDB change streams as live feeds\n\nUsage:\n",
            MC_VERSION_STRING);
    for (size_t i = 0; i < N_COMMANDS; i++) {
        fprintf(out, "  mongocast %s\n", commands[i].synopsis);
    }
    fprintf(out, "\nRun 'mongocast help COMMAND' for the options of a command.\n");
}

static int cmd_help(int argc, char **argv)
{
    if (argc == 0) {
        print_usage(stdout);
        return MC_EXIT_OK;
    }
    const command_t *c = find_command(argv[0]);
    if (!c || argc > 1) {
        fprintf(stderr, "mongocast help: unknown command '%s'\n", argv[0]);
        print_usage(stderr);
        return MC_EXIT_USAGE;
    }
    printf("Usage: mongocast %s\n\n%s", c->synopsis, c->help);
    return MC_EXIT_OK;
}

static int cmd_version(int argc, char **argv)
{
    (void)argv;
    if (argc > 0) {
        return mc_cli_usage_error("version", "takes no arguments");
    }
    printf("mongocast %s (libmongoc %s, libbson %s, libuv %s)\n", MC_VERSION_STRING,
           mongoc_get_version(), bson_get_version(), uv_version_string());
    return MC_EXIT_OK;
}

static bool wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            return false;
        }
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            return true;
        }
    }
    return false;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return MC_EXIT_USAGE;
    }
    const char *name = argv[1];
    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0) {
        print_usage(stdout);
        return MC_EXIT_OK;
    }
    if (strcmp(name, "--version") == 0) {
        name = "version";
    }
    const command_t *c = find_command(name);
    if (!c) {
        fprintf(stderr, "mongocast: unknown command '%s'\n", name);
        print_usage(stderr);
        return MC_EXIT_USAGE;
    }
    if (strcmp(c->name, "help") == 0) {
        return cmd_help(argc - 2, argv + 2);
    }
    if (wants_help(argc - 2, argv + 2)) {
        char *one[] = {(char *)c->name};
        return cmd_help(1, one);
    }
    if (strcmp(c->name, "version") == 0) {
        return cmd_version(argc - 2, argv + 2);
    }
    /* libmongoc's shared-memory counters leave a /dev/shm/mongoc-PID file behind whenever the
     * process is killed, and a later process that gets the same pid logs "Falling back to
     * malloc for counters". mongocast exports its own metrics, so it does not use them. This
     * covers builds where mongoc_init() is what creates them; where libmongoc's load-time
     * constructor already did, only MONGOC_DISABLE_SHM=1 in the environment avoids the file
     * (the tests set it). */
    setenv("MONGOC_DISABLE_SHM", "1", 0);
    mongoc_init();
    /* Silence libmongoc until the command installs its handler: its own complaints while
     * parsing a URI would duplicate the error the command prints itself. */
    mongoc_log_set_handler(NULL, NULL);
    int rc = c->fn(argc - 2, argv + 2);
    mongoc_cleanup();
    return rc;
}
