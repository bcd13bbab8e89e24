//! The agent in-process with its embedded broker, fed by a real MQTT client:
//! bad payloads are refused, counted and quarantined, and good ones around
//! them are unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use kappa_common::{Reading, device};
use kappa_edge::agent::Agent;
use kappa_edge::config::EdgeConfig;
use kappa_edge::log::EdgeLog;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(dir: &std::path::Path, mqtt_port: u16) -> EdgeConfig {
    EdgeConfig::from_toml(&format!(
        r#"
gateway_id = "gw-bad-input"
data_dir = {:?}
[mqtt]
mode = "embedded"
listen = "127.0.0.1:{mqtt_port}"
[forward]
# Nothing listens here: readings stay in the log for inspection.
cloud_url = "http://127.0.0.1:9"
[http]
listen = "127.0.0.1:0"
"#,
        dir.join("data")
    ))
    .unwrap()
}

fn reading(seq: u64) -> Reading {
    Reading {
        device: "dev-1".into(),
        boot: 1,
        seq,
        ts_ms: 1_767_225_600_000 + seq as i64,
        schema: 2,
        metrics: [("temperature".to_string(), Some(21.0))].into(),
        tags: Default::default(),
    }
}

/// Publishes each payload at QoS 1 and waits for every PUBACK.
async fn publish_all(port: u16, payloads: Vec<(String, Vec<u8>)>) {
    let mut opts = MqttOptions::new("bad-input-test", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 64);
    let n = payloads.len();
    for (topic, payload) in payloads {
        client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await
    .expect("every publish acknowledged");
}

async fn metrics(agent: &Agent) -> String {
    reqwest::get(format!("http://{}/metrics", agent.http_addr())).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_by_reason_and_quarantined_while_good_ones_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(dir.path(), port);
    let log_path = cfg.log_path();
    let agent = Agent::start(cfg).await.unwrap();

    let topic = "devices/dev-1/telemetry".to_string();
    let unknown_version = br#"{"v":9,"boot":1,"seq":5,"ts":1767225600000,"data":{"temperature":1}}"#.to_vec();
    let mut oversized = device::encode_cbor(&reading(6));
    oversized.resize(8000, 0);
    publish_all(
        port,
        vec![
            (topic.clone(), device::encode_cbor(&reading(1))),
            (topic.clone(), b"\xff\x00 definitely not cbor".to_vec()),
            (topic.clone(), device::encode_json(&reading(2))),
            (topic.clone(), unknown_version),
            (topic.clone(), oversized),
            (topic.clone(), b"{\"v\":2, broken json".to_vec()),
            (topic.clone(), device::encode_cbor(&reading(3))),
            (topic.clone(), device::encode_cbor(&reading(3))),
        ],
    )
    .await;

    let text = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = metrics(&agent).await;
            if text.contains("kappa_edge_readings_committed_total 3")
                && text.contains("kappa_edge_readings_duplicate_total 1")
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("three good readings committed, one duplicate");
    for reason in ["malformed_cbor", "unknown_schema", "too_large", "malformed_json"] {
        assert!(
            text.contains(&format!("kappa_edge_readings_rejected_total{{reason=\"{reason}\"}} 1")),
            "{reason} not counted once:\n{text}"
        );
    }

    let stats = EdgeLog::open_read_only(&log_path).unwrap().stats().unwrap();
    assert_eq!((stats.readings, stats.quarantined), (3, 4), "{stats:?}");
    agent.shutdown();
    agent.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_port_in_use_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Agent::start(config(dir.path(), port)).await.unwrap_err();
    assert!(err.to_string().contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
}
