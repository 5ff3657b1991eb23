/*
 * sendpool.h: the socket sends of one loop pass spread over several threads (server.threads).
 * The loop thread keeps every decision (what each connection gets, in which order, slow
 * consumers, closes); only the system calls that hand the pass's bytes to the kernel run in
 * parallel: the loop thread and threads - 1 send threads each take chunks of the pass's sends
 * and make them (io_uring, one ring per thread, or sendmsg), and the loop thread continues
 * once every send has its result. On loopback and on real NICs most of a delivery's CPU is in
 * the kernel's send path, which is what this spreads over the cores.
 *
 * Thread: mcd_sendpool_new/destroy on the owner's thread (the loop is not running), add/run
 * and the counters on the loop thread that owns the connections; the send threads only run
 * the sends of the run in progress.
 * Invariants: like sendring.h, every send is non-blocking (MSG_DONTWAIT) and completes within
 * mcd_sendpool_run(): when it returns no thread touches a buffer, descriptor or result of the
 * run any more, so connections can be closed between runs. Results are reported in the order
 * the sends were added, on the calling thread. Buffers are the caller's (never copied).
 */
#ifndef MONGOCAST_DAEMON_SENDPOOL_H
#define MONGOCAST_DAEMON_SENDPOOL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "mongocast.h"
#include "sendring.h"

#define MCD_SENDPOOL_MAX_THREADS 64

typedef struct mcd_sendpool mcd_sendpool_t;

/* A pool of `threads` (2..MCD_SENDPOOL_MAX_THREADS) senders: the caller of
 * mcd_sendpool_run() and threads - 1 send threads, for up to `entries` sends per run (at
 * least 64, at most 4096). With `uring` each sender gets its own io_uring (sendring.h); when
 * the kernel refuses one, MC_EIO with the reason in *err (ask again without). Returns 0,
 * MC_EINVAL (threads out of range), MC_EIO or MC_ENOMEM (threads could not be started). */
int mcd_sendpool_new(mcd_sendpool_t **out, unsigned threads, bool uring, unsigned entries,
                     mc_error_t *err);
/* Stops and joins the send threads and frees everything. NULL is a no-op. */
void mcd_sendpool_destroy(mcd_sendpool_t *p);

/* How many sends may still be added before mcd_sendpool_run() must be called. */
unsigned mcd_sendpool_room(const mcd_sendpool_t *p);
/* Adds a send of iov[0..n) on `fd` (same contract as mcd_sendring_add()). */
void mcd_sendpool_add(mcd_sendpool_t *p, int fd, const struct iovec *iov, unsigned n, void *tag);

/* Makes every send added since the last run, spread over the senders (a run of only a few
 * sends is made by the calling thread alone: waking a thread costs more), then calls `done`
 * for each on the calling thread, in the order they were added, with the results of
 * mcd_sendring_done_fn. Returns 0, or MC_EIO when an io_uring failed: its untaken sends are
 * reported as MCD_SENDRING_NOT_SENT and the pool writes with sendmsg from then on (every
 * ring is dropped). */
int mcd_sendpool_run(mcd_sendpool_t *p, mcd_sendring_done_fn done, void *arg, mc_error_t *err);

/* The pool's senders, and whether they write through io_uring (false after a ring failed). */
unsigned mcd_sendpool_threads(const mcd_sendpool_t *p);
bool mcd_sendpool_uring(const mcd_sendpool_t *p);

/* Counters for /metrics (loop thread, between runs): sends made by sender `i` (0: the loop
 * thread), system calls that made them (io_uring_enter or sendmsg), and runs that woke the
 * send threads. */
uint64_t mcd_sendpool_sends_of(const mcd_sendpool_t *p, unsigned i);
uint64_t mcd_sendpool_syscalls(const mcd_sendpool_t *p);
uint64_t mcd_sendpool_parallel_runs(const mcd_sendpool_t *p);

#endif
