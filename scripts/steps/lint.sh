#!/usr/bin/env bash
# cargo fmt --check and cargo clippy -D warnings.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

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
