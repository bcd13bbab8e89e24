//! The JSON query API over the serving store. Field names are documented in
//! `docs/api.md`; times are Unix milliseconds (query parameters also take
//! RFC 3339). A view is named by its name (the version its alias points to)
//! or as `name@version`.

pub mod aggregates;
pub mod alerts;
pub mod config;
pub mod readers;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json_;

use crate::model::LateEvent;
use crate::store::{AlertAcks, LateQuery, RowQuery, ServingReader, StoredRow, ViewInfo};

/// Largest page.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1000;

/// What the API handlers need.
#[derive(Debug)]
pub struct ApiState {
    /// Views, late events, alerts and edge aggregates: the embedded store,
    /// or PostgreSQL on a cluster, through a few readers.
    pub readers: Arc<readers::ReaderPool>,
    /// A writable connection, for acknowledgements.
    pub acks: Arc<Mutex<Box<dyn AlertAcks>>>,
    /// The view `GET /v1/devices` lists.
    pub devices_view: String,
    /// The view `GET /v1/devices/{id}/windows` reads.
    pub windows_view: String,
    /// Each metric's unit (`schema.units`), served with the views.
    pub units: std::collections::BTreeMap<String, String>,
    /// What each API token may spend per second (`api.max_requests_per_second`).
    pub request_rate: Option<Arc<kappa_runtime::rate::KeyedRate>>,
}

/// One view row, as served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowOut {
    pub key: String,
    pub window_start_ms: i64,
    /// Exclusive end; null for a global window.
    pub window_end_ms: Option<i64>,
    /// One entry per aggregate, named as in the view definition.
    pub values: serde_json::Map<String, Json_>,
}

impl From<StoredRow> for RowOut {
    fn from(r: StoredRow) -> Self {
        let values = match presented(r.values) {
            Json_::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        Self { key: r.key, window_start_ms: r.window_start, window_end_ms: r.window_end, values }
    }
}

/// Numbers as their sensors measured them ([`kappa_common::reading::as_measured`]),
/// through arrays and objects; integers and everything else unchanged.
pub fn presented(v: Json_) -> Json_ {
    match v {
        Json_::Number(n) if n.is_f64() => {
            let shown = n.as_f64().map(kappa_common::reading::as_measured).and_then(serde_json::Number::from_f64);
            Json_::Number(shown.unwrap_or(n))
        }
        Json_::Array(a) => Json_::Array(a.into_iter().map(presented).collect()),
        Json_::Object(m) => Json_::Object(m.into_iter().map(|(k, v)| (k, presented(v))).collect()),
        other => other,
    }
}

/// A page of rows with the token for the next page.
#[derive(Debug, Serialize, Deserialize)]
pub struct RowsPage {
    /// The view version served (`name@version`).
    pub view: String,
    pub rows: Vec<RowOut>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<String>,
}

/// A page of late events.
#[derive(Debug, Serialize)]
pub struct LatePage {
    pub events: Vec<LateEvent>,
    pub next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RowParams {
    pub key: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
    /// `/v1/devices/{id}/windows` only: read another view.
    pub view: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LateParams {
    pub view: Option<String>,
    pub device: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// An API error: a status and a sentence.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// A query string, deserialized as `Query` does, refused as JSON with a
/// sentence (`Query`'s own refusal is plain text).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(t)) => Ok(ApiQuery(t)),
            Err(e) => Err(bad_request(format!("the query string does not read: {}", e.body_text()))),
        }
    }
}

/// Every route the API does not have: 404 as JSON, pointing at the docs.
pub async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("there is no {} here; the routes are in docs/api.md", uri.path()))
}

/// A route asked with a method it does not take: 405 as JSON.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}; see docs/api.md", uri.path()))
}

fn bad_request(msg: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg)
}

pub use kappa_runtime::time::parse_time;

fn limit(l: Option<usize>) -> Result<usize, ApiError> {
    let l = l.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&l) {
        return Err(bad_request(format!("limit must be 1..={MAX_LIMIT}")));
    }
    Ok(l)
}

fn range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), ApiError> {
    Ok((
        from.map(parse_time).transpose().map_err(bad_request)?.unwrap_or(i64::MIN),
        to.map(parse_time).transpose().map_err(bad_request)?.unwrap_or(i64::MAX),
    ))
}

/// A page token names the version it pages through, so the next page comes
/// from the same version even if the name was promoted meanwhile.
fn encode_after(view_id: &str, key: &str, start: i64) -> String {
    format!("{view_id}|{start}:{key}")
}

fn decode_after(token: &str) -> Result<(Option<String>, String, i64), ApiError> {
    let malformed = || bad_request(format!("after token {token:?} is malformed"));
    let (view, rest) = match token.split_once('|') {
        Some((v, r)) => (Some(v.to_string()), r),
        None => (None, token),
    };
    let (start, key) = rest.split_once(':').ok_or_else(malformed)?;
    Ok((view, key.to_string(), start.parse().map_err(|_| malformed())?))
}

async fn with_store<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&dyn ServingReader) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    st.readers.run(f).await
}

/// A store error as an answer: 503 when the store cut the query for its
/// time, else 500.
fn internal(e: impl std::fmt::Display) -> ApiError {
    let msg = e.to_string();
    if readers::timed_out(&msg) {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the query ran past api.query_timeout: {msg}"));
    }
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, msg)
}

async fn query(st: &ApiState, view: String, key: Option<String>, p: &RowParams) -> Result<RowsPage, ApiError> {
    let limit = limit(p.limit)?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    let token = p.after.as_deref().map(decode_after).transpose()?;
    let (pinned, after) = match token {
        Some((v, key, start)) => (v, Some((key, start))),
        None => (None, None),
    };
    let rows_and_id = with_store(st, move |s| {
        let id = match pinned {
            Some(id) => id,
            None => s
                .resolve_view(&view)
                .map_err(internal)?
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no view named {view:?}; see /v1/views")))?,
        };
        let rows = s.rows(&RowQuery { view_id: id.clone(), key, from, to, after, limit }).map_err(internal)?;
        Ok((id, rows))
    })
    .await?;
    let (view, rows) = rows_and_id;
    let next =
        (rows.len() == limit).then(|| rows.last().map(|r| encode_after(&view, &r.key, r.window_start))).flatten();
    Ok(RowsPage { view, rows: rows.into_iter().map(RowOut::from).collect(), next })
}

/// `GET /v1/devices`: one row per device from the devices view.
pub async fn devices(
    State(st): State<Arc<ApiState>>,
    ApiQuery(p): ApiQuery<RowParams>,
) -> Result<Json<RowsPage>, ApiError> {
    query(&st, st.devices_view.clone(), None, &p).await.map(Json)
}

/// `GET /v1/devices/{id}/windows?from=&to=&view=`: one device's windows.
pub async fn device_windows(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<RowParams>,
) -> Result<Json<RowsPage>, ApiError> {
    let view = p.view.clone().unwrap_or_else(|| st.windows_view.clone());
    query(&st, view, Some(id), &p).await.map(Json)
}

/// `GET /v1/views/{view}/rows?key=&from=&to=&after=&limit=`.
pub async fn view_rows(
    State(st): State<Arc<ApiState>>,
    Path(view): Path<String>,
    ApiQuery(p): ApiQuery<RowParams>,
) -> Result<Json<RowsPage>, ApiError> {
    let key = p.key.clone();
    query(&st, view, key, &p).await.map(Json)
}

/// `GET /v1/views`: every view version, its definition, and which one each
/// name serves; and each metric's unit.
pub async fn views(State(st): State<Arc<ApiState>>) -> Result<Json<Json_>, ApiError> {
    let mut views: Vec<ViewInfo> = with_store(&st, |s| s.list_views().map_err(internal)).await?;
    for v in &mut views {
        v.definition = crate::views::syntax::stored_in_config_syntax(&v.definition);
    }
    Ok(Json(serde_json::json!({ "views": views, "units": st.units })))
}

/// `GET /v1/late?view=&device=&from=&to=&after=&limit=`: the late-events log.
pub async fn late(
    State(st): State<Arc<ApiState>>,
    ApiQuery(p): ApiQuery<LateParams>,
) -> Result<Json<LatePage>, ApiError> {
    let limit = limit(p.limit)?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    let after = p
        .after
        .as_deref()
        .map(|t| {
            let parts: Vec<&str> = t.splitn(5, ':').collect();
            let bad = || bad_request(format!("after token {t:?} is malformed"));
            if parts.len() != 5 {
                return Err(bad());
            }
            Ok((
                parts[0].parse().map_err(|_| bad())?,
                parts[4].to_string(),
                parts[1].parse().map_err(|_| bad())?,
                parts[2].parse().map_err(|_| bad())?,
                parts[3].parse().map_err(|_| bad())?,
            ))
        })
        .transpose()?;
    let (view, device) = (p.view, p.device);
    let events = with_store(&st, move |s| {
        let view_id = match view {
            None => None,
            Some(v) => Some(
                s.resolve_view(&v)
                    .map_err(internal)?
                    .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no view named {v:?}; see /v1/views")))?,
            ),
        };
        s.late_events(&LateQuery { view_id, device, from, to, after, limit }).map_err(internal)
    })
    .await?;
    let next = (events.len() == limit)
        .then(|| {
            events.last().map(|e| format!("{}:{}:{}:{}:{}", e.ts_ms, e.partition, e.offset, e.window_start, e.view))
        })
        .flatten();
    Ok(Json(LatePage { events, next }))
}

/// `GET /dashboard`: the operator's page (fleet, a device's windows, alerts,
/// pipeline health). One self-contained HTML file built into the binary; it
/// reads the JSON API and `/metrics` like any other client.
pub async fn dashboard() -> axum::response::Response {
    use axum::response::IntoResponse;
    ([("content-type", "text/html; charset=utf-8"), ("cache-control", "no-cache")], include_str!("dashboard.html"))
        .into_response()
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
    fn rows_show_values_as_measured() {
        let stored = StoredRow {
            key: "dev-1".into(),
            window_start: 0,
            window_end: Some(60_000),
            values: serde_json::json!({
                "count": 3, "t_max": f64::from(18.39f32), "t_avg": 18.391_666_666_666_666, "ts": [f64::from(0.1f32), 2]
            }),
        };
        let out = serde_json::to_string(&RowOut::from(stored).values).unwrap();
        assert_eq!(out, r#"{"count":3,"t_avg":18.391666666666666,"t_max":18.39,"ts":[0.1,2]}"#);
    }

    #[test]
    fn page_tokens_round_trip_even_with_colons_in_keys() {
        let t = encode_after("v@2", "dev:1", 42);
        assert_eq!(decode_after(&t).unwrap(), (Some("v@2".to_string()), "dev:1".to_string(), 42));
    }
}
