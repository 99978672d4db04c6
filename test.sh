#!/usr/bin/env bash
# Runs every test of skykit-agent: formatting and lints, the Rust unit,
# integration and property tests (the real binary on sockets in temp dirs),
# the load and soak tests in a release build, the grpcurl checks, and the
# Python, Go and Node client libraries against the real agent.
#
# It installs what the tests need itself (a Python venv in .venv with pinned
# versions, `npm ci` from the committed lock file, Go modules through go.sum)
# and fails loudly when a tool is missing; it never skips a suite.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD

step() { printf '\n==> %s\n' "$*"; }
need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "test.sh: '$1' is required but not installed: $2" >&2
  exit 1
}

# Installs the Debian package that provides a missing command when this
# runs as root with apt-get (as CI does); elsewhere it fails loudly.
APT_UPDATED=
ensure() {
  local command=$1 package=$2
  command -v "$command" >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing $package (for $command)"
    [ -n "$APT_UPDATED" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
  fi
  need "$command" "install the Debian package $package"
}

need cargo "install Rust from https://rustup.rs"
need python3 "install Python 3.10 or newer"
need go "install Go 1.26 or newer (https://go.dev/dl)"
ensure node nodejs
ensure npm npm
ensure setpriv util-linux
ensure setfacl acl
ensure systemd-analyze systemd
ensure systemd-socket-activate systemd
ensure groupadd passwd
ensure prlimit util-linux
ensure faketime faketime
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
  rustup component add rustfmt clippy
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
# The soak target is left out of --all-targets (too slow in a debug build).
cargo clippy --locked --test soak -- -D warnings
# The benchmark harness (skykit-agent-bench, behind the bench feature) is
# not tested here, but must keep building for bench/run.sh.
cargo clippy --locked --features bench --bin skykit-agent-bench -- -D warnings

step "cargo test (unit and integration tests)"
cargo test --locked --all-targets

step "load and soak tests (release build: 1,000,000 calls, 20,000 connections, 100 reloads)"
cargo test --release --locked --test soak

step "build the agent binary the client tests run"
cargo build --locked --bin skykit-agent
export SKYKIT_AGENT_BIN="$ROOT/target/debug/skykit-agent"

step "Python venv (.venv) with pinned test requirements"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check \
  -r clients/python/requirements-test.txt -e clients/python

step "grpcurl checks (tests/grpcurl)"
.venv/bin/python -m pytest -q tests/grpcurl

step "metrics exposition parsed by prometheus_client (tests/metrics)"
.venv/bin/python -m pytest -q tests/metrics

step "Python client (clients/python)"
.venv/bin/python -m pytest -q clients/python

step "Go client (clients/go)"
go -C clients/go mod download
go -C clients/go vet ./...
go -C clients/go test -count=1 ./...

step "Node client (clients/node)"
(cd clients/node && npm ci --no-audit --no-fund && npm test)

echo
echo "test.sh: all suites passed"
