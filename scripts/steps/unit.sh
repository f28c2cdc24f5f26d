#!/usr/bin/env bash
# cargo test, then the store contracts against a real redis-server and a
# real Redis Cluster (three masters), each on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# A real redis-server for the Rust store contract test.
port=$(free_port)
start_redis "$port"
redis_pid=$REDIS_PID
trap 'kill $redis_pid 2>/dev/null || true' EXIT
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
trap 'kill $redis_pid "${cluster_pids[@]}" 2>/dev/null || true' EXIT
for i in 1 2 3; do
  p=$(free_port)
  # The bus port is given, not port + 10000 (which a high free port overflows).
  bus=$(free_port)
  mkdir -p "$cluster_dir/$i"
  start_redis "$p" --cluster-enabled yes --cluster-port "$bus" \
    --cluster-config-file "$cluster_dir/$i/nodes.conf" --dir "$cluster_dir/$i"
  cluster_pids+=("$REDIS_PID")
  cluster_nodes+=("127.0.0.1:$p")
done
redis-cli --cluster create "${cluster_nodes[@]}" --cluster-yes >/dev/null
# Every node must see the cluster whole (each learns it in its own time
# over the bus), not only the first one asked.
cluster_ok() {
  local n
  for n in "${cluster_nodes[@]}"; do
    redis-cli -p "${n##*:}" cluster info | grep -q 'cluster_state:ok' || return 1
  done
}
for _ in $(seq 300); do cluster_ok && break; sleep 0.1; done
cluster_ok || { echo "the Redis Cluster did not come up: $(redis-cli -p "${cluster_nodes[0]##*:}" cluster info | head -1)" >&2; exit 1; }
step "registry contract on a Redis Cluster"
TOKENPOLICY_TEST_REDIS_CLUSTER="redis+cluster://$(IFS=,; echo "${cluster_nodes[*]}")" \
  cargo test --locked --lib -- --ignored --exact service::store::activity::cluster_tests::redis_cluster_keeps_the_registry_contract
kill "${cluster_pids[@]}" 2>/dev/null || true
rm -rf "$cluster_dir"
