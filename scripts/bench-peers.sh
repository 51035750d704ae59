#!/usr/bin/env bash
# Installs the peers `holdfast-bench bench` compares Holdfast with (idempotent):
#   Socket.IO 4.8.4 (npm, bench/peers/socketio), the FastAPI connection manager (the
#   compatibility suites' Python venv), socketioxide 0.18 (bench/peers/socketioxide, its own
#   cargo project), Sockudo 5.2.0 (cargo install into target/peers; needs protoc), and the
#   system packages: redis-server (S6), fonts for the plots.
#
#   scripts/bench-peers.sh            # everything
#   SKIP_SOCKUDO=1 scripts/bench-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}
need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v protoc >/dev/null || need_pkgs+=(protobuf-compiler)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_pkgs+=(fonts-dejavu-core)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

echo "peer: Socket.IO (npm)" >&2
(cd bench/peers/socketio && npm ci --no-audit --no-fund --loglevel=error)

echo "peer: FastAPI connection manager (Python venv)" >&2
tests/compat/setup.sh >/dev/null

echo "peer: socketioxide" >&2
cargo build --release --locked --manifest-path bench/peers/socketioxide/Cargo.toml

if [ -z "${SKIP_SOCKUDO:-}" ] && [ ! -x target/peers/bin/sockudo ]; then
  echo "peer: Sockudo 5.2.0 (cargo install, several minutes)" >&2
  cargo install sockudo --version 5.2.0 --locked --root target/peers --target-dir target/peers-build
fi
echo "peers ready" >&2
