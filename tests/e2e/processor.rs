//! The processor killed with SIGKILL over and over while it works through a
//! log: the views end byte-identical to a run that was never interrupted.
//! And the negative control: with the test-only switch that splits a
//! checkpoint in two transactions, the same crashes corrupt the views, so
//! the comparison does catch a processor that is not exactly-once.

use std::time::Duration;

use kappa_tests::harness::*;

/// The reference views, with a short out-of-orderness bound so the scenario
/// has late data, plus `poll`/`checkpoint` settings.
pub(crate) fn config(poll: usize, checkpoint_ms: u64) -> String {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud/single-node.toml"))
        .expect("example config");
    let views = &example[example.find("[schema]").expect("schema section")..];
    format!(
        "[processor]\npoll_records = {poll}\ncheckpoint_interval = \"{checkpoint_ms}ms\"\nmax_out_of_orderness = \"2m\"\n{views}"
    )
}

pub(crate) async fn until_processed(cloud: &Cloud, records: u64) {
    wait_for("every record checkpointed", Duration::from_secs(180), || async move {
        (cloud.checkpointed_offsets() >= records).then_some(())
    })
    .await;
}

/// Ingests the scenario into a fresh node a few batches at a time and kills
/// the node with SIGKILL at a pseudo-random moment after each step, so it
/// is killed mid-processing, mid-checkpoint and idle; returns the final dump
/// and how many kills hit while checkpointed work lagged behind the log.
async fn crashed_run(dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> (String, usize) {
    let batches = scenario(true);
    let mut cloud = Cloud::start_with(dir, name, &config(200, 20), env).await;
    let (mut ingested, mut mid_work, mut next) = (0, 0, 0);
    let mut r: u64 = 7;
    while next < batches.len() {
        r = (r * 1_103_515_245 + 12_345) % (1 << 31);
        let take = (1 + r % 3) as usize;
        ingested += ingest(&cloud, &batches[next..(next + take).min(batches.len())]).await;
        next += take;
        tokio::time::sleep(Duration::from_millis(r % 60)).await;
        cloud.proc.kill9().await;
        if cloud.checkpointed_offsets() < ingested {
            mid_work += 1;
        }
        cloud.restart().await;
    }
    until_processed(&cloud, ingested).await;
    assert!(cloud.proc.terminate().await.success());
    (cloud.dump().await, mid_work)
}

async fn clean_run(dir: &std::path::Path) -> String {
    let mut clean = Cloud::start_with(dir, "clean", &config(5000, 1000), &[]).await;
    let records = ingest(&clean, &scenario(true)).await;
    until_processed(&clean, records).await;
    assert!(clean.proc.terminate().await.success());
    clean.dump().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_processor_twenty_times_leaves_byte_identical_views() {
    let dir = tempfile::tempdir().unwrap();
    let expected = clean_run(dir.path()).await;
    assert!(expected.lines().count() > 100, "the scenario fills the views");
    assert!(expected.contains("\tlate\n"), "the scenario has late data");
    let (crashed, kills) = crashed_run(dir.path(), "crashed", &[]).await;
    eprintln!("{kills} kills landed while checkpointed work lagged the log");
    assert!(kills >= 20, "only {kills} kills landed while work was pending");
    if crashed != expected {
        let first = expected.lines().zip(crashed.lines()).find(|(a, b)| a != b);
        panic!("views differ after {kills} kills; first difference: {first:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_non_atomic_checkpoints_fail_the_same_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let expected = clean_run(dir.path()).await;
    let (crashed, kills) = crashed_run(dir.path(), "split", &[("KAPPA_TEST_SPLIT_CHECKPOINT", "1")]).await;
    assert!(kills >= 20);
    assert_ne!(
        crashed, expected,
        "with checkpoints split in two transactions, {kills} kills should have corrupted the views"
    );
}
