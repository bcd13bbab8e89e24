//! Batches the cloud refuses are never lost. A cloud whose limits are
//! lowered below the edge's batch size gets the batches in halves; a reading
//! too large for it even alone becomes a dead letter that retention does
//! not touch, and an operator resends it once the cloud takes it again.

use std::time::Duration;

use kappa_tests::harness::*;

/// Runs `kappa-edge log dead-letters ARGS` against the agent's config.
fn dead_letters(edge: &Edge, args: &[&str]) -> String {
    let config = edge.config.to_str().unwrap();
    let out = std::process::Command::new(bin())
        .args(["edge", "log", "dead-letters"])
        .args(args)
        .args(["--config", config])
        .output()
        .expect("run kappa-edge log dead-letters");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_are_split_or_kept_until_resent_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    // 300 readings per batch at most: the edge sends up to 2,000.
    let limits = |ingest: &str| format!("{FLEET_PROCESSOR}[ingest]\n{ingest}\n");
    let mut cloud = Cloud::start_with(dir.path(), "cloud", &limits("max_readings = 300"), &[]).await;
    let mqtt = free_port();
    // Retention as short as it goes, so it would take anything it may.
    let extra = "\n[log]\nretention = \"1s\"\nhousekeeping_interval = \"300ms\"\n";
    let edge = Edge::start_named(dir.path(), "edge", "gw-dl", Mqtt::Embedded(mqtt), &cloud.url(), extra).await;

    let mut fleet = Fleet::new(20, 200, 100.0);
    fleet.name = "sim-a".into();
    let mut sim = fleet.start(mqtt, dir.path());
    let truth_a = Fleet::finish(&mut sim, dir.path()).await;
    wait_for_readings(&cloud.url(), truth_a.acked, Duration::from_secs(60)).await;
    let split = edge.metric("kappa_edge_forward_batches_split_total").await.unwrap_or(0.0);
    assert!(split > 0.0, "the agent split batches the cloud found too large\n{}", edge.proc.tail());
    assert_eq!(edge.metric("kappa_edge_forward_batches_dead_lettered_total").await.unwrap_or(0.0), 0.0);

    // Now the cloud takes no batch at all (one reading is over its limit):
    // halves down to single readings, then dead letters.
    assert!(cloud.proc.terminate().await.success());
    cloud.reconfigure(&limits("max_decompressed_bytes = 16"));
    cloud.restart().await;
    let mut fleet = Fleet::new(3, 4, 10.0);
    fleet.name = "sim-b".into();
    fleet.id_prefix = "late-".into();
    fleet.start_ms = T0 + 3_600_000;
    let mut sim = fleet.start(mqtt, dir.path());
    let truth_b = Fleet::finish(&mut sim, dir.path()).await;
    wait_for("the refused readings kept as dead letters", Duration::from_secs(60), || async {
        (edge.metric("kappa_edge_dead_letter_readings").await == Some(truth_b.acked as f64)).then_some(())
    })
    .await;
    // Several housekeeping passes past the 1 s retention: they stay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(edge.metric("kappa_edge_dead_letter_readings").await, Some(truth_b.acked as f64), "retention kept them");
    let listed = dead_letters(&edge, &["list"]);
    assert_eq!(listed.lines().count() as u64, truth_b.acked, "one dead letter per reading: {listed}");
    assert!(listed.contains("HTTP 413"), "{listed}");

    // The operator fixes the cloud and resends them all.
    assert!(cloud.proc.terminate().await.success());
    cloud.reconfigure(FLEET_PROCESSOR);
    cloud.restart().await;
    let resent = dead_letters(&edge, &["resend", "--all"]);
    assert!(resent.contains(&format!("\"readings\":{}", truth_b.acked)), "{resent}");
    wait_for_readings(&cloud.url(), truth_a.acked + truth_b.acked, Duration::from_secs(60)).await;
    assert!(dead_letters(&edge, &["list"]).is_empty());
    wait_for("the gauge to follow", Duration::from_secs(30), || async {
        (edge.metric("kappa_edge_dead_letter_readings").await == Some(0.0)).then_some(())
    })
    .await;
    let rows = fetch_rows(&cloud.url(), "device_totals").await;
    assert_eq!(total(&rows), truth_a.acked + truth_b.acked, "every acknowledged reading, once");
}
