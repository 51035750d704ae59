#!/usr/bin/env bash
# Compares the server of an earlier revision (A) with the working tree's (B) on one scenario,
# side by side in one invocation: runs alternate A, B, A, B, … so both see the same machine
# state, and the summary gives each run's figures and the medians.
#
#   scripts/bench-ab.sh HEAD~1                       # S2, Holdfast JSON, 3 runs each
#   RUNS=5 SCENARIO=s1,s3 SERVER=holdfast-protobuf scripts/bench-ab.sh 959cc4d
#   EXTRA="--subscribers 5000 --step-seconds 3" scripts/bench-ab.sh main
#   SCENARIO=fanout RUNS=5 scripts/bench-ab.sh HEAD~1  # in-process fan-out, no sockets
#   SCENARIO=publish ENGINE=disk-fsync scripts/bench-ab.sh HEAD~1   # acknowledged API publishes
#       (ENGINE: memory, disk-fsync or disk-os; CONCURRENCY, DURATION as in bench-engines.sh)
#
# A is built in a git worktree sharing this checkout's target directory (dependencies are not
# rebuilt); its binaries are kept in target/ab/a. Results: target/ab/results-{a,b}. The fanout
# scenario (`holdfast-bench fanout`, pinned to core 0) needs a revision that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/bench-ab.sh <git revision>}"
scenario="${SCENARIO:-s2}"
server="${SERVER:-holdfast}"
runs="${RUNS:-3}"
root="$PWD"
target="$root/target"
mkdir -p "$target/ab/a" "$target/ab/b"
rm -rf "$target/ab/results-a" "$target/ab/results-b"

echo "== building A ($rev)"
tree="$(mktemp -d -t holdfast-ab-XXXX)"
trap 'git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$tree"' EXIT
git worktree add --detach "$tree" "$rev" >/dev/null
(cd "$tree" && CARGO_TARGET_DIR="$target" cargo build --release -q --bins)
cp "$target/release/holdfast" "$target/release/holdfast-bench" "$target/ab/a/"
git -C "$tree" rev-parse --short HEAD > "$target/ab/a/REV"

echo "== building B (working tree)"
# A's workspace crates were built into the same target directory under the same artifact names
# (cargo hashes path dependencies relative to the workspace root), and newer than B's sources:
# touch B's sources so cargo rebuilds them instead of taking A's.
find crates examples -name '*.rs' -exec touch {} +
cargo build --release -q --bins
cp "$target/release/holdfast" "$target/release/holdfast-bench" "$target/ab/b/"

for i in $(seq 1 "$runs"); do
  for side in a b; do
    echo "== run $i, $side"
    if [ "$scenario" = publish ]; then
      mkdir -p "$target/ab/results-$side"
      data="$(mktemp -d -t holdfast-ab-data-XXXX)"
      port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
      case "${ENGINE:-disk-fsync}" in
        memory) env=(HOLDFAST_ENGINE_TYPE=memory) ;;
        disk-fsync) env=(HOLDFAST_ENGINE_TYPE=disk HOLDFAST_ENGINE_DISK_DURABILITY=fsync HOLDFAST_ENGINE_DISK_PATH="$data") ;;
        disk-os) env=(HOLDFAST_ENGINE_TYPE=disk HOLDFAST_ENGINE_DISK_DURABILITY=os HOLDFAST_ENGINE_DISK_PATH="$data") ;;
      esac
      (env "${env[@]}" taskset -c 0 "$target/ab/$side/holdfast" serve \
        --config crates/holdfast-bench/verify-server.toml --address 127.0.0.1 --port "$port" \
        > "$data.log" 2>&1 & echo $! > "$data.pid")
      for _ in $(seq 1 400); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.025; done
      taskset -c 1 "$target/ab/b/holdfast-bench" publish --api "http://127.0.0.1:$port" \
        --api-key verify-api-key --concurrency "${CONCURRENCY:-32}" --duration "${DURATION:-5}" \
        --report "$target/ab/results-$side/publish-$i.json" ${EXTRA:-}
      kill "$(cat "$data.pid")"; while kill -0 "$(cat "$data.pid")" 2>/dev/null; do sleep 0.02; done
      rm -rf "$data" "$data.log" "$data.pid"
      continue
    fi
    if [ "$scenario" = fanout ]; then
      mkdir -p "$target/ab/results-$side"
      taskset -c 0 "$target/ab/$side/holdfast-bench" fanout --runs 3 --json ${EXTRA:-} \
        > "$target/ab/results-$side/fanout-$i.jsonl"
      tail -1 "$target/ab/results-$side/fanout-$i.jsonl"
      continue
    fi
    taskset -c 1 "$target/ab/b/holdfast-bench" bench --scenarios "$scenario" \
      --servers "$server" --runs 1 --bin-dir "$target/ab/$side" \
      --out "$target/ab/results-$side/$i" ${EXTRA:-} | grep -E '^S[0-9]' || true
  done
done

python3 - "$target/ab" "$scenario" "$server" "$(cat "$target/ab/a/REV")" <<'EOF'
import glob, json, statistics, sys
base, scenario, server, rev = sys.argv[1:]

def figures(d):
    """Headline figures of one run of the scenario."""
    steps = [s for s in d.get("steps") or [] if not s["overloaded"]]
    out = {}
    if steps:
        best = max(steps, key=lambda s: s["delivered_s"])
        out["kept up (deliveries/s)"] = best["delivered_s"]
        out["p99 there (ms)"] = best["p99_ms"]
    stages = d.get("stages") or []
    if len(stages) >= 2 and stages[-1]["connections"] > stages[0]["connections"]:
        a, b = stages[0], stages[-1]
        n = b["connections"] - a["connections"]
        out["user space per connection (KiB)"] = (b["rss_kib"] - a["rss_kib"]) / n
    storm = d.get("storm")
    if storm:
        out["connects/s"] = storm["per_s"]
        out["connect p99 (ms)"] = storm["p99_ms"]
    return out

rows = {}
if scenario == "fanout":
    server = "in-process"
    for side in ("a", "b"):
        for f in sorted(glob.glob(f"{base}/results-{side}/fanout-*.jsonl")):
            for line in open(f):
                r = json.loads(line)
                for k, v in (("deliveries/s", r["per_s"]), ("ns per delivery", r["ns_per_delivery"])):
                    rows.setdefault(k, {"a": [], "b": []})[side].append(v)
if scenario == "publish":
    server = "API publish"
    for side in ("a", "b"):
        for f in sorted(glob.glob(f"{base}/results-{side}/publish-*.json")):
            r = json.load(open(f))
            for k in ("per_second", "p50_ms", "p99_ms"):
                rows.setdefault(k, {"a": [], "b": []})[side].append(r[k])
for side in ("a", "b") if scenario not in ("fanout", "publish") else ():
    for sc in scenario.split(","):
        for f in sorted(glob.glob(f"{base}/results-{side}/*/{sc}-{server}-*.json")):
            d = json.load(open(f))
            if d.get("error"):
                print(f"{side}: {f}: {d['error']}")
                continue
            for k, v in figures(d).items():
                rows.setdefault(f"{sc.upper()} {k}", {"a": [], "b": []})[side].append(v)

print(f"\n{scenario} {server}: A = {rev}, B = working tree")
print("| Figure | A runs | B runs | A median | B median | B / A |")
print("|---|---|---|---|---|---|")
for k, v in rows.items():
    if not v["a"] or not v["b"]:
        continue
    ma, mb = statistics.median(v["a"]), statistics.median(v["b"])
    fmt = lambda xs: ", ".join(f"{x:,.2f}" for x in xs)
    ratio = f"{mb / ma:.2f}×" if ma else "—"
    print(f"| {k} | {fmt(v['a'])} | {fmt(v['b'])} | {ma:,.2f} | {mb:,.2f} | {ratio} |")
EOF
