/*
 * bench_fanout.c: load client and writer for the daemon's live fan-out (docs/PERFORMANCE.md,
 * "Fan-out"). It measures a running `mongocast run` from the outside:
 *
 *   throughput  C WebSocket subscribers; the writer inserts N documents of SIZE BSON bytes
 *               (paced at RATE/s in insert_many batches of BATCH, or as fast as it can with
 *               --rate 0); every change must reach every subscriber. Figure: deliveries per
 *               second of daemon CPU, where deliveries = change messages received by clients
 *               and daemon CPU = utime+stime of the daemon process (/proc/PID/stat, all
 *               threads) from the first insert to the last delivery.
 *   latency     the same at a fixed RATE for SECONDS, one document per insert by default.
 *               Each document carries the writer's CLOCK_REALTIME (`bench_t`, ns) and a
 *               sequence number (`bench_seq`). Clients read with recvmsg and SO_TIMESTAMPNS,
 *               so besides the time their process read a message they know when its bytes
 *               arrived in their socket (the kernel's receive timestamp of the last segment
 *               the read returned: exact while the client keeps up, late otherwise). A
 *               reference change stream (a bare libmongoc watcher thread in this process, on
 *               the same collection, as the daemon's watcher) records when each change became
 *               readable from the emulator. Reported distributions: insert -> client read,
 *               insert -> arrival (an upper bound of daemon-receive -> client), insert ->
 *               reference (what happens before the daemon), reference -> arrival per event and
 *               client (an estimate of daemon-receive -> client), reference -> first client
 *               arrival (hand-off into the fan-out), and the fan-out spread (first to last
 *               client arrival of the same event). stamp_shared_frac: the share of change
 *               messages that shared a read with a later one (their arrival time is late);
 *               lat_ref_to_arrival_exact: reference -> arrival of only the messages that ended
 *               their read, whose arrival stamps are exact; lat_ref_to_arrival_low: every
 *               message, a late stamp replaced by a lower bound (the start of the client's
 *               previous read, which took everything that had arrived): the true
 *               distribution lies between _low and lat_ref_to_arrival.
 *               --client-nice N runs the client processes at nice N (19: the daemon gets the
 *               CPU first, as if the clients were on other machines).
 *               --exact-reads 1: each connection reads one frame at a time (header, extended
 *               length, then exactly the payload), so every change message ends its own read
 *               and gets the stamp of the segment that completed it (read_boundary_frac: the
 *               share that did). A stamp can still be late when the kernel merged queued
 *               segments (it keeps the newest stamp); then two successive change messages of
 *               a connection carry the same stamp, and stamp_shared_frac counts the earlier
 *               ones (in this mode _exact are the others, _low bounds the shared ones by the
 *               connection's previous different stamp). Two to three system calls per frame
 *               instead of one per wake-up: more client CPU.
 *   --generated 1 (throughput, latency): the server generates the events itself (bench_floor,
 *               the floor program): instead of inserting, the bench sends SIGUSR1 to
 *               --daemon-pid right after its first CPU reading and waits for EVENTS changes;
 *               bench_t is then the generation time (no reference watcher, no MongoDB).
 *               Throughput and latency lines carry daemon_writes (the daemon's write-type
 *               system calls over the window, /proc/PID/io syscw; sends submitted through
 *               io_uring are not counted) and deliveries_per_write (0 when the writes are
 *               too few to be the sends: fewer than one per 64 deliveries).
 *   idle        C subscribers that only hold their connection; daemon RSS and RssAnon before
 *               and after (/proc/PID/status, smaps_rollup), per connection. The baseline is
 *               taken after one warm-up subscriber came and went. Kernel memory (socket
 *               buffers and socket structures are not in RSS) from /proc/net/sockstat and the
 *               machine-wide Slab of /proc/meminfo, for context.
 *
 * Processes and threads: the main process forks PROCS client processes before anything else
 * (one open-file limit per process), then is the coordinator and the writer (main thread)
 * plus, in latency mode, the reference watcher thread. Each client process runs one libuv
 * loop (uv_poll on its own non-blocking sockets) on its main thread with its share of the
 * connections. Processes share one anonymous MAP_SHARED mapping: commands go down through
 * `cmd`, counters and histograms come up through per-process slots (lock-free atomics; each
 * slot has one writer; per-event first/last arrival are atomic min/max).
 * Invariants: a client never writes except the handshake and pongs (server frames need no
 * mask; pongs carry a zero mask); every time is CLOCK_REALTIME, one clock for every process
 * of the machine and the clock of the kernel's receive timestamps.
 *
 * TLS: a wss:// URL makes every subscriber (and the warm-up) connect over TLS (OpenSSL, no
 * certificate verification: loopback benchmarks against a test certificate); reads are
 * SSL_read until it wants more, pongs SSL_write. Throughput and idle only (the latency
 * mode's kernel receive stamps describe ciphertext, and --exact-reads reads frames by
 * parts; both are refused with TLS).
 *
 * Output: one "phase=... key=value ..." line (scripts/bench.sh takes medians of them).
 */
#define _GNU_SOURCE
#include <mongoc/mongoc.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <uv.h>

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 16
#define WS_KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define WS_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" /* RFC 6455 §1.3's example pair */
#define READ_BUF 262144
#define MAX_LEFTOVER (4u << 20) /* a partial frame bigger than this is a protocol error */
#define RECV_EXACT 0x80000000u  /* recv_us flag: the message ended its read (exact stamp) */

/* Latency histogram in microseconds: 1 µs buckets below 1 ms, 10 µs buckets up to 200 ms,
 * then one overflow bucket. The exact maximum is kept aside. */
#define H_FINE 1000
#define H_COARSE_STEP 10
#define H_LIMIT_US 200000
#define H_BUCKETS (H_FINE + (H_LIMIT_US - H_FINE) / H_COARSE_STEP + 1)

enum { CMD_RUN = 0, CMD_FINISH = 1, CMD_EXIT = 2 };
enum { MODE_THROUGHPUT, MODE_LATENCY, MODE_IDLE };

typedef struct hist {
    uint64_t n;
    uint64_t below_zero; /* only for differences of two clocks (reference -> client) */
    int64_t max_ns;
    uint64_t b[H_BUCKETS];
} hist_t;

/* One client process's slot. */
typedef struct slot {
    _Atomic uint32_t connected; /* 101 received */
    _Atomic uint32_t ready;     /* {"type":"ready"} received */
    _Atomic uint32_t failed;    /* connect or handshake failed */
    _Atomic uint32_t closed;    /* closed by the server (any reason) after the handshake */
    _Atomic uint32_t slow;      /* of which close code 4002 */
    _Atomic uint32_t errors;    /* protocol errors seen by the client */
    _Atomic uint64_t changes;   /* change messages */
    _Atomic uint64_t others;    /* other messages (ready, reset, invalidate) */
    _Atomic uint64_t bytes;     /* WebSocket payload bytes of change messages */
    _Atomic uint64_t pings;
    /* change messages that were not the last one of their read: the read's receive timestamp
     * is that of its last segment, so theirs is late (an upper bound), never early */
    _Atomic uint64_t stamp_shared;
    /* --exact-reads: change messages whose frame ended exactly where their read ended */
    _Atomic uint64_t read_boundary;
    _Atomic int done;     /* histograms final (after CMD_FINISH) */
    hist_t lat_insert;    /* insert -> the client process reads it */
    hist_t lat_arrival;   /* insert -> the bytes arrive in the client's socket (kernel time) */
    hist_t lat_ref;       /* reference watcher -> arrival in the client's socket */
    hist_t lat_ref_exact; /* the same, only messages that ended their read (exact stamps) */
    hist_t lat_ref_low;   /* the same with each late stamp replaced by its lower bound */
} slot_t;

typedef struct shared {
    _Atomic int cmd;
    int64_t n_events; /* events the writer will insert (seq 0..n-1) */
    slot_t slots[MAX_PROCS];
    /* Latency mode, 3 x n_events entries: per seq, the reference watcher's receive time, then
     * the first and the last arrival at any client's socket (0: none yet). */
    _Atomic int64_t ref_recv[];
} shared_t;

#define FIRST_ARRIVAL(seq) (S->ref_recv[S->n_events + (seq)])
#define LAST_ARRIVAL(seq) (S->ref_recv[2 * S->n_events + (seq)])

static void atomic_min_i64(_Atomic int64_t *a, int64_t v)
{
    int64_t cur = atomic_load_explicit(a, memory_order_relaxed);
    while ((cur == 0 || v < cur) && !atomic_compare_exchange_weak_explicit(
                                        a, &cur, v, memory_order_relaxed, memory_order_relaxed)) {
    }
}

static void atomic_max_i64(_Atomic int64_t *a, int64_t v)
{
    int64_t cur = atomic_load_explicit(a, memory_order_relaxed);
    while (v > cur && !atomic_compare_exchange_weak_explicit(a, &cur, v, memory_order_relaxed,
                                                             memory_order_relaxed)) {
    }
}

typedef struct opts {
    int mode;
    const char *url;
    const char *uri;
    const char *db;
    const char *coll;
    long daemon_pid;
    long emulator_pid;
    int clients;
    int procs;
    int64_t events;
    double rate;
    double seconds;
    int size;
    int batch;
    double hold;
    int concurrency;
    double timeout;
    int client_nice;
    int client_poll_us;
    int exact_reads;
    int generated;
    bool tls; /* wss:// */
    char host[256];
    int port;
    char path[1024];
} opts_t;

static opts_t O;
static shared_t *S;

/* CLOCK_REALTIME: the clock of the kernel's receive timestamps (SO_TIMESTAMPNS), and one
 * clock for every process of the machine. */
static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void hist_add(hist_t *h, int64_t ns)
{
    h->n++;
    if (ns > h->max_ns) {
        h->max_ns = ns;
    }
    if (ns < 0) {
        h->below_zero++;
        ns = 0;
    }
    int64_t us = ns / 1000;
    size_t k;
    if (us < H_FINE) {
        k = (size_t)us;
    } else if (us < H_LIMIT_US) {
        k = H_FINE + (size_t)((us - H_FINE) / H_COARSE_STEP);
    } else {
        k = H_BUCKETS - 1;
    }
    h->b[k]++;
}

static void hist_merge(hist_t *into, const hist_t *h)
{
    into->n += h->n;
    into->below_zero += h->below_zero;
    if (h->max_ns > into->max_ns) {
        into->max_ns = h->max_ns;
    }
    for (size_t i = 0; i < H_BUCKETS; i++) {
        into->b[i] += h->b[i];
    }
}

/* The q-quantile in milliseconds (upper edge of its bucket; the max for the overflow). */
static double hist_quantile_ms(const hist_t *h, double q)
{
    if (!h->n) {
        return -1;
    }
    uint64_t want = (uint64_t)(q * (double)h->n);
    if (want >= h->n) {
        want = h->n - 1;
    }
    uint64_t seen = 0;
    for (size_t i = 0; i < H_BUCKETS; i++) {
        seen += h->b[i];
        if (seen > want) {
            if (i == H_BUCKETS - 1) {
                return (double)h->max_ns / 1e6;
            }
            double hi_us =
                i < H_FINE ? (double)i + 1 : H_FINE + (double)(i - H_FINE + 1) * H_COARSE_STEP;
            return hi_us / 1000.0;
        }
    }
    return (double)h->max_ns / 1e6;
}

/* ---- /proc readings --------------------------------------------------------------------- */

/* utime + stime of a process (all its threads, dead ones included) in seconds, -1 on error;
 * *sys (optional) gets stime alone. */
static double proc_cpu_split(long pid, double *sys)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    char buf[2048];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) {
        return -1;
    }
    if (sys) {
        *sys = (double)st / (double)sysconf(_SC_CLK_TCK);
    }
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static double proc_cpu_s(long pid)
{
    return proc_cpu_split(pid, NULL);
}

/* The write-type system calls a process made so far (`syscw` of /proc/PID/io: write, writev
 * and the like; sends submitted through io_uring are not counted), -1 when unreadable. */
static int64_t proc_syscw(long pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/io", pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    char line[128];
    long long v = -1;
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "syscw: %lld", &v) == 1) {
            break;
        }
    }
    fclose(f);
    return (int64_t)v;
}

#define MAX_THREADS 64
typedef struct thread_cpu {
    int n;
    long tid[MAX_THREADS];
    double s[MAX_THREADS];    /* on-CPU seconds from schedstat (ns precision) */
    double wait[MAX_THREADS]; /* seconds runnable but waiting for a CPU (schedstat) */
} thread_cpu_t;

static void threads_cpu(long pid, thread_cpu_t *t)
{
    t->n = 0;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/task", pid);
    DIR *d = opendir(path);
    if (!d) {
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) && t->n < MAX_THREADS) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char p2[320];
        snprintf(p2, sizeof(p2), "/proc/%ld/task/%s/schedstat", pid, e->d_name);
        FILE *f = fopen(p2, "r");
        if (!f) {
            continue;
        }
        unsigned long long ns = 0, wait = 0;
        if (fscanf(f, "%llu %llu", &ns, &wait) == 2) {
            t->tid[t->n] = atol(e->d_name);
            t->s[t->n] = (double)ns / 1e9;
            t->wait[t->n] = (double)wait / 1e9;
            t->n++;
        }
        fclose(f);
    }
    closedir(d);
}

/* Per-thread CPU between two readings, the busiest first, as "tid:cpu_s/runq_wait_s,..."
 * (top 4); *wait_total gets the run-queue wait of all threads. */
static void threads_delta(const thread_cpu_t *a, const thread_cpu_t *b, char *out, size_t cap,
                          double *wait_total)
{
    double d[MAX_THREADS], w[MAX_THREADS];
    long tid[MAX_THREADS];
    int n = 0;
    *wait_total = 0;
    for (int i = 0; i < b->n; i++) {
        double before = 0, wbefore = 0;
        for (int j = 0; j < a->n; j++) {
            if (a->tid[j] == b->tid[i]) {
                before = a->s[j];
                wbefore = a->wait[j];
            }
        }
        d[n] = b->s[i] - before;
        w[n] = b->wait[i] - wbefore;
        *wait_total += w[n];
        tid[n] = b->tid[i];
        n++;
    }
    size_t len = 0;
    out[0] = '\0';
    for (int k = 0; k < 4 && k < n; k++) {
        int best = -1;
        for (int i = 0; i < n; i++) {
            if (d[i] >= 0 && (best < 0 || d[i] > d[best])) {
                best = i;
            }
        }
        if (best < 0) {
            break;
        }
        len += (size_t)snprintf(out + len, cap - len, "%s%ld:%.3f/%.3f", k ? "," : "", tid[best],
                                d[best], w[best]);
        d[best] = -1;
        if (len >= cap) {
            break;
        }
    }
}

/* A "Key:   123 kB" line of a /proc file, in KiB; -1 when absent. */
static long proc_kib(long pid, const char *file, const char *key)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/%s", pid, file);
    FILE *f = fopen(path, "r");
    if (!f) {
        return -1;
    }
    char line[256];
    size_t klen = strlen(key);
    long v = -1;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = atol(line + klen + 1);
            break;
        }
    }
    fclose(f);
    return v;
}

/* TCP sockets in use and the kernel's TCP memory (pages) from /proc/net/sockstat. */
static void tcp_sockstat(long *inuse, long *mem_pages)
{
    *inuse = *mem_pages = -1;
    FILE *f = fopen("/proc/net/sockstat", "r");
    if (!f) {
        return;
    }
    char line[256];
    while (fgets(line, sizeof(line), f)) {
        const char *p = strstr(line, "TCP: inuse ");
        if (p) {
            *inuse = atol(p + 11);
            const char *m = strstr(line, " mem ");
            if (m) {
                *mem_pages = atol(m + 5);
            }
        }
    }
    fclose(f);
}

/* A line of /proc/meminfo in KiB (machine-wide: every process's sockets count). */
static long proc_meminfo_kib(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) {
        return -1;
    }
    char line[256];
    size_t klen = strlen(key);
    long v = -1;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = atol(line + klen + 1);
            break;
        }
    }
    fclose(f);
    return v;
}

static long count_fds(long pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%ld/fd", pid);
    DIR *d = opendir(path);
    if (!d) {
        return -1;
    }
    long n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] != '.') {
            n++;
        }
    }
    closedir(d);
    return n;
}

/* ---- The client process ------------------------------------------------------------------ */

enum { C_CONNECTING, C_TLS, C_HANDSHAKE, C_OPEN, C_DEAD };

typedef struct client {
    uv_poll_t poll; /* first member: the handle's address is the client's */
    int fd;
    uint8_t state;
    uint32_t index; /* within this process */
    uint8_t *buf;   /* bytes of an incomplete frame (or handshake answer) */
    int64_t
        prev_read; /* when the previous read started (it took all that had arrived), 0: unknown */
    size_t len;
    size_t cap;
    /* --exact-reads: the frame being read, one recvmsg per part (header, extended length,
     * payload), so that the read completing a frame ends exactly at its last byte */
    uint8_t hdr[10];
    uint8_t hlen;       /* header bytes read so far */
    uint8_t hneed;      /* header bytes needed: 2, then 4 or 10 once the length code is known */
    uint64_t plen;      /* payload length, valid once hlen == hneed */
    size_t got;         /* payload bytes read so far (into buf) */
    int64_t last_stamp; /* kernel stamp of this connection's latest change message */
    int64_t prev_stamp; /* the stamp before last_stamp that differed from it (0: none) */
    uint32_t *pend;     /* recv_us entry of the latest change message, not yet known exact */
    SSL *ssl;           /* wss:// */
} client_t;

typedef struct proc {
    int id;
    slot_t *slot;
    uv_loop_t *loop;
    client_t *clients;
    int n;
    int next;     /* next client to start connecting */
    int inflight; /* connects + handshakes under way */
    uv_timer_t poll;
    char *request;
    size_t request_len;
    uint8_t rbuf[READ_BUF];
    uint32_t *recv_us; /* latency mode: [client][seq] receive time (µs after t_base) + 1 */
    uint32_t *low_us;  /* the same shape: a lower bound of the arrival (the previous read) + 1 */
    int64_t low;       /* lower bound for the read being parsed (0: unknown) */
    int64_t t_base;
    int64_t now;           /* when the read being parsed returned */
    int64_t arrival;       /* when its last byte arrived in the socket (kernel), else `now` */
    uint32_t read_changes; /* change messages parsed from the read being parsed */
    uint32_t *last_slot;   /* recv_us entry of the read's latest change message, or NULL */
    struct sockaddr_in addr;
} proc_t;

static proc_t *P;
static SSL_CTX *tls_ctx; /* wss://: one per process, made after the fork */

static SSL_CTX *client_tls_ctx(void)
{
    if (!tls_ctx) {
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (tls_ctx) {
            SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        }
    }
    return tls_ctx;
}

static void start_connects(void);
static void on_io(uv_poll_t *h, int status, int events);

static void on_closed(uv_handle_t *h)
{
    client_t *c = (client_t *)h;
    close(c->fd);
    c->fd = -1;
}

static void client_dead(client_t *c, bool count_closed)
{
    if (c->state == C_DEAD) {
        return;
    }
    if (c->state == C_CONNECTING || c->state == C_TLS || c->state == C_HANDSHAKE) {
        atomic_fetch_add(&P->slot->failed, 1);
        P->inflight--;
        start_connects();
    } else if (count_closed) {
        atomic_fetch_add(&P->slot->closed, 1);
    }
    c->state = C_DEAD;
    SSL_free(c->ssl);
    c->ssl = NULL;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    if (!uv_is_closing((uv_handle_t *)&c->poll)) {
        uv_close((uv_handle_t *)&c->poll, on_closed);
    }
}

/* Finds "key" followed by optional spaces, ':' and spaces; returns what follows or NULL. */
static const char *json_after_key(const char *s, size_t len, const char *key)
{
    size_t klen = strlen(key);
    const char *end = s + len;
    const char *p = memmem(s, len, key, klen);
    if (!p) {
        return NULL;
    }
    p += klen;
    while (p < end && (*p == ' ' || *p == ':')) {
        p++;
    }
    return p < end ? p : NULL;
}

static int64_t json_int(const char *s, size_t len, const char *key, bool *ok)
{
    const char *p = json_after_key(s, len, key);
    const char *end = s + len;
    int64_t v = 0;
    bool neg = false;
    *ok = false;
    if (!p) {
        return 0;
    }
    if (*p == '-') {
        neg = true;
        p++;
    }
    while (p < end && *p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        p++;
        *ok = true;
    }
    return neg ? -v : v;
}

static void on_text(client_t *c, const char *msg, size_t len)
{
    const char *t = json_after_key(msg, len, "\"type\"");
    if (t && (size_t)(msg + len - t) >= 8 && memcmp(t, "\"change\"", 8) == 0) {
        atomic_fetch_add_explicit(&P->slot->changes, 1, memory_order_relaxed);
        P->read_changes++;
        atomic_fetch_add_explicit(&P->slot->bytes, len, memory_order_relaxed);
        bool ok1 = false, ok2 = false;
        int64_t seq = json_int(msg, len, "\"bench_seq\"", &ok1);
        int64_t sent = json_int(msg, len, "\"bench_t\"", &ok2);
        if (ok2) {
            hist_add(&P->slot->lat_insert, P->now - sent);
            hist_add(&P->slot->lat_arrival, P->arrival - sent);
        }
        if (P->recv_us && ok1 && seq >= 0 && seq < S->n_events) {
            atomic_min_i64(&FIRST_ARRIVAL(seq), P->arrival);
            atomic_max_i64(&LAST_ARRIVAL(seq), P->arrival);
            int64_t us = (P->arrival - P->t_base) / 1000;
            if (us >= 0 && us < (int64_t)RECV_EXACT - 1) {
                uint32_t *e = &P->recv_us[(size_t)c->index * (size_t)S->n_events + (size_t)seq];
                *e = (uint32_t)us + 1;
                P->last_slot = e;
                int64_t low_us = (P->low - P->t_base) / 1000;
                if (P->low > 0 && low_us >= 0 && low_us < us) {
                    P->low_us[e - P->recv_us] = (uint32_t)low_us + 1;
                }
            }
        }
        return;
    }
    atomic_fetch_add_explicit(&P->slot->others, 1, memory_order_relaxed);
    if (t && (size_t)(msg + len - t) >= 7 && memcmp(t, "\"ready\"", 7) == 0) {
        atomic_fetch_add(&P->slot->ready, 1);
    }
}

static void send_pong(client_t *c, const uint8_t *payload, size_t len)
{
    /* A client frame must be masked; a zero key leaves the payload as it is. The socket
     * buffer of a client that only reads is empty, so the frame goes out whole. */
    uint8_t f[6 + 125];
    if (len > 125) {
        return;
    }
    f[0] = 0x8A;
    f[1] = (uint8_t)(0x80 | len);
    memset(f + 2, 0, 4);
    memcpy(f + 6, payload, len);
    if (c->ssl ? SSL_write(c->ssl, f, (int)(6 + len)) != (int)(6 + len)
               : write(c->fd, f, 6 + len) != (ssize_t)(6 + len)) {
        atomic_fetch_add(&P->slot->errors, 1);
    }
}

/* Handles one complete server frame; false when it was a close. */
static bool on_frame(client_t *c, uint8_t b0, const uint8_t *pl, size_t plen)
{
    if (!(b0 & 0x80)) {
        atomic_fetch_add(&P->slot->errors, 1); /* the server never fragments */
    }
    switch (b0 & 0x0f) {
    case 0x1: on_text(c, (const char *)pl, plen); break;
    case 0x8: {
        unsigned code = plen >= 2 ? ((unsigned)pl[0] << 8) | pl[1] : 1005;
        if (code == 4002) {
            atomic_fetch_add(&P->slot->slow, 1);
        }
        return false;
    }
    case 0x9:
        atomic_fetch_add(&P->slot->pings, 1);
        send_pong(c, pl, plen);
        break;
    default: break;
    }
    return true;
}

/* Consumes complete frames (and the handshake answer) from data; returns bytes used, or
 * SIZE_MAX when the connection must die. */
static size_t parse(client_t *c, uint8_t *data, size_t len)
{
    size_t pos = 0;
    if (c->state == C_HANDSHAKE) {
        const uint8_t *end = memmem(data, len, "\r\n\r\n", 4);
        if (!end) {
            return len > 8192 ? SIZE_MAX : 0;
        }
        size_t hl = (size_t)(end - data) + 4;
        if (hl < 12 || memcmp(data, "HTTP/1.1 101", 12) != 0 ||
            !memmem(data, hl, WS_ACCEPT, strlen(WS_ACCEPT))) {
            fprintf(stderr, "bench_fanout: handshake refused: %.*s\n", (int)(hl < 300 ? hl : 300),
                    (const char *)data);
            return SIZE_MAX;
        }
        c->state = C_OPEN;
        atomic_fetch_add(&P->slot->connected, 1);
        P->inflight--;
        start_connects();
        pos = hl;
    }
    while (len - pos >= 2) {
        uint8_t b0 = data[pos], b1 = data[pos + 1];
        uint64_t plen = b1 & 0x7f;
        size_t hl = 2;
        if (b1 & 0x80) {
            atomic_fetch_add(&P->slot->errors, 1); /* servers must not mask */
            return SIZE_MAX;
        }
        if (plen == 126) {
            if (len - pos < 4) {
                break;
            }
            plen = ((uint64_t)data[pos + 2] << 8) | data[pos + 3];
            hl = 4;
        } else if (plen == 127) {
            if (len - pos < 10) {
                break;
            }
            plen = 0;
            for (int i = 0; i < 8; i++) {
                plen = (plen << 8) | data[pos + 2 + i];
            }
            hl = 10;
        }
        if (plen > MAX_LEFTOVER) {
            atomic_fetch_add(&P->slot->errors, 1);
            return SIZE_MAX;
        }
        if (len - pos < hl + plen) {
            break;
        }
        if (!on_frame(c, b0, data + pos + hl, (size_t)plen)) {
            return SIZE_MAX - 1; /* closed by the server */
        }
        pos += hl + (size_t)plen;
    }
    return pos;
}

/* Appends a read to what is left of the previous one and parses. */
static void consume(client_t *c, uint8_t *data, size_t len)
{
    if (c->len) {
        if (c->len + len > c->cap) {
            size_t cap = c->cap * 2 > c->len + len ? c->cap * 2 : c->len + len;
            uint8_t *nb = realloc(c->buf, cap);
            if (!nb) {
                client_dead(c, true);
                return;
            }
            c->buf = nb;
            c->cap = cap;
        }
        memcpy(c->buf + c->len, data, len);
        c->len += len;
        data = c->buf;
        len = c->len;
    }
    size_t used = parse(c, data, len);
    if (used >= SIZE_MAX - 1) {
        client_dead(c, true);
        return;
    }
    size_t rest = len - used;
    if (rest > MAX_LEFTOVER) {
        client_dead(c, true);
        return;
    }
    if (data == c->buf) {
        memmove(c->buf, c->buf + used, rest);
        c->len = rest;
    } else if (rest) {
        if (rest > c->cap) {
            uint8_t *nb = realloc(c->buf, rest);
            if (!nb) {
                client_dead(c, true);
                return;
            }
            c->buf = nb;
            c->cap = rest;
        }
        memcpy(c->buf, data + used, rest);
        c->len = rest;
    }
}

static void on_readable(client_t *c)
{
    /* recvmsg rather than libuv's read(): the kernel's receive timestamp (SO_TIMESTAMPNS,
     * latency mode) says when the bytes reached this socket, whatever this process's
     * scheduling delay on a busy machine. */
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {P->rbuf, READ_BUF};
    struct msghdr mh;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof(ctl.buf);
    int64_t started = now_ns();
    ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        return;
    }
    if (n <= 0) {
        client_dead(c, true);
        return;
    }
    P->now = now_ns();
    P->arrival = P->now;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
            P->arrival = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        }
    }
    P->read_changes = 0;
    P->last_slot = NULL;
    /* What this read returned was not there when the previous read started (that read took
     * everything, unless it filled the buffer): a lower bound of its arrival. */
    P->low = c->prev_read;
    c->prev_read = (size_t)n < READ_BUF ? started : 0;
    consume(c, P->rbuf, (size_t)n);
    if (P->last_slot) {
        /* The read's timestamp is its last segment's: exact for the message that ends the
         * read (frames never straddle a read here unless a frame is split, which then makes
         * the stamp late, never early). */
        *P->last_slot |= RECV_EXACT;
    }
    if (P->read_changes > 1) {
        atomic_fetch_add_explicit(&P->slot->stamp_shared, P->read_changes - 1,
                                  memory_order_relaxed);
    }
}

/* wss://: everything OpenSSL can decrypt now (it may hold records after the socket is empty,
 * so read until it wants more). */
static void on_readable_tls(client_t *c)
{
    for (int i = 0; i < 64 && c->state != C_DEAD; i++) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, P->rbuf, READ_BUF);
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                client_dead(c, true);
            }
            return;
        }
        P->now = now_ns();
        P->arrival = P->now;
        P->read_changes = 0;
        P->last_slot = NULL;
        P->low = 0;
        consume(c, P->rbuf, (size_t)n);
    }
}

/* wss://: advances the client's TLS handshake; once done, sends the upgrade request. */
static void tls_step(client_t *c)
{
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->state = C_HANDSHAKE;
        if (SSL_write(c->ssl, P->request, (int)P->request_len) != (int)P->request_len ||
            uv_poll_start(&c->poll, UV_READABLE, on_io) != 0) {
            client_dead(c, false);
        }
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        if (uv_poll_start(&c->poll, e == SSL_ERROR_WANT_READ ? UV_READABLE : UV_WRITABLE,
                          on_io) != 0) {
            client_dead(c, false);
        }
        return;
    }
    char why[160];
    ERR_error_string_n(ERR_peek_last_error(), why, sizeof(why));
    fprintf(stderr, "bench_fanout: TLS handshake failed: %s\n", why);
    client_dead(c, false);
}

/* One recvmsg of at most want bytes; *stamp gets the kernel receive timestamp of the last
 * segment the read touched (0 without one). Returns the byte count, 0 when nothing is there
 * yet, -1 when the connection is gone. */
static ssize_t recv_stamped(client_t *c, uint8_t *dst, size_t want, int flags, int64_t *stamp)
{
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {dst, want};
    struct msghdr mh;
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof(ctl.buf);
    ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | flags);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        return 0;
    }
    if (n <= 0) {
        return -1;
    }
    *stamp = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
            *stamp = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        }
    }
    return n;
}

/* A frame read by on_readable_exact is complete; `stamp` is the kernel stamp of the read that
 * ended at its last byte. Returns false when the connection must die. */
static bool exact_frame_done(client_t *c, int64_t stamp, uint8_t b0, const uint8_t *pl, size_t plen)
{
    P->now = now_ns();
    P->arrival = stamp ? stamp : P->now;
    P->read_changes = 0;
    P->last_slot = NULL;
    /* Segments arrive in order, so this frame's last segment came no earlier than the latest
     * stamp of this connection that differs from its own: a lower bound when its stamp turns
     * out to be shared (late). */
    P->low = P->arrival != c->last_stamp ? c->last_stamp : c->prev_stamp;
    if (!on_frame(c, b0, pl, plen)) {
        return false;
    }
    c->hlen = 0;
    c->hneed = 2;
    c->got = 0;
    if (P->read_changes == 0) {
        return true;
    }
    atomic_fetch_add_explicit(&P->slot->read_boundary, 1, memory_order_relaxed);
    if (P->arrival == c->last_stamp) {
        /* The kernel merges queued segments and keeps the newest stamp: the previous change
         * message of this connection carries this one's stamp, so its own is late. */
        atomic_fetch_add_explicit(&P->slot->stamp_shared, 1, memory_order_relaxed);
    } else {
        if (c->pend) {
            *c->pend |= RECV_EXACT;
        }
        c->prev_stamp = c->last_stamp;
        c->last_stamp = P->arrival;
    }
    c->pend = P->last_slot;
    return true;
}

/* --exact-reads: one recvmsg per frame part (the 2-byte header, the extended length, then
 * exactly the payload), so the read that completes a frame ends at the frame's last byte and
 * its kernel stamp is that of the segment holding that byte, whatever follows in the socket.
 * Costs two or three system calls per frame instead of one per wake-up. At most EXACT_BUDGET
 * frames per wake-up, so that one busy connection does not hold up the others. */
#define EXACT_BUDGET 64
static void on_readable_exact(client_t *c)
{
    int64_t st = 0;
    if (c->state == C_HANDSHAKE) {
        /* Peek for the end of the 101 answer and take exactly that, so that no frame byte
         * is read along with it. */
        ssize_t n = recv_stamped(c, P->rbuf, 8192, MSG_PEEK, &st);
        if (n < 0) {
            client_dead(c, true);
            return;
        }
        const uint8_t *end = memmem(P->rbuf, (size_t)n, "\r\n\r\n", 4);
        if (!end) {
            if (n >= 8192) {
                client_dead(c, true);
            }
            return;
        }
        size_t hl = (size_t)(end - P->rbuf) + 4;
        if (recv(c->fd, P->rbuf, hl, MSG_DONTWAIT) != (ssize_t)hl || parse(c, P->rbuf, hl) != hl) {
            client_dead(c, true);
            return;
        }
        c->hlen = 0;
        c->hneed = 2;
        return;
    }
    for (int frames = 0; frames < EXACT_BUDGET && c->state == C_OPEN;) {
        ssize_t n;
        if (c->hlen < c->hneed) {
            n = recv_stamped(c, c->hdr + c->hlen, (size_t)(c->hneed - c->hlen), 0, &st);
            if (n <= 0) {
                if (n < 0) {
                    client_dead(c, true);
                }
                return;
            }
            c->hlen = (uint8_t)(c->hlen + n);
            if (c->hlen < c->hneed) {
                continue;
            }
            if (c->hneed == 2) {
                if (c->hdr[1] & 0x80) {
                    atomic_fetch_add(&P->slot->errors, 1); /* servers must not mask */
                    client_dead(c, true);
                    return;
                }
                uint8_t code = c->hdr[1] & 0x7f;
                if (code == 126 || code == 127) {
                    c->hneed = code == 126 ? 4 : 10;
                    continue;
                }
                c->plen = code;
            } else {
                c->plen = 0;
                for (int i = 2; i < c->hneed; i++) {
                    c->plen = (c->plen << 8) | c->hdr[i];
                }
            }
            if (c->plen > MAX_LEFTOVER) {
                atomic_fetch_add(&P->slot->errors, 1);
                client_dead(c, true);
                return;
            }
            if (c->plen > c->cap) {
                uint8_t *nb = realloc(c->buf, (size_t)c->plen);
                if (!nb) {
                    client_dead(c, true);
                    return;
                }
                c->buf = nb;
                c->cap = (size_t)c->plen;
            }
            c->got = 0;
            if (c->plen > 0) {
                continue;
            }
        } else {
            n = recv_stamped(c, c->buf + c->got, (size_t)c->plen - c->got, 0, &st);
            if (n <= 0) {
                if (n < 0) {
                    client_dead(c, true);
                }
                return;
            }
            c->got += (size_t)n;
            if (c->got < c->plen) {
                continue;
            }
        }
        if (!exact_frame_done(c, st, c->hdr[0], c->plen ? c->buf : P->rbuf, (size_t)c->plen)) {
            client_dead(c, true);
            return;
        }
        frames++;
    }
}

static void on_io(uv_poll_t *h, int status, int events)
{
    client_t *c = (client_t *)h;
    if (c->state == C_DEAD) {
        return;
    }
    if (status < 0) {
        client_dead(c, true);
        return;
    }
    if (c->state == C_CONNECTING) {
        if (!(events & UV_WRITABLE)) {
            return;
        }
        int err = 0;
        socklen_t el = sizeof(err);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err) {
            fprintf(stderr, "bench_fanout: connect failed: %s\n", strerror(err ? err : errno));
            client_dead(c, false);
            return;
        }
        if (O.tls) {
            c->ssl = SSL_new(client_tls_ctx());
            if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
                client_dead(c, false);
                return;
            }
            SSL_set_connect_state(c->ssl);
            c->state = C_TLS;
            tls_step(c);
            return;
        }
        c->state = C_HANDSHAKE;
        /* The request is small: the socket takes it whole or the connection is broken. */
        if (write(c->fd, P->request, P->request_len) != (ssize_t)P->request_len ||
            uv_poll_start(&c->poll, UV_READABLE, on_io) != 0) {
            client_dead(c, false);
        }
        return;
    }
    if (c->state == C_TLS) {
        tls_step(c);
        return;
    }
    if (events & UV_READABLE) {
        if (c->ssl) {
            on_readable_tls(c);
        } else if (O.exact_reads) {
            on_readable_exact(c);
        } else {
            on_readable(c);
        }
    }
}

static void start_connects(void)
{
    while (P->next < P->n && P->inflight < O.concurrency) {
        client_t *c = &P->clients[P->next];
        c->index = (uint32_t)P->next;
        P->next++;
        P->inflight++;
        c->state = C_CONNECTING;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            fprintf(stderr, "bench_fanout: socket: %s\n", strerror(errno));
            c->state = C_DEAD;
            P->inflight--;
            atomic_fetch_add(&P->slot->failed, 1);
            continue;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (O.mode == MODE_LATENCY) {
            setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
        }
        uv_poll_init_socket(P->loop, &c->poll, c->fd);
        if ((connect(c->fd, (const struct sockaddr *)&P->addr, sizeof(P->addr)) != 0 &&
             errno != EINPROGRESS) ||
            uv_poll_start(&c->poll, UV_WRITABLE, on_io) != 0) {
            fprintf(stderr, "bench_fanout: connect: %s\n", strerror(errno));
            client_dead(c, false);
        }
    }
}

static void finish_histograms(void)
{
    if (!P->recv_us) {
        return;
    }
    for (int i = 0; i < P->n && O.exact_reads; i++) {
        /* A connection's last change message shares its stamp with no later one. */
        if (P->clients[i].pend) {
            *P->clients[i].pend |= RECV_EXACT;
            P->clients[i].pend = NULL;
        }
    }
    for (int i = 0; i < P->n; i++) {
        for (int64_t seq = 0; seq < S->n_events; seq++) {
            uint32_t r = P->recv_us[(size_t)i * (size_t)S->n_events + (size_t)seq];
            bool exact = r & RECV_EXACT;
            r &= ~RECV_EXACT;
            int64_t ref = atomic_load(&S->ref_recv[seq]);
            if (!r || !ref) {
                continue;
            }
            int64_t recv_ns = P->t_base + (int64_t)(r - 1) * 1000;
            hist_add(&P->slot->lat_ref, recv_ns - ref);
            if (exact) {
                hist_add(&P->slot->lat_ref_exact, recv_ns - ref);
                hist_add(&P->slot->lat_ref_low, recv_ns - ref);
            } else {
                uint32_t lo = P->low_us[(size_t)i * (size_t)S->n_events + (size_t)seq];
                if (lo) {
                    hist_add(&P->slot->lat_ref_low, P->t_base + (int64_t)(lo - 1) * 1000 - ref);
                }
            }
        }
    }
}

static void on_poll(uv_timer_t *t)
{
    (void)t;
    int cmd = atomic_load(&S->cmd);
    if (cmd == CMD_FINISH && !atomic_load(&P->slot->done)) {
        finish_histograms();
        atomic_store(&P->slot->done, 1);
    } else if (cmd == CMD_EXIT) {
        if (!atomic_load(&P->slot->done)) {
            atomic_store(&P->slot->done, 1);
        }
        /* Process exit closes every socket at once; nothing else is left to do. */
        _exit(0);
    }
}

static void client_main(int id, int n, int64_t t_base)
{
    static proc_t proc;
    P = &proc;
    P->id = id;
    P->slot = &S->slots[id];
    P->n = n;
    P->t_base = t_base;
    P->loop = uv_default_loop();
    uv_ip4_addr(O.host, O.port, &P->addr);
    P->clients = calloc((size_t)n ? (size_t)n : 1, sizeof(client_t));
    char req[2048];
    int rl = snprintf(req, sizeof(req),
                      "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n",
                      O.path, O.host, O.port);
    P->request = req;
    P->request_len = (size_t)rl;
    if (O.mode == MODE_LATENCY && S->n_events > 0) {
        P->recv_us = calloc((size_t)n * (size_t)S->n_events, sizeof(uint32_t));
        P->low_us = calloc((size_t)n * (size_t)S->n_events, sizeof(uint32_t));
        if (!P->recv_us || !P->low_us) {
            fprintf(stderr, "bench_fanout: no memory for %d x %" PRId64 " receive times\n", n,
                    S->n_events);
            _exit(1);
        }
    }
    if (!P->clients) {
        _exit(1);
    }
    uv_timer_init(P->loop, &P->poll);
    uv_timer_start(&P->poll, on_poll, 5, 5);
    start_connects();
    if (O.client_poll_us > 0) {
        /* Polling mode: the process never waits in epoll, so the daemon's writes wake nobody
         * (on loopback the sender pays for the receiver's wake-up), as with clients on other
         * machines. Reads then return every message of the last interval at once. */
        for (;;) {
            uv_run(P->loop, UV_RUN_NOWAIT);
            struct timespec ts = {0, (long)O.client_poll_us * 1000};
            nanosleep(&ts, NULL);
        }
    }
    uv_run(P->loop, UV_RUN_DEFAULT);
    _exit(0);
}

/* ---- The coordinator ---------------------------------------------------------------------- */

static pid_t children[MAX_PROCS];

static uint64_t sum_u32(size_t off)
{
    uint64_t s = 0;
    for (int i = 0; i < O.procs; i++) {
        s += atomic_load((_Atomic uint32_t *)((char *)&S->slots[i] + off));
    }
    return s;
}

static uint64_t sum_u64(size_t off)
{
    uint64_t s = 0;
    for (int i = 0; i < O.procs; i++) {
        s += atomic_load((_Atomic uint64_t *)((char *)&S->slots[i] + off));
    }
    return s;
}

#define SUM32(f) sum_u32(offsetof(slot_t, f))
#define SUM64(f) sum_u64(offsetof(slot_t, f))

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static double children_cpu_s(void)
{
    double s = 0;
    for (int i = 0; i < O.procs; i++) {
        double c = proc_cpu_s((long)children[i]);
        if (c > 0) {
            s += c;
        }
    }
    return s;
}

static void stop_children(void)
{
    atomic_store(&S->cmd, CMD_EXIT);
    for (int i = 0; i < O.procs; i++) {
        if (children[i] > 0) {
            int st;
            waitpid(children[i], &st, 0);
            children[i] = 0;
        }
    }
}

/* Waits until every client is subscribed (counts its "ready"). */
static int wait_subscribed(void)
{
    int64_t t0 = now_ns();
    uint64_t last = 0;
    int64_t last_change = t0;
    for (;;) {
        uint64_t ready = SUM32(ready), failed = SUM32(failed), closed = SUM32(closed);
        if (ready >= (uint64_t)O.clients) {
            return 0;
        }
        if (failed || closed) {
            fprintf(stderr,
                    "bench_fanout: %" PRIu64 " connections failed, %" PRIu64
                    " closed (ready %" PRIu64 " of %d)\n",
                    failed, closed, ready, O.clients);
            return -1;
        }
        int64_t now = now_ns();
        if (ready != last) {
            last = ready;
            last_change = now;
        }
        if (now - last_change > (int64_t)(O.timeout * 1e9)) {
            fprintf(stderr,
                    "bench_fanout: only %" PRIu64 " of %d subscribers ready (%" PRIu64
                    " connected) after %.0f s without progress\n",
                    ready, O.clients, SUM32(connected), O.timeout);
            return -1;
        }
        sleep_ms(5);
    }
}

typedef struct ref_ctx {
    mongoc_change_stream_t *cs;
    int64_t n;
    int64_t seen;
    hist_t hist; /* insert -> reference watcher */
    _Atomic int stop;
} ref_ctx_t;

static void *ref_main(void *arg)
{
    ref_ctx_t *r = arg;
    const bson_t *doc;
    while (r->seen < r->n && !atomic_load(&r->stop)) {
        if (!mongoc_change_stream_next(r->cs, &doc)) {
            bson_error_t e;
            if (mongoc_change_stream_error_document(r->cs, &e, NULL)) {
                fprintf(stderr, "bench_fanout: reference watcher: %s\n", e.message);
                break;
            }
            continue;
        }
        int64_t now = now_ns();
        bson_iter_t it;
        int64_t seq = -1, sent = 0;
        if (bson_iter_init(&it, doc) &&
            bson_iter_find_descendant(&it, "fullDocument.bench_seq", &it)) {
            seq = bson_iter_as_int64(&it);
        }
        if (bson_iter_init(&it, doc) &&
            bson_iter_find_descendant(&it, "fullDocument.bench_t", &it)) {
            sent = bson_iter_as_int64(&it);
        }
        if (seq >= 0 && seq < S->n_events) {
            atomic_store(&S->ref_recv[seq], now);
            hist_add(&r->hist, now - sent);
        }
        r->seen++;
    }
    return NULL;
}

static bson_t *make_doc(int64_t seq, int64_t t, const char *pad)
{
    bson_oid_t oid;
    bson_oid_init(&oid, NULL);
    return BCON_NEW("_id", BCON_OID(&oid), "bench_seq", BCON_INT64(seq), "bench_t", BCON_INT64(t),
                    "owner", BCON_UTF8("user-0001"), "pad", BCON_UTF8(pad));
}

/* Pads documents to O.size BSON bytes. */
static char *make_pad(void)
{
    bson_t *probe = make_doc(0, 0, "");
    int64_t base = (int64_t)probe->len;
    bson_destroy(probe);
    int64_t n = O.size - base;
    if (n < 0) {
        n = 0;
    }
    char *pad = malloc((size_t)n + 1);
    memset(pad, 'x', (size_t)n);
    pad[n] = '\0';
    return pad;
}

typedef struct window {
    int64_t t;
    double daemon_cpu;
    double daemon_sys;
    double emu_cpu;
    double client_cpu;
    int64_t daemon_syscw;
    thread_cpu_t threads;
} window_t;

static void window_mark(window_t *w)
{
    w->t = now_ns();
    w->daemon_cpu = proc_cpu_split(O.daemon_pid, &w->daemon_sys);
    w->emu_cpu = O.emulator_pid > 0 ? proc_cpu_s(O.emulator_pid) : -1;
    w->client_cpu = children_cpu_s();
    w->daemon_syscw = proc_syscw(O.daemon_pid);
    threads_cpu(O.daemon_pid, &w->threads);
}

static void print_hist(const char *name, const hist_t *h)
{
    printf(" %s_n=%" PRIu64 " %s_p50_ms=%.3f %s_p90_ms=%.3f %s_p99_ms=%.3f %s_p999_ms=%.3f "
           "%s_max_ms=%.3f",
           name, h->n, name, hist_quantile_ms(h, 0.50), name, hist_quantile_ms(h, 0.90), name,
           hist_quantile_ms(h, 0.99), name, hist_quantile_ms(h, 0.999), name,
           (double)h->max_ns / 1e6);
}

static int run_writer_phase(void)
{
    mongoc_init();
    bson_error_t error;
    mongoc_client_t *client = mongoc_client_new(O.generated ? "mongodb://127.0.0.1:1" : O.uri);
    if (!client) {
        fprintf(stderr, "bench_fanout: bad uri %s\n", O.uri);
        return 1;
    }
    mongoc_collection_t *coll = mongoc_client_get_collection(client, O.db, O.coll);
    char *pad = make_pad();
    bson_t *probe = make_doc(0, 0, pad);
    int doc_bytes = (int)probe->len;
    bson_destroy(probe);

    ref_ctx_t ref;
    memset(&ref, 0, sizeof(ref));
    pthread_t ref_thread;
    mongoc_client_t *ref_client = NULL;
    mongoc_collection_t *ref_coll = NULL;
    bool ref_started = false;
    if (O.mode == MODE_LATENCY && !O.generated) {
        ref_client = mongoc_client_new(O.uri);
        ref_coll = mongoc_client_get_collection(ref_client, O.db, O.coll);
        bson_t *cs_opts = BCON_NEW("maxAwaitTimeMS", BCON_INT64(1000));
        bson_t empty = BSON_INITIALIZER;
        ref.cs = mongoc_collection_watch(ref_coll, &empty, cs_opts);
        bson_destroy(cs_opts);
        const bson_t *d;
        /* The first next() sends the aggregate: the stream is open before the first insert. */
        mongoc_change_stream_next(ref.cs, &d);
        if (mongoc_change_stream_error_document(ref.cs, &error, NULL)) {
            fprintf(stderr, "bench_fanout: reference watch failed: %s\n", error.message);
            return 1;
        }
        ref.n = S->n_events;
        if (pthread_create(&ref_thread, NULL, ref_main, &ref) == 0) {
            ref_started = true;
        }
    }

    int batch = O.batch > 0 ? O.batch : 1;
    bson_t **docs = calloc((size_t)batch, sizeof(*docs));
    window_t w0, w1;
    window_mark(&w0);
    int64_t start = w0.t;
    int64_t inserted = 0;
    int64_t lag_max_ns = 0;
    if (O.generated) {
        /* The server generates the events (bench_floor): start it now. */
        if (kill((pid_t)O.daemon_pid, SIGUSR1) != 0) {
            perror("bench_fanout: kill SIGUSR1");
            return 1;
        }
        inserted = S->n_events;
    }
    while (inserted < S->n_events) {
        int n = (int)(S->n_events - inserted < batch ? S->n_events - inserted : batch);
        if (O.rate > 0) {
            int64_t due = start + (int64_t)((double)inserted * 1e9 / O.rate);
            int64_t now = now_ns();
            if (due > now) {
                struct timespec ts = {(time_t)(due / 1000000000), (long)(due % 1000000000)};
                clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL);
            } else if (now - due > lag_max_ns) {
                lag_max_ns = now - due;
            }
        }
        int64_t t = now_ns();
        for (int i = 0; i < n; i++) {
            docs[i] = make_doc(inserted + i, t, pad);
        }
        bool ok = n == 1 ? mongoc_collection_insert_one(coll, docs[0], NULL, NULL, &error)
                         : mongoc_collection_insert_many(coll, (const bson_t **)docs, (size_t)n,
                                                         NULL, NULL, &error);
        for (int i = 0; i < n; i++) {
            bson_destroy(docs[i]);
        }
        if (!ok) {
            fprintf(stderr, "bench_fanout: insert failed: %s\n", error.message);
            return 1;
        }
        inserted += n;
    }
    int64_t t_written = now_ns();

    /* Every change to every subscriber, or no progress for `timeout`. */
    uint64_t want = (uint64_t)O.clients * (uint64_t)S->n_events;
    uint64_t last = 0;
    int64_t last_change = now_ns();
    bool complete = false;
    for (;;) {
        uint64_t got = SUM64(changes);
        if (got >= want) {
            complete = true;
            break;
        }
        int64_t now = now_ns();
        if (got != last) {
            last = got;
            last_change = now;
        } else if (now - last_change > (int64_t)(O.timeout * 1e9)) {
            break;
        }
        sleep_ms(1);
    }
    window_mark(&w1);
    if (ref_started) {
        atomic_store(&ref.stop, 1);
        pthread_join(ref_thread, NULL);
    }

    atomic_store(&S->cmd, CMD_FINISH);
    for (int i = 0; i < O.procs; i++) {
        while (!atomic_load(&S->slots[i].done)) {
            sleep_ms(5);
        }
    }
    static hist_t h_ins, h_arr, h_ref, h_ref_exact, h_ref_low;
    for (int i = 0; i < O.procs; i++) {
        hist_merge(&h_ins, &S->slots[i].lat_insert);
        hist_merge(&h_arr, &S->slots[i].lat_arrival);
        hist_merge(&h_ref, &S->slots[i].lat_ref);
        hist_merge(&h_ref_exact, &S->slots[i].lat_ref_exact);
        hist_merge(&h_ref_low, &S->slots[i].lat_ref_low);
    }
    uint64_t got = SUM64(changes);
    double wall = (double)(w1.t - w0.t) / 1e9;
    double dcpu = w1.daemon_cpu - w0.daemon_cpu;
    char threads[256];
    double runq_wait = 0;
    threads_delta(&w0.threads, &w1.threads, threads, sizeof(threads), &runq_wait);
    int64_t writes =
        w0.daemon_syscw >= 0 && w1.daemon_syscw >= 0 ? w1.daemon_syscw - w0.daemon_syscw : -1;
    printf("phase=%s clients=%d procs=%d events=%" PRId64 " doc_bytes=%d msg_bytes=%.0f "
           "rate=%.0f batch=%d generated=%d client_nice=%d client_poll_us=%d complete=%d "
           "deliveries=%" PRIu64 " missing=%" PRIu64
           " wall_s=%.3f write_s=%.3f writer_lag_max_ms=%.1f daemon_cpu_s=%.3f "
           "daemon_sys_s=%.3f deliveries_per_daemon_cpu_s=%.0f deliveries_per_wall_s=%.0f "
           "daemon_cpu_us_per_delivery=%.3f daemon_cpu_us_per_event=%.1f daemon_cpu_util=%.2f "
           "clients_cpu_s=%.3f emulator_cpu_s=%.3f slow_closes=%" PRIu64 " closes=%" PRIu64
           " client_errors=%" PRIu64 " daemon_runq_wait_s=%.3f daemon_threads=%s"
           " daemon_writes=%" PRId64 " deliveries_per_write=%.2f",
           O.mode == MODE_LATENCY ? "latency" : "throughput", O.clients, O.procs, S->n_events,
           doc_bytes, got ? (double)SUM64(bytes) / (double)got : 0.0, O.rate, batch, O.generated,
           O.client_nice, O.client_poll_us, complete, got, want - (got < want ? got : want), wall,
           (double)(t_written - w0.t) / 1e9, (double)lag_max_ns / 1e6, dcpu,
           w1.daemon_sys - w0.daemon_sys, dcpu > 0 ? (double)got / dcpu : 0.0, (double)got / wall,
           got ? dcpu * 1e6 / (double)got : 0.0, dcpu * 1e6 / (double)S->n_events, dcpu / wall,
           w1.client_cpu - w0.client_cpu, w0.emu_cpu >= 0 ? w1.emu_cpu - w0.emu_cpu : -1.0,
           SUM32(slow), SUM32(closed), SUM32(errors), runq_wait, threads, writes,
           writes > 0 && (double)writes * 64 >= (double)got ? (double)got / (double)writes : 0.0);
    print_hist("lat_insert_to_client", &h_ins);
    if (O.mode == MODE_LATENCY) {
        print_hist("lat_insert_to_arrival", &h_arr);
        print_hist("lat_insert_to_ref", &ref.hist);
        print_hist("lat_ref_to_arrival", &h_ref);
        print_hist("lat_ref_to_arrival_exact", &h_ref_exact);
        print_hist("lat_ref_to_arrival_low", &h_ref_low);
        static hist_t h_first, h_spread;
        for (int64_t q = 0; q < S->n_events; q++) {
            int64_t ref_t = atomic_load(&S->ref_recv[q]);
            int64_t first = atomic_load(&FIRST_ARRIVAL(q));
            int64_t lastv = atomic_load(&LAST_ARRIVAL(q));
            if (ref_t && first) {
                hist_add(&h_first, first - ref_t);
            }
            if (first && lastv) {
                hist_add(&h_spread, lastv - first);
            }
        }
        print_hist("lat_ref_to_first", &h_first);
        print_hist("fanout_spread", &h_spread);
        printf(" lat_ref_to_arrival_negative=%" PRIu64, h_ref.below_zero);
        printf(" stamp_shared_frac=%.4f", got ? (double)SUM64(stamp_shared) / (double)got : 0.0);
        if (O.exact_reads) {
            printf(" exact_reads=%d read_boundary_frac=%.4f", O.exact_reads,
                   got ? (double)SUM64(read_boundary) / (double)got : 0.0);
        }
    }
    printf("\n");
    fflush(stdout);

    free(docs);
    free(pad);
    if (ref.cs) {
        mongoc_change_stream_destroy(ref.cs);
    }
    mongoc_collection_destroy(ref_coll);
    mongoc_client_destroy(ref_client);
    mongoc_collection_destroy(coll);
    mongoc_client_destroy(client);
    mongoc_cleanup();
    return complete ? 0 : 1;
}

static int run_idle_phase(long rss0, long anon0, long pss0, long fds0, long tcp_mem0, long slab0)
{
    sleep_ms((int)(O.hold * 1000));
    long rss = proc_kib(O.daemon_pid, "status", "VmRSS");
    long anon = proc_kib(O.daemon_pid, "status", "RssAnon");
    long pss = proc_kib(O.daemon_pid, "smaps_rollup", "Pss");
    long hwm = proc_kib(O.daemon_pid, "status", "VmHWM");
    long fds = count_fds(O.daemon_pid);
    long inuse, tcp_mem;
    tcp_sockstat(&inuse, &tcp_mem);
    long slab = proc_meminfo_kib("Slab");
    uint64_t ready = SUM32(ready);
    long page_kib = sysconf(_SC_PAGESIZE) / 1024;
    printf("phase=idle clients=%d procs=%d subscribed=%" PRIu64 " closes=%" PRIu64
           " daemon_fds_before=%ld daemon_fds=%ld rss_before_kib=%ld rss_kib=%ld "
           "rss_hwm_kib=%ld anon_before_kib=%ld anon_kib=%ld pss_before_kib=%ld pss_kib=%ld "
           "rss_bytes_per_conn=%.0f anon_bytes_per_conn=%.0f tcp_mem_kib_before=%ld "
           "tcp_mem_kib=%ld kernel_tcp_bytes_per_conn_both_ends=%.0f "
           "kernel_slab_bytes_per_conn_both_ends=%.0f\n",
           O.clients, O.procs, ready, SUM32(closed), fds0, fds, rss0, rss, hwm, anon0, anon, pss0,
           pss, (double)(rss - rss0) * 1024 / (double)O.clients,
           (double)(anon - anon0) * 1024 / (double)O.clients, tcp_mem0 * page_kib,
           tcp_mem * page_kib, (double)(tcp_mem - tcp_mem0) * page_kib * 1024 / (double)O.clients,
           (double)(slab - slab0) * 1024 / (double)O.clients);
    fflush(stdout);
    return ready >= (uint64_t)O.clients ? 0 : 1;
}

/* One blocking WebSocket subscription: handshake, wait for "ready", close. */
static int warm_up(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr;
    uv_ip4_addr(O.host, O.port, &addr);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (fd < 0 || connect(fd, (const struct sockaddr *)&addr, sizeof(addr)) != 0) {
        fprintf(stderr, "bench_fanout: warm-up connect: %s\n", strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    char req[2048];
    int rl = snprintf(req, sizeof(req),
                      "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: " WS_KEY "\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n",
                      O.path, O.host, O.port);
    char buf[4096];
    size_t got = 0;
    SSL *ssl = NULL;
    if (O.tls) {
        ssl = SSL_new(client_tls_ctx());
        if (!ssl || SSL_set_fd(ssl, fd) != 1 || SSL_connect(ssl) != 1) {
            fprintf(stderr, "bench_fanout: warm-up TLS handshake failed\n");
            SSL_free(ssl);
            close(fd);
            return -1;
        }
    }
    bool ok = ssl ? SSL_write(ssl, req, rl) == rl : write(fd, req, (size_t)rl) == rl;
    while (ok && got < sizeof(buf) - 1 && !memmem(buf, got, "\"ready\"", 7)) {
        ssize_t n = ssl ? SSL_read(ssl, buf + got, (int)(sizeof(buf) - 1 - got))
                        : read(fd, buf + got, sizeof(buf) - 1 - got);
        if (n <= 0) {
            ok = false;
        } else {
            got += (size_t)n;
        }
    }
    SSL_free(ssl);
    close(fd);
    if (!ok) {
        fprintf(stderr, "bench_fanout: warm-up subscriber got no ready message\n");
        return -1;
    }
    sleep_ms(200); /* let the daemon see the close */
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_fanout throughput|latency|idle --url ws[s]://HOST:PORT/v1/streams/NAME\n"
            "         --daemon-pid PID [--emulator-pid PID] [--uri MONGODB_URI] [--db bench]\n"
            "         [--coll fanout] [--clients 1000] [--procs 2] [--events N] [--rate R]\n"
            "         [--seconds S] [--size 200] [--batch B] [--hold S] [--concurrency 128]\n"
            "         [--timeout 20] [--client-nice N] [--client-poll-us US]\n"
            "         [--exact-reads 0|1] [--generated 0|1]\n");
    exit(2);
}

static int parse_url(const char *url)
{
    const char *p = url;
    if (strncmp(p, "wss://", 6) == 0) {
        O.tls = true;
        p += 6;
    } else if (strncmp(p, "ws://", 5) == 0) {
        p += 5;
    } else {
        return -1;
    }
    const char *colon = strchr(p, ':');
    const char *slash = strchr(p, '/');
    if (!colon || !slash || colon > slash || (size_t)(colon - p) >= sizeof(O.host) ||
        strlen(slash) >= sizeof(O.path)) {
        return -1;
    }
    memcpy(O.host, p, (size_t)(colon - p));
    O.host[colon - p] = '\0';
    O.port = atoi(colon + 1);
    strcpy(O.path, slash);
    return O.port > 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage();
    }
    O.mode = !strcmp(argv[1], "throughput") ? MODE_THROUGHPUT
             : !strcmp(argv[1], "latency")  ? MODE_LATENCY
             : !strcmp(argv[1], "idle")     ? MODE_IDLE
                                            : -1;
    if (O.mode < 0) {
        usage();
    }
    O.db = "bench";
    O.coll = "fanout";
    O.clients = 1000;
    O.procs = 2;
    O.events = -1;
    O.rate = -1;
    O.seconds = 10;
    O.size = 200;
    O.batch = -1;
    O.hold = 2;
    O.concurrency = 128;
    O.timeout = 20;
    for (int i = 2; i < argc; i++) {
        if (i + 1 >= argc) {
            usage();
        }
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--url")) {
            O.url = v;
        } else if (!strcmp(k, "--uri")) {
            O.uri = v;
        } else if (!strcmp(k, "--db")) {
            O.db = v;
        } else if (!strcmp(k, "--coll")) {
            O.coll = v;
        } else if (!strcmp(k, "--daemon-pid")) {
            O.daemon_pid = atol(v);
        } else if (!strcmp(k, "--emulator-pid")) {
            O.emulator_pid = atol(v);
        } else if (!strcmp(k, "--clients")) {
            O.clients = atoi(v);
        } else if (!strcmp(k, "--procs")) {
            O.procs = atoi(v);
        } else if (!strcmp(k, "--events")) {
            O.events = atoll(v);
        } else if (!strcmp(k, "--rate")) {
            O.rate = atof(v);
        } else if (!strcmp(k, "--seconds")) {
            O.seconds = atof(v);
        } else if (!strcmp(k, "--size")) {
            O.size = atoi(v);
        } else if (!strcmp(k, "--batch")) {
            O.batch = atoi(v);
        } else if (!strcmp(k, "--hold")) {
            O.hold = atof(v);
        } else if (!strcmp(k, "--concurrency")) {
            O.concurrency = atoi(v);
        } else if (!strcmp(k, "--timeout")) {
            O.timeout = atof(v);
        } else if (!strcmp(k, "--client-poll-us")) {
            O.client_poll_us = atoi(v);
        } else if (!strcmp(k, "--exact-reads")) {
            O.exact_reads = atoi(v);
            if (O.exact_reads < 0 || O.exact_reads > 1) {
                usage();
            }
        } else if (!strcmp(k, "--generated")) {
            O.generated = atoi(v);
        } else if (!strcmp(k, "--client-nice")) {
            O.client_nice = atoi(v);
        } else {
            usage();
        }
    }
    if (!O.url || parse_url(O.url) != 0 || O.daemon_pid <= 0 || O.clients <= 0 || O.procs <= 0 ||
        O.procs > MAX_PROCS || O.concurrency <= 0 || O.size < 64 ||
        (O.mode != MODE_IDLE && !O.uri && !O.generated)) {
        usage();
    }
    if (O.tls && (O.mode == MODE_LATENCY || O.exact_reads)) {
        fprintf(stderr, "bench_fanout: wss:// is for the throughput and idle phases only\n");
        return 2;
    }
    if (O.mode == MODE_LATENCY) {
        if (O.rate <= 0) {
            O.rate = 1000;
        }
        if (O.events < 0) {
            O.events = (int64_t)(O.rate * O.seconds);
        }
        if (O.batch < 0) {
            O.batch = 1;
        }
    } else if (O.mode == MODE_THROUGHPUT) {
        if (O.rate < 0) {
            O.rate = 0;
        }
        if (O.events < 0) {
            O.events = 20000;
        }
        if (O.batch < 0) {
            O.batch = 10;
        }
    } else {
        O.events = 0;
    }

    /* Idle baseline before any of our connections exists, but after one subscriber came and
     * went: the code pages of the HTTP/WebSocket path and one-time allocations are then in
     * the baseline rather than charged to the connections. */
    if (O.mode == MODE_IDLE && warm_up() != 0) {
        return 1;
    }
    long rss0 = proc_kib(O.daemon_pid, "status", "VmRSS");
    long anon0 = proc_kib(O.daemon_pid, "status", "RssAnon");
    long pss0 = proc_kib(O.daemon_pid, "smaps_rollup", "Pss");
    long fds0 = count_fds(O.daemon_pid);
    long inuse0, tcp_mem0;
    tcp_sockstat(&inuse0, &tcp_mem0);
    long slab0 = proc_meminfo_kib("Slab");
    if (rss0 < 0) {
        fprintf(stderr, "bench_fanout: cannot read /proc/%ld/status\n", O.daemon_pid);
        return 1;
    }

    size_t shared_size =
        sizeof(shared_t) + 3 * (size_t)(O.events > 0 ? O.events : 0) * sizeof(_Atomic int64_t);
    S = mmap(NULL, shared_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (S == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    S->n_events = O.events;
    atomic_store(&S->cmd, CMD_RUN);
    int64_t t_base = now_ns();
    for (int i = 0; i < O.procs; i++) {
        int n = O.clients / O.procs + (i < O.clients % O.procs ? 1 : 0);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            stop_children();
            return 1;
        }
        if (pid == 0) {
            if (O.client_nice && setpriority(PRIO_PROCESS, 0, O.client_nice) != 0) {
                perror("setpriority");
            }
            client_main(i, n, t_base);
        }
        children[i] = pid;
    }
    int rc = 1;
    if (wait_subscribed() == 0) {
        if (O.mode == MODE_IDLE) {
            rc = run_idle_phase(rss0, anon0, pss0, fds0, tcp_mem0, slab0);
        } else {
            rc = run_writer_phase();
        }
    }
    stop_children();
    return rc;
}
