#!/usr/bin/env bash
# Scale benchmark: N TokenPolicies (default 1000) on a real API server with
# kwok; prints time to Ready, API requests per TokenPolicy, operator peak RSS
# and the raw ConfigMap write rate of the same API server. Not part of the
# suite; reuses a running cluster when KUBECONFIG/K8S_BIN are exported from
# `cluster.sh up`, else starts (and stops) its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}"
export TOKENPOLICY_BIN="${TOKENPOLICY_BIN:-$CARGO_TARGET_DIR/debug/tokenpolicy}"
n="${1:-1000}"
python3 -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
cargo build --locked --quiet
own=0
if [ -z "${KUBECONFIG:-}" ] || [ -z "${K8S_BIN:-}" ]; then
  eval "$(bash tests/e2e/cluster.sh up | grep -E '^(KUBECONFIG|K8S_BIN)=' | sed 's/^/export /')"
  own=1
fi
work=$(mktemp -d)
trap '[ $own = 1 ] && bash tests/e2e/cluster.sh down; rm -rf "$work"' EXIT
python3 tests/e2e/scale.py "$n" "$KUBECONFIG" "$K8S_BIN" "$work"
