/*
 * sink.c: accessors of sink instances, and the paths from a sink back into its runner: acks,
 * classified failures, the I/O loop, interruptible sleeps.
 *
 * Accessors read fields fixed before mc_engine_start() spawns threads, so any thread may
 * call them. mc_sink_ack() and mc_sink_fail() run on whatever thread the sink delivers from;
 * they only touch the sink's runner, which has its own lock.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "engine_private.h"

void *mc_sink_ctx(mc_sink_t *sink)
{
    return sink ? sink->ctx : NULL;
}

const char *mc_sink_name(const mc_sink_t *sink)
{
    return sink->name;
}

const mc_sink_type_t *mc_sink_get_type(const mc_sink_t *sink)
{
    return sink->type;
}

mc_engine_t *mc_sink_engine(const mc_sink_t *sink)
{
    return sink->engine;
}

void *mc_sink_userdata(const mc_sink_t *sink)
{
    return sink->userdata;
}

static int stream_index(const mc_engine_t *engine, const char *name)
{
    for (size_t i = 0; i < engine->n_streams; i++) {
        if (strcmp(engine->streams[i].cfg->name, name) == 0) {
            return (int)i;
        }
    }
    return -1;
}

bool mc_sink_has_stream(const mc_sink_t *sink, const char *stream)
{
    int i = stream ? stream_index(sink->engine, stream) : -1;
    return i >= 0 && sink->takes_stream && sink->takes_stream[i];
}

void mc_sink_ack(mc_sink_t *sink, const mc_event_t *ev)
{
    if (!sink || !ev || !sink->runner) {
        return;
    }
    mc__runner_ack(sink->runner, ev, -1, 0);
}

int mc_sink_ack_seq(mc_sink_t *sink, const char *stream, uint64_t seq)
{
    if (!sink || !stream || !sink->engine) {
        return MC_EINVAL;
    }
    int idx = stream_index(sink->engine, stream);
    if (idx < 0) {
        return MC_ENOTFOUND;
    }
    if (sink->runner) {
        mc__runner_ack(sink->runner, NULL, idx, seq);
    }
    return 0;
}

int mc_sink_fail(mc_sink_t *sink, const mc_event_t *ev, mc_sink_error_class_t cls,
                 int64_t retry_after_ms, const char *fmt, ...)
{
    char msg[256] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
    }
    if (cls != MC_SINK_PERMANENT) {
        cls = MC_SINK_TRANSIENT;
    }
    if (!sink || !sink->runner) {
        return cls == MC_SINK_PERMANENT ? MC_EINVAL : MC_EIO;
    }
    return mc__runner_fail(sink->runner, ev, cls, retry_after_ms, msg);
}

int mc_sink_position(mc_sink_t *sink, const char *stream, char *buf, size_t cap)
{
    int idx = sink && stream && sink->engine ? stream_index(sink->engine, stream) : -1;
    int slot = idx >= 0 && sink->runner ? mc__runner_slot(sink->runner, idx) : -1;
    if (slot < 0 || !buf) {
        return MC_ENOTFOUND;
    }
    mc__pref_t p = {0};
    int rc = MC_ENOTFOUND;
    if (mc__runner_take_done(sink->runner, slot, &p, NULL, NULL) && mc__pref_data(&p)) {
        const char *d = mc__pref_data(&p);
        size_t n = strlen(d);
        rc = n < cap ? 0 : MC_ELIMIT;
        if (rc == 0) {
            memcpy(buf, d, n + 1);
        }
    }
    mc__pref_clear(&p);
    return rc;
}

static mc__stream_t *event_stream(const mc_sink_t *sink, const mc_event_t *ev)
{
    int idx = ev ? mc__event_stream_index(ev) : -1;
    if (!sink || !sink->engine || idx < 0 || (size_t)idx >= sink->engine->n_streams) {
        return NULL;
    }
    return &sink->engine->streams[idx];
}

uint64_t mc_sink_lease_epoch(const mc_sink_t *sink, const mc_event_t *ev)
{
    mc__stream_t *s = event_stream(sink, ev);
    return s && s->leased ? atomic_load(&s->lease_epoch) : 0;
}

bool mc_sink_lease_valid(const mc_sink_t *sink, const mc_event_t *ev)
{
    mc__stream_t *s = event_stream(sink, ev);
    return !s || mc__stream_may_feed(s, mc__now_ms());
}

void *mc_sink_uv_loop(mc_sink_t *sink)
{
    if (!sink || !sink->type || !(sink->type->flags & MC_SINK_ASYNC) || !sink->engine) {
        return NULL;
    }
    return mc__ioloop_uv(sink->engine->ioloop);
}

bool mc_sink_stopping(const mc_sink_t *sink)
{
    return sink && sink->engine && atomic_load(&sink->engine->stopping);
}

int64_t mc_sink_deadline_ms(const mc_sink_t *sink)
{
    return sink && sink->runner ? mc__runner_deadline(sink->runner) : 0;
}

bool mc_sink_sleep(mc_sink_t *sink, int64_t ms)
{
    if (!sink || !sink->engine) {
        return false;
    }
    return mc__engine_sleep(sink->engine, ms);
}
