#!/usr/bin/env bash
# Runs the benchmarks against a release build and prints the median of RUNS runs of each
# figure. Usage: scripts/bench.sh BUILD_DIR [RUNS]   (make bench uses build/ and 5 runs)
# Each run starts a fresh mongo-emulator on a free loopback port and stops it by pid.
#   BENCH_SELECT   which benchmarks, default "emulator intake"
#   BENCH_RAW      if set, every run's raw key=value lines are appended to this file
#   bench_emulator: BENCH_DOCS (200000), BENCH_DOC_BYTES (200)
#   bench_intake:   INTAKE_DOCS (200000), INTAKE_DOC_BYTES (1024); the engine's stdout sink
#                   writes to /dev/null (docs/PERFORMANCE.md, "Engine intake")
set -euo pipefail
build=${1:-build}
runs=${2:-5}
select=${BENCH_SELECT:-emulator intake}
emu="$build/tools/mongo-emulator/mongo-emulator"
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
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  rm -f "$out" "$out.emu"
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

for b in $select; do
  : >"$out"
  for i in $(seq "$runs"); do
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
        watcher_thread_cpu_s dispatch_thread_cpu_s; do
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
  esac
done
