"""TURN over TCP and TLS, side by side: turnpike and coturn (and optionally an earlier turnpike build)
relaying for clients that reach the server over TCP or TLS (the relay side stays UDP), paced, the servers
alternating round by round, server on core 0 and generator on core 1 as in scripts/bench/bench-compare.sh.

Usage: python3 scripts/bench/bench_tcp.py [--rounds N] [--baseline PATH-TO-TURNPIKE] [--no-coturn]
                                    [--transports tcp,tls]
Prints a markdown table of CPU per relayed packet (medians), worst loss and median p99 per server and
configuration; every run's JSON goes to stderr. In calls mode a packet crosses the server twice (client
-> relay -> relay -> client) and the CPU is per crossing; the latency at TCP clients is taken when the
generator reads (no kernel stamp on a stream)."""

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_compare as bc  # noqa: E402

CONFIGS = [
    # (allocations, size, rate, calls)
    (10, 172, 50000, False),
    (10, 1200, 50000, False),
    (10, 172, 50000, True),
    (1000, 172, 50000, True),
]


TLS_DIR = os.path.join(bc.ROOT, "target/bench/tls")
CERT, KEY = os.path.join(TLS_DIR, "cert.pem"), os.path.join(TLS_DIR, "key.pem")
# Where the generator connects: TCP on the servers' usual ports, TLS on these.
TLS_PORTS = {"turnpike": 5349, "coturn": 5350}


def make_certificate():
    """A self-signed P-256 certificate for both servers (the generator accepts any)."""
    os.makedirs(TLS_DIR, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", KEY, "-out", CERT, "-days", "30", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)


def start(name, binary):
    pin = ["taskset", "-c", "0"]
    if name == "coturn":
        cmd = bc.coturn_command("turnserver", bc.PORTS["coturn"], (40000, 59999), 1,
                                os.path.join(bc.ROOT, "target/bench/coturn.pid"))
        cmd = pin + [c for c in cmd if c not in ("--no-tcp", "--no-tls")]
        cmd += ["--cert=" + CERT, "--pkey=" + KEY, "--tls-listening-port=%d" % TLS_PORTS["coturn"]]
    else:
        path = os.path.join(bc.ROOT, "target/bench/turnpike-tcp.yaml")
        with open(path, "w") as f:
            # The generator opens every connection from one address: the per-source limit on pending
            # connections (4-64 by default) would refuse most of 1,000; this measures relaying.
            yaml = bc.TURNPIKE_YAML.replace("tcp: false", "tcp: true, tls_port: %d" % TLS_PORTS["turnpike"])
            yaml = yaml.replace("abuse: {unauth_rate: 0}",
                                "abuse: {unauth_rate: 0, unauth_connections: 4096, unauth_connections_per_source: 4096}")
            f.write(yaml + "tls: {cert: %s, pkey: %s}\n" % (CERT, KEY))
        cmd = pin + [binary, "--config", path]
    proc = bc.spawn_server(name, cmd)
    time.sleep(1.0)
    bc.require_running(name, proc)
    return proc


def run(name, binary, transport, allocations, size, rate, calls):
    server = "coturn" if name == "coturn" else "turnpike"
    port = TLS_PORTS[server] if transport == "tls" else bc.PORTS[server]
    extra = ["--" + transport, "--allocations", allocations, "--size", size, "--rate", rate] + (["--calls"] if calls else [])
    # bench-compare's run: a fresh server, the generator, and a repeat of a stalled run.
    r = bc.run_one(name, *extra, starter=lambda: start(name, binary), port=port)
    print("  %-8s %s %5d allocs %4d B %6d pps %s: %s" % (name, transport, allocations, size, rate,
                                                       "calls" if calls else "c->p", bc.json.dumps(r)),
          file=sys.stderr)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="an earlier turnpike binary, measured as 'baseline'")
    ap.add_argument("--no-coturn", action="store_true")
    ap.add_argument("--transports", default="tcp,tls")
    args = ap.parse_args()
    transports = [t for t in args.transports.split(",") if t in ("tcp", "tls")]
    bc.require_free_ports()
    # Both servers listen for TLS too (the certificate is needed even when only TCP is measured).
    if not shutil.which("openssl"):
        sys.exit("bench-tcp: openssl makes the servers' certificate; install it")
    make_certificate()
    servers = [("turnpike", bc.TURNPIKE)]
    if args.baseline:
        servers.append(("baseline", args.baseline))
    if not args.no_coturn and shutil.which("turnserver"):
        servers.append(("coturn", None))
    results = {}
    configs = [(t,) + c for t in transports for c in CONFIGS]
    for config in configs:
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
            for name, binary in order:
                results.setdefault((config, name), []).append(run(name, binary, *config))
    names = [n for n, _ in servers]
    head = ["client", "allocs", "size", "rate", "mode"] + ["%s us/pkt" % n for n in names]
    head += ["turnpike/%s" % n for n in names[1:]] + ["loss %s" % n for n in names] + ["p99 us %s" % n for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for config in configs:
        combined = {n: bc.combine(results[(config, n)]) for n in names}
        cpu = {n: combined[n].get("cpu_us_per_packet") for n in names}
        row = [config[0].upper(), str(config[1]), str(config[2]), "%dk" % (config[3] // 1000),
               "calls" if config[4] else "client -> peer"]
        row += [bc.fmt(cpu[n]) for n in names]
        row += [bc.fmt(bc.ratio(cpu["turnpike"], cpu[n])) for n in names[1:]]
        row += ["%.3f %%" % (100 * combined[n].get("loss", 1.0)) for n in names]
        row += [bc.fmt(combined[n].get("p99_us"), 0) for n in names]
        print("| " + " | ".join(row) + " |")
    print("\n%d rounds, %s s measured per run, servers alternating; medians (loss: the worst round)."
          % (args.rounds, bc.SECS))


if __name__ == "__main__":
    main()
