//! Property tests: every codec round-trips arbitrary valid values.

use std::collections::BTreeMap;

use kappa_common::batch::{self, BatchLimits, EdgeBatch};
use kappa_common::reading::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS, ReadingLimits};
use kappa_common::record::{self, LogEvent, LogRecord};
use kappa_common::{Reading, device};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,24}"
}

fn reading() -> impl Strategy<Value = Reading> {
    (
        name(),
        any::<u32>(),
        any::<u64>(),
        MIN_TIMESTAMP_MS..MAX_TIMESTAMP_MS,
        prop::collection::btree_map(name(), prop::option::weighted(0.9, -1e12f64..1e12), 1..8),
        prop::collection::btree_map(name(), "[ -~]{0,32}", 0..4),
    )
        .prop_map(|(device, boot, seq, ts_ms, metrics, tags)| Reading {
            device,
            boot,
            seq,
            ts_ms,
            schema: 2,
            metrics,
            tags,
        })
}

proptest! {
    #[test]
    fn device_payloads_round_trip_in_cbor_and_json(r in reading()) {
        let limits = device::Limits { max_payload_bytes: 1 << 16, reading: ReadingLimits::default() };
        prop_assert_eq!(device::decode(&r.device, &device::encode_cbor(&r), &limits), Ok(r.clone()));
        prop_assert_eq!(device::decode(&r.device, &device::encode_json(&r), &limits), Ok(r));
    }

    #[test]
    fn batches_round_trip(readings in prop::collection::vec(reading(), 0..40), id in any::<u64>(), gw in name()) {
        let b = EdgeBatch::new(gw, id, readings);
        prop_assert_eq!(batch::decode(&batch::encode(&b, 3), &BatchLimits::default()), Ok(b));
    }

    #[test]
    fn log_records_round_trip(r in reading(), gw in name(), id in any::<u64>(), ingest in any::<i64>()) {
        let rec = LogRecord { gateway: gw, batch_id: id, ingest_ms: ingest, event: LogEvent::Reading(r) };
        prop_assert_eq!(record::decode(&record::encode(&rec)), Ok(rec));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = device::decode("d", &bytes, &device::Limits::default());
        let _ = batch::decode(&bytes, &BatchLimits::default());
        let _ = record::decode(&bytes);
    }
}

#[test]
fn empty_tag_map_is_not_written_but_reads_back_empty() {
    let r = Reading {
        device: "d".into(),
        boot: 0,
        seq: 0,
        ts_ms: MIN_TIMESTAMP_MS,
        schema: 2,
        metrics: [("x".to_string(), Some(1.0))].into(),
        tags: BTreeMap::new(),
    };
    let json = String::from_utf8(device::encode_json(&r)).unwrap();
    assert!(!json.contains("tags"), "{json}");
}
