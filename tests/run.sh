#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, Python test
# tools, Rust components, playwright-core, a Traefik built from the Go module
# proxy, Keycloak from Maven Central), then lints, unit-tests and runs the black-box integration tests
# against real redis-server processes, behind real nginx, Traefik and Caddy,
# and with a real browser (chromium); builds the container image with
# buildah and runs it with podman (tests/image); last, each fuzz target runs
# for a bounded time (tests/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
# Sentinel and Cluster tests (tests/integration/test_redis_ha.py).
[ -x /usr/bin/redis-sentinel ] || missing+=(redis-sentinel)
command -v redis-cli >/dev/null || missing+=(redis-tools)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
command -v caddy >/dev/null || missing+=(caddy)
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The network-fault scenarios (tests/netfault): namespaces and their faults.
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  # Install the packages without starting their system services: tests start
  # their own on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

step "python test tools"
python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "playwright-core (drives Debian's chromium; never downloads a browser)"
npm ci --prefix tests/browser --no-audit --no-fund --ignore-scripts --loglevel=error

step "traefik (go build from the Go module proxy; cached under /var/tmp)"
start=$(date +%s)
TRAEFIK=$(bash tests/proxies/build.sh traefik)
export TRAEFIK
echo "$TRAEFIK ($(( $(date +%s) - start )) s)"

step "keycloak (Maven Central zip, checked against its .sha1; cached under /var/tmp)"
start=$(date +%s)
KEYCLOAK_HOME=$(bash tests/keycloak/install.sh)
export KEYCLOAK_HOME
echo "$KEYCLOAK_HOME ($(( $(date +%s) - start )) s)"

step "helm chart, examples and Dockerfile (offline: Helm library, kubernetes-validate, hadolint)"
python3 -m pytest -q -p no:cacheprovider tests/chart

step "rust components"
# rustfmt and clippy come from rustup's own server, which may be out of
# reach: then say so loudly and go on with the rest of the suite.
lint_missing=()
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" \
    || rustup component add "$c" \
    || lint_missing+=("$c")
done
if [ ${#lint_missing[@]} -gt 0 ]; then
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! WARNING: %s not installed and rustup could not fetch it:\n' "${lint_missing[*]}" >&2
  printf '!!! the matching lint step is SKIPPED on this machine.\n' >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
fi
has_component() { [[ " ${lint_missing[*]} " != *" $1 "* ]]; }

if has_component rustfmt; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
fi

if has_component clippy; then
  step "cargo clippy"
  cargo clippy --locked --all-targets -- -D warnings
fi

step "cargo build"
cargo build --locked

step "container image (buildah, from local Debian bases; cached under /var/tmp), run with podman"
start=$(date +%s)
TOKENPOLICY_IMAGE=$(bash tests/image/build.sh)
export TOKENPOLICY_IMAGE
echo "$TOKENPOLICY_IMAGE ($(( $(date +%s) - start )) s)"
python3 -m pytest -q -p no:cacheprovider tests/image

# A real redis-server for the Rust store contract test.
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
export TOKENPOLICY_TEST_REDIS="redis://127.0.0.1:$port/"

step "cargo test"
cargo test --locked
# The store contract against the real redis-server above (ignored by a
# plain `cargo test`, which has none; it fails without one).
cargo test --locked --lib -- --ignored --exact service::store::redis::tests::redis_store_keeps_the_contract
cargo test --locked --lib -- --ignored --exact service::store::redis::tests::redis_registry_leaves_no_key_after_sessions_end
cargo test --locked --lib -- --ignored --exact service::store::redis::provider::tests::redis_provider_store_keeps_the_contract

kill $redis_pid 2>/dev/null || true

# A real Redis Cluster (three masters on free loopback ports) for the
# registry and activity contracts: every key of one user's sessions must
# share one slot.
cluster_dir=$(mktemp -d)
cluster_pids=()
cluster_nodes=()
for i in 1 2 3; do
  p=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  # The bus port is given, not port + 10000 (which a high free port overflows).
  bus=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  mkdir -p "$cluster_dir/$i"
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --cluster-enabled yes --cluster-port "$bus" \
    --cluster-config-file "$cluster_dir/$i/nodes.conf" --dir "$cluster_dir/$i" \
    >"$cluster_dir/$i.log" 2>&1 &
  cluster_pids+=($!)
  cluster_nodes+=("127.0.0.1:$p")
  for _ in $(seq 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
trap 'kill $redis_pid "${cluster_pids[@]}" 2>/dev/null || true' EXIT
redis-cli --cluster create "${cluster_nodes[@]}" --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "${cluster_nodes[0]##*:}" cluster info | grep -q 'cluster_state:ok' && break; sleep 0.1
done
step "registry contract on a Redis Cluster"
TOKENPOLICY_TEST_REDIS_CLUSTER="redis+cluster://$(IFS=,; echo "${cluster_nodes[*]}")" \
  cargo test --locked --lib -- --ignored --exact service::store::activity::cluster_tests::redis_cluster_keeps_the_registry_contract
kill "${cluster_pids[@]}" 2>/dev/null || true
rm -rf "$cluster_dir"

step "integration tests (real redis-server, two replicas; nginx, Traefik, Caddy; chromium)"
export TOKENPOLICY_BIN="$CARGO_TARGET_DIR/debug/tokenpolicy"
# The store soak (about 60 s, test_store_soak.py); TOKENPOLICY_SOAK=0 skips it.
export TOKENPOLICY_SOAK="${TOKENPOLICY_SOAK:-1}"
python3 -m pytest -q -p no:cacheprovider tests/integration

step "network faults (namespaces on a bridge: Redis cut off, slowed, lossy; the history checker)"
# NETFAULT_SECONDS (default 20) per scenario; 60 for the long form.
bash tests/netfault/run.sh

step "book: mdbook build docs, then every relative link of README.md and docs/src"
# mdBook from crates.io, built once and kept outside the clone by version.
mdbook_version=0.5.4
mdbook="/var/tmp/tokenpolicy-tools/mdbook-$mdbook_version/bin/mdbook"
if [ ! -x "$mdbook" ]; then
  echo "installing mdbook $mdbook_version (crates.io)"
  env -u CARGO_TARGET_DIR cargo install --locked --quiet mdbook --version "$mdbook_version" \
    --no-default-features --features search --root "/var/tmp/tokenpolicy-tools/mdbook-$mdbook_version"
fi
"$mdbook" build docs
python3 -m pytest -q -p no:cacheprovider tests/docs
python3 scripts/check_links.py

step "fuzz: token decoder, durations, users file, policy YAML (${FUZZ_SECONDS:-30} s each)"
bash tests/fuzz.sh
