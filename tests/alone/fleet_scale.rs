//! A fleet of 10,000 devices, each with its own MQTT connection, from one
//! simulator process into the agent's own listener.

use std::time::Duration;

use kappa_tests::harness::*;

/// One simulator process runs 10,000 devices, each with its own MQTT
/// connection held for a minute while it publishes one reading a second:
/// all 10,000 are connected at once, none is refused, and every reading is
/// acknowledged and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_publish_for_a_minute_into_one_agent() {
    let _alone = crate::alone().await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    // No cloud: this is about the fleet and the agent's intake.
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), "http://127.0.0.1:9").await;
    let mut sim = Fleet::new(10_000, 60, 1.0).start(mqtt_port, dir.path());
    let connected = wait_for("10,000 devices connected at once", Duration::from_secs(60), || async {
        edge.metric("kappa_edge_mqtt_connections").await.filter(|n| *n >= 10_000.0)
    })
    .await;
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!((truth.sampled, truth.acked, truth.dropped_on_device), (600_000, 600_000, 0));
    let committed = wait_for("every reading committed", Duration::from_secs(60), || async {
        edge.metric("kappa_edge_readings_committed_total").await.filter(|n| *n >= 600_000.0)
    })
    .await;
    assert_eq!(committed, 600_000.0, "{}", edge.proc.tail());
    assert_eq!(connected, 10_000.0);
    // The agent refused nobody by its own limits or rules. A connection a
    // device gave up on before the agent read its CONNECT (on a loaded
    // machine, 10,000 arrive within seconds) is counted too, under
    // `timeout` or `closed_before_connect`; the device reconnects, and the
    // counts above show every one got in and had every reading acknowledged.
    let url = format!("http://127.0.0.1:{}", edge.http_port);
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let refused: Vec<&str> =
        text.lines().filter(|l| l.starts_with("kappa_edge_mqtt_connections_refused_total{")).collect();
    let by_the_agent: Vec<&&str> = refused
        .iter()
        .filter(|l| !l.contains(r#"reason="timeout""#) && !l.contains(r#"reason="closed_before_connect""#))
        .collect();
    assert!(by_the_agent.is_empty(), "refused: {refused:?}\n{}", edge.proc.tail());
    if !refused.is_empty() {
        eprintln!("connections the devices gave up on before CONNECT: {refused:?}");
    }
    assert_eq!(edge.metric("kappa_edge_readings_rejected_total").await, None);
    eprintln!("10,000 devices x 60 readings: the agent's peak RSS was {:.1} MiB", edge.proc.peak_rss_mib());
}
