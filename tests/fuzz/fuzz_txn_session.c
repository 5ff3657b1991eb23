/*
 * fuzz_txn_session.c: libFuzzer target for the session and transaction rules of
 * mongo-emulator (txn.c): the input, when it is a BSON document, is a command whose lsid,
 * txnNumber, autocommit, startTransaction, readConcern and writeConcern fields any client can
 * send. It goes through the same steps a request does around the command itself: the session
 * checks (emu_session_begin), readConcern for a read (emu_read_at), commit or abort when the
 * command is one, and the after-command step (emu_session_end with its error labels). Seeds live
 * in tests/fuzz/corpus/fuzz_txn_session/.
 *
 * Single-threaded (libFuzzer); one in-process emulator (never listening) keeps its sessions
 * across inputs, so sequences of transaction states get explored. Beyond "no crash, no leak, no
 * hang" it checks the promises: a refused command gets an error reply with a non-zero code, and
 * a command outside a transaction never leaves conn->txn set.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "txn.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static emu_server_t srv;
static emu_conn_t conn;
static bool ready;

static void setup(void)
{
    emu_options_t opts;
    mc_error_t err;
    memset(&opts, 0, sizeof opts);
    if (emu_server_init(&srv, &opts, &err) != 0) {
        fprintf(stderr, "emu_server_init: %s\n", err.message);
        abort();
    }
    conn.srv = &srv;
    ready = true;
}

static int reply_code(const bson_t *reply)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, reply, "code") ? (int)bson_iter_as_int64(&it) : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bson_t cmd;
    bson_iter_t it;
    if (!ready) {
        setup();
    }
    if (size < 5 || size > 65536 || !bson_init_static(&cmd, data, size) ||
        !bson_validate(&cmd, BSON_VALIDATE_NONE, NULL) || !bson_iter_init(&it, &cmd) ||
        !bson_iter_next(&it)) {
        return 0;
    }
    char name[64];
    snprintf(name, sizeof name, "%s", bson_iter_key(&it));
    bson_t reply = BSON_INITIALIZER;
    emu_cmd_session_t cs;
    pthread_mutex_lock(&srv.lock);
    if (emu_session_begin(&conn, name, "db", &cmd, &cs, &reply)) {
        if (!cs.in_txn && conn.txn) {
            abort();
        }
        if (strcmp(name, "commitTransaction") == 0) {
            emu_cmd_commit_transaction(&conn, &cmd, "admin", &reply);
        } else if (strcmp(name, "abortTransaction") == 0) {
            emu_cmd_abort_transaction(&conn, &cmd, "admin", &reply);
        } else if (strcmp(name, "endSessions") == 0) {
            emu_cmd_end_sessions(&conn, &cmd, "admin", &reply);
        } else if (!conn.txn) {
            emu_read_at_t at;
            mc_error_t err;
            if (emu_read_at(&srv, name, &cmd, true, &at, &err) != 0) {
                if (err.domain != MC_DOMAIN_MONGODB || err.cause == 0) {
                    abort();
                }
                emu_reply_error_from(&reply, &err);
            }
        }
        emu_reply_ok(&reply);
        emu_session_end(&conn, name, &cmd, &cs, &reply);
    } else if (reply_code(&reply) == 0) {
        abort();
    }
    if (conn.txn) {
        abort();
    }
    pthread_mutex_unlock(&srv.lock);
    bson_destroy(&reply);
    return 0;
}
