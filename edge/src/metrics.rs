//! Every metric the agent exports, defined in one place.
//!
//! Names are stable and documented in `docs/metrics.md`. Counters that carry
//! a `reason` label use the short reason strings of the error types.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `reason` (or `result`) label.
pub type Label = [(&'static str, &'static str); 1];

/// The agent's metrics.
#[derive(Debug)]
pub struct EdgeMetrics {
    pub messages_received: Counter,
    pub readings_committed: Counter,
    pub readings_duplicate: Counter,
    pub readings_rejected: Family<Label, Counter>,
    pub commits: Counter,
    pub commit_readings: Histogram,
    pub commit_seconds: Histogram,
    pub log_write_errors: Family<Label, Counter>,
    pub forward_attempts: Counter,
    pub forward_failures: Family<Label, Counter>,
    pub batches_forwarded: Counter,
    pub heartbeats: Counter,
    pub batches_dead_lettered: Counter,
    pub readings_forwarded: Counter,
    pub forward_bytes: Counter,
    pub batch_readings: Histogram,
    pub backlog_readings: Gauge,
    pub oldest_unforwarded_age_seconds: Gauge,
    pub log_file_bytes: Gauge,
}

impl EdgeMetrics {
    /// Creates the metrics and registers them under the `kappa_edge` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            messages_received: Counter::default(),
            readings_committed: Counter::default(),
            readings_duplicate: Counter::default(),
            readings_rejected: Family::default(),
            commits: Counter::default(),
            commit_readings: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            log_write_errors: Family::default(),
            forward_attempts: Counter::default(),
            forward_failures: Family::default(),
            batches_forwarded: Counter::default(),
            heartbeats: Counter::default(),
            batches_dead_lettered: Counter::default(),
            readings_forwarded: Counter::default(),
            forward_bytes: Counter::default(),
            batch_readings: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            backlog_readings: Gauge::default(),
            oldest_unforwarded_age_seconds: Gauge::default(),
            log_file_bytes: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("kappa_edge");
        r.register("mqtt_messages_received", "Telemetry messages received from devices", m.messages_received.clone());
        r.register("readings_committed", "Readings committed to the durable log", m.readings_committed.clone());
        r.register(
            "readings_duplicate",
            "Readings already in the log (device resends), stored once",
            m.readings_duplicate.clone(),
        );
        r.register("readings_rejected", "Payloads refused and quarantined, by reason", m.readings_rejected.clone());
        r.register("log_commits", "Durable log transactions committed", m.commits.clone());
        r.register("log_commit_readings", "Entries per log commit (group commit size)", m.commit_readings.clone());
        r.register(
            "log_commit_seconds",
            "Time to commit one log transaction, fsync included",
            m.commit_seconds.clone(),
        );
        r.register(
            "log_write_errors",
            "Failed log commits, by kind; nothing was acknowledged",
            m.log_write_errors.clone(),
        );
        r.register("forward_attempts", "Batch POSTs attempted", m.forward_attempts.clone());
        r.register("heartbeats", "Heartbeats the cloud accepted (sent when caught up)", m.heartbeats.clone());
        r.register("forward_failures", "Batch POSTs that failed, by reason", m.forward_failures.clone());
        r.register(
            "forward_batches",
            "Batches the cloud acknowledged as durably appended",
            m.batches_forwarded.clone(),
        );
        r.register(
            "forward_batches_dead_lettered",
            "Batches the cloud refused as invalid",
            m.batches_dead_lettered.clone(),
        );
        r.register("forward_readings", "Readings the cloud acknowledged", m.readings_forwarded.clone());
        r.register("forward_bytes", "Request body bytes sent to the cloud", m.forward_bytes.clone());
        r.register("forward_batch_readings", "Readings per forwarded batch", m.batch_readings.clone());
        r.register(
            "backlog_readings",
            "Readings in the log not yet acknowledged by the cloud",
            m.backlog_readings.clone(),
        );
        r.register(
            "oldest_unforwarded_age_seconds",
            "Age of the oldest reading not yet acknowledged by the cloud",
            m.oldest_unforwarded_age_seconds.clone(),
        );
        r.register("log_file_bytes", "Size of the durable log file", m.log_file_bytes.clone());
        m
    }

    /// Counts a refused payload.
    pub fn rejected(&self, reason: &'static str) {
        self.readings_rejected.get_or_create(&[("reason", reason)]).inc();
    }
}
