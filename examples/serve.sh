#!/usr/bin/env bash
# Shared by the examples' run.sh: starts holdfast with <example>/config.toml on $PORT (8000) and
# the example's FastAPI backend on $WEB_PORT (8080); installs what is missing on the first run.
# EXAMPLE_CONFIG names another configuration file (a copy of config.toml its run.sh adapted).
#   examples/serve.sh <example>
set -euo pipefail
example="$1"
here="$(cd "$(dirname "$0")" && pwd)/$example"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$("$root/tests/compat/setup.sh")"
[ -x "$root/examples/node_modules/.bin/esbuild" ] || (cd "$root/examples" && npm ci --no-audit --no-fund --loglevel=error)
[ ! -x "$here/build.sh" ] || "$here/build.sh"
bin="${HOLDFAST_BINARY_PATH:-$root/target/debug/holdfast}"
[ -x "$bin" ] || (cd "$root" && cargo build -q --bin holdfast)
port="${PORT:-8000}" web="${WEB_PORT:-8080}" config="${EXAMPLE_CONFIG:-$here/config.toml}"
export HOLDFAST_API="http://127.0.0.1:$port" HOLDFAST_WS="ws://127.0.0.1:$port/connection/websocket"
# Examples with an rpc proxy call their backend on $WEB_PORT.
! grep -q '^\[rpc.proxy\]' "$config" || export HOLDFAST_RPC_PROXY_ENDPOINT="http://127.0.0.1:$web/holdfast/rpc"
"$bin" serve --config "$config" --address 127.0.0.1 --port "$port" --log-level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 1 200); do curl -sf "$HOLDFAST_API/ready" >/dev/null && break; sleep 0.05; done
echo "$example: open http://127.0.0.1:$web/?user=alice (and ?user=bob in another window)"
cd "$here" && "$py" -m uvicorn app:app --host 127.0.0.1 --port "$web" --log-level warning
