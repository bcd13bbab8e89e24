//! Whatever a device publishes on `devices/{id}/telemetry` (CBOR or JSON,
//! any schema version), through the agent's decoder and the checks after it.
#![no_main]

use kappa_common::device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reading) = device::decode("fuzz-device", data, &device::Limits::default()) {
        let _ = reading.validate(&kappa_common::reading::ReadingLimits::default());
    }
});
