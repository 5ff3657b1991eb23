/*
 * sink.c: accessors of sink instances and the ack path into the stream checkpoints.
 *
 * Accessors read fields fixed before mc_engine_start() spawns threads, so any thread may
 * call them. mc_sink_ack() runs on whatever thread the sink delivers from; it only touches
 * the stream's checkpoint, which has its own lock.
 */
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

static void ack_index(mc_sink_t *sink, int idx, uint64_t seq)
{
    mc_engine_t *engine = sink->engine;
    if (idx < 0 || (size_t)idx >= engine->n_streams || !sink->bit || sink->bit[idx] < 0) {
        return;
    }
    mc__checkpoint_ack(engine->streams[idx].checkpoint, seq, sink->bit[idx]);
}

void mc_sink_ack(mc_sink_t *sink, const mc_event_t *ev)
{
    if (!sink || !ev || !sink->engine) {
        return;
    }
    int idx = mc__event_stream_index(ev);
    if (idx < 0 || (size_t)idx >= sink->engine->n_streams) {
        idx = stream_index(sink->engine, mc_event_stream(ev));
    }
    ack_index(sink, idx, mc_event_seq(ev));
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
    ack_index(sink, idx, seq);
    return 0;
}
