//! The `[http]` and `[api]` sections: where the node listens (HTTPS or
//! plain), its timeouts, and which views the device endpoints read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Ingest, query API, `/metrics` and health endpoints.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// A client must send a request's headers within this (also bounds an
    /// idle keep-alive connection); slower connections are closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request body must arrive within this; slower ones get 408.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Serve HTTPS with this certificate and key; absent: plain HTTP (local
    /// development only).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The `[http.tls]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            header_read_timeout: default_header_timeout(),
            body_read_timeout: default_body_timeout(),
            tls: None,
        }
    }
}

/// Which views the device endpoints of the query API read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `GET /v1/devices` lists this view's rows (one per device).
    #[serde(default = "default_devices_view")]
    pub devices_view: String,
    /// `GET /v1/devices/{id}/windows` reads this view.
    #[serde(default = "default_windows_view")]
    pub windows_view: String,
    /// Connections to the serving store the API reads through; one slow
    /// query holds one of them.
    #[serde(default = "default_readers")]
    pub readers: usize,
    /// Longest an API query may wait for a reader and run; past it, 503
    /// (the query is interrupted, or cancelled by PostgreSQL).
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub query_timeout: Duration,
    /// With `[auth]` on: what one API token may spend per second, a request
    /// costing 1 and 1 more per 1,000 rows it asks for (`limit`; the widest
    /// page costs 11), from a bucket holding 2 s of it. Over it, 429 with
    /// `Retry-After`. 0: no limit.
    #[serde(default = "default_requests_per_second")]
    pub max_requests_per_second: u64,
}

fn default_requests_per_second() -> u64 {
    50
}

impl ApiConfig {
    /// The per-token limiter, if one is configured.
    pub fn request_rate(&self) -> Option<kappa_runtime::rate::KeyedRate> {
        let rate = self.max_requests_per_second as f64;
        (rate > 0.0).then(|| kappa_runtime::rate::KeyedRate::new(rate, rate * 2.0))
    }
}

fn default_readers() -> usize {
    4
}
fn default_query_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_devices_view() -> String {
    "device_totals".into()
}
fn default_windows_view() -> String {
    "device_windows".into()
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            devices_view: default_devices_view(),
            windows_view: default_windows_view(),
            readers: default_readers(),
            query_timeout: default_query_timeout(),
            max_requests_per_second: default_requests_per_second(),
        }
    }
}
