#!/usr/bin/env bash
# Installs the Kappa IoT edge agent as a systemd service on a gateway.
#
#   cargo build --release -p kappa-edge --bin kappa-edge
#   sudo deploy/edge/install.sh target/release/kappa-edge
#
# Creates the system user kappa-edge, installs the binary to
# /usr/local/bin, the config to /etc/kappa-edge/gateway.toml (kept if it
# exists), the unit to /etc/systemd/system, and starts the service. Data
# lives in /var/lib/kappa-edge (0700, created by systemd's StateDirectory).
# The service is enabled, and started only when the config passes
# `kappa-edge config check` (a fresh install's placeholder config does not:
# it names the cloud's CA file, which you put in place): otherwise it says
# what to fix, and how to start it then.
# With --root DIR it only lays the files out under DIR (for packaging and
# for the test), without creating a user or touching systemd.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root=""
if [ "${1:-}" = "--root" ]; then
  root="$2"
  shift 2
fi
binary="${1:?usage: install.sh [--root DIR] PATH/TO/kappa-edge}"
[ -x "$binary" ] || { echo "not an executable: $binary" >&2; exit 2; }

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -d -m 0750 "$root/etc/kappa-edge"
install -d -m 0700 "$root/var/lib/kappa-edge"
install -m 0755 "$binary" "$root/usr/local/bin/kappa-edge"
# Stripped: the release profile keeps line tables for backtraces (over 100 MB).
if head -c 4 "$binary" | grep -q ELF && command -v strip >/dev/null 2>&1; then
  strip --strip-all "$root/usr/local/bin/kappa-edge"
fi
install -m 0644 "$here/kappa-edge.service" "$root/etc/systemd/system/kappa-edge.service"
if [ ! -e "$root/etc/kappa-edge/gateway.toml" ]; then
  install -m 0640 "$here/gateway.toml" "$root/etc/kappa-edge/gateway.toml"
  echo "Edit $root/etc/kappa-edge/gateway.toml (gateway_id, forward.cloud_url) before starting."
fi
config="$root/etc/kappa-edge/gateway.toml"
ready=""
if "$root/usr/local/bin/kappa-edge" config check --config "$config"; then ready=1; fi
not_ready() {
  echo "Not started: $config does not pass 'kappa-edge config check' (above)."
  echo "Fix it, check it again (kappa-edge config check --config $config), then: systemctl start kappa-edge"
}

if [ -n "$root" ]; then
  echo "Laid out under $root."
  [ -n "$ready" ] || not_ready
  exit 0
fi
if ! id kappa-edge >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /var/lib/kappa-edge --shell /usr/sbin/nologin kappa-edge
fi
chown root:kappa-edge /etc/kappa-edge /etc/kappa-edge/gateway.toml
chown kappa-edge:kappa-edge /var/lib/kappa-edge
systemctl daemon-reload
if [ -n "$ready" ]; then
  systemctl enable --now kappa-edge.service
  systemctl --no-pager status kappa-edge.service || true
else
  systemctl enable kappa-edge.service
  not_ready
fi
