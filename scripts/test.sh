#!/usr/bin/env bash
# The project's test command (README "Run all tests"). It installs what the suites need when it
# is missing (Python venv with the PyPI clients, npm packages, Debian's Chromium and Redis), so it runs on
# a fresh machine; CI (.ci/run) calls exactly this. Artifacts (screenshots, compatibility
# results) go to artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."

# A test run builds from scratch; incremental state would only cost disk (gigabytes) and time.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step "system packages the suites use"
# The Redis engine's tests spawn real redis-server processes (and redis-cli builds a cluster).
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt_install redis-server
fi
# The consumer suite runs a PostgreSQL outbox (initdb + pg_ctl in a temporary directory) and a
# NATS JetStream server.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi
if ! command -v nats-server >/dev/null; then
  apt_install nats-server
fi
if ! command -v chromium >/dev/null; then
  apt_install chromium
fi
# The reverse-proxy suite runs the HTTP transports through Debian's nginx; the unidirectional
# suite reads a stream with curl.
if ! command -v nginx >/dev/null; then
  apt_install nginx-light
fi
if ! command -v curl >/dev/null; then
  apt_install curl
fi
# The benchmark report's plots label axes with DejaVu Sans.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  apt_install fonts-dejavu-core
fi

step "format"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "supply chain: cargo deny (advisories from deny/advisory-db, licenses, sources)"
scripts/deny.sh

step "unit and integration tests"
cargo test --workspace

step "tools for the compatibility suites"
cargo build --workspace --bins
py="$(tests/compat/setup.sh)"
(cd tests/compat/js && npm ci --no-audit --no-fund --loglevel=error)
(cd examples && npm ci --no-audit --no-fund --loglevel=error)

step "compatibility: centrifuge-js in Node (plain and protocol features) and in Chromium, and behind nginx over two nodes"
rm -rf artifacts/compat
(cd tests/compat/js && node --test --test-concurrency=1 --test-force-exit --test-reporter=spec node.test.mjs features.test.mjs map.test.mjs browser.test.mjs proxy.test.mjs)

step "admin web UI and the development first page in Chromium (screenshots in artifacts/admin)"
# The first page embeds the npm client's bundle: it must be the one the suites test.
grep -v '^//# sourceMappingURL=' tests/compat/js/node_modules/centrifuge/dist/centrifuge.js \
  | cmp - crates/holdfast-server/assets/vendor/centrifuge.js \
  || { echo "crates/holdfast-server/assets/vendor/centrifuge.js differs from the npm centrifuge package: copy dist/centrifuge.js (without its sourceMappingURL line)"; exit 1; }
(cd tests/compat/js && node --test --test-concurrency=1 --test-force-exit --test-reporter=spec admin.test.mjs)

step "example apps in Chromium (examples/*, screenshots in artifacts/examples)"
(cd tests/compat/js && PYTHON="$py" node --test --test-concurrency=1 --test-force-exit --test-reporter=spec examples.test.mjs)

step "compatibility: centrifuge-python, cent, examples"
"$py" -m pytest -q tests/compat

step "docs/COMPAT.md matches the run"
"$py" tests/compat/report.py --check

step "delivery verifier: short runs with faults and a restart"
cargo build --workspace --bins
scripts/verify.sh

step "benchmark smoke test: holdfast-bench quick mode against the raw baseline, Socket.IO and FastAPI"
(cd bench/peers/socketio && npm ci --no-audit --no-fund --loglevel=error)
QUICK=1 scripts/bench.sh

step "fuzzing: 20 s per target (fuzz/README.md has the long run)"
FUZZ_SECONDS=20 scripts/fuzz.sh

echo
echo "all tests passed"
