"""The kernel path benchmark for scripts/bench/bench-kernel.sh: whole-machine CPU per relayed packet
and the highest loss-free rate of coturn, turnpike in user space, turnpike with its XDP kernel path and a
bare XDP reflector (the ceiling), against a direct client -> peer baseline, in one run. See bench/README.md
("The kernel path") for the method.

Topology (two network namespaces, two veth pairs; addresses from the benchmarking range 198.18.0.0/15):

    tpk-gen (load generator)                      tpk-relay (server)
    tpkc-g 198.18.1.2/24  <--- client link --->  tpkc-r 198.18.1.1/24   listen 198.18.1.1:3478
    tpkp-g 198.18.2.2/24  <--- peer link   --->  tpkp-r 198.18.2.1/24   relay  198.18.2.1

The generator's clients (198.18.1.2) send ChannelData to the server on the client link; the server relays
the payload from its relayed address on the peer link to the generator's peer socket (198.18.2.2). The
XDP reflector stands in for the server at 198.18.3.1:3490, an address that exists only as a route in the
generator's namespace (via the client link, with 198.18.2.2 as the source, so that loadgen --raw binds its
clients and its peer socket there): it rewrites each datagram to 198.18.2.1:3490 -> 198.18.2.2:3491 and
redirects it to the peer link, the path the kernel path takes. The direct baseline sends from the
generator's clients to its own peer socket (198.18.2.2 -> 198.18.2.2, the kernel's loopback): the
generator's own cost, subtracted from the others.

Every veth end in the generator's namespace carries an XDP program that passes every frame, in every
configuration (a veth receives XDP_TX and redirected frames only when its peer runs XDP); their transmit
checksum offload is off (datagrams leave with full UDP checksums, which an XDP program can update), and
IPv4 forwarding is on on the relay's two interfaces (bpf_fib_lookup needs it). The server is pinned to
core 0, the generator to core 1; the generator sleeps until its next datagram is due (loadgen
--sleep-idle) instead of spinning, because the kernel runs a veth's receive work, XDP included, on the
CPU that sent the frame: work that would replace a spinning generator's loop and escape /proc/stat.
CPU: /proc/stat (user + nice + system + irq + softirq, all CPUs) over the generator's measured window:
the generator starts its traffic at a wall-clock instant (--start-at), and /proc/stat is read when its
window opens (after the warm-up) and when it closes.

Usage (as root): bench_kernel.py [--rounds N] [--quick] [--secs S] [--no-kernel] [--out PATH] ...
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_compare import STEAL_MS, STALL_US, fmt, median, ratio  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
LOADGEN = os.path.join(TARGET, "release/loadgen")
TURNPIKE = os.path.join(TARGET, "release/turnpike")
WORK = os.path.join(TARGET, "bench-kernel")
SECRET = "bench-kernel-path-secret-0123456789"  # turnpike refuses secrets under 16 bytes

NS_GEN, NS_RELAY = "tpk-gen", "tpk-relay"
# (generator end, relay end, generator address, relay address) of each link, /24 each.
CLIENT_LINK = ("tpkc-g", "tpkc-r", "198.18.1.2", "198.18.1.1")
PEER_LINK = ("tpkp-g", "tpkp-r", "198.18.2.2", "198.18.2.1")
SERVER_PORT = 3478
REFLECT_ADDR, REFLECT_PORT = "198.18.3.1", 3490  # the reflector's address: a route in the generator's namespace
PEER_PORT = 3491  # the generator's peer socket in --raw runs (direct baseline, reflector)
RELAY_PORTS = (20000, 29999)  # below the ephemeral range

CONFIGS = ["direct", "coturn", "turnpike", "turnpike-kernel", "xdp-reflector"]
LOSS_FREE = 0.001  # loss <= 0.1 % counts as loss-free
LATE_START_MS = 20  # a generator that started its traffic later than this missed the /proc/stat window
NOISE_SHARE = 0.05  # other processes used more than this share of the machine in the window: repeated


def sh(*cmd, check=True, ns=None):
    """Runs a command (in network namespace `ns`), returns its stdout."""
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    out = subprocess.run(full, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(full), out.stderr.strip()))
    return out.stdout


def ip_int(addr):
    a, b, c, d = (int(x) for x in addr.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def build_bpf(out_ifindex=None, incremental=True):
    """The pass-all program (generator side) and the reflector, compiled with the addresses of this
    topology and (once the network is up) the index of the relay's peer-link interface, where its FIB
    lookup starts; returns their object paths."""
    os.makedirs(WORK, exist_ok=True)
    src = os.path.join(HERE, "xdp-reflector.c")
    pass_o, refl_o = os.path.join(WORK, "xdp-pass.o"), os.path.join(WORK, "xdp-reflector.o")
    base = ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-c", src]
    subprocess.run(base + ["-DPASS_ONLY", "-o", pass_o], check=True)
    defines = {"REFLECT_ADDR": hex(ip_int(REFLECT_ADDR)), "REFLECT_PORT": REFLECT_PORT,
               "NEW_SADDR": hex(ip_int(PEER_LINK[3])), "NEW_SPORT": REFLECT_PORT,
               "NEW_DADDR": hex(ip_int(PEER_LINK[2])), "NEW_DPORT": PEER_PORT}
    if out_ifindex is not None:
        defines["OUT_IFINDEX"] = out_ifindex
    if incremental:
        defines["UDP_CSUM_INCREMENTAL"] = 1
    subprocess.run(base + ["-D%s=%s" % kv for kv in defines.items()] + ["-o", refl_o], check=True)
    return pass_o, refl_o


def network_down():
    """Removes both namespaces (and with them the veth pairs)."""
    for ns in (NS_GEN, NS_RELAY):
        sh("ip", "netns", "del", ns, check=False)


def mac(ns, dev):
    return json.loads(sh("ip", "-j", "-n", ns, "link", "show", "dev", dev))[0]["address"]


# Sets one of a device's offloads through SIOCETHTOOL (ethtool itself need not be installed), run with
# `python3 -c` in the device's namespace: argv DEVICE COMMAND VALUE.
ETHTOOL_SET = """
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", int(sys.argv[2]), int(sys.argv[3])), 8)  # ethtool_value
ifreq = struct.pack("16sP16x", sys.argv[1].encode(), ctypes.addressof(value))  # struct ifreq, ifr_data
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(sock.fileno(), 0x8946, ifreq)  # SIOCETHTOOL
"""
ETHTOOL_STXCSUM, ETHTOOL_SGRO = 0x17, 0x2c


def tx_csum_off(ns, dev):
    """Transmit checksum offload off on `dev`: datagrams of local sockets then leave with their UDP
    checksum computed, not as CHECKSUM_PARTIAL (a partial sum an XDP program on the far end would update
    incrementally into a wrong one: the receiver drops them, UdpInCsumErrors)."""
    sh("python3", "-c", ETHTOOL_SET, dev, ETHTOOL_STXCSUM, 0, ns=ns)


def relay_napi_threaded():
    """--napi-threaded: every veth end receives in a NAPI thread of its own (GRO on on the relay's ends,
    so that they receive through NAPI with or without an XDP program; the generator's carry one), instead
    of in the softirq of the CPU that sent the frame. `pin_napi_threads` puts the relay's ends' threads on
    core 0 and the generator's on core 1: then everything the relay's side costs (its receive, the XDP
    program, its sends) is on core 0 and everything the generator's side costs on core 1, whichever CPU
    sent a frame, and core 0's share of /proc/stat is the relay's cost (`relay core` in the report; ~0 in
    the direct baseline). veth has no interrupt moderation: a thread is woken for nearly every datagram
    at these rates, the same for every configuration."""
    for ns, dev in ((NS_RELAY, CLIENT_LINK[1]), (NS_RELAY, PEER_LINK[1]), (NS_GEN, CLIENT_LINK[0]), (NS_GEN, PEER_LINK[0])):
        if ns == NS_RELAY:
            sh("python3", "-c", ETHTOOL_SET, dev, ETHTOOL_SGRO, 1, ns=ns)
        sh("sh", "-c", "echo 1 > /sys/class/net/%s/threaded" % dev, ns=ns)


def rx_moderation(usecs):
    """--rx-usecs N: interrupt moderation for the veth ends, as a NIC's rx-usecs: after a poll a NAPI
    instance is not woken by the next frame but polled again by a timer N microseconds later
    (gro_flush_timeout, with napi_defer_hard_irqs), so that it takes the frames of N us in one go. veth
    has no interrupt of its own to moderate: without this a NAPI thread wakes for nearly every datagram."""
    for ns, dev in ((NS_RELAY, CLIENT_LINK[1]), (NS_RELAY, PEER_LINK[1]), (NS_GEN, CLIENT_LINK[0]), (NS_GEN, PEER_LINK[0])):
        sh("sh", "-c", "echo %d > /sys/class/net/%s/gro_flush_timeout && echo 2 > /sys/class/net/%s/napi_defer_hard_irqs"
           % (usecs * 1000, dev, dev), ns=ns)


def pin_napi_threads():
    """Pins the NAPI threads of the relay's veth ends to core 0 and the generator's to core 1; returns
    their names."""
    names = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith(("napi/%s" % CLIENT_LINK[1], "napi/%s" % PEER_LINK[1])):
            os.sched_setaffinity(int(pid), {0})
            names.append(comm)
        elif comm.startswith(("napi/%s" % CLIENT_LINK[0], "napi/%s" % PEER_LINK[0])):
            os.sched_setaffinity(int(pid), {1})
            names.append(comm)
    return sorted(names)


def ifindex(ns, dev):
    return json.loads(sh("ip", "-j", "-n", ns, "link", "show", "dev", dev))[0]["ifindex"]


def network_up(pass_o, forwarding, tx_csum, napi_threaded, rx_usecs=0):
    """Builds the topology of the module's docstring; XDP pass on the generator's veth ends; with
    `forwarding`, IPv4 forwarding on on the relay's two interfaces (bpf_fib_lookup answers
    BPF_FIB_LKUP_RET_FWD_DISABLED on an interface without it, whatever its flags)."""
    network_down()
    for ns in (NS_GEN, NS_RELAY):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        for key in ("all", "default"):
            sh("sysctl", "-qw", "net.ipv4.conf.%s.rp_filter=0" % key, ns=ns)
    for g, r, g_addr, r_addr in (CLIENT_LINK, PEER_LINK):
        sh("ip", "link", "add", g, "netns", NS_GEN, "type", "veth", "peer", "name", r, "netns", NS_RELAY)
        sh("ip", "-n", NS_GEN, "addr", "add", g_addr + "/24", "dev", g)
        sh("ip", "-n", NS_RELAY, "addr", "add", r_addr + "/24", "dev", r)
        sh("ip", "-n", NS_GEN, "link", "set", g, "up")
        sh("ip", "-n", NS_RELAY, "link", "set", r, "up")
        # Neighbours fixed up front: no ARP in any configuration (an XDP program's FIB lookup needs them).
        sh("ip", "-n", NS_GEN, "neigh", "replace", r_addr, "lladdr", mac(NS_RELAY, r), "dev", g, "nud", "permanent")
        sh("ip", "-n", NS_RELAY, "neigh", "replace", g_addr, "lladdr", mac(NS_GEN, g), "dev", r, "nud", "permanent")
        sh("ip", "-n", NS_GEN, "link", "set", "dev", g, "xdp", "obj", pass_o, "sec", "xdp")
        if not tx_csum:
            tx_csum_off(NS_GEN, g)
        sh("sysctl", "-qw", "net.ipv4.conf.%s.forwarding=%d" % (r, 1 if forwarding else 0), ns=NS_RELAY)
    if napi_threaded:
        relay_napi_threaded()
    if rx_usecs:
        rx_moderation(rx_usecs)
    # The reflector's address: reached over the client link, from the generator's peer-link address.
    sh("ip", "-n", NS_GEN, "route", "add", REFLECT_ADDR + "/32", "via", CLIENT_LINK[3], "dev", CLIENT_LINK[0],
       "src", PEER_LINK[2])


def xdp_attached(ns, dev):
    """The XDP program id on `dev`, or None."""
    info = json.loads(sh("ip", "-j", "-d", "-n", ns, "link", "show", "dev", dev))[0]
    xdp = info.get("xdp") or {}
    prog = xdp.get("prog") or {}
    if "id" in prog:
        return prog["id"]
    progs = xdp.get("attached") or []
    return progs[0].get("prog", {}).get("id") if progs else None


def relay_xdp():
    return {dev: xdp_attached(NS_RELAY, dev) for dev in (CLIENT_LINK[1], PEER_LINK[1])}


def turnpike_yaml(kernel, args):
    runtime = "threads: 1"
    if args.kernel_supported:
        runtime += ", kernel_path: %s" % ("on" if kernel else "off")
        if kernel and args.kernel_interfaces:
            runtime += ", kernel_interfaces: [%s, %s]" % (CLIENT_LINK[1], PEER_LINK[1])
    return ("listen: {ips: [%s], port: %d, tcp: false}\n" % (CLIENT_LINK[3], SERVER_PORT) +
            "relay: {ips: [%s], min_port: %d, max_port: %d}\n" % (PEER_LINK[3], RELAY_PORTS[0], RELAY_PORTS[1]) +
            "auth: {realm: bench, shared_secrets: [%s]}\n" % SECRET +
            "peers: {allowed: [%s]}\n" % PEER_LINK[2] +
            "abuse: {unauth_rate: 0}\n" +
            "runtime: {%s}\n" % runtime +
            "logging: {level: warn}\n")


def coturn_cmd():
    """coturn as bench-compare runs it (1 relay thread, REST credentials, UDP only, no logging), listening on
    the client link and relaying from the peer link, the generator's peer range allowed."""
    return ["turnserver", "-n", "--listening-ip=" + CLIENT_LINK[3], "--listening-port=%d" % SERVER_PORT,
            "--relay-ip=" + PEER_LINK[3], "--min-port=%d" % RELAY_PORTS[0], "--max-port=%d" % RELAY_PORTS[1],
            "--use-auth-secret", "--static-auth-secret=" + SECRET, "--realm=bench",
            "--allowed-peer-ip=" + PEER_LINK[2], "--no-cli", "--no-tls", "--no-dtls", "--no-tcp",
            "--relay-threads=1", "--no-stdout-log", "--log-file=/dev/null",
            "--pidfile=" + os.path.join(WORK, "coturn.pid")]


class Server:
    """One configuration's relay, freshly started: a process (coturn, turnpike), the XDP reflector
    attached to the relay's client-link end, or nothing (direct)."""

    def __init__(self, name, args, refl_o):
        self.name, self.proc, self.refl = name, None, False
        self.xdp = None
        if name in ("coturn", "turnpike", "turnpike-kernel"):
            if name == "coturn":
                cmd = coturn_cmd()
            else:
                path = os.path.join(WORK, "%s.yaml" % name)
                with open(path, "w") as f:
                    f.write(turnpike_yaml(name == "turnpike-kernel", args))
                cmd = [TURNPIKE, "--config", path]
            self.log = os.path.join(WORK, "%s.stderr" % name)
            with open(self.log, "wb") as log:
                # ip netns exec and taskset exec the server: the PID is the server's.
                self.proc = subprocess.Popen(["ip", "netns", "exec", NS_RELAY, "taskset", "-c", "0"] + cmd,
                                             stdout=subprocess.DEVNULL, stderr=log)
            time.sleep(1.0)
            self.require_running()
            self.xdp = relay_xdp()
            if name == "turnpike-kernel" and not self.xdp[CLIENT_LINK[1]]:
                print("  warning: turnpike with kernel_path: on attached no XDP program to %s (%s)"
                      % (CLIENT_LINK[1], self.xdp), file=sys.stderr)
        elif name == "xdp-reflector":
            sh("ip", "-n", NS_RELAY, "link", "set", "dev", CLIENT_LINK[1], "xdp", "obj", refl_o, "sec", "xdp")
            self.refl = True
            self.xdp = relay_xdp()

    def require_running(self):
        if self.proc is None or self.proc.poll() is None:
            return
        with open(self.log, errors="replace") as f:
            tail = f.read()[-800:]
        raise RuntimeError("%s exited (code %s):\n%s" % (self.name, self.proc.returncode, tail))

    def stop(self):
        """Stops what start made (by PID), and removes any XDP program left on the relay's interfaces,
        so that the next configuration starts clean; returns a note when one was left."""
        note = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = {dev: prog for dev, prog in relay_xdp().items() if prog}
        if left and not self.refl:
            note = "%s left XDP programs attached: %s" % (self.name, left)
        for dev in left:
            sh("ip", "-n", NS_RELAY, "link", "set", "dev", dev, "xdp", "off", check=False)
        return note


def proc_stat():
    """/proc/stat's all-CPU and per-CPU lines: name -> [user, nice, system, idle, iowait, irq, softirq,
    steal, ...] in clock ticks; and "processes" -> [forks since boot]."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(("cpu", "processes")):
                parts = line.split()
                out[parts[0]] = [int(x) for x in parts[1:]]
    return out


FIELDS = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
BUSY = ("user", "nice", "system", "irq", "softirq")


def stat_delta(a, b):
    tick = os.sysconf("SC_CLK_TCK")
    return {cpu: {f: (b[cpu][i] - a[cpu][i]) / tick for i, f in enumerate(FIELDS)}
            for cpu in a if cpu in b and cpu.startswith("cpu")}


def other_cpu(ours):
    """CPU seconds (user + system) used so far by every process but `ours` and kernel threads (whose
    work, softirq among it, belongs to the measurement): pid -> seconds. Processes that start and end
    inside the window escape it; a noise indicator, not a correction."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in ours:
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def sleep_until(t):
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def loadgen_run(name, server, rate, args):
    """One generator run against `server`'s configuration at `rate`, with /proc/stat read over its
    measured window; the generator's JSON line plus the whole-machine figures."""
    cmd = ["ip", "netns", "exec", NS_GEN, "taskset", "-c", "1", LOADGEN, "--secret", SECRET,
           "--allocations", args.allocations, "--size", args.size, "--rate", rate, "--duration", args.secs,
           "--warmup", args.warmup] + ([] if args.spin else ["--sleep-idle"])
    if name == "direct":
        cmd += ["--raw", "%s:%d" % (PEER_LINK[2], PEER_PORT), "--peer-port", PEER_PORT]
    elif name == "xdp-reflector":
        cmd += ["--raw", "%s:%d" % (REFLECT_ADDR, REFLECT_PORT), "--peer-port", PEER_PORT]
    else:
        cmd += ["--server", "%s:%d" % (CLIENT_LINK[3], SERVER_PORT), "--server-pid", server.proc.pid]
    napi = pin_napi_threads()
    start_at = time.time() + args.lead
    cmd += ["--start-at", "%.3f" % start_at]
    gen = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # ip netns exec and taskset exec the generator: its PID. A 1-us timer slack (default 50 us), so
        # that --sleep-idle wakes when the next datagram is due.
        with open("/proc/%d/timerslack_ns" % gen.pid, "w") as f:
            f.write("1000")
    except OSError:
        pass
    ours = {os.getpid(), gen.pid} | ({server.proc.pid} if server.proc else set())
    win_open = start_at + args.warmup
    win_close = win_open + args.secs
    try:
        sleep_until(win_open - 0.15)
        others0 = other_cpu(ours)
        sleep_until(win_open)
        t0, s0 = time.time(), proc_stat()
        sleep_until(win_close)
        t1, s1 = time.time(), proc_stat()
        others1 = other_cpu(ours)
        out, err = gen.communicate(timeout=args.lead + args.warmup + args.secs + 60)
    except BaseException:
        gen.kill()
        gen.wait()
        raise
    if not out.strip():
        return {"error": err.strip()[-400:] or "no output (exit %d)" % gen.returncode}
    try:
        r = json.loads(out.strip().splitlines()[-1])
    except json.JSONDecodeError:
        return {"error": err.strip()[-400:]}
    d = stat_delta(s0, s1)
    wall = t1 - t0
    scale = args.secs / wall if wall > 0 else float("nan")  # the stat window to the generator's length
    packets = r["delivered_pps"] * args.secs
    busy = sum(d["cpu"][f] for f in BUSY)
    r["stat_window_s"] = round(wall, 4)
    r["stat_late_ms"] = round((t0 - win_open) * 1000, 1)
    r["machine_cpu_s"] = round(busy * scale, 4)
    r["machine_softirq_s"] = round(d["cpu"]["softirq"] * scale, 4)
    r["machine_steal_s"] = round(d["cpu"]["steal"] * scale, 4)
    r["per_cpu_busy_s"] = {cpu: round(sum(v[f] for f in BUSY) * scale, 3) for cpu, v in d.items() if cpu != "cpu"}
    r["machine_us_per_packet"] = busy * scale * 1e6 / packets if packets else float("nan")
    r["softirq_us_per_packet"] = d["cpu"]["softirq"] * scale * 1e6 / packets if packets else float("nan")
    # Core 0's share: the relay's whole cost when every NAPI thread is pinned (--napi-threaded).
    core0 = d.get("cpu0")
    r["relay_core_us_per_packet"] = (sum(core0[f] for f in BUSY) * scale * 1e6 / packets
                                     if packets and core0 else float("nan"))
    r["other_cpu_s"] = round(sum(v - others0[p] for p, v in others1.items() if p in others0), 3)
    # Processes started in the window (the benchmark starts none there): someone else's (a build's),
    # whose CPU other_cpu_s misses when they end inside it.
    r["forks_in_window"] = s1["processes"][0] - s0["processes"][0]
    r["napi_threads_core0"] = napi
    # The generator's core: busy the whole window (it busy-polls), or work there went unseen.
    r["generator_core_busy_share"] = round(r["per_cpu_busy_s"].get("cpu1", 0) / args.secs, 3)
    return r


def repeat_reason(r, args):
    """Why run `r` did not measure its configuration (and is repeated), or None."""
    if not r.get("generator_saturated") and r.get("generator_max_lag_us", 0) > STALL_US:
        return "generator %d ms behind" % (r["generator_max_lag_us"] // 1000)
    steal = r.get("steal_ms", [])[:2]
    if steal and max(steal) >= STEAL_MS:
        return "%d ms stolen by the hypervisor" % max(steal)
    if r.get("late_start_ms", 0) > LATE_START_MS:
        return "generator started %d ms late (window misaligned)" % r["late_start_ms"]
    if abs(r.get("stat_late_ms", 0)) > LATE_START_MS:
        return "/proc/stat read %d ms late" % r["stat_late_ms"]
    if r.get("other_cpu_s", 0) > NOISE_SHARE * args.secs * os.cpu_count():
        return "other processes used %.2f CPU-s in the window" % r["other_cpu_s"]
    if r.get("forks_in_window", 0) > 0:
        return "%d processes started in the window (someone else's)" % r["forks_in_window"]
    return None


REPEATS = []
NOTES = []


def run_one(name, rate, args, refl_o):
    """A freshly started configuration and one generator run, repeated (at most twice) when the run did
    not measure it (repeat_reason)."""
    for attempt in range(3):
        server = Server(name, args, refl_o)
        try:
            r = loadgen_run(name, server, rate, args)
            server.require_running()
        finally:
            note = server.stop()
        if note:
            NOTES.append(note)
            print("  note: " + note, file=sys.stderr)
        if server.xdp is not None:
            r["relay_xdp"] = server.xdp
        if "error" in r:
            raise RuntimeError("the load generator failed against %s at %d pps: %s" % (name, rate, r["error"]))
        reason = repeat_reason(r, args)
        if reason is None or attempt == 2:
            if reason:
                r["unclean"] = reason
            return r
        REPEATS.append({"config": name, "rate": rate, "reason": reason, **r})
        print("  repeat %-15s %6d pps: %s" % (name, rate, reason), file=sys.stderr)
        time.sleep(2)  # let a burst of other work pass
    return r


def lossy(r):
    return r.get("loss", 1.0) > LOSS_FREE or r.get("generator_saturated", False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rotating rounds (medians reported; default 3)")
    p.add_argument("--quick", action="store_true", help="1 round, 1 s windows, a short rate ladder")
    p.add_argument("--secs", type=float, help="measured seconds per run (default 2, --quick 1)")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--lead", type=float, default=1.5, help="seconds from the generator's start to its traffic")
    p.add_argument("--allocations", type=int, default=10)
    p.add_argument("--size", type=int, default=172)
    p.add_argument("--rates", default="50000,100000", help="the fixed rates of the CPU table")
    p.add_argument("--ladder", help="rates above the fixed ones tried in the loss-free search "
                   "(default 150k-400k by 50k, --quick 200k,300k)")
    p.add_argument("--max-minutes", type=float, default=40, help="no further search steps after this")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--no-kernel", action="store_true", help="skip turnpike-kernel")
    p.add_argument("--kernel-interfaces", action="store_true",
                   help="name the relay's interfaces in runtime.kernel_interfaces (default: the server finds them)")
    p.add_argument("--no-forwarding", action="store_true",
                   help="leave IPv4 forwarding off on the relay's interfaces (the reflector then passes all)")
    p.add_argument("--keep-tx-csum", action="store_true",
                   help="leave transmit checksum offload on on the generator's veth ends (its datagrams then carry "
                   "partial UDP checksums; the reflector sets them to 0 instead of updating them)")
    p.add_argument("--spin", action="store_true",
                   help="let the generator busy-poll its core as in bench-compare (then the kernel's work on that "
                   "core replaces spinning and escapes /proc/stat: not for the CPU figures)")
    p.add_argument("--no-napi-threaded", dest="napi_threaded", action="store_false",
                   help="leave veth receive in the softirq of the sending CPU (the default puts every veth end's receive "
                   "in a NAPI thread, the relay's on core 0 and the generator's on core 1: see relay_napi_threaded)")
    p.add_argument("--rx-usecs", type=int, default=50, help="interrupt moderation on every veth end, as a NIC's "
                   "rx-usecs (see rx_moderation; default 50, 0: off)")
    p.add_argument("--out", help="result file (default bench/results/kernel-<rev>.json)")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-kernel: run as root (network namespaces, XDP)")
    if args.quick:
        args.rounds = 1
    args.secs = args.secs or (1.0 if args.quick else 2.0)
    fixed = [int(x) for x in args.rates.split(",")]
    ladder = [int(x) for x in args.ladder.split(",")] if args.ladder else (
        [200000, 300000] if args.quick else list(range(150000, 450000, 50000)))
    ladder = sorted(set(fixed) | {x for x in ladder if x > max(fixed)})
    args.kernel_supported = os.environ.get("BENCH_KERNEL_PATH") == "1"
    configs = [c for c in args.configs.split(",") if c]
    if "turnpike-kernel" in configs and (args.no_kernel or not args.kernel_supported):
        print("bench-kernel: skipping turnpike-kernel (%s)" % (
            "--no-kernel" if args.no_kernel else "turnpike was built without the kernel-path feature"), file=sys.stderr)
        configs.remove("turnpike-kernel")
    if "direct" not in configs:
        configs.insert(0, "direct")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    deadline = time.time() + args.max_minutes * 60
    pass_o, _ = build_bpf()
    runs = []
    try:
        network_up(pass_o, not args.no_forwarding, args.keep_tx_csum, args.napi_threaded, args.rx_usecs)
        _, refl_o = build_bpf(ifindex(NS_RELAY, PEER_LINK[1]), incremental=not args.keep_tx_csum)
        k = 0
        for rnd in range(args.rounds):
            active = list(configs)
            active = [n for n in active if n in configs]
            for rate in ladder:
                if rate not in fixed and time.time() > deadline:
                    print("  search stopped: past --max-minutes", file=sys.stderr)
                    break
                if not active:
                    break
                for name in active[k % len(active):] + active[:k % len(active)]:
                    try:
                        r = run_one(name, rate, args, refl_o)
                    except RuntimeError as e:
                        if name != "turnpike-kernel":
                            raise
                        # The configuration under development: the others still measure.
                        NOTES.append("turnpike-kernel dropped at %d pps: %s" % (rate, e))
                        print("  turnpike-kernel failed, dropped from the run: %s" % e, file=sys.stderr)
                        configs.remove(name)
                        continue
                    r.update(config=name, round=rnd, target=rate)
                    runs.append(r)
                    print("  r%d %-15s %6d pps: machine %.2f us/pkt (softirq %.2f; cores %s), loss %.3f %%, "
                          "other %.2f s, forks %d%s" % (
                              rnd, name, rate, r["machine_us_per_packet"], r["softirq_us_per_packet"],
                              "/".join("%.2f" % v for _, v in sorted(r["per_cpu_busy_s"].items())), r["loss"] * 100,
                              r["other_cpu_s"], r["forks_in_window"], (", " + r["unclean"]) if "unclean" in r else ""),
                          file=sys.stderr)
                k += 1
                # Every configuration runs at every fixed rate; from the highest fixed rate on, one leaves
                # the search at its first lossy run of the round.
                active = [n for n in active if n in configs and (rate < max(fixed) or not any(
                    lossy(x) for x in runs if x["config"] == n and x["round"] == rnd))]
    finally:
        network_down()
    report(runs, configs, fixed, ladder, args, rev, dirty)


def relay_core_verdict(v, target):
    """A relay-core ratio with its verdict against `target` (the acceptance's bound), if any."""
    if v is None or target is None:
        return fmt(v)
    return "%s (<= %.1f: %s)" % (fmt(v), target, "met" if v <= target else "NOT met")


def report(runs, configs, fixed, ladder, args, rev, dirty):
    def at(name, rate):
        return [r for r in runs if r["config"] == name and r["target"] == rate]

    # Net CPU: minus the direct baseline of the same round and rate.
    for r in runs:
        base = [b for b in runs if b["config"] == "direct" and b["round"] == r["round"] and b["target"] == r["target"]]
        if base:
            r["net_us_per_packet"] = r["machine_us_per_packet"] - base[0]["machine_us_per_packet"]
    table = {}
    for rate in fixed:
        for name in configs:
            rs = at(name, rate)
            if not rs:
                continue
            med = lambda key: median([r[key] for r in rs if r.get(key) is not None and r[key] == r[key]])
            table[(name, rate)] = {
                "machine_us_per_packet": med("machine_us_per_packet"),
                "net_us_per_packet": med("net_us_per_packet"),
                "softirq_us_per_packet": med("softirq_us_per_packet"),
                "relay_core_us_per_packet": med("relay_core_us_per_packet"),
                "process_us_per_packet": med("cpu_us_per_packet") if name not in ("direct", "xdp-reflector") else None,
                "loss_worst": max(r["loss"] for r in rs),
                "offered_pps": med("offered_pps"),
                "other_cpu_s_max": max(r["other_cpu_s"] for r in rs),
                "unclean_runs": sum(1 for r in rs if "unclean" in r),
                "rounds": len(rs),
            }
    best = {}
    for name in configs:
        per_round = []
        for rnd in range(args.rounds):
            ok = None
            for rate in ladder:
                rs = [r for r in runs if r["config"] == name and r["round"] == rnd and r["target"] == rate]
                if not rs:
                    break
                if lossy(rs[0]):
                    break
                ok = rate
            limited = ok is not None and ok == max(
                [r["target"] for r in runs if r["config"] == name and r["round"] == rnd] or [0]) and not any(
                lossy(r) for r in runs if r["config"] == name and r["round"] == rnd)
            per_round.append({"rate": ok, "top_of_ladder": limited})
        best[name] = per_round

    lines = []
    lines.append("Machine: %s, %d CPUs; turnpike %s%s; server pinned to core 0, generator to core 1; %d allocations, "
                 "%d B; %.1f s measured per run; %d rotating round(s) (medians, worst loss)."
                 % (platform.platform(), os.cpu_count(), rev, " (dirty tree)" if dirty else "", args.allocations,
                    args.size, args.secs, args.rounds))
    lines.append("")
    lines.append("machine: whole-machine CPU (/proc/stat user+nice+system+irq+softirq, all CPUs) per relayed "
                 "packet; net: minus the direct baseline of the same round; process: the server process's own "
                 "CPU (/proc/PID), shown to make the point that it misses the kernel's work.")
    lines.append("")
    lines.append("| rate | config | machine us/pkt | net us/pkt | relay core us/pkt | softirq us/pkt | process us/pkt | loss (worst) | unclean runs |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for rate in fixed:
        for name in configs:
            t = table.get((name, rate))
            if not t:
                continue
            lines.append("| %dk | %s | %s | %s | %s | %s | %s | %s %% | %s |" % (
                rate // 1000, name, fmt(t["machine_us_per_packet"]),
                "-" if name == "direct" else fmt(t["net_us_per_packet"]), fmt(t["relay_core_us_per_packet"]),
                fmt(t["softirq_us_per_packet"]),
                fmt(t["process_us_per_packet"]), fmt(t["loss_worst"] * 100, 3),
                "%d of %d" % (t["unclean_runs"], t["rounds"])))
    lines.append("")
    pairs = [("turnpike-kernel", "turnpike", 0.5), ("turnpike-kernel", "xdp-reflector", 1.5),
             ("turnpike", "coturn", None), ("xdp-reflector", "turnpike", None)]
    lines.append("| rate | ratio (net, medians) | value | target | ratio (machine) | ratio (relay core) |")
    lines.append("|---|---|---|---|---|---|")
    for rate in fixed:
        for a, b, target in pairs:
            ta, tb = table.get((a, rate)), table.get((b, rate))
            if not ta or not tb:
                continue
            v = ratio(ta["net_us_per_packet"], tb["net_us_per_packet"])
            verdict = "" if target is None or v is None else (" <= %.1f: %s" % (target, "met" if v <= target else "NOT met"))
            lines.append("| %dk | %s / %s | %s | %s | %s | %s |" % (rate // 1000, a, b, fmt(v), verdict.strip() or "-",
                         fmt(ratio(ta["machine_us_per_packet"], tb["machine_us_per_packet"])),
                         relay_core_verdict(ratio(ta["relay_core_us_per_packet"], tb["relay_core_us_per_packet"]), target)))
    lines.append("")
    lines.append("Highest loss-free rate (loss <= %.1f %%, generator keeping its schedule; rates tried: %s), per round:"
                 % (LOSS_FREE * 100, ", ".join("%dk" % (x // 1000) for x in ladder)))
    lines.append("")
    lines.append("| config | per round | lowest |")
    lines.append("|---|---|---|")
    for name in configs:
        rounds = best[name]
        show = lambda b: "below %dk" % (ladder[0] // 1000) if b["rate"] is None else (
            "%dk%s" % (b["rate"] // 1000, "+" if b["top_of_ladder"] else ""))
        lowest = min(rounds, key=lambda b: b["rate"] or 0) if rounds else None
        lines.append("| %s | %s | %s |" % (name, ", ".join(show(b) for b in rounds), show(lowest) if lowest else "n/a"))
    lines.append("")
    lines.append("(+: the top of the ladder, or the search stopped by --max-minutes, was loss-free.)")
    lines.append("Runs repeated (generator stall, steal, late window, other processes busy): %d%s." % (
        len(REPEATS), "".join("; %s at %dk: %s" % (x["config"], x["rate"] // 1000, x["reason"]) for x in REPEATS)))
    unclean = [r for r in runs if "unclean" in r]
    if unclean:
        lines.append("Kept after three attempts although unclean: %s." % "; ".join(
            "%s at %dk: %s" % (r["config"], r["target"] // 1000, r["unclean"]) for r in unclean))
    for note in NOTES:
        lines.append("Note: " + note)
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or os.path.join(ROOT, "bench/results/kernel-%s.json" % (rev or "unknown"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "rev": rev, "dirty": dirty,
              "args": {k2: v for k2, v in vars(args).items()}, "configs": configs, "fixed_rates": fixed,
              "ladder": ladder, "table": {"%s/%d" % k2: v for k2, v in table.items()}, "best_loss_free": best,
              "repeated": REPEATS, "notes": NOTES, "runs": runs, "report": text}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote %s" % os.path.relpath(out, ROOT) if out.startswith(ROOT) else "wrote %s" % out)


if __name__ == "__main__":
    main()
