# Shared by the bench scripts (sourced, after scripts/lib.sh): a release
# build, a scratch directory, processes stopped on exit.
# BIN=/path/to/tokenpolicy runs that binary instead of building one (to
# compare two builds on the same machine, one after the other).
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
wait_http() { for _ in $(seq 150); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }
