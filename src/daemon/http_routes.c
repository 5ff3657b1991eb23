/*
 * http_routes.c: HTTP/1.1 on a connection that has not been upgraded: reading requests
 * (pipelined ones in order), the endpoints (/healthz, /readyz, /metrics, /v1/streams, the
 * viewer page), refusals, and the checks that turn a subscription request into a WebSocket or
 * SSE session.
 *
 * Thread: the server's loop thread only.
 * Invariants: refusals (400/401/403/404/406/426/503) are plain HTTP answers before any
 * upgrade, with the JSON body {"error": message, "code": code}; nothing a client sent is
 * acted upon before its request is complete; a connection holds at most HTTP_MAX_PIPELINED
 * answers and HTTP_MAX_UNSENT bytes its peer has not read (past either it is closed), so
 * pipelining costs bounded memory and loop time.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json_object.h"
#include "server_internal.h"
#include "viewer.h"

#define HTTP_MAX_PIPELINED 16         /* answers waiting for a peer that does not read */
#define HTTP_MAX_UNSENT (256u * 1024) /* their bytes the kernel has not taken */

/* ---- HTTP answers ------------------------------------------------------------------------------
 */

static const char *status_text(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 426: return "Upgrade Required";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

void mcd_count_refusal(mcd_stats_t *stats, int status)
{
    int k = status == 400   ? 0
            : status == 401 ? 1
            : status == 403 ? 2
            : status == 404 ? 3
            : status == 503 ? 4
                            : 5;
    stats->refused[k]++;
}

/* Queues a complete answer. `body_static` bodies (the viewer page) are sent without a copy.
 * Without keep-alive, the connection closes once the answer is written. */
static void respond(mcd_conn_t *c, int status, const char *ctype, const char *extra,
                    const char *body, size_t len, bool body_static, bool keep_alive)
{
    char head[1024];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: %s\r\n%s\r\n",
                     status, status_text(status), ctype, len, keep_alive ? "keep-alive" : "close",
                     extra ? extra : "");
    if (n < 0 || (size_t)n >= sizeof(head)) {
        mcd_conn_abort(c);
        return;
    }
    if (body_static) {
        static mcd_msg_t page;
        if (mcd_conn_send_raw(c, head, (size_t)n) != 0) {
            return;
        }
        page.flags = MCD_MSG_STATIC | MCD_MSG_RAW;
        page.body = body;
        page.body_len = (uint32_t)len;
        if (mcd_conn_send_static(c, &page) != 0) {
            return;
        }
    } else {
        char *all = malloc((size_t)n + len);
        if (!all) {
            mcd_conn_abort(c);
            return;
        }
        memcpy(all, head, (size_t)n);
        if (len) {
            memcpy(all + n, body, len);
        }
        int rc = mcd_conn_send_raw(c, all, (size_t)n + len);
        free(all);
        if (rc != 0) {
            return;
        }
    }
    if (!keep_alive) {
        mcd_conn_linger(c);
    }
}

static void respond_json(mcd_conn_t *c, int status, const char *json, bool keep_alive,
                         const char *extra)
{
    respond(c, status, "application/json", extra, json, strlen(json), false, keep_alive);
}

/* {"error": message, "code": code} with `status`. Refusals keep the connection open when the
 * request allowed it (a client may retry with a token on the same connection). */
void mcd_http_refuse(mcd_conn_t *c, int status, const char *code, const char *message,
                     bool keep_alive, const char *extra)
{
    char body[768];
    size_t n = 0;
    n += (size_t)snprintf(body, sizeof(body), "{\"error\":\"");
    mcd_json_escape(body, sizeof(body) - 64, &n, message);
    n += (size_t)snprintf(body + n, sizeof(body) - n, "\",\"code\":\"%s\"}", code);
    mcd_count_refusal(&mcd_conn_table(c)->stats, status);
    mc_log(MC_LOG_DEBUG, "server", "refused status=%d code=%s", status, code);
    respond_json(c, status, body, keep_alive, extra);
}

/* ---- Routes -------------------------------------------------------------------------------- */

static void route_streams(mcd_conn_t *c, bool keep_alive)
{
    mcd_server_t *srv = mcd_conn_server(c);
    size_t cap = 64 + srv->fanout.n_hubs * 600;
    char *body = malloc(cap);
    if (!body) {
        mcd_conn_abort(c);
        return;
    }
    size_t n = (size_t)snprintf(body, cap, "{\"streams\":[");
    for (size_t i = 0; i < srv->fanout.n_hubs; i++) {
        const char *name = srv->fanout.hubs[i].cfg->name;
        n += (size_t)snprintf(body + n, cap - n, "%s{\"name\":\"", i ? "," : "");
        mcd_json_escape(body, cap, &n, name);
        n += (size_t)snprintf(body + n, cap - n, "\",\"url\":\"/v1/streams/");
        mcd_json_escape(body, cap, &n, name);
        n += (size_t)snprintf(body + n, cap - n, "\"}");
    }
    n += (size_t)snprintf(body + n, cap - n, "]}");
    respond(c, 200, "application/json", NULL, body, n, false, keep_alive);
    free(body);
}

static void route_readyz(mcd_conn_t *c, bool keep_alive)
{
    mcd_server_t *srv = mcd_conn_server(c);
    size_t n = 0;
    bool ready = false;
    char *body = mcd_readyz_render(srv, !srv->engine_stopped, &n, &ready);
    if (!body) {
        mcd_conn_abort(c);
        return;
    }
    respond(c, ready ? 200 : 503, "application/json", NULL, body, n, false, keep_alive);
    free(body);
}

static void route_metrics(mcd_conn_t *c, bool keep_alive)
{
    /* Rendering costs ~100 us; requests within one loop pass (pipelined, or many clients at
     * once) share one rendering, so a flood of scrapes costs one per pass. */
    mcd_server_t *srv = mcd_conn_server(c);
    int64_t now = (int64_t)uv_now(&srv->loop);
    if (!srv->metrics_text || srv->metrics_ms != now) {
        size_t len = 0;
        char *text = mcd_metrics_render(srv, &len);
        if (!text) {
            mcd_conn_abort(c);
            return;
        }
        free(srv->metrics_text);
        srv->metrics_text = text;
        srv->metrics_len = len;
        srv->metrics_ms = now;
    }
    respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, srv->metrics_text,
            srv->metrics_len, false, keep_alive);
}

/* An edge stream (source: nats) loads its history ring from JetStream before it opens: a
 * subscriber let in meanwhile would take those older events for new ones, and its since=
 * would not be found yet. */
static bool refuse_loading_edge(mcd_conn_t *c, mcd_hub_t *hub, bool keep_alive)
{
    if (!mc_stream_config_is_edge(hub->cfg) || hub->open || hub->error_msg) {
        return false; /* open (its ready event reached the fan-out), or failed */
    }
    mcd_http_refuse(c, 503, "stream_loading",
                    "the edge stream is loading its history from JetStream, retry shortly",
                    keep_alive, "Retry-After: 1\r\n");
    return true;
}

/* A stream the engine has given up on (MC_STREAM_FAILED: a fatal server error, or history
 * lost with on_history_lost: fail) would never deliver anything: say so instead of
 * subscribing. Checked after authentication. The reason is the fixed one of the stream's error
 * message (its code's), never the server's own text, which can name databases, fields and
 * tokens (it is in the log); in the moment before that message reaches the fan-out, a
 * generic one. */
static bool refuse_failed_stream(mcd_conn_t *c, mcd_hub_t *hub, bool keep_alive)
{
    mcd_server_t *srv = mcd_conn_server(c);
    mc_stream_status_t st;
    if (!srv->engine || mc_engine_stream_status(srv->engine, hub->cfg->name, &st) != 0 ||
        st.state != MC_STREAM_FAILED) {
        return false;
    }
    const char *reason = hub->error_msg ? mc_event_reason(hub->error_msg->ev) : NULL;
    char msg[200];
    snprintf(msg, sizeof(msg), "stream failed: %.180s", reason ? reason : "see the daemon's log");
    mcd_http_refuse(c, 503, "stream_failed", msg, keep_alive, NULL);
    return true;
}

static void route_subscribe(mcd_conn_t *c, mcd_http_req_t *req, mcd_http_target_t *t,
                            mcd_hub_t *hub)
{
    mcd_server_t *srv = mcd_conn_server(c);
    bool ka = req->keep_alive;
    const char *upgrade = mcd_http_req_header(req, MCD_H_UPGRADE);
    const char *origin = mcd_http_req_header(req, MCD_H_ORIGIN);
    bool ws = upgrade && mcd_http_has_token(upgrade, "websocket");
    bool sse =
        !ws && mcd_http_has_token(mcd_http_req_header(req, MCD_H_ACCEPT), "text/event-stream");
    char accept_key[29];
    if (upgrade && !ws) {
        mcd_http_refuse(c, 400, "bad_request", "only the websocket upgrade is supported", false,
                        NULL);
        return;
    }
    if (!ws && !sse) {
        mcd_http_refuse(c, 406, "not_acceptable",
                        "open this URL as a WebSocket (Upgrade: websocket) or as an event stream "
                        "(Accept: text/event-stream)",
                        ka, NULL);
        return;
    }
    if (srv->table.stats.conns[MCD_T_WS] + srv->table.stats.conns[MCD_T_SSE] >=
        srv->max_subscribers) {
        mcd_http_refuse(c, 503, "too_many_connections", "connection limit reached, retry later",
                        false, "Retry-After: 5\r\n");
        return;
    }
    if (ws) {
        const char *version = mcd_http_req_header(req, MCD_H_WS_VERSION);
        const char *key = mcd_http_req_header(req, MCD_H_WS_KEY);
        if (!req->upgrade ||
            !mcd_http_has_token(mcd_http_req_header(req, MCD_H_CONNECTION), "upgrade")) {
            mcd_http_refuse(c, 400, "bad_handshake", "Connection must include Upgrade", false,
                            NULL);
            return;
        }
        if (!mcd_http_req_header(req, MCD_H_HOST) || req->http_major != 1 || req->http_minor < 1) {
            mcd_http_refuse(c, 400, "bad_handshake", "WebSocket needs HTTP/1.1 and a Host header",
                            false, NULL);
            return;
        }
        if (!version || strcmp(version, "13") != 0) {
            mcd_http_refuse(c, 426, "unsupported_version", "Sec-WebSocket-Version must be 13",
                            false, "Sec-WebSocket-Version: 13\r\n");
            return;
        }
        if (!key || mcd_ws_accept_key(key, strlen(key), accept_key) != 0) {
            mcd_http_refuse(c, 400, "bad_handshake", "Sec-WebSocket-Key must be 16 bytes in base64",
                            false, NULL);
            return;
        }
        if (!mcd_origin_allowed(srv->config, origin)) {
            mcd_http_refuse(c, 403, "forbidden_origin", "origin not allowed", false, NULL);
            return;
        }
    }

    mcd_refusal_t r;
    memset(&r, 0, sizeof(r));
    char *token = NULL;
    const char *authz = mcd_http_req_header(req, MCD_H_AUTHORIZATION);
    if (t->token) {
        token = strdup(t->token);
    } else if (authz) {
        size_t tlen = 0;
        const char *b = mcd_http_bearer(authz, &tlen);
        if (!b) {
            mcd_http_refuse(c, 401, "unauthorized", "Authorization must be \"Bearer <token>\"", ka,
                            NULL);
            return;
        }
        token = strndup(b, tlen);
    }
    if ((t->token || authz) && !token) {
        mcd_conn_abort(c);
        return;
    }
    mcd_identity_t id;
    memset(&id, 0, sizeof(id));
    int rc = mcd_auth_subscriber(srv->auth, hub->cfg, token, (int64_t)time(NULL), &id, &r);
    free(token);
    if (rc != 0) {
        mcd_http_refuse(c, r.status ? r.status : 401, r.code ? r.code : "unauthorized", r.message,
                        ka, NULL);
        return;
    }
    if (refuse_failed_stream(c, hub, ka) || refuse_loading_edge(c, hub, ka)) {
        return;
    }
    const char *since = t->since;
    bool snapshot = false;
    if (t->snapshot && strcmp(t->snapshot, "true") == 0) {
        snapshot = true;
    } else if (t->snapshot && *t->snapshot && strcmp(t->snapshot, "false") != 0) {
        mcd_http_refuse(c, 400, "bad_request", "snapshot must be true or false", ka, NULL);
        return;
    }
    if (snapshot && since) {
        mcd_http_refuse(c, 400, "bad_request", "snapshot and since cannot be combined", ka, NULL);
        return;
    }
    const char *last_id = sse ? mcd_http_req_header(req, MCD_H_LAST_EVENT_ID) : NULL;
    if (last_id && *last_id) {
        since = last_id; /* the browser's reconnect knows better than the original URL */
        snapshot = false; /* it had its snapshot: resume after its last change */
    }
    if (since && !mcd_http_valid_event_id(since)) {
        mcd_http_refuse(c, 400, "invalid_since", "since must be an event id (hexadecimal)", ka,
                        NULL);
        return;
    }
    mcd_subscription_t *sub = mcd_subscription_new(hub->cfg, t->vars, t->filter, &id, &r);
    if (!sub) {
        mcd_http_refuse(c, r.status ? r.status : 400, r.code ? r.code : "bad_request", r.message,
                        ka, NULL);
        return;
    }
    bson_t snap_query = BSON_INITIALIZER;
    if (snapshot && !srv->config->server.max_snapshot_documents &&
        !hub->cfg->max_snapshot_documents) {
        mcd_refuse(&r, 400, "snapshot_not_supported",
                   "snapshots are turned off (server.max_snapshot_documents is 0)");
    }
    if (snapshot && mc_stream_config_is_edge(hub->cfg)) {
        /* A snapshot reads MongoDB, which an edge stream never does. */
        mcd_refuse(&r, 400, "snapshot_not_supported",
                   "snapshots are not served by an edge stream (source: nats)");
    }
    if (snapshot && (r.status || !srv->snapshots ||
                     mcd_snapshot_plan(hub->cfg, sub, t->vars, t->filter, &snap_query, &r) != 0)) {
        bson_destroy(&snap_query);
        mcd_subscription_destroy(sub);
        mcd_http_refuse(c, r.status ? r.status : 503, r.code ? r.code : "shutting_down",
                        r.message, ka, NULL);
        return;
    }

    if ((ws ? mcd_ws_session_start(c, accept_key) : mcd_sse_session_start(c, origin)) != 0) {
        bson_destroy(&snap_query);
        mcd_subscription_destroy(sub);
        return;
    }
    mcd_conn_subscribed(c);
    srv->table.stats.conns[MCD_T_HTTP]--;
    c->transport = ws ? MCD_T_WS : MCD_T_SSE;
    srv->table.stats.conns[c->transport]++;
    c->sub = sub;
    c->deadline_ms = 0;
    c->expires_s =
        id.expires_at > 0 ? (uint32_t)(id.expires_at > UINT32_MAX ? UINT32_MAX : id.expires_at) : 0;
    if (snapshot) {
        /* The documents first, read on a snapshot worker; the stream joins after them
         * (snapshot.c). */
        mcd_snapshot_start(srv->snapshots, hub, c, &snap_query);
        return;
    }
    bson_destroy(&snap_query);
    int sub_rc = since && !mcd_hub_has_id(hub, since)
                     ? mcd_catchup_start(srv->catchups, hub, c, since) /* catchup.c */
                     : mcd_hub_subscribe(hub, c, since);
    if (sub_rc != 0) {
        if (!(c->flags & MCD_CF_CLOSED) && c->state != MCD_ST_CLOSING) {
            mcd_conn_abort(c);
        }
        return;
    }
    /* Write ready (and any replay) now: a burst of new subscribers then never holds queue
     * storage at the same time. */
    mcd_conn_start_write(c);
}

static void handle_request(mcd_conn_t *c, mcd_http_req_t *req)
{
    mcd_server_t *srv = mcd_conn_server(c);
    bool ka = req->keep_alive && !srv->stopping;
    if (req->method != HTTP_GET) {
        mcd_count_refusal(&srv->table.stats, 405);
        respond_json(c, 405,
                     "{\"error\":\"only GET is supported\",\"code\":\"method_not_allowed\"}", ka,
                     "Allow: GET\r\n");
        return;
    }
    const char *raw = mcd_http_req_target(req);
    mcd_http_target_t t;
    const char *why = NULL;
    if (mcd_http_target_parse(raw, req->target_len, &t, &why) != 0) {
        mcd_http_refuse(c, 400, "bad_request", why, false, NULL);
        return;
    }
    const char *prefix = "/v1/streams/";
    size_t plen = strlen(prefix);
    if (strcmp(t.path, "/") == 0) {
        size_t len = 0;
        const char *page = mcd_viewer_page(&len);
        respond(c, 200, "text/html; charset=utf-8", NULL, page, len, true, ka);
    } else if (strcmp(t.path, "/healthz") == 0) {
        respond_json(c, 200, "{\"status\":\"ok\"}", ka, NULL);
    } else if (strcmp(t.path, "/readyz") == 0) {
        route_readyz(c, ka);
    } else if (strcmp(t.path, "/metrics") == 0) {
        route_metrics(c, ka);
    } else if (strcmp(t.path, "/v1/streams") == 0 || strcmp(t.path, "/v1/streams/") == 0) {
        route_streams(c, ka);
    } else if (strncmp(t.path, prefix, plen) == 0) {
        mcd_hub_t *hub = mcd_fanout_hub(&srv->fanout, t.path + plen);
        if (!hub) {
            mcd_http_refuse(c, 404, "unknown_stream", "no such stream", ka, NULL);
        } else if (srv->stopping) {
            mcd_http_refuse(c, 503, "shutting_down", "the server is shutting down", false, NULL);
        } else {
            route_subscribe(c, req, &t, hub);
        }
    } else {
        mcd_http_refuse(c, 404, "not_found", "no such endpoint", ka, NULL);
    }
    mcd_http_target_cleanup(&t);
}

/* A client that pipelines requests without reading the answers: answered requests are
 * counted from the last time the kernel had taken everything queued. */
static bool pipelining_too_far(mcd_conn_t *c)
{
    uint64_t unsent = mcd_conn_unsent(c);
    if (++c->pipelined <= HTTP_MAX_PIPELINED && unsent <= HTTP_MAX_UNSENT) {
        return false;
    }
    static mc_log_ratelimit_t rl = MC_LOG_RATELIMIT_INIT(5000);
    mcd_conn_table(c)->stats.pipelining++;
    mc_log_ratelimited(&rl, MC_LOG_WARN, "server",
                       "closed a connection that pipelines requests without reading the answers "
                       "(requests=%u unsent=%" PRIu64 ")",
                       (unsigned)c->pipelined, unsent);
    mcd_conn_abort(c);
    return true;
}

void mcd_http_input(mcd_conn_t *c, char *data, size_t len)
{
    mcd_server_t *srv = mcd_conn_server(c);
    if (c->pipelined && mcd_conn_unsent(c) == 0) {
        c->pipelined = 0;
    }
    while (len > 0 && c->state == MCD_ST_HTTP && !(c->flags & MCD_CF_CLOSED)) {
        if (!c->req) {
            c->req = malloc(sizeof(*c->req));
            if (!c->req) {
                mcd_conn_abort(c);
                return;
            }
            mcd_http_req_init(c->req);
            c->deadline_ms = (int64_t)uv_now(&srv->loop) + srv->timing.request_ms;
        }
        size_t used = 0;
        mcd_http_result_t r = mcd_http_req_feed(c->req, data, len, &used);
        if (r == MCD_HTTP_MORE) {
            return;
        }
        mcd_http_req_t *req = c->req;
        c->req = NULL;
        if (r == MCD_HTTP_ERROR) {
            mcd_http_refuse(c, req->status, "bad_request", req->error ? req->error : "bad request",
                            false, NULL);
        } else if (!pipelining_too_far(c)) {
            handle_request(c, req);
            data += used;
            len -= used;
            if (c->state == MCD_ST_HTTP) {
                c->deadline_ms = (int64_t)uv_now(&srv->loop) + srv->timing.idle_ms;
                mcd_conn_touch(c);
            }
        }
        mcd_http_req_cleanup(req);
        free(req);
        if (r == MCD_HTTP_ERROR) {
            return;
        }
    }
    if (len > 0 && c->state == MCD_ST_WS && !(c->flags & MCD_CF_CLOSED)) {
        mcd_ws_input(c, (uint8_t *)data, len);
    }
}

void mcd_http_session_tick(mcd_conn_t *c, int64_t now)
{
    if (c->deadline_ms && now >= c->deadline_ms) {
        if (c->req) {
            mcd_http_refuse(c, 408, "request_timeout", "request not complete in time", false, NULL);
        } else {
            mcd_conn_abort(c);
        }
    }
}
