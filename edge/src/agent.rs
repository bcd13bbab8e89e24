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

use crate::aggregate::{self, Folder};
use crate::config::{EdgeConfig, ForwardMode, MqttMode};
use crate::ingest::Decoder;
use crate::ingest::writer::{self, WriterConfig};
use crate::log::{EdgeLog, LogError, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::mqtt::access::AccessSettings;
use crate::mqtt::{external, listener};
use crate::{forward, housekeeping, http, now_ms};

/// The writer connection's SQLite page cache. Inserts land at the end of
/// the table and of its `(dev_ts, device, boot, seq)` key (time first), so
/// the hot pages are few: with 10,000 devices publishing, these caches
/// (down from 1 MiB and 512 KiB) saved over a MiB of RSS at no CPU per
/// reading the benchmark could see (docs/performance.md).
const WRITER_CACHE_BYTES: u64 = 256 << 10;

/// The other connections' caches: they scan, and a scan reuses no page.
const READER_CACHE_BYTES: u64 = 128 << 10;

/// The aggregator's cache (aggregate and hybrid modes only): it rewrites
/// each active device's open windows, keyed by device first.
const AGGREGATOR_CACHE_BYTES: u64 = 512 << 10;

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
        let problems = preflight(&cfg);
        if !problems.is_empty() {
            return Err(AgentError::Config(kappa_runtime::config::ConfigError(problems).to_string()));
        }
        let shutdown_deadline = cfg.shutdown_deadline;
        let mut registry = Registry::default();
        let metrics = Arc::new(EdgeMetrics::new(&mut registry));
        let path = cfg.log_path();
        let mut writer_log = EdgeLog::open(&path, cfg.log.durability)?;
        writer_log.set_quarantine_keep(cfg.log.quarantine_keep);
        writer_log.set_cache_bytes(WRITER_CACHE_BYTES)?;
        writer_log.set_checkpointing()?;
        let writer_log = SharedLog::new(writer_log);
        let open_small = || -> Result<EdgeLog, LogError> {
            let mut log = EdgeLog::open(&path, cfg.log.durability)?;
            log.set_cache_bytes(READER_CACHE_BYTES)?;
            Ok(log)
        };
        let mut forward_log = open_small()?;
        forward_log.set_folding(cfg.forward.mode != ForwardMode::Raw);
        let forward_log = SharedLog::new(forward_log);
        let housekeeping_log = SharedLog::new(open_small()?);
        let mut stats_log = EdgeLog::open_read_only(&path)?;
        stats_log.set_cache_bytes(READER_CACHE_BYTES)?;
        let stats_log = SharedLog::new(stats_log);
        let listener = TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|e| AgentError::Bind(format!("HTTP endpoint cannot listen on {}: {e}", cfg.http.listen)))?;
        let http_addr = listener.local_addr().map_err(|e| AgentError::Bind(e.to_string()))?;

        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let (tx, rx) = mpsc::channel(cfg.mqtt.queue_capacity);
        let committed = Arc::new(Notify::new());
        let decoder = Decoder {
            topic_prefix: cfg.mqtt.topic_prefix.clone(),
            limits: device::Limits { max_payload_bytes: cfg.mqtt.max_payload_bytes, ..device::Limits::default() },
            clock: cfg.clock,
            metrics: metrics.clone(),
            // The agent's own listener keeps a bucket per connection; an
            // external broker's messages are limited per device id.
            rate: (cfg.mqtt.mode == MqttMode::External && cfg.mqtt.max_device_rate > 0).then(|| {
                Arc::new(kappa_runtime::rate::KeyedRate::new(
                    f64::from(cfg.mqtt.max_device_rate),
                    f64::from(cfg.mqtt.max_device_burst),
                ))
            }),
        };

        let acks = match cfg.mqtt.mode {
            MqttMode::Embedded => {
                let settings = listener_settings(&cfg)?;
                let sockets = listener::bind(&settings).await.map_err(AgentError::Bind)?;
                let listener = listener::Listener::new(settings, decoder, tx, metrics.clone(), cancel.clone())
                    .map_err(AgentError::Config)?;
                tasks.spawn("mqtt-listener", async move {
                    listener.run(sockets).await;
                    Ok(())
                });
                None
            }
            MqttMode::External => {
                let (host, port) = cfg.mqtt.broker_host_port().map_err(AgentError::Config)?;
                let credentials = external_credentials(&cfg).map_err(AgentError::Config)?;
                let src = external::ExternalSource {
                    host,
                    port,
                    client_id: cfg.client_id(),
                    credentials,
                    filter: cfg.mqtt.telemetry_filter(),
                    decoder,
                    ack_on_receipt: fault_ack_on_receipt(),
                };
                let (ack_tx, ack_rx) = mpsc::unbounded_channel();
                let c = cancel.clone();
                tasks.spawn("mqtt-external", async move {
                    external::run(src, tx, ack_rx, c).await;
                    Ok(())
                });
                Some(ack_tx)
            }
        };

        let writer_cfg = WriterConfig { linger: cfg.log.commit_linger, max_entries: cfg.log.max_commit_readings };
        let disk_full = Arc::new(Notify::new());
        let mut wake = writer::Wake { committed: vec![committed.clone()], disk_full: disk_full.clone() };
        if cfg.forward.mode != ForwardMode::Raw {
            let folder =
                Folder::new(&cfg.aggregate, cfg.forward.mode, &cfg.forward.hybrid).map_err(AgentError::Config)?;
            let mut log = open_small()?;
            log.set_cache_bytes(AGGREGATOR_CACHE_BYTES)?;
            let log = SharedLog::new(log);
            let to_fold = Arc::new(Notify::new());
            wake.committed.push(to_fold.clone());
            let (m, c, folded) = (metrics.clone(), cancel.clone(), committed.clone());
            tasks.spawn("aggregator", async move {
                aggregate::run(log, folder, to_fold, folded, m, c).await.map_err(|e| e.to_string())
            });
        }
        let (m, c) = (metrics.clone(), cancel.clone());
        tasks.spawn("writer", async move {
            writer::run(writer_log, rx, acks, wake, writer_cfg, m, c).await;
            Ok(())
        });

        let limits = housekeeping::Limits::new(&cfg.data_dir, &cfg.log);
        let (m, c, every) = (metrics.clone(), cancel.clone(), cfg.log.housekeeping_interval);
        tasks.spawn("housekeeping", async move {
            housekeeping::run(housekeeping_log, limits, every, disk_full, m, c).await.map_err(|e| e.to_string())
        });

        let (m, c, n) = (metrics.clone(), cancel.clone(), committed.clone());
        let (fcfg, gateway) = (cfg.forward.clone(), cfg.gateway_id.clone());
        let security = forward_security(&cfg).map_err(AgentError::Config)?;
        if security.token.is_some() && cfg.forward.cloud_url.starts_with("http://") {
            tracing::warn!(
                cloud = %cfg.forward.cloud_url,
                "The ingest token goes over plain HTTP: anyone on the path can read it. Use an https:// cloud_url."
            );
        }
        tracing::info!(
            cloud = %cfg.forward.cloud_url,
            private_ca = security.ca_pem.is_some(),
            token = security.token.is_some(),
            "Forwarding to the cloud."
        );
        tasks.spawn("forwarder", async move {
            forward::run(forward_log, fcfg, gateway, security, n, m, c).await.map_err(|e| e.to_string())
        });

        let (m, c) = (metrics.clone(), cancel.clone());
        tasks
            .spawn("log-metrics", async move { refresh_log_metrics(stats_log, m, c).await.map_err(|e| e.to_string()) });

        let c = cancel.clone();
        let registry = Arc::new(registry);
        let http_metrics = metrics.clone();
        tasks.spawn("http", async move {
            http::serve(listener, registry, http_metrics, c).await;
            Ok(())
        });

        tracing::info!(
            gateway = %cfg.gateway_id,
            log = %path.display(),
            mqtt = ?cfg.mqtt.mode,
            cloud = %cfg.forward.cloud_url,
            metrics = %format!("http://{http_addr}/metrics"),
            shutdown_deadline = %humantime::format_duration(shutdown_deadline),
            "Edge agent started."
        );
        Ok(Agent { http_addr, running: tasks.run_in_background("edge agent", shutdown_deadline) })
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

/// The environment switch that makes either MQTT source acknowledge before commit (tests only).
pub const FAULT_ACK_ON_RECEIPT: &str = "KAPPA_EDGE_FAULT_ACK_ON_RECEIPT";

fn fault_ack_on_receipt() -> bool {
    kappa_runtime::fault::on(
        FAULT_ACK_ON_RECEIPT,
        "messages are acknowledged before they are committed; a crash loses readings",
    )
}

/// What `run` needs from the machine, checked without starting anything:
/// the data directory can be written, every file the config names can be
/// read and parses (certificates, keys that match them, the CA, the
/// password file), the environment variables it names are set, and the
/// cloud client can be built. `kappa-edge config check` reports these, and
/// [`Agent::start`] refuses to start on them, so the two agree.
pub fn preflight(cfg: &EdgeConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |r: Result<(), String>| problems.extend(r.err());
    note(kappa_runtime::config::writable_dir("data_dir", &cfg.data_dir));
    match cfg.mqtt.mode {
        MqttMode::Embedded => note(
            listener_settings(cfg)
                .map_err(|e| e.to_string())
                .and_then(|settings| settings.access.map(crate::mqtt::access::Access::new).transpose().map(|_| ())),
        ),
        MqttMode::External => {
            note(cfg.mqtt.broker_host_port().map(|_| ()));
            note(external_credentials(cfg).map(|_| ()));
        }
    }
    note(forward_security(cfg).and_then(|security| {
        forward::client::CloudClient::new(
            &cfg.forward.cloud_url,
            &cfg.gateway_id,
            cfg.forward.request_timeout,
            &security,
        )
        .map(|_| ())
    }));
    problems
}

/// The login for the external broker: `mqtt.username` with the password
/// from the environment variable `mqtt.password_env`.
fn external_credentials(cfg: &EdgeConfig) -> Result<Option<external::Credentials>, String> {
    let Some(username) = &cfg.mqtt.username else { return Ok(None) };
    let var = &cfg.mqtt.password_env;
    let password = std::env::var(var).map_err(|_| {
        format!(
            "mqtt.password_env: the environment variable {var} (the password for mqtt.username {username:?}) is not set"
        )
    })?;
    Ok(Some(external::Credentials { username: username.clone(), password }))
}

/// The cloud's CA (`forward.ca_file`) and the gateway's token (from the
/// environment variable `forward.token_env`).
fn forward_security(cfg: &EdgeConfig) -> Result<forward::client::Security, String> {
    let ca_pem = match &cfg.forward.ca_file {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("forward.ca_file: cannot read {}: {e}", path.display()))?;
            // The HTTP client takes a file without a certificate in it, and
            // then trusts nothing: every request would fail.
            kappa_runtime::tls::client_config("forward.ca_file", path)?;
            Some(pem)
        }
        None => None,
    };
    let token = std::env::var(&cfg.forward.token_env).ok().filter(|t| !t.trim().is_empty());
    Ok(forward::client::Security { ca_pem, token })
}

/// What the agent's MQTT listener enforces, from the `[mqtt]` section.
fn listener_settings(cfg: &EdgeConfig) -> Result<listener::ListenerSettings, AgentError> {
    use kappa_runtime::tls::ClientAuth;
    let m = &cfg.mqtt;
    let tls = match &m.tls {
        None => None,
        Some(t) => {
            let clients = match (&t.client_ca_file, t.require_client_certificate) {
                (None, _) => ClientAuth::None,
                (Some(ca), false) => ClientAuth::Optional(ca),
                (Some(ca), true) => ClientAuth::Required(ca),
            };
            let config = kappa_runtime::tls::server_config("mqtt.tls", &t.cert_file, &t.key_file, clients)
                .map_err(AgentError::Config)?;
            Some((t.listen, Arc::new(config)))
        }
    };
    let access = m.gated().then(|| {
        let a = m.access.clone().unwrap_or_default();
        AccessSettings {
            anonymous: a.anonymous,
            password_file: a.password_file,
            revoked: a.revoked.into_iter().collect(),
        }
    });
    Ok(listener::ListenerSettings {
        plain: m.plain.then_some(m.listen),
        tls,
        access,
        topic_prefix: m.topic_prefix.clone(),
        // Payloads up to this far over the limit reach the decoder and are
        // quarantined with a reason; bigger packets end the session.
        max_packet: m.max_payload_bytes.saturating_mul(OVERSIZE_FACTOR) + 1024,
        // A will is a reading; ids and a password fit in the rest.
        max_connect_packet: m.max_payload_bytes + 4096,
        max_connections: m.max_connections,
        connect_timeout: m.connect_timeout,
        receive_maximum: m.receive_maximum,
        device_rate: (m.max_device_rate > 0).then(|| (f64::from(m.max_device_rate), f64::from(m.max_device_burst))),
        ack_on_receipt: fault_ack_on_receipt(),
    })
}

/// How far over `mqtt.max_payload_bytes` a payload may be and still be
/// quarantined with its reason rather than end the device's session.
const OVERSIZE_FACTOR: usize = 16;

async fn refresh_log_metrics(
    log: SharedLog,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    // Counting the backlog reads all of it: every 2 s while it is small, every 10 s once it is not.
    let mut every = Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        let s = log.call(|l| l.backlog()).await?;
        every = Duration::from_secs(if s.readings < 50_000 { 2 } else { 10 });
        metrics.backlog_readings.set(s.readings as i64);
        metrics.backlog_bytes.set(s.bytes as i64);
        metrics.oldest_unforwarded_age_seconds.set(s.oldest_received_ms.map_or(0, |t| (now_ms() - t).max(0) / 1000));
        metrics.log_file_bytes.set(s.file_bytes as i64);
        metrics.dead_letter_readings.set(log.call(|l| l.dead_letter_readings()).await? as i64);
        // What bursts (a commit, a batch loaded and encoded) freed goes back
        // to the system instead of staying resident until the next burst.
        // Off the runtime's threads: it holds the allocator's locks a moment.
        let _ = tokio::task::spawn_blocking(kappa_runtime::memory::give_back_free_pages).await;
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
    Bind(String),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}
