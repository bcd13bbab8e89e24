//! Batches: assigning unforwarded readings to a batch in the outbox,
//! loading it again for a resend, backfill requests, and retiring a batch
//! the cloud accepted (the cursor moves past batches with none pending before).

use super::*;

impl EdgeLog {
    /// Batches built but not yet acknowledged, oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, LogError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT batch_id, first_id, last_id, count, created_ms, kind FROM outbox ORDER BY batch_id",
        )?;
        let rows = stmt.query_map([], outbox_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last reading id that may go into a batch.
    pub(super) fn batchable_upto(&self) -> Result<i64, LogError> {
        if self.folding { self.meta("agg_cursor") } else { Ok(i64::MAX) }
    }

    /// Readings and aggregates not yet in any batch: how many (up to
    /// `limit`) and when the oldest arrived.
    pub fn unassigned(&self, limit: usize) -> Result<(usize, Option<i64>), LogError> {
        let (upto, gate) = (self.meta("assigned_upto")?, self.batchable_upto()?);
        let oldest_reading: Option<i64> = self
            .conn
            .query_row(
                "SELECT received_ms FROM readings WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT 1",
                [upto, gate],
                |r| r.get(0),
            )
            .optional()?;
        let agg_upto = self.meta("agg_assigned_upto")?;
        let oldest_aggregate: Option<i64> = self
            .conn
            .query_row("SELECT created_ms FROM aggregates WHERE id > ?1 ORDER BY id LIMIT 1", [agg_upto], |r| r.get(0))
            .optional()?;
        let oldest = match (oldest_reading, oldest_aggregate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if oldest.is_none() {
            return Ok((0, None));
        }
        let readings: i64 = self.conn.query_row(
            "SELECT count(*) FROM (SELECT 1 FROM readings WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3)",
            params![upto, gate, limit as i64],
            |r| r.get(0),
        )?;
        let aggregates: i64 = self.conn.query_row(
            "SELECT count(*) FROM (SELECT 1 FROM aggregates WHERE id > ?1 ORDER BY id LIMIT ?2)",
            params![agg_upto, limit as i64],
            |r| r.get(0),
        )?;
        Ok(((readings + aggregates).min(limit as i64) as usize, oldest))
    }

    /// Puts up to `max` unassigned aggregates, or else readings, into a new outbox batch.
    pub fn assign_batch(&mut self, max: usize, now_ms: i64) -> Result<Option<OutboxEntry>, LogError> {
        let gate = self.batchable_upto()?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let meta = |key: &str| -> Result<i64, rusqlite::Error> {
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        };
        let agg_upto = meta("agg_assigned_upto")?;
        let (first, last, count): (Option<i64>, Option<i64>, i64) = tx.query_row(
            "SELECT min(id), max(id), count(*) FROM (SELECT id FROM aggregates WHERE id > ?1 ORDER BY id LIMIT ?2)",
            params![agg_upto, max as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (kind, first_id, last_id, count, pointer) = match (first, last) {
            (Some(f), Some(l)) => (BatchKind::Aggregates, f, l, count, "agg_assigned_upto"),
            _ => {
                let upto = meta("assigned_upto")?;
                // A batch covers a range of ids; only readings marked for forwarding travel.
                let (first, last, count): (Option<i64>, Option<i64>, i64) = tx.query_row(
                    "SELECT min(id), max(id), coalesce(sum(fwd), 0) FROM
                         (SELECT id, fwd FROM readings WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3)",
                    params![upto, gate, max as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let (Some(f), Some(l)) = (first, last) else { return Ok(None) };
                (BatchKind::Readings, f, l, count, "assigned_upto")
            }
        };
        let batch_id = meta("next_batch_id")?;
        tx.execute(
            "INSERT INTO outbox (batch_id, first_id, last_id, count, created_ms, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![batch_id, first_id, last_id, count, now_ms, kind.as_str()],
        )?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = ?2", params![last_id, pointer])?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_batch_id'", [batch_id + 1])?;
        tx.commit()?;
        Ok(Some(OutboxEntry {
            batch_id: batch_id as u64,
            kind,
            first_id,
            last_id,
            count: count as u64,
            created_ms: now_ms,
        }))
    }

    /// The readings of an outbox batch, in log order (none for an aggregates batch).
    pub fn load_batch(&self, entry: &OutboxEntry) -> Result<Vec<Reading>, LogError> {
        let marked = match entry.kind {
            BatchKind::Aggregates => return Ok(Vec::new()),
            BatchKind::Readings => 1,
            BatchKind::Backfill => 3,
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, body FROM readings WHERE id BETWEEN ?1 AND ?2 AND fwd = ?3 ORDER BY id")?;
        let mut rows = stmt.query(params![entry.first_id, entry.last_id, marked])?;
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

    /// Queues the local-only raw readings with `from_ms <= ts_ms < to_ms` for
    /// sending, in batches of up to `max` (kind [`BatchKind::Backfill`]).
    /// Returns `(batches, readings)`; readings already sent are not queued again.
    pub fn request_backfill(
        &mut self,
        from_ms: i64,
        to_ms: i64,
        max: usize,
        now_ms: i64,
    ) -> Result<(u64, u64), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let ids: Vec<i64> = {
            let mut stmt =
                tx.prepare("SELECT id FROM readings WHERE fwd = 0 AND ts_ms >= ?1 AND ts_ms < ?2 ORDER BY id")?;
            stmt.query_map(params![from_ms, to_ms], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        let mut batches = 0;
        for chunk in ids.chunks(max.max(1)) {
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            tx.execute(
                "UPDATE readings SET fwd = 3 WHERE id BETWEEN ?1 AND ?2 AND fwd = 0 AND ts_ms >= ?3 AND ts_ms < ?4",
                params![first, last, from_ms, to_ms],
            )?;
            let batch_id: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_batch_id'", [], |r| r.get(0))?;
            tx.execute(
                "INSERT INTO outbox (batch_id, first_id, last_id, count, created_ms, kind)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'backfill')",
                params![batch_id, first, last, chunk.len() as i64, now_ms],
            )?;
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_batch_id'", [batch_id + 1])?;
            batches += 1;
        }
        tx.commit()?;
        Ok((batches, ids.len() as u64))
    }

    /// The cloud durably accepted `batch_id`: drop it from the outbox and move
    /// the cursor past every reading that is now known to be in the cloud.
    pub fn complete_batch(&mut self, batch_id: u64) -> Result<(), LogError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        retire(&tx, batch_id)?;
        tx.commit()?;
        Ok(())
    }
}

/// Drops `batch_id` from the outbox and moves the pointers past it.
pub(super) fn retire(tx: &rusqlite::Transaction<'_>, batch_id: u64) -> Result<(), rusqlite::Error> {
    tx.execute("DELETE FROM outbox WHERE batch_id = ?1", [batch_id as i64])?;
    recompute_pointers(tx)
}

/// `cursor` and `agg_done` from the outbox: everything before the oldest
/// batch of its kind still pending has been accepted.
pub(super) fn recompute_pointers(tx: &rusqlite::Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute(
        "UPDATE meta SET value = coalesce(
            (SELECT min(first_id) - 1 FROM outbox WHERE kind = 'readings'),
            (SELECT value FROM meta WHERE key = 'assigned_upto'))
         WHERE key = 'cursor'",
        [],
    )?;
    tx.execute(
        "UPDATE meta SET value = coalesce(
            (SELECT min(first_id) - 1 FROM outbox WHERE kind = 'aggregates'),
            (SELECT value FROM meta WHERE key = 'agg_assigned_upto'))
         WHERE key = 'agg_done'",
        [],
    )?;
    Ok(())
}

/// Outbox batch `batch_id`, if it is there.
pub(super) fn outbox_entry(
    tx: &rusqlite::Transaction<'_>,
    batch_id: u64,
) -> Result<Option<OutboxEntry>, rusqlite::Error> {
    tx.query_row(
        "SELECT batch_id, first_id, last_id, count, created_ms, kind FROM outbox WHERE batch_id = ?1",
        [batch_id as i64],
        outbox_row,
    )
    .optional()
}

pub(super) fn outbox_row(r: &rusqlite::Row<'_>) -> Result<OutboxEntry, rusqlite::Error> {
    Ok(OutboxEntry {
        batch_id: r.get::<_, i64>(0)? as u64,
        first_id: r.get(1)?,
        last_id: r.get(2)?,
        count: r.get::<_, i64>(3)? as u64,
        created_ms: r.get(4)?,
        kind: match r.get::<_, String>(5)?.as_str() {
            "aggregates" => BatchKind::Aggregates,
            "backfill" => BatchKind::Backfill,
            _ => BatchKind::Readings,
        },
    })
}
