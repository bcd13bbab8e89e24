#!/usr/bin/env bash
# The whole pipeline on this machine's loopback: a cloud node (embedded event
# log and views), an edge agent with its embedded MQTT broker, and a simulated
# fleet publishing to it. Runs until Ctrl-C, then stops everything cleanly.
#
#   deploy/local/run-demo.sh                 # 100 devices, 1 reading/s each
#   DEVICES=1000 RATE=2 deploy/local/run-demo.sh
#   CLOUD_PORT=18080 MQTT_PORT=21883 EDGE_PORT=19101 deploy/local/run-demo.sh
#
# Needs only the Rust toolchain and a C compiler. Ports: 8080 (cloud),
# 11883 (MQTT), 9101 (edge metrics), each settable as above (they reach the
# configs as KAPPA_CLOUD__.../KAPPA_EDGE__... overrides). Data and logs are
# in data/demo/: they stay there after Ctrl-C, and the next run starts
# afresh (it clears the directory: the simulated fleet starts over).
set -euo pipefail
cd "$(dirname "$0")/../.."

DEVICES=${DEVICES:-100}
RATE=${RATE:-1}
# One labelled anomaly per device every this many readings (0: none).
ANOMALY_EVERY=${ANOMALY_EVERY:-600}
DATA=data/demo
CLOUD_PORT=${CLOUD_PORT:-8080}
MQTT_PORT=${MQTT_PORT:-11883}
EDGE_PORT=${EDGE_PORT:-9101}
export KAPPA_CLOUD__HTTP__LISTEN="127.0.0.1:$CLOUD_PORT"
export KAPPA_EDGE__MQTT__LISTEN="127.0.0.1:$MQTT_PORT"
export KAPPA_EDGE__HTTP__LISTEN="127.0.0.1:$EDGE_PORT"
export KAPPA_EDGE__FORWARD__CLOUD_URL="http://127.0.0.1:$CLOUD_PORT"

echo "Building (release)..."
cargo build --release --locked -p kappa-cloud -p kappa-edge -p kappa-sim --bins
BIN=target/release

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing is listening on port $1; see $DATA/*.log" >&2
  return 1
}

for port in "$CLOUD_PORT" "$EDGE_PORT" "$MQTT_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop whatever holds it (or an earlier demo) first, or pick other ports (CLOUD_PORT, MQTT_PORT, EDGE_PORT)" >&2
    exit 1
  fi
done

rm -rf "$DATA"
mkdir -p "$DATA"
pids=()
stop() {
  trap - INT TERM
  echo
  echo "Stopping: fleet, then edge (drains its queue), then cloud (checkpoints)..."
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "Stopped. Logs and data are in $DATA/."
  exit 0
}
trap stop INT TERM

"$BIN/kappa-cloud" run --config deploy/local/cloud.toml >"$DATA/cloud.log" 2>&1 &
cloud=$!
wait_port "$CLOUD_PORT"
"$BIN/kappa-edge" run --config deploy/local/edge.toml >"$DATA/edge.log" 2>&1 &
edge=$!
wait_port "$MQTT_PORT"
"$BIN/kappa-sim" --broker "127.0.0.1:$MQTT_PORT" --devices "$DEVICES" --rate "$RATE" \
  --anomaly-every "$ANOMALY_EVERY" >"$DATA/sim.log" 2>&1 &
sim=$!
pids=("$sim" "$edge" "$cloud")

cat <<MSG

Kappa IoT is running: $DEVICES simulated devices -> edge agent (MQTT :$MQTT_PORT) -> cloud (:$CLOUD_PORT).

  Dashboard                  http://127.0.0.1:$CLOUD_PORT/dashboard
  Devices and their totals   curl -s 'http://127.0.0.1:$CLOUD_PORT/v1/devices?limit=5'
  One device's windows       curl -s 'http://127.0.0.1:$CLOUD_PORT/v1/devices/sim-00000/windows?limit=5'
  All views                  curl -s  http://127.0.0.1:$CLOUD_PORT/v1/views
  Alerts firing now          curl -s 'http://127.0.0.1:$CLOUD_PORT/v1/alerts?state=firing&limit=5'
  Critical alerts            curl -s 'http://127.0.0.1:$CLOUD_PORT/v1/alerts?severity=critical&limit=5'
  Cloud metrics              curl -s  http://127.0.0.1:$CLOUD_PORT/metrics
  Edge metrics               curl -s  http://127.0.0.1:$EDGE_PORT/metrics
  Logs                       tail -f $DATA/cloud.log $DATA/edge.log $DATA/sim.log

Windows are one minute of event time; the first ones fill within a minute.
Every device gets a labelled anomaly (spike, step, drift, stuck sensor,
dropout, offline) every $ANOMALY_EVERY readings after a one-minute warm-up;
alerts start within a few minutes.
Press Ctrl-C to stop.
MSG

# Exit (and stop the rest) if any part dies on its own.
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a process exited unexpectedly; see $DATA/*.log" >&2
      stop
    fi
  done
  sleep 1
done
