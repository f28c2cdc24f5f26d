#!/usr/bin/env bash
# Installs what the tests need: Debian packages, the Python test tools,
# playwright-core, a Traefik built from the Go module proxy, Keycloak from
# Maven Central (the last two cached under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

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
  apt_install "${missing[@]}"
fi

step "python test tools"
python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "playwright-core (drives Debian's chromium; never downloads a browser)"
npm ci --prefix tests/browser --no-audit --no-fund --ignore-scripts --loglevel=error

step "traefik (go build from the Go module proxy; cached under /var/tmp)"
start=$(date +%s)
echo "$(bash tests/proxies/build.sh traefik) ($(( $(date +%s) - start )) s)"

step "keycloak (Maven Central zip, checked against its .sha1; cached under /var/tmp)"
start=$(date +%s)
echo "$(bash tests/keycloak/install.sh) ($(( $(date +%s) - start )) s)"
