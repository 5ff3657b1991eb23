/*
 * bench_floor.c: the floor of the WebSocket fan-out (docs/PERFORMANCE.md, "The floor"): a
 * program that does only the kernel work of delivering the same frames to the same
 * connections with the same send pattern as `mongocast run`, so that the daemon's CPU per
 * delivery can be given as a ratio to it.
 *
 * It stands in for the daemon in front of bench_fanout's clients: it listens, answers each
 * client's WebSocket handshake with 101 and {"type":"ready","stream":NAME}, answers /readyz
 * with 200 (for scripts/bench.sh), and once it receives SIGUSR1 (sent by bench_fanout
 * --generated 1 right after it took its CPU reading) it generates EVENTS change messages at
 * RATE per second in groups of BATCH (a mean: with 6.5, groups of 6 and 7 alternate, so
 * the floor writes as many frames per system call as the daemon did): each group's frames
 * are built once (a WebSocket header and a JSON body of --msg-bytes bytes, shaped like
 * mongocast's change message, with "bench_seq" and "bench_t" in it so the clients count and
 * time them) and written to every connection, either with one writev(2) per connection
 * (--io writev, the daemon's writev path) or as one SENDMSG per connection submitted
 * together through io_uring (--io uring, the daemon's io_uring path: one io_uring_enter per
 * group). No JSON rendering, no queues, no per-subscriber decisions, no event loop library:
 * what is left is what the kernel must do.
 *
 * Thread: one (the loop), like one mongocast loop thread. Partial writes (a client that fell
 * behind) are kept per connection and written before its next frames; the clients of the
 * benchmark keep up, so this path stays cold. Exits on SIGTERM/SIGINT.
 *
 * Usage: bench_floor --clients N [--port 0] [--events 10000] [--rate 1000] [--batch 1]
 *                    [--msg-bytes 629] [--io writev|uring] [--stream fan]
 * Prints "server listening on 127.0.0.1:PORT" on stderr (as the daemon does) and, when the
 * events are out, "floor sent events=E sends=S syscalls=C partial=P" on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" /* bench_fanout's fixed key, RFC 6455 §1.3 */
#define MAX_BATCH 64

typedef struct conn {
    int fd;
    bool open;      /* upgraded: receives the events */
    char req[4096]; /* the handshake request until its blank line */
    size_t req_len;
    char *pend; /* bytes a short write left, written before anything else */
    size_t pend_len;
    struct msghdr mh; /* io_uring: this connection's send of the current group */
} conn_t;

static struct {
    int clients;
    int port;
    int64_t events;
    double rate;
    double batch;
    int msg_bytes;
    bool uring;
    const char *stream;
} O = {.events = 10000, .rate = 1000, .batch = 1.0, .msg_bytes = 629, .stream = "fan"};

static conn_t *conns;
static int n_conns, n_open;
static uint64_t sends, syscalls, partial;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A WebSocket text frame header for `len` payload bytes; returns its length. */
static size_t ws_header(uint8_t *h, size_t len)
{
    h[0] = 0x81;
    if (len < 126) {
        h[1] = (uint8_t)len;
        return 2;
    }
    if (len < 65536) {
        h[1] = 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++) {
        h[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
    return 10;
}

/* The body of event `seq`: a change message like mongocast's for a benchmark document (a
 * 114-digit id, an insert with clusterTime, wallTime, fullDocument, ns, documentKey), padded
 * to --msg-bytes. */
static size_t make_body(char *out, size_t cap, int64_t seq, int64_t t)
{
    static const char id[] = "826B17050E000000012B022C0100296E5A1004E62EF73FA5C4400A98ED8A92B26BF"
                             "BB946645F696400646B17050E3193D1713563A7D50004";
    char head[1024], tail[256];
    int h = snprintf(head, sizeof(head),
                     "{\"type\":\"change\",\"stream\":\"%s\",\"id\":\"%s\",\"change\":{"
                     "\"operationType\":\"insert\",\"clusterTime\":{\"$timestamp\":{\"t\":"
                     "1796670734,\"i\":1}},\"wallTime\":{\"$date\":\"2026-12-07T19:12:14.092Z\"},"
                     "\"fullDocument\":{\"_id\":{\"$oid\":\"6b17050e3193d1713563a7d5\"},"
                     "\"bench_seq\":%" PRId64 ",\"bench_t\":%" PRId64
                     ",\"owner\":\"user-0001\",\"pad\":\"",
                     O.stream, id, seq, t);
    int tl = snprintf(tail, sizeof(tail),
                      "\"},\"ns\":{\"db\":\"bench\",\"coll\":\"fanout\"},\"documentKey\":{\"_id\":"
                      "{\"$oid\":\"6b17050e3193d1713563a7d5\"}}}}");
    long pad = (long)O.msg_bytes - h - tl;
    if (pad < 0) {
        pad = 0;
    }
    size_t n = (size_t)h + (size_t)pad + (size_t)tl;
    if (n > cap) {
        return 0;
    }
    memcpy(out, head, (size_t)h);
    memset(out + h, 'x', (size_t)pad);
    memcpy(out + h + pad, tail, (size_t)tl);
    return n;
}

static void conn_close(conn_t *c)
{
    if (c->fd >= 0) {
        close(c->fd);
    }
    if (c->open) {
        n_open--;
    }
    c->fd = -1;
    c->open = false;
    free(c->pend);
    c->pend = NULL;
    c->pend_len = 0;
}

/* Keeps what a short write left (from byte `done` of the iovecs) for later. */
static void keep_rest(conn_t *c, const struct iovec *iov, int n, size_t done)
{
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        total += iov[i].iov_len;
    }
    size_t rest = total - done;
    char *p = realloc(c->pend, c->pend_len + rest);
    if (!p) {
        conn_close(c);
        return;
    }
    c->pend = p;
    size_t skip = done;
    for (int i = 0; i < n; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        memcpy(c->pend + c->pend_len, (const char *)iov[i].iov_base + skip, l - skip);
        c->pend_len += l - skip;
        skip = 0;
    }
    partial++;
}

/* Writes what a short write left; true when nothing is left. */
static bool flush_pending(conn_t *c)
{
    while (c->pend_len) {
        ssize_t w = send(c->fd, c->pend, c->pend_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        syscalls++;
        if (w < 0) {
            if (errno == EAGAIN) {
                return false;
            }
            conn_close(c);
            return true;
        }
        memmove(c->pend, c->pend + w, c->pend_len - (size_t)w);
        c->pend_len -= (size_t)w;
    }
    return true;
}

static size_t iov_total(const struct iovec *iov, int n)
{
    size_t total = 0;
    for (int k = 0; k < n; k++) {
        total += iov[k].iov_len;
    }
    return total;
}

/* The result of one send of the group (bytes, or -errno): a short or refused write keeps the
 * rest, another error closes the connection. */
static void after_send(conn_t *c, const struct iovec *iov, int n, size_t total, ssize_t res)
{
    if (res < 0) {
        if (res == -EAGAIN) {
            keep_rest(c, iov, n, 0);
        } else {
            conn_close(c);
        }
    } else if ((size_t)res < total) {
        keep_rest(c, iov, n, (size_t)res);
    }
}

/* Whether the group goes to `c` now: an open connection whose earlier rest is written; with
 * a rest still waiting, the group is kept behind it. */
static bool may_send(conn_t *c, const struct iovec *iov, int n)
{
    if (!c->open) {
        return false;
    }
    if (c->pend_len && !flush_pending(c)) {
        keep_rest(c, iov, n, 0);
        return false;
    }
    return true;
}

static void send_writev(const struct iovec *iov, int n)
{
    size_t total = iov_total(iov, n);
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = &conns[i];
        if (!may_send(c, iov, n)) {
            continue;
        }
        ssize_t w = writev(c->fd, iov, n);
        syscalls++;
        sends++;
        after_send(c, iov, n, total, w < 0 ? -(ssize_t)errno : w);
    }
}

static struct io_uring ring;

/* One SENDMSG per connection, all submitted together with one io_uring_enter; each completes
 * during it (MSG_DONTWAIT), so the results are read from the ring without another call. */
static void send_uring(struct iovec *iov, int n)
{
    size_t total = iov_total(iov, n);
    int queued = 0;
    for (int i = 0; i < n_conns; i++) {
        conn_t *c = &conns[i];
        if (!may_send(c, iov, n)) {
            continue;
        }
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        if (!sqe) {
            io_uring_submit(&ring);
            syscalls++;
            sqe = io_uring_get_sqe(&ring);
        }
        memset(&c->mh, 0, sizeof(c->mh));
        c->mh.msg_iov = iov;
        c->mh.msg_iovlen = (size_t)n;
        /* Non-blocking like the daemon's: a full socket is -EAGAIN at once (kept for later),
         * never a send left waiting in the kernel. */
        io_uring_prep_sendmsg(sqe, c->fd, &c->mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        io_uring_sqe_set_data(sqe, c);
        queued++;
        sends++;
    }
    io_uring_submit(&ring);
    syscalls++;
    while (queued > 0) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_peek_cqe(&ring, &cqe);
        if (rc == -EAGAIN) {
            rc = io_uring_wait_cqe(&ring, &cqe);
            syscalls++;
        }
        if (rc < 0) {
            fprintf(stderr, "bench_floor: io_uring wait: %s\n", strerror(-rc));
            exit(1);
        }
        conn_t *c = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&ring, cqe);
        queued--;
        after_send(c, iov, n, total, res);
    }
}

static volatile sig_atomic_t go, stop;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) {
        go = 1;
    } else {
        stop = 1;
    }
}

/* The handshake of `c` is complete: 101 and ready, or an answer for plain requests. */
static void answer(conn_t *c)
{
    char out[512];
    if (!memmem(c->req, c->req_len, "websocket", 9)) {
        static const char ok[] =
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            "Content-Length: 15\r\nConnection: close\r\n\r\n{\"ready\":true}\n";
        if (write(c->fd, ok, sizeof(ok) - 1) < 0) {
            /* the peer went away: nothing to do */
        }
        conn_close(c);
        return;
    }
    char ready[128];
    int rl = snprintf(ready, sizeof(ready), "{\"type\":\"ready\",\"stream\":\"%s\"}", O.stream);
    int n = snprintf(out, sizeof(out),
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: " WS_ACCEPT "\r\n\r\n");
    uint8_t h[10];
    size_t hl = ws_header(h, (size_t)rl);
    memcpy(out + n, h, hl);
    memcpy(out + n + hl, ready, (size_t)rl);
    if (write(c->fd, out, (size_t)n + hl + (size_t)rl) != (ssize_t)((size_t)n + hl + (size_t)rl)) {
        conn_close(c);
        return;
    }
    c->open = true;
    n_open++;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_floor --clients N [--port 0] [--events 10000] [--rate 1000] "
                    "[--batch 1] [--msg-bytes 629] [--io writev|uring] [--stream fan]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) {
            usage();
        }
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--clients")) {
            O.clients = atoi(v);
        } else if (!strcmp(k, "--port")) {
            O.port = atoi(v);
        } else if (!strcmp(k, "--events")) {
            O.events = atoll(v);
        } else if (!strcmp(k, "--rate")) {
            O.rate = atof(v);
        } else if (!strcmp(k, "--batch")) {
            O.batch = atof(v);
        } else if (!strcmp(k, "--msg-bytes")) {
            O.msg_bytes = atoi(v);
        } else if (!strcmp(k, "--io")) {
            O.uring = !strcmp(v, "uring");
            if (!O.uring && strcmp(v, "writev") != 0) {
                usage();
            }
        } else if (!strcmp(k, "--stream")) {
            O.stream = v;
        } else {
            usage();
        }
    }
    if (O.clients <= 0 || O.rate <= 0 || O.batch < 1 || O.batch > MAX_BATCH || O.msg_bytes < 400 ||
        O.msg_bytes > 60000) {
        usage();
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (O.uring) {
        unsigned entries = 64;
        while (entries < (unsigned)O.clients && entries < 4096) {
            entries <<= 1;
        }
        int rc = io_uring_queue_init(entries, &ring, 0);
        if (rc < 0) {
            fprintf(stderr, "bench_floor: io_uring: %s\n", strerror(-rc));
            return 1;
        }
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof(a);
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(lfd, 4096) != 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &al) != 0) {
        perror("bench_floor: listen");
        return 1;
    }
    fprintf(stderr, "server listening on 127.0.0.1:%d io=%s\n", ntohs(a.sin_port),
            O.uring ? "uring" : "writev");
    conns = calloc((size_t)O.clients + 64, sizeof(*conns));
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);

    /* Accept and upgrade until SIGUSR1 (plain requests such as /readyz are answered too). */
    while (!go && !stop) {
        struct epoll_event evs[256];
        int n = epoll_wait(epfd, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            if (!evs[i].data.ptr) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        break;
                    }
                    int slot = -1;
                    for (int k = 0; k < n_conns; k++) {
                        if (conns[k].fd < 0 && !conns[k].open) {
                            slot = k;
                            break;
                        }
                    }
                    if (slot < 0) {
                        if (n_conns >= O.clients + 64) {
                            close(fd);
                            continue;
                        }
                        slot = n_conns++;
                    }
                    conn_t *c = &conns[slot];
                    memset(c, 0, sizeof(*c));
                    c->fd = fd;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            char buf[4096];
            ssize_t r = read(c->fd, buf, sizeof(buf));
            if (r <= 0) {
                if (r == 0 || errno != EAGAIN) {
                    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                    conn_close(c);
                }
                continue;
            }
            if (c->open) {
                continue; /* clients send nothing after the handshake but pongs */
            }
            size_t take =
                (size_t)r < sizeof(c->req) - c->req_len ? (size_t)r : sizeof(c->req) - c->req_len;
            memcpy(c->req + c->req_len, buf, take);
            c->req_len += take;
            if (memmem(c->req, c->req_len, "\r\n\r\n", 4)) {
                answer(c);
                if (c->open) {
                    /* From now on nothing is read: the event loop below only writes. */
                    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                }
            }
        }
    }

    static char bodies[MAX_BATCH][65536];
    static uint8_t hdrs[MAX_BATCH][10];
    struct iovec iov[2 * MAX_BATCH];
    int64_t start = now_ns();
    int64_t seq = 0;
    for (int64_t group = 0; seq < O.events && !stop; group++) {
        /* Group g ends at event floor((g+1) * batch): groups of floor(batch) or ceil(batch)
         * events whose mean is batch (the daemon's measured frames per write), sent when
         * their last event is due. */
        int64_t end = (int64_t)((double)(group + 1) * O.batch);
        if (end > O.events) {
            end = O.events;
        }
        if (end <= seq) {
            continue;
        }
        int k = (int)(end - seq);
        int64_t due = start + (int64_t)((double)(end - 1) * 1e9 / O.rate);
        struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
        clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL);
        int64_t t = now_ns();
        for (int j = 0; j < k; j++) {
            size_t bl = make_body(bodies[j], sizeof(bodies[j]), seq + j, t);
            size_t hl = ws_header(hdrs[j], bl);
            iov[2 * j] = (struct iovec){hdrs[j], hl};
            iov[2 * j + 1] = (struct iovec){bodies[j], bl};
        }
        if (O.uring) {
            send_uring(iov, 2 * k);
        } else {
            send_writev(iov, 2 * k);
        }
        seq += k;
    }
    /* Whatever short writes left, then wait to be stopped. */
    for (int round = 0; round < 2000 && !stop; round++) {
        bool left = false;
        for (int i = 0; i < n_conns; i++) {
            if (conns[i].open && conns[i].pend_len && !flush_pending(&conns[i])) {
                left = true;
            }
        }
        if (!left) {
            break;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr,
            "floor sent events=%" PRId64 " open=%d sends=%" PRIu64 " syscalls=%" PRIu64
            " partial=%" PRIu64 "\n",
            seq, n_open, sends, syscalls, partial);
    while (!stop) {
        pause();
    }
    return 0;
}
