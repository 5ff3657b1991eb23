#!/usr/bin/env bash
# demo.sh [BUILD_DIR]: the `make demo` job (default BUILD_DIR: build). A small multi-user
# inventory app (examples/demo.yaml) watched live in the browser.
#
# Installs missing Debian packages, builds, starts mongo-emulator on 127.0.0.1 (unless
# MONGODB_URI points at a real replica set), creates the app's data and turns on pre-/post-
# images (`mongocast enable-images`), runs `mongocast run -c examples/demo.yaml` and a writer
# that simulates the shops' activity (scripts/demo_writer.py), mints JWTs for alice, bob and an
# admin, and prints viewer URLs with those tokens in them. The terminal shows the writer's
# actions; open the URLs side by side to see that alice only ever receives her shops' changes.
# Ctrl-C stops everything cleanly; the logs stay in the mktemp directory it names at the end.
#
# Environment: MONGODB_URI (use this deployment instead of the emulator), DEMO_PORT (HTTP port,
# default 8080; a free one is picked when it is taken), DEMO_JWT_SECRET (HS256 secret, at least
# 32 bytes), DEMO_INTERVAL (seconds between writes, default 1), DEMO_SECONDS (stop by itself
# after that many seconds; default: run until Ctrl-C).
#
# Every background process is started in a session of its own (setsid: a Ctrl-C reaches only
# this script, never the children directly) and its pid goes into PIDS; cleanup stops them in
# reverse order by pid (SIGTERM, then SIGKILL after a grace period) and waits for each, so the
# writer stops first, mongocast drains, and the emulator goes last.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD_ARG=${1:-$ROOT/build}
PY=/usr/bin/python3
CONFIG="$ROOT/examples/demo.yaml"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mongocast-demo.XXXXXX")
PIDS=()
NAMES=()

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${PIDS[$i]}
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping ${NAMES[$i]} (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    # Kept, so the logs can be read after the demo stopped (it is under $TMPDIR; delete it
    # when done).
    say "logs kept in $WORK (mongocast.log, mongocast.out, emulator.log): rm -rf $WORK when done"
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

track() { PIDS+=("$1"); NAMES+=("$2"); }

build() {
    "$ROOT/scripts/install-deps.sh"
    mkdir -p "$BUILD_ARG"
    BUILD=$(cd "$BUILD_ARG" && pwd)
    if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
        cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    fi
    cmake --build "$BUILD" -j "$(nproc)" --target mongocast_daemon mongo-emulator >/dev/null
    MONGOCAST="$BUILD/src/daemon/mongocast"
    EMULATOR="$BUILD/tools/mongo-emulator/mongo-emulator"
}

start_emulator() {
    if [[ -n "${MONGODB_URI:-}" ]]; then
        say "using MONGODB_URI (not starting mongo-emulator)"
        return
    fi
    setsid "$EMULATOR" --port 0 >"$WORK/emulator.out" 2>"$WORK/emulator.log" </dev/null &
    track $! mongo-emulator
    local line=""
    for _ in $(seq 1 200); do
        line=$(grep -o 'listening on [0-9.]*:[0-9]*' "$WORK/emulator.out" || true)
        [[ -n "$line" ]] && break
        if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
            say "mongo-emulator exited"; cat "$WORK/emulator.log" >&2; exit 1
        fi
        sleep 0.1
    done
    [[ -n "$line" ]] || { say "mongo-emulator did not start"; exit 1; }
    export MONGODB_URI="mongodb://${line#listening on }/?replicaSet=rs0"
    say "mongo-emulator listening: $MONGODB_URI"
}

setup_data() {
    "$PY" "$ROOT/scripts/demo_writer.py" "$MONGODB_URI" setup
    # Deletes are routed to their owner through the pre-image, and the streams read exact
    # post-images (full_document: whenAvailable): both need images on every collection.
    "$MONGOCAST" enable-images "$MONGODB_URI" mongocast_demo inventory_items orders businesses |
        sed 's/^/enable-images: /' >&2
}

port_free() {
    # SO_REUSEADDR as libuv binds: a port in TIME_WAIT from an earlier run is free for it.
    "$PY" -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

start_mongocast() {
    export DEMO_HOST=127.0.0.1 DEMO_PORT="${DEMO_PORT:-8080}"
    if ! port_free "$DEMO_PORT"; then
        local taken=$DEMO_PORT
        DEMO_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        say "port $taken is taken: using $DEMO_PORT"
    fi
    export DEMO_JWT_SECRET="${DEMO_JWT_SECRET:-mongocast-demo-secret-not-for-production-0123456789}"
    # A fresh data directory: positions stored by an earlier run would point into a history
    # that the new emulator (and the recreated database) no longer has.
    export MONGOCAST_DEMO_DATA="$WORK/data"
    say "checking the config: mongocast check -c examples/demo.yaml"
    "$MONGOCAST" check -c "$CONFIG" | sed 's/^/  /' >&2
    setsid "$MONGOCAST" run -c "$CONFIG" >"$WORK/mongocast.out" 2>"$WORK/mongocast.log" </dev/null &
    track $! mongocast
    BASE="http://$DEMO_HOST:$DEMO_PORT"
    for _ in $(seq 1 300); do
        # /readyz answers 200 once every stream's change stream is open.
        if "$PY" -c 'import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)' \
            "$BASE/readyz" 2>/dev/null; then
            say "mongocast is serving $BASE (log: $WORK/mongocast.log)"
            return
        fi
        if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
            say "mongocast exited"; cat "$WORK/mongocast.log" >&2; exit 1
        fi
        sleep 0.1
    done
    say "mongocast is not ready after 30 s; log:"; tail -20 "$WORK/mongocast.log" >&2; exit 1
}

start_writer() {
    setsid "$PY" "$ROOT/scripts/demo_writer.py" "$MONGODB_URI" run \
        --interval "${DEMO_INTERVAL:-1}" --seconds "${DEMO_SECONDS:-0}" </dev/null &
    track $! writer
    say "writer started: orders, payments, shipments, restocks and cancellations every" \
        "${DEMO_INTERVAL:-1}s"
}

# HS256, valid for 24 hours; extra arguments become `roles`.
mint() {
    "$PY" -c 'import os, sys, time, jwt
now = int(time.time())
claims = {"sub": sys.argv[1], "iat": now, "exp": now + 24 * 3600}
if len(sys.argv) > 2:
    claims["roles"] = sys.argv[2:]
print(jwt.encode(claims, os.environ["DEMO_JWT_SECRET"], algorithm="HS256"))' "$@"
}

show_urls() {
    local alice bob admin
    alice=$(mint alice)
    bob=$(mint bob)
    admin=$(mint admin mongocast:all)
    cat >&2 <<MSG

  The live viewer: $BASE/  (streams: $BASE/v1/streams, metrics: $BASE/metrics)

  alice owns Corner Hardware and Green Grocer:
    $BASE/?stream=inventory&token=$alice
    $BASE/?stream=orders&token=$alice
  bob owns Book Nook and Bike Shed:
    $BASE/?stream=orders&token=$bob
    $BASE/?stream=low_stock&token=$bob
  admin (role mongocast:all) sees every event:
    $BASE/?stream=orders&token=$admin

  The tokens are HS256, valid 24 h, signed with DEMO_JWT_SECRET. The page moves the token
  from the address bar into this tab's sessionStorage.

MSG
}

build
start_emulator
setup_data
start_mongocast
start_writer
show_urls
say "Ctrl-C to stop"

# Until the writer finishes (DEMO_SECONDS), mongocast exits, or Ctrl-C (trap -> cleanup). A
# short foreground sleep, not `wait`, so that the INT trap runs at once.
WRITER_PID=${PIDS[-1]}
MONGOCAST_PID=${PIDS[-2]}
while kill -0 "$WRITER_PID" 2>/dev/null; do
    if ! kill -0 "$MONGOCAST_PID" 2>/dev/null; then
        say "mongocast exited; log:"; tail -20 "$WORK/mongocast.log" >&2; exit 1
    fi
    sleep 0.2
done
sleep 1 # let the last changes through before stopping
