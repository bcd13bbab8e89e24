//! Reading the embedded store: pages of rows and late events, and the
//! canonical dumps `views dump` and the tests compare.

use rusqlite::params;

use super::{StateBytes, ViewStore};
use crate::model::LateEvent;
use crate::store::{LateQuery, RowQuery, StoreError, StoredRow, late_dump_line};

impl ViewStore {
    /// A page of rows, ordered by key then window start.
    pub fn rows(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
        let (after_key, after_start) = q.after.clone().unwrap_or((String::new(), i64::MIN));
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, window_start, window_end, row FROM view_rows
             WHERE view_id = ?1 AND (?2 IS NULL OR key = ?2) AND window_start >= ?3 AND window_start < ?4
               AND (key > ?5 OR (key = ?5 AND window_start > ?6))
             ORDER BY key, window_start LIMIT ?7",
        )?;
        let rows = stmt
            .query_map(params![q.view_id, q.key, q.from, q.to, after_key, after_start, q.limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?, r.get::<_, String>(3)?))
            })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, window_start, window_end, json) = row?;
            let values =
                serde_json::from_str(&json).map_err(|e| StoreError(format!("stored row does not parse: {e}")))?;
            out.push(StoredRow { key, window_start, window_end, values });
        }
        Ok(out)
    }

    /// A page of late events, ordered by event time then position.
    pub fn late_events(&self, q: &LateQuery) -> Result<Vec<LateEvent>, StoreError> {
        let (a_ts, a_view, a_p, a_o, a_w) = q.after.clone().unwrap_or((i64::MIN, String::new(), 0, 0, i64::MIN));
        let mut stmt = self.conn.prepare_cached(
            "SELECT view_id, partition, offset, window_start, device, boot, seq, ts_ms, watermark_ms, reason
             FROM late_events
             WHERE (?1 IS NULL OR view_id = ?1) AND (?2 IS NULL OR device = ?2) AND ts_ms >= ?3 AND ts_ms < ?4
               AND (ts_ms, view_id, partition, offset, window_start) > (?5, ?6, ?7, ?8, ?9)
             ORDER BY ts_ms, view_id, partition, offset, window_start LIMIT ?10",
        )?;
        let rows = stmt.query_map(
            params![q.view_id, q.device, q.from, q.to, a_ts, a_view, a_p, a_o as i64, a_w, q.limit as i64],
            |r| {
                Ok(LateEvent {
                    view: r.get(0)?,
                    partition: r.get(1)?,
                    offset: r.get::<_, i64>(2)? as u64,
                    window_start: r.get(3)?,
                    device: r.get(4)?,
                    boot: r.get(5)?,
                    seq: r.get::<_, i64>(6)? as u64,
                    ts_ms: r.get(7)?,
                    watermark_ms: r.get(8)?,
                    reason: match r.get::<_, String>(9)?.as_str() {
                        "late" => "late",
                        "window_closed" => "window_closed",
                        _ => "other",
                    },
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every row of every view version, in a canonical order: byte-comparable dumps.
    pub fn dump(&self) -> Result<String, StoreError> {
        self.dump_rows(None)
    }

    /// Rows in a canonical order; one version's without its id, so two
    /// versions computed from the same log compare byte for byte.
    pub fn dump_rows(&self, view_id: Option<&str>) -> Result<String, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT view_id, key, window_start, window_end, row FROM view_rows
             WHERE ?1 IS NULL OR view_id = ?1 ORDER BY view_id, key, window_start",
        )?;
        let mut rows = stmt.query([view_id])?;
        let mut out = String::new();
        while let Some(r) = rows.next()? {
            let (view, key, start, end, row): (String, String, i64, Option<i64>, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            let end = end.map_or_else(|| "-".to_string(), |e| e.to_string());
            if view_id.is_some() {
                out.push_str(&format!("{key}\t{start}\t{end}\t{row}\n"));
            } else {
                out.push_str(&format!("{view}\t{key}\t{start}\t{end}\t{row}\n"));
            }
        }
        Ok(out)
    }

    /// The late log in canonical order, for dumps.
    /// Bytes of checkpointed operator state: per view (its open windows)
    /// and per pipeline (its dedup state), as stored.
    pub fn state_bytes(&self) -> Result<StateBytes, StoreError> {
        let sum = |sql: &str| -> Result<Vec<(String, i64)>, StoreError> {
            let mut stmt = self.conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        };
        Ok(StateBytes {
            views: sum("SELECT view_id, COALESCE(SUM(LENGTH(state)), 0) FROM view_state GROUP BY view_id")?,
            dedup: sum("SELECT pipeline, COALESCE(SUM(LENGTH(state)), 0) FROM dedup GROUP BY pipeline")?,
        })
    }

    pub fn dump_late(&self) -> Result<String, StoreError> {
        Ok(self.late_events(&LateQuery::everything(None))?.iter().map(late_dump_line).collect())
    }

    /// [`super::super::ViewCatalog::dump_views`].
    pub fn dump_views(&self, view_id: Option<&str>) -> Result<String, StoreError> {
        match view_id {
            Some(v) => self.dump_rows(Some(v)),
            None => Ok(format!("{}# late\n{}", self.dump()?, self.dump_late()?)),
        }
    }
}
