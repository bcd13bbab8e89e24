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

/// An HTTP client for one cloud ingest endpoint.
#[derive(Debug, Clone)]
pub struct CloudClient {
    http: reqwest::Client,
    url: String,
    heartbeat_url: String,
    gateway: String,
}

impl CloudClient {
    pub fn new(base_url: &str, gateway: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let http =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout.min(Duration::from_secs(5))).build()?;
        let base = base_url.trim_end_matches('/');
        Ok(Self {
            http,
            url: format!("{base}/v1/ingest"),
            heartbeat_url: format!("{base}/v1/heartbeat"),
            gateway: gateway.to_string(),
        })
    }

    /// Tells the cloud the gateway has forwarded everything up to `ts_ms`.
    pub async fn heartbeat(&self, ts_ms: i64) -> Result<(), String> {
        let body = serde_json::json!({ "gateway": self.gateway, "ts_ms": ts_ms }).to_string();
        let response = self
            .http
            .post(&self.heartbeat_url)
            .header("content-type", "application/json")
            .header("x-kappa-gateway", &self.gateway)
            .body(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if response.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", response.status().as_u16())) }
    }

    /// Sends one encoded batch.
    pub async fn post(&self, batch_id: u64, body: Bytes) -> PostOutcome {
        let response = self
            .http
            .post(&self.url)
            .header("content-type", BATCH_CONTENT_TYPE)
            .header("content-encoding", "zstd")
            .header("x-kappa-gateway", &self.gateway)
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
