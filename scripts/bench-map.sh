#!/usr/bin/env bash
# A map channel under load (issue 23's scenario): a release server pinned to core 0 with a
# persistent map namespace, and `holdfast-bench map` on core 1: KEYS keys written through the
# API, SUBSCRIBERS WebSocket subscribers paging through the whole state to the live phase, then
# RATE updates/s for DURATION s. Prints the JSON report (fill rate, memory per key, snapshot
# time alone and in the storm, update latency, deliveries). docs/BENCHMARKS.md quotes it.
#
#   scripts/bench-map.sh                                   # 10,000 keys, 10,000 subscribers, 1,000 updates/s
#   SUBSCRIBERS=1000 RATE=100 scripts/bench-map.sh
#   ENGINE=redis SUBSCRIBERS=1000 RATE=100 scripts/bench-map.sh   # the Redis engine and map broker
#                                                                 # (redis-server shares core 0)
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${KEYS:-10000}"
subs="${SUBSCRIBERS:-10000}"
rate="${RATE:-1000}"
duration="${DURATION:-10}"
engine="${ENGINE:-memory}"
cargo build --release -q --bins
work="$(mktemp -d -t holdfast-map-XXXX)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
engine_toml="type = \"memory\""
if [ "$engine" = "redis" ]; then
  rport="$(free_port)"
  taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" > "$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$rport" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
  engine_toml="type = \"redis\"
[engine.redis]
address = \"redis://127.0.0.1:$rport\""
fi
cat > "$work/config.toml" <<TOML
[client]
queue_max_size = 67108864          # a page of 1,000 keys is ~130 KB; a storm queues several

[client.token]
hmac_secret_key = "bench-map-secret"

[http_api]
key = "bench-map-key"

[engine]
$engine_toml

[[channel.namespaces]]
name = "bench-map"
subscription_type = "map"
allow_subscribe_for_client = true
[channel.namespaces.map]
mode = "persistent"
stream_size = 10000
stream_ttl = "5m"
TOML
taskset -c 0 target/release/holdfast serve --config "$work/config.toml" --address 127.0.0.1 \
  --port "$port" > "$work/server.log" 2>&1 &
server=$!
pids+=("$server")
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/ready" > /dev/null 2>&1 && break
  sleep 0.1
done
taskset -c 1 target/release/holdfast-bench map --api "http://127.0.0.1:$port" \
  --ws "ws://127.0.0.1:$port/connection/websocket" --api-key bench-map-key \
  --secret bench-map-secret --keys "$keys" --subscribers "$subs" --rate "$rate" \
  --duration "$duration" --server-pid "$server" --report "${REPORT:-/dev/null}"
