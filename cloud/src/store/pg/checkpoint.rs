//! Checkpoints into PostgreSQL: restoring a pipeline's share, fencing
//! partitions another worker took over, and writing a checkpoint as one
//! transaction of batched upserts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::Hash;

use kappa_common::partition::partition_for;
use postgres::{IsolationLevel, Transaction};

use super::{Context, PgStore, alerts, to_i64, to_u32, to_u64, versions};
use crate::eventlog::Partition;
use crate::store::{Checkpoint, ProcessorStore, Restored, StoreError, ViewState};

impl ProcessorStore for PgStore {
    /// Positions, max event times and dedup state of the claimed partitions
    /// only. A global watermark only for a claim of every partition: workers
    /// close windows per partition.
    fn restore(&self, pipeline: &str) -> Result<Restored, StoreError> {
        let claim = self.claimed(pipeline)?;
        let parts: Vec<i64> = claim.epochs.keys().map(|p| i64::from(*p)).collect();
        let s = &self.s;
        let mut client = self.client.borrow_mut();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .context("starting a restore")?;
        let rows = tx
            .query(
                &format!(
                    "SELECT part, next_offset, max_ts, epoch FROM {s}.partitions
                     WHERE pipeline = $1 AND part = ANY($2)"
                ),
                &[&pipeline, &parts],
            )
            .with_context(|| format!("reading the positions of pipeline {pipeline}"))?;
        let mut out = Restored::default();
        for r in &rows {
            let (p, next, max_ts, epoch): (i64, i64, Option<i64>, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let p = to_u32(p, "partition")?;
            if claim.epochs.get(&p) != Some(&epoch) {
                return Err(fenced(p, pipeline));
            }
            out.partitions.insert(p, (to_u64(next, "offset")?, max_ts));
        }
        if let Some(p) = claim.epochs.keys().find(|p| !out.partitions.contains_key(p)) {
            return Err(fenced(*p, pipeline));
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT device, boot, state FROM {s}.dedup WHERE pipeline = $1 AND part = ANY($2)
                     ORDER BY device, boot"
                ),
                &[&pipeline, &parts],
            )
            .with_context(|| format!("reading the dedup state of pipeline {pipeline}"))?;
        for r in &rows {
            let (device, boot, state): (String, i64, Vec<u8>) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            out.dedup.push((device, to_u32(boot, "boot")?, state));
        }
        tx.commit().context("finishing a restore")?;
        drop(client);
        if self.claims_every_partition() {
            out.global_watermark = self.global_watermark(pipeline)?;
        }
        Ok(out)
    }

    fn view_state(&self, view_id: &str, partition: Option<Partition>) -> Result<ViewState, StoreError> {
        let Some(p) = partition else {
            return Err(StoreError(format!(
                "view {view_id}: the PostgreSQL store keeps view state per partition; name the partition"
            )));
        };
        let s = &self.s;
        let mut client = self.client.borrow_mut();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .context("starting to read view state")?;
        let what = || format!("reading the state of {view_id} in partition {p}");
        let closed: Option<i64> = tx
            .query_opt(
                &format!("SELECT closed_through FROM {s}.view_meta WHERE view_id = $1 AND part = $2"),
                &[&view_id, &i64::from(p)],
            )
            .and_then(|r| r.map(|r| r.try_get::<_, Option<i64>>(0)).transpose())
            .with_context(what)?
            .flatten();
        let rows = tx
            .query(
                &format!(
                    "SELECT key, state FROM {s}.view_state WHERE view_id = $1 AND part = $2
                     ORDER BY key, window_start"
                ),
                &[&view_id, &i64::from(p)],
            )
            .with_context(what)?;
        let mut states = Vec::with_capacity(rows.len());
        for r in &rows {
            let key: String = r.try_get(0).with_context(what)?;
            let blob: Vec<u8> = r.try_get(1).with_context(what)?;
            states.push((key, blob));
        }
        tx.commit().with_context(what)?;
        Ok((closed, states))
    }

    fn alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read_alert_state()
    }

    /// Writes `cp` in one transaction, after fencing (see the module docs).
    ///
    /// Each table gets one statement per kind of change, with the changes as
    /// arrays, however many rows a checkpoint carries.
    ///
    /// `caught_up` marks the claimed partitions caught up (and the pipeline
    /// live once all are); `skipped` (records in damaged archive blocks this
    /// worker's replay skipped) becomes the pipeline's detail.
    /// `global_watermark` is kept only for a claim of every partition (the
    /// alert and aggregate pipelines); workers close windows per partition,
    /// with each partition's `closed_through`.
    fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        let pl = cp.pipeline.as_str();
        let claim = self.claimed(pl)?;
        // Only a process that runs the pipeline on every partition keeps a
        // global watermark; its alerts and aggregates are fenced by all of them.
        let whole = self.claims_every_partition();
        let global_watermark = cp.global_watermark.filter(|_| whole);
        if (cp.alerts.is_some() || !cp.aggregates.is_empty()) && !whole {
            return Err(StoreError(format!(
                "pipeline {pl}: alerts and edge aggregates need a claim of every partition of the log"
            )));
        }

        // Everything the checkpoint touches, per partition, for the fence.
        let positions: BTreeMap<Partition, (i64, Option<i64>)> = cp
            .partitions
            .iter()
            .map(|(p, o, m)| Ok((*p, (to_i64(*o, "offset")?, *m))))
            .collect::<Result<_, StoreError>>()?;
        let mut touched: BTreeSet<Partition> = positions.keys().copied().collect();
        for v in &cp.views {
            let p = v.partition.ok_or_else(|| {
                StoreError(format!("view {}: the PostgreSQL store keeps state per partition; none given", v.view))
            })?;
            touched.insert(p);
        }
        touched.extend(cp.late.iter().map(|l| l.partition));
        let part_of = |device: &str| partition_for(device, self.log_partitions);
        touched.extend(cp.dedup_upserts.iter().map(|(d, _, _)| part_of(d)));
        touched.extend(cp.dedup_deletes.iter().map(|(d, _)| part_of(d)));
        if cp.alerts.is_some() || !cp.aggregates.is_empty() || global_watermark.is_some() || cp.caught_up {
            touched.extend(claim.epochs.keys());
        }
        let fence: Vec<(Partition, i64)> = touched
            .iter()
            .map(|p| match claim.epochs.get(p) {
                Some(epoch) => Ok((*p, *epoch)),
                None => Err(StoreError(format!(
                    "checkpoint touches partition {p} of pipeline {pl}, which this worker did not claim"
                ))),
            })
            .collect::<Result<_, _>>()?;

        let caught_up: Vec<i64> =
            if cp.caught_up { claim.epochs.keys().map(|p| i64::from(*p)).collect() } else { Vec::new() };
        let batch = Batch::new(cp, self.log_partitions)?;
        let s = &self.s;
        // Dropping `tx` on an error rolls it back: nothing is written.
        let mut tx = self.client.get_mut().transaction().context("starting a checkpoint")?;
        fence_partitions(&mut tx, s, pl, &fence, &positions)?;
        batch.write(&mut tx, s, pl)?;
        if let Some(ch) = &cp.alerts {
            alerts::write_alerts(&mut tx, s, ch)?;
        }
        alerts::merge_aggregates(&mut tx, s, &cp.aggregates)?;
        if let Some(w) = global_watermark {
            alerts::write_global_watermark(&mut tx, s, pl, w)?;
        }
        if !caught_up.is_empty() {
            versions::mark_caught_up(&mut tx, s, pl, &caught_up, self.log_partitions)?;
        }
        if cp.skipped > 0 {
            let detail = format!("skipped {} records in damaged archive blocks", cp.skipped);
            tx.execute(&format!("UPDATE {s}.pipelines SET detail = $2 WHERE pipeline = $1"), &[&pl, &detail])
                .context("recording skipped records")?;
        }
        tx.commit().context("committing a checkpoint")?;
        Ok(())
    }
}

/// Updates the position of each partition in `fence` (or, if the checkpoint
/// carries none, just locks its row), in ascending order, provided this
/// worker's epoch is still the partition's.
fn fence_partitions(
    tx: &mut Transaction<'_>,
    s: &str,
    pl: &str,
    fence: &[(Partition, i64)],
    positions: &BTreeMap<Partition, (i64, Option<i64>)>,
) -> Result<(), StoreError> {
    if fence.is_empty() {
        return Ok(());
    }
    let update = tx
        .prepare(&format!(
            "UPDATE {s}.partitions SET next_offset = $4, max_ts = $5
             WHERE pipeline = $1 AND part = $2 AND epoch = $3"
        ))
        .context("fencing a checkpoint")?;
    let lock = tx
        .prepare(&format!(
            "SELECT 1 FROM {s}.partitions WHERE pipeline = $1 AND part = $2 AND epoch = $3 FOR NO KEY UPDATE"
        ))
        .context("fencing a checkpoint")?;
    for (p, epoch) in fence {
        let part = i64::from(*p);
        let matched = match positions.get(p) {
            Some((next, max_ts)) => tx.execute(&update, &[&pl, &part, epoch, next, max_ts]),
            None => tx.query(&lock, &[&pl, &part, epoch]).map(|r| r.len() as u64),
        }
        .with_context(|| format!("fencing partition {p} of pipeline {pl}"))?;
        if matched == 0 {
            return Err(fenced(*p, pl));
        }
    }
    Ok(())
}

fn fenced(p: Partition, pipeline: &str) -> StoreError {
    StoreError(format!("fenced: partition {p} of pipeline {pipeline} was claimed by another worker"))
}

/// A checkpoint's changes as columns: one array per column, one statement per
/// table and kind. Upserts are de-duplicated by primary key, keeping the last
/// occurrence (`ON CONFLICT DO UPDATE` refuses to touch a row twice).
#[derive(Default)]
struct Batch<'a> {
    row_del: RowKeys<'a>,
    row_up: Rows<'a>,
    state_del: StateKeys<'a>,
    state_up: States<'a>,
    partial_del: StateKeys<'a>,
    partial_up: Partials<'a>,
    meta: Metas<'a>,
    dedup_up: Dedups<'a>,
    dedup_del: DedupKeys<'a>,
    late: Lates<'a>,
}

#[derive(Default)]
struct RowKeys<'a> {
    view: Vec<&'a str>,
    key: Vec<&'a str>,
    start: Vec<i64>,
}

#[derive(Default)]
struct Rows<'a> {
    view: Vec<&'a str>,
    key: Vec<&'a str>,
    start: Vec<i64>,
    end: Vec<Option<i64>>,
    row: Vec<&'a str>,
}

#[derive(Default)]
struct StateKeys<'a> {
    view: Vec<&'a str>,
    part: Vec<i64>,
    key: Vec<&'a str>,
    start: Vec<i64>,
}

#[derive(Default)]
struct States<'a> {
    view: Vec<&'a str>,
    part: Vec<i64>,
    key: Vec<&'a str>,
    start: Vec<i64>,
    state: Vec<&'a [u8]>,
}

#[derive(Default)]
struct Partials<'a> {
    view: Vec<&'a str>,
    part: Vec<i64>,
    key: Vec<&'a str>,
    start: Vec<i64>,
    end: Vec<Option<i64>>,
    state: Vec<&'a [u8]>,
}

#[derive(Default)]
struct Metas<'a> {
    view: Vec<&'a str>,
    part: Vec<i64>,
    closed: Vec<Option<i64>>,
}

#[derive(Default)]
struct Dedups<'a> {
    part: Vec<i64>,
    device: Vec<&'a str>,
    boot: Vec<i64>,
    state: Vec<&'a [u8]>,
}

#[derive(Default)]
struct DedupKeys<'a> {
    device: Vec<&'a str>,
    boot: Vec<i64>,
}

#[derive(Default)]
struct Lates<'a> {
    view: Vec<&'a str>,
    part: Vec<i64>,
    offset: Vec<i64>,
    start: Vec<i64>,
    device: Vec<&'a str>,
    boot: Vec<i64>,
    seq: Vec<i64>,
    ts: Vec<i64>,
    watermark: Vec<i64>,
    reason: Vec<&'a str>,
}

impl<'a> Batch<'a> {
    fn new(cp: &'a Checkpoint, log_partitions: u32) -> Result<Self, StoreError> {
        let mut b = Batch::default();
        let mut rows = Vec::new();
        let mut states = Vec::new();
        let mut partials = Vec::new();
        let mut metas = Vec::new();
        for v in &cp.views {
            let view = v.view.as_str();
            let part = i64::from(v.partition.unwrap_or_default());
            for (k, start) in &v.changes.row_deletes {
                // A merged view's row deletes are its partition's partials.
                if v.merged {
                    b.partial_del.view.push(view);
                    b.partial_del.part.push(part);
                    b.partial_del.key.push(k.as_str());
                    b.partial_del.start.push(*start);
                } else {
                    b.row_del.view.push(view);
                    b.row_del.key.push(k.as_str());
                    b.row_del.start.push(*start);
                }
            }
            partials.extend(
                v.changes.partial_upserts.iter().map(|(k, start, end, blob)| (view, part, k, *start, *end, blob)),
            );
            rows.extend(v.changes.row_upserts.iter().map(|r| (view, r)));
            for (k, start) in &v.changes.state_deletes {
                b.state_del.view.push(view);
                b.state_del.part.push(part);
                b.state_del.key.push(k.as_str());
                b.state_del.start.push(*start);
            }
            states.extend(v.changes.state_upserts.iter().map(|(k, start, blob)| (view, part, k, *start, blob)));
            metas.push((view, part, v.closed_through));
        }
        for (view, r) in keep_last(rows, |(view, r)| (*view, r.key.as_str(), r.window_start)) {
            b.row_up.view.push(view);
            b.row_up.key.push(r.key.as_str());
            b.row_up.start.push(r.window_start);
            b.row_up.end.push(r.window_end);
            b.row_up.row.push(r.values.as_str());
        }
        for (view, part, k, start, blob) in keep_last(states, |(v, p, k, s, _)| (*v, *p, k.as_str(), *s)) {
            b.state_up.view.push(view);
            b.state_up.part.push(part);
            b.state_up.key.push(k.as_str());
            b.state_up.start.push(start);
            b.state_up.state.push(blob.as_slice());
        }
        for (view, part, k, start, end, blob) in keep_last(partials, |(v, p, k, s, _, _)| (*v, *p, k.as_str(), *s)) {
            b.partial_up.view.push(view);
            b.partial_up.part.push(part);
            b.partial_up.key.push(k.as_str());
            b.partial_up.start.push(start);
            b.partial_up.end.push(end);
            b.partial_up.state.push(blob.as_slice());
        }
        for (view, part, closed) in keep_last(metas, |(v, p, _)| (*v, *p)) {
            b.meta.view.push(view);
            b.meta.part.push(part);
            b.meta.closed.push(closed);
        }
        let dedup: Vec<_> = cp.dedup_upserts.iter().collect();
        for (device, boot, state) in keep_last(dedup, |(d, b, _)| (d.as_str(), *b)) {
            b.dedup_up.part.push(i64::from(partition_for(device, log_partitions)));
            b.dedup_up.device.push(device.as_str());
            b.dedup_up.boot.push(i64::from(*boot));
            b.dedup_up.state.push(state.as_slice());
        }
        for (device, boot) in &cp.dedup_deletes {
            b.dedup_del.device.push(device.as_str());
            b.dedup_del.boot.push(i64::from(*boot));
        }
        for l in &cp.late {
            b.late.view.push(l.view.as_str());
            b.late.part.push(i64::from(l.partition));
            b.late.offset.push(to_i64(l.offset, "offset")?);
            b.late.start.push(l.window_start);
            b.late.device.push(l.device.as_str());
            b.late.boot.push(i64::from(l.boot));
            // Stored bit for bit (see the module docs).
            b.late.seq.push(l.seq as i64);
            b.late.ts.push(l.ts_ms);
            b.late.watermark.push(l.watermark_ms);
            b.late.reason.push(l.reason);
        }
        Ok(b)
    }

    /// In the order of the embedded store: a row deleted and upserted in one
    /// checkpoint ends upserted, a dedup entry upserted and deleted ends deleted.
    fn write(&self, tx: &mut Transaction<'_>, s: &str, pl: &str) -> Result<(), StoreError> {
        let d = &self.row_del;
        if !d.view.is_empty() {
            tx.execute(
                &format!(
                    "DELETE FROM {s}.view_rows WHERE (view_id, key, window_start) IN
                     (SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[]))"
                ),
                &[&d.view, &d.key, &d.start],
            )
            .context("deleting view rows")?;
        }
        let u = &self.row_up;
        if !u.view.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.view_rows AS t (view_id, key, window_start, window_end, row)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[])
                     ON CONFLICT (view_id, key, window_start) DO UPDATE
                     SET window_end = EXCLUDED.window_end, row = EXCLUDED.row
                     WHERE (t.window_end, t.row) IS DISTINCT FROM (EXCLUDED.window_end, EXCLUDED.row)"
                ),
                &[&u.view, &u.key, &u.start, &u.end, &u.row],
            )
            .context("writing view rows")?;
        }
        let d = &self.state_del;
        if !d.view.is_empty() {
            tx.execute(
                &format!(
                    "DELETE FROM {s}.view_state WHERE (view_id, part, key, window_start) IN
                     (SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[]))"
                ),
                &[&d.view, &d.part, &d.key, &d.start],
            )
            .context("deleting view state")?;
        }
        let u = &self.state_up;
        if !u.view.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.view_state AS t (view_id, part, key, window_start, state)
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::bytea[])
                     ON CONFLICT (view_id, part, key, window_start) DO UPDATE SET state = EXCLUDED.state
                     WHERE t.state IS DISTINCT FROM EXCLUDED.state"
                ),
                &[&u.view, &u.part, &u.key, &u.start, &u.state],
            )
            .context("writing view state")?;
        }
        let d = &self.partial_del;
        if !d.view.is_empty() {
            tx.execute(
                &format!(
                    "DELETE FROM {s}.view_partials WHERE (view_id, part, key, window_start) IN
                     (SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[]))"
                ),
                &[&d.view, &d.part, &d.key, &d.start],
            )
            .context("deleting partials")?;
        }
        let u = &self.partial_up;
        if !u.view.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.view_partials AS t (view_id, part, key, window_start, window_end, state)
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::bytea[])
                     ON CONFLICT (view_id, key, window_start, part) DO UPDATE
                     SET window_end = EXCLUDED.window_end, state = EXCLUDED.state
                     WHERE (t.window_end, t.state) IS DISTINCT FROM (EXCLUDED.window_end, EXCLUDED.state)"
                ),
                &[&u.view, &u.part, &u.key, &u.start, &u.end, &u.state],
            )
            .context("writing partials")?;
        }
        let m = &self.meta;
        if !m.view.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.view_meta AS t (view_id, part, closed_through)
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])
                     ON CONFLICT (view_id, part) DO UPDATE SET closed_through = EXCLUDED.closed_through
                     WHERE t.closed_through IS DISTINCT FROM EXCLUDED.closed_through"
                ),
                &[&m.view, &m.part, &m.closed],
            )
            .context("writing view watermarks")?;
        }
        let u = &self.dedup_up;
        if !u.device.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.dedup AS t (pipeline, part, device, boot, state)
                     SELECT $1, * FROM UNNEST($2::int8[], $3::text[], $4::int8[], $5::bytea[])
                     ON CONFLICT (pipeline, device, boot) DO UPDATE SET part = EXCLUDED.part, state = EXCLUDED.state
                     WHERE (t.part, t.state) IS DISTINCT FROM (EXCLUDED.part, EXCLUDED.state)"
                ),
                &[&pl, &u.part, &u.device, &u.boot, &u.state],
            )
            .context("writing dedup state")?;
        }
        let d = &self.dedup_del;
        if !d.device.is_empty() {
            tx.execute(
                &format!(
                    "DELETE FROM {s}.dedup WHERE pipeline = $1 AND (device, boot) IN
                     (SELECT * FROM UNNEST($2::text[], $3::int8[]))"
                ),
                &[&pl, &d.device, &d.boot],
            )
            .context("deleting dedup state")?;
        }
        let l = &self.late;
        if !l.view.is_empty() {
            // A replay writes the same late events again.
            tx.execute(
                &format!(
                    "INSERT INTO {s}.late_events
                     (view_id, part, log_offset, window_start, device, boot, seq, ts_ms, watermark_ms, reason)
                     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::text[],
                                          $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::text[])
                     ON CONFLICT (view_id, part, log_offset, window_start) DO NOTHING"
                ),
                &[&l.view, &l.part, &l.offset, &l.start, &l.device, &l.boot, &l.seq, &l.ts, &l.watermark, &l.reason],
            )
            .context("writing late events")?;
        }
        Ok(())
    }
}

/// `items` without the earlier of any two with the same key, in order.
pub(super) fn keep_last<T, K: Eq + Hash>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut out: Vec<T> = items.into_iter().rev().filter(|t| seen.insert(key(t))).collect();
    out.reverse();
    out
}
