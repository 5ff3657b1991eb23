/*
 * emu_fixture.h: mongo-emulator as a child process, for the unit tests that run the engine end
 * to end (test_engine.c, test_engine_stats.c, test_engine_runners.c, test_recipient_lookup.c),
 * the removal of their checkpoint directories, and reading the tokens stored there. Header-only: each test is one executable.
 *
 * The binary is found through MC_EMULATOR or next to the build tree
 * (tools/mongo-emulator/mongo-emulator relative to the test executable's ../..); a test without
 * it is skipped, not failed. Main thread only.
 */
#ifndef MC_TEST_EMU_FIXTURE_H
#define MC_TEST_EMU_FIXTURE_H

#include <bson/bson.h>
#include <dirent.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Empty when there is no emulator to run. */
static char emu_fixture_path[1024];

/* Looks for the emulator binary; false (and an empty emu_fixture_path) when there is none. */
static inline bool emu_fixture_find(void)
{
    const char *env = getenv("MC_EMULATOR");
    char self[900];
    ssize_t n;
    char *slash;

    emu_fixture_path[0] = '\0';
    if (env) {
        snprintf(emu_fixture_path, sizeof(emu_fixture_path), "%s", env);
    } else if ((n = readlink("/proc/self/exe", self, sizeof(self) - 1)) > 0) {
        self[n] = '\0';
        slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            snprintf(emu_fixture_path, sizeof(emu_fixture_path),
                     "%s/../../tools/mongo-emulator/mongo-emulator", self);
        }
    }
    if (!emu_fixture_path[0] || access(emu_fixture_path, X_OK) != 0) {
        emu_fixture_path[0] = '\0';
        return false;
    }
    return true;
}

/* Starts the emulator on a free port and writes its replica-set URI to `uri`. The emulator
 * prints "listening on 127.0.0.1:PORT" first; --port 0 lets the kernel pick the port, so tests
 * running at the same time never collide. Returns the child's pid, or -1 (nothing left
 * running). */
static inline pid_t emu_fixture_start(char *uri, size_t uri_size)
{
    int fds[2];
    if (pipe(fds) != 0) {
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        FILE *devnull = fopen("/dev/null", "w");
        if (devnull) {
            dup2(fileno(devnull), 2);
        }
        execl(emu_fixture_path, emu_fixture_path, "--port", "0", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    if (pid < 0) {
        close(fds[0]);
        return -1;
    }
    FILE *in = fdopen(fds[0], "r");
    char line[256] = {0};
    int port = 0;
    if (in && fgets(line, sizeof(line), in)) {
        char *colon = strrchr(line, ':');
        port = colon ? atoi(colon + 1) : 0;
    }
    if (in) {
        fclose(in);
    } else {
        close(fds[0]);
    }
    if (port <= 0) {
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        return -1;
    }
    snprintf(uri, uri_size, "mongodb://127.0.0.1:%d/?replicaSet=rs0", port);
    return pid;
}

static inline void emu_fixture_stop(pid_t pid)
{
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
}

/* Removes a test's checkpoint directory and the files in it (one level deep, which is all a
 * file token store writes). A test may have replaced the directory by a file: removed too. */
static inline void emu_fixture_rm_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        unlink(dir);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            char p[400];
            snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
            unlink(p);
        }
    }
    closedir(d);
    rmdir(dir);
}

/* The stored token `_data` of stream `stream` (sink NULL: the stream's own record) or of one
 * of its sinks in file checkpoint store `dir`, into `out`; "" when there is none. */
static inline const char *emu_fixture_stored_token(const char *dir, const char *stream,
                                                   const char *sink, char *out, size_t size)
{
    char path[400];
    snprintf(path, sizeof(path), "%s/%s%s%s.json", dir, stream, sink ? "@" : "",
             sink ? sink : "");
    out[0] = '\0';
    FILE *fp = fopen(path, "r");
    if (!fp) {
        return out;
    }
    char text[8192] = {0};
    size_t n = fread(text, 1, sizeof(text) - 1, fp);
    fclose(fp);
    bson_t doc;
    bson_error_t jerr;
    bson_iter_t it;
    if (n > 0 && bson_init_from_json(&doc, text, -1, &jerr)) {
        if (bson_iter_init(&it, &doc) && bson_iter_find_descendant(&it, "token._data", &it) &&
            BSON_ITER_HOLDS_UTF8(&it)) {
            snprintf(out, size, "%s", bson_iter_utf8(&it, NULL));
        }
        bson_destroy(&doc);
    }
    return out;
}

#endif
