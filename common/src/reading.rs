//! The reading: the one event model shared by firmware, edge and cloud.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema version every decoder upgrades to.
pub const CURRENT_SCHEMA: u16 = 2;

/// Earliest device timestamp any stage accepts (2000-01-01T00:00:00Z, in ms).
pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;
/// Latest device timestamp any stage accepts (2100-01-01T00:00:00Z, in ms).
pub const MAX_TIMESTAMP_MS: i64 = 4_102_444_800_000;

/// One measurement taken by one device.
///
/// Metrics are named numbers; a metric present with no value (`null` on the
/// wire) is kept as `None` so views can skip and count it rather than guess.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Device id, as in the MQTT topic `devices/{device}/telemetry`.
    #[serde(rename = "d")]
    pub device: String,
    /// Changes every time the device restarts.
    #[serde(rename = "b")]
    pub boot: u32,
    /// Monotonic within one boot.
    #[serde(rename = "s")]
    pub seq: u64,
    /// Device clock at measurement time (event time), Unix milliseconds.
    #[serde(rename = "t")]
    pub ts_ms: i64,
    /// The schema version the reading arrived in (upgraded on decode).
    #[serde(rename = "v")]
    pub schema: u16,
    /// Named metrics, sorted by name.
    #[serde(rename = "m")]
    pub metrics: BTreeMap<String, Option<f64>>,
    /// Free-form tags (for example `user`, `type`), sorted by name.
    #[serde(rename = "g", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// `(device, boot, seq)`: the identity of a reading everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadingId {
    pub device: String,
    pub boot: u32,
    pub seq: u64,
}

impl Reading {
    /// The reading's identity.
    pub fn id(&self) -> ReadingId {
        ReadingId { device: self.device.clone(), boot: self.boot, seq: self.seq }
    }

    /// The value of a metric, if present and not null.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied().flatten()
    }

    /// Packed CBOR (integer field keys): the compact form logs store.
    pub fn to_packed_cbor(&self) -> Vec<u8> {
        // Plain data into a Vec: serialization cannot fail.
        serde_cbor::ser::to_vec_packed(self).unwrap_or_default()
    }

    /// Reads back [`Reading::to_packed_cbor`] (or the named-field form).
    pub fn from_cbor(bytes: &[u8]) -> Result<Reading, serde_cbor::Error> {
        serde_cbor::from_slice(bytes)
    }

    /// Checks every rule a reading must satisfy to enter a log.
    pub fn validate(&self, limits: &ReadingLimits) -> Result<(), ValidationError> {
        validate_device_id(&self.device)?;
        if !(MIN_TIMESTAMP_MS..MAX_TIMESTAMP_MS).contains(&self.ts_ms) {
            return Err(ValidationError::TimestampOutOfRange { ts_ms: self.ts_ms });
        }
        if self.metrics.is_empty() {
            return Err(ValidationError::NoMetrics);
        }
        if self.metrics.len() > limits.max_metrics {
            return Err(ValidationError::TooManyMetrics { count: self.metrics.len(), max: limits.max_metrics });
        }
        for (name, value) in &self.metrics {
            validate_name(name, "metric")?;
            if let Some(v) = value
                && !v.is_finite()
            {
                return Err(ValidationError::NonFiniteMetric { name: name.clone() });
            }
        }
        if self.tags.len() > limits.max_tags {
            return Err(ValidationError::TooManyTags { count: self.tags.len(), max: limits.max_tags });
        }
        for (name, value) in &self.tags {
            validate_name(name, "tag")?;
            if value.len() > limits.max_tag_value_len {
                return Err(ValidationError::TagValueTooLong {
                    name: name.clone(),
                    len: value.len(),
                    max: limits.max_tag_value_len,
                });
            }
        }
        Ok(())
    }
}

/// Size limits on a reading's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadingLimits {
    pub max_metrics: usize,
    pub max_tags: usize,
    pub max_tag_value_len: usize,
}

impl Default for ReadingLimits {
    fn default() -> Self {
        Self { max_metrics: 32, max_tags: 16, max_tag_value_len: 128 }
    }
}

/// Longest device id, metric name or tag name.
pub const MAX_NAME_LEN: usize = 64;

/// Device ids are 1..=64 characters of `[A-Za-z0-9_.-]`: safe in MQTT topics,
/// URLs, file names and SQL without quoting surprises.
pub fn validate_device_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_NAME_LEN || !id.bytes().all(is_name_byte) {
        return Err(ValidationError::BadDeviceId { id: truncate(id) });
    }
    Ok(())
}

fn validate_name(name: &str, what: &'static str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.bytes().all(is_name_byte) {
        return Err(ValidationError::BadName { what, name: truncate(name) });
    }
    Ok(())
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// Shortens untrusted text before it goes into an error message or a log line.
fn truncate(s: &str) -> String {
    s.chars().take(MAX_NAME_LEN + 8).collect()
}

/// Why a reading was refused. Every variant is a reason label on a counter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    #[error("device id {id:?} must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadDeviceId { id: String },
    #[error("{what} name {name:?} must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadName { what: &'static str, name: String },
    #[error("device timestamp {ts_ms} ms is outside 2000-01-01..2100-01-01")]
    TimestampOutOfRange { ts_ms: i64 },
    #[error("reading carries no metrics")]
    NoMetrics,
    #[error("reading carries {count} metrics, more than the limit of {max}")]
    TooManyMetrics { count: usize, max: usize },
    #[error("metric {name:?} is not a finite number")]
    NonFiniteMetric { name: String },
    #[error("reading carries {count} tags, more than the limit of {max}")]
    TooManyTags { count: usize, max: usize },
    #[error("tag {name:?} value is {len} bytes, more than the limit of {max}")]
    TagValueTooLong { name: String, len: usize, max: usize },
}

impl ValidationError {
    /// A short, stable label for metrics (`reason="bad_device_id"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadDeviceId { .. } => "bad_device_id",
            Self::BadName { .. } => "bad_name",
            Self::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            Self::NoMetrics => "no_metrics",
            Self::TooManyMetrics { .. } => "too_many_metrics",
            Self::NonFiniteMetric { .. } => "non_finite_metric",
            Self::TooManyTags { .. } => "too_many_tags",
            Self::TagValueTooLong { .. } => "tag_value_too_long",
        }
    }
}

/// A value as its sensor measured it. A reading sent as a 32-bit float
/// arrives widened to 64 bits with noise in its last digits (`21.37f32` is
/// 21.3700008392334 as `f64`); a value that is exactly a 32-bit float is
/// given as the shortest decimal of that float (21.37), which reads back to
/// the same float. Any other value is unchanged. What the API and alert
/// messages present; stored views keep the exact value.
pub fn as_measured(v: f64) -> f64 {
    let narrow = v as f32;
    if !v.is_finite() || f64::from(narrow) != v {
        return v;
    }
    narrow.to_string().parse().unwrap_or(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn values_are_presented_at_the_precision_they_were_measured() {
        assert_eq!(f64::from(18.39f32).to_string(), "18.389999389648438");
        assert_eq!(as_measured(f64::from(18.39f32)), 18.39);
        assert_eq!(as_measured(f64::from(37.06f32)).to_string(), "37.06");
        assert_eq!(as_measured(f64::from(-0.1f32)), -0.1);
        // Already short, or not a 32-bit float at all: unchanged.
        for v in [18.39, 0.5, 3.0, 1e300, 0.1 + 0.2, f64::NAN.abs().min(1.0)] {
            assert_eq!(as_measured(v).to_bits(), v.to_bits(), "{v}");
        }
        assert!(as_measured(f64::NAN).is_nan());
        // The presented value reads back to the very float the sensor sent.
        for f in [21.37f32, 1013.2, 0.001, 99.99, 1.0e-7, 16_777_217.0] {
            assert_eq!(as_measured(f64::from(f)) as f32, f, "{f}");
        }
    }

    pub(crate) fn sample() -> Reading {
        Reading {
            device: "dev-1".into(),
            boot: 1,
            seq: 1,
            ts_ms: 1_767_225_600_000,
            schema: CURRENT_SCHEMA,
            metrics: [("temperature".to_string(), Some(21.5))].into(),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn a_plain_reading_is_valid() {
        assert_eq!(sample().validate(&ReadingLimits::default()), Ok(()));
    }

    #[test]
    fn device_ids_with_topic_wildcards_are_refused() {
        for bad in ["", "a/b", "a+b", "#", &"x".repeat(65)] {
            let r = Reading { device: bad.to_string(), ..sample() };
            assert!(matches!(r.validate(&ReadingLimits::default()), Err(ValidationError::BadDeviceId { .. })), "{bad}");
        }
    }

    #[test]
    fn timestamps_from_1970_and_2100_are_refused() {
        for ts in [0, MAX_TIMESTAMP_MS] {
            let r = Reading { ts_ms: ts, ..sample() };
            assert_eq!(r.validate(&ReadingLimits::default()).map_err(|e| e.reason()), Err("timestamp_out_of_range"));
        }
    }

    #[test]
    fn infinite_metric_values_are_refused_but_null_is_kept() {
        let mut r = sample();
        r.metrics.insert("humidity".into(), None);
        assert_eq!(r.validate(&ReadingLimits::default()), Ok(()));
        r.metrics.insert("pressure".into(), Some(f64::INFINITY));
        assert_eq!(r.validate(&ReadingLimits::default()).map_err(|e| e.reason()), Err("non_finite_metric"));
    }

    #[test]
    fn a_reading_without_metrics_is_refused() {
        let r = Reading { metrics: BTreeMap::new(), ..sample() };
        assert_eq!(r.validate(&ReadingLimits::default()), Err(ValidationError::NoMetrics));
    }
}
