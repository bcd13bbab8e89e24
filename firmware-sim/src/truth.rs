//! Ground truth: what the fleet published and had acknowledged.
//!
//! Each device records a reading only when the broker acknowledged it (QoS 1
//! PUBACK), summed per minute of event time. The values are computed from the
//! firmware's own samples as they appear on the wire (an `f32` widened for
//! CBOR, the shortest decimal re-read for JSON), independently of the
//! decoders under test.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use kappa_common::window::tumbling_start;
use serde::{Deserialize, Serialize};

use crate::anomaly::AnomalyTruth;
use crate::firmware::{Encoding, Sample};

/// Width of a ground-truth window: one minute of event time.
pub const TRUTH_WINDOW_MS: i64 = 60_000;

/// The metrics every simulated device reports (current names, sorted).
pub const METRICS: [&str; 4] = ["battery", "humidity", "pressure", "temperature"];

/// Count, sum, min and max of one metric in one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricTruth {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl MetricTruth {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
    }
}

const EMPTY: MetricTruth = MetricTruth { count: 0, sum: 0.0, min: 0.0, max: 0.0 };

/// One device's acknowledged readings in one minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowTruth {
    pub device: String,
    pub window_start_ms: i64,
    pub count: u64,
    pub metrics: BTreeMap<String, MetricTruth>,
}

/// Truth accumulated by one device task.
#[derive(Debug, Default)]
pub struct DeviceTruth {
    windows: BTreeMap<i64, (u64, [MetricTruth; 4])>,
    first_seq: Option<u64>,
    last_seq: u64,
}

impl DeviceTruth {
    /// Records an acknowledged sample as the cloud will decode it.
    pub fn record(&mut self, sample: &Sample, encoding: Encoding) {
        let m = sample.m;
        // Same order as METRICS.
        let values = [m.battery, m.humidity, m.pressure, m.temperature];
        let (count, metrics) =
            self.windows.entry(tumbling_start(sample.ts_ms, TRUTH_WINDOW_MS)).or_insert((0, [EMPTY; 4]));
        *count += 1;
        for (acc, v) in metrics.iter_mut().zip(values) {
            acc.add(wire_value(v, encoding));
        }
        self.first_seq.get_or_insert(sample.seq);
        self.last_seq = sample.seq;
    }

    /// Readings recorded.
    pub fn acked(&self) -> u64 {
        self.windows.values().map(|(c, _)| c).sum()
    }

    fn into_rows(self, device: &str) -> impl Iterator<Item = WindowTruth> + '_ {
        self.windows.into_iter().map(move |(start, (count, metrics))| WindowTruth {
            device: device.to_string(),
            window_start_ms: start,
            count,
            metrics: METRICS.iter().map(|n| n.to_string()).zip(metrics).collect(),
        })
    }
}

/// The value a cloud decoder sees for a firmware `f32` sent in `encoding`.
pub fn wire_value(v: f32, encoding: Encoding) -> f64 {
    match encoding {
        Encoding::Cbor => f64::from(v),
        // JSON carries the shortest decimal that round-trips the f32; the
        // receiver parses that decimal as an f64.
        Encoding::Json => v.to_string().parse().unwrap_or(f64::NAN),
    }
}

/// The ground-truth file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub seed: u64,
    pub devices: u32,
    pub window_ms: i64,
    /// Samples taken by all firmware.
    pub sampled: u64,
    /// Readings the broker acknowledged: what the pipeline owes.
    pub acked: u64,
    /// Samples dropped on devices because their outbox was full.
    pub dropped_on_device: u64,
    /// Samples still unacknowledged when the run ended.
    pub undelivered: u64,
    /// Per device and minute, sorted by device then window.
    pub rows: Vec<WindowTruth>,
    /// Every anomaly injected, sorted by device then start.
    #[serde(default)]
    pub anomalies: Vec<AnomalyTruth>,
}

impl GroundTruth {
    pub fn new(seed: u64, devices: u32) -> Self {
        Self {
            seed,
            devices,
            window_ms: TRUTH_WINDOW_MS,
            sampled: 0,
            acked: 0,
            dropped_on_device: 0,
            undelivered: 0,
            rows: Vec::new(),
            anomalies: Vec::new(),
        }
    }

    /// Adds one device's truth.
    pub fn absorb(&mut self, device: &str, truth: DeviceTruth) {
        self.acked += truth.acked();
        self.rows.extend(truth.into_rows(device));
    }

    /// Sorts rows by device and window (devices may finish in any order).
    pub fn finish(&mut self) {
        self.rows.sort_by(|a, b| (&a.device, a.window_start_ms).cmp(&(&b.device, b.window_start_ms)));
        self.anomalies.sort_by(|a, b| (&a.device, a.start_ms).cmp(&(&b.device, b.start_ms)));
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer_pretty(&mut f, self)?;
        f.write_all(b"\n")?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(tmp, path)
    }

    /// Reads a ground-truth file.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::EventKind;
    use crate::signal::Measurement;

    fn sample(seq: u64, ts_ms: i64, t: f32) -> Sample {
        Sample {
            seq,
            ts_ms,
            kind: EventKind::Telemetry,
            m: Measurement { temperature: t, humidity: 50.0, pressure: 1000.0, battery: 4.0 },
        }
    }

    #[test]
    fn readings_are_summed_per_device_minute() {
        let mut d = DeviceTruth::default();
        d.record(&sample(1, 60_000, 1.5), Encoding::Cbor);
        d.record(&sample(2, 119_999, 2.5), Encoding::Cbor);
        d.record(&sample(3, 120_000, 4.0), Encoding::Cbor);
        let mut g = GroundTruth::new(1, 1);
        g.absorb("d", d);
        assert_eq!(g.acked, 3);
        assert_eq!(g.rows.len(), 2);
        let t = g.rows[0].metrics["temperature"];
        assert_eq!((t.count, t.sum, t.min, t.max), (2, 4.0, 1.5, 2.5));
    }

    #[test]
    fn json_values_are_the_shortest_decimal_not_the_widened_float() {
        assert_eq!(wire_value(21.37, Encoding::Json), 21.37);
        assert_ne!(wire_value(21.37, Encoding::Cbor), 21.37);
    }
}
