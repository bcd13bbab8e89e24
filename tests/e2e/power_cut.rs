//! Power cuts, not only process kills: the agent's and the node's data
//! directories sit on a filesystem that forgets every write not yet fsynced
//! ([`kappa_tests::powercut`]), and the power goes at seeded moments while a
//! fleet publishes. Nothing a device got a PUBACK for, and nothing the cloud
//! answered 2xx for, may be lost.

use std::path::Path;
use std::time::Duration;

use kappa_cloud::api::RowOut;
use kappa_sim::truth::GroundTruth;
use kappa_tests::harness::*;
use kappa_tests::powercut::PowerCut;

const SETTLE: Duration = Duration::from_secs(90);

/// Which machine loses power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Edge,
    Cloud,
    Both,
}

struct Run {
    _dir: tempfile::TempDir,
    truth: GroundTruth,
    rows: Vec<RowOut>,
    procs: Vec<Proc>,
    /// Bytes the restores rolled back, per machine (edge, cloud).
    rolled_back: (u64, u64),
    // Declared last: unmounted after the processes above are gone.
    _mounts: (PowerCut, PowerCut),
}

/// Cuts the power `targets.len()` times, 1 to 4 s apart (seeded), while 50
/// devices publish to the agent's own listener. A cut stops the machine's
/// disk (every later write fails), kills its process with SIGKILL, rolls
/// its disk back to the last fsync of every file, checks the agent's log
/// with `kappa-edge log check`, and starts the process again. Returns once
/// the agent's backlog is empty and the views hold every acknowledged
/// reading (or `settle` passed).
async fn cut_the_power(targets: &[Target], edge_log: &str, cloud_log: &str, settle: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mount = |name: &str| {
        PowerCut::mount(&dir.path().join(format!("{name}-disk")), &dir.path().join(format!("{name}-data")))
            .unwrap_or_else(|e| panic!("mount the power-cut filesystem for {name} (needs root and /dev/fuse): {e}"))
    };
    let (edge_disk, cloud_disk) = (mount("edge"), mount("cloud"));
    let mut cloud = Cloud::start_with(dir.path(), "cloud", &format!("{FLEET_PROCESSOR}{cloud_log}"), &[]).await;
    let mqtt_port = free_port();
    let mut edge =
        Edge::start_named(dir.path(), "edge", "gw-test", Mqtt::Embedded(mqtt_port), &cloud.url(), edge_log).await;

    let readings = 30 * (targets.len() as u64 * 3 + 6);
    let mut sim = Fleet::new(50, readings, 30.0).start(mqtt_port, dir.path());
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rolled_back = (0, 0);
    for target in targets {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(1000 + rng % 3000)).await;
        let (edge_cut, cloud_cut) = (*target != Target::Cloud, *target != Target::Edge);
        // The power goes on both at the same instant, then the processes die.
        if edge_cut {
            edge_disk.cut();
        }
        if cloud_cut {
            cloud_disk.cut();
        }
        if edge_cut {
            edge.proc.kill9().await;
            rolled_back.0 += edge_disk.restore().expect("restore the agent's disk").bytes;
            check_edge_log(&edge.config, dir.path()).await;
        }
        if cloud_cut {
            cloud.proc.kill9().await;
            rolled_back.1 += cloud_disk.restore().expect("restore the node's disk").bytes;
            cloud.restart().await;
        }
        if edge_cut {
            edge.restart(true).await;
        }
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    // A device keeps 128 samples while the agent is down (4 s at this rate);
    // an outage longer than that on a loaded machine drops the oldest on the
    // device, counted there, never acknowledged: not owed by the pipeline.
    assert_eq!(truth.sampled, 50 * readings, "every device should have taken all its samples");
    assert_eq!(truth.acked + truth.dropped_on_device, truth.sampled, "a sample neither acknowledged nor dropped");
    assert!(
        truth.acked >= truth.sampled * 9 / 10,
        "most readings should have been acknowledged: {} of {} ({} dropped on devices)",
        truth.acked,
        truth.sampled,
        truth.dropped_on_device
    );
    wait_for("the agent's backlog to drain", SETTLE, || async {
        (edge.metric("kappa_edge_backlog_readings").await == Some(0.0)).then_some(())
    })
    .await;
    wait_for_readings(&cloud.url(), truth.acked, settle).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    Run { _dir: dir, truth, rows, procs: vec![cloud.proc, edge.proc], rolled_back, _mounts: (edge_disk, cloud_disk) }
}

/// `kappa-edge log check` on the agent's log as the power left it: SQLite's
/// integrity check and the log's own invariants.
async fn check_edge_log(config: &Path, dir: &Path) {
    let out = tokio::process::Command::new(bin())
        .args(["edge", "log", "check", "--config", config.to_str().unwrap_or_default()])
        .current_dir(dir)
        .output()
        .await
        .expect("run kappa-edge log check");
    assert!(
        out.status.success(),
        "the agent's log does not check after a power cut:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seeded cut sequence: the agent alone, the node alone, and both at once.
fn cuts(n: usize) -> Vec<Target> {
    [Target::Edge, Target::Cloud, Target::Both].into_iter().cycle().take(n).collect()
}

/// Twelve power cuts (four of the agent, four of the node, four of both)
/// while the fleet publishes: every acknowledged reading is in the views
/// exactly once, and the agent's log checks after every cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_on_edge_and_cloud_lose_and_duplicate_nothing() {
    let run = cut_the_power(&cuts(12), "", "", SETTLE).await;
    assert_exact(&run.truth, &run.rows, &run.procs.iter().collect::<Vec<_>>());
    eprintln!("bytes rolled back by the cuts (edge, cloud): {:?}", run.rolled_back);
}

/// Negative control for the agent: with its log committing without fsync
/// (`durability = "normal"`), the same kind of cuts lose acknowledged
/// readings, and the comparison sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_an_agent_log_without_fsync_loses_acknowledged_readings_in_power_cuts() {
    let run = cut_the_power(&[Target::Edge; 4], "[log]\ndurability = \"normal\"", "", Duration::from_secs(10)).await;
    assert!(run.rolled_back.0 > 0, "the cuts rolled nothing back on the agent's disk");
    eprintln!("agent without fsync: the views hold {} of {} acknowledged readings", total(&run.rows), run.truth.acked);
    assert!(
        total(&run.rows) < run.truth.acked && !diff_against_truth(&run.truth, &run.rows).is_empty(),
        "an agent log without fsync lost nothing in 4 power cuts: the test could not tell"
    );
}

/// Negative control for the node: with its event log committing without
/// fsync before answering 2xx (`durability = "normal"`), cuts of the node
/// lose batches the agent was told were safe, and the comparison sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_cloud_log_without_fsync_loses_accepted_batches_in_power_cuts() {
    let run = cut_the_power(&[Target::Cloud; 4], "", "[log]\ndurability = \"normal\"\n", Duration::from_secs(10)).await;
    assert!(run.rolled_back.1 > 0, "the cuts rolled nothing back on the node's disk");
    eprintln!("cloud without fsync: the views hold {} of {} acknowledged readings", total(&run.rows), run.truth.acked);
    assert!(
        total(&run.rows) < run.truth.acked && !diff_against_truth(&run.truth, &run.rows).is_empty(),
        "a cloud log without fsync lost nothing in 4 power cuts: the test could not tell"
    );
}
