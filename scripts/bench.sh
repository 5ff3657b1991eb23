#!/usr/bin/env bash
# Runs the benchmarks against a release build and prints the median of RUNS runs of each
# figure. Usage: scripts/bench.sh BUILD_DIR [RUNS]   (make bench uses build/ and 5 runs)
# Each run starts a fresh mongo-emulator on a free loopback port and stops it by pid.
#   BENCH_SELECT   which benchmarks, default "emulator intake"
#   BENCH_RAW      if set, every run's raw key=value lines are appended to this file
#   bench_emulator: BENCH_DOCS (200000), BENCH_DOC_BYTES (200)
#   bench_expr:     EXPR_ITERATIONS (1000000); needs no server (docs/PERFORMANCE.md,
#                   "Expressions and per-document stages")
#   bench_intake:   INTAKE_DOCS (200000), INTAKE_DOC_BYTES (1024); the engine's stdout sink
#                   writes to /dev/null (docs/PERFORMANCE.md, "Engine intake")
#   bench_fanout:   (docs/PERFORMANCE.md, "Fan-out") each phase of each run gets a fresh
#                   emulator and a fresh `mongocast run` with a generated config (one public
#                   stream on bench.fanout, server.listen 127.0.0.1:0, max_connections 20000).
#                   FANOUT_PHASES (default "throughput latency idle idle_max"; also
#                   "latency_blocked": the latency phase with one more sink in the daemon, a
#                   fault sink that blocks forever on its first event, registered through
#                   MONGOCAST_TEST_SINKS=1; with max_lag_events 2000 it is detached after about
#                   2 s and its catch-up cursor runs too: neither may slow the live feed),
#                   FANOUT_CLIENTS (1000), FANOUT_PROCS (2), FANOUT_DOC_BYTES (200),
#                   throughput: FANOUT_EVENTS (20000) at FANOUT_RATE events/s (2000; 0: as
#                   fast as the writer can) in insert_many batches of FANOUT_BATCH (10);
#                   latency: FANOUT_LAT_RATE (1000) events/s for FANOUT_LAT_SECONDS (10);
#                   idle: FANOUT_CLIENTS connections; idle_max: FANOUT_IDLE_MAX (19000)
#                   connections over FANOUT_IDLE_PROCS (4) client processes.
#                   FANOUT_CLIENT_POLL_US (0): >0 makes the clients poll every that many µs
#                   instead of waiting in epoll (no receiver wake-ups charged to the daemon).
#                   FANOUT_CLIENT_NICE (0): nice value of the client processes; 19 lets the
#                   daemon (and the emulator and writer) have the CPU first whenever both are
#                   runnable, so that on a shared machine the clients stand in for clients on
#                   other machines. Reported as client_nice= in every line.
#                   FANOUT_EXACT_READS (0): 1 makes each client connection read one WebSocket
#                   frame at a time (header, then exactly the payload), so that every change
#                   message ends its own read and gets its own kernel receive stamp (latency
#                   phase; costs the clients 2-3 system calls per message). Adds
#                   read_boundary_frac to the latency summary.
#                   FANOUT_DAEMON_WRAP: a command prefix that exec()s the daemon in place
#                   (e.g. "valgrind --tool=callgrind"), so that $! is still the daemon's pid.
#                   FANOUT_SERVERS (default "daemon"): the servers each phase runs against, one
#                   after the other within each run (so that runs alternate): daemon
#                   (`mongocast run`, server.io FANOUT_SERVER_IO or the default), daemon_uring
#                   and daemon_writev (server.io forced), daemon_t1 and daemon_t2
#                   (server.threads forced to 1 or 2), before (the daemon of the build
#                   directory FANOUT_BEFORE_BUILD, for before/after figures), daemon_tls (the
#                   daemon with server.tls on a self-signed P-256 certificate made by the
#                   openssl CLI, subscribers on wss://; throughput and idle phases only),
#                   floor_writev and
#                   floor_uring (throughput and latency phases only)
#                   (bench/bench_floor.c, the floor program: the same frames to the same
#                   clients with only the kernel's work, no emulator; docs/PERFORMANCE.md,
#                   "The floor"). The floor sends groups of FANOUT_FLOOR_BATCH events (a
#                   mean; default "auto": the deliveries per send of the daemon's run just
#                   before in the same phase, 1 without one), messages of
#                   FANOUT_FLOOR_MSG_BYTES (629, the daemon's message for a 200-byte
#                   document). Every line gets server=NAME (floor lines also floor_batch=B);
#                   the summary gives each server's medians and the daemon's CPU per delivery
#                   as a ratio to each floor.
set -euo pipefail
build=${1:-build}
runs=${2:-5}
select=${BENCH_SELECT:-emulator intake}
emu="$build/tools/mongo-emulator/mongo-emulator"
daemon="$build/src/daemon/mongocast"
[ -x "$emu" ] || { echo "bench: build first (make build)" >&2; exit 1; }
for b in $select; do
  [ -x "$build/bench/bench_$b" ] || {
    echo "bench: no $build/bench/bench_$b (make build)" >&2
    exit 1
  }
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# field PHASE KEY: the median of KEY over the lines of phase PHASE in $out
field() { grep "phase=$1 " "$out" | sed -n "s/.* $2=\([0-9.-]*\).*/\1/p" | median; }

out=$(mktemp)
pid=
dpid=
work=
floor_batch=1
cleanup() {
  if [ -n "$dpid" ]; then kill "$dpid" 2>/dev/null || true; fi
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  rm -f "$out" "$out.emu"
  if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

start_emulator() {
  : >"$out.emu"
  "$emu" --port 0 >"$out.emu" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$out.emu" && break; sleep 0.05; done
  port=$(sed -n 's/.*listening on .*:\([0-9]*\)$/\1/p' "$out.emu")
  [ -n "$port" ] || { echo "bench: mongo-emulator did not start" >&2; cat "$out.emu" >&2; exit 1; }
}

stop_emulator() {
  kill "$pid"; wait "$pid" || true
  pid=
}

# Starts `mongocast run` (binary $1, default $daemon; server.io $2 when given) on the running
# emulator with a generated config; sets dpid, dport; $4 non-empty: server.tls on a fresh
# self-signed certificate; $5: server.threads. $3 "blocked": also a sink that blocks
# forever (fault sink, test builds of the config only).
start_daemon() {
  local bin=${1:-$daemon} io=${2:-} tls=${4:-} threads=${5:-}
  work=$(mktemp -d)
  local tls_lines="" scheme=http
  if [ -n "$tls" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
      -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
    tls_lines="  tls: {cert_file: $work/cert.pem, key_file: $work/key.pem}"
    scheme=https
  fi
  local sinks="sinks: []"
  if [ "${3:-}" = blocked ]; then
    sinks="sinks:
  - {name: blocked, type: fault, block_after: 0, block_ms: -1, max_lag_events: 2000}"
  fi
  cat >"$work/fanout.yaml" <<EOF
mongodb:
  uri: "mongodb://127.0.0.1:$port/?replicaSet=rs0"
checkpoint:
  store: file
  path: "$work/checkpoints"
server:
  listen: 127.0.0.1:0
  max_connections: 20000
${io:+  io: $io}
$tls_lines
${threads:+  threads: $threads}
streams:
  fan:
    db: bench
    collection: fanout
    public: true
$sinks
EOF
  # shellcheck disable=SC2086  # FANOUT_DAEMON_WRAP is a command prefix, split on purpose
  MONGOCAST_TEST_SINKS=1 ${FANOUT_DAEMON_WRAP:-} "$bin" run -c "$work/fanout.yaml" \
    >"$work/daemon.out" 2>"$work/daemon.err" &
  dpid=$!
  dport=
  for _ in $(seq 600); do
    # daemon.err may not exist yet (the background job opens it): no match, try again
    dport=$(sed -n 's/.*server listening on [^ ]*:\([0-9]*\).*/\1/p' "$work/daemon.err" \
      2>/dev/null | head -1 || true)
    [ -n "$dport" ] && break
    sleep 0.05
  done
  [ -n "$dport" ] || { echo "bench: mongocast did not start" >&2; cat "$work/daemon.err" >&2; exit 1; }
  for _ in $(seq 600); do
    curl -skf "$scheme://127.0.0.1:$dport/readyz" >/dev/null && return 0
    sleep 0.05
  done
  echo "bench: mongocast not ready" >&2; cat "$work/daemon.err" >&2; exit 1
}

stop_daemon() {
  kill "$dpid"; wait "$dpid" || true
  dpid=
  rm -rf "$work"
  work=
}

# Starts bench_floor with io $1 for the phase's load; sets dpid, dport (no emulator).
start_floor() {
  local events=${FANOUT_EVENTS:-20000} rate=${FANOUT_RATE:-2000}
  if [ "$2" = latency ]; then
    rate=${FANOUT_LAT_RATE:-1000}
    events=$((rate * ${FANOUT_LAT_SECONDS:-10}))
  fi
  floor_batch=${FANOUT_FLOOR_BATCH:-auto}
  if [ "$floor_batch" = auto ]; then
    # the deliveries per send (io_uring or writev; else per write call) of the last daemon
    # run of this phase, within [1, 64]
    floor_batch=$(grep "phase=$2 " "$out" | grep -E " server=(daemon[a-z_]*|before)( |$)" |
      tail -1 | awk '{
        w = 0; s = 0
        if (match($0, / deliveries_per_write=[0-9.]+/)) w = substr($0, RSTART + 22, RLENGTH - 22) + 0
        if (match($0, / deliveries_per_send=[0-9.]+/)) s = substr($0, RSTART + 21, RLENGTH - 21) + 0
        b = s > 0 ? s : w } END {b += 0; if (b < 1) b = 1; if (b > 64) b = 64; print b}')
  fi
  work=$(mktemp -d)
  "$build/bench/bench_floor" --clients "${FANOUT_CLIENTS:-1000}" --events "$events" \
    --rate "$rate" --batch "$floor_batch" --msg-bytes "${FANOUT_FLOOR_MSG_BYTES:-629}" \
    --io "$1" 2>"$work/daemon.err" &
  dpid=$!
  dport=
  for _ in $(seq 200); do
    dport=$(sed -n 's/.*server listening on [^ ]*:\([0-9]*\).*/\1/p' "$work/daemon.err" \
      2>/dev/null | head -1 || true)
    [ -n "$dport" ] && return 0
    sleep 0.05
  done
  echo "bench: bench_floor did not start" >&2; cat "$work/daemon.err" >&2; exit 1
}

# One fan-out phase against the floor program (server $2: floor_writev or floor_uring).
floor_phase() {
  case $1 in throughput | latency) ;; *) return 0 ;; esac
  start_floor "${2#floor_}" "$1"
  local rc=0 mode_args
  if [ "$1" = throughput ]; then
    mode_args=(--events "${FANOUT_EVENTS:-20000}" --rate "${FANOUT_RATE:-2000}")
  else
    mode_args=(--rate "${FANOUT_LAT_RATE:-1000}" --seconds "${FANOUT_LAT_SECONDS:-10}")
  fi
  "$build/bench/bench_fanout" "$1" --url "ws://127.0.0.1:$dport/v1/streams/fan" --generated 1 \
    --daemon-pid "$dpid" --size "${FANOUT_DOC_BYTES:-200}" \
    --client-poll-us "${FANOUT_CLIENT_POLL_US:-0}" --client-nice "${FANOUT_CLIENT_NICE:-0}" \
    --exact-reads "${FANOUT_EXACT_READS:-0}" --clients "${FANOUT_CLIENTS:-1000}" \
    --procs "${FANOUT_PROCS:-2}" "${mode_args[@]}" >"$out.one" || rc=$?
  sed "s/\$/ server=$2 floor_batch=$floor_batch/" "$out.one" >>"$out"
  rm -f "$out.one"
  [ "$rc" = 0 ] || { echo "bench: floor phase $1 ($2) failed (rc=$rc)" >&2; cat "$work/daemon.err" >&2; }
  stop_daemon
}

# One fan-out phase ($1) against a fresh emulator and daemon (server $2: daemon, daemon_uring,
# daemon_writev or before); its report line goes to $out.
fanout_phase() {
  local srv=${2:-daemon} bin=$daemon io=${FANOUT_SERVER_IO:-} tls="" ws=ws http=http threads=
  case $srv in
    daemon_tls) tls=1 ws=wss http=https ;;
    daemon_t1) threads=1 ;;
    daemon_t2) threads=2 ;;
    daemon_uring) io=uring ;;
    daemon_writev) io=writev ;;
    before)
      bin=${FANOUT_BEFORE_BUILD:?FANOUT_BEFORE_BUILD: the build directory of the daemon before}
      bin=$bin/src/daemon/mongocast
      io=
      ;;
  esac
  start_emulator
  if [ "$1" = latency_blocked ]; then
    start_daemon "$bin" "$io" blocked "" "$threads"
  else
    start_daemon "$bin" "$io" "" "$tls" "$threads"
  fi
  local common=(--url "$ws://127.0.0.1:$dport/v1/streams/fan"
    --uri "mongodb://127.0.0.1:$port/?replicaSet=rs0" --daemon-pid "$dpid" --emulator-pid "$pid"
    --size "${FANOUT_DOC_BYTES:-200}" --client-poll-us "${FANOUT_CLIENT_POLL_US:-0}"
    --client-nice "${FANOUT_CLIENT_NICE:-0}" --exact-reads "${FANOUT_EXACT_READS:-0}")
  local rc=0
  case $1 in
    throughput)
      "$build/bench/bench_fanout" throughput "${common[@]}" --clients "${FANOUT_CLIENTS:-1000}" \
        --procs "${FANOUT_PROCS:-2}" --events "${FANOUT_EVENTS:-20000}" \
        --rate "${FANOUT_RATE:-2000}" --batch "${FANOUT_BATCH:-10}" >"$out.one" || rc=$?
      ;;
    latency | latency_blocked)
      "$build/bench/bench_fanout" latency "${common[@]}" --clients "${FANOUT_CLIENTS:-1000}" \
        --procs "${FANOUT_PROCS:-2}" --rate "${FANOUT_LAT_RATE:-1000}" \
        --seconds "${FANOUT_LAT_SECONDS:-10}" >"$out.one" || rc=$?
      sed "s/^phase=latency /phase=$1 /" "$out.one" >"$out.two"
      mv "$out.two" "$out.one"
      ;;
    idle)
      "$build/bench/bench_fanout" idle "${common[@]}" --clients "${FANOUT_CLIENTS:-1000}" \
        --procs "${FANOUT_PROCS:-2}" >"$out.one" || rc=$?
      ;;
    idle_max)
      "$build/bench/bench_fanout" idle "${common[@]}" --clients "${FANOUT_IDLE_MAX:-19000}" \
        --procs "${FANOUT_IDLE_PROCS:-4}" >"$out.two" || rc=$?
      sed 's/^phase=idle /phase=idle_max /' "$out.two" >"$out.one"
      rm -f "$out.two"
      ;;
  esac
  # The daemon's sends over its life (ready messages included; 0 for a daemon without the
  # counter), and deliveries per send over the bench window.
  local sends
  sends=$(curl -sk "$http://127.0.0.1:$dport/metrics" |
    awk '/^mongocast_socket_sends_total/ {s += $2} END {print s + 0}')
  awk -v srv="$srv" -v sends="$sends" '{
    d = 0; if (match($0, / deliveries=[0-9]+/)) d = substr($0, RSTART + 12, RLENGTH - 12)
    printf "%s server=%s daemon_sends=%d deliveries_per_send=%.2f\n", $0, srv, sends,
      (sends > 0 ? d / sends : 0) }' "$out.one" >>"$out"
  rm -f "$out.one"
  [ "$rc" = 0 ] || echo "bench: fanout phase $1 failed (rc=$rc)" >&2
  stop_daemon
  stop_emulator
}

for b in $select; do
  : >"$out"
  for i in $(seq "$runs"); do
    if [ "$b" = fanout ]; then
      for ph in ${FANOUT_PHASES:-throughput latency idle idle_max}; do
        for srv in ${FANOUT_SERVERS:-daemon}; do
          case $srv in
            daemon | daemon_uring | daemon_writev | daemon_tls | daemon_t1 | daemon_t2 | before)
              fanout_phase "$ph" "$srv" ;;
            floor_writev | floor_uring) floor_phase "$ph" "$srv" ;;
            *) echo "bench: unknown server $srv in FANOUT_SERVERS" >&2; exit 1 ;;
          esac
        done
      done
      continue
    fi
    if [ "$b" = expr ]; then
      "$build/bench/bench_expr" --iterations "${EXPR_ITERATIONS:-1000000}" >>"$out"
      continue
    fi
    start_emulator
    uri="mongodb://127.0.0.1:$port/?replicaSet=rs0"
    case $b in
      emulator)
        "$build/bench/bench_emulator" --uri "$uri" --pid "$pid" \
          --docs "${BENCH_DOCS:-200000}" --size "${BENCH_DOC_BYTES:-200}" --batch 1000 >>"$out"
        ;;
      intake)
        # Report lines on stdout; the stdout sink's output goes to --sink-out (/dev/null).
        "$build/bench/bench_intake" --uri "$uri" --docs "${INTAKE_DOCS:-200000}" \
          --size "${INTAKE_DOC_BYTES:-1024}" --sink-out /dev/null >>"$out"
        ;;
    esac
    stop_emulator
  done
  if [ -n "${BENCH_RAW:-}" ]; then sed "s/^/bench=$b /" "$out" >>"$BENCH_RAW"; fi
  case $b in
    expr)
      echo "bench_expr, $runs runs, medians (CPU ns and libbson allocations per event):"
      for c in $(sed -n 's/.* case=\([a-z_]*\) .*/\1/p' "$out" | sort -u); do
        printf '  %-26s ns_per_event %-8s allocs_per_event %s\n' "$c" \
          "$(grep "case=$c " "$out" | sed -n 's/.* ns_per_event=\([0-9.]*\).*/\1/p' | median)" \
          "$(grep "case=$c " "$out" | sed -n 's/.* allocs_per_event=\([0-9.]*\).*/\1/p' | median)"
      done
      ;;
    emulator)
      echo "bench_emulator, $runs runs, medians:"
      for key in docs_per_wall_s docs_per_emulator_cpu_s; do
        printf '  insert %-28s %s\n' "$key" "$(field insert "$key")"
      done
      for key in events_per_wall_s events_per_emulator_cpu_s; do
        printf '  changestream %-22s %s\n' "$key" "$(field changestream "$key")"
      done
      ;;
    intake)
      echo "bench_intake, $runs runs, medians (target: events_per_cpu_s >= 100000):"
      for key in events_per_cpu_s events_per_wall_s cpu_us_per_event user_s sys_s \
        watcher_thread_cpu_s sink_thread_cpu_s; do
        printf '  engine %-28s %s\n' "$key" "$(field engine "$key")"
      done
      echo "  CPU microseconds per event by stage:"
      printf '    (a) receive + BSON parse   %s   (bare mongoc_change_stream_next loop)\n' \
        "$(field raw cpu_us_per_event)"
      printf '    (b) normalise              %s   (mc_event_new_change)\n' \
        "$(field stages normalise_us)"
      printf '    (c) JSON render            %s   (mc_event_json)\n' "$(field stages json_us)"
      printf '    (d) stdout sink write      %s   (publish + flush per 256)\n' \
        "$(field stages sink_write_us)"
      printf '    (e) release                %s   (mc_event_unref)\n' "$(field stages free_us)"
      printf '    residual (queue hand-off, bookkeeping) %s   (end-to-end %s minus the stages)\n' \
        "$(field breakdown residual_us)" "$(field breakdown e2e_us)"
      printf "    (c') one-pass JSON prototype %s   (same bytes as (c); mismatches: %s)\n" \
        "$(field stages json_onepass_prototype_us)" "$(field stages prototype_mismatches)"
      ;;
    fanout)
      # mrange PHASE KEY: "median (min-max, n runs)" of KEY over the lines of phase PHASE and
      # server $srv in $out; mval PHASE KEY: the median alone
      sel() { grep "phase=$1 " "$out" | grep " server=$srv\( \|\$\)" | sed -n "s/.* $2=\([0-9.-]*\).*/\1/p"; }
      mrange() {
        sel "$1" "$2" | sort -n |
          awk '{a[NR]=$1} END {if (NR) printf "%s (%s-%s, %d runs)",
            (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2), a[1], a[NR], NR}'
      }
      mval() {
        local v
        v=$(sel "$1" "$2")
        if [ -n "$v" ]; then echo "$v" | median; fi
      }
      echo "bench_fanout, $runs runs, medians (min-max), client processes at nice" \
        "${FANOUT_CLIENT_NICE:-0}:"
      for ph in ${FANOUT_PHASES:-throughput latency idle idle_max}; do
        for srv in ${FANOUT_SERVERS:-daemon}; do
          grep "phase=$ph " "$out" | grep -q " server=$srv\( \|\$\)" || continue
          echo "  $ph ($srv):"
          case $ph in
            throughput | latency | latency_blocked)
              for key in complete deliveries_per_daemon_cpu_s deliveries_per_wall_s daemon_cpu_s \
                daemon_sys_s daemon_cpu_us_per_delivery daemon_cpu_util daemon_runq_wait_s \
                deliveries_per_write deliveries_per_send clients_cpu_s emulator_cpu_s msg_bytes \
                missing slow_closes stamp_shared_frac $(case $srv in floor_*) echo floor_batch ;; esac) \
                $([ "${FANOUT_EXACT_READS:-0}" = 0 ] || echo read_boundary_frac); do
                printf '    %-34s %s\n' "$key" "$(mrange "$ph" "$key")"
              done
              lat="lat_insert_to_client"
              [ "$ph" != throughput ] && [ "$srv" = daemon ] && lat="$lat lat_insert_to_arrival \
                lat_insert_to_ref lat_ref_to_arrival lat_ref_to_arrival_exact \
                lat_ref_to_arrival_low lat_ref_to_first fanout_spread"
              for h in $lat; do
                for q in p50 p99 p999 max; do
                  printf '    %-34s %s\n' "${h}_${q}_ms" "$(mrange "$ph" "${h}_${q}_ms")"
                done
              done
              ;;
            idle | idle_max)
              for key in clients subscribed rss_before_kib rss_kib rss_bytes_per_conn \
                anon_bytes_per_conn pss_kib kernel_tcp_bytes_per_conn_both_ends \
                kernel_slab_bytes_per_conn_both_ends daemon_fds; do
                printf '    %-34s %s\n' "$key" "$(mrange "$ph" "$key")"
              done
              ;;
          esac
        done
        # Each daemon's CPU per delivery as a ratio to each floor (medians of the same runs).
        for dsrv in daemon daemon_uring daemon_writev daemon_t1 daemon_t2 before; do
          srv=$dsrv
          d=$(mval "$ph" daemon_cpu_us_per_delivery)
          for f in floor_writev floor_uring; do
            srv=$f
            fl=$(mval "$ph" daemon_cpu_us_per_delivery)
            if [ -z "$d" ] || [ -z "$fl" ]; then continue; fi
            printf '  %s: %s CPU per delivery / %s = %s / %s = %s\n' "$ph" "$dsrv" "$f" "$d" \
              "$fl" "$(awk -v a="$d" -v b="$fl" 'BEGIN {if (b > 0) printf "%.2f", a / b}')"
          done
        done
      done
      ;;
  esac
done
