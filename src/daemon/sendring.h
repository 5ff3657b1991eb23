/*
 * sendring.h: batched socket sends through io_uring, for one loop thread's connections: the
 * sends of one loop pass (one per connection with bytes to write) are queued, then submitted
 * together with one system call (io_uring_enter) instead of one writev(2) each.
 *
 * Thread: the loop thread that owns the connections (a ring is never shared between threads).
 * Invariants: every send is non-blocking (MSG_DONTWAIT): it completes during the submission
 * with what the socket buffer took (possibly nothing: -EAGAIN), exactly like a writev on the
 * non-blocking socket would, so no send is ever in flight after mcd_sendring_run() returns
 * and the caller keeps the rest for its ordinary write path. Buffers are the caller's (frames
 * shared by reference; nothing is copied).
 */
#ifndef MONGOCAST_DAEMON_SENDRING_H
#define MONGOCAST_DAEMON_SENDRING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "mongocast.h"

/* How the server writes to its sockets (server.io). */
typedef enum mcd_io_mode {
    MCD_IO_AUTO = 0, /* io_uring when the kernel allows it, else writev */
    MCD_IO_URING,    /* io_uring or refuse to start */
    MCD_IO_WRITEV,   /* one writev per connection and pass (the fallback) */
} mcd_io_mode_t;

/* server.io as configured: "auto" (also NULL), "uring" or "writev". */
mcd_io_mode_t mcd_io_mode_parse(const char *s);

/* A result of mcd_sendring_run() for a send the kernel never saw (the submission failed
 * before it): nothing of it was written, so the caller writes it the ordinary way. */
#define MCD_SENDRING_NOT_SENT (-1000000)

typedef struct mcd_sendring mcd_sendring_t;

/* Sets up a ring for up to `entries` sends per submission (rounded up to a power of two,
 * between 64 and 4096) and checks that the kernel supports the sends it will make. Returns
 * 0, or MC_EIO (cause: the errno) with the reason in *err when io_uring is unavailable or
 * refused (no kernel support, disabled by sysctl or seccomp, out of memory), MC_ENOMEM. */
int mcd_sendring_new(mcd_sendring_t **out, unsigned entries, mc_error_t *err);
void mcd_sendring_destroy(mcd_sendring_t *r);

/* How many sends may still be added before mcd_sendring_run() must be called. */
unsigned mcd_sendring_room(const mcd_sendring_t *r);

/* Adds a send of iov[0..n) on `fd`; `tag` comes back with its result. The iovec array must
 * stay valid until mcd_sendring_run() returns, the bytes until the caller handled the
 * result. Call only while mcd_sendring_room() > 0. */
void mcd_sendring_add(mcd_sendring_t *r, int fd, const struct iovec *iov, unsigned n, void *tag);

/* The result of one send: bytes written (possibly fewer than asked), -EAGAIN (nothing:
 * the socket buffer is full), MCD_SENDRING_NOT_SENT, or another negative errno (the
 * connection failed). */
typedef void (*mcd_sendring_done_fn)(void *tag, int res, void *arg);

/* Submits every send added since the last run with one system call (more only when the
 * kernel takes them in parts) and calls `done` for each, in completion order. Returns 0, or
 * MC_EIO when the ring failed: the sends it did not take are reported as
 * MCD_SENDRING_NOT_SENT and the ring must not be used again (destroy it and write the
 * ordinary way). */
int mcd_sendring_run(mcd_sendring_t *r, mcd_sendring_done_fn done, void *arg, mc_error_t *err);

/* Counters for /metrics: io_uring_enter calls made to submit, and sends submitted. */
uint64_t mcd_sendring_submits(const mcd_sendring_t *r);
uint64_t mcd_sendring_sends(const mcd_sendring_t *r);

#endif
