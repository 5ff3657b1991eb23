/*
 * embed_minimal.c: the smallest useful embedding of libmongocast.
 *
 * Watches one collection and reacts to inserts, updates and deletes with a custom sink
 * written in C. Run it against a replica set (or the bundled mongo-emulator):
 *
 *     embed_minimal 'mongodb://127.0.0.1:27017/?replicaSet=rs0' shop orders
 *
 * then insert/update/delete documents in shop.orders from any client. Ctrl-C stops it: the
 * engine drains what it already read and stores its position under ./embed-checkpoints, so
 * the next run resumes where this one stopped.
 *
 * Threads: main() only starts and stops the engine; the sink's publish() runs on its runner's
 * own thread, one event at a time, in order.
 */
#include <mongoc/mongoc.h>
#include <mongocast.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Per-instance state: the engine zero-allocates ctx_size bytes of it for us. */
typedef struct counter_sink {
    unsigned long inserts, updates, deletes, others;
} counter_sink_t;

static int counter_init(mc_sink_t *sink, const bson_t *options, mc_error_t *err)
{
    (void)sink;
    (void)options;
    (void)err;
    return 0;
}

/* Borrowed event: everything we need is read here; we keep no reference. */
static int counter_publish(mc_sink_t *sink, mc_event_t *ev)
{
    counter_sink_t *c = mc_sink_ctx(sink);
    if (mc_event_kind(ev) != MC_EVENT_CHANGE) {
        /* ready / invalidate / reset: say so, but they are not data changes. */
        printf("[%s] %s\n", mc_event_stream(ev), mc_event_kind_name(mc_event_kind(ev)));
        fflush(stdout);
        return MC_SINK_SKIP;
    }
    const char *op = mc_event_operation_type(ev);
    const bson_t *key = mc_event_document_key(ev);
    char *key_json = key ? bson_as_relaxed_extended_json(key, NULL) : NULL;
    if (op && strcmp(op, "insert") == 0) {
        c->inserts++;
        printf("new document %s in %s.%s\n", key_json ? key_json : "?", mc_event_db(ev),
               mc_event_coll(ev));
    } else if (op && (strcmp(op, "update") == 0 || strcmp(op, "replace") == 0)) {
        c->updates++;
        printf("document %s changed (%s)\n", key_json ? key_json : "?", op);
    } else if (op && strcmp(op, "delete") == 0) {
        c->deletes++;
        printf("document %s deleted\n", key_json ? key_json : "?");
    } else {
        c->others++;
        printf("%s event\n", op ? op : "unknown");
    }
    fflush(stdout);
    bson_free(key_json);
    return 0;
}

static void counter_destroy(mc_sink_t *sink)
{
    counter_sink_t *c = mc_sink_ctx(sink);
    fprintf(stderr, "totals: inserts=%lu updates=%lu deletes=%lu other=%lu\n", c->inserts,
            c->updates, c->deletes, c->others);
}

/* Not durable: the stored position advances once publish() returned. A sink that delivers
 * somewhere else asynchronously would set MC_SINK_DURABLE and call mc_sink_ack() later. */
static const mc_sink_type_t counter_sink_type = {
    .abi_version = MC_SINK_ABI_VERSION,
    .name = "counter",
    .flags = 0,
    .ctx_size = sizeof(counter_sink_t),
    .init = counter_init,
    .publish = counter_publish,
    .destroy = counter_destroy,
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s URI DB COLLECTION\n", argv[0]);
        return 2;
    }
    mongoc_init();
    mc_log_set_handler(mc_log_stderr_handler, NULL);
    mc_log_set_level(MC_LOG_INFO);
    mc_log_capture_mongoc(); /* libmongoc's own messages through the same handler */

    /* A config built in code; mc_config_load_file() gives the same struct from YAML. */
    char stream_name[] = "watched";
    bson_t *pipeline = BCON_NEW("0", "{", "$match", "{", "operationType", "{", "$in", "[",
                                "insert", "update", "replace", "delete", "]", "}", "}", "}");
    mc_stream_config_t stream = {
        .name = stream_name,
        .db = argv[2],
        .collection = argv[3],
        .pipeline = pipeline,
        .full_document = MC_FULL_DOCUMENT_UPDATE_LOOKUP,
        .max_await_time_ms = 1000,
    };
    mc_config_t config = {
        .mongodb_uri = argv[1],
        .streams = &stream,
        .n_streams = 1,
    };
    config.checkpoint.store = MC_CHECKPOINT_FILE;
    config.checkpoint.path = "./embed-checkpoints";
    config.checkpoint.interval_ms = 1000;

    mc_error_t err = {0};
    mc_engine_t *engine = mc_engine_new(&config, NULL, &err);
    if (!engine) {
        fprintf(stderr, "error: %s\n", err.message);
        return 1;
    }
    /* The custom sink is attached in code; registering the type would also let a YAML
     * config say `type: counter`. */
    if (mc_engine_register_sink_type(engine, &counter_sink_type, &err) != 0 ||
        mc_engine_add_sink(engine, &counter_sink_type, "counter", NULL, 0, NULL, NULL, &err) !=
            0 ||
        mc_engine_start(engine, &err) != 0) {
        fprintf(stderr, "error: %s\n", err.message);
        mc_engine_destroy(engine);
        bson_destroy(pipeline);
        return 1;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    while (!stop_requested && !mc_engine_finished(engine)) {
        usleep(100 * 1000);
    }
    int rc = mc_engine_stop(engine, &err);
    if (rc != 0) {
        fprintf(stderr, "stop: %s\n", err.message);
    }
    mc_engine_destroy(engine);
    bson_destroy(pipeline);
    mongoc_cleanup();
    return rc == 0 ? 0 : 1;
}
