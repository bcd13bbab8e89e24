//! The device firmware model: no heap allocation per reading.
//!
//! A [`Firmware`] owns its identity in `heapless` strings, keeps samples that
//! the broker has not yet acknowledged in a fixed-capacity outbox (the oldest
//! is dropped, and counted, when the outbox is full, as a real device with a
//! small RAM buffer would), and encodes the front sample into a fixed-size
//! `heapless` buffer with serde_cbor (or serde_json for JSON firmware).
//! Memory per device is constant whatever the run length.

use heapless::{Deque, String as HString, Vec as HVec};
use serde::Serialize;
use serde_cbor::ser::SliceWrite;

use crate::anomaly::Fault;
use crate::signal::{Measurement, Sensors};

/// Samples a device holds while it waits for acknowledgements.
pub const OUTBOX_CAPACITY: usize = 128;
/// Largest encoded payload.
pub const PAYLOAD_CAPACITY: usize = 256;

/// Which firmware generation the device runs (its payload schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Old firmware: `data.temp`, `data.hum`, `data.pres`, `data.batt`.
    V1,
    /// Current firmware: metric names spelled out.
    V2,
}

/// Payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Cbor,
    Json,
}

/// What kind of event a sample reports (the `type` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Telemetry,
    Status,
    Alarm,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Status => "status",
            Self::Alarm => "alarm",
        }
    }

    /// About 1 in 100 samples is an alarm and 4 in 100 a status report.
    fn for_seq(seq: u64) -> Self {
        match seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57 {
            0 => Self::Alarm,
            1..=4 => Self::Status,
            _ => Self::Telemetry,
        }
    }
}

/// One measurement waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub seq: u64,
    pub ts_ms: i64,
    pub kind: EventKind,
    pub m: Measurement,
}

/// A simulated device's firmware.
#[derive(Debug)]
pub struct Firmware {
    id: HString<64>,
    user: HString<24>,
    boot: u32,
    next_seq: u64,
    schema: Schema,
    encoding: Encoding,
    sensors: Sensors,
    outbox: Deque<Sample, OUTBOX_CAPACITY>,
    /// How many samples at the front have been handed to the network and
    /// await their PUBACKs (in order).
    in_flight: usize,
    /// Most samples in flight at once (1 unless [`Firmware::set_window`]).
    window: usize,
    /// The temperature last reported (a stuck sensor repeats it).
    last_temp: f32,
    dropped: u64,
    buf: HVec<u8, PAYLOAD_CAPACITY>,
}

#[derive(Serialize)]
struct Tags<'a> {
    user: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct DataV2 {
    temperature: f32,
    humidity: f32,
    pressure: f32,
    battery: f32,
}

#[derive(Serialize)]
struct DataV1 {
    temp: f32,
    hum: f32,
    pres: f32,
    batt: f32,
}

#[derive(Serialize)]
struct Payload<'a, D> {
    v: u8,
    boot: u32,
    seq: u64,
    ts: i64,
    data: D,
    tags: Tags<'a>,
}

impl Firmware {
    /// A device with identity `id`, used by `user`, measuring with sensors seeded by `seed`.
    pub fn new(
        id: &str,
        user: &str,
        boot: u32,
        seed: u64,
        schema: Schema,
        encoding: Encoding,
    ) -> Result<Self, FirmwareError> {
        Ok(Self {
            id: HString::try_from(id).map_err(|_| FirmwareError::IdTooLong)?,
            user: HString::try_from(user).map_err(|_| FirmwareError::IdTooLong)?,
            boot,
            next_seq: 1,
            schema,
            encoding,
            sensors: Sensors::new(seed),
            outbox: Deque::new(),
            in_flight: 0,
            window: 1,
            last_temp: f32::NAN,
            dropped: 0,
            buf: HVec::new(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    /// Samples lost because the outbox was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Samples waiting for an acknowledgement.
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Takes a measurement at event time `ts_ms` and queues it for sending.
    ///
    /// When the outbox is full the oldest sample not in flight is dropped
    /// and counted; the in-flight one may already be at the broker.
    pub fn sample(&mut self, ts_ms: i64) {
        self.sample_with(ts_ms, Fault::None);
    }

    /// Takes a measurement with an injected fault (see [`crate::anomaly`]).
    /// Returns the sample queued, if any.
    pub fn sample_with(&mut self, ts_ms: i64, fault: Fault) -> Option<Sample> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut m = self.sensors.measure(ts_ms);
        match fault {
            Fault::None | Fault::Off => {}
            Fault::Offset(x) => m.temperature = ((m.temperature + x) * 100.0).round() / 100.0,
            Fault::Hold if !self.last_temp.is_nan() => m.temperature = self.last_temp,
            Fault::Hold => {}
            Fault::Lose => return None,
        }
        self.last_temp = m.temperature;
        let sample = Sample { seq, ts_ms, kind: EventKind::for_seq(seq), m };
        if self.outbox.is_full() {
            self.dropped += 1;
            if self.in_flight >= self.outbox.len() {
                // Everything queued may already be at the broker: the new sample is the one lost.
                return None;
            }
            // Drop the oldest sample not in flight, keeping those ahead of it.
            let mut kept: Deque<Sample, OUTBOX_CAPACITY> = Deque::new();
            for _ in 0..self.in_flight {
                if let Some(s) = self.outbox.pop_front() {
                    let _ = kept.push_back(s);
                }
            }
            self.outbox.pop_front();
            while let Some(s) = kept.pop_back() {
                // Cannot fail: they were just taken from the outbox.
                let _ = self.outbox.push_front(s);
            }
        }
        // Cannot fail: a slot was freed above if the outbox was full.
        let _ = self.outbox.push_back(sample);
        Some(sample)
    }

    /// The oldest unacknowledged sample.
    pub fn front(&self) -> Option<&Sample> {
        self.outbox.front()
    }

    /// Lets up to `window` samples be in flight at once (at least 1; small
    /// firmware keeps 1).
    pub fn set_window(&mut self, window: usize) {
        self.window = window.clamp(1, OUTBOX_CAPACITY);
    }

    /// If fewer than the window are in flight, encodes the oldest sample not
    /// yet in flight into the firmware's fixed buffer and marks it in flight.
    /// Returns its sequence number and bytes.
    pub fn next_to_send(&mut self) -> Result<Option<(u64, &[u8])>, FirmwareError> {
        if self.in_flight >= self.window {
            return Ok(None);
        }
        let Some(sample) = self.outbox.iter().nth(self.in_flight).copied() else { return Ok(None) };
        match self.encode(&sample) {
            Ok(_) => {
                self.in_flight += 1;
                Ok(Some((sample.seq, &self.buf)))
            }
            Err(e) => {
                // A sample that cannot be encoded never will be: drop it
                // (only the oldest can fail first: samples are sent in order).
                if self.in_flight == 0 {
                    self.outbox.pop_front();
                }
                self.dropped += 1;
                Err(e)
            }
        }
    }

    /// The broker acknowledged the oldest in-flight sample `seq` (QoS 1
    /// acknowledgements come in order): forget and return it.
    pub fn acknowledge(&mut self, seq: u64) -> Option<Sample> {
        if self.in_flight == 0 || self.outbox.front().map(|s| s.seq) != Some(seq) {
            return None;
        }
        self.in_flight -= 1;
        self.outbox.pop_front()
    }

    /// The sample [`Firmware::next_to_send`] just handed out could not be
    /// sent (the client's queue was full): it goes again next time.
    pub fn unsend(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The connection dropped what was in flight: send it all again.
    pub fn resend(&mut self) {
        self.in_flight = 0;
    }

    /// Encodes `sample` as this firmware's payload into its fixed buffer.
    pub fn encode(&mut self, sample: &Sample) -> Result<&[u8], FirmwareError> {
        let m = sample.m;
        let tags = Tags { user: &self.user, kind: sample.kind.as_str() };
        self.buf.clear();
        // Use the whole fixed buffer as the write target, then trim to what was written.
        self.buf.resize_default(PAYLOAD_CAPACITY).map_err(|_| FirmwareError::BufferFull)?;
        let written = match self.schema {
            Schema::V2 => {
                let data = DataV2 {
                    temperature: m.temperature,
                    humidity: m.humidity,
                    pressure: m.pressure,
                    battery: m.battery,
                };
                write(
                    &mut self.buf,
                    self.encoding,
                    &Payload { v: 2, boot: self.boot, seq: sample.seq, ts: sample.ts_ms, data, tags },
                )?
            }
            Schema::V1 => {
                let data = DataV1 { temp: m.temperature, hum: m.humidity, pres: m.pressure, batt: m.battery };
                write(
                    &mut self.buf,
                    self.encoding,
                    &Payload { v: 1, boot: self.boot, seq: sample.seq, ts: sample.ts_ms, data, tags },
                )?
            }
        };
        self.buf.truncate(written);
        Ok(&self.buf)
    }
}

fn write<T: Serialize>(buf: &mut [u8], encoding: Encoding, value: &T) -> Result<usize, FirmwareError> {
    match encoding {
        Encoding::Cbor => {
            let mut ser = serde_cbor::Serializer::new(SliceWrite::new(buf));
            value.serialize(&mut ser).map_err(|_| FirmwareError::BufferFull)?;
            Ok(ser.into_inner().bytes_written())
        }
        Encoding::Json => {
            let total = buf.len();
            let mut rest: &mut [u8] = buf;
            serde_json::to_writer(&mut rest, value).map_err(|_| FirmwareError::BufferFull)?;
            Ok(total - rest.len())
        }
    }
}

/// Firmware-level failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
    #[error("device or user id longer than the firmware's fixed buffer")]
    IdTooLong,
    #[error("payload does not fit the {PAYLOAD_CAPACITY}-byte firmware buffer")]
    BufferFull,
}

#[cfg(test)]
mod tests {
    use kappa_common::device;

    use super::*;

    fn fw(schema: Schema, encoding: Encoding) -> Firmware {
        Firmware::new("sim-00001", "u-00001", 1, 42, schema, encoding).unwrap()
    }

    fn decoded(schema: Schema, encoding: Encoding) -> kappa_common::Reading {
        let mut f = fw(schema, encoding);
        f.sample(1_767_225_600_000);
        let bytes = f.next_to_send().unwrap().unwrap().1.to_vec();
        device::decode("sim-00001", &bytes, &device::Limits::default()).unwrap()
    }

    #[test]
    fn both_schemas_decode_to_the_same_metrics() {
        for encoding in [Encoding::Cbor, Encoding::Json] {
            let (v1, v2) = (decoded(Schema::V1, encoding), decoded(Schema::V2, encoding));
            assert_eq!((v1.schema, v2.schema), (1, 2));
            assert_eq!(v1.metrics, v2.metrics);
            assert_eq!(v1.tags.get("user").map(String::as_str), Some("u-00001"));
        }
    }

    #[test]
    fn decoded_values_are_what_the_ground_truth_expects() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.sample(1_767_225_600_000);
        let t = f.front().unwrap().m.temperature;
        for encoding in [Encoding::Cbor, Encoding::Json] {
            let r = decoded(Schema::V2, encoding);
            assert_eq!(r.metric("temperature"), Some(crate::truth::wire_value(t, encoding)));
        }
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts_it() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        for i in 0..(OUTBOX_CAPACITY as i64 + 3) {
            f.sample(1_767_225_600_000 + i);
        }
        assert_eq!(f.dropped(), 3);
        assert_eq!(f.pending(), OUTBOX_CAPACITY);
        assert_eq!(f.front().map(|s| s.seq), Some(4));
    }

    #[test]
    fn a_full_outbox_never_drops_the_sample_in_flight() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.sample(1_767_225_600_000);
        assert_eq!(f.next_to_send().unwrap().map(|(seq, _)| seq), Some(1));
        for i in 0..(OUTBOX_CAPACITY as i64 + 1) {
            f.sample(1_767_225_600_001 + i);
        }
        assert_eq!(f.dropped(), 2);
        assert_eq!(f.acknowledge(1).map(|s| s.seq), Some(1));
        assert_eq!(f.front().map(|s| s.seq), Some(4));
    }

    #[test]
    fn one_sample_in_flight_at_a_time_acknowledged_in_order() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.sample(1_767_225_600_000);
        f.sample(1_767_225_601_000);
        assert_eq!(f.next_to_send().unwrap().map(|(seq, _)| seq), Some(1));
        assert!(f.next_to_send().unwrap().is_none(), "a second sample must wait");
        assert_eq!(f.acknowledge(2), None, "an ack for another sample changes nothing");
        assert_eq!(f.acknowledge(1).map(|s| s.seq), Some(1));
        assert_eq!(f.next_to_send().unwrap().map(|(seq, _)| seq), Some(2));
    }

    #[test]
    fn a_window_keeps_several_samples_in_flight_acknowledged_in_order() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.set_window(3);
        for i in 0..5 {
            f.sample(1_767_225_600_000 + i);
        }
        let sent: Vec<u64> = std::iter::from_fn(|| f.next_to_send().unwrap().map(|(seq, _)| seq)).collect();
        assert_eq!(sent, [1, 2, 3], "three in flight, the rest wait");
        assert_eq!(f.acknowledge(2), None, "acknowledgements come in order");
        assert_eq!(f.acknowledge(1).map(|s| s.seq), Some(1));
        assert_eq!(f.next_to_send().unwrap().map(|(seq, _)| seq), Some(4));
        f.resend();
        assert_eq!(f.next_to_send().unwrap().map(|(seq, _)| seq), Some(2), "after a lost connection, from the oldest");
    }

    #[test]
    fn a_full_outbox_keeps_every_sample_in_flight() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.set_window(2);
        f.sample(1_767_225_600_000);
        f.sample(1_767_225_600_001);
        assert!(f.next_to_send().unwrap().is_some() && f.next_to_send().unwrap().is_some());
        for i in 0..(OUTBOX_CAPACITY as i64) {
            f.sample(1_767_225_600_002 + i);
        }
        assert_eq!(f.dropped(), 2);
        assert_eq!(f.acknowledge(1).map(|s| s.seq), Some(1));
        assert_eq!(f.acknowledge(2).map(|s| s.seq), Some(2));
        assert_eq!(f.front().map(|s| s.seq), Some(5), "3 and 4, the oldest not in flight, were dropped");
    }

    #[test]
    fn after_a_lost_connection_the_same_sample_goes_again() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.sample(1_767_225_600_000);
        let first = f.next_to_send().unwrap().unwrap().1.to_vec();
        f.resend();
        assert_eq!(f.next_to_send().unwrap().unwrap().1, &first[..]);
    }

    #[test]
    fn a_cbor_payload_is_compact() {
        let mut f = fw(Schema::V2, Encoding::Cbor);
        f.sample(1_767_225_600_000);
        let len = f.next_to_send().unwrap().unwrap().1.len();
        assert!(len <= 128, "{len} bytes");
    }
}
