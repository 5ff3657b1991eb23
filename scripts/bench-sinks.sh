#!/usr/bin/env bash
# Raw throughput of the sink clients (src/lib/sinks/), RUNS runs per mode, medians printed as
#   mode=... ev_per_cpu_s=<median> (min-max) ev_per_s=... broker_cpu_s=... ev_per_broker_cpu_s=...
# Usage: scripts/bench-sinks.sh BUILD_DIR [RUNS]     (docs/PERFORMANCE.md, "Sink clients")
#   SINK_MODES   default: redis_xadd redis_publish redis_raw_sync redis_raw_debian nats_js
#                nats_core mongo_insert webhook webhook_batch
#   SINK_EVENTS  events per run (default 200000; webhook modes: SINK_WEBHOOK_EVENTS, 20000)
#   SINK_SIZE    document size in bytes (default 1024)
#   SINK_DAEMON_EVENTS  events per run of the daemon_* modes (default 100000)
# The daemon_* modes run the real daemon (bench/daemon_sink_bench.py): daemon_redis (type:
# redis, mode: stream), daemon_jetstream (type: nats, mode: jetstream), daemon_stdout (the
# reference: the same daemon into a stdout sink); their ev_per_cpu_s is per daemon CPU-second.
# bench_sinks starts its own broker per run (redis-server, nats-server -js, mongo-emulator) on
# a free loopback port; the webhook modes start tests/integration/webhook_receiver.py (no
# faults) and run tests/integration/clients/webhook_client against it, one event per request
# (webhook) or 100 per request (webhook_batch), 8 requests in flight over keep-alive. Every
# child is stopped by pid.
set -euo pipefail
build=${1:-build}
runs=${2:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
modes=${SINK_MODES:-"redis_xadd redis_publish redis_raw_sync redis_raw_debian nats_js nats_core mongo_insert webhook webhook_batch daemon_stdout daemon_redis daemon_jetstream"}
daemon_events=${SINK_DAEMON_EVENTS:-100000}
events=${SINK_EVENTS:-200000}
wh_events=${SINK_WEBHOOK_EVENTS:-20000}
size=${SINK_SIZE:-1024}
secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
out=$(mktemp)
rpid=
cleanup() {
  if [ -n "$rpid" ]; then kill "$rpid" 2>/dev/null || true; fi
  rm -f "$out" "$out.recv"
}
trap cleanup EXIT

pid_cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

webhook_run() { # mode batch
  : >"$out.recv"
  /usr/bin/python3 "$root/tests/integration/webhook_receiver.py" --secret "$secret" >"$out.recv" 2>&1 &
  rpid=$!
  for _ in $(seq 100); do grep -q listening "$out.recv" && break; sleep 0.05; done
  local port
  port=$(sed -n 's/.*127.0.0.1:\([0-9]*\)$/\1/p' "$out.recv")
  local c0 c1 line
  c0=$(pid_cpu "$rpid")
  line=$("$build/tests/integration/clients/webhook_client" --url "http://127.0.0.1:$port/hook" \
    --secret "$secret" --events "$wh_events" --keys 100 --concurrency 8 --size "$size" \
    --batch "$2" --timeout-ms 10000 2>/dev/null)
  c1=$(pid_cpu "$rpid")
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
  rpid=
  echo "$line" | /usr/bin/python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); mode, bcpu = sys.argv[1], float(sys.argv[2])
print("mode=%s events=%d wall_s=%.3f cpu_s=%.3f ev_per_cpu_s=%.0f ev_per_s=%.0f broker_cpu_s=%.3f "
      "ev_per_broker_cpu_s=%.0f requests=%d" % (mode, r["delivered"], r["wall_s"], r["cpu_s"],
      r["delivered"] / r["cpu_s"], r["delivered"] / r["wall_s"], bcpu,
      r["delivered"] / bcpu if bcpu > 0 else 0, r["requests"]))' "$1" "$(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')"
}

for m in $modes; do
  for _ in $(seq "$runs"); do
    case $m in
      webhook) webhook_run webhook 1 >>"$out" ;;
      webhook_batch) webhook_run webhook_batch 100 >>"$out" ;;
      daemon_stdout|daemon_redis|daemon_jetstream)
        # the whole daemon (`mongocast run`) with that sink: bench/daemon_sink_bench.py
        /usr/bin/python3 "$root/bench/daemon_sink_bench.py" "$build" "${m#daemon_}" \
          --events "$daemon_events" --size "$size" 2>/dev/null |
          sed "s/^mode=[a-z]*/mode=$m/; s/ev_per_daemon_cpu_s/ev_per_cpu_s/" >>"$out" ;;
      *) "$build/bench/bench_sinks" "$m" --events "$events" --size "$size" 2>/dev/null >>"$out" ;;
    esac
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for m in $modes; do
  line="mode=$m"
  for k in ev_per_cpu_s ev_per_s broker_cpu_s ev_per_broker_cpu_s; do
    vals=$(grep "^mode=$m " "$out" | sed -n "s/.* $k=\([0-9.]*\).*/\1/p")
    [ -n "$vals" ] || continue
    line="$line $k=$(echo "$vals" | median) ($(echo "$vals" | sort -n | head -1)-$(echo "$vals" | sort -n | tail -1))"
  done
  echo "$line"
done
