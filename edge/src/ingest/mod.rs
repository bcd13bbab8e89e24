//! From device message to durable log entry.
//!
//! Sources (the embedded broker or an external one) decode each message into
//! an [`Incoming`] and hand it to the [`writer`], which group-commits and then
//! releases the acknowledgements.

pub mod writer;

use bytes::Bytes;
use kappa_common::device;

use crate::log::{Entry, Rejected};
use crate::metrics::EdgeMetrics;

/// What must happen once a message's entry is committed.
#[derive(Debug, Clone)]
pub enum Ack {
    /// Nothing: the embedded broker acknowledged on receipt.
    None,
    /// Send the QoS 1 PUBACK for this message to the external broker.
    Mqtt(rumqttc::Publish),
}

/// A decoded device message on its way to the log.
#[derive(Debug)]
pub struct Incoming {
    pub entry: Entry,
    pub ack: Ack,
}

/// Turns a telemetry message into a log entry: a reading, or a rejection with its reason.
pub fn decode_message(
    topic: &str,
    payload: Bytes,
    prefix: &str,
    limits: &device::Limits,
    metrics: &EdgeMetrics,
) -> Entry {
    metrics.messages_received.inc();
    let result = match device::device_from_topic(topic, prefix) {
        Some(id) => device::decode(id, &payload, limits).map_err(|e| (e.reason(), e.to_string())),
        None => Err(("bad_topic", format!("topic {topic:?} is not {prefix}devices/{{id}}/telemetry"))),
    };
    match result {
        Ok(reading) => Entry::Reading(reading),
        Err((reason, detail)) => {
            metrics.rejected(reason);
            tracing::warn!(topic, reason, detail = %detail, "Rejected a device payload; quarantined it.");
            Entry::Rejected(Rejected { topic: topic.to_string(), reason, detail, payload })
        }
    }
}
