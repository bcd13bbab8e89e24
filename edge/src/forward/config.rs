//! The `[forward]` section: how batches go to the cloud.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::aggregate::config::{ForwardMode, HybridConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// `raw` (default), `aggregate` or `hybrid`.
    #[serde(default = "default_forward_mode")]
    pub mode: ForwardMode,
    #[serde(default)]
    pub hybrid: HybridConfig,
    /// The cloud ingest base URL, e.g. `http://cloud.example:8080`.
    pub cloud_url: String,
    /// Most readings in one batch.
    #[serde(default = "default_batch_readings")]
    pub max_batch_readings: usize,
    /// Batches on the wire at once (pipelining for high-latency links).
    /// Above 1, batches can reach the cloud out of order, by up to this many
    /// minus one batches: the cloud's views must allow that much lateness.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// New batches are built at most this many readings per second, so a
    /// backlog drains at a bounded rate; 0 means no bound.
    #[serde(default = "default_forward_rate")]
    pub max_readings_per_second: u64,
    /// A partial batch leaves once its oldest reading waited this long.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub max_batch_age: Duration,
    /// Batch layout on the wire: `columnar` (format 2, the default) or `cbor`
    /// (format 1, for a cloud older than the columnar layout).
    #[serde(default = "default_encoding")]
    pub encoding: BatchEncoding,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First retry delay; doubles per failure, with full jitter.
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// With nothing to forward, tell the cloud this often that the gateway is
    /// online and caught up (so silence alerts can tell a quiet device from an
    /// offline gateway); zero turns heartbeats off.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// PEM file of the CA that signed the cloud's certificate: with it, the
    /// agent trusts only that CA for an `https://` cloud_url; without it, the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The environment variable that holds this gateway's ingest token, sent
    /// as `Authorization: Bearer` (never written to the config or the logs).
    /// Unset variable: no token is sent.
    #[serde(default = "default_token_env")]
    pub token_env: String,
}

fn default_token_env() -> String {
    "KAPPA_EDGE_CLOUD_TOKEN".into()
}

/// How batches are laid out before zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchEncoding {
    /// Columns per device with differences (batch format 2): the smallest.
    Columnar,
    /// One CBOR record per reading (batch format 1).
    Cbor,
}

impl BatchEncoding {
    /// The batch format number this encoding writes.
    pub fn format(self) -> u16 {
        match self {
            Self::Columnar => kappa_common::batch::COLUMNAR_FORMAT,
            Self::Cbor => kappa_common::batch::BATCH_FORMAT,
        }
    }
}

fn default_encoding() -> BatchEncoding {
    BatchEncoding::Columnar
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}

fn default_forward_mode() -> ForwardMode {
    ForwardMode::Raw
}
fn default_in_flight() -> usize {
    1
}
fn default_forward_rate() -> u64 {
    100_000
}
fn default_batch_readings() -> usize {
    5000
}
fn default_batch_age() -> Duration {
    Duration::from_millis(500)
}
fn default_zstd_level() -> i32 {
    3
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_min() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

impl ForwardConfig {
    /// The section's own problems, each with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(self.cloud_url.starts_with("http://") || self.cloud_url.starts_with("https://")) {
            errors.push(format!("forward.cloud_url: {:?} must start with http:// or https://", self.cloud_url));
        }
        if self.ca_file.is_some() && !self.cloud_url.starts_with("https://") {
            errors.push("forward.ca_file: only used with an https:// cloud_url".into());
        }
        if self.max_batch_readings == 0 {
            errors.push("forward.max_batch_readings: must be at least 1".into());
        }
        if !(1..=64).contains(&self.max_in_flight) {
            errors.push(format!("forward.max_in_flight: {} is outside 1..=64", self.max_in_flight));
        }
        if !(1..=19).contains(&self.zstd_level) {
            errors.push(format!("forward.zstd_level: {} is outside 1..=19", self.zstd_level));
        }
        if self.retry_min > self.retry_max {
            errors.push("forward.retry_min: must not exceed forward.retry_max".into());
        }
        errors.extend(self.hybrid.problems());
        errors
    }
}
