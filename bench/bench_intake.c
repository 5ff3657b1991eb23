/*
 * bench_intake.c: measures the library engine's intake, charged to this process's own CPU
 * time: change events of about SIZE-byte documents, read by a watcher thread, normalised,
 * rendered as the DESIGN §4.3 JSON message and written by the "stdout" sink to /dev/null.
 * The target it checks is >= 100,000 events per CPU-second of mongocast.
 *
 * Phases, in order, against one mongo-emulator (or any replica set) given by --uri:
 *   preload  record the resume position of an empty change stream on bench.intake, then
 *            insert N documents (not measured as intake; reported for information);
 *   engine   a real engine from an in-memory YAML config (file checkpoint store in a temp
 *            directory, seeded with the recorded position so the stream resumes right before
 *            the first insert; recipient path fullDocument.owner; stdout sink, on its own
 *            runner thread). Main polls the sink's counters every 5 ms and notes the
 *            CPU and wall clock when the N-th change has been written and completed. Process
 *            CPU (CLOCK_PROCESS_CPUTIME_ID, all threads), getrusage user/sys split, and CPU
 *            per thread (/proc/self/task, by the names the library gives its threads:
 *            mcwatch:<stream>, mcsink:<sink>) are reported;
 *   raw      stage (a) on its own: a bare libmongoc change stream with the same options from
 *            the same position reads the same N events (mongoc_change_stream_next only);
 *   stages   stages (b)-(e) as in-process microbenchmarks over the first K change documents
 *            (collected, untimed, by a memory sink in a third engine), repeated until N
 *            calls: (b) mc_event_new_change (copy, token, fields, recipient), (c)
 *            mc_event_json, (d) the real stdout sink's publish + flush every 256 events (the
 *            runner's batch size), (e) mc_event_unref (freeing). The stdout sink instance
 *            belongs to a second engine whose stream watches an idle collection; once its
 *            runner has handled the stream's ready event it never calls the sink again, so
 *            this thread is the sink's only caller, as the sink contract requires. Routing,
 *            runner hand-off and bookkeeping have no public entry point: they are the
 *            end-to-end figure minus the sum of the stages (reported as residual).
 *
 * Standard output is the stdout sink's destination: at start-up this program moves the
 * original standard output aside for its own report (key=value lines) and points fd 1 at
 * --sink-out (default /dev/null).
 *
 * Threads: main runs every phase; during the engine phase the engine's watcher, stdout-runner
 * and checkpoint threads run as well; main only reads the sink's counters.
 */
#include <mongocast/config.h>
#include <mongocast/engine.h>
#include <mongocast/event.h>
#include <mongocast/log.h>
#include <mongocast/sink.h>

#include <mongoc/mongoc.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define DB_NAME "bench"
#define COLL_NAME "intake"
#define IDLE_COLL_NAME "intake_idle"
#define STREAM_NAME "intake"
#define RECIPIENT_PATH "fullDocument.owner"
#define DISPATCH_BATCH 256 /* a runner flushes its sink after each batch of up to this size */
#define MAX_THREADS 64

/* ---- Clocks ------------------------------------------------------------------------------ */

static double clock_seconds(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall_now(void)
{
    return clock_seconds(CLOCK_MONOTONIC);
}

static double cpu_now(void)
{
    return clock_seconds(CLOCK_PROCESS_CPUTIME_ID);
}

/* The stage microbenchmarks run on main alone; other threads (the stage engine's idle
 * watcher, libmongoc's monitors) must not be charged to them. */
static double thread_cpu_now(void)
{
    return clock_seconds(CLOCK_THREAD_CPUTIME_ID);
}

typedef struct usage {
    double user_s;
    double sys_s;
    long vcsw; /* voluntary context switches: blocking waits (queue, socket) */
    long ivcsw;
} usage_t;

static usage_t usage_now(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    usage_t u = {(double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6, ru.ru_nvcsw,
                 ru.ru_nivcsw};
    return u;
}

/* CPU time of one thread of this process in seconds: schedstat (ns) when the kernel has it,
 * else utime + stime from stat (clock ticks). -1 when the thread is gone. */
static double thread_cpu_seconds(long tid)
{
    char path[96];
    snprintf(path, sizeof(path), "/proc/self/task/%ld/schedstat", tid);
    FILE *f = fopen(path, "r");
    if (f) {
        unsigned long long ns = 0;
        int ok = fscanf(f, "%llu", &ns) == 1;
        fclose(f);
        if (ok) {
            return (double)ns / 1e9;
        }
    }
    snprintf(path, sizeof(path), "/proc/self/task/%ld/stat", tid);
    f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    char buf[1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) {
        return -1;
    }
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

typedef struct thread_cpu {
    long tid;
    double cpu_s;
    char name[32]; /* /proc/self/task/<tid>/comm */
} thread_cpu_t;

/* Fills `out` with every thread of this process and its CPU time; returns the count. */
static size_t list_threads(thread_cpu_t *out, size_t max)
{
    DIR *d = opendir("/proc/self/task");
    size_t n = 0;
    if (!d) {
        return 0;
    }
    struct dirent *de;
    while ((de = readdir(d)) && n < max) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9') {
            continue;
        }
        out[n].tid = atol(de->d_name);
        out[n].cpu_s = thread_cpu_seconds(out[n].tid);
        out[n].name[0] = '\0';
        char path[96];
        snprintf(path, sizeof(path), "/proc/self/task/%ld/comm", out[n].tid);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fgets(out[n].name, sizeof(out[n].name), f)) {
                out[n].name[strcspn(out[n].name, "\n")] = '\0';
            }
            fclose(f);
        }
        n++;
    }
    closedir(d);
    return n;
}

/* ---- Report output -------------------------------------------------------------------- */

static FILE *report; /* the original standard output */

static void die(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2), noreturn))
#endif
    ;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("bench_intake: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* Moves the original stdout to `report` and points fd 1 (the stdout sink's FILE) at path. */
static void redirect_stdout(const char *path)
{
    fflush(stdout);
    int keep = dup(STDOUT_FILENO);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (keep < 0 || fd < 0 || dup2(fd, STDOUT_FILENO) < 0) {
        die("cannot redirect stdout to %s: %s", path, strerror(errno));
    }
    close(fd);
    report = fdopen(keep, "w");
    if (!report) {
        die("fdopen: %s", strerror(errno));
    }
    setvbuf(report, NULL, _IOLBF, 0);
}

/* ---- Options ------------------------------------------------------------------------------ */

typedef struct opts {
    const char *uri;
    int docs;         /* N */
    int size;         /* target BSON size of each inserted document */
    int insert_batch; /* documents per insert_many */
    int cs_batch;     /* change-stream batchSize; 0: server default */
    int sample;       /* K change documents kept for the stage microbenchmarks */
    const char *sink_out;
    bool skip_raw;
    bool skip_stages;
} opts_t;

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_intake --uri URI [--docs N] [--size BYTES] [--insert-batch N]\n"
            "                    [--cs-batch N] [--sample K] [--sink-out PATH] [--no-raw]\n"
            "                    [--no-stages]\n"
            "  Report lines go to standard output; the stdout sink writes to PATH\n"
            "  (default /dev/null).\n");
    exit(2);
}

static void parse_opts(int argc, char **argv, opts_t *o)
{
    *o = (opts_t){.docs = 200000,
                  .size = 1024,
                  .insert_batch = 1000,
                  .cs_batch = 0,
                  .sample = 10000,
                  .sink_out = "/dev/null"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--no-raw")) {
            o->skip_raw = true;
            continue;
        }
        if (!strcmp(a, "--no-stages")) {
            o->skip_stages = true;
            continue;
        }
        if (i + 1 >= argc) {
            usage();
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--uri")) {
            o->uri = v;
        } else if (!strcmp(a, "--docs")) {
            o->docs = atoi(v);
        } else if (!strcmp(a, "--size")) {
            o->size = atoi(v);
        } else if (!strcmp(a, "--insert-batch")) {
            o->insert_batch = atoi(v);
        } else if (!strcmp(a, "--cs-batch")) {
            o->cs_batch = atoi(v);
        } else if (!strcmp(a, "--sample")) {
            o->sample = atoi(v);
        } else if (!strcmp(a, "--sink-out")) {
            o->sink_out = v;
        } else {
            usage();
        }
    }
    if (!o->uri || o->docs <= 0 || o->size < 256 || o->size > 1000000 || o->insert_batch <= 0 ||
        o->cs_batch < 0 || o->sample <= 0) {
        usage();
    }
    if (o->sample > o->docs) {
        o->sample = o->docs;
    }
}

/* ---- Preload -------------------------------------------------------------------------- */

/* A document of exactly `size` BSON bytes shaped like an application record: an owner (the
 * recipient), a few typed fields, a small sub-document and array, and free text. */
static bson_t *make_doc(int n, int size, const char *text)
{
    char owner[32];
    snprintf(owner, sizeof(owner), "user-%d", n % 1000);
    bson_oid_t oid;
    bson_oid_init(&oid, NULL);
    bson_t *doc = BCON_NEW("_id", BCON_OID(&oid), "owner", BCON_UTF8(owner), "seq",
                           BCON_INT64(n), "status", BCON_UTF8(n % 3 ? "open" : "closed"),
                           "amount", BCON_DOUBLE(n * 0.25), "created",
                           BCON_DATE_TIME(1700000000000 + n), "tags", "[", BCON_UTF8("alpha"),
                           BCON_UTF8("beta"), BCON_UTF8("gamma"), "]", "address", "{", "city",
                           BCON_UTF8("Lisbon"), "zip", BCON_UTF8("1100-148"), "}");
    /* "note" element: type byte + "note\0" + int32 length + text + NUL. */
    int room = size - (int)doc->len - 1 - 5 - 4 - 1;
    if (room < 0) {
        room = 0;
    }
    bson_append_utf8(doc, "note", 4, text, room);
    return doc;
}

/* Opens a change stream, returns the position it started at (the post-batch resume token of
 * its first, empty batch) as a new string holding `_data`. */
static char *record_position(mongoc_collection_t *coll)
{
    bson_t *cs_opts = BCON_NEW("maxAwaitTimeMS", BCON_INT64(100));
    bson_t pipeline = BSON_INITIALIZER;
    mongoc_change_stream_t *cs = mongoc_collection_watch(coll, &pipeline, cs_opts);
    const bson_t *doc;
    bson_error_t err;
    if (mongoc_change_stream_next(cs, &doc)) {
        die("unexpected change before any insert");
    }
    if (mongoc_change_stream_error_document(cs, &err, NULL)) {
        die("watch failed: %s", err.message);
    }
    const bson_t *tok = mongoc_change_stream_get_resume_token(cs);
    bson_iter_t it;
    if (!tok || !bson_iter_init_find(&it, tok, "_data") || !BSON_ITER_HOLDS_UTF8(&it)) {
        die("the server gave no post-batch resume token");
    }
    char *data = bson_strdup(bson_iter_utf8(&it, NULL));
    mongoc_change_stream_destroy(cs);
    bson_destroy(cs_opts);
    bson_destroy(&pipeline);
    return data;
}

static char *preload(mongoc_client_t *client, const opts_t *o)
{
    bson_error_t err;
    mongoc_collection_t *coll = mongoc_client_get_collection(client, DB_NAME, COLL_NAME);
    mongoc_collection_drop(coll, NULL); /* fails harmlessly when it does not exist */
    char *position = record_position(coll);

    char *text = malloc((size_t)o->size + 1);
    for (int i = 0; i < o->size; i++) {
        text[i] = (char)('a' + (i * 7) % 26);
    }
    text[o->size] = '\0';
    bson_t **docs = calloc((size_t)o->insert_batch, sizeof(*docs));
    if (!text || !docs) {
        die("out of memory");
    }
    uint32_t doc_bytes = 0;
    double t0 = wall_now();
    for (int done = 0; done < o->docs;) {
        int n = o->docs - done < o->insert_batch ? o->docs - done : o->insert_batch;
        for (int i = 0; i < n; i++) {
            docs[i] = make_doc(done + i, o->size, text);
        }
        doc_bytes = docs[0]->len;
        bool ok = mongoc_collection_insert_many(coll, (const bson_t **)docs, (size_t)n, NULL,
                                                NULL, &err);
        for (int i = 0; i < n; i++) {
            bson_destroy(docs[i]);
        }
        if (!ok) {
            die("insert_many failed: %s", err.message);
        }
        done += n;
    }
    double t1 = wall_now();
    fprintf(report, "phase=preload docs=%d doc_bytes=%u wall_s=%.3f docs_per_wall_s=%.0f\n",
            o->docs, doc_bytes, t1 - t0, o->docs / (t1 - t0));
    free(docs);
    free(text);
    mongoc_collection_destroy(coll);
    return position;
}

/* ---- Events kept for the stage benchmarks ---------------------------------------------- */

typedef struct count_state {
    uint64_t target;
    mc_event_t **keep; /* the first `keep_max` change events, for the stage benchmarks */
    size_t keep_max;
    size_t kept;
    size_t first_change_bytes; /* BSON size of the first change document */
} count_state_t;

/* ---- Engine phase ------------------------------------------------------------------------ */

static char *make_temp_dir(void)
{
    const char *base = getenv("TMPDIR");
    char *tmpl = bson_strdup_printf("%s/bench_intake.XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpl)) {
        die("mkdtemp: %s", strerror(errno));
    }
    return tmpl;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) == EOF || fclose(f) != 0) {
        die("cannot write %s: %s", path, strerror(errno));
    }
}

/* Seeds the file checkpoint store (the format token_store_file.c reads: {"token": {"_data":
 * ...}, "invalidate": false} in <dir>/<stream>.json), so the engine resumes at `position`. */
static void seed_checkpoint(const char *cp_dir, const char *position)
{
    if (mkdir(cp_dir, 0755) != 0) {
        die("mkdir %s: %s", cp_dir, strerror(errno));
    }
    char *path = bson_strdup_printf("%s/%s.json", cp_dir, STREAM_NAME);
    char *text =
        bson_strdup_printf("{\"token\": {\"_data\": \"%s\"}, \"invalidate\": false}\n", position);
    write_file(path, text);
    bson_free(text);
    bson_free(path);
}

static char *config_yaml(const opts_t *o, const char *cp_dir, const char *coll,
                         int max_await_ms)
{
    char batch[64] = "";
    if (o->cs_batch > 0) {
        snprintf(batch, sizeof(batch), "    batch_size: %d\n", o->cs_batch);
    }
    return bson_strdup_printf("mongodb:\n"
                              "  uri: \"%s\"\n"
                              "checkpoint:\n"
                              "  store: file\n"
                              "  path: \"%s\"\n"
                              "  interval_ms: 1000\n"
                              "log_level: warn\n"
                              "streams:\n"
                              "  " STREAM_NAME ":\n"
                              "    db: " DB_NAME "\n"
                              "    collection: %s\n"
                              "    recipient: " RECIPIENT_PATH "\n"
                              "    max_await_time_ms: %d\n"
                              "%s"
                              "sinks:\n"
                              "  - {name: out, type: stdout, streams: [" STREAM_NAME "]}\n",
                              o->uri, cp_dir, coll, max_await_ms, batch);
}

static void remove_temp_dir(const char *dir, const char *sub)
{
    /* Only the files this program created: the seeded checkpoint and the store's temp file. */
    const char *names[] = {STREAM_NAME ".json", STREAM_NAME ".json.tmp"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char *p = bson_strdup_printf("%s/%s/%s", dir, sub, names[i]);
        unlink(p);
        bson_free(p);
    }
    char *p = bson_strdup_printf("%s/%s", dir, sub);
    rmdir(p);
    bson_free(p);
    rmdir(dir);
}

static void check_stream(mc_engine_t *engine)
{
    mc_stream_status_t st;
    if (mc_engine_stream_status(engine, STREAM_NAME, &st) == 0 && st.state == MC_STREAM_FAILED) {
        die("stream failed: %s", st.message);
    }
}

/* The first K change events from `position`, read by a memory sink (not timed). */
static void collect_events(const opts_t *o, const char *position, count_state_t *st)
{
    char *tmp = make_temp_dir();
    char *cp_dir = bson_strdup_printf("%s/checkpoints", tmp);
    seed_checkpoint(cp_dir, position);
    char *base = config_yaml(o, cp_dir, COLL_NAME, 1000);
    /* The same stream, with a memory sink in place of stdout. */
    char *cut = strstr(base, "sinks:\n");
    if (!cut) {
        die("config without sinks");
    }
    *cut = '\0';
    char *yaml = bson_strdup_printf("%ssinks:\n  - {name: keep, type: memory, control: false, "
                                    "max_events: %zu}\n",
                                    base, st->keep_max);
    mc_error_t err = {0};
    mc_config_t *config = mc_config_load_string(yaml, strlen(yaml), "collect.yaml", &err);
    mc_engine_opts_t eo = {.no_checkpoint = false};
    mc_engine_t *engine = config ? mc_engine_new(config, &eo, &err) : NULL;
    if (!engine || mc_engine_start(engine, &err) != 0) {
        die("collect engine: %s", err.message);
    }
    mc_sink_t *keep = mc_engine_sink(engine, "keep");
    if (mc_sink_memory_wait(keep, st->keep_max, 120000) != 0) {
        die("collect: only %zu of %zu events", mc_sink_memory_count(keep), st->keep_max);
    }
    for (size_t i = 0; i < st->keep_max; i++) {
        st->keep[i] = mc_sink_memory_get(keep, i);
    }
    st->kept = st->keep_max;
    st->first_change_bytes = mc_event_change(st->keep[0])->len;
    mc_engine_destroy(engine);
    mc_config_destroy(config);
    remove_temp_dir(tmp, "checkpoints");
    bson_free(yaml);
    bson_free(base);
    bson_free(cp_dir);
    bson_free(tmp);
}

typedef struct engine_result {
    double cpu_s, wall_s, user_s, sys_s;
} engine_result_t;

static engine_result_t run_engine(const opts_t *o, const char *position, count_state_t *st)
{
    char *tmp = make_temp_dir();
    char *cp_dir = bson_strdup_printf("%s/checkpoints", tmp);
    seed_checkpoint(cp_dir, position);
    char *yaml = config_yaml(o, cp_dir, COLL_NAME, 1000);
    mc_error_t err = {0};
    mc_config_t *config = mc_config_load_string(yaml, strlen(yaml), "bench_intake.yaml", &err);
    if (!config) {
        die("config: %s", err.message);
    }
    mc_engine_t *engine = mc_engine_new(config, NULL, &err);
    if (!engine) {
        die("mc_engine_new: %s", err.message);
    }

    thread_cpu_t before[MAX_THREADS];
    size_t n_before = list_threads(before, MAX_THREADS);
    double cpu0 = cpu_now();
    double wall0 = wall_now();
    usage_t u0 = usage_now();
    if (mc_engine_start(engine, &err) != 0) {
        die("mc_engine_start: %s", err.message);
    }
    /* Done when the stdout sink has written the N-th change and completed it (nothing of the
     * stream left in its queue). Polled every 5 ms: at most 5 ms late on the wall clock, and
     * a few hundred polls cost main well under a millisecond of CPU. */
    double deadline = wall0 + 600;
    double done_cpu, done_wall;
    usage_t done_usage;
    uint64_t polls = 0;
    for (;;) {
        mc_sink_stats_t sk;
        if (mc_engine_sink_stats(engine, 0, &sk) == 0 && sk.published >= st->target &&
            sk.lag_events == 0) {
            done_cpu = cpu_now();
            done_wall = wall_now();
            done_usage = usage_now();
            break;
        }
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL);
        if (++polls % 200 == 0) {
            check_stream(engine);
            if (wall_now() > deadline) {
                die("timed out after %" PRIu64 " of %" PRIu64 " events", sk.published,
                    st->target);
            }
        }
    }

    /* Per-thread CPU, read while the engine still runs (it idles in getMore by now). */
    thread_cpu_t after[MAX_THREADS];
    size_t n_after = list_threads(after, MAX_THREADS);
    long main_tid = (long)syscall(SYS_gettid);
    double sink_s = 0, watcher_s = 0, main_s = 0, others_s = 0;
    for (size_t i = 0; i < n_after; i++) {
        double base = 0;
        for (size_t j = 0; j < n_before; j++) {
            if (before[j].tid == after[i].tid) {
                base = before[j].cpu_s;
            }
        }
        double d = after[i].cpu_s - base;
        if (strcmp(after[i].name, "mcsink:out") == 0) {
            sink_s = d;
        } else if (strcmp(after[i].name, "mcwatch:" STREAM_NAME) == 0 && d > watcher_s) {
            /* libmongoc's monitor thread, started from the watcher, inherits its name: the
             * watcher is the busy one. */
            others_s += watcher_s;
            watcher_s = d;
        } else if (after[i].tid == main_tid) {
            main_s = d;
        } else {
            others_s += d;
        }
    }

    double cpu_stop0 = cpu_now();
    if (mc_engine_stop(engine, &err) != 0) {
        fprintf(stderr, "bench_intake: mc_engine_stop: %s\n", err.message);
    }
    double cpu_stop1 = cpu_now();
    mc_engine_destroy(engine);
    mc_config_destroy(config);
    remove_temp_dir(tmp, "checkpoints");
    bson_free(yaml);
    bson_free(cp_dir);
    bson_free(tmp);

    engine_result_t r = {done_cpu - cpu0, done_wall - wall0, done_usage.user_s - u0.user_s,
                         done_usage.sys_s - u0.sys_s};
    double n = (double)o->docs;
    fprintf(report,
            "phase=engine events=%d change_bytes=%zu cpu_s=%.3f user_s=%.3f sys_s=%.3f "
            "wall_s=%.3f events_per_cpu_s=%.0f events_per_wall_s=%.0f cpu_us_per_event=%.3f "
            "watcher_thread_cpu_s=%.3f sink_thread_cpu_s=%.3f other_threads_cpu_s=%.3f "
            "main_thread_cpu_s=%.3f vcsw=%ld ivcsw=%ld stop_cpu_s=%.3f\n",
            o->docs, st->first_change_bytes, r.cpu_s, r.user_s, r.sys_s, r.wall_s, n / r.cpu_s,
            n / r.wall_s, r.cpu_s / n * 1e6, watcher_s, sink_s, others_s, main_s,
            done_usage.vcsw - u0.vcsw, done_usage.ivcsw - u0.ivcsw, cpu_stop1 - cpu_stop0);
    return r;
}

/* ---- Stage (a): bare libmongoc --------------------------------------------------------- */

static double run_raw(const opts_t *o, const char *position)
{
    mongoc_client_t *client = mongoc_client_new(o->uri);
    if (!client) {
        die("bad uri %s", o->uri);
    }
    mongoc_client_set_appname(client, "bench_intake-raw");
    mongoc_collection_t *coll = mongoc_client_get_collection(client, DB_NAME, COLL_NAME);
    bson_t *cs_opts = BCON_NEW("maxAwaitTimeMS", BCON_INT64(1000), "resumeAfter", "{", "_data",
                               BCON_UTF8(position), "}");
    if (o->cs_batch > 0) {
        BSON_APPEND_INT32(cs_opts, "batchSize", o->cs_batch);
    }
    bson_t pipeline = BSON_INITIALIZER;
    double cpu0 = cpu_now();
    double wall0 = wall_now();
    mongoc_change_stream_t *cs = mongoc_collection_watch(coll, &pipeline, cs_opts);
    const bson_t *doc;
    bson_error_t err;
    int seen = 0;
    while (seen < o->docs) {
        if (mongoc_change_stream_next(cs, &doc)) {
            seen++;
            continue;
        }
        if (mongoc_change_stream_error_document(cs, &err, NULL)) {
            die("raw change stream failed after %d events: %s", seen, err.message);
        }
    }
    double cpu1 = cpu_now();
    double wall1 = wall_now();
    fprintf(report,
            "phase=raw events=%d cpu_s=%.3f wall_s=%.3f events_per_cpu_s=%.0f "
            "events_per_wall_s=%.0f cpu_us_per_event=%.3f\n",
            seen, cpu1 - cpu0, wall1 - wall0, seen / (cpu1 - cpu0), seen / (wall1 - wall0),
            (cpu1 - cpu0) / seen * 1e6);
    mongoc_change_stream_destroy(cs);
    bson_destroy(cs_opts);
    bson_destroy(&pipeline);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    return (cpu1 - cpu0) / seen;
}

/* ---- Stage (c'): what a single-pass renderer would cost (a prototype, not the library) ----
 * libbson 1.23 escapes strings one character at a time (bson_utf8_escape_for_json ->
 * bson_string_append_unichar -> strlen + append per character) after bson_iter_visit_all has
 * already validated each string. This prototype renders the same message in one pass:
 * runs of plain ASCII are copied with memcpy, UTF-8 is validated while escaping, and the
 * output goes into one buffer sized from the BSON length. It handles the types these events
 * hold (document, array, string, int32/64, double, bool, null, ObjectId, date, timestamp)
 * and says so when it meets another one. Its output is compared byte for byte with
 * mc_event_json(); a mismatch is reported, never hidden. */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    bool unsupported;
} jbuf_t;

static void jb_reserve(jbuf_t *b, size_t more)
{
    if (b->len + more + 1 <= b->cap) {
        return;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1) {
        cap *= 2;
    }
    b->p = realloc(b->p, cap);
    if (!b->p) {
        die("out of memory");
    }
    b->cap = cap;
}

static void jb_put(jbuf_t *b, const char *s, size_t n)
{
    jb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

#define JB_LIT(b, lit) jb_put((b), (lit), sizeof(lit) - 1)

/* Length of the valid UTF-8 sequence starting at s (1..4), or 0 when invalid. */
static size_t utf8_seq(const unsigned char *s, size_t left)
{
    unsigned char c = s[0];
    size_t n;
    uint32_t cp;
    if (c < 0xC2) {
        return 0;
    } else if (c < 0xE0) {
        n = 2;
        cp = c & 0x1F;
    } else if (c < 0xF0) {
        n = 3;
        cp = c & 0x0F;
    } else if (c < 0xF5) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n > left) {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            return 0;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
        return 0;
    }
    return n;
}

static void jb_string(jbuf_t *b, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    jb_reserve(b, n + 2);
    b->p[b->len++] = '"';
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && s[run] >= 0x20 && s[run] < 0x80 && s[run] != '"' && s[run] != '\\') {
            run++;
        }
        if (run > i) {
            jb_put(b, str + i, run - i);
            i = run;
            continue;
        }
        unsigned char c = s[i];
        char esc[8];
        switch (c) {
        case '"': jb_put(b, "\\\"", 2); i++; continue;
        case '\\': jb_put(b, "\\\\", 2); i++; continue;
        case '\b': jb_put(b, "\\b", 2); i++; continue;
        case '\f': jb_put(b, "\\f", 2); i++; continue;
        case '\n': jb_put(b, "\\n", 2); i++; continue;
        case '\r': jb_put(b, "\\r", 2); i++; continue;
        case '\t': jb_put(b, "\\t", 2); i++; continue;
        default: break;
        }
        if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            jb_put(b, esc, 6);
            i++;
            continue;
        }
        size_t k = utf8_seq(s + i, n - i);
        if (k == 0) {
            b->unsupported = true; /* libbson refuses invalid UTF-8 */
            return;
        }
        jb_put(b, str + i, k);
        i += k;
    }
    jb_reserve(b, 1);
    b->p[b->len++] = '"';
}

static void jb_doc(jbuf_t *b, const bson_t *doc, bool array, int depth);

static void jb_value(jbuf_t *b, const bson_iter_t *it, int depth)
{
    char tmp[64];
    int n;
    switch (bson_iter_type(it)) {
    case BSON_TYPE_UTF8: {
        uint32_t len;
        const char *v = bson_iter_utf8(it, &len);
        jb_string(b, v, len);
        return;
    }
    case BSON_TYPE_INT32:
        n = snprintf(tmp, sizeof(tmp), "%d", bson_iter_int32(it));
        jb_put(b, tmp, (size_t)n);
        return;
    case BSON_TYPE_INT64:
        n = snprintf(tmp, sizeof(tmp), "%" PRId64, bson_iter_int64(it));
        jb_put(b, tmp, (size_t)n);
        return;
    case BSON_TYPE_DOUBLE: {
        double d = bson_iter_double(it);
        if (d != d || d * 0 != 0) {
            b->unsupported = true; /* NaN/Infinity use $numberDouble */
            return;
        }
        n = snprintf(tmp, sizeof(tmp), "%.20g", d);
        jb_put(b, tmp, (size_t)n);
        if (strspn(tmp, "0123456789-") == (size_t)n) {
            JB_LIT(b, ".0");
        }
        return;
    }
    case BSON_TYPE_BOOL:
        if (bson_iter_bool(it)) {
            JB_LIT(b, "true");
        } else {
            JB_LIT(b, "false");
        }
        return;
    case BSON_TYPE_NULL: JB_LIT(b, "null"); return;
    case BSON_TYPE_OID:
        JB_LIT(b, "{ \"$oid\" : \"");
        bson_oid_to_string(bson_iter_oid(it), tmp);
        jb_put(b, tmp, 24);
        JB_LIT(b, "\" }");
        return;
    case BSON_TYPE_DATE_TIME: {
        int64_t ms = bson_iter_date_time(it);
        time_t secs = (time_t)(ms / 1000);
        struct tm tm;
        if (ms < 0 || !gmtime_r(&secs, &tm) || tm.tm_year + 1900 > 9999) {
            b->unsupported = true; /* outside 1970..9999 libbson uses $numberLong */
            return;
        }
        n = snprintf(tmp, sizeof(tmp), "{ \"$date\" : \"%04d-%02d-%02dT%02d:%02d:%02d",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec);
        jb_put(b, tmp, (size_t)n);
        if (ms % 1000) {
            n = snprintf(tmp, sizeof(tmp), ".%03dZ\" }", (int)(ms % 1000));
            jb_put(b, tmp, (size_t)n);
        } else {
            JB_LIT(b, "Z\" }");
        }
        return;
    }
    case BSON_TYPE_TIMESTAMP: {
        uint32_t t, i;
        bson_iter_timestamp(it, &t, &i);
        n = snprintf(tmp, sizeof(tmp), "{ \"$timestamp\" : { \"t\" : %u, \"i\" : %u } }", t, i);
        jb_put(b, tmp, (size_t)n);
        return;
    }
    case BSON_TYPE_DOCUMENT:
    case BSON_TYPE_ARRAY: {
        const uint8_t *data;
        uint32_t len;
        bson_t sub;
        bool array = BSON_ITER_HOLDS_ARRAY(it);
        if (array) {
            bson_iter_array(it, &len, &data);
        } else {
            bson_iter_document(it, &len, &data);
        }
        if (depth > 100 || !bson_init_static(&sub, data, len)) {
            b->unsupported = true;
            return;
        }
        jb_doc(b, &sub, array, depth + 1);
        return;
    }
    default: b->unsupported = true; return;
    }
}

static void jb_doc(jbuf_t *b, const bson_t *doc, bool array, int depth)
{
    bson_iter_t it;
    if (!bson_iter_init(&it, doc)) {
        b->unsupported = true;
        return;
    }
    jb_put(b, array ? "[ " : "{ ", 2);
    bool first = true;
    while (!b->unsupported && bson_iter_next(&it)) {
        if (!first) {
            JB_LIT(b, ", ");
        }
        first = false;
        if (!array) {
            jb_string(b, bson_iter_key(&it), bson_iter_key_len(&it));
            JB_LIT(b, " : ");
        }
        jb_value(b, &it, depth);
    }
    if (first) {
        jb_put(b, array ? "]" : "}", 1);
    } else {
        jb_put(b, array ? " ]" : " }", 2);
    }
}

/* The §4.3 change message, rendered by the prototype into b (reset first). */
static void jb_change_message(jbuf_t *b, mc_event_t *ev)
{
    b->len = 0;
    b->unsupported = false;
    jb_reserve(b, 2 * (size_t)mc_event_change(ev)->len + 256);
    JB_LIT(b, "{ \"type\" : \"change\", \"stream\" : ");
    const char *s = mc_event_stream(ev);
    jb_string(b, s, strlen(s));
    JB_LIT(b, ", \"id\" : ");
    jb_string(b, mc_event_id(ev), strlen(mc_event_id(ev)));
    JB_LIT(b, ", \"recipient\" : ");
    if (mc_event_recipient(ev)) {
        /* Already JSON (the identity's relaxed Extended JSON). */
        jb_put(b, mc_event_recipient(ev), strlen(mc_event_recipient(ev)));
    } else {
        JB_LIT(b, "null");
    }
    JB_LIT(b, ", \"change\" : ");
    jb_doc(b, mc_event_change(ev), false, 0);
    JB_LIT(b, " }");
    b->p[b->len] = '\0';
}

/* ---- Stages (b)-(e): microbenchmarks --------------------------------------------------- */

typedef struct stage_result {
    double normalise_s, json_s, sink_s, free_s;
    double proto_s;       /* stage (c'): the one-pass prototype renderer */
    size_t proto_mismatch; /* renderings that differ from mc_event_json() or were refused */
    double calls;
    size_t json_bytes;
} stage_result_t;

static stage_result_t run_stages(const opts_t *o, count_state_t *st)
{
    /* A second engine that owns a stdout sink instance, for this thread to call directly. Its
     * stream watches an idle collection; only its ready event is ever queued. */
    mc_error_t err = {0};
    char *yaml = bson_strdup_printf("mongodb:\n"
                                    "  uri: \"%s\"\n"
                                    "streams:\n"
                                    "  " STREAM_NAME ":\n"
                                    "    db: " DB_NAME "\n"
                                    "    collection: " IDLE_COLL_NAME "\n"
                                    "sinks:\n"
                                    "  - {name: out, type: stdout}\n",
                                    o->uri);
    mc_config_t *config = mc_config_load_string(yaml, strlen(yaml), "stages.yaml", &err);
    if (!config) {
        die("config: %s", err.message);
    }
    mc_engine_opts_t eo = {.no_checkpoint = true};
    mc_engine_t *engine = mc_engine_new(config, &eo, &err);
    if (!engine || mc_engine_start(engine, &err) != 0) {
        die("stage engine: %s", err.message);
    }
    mc_sink_t *sink = mc_engine_sink(engine, "out");
    const mc_sink_type_t *type = sink ? mc_sink_get_type(sink) : NULL;
    if (!type) {
        die("stage engine has no stdout sink");
    }
    /* Its runner calls the sink for the ready event only; after that, this thread is the
     * sink's only caller. */
    for (int i = 0;; i++) {
        mc_sink_stats_t sk;
        if (mc_engine_sink_stats(engine, 0, &sk) == 0 && sk.skipped >= 1) {
            break;
        }
        if (i > 30000) {
            die("the stage engine's stream did not open");
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }

    size_t k = st->kept;
    if (k == 0) {
        die("no change events were kept for the stage benchmarks");
    }
    const bson_t **changes = calloc(k, sizeof(*changes));
    mc_event_t **evs = calloc(k, sizeof(*evs));
    if (!changes || !evs) {
        die("out of memory");
    }
    for (size_t i = 0; i < k; i++) {
        changes[i] = mc_event_change(st->keep[i]);
    }

    stage_result_t r = {0};
    jbuf_t jb = {0};
    size_t proto_sink = 0; /* keeps the prototype's output observable to the compiler */
    uint64_t seq = 1;
    size_t total = 0;
    while (total < (size_t)o->docs) {
        size_t n = (size_t)o->docs - total < k ? (size_t)o->docs - total : k;
        double t0 = thread_cpu_now();
        for (size_t i = 0; i < n; i++) {
            evs[i] = mc_event_new_change(STREAM_NAME, seq++, changes[i], RECIPIENT_PATH, &err);
        }
        double t1 = thread_cpu_now();
        for (size_t i = 0; i < n; i++) {
            if (!evs[i]) {
                die("mc_event_new_change: %s", err.message);
            }
            size_t len = 0;
            if (!mc_event_json(evs[i], &len)) {
                die("mc_event_json returned NULL");
            }
            r.json_bytes += len;
        }
        double t2 = thread_cpu_now();
        for (size_t i = 0; i < n; i++) {
            if (type->publish(sink, evs[i]) < 0) {
                die("stdout sink publish failed");
            }
            if ((i + 1) % DISPATCH_BATCH == 0 && type->flush) {
                type->flush(sink);
            }
        }
        if (type->flush) {
            type->flush(sink);
        }
        double t3 = thread_cpu_now();
        for (size_t i = 0; i < n; i++) {
            mc_event_unref(&evs[i]);
        }
        double t4 = thread_cpu_now();
        r.normalise_s += t1 - t0;
        r.json_s += t2 - t1;
        r.sink_s += t3 - t2;
        r.free_s += t4 - t3;
        total += n;
    }
    r.calls = (double)total;

    /* Stage (c') in a pass of its own, so that its buffer does not change the heap layout
     * the stages above run in (libbson's rendering is realloc-heavy and sensitive to it). */
    for (size_t done = 0; done < total;) {
        size_t n = total - done < k ? total - done : k;
        for (size_t i = 0; i < n; i++) {
            evs[i] = mc_event_new_change(STREAM_NAME, seq++, changes[i], RECIPIENT_PATH, &err);
            if (!evs[i]) {
                die("mc_event_new_change: %s", err.message);
            }
        }
        double t0 = thread_cpu_now();
        for (size_t i = 0; i < n; i++) {
            jb_change_message(&jb, evs[i]);
            proto_sink += jb.len;
        }
        r.proto_s += thread_cpu_now() - t0;
        for (size_t i = 0; i < n; i++) {
            size_t len = 0;
            const char *want = mc_event_json(evs[i], &len);
            jb_change_message(&jb, evs[i]);
            if (!want || jb.unsupported || jb.len != len || memcmp(jb.p, want, len) != 0) {
                r.proto_mismatch++;
            }
            mc_event_unref(&evs[i]);
        }
        done += n;
    }
    free(jb.p);
    if (proto_sink == 0) {
        die("prototype rendered nothing");
    }

    mc_engine_stop(engine, NULL);
    mc_engine_destroy(engine);
    mc_config_destroy(config);
    bson_free(yaml);
    free(changes);
    free(evs);

    fprintf(report,
            "phase=stages calls=%zu sample=%zu json_bytes_per_event=%.0f "
            "normalise_us=%.3f json_us=%.3f sink_write_us=%.3f free_us=%.3f "
            "json_onepass_prototype_us=%.3f prototype_mismatches=%zu\n",
            total, k, (double)r.json_bytes / r.calls, r.normalise_s / r.calls * 1e6,
            r.json_s / r.calls * 1e6, r.sink_s / r.calls * 1e6, r.free_s / r.calls * 1e6,
            r.proto_s / r.calls * 1e6, r.proto_mismatch);
    return r;
}

/* ---- main ----------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    opts_t o;
    parse_opts(argc, argv, &o);
    redirect_stdout(o.sink_out);
    mc_log_set_handler(mc_log_stderr_handler, NULL);
    mc_log_set_level(MC_LOG_WARN);
    mongoc_init();

    mongoc_client_t *client = mongoc_client_new(o.uri);
    if (!client) {
        die("bad uri %s", o.uri);
    }
    char *position = preload(client, &o);

    count_state_t st;
    memset(&st, 0, sizeof(st));
    st.target = (uint64_t)o.docs;
    st.keep_max = o.skip_stages ? 1 : (size_t)o.sample;
    st.keep = calloc(st.keep_max, sizeof(*st.keep));
    if (!st.keep) {
        die("out of memory");
    }
    collect_events(&o, position, &st);

    engine_result_t e = run_engine(&o, position, &st);
    double raw_per_event = o.skip_raw ? -1 : run_raw(&o, position);
    if (!o.skip_stages) {
        stage_result_t s = run_stages(&o, &st);
        double n = s.calls;
        double e2e = e.cpu_s / (double)o.docs;
        double sum = s.normalise_s / n + s.json_s / n + s.sink_s / n + s.free_s / n;
        if (raw_per_event >= 0) {
            sum += raw_per_event;
            /* What the stages do not cover: queue hand-off, thread wake-ups, engine and
             * checkpoint bookkeeping (and measurement noise). */
            fprintf(report,
                    "phase=breakdown e2e_us=%.3f receive_parse_us=%.3f normalise_us=%.3f "
                    "json_us=%.3f sink_write_us=%.3f free_us=%.3f sum_us=%.3f "
                    "residual_us=%.3f\n",
                    e2e * 1e6, raw_per_event * 1e6, s.normalise_s / n * 1e6, s.json_s / n * 1e6,
                    s.sink_s / n * 1e6, s.free_s / n * 1e6, sum * 1e6, (e2e - sum) * 1e6);
        }
    }

    for (size_t i = 0; i < st.kept; i++) {
        mc_event_unref(&st.keep[i]);
    }
    free(st.keep);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, DB_NAME, COLL_NAME);
    mongoc_collection_drop(coll, NULL);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    bson_free(position);
    mongoc_cleanup();
    fclose(report);
    return 0;
}
