//! Edge aggregates in the serving store: one row per device, metric and
//! window, the merge of every partial the edge sent for it.
//!
//! | table | holds |
//! |---|---|
//! | `edge_aggregates(device, metric, window_ms, start_ms, count, min, max, sum, sum_sq, first_ts, first, last_ts, last)` | merged partials |
//! | `edge_aggregate_parts(gateway, batch_id, device, metric, window_ms, start_ms)` | every partial merged so far |
//!
//! Partials are merged in SQL inside the checkpoint transaction, so a
//! partial counts exactly once however the processor restarts; a partial
//! already in `edge_aggregate_parts` (its batch was appended twice) is not
//! merged again.

use kappa_common::aggregate::Aggregate;
use rusqlite::{Transaction, params};
use serde::Serialize;

use super::{Columns, StoreError, ViewStore};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS edge_aggregates (
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    window_ms INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    sum REAL NOT NULL,
    sum_sq REAL NOT NULL,
    first_ts INTEGER NOT NULL,
    first REAL NOT NULL,
    last_ts INTEGER NOT NULL,
    last REAL NOT NULL,
    PRIMARY KEY (device, metric, window_ms, start_ms)
);
CREATE TABLE IF NOT EXISTS edge_aggregate_parts (
    gateway TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    window_ms INTEGER NOT NULL,
    start_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, batch_id, device, metric, window_ms, start_ms)
) WITHOUT ROWID;
";

/// One partial as the edge sent it, with the batch it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatePart {
    pub gateway: String,
    pub batch_id: u64,
    pub aggregate: Aggregate,
}

/// Merges partials not merged before into their rows (in the checkpoint's transaction).
pub fn merge(tx: &Transaction<'_>, parts: &[AggregatePart]) -> Result<(), StoreError> {
    let mut first_time = tx.prepare_cached(
        "INSERT OR IGNORE INTO edge_aggregate_parts (gateway, batch_id, device, metric, window_ms, start_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    // In an UPDATE every expression sees the row as it was: the CASEs read the old times.
    let mut stmt = tx.prepare_cached(
        "INSERT INTO edge_aggregates
             (device, metric, window_ms, start_ms, count, min, max, sum, sum_sq, first_ts, first, last_ts, last)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (device, metric, window_ms, start_ms) DO UPDATE SET
             count = count + excluded.count,
             min = min(min, excluded.min),
             max = max(max, excluded.max),
             sum = sum + excluded.sum,
             sum_sq = sum_sq + excluded.sum_sq,
             first = CASE WHEN excluded.first_ts < first_ts THEN excluded.first ELSE first END,
             first_ts = min(first_ts, excluded.first_ts),
             last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,
             last_ts = max(last_ts, excluded.last_ts)",
    )?;
    for part in parts {
        let a = &part.aggregate;
        let new = first_time.execute(params![
            part.gateway,
            part.batch_id as i64,
            a.device,
            a.metric,
            a.window_ms,
            a.start_ms
        ])?;
        if new == 0 {
            continue;
        }
        stmt.execute(params![
            a.device,
            a.metric,
            a.window_ms,
            a.start_ms,
            a.count as i64,
            a.min,
            a.max,
            a.sum,
            a.sum_sq,
            a.first_ts,
            a.first,
            a.last_ts,
            a.last
        ])?;
    }
    Ok(())
}

/// Filters for reading aggregates back.
#[derive(Debug, Clone, Default)]
pub struct AggregateQuery {
    pub device: Option<String>,
    pub metric: Option<String>,
    pub window_ms: Option<i64>,
    /// Windows starting in `[from, to)`.
    pub from: i64,
    pub to: i64,
    /// Resume after this `(device, metric, window_ms, start_ms)`.
    pub after: Option<(String, String, i64, i64)>,
    pub limit: usize,
}

impl AggregateQuery {
    /// Every aggregate, in one page.
    pub fn everything() -> Self {
        Self { from: i64::MIN, to: i64::MAX, limit: i64::MAX as usize, ..Self::default() }
    }
}

/// A merged aggregate as the API returns it, with its mean and standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateRow {
    #[serde(flatten)]
    pub aggregate: Aggregate,
    pub avg: f64,
    /// Population standard deviation, from the sum of squares.
    pub stddev: f64,
}

impl From<Aggregate> for AggregateRow {
    fn from(a: Aggregate) -> Self {
        let n = a.count.max(1) as f64;
        let avg = a.sum / n;
        let stddev = (a.sum_sq / n - avg * avg).max(0.0).sqrt();
        Self { aggregate: a, avg, stddev }
    }
}

impl ViewStore {
    /// Merged edge aggregates, ordered by device, metric, window size and start.
    pub fn aggregates(&self, q: &AggregateQuery) -> Result<Vec<AggregateRow>, StoreError> {
        let (ad, am, aw, as_) = q.after.clone().unwrap_or_default();
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {AGGREGATE_COLUMNS} FROM edge_aggregates
             WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR metric = ?2) AND (?3 IS NULL OR window_ms = ?3)
               AND start_ms >= ?4 AND start_ms < ?5
               AND (?6 = 0 OR (device, metric, window_ms, start_ms) > (?7, ?8, ?9, ?10))
             ORDER BY device, metric, window_ms, start_ms LIMIT ?11"
        ))?;
        let rows = stmt.query_map(
            params![
                q.device,
                q.metric,
                q.window_ms,
                q.from,
                q.to,
                q.after.is_some() as i64,
                ad,
                am,
                aw,
                as_,
                q.limit as i64
            ],
            |r| aggregate_row(r),
        )?;
        Ok(rows.map(|r| r.map(AggregateRow::from)).collect::<Result<_, _>>()?)
    }

    /// Every merged edge aggregate, one line each in a canonical order.
    pub fn dump_aggregates(&self) -> Result<String, StoreError> {
        Ok(self.aggregates(&AggregateQuery::everything())?.iter().map(dump_line).collect())
    }
}

/// The columns every aggregate query selects, in order.
pub(crate) const AGGREGATE_COLUMNS: &str =
    "device, metric, window_ms, start_ms, count, min, max, sum, sum_sq, first_ts, first, last_ts, last";

/// An aggregate from a row of [`AGGREGATE_COLUMNS`].
pub(crate) fn aggregate_row<R: Columns>(r: &R) -> Result<Aggregate, R::Error> {
    Ok(Aggregate {
        device: r.col(0)?,
        metric: r.col(1)?,
        window_ms: r.col(2)?,
        start_ms: r.col(3)?,
        count: u64::try_from(r.col::<i64>(4)?).unwrap_or(0),
        min: r.col(5)?,
        max: r.col(6)?,
        sum: r.col(7)?,
        sum_sq: r.col(8)?,
        first_ts: r.col(9)?,
        first: r.col(10)?,
        last_ts: r.col(11)?,
        last: r.col(12)?,
    })
}

/// One merged aggregate in a dump; floats in full.
pub(crate) fn dump_line(r: &AggregateRow) -> String {
    let a = &r.aggregate;
    format!(
        "{} {} {} {} {} {:?} {:?} {:?} {:?} {} {:?} {} {:?}\n",
        a.device,
        a.metric,
        a.window_ms,
        a.start_ms,
        a.count,
        a.min,
        a.max,
        a.sum,
        a.sum_sq,
        a.first_ts,
        a.first,
        a.last_ts,
        a.last
    )
}
