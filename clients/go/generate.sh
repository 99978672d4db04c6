#!/usr/bin/env bash
# Regenerates the checked-in Go code in skykitagentv1/ from ../../proto.
#
#   ./generate.sh          rewrite skykitagentv1/*.pb.go
#   ./generate.sh --check  generate into a temp dir; exit 1 if the checked-in
#                          code differs (stale), 0 if it is fresh
#
# protoc comes from Python's grpcio-tools (`$PYTHON -m grpc_tools.protoc`;
# PYTHON defaults to the repo's .venv). protoc-gen-go and protoc-gen-go-grpc
# are installed at the pinned versions below into .bin/ with `go install`.
# The "protoc vX.Y.Z" line in the generated headers names the protoc that
# grpcio-tools ships; --check ignores only that line, so a different
# grpcio-tools version does not count as stale code.
set -euo pipefail

PROTOC_GEN_GO_VERSION=v1.36.12      # google.golang.org/protobuf (same as go.mod)
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2   # google.golang.org/grpc/cmd/protoc-gen-go-grpc
MODULE=github.com/skykit/skykit-agent/clients/go

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
proto_dir="$repo/proto"
PYTHON="${PYTHON:-$repo/.venv/bin/python}"

die() { echo "generate.sh: $*" >&2; exit 1; }

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) die "usage: generate.sh [--check]" ;;
esac

command -v go >/dev/null 2>&1 || die "'go' is required but not on PATH"
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 ||
  die "no Python at '$PYTHON': create the repo's venv ($repo/.venv) with grpcio-tools, or set PYTHON to a python that has grpcio-tools"
"$PYTHON" -c 'import grpc_tools.protoc' 2>/dev/null ||
  die "'$PYTHON' cannot import grpc_tools: pip install the pinned grpcio-tools into it (or set PYTHON)"
[ -d "$proto_dir" ] || die "no proto dir at $proto_dir"

# Pinned plugins in a local bin dir (gitignored).
bin="$here/.bin"
mkdir -p "$bin"
install_tool() { # install_tool BINARY PACKAGE VERSION
  local have=""
  [ -x "$bin/$1" ] && have="$("$bin/$1" --version 2>/dev/null || true)"
  case "$have" in
    *" $3") return 0 ;;
  esac
  GOBIN="$bin" GOFLAGS= go install "$2@$3" || die "go install $2@$3 failed"
}
install_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install_tool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

wkt="$("$PYTHON" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

cd "$proto_dir"
mapfile -t protos < <(find skykit -name '*.proto' | LC_ALL=C sort)
[ "${#protos[@]}" -gt 0 ] || die "no .proto files under $proto_dir/skykit"
"$PYTHON" -m grpc_tools.protoc \
  -I "$proto_dir" -I "$wkt" \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$bin/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=module="$MODULE" \
  --go-grpc_out="$out" --go-grpc_opt=module="$MODULE" \
  "${protos[@]}" || die "protoc failed"

if [ "$check" = 0 ]; then
  mkdir -p "$here/skykitagentv1"
  rm -f "$here"/skykitagentv1/*.pb.go
  cp "$out"/skykitagentv1/*.pb.go "$here/skykitagentv1/"
  echo "generate.sh: wrote $(cd "$out" && ls skykitagentv1/*.pb.go | tr '\n' ' ')"
  exit 0
fi

# --check: compare everything but the protoc version line of the headers.
normalize() { # normalize SRC_DIR DST_DIR
  mkdir -p "$2"
  local f
  for f in "$1"/*.pb.go; do
    [ -e "$f" ] || continue
    sed -E 's#^(//[[:space:]]+(-[[:space:]]+)?protoc[[:space:]]+)v[0-9][^[:space:]]*$#\1(version ignored)#' "$f" >"$2/$(basename "$f")"
  done
}
normalize "$out/skykitagentv1" "$out/norm/generated"
normalize "$here/skykitagentv1" "$out/norm/checked-in"
if ! diff -ru "$out/norm/checked-in" "$out/norm/generated"; then
  echo "generate.sh --check: the checked-in code in clients/go/skykitagentv1 is stale; run clients/go/generate.sh" >&2
  exit 1
fi
echo "generate.sh --check: clients/go/skykitagentv1 is up to date"
