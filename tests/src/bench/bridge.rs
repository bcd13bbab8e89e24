//! The set-up Kappa's edge-to-cloud link competes with: devices publish JSON
//! to a Mosquitto on the gateway, and a Mosquitto bridge forwards every
//! message to a Mosquitto in the cloud. This measures that bridge's WAN bytes
//! per reading for the same readings the `wire_bytes` section sends over our
//! link (100 devices of the firmware model, seeds and ids as
//! `fleet_readings`, schema 2, here with JSON firmware).
//!
//! ```text
//! publisher --QoS 1--> gateway mosquitto --bridge--> counting proxy --> cloud mosquitto <--QoS 1-- subscriber
//! ```
//!
//! The proxy counts the TCP payload (MQTT bytes) each way, as `wire_bytes`
//! counts the HTTP bytes of our requests; TCP/IP headers and TLS are left
//! out on both sides.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kappa_sim::firmware::{Encoding, Firmware, Schema};
use kappa_sim::signal::device_seed;
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;
const DEVICES: u32 = 100;

pub fn run(scale: f64) -> Value {
    // As `wire_bytes`: 100 devices x 600 readings (x 50 with --quick).
    let per_device = (600.0 * scale).max(50.0) as u64;
    let messages = json_payloads(DEVICES, per_device);
    let n = messages.len() as u64;
    let payload_bytes: u64 = messages.iter().map(|(_, p)| p.len() as u64).sum();
    let dir = tempfile::Builder::new().prefix("kappa-bridge-").tempdir().unwrap();

    let cloud_port = super::free_port();
    let cloud = Broker::start(
        dir.path(),
        "cloud",
        &format!(
            "listener {cloud_port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 1000000\nmax_inflight_messages 1000\n"
        ),
    );
    super::wait_port(cloud_port);
    let proxy = Proxy::start(cloud_port);

    // What arrives in the cloud, read straight from the cloud broker.
    let received = Arc::new(AtomicU64::new(0));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let (sub_client, sub_conn) = client("bench-cloud-sub", cloud_port);
    let (subscribed_tx, subscribed) = mpsc::channel();
    let subscriber = {
        let (received, received_bytes) = (received.clone(), received_bytes.clone());
        drive("cloud subscriber", sub_conn, move |p| match p {
            Packet::SubAck(_) => {
                let _ = subscribed_tx.send(());
            }
            Packet::Publish(p) => {
                received_bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        })
    };
    sub_client.subscribe("devices/#", QoS::AtLeastOnce).unwrap();
    subscribed.recv_timeout(Duration::from_secs(30)).expect("the cloud broker never acknowledged the subscription");

    let gateway_port = super::free_port();
    let gateway = Broker::start(
        dir.path(),
        "gateway",
        &format!(
            "listener {gateway_port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 1000000\nmax_inflight_messages 1000\n\n\
             connection cloud\naddress 127.0.0.1:{}\ntopic devices/# out 1\ncleansession true\n\
             notifications false\nbridge_protocol_version mqttv311\n",
            proxy.port
        ),
    );
    super::wait_port(gateway_port);
    // The bridge is up once its CONNECT went out and the CONNACK came back.
    let t = Instant::now();
    while proxy.up.load(Ordering::Relaxed) == 0 || proxy.down.load(Ordering::Relaxed) < 4 {
        if t.elapsed() > Duration::from_secs(30) {
            panic!(
                "the gateway's bridge never connected to the cloud through the proxy\n{}",
                [&gateway, &cloud].map(Broker::log_tail).join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (up0, down0) = (proxy.up.load(Ordering::Relaxed), proxy.down.load(Ordering::Relaxed));

    // Every payload to the gateway broker, QoS 1, as the devices publish them.
    let acked = Arc::new(AtomicU64::new(0));
    let (pub_client, pub_conn) = client("bench-gateway-pub", gateway_port);
    let publisher = {
        let acked = acked.clone();
        drive("gateway publisher", pub_conn, move |p| {
            if let Packet::PubAck(_) = p {
                acked.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let t = Instant::now();
    for (topic, payload) in messages {
        pub_client.publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
    }
    let deadline = Duration::from_secs(60) + Duration::from_millis(n);
    while received.load(Ordering::Relaxed) < n {
        if t.elapsed() > deadline {
            panic!(
                "mqtt bridge: {} of {n} readings reached the cloud subscriber after {:.0} s ({} acknowledged by the gateway broker)\n{}",
                received.load(Ordering::Relaxed),
                deadline.as_secs_f64(),
                acked.load(Ordering::Relaxed),
                [&gateway, &cloud].map(Broker::log_tail).join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let seconds = t.elapsed().as_secs_f64();
    // The last PUBACKs travel back to the gateway.
    std::thread::sleep(Duration::from_millis(500));
    let (up1, down1) = (proxy.up.load(Ordering::Relaxed), proxy.down.load(Ordering::Relaxed));
    let got = received.load(Ordering::Relaxed);
    if got == n {
        assert_eq!(
            received_bytes.load(Ordering::Relaxed),
            payload_bytes,
            "payload bytes at the cloud differ from those published"
        );
    }

    publisher.stop();
    subscriber.stop();
    drop((pub_client, sub_client));
    drop(gateway);
    drop(proxy);
    drop(cloud);

    let nf = n as f64;
    let (up, down) = (up1 - up0, down1 - down0);
    let payload = payload_bytes as f64 / nf;
    println!(
        "mqtt bridge (Mosquitto -> Mosquitto, QoS 1, JSON payloads of {payload:.1} bytes): {:.1} bytes/reading gateway->cloud, \
         {:.1} both ways ({:.1} of MQTT framing and topic per reading; {n} readings)",
        up as f64 / nf,
        (up + down) as f64 / nf,
        up as f64 / nf - payload,
    );
    json!({
        "readings": n, "devices": DEVICES, "readings_per_device": per_device, "qos": 1,
        "topic": "devices/{id}/telemetry",
        "json_payload_bytes_per_reading": payload,
        "gateway_to_cloud_bytes": up, "cloud_to_gateway_bytes": down,
        "upstream_bytes_per_reading": up as f64 / nf,
        "both_directions_bytes_per_reading": (up + down) as f64 / nf,
        "mqtt_overhead_bytes_per_reading": up as f64 / nf - payload,
        "bridge_connect_bytes": { "gateway_to_cloud": up0, "cloud_to_gateway": down0 },
        "duplicates_at_cloud": got - n,
        "publish_to_cloud_seconds": seconds,
    })
}

/// What the devices publish: `(topic, payload)` in fleet order (every device
/// at t, then at t+1 s, ...), JSON-encoded by the firmware model with the
/// same ids, seeds and schema as `fleet_readings`.
fn json_payloads(devices: u32, per_device: u64) -> Vec<(String, Vec<u8>)> {
    let mut fws: Vec<Firmware> = (0..devices)
        .map(|i| {
            let id = format!("sim-{i:05}");
            Firmware::new(&id, &format!("u-{:05}", i / 4), 1, device_seed(7, i), Schema::V2, Encoding::Json).unwrap()
        })
        .collect();
    let topics: Vec<String> = fws.iter().map(|fw| format!("devices/{}/telemetry", fw.id())).collect();
    let mut out = Vec::with_capacity((u64::from(devices) * per_device) as usize);
    for n in 0..per_device {
        for (fw, topic) in fws.iter_mut().zip(&topics) {
            fw.sample(T0 + n as i64 * 1000);
            let (seq, bytes) = fw.next_to_send().unwrap().unwrap();
            out.push((topic.clone(), bytes.to_vec()));
            fw.acknowledge(seq);
        }
    }
    out
}

fn client(id: &str, port: u16) -> (Client, Connection) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(100);
    Client::new(opts, 1000)
}

/// A thread driving an MQTT connection until stopped; a connection error is fatal.
struct Driver {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Driver {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

fn drive(name: &'static str, mut conn: Connection, mut on: impl FnMut(Packet) + Send + 'static) -> Driver {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Event::Incoming(p))) => on(p),
                Ok(Ok(Event::Outgoing(_))) | Err(rumqttc::RecvTimeoutError::Timeout) => {}
                Ok(Err(e)) if !stopped.load(Ordering::Relaxed) => {
                    panic!("mqtt bridge: the {name} lost its connection: {e}")
                }
                Ok(Err(_)) | Err(rumqttc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    Driver { stop, thread }
}

/// A private Mosquitto, killed (and reaped) when dropped.
struct Broker {
    child: Child,
    log: PathBuf,
}

impl Broker {
    fn start(dir: &Path, name: &str, config: &str) -> Broker {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("mosquitto")
            .args(["-c", conf.to_str().unwrap()])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("mosquitto (the mqtt_bridge_bytes benchmark needs it on PATH)");
        Broker { child, log }
    }

    /// The end of the broker's log, for a failure message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- {}:\n{}", self.log.display(), lines[lines.len().saturating_sub(20)..].join("\n"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of the cloud broker counting the bytes it forwards each way.
struct Proxy {
    port: u16,
    /// Gateway to cloud.
    up: Arc<AtomicU64>,
    /// Cloud to gateway.
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (up, down, stop, streams) = (up.clone(), down.clone(), stop.clone(), streams.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(gateway) = conn else { continue };
                    let Ok(cloud) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                    for s in [&gateway, &cloud] {
                        let _ = s.set_nodelay(true);
                        streams.lock().unwrap().push(s.try_clone().unwrap());
                    }
                    let (g, c) = (gateway.try_clone().unwrap(), cloud.try_clone().unwrap());
                    let (up, down) = (up.clone(), down.clone());
                    std::thread::spawn(move || pump(g, c, &up));
                    std::thread::spawn(move || pump(cloud, gateway, &down));
                }
            })
        };
        Proxy { port, up, down, stop, streams, accept: Some(accept) }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
