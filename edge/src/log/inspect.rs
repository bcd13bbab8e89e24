//! Looking at the log: the backlog and stats for metrics and `log stats`,
//! `log check` (SQLite's integrity check and the log's own invariants), and
//! `log export`.

use super::*;

impl EdgeLog {
    /// The cheap part of the summary, for periodic metrics: cost grows with
    /// the backlog, not the log.
    pub fn backlog(&self) -> Result<Backlog, LogError> {
        let cursor = self.meta("cursor")?;
        let readings: i64 =
            self.conn.query_row("SELECT count(*) FROM readings WHERE id > ?1 AND fwd = 1", [cursor], |r| r.get(0))?;
        let oldest_received_ms = self
            .conn
            .query_row("SELECT received_ms FROM readings WHERE id > ?1 ORDER BY id LIMIT 1", [cursor], |r| r.get(0))
            .optional()?;
        let mean_body: f64 = self.conn.query_row(
            "SELECT coalesce(avg(length(body)), 0) FROM (SELECT body FROM readings ORDER BY id DESC LIMIT 1000)",
            [],
            |r| r.get(0),
        )?;
        Ok(Backlog {
            readings: readings as u64,
            bytes: (readings as f64 * mean_body) as u64,
            oldest_received_ms,
            file_bytes: self.usage()?.file_bytes,
        })
    }

    /// A summary for metrics and the CLI.
    pub fn stats(&self) -> Result<LogStats, LogError> {
        let cursor = self.meta("cursor")?;
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, LogError> {
            Ok(self.conn.query_row(sql, p, |r| r.get::<_, i64>(0))? as u64)
        };
        let usage = self.usage()?;
        Ok(LogStats {
            readings: count("SELECT count(*) FROM readings", &[])?,
            backlog_readings: count("SELECT count(*) FROM readings WHERE id > ?1 AND fwd = 1", &[&cursor])?,
            oldest_unforwarded_received_ms: self
                .conn
                .query_row("SELECT received_ms FROM readings WHERE id > ?1 ORDER BY id LIMIT 1", [cursor], |r| r.get(0))
                .optional()?,
            cursor,
            assigned_upto: self.meta("assigned_upto")?,
            outbox_batches: count("SELECT count(*) FROM outbox", &[])?,
            quarantined: count("SELECT count(*) FROM quarantine", &[])?,
            dead_letter_batches: count("SELECT count(*) FROM dead_letters", &[])?,
            dead_letter_readings: count("SELECT count(*) FROM readings WHERE fwd = ?1", &[&FWD_DEAD])?,
            file_bytes: usage.file_bytes,
            used_bytes: usage.used_bytes,
            wal_bytes: usage.wal_bytes,
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
        // Pending batches of each kind: within their pointers, apart, nothing
        // to forward between the pointer that says what is done and the
        // oldest of them (later ones may have completed first: pipelining),
        // and each still holding every row it was built with.
        let (done, agg_upto) = (self.meta("agg_done")?, self.meta("agg_assigned_upto")?);
        for (kind, table, marked, low, high) in
            [("readings", "readings", "fwd = 1", cursor, upto), ("aggregates", "aggregates", "1 = 1", done, agg_upto)]
        {
            let mut batches: Vec<OutboxEntry> =
                self.outbox()?.into_iter().filter(|e| e.kind.as_str() == kind).collect();
            batches.sort_by_key(|b| b.first_id);
            let mut end = low;
            for (i, b) in batches.iter().enumerate() {
                if i == 0 {
                    let skipped: i64 = self.conn.query_row(
                        &format!("SELECT count(*) FROM {table} WHERE id > ?1 AND id < ?2 AND {marked}"),
                        [low, b.first_id],
                        |r| r.get(0),
                    )?;
                    if skipped > 0 {
                        problems.push(format!(
                            "{skipped} {kind} between {low} and the oldest pending batch {} are in no batch",
                            b.batch_id
                        ));
                    }
                }
                if b.first_id <= end || b.last_id > high || b.last_id < b.first_id {
                    problems.push(format!(
                        "{kind} batch {} covers {}..={}, overlapping another or outside ({low}, {high}]",
                        b.batch_id, b.first_id, b.last_id
                    ));
                }
                end = end.max(b.last_id);
                let rows: i64 = self.conn.query_row(
                    &format!("SELECT count(*) FROM {table} WHERE id BETWEEN ?1 AND ?2 AND {marked}"),
                    [b.first_id, b.last_id],
                    |r| r.get(0),
                )?;
                if rows as u64 != b.count {
                    problems
                        .push(format!("{kind} batch {} was built with {} rows but holds {rows}", b.batch_id, b.count));
                }
            }
        }
        let stray: i64 = self.conn.query_row(
            "SELECT count(*) FROM readings WHERE fwd = ?1 AND NOT EXISTS (SELECT 1 FROM dead_letters d
                 WHERE d.kind <> 'aggregates' AND readings.id BETWEEN d.first_id AND d.last_id)",
            [FWD_DEAD],
            |r| r.get(0),
        )?;
        if stray > 0 {
            problems.push(format!("{stray} readings are marked refused but belong to no dead letter"));
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
