//! A view whose state is kept per partition, for cluster workers.
//!
//! A worker owns some partitions of the log, and a partition can move to
//! another worker at any time. So each partition gets its own
//! [`ViewOperator`]: its open windows, the watermark it closed through and
//! its checkpointed changes belong to that partition alone, and a worker that
//! takes a partition over restores exactly that share. Windows close by their
//! partition's own watermark, never by a minimum over the partitions a worker
//! happens to hold, so a view's rows are a function of the log alone,
//! whichever worker computed which partition.
//!
//! A view keyed by the device gets each row from one partition (records are
//! partitioned by device id), so each partition writes its rows. A view keyed
//! by a tag (a user) mixes partitions: each partition writes the *states* of
//! its windows instead (partials), and the reader merges them across
//! partitions ([`crate::views::operator::merge_partials`]) into the rows one
//! operator seeing every reading would have written.

use std::collections::BTreeMap;

use crate::eventlog::Partition;
use crate::metrics::CloudMetrics;
use crate::processor::Operator;
use crate::store::{Checkpoint, ProcessorStore, StoreError, ViewChanges};
use crate::views::operator::{Event, LateEvent, Tally, ViewOperator};
use crate::views::spec::{Field, ViewSpec};

/// One view, split by partition.
#[derive(Debug)]
pub struct PartitionedView {
    id: String,
    spec: ViewSpec,
    parts: BTreeMap<Partition, ViewOperator>,
    /// Keyed by something else than the device: partials, merged by readers.
    merged: bool,
    /// Restore the partitions' state on start (off only for a fault test).
    restore: bool,
}

impl PartitionedView {
    /// A view over `partitions`, each restored from the store by
    /// [`Operator::on_start`].
    pub fn new(spec: ViewSpec, partitions: &[Partition]) -> Self {
        let merged = spec.key != Field::Device;
        let mut view = Self { id: spec.id(), spec, parts: BTreeMap::new(), merged, restore: true };
        for p in partitions {
            view.part(*p);
        }
        view
    }

    /// The operator of `partition`, made the first time it is asked for.
    fn part(&mut self, partition: Partition) -> &mut ViewOperator {
        let (spec, merged) = (&self.spec, self.merged);
        self.parts.entry(partition).or_insert_with(|| {
            let op = ViewOperator::new(spec.clone());
            if merged { op.keeping_partials() } else { op }
        })
    }

    /// Whether [`Operator::on_start`] restores state (see `cluster::FAULT_SKIP_RESTORE`).
    pub fn restoring(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }
}

impl Operator for PartitionedView {
    fn id(&self) -> &str {
        &self.id
    }

    fn on_start(&mut self, store: &dyn ProcessorStore) -> Result<(), StoreError> {
        if !self.restore {
            return Ok(());
        }
        for (p, op) in &mut self.parts {
            let (closed, states) = store.view_state(&self.id, Some(*p))?;
            op.restore(closed, states).map_err(StoreError)?;
        }
        Ok(())
    }

    fn process(&mut self, ev: &Event<'_>, late: &mut Vec<LateEvent>) {
        self.part(ev.partition).process(ev, late);
    }

    /// Each run of consecutive readings of one partition goes to that
    /// partition's operator together (a poll returns partitions in runs).
    fn process_batch(&mut self, evs: &[Event<'_>], late: &mut Vec<LateEvent>) {
        for run in evs.chunk_by(|a, b| a.partition == b.partition) {
            self.part(run[0].partition).process_batch(run, late);
        }
    }

    fn on_partition_watermark(&mut self, partition: Partition, watermark: i64) {
        if let Some(op) = self.parts.get_mut(&partition) {
            op.on_watermark(watermark);
        }
    }

    fn on_checkpoint(&mut self, cp: &mut Checkpoint) {
        for (p, op) in &mut self.parts {
            cp.views.push(ViewChanges {
                view: self.id.clone(),
                partition: Some(*p),
                changes: op.take_changes(),
                closed_through: op.closed_through(),
                merged: self.merged,
            });
        }
    }

    fn take_tally(&mut self) -> Tally {
        let mut sum = Tally::default();
        for op in self.parts.values_mut() {
            let t = std::mem::take(&mut op.tally);
            sum.applied += t.applied;
            sum.filtered += t.filtered;
            sum.missing_key += t.missing_key;
            sum.null_inputs += t.null_inputs;
            sum.late += t.late;
        }
        sum
    }

    fn state_len(&self) -> usize {
        self.parts.values().map(ViewOperator::state_len).sum()
    }

    fn has_pending_output(&self) -> bool {
        self.parts.values().any(ViewOperator::has_pending_output)
    }

    fn report(&mut self, _metrics: &CloudMetrics) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::spec::{AggFn, AggSpec, OutputMode, WindowSpec};
    use kappa_common::reading::Reading;

    fn spec(key: Field) -> ViewSpec {
        ViewSpec {
            name: "t".into(),
            version: 1,
            key,
            window: WindowSpec::Tumbling { size_ms: 10_000 },
            output: OutputMode::Final,
            allowed_lateness_ms: 0,
            filter: vec![],
            aggregates: vec![AggSpec { name: "n".into(), func: AggFn::Count, of: None, max: 10 }],
        }
    }

    #[test]
    fn a_view_keyed_by_a_tag_writes_partials_instead_of_rows() {
        let mut v = PartitionedView::new(spec(Field::Tag("site".into())), &[0]);
        let r = Reading {
            device: "a".into(),
            boot: 1,
            seq: 1,
            ts_ms: 1_000,
            schema: 2,
            metrics: Default::default(),
            tags: [("site".to_string(), "north".to_string())].into(),
        };
        let ev = Event { partition: 0, offset: 0, gateway: "g", ingest_ms: 0, reading: &r, watermark: None };
        v.process(&ev, &mut Vec::new());
        v.on_partition_watermark(0, 20_000);
        let mut cp = Checkpoint::default();
        v.on_checkpoint(&mut cp);
        let c = &cp.views[0];
        assert!(c.merged && c.changes.row_upserts.is_empty(), "{c:?}");
        assert_eq!(c.changes.partial_upserts.len(), 1);
        assert_eq!((c.changes.partial_upserts[0].0.as_str(), c.changes.partial_upserts[0].2), ("north", Some(10_000)));
    }

    #[test]
    fn each_partition_closes_by_its_own_watermark() {
        let mut v = PartitionedView::new(spec(Field::Device), &[0, 1]);
        let reading = |device: &str, ts_ms: i64| Reading {
            device: device.into(),
            boot: 1,
            seq: 1,
            ts_ms,
            schema: 2,
            metrics: Default::default(),
            tags: Default::default(),
        };
        let (a, b) = (reading("a", 1_000), reading("b", 1_000));
        let mut late = Vec::new();
        for (p, r) in [(0, &a), (1, &b)] {
            let ev = Event { partition: p, offset: 0, gateway: "g", ingest_ms: 0, reading: r, watermark: None };
            v.process(&ev, &mut late);
        }
        // Partition 0 passes the window's end; partition 1 does not.
        v.on_partition_watermark(0, 20_000);
        assert!(v.has_pending_output());
        let mut cp = Checkpoint::default();
        v.on_checkpoint(&mut cp);
        let by_part: Vec<(Option<Partition>, usize, usize)> = cp
            .views
            .iter()
            .map(|c| (c.partition, c.changes.row_upserts.len(), c.changes.state_upserts.len()))
            .collect();
        assert_eq!(by_part, vec![(Some(0), 1, 0), (Some(1), 0, 1)]);
        assert_eq!(cp.views[0].closed_through, Some(20_000));
        assert_eq!(cp.views[1].closed_through, None);
        assert!(late.is_empty());
    }
}
