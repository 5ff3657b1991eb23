/*
 * router.c: the dispatch step. A stream's watcher hands each item (an event, or a mark: a
 * position without an event) to the runners of the stream: one reference per runner queue.
 * It never publishes and never waits for a sink; a runner whose queue is full is detached
 * (it catches up on its own cursor), and only a live runner (the WebSocket/SSE fan-out, which
 * cuts its slow subscribers instead) makes the watcher wait for room.
 *
 * Threads: the stream's watcher thread routes; a catch-up thread of one of the stream's
 * runners rejoins through mc__route_rejoin(). Both hold the stream's route_lock, so a rejoin
 * happens between two routed items, never during one. Lock order: route_lock -> runner lock.
 *
 * Invariants, per (stream, runner) route:
 *   - attached: every item routed is either pushed to the runner or, when it is covered by
 *     skip_until (the runner completed it before: its stored position at start, or its
 *     catch-up's last item at a rejoin), skipped;
 *   - detached: nothing is pushed; the runner's catch-up reads from its own position, which
 *     lies before every item it missed, so nothing is lost;
 *   - rejoin: only when the catch-up's position is at or after `head` (the newest item
 *     routed), with skip_until = that position: the shared path then delivers exactly the
 *     items after it. No gap, no duplicate;
 *   - a stream's error event (its last, without a position) reaches every attached runner
 *     when routed, and a runner detached then when it rejoins (`final`), so no sink is left
 *     waiting on a stream that failed.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_private.h"

#define LIVE_WAIT_SLICE_MS 200

int mc__route_init(mc__stream_t *s)
{
    s->routes = calloc(s->n_sinks ? s->n_sinks : 1, sizeof(mc__route_t));
    s->sink_written = calloc(s->n_sinks ? s->n_sinks : 1, sizeof(mc__position_t));
    s->head = calloc(1, 64);
    if (!s->routes || !s->sink_written || !s->head) {
        return MC_ENOMEM;
    }
    s->head_cap = 64;
    for (size_t k = 0; k < s->n_sinks; k++) {
        mc__route_t *rt = &s->routes[k];
        rt->runner = s->sinks[k]->runner;
        rt->slot = mc__runner_slot(rt->runner, s->index);
        rt->attached = true;
    }
    return 0;
}

void mc__route_cleanup(mc__stream_t *s)
{
    if (s->routes) {
        for (size_t k = 0; k < s->n_sinks; k++) {
            free(s->routes[k].skip_until);
        }
    }
    free(s->routes);
    s->routes = NULL;
    if (s->sink_written) {
        for (size_t k = 0; k < s->n_sinks; k++) {
            mc__position_clear(&s->sink_written[k]);
        }
    }
    free(s->sink_written);
    s->sink_written = NULL;
    free(s->head);
    s->head = NULL;
    mc__pref_clear(&s->routed);
    mc__pref_clear(&s->final);
}

static void set_head(mc__stream_t *s, const char *data)
{
    size_t n = strlen(data) + 1;
    if (n > s->head_cap) {
        char *h = realloc(s->head, n);
        if (!h) {
            return; /* keep the older head: a rejoin then waits for a later item */
        }
        s->head = h;
        s->head_cap = n;
    }
    memcpy(s->head, data, n);
}

/* Whether a route skips an item with position `data` (and forgets its skip point once past
 * it). Items without a position (ready, reset) are never skipped. */
static bool skipped(mc__route_t *rt, const char *data)
{
    if (!rt->skip_until || !data) {
        return false;
    }
    if (mc__token_data_cmp(data, rt->skip_until) <= 0) {
        return true;
    }
    free(rt->skip_until);
    rt->skip_until = NULL;
    return false;
}

/* Pushes one reference of `item` to the route's runner. Returns false when the engine stops
 * while the watcher waits for a live runner. */
static bool push_route(mc__stream_t *s, mc__route_t *rt, const mc__pref_t *item)
{
    mc__pref_t ref;
    mc__pref_copy(&ref, item);
    int rc = mc__runner_push(rt->runner, rt->slot, &ref);
    if (rc == MC_EAGAIN && mc__runner_live(rt->runner)) {
        /* Back-pressure from the live fan-out: it never blocks on a socket, so waiting here
         * is waiting for CPU, not for a client. */
        while (rc == MC_EAGAIN) {
            if (atomic_load(&s->engine->stopping)) {
                mc__pref_clear(&ref);
                return false;
            }
            rc = mc__runner_push_wait(rt->runner, rt->slot, &ref, LIVE_WAIT_SLICE_MS, false);
        }
    }
    if (rc == 0) {
        return true;
    }
    mc__pref_clear(&ref);
    if (rc == MC_EAGAIN) {
        mc__runner_request_detach(rt->runner);
    }
    /* Full (now detaching) or not accepting (detached, failed): the runner reads this item
     * again from its own position, if it ever does. */
    rt->attached = false;
    if (item->ev) {
        mc__runner_missed(rt->runner, rt->slot);
    }
    return true;
}

static bool route(mc__stream_t *s, mc__pref_t *item)
{
    const char *data = mc__pref_data(item);
    bool ok = true;
    pthread_mutex_lock(&s->route_lock);
    if (data) {
        set_head(s, data);
        if (s->n_sinks == 0) {
            mc__pref_t keep;
            mc__pref_copy(&keep, item);
            mc__pref_move(&s->routed, &keep);
        }
    } else if (item->ev && mc_event_kind(item->ev) == MC_EVENT_ERROR) {
        /* The stream's last event: kept for runners that are detached now (they miss it
         * here) and rejoin once their catch-up reached the end. */
        mc__pref_copy(&s->final, item);
    }
    for (size_t k = 0; k < s->n_sinks && ok; k++) {
        mc__route_t *rt = &s->routes[k];
        if (!rt->attached) {
            if (item->ev) {
                mc__runner_missed(rt->runner, rt->slot);
            }
            continue;
        }
        if (skipped(rt, data)) {
            continue;
        }
        ok = push_route(s, rt, item);
    }
    pthread_mutex_unlock(&s->route_lock);
    mc__pref_clear(item);
    return ok;
}

bool mc__route_event(mc__stream_t *s, mc_event_t *ev)
{
    mc__pref_t item = {.ev = ev};
    return route(s, &item);
}

bool mc__route_mark(mc__stream_t *s, mc__mark_t *m)
{
    mc__pref_t item = {.mark = m};
    return route(s, &item);
}

bool mc__route_rejoin(mc__stream_t *s, mc__runner_t *r, int slot, const char *data, bool force)
{
    bool joined = false;
    pthread_mutex_lock(&s->route_lock);
    mc__route_t *rt = NULL;
    for (size_t k = 0; k < s->n_sinks; k++) {
        if (s->routes[k].runner == r) {
            rt = &s->routes[k];
        }
    }
    if (rt && (force || !s->head[0] || (data && mc__token_data_cmp(data, s->head) >= 0))) {
        free(rt->skip_until);
        rt->skip_until = !force && data ? strdup(data) : NULL;
        rt->attached = true;
        mc__runner_rejoin(r, slot);
        joined = true;
        if (!mc__pref_empty(&s->final)) {
            push_route(s, rt, &s->final);
        }
    }
    pthread_mutex_unlock(&s->route_lock);
    return joined;
}

bool mc__stream_routed_head(mc_engine_t *e, const char *stream, char *buf, size_t len)
{
    for (size_t k = 0; k < e->n_streams; k++) {
        mc__stream_t *s = &e->streams[k];
        if (strcmp(s->cfg->name, stream) != 0) {
            continue;
        }
        pthread_mutex_lock(&s->route_lock);
        size_t n = s->head ? strlen(s->head) : 0;
        bool ok = n < len;
        if (ok) {
            memcpy(buf, s->head ? s->head : "", n);
            buf[n] = 0;
        }
        pthread_mutex_unlock(&s->route_lock);
        return ok;
    }
    return false;
}
