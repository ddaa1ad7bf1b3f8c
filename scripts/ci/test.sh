#!/usr/bin/env bash
# Runs turnpike's whole test suite on a fresh Debian machine with Rust: installs the third-party
# clients the interop tests drive (Debian's coturn for turnutils_uclient/turnutils_peer, aioice from
# PyPI) and cargo-fuzz, then checks formatting, lints, docs, runs every test, and fuzzes each target
# for a bounded time (TURNPIKE_FUZZ_SECS, default 20).
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
if ! command -v openssl >/dev/null 2>&1; then
    echo "==> installing openssl (certificates for the TLS smoke runs)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi
if ! python3 -c "import aioice" >/dev/null 2>&1; then
    echo "==> installing aioice (Python TURN client)"
    python3 -m pip install --quiet --disable-pip-version-check aioice 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages aioice
fi

export TURNPIKE_REQUIRE_INTEROP=1
# Where this machine lets the tests open a raw socket (CAP_NET_RAW) and a network namespace, the tests
# of the raw-socket send path (runtime.raw_send) must run rather than skip.
if python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)" 2>/dev/null; then
    export TURNPIKE_REQUIRE_RAW=1
fi
if unshare --net true 2>/dev/null; then export TURNPIKE_REQUIRE_NETNS=1; fi
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "==> installing cargo-deny (licenses, bans and sources of the dependency tree)"
    cargo install cargo-deny --locked --quiet
fi
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
echo "==> cargo deny (licenses, bans, sources; advisories need a database these machines cannot fetch)"
cargo deny --log-level error check licenses bans sources
echo "==> clippy on the fuzz targets"
(cd fuzz && cargo clippy --all-targets --quiet -- -D warnings)
echo "==> import cycles between modules"
python3 scripts/ci/module-cycles.py
echo "==> cargo doc"
# Private items too: the host is read as a program, and its overview links its internal modules.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked --quiet
echo "==> cargo test"
cargo test --workspace --locked
# The core's criterion benchmarks, each run once as a test (they check what they measure).
echo "==> microbenchmarks as tests"
cargo test -p turnpike-proto --benches --locked --quiet
# The load generator against turnpike, briefly: correctness only (loss, errors), no timing.
echo "==> load generator smoke test"
bash scripts/ci/bench-smoke.sh
# Bounded fuzzing of every target (codec and stateful engine), replaying fuzz/regressions first.
echo "==> fuzz (${TURNPIKE_FUZZ_SECS:-20}s per target)"
bash scripts/ci/fuzz.sh "${TURNPIKE_FUZZ_SECS:-20}"
