#!/usr/bin/env bash
# The README's test command: installs (Debian/Ubuntu, apt-get, pip, npm,
# cargo) and starts everything the tests need, then runs every test.
#
#   deploy/local/test.sh                 # cargo test --workspace --locked
#   deploy/local/test.sh -p kappa-edge   # arguments go to cargo test
#
# What it sets up, each only when missing (so a second run starts at once):
#   Mosquitto on 127.0.0.1:1883 and PostgreSQL on 127.0.0.1:5432 (start-services.sh),
#   Debian's mosquitto-clients and chromium (interop and dashboard tests),
#   DuckDB, moto's S3 server and paho-mqtt from PyPI (archive and interop tests),
#   Azurite from npm into target/tools (the Azure Blob archive test),
#   the tansu Kafka-protocol broker, built once into ~/.cache/kappa-tools
#   (Apache Kafka cannot be downloaded here; about 10-18 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

deploy/local/start-services.sh
command -v mosquitto_pub >/dev/null 2>&1 || apt_install mosquitto-clients
command -v chromium >/dev/null 2>&1 || apt_install chromium
python3 -c "import duckdb" 2>/dev/null || python3 -m pip install --quiet duckdb
python3 -c "import paho.mqtt" 2>/dev/null || python3 -m pip install --quiet "paho-mqtt>=2,<3"
command -v moto_server >/dev/null 2>&1 || python3 -m pip install --quiet "moto[server]"
[ -x target/tools/node_modules/.bin/azurite-blob ] || npm install --silent --prefix target/tools azurite@3

# The tools are built at opt-level 1 without LTO: they serve the tests, and
# this roughly halves their build on 2 cores.
TANSU_ROOT="$HOME/.cache/kappa-tools/tansu-0.6.0"
if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
  echo "== building the tansu broker (once per machine)"
  CARGO_TARGET_DIR="$HOME/.cache/kappa-tools/tansu-target" \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_INCREMENTAL=false \
    cargo install tansu --locked --version 0.6.0 --features dynostore --root "$TANSU_ROOT"
fi
export KAPPA_TANSU="${KAPPA_TANSU:-$TANSU_ROOT/bin/tansu}"

cargo test --workspace --locked "$@"
