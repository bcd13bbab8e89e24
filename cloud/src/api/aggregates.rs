//! `GET /v1/aggregates`: windows pre-aggregated at the edge, merged.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiQuery, ApiState, bad_request, internal, limit, range, with_store};
use crate::store::aggregates::{AggregateQuery, AggregateRow};

#[derive(Debug, Deserialize)]
pub struct AggregateParams {
    pub device: Option<String>,
    pub metric: Option<String>,
    /// Window size, e.g. `10s`, `1m`.
    pub window: Option<String>,
    /// Windows starting in `[from, to)`.
    pub from: Option<String>,
    pub to: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// A page of merged aggregates.
#[derive(Debug, Serialize)]
pub struct AggregatesPage {
    pub aggregates: Vec<AggregateRow>,
    pub next: Option<String>,
}

/// `GET /v1/aggregates?device=&metric=&window=&from=&to=&after=&limit=`.
pub async fn list(
    State(st): State<Arc<ApiState>>,
    ApiQuery(p): ApiQuery<AggregateParams>,
) -> Result<Json<AggregatesPage>, ApiError> {
    let limit = limit(p.limit)?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    let window_ms = p
        .window
        .as_deref()
        .map(|w| {
            humantime::parse_duration(w)
                .map(|d| d.as_millis() as i64)
                .map_err(|e| bad_request(format!("window {w:?} is not a duration like 1m: {e}")))
        })
        .transpose()?;
    let after = p.after.as_deref().map(decode_after).transpose()?;
    let q = AggregateQuery { device: p.device, metric: p.metric, window_ms, from, to, after, limit };
    let mut rows = with_store(&st, move |s| s.aggregates(&q).map_err(internal)).await?;
    for r in &mut rows {
        // The readings' own values, as their sensors measured them.
        let a = &mut r.aggregate;
        for v in [&mut a.min, &mut a.max, &mut a.first, &mut a.last] {
            *v = kappa_common::reading::as_measured(*v);
        }
    }
    let next = (rows.len() == limit)
        .then(|| {
            rows.last().map(|r| {
                let a = &r.aggregate;
                format!("{}|{}|{}|{}", a.device, a.metric, a.window_ms, a.start_ms)
            })
        })
        .flatten();
    Ok(Json(AggregatesPage { aggregates: rows, next }))
}

fn decode_after(token: &str) -> Result<(String, String, i64, i64), ApiError> {
    let malformed = || bad_request(format!("after token {token:?} is malformed"));
    let mut parts = token.split('|');
    let (Some(d), Some(m), Some(w), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    Ok((d.to_string(), m.to_string(), w.parse().map_err(|_| malformed())?, s.parse().map_err(|_| malformed())?))
}
