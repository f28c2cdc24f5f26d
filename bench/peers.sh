#!/usr/bin/env bash
# Side by side with oauth2-proxy: its /oauth2/auth beside our /v1/verify,
# both relying parties of the same real Keycloak, both on the same
# redis-server, in one run. Builds oauth2-proxy from the Go module proxy
# (cached under /var/tmp, keyed by version), starts Keycloak (the tests'
# install and realm, bench/peers_keycloak.py), Redis, two of our replicas
# (one as shipped, one with its caches turned off: --verified-cache-size 0
# --session-cache-size 0), oauth2-proxy with its Redis session store, and
# nginx in front of both (auth_request, as bench/run.sh). Real sessions of
# both come from Keycloak's own login form, scripted
# (bench/peers_login.py). Then wrk -t1 -c64 against each path, in ROUNDS
# rounds that alternate ours and the peer's; the table gives medians of
# req/s, our rate as a ratio to the peer's, and CPU per request
# (bench/cpu_ticks.py: the service's /proc ticks over the row, and Redis's,
# divided by the requests answered).
#
# Many sessions: ours are DISTINCT (10,000) tokens minted offline with our
# signing key (bench/mint.py: an OpenID Connect session's claims), each
# costing a full verify the first time; the peer's are PEER_SESSIONS (500)
# real sessions, each a login through Keycloak's form (Keycloak hashes the
# password each time: a few logins a second on two cores, so 10,000 would
# take far longer than the rest of the run); ours are also measured over
# the same PEER_SESSIONS real sessions. The table says which counts ran.
#
# Last, the login's cost: LOGINS (100) times, one at a time and in turn, a
# login through our callback and one through oauth2-proxy's, each timed,
# and a code flow with Keycloak alone timing its token endpoint (the
# provider's part of our callback; our JWKS is cached, so a callback does
# not fetch it).
#
#   bash bench/peers.sh         # about 15 minutes; DURATION=6s, ROUNDS=3
#   BIN=/path/tokenpolicy bash bench/peers.sh   # bench that binary, no build
#   OAUTH2_PROXY_VERSION=v7.15.6 PEERS_CACHE=/var/tmp/tokenpolicy-peers
#   KEYCLOAK_INFO=kc.json bash bench/peers.sh   # a Keycloak already started
#                                  # by `python3 bench/peers_keycloak.py kc.json`
#   KEEP=dir bash bench/peers.sh   # copies the logs and results there
#
# oauth2-proxy runs with --set-xauthrequest (its answer then carries the
# user, email and groups headers, as ours does) and --request-logging=false
# (its default logs a line per request; ours logs none at RUST_LOG=warn).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
dur="${DURATION:-6s}"
rounds="${ROUNDS:-3}"
conns="${CONNECTIONS:-64}"
distinct="${DISTINCT:-10000}"
peer_sessions="${PEER_SESSIONS:-500}"
logins="${LOGINS:-100}"
o2p_version="${OAUTH2_PROXY_VERSION:-v7.15.6}"
cache="${PEERS_CACHE:-/var/tmp/tokenpolicy-peers}"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
apt_install ${need[@]+"${need[@]}"}
export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "no go (looked in PATH and /usr/local/go/bin)" >&2; exit 1; }

# oauth2-proxy from the Go module proxy, once per version.
o2p="$cache/oauth2-proxy-$o2p_version/oauth2-proxy"
mkdir -p "$cache"
(
  flock 9
  if [ ! -x "$o2p" ]; then
    echo "building oauth2-proxy $o2p_version (go install, once)..." >&2
    start=$(date +%s)
    rm -rf "$cache/oauth2-proxy-$o2p_version.part"
    GOBIN="$cache/oauth2-proxy-$o2p_version.part" GOFLAGS="-buildvcs=false -trimpath" CGO_ENABLED=0 \
      nice go install "github.com/oauth2-proxy/oauth2-proxy/v7@$o2p_version"
    mv "$cache/oauth2-proxy-$o2p_version.part" "$cache/oauth2-proxy-$o2p_version"
    echo "built in $(( $(date +%s) - start )) s" >&2
  fi
) 9>"$cache/.oauth2-proxy.lock"

. bench/lib.sh
keep() { # the logs and raw results, never the secrets or the cookies
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$work"/*.log "$work"/*.out "$work"/results "$work"/*callback "$work"/login-timing "$KEEP"/ 2>/dev/null || true
  fi
  cleanup
}
trap keep EXIT

# Keycloak (30-60 s to start here), meanwhile Redis and the keys.
if [ -n "${KEYCLOAK_INFO:-}" ]; then
  cp "$KEYCLOAK_INFO" "$work/kc.json"; kcpid=$$
else
  mkfifo "$work/kc-stdin"
  python3 bench/peers_keycloak.py "$work/kc.json" <"$work/kc-stdin" >"$work/keycloak.out" 2>&1 &
  kcpid=$!
  pids+=("$kcpid")
  exec 8>"$work/kc-stdin"   # closing it (at exit) stops Keycloak
fi
rport=$(free_port)
start_redis "$rport"
redispid=$REDIS_PID
pids+=("$redispid")
openssl genpkey -algorithm ed25519 -out "$work/key.pem" 2>/dev/null
for _ in $(seq 600); do
  [ -s "$work/kc.json" ] && break
  kill -0 "$kcpid" 2>/dev/null || { cat "$work/keycloak.out" >&2; exit 1; }
  sleep 0.5
done
[ -s "$work/kc.json" ] || { echo "Keycloak not up after 300 s" >&2; cat "$work/keycloak.out" >&2; exit 1; }
kc() { python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$work/kc.json" "$1"; }
issuer=$(kc issuer); client_id=$(kc client_id); ca=$(kc ca_file)
(umask 077; kc client_secret | tr -d '\n' >"$work/client-secret"; openssl rand -hex 16 | tr -d '\n' >"$work/cookie-secret")
export KEYCLOAK_CA="$ca"
echo "Keycloak $(kc version) ready in $(kc start_seconds) s" >&2

# Ours: the policy as shipped (examples/tokenpolicy.yaml) with spec.oidc.
pa=$(free_port); pn=$(free_port); op=$(free_port)
{ cat examples/tokenpolicy.yaml
  echo "  externalURL: http://127.0.0.1:$pa"
  echo "  oidc:"
  echo "    issuerURL: $issuer"
  echo "    clientID: $client_id"
  echo "    clientSecretRef: {name: tokenpolicy-oidc, key: client-secret}"
  echo "    caSecretRef: {name: idp-ca, key: ca.crt}"; } >"$work/policy.yaml"
serve() { # name port extra-args...
  RUST_LOG=warn "$bin" serve --policy "$work/policy.yaml" --signing-key "$work/key.pem" \
    --listen "127.0.0.1:$2" --redis "redis://127.0.0.1:$rport/" --max-logins-per-user 1000000000 \
    --oidc-client-secret-file "$work/client-secret" --oidc-ca-file "$ca" "${@:3}" >/dev/null 2>"$work/$1.log" &
}
serve a "$pa"; tppid=$!; pids+=("$tppid")
serve nocache "$pn" --verified-cache-size 0 --session-cache-size 0; ncpid=$!; pids+=("$ncpid")
"$o2p" --http-address="127.0.0.1:$op" --provider=oidc --oidc-issuer-url="$issuer" \
  --client-id="$client_id" --client-secret-file="$work/client-secret" \
  --cookie-secret-file="$work/cookie-secret" --cookie-secure=false \
  --redirect-url="http://127.0.0.1:$op/oauth2/callback" --email-domain='*' \
  --scope="openid email profile" --code-challenge-method=S256 --provider-ca-file="$ca" \
  --session-store-type=redis --redis-connection-url="redis://127.0.0.1:$rport" \
  --set-xauthrequest --upstream=static://200 --request-logging=false >"$work/oauth2-proxy.log" 2>&1 &
o2ppid=$!; pids+=("$o2ppid")
wait_http "127.0.0.1:$pa/readyz"; wait_http "127.0.0.1:$pn/readyz"; wait_http "127.0.0.1:$op/ready"

echo "logging in through Keycloak's form: $peer_sessions sessions each..." >&2
t0=$(date +%s.%N)
python3 bench/peers_login.py peer "http://127.0.0.1:$op" "$peer_sessions" "$work/peer-cookies" "$work/peer-callback"
t1=$(date +%s.%N)
python3 bench/peers_login.py ours "http://127.0.0.1:$pa" "$peer_sessions" "$work/our-cookies" "$work/our-callback"
t2=$(date +%s.%N)
login_rate=$(python3 -c "import sys; n=int(sys.argv[1]); print(f'{n/(float(sys.argv[3])-float(sys.argv[2])):.1f} and {n/(float(sys.argv[4])-float(sys.argv[3])):.1f}')" "$peer_sessions" "$t0" "$t1" "$t2")
kid=$(curl -s "127.0.0.1:$pa/.well-known/jwks.json" | python3 -c 'import json,sys;print(json.load(sys.stdin)["keys"][0]["kid"])')
python3 bench/mint.py "$work/key.pem" "$kid" - "$distinct" "$issuer" >"$work/minted"
one_ours=$(head -1 "$work/our-cookies"); one_peer=$(head -1 "$work/peer-cookies")
# Every credential must pass before it is measured.
[ "$(curl -s -o /dev/null -w '%{http_code}' -b "tokenpolicy=$one_ours" "127.0.0.1:$pa/v1/verify")" = 200 ] || { echo "our session is refused" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' -b "tokenpolicy=$(head -1 "$work/minted")" "127.0.0.1:$pa/v1/verify")" = 200 ] || { echo "a minted token is refused" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' -b "_oauth2_proxy=$one_peer" "127.0.0.1:$op/oauth2/auth")" = 202 ] || { echo "the oauth2-proxy session is refused" >&2; exit 1; }

nport=$(free_port); aport=$(free_port); mkdir -p "$work/nginx/tmp"
sed -e "s#@@PREFIX@@#$work/nginx#g" -e "s/@@PORT@@/$nport/" -e "s/@@APP_PORT@@/$aport/g" \
    -e "s/@@TP_PORT@@/$pa/" -e "s/@@PEER_PORT@@/$op/" -e "s/@@WORKERS@@/${NGINX_WORKERS:-auto}/" \
    bench/nginx-peers.conf.template >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
wait_http "127.0.0.1:$nport/open/"

results="$work/results"
: >"$results"
# row KEY SIDE SERVICE_PID wrk-args...: requests/s, p99 (ms), non-2xx,
# requests, and the service's and Redis's CPU ticks over the row.
row() {
  local key=$1 side=$2 spid=$3; shift 3
  local before after out
  before=$(python3 bench/cpu_ticks.py "svc=$spid" "redis=$redispid")
  out=$(wrk -t1 -c"$conns" -d"$dur" --latency "$@")
  after=$(python3 bench/cpu_ticks.py "svc=$spid" "redis=$redispid")
  local rps p99 non2xx reqs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "${round:-1}|$key|$side|$rps|$p99|${non2xx:-0}|$reqs|$before|$after" >>"$results"
}
ck() { echo "Cookie: $1=$2"; }
ours_many() { TOKENS="$1" COOKIE=tokenpolicy VERIFY_PATH="$2" row "$3" ours "$4" -s bench/lua/cookie-random.lua "http://127.0.0.1:$5$2"; }
peer_many() { TOKENS="$work/peer-cookies" COOKIE=_oauth2_proxy VERIFY_PATH="$1" row "$2" peer "$o2ppid" -s bench/lua/cookie-random.lua "http://127.0.0.1:$3$1"; }
wrk -t1 -c"$conns" -d2s -H "$(ck tokenpolicy "$one_ours")" "http://127.0.0.1:$pa/v1/verify" >/dev/null
wrk -t1 -c"$conns" -d2s -H "$(ck _oauth2_proxy "$one_peer")" "http://127.0.0.1:$op/oauth2/auth" >/dev/null
echo "measuring: $rounds rounds..." >&2
for round in $(seq "$rounds"); do
  # Which side goes first alternates with the round.
  if ((round % 2)); then order=(ours peer); else order=(peer ours); fi
  row nginx-open nginx "$tppid" "http://127.0.0.1:$nport/open/x"
  for side in "${order[@]}"; do
    if [ "$side" = ours ]; then
      row health ours "$tppid" "http://127.0.0.1:$pa/healthz"
      row one ours "$tppid" -H "$(ck tokenpolicy "$one_ours")" "http://127.0.0.1:$pa/v1/verify"
      ours_many "$work/minted" /v1/verify many "$tppid" "$pa"
      ours_many "$work/our-cookies" /v1/verify real "$tppid" "$pa"
      row nocache-one ours "$ncpid" -H "$(ck tokenpolicy "$one_ours")" "http://127.0.0.1:$pn/v1/verify"
      ours_many "$work/minted" /v1/verify nocache-many "$ncpid" "$pn"
      row nginx-one ours "$tppid" -H "$(ck tokenpolicy "$one_ours")" "http://127.0.0.1:$nport/app/x"
      ours_many "$work/minted" /app/x nginx-many "$tppid" "$nport"
    else
      row health peer "$o2ppid" "http://127.0.0.1:$op/ping"
      row one peer "$o2ppid" -H "$(ck _oauth2_proxy "$one_peer")" "http://127.0.0.1:$op/oauth2/auth"
      peer_many /oauth2/auth many "$op"
      peer_many /oauth2/auth real "$op"
      row nginx-one peer "$o2ppid" -H "$(ck _oauth2_proxy "$one_peer")" "http://127.0.0.1:$nport/peer/x"
      peer_many /peer/x nginx-many "$nport"
    fi
  done
  row nginx-open nginx "$tppid" "http://127.0.0.1:$nport/open/x"
done

echo "timing the login: $logins times, one at a time, ours, oauth2-proxy's and Keycloak's token endpoint alone in turn..." >&2
python3 bench/peers_login.py timing "$work/kc.json" "http://127.0.0.1:$pa" "http://127.0.0.1:$op" "$logins" "$work/login-timing"

python3 - "$results" "$distinct" "$peer_sessions" "$login_rate" "$work" "$o2p_version" <<'PY'
import json, os, statistics, sys
res, distinct, peer_n, login_rate, work, o2p_version = sys.argv[1:7]
hz = os.sysconf("SC_CLK_TCK")
runs = {}
for line in open(res):
    rnd, key, side, rps, p99, non2xx, reqs, before, after = line.rstrip("\n").split("|")
    b, a = json.loads(before), json.loads(after)
    n = max(int(reqs or 0), 1)
    us = lambda k: (a.get(k, 0) - b.get(k, 0)) * 1e6 / hz / n
    runs.setdefault((key, side), []).append(
        dict(rps=float(rps), p99=float(p99), non2xx=int(non2xx), svc=us("svc"), redis=us("redis")))

def med(key, side, f):
    r = runs.get((key, side))
    return statistics.median(x[f] for x in r) if r else None

rows = [
    ("health endpoint (/healthz, /ping)", "health", "health"),
    ("direct, 1 session", "one", "one"),
    (f"direct, {distinct} tokens (peer: {peer_n} sessions)", "many", "many"),
    (f"direct, {peer_n} real sessions each", "real", "real"),
    ("direct, our caches off, 1 session", "nocache-one", "one"),
    (f"direct, our caches off, {distinct} tokens (peer: {peer_n})", "nocache-many", "many"),
    ("nginx auth_request, 1 session", "nginx-one", "nginx-one"),
    (f"nginx auth_request, {distinct} tokens (peer: {peer_n})", "nginx-many", "nginx-many"),
]
print(f"| {'path':<48} | {'ours req/s':>10} | {'peer req/s':>10} | {'ratio':>6} | {'ours CPU µs/req':>17} | {'peer CPU µs/req':>17} | {'CPU ratio':>9} | p99 ms ours / peer")
print(f"|{'-'*50}|{'-'*12}|{'-'*12}|{'-'*8}|{'-'*19}|{'-'*19}|{'-'*11}|-------------------")
for name, ok, pk in rows:
    o, p = med(ok, "ours", "rps"), med(pk, "peer", "rps")
    if o is None or p is None:
        continue
    os_, or_ = med(ok, "ours", "svc"), med(ok, "ours", "redis")
    ps, pr = med(pk, "peer", "svc"), med(pk, "peer", "redis")
    bad = sum(x["non2xx"] for x in runs[(ok, "ours")] + runs[(pk, "peer")])
    spread = ""
    if len(runs[(ok, "ours")]) > 1:
        ratios = sorted(a["rps"] / b["rps"] for a, b in zip(runs[(ok, "ours")], runs[(pk, "peer")]))
        spread = f" ({ratios[0]:.1f}-{ratios[-1]:.1f}x)"
    cpu_o, cpu_p = os_ + or_, ps + pr
    print(f"| {name:<48} | {o:>10.0f} | {p:>10.0f} | {o/p:>5.2f}x | {os_:>6.1f} + {or_:>4.1f} Redis | {ps:>6.1f} + {pr:>4.1f} Redis | {cpu_p/cpu_o:>8.1f}x | "
          f"{med(ok, 'ours', 'p99'):.2f} / {med(pk, 'peer', 'p99'):.2f}{spread}" + (f"; NON-2XX {bad}" if bad else ""))
nopen = med("nginx-open", "nginx", "rps")
if nopen:
    print(f"\nnginx without auth: {nopen:.0f} req/s; through nginx, ours is "
          f"{med('nginx-one', 'ours', 'rps')/nopen:.2f}x of it, the peer "
          f"{med('nginx-one', 'peer', 'rps')/nopen:.2f}x (1 session).")
print(f"ratio: our req/s over the peer's (median of {len(runs[('one','ours')])} rounds, range in brackets); "
      f"CPU ratio: the peer's CPU per request (service + Redis) over ours.")
print(f"logins through Keycloak's form, 4 at a time: {login_rate} per second (peer, ours).")

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

def stats(path, col=0):
    xs = [float(l.split()[col]) * 1000 for l in open(path) if l.strip()]
    return f"median {statistics.median(xs):.1f} ms, p90 {pct(xs, 0.9):.1f} ms (n={len(xs)})"

print(f"\nthe login's cost, one login at a time (Keycloak on loopback):")
lt = work + "/login-timing"
print(f"  our callback (code exchange, ID token checks, session, token): {stats(lt, 0)}")
print(f"  Keycloak's token endpoint alone (kept-alive connection):      {stats(lt, 2)}")
print(f"  Keycloak's JWKS alone (ours caches it; not per login):        {stats(lt, 3)}")
print(f"  oauth2-proxy {o2p_version}'s callback, for comparison:              {stats(lt, 1)}")
xs = [(float(l.split()[0]) - float(l.split()[2])) * 1000 for l in open(lt) if l.strip()]
print(f"  our callback minus the token endpoint of the same turn:        median {statistics.median(xs):.1f} ms")
PY
