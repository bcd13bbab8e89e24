//! A single-node cloud: embedded event log, processor, serving store and HTTP
//! (ingest, query API, metrics), supervised together.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use kappa_runtime::config::Validate;
use kappa_runtime::tasks::{Running, TaskFailed, Tasks};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alerts::ALERTS_PIPELINE;
use crate::alerts::engine::{AlertOperator, AlertSettings, Route, SilenceClock};
use crate::alerts::spec::Severity;
use crate::alerts::{deliver, kafka};
use crate::api::{self, ApiState};
use crate::archive::archiver::{Archiver, ArchiverSettings, Retention};
use crate::archive::source::{ArchiveSource, ChainSource};
use crate::archive::store::ArchiveStore;
use crate::config::{CloudConfig, LogBackend};
use crate::eventlog::sqlite::SqliteLog;
use crate::eventlog::sqlite::SqliteSource;
use crate::eventlog::{EventLogError, LogAppender};
use crate::ingest::{self, IngestState};
use crate::metrics::CloudMetrics;
use crate::processor::{Operator, Processor, ProcessorSettings};
use crate::store::{StoreError, ViewStore};

const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// A running cloud node.
#[derive(Debug)]
pub struct Node {
    http_addr: SocketAddr,
    running: Running,
}

impl Node {
    /// Opens the log and the store, restores the processor and starts serving.
    pub async fn start(cfg: CloudConfig) -> Result<Node, NodeError> {
        cfg.check().map_err(|e| NodeError::Config(e.to_string()))?;
        let mut registry = Registry::default();
        let metrics = Arc::new(CloudMetrics::new(&mut registry));
        let LogBackend::Sqlite = cfg.log.backend;
        let log = SqliteLog::open(&cfg.data_dir.join("eventlog.sqlite"), cfg.log.partitions, cfg.log.durability)?;
        let appender = log.start_writer(cfg.ingest.queue_capacity)?;
        let store_path = cfg.data_dir.join("views.sqlite");
        let mut store = ViewStore::open(&store_path)?;
        let reader = ViewStore::open_read_only(&store_path)?;
        let specs = cfg.view_specs().map_err(|e| NodeError::Config(e.join("\n  ")))?;
        let settings = ProcessorSettings {
            checkpoint_interval: cfg.processor.checkpoint_interval,
            max_out_of_orderness_ms: cfg.processor.max_out_of_orderness.as_millis() as i64,
            poll_records: cfg.processor.poll_records,
            idle_timeout: cfg.processor.idle_timeout,
            dedup_horizon_ms: cfg.processor.dedup_horizon.as_millis() as i64,
            split_checkpoint_for_tests: std::env::var_os("KAPPA_TEST_SPLIT_CHECKPOINT").is_some(),
        };
        if settings.split_checkpoint_for_tests {
            tracing::warn!(
                "KAPPA_TEST_SPLIT_CHECKPOINT is set: checkpoints are NOT atomic. Never use this outside tests."
            );
        }
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let plans = store.plan_pipelines(&specs, now_ms)?;
        let archive: Option<Arc<dyn ArchiveStore>> = if cfg.archive.enabled {
            Some(
                crate::archive::store::open(cfg.archive.url.as_deref(), &cfg.archive_path())
                    .map_err(|e| NodeError::Bind(e.to_string()))?,
            )
        } else {
            None
        };

        let listener = TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|e| NodeError::Bind(format!("cannot listen on {}: {e}", cfg.http.listen)))?;
        let http_addr = listener.local_addr().map_err(|e| NodeError::Bind(e.to_string()))?;
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());

        for plan in plans {
            let thread = |name: String| -> &'static str { Box::leak(name.into_boxed_str()) };
            let name = thread(format!("processor:{}", plan.pipeline));
            if !plan.building {
                // The live pipeline: its failure stops the node.
                let p = Processor::new(log.source()?, ViewStore::open(&store_path)?, plan, settings, metrics.clone())?;
                let c = cancel.clone();
                tasks
                    .spawn_thread(name, move || p.run(c).map_err(|e| e.to_string()))
                    .map_err(|e| NodeError::Bind(format!("cannot start {name}: {e}")))?;
                continue;
            }
            // A replay: archive then log. Its failure is recorded and shown; the node goes on.
            let pipeline = plan.pipeline.clone();
            let replay_metrics = Arc::new(CloudMetrics::new(&mut Registry::default()));
            let built = match &archive {
                Some(a) => ArchiveSource::open(a.clone(), cfg.archive.skip_damaged)
                    .map_err(|e| e.to_string())
                    .and_then(|src| {
                        let chain = ChainSource::new(src, log.source().map_err(|e| e.to_string())?);
                        let store = ViewStore::open(&store_path).map_err(|e| e.to_string())?;
                        Processor::new(chain, store, plan, settings, replay_metrics).map_err(|e| e.to_string())
                    })
                    .map(Replay::Archive),
                None => log
                    .source()
                    .map_err(|e| e.to_string())
                    .and_then(|src| {
                        let store = ViewStore::open(&store_path).map_err(|e| e.to_string())?;
                        Processor::new(src, store, plan, settings, replay_metrics).map_err(|e| e.to_string())
                    })
                    .map(Replay::Log),
            };
            let c = cancel.clone();
            let path = store_path.clone();
            tasks
                .spawn_thread(name, move || {
                    let result = match built {
                        Ok(Replay::Archive(p)) => p.run(c.clone()).map_err(|e| e.to_string()),
                        Ok(Replay::Log(p)) => p.run(c.clone()).map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        tracing::error!(pipeline, error = %e, "A replay failed; the other views keep running.");
                        if let Ok(mut s) = ViewStore::open(&path) {
                            let _ = s.fail_pipeline(&pipeline, &e);
                        }
                        while !c.is_cancelled() {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                    Ok(())
                })
                .map_err(|e| NodeError::Bind(format!("cannot start {name}: {e}")))?;
        }

        let rules = cfg.rule_specs().map_err(|e| NodeError::Config(e.join("\n  ")))?;
        if !rules.is_empty() {
            let op = AlertOperator::new(
                rules,
                AlertSettings {
                    gateway_lateness_ms: cfg.alerts.gateway_lateness.as_millis() as i64,
                    silence_quiet_ms: cfg.alerts.silence_arrival_quiet.as_millis() as i64,
                    gateway_gap_ms: cfg.alerts.gateway_offline_gap.as_millis() as i64,
                    routes: cfg
                        .webhooks
                        .iter()
                        .map(|w| Route {
                            webhook: w.name.clone(),
                            min_severity: w.min_severity,
                            rules: w.rules.clone(),
                        })
                        .chain(cfg.alerts.kafka.iter().map(|_| Route {
                            webhook: kafka::TARGET.to_string(),
                            min_severity: Severity::Info,
                            rules: Vec::new(),
                        }))
                        .collect(),
                    silence_clock: if std::env::var_os("KAPPA_TEST_GLOBAL_SILENCE_CLOCK").is_some() {
                        tracing::warn!(
                            "KAPPA_TEST_GLOBAL_SILENCE_CLOCK is set: offline gateways cause silence storms. Tests only."
                        );
                        SilenceClock::GlobalWatermarkForTests
                    } else {
                        SilenceClock::Gateway
                    },
                },
            );
            let ops: Vec<Box<dyn Operator>> = vec![Box::new(op)];
            let store = || ViewStore::open(&store_path);
            let pipeline = ALERTS_PIPELINE.to_string();
            let c = cancel.clone();
            let spawned = match &archive {
                Some(a) => {
                    let chain = ChainSource::new(
                        ArchiveSource::open(a.clone(), cfg.archive.skip_damaged)
                            .map_err(|e| NodeError::Bind(e.to_string()))?,
                        log.source()?,
                    );
                    let p =
                        Processor::with_operators(chain, store()?, pipeline, ops, false, settings, metrics.clone())?;
                    tasks.spawn_thread("processor:alerts", move || p.run(c).map_err(|e| e.to_string()))
                }
                None => {
                    let p = Processor::with_operators(
                        log.source()?,
                        store()?,
                        pipeline,
                        ops,
                        false,
                        settings,
                        metrics.clone(),
                    )?;
                    tasks.spawn_thread("processor:alerts", move || p.run(c).map_err(|e| e.to_string()))
                }
            };
            spawned.map_err(|e| NodeError::Bind(format!("cannot start the alert pipeline: {e}")))?;
            if let Some(k) = cfg.alerts.kafka.clone() {
                tasks.spawn("alerts:kafka", kafka::run(k, store_path.clone(), metrics.clone(), cancel.clone()));
            }
            for hook in cfg.webhooks.clone() {
                let name: &'static str = Box::leak(format!("webhook:{}", hook.name).into_boxed_str());
                tasks.spawn(name, deliver::run(hook, store_path.clone(), metrics.clone(), cancel.clone()));
            }
        }

        if let Some(a) = archive {
            let settings = ArchiverSettings {
                segment_bytes: cfg.archive.segment_bytes,
                segment_age: cfg.archive.segment_age,
                ..ArchiverSettings::default()
            };
            let mut archiver = Archiver::new(log.source()?, a, settings, metrics.clone())
                .map_err(|e| NodeError::Bind(e.to_string()))?;
            if let Some(older_than) = cfg.log.retention {
                archiver = archiver.with_retention(Retention {
                    log_path: cfg.data_dir.join("eventlog.sqlite"),
                    store_path: store_path.clone(),
                    older_than,
                });
            }
            let c = cancel.clone();
            tasks
                .spawn_thread("archiver", move || archiver.run(c).map_err(|e| e.to_string()))
                .map_err(|e| NodeError::Bind(format!("cannot start the archiver: {e}")))?;
        }

        let router = router(
            IngestState {
                appender,
                limits: cfg.ingest.batch_limits(),
                reading_limits: kappa_common::reading::ReadingLimits::default(),
                metrics: metrics.clone(),
                partitions: cfg.log.partitions,
                progress_interval: cfg.ingest.progress_interval,
                last_progress: Default::default(),
            },
            ApiState {
                store: Arc::new(Mutex::new(reader)),
                writer: Arc::new(Mutex::new(ViewStore::open(&store_path)?)),
                devices_view: cfg.api.devices_view.clone(),
                windows_view: cfg.api.windows_view.clone(),
            },
            Arc::new(registry),
        );
        let c = cancel.clone();
        tasks.spawn("http", async move {
            axum::serve(listener, router).with_graceful_shutdown(c.cancelled_owned()).await.map_err(|e| e.to_string())
        });

        tracing::info!(
            http = %http_addr,
            data_dir = %cfg.data_dir.display(),
            partitions = cfg.log.partitions,
            "Cloud node started."
        );
        Ok(Node { http_addr, running: tasks.run_in_background("cloud node", SHUTDOWN_DEADLINE) })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Starts a graceful shutdown: stop taking requests, checkpoint, exit.
    pub fn shutdown(&self) {
        self.running.shutdown();
    }

    /// Waits until the node has stopped; an error if a part failed.
    pub async fn wait(self) -> Result<(), NodeError> {
        Ok(self.running.wait().await?)
    }

    /// Runs until SIGINT/SIGTERM or a failure, then stops gracefully.
    pub async fn run_until_signal(self) -> Result<(), NodeError> {
        Ok(self.running.run_until_signal().await?)
    }
}

/// A replaying processor, over the archive or (with no archive) the log.
enum Replay {
    Archive(Processor<ChainSource<SqliteSource>>),
    Log(Processor<SqliteSource>),
}

/// Every HTTP route of a node.
pub fn router<A: LogAppender>(ingest: IngestState<A>, api: ApiState, registry: Arc<Registry>) -> Router {
    let ingest = Router::new()
        .route("/v1/ingest", post(ingest::ingest::<A>))
        .route("/v1/heartbeat", post(ingest::heartbeat::<A>))
        .with_state(Arc::new(ingest));
    let api = Router::new()
        .route("/v1/devices", get(api::devices))
        .route("/v1/devices/{id}/windows", get(api::device_windows))
        .route("/v1/views", get(api::views))
        .route("/v1/views/{view}/rows", get(api::view_rows))
        .route("/v1/late", get(api::late))
        .route("/v1/alerts", get(api::alerts::list))
        .route("/v1/alerts/{id}", get(api::alerts::get))
        .route("/v1/alerts/{id}/ack", post(api::alerts::ack))
        .with_state(Arc::new(api));
    let ops = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/", get(index))
        .with_state(registry);
    ingest.merge(api).merge(ops)
}

async fn metrics(State(registry): State<Arc<Registry>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => {
            ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
        }
        Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

async fn index() -> &'static str {
    "Kappa IoT cloud node\n\n\
     POST /v1/ingest                      edge batches (zstd + CBOR)\n\
     GET  /v1/devices                     devices (rows of api.devices_view)\n\
     GET  /v1/devices/{id}/windows        one device's windows (?from=&to=&limit=&after=&view=)\n\
     GET  /v1/views                       view versions and definitions\n\
     GET  /v1/views/{view}/rows           any view's rows (?key=&from=&to=&limit=&after=)\n\
     GET  /v1/late                        the late-events log (?view=&device=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts                      alerts (?state=&severity=&device=&rule=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts/{id}                 one alert, its history and webhook deliveries\n\
     POST /v1/alerts/{id}/ack             acknowledge ({\"by\": ..., \"note\": ...})\n\
     POST /v1/heartbeat                   a gateway's heartbeat ({\"gateway\": ..., \"ts_ms\": ...})\n\
     GET  /metrics                        Prometheus metrics\n\
     GET  /healthz, /readyz               health\n"
}

/// Why the node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] EventLogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Processor(#[from] crate::processor::ProcessorError),
    #[error("{0}")]
    Bind(String),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}
