#!/usr/bin/env bash
# The published benchmark: builds a release, starts Redis, two replicas
# sharing it and nginx on loopback, and runs wrk against each path. Prints one
# table: requests/s, p99 latency, ratios to /healthz of the same server (and
# to nginx without auth for the ingress path), and replica A's RSS.
#
#   bash bench/run.sh              # about 5 minutes; DURATION=6s by default,
#                                  # ROUNDS=3 rounds of /healthz and verify
#   PROFILE=1 bash bench/run.sh    # and a CPU profile of each row (perf,
#                                  # software clock): which process, and
#                                  # which functions of the service
#   NGINX_WORKERS=1 bash bench/run.sh  # nginx worker processes (default
#                                  # auto, one per core, as ingress-nginx)
#   BIN=/path/tokenpolicy bash bench/run.sh  # bench that binary, no build
#
# Bench users have a bcrypt cost-4 hash so that 10,000 logins take seconds;
# the login flood uses the demo user's cost-10 hash, as a real flood would.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
dur="${DURATION:-6s}"
rounds="${ROUNDS:-3}"
conns="${CONNECTIONS:-64}"
distinct="${DISTINCT:-10000}"
chains="${CHAINS:-2000}"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
apt_install ${need[@]+"${need[@]}"}
command -v openssl >/dev/null || apt_install openssl

. bench/lib.sh
# Calls of one Redis command so far (INFO commandstats), scripts' own included.
cmdstat() { redis-cli -p "$rport" info commandstats | awk -F'[=,:]' -v c="cmdstat_$1" '$1 == c {print $3}' | grep . || echo 0; }

# Redis, a shared key, users and policies.
rport=$(free_port)
start_redis "$rport"
pids+=($REDIS_PID)
openssl genpkey -algorithm ed25519 -out "$work/key.pem" 2>/dev/null
# bench / bench-password at bcrypt cost 4 (bench only); demo at cost 10.
{ grep -v '^#' examples/users.htpasswd
  echo 'bench:$2b$04$NqOsMSBf2X5Vm.ypNfpwtuIG.Ibli2MSHkpQfTRdkhQvhb7bCkSJK'; } >"$work/users"
sed -e 's/tokenExpirationTime: 30m/tokenExpirationTime: 1s/' \
    -e 's/expiredTokenRenewLimit: 10m/expiredTokenRenewLimit: 10m/' \
    -e 's/refreshGracePeriod: 10s/refreshGracePeriod: 60s/' examples/tokenpolicy.yaml >"$work/short.yaml"

# A provider for replica a's policy (spec.oidc), so that it also verifies
# tokens of OpenID Connect sessions. Verify never calls the provider (the
# token is ours, checked with our key): the provider is only read at start
# (discovery and JWKS), so static files on loopback serve here;
# bench/peers.sh runs a real Keycloak.
iport=$(free_port); issuer="http://127.0.0.1:$iport"
mkdir -p "$work/idp/.well-known"
python3 - "$issuer" "$work/idp" <<'PY'
import base64, json, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
iss, root = sys.argv[1], sys.argv[2]
x = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
jwk = {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": "bench-idp",
       "x": base64.urlsafe_b64encode(x).rstrip(b"=").decode()}
json.dump({"keys": [jwk]}, open(f"{root}/jwks.json", "w"))
json.dump({"issuer": iss, "authorization_endpoint": f"{iss}/authorize",
           "token_endpoint": f"{iss}/token", "jwks_uri": f"{iss}/jwks.json"},
          open(f"{root}/.well-known/openid-configuration", "w"))
PY
python3 -m http.server --bind 127.0.0.1 --directory "$work/idp" "$iport" >/dev/null 2>&1 &
pids+=($!)
wait_http "$issuer/.well-known/openid-configuration"
echo bench-client-secret >"$work/oidc-secret"
{ cat examples/tokenpolicy.yaml
  echo "  externalURL: http://127.0.0.1"
  echo "  oidc: {issuerURL: '$issuer', clientID: bench, clientSecretRef: {name: s, key: k}}"; } >"$work/oidc.yaml"

start() { # name, policy, extra args... -> prints the port
  local port; port=$(free_port)
  RUST_LOG=warn "$bin" serve --policy "$2" --users "$work/users" --signing-key "$work/key.pem" \
    --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$rport/" --max-logins-per-user 1000000000 \
    "${@:3}" >/dev/null 2>"$work/$1.log" &
  pids+=($!)
  echo "$port $!"
}
read -r pa pida < <(start a "$work/oidc.yaml" --oidc-client-secret-file "$work/oidc-secret"); wait_http "127.0.0.1:$pa/readyz"
read -r pb pidb < <(start b examples/tokenpolicy.yaml); wait_http "127.0.0.1:$pb/readyz"
read -r ps pids_ < <(start short "$work/short.yaml"); wait_http "127.0.0.1:$ps/readyz"
# The same policy with an idle timeout (30m: longer than the logins above
# take on a busy machine, so that no bench session is idle yet): verify
# keeps recording activity, one write per session per 88.75 s at most.
{ cat examples/tokenpolicy.yaml; echo '  sessionIdleTimeout: 30m'; } >"$work/idle.yaml"
read -r pi pidi < <(start idle "$work/idle.yaml"); wait_http "127.0.0.1:$pi/readyz"
pids+=("$pida" "$pidb" "$pids_" "$pidi")

echo "logging in: $distinct sessions for verify, 2 x $chains for refresh chains..." >&2
python3 bench/tokens.py "$pa" bench bench-password "$distinct" >"$work/tokens"
python3 bench/tokens.py "$pa" bench bench-password "$chains" >"$work/chains-a"
python3 bench/tokens.py "$pb" bench bench-password "$chains" >"$work/chains-b"
one=$(head -1 "$work/tokens")
head -1 "$work/tokens" >"$work/one"
expired=$(python3 bench/tokens.py "$ps" bench bench-password 1)
# A signature byte changed (not the last character, whose low bits are padding).
# Tokens of OpenID Connect sessions, with the claims the callback writes
# (idp, name, email, groups), signed with replica a's key.
kid=$(curl -s "127.0.0.1:$pa/.well-known/jwks.json" | python3 -c 'import json,sys;print(json.load(sys.stdin)["keys"][0]["kid"])')
python3 bench/mint.py "$work/key.pem" "$kid" - 1 "$issuer" >"$work/oidc-one"
oidc_one=$(head -1 "$work/oidc-one")
invalid=$(python3 -c 'import sys;t=sys.argv[1];i=len(t)-10;print(t[:i]+("A" if t[i]!="A" else "B")+t[i+1:])' "$one")

nport=$(free_port); aport=$(free_port); mkdir -p "$work/nginx/tmp"
sed -e "s#@@PREFIX@@#$work/nginx#g" -e "s/@@PORT@@/$nport/" -e "s/@@APP_PORT@@/$aport/g" \
    -e "s/@@TP_PORT@@/$pa/" -e "s/@@WORKERS@@/${NGINX_WORKERS:-auto}/" bench/nginx-bench.conf.template >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
wait_http "127.0.0.1:$nport/open/"
sleep 1.2   # the short policy's token (1 s) is now expired but renewable

results="$work/results"
: >"$results"
# row name, base, then wrk args: records requests/s and p99 (ms).
nprof=0
row() {
  local name=$1 base=$2; shift 2
  local data="" perfpid=""
  if [ -n "${PROFILE:-}" ] && [ "$name" != warmup ] && [ "${round:-1}" = 1 ]; then
    nprof=$((nprof + 1)); data="$work/perf-$nprof.data"
    perf record -a -e cpu-clock -F 499 -o "$data" -- sleep "${dur%s}" >/dev/null 2>&1 &
    perfpid=$!
  fi
  local out; out=$(wrk -t1 -c"$conns" -d"$dur" --latency "$@")
  if [ -n "$data" ]; then wait "$perfpid" || true; echo "$name|$data" >>"$work/profiles"; fi
  local rps p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  echo "$name|$base|$rps|$p99|${non2xx:-0}|${round:-1}" >>"$results"
}
auth=(-H "Authorization: Bearer $one")
row warmup - "http://127.0.0.1:$pa/healthz" >/dev/null
# Replica A issued the bench tokens, so it holds them verified already; the
# idle replica sees them first here, once, so that its rows compare the
# same steady state (not 10,000 first signature checks in round 1).
TOKENS="$work/tokens" row warmup - -s bench/lua/verify-random.lua "http://127.0.0.1:$pi/v1/verify" >/dev/null
sed -i '/^warmup/d' "$results"
# The machine's speed drifts over minutes (a shared VM): the verify rows run
# in rounds, each beside its own /healthz, and the table gives the median.
# A row driven by a Lua script pays the script in wrk, on the same two cores
# as the server: its baseline is /healthz sent the same requests by the
# same script (the same random Authorization headers), so that the ratio
# compares the server's work and not the client's.
for round in $(seq "$rounds"); do
  row "/healthz"                      healthz "http://127.0.0.1:$pa/healthz"
  row "/v1/verify, 1 token"           healthz "${auth[@]}" "http://127.0.0.1:$pa/v1/verify"
  row "/v1/verify, 1 OIDC session's token" healthz -H "Authorization: Bearer $oidc_one" "http://127.0.0.1:$pa/v1/verify"
  VERIFY_PATH=/healthz TOKENS="$work/tokens" row "/healthz, $distinct tokens' requests" healthz -s bench/lua/verify-random.lua "http://127.0.0.1:$pa/healthz"
  TOKENS="$work/tokens" row "/v1/verify, $distinct tokens at random" healthz-lua -s bench/lua/verify-random.lua "http://127.0.0.1:$pa/v1/verify"
  # The same two on the replica with the idle timeout. Its activity writes
  # to Redis are the script calls less the epoch checks (one TIME each),
  # counted from the first round's rows to the last's: per session and
  # minute of that wall time, the sessions being used in every round.
  if [ "$round" = 1 ]; then e0=$(cmdstat evalsha); m0=$(cmdstat time); i0=$(date +%s.%N); fi
  row "/v1/verify, 1 token, idle timeout" healthz "${auth[@]}" "http://127.0.0.1:$pi/v1/verify"
  TOKENS="$work/tokens" row "/v1/verify, $distinct tokens at random, idle timeout" healthz-lua -s bench/lua/verify-random.lua "http://127.0.0.1:$pi/v1/verify"
done
sleep 0.5   # the last flush
e1=$(cmdstat evalsha); m1=$(cmdstat time); i1=$(date +%s.%N)
writes=$(( (e1 - e0) - (m1 - m0) ))
per_min=$(python3 -c "print(f'{$writes/$distinct/(($i1-$i0)/60):.2f}')")
echo "idle timeout: activity writes/s, $distinct sessions|-|$(python3 -c "print(round($writes/($i1-$i0)))")|-|writes=$writes per_session_per_minute=$per_min|1" >>"$results"
round=1
row "/v1/verify, invalid signature" healthz -H "Authorization: Bearer $invalid" "http://127.0.0.1:$pa/v1/verify"
row "/v1/verify, expired, renewable" healthz -H "Authorization: Bearer $expired" "http://127.0.0.1:$ps/v1/verify"
row "nginx, no auth"                nginx "http://127.0.0.1:$nport/open/x"
row "nginx + auth_request to a no-op (204)" nginx "${auth[@]}" "http://127.0.0.1:$nport/noop/x"
row "nginx + auth_request verify"   nginx "${auth[@]}" "http://127.0.0.1:$nport/app/x"
VERIFY_PATH=/open/x TOKENS="$work/tokens" row "nginx, no auth, $distinct tokens' requests" nginx -s bench/lua/verify-random.lua "http://127.0.0.1:$nport/open/x"
VERIFY_PATH=/app/x TOKENS="$work/tokens" row "nginx + auth, $distinct tokens" nginx-lua -s bench/lua/verify-random.lua "http://127.0.0.1:$nport/app/x"

# Refresh chains on both replicas at once; first-time claims from the metric.
issued() { curl -s "127.0.0.1:$1/metrics" | awk 'BEGIN {n=0} /^tokenpolicy_refreshes_total\{outcome="issued"\}/ {n=$2} END {print int(n)}'; }
ia0=$(issued "$pa"); ib0=$(issued "$pb"); calls0=$(redis-cli -p "$rport" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3}')
t0=$(date +%s.%N)
TOKENS="$work/chains-a" wrk -t1 -c32 -d"$dur" --latency -s bench/lua/refresh-chains.lua "http://127.0.0.1:$pa/" >"$work/refresh-a" &
wa=$!
TOKENS="$work/chains-b" wrk -t1 -c32 -d"$dur" --latency -s bench/lua/refresh-chains.lua "http://127.0.0.1:$pb/" >"$work/refresh-b"
wait "$wa"
t1=$(date +%s.%N)
ia1=$(issued "$pa"); ib1=$(issued "$pb"); calls1=$(redis-cli -p "$rport" info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3}')
claims=$(python3 -c "print(round(($ia1-${ia0:-0}+$ib1-${ib0:-0})/($t1-$t0)))")
p99r=$(awk '$1=="99%" {print $2}' "$work/refresh-a" "$work/refresh-b" | tr '\n' ' ')
echo "/v1/refresh chains, 2 replicas (first-time claims/s)|-|$claims|$p99r|evalsha=$((${calls1:-0}-${calls0:-0})) issued=$((ia1+ib1-ia0-ib0))|1" >>"$results"

# Verify during a flood (wrk -c32, closed loop, on the same two cores),
# against the same verify run just before it: a flood of logins (the demo
# user's real cost-10 bcrypt hash), then the same shape sending GET /healthz
# instead, what any flood of the cheapest requests costs verify on this
# machine: the floor of the login-flood row.
verify_10k() { TOKENS="$work/tokens" row "/v1/verify, $distinct tokens, $1" healthz -s bench/lua/verify-random.lua "http://127.0.0.1:$pa/v1/verify"; }
beside_flood() { # row suffix, flood output file, flood wrk args...
  local name=$1 out=$2 wf; shift 2
  wrk -t1 -c32 -d"$dur" "$@" >"$out" &
  wf=$!
  sleep 0.5
  verify_10k "$name"
  wait "$wf"
}
verify_10k "before the flood"
beside_flood "login flood" "$work/flood" -s bench/lua/login-flood.lua "http://127.0.0.1:$pa/v1/login"
beside_flood "/healthz flood" "$work/hflood" "http://127.0.0.1:$pa/healthz"
flood_rps=$(awk '/Requests\/sec/ {print $2}' "$work/flood")
flood_non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/flood")
flood_total=$(awk '/requests in/ {print $1}' "$work/flood")
hflood_rps=$(awk '/Requests\/sec/ {print $2}' "$work/hflood")

rss_a=$(awk '/VmRSS/ {print $2}' "/proc/$pida/status")
python3 - "$results" "$rss_a" "$distinct" "${flood_rps:-0}" "${flood_non2xx:-0}" "${flood_total:-0}" "${hflood_rps:-0}" <<'PY'
import statistics, sys
raw = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if l.strip()]
# Rows run in rounds: each round's ratio is to its baseline row of the same
# round; the table gives medians, and the spread of the ratio over the rounds.
base_row = {"healthz": "/healthz", "nginx": "nginx, no auth",
            "healthz-lua": f"/healthz, {sys.argv[3]} tokens' requests",
            "nginx-lua": f"nginx, no auth, {sys.argv[3]} tokens' requests"}
by_round = {(r[0], int(r[5])): float(r[2]) for r in raw}
spread, rows, seen = {}, [], {}
for name, b, rps, p99, extra, rnd in raw:
    seen.setdefault(name, []).append((b, float(rps), p99, extra, int(rnd)))
for name, runs in seen.items():
    b, _, _, extra, _ = runs[-1]
    rps = statistics.median(r[1] for r in runs)
    try: p99 = f"{statistics.median(float(r[2]) for r in runs):.2f}"
    except ValueError: p99 = runs[-1][2]
    if len(runs) > 1 and b in base_row:
        ratios = sorted(r[1] / by_round[(base_row[b], r[4])] for r in runs)
        spread[name] = (statistics.median(ratios),
                        f"{len(runs)} rounds, ratio {ratios[0]:.2f}-{ratios[-1]:.2f}")
    rows.append((name, b, str(rps), p99, extra))
base = {}
for name, b, rps, p99, extra in rows:
    for k, v in base_row.items():
        if name == v: base[k] = (float(rps), float(p99))
noop = next((float(r[2]) for r in rows if "no-op" in r[0]), None)
flood_ref = next((float(r[2]) for r in rows if r[0].endswith("before the flood")), None)
hflood = next((float(r[2]) for r in rows if r[0].endswith("/healthz flood")), None)
print(f"| {'path':<44} | {'req/s':>9} | {'p99 ms':>12} | {'ratio':>17} | {'p99 ratio':>9} | notes")
print(f"|{'-'*46}|{'-'*11}|{'-'*14}|{'-'*19}|{'-'*11}|------")
for name, b, rps, p99, extra in rows:
    ratio = p99r = ""
    notes = []
    if b in base:
        r = spread[name][0] if name in spread else float(rps) / base[b][0]
        ratio = f"{r:.2f}x {b}"
        try: p99r = f"{float(p99)/base[b][1]:.2f}x"
        except ValueError: pass
        plain = b.removesuffix("-lua")
        if plain != b and plain in base:
            notes.append(f"{float(rps)/base[plain][0]:.2f}x {base_row[plain]} without the script")
    if "login flood" in name and flood_ref:
        flood, refused, total = (float(a) for a in sys.argv[4:7])
        notes.append(f"{float(rps)/flood_ref:.2f}x before the flood; the flood: {flood:.0f} logins/s, "
                     f"{refused / max(total, 1):.0%} refused")
        if hflood:
            notes.append(f"{float(rps)/hflood:.2f}x under the /healthz flood")
    elif "/healthz flood" in name and flood_ref:
        notes.append(f"{float(rps)/flood_ref:.2f}x before the flood; the flood: {float(sys.argv[7]):.0f} /healthz/s")
    elif name.startswith("nginx + auth") and "no-op" not in name and noop:
        notes.append(f"{float(rps)/noop:.2f}x no-op auth")
    elif extra not in ("0", ""):
        notes.append(extra if "=" in extra else f"non-2xx {extra}")
    if name in spread and name != "/healthz":
        notes.append(spread[name][1])
    print(f"| {name:<44} | {float(rps):>9.0f} | {p99:>12} | {ratio:>17} | {p99r:>9} | {'; '.join(notes)}")
print(f"\nreplica A RSS after the run: {int(sys.argv[2])/1024:.1f} MiB")
PY

# Where the CPU went in each row: the share of each process (idle is
# "swapper"), then the service's own hottest functions.
if [ -n "${PROFILE:-}" ] && [ -s "$work/profiles" ]; then
  while IFS='|' read -r name data; do
    echo; echo "== profile: $name"
    perf report -i "$data" --stdio --sort comm --percent-limit 3 2>/dev/null | grep -v '^#' | grep -v '^$' || true
    echo "-- tokenpolicy (tokio workers), top functions (share of the workers' samples):"
    perf report -i "$data" --stdio --comm tokio-rt-worker --percentage relative --sort dso,symbol --percent-limit 2 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | head -15 || true
  done <"$work/profiles"
fi
