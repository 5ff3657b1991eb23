/*
 * broker_client.c: drives the Redis and NATS clients of src/lib/sinks/ the way the broker
 * sinks will (until the sink runners are merged, this is that glue, for the integration
 * tests): events 0..N-1 (stream "orders", recipients user0..user9, positions
 * (1700000000 + k/1000, k%1000 + 1)) written in order with a window in flight, transient
 * failures resent in order, and a position file recording how many events are acknowledged
 * without a gap (rewritten atomically, like a checkpoint), from which a restarted run resumes.
 * A run killed with SIGKILL therefore replays what came after its last recorded position,
 * as a daemon would after a crash.
 *
 *   broker_client redis-xadd URL KEY_TEMPLATE N POSFILE
 *   broker_client redis-publish URL CHANNEL_TEMPLATE RECIPIENT...  (one event each; prints
 *                 the channel of each)
 *   broker_client nats-js URL N POSFILE          (stream ORDERS on mongocast.orders[.*])
 *   broker_client nats-dump URL [STREAM]         (prints "seq msg-id data" per stored message
 *                                                 of STREAM, default ORDERS)
 *   broker_client nats-count URL [STREAM]        (prints how many messages STREAM holds)
 *   broker_client nats-purge URL STREAM KEEP     (removes all but the newest KEEP messages;
 *                                                 prints the new first sequence)
 *
 * Prints one JSON summary line; exit status 0 when every event got a final good outcome.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker_fixture.h"
#include "sinks/nats_client.h"
#include "sinks/redis_stream.h"

#define WINDOW 256
#define KEYS 10

static mc_event_t *make_event(int k)
{
    char owner[16];
    snprintf(owner, sizeof owner, "user%d", k % KEYS);
    return fx_event("orders", (uint64_t)k + 1, 1700000000u + (uint32_t)k / 1000,
                    (uint32_t)k % 1000 + 1, 0, owner, 200);
}

static int read_pos(const char *path)
{
    FILE *f = fopen(path, "r");
    int pos = 0;
    if (f) {
        if (fscanf(f, "%d", &pos) != 1) {
            pos = 0;
        }
        fclose(f);
    }
    return pos;
}

/* Write to a temporary file, fsync, rename: the file holds the old or the new value. */
static void write_pos(const char *path, int pos)
{
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        return;
    }
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d\n", pos);
    if (write(fd, buf, (size_t)n) == n) {
        fsync(fd);
    }
    close(fd);
    rename(tmp, path);
}

/* ---- The in-order window shared by both brokers ------------------------------------ */

typedef enum slot_state { FREE = 0, WAITING, IN_FLIGHT, RETRY, DONE } slot_state_t;

typedef struct slot {
    slot_state_t state;
    int k;
    int outcome; /* broker-specific */
    mc__xadd_op_t op;
    mc_event_t *ev;
} slot_t;

typedef struct run {
    pthread_mutex_t lock; /* NATS callbacks come from libnats threads */
    slot_t slots[WINDOW];
    int next, acked, n; /* next event to place, contiguous acked prefix */
    int outcomes[8];
    int retries;
    const char *posfile;
} run_t;

static run_t R; /* its lock is initialised in main */

/* Advances the acknowledged prefix past DONE slots and records it. Locked. */
static void advance(void)
{
    int before = R.acked;
    while (R.acked < R.next && R.slots[R.acked % WINDOW].state == DONE) {
        slot_t *s = &R.slots[R.acked % WINDOW];
        mc__xadd_op_cleanup(&s->op);
        mc_event_unref(&s->ev);
        s->state = FREE;
        R.acked++;
    }
    if (R.acked != before && (R.acked % 50 == 0 || R.acked == R.n || R.acked - before >= 50)) {
        write_pos(R.posfile, R.acked);
    }
}

/* ---- Redis ------------------------------------------------------------------------------ */

static uv_loop_t loop;
static mc__redis_t *redis;
static mc__subject_template_t *tmpl;

static void on_xadd(void *arg, const mc__xadd_result_t *res)
{
    slot_t *s = arg;
    if (res->outcome == MC__XADD_FAILED && res->cls == MC__REDIS_TRANSIENT) {
        s->state = RETRY;
        R.retries++;
        return;
    }
    R.outcomes[res->outcome]++;
    s->outcome = res->outcome;
    s->state = DONE;
    if (!mc__xadd_written(res->outcome)) {
        fprintf(stderr, "event %d: %s\n", s->k, res->message ? res->message : "?");
    }
    advance();
}

static int redis_xadd(const char *url, const char *key_tmpl, int n, const char *posfile)
{
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    mc_error_t err;
    if (mc__redis_url_parse(url, strlen(url), &o.url, &err) != 0) {
        fprintf(stderr, "%s\n", err.message);
        return 2;
    }
    o.command_timeout_ms = 2000;
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 500;
    uv_loop_init(&loop);
    redis = mc__redis_new(&loop, &o, &err);
    tmpl = mc__subject_template_new(key_tmpl, MC__SUBJECT_REDIS, &err);
    if (!redis || !tmpl) {
        fprintf(stderr, "%s\n", err.message);
        return 2;
    }
    R.n = n;
    R.posfile = posfile;
    R.acked = R.next = read_pos(posfile);
    int start = R.acked;
    while (R.acked < n) {
        /* Fill the window in order; a retry goes out again only once everything before it
         * in the window is back (in-order resend, as the runner does). */
        while (R.next < n && R.next - R.acked < WINDOW) {
            slot_t *s = &R.slots[R.next % WINDOW];
            s->k = R.next++;
            s->ev = make_event(s->k);
            if (mc__xadd_prepare(&s->op, tmpl, s->ev, 0, &err) != 0) {
                fprintf(stderr, "prepare %d: %s\n", s->k, err.message);
                return 1;
            }
            s->state = WAITING;
        }
        bool busy = false;
        for (int k = R.acked; k < R.next; k++) {
            busy |= R.slots[k % WINDOW].state == IN_FLIGHT;
        }
        for (int k = R.acked; k < R.next; k++) {
            slot_t *s = &R.slots[k % WINDOW];
            if (s->state == WAITING || (s->state == RETRY && !busy)) {
                if (mc__xadd_send(redis, &s->op, on_xadd, s) == 0) {
                    s->state = IN_FLIGHT;
                    busy = true;
                }
            }
        }
        uv_run(&loop, UV_RUN_ONCE);
    }
    printf("{\"start\":%d,\"added\":%d,\"duplicate\":%d,\"trimmed\":%d,\"failed\":%d,"
           "\"retries\":%d}\n",
           start, R.outcomes[MC__XADD_ADDED], R.outcomes[MC__XADD_DUPLICATE],
           R.outcomes[MC__XADD_TRIMMED],
           R.outcomes[MC__XADD_COLLISION] + R.outcomes[MC__XADD_GAP] + R.outcomes[MC__XADD_FAILED],
           R.retries);
    return R.outcomes[MC__XADD_COLLISION] + R.outcomes[MC__XADD_GAP] + R.outcomes[MC__XADD_FAILED]
               ? 1
               : 0;
}

static bool published_done;
static int publish_status;

static void on_publish(void *arg, const mc__redis_result_t *res)
{
    (void)arg;
    publish_status |= res->status;
    published_done = true;
}

static int redis_publish(const char *url, const char *chan_tmpl, char **recipients, int n)
{
    mc__redis_opts_t o;
    memset(&o, 0, sizeof o);
    mc_error_t err;
    if (mc__redis_url_parse(url, strlen(url), &o.url, &err) != 0) {
        return 2;
    }
    uv_loop_init(&loop);
    redis = mc__redis_new(&loop, &o, &err);
    tmpl = mc__subject_template_new(chan_tmpl, MC__SUBJECT_REDIS, &err);
    if (!redis || !tmpl) {
        fprintf(stderr, "%s\n", err.message);
        return 2;
    }
    for (int k = 0; k < n; k++) {
        mc_event_t *ev =
            fx_event("orders", (uint64_t)k + 1, 1700000000u, (uint32_t)k + 1, 0, recipients[k], 10);
        mc__subject_values_t v;
        mc__subject_values_from_event(&v, ev);
        char chan[MC__SUBJECT_MAX + 1];
        size_t clen = 0, mlen = 0;
        mc__subject_template_render(tmpl, &v, chan, sizeof chan, &clen, NULL);
        const char *msg = mc_event_json(ev, &mlen);
        const char *argv[] = {"PUBLISH", chan, msg};
        size_t lens[] = {7, clen, mlen};
        published_done = false;
        mc__redis_command(redis, 3, argv, lens, on_publish, NULL);
        while (!published_done) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        printf("%s\n", chan);
        mc_event_unref(&ev);
    }
    return publish_status ? 1 : 0;
}

/* ---- NATS --------------------------------------------------------------------------------- */

static void on_pub_ack(void *arg, const mc__nats_result_t *res)
{
    slot_t *s = arg;
    pthread_mutex_lock(&R.lock);
    if (res->outcome == MC__NATS_FAILED && res->cls == MC__NATS_TRANSIENT) {
        s->state = RETRY;
        R.retries++;
    } else {
        R.outcomes[res->outcome]++;
        s->state = DONE;
        if (res->outcome == MC__NATS_FAILED) {
            fprintf(stderr, "event %d: %s\n", s->k, res->message ? res->message : "?");
        }
        advance();
    }
    pthread_mutex_unlock(&R.lock);
}

static mc__nats_t *nats_connect(const char *url)
{
    mc__nats_opts_t o;
    memset(&o, 0, sizeof o);
    o.url = url;
    o.ack_timeout_ms = 2000;
    o.backoff_initial_ms = 20;
    o.backoff_max_ms = 500;
    mc_error_t err;
    mc__nats_t *n = mc__nats_new(&o, &err);
    if (!n) {
        fprintf(stderr, "%s\n", err.message);
        return NULL;
    }
    int64_t deadline = fx_now_ms() + 20000;
    const char *subjects[] = {"mongocast.orders", "mongocast.orders.*"};
    bool created = false;
    while (mc__nats_ensure_stream(n, "ORDERS", subjects, 2, 120000, &created, &err) != 0) {
        if (fx_now_ms() > deadline) {
            fprintf(stderr, "%s\n", err.message);
            return NULL;
        }
        usleep(50000);
    }
    return n;
}

static int nats_js(const char *url, int n, const char *posfile)
{
    mc__nats_t *nc = nats_connect(url);
    if (!nc) {
        return 2;
    }
    tmpl = mc__subject_template_new(MC__SUBJECT_DEFAULT_NATS, MC__SUBJECT_NATS, NULL);
    pthread_mutex_lock(&R.lock);
    R.n = n;
    R.posfile = posfile;
    R.acked = R.next = read_pos(posfile);
    int start = R.acked;
    while (R.acked < n) {
        while (R.next < n && R.next - R.acked < WINDOW) {
            slot_t *s = &R.slots[R.next % WINDOW];
            s->k = R.next++;
            s->ev = make_event(s->k);
            s->state = WAITING;
        }
        bool busy = false;
        for (int k = R.acked; k < R.next; k++) {
            busy |= R.slots[k % WINDOW].state == IN_FLIGHT;
        }
        for (int k = R.acked; k < R.next; k++) {
            slot_t *s = &R.slots[k % WINDOW];
            if (s->state != WAITING && !(s->state == RETRY && !busy)) {
                continue;
            }
            mc__subject_values_t v;
            mc__subject_values_from_event(&v, s->ev);
            char subj[MC__SUBJECT_MAX + 1];
            size_t slen = 0, mlen = 0;
            mc__subject_template_render(tmpl, &v, subj, sizeof subj, &slen, NULL);
            const char *msg = mc_event_json(s->ev, &mlen);
            mc__nats_headers_t h = {v.type.p, v.stream.p, v.recipient.p, v.recipient.len};
            s->state = IN_FLIGHT; /* before: the PubAck may come back at once */
            pthread_mutex_unlock(&R.lock);
            /* Ordered: stored only right after the previous event (its id is known from its
             * position, as a sink knows the id of its stored position). */
            char prev[160];
            if (s->k > 0) {
                fx_token(prev, sizeof prev, 1700000000u + (uint32_t)(s->k - 1) / 1000,
                         (uint32_t)(s->k - 1) % 1000 + 1, 0);
            }
            int rc = mc__nats_js_publish(nc, subj, mc_event_id(s->ev), s->k > 0 ? prev : NULL, &h,
                                         msg, mlen, on_pub_ack, s, NULL);
            pthread_mutex_lock(&R.lock);
            if (rc != 0) {
                s->state = s->state == IN_FLIGHT ? RETRY : s->state;
                break;
            }
            busy = true;
        }
        pthread_mutex_unlock(&R.lock);
        usleep(2000);
        pthread_mutex_lock(&R.lock);
    }
    pthread_mutex_unlock(&R.lock);
    printf("{\"start\":%d,\"stored\":%d,\"duplicate\":%d,\"failed\":%d,\"retries\":%d}\n", start,
           R.outcomes[MC__NATS_STORED], R.outcomes[MC__NATS_DUPLICATE], R.outcomes[MC__NATS_FAILED],
           R.retries);
    mc__nats_destroy(nc);
    return R.outcomes[MC__NATS_FAILED] ? 1 : 0;
}

/* Prints "seq msg-id data" per message of `stream` (dump), or the message count (count). */
/* Removes all but the newest `keep` messages of `stream` (as its limits would). */
static int nats_purge(const char *url, const char *stream, uint64_t keep)
{
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    jsStreamInfo *si = NULL;
    jsOptions o;
    jsOptions_Init(&o);
    o.Stream.Purge.Keep = keep;
    int rc = 0;
    if (natsConnection_ConnectTo(&nc, url) != NATS_OK ||
        natsConnection_JetStream(&js, nc, NULL) != NATS_OK ||
        js_PurgeStream(js, stream, &o, NULL) != NATS_OK ||
        js_GetStreamInfo(&si, js, stream, NULL, NULL) != NATS_OK) {
        fprintf(stderr, "cannot purge stream %s\n", stream);
        rc = 2;
    } else {
        printf("%llu\n", (unsigned long long)si->State.FirstSeq);
    }
    jsStreamInfo_Destroy(si);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return rc;
}

static int nats_dump(const char *url, const char *stream, bool count_only)
{
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    jsStreamInfo *si = NULL;
    if (natsConnection_ConnectTo(&nc, url) != NATS_OK ||
        natsConnection_JetStream(&js, nc, NULL) != NATS_OK ||
        js_GetStreamInfo(&si, js, stream, NULL, NULL) != NATS_OK) {
        fprintf(stderr, "cannot read stream %s\n", stream);
        jsCtx_Destroy(js);
        natsConnection_Destroy(nc);
        return 2;
    }
    if (count_only) {
        printf("%llu\n", (unsigned long long)si->State.Msgs);
    }
    for (uint64_t seq = si->State.FirstSeq; !count_only && seq && seq <= si->State.LastSeq;
         seq++) {
        natsMsg *m = NULL;
        if (js_GetMsg(&m, js, stream, seq, NULL, NULL) != NATS_OK) {
            continue;
        }
        const char *id = NULL;
        natsMsgHeader_Get(m, "Nats-Msg-Id", &id);
        printf("%llu %s %.*s\n", (unsigned long long)seq, id ? id : "-", natsMsg_GetDataLength(m),
               natsMsg_GetData(m));
        natsMsg_Destroy(m);
    }
    jsStreamInfo_Destroy(si);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    pthread_mutex_init(&R.lock, NULL);
    if (argc >= 6 && strcmp(argv[1], "redis-xadd") == 0) {
        return redis_xadd(argv[2], argv[3], atoi(argv[4]), argv[5]);
    }
    if (argc >= 5 && strcmp(argv[1], "redis-publish") == 0) {
        return redis_publish(argv[2], argv[3], argv + 4, argc - 4);
    }
    if (argc >= 5 && strcmp(argv[1], "nats-js") == 0) {
        return nats_js(argv[2], atoi(argv[3]), argv[4]);
    }
    if (argc >= 3 && strcmp(argv[1], "nats-dump") == 0) {
        return nats_dump(argv[2], argc >= 4 ? argv[3] : "ORDERS", false);
    }
    if (argc >= 5 && strcmp(argv[1], "nats-purge") == 0) {
        return nats_purge(argv[2], argv[3], strtoull(argv[4], NULL, 10));
    }
    if (argc >= 3 && strcmp(argv[1], "nats-count") == 0) {
        return nats_dump(argv[2], argc >= 4 ? argv[3] : "ORDERS", true);
    }
    fprintf(stderr, "usage: see the comment at the top of broker_client.c\n");
    return 2;
}
