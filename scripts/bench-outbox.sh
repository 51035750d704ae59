#!/usr/bin/env bash
# Outbox throughput: rows committed per second → publications stored → deliveries, with the lag
# from a row's insert to its delivery (p50/p99), for the PostgreSQL consumer with LISTEN/NOTIFY
# and with polling only, on one node and on two nodes sharing the table (Redis engine in both
# cases, so only the node count differs). Each configuration is a `holdfast-bench verify
# --source postgres` run (writers commit rows one transaction each, a tenth rolled back; every
# committed row must be stored once, in order: the run fails otherwise), medians of RUNS runs.
#
#   scripts/bench-outbox.sh                    # RATES="500 2000", RUNS=3, 20 s each
#   RATES=1000 RUNS=1 DURATION=10 scripts/bench-outbox.sh
#
# Release binaries; PostgreSQL (initdb in a temporary directory) and redis-server are started
# here. The summary is markdown (docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rates="${RATES:-500 2000}"
runs="${RUNS:-3}"
duration="${DURATION:-20}"
cargo build --release -q --bin holdfast --bin holdfast-bench
bin=target/release
state="$(mktemp -d -t holdfast-outbox-XXXX)"
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT

mkdir -p "$state/pg" "$state/out"
if [ "$(id -u)" -eq 0 ]; then chmod 755 "$state"; chown postgres "$state/pg"; fi
pg_port="$(free_port)"
as_pg "$pg_bin/initdb" -D "$state/pg/data" -U postgres --auth=trust --no-sync >/dev/null
# Durable commits (the default synchronous_commit), as a production database would have.
as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/log" -w \
  -o "-p $pg_port -k $state/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
dsn="postgresql://postgres@127.0.0.1:$pg_port/postgres"
psql -q "$dsn" -v ON_ERROR_STOP=1 -f deploy/postgresql/outbox.sql
redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$state" \
  > "$state/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 400); do redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.025; done

start_nodes() { # nodes, notify(yes|no) → sets urls, apis
  local n="$1" notify="$2" channel=""
  [ "$notify" = yes ] && channel="holdfast_outbox"
  export HOLDFAST_ENGINE_TYPE=redis HOLDFAST_ENGINE_REDIS_ADDRESS="redis://127.0.0.1:$redis_port"
  export HOLDFAST_CONSUMERS='[{"name":"bench","type":"postgresql","enabled":true,"postgresql":{"dsn":"'"$dsn"'","outbox_table_name":"holdfast_outbox","num_partitions":4,"partition_notification_channel":"'"$channel"'"}}]'
  urls="" apis="" node_pids=()
  for i in $(seq 1 "$n"); do
    local port
    port="$(free_port)"
    HOSTNAME="bench-$i" "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
      --address 127.0.0.1 --port "$port" > "$state/node$i.log" 2>&1 &
    node_pids+=($!)
    pids+=($!)
    for _ in $(seq 1 400); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.025; done
    urls="${urls:+$urls,}ws://127.0.0.1:$port/connection/websocket"
    apis="${apis:+$apis,}http://127.0.0.1:$port"
  done
}

stop_nodes() {
  for p in "${node_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}

for rate in $rates; do
  for nodes in 1 2; do
    for notify in yes no; do
      for r in $(seq 1 "$runs"); do
        echo "== rate $rate/s, $nodes node(s), LISTEN/NOTIFY $notify, run $r of $runs" >&2
        start_nodes "$nodes" "$notify"
        "$bin/holdfast-bench" verify --url "$urls" --api "$apis" --api-key verify-api-key \
          --secret verify-secret --quiet --check --source postgres --source-url "$dsn" \
          --source-partitions 4 --subscribers 200 --channels 20 --duration "$duration" \
          --api-rate "$rate" --client-rate 0 --drain 60 \
          --report "$state/out/$rate-$nodes-$notify-$r.json" 2> "$state/verify.log" \
          || { cat "$state/verify.log" >&2; exit 1; }
        stop_nodes
      done
    done
  done
done

python3 - "$state/out" "$duration" <<'EOF'
import json, pathlib, statistics, sys
d, duration = pathlib.Path(sys.argv[1]), float(sys.argv[2])
rows = {}
for f in sorted(d.glob("*.json")):
    rate, nodes, notify, _ = f.stem.split("-")
    r = json.load(open(f))
    rows.setdefault((int(rate), int(nodes), notify), []).append(r)
med = statistics.median
print("| Offered writes/s (a tenth rolled back) | Nodes | Wake-up | Committed rows/s | Stored | Deliveries/s | Lag p50 | Lag p99 |")
print("|---|---|---|---|---|---|---|---|")
for (rate, nodes, notify), rs in sorted(rows.items()):
    committed = med(r["source"]["committed"] / duration for r in rs)
    stored = "all" if all(r["source"]["stored"] == r["source"]["committed"] for r in rs) else "NOT ALL"
    deliveries = med(r["delivered"] / duration for r in rs)
    p50 = med(r["delivery_ms"]["p50"] for r in rs)
    p99 = med(r["delivery_ms"]["p99"] for r in rs)
    wake = "LISTEN/NOTIFY" if notify == "yes" else "poll 300 ms"
    print(f"| {rate:,} | {nodes} | {wake} | {committed:,.0f} | {stored} | {deliveries:,.0f} | {p50:.1f} ms | {p99:.1f} ms |")
EOF
