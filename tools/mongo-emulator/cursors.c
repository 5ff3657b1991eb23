/*
 * cursors.c: cursors of find, aggregate (without $changeStream), listCollections and
 * listIndexes, with the getMore and killCursors commands that serve them (change-stream
 * cursors live in changestream.c; getMore and killCursors ask it first).
 *
 * Runs on connection threads with srv->lock held. A cursor owns the rest of its result set
 * as one buffer of concatenated BSON documents (produced by the emulator itself, so valid),
 * which keeps a large result to one allocation. Invariants: at most MAX_CURSORS cursors are
 * open (the least recently used one is dropped to make room, and cursors idle for longer than
 * CURSOR_IDLE_MS are reaped, as mongod's 10-minute cursor timeout does); a cursor with nothing
 * left is freed as soon as its last batch is built, and replies then carry id 0.
 */
#include "core.h"

#include "changestream.h"

#include <string.h>

#define MAX_CURSORS 4096
#define CURSOR_IDLE_MS (10 * 60 * 1000)
#define DEFAULT_FIRST_BATCH 101
/* A batch stops growing at the server's maximum user document size. */
#define BATCH_MAX_BYTES (16 * 1024 * 1024)

typedef struct cursor {
    int64_t id;
    char *ns;
    bool has_at; /* a snapshot read: every batch says at which cluster time */
    uint32_t at_t;
    uint32_t at_i;
    uint8_t *buf;
    size_t len;
    size_t pos;
    int64_t last_used_ms;
    struct cursor *next;
} cursor_t;

struct emu_cursors {
    cursor_t *head;
    size_t count;
};

bool emu_bytes_append(emu_bytes_t *b, const void *p, size_t n)
{
    if (n > EMU_BYTES_MAX - b->len) {
        return false;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        uint8_t *np;
        while (cap < b->len + n) {
            cap *= 2;
        }
        np = realloc(b->data, cap);
        if (!np) {
            return false;
        }
        b->data = np;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return true;
}

void emu_bytes_free(emu_bytes_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

emu_cursors_t *emu_cursors_new(void)
{
    return bson_malloc0(sizeof(emu_cursors_t));
}

static void cursor_free(cursor_t *c)
{
    free(c->buf);
    bson_free(c->ns);
    bson_free(c);
}

void emu_cursors_destroy(emu_cursors_t *cs)
{
    if (!cs) {
        return;
    }
    while (cs->head) {
        cursor_t *n = cs->head->next;
        cursor_free(cs->head);
        cs->head = n;
    }
    bson_free(cs);
}

static void unlink_cursor(emu_cursors_t *cs, cursor_t *c)
{
    for (cursor_t **p = &cs->head; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            cs->count--;
            return;
        }
    }
}

static void reap(emu_cursors_t *cs, int64_t now)
{
    cursor_t **p = &cs->head;
    while (*p) {
        cursor_t *c = *p;
        if (now - c->last_used_ms > CURSOR_IDLE_MS) {
            *p = c->next;
            cs->count--;
            cursor_free(c);
        } else {
            p = &c->next;
        }
    }
    if (cs->count >= MAX_CURSORS) {
        cursor_t *oldest = cs->head;
        for (cursor_t *c = cs->head; c; c = c->next) {
            if (c->last_used_ms < oldest->last_used_ms) {
                oldest = c;
            }
        }
        unlink_cursor(cs, oldest);
        cursor_free(oldest);
    }
}

/* Appends documents from buf[pos..len) to the array `arr` until max_docs (< 0: unlimited)
 * or the byte budget is reached; returns the new position. */
static size_t fill_batch(bson_t *arr, const uint8_t *buf, size_t len, size_t pos, long max_docs)
{
    uint32_t n = 0;
    size_t bytes = 0;

    while (pos + 4 <= len && (max_docs < 0 || (long)n < max_docs)) {
        uint32_t dlen;
        bson_t doc;
        char keybuf[16];
        const char *key;
        size_t klen;

        memcpy(&dlen, buf + pos, 4);
        dlen = BSON_UINT32_FROM_LE(dlen);
        if (n > 0 && bytes + dlen > BATCH_MAX_BYTES) {
            break;
        }
        if (dlen < 5 || dlen > len - pos || !bson_init_static(&doc, buf + pos, dlen)) {
            return len; /* cannot happen: the buffer holds documents we built */
        }
        klen = bson_uint32_to_string(n, &key, keybuf, sizeof(keybuf));
        bson_append_document(arr, key, (int)klen, &doc);
        bytes += dlen;
        pos += dlen;
        n++;
    }
    return pos;
}

void emu_cursor_reply_first(emu_server_t *srv, const char *ns, uint8_t *docs, size_t len,
                            long batch_size, bool single_batch, bson_t *reply)
{
    emu_cursor_reply_first_at(srv, ns, docs, len, batch_size, single_batch, NULL, reply);
}

void emu_cursor_reply_first_at(emu_server_t *srv, const char *ns, uint8_t *docs, size_t len,
                               long batch_size, bool single_batch, const uint32_t *at,
                               bson_t *reply)
{
    bson_t cur, arr;
    size_t pos;
    int64_t id = 0;
    long max_docs = batch_size < 0 ? DEFAULT_FIRST_BATCH : batch_size;

    if (single_batch) {
        max_docs = batch_size <= 0 ? -1 : batch_size;
    }
    BSON_APPEND_DOCUMENT_BEGIN(reply, "cursor", &cur);
    BSON_APPEND_ARRAY_BEGIN(&cur, "firstBatch", &arr);
    pos = fill_batch(&arr, docs, len, 0, max_docs);
    bson_append_array_end(&cur, &arr);
    if (pos < len && !single_batch) {
        cursor_t *c = bson_malloc0(sizeof(*c));
        int64_t now = emu_now_ms();
        reap(srv->cursors, now);
        c->id = emu_new_cursor_id(srv);
        c->ns = bson_strdup(ns);
        c->buf = docs;
        c->len = len;
        c->pos = pos;
        c->last_used_ms = now;
        if (at) {
            c->has_at = true;
            c->at_t = at[0];
            c->at_i = at[1];
        }
        c->next = srv->cursors->head;
        srv->cursors->head = c;
        srv->cursors->count++;
        id = c->id;
        docs = NULL;
    }
    free(docs);
    if (at) {
        BSON_APPEND_TIMESTAMP(&cur, "atClusterTime", at[0], at[1]);
    }
    BSON_APPEND_INT64(&cur, "id", id);
    BSON_APPEND_UTF8(&cur, "ns", ns);
    bson_append_document_end(reply, &cur);
}

void emu_cmd_get_more(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    emu_server_t *srv = conn->srv;
    bson_iter_t it;
    int64_t id;
    const char *coll = NULL;
    long batch = -1;
    cursor_t *c;
    char ns[400];
    bson_t cur, arr;

    bson_iter_init(&it, cmd);
    bson_iter_next(&it);
    id = bson_iter_as_int64(&it);
    if (bson_iter_init_find(&it, cmd, "collection") && BSON_ITER_HOLDS_UTF8(&it)) {
        coll = bson_iter_utf8(&it, NULL);
    }
    if (!coll) {
        emu_reply_error(reply, 40414,
                        "BSON field 'getMore.collection' is missing but a "
                        "required field");
        return;
    }
    if (bson_iter_init_find(&it, cmd, "batchSize") && BSON_ITER_HOLDS_NUMBER(&it)) {
        int64_t b = bson_iter_as_int64(&it);
        if (b < 0) {
            emu_reply_error(reply, 2,
                            "Batch size for getMore must be positive, but received: "
                            "%lld",
                            (long long)b);
            return;
        }
        batch = b == 0 ? -1 : (long)b;
    }
    for (c = srv->cursors->head; c && c->id != id; c = c->next) {
    }
    if (!c) {
        emu_reply_error(reply, 43, "cursor id %lld not found", (long long)id);
        return;
    }
    snprintf(ns, sizeof(ns), "%s.%s", db, coll);
    if (strcmp(ns, c->ns) != 0) {
        emu_reply_error(reply, 13,
                        "Requested getMore on namespace '%s', but cursor belongs to a "
                        "different namespace %s",
                        ns, c->ns);
        return;
    }
    c->last_used_ms = emu_now_ms();
    BSON_APPEND_DOCUMENT_BEGIN(reply, "cursor", &cur);
    BSON_APPEND_ARRAY_BEGIN(&cur, "nextBatch", &arr);
    c->pos = fill_batch(&arr, c->buf, c->len, c->pos, batch);
    bson_append_array_end(&cur, &arr);
    if (c->has_at) {
        BSON_APPEND_TIMESTAMP(&cur, "atClusterTime", c->at_t, c->at_i);
    }
    BSON_APPEND_INT64(&cur, "id", c->pos < c->len ? c->id : 0);
    BSON_APPEND_UTF8(&cur, "ns", c->ns);
    bson_append_document_end(reply, &cur);
    if (c->pos >= c->len) {
        unlink_cursor(srv->cursors, c);
        cursor_free(c);
    }
}

static bool kill_plain(emu_cursors_t *cs, int64_t id)
{
    for (cursor_t *c = cs->head; c; c = c->next) {
        if (c->id == id) {
            unlink_cursor(cs, c);
            cursor_free(c);
            return true;
        }
    }
    return false;
}

static void append_id(bson_t *arr, uint32_t *n, int64_t id)
{
    char keybuf[16];
    const char *key;
    size_t klen = bson_uint32_to_string((*n)++, &key, keybuf, sizeof(keybuf));
    bson_append_int64(arr, key, (int)klen, id);
}

void emu_cmd_kill_cursors(emu_conn_t *conn, const bson_t *cmd, const char *db, bson_t *reply)
{
    bson_iter_t it, ids;
    bson_t killed = BSON_INITIALIZER, not_found = BSON_INITIALIZER, empty;
    uint32_t nk = 0, nn = 0;

    if (!bson_iter_init_find(&it, cmd, "cursors") || !BSON_ITER_HOLDS_ARRAY(&it)) {
        emu_reply_error(reply, 40414,
                        "BSON field 'killCursors.cursors' is missing but a "
                        "required field");
        bson_destroy(&killed);
        bson_destroy(&not_found);
        return;
    }
    bson_iter_recurse(&it, &ids);
    while (bson_iter_next(&ids)) {
        int64_t id = bson_iter_as_int64(&ids);
        if (emu_cs_kill(conn->srv, id) || kill_plain(conn->srv->cursors, id)) {
            append_id(&killed, &nk, id);
        } else {
            append_id(&not_found, &nn, id);
        }
    }
    BSON_APPEND_ARRAY(reply, "cursorsKilled", &killed);
    BSON_APPEND_ARRAY(reply, "cursorsNotFound", &not_found);
    BSON_APPEND_ARRAY_BEGIN(reply, "cursorsAlive", &empty);
    bson_append_array_end(reply, &empty);
    BSON_APPEND_ARRAY_BEGIN(reply, "cursorsUnknown", &empty);
    bson_append_array_end(reply, &empty);
    bson_destroy(&killed);
    bson_destroy(&not_found);
    (void)db;
}

void emu_cursors_kill_ns(emu_server_t *srv, const char *ns)
{
    cursor_t **p = &srv->cursors->head;
    while (*p) {
        cursor_t *c = *p;
        if (strcmp(c->ns, ns) == 0) {
            *p = c->next;
            srv->cursors->count--;
            cursor_free(c);
        } else {
            p = &c->next;
        }
    }
}
