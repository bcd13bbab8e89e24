//! The embedded event log: one SQLite database, group-committed by one writer thread.
//!
//! On-disk format (schema version 1):
//!
//! * `log(partition, offset, value, appended_ms)`, primary key `(partition,
//!   offset)`: the records; offsets dense from 0 per partition. Retention
//!   deletes old records once they are archived and consumed, but never a
//!   partition's newest, so offsets are never reused.
//! * `batches(gateway, batch_id, appended_ms, records)`: every gateway batch
//!   ever appended, written in the same transaction as its records, so a
//!   resent batch is recognised and not appended twice.
//! * `meta(key, value)`: `schema_version`, `partitions` (fixed at creation).
//! * `holes(partition, start, end, found_ms)`: offsets `start..end` that will
//!   never hold a record. A log that lost its last commits (a power cut under
//!   `durability = "normal"`) can end before offsets its readers already
//!   checkpointed; the node then appends after them and records the hole
//!   ([`SqliteLog::append_after`]), so a reader neither skips new records
//!   nor stops at the missing ones.
//!
//! The writer takes every append request waiting, commits them in one
//! transaction (one fsync under `durability = "full"`), and only then answers
//! each request. A failed commit answers every request in it with
//! [`EventLogError::Unavailable`] and appends nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kappa_common::partition::partition_for;
use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{mpsc, oneshot};

use super::config::Durability;
use super::{AppendBatch, AppendOutcome, ConsumedRecord, EventLogError, LogAppender, LogSource, Offset, Partition};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    value BLOB NOT NULL,
    appended_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    gateway TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    appended_ms INTEGER NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (gateway, batch_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS holes (
    partition INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    found_ms INTEGER NOT NULL,
    PRIMARY KEY (partition, start)
) WITHOUT ROWID;
";

/// Offsets `start..end` of `partition` that hold no record and never will:
/// they were handed out by commits the log lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub partition: Partition,
    pub start: Offset,
    pub end: Offset,
}

/// Most append requests folded into one transaction.
const MAX_REQUESTS_PER_COMMIT: usize = 256;

/// Wakes sources when new records are committed.
#[derive(Debug, Default)]
struct Signal {
    version: Mutex<u64>,
    cond: Condvar,
}

impl Signal {
    fn bump(&self) {
        if let Ok(mut v) = self.version.lock() {
            *v += 1;
            self.cond.notify_all();
        }
    }

    fn current(&self) -> u64 {
        self.version.lock().map(|v| *v).unwrap_or_default()
    }

    /// Waits until the version moves past `seen` or `timeout` passes.
    fn wait_past(&self, seen: u64, timeout: Duration) {
        if let Ok(guard) = self.version.lock() {
            let _ = self.cond.wait_timeout_while(guard, timeout, |v| *v == seen);
        }
    }
}

/// An opened embedded log: hands out one appender and any number of sources
/// (a clone shares the wake-ups of the original's appender).
#[derive(Debug, Clone)]
pub struct SqliteLog {
    path: PathBuf,
    partitions: u32,
    durability: Durability,
    signal: Arc<Signal>,
}

impl SqliteLog {
    /// Opens (creating if needed) the log at `path` with `partitions` partitions.
    pub fn open(path: &Path, partitions: u32, durability: Durability) -> Result<Self, EventLogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| EventLogError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = connect(path, durability)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        // Logs written before retention existed lack the append time.
        let has_time: bool = conn
            .query_row("SELECT count(*) > 0 FROM pragma_table_info('log') WHERE name = 'appended_ms'", [], |r| r.get(0))
            .map_err(unavailable)?;
        if !has_time {
            conn.execute_batch("ALTER TABLE log ADD COLUMN appended_ms INTEGER NOT NULL DEFAULT 0")
                .map_err(unavailable)?;
        }
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('partitions', ?1)",
            [partitions],
        )
        .map_err(unavailable)?;
        let stored: u32 =
            conn.query_row("SELECT value FROM meta WHERE key = 'partitions'", [], |r| r.get(0)).map_err(unavailable)?;
        if stored != partitions {
            return Err(EventLogError::Inconsistent(format!(
                "the log at {} was created with {stored} partitions but log.partitions is {partitions}; \
                 partitions of an existing log cannot change",
                path.display()
            )));
        }
        Ok(Self { path: path.to_path_buf(), partitions, durability, signal: Arc::default() })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Deletes records appended before `older_than_ms` whose offset is below
    /// `below[partition]` (what the archive holds and every reader has
    /// passed), keeping each partition's newest record so offsets are never
    /// reused. Returns how many records were deleted.
    pub fn apply_retention(
        path: &Path,
        below: &BTreeMap<Partition, Offset>,
        older_than_ms: i64,
    ) -> Result<u64, EventLogError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable)?;
        let mut deleted = 0;
        for (p, bound) in below {
            deleted += conn
                .execute(
                    "DELETE FROM log WHERE partition = ?1 AND offset < ?2 AND appended_ms < ?3
                     AND offset < (SELECT max(offset) FROM log WHERE partition = ?1)",
                    params![p, *bound as i64, older_than_ms],
                )
                .map_err(unavailable)? as u64;
        }
        Ok(deleted)
    }

    /// Records held and the oldest offset still in the log, per partition.
    pub fn held_at(path: &Path) -> Result<BTreeMap<Partition, (u64, Option<Offset>)>, EventLogError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(unavailable)?;
        let mut stmt =
            conn.prepare("SELECT partition, count(*), min(offset) FROM log GROUP BY partition").map_err(unavailable)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, u32>(0)?, (r.get::<_, i64>(1)? as u64, r.get::<_, Option<i64>>(2)?.map(|o| o as u64))))
            })
            .map_err(unavailable)?;
        rows.collect::<Result<_, _>>().map_err(unavailable)
    }

    /// The next offset of every partition of the log at `path`, read-only
    /// (for tools that run beside a node).
    pub fn end_offsets_at(path: &Path) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable)?;
        let partitions: u32 =
            conn.query_row("SELECT value FROM meta WHERE key = 'partitions'", [], |r| r.get(0)).map_err(unavailable)?;
        next_offsets(&conn, partitions).map(|v| v.into_iter().enumerate().map(|(p, o)| (p as Partition, o)).collect())
    }

    /// Makes every partition append at or after `readers_at[partition]`, the
    /// furthest any reader (a pipeline's checkpoint, the archive) has already
    /// got. A log that ends before that lost commits after its readers saw
    /// them (a power cut under `durability = "normal"`): records appended at
    /// those offsets again would be skipped by the readers. The offsets
    /// between the log's end and the readers are recorded as a hole,
    /// durably (`synchronous=FULL`) before anything is appended after it,
    /// and returned. Call before [`Self::start_writer`].
    pub fn append_after(&self, readers_at: &BTreeMap<Partition, Offset>) -> Result<Vec<Hole>, EventLogError> {
        let mut conn = connect(&self.path, Durability::Full)?;
        let next = next_offsets(&conn, self.partitions)?;
        let holes: Vec<Hole> = next
            .iter()
            .enumerate()
            .filter_map(|(p, &start)| {
                let end = readers_at.get(&(p as Partition)).copied().unwrap_or(0);
                (end > start).then_some(Hole { partition: p as Partition, start, end })
            })
            .collect();
        if holes.is_empty() {
            return Ok(holes);
        }
        let tx = conn.transaction().map_err(unavailable)?;
        for h in &holes {
            tx.execute(
                "INSERT INTO holes (partition, start, end, found_ms) VALUES (?1, ?2, ?3, ?4)",
                params![h.partition, h.start as i64, h.end as i64, crate::now_ms()],
            )
            .map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        for h in &holes {
            tracing::error!(
                partition = h.partition,
                log_end = h.start,
                readers_at = h.end,
                "The event log ends before offsets its readers already processed: it lost commits (as a power cut does under log.durability = normal). New records go after them; the offsets between are recorded as a hole."
            );
        }
        Ok(holes)
    }

    /// Starts the writer thread; at most `queue` appends wait for it.
    pub fn start_writer(&self, queue: usize) -> Result<SqliteAppender, EventLogError> {
        let mut conn = connect(&self.path, self.durability)?;
        let next = next_offsets(&conn, self.partitions)?;
        let (tx, rx) = mpsc::channel(queue);
        let (signal, partitions) = (self.signal.clone(), self.partitions);
        std::thread::Builder::new()
            .name("eventlog-writer".into())
            .spawn(move || writer_loop(&mut conn, rx, next, partitions, &signal))
            .map_err(|e| EventLogError::Unavailable(format!("cannot start the log writer: {e}")))?;
        Ok(SqliteAppender { tx })
    }

    /// A source over every partition, starting at offset 0.
    pub fn source(&self) -> Result<SqliteSource, EventLogError> {
        let conn =
            Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable)?;
        Ok(SqliteSource {
            conn,
            positions: (0..self.partitions).map(|p| (p, 0)).collect(),
            at_end: vec![false; self.partitions as usize],
            next_partition: 0,
            signal: self.signal.clone(),
            hole_offsets_passed: 0,
        })
    }
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, EventLogError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(unavailable)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", durability.synchronous()).map_err(unavailable)?;
    Ok(conn)
}

fn unavailable(e: rusqlite::Error) -> EventLogError {
    EventLogError::Unavailable(e.to_string())
}

/// The offset the next record of each partition gets: after its newest
/// record and after its last hole.
fn next_offsets(conn: &Connection, partitions: u32) -> Result<Vec<Offset>, EventLogError> {
    let mut stmt = conn.prepare("SELECT max(offset) FROM log WHERE partition = ?1").map_err(unavailable)?;
    let holes = holes(conn)?;
    (0..partitions)
        .map(|p| {
            let max: Option<i64> = stmt.query_row([p], |r| r.get(0)).map_err(unavailable)?;
            let after_holes = holes.iter().filter(|h| h.partition == p).map(|h| h.end).max().unwrap_or(0);
            Ok(max.map_or(0, |m| m as u64 + 1).max(after_holes))
        })
        .collect()
}

/// Whether recorded holes of `partition` (one, or several end to end: a log
/// that lost commits at more than one start) cover every offset of `from..to`.
fn holes_cover(holes: &[Hole], partition: Partition, from: Offset, to: Offset) -> bool {
    let mut mine: Vec<&Hole> = holes.iter().filter(|h| h.partition == partition).collect();
    mine.sort_by_key(|h| h.start);
    let mut at = from;
    for h in mine {
        if h.start <= at && at < h.end {
            at = h.end;
        }
    }
    at >= to
}

/// Every recorded hole (none in a log from before holes were recorded).
fn holes(conn: &Connection) -> Result<Vec<Hole>, EventLogError> {
    let recorded: bool = conn
        .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'holes'", [], |r| r.get(0))
        .map_err(unavailable)?;
    if !recorded {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare("SELECT partition, start, end FROM holes").map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Hole { partition: r.get(0)?, start: r.get::<_, i64>(1)? as u64, end: r.get::<_, i64>(2)? as u64 })
        })
        .map_err(unavailable)?;
    rows.collect::<Result<_, _>>().map_err(unavailable)
}

struct AppendRequest {
    batch: AppendBatch,
    reply: oneshot::Sender<Result<AppendOutcome, EventLogError>>,
}

/// The ingest side of the embedded log.
#[derive(Debug, Clone)]
pub struct SqliteAppender {
    tx: mpsc::Sender<AppendRequest>,
}

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendRequest")
            .field("gateway", &self.batch.gateway)
            .field("batch_id", &self.batch.batch_id)
            .finish()
    }
}

impl LogAppender for SqliteAppender {
    async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, EventLogError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(AppendRequest { batch, reply })
            .map_err(|_| EventLogError::Unavailable("the log writer is saturated; retry shortly".into()))?;
        answer.await.map_err(|_| EventLogError::Unavailable("the log writer stopped".into()))?
    }
}

fn writer_loop(
    conn: &mut Connection,
    mut rx: mpsc::Receiver<AppendRequest>,
    mut next: Vec<Offset>,
    partitions: u32,
    signal: &Signal,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut requests = vec![first];
        while requests.len() < MAX_REQUESTS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        match commit(conn, &requests, &next, partitions) {
            Ok((outcomes, new_next)) => {
                next = new_next;
                signal.bump();
                for (req, outcome) in requests.into_iter().zip(outcomes) {
                    let _ = req.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = requests.len(), "Event log commit failed; the batches were not appended.");
                for req in requests {
                    let _ = req.reply.send(Err(EventLogError::Unavailable(e.to_string())));
                }
            }
        }
    }
}

/// One transaction for all `requests`. Offsets advance only if it commits.
fn commit(
    conn: &mut Connection,
    requests: &[AppendRequest],
    next: &[Offset],
    partitions: u32,
) -> Result<(Vec<AppendOutcome>, Vec<Offset>), rusqlite::Error> {
    let mut next = next.to_vec();
    let mut outcomes = Vec::with_capacity(requests.len());
    let mut seen: HashSet<(&str, u64)> = HashSet::new();
    let now = crate::now_ms();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut exists = tx.prepare_cached("SELECT 1 FROM batches WHERE gateway = ?1 AND batch_id = ?2")?;
        let mut record_batch =
            tx.prepare_cached("INSERT INTO batches (gateway, batch_id, appended_ms, records) VALUES (?1, ?2, ?3, ?4)")?;
        let mut insert =
            tx.prepare_cached("INSERT INTO log (partition, offset, value, appended_ms) VALUES (?1, ?2, ?3, ?4)")?;
        for req in requests {
            let b = &req.batch;
            let key = (b.gateway.as_str(), b.batch_id);
            if seen.contains(&key) || exists.exists(params![b.gateway, b.batch_id as i64])? {
                outcomes.push(AppendOutcome::Duplicate);
                continue;
            }
            seen.insert(key);
            for rec in &b.records {
                let p = match rec.partition {
                    Some(p) if p < partitions => p,
                    _ => partition_for(&rec.key, partitions),
                };
                let offset = next[p as usize];
                insert.execute(params![p, offset as i64, rec.value, now])?;
                next[p as usize] = offset + 1;
            }
            record_batch.execute(params![b.gateway, b.batch_id as i64, now, b.records.len() as i64])?;
            outcomes.push(AppendOutcome::Appended { records: b.records.len() });
        }
    }
    tx.commit()?;
    Ok((outcomes, next))
}

/// The read side of the embedded log: every partition is assigned.
#[derive(Debug)]
pub struct SqliteSource {
    conn: Connection,
    positions: Vec<(Partition, Offset)>,
    /// Partitions whose last read came back short (at the end of the log).
    at_end: Vec<bool>,
    next_partition: usize,
    signal: Arc<Signal>,
    /// Offsets of recorded holes read past so far.
    hole_offsets_passed: u64,
}

impl SqliteSource {
    /// Offsets of recorded holes (commits the log lost) this source read past.
    pub fn hole_offsets_passed(&self) -> u64 {
        self.hole_offsets_passed
    }

    fn read(&mut self, max: usize) -> Result<Vec<ConsumedRecord>, EventLogError> {
        let n = self.positions.len().max(1);
        // Fair share per partition, starting from a rotating partition.
        let share = max.div_ceil(n).max(1);
        let mut out = Vec::new();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT offset, value FROM log WHERE partition = ?1 AND offset >= ?2 ORDER BY offset LIMIT ?3",
            )
            .map_err(unavailable)?;
        for i in 0..n {
            let idx = (self.next_partition + i) % n;
            let (p, from) = self.positions[idx];
            let mut rows = stmt.query(params![p, from as i64, share as i64]).map_err(unavailable)?;
            let mut got = 0;
            while let Some(row) = rows.next().map_err(unavailable)? {
                let offset = row.get::<_, i64>(0).map_err(unavailable)? as u64;
                // Offsets are dense but for recorded holes: a record past the
                // next one means the ones between were deleted (retention)
                // before this reader read them. Never skip them silently.
                let expected = self.positions[idx].1;
                if offset != expected {
                    if !holes_cover(&holes(&self.conn)?, p, expected, offset) {
                        return Err(EventLogError::Gap { partition: p, expected, found: offset });
                    }
                    self.hole_offsets_passed += offset - expected;
                    tracing::warn!(
                        partition = p,
                        from = expected,
                        to = offset,
                        "A reader passed a hole in the event log: offsets the log lost in a power cut, recorded when the node started."
                    );
                }
                let value: Vec<u8> = row.get(1).map_err(unavailable)?;
                self.positions[idx].1 = offset + 1;
                out.push(ConsumedRecord { partition: p, offset, value: value.into() });
                got += 1;
            }
            self.at_end[idx] = got < share;
            if out.len() >= max {
                break;
            }
        }
        self.next_partition = (self.next_partition + 1) % n;
        Ok(out)
    }
}

impl LogSource for SqliteSource {
    fn assigned(&self) -> Vec<Partition> {
        self.positions.iter().map(|(p, _)| *p).collect()
    }

    fn seek(&mut self, partition: Partition, offset: Offset) {
        if let Some(i) = self.positions.iter().position(|(p, _)| *p == partition) {
            self.positions[i].1 = offset;
            self.at_end[i] = false;
        }
    }

    fn caught_up(&self, partition: Partition) -> bool {
        self.positions.iter().position(|(p, _)| *p == partition).is_some_and(|i| self.at_end[i])
    }

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        let seen = self.signal.current();
        let out = self.read(max)?;
        if !out.is_empty() {
            return Ok(out);
        }
        self.signal.wait_past(seen, timeout);
        self.read(max)
    }

    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT max(offset) FROM log WHERE partition = ?1").map_err(unavailable)?;
        self.positions
            .iter()
            .map(|(p, _)| {
                let max: Option<i64> = stmt.query_row([p], |r| r.get(0)).map_err(unavailable)?;
                Ok((*p, max.map_or(0, |m| m as u64 + 1)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::AppendRecord;

    fn batch(gw: &str, id: u64, keys: &[&str]) -> AppendBatch {
        AppendBatch {
            gateway: gw.into(),
            batch_id: id,
            records: keys
                .iter()
                .map(|k| AppendRecord { key: k.to_string(), partition: None, value: k.as_bytes().to_vec() })
                .collect(),
        }
    }

    #[tokio::test]
    async fn appended_records_come_back_in_offset_order_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("log.sqlite"), 4, Durability::Normal).unwrap();
        let appender = log.start_writer(8).unwrap();
        let keys: Vec<String> = (0..50).map(|i| format!("dev-{}", i % 7)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(appender.append(batch("gw", 1, &keys)).await.unwrap(), AppendOutcome::Appended { records: 50 });
        let mut src = log.source().unwrap();
        let recs =
            tokio::task::spawn_blocking(move || src.poll(1000, Duration::from_millis(10)).unwrap()).await.unwrap();
        assert_eq!(recs.len(), 50);
        for p in 0..4 {
            let offs: Vec<u64> = recs.iter().filter(|r| r.partition == p).map(|r| r.offset).collect();
            assert_eq!(offs, (0..offs.len() as u64).collect::<Vec<_>>(), "partition {p}");
        }
        for r in &recs {
            assert_eq!(r.partition, partition_for(std::str::from_utf8(&r.value).unwrap(), 4));
        }
    }

    #[tokio::test]
    async fn a_resent_batch_is_not_appended_twice_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        {
            let log = SqliteLog::open(&path, 2, Durability::Full).unwrap();
            let a = log.start_writer(8).unwrap();
            assert_eq!(a.append(batch("gw", 7, &["x", "y"])).await.unwrap(), AppendOutcome::Appended { records: 2 });
            assert_eq!(a.append(batch("gw", 7, &["x", "y"])).await.unwrap(), AppendOutcome::Duplicate);
        }
        let log = SqliteLog::open(&path, 2, Durability::Full).unwrap();
        let a = log.start_writer(8).unwrap();
        assert_eq!(a.append(batch("gw", 7, &["x", "y"])).await.unwrap(), AppendOutcome::Duplicate);
        assert_eq!(a.append(batch("other", 7, &["x"])).await.unwrap(), AppendOutcome::Appended { records: 1 });
        let mut src = log.source().unwrap();
        let ends = src.end_offsets().unwrap();
        assert_eq!(ends.iter().map(|(_, o)| o).sum::<u64>(), 3);
    }

    #[test]
    fn the_partition_count_of_an_existing_log_cannot_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        SqliteLog::open(&path, 4, Durability::Normal).unwrap();
        let err = SqliteLog::open(&path, 8, Durability::Normal).unwrap_err();
        assert!(matches!(err, EventLogError::Inconsistent(_)), "{err}");
    }

    /// A reader whose position fell behind what retention deleted (say, a
    /// store whose last checkpoint a power cut took back) must not jump the
    /// missing records: it stops with an error naming them.
    #[test]
    fn a_reader_behind_records_retention_deleted_stops_with_a_gap_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let log = SqliteLog::open(&path, 1, Durability::Normal).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let a = log.start_writer(8).unwrap();
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        rt.block_on(a.append(batch("gw", 1, &keys))).unwrap();
        // Retention took offsets 0..6: archived and (it was told) processed.
        let below = BTreeMap::from([(0, 6)]);
        assert_eq!(SqliteLog::apply_retention(&path, &below, i64::MAX).unwrap(), 6);
        let mut src = log.source().unwrap();
        src.seek(0, 4);
        let err = src.poll(100, Duration::from_millis(10)).unwrap_err();
        assert!(matches!(err, EventLogError::Gap { partition: 0, expected: 4, found: 6 }), "{err}");
        // A reader at or past the oldest record left reads on.
        src.seek(0, 6);
        let offsets: Vec<u64> = src.poll(100, Duration::from_millis(10)).unwrap().iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [6, 7, 8, 9]);
    }

    /// A log of one partition that lost its last commit: offsets 0..6 kept,
    /// 6..10 (batch 2) gone, as a power cut under `synchronous=NORMAL`
    /// leaves it while the view store's checkpoint says 10 were read.
    fn log_that_lost_its_last_commit(path: &Path, rt: &tokio::runtime::Runtime) -> SqliteLog {
        let log = SqliteLog::open(path, 1, Durability::Normal).unwrap();
        {
            let a = log.start_writer(8).unwrap();
            rt.block_on(a.append(batch("gw", 1, &["k0", "k1", "k2", "k3", "k4", "k5"]))).unwrap();
            rt.block_on(a.append(batch("gw", 2, &["k6", "k7", "k8", "k9"]))).unwrap();
        }
        let conn = Connection::open(path).unwrap();
        conn.execute_batch("DELETE FROM log WHERE offset >= 6; DELETE FROM batches WHERE batch_id = 2;").unwrap();
        log
    }

    fn offsets(src: &mut SqliteSource) -> Vec<u64> {
        src.poll(100, Duration::from_millis(10)).unwrap().iter().map(|r| r.offset).collect()
    }

    #[test]
    fn records_appended_after_the_log_lost_commits_its_readers_saw_reach_those_readers() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let readers_at = BTreeMap::from([(0, 10)]);

        // Negative control: appending where the log ends puts the new
        // records at offsets the readers have passed, and they never see them.
        let dir = tempfile::tempdir().unwrap();
        let log = log_that_lost_its_last_commit(&dir.path().join("log.sqlite"), &rt);
        let a = log.start_writer(8).unwrap();
        rt.block_on(a.append(batch("gw", 3, &["n0", "n1", "n2"]))).unwrap();
        let mut reader = log.source().unwrap();
        reader.seek(0, 10);
        assert_eq!(offsets(&mut reader), Vec::<u64>::new(), "the unprotected log hides new records from its readers");

        // With the readers' positions: a hole 6..10, new records from 10.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let log = log_that_lost_its_last_commit(&path, &rt);
        assert_eq!(log.append_after(&readers_at).unwrap(), [Hole { partition: 0, start: 6, end: 10 }]);
        assert_eq!(log.append_after(&readers_at).unwrap(), [], "the hole is recorded once");
        let a = log.start_writer(8).unwrap();
        rt.block_on(a.append(batch("gw", 3, &["n0", "n1", "n2"]))).unwrap();
        let mut reader = log.source().unwrap();
        reader.seek(0, 10);
        assert_eq!(offsets(&mut reader), [10, 11, 12]);
        assert_eq!(reader.end_offsets().unwrap(), [(0, 13)]);
        // A reader from the start (a replay) passes the hole, counted; so
        // does one positioned inside it.
        let mut replay = log.source().unwrap();
        assert_eq!(offsets(&mut replay), [0, 1, 2, 3, 4, 5, 10, 11, 12]);
        assert_eq!(replay.hole_offsets_passed(), 4);
        let mut inside = log.source().unwrap();
        inside.seek(0, 8);
        assert_eq!(offsets(&mut inside), [10, 11, 12]);
        // The hole survives a restart: the writer goes on after it even
        // if the records after it are gone too; losing them while readers
        // were at 13 adds a second hole right after the first, and a reader
        // from before both passes them together.
        drop(a);
        Connection::open(&path).unwrap().execute_batch("DELETE FROM log WHERE offset >= 10").unwrap();
        assert_eq!(SqliteLog::end_offsets_at(&path).unwrap(), [(0, 10)]);
        assert_eq!(log.append_after(&BTreeMap::from([(0, 13)])).unwrap(), [Hole { partition: 0, start: 10, end: 13 }]);
        let a = log.start_writer(8).unwrap();
        rt.block_on(a.append(batch("gw", 5, &["o0"]))).unwrap();
        let mut replay = log.source().unwrap();
        replay.seek(0, 6);
        assert_eq!(offsets(&mut replay), [13]);
        assert_eq!(replay.hole_offsets_passed(), 7);
        drop(a);
        Connection::open(&path).unwrap().execute_batch("DELETE FROM log WHERE offset >= 13").unwrap();
        // A hole does not excuse other missing records: retention's gap still stops a reader.
        let a = SqliteLog::open(&path, 1, Durability::Normal).unwrap().start_writer(8).unwrap();
        rt.block_on(a.append(batch("gw", 4, &["m0", "m1", "m2"]))).unwrap();
        Connection::open(&path).unwrap().execute_batch("DELETE FROM log WHERE offset = 14").unwrap();
        let mut reader = log.source().unwrap();
        reader.seek(0, 13);
        let err = reader.poll(100, Duration::from_millis(10)).unwrap_err();
        assert!(matches!(err, EventLogError::Gap { partition: 0, expected: 14, found: 15 }), "{err}");
    }

    #[test]
    fn seek_rewinds_a_partition() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("log.sqlite"), 1, Durability::Normal).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let a = log.start_writer(8).unwrap();
        rt.block_on(a.append(batch("gw", 1, &["a", "b", "c"]))).unwrap();
        let mut src = log.source().unwrap();
        assert_eq!(src.poll(10, Duration::ZERO).unwrap().len(), 3);
        assert!(src.poll(10, Duration::ZERO).unwrap().is_empty());
        src.seek(0, 1);
        let offs: Vec<u64> = src.poll(10, Duration::ZERO).unwrap().iter().map(|r| r.offset).collect();
        assert_eq!(offs, [1, 2]);
    }
}
