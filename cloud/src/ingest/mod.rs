//! `POST /v1/ingest`: an edge batch into the event log.
//!
//! The request body is an edge batch (packed CBOR in one zstd frame,
//! `content-encoding: zstd`). Ingest caps the body before reading it, caps
//! decompression by size and ratio, decodes, validates every reading, and
//! appends the valid ones keyed by device id. It answers 200 only after the
//! log has durably accepted them; a batch seen before (same gateway and batch
//! id) is answered 200 with `"duplicate": true` and not appended again.
//!
//! | status | meaning | the edge should |
//! |---|---|---|
//! | 200 | appended (or a duplicate of an appended batch) | advance its cursor |
//! | 400 | the batch is malformed | dead-letter it |
//! | 413 | too large, compressed or decompressed | dead-letter it |
//! | 408 | the body did not arrive within `http.body_read_timeout` | retry |
//! | 415 | not `content-encoding: zstd` | dead-letter it |
//! | 401, 403 | no valid token for this gateway (`[auth]`) | retry (an operator fixes the credential) |
//! | 429 | over `ingest.max_gateway_readings_per_second` (`Retry-After`) | retry after the wait |
//! | 503 | the log cannot take it now (`Retry-After`) | retry |

pub mod bounded;
pub mod config;

pub use bounded::{MAX_PROGRESS_GATEWAYS, MAX_TRACKED_GATEWAYS, ProgressMarks, TrackedGateways};

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kappa_common::batch::{self, BatchError, BatchLimits};
use kappa_common::frame::FrameError;
use kappa_common::record::{self, LogEvent, LogRecord};
use serde::Serialize;

use crate::eventlog::{AppendBatch, AppendOutcome, AppendRecord, EventLogError, LogAppender};
use crate::metrics::CloudMetrics;

/// What the ingest handler needs.
#[derive(Debug)]
pub struct IngestState<A> {
    pub appender: A,
    pub limits: BatchLimits,
    pub reading_limits: kappa_common::reading::ReadingLimits,
    pub metrics: Arc<CloudMetrics>,
    /// Partitions of the log (a heartbeat is written to each).
    pub partitions: u32,
    /// How often per gateway a progress marker goes into the partitions a
    /// batch does not touch (zero: with every batch).
    pub progress_interval: std::time::Duration,
    /// When each gateway's last progress markers were written (bounded).
    pub progress: std::sync::Mutex<ProgressMarks>,
    /// A request body must arrive within this (slow clients get 408).
    pub body_timeout: std::time::Duration,
    /// Which gateway may send what (open when `auth.required` is off).
    pub auth: Arc<crate::auth::Auth>,
    /// Readings per second per gateway (`ingest.max_gateway_readings_per_second`).
    pub gateway_rate: Option<kappa_runtime::rate::KeyedRate>,
    /// Heartbeats per second per gateway (`ingest.max_gateway_heartbeats_per_second`).
    pub heartbeat_rate: kappa_runtime::rate::KeyedRate,
    /// Gateways whose reported status is kept in metrics (bounded).
    pub tracked_gateways: std::sync::Mutex<TrackedGateways>,
}

impl<A> IngestState<A> {
    /// Ingest into `appender` (a log of `partitions`) as `cfg` says, reading
    /// bodies within `body_timeout` and checking tokens with `auth`.
    pub fn new(
        appender: A,
        cfg: &config::IngestConfig,
        partitions: u32,
        body_timeout: std::time::Duration,
        metrics: Arc<CloudMetrics>,
        auth: Arc<crate::auth::Auth>,
    ) -> Self {
        Self {
            appender,
            limits: cfg.batch_limits(),
            reading_limits: kappa_common::reading::ReadingLimits::default(),
            metrics,
            partitions,
            progress_interval: cfg.progress_interval,
            progress: Default::default(),
            body_timeout,
            auth,
            gateway_rate: cfg.gateway_rate(),
            heartbeat_rate: cfg.heartbeat_rate(),
            tracked_gateways: Default::default(),
        }
    }
}

/// What a gateway says about itself with each request (`x-kappa-backlog-readings`,
/// `x-kappa-oldest-unforwarded-seconds`); shown on the dashboard.
fn record_gateway_status<A>(st: &IngestState<A>, gateway: &str, headers: &HeaderMap, now_ms: i64) {
    let admitted = st.tracked_gateways.lock().unwrap_or_else(|p| p.into_inner()).admit(gateway, now_ms);
    match admitted {
        bounded::Tracked::Yes => {}
        bounded::Tracked::Replacing(stale) => {
            let label = [("gateway", stale)];
            st.metrics.gateway_last_batch_seconds.remove(&label);
            st.metrics.gateway_backlog_readings.remove(&label);
            st.metrics.gateway_oldest_unforwarded_age_seconds.remove(&label);
        }
        bounded::Tracked::No => {
            st.metrics.gateways_untracked.inc();
            return;
        }
    }
    let header =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok());
    let label = [("gateway", gateway.to_string())];
    st.metrics.gateway_last_batch_seconds.get_or_create(&label).set(now_ms as f64 / 1000.0);
    if let Some(n) = header("x-kappa-backlog-readings").filter(|n| *n >= 0) {
        st.metrics.gateway_backlog_readings.get_or_create(&label).set(n);
    }
    if let Some(s) = header("x-kappa-oldest-unforwarded-seconds").filter(|s| *s >= 0) {
        st.metrics.gateway_oldest_unforwarded_age_seconds.get_or_create(&label).set(s);
    }
}

impl<A> IngestState<A> {
    /// Whether `gateway` is due for progress markers (and notes that it got them).
    fn progress_due(&self, gateway: &str) -> bool {
        let mut marks = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        marks.due(gateway, self.progress_interval, now, MAX_PROGRESS_GATEWAYS).unwrap_or_else(|| {
            self.metrics.progress_untracked.inc();
            false
        })
    }
}

/// The answer to an accepted batch.
#[derive(Debug, Serialize)]
pub struct IngestReply {
    pub gateway: String,
    pub batch_id: u64,
    pub accepted: usize,
    pub rejected: usize,
    pub duplicate: bool,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("content-encoding must be zstd")]
    UnsupportedEncoding,
    #[error("body exceeds the {max}-byte limit")]
    BodyTooLarge { max: usize },
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("x-kappa-gateway header {header:?} does not match the batch's gateway {batch:?}")]
    GatewayMismatch { header: String, batch: String },
    #[error(transparent)]
    Log(#[from] EventLogError),
    #[error(transparent)]
    Auth(#[from] crate::auth::Refusal),
    #[error("this token belongs to gateway {token:?}; the batch says {batch:?}")]
    NotYourGateway { token: String, batch: String },
    #[error("gateway {gateway:?} sends faster than ingest.max_gateway_readings_per_second; retry in {wait:?}")]
    RateLimited { gateway: String, wait: std::time::Duration },
    #[error(
        "gateway {gateway:?} sends heartbeats faster than ingest.max_gateway_heartbeats_per_second; retry in {wait:?}"
    )]
    HeartbeatRateLimited { gateway: String, wait: std::time::Duration },
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. }
            | Self::Batch(BatchError::Frame(
                FrameError::CompressedTooLarge { .. } | FrameError::DecompressedTooLarge { .. },
            ))
            | Self::Batch(BatchError::TooManyReadings { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Batch(_) | Self::GatewayMismatch { .. } => StatusCode::BAD_REQUEST,
            // The body did not arrive whole: a transport problem, not a bad
            // batch. The edge retries it (a 400 would make it a dead letter).
            Self::BodyRead(_) | Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Log(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Auth(r) => r.status(),
            Self::NotYourGateway { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } | Self::HeartbeatRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyRead(_) => "body_read",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Batch(e) => e.reason(),
            Self::GatewayMismatch { .. } => "gateway_mismatch",
            Self::Log(_) => "log_unavailable",
            Self::Auth(r) => r.reason(),
            Self::NotYourGateway { .. } => "wrong_gateway",
            Self::RateLimited { .. } => "rate_limited",
            Self::HeartbeatRateLimited { .. } => "heartbeat_rate_limited",
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            Self::Log(_) => Some(1),
            Self::RateLimited { wait, .. } | Self::HeartbeatRateLimited { wait, .. } => {
                Some(wait.as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => None,
        };
        let body = serde_json::json!({ "error": self.to_string(), "reason": self.reason() }).to_string();
        let mut resp = (status, [("content-type", "application/json")], body).into_response();
        if let Some(secs) = retry_after
            && let Ok(v) = secs.to_string().parse()
        {
            resp.headers_mut().insert("retry-after", v);
        }
        if status == StatusCode::UNAUTHORIZED
            && let Ok(v) = "Bearer".parse()
        {
            resp.headers_mut().insert("www-authenticate", v);
        }
        resp
    }
}

/// The handler.
pub async fn ingest<A: LogAppender>(
    State(st): State<Arc<IngestState<A>>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<IngestReply>, IngestError> {
    let result = match st.auth.gateway(&headers) {
        Ok(gateway) => handle(&st, &headers, body, gateway).await,
        Err(refusal) => Err(refusal.into()),
    };
    let label = match &result {
        Ok(r) if r.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(IngestError::Log(_)) => "unavailable",
        Err(_) => "refused",
    };
    st.metrics.ingest_requests.get_or_create(&[("result", label)]).inc();
    if let Err(e) = &result {
        st.metrics.ingest_rejected.get_or_create(&[("reason", e.reason())]).inc();
        let gateway = headers.get("x-kappa-gateway").and_then(|v| v.to_str().ok()).unwrap_or("?");
        if matches!(e, IngestError::Log(_)) {
            tracing::warn!(gateway, error = %e, "Ingest cannot append now; answered 503.");
        } else {
            tracing::warn!(gateway, reason = e.reason(), error = %e, "Refused an ingest request.");
        }
    }
    result.map(axum::Json)
}

async fn handle<A: LogAppender>(
    st: &IngestState<A>,
    headers: &HeaderMap,
    body: Body,
    sender: Option<&crate::auth::Gateway>,
) -> Result<IngestReply, IngestError> {
    let encoding = headers.get("content-encoding").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !encoding.eq_ignore_ascii_case("zstd") {
        return Err(IngestError::UnsupportedEncoding);
    }
    let max = st.limits.frame.max_compressed;
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(IngestError::BodyTooLarge { max });
    }
    let bytes = read_body(body, max, st.body_timeout).await?;
    st.metrics.ingest_bytes.inc_by(bytes.len() as u64);
    let batch = batch::decode(&bytes, &st.limits)?;
    if let Some(header) = headers.get("x-kappa-gateway").and_then(|v| v.to_str().ok())
        && header != batch.gateway
    {
        return Err(IngestError::GatewayMismatch { header: header.to_string(), batch: batch.gateway });
    }
    if let Some(g) = sender
        && g.id != batch.gateway
    {
        return Err(IngestError::NotYourGateway { token: g.id.clone(), batch: batch.gateway });
    }
    let unregistered = |device: &str| sender.is_some_and(|g| !g.may_send(device));
    let cost = (batch.readings.len() + batch.aggregates.len()) as f64;
    if let Some(rate) = &st.gateway_rate
        && cost > 0.0
        && let Err(refused) = rate.admit(&batch.gateway, cost, std::time::Instant::now())
    {
        return Err(IngestError::RateLimited { gateway: batch.gateway, wait: refused.wait });
    }
    let ingest_ms = crate::now_ms();
    let mut records = Vec::with_capacity(batch.readings.len());
    let mut rejected = 0;
    let mut aggregates = 0u64;
    let mut max_ts: Option<i64> = None;
    for reading in batch.readings {
        if unregistered(&reading.device) {
            rejected += 1;
            st.metrics.readings_rejected.get_or_create(&[("reason", "unregistered_device")]).inc();
            tracing::warn!(gateway = %batch.gateway, batch_id = batch.batch_id, device = %reading.device, "Refused a reading of a device not registered to its gateway.");
            continue;
        }
        if let Err(e) = reading.validate(&st.reading_limits) {
            rejected += 1;
            st.metrics.readings_rejected.get_or_create(&[("reason", e.reason())]).inc();
            tracing::warn!(gateway = %batch.gateway, batch_id = batch.batch_id, device = %reading.device, seq = reading.seq, error = %e, "Refused a reading inside a batch.");
            continue;
        }
        max_ts = Some(max_ts.map_or(reading.ts_ms, |m| m.max(reading.ts_ms)));
        let key = reading.device.clone();
        let value = record::encode(&LogRecord {
            gateway: batch.gateway.clone(),
            batch_id: batch.batch_id,
            ingest_ms,
            event: LogEvent::Reading(reading),
        });
        records.push(AppendRecord { key, partition: None, value });
    }
    let mut windows: std::collections::BTreeMap<(String, String, i64, i64), kappa_common::aggregate::Aggregate> =
        std::collections::BTreeMap::new();
    for aggregate in batch.aggregates {
        let checked = if unregistered(&aggregate.device) { Err("unregistered_device") } else { aggregate.validate() };
        if let Err(reason) = checked {
            rejected += 1;
            st.metrics.readings_rejected.get_or_create(&[("reason", reason)]).inc();
            tracing::warn!(gateway = %batch.gateway, batch_id = batch.batch_id, device = %aggregate.device, metric = %aggregate.metric, reason, "Refused an aggregate inside a batch.");
            continue;
        }
        // Partials of one window merge here, so (gateway, batch, window)
        // identifies a partial downstream (see `crate::aggregates`).
        let window = (aggregate.device.clone(), aggregate.metric.clone(), aggregate.window_ms, aggregate.start_ms);
        match windows.get_mut(&window) {
            Some(held) => held.merge(&aggregate),
            None => {
                windows.insert(window, aggregate);
            }
        }
    }
    for aggregate in windows.into_values() {
        aggregates += 1;
        let key = aggregate.device.clone();
        let value = record::encode(&LogRecord {
            gateway: batch.gateway.clone(),
            batch_id: batch.batch_id,
            ingest_ms,
            event: LogEvent::Aggregate(aggregate),
        });
        records.push(AppendRecord { key, partition: None, value });
    }
    let accepted = records.len();
    if let Some(newest) = max_ts
        && st.progress_due(&batch.gateway)
    {
        // Every partition hears of this gateway's progress, so a device's
        // silence is judged by its gateway's clock in its own partition.
        let touched: std::collections::HashSet<u32> =
            records.iter().map(|r| kappa_common::partition::partition_for(&r.key, st.partitions)).collect();
        let value = record::encode(&LogRecord {
            gateway: batch.gateway.clone(),
            batch_id: batch.batch_id,
            ingest_ms,
            event: LogEvent::Progress { ts_ms: newest },
        });
        for p in (0..st.partitions).filter(|p| !touched.contains(p)) {
            records.push(AppendRecord { key: batch.gateway.clone(), partition: Some(p), value: value.clone() });
        }
    }
    let appended =
        st.appender.append(AppendBatch { gateway: batch.gateway.clone(), batch_id: batch.batch_id, records }).await;
    st.metrics.log_available.set(i64::from(appended.is_ok()));
    let outcome = appended?;
    let duplicate = outcome == AppendOutcome::Duplicate;
    record_gateway_status(st, &batch.gateway, headers, ingest_ms);
    if !duplicate {
        st.metrics.readings_ingested.inc_by(accepted as u64 - aggregates);
        st.metrics.aggregates_ingested.inc_by(aggregates);
    }
    Ok(IngestReply { gateway: batch.gateway, batch_id: batch.batch_id, accepted, rejected, duplicate })
}

/// A request body of at most `max` bytes that arrives within `timeout`.
async fn read_body(body: Body, max: usize, timeout: std::time::Duration) -> Result<axum::body::Bytes, IngestError> {
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, max))
        .await
        .map_err(|_| IngestError::BodyTimeout(timeout))?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some())
            || e.to_string().contains("length limit");
        if too_large { IngestError::BodyTooLarge { max } } else { IngestError::BodyRead(e.to_string()) }
    })
}

/// The largest heartbeat body (one gateway id and a time).
pub const MAX_HEARTBEAT_BYTES: usize = 4096;

/// A gateway's heartbeat (`POST /v1/heartbeat`, JSON).
#[derive(Debug, serde::Deserialize)]
pub struct Heartbeat {
    pub gateway: String,
    /// Every reading the gateway received with event time up to here has
    /// been forwarded.
    pub ts_ms: i64,
}

/// `POST /v1/heartbeat`: records that a gateway is online and caught up, in
/// every partition of the log (see [`LogEvent::Heartbeat`]). Answers 200 once
/// durable; a repeated heartbeat (same gateway and time) is not appended again.
pub async fn heartbeat<A: LogAppender>(
    State(st): State<Arc<IngestState<A>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let refuse = |st: &IngestState<A>, reason: &'static str, msg: String| {
        st.metrics.ingest_rejected.get_or_create(&[("reason", reason)]).inc();
        tracing::warn!(reason, error = %msg, "Refused a heartbeat.");
        let body = serde_json::json!({ "error": msg, "reason": reason }).to_string();
        (StatusCode::BAD_REQUEST, [("content-type", "application/json")], body).into_response()
    };
    let refuse_with = |st: &IngestState<A>, e: IngestError| {
        st.metrics.ingest_rejected.get_or_create(&[("reason", e.reason())]).inc();
        tracing::warn!(reason = e.reason(), error = %e, "Refused a heartbeat.");
        e.into_response()
    };
    let sender = match st.auth.gateway(&headers) {
        Ok(sender) => sender,
        Err(refusal) => {
            st.metrics.ingest_rejected.get_or_create(&[("reason", refusal.reason())]).inc();
            tracing::warn!(reason = refusal.reason(), "Refused a heartbeat.");
            return crate::auth::refusal_response(refusal);
        }
    };
    let bytes = match read_body(body, MAX_HEARTBEAT_BYTES, st.body_timeout).await {
        Ok(bytes) => bytes,
        Err(e) => return refuse_with(&st, e),
    };
    let hb: Heartbeat = match serde_json::from_slice(&bytes) {
        Ok(hb) => hb,
        Err(e) => return refuse(&st, "heartbeat_malformed", format!("not a heartbeat: {e}")),
    };
    if let Some(g) = sender
        && g.id != hb.gateway
    {
        return refuse_with(&st, IngestError::NotYourGateway { token: g.id.clone(), batch: hb.gateway });
    }
    if let Err(e) = kappa_common::reading::validate_device_id(&hb.gateway) {
        return refuse(&st, "heartbeat_gateway", format!("gateway: {e}"));
    }
    if hb.ts_ms <= 0 {
        return refuse(&st, "heartbeat_time", format!("ts_ms {} is not a time", hb.ts_ms));
    }
    if let Err(refused) = st.heartbeat_rate.admit(&hb.gateway, 1.0, std::time::Instant::now()) {
        return refuse_with(&st, IngestError::HeartbeatRateLimited { gateway: hb.gateway, wait: refused.wait });
    }
    let ingest_ms = crate::now_ms();
    let value = record::encode(&LogRecord {
        gateway: hb.gateway.clone(),
        batch_id: 0,
        ingest_ms,
        event: LogEvent::Heartbeat { ts_ms: hb.ts_ms },
    });
    let records = (0..st.partitions)
        .map(|p| AppendRecord { key: hb.gateway.clone(), partition: Some(p), value: value.clone() })
        .collect();
    // Heartbeats are deduplicated by time in their own namespace of batch ids.
    let batch = AppendBatch { gateway: format!("{}#heartbeat", hb.gateway), batch_id: hb.ts_ms as u64, records };
    let appended = st.appender.append(batch).await;
    st.metrics.log_available.set(i64::from(appended.is_ok()));
    match appended {
        Ok(_) => {
            st.metrics.heartbeats.inc();
            record_gateway_status(&st, &hb.gateway, &headers, ingest_ms);
            (StatusCode::OK, [("content-type", "application/json")], "{\"ok\":true}").into_response()
        }
        Err(e) => IngestError::Log(e).into_response(),
    }
}
