#!/usr/bin/env bash
# The network-fault scenarios (tests/netfault): redis-server (alone, under
# Sentinel, or as a Redis Cluster) and two replicas in network namespaces of
# their own, faults by nftables, every request judged by the history
# checker. Each scenario runs NETFAULT_SECONDS (default 20; the long form:
# NETFAULT_SECONDS=60).
# Needs root (namespaces), iproute2, nftables, redis-server and redis-sentinel.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  exec sudo -E bash "$0" "$@"
fi
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/redis-sentinel ] || missing+=(redis-sentinel)
. scripts/lib.sh
apt_install "${missing[@]}"
export TOKENPOLICY_BIN="${TOKENPOLICY_BIN:-$CARGO_TARGET_DIR/debug/tokenpolicy}"
export NETFAULT_SECONDS="${NETFAULT_SECONDS:-20}"
python3 -m pytest -q -p no:cacheprovider tests/netfault "$@"
