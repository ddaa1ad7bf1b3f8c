"""Multi-core scaling of turnpike's shards, for scripts/bench/bench-scaling.sh. See bench/README.md.

For each shard count N, turnpike runs with N shards pinned to N server cores, and N load generators (one
per generator core, each with its own allocations) offer the same per-shard rate at once, in one shared
measurement window (`loadgen --start-at`). The reference is the floor forwarder of bench-compare (a raw
recvmmsg/sendmmsg forwarder shaped like a relay: one output socket per allocation, epoll_wait on all)
run as N processes on the same N cores, each fed by one generator: what the kernel itself gives N cores.
Where coturn is installed it runs too, with `--relay-threads=N` on the same N cores.
Linear scaling means the CPU per relayed packet stays what it is with one shard while the relayed rate
grows N-fold, without loss.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from bench_compare import SECRET, busy_ports, coturn_command, fmt, median, ratio, stop

TURN_PORT = 3478
METRICS_PORT = 9641
COTURN_PORT = 3479
PROCS_PORT = 3500  # "turnpike-procs": process k listens on PROCS_PORT + k
# Forwarder k listens on FLOOR_PORT + 2k and sends to FLOOR_PORT + 2k + 1: below the kernel's ephemeral
# range (32768-60999 by default), where the generators' and forwarders' own sockets could take them, and
# below turnpike's relay range here (10000-31999).
FLOOR_PORT = 5000


def cpu_list(text):
    """'0-3,8' -> [0, 1, 2, 3, 8]."""
    cores = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def one_cpu_per_core(cpus):
    """The first CPU of each physical core among `cpus`: with SMT, a shard and a generator on two threads
    of one core would share its execution units, and the figures would measure that sharing."""
    seen, out = set(), []
    for cpu in cpus:
        base = "/sys/devices/system/cpu/cpu%d/topology/" % cpu
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                core = (f.read().strip(), g.read().strip())
        except OSError:
            core = cpu
        if core not in seen:
            seen.add(core)
            out.append(cpu)
    return out


def require_free(ports):
    busy = busy_ports(ports)
    if busy:
        sys.exit("bench-scaling: UDP port %s on 127.0.0.1 already in use; stop what holds it and run again"
                 % ", ".join(busy))


def turnpike_process(opts, name, port, metrics_port, relay_ports, cores):
    """Starts one turnpike listening on `port` with one shard per core of `cores`, and waits until it
    answers on its metrics port."""
    path = os.path.join(opts.work, "scaling-%s.yaml" % name)
    with open(path, "w") as f:
        f.write("listen: {ips: [127.0.0.1], port: %d, tcp: false}\n" % port)
        f.write("relay: {ips: [127.0.0.1], min_port: %d, max_port: %d}\n" % relay_ports)
        f.write("auth: {realm: bench, shared_secrets: [%s]}\n" % SECRET)
        f.write("peers: {allowed: [127.0.0.1]}\n")
        f.write("abuse: {unauth_rate: 0}\n")
        f.write("runtime: {threads: %d, pin_cores: true, core_ids: [%s]}\n" % (len(cores), ", ".join(map(str, cores))))
        f.write("metrics: {listen: '127.0.0.1:%d'}\n" % metrics_port)
        f.write("logging: {level: warn}\n")
    proc = subprocess.Popen([opts.turnpike, "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("bench-scaling: turnpike exited: %s" % proc.stderr.read().decode(errors="replace")[-500:])
        try:
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return proc


def start_turnpike(opts, shards):
    proc = turnpike_process(opts, "turnpike", TURN_PORT, METRICS_PORT, (10000, 31999), opts.server_cores[:shards])
    time.sleep(0.2)
    return [proc]


def start_turnpike_processes(opts, shards):
    """N turnpikes of one shard each, on their own ports and cores, each fed by one generator like the
    floor's forwarders: no listening socket is fed by more than one generator core."""
    width = 22000 // shards
    procs = [turnpike_process(opts, "turnpike-%d" % k, PROCS_PORT + k, METRICS_PORT + 1 + k,
                              (10000 + k * width, 10000 + (k + 1) * width - 1), [opts.server_cores[k]])
             for k in range(shards)]
    time.sleep(0.2)
    return procs


def start_coturn(opts, shards):
    cores = ",".join(map(str, opts.server_cores[:shards]))
    # --db: a machine where coturn was not installed by its package has no default database folder.
    cmd = (["taskset", "-c", cores]
           + coturn_command(opts.coturn, COTURN_PORT, (10000, 31999), shards, os.path.join(opts.work, "scaling-coturn.pid"))
           + ["--db=" + os.path.join(opts.work, "scaling-coturn.sqlite")])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    if proc.poll() is not None:
        sys.exit("bench-scaling: coturn exited at start (exit %d): %s" % (proc.returncode, " ".join(cmd)))
    return [proc]


def start_floor(opts, shards):
    procs = []
    for k in range(shards):
        cmd = ["taskset", "-c", str(opts.server_cores[k]), opts.raw, str(FLOOR_PORT + 2 * k), "127.0.0.1",
               str(FLOOR_PORT + 2 * k + 1), str(opts.allocations), "wait"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.3)
    return procs


def allocations_per_shard():
    """Allocations each shard created (turnpike's metrics): how evenly SO_REUSEPORT spread the clients."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % METRICS_PORT, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return []
    found = re.findall(r'^turnpike_allocations_created_total\{shard="(\d+)"\} (\d+)', text, re.M)
    return [int(v) for _, v in sorted(found, key=lambda kv: int(kv[0]))]


def udp_drops():
    """Datagrams the kernel dropped for want of receive-buffer room: on all UDP sockets (RcvbufErrors of
    /proc/net/snmp) and on the sockets bound to each local port (the drops column of /proc/net/udp)."""
    total, by_port = 0, {}
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        total = int(rows[1][rows[0].index("RcvbufErrors")])
        with open("/proc/net/udp") as f:
            for line in list(f)[1:]:
                fields = line.split()
                port = int(fields[1].split(":")[1], 16)
                by_port[port] = by_port.get(port, 0) + int(fields[-1])
    except (OSError, ValueError, IndexError):
        pass
    return total, by_port


def run(opts, server, shards, rate, generators=None):
    """One measurement: N servers' worth of load at `rate` per shard, from one generator per shard or, with
    `generators` (turnpike only), from that many generators sharing the load and the allocations.
    Returns the combined figures."""
    starters = {"turnpike": start_turnpike, "coturn": start_coturn, "floor": start_floor,
                "turnpike-procs": start_turnpike_processes}
    procs = starters[server](opts, shards)
    count = generators or shards
    per_gen_rate = rate * shards // count
    per_gen_allocs = max(1, round(opts.allocations * shards / count))
    drops_before, _ = udp_drops()
    try:
        start_at = time.time() + 1.0 + 0.0005 * opts.allocations * shards
        gens = []
        for k in range(count):
            cmd = ["taskset", "-c", str(opts.generator_cores[k]), opts.loadgen, "--secret", SECRET,
                   "--allocations", str(per_gen_allocs), "--rate", str(per_gen_rate), "--size", str(opts.size),
                   "--duration", str(opts.secs), "--warmup", "0.5", "--start-at", "%.3f" % start_at]
            if server in ("turnpike", "coturn"):
                port = TURN_PORT if server == "turnpike" else COTURN_PORT
                cmd += ["--server", "127.0.0.1:%d" % port, "--server-pid", str(procs[0].pid)]
            elif server == "turnpike-procs":
                cmd += ["--server", "127.0.0.1:%d" % (PROCS_PORT + k), "--server-pid", str(procs[k].pid)]
            else:
                cmd += ["--raw", "127.0.0.1:%d" % (FLOOR_PORT + 2 * k), "--peer-port", str(FLOOR_PORT + 2 * k + 1),
                        "--server-pid", str(procs[k].pid)]
            gens.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results, errors = [], []
        for g in gens:
            try:
                out, err = g.communicate(timeout=60 + opts.secs)
            except subprocess.TimeoutExpired:
                g.kill()
                out, err = g.communicate()
            line = out.strip().splitlines()[-1] if out.strip() else ""
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                errors.append(err.strip()[-300:] or "no output (exit %d)" % g.returncode)
        spread = allocations_per_shard() if server == "turnpike" else []
        drops_after, by_port = udp_drops()
        server_ports = {"turnpike": [TURN_PORT], "coturn": [COTURN_PORT],
                        "turnpike-procs": [PROCS_PORT + k for k in range(shards)]}.get(
            server, [FLOOR_PORT + 2 * k for k in range(shards)])
        server_drops = sum(by_port.get(p, 0) for p in server_ports)
    finally:
        for p in procs:
            stop(p)
    if errors:
        return {"server": server, "shards": shards, "rate_per_shard": rate, "error": errors[0]}
    offered = sum(r["offered_pps"] for r in results)
    delivered = sum(r["delivered_pps"] for r in results)
    # turnpike, coturn: every generator read the one process's CPU over the same window (take the
    # median); floor, turnpike-procs: each generator read its own process's.
    cpus = [r["server_cpu_s"] for r in results]
    cpu = sum(cpus) if server in ("floor", "turnpike-procs") else median(cpus)
    return {
        "server": server, "shards": shards, "rate_per_shard": rate, "generators": count,
        "offered_pps": offered, "delivered_pps": delivered,
        "loss": max(0.0, 1 - delivered / offered) if offered else 0.0,
        "worst_generator_loss": max(r["loss"] for r in results),
        "cpu_us_per_packet": cpu * 1e6 / max(1.0, delivered * opts.secs),
        "server_cores_busy": cpu / opts.secs,
        "p99_us": median([r["p99_us"] for r in results]),
        "generator_saturated": any(r["generator_saturated"] for r in results),
        "late_start_ms": max(r.get("late_start_ms", 0.0) for r in results),
        "allocations_per_shard": spread,
        # Where the lost datagrams went: dropped on the server's listening sockets (it did not read them in
        # time), or elsewhere (mostly the generators' peer sockets: the generator did not read in time).
        "drops_at_server": server_drops,
        "drops_elsewhere": max(0, drops_after - drops_before - server_drops),
    }


def show(r):
    if "error" in r:
        return "%-8s %d shards %6d pps/shard: ERROR %s" % (r["server"], r["shards"], r["rate_per_shard"], r["error"])
    spread = r["allocations_per_shard"]
    return ("%-8s %d shards %6d pps/shard: offered %8.0f delivered %8.0f loss %.3f %% (worst generator %.3f %%), "
            "%.2f us/packet, %.2f cores busy, p99 %d us, kernel drops %d at the server %d elsewhere%s%s%s" % (
                r["server"], r["shards"], r["rate_per_shard"], r["offered_pps"], r["delivered_pps"], r["loss"] * 100,
                r["worst_generator_loss"] * 100, r["cpu_us_per_packet"], r["server_cores_busy"], r["p99_us"],
                r["drops_at_server"], r["drops_elsewhere"],
                ", allocations per shard %s" % spread if spread else "",
                ", GENERATOR SATURATED" if r["generator_saturated"] else "",
                ", started %.0f ms late" % r["late_start_ms"] if r["late_start_ms"] > 20 else ""))


def main():
    cores = sorted(os.sched_getaffinity(0))
    physical = one_cpu_per_core(cores)
    half = len(physical) // 2
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bin", default=None, help="folder holding turnpike, loadgen and raw-forwarder")
    ap.add_argument("--coturn", default=shutil.which("turnserver"),
                    help="coturn's turnserver (default: the one on PATH; without it coturn is not run)")
    ap.add_argument("--server-cores", default=",".join(map(str, physical[:half])),
                    help="CPUs for the shards (default: the first half of the physical cores, one CPU each)")
    ap.add_argument("--generator-cores", default=",".join(map(str, physical[half:2 * half])),
                    help="CPUs for the generators (default: the other half)")
    ap.add_argument("--shards", default=None, help="shard counts, e.g. 1,2,4,8 (default: powers of two)")
    ap.add_argument("--rates", default="100000,200000", help="paced rates per shard for the CPU table")
    ap.add_argument("--sweep", default="300000,400000,500000,600000",
                    help="higher rates per shard for turnpike, offered by all generator cores at once")
    ap.add_argument("--allocations", type=int, default=100, help="allocations per generator")
    ap.add_argument("--size", type=int, default=172)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", action="store_true",
                    help="also run N one-shard turnpikes on their own ports, each fed by one generator")
    ap.add_argument("--out", default=None, help="folder for scaling.json and scaling.md")
    opts = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    opts.turnpike = os.path.join(opts.bin or os.path.join(root, "target/release"), "turnpike")
    opts.loadgen = os.path.join(opts.bin or os.path.join(root, "target/release"), "loadgen")
    opts.raw = os.path.join(opts.bin or os.path.join(root, "target/bench"), "raw-forwarder")
    opts.work = os.path.join(root, "target/bench")
    os.makedirs(opts.work, exist_ok=True)
    opts.server_cores = cpu_list(opts.server_cores)
    opts.generator_cores = cpu_list(opts.generator_cores)
    most = min(len(opts.server_cores), len(opts.generator_cores))
    if opts.shards:
        counts = [int(x) for x in opts.shards.split(",")]
    else:
        counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= most]
    if not counts or max(counts) > most:
        sys.exit("bench-scaling: %s shards need as many server cores and generator cores; this machine offers "
                 "%d and %d" % (max(counts or [0]), len(opts.server_cores), len(opts.generator_cores)))
    servers = ["turnpike", "floor"] + (["coturn"] if opts.coturn else []) + (["turnpike-procs"] if opts.processes else [])
    require_free([TURN_PORT, COTURN_PORT, METRICS_PORT] + [PROCS_PORT + i for i in range(max(counts))]
                 + [FLOOR_PORT + i for i in range(2 * max(counts))])
    rates = [int(x) for x in opts.rates.split(",") if x]
    sweep = [int(x) for x in opts.sweep.split(",") if x]
    print("bench-scaling: %d CPUs on %d physical cores; server cores %s, generator cores %s; shard counts %s; %d allocations and one "
          "generator per shard; %d B; %.1f s measured per run; %d rounds" % (
              len(cores), len(physical), opts.server_cores, opts.generator_cores, counts, opts.allocations, opts.size, opts.secs,
              opts.rounds), file=sys.stderr)
    runs = []
    for i in range(opts.rounds):
        for j, (n, rate) in enumerate((n, r) for n in counts for r in rates):
            first = (i + j) % len(servers)
            for server in servers[first:] + servers[:first]:
                r = run(opts, server, n, rate)
                r["round"] = i
                runs.append(r)
                print("  " + show(r), file=sys.stderr)
    for n in counts:
        for rate in sweep:
            r = run(opts, "turnpike", n, rate, generators=len(opts.generator_cores))
            r["round"] = "sweep"
            runs.append(r)
            print("  " + show(r), file=sys.stderr)
    report = render(opts, counts, rates, sweep, runs, servers)
    print(report)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "scaling.md"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(opts.out, "scaling.json"), "w") as f:
            json.dump({"cpus": len(cores), "server_cores": opts.server_cores, "generator_cores": opts.generator_cores,
                       "allocations_per_generator": opts.allocations, "size": opts.size, "secs": opts.secs,
                       "runs": runs}, f, indent=1)
    failed = [r for r in runs if "error" in r]
    if failed:
        sys.exit("bench-scaling: %d of %d runs failed (first: %s)" % (len(failed), len(runs), failed[0]["error"]))


def pick(runs, server, n, rate, rounds):
    return [r for r in runs if r["server"] == server and r["shards"] == n and r["rate_per_shard"] == rate
            and r["round"] in rounds and "error" not in r]


def render(opts, counts, rates, sweep, runs, servers=("turnpike", "floor")):
    timed = list(range(opts.rounds))
    lines = ["### Scaling with shards: CPU per relayed packet at a fixed rate per shard",
             "", "Medians of %d rounds; loss is the worst round's. Efficiency: CPU per packet with one shard over "
             "CPU per packet with N (1.00 = linear)." % opts.rounds, "",
             "| shards | rate/shard | relayed pps | turnpike us/pkt | efficiency | loss | floor us/pkt | floor efficiency "
             "| turnpike / floor | allocations per shard (min-max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        base = {s: median([r["cpu_us_per_packet"] for r in pick(runs, s, counts[0], rate, timed)])
                for s in ("turnpike", "floor")}
        for n in counts:
            tp, fl = pick(runs, "turnpike", n, rate, timed), pick(runs, "floor", n, rate, timed)
            tcpu = median([r["cpu_us_per_packet"] for r in tp])
            fcpu = median([r["cpu_us_per_packet"] for r in fl])
            spread = [min(r["allocations_per_shard"]) for r in tp if r["allocations_per_shard"]]
            spread_hi = [max(r["allocations_per_shard"]) for r in tp if r["allocations_per_shard"]]
            lines.append("| %d | %dk | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                n, rate // 1000, fmt(median([r["delivered_pps"] for r in tp]), 0), fmt(tcpu), fmt(ratio(base["turnpike"], tcpu)),
                "%.3f %%" % (100 * max(r["loss"] for r in tp)) if tp else "n/a", fmt(fcpu), fmt(ratio(base["floor"], fcpu)),
                fmt(ratio(tcpu, fcpu)), "%d-%d" % (min(spread), max(spread_hi)) if spread else "n/a"))
    titles = {"coturn": "coturn with --relay-threads=N on the same N cores",
              "turnpike-procs": "N turnpikes of one shard each, on their own ports and cores, one generator each"}
    for other in [s for s in servers if s in titles]:
        lines += ["", "### " + titles[other], "",
                  "| N | rate each | relayed pps | %s us/pkt | efficiency | loss | turnpike / %s |" % (other, other),
                  "|---|---|---|---|---|---|---|"]
        for rate in rates:
            base = median([r["cpu_us_per_packet"] for r in pick(runs, other, counts[0], rate, timed)])
            for n in counts:
                ot, tp = pick(runs, other, n, rate, timed), pick(runs, "turnpike", n, rate, timed)
                ocpu = median([r["cpu_us_per_packet"] for r in ot])
                tcpu = median([r["cpu_us_per_packet"] for r in tp])
                lines.append("| %d | %dk | %s | %s | %s | %s | %s |" % (
                    n, rate // 1000, fmt(median([r["delivered_pps"] for r in ot]), 0), fmt(ocpu), fmt(ratio(base, ocpu)),
                    "%.3f %%" % (100 * max(r["loss"] for r in ot)) if ot else "n/a", fmt(ratio(tcpu, ocpu))))
    lines += ["", "### Highest rate per shard without loss (< 0.1 %% in every round) among %s" % (
        ", ".join("%dk" % (r // 1000) for r in rates)), "",
              "| shards |" + "".join(" %s: rate/shard | relayed pps |" % s for s in servers),
              "|---|" + "---|---|" * len(servers)]
    for n in counts:
        cells = []
        for server in servers:
            best = None
            for rate in rates:
                got = pick(runs, server, n, rate, timed)
                if not got or max(r["loss"] for r in got) >= 0.001:
                    break
                best = (rate, median([r["delivered_pps"] for r in got]))
            cells += ["%dk" % (best[0] // 1000), fmt(best[1], 0)] if best else ["none", "n/a"]
        lines.append("| %d | %s |" % (n, " | ".join(cells)))
    if not sweep:
        return "\n".join(lines)
    lines += ["", "### turnpike at higher rates per shard, offered by %d generators at once (one run each)"
              % len(opts.generator_cores), "",
              "| shards | rate/shard | offered pps | relayed pps | loss | dropped at turnpike's sockets "
              "| dropped elsewhere | us/pkt | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in counts:
        for rate in sweep:
            for r in pick(runs, "turnpike", n, rate, ["sweep"]):
                lines.append("| %d | %dk | %s | %s | %.3f %% | %d | %d | %s | %s |" % (
                    n, rate // 1000, fmt(r["offered_pps"], 0), fmt(r["delivered_pps"], 0), 100 * r["loss"],
                    r["drops_at_server"], r["drops_elsewhere"], fmt(r["cpu_us_per_packet"]),
                    "generator saturated" if r["generator_saturated"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
