//! Alert benchmarks: scoring cost per reading with every rule of the
//! reference rule set on, state per series, and the latency from an
//! anomalous reading's ingest to its alert in the API.

use std::path::Path;
use std::time::{Duration, Instant};

use kappa_cloud::alerts::engine::{AlertOperator, SilenceClock};
use kappa_cloud::config::CloudConfig;
use kappa_common::Reading;
use kappa_common::batch::{self, EdgeBatch};
use serde_json::{Value, json};

const T0: i64 = 1_767_225_600_000;

/// The rules shipped in `deploy/cloud/single-node.toml`.
fn reference_rules() -> CloudConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    CloudConfig::load(&path).unwrap()
}

fn reading(device: &str, seq: u64, ts_ms: i64, temperature: f64) -> Reading {
    Reading {
        device: device.to_string(),
        boot: 1,
        seq,
        ts_ms,
        schema: 2,
        metrics: [
            ("temperature".to_string(), Some(temperature)),
            ("humidity".to_string(), Some(50.0)),
            ("pressure".to_string(), Some(1000.0)),
            ("battery".to_string(), Some(3.9)),
        ]
        .into(),
        tags: [("type".to_string(), "telemetry".to_string())].into(),
    }
}

/// Scoring cost: the alert operator alone over readings held in memory.
pub fn scoring(scale: f64) -> Value {
    let cfg = reference_rules();
    let rules = cfg.rule_specs().unwrap();
    let devices = ((10_000.0 * scale) as u32).max(100);
    let rounds = 100u64;
    let settings = cfg.alerts.settings(Vec::new(), SilenceClock::Gateway);
    let mut op = AlertOperator::new(rules.clone(), settings);
    op.restore(Vec::new()).unwrap();
    let partitions = 8;
    // One reading per device, updated in place every round (untimed), as the
    // processor hands the operator readings it has just decoded: a batch of
    // 10,000 readings is about as much as it holds at once.
    let mut batch: Vec<Reading> = (0..devices).map(|d| reading(&format!("sim-{d:05}"), 0, T0, 20.0)).collect();
    let parts: Vec<u32> = batch.iter().map(|r| kappa_common::partition::partition_for(&r.device, partitions)).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut scoring = Duration::ZERO;
    let mut n = 0usize;
    for i in 0..rounds {
        for r in &mut batch {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.seq = i + 1;
            r.ts_ms = T0 + i as i64 * 1000;
            if let Some(t) = r.metrics.get_mut("temperature") {
                *t = Some(20.0 + (x % 100) as f64 * 0.003);
            }
        }
        let t = Instant::now();
        for (r, p) in batch.iter().zip(&parts) {
            op.process(*p, "gw", 0, r);
        }
        // The first rounds create every series and warm the detectors up.
        if i >= rounds / 2 {
            scoring += t.elapsed();
            n += batch.len();
        }
        if i == rounds / 2 - 1 {
            op.take_changes();
        }
    }
    let t = Instant::now();
    let changes = op.take_changes();
    let checkpoint = t.elapsed();
    let ns = scoring.as_nanos() as f64 / n as f64;
    let stored = op.stored_bytes_per_series();
    let memory = op.memory_bytes_per_series();
    println!(
        "alert scoring: {ns:.0} ns/reading with {} rules on ({} devices, {} series); state per series: {stored:.0} B stored, {memory:.0} B in memory; checkpoint of {} dirty devices {:.1} ms",
        rules.len(),
        devices,
        op.series(),
        changes.state_upserts.len(),
        checkpoint.as_secs_f64() * 1e3
    );
    json!({
        "rules": rules.len(), "devices": devices, "series": op.series(), "readings": n,
        "ns_per_reading": ns, "stored_bytes_per_series": stored, "memory_bytes_per_series": memory,
        "checkpoint_ms": checkpoint.as_secs_f64() * 1e3, "dirty_devices": changes.state_upserts.len(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Alert latency: a cloud node (embedded log, default views, the reference
/// rules) under a steady background load; an anomalous reading is POSTed to
/// ingest and the API is polled until its alert shows.
pub fn latency(dir: &Path, scale: f64) -> Value {
    let samples = ((200.0 * scale) as usize).max(20);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml"))
            .unwrap();
    text = text.replace("data_dir = \"data/cloud\"", &format!("data_dir = {:?}", dir.join("alert-latency")));
    let mut cfg = CloudConfig::from_toml(&text).unwrap();
    // The example is a production config (HTTPS, tokens); the benchmark measures the pipeline on loopback.
    cfg.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    cfg.http.tls = None;
    cfg.auth = Default::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let node = kappa_cloud::node::Node::start(cfg).await.unwrap();
        let url = format!("http://{}", node.http_addr());
        let client = reqwest::Client::new();
        let (c, u) = (client.clone(), url.clone());
        let post = move |b: EdgeBatch| {
            let client = c.clone();
            let url = u.clone();
            async move {
                let resp = client
                    .post(format!("{url}/v1/ingest"))
                    .header("content-encoding", "zstd")
                    .body(batch::encode(&b, 3))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "{}", resp.status());
            }
        };
        // Background: 500 devices, one reading per second of event time, 10
        // batches of 500 readings per wall second (5,000 readings/s).
        let stop = tokio_util::sync::CancellationToken::new();
        let bg = {
            let stop = stop.clone();
            let post = post.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let rs: Vec<Reading> =
                        (0..500).map(|d| reading(&format!("bg-{d:04}"), i + 1, T0 + i as i64 * 1000, 20.0)).collect();
                    post(EdgeBatch::new("gw-bg", i + 1, rs)).await;
                    i += 1;
                }
                i * 500
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut lat = Vec::with_capacity(samples);
        for s in 0..samples {
            let device = format!("lat-{s:04}");
            // Thirty normal readings, then six seconds at 90 degrees in one
            // batch: the overheat rule (temperature > 50 for 5 s) fires on
            // the last of them.
            let normal: Vec<Reading> = (0..30).map(|i| reading(&device, i + 1, T0 + i as i64 * 1000, 20.0)).collect();
            post(EdgeBatch::new("gw-lat", 2 * s as u64 + 1, normal)).await;
            let rs: Vec<Reading> = (30..36).map(|i| reading(&device, i + 1, T0 + i as i64 * 1000, 90.0)).collect();
            let started = Instant::now();
            post(EdgeBatch::new("gw-lat", 2 * s as u64 + 2, rs)).await;
            loop {
                let page: Value = client
                    .get(format!("{url}/v1/alerts"))
                    .query(&[("device", device.as_str()), ("rule", "overheat")])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if page["alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(30), "no alert for {device} after 30 s");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat.push(started.elapsed().as_secs_f64() * 1e3);
        }
        stop.cancel();
        let background = bg.await.unwrap();
        node.shutdown();
        node.wait().await.unwrap();
        lat.sort_by(f64::total_cmp);
        let (p50, p99, max) = (percentile(&lat, 0.5), percentile(&lat, 0.99), lat[lat.len() - 1]);
        println!(
            "alert latency: anomalous reading POSTed -> alert in the API: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms ({samples} alerts, 5,000 readings/s background)"
        );
        json!({ "samples": samples, "p50_ms": p50, "p99_ms": p99, "max_ms": max, "background_readings": background })
    })
}
