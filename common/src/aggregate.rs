//! Pre-aggregated windows: what an edge agent sends instead of (or besides)
//! raw readings, and what the cloud stores as its own kind of record.
//!
//! An [`Aggregate`] summarises one metric of one device over one event-time
//! window `[start_ms, start_ms + window_ms)`: count, min, max, sum, sum of
//! squares, and the first and last values by event time. Aggregates are
//! *partials*: two of the same window merge into the aggregate of both sets
//! of readings ([`Aggregate::merge`]), so a reading that arrives after its
//! window was sent travels as a second partial, not a correction, and the
//! receiver's merge gives the same result in any order.

use serde::{Deserialize, Serialize};

use crate::reading::{MAX_NAME_LEN, Reading, validate_device_id};

/// One metric of one device over one event-time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    #[serde(rename = "d")]
    pub device: String,
    #[serde(rename = "m")]
    pub metric: String,
    /// Window length, milliseconds.
    #[serde(rename = "w")]
    pub window_ms: i64,
    /// Window start (event time), a multiple of `window_ms`.
    #[serde(rename = "s")]
    pub start_ms: i64,
    #[serde(rename = "n")]
    pub count: u64,
    #[serde(rename = "lo")]
    pub min: f64,
    #[serde(rename = "hi")]
    pub max: f64,
    #[serde(rename = "sum")]
    pub sum: f64,
    #[serde(rename = "sq")]
    pub sum_sq: f64,
    /// Event time and value of the earliest reading (ties: the first seen).
    #[serde(rename = "ft")]
    pub first_ts: i64,
    #[serde(rename = "f")]
    pub first: f64,
    /// Event time and value of the latest reading (ties: the last seen).
    #[serde(rename = "lt")]
    pub last_ts: i64,
    #[serde(rename = "l")]
    pub last: f64,
}

impl Aggregate {
    /// The aggregate of one value at `ts_ms`, in the window of size `window_ms` holding it.
    pub fn of(device: &str, metric: &str, window_ms: i64, ts_ms: i64, value: f64) -> Self {
        Self {
            device: device.to_string(),
            metric: metric.to_string(),
            window_ms,
            start_ms: window_start(ts_ms, window_ms),
            count: 1,
            min: value,
            max: value,
            sum: value,
            sum_sq: value * value,
            first_ts: ts_ms,
            first: value,
            last_ts: ts_ms,
            last: value,
        }
    }

    /// `(device, metric, window_ms, start_ms)`: which window this is.
    pub fn key(&self) -> (&str, &str, i64, i64) {
        (&self.device, &self.metric, self.window_ms, self.start_ms)
    }

    /// Adds one value.
    pub fn add(&mut self, ts_ms: i64, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        self.sum_sq += value * value;
        if ts_ms < self.first_ts {
            (self.first_ts, self.first) = (ts_ms, value);
        }
        if ts_ms >= self.last_ts {
            (self.last_ts, self.last) = (ts_ms, value);
        }
    }

    /// Merges another partial of the same window into this one.
    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        if other.first_ts < self.first_ts {
            (self.first_ts, self.first) = (other.first_ts, other.first);
        }
        if other.last_ts >= self.last_ts {
            (self.last_ts, self.last) = (other.last_ts, other.last);
        }
    }

    /// The window end (exclusive).
    pub fn end_ms(&self) -> i64 {
        self.start_ms.saturating_add(self.window_ms)
    }

    /// Checks what a receiver must not trust blindly.
    pub fn validate(&self) -> Result<(), &'static str> {
        validate_device_id(&self.device).map_err(|_| "bad_device_id")?;
        if self.metric.is_empty() || self.metric.len() > MAX_NAME_LEN {
            return Err("bad_metric_name");
        }
        if self.window_ms <= 0 || self.start_ms.rem_euclid(self.window_ms) != 0 {
            return Err("bad_window");
        }
        if self.count == 0 {
            return Err("empty_aggregate");
        }
        let values = [self.min, self.max, self.sum, self.sum_sq, self.first, self.last];
        if values.iter().any(|v| !v.is_finite()) || self.min > self.max {
            return Err("bad_aggregate_values");
        }
        let (start, end) = (self.start_ms, self.end_ms());
        if !(start..end).contains(&self.first_ts) || !(start..end).contains(&self.last_ts) {
            return Err("bad_aggregate_times");
        }
        Ok(())
    }
}

/// The start of the window of size `window_ms` that holds `ts_ms`.
pub fn window_start(ts_ms: i64, window_ms: i64) -> i64 {
    ts_ms - ts_ms.rem_euclid(window_ms)
}

/// Folds readings into aggregates of `window_ms`, one per device, metric and
/// window, in order of first appearance. Null metric values are skipped.
pub fn aggregate<'a>(readings: impl IntoIterator<Item = &'a Reading>, window_ms: i64) -> Vec<Aggregate> {
    let mut out: Vec<Aggregate> = Vec::new();
    let mut index: std::collections::HashMap<(String, String, i64), usize> = std::collections::HashMap::new();
    for r in readings {
        for (metric, value) in &r.metrics {
            let Some(v) = value else { continue };
            let start = window_start(r.ts_ms, window_ms);
            match index.get(&(r.device.clone(), metric.clone(), start)) {
                Some(&i) => out[i].add(r.ts_ms, *v),
                None => {
                    index.insert((r.device.clone(), metric.clone(), start), out.len());
                    out.push(Aggregate::of(&r.device, metric, window_ms, r.ts_ms, *v));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::tests::sample;

    #[test]
    fn partials_merge_to_the_whole_in_any_order() {
        let mut readings = Vec::new();
        for i in 0..20 {
            let mut r = sample();
            r.ts_ms = 60_000 + i * 1000;
            r.metrics = [("t".to_string(), Some(i as f64 * 1.5 - 7.0))].into();
            readings.push(r);
        }
        let whole = aggregate(&readings, 60_000);
        assert_eq!(whole.len(), 1);
        let (a, b) = readings.split_at(7);
        for (x, y) in [(a, b), (b, a)] {
            let mut merged = aggregate(x, 60_000).remove(0);
            merged.merge(&aggregate(y, 60_000)[0]);
            assert_eq!(merged, whole[0]);
        }
        let w = &whole[0];
        assert_eq!((w.count, w.min, w.max, w.first, w.last), (20, -7.0, 21.5, -7.0, 21.5));
        assert_eq!((w.first_ts, w.last_ts), (60_000, 79_000));
        assert!(w.validate().is_ok());
    }

    #[test]
    fn windows_align_to_their_size_before_1970_too() {
        assert_eq!(window_start(61_000, 60_000), 60_000);
        assert_eq!(window_start(-1, 60_000), -60_000);
    }

    #[test]
    fn nonsense_is_refused() {
        let good = Aggregate::of("d-1", "t", 10_000, 25_000, 1.0);
        assert_eq!(good.start_ms, 20_000);
        let bad = |f: fn(&mut Aggregate)| {
            let mut a = good.clone();
            f(&mut a);
            a.validate().unwrap_err()
        };
        assert_eq!(bad(|a| a.window_ms = 0), "bad_window");
        assert_eq!(bad(|a| a.start_ms += 1), "bad_window");
        assert_eq!(bad(|a| a.count = 0), "empty_aggregate");
        assert_eq!(bad(|a| a.sum = f64::NAN), "bad_aggregate_values");
        assert_eq!(bad(|a| a.last_ts = 40_000), "bad_aggregate_times");
        assert_eq!(bad(|a| a.device = "a/b".into()), "bad_device_id");
    }
}
