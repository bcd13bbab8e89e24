//! The edge batch: what a gateway POSTs to the cloud.
//!
//! A batch is CBOR (structs packed with integer field keys), then one zstd
//! frame. `(gateway, batch_id)` is the idempotency key: an agent that resends a
//! batch after a lost response resends the same id with the same readings.
//!
//! Format versions: the `format` field names the layout; a receiver refuses a
//! layout it does not know with [`BatchError::UnknownFormat`].

use serde::{Deserialize, Serialize};

use crate::frame::{self, FrameError, FrameLimits};
use crate::reading::{Reading, validate_device_id};

/// The batch layout this crate writes.
pub const BATCH_FORMAT: u16 = 1;

/// A batch of readings from one gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeBatch {
    /// Layout version ([`BATCH_FORMAT`]).
    pub format: u16,
    /// The sending gateway's id (same character rules as device ids).
    pub gateway: String,
    /// The gateway's own monotonic batch sequence: the idempotency key.
    pub batch_id: u64,
    /// The readings, in the gateway's log order.
    pub readings: Vec<Reading>,
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
    /// A batch in the current layout.
    pub fn new(gateway: impl Into<String>, batch_id: u64, readings: Vec<Reading>) -> Self {
        Self { format: BATCH_FORMAT, gateway: gateway.into(), batch_id, readings }
    }
}

/// CBOR-encodes a batch without compression (what [`encode`] compresses).
pub fn to_cbor(batch: &EdgeBatch) -> Vec<u8> {
    // Plain data into a Vec: serialization cannot fail.
    serde_cbor::ser::to_vec_packed(batch).unwrap_or_default()
}

/// Encodes a batch for the wire: packed CBOR in one zstd frame at `level`.
pub fn encode(batch: &EdgeBatch, level: i32) -> Vec<u8> {
    frame::compress(&to_cbor(batch), level)
}

/// Decodes a batch received from the wire, refusing anything past `limits`.
///
/// Readings are *not* validated here: the receiver validates each one and
/// decides per reading, so one bad reading does not sink its neighbours.
pub fn decode(body: &[u8], limits: &BatchLimits) -> Result<EdgeBatch, BatchError> {
    let cbor = frame::decompress(body, &limits.frame)?;
    let batch: EdgeBatch = serde_cbor::from_slice(&cbor).map_err(|e| BatchError::Cbor(e.to_string()))?;
    if batch.format != BATCH_FORMAT {
        return Err(BatchError::UnknownFormat { format: batch.format });
    }
    if validate_device_id(&batch.gateway).is_err() {
        return Err(BatchError::BadGateway);
    }
    if batch.readings.len() > limits.max_readings {
        return Err(BatchError::TooManyReadings { count: batch.readings.len(), max: limits.max_readings });
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
    #[error("unknown batch format {format} (supported: {BATCH_FORMAT})")]
    UnknownFormat { format: u16 },
    #[error("gateway id must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadGateway,
    #[error("batch carries {count} readings, more than the limit of {max}")]
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
