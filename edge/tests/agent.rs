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
    kappa_runtime::net::free_port().unwrap()
}

fn config(dir: &std::path::Path, mqtt_port: u16, extra: &str) -> EdgeConfig {
    EdgeConfig::from_toml(&format!(
        r#"
gateway_id = "gw-bad-input"
data_dir = {:?}
[mqtt]
mode = "embedded"
listen = "127.0.0.1:{mqtt_port}"
[clock]
max_behind = "36500d"     # the test readings are from 2026-01-01
[forward]
# Nothing listens here: readings stay in the log for inspection.
cloud_url = "http://127.0.0.1:9"
[http]
listen = "127.0.0.1:0"
{extra}
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
    let cfg = config(dir.path(), port, "");
    let log_path = cfg.log_path();
    let agent = Agent::start(cfg).await.unwrap();

    let topic = "devices/dev-1/telemetry".to_string();
    let unknown_version = br#"{"v":9,"boot":1,"seq":5,"ts":1767225600000,"data":{"temperature":1}}"#.to_vec();
    let from_2099 = br#"{"v":2,"boot":1,"seq":7,"ts":4070908800000,"data":{"temperature":1}}"#.to_vec();
    let mut oversized = device::encode_cbor(&reading(6));
    oversized.resize(8000, 0);
    publish_all(
        port,
        vec![
            (topic.clone(), device::encode_cbor(&reading(1))),
            (topic.clone(), b"\xff\x00 definitely not cbor".to_vec()),
            (topic.clone(), device::encode_json(&reading(2))),
            (topic.clone(), unknown_version),
            (topic.clone(), from_2099),
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
    for reason in ["malformed_cbor", "unknown_schema", "too_large", "malformed_json", "clock_skew"] {
        assert!(
            text.contains(&format!("kappa_edge_readings_rejected_total{{reason=\"{reason}\"}} 1")),
            "{reason} not counted once:\n{text}"
        );
    }

    let stats = EdgeLog::open_read_only(&log_path).unwrap().stats().unwrap();
    assert_eq!((stats.readings, stats.quarantined), (3, 5), "{stats:?}");
    agent.shutdown();
    agent.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_port_in_use_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Agent::start(config(dir.path(), port, "")).await.unwrap_err();
    assert!(err.to_string().contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
}

/// Observations of a histogram on a metrics page at or below `bound` seconds.
fn at_or_below(text: &str, histogram: &str, bound: f64) -> f64 {
    let prefix = format!("{histogram}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            Some((le.parse::<f64>().ok()?, count.trim().parse::<f64>().ok()?))
        })
        .filter(|(le, _)| *le <= bound)
        .map(|(_, count)| count)
        .fold(0.0, f64::max)
}

/// Group commit at low load: a reading that arrives after a quiet spell is
/// committed at once, not after the linger; one that follows another closely
/// still lingers for company.
///
/// The bounds are halves of the linger, and commits skip the fsync
/// (`durability = "normal"`): a slow disk under a loaded CI machine once took
/// 0.7 s per fsync, which is not what this test is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_after_a_quiet_spell_does_not_wait_for_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent =
        Agent::start(config(dir.path(), port, "[log]\ncommit_linger = \"3s\"\ndurability = \"normal\"")).await.unwrap();
    let topic = "devices/dev-1/telemetry".to_string();
    let committed = |n: u64| {
        let agent = &agent;
        async move {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !metrics(agent).await.contains(&format!("kappa_edge_readings_committed_total {n}")) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("committed");
        }
    };
    publish_all(port, vec![(topic.clone(), device::encode_cbor(&reading(1)))]).await;
    committed(1).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    publish_all(port, vec![(topic.clone(), device::encode_cbor(&reading(2)))]).await;
    committed(2).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    publish_all(port, vec![(topic.clone(), device::encode_cbor(&reading(3)))]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_all(port, vec![(topic.clone(), device::encode_cbor(&reading(4)))]).await;
    committed(4).await;

    let text = metrics(&agent).await;
    let h = "kappa_edge_ingest_to_durable_seconds";
    assert!(text.contains(&format!("{h}_count 4")), "{text}");
    assert_eq!(at_or_below(&text, h, 1.5), 3.0, "three readings came after quiet spells:\n{text}");
    assert_eq!(at_or_below(&text, h, 2.5), 3.0, "the fourth followed the third closely and lingered:\n{text}");
    agent.shutdown();
    agent.wait().await.unwrap();
}
