//! Alerts and edge aggregates in the cluster store: the tables of
//! [`crate::store::alerts`] and [`crate::store::aggregates`], in PostgreSQL.
//!
//! The node that runs the alert and aggregate pipelines on a cluster claims
//! every partition of each pipeline (`alerts`, `aggregates`) and checkpoints
//! them here, fenced like a worker's (see the parent module), so a second
//! node that starts them takes over and the first can no longer write. The
//! webhook and Kafka deliverers read the outbox from here; one process at a
//! time delivers for a target, the holder of its advisory lock.
//!
//! | table | holds |
//! |---|---|
//! | `alerts`, `alert_events`, `alert_state`, `alert_outbox`, `alert_acks` | as in the embedded store; `alert_acks.acked_by` is its `by` (a keyword here) |
//! | `edge_aggregates`, `edge_aggregate_parts` | as in the embedded store |
//! | `pipeline_meta(pipeline, global_watermark)` | the watermark of a pipeline one process runs on every partition |

use postgres::Transaction;

use super::{Context, PgStore, lock_key, to_i64};
use crate::model::{AlertChanges, AlertEvent, Severity};
use crate::store::StoreError;
use crate::store::aggregates::{AGGREGATE_COLUMNS, AggregatePart, AggregateQuery, AggregateRow, aggregate_row};
use crate::store::alerts::{
    ALERT_COLUMNS, AlertDetail, AlertQuery, AlertView, Attempt, DELIVERY_COLUMNS, Delivery, alert_dump_line, alert_row,
    delivery_row,
};

/// `{s}` stands for the quoted schema name.
pub(super) const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS {s}.alerts (
    id text COLLATE "C" PRIMARY KEY, rule text NOT NULL, kind text NOT NULL, severity text NOT NULL,
    device text COLLATE "C" NOT NULL, gateway text NOT NULL, state text NOT NULL, started_ms int8 NOT NULL,
    resolved_ms int8, value float8, message text NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_by_start ON {s}.alerts (started_ms, id);
CREATE INDEX IF NOT EXISTS alerts_by_device ON {s}.alerts (device, started_ms);
CREATE TABLE IF NOT EXISTS {s}.alert_events (
    alert_id text COLLATE "C" NOT NULL, transition text COLLATE "C" NOT NULL, ts_ms int8 NOT NULL,
    message text NOT NULL,
    PRIMARY KEY (alert_id, transition));
CREATE TABLE IF NOT EXISTS {s}.alert_state (key text COLLATE "C" PRIMARY KEY, state bytea NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.alert_outbox (
    seq int8 GENERATED ALWAYS AS IDENTITY PRIMARY KEY, webhook text COLLATE "C" NOT NULL,
    alert_id text COLLATE "C" NOT NULL, transition text NOT NULL, payload text NOT NULL,
    state text NOT NULL DEFAULT 'pending', attempts int8 NOT NULL DEFAULT 0, next_attempt_ms int8 NOT NULL DEFAULT 0,
    last_error text NOT NULL DEFAULT '', done_ms int8,
    UNIQUE (webhook, alert_id, transition));
CREATE INDEX IF NOT EXISTS alert_outbox_pending ON {s}.alert_outbox (webhook, state, seq);
CREATE TABLE IF NOT EXISTS {s}.alert_acks (
    alert_id text COLLATE "C" PRIMARY KEY, acked_by text NOT NULL, note text NOT NULL, at_ms int8 NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.edge_aggregates (
    device text COLLATE "C" NOT NULL, metric text COLLATE "C" NOT NULL, window_ms int8 NOT NULL,
    start_ms int8 NOT NULL, count int8 NOT NULL, min float8 NOT NULL, max float8 NOT NULL, sum float8 NOT NULL,
    sum_sq float8 NOT NULL, first_ts int8 NOT NULL, first float8 NOT NULL, last_ts int8 NOT NULL,
    last float8 NOT NULL,
    PRIMARY KEY (device, metric, window_ms, start_ms));
CREATE TABLE IF NOT EXISTS {s}.edge_aggregate_parts (
    gateway text COLLATE "C" NOT NULL, batch_id int8 NOT NULL, device text COLLATE "C" NOT NULL,
    metric text COLLATE "C" NOT NULL, window_ms int8 NOT NULL, start_ms int8 NOT NULL,
    PRIMARY KEY (gateway, batch_id, device, metric, window_ms, start_ms));
CREATE TABLE IF NOT EXISTS {s}.pipeline_meta (pipeline text COLLATE "C" PRIMARY KEY, global_watermark int8);
"#;

/// Writes the alert part of a checkpoint inside its transaction, as the
/// embedded store does: a resolve moves only the state, a transition or a
/// delivery replayed after a crash is not stored twice.
pub(super) fn write_alerts(tx: &mut Transaction<'_>, s: &str, ch: &AlertChanges) -> Result<(), StoreError> {
    if !ch.state_upserts.is_empty() {
        let states = super::keep_last(ch.state_upserts.iter().collect(), |(k, _)| k.as_str());
        let keys: Vec<&str> = states.iter().map(|(k, _)| k.as_str()).collect();
        let blobs: Vec<&[u8]> = states.iter().map(|(_, b)| b.as_slice()).collect();
        tx.execute(
            &format!(
                "INSERT INTO {s}.alert_state (key, state) SELECT * FROM UNNEST($1::text[], $2::bytea[])
                 ON CONFLICT (key) DO UPDATE SET state = EXCLUDED.state"
            ),
            &[&keys, &blobs],
        )
        .context("writing the alert state")?;
    }
    let upsert = tx
        .prepare(&format!(
            "INSERT INTO {s}.alerts (id, rule, kind, severity, device, gateway, state, started_ms, resolved_ms, value,
                                     message)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, resolved_ms = EXCLUDED.resolved_ms"
        ))
        .context("writing alerts")?;
    for a in &ch.alerts {
        tx.execute(
            &upsert,
            &[
                &a.id,
                &a.rule,
                &a.kind,
                &a.severity.as_str(),
                &a.device,
                &a.gateway,
                &a.state,
                &a.started_ms,
                &a.resolved_ms,
                &a.value,
                &a.message,
            ],
        )
        .with_context(|| format!("writing alert {}", a.id))?;
    }
    let event = tx
        .prepare(&format!(
            "INSERT INTO {s}.alert_events (alert_id, transition, ts_ms, message) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING"
        ))
        .context("writing alert history")?;
    for e in &ch.events {
        tx.execute(&event, &[&e.alert_id, &e.transition, &e.ts_ms, &e.message])
            .with_context(|| format!("writing the history of alert {}", e.alert_id))?;
    }
    let queue = tx
        .prepare(&format!(
            "INSERT INTO {s}.alert_outbox (webhook, alert_id, transition, payload) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING"
        ))
        .context("queueing alert deliveries")?;
    for o in &ch.outbox {
        tx.execute(&queue, &[&o.webhook, &o.alert_id, &o.transition, &o.payload])
            .with_context(|| format!("queueing a delivery of alert {} to {}", o.alert_id, o.webhook))?;
    }
    Ok(())
}

/// Merges partials not merged before into their rows, inside the
/// checkpoint's transaction (see [`crate::store::aggregates`]).
pub(super) fn merge_aggregates(tx: &mut Transaction<'_>, s: &str, parts: &[AggregatePart]) -> Result<(), StoreError> {
    if parts.is_empty() {
        return Ok(());
    }
    let first_time = tx
        .prepare(&format!(
            "INSERT INTO {s}.edge_aggregate_parts (gateway, batch_id, device, metric, window_ms, start_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
        ))
        .context("merging edge aggregates")?;
    // Every expression of an UPDATE sees the row as it was.
    let merge = tx
        .prepare(&format!(
            "INSERT INTO {s}.edge_aggregates AS t
                 (device, metric, window_ms, start_ms, count, min, max, sum, sum_sq, first_ts, first, last_ts, last)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (device, metric, window_ms, start_ms) DO UPDATE SET
                 count = t.count + EXCLUDED.count,
                 min = LEAST(t.min, EXCLUDED.min),
                 max = GREATEST(t.max, EXCLUDED.max),
                 sum = t.sum + EXCLUDED.sum,
                 sum_sq = t.sum_sq + EXCLUDED.sum_sq,
                 first = CASE WHEN EXCLUDED.first_ts < t.first_ts THEN EXCLUDED.first ELSE t.first END,
                 first_ts = LEAST(t.first_ts, EXCLUDED.first_ts),
                 last = CASE WHEN EXCLUDED.last_ts >= t.last_ts THEN EXCLUDED.last ELSE t.last END,
                 last_ts = GREATEST(t.last_ts, EXCLUDED.last_ts)"
        ))
        .context("merging edge aggregates")?;
    for part in parts {
        let a = &part.aggregate;
        let batch = to_i64(part.batch_id, "batch id")?;
        let what = || format!("merging the {} aggregate of {} from gateway {}", a.metric, a.device, part.gateway);
        let new = tx
            .execute(&first_time, &[&part.gateway, &batch, &a.device, &a.metric, &a.window_ms, &a.start_ms])
            .with_context(what)?;
        if new == 0 {
            continue;
        }
        let count = to_i64(a.count, "count")?;
        tx.execute(
            &merge,
            &[
                &a.device,
                &a.metric,
                &a.window_ms,
                &a.start_ms,
                &count,
                &a.min,
                &a.max,
                &a.sum,
                &a.sum_sq,
                &a.first_ts,
                &a.first,
                &a.last_ts,
                &a.last,
            ],
        )
        .with_context(what)?;
    }
    Ok(())
}

/// [`crate::store::alerts::ALERT_COLUMNS`] with the acknowledger's column of this store.
fn alert_columns() -> String {
    ALERT_COLUMNS.replace("k.by", "k.acked_by")
}

impl PgStore {
    /// The alert operator's stored state.
    pub(super) fn read_alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .borrow_mut()
            .query(&format!("SELECT key, state FROM {s}.alert_state ORDER BY key"), &[])
            .context("reading the alert state")?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// Alerts matching `q`, newest start first, as [`crate::store::ViewStore::alerts`] pages them.
    pub fn alerts(&self, q: &AlertQuery) -> Result<Vec<AlertView>, StoreError> {
        let s = &self.s;
        let cols = alert_columns();
        let severities: Vec<&str> = [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .filter(|sev| q.min_severity.is_none_or(|m| *sev >= m))
            .map(Severity::as_str)
            .collect();
        let (after_ts, after_id) = q.after.clone().unwrap_or((i64::MAX, String::new()));
        let limit = q.limit as i64;
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!(
                    "SELECT {cols} FROM {s}.alerts a LEFT JOIN {s}.alert_acks k ON k.alert_id = a.id
                     WHERE a.started_ms >= $1 AND a.started_ms < $2
                       AND ($3::text IS NULL OR a.state = $3) AND ($4::text IS NULL OR a.device = $4)
                       AND ($5::text IS NULL OR a.rule = $5) AND a.severity = ANY($6)
                       AND (a.started_ms < $7 OR (a.started_ms = $7 AND a.id < $8))
                     ORDER BY a.started_ms DESC, a.id DESC LIMIT $9"
                ),
                &[&q.from, &q.to, &q.state, &q.device, &q.rule, &severities, &after_ts, &after_id, &limit],
            )
            .context("reading alerts")?;
        Ok(rows.iter().map(alert_row).collect::<Result<_, _>>()?)
    }

    /// One alert with its history and deliveries.
    pub fn alert(&self, id: &str) -> Result<Option<AlertDetail>, StoreError> {
        let s = &self.s;
        let cols = alert_columns();
        let mut client = self.client.borrow_mut();
        let what = || format!("reading alert {id}");
        let Some(row) = client
            .query_opt(
                &format!(
                    "SELECT {cols} FROM {s}.alerts a LEFT JOIN {s}.alert_acks k ON k.alert_id = a.id
                     WHERE a.id = $1"
                ),
                &[&id],
            )
            .with_context(what)?
        else {
            return Ok(None);
        };
        let view = alert_row(&row)?;
        let history = client
            .query(
                &format!(
                    "SELECT alert_id, transition, ts_ms, message FROM {s}.alert_events WHERE alert_id = $1
                     ORDER BY ts_ms, transition"
                ),
                &[&id],
            )
            .with_context(what)?
            .iter()
            .map(|r| {
                Ok(AlertEvent {
                    alert_id: r.try_get(0)?,
                    transition: r.try_get(1)?,
                    ts_ms: r.try_get(2)?,
                    message: r.try_get(3)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let deliveries = client
            .query(&format!("SELECT {DELIVERY_COLUMNS} FROM {s}.alert_outbox WHERE alert_id = $1 ORDER BY seq"), &[&id])
            .with_context(what)?
            .iter()
            .map(delivery_row)
            .collect::<Result<_, _>>()?;
        Ok(Some(AlertDetail { view, history, deliveries }))
    }

    /// Acknowledges an alert; false if there is no such alert. A second
    /// acknowledgement replaces the first.
    pub fn ack_alert(&self, id: &str, by: &str, note: &str, at_ms: i64) -> Result<bool, StoreError> {
        let s = &self.s;
        // One statement: the alert is checked and acknowledged atomically.
        let n = self
            .client
            .borrow_mut()
            .execute(
                &format!(
                    "INSERT INTO {s}.alert_acks (alert_id, acked_by, note, at_ms)
                     SELECT id, $2, $3, $4 FROM {s}.alerts WHERE id = $1
                     ON CONFLICT (alert_id) DO UPDATE
                     SET acked_by = EXCLUDED.acked_by, note = EXCLUDED.note, at_ms = EXCLUDED.at_ms"
                ),
                &[&id, &by, &note, &at_ms],
            )
            .with_context(|| format!("acknowledging alert {id}"))?;
        Ok(n > 0)
    }

    /// Takes the delivery lock of `target` for this connection if no other
    /// connection holds it: true if this one holds it now.
    pub fn try_lock_deliveries(&self, target: &str) -> Result<bool, StoreError> {
        let key = lock_key(&format!("{} outbox {target}", self.schema));
        self.client
            .borrow_mut()
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .and_then(|r| r.try_get(0))
            .with_context(|| format!("taking the delivery lock of {target}"))
    }

    /// The oldest pending delivery of `webhook` (deliveries go out in order).
    pub fn next_delivery(&self, webhook: &str) -> Result<Option<Delivery>, StoreError> {
        let s = &self.s;
        self.client
            .borrow_mut()
            .query_opt(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM {s}.alert_outbox WHERE webhook = $1 AND state = 'pending'
                     ORDER BY seq LIMIT 1"
                ),
                &[&webhook],
            )
            .with_context(|| format!("reading the outbox of {webhook}"))?
            .as_ref()
            .map(delivery_row)
            .transpose()
            .map_err(StoreError::from)
    }

    /// Records the outcome of a delivery attempt.
    pub fn record_attempt(&self, a: &Attempt) -> Result<(), StoreError> {
        let s = &self.s;
        self.client
            .borrow_mut()
            .execute(
                &format!(
                    "UPDATE {s}.alert_outbox
                     SET state = $2, attempts = $3, next_attempt_ms = $4, last_error = $5, done_ms = $6
                     WHERE seq = $1"
                ),
                &[&a.seq, &a.state, &i64::from(a.attempts), &a.next_attempt_ms, &a.error, &a.done_ms()],
            )
            .with_context(|| format!("recording delivery {}", a.seq))?;
        Ok(())
    }

    /// Deliveries in each state, for metrics and tests.
    pub fn delivery_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!("SELECT webhook, state, count(*) FROM {s}.alert_outbox GROUP BY webhook, state ORDER BY 1, 2"),
                &[],
            )
            .context("counting deliveries")?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?, super::to_u64(r.try_get(2)?, "count")?))).collect()
    }

    /// Every alert and its history, in the format of
    /// [`crate::store::ViewStore::dump_alerts`]: the two compare byte for byte.
    pub fn dump_alerts(&self) -> Result<String, StoreError> {
        let s = &self.s;
        let cols = alert_columns();
        let mut client = self.client.borrow_mut();
        let mut out = String::new();
        let alerts = client
            .query(
                &format!(
                    "SELECT {cols} FROM {s}.alerts a LEFT JOIN {s}.alert_acks k ON k.alert_id = a.id
                     ORDER BY a.id"
                ),
                &[],
            )
            .context("dumping alerts")?;
        for r in &alerts {
            out.push_str(&alert_dump_line(&alert_row(r)?.alert));
        }
        let events = client
            .query(
                &format!("SELECT alert_id, transition, ts_ms FROM {s}.alert_events ORDER BY alert_id, transition"),
                &[],
            )
            .context("dumping alert history")?;
        for r in &events {
            let (id, transition, ts): (&str, &str, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            out.push_str(&format!("event {id} {transition} {ts}\n"));
        }
        Ok(out)
    }

    /// Merged edge aggregates, ordered by device, metric, window size and start.
    pub fn aggregates(&self, q: &AggregateQuery) -> Result<Vec<AggregateRow>, StoreError> {
        let s = &self.s;
        let (ad, am, aw, as_) = q.after.clone().unwrap_or_default();
        let limit = q.limit as i64;
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!(
                    "SELECT {AGGREGATE_COLUMNS}
                     FROM {s}.edge_aggregates
                     WHERE ($1::text IS NULL OR device = $1) AND ($2::text IS NULL OR metric = $2)
                       AND ($3::int8 IS NULL OR window_ms = $3) AND start_ms >= $4 AND start_ms < $5
                       AND (NOT $6 OR (device, metric, window_ms, start_ms) > ($7, $8, $9, $10))
                     ORDER BY device, metric, window_ms, start_ms LIMIT $11"
                ),
                &[&q.device, &q.metric, &q.window_ms, &q.from, &q.to, &q.after.is_some(), &ad, &am, &aw, &as_, &limit],
            )
            .context("reading edge aggregates")?;
        Ok(rows.iter().map(|r| aggregate_row(r).map(AggregateRow::from)).collect::<Result<_, _>>()?)
    }

    /// Every merged edge aggregate, one line each in a canonical order.
    pub fn dump_aggregates(&self) -> Result<String, StoreError> {
        Ok(self.aggregates(&AggregateQuery::everything())?.iter().map(crate::store::aggregates::dump_line).collect())
    }

    /// A pipeline's global watermark (kept for pipelines that one process
    /// runs on every partition).
    pub(super) fn global_watermark(&self, pipeline: &str) -> Result<Option<i64>, StoreError> {
        let s = &self.s;
        Ok(self
            .client
            .borrow_mut()
            .query_opt(&format!("SELECT global_watermark FROM {s}.pipeline_meta WHERE pipeline = $1"), &[&pipeline])
            .with_context(|| format!("reading the watermark of pipeline {pipeline}"))?
            .map(|r| r.try_get::<_, Option<i64>>(0))
            .transpose()?
            .flatten())
    }
}

/// Records a pipeline's global watermark inside a checkpoint's transaction.
pub(super) fn write_global_watermark(
    tx: &mut Transaction<'_>,
    s: &str,
    pipeline: &str,
    watermark: i64,
) -> Result<(), StoreError> {
    tx.execute(
        &format!(
            "INSERT INTO {s}.pipeline_meta (pipeline, global_watermark) VALUES ($1, $2)
             ON CONFLICT (pipeline) DO UPDATE SET global_watermark = EXCLUDED.global_watermark"
        ),
        &[&pipeline, &watermark],
    )
    .with_context(|| format!("recording the watermark of pipeline {pipeline}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kappa_common::aggregate::Aggregate;

    use super::super::tests::{LOG_PARTITIONS, TestSchema, device_in};
    use super::*;
    use crate::model::{AlertRecord, OutboxItem};
    use crate::store::{Checkpoint, ProcessorStore, ViewStore};

    fn alert(id: &str, device: &str, state: &str, started_ms: i64) -> AlertRecord {
        AlertRecord {
            id: id.into(),
            rule: "hot".into(),
            kind: "threshold".into(),
            severity: Severity::Critical,
            device: device.into(),
            gateway: "gw-1".into(),
            state: state.into(),
            started_ms,
            resolved_ms: (state == "resolved").then_some(started_ms + 500),
            value: Some(81.25),
            message: format!("{device} is hot"),
        }
    }

    fn part(batch_id: u64, device: &str, ts: i64, value: f64) -> AggregatePart {
        AggregatePart { gateway: "gw-1".into(), batch_id, aggregate: Aggregate::of(device, "temp", 10_000, ts, value) }
    }

    /// Two checkpoints of the alert and aggregate pipelines: a firing alert,
    /// then its resolution (replayed twice, as after a crash), and partials of
    /// which one arrives again in a later batch's checkpoint.
    fn checkpoints(pipeline: &str, d: &str) -> Vec<Checkpoint> {
        let fired = AlertChanges {
            state_upserts: vec![(format!("hot/{d}"), vec![1]), (format!("hot/{d}"), vec![2])],
            alerts: vec![alert("a-1", d, "firing", 1_000), alert("a-2", "other", "firing", 2_000)],
            events: vec![AlertEvent {
                alert_id: "a-1".into(),
                transition: "fired".into(),
                ts_ms: 1_000,
                message: "m".into(),
            }],
            outbox: vec![OutboxItem {
                webhook: "ops".into(),
                alert_id: "a-1".into(),
                transition: "fired".into(),
                payload: "{}".into(),
            }],
        };
        let resolved = AlertChanges {
            state_upserts: vec![(format!("hot/{d}"), vec![3])],
            alerts: vec![alert("a-1", d, "resolved", 1_000)],
            events: vec![AlertEvent {
                alert_id: "a-1".into(),
                transition: "resolved".into(),
                ts_ms: 1_500,
                message: "m".into(),
            }],
            outbox: vec![OutboxItem {
                webhook: "ops".into(),
                alert_id: "a-1".into(),
                transition: "resolved".into(),
                payload: "{}".into(),
            }],
        };
        let positions = |o: u64| (0..LOG_PARTITIONS).map(|p| (p, o, Some(1_000))).collect::<Vec<_>>();
        vec![
            Checkpoint {
                pipeline: pipeline.into(),
                partitions: positions(5),
                global_watermark: Some(900),
                alerts: Some(fired),
                aggregates: vec![part(1, d, 1_000, 20.0), part(2, d, 2_000, 30.5), part(3, d, 9_000, 10.0)],
                ..Checkpoint::default()
            },
            Checkpoint {
                pipeline: pipeline.into(),
                partitions: positions(9),
                global_watermark: Some(1_400),
                alerts: Some(resolved.clone()),
                aggregates: vec![part(3, d, 9_000, 10.0), part(4, d, 500, -4.0), part(4, d, 12_000, 7.0)],
                ..Checkpoint::default()
            },
            Checkpoint {
                pipeline: pipeline.into(),
                partitions: positions(9),
                alerts: Some(resolved),
                ..Checkpoint::default()
            },
        ]
    }

    fn claim_all(store: &mut PgStore, pipeline: &str) {
        store.claim(pipeline, &(0..LOG_PARTITIONS).collect::<Vec<_>>()).unwrap();
    }

    #[test]
    fn alerts_and_aggregates_read_back_as_from_the_embedded_store() {
        let db = TestSchema::new("alerts");
        let dir = tempfile::tempdir().unwrap();
        let mut embedded = ViewStore::open(&dir.path().join("views.sqlite")).unwrap();
        let mut pg = db.connect();
        claim_all(&mut pg, "alerts");
        let d = device_in(1);
        for cp in checkpoints("alerts", &d) {
            embedded.checkpoint(&cp).unwrap();
            pg.checkpoint(&cp).unwrap();
        }

        let dump = embedded.dump_alerts().unwrap();
        assert!(dump.contains("a-1 hot threshold critical") && dump.contains("event a-1 resolved 1500"), "{dump}");
        assert_eq!(pg.dump_alerts().unwrap(), dump);
        let aggregates = embedded.dump_aggregates().unwrap();
        // Window 0: 20, 30.5, -4 and batch 3's 10 once; window 10 s: 7.
        let first = format!("{d} temp 10000 0 4 -4.0 30.5 56.5 1446.25 500 -4.0 9000 10.0");
        assert_eq!(aggregates.lines().next(), Some(first.as_str()), "{aggregates}");
        assert_eq!(aggregates.lines().count(), 2, "{aggregates}");
        assert_eq!(pg.dump_aggregates().unwrap(), aggregates);
        let q = AggregateQuery { device: Some(d.clone()), limit: 2, ..AggregateQuery::everything() };
        assert_eq!(pg.aggregates(&q).unwrap(), embedded.aggregates(&q).unwrap());

        let q = AlertQuery { from: 0, to: i64::MAX, limit: 10, ..AlertQuery::default() };
        assert_eq!(pg.alerts(&q).unwrap(), embedded.alerts(&q).unwrap());
        let page = AlertQuery { after: Some((2_000, "a-2".into())), limit: 1, ..q.clone() };
        assert_eq!(pg.alerts(&page).unwrap(), embedded.alerts(&page).unwrap());
        assert_eq!(pg.alerts(&page).unwrap().len(), 1);
        assert!(pg.ack_alert("a-1", "ana", "on it", 7).unwrap());
        assert!(embedded.ack_alert("a-1", "ana", "on it", 7).unwrap());
        assert!(!pg.ack_alert("nope", "ana", "", 7).unwrap(), "no such alert");
        let detail = pg.alert("a-1").unwrap().unwrap();
        assert_eq!(detail.view.acked.as_ref().map(|a| a.by.as_str()), Some("ana"));
        assert_eq!(detail.deliveries.len(), 2, "fired and resolved, each queued once");
        assert_eq!(Some(detail), embedded.alert("a-1").unwrap());
        assert_eq!(pg.alert("nope").unwrap(), None);

        assert_eq!(pg.alert_state().unwrap(), vec![(format!("hot/{d}"), vec![3])]);
        assert_eq!(pg.restore("alerts").unwrap().global_watermark, Some(1_400));

        let first = pg.next_delivery("ops").unwrap().unwrap();
        assert_eq!(first.transition, "fired");
        let attempt = |seq, state, attempts, error: &str, now_ms| Attempt {
            seq,
            state,
            attempts,
            next_attempt_ms: 99,
            error: error.into(),
            now_ms,
        };
        pg.record_attempt(&attempt(first.seq, "delivered", 1, "", 10)).unwrap();
        let second = pg.next_delivery("ops").unwrap().unwrap();
        pg.record_attempt(&attempt(second.seq, "pending", 1, "HTTP 503", 10)).unwrap();
        let retry = pg.next_delivery("ops").unwrap().unwrap();
        assert_eq!(
            (retry.seq, retry.attempts, retry.next_attempt_ms, retry.last_error.as_str()),
            (second.seq, 1, 99, "HTTP 503")
        );
        pg.record_attempt(&attempt(second.seq, "dead", 2, "HTTP 503", 20)).unwrap();
        assert_eq!(pg.next_delivery("ops").unwrap(), None);
        assert_eq!(
            pg.delivery_counts().unwrap(),
            [("ops".to_string(), "dead".to_string(), 1), ("ops".to_string(), "delivered".to_string(), 1)]
        );
    }

    #[test]
    fn alerts_need_every_partition_and_a_newer_claim_fences_the_older() {
        let db = TestSchema::new("alertfence");
        let d = device_in(0);
        let cps = checkpoints("alerts", &d);
        let mut partial = db.connect();
        partial.claim("alerts", &[0, 1]).unwrap();
        let err = partial.checkpoint(&Checkpoint { partitions: vec![], ..checkpoints("alerts", &d).remove(0) });
        assert!(err.unwrap_err().0.contains("every partition"));

        let mut old = db.connect();
        claim_all(&mut old, "alerts");
        old.checkpoint(&cps[0]).unwrap();
        let mut new = db.connect();
        claim_all(&mut new, "alerts");
        // Alert changes alone (no positions) are fenced too.
        let late = Checkpoint { partitions: vec![], global_watermark: None, ..checkpoints("alerts", &d).remove(1) };
        let err = old.checkpoint(&late).unwrap_err();
        assert!(err.0.contains("fenced"), "{err:?}");
        assert!(!new.dump_alerts().unwrap().contains("resolved"), "nothing of the fenced checkpoint landed");
        assert_eq!(new.restore("alerts").unwrap().global_watermark, Some(900));
        new.checkpoint(&late).unwrap();
        assert!(new.dump_alerts().unwrap().contains("event a-1 resolved"));
    }

    #[test]
    fn one_connection_at_a_time_delivers_for_a_target() {
        let db = TestSchema::new("outboxlock");
        let (a, b) = (db.connect(), db.connect());
        assert!(a.try_lock_deliveries("ops").unwrap());
        assert!(!b.try_lock_deliveries("ops").unwrap(), "a holds it");
        assert!(b.try_lock_deliveries("audit").unwrap(), "another target is free");
        drop(a);
        assert!(b.try_lock_deliveries("ops").unwrap(), "released with its connection");
    }
}
