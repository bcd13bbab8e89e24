//! The batch inside the frame (packed CBOR, format 1, or columnar, format
//! 2): the input is compressed first, so the fuzzer explores the batch
//! decoders rather than zstd's.
#![no_main]

use kappa_common::batch::{self, BatchLimits};
use kappa_common::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = batch::decode(&frame::compress(data, 1), &BatchLimits::default()) {
        for a in &b.aggregates {
            let _ = a.validate();
        }
    }
});
