//! A fleet of 10,000 devices, each with its own MQTT connection, from one
//! simulator process into one agent.

use std::time::Duration;

use crate::util::*;

/// One simulator process runs 10,000 devices, each with its own MQTT
/// connection, and every reading they publish is committed by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_run_in_one_simulator_process() {
    let _alone = crate::alone().await;
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    // No cloud: this is about the fleet and the agent's intake.
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), "http://127.0.0.1:9").await;
    let mut sim = Fleet::new(10_000, 3, 1.0).start(mqtt_port, dir.path());
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!((truth.sampled, truth.acked, truth.dropped_on_device), (30_000, 30_000, 0));
    let committed = wait_for("every reading committed", Duration::from_secs(60), || async {
        edge.metric("kappa_edge_readings_committed_total").await.filter(|n| *n >= 30_000.0)
    })
    .await;
    assert_eq!(committed, 30_000.0, "{}", edge.proc.tail());
}
