#!/usr/bin/env bash
# Runs every libFuzzer target in BUILD_DIR for SECONDS seconds each, seeded from
# tests/fuzz/corpus/<target>/ when it exists. Fails on the first crash, leak or timeout.
set -euo pipefail
build=${1:?usage: fuzz-smoke.sh BUILD_DIR [SECONDS]}
secs=${2:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
found=0
for bin in "$build"/tests/fuzz/fuzz_*; do
  [ -x "$bin" ] || continue
  found=1
  name=$(basename "$bin")
  work=$(mktemp -d)
  seeds=()
  [ -d "$root/tests/fuzz/corpus/$name" ] && seeds=("$root/tests/fuzz/corpus/$name")
  echo "fuzz-smoke: $name for ${secs}s"
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=0 \
    "$work" "${seeds[@]}" >"$work.log" 2>&1 || { tail -40 "$work.log"; exit 1; }
  grep -E '^#[0-9]+.*DONE' "$work.log" | tail -1 || true
  rm -rf "$work" "$work.log"
done
[ $found -eq 1 ] || echo "fuzz-smoke: no fuzz targets built"
