#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; the test command runs 10 s) on the stable toolchain
# (cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 allows them). Installs cargo-fuzz if missing.
# Usage: scripts/ci/fuzz.sh [seconds-per-target] [target...]
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
secs="${1:-60}"; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(stun_parse channel_data engine proxy_header)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in "${targets[@]}"; do
    echo "==> fuzzing $t for ${secs}s"
    mkdir -p "corpus/$t"
    # Regression inputs found earlier are kept under fuzz/regressions/<target> and replayed first.
    seeds=()
    [ -d "regressions/$t" ] && seeds+=("regressions/$t")
    cargo fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=0
done
