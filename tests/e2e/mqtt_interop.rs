//! The agent's own MQTT listener against clients nobody here wrote:
//! paho-mqtt (Python) with MQTT 3.1.1 and 5.0, Debian's `mosquitto_pub` with
//! both, and rumqttc's 3.1.1 and 5.0 clients. Each connects, publishes at
//! QoS 0, 1 and 2, reconnects, republishes a message flagged DUP (paho after
//! a connection lost before the PUBACK, rumqttc resuming its session), and
//! connects over TLS with its device certificate. Every reading lands in the
//! agent's log exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kappa_cloud::pki::{self, Kind};
use kappa_sim::security::DeviceSecurity;

use crate::mqtt_auth::logged;
use kappa_tests::harness::*;

/// A reading of `device` with sequence number `seq`, as JSON.
fn reading(_device: &str, seq: u64) -> Vec<u8> {
    format!(r#"{{"v":2,"boot":1,"seq":{seq},"ts":{},"data":{{"temperature":20.5}}}}"#, T0 + seq as i64 * 1000)
        .into_bytes()
}

/// Where the test's certificates are.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

/// Runs a program to completion within `limit`; its stdout, or a failure with everything it said.
async fn run(program: &str, args: &[&str], limit: Duration) -> String {
    let child = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(limit, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program} (tests need it installed: .ci/run installs it): {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed: {}\n{stdout}\n{stderr}", out.status);
    stdout.into_owned()
}

/// paho-mqtt's script (tests/interop/paho_client.py) as `device`.
async fn paho(port: u16, tls_port: u16, pki: &Pki, device: &str, v5: bool) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/paho_client.py");
    let (ca, cert, key) = (pki.ca(), pki.cert(device), pki.key(device));
    let ts0 = T0.to_string();
    let (port, tls_port) = (port.to_string(), tls_port.to_string());
    let mut args = vec![
        script.to_str().unwrap(),
        "--port",
        &port,
        "--tls-port",
        &tls_port,
        "--device",
        device,
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--ts0",
        &ts0,
    ];
    if v5 {
        args.push("--v5");
    }
    let out = run("python3", &args, Duration::from_secs(120)).await;
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("paho said {out:?}: {e}"))
}

/// `mosquitto_pub` as `device`: seq 1 at QoS 0, 2 at QoS 1, 3 at QoS 2 (each
/// its own connection, so also reconnects), 4 over TLS with its certificate.
async fn mosquitto_pub(port: u16, tls_port: u16, pki: &Pki, device: &str, version: &str) {
    let topic = format!("devices/{device}/telemetry");
    for (seq, qos, tls) in [(1u64, "0", false), (2, "1", false), (3, "2", false), (4, "1", true)] {
        let message = String::from_utf8(reading(device, seq)).unwrap();
        let port = if tls { tls_port } else { port }.to_string();
        let mut args =
            vec!["-h", "127.0.0.1", "-p", &port, "-i", device, "-t", &topic, "-q", qos, "-V", version, "-m", &message];
        let (ca, cert, key) = (pki.ca(), pki.cert(device), pki.key(device));
        if tls {
            args.extend([
                "--cafile",
                ca.to_str().unwrap(),
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ]);
        }
        run("mosquitto_pub", &args, Duration::from_secs(30)).await;
    }
}

/// rumqttc's 3.1.1 client as `device`: seq 1 at QoS 0 and 2 at QoS 1 on a
/// persistent session; then it resumes that session republishing seq 2
/// flagged DUP (a resumed session's pending message, which rumqttc drops
/// unless the CONNACK says the session is present) and publishes seq 3 at
/// QoS 2; then seq 4 over TLS with its certificate.
async fn rumqttc_v4(port: u16, tls_port: u16, pki: &Pki, device: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, Request};
    let topic = format!("devices/{device}/telemetry");
    let options = |port: u16, clean: bool| {
        let mut o = MqttOptions::new(device, "127.0.0.1", port);
        o.set_clean_session(clean);
        o
    };
    // Polls until `done` says so (or the connection fails).
    async fn until(events: &mut rumqttc::EventLoop, what: &str, mut done: impl FnMut(&Event) -> bool) {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let ev = events.poll().await.unwrap_or_else(|e| panic!("{what}: {e}"));
                if done(&ev) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"));
    }

    let (client, mut events) = AsyncClient::new(options(port, false), 16);
    client.publish(&topic, QoS::AtMostOnce, false, reading(device, 1)).await.unwrap();
    client.publish(&topic, QoS::AtLeastOnce, false, reading(device, 2)).await.unwrap();
    until(&mut events, "rumqttc v4 PUBACK", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    client.disconnect().await.unwrap();
    until(&mut events, "rumqttc v4 DISCONNECT", |e| matches!(e, Event::Outgoing(Outgoing::Disconnect))).await;

    let (client, mut events) = AsyncClient::new(options(port, false), 16);
    let mut again = rumqttc::Publish::new(&topic, QoS::AtLeastOnce, reading(device, 2));
    again.dup = true;
    again.pkid = 1;
    events.pending.push_back(Request::Publish(again));
    until(&mut events, "rumqttc v4 resumed session", |e| {
        if let Event::Incoming(Packet::ConnAck(ack)) = e {
            assert!(ack.session_present, "the listener forgot the persistent session");
            return true;
        }
        false
    })
    .await;
    until(&mut events, "rumqttc v4 PUBACK for the DUP", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    client.publish(&topic, QoS::ExactlyOnce, false, reading(device, 3)).await.unwrap();
    until(&mut events, "rumqttc v4 PUBCOMP", |e| matches!(e, Event::Incoming(Packet::PubComp(_)))).await;
    client.disconnect().await.unwrap();
    until(&mut events, "rumqttc v4 DISCONNECT", |e| matches!(e, Event::Outgoing(Outgoing::Disconnect))).await;

    let mut o = options(tls_port, true);
    DeviceSecurity::load(Some(&pki.ca()), Some(&pki.dir), None).unwrap().apply(device, &mut o).unwrap();
    let (client, mut events) = AsyncClient::new(o, 16);
    client.publish(&topic, QoS::AtLeastOnce, false, reading(device, 4)).await.unwrap();
    until(&mut events, "rumqttc v4 PUBACK over TLS", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
}

/// rumqttc's 5.0 client as `device`: the same steps as [`rumqttc_v4`].
async fn rumqttc_v5(port: u16, tls_port: u16, pki: &Pki, device: &str) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
    use rumqttc::{Outgoing, TlsConfiguration, Transport};
    let topic = format!("devices/{device}/telemetry");
    let options = |port: u16, clean: bool| {
        let mut o = MqttOptions::new(device, "127.0.0.1", port);
        o.set_clean_start(clean);
        o.set_session_expiry_interval(Some(300));
        o
    };
    async fn until(events: &mut EventLoop, what: &str, mut done: impl FnMut(&Event) -> bool) {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let ev = events.poll().await.unwrap_or_else(|e| panic!("{what}: {e}"));
                if done(&ev) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"));
    }

    let (client, mut events) = AsyncClient::new(options(port, false), 16);
    client.publish(&topic, QoS::AtMostOnce, false, reading(device, 1)).await.unwrap();
    client.publish(&topic, QoS::AtLeastOnce, false, reading(device, 2)).await.unwrap();
    until(&mut events, "rumqttc v5 PUBACK", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    client.disconnect().await.unwrap();
    until(&mut events, "rumqttc v5 DISCONNECT", |e| matches!(e, Event::Outgoing(Outgoing::Disconnect))).await;

    let (client, mut events) = AsyncClient::new(options(port, false), 16);
    let mut again = Publish::new(&topic, QoS::AtLeastOnce, reading(device, 2), None);
    again.dup = true;
    again.pkid = 1;
    events.pending.push_back(Request::Publish(again));
    until(&mut events, "rumqttc v5 resumed session", |e| {
        if let Event::Incoming(Packet::ConnAck(ack)) = e {
            assert!(ack.session_present, "the listener forgot the persistent session");
            let props = ack.properties.as_ref().expect("5.0 CONNACK properties");
            assert_eq!(props.receive_max, Some(128), "the receive maximum is announced");
            return true;
        }
        false
    })
    .await;
    until(&mut events, "rumqttc v5 PUBACK for the DUP", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    client.publish(&topic, QoS::ExactlyOnce, false, reading(device, 3)).await.unwrap();
    until(&mut events, "rumqttc v5 PUBCOMP", |e| matches!(e, Event::Incoming(Packet::PubComp(_)))).await;
    client.disconnect().await.unwrap();
    until(&mut events, "rumqttc v5 DISCONNECT", |e| matches!(e, Event::Outgoing(Outgoing::Disconnect))).await;

    let mut o = options(tls_port, true);
    let security = DeviceSecurity::load(Some(&pki.ca()), Some(&pki.dir), None).unwrap();
    let tls = security.tls_config(device).unwrap().expect("a TLS configuration");
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(std::sync::Arc::new(tls))));
    let (client, mut events) = AsyncClient::new(o, 16);
    client.publish(&topic, QoS::AtLeastOnce, false, reading(device, 4)).await.unwrap();
    until(&mut events, "rumqttc v5 PUBACK over TLS", |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_nobody_here_wrote_publish_to_the_agents_listener_in_both_versions_and_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki { dir: dir.path().join("pki") };
    pki::init(&pki.dir).unwrap();
    pki::issue(&pki.dir, Kind::Server, "gateway", &["127.0.0.1".into()]).unwrap();
    let devices = ["paho311-dev", "paho5-dev", "mosq311-dev", "mosq5-dev", "rumqttc4-dev", "rumqttc5-dev"];
    for d in devices {
        pki::issue(&pki.dir, Kind::Device, d, &[]).unwrap();
    }
    let (port, tls_port) = (free_port(), free_port());
    // Plain-text devices identify by client id; TLS ones by certificate.
    let extra = format!(
        "[mqtt.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
         [mqtt.access]\nanonymous = true\n",
        pki.cert("gateway"),
        pki.key("gateway"),
        pki.ca(),
    );
    let edge =
        Edge::start_named(dir.path(), "edge", "gw-interop", Mqtt::Embedded(port), "http://127.0.0.1:9", &extra).await;
    wait_for_port(tls_port).await;

    let paho311 = paho(port, tls_port, &pki, "paho311-dev", false).await;
    let paho5 = paho(port, tls_port, &pki, "paho5-dev", true).await;
    for (name, out) in [("3.1.1", &paho311), ("5.0", &paho5)] {
        assert_eq!(out["dropped"], true, "paho {name}: the proxy dropped a PUBACK");
        assert!(out["dup_publishes"].as_u64() >= Some(1), "paho {name} republished flagged DUP: {out}");
    }
    mosquitto_pub(port, tls_port, &pki, "mosq311-dev", "mqttv311").await;
    mosquitto_pub(port, tls_port, &pki, "mosq5-dev", "mqttv5").await;
    rumqttc_v4(port, tls_port, &pki, "rumqttc4-dev").await;
    rumqttc_v5(port, tls_port, &pki, "rumqttc5-dev").await;

    let expected: BTreeSet<(String, u64)> = [("paho311-dev", 6), ("paho5-dev", 6)]
        .into_iter()
        .chain([("mosq311-dev", 4), ("mosq5-dev", 4), ("rumqttc4-dev", 4), ("rumqttc5-dev", 4)])
        .flat_map(|(d, n)| (1..=n).map(move |seq| (d.to_string(), seq)))
        .collect();
    let metrics = format!("http://127.0.0.1:{}", edge.http_port);
    wait_for("every reading committed", Duration::from_secs(30), || async {
        (series(&metrics, "kappa_edge_readings_committed_total").await >= expected.len() as f64).then_some(())
    })
    .await;
    assert_eq!(logged(&dir.path().join("edge-data")), expected, "exactly the published readings");
    assert_eq!(
        series(&metrics, "kappa_edge_readings_committed_total").await,
        expected.len() as f64,
        "each reading stored once"
    );
    // The republished seq 2 of paho (both versions) and rumqttc (both) came flagged DUP and were stored once.
    assert!(series(&metrics, "kappa_edge_mqtt_republished_total").await >= 4.0, "{}", edge.proc.tail());
    assert!(series(&metrics, "kappa_edge_readings_duplicate_total").await >= 4.0, "{}", edge.proc.tail());
    assert_eq!(series(&metrics, "kappa_edge_readings_rejected_total").await, 0.0, "{}", edge.proc.tail());
}
