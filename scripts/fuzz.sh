#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20) on a copy of the seed corpus; fails on
# any crash. Needs nightly Rust and cargo-fuzz (installed here when missing).
#
#   scripts/fuzz.sh                      # 20 s per target
#   FUZZ_SECONDS=1800 scripts/fuzz.sh    # the documented long run
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-20}"
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
mkdir -p artifacts/fuzz
for target in json_frame protobuf_frame session_frame ws_frames; do
  work="$(mktemp -d -t "fuzz-$target-XXXX")"
  cp -r "fuzz/corpus/$target/." "$work/"
  echo "fuzz: $target for ${secs}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$work" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    2> "artifacts/fuzz/$target.log" || { tail -50 "artifacts/fuzz/$target.log"; rm -rf "$work"; exit 1; }
  grep -E '^stat::number_of_executed_units|^Done' "artifacts/fuzz/$target.log" | tail -1
  rm -rf "$work"
done
