//! The `[log]` section: which event log holds the stream, and how durably.

use std::time::Duration;

use serde::Deserialize;

use super::kafka::KafkaLogConfig;

/// Which event log backend holds the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// SQLite in the data directory: one machine, no other service.
    Sqlite,
    /// A Kafka topic (`[log.kafka]`): for clusters.
    Kafka,
}

pub use kappa_runtime::config::Durability;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_backend")]
    pub backend: LogBackend,
    /// Partitions of the embedded log (fixed when the log is created).
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Delete log records this old once they are archived and every view
    /// pipeline has processed them (default: keep everything).
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// The Kafka topic and brokers, for `backend = "kafka"`.
    #[serde(default)]
    pub kafka: Option<KafkaLogConfig>,
}

fn default_backend() -> LogBackend {
    LogBackend::Sqlite
}
fn default_partitions() -> u32 {
    8
}
fn default_durability() -> Durability {
    Durability::Full
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            partitions: default_partitions(),
            durability: default_durability(),
            retention: None,
            kafka: None,
        }
    }
}
