#!/usr/bin/env bash
# What a fleet costs at set-up: Allocates per second without a cluster, with Redis, and three nodes on
# one Redis, and the Redis commands per allocation. See scripts/bench/bench_fleet.py and bench/README.md.
# Usage: scripts/bench/bench-fleet.sh [--rounds N] [--allocations N] [--setup-rounds K]   (about 1 minute per round)
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v redis-server >/dev/null || { echo "bench-fleet: redis-server is needed (apt install redis-server)" >&2; exit 1; }
cargo build --release --locked -p turnpike -p turnpike-bench --quiet
exec python3 scripts/bench/bench_fleet.py "$@"
