#!/usr/bin/env bash
# The delivery-cursor confirmation window (docs/GUARANTEES.md): a device that disconnects N ms
# after a delivery — does the user's next device get that delivery again? Starts a holdfast
# (disk engine, personal channels with delivery cursors) and runs `holdfast-bench cursor-window`.
#
#   scripts/cursor-window.sh                       # release binaries, 20 rounds per delay
#   BIN_DIR=target/debug ROUNDS=5 scripts/cursor-window.sh
#   EXTRA="--set client.delivery_cursor_confirm_delay=0" scripts/cursor-window.sh   # regular pings only
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BIN_DIR:-target/release}"
state="$(mktemp -d -t holdfast-cursor-window-XXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# (In a subshell, so the shell does not report the job when the cleanup kills it.)
(HOLDFAST_ENGINE_DISK_PATH="$state/data" "$bin/holdfast" serve \
  --config crates/holdfast-bench/cursor-window-server.toml --address 127.0.0.1 --port "$port" \
  ${EXTRA:-} > "$state/server.log" 2>&1 & echo $! > "$state/pid")
trap 'kill -KILL "$(cat "$state/pid")" 2>/dev/null || true; rm -rf "$state"' EXIT
for _ in $(seq 1 800); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.025
done
"$bin/holdfast-bench" cursor-window --url "ws://127.0.0.1:$port/connection/websocket" \
  --api "http://127.0.0.1:$port" --api-key verify-api-key --secret verify-secret \
  --rounds "${ROUNDS:-20}" ${AFTER:+--after-ms "$AFTER"} ${REPORT:+--report "$REPORT"}
