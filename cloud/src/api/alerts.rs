//! `GET /v1/alerts`, `GET /v1/alerts/{id}`, `POST /v1/alerts/{id}/ack`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, ApiState, bad_request, internal, limit, range, with_store};
use crate::alerts::spec::Severity;
use crate::store::alerts::{AlertDetail, AlertQuery, AlertView};

#[derive(Debug, Deserialize)]
pub struct AlertParams {
    /// `firing` or `resolved`.
    pub state: Option<String>,
    /// This severity and above.
    pub severity: Option<String>,
    pub device: Option<String>,
    pub rule: Option<String>,
    /// Alerts that started in `[from, to)`.
    pub from: Option<String>,
    pub to: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// A page of alerts, newest first.
#[derive(Debug, Serialize)]
pub struct AlertsPage {
    pub alerts: Vec<AlertView>,
    pub next: Option<String>,
}

/// `GET /v1/alerts?state=&severity=&device=&rule=&from=&to=&after=&limit=`.
pub async fn list(
    State(st): State<Arc<ApiState>>,
    ApiQuery(p): ApiQuery<AlertParams>,
) -> Result<Json<AlertsPage>, ApiError> {
    let limit = limit(p.limit)?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    if let Some(s) = &p.state
        && s != "firing"
        && s != "resolved"
    {
        return Err(bad_request(format!("state {s:?} must be firing or resolved")));
    }
    let min_severity = p
        .severity
        .as_deref()
        .map(|s| {
            Severity::parse(s).ok_or_else(|| bad_request(format!("severity {s:?} must be info, warning or critical")))
        })
        .transpose()?;
    let after = p
        .after
        .as_deref()
        .map(|t| {
            let (ts, id) = t.split_once(':').ok_or_else(|| bad_request(format!("after token {t:?} is malformed")))?;
            Ok::<_, ApiError>((
                ts.parse().map_err(|_| bad_request(format!("after token {t:?} is malformed")))?,
                id.to_string(),
            ))
        })
        .transpose()?;
    let q = AlertQuery { state: p.state, min_severity, device: p.device, rule: p.rule, from, to, after, limit };
    let mut alerts = with_store(&st, move |s| s.alerts(&q).map_err(internal)).await?;
    for a in &mut alerts {
        a.alert.value = a.alert.value.map(kappa_common::reading::as_measured);
    }
    let next = (alerts.len() == limit)
        .then(|| alerts.last().map(|a| format!("{}:{}", a.alert.started_ms, a.alert.id)))
        .flatten();
    Ok(Json(AlertsPage { alerts, next }))
}

/// `GET /v1/alerts/{id}`: the alert, its history and its webhook deliveries.
pub async fn get(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Result<Json<AlertDetail>, ApiError> {
    let wanted = id.clone();
    let mut found = with_store(&st, move |s| s.alert(&wanted).map_err(internal))
        .await?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no alert {id:?}")))?;
    found.view.alert.value = found.view.alert.value.map(kappa_common::reading::as_measured);
    Ok(Json(found))
}

#[derive(Debug, Deserialize)]
pub struct AckBody {
    /// Who acknowledges.
    pub by: String,
    #[serde(default)]
    pub note: String,
}

/// `POST /v1/alerts/{id}/ack` with `{"by": "...", "note": "..."}`.
pub async fn ack(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Result<Json<AckBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<AlertDetail>, ApiError> {
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
    if body.by.trim().is_empty() || body.by.len() > 128 || body.note.len() > 4096 {
        return Err(bad_request("by must be 1-128 characters and note at most 4096".into()));
    }
    let acks = st.acks.clone();
    let now = crate::now_ms();
    let wanted = id.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut w = acks.lock().map_err(|_| internal("store lock poisoned"))?;
        w.ack_alert(&wanted, &body.by, &body.note, now).map_err(internal)
    })
    .await
    .map_err(internal)??;
    if !found {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no alert {id:?}")));
    }
    get(State(st), Path(id)).await
}
