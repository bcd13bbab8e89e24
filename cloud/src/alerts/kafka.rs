//! Alerts to a Kafka topic.
//!
//! With `[alerts.kafka]` configured, every alert transition also becomes an
//! outbox row for the target `#kafka` (a name no webhook can take), and this
//! task produces the rows in order to the topic with librdkafka's idempotent
//! producer (`acks=all`): key = alert id, value = the same JSON payload a
//! webhook gets, headers `idempotency-key` and `transition`. A row is marked
//! delivered only after its delivery report, so a crash re-produces it with
//! the same key and headers (consumers deduplicate on `idempotency-key`);
//! while the broker is away rows wait and retry with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::deliver::{Outcome, RetryPolicy, deliver_loop};
use crate::kafka::{ProducerSlot, TopicSpec, client_config, ensure_topic, topic_problem};
use crate::metrics::CloudMetrics;

/// The outbox target of the Kafka topic (`#` keeps it apart from webhook names).
pub const TARGET: &str = "#kafka";

/// `[alerts.kafka]` of the cloud config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaAlertsConfig {
    /// `host:port,host:port` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Create the topic if it is missing (admin API); otherwise a missing
    /// topic is an error at startup.
    #[serde(default = "default_true")]
    pub create_topic: bool,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// How long one produce may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Passed to librdkafka as they are, e.g. `"security.protocol" = "SASL_SSL"`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_topic() -> String {
    "alerts".into()
}
fn default_true() -> bool {
    true
}
fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    1
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl KafkaAlertsConfig {
    /// Problems, each with its key path.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.brokers.trim().is_empty() {
            out.push("alerts.kafka.brokers: must name at least one host:port".into());
        }
        out.extend(topic_problem("alerts.kafka.topic", &self.topic));
        if self.partitions < 1 {
            out.push("alerts.kafka.partitions: must be at least 1".into());
        }
        if self.replication_factor < 1 {
            out.push("alerts.kafka.replication_factor: must be at least 1".into());
        }
        if self.timeout.is_zero() {
            out.push("alerts.kafka.timeout: must be positive".into());
        }
        out
    }

    fn topic_spec(&self) -> TopicSpec<'_> {
        TopicSpec {
            name: &self.topic,
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            create: self.create_topic,
            timeout: self.timeout,
            section: "alerts.kafka",
        }
    }
}

/// Produces the `#kafka` outbox rows in order until `cancel` fires.
pub async fn run(
    cfg: KafkaAlertsConfig,
    outbox: crate::store::StoreAt,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
) -> Result<(), String> {
    // The broker may be down at startup: keep trying until the topic is there.
    let mut wait = Duration::from_millis(200);
    loop {
        match ensure_topic(&client_config(&cfg.brokers, &cfg.properties), &cfg.topic_spec()).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "The alerts topic is not ready; retrying.");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    let producer =
        Arc::new(ProducerSlot::new(client_config(&cfg.brokers, &cfg.properties), cfg.timeout, "alerts.kafka", true)?);
    tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, "Alerts go to Kafka.");
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
    };
    let topic = cfg.topic.clone();
    deliver_loop(TARGET, policy, outbox, metrics, cancel, |d| {
        let topic = topic.clone();
        let slot = producer.clone();
        async move {
            let producer = match slot.get() {
                Ok(p) => p,
                Err(e) => return Outcome::Failed(e),
            };
            let key = d.idempotency_key();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "idempotency-key", value: Some(key.as_bytes()) })
                .insert(Header { key: "transition", value: Some(d.transition.as_bytes()) });
            let record = FutureRecord::to(&topic).key(&d.alert_id).payload(&d.payload).headers(headers);
            match producer.send(record, Duration::ZERO).await {
                Ok(_) => {
                    slot.succeeded();
                    Outcome::Delivered
                }
                Err((e, _)) => {
                    let n = slot.failed(&e);
                    Outcome::Failed(format!("{e} (failure {n} in a row)"))
                }
            }
        }
    })
    .await
}
