#!/usr/bin/env bash
# Runs every test of skykit-agent: formatting, lints, and the Rust unit and
# integration tests (which run the real binary on sockets in temp dirs).
# It installs what it needs itself and fails loudly when something is missing.
set -euo pipefail
cd "$(dirname "$0")"

step() { printf '\n==> %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "test.sh: '$1' is required but not installed: $2" >&2; exit 1; }; }

need cargo "install Rust from https://rustup.rs"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test"
cargo test --locked --all-targets

echo
echo "test.sh: all tests passed"
