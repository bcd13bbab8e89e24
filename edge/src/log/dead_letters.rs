//! Batches the cloud refused as invalid (HTTP 400, 415, 422; a 413 is split
//! first), kept until an operator decides: `kappa-edge log dead-letters
//! list|export|resend|release` (docs/edge.md, "Dead letters").
//!
//! A refused batch's readings are marked `fwd = 4` and stay in the log:
//! retention and the byte budget's pruning skip them (they are not in the
//! cloud), while they still count against the budget. They leave only by
//! `resend` (queued again as a backfill batch, `fwd = 3`), by `release` (the
//! next housekeeping pass deletes them, counted in
//! `kappa_edge_readings_shed_total{reason="released"}`), or by their class's
//! `log.ttl` (counted as shed with reason `ttl`). Refused aggregates stay
//! in the `aggregates` table the same way, skipped by its pruning.

use rusqlite::params;

use super::{BatchKind, EdgeLog, LogError, OutboxEntry};

/// A `readings.fwd` value: the reading's batch was refused by the cloud.
pub(super) const FWD_DEAD: i64 = 4;

/// A refused batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub batch_id: u64,
    pub kind: &'static str,
    pub first_id: i64,
    pub last_id: i64,
    /// Readings (or aggregates) still held.
    pub count: u64,
    pub refused_ms: i64,
    pub reason: String,
    /// When an operator released it (deleted at the next housekeeping pass).
    pub released_ms: Option<i64>,
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    All,
    Batch(u64),
}

/// What [`EdgeLog::drop_released`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    pub readings: u64,
    pub aggregates: u64,
}

fn kind_str(kind: &str) -> &'static str {
    match kind {
        "aggregates" => "aggregates",
        "backfill" => "backfill",
        _ => "readings",
    }
}

impl EdgeLog {
    /// Records that the cloud refused outbox batch `batch_id` and moves on:
    /// its readings stay in the log, marked as dead letters.
    pub fn dead_letter_batch(&mut self, batch_id: u64, reason: &str, now_ms: i64) -> Result<(), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR REPLACE INTO dead_letters (batch_id, first_id, last_id, count, refused_ms, reason, kind)
             SELECT batch_id, first_id, last_id, count, ?2, ?3, kind FROM outbox WHERE batch_id = ?1",
            params![batch_id as i64, now_ms, reason],
        )?;
        // The rows that travelled in it: marked for forwarding (1) or for backfill (3).
        tx.execute(
            "UPDATE readings SET fwd = ?2 WHERE id BETWEEN
                 (SELECT first_id FROM outbox WHERE batch_id = ?1 AND kind <> 'aggregates') AND
                 (SELECT last_id FROM outbox WHERE batch_id = ?1 AND kind <> 'aggregates')
             AND fwd = (SELECT CASE kind WHEN 'backfill' THEN 3 ELSE 1 END FROM outbox WHERE batch_id = ?1)",
            params![batch_id as i64, FWD_DEAD],
        )?;
        super::retire(&tx, batch_id)?;
        tx.commit()?;
        Ok(())
    }

    /// Splits outbox batch `batch_id` (the cloud said it is too large) into
    /// two batches of about half its rows each, with new batch ids; `None`
    /// when it holds a single row (or is gone).
    pub fn split_batch(&mut self, batch_id: u64) -> Result<Option<(OutboxEntry, OutboxEntry)>, LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(entry) = super::outbox_entry(&tx, batch_id)? else { return Ok(None) };
        if entry.count < 2 {
            return Ok(None);
        }
        // The row at which the second half starts, among the rows the batch carries.
        let (table, filter) = match entry.kind {
            BatchKind::Aggregates => ("aggregates", "1 = 1".to_string()),
            BatchKind::Readings => ("readings", "fwd = 1".to_string()),
            BatchKind::Backfill => ("readings", "fwd = 3".to_string()),
        };
        let half = entry.count / 2;
        let second: i64 = tx.query_row(
            &format!("SELECT id FROM {table} WHERE id BETWEEN ?1 AND ?2 AND {filter} ORDER BY id LIMIT 1 OFFSET ?3"),
            params![entry.first_id, entry.last_id, half as i64],
            |r| r.get(0),
        )?;
        let next: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_batch_id'", [], |r| r.get(0))?;
        let a = OutboxEntry { batch_id: next as u64, last_id: second - 1, count: half, ..entry };
        let b = OutboxEntry { batch_id: next as u64 + 1, first_id: second, count: entry.count - half, ..entry };
        tx.execute("DELETE FROM outbox WHERE batch_id = ?1", [batch_id as i64])?;
        for e in [&a, &b] {
            tx.execute(
                "INSERT INTO outbox (batch_id, first_id, last_id, count, created_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![e.batch_id as i64, e.first_id, e.last_id, e.count as i64, e.created_ms, e.kind.as_str()],
            )?;
        }
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_batch_id'", [next + 2])?;
        tx.commit()?;
        Ok(Some((a, b)))
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, LogError> {
        let mut stmt = self.conn.prepare(
            "SELECT d.batch_id, d.kind, d.first_id, d.last_id, d.refused_ms, d.reason, d.released_ms,
                 CASE d.kind WHEN 'aggregates'
                     THEN (SELECT count(*) FROM aggregates a WHERE a.id BETWEEN d.first_id AND d.last_id)
                     ELSE (SELECT count(*) FROM readings r WHERE r.id BETWEEN d.first_id AND d.last_id AND r.fwd = ?1)
                 END
             FROM dead_letters d ORDER BY d.batch_id",
        )?;
        let rows = stmt.query_map([FWD_DEAD], |r| {
            Ok(DeadLetter {
                batch_id: r.get::<_, i64>(0)? as u64,
                kind: kind_str(&r.get::<_, String>(1)?),
                first_id: r.get(2)?,
                last_id: r.get(3)?,
                refused_ms: r.get(4)?,
                reason: r.get(5)?,
                released_ms: r.get(6)?,
                count: r.get::<_, i64>(7)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The readings of dead letter `which`, in log order (aggregates are not readings: none).
    pub fn export_dead_letters(
        &self,
        which: Which,
        mut each: impl FnMut(kappa_common::Reading) -> std::io::Result<()>,
    ) -> Result<u64, LogError> {
        let batch = match which {
            Which::All => -1,
            Which::Batch(b) => b as i64,
        };
        let mut stmt = self.conn.prepare(
            "SELECT r.id, r.body FROM readings r JOIN dead_letters d
                 ON r.id BETWEEN d.first_id AND d.last_id AND d.kind <> 'aggregates'
             WHERE r.fwd = ?1 AND (?2 < 0 OR d.batch_id = ?2) ORDER BY r.id",
        )?;
        let mut rows = stmt.query(params![FWD_DEAD, batch])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let reading = kappa_common::Reading::from_cbor(&body)
                .map_err(|e| LogError::Corrupt(format!("reading {id} does not decode: {e}")))?;
            each(reading).map_err(|e| LogError::Io(e.to_string()))?;
            n += 1;
        }
        Ok(n)
    }

    /// Queues dead letter(s) `which` for the cloud again, each as a new
    /// batch (raw readings as a backfill batch). Returns the batches queued.
    pub fn resend_dead_letters(&mut self, which: Which, now_ms: i64) -> Result<Vec<OutboxEntry>, LogError> {
        let letters: Vec<DeadLetter> =
            self.dead_letters()?.into_iter().filter(|d| matches(which, d) && d.count > 0).collect();
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut queued = Vec::new();
        for d in letters {
            let next: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_batch_id'", [], |r| r.get(0))?;
            let kind = if d.kind == "aggregates" {
                BatchKind::Aggregates
            } else {
                tx.execute(
                    "UPDATE readings SET fwd = 3 WHERE id BETWEEN ?1 AND ?2 AND fwd = ?3",
                    params![d.first_id, d.last_id, FWD_DEAD],
                )?;
                BatchKind::Backfill
            };
            let entry = OutboxEntry {
                batch_id: next as u64,
                kind,
                first_id: d.first_id,
                last_id: d.last_id,
                count: d.count,
                created_ms: now_ms,
            };
            tx.execute(
                "INSERT INTO outbox (batch_id, first_id, last_id, count, created_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![next, d.first_id, d.last_id, d.count as i64, now_ms, kind.as_str()],
            )?;
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_batch_id'", [next + 1])?;
            tx.execute("DELETE FROM dead_letters WHERE batch_id = ?1", [d.batch_id as i64])?;
            if kind == BatchKind::Aggregates {
                super::recompute_pointers(&tx)?;
            }
            queued.push(entry);
        }
        tx.commit()?;
        Ok(queued)
    }

    /// Marks dead letter(s) `which` released: the next housekeeping pass
    /// deletes their rows and counts them. Returns how many were marked.
    pub fn release_dead_letters(&mut self, which: Which, now_ms: i64) -> Result<u64, LogError> {
        let batch = match which {
            Which::All => -1,
            Which::Batch(b) => b as i64,
        };
        let n = self.conn.execute(
            "UPDATE dead_letters SET released_ms = ?1 WHERE released_ms IS NULL AND (?2 < 0 OR batch_id = ?2)",
            params![now_ms, batch],
        )?;
        Ok(n as u64)
    }

    /// Deletes the rows of released dead letters, and dead letters left
    /// with no rows (their class's ttl took them). What it deleted.
    pub fn drop_released(&mut self) -> Result<Released, LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let readings = tx.execute(
            "DELETE FROM readings WHERE fwd = ?1 AND EXISTS (SELECT 1 FROM dead_letters d
                 WHERE d.released_ms IS NOT NULL AND d.kind <> 'aggregates' AND readings.id BETWEEN d.first_id AND d.last_id)",
            [FWD_DEAD],
        )? as u64;
        let aggregates = tx.execute(
            "DELETE FROM aggregates WHERE EXISTS (SELECT 1 FROM dead_letters d
                 WHERE d.released_ms IS NOT NULL AND d.kind = 'aggregates' AND aggregates.id BETWEEN d.first_id AND d.last_id)",
            [],
        )? as u64;
        tx.execute(
            "DELETE FROM dead_letters WHERE released_ms IS NOT NULL
                OR (kind <> 'aggregates' AND NOT EXISTS (SELECT 1 FROM readings r
                        WHERE r.id BETWEEN dead_letters.first_id AND dead_letters.last_id AND r.fwd = ?1))
                OR (kind = 'aggregates' AND NOT EXISTS (SELECT 1 FROM aggregates a
                        WHERE a.id BETWEEN dead_letters.first_id AND dead_letters.last_id))",
            [FWD_DEAD],
        )?;
        tx.commit()?;
        Ok(Released { readings, aggregates })
    }

    /// Readings held as dead letters (for the gauge).
    pub fn dead_letter_readings(&self) -> Result<u64, LogError> {
        Ok(self.conn.query_row("SELECT count(*) FROM readings WHERE fwd = ?1", [FWD_DEAD], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

fn matches(which: Which, d: &DeadLetter) -> bool {
    match which {
        Which::All => d.released_ms.is_none(),
        Which::Batch(b) => d.batch_id == b,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{entries, open};
    use super::*;

    /// Three readings in a batch the cloud refused; three more after, forwarded.
    fn refused_then_forwarded() -> (tempfile::TempDir, EdgeLog, u64) {
        let (d, mut log) = open();
        log.append(&entries("a", 1..4), 0).unwrap();
        let refused = log.assign_batch(10, 0).unwrap().unwrap();
        log.dead_letter_batch(refused.batch_id, "HTTP 400: nope", 5).unwrap();
        log.append(&entries("a", 4..7), 0).unwrap();
        let ok = log.assign_batch(10, 0).unwrap().unwrap();
        log.complete_batch(ok.batch_id).unwrap();
        (d, log, refused.batch_id)
    }

    #[test]
    fn retention_and_budget_pruning_keep_dead_lettered_readings() {
        let (_d, mut log, batch) = refused_then_forwarded();
        assert_eq!(log.stats().unwrap().cursor, 6, "the cursor moved past the refused batch");
        // Everything up to the cursor is forwarded except the refused batch.
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 3, "only the forwarded readings go");
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 0);
        let letters = log.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!((letters[0].batch_id, letters[0].count), (batch, 3));
        assert_eq!(log.dead_letter_readings().unwrap(), 3);
        assert!(log.check().unwrap().is_empty(), "{:?}", log.check().unwrap());
    }

    #[test]
    fn a_resent_dead_letter_goes_out_again_as_a_backfill_batch() {
        let (_d, mut log, batch) = refused_then_forwarded();
        let queued = log.resend_dead_letters(Which::Batch(batch), 9).unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!((queued[0].kind, queued[0].count), (BatchKind::Backfill, 3));
        let seqs: Vec<u64> = log.load_batch(&queued[0]).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(log.dead_letters().unwrap().is_empty());
        log.complete_batch(queued[0].batch_id).unwrap();
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 6, "now all of them are in the cloud");
    }

    /// Found by the model test (edge/tests/log_model.rs).
    #[test]
    fn a_resent_dead_letter_is_not_pruned_before_it_is_sent() {
        let (_d, mut log, batch) = refused_then_forwarded();
        let queued = log.resend_dead_letters(Which::Batch(batch), 9).unwrap();
        log.prune_forwarded(None, 100).unwrap();
        assert_eq!(log.load_batch(&queued[0]).unwrap().len(), 3, "the resent readings are still there to send");
    }

    #[test]
    fn a_released_dead_letter_is_deleted_and_counted_at_the_next_pass() {
        let (_d, mut log, batch) = refused_then_forwarded();
        let mut exported = Vec::new();
        log.export_dead_letters(Which::All, |r| {
            exported.push(r.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!(exported, [1, 2, 3]);
        assert_eq!(log.release_dead_letters(Which::Batch(batch), 9).unwrap(), 1);
        assert_eq!(log.drop_released().unwrap(), Released { readings: 3, aggregates: 0 });
        assert!(log.dead_letters().unwrap().is_empty());
        assert_eq!(log.stats().unwrap().readings, 3, "the forwarded ones remain until pruned");
    }

    #[test]
    fn a_batch_too_large_for_the_cloud_splits_in_halves_in_log_order() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..8), 0).unwrap();
        let b = log.assign_batch(10, 0).unwrap().unwrap();
        let (first, second) = log.split_batch(b.batch_id).unwrap().unwrap();
        assert_eq!((first.count, second.count), (3, 4));
        let seqs = |e: &OutboxEntry| log.load_batch(e).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!((seqs(&first), seqs(&second)), (vec![1, 2, 3], vec![4, 5, 6, 7]));
        assert!(second.batch_id > first.batch_id && first.batch_id > b.batch_id);
        assert!(log.check().unwrap().is_empty(), "{:?}", log.check().unwrap());
        let single = log.split_batch(first.batch_id).unwrap().unwrap().0;
        assert_eq!(log.split_batch(single.batch_id).unwrap(), None, "one reading cannot be split");
    }
}
