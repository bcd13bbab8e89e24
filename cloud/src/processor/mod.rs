//! The stream processor: log records in, view rows out, exactly once.
//!
//! One thread drives a set of [`Operator`]s (one per view) over the
//! partitions its source is assigned. For each record, in offset order per
//! partition: decode; drop a reading whose `(device, boot, seq)` was seen
//! (counted); hand it to every operator together with its partition's
//! watermark; then advance that partition's watermark. After each poll the
//! global watermark is recomputed and operators close what it has passed.
//!
//! Every `checkpoint_interval`, and on shutdown, one store transaction
//! writes every operator's changed rows and state, the dedup state, the late
//! events, and each partition's next offset and max event time. On start the
//! processor restores all of it and seeks the source there, so a crash at any
//! point replays exactly the records after the checkpoint onto exactly the
//! state that excludes them.

mod chunk;
pub mod committer;
pub mod config;
pub mod dedup;
pub mod watermark;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_common::record::LogRecord;
use tokio_util::sync::CancellationToken;

use self::committer::{Committer, Done, Job};
use self::dedup::{Dedup, SeqSet};
use self::watermark::Watermarks;
use crate::eventlog::{EventLogError, LogSource, Offset, Partition};
use crate::metrics::CloudMetrics;
use crate::store::{Checkpoint, PipelinePlan, ProcessorStore, StoreError, ViewChanges, ViewStore};
use crate::views::operator::{Event, LateEvent, Tally, ViewOperator};
use crate::views::spec::ViewSpec;

/// A streaming operator, driven by the processor. Watermarks and checkpoints
/// reach it in stream order, between records.
pub trait Operator: Send + std::fmt::Debug {
    /// Identifies the operator in the store, the late log and metrics.
    fn id(&self) -> &str;
    /// Restores state from the last checkpoint.
    fn on_start(&mut self, _store: &dyn ProcessorStore) -> Result<(), StoreError> {
        Ok(())
    }
    /// One reading (already deduplicated).
    fn process(&mut self, ev: &Event<'_>, late: &mut Vec<LateEvent>);
    /// Readings in log order, with no other record between them: the same
    /// as [`Operator::process`] for each in turn (operators that can do
    /// better by seeing them together override it).
    fn process_batch(&mut self, evs: &[Event<'_>], late: &mut Vec<LateEvent>) {
        for ev in evs {
            self.process(ev, late);
        }
    }
    /// A gateway's heartbeat or progress marker, as it appears in
    /// `partition`, appended at `ingest_ms` (cloud clock).
    fn on_gateway_clock(&mut self, _partition: Partition, _gateway: &str, _clock: GatewayClock, _ingest_ms: i64) {}
    /// An aggregate partial the edge computed, with the gateway batch it
    /// came in (views ignore them).
    fn on_aggregate(&mut self, _gateway: &str, _batch_id: u64, _aggregate: &kappa_common::aggregate::Aggregate) {}
    /// The global watermark moved to `watermark`.
    fn on_watermark(&mut self, _watermark: i64) {}
    /// `partition`'s own watermark moved to `watermark` (operators that keep
    /// state per partition close by it).
    fn on_partition_watermark(&mut self, _partition: Partition, _watermark: i64) {}
    /// Adds what changed since the last checkpoint.
    fn on_checkpoint(&mut self, _cp: &mut Checkpoint) {}
    /// Counters since the last call.
    fn take_tally(&mut self) -> Tally {
        Tally::default()
    }
    /// Windows held in memory.
    fn state_len(&self) -> usize {
        0
    }
    /// Rows are waiting that readers should see now (windows just closed,
    /// alerts raised): the processor checkpoints without waiting for the interval.
    fn has_pending_output(&self) -> bool {
        false
    }
    /// Updates the operator's own metrics (at each checkpoint).
    fn report(&mut self, _metrics: &CloudMetrics) {}
}

impl Operator for ViewOperator {
    fn id(&self) -> &str {
        ViewOperator::id(self)
    }

    fn on_start(&mut self, store: &dyn ProcessorStore) -> Result<(), StoreError> {
        let (closed, states) = store.view_state(ViewOperator::id(self), None)?;
        self.restore(closed, states).map_err(StoreError)
    }

    fn process(&mut self, ev: &Event<'_>, late: &mut Vec<LateEvent>) {
        ViewOperator::process(self, ev, late);
    }

    fn process_batch(&mut self, evs: &[Event<'_>], late: &mut Vec<LateEvent>) {
        ViewOperator::process_batch(self, evs, late);
    }

    fn on_watermark(&mut self, watermark: i64) {
        ViewOperator::on_watermark(self, watermark);
    }

    fn on_checkpoint(&mut self, cp: &mut Checkpoint) {
        cp.views.push(ViewChanges {
            view: ViewOperator::id(self).to_string(),
            partition: None,
            changes: self.take_changes(),
            closed_through: self.closed_through(),
            merged: false,
        });
    }

    fn take_tally(&mut self) -> Tally {
        std::mem::take(&mut self.tally)
    }

    fn state_len(&self) -> usize {
        ViewOperator::state_len(self)
    }

    fn has_pending_output(&self) -> bool {
        ViewOperator::has_pending_output(self)
    }
}

/// What a record says about a gateway's progress (see [`LogEvent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayClock {
    /// Everything up to here was forwarded.
    Heartbeat(i64),
    /// The newest reading forwarded so far had this event time.
    NewestReading(i64),
}

/// Processor settings.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorSettings {
    pub checkpoint_interval: Duration,
    pub max_out_of_orderness_ms: i64,
    pub poll_records: usize,
    pub idle_timeout: Duration,
    pub dedup_horizon_ms: i64,
    /// TEST ONLY: write view state and log positions in two transactions,
    /// with a pause between, so a crash can separate them. It exists to show
    /// that the crash tests catch a processor without atomic checkpoints.
    pub split_checkpoint_for_tests: bool,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            max_out_of_orderness_ms: 10_000,
            poll_records: 5000,
            idle_timeout: Duration::from_secs(30),
            dedup_horizon_ms: 24 * 3_600_000,
            split_checkpoint_for_tests: false,
        }
    }
}

/// The processor.
#[derive(Debug)]
pub struct Processor<S: LogSource> {
    pipeline: String,
    /// Replaying history; becomes false once caught up with the log's end.
    building: bool,
    caught_up: bool,
    source: S,
    committer: Committer,
    ops: Vec<Box<dyn Operator>>,
    dedup: Dedup,
    marks: Watermarks,
    positions: BTreeMap<Partition, Offset>,
    /// Each partition's watermark as last told to the operators.
    told: BTreeMap<Partition, i64>,
    late: Vec<LateEvent>,
    settings: ProcessorSettings,
    metrics: Arc<CloudMetrics>,
    since_checkpoint: usize,
    last_checkpoint: Instant,
    last_lag: Instant,
    emit_latencies: Vec<Duration>,
    /// Ingest time of the newest record processed (cloud clock), for the lag in seconds.
    newest_ingest_ms: i64,
    /// Event times of the readings processed since the last checkpoint: the
    /// commit that makes them visible measures their freshness.
    event_ts: Vec<i64>,
    spare_ts: Vec<i64>,
    /// This pipeline's `readings_processed`, created at its first reading
    /// (a pipeline of aggregates never has one).
    processed: Option<prometheus_client::metrics::counter::Counter>,
    /// Records being processed, decoded into the buffers of the last chunk's.
    decoded: Vec<LogRecord>,
}

impl<S: LogSource> Processor<S> {
    /// A single pipeline over a store that has no other (tests, benchmarks):
    /// plans the views and runs them all.
    pub fn single(
        source: S,
        mut store: ViewStore,
        specs: Vec<ViewSpec>,
        settings: ProcessorSettings,
        metrics: Arc<CloudMetrics>,
    ) -> Result<Self, ProcessorError> {
        let now_ms = crate::now_ms();
        let mut plans = store.plan_pipelines(&specs, now_ms)?;
        if plans.len() != 1 {
            return Err(ProcessorError::Store(StoreError(format!(
                "expected one pipeline, the store plans {}",
                plans.len()
            ))));
        }
        Self::new(source, store, plans.remove(0), settings, metrics)
    }

    /// Restores the pipeline's last checkpoint and seeks the source there.
    pub fn new<St: ProcessorStore>(
        source: S,
        store: St,
        plan: PipelinePlan,
        settings: ProcessorSettings,
        metrics: Arc<CloudMetrics>,
    ) -> Result<Self, ProcessorError> {
        let PipelinePlan { pipeline, views: specs, building } = plan;
        let ops: Vec<Box<dyn Operator>> =
            specs.into_iter().map(|spec| Box::new(ViewOperator::new(spec)) as Box<dyn Operator>).collect();
        Self::with_operators(source, store, pipeline, ops, building, settings, metrics)
    }

    /// A pipeline of any operators: restores each, and the pipeline's
    /// positions and dedup state, and seeks the source there.
    pub fn with_operators<St: ProcessorStore>(
        mut source: S,
        store: St,
        pipeline: String,
        mut ops: Vec<Box<dyn Operator>>,
        building: bool,
        settings: ProcessorSettings,
        metrics: Arc<CloudMetrics>,
    ) -> Result<Self, ProcessorError> {
        let restored = store.restore(&pipeline)?;
        let now = Instant::now();
        let mut marks = Watermarks::new(settings.max_out_of_orderness_ms, settings.idle_timeout);
        let mut positions = BTreeMap::new();
        for p in source.assigned() {
            let (offset, max_ts) = restored.partitions.get(&p).copied().unwrap_or((0, None));
            source.seek(p, offset);
            positions.insert(p, offset);
            if let Some(ts) = max_ts {
                marks.restore(p, ts, now);
            }
        }
        marks.restore_global(restored.global_watermark);
        let mut dedup = Dedup::new(settings.dedup_horizon_ms);
        for (device, boot, blob) in restored.dedup {
            let set: SeqSet = serde_cbor::from_slice(&blob)
                .map_err(|e| StoreError(format!("dedup state of {device} boot {boot} does not decode: {e}")))?;
            dedup.restore(device, boot, set);
        }
        for op in &mut ops {
            op.on_start(&store)?;
        }
        let committer = Committer::start(store).map_err(|e| StoreError(format!("cannot start the committer: {e}")))?;
        tracing::info!(
            pipeline,
            building,
            positions = %kappa_runtime::logging::pairs(&positions),
            global_watermark = marks.global(),
            views = %kappa_runtime::logging::listed(ops.iter().map(|o| o.id())),
            "Processor restored its checkpoint."
        );
        Ok(Self {
            pipeline,
            building,
            caught_up: false,
            source,
            committer,
            ops,
            dedup,
            marks,
            positions,
            told: BTreeMap::new(),
            late: Vec::new(),
            settings,
            metrics,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_lag: Instant::now() - Duration::from_secs(60),
            emit_latencies: Vec::new(),
            newest_ingest_ms: 0,
            event_ts: Vec::new(),
            spare_ts: Vec::new(),
            processed: None,
            decoded: Vec::new(),
        })
    }

    /// Runs until `cancel` fires, then checkpoints and waits for the commit.
    pub fn run(mut self, cancel: CancellationToken) -> Result<(), ProcessorError> {
        while !cancel.is_cancelled() {
            self.step(Duration::from_millis(100))?;
        }
        self.checkpoint()?;
        self.sync()
    }

    /// Waits until every checkpoint handed to the committer is committed.
    pub fn sync(&mut self) -> Result<(), ProcessorError> {
        if let Some(done) = self.committer.wait()? {
            self.record(done);
        }
        Ok(())
    }

    fn record(&mut self, mut done: Done) {
        self.metrics.checkpoint_commit_seconds.observe(done.commit.as_secs_f64());
        self.metrics.checkpoint_rows.observe(done.rows as f64);
        let visible = self.metrics.event_to_view_seconds.get_or_create(&[("pipeline", self.pipeline.clone())]);
        for ts in done.event_ts.drain(..) {
            visible.observe((done.committed_ms - ts).max(0) as f64 / 1000.0);
        }
        drop(visible);
        // Two buffers take turns: one fills while the other is in flight.
        self.spare_ts = done.event_ts;
        if let Some(latency) = done.emit_latency {
            self.metrics.window_emit_seconds.observe(latency.as_secs_f64());
            self.emit_latencies.push(latency);
        }
    }

    /// One poll; checkpoints when the interval has passed. Returns records handled.
    pub fn step(&mut self, wait: Duration) -> Result<usize, ProcessorError> {
        let records = self.source.poll(self.settings.poll_records, wait)?;
        let n = records.len();
        let now = Instant::now();
        let mut decoded = std::mem::take(&mut self.decoded);
        for chunk in records.chunks(chunk::CHUNK) {
            self.process_chunk(chunk, &mut decoded, now);
        }
        self.decoded = decoded;
        if n > 0 {
            self.tell_partition_watermarks();
        }
        let before = self.marks.global();
        // Alerts raised by these records are committed now, not at the interval.
        let mut closed = n > 0 && self.ops.iter().any(|o| o.has_pending_output());
        let assigned = self.source.assigned();
        let source = &self.source;
        if let Some(g) = self.marks.advance(now, &assigned, |p| source.caught_up(p))
            && before != Some(g)
        {
            for op in &mut self.ops {
                op.on_watermark(g);
            }
            self.dedup.prune(g);
            self.metrics.watermark_seconds.get_or_create(&[("pipeline", self.pipeline.clone())]).set(g as f64 / 1000.0);
            closed = closed || self.ops.iter().any(|o| o.has_pending_output());
        }
        self.since_checkpoint += n;
        if let Some(done) = self.committer.poll()? {
            self.record(done);
        }
        if closed {
            // Windows just closed: their rows are written now, not at the next
            // interval. Latency counts from when this step's records arrived.
            self.checkpoint_job(Some(now))?;
        } else if self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval
            && (self.since_checkpoint > 0 || before != self.marks.global() || self.caught_up)
        {
            self.checkpoint()?;
        }
        if n > 0 {
            self.metrics.batch_seconds.observe(now.elapsed().as_secs_f64());
        }
        if self.last_lag.elapsed() >= Duration::from_secs(2) {
            self.report_lag(now)?;
        }
        Ok(n)
    }

    /// Tells the operators each partition watermark that moved.
    fn tell_partition_watermarks(&mut self) {
        for p in self.positions.keys() {
            let Some(w) = self.marks.partition(*p) else { continue };
            if self.told.get(p).is_some_and(|t| *t >= w) {
                continue;
            }
            self.told.insert(*p, w);
            for op in &mut self.ops {
                op.on_partition_watermark(*p, w);
            }
        }
    }

    /// Hands everything changed since the last checkpoint to the committer,
    /// which writes it in one transaction ([`Processor::sync`] waits for it).
    pub fn checkpoint(&mut self) -> Result<(), ProcessorError> {
        self.checkpoint_job(None)
    }

    fn checkpoint_job(&mut self, emit_since: Option<Instant>) -> Result<(), ProcessorError> {
        // The previous checkpoint must be committed before this one is cut.
        if let Some(done) = self.committer.wait()? {
            self.record(done);
        }
        let started = Instant::now();
        let mut cp = Checkpoint::default();
        for op in &mut self.ops {
            op.on_checkpoint(&mut cp);
            let t = op.take_tally();
            let label = [("view", op.id().to_string())];
            self.metrics.late_events.get_or_create(&label).inc_by(t.late);
            self.metrics.view_null_inputs.get_or_create(&label).inc_by(t.null_inputs);
            self.metrics.view_state_windows.get_or_create(&label).set(op.state_len() as i64);
            op.report(&self.metrics);
        }
        cp.pipeline = self.pipeline.clone();
        cp.caught_up = std::mem::take(&mut self.caught_up);
        cp.skipped = self.source.skipped();
        let (up, del) = self.dedup.take_changes();
        cp.dedup_upserts = up;
        cp.dedup_deletes = del;
        cp.late = std::mem::take(&mut self.late);
        cp.partitions = self.positions.iter().map(|(p, o)| (*p, *o, self.marks.max_ts(*p))).collect();
        cp.global_watermark = self.marks.global();
        let split = self.settings.split_checkpoint_for_tests;
        let event_ts = std::mem::replace(&mut self.event_ts, std::mem::take(&mut self.spare_ts));
        self.committer.submit(Job { checkpoint: cp, emit_since, split, event_ts })?;
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        let label = [("pipeline", self.pipeline.clone())];
        self.metrics.state_rows.get_or_create(&label).set(self.ops.iter().map(|o| o.state_len() as i64).sum());
        self.metrics.dedup_boots.get_or_create(&label).set(self.dedup.len() as i64);
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn report_lag(&mut self, now: Instant) -> Result<(), ProcessorError> {
        let mut behind = 0;
        for (p, end) in self.source.end_offsets()? {
            let done = self.positions.get(&p).copied().unwrap_or(0);
            behind += end.saturating_sub(done);
            let label = [("pipeline", self.pipeline.clone()), ("partition", p.to_string())];
            self.metrics.lag_records.get_or_create(&label).set(end.saturating_sub(done) as i64);
        }
        // Seconds behind: how long ago the newest processed record was
        // appended, while records wait behind it; zero when caught up.
        let lag_seconds = if behind == 0 || self.newest_ingest_ms == 0 {
            0
        } else {
            let now_ms = crate::now_ms();
            (now_ms - self.newest_ingest_ms).max(0) / 1000
        };
        self.metrics.lag_seconds.get_or_create(&[("pipeline", self.pipeline.clone())]).set(lag_seconds);
        let skipped = self.source.skipped();
        self.metrics.archive_skipped_records.set(skipped as i64);
        // The ends may be stale (a broker that did not answer keeps the last
        // known, zero after an assignment): the source must also have seen
        // the end of every partition.
        let at_end = self.source.assigned().into_iter().all(|p| self.source.caught_up(p));
        if self.building && behind == 0 && at_end {
            tracing::info!(pipeline = %self.pipeline, skipped, "Replay caught up with the live log; the pipeline is live.");
            self.building = false;
            self.caught_up = true;
            self.last_checkpoint = Instant::now() - self.settings.checkpoint_interval;
        }
        self.metrics.idle_partitions.set(self.marks.idle(now) as i64);
        self.last_lag = Instant::now();
        Ok(())
    }

    /// Positions processed so far (not necessarily checkpointed).
    pub fn positions(&self) -> &BTreeMap<Partition, Offset> {
        &self.positions
    }

    /// The source it reads.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Stops without a checkpoint and hands the source back (a worker whose
    /// partitions were reassigned builds a new processor on it).
    pub fn into_source(self) -> S {
        self.source
    }

    /// The pipeline this processor runs.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// Still replaying history.
    pub fn building(&self) -> bool {
        self.building
    }

    /// The global watermark.
    pub fn watermark(&self) -> Option<i64> {
        self.marks.global()
    }

    /// How long each flush of just-closed windows took, from the watermark
    /// passing their end to their rows being committed (for benchmarks).
    pub fn take_emit_latencies(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.emit_latencies)
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
