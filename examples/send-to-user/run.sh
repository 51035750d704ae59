#!/usr/bin/env bash
# Runs the send-to-user example end to end: start holdfast, send three messages to user 42
# before user 42 has ever connected, then connect as user 42 and print what arrives.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="$("$root/tests/compat/setup.sh")"
bin="${HOLDFAST_BINARY_PATH:-$root/target/debug/holdfast}"
[ -x "$bin" ] || (cd "$root" && cargo build -q --bin holdfast)
port="${PORT:-8000}"
export SERVER_URL="http://127.0.0.1:$port" SERVER_WS="ws://127.0.0.1:$port/connection/websocket"

"$bin" serve --config "$here/config.toml" --address 127.0.0.1 --port "$port" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 200); do
  curl -sf "$SERVER_URL/ready" >/dev/null && break
  kill -0 "$pid" || { echo "holdfast did not start" >&2; exit 1; }
  sleep 0.05
done

echo "--- user 42 is not connected; the backend sends three messages"
for i in 1 2 3; do "$here/send.sh" 42 "hello $i"; done
echo "--- user 42 connects"
"$py" "$here/receive.py" 42 3
