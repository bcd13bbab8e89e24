//! The agent against a locked-down Mosquitto: no anonymous clients, a login
//! per device, and topic rights that deny by default (a device may publish
//! only to its own telemetry topic). The agent logs in with a password it
//! reads from the environment, which never reaches its log.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kappa_common::device;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};

use kappa_tests::harness::*;

/// Runs `kappa-edge mosquitto credentials` for the agent and `devices` into
/// `dir/creds`; the passwords it created, by login, and the password and ACL files.
pub fn credentials(dir: &std::path::Path, devices: &[&str]) -> (HashMap<String, String>, PathBuf, PathBuf) {
    let out = dir.join("creds");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["edge", "mosquitto", "credentials", "--out", out.to_str().unwrap()]);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let run = cmd.output().expect("run kappa-edge mosquitto credentials");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let csv = std::fs::read_to_string(out.join("new-credentials.csv")).expect("new credentials");
    let passwords = csv.lines().skip(1).filter_map(|l| l.split_once(',')).map(|(u, p)| (u.into(), p.into())).collect();
    (passwords, out.join("kappa.passwd"), out.join("kappa.acl"))
}

/// A device's MQTT session after CONNACK: the client, the CONNACK code, and
/// the packets it receives (the channel closes when the connection ends).
pub type Session = (AsyncClient, ConnectReturnCode, tokio::sync::mpsc::UnboundedReceiver<Packet>);

/// A plain-text session as `id` with an optional `login`.
pub async fn session(port: u16, id: &str, login: Option<(&str, &str)>) -> Session {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    session_with(opts).await.unwrap_or_else(|e| panic!("{id}: {e}"))
}

/// A session with `opts`; a connection that fails before CONNACK (a TLS
/// handshake refused, say) is an error.
pub async fn session_with(opts: MqttOptions) -> Result<Session, rumqttc::ConnectionError> {
    let (client, mut events) = AsyncClient::new(opts, 64);
    let code = loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack.code,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => break code,
            Err(e) => return Err(e),
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if code == ConnectReturnCode::Success {
        tokio::spawn(async move {
            while let Ok(ev) = events.poll().await {
                if let Event::Incoming(p) = ev
                    && tx.send(p).is_err()
                {
                    break;
                }
            }
        });
    }
    Ok((client, code, rx))
}

/// A CBOR reading of `device_id` with sequence number `seq`.
pub fn reading(device_id: &str, seq: u64) -> Vec<u8> {
    device::encode_cbor(&kappa_common::Reading {
        device: device_id.into(),
        boot: 1,
        seq,
        ts_ms: T0 + seq as i64 * 1000,
        schema: 2,
        metrics: [("temperature".to_string(), Some(20.0))].into(),
        tags: Default::default(),
    })
}

/// Every (device, seq) in an agent's log.
pub fn logged(edge_data: &std::path::Path) -> std::collections::BTreeSet<(String, u64)> {
    let log = kappa_edge::log::EdgeLog::open_read_only(&edge_data.join("edge-log.sqlite")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    log.export(i64::MIN, i64::MAX, |r| {
        seen.insert((r.device.clone(), r.seq));
        Ok(())
    })
    .unwrap();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_down_broker_keeps_each_device_to_its_own_topic() {
    let dir = tempfile::tempdir().unwrap();
    // The files come from the CLI; Mosquitto itself checks its hashes and rules.
    let (passwords, pw, acl) = credentials(dir.path(), &["dev-a", "dev-b"]);
    let conf = dir.path().join("locked.conf");
    let agent_password = passwords["kappa-edge"].clone();
    let (pw_a, pw_b) = (passwords["dev-a"].as_str(), passwords["dev-b"].as_str());
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\n",
            pw.display(),
            acl.display()
        ),
    )
    .unwrap();
    let broker = Proc::spawn_cmd("mosquitto-locked", "mosquitto", &["-c", conf.to_str().unwrap()], dir.path());
    wait_for_port(port).await;

    let mqtt = Mqtt::External { port, topic_prefix: String::new(), client_id: "kappa-edge-auth-test".into() };
    let env = [("KAPPA_EDGE__MQTT__USERNAME", "kappa-edge"), ("KAPPA_EDGE_MQTT_PASSWORD", agent_password.as_str())];
    let edge = Edge::start_env(dir.path(), "edge", "gw-test", mqtt, "http://127.0.0.1:9", "", &env).await;
    let ready = format!("http://127.0.0.1:{}/readyz", edge.http_port);
    wait_for("the agent logged in", Duration::from_secs(10), || async { (status(&ready).await == 200).then_some(()) })
        .await;

    // Anonymous and wrong-password clients are refused at CONNECT.
    assert_ne!(session(port, "nobody", None).await.1, ConnectReturnCode::Success);
    assert_ne!(session(port, "dev-a-2", Some(("dev-a", "wrong"))).await.1, ConnectReturnCode::Success);

    let (a, code, mut a_events) = session(port, "dev-a", Some(("dev-a", pw_a))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (b, code, _b_events) = session(port, "dev-b", Some(("dev-b", pw_b))).await;
    assert_eq!(code, ConnectReturnCode::Success);
    // dev-a listens to everything: the rights let it read nothing.
    a.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 1..=5 {
        a.publish("devices/dev-a/telemetry", QoS::AtLeastOnce, false, reading("dev-a", seq)).await.unwrap();
        // dev-a impersonating dev-b (seq 100+): denied by the topic rights.
        a.publish("devices/dev-b/telemetry", QoS::AtLeastOnce, false, reading("dev-b", 100 + seq)).await.unwrap();
    }
    for seq in 1..=3 {
        b.publish("devices/dev-b/telemetry", QoS::AtLeastOnce, false, reading("dev-b", seq)).await.unwrap();
    }
    wait_for("the permitted readings committed", Duration::from_secs(10), || async {
        (edge.metric("kappa_edge_readings_committed_total").await == Some(8.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut a_received = 0;
    while let Ok(p) = a_events.try_recv() {
        if matches!(p, Packet::Publish(_)) {
            a_received += 1;
        }
    }
    assert_eq!(a_received, 0, "dev-a subscribed to # and must read nothing");
    let seen = logged(&dir.path().join("edge-data"));
    let expected: std::collections::BTreeSet<(String, u64)> =
        (1..=5).map(|s| ("dev-a".to_string(), s)).chain((1..=3).map(|s| ("dev-b".to_string(), s))).collect();
    assert_eq!(seen, expected, "exactly the permitted readings, none of the impersonated ones");

    let agent_log = std::fs::read_to_string(&edge.proc.log).unwrap_or_default();
    assert!(!agent_log.contains(&agent_password), "the password leaked into the agent's log");
    drop(broker);
}

/// A wrong password: the agent stays up, says why, and is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_wrong_password_is_not_ready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pw, _) = credentials(dir.path(), &["dev-a"]);
    let conf = dir.path().join("locked.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\n",
            pw.display()
        ),
    )
    .unwrap();
    let _broker = Proc::spawn_cmd("mosquitto-locked", "mosquitto", &["-c", conf.to_str().unwrap()], dir.path());
    wait_for_port(port).await;
    let mqtt = Mqtt::External { port, topic_prefix: String::new(), client_id: "kappa-edge-auth-test".into() };
    let env = [("KAPPA_EDGE__MQTT__USERNAME", "kappa-edge"), ("KAPPA_EDGE_MQTT_PASSWORD", "not-the-password")];
    let edge = Edge::start_env(dir.path(), "edge", "gw-test", mqtt, "http://127.0.0.1:9", "", &env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&format!("http://127.0.0.1:{}/readyz", edge.http_port)).await, 503);
    let log = std::fs::read_to_string(&edge.proc.log).unwrap_or_default();
    assert!(log.contains("Lost the external MQTT broker"), "{}", edge.proc.tail());
    assert!(!log.contains("not-the-password"), "the password leaked into the agent's log");
}
