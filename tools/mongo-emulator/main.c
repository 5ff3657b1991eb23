/*
 * main.c: the mongo-emulator command line: parse options, start the server, print the
 * "listening" line tests wait for, and wait for SIGINT/SIGTERM.
 *
 * Main thread only. SIGINT, SIGTERM (and SIGPIPE) are blocked before any thread starts, so
 * every thread inherits the mask and the main thread alone receives them through sigwait;
 * no code runs in a signal handler.
 */
#include "core.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *out)
{
    fprintf(out,
            "usage: mongo-emulator --port P [options]\n"
            "\n"
            "An in-memory MongoDB 6.0/7.0 single-node replica set for tests (wire protocol,\n"
            "CRUD, indexes, change streams, fail points). Never a database for real data.\n"
            "\n"
            "  --port P              TCP port (0 picks a free one; the line printed says which)\n"
            "  --bind ADDR           address to listen on (default 127.0.0.1)\n"
            "  --replset NAME        replica set name (default rs0)\n"
            "  --standalone          answer hello as a standalone server (no change streams)\n"
            "  --wire-version V      maxWireVersion: 17 (MongoDB 6.0, default) or 21 (7.0)\n"
            "  --oplog-max-events N  change history kept for resuming (default 1000000)\n"
            "  --snapshot-window-secs S  minSnapshotHistoryWindowInSeconds: how far back\n"
            "                        snapshot reads and transactions can read (default 300)\n"
            "  --snapshot-history-mb M  memory budget of the versions kept for them (default 256)\n"
            "  --log FILE            append one JSON line per request and per reply\n"
            "  --help, --version\n"
            "\n"
            "Prints \"mongo-emulator listening on HOST:PORT\" when ready; exits 0 on SIGTERM or\n"
            "SIGINT.\n");
}

static bool parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        return false;
    }
    *out = v;
    return true;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"port", required_argument, NULL, 'p'},
        {"bind", required_argument, NULL, 'b'},
        {"replset", required_argument, NULL, 'r'},
        {"standalone", no_argument, NULL, 's'},
        {"wire-version", required_argument, NULL, 'w'},
        {"oplog-max-events", required_argument, NULL, 'o'},
        {"log", required_argument, NULL, 'l'},
        {"snapshot-window-secs", required_argument, NULL, 'W'},
        {"snapshot-history-mb", required_argument, NULL, 'M'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    emu_options_t opts;
    emu_server_t srv;
    mc_error_t err;
    sigset_t set;
    bool have_port = false;
    int c, sig = 0;
    long v;

    memset(&opts, 0, sizeof(opts));
    opts.bind = "127.0.0.1";
    opts.replset = "rs0";
    opts.max_wire_version = 17;
    opts.oplog_max_events = 1000000;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'p':
            if (!parse_long(optarg, 0, 65535, &v)) {
                fprintf(stderr, "mongo-emulator: --port must be 0..65535, got '%s'\n", optarg);
                return 2;
            }
            opts.port = (int)v;
            have_port = true;
            break;
        case 'b': opts.bind = optarg; break;
        case 'r':
            if (!optarg[0] || strlen(optarg) > 64) {
                fprintf(stderr, "mongo-emulator: --replset needs a name of 1..64 characters\n");
                return 2;
            }
            opts.replset = optarg;
            break;
        case 's': opts.standalone = true; break;
        case 'w':
            if (!parse_long(optarg, 0, 100, &v) || (v != 17 && v != 21)) {
                fprintf(stderr, "mongo-emulator: --wire-version must be 17 or 21\n");
                return 2;
            }
            opts.max_wire_version = (int)v;
            break;
        case 'o':
            if (!parse_long(optarg, 1, 100000000L, &v)) {
                fprintf(stderr, "mongo-emulator: --oplog-max-events must be 1..100000000\n");
                return 2;
            }
            opts.oplog_max_events = (size_t)v;
            break;
        case 'l': opts.log_path = optarg; break;
        case 'W':
            if (!parse_long(optarg, 0, 86400L * 365, &v)) {
                fprintf(stderr, "mongo-emulator: --snapshot-window-secs must be 0..31536000\n");
                return 2;
            }
            opts.snapshot_window_secs = v == 0 ? -1 : v;
            break;
        case 'M':
            if (!parse_long(optarg, 1, 1024L * 1024, &v)) {
                fprintf(stderr, "mongo-emulator: --snapshot-history-mb must be 1..1048576\n");
                return 2;
            }
            opts.snapshot_history_bytes = (size_t)v * 1024 * 1024;
            break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("mongo-emulator %s\n", EMU_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "mongo-emulator: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (!have_port) {
        fprintf(stderr, "mongo-emulator: --port is required (0 picks a free port)\n");
        return 2;
    }

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (emu_server_init(&srv, &opts, &err) != 0) {
        fprintf(stderr, "mongo-emulator: %s\n", err.message);
        return 1;
    }
    if (emu_server_start(&srv, &err) != 0) {
        fprintf(stderr, "mongo-emulator: %s\n", err.message);
        emu_server_cleanup(&srv);
        return 1;
    }
    printf("mongo-emulator listening on %s\n", srv.host);
    fflush(stdout);

    while (sigwait(&set, &sig) != 0) {
    }
    emu_log_event(&srv, NULL, "signal %d: shutting down", sig);
    emu_server_cleanup(&srv);
    return 0;
}
