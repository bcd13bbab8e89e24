"""A device written with paho-mqtt (Python), against the agent's own MQTT listener.

Run by tests/e2e/mqtt_interop.rs. As device DEVICE, with MQTT 3.1.1 or 5.0:

1. connects through a small TCP proxy (below) with a session that outlives
   the connection, publishes seq 1 at QoS 0 and seq 2 at QoS 1. The proxy
   drops the connection instead of passing the agent's first PUBACK, so
   paho reconnects and republishes seq 2 flagged DUP; the test checks that
   the agent stored seq 2 once;
2. publishes seq 3 at QoS 1 and seq 4 at QoS 2 on that session, then
   disconnects;
3. connects again directly (a clean session) and publishes seq 5 at QoS 1;
4. connects over TLS with its device certificate and publishes seq 6 at QoS 1.

Every QoS 1 and 2 publish must be acknowledged within 30 s. Prints one JSON
line: how many DUP publishes the proxy saw and whether it dropped a PUBACK.
"""

import argparse
import json
import socket
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

TIMEOUT = 30.0


def frames(buf):
    """Complete MQTT packets at the front of buf: ([(first byte, packet)], rest)."""
    out = []
    while len(buf) >= 2:
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buf):
                return out, buf
            b = buf[i]
            length |= (b & 0x7F) << shift
            i += 1
            if b & 0x80 == 0:
                break
            shift += 7
        if len(buf) < i + length:
            break
        out.append((buf[0], buf[: i + length]))
        buf = buf[i + length :]
    return out, buf


class Proxy(threading.Thread):
    """Forwards connections to the agent; the first PUBACK (type 4) from the
    agent is swallowed and both sides closed, so the client must republish."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.dropped = False
        self.dup_publishes = 0
        self.lock = threading.Lock()

    def run(self):
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self.pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, False), daemon=True).start()

    def pump(self, src, dst, from_client):
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                packets, buf = frames(buf + data)
                for first, packet in packets:
                    kind = first >> 4
                    with self.lock:
                        if from_client and kind == 3 and first & 0x08:
                            self.dup_publishes += 1
                        if not from_client and kind == 4 and not self.dropped:
                            self.dropped = True
                            raise ConnectionAbortedError("dropping the first PUBACK")
                    dst.sendall(packet)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def reading(device, seq, ts0):
    return json.dumps({"v": 2, "boot": 1, "seq": seq, "ts": ts0 + seq * 1000, "data": {"temperature": 20.5}})


def client(device, v5, clean):
    protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    kwargs = {} if v5 else {"clean_session": clean}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=protocol, **kwargs)
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    connected = threading.Event()
    c.on_connect = lambda *args: connected.set()
    c.on_disconnect = lambda *args: connected.clear()
    return c, connected


def connect(c, connected, port, v5, clean):
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 300
        c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
    else:
        c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT):
        sys.exit(f"no CONNACK from port {port}")


def publish(c, topic, payload, qos):
    info = c.publish(topic, payload, qos=qos)
    info.wait_for_publish(TIMEOUT)
    if qos > 0 and not info.is_published():
        sys.exit(f"no acknowledgement for a QoS {qos} publish: {payload}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-port", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--v5", action="store_true")
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ts0", type=int, required=True)
    a = p.parse_args()
    topic = f"devices/{a.device}/telemetry"

    proxy = Proxy(a.port)
    proxy.start()
    c, connected = client(a.device, a.v5, clean=False)
    connect(c, connected, proxy.port, a.v5, clean=False)
    publish(c, topic, reading(a.device, 1, a.ts0), 0)
    publish(c, topic, reading(a.device, 2, a.ts0), 1)
    publish(c, topic, reading(a.device, 3, a.ts0), 1)
    publish(c, topic, reading(a.device, 4, a.ts0), 2)
    c.disconnect()
    c.loop_stop()

    c, connected = client(a.device, a.v5, clean=True)
    connect(c, connected, a.port, a.v5, clean=True)
    publish(c, topic, reading(a.device, 5, a.ts0), 1)
    c.disconnect()
    c.loop_stop()

    c, connected = client(a.device, a.v5, clean=True)
    c.tls_set(ca_certs=a.ca, certfile=a.cert, keyfile=a.key, cert_reqs=ssl.CERT_REQUIRED)
    connect(c, connected, a.tls_port, a.v5, clean=True)
    publish(c, topic, reading(a.device, 6, a.ts0), 1)
    c.disconnect()
    c.loop_stop()
    time.sleep(0.2)
    print(json.dumps({"dup_publishes": proxy.dup_publishes, "dropped": proxy.dropped}))


if __name__ == "__main__":
    main()
