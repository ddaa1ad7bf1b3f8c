#!/usr/bin/env bash
# TURN over TCP and TLS side by side (turnpike, coturn when installed, optionally an earlier turnpike build):
# CPU per relayed packet, loss and p99 for clients on TCP. See scripts/bench/bench_tcp.py and bench/README.md.
# Usage: scripts/bench/bench-tcp.sh [--rounds N] [--baseline PATH] [--no-coturn]   [--transports tcp,tls]   (about 2 minutes per round)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked -p turnpike -p turnpike-bench --quiet
mkdir -p target/bench
exec python3 scripts/bench/bench_tcp.py "$@"
