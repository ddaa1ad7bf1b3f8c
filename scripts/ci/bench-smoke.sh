#!/usr/bin/env bash
# CI smoke test of the load generator against turnpike: client <-> peer over channels, over Send
# indications, and client -> relay -> relay -> client calls, at a low paced rate, with the clients on
# UDP (IPv4 and, relaying to IPv4 peers, IPv6), on TCP (--tcp) and on TLS (--tls), and with IPv6
# relayed addresses (--relay-family ipv6: through the IPv6 raw socket when turnpike can open one).
# Checks correctness (every packet delivered, no error), never timing.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --locked --quiet -p turnpike -p turnpike-bench
dir="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/key.pem" \
    -out "$dir/cert.pem" -days 2 -subj /CN=localhost 2> /dev/null
cat > "$dir/turnpike.yaml" <<YAML
listen: {ips: [127.0.0.1, "::1"], port: 0, tls_port: 0}
tls: {cert: $dir/cert.pem, pkey: $dir/key.pem}
relay: {ips: [127.0.0.1, "::1"], min_port: 42000, max_port: 42999}
auth: {realm: smoke, shared_secrets: [smoke-secret]}
peers: {allowed: [127.0.0.1, "::1"]}
abuse: {unauth_rate: 0}
runtime: {threads: 2}
metrics: {listen: "127.0.0.1:0"}
YAML
RUST_LOG=info target/debug/turnpike --config "$dir/turnpike.yaml" 2> "$dir/log" &
pid=$!
addr=""
for _ in $(seq 100); do
    addr="$(grep -o 'listening on [0-9.:]*/udp' "$dir/log" | head -1 | sed 's/listening on //; s|/udp||')" || true
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || { echo "turnpike did not start"; cat "$dir/log"; exit 1; }
v6_addr="$(grep -o 'listening on \[::1\]:[0-9]*/udp' "$dir/log" | head -1 | sed 's/listening on //; s|/udp||')"
tcp_addr="$(grep -o 'listening on [0-9.:]*/tcp' "$dir/log" | head -1 | sed 's/listening on //; s|/tcp||')"
tls_addr="$(grep -o 'listening on [0-9.:]*/tls' "$dir/log" | head -1 | sed 's/listening on //; s|/tls||')"
metrics="$(grep -o 'metrics on http://[0-9.:]*/metrics' "$dir/log" | head -1 | sed 's/metrics on //')"
status=0
for mode in "" "--send-indications" "--calls" "--tcp" "--tcp --calls" "--tls --calls" "ipv6" "ipv6 --calls" \
    "relay6" "relay6 --calls"; do
    snmp_before="$(grep '^Udp:' /proc/net/snmp | tail -1)"
    server="$addr"
    extra="$mode"
    # ipv6: the clients on ::1 (their address towards the server), the peers on 127.0.0.1 (towards the
    # IPv4 relayed addresses). relay6: the clients on 127.0.0.1, the relayed addresses and the peers
    # on ::1.
    case "$mode" in
        --tcp*) server="$tcp_addr" ;;
        --tls*) server="$tls_addr" ;;
        ipv6*) server="$v6_addr" extra="${mode#ipv6}" ;;
        relay6*) extra="--relay-family ipv6${mode#relay6}" ;;
    esac
    out="$(target/debug/loadgen --server "$server" --secret smoke-secret --allocations 20 --rate 2000 \
        --duration 1 --warmup 0.3 --size 172 --server-pid "$pid" $extra)"
    echo "loadgen ${mode:-(channels)}: $out"
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
ok = r["loss"] == 0 and r["delivered_pps"] > 0 and r["offered_pps"] > 0
# Every datagram must carry the kernel receive stamp the added latency is measured from (a stream
# has none: TCP clients in calls mode read their arrivals unstamped, every one of them).
if sys.argv[2] in ("--tcp --calls", "--tls --calls"):
    stamped = r["unstamped"] > 0 and 0 < r["p99_us"]
else:
    stamped = r["unstamped"] == 0 and 0 < r["p99_us"] <= r["p99_observed_us"]
print("  ok" if ok and stamped else "  FAILED: " + ("packets lost or nothing delivered" if not ok
      else "latency not measured from kernel receive stamps"))
ok = ok and stamped
sys.exit(0 if ok else 1)' "$out" "$mode" || {
        status=1
        # Where did the packets go? The server's own counters of relayed and dropped datagrams.
        python3 -c 'import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().splitlines():
    if line.startswith(("turnpike_dropped", "turnpike_relayed_packets", "turnpike_rate_limited")):
        print("   ", line)' "$metrics" || true
        # And the kernel's UDP counters (a full receive buffer drops before anyone reads).
        echo "    $(grep '^Udp:' /proc/net/snmp | head -1)"
        echo "    before: $snmp_before"
        echo "    after:  $(grep '^Udp:' /proc/net/snmp | tail -1)"
    }
done
# The scaling script (scripts/bench/bench-scaling.sh) with one shard, briefly: turnpike and the floor forwarder,
# the generators started together with --start-at. Correctness only: every run completes without loss.
gcc -O2 -o "$dir/raw-forwarder" scripts/bench/raw-forwarder.c
ln -s "$PWD/target/debug/turnpike" "$PWD/target/debug/loadgen" "$dir/"
if python3 scripts/bench/bench_scaling.py --bin "$dir" --shards 1 --server-cores 0 --generator-cores 0 --coturn "" --rates 2000 \
    --sweep "" --rounds 1 --secs 0.5 --allocations 10 --out "$dir/scaling" > /dev/null; then
    python3 -c '
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
bad = [r for r in runs if r["loss"] != 0 or r["delivered_pps"] <= 0]
print("scaling script: %d runs, %s" % (len(runs), "ok" if not bad and len(runs) == 2 else "FAILED: %s" % bad))
sys.exit(1 if bad or len(runs) != 2 else 0)' "$dir/scaling/scaling.json" || status=1
else
    echo "scaling script: FAILED"
    status=1
fi
# The set-up floor of bench-compare (scripts/bench/setup-floor.c) must still answer the generator's set-up:
# the 401, the Allocates (one relay socket each), the channels and the deletions, in two timed rounds.
gcc -O2 -o "$dir/setup-floor" scripts/bench/setup-floor.c
"$dir/setup-floor" 0 42000 42999 > "$dir/floor.log" 2>&1 &
floor_pid=$!
floor_addr=""
for _ in $(seq 50); do
    floor_addr="$(sed -n 's/^listening on //p' "$dir/floor.log")"
    [ -n "$floor_addr" ] && break
    sleep 0.1
done
if out="$(target/debug/loadgen --server "$floor_addr" --secret x --allocations 50 --setup-only \
    --setup-rounds 2 --server-pid "$floor_pid")"; then
    echo "set-up floor: $out"
    # Only the listening socket is left: every relay socket was closed with its deletion.
    sockets="$(find "/proc/$floor_pid/fd" -lname 'socket:*' | wc -l)"
    if [ "$sockets" -ne 1 ]; then echo "  FAILED: $sockets sockets open after the deletions"; status=1; else echo "  ok"; fi
else
    echo "set-up floor: FAILED"
    status=1
fi
kill "$floor_pid" 2>/dev/null || true
exit $status
