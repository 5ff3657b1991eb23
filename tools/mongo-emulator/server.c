/*
 * server.c: the TCP side of mongo-emulator: server state set-up, the listener (accept thread),
 * one thread per client connection that frames messages, and graceful shutdown.
 *
 * Threads: emu_server_start/stop/cleanup run on the main thread; accept_main on the accept
 * thread; conn_main on each connection thread. A connection thread reads a whole message,
 * parses it (wire.c), hands it to emu_handle_request (which takes srv->lock only around the
 * command itself) and writes the reply with the lock released, so a slow reader never holds
 * up anybody else. Invariants: a connection's fd is closed only under net->lock by its own
 * thread, so emu_server_stop can shut down every live fd without racing a reused number;
 * at most MAX_CONNECTIONS connections exist; a message buffer never exceeds
 * EMU_WIRE_MAX_MESSAGE and grows only as bytes actually arrive.
 */
#include "core.h"

#include "changestream.h"
#include "history.h"
#include "txn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_CONNECTIONS 1024
#define INITIAL_BUFFER (64 * 1024)
/* Buffers that grew past this for one big message are released after it. */
#define KEEP_BUFFER (1024 * 1024)

typedef struct conn_node {
    emu_conn_t conn;
    uint8_t *buf;
    size_t cap;
    int32_t next_reply_id;
    struct conn_node *prev;
    struct conn_node *next;
} conn_node_t;

struct emu_net {
    int listen_fd;
    int wake[2];
    pthread_t accept_thread;
    bool accepting;
    pthread_mutex_t lock; /* guards conns and count */
    pthread_cond_t idle;  /* signalled when count drops to 0 */
    conn_node_t *conns;
    size_t count;
};

/* ---- set-up ---- */

int emu_server_init(emu_server_t *srv, const emu_options_t *opts, mc_error_t *err)
{
    int rc;

    memset(srv, 0, sizeof(*srv));
    srv->opts = *opts;
    if (!srv->opts.bind) {
        srv->opts.bind = "127.0.0.1";
    }
    if (srv->opts.standalone) {
        srv->opts.replset = NULL;
    } else if (!srv->opts.replset || !srv->opts.replset[0]) {
        srv->opts.replset = "rs0";
    }
    if (srv->opts.max_wire_version == 0) {
        srv->opts.max_wire_version = 17;
    }
    if (srv->opts.oplog_max_events == 0) {
        srv->opts.oplog_max_events = 1000000;
    }
    pthread_mutex_init(&srv->lock, NULL);
    pthread_cond_init(&srv->oplog_cond, NULL);
    pthread_mutex_init(&srv->log_lock, NULL);
    srv->catalog = emu_catalog_new();
    srv->cursors = emu_cursors_new();
    srv->failpoints = emu_failpoints_new();
    srv->net = bson_malloc0(sizeof(*srv->net));
    srv->net->listen_fd = -1;
    srv->net->wake[0] = srv->net->wake[1] = -1;
    pthread_mutex_init(&srv->net->lock, NULL);
    pthread_cond_init(&srv->net->idle, NULL);
    /* operationTime must be a real Timestamp even before the first write */
    emu_clock_tick(srv, NULL, NULL);
    rc = emu_log_open(srv, srv->opts.log_path, err);
    if (rc == 0) {
        rc = emu_changestream_init(srv, err);
    }
    if (rc == 0) {
        rc = emu_history_init(srv, err);
    }
    if (rc == 0) {
        rc = emu_sessions_init(srv, err);
    }
    if (rc) {
        emu_server_cleanup(srv);
    }
    return rc;
}

void emu_server_cleanup(emu_server_t *srv)
{
    if (!srv->net) {
        return; /* never initialised, or already cleaned up */
    }
    emu_server_stop(srv);
    emu_sessions_cleanup(srv);
    emu_history_cleanup(srv);
    if (srv->oplog || srv->cs_cursors) {
        emu_changestream_cleanup(srv);
    }
    emu_catalog_destroy(srv->catalog);
    emu_cursors_destroy(srv->cursors);
    emu_failpoints_destroy(srv->failpoints);
    emu_log_close(srv);
    pthread_mutex_destroy(&srv->net->lock);
    pthread_cond_destroy(&srv->net->idle);
    bson_free(srv->net);
    srv->net = NULL;
    srv->catalog = NULL;
    srv->cursors = NULL;
    srv->failpoints = NULL;
    pthread_mutex_destroy(&srv->lock);
    pthread_cond_destroy(&srv->oplog_cond);
    pthread_mutex_destroy(&srv->log_lock);
}

/* ---- socket helpers ---- */

/* 1: got n bytes; 0: orderly EOF before any byte; -1: error or EOF mid-way. */
static int read_full(int fd, uint8_t *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            return got == 0 ? 0 : -1;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    return 1;
}

static int write_iov(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr msg;
        ssize_t w;
        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)n;
        w = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Reads one message into node->buf. 1: message of *len bytes; 0: EOF; -1: error/bad frame. */
static int read_message(conn_node_t *node, size_t *len)
{
    uint8_t hdr[EMU_WIRE_HEADER_LEN];
    emu_wire_header_t h;
    mc_error_t err;
    size_t total, got;
    int rc = read_full(node->conn.fd, hdr, sizeof(hdr));

    if (rc <= 0) {
        return rc;
    }
    if (emu_wire_parse_header(hdr, sizeof(hdr), &h, &err)) {
        emu_log_event(node->conn.srv, &node->conn, "bad frame (length %d): %s", (int)h.length,
                      err.message);
        return -1;
    }
    total = (size_t)h.length;
    if (!node->buf) {
        node->cap = INITIAL_BUFFER;
        node->buf = bson_malloc(node->cap);
    }
    memcpy(node->buf, hdr, sizeof(hdr));
    got = sizeof(hdr);
    while (got < total) {
        size_t want;
        if (got == node->cap) {
            /* Grow as data arrives: a message that only claims to be huge costs nothing. */
            size_t cap = node->cap * 2 < total ? node->cap * 2 : total;
            node->buf = bson_realloc(node->buf, cap);
            node->cap = cap;
        }
        want = (node->cap < total ? node->cap : total) - got;
        for (;;) {
            ssize_t r = recv(node->conn.fd, node->buf + got, want, 0);
            if (r > 0) {
                got += (size_t)r;
                break;
            }
            if (r == 0 || errno != EINTR) {
                return -1;
            }
        }
    }
    *len = total;
    return 1;
}

static int send_reply(conn_node_t *node, const emu_wire_request_t *req, bson_t *reply)
{
    uint8_t prefix[EMU_WIRE_REPLY_PREFIX_MAX];
    int32_t opcode = req->header.opcode == EMU_OPCODE_QUERY ? EMU_OPCODE_REPLY : EMU_OPCODE_MSG;
    size_t n = emu_wire_reply_prefix(prefix, opcode, ++node->next_reply_id, req->header.request_id,
                                     reply->len);
    struct iovec iov[2];

    if (n == 0) {
        emu_reply_error(reply, 10334, "reply of %u bytes exceeds maxMessageSizeBytes", reply->len);
        n = emu_wire_reply_prefix(prefix, opcode, node->next_reply_id, req->header.request_id,
                                  reply->len);
    }
    iov[0].iov_base = prefix;
    iov[0].iov_len = n;
    iov[1].iov_base = (void *)bson_get_data(reply);
    iov[1].iov_len = reply->len;
    return write_iov(node->conn.fd, iov, 2);
}

/* ---- connection thread ---- */

static void *conn_main(void *arg)
{
    conn_node_t *node = arg;
    emu_server_t *srv = node->conn.srv;
    struct emu_net *net = srv->net;

    emu_log_event(srv, &node->conn, "connection opened");
    for (;;) {
        size_t len = 0;
        emu_wire_request_t req;
        mc_error_t err;
        bson_t reply = BSON_INITIALIZER;
        bool keep = true;
        int rc = read_message(node, &len);

        if (rc <= 0) {
            bson_destroy(&reply);
            break;
        }
        if (emu_wire_parse(node->buf, len, &req, &err) != 0) {
            emu_log_event(srv, &node->conn, "bad message (opcode %d): %s", (int)req.header.opcode,
                          err.message);
            if (req.header.opcode == EMU_OPCODE_MSG || req.header.opcode == EMU_OPCODE_QUERY) {
                /* framing is intact, so answer in kind and keep the connection */
                emu_reply_parse_error(&node->conn, &err, &reply);
                if (!req.more_to_come) {
                    pthread_mutex_lock(&srv->lock);
                    emu_reply_append_cluster_time(srv, &reply);
                    pthread_mutex_unlock(&srv->lock);
                    keep = send_reply(node, &req, &reply) == 0;
                }
            } else {
                keep = false; /* OP_COMPRESSED, legacy or unknown opcodes */
            }
        } else if (emu_handle_request(&node->conn, &req, &reply) == EMU_HANDLE_CLOSE) {
            keep = false;
        } else if (!req.more_to_come) {
            keep = send_reply(node, &req, &reply) == 0;
        }
        emu_wire_request_cleanup(&req);
        bson_destroy(&reply);
        if (node->cap > KEEP_BUFFER) {
            bson_free(node->buf);
            node->buf = NULL;
            node->cap = 0;
        }
        if (!keep) {
            break;
        }
    }
    emu_log_event(srv, &node->conn, "connection closed");

    pthread_mutex_lock(&net->lock);
    if (node->prev) {
        node->prev->next = node->next;
    } else {
        net->conns = node->next;
    }
    if (node->next) {
        node->next->prev = node->prev;
    }
    close(node->conn.fd);
    if (--net->count == 0) {
        pthread_cond_broadcast(&net->idle);
    }
    pthread_mutex_unlock(&net->lock);
    bson_free(node->buf);
    bson_free(node);
    return NULL;
}

/* ---- accept thread ---- */

static void start_connection(emu_server_t *srv, int fd)
{
    struct emu_net *net = srv->net;
    conn_node_t *node;
    pthread_attr_t attr;
    pthread_t tid;
    int one = 1;

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    pthread_mutex_lock(&net->lock);
    if (net->count >= MAX_CONNECTIONS) {
        pthread_mutex_unlock(&net->lock);
        emu_log_event(srv, NULL, "too many connections; refusing one");
        close(fd);
        return;
    }
    node = bson_malloc0(sizeof(*node));
    node->conn.srv = srv;
    node->conn.fd = fd;
    pthread_mutex_lock(&srv->lock);
    node->conn.id = ++srv->next_connection_id;
    pthread_mutex_unlock(&srv->lock);
    node->next = net->conns;
    if (net->conns) {
        net->conns->prev = node;
    }
    net->conns = node;
    net->count++;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&tid, &attr, conn_main, node) != 0) {
        net->conns = node->next;
        if (node->next) {
            node->next->prev = NULL;
        }
        net->count--;
        close(fd);
        bson_free(node);
    }
    pthread_attr_destroy(&attr);
    pthread_mutex_unlock(&net->lock);
}

static void *accept_main(void *arg)
{
    emu_server_t *srv = arg;
    struct emu_net *net = srv->net;

    for (;;) {
        struct pollfd pfd[2];
        int fd;

        pfd[0].fd = net->listen_fd;
        pfd[0].events = POLLIN;
        pfd[1].fd = net->wake[0];
        pfd[1].events = POLLIN;
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (pfd[1].revents) {
            break;
        }
        if (!(pfd[0].revents & POLLIN)) {
            continue;
        }
        fd = accept(net->listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                /* out of descriptors: back off instead of spinning */
                poll(NULL, 0, 100);
            }
            continue;
        }
        start_connection(srv, fd);
    }
    return NULL;
}

int emu_server_start(emu_server_t *srv, mc_error_t *err)
{
    struct emu_net *net = srv->net;
    struct addrinfo hints, *res = NULL;
    struct sockaddr_storage addr;
    socklen_t alen = sizeof(addr);
    char portstr[16];
    int fd, one = 1, gai, port;
    const char *host;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(portstr, sizeof(portstr), "%d", srv->opts.port);
    gai = getaddrinfo(srv->opts.bind, portstr, &hints, &res);
    if (gai != 0 || !res) {
        return mc_error_set(err, MC_EIO, MC_DOMAIN_NONE, gai, "cannot resolve %s: %s",
                            srv->opts.bind, gai_strerror(gai));
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        freeaddrinfo(res);
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, errno, "socket: %s", strerror(errno));
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
        int e = errno;
        freeaddrinfo(res);
        close(fd);
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, e, "cannot listen on %s:%d: %s",
                            srv->opts.bind, srv->opts.port, strerror(e));
    }
    freeaddrinfo(res);
    getsockname(fd, (struct sockaddr *)&addr, &alen);
    port = addr.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&addr)->sin6_port)
                                      : ntohs(((struct sockaddr_in *)&addr)->sin_port);
    srv->opts.port = port;
    /* What clients must find in hello's hosts: a wildcard bind is reached over loopback. */
    host = srv->opts.bind;
    if (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0) {
        host = "127.0.0.1";
    }
    if (strchr(host, ':')) {
        snprintf(srv->host, sizeof(srv->host), "[%s]:%d", host, port);
    } else {
        snprintf(srv->host, sizeof(srv->host), "%s:%d", host, port);
    }
    if (pipe(net->wake) != 0) {
        close(fd);
        return mc_error_set(err, MC_EIO, MC_DOMAIN_ERRNO, errno, "pipe: %s", strerror(errno));
    }
    net->listen_fd = fd;
    if (pthread_create(&net->accept_thread, NULL, accept_main, srv) != 0) {
        close(fd);
        close(net->wake[0]);
        close(net->wake[1]);
        net->listen_fd = net->wake[0] = net->wake[1] = -1;
        return mc_error_set(err, MC_EIO, MC_DOMAIN_NONE, 0, "cannot start the accept thread");
    }
    net->accepting = true;
    return 0;
}

void emu_server_stop(emu_server_t *srv)
{
    struct emu_net *net = srv->net;

    if (!net) {
        return;
    }
    pthread_mutex_lock(&srv->lock);
    srv->shutting_down = true;
    pthread_cond_broadcast(&srv->oplog_cond);
    pthread_mutex_unlock(&srv->lock);

    if (net->accepting) {
        ssize_t w;
        do {
            w = write(net->wake[1], "x", 1);
        } while (w < 0 && errno == EINTR);
        pthread_join(net->accept_thread, NULL);
        net->accepting = false;
        close(net->listen_fd);
        close(net->wake[0]);
        close(net->wake[1]);
        net->listen_fd = net->wake[0] = net->wake[1] = -1;
    }

    pthread_mutex_lock(&net->lock);
    while (net->count > 0) {
        struct timespec deadline;
        /* Shut every socket down (again, in case a thread was between reads); blocked reads and
         * writes return, and waiting getMores were woken by the broadcast above. */
        for (conn_node_t *n = net->conns; n; n = n->next) {
            shutdown(n->conn.fd, SHUT_RDWR);
        }
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_nsec += 100 * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&net->idle, &net->lock, &deadline);
        pthread_mutex_lock(&srv->lock);
        pthread_cond_broadcast(&srv->oplog_cond);
        pthread_mutex_unlock(&srv->lock);
    }
    pthread_mutex_unlock(&net->lock);
}
