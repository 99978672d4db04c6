#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md and prints one table of absolute
# numbers and ratios, each check with PASS or MISS against its target.
#
# The machines are shared and noisy, so what counts are ratios measured
# side by side in this one run: the agent against a bare tonic server
# (the ceiling of the cached path), taking turns in short rounds; the agent
# signing for every call against raw signatures on as many threads as there
# are CPUs, also in turns; `skykit-agent token` against the vendor's
# python-jose script, in one hyperfine run.
#
# From a fresh clone: bash bench/run.sh
#   BENCH_SECONDS  measured seconds per server (default 10)
#   BENCH_WARMUP   warm-up seconds before a server's first window (default 2)
#   BENCH_ROUNDS   windows the measured seconds are split into (default 5)
#   BENCH_OUT      where the JSON and the agents' logs go (default target/bench)
#
# It installs hyperfine (Debian) when missing and running as root, and
# creates the .venv with python-jose when missing; otherwise it fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SECONDS_PER_SERVER=${BENCH_SECONDS:-10}
WARMUP=${BENCH_WARMUP:-2}
ROUNDS=${BENCH_ROUNDS:-5}
OUT=${BENCH_OUT:-$ROOT/target/bench}
CPUS=$(nproc)
IN_FLIGHT=64
CONNECTIONS=4
IDLE_CONNECTIONS=1000
READY_STARTS=20
ISSUER=bench@example.com

if [ "$ROUNDS" -gt "$SECONDS_PER_SERVER" ]; then
  ROUNDS=$SECONDS_PER_SERVER
fi
WINDOW=$((SECONDS_PER_SERVER / ROUNDS))
SECONDS_PER_SERVER=$((WINDOW * ROUNDS))

step() { printf '\n==> %s\n' "$*" >&2; }
fail() {
  echo "bench/run.sh: $*" >&2
  exit 1
}

# --- tools -----------------------------------------------------------------

command -v cargo >/dev/null 2>&1 || fail "cargo is required: install Rust from https://rustup.rs"
if ! command -v hyperfine >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing hyperfine"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hyperfine >/dev/null
  fi
  command -v hyperfine >/dev/null 2>&1 || fail "hyperfine is required: install the Debian package hyperfine"
fi
PYTHON=$ROOT/.venv/bin/python
if ! [ -x "$PYTHON" ] || ! "$PYTHON" -c 'import jose' 2>/dev/null; then
  step "Python venv (.venv) with python-jose"
  command -v python3 >/dev/null 2>&1 || fail "python3 is required for the python-jose comparison"
  [ -x "$PYTHON" ] || python3 -m venv .venv
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r clients/python/requirements-test.txt
fi

step "cargo build --release --features bench (skykit-agent, skykit-agent-bench)"
cargo build --release --features bench --bin skykit-agent --bin skykit-agent-bench
AGENT=$ROOT/target/release/skykit-agent
BENCH=$ROOT/target/release/skykit-agent-bench

# --- processes -------------------------------------------------------------

WORK=$(mktemp -d)
STARTED=()
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME SOCKET LOG COMMAND...: starts a server in the background with
# its stderr going to LOG, waits until its socket exists, and sets
# $STARTED_PID.
start() {
  local name=$1 socket=$2 log=$3
  shift 3
  "$@" 2>"$log" &
  STARTED_PID=$!
  STARTED+=("$STARTED_PID")
  local tries=0
  until [ -S "$socket" ]; do
    kill -0 "$STARTED_PID" 2>/dev/null || fail "$name exited before listening on $socket"
    tries=$((tries + 1))
    [ "$tries" -lt 1000 ] || fail "$name did not listen on $socket within 10 s"
    sleep 0.01
  done
}

stop() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The agent as users run it: default log level and limits, stderr to a file.
start_agent() {
  local name=$1 socket=$2 log=$3
  shift 3
  start "$name" "$socket" "$log" "$AGENT" serve --socket "$socket" \
    --key "$WORK/key/private.pem" --issuer "$ISSUER" "$@"
}

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/table.md
"$AGENT" keygen --out "$WORK/key" >/dev/null

LOAD=(--connections "$CONNECTIONS" --in-flight "$IN_FLIGHT" --threads "$CPUS" --json)

# --- (a) ceiling and (b) agent, cached path, in alternating rounds ---------

step "(a)+(b) bare tonic ceiling and the agent, $IN_FLIGHT in flight over $CONNECTIONS connections, ${SECONDS_PER_SERVER}s each in $ROUNDS rounds"
start ceiling-server "$WORK/ceiling.sock" "$OUT/ceiling-server.log" "$BENCH" ceiling-server --socket "$WORK/ceiling.sock"
CEILING_PID=$STARTED_PID
start_agent agent "$WORK/agent.sock" "$OUT/agent-cached.log"
AGENT_PID=$STARTED_PID
"$BENCH" load "${LOAD[@]}" \
  --socket "$WORK/ceiling.sock" --name ceiling --pid "$CEILING_PID" \
  --socket "$WORK/agent.sock" --name agent --pid "$AGENT_PID" \
  --duration "${SECONDS_PER_SERVER}s" --warmup "${WARMUP}s" --rounds "$ROUNDS" >"$OUT/cached.json"
stop "$CEILING_PID"

# --- (e) skykit-agent token vs the vendor's python-jose script --------------

step "(e) hyperfine: skykit-agent token vs python-jose"
hyperfine --shell=none --warmup 3 --min-runs 30 --export-json "$OUT/hyperfine.json" \
  --command-name skykit-agent-token "$(printf '%q token --socket %q' "$AGENT" "$WORK/agent.sock")" \
  --command-name python-jose "$(printf '%q %q %q %q' "$PYTHON" "$ROOT/bench/vendor_sign.py" "$WORK/key/private.pem" "$ISSUER")" \
  >&2
stop "$AGENT_PID"

# --- (c) signing ceiling and (d) the agent signing every call, in turns ----

step "(c)+(d) raw RS256 on $CPUS threads and the agent with --bench-sign-every-call, ${SECONDS_PER_SERVER}s each in $ROUNDS rounds"
start_agent agent-signing "$WORK/signing.sock" "$OUT/agent-sign-every-call.log" --bench-sign-every-call
SIGNING_PID=$STARTED_PID
for round in $(seq 1 "$ROUNDS"); do
  warmup=1
  [ "$round" != 1 ] || warmup=$WARMUP
  "$BENCH" sign-ceiling --key "$WORK/key/private.pem" --threads "$CPUS" \
    --duration "${WINDOW}s" --warmup "${warmup}s" --json >"$OUT/sign-ceiling.$round.json"
  "$BENCH" load "${LOAD[@]}" --socket "$WORK/signing.sock" --name sign-every-call --pid "$SIGNING_PID" \
    --duration "${WINDOW}s" --warmup "${warmup}s" >"$OUT/sign-every-call.$round.json"
done
stop "$SIGNING_PID"

# --- (f) RSS with 1000 idle connections ------------------------------------

step "(f) $IDLE_CONNECTIONS idle connections to a fresh agent, and to a fresh bare tonic server for reference"
start_agent agent-idle "$WORK/idle.sock" "$OUT/agent-idle.log"
IDLE_PID=$STARTED_PID
"$BENCH" idle --socket "$WORK/idle.sock" --connections "$IDLE_CONNECTIONS" --pid "$IDLE_PID" --json >"$OUT/idle.json"
stop "$IDLE_PID"
start ceiling-server "$WORK/ceiling-idle.sock" "$OUT/ceiling-server.log" "$BENCH" ceiling-server --socket "$WORK/ceiling-idle.sock"
IDLE_PID=$STARTED_PID
"$BENCH" idle --socket "$WORK/ceiling-idle.sock" --connections "$IDLE_CONNECTIONS" --pid "$IDLE_PID" --json >"$OUT/ceiling-idle.json"
stop "$IDLE_PID"

# --- (g) ready time ---------------------------------------------------------

step "(g) ready: $READY_STARTS starts with one 2048-bit key"
"$BENCH" ready --bin "$AGENT" --repeat "$READY_STARTS" --log "$OUT/agent-ready.log" --json -- \
  serve --socket "$WORK/ready.sock" --key "$WORK/key/private.pem" --issuer "$ISSUER" >"$OUT/ready.json"

# --- the table -------------------------------------------------------------

step "results (JSON and agent logs in $OUT)"
echo
echo "machine: $CPUS CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), Linux $(uname -r); load average before the table: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "settings: $IN_FLIGHT in flight over $CONNECTIONS connections, ${SECONDS_PER_SERVER}s measured per server in $ROUNDS rounds after ${WARMUP}s of warm-up, load generator with $CPUS threads on the same CPUs"
echo
"$BENCH" report --dir "$OUT" | tee "$OUT/table.md"
