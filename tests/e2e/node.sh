#!/usr/bin/env bash
# A real node for the cluster that tests/e2e/cluster.sh starts: containerd
# (with runc and the CNI plugins, built by build_node.sh) and a kubelet
# registered with the cluster's kube-apiserver as Node $TOKENPOLICY_NODE_NAME.
#
#   bash tests/e2e/node.sh build                  # build (or find) the binaries
#   bash tests/e2e/node.sh up                     # after cluster.sh up
#   bash tests/e2e/node.sh import IMAGE.tar ...   # ctr -n k8s.io images import
#   bash tests/e2e/node.sh down                   # stop exactly what `up` started
#
# The cluster's state ($TOKENPOLICY_E2E_STATE, default /var/tmp/tokenpolicy-e2e)
# gives the CA and the API server's address; the node's own state (containerd
# root, kubelet root, CNI configuration, logs, pid files) lives in
# $TOKENPOLICY_NODE_STATE (default $TOKENPOLICY_E2E_STATE/node).
#
# Pods get their network namespaces from containerd through the CNI bridge
# plugin: a bridge of this node's own ($TOKENPOLICY_NODE_BRIDGE) on
# $TOKENPOLICY_NODE_SUBNET. Only the kubelet dials Pod addresses (its
# probes); tests reach Pods through `kubectl port-forward` on 127.0.0.1.
#
# The machine: a cgroup v1 (hybrid) layout, so the kubelet runs with
# failCgroupV1: false, the cgroupfs driver and no QoS cgroups.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state="${TOKENPOLICY_E2E_STATE:-/var/tmp/tokenpolicy-e2e}"
pki="$state/pki"
node="${TOKENPOLICY_NODE_STATE:-$state/node}"
name="${TOKENPOLICY_NODE_NAME:-tp-node-0}"
bridge="${TOKENPOLICY_NODE_BRIDGE:-tpnode0}"
subnet="${TOKENPOLICY_NODE_SUBNET:-10.213.0.0/24}"
pids="$node/pids"
logs="$node/logs"
# The sandbox image: a pause process built here (node/pause.c), never pulled.
PAUSE_IMAGE=registry.k8s.io/pause:3.10
# Only Pods that tolerate this land here: the rest of the suite keeps kwok.
TAINT=tokenpolicy.test/real-node=true:NoSchedule

log() { printf '[node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

binaries() { bash "$here/build_node.sh" | tail -n 1; }

need_tools() {
  local missing=()
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  pkg-config --exists libseccomp 2>/dev/null || missing+=(libseccomp-dev pkg-config)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

free_ports() {
  python3 -c 'import socket,sys
ss=[socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"
}

start() {
  local what=$1; shift
  setsid "$@" >"$logs/$what.log" 2>&1 </dev/null &
  echo $! >"$pids/$what.pid"
  echo "$what" >>"$node/order"
}

wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$(cat "$pids/$what.pid")" 2>/dev/null || {
      log "$what exited; last lines of its log:"; tail -n 30 "$logs/$what.log" >&2; return 1; }
    if [ $SECONDS -ge $deadline ]; then
      log "$what not ready after ${secs}s; last lines of its log:"
      tail -n 30 "$logs/$what.log" >&2
      return 1
    fi
    sleep 0.5
  done
}

# The Node's client certificate (group system:nodes, so the API server's
# Node authorizer gives it exactly a kubelet's rights) and its kubeconfig.
node_identity() {
  local server=$1 d="$node/pki"
  mkdir -p "$d"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/kubelet.key" -out "$d/kubelet.csr" \
    -subj "/O=system:nodes/CN=system:node:$name" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$d/client.ext"
  openssl x509 -req -in "$d/kubelet.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -out "$d/kubelet.crt" -days 30 -extfile "$d/client.ext" 2>/dev/null
  cat >"$node/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$server", certificate-authority: "$pki/ca.crt"}
users:
- name: node
  user: {client-certificate: "$d/kubelet.crt", client-key: "$d/kubelet.key"}
contexts:
- name: e2e
  context: {cluster: e2e, user: node}
current-context: e2e
EOF
}

pause_image() {
  local out="$node/images/pause.tar"
  mkdir -p "$node/images"
  gcc -static -Os -s -o "$node/images/pause" "$here/node/pause.c"
  python3 "$here/node/oci_archive.py" --name "$PAUSE_IMAGE" --out "$out" \
    --entrypoint /pause "$node/images/pause:/pause"
  echo "$out"
}

import() {
  local bin; bin=$(cat "$node/bin")
  local f
  for f in "$@"; do
    "$bin/ctr" --address "$node/containerd.sock" -n k8s.io images import --local "$f" >&2
  done
}

down() {
  [ -d "$pids" ] || return 0
  local what pid live=()
  # The kubelet first, then every task through containerd, so that the
  # shims delete their containers' state and exit.
  pid=$(cat "$pids/kubelet.pid" 2>/dev/null) && kill -TERM -- "-$pid" 2>/dev/null &&
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if [ -S "$node/containerd.sock" ] && [ -s "$node/bin" ]; then
    local ctr t
    ctr="$(cat "$node/bin")/ctr --address $node/containerd.sock -n k8s.io"
    for t in $($ctr tasks ls -q 2>/dev/null); do $ctr tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    for t in $($ctr tasks ls -q 2>/dev/null); do
      for _ in $(seq 20); do $ctr tasks delete "$t" >/dev/null 2>&1 && break; sleep 0.1; done
    done
  fi
  for what in $(tac "$node/order" 2>/dev/null); do
    pid=$(cat "$pids/$what.pid" 2>/dev/null) || continue
    kill -0 "$pid" 2>/dev/null && live+=("$pid") &&
      { kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; }
  done
  for _ in $(seq 100); do
    local any=0
    for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for pid in "${live[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  # The Pods' processes: containerd leaves its shims (and their containers,
  # the shims' children) running when it stops. Ours are the shims whose
  # command line names this node's socket.
  local shims=() p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $node/containerd.sock " && shims+=("${p#/proc/}")
  done
  if [ ${#shims[@]} -gt 0 ]; then
    for pid in "${shims[@]}"; do
      for p in $(ps -o pid= --ppid "$pid" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    done
    for pid in "${shims[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -f "$pids"/*.pid "$node/order"
  # Mounts under the node's directories (overlay snapshots, Pod volumes, the
  # sandboxes' /dev/shm), deepest first.
  local m
  for m in $(awk -v p="$node/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # Network namespaces that containerd made for this node's Pods.
  for m in $(ls "$node/netns" 2>/dev/null); do
    umount "$node/netns/$m" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  [ ${#live[@]} -gt 0 ] && log "stopped" || true
}

up() {
  need_tools
  [ -s "$pki/ca.key" ] || die "no cluster CA in $pki: run tests/e2e/cluster.sh up first"
  [ -s "$state/admin.kubeconfig" ] || die "no $state/admin.kubeconfig"
  local bin t0=$SECONDS
  bin=$(binaries)
  [ -x "$bin/kubelet" ] || die "no kubelet in $bin"
  down
  rm -rf "$node"
  mkdir -p "$pids" "$logs" "$node/cni/net.d" "$node/netns" "$node/manifests"
  echo "$bin" >"$node/bin"
  : >"$node/order"
  local server
  server=$(sed -n 's/^ *server: *//p' "$state/admin.kubeconfig" | head -n 1)
  node_identity "$server"

  # containerd: a private root, state and socket; the CRI plugin runs runc
  # (ours, by absolute path) and the CNI plugins from the same directory.
  cat >"$node/containerd.toml" <<EOF
version = 3
root = "$node/containerd/root"
state = "$node/containerd/state"
[grpc]
  address = "$node/containerd.sock"
[ttrpc]
  address = "$node/containerd.sock.ttrpc"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  netns_mounts_under = "$node/netns"
  # This machine refuses a negative /proc/self/oom_score_adj even to root
  # (runc init: "failed to update /proc/self/oom_score_adj: Permission
  # denied"), and the kubelet asks -998 for every sandbox: clamp to
  # containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$bin/runc"
        Root = "$node/runc"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$bin"]
    conf_dir = "$node/cni/net.d"
[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
  cat >"$node/cni/net.d/10-tpnode.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "tpnode",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet"}]], "dataDir": "$node/cni/ipam"}},
    {"type": "loopback"}
  ]
}
EOF
  log "containerd"
  start containerd env PATH="$bin:$PATH" "$bin/containerd" --config "$node/containerd.toml"
  wait_for containerd 60 "$bin/ctr" --address "$node/containerd.sock" version
  import "$(pause_image)"

  local kubelet_port healthz_port node_ip
  read -r kubelet_port healthz_port <<<"$(free_ports 2)"
  cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$node/containerd.sock
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
podLogsDir: $node/pod-logs
staticPodPath: $node/manifests
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
registerNode: true
rotateCertificates: false
maxPods: 50
EOF
  # The kubelet refuses a loopback node IP ("nodeIP can't be loopback
  # address"): the node's address is the gateway of its own Pod bridge,
  # made here before the CNI plugin finds and reuses it.
  local gw
  gw=$(python3 -c 'import ipaddress,sys; n=ipaddress.ip_network(sys.argv[1]); print(f"{n[1]}/{n.prefixlen}")' "$subnet")
  ip link add "$bridge" type bridge
  ip addr add "$gw" dev "$bridge"
  ip link set "$bridge" up
  node_ip=${gw%/*}
  sed -i "s|^address: 127.0.0.1|address: $node_ip|" "$node/kubelet.yaml"
  log "kubelet (node $name, $node_ip:$kubelet_port)"
  start kubelet "$bin/kubelet" --config "$node/kubelet.yaml" \
    --kubeconfig "$node/kubelet.kubeconfig" \
    --hostname-override "$name" --node-ip "$node_ip" \
    --register-with-taints "$TAINT" \
    --root-dir "$node/kubelet" --cert-dir "$node/kubelet/pki" \
    --v 1
  local kubectl
  kubectl="${K8S_BIN:-$(bash "$here/build.sh" | tail -n 1)}/kubectl"
  wait_for kubelet 120 sh -c "'$kubectl' --kubeconfig '$state/admin.kubeconfig' get node '$name' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  # As for kwok's node: the not-ready taint that admission puts on a new
  # Node is lifted by the node lifecycle controller, which is not run here.
  "$kubectl" --kubeconfig "$state/admin.kubeconfig" taint nodes "$name" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
  # A Node left from an earlier run keeps its old taints: set ours here too.
  "$kubectl" --kubeconfig "$state/admin.kubeconfig" taint nodes "$name" "$TAINT" --overwrite >/dev/null
  log "node $name up in $((SECONDS - t0))s"
  echo "NODE=$name"
  echo "NODE_STATE=$node"
}

case "${1:-}" in
  build) need_tools; binaries ;;
  up) up ;;
  import) shift; import "$@" ;;
  down) down ;;
  *) echo "usage: $0 build|up|import TAR...|down" >&2; exit 2 ;;
esac
