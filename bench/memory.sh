#!/usr/bin/env bash
# Memory under many distinct tokens: one replica with Redis verifies
# TOKENS_TOTAL (default 1,000,000) distinct tokens, each of its own session,
# each once, and its RSS is sampled as it goes. Run twice in one go: with the
# default cache bounds, and with the session cache unbounded (as before it
# had a bound), so the table shows what the bound buys.
#
#   bash bench/memory.sh              # about 5 minutes on 2 cores
#   TOKENS_TOTAL=200000 bash bench/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
total="${TOKENS_TOTAL:-1000000}"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
apt_install ${need[@]+"${need[@]}"}

. bench/lib.sh
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
allowed() { curl -s "127.0.0.1:$1/metrics" | awk 'BEGIN {n=0} /^tokenpolicy_verify_decisions_total\{outcome="allowed"\}/ {n=$2} END {print int(n)}'; }

rport=$(free_port)
start_redis "$rport"
pids+=($REDIS_PID)
openssl genpkey -algorithm ed25519 -out "$work/key.pem" 2>/dev/null
hash='$2b$04$NqOsMSBf2X5Vm.ypNfpwtuIG.Ibli2MSHkpQfTRdkhQvhb7bCkSJK'
echo "bench:$hash" >"$work/users"

run() { # label, extra serve flags...
  local label=$1 port pid; shift
  port=$(free_port)
  RUST_LOG=warn "$bin" serve --policy examples/tokenpolicy.yaml --users "$work/users" \
    --signing-key "$work/key.pem" --listen "127.0.0.1:$port" \
    --redis "redis://127.0.0.1:$rport/" --redis-prefix "mem$RANDOM" "$@" >/dev/null 2>"$work/serve.log" &
  pid=$!; pids+=("$pid")
  wait_http "127.0.0.1:$port/readyz"
  if [ ! -s "$work/tokens" ]; then
    local kid; kid=$(curl -s "127.0.0.1:$port/.well-known/jwks.json" | python3 -c 'import json,sys;print(json.load(sys.stdin)["keys"][0]["kid"])')
    echo "minting $total tokens..." >&2
    python3 bench/mint.py "$work/key.pem" "$kid" "$hash" "$total" >"$work/tokens"
  fi
  local idle; idle=$(rss "$pid")
  TOKENS="$work/tokens" wrk -t1 -c64 -d1h -s bench/lua/verify-once.lua "http://127.0.0.1:$port/" >"$work/wrk.log" &
  local w=$! peak=0 marks="" next=$((total / 4)) last=-1 still=0 t0 t1
  t0=$(date +%s.%N)
  # Sample each second; stop wrk once the count has not moved for 3 s
  # (every token seen; wrk is on /healthz by then).
  while [ "$still" -lt 3 ]; do
    sleep 1
    local r n; r=$(rss "$pid"); n=$(allowed "$port")
    peak=$(python3 -c "print(max($peak, $r))")
    while [ "$n" -ge "$((next - 1))" ] && [ "$next" -le "$total" ]; do
      marks="$marks $r"; next=$((next + total / 4))
    done
    if [ "$n" -eq "$last" ] && [ "$n" -gt 0 ]; then still=$((still + 1)); else still=0; t1=$(date +%s.%N); fi
    last=$n
  done
  kill -INT "$w" 2>/dev/null || true
  wait "$w" || true
  local n rps; n=$(allowed "$port"); rps=$(python3 -c "print($n / ($t1 - $t0))")
  printf '| %-36s | %9s | %7s | %-27s | %7s | %8s | %9.0f |\n' \
    "$label" "$n" "$idle" "$(echo $marks | tr ' ' '/')" "$peak" "$(rss "$pid")" "$rps"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo
echo "RSS in MiB of one replica verifying $total distinct tokens ($total sessions), each once:"
printf '| %-36s | %9s | %7s | %-27s | %7s | %8s | %9s |\n' "bounds" "verified" "idle" "at 1/4, 1/2, 3/4, all" "peak" "after" "verify/s"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..38})" "-----------" "---------" "-----------------------------" "---------" "----------" "-----------"
run "defaults (50k tokens, 50k sessions)"
run "session cache unbounded" --session-cache-size 100000000
