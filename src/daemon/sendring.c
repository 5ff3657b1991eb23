/*
 * sendring.c: batched socket sends through io_uring (see sendring.h).
 *
 * Thread: the loop thread that owns the ring.
 * Invariants: a send is queued only with MSG_DONTWAIT, so the kernel completes it during the
 * io_uring_enter that submits it (REQ_F_NOWAIT: -EAGAIN is returned, never retried in the
 * background) and a short write is reported as its byte count; mcd_sendring_run() returns
 * only when every send it submitted has its result, so no send outlives the pass, no buffer
 * is referenced by the kernel after it, and a connection can be closed at any time between
 * passes. MSG_NOSIGNAL: a peer that went away costs EPIPE, not SIGPIPE.
 */
#include "sendring.h"

#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MIN_ENTRIES 64u
#define MAX_ENTRIES 4096u

struct mcd_sendring {
    struct io_uring ring;
    unsigned entries;
    unsigned queued; /* added since the last run */
    void **tags;     /* tags[i]: the i-th send added since the last run */
    uint8_t *seen;   /* seen[i]: its result was handed to the caller */
    struct msghdr *mh;
    uint64_t submits;
    uint64_t sends;
};

mcd_io_mode_t mcd_io_mode_parse(const char *s)
{
    if (s && strcmp(s, "uring") == 0) {
        return MCD_IO_URING;
    }
    if (s && strcmp(s, "writev") == 0) {
        return MCD_IO_WRITEV;
    }
    return MCD_IO_AUTO;
}

/* Frees the ring's memory (not the kernel ring). */
static void free_ring(mcd_sendring_t *r)
{
    free(r->tags);
    free(r->mh);
    free(r->seen);
    free(r);
}

int mcd_sendring_new(mcd_sendring_t **out, unsigned entries, mc_error_t *err)
{
    *out = NULL;
    unsigned n = MIN_ENTRIES;
    while (n < entries && n < MAX_ENTRIES) {
        n <<= 1;
    }
    mcd_sendring_t *r = calloc(1, sizeof(*r));
    if (!r) {
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    r->tags = calloc(n, sizeof(*r->tags));
    r->mh = calloc(n, sizeof(*r->mh));
    r->seen = calloc(n, 1);
    if (!r->tags || !r->mh || !r->seen) {
        free_ring(r);
        return mc_error_set(err, MC_ENOMEM, MC_DOMAIN_MONGOCAST, MC_ENOMEM, "out of memory");
    }
    int rc = io_uring_queue_init(n, &r->ring, 0);
    if (rc < 0) {
        free_ring(r);
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, -rc, "io_uring_setup: %s", strerror(-rc));
    }
    /* SENDMSG exists since Linux 5.3, but a kernel may allow io_uring and still not offer
     * it; the probe says so without sending anything. */
    struct io_uring_probe *probe = io_uring_get_probe_ring(&r->ring);
    bool ok = probe && io_uring_opcode_supported(probe, IORING_OP_SENDMSG);
    io_uring_free_probe(probe);
    if (!ok) {
        io_uring_queue_exit(&r->ring);
        free_ring(r);
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, EOPNOTSUPP,
                            "io_uring: the kernel does not offer SENDMSG");
    }
    r->entries = n;
    *out = r;
    return 0;
}

void mcd_sendring_destroy(mcd_sendring_t *r)
{
    if (!r) {
        return;
    }
    io_uring_queue_exit(&r->ring);
    free_ring(r);
}

unsigned mcd_sendring_room(const mcd_sendring_t *r)
{
    return r->entries - r->queued;
}

void mcd_sendring_add(mcd_sendring_t *r, int fd, const struct iovec *iov, unsigned n, void *tag)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    unsigned i = r->queued++;
    struct msghdr *mh = &r->mh[i];
    memset(mh, 0, sizeof(*mh));
    mh->msg_iov = (struct iovec *)iov;
    mh->msg_iovlen = n;
    io_uring_prep_sendmsg(sqe, fd, mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    /* The index, not the tag: a send the kernel never took is then known by position. */
    io_uring_sqe_set_data64(sqe, i);
    r->tags[i] = tag;
}

int mcd_sendring_run(mcd_sendring_t *r, mcd_sendring_done_fn done, void *arg, mc_error_t *err)
{
    unsigned queued = r->queued;
    r->queued = 0;
    if (queued == 0) {
        return 0;
    }
    /* The kernel takes SQEs in order and may take fewer than offered (then offer the rest
     * again). Each io_uring_enter both submits and, MSG_DONTWAIT, completes what it took. */
    unsigned taken = 0;
    int rc = 0;
    int stalls = 0;
    while (taken < queued) {
        int n = io_uring_submit(&r->ring);
        r->submits++;
        if (n > 0) {
            taken += (unsigned)n;
            stalls = 0;
            continue;
        }
        if ((n == -EINTR || n == -EAGAIN || n == -EBUSY || n == 0) && ++stalls < 8) {
            continue;
        }
        int e = n < 0 ? -n : EIO;
        rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "io_uring_enter: %s", strerror(e));
        break;
    }
    r->sends += taken;
    memset(r->seen, 0, queued);
    for (unsigned got = 0; got < taken; got++) {
        struct io_uring_cqe *cqe = NULL;
        int w = io_uring_peek_cqe(&r->ring, &cqe);
        while (w == -EAGAIN || w == -EINTR) {
            /* Not expected with MSG_DONTWAIT; wait rather than lose a result. */
            w = io_uring_wait_cqe(&r->ring, &cqe);
        }
        if (w < 0) {
            /* The ring itself broke and the results of sends the kernel took are lost (so
             * are those connections' byte positions: they fail). Not seen in practice. */
            rc = mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, -w, "io_uring wait: %s", strerror(-w));
            break;
        }
        uint64_t i = io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        if (i < taken && !r->seen[i]) {
            r->seen[i] = 1;
            done(r->tags[i], res, arg);
        }
    }
    for (unsigned i = 0; i < queued; i++) {
        if (!r->seen[i]) {
            done(r->tags[i], i < taken ? -EIO : MCD_SENDRING_NOT_SENT, arg);
        }
    }
    return rc;
}

uint64_t mcd_sendring_submits(const mcd_sendring_t *r)
{
    return r ? r->submits : 0;
}

uint64_t mcd_sendring_sends(const mcd_sendring_t *r)
{
    return r ? r->sends : 0;
}
