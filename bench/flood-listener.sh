#!/usr/bin/env bash
# Does forward-auth on a listener of its own hold up under a flood of the
# public routes? One replica (with Redis) serves --listen and
# --forward-auth-listen; verify runs (wrk -t1 -c64 over TOKENS distinct
# tokens) alone, then beside closed-loop floods of 8, 16, 32 and 64
# connections sending logins of the demo user (real cost-10 bcrypt hash,
# turned away once the check threads are busy) or GET /healthz, on --listen.
# Three layouts in the same run, in turn each round: verify sent to
# --listen (shared with the flood), to --forward-auth-listen on the same
# threads as --listen (--public-niceness 0), and to --forward-auth-listen
# with --listen's threads at nice +10 (the default). Prints,
# per row, verify's rate and p99 as ratios to verify alone in the same
# layout and round, the flood's rate, and how the CPU was split while
# verify ran (shares of the whole machine, 100% = both cores).
#
#   bash bench/flood-listener.sh     # about 3.5 minutes per round (ROUNDS=2,
#                                    # SECONDS_PER_RUN=6, TOKENS=2000)
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
rpid=$REDIS_PID
pids+=("$rpid")
openssl genpkey -algorithm ed25519 -out "$work/key.pem" 2>/dev/null
# bench / bench-password at bcrypt cost 4 (bench only); demo at cost 10.
{ grep -v '^#' examples/users.htpasswd
  echo 'bench:$2b$04$NqOsMSBf2X5Vm.ypNfpwtuIG.Ibli2MSHkpQfTRdkhQvhb7bCkSJK'; } >"$work/users"
# A: forward-auth on a listener of its own, on the same threads as the rest
# (--public-niceness 0); B: the same with --listen's threads at nice +10
# (the default). Both share Redis and the key, so that one set of tokens
# verifies on either; each is idle while the other is measured.
start() { # NAME NICENESS: sets port_NAME, faport_NAME, pid_NAME
  local p fp
  p=$(free_port); fp=$(free_port)
  RUST_LOG=warn "$bin" serve --policy examples/tokenpolicy.yaml --users "$work/users" --signing-key "$work/key.pem" \
    --listen "127.0.0.1:$p" --forward-auth-listen "127.0.0.1:$fp" --public-niceness "$2" \
    --redis "redis://127.0.0.1:$rport/" --max-logins-per-user 1000000000 \
    >/dev/null 2>"$work/$1.log" &
  pids+=($!)
  eval "port_$1=$p faport_$1=$fp pid_$1=$!"
  wait_http "127.0.0.1:$p/readyz"
}
start a 0
start b 10
port=$port_a
python3 bench/tokens.py "$port" bench bench-password "$tokens" >"$work/tokens"

# verify PORT [FLOOD_PID]: "rate p99_ms cpu-split" of wrk against PORT; the
# CPU split is sampled from 0.3 s after wrk starts to about 1 s before it
# ends (python3 starts slowly on a busy machine).
verify() {
  TOKENS="$work/tokens" wrk -t1 -c64 -d"${secs}s" --latency -s bench/lua/verify-random.lua \
    "http://127.0.0.1:$1/v1/verify" >"$work/verify" &
  local vp=$! procs before after
  procs=(service="$spid" redis="$rpid" verify-wrk="$vp")  # spid: set by the layout
  [ -n "${2:-}" ] && procs+=(flood-wrk="$2")
  sleep 0.3
  before=$(python3 bench/cpu_ticks.py "${procs[@]}")
  sleep "$(python3 -c "print($secs - 1.5)")"
  after=$(python3 bench/cpu_ticks.py "${procs[@]}")
  wait "$vp"
  local rate p99
  rate=$(awk '/Requests\/sec/ {print $2}' "$work/verify")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}' "$work/verify")
  echo "$rate $p99 $(python3 bench/cpu_ticks.py --diff "$before" "$after")"
}

# Every token seen once first, on each server.
secs_=$secs; secs=2; spid=$pid_a; verify "$faport_a" >/dev/null; spid=$pid_b; verify "$faport_b" >/dev/null; secs=$secs_
for round in $(seq "$rounds"); do
  for layout in shared own own+nice; do
    case $layout in
      shared) vport=$port_a port=$port_a spid=$pid_a ;;    # verify on --listen, beside the flood
      own) vport=$faport_a port=$port_a spid=$pid_a ;;     # its own listener, the same threads
      own+nice) vport=$faport_b port=$port_b spid=$pid_b ;; # its own listener, --listen's threads at +10
    esac
    read -r alone alone_p99 alone_cpu <<<"$(verify "$vport")"
    echo "round $round, verify on the $layout listener: alone $alone/s, p99 ${alone_p99} ms; cpu: $alone_cpu"
    for c in 8 16 32 64; do
      for kind in login healthz; do
        case $kind in
          login) wrk -t1 -c"$c" -d"$((secs + 1))s" -s bench/lua/login-flood.lua "http://127.0.0.1:$port/v1/login" >"$work/flood" & ;;
          healthz) wrk -t1 -c"$c" -d"$((secs + 1))s" "http://127.0.0.1:$port/healthz" >"$work/flood" & ;;
        esac
        w=$!
        sleep 0.5
        read -r beside beside_p99 cpu <<<"$(verify "$vport" "$w")"
        wait "$w"
        flood=$(awk '/Requests\/sec/ {print $2}' "$work/flood")
        python3 -c "
v, a, vp, ap, f, c = $beside, $alone, $beside_p99, $alone_p99, $flood, $c
print(f'  {\"$layout\":8s} {c:2d} x {\"$kind\":7s}: verify {v/a:.2f}x alone, p99 {vp/ap:.2f}x; '
      f'flood {f:8.0f}/s; verify has {v/(v+f):.2f} of the answers; cpu: $cpu')"
      done
    done
  done
done
