#!/usr/bin/env bash
# Installs turnpike as a systemd service from a checkout, where the .deb (scripts/ci/deb.sh) is not
# an option: the release binary, a system user, the unit, a starting configuration (kept if one
# exists) and a sysctl drop-in that keeps the kernel's ephemeral ports out of the relay range. Run as
# root: `bash scripts/ops/install.sh`.
# PREFIX (default /usr/local) and DESTDIR (default empty, for packaging) are honoured.
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"

cargo build --release --locked
install -D -m 755 target/release/turnpike "$DESTDIR$PREFIX/bin/turnpike"
install -D -m 644 systemd/turnpike.service "$DESTDIR/etc/systemd/system/turnpike.service"
sed -i "s|/usr/bin/turnpike|$PREFIX/bin/turnpike|g" "$DESTDIR/etc/systemd/system/turnpike.service"
install -D -m 644 scripts/ops/sysctl.conf "$DESTDIR/etc/sysctl.d/60-turnpike.conf"
install -d -m 750 "$DESTDIR/etc/turnpike"
if [ ! -e "$DESTDIR/etc/turnpike/turnpike.yaml" ]; then
    secret="$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n' | head -c 64)"
    sed "s|change-me-to-the-output-of-pwgen-s-64-1|$secret|" config/turnpike.example.yaml \
        > "$DESTDIR/etc/turnpike/turnpike.yaml"
    chmod 640 "$DESTDIR/etc/turnpike/turnpike.yaml"
    echo "wrote /etc/turnpike/turnpike.yaml with a fresh shared secret: set auth.realm, then copy the secret to"
    echo "homeserver.yaml (turnpike synapse-config --config /etc/turnpike/turnpike.yaml prints the block)."
fi
if [ -z "$DESTDIR" ]; then
    getent group turnpike >/dev/null || groupadd --system turnpike
    getent passwd turnpike >/dev/null || useradd --system --gid turnpike --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin turnpike
    chgrp -R turnpike /etc/turnpike
    sysctl --quiet --load /etc/sysctl.d/60-turnpike.conf || true
    systemctl daemon-reload || true
    echo "installed. Start with: systemctl enable --now turnpike"
fi
