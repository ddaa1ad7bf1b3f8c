#!/usr/bin/env bash
# Mass expiry: does a burst of allocations expiring in the same second hold up the calls a shard is
# relaying meanwhile? One generator (the "crowd") sets up N allocations and then goes quiet (no
# Refresh), so all of them expire together when their lifetime (60 s, the shortest turnpike grants)
# runs out. A second generator (the "call") relays paced traffic through 10 other allocations in a
# window around that moment, and reports its latency. The control run is the same with a 600 s
# lifetime, so nothing expires in the window. Rounds alternate expiry and control.
#
# Usage: scripts/bench/bench-expiry.sh [ROUNDS] [CROWD]   (defaults 2 and 10000; about 65 s per run)
# Loopback only; the server on core 0, both generators on core 1 (as scripts/bench/bench-compare.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-2}"
crowd="${2:-10000}"
rate=20000
cargo build --release --locked -p turnpike -p turnpike-bench --quiet
dir="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
# The port check and the configuration are bench-compare's (scripts/bench/bench_compare.py).
if ! python3 -c 'import sys; sys.path.insert(0, "scripts/bench"); from bench_compare import busy_ports
sys.exit(1 if busy_ports([3478]) else 0)'; then
    echo "127.0.0.1:3478/udp is in use; stop what holds it first" >&2
    exit 1
fi
config() { # LIFETIME: bench-compare's turnpike configuration with that lifetime and no quotas
    python3 -c 'import sys; sys.path.insert(0, "scripts/bench"); from bench_compare import TURNPIKE_YAML
print(TURNPIKE_YAML + "allocations: {default_lifetime: %s, max_lifetime: %s, user_quota: 0, total_quota: 0}" % (sys.argv[1], sys.argv[1]))' "$1"
}
run() { # MODE LIFETIME
    config "$2" > "$dir/turnpike.yaml"
    taskset -c 0 target/release/turnpike --config "$dir/turnpike.yaml" 2> "$dir/server.log" &
    local server=$!
    pids+=("$server")
    sleep 0.5
    if ! kill -0 "$server" 2>/dev/null; then
        echo "bench-expiry: turnpike exited at start:" >&2
        cat "$dir/server.log" >&2
        exit 1
    fi
    local t0
    t0="$(date +%s.%N)"
    # The crowd: set up, then a trickle of traffic that refreshes nothing, for longer than the lifetime.
    taskset -c 1 target/release/loadgen --secret bench-secret --allocations "$crowd" --rate 100 \
        --duration 75 --warmup 0 > /dev/null 2> "$dir/crowd.log" &
    local crowd_pid=$!
    pids+=("$crowd_pid")
    sleep 3
    # The call: its 4 s window starts 1.5 s before the crowd's allocations (set up within about a
    # second of t0) can expire, and its own allocations are younger than the crowd's.
    local start out
    start="$(python3 -c "print($t0 + 58.5)")"
    out="$(taskset -c 1 target/release/loadgen --secret bench-secret --server-pid "$server" --allocations 10 \
        --rate "$rate" --size 172 --duration 4 --warmup 0 --start-at "$start")"
    kill "$crowd_pid" 2>/dev/null || true
    wait "$crowd_pid" 2>/dev/null || true
    kill "$server"
    wait "$server" || true
    echo "$1 $out" >> "$dir/results"
    echo "$1: $out" >&2
}
for _ in $(seq "$rounds"); do
    run expiry 60
    run control 600
done
python3 - "$dir/results" "$crowd" "$rate" <<'PY'
import json, statistics, sys
rows = [line.split(" ", 1) for line in open(sys.argv[1])]
print(f"\n{sys.argv[2]} allocations expiring together while a call of 10 allocations relays {int(sys.argv[3]) // 1000}k pps (172 B)\n")
print("| run | p50 us | p99 us | p99.9 us | loss | steal ms (server, generator core) |")
print("|---|---|---|---|---|---|")
by = {}
for mode, js in rows:
    r = json.loads(js)
    by.setdefault(mode, []).append(r)
    print(f"| {mode} | {r['p50_us']} | {r['p99_us']} | {r['p999_us']} | {100 * r['loss']:.3f} % | {r['steal_ms'][0]}, {r['steal_ms'][1]} |")
for mode, rs in by.items():
    print(f"\n{mode}: median p99 {statistics.median(r['p99_us'] for r in rs)} us, "
          f"median p99.9 {statistics.median(r['p999_us'] for r in rs)} us over {len(rs)} run(s)", end="")
print()
PY
