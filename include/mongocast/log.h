/*
 * mongocast/log.h: how libmongocast reports what it does.
 *
 * The library never writes to stdout or stderr itself. Every message goes to one handler
 * set with mc_log_set_handler(); until one is set, messages are discarded. The daemon installs
 * mc_log_stderr_handler (or its own). Each message has a level, a component tag ("engine",
 * "watcher", "checkpoint", "sink.stdout", "store.file", "mongoc", ...) and a one-line text
 * whose identifiers are written as key=value (`stream=orders code=286`). Document bodies are
 * never logged above MC_LOG_DEBUG.
 *
 * Threads: the handler and the level are process-wide (libmongoc's own log handler is too) and
 * may be changed from any thread; the handler is called on whichever thread logs, possibly
 * several at once, so it must be thread-safe. Setting the handler while other threads log is
 * safe: each call uses either the old or the new handler with its own userdata.
 */
#ifndef MONGOCAST_LOG_H
#define MONGOCAST_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Lower value = more severe. A message is passed on when its level <= mc_log_get_level(). */
typedef enum mc_log_level {
    MC_LOG_ERROR = 0,
    MC_LOG_WARN = 1,
    MC_LOG_NOTICE = 2,
    MC_LOG_INFO = 3,
    MC_LOG_DEBUG = 4,
    MC_LOG_TRACE = 5,
} mc_log_level_t;

/*
 * A log handler. `component` and `message` are borrowed and valid only during the call;
 * `message` is one line without a trailing newline. Must not call back into the library's
 * logging (it would recurse) and must be thread-safe.
 */
typedef void (*mc_log_handler_fn)(mc_log_level_t level, const char *component,
                                  const char *message, void *userdata);

/* Installs `fn` (NULL: discard everything). Any thread. */
void mc_log_set_handler(mc_log_handler_fn fn, void *userdata);

/* Sets the most verbose level passed to the handler (default MC_LOG_INFO). Any thread. */
void mc_log_set_level(mc_log_level_t level);
mc_log_level_t mc_log_get_level(void);

/* True when a message at `level` would reach a handler; use it to skip costly formatting. */
bool mc_log_enabled(mc_log_level_t level);

/* "error", "warn", "notice", "info", "debug", "trace". Never NULL. */
const char *mc_log_level_name(mc_log_level_t level);

/* Parses a level name (case-insensitive; "warning" is accepted for warn). Returns 0, or
 * MC_EINVAL when the name is unknown (then *out is unchanged). */
int mc_log_level_parse(const char *name, mc_log_level_t *out);

/* A ready-made handler: "2024-01-02T03:04:05.678Z level component: message\n" on stderr,
 * one write(2) per line so lines from several threads do not interleave. */
void mc_log_stderr_handler(mc_log_level_t level, const char *component, const char *message,
                           void *userdata);

/* Formats and dispatches one message. Messages longer than 1 KiB are truncated. */
void mc_log(mc_log_level_t level, const char *component, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void mc_logv(mc_log_level_t level, const char *component, const char *fmt, va_list ap);

/*
 * Rate limiting for retry loops: at most one message per `interval_ms`; the next message that
 * passes says how many were suppressed ("... (suppressed=12)"). The state is owned by the
 * caller (usually one per retry loop) and is not locked: use one per thread.
 */
typedef struct mc_log_ratelimit {
    int64_t interval_ms; /* minimum spacing between two passed messages */
    int64_t last_ms;     /* monotonic time of the last passed message; 0 = never */
    uint32_t suppressed; /* messages dropped since the last passed one */
} mc_log_ratelimit_t;

#define MC_LOG_RATELIMIT_INIT(ms) {(ms), 0, 0}

/* Like mc_log() but subject to `rl`. Returns true when the message was passed on. */
bool mc_log_ratelimited(mc_log_ratelimit_t *rl, mc_log_level_t level, const char *component,
                        const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Routes libmongoc's own log messages (mongoc_log_set_handler) into this handler under the
 * component "mongoc", mapping their levels. Process-wide; any thread. */
void mc_log_capture_mongoc(void);

#ifdef __cplusplus
}
#endif
#endif
