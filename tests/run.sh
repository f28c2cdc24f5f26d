#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, Python test
# tools, Rust components, playwright-core, a Traefik built from the Go module
# proxy, Keycloak from Maven Central, just), then lints, unit-tests and runs the black-box integration tests
# against real redis-server processes, behind real nginx, Traefik and Caddy,
# and with a real browser (chromium); builds the container image with
# buildah and runs it with podman (tests/image); last, each fuzz target runs
# for a bounded time (tests/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each layer is a script of scripts/steps/, which the justfile's recipes
# run too (`just unit`, `just integration`, ...).
. scripts/lib.sh

bash scripts/steps/setup.sh

step "helm chart, examples and Dockerfile (offline: Helm library, kubernetes-validate, hadolint)"
python3 -m pytest -q -p no:cacheprovider tests/chart

bash scripts/steps/lint.sh

step "cargo build"
cargo build --locked

step "container image (buildah, from local Debian bases; cached under /var/tmp), run with podman"
start=$(date +%s)
TOKENPOLICY_IMAGE=$(bash tests/image/build.sh)
export TOKENPOLICY_IMAGE
echo "$TOKENPOLICY_IMAGE ($(( $(date +%s) - start )) s)"
python3 -m pytest -q -p no:cacheprovider tests/image

bash scripts/steps/unit.sh

bash scripts/steps/integration.sh

step "network faults (namespaces on a bridge: Redis cut off, slowed, lossy; the history checker)"
# NETFAULT_SECONDS (default 20) per scenario; 60 for the long form.
bash tests/netfault/run.sh

bash scripts/steps/book.sh

step "fuzz: token decoder, durations, users file, policy YAML (${FUZZ_SECONDS:-30} s each)"
bash tests/fuzz.sh

step "justfile: every layer is a recipe (just from crates.io, cached under /var/tmp)"
just=$(cargo_tool just "$JUST_VERSION")
recipes=$("$just" --summary)
for r in setup lint unit integration e2e fuzz bench; do
  [[ " $recipes " == *" $r "* ]] || { echo "justfile: no recipe $r (has: $recipes)" >&2; exit 1; }
done
echo "$recipes"
