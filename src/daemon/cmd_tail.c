/*
 * cmd_tail.c: `mongocast tail URI [DB[.COLL]] ...`: one ad hoc change stream printed to
 * stdout, one JSON line per change (mc_engine_new_adhoc with the built-in stdout sink).
 *
 * Threads: the main thread parses the arguments, owns the engine and waits for signals; the
 * engine's watcher thread calls on_state() (which only formats one line and writes it to
 * stderr with a single write(2)); the stdout sink's runner thread writes stdout. When stdout
 * fails for good (the reader closed the pipe), tail stops with a message and status 1.
 *
 * Invariants: every argument is checked before anything connects, and a bad one exits with
 * MC_EXIT_USAGE and a message naming it. stdout carries only change lines; everything else
 * (progress, retries, errors) goes to stderr. The exit status is 0 after SIGINT/SIGTERM and 1
 * when the stream or stdout failed for good, when it did not open within --wait seconds (default 30;
 * the first failure prints what tail waits for and a hint), or the engine could not start.
 * Once the stream was open, later interruptions are retried without a limit, as `run` does.
 */
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

enum {
    OPT_PIPELINE = 1,
    OPT_FULL_DOCUMENT,
    OPT_BEFORE_CHANGE,
    OPT_RESUME_AFTER,
    OPT_START_AT,
    OPT_RAW,
    OPT_READY,
    OPT_ON_HISTORY_LOST,
    OPT_MAX_AWAIT,
    OPT_LOG_LEVEL,
    OPT_WAIT,
};

#define DEFAULT_WAIT_SECONDS 30
/* Not open after this long: say what tail waits for, before the driver's own attempt (server
 * selection, 5 s per try, see engine.c) reports its error. */
#define HINT_AFTER_MS 3000

static const mc_cli_opt_t tail_opts[] = {
    {"pipeline", 0, true, OPT_PIPELINE},
    {"full-document", 0, true, OPT_FULL_DOCUMENT},
    {"before-change", 0, true, OPT_BEFORE_CHANGE},
    {"resume-after", 0, true, OPT_RESUME_AFTER},
    {"start-at", 0, true, OPT_START_AT},
    {"raw", 0, false, OPT_RAW},
    {"ready", 0, false, OPT_READY},
    {"on-history-lost", 0, true, OPT_ON_HISTORY_LOST},
    {"max-await-ms", 0, true, OPT_MAX_AWAIT},
    {"log-level", 0, true, OPT_LOG_LEVEL},
    {"wait", 0, true, OPT_WAIT},
    {NULL, 0, false, 0},
};

typedef struct tail_args {
    mc_adhoc_opts_t adhoc;
    char db[256];
    char *collection; /* points into db after the split */
    bson_t pipeline;
    bool have_pipeline;
    char token[4096];
    mc_log_level_t level;
    int64_t wait_s; /* how long the first open may take; 0: forever */
    char what[320]; /* "db.coll", "database db" or "the whole cluster", for messages */
    /* Written by the watcher thread (on_state), read by the main thread. */
    _Atomic bool opened;
    _Atomic bool hinted;
} tail_args_t;

static int parse_pipeline(const char *json, bson_t *out)
{
    /* Wrapped in a document so that libbson's parser, which wants an object, takes the array;
     * the key count check below rejects input that closes the wrapper early. */
    char *wrapped = bson_strdup_printf("{\"p\": %s\n}", json);
    bson_error_t berr;
    bson_t doc;
    bool ok = bson_init_from_json(&doc, wrapped, -1, &berr);
    bson_free(wrapped);
    if (!ok) {
        return mc_cli_usage_error("tail", "--pipeline is not valid JSON: %s", berr.message);
    }
    bson_iter_t it;
    if (bson_count_keys(&doc) != 1 || !bson_iter_init_find(&it, &doc, "p") ||
        !BSON_ITER_HOLDS_ARRAY(&it)) {
        bson_destroy(&doc);
        return mc_cli_usage_error("tail", "--pipeline must be a JSON array of stages, e.g. "
                                          "'[{\"$match\": {\"operationType\": \"insert\"}}]'");
    }
    const uint8_t *data;
    uint32_t len;
    bson_iter_array(&it, &len, &data);
    bson_t arr;
    bson_init_static(&arr, data, len);
    bson_copy_to(&arr, out);
    bson_destroy(&doc);

    bson_t server, local;
    mc_error_t err;
    int rc = mc_pipeline_split(out, &server, &local, &err);
    bool has_var = rc == 0 && !bson_empty(&local);
    bson_destroy(&server);
    bson_destroy(&local);
    if (rc != 0) {
        bson_destroy(out);
        return mc_cli_usage_error("tail", "--pipeline: %s", err.message);
    }
    if (has_var) {
        bson_destroy(out);
        return mc_cli_usage_error("tail", "--pipeline: {\"$var\": ...} placeholders are bound "
                                          "by subscribers and cannot be used with tail");
    }
    return 0;
}

static bool is_hex(const char *s)
{
    if (!*s) {
        return false;
    }
    for (; *s; s++) {
        char c = *s;
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return false;
        }
    }
    return true;
}

/* Accepts the event id as printed in "id" (the `_data` hex string) or the whole token as
 * JSON ({"_data": "..."}), as --raw prints it. */
static int parse_resume_after(const char *text, char *out, size_t cap)
{
    const char *data = text;
    bson_t doc;
    bool parsed = false;
    if (text[0] == '{') {
        bson_error_t berr;
        if (!bson_init_from_json(&doc, text, -1, &berr)) {
            return mc_cli_usage_error("tail", "--resume-after is not valid JSON: %s",
                                      berr.message);
        }
        parsed = true;
        bson_iter_t it;
        if (!bson_iter_init_find(&it, &doc, "_data") || !BSON_ITER_HOLDS_UTF8(&it)) {
            bson_destroy(&doc);
            return mc_cli_usage_error("tail", "--resume-after: the token has no \"_data\" "
                                              "string");
        }
        data = bson_iter_utf8(&it, NULL);
    }
    int rc = 0;
    if (!is_hex(data) || strlen(data) >= cap) {
        rc = mc_cli_usage_error("tail", "--resume-after: '%s' is not an event id (the "
                                        "hexadecimal \"id\" of a printed change)",
                                text);
    } else {
        memcpy(out, data, strlen(data) + 1);
    }
    if (parsed) {
        bson_destroy(&doc);
    }
    return rc;
}

static int parse_target(tail_args_t *t, const char *target)
{
    if (strlen(target) >= sizeof(t->db)) {
        return mc_cli_usage_error("tail", "namespace '%s' is too long", target);
    }
    memcpy(t->db, target, strlen(target) + 1);
    char *dot = strchr(t->db, '.');
    if (dot) {
        *dot = '\0';
        t->collection = dot + 1;
    }
    if (!mc_cli_valid_db_name(t->db)) {
        return mc_cli_usage_error("tail", "'%s' is not a valid database name", t->db);
    }
    if (t->collection) {
        if (!*t->collection || strchr(t->collection, '$')) {
            return mc_cli_usage_error("tail", "'%s' is not a valid collection name",
                                      t->collection);
        }
        t->adhoc.collection = t->collection;
        snprintf(t->what, sizeof(t->what), "%s.%s", t->db, t->collection);
    } else {
        snprintf(t->what, sizeof(t->what), "database %s", t->db);
    }
    t->adhoc.db = t->db;
    return 0;
}

static int parse_args(tail_args_t *t, int argc, char **argv)
{
    mc_cli_parsed_t p;
    int rc = mc_cli_parse("tail", argc, argv, tail_opts, &p);
    if (rc != 0) {
        return rc;
    }
    if (p.n_pos == 0) {
        return mc_cli_usage_error("tail", "a MongoDB URI is required");
    }
    if (p.n_pos > 2) {
        return mc_cli_usage_error("tail", "unexpected argument '%s'", p.pos[2]);
    }
    bson_error_t berr;
    mongoc_uri_t *uri = mongoc_uri_new_with_error(p.pos[0], &berr);
    if (!uri) {
        return mc_cli_usage_error("tail", "invalid MongoDB URI: %s", berr.message);
    }
    mongoc_uri_destroy(uri);
    t->adhoc.uri = p.pos[0];
    t->wait_s = DEFAULT_WAIT_SECONDS;
    snprintf(t->what, sizeof(t->what), "the whole cluster");
    if (p.n_pos == 2 && (rc = parse_target(t, p.pos[1])) != 0) {
        return rc;
    }
    t->level = MC_LOG_NOTICE;
    for (size_t i = 0; i < p.n_opts; i++) {
        const char *v = p.opts[i].value;
        int64_t n;
        switch (p.opts[i].id) {
        case OPT_PIPELINE:
            if (t->have_pipeline) {
                return mc_cli_usage_error("tail", "--pipeline given twice");
            }
            if ((rc = parse_pipeline(v, &t->pipeline)) != 0) {
                return rc;
            }
            t->have_pipeline = true;
            t->adhoc.pipeline = &t->pipeline;
            break;
        case OPT_FULL_DOCUMENT:
            if (strcmp(v, "default") == 0) {
                t->adhoc.full_document = MC_FULL_DOCUMENT_DEFAULT;
            } else if (strcmp(v, "updateLookup") == 0) {
                t->adhoc.full_document = MC_FULL_DOCUMENT_UPDATE_LOOKUP;
            } else if (strcmp(v, "whenAvailable") == 0) {
                t->adhoc.full_document = MC_FULL_DOCUMENT_WHEN_AVAILABLE;
            } else if (strcmp(v, "required") == 0) {
                t->adhoc.full_document = MC_FULL_DOCUMENT_REQUIRED;
            } else {
                return mc_cli_usage_error("tail", "--full-document: unknown mode '%s' (default, "
                                                  "updateLookup, whenAvailable, required)",
                                          v);
            }
            break;
        case OPT_BEFORE_CHANGE:
            if (strcmp(v, "off") == 0) {
                t->adhoc.full_document_before_change = MC_BEFORE_CHANGE_OFF;
            } else if (strcmp(v, "whenAvailable") == 0) {
                t->adhoc.full_document_before_change = MC_BEFORE_CHANGE_WHEN_AVAILABLE;
            } else if (strcmp(v, "required") == 0) {
                t->adhoc.full_document_before_change = MC_BEFORE_CHANGE_REQUIRED;
            } else {
                return mc_cli_usage_error("tail", "--before-change: unknown mode '%s' (off, "
                                                  "whenAvailable, required)",
                                          v);
            }
            break;
        case OPT_RESUME_AFTER:
            if ((rc = parse_resume_after(v, t->token, sizeof(t->token))) != 0) {
                return rc;
            }
            t->adhoc.resume_after = t->token;
            break;
        case OPT_START_AT:
            if (!mc_cli_parse_int(v, 1, UINT32_MAX, &n)) {
                return mc_cli_usage_error("tail", "--start-at: '%s' is not a time in seconds "
                                                  "since the epoch (1 to 4294967295)",
                                          v);
            }
            t->adhoc.start_at_seconds = n;
            break;
        case OPT_RAW: t->adhoc.raw = true; break;
        case OPT_READY: t->adhoc.print_ready = true; break;
        case OPT_ON_HISTORY_LOST:
            if (strcmp(v, "fail") == 0) {
                t->adhoc.on_history_lost = MC_ON_HISTORY_LOST_FAIL;
            } else if (strcmp(v, "restart") == 0) {
                t->adhoc.on_history_lost = MC_ON_HISTORY_LOST_RESTART;
            } else {
                return mc_cli_usage_error("tail", "--on-history-lost: '%s' is not fail or "
                                                  "restart",
                                          v);
            }
            break;
        case OPT_MAX_AWAIT:
            if (!mc_cli_parse_int(v, 1, 60000, &n)) {
                return mc_cli_usage_error("tail", "--max-await-ms: '%s' is not 1 to 60000", v);
            }
            t->adhoc.max_await_time_ms = (int32_t)n;
            break;
        case OPT_LOG_LEVEL:
            if (mc_log_level_parse(v, &t->level) != 0) {
                return mc_cli_usage_error("tail", "unknown log level '%s'", v);
            }
            break;
        case OPT_WAIT:
            if (!mc_cli_parse_int(v, 0, 86400, &n)) {
                return mc_cli_usage_error("tail", "--wait: '%s' is not 0 to 86400 seconds", v);
            }
            t->wait_s = n;
            break;
        default: break;
        }
    }
    if (t->adhoc.resume_after && t->adhoc.start_at_seconds > 0) {
        return mc_cli_usage_error("tail", "--resume-after and --start-at are mutually exclusive");
    }
    return 0;
}

static void say(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n > sizeof(line) - 2) {
        n = (int)sizeof(line) - 2;
    }
    line[n++] = '\n';
    /* One write(2): lines from the watcher thread and the main thread never interleave. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

/* Once, while the stream has never been open: what tail waits for, and what to check. */
static void hint(tail_args_t *t, const char *message)
{
    if (atomic_exchange(&t->hinted, true)) {
        return;
    }
    char until[64] = "until interrupted (--wait 0)";
    if (t->wait_s > 0) {
        snprintf(until, sizeof(until), "for up to %lld s (--wait)", (long long)t->wait_s);
    }
    if (message && *message) {
        say("mongocast tail: cannot open a change stream on %s yet: %s", t->what, message);
    }
    say("mongocast tail: waiting for a MongoDB replica set (or sharded cluster) at the URI, "
        "retrying %s; is the server running, and does the URI name the replica set "
        "(?replicaSet=...)?",
        until);
}

static void on_state(mc_engine_t *engine, const char *stream, mc_stream_state_t state,
                     const char *message, void *userdata)
{
    (void)engine;
    (void)stream;
    tail_args_t *t = userdata;
    switch (state) {
    case MC_STREAM_OPEN:
        atomic_store(&t->opened, true);
        say("mongocast tail: watching %s (change stream open)", t->what);
        break;
    case MC_STREAM_RETRYING:
        if (atomic_load(&t->opened)) {
            say("mongocast tail: change stream interrupted, retrying: %s", message ? message : "");
        } else {
            hint(t, message);
        }
        break;
    case MC_STREAM_FAILED:
        say("mongocast tail: change stream failed: %s", message ? message : "");
        break;
    default: break;
    }
}

int mc_cmd_tail(int argc, char **argv)
{
    tail_args_t t;
    memset(&t, 0, sizeof(t));
    int rc = parse_args(&t, argc, argv);
    if (rc != 0) {
        if (t.have_pipeline) {
            bson_destroy(&t.pipeline);
        }
        return rc;
    }
    mc_cli_setup_logging(t.level);
    /* SIGPIPE ignored: a reader that goes away fails the stdout sink (EPIPE, permanent), and
     * tail says so and exits 1 below instead of dying silently by the signal. */
    mc_cli_block_signals(true);

    mc_engine_opts_t opts;
    memset(&opts, 0, sizeof(opts));
    opts.app_name = "mongocast-tail";
    opts.on_state = on_state;
    opts.on_state_userdata = &t;
    mc_error_t err;
    mc_error_clear(&err);
    mc_engine_t *engine = mc_engine_new_adhoc(&t.adhoc, &opts, &err);
    if (t.have_pipeline) {
        bson_destroy(&t.pipeline);
    }
    if (!engine) {
        fprintf(stderr, "mongocast tail: %s\n", err.message);
        return MC_EXIT_USAGE;
    }
    char *shown = mc_cli_redact_uri(t.adhoc.uri);
    say("mongocast tail: connecting to %s for %s", shown, t.what);
    bson_free(shown);
    if (mc_engine_start(engine, &err) != 0) {
        fprintf(stderr, "mongocast tail: cannot start: %s\n", err.message);
        mc_engine_destroy(engine);
        return MC_EXIT_FAIL;
    }

    int status = MC_EXIT_OK;
    int64_t started_ms = mc_engine_now_ms();
    int64_t give_up_ms = t.wait_s > 0 ? started_ms + t.wait_s * 1000 : 0;
    for (;;) {
        int sig = mc_cli_wait_signal(100);
        if (sig != 0) {
            break;
        }
        if (!atomic_load(&t.opened) && mc_engine_now_ms() >= started_ms + HINT_AFTER_MS) {
            hint(&t, NULL);
        }
        if (give_up_ms && !atomic_load(&t.opened) && mc_engine_now_ms() >= give_up_ms) {
            mc_stream_status_t st;
            memset(&st, 0, sizeof(st));
            mc_engine_stream_status(engine, mc_engine_stream_name(engine, 0), &st);
            const char *why = st.message;
            atomic_store(&t.hinted, true);
            say("mongocast tail: gave up: the change stream on %s did not open within %lld s "
                "(--wait)%s%s",
                t.what, (long long)t.wait_s, st.state == MC_STREAM_RETRYING ? ": " : "",
                st.state == MC_STREAM_RETRYING ? why
                                               : "; no answer from a MongoDB replica set "
                                                 "at the URI yet");
            status = MC_EXIT_FAIL;
            break;
        }
        mc_sink_stats_t sk;
        if (mc_engine_sink_stats(engine, 0, &sk) == 0 && sk.state == MC_SINK_FAILED) {
            say("mongocast tail: cannot write stdout: %s", sk.message);
            status = MC_EXIT_FAIL;
            break;
        }
        if (mc_engine_finished(engine)) {
            mc_stream_status_t st;
            if (mc_engine_stream_status(engine, mc_engine_stream_name(engine, 0), &st) == 0 &&
                st.state == MC_STREAM_FAILED) {
                status = MC_EXIT_FAIL;
            }
            break;
        }
    }
    mc_engine_stop(engine, NULL);
    mc_engine_destroy(engine);
    mc_log_set_handler(NULL, NULL);
    return status;
}
