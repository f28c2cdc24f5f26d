#!/usr/bin/env bash
# What a flood costs verify, by the flood's number of connections: verify
# (wrk -c64 over TOKENS distinct tokens) alone, then beside a closed-loop
# flood of 8, 16, 32 and 64 connections sending logins of the demo user
# (real cost-10 bcrypt hash, all turned away once the check threads are
# busy) or GET /healthz, the cheapest route. Prints each ratio to verify
# alone and verify's share of all answers next to its share of connections.
#
#   bash bench/flood-share.sh          # a bit over a minute per round (ROUNDS=2,
#                                      # SECONDS_PER_RUN=6, TOKENS=2000)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rounds="${ROUNDS:-2}"
tokens="${TOKENS:-2000}"
secs="${SECONDS_PER_RUN:-6}"  # the flood runs a second longer, around verify

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
apt_install ${need[@]+"${need[@]}"}

. bench/lib.sh
rport=$(free_port)
start_redis "$rport"
pids+=($REDIS_PID)
openssl genpkey -algorithm ed25519 -out "$work/key.pem" 2>/dev/null
# bench / bench-password at bcrypt cost 4 (bench only); demo at cost 10.
{ grep -v '^#' examples/users.htpasswd
  echo 'bench:$2b$04$NqOsMSBf2X5Vm.ypNfpwtuIG.Ibli2MSHkpQfTRdkhQvhb7bCkSJK'; } >"$work/users"
port=$(free_port)
RUST_LOG=warn "$bin" serve --policy examples/tokenpolicy.yaml --users "$work/users" --signing-key "$work/key.pem" \
  --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$rport/" --max-logins-per-user 1000000000 \
  >/dev/null 2>"$work/a.log" &
pids+=($!)
wait_http "127.0.0.1:$port/readyz"
python3 bench/tokens.py "$port" bench bench-password "$tokens" >"$work/tokens"

verify() { TOKENS="$work/tokens" wrk -t1 -c64 -d"${secs}s" -s bench/lua/verify-random.lua "http://127.0.0.1:$port/v1/verify" | awk '/Requests\/sec/ {print $2}'; }
secs_=$secs; secs=2; verify >/dev/null; secs=$secs_ # every token seen once first
for round in $(seq "$rounds"); do
  alone=$(verify)
  echo "round $round: verify alone $alone/s"
  for c in 8 16 32 64; do
    for kind in login healthz; do
      case $kind in
        login) wrk -t1 -c"$c" -d"$((secs + 1))s" -s bench/lua/login-flood.lua "http://127.0.0.1:$port/v1/login" >"$work/flood" & ;;
        healthz) wrk -t1 -c"$c" -d"$((secs + 1))s" "http://127.0.0.1:$port/healthz" >"$work/flood" & ;;
      esac
      w=$!
      sleep 0.5
      beside=$(verify)
      wait "$w"
      flood=$(awk '/Requests\/sec/ {print $2}' "$work/flood")
      python3 -c "
v, a, f, c = $beside, $alone, $flood, $c
print(f'  {c:2d} connections of {\"$kind\":7s}: verify {v/a:.2f}x alone; flood {f:8.0f}/s; '
      f'verify has {v/(v+f):.2f} of the answers, {64/(64+c):.2f} of the connections')"
    done
  done
done
