#!/usr/bin/env bash
# Builds a Debian package of the edge agent, for gateway fleets that install
# agents with their package manager: the stripped binary in /usr/bin, the
# hardened unit in /lib/systemd/system, the commented example config in
# /etc/kappa-edge/gateway.toml (a conffile: an upgrade keeps your edits) and
# the system user kappa-edge.
#
#   cargo build --release -p kappa-edge --bin kappa-edge
#   deploy/edge/package-deb.sh target/release/kappa-edge target/deb
#   sudo apt install ./target/deb/kappa-edge_0.1.0_amd64.deb
#
# Installing enables the service and starts it only when the config passes
# `kappa-edge config check` (the example names the cloud's CA file, which
# is yours to put in place), as deploy/edge/install.sh does. Removing stops
# it; purging also removes the config and the log in /var/lib/kappa-edge.
# Needs dpkg-deb and strip (binutils).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
binary="${1:?usage: package-deb.sh PATH/TO/kappa-edge [OUT_DIR]}"
out="${2:-target/deb}"
[ -x "$binary" ] || { echo "not an executable: $binary" >&2; exit 2; }

version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/usr/share/doc/kappa-edge"
install -d -m 0750 "$stage/etc/kappa-edge"
install -m 0755 "$binary" "$stage/usr/bin/kappa-edge"
strip --strip-all "$stage/usr/bin/kappa-edge"
sed 's|/usr/local/bin/kappa-edge|/usr/bin/kappa-edge|g' "$here/kappa-edge.service" >"$stage/lib/systemd/system/kappa-edge.service"
chmod 0644 "$stage/lib/systemd/system/kappa-edge.service"
install -m 0640 "$here/gateway.toml" "$stage/etc/kappa-edge/gateway.toml"
install -m 0644 "$repo/docs/edge.md" "$stage/usr/share/doc/kappa-edge/edge.md"
install -m 0644 "$repo/docs/deploy.md" "$stage/usr/share/doc/kappa-edge/deploy.md"

installed_kib="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: kappa-edge
Version: $version
Architecture: $arch
Maintainer: Kappa IoT <maintainers@kappa-iot.invalid>
Section: net
Priority: optional
Installed-Size: $installed_kib
Depends: libc6, adduser, systemd
Homepage: https://github.com/kappa-iot/kappa-iot
Description: Kappa IoT edge agent for field gateways
 MQTT in (its own device listener or a subscription to the gateway's
 Mosquitto), a durable SQLite log that acknowledges a reading only after it
 is committed, pre-aggregation, and store-and-forward of compressed batches
 to the Kappa IoT cloud over HTTPS.
CONTROL
echo "/etc/kappa-edge/gateway.toml" >"$stage/DEBIAN/conffiles"

cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd kappa-edge >/dev/null; then
    adduser --system --group --no-create-home --home /var/lib/kappa-edge --quiet kappa-edge
  fi
  chown root:kappa-edge /etc/kappa-edge /etc/kappa-edge/gateway.toml
  chmod 0750 /etc/kappa-edge
  chmod 0640 /etc/kappa-edge/gateway.toml
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable kappa-edge.service >/dev/null 2>&1 || true
    if kappa-edge config check --config /etc/kappa-edge/gateway.toml; then
      systemctl restart kappa-edge.service
    else
      echo "kappa-edge: not started: /etc/kappa-edge/gateway.toml does not pass 'kappa-edge config check' (above)."
      echo "Fix it, check it again, then: systemctl start kappa-edge"
    fi
  fi
fi
exit 0
POSTINST
cat >"$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop kappa-edge.service >/dev/null 2>&1 || true
  systemctl disable kappa-edge.service >/dev/null 2>&1 || true
fi
exit 0
PRERM
cat >"$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/kappa-edge /etc/kappa-edge
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/kappa-edge_${version}_${arch}.deb"
dpkg-deb --build --root-owner-group -Zxz "$stage" "$deb" >/dev/null
echo "$deb"
