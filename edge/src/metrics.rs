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

/// The label values the reason-keyed counters that alert rules and
/// dashboards watch start with, at zero: a series that appears only at its
/// first event makes `increase(...) > 0` miss that first burst.
/// docs/metrics.md lists the same values.
pub mod labels {
    /// `log_write_errors{kind}`.
    pub const LOG_WRITE_ERROR_KINDS: &[&str] = &["full", "busy", "io", "corrupt", "sqlite"];
    /// `forward_failures{reason}`.
    pub const FORWARD_FAILURE_REASONS: &[&str] = &[
        "connect",
        "timeout",
        "network",
        "server_error",
        "throttled",
        "unauthorized",
        "unexpected_status",
        "refused",
        "too_large",
        "heartbeat",
    ];
    /// `readings_pruned{reason}`.
    pub const PRUNE_REASONS: &[&str] = &["retention", "ttl", "budget", "disk_floor", "disk_full"];
    /// `readings_shed{reason}`.
    pub const SHED_REASONS: &[&str] = &["budget", "disk_floor", "ttl", "released"];
    /// `readings_shed{class}`.
    pub const SHED_CLASSES: &[&str] = &["raw", "aggregate", "exception"];
    /// `readings_rolled_up{reason}`.
    pub const ROLLUP_REASONS: &[&str] = &["budget", "disk_floor"];
}

/// The agent's metrics.
#[derive(Debug)]
pub struct EdgeMetrics {
    pub messages_received: Counter,
    pub readings_committed: Counter,
    pub readings_duplicate: Counter,
    pub readings_rejected: Family<Label, Counter>,
    pub clock_skew: Family<[(&'static str, &'static str); 2], Counter>,
    pub commits: Counter,
    pub commit_readings: Histogram,
    pub commit_seconds: Histogram,
    pub ingest_to_durable_seconds: Histogram,
    pub log_write_errors: Family<Label, Counter>,
    pub forward_attempts: Counter,
    pub forward_failures: Family<Label, Counter>,
    pub batches_forwarded: Counter,
    pub heartbeats: Counter,
    pub batches_dead_lettered: Counter,
    pub batches_split: Counter,
    pub dead_letter_readings: Gauge,
    pub readings_forwarded: Counter,
    pub forward_bytes: Counter,
    pub batch_readings: Histogram,
    pub batch_bytes: Histogram,
    pub forward_in_flight: Gauge,
    pub backlog_bytes: Gauge,
    pub backlog_readings: Gauge,
    pub oldest_unforwarded_age_seconds: Gauge,
    pub log_file_bytes: Gauge,
    pub readings_pruned: Family<Label, Counter>,
    pub readings_shed: Family<[(&'static str, &'static str); 2], Counter>,
    pub readings_rolled_up: Family<Label, Counter>,
    pub rollups: Counter,
    pub log_budget_bytes: Gauge,
    pub log_used_bytes: Gauge,
    pub disk_free_bytes: Gauge,
    pub log_full: Gauge,
    /// 1 while the MQTT side can take messages (embedded broker listening, or connected to the external one).
    pub mqtt_connected: Gauge,
    pub aggregate_readings: Counter,
    pub aggregates_closed: Counter,
    pub aggregate_raw_forwarded: Counter,
    pub aggregate_open_windows: Gauge,
    pub mqtt_refused: Family<Label, Counter>,
    pub mqtt_denied: Family<Label, Counter>,
    pub mqtt_connections: Gauge,
    pub mqtt_sessions_ended: Family<Label, Counter>,
    pub mqtt_republished: Counter,
}

impl EdgeMetrics {
    /// Creates the metrics and registers them under the `kappa_edge` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            messages_received: Counter::default(),
            readings_committed: Counter::default(),
            readings_duplicate: Counter::default(),
            readings_rejected: Family::default(),
            clock_skew: Family::default(),
            commits: Counter::default(),
            commit_readings: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            ingest_to_durable_seconds: Histogram::new(exponential_buckets(0.000_1, 1.25, 48)),
            log_write_errors: Family::default(),
            forward_attempts: Counter::default(),
            forward_failures: Family::default(),
            batches_forwarded: Counter::default(),
            heartbeats: Counter::default(),
            batches_dead_lettered: Counter::default(),
            batches_split: Counter::default(),
            dead_letter_readings: Gauge::default(),
            readings_forwarded: Counter::default(),
            forward_bytes: Counter::default(),
            batch_readings: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            batch_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 10)),
            forward_in_flight: Gauge::default(),
            backlog_bytes: Gauge::default(),
            backlog_readings: Gauge::default(),
            oldest_unforwarded_age_seconds: Gauge::default(),
            log_file_bytes: Gauge::default(),
            readings_pruned: Family::default(),
            readings_shed: Family::default(),
            readings_rolled_up: Family::default(),
            rollups: Counter::default(),
            log_budget_bytes: Gauge::default(),
            log_used_bytes: Gauge::default(),
            disk_free_bytes: Gauge::default(),
            log_full: Gauge::default(),
            mqtt_connected: Gauge::default(),
            aggregate_readings: Counter::default(),
            aggregates_closed: Counter::default(),
            aggregate_raw_forwarded: Counter::default(),
            aggregate_open_windows: Gauge::default(),
            mqtt_refused: Family::default(),
            mqtt_denied: Family::default(),
            mqtt_connections: Gauge::default(),
            mqtt_sessions_ended: Family::default(),
            mqtt_republished: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("kappa_edge");
        r.register("mqtt_messages_received", "Telemetry messages received from devices", m.messages_received.clone());
        r.register(
            "mqtt_connections_refused",
            "Device connections the agent's MQTT listener refused at CONNECT or cut off for a violation, by reason (tls, timeout, no_identity, bad_password, revoked, packet_too_large, publish_topic, ...)",
            m.mqtt_refused.clone(),
        );
        r.register(
            "mqtt_denied",
            "Device requests outside the device's rights, by reason (publish_topic, subscribe)",
            m.mqtt_denied.clone(),
        );
        r.register(
            "mqtt_connections",
            "Device connections open on the agent's MQTT listener",
            m.mqtt_connections.clone(),
        );
        r.register(
            "mqtt_republished",
            "PUBLISH packets flagged DUP on the agent's listener: devices resending a message they got no acknowledgement for (the log stores it once)",
            m.mqtt_republished.clone(),
        );
        r.register(
            "mqtt_sessions_ended",
            "Device sessions on the agent's MQTT listener that ended, by reason (disconnect, network, keep_alive, write_timeout, taken_over, shutdown, violation)",
            m.mqtt_sessions_ended.clone(),
        );
        r.register("readings_committed", "Readings committed to the durable log", m.readings_committed.clone());
        r.register(
            "mqtt_connected",
            "1 while devices' messages can reach the agent: its MQTT listener listens, or the agent is connected to the external broker",
            m.mqtt_connected.clone(),
        );
        r.register(
            "readings_duplicate",
            "Readings already in the log (device resends), stored once",
            m.readings_duplicate.clone(),
        );
        r.register("readings_rejected", "Payloads refused and quarantined, by reason", m.readings_rejected.clone());
        r.register(
            "clock_skew",
            "Readings whose device clock was beyond the allowed skew, by direction and policy applied",
            m.clock_skew.clone(),
        );
        r.register("log_commits", "Durable log transactions committed", m.commits.clone());
        r.register("log_commit_readings", "Entries per log commit (group commit size)", m.commit_readings.clone());
        r.register(
            "log_commit_seconds",
            "Time to commit one log transaction, fsync included",
            m.commit_seconds.clone(),
        );
        r.register(
            "ingest_to_durable_seconds",
            "From a message reaching the agent to its reading being committed (linger and queueing included)",
            m.ingest_to_durable_seconds.clone(),
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
            "Batches the cloud refused as invalid (kept as dead letters)",
            m.batches_dead_lettered.clone(),
        );
        r.register(
            "forward_batches_split",
            "Batches the cloud refused as too large (HTTP 413), sent again as two halves",
            m.batches_split.clone(),
        );
        r.register(
            "dead_letter_readings",
            "Readings of batches the cloud refused, kept until an operator resends or releases them",
            m.dead_letter_readings.clone(),
        );
        r.register("forward_readings", "Readings the cloud acknowledged", m.readings_forwarded.clone());
        r.register("forward_bytes", "Request body bytes sent to the cloud", m.forward_bytes.clone());
        r.register("forward_batch_readings", "Readings per forwarded batch", m.batch_readings.clone());
        r.register("forward_batch_bytes", "Body bytes per forwarded batch", m.batch_bytes.clone());
        r.register("forward_in_flight", "Batches on the wire now", m.forward_in_flight.clone());
        r.register(
            "backlog_bytes",
            "Stored bytes of the readings not yet acknowledged by the cloud (estimated from the newest 1,000)",
            m.backlog_bytes.clone(),
        );
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
        r.register(
            "readings_pruned",
            "Forwarded readings deleted from the edge log (the cloud has them), by reason",
            m.readings_pruned.clone(),
        );
        r.register(
            "readings_shed",
            "Unforwarded readings dropped to stay within the log's limits (they never reach the cloud), by reason",
            m.readings_shed.clone(),
        );
        r.register(
            "readings_rolled_up",
            "Unforwarded raw readings replaced by per-window rollups to stay within the log's limits, by reason",
            m.readings_rolled_up.clone(),
        );
        r.register("rollups", "Rollup aggregates written in place of raw readings", m.rollups.clone());
        r.register("log_budget_bytes", "The log's byte budget (log.max_bytes)", m.log_budget_bytes.clone());
        r.register(
            "log_used_bytes",
            "Bytes counted against the budget: data pages plus the WAL",
            m.log_used_bytes.clone(),
        );
        r.register("disk_free_bytes", "Free space on the data directory's filesystem", m.disk_free_bytes.clone());
        r.register("aggregate_readings", "Readings folded into pre-aggregated windows", m.aggregate_readings.clone());
        r.register("aggregates_closed", "Window partials closed and queued for the cloud", m.aggregates_closed.clone());
        r.register(
            "aggregate_raw_forwarded",
            "Raw readings hybrid mode forwards (past a deadband or tripping a rule)",
            m.aggregate_raw_forwarded.clone(),
        );
        r.register("aggregate_open_windows", "Pre-aggregation windows open now", m.aggregate_open_windows.clone());
        r.register(
            "log_full",
            "1 while commits fail for lack of space (nothing new is acknowledged), else 0",
            m.log_full.clone(),
        );
        for kind in labels::LOG_WRITE_ERROR_KINDS {
            let _ = m.log_write_errors.get_or_create(&[("kind", kind)]);
        }
        for reason in labels::FORWARD_FAILURE_REASONS {
            let _ = m.forward_failures.get_or_create(&[("reason", reason)]);
        }
        for reason in labels::PRUNE_REASONS {
            let _ = m.readings_pruned.get_or_create(&[("reason", reason)]);
        }
        for reason in labels::SHED_REASONS {
            for class in labels::SHED_CLASSES {
                let _ = m.readings_shed.get_or_create(&[("reason", reason), ("class", class)]);
            }
        }
        for reason in labels::ROLLUP_REASONS {
            let _ = m.readings_rolled_up.get_or_create(&[("reason", reason)]);
        }
        m
    }

    /// Counts a refused payload.
    pub fn rejected(&self, reason: &'static str) {
        self.readings_rejected.get_or_create(&[("reason", reason)]).inc();
    }
}
