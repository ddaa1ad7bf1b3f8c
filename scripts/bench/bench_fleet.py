"""What a fleet costs at set-up: authenticated Allocates per second for one node without a cluster, one
node with Redis, and three nodes with one Redis (a generator per node, run together), and the Redis
commands each allocation costs (Redis's own `total_commands_processed` before and after, divided by the
allocations made and deleted). Configurations alternate round by round; medians are printed.

Usage: python3 scripts/bench/bench_fleet.py [--rounds N] [--allocations N] [--setup-rounds K]
Needs target/release/turnpike and target/release/loadgen (scripts/bench/bench-fleet.sh builds them) and
redis-server. Servers and Redis share core 0, generators core 1 (a 2-core machine runs the three-node
fleet on those same two cores: its rate is the machine's, not a fleet's)."""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compare import stop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TURNPIKE = os.path.join(ROOT, "target/release/turnpike")
LOADGEN = os.path.join(ROOT, "target/release/loadgen")
SECRET = "bench-fleet-secret"
REDIS_PORT = 46379
BASE_PORT = 46400


def free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def redis_cmd(*args):
    """One command to the benchmark's Redis over RESP; the raw reply."""
    with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=5) as s:
        payload = "*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)
        s.sendall(payload.encode())
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def commands_processed():
    info = redis_cmd("INFO", "stats")
    for line in info.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    sys.exit("bench-fleet: no total_commands_processed in Redis INFO")


def start_redis(work):
    if not free(REDIS_PORT):
        sys.exit("bench-fleet: port %d is in use" % REDIS_PORT)
    proc = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", work],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if not free(REDIS_PORT):
            return proc
        time.sleep(0.05)
    sys.exit("bench-fleet: redis-server did not start")


def start_node(work, k, cluster):
    port = BASE_PORT + 100 * k
    path = os.path.join(work, "node%d.yaml" % k)
    with open(path, "w") as f:
        f.write("listen: {ips: [127.0.0.1], port: %d, tcp: false}\n" % port)
        f.write("relay: {ips: [127.0.0.1], min_port: %d, max_port: %d}\n" % (20000 + 5000 * k, 24999 + 5000 * k))
        f.write("auth: {realm: bench, shared_secrets: [%s]}\n" % SECRET)
        f.write("peers: {allowed: [127.0.0.1]}\nabuse: {unauth_rate: 0}\nruntime: {threads: 1}\nlogging: {level: warn}\n")
        f.write("allocations: {user_quota: 0, total_quota: 0}\n")
        if cluster:
            f.write("cluster: {redis: 'redis://127.0.0.1:%d/0', node: bench-%d}\n" % (REDIS_PORT, k))
    log = open(os.path.join(work, "node%d.log" % k), "wb")
    proc = subprocess.Popen(["taskset", "-c", "0", TURNPIKE, "run", "--config", path], stdout=subprocess.DEVNULL, stderr=log)
    time.sleep(1.0)
    if proc.poll() is not None:
        sys.exit("bench-fleet: node %d exited: %s" % (k, open(log.name, errors="replace").read()[-500:]))
    return proc, port


def run(work, nodes, cluster, allocations, setup_rounds):
    """Allocates per second of each node's generator (run together), and Redis commands per allocation."""
    servers = [start_node(work, k, cluster) for k in range(nodes)]
    try:
        before = commands_processed() if cluster else 0
        gens = [subprocess.Popen(["taskset", "-c", "1", LOADGEN, "--secret", SECRET, "--server", "127.0.0.1:%d" % port,
                                  "--server-pid", str(proc.pid), "--setup-only", "--allocations", str(allocations),
                                  "--setup-rounds", str(setup_rounds)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for proc, port in servers]
        results = []
        for g in gens:
            out, err = g.communicate(timeout=600)
            if g.returncode != 0 or not out.strip():
                sys.exit("bench-fleet: the load generator failed: %s" % err[-500:])
            results.append(json.loads(out.strip().splitlines()[-1]))
        for proc, _ in servers:
            if proc.poll() is not None:
                sys.exit("bench-fleet: a node died during the run")
        # The last deletions reach Redis within the fleet thread's next turns.
        time.sleep(0.5)
        after = commands_processed() if cluster else 0
    finally:
        for proc, _ in servers:
            stop(proc)
    made = nodes * allocations * setup_rounds
    return {
        "allocs_per_s": sum(r["setup_per_sec"] for r in results),
        "cpu_us_per_alloc": statistics.mean(r["cpu_us_per_alloc"] for r in results),
        "redis_commands_per_alloc": (after - before) / made if cluster else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--allocations", type=int, default=1000)
    ap.add_argument("--setup-rounds", type=int, default=5)
    args = ap.parse_args()
    configs = [("one node, no cluster", 1, False), ("one node, Redis", 1, True), ("three nodes, one Redis", 3, True)]
    work = tempfile.mkdtemp(prefix="turnpike-bench-fleet-")
    redis = start_redis(work)
    results = {c[0]: [] for c in configs}
    try:
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for name, nodes, cluster in order:
                r = run(work, nodes, cluster, args.allocations, args.setup_rounds)
                print("  round %d %-24s %s" % (rnd + 1, name, json.dumps(r)), file=sys.stderr)
                results[name].append(r)
    finally:
        stop(redis)
    base = statistics.median(r["allocs_per_s"] for r in results[configs[0][0]])
    print("| configuration | allocations/s (all nodes) | x one node without a cluster | server CPU us/Allocate | Redis commands per allocation |")
    print("|---|---|---|---|---|")
    for name, _, cluster in configs:
        rate = statistics.median(r["allocs_per_s"] for r in results[name])
        cpu = statistics.median(r["cpu_us_per_alloc"] for r in results[name])
        cmds = statistics.median(r["redis_commands_per_alloc"] for r in results[name]) if cluster else None
        print("| %s | %.0f | %.2f | %.1f | %s |" % (name, rate, rate / base, cpu, "n/a" if cmds is None else "%.2f" % cmds))
    print("\n%d rounds of %d allocations x %d timed set-ups per node, configurations alternating; medians."
          % (args.rounds, args.allocations, args.setup_rounds))


if __name__ == "__main__":
    main()
