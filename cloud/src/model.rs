//! What the operators emit and the store keeps: the types between the
//! processing side (views, alerts) and the serving store, below both so that
//! the store never imports an operator.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::eventlog::{Offset, Partition};

/// Packed CBOR of state a checkpoint writes, into a buffer sized for it up
/// front (the encoder writes a few bytes at a time: growing from empty
/// reallocates several times per window). Plain data: encoding cannot fail.
pub fn packed_cbor<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    let mut writer = serde_cbor::ser::IoWrite::new(&mut out);
    if value.serialize(&mut serde_cbor::Serializer::new(&mut writer).packed_format()).is_err() {
        return Vec::new();
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Self::Info),
            "warning" => Some(Self::Warning),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// A stored alert, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub id: String,
    pub rule: String,
    pub kind: String,
    pub severity: Severity,
    pub device: String,
    pub gateway: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// Event time the alert started (for threshold with `for`: when the condition began).
    pub started_ms: i64,
    pub resolved_ms: Option<i64>,
    /// The value that raised it, where there is one.
    pub value: Option<f64>,
    pub message: String,
}

/// One lifecycle step of an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub alert_id: String,
    /// `fired` or `resolved`.
    pub transition: String,
    pub ts_ms: i64,
    pub message: String,
}

/// A webhook delivery to make (the outbox row).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub webhook: String,
    pub alert_id: String,
    pub transition: String,
    pub payload: String,
}

/// What the alert operator adds to a checkpoint.
#[derive(Debug, Default, Clone)]
pub struct AlertChanges {
    pub state_upserts: Vec<(String, Vec<u8>)>,
    pub alerts: Vec<AlertRecord>,
    pub events: Vec<AlertEvent>,
    pub outbox: Vec<OutboxItem>,
}

impl AlertChanges {
    pub fn is_empty(&self) -> bool {
        self.state_upserts.is_empty() && self.alerts.is_empty() && self.events.is_empty() && self.outbox.is_empty()
    }
}

/// A reading (or one of its windows) that arrived too late to count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateEvent {
    pub view: String,
    pub partition: Partition,
    pub offset: Offset,
    pub window_start: i64,
    pub device: String,
    pub boot: u32,
    pub seq: u64,
    pub ts_ms: i64,
    pub watermark_ms: i64,
    pub reason: &'static str,
}

/// A view row to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub window_start: i64,
    pub window_end: Option<i64>,
    /// The aggregates as a JSON object, keys sorted.
    pub values: String,
}

impl Row {
    /// The values, parsed.
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.values).unwrap_or(Json::Null)
    }
}

/// What a checkpoint must write for one view.
#[derive(Debug, Default)]
pub struct Changes {
    pub state_upserts: Vec<(String, i64, Vec<u8>)>,
    pub state_deletes: Vec<(String, i64)>,
    pub row_upserts: Vec<Row>,
    /// Instead of rows, when the operator keeps partials (see
    /// `views::operator::ViewOperator::keeping_partials`): `(key, window
    /// start, window end, window state as CBOR)`.
    pub partial_upserts: Vec<(String, i64, Option<i64>, Vec<u8>)>,
    pub row_deletes: Vec<(String, i64)>,
}
