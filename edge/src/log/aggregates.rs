//! Pre-aggregation state in the log: open windows, closed partials waiting to
//! be forwarded, and how far the aggregator has read.
//!
//! * `agg_open(device, metric, window_ms, start_ms, body)`: windows still
//!   collecting readings (packed CBOR [`Aggregate`]).
//! * `aggregates(id, created_ms, body)`: closed partials, forwarded in
//!   batches of kind `aggregates` and kept for `log.retention` after.
//! * `meta.agg_cursor`: every reading with `id <= agg_cursor` is folded.
//!
//! One fold step (new open state, closed partials, which raw readings stay
//! local, the new cursor) commits in one transaction, so after a crash the
//! aggregator resumes exactly where its state says: no reading counted twice
//! or missed.

use kappa_common::Reading;
use kappa_common::aggregate::Aggregate;
use rusqlite::params;

use super::{EdgeLog, LogError};

/// What one fold step changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FoldStep {
    /// The readings folded: `(from, upto]`.
    pub from: i64,
    pub upto: i64,
    /// Windows closed in this step (partials to forward).
    pub closed: Vec<Aggregate>,
    /// Open windows that changed.
    pub open: Vec<Aggregate>,
    /// Open windows that closed (their rows go).
    pub gone: Vec<(String, String, i64, i64)>,
    /// Whether raw readings of the range are forwarded: `None` leaves them
    /// all forwarded; `Some(ids)` keeps them local except `ids`.
    pub forward_only: Option<Vec<i64>>,
    /// Readings that tripped a local rule: forwarded, and shed last.
    pub exceptions: Vec<i64>,
}

fn decode(body: &[u8]) -> Result<Aggregate, LogError> {
    serde_cbor::from_slice(body).map_err(|e| LogError::Corrupt(format!("an aggregate does not decode: {e}")))
}

fn encode(a: &Aggregate) -> Vec<u8> {
    serde_cbor::ser::to_vec_packed(a).unwrap_or_default()
}

impl EdgeLog {
    /// Up to `limit` readings not yet folded, with their ids.
    pub fn unfolded(&self, limit: usize) -> Result<Vec<(i64, Reading)>, LogError> {
        let cursor = self.meta("agg_cursor")?;
        let mut stmt = self.conn.prepare_cached("SELECT id, body FROM readings WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let mut rows = stmt.query(params![cursor, limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let r = Reading::from_cbor(&body)
                .map_err(|e| LogError::Corrupt(format!("reading {id} does not decode: {e}")))?;
            out.push((id, r));
        }
        Ok(out)
    }

    /// The aggregator's cursor: every reading up to it is folded.
    pub fn fold_cursor(&self) -> Result<i64, LogError> {
        self.meta("agg_cursor")
    }

    /// Windows left open by the last fold step.
    pub fn open_windows(&self) -> Result<Vec<Aggregate>, LogError> {
        let mut stmt = self.conn.prepare_cached("SELECT body FROM agg_open")?;
        let bodies: Vec<Vec<u8>> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        bodies.iter().map(|b| decode(b)).collect()
    }

    /// Commits one fold step atomically.
    pub fn commit_fold(&mut self, step: &FoldStep, now_ms: i64) -> Result<(), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut closed = tx.prepare_cached("INSERT INTO aggregates (created_ms, body) VALUES (?1, ?2)")?;
            for a in &step.closed {
                closed.execute(params![now_ms, encode(a)])?;
            }
            let mut open = tx.prepare_cached(
                "INSERT OR REPLACE INTO agg_open (device, metric, window_ms, start_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for a in &step.open {
                open.execute(params![a.device, a.metric, a.window_ms, a.start_ms, encode(a)])?;
            }
            let mut gone = tx.prepare_cached(
                "DELETE FROM agg_open WHERE device = ?1 AND metric = ?2 AND window_ms = ?3 AND start_ms = ?4",
            )?;
            for (d, m, w, s) in &step.gone {
                gone.execute(params![d, m, w, s])?;
            }
            if let Some(ids) = &step.forward_only {
                tx.execute("UPDATE readings SET fwd = 0 WHERE id > ?1 AND id <= ?2", params![step.from, step.upto])?;
                let mut keep = tx.prepare_cached("UPDATE readings SET fwd = 1 WHERE id = ?1")?;
                for id in ids {
                    keep.execute([id])?;
                }
            }
            let mut exception = tx.prepare_cached("UPDATE readings SET fwd = 2 WHERE id = ?1")?;
            for id in &step.exceptions {
                exception.execute([id])?;
            }
        }
        tx.execute("UPDATE meta SET value = max(value, ?1) WHERE key = 'agg_cursor'", [step.upto])?;
        tx.commit()?;
        Ok(())
    }

    /// The aggregates of an outbox batch of kind `aggregates`.
    pub fn load_aggregates(&self, entry: &super::OutboxEntry) -> Result<Vec<Aggregate>, LogError> {
        if entry.kind != super::BatchKind::Aggregates {
            return Ok(Vec::new());
        }
        let mut stmt =
            self.conn.prepare_cached("SELECT body FROM aggregates WHERE id BETWEEN ?1 AND ?2 ORDER BY id")?;
        let bodies: Vec<Vec<u8>> =
            stmt.query_map(params![entry.first_id, entry.last_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        bodies.iter().map(|b| decode(b)).collect()
    }

    /// Deletes forwarded aggregates created before `before_ms` (dead
    /// letters stay: they are not in the cloud). Returns how many.
    pub fn prune_aggregates(&mut self, before_ms: i64) -> Result<u64, LogError> {
        let done = self.meta("agg_done")?;
        let n = self.conn.execute(
            "DELETE FROM aggregates WHERE id <= ?1 AND created_ms < ?2 AND NOT EXISTS (SELECT 1 FROM dead_letters d
                 WHERE d.kind = 'aggregates' AND aggregates.id BETWEEN d.first_id AND d.last_id)",
            params![done, before_ms],
        )?;
        Ok(n as u64)
    }
}
