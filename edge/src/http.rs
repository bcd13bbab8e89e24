//! The agent's small HTTP endpoint: `/metrics` (Prometheus text), `/healthz`
//! (the process answers) and `/readyz` (it can take readings: MQTT side up,
//! log not full; 503 with the reason otherwise).
//! Plain hyper, so the agent carries no web framework.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Arc<crate::metrics::EdgeMetrics>,
    cancel: CancellationToken,
) {
    while let Some(stream) = kappa_runtime::net::accept(&listener, &cancel).await {
        let (registry, metrics) = (registry.clone(), metrics.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (registry, metrics) = (registry.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(route(&req, &registry, &metrics)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Why the agent cannot take readings now, if it cannot.
fn not_ready(m: &crate::metrics::EdgeMetrics) -> Option<&'static str> {
    if m.mqtt_connected.get() != 1 {
        Some("not ready: the MQTT side is down (no broker connection, or the embedded broker is not listening)\n")
    } else if m.log_full.get() == 1 {
        Some("not ready: the log is full; new readings are not acknowledged until space returns\n")
    } else {
        None
    }
}

fn route(req: &Request<Incoming>, registry: &Registry, metrics: &crate::metrics::EdgeMetrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "cannot encode metrics\n".into()),
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match not_ready(metrics) {
            None => (StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why.into()),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert("content-type", v);
    }
    resp
}

/// The `[http]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics` and `/healthz` are served.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9101))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: default_http_listen() }
    }
}
