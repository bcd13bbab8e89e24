//! A fleet through edge and cloud into the views: exact against the ground
//! truth, with and without crashes.

use std::time::Duration;

use crate::util::*;

const SETTLE: Duration = Duration::from_secs(90);

/// A fleet mixing schema versions and encodings lands exactly in the views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_through_edge_and_cloud_lands_exactly_in_the_views() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let mqtt_port = free_port();
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), &cloud.url()).await;

    // Schema evolution: old (v1: temp, hum, ...) and new firmware, CBOR and
    // JSON devices, in one fleet; all land in the same view columns.
    let mut fleet = Fleet::new(50, 600, 40.0);
    fleet.v1_share = 0.3;
    fleet.json_share = 0.3;
    let mut sim = fleet.start(mqtt_port, dir.path());
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 50 * 600, "every reading should have been acknowledged");

    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc]);
    assert_eq!(edge.metric("kappa_edge_readings_rejected_total").await, None, "nothing was rejected");
    let log = kappa_edge::log::EdgeLog::open_read_only(&dir.path().join("edge-data/edge-log.sqlite")).unwrap();
    let mut by_schema = [0u64; 3];
    log.export(i64::MIN, i64::MAX, |r| {
        by_schema[usize::from(r.schema.min(2))] += 1;
        Ok(())
    })
    .unwrap();
    assert!(by_schema[1] > 3000 && by_schema[2] > 3000, "both schema versions were in the fleet: {by_schema:?}");
}

/// The agent is killed with SIGKILL three times while the fleet publishes.
/// It runs against a broker that keeps its session (Mosquitto), which is
/// where "acknowledged only after commit" holds; see docs/edge.md for what
/// the embedded broker does and does not promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_edge_agent_mid_run_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let mosquitto = Mosquitto::start(dir.path()).await;
    let mqtt =
        Mqtt::External { port: mosquitto.port, topic_prefix: String::new(), client_id: "kappa-edge-kill-test".into() };
    let mut edge = Edge::start(dir.path(), mqtt, &cloud.url()).await;

    let mut sim = Fleet::new(50, 600, 30.0).start(mosquitto.port, dir.path());
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        edge.proc.kill9().await;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        edge.restart(false).await;
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(kills, 3);
    assert_eq!(truth.acked, 50 * 600);

    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc, &mosquitto.proc]);
}

/// The cloud is killed with SIGKILL twice while batches flow; the edge keeps
/// the backlog and resends, the cloud resumes from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_cloud_mid_run_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(dir.path()).await;
    let mqtt_port = free_port();
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), &cloud.url()).await;

    let mut sim = Fleet::new(50, 600, 30.0).start(mqtt_port, dir.path());
    for pause in [Duration::from_secs(2), Duration::from_millis(200)] {
        tokio::time::sleep(Duration::from_secs(5)).await;
        cloud.proc.kill9().await;
        tokio::time::sleep(pause).await;
        cloud.restart().await;
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 50 * 600);

    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc]);
    let retried = edge.metric("kappa_edge_forward_failures_total").await.unwrap_or(0.0);
    assert!(retried > 0.0, "the edge should have seen the cloud go away");
}

/// The agent against the Mosquitto this machine runs on 127.0.0.1:1883, in
/// its own topic namespace so other users of that broker are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_agent_works_against_the_machines_mosquitto() {
    assert!(
        std::net::TcpStream::connect("127.0.0.1:1883").is_ok(),
        "Mosquitto must listen on 127.0.0.1:1883 (start it with: mosquitto -d -c /etc/mosquitto/mosquitto.conf)"
    );
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let run = format!("{}-{}", std::process::id(), free_port());
    let prefix = format!("kappa-test-{run}/");
    let client_id = format!("kappa-edge-test-{run}");
    let mqtt = Mqtt::External { port: 1883, topic_prefix: prefix.clone(), client_id: client_id.clone() };
    let mut edge = Edge::start(dir.path(), mqtt, &cloud.url()).await;

    let mut fleet = Fleet::new(20, 100, 20.0);
    fleet.topic_prefix = prefix;
    fleet.id_prefix = format!("m{run}-");
    let mut sim = fleet.start(1883, dir.path());
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 20 * 100);

    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc]);
    edge.proc.terminate().await;
}

/// One simulator process runs 10,000 devices, each with its own MQTT
/// connection, and every reading they publish is committed by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_run_in_one_simulator_process() {
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
