//! The stream processor: log records in, view rows out, exactly once.
//!
//! The processor runs on its own thread. Each step polls records from the
//! assigned partitions (in offset order per partition), decodes them, tracks
//! event time and the watermark, and applies each reading to every view.
//! Every `checkpoint_interval` (and on shutdown) it writes the changed rows
//! and the next offset of every partition in one store transaction. After a
//! crash it resumes from the stored positions and reloads rows on first
//! touch, so every record is reflected in the views exactly once.

pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_common::record::{self, LogEvent};
use tokio_util::sync::CancellationToken;

use self::window::{RowWrite, WindowView};
use crate::eventlog::{EventLogError, LogSource, Offset, Partition};
use crate::metrics::CloudMetrics;
use crate::store::{StoreError, ViewStore};

/// The per-device window view.
pub const DEVICE_WINDOWS: &str = "device_windows";
/// Per-device running totals (one row per device).
pub const DEVICE_TOTALS: &str = "device_totals";

/// Processor settings.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorSettings {
    pub window_ms: i64,
    pub checkpoint_interval: Duration,
    pub max_out_of_orderness_ms: i64,
    pub poll_records: usize,
}

/// Per-partition event-time watermarks: max event time seen minus the out-of-orderness bound.
#[derive(Debug, Clone, Default)]
pub struct Watermarks {
    bound_ms: i64,
    max_ts: BTreeMap<Partition, i64>,
}

impl Watermarks {
    pub fn new(bound_ms: i64) -> Self {
        Self { bound_ms, max_ts: BTreeMap::new() }
    }

    pub fn observe(&mut self, partition: Partition, ts_ms: i64) {
        let e = self.max_ts.entry(partition).or_insert(ts_ms);
        *e = (*e).max(ts_ms);
    }

    /// The minimum over partitions that have seen data.
    pub fn current(&self) -> Option<i64> {
        self.max_ts.values().min().map(|m| m - self.bound_ms)
    }
}

/// The processor.
#[derive(Debug)]
pub struct Processor<S: LogSource> {
    source: S,
    store: ViewStore,
    views: Vec<WindowView>,
    positions: BTreeMap<Partition, Offset>,
    watermarks: Watermarks,
    settings: ProcessorSettings,
    metrics: Arc<CloudMetrics>,
    since_checkpoint: usize,
    last_checkpoint: Instant,
    last_lag: Instant,
}

impl<S: LogSource> Processor<S> {
    /// Restores the last checkpoint's positions and positions the source there.
    pub fn new(
        mut source: S,
        store: ViewStore,
        settings: ProcessorSettings,
        metrics: Arc<CloudMetrics>,
    ) -> Result<Self, ProcessorError> {
        let stored = store.positions()?;
        let mut positions = BTreeMap::new();
        for p in source.assigned() {
            let offset = stored.get(&p).copied().unwrap_or(0);
            source.seek(p, offset);
            positions.insert(p, offset);
        }
        tracing::info!(?positions, "Processor restored its checkpoint.");
        Ok(Self {
            source,
            store,
            views: vec![WindowView::tumbling(DEVICE_WINDOWS, settings.window_ms), WindowView::global(DEVICE_TOTALS)],
            positions,
            watermarks: Watermarks::new(settings.max_out_of_orderness_ms),
            settings,
            metrics,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_lag: Instant::now() - Duration::from_secs(60),
        })
    }

    /// Runs until `cancel` fires, then checkpoints.
    pub fn run(mut self, cancel: CancellationToken) -> Result<(), ProcessorError> {
        while !cancel.is_cancelled() {
            self.step(Duration::from_millis(100))?;
        }
        self.checkpoint()
    }

    /// One poll and apply; checkpoints when the interval has passed. Returns records handled.
    pub fn step(&mut self, wait: Duration) -> Result<usize, ProcessorError> {
        let records = self.source.poll(self.settings.poll_records, wait)?;
        let n = records.len();
        for rec in records {
            match record::decode(&rec.value) {
                Ok(r) => match r.event {
                    LogEvent::Reading(reading) => {
                        self.watermarks.observe(rec.partition, reading.ts_ms);
                        let nulls = reading.metrics.values().filter(|v| v.is_none()).count();
                        self.metrics.null_metric_values.inc_by(nulls as u64);
                        let store = &self.store;
                        for view in &mut self.views {
                            view.apply(&reading, |name, key| store.load_row(name, key))?;
                        }
                        self.metrics.readings_processed.inc();
                    }
                },
                Err(e) => {
                    self.metrics.records_undecodable.inc();
                    tracing::error!(partition = rec.partition, offset = rec.offset, error = %e, "Skipping an undecodable log record.");
                }
            }
            self.positions.insert(rec.partition, rec.offset + 1);
        }
        self.since_checkpoint += n;
        if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval {
            self.checkpoint()?;
        }
        if self.last_lag.elapsed() >= Duration::from_secs(2) {
            self.report_lag()?;
        }
        Ok(n)
    }

    /// Writes changed rows and positions atomically, then forgets closed windows.
    pub fn checkpoint(&mut self) -> Result<(), ProcessorError> {
        let started = Instant::now();
        let mut rows: Vec<RowWrite> = Vec::new();
        for view in &mut self.views {
            view.take_dirty(&mut rows);
        }
        let watermark = self.watermarks.current();
        self.store.checkpoint(&rows, &self.positions, watermark)?;
        if let Some(w) = watermark {
            for view in &mut self.views {
                view.evict_closed(w);
            }
            self.metrics.watermark_ms.set(w);
        }
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.checkpoint_rows.observe(rows.len() as f64);
        self.metrics.state_rows.set(self.views.iter().map(|v| v.len() as i64).sum());
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn report_lag(&mut self) -> Result<(), ProcessorError> {
        for (p, end) in self.source.end_offsets()? {
            let done = self.positions.get(&p).copied().unwrap_or(0);
            self.metrics.lag_records.get_or_create(&[("partition", p)]).set(end.saturating_sub(done) as i64);
        }
        self.last_lag = Instant::now();
        Ok(())
    }

    /// Positions processed so far (not necessarily checkpointed).
    pub fn positions(&self) -> &BTreeMap<Partition, Offset> {
        &self.positions
    }
}

/// Why the processor stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    #[error(transparent)]
    Log(#[from] EventLogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_is_the_slowest_partition_minus_the_bound() {
        let mut w = Watermarks::new(10);
        assert_eq!(w.current(), None);
        w.observe(0, 100);
        w.observe(1, 50);
        w.observe(0, 90);
        assert_eq!(w.current(), Some(40));
    }
}
