//! The agent's durable log: SQLite in WAL mode, one writer.
//!
//! On-disk format (schema version 1):
//!
//! * `readings(id, device, boot, seq, ts_ms, received_ms, body, fwd, dev_ts)`:
//!   every accepted reading, `id` strictly increasing (AUTOINCREMENT, never
//!   reused), `body` the reading in packed CBOR. `(dev_ts, device, boot, seq)`
//!   is unique, `dev_ts` being the timestamp the device sent: a resend
//!   carries the same one, so it is stored once, and because the key leads
//!   with time, a commit's inserts land together at the end of the index
//!   instead of dirtying one index page per device.
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

use self::config::Durability;

mod aggregates;
mod budget;
pub mod config;
mod dead_letters;
mod inspect;
mod outbox;
mod schema;

pub use aggregates::FoldStep;
pub use budget::{Class, Usage};
use dead_letters::FWD_DEAD;
pub use dead_letters::{DeadLetter, Released, Which};
use outbox::{outbox_entry, recompute_pointers, retire};
use schema::{MIGRATE_1_TO_2, MIGRATE_2_TO_3, SCHEMA, SCHEMA_VERSION};

/// Largest part of a rejected payload kept in quarantine.
const QUARANTINE_PAYLOAD_MAX: usize = 4096;

/// What the ingest path hands the log.
#[derive(Debug, Clone)]
pub enum Entry {
    Reading(Reading),
    /// A reading whose timestamp the clock policy replaced; `device_ts` is
    /// what the device sent, so a resend is still recognised.
    Corrected {
        reading: Reading,
        device_ts: i64,
    },
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

/// What a batch carries: raw readings, or pre-aggregated windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// `first_id..=last_id` are reading ids; the batch holds those marked for forwarding.
    Readings,
    /// `first_id..=last_id` are ids in the `aggregates` table.
    Aggregates,
    /// Local raw readings sent on request (`kappa-edge log backfill`): those
    /// in `first_id..=last_id` marked `fwd = 3`. The cursor ignores these.
    Backfill,
}

impl BatchKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Readings => "readings",
            Self::Aggregates => "aggregates",
            Self::Backfill => "backfill",
        }
    }
}

/// A batch built from the log and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxEntry {
    pub batch_id: u64,
    pub kind: BatchKind,
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
    pub dead_letter_readings: u64,
    pub file_bytes: u64,
    pub used_bytes: u64,
    pub wal_bytes: u64,
}

/// Readings not yet acknowledged by the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub readings: u64,
    /// Estimated: `readings` times the mean body size of the newest 1,000 readings.
    pub bytes: u64,
    pub oldest_received_ms: Option<i64>,
    pub file_bytes: u64,
}

/// The edge log. One value per connection; writers are serialized by the caller.
#[derive(Debug)]
pub struct EdgeLog {
    conn: Connection,
    quarantine_keep: u64,
    /// Pre-aggregation runs: readings go into batches only once folded.
    folding: bool,
}

impl EdgeLog {
    /// Opens (creating if needed) the log at `path` for reading and writing.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, LogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| LogError::Io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Only takes effect on a new database (before its first table): pages
        // freed by pruning and shedding can then go back to the filesystem.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "journal_size_limit", budget::WAL_SIZE_LIMIT)?;
        conn.pragma_update(None, "synchronous", durability.synchronous())?;
        let existing: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .optional()
            .or_else(|e| if e.to_string().contains("no such table") { Ok(None) } else { Err(e) })?;
        if existing == Some(1) {
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATE_1_TO_2} COMMIT;"))?;
        }
        if matches!(existing, Some(1 | 2)) {
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {MIGRATE_2_TO_3} COMMIT;"))?;
        }
        conn.execute_batch(SCHEMA)?;
        let version: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            return Err(LogError::Corrupt(format!("log schema version {version}; this agent reads {SCHEMA_VERSION}")));
        }
        Ok(Self { conn, quarantine_keep: 10_000, folding: false })
    }

    /// Opens an existing log read-only (for inspection while the agent runs).
    pub fn open_read_only(path: &Path) -> Result<Self, LogError> {
        if !path.exists() {
            return Err(LogError::Io(format!("no edge log at {}", path.display())));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self { conn, quarantine_keep: 0, folding: false })
    }

    /// With pre-aggregation on, a reading is put in a batch only after the
    /// aggregator has folded it (and decided whether its raw form is forwarded).
    pub fn set_folding(&mut self, on: bool) {
        self.folding = on;
    }

    /// The page cache of this connection (its hot pages; the rest are read
    /// back from the file, usually from the OS's cache).
    pub fn set_cache_bytes(&mut self, bytes: u64) -> Result<(), LogError> {
        self.conn.pragma_update(None, "cache_size", -((bytes / 1024) as i64))?;
        Ok(())
    }

    /// Makes this connection the one that checkpoints the WAL as it grows:
    /// every 16 MiB, so the hot pages many commits rewrite reach the
    /// database file once, not once per 4 MiB (SQLite's default).
    pub fn set_checkpointing(&mut self) -> Result<(), LogError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 4096)?;
        Ok(())
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
                "INSERT OR IGNORE INTO readings (device, boot, seq, ts_ms, received_ms, body, dev_ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut quarantine = tx.prepare_cached(
                "INSERT INTO quarantine (received_ms, topic, reason, detail, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for entry in entries {
                let (r, dev_ts) = match entry {
                    Entry::Reading(r) => (r, r.ts_ms),
                    Entry::Corrected { reading, device_ts } => (reading, *device_ts),
                    Entry::Rejected(q) => {
                        let payload = &q.payload[..q.payload.len().min(QUARANTINE_PAYLOAD_MAX)];
                        quarantine.execute(params![now_ms, q.topic, q.reason, q.detail, payload])?;
                        out.quarantined += 1;
                        continue;
                    }
                };
                let n = insert.execute(params![
                    r.device,
                    r.boot,
                    r.seq as i64,
                    r.ts_ms,
                    now_ms,
                    r.to_packed_cbor(),
                    dev_ts
                ])?;
                if n == 1 {
                    out.inserted += 1;
                } else {
                    out.duplicates += 1;
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

    pub(super) fn meta(&self, key: &str) -> Result<i64, LogError> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?)
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
pub(crate) mod tests {
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

    pub(super) fn open() -> (tempfile::TempDir, EdgeLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(&dir.path().join("log.sqlite"), Durability::Normal).unwrap();
        (dir, log)
    }

    pub(crate) fn entries(device: &str, seqs: std::ops::Range<u64>) -> Vec<Entry> {
        seqs.map(|s| Entry::Reading(reading(device, s))).collect()
    }

    #[test]
    fn a_version_1_log_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        let v1 = Connection::open(&path).unwrap();
        v1.execute_batch(
            "CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, boot INTEGER NOT NULL,
                 seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL, body BLOB NOT NULL,
                 UNIQUE (device, boot, seq));
             CREATE TABLE quarantine (id INTEGER PRIMARY KEY AUTOINCREMENT, received_ms INTEGER NOT NULL,
                 topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL);
             CREATE TABLE outbox (batch_id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, last_id INTEGER NOT NULL,
                 count INTEGER NOT NULL, created_ms INTEGER NOT NULL);
             CREATE TABLE dead_letters (batch_id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL,
                 last_id INTEGER NOT NULL, count INTEGER NOT NULL, refused_ms INTEGER NOT NULL, reason TEXT NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('schema_version', 1), ('cursor', 0), ('assigned_upto', 2), ('next_batch_id', 2);
             INSERT INTO outbox VALUES (1, 1, 2, 2, 0);",
        )
        .unwrap();
        for seq in 1..=3 {
            let r = reading("a", seq);
            v1.execute(
                "INSERT INTO readings (device, boot, seq, ts_ms, received_ms, body) VALUES ('a', 1, ?1, ?2, 0, ?3)",
                params![seq as i64, r.ts_ms, r.to_packed_cbor()],
            )
            .unwrap();
        }
        // The newest reading was shed: its id must not come back.
        v1.execute("DELETE FROM readings WHERE id = 3", []).unwrap();
        drop(v1);
        let mut log = EdgeLog::open(&path, Durability::Normal).unwrap();
        assert_eq!(log.meta("schema_version").unwrap(), SCHEMA_VERSION);
        log.append(&entries("b", 1..2), 0).unwrap();
        let ids: Vec<i64> = log
            .conn
            .prepare("SELECT id FROM readings ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, vec![1, 2, 4], "ids are never reused across the migration");
        // A resend of a migrated reading is still recognised.
        assert_eq!(log.append(&entries("a", 1..2), 0).unwrap().duplicates, 1);
        let pending = log.outbox().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].kind, log.load_batch(&pending[0]).unwrap().len()), (BatchKind::Readings, 2));
        assert!(log.check().unwrap().is_empty(), "{:?}", log.check());
        assert_eq!(log.assign_batch(10, 0).unwrap().map(|b| b.count), Some(1));
    }

    #[test]
    fn a_resend_of_a_clock_corrected_reading_is_stored_once() {
        let (_d, mut log) = open();
        let device_ts = 4_070_908_800_000; // 2099: the device clock is off
        let corrected = |now: i64| {
            let mut r = reading("a", 1);
            r.ts_ms = now;
            Entry::Corrected { reading: r, device_ts }
        };
        assert_eq!(log.append(&[corrected(1_000)], 0).unwrap().inserted, 1);
        // The resend arrives later, so its corrected time differs; its device time does not.
        let again = log.append(&[corrected(9_000)], 0).unwrap();
        assert_eq!((again.inserted, again.duplicates), (0, 1));
    }

    #[test]
    fn backfill_sends_local_readings_of_a_time_range_once_and_leaves_the_cursor_alone() {
        let (_d, mut log) = open();
        log.set_folding(true);
        log.append(&entries("a", 1..21), 0).unwrap();
        // Aggregate mode: every reading folded and kept local.
        let step = FoldStep { from: 0, upto: 20, forward_only: Some(vec![]), ..Default::default() };
        log.commit_fold(&step, 0).unwrap();
        let passed = log.assign_batch(100, 0).unwrap().unwrap();
        assert_eq!(passed.count, 0);
        log.complete_batch(passed.batch_id).unwrap();
        let cursor = log.stats().unwrap().cursor;

        let from = reading("a", 5).ts_ms;
        assert_eq!(log.request_backfill(from, from + 10_000, 4, 0).unwrap(), (3, 10));
        let pending = log.outbox().unwrap();
        assert!(pending.iter().all(|b| b.kind == BatchKind::Backfill));
        let seqs: Vec<u64> = pending.iter().flat_map(|b| log.load_batch(b).unwrap()).map(|r| r.seq).collect();
        assert_eq!(seqs, (5..15).collect::<Vec<_>>());
        for b in pending {
            log.complete_batch(b.batch_id).unwrap();
        }
        assert_eq!(log.stats().unwrap().cursor, cursor, "backfill does not move the cursor");
        assert_eq!(log.request_backfill(from, from + 10_000, 4, 0).unwrap(), (0, 0), "sent once");
        assert!(log.check().unwrap().is_empty());
    }

    /// Found by the model test (edge/tests/log_model.rs): retention pruned
    /// the readings of a backfill batch before it was sent.
    #[test]
    fn a_pending_backfill_batch_is_not_pruned_before_it_is_sent() {
        let (_d, mut log) = open();
        log.set_folding(true);
        log.append(&entries("a", 1..11), 0).unwrap();
        let step = FoldStep { from: 0, upto: 10, forward_only: Some(vec![]), ..Default::default() };
        log.commit_fold(&step, 0).unwrap();
        let passed = log.assign_batch(100, 0).unwrap().unwrap();
        log.complete_batch(passed.batch_id).unwrap();
        let from = reading("a", 1).ts_ms;
        assert_eq!(log.request_backfill(from, from + 100_000, 100, 0).unwrap(), (1, 10));
        // Everything is behind the cursor: retention may prune what is not pending.
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 0, "the backfill batch's readings stay");
        assert_eq!(log.expire(Class::Raw, i64::MAX).unwrap(), (0, 0), "nor does a ttl take them");
        let pending = log.outbox().unwrap();
        assert_eq!(log.load_batch(&pending[0]).unwrap().len(), 10);
        log.complete_batch(pending[0].batch_id).unwrap();
        assert_eq!(log.prune_forwarded(None, 100).unwrap(), 10, "sent, they go");
    }

    /// Found by the model test: with pipelining, a later batch can complete
    /// before an earlier one; that is no broken invariant.
    #[test]
    fn log_check_accepts_batches_completed_out_of_order() {
        let (_d, mut log) = open();
        log.append(&entries("a", 1..7), 0).unwrap();
        let first = log.assign_batch(3, 0).unwrap().unwrap();
        let second = log.assign_batch(3, 0).unwrap().unwrap();
        log.complete_batch(second.batch_id).unwrap();
        assert!(log.check().unwrap().is_empty(), "{:?}", log.check().unwrap());
        log.complete_batch(first.batch_id).unwrap();
        assert!(log.check().unwrap().is_empty());
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
