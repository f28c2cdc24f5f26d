#!/usr/bin/env bash
# The black-box integration tests against the debug build (`cargo build`
# first): real redis-server, two replicas; nginx, Traefik, Caddy; chromium.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# Both come from caches under /var/tmp that setup fills.
TRAEFIK="${TRAEFIK:-$(bash tests/proxies/build.sh traefik)}"
KEYCLOAK_HOME="${KEYCLOAK_HOME:-$(bash tests/keycloak/install.sh)}"
export TRAEFIK KEYCLOAK_HOME

step "integration tests (real redis-server, two replicas; nginx, Traefik, Caddy; chromium)"
export TOKENPOLICY_BIN="$CARGO_TARGET_DIR/debug/tokenpolicy"
# The store soak (about 60 s, test_store_soak.py); TOKENPOLICY_SOAK=0 skips it.
export TOKENPOLICY_SOAK="${TOKENPOLICY_SOAK:-1}"
python3 -m pytest -q -p no:cacheprovider tests/integration
