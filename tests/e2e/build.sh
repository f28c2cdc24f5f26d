#!/usr/bin/env bash
# Builds the control-plane binaries from the Go module proxy into a cache
# directory outside the clone, keyed by version, and prints that directory.
# A second run with the same versions finds them there and builds nothing.
#
#   bash tests/e2e/build.sh            # all of them
#   K8S_CACHE=/some/dir bash tests/e2e/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"

cache_root="${K8S_CACHE:-/var/tmp/tokenpolicy-k8s}"
bin="$cache_root/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION/bin"
work="$cache_root/build"
mkdir -p "$bin" "$work"
export GOFLAGS="-mod=mod -buildvcs=false -trimpath"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A wrapper module: requires MODULE@VERSION and applies the replace lines
# given on stdin, so that a module whose own go.mod replaces its siblings
# with local directories can be built from published versions.
wrapper() {
  local dir=$1 module=$2 version=$3
  rm -rf "$dir"; mkdir -p "$dir"
  {
    printf 'module tokenpolicy.test/build\n\ngo 1.26.0\n\nrequire %s %s\n\n' "$module" "$version"
    cat
  } >"$dir/go.mod"
}

# The go.mod of MODULE@VERSION, straight from the module proxy's cache.
modfile() {
  (cd "$work" && go mod download -json "$1@$2" >/dev/null)
  local enc
  enc=$(go env GOMODCACHE)/cache/download/$(printf '%s' "$1" | sed 's/[A-Z]/!\L&/g')/@v/$2.mod
  cat "$enc"
}

build_kubernetes() {
  local want=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local have=1 b
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || have=0; done
  [ $have = 1 ] && return 0
  log "kubernetes $K8S_VERSION: wrapper module"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${K8S_VERSION#v1.}"
  # Each k8s.io/* staging module that the release points at ./staging is
  # replaced with its published v0.X.Y tag: the list comes from the
  # release's own go.mod.
  modfile k8s.io/kubernetes "$K8S_VERSION" \
    | awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "replace " $1 " => " $1 " " v}' \
    | wrapper "$work/kubernetes" k8s.io/kubernetes "$K8S_VERSION"
  grep -c '^replace' "$work/kubernetes/go.mod" | xargs -I{} echo "[build] {} staging modules replaced" >&2
  local commit date ld=""
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  commit=$(printf '%040d' 0)
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitCommit=$commit -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  log "kubernetes $K8S_VERSION: go build ${want[*]}"
  (cd "$work/kubernetes" && go build -ldflags "-s -w $ld" -o "$bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  [ -x "$bin/etcd" ] && return 0
  log "etcd $ETCD_VERSION"
  # The server module replaces its sibling etcd modules with ../ paths; use
  # their published tags of the same version instead.
  modfile go.etcd.io/etcd/server/v3 "$ETCD_VERSION" \
    | awk -v v="$ETCD_VERSION" '$2 == "=>" && $3 ~ /^\.\.\// {print "replace " $1 " => " $1 " " v}' \
    | wrapper "$work/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  (cd "$work/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
}

# kwok's simulation stages (node heartbeat with a Lease, pods Ready and
# deleted), from the kwok module of the same version, as one config file.
kwok_stages() {
  [ -s "$bin/kwok-stages.yaml" ] && return 0
  local dir
  dir=$(cd "$work" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir/kustomize/stage" ] || { log "no kustomize/stage in the kwok module"; return 1; }
  local f
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf -- '---\n'; cat "$dir/kustomize/stage/$f"
  done >"$bin/kwok-stages.yaml.tmp"
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
}

build_kwok() {
  kwok_stages
  [ -x "$bin/kwok" ] && return 0
  log "kwok $KWOK_VERSION"
  wrapper "$work/kwok" sigs.k8s.io/kwok "$KWOK_VERSION" </dev/null
  (cd "$work/kwok" && go build -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    -o "$bin/kwok" sigs.k8s.io/kwok/cmd/kwok)
}

build_helm() {
  [ -x "$bin/helm" ] && return 0
  log "helm $HELM_VERSION"
  wrapper "$work/helm" helm.sh/helm/v4 "$HELM_VERSION" </dev/null
  (cd "$work/helm" && go build -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    -o "$bin/helm" helm.sh/helm/v4/cmd/helm)
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kwok helm kubernetes)
for t in "${targets[@]}"; do "build_$t"; done
echo "$bin"
