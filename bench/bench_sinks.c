/*
 * bench_sinks.c: raw throughput of the sink clients (src/lib/sinks/), so that the sink work
 * built on them can be compared with what the clients alone cost. Each mode starts its own
 * broker (or receiver) as a child process on a free loopback port, sends N prepared events
 * of about SIZE-byte documents (their JSON message rendered before the clock starts, as the
 * engine renders it once for every sink), and prints one key=value line:
 *   mode= events= wall_s= cpu_s= ev_per_cpu_s= ev_per_s= broker_cpu_s= ev_per_broker_cpu_s=
 * cpu_s is this process's CPU (user + system, all threads); broker_cpu_s the child's, read
 * from /proc/PID/stat.
 *
 * Modes:
 *   redis_xadd         mc__xadd (exactly-once XADD) on the async client, WINDOW in flight
 *   redis_publish      PUBLISH to mongocast:{stream}:{recipient} on the async client
 *   redis_raw_sync     plain hiredis, blocking, pipelined in batches of WINDOW (the other
 *                      executor the Redis sink could use: a thread of its own)
 *   redis_raw_debian   plain hiredis async on the libuv adapter Debian's hiredis 0.14 ships
 *   nats_js            mc__nats_js_publish (Nats-Msg-Id = event id, headers), WINDOW PubAcks
 *                      outstanding, into a file-backed JetStream stream (duplicate window 2 min)
 *   nats_core          mc__nats_publish (core NATS, headers), then one flush round trip
 *   mongo_insert       mc__mongo_sink_doc + mc__mongo_insert_ordered in batches of WINDOW
 *                      (w: majority) into mongo-emulator (MC_EMULATOR, or the build's own)
 * Webhooks are measured with tests/integration/clients/webhook_client against the Python
 * receiver (scripts/bench-sinks.sh), which reports the same figures.
 *
 * Usage: bench_sinks MODE [--events N] [--size BYTES] [--window W] [--pool P]
 * (--pool: NATS modes prepare P events and cycle through them, with message ids made unique
 * by a counter, so long runs need little memory.)
 * Single-threaded except where a client library runs threads of its own (libnats).
 */
#include <hiredis/adapters/libuv.h>

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "broker_fixture.h"
#include "emu_fixture.h"
#include "sinks/mongo_sink.h"
#include "sinks/nats_client.h"
#include "sinks/redis_client.h"
#include "sinks/redis_stream.h"

typedef struct bench {
    const char *mode;
    int events;
    int size;
    int window;
    int pool; /* events prepared; NATS modes cycle through them (--pool) */
    mc_event_t **evs;
    double wall0, cpu0, broker0;
    pid_t broker;
} bench_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* utime + stime of a process in seconds, -1 when unreadable. */
static double pid_cpu_s(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) {
        return -1;
    }
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void prepare_events(bench_t *b)
{
    b->evs = calloc((size_t)b->pool, sizeof *b->evs);
    for (int k = 0; k < b->pool; k++) {
        b->evs[k] = fx_event("orders", (uint64_t)k + 1, 1700000000u + (uint32_t)k / 1000,
                             (uint32_t)k % 1000 + 1, 0, k % 2 ? "alice" : "bob", (size_t)b->size);
        size_t len = 0;
        mc_event_json(b->evs[k], &len); /* rendered once, as the engine does for all sinks */
    }
    fprintf(stderr, "bench: %d events prepared\n", b->pool);
}

static void start_clock(bench_t *b)
{
    b->wall0 = now_s();
    b->cpu0 = cpu_s();
    b->broker0 = pid_cpu_s(b->broker);
}

static void report(bench_t *b, int done)
{
    double wall = now_s() - b->wall0, cpu = cpu_s() - b->cpu0;
    double bcpu = pid_cpu_s(b->broker) - b->broker0;
    printf("mode=%s events=%d size=%d window=%d wall_s=%.3f cpu_s=%.3f ev_per_cpu_s=%.0f "
           "ev_per_s=%.0f broker_cpu_s=%.3f ev_per_broker_cpu_s=%.0f\n",
           b->mode, done, b->size, b->window, wall, cpu, done / cpu, done / wall, bcpu,
           bcpu > 0 ? done / bcpu : 0.0);
    fflush(stdout);
}

/* ---- Redis ------------------------------------------------------------------------------ */

typedef struct redis_run {
    bench_t *b;
    uv_loop_t loop;
    mc__redis_t *client;
    mc__subject_template_t *tmpl;
    mc__xadd_op_t *ops;
    int sent, done, failed;
} redis_run_t;

static void redis_pump(redis_run_t *rr);

static void on_xadd(void *arg, const mc__xadd_result_t *res)
{
    redis_run_t *rr = arg;
    rr->done++;
    if (!mc__xadd_written(res->outcome)) {
        rr->failed++;
    }
    if (rr->sent - rr->done <= rr->b->window / 2) {
        redis_pump(rr);
    }
}

static void on_publish(void *arg, const mc__redis_result_t *res)
{
    redis_run_t *rr = arg;
    rr->done++;
    if (res->status != 0) {
        rr->failed++;
    }
    if (rr->sent - rr->done <= rr->b->window / 2) {
        redis_pump(rr);
    }
}

/* Keeps up to `window` commands in flight, topping up in bursts of half a window. */
static void redis_pump(redis_run_t *rr)
{
    bench_t *b = rr->b;
    while (rr->sent < b->events && rr->sent - rr->done < b->window) {
        int k = rr->sent++;
        if (strcmp(b->mode, "redis_xadd") == 0) {
            if (mc__xadd_send(rr->client, &rr->ops[k], on_xadd, rr) != 0) {
                rr->failed++, rr->done++;
            }
        } else {
            char chan[MC__SUBJECT_MAX + 1];
            size_t clen = 0, mlen = 0;
            mc__subject_values_t v;
            mc__subject_values_from_event(&v, b->evs[k]);
            mc__subject_template_render(rr->tmpl, &v, chan, sizeof chan, &clen, NULL);
            const char *msg = mc_event_json(b->evs[k], &mlen);
            const char *argv[] = {"PUBLISH", chan, msg};
            size_t lens[] = {7, clen, mlen};
            if (mc__redis_command(rr->client, 3, argv, lens, on_publish, rr) != 0) {
                rr->failed++, rr->done++;
            }
        }
    }
}

static int bench_redis_client(bench_t *b, int port)
{
    redis_run_t rr;
    memset(&rr, 0, sizeof rr);
    rr.b = b;
    uv_loop_init(&rr.loop);
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    mc__redis_url_parse(url, strlen(url), &o.url, NULL);
    rr.client = mc__redis_new(&rr.loop, &o, NULL);
    bool xadd = strcmp(b->mode, "redis_xadd") == 0;
    rr.tmpl = mc__subject_template_new(xadd ? "bench:{stream}" : MC__SUBJECT_DEFAULT_REDIS,
                                       MC__SUBJECT_REDIS, NULL);
    if (xadd) {
        rr.ops = calloc((size_t)b->events, sizeof *rr.ops);
        for (int k = 0; k < b->events; k++) {
            mc__xadd_prepare(&rr.ops[k], rr.tmpl, b->evs[k], 0, NULL);
        }
    }
    /* Connect first, so the figure is the steady state. */
    static const bool never = false;
    mc__redis_status_t st;
    for (int i = 0; i < 5000; i++) {
        mc__redis_status(rr.client, &st);
        if (st.state == MC__REDIS_READY) {
            break;
        }
        fx_run_until(&rr.loop, &never, 1);
    }
    start_clock(b);
    redis_pump(&rr);
    while (rr.done < b->events) {
        uv_run(&rr.loop, UV_RUN_ONCE);
    }
    report(b, rr.done - rr.failed);
    if (rr.failed) {
        fprintf(stderr, "bench: %d of %d failed\n", rr.failed, b->events);
    }
    mc__redis_close(rr.client, NULL, NULL);
    uv_run(&rr.loop, UV_RUN_DEFAULT);
    uv_loop_close(&rr.loop);
    for (int k = 0; xadd && k < b->events; k++) {
        mc__xadd_op_cleanup(&rr.ops[k]);
    }
    free(rr.ops);
    mc__subject_template_destroy(rr.tmpl);
    return rr.failed ? 1 : 0;
}

/* The argv of the k-th XADD (plain hiredis modes); `idbuf` receives the entry ID. */
static int raw_xadd_argv(bench_t *b, int k, const char **argv, size_t *lens, char *idbuf)
{
    mc__redis_stream_id_t id;
    mc__redis_stream_id_from_event(b->evs[k], &id, NULL);
    mc__redis_stream_id_format(&id, idbuf);
    mc__subject_values_t v;
    mc__subject_values_from_event(&v, b->evs[k]);
    size_t mlen = 0;
    const char *msg = mc_event_json(b->evs[k], &mlen);
    const char *eid = mc_event_id(b->evs[k]);
    const char *a[] = {"XADD",        "bench:raw", idbuf,    "id",       eid,
                       "type",        v.type.p,    "stream", v.stream.p, "recipient",
                       v.recipient.p, "message",   msg};
    for (int i = 0; i < 13; i++) {
        argv[i] = a[i];
        lens[i] = i == 12 ? mlen : strlen(a[i]);
    }
    return 13;
}

static int bench_redis_raw_sync(bench_t *b, int port)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    if (!c || c->err) {
        fprintf(stderr, "bench: cannot connect\n");
        return 1;
    }
    start_clock(b);
    int k = 0, failed = 0;
    while (k < b->events) {
        int n = 0;
        for (; n < b->window && k + n < b->events; n++) {
            const char *argv[13];
            size_t lens[13];
            char idbuf[MC__REDIS_ID_BUF];
            int argc = raw_xadd_argv(b, k + n, argv, lens, idbuf);
            redisAppendCommandArgv(c, argc, argv, lens);
        }
        for (int j = 0; j < n; j++) {
            void *reply = NULL;
            if (redisGetReply(c, &reply) != REDIS_OK) {
                fprintf(stderr, "bench: %s\n", c->errstr);
                return 1;
            }
            failed += ((redisReply *)reply)->type == REDIS_REPLY_ERROR;
            freeReplyObject(reply);
        }
        k += n;
    }
    report(b, k - failed);
    redisFree(c);
    return failed ? 1 : 0;
}

typedef struct raw_async {
    bench_t *b;
    redisAsyncContext *ac;
    int sent, done, failed;
} raw_async_t;

static void raw_async_pump(raw_async_t *ra);

static void raw_async_cb(redisAsyncContext *ac, void *reply, void *priv)
{
    (void)ac;
    raw_async_t *ra = priv;
    ra->done++;
    if (!reply || ((redisReply *)reply)->type == REDIS_REPLY_ERROR) {
        ra->failed++;
    }
    if (ra->sent - ra->done <= ra->b->window / 2) {
        raw_async_pump(ra);
    }
    if (ra->done == ra->b->events) {
        redisAsyncDisconnect(ra->ac);
    }
}

static void raw_async_pump(raw_async_t *ra)
{
    while (ra->sent < ra->b->events && ra->sent - ra->done < ra->b->window) {
        const char *argv[13];
        size_t lens[13];
        char idbuf[MC__REDIS_ID_BUF];
        int argc = raw_xadd_argv(ra->b, ra->sent++, argv, lens, idbuf);
        redisAsyncCommandArgv(ra->ac, raw_async_cb, ra, argc, argv, lens);
    }
}

static int bench_redis_raw_debian(bench_t *b, int port)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    raw_async_t ra = {b, redisAsyncConnect("127.0.0.1", port), 0, 0, 0};
    if (!ra.ac || ra.ac->err) {
        fprintf(stderr, "bench: cannot connect\n");
        return 1;
    }
    redisLibuvAttach(ra.ac, &loop);
    start_clock(b);
    raw_async_pump(&ra);
    uv_run(&loop, UV_RUN_DEFAULT);
    report(b, ra.done - ra.failed);
    uv_loop_close(&loop);
    return ra.failed ? 1 : 0;
}

static int bench_redis(bench_t *b)
{
    fx_redis_t srv;
    memset(&srv, 0, sizeof srv);
    if (!fx_redis_start(&srv, 0, NULL)) {
        fprintf(stderr, "bench: cannot start redis-server\n");
        return 1;
    }
    b->broker = srv.pid;
    int rc;
    if (strcmp(b->mode, "redis_raw_sync") == 0) {
        rc = bench_redis_raw_sync(b, srv.port);
    } else if (strcmp(b->mode, "redis_raw_debian") == 0) {
        rc = bench_redis_raw_debian(b, srv.port);
    } else {
        rc = bench_redis_client(b, srv.port);
    }
    fx_redis_cleanup(&srv);
    return rc;
}

/* ---- NATS --------------------------------------------------------------------------------- */

typedef struct nats_run {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done, failed;
} nats_run_t;

static void on_nats_ack(void *arg, const mc__nats_result_t *res)
{
    nats_run_t *nr = arg;
    pthread_mutex_lock(&nr->lock);
    nr->done++;
    nr->failed += res->outcome == MC__NATS_FAILED;
    pthread_cond_signal(&nr->cond);
    pthread_mutex_unlock(&nr->lock);
}

static int bench_nats(bench_t *b)
{
    fx_nats_t srv;
    memset(&srv, 0, sizeof srv);
    if (!fx_nats_start(&srv, 0, NULL)) {
        fprintf(stderr, "bench: cannot start nats-server\n");
        return 1;
    }
    b->broker = srv.pid;
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", srv.port);
    mc__nats_opts_t o;
    memset(&o, 0, sizeof o);
    o.url = url;
    mc_error_t err;
    mc__nats_t *n = mc__nats_new(&o, &err);
    mc__nats_status_t st;
    for (int i = 0; i < 500; i++) {
        mc__nats_status(n, &st);
        if (st.state == MC__NATS_CONNECTED) {
            break;
        }
        usleep(10000);
    }
    const char *subjects[] = {"mongocast.orders", "mongocast.orders.*"};
    bool created = false;
    if (mc__nats_ensure_stream(n, "BENCH", subjects, 2, 120000, &created, &err) != 0) {
        fprintf(stderr, "bench: %s\n", err.message);
        return 1;
    }
    mc__subject_template_t *tmpl =
        mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    bool js = strcmp(b->mode, "nats_js") == 0;
    nats_run_t nr = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
    int failed = 0;
    start_clock(b);
    for (int k = 0; k < b->events; k++) {
        mc_event_t *ev = b->evs[k % b->pool];
        mc__subject_values_t v;
        mc__subject_values_from_event(&v, ev);
        char subj[MC__SUBJECT_MAX + 1];
        size_t slen = 0, mlen = 0;
        mc__subject_template_render(tmpl, &v, subj, sizeof subj, &slen, NULL);
        const char *msg = mc_event_json(ev, &mlen);
        /* With a pool of events reused, the message id must still be new each time. */
        char idbuf[256];
        const char *msg_id = mc_event_id(ev);
        if (b->pool < b->events) {
            snprintf(idbuf, sizeof idbuf, "%s-%d", msg_id, k);
            msg_id = idbuf;
        }
        mc__nats_headers_t h = {v.type.p, v.stream.p, v.recipient.p, v.recipient.len};
        if (!js) {
            failed += mc__nats_publish(n, subj, &h, msg, mlen, NULL) != 0;
            continue;
        }
        pthread_mutex_lock(&nr.lock);
        while (k - nr.done >= b->window) {
            pthread_cond_wait(&nr.cond, &nr.lock);
        }
        pthread_mutex_unlock(&nr.lock);
        int rc;
        while ((rc = mc__nats_js_publish(n, subj, msg_id, NULL, &h, msg, mlen, on_nats_ack, &nr,
                                         NULL)) == MC_EAGAIN) {
            usleep(100);
        }
        if (rc != 0) {
            failed++;
            pthread_mutex_lock(&nr.lock);
            nr.done++;
            pthread_mutex_unlock(&nr.lock);
        }
    }
    if (js) {
        pthread_mutex_lock(&nr.lock);
        while (nr.done < b->events) {
            pthread_cond_wait(&nr.cond, &nr.lock);
        }
        failed += nr.failed;
        pthread_mutex_unlock(&nr.lock);
    } else {
        /* Core NATS has no acknowledgement: a request/reply after the last message bounds the
         * time by when the server has read everything (one connection, in order). */
        /* A JetStream PubAck round trip on a fresh id serves as that flush. */
        nats_run_t fl = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
        mc__nats_js_publish(n, "mongocast.orders", "flush", NULL, NULL, "{}", 2, on_nats_ack, &fl,
                            NULL);
        pthread_mutex_lock(&fl.lock);
        while (fl.done < 1) {
            pthread_cond_wait(&fl.cond, &fl.lock);
        }
        pthread_mutex_unlock(&fl.lock);
    }
    report(b, b->events - failed);
    if (failed) {
        fprintf(stderr, "bench: %d of %d failed\n", failed, b->events);
    }
    mc__nats_destroy(n);
    mc__subject_template_destroy(tmpl);
    fx_nats_cleanup(&srv);
    return failed ? 1 : 0;
}

/* ---- MongoDB ------------------------------------------------------------------------------ */

static int bench_mongo(bench_t *b)
{
    if (!getenv("MC_EMULATOR")) {
        /* This binary is build/bench/bench_sinks; the emulator is build/tools/... */
        char self[900];
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n > 0) {
            self[n] = '\0';
            char *slash = strrchr(self, '/');
            if (slash) {
                *slash = '\0';
                char path[1024];
                snprintf(path, sizeof path, "%s/../tools/mongo-emulator/mongo-emulator", self);
                setenv("MC_EMULATOR", path, 1);
            }
        }
    }
    char uri[128];
    if (!emu_fixture_find() || (b->broker = emu_fixture_start(uri, sizeof uri)) <= 0) {
        fprintf(stderr, "bench: cannot start mongo-emulator\n");
        return 1;
    }
    mongoc_init();
    mongoc_client_t *client = mongoc_client_new(uri);
    mongoc_collection_t *coll = mongoc_client_get_collection(client, "bench", "activity");
    mongoc_write_concern_t *wc = mc__mongo_write_concern(NULL, 0, false, NULL);
    /* One round trip first, so connecting is not measured. */
    bson_t ping = BSON_INITIALIZER;
    BSON_APPEND_INT32(&ping, "ping", 1);
    mongoc_client_command_simple(client, "admin", &ping, NULL, NULL, NULL);
    bson_destroy(&ping);
    bson_t **docs = calloc((size_t)b->window, sizeof *docs);
    int failed = 0;
    start_clock(b);
    for (int k = 0; k < b->events; k += b->window) {
        int n = b->events - k < b->window ? b->events - k : b->window;
        for (int i = 0; i < n; i++) {
            docs[i] = bson_new();
            mc__mongo_sink_doc(b->evs[k + i], NULL, docs[i], NULL);
        }
        mc__mongo_insert_result_t res;
        if (mc__mongo_insert_ordered(coll, (const bson_t *const *)docs, (size_t)n, wc, NULL, &res,
                                     NULL) != 0) {
            failed += n - (int)res.written;
        }
        for (int i = 0; i < n; i++) {
            bson_destroy(docs[i]);
        }
    }
    report(b, b->events - failed);
    free(docs);
    mongoc_write_concern_destroy(wc);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    mongoc_cleanup();
    emu_fixture_stop(b->broker);
    return failed ? 1 : 0;
}

/* ---- Main --------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_sinks MODE [--events N] [--size BYTES] [--window W]\n");
        return 2;
    }
    bench_t b;
    memset(&b, 0, sizeof b);
    b.mode = argv[1];
    b.events = 200000;
    b.size = 1024;
    b.window = 1024;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--events") == 0) {
            b.events = atoi(argv[i + 1]);
        } else if (strcmp(argv[i], "--size") == 0) {
            b.size = atoi(argv[i + 1]);
        } else if (strcmp(argv[i], "--window") == 0) {
            b.window = atoi(argv[i + 1]);
        } else if (strcmp(argv[i], "--pool") == 0) {
            b.pool = atoi(argv[i + 1]);
        } else {
            fprintf(stderr, "bench: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (b.pool <= 0 || b.pool > b.events || strncmp(b.mode, "nats_", 5) != 0) {
        b.pool = b.events;
    }
    prepare_events(&b);
    int rc = 2;
    if (strncmp(b.mode, "redis_", 6) == 0) {
        rc = bench_redis(&b);
    } else if (strncmp(b.mode, "nats_", 5) == 0) {
        rc = bench_nats(&b);
    } else if (strcmp(b.mode, "mongo_insert") == 0) {
        rc = bench_mongo(&b);
    } else {
        fprintf(stderr, "bench: unknown mode %s\n", b.mode);
    }
    for (int k = 0; k < b.pool; k++) {
        mc_event_unref(&b.evs[k]);
    }
    free(b.evs);
    return rc;
}
