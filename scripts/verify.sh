#!/usr/bin/env bash
# Short delivery-verifier runs (part of scripts/test.sh): a few hundred clients for seconds, with
# faults, against real holdfast processes (one node; then two nodes over a real redis-server with
# a rolling restart). Fails when anything is lost silently, duplicated or
# out of order, or when a restart leaves a client untold.
#
#   scripts/verify.sh            # both runs
#   BIN_DIR=target/release scripts/verify.sh
#
# `scripts/verify.sh restart` is the restart hook the second run gives the verifier.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BIN_DIR:-target/debug}"
state="${VERIFY_STATE:-$(mktemp -d -t holdfast-verify-XXXX)}"
export VERIFY_STATE="$state"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_server [node]: node 0 (the default) or 1, each with its own port, pid and log.
start_server() {
  local n="${1:-0}"
  "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
    --address 127.0.0.1 --port "$(cat "$state/port$n")" >> "$state/server$n.log" 2>&1 &
  echo $! > "$state/pid$n"
  for _ in $(seq 1 800); do
    curl -sf "http://127.0.0.1:$(cat "$state/port$n")/ready" >/dev/null && return 0
    sleep 0.025
  done
  echo "holdfast node $n did not become ready" >&2
  cat "$state/server$n.log" >&2
  return 1
}

# stop_server [signal] [node]
stop_server() {
  local pid
  pid="$(cat "$state/pid${2:-0}" 2>/dev/null || true)"
  [ -n "$pid" ] || return 0
  kill -"${1:-TERM}" "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
}

# PostgreSQL programs run as `postgres` when this runs as root (the server refuses root).
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# The restart hook: `verify.sh restart [signal] [node]`.
if [ "${1:-}" = "restart" ]; then
  stop_server "${2:-TERM}" "${3:-0}"
  start_server "${3:-0}"
  exit 0
fi
mode="${1:-short}"

free_port > "$state/port0"
free_port > "$state/port1"
port="$(cat "$state/port0")"
cleanup() {
  local rc=$?
  # A failed run shows what the servers said: the verifier's error alone rarely says why.
  if [ "$rc" -ne 0 ]; then
    for n in 0 1; do
      if [ -s "$state/server$n.log" ]; then
        echo "--- last lines of holdfast node $n's log" >&2
        tail -n 40 "$state/server$n.log" >&2
      fi
    done
  fi
  stop_server KILL 0
  stop_server KILL 1
  for f in "$state"/redis*.pid "$state"/sentinel.pid; do
    if [ -f "$f" ]; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
  done
  if [ -f "$state/nats.pid" ]; then kill -KILL "$(cat "$state/nats.pid")" 2>/dev/null || true; fi
  if [ -d "$state/pg" ]; then as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$state"
}
trap cleanup EXIT
mkdir -p artifacts

if [ "$mode" = "jitter" ]; then
  # The classic jitter scenario (docs/GUARANTEES.md): release binaries, the server pinned to
  # core 0 and the verifier to core 1. CHANNELS spreads the 5,000 subscribers.
  bin=target/release
  start_server() {
    taskset -c 0 "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
      --address 127.0.0.1 --port "$port" >> "$state/server0.log" 2>&1 &
    echo $! > "$state/pid0"
    for _ in $(seq 1 400); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && return 0; sleep 0.025; done
    return 1
  }
  start_server
  taskset -c 1 "$bin/holdfast-bench" verify --url "ws://127.0.0.1:$port/connection/websocket" \
    --api "http://127.0.0.1:$port" --api-key verify-api-key --secret verify-secret \
    --subscribers 5000 --channels "${CHANNELS:-50}" --duration 60 --api-rate 100 --client-rate 0 \
    --jitter 15 --source-ips 4 --drain 30 --check --max-p99-catch-up-ms 1000 \
    --report "artifacts/verify-jitter-${CHANNELS:-50}.json" ${VERIFY_EXTRA:-}
  exit 0
fi

common=(--url "ws://127.0.0.1:$port/connection/websocket" --api "http://127.0.0.1:$port"
        --api-key verify-api-key --secret verify-secret --quiet --check)
# `scripts/verify.sh sources` runs only the last part (publishing through the consumers),
# `scripts/verify.sh failover` only the Redis failovers.
if [ "$mode" = "short" ]; then
start_server

echo "--- verify: jitter, socket drops, slow readers and a reconnect storm"
"$bin/holdfast-bench" verify "${common[@]}" --subscribers 300 --channels 10 --duration 8 \
  --api-rate 50 --client-rate 10 --jitter 4 --drop-every 4 --slow-fraction 0.05 --slow-for 2 \
  --storm-at 4 --report artifacts/verify-faults.json

echo "--- verify: the server restarts (memory engine: new epochs) mid-run"
"$bin/holdfast-bench" verify "${common[@]}" --subscribers 200 --channels 5 --duration 8 \
  --api-rate 40 --client-rate 0 --restart-cmd "$0 restart" --restart-at 4 \
  --report artifacts/verify-restart.json
python3 - <<'PY'
import json
r = json.load(open("artifacts/verify-restart.json"))
assert r["told_events"] >= r["scenario"]["subscribers"], f"every subscriber is told after a restart: {r['told_events']}"
print(f"restart: {r['told_events']} told events, {r['lost_silently']} lost silently")
PY

# The disk engine keeps epochs and offsets: after a restart clients recover, nothing is lost,
# not even with the client told.
stop_server TERM
export HOLDFAST_ENGINE_TYPE=disk HOLDFAST_ENGINE_DISK_PATH="$state/data"
start_server
for signal in TERM KILL; do
  echo "--- verify: disk engine, the server is stopped with SIG$signal and restarted mid-run"
  "$bin/holdfast-bench" verify "${common[@]}" --check-none-lost --subscribers 200 --channels 5 \
    --duration 8 --api-rate 40 --client-rate 10 --restart-cmd "$0 restart $signal" --restart-at 4 \
    --report "artifacts/verify-disk-$signal.json"
  python3 - "$signal" <<'PY'
import json, sys
r = json.load(open(f"artifacts/verify-disk-{sys.argv[1]}.json"))
assert r["told_events"] == 0, f"the disk engine keeps the epoch: nobody needs telling ({r['told_events']})"
print(f"disk + SIG{sys.argv[1]}: {r['delivered']} of {r['expected']} delivered, 0 told, 0 lost")
PY
done

# Two nodes over Redis: subscribers spread over both (and moving to the other node on every
# reconnect, as behind a load balancer), publishes rotating over both APIs, then a rolling
# restart: node 0 stops (SIGTERM, clients closed with 3001) and comes back, then node 1.
# Nothing may be lost, not even with the client told: every client recovers on the other node.
stop_server TERM 0
redis_port="$(free_port)"
# (In a subshell, so the shell does not report the job when the cleanup kills it.)
(redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$state" > "$state/redis.log" 2>&1 & echo $! > "$state/redis.pid")
for _ in $(seq 1 400); do
  redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
  sleep 0.025
done
export HOLDFAST_ENGINE_TYPE=redis HOLDFAST_ENGINE_REDIS_ADDRESS="redis://127.0.0.1:$redis_port" \
  HOLDFAST_ENGINE_REDIS_PING_INTERVAL=200ms
start_server 0
start_server 1
port1="$(cat "$state/port1")"
echo "--- verify: two nodes over Redis, clients on both, rolling restart of each node"
"$bin/holdfast-bench" verify \
  --url "ws://127.0.0.1:$port/connection/websocket,ws://127.0.0.1:$port1/connection/websocket" \
  --api "http://127.0.0.1:$port,http://127.0.0.1:$port1" \
  --api-key verify-api-key --secret verify-secret --quiet --check --check-none-lost \
  --subscribers 200 --channels 5 --duration 10 --api-rate 40 --client-rate 10 \
  --restart-cmd "$0 restart TERM 0" --restart-at 3 \
  --restart-cmd "$0 restart TERM 1" --restart-at 6 \
  --report artifacts/verify-redis-rolling.json
python3 - <<'PY'
import json
r = json.load(open("artifacts/verify-redis-rolling.json"))
codes = r["close_codes"]
assert r["reconnects"] > 0 and any(str(c) == "3001" for c in codes), f"the nodes really restarted: {codes}"
print(f"redis, rolling restart of 2 nodes: {r['delivered']} of {r['expected']} delivered, "
      f"{r['lost_silently']} lost silently, {r['lost_told']} lost told, {r['duplicated']} duplicated, "
      f"reconnects {r['reconnects']}, close codes {codes}")
PY

# The same rolling restart with subscribers on the emulated transports: streams on one node,
# their /emulation requests (subscribes, pongs) sent to either node and forwarded through Redis.
for transport in http-stream sse; do
  echo "--- verify: two nodes over Redis, $transport subscribers, rolling restart"
  "$bin/holdfast-bench" verify --transport "$transport" \
    --url "ws://127.0.0.1:$port/connection/websocket,ws://127.0.0.1:$port1/connection/websocket" \
    --api "http://127.0.0.1:$port,http://127.0.0.1:$port1" \
    --api-key verify-api-key --secret verify-secret --quiet --check --check-none-lost \
    --subscribers 100 --channels 5 --duration 8 --api-rate 40 --client-rate 0 --drop-every 4 \
    --restart-cmd "$0 restart TERM 0" --restart-at 3 \
    --restart-cmd "$0 restart TERM 1" --restart-at 5 \
    --report "artifacts/verify-redis-rolling-$transport.json"
  python3 - "$transport" <<'PY'
import json, sys
r = json.load(open(f"artifacts/verify-redis-rolling-{sys.argv[1]}.json"))
codes = r["close_codes"]
assert r["reconnects"] > 0 and any(str(c) == "3001" for c in codes), f"the nodes really restarted: {codes}"
print(f"{sys.argv[1]}: {r['delivered']} of {r['expected']} delivered, {r['lost_silently']} lost silently, "
      f"{r['duplicated']} duplicated, reconnects {r['reconnects']}, close codes {codes}")
PY
done

fi # short

if [ "$mode" = "short" ] || [ "$mode" = "failover" ]; then
# Redis failover: two nodes, the master killed (SIGKILL) mid-run and its replica promoted, by
# Sentinel and then by Redis Cluster. Publishing resumes (publishes refused meanwhile are
# errors to the publisher) and nothing is lost silently: each subscriber recovers or is told.
stop_server TERM 0
stop_server TERM 1
# A port whose cluster bus port (+10000) is free too.
free_bus_port() {
  python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p < 50000:
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 10000)); print(p); break
        except OSError:
            pass'
}
redis_at() { # port, extra redis-server arguments
  local p="$1"; shift
  mkdir -p "$state/redis-$p"
  (redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --dir "$state/redis-$p" \
    "$@" > "$state/redis-$p.log" 2>&1 & echo $! > "$state/redis-$p.pid")
  for _ in $(seq 1 400); do redis-cli -p "$p" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.025; done
  echo "redis-server on $p did not start" >&2; return 1
}
failover_run() { # name, address, kill command
  export HOLDFAST_ENGINE_TYPE=redis HOLDFAST_ENGINE_REDIS_ADDRESS="$2" \
    HOLDFAST_ENGINE_REDIS_PING_INTERVAL=200ms HOLDFAST_ENGINE_REDIS_PREFIX="verify-$1"
  start_server 0
  start_server 1
  echo "--- verify: two nodes over Redis ($1), the master killed at 3 s"
  "$bin/holdfast-bench" verify \
    --url "ws://127.0.0.1:$port/connection/websocket,ws://127.0.0.1:$(cat "$state/port1")/connection/websocket" \
    --api "http://127.0.0.1:$port,http://127.0.0.1:$(cat "$state/port1")" \
    --api-key verify-api-key --secret verify-secret --quiet --check \
    --subscribers 200 --channels 6 --duration 10 --api-rate 40 --client-rate 0 \
    --restart-cmd "$3" --restart-at 3 --report "artifacts/verify-failover-$1.json"
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open(f"artifacts/verify-failover-{sys.argv[1]}.json"))
assert r["expected"] > 0 and r["lost_silently"] == 0, r
# A session waiting on a Redis command past the pong timeout would be closed with 3012: every
# engine call is bounded, so a failover never gets there.
assert "3012" not in r["close_codes"], f"sessions stalled during the failover: {r['close_codes']}"
# Publishing resumed on the promoted replica: most publishes were acknowledged (behind
# Sentinel, a node that never followed the promotion would refuse every one after the kill at
# 3 s of 10).
assert r["api_publications"] > r["api_failures"], (r["api_publications"], r["api_failures"])
print(f"{sys.argv[1]} failover: {r['delivered']} of {r['expected']} delivered, {r['lost_silently']} lost silently, "
      f"{r['lost_told']} lost told, {r['duplicated']} duplicated, {r['told_events']} told events, "
      f"reconnects {r['reconnects']}")
PY
  stop_server TERM 0
  stop_server TERM 1
  unset HOLDFAST_ENGINE_REDIS_PREFIX
}

master="$(free_port)"; replica="$(free_port)"; sentinel="$(free_port)"
redis_at "$master"
redis_at "$replica" --replicaof 127.0.0.1 "$master"
mkdir -p "$state/sentinel"
cat > "$state/sentinel/sentinel.conf" <<EOF
port $sentinel
bind 127.0.0.1
protected-mode no
dir $state/sentinel
sentinel monitor mymaster 127.0.0.1 $master 1
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 3000
EOF
(redis-server "$state/sentinel/sentinel.conf" --sentinel > "$state/sentinel.log" 2>&1 & echo $! > "$state/sentinel.pid")
for _ in $(seq 1 1200); do
  redis-cli -p "$sentinel" sentinel replicas mymaster 2>/dev/null | grep -qx "$replica" \
    && redis-cli -p "$replica" info replication 2>/dev/null | grep -q "master_link_status:up" && break
  sleep 0.025
done
failover_run sentinel "redis+sentinel://127.0.0.1:$sentinel?sentinel_master_name=mymaster" \
  "kill -KILL $(cat "$state/redis-$master.pid")"
promoted="$(redis-cli -p "$sentinel" sentinel get-master-addr-by-name mymaster | tail -1)"
[ "$promoted" = "$replica" ] || { echo "the sentinel did not promote the replica ($promoted)" >&2; exit 1; }

cluster=()
for _ in 1 2 3 4 5 6; do
  p="$(free_bus_port)"
  redis_at "$p" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
  cluster+=("127.0.0.1:$p")
done
redis-cli --cluster create "${cluster[@]}" --cluster-replicas 1 --cluster-yes > "$state/cluster.log"
for hp in "${cluster[@]}"; do
  for _ in $(seq 1 1200); do
    redis-cli -p "${hp#*:}" cluster info | grep -q cluster_state:ok \
      && redis-cli -p "${hp#*:}" info replication | grep -Eq "role:master|master_link_status:up" && break
    sleep 0.025
  done
done
victim=""
for hp in "${cluster[@]}"; do
  redis-cli -p "${hp#*:}" role | head -1 | grep -q master && { victim="${hp#*:}"; break; }
done
failover_run cluster "redis+cluster://$(IFS=,; echo "${cluster[*]}")" \
  "kill -KILL $(cat "$state/redis-$victim.pid")"
fi # failover

if [ "$mode" = "short" ] || [ "$mode" = "sources" ]; then
# Publishing through the consumers' sources instead of the API: writers commit (and roll back a
# tenth of) outbox rows, Redis stream entries (MULTI/DISCARD) and JetStream messages while the
# node is killed (SIGKILL) and restarted and subscribers drop and recover. Every committed write
# must reach every subscriber once and in order; no rolled-back write ever.
stop_server TERM 0
stop_server TERM 1
unset HOLDFAST_ENGINE_REDIS_ADDRESS HOLDFAST_ENGINE_REDIS_PING_INTERVAL
export HOLDFAST_ENGINE_TYPE=disk HOLDFAST_ENGINE_DISK_PATH="$state/data-source"
mkdir -p "$state/pg"
if [ "$(id -u)" -eq 0 ]; then chmod 755 "$state"; chown postgres "$state/pg"; fi
if [ -z "${redis_port:-}" ]; then
  redis_port="$(free_port)"
  (redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$state" > "$state/redis.log" 2>&1 & echo $! > "$state/redis.pid")
  for _ in $(seq 1 400); do redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break; sleep 0.025; done
fi
pg_port="$(free_port)"
as_pg "$pg_bin/initdb" -D "$state/pg/data" -U postgres --auth=trust --no-sync >/dev/null
as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/log" -w \
  -o "-p $pg_port -k $state/pg -c listen_addresses=127.0.0.1" start >/dev/null
pg_dsn="postgresql://postgres@127.0.0.1:$pg_port/postgres"
psql -q "$pg_dsn" -v ON_ERROR_STOP=1 -f deploy/postgresql/outbox.sql
nats_port="$(free_port)"
(nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$state/nats" > "$state/nats.log" 2>&1 & echo $! > "$state/nats.pid")
for _ in $(seq 1 400); do (echo > "/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.025; done
for source in postgres redis-stream nats; do
  case "$source" in
    postgres)
      url="$pg_dsn"
      consumer='{"type":"postgresql","postgresql":{"dsn":"'"$pg_dsn"'","outbox_table_name":"holdfast_outbox","num_partitions":2,"partition_notification_channel":"holdfast_outbox"}}' ;;
    redis-stream)
      url="redis://127.0.0.1:$redis_port"
      consumer='{"type":"redis_stream","redis_stream":{"address":["'"$url"'"],"streams":["holdfast-verify"],"consumer_group":"holdfast","visibility_timeout":"2s"}}' ;;
    nats)
      url="nats://127.0.0.1:$nats_port"
      # The writer creates the stream; the consumer waits for it (backoff) until then.
      consumer='{"type":"nats_jetstream","nats_jetstream":{"url":"'"$url"'","stream_name":"HOLDFAST_VERIFY","subjects":["holdfast-verify.>"],"durable_consumer_name":"holdfast","deliver_policy":"all","ack_wait":"2s"}}' ;;
  esac
  export HOLDFAST_CONSUMERS="[$(echo "$consumer" | sed 's/^{/{"name":"verify","enabled":true,/')]"
  start_server 0
  echo "--- verify: publishing through $source, the node killed (SIGKILL) and restarted mid-run"
  "$bin/holdfast-bench" verify "${common[@]}" --check-none-lost --source "$source" --source-url "$url" \
    --source-partitions 2 --subscribers 100 --channels 4 --duration 8 --api-rate 80 --client-rate 0 \
    --drop-every 4 --restart-cmd "$0 restart KILL" --restart-at 4 \
    --report "artifacts/verify-source-$source.json"
  python3 - "$source" <<'PY'
import json, sys
src = sys.argv[1]
r = json.load(open(f"artifacts/verify-source-{src}.json"))
s = r["source"]
assert s["committed"] > 0 and s["stored"] == s["committed"], s
assert src == "nats" or s["rolled_back"] > 0, s
assert s["lost"] == s["duplicated"] == s["out_of_order"] == s["rolled_back_delivered"] == 0, s
print(f"{src}: {s['committed']} committed, {s['rolled_back']} rolled back, {s['uncertain']} uncertain; "
      f"stored {s['stored']}, 0 lost, 0 duplicated, 0 out of order, 0 rolled back delivered; "
      f"{r['delivered']} of {r['expected']} deliveries, {r['lost_silently']} lost silently")
PY
  stop_server TERM 0
done
fi # sources
