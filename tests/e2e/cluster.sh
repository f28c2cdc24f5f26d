#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1, from binaries built by
# build.sh: etcd, kube-apiserver (TLS, RBAC, service-account tokens),
# kube-controller-manager (garbage collector, deployments, replica sets,
# service accounts, namespaces, disruption budgets), kube-scheduler, and
# kwok, which plays the kubelet of one fake node (IP 127.0.0.1) and makes
# the pods scheduled on it Running and Ready. No container ever runs, and
# nothing dials a pod IP (kwok hands them out from a range nothing routes to).
#
#   bash tests/e2e/cluster.sh build   # build (or find) the binaries
#   bash tests/e2e/cluster.sh up      # start; last lines: KUBECONFIG=…, K8S_BIN=…
#   bash tests/e2e/cluster.sh down    # stop exactly what `up` started
#
# State (certificates, etcd data, logs, pid files) lives in
# $TOKENPOLICY_E2E_STATE (default /var/tmp/tokenpolicy-e2e). `up` on a running
# cluster stops it first and starts an empty one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state="${TOKENPOLICY_E2E_STATE:-/var/tmp/tokenpolicy-e2e}"
pki="$state/pki"
pids="$state/pids"
logs="$state/logs"

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_tools() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v python3 >/dev/null || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

binaries() {
  # build.sh builds only what is missing and prints the directory last.
  bash "$here/build.sh" | tail -n 1
}

# N distinct free ports on 127.0.0.1 (one interpreter start: they are slow
# on a busy machine).
free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

# start NAME CMD...: in its own process group, output to logs/NAME.log.
start() {
  local name=$1; shift
  setsid "$@" >"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pids/$name.pid"
  echo "$name" >>"$state/order"
}

# wait_for WHAT SECONDS CMD...: retries CMD until it succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what not ready after ${secs}s; last lines of its log:"
      tail -n 20 "$logs/$what.log" >&2 || true
      return 1
    fi
    local name
    for name in $(cat "$state/order" 2>/dev/null); do
      kill -0 "$(cat "$pids/$name.pid")" 2>/dev/null || {
        log "$name exited; last lines of its log:"; tail -n 30 "$logs/$name.log" >&2; return 1; }
    done
    sleep 0.2
  done
}

certs() {
  mkdir -p "$pki"
  cd "$pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 30 \
    -subj "/CN=tokenpolicy-e2e-ca" 2>/dev/null
  # apiserver serving certificate: 127.0.0.1 and localhost (and the
  # in-cluster names, never dialled here).
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout apiserver.key -out apiserver.csr \
    -subj "/CN=kube-apiserver" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.96.0.1\nextendedKeyUsage=serverAuth\n' >apiserver.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out apiserver.crt -days 30 -extfile apiserver.ext 2>/dev/null
  # The admin client: group system:masters.
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout admin.key -out admin.csr \
    -subj "/O=system:masters/CN=kubernetes-admin" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out admin.crt -days 30 -extfile client.ext 2>/dev/null
  # Service-account token signing key pair (ES256). EC keys throughout:
  # generated in milliseconds.
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key 2>/dev/null
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
  cd - >/dev/null
}

kubeconfig() {
  local server=$1 out=$2
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: e2e
  context: {cluster: e2e, user: admin, namespace: default}
current-context: e2e
EOF
}

down() {
  [ -d "$pids" ] || return 0
  local name pid live=()
  for name in $(tac "$state/order" 2>/dev/null); do
    pid=$(cat "$pids/$name.pid" 2>/dev/null) || continue
    # Each was started as the leader of its own process group.
    kill -0 "$pid" 2>/dev/null && live+=("$pid") &&
      { kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; }
  done
  for _ in $(seq 50); do
    local any=0
    for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for pid in "${live[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$pids"/*.pid "$state/order"
  [ ${#live[@]} -gt 0 ] && log "stopped" || true
}

up() {
  need_tools
  local bin t0=$SECONDS
  bin=$(binaries)
  [ -x "$bin/kube-apiserver" ] || die "no kube-apiserver in $bin"
  down
  rm -rf "$state/etcd" "$pki" "$logs"
  mkdir -p "$state" "$pids" "$logs" "$state/etcd"
  : >"$state/order"
  certs

  local etcd_port etcd_peer api_port kcm_port sched_port kwok_port
  read -r etcd_port etcd_peer api_port kcm_port sched_port kwok_port <<<"$(free_ports 6)"
  local server="https://127.0.0.1:$api_port"
  local admin="$state/admin.kubeconfig"
  kubeconfig "$server" "$admin"

  log "etcd on 127.0.0.1:$etcd_port"
  start etcd "$bin/etcd" --name e2e --data-dir "$state/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn

  log "kube-apiserver on $server"
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --cert-dir "$pki" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --endpoint-reconciler-type none \
    --profiling=false
  wait_for kube-apiserver 120 "$bin/kubectl" --kubeconfig "$admin" get --raw /readyz

  log "kube-controller-manager, kube-scheduler"
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$admin" \
    --authentication-kubeconfig "$admin" --authorization-kubeconfig "$admin" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --leader-elect=false \
    --controllers garbage-collector-controller,deployment-controller,replicaset-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,disruption-controller,root-ca-certificate-publisher-controller \
    --service-account-private-key-file "$pki/sa.key" \
    --root-ca-file "$pki/ca.crt" \
    --concurrent-deployment-syncs 10 --concurrent-replicaset-syncs 10 \
    --kube-api-qps 200 --kube-api-burst 400
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$admin" \
    --authentication-kubeconfig "$admin" --authorization-kubeconfig "$admin" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" \
    --leader-elect=false --kube-api-qps 200 --kube-api-burst 400

  log "fake node (kwok)"
  "$bin/kubectl" --kubeconfig "$admin" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
spec: {}
status:
  allocatable: {cpu: "1000", memory: 4Ti, pods: "5000"}
  capacity: {cpu: "1000", memory: 4Ti, pods: "5000"}
EOF
  # kwok: heartbeats for the node, Running/Ready for its pods. Pod IPs come
  # from 198.18.0.0/15 (reserved for benchmarks, routed nowhere here); the
  # node's own address is 127.0.0.1. The stages come from the kwok module
  # (build.sh); HOME keeps it off any ~/.kwok config.
  start kwok env HOME="$state" "$bin/kwok" \
    --kubeconfig "$admin" \
    --config "$bin/kwok-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 127.0.0.1 \
    --cidr 198.18.0.1/15 \
    --server-address "127.0.0.1:$kwok_port"
  wait_for kube-controller-manager 60 "$bin/kubectl" --kubeconfig "$admin" -n default get serviceaccount default
  wait_for kwok 60 sh -c "'$bin/kubectl' --kubeconfig '$admin' get node kwok-node-0 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  # The API server taints a new Node not-ready (admission); the node
  # lifecycle controller, which is not run here, would lift it.
  "$bin/kubectl" --kubeconfig "$admin" taint nodes kwok-node-0 node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
  log "up in $((SECONDS - t0))s"
  echo "KUBECONFIG=$admin"
  echo "K8S_BIN=$bin"
}

case "${1:-}" in
  build) binaries ;;
  up) up ;;
  down) down ;;
  *) echo "usage: $0 build|up|down" >&2; exit 2 ;;
esac
