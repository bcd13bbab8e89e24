//! Micro-benchmarks of the wire codecs: device payloads, log records, edge
//! batches (formats 1 and 2, zstd level 3 as the forwarder sends them) and
//! archive segments. Every function reports elements (readings or records)
//! per second.
//!
//!   cargo bench -p kappa-common --bench codecs            # timed
//!   cargo bench -p kappa-common --bench codecs -- --test  # each once, untimed
//!
//! Group and function names are stable identifiers: `kappa-bench`'s `micro`
//! section reports them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kappa_common::Reading;
use kappa_common::batch::{self, BatchLimits, COLUMNAR_FORMAT, EdgeBatch};
use kappa_common::device;
use kappa_common::record::{self, LogEvent, LogRecord};
use kappa_common::segment::{Block, SegmentReader, SegmentWriter};

const T0: i64 = 1_767_225_600_000;
/// Device payloads and log records per iteration.
const SMALL: usize = 1000;
/// Readings per edge batch: the forwarder's default.
const BATCH: usize = 5000;

/// `n` readings of 100 devices in fleet order (every device at t, then at
/// t+1 s, ...), with sensor-like values: `f32` readings in steps of 0.01
/// that drift a little from one second to the next.
fn readings(n: usize) -> Vec<Reading> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let devices = 100;
    let mut level: Vec<[i64; 4]> = (0..devices).map(|d| [2000 + d * 7, 4500 + d * 3, 101_300 - d, 390]).collect();
    (0..n)
        .map(|i| {
            let d = i % devices as usize;
            let step = (i / devices as usize) as u64;
            for v in &mut level[d] {
                *v += (next() % 5) as i64 - 2;
            }
            let [t, h, p, b] = level[d];
            let f = |v: i64| Some(f64::from(v as f32 / 100.0));
            Reading {
                device: format!("sim-{d:05}"),
                boot: 1,
                seq: step + 1,
                ts_ms: T0 + step as i64 * 1000,
                schema: 2,
                metrics: [
                    ("temperature".to_string(), f(t)),
                    ("humidity".to_string(), f(h)),
                    ("pressure".to_string(), f(p)),
                    ("battery".to_string(), f(b)),
                ]
                .into(),
                tags: [
                    ("user".to_string(), format!("u-{:05}", d / 4)),
                    ("type".to_string(), if step.is_multiple_of(20) { "status" } else { "telemetry" }.to_string()),
                ]
                .into(),
            }
        })
        .collect()
}

fn log_record(r: &Reading) -> LogRecord {
    LogRecord { gateway: "gw-bench-01".into(), batch_id: 1, ingest_ms: T0, event: LogEvent::Reading(r.clone()) }
}

fn device_decode(c: &mut Criterion) {
    let rs = readings(SMALL);
    let limits = device::Limits::default();
    let mut g = c.benchmark_group("device_decode");
    g.throughput(Throughput::Elements(SMALL as u64));
    for (name, encode) in [("cbor", device::encode_cbor as fn(&Reading) -> Vec<u8>), ("json", device::encode_json)] {
        let payloads: Vec<(String, Vec<u8>)> = rs.iter().map(|r| (r.device.clone(), encode(r))).collect();
        g.bench_function(name, |b| {
            b.iter(|| {
                for (id, p) in &payloads {
                    black_box(device::decode(id, black_box(p), &limits).unwrap());
                }
            })
        });
    }
    g.finish();
}

fn log_records(c: &mut Criterion) {
    let records: Vec<LogRecord> = readings(SMALL).iter().map(log_record).collect();
    let encoded: Vec<Vec<u8>> = records.iter().map(record::encode).collect();
    let mut g = c.benchmark_group("log_record");
    g.throughput(Throughput::Elements(SMALL as u64));
    g.bench_function("encode", |b| {
        b.iter(|| {
            for r in &records {
                black_box(record::encode(black_box(r)));
            }
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            for e in &encoded {
                black_box(record::decode(black_box(e)).unwrap());
            }
        })
    });
    g.finish();
}

fn edge_batches(c: &mut Criterion) {
    let rs = readings(BATCH);
    let limits = BatchLimits::default();
    let mut g = c.benchmark_group("edge_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, format) in [("cbor", batch::BATCH_FORMAT), ("columnar", COLUMNAR_FORMAT)] {
        let b5000 = EdgeBatch::new("gw-bench-01", 1, rs.clone()).with_format(format);
        let body = batch::encode(&b5000, 3);
        assert_eq!(batch::decode(&body, &limits).unwrap(), b5000);
        g.bench_function(format!("{name}_encode_zstd3"), |b| b.iter(|| black_box(batch::encode(black_box(&b5000), 3))));
        g.bench_function(format!("{name}_decode"), |b| {
            b.iter(|| black_box(batch::decode(black_box(&body), &limits).unwrap()))
        });
    }
    g.finish();
}

fn archive_segment(c: &mut Criterion) {
    let values: Vec<bytes::Bytes> = readings(BATCH).iter().map(|r| record::encode(&log_record(r)).into()).collect();
    // The archiver's default block size.
    let block = 256 << 10;
    let write = |values: &[bytes::Bytes]| {
        let mut w = SegmentWriter::new(0, 0, block);
        for (i, v) in values.iter().enumerate() {
            w.push(i as u64, v.clone()).unwrap();
        }
        w.finish()
    };
    let segment = bytes::Bytes::from(write(&values));
    let mut g = c.benchmark_group("archive_segment");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("write", |b| b.iter(|| black_box(write(black_box(&values)))));
    g.bench_function("read", |b| {
        b.iter_batched(
            || SegmentReader::new(segment.clone()).unwrap(),
            |mut reader| {
                let mut n = 0;
                while let Some(block) = reader.next_block() {
                    let Block::Records(records) = block else { panic!("a damaged block in a fresh segment") };
                    n += records.len();
                }
                assert_eq!(n, BATCH);
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(codecs, device_decode, log_records, edge_batches, archive_segment);
criterion_main!(codecs);
