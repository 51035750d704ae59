#!/usr/bin/env bash
# Soak: well-behaved clients next to abusive ones, bounded in time, on loopback.
#
#   scripts/soak.sh                  # 10 minutes (DURATION=600), 5,000 good subscribers
#   DURATION=60 GOOD=1000 scripts/soak.sh
#
# One release server (default configuration limits, memory engine) pinned to core 0. On core 1:
#   - `holdfast-bench verify`: GOOD subscribers over 50 channels from 4 source addresses,
#     100 API publishes/s, --check (fails on anything lost silently, duplicated or out of order);
#   - `holdfast-bench abuse` from 127.0.0.250: garbage frames, slowloris upgrades, subscribers that
#     never read a channel flooded with 4 KiB publications, reconnect loops.
# Every 5 s the server's RSS and open file count go to artifacts/soak.csv; the summary (good
# clients' delivery p99, memory and fds at start/middle/end, abuse tally) goes to
# artifacts/soak.txt. docs/OPERATIONS.md quotes a 10-minute run.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-600}"
good="${GOOD:-5000}"
cargo build --release -p holdfast-server -p holdfast-bench
bin=target/release
work="$(mktemp -d -t holdfast-soak-XXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p artifacts

# The verifier's namespace, plus one without history for the flood the never-readers ignore.
export HOLDFAST_CHANNEL_NAMESPACES='[{"name":"verify","history_size":20000,"history_ttl":"600s","force_recovery":true,"allow_subscribe_for_client":true,"allow_publish_for_client":true},{"name":"abuse","allow_subscribe_for_client":true}]'
taskset -c 0 "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
  --address 127.0.0.1 --port "$port" > "$work/server.log" 2>&1 &
echo $! > "$work/pid"
pid="$(cat "$work/pid")"
for _ in $(seq 1 400); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.025; done

echo "t_s,rss_kib,fds,connections" > artifacts/soak.csv
(
  start=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    conns=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '/^holdfast_connections_active / {print $2}' || true)
    echo "$(( $(date +%s) - start )),$rss,$fds,${conns:-0}" >> artifacts/soak.csv
    sleep 5
  done
) &
sampler=$!

url="ws://127.0.0.1:$port/connection/websocket"
api="http://127.0.0.1:$port"
taskset -c 1 "$bin/holdfast-bench" abuse --url "$url" --api "$api" --api-key verify-api-key \
  --secret verify-secret --channel abuse:busy --flood-rate 50 --duration "$duration" \
  2> "$work/abuse.txt" &
abuser=$!
status=0
taskset -c 1 "$bin/holdfast-bench" verify --url "$url" --api "$api" --api-key verify-api-key \
  --secret verify-secret --subscribers "$good" --channels 50 --duration "$duration" \
  --api-rate 100 --client-rate 0 --source-ips 4 --drain 30 --quiet --check \
  --report artifacts/soak-verify.json 2> "$work/verify.txt" || status=$?
wait "$abuser" || true
kill "$sampler" 2>/dev/null || true

{
  echo "soak: ${duration} s, ${good} good subscribers, abuse from 127.0.0.250 (command: scripts/soak.sh)"
  echo
  echo "good clients (holdfast-bench verify --check):"
  sed 's/^/  /' "$work/verify.txt"
  echo
  cat "$work/abuse.txt"
  echo
  python3 - artifacts/soak.csv "$good" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if rows:
    # "start" is the first sample with every good client connected.
    good = int(sys.argv[2])
    full = [r for r in rows if float(r["connections"] or 0) >= good] or rows
    pick = [full[0], full[len(full) // 2], full[-1]]
    print(f"server samples at t = {pick[0]['t_s']} / {pick[1]['t_s']} / {pick[2]['t_s']} s:")
    for name, key in [("RSS MiB", "rss_kib"), ("open files", "fds"), ("connections", "connections")]:
        vals = [float(r[key] or 0) for r in pick]
        if key == "rss_kib":
            vals = [v / 1024 for v in vals]
        print(f"  {name:<12} " + " / ".join(f"{v:,.0f}" for v in vals)
              + f"   (max {max(float(r[key] or 0) / (1024 if key == 'rss_kib' else 1) for r in rows):,.0f})")
PY
} | tee artifacts/soak.txt
exit "$status"
