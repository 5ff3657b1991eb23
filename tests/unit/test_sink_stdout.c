/*
 * test_sink_stdout.c: the "stdout" sink's own 64 KiB line buffer: nothing reaches fd 1 before
 * the batch's flush (or before the buffer fills), every line arrives once, whole and in
 * order (lines larger than the buffer included), drain and destroy push out what is
 * buffered, raw mode prints canonical Extended JSON, and a write error (/dev/full) fails the
 * buffered events (drain reports MC_EIO).
 *
 * The sink's callbacks are driven directly on a zeroed mc_sink_t, as its runner thread
 * would; fd 1 is pointed at a temporary file (or /dev/full) for the duration of each test and
 * restored afterwards. Single-threaded.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_private.h"
#include "mongocast/event.h"

typedef struct redirect {
    int saved_fd;
    char path[64];
} redirect_t;

/* Points fd 1 at a new temporary file (or at `device` when not NULL). */
static void redirect_begin(redirect_t *r, const char *device)
{
    fflush(stdout);
    r->saved_fd = dup(STDOUT_FILENO);
    assert_true(r->saved_fd >= 0);
    int fd;
    if (device) {
        snprintf(r->path, sizeof(r->path), "%s", device);
        fd = open(device, O_WRONLY);
    } else {
        snprintf(r->path, sizeof(r->path), "/tmp/mc-sink-stdout-XXXXXX");
        fd = mkstemp(r->path);
    }
    assert_true(fd >= 0);
    assert_true(dup2(fd, STDOUT_FILENO) >= 0);
    close(fd);
}

static void redirect_end(redirect_t *r)
{
    fflush(stdout);
    clearerr(stdout);
    dup2(r->saved_fd, STDOUT_FILENO);
    close(r->saved_fd);
    if (strncmp(r->path, "/tmp/", 5) == 0) {
        unlink(r->path);
    }
}

static size_t file_size(const redirect_t *r)
{
    struct stat st;
    assert_int_equal(stat(r->path, &st), 0);
    return (size_t)st.st_size;
}

static char *file_read(const redirect_t *r, size_t *len)
{
    FILE *f = fopen(r->path, "rb");
    assert_non_null(f);
    size_t n = file_size(r);
    char *buf = malloc(n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, n, f), n);
    buf[n] = '\0';
    fclose(f);
    *len = n;
    return buf;
}

static void sink_open(mc_sink_t *sink, const bson_t *options)
{
    memset(sink, 0, sizeof(*sink));
    sink->type = mc_sink_stdout_type();
    sink->ctx = calloc(1, sink->type->ctx_size);
    assert_non_null(sink->ctx);
    mc_error_t err = {0};
    bson_t empty = BSON_INITIALIZER;
    assert_int_equal(sink->type->init(sink, options ? options : &empty, &err), 0);
}

static void sink_close(mc_sink_t *sink)
{
    if (sink->type->destroy) {
        sink->type->destroy(sink);
    }
    free(sink->ctx);
}

/* A change event whose message is roughly `size` bytes long. */
static mc_event_t *change_event(uint64_t seq, size_t size)
{
    char *text = malloc(size + 1);
    assert_non_null(text);
    for (size_t i = 0; i < size; i++) {
        text[i] = (char)('a' + (seq + i) % 26);
    }
    text[size] = '\0';
    bson_t *change = BCON_NEW("_id", "{", "_data", BCON_UTF8("00"), "}", "operationType", "insert",
                              "fullDocument", "{", "seq", BCON_INT64((int64_t)seq), "text",
                              BCON_UTF8(text), "}");
    mc_error_t err = {0};
    mc_event_t *ev = mc_event_new_change("s", seq, change, NULL, &err);
    assert_non_null(ev);
    bson_destroy(change);
    free(text);
    return ev;
}

/* Expected output for events[0..n): each message and a newline. */
static char *expected_lines(mc_event_t **evs, size_t n, size_t *len)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l = 0;
        mc_event_json(evs[i], &l);
        total += l + 1;
    }
    char *out = malloc(total + 1);
    assert_non_null(out);
    char *p = out;
    for (size_t i = 0; i < n; i++) {
        size_t l = 0;
        const char *s = mc_event_json(evs[i], &l);
        memcpy(p, s, l);
        p[l] = '\n';
        p += l + 1;
    }
    *p = '\0';
    *len = total;
    return out;
}

static void test_batches_and_order(void **state)
{
    (void)state;
    enum { N = 200 };
    mc_event_t *evs[N];
    /* Mostly ~1 KiB lines, a few larger than the whole 64 KiB buffer. */
    for (size_t i = 0; i < N; i++) {
        evs[i] = change_event(i + 1, i % 50 == 45 ? 100000 : 1000 + i);
    }
    redirect_t r;
    redirect_begin(&r, NULL);
    mc_sink_t sink;
    sink_open(&sink, NULL);

    /* A batch of 30 lines (~33 KB, far more than stdio's own 4 KiB buffer for files and
     * pipes) stays in the sink's buffer until flush. */
    for (size_t i = 0; i < 30; i++) {
        assert_int_equal(sink.type->publish(&sink, evs[i]), 0);
    }
    assert_int_equal(file_size(&r), 0);
    sink.type->flush(&sink);
    size_t want_len = 0, got_len = 0;
    char *want = expected_lines(evs, 30, &want_len);
    char *got = file_read(&r, &got_len);
    assert_int_equal(got_len, want_len);
    assert_memory_equal(got, want, want_len);
    free(want);
    free(got);

    /* A batch larger than the buffer is written as it fills, whole lines in order. */
    for (size_t i = 30; i < N; i++) {
        assert_int_equal(sink.type->publish(&sink, evs[i]), 0);
        if (i == 80) {
            size_t now = file_size(&r);
            assert_true(now > want_len); /* the buffer filled and was written out */
        }
    }
    assert_int_equal(sink.type->drain(&sink, 0), 0);
    want = expected_lines(evs, N, &want_len);
    got = file_read(&r, &got_len);
    assert_int_equal(got_len, want_len);
    assert_memory_equal(got, want, want_len);
    free(want);
    free(got);

    /* Lines left buffered at destroy are written, not lost. */
    mc_event_t *last = change_event(N + 1, 10);
    assert_int_equal(sink.type->publish(&sink, last), 0);
    size_t before = file_size(&r);
    sink_close(&sink);
    size_t l = 0;
    mc_event_json(last, &l);
    assert_int_equal(file_size(&r), before + l + 1);
    mc_event_unref(&last);

    redirect_end(&r);
    for (size_t i = 0; i < N; i++) {
        mc_event_unref(&evs[i]);
    }
}

static void test_raw_and_ready(void **state)
{
    (void)state;
    redirect_t r;
    redirect_begin(&r, NULL);
    bson_t *opts = BCON_NEW("raw", BCON_BOOL(true), "ready", BCON_BOOL(true));
    mc_sink_t sink;
    sink_open(&sink, opts);
    mc_event_t *ev = change_event(1, 5);
    mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "s", 2, NULL);
    mc_event_t *reset = mc_event_new_control(MC_EVENT_RESET, "s", 3, "lost");
    assert_int_equal(sink.type->publish(&sink, ev), 0);
    assert_int_equal(sink.type->publish(&sink, ready), 0);
    assert_int_equal(sink.type->publish(&sink, reset), MC_SINK_SKIP);
    sink.type->flush(&sink);
    char *want =
        bson_strdup_printf("%s\n%s\n", mc_event_raw_json(ev, NULL), mc_event_json(ready, NULL));
    size_t got_len = 0;
    char *got = file_read(&r, &got_len);
    assert_string_equal(got, want);
    assert_non_null(strstr(got, "{\"$numberLong\":\"1\"}")); /* canonical */
    free(got);
    bson_free(want);
    sink_close(&sink);
    redirect_end(&r);
    mc_event_unref(&ev);
    mc_event_unref(&ready);
    mc_event_unref(&reset);
    bson_destroy(opts);
}

/* A failed stream's error event is printed in both modes, even when ready events are not:
 * whoever reads the output must learn that the stream will not deliver again. */
static void test_error_printed(void **state)
{
    (void)state;
    bson_t *raw = BCON_NEW("raw", BCON_BOOL(true));
    const bson_t *modes[] = {NULL, raw};
    for (size_t m = 0; m < 2; m++) {
        redirect_t r;
        redirect_begin(&r, NULL);
        mc_sink_t sink;
        sink_open(&sink, modes[m]);
        mc_event_t *ready = mc_event_new_control(MC_EVENT_READY, "s", 1, NULL);
        mc_event_t *error = mc_event_new_error("s", 2, MC_EVENT_ERROR_FATAL, 280, "failed");
        assert_int_equal(sink.type->publish(&sink, ready), MC_SINK_SKIP);
        assert_int_equal(sink.type->publish(&sink, error), 0);
        sink.type->flush(&sink);
        char *want = bson_strdup_printf("%s\n", mc_event_json(error, NULL));
        size_t got_len = 0;
        char *got = file_read(&r, &got_len);
        assert_string_equal(got, want);
        assert_non_null(strstr(got, "\"type\":\"error\""));
        free(got);
        bson_free(want);
        sink_close(&sink);
        redirect_end(&r);
        mc_event_unref(&ready);
        mc_event_unref(&error);
    }
    bson_destroy(raw);
}

static void test_write_error(void **state)
{
    (void)state;
    if (access("/dev/full", W_OK) != 0) {
        skip();
    }
    redirect_t r;
    redirect_begin(&r, "/dev/full");
    mc_sink_t sink;
    sink_open(&sink, NULL);
    mc_event_t *ev = change_event(1, 100);
    assert_int_equal(sink.type->publish(&sink, ev), 0); /* buffered */
    /* The flush fails: the buffered events are reported to the runner (mc_sink_fail; this
     * bare instance has none) and released, so nothing is held any more. */
    sink.type->flush(&sink);
    assert_int_equal(sink.type->publish(&sink, ev), 0);
    assert_int_equal(sink.type->drain(&sink, 0), MC_EIO);
    assert_int_equal(sink.type->drain(&sink, 0), 0); /* nothing left to write */
    sink_close(&sink);
    redirect_end(&r);
    mc_event_unref(&ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batches_and_order),
        cmocka_unit_test(test_raw_and_ready),
        cmocka_unit_test(test_error_printed),
        cmocka_unit_test(test_write_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
