//! A record read from the event log (a Kafka topic other producers may write to).
#![no_main]

use kappa_common::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = record::decode(data);
});
