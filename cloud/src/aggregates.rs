//! The pipeline that stores edge aggregates: reads the event log like any
//! other pipeline and merges each [`LogEvent::Aggregate`] partial into the
//! `edge_aggregates` table, in the same transaction as its log positions.
//!
//! A partial is identified by its gateway batch and window (ingest merges
//! partials of one window within a batch), so a batch appended twice (the
//! Kafka log does not recognise resent batches) is merged once.
//!
//! [`LogEvent::Aggregate`]: kappa_common::record::LogEvent::Aggregate

use std::collections::HashMap;

use kappa_common::aggregate::Aggregate;

use crate::processor::Operator;
use crate::store::Checkpoint;
use crate::store::aggregates::AggregatePart;
use crate::views::operator::{Event, LateEvent};

/// The pipeline name in the store.
pub const AGGREGATES_PIPELINE: &str = "edge_aggregates";

/// A partial's identity: gateway, batch id, device, metric, window size and start.
type PartKey = (String, u64, String, String, i64, i64);

/// Holds partials between checkpoints (a repeat of one held is dropped here,
/// a repeat of one stored is dropped by the store).
#[derive(Debug, Default)]
pub struct AggregatesOperator {
    pending: HashMap<PartKey, Aggregate>,
}

impl Operator for AggregatesOperator {
    fn id(&self) -> &str {
        AGGREGATES_PIPELINE
    }

    fn process(&mut self, _ev: &Event<'_>, _late: &mut Vec<LateEvent>) {}

    fn on_aggregate(&mut self, gateway: &str, batch_id: u64, a: &Aggregate) {
        let key = (gateway.to_string(), batch_id, a.device.clone(), a.metric.clone(), a.window_ms, a.start_ms);
        self.pending.entry(key).or_insert_with(|| a.clone());
    }

    fn on_checkpoint(&mut self, cp: &mut Checkpoint) {
        cp.aggregates.extend(self.pending.drain().map(|((gateway, batch_id, ..), aggregate)| AggregatePart {
            gateway,
            batch_id,
            aggregate,
        }));
    }

    fn state_len(&self) -> usize {
        self.pending.len()
    }

    fn has_pending_output(&self) -> bool {
        !self.pending.is_empty()
    }
}
