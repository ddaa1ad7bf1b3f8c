#!/usr/bin/env bash
# The kernel path benchmark (bench/README.md, "The kernel path"): whole-machine CPU per relayed packet
# (/proc/stat, softirq included) and the highest loss-free rate of coturn, turnpike in user space,
# turnpike with its XDP kernel path (runtime.kernel_path: on) and a bare XDP reflector (the ceiling),
# against a direct client -> peer baseline, in two network namespaces joined by two veth pairs; in one
# run, rotating order, every configuration freshly started. As root.
# Options (passed to bench_kernel.py): --rounds N (default 3), --quick (1 round, 1 s windows), --secs S,
# --no-kernel, --kernel-interfaces, --configs a,b,..., --rates, --ladder, --max-minutes, --out PATH.
# Builds into $CARGO_TARGET_DIR (default target/): turnpike with --features kernel-path when Cargo.toml
# has that feature (else the kernel configuration is skipped), loadgen; the BPF programs with clang.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-kernel: run as root (network namespaces, XDP)" >&2
    exit 1
fi
for tool in clang ip taskset; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench-kernel: $tool is missing" >&2; exit 1; }
done
if [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
    echo "bench-kernel: /usr/include/bpf/bpf_helpers.h is missing (Debian: apt-get install libbpf-dev)" >&2
    exit 1
fi
if ! command -v turnserver >/dev/null 2>&1; then
    echo "==> installing coturn"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn >/dev/null
    systemctl stop coturn >/dev/null 2>&1 || true
fi
features=()
if grep -q '^kernel-path *=' Cargo.toml; then
    features=(--features turnpike/kernel-path)
    export BENCH_KERNEL_PATH=1
else
    echo "==> turnpike has no kernel-path feature in this tree: the turnpike-kernel configuration is skipped"
    export BENCH_KERNEL_PATH=0
fi
echo "==> building turnpike ${features[*]:-} and loadgen (release)"
cargo build --release --locked -p turnpike -p turnpike-bench "${features[@]}" --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec python3 scripts/bench/bench_kernel.py "$@"
