//! The embedded serving and checkpoint store, in SQLite.
//!
//! On-disk format (`PRAGMA user_version = 3`):
//!
//! | table | holds |
//! |---|---|
//! | `views(view_id, name, version, definition, pipeline, retired, created_ms)` | every view version ever run, its canonical definition and the pipeline that computes it |
//! | `pipelines(pipeline, state, detail, created_ms)` | `building` (replaying towards the log's end), `live`, or `failed` with why |
//! | `view_aliases(name, version)` | which version the API serves for a name |
//! | `alias_history(seq, name, version, at_ms)` | every alias change, for rollback |
//! | `view_rows(view_id, key, window_start, window_end, row)` | output rows; `row` is JSON; `window_end` NULL for global windows |
//! | `view_state(view_id, key, window_start, state)` | open windows (CBOR), for restore |
//! | `view_meta(view_id, closed_through)` | the watermark up to which windows are closed |
//! | `dedup(pipeline, device, boot, state)` | sequence numbers seen per device boot (CBOR) |
//! | `partitions(pipeline, partition, next_offset, max_ts)` | where each pipeline resumes, and each partition's max event time |
//! | `processor_meta(pipeline, key, value)` | `global_watermark` |
//! | `late_events(view_id, partition, offset, window_start, ...)` | readings too late for a window, with the reason |
//! | `alerts`, `alert_events`, `alert_state`, `alert_outbox`, `alert_acks` | see [`alerts`] |
//! | `edge_aggregates` | see [`aggregates`] |
//!
//! [`ViewStore::checkpoint`] writes everything a checkpoint holds in one
//! transaction: rows, state, dedup, late events and log positions always
//! agree. Deleting the file makes the next start rebuild every view from
//! offset 0 of the event log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

mod read;
mod versions;

use super::{
    AlertAcks, Checkpoint, Columns, LateQuery, ProcessorStore, Restored, RowQuery, ServingReader, StoreError,
    StoredRow, ViewChanges, ViewInfo, ViewState, aggregates, alerts, view_catalog,
};
use crate::eventlog::{Offset, Partition};
use crate::model::LateEvent;

const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS views (
    view_id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL,
    definition TEXT NOT NULL, pipeline TEXT NOT NULL, retired INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pipelines (
    pipeline TEXT PRIMARY KEY, state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS view_aliases (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alias_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS view_rows (
    view_id TEXT NOT NULL, key TEXT NOT NULL, window_start INTEGER NOT NULL, window_end INTEGER,
    row TEXT NOT NULL, PRIMARY KEY (view_id, key, window_start)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS view_state (
    view_id TEXT NOT NULL, key TEXT NOT NULL, window_start INTEGER NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (view_id, key, window_start)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS view_meta (view_id TEXT PRIMARY KEY, closed_through INTEGER);
CREATE TABLE IF NOT EXISTS dedup (
    pipeline TEXT NOT NULL, device TEXT NOT NULL, boot INTEGER NOT NULL, state BLOB NOT NULL,
    PRIMARY KEY (pipeline, device, boot)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS partitions (
    pipeline TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, max_ts INTEGER,
    PRIMARY KEY (pipeline, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processor_meta (
    pipeline TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (pipeline, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late_events (
    view_id TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, window_start INTEGER NOT NULL,
    device TEXT NOT NULL, boot INTEGER NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
    watermark_ms INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (view_id, partition, offset, window_start)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS late_events_by_time ON late_events (ts_ms);
";

view_catalog!(ViewStore);

impl AlertAcks for ViewStore {
    fn ack_alert(&mut self, id: &str, by: &str, note: &str, at_ms: i64) -> Result<bool, StoreError> {
        ViewStore::ack_alert(self, id, by, note, at_ms)
    }
}

impl ServingReader for ViewStore {
    fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError> {
        ViewStore::resolve_view(self, name)
    }

    fn rows(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
        ViewStore::rows(self, q)
    }

    fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError> {
        ViewStore::views(self, false)
    }

    fn interrupter(&self) -> Option<super::Interrupter> {
        let handle = self.conn.get_interrupt_handle();
        Some(Box::new(move || handle.interrupt()))
    }

    fn late_events(&self, q: &LateQuery) -> Result<Vec<LateEvent>, StoreError> {
        ViewStore::late_events(self, q)
    }

    fn alerts(&self, q: &alerts::AlertQuery) -> Result<Vec<alerts::AlertView>, StoreError> {
        ViewStore::alerts(self, q)
    }

    fn alert(&self, id: &str) -> Result<Option<alerts::AlertDetail>, StoreError> {
        ViewStore::alert(self, id)
    }

    fn aggregates(&self, q: &aggregates::AggregateQuery) -> Result<Vec<aggregates::AggregateRow>, StoreError> {
        ViewStore::aggregates(self, q)
    }
}

impl ProcessorStore for ViewStore {
    fn restore(&self, pipeline: &str) -> Result<Restored, StoreError> {
        ViewStore::restore(self, pipeline)
    }

    fn view_state(&self, view_id: &str, partition: Option<Partition>) -> Result<ViewState, StoreError> {
        match partition {
            None => ViewStore::view_state(self, view_id),
            Some(p) => Err(StoreError(format!(
                "the embedded store keeps view state for all partitions together, not for partition {p}"
            ))),
        }
    }

    fn alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        ViewStore::alert_state(self)
    }

    fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        ViewStore::checkpoint(self, cp)
    }
}

/// A connection to the store.
#[derive(Debug)]
pub struct ViewStore {
    pub(in crate::store) conn: Connection,
}

/// What [`ViewStore::state_bytes`] measures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StateBytes {
    /// `(view id, bytes)` of each view's open-window state.
    pub views: Vec<(String, i64)>,
    /// `(pipeline, bytes)` of each pipeline's dedup state.
    pub dedup: Vec<(String, i64)>,
}

impl ViewStore {
    /// Opens (creating if needed) the store for the processor.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a checkpoint (rows and log positions) is on disk when its
        // commit returns. Log retention deletes records below these
        // positions, so a power cut must not roll them back below what it
        // deleted (one fsync per checkpoint; docs/archive.md, "Retention").
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A checkpoint of many windows is one large transaction: give it room
        // (64 MiB) so dirty pages are not spilled to the WAL mid-transaction.
        conn.pragma_update(None, "cache_size", -65_536)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))?;
        if tables > 0 && version != SCHEMA_VERSION {
            return Err(StoreError(format!(
                "the serving store at {} has schema version {version}, this version needs {SCHEMA_VERSION}; \
                 move it aside and start again: every view is rebuilt from the event log",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(alerts::SCHEMA)?;
        conn.execute_batch(aggregates::SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self { conn })
    }

    /// Opens the store read-only, for queries.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Self { conn })
    }

    /// Records that a pipeline failed, and why (shown by `views list`).
    pub fn fail_pipeline(&mut self, pipeline: &str, detail: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE pipelines SET state = 'failed', detail = ?2 WHERE pipeline = ?1",
            params![pipeline, detail],
        )?;
        Ok(())
    }

    /// A pipeline's positions, watermarks and dedup state from its last checkpoint.
    pub fn restore(&self, pipeline: &str) -> Result<Restored, StoreError> {
        let mut out = Restored::default();
        let mut stmt =
            self.conn.prepare("SELECT partition, next_offset, max_ts FROM partitions WHERE pipeline = ?1")?;
        for row in stmt.query_map([pipeline], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, Option<i64>>(2)?))
        })? {
            let (p, o, m) = row?;
            out.partitions.insert(p, (o, m));
        }
        out.global_watermark = self
            .conn
            .query_row(
                "SELECT value FROM processor_meta WHERE pipeline = ?1 AND key = 'global_watermark'",
                [pipeline],
                |r| r.get(0),
            )
            .optional()?;
        let mut stmt = self.conn.prepare("SELECT device, boot, state FROM dedup WHERE pipeline = ?1")?;
        for row in stmt.query_map([pipeline], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
            out.dedup.push(row?);
        }
        Ok(out)
    }

    /// A view's rows and its pipeline's positions, read in one snapshot so
    /// they agree (the processor commits both together).
    pub fn snapshot(&mut self, view_id: &str) -> Result<(Vec<StoredRow>, BTreeMap<Partition, Offset>), StoreError> {
        let tx = self.conn.transaction()?;
        let pipeline: String = tx
            .query_row("SELECT pipeline FROM views WHERE view_id = ?1", [view_id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError(format!("no view {view_id}")))?;
        let mut positions = BTreeMap::new();
        {
            let mut stmt = tx.prepare("SELECT partition, next_offset FROM partitions WHERE pipeline = ?1")?;
            for row in stmt.query_map([&pipeline], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64)))? {
                let (p, o) = row?;
                positions.insert(p, o);
            }
        }
        let mut rows = Vec::new();
        {
            let mut stmt =
                tx.prepare("SELECT key, window_start, window_end, row FROM view_rows WHERE view_id = ?1 ORDER BY key, window_start")?;
            let it = stmt.query_map([view_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?, r.get::<_, String>(3)?))
            })?;
            for row in it {
                let (key, window_start, window_end, json) = row?;
                let values =
                    serde_json::from_str(&json).map_err(|e| StoreError(format!("stored row does not parse: {e}")))?;
                rows.push(StoredRow { key, window_start, window_end, values });
            }
        }
        tx.commit()?;
        Ok((rows, positions))
    }

    /// Every pipeline's next offset per partition.
    pub fn pipeline_positions(&self) -> Result<BTreeMap<String, BTreeMap<Partition, Offset>>, StoreError> {
        let mut out: BTreeMap<String, BTreeMap<Partition, Offset>> = BTreeMap::new();
        let mut stmt = self.conn.prepare("SELECT pipeline, partition, next_offset FROM partitions")?;
        for row in
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, i64>(2)? as u64)))?
        {
            let (pl, p, o) = row?;
            out.entry(pl).or_default().insert(p, o);
        }
        Ok(out)
    }

    /// One view's open windows and the watermark it closed through.
    pub fn view_state(&self, view_id: &str) -> Result<ViewState, StoreError> {
        let closed: Option<i64> = self
            .conn
            .query_row("SELECT closed_through FROM view_meta WHERE view_id = ?1", [view_id], |r| r.get(0))
            .optional()?
            .flatten();
        let mut stmt =
            self.conn.prepare("SELECT key, state FROM view_state WHERE view_id = ?1 ORDER BY key, window_start")?;
        let mut states = Vec::new();
        for row in stmt.query_map([view_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
            states.push(row?);
        }
        Ok((closed, states))
    }

    /// Writes a checkpoint atomically.
    pub fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut row_up = tx.prepare_cached(
                "INSERT INTO view_rows (view_id, key, window_start, window_end, row) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (view_id, key, window_start) DO UPDATE SET window_end = excluded.window_end, row = excluded.row",
            )?;
            let mut row_del =
                tx.prepare_cached("DELETE FROM view_rows WHERE view_id = ?1 AND key = ?2 AND window_start = ?3")?;
            let mut st_up = tx.prepare_cached(
                "INSERT INTO view_state (view_id, key, window_start, state) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (view_id, key, window_start) DO UPDATE SET state = excluded.state",
            )?;
            let mut st_del =
                tx.prepare_cached("DELETE FROM view_state WHERE view_id = ?1 AND key = ?2 AND window_start = ?3")?;
            let mut meta = tx.prepare_cached(
                "INSERT INTO view_meta (view_id, closed_through) VALUES (?1, ?2)
                 ON CONFLICT (view_id) DO UPDATE SET closed_through = excluded.closed_through",
            )?;
            for ViewChanges { view, partition, changes: ch, closed_through: closed, merged } in &cp.views {
                if *merged {
                    return Err(StoreError(format!("view {view}: the embedded store keeps rows, not partials")));
                }
                if let Some(p) = partition {
                    return Err(StoreError(format!(
                        "view {view}: the embedded store cannot keep state per partition ({p})"
                    )));
                }
                for (k, s) in &ch.row_deletes {
                    row_del.execute(params![view, k, s])?;
                }
                for r in &ch.row_upserts {
                    row_up.execute(params![view, r.key, r.window_start, r.window_end, r.values])?;
                }
                for (k, s) in &ch.state_deletes {
                    st_del.execute(params![view, k, s])?;
                }
                for (k, s, blob) in &ch.state_upserts {
                    st_up.execute(params![view, k, s, blob])?;
                }
                meta.execute(params![view, closed])?;
            }
            let pl = cp.pipeline.as_str();
            let mut d_up = tx.prepare_cached(
                "INSERT INTO dedup (pipeline, device, boot, state) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (pipeline, device, boot) DO UPDATE SET state = excluded.state",
            )?;
            for (d, b, blob) in &cp.dedup_upserts {
                d_up.execute(params![pl, d, b, blob])?;
            }
            let mut d_del = tx.prepare_cached("DELETE FROM dedup WHERE pipeline = ?1 AND device = ?2 AND boot = ?3")?;
            for (d, b) in &cp.dedup_deletes {
                d_del.execute(params![pl, d, b])?;
            }
            let mut late = tx.prepare_cached(
                "INSERT OR REPLACE INTO late_events
                 (view_id, partition, offset, window_start, device, boot, seq, ts_ms, watermark_ms, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for l in &cp.late {
                late.execute(params![
                    l.view,
                    l.partition,
                    l.offset as i64,
                    l.window_start,
                    l.device,
                    l.boot,
                    l.seq as i64,
                    l.ts_ms,
                    l.watermark_ms,
                    l.reason
                ])?;
            }
            let mut pos = tx.prepare_cached(
                "INSERT INTO partitions (pipeline, partition, next_offset, max_ts) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (pipeline, partition) DO UPDATE SET next_offset = excluded.next_offset, max_ts = excluded.max_ts",
            )?;
            for (p, o, m) in &cp.partitions {
                pos.execute(params![pl, p, *o as i64, m])?;
            }
            if let Some(w) = cp.global_watermark {
                tx.execute(
                    "INSERT INTO processor_meta (pipeline, key, value) VALUES (?1, 'global_watermark', ?2)
                     ON CONFLICT (pipeline, key) DO UPDATE SET value = excluded.value",
                    params![pl, w],
                )?;
            }
            if let Some(ch) = &cp.alerts {
                alerts::write(&tx, ch)?;
            }
            aggregates::merge(&tx, &cp.aggregates)?;
            if cp.caught_up {
                tx.execute(
                    "UPDATE pipelines SET state = 'live', detail = '' WHERE pipeline = ?1 AND state = 'building'",
                    [pl],
                )?;
            }
            if cp.skipped > 0 {
                tx.execute(
                    "UPDATE pipelines SET detail = ?2 WHERE pipeline = ?1",
                    params![pl, format!("skipped {} records in damaged archive blocks", cp.skipped)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn col<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>>(&self, i: usize) -> rusqlite::Result<T> {
        self.get(i)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::views::operator::{Changes, Row};
    use crate::views::spec::ViewSpec;

    /// A one-minute row with count `n` (the PostgreSQL store's tests use it too).
    pub(crate) fn row(key: &str, start: i64, n: u64) -> Row {
        Row {
            key: key.into(),
            window_start: start,
            window_end: Some(start + 60_000),
            values: serde_json::json!({ "n": n }).to_string(),
        }
    }

    fn cp_with_rows(rows: Vec<Row>, next_offset: u64) -> Checkpoint {
        Checkpoint {
            pipeline: "main".into(),
            views: vec![ViewChanges {
                view: "v@1".into(),
                partition: None,
                changes: Changes { row_upserts: rows, ..Changes::default() },
                closed_through: Some(5),
                merged: false,
            }],
            partitions: vec![(0, next_offset, Some(100))],
            global_watermark: Some(90),
            ..Checkpoint::default()
        }
    }

    #[test]
    fn a_checkpoint_replaces_rows_and_positions_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        s.checkpoint(&cp_with_rows(vec![row("a", 0, 1)], 5)).unwrap();
        s.checkpoint(&cp_with_rows(vec![row("a", 0, 3)], 9)).unwrap();
        let r = s.restore("main").unwrap();
        assert_eq!(r.partitions[&0], (9, Some(100)));
        assert_eq!(r.global_watermark, Some(90));
        let q = RowQuery { view_id: "v@1".into(), key: None, from: i64::MIN, to: i64::MAX, after: None, limit: 10 };
        assert_eq!(s.rows(&q).unwrap()[0].values["n"], 3);
        assert_eq!(s.view_state("v@1").unwrap().0, Some(5));
    }

    #[test]
    fn state_bytes_follow_the_checkpointed_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        assert_eq!(s.state_bytes().unwrap(), StateBytes::default());
        let mut cp = cp_with_rows(vec![], 1);
        cp.views[0].changes.state_upserts = vec![("a".into(), 0, vec![0; 100]), ("b".into(), 0, vec![0; 50])];
        cp.dedup_upserts = vec![("a".into(), 1, vec![0; 30])];
        s.checkpoint(&cp).unwrap();
        let b = s.state_bytes().unwrap();
        assert_eq!((b.views, b.dedup), (vec![("v@1".into(), 150)], vec![("main".into(), 30)]));
        let mut cp = cp_with_rows(vec![], 2);
        cp.views[0].changes.state_deletes = vec![("a".into(), 0)];
        s.checkpoint(&cp).unwrap();
        assert_eq!(s.state_bytes().unwrap().views, vec![("v@1".into(), 50)]);
    }

    #[test]
    fn rows_page_by_key_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        let rows: Vec<_> = ["a", "b"].iter().flat_map(|k| (0..3).map(move |i| row(k, i * 60_000, 1))).collect();
        s.checkpoint(&cp_with_rows(rows, 1)).unwrap();
        let mut q = RowQuery { view_id: "v@1".into(), key: None, from: 0, to: i64::MAX, after: None, limit: 4 };
        let page1 = s.rows(&q).unwrap();
        let last = page1.last().unwrap();
        q.after = Some((last.key.clone(), last.window_start));
        let page2 = s.rows(&q).unwrap();
        assert_eq!(
            page2.iter().map(|r| (r.key.as_str(), r.window_start)).collect::<Vec<_>>(),
            [("b", 60_000), ("b", 120_000)]
        );
    }

    #[test]
    fn a_changed_definition_needs_a_new_version() {
        use crate::views::spec::{AggFn, AggSpec, Field, OutputMode, WindowSpec};
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        let mut spec = ViewSpec {
            name: "v".into(),
            version: 1,
            key: Field::Device,
            window: WindowSpec::Global,
            output: OutputMode::Update,
            allowed_lateness_ms: 0,
            filter: vec![],
            aggregates: vec![AggSpec { name: "n".into(), func: AggFn::Count, of: None, max: 1 }],
        };
        let plans = s.plan_pipelines(std::slice::from_ref(&spec), 0).unwrap();
        assert_eq!(
            (plans[0].pipeline.as_str(), plans[0].building),
            ("main", false),
            "a fresh store: the main pipeline"
        );
        s.plan_pipelines(std::slice::from_ref(&spec), 0).unwrap();
        let v1 = spec.clone();
        spec.window = WindowSpec::Tumbling { size_ms: 1000 };
        let err = s.plan_pipelines(std::slice::from_ref(&spec), 0).unwrap_err();
        assert!(err.0.contains("version = 2"), "{err}");
        spec.version = 2;
        let plans = s.plan_pipelines(&[v1, spec], 0).unwrap();
        let replay = plans.iter().find(|p| p.pipeline == "replay:v@2").unwrap();
        assert!(replay.building, "a version added later replays history in its own pipeline");
        assert_eq!(s.resolve_view("v").unwrap().as_deref(), Some("v@1"), "the alias stays on the first version");
        assert_eq!(s.resolve_view("v@2").unwrap().as_deref(), Some("v@2"));
        assert!(s.promote("v", 2, 1).unwrap_err().0.contains("building"), "not before it is live");
    }

    #[test]
    fn a_store_from_the_older_schema_is_refused_with_a_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sqlite");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE positions (partition INTEGER)").unwrap();
        let err = ViewStore::open(&path).unwrap_err();
        assert!(err.0.contains("rebuilt from the event log"), "{err}");
    }
}
