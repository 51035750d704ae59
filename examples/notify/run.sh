#!/usr/bin/env bash
# Runs the notify example: holdfast on :8000 and the FastAPI backend on :8080.
# Open http://127.0.0.1:8080/?user=alice — and before that, send alice something:
#   curl -X POST localhost:8080/api/notify/alice -H 'content-type: application/json' -d '{"text":"hi"}'
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="$("$root/tests/compat/setup.sh")"
[ -d "$root/examples/node_modules/centrifuge" ] || (cd "$root/examples" && npm ci --no-audit --no-fund --loglevel=error)
bin="${HOLDFAST_BINARY_PATH:-$root/target/debug/holdfast}"
[ -x "$bin" ] || (cd "$root" && cargo build -q --bin holdfast)
port="${PORT:-8000}" web="${WEB_PORT:-8080}"
export HOLDFAST_API="http://127.0.0.1:$port" HOLDFAST_WS="ws://127.0.0.1:$port/connection/websocket"
"$bin" serve --config "$here/config.toml" --address 127.0.0.1 --port "$port" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 200); do curl -sf "$HOLDFAST_API/ready" >/dev/null && break; sleep 0.05; done
echo "notify: open http://127.0.0.1:$web/?user=alice"
cd "$here" && "$py" -m uvicorn app:app --host 127.0.0.1 --port "$web" --log-level warning
