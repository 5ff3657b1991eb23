/*
 * webhook_client.c: drives the webhook building blocks of src/lib/sinks/ the way the webhook
 * sink will (until the sink runners are merged, this is that glue, for tests and benchmarks):
 * N synthetic change events (recipients user0..userK-1), ordered per recipient by the key
 * scheduler with `--concurrency` requests in flight, each request signed per Standard
 * Webhooks (a fresh webhook-timestamp and signature per attempt, the event id as
 * webhook-id), the body in `--format` (message | cloudevents), `--batch` events per request
 * (a JSON array), transient failures retried with capped full-jitter backoff or the server's
 * Retry-After, holding the key so later events of that recipient wait; permanent failures
 * and events out of attempts appended to the `--dead-letter` file as JSON lines.
 *
 * Prints one JSON line at the end: {"events", "delivered", "dead", "attempts", "requests",
 * "wall_s", "cpu_s"}. Exit status 0 when every event was delivered or dead-lettered.
 * Single thread: everything runs on one libuv loop.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker_fixture.h"
#include "engine_private.h"
#include "json_writer.h"
#include "sinks/http_client.h"
#include "sinks/key_sched.h"
#include "sinks/webhook_format.h"
#include "sinks/webhook_sign.h"

typedef struct job {
    uv_timer_t retry; /* first: its close callback frees the job */
    mc_event_t **evs; /* `count` events (consecutive ones of one recipient when batching) */
    int count;
    int attempts;
    int64_t first_ms;
    bool timer_init;
    mc__backoff_t backoff; /* per job: the delay grows with this job's own attempts */
    mc__json_buf_t body;
} job_t;

typedef struct app {
    uv_loop_t loop;
    mc__http_t *http;
    mc__ksched_t *sched;
    mc__webhook_signer_t *signer;
    mc__webhook_format_t format;
    const char *url;
    char **extra_headers;
    int n_extra;
    int max_attempts;
    int64_t max_retry_ms;
    FILE *dead;
    int events, delivered, dead_count, attempts, requests;
    int jobs_left;
} app_t;

static app_t app;

static void pump(void);

static void dead_letter(job_t *j, const char *why, long status)
{
    for (int k = 0; k < j->count; k++) {
        mc__json_buf_t b;
        mc__json_buf_init(&b, 256, 0);
        MC__JSON_LIT(&b, "{\"id\":");
        mc__json_write_string(&b, mc_event_id(j->evs[k]), strlen(mc_event_id(j->evs[k])));
        char num[96];
        int n = snprintf(num, sizeof num, ",\"status\":%ld,\"attempts\":%d,\"error\":", status,
                         j->attempts);
        mc__json_buf_append(&b, num, (size_t)n);
        mc__json_write_string(&b, why, strlen(why));
        MC__JSON_LIT(&b, "}\n");
        size_t len = 0;
        char *line = mc__json_buf_steal(&b, &len);
        if (line) {
            fwrite(line, 1, len, app.dead);
            bson_free(line);
        }
    }
    fflush(app.dead);
    app.dead_count += j->count;
}

static void job_closed(uv_handle_t *h)
{
    free(h); /* the job: its timer is its first member */
}

static void finish_job(job_t *j)
{
    mc__ksched_done(app.sched, j);
    for (int k = 0; k < j->count; k++) {
        mc_event_unref(&j->evs[k]);
    }
    free(j->evs);
    mc__json_buf_destroy(&j->body);
    app.jobs_left--;
    if (j->timer_init) {
        uv_close((uv_handle_t *)&j->retry, job_closed);
    } else {
        free(j);
    }
}

static void attempt(job_t *j);

static void on_retry(uv_timer_t *t)
{
    attempt(t->data);
}

static void on_response(void *arg, const mc__http_result_t *res)
{
    job_t *j = arg;
    if (res->cls == MC__HTTP_OK) {
        app.delivered += j->count;
        finish_job(j);
        pump();
        return;
    }
    int64_t elapsed = mc__now_ms() - j->first_ms;
    if (res->cls == MC__HTTP_PERMANENT || res->status == MC_ECLOSED ||
        j->attempts >= app.max_attempts || elapsed >= app.max_retry_ms) {
        dead_letter(j, res->message ? res->message : "failed", res->http_status);
        finish_job(j);
        pump();
        return;
    }
    /* Transient: wait (the key stays blocked), then the same event again. */
    int64_t delay = mc__backoff_next(&j->backoff);
    if (res->retry_after_ms > delay) {
        delay = res->retry_after_ms;
    }
    if (!j->timer_init) {
        uv_timer_init(&app.loop, &j->retry);
        j->retry.data = j;
        j->timer_init = true;
    }
    uv_timer_start(&j->retry, on_retry, (uint64_t)delay, 0);
}

static void attempt(job_t *j)
{
    j->attempts++;
    app.attempts += j->count;
    app.requests++;
    if (!j->first_ms) {
        j->first_ms = mc__now_ms();
    }
    /* The body is rendered once; only the timestamp and signatures change per attempt. */
    if (j->body.len == 0) {
        bool batch = j->count > 1;
        if (batch) {
            MC__JSON_LIT(&j->body, "[");
        }
        for (int k = 0; k < j->count; k++) {
            if (k) {
                MC__JSON_LIT(&j->body, ",");
            }
            mc__webhook_body_append(&j->body, j->evs[k], app.format, NULL);
        }
        if (batch) {
            MC__JSON_LIT(&j->body, "]");
        }
    }
    const char *id = mc_event_id(j->evs[0]);
    int64_t ts = mc__wall_ms() / 1000;
    char sig[MC__WEBHOOK_SIG_HEADER_MAX];
    if (mc__webhook_sign(app.signer, id, strlen(id), ts, j->body.data, j->body.len, sig, NULL,
                         NULL) != 0) {
        dead_letter(j, "cannot sign", 0);
        finish_job(j);
        return;
    }
    char h_id[300], h_ts[64], h_sig[MC__WEBHOOK_SIG_HEADER_MAX + 32], h_ct[96];
    snprintf(h_id, sizeof h_id, "webhook-id: %s", id);
    snprintf(h_ts, sizeof h_ts, "webhook-timestamp: %" PRId64, ts);
    snprintf(h_sig, sizeof h_sig, "webhook-signature: %s", sig);
    snprintf(h_ct, sizeof h_ct, "Content-Type: %s",
             mc__webhook_content_type(app.format, j->count > 1));
    const char *hdrs[16 + 4];
    int n = 0;
    hdrs[n++] = h_ct;
    hdrs[n++] = h_id;
    hdrs[n++] = h_ts;
    hdrs[n++] = h_sig;
    for (int k = 0; k < app.n_extra && n < 19; k++) {
        hdrs[n++] = app.extra_headers[k];
    }
    hdrs[n] = NULL;
    mc__http_request_t rq = {app.url, hdrs, j->body.data, j->body.len};
    if (mc__http_post(app.http, &rq, on_response, j) != 0) {
        dead_letter(j, "cannot start the request", 0);
        finish_job(j);
    }
}

static void pump(void)
{
    job_t *j;
    while ((j = mc__ksched_next(app.sched)) != NULL) {
        attempt(j);
    }
    if (app.jobs_left == 0) {
        mc__http_close(app.http, NULL, NULL);
        app.http = NULL;
    }
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    static struct option longs[] = {
        {"url", required_argument, 0, 'u'},          {"secret", required_argument, 0, 's'},
        {"events", required_argument, 0, 'n'},       {"keys", required_argument, 0, 'k'},
        {"concurrency", required_argument, 0, 'c'},  {"max-attempts", required_argument, 0, 'a'},
        {"timeout-ms", required_argument, 0, 't'},   {"dead-letter", required_argument, 0, 'd'},
        {"format", required_argument, 0, 'f'},       {"batch", required_argument, 0, 'b'},
        {"size", required_argument, 0, 'z'},         {"header", required_argument, 0, 'H'},
        {"max-retry-ms", required_argument, 0, 'r'}, {0, 0, 0, 0},
    };
    const char *secrets[MC__WEBHOOK_MAX_SECRETS];
    int n_secrets = 0, keys = 10, conc = 4, batch = 1, size = 200;
    uint32_t timeout_ms = 2000;
    const char *dead_path = "/dev/null", *format = "message";
    static char *extra[16];
    app.events = 1000;
    app.max_attempts = 30;
    app.max_retry_ms = 600000;
    int c;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'u': app.url = optarg; break;
        case 's':
            if (n_secrets < MC__WEBHOOK_MAX_SECRETS)
                secrets[n_secrets++] = optarg;
            break;
        case 'n': app.events = atoi(optarg); break;
        case 'k': keys = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'a': app.max_attempts = atoi(optarg); break;
        case 't': timeout_ms = (uint32_t)atoi(optarg); break;
        case 'd': dead_path = optarg; break;
        case 'f': format = optarg; break;
        case 'b': batch = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        case 'z': size = atoi(optarg); break;
        case 'H':
            if (app.n_extra < 16)
                extra[app.n_extra++] = optarg;
            break;
        case 'r': app.max_retry_ms = atoll(optarg); break;
        default: return 2;
        }
    }
    app.extra_headers = extra;
    mc_error_t err;
    if (!app.url || mc__http_url_check(app.url, &err) != 0) {
        fprintf(stderr, "webhook_client: bad --url\n");
        return 2;
    }
    app.signer = mc__webhook_signer_new(secrets, (size_t)n_secrets, &err);
    if (!app.signer || mc__webhook_format_parse(format, &app.format, &err) != 0) {
        fprintf(stderr, "webhook_client: %s\n", err.message);
        return 2;
    }
    app.dead = fopen(dead_path, "a");
    uv_loop_init(&app.loop);
    mc__http_opts_t ho;
    memset(&ho, 0, sizeof ho);
    ho.timeout_ms = timeout_ms;
    ho.connect_timeout_ms = 1000;
    app.http = mc__http_new(&app.loop, &ho, &err);
    app.sched = mc__ksched_new((size_t)conc, (size_t)app.events + 1);

    /* Events, then jobs: with batching, up to `batch` consecutive events of one recipient. */
    mc_event_t **evs = calloc((size_t)app.events, sizeof *evs);
    for (int k = 0; k < app.events; k++) {
        char owner[32];
        snprintf(owner, sizeof owner, "user%d", k % keys);
        evs[k] = fx_event("orders", (uint64_t)k + 1, 1700000000u + (uint32_t)k / 1000,
                          (uint32_t)k % 1000 + 1, 0, owner, (size_t)size);
        mc_event_json(evs[k], NULL);
    }
    fprintf(stderr, "webhook_client: %d events prepared\n", app.events);
    double cpu0 = cpu_s();
    int64_t wall0 = mc__now_ms();
    for (int start = 0; start < keys && start < app.events; start++) {
        /* Each recipient's events in order, cut into batches. */
        for (int k = start; k < app.events;) {
            job_t *j = calloc(1, sizeof *j);
            j->evs = calloc((size_t)batch, sizeof *j->evs);
            while (j->count < batch && k < app.events) {
                j->evs[j->count++] = evs[k];
                k += keys;
            }
            mc__json_buf_init(&j->body, 0, 0);
            mc__backoff_init(&j->backoff, 50, 1000, (uint64_t)k * 2654435761u + 1);
            char owner[32];
            snprintf(owner, sizeof owner, "user%d", start);
            mc__ksched_push(app.sched, owner, strlen(owner), j);
            app.jobs_left++;
        }
    }
    pump();
    uv_run(&app.loop, UV_RUN_DEFAULT);
    double cpu = cpu_s() - cpu0;
    double wall = (double)(mc__now_ms() - wall0) / 1000.0;
    printf("{\"events\":%d,\"delivered\":%d,\"dead\":%d,\"attempts\":%d,\"requests\":%d,"
           "\"wall_s\":%.3f,\"cpu_s\":%.3f}\n",
           app.events, app.delivered, app.dead_count, app.attempts, app.requests, wall, cpu);
    free(evs);
    mc__ksched_destroy(app.sched);
    mc__webhook_signer_destroy(app.signer);
    fclose(app.dead);
    uv_loop_close(&app.loop);
    return app.delivered + app.dead_count == app.events ? 0 : 1;
}
