#!/usr/bin/env bash
# Builds the components of a real node from the Go module proxy, each into a
# cache directory of its own keyed by its version, and prints the directory
# that holds them all (symbolic links to the cached binaries):
#
#   kubelet              k8s.io/kubernetes            (same release as the control plane)
#   containerd, ctr,     github.com/containerd/containerd/v2
#   containerd-shim-runc-v2
#   runc                 github.com/opencontainers/runc (cgo, Debian's libseccomp-dev)
#   bridge, host-local,  github.com/containernetworking/plugins
#   loopback, portmap
#
# A second run with the same versions builds nothing.
#
#   bash tests/e2e/build_node.sh
#   NODE_CACHE=/some/dir bash tests/e2e/build_node.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"

cache_root="${NODE_CACHE:-/var/tmp/tokenpolicy-node}"
work="$cache_root/build"
mkdir -p "$work"
export GOFLAGS="-mod=mod -buildvcs=false -trimpath"
export GOTOOLCHAIN=local

log() { printf '[build-node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The source of MODULE@VERSION, copied out of the read-only module cache.
source_of() {
  local module=$1 version=$2 dest=$3 dir
  dir=$(cd "$work" && go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -d "$dir" ] || { log "no source for $module@$version"; return 1; }
  rm -rf "$dest"; cp -r "$dir" "$dest"; chmod -R u+w "$dest"
}

build_kubelet() {
  local out="$cache_root/kubelet-$K8S_VERSION"
  [ -x "$out/kubelet" ] && return 0
  log "kubelet $K8S_VERSION"
  mkdir -p "$out"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${K8S_VERSION#v1.}" enc
  (cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null)
  enc=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod
  # The same wrapper module as tests/e2e/build.sh: every staging module that
  # the release points at ./staging is replaced with its published tag.
  rm -rf "$work/kubernetes"; mkdir -p "$work/kubernetes"
  {
    printf 'module tokenpolicy.test/build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
    awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "replace " $1 " => " $1 " " v}' "$enc"
  } >"$work/kubernetes/go.mod"
  local p ld="" date commit
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ); commit=$(printf '%040d' 0)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitCommit=$commit -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  (cd "$work/kubernetes" && CGO_ENABLED=0 go build -ldflags "-s -w $ld" -o "$out/kubelet.tmp" k8s.io/kubernetes/cmd/kubelet)
  mv "$out/kubelet.tmp" "$out/kubelet"
}

build_containerd() {
  local out="$cache_root/containerd-$CONTAINERD_VERSION" b have=1
  for b in containerd containerd-shim-runc-v2 ctr; do [ -x "$out/$b" ] || have=0; done
  [ $have = 1 ] && return 0
  log "containerd $CONTAINERD_VERSION"
  mkdir -p "$out"
  source_of github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" "$work/containerd"
  local pkg=github.com/containerd/containerd/v2
  local ld="-s -w -X $pkg/version.Version=$CONTAINERD_VERSION -X $pkg/version.Revision=$CONTAINERD_VERSION"
  (cd "$work/containerd" && CGO_ENABLED=0 go build -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ld" \
    -o "$out/" ./cmd/containerd ./cmd/containerd-shim-runc-v2 ./cmd/ctr)
}

build_runc() {
  local out="$cache_root/runc-$RUNC_VERSION"
  [ -x "$out/runc" ] && return 0
  log "runc $RUNC_VERSION"
  pkg-config --exists libseccomp || { log "runc needs Debian's libseccomp-dev and pkg-config"; return 1; }
  mkdir -p "$out"
  source_of github.com/opencontainers/runc "$RUNC_VERSION" "$work/runc"
  # The Makefile's tags without libpathrs (a Rust library Debian lacks).
  (cd "$work/runc" && CGO_ENABLED=1 go build -buildmode=pie -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-X main.gitCommit=$RUNC_VERSION" -o "$out/runc.tmp" .)
  mv "$out/runc.tmp" "$out/runc"
}

build_cni() {
  local out="$cache_root/cni-plugins-$CNI_PLUGINS_VERSION" b have=1
  local plugins=(main/bridge ipam/host-local main/loopback meta/portmap)
  for b in "${plugins[@]}"; do [ -x "$out/${b#*/}" ] || have=0; done
  [ $have = 1 ] && return 0
  log "CNI plugins $CNI_PLUGINS_VERSION"
  mkdir -p "$out"
  source_of github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION" "$work/cni-plugins"
  local pkgs=() ld="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION"
  for b in "${plugins[@]}"; do pkgs+=("./plugins/$b"); done
  (cd "$work/cni-plugins" && CGO_ENABLED=0 go build -ldflags "$ld" -o "$out/" "${pkgs[@]}")
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(runc cni containerd kubelet)
for t in "${targets[@]}"; do "build_$t"; done

# One directory with every binary of the node.
bin="$cache_root/node-kubelet-$K8S_VERSION-containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION-cni-$CNI_PLUGINS_VERSION"
mkdir -p "$bin"
for f in "$cache_root/kubelet-$K8S_VERSION"/kubelet "$cache_root/containerd-$CONTAINERD_VERSION"/* \
         "$cache_root/runc-$RUNC_VERSION"/runc "$cache_root/cni-plugins-$CNI_PLUGINS_VERSION"/*; do
  [ -x "$f" ] && ln -sfn "$f" "$bin/$(basename "$f")"
done
echo "$bin"
