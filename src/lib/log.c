/*
 * log.c: the library's log dispatch, level filter, rate limiting and the stderr handler.
 *
 * Any thread. The handler and its userdata are process-wide and guarded by one mutex, read
 * as a pair so a concurrent mc_log_set_handler() can never mix an old handler with new
 * userdata. The handler is called outside that mutex, so a slow handler never serialises
 * other threads' logging behind the lock and a handler that logs recursively cannot deadlock.
 */
#include "mongocast/log.h"

#include <mongoc/mongoc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "engine_private.h"

#define LOG_LINE_MAX 1024

static pthread_mutex_t handler_lock = PTHREAD_MUTEX_INITIALIZER;
static mc_log_handler_fn handler_fn;
static void *handler_ud;
static atomic_int max_level = MC_LOG_INFO;

void mc_log_set_handler(mc_log_handler_fn fn, void *userdata)
{
    pthread_mutex_lock(&handler_lock);
    handler_fn = fn;
    handler_ud = userdata;
    pthread_mutex_unlock(&handler_lock);
}

void mc_log_set_level(mc_log_level_t level)
{
    if (level < MC_LOG_ERROR) {
        level = MC_LOG_ERROR;
    }
    if (level > MC_LOG_TRACE) {
        level = MC_LOG_TRACE;
    }
    atomic_store(&max_level, (int)level);
}

mc_log_level_t mc_log_get_level(void)
{
    return (mc_log_level_t)atomic_load(&max_level);
}

bool mc_log_enabled(mc_log_level_t level)
{
    if ((int)level > atomic_load(&max_level)) {
        return false;
    }
    pthread_mutex_lock(&handler_lock);
    bool have = handler_fn != NULL;
    pthread_mutex_unlock(&handler_lock);
    return have;
}

static const char *const level_names[] = {"error", "warn", "notice", "info", "debug", "trace"};

const char *mc_log_level_name(mc_log_level_t level)
{
    if ((int)level < 0 || (int)level > MC_LOG_TRACE) {
        return "unknown";
    }
    return level_names[level];
}

int mc_log_level_parse(const char *name, mc_log_level_t *out)
{
    if (!name || !out) {
        return MC_EINVAL;
    }
    for (int i = 0; i <= MC_LOG_TRACE; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (mc_log_level_t)i;
            return 0;
        }
    }
    if (strcasecmp(name, "warning") == 0) {
        *out = MC_LOG_WARN;
        return 0;
    }
    return MC_EINVAL;
}

void mc_logv(mc_log_level_t level, const char *component, const char *fmt, va_list ap)
{
    if ((int)level > atomic_load(&max_level)) {
        return;
    }
    pthread_mutex_lock(&handler_lock);
    mc_log_handler_fn fn = handler_fn;
    void *ud = handler_ud;
    pthread_mutex_unlock(&handler_lock);
    if (!fn) {
        return;
    }
    char line[LOG_LINE_MAX];
    vsnprintf(line, sizeof(line), fmt, ap);
    /* One line per message: a newline inside (e.g. from a server errmsg) would let one
     * message impersonate another in line-oriented log collectors. */
    for (char *p = line; *p; p++) {
        if (*p == '\n' || *p == '\r') {
            *p = ' ';
        }
    }
    fn(level, component ? component : "", line, ud);
}

void mc_log(mc_log_level_t level, const char *component, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_logv(level, component, fmt, ap);
    va_end(ap);
}

bool mc_log_ratelimited(mc_log_ratelimit_t *rl, mc_log_level_t level, const char *component,
                        const char *fmt, ...)
{
    int64_t now = mc__now_ms();
    if (rl && rl->last_ms != 0 && now - rl->last_ms < rl->interval_ms) {
        rl->suppressed++;
        return false;
    }
    char msg[LOG_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (rl && rl->suppressed > 0) {
        mc_log(level, component, "%s (suppressed=%u)", msg, rl->suppressed);
    } else {
        mc_log(level, component, "%s", msg);
    }
    if (rl) {
        rl->last_ms = now;
        rl->suppressed = 0;
    }
    return true;
}

void mc_log_stderr_handler(mc_log_level_t level, const char *component, const char *message,
                           void *userdata)
{
    (void)userdata;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[LOG_LINE_MAX + 128];
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s: %s\n",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000L, mc_log_level_name(level), component,
                     message);
    if (n < 0) {
        return;
    }
    if ((size_t)n >= sizeof(line)) {
        n = (int)sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    /* A single write keeps concurrent lines whole; a short write to a full pipe is dropped,
     * because blocking the caller's thread on a log line is worse than losing it. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

static void mongoc_log_bridge(mongoc_log_level_t level, const char *domain, const char *message,
                              void *userdata)
{
    (void)userdata;
    mc_log_level_t l;
    switch (level) {
    case MONGOC_LOG_LEVEL_ERROR:
    case MONGOC_LOG_LEVEL_CRITICAL: l = MC_LOG_ERROR; break;
    case MONGOC_LOG_LEVEL_WARNING: l = MC_LOG_WARN; break;
    case MONGOC_LOG_LEVEL_MESSAGE: l = MC_LOG_NOTICE; break;
    case MONGOC_LOG_LEVEL_INFO: l = MC_LOG_INFO; break;
    case MONGOC_LOG_LEVEL_DEBUG: l = MC_LOG_DEBUG; break;
    default: l = MC_LOG_TRACE; break;
    }
    mc_log(l, "mongoc", "%s: %s", domain ? domain : "", message ? message : "");
}

void mc_log_capture_mongoc(void)
{
    mongoc_log_set_handler(mongoc_log_bridge, NULL);
}
