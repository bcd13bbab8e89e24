//! The `[log.kafka]` section: the topic, the brokers and librdkafka's settings.

use super::*;

/// `[log.kafka]` of the cloud config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaLogConfig {
    /// `host:port,host:port` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Create the topic (with `log.partitions` partitions) if it is missing;
    /// otherwise a missing topic stops the node at startup.
    #[serde(default = "default_true")]
    pub create_topic: bool,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// How long an append may wait for its delivery reports before ingest
    /// answers 503 (librdkafka's `message.timeout.ms`).
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Passed to librdkafka as they are, e.g. `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_topic() -> String {
    "kappa-events".into()
}
fn default_true() -> bool {
    true
}
fn default_replication() -> i32 {
    1
}
fn default_delivery_timeout() -> Duration {
    Duration::from_secs(5)
}

impl KafkaLogConfig {
    /// Problems, each with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.brokers.trim().is_empty() {
            out.push("log.kafka.brokers: must name at least one host:port".into());
        }
        out.extend(topic_problem("log.kafka.topic", &self.topic));
        if self.replication_factor < 1 {
            out.push("log.kafka.replication_factor: must be at least 1".into());
        }
        if self.delivery_timeout < Duration::from_millis(100) {
            out.push("log.kafka.delivery_timeout: must be at least 100ms".into());
        }
        for key in ["bootstrap.servers", "enable.idempotence", "acks"] {
            if self.properties.contains_key(key) {
                out.push(format!("log.kafka.properties: {key:?} is set by the log itself and cannot be overridden"));
            }
        }
        out
    }

    pub(super) fn client(&self) -> ClientConfig {
        client_config(&self.brokers, &self.properties)
    }
}
