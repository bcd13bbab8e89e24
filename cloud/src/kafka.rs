//! What every Kafka client of the cloud shares: client settings with
//! pass-through librdkafka properties, topic checks and creation, and a
//! producer that is replaced when librdkafka declares it unusable.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, FutureProducer, Producer, ProducerContext};

/// A librdkafka client configuration: `bootstrap.servers` plus every
/// property as given (TLS, SASL and tuning pass straight through).
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Problems with a topic name, as a config error under `key`.
pub fn topic_problem(key: &str, topic: &str) -> Option<String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    (topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal))
        .then(|| format!("{key}: {topic:?} is not a legal Kafka topic name"))
}

/// What a topic should look like.
#[derive(Debug, Clone)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Create the topic when it is missing; otherwise a missing topic is an error.
    pub create: bool,
    pub timeout: Duration,
    /// The config section, for error messages (`log.kafka`).
    pub section: &'a str,
}

/// Keeps the last error librdkafka reported about the brokers (a TLS
/// handshake or SASL failure, a refused connection), which a timed-out
/// request does not say.
#[derive(Default)]
struct LastBrokerError(Mutex<Option<String>>);

impl ClientContext for LastBrokerError {
    /// A failed connection (TLS handshake, SASL, refused) is logged as `FAIL`
    /// with the reason; it is also logged as usual.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        DefaultClientContext.log(level, fac, log_message);
        if fac == "FAIL"
            && let Ok(mut last) = self.0.lock()
        {
            *last = Some(log_message.to_string());
        }
    }

    /// Only says, e.g., "1/1 brokers are down": kept if nothing better came.
    fn error(&self, _error: KafkaError, reason: &str) {
        if let Ok(mut last) = self.0.lock() {
            last.get_or_insert_with(|| reason.to_string());
        }
    }
}

impl ProducerContext for LastBrokerError {
    type DeliveryOpaque = ();
    fn delivery(&self, _report: &rdkafka::message::DeliveryResult<'_>, _opaque: ()) {}
}

/// What the brokers say when a client with `config` connects: the first
/// error librdkafka reports within `wait`, if any.
fn broker_problem(config: &ClientConfig, wait: Duration) -> Option<String> {
    let probe: BaseProducer<LastBrokerError> = config.create_with_context(LastBrokerError::default()).ok()?;
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        // Serves the error callback.
        probe.poll(Duration::from_millis(100));
        if let Some(reason) = probe.context().0.lock().ok().and_then(|last| last.clone()) {
            return Some(reason);
        }
    }
    None
}

/// Makes sure the topic exists (creating it if allowed) and returns its
/// partition count as the brokers report it. A failure says what the
/// brokers last reported, if anything.
pub async fn ensure_topic(config: &ClientConfig, spec: &TopicSpec<'_>) -> Result<u32, String> {
    // Asking for a topic's metadata must not create it behind our back.
    let mut config = config.clone();
    config.set("allow.auto.create.topics", "false");
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(|e| format!("{}: cannot create an admin client: {e}", spec.section))?;
    let e = match check_topic(&admin, spec).await {
        Ok(partitions) => return Ok(partitions),
        Err(e) => e,
    };
    // A timeout says little: ask the brokers what is wrong (TLS, SASL, refused).
    let probe = config.clone();
    let said = tokio::task::spawn_blocking(move || broker_problem(&probe, Duration::from_secs(5))).await.ok().flatten();
    Err(match said {
        Some(reason) => format!("{e}; the brokers' error: {reason}"),
        None => e,
    })
}

async fn check_topic(admin: &AdminClient<DefaultClientContext>, spec: &TopicSpec<'_>) -> Result<u32, String> {
    let section = spec.section;
    if spec.create && partition_count(admin, spec).is_err() {
        let topic = NewTopic::new(spec.name, spec.partitions, TopicReplication::Fixed(spec.replication_factor));
        // The request timeout too: an unreachable cluster fails within `timeout`, not librdkafka's 60 s.
        let opts = AdminOptions::new().operation_timeout(Some(spec.timeout)).request_timeout(Some(spec.timeout));
        let results = admin.create_topics([&topic], &opts).await.map_err(|e| format!("{section}: {e}"))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(format!("{section}: cannot create topic {name:?}: {code}")),
            }
        }
    }
    // Metadata of a just-created topic can take a moment to show every partition.
    let deadline = std::time::Instant::now() + spec.timeout;
    loop {
        match partition_count(admin, spec) {
            Ok(n) if n > 0 => return Ok(n),
            Err(e) if !spec.create => return Err(e),
            other if std::time::Instant::now() >= deadline => {
                return Err(other
                    .err()
                    .unwrap_or_else(|| format!("{section}: topic {:?} has no partitions", spec.name)));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn partition_count(admin: &AdminClient<DefaultClientContext>, spec: &TopicSpec<'_>) -> Result<u32, String> {
    let md = admin
        .inner()
        .fetch_metadata(Some(spec.name), spec.timeout)
        .map_err(|e| format!("{}: cannot read metadata of topic {:?}: {e}", spec.section, spec.name))?;
    match md.topics().iter().find(|t| t.name() == spec.name) {
        Some(t) if t.error().is_none() => Ok(t.partitions().len() as u32),
        _ => Err(format!(
            "{}: topic {:?} does not exist{}",
            spec.section,
            spec.name,
            if spec.create { "" } else { " and create_topic is false" }
        )),
    }
}

/// Consecutive failed produces after which the producer is recreated.
const RECREATE_AFTER_FAILURES: u32 = 3;

/// An `acks=all` producer, replaced by a fresh one (a new producer id)
/// after a fatal error or repeated failures.
pub struct ProducerSlot {
    config: ClientConfig,
    current: Mutex<FutureProducer>,
    failures: AtomicU32,
    section: &'static str,
}

impl std::fmt::Debug for ProducerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSlot").field("section", &self.section).finish_non_exhaustive()
    }
}

impl ProducerSlot {
    /// `config` plus `acks=all`, a delivery timeout and, if `idempotent`,
    /// librdkafka's idempotence (no duplicates from its own retries, order
    /// kept); without it, at most 5 requests in flight per connection.
    pub fn new(
        mut config: ClientConfig,
        delivery_timeout: Duration,
        section: &'static str,
        idempotent: bool,
    ) -> Result<Self, String> {
        config
            .set("enable.idempotence", idempotent.to_string())
            .set("acks", "all")
            .set("message.timeout.ms", delivery_timeout.as_millis().max(1).to_string());
        if !idempotent {
            config.set("max.in.flight.requests.per.connection", "5");
        }
        let producer = config.create().map_err(|e| format!("{section}: cannot create the producer: {e}"))?;
        Ok(Self { config, current: Mutex::new(producer), failures: AtomicU32::new(0), section })
    }

    /// The producer to send with (a fresh one if the last was given up on).
    pub fn get(&self) -> Result<FutureProducer, String> {
        let mut current = self.current.lock().map_err(|_| format!("{}: producer lock poisoned", self.section))?;
        if self.failures.load(Ordering::Relaxed) >= RECREATE_AFTER_FAILURES
            && let Ok(fresh) = self.config.create::<FutureProducer>()
        {
            tracing::warn!(section = self.section, "Replacing the Kafka producer after repeated failures.");
            *current = fresh;
            self.failures.store(0, Ordering::Relaxed);
        }
        Ok(current.clone())
    }

    /// Notes a successful delivery.
    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Notes a failed delivery; returns how many failed in a row.
    pub fn failed(&self, e: &KafkaError) -> u32 {
        if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.failures.store(RECREATE_AFTER_FAILURES, Ordering::Relaxed);
            return RECREATE_AFTER_FAILURES;
        }
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }
}
