//! What the log costs on disk, and the operations that give space back.
//!
//! The policy (when to call which) lives in the agent's housekeeping
//! module, which calls these; they are the mechanisms, each one
//! transaction:
//!
//! * [`EdgeLog::prune_forwarded`]: delete readings the cloud already has
//!   (`id <= cursor`), oldest first. Nothing is lost: the cloud holds them.
//! * [`EdgeLog::shed_unforwarded`]: delete the oldest readings not yet in any
//!   batch. They never reach the cloud; the caller counts them.
//! * [`EdgeLog::reclaim`]: return free pages to the filesystem (incremental
//!   vacuum) and checkpoint the WAL.
//!
//! Readings inside an outbox batch are never touched: a batch always covers
//! the same rows, so a resend stays byte-for-byte the same batch.

use rusqlite::{OptionalExtension, params};

use super::{EdgeLog, LogError};

/// The data classes, lowest priority first: shedding drops raw readings
/// before aggregates, and aggregates before exceptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Raw readings.
    Raw,
    /// Window aggregates and rollups.
    Aggregate,
    /// Raw readings that tripped a local rule (hybrid mode).
    Exception,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Raw, Class::Aggregate, Class::Exception];

    pub fn label(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Aggregate => "aggregate",
            Self::Exception => "exception",
        }
    }

    /// `(table, meta key of the last id put in a batch, row filter)`.
    fn where_unbatched(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Raw => ("readings", "assigned_upto", "AND fwd <> 2"),
            Self::Aggregate => ("aggregates", "agg_assigned_upto", ""),
            Self::Exception => ("readings", "assigned_upto", "AND fwd = 2"),
        }
    }
}

/// Readings of a backfill batch still pending (`fwd = 3`, the cursor already
/// past them) are in an outbox batch like any other: never deleted before
/// it is sent.
const NOT_PENDING_BACKFILL: &str = "NOT (fwd = 3 AND EXISTS (SELECT 1 FROM outbox o
    WHERE o.kind = 'backfill' AND readings.id BETWEEN o.first_id AND o.last_id))";

/// The WAL is truncated back to this size after a checkpoint.
pub(super) const WAL_SIZE_LIMIT: i64 = 8 << 20;

/// Space the log takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Database pages holding data (free pages excluded).
    pub used_bytes: u64,
    /// The database file, free pages included.
    pub file_bytes: u64,
    /// The write-ahead log file.
    pub wal_bytes: u64,
}

impl Usage {
    /// What counts against `log.max_bytes`: data pages plus the WAL.
    pub fn budget_bytes(&self) -> u64 {
        self.used_bytes + self.wal_bytes
    }
}

impl EdgeLog {
    /// Current space use.
    pub fn usage(&self) -> Result<Usage, LogError> {
        let page = |pragma: &str| -> Result<u64, LogError> {
            Ok(self.conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0))?.max(0) as u64)
        };
        let (pages, free, size) = (page("page_count")?, page("freelist_count")?, page("page_size")?);
        let wal_bytes =
            self.conn.path().and_then(|p| std::fs::metadata(format!("{p}-wal")).ok()).map_or(0, |m| m.len());
        Ok(Usage { used_bytes: (pages - free.min(pages)) * size, file_bytes: pages * size, wal_bytes })
    }

    /// Deletes up to `limit` of the oldest forwarded readings, only those
    /// received before `received_before_ms` when given. Returns how many.
    /// (A reading that stays local and was folded into a window counts as
    /// forwarded once its batch range passed: its window carries it.) Dead
    /// letters are not forwarded: they stay (`dead_letters`).
    pub fn prune_forwarded(&mut self, received_before_ms: Option<i64>, limit: usize) -> Result<u64, LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let cursor: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |r| r.get(0))?;
        // Readings arrive in id order, so the ones past retention are a prefix.
        let last: Option<i64> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT id, received_ms FROM readings WHERE id <= ?1 AND fwd <> ?3 AND {NOT_PENDING_BACKFILL} ORDER BY id LIMIT ?2"
            ))?;
            let mut rows = stmt.query(params![cursor, limit as i64, super::FWD_DEAD])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let received: i64 = row.get(1)?;
                if received_before_ms.is_some_and(|before| received >= before) {
                    break;
                }
                last = Some(row.get(0)?);
            }
            last
        };
        let Some(last) = last else { return Ok(0) };
        let n = tx.execute(
            &format!("DELETE FROM readings WHERE id <= ?1 AND fwd <> ?2 AND {NOT_PENDING_BACKFILL}"),
            params![last, super::FWD_DEAD],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Deletes up to `limit` of the oldest raw readings (not exceptions) not
    /// yet in any batch. Returns how many.
    pub fn shed_unforwarded(&mut self, limit: usize) -> Result<u64, LogError> {
        self.shed(Class::Raw, limit)
    }

    /// Deletes up to `limit` of the oldest unbatched data of `class`. Returns how many.
    pub fn shed(&mut self, class: Class, limit: usize) -> Result<u64, LogError> {
        if limit == 0 {
            return Ok(0);
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (table, pointer, filter) = class.where_unbatched();
        let upto: i64 = tx.query_row("SELECT value FROM meta WHERE key = ?1", [pointer], |r| r.get(0))?;
        let last: Option<i64> = tx
            .query_row(
                &format!("SELECT max(id) FROM (SELECT id FROM {table} WHERE id > ?1 {filter} ORDER BY id LIMIT ?2)"),
                params![upto, limit as i64],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let Some(last) = last else { return Ok(0) };
        let n = tx.execute(&format!("DELETE FROM {table} WHERE id > ?1 AND id <= ?2 {filter}"), params![upto, last])?;
        tx.commit()?;
        Ok(n as u64)
    }

    /// Replaces up to `limit` of the oldest unbatched raw readings with
    /// per-device, per-metric rollups of `window_ms` (aggregates, forwarded
    /// like any other), when that at least halves their number. Returns
    /// `(readings rolled up, rollups written)`; `(0, 0)` when it would not pay.
    pub fn roll_up(&mut self, window_ms: i64, limit: usize, now_ms: i64) -> Result<(u64, u64), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let meta = |key: &str| -> Result<i64, rusqlite::Error> {
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        };
        // Readings the aggregator already folded are in its windows: rolling them up would count them twice.
        let from = if self.folding { meta("assigned_upto")?.max(meta("agg_cursor")?) } else { meta("assigned_upto")? };
        let mut rows: Vec<(i64, kappa_common::Reading)> = Vec::new();
        {
            let mut stmt =
                tx.prepare_cached("SELECT id, body FROM readings WHERE id > ?1 AND fwd <> 2 ORDER BY id LIMIT ?2")?;
            let mut q = stmt.query(params![from, limit as i64])?;
            while let Some(row) = q.next()? {
                let id: i64 = row.get(0)?;
                let body: Vec<u8> = row.get(1)?;
                let r = kappa_common::Reading::from_cbor(&body)
                    .map_err(|e| LogError::Corrupt(format!("reading {id} does not decode: {e}")))?;
                rows.push((id, r));
            }
        }
        let (Some(first), Some(last)) = (rows.first().map(|r| r.0), rows.last().map(|r| r.0)) else {
            return Ok((0, 0));
        };
        let rollups = kappa_common::aggregate::aggregate(rows.iter().map(|(_, r)| r), window_ms);
        if rollups.len() * 2 > rows.len() {
            return Ok((0, 0));
        }
        {
            let mut insert = tx.prepare_cached("INSERT INTO aggregates (created_ms, body) VALUES (?1, ?2)")?;
            for a in &rollups {
                insert.execute(params![now_ms, serde_cbor::ser::to_vec_packed(a).unwrap_or_default()])?;
            }
        }
        let n = tx.execute("DELETE FROM readings WHERE id >= ?1 AND id <= ?2 AND fwd <> 2", params![first, last])?;
        tx.commit()?;
        Ok((n as u64, rollups.len() as u64))
    }

    /// Deletes data of `class` received before `before_ms` whether forwarded or
    /// not (never inside a pending batch). Returns `(deleted, of which never
    /// forwarded)`: unbatched data, and dead letters.
    pub fn expire(&mut self, class: Class, before_ms: i64) -> Result<(u64, u64), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (table, pointer, filter) = class.where_unbatched();
        let time = if table == "aggregates" { "created_ms" } else { "received_ms" };
        let done_key = if table == "aggregates" { "agg_done" } else { "cursor" };
        let upto: i64 = tx.query_row("SELECT value FROM meta WHERE key = ?1", [pointer], |r| r.get(0))?;
        let done: i64 = tx.query_row("SELECT value FROM meta WHERE key = ?1", [done_key], |r| r.get(0))?;
        // Rows arrive in id order, so the expired ones of a range are a prefix
        // of it: find where it ends without scanning the whole table.
        let prefix_end = |low: i64, high: i64| -> Result<Option<i64>, rusqlite::Error> {
            tx.query_row(
                // Any class: the first row not expired ends the prefix for every class.
                &format!("SELECT id FROM {table} WHERE id > ?1 AND id <= ?2 AND {time} >= ?3 ORDER BY id LIMIT 1"),
                params![low, high, before_ms],
                |r| r.get(0),
            )
            .optional()
        };
        let mut gone = [0u64; 2];
        let mut dead = 0;
        for (i, (low, high)) in [(upto, i64::MAX), (i64::MIN, done)].into_iter().enumerate() {
            let end = prefix_end(low, high)?.map_or(high, |first_kept| first_kept - 1);
            if end > low {
                if i == 1 {
                    // Dead letters among them were never forwarded.
                    let refused = if table == "aggregates" {
                        "EXISTS (SELECT 1 FROM dead_letters d WHERE d.kind = 'aggregates' AND aggregates.id BETWEEN d.first_id AND d.last_id)".to_string()
                    } else {
                        format!("fwd = {}", super::FWD_DEAD)
                    };
                    dead = tx.query_row(
                        &format!("SELECT count(*) FROM {table} WHERE id > ?1 AND id <= ?2 AND {time} < ?3 {filter} AND {refused} AND {}",
                            if table == "readings" { NOT_PENDING_BACKFILL } else { "1 = 1" }),
                        params![low, end, before_ms],
                        |r| r.get::<_, i64>(0),
                    )? as u64;
                }
                let pending = if table == "readings" { NOT_PENDING_BACKFILL } else { "1 = 1" };
                gone[i] = tx.execute(
                    &format!("DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {time} < ?3 {filter} AND {pending}"),
                    params![low, end, before_ms],
                )? as u64;
            }
        }
        tx.commit()?;
        Ok((gone[0] + gone[1], gone[0] + dead))
    }

    /// Gives free pages back to the filesystem and checkpoints the WAL;
    /// `truncate` also shrinks the WAL file to zero (waits for readers).
    pub fn reclaim(&mut self, truncate: bool) -> Result<(), LogError> {
        // Each step of this pragma frees one page: run it to the end.
        let mut vacuum = self.conn.prepare_cached("PRAGMA incremental_vacuum")?;
        let mut rows = vacuum.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        drop(vacuum);
        let mode = if truncate { "TRUNCATE" } else { "PASSIVE" };
        self.conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))?;
        Ok(())
    }

    /// Rewrites the whole database compactly (`VACUUM`): needs free space
    /// about the size of the log and pauses commits while it runs.
    pub fn compact(&mut self) -> Result<(), LogError> {
        self.conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        self.reclaim(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::entries;
    use super::*;
    use crate::log::config::Durability;

    fn open() -> (tempfile::TempDir, EdgeLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(&dir.path().join("log.sqlite"), Durability::Normal).unwrap();
        (dir, log)
    }

    #[test]
    fn pruning_takes_only_forwarded_readings_past_retention() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..6), 100).unwrap();
        log.append(&entries("a", 6..11), 200).unwrap();
        let b = log.assign_batch(7, 0).unwrap().unwrap();
        log.complete_batch(b.batch_id).unwrap();
        // 1-5 arrived at 100, 6-7 at 200: only the first five are past retention.
        assert_eq!(log.prune_forwarded(Some(150), 100).unwrap(), 5);
        assert_eq!(log.prune_forwarded(Some(150), 100).unwrap(), 0);
        // Without a retention bound, every forwarded one goes, never the backlog.
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 2);
        let s = log.stats().unwrap();
        assert_eq!((s.readings, s.backlog_readings), (3, 3));
        assert!(log.check().unwrap().is_empty());
    }

    #[test]
    fn shedding_takes_the_oldest_unbatched_and_leaves_batches_alone() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..11), 0).unwrap();
        let b = log.assign_batch(3, 0).unwrap().unwrap();
        assert_eq!(log.shed_unforwarded(4).unwrap(), 4);
        assert_eq!(log.load_batch(&b).unwrap().len(), 3, "the pending batch is intact");
        let next = log.assign_batch(100, 0).unwrap().unwrap();
        let seqs: Vec<u64> = log.load_batch(&next).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![8, 9, 10], "4-7 were the oldest unbatched");
        assert_eq!(log.shed_unforwarded(4).unwrap(), 0);
        assert!(log.check().unwrap().is_empty());
    }

    #[test]
    fn deleted_space_goes_back_to_the_filesystem() {
        let (_d, mut log) = open();
        for chunk in 0..20 {
            log.append(&entries("a", chunk * 1000 + 1..chunk * 1000 + 1001), 0).unwrap();
        }
        log.reclaim(true).unwrap();
        let full = log.usage().unwrap();
        assert_eq!(log.shed_unforwarded(15_000).unwrap(), 15_000);
        let deleted = log.usage().unwrap();
        assert!(deleted.used_bytes < full.used_bytes / 2, "{deleted:?} vs {full:?}");
        log.reclaim(true).unwrap();
        let reclaimed = log.usage().unwrap();
        assert!(reclaimed.file_bytes < full.file_bytes / 2, "{reclaimed:?} vs {full:?}");
        assert_eq!(reclaimed.wal_bytes, 0);
    }
}
