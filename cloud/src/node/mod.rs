//! A single-node cloud: embedded event log, processor, serving store and HTTP
//! (ingest, query API, metrics), supervised together.

use std::collections::{BTreeMap, HashSet};
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

mod http;
mod pipelines;

pub(crate) use self::http::liveness_router;
pub use self::http::router;
use self::http::serve_connection;
pub use self::pipelines::FAULT_NO_PIPELINE_RESTART;
use self::pipelines::{MakeOps, Sources, spawn_operators};

use crate::aggregates::{AGGREGATES_PIPELINE, AggregatesOperator};
use crate::alerts::ALERTS_PIPELINE;
use crate::alerts::engine::{AlertOperator, Route, SilenceClock};
use crate::alerts::spec::Severity;
use crate::alerts::{deliver, kafka};
use crate::api::{self, ApiState};
use crate::archive::archiver::{Archiver, ArchiverSettings, Retention};
use crate::archive::source::{ArchiveSource, ChainSource};
use crate::archive::store::ArchiveStore;
use crate::config::CloudConfig;
use crate::eventlog::{EventLog, EventLogError, LogAppender, LogSource, Offset, Partition};
use crate::ingest::{self, IngestState};
use crate::metrics::CloudMetrics;
use crate::processor::{Operator, Processor, ProcessorSettings};
use crate::store::{StoreAt, StoreError, ViewStore};

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
        let problems = cfg.preflight();
        if !problems.is_empty() {
            return Err(NodeError::Config(kappa_runtime::config::ConfigError(problems).to_string()));
        }
        // The certificate is read before anything starts, so a bad one stops nothing half-way.
        let tls = match &cfg.http.tls {
            None => None,
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&t.cert_file, &t.key_file).map_err(NodeError::Config)?,
            ))),
        };
        let mut registry = Registry::default();
        let metrics = Arc::new(CloudMetrics::new(&mut registry));
        let log = EventLog::open(&cfg.log, &cfg.data_dir).await?;
        metrics.log_available.set(1);
        let store_path = cfg.data_dir.join("views.sqlite");
        let mut store = ViewStore::open(&store_path)?;
        let specs = cfg.view_specs().map_err(|e| NodeError::Config(e.join("\n  ")))?;
        let settings = cfg.processor_settings();
        let now_ms = crate::now_ms();
        // On a cluster the workers compute the views into PostgreSQL and the
        // API reads them there; this node ingests and runs the rest.
        // On a cluster the alert and aggregate pipelines keep their state
        // and output in PostgreSQL too, for every node's API to read.
        let plans = if cfg.cluster.is_none() { store.plan_pipelines(&specs, now_ms)? } else { Vec::new() };
        let mut reading_pipelines: Vec<String> = plans.iter().map(|p| p.pipeline.clone()).collect();
        if !cfg.rule_specs().map_err(|e| NodeError::Config(e.join("\n  ")))?.is_empty() && cfg.primary() {
            reading_pipelines.push(ALERTS_PIPELINE.to_string());
        }
        let view_ids: Vec<String> = plans.iter().flat_map(|p| p.views.iter().map(|v| v.id())).collect();
        metrics.start_series(&reading_pipelines, &view_ids);
        let pipeline_store = cfg.store_at();
        let (at, for_readers, api) = (pipeline_store.clone(), specs.clone(), cfg.api.clone());
        let (serving, acks) = tokio::task::spawn_blocking(move || {
            at.serving(&for_readers, crate::views::operator::merge_encoded, api.readers, api.query_timeout)
        })
        .await
        .map_err(|e| NodeError::Bind(format!("connecting to the store: {e}")))??;
        let primary = cfg.primary();
        let archive: Option<Arc<dyn ArchiveStore>> = if cfg.archive.enabled && primary {
            Some(
                crate::archive::store::open(cfg.archive.url.as_deref(), &cfg.archive_path())
                    .map_err(|e| NodeError::Bind(e.to_string()))?,
            )
        } else {
            None
        };
        if let EventLog::Sqlite(l) = &log {
            let holes = l.append_after(&readers_at(&store, archive.as_deref())?)?;
            metrics.log_hole_offsets.inc_by(holes.iter().map(|h| h.end - h.start).sum());
        }
        let appender = log.appender(cfg.ingest.queue_capacity)?;

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
        if primary && !rules.is_empty() {
            let alert_settings = cfg.alerts.settings(
                cfg.webhooks
                    .iter()
                    .map(|w| Route { webhook: w.name.clone(), min_severity: w.min_severity, rules: w.rules.clone() })
                    .chain(cfg.alerts.kafka.iter().map(|_| Route {
                        webhook: kafka::TARGET.to_string(),
                        min_severity: Severity::Info,
                        rules: Vec::new(),
                    }))
                    .collect(),
                if kappa_runtime::fault::on("KAPPA_TEST_GLOBAL_SILENCE_CLOCK", "offline gateways cause silence storms")
                {
                    SilenceClock::GlobalWatermarkForTests
                } else {
                    SilenceClock::Gateway
                },
            );
            let ops: MakeOps = Box::new(move || {
                vec![Box::new(AlertOperator::new(rules.clone(), alert_settings.clone())) as Box<dyn Operator>]
            });
            let src = Sources { archive: archive.as_ref(), skip_damaged: cfg.archive.skip_damaged, log: &log };
            spawn_operators(&mut tasks, ALERTS_PIPELINE, ops, &src, &pipeline_store, settings, &metrics, &cancel)?;
            if let Some(k) = cfg.alerts.kafka.clone() {
                tasks.spawn("alerts:kafka", kafka::run(k, pipeline_store.clone(), metrics.clone(), cancel.clone()));
            }
            for hook in cfg.webhooks.clone() {
                let name: &'static str = Box::leak(format!("webhook:{}", hook.name).into_boxed_str());
                tasks.spawn(name, deliver::run(hook, pipeline_store.clone(), metrics.clone(), cancel.clone()));
            }
        }

        // Edge aggregates: cheap when there are none, so always on (on the primary).
        if primary {
            let src = Sources { archive: archive.as_ref(), skip_damaged: cfg.archive.skip_damaged, log: &log };
            let ops: MakeOps = Box::new(|| vec![Box::new(AggregatesOperator::default()) as Box<dyn Operator>]);
            spawn_operators(&mut tasks, AGGREGATES_PIPELINE, ops, &src, &pipeline_store, settings, &metrics, &cancel)?;
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

        let sampler = ViewStore::open_read_only(&store_path)?;
        let (m, c) = (metrics.clone(), cancel.clone());
        tasks
            .spawn_thread("state-size", move || {
                sample_state_bytes(&sampler, &m, &c);
                Ok(())
            })
            .map_err(|e| NodeError::Bind(format!("cannot start the state-size sampler: {e}")))?;

        let router = router(
            IngestState::new(
                appender,
                &cfg.ingest,
                cfg.log.partitions,
                cfg.http.body_read_timeout,
                metrics.clone(),
                Arc::new(crate::auth::Auth::new(&cfg.auth)),
            ),
            ApiState {
                readers: crate::api::readers::ReaderPool::new(serving, cfg.api.query_timeout, metrics.clone()),
                acks: Arc::new(Mutex::new(acks)),
                devices_view: cfg.api.devices_view.clone(),
                windows_view: cfg.api.windows_view.clone(),
                units: cfg.schema.units(),
                request_rate: cfg.api.request_rate().map(Arc::new),
            },
            Arc::new(registry),
        );
        let scheme = if tls.is_some() { "https" } else { "http" };
        let http = Http { header_timeout: cfg.http.header_read_timeout, tls, metrics: metrics.clone() };
        let c = cancel.clone();
        tasks.spawn("http", async move {
            serve_http(listener, router, http, c).await;
            Ok(())
        });

        tracing::info!(
            http = %http_addr,
            scheme,
            auth_required = cfg.auth.required,
            data_dir = %cfg.data_dir.display(),
            partitions = cfg.log.partitions,
            primary,
            log = match &log {
                EventLog::Sqlite(_) => "sqlite",
                EventLog::Kafka(_) => "kafka",
            },
            shutdown_deadline = %humantime::format_duration(cfg.shutdown_deadline),
            "Cloud node started."
        );
        cfg.auth.warn_if_exposed(http_addr);
        Ok(Node { http_addr, running: tasks.run_in_background("cloud node", cfg.shutdown_deadline) })
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

/// Every 10 s until `cancel`: the bytes of checkpointed state, into the
/// metrics (a view or pipeline whose state emptied reads 0).
fn sample_state_bytes(store: &ViewStore, metrics: &CloudMetrics, cancel: &CancellationToken) {
    let (mut views, mut pipelines) = (HashSet::new(), HashSet::new());
    while !cancel.is_cancelled() {
        match store.state_bytes() {
            Ok(b) => {
                publish_sizes(&metrics.state_bytes, "view", &mut views, b.views);
                publish_sizes(&metrics.dedup_state_bytes, "pipeline", &mut pipelines, b.dedup);
            }
            Err(e) => tracing::warn!(error = %e, "Cannot measure the size of the checkpointed state."),
        }
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until && !cancel.is_cancelled() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Sets `family{label=key}` to each size, and to 0 for keys seen before but gone now.
fn publish_sizes(
    family: &prometheus_client::metrics::family::Family<
        crate::metrics::ViewLabel,
        prometheus_client::metrics::gauge::Gauge,
    >,
    label: &'static str,
    known: &mut HashSet<String>,
    sizes: Vec<(String, i64)>,
) {
    let now: HashSet<String> = sizes.iter().map(|(k, _)| k.clone()).collect();
    for gone in known.difference(&now) {
        family.get_or_create(&[(label, gone.clone())]).set(0);
    }
    for (key, bytes) in sizes {
        family.get_or_create(&[(label, key)]).set(bytes);
    }
    known.extend(now);
}

/// How the HTTP listener serves connections.
pub(crate) struct Http {
    /// A client must send a request's headers (and finish a TLS handshake) within this.
    pub(crate) header_timeout: Duration,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) metrics: Arc<CloudMetrics>,
}

/// Serves `router` until `cancel` fires, then lets open requests finish.
/// Unlike `axum::serve`, every connection must send a request's headers
/// within `header_timeout` (idle keep-alive connections included), so slow
/// or silent clients cannot hold connections open. With TLS the handshake
/// has the same deadline.
pub(crate) async fn serve_http(listener: TcpListener, router: Router, http: Http, cancel: CancellationToken) {
    let http = Arc::new(http);
    let mut connections = tokio::task::JoinSet::new();
    while let Some(stream) = kappa_runtime::net::accept(&listener, &cancel).await {
        while connections.try_join_next().is_some() {}
        let (router, http, cancel) = (router.clone(), http.clone(), cancel.clone());
        connections.spawn(async move {
            let Some(acceptor) = &http.tls else {
                return serve_connection(stream, router, http.header_timeout, cancel).await;
            };
            match tokio::time::timeout(http.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, router, http.header_timeout, cancel).await,
                Ok(Err(e)) => {
                    http.metrics.tls_handshake_failures.inc();
                    tracing::debug!(error = %e, "A TLS handshake failed.");
                }
                Err(_) => {
                    http.metrics.tls_handshake_failures.inc();
                    tracing::debug!("A TLS handshake did not finish in time.");
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// A replaying processor, over the archive or (with no archive) the log.
enum Replay {
    Archive(Processor<ChainSource<Box<dyn LogSource>>>),
    Log(Processor<Box<dyn LogSource>>),
}

/// How far each partition's readers already are: the furthest checkpointed
/// position of any pipeline and the end of the archive. The embedded log
/// appends at or after it ([`crate::eventlog::sqlite::SqliteLog::append_after`]).
fn readers_at(store: &ViewStore, archive: Option<&dyn ArchiveStore>) -> Result<BTreeMap<Partition, Offset>, NodeError> {
    let mut at: BTreeMap<Partition, Offset> = BTreeMap::new();
    for positions in store.pipeline_positions()?.into_values() {
        for (p, o) in positions {
            let e = at.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
    }
    if let Some(archive) = archive {
        let index = crate::archive::ArchiveIndex::load(archive).map_err(|e| NodeError::Bind(e.to_string()))?;
        for &p in index.partitions.keys() {
            let e = at.entry(p).or_insert(0);
            *e = (*e).max(index.next_offset(p));
        }
    }
    Ok(at)
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
