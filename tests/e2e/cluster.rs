//! Processor workers as a Kafka consumer group (tansu) writing the views
//! into PostgreSQL, which the node's API reads. A fleet publishes through an
//! edge agent and an ingest node while workers are killed (`kill -9`) and
//! added: the views stay exact against the ground truth. The negative
//! control starts each share without restoring its partitions' state and
//! shows that the same test catches it.

use std::collections::BTreeSet;
use std::time::Duration;

use kappa_tests::alert_kit::receiver;
use kappa_tests::harness::*;

struct Run {
    truth: kappa_sim::truth::GroundTruth,
    rows: Vec<kappa_cloud::api::RowOut>,
    /// Readings each surviving worker processed (the killed one is gone).
    processed: Vec<f64>,
    logs: String,
}

/// What the processing workers' logs say once a share is restored.
pub(crate) const PROCESSING: &str = "Processing these partitions from their last checkpoint.";

/// Whether the last shares `logs` say their workers process hold every one
/// of the six partitions, each once, all taken after the first `skip` such
/// lines of each log.
pub(crate) fn process_every_partition(logs: &[String], skip: &[usize]) -> bool {
    let mut held = Vec::new();
    for (log, skip) in logs.iter().zip(skip) {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(PROCESSING)).collect();
        if lines.len() > *skip
            && let Some(last) = lines.last()
        {
            let listed = last.split("partitions=").nth(1).unwrap_or_default();
            held.extend(listed.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    held.sort_unstable();
    held == (0..6).collect::<Vec<_>>()
}

/// Three workers over six partitions; one is killed with SIGKILL mid-stream
/// and, later, a fourth joins. Returns the truth and the rows the API serves
/// once they hold every acknowledged reading, or after `settle`.
///
/// With `assignment = "postgres"` the session timeout is an hour: the two
/// survivors must take the killed worker's partitions before the fourth
/// joins, which only its closed PostgreSQL session can tell them (Kafka's
/// protocol, on tansu, only moves them with the join).
async fn kill_and_join(
    dir: &std::path::Path,
    name: &str,
    assignment: &str,
    env: &[(&str, &str)],
    settle: Duration,
) -> Run {
    let broker = Tansu::start(dir).await;
    let mut config =
        cluster_config(&broker, &fresh_schema(name), &format!("assignment = \"{assignment}\"\n{FLEET_PROCESSOR}"));
    if assignment == "postgres" {
        config = config.replace("session_timeout = \"6s\"", "session_timeout = \"1h\"");
    }
    let cloud = Cloud::start_with(dir, "cloud", &config, &[]).await;
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(Worker::start(dir, &format!("worker-{i}"), &config, env).await);
    }
    let mqtt_port = free_port();
    let edge = Edge::start(dir, Mqtt::Embedded(mqtt_port), &cloud.url()).await;
    let mut sim = Fleet::new(20, 600, 10.0).start(mqtt_port, dir);
    wait_for_readings(&cloud.url(), 2_000, Duration::from_secs(90)).await;

    let logs = |workers: &[Worker]| {
        workers[1..].iter().map(|w| std::fs::read_to_string(&w.proc.log).unwrap_or_default()).collect::<Vec<_>>()
    };
    let before: Vec<usize> = logs(&workers).iter().map(|l| l.matches(PROCESSING).count()).collect();
    workers[0].proc.kill9().await;
    if assignment == "postgres" {
        wait_for("the survivors to process the killed worker's partitions", Duration::from_secs(90), || {
            let done = process_every_partition(&logs(&workers), &before);
            async move { done.then_some(()) }
        })
        .await;
    } else {
        // The group moves its partitions after the session timeout (6 s).
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
    workers.push(Worker::start(dir, "worker-3", &config, env).await);

    let truth = Fleet::finish(&mut sim, dir).await;
    wait_for_readings(&cloud.url(), truth.acked, settle).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    let mut processed = Vec::new();
    for w in &workers[1..] {
        processed.push(w.processed().await);
    }
    let logs = workers.iter().map(|w| w.proc.tail()).chain([cloud.proc.tail(), edge.proc.tail()]).collect::<Vec<_>>();
    Run { truth, rows, processed, logs: logs.join("\n") }
}

/// The example cluster config's views (keyed by the device), alerts and rules.
fn example_views() -> String {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud/cluster.toml"))
        .expect("example config");
    example[example.find("[schema]").expect("schema section")..].to_string()
}

/// Test 4 of the cluster issue, on workers: the reference scenario (late
/// data, duplicates inside batches, ten batches sent twice) into a node on
/// the embedded log and into a cluster of two workers on Kafka, with the
/// example cluster config's views (per-user sessions, merged across
/// partitions by the reader, among them) and rules. The rows, late events
/// and alerts the cluster keeps in PostgreSQL are byte-identical to the
/// node's, and its API serves the alerts from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_compute_the_same_views_as_an_embedded_node() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let (batches, views, embedded) = embedded_reference(dir.path()).await;
    let expected = embedded.dump_with(&["--alerts"]).await;
    assert!(
        expected.lines().count() > 100 && expected.contains("\tlate\n"),
        "the scenario fills the views and has late data"
    );
    let alert_ids: BTreeSet<&str> = expected
        .lines()
        .skip_while(|l| *l != "# alerts")
        .skip(1)
        .take_while(|l| *l != "# aggregates")
        .filter(|l| !l.starts_with("event "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(!alert_ids.is_empty(), "the scenario raises alerts:\n{expected}");

    let config = cluster_config(&broker, &fresh_schema("same"), &views);
    let cloud = Cloud::start_with(dir.path(), "cloud", &config, &[]).await;
    let workers = [
        Worker::start(dir.path(), "worker-a", &config, &[]).await,
        Worker::start(dir.path(), "worker-b", &config, &[]).await,
    ];
    ingest(&cloud, &batches[..10]).await;
    ingest(&cloud, &batches).await; // the first ten again, then the rest
    let mut last = String::new();
    let converged = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            last = cloud.dump_with(&["--alerts"]).await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    let logs = workers.iter().map(|w| w.proc.tail()).collect::<Vec<_>>().join("\n");
    if converged.is_err() {
        let _ =
            std::process::Command::new("cp").args(["-r", dir.path().to_str().unwrap(), "/tmp/cluster-fail"]).status();
    }
    assert!(
        converged.is_ok(),
        "the cluster's views differ from the embedded node's:\n{}\n{logs}",
        first_difference(&expected, &last)
    );
    for w in &workers {
        assert!(w.processed().await > 0.0, "both workers computed a share\n{logs}");
        assert_eq!(status(&format!("http://127.0.0.1:{}/readyz", w.port)).await, 200, "ready with a share\n{logs}");
    }
    let served = kappa_tests::alert_kit::fetch_alerts(&cloud.url(), &[]).await;
    let served: BTreeSet<&str> = served.iter().filter_map(|a| a["id"].as_str()).collect();
    assert_eq!(served, alert_ids, "the node's API serves the cluster's alerts from PostgreSQL");
}

/// The reference scenario (with the first ten batches sent twice) and the
/// example cluster config's views, processed by a node on the embedded log,
/// which is then stopped: the batches, the views' config and the node, whose
/// dump is what a cluster must reproduce.
async fn embedded_reference(dir: &std::path::Path) -> (Vec<kappa_common::batch::EdgeBatch>, String, Cloud) {
    let batches = scenario(true);
    let processor = "[processor]\npoll_records = 500\ncheckpoint_interval = \"200ms\"\nmax_out_of_orderness = \"2m\"\n";
    let views = format!("{processor}{}", example_views());
    let mut embedded = Cloud::start_with(dir, "embedded", &format!("[log]\npartitions = 6\n{views}"), &[]).await;
    let records = ingest(&embedded, &batches).await;
    crate::processor::until_processed(&embedded, records).await;
    wait_for("the embedded alert pipeline to catch up", Duration::from_secs(60), || async {
        (embedded.checkpointed_offsets_of("alerts") >= records).then_some(())
    })
    .await;
    assert!(embedded.proc.terminate().await.success());
    (batches, views, embedded)
}

/// The cluster issue's scaling goal keeps the views exact at every worker
/// count: the reference scenario (ten batches twice) processed by 1, 4 and 8
/// workers (2 are above), each count on a topic, a group and a PostgreSQL
/// schema of its own, with every worker in the group before the first batch
/// arrives. The rows and late events each count leaves in PostgreSQL are
/// byte-identical to the embedded node's. (8 workers over 6 partitions leave
/// two with nothing, as a group does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_four_and_eight_workers_compute_the_same_views_as_an_embedded_node() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let (batches, views, embedded) = embedded_reference(dir.path()).await;
    let expected = embedded.dump().await;
    assert!(expected.lines().count() > 100 && expected.contains("\tlate\n"), "the scenario fills the views");

    for n in [1, 4, 8] {
        let config = cluster_config(&broker, &fresh_schema(&format!("scale{n}")), &views)
            .replace("topic = \"events\"", &format!("topic = \"events-{n}\""));
        let cloud = Cloud::start_with(dir.path(), &format!("cloud{n}"), &config, &[]).await;
        let mut workers = Vec::new();
        for i in 0..n {
            workers.push(Worker::start(dir.path(), &format!("w{n}-{i}"), &config, &[]).await);
        }
        ingest(&cloud, &batches[..10]).await;
        ingest(&cloud, &batches).await;
        let mut last = String::new();
        let converged = tokio::time::timeout(Duration::from_secs(180), async {
            loop {
                last = cloud.dump().await;
                if last == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await;
        let logs = workers.iter().map(|w| w.proc.tail()).collect::<Vec<_>>().join("\n");
        assert!(
            converged.is_ok(),
            "{n} workers' views differ from the embedded node's:\n{}\n{logs}",
            first_difference(&expected, &last)
        );
        let mut sharing = 0;
        for w in &workers {
            sharing += usize::from(w.processed().await > 0.0);
        }
        assert!(sharing >= n.min(2), "{n} workers: {sharing} computed a share\n{logs}");
        for w in &mut workers {
            assert!(w.proc.terminate().await.success(), "{n} workers: a worker stops cleanly\n{logs}");
        }
    }
}

/// Tests 1 and 2 of the cluster issue: three workers, exact views; `kill -9`
/// one mid-stream, its partitions move, still exact; add one, still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_the_views_exact_through_a_kill_and_a_join() {
    exact_through_a_kill_and_a_join("postgres").await;
}

/// The same with Kafka's group protocol deciding the shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_assigned_by_kafka_keep_the_views_exact_through_a_kill_and_a_join() {
    exact_through_a_kill_and_a_join("kafka").await;
}

async fn exact_through_a_kill_and_a_join(assignment: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run =
        kill_and_join(dir.path(), &format!("exact_{assignment}"), assignment, &[], Duration::from_secs(120)).await;
    assert_eq!(run.truth.acked, run.truth.sampled, "every reading was acknowledged to its device");
    let problems = diff_against_truth(&run.truth, &run.rows);
    assert!(problems.is_empty(), "lost or double-counted readings: {problems:?}\n{}", run.logs);
    // Every surviving worker, the one that joined late included, computed a share.
    assert!(
        run.processed.iter().all(|n| *n > 0.0),
        "each worker processed readings: {:?}\n{}",
        run.processed,
        run.logs
    );
}

/// Two workers (`assignment = "postgres"`, a session timeout of an hour)
/// share the six partitions; one is killed with SIGKILL. Whether the
/// survivor, within `wait`, processes every partition; and the logs.
async fn survivor_takes_over(name: &str, env: &[(&str, &str)], wait: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let config = cluster_config(&broker, &fresh_schema(name), FLEET_PROCESSOR)
        .replace("session_timeout = \"6s\"", "session_timeout = \"1h\"");
    let mut workers =
        vec![Worker::start(dir.path(), "a", &config, env).await, Worker::start(dir.path(), "b", &config, env).await];
    let logs = |workers: &[Worker]| {
        workers.iter().map(|w| std::fs::read_to_string(&w.proc.log).unwrap_or_default()).collect::<Vec<_>>()
    };
    wait_for("both workers to process their shares", Duration::from_secs(90), || {
        let now = logs(&workers);
        let done = process_every_partition(&now, &[0, 0]) && now.iter().all(|l| l.contains(PROCESSING));
        async move { done.then_some(()) }
    })
    .await;
    let before = vec![logs(&workers)[1].matches(PROCESSING).count()];
    workers[0].proc.kill9().await;
    let taken = tokio::time::timeout(wait, async {
        while !process_every_partition(&logs(&workers[1..]), &before) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    (taken.is_ok(), logs(&workers).join("\n"))
}

/// A killed worker's partitions move as soon as its PostgreSQL session
/// closes, not when its lease (an hour here) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_partitions_move_when_its_connection_closes() {
    let (taken, logs) = survivor_takes_over("takeover", &[], Duration::from_secs(90)).await;
    assert!(taken, "the survivor never processed the killed worker's partitions\n{logs}");
}

/// Negative control: members counted live by their lease alone
/// (`KAPPA_TEST_MEMBERS_BY_LEASE_ONLY`) keep a killed worker's partitions
/// for the hour, and the check above catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_killed_worker_counted_live_by_its_lease_keeps_its_partitions() {
    let env = [(kappa_cloud::store::pg::members::FAULT_LEASE_ONLY, "1")];
    let (taken, logs) = survivor_takes_over("leaseonly", &env, Duration::from_secs(20)).await;
    assert!(
        !taken,
        "with liveness by lease alone, the killed worker's partitions should not move within its lease\n{logs}"
    );
}

/// A worker stopped with SIGSTOP (its PostgreSQL session stays open) is
/// counted gone once its lease (the 6 s session timeout) runs out, and the
/// other takes its partitions; woken with SIGCONT, it finds its lease had
/// run out, takes its share again and the other hands it back. The views
/// stay exact throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_loses_its_partitions_after_its_lease_and_takes_them_again_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let broker = Tansu::start(dir).await;
    let config = cluster_config(&broker, &fresh_schema("stopped"), FLEET_PROCESSOR);
    let cloud = Cloud::start_with(dir, "cloud", &config, &[]).await;
    let workers = [Worker::start(dir, "a", &config, &[]).await, Worker::start(dir, "b", &config, &[]).await];
    let logs = |workers: &[Worker]| {
        workers.iter().map(|w| std::fs::read_to_string(&w.proc.log).unwrap_or_default()).collect::<Vec<_>>()
    };
    let mqtt_port = free_port();
    let edge = Edge::start(dir, Mqtt::Embedded(mqtt_port), &cloud.url()).await;
    let mut sim = Fleet::new(20, 600, 10.0).start(mqtt_port, dir);
    wait_for_readings(&cloud.url(), 2_000, Duration::from_secs(90)).await;

    let before = vec![logs(&workers)[1].matches(PROCESSING).count()];
    workers[0].proc.signal(libc::SIGSTOP);
    wait_for("the other worker to process the stopped one's partitions", Duration::from_secs(90), || {
        let done = process_every_partition(&logs(&workers[1..]), &before);
        async move { done.then_some(()) }
    })
    .await;
    let before: Vec<usize> = logs(&workers).iter().map(|l| l.matches(PROCESSING).count()).collect();
    workers[0].proc.signal(libc::SIGCONT);
    wait_for("both workers to process their shares again", Duration::from_secs(90), || {
        let now = logs(&workers);
        let done = process_every_partition(&now, &before) && now[0].contains("lease had run out");
        async move { done.then_some(()) }
    })
    .await;

    let truth = Fleet::finish(&mut sim, dir).await;
    wait_for_readings(&cloud.url(), truth.acked, Duration::from_secs(120)).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    let all = workers.iter().map(|w| w.proc.tail()).chain([cloud.proc.tail(), edge.proc.tail()]).collect::<Vec<_>>();
    let problems = diff_against_truth(&truth, &rows);
    assert!(problems.is_empty(), "lost or double-counted readings: {problems:?}\n{}", all.join("\n"));
}

/// Negative control: workers that take a share without restoring its
/// partitions' state (`KAPPA_TEST_WORKER_SKIP_RESTORE`) start those windows
/// from nothing after each move, and the check above catches the lost counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_workers_that_do_not_restore_state_lose_readings() {
    let dir = tempfile::tempdir().unwrap();
    let env = [(kappa_cloud::cluster::FAULT_SKIP_RESTORE, "1")];
    // Lost counts never arrive: a shorter wait than the exact run's.
    let run = kill_and_join(dir.path(), "norestore", "postgres", &env, Duration::from_secs(20)).await;
    let problems = diff_against_truth(&run.truth, &run.rows);
    assert!(!problems.is_empty(), "starting a moved partition from empty state should lose readings");
}

/// The overheat rule and a webhook to `port`, checkpointing often.
fn overheat_rules(port: u16) -> String {
    format!(
        "[processor]\ncheckpoint_interval = \"200ms\"\n\
         [[rules]]\nname = \"overheat\"\nkind = \"threshold\"\nwhen = \"temperature > 50\"\n\
         resolve_when = \"temperature < 45\"\nseverity = \"critical\"\n\
         [[webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"300ms\"\n\
         backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\nmax_attempts = 1000\n"
    )
}

/// The idempotency keys of the overheat alerts' transitions for
/// [`crate::alerts::overheating`]: each device's alert fires and resolves.
fn overheat_transitions(devices: u32) -> BTreeSet<String> {
    (0..devices)
        .flat_map(|d| {
            let id = format!("overheat:hot-{d:03}:{}", T0 + 20_000);
            [format!("{id}:fired"), format!("{id}:resolved")]
        })
        .collect()
}

/// Alerts on a cluster live in PostgreSQL: the node that runs the alert
/// pipeline checkpoints it there and delivers webhooks from the outbox there.
/// `kill -9` it while the receiver still fails, start another node with an
/// empty data directory: it restores the pipeline from PostgreSQL and
/// delivers every transition, each once, and its API acknowledges. An
/// ingest node (`primary = false`) runs beside them all along without taking
/// the pipelines over, and serves the same alerts from PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_takes_over_alerts_and_their_deliveries_from_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let (port, seen) = receiver(15, 0).await;
    let rules = overheat_rules(port);
    let config = cluster_config(&broker, &fresh_schema("alerts"), &rules);
    let mut ingest_only =
        Cloud::start_with(dir.path(), "ingest", &config, &[("KAPPA_CLOUD__CLUSTER__PRIMARY", "false")]).await;
    let mut first = Cloud::start_with(dir.path(), "first", &config, &[]).await;
    let devices = 10;
    ingest(&first, &crate::alerts::overheating(devices, 60, "gw-hot")).await;
    wait_for("failing delivery attempts", Duration::from_secs(60), || async {
        (seen.lock().unwrap().requests >= 8).then_some(())
    })
    .await;
    first.proc.kill9().await;
    assert!(seen.lock().unwrap().by_key.is_empty(), "the receiver accepted nothing before the kill");

    let mut second = Cloud::start_with(dir.path(), "second", &config, &[]).await;
    let expected = overheat_transitions(devices);
    wait_for("every transition delivered by the second node", Duration::from_secs(60), || async {
        let s = seen.lock().unwrap();
        (s.by_key.keys().cloned().collect::<BTreeSet<_>>() == expected).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (key, bodies) in &seen.lock().unwrap().by_key {
        assert_eq!(bodies.len(), 1, "{key} was delivered {} times", bodies.len());
    }

    let id = format!("overheat:hot-003:{}", T0 + 20_000);
    let acked: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/alerts/{id}/ack", second.url()))
        .json(&serde_json::json!({"by": "ana", "note": "fan replaced"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(acked["acked"]["by"], "ana", "{acked}");
    assert_eq!(acked["history"].as_array().map(Vec::len), Some(2), "fired and resolved: {acked}");
    let listed = kappa_tests::alert_kit::fetch_alerts(&second.url(), &[("rule", "overheat")]).await;
    assert_eq!(listed.len(), devices as usize);
    let elsewhere = kappa_tests::alert_kit::fetch_alerts(&ingest_only.url(), &[("rule", "overheat")]).await;
    assert_eq!(elsewhere, listed, "every node's API reads the same alerts");
    assert!(elsewhere.iter().any(|a| a["acked"]["by"] == "ana"));
    let local = dir.path().join("second-data").join("views.sqlite");
    let local_alerts = kappa_cloud::store::ViewStore::open_read_only(&local).and_then(|s| s.dump_alerts());
    assert_eq!(local_alerts.unwrap_or_default(), "", "the second node keeps no alerts of its own");
    let logs = format!("{}\n{}", second.proc.tail(), ingest_only.proc.tail());
    assert!(second.proc.terminate().await.success(), "the primary was not fenced\n{logs}");
    assert!(ingest_only.proc.terminate().await.success(), "the ingest node ran all along\n{logs}");
}

/// What [`replay_on_a_cluster`] saw.
struct Replayed {
    /// `views compare device_metrics 1 2`: exit code and output.
    compare: (Option<i32>, String),
    /// The last lines of the restarted workers' logs.
    logs: String,
    /// Their whole logs.
    full_logs: String,
}

/// A cluster of two workers computes `device_metrics@1` while the node
/// archives the log; then both workers restart with `device_metrics@2` (the
/// same definition) added, the rest of the scenario arrives, and version 2
/// is built by the workers' replay pipeline from the archive and then Kafka.
/// Once every version is live and caught up, it compares them (through the
/// CLI, on PostgreSQL) and, when they are equal, checks verify, promote and
/// rollback through the node's API. `env` goes to the restarted workers.
async fn replay_on_a_cluster(name: &str, env: &[(&str, &str)]) -> Replayed {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let schema = fresh_schema(name);
    let archive = dir.path().join("archive");
    let settings = format!(
        "[processor]\ncheckpoint_interval = \"200ms\"\nmax_out_of_orderness = \"2m\"\n\
         [api]\ndevices_view = \"device_metrics\"\nwindows_view = \"device_metrics\"\n\
         [archive]\npath = {archive:?}\nsegment_age = \"300ms\"\nsegment_bytes = 65536\n"
    );
    let v1 = crate::replay::metrics_view(1, "5m");
    let both = format!("{v1}{}", crate::replay::metrics_view(2, "5m"));
    let config = |views: &str| cluster_config(&broker, &schema, &format!("{settings}{views}"));
    let batches = scenario(false);
    let (first, second) = batches.split_at(batches.len() / 2);

    let cloud = Cloud::start_with(dir.path(), "cloud", &config(&v1), &[]).await;
    let mut workers = Vec::new();
    for w in ["worker-a", "worker-b"] {
        workers.push(Worker::start(dir.path(), w, &config(&v1), &[]).await);
    }
    let records = ingest(&cloud, first).await;
    crate::replay::wait_archived(&cloud, 1).await;
    let admin_config = dir.path().join("admin.toml");
    std::fs::write(&admin_config, format!("data_dir = {:?}\n{}", dir.path().join("admin-data"), config(&both)))
        .expect("write the admin config");
    let views = |args: &'static [&'static str]| {
        let path = admin_config.clone();
        async move {
            let out = tokio::process::Command::new(bin())
                .args(["cloud", "views"])
                .args(args)
                .args(["--config", path.to_str().unwrap_or_default()])
                .output()
                .await
                .expect("run kappa-cloud views");
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                text.push_str(&String::from_utf8_lossy(&out.stderr));
            }
            (out.status.code(), text)
        }
    };
    wait_for("the workers to process the first half", Duration::from_secs(120), || async {
        let (code, text) = views(&["list", "--json"]).await;
        let list: serde_json::Value = serde_json::from_str(&text).ok()?;
        (code == Some(0) && list[0]["position"].as_u64() == Some(records)).then_some(())
    })
    .await;

    for w in &mut workers {
        assert!(w.proc.terminate().await.success(), "a worker stops cleanly on SIGTERM");
    }
    let mut workers = Vec::new();
    for w in ["worker-c", "worker-d"] {
        workers.push(Worker::start(dir.path(), w, &config(&both), env).await);
    }
    let total = records + ingest(&cloud, second).await;
    let logs = || workers.iter().map(|w| w.proc.tail()).collect::<Vec<_>>().join("\n");
    let mut last = String::new();
    let live = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let (_, text) = views(&["list", "--json"]).await;
            last = text;
            let list: Vec<serde_json::Value> = serde_json::from_str(&last).unwrap_or_default();
            let done = |v: &serde_json::Value| v["state"] == "live" && v["position"].as_u64() == Some(total);
            if list.len() == 2 && list.iter().all(done) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(live.is_ok(), "both versions live and caught up; views list:\n{last}\n{}", logs());

    let compare = views(&["compare", "device_metrics", "1", "2"]).await;
    if compare.0 == Some(0) {
        let (code, text) = views(&["verify", "device_metrics@2"]).await;
        assert_eq!(code, Some(0), "the batch audit agrees with the replayed version:\n{text}");
        let served = fetch_rows(&cloud.url(), "device_metrics").await;
        assert!(served.len() > 100, "the scenario fills the view");
        let (code, text) = views(&["promote", "device_metrics", "2"]).await;
        assert_eq!(code, Some(0), "{text}");
        let listed: serde_json::Value = reqwest::get(format!("{}/v1/views", cloud.url()))
            .await
            .expect("GET /v1/views")
            .json()
            .await
            .expect("views JSON");
        let current: Vec<&str> = listed["views"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["current"] == true)
            .filter_map(|v| v["id"].as_str())
            .collect();
        assert_eq!(current, ["device_metrics@2"], "the node's API serves the promoted version");
        assert_eq!(fetch_rows(&cloud.url(), "device_metrics").await, served, "the same rows, from version 2");
        let (code, text) = views(&["rollback", "device_metrics"]).await;
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("device_metrics now serves device_metrics@1"), "{text}");
        let (code, text) = views(&["drop", "device_metrics", "2"]).await;
        assert_eq!(code, Some(2), "a version the workers run is not dropped: {text}");
    }
    let full_logs =
        workers.iter().map(|w| without_colours(&std::fs::read_to_string(&w.proc.log).unwrap_or_default())).collect();
    Replayed { compare, logs: logs(), full_logs }
}

/// `text` without terminal colour codes (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A view version added to a running cluster is replayed by the workers
/// (the archive, then Kafka), goes live, equals the version it was copied
/// from, passes the batch audit, and is promoted and rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_added_to_a_running_cluster_is_replayed_compared_and_promoted() {
    let run = replay_on_a_cluster("replay", &[]).await;
    assert_eq!(run.compare.0, Some(0), "version 2 equals version 1:\n{}\n{}", run.compare.1, run.logs);
    assert!(run.compare.1.ends_with("equal\n"), "{}", run.compare.1);
    // The replay read the archive up to where it ended, then Kafka.
    let reached = run
        .full_logs
        .lines()
        .filter(|l| l.contains("Replay reached the end of the archive"))
        .filter_map(|l| l.split("boundary=").nth(1))
        .collect::<Vec<_>>();
    // `boundary=0=6000 1=1000 ...`: partition=offset pairs.
    assert!(
        reached.iter().any(|b| b.split_whitespace().any(|e| e.split('=').nth(1).is_some_and(|o| o != "0"))),
        "the replay read records from the archive: {reached:?}\n{}",
        run.logs
    );
}

/// Negative control: workers that put the new version into the live
/// pipeline (no replay) build it from where that pipeline was, and compare
/// reports the readings it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_version_that_is_not_replayed_misses_the_history() {
    let run = replay_on_a_cluster("noreplay", &[(kappa_cloud::cluster::FAULT_NO_REPLAY, "1")]).await;
    assert_eq!(run.compare.0, Some(1), "compare finds the missing history:\n{}", run.compare.1);
    assert!(run.compare.1.contains("only in device_metrics@1"), "{}", run.compare.1);
}

/// A primary node on a PostgreSQL server the test stops and starts: what it
/// went through, for the test and its negative control.
struct PgRestart {
    /// The node's exit status if it exited during or after the restart.
    exited: Option<std::process::ExitStatus>,
    /// Alert transitions the webhook received, by idempotency key.
    delivered: BTreeSet<String>,
    expected: BTreeSet<String>,
    restarts: f64,
    /// The status of one API read (the alerts) before PostgreSQL stopped, and of the
    /// first one after it came back and the pipelines caught up.
    reads: (u16, u16),
    logs: String,
}

async fn restart_postgres_under_a_primary(name: &str, env: &[(&str, &str)]) -> PgRestart {
    let dir = tempfile::tempdir().unwrap();
    let pg = PrivatePostgres::start(dir.path());
    let broker = Tansu::start(dir.path()).await;
    let (port, seen) = receiver(0, 0).await;
    let rules = overheat_rules(port);
    let config = cluster_config_on(&broker, &pg.conninfo(), name, &rules);
    let mut node = Cloud::start_with(dir.path(), name, &config, env).await;

    let rows_url = format!("{}/v1/alerts?limit=1", node.url());
    let read_rows = || status(&rows_url);
    let read_before = read_rows().await;
    // PostgreSQL goes away; readings that overheat and cool down arrive
    // meanwhile (ingest needs only Kafka), so the pipelines fail their
    // checkpoints; then PostgreSQL comes back. Every device's alert must
    // fire and resolve, and both transitions reach the webhook.
    pg.stop();
    let devices = 5;
    // Without restarts (the negative control) the node may stop before the
    // last batch: stop sending then. A batch refused in the real test shows
    // as transitions missing below.
    let client = reqwest::Client::new();
    for b in &crate::alerts::overheating(devices, 60, "gw-hot") {
        let sent = client
            .post(format!("{}/v1/ingest", node.url()))
            .header("content-encoding", "zstd")
            .body(kappa_common::batch::encode(b, 3))
            .send()
            .await;
        if !sent.is_ok_and(|r| r.status().is_success()) {
            break;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let logs = std::fs::read_to_string(&node.proc.log).unwrap_or_default();
        if logs.contains("The pipeline failed") || node.proc.exited().is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no pipeline met the outage\n{}", node.proc.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.start_again();
    let expected = overheat_transitions(devices);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut exited = None;
    while std::time::Instant::now() < deadline {
        exited = node.proc.exited();
        let done = seen.lock().unwrap().by_key.keys().cloned().collect::<BTreeSet<_>>() == expected;
        if exited.is_some() || done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The API's connection broke with the restart and nothing has read
    // through it since: this read meets the dead connection first.
    let read_after = if exited.is_none() { read_rows().await } else { 0 };
    let restarts =
        metric(&format!("{}/metrics", node.url()), "kappa_cloud_pipeline_restarts_total").await.unwrap_or(0.0);
    let logs = node.proc.tail();
    if exited.is_none() {
        assert!(node.proc.terminate().await.success(), "the node stops cleanly\n{logs}");
    }
    let delivered = seen.lock().unwrap().by_key.keys().cloned().collect();
    PgRestart { exited, delivered, expected, restarts, reads: (read_before, read_after), logs }
}

/// Chaos seed 5 found it: a PostgreSQL restart stopped the primary node (its
/// alert and edge-aggregate pipelines returned the store's error). Now they
/// restore their last checkpoint and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_node_rides_out_a_postgresql_restart() {
    let run = restart_postgres_under_a_primary("pgrestart", &[]).await;
    assert_eq!(run.exited, None, "the node ran through the restart\n{}", run.logs);
    assert!(run.restarts >= 1.0, "a pipeline restarted ({} counted)\n{}", run.restarts, run.logs);
    assert_eq!(run.delivered, run.expected, "every transition after the restart was delivered\n{}", run.logs);
    // The chaos soak found the first read after a restart failing on the
    // dead connection; the reader now connects again and retries once.
    assert_eq!(run.reads, (200, 200), "the first API read after the restart is answered\n{}", run.logs);
}

/// Negative control of the read retry: a reader that does not connect again
/// fails the first read after the restart, and the test above would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_reader_that_does_not_reconnect_fails_the_first_read_after_a_postgresql_restart() {
    let run =
        restart_postgres_under_a_primary("pgread_nc", &[(kappa_cloud::store::pg::FAULT_NO_READ_RETRY, "1")]).await;
    assert_eq!(run.exited, None, "the node ran through the restart\n{}", run.logs);
    assert_eq!(run.reads.0, 200, "the read before the restart is answered\n{}", run.logs);
    assert!(run.reads.1 >= 500, "without the retry the first read fails ({})\n{}", run.reads.1, run.logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_pipelines_that_do_not_restart_take_the_node_down_with_postgresql() {
    let run =
        restart_postgres_under_a_primary("pgrestart_nc", &[(kappa_cloud::node::FAULT_NO_PIPELINE_RESTART, "1")]).await;
    assert!(run.exited.is_some_and(|s| !s.success()), "the node failed with PostgreSQL\n{}", run.logs);
    assert!(run.delivered.is_empty(), "nothing was delivered: {:?}", run.delivered);
}
