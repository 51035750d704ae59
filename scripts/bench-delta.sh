#!/usr/bin/env bash
# What delta compression and tag filters cost and save, side by side in one invocation, on the
# node's own fan-out path (`holdfast-bench fanout`: a real node, in-memory transports, one worker
# thread pinned to core 0, so the figures are CPU per delivery without kernel noise).
#
#   scripts/bench-delta.sh                 # 5 alternating runs of each pair
#   RUNS=3 SUBSCRIBERS=2000 scripts/bench-delta.sh
#
# Pair 1, AI token streaming: 1,000 subscribers, 300 publications that each carry the whole
# answer so far (2–4 KiB, a few words more each time), without and with fossil deltas: bytes and
# nanoseconds per delivery. Pair 2: 10,000 subscribers, 100-byte publications, without and with a
# tag filter on every subscriber. Runs alternate (plain, feature, plain, …) and the summary gives
# medians and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
subs="${SUBSCRIBERS:-1000}"
filter_subs="${FILTER_SUBSCRIBERS:-10000}"
cargo build --release -q -p holdfast-bench
bin=target/release/holdfast-bench
out="$(mktemp -d -t holdfast-delta-XXXX)"
trap 'rm -rf "$out"' EXIT

one() { # name, args…
  local name="$1"
  shift
  taskset -c 0 "$bin" fanout --json --runs 1 "$@" >>"$out/$name.jsonl"
}

for i in $(seq 1 "$runs"); do
  echo "== round $i of $runs" >&2
  one answer-full --subscribers "$subs" --publications 300 --answer
  one answer-delta --subscribers "$subs" --publications 300 --answer --delta
  one plain --subscribers "$filter_subs" --publications 200
  one filtered --subscribers "$filter_subs" --publications 200 --tags-filter
done

python3 - "$out" <<'EOF'
import json, pathlib, statistics, sys
d = pathlib.Path(sys.argv[1])
def med(name, key):
    rows = [json.loads(l) for l in (d / f"{name}.jsonl").read_text().splitlines() if l.strip()]
    return statistics.median(r[key] for r in rows), len(rows)
print("| Case | Runs | ns per delivery (median) | bytes per delivery (median) |")
print("|---|---|---|---|")
for name in ["answer-full", "answer-delta", "plain", "filtered"]:
    ns, n = med(name, "ns_per_delivery")
    b, _ = med(name, "bytes_per_delivery")
    print(f"| {name} | {n} | {ns:,.0f} | {b:,.0f} |")
fb, _ = med("answer-full", "bytes_per_delivery")
db, _ = med("answer-delta", "bytes_per_delivery")
fns, _ = med("answer-full", "ns_per_delivery")
dns, _ = med("answer-delta", "ns_per_delivery")
pns, _ = med("plain", "ns_per_delivery")
tns, _ = med("filtered", "ns_per_delivery")
print()
print(f"delta: {100 * (1 - db / fb):.1f} % fewer bytes per delivery; CPU per delivery {dns / fns:.2f}x without delta")
print(f"tag filter on every subscriber: CPU per delivery {tns / pns:.2f}x without")
EOF
