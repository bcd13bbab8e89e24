//! The processor killed with SIGKILL over and over while it works through a
//! log: the views end byte-identical to a run that was never interrupted.
//! And the negative control: with the test-only switch that splits a
//! checkpoint in two transactions, the same crashes corrupt the views, so
//! the comparison does catch a processor that is not exactly-once.

use std::time::Duration;

use kappa_common::Reading;
use kappa_common::batch::{self, EdgeBatch};

use crate::util::*;

const T0: i64 = 1_767_225_600_000;

/// The reference views, with a short out-of-orderness bound so the scenario
/// has late data, plus `poll`/`checkpoint` settings.
fn config(poll: usize, checkpoint_ms: u64) -> String {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud/single-node.toml"))
        .expect("example config");
    let views = &example[example.find("[schema]").expect("schema section")..];
    format!(
        "[processor]\npoll_records = {poll}\ncheckpoint_interval = \"{checkpoint_ms}ms\"\nmax_out_of_orderness = \"2m\"\n{views}"
    )
}

/// 30 devices, 2,000 readings each, in batches of 500, one per second; blocks of readings
/// reversed (out of order), one in twenty sent twice, a few far too late.
fn scenario() -> Vec<EdgeBatch> {
    let mut readings: Vec<Reading> = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..2000u64 {
        for d in 0..30u64 {
            let ts = T0 + i as i64 * 1000 - if rnd(100) == 0 { 20 * 60_000 } else { 0 };
            let t = (rnd(100) != 0).then(|| 15.0 + rnd(1500) as f64 / 100.0);
            readings.push(Reading {
                device: format!("dev-{d:02}"),
                boot: 1,
                seq: i + 1,
                ts_ms: ts,
                schema: 2,
                metrics: [
                    ("temperature".to_string(), t),
                    ("humidity".to_string(), Some(40.0 + rnd(200) as f64 / 10.0)),
                ]
                .into(),
                tags: [
                    ("user".to_string(), format!("u-{}", d / 3)),
                    ("type".to_string(), ["telemetry", "status", "alarm"][rnd(3) as usize].to_string()),
                ]
                .into(),
            });
        }
    }
    let mut out: Vec<Reading> = Vec::new();
    for (i, block) in readings.chunks(50).enumerate() {
        for r in block.iter().rev() {
            out.push(r.clone());
            if i % 20 == 3 {
                out.push(r.clone());
            }
        }
    }
    out.chunks(500).enumerate().map(|(i, c)| EdgeBatch::new("gw-crash", i as u64 + 1, c.to_vec())).collect()
}

async fn ingest(cloud: &Cloud, batches: &[EdgeBatch]) -> u64 {
    let client = reqwest::Client::new();
    let mut records = 0;
    for b in batches {
        let resp = client
            .post(format!("{}/v1/ingest", cloud.url()))
            .header("content-encoding", "zstd")
            .body(batch::encode(b, 3))
            .send()
            .await
            .expect("ingest");
        assert_eq!(resp.status().as_u16(), 200);
        records += b.readings.len() as u64;
    }
    records
}

async fn until_processed(cloud: &Cloud, records: u64) {
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
    let batches = scenario();
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
    let records = ingest(&clean, &scenario()).await;
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
