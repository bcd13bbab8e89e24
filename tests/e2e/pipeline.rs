//! A fleet through edge and cloud into the views: exact against the ground
//! truth, with and without crashes.

use std::time::Duration;

use kappa_cloud::api::RowOut;
use kappa_sim::truth::GroundTruth;

use kappa_tests::harness::*;

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

/// Kills the agent with SIGKILL `kills` times, 1 to 4 s apart (seeded), while
/// 50 devices publish to it (`embedded`: to the agent's own listener, else
/// through a private Mosquitto), then returns the ground truth (every reading
/// a device got a PUBACK for) and the `device_windows` rows once the agent's
/// backlog is empty and the views hold every acknowledged reading (or
/// `settle` passed).
async fn kill_the_agent_repeatedly(
    embedded: bool,
    kills: u32,
    env: &[(&str, &str)],
    settle: Duration,
) -> (tempfile::TempDir, GroundTruth, Vec<RowOut>, Vec<Proc>) {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let mut procs = Vec::new();
    let (mqtt, port) = if embedded {
        let port = free_port();
        (Mqtt::Embedded(port), port)
    } else {
        let mosquitto = Mosquitto::start(dir.path()).await;
        let port = mosquitto.port;
        procs.push(mosquitto.proc);
        (Mqtt::External { port, topic_prefix: String::new(), client_id: "kappa-edge-kill-test".into() }, port)
    };
    let mut edge = Edge::start_env(dir.path(), "edge", "gw-test", mqtt, &cloud.url(), "", env).await;

    // 1-4 s between kills: enough cycles to land in every phase (mid-commit,
    // mid-batch, just after a restart) while the whole run stays short.
    let readings = 30 * (kills as u64 * 3 + 6);
    let mut sim = Fleet::new(50, readings, 30.0).start(port, dir.path());
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..kills {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(1000 + rng % 3000)).await;
        edge.proc.kill9().await;
        edge.restart(embedded).await;
        // The restarted agent forwards again within 5 s of starting.
        wait_for("forwarding to resume after a kill", Duration::from_secs(5), || async {
            (edge.metric("kappa_edge_forward_batches_total").await.unwrap_or(0.0) >= 1.0).then_some(())
        })
        .await;
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 50 * readings);
    wait_for("the agent's backlog to drain", SETTLE, || async {
        (edge.metric("kappa_edge_backlog_readings").await == Some(0.0)).then_some(())
    })
    .await;
    wait_for_readings(&cloud.url(), truth.acked, settle).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    procs.extend([cloud.proc, edge.proc]);
    (dir, truth, rows, procs)
}

/// The agent is killed with SIGKILL twenty times while the fleet publishes
/// to its own MQTT listener (the default mode): every reading a device got a
/// PUBACK for is in the views exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_twenty_times_in_the_default_mode_loses_and_duplicates_nothing() {
    let (_dir, truth, rows, procs) = kill_the_agent_repeatedly(true, 20, &[], SETTLE).await;
    assert_exact(&truth, &rows, &procs.iter().collect::<Vec<_>>());
}

/// Negative control for the default mode: with PUBACKs sent on receipt
/// instead of after the commit, the same kills lose acknowledged readings,
/// and the comparison sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_listener_acknowledging_before_commit_loses_readings_under_kills() {
    let env = [(kappa_edge::agent::FAULT_ACK_ON_RECEIPT, "1")];
    let (_dir, truth, rows, _procs) = kill_the_agent_repeatedly(true, 8, &env, Duration::from_secs(10)).await;
    let problems = diff_against_truth(&truth, &rows);
    assert!(
        total(&rows) < truth.acked && !problems.is_empty(),
        "acknowledging before commit lost nothing in 8 kills: the kill test could not tell"
    );
}

/// The agent is killed with SIGKILL twenty times while the fleet publishes
/// through a broker that keeps the agent's session (Mosquitto, external mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_edge_agent_twenty_times_loses_and_duplicates_nothing() {
    let (_dir, truth, rows, procs) = kill_the_agent_repeatedly(false, 20, &[], SETTLE).await;
    assert_exact(&truth, &rows, &procs.iter().collect::<Vec<_>>());
}

/// Negative control: with acknowledgements sent on receipt instead of after
/// the commit, the same kills lose readings, and the comparison sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_acknowledging_before_commit_loses_readings_under_kills() {
    let env = [(kappa_edge::agent::FAULT_ACK_ON_RECEIPT, "1")];
    let (_dir, truth, rows, _procs) = kill_the_agent_repeatedly(false, 8, &env, Duration::from_secs(10)).await;
    let problems = diff_against_truth(&truth, &rows);
    assert!(
        total(&rows) < truth.acked && !problems.is_empty(),
        "acknowledging before commit lost nothing in 8 kills: the kill test could not tell"
    );
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

/// The cloud is gone for over a minute while the fleet keeps publishing: the
/// outage only grows the gateway's backlog; when the cloud is back the
/// backlog drains while the fleet is still publishing, and the views end
/// exactly equal to the ground truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_long_cloud_outage_only_grows_the_backlog_which_drains_while_devices_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start(dir.path()).await;
    let mqtt_port = free_port();
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), &cloud.url()).await;

    // 120 s of publishing: 50 devices at 10 readings/s.
    let started = std::time::Instant::now();
    let mut sim = Fleet::new(50, 1200, 10.0).start(mqtt_port, dir.path());
    tokio::time::sleep(Duration::from_secs(8)).await;
    cloud.proc.kill9().await;
    let mut backlog = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(16)).await;
        backlog.push(edge.metric("kappa_edge_backlog_readings").await.unwrap_or(0.0));
    }
    assert!(backlog.windows(2).all(|w| w[1] > w[0]), "the backlog grows through the outage: {backlog:?}");
    assert!(backlog[3] > 25_000.0, "about 64 s of 500 readings/s waited: {backlog:?}");
    cloud.restart().await;

    // The cloud is back about 72 s in; the fleet publishes until about 120 s.
    wait_for("the backlog to drain", Duration::from_secs(35), || async {
        (edge.metric("kappa_edge_backlog_readings").await.unwrap_or(f64::MAX) < 2_000.0).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(115),
        "the backlog should have drained while the fleet was still publishing"
    );
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 50 * 1200);
    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc]);
    assert!(edge.metric("kappa_edge_forward_failures_total").await.unwrap_or(0.0) > 0.0);

    // The agent's log tells the outage in a few lines, not one per retry of
    // every batch: a warning when it starts, a note when the cloud answers
    // again and another when the backlog is sent.
    let log = || strip_ansi(&std::fs::read_to_string(&edge.proc.log).unwrap_or_default());
    wait_for("the agent to log that the backlog is sent", Duration::from_secs(60), || async {
        log().contains("Sent the backlog of the outage").then_some(())
    })
    .await;
    let log = log();
    let warned = log.matches("Cannot forward to the cloud").count();
    assert!((1..=5).contains(&warned), "one warning per outage, not one per retry: {warned}\n{log}");
    assert!(log.contains("The cloud accepts batches again"), "{log}");
    assert!(!log.contains("Forwarding failed"), "retries are logged at debug: {log}");
}

/// SIGTERM under load: the agent three times and the cloud twice while the
/// fleet publishes. Each exits with status 0 within its shutdown deadline
/// (never by the deadline's abort), restarts cleanly, and the views end
/// exact against the ground truth. The deadlines come from environment
/// overrides (`KAPPA_EDGE__SHUTDOWN_DEADLINE`, `KAPPA_CLOUD__SHUTDOWN_DEADLINE`),
/// so this also shows those reaching the processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_within_the_deadline_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (edge_deadline, cloud_deadline) = (Duration::from_secs(3), Duration::from_secs(4));
    let cloud_env = [("KAPPA_CLOUD__SHUTDOWN_DEADLINE", "4s")];
    let mut cloud = Cloud::start_with(dir.path(), "cloud", FLEET_PROCESSOR, &cloud_env).await;
    let mosquitto = Mosquitto::start(dir.path()).await;
    let mqtt =
        Mqtt::External { port: mosquitto.port, topic_prefix: String::new(), client_id: "kappa-edge-term-test".into() };
    let edge_env = [("KAPPA_EDGE__SHUTDOWN_DEADLINE", "3s")];
    let mut edge = Edge::start_env(dir.path(), "edge", "gw-test", mqtt, &cloud.url(), "", &edge_env).await;

    let mut sim = Fleet::new(50, 900, 30.0).start(mosquitto.port, dir.path());
    let stop = |what: &'static str,
                deadline: Duration,
                started: std::time::Instant,
                status: std::process::ExitStatus| {
        let took = started.elapsed();
        assert!(status.success(), "{what} exited with {status} after SIGTERM");
        assert!(took < deadline + Duration::from_millis(1500), "{what} took {took:?} to stop (deadline {deadline:?})");
    };
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let t = std::time::Instant::now();
        let status = edge.proc.terminate().await;
        stop("the agent", edge_deadline, t, status);
        edge.restart(false).await;
        if round < 2 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let t = std::time::Instant::now();
            let status = cloud.proc.terminate().await;
            stop("the cloud", cloud_deadline, t, status);
            cloud.restart().await;
        }
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 50 * 900);
    wait_for_readings(&cloud.url(), truth.acked, SETTLE).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    assert_exact(&truth, &rows, &[&cloud.proc, &edge.proc]);
    for (proc, deadline) in [(&edge.proc, "shutdown_deadline=3s"), (&cloud.proc, "shutdown_deadline=4s")] {
        let log = strip_ansi(&std::fs::read_to_string(&proc.log).unwrap_or_default());
        assert!(log.contains(deadline), "the override did not reach {}: {}", proc.name, proc.tail());
        assert!(
            !log.contains("Shutdown deadline passed"),
            "{} needed the deadline's abort: {}",
            proc.name,
            proc.tail()
        );
    }
}

/// The text of a log without its terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Readiness follows the agent's MQTT side: ready while connected to the
/// gateway's broker, 503 (with the reason) while the broker is gone, ready
/// again once it is back; `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_ready_only_while_its_broker_is_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path()).await;
    let mqtt =
        Mqtt::External { port: mosquitto.port, topic_prefix: String::new(), client_id: "kappa-edge-ready-test".into() };
    let edge = Edge::start(dir.path(), mqtt, "http://127.0.0.1:9").await;
    let base = format!("http://127.0.0.1:{}", edge.http_port);
    let ready = format!("{base}/readyz");
    wait_for("ready once connected", Duration::from_secs(10), || async { (status(&ready).await == 200).then_some(()) })
        .await;
    mosquitto.proc.kill9().await;
    wait_for("not ready without the broker", Duration::from_secs(10), || async {
        (status(&ready).await == 503).then_some(())
    })
    .await;
    let why = reqwest::get(&ready).await.unwrap().text().await.unwrap();
    assert!(why.contains("MQTT side is down"), "{why}");
    assert_eq!(status(&format!("{base}/healthz")).await, 200, "alive all the same");
    mosquitto.restart(dir.path()).await;
    wait_for("ready again", Duration::from_secs(15), || async { (status(&ready).await == 200).then_some(()) }).await;
}
