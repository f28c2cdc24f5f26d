# The layers a developer runs alone; `bash tests/run.sh` runs them all, in
# order, through the same scripts (scripts/steps/). `just` itself:
# `cargo install --locked just` (tests/run.sh keeps one under /var/tmp).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Lists the recipes.
default:
    @just --list

# Installs what the tests need: Debian packages, Python tools, playwright-core, Traefik, Keycloak.
setup:
    bash scripts/steps/setup.sh

# cargo fmt --check and cargo clippy -D warnings.
lint:
    bash scripts/steps/lint.sh

# cargo test, and the store contracts against a real redis-server and Redis Cluster.
unit:
    bash scripts/steps/unit.sh

# The black-box integration tests against a debug build.
integration:
    cargo build --locked
    bash scripts/steps/integration.sh

# The end-to-end suite on a local control plane (tests/e2e).
e2e:
    bash tests/e2e/run.sh

# Every fuzz target for FUZZ_SECONDS (default 30) each.
fuzz:
    bash tests/fuzz.sh

# The published benchmark (bench/run.sh).
bench:
    bash bench/run.sh
