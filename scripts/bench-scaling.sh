#!/usr/bin/env bash
# In-process scaling of the delivery path with worker threads (docs/BENCHMARKS.md, "Cores"):
# `holdfast-bench fanout` at 1 and 2 threads (this machine has 2 cores), with the subscribers
# in one channel and spread over 8 channels published at once. The cases alternate, ROUNDS
# times, and the medians are printed as a Markdown table.
#
#   scripts/bench-scaling.sh                 # 10,000 subscribers, 3 rounds
#   SUBSCRIBERS=20000 ROUNDS=5 scripts/bench-scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
subs="${SUBSCRIBERS:-10000}"
rounds="${ROUNDS:-3}"
pubs="${PUBLICATIONS:-300}"
cargo build --release -q -p holdfast-bench
bin=target/release/holdfast-bench
out="$(mktemp -d -t holdfast-scaling-XXXX)"
trap 'rm -rf "$out"' EXIT
cases=("1 1" "2 1" "1 8" "2 8")
for r in $(seq 1 "$rounds"); do
  for c in "${cases[@]}"; do
    set -- $c
    echo "round $r: $1 thread(s), $2 channel(s)" >&2
    "$bin" fanout --subscribers "$subs" --publications "$pubs" --runs 3 --json \
      --threads "$1" --channels "$2" 2>/dev/null >> "$out/t$1-c$2.jsonl"
  done
done
python3 - "$out" "$subs" <<'PY'
import json, pathlib, statistics, sys
out, subs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for threads in (1, 2):
    for channels in (1, 8):
        runs = [json.loads(l) for l in (out / f"t{threads}-c{channels}.jsonl").read_text().splitlines() if l]
        rows[(threads, channels)] = (
            statistics.median(r["per_s"] for r in runs),
            statistics.median(r["cpu_ns_per_delivery"] for r in runs),
            statistics.median(r["cores_busy"] for r in runs),
            len(runs),
        )
print(f"| Subscribers ({subs:,}) | Threads | Deliveries/s | vs 1 thread | CPU per delivery | Cores busy | Runs |")
print("|---|---|---|---|---|---|---|")
for channels in (1, 8):
    base = rows[(1, channels)][0]
    for threads in (1, 2):
        per_s, cpu, busy, n = rows[(threads, channels)]
        where = "one channel" if channels == 1 else f"{channels} channels, published at once"
        print(f"| {where} | {threads} | {per_s:,.0f} | {per_s / base:.2f}× | {cpu:,.0f} ns | {busy:.2f} | {n} |")
PY
