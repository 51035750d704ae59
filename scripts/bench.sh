#!/usr/bin/env bash
# The side-by-side benchmark (docs/BENCHMARKS.md): installs the peers, builds release binaries,
# runs the scenarios S1–S6 with `holdfast-bench bench` on core 1 (each server is pinned to
# core 0), 3 runs each, then writes the tables and plots with `holdfast-bench report`.
#
#   scripts/bench.sh                      # full run (about an hour on 2 cores)
#   scripts/bench.sh --scenarios s2,s3    # extra arguments go to `holdfast-bench bench`
#   QUICK=1 scripts/bench.sh              # seconds-long smoke run into target/bench-quick
#                                           (the test command runs this with debug binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${QUICK:-}" ]; then
  bin="${BIN_DIR:-target/debug}"
  out=target/bench-quick
  rm -rf "$out"
  "$bin/holdfast-bench" bench --quick --runs 1 --bin-dir "$bin" --out "$out/results" \
    --servers "${SERVERS:-holdfast,holdfast-protobuf,holdfast-sse,raw,socketio,fastapi}" "$@"
  "$bin/holdfast-bench" report --results "$out/results" --out "$out/BENCHMARKS.md" \
    --plots "$out/plots" --command "QUICK=1 scripts/bench.sh"
  for p in s1-memory s2-throughput s2-latency-cdf s3-throughput s3-latency-cdf; do
    [ -s "$out/plots/$p.png" ] || { echo "missing plot $p.png" >&2; exit 1; }
  done
  grep -q "S6: S2 across two nodes" "$out/BENCHMARKS.md"
  # The step tables: latency and CPU per delivery against the raw baseline at each step.
  for sc in S2 S3; do
    grep -q "^$sc step by step" "$out/BENCHMARKS.md"
  done
  grep -Eq '^\| [0-9,]+ \| [0-9.]+ ms\*? \([0-9.]+×\) \| [0-9,]+ ns \([0-9.]+×\)' "$out/BENCHMARKS.md"
  # Every run must have worked (a peer failing is a failure of the smoke test).
  failed="$(grep -L '"error": null' "$out"/results/*.json || true)"
  if [ -n "$failed" ]; then
    echo "benchmark runs failed:" >&2
    for f in $failed; do echo "  $f: $(grep '"error"' "$f")" >&2; done
    exit 1
  fi
  echo "quick benchmark: report in $out/BENCHMARKS.md"
  exit 0
fi
scripts/bench-peers.sh
cargo build --release --bins
rm -rf target/bench/results
taskset -c 1 target/release/holdfast-bench bench --runs "${RUNS:-3}" --step-seconds "${STEP_SECONDS:-3}" \
  --out target/bench/results "$@"
target/release/holdfast-bench report --results target/bench/results --out docs/BENCHMARKS.md \
  --plots docs/bench --command "scripts/bench.sh"
