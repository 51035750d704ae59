#!/usr/bin/env bash
# Short delivery-verifier runs (part of scripts/test.sh): a few hundred clients for seconds, with
# faults, against a real holdfast process. Fails when anything is lost silently, duplicated or
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

start_server() {
  "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
    --address 127.0.0.1 --port "$(cat "$state/port")" >> "$state/server.log" 2>&1 &
  echo $! > "$state/pid"
  for _ in $(seq 1 400); do
    curl -sf "http://127.0.0.1:$(cat "$state/port")/ready" >/dev/null && return 0
    sleep 0.025
  done
  echo "holdfast did not become ready" >&2
  cat "$state/server.log" >&2
  return 1
}

stop_server() {
  local pid
  pid="$(cat "$state/pid" 2>/dev/null || true)"
  [ -n "$pid" ] || return 0
  kill -"${1:-TERM}" "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
}

if [ "${1:-}" = "restart" ]; then
  stop_server "${2:-TERM}"
  start_server
  exit 0
fi
mode="${1:-short}"

python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' > "$state/port"
port="$(cat "$state/port")"
trap 'stop_server KILL; rm -rf "$state"' EXIT
mkdir -p artifacts

if [ "$mode" = "jitter" ]; then
  # The classic jitter scenario (docs/GUARANTEES.md): release binaries, the server pinned to
  # core 0 and the verifier to core 1. CHANNELS spreads the 5,000 subscribers.
  bin=target/release
  start_server() {
    taskset -c 0 "$bin/holdfast" serve --config crates/holdfast-bench/verify-server.toml \
      --address 127.0.0.1 --port "$port" >> "$state/server.log" 2>&1 &
    echo $! > "$state/pid"
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

start_server
common=(--url "ws://127.0.0.1:$port/connection/websocket" --api "http://127.0.0.1:$port"
        --api-key verify-api-key --secret verify-secret --quiet --check)

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
