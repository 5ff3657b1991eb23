/*
 * broker_fixture.h: real brokers (redis-server, nats-server) as child processes for the
 * client unit tests, plus small helpers those tests share: a free loopback port, waiting for
 * a port to accept, stopping a child by pid, a scratch directory, a "silent" TCP server that
 * accepts and never answers, test events with v1 resume tokens, and running a libuv loop
 * until a condition holds. Header-only: each test is one executable. Main thread only.
 *
 * A test whose broker binary is missing is skipped, not failed (the binaries come from
 * scripts/install-deps.sh; CI installs them).
 */
#ifndef MC_TEST_BROKER_FIXTURE_H
#define MC_TEST_BROKER_FIXTURE_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <bson/bson.h>
#include <uv.h>

#include "mongocast/event.h"

static inline int64_t fx_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A port nobody listens on right now (the kernel's choice for port 0). */
static inline int fx_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* True once 127.0.0.1:port accepts a connection (polled up to timeout_ms). */
static inline bool fx_wait_port(int port, int timeout_ms)
{
    int64_t deadline = fx_now_ms() + timeout_ms;
    while (fx_now_ms() < deadline) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
        close(fd);
        if (rc == 0) {
            return true;
        }
        usleep(20000);
    }
    return false;
}

/* An executable on PATH or at an absolute path? */
static inline bool fx_have(const char *prog)
{
    if (prog[0] == '/') {
        return access(prog, X_OK) == 0;
    }
    const char *path = getenv("PATH");
    char buf[1024];
    while (path && *path) {
        const char *colon = strchr(path, ':');
        size_t n = colon ? (size_t)(colon - path) : strlen(path);
        snprintf(buf, sizeof buf, "%.*s/%s", (int)n, path, prog);
        if (access(buf, X_OK) == 0) {
            return true;
        }
        path = colon ? colon + 1 : NULL;
    }
    return false;
}

/* Children still running, killed at exit: a failed assertion leaves its test early (cmocka
 * jumps out), and must not leave a broker behind. */
static pid_t fx_children[64];

static void fx_kill_children(void)
{
    for (size_t k = 0; k < sizeof fx_children / sizeof fx_children[0]; k++) {
        if (fx_children[k] > 0) {
            kill(fx_children[k], SIGCONT);
            kill(fx_children[k], SIGKILL);
            waitpid(fx_children[k], NULL, 0);
            fx_children[k] = 0;
        }
    }
}

static inline void fx_track(pid_t pid, bool add)
{
    static bool registered;
    if (!registered) {
        atexit(fx_kill_children);
        registered = true;
    }
    for (size_t k = 0; k < sizeof fx_children / sizeof fx_children[0]; k++) {
        if (add ? fx_children[k] == 0 : fx_children[k] == pid) {
            fx_children[k] = add ? pid : 0;
            return;
        }
    }
}

/* Starts argv[0] (looked up on PATH) with stdout and stderr to `log` (or /dev/null). The
 * child is killed when this process dies (PR_SET_PDEATHSIG) or exits (atexit). */
static inline pid_t fx_spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid > 0) {
        fx_track(pid, true);
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(log ? log : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

/* Stops a child with `sig` (SIGKILL after 10 s) and reaps it. */
static inline void fx_stop(pid_t pid, int sig)
{
    if (pid <= 0) {
        return;
    }
    fx_track(pid, false);
    kill(pid, SIGCONT); /* a stopped child would never act on sig */
    kill(pid, sig);
    for (int i = 0; i < 1000; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid) {
            return;
        }
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* A fresh directory under TMPDIR (or /tmp); removed with fx_rmdir. */
static inline void fx_tempdir(char *out, size_t cap, const char *tag)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(out, cap, "%s/mc-%s-XXXXXX", tmp && *tmp ? tmp : "/tmp", tag);
    if (!mkdtemp(out)) {
        out[0] = '\0';
    }
}

static inline void fx_rmdir(const char *dir)
{
    if (dir[0]) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) {
            fprintf(stderr, "could not remove %s\n", dir);
        }
    }
}

/* ---- Brokers: redis-server, nats-server ---------------------------------------------- */

typedef struct fx_broker {
    pid_t pid;
    int port;
    char dir[512]; /* its files (Redis AOF, JetStream store, log), kept across restarts */
} fx_broker_t;

typedef fx_broker_t fx_redis_t;
typedef fx_broker_t fx_nats_t;

/* Starts `argv` (with `{PORT}` and `{DIR}` entries replaced, `extra` appended) on `port` (0:
 * a free one, retried a few times in case another process takes it first) and waits until it
 * accepts connections. */
static inline bool fx_broker_start(fx_broker_t *b, const char *const *argv_tmpl, int port,
                                   const char *const *extra, const char *tag)
{
    if (!fx_have(argv_tmpl[0])) {
        return false;
    }
    if (!b->dir[0]) {
        fx_tempdir(b->dir, sizeof b->dir, tag);
    }
    for (int attempt = 0; attempt < 5; attempt++) {
        b->port = port ? port : fx_free_port();
        char portbuf[16], logbuf[600];
        snprintf(portbuf, sizeof portbuf, "%d", b->port);
        snprintf(logbuf, sizeof logbuf, "%s/%s.log", b->dir, tag);
        char *argv[64];
        int n = 0;
        for (int k = 0; argv_tmpl[k] && n < 63; k++) {
            const char *a = argv_tmpl[k];
            argv[n++] = strcmp(a, "{PORT}") == 0  ? portbuf
                        : strcmp(a, "{DIR}") == 0 ? b->dir
                                                  : (char *)a;
        }
        for (int k = 0; extra && extra[k] && n < 63; k++) {
            argv[n++] = (char *)extra[k];
        }
        argv[n] = NULL;
        b->pid = fx_spawn(argv, logbuf);
        if (fx_wait_port(b->port, 10000)) {
            return true;
        }
        fx_stop(b->pid, SIGKILL);
        b->pid = 0;
        if (port) {
            break;
        }
    }
    return false;
}

static inline void fx_broker_stop(fx_broker_t *b, int sig)
{
    fx_stop(b->pid, sig);
    b->pid = 0;
}

static inline void fx_broker_cleanup(fx_broker_t *b)
{
    fx_broker_stop(b, SIGKILL);
    fx_rmdir(b->dir);
    b->dir[0] = '\0';
}

/* redis-server with its files in the broker's directory, no RDB snapshots. */
static inline bool fx_redis_start(fx_redis_t *r, int port, const char *const *extra)
{
    static const char *const argv[] = {
        "redis-server", "--port", "{PORT}",      "--bind", "127.0.0.1",        "--dir", "{DIR}",
        "--save",       "",       "--daemonize", "no",     "--protected-mode", "no",    NULL};
    return fx_broker_start(r, argv, port, extra, "redis");
}

/* nats-server -js with its JetStream store in the broker's directory. */
static inline bool fx_nats_start(fx_nats_t *n, int port, const char *const *extra)
{
    static const char *const argv[] = {"nats-server", "-js", "-a",    "127.0.0.1", "-p",
                                       "{PORT}",      "-sd", "{DIR}", NULL};
    return fx_broker_start(n, argv, port, extra, "nats");
}

#define fx_redis_stop fx_broker_stop
#define fx_redis_cleanup fx_broker_cleanup
#define fx_nats_stop fx_broker_stop
#define fx_nats_cleanup fx_broker_cleanup

/* ---- A server that accepts and never answers ---------------------------------------------- */

/* Listens on a free loopback port and never accepts: the kernel still completes TCP
 * handshakes for the backlog, so a client connects fine and then waits forever. */
static inline int fx_silent_listen(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 16) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

/* ---- Events with resume tokens --------------------------------------------------------------- */

/* The hex of a v1 event token at (t, i) with txnOpIndex `txn` (KeyString layout). */
static inline void fx_token(char *hex, size_t cap, uint32_t t, uint32_t i, uint32_t txn)
{
    size_t n = (size_t)snprintf(hex, cap, "82%08X%08X2B022C0100", t, i);
    if (txn == 0) {
        n += (size_t)snprintf(hex + n, cap - n, "29");
    } else {
        uint64_t m = (uint64_t)txn << 1;
        int bytes = 1;
        while (bytes < 8 && (m >> (8 * bytes)) != 0) {
            bytes++;
        }
        n += (size_t)snprintf(hex + n, cap - n, "%02X", 0x2B - 1 + bytes);
        for (int b = bytes - 1; b >= 0; b--) {
            n += (size_t)snprintf(hex + n, cap - n, "%02X", (unsigned)(m >> (8 * b)) & 0xFF);
        }
    }
    snprintf(hex + n, cap - n, "6E5A100400000000000000000000000000ABCDEF46645F6964002900000004");
}

/* An insert event of stream `stream` at position (t, i, txn), with the recipient `owner`
 * (NULL: none) and a `pad`-byte string field. */
static inline mc_event_t *fx_event(const char *stream, uint64_t seq, uint32_t t, uint32_t i,
                                   uint32_t txn, const char *owner, size_t pad)
{
    char hex[160];
    fx_token(hex, sizeof hex, t, i, txn);
    bson_t doc = BSON_INITIALIZER, sub;
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "_id", &sub);
    BSON_APPEND_UTF8(&sub, "_data", hex);
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_UTF8(&doc, "operationType", "insert");
    BSON_APPEND_TIMESTAMP(&doc, "clusterTime", t, i);
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "ns", &sub);
    BSON_APPEND_UTF8(&sub, "db", "shop");
    BSON_APPEND_UTF8(&sub, "coll", "orders");
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "documentKey", &sub);
    BSON_APPEND_INT64(&sub, "_id", (int64_t)seq);
    bson_append_document_end(&doc, &sub);
    BSON_APPEND_DOCUMENT_BEGIN(&doc, "fullDocument", &sub);
    BSON_APPEND_INT64(&sub, "_id", (int64_t)seq);
    if (owner) {
        BSON_APPEND_UTF8(&sub, "owner", owner);
    }
    if (pad) {
        char *p = malloc(pad + 1);
        memset(p, 'x', pad);
        p[pad] = '\0';
        BSON_APPEND_UTF8(&sub, "pad", p);
        free(p);
    }
    bson_append_document_end(&doc, &sub);
    mc_event_t *ev = mc_event_new_change(stream, seq, &doc, "fullDocument.owner", NULL);
    bson_destroy(&doc);
    return ev;
}

/* ---- Running a loop until something happens
 * ------------------------------------------------------ */

/* Runs `loop` until *flag becomes true or timeout_ms passes; returns *flag. */
static inline bool fx_run_until(uv_loop_t *loop, const volatile bool *flag, int timeout_ms)
{
    int64_t deadline = fx_now_ms() + timeout_ms;
    while (!*flag && fx_now_ms() < deadline) {
        uv_run(loop, UV_RUN_NOWAIT);
        if (!*flag) {
            usleep(1000);
        }
    }
    return *flag;
}

/* Runs the loop for about ms milliseconds. */
static inline void fx_run_for(uv_loop_t *loop, int ms)
{
    static const bool never = false;
    fx_run_until(loop, &never, ms);
}

#endif
