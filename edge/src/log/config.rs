//! The `[log]` section: durability, commits and the byte budget of the edge log.

use std::time::Duration;

use kappa_runtime::config::ByteSize;
use serde::Deserialize;

pub use kappa_runtime::config::Durability;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// How long the first reading of a commit waits for company.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub commit_linger: Duration,
    /// Most readings in one commit.
    #[serde(default = "default_max_commit")]
    pub max_commit_readings: usize,
    /// Quarantined (rejected) payloads kept for inspection.
    #[serde(default = "default_quarantine_keep")]
    pub quarantine_keep: u64,
    /// Hard budget for the log: data pages plus the WAL.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Free space to keep on the data directory's filesystem; below it the log sheds.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: ByteSize,
    /// Forwarded readings are kept locally this long (for export and backfill), then deleted.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Window of the rollups that replace old unforwarded raw readings under pressure.
    #[serde(default = "default_rollup_window", with = "humantime_serde")]
    pub rollup_window: Duration,
    /// Age past which data of each class is deleted, forwarded or not.
    #[serde(default)]
    pub ttl: TtlConfig,
    /// How often retention and the budget are enforced (also at once when a commit fails for space).
    #[serde(default = "default_housekeeping", with = "humantime_serde")]
    pub housekeeping_interval: Duration,
}

/// Age limits per data class.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    #[serde(default = "default_ttl_raw", with = "humantime_serde")]
    pub raw: Duration,
    #[serde(default = "default_ttl_aggregate", with = "humantime_serde")]
    pub aggregate: Duration,
    #[serde(default = "default_ttl_exception", with = "humantime_serde")]
    pub exception: Duration,
}

fn default_ttl_raw() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_ttl_aggregate() -> Duration {
    Duration::from_secs(90 * 86_400)
}
fn default_ttl_exception() -> Duration {
    Duration::from_secs(365 * 86_400)
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self { raw: default_ttl_raw(), aggregate: default_ttl_aggregate(), exception: default_ttl_exception() }
    }
}

fn default_rollup_window() -> Duration {
    Duration::from_secs(60)
}

fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_min_free() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_housekeeping() -> Duration {
    Duration::from_secs(5)
}

fn default_durability() -> Durability {
    Durability::Full
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_max_commit() -> usize {
    5000
}
fn default_quarantine_keep() -> u64 {
    10_000
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: default_durability(),
            commit_linger: default_linger(),
            max_commit_readings: default_max_commit(),
            quarantine_keep: default_quarantine_keep(),
            max_bytes: default_max_bytes(),
            min_free_bytes: default_min_free(),
            retention: default_retention(),
            rollup_window: default_rollup_window(),
            ttl: TtlConfig::default(),
            housekeeping_interval: default_housekeeping(),
        }
    }
}

impl LogConfig {
    /// The section's own problems, each with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_bytes.0 < 1 << 20 {
            errors.push(format!("log.max_bytes: {} is below the 1MiB minimum", self.max_bytes));
        }
        if self.housekeeping_interval.is_zero() {
            errors.push("log.housekeeping_interval: must be above zero".into());
        }
        if self.max_commit_readings == 0 {
            errors.push("log.max_commit_readings: must be at least 1".into());
        }
        errors
    }
}
