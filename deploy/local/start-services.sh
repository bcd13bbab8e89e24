#!/usr/bin/env bash
# Installs (Debian/Ubuntu, with apt-get) and starts the local services the
# tests need, if they are missing or down: Mosquitto on 127.0.0.1:1883.
# PostgreSQL is started too when it is installed (later features use it).
# Safe to run repeatedly.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! command -v mosquitto >/dev/null 2>&1; then
  echo "Installing mosquitto..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto
fi

if ! port_open 1883; then
  echo "Starting mosquitto on 127.0.0.1:1883..."
  if [ -f /etc/mosquitto/mosquitto.conf ] && grep -q "^listener 1883" /etc/mosquitto/mosquitto.conf; then
    $SUDO mosquitto -d -c /etc/mosquitto/mosquitto.conf
  else
    conf=$(mktemp /tmp/kappa-mosquitto-XXXX.conf)
    printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' >"$conf"
    $SUDO mosquitto -d -c "$conf"
  fi
  for _ in $(seq 1 50); do port_open 1883 && break; sleep 0.1; done
  port_open 1883 || { echo "mosquitto did not start" >&2; exit 1; }
fi
echo "mosquitto: listening on 127.0.0.1:1883"

if [ -d /etc/postgresql ] && ! port_open 5432; then
  echo "Starting PostgreSQL..."
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
fi
if port_open 5432; then echo "postgresql: listening on 127.0.0.1:5432"; fi
