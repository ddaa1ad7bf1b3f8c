"""Runs the comparison for scripts/bench/bench-compare.sh. See bench/README.md for the method."""

import json
import os
import platform
import socket
import subprocess
import sys
import time

SECS = float(os.environ.get("BENCH_SECS", "2"))
QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "1")))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target/release/loadgen")
TURNPIKE = os.path.join(ROOT, "target/release/turnpike")
RAW = os.path.join(ROOT, "target/bench/raw-forwarder")
SETUP_FLOOR = os.path.join(ROOT, "target/bench/setup-floor")
OUT = os.path.join(ROOT, "bench/results")
SECRET = "bench-secret"
# Fixed ports lie below the kernel's ephemeral range (32768-60999 by default): the floor's output
# sockets and the generator's clients bind ephemeral ports and must not take one of these.
PORTS = {"turnpike": 3478, "turnpike-nc": 3478, "turnpike-sock": 3478, "coturn": 3479, "raw": 3490, "floor": 3490,
         "floor-raw": 3490, "setup-floor": 3492}
PEER_PORT = 3491
# The gateway study (--gateway): the generator in a network namespace of its own, joined to this one by a
# veth pair, its address (clients and peers alike) behind a gateway, as a relay's peers on the internet
# are; on loopback every peer is on-link. Addresses from the benchmarking range 198.18.0.0/15 (RFC 2544).
GATEWAY_NETNS = "turnpike-bench-gw"
GATEWAY_SERVER = "198.18.0.1"  # this end of the veth pair: the servers listen and relay here
GATEWAY_HOP = "198.18.0.2"  # the far end: the gateway to GATEWAY_NET
GATEWAY_NET = "198.19.0.0/24"
GATEWAY_GENERATOR = "198.19.0.2"  # the generator's address, behind GATEWAY_HOP

TURNPIKE_YAML = """listen: {ips: [127.0.0.1], port: 3478, tcp: false}
relay: {ips: [127.0.0.1], min_port: 20000, max_port: 39999}
auth: {realm: bench, shared_secrets: [bench-secret]}
peers: {allowed: [127.0.0.1]}
abuse: {unauth_rate: 0}
runtime: {threads: 1}
logging: {level: warn}
"""


def busy_ports(ports):
    """The UDP ports among `ports` that some socket already holds on 127.0.0.1."""
    busy = []
    for port in ports:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            busy.append(str(port))
        finally:
            probe.close()
    return busy


def require_free_ports():
    """Stops the run unless every port the servers and the generator bind on 127.0.0.1 is free: a server
    already there (a turnpike on 3478 would share it through SO_REUSEPORT) would take part of the
    traffic and falsify every figure."""
    busy = busy_ports(sorted(set(PORTS.values()) | {PEER_PORT}))
    if busy:
        sys.exit("bench-compare: UDP port %s on 127.0.0.1 already in use (a TURN server, or an earlier benchmark "
                 "still running?); stop it and run again" % ", ".join(busy))


def coturn_command(binary, port, relay_ports, threads, pidfile, address="127.0.0.1"):
    """coturn configured like the benchmark's turnpike: listening and relaying on `address`, REST
    credentials from SECRET, loopback peers allowed, UDP only, `threads` relay threads, no logging."""
    return [binary, "-n", "--listening-ip=" + address, "--listening-port=%d" % port, "--relay-ip=" + address,
            "--min-port=%d" % relay_ports[0], "--max-port=%d" % relay_ports[1], "--use-auth-secret",
            "--static-auth-secret=" + SECRET, "--realm=bench", "--allow-loopback-peers", "--no-cli", "--no-tls",
            "--no-dtls", "--no-tcp", "--relay-threads=%d" % threads, "--no-stdout-log", "--log-file=/dev/null",
            "--pidfile=" + pidfile]


def start(name, sockets=1, pause_us=None, ipv6=False, gateway=False, binary=TURNPIKE):
    """Starts one server. `floor` is the raw forwarder shaped like a relay: it sends through `sockets`
    sockets, one per source (each allocation sends from its own address) and waits on all of them with
    epoll_wait (a relay's peers may send to any of them): the least any TURN server pays. `pause_us`
    sets turnpike's runtime.coalesce_us (None: its default) or the forwarders' RAW_COALESCE_US (None:
    no pause). `ipv6`: turnpike and coturn relay from ::1 too (for `loadgen --relay-family ipv6`),
    and turnpike allows ::1 peers. `gateway`: turnpike and coturn listen and relay on GATEWAY_SERVER,
    with the generator's network behind a gateway (see `gateway_study`). `binary`: the turnpike to run
    (another build, for `against_study`)."""
    pin = ["taskset", "-c", "0"]
    env = None
    if name in ("turnpike", "turnpike-nc", "turnpike-sock"):
        # turnpike-nc: turnpike with receive coalescing off (runtime.coalesce_us: 0), to show what it
        # buys and what it costs. turnpike-sock: without the raw socket (runtime.raw_send: false), every
        # datagram leaving through its relay socket.
        if name == "turnpike-nc":
            pause_us = 0
        runtime = "threads: 1"
        if pause_us is not None:
            runtime += ", coalesce_us: %d" % pause_us
        if name == "turnpike-sock":
            runtime += ", raw_send: false"
        yaml = TURNPIKE_YAML.replace("runtime: {threads: 1}", "runtime: {%s}" % runtime)
        if ipv6:
            yaml = yaml.replace("ips: [127.0.0.1], min_port", 'ips: [127.0.0.1, "::1"], min_port')
            yaml = yaml.replace("allowed: [127.0.0.1]", 'allowed: [127.0.0.1, "::1"]')
        if gateway:
            yaml = yaml.replace("allowed: [127.0.0.1]", "allowed: [%s]" % GATEWAY_NET)
            yaml = yaml.replace("127.0.0.1", GATEWAY_SERVER)
        path = os.path.join(ROOT, "target/bench/turnpike.yaml")
        with open(path, "w") as f:
            f.write(yaml)
        cmd = pin + [binary, "--config", path]
    elif name == "coturn":
        cmd = pin + coturn_command("turnserver", PORTS["coturn"], (40000, 59999), 1,
                                   os.path.join(ROOT, "target/bench/coturn.pid"),
                                   GATEWAY_SERVER if gateway else "127.0.0.1")
        if ipv6:
            cmd.append("--relay-ip=::1")
    elif name == "setup-floor":
        # The kernel's part of an Allocate (scripts/bench/setup-floor.c), relay ports as turnpike's.
        cmd = pin + [SETUP_FLOOR, str(PORTS[name]), "20000", "39999"]
    else:
        # floor-raw: the floor sending every batch through one raw socket (RAW_SEND=1), as turnpike
        # does with runtime.raw_send.
        cmd = pin + [RAW, str(PORTS["raw"]), "127.0.0.1", str(PEER_PORT)]
        if name in ("floor", "floor-raw"):
            cmd += [str(sockets), "wait"]
        # Set always, so that a RAW_COALESCE_US or RAW_SEND left in the caller's environment cannot
        # change the plain forwarders.
        env = dict(os.environ, RAW_COALESCE_US=str(pause_us or 0), RAW_SEND="1" if name == "floor-raw" else "0")
    proc = spawn_server(name, cmd, env=env)
    time.sleep(0.2 if name in ("raw", "floor", "floor-raw", "setup-floor") else 1.0)
    require_running(name, proc)
    return proc


def spawn_server(name, cmd, env=None):
    """Starts a server with its stderr kept in target/bench/<name>.stderr (shown if it fails)."""
    log = open(os.path.join(ROOT, "target/bench/%s.stderr" % name), "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    proc.bench_name = name
    proc.bench_log = log.name
    return proc


def require_running(name, proc):
    """Ends the benchmark (non-zero) when the server `proc` is not running: a server that failed
    measures nothing, and its runs must not be reported as 100 % loss."""
    if proc.poll() is None:
        return
    try:
        with open(getattr(proc, "bench_log", os.devnull), errors="replace") as f:
            tail = f.read()[-800:]
    except OSError:
        tail = ""
    sys.exit("bench: %s exited (code %s):\n%s" % (name, proc.returncode, tail))


def stop(proc):
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def loadgen(name, proc, *extra, port=None, gateway=False):
    """One generator run against `proc` (on `port`, default the server's own in PORTS); its JSON line.
    `gateway`: the generator runs in GATEWAY_NETNS, the server listens on GATEWAY_SERVER."""
    cmd = ["taskset", "-c", "1", LOADGEN, "--secret", SECRET, "--server-pid", str(proc.pid),
           "--duration", str(SECS), "--warmup", "0.5"] + [str(e) for e in extra]
    if gateway:
        cmd = ["ip", "netns", "exec", GATEWAY_NETNS] + cmd
    if name in ("raw", "floor", "floor-raw"):
        cmd += ["--raw", "127.0.0.1:%d" % PORTS[name], "--peer-port", str(PEER_PORT)]
    else:
        cmd += ["--server", "%s:%d" % (GATEWAY_SERVER if gateway else "127.0.0.1", port or PORTS[name])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not out.stdout.strip():
        return {"error": out.stderr.strip()[-300:] or "no output (exit %d)" % out.returncode}
    line = out.stdout.strip().splitlines()[-1]
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {"error": out.stderr.strip()[-300:]}


# A paced run in which the generator fell this far behind its own schedule, although it could offer
# the rate, did not measure the configuration: the generator (or its core) was stopped, then caught up
# with one burst at full speed. Nor did one in which the hypervisor took this much time from the
# server's or the generator's core (steal time, /proc/stat). Such a run is repeated, at most twice.
STALL_US = 50000
STEAL_MS = 50
# A set-up run times its Allocates over a tenth of a second or so (turnpike) to about a second (coturn):
# it is repeated when the hypervisor took at least one 10-ms tick and 5 % of the timed windows.
SETUP_STEAL_MS = 10
SETUP_STEAL_SHARE = 0.05
# Set-up runs are short and cheap: they get at least five alternating rounds, whatever BENCH_ROUNDS
# (BENCH_QUICK=1: BENCH_ROUNDS, to stay quick).
SETUP_ROUNDS = ROUNDS if QUICK else max(ROUNDS, 5)
STALLS = []


def stall_reason(r):
    """Why run `r` did not measure its configuration, or None."""
    if "error" in r:
        return None
    if "timed_s" in r:
        steal = max(r.get("steal_ms", [])[:2] or [0])
        if steal >= max(SETUP_STEAL_MS, SETUP_STEAL_SHARE * r["timed_s"] * 1000):
            return "%d ms stolen by the hypervisor in %d ms of timed Allocates" % (steal, r["timed_s"] * 1000)
        return None
    if not r.get("generator_saturated") and r.get("generator_max_lag_us", 0) > STALL_US:
        return "generator %d ms behind" % (r["generator_max_lag_us"] // 1000)
    steal = r.get("steal_ms", [])[:2]
    if steal and max(steal) >= STEAL_MS:
        return "%d ms stolen by the hypervisor" % max(steal)
    return None


def run_one(name, *extra, sockets=1, starter=None, port=None, gateway=False):
    """A fresh server (`starter()`, default `start(name, sockets)`) and one generator run against it,
    repeated (at most twice) when the run stalled; see `stall_reason`."""
    for attempt in range(3):
        proc = starter() if starter else start(name, sockets)
        try:
            r = loadgen(name, proc, *extra, port=port, gateway=gateway)
            require_running(name, proc)
        finally:
            stop(proc)
        if "error" in r:
            sys.exit("bench: the load generator failed against %s (%s): %s"
                     % (name, " ".join(str(e) for e in extra), r["error"]))
        reason = stall_reason(r)
        if attempt == 2 or reason is None:
            return r
        STALLS.append({"server": name, "args": [str(e) for e in extra], "reason": reason, **r})
        print("  stalled %-8s %s (%s, repeated): %s"
              % (name, " ".join(str(e) for e in extra), reason, json.dumps(r)), file=sys.stderr)
    return r


def fmt(x, digits=2):
    return "n/a" if x is None or x != x else ("%.*f" % (digits, x))


def ratio(a, b):
    return None if not a or not b or a != a or b != b else a / b


def median(values):
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def combine(runs, keys=("cpu_us_per_packet", "p50_us", "p99_us", "offered_pps", "delivered_pps")):
    """One figure per server and configuration from its rounds: the median of each of `keys` (by
    default CPU per packet, p50, p99 and rates) and, for traffic runs, the worst loss of any round."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1] if runs else {}
    out = dict(ok[0])
    for key in keys:
        vals = [r[key] for r in ok if r.get(key) is not None and r[key] == r[key]]
        out[key] = median(vals)
    if "loss" in out:
        out["loss"] = max(r.get("loss", 0.0) for r in ok)
    out["rounds"] = len(ok)
    return out


def combine_setup(runs):
    """One figure per server and allocation count from its set-up rounds: medians."""
    return combine(runs, ("setup_per_sec", "cpu_us_per_alloc", "rss_per_alloc_kib"))


def combine_rows(rows):
    """Replaces each row's per-server list of rounds by their combination."""
    for row in rows:
        for name, value in list(row.items()):
            if isinstance(value, list):
                row[name] = combine(value)
    return rows


def main():
    order = ["turnpike", "coturn", "raw", "floor", "turnpike-nc"]
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "secs": SECS, "rounds": ROUNDS, "runs": []}
    rates = [50000, 100000, 200000]
    sizes = [172] if QUICK else [172, 1200]
    allocs = [10] if QUICK else [10, 1000]
    table = [{"allocations": a, "size": size, "rate": rate} for a in allocs for size in sizes for rate in rates]
    calls = [{"allocations": a, "rate": rate} for a in allocs for rate in ([100000] if QUICK else [50000, 100000])]
    k = 0
    # Every round measures every configuration once; servers alternate which goes first, so drift on a
    # shared machine spreads evenly, and rounds spread each configuration over the whole run.
    for _ in range(ROUNDS):
        for row in table:
            a, size, rate = row["allocations"], row["size"], row["rate"]
            rot = order[k % len(order):] + order[:k % len(order)]
            k += 1
            for name in rot:
                r = run_one(name, "--allocations", a, "--size", size, "--rate", rate, sockets=a)
                row.setdefault(name, []).append(r)
                results["runs"].append({"server": name, **r})
                print("  %-11s %5d allocs %4d B %6d pps: %s" % (name, a, size, rate, json.dumps(r)), file=sys.stderr)
        # RTP-like calls: client -> relay -> relay -> client (the raw forwarder cannot play this part).
        for row in calls:
            a, rate = row["allocations"], row["rate"]
            three = ["turnpike", "coturn", "turnpike-nc"]
            for name in three[k % 3:] + three[:k % 3]:
                r = run_one(name, "--allocations", a, "--rate", rate, "--calls")
                row.setdefault(name, []).append(r)
                results["runs"].append({"server": name, "calls": True, **r})
                print("  calls %-11s %5d allocs %6d pps: %s" % (name, a, rate, json.dumps(r)), file=sys.stderr)
            k += 1
    combine_rows(table)
    combine_rows(calls)
    # Highest paced rate with < 0.1 % loss (10 allocations, 172 B).
    sweep_rates = [100000, 200000, 300000] if QUICK else list(range(100000, 650000, 50000))
    sweep = {n: [] for n in order[:3]}
    for rate in sweep_rates:
        for name in order[:3]:
            r = run_one(name, "--allocations", 10, "--size", 172, "--rate", rate)
            sweep[name].append((rate, r.get("offered_pps", 0), r.get("delivered_pps", 0), r.get("loss", 1.0),
                                r.get("generator_saturated", False)))
            print("  sweep %-8s %6d pps: %s" % (name, rate, json.dumps(r)), file=sys.stderr)
    # Memory and set-up rate.
    mem = {}
    setup_order = ["turnpike", "coturn", "setup-floor"]
    for rnd in range(SETUP_ROUNDS):
        for n_alloc in ([1000] if QUICK else [1000, 10000]):
            for name in setup_order[rnd % 3:] + setup_order[:rnd % 3]:
                # At least 10,000 Allocates are timed per run (1,000 allocations: ten set-up rounds,
                # deleted in between): one set-up of 1,000 takes about 10 ms, too short to time.
                r = run_one(name, "--allocations", n_alloc, "--setup-only", "--setup-rounds", max(1, 10000 // n_alloc))
                mem.setdefault((name, n_alloc), []).append(r)
                print("  setup %-8s %5d: %s" % (name, n_alloc, json.dumps(r)), file=sys.stderr)
    mem = {key: combine_setup(runs) for key, runs in mem.items()}
    results["stalled_runs_repeated"] = STALLS
    render(results, table, calls, sweep, sweep_rates, mem)


def from_log(path):
    """Rebuilds the tables from the progress lines of an earlier run (its stderr)."""
    table, calls, sweep, mem, rows = [], [], {"turnpike": [], "coturn": [], "raw": []}, {}, {}
    for line in open(path):
        if ": {" not in line:
            continue
        head, body = line.split(": {", 1)
        r = json.loads("{" + body)
        words = head.split()
        if words[0] == "sweep":
            sweep[words[1]].append((int(words[2]), r.get("offered_pps", 0), r.get("delivered_pps", 0),
                                    r.get("loss", 1.0), r.get("generator_saturated", False)))
        elif words[0] == "stalled":
            reason = head.rsplit("(", 1)[-1].split(", repeated")[0] if ", repeated" in head else None
            STALLS.append({"server": words[1], "reason": reason, **r})
        elif words[0] == "setup":
            mem.setdefault((words[1], int(words[2])), []).append(r)
        elif words[0] == "calls":
            key = ("calls", int(words[2]), int(words[4]))
            if key not in rows:
                rows[key] = {"allocations": key[1], "rate": key[2]}
                calls.append(rows[key])
            rows[key].setdefault(words[1], []).append(r)
        else:
            key = (int(words[1]), int(words[3]), int(words[5]))
            if key not in rows:
                rows[key] = {"allocations": key[0], "size": key[1], "rate": key[2]}
                table.append(rows[key])
            rows[key].setdefault(words[0], []).append(r)
    rounds = max([len(v) for row in table for v in row.values() if isinstance(v, list)] or [1])
    combine_rows(table)
    combine_rows(calls)
    mem = {key: combine_setup(runs) for key, runs in mem.items()}
    rates = sorted({rate for pts in sweep.values() for (rate, *_rest) in pts})
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "secs": SECS, "rounds": rounds, "runs": [],
               "from_log": path, "stalled_runs_repeated": STALLS}
    render(results, table, calls, sweep, rates, mem)


def repeats_line(stalls):
    """One sentence naming the runs that were repeated, and why."""
    def what(r):
        if "timed_s" in r:
            return "%d allocations set-up" % r.get("allocations", 0)
        return "%s pps" % r.get("rate")
    return ("Runs repeated because the generator stalled (over %d ms behind its schedule while able to offer "
            "the rate, then catching up in one burst) or the hypervisor took %d ms or more from the server's "
            "or the generator's core (steal time; in set-up runs %d ms and %d %% of the timed Allocates): %d%s."
            % (STALL_US // 1000, STEAL_MS, SETUP_STEAL_MS, SETUP_STEAL_SHARE * 100, len(stalls), "".join(
                "; %s at %s, %s" % (r.get("server"), what(r), r.get("reason") or
                                    "%d ms" % (r.get("generator_max_lag_us", 0) // 1000))
                for r in stalls)))


def render(results, table, calls, sweep, sweep_rates, mem):
    order = ["turnpike", "coturn", "raw"]
    best = {}
    for name in order:
        ok = [rate for (rate, off, dlv, loss, sat) in sweep[name] if loss < 0.001 and not sat]
        best[name] = max(ok) if ok else None
    results["sweep"] = sweep
    results["best_lossless"] = best
    results["memory"] = {"%s/%d" % k2: v for k2, v in mem.items()}

    lines = []
    rounds = results.get("rounds", 1)
    lines.append("Machine: %s, %s CPUs; server pinned to core 0, generator to core 1; %.1f s measured per run; "
                 "%d alternating round(s) per configuration (median CPU and p99, worst loss)." %
                 (results["machine"], results["cpus"], SECS, rounds))
    lines.append("")
    lines.append(repeats_line(results.get("stalled_runs_repeated", [])))
    lines.append("")
    lines.append("### CPU per relayed packet and loss (ChannelData client -> peer, paced)")
    lines.append("")
    lines.append("raw: the raw forwarder, one socket in, one out, blocking in recvmmsg. floor: the same forwarder")
    lines.append("shaped like a relay, as any TURN server must be: one output socket per allocation (each allocation")
    lines.append("has its own relayed address) and epoll_wait on all of them (peers may send to any). The p99 of")
    lines.append("the two forwarders, which do no work of their own, is the latency noise floor of the machine.")
    lines.append("")
    lines.append("| allocs | size | rate | turnpike us/pkt | coturn us/pkt | raw us/pkt | floor us/pkt | turnpike/coturn | turnpike/raw | turnpike/floor | loss turnpike | loss coturn | loss raw | loss floor | p99 us turnpike | p99 us coturn | p99 us raw | p99 us floor |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    servers = ["turnpike", "coturn", "raw", "floor"]
    for row in table:
        t, c, r, f = (row.get(n, {}).get("cpu_us_per_packet") for n in servers)
        lt, lc, lr, lf = (row.get(n, {}).get("loss") for n in servers)
        p99 = [fmt(row.get(n, {}).get("p99_us"), 0) for n in servers]
        lines.append("| %d | %d | %dk | %s | %s | %s | %s | %s | %s | %s | %s %% | %s %% | %s %% | %s %% | %s | %s | %s | %s |" % (
            row["allocations"], row["size"], row["rate"] // 1000, fmt(t), fmt(c), fmt(r), fmt(f),
            fmt(ratio(t, c)), fmt(ratio(t, r)), fmt(ratio(t, f)),
            fmt(None if lt is None else lt * 100, 3), fmt(None if lc is None else lc * 100, 3),
            fmt(None if lr is None else lr * 100, 3), fmt(None if lf is None else lf * 100, 3), *p99))
    if calls:
        lines.append("")
        lines.append("### RTP-like calls, paced (client -> relay -> relay -> client: both directions of the server)")
        lines.append("")
        lines.append("| allocs | rate | turnpike us/pkt | coturn us/pkt | turnpike/coturn | loss turnpike | loss coturn | p99 us turnpike | p99 us coturn |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in calls:
            t, c = row.get("turnpike", {}), row.get("coturn", {})
            lines.append("| %d | %dk | %s | %s | %s | %s %% | %s %% | %s | %s |" % (
                row["allocations"], row["rate"] // 1000, fmt(t.get("cpu_us_per_packet")), fmt(c.get("cpu_us_per_packet")),
                fmt(ratio(t.get("cpu_us_per_packet"), c.get("cpu_us_per_packet"))),
                fmt(None if t.get("loss") is None else t["loss"] * 100, 3),
                fmt(None if c.get("loss") is None else c["loss"] * 100, 3),
                fmt(t.get("p99_us"), 0), fmt(c.get("p99_us"), 0)))
    if any("turnpike-nc" in row for row in table):
        lines.extend(coalescing_table(table, calls))
    lines.append("")
    lines.append("### Highest paced rate with < 0.1 %% loss (10 allocations, 172 B; rates tried: %s)" %
                 ", ".join("%dk" % (x // 1000) for x in sweep_rates))
    lines.append("")
    lines.append("| turnpike | coturn | raw forwarder |")
    lines.append("|---|---|---|")
    lines.append("| %s | %s | %s |" % tuple(("%dk pps" % (best[n] // 1000)) if best[n] else "below %dk" % (sweep_rates[0] // 1000) for n in order))
    lines.append("")
    lines.append("### Memory and authenticated allocations per second (pipelined Allocate from N sockets)")
    lines.append("")
    lines.append("Medians of %d alternating round(s) (set-up runs are short: at least five rounds, whatever "
                 "BENCH_ROUNDS, except with BENCH_QUICK=1)." % max([v.get("rounds", 1) for v in mem.values()] or [1]))
    lines.append("")
    lines.append("set-up floor: scripts/bench/setup-floor.c, the kernel's part of an Allocate with a relay socket "
                 "(socket, bind, epoll_ctl, answers of turnpike's sizes in batches; no credentials, no state).")
    lines.append("")
    lines.append("| allocations | turnpike KiB/alloc | coturn KiB/alloc | turnpike alloc/s | coturn alloc/s | set-up floor alloc/s | alloc/s ratio | floor/coturn | turnpike server CPU us/alloc | coturn server CPU us/alloc | floor CPU us/alloc | CPU ratio coturn/turnpike | CPU turnpike/floor |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n_alloc in sorted({k2[1] for k2 in mem}):
        t, c = mem[("turnpike", n_alloc)], mem[("coturn", n_alloc)]
        f = mem.get(("setup-floor", n_alloc), {})
        lines.append("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            n_alloc, fmt(t.get("rss_per_alloc_kib")), fmt(c.get("rss_per_alloc_kib")),
            fmt(t.get("setup_per_sec"), 0), fmt(c.get("setup_per_sec"), 0), fmt(f.get("setup_per_sec"), 0),
            fmt(ratio(t.get("setup_per_sec"), c.get("setup_per_sec"))),
            fmt(ratio(f.get("setup_per_sec"), c.get("setup_per_sec"))),
            fmt(t.get("cpu_us_per_alloc"), 1), fmt(c.get("cpu_us_per_alloc"), 1), fmt(f.get("cpu_us_per_alloc"), 1),
            fmt(ratio(c.get("cpu_us_per_alloc"), t.get("cpu_us_per_alloc"))),
            fmt(ratio(t.get("cpu_us_per_alloc"), f.get("cpu_us_per_alloc")))))
    report = "\n".join(lines) + "\n"
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "latest.md"), "w") as f:
        f.write(report)
    with open(os.path.join(OUT, "latest.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(OUT, "latest.svg"), "w") as f:
        f.write(svg(sweep, sweep_rates))
    print(report)
    print("wrote bench/results/latest.md, latest.json, latest.svg")


def coalescing_table(table, calls):
    """What receive coalescing buys (CPU) and costs (latency): turnpike as configured by default against
    turnpike with `runtime.coalesce_us: 0` (turnpike-nc), same run, alternating rounds."""
    lines = ["", "### Receive coalescing: turnpike (default, runtime.coalesce_us 300) and turnpike without it",
             "", "nc: turnpike with runtime.coalesce_us: 0. Calls cross the server twice (two pauses at most).", "",
             "| traffic | allocs | size | rate | turnpike us/pkt | nc us/pkt | turnpike/nc | nc/raw | nc/coturn | "
             "p50 us turnpike | p50 us nc | p99 us turnpike | p99 us nc | loss turnpike | loss nc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in (("client -> peer", table), ("calls", calls)):
        for row in rows:
            t, n = row.get("turnpike", {}), row.get("turnpike-nc", {})
            if not n:
                continue
            tc, nc = t.get("cpu_us_per_packet"), n.get("cpu_us_per_packet")
            raw, cot = row.get("raw", {}).get("cpu_us_per_packet"), row.get("coturn", {}).get("cpu_us_per_packet")
            lines.append("| %s | %d | %s | %dk | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s %% | %s %% |" % (
                kind, row["allocations"], row.get("size", 172), row["rate"] // 1000, fmt(tc), fmt(nc),
                fmt(ratio(tc, nc)), fmt(ratio(nc, raw)), fmt(ratio(nc, cot)),
                fmt(t.get("p50_us"), 0), fmt(n.get("p50_us"), 0), fmt(t.get("p99_us"), 0), fmt(n.get("p99_us"), 0),
                fmt(None if t.get("loss") is None else t["loss"] * 100, 3),
                fmt(None if n.get("loss") is None else n["loss"] * 100, 3)))
    return lines


def svg(sweep, rates):
    """Delivered vs offered packets/s for the three servers."""
    w, h, pad = 640, 400, 60
    top = max(rates) * 1.05
    x = lambda v: pad + (w - 2 * pad) * v / top
    y = lambda v: h - pad - (h - 2 * pad) * v / top
    colors = {"turnpike": "#1f77b4", "coturn": "#d62728", "raw": "#2ca02c"}
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (w, h),
             '<rect width="100%" height="100%" fill="white"/>',
             '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>' % (pad, h - pad, w - pad, h - pad),
             '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>' % (pad, h - pad, pad, pad),
             '<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#bbb" stroke-dasharray="4"/>' % (x(0), y(0), x(top), y(top)),
             '<text x="%d" y="%d" text-anchor="middle">offered packets/s (target)</text>' % (w // 2, h - 15),
             '<text x="15" y="%d" transform="rotate(-90 15 %d)" text-anchor="middle">delivered packets/s</text>' % (h // 2, h // 2),
             '<text x="%d" y="25" text-anchor="middle">Delivered vs offered, 10 allocations, 172 B, one core</text>' % (w // 2)]
    for v in range(0, int(top) + 1, 100000):
        parts.append('<text x="%.1f" y="%d" text-anchor="middle">%dk</text>' % (x(v), h - pad + 18, v // 1000))
        parts.append('<text x="%d" y="%.1f" text-anchor="end">%dk</text>' % (pad - 6, y(v) + 4, v // 1000))
    for i, (name, pts) in enumerate(sweep.items()):
        coords = " ".join("%.1f,%.1f" % (x(rate), y(dlv)) for (rate, off, dlv, loss, sat) in pts)
        parts.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (colors[name], coords))
        for (rate, off, dlv, loss, sat) in pts:
            parts.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (x(rate), y(dlv), colors[name]))
        parts.append('<text x="%d" y="%d" fill="%s">%s</text>' % (pad + 10, pad + 15 + 16 * i, colors[name], name))
    parts.append("</svg>")
    return "\n".join(parts)


def p99_study(rounds):
    """The p99 target (100k pps, turnpike vs coturn) with many alternating rounds: each round runs every
    100k configuration on both servers, in alternating order; prints the median p99 of each server, and
    in how many rounds turnpike's p99 was the lower."""
    configs = [(a, size, False) for a in (10, 1000) for size in (172, 1200)] + [(a, 172, True) for a in (10, 1000)]
    p99 = {(c, n): [] for c in configs for n in ("turnpike", "coturn")}
    for i in range(rounds):
        for j, (a, size, calls) in enumerate(configs):
            names = ["turnpike", "coturn"] if (i + j) % 2 == 0 else ["coturn", "turnpike"]
            for name in names:
                extra = ["--allocations", a, "--size", size, "--rate", 100000] + (["--calls"] if calls else [])
                r = run_one(name, *extra)
                p99[((a, size, calls), name)].append(r.get("p99_us"))
                print("  p99 %-8s %5d allocs %4d B%s: %s" % (name, a, size, " calls" if calls else "", json.dumps(r)),
                      file=sys.stderr)
    lines = ["### p99 at 100k pps, %d alternating rounds per configuration (%.1f s measured per run)" % (rounds, SECS), "",
             "| allocs | size | mode | turnpike median p99 us | coturn median p99 us | rounds turnpike lower |",
             "|---|---|---|---|---|---|"]
    for (a, size, calls) in configs:
        t, c = p99[((a, size, calls), "turnpike")], p99[((a, size, calls), "coturn")]
        wins = sum(1 for x, y in zip(t, c) if x is not None and y is not None and x < y)
        lines.append("| %d | %d | %s | %s | %s | %d of %d |" % (a, size, "calls" if calls else "client -> peer",
                     fmt(median([x for x in t if x is not None]), 0), fmt(median([y for y in c if y is not None]), 0),
                     wins, len(t)))
    lines += ["", repeats_line(STALLS)]
    print("\n".join(lines))


def rotating_rounds(tag, rounds, configs, names, run):
    """`rounds` rounds of every (allocations, size, rate) configuration in `configs` on every server in
    `names`, the servers' order rotating from one configuration to the next; `run(config, name)` makes
    one run, logged on stderr under `tag`. Returns the runs of each (configuration, name)."""
    runs = {(c, n): [] for c in configs for n in names}
    k = 0
    for _ in range(rounds):
        for c in configs:
            for name in names[k % len(names):] + names[:k % len(names)]:
                r = run(c, name)
                runs[(c, name)].append(r)
                print("  %s %-14s %5d allocs %4d B %6d pps: %s" % (tag, name, c[0], c[1], c[2], json.dumps(r)),
                      file=sys.stderr)
            k += 1
    return runs


def like_for_like(title, configs, names, runs, ratios):
    """Prints a study's table under `title`: per configuration the median CPU per packet of each server in
    `names`, the ratios of the (numerator, denominator) pairs in `ratios`, and each server's worst loss
    and median p99."""
    lines = [title, "",
             "| allocs | size | rate | " + " | ".join("%s us/pkt" % n for n in names) + " | " +
             " | ".join("%s/%s" % pair for pair in ratios) + " | " + " | ".join("loss %s" % n for n in names) +
             " | " + " | ".join("p99 us %s" % n for n in names) + " |",
             "|---|---|---|" + "---|" * (3 * len(names) + len(ratios))]
    for c in configs:
        m = {n: combine(runs[(c, n)]) for n in names}
        cpu = {n: m[n].get("cpu_us_per_packet") for n in names}
        lines.append("| %d | %d | %dk | %s | %s | %s | %s |" % (
            c[0], c[1], c[2] // 1000, " | ".join(fmt(cpu[n]) for n in names),
            " | ".join(fmt(ratio(cpu[a], cpu[b])) for (a, b) in ratios),
            " | ".join("n/a" if m[n].get("loss") is None else "%.3f %%" % (100 * m[n]["loss"]) for n in names),
            " | ".join(fmt(m[n].get("p99_us"), 0) for n in names)))
    lines += ["", repeats_line(STALLS)]
    print("\n".join(lines))


def coalescing_study(rounds, pause_us=300):
    """Receive coalescing like for like: turnpike (default), turnpike-nc (coalescing off), the raw
    forwarder, and the raw forwarder pausing `pause_us` after a short batch (RAW_COALESCE_US), in
    rotating order, `rounds` rounds; prints the median CPU per packet and p50/p99 of each."""
    configs = [(10, 172, 100000), (10, 172, 200000), (1000, 172, 100000)]
    names = ["turnpike", "turnpike-nc", "raw", "raw-coalescing"]

    def run(c, name):
        server = "raw" if name == "raw-coalescing" else name
        pause = pause_us if name == "raw-coalescing" else None
        return run_one(server, "--allocations", c[0], "--size", c[1], "--rate", c[2],
                       starter=lambda: start(server, 1, pause))

    runs = rotating_rounds("coalescing", rounds, configs, names, run)
    lines = ["### Receive coalescing like for like, %d rotating rounds (medians; raw-coalescing: RAW_COALESCE_US=%d)"
             % (rounds, pause_us), "",
             "| allocs | size | rate | " + " | ".join("%s us/pkt" % n for n in names) +
             " | turnpike/raw-coalescing | " + " | ".join("p50/p99 us %s" % n for n in names) + " |",
             "|---|---|---|" + "---|" * (2 * len(names) + 1)]
    for c in configs:
        m = {n: combine(runs[(c, n)]) for n in names}
        cpu = [m[n].get("cpu_us_per_packet") for n in names]
        lines.append("| %d | %d | %dk | %s | %s | %s |" % (
            c[0], c[1], c[2] // 1000, " | ".join(fmt(x) for x in cpu), fmt(ratio(cpu[0], cpu[3])),
            " | ".join("%s/%s" % (fmt(m[n].get("p50_us"), 0), fmt(m[n].get("p99_us"), 0)) for n in names)))
    lines += ["", repeats_line(STALLS)]
    print("\n".join(lines))


def trade_off_study(rounds, pauses=(0, 50, 150, 300, 600), raw_pauses=(0, 50, 150, 300)):
    """The CPU target (<= 0.6 x coturn) against the p99 target (<= coturn's) at 100k pps: turnpike with
    each receive-coalescing pause in `pauses` (runtime.coalesce_us), coturn, the raw forwarder pausing
    each of `raw_pauses` (RAW_COALESCE_US) and, with 1,000 allocations, the floor (a socket per
    allocation) pausing 0 and 300 us, in rotating order, `rounds` rounds. A forwarder that does no work
    of its own shows what the machine allows: a pause long enough for the CPU target is too long for
    the p99 target when no setting of it meets both."""
    configs = [(10, 172), (1000, 172)]
    servers = {c: [("coturn", "coturn", None)] + [("turnpike-%d" % p, "turnpike", p) for p in pauses] +
               [("raw-%d" % p, "raw", p) for p in raw_pauses] +
               ([("floor-%d" % p, "floor", p) for p in (0, 300)] if c[0] > 10 else []) for c in configs}
    runs = {(c, label): [] for c in configs for (label, _, _) in servers[c]}
    k = 0
    for _ in range(rounds):
        for c in configs:
            order = servers[c][k % len(servers[c]):] + servers[c][:k % len(servers[c])]
            for (label, name, pause) in order:
                r = run_one(name, "--allocations", c[0], "--size", c[1], "--rate", 100000,
                            starter=lambda name=name, sockets=c[0], pause=pause: start(name, sockets, pause))
                runs[(c, label)].append(r)
                print("  trade-off %-14s %5d allocs %4d B: %s" % (label, c[0], c[1], json.dumps(r)), file=sys.stderr)
            k += 1
    lines = ["### CPU against p99 at 100k pps, %d rotating rounds (medians; the number is the pause in us)" % rounds]
    for c in configs:
        m = {label: combine(runs[(c, label)]) for (label, _, _) in servers[c]}
        cpu_c, p99_c = m["coturn"].get("cpu_us_per_packet"), m["coturn"].get("p99_us")
        lines += ["", "%d allocations, %d B:" % c, "",
                  "| server | us/pkt | x coturn | p50 us | p99 us | p99 / coturn's | worst loss | both targets |",
                  "|---|---|---|---|---|---|---|---|"]
        for (label, _, _) in servers[c]:
            cpu, p99 = m[label].get("cpu_us_per_packet"), m[label].get("p99_us")
            cr, pr = ratio(cpu, cpu_c), ratio(p99, p99_c)
            both = "n/a" if label == "coturn" or cr is None or pr is None else (
                "yes" if cr <= 0.6 and pr <= 1.0 else "no")
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                label, fmt(cpu), fmt(cr), fmt(m[label].get("p50_us"), 0), fmt(p99, 0), fmt(pr),
                "n/a" if m[label].get("loss") is None else "%.3f %%" % (100 * m[label]["loss"]), both))
    lines += ["", repeats_line(STALLS)]
    print("\n".join(lines))


def raw_send_study(rounds, pause_us=300):
    """The raw socket (runtime.raw_send) like for like: turnpike (default: on), turnpike-sock (off),
    coturn, the floor (the forwarder with a socket per allocation, sending through them) and floor-raw
    (the same sending through one raw socket), both floors pausing `pause_us` as turnpike does by
    default, with 1,000 and 10 allocations at 100k and 200k pps, in rotating order, `rounds` rounds;
    prints the median CPU per packet of each, the ratios, the worst loss and the p99."""
    configs = [(1000, 172, 100000), (1000, 172, 200000), (1000, 1200, 100000), (1000, 1200, 200000),
               (10, 172, 100000), (10, 172, 200000)]
    names = ["turnpike", "turnpike-sock", "coturn", "floor", "floor-raw"]

    def run(c, name):
        pause = pause_us if name.startswith("floor") else None
        return run_one(name, "--allocations", c[0], "--size", c[1], "--rate", c[2],
                       starter=lambda: start(name, c[0], pause))

    runs = rotating_rounds("raw-send", rounds, configs, names, run)
    like_for_like("### The raw socket like for like, %d rotating rounds (medians; turnpike-sock: runtime.raw_send "
                  "false; the floors pause %d us as turnpike does)" % (rounds, pause_us), configs, names, runs,
                  [("turnpike", "turnpike-sock"), ("turnpike", "coturn"), ("turnpike-sock", "coturn"),
                   ("turnpike", "floor-raw"), ("turnpike-sock", "floor")])


def send_floor_study(rounds, pauses=(300, 1000, 3000)):
    """What a relay pays per datagram when every datagram goes to a peer of its own (1,000 allocations
    at 200k pps), however long it pauses: coturn, turnpike (default), the raw forwarder (one socket in,
    one out, no pause) and floor-raw (a socket per allocation, sending through one raw socket, as
    turnpike does) pausing each of `pauses` microseconds after a short batch, in rotating order,
    `rounds` rounds. A longer pause makes fewer, fuller wake-ups; what it cannot remove is the kernel's
    work for each datagram sent, which is what a relay with many allocations pays most of."""
    configs = [(1000, 172, 200000), (1000, 1200, 200000)]
    # label -> (server, pause)
    servers = {"turnpike": ("turnpike", None), "coturn": ("coturn", None), "raw": ("raw", None)}
    servers.update({"floor-raw-%d" % p: ("floor-raw", p) for p in pauses})

    def run(c, label):
        server, pause = servers[label]
        return run_one(server, "--allocations", c[0], "--size", c[1], "--rate", c[2],
                       starter=lambda: start(server, c[0], pause))

    names = list(servers)
    runs = rotating_rounds("send-floor", rounds, configs, names, run)
    like_for_like("### A datagram per peer, %d rotating rounds (medians; floor-raw-N: a socket per allocation, "
                  "one raw socket to send, pausing N us after a short batch)" % rounds, configs, names, runs,
                  [("turnpike", "coturn"), ("raw", "coturn")] + [("floor-raw-%d" % p, "coturn") for p in pauses]
                  + [("turnpike", "floor-raw-%d" % pauses[0])])


def ipv6_study(rounds):
    """IPv6 relays (`loadgen --relay-family ipv6`: clients reach the server over IPv4, relays and peers
    on ::1): turnpike (default: IPv6 raw socket), turnpike-sock (runtime.raw_send false) and coturn, and
    turnpike-v4 (the same server, IPv4 relays) for the family's own cost, in rotating order, `rounds`
    rounds; prints the median CPU per packet of each, the ratios, the worst loss and the p99."""
    configs = [(1000, 172, 100000), (1000, 172, 200000), (1000, 1200, 200000), (10, 172, 200000)]
    # label -> (server, relay family)
    servers = {"turnpike": ("turnpike", "ipv6"), "turnpike-sock": ("turnpike-sock", "ipv6"),
               "coturn": ("coturn", "ipv6"), "turnpike-v4": ("turnpike", "ipv4")}

    def run(c, label):
        server, family = servers[label]
        return run_one(server, "--allocations", c[0], "--size", c[1], "--rate", c[2], "--relay-family", family,
                       starter=lambda: start(server, ipv6=True))

    names = list(servers)
    runs = rotating_rounds("ipv6", rounds, configs, names, run)
    like_for_like("### IPv6 relays, %d rotating rounds (medians; turnpike-sock: runtime.raw_send false; "
                  "turnpike-v4: the same server relaying IPv4)" % rounds, configs, names, runs,
                  [("turnpike", "turnpike-sock"), ("turnpike", "coturn"), ("turnpike", "turnpike-v4")])


def gateway_network(up):
    """Removes the gateway study's network, then (`up`) creates it: namespace GATEWAY_NETNS holding
    GATEWAY_GENERATOR, a veth pair GATEWAY_SERVER <-> GATEWAY_HOP, a route from here to GATEWAY_NET via
    GATEWAY_HOP, and in the namespace a route to GATEWAY_SERVER with GATEWAY_GENERATOR as its source."""
    def ip(*args, ns=False, check=True):
        cmd = (["ip", "netns", "exec", GATEWAY_NETNS] if ns else []) + ["ip"] + list(args)
        subprocess.run(cmd, check=check, capture_output=True)

    ip("route", "del", GATEWAY_NET, "via", GATEWAY_HOP, check=False)  # only the route this study made
    ip("netns", "del", GATEWAY_NETNS, check=False)  # takes its end of the veth pair, and so the pair
    if not up:
        return
    ip("netns", "add", GATEWAY_NETNS)
    ip("link", "add", "tpb-gw0", "type", "veth", "peer", "name", "tpb-gw1")
    ip("link", "set", "tpb-gw1", "netns", GATEWAY_NETNS)
    ip("addr", "add", GATEWAY_SERVER + "/30", "dev", "tpb-gw0")
    ip("link", "set", "tpb-gw0", "up")
    ip("link", "set", "lo", "up", ns=True)
    ip("addr", "add", GATEWAY_GENERATOR + "/32", "dev", "lo", ns=True)
    ip("addr", "add", GATEWAY_HOP + "/30", "dev", "tpb-gw1", ns=True)
    ip("link", "set", "tpb-gw1", "up", ns=True)
    ip("route", "add", GATEWAY_SERVER + "/32", "dev", "tpb-gw1", "src", GATEWAY_GENERATOR, ns=True)
    ip("route", "add", GATEWAY_NET, "via", GATEWAY_HOP)


def gateway_study(rounds):
    """turnpike (default: raw socket), turnpike-sock (runtime.raw_send false) and coturn with the
    generator behind a gateway (`gateway_network`), in rotating order, `rounds` rounds. On loopback every
    peer is on-link, and the kernel gives every datagram a raw socket sends towards an on-link peer a
    route of its own; towards peers behind a gateway it uses the gateway's cached route. Needs root
    (ip netns); the network is removed afterwards."""
    configs = [(1000, 172, 100000), (1000, 172, 200000), (1000, 1200, 200000), (10, 172, 200000)]
    names = ["turnpike", "turnpike-sock", "coturn"]

    def run(c, name):
        return run_one(name, "--allocations", c[0], "--size", c[1], "--rate", c[2], gateway=True,
                       starter=lambda: start(name, gateway=True))

    try:
        gateway_network(True)
        runs = rotating_rounds("gateway", rounds, configs, names, run)
    finally:
        gateway_network(False)
    like_for_like("### Peers behind a gateway, %d rotating rounds (medians; turnpike-sock: runtime.raw_send false; "
                  "the generator in a network namespace behind a veth pair)" % rounds, configs, names, runs,
                  [("turnpike", "turnpike-sock"), ("turnpike", "coturn"), ("turnpike-sock", "coturn")])


def build_baseline(rev):
    """Builds turnpike as of git revision `rev` (release, in a worktree under target/bench, removed
    afterwards); returns the binary's path."""
    src = os.path.join(ROOT, "target/bench/baseline-src")
    target = os.path.join(ROOT, "target/bench/baseline-target")
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", src], capture_output=True)
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", src, rev], check=True, capture_output=True)
    try:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "turnpike", "--quiet"], cwd=src, check=True,
                       env=dict(os.environ, CARGO_TARGET_DIR=target))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", src], capture_output=True)
    return os.path.join(target, "release/turnpike")


def against_study(rounds, rev):
    """This build against the build of git revision `rev` (a change's before and after in one run), with
    coturn for scale: 10 and 1,000 allocations, 172 and 1,200 B, 100k and 200k pps, in rotating order,
    `rounds` rounds; prints the median CPU per packet of each, the ratios, the worst loss and the p99."""
    baseline = build_baseline(rev)
    label = "turnpike-" + rev[:12]
    configs = [(10, 172, 100000), (10, 172, 200000), (1000, 172, 100000), (1000, 172, 200000),
               (1000, 1200, 200000)]
    names = ["turnpike", label, "coturn"]

    def run(c, name):
        if name == label:
            return run_one("turnpike", "--allocations", c[0], "--size", c[1], "--rate", c[2],
                           starter=lambda: start("turnpike", binary=baseline))
        return run_one(name, "--allocations", c[0], "--size", c[1], "--rate", c[2])

    runs = rotating_rounds("against", rounds, configs, names, run)
    like_for_like("### This build against %s, %d rotating rounds (medians)" % (rev, rounds), configs, names, runs,
                  [("turnpike", label), ("turnpike", "coturn"), (label, "coturn")])


# Single studies: flag -> (function, default rounds).
STUDIES = {"--trade-off": (trade_off_study, 4), "--raw-send": (raw_send_study, 3),
           "--coalescing": (coalescing_study, 3), "--p99": (p99_study, 10), "--ipv6": (ipv6_study, 3),
           "--gateway": (gateway_study, 3), "--send-floor": (send_floor_study, 3)}

if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--from-log":
        from_log(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--against":
        require_free_ports()
        against_study(int(sys.argv[3]) if len(sys.argv) > 3 else 3, sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] in STUDIES:
        study, default_rounds = STUDIES[sys.argv[1]]
        require_free_ports()
        study(int(sys.argv[2]) if len(sys.argv) > 2 else default_rounds)
    else:
        require_free_ports()
        main()
