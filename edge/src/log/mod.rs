//! The agent's durable log: SQLite in WAL mode, one writer.
//!
//! On-disk format (schema version 1):
//!
//! * `readings(id, device, boot, seq, ts_ms, received_ms, body)`: every
//!   accepted reading, `id` strictly increasing (AUTOINCREMENT, never reused),
//!   `body` the reading in packed CBOR, `(device, boot, seq)` unique so a
//!   device's resend is stored once.
//! * `quarantine(id, received_ms, topic, reason, detail, payload)`: rejected
//!   payloads with the reason, newest `quarantine_keep` kept.
//! * `outbox(batch_id, first_id, last_id, count, created_ms)`: batches built
//!   but not yet acknowledged by the cloud. A batch always covers the same
//!   rows, so a resend after a crash is byte-for-byte the same batch.
//! * `dead_letters(batch_id, ...)`: batches the cloud refused as invalid.
//! * `meta(key, value)`: `cursor` (every reading with `id <= cursor` is
//!   durably in the cloud), `assigned_upto` (last id put in a batch),
//!   `next_batch_id`.
//!
//! Invariant: `cursor <= assigned_upto`, and every id in
//! `(cursor, assigned_upto]` belongs to exactly one outbox batch.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kappa_common::Reading;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::config::Durability;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    boot INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (device, boot, seq)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    batch_id INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    batch_id INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    refused_ms INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES
    ('schema_version', 1), ('cursor', 0), ('assigned_upto', 0), ('next_batch_id', 1);
";

/// Largest part of a rejected payload kept in quarantine.
const QUARANTINE_PAYLOAD_MAX: usize = 4096;

/// What the ingest path hands the log.
#[derive(Debug, Clone)]
pub enum Entry {
    Reading(Reading),
    Rejected(Rejected),
}

/// A payload refused before it became a reading.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub topic: String,
    pub reason: &'static str,
    pub detail: String,
    pub payload: Bytes,
}

/// What one append did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub inserted: u64,
    pub duplicates: u64,
    pub quarantined: u64,
}

/// A batch built from the log and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxEntry {
    pub batch_id: u64,
    pub first_id: i64,
    pub last_id: i64,
    pub count: u64,
    pub created_ms: i64,
}

/// A summary of the log, for metrics and `kappa-edge log stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    pub readings: u64,
    pub backlog_readings: u64,
    pub oldest_unforwarded_received_ms: Option<i64>,
    pub cursor: i64,
    pub assigned_upto: i64,
    pub outbox_batches: u64,
    pub quarantined: u64,
    pub dead_letter_batches: u64,
    pub file_bytes: u64,
}

/// Readings not yet acknowledged by the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub readings: u64,
    pub oldest_received_ms: Option<i64>,
    pub file_bytes: u64,
}

/// The edge log. One value per connection; writers are serialized by the caller.
#[derive(Debug)]
pub struct EdgeLog {
    conn: Connection,
    quarantine_keep: u64,
}

impl EdgeLog {
    /// Opens (creating if needed) the log at `path` for reading and writing.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, LogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| LogError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.execute_batch(SCHEMA)?;
        let version: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            return Err(LogError::Corrupt(format!("log schema version {version}; this agent reads {SCHEMA_VERSION}")));
        }
        Ok(Self { conn, quarantine_keep: 10_000 })
    }

    /// Opens an existing log read-only (for inspection while the agent runs).
    pub fn open_read_only(path: &Path) -> Result<Self, LogError> {
        if !path.exists() {
            return Err(LogError::Io(format!("no edge log at {}", path.display())));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self { conn, quarantine_keep: 0 })
    }

    /// How many quarantined payloads to keep.
    pub fn set_quarantine_keep(&mut self, keep: u64) {
        self.quarantine_keep = keep;
    }

    /// Appends entries in one transaction: durable (per the configured
    /// durability) when this returns `Ok`.
    pub fn append(&mut self, entries: &[Entry], now_ms: i64) -> Result<AppendOutcome, LogError> {
        let mut out = AppendOutcome::default();
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO readings (device, boot, seq, ts_ms, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut quarantine = tx.prepare_cached(
                "INSERT INTO quarantine (received_ms, topic, reason, detail, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for entry in entries {
                match entry {
                    Entry::Reading(r) => {
                        let n = insert.execute(params![
                            r.device,
                            r.boot,
                            r.seq as i64,
                            r.ts_ms,
                            now_ms,
                            r.to_packed_cbor()
                        ])?;
                        if n == 1 {
                            out.inserted += 1;
                        } else {
                            out.duplicates += 1;
                        }
                    }
                    Entry::Rejected(q) => {
                        let payload = &q.payload[..q.payload.len().min(QUARANTINE_PAYLOAD_MAX)];
                        quarantine.execute(params![now_ms, q.topic, q.reason, q.detail, payload])?;
                        out.quarantined += 1;
                    }
                }
            }
        }
        if out.quarantined > 0 {
            tx.execute(
                "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?1",
                params![self.quarantine_keep as i64],
            )?;
        }
        tx.commit()?;
        Ok(out)
    }

    fn meta(&self, key: &str) -> Result<i64, LogError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
    }

    /// Batches built but not yet acknowledged, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, LogError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT batch_id, first_id, last_id, count, created_ms FROM outbox ORDER BY batch_id")?;
        let rows = stmt.query_map([], |r| {
            Ok(OutboxEntry {
                batch_id: r.get::<_, i64>(0)? as u64,
                first_id: r.get(1)?,
                last_id: r.get(2)?,
                count: r.get::<_, i64>(3)? as u64,
                created_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Readings not yet in any batch: how many (up to `limit`) and when the oldest arrived.
    pub fn unassigned(&self, limit: usize) -> Result<(usize, Option<i64>), LogError> {
        let upto = self.meta("assigned_upto")?;
        let oldest: Option<i64> = self
            .conn
            .query_row("SELECT received_ms FROM readings WHERE id > ?1 ORDER BY id LIMIT 1", [upto], |r| r.get(0))
            .optional()?;
        if oldest.is_none() {
            return Ok((0, None));
        }
        let count: i64 = self.conn.query_row(
            "SELECT count(*) FROM (SELECT 1 FROM readings WHERE id > ?1 ORDER BY id LIMIT ?2)",
            params![upto, limit as i64],
            |r| r.get(0),
        )?;
        Ok((count as usize, oldest))
    }

    /// Puts up to `max` unassigned readings into a new outbox batch.
    pub fn assign_batch(&mut self, max: usize, now_ms: i64) -> Result<Option<OutboxEntry>, LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let upto: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'assigned_upto'", [], |r| r.get(0))?;
        let (first, last, count): (Option<i64>, Option<i64>, i64) = tx.query_row(
            "SELECT min(id), max(id), count(*) FROM (SELECT id FROM readings WHERE id > ?1 ORDER BY id LIMIT ?2)",
            params![upto, max as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (Some(first_id), Some(last_id)) = (first, last) else { return Ok(None) };
        let batch_id: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_batch_id'", [], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO outbox (batch_id, first_id, last_id, count, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![batch_id, first_id, last_id, count, now_ms],
        )?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'assigned_upto'", [last_id])?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_batch_id'", [batch_id + 1])?;
        tx.commit()?;
        Ok(Some(OutboxEntry { batch_id: batch_id as u64, first_id, last_id, count: count as u64, created_ms: now_ms }))
    }

    /// The readings of an outbox batch, in log order.
    pub fn load_batch(&self, entry: &OutboxEntry) -> Result<Vec<Reading>, LogError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT id, body FROM readings WHERE id BETWEEN ?1 AND ?2 ORDER BY id")?;
        let mut rows = stmt.query(params![entry.first_id, entry.last_id])?;
        let mut out = Vec::with_capacity(entry.count as usize);
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let reading = Reading::from_cbor(&body)
                .map_err(|e| LogError::Corrupt(format!("reading {id} does not decode: {e}")))?;
            out.push(reading);
        }
        Ok(out)
    }

    /// The cloud durably accepted `batch_id`: drop it from the outbox and move
    /// the cursor past every reading that is now known to be in the cloud.
    pub fn complete_batch(&mut self, batch_id: u64) -> Result<(), LogError> {
        self.retire_batch(batch_id, None)
    }

    /// The cloud refused `batch_id` as invalid: keep its readings in the log
    /// (for export), record the refusal, and move on.
    pub fn dead_letter_batch(&mut self, batch_id: u64, reason: &str, now_ms: i64) -> Result<(), LogError> {
        self.retire_batch(batch_id, Some((reason, now_ms)))
    }

    fn retire_batch(&mut self, batch_id: u64, dead: Option<(&str, i64)>) -> Result<(), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some((reason, now_ms)) = dead {
            tx.execute(
                "INSERT OR REPLACE INTO dead_letters (batch_id, first_id, last_id, count, refused_ms, reason)
                 SELECT batch_id, first_id, last_id, count, ?2, ?3 FROM outbox WHERE batch_id = ?1",
                params![batch_id as i64, now_ms, reason],
            )?;
        }
        tx.execute("DELETE FROM outbox WHERE batch_id = ?1", [batch_id as i64])?;
        // Everything before the oldest batch still pending has been accepted.
        tx.execute(
            "UPDATE meta SET value = coalesce(
                (SELECT min(first_id) - 1 FROM outbox),
                (SELECT value FROM meta WHERE key = 'assigned_upto'))
             WHERE key = 'cursor'",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The cheap part of the summary, for periodic metrics: cost grows with
    /// the backlog, not the log.
    pub fn backlog(&self) -> Result<Backlog, LogError> {
        let cursor = self.meta("cursor")?;
        let readings: i64 =
            self.conn.query_row("SELECT count(*) FROM readings WHERE id > ?1", [cursor], |r| r.get(0))?;
        let oldest_received_ms = self
            .conn
            .query_row("SELECT received_ms FROM readings WHERE id > ?1 ORDER BY id LIMIT 1", [cursor], |r| r.get(0))
            .optional()?;
        let page_count: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(Backlog { readings: readings as u64, oldest_received_ms, file_bytes: (page_count * page_size) as u64 })
    }

    /// A summary for metrics and the CLI.
    pub fn stats(&self) -> Result<LogStats, LogError> {
        let cursor = self.meta("cursor")?;
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, LogError> {
            Ok(self.conn.query_row(sql, p, |r| r.get::<_, i64>(0))? as u64)
        };
        let page_count: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(LogStats {
            readings: count("SELECT count(*) FROM readings", &[])?,
            backlog_readings: count("SELECT count(*) FROM readings WHERE id > ?1", &[&cursor])?,
            oldest_unforwarded_received_ms: self
                .conn
                .query_row("SELECT received_ms FROM readings WHERE id > ?1 ORDER BY id LIMIT 1", [cursor], |r| r.get(0))
                .optional()?,
            cursor,
            assigned_upto: self.meta("assigned_upto")?,
            outbox_batches: count("SELECT count(*) FROM outbox", &[])?,
            quarantined: count("SELECT count(*) FROM quarantine", &[])?,
            dead_letter_batches: count("SELECT count(*) FROM dead_letters", &[])?,
            file_bytes: (page_count * page_size) as u64,
        })
    }

    /// Runs SQLite's integrity check and the log's own invariants.
    pub fn check(&self) -> Result<Vec<String>, LogError> {
        let mut problems = Vec::new();
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let row = row?;
            if row != "ok" {
                problems.push(format!("sqlite: {row}"));
            }
        }
        let cursor = self.meta("cursor")?;
        let upto = self.meta("assigned_upto")?;
        if cursor > upto {
            problems.push(format!("cursor {cursor} is past assigned_upto {upto}"));
        }
        let covered: i64 = self.conn.query_row("SELECT coalesce(sum(count), 0) FROM outbox", [], |r| r.get(0))?;
        let expected: i64 =
            self.conn
                .query_row("SELECT count(*) FROM readings WHERE id > ?1 AND id <= ?2", [cursor, upto], |r| r.get(0))?;
        if covered != expected {
            problems
                .push(format!("outbox covers {covered} readings but {expected} lie between cursor and assigned_upto"));
        }
        let mut bodies = self.conn.prepare("SELECT id, body FROM readings WHERE id > ?1 ORDER BY id")?;
        let mut rows = bodies.query([cursor])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            if let Err(e) = Reading::from_cbor(&body) {
                problems.push(format!("reading {id} does not decode: {e}"));
            }
        }
        Ok(problems)
    }

    /// Readings with `from_ms <= ts_ms < to_ms`, in log order, for export.
    pub fn export(
        &self,
        from_ms: i64,
        to_ms: i64,
        mut each: impl FnMut(Reading) -> std::io::Result<()>,
    ) -> Result<u64, LogError> {
        let mut stmt =
            self.conn.prepare("SELECT id, body FROM readings WHERE ts_ms >= ?1 AND ts_ms < ?2 ORDER BY id")?;
        let mut rows = stmt.query([from_ms, to_ms])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let reading = Reading::from_cbor(&body)
                .map_err(|e| LogError::Corrupt(format!("reading {id} does not decode: {e}")))?;
            each(reading).map_err(|e| LogError::Io(e.to_string()))?;
            n += 1;
        }
        Ok(n)
    }
}

/// A log connection shared by async tasks; every call runs on the blocking pool.
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<EdgeLog>>);

impl SharedLog {
    pub fn new(log: EdgeLog) -> Self {
        Self(Arc::new(Mutex::new(log)))
    }

    /// Runs `f` with the log on a blocking thread.
    pub async fn call<T, F>(&self, f: F) -> Result<T, LogError>
    where
        F: FnOnce(&mut EdgeLog) -> Result<T, LogError> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut log = inner.lock().map_err(|_| LogError::Io("log lock poisoned by an earlier panic".into()))?;
            f(&mut log)
        })
        .await
        .map_err(|e| LogError::Io(format!("log task failed: {e}")))?
    }
}

/// A log failure, classified so callers can decide what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The disk or database is full: stop acknowledging, retry later.
    #[error("edge log is full: {0}")]
    Full(String),
    /// Another connection held the database longer than the busy timeout: retry.
    #[error("edge log is busy: {0}")]
    Busy(String),
    #[error("edge log I/O error: {0}")]
    Io(String),
    #[error("edge log is damaged: {0}")]
    Corrupt(String),
    #[error("edge log error: {0}")]
    Sqlite(rusqlite::Error),
}

impl LogError {
    /// Whether trying again later can succeed (a full disk may free up; a
    /// busy database will be released). Anything else means the log is
    /// damaged or unusable: stop rather than limp on.
    pub fn is_transient(&self) -> bool {
        matches!(self, LogError::Full(_) | LogError::Busy(_) | LogError::Io(_))
    }
}

impl From<rusqlite::Error> for LogError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => LogError::Full(e.to_string()),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                LogError::Busy(e.to_string())
            }
            Some(rusqlite::ErrorCode::SystemIoFailure) => LogError::Io(e.to_string()),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                LogError::Corrupt(e.to_string())
            }
            _ => LogError::Sqlite(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn reading(device: &str, seq: u64) -> Reading {
        Reading {
            device: device.into(),
            boot: 1,
            seq,
            ts_ms: 1_767_225_600_000 + seq as i64 * 1000,
            schema: 2,
            metrics: [("temperature".to_string(), Some(20.0 + seq as f64))].into(),
            tags: BTreeMap::new(),
        }
    }

    fn open() -> (tempfile::TempDir, EdgeLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(&dir.path().join("log.sqlite"), Durability::Normal).unwrap();
        (dir, log)
    }

    fn entries(device: &str, seqs: std::ops::Range<u64>) -> Vec<Entry> {
        seqs.map(|s| Entry::Reading(reading(device, s))).collect()
    }

    #[test]
    fn a_resent_reading_is_stored_once() {
        let (_d, mut log) = open();
        let out = log.append(&entries("a", 1..4), 0).unwrap();
        assert_eq!(out, AppendOutcome { inserted: 3, duplicates: 0, quarantined: 0 });
        let out = log.append(&entries("a", 2..5), 0).unwrap();
        assert_eq!(out, AppendOutcome { inserted: 1, duplicates: 2, quarantined: 0 });
        assert_eq!(log.stats().unwrap().readings, 4);
    }

    #[test]
    fn a_batch_covers_the_same_rows_when_loaded_again() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..11), 0).unwrap();
        let b = log.assign_batch(4, 0).unwrap().unwrap();
        assert_eq!((b.batch_id, b.count), (1, 4));
        let first = log.load_batch(&b).unwrap();
        log.append(&entries("b", 1..3), 0).unwrap();
        assert_eq!(log.load_batch(&b).unwrap(), first);
        assert_eq!(log.outbox().unwrap(), vec![b]);
    }

    #[test]
    fn cursor_moves_only_past_batches_with_no_earlier_one_pending() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..10), 0).unwrap();
        let b1 = log.assign_batch(3, 0).unwrap().unwrap();
        let b2 = log.assign_batch(3, 0).unwrap().unwrap();
        log.complete_batch(b2.batch_id).unwrap();
        assert_eq!(log.stats().unwrap().cursor, 0, "b1 is still pending");
        log.complete_batch(b1.batch_id).unwrap();
        let s = log.stats().unwrap();
        assert_eq!((s.cursor, s.backlog_readings), (6, 3));
        assert!(log.check().unwrap().is_empty());
    }

    #[test]
    fn the_outbox_and_cursor_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let b = {
            let mut log = EdgeLog::open(&path, Durability::Full).unwrap();
            log.append(&entries("a", 1..6), 0).unwrap();
            let b = log.assign_batch(2, 0).unwrap().unwrap();
            log.complete_batch(b.batch_id).unwrap();
            log.assign_batch(2, 0).unwrap().unwrap()
        };
        let log = EdgeLog::open(&path, Durability::Full).unwrap();
        assert_eq!(log.outbox().unwrap(), vec![b]);
        assert_eq!(log.stats().unwrap().cursor, 2);
        assert_eq!(log.unassigned(100).unwrap().0, 1);
    }

    #[test]
    fn a_refused_batch_is_dead_lettered_and_the_cursor_moves_on() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..3), 0).unwrap();
        let b = log.assign_batch(10, 0).unwrap().unwrap();
        log.dead_letter_batch(b.batch_id, "cloud said no", 5).unwrap();
        let s = log.stats().unwrap();
        assert_eq!((s.cursor, s.dead_letter_batches, s.readings), (2, 1, 2));
    }

    #[test]
    fn quarantine_keeps_only_the_newest() {
        let (_d, mut log) = open();
        log.set_quarantine_keep(3);
        let bad = |i: usize| {
            Entry::Rejected(Rejected {
                topic: format!("devices/x{i}/telemetry"),
                reason: "malformed_cbor",
                detail: "bad".into(),
                payload: Bytes::from_static(b"\xff"),
            })
        };
        log.append(&(0..5).map(bad).collect::<Vec<_>>(), 0).unwrap();
        assert_eq!(log.stats().unwrap().quarantined, 3);
    }

    #[test]
    fn export_selects_by_event_time() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..11), 0).unwrap();
        let mut seqs = Vec::new();
        let from = reading("a", 3).ts_ms;
        let n = log
            .export(from, from + 3000, |r| {
                seqs.push(r.seq);
                Ok(())
            })
            .unwrap();
        assert_eq!((n, seqs), (3, vec![3, 4, 5]));
    }
}
