//! The edge batch: what a gateway POSTs to the cloud.
//!
//! A batch is CBOR (structs packed with integer field keys), then one zstd
//! frame. `(gateway, batch_id)` is the idempotency key: an agent that resends a
//! batch after a lost response resends the same id with the same readings.
//!
//! Format versions: the `format` field names the layout; a receiver refuses a
//! layout it does not know with [`BatchError::UnknownFormat`]. Format 1 is
//! packed CBOR, one record per reading; format 2 ([`columnar`]) is
//! columns per device, several times smaller on the wire. Both are one zstd
//! frame, and a receiver tells them apart by their first bytes.

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::frame::{self, FrameError, FrameLimits};
use crate::reading::{Reading, validate_device_id};

/// The record-per-reading CBOR layout.
pub const BATCH_FORMAT: u16 = 1;
pub mod columnar;

pub use self::columnar::COLUMNAR_FORMAT;

/// A batch of readings from one gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeBatch {
    /// Layout version ([`BATCH_FORMAT`] or [`COLUMNAR_FORMAT`]).
    pub format: u16,
    /// The sending gateway's id (same character rules as device ids).
    pub gateway: String,
    /// The gateway's own monotonic batch sequence: the idempotency key.
    pub batch_id: u64,
    /// The readings, in the gateway's log order.
    pub readings: Vec<Reading>,
    /// Pre-aggregated windows (partials; see [`crate::aggregate`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregates: Vec<Aggregate>,
}

/// Limits on one received batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub frame: FrameLimits,
    pub max_readings: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { frame: FrameLimits::default(), max_readings: 100_000 }
    }
}

impl EdgeBatch {
    /// A batch in the CBOR layout (format 1).
    pub fn new(gateway: impl Into<String>, batch_id: u64, readings: Vec<Reading>) -> Self {
        Self { format: BATCH_FORMAT, gateway: gateway.into(), batch_id, readings, aggregates: Vec::new() }
    }

    /// The same batch carrying `aggregates` too.
    pub fn with_aggregates(self, aggregates: Vec<Aggregate>) -> Self {
        Self { aggregates, ..self }
    }

    /// The same batch in another layout.
    pub fn with_format(self, format: u16) -> Self {
        Self { format, ..self }
    }
}

/// CBOR-encodes a batch without compression (what [`encode`] compresses).
pub fn to_cbor(batch: &EdgeBatch) -> Vec<u8> {
    // Plain data into a Vec: serialization cannot fail.
    serde_cbor::ser::to_vec_packed(batch).unwrap_or_default()
}

/// Encodes a batch for the wire in its `format` (columnar for
/// [`COLUMNAR_FORMAT`], packed CBOR otherwise), in one zstd frame at `level`.
pub fn encode(batch: &EdgeBatch, level: i32) -> Vec<u8> {
    let raw = if batch.format == COLUMNAR_FORMAT { columnar::encode(batch) } else { to_cbor(batch) };
    frame::compress(&raw, level)
}

/// Decodes a batch received from the wire, refusing anything past `limits`.
///
/// Readings are *not* validated here: the receiver validates each one and
/// decides per reading, so one bad reading does not sink its neighbours.
pub fn decode(body: &[u8], limits: &BatchLimits) -> Result<EdgeBatch, BatchError> {
    let raw = frame::decompress(body, &limits.frame)?;
    let batch = if raw.starts_with(columnar::MAGIC) {
        columnar::decode(&raw, limits.max_readings)?
    } else {
        let batch: EdgeBatch = serde_cbor::from_slice(&raw).map_err(|e| BatchError::Cbor(e.to_string()))?;
        if batch.format != BATCH_FORMAT {
            return Err(BatchError::UnknownFormat { format: batch.format });
        }
        batch
    };
    if validate_device_id(&batch.gateway).is_err() {
        return Err(BatchError::BadGateway);
    }
    let count = batch.readings.len() + batch.aggregates.len();
    if count > limits.max_readings {
        return Err(BatchError::TooManyReadings { count, max: limits.max_readings });
    }
    Ok(batch)
}

/// Why a whole batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed batch CBOR: {0}")]
    Cbor(String),
    #[error("unknown batch format {format} (supported: {BATCH_FORMAT}, {COLUMNAR_FORMAT})")]
    UnknownFormat { format: u16 },
    #[error("gateway id must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadGateway,
    #[error("batch carries {count} readings and aggregates, more than the limit of {max}")]
    TooManyReadings { count: usize, max: usize },
}

impl BatchError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Frame(e) => e.reason(),
            Self::Cbor(_) => "malformed_batch",
            Self::UnknownFormat { .. } => "unknown_batch_format",
            Self::BadGateway => "bad_gateway_id",
            Self::TooManyReadings { .. } => "too_many_readings",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::tests::sample;

    #[test]
    fn a_batch_survives_the_wire() {
        let batch = EdgeBatch::new("gw-1", 7, vec![sample(), sample()]);
        assert_eq!(decode(&encode(&batch, 3), &BatchLimits::default()), Ok(batch));
    }

    #[test]
    fn both_layouts_survive_the_wire() {
        let batch = EdgeBatch::new("gw-1", 7, vec![sample(), sample()]).with_format(COLUMNAR_FORMAT);
        assert_eq!(decode(&encode(&batch, 3), &BatchLimits::default()), Ok(batch));
    }

    #[test]
    fn a_columnar_batch_is_capped_like_a_cbor_one() {
        let batch = EdgeBatch::new("gw-1", 1, vec![sample(); 3]).with_format(COLUMNAR_FORMAT);
        let limits = BatchLimits { max_readings: 2, ..BatchLimits::default() };
        assert_eq!(decode(&encode(&batch, 1), &limits).unwrap_err().reason(), "too_many_readings");
    }

    #[test]
    fn aggregates_travel_in_both_layouts() {
        let aggs = crate::aggregate::aggregate(&[sample(), sample()], 60_000);
        for format in [BATCH_FORMAT, COLUMNAR_FORMAT] {
            let batch = EdgeBatch::new("gw-1", 7, vec![sample()]).with_format(format).with_aggregates(aggs.clone());
            assert_eq!(decode(&encode(&batch, 3), &BatchLimits::default()), Ok(batch));
            let only = EdgeBatch::new("gw-1", 8, vec![]).with_format(format).with_aggregates(aggs.clone());
            assert_eq!(decode(&encode(&only, 3), &BatchLimits::default()), Ok(only));
        }
    }

    #[test]
    fn an_unknown_format_is_refused_by_number() {
        let mut batch = EdgeBatch::new("gw-1", 1, vec![]);
        batch.format = 99;
        assert_eq!(decode(&encode(&batch, 3), &BatchLimits::default()), Err(BatchError::UnknownFormat { format: 99 }));
    }

    #[test]
    fn compressed_garbage_cbor_is_malformed() {
        let body = frame::compress(b"\xff\xff\xff not cbor", 1);
        assert_eq!(decode(&body, &BatchLimits::default()).unwrap_err().reason(), "malformed_batch");
    }

    #[test]
    fn reading_count_is_capped() {
        let batch = EdgeBatch::new("gw-1", 1, vec![sample(); 3]);
        let limits = BatchLimits { max_readings: 2, ..BatchLimits::default() };
        assert_eq!(decode(&encode(&batch, 1), &limits).unwrap_err().reason(), "too_many_readings");
    }
}
