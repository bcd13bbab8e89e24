//! The serving store: view rows and the processor's checkpoint, in SQLite.
//!
//! On-disk format (schema version 1):
//!
//! * `view_rows(view, key, window_start, window_end, row)`: `row` is the
//!   [`WindowAgg`] as JSON (floats written in shortest round-trip form, so a
//!   reloaded row is bit-identical);
//! * `positions(partition, next_offset)`: where the processor resumes;
//! * `processor_meta(key, value)`: `watermark_ms`.
//!
//! [`ViewStore::checkpoint`] writes changed rows and positions in one
//! transaction: the store never holds rows that include a record its
//! positions say is still to be processed, nor the reverse.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::eventlog::{Offset, Partition};
use crate::processor::window::{RowKey, RowWrite, WindowAgg};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS view_rows (
    view TEXT NOT NULL,
    key TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    window_end INTEGER NOT NULL,
    row TEXT NOT NULL,
    PRIMARY KEY (view, key, window_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS positions (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS processor_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// One stored row, as the API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub key: String,
    pub window_start: i64,
    pub window_end: i64,
    pub agg: WindowAgg,
}

/// A connection to the serving store.
#[derive(Debug)]
pub struct ViewStore {
    conn: Connection,
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
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// Opens the store read-only, for queries.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(Self { conn })
    }

    /// Where to resume each partition (absent: from offset 0).
    pub fn positions(&self) -> Result<BTreeMap<Partition, Offset>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT partition, next_offset FROM positions")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The watermark saved with the last checkpoint.
    pub fn watermark(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM processor_meta WHERE key = 'watermark_ms'", [], |r| r.get(0))
            .optional()?)
    }

    /// The stored copy of one row.
    pub fn load_row(&self, view: &str, key: &RowKey) -> Result<Option<WindowAgg>, StoreError> {
        let json: Option<String> = self
            .conn
            .prepare_cached("SELECT row FROM view_rows WHERE view = ?1 AND key = ?2 AND window_start = ?3")?
            .query_row(params![view, key.key, key.window_start], |r| r.get(0))
            .optional()?;
        json.map(|j| parse_row(&j)).transpose()
    }

    /// Writes changed rows and the positions they reflect, atomically.
    pub fn checkpoint(
        &mut self,
        rows: &[RowWrite],
        positions: &BTreeMap<Partition, Offset>,
        watermark_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO view_rows (view, key, window_start, window_end, row) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (view, key, window_start) DO UPDATE SET window_end = excluded.window_end, row = excluded.row",
            )?;
            for r in rows {
                let json = serde_json::to_string(&r.agg).map_err(|e| StoreError(e.to_string()))?;
                upsert.execute(params![r.view, r.key.key, r.key.window_start, r.window_end, json])?;
            }
            let mut pos = tx.prepare_cached(
                "INSERT INTO positions (partition, next_offset) VALUES (?1, ?2)
                 ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset",
            )?;
            for (p, o) in positions {
                pos.execute(params![p, *o as i64])?;
            }
            if let Some(w) = watermark_ms {
                tx.execute(
                    "INSERT INTO processor_meta (key, value) VALUES ('watermark_ms', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [w],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Rows of `view`, optionally for one key, with `from <= window_start < to`,
    /// ordered by key then window, starting after `after` (for pagination).
    pub fn rows(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
        let (after_key, after_start) = q.after.clone().unwrap_or((String::new(), i64::MIN));
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, window_start, window_end, row FROM view_rows
             WHERE view = ?1 AND (?2 IS NULL OR key = ?2) AND window_start >= ?3 AND window_start < ?4
               AND (key > ?5 OR (key = ?5 AND window_start > ?6))
             ORDER BY key, window_start LIMIT ?7",
        )?;
        let rows = stmt
            .query_map(params![q.view, q.key, q.from, q.to, after_key, after_start, q.limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
            })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, window_start, window_end, json) = row?;
            out.push(StoredRow { key, window_start, window_end, agg: parse_row(&json)? });
        }
        Ok(out)
    }

    /// Every row of every view, ordered: a canonical dump for comparisons.
    pub fn dump(&self) -> Result<String, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT view, key, window_start, window_end, row FROM view_rows ORDER BY view, key, window_start",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = String::new();
        while let Some(r) = rows.next()? {
            let (view, key, start, end, row): (String, String, i64, i64, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            out.push_str(&format!("{view}\t{key}\t{start}\t{end}\t{row}\n"));
        }
        Ok(out)
    }
}

/// A page of rows to read.
#[derive(Debug, Clone)]
pub struct RowQuery {
    pub view: String,
    pub key: Option<String>,
    pub from: i64,
    pub to: i64,
    pub after: Option<(String, i64)>,
    pub limit: usize,
}

fn parse_row(json: &str) -> Result<WindowAgg, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError(format!("stored view row does not parse: {e}")))
}

/// A serving-store failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("serving store: {0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(view: &str, key: &str, start: i64, count: u64) -> RowWrite {
        RowWrite {
            view: view.into(),
            key: RowKey { key: key.into(), window_start: start },
            window_end: start + 60_000,
            agg: WindowAgg { count, first_ts_ms: start, last_ts_ms: start, metrics: BTreeMap::new() },
        }
    }

    #[test]
    fn a_checkpoint_replaces_rows_and_positions_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        s.checkpoint(&[row("v", "a", 0, 1)], &BTreeMap::from([(0, 5)]), Some(100)).unwrap();
        s.checkpoint(&[row("v", "a", 0, 3)], &BTreeMap::from([(0, 9), (1, 2)]), Some(200)).unwrap();
        assert_eq!(s.positions().unwrap(), BTreeMap::from([(0, 9), (1, 2)]));
        assert_eq!(s.watermark().unwrap(), Some(200));
        let key = RowKey { key: "a".into(), window_start: 0 };
        assert_eq!(s.load_row("v", &key).unwrap().map(|a| a.count), Some(3));
    }

    #[test]
    fn rows_page_by_key_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ViewStore::open(&dir.path().join("v.sqlite")).unwrap();
        let rows: Vec<_> = ["a", "b"].iter().flat_map(|k| (0..3).map(move |i| row("v", k, i * 60_000, 1))).collect();
        s.checkpoint(&rows, &BTreeMap::new(), None).unwrap();
        let mut q = RowQuery { view: "v".into(), key: None, from: 0, to: i64::MAX, after: None, limit: 4 };
        let page1 = s.rows(&q).unwrap();
        assert_eq!(page1.len(), 4);
        let last = page1.last().unwrap();
        q.after = Some((last.key.clone(), last.window_start));
        let page2 = s.rows(&q).unwrap();
        assert_eq!(
            page2.iter().map(|r| (r.key.as_str(), r.window_start)).collect::<Vec<_>>(),
            [("b", 60_000), ("b", 120_000)]
        );
        q.key = Some("a".into());
        q.after = None;
        q.from = 60_000;
        assert_eq!(s.rows(&q).unwrap().len(), 2);
    }
}
