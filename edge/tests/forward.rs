//! The forwarder against a slow cloud on loopback: batches are pipelined up
//! to `max_in_flight`, a batch that fails while later ones succeed holds the
//! cursor back until it is through, and new batches respect the rate bound.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeSet, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kappa_common::Reading;
use kappa_common::batch::{self, BatchLimits};
use kappa_edge::config::{Durability, EdgeConfig};
use kappa_edge::forward;
use kappa_edge::log::{EdgeLog, Entry, SharedLog};
use kappa_edge::metrics::EdgeMetrics;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the fake cloud saw.
#[derive(Default)]
struct Seen {
    now: AtomicUsize,
    max: AtomicUsize,
    /// `(device, seq)` of every reading in an accepted batch.
    readings: Mutex<Vec<(String, u64)>>,
    /// Batch ids whose first attempt was refused with 503.
    failed_once: Mutex<HashSet<u64>>,
    /// Cursor observations: (when a batch id was accepted, batch ids accepted so far).
    accepted: Mutex<Vec<u64>>,
}

/// A cloud that takes `delay` per request and answers 503 to the first
/// attempt of every batch id in `fail_first`.
async fn cloud(delay: Duration, fail_first: BTreeSet<u64>) -> (String, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let fail_first = Arc::new(fail_first);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (s, fail_first) = (s.clone(), fail_first.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (s, fail_first) = (s.clone(), fail_first.clone());
                    async move {
                        let n = s.now.fetch_add(1, Ordering::SeqCst) + 1;
                        s.max.fetch_max(n, Ordering::SeqCst);
                        let id: u64 = req.headers()["x-kappa-batch-id"].to_str().unwrap().parse().unwrap();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        tokio::time::sleep(delay).await;
                        s.now.fetch_sub(1, Ordering::SeqCst);
                        let first_try = s.failed_once.lock().unwrap().insert(id);
                        if fail_first.contains(&id) && first_try {
                            return Ok::<_, Infallible>(
                                Response::builder().status(503).body(Full::new(Bytes::from("busy"))).unwrap(),
                            );
                        }
                        let b = batch::decode(&body, &BatchLimits::default()).unwrap();
                        s.readings.lock().unwrap().extend(b.readings.into_iter().map(|r| (r.device, r.seq)));
                        s.accepted.lock().unwrap().push(id);
                        Ok(Response::new(Full::new(Bytes::from("{}"))))
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (url, seen)
}

fn config(url: &str, extra: &str) -> EdgeConfig {
    EdgeConfig::from_toml(&format!(
        "gateway_id = \"gw-fwd\"\n[forward]\ncloud_url = \"{url}\"\nmax_batch_readings = 1000\nmax_batch_age = \"50ms\"\nretry_min = \"50ms\"\nretry_max = \"200ms\"\nheartbeat_interval = \"0s\"\n{extra}\n"
    ))
    .unwrap()
}

fn reading(device: u32, seq: u64) -> Reading {
    Reading {
        device: format!("d{device}"),
        boot: 1,
        seq,
        ts_ms: 1_767_225_600_000 + seq as i64 * 1000,
        schema: 2,
        metrics: [("t".to_string(), Some(20.0 + (seq % 10) as f64 / 10.0))].into(),
        tags: Default::default(),
    }
}

/// A log holding `n` readings from 10 devices.
fn filled_log(dir: &std::path::Path, n: u64) -> std::path::PathBuf {
    let path = dir.join("log.sqlite");
    let mut log = EdgeLog::open(&path, Durability::Normal).unwrap();
    let entries: Vec<Entry> = (0..n).map(|i| Entry::Reading(reading((i % 10) as u32, i / 10 + 1))).collect();
    log.append(&entries, 0).unwrap();
    path
}

/// Runs the forwarder until the cursor covers every reading; returns how long it took.
async fn forward_all(path: &std::path::Path, cfg: EdgeConfig, n: u64) -> Duration {
    let log = SharedLog::new(EdgeLog::open(path, Durability::Normal).unwrap());
    let metrics = Arc::new(EdgeMetrics::new(&mut Registry::default()));
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(forward::run(
        log,
        cfg.forward,
        cfg.gateway_id,
        Default::default(),
        Arc::new(Notify::new()),
        metrics,
        cancel.clone(),
    ));
    let reader = EdgeLog::open_read_only(path).unwrap();
    loop {
        let s = reader.stats().unwrap();
        // The cursor never claims a reading the cloud has not accepted.
        assert!(s.cursor as u64 <= n);
        if s.cursor as u64 == n && s.outbox_batches == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not drained: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert!(reader.check().unwrap().is_empty());
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_pipelined_and_the_cursor_waits_for_the_earliest() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_log(dir.path(), 20_000);
    // Batch 2 fails once, so batches 3.. complete before it.
    // Each answer takes 500 ms, far longer than building a batch even on a
    // loaded machine, so four batches are on the wire at once.
    let (url, seen) = cloud(Duration::from_millis(500), BTreeSet::from([2])).await;
    let cfg = config(&url, "max_in_flight = 4\nmax_readings_per_second = 0");

    // Watch the cursor while batches complete out of order.
    let watcher = {
        let (path, seen) = (path.clone(), seen.clone());
        tokio::spawn(async move {
            let reader = loop {
                if let Ok(r) = EdgeLog::open_read_only(&path) {
                    break r;
                }
            };
            let mut violations = Vec::new();
            for _ in 0..300 {
                let cursor = reader.stats().unwrap().cursor;
                let accepted: BTreeSet<u64> = seen.accepted.lock().unwrap().iter().copied().collect();
                // Batches hold 1000 readings each, in order: the cursor may only
                // cover batches 1..=k when all of them were accepted.
                let covered = (cursor as u64).div_ceil(1000);
                if (1..=covered).any(|b| !accepted.contains(&b)) {
                    violations.push((cursor, accepted));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            violations
        })
    };
    forward_all(&path, cfg, 20_000).await;
    let violations = watcher.await.unwrap();
    assert!(violations.is_empty(), "the cursor passed a batch the cloud had not accepted: {:?}", violations.first());

    let max = seen.max.load(Ordering::SeqCst);
    assert_eq!(max, 4, "at most, and up to, max_in_flight batches on the wire");
    let accepted = seen.accepted.lock().unwrap().clone();
    let pos = |id| accepted.iter().position(|&b| b == id).unwrap();
    assert!(pos(2) > pos(3), "batch 2 was retried after later ones completed: {accepted:?}");
    let mut got = seen.readings.lock().unwrap().clone();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 20_000, "every reading arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_batches_respect_the_rate_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_log(dir.path(), 12_000);
    let (url, _seen) = cloud(Duration::ZERO, BTreeSet::new()).await;
    // A second's burst (4,000), then 8,000 more at 4,000/s: about 2 s.
    let took = forward_all(&path, config(&url, "max_readings_per_second = 4000"), 12_000).await;
    assert!(took >= Duration::from_millis(1700), "drained 12,000 readings in {took:?} at 4,000/s");

    let dir = tempfile::tempdir().unwrap();
    let path = filled_log(dir.path(), 12_000);
    let (url, _seen) = cloud(Duration::ZERO, BTreeSet::new()).await;
    let unbounded = forward_all(&path, config(&url, "max_readings_per_second = 0"), 12_000).await;
    assert!(unbounded < took, "without a bound ({unbounded:?}) it is faster than with one ({took:?})");
}
