#!/usr/bin/env bash
# Builds turnpike's Debian package with cargo-deb and, as root, proves it on this machine: lintian has
# no errors; it installs with dpkg; the generated /etc/turnpike/turnpike.yaml passes `turnpike check`;
# the server starts (systemd where it runs, else `turnpike run` as the turnpike user) and relays
# (`turnpike probe`); purge leaves nothing behind. Installs cargo-deb and lintian when missing.
# Usage: scripts/ci/deb.sh [--build-only]
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet

echo "==> release build, man page and completions"
cargo build --release --locked --quiet -p turnpike --features kernel-path
mkdir -p target/assets
target/release/turnpike man | gzip -9n > target/assets/turnpike.1.gz
target/release/turnpike completions bash > target/assets/turnpike.bash
target/release/turnpike completions zsh > target/assets/_turnpike
target/release/turnpike completions fish > target/assets/turnpike.fish
# Stripped: the release profile keeps line tables for backtraces, the package does not need them.
deb="$(cargo deb --no-build --strip --locked -p turnpike 2>/dev/null | tail -1)"
[ -f "$deb" ] || { echo "cargo deb produced no package" >&2; exit 1; }
echo "built $deb"
[ "${1:-}" = "--build-only" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIPPED: installing the package needs root"
    exit 0
fi
if ! command -v lintian >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi

echo "==> lintian"
lintian --fail-on error --tag-display-limit 0 "$deb"

if dpkg -s turnpike >/dev/null 2>&1; then
    echo "turnpike is already installed on this machine: not touching it" >&2
    exit 1
fi
files="$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' | grep -v '/$')"
pid=""
# postinst applies the sysctl drop-in (ephemeral ports out of the relay range): this machine gets its
# own values back afterwards, so that later tests see the kernel as it was.
saved_sysctl="$(sysctl -n net.ipv4.ip_local_port_range net.core.rmem_max net.core.wmem_max 2>/dev/null | tr '\t' ' ')"
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    dpkg -s turnpike >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive dpkg --purge turnpike >/dev/null 2>&1 || true
    if [ -n "$saved_sysctl" ]; then
        {
            read -r range
            read -r rmem
            read -r wmem
        } <<< "$saved_sysctl"
        sysctl -q -w net.ipv4.ip_local_port_range="$range" net.core.rmem_max="$rmem" net.core.wmem_max="$wmem" \
            >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

echo "==> dpkg -i"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb"
getent passwd turnpike >/dev/null || { echo "no turnpike user" >&2; exit 1; }
conf=/etc/turnpike/turnpike.yaml
if grep -q "change-me" "$conf"; then echo "$conf still holds the placeholder secret" >&2; exit 1; fi
[ "$(stat -c '%a %U %G' "$conf")" = "640 root turnpike" ] || { stat "$conf"; exit 1; }
man -w turnpike >/dev/null 2>&1 || [ -f /usr/share/man/man1/turnpike.1.gz ]

echo "==> turnpike check on the installed configuration"
/usr/bin/turnpike check --config "$conf" >/dev/null

secret="$(sed -n 's/^ *- "\([0-9a-f]\{64\}\)"$/\1/p' "$conf" | head -1)"
[ -n "$secret" ] || { echo "no generated secret found in $conf" >&2; exit 1; }
if [ -d /run/systemd/system ]; then
    echo "==> systemctl start turnpike"
    systemctl start turnpike
    systemctl is-active --quiet turnpike
    systemctl reload turnpike
else
    echo "==> no systemd here: turnpike run as the turnpike user"
    log="$(mktemp)"
    setpriv --reuid=turnpike --regid=turnpike --clear-groups --inh-caps=-all \
        /usr/bin/turnpike run --config "$conf" 2> "$log" &
    pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
    grep -q "listening on" "$log" || { cat "$log"; exit 1; }
fi
echo "==> turnpike probe through the installed server"
/usr/bin/turnpike probe turn:127.0.0.1:3478 --secret "$secret" --count 5
if [ -n "$pid" ]; then kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; fi

echo "==> dpkg --purge"
DEBIAN_FRONTEND=noninteractive dpkg --purge turnpike
left=""
for f in $files /etc/turnpike /var/log/turnpike /etc/systemd/system/multi-user.target.wants/turnpike.service \
    /var/lib/systemd/deb-systemd-helper-enabled/turnpike.service; do
    [ -e "$f" ] && left="$left $f"
done
getent passwd turnpike >/dev/null && left="$left user:turnpike"
getent group turnpike >/dev/null && left="$left group:turnpike"
dpkg -s turnpike >/dev/null 2>&1 && left="$left dpkg-status"
if [ -n "$left" ]; then echo "left behind after purge:$left" >&2; exit 1; fi
echo "deb: built, lintian clean, installed, checked, started, probed, purged without a trace"
