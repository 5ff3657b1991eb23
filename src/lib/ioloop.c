/*
 * ioloop.c: the engine's shared I/O loop: one libuv loop on one thread for every sink with an
 * asynchronous client (MC_SINK_ASYNC: hiredis's libuv adapter, libcurl's multi-socket API,
 * libnats's libuv adapter, timers). Created by mc_engine_start() only when such a sink exists.
 *
 * Threads: mc__ioloop_new() and the sinks' start() (which may create handles on the loop)
 * run on the engine's owner thread before mc__ioloop_start(); from then on only the loop
 * thread touches the loop, except uv_async_send(), which any thread may call (runners are
 * woken that way). mc__ioloop_stop() asks the loop thread to close what is still open and
 * joins it once no handle is left.
 * Invariant: the loop's own `wake` handle keeps it alive until stop; every other handle
 * belongs to a runner (closed when the runner finishes) or to a sink (closed by its stop()).
 */
#include <errno.h>
#include <stdlib.h>

#include <uv.h>

#include "engine_private.h"

struct mc__ioloop {
    uv_loop_t loop;
    uv_async_t wake; /* stop requests */
    pthread_t thread;
    bool running;
    bool loop_ready;
    atomic_bool quit;
};

mc__ioloop_t *mc__ioloop_new(mc_error_t *err)
{
    mc__ioloop_t *l = calloc(1, sizeof(*l));
    if (!l) {
        mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
        return NULL;
    }
    atomic_init(&l->quit, false);
    int rc = uv_loop_init(&l->loop);
    if (rc != 0) {
        free(l);
        mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, -rc, "cannot create the I/O loop: %s",
                     uv_strerror(rc));
        return NULL;
    }
    l->loop_ready = true;
    return l;
}

void *mc__ioloop_uv(mc__ioloop_t *l)
{
    return l ? &l->loop : NULL;
}

bool mc__ioloop_running(const mc__ioloop_t *l)
{
    return l && l->running;
}

static void close_one(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) {
        uv_close(h, NULL);
    }
}

/* Stop request: close whatever is still open (the runners have finished, or stop gave up on
 * them); uv_run then returns once the last close callback ran. */
static void on_wake(uv_async_t *a)
{
    mc__ioloop_t *l = a->data;
    if (atomic_load(&l->quit)) {
        uv_walk(&l->loop, close_one, NULL);
    }
}

static void *loop_main(void *arg)
{
    mc__ioloop_t *l = arg;
    mc__thread_name("mcioloop", NULL);
    uv_run(&l->loop, UV_RUN_DEFAULT);
    return NULL;
}

int mc__ioloop_start(mc__ioloop_t *l, mc_error_t *err)
{
    int rc = uv_async_init(&l->loop, &l->wake, on_wake);
    if (rc != 0) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, -rc, "I/O loop: %s", uv_strerror(rc));
    }
    l->wake.data = l;
    if (pthread_create(&l->thread, NULL, loop_main, l) != 0) {
        uv_close((uv_handle_t *)&l->wake, NULL);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, errno,
                            "cannot start the I/O loop thread");
    }
    l->running = true;
    return 0;
}

void mc__ioloop_stop(mc__ioloop_t *l)
{
    if (!l || !l->loop_ready) {
        return;
    }
    atomic_store(&l->quit, true);
    if (l->running) {
        uv_async_send(&l->wake);
        pthread_join(l->thread, NULL);
        l->running = false;
    } else {
        /* Never started (a failed mc_engine_start()): close the handles created so far here. */
        uv_walk(&l->loop, close_one, NULL);
        uv_run(&l->loop, UV_RUN_DEFAULT);
    }
}

void mc__ioloop_destroy(mc__ioloop_t *l)
{
    if (!l) {
        return;
    }
    mc__ioloop_stop(l);
    if (l->loop_ready) {
        uv_loop_close(&l->loop);
    }
    free(l);
}
