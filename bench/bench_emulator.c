/*
 * bench_emulator.c: measures mongo-emulator's two throughput goals with the real libmongoc
 * driver, and charges them to the emulator's own CPU time (read from /proc/PID/stat), so the
 * figures say what one core of emulator can do whatever the client costs.
 *
 *   1. bulk inserts: N documents of about SIZE bytes, inserted with insert_many in batches of
 *      BATCH documents (one OP_MSG with a kind-1 document sequence each);
 *   2. change-event delivery: one change stream opened before the inserts, read back to the
 *      end with batchSize BATCH (every event rendered and shipped by the emulator).
 *
 * Runs on the main thread only. Output: one line per phase, "key=value" pairs, easy to grep.
 */
#include <mongoc/mongoc.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* utime + stime of a process in seconds, or -1 when it cannot be read. */
static double process_cpu_seconds(long pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    char buf[2048];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* The command name may hold spaces; fields resume after the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p) {
        return -1;
    }
    unsigned long utime = 0;
    unsigned long stime = 0;
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) !=
        2) {
        return -1;
    }
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_emulator --uri URI --pid EMULATOR_PID [--docs N] [--size BYTES]"
                    " [--batch N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *uri_str = NULL;
    long pid = 0;
    int n_docs = 200000;
    int size = 200;
    int batch = 1000;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) {
            usage();
        }
        if (!strcmp(argv[i], "--uri")) {
            uri_str = argv[++i];
        } else if (!strcmp(argv[i], "--pid")) {
            pid = atol(argv[++i]);
        } else if (!strcmp(argv[i], "--docs")) {
            n_docs = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--size")) {
            size = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--batch")) {
            batch = atoi(argv[++i]);
        } else {
            usage();
        }
    }
    if (!uri_str || pid <= 0 || n_docs <= 0 || size < 32 || batch <= 0) {
        usage();
    }

    mongoc_init();
    bson_error_t error;
    mongoc_client_t *client = mongoc_client_new(uri_str);
    if (!client) {
        fprintf(stderr, "bad uri %s\n", uri_str);
        return 1;
    }
    mongoc_collection_t *coll = mongoc_client_get_collection(client, "bench", "events");
    mongoc_collection_drop(coll, NULL);

    bson_t *cs_opts = BCON_NEW("batchSize", BCON_INT32(batch), "maxAwaitTimeMS", BCON_INT64(200));
    bson_t empty_pipeline = BSON_INITIALIZER;
    mongoc_change_stream_t *stream = mongoc_collection_watch(coll, &empty_pipeline, cs_opts);
    const bson_t *ev;
    /* The first next() sends the aggregate, so the stream starts before the first insert. */
    mongoc_change_stream_next(stream, &ev);
    if (mongoc_change_stream_error_document(stream, &error, NULL)) {
        fprintf(stderr, "watch failed: %s\n", error.message);
        return 1;
    }

    char *padding = malloc((size_t)size);
    memset(padding, 'x', (size_t)size - 32);
    padding[size - 32] = '\0';
    bson_t **docs = calloc((size_t)batch, sizeof(*docs));

    double cpu0 = process_cpu_seconds(pid);
    double t0 = now_seconds();
    for (int done = 0; done < n_docs;) {
        int n = n_docs - done < batch ? n_docs - done : batch;
        for (int i = 0; i < n; i++) {
            docs[i] = BCON_NEW("_id", BCON_INT64(done + i), "n", BCON_INT32(done + i), "pad",
                               BCON_UTF8(padding));
        }
        bool ok = mongoc_collection_insert_many(coll, (const bson_t **)docs, (size_t)n, NULL,
                                                NULL, &error);
        for (int i = 0; i < n; i++) {
            bson_destroy(docs[i]);
        }
        if (!ok) {
            fprintf(stderr, "insert_many failed: %s\n", error.message);
            return 1;
        }
        done += n;
    }
    double t1 = now_seconds();
    double cpu1 = process_cpu_seconds(pid);
    printf("phase=insert docs=%d batch=%d doc_bytes=%d wall_s=%.3f emulator_cpu_s=%.3f "
           "docs_per_wall_s=%.0f docs_per_emulator_cpu_s=%.0f\n",
           n_docs, batch, size, t1 - t0, cpu1 - cpu0, n_docs / (t1 - t0),
           n_docs / (cpu1 - cpu0 > 0 ? cpu1 - cpu0 : 1e-9));

    int seen = 0;
    double t2 = now_seconds();
    double cpu2 = process_cpu_seconds(pid);
    while (seen < n_docs) {
        if (mongoc_change_stream_next(stream, &ev)) {
            seen++;
            continue;
        }
        if (mongoc_change_stream_error_document(stream, &error, NULL)) {
            fprintf(stderr, "change stream failed after %d events: %s\n", seen, error.message);
            return 1;
        }
    }
    double t3 = now_seconds();
    double cpu3 = process_cpu_seconds(pid);
    printf("phase=changestream events=%d batch=%d wall_s=%.3f emulator_cpu_s=%.3f "
           "events_per_wall_s=%.0f events_per_emulator_cpu_s=%.0f\n",
           seen, batch, t3 - t2, cpu3 - cpu2, seen / (t3 - t2),
           seen / (cpu3 - cpu2 > 0 ? cpu3 - cpu2 : 1e-9));

    free(docs);
    free(padding);
    bson_destroy(cs_opts);
    mongoc_change_stream_destroy(stream);
    mongoc_collection_drop(coll, NULL);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    mongoc_cleanup();
    return 0;
}
