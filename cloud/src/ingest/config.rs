//! The `[ingest]` section: limits on what `POST /v1/ingest` accepts.

use std::time::Duration;

use kappa_common::batch::BatchLimits;
use kappa_common::frame::FrameLimits;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest compressed request body.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest body after decompression.
    #[serde(default = "default_max_decompressed")]
    pub max_decompressed_bytes: usize,
    /// Largest decompression ratio.
    #[serde(default = "default_max_ratio")]
    pub max_ratio: usize,
    /// Most readings in one batch.
    #[serde(default = "default_max_readings")]
    pub max_readings: usize,
    /// Appends waiting for the log before ingest answers 503.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// How often, per gateway, ingest records the gateway's progress in the
    /// partitions its batches do not touch (silence alerts use it; zero:
    /// with every batch). Silence is judged at this resolution.
    #[serde(default = "default_progress_interval", with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Most readings (and edge aggregates) per second one gateway may send:
    /// a token bucket holding 10 s of them, and a batch larger than that
    /// passes from a full bucket. Over it, 429 with `Retry-After`. 0: no limit.
    #[serde(default)]
    pub max_gateway_readings_per_second: u64,
    /// Most heartbeats per second one gateway may send (a bucket of 10 s of
    /// them); each appends a record to every partition. Over it, 429. The
    /// agent sends one every `forward.heartbeat_interval` (default 5 s).
    #[serde(default = "default_heartbeats")]
    pub max_gateway_heartbeats_per_second: u64,
}

fn default_heartbeats() -> u64 {
    2
}

fn default_progress_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_max_body() -> usize {
    4 << 20
}
fn default_max_decompressed() -> usize {
    32 << 20
}
fn default_max_ratio() -> usize {
    100
}
fn default_max_readings() -> usize {
    100_000
}
fn default_queue() -> usize {
    256
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body(),
            max_decompressed_bytes: default_max_decompressed(),
            max_ratio: default_max_ratio(),
            max_readings: default_max_readings(),
            queue_capacity: default_queue(),
            progress_interval: default_progress_interval(),
            max_gateway_readings_per_second: 0,
            max_gateway_heartbeats_per_second: default_heartbeats(),
        }
    }
}

impl IngestConfig {
    /// The per-gateway rate limiter, if one is configured.
    pub fn gateway_rate(&self) -> Option<kappa_runtime::rate::KeyedRate> {
        let rate = self.max_gateway_readings_per_second as f64;
        (rate > 0.0).then(|| kappa_runtime::rate::KeyedRate::new(rate, rate * 10.0))
    }

    /// The per-gateway heartbeat limiter.
    pub fn heartbeat_rate(&self) -> kappa_runtime::rate::KeyedRate {
        let rate = self.max_gateway_heartbeats_per_second as f64;
        kappa_runtime::rate::KeyedRate::new(rate, rate * 10.0)
    }

    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            frame: FrameLimits {
                max_compressed: self.max_body_bytes,
                max_decompressed: self.max_decompressed_bytes,
                max_ratio: self.max_ratio,
            },
            max_readings: self.max_readings,
        }
    }
}
