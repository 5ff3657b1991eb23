/*
 * redis_stream.c: exactly-once XADD of an event (redis_stream.h): the command, and the two
 * reads that classify Redis's refusal of a replayed entry ID.
 *
 * Thread: the client's loop thread. The op is the caller's and holds the only state; the
 * event's message JSON is the event's cached rendering, passed to hiredis by pointer (hiredis
 * copies it into its output buffer), so an XADD costs no copy of the message here.
 */
#include "sinks/redis_stream.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#define REFUSED_TEXT "equal or smaller than the target stream top item"

bool mc__xadd_refused_as_old(const redisReply *reply)
{
    return reply && reply->type == REDIS_REPLY_ERROR && reply->str &&
           strstr(reply->str, REFUSED_TEXT) != NULL;
}

mc__xadd_outcome_t mc__xadd_decide(bool exact_found, bool exact_same, bool first_found,
                                   const mc__redis_stream_id_t *first,
                                   const mc__redis_stream_id_t *id)
{
    if (exact_found) {
        return exact_same ? MC__XADD_DUPLICATE : MC__XADD_COLLISION;
    }
    if (!first_found || mc__redis_stream_id_compare(first, id) > 0) {
        return MC__XADD_TRIMMED;
    }
    return MC__XADD_GAP;
}

int mc__xadd_prepare(mc__xadd_op_t *op, const mc__subject_template_t *key_template, mc_event_t *ev,
                     uint64_t maxlen, mc_error_t *err)
{
    memset(op, 0, sizeof *op);
    int rc = mc__redis_stream_id_from_event(ev, &op->id, err);
    if (rc != 0) {
        return rc;
    }
    mc__subject_values_t v;
    mc__subject_values_from_event(&v, ev);
    rc = mc__subject_template_render(key_template, &v, op->key, sizeof op->key, &op->key_len, err);
    if (rc != 0) {
        return rc;
    }
    mc__redis_stream_id_format(&op->id, op->id_text);
    if (maxlen > 0) {
        snprintf(op->maxlen_text, sizeof op->maxlen_text, "%" PRIu64, maxlen);
    }
    op->ev = mc_event_ref(ev);
    return 0;
}

void mc__xadd_op_cleanup(mc__xadd_op_t *op)
{
    if (op) {
        mc_event_unref(&op->ev);
    }
}

static void done(mc__xadd_op_t *op, mc__xadd_outcome_t outcome, mc__redis_class_t cls,
                 const char *message)
{
    mc__xadd_result_t res = {outcome, cls, message};
    op->cb(op->arg, &res);
}

/* Finds the string value of field `name` in an entry's field list [f1, v1, f2, v2, ...]. */
static const redisReply *entry_field(const redisReply *fields, const char *name)
{
    if (!fields || fields->type != REDIS_REPLY_ARRAY) {
        return NULL;
    }
    for (size_t k = 0; k + 1 < fields->elements; k += 2) {
        const redisReply *f = fields->element[k];
        if (f->type == REDIS_REPLY_STRING && f->len == strlen(name) &&
            memcmp(f->str, name, f->len) == 0) {
            return fields->element[k + 1];
        }
    }
    return NULL;
}

/* The one entry of an XRANGE reply: [[id, [fields...]]]; NULL when empty or malformed. */
static const redisReply *only_entry(const redisReply *r)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        return NULL;
    }
    const redisReply *e = r->element[0];
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
        e->element[0]->type != REDIS_REPLY_STRING) {
        return NULL;
    }
    return e;
}

static void read_failed(mc__xadd_op_t *op, const mc__redis_result_t *res)
{
    if (!op->read_failed) {
        op->read_failed = true;
        op->read_cls = res->cls == MC__REDIS_OK ? MC__REDIS_TRANSIENT : res->cls;
        snprintf(op->why, sizeof op->why, "checking a refused entry ID: %.100s",
                 res->message ? res->message : "?");
    }
}

static void after_reads(mc__xadd_op_t *op)
{
    if (--op->reads_left > 0) {
        return;
    }
    if (op->read_failed) {
        done(op, MC__XADD_FAILED, op->read_cls, op->why);
        return;
    }
    mc__xadd_outcome_t o =
        mc__xadd_decide(op->exact_found, op->exact_same, op->first_found, &op->first, &op->id);
    if (mc__xadd_written(o)) {
        done(op, o, MC__REDIS_OK, NULL);
        return;
    }
    snprintf(op->why, sizeof op->why,
             o == MC__XADD_COLLISION
                 ? "entry %s already holds another event (two events with one position)"
                 : "entry %s was never written but a later one was (another writer, or XDEL)",
             op->id_text);
    done(op, o, MC__REDIS_PERMANENT, op->why);
}

static void on_exact(void *arg, const mc__redis_result_t *res)
{
    mc__xadd_op_t *op = arg;
    if (res->status != 0) {
        read_failed(op, res);
    } else {
        const redisReply *e = only_entry(res->reply);
        if (e) {
            op->exact_found = true;
            const redisReply *v = entry_field(e->element[1], "id");
            const char *mine = mc_event_id(op->ev);
            op->exact_same = v && v->type == REDIS_REPLY_STRING && mine && v->len == strlen(mine) &&
                             memcmp(v->str, mine, v->len) == 0;
        }
    }
    after_reads(op);
}

static void on_first(void *arg, const mc__redis_result_t *res)
{
    mc__xadd_op_t *op = arg;
    if (res->status != 0) {
        read_failed(op, res);
    } else {
        const redisReply *e = only_entry(res->reply);
        if (e) {
            op->first_found =
                mc__redis_stream_id_parse(e->element[0]->str, e->element[0]->len, &op->first) == 0;
        }
    }
    after_reads(op);
}

static void on_xadd(void *arg, const mc__redis_result_t *res)
{
    mc__xadd_op_t *op = arg;
    if (res->status == 0) {
        done(op, MC__XADD_ADDED, MC__REDIS_OK, NULL);
        return;
    }
    if (!mc__xadd_refused_as_old(res->reply)) {
        done(op, MC__XADD_FAILED, res->cls, res->message);
        return;
    }
    const char *exact[] = {"XRANGE", op->key, op->id_text, op->id_text};
    size_t exact_lens[] = {6, op->key_len, strlen(op->id_text), strlen(op->id_text)};
    const char *first[] = {"XRANGE", op->key, "-", "+", "COUNT", "1"};
    size_t first_lens[] = {6, op->key_len, 1, 1, 5, 1};
    /* Both reads go out together; their callbacks run later, in this order. */
    mc__redis_t *r = op->client;
    op->reads_left = 2;
    int rc = mc__redis_command(r, 4, exact, exact_lens, on_exact, op);
    if (rc != 0) {
        done(op, MC__XADD_FAILED, MC__REDIS_TRANSIENT, "cannot check a refused entry ID");
        return;
    }
    rc = mc__redis_command(r, 6, first, first_lens, on_first, op);
    if (rc != 0) {
        mc__redis_result_t fake = {rc, MC__REDIS_TRANSIENT, false, NULL,
                                   "cannot check a refused entry ID"};
        read_failed(op, &fake);
        /* on_exact's callback still comes and finishes the op. */
        op->reads_left--;
    }
}

int mc__xadd_send(mc__redis_t *r, mc__xadd_op_t *op, mc__xadd_cb cb, void *arg)
{
    const char *argv[16];
    size_t lens[16];
    int n = 0;
#define ARG(s, l) (argv[n] = (s), lens[n] = (l), n++)
    ARG("XADD", 4);
    ARG(op->key, op->key_len);
    if (op->maxlen_text[0]) {
        ARG("MAXLEN", 6);
        ARG("~", 1);
        ARG(op->maxlen_text, strlen(op->maxlen_text));
    }
    ARG(op->id_text, strlen(op->id_text));
    mc__subject_values_t v;
    mc__subject_values_from_event(&v, op->ev);
    const char *eid = mc_event_id(op->ev);
    ARG("id", 2);
    ARG(eid, strlen(eid));
    ARG("type", 4);
    ARG(v.type.p, v.type.len);
    ARG("stream", 6);
    ARG(v.stream.p, v.stream.len);
    if (v.recipient.p) {
        ARG("recipient", 9);
        ARG(v.recipient.p, v.recipient.len);
    }
    size_t msg_len = 0;
    const char *msg = mc_event_json(op->ev, &msg_len);
    if (!msg) {
        return MC_ENOMEM;
    }
    ARG("message", 7);
    ARG(msg, msg_len);
#undef ARG
    op->client = r;
    op->cb = cb;
    op->arg = arg;
    return mc__redis_command(r, n, argv, lens, on_xadd, op);
}
