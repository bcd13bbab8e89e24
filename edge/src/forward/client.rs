//! POSTing one batch to the cloud and classifying the answer.

use std::time::Duration;

use bytes::Bytes;

/// Media type of an edge batch body (packed CBOR).
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.kappa.batch+cbor";

/// What the cloud's answer means for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// 2xx: the batch is durably in the cloud's log.
    Accepted,
    /// Try again later: the cloud or the network is unavailable.
    Retry { reason: &'static str, detail: String, retry_after: Option<Duration> },
    /// The cloud says the batch itself is bad; sending it again cannot help.
    Refused { status: u16, detail: String },
}

/// What the gateway reports about itself with every request, for the
/// cloud's dashboard (`x-kappa-backlog-readings`, `x-kappa-oldest-unforwarded-seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStatus {
    pub backlog_readings: i64,
    pub oldest_unforwarded_seconds: i64,
}

impl GatewayStatus {
    fn headers(self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        req.header("x-kappa-backlog-readings", self.backlog_readings.max(0).to_string())
            .header("x-kappa-oldest-unforwarded-seconds", self.oldest_unforwarded_seconds.max(0).to_string())
    }
}

/// Whom the client trusts and how it proves who it is.
#[derive(Clone, Default)]
pub struct Security {
    /// PEM of the only CA to trust for the cloud's certificate; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The gateway's ingest token (`Authorization: Bearer`).
    pub token: Option<String>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// An HTTP client for one cloud ingest endpoint.
#[derive(Debug, Clone)]
pub struct CloudClient {
    http: reqwest::Client,
    url: String,
    heartbeat_url: String,
    gateway: String,
    /// `Bearer <token>`, marked sensitive so it never shows in debug output.
    authorization: Option<reqwest::header::HeaderValue>,
}

impl CloudClient {
    pub fn new(base_url: &str, gateway: &str, timeout: Duration, security: &Security) -> Result<Self, String> {
        let mut builder =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout.min(Duration::from_secs(5)));
        if let Some(pem) = &security.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem).map_err(|e| format!("forward.ca_file: {e}"))?;
            builder = builder.tls_certs_only([ca]);
        }
        let http = builder.build().map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        let authorization = match &security.token {
            None => None,
            Some(token) => {
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| "the ingest token has characters a header cannot carry".to_string())?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let base = base_url.trim_end_matches('/');
        Ok(Self {
            http,
            url: format!("{base}/v1/ingest"),
            heartbeat_url: format!("{base}/v1/heartbeat"),
            gateway: gateway.to_string(),
            authorization,
        })
    }

    /// A POST to `url` with the gateway's credentials and status.
    fn request(&self, url: &str, status: GatewayStatus) -> reqwest::RequestBuilder {
        let req = status.headers(self.http.post(url)).header("x-kappa-gateway", &self.gateway);
        match &self.authorization {
            Some(v) => req.header(reqwest::header::AUTHORIZATION, v.clone()),
            None => req,
        }
    }

    /// Tells the cloud the gateway has forwarded everything up to `ts_ms`.
    pub async fn heartbeat(&self, ts_ms: i64, status: GatewayStatus) -> Result<(), String> {
        let body = serde_json::json!({ "gateway": self.gateway, "ts_ms": ts_ms }).to_string();
        let response = self
            .request(&self.heartbeat_url, status)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if response.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", response.status().as_u16())) }
    }

    /// Sends one encoded batch.
    pub async fn post(&self, batch_id: u64, body: Bytes, status: GatewayStatus) -> PostOutcome {
        let response = self
            .request(&self.url, status)
            .header("content-type", BATCH_CONTENT_TYPE)
            .header("content-encoding", "zstd")
            .header("x-kappa-batch-id", batch_id.to_string())
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "network"
                };
                return PostOutcome::Retry { reason, detail: error_chain(&e), retry_after: None };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(300)));
        if (200..300).contains(&status) {
            return PostOutcome::Accepted;
        }
        let detail = response.text().await.unwrap_or_default().chars().take(500).collect::<String>();
        classify(status, detail, retry_after)
    }
}

/// Maps a non-2xx status to what the forwarder should do.
pub fn classify(status: u16, detail: String, retry_after: Option<Duration>) -> PostOutcome {
    match status {
        400 | 413 | 415 | 422 => PostOutcome::Refused { status, detail },
        401 | 403 => PostOutcome::Retry { reason: "unauthorized", detail, retry_after },
        408 => PostOutcome::Retry { reason: "timeout", detail, retry_after },
        429 => PostOutcome::Retry { reason: "throttled", detail, retry_after },
        500..=599 => PostOutcome::Retry { reason: "server_error", detail, retry_after },
        _ => {
            PostOutcome::Retry { reason: "unexpected_status", detail: format!("HTTP {status}: {detail}"), retry_after }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_batch_is_refused_but_an_overloaded_cloud_is_retried() {
        assert!(matches!(classify(400, "x".into(), None), PostOutcome::Refused { status: 400, .. }));
        assert!(matches!(classify(413, "x".into(), None), PostOutcome::Refused { .. }));
        assert!(matches!(classify(503, "x".into(), None), PostOutcome::Retry { reason: "server_error", .. }));
        assert!(matches!(classify(429, "x".into(), None), PostOutcome::Retry { reason: "throttled", .. }));
    }

    #[test]
    fn bad_credentials_are_retried_not_dropped() {
        assert!(matches!(classify(401, String::new(), None), PostOutcome::Retry { reason: "unauthorized", .. }));
    }
}
