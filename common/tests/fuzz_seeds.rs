//! The fuzz targets' seed corpora (`fuzz/corpus/TARGET/`) are real inputs
//! that decode: this test checks every committed seed, and with
//! `KAPPA_WRITE_FUZZ_SEEDS=1` writes them from the current encoders first.

use std::path::{Path, PathBuf};

use kappa_common::aggregate::Aggregate;
use kappa_common::batch::{self, BatchLimits, EdgeBatch};
use kappa_common::record::{self, LogEvent, LogRecord};
use kappa_common::segment::{Block, SegmentReader, SegmentWriter};
use kappa_common::{Reading, columnar, device};

const T0: i64 = 1_767_225_600_000;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn reading(device: &str, seq: u64) -> Reading {
    Reading {
        device: device.into(),
        boot: 2,
        seq,
        ts_ms: T0 + seq as i64 * 1000,
        schema: 2,
        metrics: [("temperature".to_string(), Some(21.5 + seq as f64)), ("humidity".to_string(), None)].into(),
        tags: [("site".to_string(), "north".to_string())].into(),
    }
}

fn aggregate() -> Aggregate {
    Aggregate {
        device: "sensor-1".into(),
        metric: "temperature".into(),
        window_ms: 60_000,
        start_ms: T0,
        count: 3,
        min: 1.0,
        max: 3.0,
        sum: 6.0,
        sum_sq: 14.0,
        first_ts: T0,
        first: 1.0,
        last_ts: T0 + 2_000,
        last: 3.0,
    }
}

fn batch() -> EdgeBatch {
    let readings = (1..=6).map(|s| reading(if s % 2 == 0 { "sensor-1" } else { "sensor-2" }, s)).collect();
    EdgeBatch::new("gw-0001", 42, readings).with_aggregates(vec![aggregate()])
}

/// Every seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let v1 = br#"{"v":1,"boot":3,"seq":9,"ts":1767225600000,"data":{"temp":21.5,"hum":null,"batt":3.7},"tags":{"fw":"1.4"}}"#;
    let log = |event| record::encode(&LogRecord { gateway: "gw-0001".into(), batch_id: 42, ingest_ms: T0, event });
    let mut segment = SegmentWriter::new(2, 100, 64);
    for o in 100..106 {
        segment.push(o, log(LogEvent::Reading(reading("sensor-1", o))).into()).expect("offsets increase");
    }
    let entries: Vec<(u64, serde_bytes::ByteBuf)> =
        (7..10u64).map(|o| (o, serde_bytes::ByteBuf::from(log(LogEvent::Reading(reading("s", o)))))).collect();
    let mut wrapped = vec![entries.len() as u8];
    wrapped.extend(serde_cbor::to_vec(&entries).expect("plain data encodes"));
    let columnar_batch = batch().with_format(columnar::COLUMNAR_FORMAT);
    vec![
        ("device_payload", "cbor-v2", device::encode_cbor(&reading("sensor-1", 1))),
        ("device_payload", "json-v2", device::encode_json(&reading("sensor-1", 2))),
        ("device_payload", "json-v1", v1.to_vec()),
        ("edge_batch", "cbor", batch::encode(&batch(), 3)),
        ("edge_batch", "columnar", batch::encode(&columnar_batch, 3)),
        ("batch_payload", "cbor", batch::to_cbor(&batch())),
        ("batch_payload", "columnar", columnar::encode(&columnar_batch)),
        ("log_record", "reading", log(LogEvent::Reading(reading("sensor-1", 3)))),
        ("log_record", "heartbeat", log(LogEvent::Heartbeat { ts_ms: T0 })),
        ("log_record", "progress", log(LogEvent::Progress { ts_ms: T0 })),
        ("log_record", "aggregate", log(LogEvent::Aggregate(aggregate()))),
        ("archive_segment", "segment", segment.finish()),
        ("archive_segment", "wrapped-block", wrapped),
    ]
}

#[test]
fn every_seed_is_a_valid_input_of_its_target() {
    let all = seeds();
    if std::env::var_os("KAPPA_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, bytes) in &all {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(corpus(target).join(name), bytes).unwrap();
        }
    }
    for (target, name, fresh) in &all {
        let path = corpus(target).join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (write the seeds with KAPPA_WRITE_FUZZ_SEEDS=1)", path.display()));
        match *target {
            "device_payload" => {
                let r = device::decode("sensor-1", &bytes, &device::Limits::default()).unwrap();
                assert!(r.metric("temperature").is_some(), "{name}");
            }
            "edge_batch" => assert_eq!(batch::decode(&bytes, &BatchLimits::default()).unwrap().readings.len(), 6),
            "batch_payload" => {
                let decoded = batch::decode(&kappa_common::frame::compress(&bytes, 1), &BatchLimits::default());
                assert_eq!(decoded.unwrap().aggregates.len(), 1, "{name}");
            }
            "log_record" => {
                record::decode(&bytes).unwrap();
            }
            "archive_segment" if bytes.first() == Some(&b'K') => {
                let mut reader = SegmentReader::new(bytes.clone()).unwrap();
                let mut offsets = Vec::new();
                while let Some(block) = reader.next_block() {
                    let Block::Records(records) = block else { panic!("{name}: a damaged block") };
                    offsets.extend(records.into_iter().map(|(o, _)| o));
                }
                assert_eq!(offsets, (100..106).collect::<Vec<_>>());
            }
            "archive_segment" => {
                let entries: Vec<(u64, serde_bytes::ByteBuf)> = serde_cbor::from_slice(&bytes[1..]).unwrap();
                assert_eq!(entries.len(), usize::from(bytes[0]));
            }
            other => panic!("no check for {other}"),
        }
        // The committed seed is what today's encoders write (timestamps and
        // compression are deterministic), so a format change shows up here.
        assert_eq!(&bytes, fresh, "{} is stale: rewrite the seeds with KAPPA_WRITE_FUZZ_SEEDS=1", path.display());
    }
}
