#!/usr/bin/env bash
# Runs turnpike's whole test suite on a fresh Debian machine with Rust: installs the third-party
# clients the interop tests drive (Debian's coturn for turnutils_uclient/turnutils_peer, aioice from
# PyPI), cargo-deny, cargo-fuzz, cargo-deb and lintian, then checks formatting, lints, docs, runs every
# test, fuzzes each target briefly (TURNPIKE_FUZZ_SECS, default 10; scripts/ci/fuzz.sh for longer
# runs) and, as root, builds, installs and purges the Debian package. Every stage runs; the last line
# says which passed and which failed, with the test counts, and the exit status is non-zero if any
# failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v turnutils_uclient >/dev/null 2>&1; then
    echo "==> installing coturn (for turnutils_uclient / turnutils_peer)"
    as_root apt-get update -qq
    # policy-rc.d-less machines would start coturn's own service on 3478; tests use other ports,
    # and the service is stopped again right after.
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends coturn >/dev/null
    as_root systemctl stop coturn >/dev/null 2>&1 || true
fi
if ! command -v openssl >/dev/null 2>&1 || ! command -v lintian >/dev/null 2>&1; then
    echo "==> installing openssl (certificates for the TLS smoke runs) and lintian (the .deb)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends openssl lintian >/dev/null
fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v haproxy >/dev/null 2>&1 \
    || ! command -v nginx >/dev/null 2>&1 || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ] \
    || ! command -v chromium >/dev/null 2>&1; then
    echo "==> installing redis-server, nginx (with its stream module), haproxy and chromium (the tests start their own)"
    as_root apt-get update -qq
    # The packages' own services are not wanted: policy-rc.d keeps them from being started.
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        redis-server nginx libnginx-mod-stream haproxy chromium >/dev/null
    [ -n "$policy_added" ] && as_root rm -f /usr/sbin/policy-rc.d
    for service in redis-server nginx haproxy; do as_root systemctl stop "$service" >/dev/null 2>&1 || true; done
fi
if ! command -v clang >/dev/null 2>&1 || [ ! -e /usr/include/bpf/bpf_helpers.h ] || ! command -v ethtool >/dev/null 2>&1; then
    echo "==> installing clang and libbpf-dev (the kernel path's XDP program), ethtool and iproute2 (its tests)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        clang libbpf-dev linux-libc-dev ethtool iproute2 >/dev/null
fi
if ! python3 -c "import aioice" >/dev/null 2>&1; then
    echo "==> installing aioice (Python TURN client)"
    python3 -m pip install --quiet --disable-pip-version-check aioice 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages aioice
fi

export TURNPIKE_REQUIRE_INTEROP=1 TURNPIKE_REQUIRE_REDIS=1 TURNPIKE_REQUIRE_PROXIES=1 TURNPIKE_REQUIRE_BROWSER=1
# Where this machine lets the tests open a raw socket (CAP_NET_RAW) and a network namespace, the tests
# of the raw-socket send path (runtime.raw_send) must run rather than skip.
if python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)" 2>/dev/null; then
    export TURNPIKE_REQUIRE_RAW=1
fi
if unshare --net true 2>/dev/null; then export TURNPIKE_REQUIRE_NETNS=1; fi
# Where this machine attaches an XDP program in a network namespace of its own (root, BPF allowed),
# the kernel path's tests (tests/kernel_path.rs) must run rather than skip.
xdp_probe="$(mktemp -d)"
printf '#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\nSEC("xdp") int pass(struct xdp_md *c) { return XDP_PASS; }\nchar l[] SEC("license") = "GPL";\n' >"$xdp_probe/pass.c"
if clang -O2 -target bpf -I"/usr/include/$(uname -m)-linux-gnu" -c "$xdp_probe/pass.c" -o "$xdp_probe/pass.o" 2>/dev/null \
    && unshare --net ip link set dev lo xdpgeneric obj "$xdp_probe/pass.o" sec xdp 2>/dev/null; then
    export TURNPIKE_REQUIRE_KERNEL_PATH=1
else
    echo "==> this machine does not attach XDP programs: the kernel path's tests skip"
fi
rm -rf "$xdp_probe"
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "==> installing cargo-deny (licenses, bans and sources of the dependency tree)"
    cargo install cargo-deny --locked --quiet
fi
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "==> installing cargo-deb (the Debian package)"
    cargo install cargo-deb --locked --quiet
fi

# Each stage's output goes to the terminal and to a log; its verdict (and, for cargo test, its counts)
# to the summary.
log_dir="$(mktemp -d)"
summary=()
failed=0
stage() { # NAME COMMAND...
    local name="$1"; shift
    echo "==> $name"
    local log="$log_dir/$(echo "$name" | tr -c 'a-zA-Z0-9' _).log"
    local rc=0
    "$@" 2>&1 | tee "$log" || rc=$?
    local counts
    counts="$(awk '/^test result:/ { p += $4; f += $6 } END { if (p + f > 0) printf " (%d passed, %d failed)", p, f }' "$log")"
    if [ "$rc" -eq 0 ]; then summary+=("$name: ok$counts"); else summary+=("$name: FAILED$counts"); failed=1; fi
}

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
# The kernel path (cargo feature kernel-path: clang compiles its XDP program) linted too; the tests
# below run with it built in (and `runtime.kernel_path: off` everywhere but tests/kernel_path.rs).
stage "cargo clippy (kernel-path)" cargo clippy --workspace --all-targets --locked --quiet --features turnpike/kernel-path -- -D warnings
# Advisories need a database these machines cannot fetch.
stage "cargo deny" cargo deny --log-level error check licenses bans sources
stage "clippy on the fuzz targets" bash -c 'cd fuzz && cargo clippy --all-targets --quiet -- -D warnings'
stage "import cycles" python3 scripts/ci/module-cycles.py
# Private items too: the host is read as a program, and its overview links its internal modules.
stage "cargo doc" env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked --quiet
stage "cargo test" cargo test --workspace --locked --no-fail-fast --features turnpike/kernel-path
# The core's criterion benchmarks, each run once as a test (they check what they measure).
stage "microbenchmarks as tests" cargo test -p turnpike-proto --benches --locked --quiet
# The load generator against turnpike, briefly: correctness only (loss, errors), no timing.
stage "load generator smoke test" bash scripts/ci/bench-smoke.sh
# Bounded fuzzing of every target (codec and stateful engine), replaying fuzz/regressions first.
stage "fuzz (${TURNPIKE_FUZZ_SECS:-10}s per target)" bash scripts/ci/fuzz.sh "${TURNPIKE_FUZZ_SECS:-10}"
# The Debian package: built everywhere, installed and purged where this runs as root.
stage "debian package" bash scripts/ci/deb.sh
rm -rf "$log_dir"

echo
echo "summary: $(IFS=';'; echo "${summary[*]}" | sed 's/;/; /g')"
exit "$failed"
