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
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::deliver::{Outcome, RetryPolicy, deliver_loop};
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
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.topic.is_empty() || self.topic.len() > 249 || !self.topic.chars().all(legal) {
            out.push(format!("alerts.kafka.topic: {:?} is not a legal Kafka topic name", self.topic));
        }
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

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// Creates the topic unless it exists (or checks that it exists).
async fn ensure_topic(cfg: &KafkaAlertsConfig) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> =
        cfg.client_config().create().map_err(|e| format!("alerts.kafka: cannot create an admin client: {e}"))?;
    if !cfg.create_topic {
        let md = admin
            .inner()
            .fetch_metadata(Some(&cfg.topic), cfg.timeout)
            .map_err(|e| format!("alerts.kafka: cannot read metadata of {:?}: {e}", cfg.topic))?;
        let missing = md.topics().iter().all(|t| t.name() != cfg.topic || t.error().is_some());
        return if missing {
            Err(format!("alerts.kafka: topic {:?} does not exist and create_topic is false", cfg.topic))
        } else {
            Ok(())
        };
    }
    let topic = NewTopic::new(&cfg.topic, cfg.partitions, TopicReplication::Fixed(cfg.replication_factor));
    let opts = AdminOptions::new().operation_timeout(Some(cfg.timeout));
    let results = admin.create_topics([&topic], &opts).await.map_err(|e| format!("alerts.kafka: {e}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("alerts.kafka: cannot create topic {name:?}: {code}")),
        }
    }
    Ok(())
}

/// Produces the `#kafka` outbox rows in order until `cancel` fires.
pub async fn run(
    cfg: KafkaAlertsConfig,
    store_path: PathBuf,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
) -> Result<(), String> {
    // The broker may be down at startup: keep trying until the topic is there.
    let mut wait = Duration::from_millis(200);
    loop {
        match ensure_topic(&cfg).await {
            Ok(()) => break,
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
    let make_producer = || -> Result<FutureProducer, String> {
        cfg.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", cfg.timeout.as_millis().to_string())
            .create()
            .map_err(|e| format!("alerts.kafka: cannot create the producer: {e}"))
    };
    let producer = Arc::new(std::sync::Mutex::new(make_producer()?));
    let failures = Arc::new(AtomicU32::new(0));
    tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, "Alerts go to Kafka.");
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
    };
    let topic = cfg.topic.clone();
    deliver_loop(TARGET, policy, store_path, metrics, cancel, |d| {
        let topic = topic.clone();
        let failures = failures.clone();
        let slot = producer.clone();
        // An idempotent producer that hit a fatal error, or keeps failing,
        // is replaced by a new one (a new producer id); the outbox row is
        // simply sent again.
        if failures.load(Ordering::Relaxed) >= RECREATE_AFTER_FAILURES
            && let Ok(fresh) = make_producer()
            && let Ok(mut p) = slot.lock()
        {
            tracing::warn!("Replacing the alerts producer after repeated failures.");
            *p = fresh;
            failures.store(0, Ordering::Relaxed);
        }
        let producer: Option<FutureProducer> = slot.lock().ok().map(|p| p.clone());
        async move {
            let Some(producer) = producer else { return Outcome::Failed("producer lock poisoned".into()) };
            let key = d.idempotency_key();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "idempotency-key", value: Some(key.as_bytes()) })
                .insert(Header { key: "transition", value: Some(d.transition.as_bytes()) });
            let record = FutureRecord::to(&topic).key(&d.alert_id).payload(&d.payload).headers(headers);
            match producer.send(record, Duration::ZERO).await {
                Ok(_) => {
                    failures.store(0, Ordering::Relaxed);
                    Outcome::Delivered
                }
                Err((e, _)) => {
                    let fatal = matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
                    let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if fatal {
                        failures.store(RECREATE_AFTER_FAILURES, Ordering::Relaxed);
                    }
                    Outcome::Failed(format!("{e} (failure {n} in a row)"))
                }
            }
        }
    })
    .await
}

/// Consecutive failed produces after which the producer is recreated.
const RECREATE_AFTER_FAILURES: u32 = 3;
