//! Wires the agent together and supervises its tasks.
//!
//! Tasks (supervised by `kappa_runtime::tasks`): the MQTT source, the group-commit writer, the forwarder, the HTTP
//! endpoint and a metrics refresher. One cancellation token stops them all;
//! a task that fails, or stops on its own, stops the agent with an error.
//! Shutdown order: the source stops taking messages, the writer commits what
//! it was handed and exits, the forwarder abandons its in-flight request (the
//! batch is resent on the next start; the cloud dedups it by batch id).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kappa_common::device;
use kappa_runtime::config::Validate;
use kappa_runtime::tasks::{Running, TaskFailed, Tasks};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{EdgeConfig, MqttMode};
use crate::ingest::writer::{self, WriterConfig};
use crate::log::{EdgeLog, LogError, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::mqtt::{embedded, external};
use crate::{forward, http, now_ms};

/// How long a graceful shutdown may take before tasks are aborted.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    http_addr: SocketAddr,
    running: Running,
}

impl Agent {
    /// Opens the log, binds the listeners and starts every task.
    pub async fn start(cfg: EdgeConfig) -> Result<Agent, AgentError> {
        cfg.check().map_err(|e| AgentError::Config(e.to_string()))?;
        let mut registry = Registry::default();
        let metrics = Arc::new(EdgeMetrics::new(&mut registry));
        let path = cfg.log_path();
        let mut writer_log = EdgeLog::open(&path, cfg.log.durability)?;
        writer_log.set_quarantine_keep(cfg.log.quarantine_keep);
        let writer_log = SharedLog::new(writer_log);
        let forward_log = SharedLog::new(EdgeLog::open(&path, cfg.log.durability)?);
        let stats_log = SharedLog::new(EdgeLog::open_read_only(&path)?);
        let listener = TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|e| AgentError::Bind(format!("HTTP endpoint cannot listen on {}: {e}", cfg.http.listen)))?;
        let http_addr = listener.local_addr().map_err(|e| AgentError::Bind(e.to_string()))?;

        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let (tx, rx) = mpsc::channel(cfg.mqtt.queue_capacity);
        let committed = Arc::new(Notify::new());
        let limits = device::Limits { max_payload_bytes: cfg.mqtt.max_payload_bytes, ..device::Limits::default() };

        let acks = match cfg.mqtt.mode {
            MqttMode::Embedded => {
                let broker =
                    embedded::start(cfg.mqtt.listen, &cfg.mqtt.telemetry_filter(), cfg.mqtt.max_payload_bytes, 20_000)
                        .map_err(AgentError::Broker)?;
                let (prefix, m, c) = (cfg.mqtt.topic_prefix.clone(), metrics.clone(), cancel.clone());
                tasks.spawn("mqtt-embedded", async move {
                    embedded::run(broker, tx, prefix, limits, m, c).await;
                    Ok(())
                });
                None
            }
            MqttMode::External => {
                let (host, port) = cfg.mqtt.broker_host_port().map_err(AgentError::Config)?;
                let src = external::ExternalSource {
                    host,
                    port,
                    client_id: cfg.client_id(),
                    filter: cfg.mqtt.telemetry_filter(),
                    topic_prefix: cfg.mqtt.topic_prefix.clone(),
                    limits,
                };
                let (ack_tx, ack_rx) = mpsc::unbounded_channel();
                let (m, c) = (metrics.clone(), cancel.clone());
                tasks.spawn("mqtt-external", async move {
                    external::run(src, tx, ack_rx, m, c).await;
                    Ok(())
                });
                Some(ack_tx)
            }
        };

        let writer_cfg = WriterConfig { linger: cfg.log.commit_linger, max_entries: cfg.log.max_commit_readings };
        let (m, c, n) = (metrics.clone(), cancel.clone(), committed.clone());
        tasks.spawn("writer", async move {
            writer::run(writer_log, rx, acks, n, writer_cfg, m, c).await;
            Ok(())
        });

        let (m, c, n) = (metrics.clone(), cancel.clone(), committed.clone());
        let (fcfg, gateway) = (cfg.forward.clone(), cfg.gateway_id.clone());
        tasks.spawn("forwarder", async move {
            forward::run(forward_log, fcfg, gateway, n, m, c).await.map_err(|e| e.to_string())
        });

        let (m, c) = (metrics.clone(), cancel.clone());
        tasks
            .spawn("log-metrics", async move { refresh_log_metrics(stats_log, m, c).await.map_err(|e| e.to_string()) });

        let c = cancel.clone();
        let registry = Arc::new(registry);
        tasks.spawn("http", async move {
            http::serve(listener, registry, c).await;
            Ok(())
        });

        tracing::info!(
            gateway = %cfg.gateway_id,
            log = %path.display(),
            mqtt = ?cfg.mqtt.mode,
            cloud = %cfg.forward.cloud_url,
            metrics = %format!("http://{http_addr}/metrics"),
            "Edge agent started."
        );
        Ok(Agent { http_addr, running: tasks.run_in_background("edge agent", SHUTDOWN_DEADLINE) })
    }

    /// Where `/metrics` and `/healthz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.running.shutdown();
    }

    /// Waits until the agent has stopped; an error if a task failed.
    pub async fn wait(self) -> Result<(), AgentError> {
        Ok(self.running.wait().await?)
    }

    /// Runs until SIGINT/SIGTERM or a failure, then stops gracefully.
    pub async fn run_until_signal(self) -> Result<(), AgentError> {
        Ok(self.running.run_until_signal().await?)
    }
}

async fn refresh_log_metrics(
    log: SharedLog,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let s = log.call(|l| l.backlog()).await?;
        metrics.backlog_readings.set(s.readings as i64);
        metrics.oldest_unforwarded_age_seconds.set(s.oldest_received_ms.map_or(0, |t| (now_ms() - t).max(0) / 1000));
        metrics.log_file_bytes.set(s.file_bytes as i64);
    }
}

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Bind(String),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}
