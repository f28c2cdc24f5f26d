#!/usr/bin/env bash
# The end-to-end suite against a real API server: installs what it needs
# (openssl from Debian, the Python test tools), builds the control plane
# from the Go module proxy into /var/tmp (cached by version, see build.sh)
# and the tokenpolicy binary, then runs tests/e2e with one cluster for the
# whole session (started and stopped by the suite itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
if ! command -v openssl >/dev/null; then
  step "installing openssl"
  apt_install openssl
fi
# Go builds the control plane. Without one, the toolchain itself comes from
# the Go module proxy (module golang.org/toolchain), as `go` would fetch it.
export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
  gover=go1.26.8
  gohome=/var/tmp/tokenpolicy-go/$gover
  if [ ! -x "$gohome/bin/go" ]; then
    step "Go $gover from the module proxy"
    command -v curl >/dev/null && command -v unzip >/dev/null || apt_install curl unzip ca-certificates
    rm -rf "$gohome.tmp"; mkdir -p "$gohome.tmp"
    curl -fsSL "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$gover.linux-amd64.zip" -o "$gohome.tmp/go.zip"
    (cd "$gohome.tmp" && unzip -q go.zip && rm go.zip)
    mv "$gohome.tmp/golang.org/toolchain@v0.0.1-$gover.linux-amd64" "$gohome"; rm -rf "$gohome.tmp"
    chmod +x "$gohome"/bin/* "$gohome"/pkg/tool/*/*   # module zips carry no modes
  fi
  export PATH="$gohome/bin:$PATH"
fi

step "python test tools"
python3 -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

step "control plane binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm)"
time bash tests/e2e/build.sh

step "cargo build"
cargo build --locked

step "container image (buildah; cached, see tests/image/build.sh)"
start=$(date +%s)
TOKENPOLICY_IMAGE=$(bash tests/image/build.sh)
export TOKENPOLICY_IMAGE
echo "$TOKENPOLICY_IMAGE ($(( $(date +%s) - start )) s)"
# test_06b runs that image with podman: here a missing image fails it.
export TOKENPOLICY_IMAGE_REQUIRED=1

step "end-to-end suite (real kube-apiserver on 127.0.0.1)"
export TOKENPOLICY_BIN="$CARGO_TARGET_DIR/debug/tokenpolicy"
python3 -m pytest -q -p no:cacheprovider tests/e2e "$@"
