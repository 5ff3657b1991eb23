/*
 * sendpool.c: the sends of one loop pass spread over several threads (see sendpool.h).
 *
 * Thread: add/run on the loop thread; send_main() on each send thread.
 * How a run goes: the loop thread publishes the run (its number in the high half of `claim`,
 * the next unclaimed send in the low half; store-release after the sends were added), wakes
 * the send threads with one broadcast, and then, like each of them, claims chunks of sends
 * with a compare-and-swap on `claim` and makes them. A thread that wakes late for an earlier
 * run fails the compare (the run number differs) and sleeps again, so it never touches a later
 * run's sends. Every chunk's results are written before `done` is raised by its size
 * (release); the loop thread returns once `done` counts every send (acquire), so it then owns
 * every result, and nothing of the run is touched by another thread after that.
 * Invariants: a ring (sendring.c) is used by one sender only; senders never call libuv.
 */
#include "sendpool.h"

#include "engine_private.h" /* mc__thread_name */

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MIN_ENTRIES 64u
#define MAX_ENTRIES 4096u
#define MIN_CHUNK 8u /* sends per claim: fewer costs more in claims than it spreads */

typedef struct pool_send {
    int fd;
    unsigned n;
    const struct iovec *iov;
    void *tag;
    int res;
} pool_send_t;

/* One sender: index 0 is the thread that calls mcd_sendpool_run(). */
typedef struct sender {
    mcd_sendpool_t *pool;
    unsigned index;
    pthread_t thread;
    mcd_sendring_t *ring; /* NULL: sendmsg */
    _Atomic uint64_t sends;
    _Atomic uint64_t syscalls;
    _Atomic bool ring_failed; /* its ring failed in the current run */
    mc_error_t ring_error;    /* why (written before ring_failed is raised) */
} sender_t;

struct mcd_sendpool {
    unsigned n_senders;
    unsigned entries;
    unsigned queued;
    bool uring;
    pool_send_t *sends;
    sender_t *senders;
    unsigned started; /* send threads running */
    /* The current run: run number << 32 | next unclaimed send. */
    _Atomic uint64_t claim;
    _Atomic uint32_t done; /* sends of the current run with their result */
    uint32_t run_len;      /* sends in the current run (set before `claim` is published) */
    uint32_t chunk;        /* sends per claim in the current run */
    pthread_mutex_t lock;  /* run_no and stopping, with `wake` */
    pthread_cond_t wake;
    uint32_t run_no;
    bool stopping;
    uint64_t parallel_runs;
};

/* Claims the next chunk of run `run`: its first send in *first, its size returned (0: the
 * run has no chunk left, or another run began). */
static uint32_t claim_chunk(mcd_sendpool_t *p, uint32_t run, uint32_t len, uint32_t chunk,
                            uint32_t *first)
{
    uint64_t cur = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(cur >> 32) != run) {
            return 0;
        }
        uint32_t next = (uint32_t)cur;
        if (next >= len) {
            return 0;
        }
        uint32_t k = len - next < chunk ? len - next : chunk;
        uint64_t want = (uint64_t)run << 32 | (next + k);
        if (atomic_compare_exchange_weak_explicit(&p->claim, &cur, want, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            *first = next;
            return k;
        }
    }
}

static void record_result(void *tag, int res, void *arg)
{
    (void)arg;
    ((pool_send_t *)tag)->res = res;
}

/* Makes sends [first, first + k) on sender `s`. */
static void make_sends(sender_t *s, pool_send_t *v, uint32_t k)
{
    if (s->ring && !atomic_load_explicit(&s->ring_failed, memory_order_relaxed)) {
        for (uint32_t i = 0; i < k; i++) {
            mcd_sendring_add(s->ring, v[i].fd, v[i].iov, v[i].n, &v[i]);
        }
        uint64_t before = mcd_sendring_submits(s->ring);
        if (mcd_sendring_run(s->ring, record_result, NULL, &s->ring_error) != 0) {
            atomic_store_explicit(&s->ring_failed, true, memory_order_relaxed);
        }
        atomic_fetch_add_explicit(&s->syscalls, mcd_sendring_submits(s->ring) - before,
                                  memory_order_relaxed);
    } else if (s->ring) {
        /* This sender's ring failed earlier in this run: the kernel never saw these. */
        for (uint32_t i = 0; i < k; i++) {
            v[i].res = MCD_SENDRING_NOT_SENT;
        }
    } else {
        for (uint32_t i = 0; i < k; i++) {
            struct msghdr mh;
            memset(&mh, 0, sizeof(mh));
            mh.msg_iov = (struct iovec *)v[i].iov;
            mh.msg_iovlen = v[i].n;
            ssize_t r;
            do {
                r = sendmsg(v[i].fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (r < 0 && errno == EINTR);
            v[i].res = r >= 0 ? (int)r : -errno;
        }
        atomic_fetch_add_explicit(&s->syscalls, k, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&s->sends, k, memory_order_relaxed);
}

/* Claims and makes chunks of run `run` until none is left. */
static void work_run(sender_t *s, uint32_t run, uint32_t len, uint32_t chunk)
{
    mcd_sendpool_t *p = s->pool;
    uint32_t first, k;
    while ((k = claim_chunk(p, run, len, chunk, &first)) != 0) {
        make_sends(s, p->sends + first, k);
        atomic_fetch_add_explicit(&p->done, k, memory_order_release);
    }
}

static void *send_main(void *arg)
{
    sender_t *s = arg;
    mcd_sendpool_t *p = s->pool;
    mc__thread_name("mcsend", NULL);
    uint32_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->stopping && p->run_no == seen) {
            pthread_cond_wait(&p->wake, &p->lock);
        }
        if (p->stopping) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        seen = p->run_no;
        uint32_t len = p->run_len;
        uint32_t chunk = p->chunk;
        pthread_mutex_unlock(&p->lock);
        work_run(s, seen, len, chunk);
    }
}

static void stop_threads(mcd_sendpool_t *p)
{
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 1; i <= p->started; i++) {
        pthread_join(p->senders[i].thread, NULL);
    }
    p->started = 0;
}

static void drop_rings(mcd_sendpool_t *p)
{
    for (unsigned i = 0; i < p->n_senders; i++) {
        mcd_sendring_destroy(p->senders[i].ring);
        p->senders[i].ring = NULL;
    }
    p->uring = false;
}

void mcd_sendpool_destroy(mcd_sendpool_t *p)
{
    if (!p) {
        return;
    }
    stop_threads(p);
    drop_rings(p);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    free(p->senders);
    free(p->sends);
    free(p);
}

int mcd_sendpool_new(mcd_sendpool_t **out, unsigned threads, bool uring, unsigned entries,
                     mc_error_t *err)
{
    *out = NULL;
    if (threads < 2 || threads > MCD_SENDPOOL_MAX_THREADS) {
        return mc_error_set(err, MC_EINVAL, MC_DOMAIN_MONGOCAST, MC_EINVAL,
                            "a send pool has 2 to %d threads, not %u", MCD_SENDPOOL_MAX_THREADS,
                            threads);
    }
    unsigned n = MIN_ENTRIES;
    while (n < entries && n < MAX_ENTRIES) {
        n <<= 1;
    }
    mcd_sendpool_t *p = calloc(1, sizeof(*p));
    if (!p || !(p->sends = calloc(n, sizeof(*p->sends))) ||
        !(p->senders = calloc(threads, sizeof(*p->senders)))) {
        if (p) {
            free(p->sends);
        }
        free(p);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    p->n_senders = threads;
    p->entries = n;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    for (unsigned i = 0; i < threads; i++) {
        p->senders[i].pool = p;
        p->senders[i].index = i;
    }
    if (uring) {
        p->uring = true;
        for (unsigned i = 0; i < threads; i++) {
            /* Every sender may get a whole run (the others may wake too late). */
            int rc = mcd_sendring_new(&p->senders[i].ring, n, err);
            if (rc != 0) {
                mcd_sendpool_destroy(p);
                return rc;
            }
        }
    }
    for (unsigned i = 1; i < threads; i++) {
        int e = pthread_create(&p->senders[i].thread, NULL, send_main, &p->senders[i]);
        if (e != 0) {
            mcd_sendpool_destroy(p);
            return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_ERRNO, e,
                                "cannot start the send threads");
        }
        p->started = i;
    }
    *out = p;
    return 0;
}

unsigned mcd_sendpool_room(const mcd_sendpool_t *p)
{
    return p->entries - p->queued;
}

void mcd_sendpool_add(mcd_sendpool_t *p, int fd, const struct iovec *iov, unsigned n, void *tag)
{
    pool_send_t *s = &p->sends[p->queued++];
    s->fd = fd;
    s->iov = iov;
    s->n = n;
    s->tag = tag;
    s->res = MCD_SENDRING_NOT_SENT;
}

int mcd_sendpool_run(mcd_sendpool_t *p, mcd_sendring_done_fn done, void *arg, mc_error_t *err)
{
    uint32_t len = p->queued;
    if (len == 0) {
        return 0;
    }
    unsigned senders = p->n_senders;
    uint32_t chunk = (len + senders * 4 - 1) / (senders * 4);
    if (chunk < MIN_CHUNK) {
        chunk = MIN_CHUNK;
    }
    bool parallel = len > chunk;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    pthread_mutex_lock(&p->lock);
    uint32_t run = ++p->run_no;
    p->run_len = len;
    p->chunk = chunk;
    /* Published after the sends were added: whoever claims from it sees them. */
    atomic_store_explicit(&p->claim, (uint64_t)run << 32, memory_order_release);
    if (parallel) {
        pthread_cond_broadcast(&p->wake);
        p->parallel_runs++;
    }
    pthread_mutex_unlock(&p->lock);
    work_run(&p->senders[0], run, len, chunk);
    /* What is left is being sent right now by a send thread: at most one chunk each. */
    while (atomic_load_explicit(&p->done, memory_order_acquire) < len) {
        sched_yield();
    }
    p->queued = 0;
    int rc = 0;
    for (unsigned i = 0; i < senders; i++) {
        sender_t *s = &p->senders[i];
        if (atomic_load_explicit(&s->ring_failed, memory_order_relaxed) && rc == 0) {
            rc = MC_EIO;
            if (err) {
                *err = s->ring_error;
            }
        }
        atomic_store_explicit(&s->ring_failed, false, memory_order_relaxed);
    }
    if (rc != 0) {
        /* Every ring's last run has returned (done counts all sends): nobody uses them. */
        drop_rings(p);
    }
    for (uint32_t i = 0; i < len; i++) {
        done(p->sends[i].tag, p->sends[i].res, arg);
    }
    return rc;
}

unsigned mcd_sendpool_threads(const mcd_sendpool_t *p)
{
    return p->n_senders;
}

bool mcd_sendpool_uring(const mcd_sendpool_t *p)
{
    return p->uring;
}

uint64_t mcd_sendpool_sends_of(const mcd_sendpool_t *p, unsigned i)
{
    return i < p->n_senders ? atomic_load_explicit(&p->senders[i].sends, memory_order_relaxed)
                            : 0;
}

uint64_t mcd_sendpool_syscalls(const mcd_sendpool_t *p)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < p->n_senders; i++) {
        n += atomic_load_explicit(&p->senders[i].syscalls, memory_order_relaxed);
    }
    return n;
}

uint64_t mcd_sendpool_parallel_runs(const mcd_sendpool_t *p)
{
    return p->parallel_runs;
}
