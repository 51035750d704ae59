#!/usr/bin/env bash
# The project's test command (README "Run all tests"). It installs what the suites need when it
# is missing, so it runs on a fresh machine; CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "unit and integration tests"
cargo test --workspace

step "compatibility suites (real third-party clients against the holdfast binary)"
cargo build --bin holdfast
py="$(tests/compat/setup.sh)"
"$py" -m pytest -q tests/compat

echo
echo "all tests passed"
