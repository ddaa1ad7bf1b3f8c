#!/usr/bin/env bash
# Multi-core scaling of turnpike's shards on loopback: N shards pinned to N cores, N load generators on
# N other cores offering the same rate per shard in one shared window, for N = 1, 2, 4, ... up to half
# the machine's CPUs; the relay-shaped raw forwarder (bench-compare's "floor"), run as N processes on the
# same cores, is the reference. Needs at least 2 CPUs (one shard); a many-core machine to say anything.
# Prints markdown tables; with --out DIR also writes DIR/scaling.{md,json}. Options: see
# `python3 scripts/bench/bench_scaling.py --help` (--bin DIR uses binaries built elsewhere and builds nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ " $* " != *" --bin "* ]]; then
    echo "==> building turnpike, loadgen and the raw forwarder" >&2
    cargo build --release --locked -p turnpike -p turnpike-bench --quiet
    mkdir -p target/bench
    gcc -O2 -o target/bench/raw-forwarder scripts/bench/raw-forwarder.c
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench/bench_scaling.py "$@"
