#!/usr/bin/env bash
# Side-by-side benchmark on loopback: turnpike vs coturn (Debian package, configured equivalently) vs a
# raw recvmmsg/sendmmsg forwarder (the kernel's limit for one core; also run shaped like a relay, with one
# output socket per allocation and epoll_wait on all of them: the least any TURN server pays), under the
# same load, with the server pinned to core 0 and the load generator to core 1. Servers alternate for
# every configuration. turnpike runs as configured by default and also with receive coalescing off
# (turnpike-nc), to show what coalescing buys and costs.
# Prints a markdown table of ratios and writes bench/results/latest.{md,svg,json}.
# Environment: BENCH_SECS (measured seconds per run, default 2), BENCH_ROUNDS (alternating rounds per
# configuration, default 1, set-up configurations at least 5; medians are reported), BENCH_QUICK=1 (fewer
# configurations and rounds).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v turnserver >/dev/null 2>&1; then
    echo "==> installing coturn"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends coturn >/dev/null
    $SUDO systemctl stop coturn >/dev/null 2>&1 || true
fi
echo "==> building turnpike, loadgen, the raw forwarder and the set-up floor"
cargo build --release --locked -p turnpike -p turnpike-bench --quiet
mkdir -p target/bench
gcc -O2 -o target/bench/raw-forwarder scripts/bench/raw-forwarder.c
gcc -O2 -o target/bench/setup-floor scripts/bench/setup-floor.c
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench/bench_compare.py "$@"
