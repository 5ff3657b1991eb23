/*
 * sink_nats.c: the "nats" sink type: events to NATS subjects from a template, as core
 * publishes (`mode: core`, at-most-once) or JetStream publishes (`mode: jetstream`, durable:
 * acked on the PubAck, Nats-Msg-Id = the event id so a replay is answered as a duplicate, and
 * Nats-Expected-Last-Msg-Id = the previous event's id so the JetStream stream stays in event
 * order), over the libnats client of nats_client.c.
 *
 * Threads: MC_SINK_ASYNC, but libnats publishes never block and it brings threads of its own:
 * publish runs on the engine's I/O loop thread; PubAck callbacks (acks and failures) and the
 * client's state reports run on libnats threads; the optional creation of the JetStream
 * stream runs on a short-lived thread of this sink (it blocks for a request/reply and must
 * not hold up the loop, nor the engine's start when the server is down). validate, init,
 * destroy, start and stop run as mongocast/sink.h says; probe on `mongocast check`'s thread.
 *
 * Order (jetstream, `ordered: true`). Each event is published with the id of the event of
 * the same mongocast stream published just before it. A per-stream ring of the last
 * max_in_flight + 2 events published (executor thread only) gives that id also when the
 * runner offers an event again after a transient failure (it rewinds to the failed event:
 * the id before it is found in the ring, and the ring is cut after it). The first event of
 * a stream in a run expects the sink's stored position (mc_sink_position()) when that is an
 * event's id; a high-water mark, or none, sends the first event without the header: no
 * earlier event of this run can be in transit then. If the first event is refused because
 * the stream's last message is not the stored one (that event was dead-lettered, or the
 * JetStream stream was replaced), it is sent again without the header; so is the event after
 * one that failed permanently (it will never be in the stream).
 * Invariants: `in_flight` counts ops whose callback has not run; an op is freed by its
 * callback only (or by publish when libnats did not take it).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../edge_payload.h"
#include "../engine_private.h"
#include "sinks/nats_client.h"
#include "sinks/redis_stream_id.h"
#include "sinks/sink_opts.h"
#include "sinks/subject_template.h"

enum { MODE_JETSTREAM = 0, MODE_CORE = 1 };
/* The message body: the protocol's JSON message, or the edge payload (edge_payload.h) that
 * edge streams (source_nats.c) read back into the same event. */
enum { FORMAT_MESSAGE = 0, FORMAT_BSON = 1 };

#define DEFAULT_MAX_IN_FLIGHT 4096
#define MAX_JS_SUBJECTS 64
#define ID_MAX 4096

typedef struct jstream {
    char *name;               /* the mongocast stream */
    mc_event_t **ring;        /* the last events published, oldest first from head */
    uint32_t head, n, cap;
    bool wrapped;             /* an event fell out of the ring: its successor's id is unknown */
    bool started;             /* first_prev was looked up */
    char *first_prev;         /* the stored position when it is an event id */
    _Atomic bool first_pending; /* the first event of the run has not been stored yet */
    _Atomic bool chain_broken;  /* the next event goes without Nats-Expected-Last-Msg-Id */
} jstream_t;

typedef struct nats_ctx {
    int mode;
    int format;
    mc__nats_opts_t o;
    char *url, *user, *password, *token, *nkey, *nkey_seed_file, *creds;
    mc__subject_template_t *tmpl;
    bool ordered;
    char *js_stream; /* create this JetStream stream when missing (NULL: never) */
    char *js_subjects[MAX_JS_SUBJECTS];
    int n_js_subjects;
    int64_t duplicate_window_ms;
    int64_t max_in_flight;

    mc_sink_t *sink;
    mc__nats_t *client;
    _Atomic int64_t in_flight;
    jstream_t *streams;
    size_t n_streams;
    /* The JetStream stream's creation (its own thread). */
    pthread_t creator;
    bool creator_started;
    _Atomic bool js_ready; /* created or found (or nothing to create) */
    _Atomic bool closing;
    pthread_mutex_t lock; /* guards why */
    char why[256];        /* the last creation failure */
} nats_ctx_t;

typedef struct nats_op {
    mc_sink_t *sink;
    nats_ctx_t *ctx;
    jstream_t *js;
    mc_event_t *ev;
    bool first; /* the first event of the run, with the stored position as its expectation */
} nats_op_t;

/* ---- Options --------------------------------------------------------------------------------- */

static const char *const modes[] = {"jetstream", "core", NULL};
static const char *const formats[] = {"message", "bson", NULL};
static const char *const known_opts[] = {
    "url", "mode", "subject", "user", "password", "token", "nkey", "nkey_seed_file", "credentials",
    "ordered", "create_stream", "stream_subjects", "duplicate_window_ms", "connect_timeout_ms",
    "ack_timeout_ms", "max_in_flight", "format", NULL,
};

static void ctx_clear(nats_ctx_t *c)
{
    mc__subject_template_destroy(c->tmpl);
    c->tmpl = NULL;
    char **secrets[] = {&c->password, &c->token};
    for (size_t i = 0; i < sizeof secrets / sizeof secrets[0]; i++) {
        if (*secrets[i]) {
            explicit_bzero(*secrets[i], strlen(*secrets[i]));
        }
    }
    char **all[] = {&c->url,   &c->user,           &c->password, &c->token,
                    &c->nkey,  &c->nkey_seed_file, &c->creds,    &c->js_stream};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        free(*all[i]);
        *all[i] = NULL;
    }
    for (int i = 0; i < c->n_js_subjects; i++) {
        free(c->js_subjects[i]);
    }
    c->n_js_subjects = 0;
}

static int opt_dup(const bson_iter_t *it, char **out, mc_error_t *err)
{
    const char *s = NULL;
    int rc = mc__opt_string(it, &s, err);
    if (rc == 0) {
        free(*out);
        *out = strdup(s);
        rc = *out ? 0 : MC_ENOMEM;
    }
    return rc;
}

static int cfg_error(mc_error_t *err, const char *msg)
{
    return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "%s", msg);
}

static int parse_subjects(nats_ctx_t *c, const bson_iter_t *it, mc_error_t *err)
{
    bson_iter_t a;
    if (!BSON_ITER_HOLDS_ARRAY(it) || !bson_iter_recurse(it, &a)) {
        return cfg_error(err, "option stream_subjects must be a list of subjects");
    }
    while (bson_iter_next(&a)) {
        const char *s = BSON_ITER_HOLDS_UTF8(&a) ? bson_iter_utf8(&a, NULL) : NULL;
        if (!s || !*s || strpbrk(s, " \t\r\n") || c->n_js_subjects >= MAX_JS_SUBJECTS) {
            return cfg_error(err, "option stream_subjects: each item must be a subject without "
                                  "spaces (at most 64)");
        }
        c->js_subjects[c->n_js_subjects++] = strdup(s);
    }
    return c->n_js_subjects ? 0 : cfg_error(err, "option stream_subjects must not be empty");
}

static int parse(nats_ctx_t *c, const bson_t *options, mc_error_t *err)
{
    memset(c, 0, sizeof *c);
    c->ordered = true;
    c->duplicate_window_ms = 120000;
    c->max_in_flight = DEFAULT_MAX_IN_FLIGHT;
    const char *subject = NULL;
    bson_iter_t it;
    int rc = 0;
    int64_t v = 0;
    if (options && bson_iter_init(&it, options)) {
        while (rc == 0 && bson_iter_next(&it)) {
            const char *k = bson_iter_key(&it);
            if (!strcmp(k, "url")) {
                rc = opt_dup(&it, &c->url, err);
            } else if (!strcmp(k, "mode")) {
                rc = mc__opt_enum(&it, modes, &c->mode, err);
            } else if (!strcmp(k, "format")) {
                rc = mc__opt_enum(&it, formats, &c->format, err);
            } else if (!strcmp(k, "subject")) {
                rc = mc__opt_string(&it, &subject, err);
            } else if (!strcmp(k, "user")) {
                rc = opt_dup(&it, &c->user, err);
            } else if (!strcmp(k, "password")) {
                rc = opt_dup(&it, &c->password, err);
            } else if (!strcmp(k, "token")) {
                rc = opt_dup(&it, &c->token, err);
            } else if (!strcmp(k, "nkey")) {
                rc = opt_dup(&it, &c->nkey, err);
            } else if (!strcmp(k, "nkey_seed_file")) {
                rc = opt_dup(&it, &c->nkey_seed_file, err);
            } else if (!strcmp(k, "credentials")) {
                rc = opt_dup(&it, &c->creds, err);
            } else if (!strcmp(k, "ordered")) {
                rc = mc__opt_bool(&it, &c->ordered, err);
            } else if (!strcmp(k, "create_stream")) {
                rc = opt_dup(&it, &c->js_stream, err);
            } else if (!strcmp(k, "stream_subjects")) {
                rc = parse_subjects(c, &it, err);
            } else if (!strcmp(k, "duplicate_window_ms")) {
                rc = mc__opt_int(&it, 1000, 7LL * 24 * 3600 * 1000, &c->duplicate_window_ms, err);
            } else if (!strcmp(k, "connect_timeout_ms")) {
                rc = mc__opt_int(&it, 1, 600000, &v, err);
                c->o.connect_timeout_ms = (uint32_t)v;
            } else if (!strcmp(k, "ack_timeout_ms")) {
                rc = mc__opt_int(&it, 1, 3600000, &v, err);
                c->o.ack_timeout_ms = (uint32_t)v;
            } else if (!strcmp(k, "max_in_flight")) {
                rc = mc__opt_int(&it, 1, 1000000, &c->max_in_flight, err);
            } else {
                rc = mc__opt_unknown(bson_iter_key(&it), "a nats sink", known_opts, err);
            }
        }
    }
    if (rc != 0) {
        return rc;
    }
    if (!c->url) {
        return cfg_error(err, "option url is required (nats://host:port, several separated by "
                              "commas)");
    }
    rc = mc__nats_url_check(c->url, strlen(c->url), err);
    if (rc != 0) {
        return rc;
    }
    if (c->password && !c->user) {
        return cfg_error(err, "option password needs user");
    }
    if (!c->nkey != !c->nkey_seed_file) {
        return cfg_error(err, "options nkey and nkey_seed_file go together");
    }
    if (c->mode == MODE_CORE && (c->js_stream || c->n_js_subjects)) {
        return cfg_error(err, "options create_stream and stream_subjects are for mode: jetstream");
    }
    if (c->format == FORMAT_BSON && (c->mode != MODE_JETSTREAM || !c->ordered)) {
        return cfg_error(err, "option format: bson is for edge streams, which need mode: "
                              "jetstream with ordered: true (events stored once, in order)");
    }
    if (c->n_js_subjects && !c->js_stream) {
        return cfg_error(err, "option stream_subjects needs create_stream");
    }
    if (c->js_stream && (!*c->js_stream || strpbrk(c->js_stream, " \t.*>/\\"))) {
        return cfg_error(err, "option create_stream must be a JetStream stream name (no spaces, "
                              "'.', '*', '>', '/' or '\\')");
    }
    mc_error_t terr;
    c->tmpl = mc__subject_template_new(subject ? subject : MC__SUBJECT_DEFAULT_NATS,
                                       MC__SUBJECT_NATS, &terr);
    if (!c->tmpl) {
        return mc_error_set(err, MC_ECONFIG, MC_DOMAIN_MONGOCAST, MC_ECONFIG, "option subject: %s",
                            terr.message);
    }
    if (c->js_stream && !c->n_js_subjects && subject) {
        return cfg_error(err, "option create_stream with a subject template of your own needs "
                              "stream_subjects (the subjects the JetStream stream captures)");
    }
    c->o.url = c->url;
    c->o.user = c->user;
    c->o.password = c->password;
    c->o.token = c->token;
    c->o.nkey_public = c->nkey;
    c->o.nkey_seed_file = c->nkey_seed_file;
    c->o.creds_file = c->creds;
    c->o.max_pending = (int)c->max_in_flight;
    return 0;
}

static int nats_validate(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    nats_ctx_t c;
    int rc = parse(&c, options, err);
    ctx_clear(&c);
    return rc;
}

static int nats_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    nats_ctx_t *c = mc_sink_ctx(sink);
    int rc = parse(c, options, err);
    c->sink = sink;
    pthread_mutex_init(&c->lock, NULL);
    return rc;
}

/* ---- The JetStream stream (its own thread) --------------------------------------------------- */

static void *creator_main(void *arg)
{
    nats_ctx_t *c = arg;
    int64_t delay = 100;
    while (!atomic_load(&c->closing)) {
        mc_error_t err = {0};
        bool created = false;
        int rc = mc__nats_ensure_stream(c->client, c->js_stream, (const char *const *)c->js_subjects,
                                        c->n_js_subjects, c->duplicate_window_ms, &created, &err);
        if (rc == 0) {
            if (created) {
                mc_log(MC_LOG_NOTICE, "sink", "nats sink=%s created JetStream stream %s",
                       mc_sink_name(c->sink), c->js_stream);
            } else if (err.message[0]) {
                mc_log(MC_LOG_WARN, "sink", "nats sink=%s: %s", mc_sink_name(c->sink),
                       err.message);
            }
            atomic_store(&c->js_ready, true);
            return NULL;
        }
        pthread_mutex_lock(&c->lock);
        snprintf(c->why, sizeof c->why, "%.250s", err.message);
        pthread_mutex_unlock(&c->lock);
        mc_sink_sleep(c->sink, delay);
        delay = delay < 5000 ? delay * 2 : 5000;
    }
    return NULL;
}

/* The default subjects for the default template: "mongocast.<stream>" and below, per stream. */
static int default_subjects(nats_ctx_t *c, mc_engine_t *e, mc_error_t *err)
{
    for (size_t i = 0; i < e->n_streams; i++) {
        const char *name = e->streams[i].cfg->name;
        if (!mc_sink_has_stream(c->sink, name)) {
            continue;
        }
        if (c->n_js_subjects + 2 > MAX_JS_SUBJECTS) {
            return cfg_error(err, "create_stream: too many streams for the default subjects; "
                                  "give stream_subjects");
        }
        size_t len = strlen(name);
        char *esc = malloc(3 * len + 1);
        if (!esc) {
            return MC_ENOMEM;
        }
        esc[mc__subject_escape(name, len, esc)] = '\0';
        c->js_subjects[c->n_js_subjects++] = bson_strdup_printf("mongocast.%s", esc);
        c->js_subjects[c->n_js_subjects++] = bson_strdup_printf("mongocast.%s.>", esc);
        free(esc);
    }
    return 0;
}

static void on_state(void *arg, mc__nats_state_t state, const char *why)
{
    mc_sink_t *sink = arg;
    if (state == MC__NATS_CONNECTED) {
        mc_log(MC_LOG_INFO, "sink", "nats connected sink=%s", mc_sink_name(sink));
    } else if (state == MC__NATS_RECONNECTING || why) {
        mc_log(MC_LOG_WARN, "sink", "nats disconnected sink=%s%s%s (reconnecting)",
               mc_sink_name(sink), why ? ": " : "", why ? why : "");
    }
}

static int nats_start(mc_sink_t *sink, mc_error_t *err)
{
    nats_ctx_t *c = mc_sink_ctx(sink);
    mc_engine_t *e = mc_sink_engine(sink);
    c->streams = calloc(e->n_streams ? e->n_streams : 1, sizeof *c->streams);
    if (!c->streams) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    c->n_streams = e->n_streams;
    for (size_t i = 0; i < e->n_streams; i++) {
        jstream_t *j = &c->streams[i];
        j->name = e->streams[i].cfg->name;
        j->cap = (uint32_t)c->max_in_flight + 2;
        j->ring = c->ordered && c->mode == MODE_JETSTREAM ? calloc(j->cap, sizeof *j->ring) : NULL;
        if (c->ordered && c->mode == MODE_JETSTREAM && !j->ring) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        }
        atomic_init(&j->first_pending, false);
        atomic_init(&j->chain_broken, false);
    }
    if (c->js_stream && !c->n_js_subjects) {
        int rc = default_subjects(c, e, err);
        if (rc != 0) {
            return rc;
        }
    }
    c->o.on_state = on_state;
    c->o.state_arg = sink;
    c->client = mc__nats_new(&c->o, err);
    if (!c->client) {
        return MC_ECONFIG;
    }
    atomic_store(&c->js_ready, c->mode == MODE_CORE || !c->js_stream);
    if (!atomic_load(&c->js_ready)) {
        if (pthread_create(&c->creator, NULL, creator_main, c) != 0) {
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM,
                                "cannot start a thread");
        }
        c->creator_started = true;
    }
    return 0;
}

/* ---- Publishing (loop thread; callbacks on libnats threads) ------------------------------------ */

static jstream_t *stream_of(nats_ctx_t *c, const mc_event_t *ev)
{
    const char *name = mc_event_stream(ev);
    for (size_t i = 0; name && i < c->n_streams; i++) {
        if (strcmp(c->streams[i].name, name) == 0) {
            return &c->streams[i];
        }
    }
    return NULL;
}

static mc_event_t *ring_at(const jstream_t *j, uint32_t i)
{
    return j->ring[(j->head + i) % j->cap];
}

static void ring_push(jstream_t *j, mc_event_t *ev)
{
    if (j->n == j->cap) {
        mc_event_unref(&j->ring[j->head]);
        j->head = (j->head + 1) % j->cap;
        j->n--;
        j->wrapped = true;
    }
    j->ring[(j->head + j->n) % j->cap] = mc_event_ref(ev);
    j->n++;
}

/* Drops the ring's entries from index i on. */
static void ring_cut(jstream_t *j, uint32_t i)
{
    while (j->n > i) {
        j->n--;
        mc_event_unref(&j->ring[(j->head + j->n) % j->cap]);
    }
}

/* True when `data` is the resume token of an event (not a high-water mark). */
static bool is_event_token(const char *data)
{
    mc__token_position_t pos;
    return mc__token_position_parse(data, strlen(data), &pos, NULL) == 0 && pos.token_type == 128;
}

/* The id the event published before `ev` had (NULL: none known), and cuts the ring so that
 * `ev` comes next. Executor thread. Sets *first when the answer is the stored position. */
static const char *previous_id(nats_ctx_t *c, jstream_t *j, mc_event_t *ev, bool *first)
{
    *first = false;
    if (!j->started) {
        j->started = true;
        char buf[ID_MAX];
        if (mc_sink_position(c->sink, j->name, buf, sizeof buf) == 0 && is_event_token(buf)) {
            j->first_prev = strdup(buf);
        }
        atomic_store(&j->first_pending, true);
    }
    const char *id = mc_event_id(ev);
    uint32_t at = j->n; /* where ev goes */
    if (j->n > 0 && mc__token_data_cmp(id, mc_event_id(ring_at(j, j->n - 1))) <= 0) {
        /* Offered again (the runner rewound to it): find it; older than the ring: unknown. */
        at = UINT32_MAX;
        for (uint32_t k = j->n; k-- > 0;) {
            if (strcmp(mc_event_id(ring_at(j, k)), id) == 0) {
                at = k;
                break;
            }
        }
        if (at == UINT32_MAX) {
            ring_cut(j, 0);
            j->wrapped = true;
            return NULL;
        }
        ring_cut(j, at);
    }
    if (atomic_exchange(&j->chain_broken, false)) {
        return NULL;
    }
    if (at > 0) {
        return mc_event_id(ring_at(j, at - 1));
    }
    if (j->wrapped) {
        return NULL;
    }
    *first = atomic_load(&j->first_pending) && j->first_prev != NULL;
    return j->first_prev;
}

static void op_free(nats_op_t *op)
{
    atomic_fetch_sub(&op->ctx->in_flight, 1);
    mc_event_unref(&op->ev);
    free(op);
}

/* True when a "wrong last msg ID: <last>" refusal shows that ev is stored already: the
 * expectations keep the JetStream stream a prefix of the events in order, so everything up
 * to <last> is in it. (nats-server checks Nats-Expected-Last-Msg-Id before it looks for a
 * duplicate Nats-Msg-Id, so a replay inside the chain is refused this way instead of being
 * answered as a duplicate.) */
static bool stored_before(const nats_op_t *op, const char *message)
{
    static const char tag[] = "wrong last msg ID: ";
    const char *p = message ? strstr(message, tag) : NULL;
    if (!p) {
        return false;
    }
    p += sizeof tag - 1;
    size_t n = strspn(p, "0123456789abcdefABCDEF");
    char last[ID_MAX];
    if (n == 0 || n >= sizeof last) {
        return false;
    }
    memcpy(last, p, n);
    last[n] = '\0';
    return mc__token_data_cmp(mc_event_id(op->ev), last) <= 0;
}

static void on_pub_ack(void *arg, const mc__nats_result_t *res)
{
    nats_op_t *op = arg;
    if (res->outcome == MC__NATS_STORED || res->outcome == MC__NATS_DUPLICATE) {
        if (op->js) {
            atomic_store(&op->js->first_pending, false);
        }
        mc_sink_ack(op->sink, op->ev);
    } else if (res->js_code == MC__NATS_JS_WRONG_LAST_MSG_ID && stored_before(op, res->message)) {
        mc_sink_ack(op->sink, op->ev); /* a replay: the server checks the expectation first */
    } else if (op->first && res->js_code == MC__NATS_JS_WRONG_LAST_MSG_ID) {
        /* The stream's last message is not our stored position (dead-lettered, or the
         * JetStream stream was replaced): nothing of this run is in transit before this
         * event, so it goes again without the expectation. */
        atomic_store(&op->js->chain_broken, true);
        mc_sink_fail(op->sink, op->ev, MC_SINK_TRANSIENT, 0,
                     "nats: the JetStream stream does not end with the stored position: %s",
                     res->message ? res->message : "");
    } else {
        bool permanent = res->cls == MC__NATS_PERMANENT;
        if (permanent && op->js) {
            atomic_store(&op->js->chain_broken, true); /* this one will never be there */
        }
        mc_sink_fail(op->sink, op->ev, permanent ? MC_SINK_PERMANENT : MC_SINK_TRANSIENT, 0,
                     "nats: %s", res->message ? res->message : "publish failed");
    }
    op_free(op);
}

static int unavailable(nats_ctx_t *c, mc_event_t *ev)
{
    mc__nats_status_t st;
    mc__nats_status(c->client, &st);
    if (st.state != MC__NATS_CONNECTED && st.state != MC__NATS_RECONNECTING) {
        return mc_sink_fail(c->sink, ev, MC_SINK_TRANSIENT, 0, "nats not connected: %s",
                            st.last_error[0] ? st.last_error : "connecting");
    }
    if (!atomic_load(&c->js_ready)) {
        pthread_mutex_lock(&c->lock);
        char why[sizeof c->why];
        memcpy(why, c->why, sizeof why);
        pthread_mutex_unlock(&c->lock);
        return mc_sink_fail(c->sink, ev, MC_SINK_TRANSIENT, 0,
                            "nats: JetStream stream %s not ready: %s", c->js_stream,
                            why[0] ? why : "creating");
    }
    return 0;
}

static int nats_publish(mc_sink_t *sink, mc_event_t *ev)
{
    nats_ctx_t *c = mc_sink_ctx(sink);
    bool js = c->mode == MODE_JETSTREAM;
    if (mc_event_kind(ev) == MC_EVENT_READY || (js && !mc_event_resume_token(ev))) {
        return MC_SINK_SKIP; /* a JetStream message needs an id: reset/error have none */
    }
    if (atomic_load(&c->in_flight) >= c->max_in_flight) {
        return MC_EAGAIN;
    }
    int rc = unavailable(c, ev);
    if (rc != 0) {
        return rc;
    }
    mc__subject_values_t v;
    mc__subject_values_from_event(&v, ev);
    char subj[MC__SUBJECT_MAX + 1];
    size_t slen = 0, mlen = 0;
    mc_error_t err;
    if (mc__subject_template_render(c->tmpl, &v, subj, sizeof subj, &slen, &err) != 0) {
        return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "subject: %s", err.message);
    }
    const char *msg;
    bson_t body = BSON_INITIALIZER;
    if (c->format == FORMAT_BSON) {
        bson_destroy(&body);
        if (mc__edge_payload_encode(ev, &body, &err) != 0) {
            bson_destroy(&body);
            return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s", err.message);
        }
        msg = (const char *)bson_get_data(&body);
        mlen = body.len;
    } else {
        msg = mc_event_json(ev, &mlen);
    }
    mc__nats_headers_t h = {v.type.p, v.stream.p, v.recipient.p, v.recipient.len};
    if (!js) {
        rc = mc__nats_publish(c->client, subj, &h, msg ? msg : "", msg ? mlen : 0, &err);
        if (rc == 0) {
            mc_sink_ack(sink, ev); /* at-most-once: handed to libnats */
            return 0;
        }
        return rc == MC_EAGAIN ? mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "%s", err.message)
                               : mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s", err.message);
    }
    jstream_t *j = stream_of(c, ev);
    nats_op_t *op = calloc(1, sizeof *op);
    if (!op || !j) {
        free(op);
        bson_destroy(&body);
        return MC_EAGAIN;
    }
    op->sink = sink;
    op->ctx = c;
    op->js = j;
    op->ev = mc_event_ref(ev);
    const char *prev = c->ordered ? previous_id(c, j, ev, &op->first) : NULL;
    atomic_fetch_add(&c->in_flight, 1);
    rc = mc__nats_js_publish(c->client, subj, mc_event_id(ev), prev, &h, msg ? msg : "",
                             msg ? mlen : 0, on_pub_ack, op, &err);
    bson_destroy(&body); /* libnats copied it */
    if (rc != 0) {
        op_free(op);
        if (rc == MC_EINVAL) {
            return mc_sink_fail(sink, ev, MC_SINK_PERMANENT, 0, "%s", err.message);
        }
        return rc == MC_EAGAIN ? MC_EAGAIN
                               : mc_sink_fail(sink, ev, MC_SINK_TRANSIENT, 0, "%s", err.message);
    }
    if (c->ordered) {
        ring_push(j, ev);
    }
    return 0;
}

static int nats_drain(mc_sink_t *sink, int64_t deadline_ms)
{
    (void)sink;
    (void)deadline_ms;
    return 0; /* libnats writes on its own; the engine waits for the PubAcks */
}

static void nats_stop(mc_sink_t *sink)
{
    nats_ctx_t *c = mc_sink_ctx(sink);
    atomic_store(&c->closing, true);
    if (c->creator_started) {
        pthread_join(c->creator, NULL);
        c->creator_started = false;
    }
    mc__nats_destroy(c->client); /* fails what is still in flight: callbacks free the ops */
    c->client = NULL;
}

static void nats_destroy(mc_sink_t *sink)
{
    nats_ctx_t *c = mc_sink_ctx(sink);
    nats_stop(sink);
    for (size_t i = 0; i < c->n_streams; i++) {
        jstream_t *j = &c->streams[i];
        ring_cut(j, 0);
        free(j->ring);
        free(j->first_prev);
    }
    free(c->streams);
    c->streams = NULL;
    ctx_clear(c);
    pthread_mutex_destroy(&c->lock);
}

/* ---- probe ------------------------------------------------------------------------------------- */

static int nats_probe(mc_sink_t *sink, const bson_t *options, int64_t timeout_ms, mc_error_t *err)
{
    (void)sink;
    nats_ctx_t c;
    int rc = parse(&c, options, err);
    if (rc == 0) {
        int64_t t = timeout_ms > 0 && timeout_ms < 600000 ? timeout_ms : 5000;
        c.o.connect_timeout_ms = (uint32_t)t;
        c.o.backoff_initial_ms = (uint32_t)t;
        c.o.backoff_max_ms = (uint32_t)t;
        mc__nats_t *n = mc__nats_new(&c.o, err);
        rc = n ? 0 : MC_ECONFIG;
        mc__nats_status_t st = {0};
        int64_t deadline = mc__now_ms() + t;
        while (n) {
            mc__nats_status(n, &st);
            if (st.state == MC__NATS_CONNECTED || mc__now_ms() >= deadline) {
                break;
            }
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        if (n && st.state != MC__NATS_CONNECTED) {
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_MONGOCAST, MC_EIO, "%s",
                              st.last_error[0] ? st.last_error
                                               : "no connection within the timeout");
        }
        mc__nats_destroy(n);
    }
    ctx_clear(&c);
    return rc;
}

const mc_sink_type_t mc__sink_nats_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "nats",
    .flags = MC_SINK_ASYNC | MC_SINK_DURABLE, /* core mode acks at once: see the top */
    .ctx_size = sizeof(nats_ctx_t),
    .init = nats_init,
    .start = nats_start,
    .publish = nats_publish,
    .drain = nats_drain,
    .destroy = nats_destroy,
    .validate = nats_validate,
    .stop = nats_stop,
    .probe = nats_probe,
};
