//! Every metric the cloud exports, defined in one place (see `docs/metrics.md`).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A single-label set, e.g. `reason="decompression_bomb"`.
pub type Label = [(&'static str, &'static str); 1];
/// A `partition` label.
pub type PartitionLabel = [(&'static str, u32); 1];
/// A `view` label (`name@version`).
pub type ViewLabel = [(&'static str, String); 1];
/// A `pipeline` label (`main`, `alerts`, `edge_aggregates`, a version being rebuilt).
pub type PipelineLabel = [(&'static str, String); 1];
/// Two labels with values known only at run time (`rule` and `transition`, `webhook` and `result`).
pub type PairLabel = [(&'static str, String); 2];

#[derive(Debug)]
pub struct CloudMetrics {
    pub ingest_requests: Family<Label, Counter>,
    pub ingest_rejected: Family<Label, Counter>,
    pub ingest_bytes: Counter,
    pub readings_ingested: Counter,
    pub aggregates_ingested: Counter,
    pub aggregates_processed: Counter,
    pub readings_rejected: Family<Label, Counter>,
    /// Per pipeline: each pipeline processes every reading once.
    pub readings_processed: Family<PipelineLabel, Counter>,
    pub readings_duplicate: Counter,
    pub late_events: Family<ViewLabel, Counter>,
    pub view_null_inputs: Family<ViewLabel, Counter>,
    pub view_state_windows: Family<ViewLabel, Gauge>,
    pub dedup_boots: Family<PipelineLabel, Gauge>,
    pub idle_partitions: Gauge,
    pub records_undecodable: Counter,
    pub null_metric_values: Counter,
    pub checkpoints: Counter,
    pub checkpoint_seconds: Histogram,
    pub batch_seconds: Histogram,
    /// Per pipeline: the live views, edge aggregates, alerts and any
    /// version being rebuilt each run their own processor.
    pub lag_seconds: Family<PipelineLabel, Gauge>,
    pub checkpoint_rows: Histogram,
    /// Per pipeline: failures it rode out by restoring its last checkpoint.
    pub pipeline_restarts: Family<PipelineLabel, Counter>,
    pub checkpoint_commit_seconds: Histogram,
    pub window_emit_seconds: Histogram,
    /// Per pipeline: from a reading's event time to the commit that makes it
    /// visible in the views (freshness, as the device clock counts it).
    pub event_to_view_seconds: Family<PipelineLabel, Histogram, fn() -> Histogram>,
    pub lag_records: Family<PairLabel, Gauge>,
    pub watermark_seconds: Family<PipelineLabel, Gauge<f64, AtomicU64>>,
    pub archive_records: Counter,
    pub archive_segments: Counter,
    pub archive_bytes: Counter,
    pub archive_lag_records: Family<PartitionLabel, Gauge>,
    pub archive_skipped_records: Gauge,
    pub log_records_deleted: Counter,
    pub log_hole_offsets: Counter,
    pub state_rows: Family<PipelineLabel, Gauge>,
    pub heartbeats: Counter,
    pub alert_transitions: Family<PairLabel, Counter>,
    pub alert_series: Gauge,
    pub alerts_open: Gauge,
    pub webhook_deliveries: Family<PairLabel, Counter>,
    pub webhook_pending: Gauge,
    /// What each gateway reported with its last batch or heartbeat.
    pub gateway_backlog_readings: Family<ViewLabel, Gauge>,
    pub gateway_oldest_unforwarded_age_seconds: Family<ViewLabel, Gauge>,
    pub gateway_last_batch_seconds: Family<ViewLabel, Gauge<f64, AtomicU64>>,
    /// Gateways not tracked because `MAX_TRACKED_GATEWAYS` were already.
    pub gateways_untracked: Counter,
    /// Batches of gateways beyond `ingest::MAX_PROGRESS_GATEWAYS` active at
    /// once: no progress markers were written for them.
    pub progress_untracked: Counter,
    /// 1 while the last append to the event log succeeded.
    pub log_available: Gauge,
    /// API requests refused for their token, by reason.
    pub api_refused: Family<Label, Counter>,
    /// Bytes of checkpointed window state per view, and of dedup state per pipeline.
    pub state_bytes: Family<ViewLabel, Gauge>,
    pub dedup_state_bytes: Family<ViewLabel, Gauge>,
    /// TLS connections that failed or timed out in the handshake.
    pub tls_handshake_failures: Counter,
}

/// The reasons `ingest_rejected` starts with, at zero: a series that
/// appears only at its first event makes `increase(...) > 0` miss that first
/// burst. docs/metrics.md lists the same values.
pub const INGEST_REJECTED_REASONS: &[&str] = &[
    "unsupported_encoding",
    "body_too_large",
    "body_read",
    "body_timeout",
    "corrupt_frame",
    "decompression_bomb",
    "malformed_batch",
    "unknown_batch_format",
    "bad_gateway_id",
    "too_many_readings",
    "gateway_mismatch",
    "log_unavailable",
    "unauthenticated",
    "unknown_credential",
    "revoked_credential",
    "forbidden",
    "wrong_gateway",
    "rate_limited",
    "heartbeat_malformed",
    "heartbeat_gateway",
    "heartbeat_time",
    "heartbeat_rate_limited",
];

/// The results `ingest_requests` starts with, at zero.
pub const INGEST_RESULTS: &[&str] = &["accepted", "duplicate", "unavailable", "refused"];

impl CloudMetrics {
    /// The series of a node's pipelines and views, at zero from its start
    /// (the state sizes are sampled, and a pipeline counts readings as they
    /// come): the rules that watch them see a value before the first
    /// incident. Only pipelines that process readings get
    /// `readings_processed`: the edge-aggregate pipeline never does, and a
    /// zero rate there would read as a stalled pipeline.
    pub fn start_series(&self, reading_pipelines: &[String], views: &[String]) {
        for p in reading_pipelines {
            let label = [("pipeline", p.clone())];
            let _ = self.readings_processed.get_or_create(&label);
            let _ = self.dedup_state_bytes.get_or_create(&label);
        }
        for v in views {
            let _ = self.state_bytes.get_or_create(&[("view", v.clone())]);
        }
    }

    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            ingest_requests: Family::default(),
            ingest_rejected: Family::default(),
            ingest_bytes: Counter::default(),
            readings_ingested: Counter::default(),
            aggregates_ingested: Counter::default(),
            aggregates_processed: Counter::default(),
            readings_rejected: Family::default(),
            readings_processed: Family::default(),
            readings_duplicate: Counter::default(),
            late_events: Family::default(),
            view_null_inputs: Family::default(),
            view_state_windows: Family::default(),
            dedup_boots: Family::default(),
            idle_partitions: Gauge::default(),
            records_undecodable: Counter::default(),
            null_metric_values: Counter::default(),
            checkpoints: Counter::default(),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            batch_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            lag_seconds: Family::default(),
            checkpoint_rows: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            pipeline_restarts: Family::default(),
            checkpoint_commit_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            window_emit_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            event_to_view_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
                ])
            }),
            lag_records: Family::default(),
            watermark_seconds: Family::default(),
            archive_records: Counter::default(),
            archive_segments: Counter::default(),
            archive_bytes: Counter::default(),
            archive_lag_records: Family::default(),
            archive_skipped_records: Gauge::default(),
            log_records_deleted: Counter::default(),
            log_hole_offsets: Counter::default(),
            state_rows: Family::default(),
            heartbeats: Counter::default(),
            alert_transitions: Family::default(),
            alert_series: Gauge::default(),
            alerts_open: Gauge::default(),
            webhook_deliveries: Family::default(),
            webhook_pending: Gauge::default(),
            gateway_backlog_readings: Family::default(),
            gateway_oldest_unforwarded_age_seconds: Family::default(),
            gateway_last_batch_seconds: Family::default(),
            gateways_untracked: Counter::default(),
            progress_untracked: Counter::default(),
            log_available: Gauge::default(),
            api_refused: Family::default(),
            state_bytes: Family::default(),
            dedup_state_bytes: Family::default(),
            tls_handshake_failures: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("kappa_cloud");
        r.register("ingest_requests", "Ingest requests by result", m.ingest_requests.clone());
        r.register("ingest_rejected", "Ingest requests refused, by reason", m.ingest_rejected.clone());
        r.register(
            "state_bytes",
            "Bytes of window state per view as checkpointed (open windows), sampled every 10 s",
            m.state_bytes.clone(),
        );
        r.register(
            "dedup_state_bytes",
            "Bytes of deduplication state per pipeline as checkpointed, sampled every 10 s",
            m.dedup_state_bytes.clone(),
        );
        r.register(
            "api_refused",
            "API requests refused for their token, or answered 503 for time (readers_busy, query_timeout), by reason",
            m.api_refused.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS connections that failed or timed out in the handshake (plain HTTP to the TLS port, an untrusted certificate)",
            m.tls_handshake_failures.clone(),
        );
        r.register("ingest_bytes", "Compressed request bytes received", m.ingest_bytes.clone());
        r.register("readings_ingested", "Readings durably appended to the event log", m.readings_ingested.clone());
        r.register(
            "log_available",
            "1 while the event log takes appends (the last append succeeded); 0 after one failed (ingest answers 503)",
            m.log_available.clone(),
        );
        r.register(
            "aggregates_ingested",
            "Edge aggregate partials durably appended to the event log",
            m.aggregates_ingested.clone(),
        );
        r.register(
            "aggregates_processed",
            "Edge aggregate partials read from the log by a pipeline",
            m.aggregates_processed.clone(),
        );
        r.register(
            "readings_rejected",
            "Readings refused inside accepted batches, by reason",
            m.readings_rejected.clone(),
        );
        r.register(
            "readings_processed",
            "Readings a pipeline's processor handed to its operators (after dedup), per pipeline",
            m.readings_processed.clone(),
        );
        r.register(
            "readings_duplicate",
            "Readings whose (device, boot, seq) was already processed (dropped)",
            m.readings_duplicate.clone(),
        );
        r.register("late_events", "Reading-windows too late to count, by view", m.late_events.clone());
        r.register(
            "view_null_inputs",
            "Aggregate inputs that were null or missing, by view",
            m.view_null_inputs.clone(),
        );
        r.register("view_state_windows", "Open windows in memory, by view", m.view_state_windows.clone());
        r.register("dedup_boots", "Device boots remembered for dedup, per pipeline", m.dedup_boots.clone());
        r.register("idle_partitions", "Partitions not holding the watermark back", m.idle_partitions.clone());
        r.register(
            "log_records_undecodable",
            "Log records the processor could not decode (skipped)",
            m.records_undecodable.clone(),
        );
        r.register(
            "null_metric_values",
            "Metric values that were null (skipped by aggregates)",
            m.null_metric_values.clone(),
        );
        r.register("checkpoints", "Checkpoints committed (view rows with log positions)", m.checkpoints.clone());
        r.register(
            "checkpoint_seconds",
            "Processing time spent preparing one checkpoint (the commit runs on its own thread)",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoint_commit_seconds",
            "Time to commit one checkpoint to the store",
            m.checkpoint_commit_seconds.clone(),
        );
        r.register("checkpoint_rows", "View rows written per checkpoint", m.checkpoint_rows.clone());
        r.register(
            "pipeline_restarts",
            "Times a node's pipeline failed (PostgreSQL restarting, say) and restored its last checkpoint to go on",
            m.pipeline_restarts.clone(),
        );
        r.register(
            "window_emit_seconds",
            "From the watermark passing closed windows to their rows being committed",
            m.window_emit_seconds.clone(),
        );
        r.register(
            "event_to_view_seconds",
            "Per pipeline: from a reading's event time (device clock) to the commit that makes it visible in the views",
            m.event_to_view_seconds.clone(),
        );
        r.register(
            "processor_batch_seconds",
            "Time to process one polled batch of log records (decode, dedup, operators, watermarks; waiting excluded)",
            m.batch_seconds.clone(),
        );
        r.register(
            "processor_lag_seconds",
            "How long ago the newest processed record was appended, while records wait behind it (0 when caught up), per pipeline",
            m.lag_seconds.clone(),
        );
        r.register(
            "processor_lag_records",
            "Records in the log not yet processed, per pipeline and partition",
            m.lag_records.clone(),
        );
        r.register("archive_records", "Log records copied into the archive", m.archive_records.clone());
        r.register("archive_segments", "Archive segments published", m.archive_segments.clone());
        r.register("archive_bytes", "Bytes of archive segments published", m.archive_bytes.clone());
        r.register("archive_lag_records", "Log records not yet archived, per partition", m.archive_lag_records.clone());
        r.register(
            "archive_skipped_records",
            "Records a replay skipped in damaged archive blocks (archive.skip_damaged)",
            m.archive_skipped_records.clone(),
        );
        r.register(
            "log_records_deleted",
            "Log records deleted by retention (archived and processed)",
            m.log_records_deleted.clone(),
        );
        r.register(
            "log_hole_offsets",
            "Offsets the embedded log recorded as a hole at startup: commits it lost after its readers had read them",
            m.log_hole_offsets.clone(),
        );
        r.register(
            "watermark_timestamp_seconds",
            "The processor's event-time watermark, Unix seconds",
            m.watermark_seconds.clone(),
        );
        r.register(
            "state_windows",
            "Open windows held in processor memory, all views of a pipeline",
            m.state_rows.clone(),
        );
        r.register("heartbeats", "Gateway heartbeats appended to the log", m.heartbeats.clone());
        r.register(
            "alert_transitions",
            "Alert lifecycle transitions (fired, resolved), by rule",
            m.alert_transitions.clone(),
        );
        r.register("alert_series", "Device series the alert rules hold state for", m.alert_series.clone());
        r.register("alerts_open", "Alerts currently firing", m.alerts_open.clone());
        r.register(
            "webhook_deliveries",
            "Webhook delivery attempts by webhook and result (delivered, failed, dead_letter)",
            m.webhook_deliveries.clone(),
        );
        r.register("webhook_pending", "Webhook deliveries waiting in the outbox", m.webhook_pending.clone());
        r.register(
            "gateway_backlog_readings",
            "Readings waiting in a gateway's log, as it reported with its last request",
            m.gateway_backlog_readings.clone(),
        );
        r.register(
            "gateway_oldest_unforwarded_age_seconds",
            "Age of a gateway's oldest unforwarded reading, as it reported with its last request",
            m.gateway_oldest_unforwarded_age_seconds.clone(),
        );
        r.register(
            "gateway_last_batch_timestamp_seconds",
            "When a gateway's last batch or heartbeat was accepted, Unix seconds (cloud clock)",
            m.gateway_last_batch_seconds.clone(),
        );
        r.register(
            "gateways_untracked",
            "Requests from gateways beyond the tracked limit (their status is not kept)",
            m.gateways_untracked.clone(),
        );
        r.register(
            "progress_untracked",
            "Batches whose gateway found no room among the gateways tracked for progress markers (none written)",
            m.progress_untracked.clone(),
        );
        for reason in INGEST_REJECTED_REASONS {
            let _ = m.ingest_rejected.get_or_create(&[("reason", reason)]);
        }
        for result in INGEST_RESULTS {
            let _ = m.ingest_requests.get_or_create(&[("result", result)]);
        }
        m
    }
}
