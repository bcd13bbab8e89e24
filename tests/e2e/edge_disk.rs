//! The edge agent on a tiny filesystem: the shedding policy at the free-space
//! floor, a real ENOSPC that pauses acknowledgements without crashing, and
//! an exact account of every reading that did not reach the cloud.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kappa_tests::harness::*;

/// A tmpfs of `size` mounted at `at`, unmounted when dropped. Needs root
/// (CI runs as root); anything else is a clear failure, not a skip.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()])
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as the agent's data dir and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        kappa_runtime::limits::disk_space(&self.0).unwrap().0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", self.0.to_str().unwrap_or_default()]).status();
    }
}

/// Writes a file until the filesystem refuses more.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 << 10];
    let mut written = 0;
    for size in [chunk.len(), 4096, 512] {
        while f.write_all(&chunk[..size]).and_then(|_| f.flush()).is_ok() {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    written
}

/// A stopped cloud and an agent whose data dir is a 16 MiB tmpfs with `log`
/// settings appended; devices reach it through a private Mosquitto
/// (external mode) or its own listener (`embedded`, with `env` set).
struct Rig {
    dir: tempfile::TempDir,
    cloud: Cloud,
    /// Where devices connect.
    mqtt_port: u16,
    /// External mode's broker.
    _mosquitto: Option<Mosquitto>,
    edge: Edge,
    disk: Tmpfs,
}

impl Rig {
    async fn start(log: &str) -> Rig {
        Self::start_with(false, log, &[]).await
    }

    async fn start_with(embedded: bool, log: &str, env: &[(&str, &str)]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let disk = Tmpfs::mount(&dir.path().join("edge-data"), "16m");
        let cloud = Cloud::start(dir.path()).await;
        let (mqtt, mosquitto) = if embedded {
            (Mqtt::Embedded(free_port()), None)
        } else {
            let mosquitto = Mosquitto::start(dir.path()).await;
            let mqtt = Mqtt::External {
                port: mosquitto.port,
                topic_prefix: String::new(),
                client_id: "kappa-edge-disk".into(),
            };
            (mqtt, Some(mosquitto))
        };
        let extra = format!("\n[log]\nhousekeeping_interval = \"500ms\"\n{log}\n");
        let edge = Edge::start_env(dir.path(), "edge", "gw-disk", mqtt, &cloud.url(), &extra, env).await;
        // The cloud goes away: everything the fleet sends stays on the gateway.
        cloud.proc.signal(libc::SIGSTOP);
        Rig { dir, cloud, mqtt_port: edge.mqtt_port, _mosquitto: mosquitto, edge, disk }
    }

    /// A fleet whose device ids start with `name`, its event time starting `offset_s` after [`T0`].
    fn fleet(&self, name: &str, devices: u32, readings: u64, rate: f64, offset_s: i64) -> Proc {
        let mut f = Fleet::new(devices, readings, rate);
        f.start_ms = T0 + offset_s * 1000;
        f.name = format!("sim-{name}");
        f.id_prefix = format!("{name}-");
        f.start(self.mqtt_port, self.dir.path())
    }

    async fn edge_metric(&self, name: &str) -> f64 {
        self.edge.metric(name).await.unwrap_or(0.0)
    }

    /// Lets the cloud run again and waits until the agent's backlog drained
    /// and `device_totals` (no lateness: it counts every reading) holds `expected`.
    async fn drain(&self, expected: u64) {
        self.cloud.proc.signal(libc::SIGCONT);
        wait_for("the backlog to drain", Duration::from_secs(120), || async {
            (self.edge.metric("kappa_edge_backlog_readings").await == Some(0.0)).then_some(())
        })
        .await;
        wait_for_readings(&self.cloud.url(), expected, Duration::from_secs(30)).await;
    }
}

/// With the cloud away, the log grows into the free-space floor: the agent
/// rolls its oldest unforwarded readings up into one-minute windows (and
/// sheds what rollups cannot save), keeps the floor, and accounts for every
/// reading that did not reach the cloud raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_free_space_floor_the_oldest_unforwarded_readings_are_rolled_up_or_shed_and_counted() {
    let floor = 8u64 << 20;
    let rig = Rig::start(&format!("min_free_bytes = {floor}")).await;
    let mut sim = rig.fleet("a", 100, 600, 100.0, 0);
    let truth = Fleet::finish(&mut sim, rig.dir.path()).await;
    assert_eq!(truth.acked, 100 * 600);
    wait_for("the agent to commit every reading", Duration::from_secs(60), || async {
        (rig.edge_metric("kappa_edge_readings_committed_total").await >= truth.acked as f64).then_some(())
    })
    .await;
    // Let housekeeping settle (a pass frees in chunks), then the floor holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shed = rig.edge_metric("kappa_edge_readings_shed_total").await as u64;
    let rolled = rig.edge_metric("kappa_edge_readings_rolled_up_total").await as u64;
    assert!(shed + rolled > 0, "a 16 MiB disk with an 8 MiB floor cannot hold 60,000 readings");
    assert!(rig.disk.free() + (1 << 20) >= floor, "free {} B is well below the {floor} B floor", rig.disk.free());
    assert_eq!(rig.edge_metric("kappa_edge_log_full").await, 0.0, "shedding kept commits going");

    rig.drain(truth.acked - shed - rolled).await;
    assert_eq!(
        rig.edge_metric("kappa_edge_readings_shed_total").await as u64,
        shed,
        "nothing shed once forwarding resumed"
    );
    let in_cloud = total(&fetch_rows(&rig.cloud.url(), "device_totals").await);
    assert_eq!(in_cloud + rolled + shed, truth.acked, "in the cloud raw + rolled up + shed = acknowledged");
    // The rollups reached the cloud as aggregates: each rolled-up reading counted once per metric.
    wait_for("the rollups to reach the cloud", Duration::from_secs(30), || async {
        let page: serde_json::Value =
            reqwest::get(format!("{}/v1/aggregates?metric=temperature&window=1m&limit=10000", rig.cloud.url()))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
        let n: u64 = page["aggregates"].as_array()?.iter().filter_map(|a| a["n"].as_u64()).sum();
        (n == rolled).then_some(())
    })
    .await;

    // Rollups and shedding took the oldest unbatched readings: what each
    // device lost is one run of its sequence, ending before its newest
    // readings (the batch that was pending when the cloud went away is kept
    // whole). The disk stays near its floor after the drain, so housekeeping
    // may go on pruning forwarded readings (the cloud has them), oldest
    // first: a second run, from each device's first reading. The count
    // read before and after the export brackets what it had pruned.
    let pruned_before = rig.edge_metric("kappa_edge_readings_pruned_total").await as u64;
    let log = kappa_edge::log::EdgeLog::open_read_only(&rig.dir.path().join("edge-data/edge-log.sqlite")).unwrap();
    let mut kept: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
    log.export(i64::MIN, i64::MAX, |r| {
        kept.entry(r.device).or_default().insert(r.seq);
        Ok(())
    })
    .unwrap();
    let pruned_after = rig.edge_metric("kappa_edge_readings_pruned_total").await as u64;
    let in_log: u64 = kept.values().map(|s| s.len() as u64).sum();
    assert!(
        in_cloud - pruned_after <= in_log && in_log <= in_cloud - pruned_before,
        "the log kept what the cloud got, less what it pruned: {in_log} in the log, {in_cloud} in the cloud, \
         {pruned_before}..{pruned_after} pruned"
    );
    assert_eq!(kept.len(), 100);
    for (device, seqs) in kept {
        let lost: Vec<u64> = (1..=600).filter(|s| !seqs.contains(s)).collect();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for s in &lost {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == *s => *end = *s,
                _ => runs.push((*s, *s)),
            }
        }
        let pruned_prefix = runs.len() == 2 && runs[0].0 == 1 && pruned_after > 0;
        assert!(runs.len() <= 1 || pruned_prefix, "{device}: lost {runs:?}, not one run of the oldest");
        if let Some((_, last)) = runs.last() {
            assert!(*last < 600, "{device}: lost its newest reading");
        }
    }
}

/// Without a floor, something else fills the disk: commits fail, the agent
/// acknowledges nothing and stays up; when space returns it resumes by
/// itself, and in the end the cloud holds every reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_acknowledgements_and_loses_nothing() {
    let rig = Rig::start("min_free_bytes = 0").await;
    let mut sim = rig.fleet("a", 20, 100, 50.0, 0);
    let truth_a = Fleet::finish(&mut sim, rig.dir.path()).await;
    wait_for("the first readings to commit", Duration::from_secs(30), || async {
        (rig.edge_metric("kappa_edge_readings_committed_total").await >= truth_a.acked as f64).then_some(())
    })
    .await;

    let ballast = rig.dir.path().join("edge-data").join("ballast");
    assert!(fill(&ballast) > 0);
    // SQLite first fills space its files already hold (a checkpointed WAL is
    // reused from its start, up to `journal_size_limit`), so the second fleet
    // publishes for 10 s: far more than that space takes.
    let mut sim = rig.fleet("b", 20, 200, 20.0, 120);
    wait_for("the agent to report a full log", Duration::from_secs(30), || async {
        (rig.edge.metric("kappa_edge_log_full").await == Some(1.0)).then_some(())
    })
    .await;
    let committed = rig.edge_metric("kappa_edge_readings_committed_total").await;
    let truth_b = Fleet::finish(&mut sim, rig.dir.path()).await;
    assert_eq!(truth_b.acked, 20 * 200, "the broker took every reading");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(committed < (truth_a.acked + truth_b.acked) as f64, "the full disk stopped some commits");
    assert_eq!(
        rig.edge_metric("kappa_edge_readings_committed_total").await,
        committed,
        "nothing commits on a full disk"
    );
    assert_eq!(rig.edge_metric("kappa_edge_log_full").await, 1.0, "still full, still running");
    assert!(rig.edge_metric("kappa_edge_log_write_errors_total").await > 0.0);

    std::fs::remove_file(&ballast).unwrap();
    wait_for("commits to resume", Duration::from_secs(30), || async {
        let all = (truth_a.acked + truth_b.acked) as f64;
        (rig.edge_metric("kappa_edge_readings_committed_total").await >= all).then_some(())
    })
    .await;
    assert_eq!(rig.edge_metric("kappa_edge_log_full").await, 0.0);

    rig.drain(truth_a.acked + truth_b.acked).await;
    assert_eq!(rig.edge_metric("kappa_edge_readings_shed_total").await, 0.0);
    let rows = fetch_rows(&rig.cloud.url(), "device_windows").await;
    let (a_rows, b_rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.key.starts_with("a-"));
    assert_exact(&truth_a, &a_rows, &[&rig.edge.proc, &rig.cloud.proc]);
    assert_exact(&truth_b, &b_rows, &[&rig.edge.proc, &rig.cloud.proc]);
}

/// Publishes one reading of device `probe` (seq `seq`) at QoS 1 to the
/// agent's listener; whether its PUBACK arrived within `within`. The
/// session stays open (in the returned task) so a later PUBACK still comes.
async fn probe(port: u16, seq: u64) -> (tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>, rumqttc::AsyncClient) {
    let (client, code, rx) = crate::mqtt_auth::session(port, "probe", None).await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let payload = crate::mqtt_auth::reading("probe", seq);
    client.publish("devices/probe/telemetry", rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    (rx, client)
}

/// Whether a PUBACK arrives on `rx` within `within`.
async fn puback_within(rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await {
                Some(rumqttc::Packet::PubAck(_)) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// The default mode (the agent's own listener) on a full disk: commits fail,
/// so PUBACKs stop (a device's publish waits, unacknowledged); when space
/// returns they resume by themselves, and in the end the cloud holds every
/// acknowledged reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_in_the_default_mode_holds_back_pubacks_and_loses_nothing() {
    let rig = Rig::start_with(true, "min_free_bytes = 0", &[]).await;
    let mut sim = rig.fleet("a", 20, 100, 50.0, 0);
    let truth_a = Fleet::finish(&mut sim, rig.dir.path()).await;
    assert_eq!(truth_a.acked, 20 * 100);

    let ballast = rig.dir.path().join("edge-data").join("ballast");
    assert!(fill(&ballast) > 0);
    let mut sim = rig.fleet("b", 20, 200, 20.0, 120);
    wait_for("the agent to report a full log", Duration::from_secs(30), || async {
        (rig.edge.metric("kappa_edge_log_full").await == Some(1.0)).then_some(())
    })
    .await;
    let (mut acks, _probe) = probe(rig.mqtt_port, 1).await;
    assert!(!puback_within(&mut acks, Duration::from_secs(3)).await, "a PUBACK on a full disk");
    let committed = rig.edge_metric("kappa_edge_readings_committed_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.edge_metric("kappa_edge_readings_committed_total").await, committed, "nothing commits");
    assert_eq!(rig.edge_metric("kappa_edge_log_full").await, 1.0, "still full, still running");

    std::fs::remove_file(&ballast).unwrap();
    assert!(puback_within(&mut acks, Duration::from_secs(30)).await, "the PUBACK once space returned");
    let truth_b = Fleet::finish(&mut sim, rig.dir.path()).await;
    assert_eq!(truth_b.acked, 20 * 200, "every reading was acknowledged in the end");
    assert_eq!(rig.edge_metric("kappa_edge_log_full").await, 0.0);

    rig.drain(truth_a.acked + truth_b.acked + 1).await;
    assert_eq!(rig.edge_metric("kappa_edge_readings_shed_total").await, 0.0);
    let rows = fetch_rows(&rig.cloud.url(), "device_windows").await;
    let (a_rows, rest): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.key.starts_with("a-"));
    let (b_rows, probe_rows): (Vec<_>, Vec<_>) = rest.into_iter().partition(|r| r.key.starts_with("b-"));
    assert_exact(&truth_a, &a_rows, &[&rig.edge.proc, &rig.cloud.proc]);
    assert_exact(&truth_b, &b_rows, &[&rig.edge.proc, &rig.cloud.proc]);
    assert_eq!(total(&probe_rows), 1, "the probe's reading, once");
}

/// Negative control: a listener that acknowledges on receipt answers the
/// probe on a full disk, and the check above sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_listener_acknowledging_on_receipt_pubacks_on_a_full_disk() {
    let env = [(kappa_edge::agent::FAULT_ACK_ON_RECEIPT, "1")];
    let rig = Rig::start_with(true, "min_free_bytes = 0", &env).await;
    let ballast = rig.dir.path().join("edge-data").join("ballast");
    assert!(fill(&ballast) > 0);
    let mut sim = rig.fleet("b", 20, 100, 20.0, 0);
    wait_for("the agent to report a full log", Duration::from_secs(30), || async {
        (rig.edge.metric("kappa_edge_log_full").await == Some(1.0)).then_some(())
    })
    .await;
    let (mut acks, _probe) = probe(rig.mqtt_port, 1).await;
    assert!(puback_within(&mut acks, Duration::from_secs(3)).await, "acknowledging on receipt should answer at once");
    sim.kill9().await;
}
