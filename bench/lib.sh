# Shared by the bench scripts (sourced): a release build, a scratch
# directory, processes stopped on exit, free loopback ports.
# BIN=/path/to/tokenpolicy runs that binary instead of building one (to
# compare two builds on the same machine, one after the other).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}"
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --release --quiet
  bin="$CARGO_TARGET_DIR/release/tokenpolicy"
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }
