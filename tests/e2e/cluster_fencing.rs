//! A worker fenced out of partitions its group did not move. Another worker
//! acting on a stale member list, or a Kafka coordinator restarted under the
//! group (which once left two members holding one partition, in the soak),
//! claims a partition the group still gives this worker: the next checkpoint
//! is refused ("fenced:"). The worker must take its share again (over
//! PostgreSQL membership) or join its group again (Kafka's protocol) and go
//! on from its last checkpoint, with the views exact. The negative control
//! (`KAPPA_TEST_WORKER_FENCED_WAITS`) keeps a fenced worker waiting for a
//! move that never comes, and the same check catches the readings it stops
//! processing.

use std::time::Duration;

use kappa_cloud::store::pg::{PgSettings, PgStore};
use kappa_tests::harness::*;

use crate::cluster::{PROCESSING, process_every_partition};

/// What a worker logs when a checkpoint of its share is refused.
const REFUSED: &str = "The last checkpoint of this share did not commit";

struct Fenced {
    /// Differences between the views and the ground truth.
    problems: Vec<String>,
    /// The workers' whole logs, joined.
    workers: String,
    /// Whether the refused worker restored its share again after the refusal.
    restored_again: bool,
    /// The ends of every process's log, for failure messages.
    logs: String,
}

/// Claims `partition` of the main pipeline in `schema`, as another worker
/// taking it would (a claim raises its epoch and fences the holder's next
/// checkpoint).
fn claim_behind_the_groups_back(schema: &str, partition: u32) {
    let settings = PgSettings { url: postgres(), schema: schema.to_string(), ca_file: None };
    // The blocking client runs a runtime of its own: not on the test's.
    std::thread::spawn(move || {
        let mut store = PgStore::connect(&settings, 6).expect("the workers' store");
        store.claim(kappa_cloud::store::MAIN_PIPELINE, &[partition]).expect("a claim of partition 0");
    })
    .join()
    .expect("the claim is made");
}

/// Whether `done` holds within `timeout` (checked every 100 ms).
async fn until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    tokio::time::timeout(timeout, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .is_ok()
}

/// Two workers over six partitions while a fleet publishes; partition 0 is
/// claimed behind the group's back once both process their shares. Waits
/// until a worker says its checkpoint was refused and, when `recovers`, for
/// both to process every partition again; then checks the views after
/// `settle`.
async fn fenced_run(name: &str, assignment: &str, env: &[(&str, &str)], recovers: bool, settle: Duration) -> Fenced {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let broker = Tansu::start(dir).await;
    let schema = fresh_schema(name);
    let config = cluster_config(&broker, &schema, &format!("assignment = \"{assignment}\"\n{FLEET_PROCESSOR}"));
    let cloud = Cloud::start_with(dir, "cloud", &config, &[]).await;
    let workers = [Worker::start(dir, "a", &config, env).await, Worker::start(dir, "b", &config, env).await];
    let logs = |workers: &[Worker]| {
        workers.iter().map(|w| std::fs::read_to_string(&w.proc.log).unwrap_or_default()).collect::<Vec<_>>()
    };
    let mqtt_port = free_port();
    let edge = Edge::start(dir, Mqtt::Embedded(mqtt_port), &cloud.url()).await;
    let mut sim = Fleet::new(20, 600, 10.0).start(mqtt_port, dir);
    let all_logs = |workers: &[Worker]| workers.iter().map(|w| w.proc.tail()).collect::<Vec<_>>().join("\n");
    let started = until(Duration::from_secs(120), || {
        let now = logs(&workers);
        process_every_partition(&now, &[0, 0]) && now.iter().all(|l| l.contains(PROCESSING))
    })
    .await;
    assert!(started, "both workers process their shares\n{}", all_logs(&workers));
    wait_for_readings(&cloud.url(), 2_000, Duration::from_secs(90)).await;

    let fenced_lines = |log: &str| log.lines().filter(|x| x.contains(REFUSED) && x.contains("fenced:")).count();
    let refusals: Vec<usize> = logs(&workers).iter().map(|l| fenced_lines(l)).collect();
    claim_behind_the_groups_back(&schema, 0);
    let refused =
        until(Duration::from_secs(60), || logs(&workers).iter().zip(&refusals).any(|(l, n)| fenced_lines(l) > *n))
            .await;
    assert!(refused, "a worker's checkpoint is refused\n{}", all_logs(&workers));
    let now = logs(&workers);
    let fenced = now.iter().zip(&refusals).position(|(l, n)| fenced_lines(l) > *n).unwrap_or_default();
    // Since its last refusal the fenced worker restored a share again (with
    // Kafka's protocol the group may give partition 0 to the other).
    let restored_again =
        |now: &[String]| now[fenced][now[fenced].rfind(REFUSED).unwrap_or_default()..].contains(PROCESSING);
    if recovers {
        let again = until(Duration::from_secs(90), || {
            let now = logs(&workers);
            restored_again(&now) && process_every_partition(&now, &[0, 0])
        })
        .await;
        assert!(again, "the fenced worker processes a share again\n{}", all_logs(&workers));
    }

    let truth = Fleet::finish(&mut sim, dir).await;
    wait_for_readings(&cloud.url(), truth.acked, settle).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    let all = workers.iter().map(|w| w.proc.tail()).chain([cloud.proc.tail(), edge.proc.tail()]).collect::<Vec<_>>();
    let now = logs(&workers);
    Fenced {
        problems: diff_against_truth(&truth, &rows),
        restored_again: restored_again(&now),
        workers: now.join("\n"),
        logs: all.join("\n"),
    }
}

/// Membership in PostgreSQL (the default): the fenced worker's share did not
/// move, so after two looks it claims it again and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_whose_share_did_not_move_takes_it_again() {
    let run = fenced_run("fenced_pg", "postgres", &[], true, Duration::from_secs(120)).await;
    assert!(run.problems.is_empty(), "lost or double-counted readings: {:?}\n{}", run.problems, run.logs);
}

/// Kafka's protocol: the group still assigns the partition after a session,
/// so the worker joins it again, the group assigns every partition afresh,
/// and the views stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_whose_group_still_assigns_the_partition_joins_it_again() {
    let run = fenced_run("fenced_kafka", "kafka", &[], true, Duration::from_secs(120)).await;
    assert!(
        run.workers.contains("The group still assigns partitions another worker claimed; joining it again."),
        "the fenced worker joined its group again\n{}",
        run.logs
    );
    assert!(run.problems.is_empty(), "lost or double-counted readings: {:?}\n{}", run.problems, run.logs);
}

/// Negative control: a fenced worker that waits for a move that never comes
/// stops processing its share, and the check above catches the readings
/// missing from the views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_fenced_worker_that_waits_for_a_move_loses_its_share() {
    let env = [(kappa_cloud::cluster::FAULT_FENCED_WAITS, "1")];
    // What it stops processing never arrives: a shorter wait than the exact runs'.
    let run = fenced_run("fenced_waits", "postgres", &env, false, Duration::from_secs(20)).await;
    assert!(run.workers.contains("Fault injection is on"), "the switch is on\n{}", run.logs);
    assert!(!run.restored_again, "the fenced worker never takes its share back\n{}", run.logs);
    assert!(!run.problems.is_empty(), "a fenced worker that never takes its share back should miss readings");
}
