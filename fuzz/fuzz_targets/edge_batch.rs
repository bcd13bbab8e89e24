//! An ingest request body as it arrives: a zstd frame around a batch.
#![no_main]

use kappa_common::batch::{self, BatchLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = batch::decode(data, &BatchLimits::default());
});
