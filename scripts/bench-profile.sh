#!/usr/bin/env bash
# Where the server's time goes in one benchmark step: runs `holdfast-bench bench` for a single
# scenario and rate, attaches `perf record` (software clock, call graphs) to the server process
# for the middle of the step and prints the top symbols, by DSO (kernel vs user space) and by
# symbol. docs/BENCHMARKS.md quotes its output.
#
#   scripts/bench-profile.sh                         # Holdfast, S2, 50 publications/s
#   SERVER=raw RATE=100 scripts/bench-profile.sh
#   SCENARIO=s3 RATE=10000 scripts/bench-profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
server="${SERVER:-holdfast}"
scenario="${SCENARIO:-s2}"
rate="${RATE:-50}"
command -v perf >/dev/null || {
  echo "needs perf (Debian: linux-perf)" >&2; exit 1; }
cargo build --release --bins -q
out="$(mktemp -d -t holdfast-profile-XXXX)"
trap 'rm -rf "$out"' EXIT
before="$(pgrep -d' ' -f 'holdfast serve|holdfast-bench baseline|socketio/server.js|socketioxide-peer|fastapi/server.py|bin/sockudo' || true)"
taskset -c 1 target/release/holdfast-bench bench --scenarios "$scenario" --servers "$server" \
  --runs 1 --rates "$rate" --step-seconds 20 --out "$out/results" > "$out/bench.log" 2>&1 &
bench=$!
pid=""
for _ in $(seq 1 600); do
  for p in $(pgrep -f 'holdfast serve|holdfast-bench baseline|socketio/server.js|socketioxide-peer|fastapi/server.py|bin/sockudo' || true); do
    case " $before " in *" $p "*) ;; *) [ "$p" != "$bench" ] && pid="$p" ;; esac
  done
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "server did not start" >&2; cat "$out/bench.log" >&2; exit 1; }
# Connections open, then the step's warm-up; record 8 s of the measured part.
sleep "${WAIT:-12}"
perf record -e cpu-clock -F 999 -g -p "$pid" -o "$out/perf.data" -- sleep 8 2>/dev/null
wait "$bench" || true
grep -E "^S[0-9]" "$out/bench.log" || true
echo "== $server, $scenario at $rate publications/s: share of server CPU by DSO"
perf report -i "$out/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -6
echo "== by symbol (self time)"
perf report -i "$out/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -${TOP:-25} | cut -c1-130
echo "== by symbol including callees (send path)"
perf report -i "$out/perf.data" --children --sort symbol --stdio 2>/dev/null | grep -E "^ +[0-9]" | grep -E "__send|tcp_sendmsg|sock_def_readable|_raw_spin_unlock_irqrestore|on_publication|write_loop|epoll_wait" | head -10 | cut -c1-130
