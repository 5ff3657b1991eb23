/*
 * commands.c: the command dispatcher of mongo-emulator, the connection-level commands
 * (hello/isMaster, ping, buildInfo, endSessions, ...), the cluster clock and the reply helpers.
 *
 * Threads: emu_handle_request runs on a connection thread and takes srv->lock itself; every
 * other function here runs with the lock held (or touches no shared state). Invariants:
 * every reply carries ok; an error reply never has code 0; replica-set replies carry
 * $clusterTime and operationTime exactly once; OP_QUERY only reaches the hello commands.
 */
#include "core.h"

#include "changestream.h"
#include "history.h"
#include "txn.h"

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* A fixed electionId keeps libmongoc from seeing a "stale primary" across emulator restarts. */
static const uint8_t election_id[12] = {0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1};

static int64_t process_start_ms;
static pthread_once_t start_once = PTHREAD_ONCE_INIT;

static void record_start(void)
{
    process_start_ms = emu_now_ms();
}

int64_t emu_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void emu_deadline_after_ms(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int emu_server_error(mc_error_t *err, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    mc_error_vset(err, MC_ESERVER, MC_DOMAIN_MONGODB, code, fmt, ap);
    va_end(ap);
    return MC_ESERVER;
}

/* ---- clock and cursor ids ---- */

void emu_clock_tick(emu_server_t *srv, uint32_t *t, uint32_t *i)
{
    uint32_t now = (uint32_t)time(NULL);

    if (now > srv->clock_secs) {
        srv->clock_secs = now;
        srv->clock_inc = 1;
    } else if (srv->clock_inc == UINT32_MAX) {
        srv->clock_secs++;
        srv->clock_inc = 1;
    } else {
        srv->clock_inc++;
    }
    if (t) {
        *t = srv->clock_secs;
    }
    if (i) {
        *i = srv->clock_inc;
    }
}

void emu_reply_append_cluster_time(emu_server_t *srv, bson_t *reply)
{
    static const uint8_t zero_hash[20] = {0};

    if (!srv->opts.standalone && !bson_has_field(reply, "$clusterTime")) {
        bson_t ct, sig;
        BSON_APPEND_DOCUMENT_BEGIN(reply, "$clusterTime", &ct);
        BSON_APPEND_TIMESTAMP(&ct, "clusterTime", srv->clock_secs, srv->clock_inc);
        BSON_APPEND_DOCUMENT_BEGIN(&ct, "signature", &sig);
        BSON_APPEND_BINARY(&sig, "hash", BSON_SUBTYPE_BINARY, zero_hash, sizeof(zero_hash));
        BSON_APPEND_INT64(&sig, "keyId", 0);
        bson_append_document_end(&ct, &sig);
        bson_append_document_end(reply, &ct);
    }
    /* Kept in standalone mode too: pymongo wants operationTime on an empty aggregate. */
    if (!bson_has_field(reply, "operationTime")) {
        BSON_APPEND_TIMESTAMP(reply, "operationTime", srv->clock_secs, srv->clock_inc);
    }
}

int64_t emu_new_cursor_id(emu_server_t *srv)
{
    /* Multiplying a counter by an odd constant modulo 2^63 is a bijection: ids never repeat,
     * yet they look as arbitrary as a real server's, so no client can come to rely on them
     * being small or sequential. */
    for (;;) {
        uint64_t n = (uint64_t)++srv->next_cursor_id;
        int64_t id = (int64_t)((n * UINT64_C(0x9E3779B97F4A7C15)) & UINT64_C(0x7fffffffffffffff));
        if (id != 0) {
            return id;
        }
    }
}

/* ---- replies ---- */

void emu_reply_ok(bson_t *reply)
{
    if (!bson_has_field(reply, "ok")) {
        BSON_APPEND_DOUBLE(reply, "ok", 1.0);
    }
}

void emu_reply_error(bson_t *reply, int code, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (code == 0) {
        code = 8; /* UnknownError: libmongoc asserts on code 0 */
    }
    bson_reinit(reply);
    BSON_APPEND_DOUBLE(reply, "ok", 0.0);
    BSON_APPEND_UTF8(reply, "errmsg", msg);
    BSON_APPEND_INT32(reply, "code", code);
    BSON_APPEND_UTF8(reply, "codeName", emu_code_name(code));
}

void emu_reply_error_from(bson_t *reply, const mc_error_t *err)
{
    int code;

    if (err->domain == MC_DOMAIN_MONGODB && err->cause != 0) {
        code = err->cause;
    } else if (err->code == MC_EINVAL) {
        code = 2; /* BadValue: what a server answers for a bad query or argument */
    } else if (err->code == MC_ELIMIT) {
        code = 10334;
    } else {
        code = 1;
    }
    emu_reply_error(reply, code, "%s", err->message[0] ? err->message : mc_strerror(err->code));
}

void emu_reply_add_labels(bson_t *reply, const char *const *labels, size_t n)
{
    bson_t arr;
    BSON_APPEND_ARRAY_BEGIN(reply, "errorLabels", &arr);
    for (size_t i = 0; i < n; i++) {
        char keybuf[16];
        const char *key;
        size_t klen = bson_uint32_to_string((uint32_t)i, &key, keybuf, sizeof(keybuf));
        bson_append_utf8(&arr, key, (int)klen, labels[i], -1);
    }
    bson_append_array_end(reply, &arr);
}

void emu_reply_cursor(bson_t *reply, const char *batch_key, const bson_t *batch, int64_t id,
                      const char *ns)
{
    bson_t cur;
    BSON_APPEND_DOCUMENT_BEGIN(reply, "cursor", &cur);
    BSON_APPEND_ARRAY(&cur, batch_key, batch);
    BSON_APPEND_INT64(&cur, "id", id);
    BSON_APPEND_UTF8(&cur, "ns", ns);
    bson_append_document_end(reply, &cur);
}

void emu_reply_parse_error(emu_conn_t *conn, const mc_error_t *err, bson_t *reply)
{
    emu_reply_error_from(reply, err);
    (void)conn;
}

const char *emu_cmd_collection(const bson_t *cmd, bson_t *reply)
{
    bson_iter_t it;
    mc_error_t err;
    const char *name;

    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it)) {
        emu_reply_error(reply, 2, "empty command");
        return NULL;
    }
    if (!BSON_ITER_HOLDS_UTF8(&it)) {
        emu_reply_error(reply, 2, "collection name has invalid type %s",
                        bson_iter_type(&it) == BSON_TYPE_INT32 ? "int" : "non-string");
        return NULL;
    }
    name = bson_iter_utf8(&it, NULL);
    if (emu_check_coll_name(name, &err)) {
        emu_reply_error_from(reply, &err);
        return NULL;
    }
    return name;
}

/* ---- code names ---- */

typedef struct code_name {
    int code;
    const char *name;
} code_name_t;

/* From MongoDB's error_codes.yml; sorted by code for the binary search. */
static const code_name_t code_names[] = {
    {1, "InternalError"},
    {2, "BadValue"},
    {4, "NoSuchKey"},
    {6, "HostUnreachable"},
    {7, "HostNotFound"},
    {8, "UnknownError"},
    {9, "FailedToParse"},
    {10, "CannotMutateObject"},
    {11, "UserNotFound"},
    {12, "UnsupportedFormat"},
    {13, "Unauthorized"},
    {14, "TypeMismatch"},
    {15, "Overflow"},
    {16, "InvalidLength"},
    {17, "ProtocolError"},
    {18, "AuthenticationFailed"},
    {20, "IllegalOperation"},
    {21, "EmptyArrayOperation"},
    {22, "InvalidBSON"},
    {24, "LockTimeout"},
    {26, "NamespaceNotFound"},
    {27, "IndexNotFound"},
    {28, "PathNotViable"},
    {29, "NonExistentPath"},
    {30, "InvalidPath"},
    {40, "ConflictingUpdateOperators"},
    {43, "CursorNotFound"},
    {46, "LockBusy"},
    {47, "NoMatchingDocument"},
    {48, "NamespaceExists"},
    {50, "MaxTimeMSExpired"},
    {52, "DollarPrefixedFieldName"},
    {53, "InvalidIdField"},
    {54, "NotSingleValueField"},
    {55, "InvalidDBRef"},
    {56, "EmptyFieldName"},
    {57, "DottedFieldName"},
    {59, "CommandNotFound"},
    {61, "ShardKeyNotFound"},
    {63, "StaleShardVersion"},
    {64, "WriteConcernFailed"},
    {65, "MultipleErrorsOccurred"},
    {66, "ImmutableField"},
    {67, "CannotCreateIndex"},
    {68, "IndexAlreadyExists"},
    {72, "InvalidOptions"},
    {73, "InvalidNamespace"},
    {76, "NoReplicationEnabled"},
    {79, "UnknownReplWriteConcern"},
    {85, "IndexOptionsConflict"},
    {86, "IndexKeySpecsConflict"},
    {89, "NetworkTimeout"},
    {90, "CallbackCanceled"},
    {91, "ShutdownInProgress"},
    {96, "OperationFailed"},
    {100, "UnsatisfiableWriteConcern"},
    {112, "WriteConflict"},
    {115, "CommandNotSupported"},
    {117, "ConflictingOperationInProgress"},
    {121, "DocumentValidationFailure"},
    {123, "NotAReplicaSet"},
    {125, "CommandFailed"},
    {133, "FailedToSatisfyReadPreference"},
    {134, "ReadConcernMajorityNotAvailableYet"},
    {136, "CappedPositionLost"},
    {143, "CursorInUse"},
    {146, "ExceededMemoryLimit"},
    {150, "StaleEpoch"},
    {166, "CommandNotSupportedOnView"},
    {168, "InvalidPipelineOperator"},
    {175, "QueryPlanKilled"},
    {189, "PrimarySteppedDown"},
    {197, "InvalidIndexSpecificationOption"},
    {202, "NetworkInterfaceExceededTimeLimit"},
    {206, "NoSuchSession"},
    {207, "InvalidUUID"},
    {211, "KeyNotFound"},
    {216, "ElectionInProgress"},
    {223, "IllegalOpMsgFlag"},
    {225, "TransactionTooOld"},
    {233, "TooManyDocumentSequences"},
    {234, "RetryChangeStream"},
    {237, "CursorKilled"},
    {238, "NotImplemented"},
    {239, "SnapshotTooOld"},
    {241, "ConversionFailure"},
    {246, "SnapshotUnavailable"},
    {251, "NoSuchTransaction"},
    {256, "TransactionCommitted"},
    {257, "TransactionTooLarge"},
    {260, "InvalidResumeToken"},
    {262, "ExceededTimeLimit"},
    {263, "OperationNotSupportedInTransaction"},
    {279, "ClientDisconnect"},
    {280, "ChangeStreamFatalError"},
    {286, "ChangeStreamHistoryLost"},
    {290, "TransactionExceededLifetimeLimitSeconds"},
    {292, "QueryExceededMemoryLimitNoDiskUseAllowed"},
    {352, "UnsupportedOpQueryCommand"},
    {9001, "SocketException"},
    {10107, "NotWritablePrimary"},
    {10334, "BSONObjectTooLarge"},
    {11000, "DuplicateKey"},
    {11600, "InterruptedAtShutdown"},
    {11601, "Interrupted"},
    {11602, "InterruptedDueToReplStateChange"},
    {13297, "DatabaseDifferCase"},
    {13388, "StaleConfig"},
    {13435, "NotPrimaryNoSecondaryOk"},
    {13436, "NotPrimaryOrSecondary"},
    {14031, "OutOfDiskSpace"},
    {46841, "ClientMarkedKilled"},
    {50768, "NotARetryableWriteCommand"},
};

const char *emu_code_name(int code)
{
    static _Thread_local char location[32];
    size_t lo = 0, hi = sizeof(code_names) / sizeof(code_names[0]);

    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (code_names[mid].code == code) {
            return code_names[mid].name;
        }
        if (code_names[mid].code < code) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    /* A real server names the codes it raises from source locations "Location<code>". */
    snprintf(location, sizeof(location), "Location%d", code);
    return location;
}

bool emu_code_is_retriable_error(int code)
{
    switch (code) {
    case 6:
    case 7:
    case 89:
    case 91:
    case 134:
    case 189:
    case 262:
    case 9001:
    case 10107:
    case 11600:
    case 11602:
    case 13435:
    case 13436: return true;
    default: return false;
    }
}

bool emu_code_is_resumable_change_stream_error(int code)
{
    if (emu_code_is_retriable_error(code)) {
        return true;
    }
    switch (code) {
    /* NeedRetargettingError (StaleShardVersion was 63 up to 6.0) */
    case 63:
    case 150:
    case 13388:
    /* explicitly resumable */
    case 234:
    case 133: return true;
    default: return false;
    }
}

/* ---- connection-level commands ---- */

static void append_optime(bson_t *doc, const char *key, emu_server_t *srv)
{
    bson_t ot;
    BSON_APPEND_DOCUMENT_BEGIN(doc, key, &ot);
    BSON_APPEND_TIMESTAMP(&ot, "ts", srv->clock_secs, srv->clock_inc);
    BSON_APPEND_INT64(&ot, "t", 1);
    bson_append_document_end(doc, &ot);
}

static const char *first_key(const bson_t *cmd)
{
    bson_iter_t it;
    if (bson_iter_init(&it, cmd) && bson_iter_next(&it)) {
        return bson_iter_key(&it);
    }
    return "";
}

static void cmd_hello(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bool is_hello = strcmp(first_key(cmd), "hello") == 0;
    const char *primary_key = is_hello ? "isWritablePrimary" : "ismaster";
    bson_iter_t it;
    int64_t now = emu_now_ms();

    if (bson_iter_init(&it, cmd) &&
        bson_iter_find_descendant(&it, "client.application.name", &it) &&
        BSON_ITER_HOLDS_UTF8(&it)) {
        bson_strncpy(conn->app_name, bson_iter_utf8(&it, NULL), sizeof(conn->app_name));
    }
    if (!srv->opts.standalone) {
        bson_t arr, lw;
        BSON_APPEND_ARRAY_BEGIN(reply, "hosts", &arr);
        BSON_APPEND_UTF8(&arr, "0", srv->host);
        bson_append_array_end(reply, &arr);
        BSON_APPEND_UTF8(reply, "setName", srv->opts.replset);
        BSON_APPEND_INT32(reply, "setVersion", 1);
        BSON_APPEND_BOOL(reply, primary_key, true);
        BSON_APPEND_BOOL(reply, "secondary", false);
        BSON_APPEND_UTF8(reply, "primary", srv->host);
        BSON_APPEND_UTF8(reply, "me", srv->host);
        {
            bson_oid_t oid;
            bson_oid_init_from_data(&oid, election_id);
            BSON_APPEND_OID(reply, "electionId", &oid);
        }
        BSON_APPEND_DOCUMENT_BEGIN(reply, "lastWrite", &lw);
        append_optime(&lw, "opTime", srv);
        BSON_APPEND_DATE_TIME(&lw, "lastWriteDate", (int64_t)srv->clock_secs * 1000);
        append_optime(&lw, "majorityOpTime", srv);
        BSON_APPEND_DATE_TIME(&lw, "majorityWriteDate", (int64_t)srv->clock_secs * 1000);
        bson_append_document_end(reply, &lw);
    } else {
        BSON_APPEND_BOOL(reply, primary_key, true);
    }
    BSON_APPEND_INT32(reply, "maxBsonObjectSize", EMU_MAX_BSON_SIZE);
    BSON_APPEND_INT32(reply, "maxMessageSizeBytes", EMU_MAX_MESSAGE_SIZE);
    BSON_APPEND_INT32(reply, "maxWriteBatchSize", EMU_MAX_WRITE_BATCH);
    BSON_APPEND_DATE_TIME(reply, "localTime", now);
    BSON_APPEND_INT32(reply, "logicalSessionTimeoutMinutes", 30);
    if (conn->id <= INT32_MAX) {
        BSON_APPEND_INT32(reply, "connectionId", (int32_t)conn->id);
    } else {
        BSON_APPEND_INT64(reply, "connectionId", conn->id);
    }
    BSON_APPEND_INT32(reply, "minWireVersion", 0);
    BSON_APPEND_INT32(reply, "maxWireVersion", srv->opts.max_wire_version);
    BSON_APPEND_BOOL(reply, "readOnly", false);
    if (bson_iter_init_find(&it, cmd, "helloOk") && bson_iter_as_bool(&it)) {
        BSON_APPEND_BOOL(reply, "helloOk", true);
    }
    (void)db;
}

static void cmd_ping(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    (void)conn;
    (void)cmd;
    (void)db;
    (void)reply;
}

static void version_of(const emu_server_t *srv, int v[3])
{
    v[0] = srv->opts.max_wire_version >= 21 ? 7 : 6;
    v[1] = 0;
    v[2] = 0;
}

static void cmd_build_info(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    int v[3];
    char version[32];
    bson_t arr, sub;

    version_of(conn->srv, v);
    snprintf(version, sizeof(version), "%d.%d.%d", v[0], v[1], v[2]);
    BSON_APPEND_UTF8(reply, "version", version);
    BSON_APPEND_UTF8(reply, "gitVersion", "mongo-emulator");
    BSON_APPEND_ARRAY_BEGIN(reply, "versionArray", &arr);
    BSON_APPEND_INT32(&arr, "0", v[0]);
    BSON_APPEND_INT32(&arr, "1", v[1]);
    BSON_APPEND_INT32(&arr, "2", v[2]);
    BSON_APPEND_INT32(&arr, "3", 0);
    bson_append_array_end(reply, &arr);
    BSON_APPEND_UTF8(reply, "javascriptEngine", "none");
    BSON_APPEND_INT32(reply, "bits", 64);
    BSON_APPEND_BOOL(reply, "debug", false);
    BSON_APPEND_INT32(reply, "maxBsonObjectSize", EMU_MAX_BSON_SIZE);
    BSON_APPEND_ARRAY_BEGIN(reply, "storageEngines", &arr);
    BSON_APPEND_UTF8(&arr, "0", "inMemory");
    bson_append_array_end(reply, &arr);
    BSON_APPEND_ARRAY_BEGIN(reply, "modules", &arr);
    bson_append_array_end(reply, &arr);
    BSON_APPEND_DOCUMENT_BEGIN(reply, "openssl", &sub);
    BSON_APPEND_UTF8(&sub, "running", "disabled");
    bson_append_document_end(reply, &sub);
    (void)cmd;
    (void)db;
}

static void cmd_server_status(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    int v[3];
    char version[32];
    int64_t now = emu_now_ms();
    bson_t sub;

    version_of(srv, v);
    snprintf(version, sizeof(version), "%d.%d.%d", v[0], v[1], v[2]);
    BSON_APPEND_UTF8(reply, "host", srv->host);
    BSON_APPEND_UTF8(reply, "version", version);
    BSON_APPEND_UTF8(reply, "process", "mongod");
    BSON_APPEND_INT64(reply, "pid", (int64_t)getpid());
    BSON_APPEND_INT64(reply, "uptime", (now - process_start_ms) / 1000);
    BSON_APPEND_INT64(reply, "uptimeMillis", now - process_start_ms);
    BSON_APPEND_DATE_TIME(reply, "localTime", now);
    if (!srv->opts.standalone) {
        BSON_APPEND_DOCUMENT_BEGIN(reply, "repl", &sub);
        BSON_APPEND_UTF8(&sub, "setName", srv->opts.replset);
        BSON_APPEND_BOOL(&sub, "isWritablePrimary", true);
        BSON_APPEND_UTF8(&sub, "primary", srv->host);
        BSON_APPEND_UTF8(&sub, "me", srv->host);
        bson_append_document_end(reply, &sub);
    }
    (void)cmd;
    (void)db;
}

static void cmd_repl_status(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bson_t arr, m;

    if (srv->opts.standalone) {
        emu_reply_error(reply, 76, "not running with --replSet");
        return;
    }
    BSON_APPEND_UTF8(reply, "set", srv->opts.replset);
    BSON_APPEND_DATE_TIME(reply, "date", emu_now_ms());
    BSON_APPEND_INT32(reply, "myState", 1);
    BSON_APPEND_ARRAY_BEGIN(reply, "members", &arr);
    BSON_APPEND_DOCUMENT_BEGIN(&arr, "0", &m);
    BSON_APPEND_INT32(&m, "_id", 0);
    BSON_APPEND_UTF8(&m, "name", srv->host);
    BSON_APPEND_DOUBLE(&m, "health", 1.0);
    BSON_APPEND_INT32(&m, "state", 1);
    BSON_APPEND_UTF8(&m, "stateStr", "PRIMARY");
    BSON_APPEND_BOOL(&m, "self", true);
    bson_append_document_end(&arr, &m);
    bson_append_array_end(reply, &arr);
    (void)cmd;
    (void)db;
}

static void cmd_connection_status(emu_conn_t *conn, const bson_t *cmd, const char *db,
                                  bson_t *reply)
{
    bson_t ai, arr;
    BSON_APPEND_DOCUMENT_BEGIN(reply, "authInfo", &ai);
    BSON_APPEND_ARRAY_BEGIN(&ai, "authenticatedUsers", &arr);
    bson_append_array_end(&ai, &arr);
    BSON_APPEND_ARRAY_BEGIN(&ai, "authenticatedUserRoles", &arr);
    bson_append_array_end(&ai, &arr);
    bson_append_document_end(reply, &ai);
    (void)conn;
    (void)cmd;
    (void)db;
}

/* The server parameters the emulator honours: the snapshot history window (SnapshotTooOld
 * tests shrink it, as they do on a real server) and the transaction lifetime. */
typedef struct param {
    const char *name;
    int64_t min;
    int64_t (*get)(emu_server_t *srv);
    int64_t (*set)(emu_server_t *srv, int64_t v); /* returns the previous value */
} param_t;

static const param_t params[] = {
    {"minSnapshotHistoryWindowInSeconds", 0, emu_history_window, emu_history_set_window},
    {"transactionLifetimeLimitSeconds", 1, emu_txn_lifetime, emu_txn_set_lifetime},
};

static const param_t *find_param(const char *name)
{
    for (size_t k = 0; k < sizeof params / sizeof params[0]; k++) {
        if (strcmp(params[k].name, name) == 0) {
            return &params[k];
        }
    }
    return NULL;
}

static void cmd_set_parameter(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it;
    const param_t *p = NULL;
    int64_t v = 0;
    (void)db;
    bson_iter_init(&it, cmd);
    bson_iter_next(&it); /* setParameter: 1 */
    while (bson_iter_next(&it)) {
        const char *k = bson_iter_key(&it);
        if (k[0] == '$' || strcmp(k, "lsid") == 0 || strcmp(k, "comment") == 0) {
            continue;
        }
        p = find_param(k);
        if (!p) {
            emu_reply_error(reply, 72,
                            "attempted to set unrecognized parameter [%s], use help:true to see "
                            "options ",
                            k);
            return;
        }
        if (!BSON_ITER_HOLDS_NUMBER(&it) || (v = bson_iter_as_int64(&it)) < p->min) {
            emu_reply_error(reply, 2, "Invalid value for parameter %s: must be a number >= %lld", k,
                            (long long)p->min);
            return;
        }
        break;
    }
    if (!p) {
        emu_reply_error(reply, 72, "no option found to set, use help:true to see options ");
        return;
    }
    BSON_APPEND_INT64(reply, "was", p->set(conn->srv, v));
}

static void cmd_get_parameter(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it;
    bool all = false;
    (void)db;
    if (bson_iter_init(&it, cmd) && bson_iter_next(&it) && BSON_ITER_HOLDS_UTF8(&it)) {
        all = strcmp(bson_iter_utf8(&it, NULL), "*") == 0;
    }
    for (size_t k = 0; k < sizeof params / sizeof params[0]; k++) {
        if (all || bson_has_field(cmd, params[k].name)) {
            BSON_APPEND_INT64(reply, params[k].name, params[k].get(conn->srv));
        }
    }
    if (!all && bson_count_keys(reply) == 0) {
        emu_reply_error(reply, 72, "no option found to get");
    }
}

/* A stage that only a change stream accepts, in an ordinary aggregate. */
static bool refuse_split_stage(const bson_t *cmd, bson_t *reply)
{
    bson_iter_t it, stage;
    if (!bson_iter_init_find(&it, cmd, "pipeline") || !BSON_ITER_HOLDS_ARRAY(&it) ||
        !bson_iter_recurse(&it, &stage)) {
        return false;
    }
    while (bson_iter_next(&stage)) {
        bson_iter_t k;
        if (BSON_ITER_HOLDS_DOCUMENT(&stage) && bson_iter_recurse(&stage, &k) &&
            bson_iter_next(&k) && strcmp(bson_iter_key(&k), "$changeStreamSplitLargeEvent") == 0) {
            bson_iter_t spec;
            if (!BSON_ITER_HOLDS_DOCUMENT(&k) || !bson_iter_recurse(&k, &spec) ||
                bson_iter_next(&spec)) {
                emu_reply_error(reply, 7182800,
                                "$changeStreamSplitLargeEvent spec should be an empty object");
            } else {
                emu_reply_error(reply, 20,
                                "$changeStreamSplitLargeEvent can only be used in a $changeStream "
                                "pipeline");
            }
            return true;
        }
    }
    return false;
}

static void cmd_truncate_oplog(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_cs_truncate_oplog(conn, cmd, reply);
    (void)db;
}

static void cmd_aggregate(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it, stage;

    /* $changeStream anywhere but first: refused before either pipeline engine sees it */
    if (bson_iter_init_find(&it, cmd, "pipeline") && BSON_ITER_HOLDS_ARRAY(&it) &&
        bson_iter_recurse(&it, &stage) && bson_iter_next(&stage)) {
        while (bson_iter_next(&stage)) {
            bson_iter_t k;
            if (BSON_ITER_HOLDS_DOCUMENT(&stage) && bson_iter_recurse(&stage, &k) &&
                bson_iter_next(&k) && strcmp(bson_iter_key(&k), "$changeStream") == 0) {
                emu_reply_error(reply, 40602,
                                "$changeStream is only valid as the first stage in a pipeline");
                return;
            }
        }
    }

    if (bson_iter_init_find(&it, cmd, "pipeline") && BSON_ITER_HOLDS_ARRAY(&it) &&
        bson_iter_recurse(&it, &stage) && bson_iter_next(&stage) &&
        BSON_ITER_HOLDS_DOCUMENT(&stage)) {
        bson_iter_t first;
        if (bson_iter_recurse(&stage, &first) && bson_iter_next(&first) &&
            strcmp(bson_iter_key(&first), "$changeStream") == 0) {
            if (conn->srv->opts.standalone) {
                emu_reply_error(reply, 40573,
                                "The $changeStream stage is only supported on replica sets");
                return;
            }
            if (conn->txn) {
                emu_reply_error(reply, 263,
                                "Stage not supported inside of a multi-document transaction: "
                                "$changeStream");
                return;
            }
            emu_cs_aggregate(conn, cmd, db, reply);
            return;
        }
    }
    if (refuse_split_stage(cmd, reply)) {
        return;
    }
    emu_cmd_aggregate(conn, cmd, db, reply);
}

static void cmd_get_more(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it;

    if (!bson_iter_init(&it, cmd) || !bson_iter_next(&it) || !BSON_ITER_HOLDS_INT(&it)) {
        emu_reply_error(reply, 14,
                        "BSON field 'getMore.getMore' is the wrong type, expected "
                        "type 'long'");
        return;
    }
    if (emu_cs_owns_cursor(conn->srv, bson_iter_as_int64(&it))) {
        emu_cs_getmore(conn, cmd, db, reply);
        return;
    }
    emu_cmd_get_more(conn, cmd, db, reply);
}

/* ---- dispatch ---- */

enum {
    CMD_OP_QUERY = 1,   /* may arrive over OP_QUERY (the handshake) */
    CMD_ADMIN_ONLY = 2, /* only on the admin database */
};

typedef struct command {
    const char *name;
    emu_cmd_fn fn;
    int flags;
} command_t;

static const command_t commands[] = {
    {"hello", cmd_hello, CMD_OP_QUERY},
    {"isMaster", cmd_hello, CMD_OP_QUERY},
    {"ismaster", cmd_hello, CMD_OP_QUERY},
    {"ping", cmd_ping, 0},
    {"buildInfo", cmd_build_info, 0},
    {"buildinfo", cmd_build_info, 0},
    {"endSessions", emu_cmd_end_sessions, 0},
    {"killSessions", emu_cmd_end_sessions, 0},
    {"refreshSessions", cmd_ping, 0},
    {"killAllSessions", cmd_ping, 0},
    {"serverStatus", cmd_server_status, 0},
    {"replSetGetStatus", cmd_repl_status, CMD_ADMIN_ONLY},
    {"connectionStatus", cmd_connection_status, 0},
    {"insert", emu_cmd_insert, 0},
    {"update", emu_cmd_update, 0},
    {"delete", emu_cmd_delete, 0},
    {"find", emu_cmd_find, 0},
    {"getMore", cmd_get_more, 0},
    {"killCursors", emu_cmd_kill_cursors, 0},
    {"findAndModify", emu_cmd_find_and_modify, 0},
    {"findandmodify", emu_cmd_find_and_modify, 0},
    {"count", emu_cmd_count, 0},
    {"distinct", emu_cmd_distinct, 0},
    {"aggregate", cmd_aggregate, 0},
    {"create", emu_cmd_create, 0},
    {"collMod", emu_cmd_coll_mod, 0},
    {"drop", emu_cmd_drop, 0},
    {"dropDatabase", emu_cmd_drop_database, 0},
    {"renameCollection", emu_cmd_rename, CMD_ADMIN_ONLY},
    {"listCollections", emu_cmd_list_collections, 0},
    {"listDatabases", emu_cmd_list_databases, CMD_ADMIN_ONLY},
    {"createIndexes", emu_cmd_create_indexes, 0},
    {"listIndexes", emu_cmd_list_indexes, 0},
    {"dropIndexes", emu_cmd_drop_indexes, 0},
    {"deleteIndexes", emu_cmd_drop_indexes, 0},
    {"collStats", emu_cmd_coll_stats, 0},
    {"dbStats", emu_cmd_db_stats, 0},
    {"configureFailPoint", emu_cmd_configure_fail_point, CMD_ADMIN_ONLY},
    {"emulatorTruncateOplog", cmd_truncate_oplog, 0},
    {"commitTransaction", emu_cmd_commit_transaction, CMD_ADMIN_ONLY},
    {"abortTransaction", emu_cmd_abort_transaction, CMD_ADMIN_ONLY},
    {"setParameter", cmd_set_parameter, CMD_ADMIN_ONLY},
    {"getParameter", cmd_get_parameter, CMD_ADMIN_ONLY},
};

static const command_t *find_command(const char *name)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(commands[i].name, name) == 0) {
            return &commands[i];
        }
    }
    return NULL;
}

static void dispatch(emu_conn_t *conn, const emu_wire_request_t *req, const char *name,
                     bson_t *reply)
{
    const command_t *c = find_command(name);
    bool op_query = req->header.opcode == EMU_OPCODE_QUERY;

    if (op_query && !req->is_command) {
        emu_reply_error(reply, 352,
                        "OP_QUERY is no longer supported for queries; use the "
                        "find command");
        return;
    }
    if (!c) {
        emu_reply_error(reply, 59, "no such command: '%s'", name);
        return;
    }
    if (op_query && !(c->flags & CMD_OP_QUERY)) {
        emu_reply_error(reply, 352,
                        "Unsupported OP_QUERY command: %s. The client driver may require an "
                        "upgrade. For more details see "
                        "https://dochub.mongodb.org/core/legacy-opcode-removal",
                        name);
        return;
    }
    if ((c->flags & CMD_ADMIN_ONLY) && strcmp(req->db, "admin") != 0) {
        emu_reply_error(reply, 13, "%s may only be run against the admin database.", name);
        return;
    }
    emu_cmd_session_t cs;
    if (!emu_session_begin(conn, name, req->db, &req->body, &cs, reply)) {
        emu_add_txn_error_labels(name, &req->body, reply);
        return;
    }
    if (emu_catalog_refuse_view(conn->srv, name, req->db, &req->body, reply)) {
        return;
    }
    c->fn(conn, &req->body, req->db, reply);
    emu_reply_ok(reply);
    emu_session_end(conn, name, &req->body, &cs, reply);
}

static void sleep_ms(emu_server_t *srv, int ms)
{
    /* In slices, so that shutdown does not wait for a long blockTimeMS. */
    while (ms > 0) {
        int slice = ms > 50 ? 50 : ms;
        struct timespec ts = {0, (long)slice * 1000000L};
        bool stop;
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        ms -= slice;
        pthread_mutex_lock(&srv->lock);
        stop = srv->shutting_down;
        pthread_mutex_unlock(&srv->lock);
        if (stop) {
            return;
        }
    }
}

emu_handle_result_t emu_handle_request(emu_conn_t *conn, const emu_wire_request_t *req,
                                       bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    const char *name = first_key(&req->body);
    emu_fp_decision_t d;
    emu_handle_result_t result = EMU_HANDLE_REPLY;

    pthread_once(&start_once, record_start);
    emu_log_doc(srv, conn, "in", req->header.opcode, &req->body);

    pthread_mutex_lock(&srv->lock);
    emu_failpoint_check(conn, name, req->db, &req->body, &d);
    if (d.block_ms > 0) {
        pthread_mutex_unlock(&srv->lock);
        sleep_ms(srv, d.block_ms);
        pthread_mutex_lock(&srv->lock);
    }
    if (d.action == EMU_FP_CLOSE) {
        result = EMU_HANDLE_CLOSE;
    } else if (d.action == EMU_FP_ERROR) {
        bson_concat(reply, &d.error);
    } else {
        dispatch(conn, req, name, reply);
        if (d.write_concern_error) {
            BSON_APPEND_DOCUMENT(reply, "writeConcernError", &d.wce);
        }
        if (conn->close_after_reply) {
            conn->close_after_reply = false;
            result = EMU_HANDLE_CLOSE;
        }
    }
    if (result == EMU_HANDLE_REPLY) {
        emu_reply_append_cluster_time(srv, reply);
    }
    pthread_mutex_unlock(&srv->lock);
    emu_fp_decision_cleanup(&d);

    if (result == EMU_HANDLE_CLOSE) {
        emu_log_event(srv, conn, "closing connection (fail point) on %s", name);
    } else {
        emu_log_doc(srv, conn, "out",
                    req->header.opcode == EMU_OPCODE_QUERY ? EMU_OPCODE_REPLY : EMU_OPCODE_MSG,
                    reply);
    }
    return result;
}
