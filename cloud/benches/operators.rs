//! Micro-benchmarks of the stream processor's operators, each alone on
//! readings held in memory: a 5-minute tumbling view, dedup by reading
//! identity, and alert scoring with the reference rule set. Every function
//! reports readings (or rows) per second.
//!
//!   cargo bench -p kappa-cloud --bench operators            # timed
//!   cargo bench -p kappa-cloud --bench operators -- --test  # each once, untimed
//!
//! Group and function names are stable identifiers: `kappa-bench`'s `micro`
//! section reports them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kappa_cloud::alerts::engine::{AlertOperator, SilenceClock};
use kappa_cloud::config::CloudConfig;
use kappa_cloud::processor::dedup::Dedup;
use kappa_cloud::views::operator::{Event, ViewOperator};
use kappa_cloud::views::spec::ViewSpec;
use kappa_common::Reading;

const T0: i64 = 1_767_225_600_000;
const DEVICES: usize = 1000;
/// Readings per device per iteration, one a second.
const STEPS: usize = 10;

/// `steps` readings of every one of `devices` devices, in fleet order.
fn readings(devices: usize, steps: usize) -> Vec<Reading> {
    (0..steps)
        .flat_map(|s| {
            (0..devices).map(move |d| Reading {
                device: format!("dev-{d:05}"),
                boot: 1,
                seq: s as u64 + 1,
                ts_ms: T0 + s as i64 * 1000,
                schema: 2,
                metrics: [
                    ("temperature".to_string(), Some(20.0 + ((d + s) % 13) as f64 * 0.25)),
                    ("humidity".to_string(), Some(45.0 + ((d + s) % 7) as f64)),
                    ("pressure".to_string(), Some(1000.0 + (d % 5) as f64)),
                    ("battery".to_string(), Some(3.9)),
                ]
                .into(),
                tags: [
                    ("user".to_string(), format!("u-{:05}", d / 4)),
                    ("type".to_string(), if s.is_multiple_of(20) { "status" } else { "telemetry" }.to_string()),
                ]
                .into(),
            })
        })
        .collect()
}

/// Per device, 5-minute tumbling windows with six aggregates (update mode).
fn tumbling_view() -> ViewSpec {
    let cfg = CloudConfig::from_toml(
        r#"
[api]
devices_view = "m"
windows_view = "m"
[[views]]
name = "m"
key = "device"
window = { kind = "tumbling", size = "5m" }
output = "update"
allowed_lateness = "10m"
aggregates = [
  { name = "event_count", fn = "count" },
  { name = "avg_temp", fn = "avg", of = "temperature" },
  { name = "max_temp", fn = "max", of = "temperature" },
  { name = "min_temp", fn = "min", of = "temperature" },
  { name = "stddev_temp", fn = "stddev", of = "temperature" },
  { name = "avg_humidity", fn = "avg", of = "humidity" },
]
"#,
    )
    .unwrap();
    cfg.view_specs().unwrap().pop().unwrap()
}

fn feed(op: &mut ViewOperator, rs: &[Reading]) {
    let mut late = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        let ev = Event {
            partition: 0,
            offset: i as u64,
            gateway: "gw",
            ingest_ms: 0,
            reading: r,
            watermark: Some(r.ts_ms - 5000),
        };
        op.process(&ev, &mut late);
    }
    assert!(late.is_empty());
}

fn view_operator(c: &mut Criterion) {
    let spec = tumbling_view();
    let rs = readings(DEVICES, STEPS);
    let mut g = c.benchmark_group("view_operator");
    g.throughput(Throughput::Elements(rs.len() as u64));
    // 1,000 keys, ten readings each, into one window per key.
    g.bench_function("tumbling_5m_process", |b| {
        b.iter_batched_ref(|| ViewOperator::new(spec.clone()), |op| feed(op, black_box(&rs)), BatchSize::LargeInput)
    });
    // A checkpoint's rows and state blobs for 1,000 dirty windows.
    g.throughput(Throughput::Elements(DEVICES as u64));
    g.bench_function("tumbling_5m_take_changes", |b| {
        b.iter_batched_ref(
            || {
                let mut op = ViewOperator::new(spec.clone());
                feed(&mut op, &rs);
                op
            },
            |op| black_box(op.take_changes()),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn dedup(c: &mut Criterion) {
    let rs = readings(DEVICES, STEPS);
    let horizon = 24 * 3600 * 1000;
    let mut g = c.benchmark_group("dedup");
    g.throughput(Throughput::Elements(rs.len() as u64));
    // Every reading new, in order per device: one range per boot.
    g.bench_function("first_sighting", |b| {
        b.iter_batched_ref(
            || Dedup::new(horizon),
            |d| {
                for r in &rs {
                    assert!(d.first_sighting(black_box(r)));
                }
            },
            BatchSize::LargeInput,
        )
    });
    // Every reading a redelivery of one already seen.
    let mut seen = Dedup::new(horizon);
    for r in &rs {
        seen.first_sighting(r);
    }
    g.bench_function("duplicate", |b| {
        b.iter(|| {
            for r in &rs {
                assert!(!seen.first_sighting(black_box(r)));
            }
        })
    });
    g.finish();
}

/// The rules of `deploy/cloud/single-node.toml`, scored per reading as in
/// `kappa-bench`'s `alert_scoring`: every series exists and is warm.
fn alert_scoring(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    let cfg = CloudConfig::load(&path).unwrap();
    let settings = cfg.alerts.settings(Vec::new(), SilenceClock::Gateway);
    let mut op = AlertOperator::new(cfg.rule_specs().unwrap(), settings);
    op.restore(Vec::new()).unwrap();
    let mut batch = readings(DEVICES, 1);
    let mut round = 0u64;
    // Temperatures with a little noise, so no rule fires (a stuck sensor would).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut step = |op: &mut AlertOperator, batch: &mut [Reading]| {
        round += 1;
        for r in batch.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            r.seq = round;
            r.ts_ms = T0 + round as i64 * 1000;
            if let Some(t) = r.metrics.get_mut("temperature") {
                *t = Some(20.0 + (x % 100) as f64 * 0.003);
            }
            op.process(0, "gw", 0, r);
        }
    };
    // The first rounds create every series and warm the detectors up.
    for _ in 0..50 {
        step(&mut op, &mut batch);
    }
    let _ = op.take_changes();
    let mut g = c.benchmark_group("alert_operator");
    g.throughput(Throughput::Elements(DEVICES as u64));
    g.bench_function("score_reference_rules", |b| b.iter(|| step(&mut op, black_box(&mut batch))));
    g.finish();
}

criterion_group!(operators, view_operator, dedup, alert_scoring);
criterion_main!(operators);
