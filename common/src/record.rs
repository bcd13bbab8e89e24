//! What the cloud appends to its event log, and how it is encoded.
//!
//! A log record is packed CBOR of [`LogRecord`]. The record carries where it
//! came from (gateway and batch) and when it was ingested; views are computed
//! from the event alone, so replaying the log gives the same views whatever
//! the ingest times were.

mod in_place;

use serde::{Deserialize, Serialize};

pub use self::in_place::decode_into;
use crate::aggregate::Aggregate;
use crate::reading::Reading;

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The gateway that forwarded the event.
    pub gateway: String,
    /// The gateway's batch the event arrived in.
    pub batch_id: u64,
    /// Cloud clock when the batch was appended, Unix milliseconds.
    pub ingest_ms: i64,
    /// The event itself.
    pub event: LogEvent,
}

/// The kinds of event the log holds. Exhaustive on purpose: a new kind must
/// be handled by every consumer before it compiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LogEvent {
    Reading(Reading),
    /// A gateway reporting in with nothing left to forward: it is online and
    /// has forwarded every reading it received with event time up to `ts_ms`.
    /// Ingest writes one copy to every partition, so each partition carries
    /// every gateway's progress in log order (silence alerts rely on that).
    Heartbeat {
        ts_ms: i64,
    },
    /// A gateway's progress, written by ingest into the partitions a batch
    /// did not touch (at most once per `ingest.progress_interval` per
    /// gateway): the newest event time among the readings the gateway has
    /// forwarded so far. Readings may still arrive a little out of order
    /// behind it, as behind any reading.
    Progress {
        ts_ms: i64,
    },
    /// A window pre-aggregated at the edge (a mergeable partial). Views are
    /// computed from readings; aggregates have their own store and query.
    Aggregate(Aggregate),
}

impl LogRecord {
    /// The partitioning key: the device id (the gateway id for heartbeats).
    pub fn key(&self) -> &str {
        match &self.event {
            LogEvent::Reading(r) => &r.device,
            LogEvent::Aggregate(a) => &a.device,
            LogEvent::Heartbeat { .. } | LogEvent::Progress { .. } => &self.gateway,
        }
    }

    /// The event time (an aggregate's window start).
    pub fn ts_ms(&self) -> i64 {
        match &self.event {
            LogEvent::Reading(r) => r.ts_ms,
            LogEvent::Aggregate(a) => a.start_ms,
            LogEvent::Heartbeat { ts_ms } | LogEvent::Progress { ts_ms } => *ts_ms,
        }
    }

    /// The reading, if the record holds one.
    pub fn reading(&self) -> Option<&Reading> {
        match &self.event {
            LogEvent::Reading(r) => Some(r),
            LogEvent::Heartbeat { .. } | LogEvent::Progress { .. } | LogEvent::Aggregate(_) => None,
        }
    }

    /// The reading, if the record holds one.
    pub fn into_reading(self) -> Option<Reading> {
        match self.event {
            LogEvent::Reading(r) => Some(r),
            LogEvent::Heartbeat { .. } | LogEvent::Progress { .. } | LogEvent::Aggregate(_) => None,
        }
    }
}

/// Encodes a record for the log.
pub fn encode(record: &LogRecord) -> Vec<u8> {
    serde_cbor::ser::to_vec_packed(record).unwrap_or_default()
}

/// Decodes a record read back from the log.
pub fn decode(bytes: &[u8]) -> Result<LogRecord, RecordError> {
    serde_cbor::from_slice(bytes).map_err(|e| RecordError(e.to_string()))
}

/// A log record that does not decode: the log is damaged or was written by an
/// incompatible version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable log record: {0}")]
pub struct RecordError(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::tests::sample;

    #[test]
    fn a_record_round_trips() {
        let rec = LogRecord { gateway: "gw".into(), batch_id: 3, ingest_ms: 5, event: LogEvent::Reading(sample()) };
        assert_eq!(decode(&encode(&rec)), Ok(rec.clone()));
        assert_eq!(rec.key(), "dev-1");
    }
}
