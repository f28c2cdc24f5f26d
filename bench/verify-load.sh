#!/usr/bin/env bash
# Load run: forward-auth verify of an already-seen session
# needs no Redis round trip, so its throughput with the Redis store should
# match the in-process store's. Runs wrk against a release build on loopback
# (bounded: a few seconds per run) and prints requests/s and the ratio.
#
#   bash bench/verify-load.sh            # needs wrk and redis-server (Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/tokenpolicy"
dur="${DURATION:-5s}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

rport=$(free_port)
start_redis "$rport"
pids+=($REDIS_PID)

port=""
start() { # name, extra args... -> sets $port (no subshell: the pids and trap stay here)
  port=$(free_port)
  RUST_LOG=warn "$bin" serve --policy examples/tokenpolicy.yaml --users examples/users.htpasswd \
    --listen "127.0.0.1:$port" "${@:2}" 2>"$work/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
}
token() {
  curl -sf "127.0.0.1:$1/v1/login" -H 'content-type: application/json' \
    -d '{"username":"demo","password":"demo-password"}' |
    python3 -c 'import sys,json;print(json.load(sys.stdin)["access_token"])'
}
run() { # port, token -> requests/s
  wrk -t2 -c32 -d"$dur" -H "Authorization: Bearer $2" "http://127.0.0.1:$1/v1/verify" |
    awk '/Requests\/sec/ {print $2}'
}

start memory; mem=$port
start redis --redis "redis://127.0.0.1:$rport/"; red=$port
mt=$(token "$mem"); rt=$(token "$red")
run "$mem" "$mt" >/dev/null; run "$red" "$rt" >/dev/null   # warm up
m=$(run "$mem" "$mt"); r=$(run "$red" "$rt")
calls=$(redis-cli -p "$rport" info commandstats | grep -E '^cmdstat_exists:' || echo 'cmdstat_exists:calls=0')
echo "verify, in-process store: $m req/s"
echo "verify, Redis store:      $r req/s"
python3 -c "import sys; r, m = map(float, sys.argv[1:]); print(f'ratio Redis/in-process: {r / m:.2f}')" "$r" "$m"
echo "Redis EXISTS calls during both Redis runs: ${calls}"
