//! What devices publish on `devices/{device_id}/telemetry`.
//!
//! The payload is a CBOR map or a JSON object (told apart by the first byte):
//!
//! ```text
//! { "v": 2, "boot": 3, "seq": 42, "ts": 1767225600000,
//!   "data": { "temperature": 21.5, "humidity": 40.2 },
//!   "tags": { "user": "u-17", "type": "telemetry" } }      // tags optional
//! ```
//!
//! The device id comes from the topic, not the payload, so a device cannot
//! claim another's identity by what it writes.
//!
//! Schema versions: `v: 1` firmware names its metrics `temp`, `hum`, `pres`
//! and `batt`; version 2 spells them out. Decoding upgrades every supported
//! version to the current model; any other version is refused with
//! [`DecodeError::UnknownSchema`], never guessed at.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::reading::{CURRENT_SCHEMA, Reading, ReadingLimits, ValidationError};

/// Schema versions this decoder accepts.
pub const SUPPORTED_SCHEMAS: [u16; 2] = [1, CURRENT_SCHEMA];

/// Metric renames from schema version 1 to the current model.
const V1_RENAMES: [(&str, &str); 4] =
    [("temp", "temperature"), ("hum", "humidity"), ("pres", "pressure"), ("batt", "battery")];

/// Limits applied to one device payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub reading: ReadingLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_payload_bytes: 4096, reading: ReadingLimits::default() }
    }
}

/// The encoding of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Cbor,
    Json,
}

impl Format {
    /// JSON objects start with `{` (after optional whitespace); everything else is tried as CBOR.
    pub fn sniff(bytes: &[u8]) -> Format {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::Json,
            _ => Format::Cbor,
        }
    }
}

/// The payload as it appears on the wire, every version. Fields are optional
/// here so that an unknown version is reported as such, not as a missing field.
#[derive(Deserialize)]
struct WirePayload {
    v: Option<u16>,
    boot: Option<u32>,
    seq: Option<u64>,
    ts: Option<i64>,
    data: Option<BTreeMap<String, Option<f64>>>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

/// The current version's payload, for encoders.
#[derive(Serialize)]
struct WirePayloadOut<'a> {
    v: u16,
    boot: u32,
    seq: u64,
    ts: i64,
    data: &'a BTreeMap<String, Option<f64>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: &'a BTreeMap<String, String>,
}

/// Decodes and validates one device payload published by `device`.
pub fn decode(device: &str, bytes: &[u8], limits: &Limits) -> Result<Reading, DecodeError> {
    if bytes.len() > limits.max_payload_bytes {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: limits.max_payload_bytes });
    }
    let wire: WirePayload = match Format::sniff(bytes) {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?,
        Format::Cbor => serde_cbor::from_slice(bytes).map_err(|e| DecodeError::Cbor(e.to_string()))?,
    };
    let version = wire.v.ok_or(DecodeError::MissingField("v"))?;
    if !SUPPORTED_SCHEMAS.contains(&version) {
        return Err(DecodeError::UnknownSchema { version });
    }
    let mut metrics = wire.data.ok_or(DecodeError::MissingField("data"))?;
    if version == 1 {
        for (old, new) in V1_RENAMES {
            if let Some(value) = metrics.remove(old) {
                metrics.insert(new.to_string(), value);
            }
        }
    }
    let reading = Reading {
        device: device.to_string(),
        boot: wire.boot.ok_or(DecodeError::MissingField("boot"))?,
        seq: wire.seq.ok_or(DecodeError::MissingField("seq"))?,
        ts_ms: wire.ts.ok_or(DecodeError::MissingField("ts"))?,
        schema: version,
        metrics,
        tags: wire.tags,
    };
    reading.validate(&limits.reading)?;
    Ok(reading)
}

/// Encodes a reading as a current-version CBOR device payload.
pub fn encode_cbor(reading: &Reading) -> Vec<u8> {
    // Serializing plain maps, strings and numbers into a Vec cannot fail.
    serde_cbor::to_vec(&out(reading)).unwrap_or_default()
}

/// Encodes a reading as a current-version JSON device payload.
pub fn encode_json(reading: &Reading) -> Vec<u8> {
    serde_json::to_vec(&out(reading)).unwrap_or_default()
}

fn out(reading: &Reading) -> WirePayloadOut<'_> {
    WirePayloadOut {
        v: CURRENT_SCHEMA,
        boot: reading.boot,
        seq: reading.seq,
        ts: reading.ts_ms,
        data: &reading.metrics,
        tags: &reading.tags,
    }
}

/// The device id in a telemetry topic `{prefix}devices/{id}/telemetry`, if the topic is one.
pub fn device_from_topic<'t>(topic: &'t str, prefix: &str) -> Option<&'t str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("devices/")?;
    let id = rest.strip_suffix("/telemetry")?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Why a device payload was refused. [`DecodeError::reason`] labels the counter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed CBOR payload: {0}")]
    Cbor(String),
    #[error("malformed JSON payload: {0}")]
    Json(String),
    #[error("payload lacks the required field {0:?}")]
    MissingField(&'static str),
    #[error("unknown schema version {version} (supported: 1, 2)")]
    UnknownSchema { version: u16 },
    #[error("invalid reading: {0}")]
    Invalid(#[from] ValidationError),
}

impl DecodeError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Cbor(_) => "malformed_cbor",
            Self::Json(_) => "malformed_json",
            Self::MissingField(_) => "missing_field",
            Self::UnknownSchema { .. } => "unknown_schema",
            Self::Invalid(e) => e.reason(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::tests::sample;

    /// Deeply nested payloads (100,000 levels, within the size limit) are
    /// refused with an error and a reason, never a stack overflow: nesting
    /// where a number belongs is a type error at the first level, and nesting
    /// in an unknown field is skipped without recursing (JSON) or stopped by
    /// the parser's recursion limit (CBOR).
    #[test]
    fn deeply_nested_payloads_are_refused_not_recursed_into() {
        let limits = Limits { max_payload_bytes: 1 << 20, ..Limits::default() };
        let depth = 100_000;
        let nest = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let in_data = format!(r#"{{"v":2,"boot":1,"seq":1,"ts":1767225600000,"data":{{"t":{nest}}}}}"#);
        let err = decode("dev-1", in_data.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.reason(), "malformed_json", "{err}");
        let in_unknown = format!(r#"{{"v":2,"boot":1,"seq":1,"ts":1767225600000,"x":{nest},"data":{{}}}}"#);
        assert!(decode("dev-1", in_unknown.as_bytes(), &limits).is_err());
        // CBOR: a map whose unknown key holds 100,000 nested one-element arrays.
        let mut cbor = vec![0xa2, 0x61, b'v', 0x02, 0x61, b'x'];
        cbor.extend(std::iter::repeat_n(0x81, depth));
        cbor.push(0x00);
        let err = decode("dev-1", &cbor, &limits).unwrap_err();
        assert_eq!(err.reason(), "malformed_cbor", "{err}");
    }

    #[test]
    fn cbor_and_json_payloads_decode_to_the_same_reading() {
        let r = sample();
        let limits = Limits::default();
        assert_eq!(decode("dev-1", &encode_cbor(&r), &limits), Ok(r.clone()));
        assert_eq!(decode("dev-1", &encode_json(&r), &limits), Ok(r));
    }

    #[test]
    fn version_1_metric_names_are_upgraded() {
        let json =
            br#"{"v":1,"boot":1,"seq":1,"ts":1767225600000,"data":{"temp":20.0,"hum":41.0,"pres":1000.0,"batt":3.7}}"#;
        let r = decode("d", json, &Limits::default()).unwrap();
        assert_eq!(r.schema, 1);
        let names: Vec<_> = r.metrics.keys().map(String::as_str).collect();
        assert_eq!(names, ["battery", "humidity", "pressure", "temperature"]);
        assert_eq!(r.metric("temperature"), Some(20.0));
    }

    #[test]
    fn unknown_schema_version_is_refused_by_number() {
        let json = br#"{"v":9,"whatever":true}"#;
        assert_eq!(decode("d", json, &Limits::default()), Err(DecodeError::UnknownSchema { version: 9 }));
    }

    #[test]
    fn garbage_is_refused_as_malformed() {
        assert_eq!(decode("d", b"\xff\x00garbage", &Limits::default()).map_err(|e| e.reason()), Err("malformed_cbor"));
        assert_eq!(decode("d", b"{not json", &Limits::default()).map_err(|e| e.reason()), Err("malformed_json"));
    }

    #[test]
    fn oversized_payload_is_refused_before_parsing() {
        let big = vec![b' '; 5000];
        assert_eq!(decode("d", &big, &Limits::default()), Err(DecodeError::TooLarge { len: 5000, max: 4096 }));
    }

    #[test]
    fn missing_fields_are_named() {
        let json = br#"{"v":2,"boot":1,"ts":1767225600000,"data":{"t":1}}"#;
        assert_eq!(decode("d", json, &Limits::default()), Err(DecodeError::MissingField("seq")));
    }

    #[test]
    fn null_metric_values_survive_decoding() {
        let json = br#"{"v":2,"boot":1,"seq":1,"ts":1767225600000,"data":{"temperature":null,"humidity":3}}"#;
        let r = decode("d", json, &Limits::default()).unwrap();
        assert_eq!(r.metrics.get("temperature"), Some(&None));
        assert_eq!(r.metric("humidity"), Some(3.0));
    }

    #[test]
    fn topic_parsing_takes_only_single_level_ids() {
        assert_eq!(device_from_topic("devices/abc/telemetry", ""), Some("abc"));
        assert_eq!(device_from_topic("t1/devices/abc/telemetry", "t1/"), Some("abc"));
        assert_eq!(device_from_topic("devices/a/b/telemetry", ""), None);
        assert_eq!(device_from_topic("devices//telemetry", ""), None);
        assert_eq!(device_from_topic("other/abc/telemetry", ""), None);
    }
}
