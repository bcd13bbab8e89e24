//! The agent's own MQTT listener locked down: MQTT over TLS with device
//! certificates from `kappa-cloud pki`, per-device passwords from
//! `kappa-edge mosquitto credentials`, and each device kept to its own
//! telemetry topic. The same attack against an agent without `[mqtt.access]`
//! is the negative control: there the impersonation succeeds.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kappa_cloud::pki::{self, Kind};
use kappa_sim::security::DeviceSecurity;
use rumqttc::{ConnectReturnCode, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mqtt_auth::{Session, credentials, logged, reading, session, session_with};
use kappa_tests::harness::*;

/// TLS options for client id `id` at `port`, trusting `ca`, presenting the
/// certificate `{dir}/{name}.pem` (+ `.key`) if given: the simulator's own
/// device set-up.
fn tls_options(port: u16, id: &str, ca: &Path, cert: Option<(&Path, &str)>) -> MqttOptions {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    let (dir, name) = cert.map_or((None, id), |(d, n)| (Some(d), n));
    DeviceSecurity::load(Some(ca), dir, None).unwrap().apply(name, &mut opts).unwrap();
    opts
}

async fn connect(opts: MqttOptions) -> Session {
    session_with(opts).await.expect("a TLS session")
}

/// Waits for the next PUBACK on a session.
async fn puback(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Packet>, who: &str) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Packet::PubAck(_))) => return,
            Ok(Some(_)) => {}
            other => panic!("{who}: no PUBACK: {other:?}"),
        }
    }
}

/// What a device's impersonation attempt achieved.
struct Attempt {
    /// SUBACK codes for `#`.
    subscribe: Vec<SubscribeReasonCode>,
    /// The session ended after the foreign publish.
    cut_off: bool,
}

/// As `me`, with an accepted session: subscribes to `#`, publishes readings
/// 1..=3 to its own topic (waiting for each PUBACK), then one reading of
/// `victim` (seq 100) to the victim's topic.
async fn impersonate(s: Session, me: &str, victim: &str) -> Attempt {
    let (client, code, mut rx) = s;
    assert_eq!(code, ConnectReturnCode::Success, "{me} should connect");
    client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let subscribe = loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(Packet::SubAck(ack))) => break ack.return_codes,
            Ok(Some(_)) => {}
            other => panic!("{me}: no SUBACK: {other:?}"),
        }
    };
    for seq in 1..=3 {
        client.publish(format!("devices/{me}/telemetry"), QoS::AtLeastOnce, false, reading(me, seq)).await.unwrap();
        puback(&mut rx, me).await;
    }
    client.publish(format!("devices/{victim}/telemetry"), QoS::AtLeastOnce, false, reading(victim, 100)).await.unwrap();
    let cut_off =
        tokio::time::timeout(Duration::from_secs(3), async { while rx.recv().await.is_some() {} }).await.is_ok();
    Attempt { subscribe, cut_off }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_admits_devices_by_certificate_or_password_and_keeps_each_to_its_own_topic() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let rogue_dir = dir.path().join("rogue");
    pki::init(&pki_dir).unwrap();
    pki::issue(&pki_dir, Kind::Server, "gateway", &["127.0.0.1".into()]).unwrap();
    // Three hand-driven devices and a simulated fleet of three, all with certificates.
    for d in ["dev-a", "dev-b", "dev-x", "tls-00000", "tls-00001", "tls-00002"] {
        pki::issue(&pki_dir, Kind::Device, d, &[]).unwrap();
    }
    // The same name from a CA the gateway does not trust.
    pki::init(&rogue_dir).unwrap();
    pki::issue(&rogue_dir, Kind::Device, "dev-a", &[]).unwrap();
    let (passwords, passwd, _) = credentials(dir.path(), &["dev-p", "pw-00000", "pw-00001"]);
    let pw_p = passwords["dev-p"].as_str();
    let ca = pki_dir.join("ca.pem");

    let (plain_port, tls_port) = (free_port(), free_port());
    let extra = format!(
        "[mqtt.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
         [mqtt.access]\npassword_file = {:?}\nrevoked = [\"dev-x\"]\n",
        pki_dir.join("gateway.pem"),
        pki_dir.join("gateway.key"),
        ca,
        passwd,
    );
    let edge =
        Edge::start_named(dir.path(), "edge", "gw-1", Mqtt::Embedded(plain_port), "http://127.0.0.1:9", &extra).await;
    wait_for_port(tls_port).await;

    // Simulated fleets the way a field gateway sees them: certificates over
    // TLS, and passwords (the CSV the credentials helper wrote).
    let fleet = |name: &str, extra: Vec<String>| {
        let mut f = Fleet::new(if name == "tls" { 3 } else { 2 }, 20, 20.0);
        f.name = name.into();
        f.id_prefix = format!("{name}-");
        f.extra = extra;
        f
    };
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut sim_tls = fleet("tls", vec!["--tls-ca".into(), path(&ca), "--cert-dir".into(), path(&pki_dir)])
        .start(tls_port, dir.path());
    let mut sim_pw = fleet("pw", vec!["--credentials".into(), path(&dir.path().join("creds/new-credentials.csv"))])
        .start(plain_port, dir.path());
    let truth_tls = Fleet::finish(&mut sim_tls, dir.path()).await;
    let truth_pw = Fleet::finish(&mut sim_pw, dir.path()).await;
    assert_eq!(truth_tls.acked + truth_pw.acked, 100, "every simulated reading was acknowledged");

    // Certificates: dev-a's own; it tries to read everything and to write as dev-b.
    let a =
        impersonate(connect(tls_options(tls_port, "dev-a", &ca, Some((&pki_dir, "dev-a")))).await, "dev-a", "dev-b")
            .await;
    assert_eq!(a.subscribe, [SubscribeReasonCode::Failure], "a device may not subscribe to #");
    assert!(a.cut_off, "publishing to another device's topic ends the session");
    let (b, code, _b_rx) = connect(tls_options(tls_port, "dev-b", &ca, Some((&pki_dir, "dev-b")))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    for seq in 1..=2 {
        b.publish("devices/dev-b/telemetry", QoS::AtLeastOnce, false, reading("dev-b", seq)).await.unwrap();
    }

    // Passwords, over TLS without a certificate and on the plain listener.
    let with_login = |port: u16, tls: bool, id: &str, user: &str, pw: &str| {
        let mut o = if tls { tls_options(port, id, &ca, None) } else { MqttOptions::new(id, "127.0.0.1", port) };
        o.set_credentials(user, pw);
        o
    };
    let (p, code, mut p_rx) = connect(with_login(tls_port, true, "dev-p", "dev-p", pw_p)).await;
    assert_eq!(code, ConnectReturnCode::Success);
    p.publish("devices/dev-p/telemetry", QoS::AtLeastOnce, false, reading("dev-p", 1)).await.unwrap();
    puback(&mut p_rx, "dev-p over TLS").await;
    p.disconnect().await.unwrap();
    let (p2, code, mut p2_rx) = session(plain_port, "dev-p", Some(("dev-p", pw_p))).await;
    assert_eq!(code, ConnectReturnCode::Success, "the plain listener is behind the gate too");
    p2.publish("devices/dev-p/telemetry", QoS::AtLeastOnce, false, reading("dev-p", 2)).await.unwrap();
    puback(&mut p2_rx, "dev-p in plain text").await;

    // Refusals, each with its CONNACK code.
    let refused = [
        ("wrong password", connect(with_login(tls_port, true, "dev-p", "dev-p", "guess")).await.1),
        ("unknown device", connect(with_login(tls_port, true, "dev-q", "dev-q", pw_p)).await.1),
        ("login for another id", connect(with_login(tls_port, true, "dev-a", "dev-p", pw_p)).await.1),
        (
            "client id not the certificate's",
            connect(tls_options(tls_port, "dev-b", &ca, Some((&pki_dir, "dev-a")))).await.1,
        ),
        ("revoked", connect(tls_options(tls_port, "dev-x", &ca, Some((&pki_dir, "dev-x")))).await.1),
        ("anonymous over TLS", connect(tls_options(tls_port, "dev-a", &ca, None)).await.1),
        ("anonymous in plain text", session(plain_port, "dev-a", None).await.1),
    ];
    let codes: Vec<(&str, ConnectReturnCode)> = refused.to_vec();
    use ConnectReturnCode::*;
    assert_eq!(
        codes,
        [
            ("wrong password", BadUserNamePassword),
            ("unknown device", BadUserNamePassword),
            ("login for another id", BadClientId),
            ("client id not the certificate's", BadClientId),
            ("revoked", NotAuthorized),
            ("anonymous over TLS", NotAuthorized),
            ("anonymous in plain text", NotAuthorized),
        ]
    );
    let metrics = format!("http://127.0.0.1:{}", edge.http_port);
    let tls_failures = "kappa_edge_mqtt_connections_refused_total{reason=\"tls\"}";
    let before = series(&metrics, tls_failures).await;
    let rogue = session_with(tls_options(tls_port, "dev-a", &ca, Some((&rogue_dir, "dev-a")))).await;
    assert!(rogue.is_err() || rogue.is_ok_and(|s| s.1 != Success), "a certificate from another CA is refused");
    assert_eq!(series(&metrics, tls_failures).await - before, 1.0, "the failed handshake is counted");

    // A publish announcing 200 MiB ends the session at its fixed header; the
    // agent's memory does not grow with it.
    let peak_before = edge.proc.peak_rss_mib();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", plain_port)).await.unwrap();
    raw.write_all(&connect_packet("dev-p", Some(("dev-p", pw_p)))).await.unwrap();
    let mut connack = [0u8; 4];
    raw.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    raw.write_all(&[0x30, 0x80, 0x80, 0x80, 0x64]).await.unwrap(); // remaining length 100 x 2^21
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    while sent < 200 << 20 {
        match tokio::time::timeout(Duration::from_secs(5), raw.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(_)) => break,
            Err(_) => panic!("the gate neither read nor closed the oversized publish"),
        }
    }
    assert!(sent < 32 << 20, "the gate read {} MiB of an oversized publish", sent >> 20);
    let grew = edge.proc.peak_rss_mib() - peak_before;
    assert!(grew < 16.0, "the agent's peak memory rose {grew:.1} MiB");

    wait_for("the admitted readings committed", Duration::from_secs(10), || async {
        (edge.metric("kappa_edge_readings_committed_total").await == Some(107.0)).then_some(())
    })
    .await;
    let expected: BTreeSet<(String, u64)> = [("dev-a", 1), ("dev-a", 2), ("dev-a", 3), ("dev-b", 1), ("dev-b", 2)]
        .into_iter()
        .chain([("dev-p", 1), ("dev-p", 2)])
        .map(|(d, s)| (d.to_string(), s))
        .collect();
    let all = logged(&dir.path().join("edge-data"));
    let (by_hand, simulated): (BTreeSet<_>, BTreeSet<_>) = all.into_iter().partition(|(d, _)| d.starts_with("dev-"));
    assert_eq!(by_hand, expected, "exactly the admitted readings");
    let mut per_device = std::collections::BTreeMap::<String, usize>::new();
    for (d, _) in simulated {
        *per_device.entry(d).or_default() += 1;
    }
    let fleet_ids = ["pw-00000", "pw-00001", "tls-00000", "tls-00001", "tls-00002"];
    assert_eq!(per_device, fleet_ids.iter().map(|d| (d.to_string(), 20)).collect(), "the simulated fleets");
    for (series, want) in [
        ("kappa_edge_mqtt_denied_total{reason=\"publish_topic\"}", 1.0),
        ("kappa_edge_mqtt_denied_total{reason=\"subscribe\"}", 1.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"bad_password\"}", 1.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"unknown_device\"}", 1.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"client_id_mismatch\"}", 2.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"revoked\"}", 1.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"packet_too_large\"}", 1.0),
        ("kappa_edge_mqtt_connections_refused_total{reason=\"no_identity\"}", 2.0),
    ] {
        assert_eq!(kappa_tests::harness::series(&metrics, series).await, want, "{series}\n{}", edge.proc.tail());
    }
    let log = std::fs::read_to_string(&edge.proc.log).unwrap_or_default();
    assert!(log.contains("devices/dev-b/telemetry") && log.contains("Denied"), "the denial is logged");
    assert!(!log.contains(pw_p), "a device password reached the agent's log");

    // Negative control: the same attack on an agent without [mqtt.access]
    // impersonates dev-b (devices still may not subscribe: nobody may).
    let open_port = free_port();
    let _open =
        Edge::start_named(dir.path(), "open", "gw-2", Mqtt::Embedded(open_port), "http://127.0.0.1:9", "").await;
    let a = impersonate(session(open_port, "dev-a", None).await, "dev-a", "dev-b").await;
    assert_eq!(a.subscribe, [SubscribeReasonCode::Failure]);
    assert!(!a.cut_off, "the open listener let dev-a publish as dev-b");
    wait_for("the impersonated reading arrived at the open agent", Duration::from_secs(10), || async {
        logged(&dir.path().join("open-data")).contains(&("dev-b".to_string(), 100)).then_some(())
    })
    .await;
}
