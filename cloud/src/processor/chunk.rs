//! A poll's records through the operators, a cache-sized chunk at a time:
//! decode them all, drop the readings seen before, then hand the rest to
//! every operator in log order (consecutive readings together, so that an
//! operator can look up all their keys first; see
//! [`crate::views::operator::ViewOperator::process_batch`]).

use std::time::Instant;

use kappa_common::Reading;
use kappa_common::record::{self, LogEvent, LogRecord};

use super::{GatewayClock, Processor};
use crate::eventlog::{ConsumedRecord, LogSource, Partition};
use crate::views::operator::Event;

/// Records decoded and handed to the operators together: small enough for
/// the chunk's decoded readings to stay in the CPU's cache between passes.
pub(super) const CHUNK: usize = 256;

/// A record to decode into (its buffers are reused).
fn blank_record() -> LogRecord {
    LogRecord { gateway: String::new(), batch_id: 0, ingest_ms: 0, event: LogEvent::Reading(Reading::default()) }
}

impl<S: LogSource> Processor<S> {
    /// Decodes a chunk of records, drops readings seen before (counted),
    /// then hands the rest to the operators in log order: consecutive
    /// readings together, each gateway marker and aggregate between them.
    pub(super) fn process_chunk(&mut self, chunk: &[ConsumedRecord], decoded: &mut Vec<LogRecord>, now: Instant) {
        if decoded.len() < chunk.len() {
            decoded.resize_with(chunk.len(), blank_record);
        }
        // Decoded into the records kept from the last chunk, reusing their buffers.
        let mut usable: Vec<bool> = Vec::with_capacity(chunk.len());
        for (rec, into) in chunk.iter().zip(decoded.iter_mut()) {
            self.positions.insert(rec.partition, rec.offset + 1);
            let ok = record::decode_into(&rec.value, into);
            match &ok {
                // Every record that decodes counts for the lag, repeated readings too.
                Ok(()) => self.newest_ingest_ms = self.newest_ingest_ms.max(into.ingest_ms),
                Err(e) => {
                    self.metrics.records_undecodable.inc();
                    tracing::error!(partition = rec.partition, offset = rec.offset, error = %e, "Skipping an undecodable log record.");
                }
            }
            usable.push(ok.is_ok());
        }
        // One pass of dedup lookups alone: the CPU overlaps their cache misses.
        for (ok, r) in usable.iter_mut().zip(decoded.iter()) {
            if *ok
                && let LogEvent::Reading(reading) = &r.event
                && !self.dedup.first_sighting(reading)
            {
                self.metrics.readings_duplicate.inc();
                *ok = false;
            }
        }
        let mut run: Vec<Event<'_>> = Vec::with_capacity(chunk.len());
        let mut readings = 0;
        for ((rec, r), _) in chunk.iter().zip(decoded.iter()).zip(&usable).filter(|(_, ok)| **ok) {
            let LogEvent::Reading(reading) = &r.event else {
                // The readings before it reach the operators first.
                self.hand_over(&mut run);
                self.on_marker(rec.partition, r);
                continue;
            };
            let nulls = reading.metrics.values().filter(|v| v.is_none()).count();
            self.metrics.null_metric_values.inc_by(nulls as u64);
            run.push(Event {
                partition: rec.partition,
                offset: rec.offset,
                gateway: &r.gateway,
                ingest_ms: r.ingest_ms,
                reading,
                watermark: self.marks.partition(rec.partition),
            });
            self.marks.observe(rec.partition, reading.ts_ms, now);
            self.event_ts.push(reading.ts_ms);
            readings += 1;
        }
        self.hand_over(&mut run);
        if readings > 0 {
            let (metrics, pipeline) = (&self.metrics, &self.pipeline);
            self.processed
                .get_or_insert_with(|| {
                    metrics.readings_processed.get_or_create(&[("pipeline", pipeline.clone())]).clone()
                })
                .inc_by(readings);
        }
    }

    /// Gives every operator the readings of `run`, and empties it.
    fn hand_over(&mut self, run: &mut Vec<Event<'_>>) {
        if !run.is_empty() {
            for op in &mut self.ops {
                op.process_batch(run, &mut self.late);
            }
            run.clear();
        }
    }

    /// A record that is not a reading: a gateway's heartbeat or progress
    /// marker, or an aggregate the edge computed.
    fn on_marker(&mut self, partition: Partition, r: &LogRecord) {
        let clock = match &r.event {
            LogEvent::Reading(_) => return,
            LogEvent::Heartbeat { ts_ms } => GatewayClock::Heartbeat(*ts_ms),
            LogEvent::Progress { ts_ms } => GatewayClock::NewestReading(*ts_ms),
            LogEvent::Aggregate(a) => {
                for op in &mut self.ops {
                    op.on_aggregate(&r.gateway, r.batch_id, a);
                }
                self.metrics.aggregates_processed.inc();
                return;
            }
        };
        for op in &mut self.ops {
            op.on_gateway_clock(partition, &r.gateway, clock, r.ingest_ms);
        }
    }
}
