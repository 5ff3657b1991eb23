/*
 * failpoint.c: the configureFailPoint command and the two fail points drivers' tests use,
 * failCommand and failGetMoreAfterCursorCheckout, with mongod's semantics (modes alwaysOn,
 * off, {times}, {skip}, {activationProbability}; data.failCommands, errorCode, errorLabels,
 * closeConnection, blockConnection/blockTimeMS, writeConcernError, appName, namespace).
 *
 * Runs on connection threads with srv->lock held. Invariants: configureFailPoint never fails
 * (unknown fail points and odd modes are accepted, as harmless no-ops); a fail point's counters
 * move only when a command matches all its conditions; an error made here never has code 0.
 * Labels: errorLabels from the data are used verbatim ([] means none); otherwise failCommand
 * on a getMore gets none (the cursor is not checked out yet, so the server cannot tell it is a
 * change stream), while failGetMoreAfterCursorCheckout gets the server-computed ones.
 */
#include "core.h"

#include "txn.h"

#include <string.h>

#define MAX_BLOCK_MS (10 * 60 * 1000)

typedef enum fp_mode {
    FP_OFF,
    FP_ALWAYS,
    FP_TIMES,
    FP_SKIP,
    FP_PROBABILITY,
} fp_mode_t;

typedef struct fp {
    fp_mode_t mode;
    int64_t remaining; /* times left (FP_TIMES) or commands still to let through (FP_SKIP) */
    double probability;
    bson_t data;
    int64_t entered; /* how often it fired since it was last configured */
} fp_t;

struct emu_failpoints {
    fp_t fail_command;
    fp_t after_checkout;
    uint64_t rng;
};

emu_failpoints_t *emu_failpoints_new(void)
{
    emu_failpoints_t *fps = emu_zalloc_aligned(sizeof(*fps));
    bson_init(&fps->fail_command.data);
    bson_init(&fps->after_checkout.data);
    fps->rng = UINT64_C(0x2545F4914F6CDD1D);
    return fps;
}

void emu_failpoints_destroy(emu_failpoints_t *fps)
{
    if (!fps) {
        return;
    }
    bson_destroy(&fps->fail_command.data);
    bson_destroy(&fps->after_checkout.data);
    free(fps);
}

static double next_unit(emu_failpoints_t *fps)
{
    fps->rng ^= fps->rng >> 12;
    fps->rng ^= fps->rng << 25;
    fps->rng ^= fps->rng >> 27;
    return (double)((fps->rng * UINT64_C(2685821657736338717)) >> 11) / 9007199254740992.0;
}

static void parse_mode(fp_t *fp, const bson_t *cmd)
{
    bson_iter_t it, sub;

    fp->mode = FP_OFF;
    if (!bson_iter_init_find(&it, cmd, "mode")) {
        return;
    }
    if (BSON_ITER_HOLDS_UTF8(&it)) {
        const char *m = bson_iter_utf8(&it, NULL);
        fp->mode = strcmp(m, "alwaysOn") == 0 ? FP_ALWAYS : FP_OFF;
        return;
    }
    if (!BSON_ITER_HOLDS_DOCUMENT(&it) || !bson_iter_recurse(&it, &sub) || !bson_iter_next(&sub)) {
        return;
    }
    if (strcmp(bson_iter_key(&sub), "times") == 0 && BSON_ITER_HOLDS_NUMBER(&sub)) {
        fp->remaining = bson_iter_as_int64(&sub);
        fp->mode = fp->remaining > 0 ? FP_TIMES : FP_OFF;
    } else if (strcmp(bson_iter_key(&sub), "skip") == 0 && BSON_ITER_HOLDS_NUMBER(&sub)) {
        fp->remaining = bson_iter_as_int64(&sub);
        fp->mode = FP_SKIP;
    } else if (strcmp(bson_iter_key(&sub), "activationProbability") == 0 &&
               BSON_ITER_HOLDS_NUMBER(&sub)) {
        fp->probability = bson_iter_as_double(&sub);
        fp->mode = fp->probability > 0 ? FP_PROBABILITY : FP_OFF;
    }
}

/* Appends the fields of the sub-document `src.key` to `dst`; false when there is none. */
static bool copy_doc_field(const bson_t *src, const char *key, bson_t *dst)
{
    bson_iter_t it;
    const uint8_t *d;
    uint32_t l;
    bson_t sub;
    if (!bson_iter_init_find(&it, src, key) || !BSON_ITER_HOLDS_DOCUMENT(&it)) {
        return false;
    }
    bson_iter_document(&it, &l, &d);
    return bson_init_static(&sub, d, l) && bson_concat(dst, &sub);
}

void emu_cmd_configure_fail_point(emu_conn_t *conn, const bson_t *cmd, const char *db,
                                  bson_t *reply)
{
    emu_failpoints_t *fps = conn->srv->failpoints;
    bson_iter_t it;
    const char *name = "";
    fp_t *fp = NULL;

    if (bson_iter_init(&it, cmd) && bson_iter_next(&it) && BSON_ITER_HOLDS_UTF8(&it)) {
        name = bson_iter_utf8(&it, NULL);
    }
    if (strcmp(name, "failCommand") == 0) {
        fp = &fps->fail_command;
    } else if (strcmp(name, "failGetMoreAfterCursorCheckout") == 0) {
        fp = &fps->after_checkout;
    }
    if (!fp) {
        /* Other mongod fail points do not exist here: accepting them keeps test setup code
         * that toggles them working, and they simply never fire. */
        BSON_APPEND_INT64(reply, "count", 0);
        return;
    }
    BSON_APPEND_INT64(reply, "count", fp->entered);
    fp->entered = 0;
    parse_mode(fp, cmd);
    bson_reinit(&fp->data);
    copy_doc_field(cmd, "data", &fp->data);
    (void)db;
}

/* Consumes one activation; false when the mode lets this command through. */
static bool fire(emu_failpoints_t *fps, fp_t *fp)
{
    switch (fp->mode) {
    case FP_ALWAYS: return true;
    case FP_TIMES:
        if (--fp->remaining <= 0) {
            fp->mode = FP_OFF;
        }
        return true;
    case FP_SKIP:
        if (fp->remaining > 0) {
            fp->remaining--;
            return false;
        }
        return true;
    case FP_PROBABILITY: return next_unit(fps) < fp->probability;
    default: return false;
    }
}

static bool data_string_eq(const bson_t *data, const char *key, const char *value, bool *present)
{
    bson_iter_t it;
    *present = bson_iter_init_find(&it, data, key);
    return *present && BSON_ITER_HOLDS_UTF8(&it) && strcmp(bson_iter_utf8(&it, NULL), value) == 0;
}

static bool lists_command(const bson_t *data, const char *name)
{
    bson_iter_t it, el;
    if (!bson_iter_init_find(&it, data, "failCommands") || !BSON_ITER_HOLDS_ARRAY(&it) ||
        !bson_iter_recurse(&it, &el)) {
        return false;
    }
    while (bson_iter_next(&el)) {
        if (BSON_ITER_HOLDS_UTF8(&el) && strcmp(bson_iter_utf8(&el, NULL), name) == 0) {
            return true;
        }
    }
    return false;
}

static bool app_matches(const bson_t *data, const emu_conn_t *conn)
{
    bool present;
    bool eq = data_string_eq(data, "appName", conn->app_name, &present);
    return !present || eq;
}

static int data_int(const bson_t *data, const char *key, int dflt)
{
    bson_iter_t it;
    if (bson_iter_init_find(&it, data, key) && BSON_ITER_HOLDS_NUMBER(&it)) {
        int64_t v = bson_iter_as_int64(&it);
        return v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : (int)v;
    }
    return dflt;
}

static bool data_bool(const bson_t *data, const char *key)
{
    bson_iter_t it;
    return bson_iter_init_find(&it, data, key) && bson_iter_as_bool(&it);
}

/* errorLabels from the data, verbatim. True when the data has the field at all. */
static bool append_given_labels(const bson_t *data, bson_t *reply)
{
    bson_iter_t it;
    if (!bson_iter_init_find(&it, data, "errorLabels")) {
        return false;
    }
    if (BSON_ITER_HOLDS_ARRAY(&it)) {
        const uint8_t *d;
        uint32_t l;
        bson_t arr;
        bson_iter_array(&it, &l, &d);
        if (bson_init_static(&arr, d, l) && !bson_empty(&arr)) {
            BSON_APPEND_ARRAY(reply, "errorLabels", &arr);
        }
    }
    return true;
}

static bool is_change_stream_aggregate(const char *name, const bson_t *cmd)
{
    bson_iter_t it;
    return strcmp(name, "aggregate") == 0 && bson_iter_init(&it, cmd) &&
           bson_iter_find_descendant(&it, "pipeline.0.$changeStream", &it);
}

static void append_computed_labels(const char *name, const bson_t *cmd, int code, bson_t *reply)
{
    const char *label = NULL;

    if (is_change_stream_aggregate(name, cmd)) {
        if (emu_code_is_resumable_change_stream_error(code)) {
            label = "ResumableChangeStreamError";
        } else if (code == 280 || code == 286) {
            label = "NonResumableChangeStreamError";
        }
        if (label) {
            emu_reply_add_labels(reply, &label, 1);
        }
        return;
    }
    /* TransientTransactionError and RetryableWriteError, computed as for any other error. */
    emu_add_txn_error_labels(name, cmd, reply);
}

void emu_failpoint_check(emu_conn_t *conn, const char *name, const char *db, const bson_t *cmd,
                         emu_fp_decision_t *d)
{
    emu_failpoints_t *fps = conn->srv->failpoints;
    fp_t *fp = &fps->fail_command;
    const bson_t *data = &fp->data;
    bool present;

    memset(d, 0, sizeof(*d));
    bson_init(&d->error);
    bson_init(&d->wce);
    if (fp->mode == FP_OFF || strcmp(name, "configureFailPoint") == 0 ||
        !lists_command(data, name) || !app_matches(data, conn)) {
        return;
    }
    {
        bson_iter_t it;
        char ns[400] = "";
        if (bson_iter_init(&it, cmd) && bson_iter_next(&it) && BSON_ITER_HOLDS_UTF8(&it)) {
            snprintf(ns, sizeof(ns), "%s.%s", db, bson_iter_utf8(&it, NULL));
        }
        if (!data_string_eq(data, "namespace", ns, &present) && present) {
            return;
        }
    }
    if (!fire(fps, fp)) {
        return;
    }
    fp->entered++;
    if (data_bool(data, "blockConnection")) {
        int ms = data_int(data, "blockTimeMS", 0);
        d->block_ms = ms < 0 ? 0 : ms > MAX_BLOCK_MS ? MAX_BLOCK_MS : ms;
    }
    if (data_bool(data, "closeConnection")) {
        d->action = EMU_FP_CLOSE;
    } else if (bson_has_field(data, "errorCode")) {
        int code = data_int(data, "errorCode", 8);
        d->action = EMU_FP_ERROR;
        emu_reply_error(&d->error, code, "Failing command via 'failCommand' failpoint");
        if (!append_given_labels(data, &d->error) && strcmp(name, "getMore") != 0) {
            append_computed_labels(name, cmd, code ? code : 8, &d->error);
        }
    } else {
        d->write_concern_error = copy_doc_field(data, "writeConcernError", &d->wce);
    }
}

void emu_fp_decision_cleanup(emu_fp_decision_t *d)
{
    bson_destroy(&d->error);
    bson_destroy(&d->wce);
}

emu_fp_action_t emu_failpoint_after_checkout(emu_conn_t *conn, bson_t *reply)
{
    emu_failpoints_t *fps = conn->srv->failpoints;
    fp_t *fp = &fps->after_checkout;
    const bson_t *data = &fp->data;
    int code;

    if (fp->mode == FP_OFF || !app_matches(data, conn) ||
        (bson_has_field(data, "failCommands") && !lists_command(data, "getMore"))) {
        return EMU_FP_NONE;
    }
    if (!fire(fps, fp)) {
        return EMU_FP_NONE;
    }
    fp->entered++;
    if (data_bool(data, "closeConnection")) {
        return EMU_FP_CLOSE;
    }
    if (!bson_has_field(data, "errorCode")) {
        return EMU_FP_NONE;
    }
    code = data_int(data, "errorCode", 8);
    code = code ? code : 8;
    emu_reply_error(reply, code, "Hit the 'failGetMoreAfterCursorCheckout' failpoint");
    if (!append_given_labels(data, reply)) {
        const char *label = NULL;
        if (emu_code_is_resumable_change_stream_error(code)) {
            label = "ResumableChangeStreamError";
        } else if (code == 280 || code == 286) {
            label = "NonResumableChangeStreamError";
        }
        if (label) {
            emu_reply_add_labels(reply, &label, 1);
        }
    }
    return EMU_FP_ERROR;
}
