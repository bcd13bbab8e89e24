//! A record read from the event log (a Kafka topic other producers may write to).
//! Decoded both ways the cloud decodes: afresh, and into the buffers of the
//! previous record (the processor's path), which must give the same answer.
#![no_main]

use kappa_common::record::{self, LogEvent, LogRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fresh = record::decode(data);
    // A reused record as the processor holds it: the last reading's names in place.
    let last = LogEvent::Reading(kappa_common::Reading {
        device: "dev-1".into(),
        metrics: [("temperature".to_string(), Some(20.5))].into(),
        tags: [("user".to_string(), "u-1".to_string())].into(),
        ..Default::default()
    });
    let mut reused = LogRecord { gateway: "gw".into(), batch_id: 1, ingest_ms: 1, event: last };
    let in_place = record::decode_into(data, &mut reused);
    match (&fresh, in_place) {
        // Debug output compares NaN payload-insensitively but exactly otherwise.
        (Ok(want), Ok(())) => assert_eq!(format!("{want:?}"), format!("{reused:?}")),
        (Err(_), Err(_)) => {}
        (want, got) => panic!("decode gave {want:?}, decode_into {got:?}"),
    }
});
