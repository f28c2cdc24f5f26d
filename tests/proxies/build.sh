#!/usr/bin/env bash
# Builds the proxies that the forward-auth tests run (Traefik) from the Go
# module proxy into a cache directory outside the clone, keyed by version,
# and prints the path of each binary. A second run with the same versions
# finds them there and builds nothing.
#
#   bash tests/proxies/build.sh            # all of them
#   K8S_CACHE=/some/dir bash tests/proxies/build.sh traefik
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"

cache_root="${K8S_CACHE:-/var/tmp/tokenpolicy-k8s}"
work="$cache_root/build"
mkdir -p "$work"
export GOFLAGS="-mod=mod -buildvcs=false -trimpath"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

build_traefik() {
  local out="$cache_root/traefik-$TRAEFIK_VERSION/traefik"
  if [ -x "$out" ]; then echo "$out"; return 0; fi
  local module=github.com/traefik/traefik/v3 dir="$work/traefik"
  log "traefik $TRAEFIK_VERSION: wrapper module"
  rm -rf "$dir"; mkdir -p "$dir"
  (cd "$dir" && go mod download -json "$module@$TRAEFIK_VERSION" >/dev/null)
  local gomod
  gomod=$(go env GOMODCACHE)/cache/download/github.com/traefik/traefik/v3/@v/$TRAEFIK_VERSION.mod
  # A replace by a local directory of Traefik's repository cannot be
  # reproduced from the module proxy.
  if grep -qE '=>[[:space:]]+\.' "$gomod"; then
    log "traefik $TRAEFIK_VERSION replaces modules by local directories: $(grep -E '=>[[:space:]]+\.' "$gomod" | tr -s ' \t' ' ')"
    return 1
  fi
  {
    printf 'module tokenpolicy.test/build\n\ngo 1.26.0\n\nrequire %s %s\n\n' "$module" "$TRAEFIK_VERSION"
    # Its replaces of modules by forks (github.com/containous/...), copied
    # as they are: the replace lines of a dependency's go.mod do not apply
    # to a module that requires it.
    awk '
      /^replace \(/ {block=1; next}
      block && /^\)/ {block=0; next}
      block && $2 == "=>" && $3 !~ /^\./ {print "replace " $0}
      /^replace / && $3 == "=>" && $4 !~ /^\./ {print}
    ' "$gomod"
  } >"$dir/go.mod"
  grep -c '^replace' "$dir/go.mod" | xargs -I{} echo "[build] {} replaces in the wrapper" >&2
  log "traefik $TRAEFIK_VERSION: go build"
  mkdir -p "$(dirname "$out")"
  local p=github.com/traefik/traefik/v3/pkg/version
  (cd "$dir" && go build -ldflags "-s -w -X $p.Version=$TRAEFIK_VERSION -X $p.BuildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -o "$out.tmp" github.com/traefik/traefik/v3/cmd/traefik)
  mv "$out.tmp" "$out"
  log "traefik $TRAEFIK_VERSION: $out"
  echo "$out"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(traefik)
for t in "${targets[@]}"; do "build_$t"; done
