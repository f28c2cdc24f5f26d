#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time, starting
# from the committed seed corpus (fuzz/corpus/<target>). Inputs the fuzzer
# finds go to a scratch directory, so the checkout is never written to; a
# crash is saved under fuzz/artifacts/<target>/ and fails the run.
#
#   FUZZ_SECONDS=30 bash tests/fuzz.sh          # every target, 30 s each
#   FUZZ_SECONDS=600 bash tests/fuzz.sh token   # one target, longer
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-30}"
target_dir="${FUZZ_TARGET_DIR:-/var/tmp/tokenpolicy-fuzz-target}"
cargo_fuzz_version=0.13.2

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
  echo "installing cargo-fuzz $cargo_fuzz_version (crates.io)"
  cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version"
fi

# No sanitizer: the code under test is safe Rust, and without one the
# targets build on the stable toolchain. Debug assertions and overflow checks
# stay on (--dev).
flags=(--sanitizer none --dev --target-dir "$target_dir")
start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz targets built in $(( $(date +%s) - start )) s"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== fuzz $t for ${seconds} s"
  if ! cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$scratch/$t.log" 2>&1; then
    tail -n 40 "$scratch/$t.log"
    echo "fuzz target $t failed: reproduce with" >&2
    echo "  cargo fuzz run ${flags[*]} $t fuzz/artifacts/$t/<crash file>" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$scratch/$t.log" || true
  echo "corpus: $(ls "fuzz/corpus/$t" | wc -l) seeds, $(ls "$scratch/$t" | wc -l) new inputs"
done
