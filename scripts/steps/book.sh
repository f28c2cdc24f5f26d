#!/usr/bin/env bash
# The book: mdbook build docs, the tests that read its pages, then every
# relative link of README.md and docs/src.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

step "book: mdbook build docs, then every relative link of README.md and docs/src"
mdbook=$(cargo_tool mdbook "$MDBOOK_VERSION" --no-default-features --features search)
"$mdbook" build docs
python3 -m pytest -q -p no:cacheprovider tests/docs
python3 scripts/check_links.py
