//! A node's HTTP side: every route, `/metrics`, `/readyz`, and serving
//! connections until shutdown.

use super::*;

pub(super) async fn serve_connection<S>(io: S, router: Router, header_timeout: Duration, cancel: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Every HTTP route of a node.
pub fn router<A: LogAppender>(ingest: IngestState<A>, api: ApiState, registry: Arc<Registry>) -> Router {
    let ready_metrics = ingest.metrics.clone();
    let read = crate::auth::ApiGuard {
        auth: ingest.auth.clone(),
        role: crate::auth::Role::Read,
        metrics: ingest.metrics.clone(),
        rate: api.request_rate.clone(),
    };
    let admin = crate::auth::ApiGuard { role: crate::auth::Role::Admin, ..read.clone() };
    let metrics_guard = ingest.auth.guards_metrics().then(|| read.clone());
    let ingest = Router::new()
        .route("/v1/ingest", post(ingest::ingest::<A>))
        .route("/v1/heartbeat", post(ingest::heartbeat::<A>))
        .with_state(Arc::new(ingest));
    let api_state = Arc::new(api);
    let acknowledge = Router::new()
        .route("/v1/alerts/{id}/ack", post(api::alerts::ack))
        .with_state(api_state.clone())
        .route_layer(axum::middleware::from_fn_with_state(admin, crate::auth::require));
    let api = Router::new()
        .route("/v1/devices", get(api::devices))
        .route("/v1/devices/{id}/windows", get(api::device_windows))
        .route("/v1/views", get(api::views))
        .route("/v1/views/{view}/rows", get(api::view_rows))
        .route("/v1/late", get(api::late))
        .route("/v1/aggregates", get(api::aggregates::list))
        .route("/v1/alerts", get(api::alerts::list))
        .route("/v1/alerts/{id}", get(api::alerts::get))
        .with_state(api_state)
        .route_layer(axum::middleware::from_fn_with_state(read, crate::auth::require))
        .merge(acknowledge);
    let ops = Router::new()
        .route("/dashboard", get(api::dashboard))
        .route("/readyz", get(move || readyz(ready_metrics.clone())))
        .route("/", get(index));
    ingest
        .merge(api)
        .merge(ops)
        .merge(liveness_router(registry, metrics_guard))
        .fallback(api::no_route)
        .method_not_allowed_fallback(api::wrong_method)
}

/// `/metrics` and `/healthz`: what every process serves. With a guard,
/// `/metrics` needs its token (`auth.open_metrics`); `/healthz` never does.
pub(crate) fn liveness_router(registry: Arc<Registry>, guard: Option<crate::auth::ApiGuard>) -> Router {
    let mut scrape = Router::new().route("/metrics", get(metrics)).with_state(registry);
    if let Some(guard) = guard {
        scrape = scrape.route_layer(axum::middleware::from_fn_with_state(guard, crate::auth::require));
    }
    scrape.route("/healthz", get(|| async { "ok\n" }))
}

async fn metrics(State(registry): State<Arc<Registry>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => {
            ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
        }
        Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

/// Ready while the event log takes appends: after an append failed (the
/// disk, the Kafka brokers), 503 until one succeeds again. `/healthz` only
/// says the process answers.
async fn readyz(metrics: Arc<CloudMetrics>) -> (axum::http::StatusCode, &'static str) {
    if metrics.log_available.get() == 1 {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the event log refused the last append; ingest answers 503\n",
        )
    }
}

async fn index() -> &'static str {
    "Kappa IoT cloud node\n\n\
     GET  /dashboard                      the operator's dashboard (fleet, devices, alerts, pipeline health)\n\
     POST /v1/ingest                      edge batches (zstd + CBOR)\n\
     GET  /v1/devices                     devices (rows of api.devices_view)\n\
     GET  /v1/devices/{id}/windows        one device's windows (?from=&to=&limit=&after=&view=)\n\
     GET  /v1/views                       view versions and definitions\n\
     GET  /v1/views/{view}/rows           any view's rows (?key=&from=&to=&limit=&after=)\n\
     GET  /v1/late                        the late-events log (?view=&device=&from=&to=&limit=&after=)\n\
     GET  /v1/aggregates                  edge aggregates (?device=&metric=&window=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts                      alerts (?state=&severity=&device=&rule=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts/{id}                 one alert, its history and webhook deliveries\n\
     POST /v1/alerts/{id}/ack             acknowledge ({\"by\": ..., \"note\": ...})\n\
     POST /v1/heartbeat                   a gateway's heartbeat ({\"gateway\": ..., \"ts_ms\": ...})\n\
     GET  /metrics                        Prometheus metrics (an API token with [auth] on)\n\
     GET  /healthz                        the process answers\n\
     GET  /readyz                         ready: 503 while the event log refuses appends\n"
}
