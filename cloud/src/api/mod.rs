//! The JSON query API over the serving store. Field names are documented in
//! `docs/api.md`; times are Unix milliseconds (query parameters also take
//! RFC 3339).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::processor::window::MetricAgg;
use crate::processor::{DEVICE_TOTALS, DEVICE_WINDOWS};
use crate::store::{RowQuery, StoredRow, ViewStore};

/// Largest page.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1000;

/// What the API handlers need.
#[derive(Debug)]
pub struct ApiState {
    pub store: Arc<Mutex<ViewStore>>,
    pub window_ms: i64,
}

/// One metric of one row, as served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricOut {
    pub count: u64,
    #[serde(default)]
    pub nulls: u64,
    pub sum: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
}

impl From<&MetricAgg> for MetricOut {
    fn from(m: &MetricAgg) -> Self {
        let some = |v: f64| (m.count > 0).then_some(v);
        Self { count: m.count, nulls: m.nulls, sum: m.sum, min: some(m.min), max: some(m.max), avg: m.avg() }
    }
}

/// One view row, as served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowOut {
    pub key: String,
    pub window_start_ms: i64,
    pub window_end_ms: Option<i64>,
    pub count: u64,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    pub metrics: BTreeMap<String, MetricOut>,
}

impl From<StoredRow> for RowOut {
    fn from(r: StoredRow) -> Self {
        Self {
            key: r.key,
            window_start_ms: r.window_start,
            window_end_ms: (r.window_end != i64::MAX).then_some(r.window_end),
            count: r.agg.count,
            first_ts_ms: r.agg.first_ts_ms,
            last_ts_ms: r.agg.last_ts_ms,
            metrics: r.agg.metrics.iter().map(|(k, v)| (k.clone(), v.into())).collect(),
        }
    }
}

/// A page of rows with the token for the next page.
#[derive(Debug, Serialize, Deserialize)]
pub struct RowsPage {
    pub view: String,
    pub rows: Vec<RowOut>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RowParams {
    pub key: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// An API error: a status and a sentence.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
}

/// RFC 3339 or Unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
        .map_err(|_| format!("{s:?} is neither RFC 3339 nor Unix milliseconds"))
}

fn encode_after(key: &str, start: i64) -> String {
    format!("{start}:{key}")
}

fn decode_after(token: &str) -> Result<(String, i64), ApiError> {
    let (start, key) =
        token.split_once(':').ok_or_else(|| bad_request(format!("after token {token:?} is malformed")))?;
    let start = start.parse().map_err(|_| bad_request(format!("after token {token:?} is malformed")))?;
    Ok((key.to_string(), start))
}

async fn query(st: &ApiState, view: &str, p: RowParams) -> Result<RowsPage, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad_request(format!("limit must be 1..={MAX_LIMIT}")));
    }
    let q = RowQuery {
        view: view.to_string(),
        key: p.key,
        from: p.from.as_deref().map(parse_time).transpose().map_err(bad_request)?.unwrap_or(i64::MIN),
        to: p.to.as_deref().map(parse_time).transpose().map_err(bad_request)?.unwrap_or(i64::MAX),
        after: p.after.as_deref().map(decode_after).transpose()?,
        limit,
    };
    let store = st.store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let store = store.lock().map_err(|_| "store lock poisoned".to_string())?;
        store.rows(&q).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let next = (rows.len() == limit).then(|| rows.last().map(|r| encode_after(&r.key, r.window_start))).flatten();
    Ok(RowsPage { view: view.to_string(), rows: rows.into_iter().map(RowOut::from).collect(), next })
}

/// `GET /v1/devices`: every device with its running totals.
pub async fn devices(State(st): State<Arc<ApiState>>, Query(p): Query<RowParams>) -> Result<Json<RowsPage>, ApiError> {
    query(&st, DEVICE_TOTALS, RowParams { key: None, from: None, to: None, ..p }).await.map(Json)
}

/// `GET /v1/devices/{id}/windows?from=&to=`: one device's windows.
pub async fn device_windows(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(p): Query<RowParams>,
) -> Result<Json<RowsPage>, ApiError> {
    query(&st, DEVICE_WINDOWS, RowParams { key: Some(id), ..p }).await.map(Json)
}

/// `GET /v1/views/{view}/rows?key=&from=&to=&after=&limit=`.
pub async fn view_rows(
    State(st): State<Arc<ApiState>>,
    Path(view): Path<String>,
    Query(p): Query<RowParams>,
) -> Result<Json<RowsPage>, ApiError> {
    if view != DEVICE_WINDOWS && view != DEVICE_TOTALS {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no view named {view:?}; see /v1/views")));
    }
    query(&st, &view, p).await.map(Json)
}

/// `GET /v1/views`: the views and their windows.
pub async fn views(State(st): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "views": [
            { "name": DEVICE_WINDOWS, "key": "device", "window": "tumbling", "window_ms": st.window_ms },
            { "name": DEVICE_TOTALS, "key": "device", "window": "global" },
        ]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1767225600000"), Ok(1_767_225_600_000));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Ok(1_767_225_600_000));
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn page_tokens_round_trip_even_with_colons_in_keys() {
        let t = encode_after("dev:1", 42);
        assert_eq!(decode_after(&t).unwrap(), ("dev:1".to_string(), 42));
    }
}
