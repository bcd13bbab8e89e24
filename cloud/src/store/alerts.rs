//! Alerts in the serving store: what the alert operator derives (alerts,
//! their history, its state, the webhook outbox) is written in the same
//! checkpoint transaction as its log positions; acknowledgements are user
//! input and live in their own table.
//!
//! | table | holds |
//! |---|---|
//! | `alerts(id, rule, kind, severity, device, gateway, state, started_ms, resolved_ms, value, message)` | one row per alert, `firing` or `resolved` |
//! | `alert_events(alert_id, transition, ts_ms, message)` | every lifecycle step |
//! | `alert_state(key, state)` | the operator's state (CBOR), for restore |
//! | `alert_outbox(seq, webhook, alert_id, transition, payload, state, attempts, next_attempt_ms, last_error, done_ms)` | webhook deliveries: `pending`, `delivered` or `dead` (the dead-letter record) |
//! | `alert_acks(alert_id, by, note, at_ms)` | acknowledgements |

use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;

use super::{Columns, StoreError, ViewStore};
use crate::model::{AlertChanges, AlertEvent, AlertRecord, Severity};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, rule TEXT NOT NULL, kind TEXT NOT NULL, severity TEXT NOT NULL, device TEXT NOT NULL,
    gateway TEXT NOT NULL, state TEXT NOT NULL, started_ms INTEGER NOT NULL, resolved_ms INTEGER,
    value REAL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_by_start ON alerts (started_ms);
CREATE INDEX IF NOT EXISTS alerts_by_device ON alerts (device, started_ms);
CREATE TABLE IF NOT EXISTS alert_events (
    alert_id TEXT NOT NULL, transition TEXT NOT NULL, ts_ms INTEGER NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (alert_id, transition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_state (key TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, webhook TEXT NOT NULL, alert_id TEXT NOT NULL, transition TEXT NOT NULL,
    payload TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', done_ms INTEGER,
    UNIQUE (webhook, alert_id, transition));
CREATE INDEX IF NOT EXISTS alert_outbox_pending ON alert_outbox (webhook, state, seq);
CREATE TABLE IF NOT EXISTS alert_acks (alert_id TEXT PRIMARY KEY, by TEXT NOT NULL, note TEXT NOT NULL, at_ms INTEGER NOT NULL);
";

/// Writes the alert part of a checkpoint inside its transaction.
pub(super) fn write(tx: &Transaction<'_>, ch: &AlertChanges) -> Result<(), rusqlite::Error> {
    let mut st = tx.prepare_cached(
        "INSERT INTO alert_state (key, state) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET state = excluded.state",
    )?;
    for (k, blob) in &ch.state_upserts {
        st.execute(params![k, blob])?;
    }
    // A resolve only moves the state: what the alert fired with stays.
    let mut up = tx.prepare_cached(
        "INSERT INTO alerts (id, rule, kind, severity, device, gateway, state, started_ms, resolved_ms, value, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, resolved_ms = excluded.resolved_ms",
    )?;
    for a in &ch.alerts {
        up.execute(params![
            a.id,
            a.rule,
            a.kind,
            a.severity.as_str(),
            a.device,
            a.gateway,
            a.state,
            a.started_ms,
            a.resolved_ms,
            a.value,
            a.message
        ])?;
    }
    let mut ev = tx.prepare_cached(
        "INSERT OR IGNORE INTO alert_events (alert_id, transition, ts_ms, message) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for e in &ch.events {
        ev.execute(params![e.alert_id, e.transition, e.ts_ms, e.message])?;
    }
    // A transition replayed after a crash is already here: not queued twice.
    let mut ob = tx.prepare_cached(
        "INSERT OR IGNORE INTO alert_outbox (webhook, alert_id, transition, payload) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for o in &ch.outbox {
        ob.execute(params![o.webhook, o.alert_id, o.transition, o.payload])?;
    }
    Ok(())
}

/// Filters for listing alerts.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    pub state: Option<String>,
    pub min_severity: Option<Severity>,
    pub device: Option<String>,
    pub rule: Option<String>,
    /// Alerts that started in `[from, to)`.
    pub from: i64,
    pub to: i64,
    /// Resume after this `(started_ms, id)` (newest first).
    pub after: Option<(i64, String)>,
    pub limit: usize,
}

/// An alert with its acknowledgement, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertView {
    #[serde(flatten)]
    pub alert: AlertRecord,
    pub acked: Option<Ack>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub by: String,
    pub note: String,
    pub at_ms: i64,
}

/// One webhook delivery, as the API and tests see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub seq: i64,
    pub webhook: String,
    pub alert_id: String,
    pub transition: String,
    pub payload: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: String,
}

/// One alert with its history and deliveries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertDetail {
    #[serde(flatten)]
    pub view: AlertView,
    pub history: Vec<AlertEvent>,
    pub deliveries: Vec<Delivery>,
}

pub(crate) const ALERT_COLUMNS: &str =
    "a.id, a.rule, a.kind, a.severity, a.device, a.gateway, a.state, a.started_ms, a.resolved_ms,
     a.value, a.message, k.by, k.note, k.at_ms";

/// An alert and its acknowledgement from a row of [`ALERT_COLUMNS`] (in
/// PostgreSQL `k.by` is `k.acked_by`).
pub(crate) fn alert_row<R: Columns>(r: &R) -> Result<AlertView, R::Error> {
    let severity: String = r.col(3)?;
    let by: Option<String> = r.col(11)?;
    Ok(AlertView {
        alert: AlertRecord {
            id: r.col(0)?,
            rule: r.col(1)?,
            kind: r.col(2)?,
            severity: Severity::parse(&severity).unwrap_or(Severity::Warning),
            device: r.col(4)?,
            gateway: r.col(5)?,
            state: r.col(6)?,
            started_ms: r.col(7)?,
            resolved_ms: r.col(8)?,
            value: r.col(9)?,
            message: r.col(10)?,
        },
        acked: match by {
            Some(by) => Some(Ack { by, note: r.col(12)?, at_ms: r.col(13)? }),
            None => None,
        },
    })
}

/// A delivery from a row of [`DELIVERY_COLUMNS`].
pub(crate) fn delivery_row<R: Columns>(r: &R) -> Result<Delivery, R::Error> {
    Ok(Delivery {
        seq: r.col(0)?,
        webhook: r.col(1)?,
        alert_id: r.col(2)?,
        transition: r.col(3)?,
        payload: r.col(4)?,
        state: r.col(5)?,
        attempts: u32::try_from(r.col::<i64>(6)?).unwrap_or(u32::MAX),
        next_attempt_ms: r.col(7)?,
        last_error: r.col(8)?,
    })
}

/// The outcome of one delivery attempt, to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub seq: i64,
    /// `delivered`, `pending` (retry at `next_attempt_ms`) or `dead`.
    pub state: &'static str,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub error: String,
    pub now_ms: i64,
}

impl Attempt {
    /// When the row is done with (`delivered` or `dead`).
    pub(crate) fn done_ms(&self) -> Option<i64> {
        (self.state != "pending").then_some(self.now_ms)
    }
}

impl Delivery {
    /// What receivers deduplicate on: `{alert id}:{transition}`.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.alert_id, self.transition)
    }
}

pub(crate) const DELIVERY_COLUMNS: &str =
    "seq, webhook, alert_id, transition, payload, state, attempts, next_attempt_ms, last_error";

impl ViewStore {
    /// The alert operator's stored state.
    pub fn alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT key, state FROM alert_state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Alerts matching `q`, newest start first.
    pub fn alerts(&self, q: &AlertQuery) -> Result<Vec<AlertView>, StoreError> {
        let severities: Vec<&str> = [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .filter(|s| q.min_severity.is_none_or(|m| *s >= m))
            .map(Severity::as_str)
            .collect();
        let (after_ts, after_id) = q.after.clone().unwrap_or((i64::MAX, String::new()));
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM alerts a LEFT JOIN alert_acks k ON k.alert_id = a.id
             WHERE a.started_ms >= ?1 AND a.started_ms < ?2
               AND (?3 IS NULL OR a.state = ?3) AND (?4 IS NULL OR a.device = ?4) AND (?5 IS NULL OR a.rule = ?5)
               AND a.severity IN (SELECT value FROM json_each(?6))
               AND (a.started_ms < ?7 OR (a.started_ms = ?7 AND a.id < ?8))
             ORDER BY a.started_ms DESC, a.id DESC LIMIT ?9"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let sev = serde_json::to_string(&severities).unwrap_or_else(|_| "[]".into());
        let rows = stmt
            .query_map(
                params![q.from, q.to, q.state, q.device, q.rule, sev, after_ts, after_id, q.limit as i64],
                |r| alert_row(r),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One alert with its history and deliveries.
    pub fn alert(&self, id: &str) -> Result<Option<AlertDetail>, StoreError> {
        let sql =
            format!("SELECT {ALERT_COLUMNS} FROM alerts a LEFT JOIN alert_acks k ON k.alert_id = a.id WHERE a.id = ?1");
        let Some(view) = self.conn.query_row(&sql, [id], |r| alert_row(r)).optional()? else { return Ok(None) };
        let mut stmt = self.conn.prepare(
            "SELECT alert_id, transition, ts_ms, message FROM alert_events WHERE alert_id = ?1 ORDER BY ts_ms, transition",
        )?;
        let history = stmt
            .query_map([id], |r| {
                Ok(AlertEvent { alert_id: r.get(0)?, transition: r.get(1)?, ts_ms: r.get(2)?, message: r.get(3)? })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {DELIVERY_COLUMNS} FROM alert_outbox WHERE alert_id = ?1 ORDER BY seq"))?;
        let deliveries = stmt.query_map([id], |r| delivery_row(r))?.collect::<Result<Vec<_>, _>>()?;
        Ok(Some(AlertDetail { view, history, deliveries }))
    }

    /// Acknowledges an alert; false if there is no such alert. A second
    /// acknowledgement replaces the first.
    pub fn ack_alert(&mut self, id: &str, by: &str, note: &str, at_ms: i64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let exists = tx.query_row("SELECT 1 FROM alerts WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some();
        if exists {
            tx.execute(
                "INSERT INTO alert_acks (alert_id, by, note, at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (alert_id) DO UPDATE SET by = excluded.by, note = excluded.note, at_ms = excluded.at_ms",
                params![id, by, note, at_ms],
            )?;
        }
        tx.commit()?;
        Ok(exists)
    }

    /// The oldest pending delivery of `webhook` (deliveries go out in order).
    pub fn next_delivery(&self, webhook: &str) -> Result<Option<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM alert_outbox WHERE webhook = ?1 AND state = 'pending' ORDER BY seq LIMIT 1"
        );
        Ok(self.conn.query_row(&sql, [webhook], |r| delivery_row(r)).optional()?)
    }

    /// Records the outcome of a delivery attempt.
    pub fn record_attempt(&mut self, a: &Attempt) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE alert_outbox SET state = ?2, attempts = ?3, next_attempt_ms = ?4, last_error = ?5, done_ms = ?6
             WHERE seq = ?1",
            params![a.seq, a.state, a.attempts, a.next_attempt_ms, a.error, a.done_ms()],
        )?;
        Ok(())
    }

    /// Deliveries in each state, for metrics and tests.
    pub fn delivery_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT webhook, state, count(*) FROM alert_outbox GROUP BY webhook, state ORDER BY 1, 2")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every alert and its history as text, for comparing two runs.
    pub fn dump_alerts(&self) -> Result<String, StoreError> {
        let mut out = String::new();
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts a LEFT JOIN alert_acks k ON k.alert_id = a.id ORDER BY a.id"
        ))?;
        for view in stmt.query_map([], |r| alert_row(r))? {
            out.push_str(&alert_dump_line(&view?.alert));
        }
        let mut stmt =
            self.conn.prepare("SELECT alert_id, transition, ts_ms FROM alert_events ORDER BY alert_id, transition")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            out.push_str(&format!(
                "event {} {} {}\n",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?
            ));
        }
        Ok(out)
    }
}

/// One alert in a dump (without its gateway and acknowledgement).
pub(crate) fn alert_dump_line(a: &AlertRecord) -> String {
    format!(
        "{} {} {} {} {} {} {} {:?} {:?} {}\n",
        a.id,
        a.rule,
        a.kind,
        a.severity.as_str(),
        a.device,
        a.state,
        a.started_ms,
        a.resolved_ms,
        a.value,
        a.message
    )
}

/// The outbox as a deliverer uses it.
pub trait Outbox: Send {
    /// The oldest pending delivery of `target`; none while another process
    /// delivers for `target`.
    fn next_delivery(&mut self, target: &str) -> Result<Option<Delivery>, StoreError>;
    /// Records the outcome of an attempt.
    fn record_attempt(&mut self, attempt: &Attempt) -> Result<(), StoreError>;
    /// Deliveries per target and state.
    fn delivery_counts(&mut self) -> Result<Vec<(String, String, u64)>, StoreError>;
}

impl Outbox for ViewStore {
    fn next_delivery(&mut self, target: &str) -> Result<Option<Delivery>, StoreError> {
        ViewStore::next_delivery(self, target)
    }

    fn record_attempt(&mut self, attempt: &Attempt) -> Result<(), StoreError> {
        ViewStore::record_attempt(self, attempt)
    }

    fn delivery_counts(&mut self) -> Result<Vec<(String, String, u64)>, StoreError> {
        ViewStore::delivery_counts(self)
    }
}
