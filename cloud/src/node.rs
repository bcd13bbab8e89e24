//! A single-node cloud: embedded event log, processor, serving store and HTTP
//! (ingest, query API, metrics), supervised together.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
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
use crate::eventlog::{EventLog, EventLogError, LogAppender, LogSource};
use crate::ingest::{self, IngestState};
use crate::metrics::CloudMetrics;
use crate::processor::{Operator, Processor, ProcessorSettings};
use crate::store::pg::{PgReader, PgSettings, PgStore};
use crate::store::{AlertAcks, ServingReader, StoreError, ViewStore};

/// Where an operator pipeline reads: the archive (when there is one), then the log.
struct Sources<'a> {
    archive: Option<&'a Arc<dyn ArchiveStore>>,
    skip_damaged: bool,
    log: &'a EventLog,
}

/// Where the alert and aggregate pipelines keep their state and output.
#[derive(Debug, Clone)]
enum PipelineStore {
    Embedded(PathBuf),
    /// On a cluster: the pipeline claims every partition, fenced (a second
    /// node that starts it takes over, and this one stops).
    Cluster {
        settings: PgSettings,
        log_partitions: u32,
    },
}

/// Test switch (`fault-injection` builds only): a node's cluster pipelines
/// do not restart after a store error, they stop the node (the negative
/// control of the PostgreSQL restart test).
pub const FAULT_NO_PIPELINE_RESTART: &str = "KAPPA_TEST_NO_PIPELINE_RESTART";

/// Makes a pipeline's operators afresh: a pipeline that starts again after
/// a failure restores them from the store.
type MakeOps = Box<dyn Fn() -> Vec<Box<dyn Operator>> + Send>;

impl PipelineStore {
    /// Restores `pipeline` from the store and runs it until `cancel`. On a
    /// cluster, a failure that retrying can mend (PostgreSQL restarting or
    /// unreachable) restores the pipeline again from its last checkpoint
    /// and goes on; being fenced by another node that took the pipeline over
    /// ends it (and the node).
    fn run<S: LogSource>(
        &self,
        make_source: impl Fn() -> Result<S, String>,
        pipeline: &str,
        make_ops: MakeOps,
        settings: ProcessorSettings,
        metrics: Arc<CloudMetrics>,
        cancel: CancellationToken,
    ) -> Result<(), String> {
        let name = pipeline.to_string();
        let (pg, log_partitions) = match self {
            PipelineStore::Embedded(path) => {
                let store = ViewStore::open(path).map_err(|e| e.to_string())?;
                let p = Processor::with_operators(make_source()?, store, name, make_ops(), false, settings, metrics)
                    .map_err(|e| e.to_string())?;
                return p.run(cancel).map_err(|e| e.to_string());
            }
            PipelineStore::Cluster { settings: pg, log_partitions } => (pg, *log_partitions),
        };
        let every: Vec<_> = (0..log_partitions).collect();
        let restart = !kappa_runtime::fault::on(
            FAULT_NO_PIPELINE_RESTART,
            "a node's cluster pipelines stop the node on any store error",
        );
        let mut pause = Duration::from_millis(200);
        while !cancel.is_cancelled() {
            let outcome = make_source().and_then(|source| {
                let mut store = PgStore::connect(pg, log_partitions).map_err(|e| e.to_string())?;
                store.claim(pipeline, &every).map_err(|e| e.to_string())?;
                let p = Processor::with_operators(
                    source,
                    store,
                    name.clone(),
                    make_ops(),
                    false,
                    settings,
                    metrics.clone(),
                )
                .map_err(|e| e.to_string())?;
                p.run(cancel.clone()).map_err(|e| e.to_string())
            });
            let Err(e) = outcome else { return Ok(()) };
            if e.contains("fenced:") || cancel.is_cancelled() || !restart {
                return Err(e);
            }
            tracing::warn!(pipeline, error = %e, retry_in = ?pause, "The pipeline failed; it restores its last checkpoint and goes on.");
            metrics.pipeline_restarts.get_or_create(&[("pipeline", pipeline.to_string())]).inc();
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until && !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
        Ok(())
    }

    fn outbox(&self) -> deliver::OutboxAt {
        match self {
            PipelineStore::Embedded(path) => deliver::OutboxAt::Embedded(path.clone()),
            PipelineStore::Cluster { settings, log_partitions } => {
                deliver::OutboxAt::Cluster { settings: settings.clone(), log_partitions: *log_partitions }
            }
        }
    }
}

/// Runs the operators `make_ops` makes as the pipeline `pipeline` on its
/// own thread; a failure it cannot ride out stops the node.
#[allow(clippy::too_many_arguments)]
fn spawn_operators(
    tasks: &mut Tasks,
    pipeline: &'static str,
    make_ops: MakeOps,
    src: &Sources<'_>,
    store: &PipelineStore,
    settings: ProcessorSettings,
    metrics: &Arc<CloudMetrics>,
    cancel: &CancellationToken,
) -> Result<(), NodeError> {
    let name: &'static str = Box::leak(format!("processor:{pipeline}").into_boxed_str());
    let (c, m, store, log) = (cancel.clone(), metrics.clone(), store.clone(), src.log.clone());
    // Sources are made in the pipeline's thread, so that a restart makes a new one.
    let spawned = match src.archive {
        Some(a) => {
            let (archive, skip_damaged) = (a.clone(), src.skip_damaged);
            let make = move || {
                let archived = ArchiveSource::open(archive.clone(), skip_damaged).map_err(|e| e.to_string())?;
                Ok(ChainSource::new(archived, log.source().map_err(|e| e.to_string())?))
            };
            tasks.spawn_thread(name, move || store.run(make, pipeline, make_ops, settings, m, c))
        }
        None => {
            let make = move || log.source().map_err(|e| e.to_string());
            tasks.spawn_thread(name, move || store.run(make, pipeline, make_ops, settings, m, c))
        }
    };
    spawned.map_err(|e| NodeError::Bind(format!("cannot start the {pipeline} pipeline: {e}")))?;
    Ok(())
}

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
        // The certificate is read before anything starts, so a bad one stops nothing half-way.
        let tls = match &cfg.http.tls {
            None => None,
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                crate::tls::server_config(&t.cert_file, &t.key_file).map_err(NodeError::Config)?,
            ))),
        };
        let mut registry = Registry::default();
        let metrics = Arc::new(CloudMetrics::new(&mut registry));
        let log = EventLog::open(&cfg).await?;
        metrics.log_available.set(1);
        let appender = log.appender(cfg.ingest.queue_capacity)?;
        let store_path = cfg.data_dir.join("views.sqlite");
        let mut store = ViewStore::open(&store_path)?;
        let specs = cfg.view_specs().map_err(|e| NodeError::Config(e.join("\n  ")))?;
        let settings = cfg.processor_settings();
        let now_ms = crate::now_ms();
        // On a cluster the workers compute the views into PostgreSQL and the
        // API reads them there; this node ingests and runs the rest.
        // On a cluster the alert and aggregate pipelines keep their state
        // and output in PostgreSQL too, for every node's API to read.
        type Serving = (Box<dyn ServingReader>, Box<dyn AlertAcks>);
        let (plans, (serving, acks), pipeline_store): (Vec<_>, Serving, _) = match &cfg.cluster {
            None => (
                store.plan_pipelines(&specs, now_ms)?,
                (Box::new(ViewStore::open_read_only(&store_path)?), Box::new(ViewStore::open(&store_path)?)),
                PipelineStore::Embedded(store_path.clone()),
            ),
            Some(cluster) => {
                let (settings, partitions) = (cluster.store(), cfg.log.partitions);
                let (for_pipelines, specs) = (settings.clone(), specs.clone());
                let readers = tokio::task::spawn_blocking(move || -> Result<Serving, StoreError> {
                    let serving =
                        PgReader::new(settings.clone(), partitions, PgStore::connect(&settings, partitions)?, specs);
                    let acks = PgReader::new(
                        settings.clone(),
                        partitions,
                        PgStore::connect(&settings, partitions)?,
                        Vec::new(),
                    );
                    Ok((Box::new(serving), Box::new(acks)))
                })
                .await
                .map_err(|e| NodeError::Bind(format!("connecting to PostgreSQL: {e}")))??;
                (Vec::new(), readers, PipelineStore::Cluster { settings: for_pipelines, log_partitions: partitions })
            }
        };
        let primary = cfg.primary();
        let archive: Option<Arc<dyn ArchiveStore>> = if cfg.archive.enabled && primary {
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
                tasks.spawn("alerts:kafka", kafka::run(k, pipeline_store.outbox(), metrics.clone(), cancel.clone()));
            }
            for hook in cfg.webhooks.clone() {
                let name: &'static str = Box::leak(format!("webhook:{}", hook.name).into_boxed_str());
                tasks.spawn(name, deliver::run(hook, pipeline_store.outbox(), metrics.clone(), cancel.clone()));
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
            IngestState {
                appender,
                limits: cfg.ingest.batch_limits(),
                reading_limits: kappa_common::reading::ReadingLimits::default(),
                metrics: metrics.clone(),
                partitions: cfg.log.partitions,
                progress_interval: cfg.ingest.progress_interval,
                last_progress: Default::default(),
                tracked_gateways: Default::default(),
                body_timeout: cfg.http.body_read_timeout,
                auth: Arc::new(crate::auth::Auth::new(&cfg.auth)),
                gateway_rate: cfg.ingest.gateway_rate(),
            },
            ApiState {
                serving: Arc::new(Mutex::new(serving)),
                acks: Arc::new(Mutex::new(acks)),
                devices_view: cfg.api.devices_view.clone(),
                windows_view: cfg.api.windows_view.clone(),
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

async fn serve_connection<S>(io: S, router: Router, header_timeout: Duration, cancel: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A replaying processor, over the archive or (with no archive) the log.
enum Replay {
    Archive(Processor<ChainSource<Box<dyn LogSource>>>),
    Log(Processor<Box<dyn LogSource>>),
}

/// Every HTTP route of a node.
pub fn router<A: LogAppender>(ingest: IngestState<A>, api: ApiState, registry: Arc<Registry>) -> Router {
    let ready_metrics = ingest.metrics.clone();
    let read = crate::auth::ApiGuard {
        auth: ingest.auth.clone(),
        role: crate::auth::Role::Read,
        metrics: ingest.metrics.clone(),
    };
    let admin = crate::auth::ApiGuard { role: crate::auth::Role::Admin, ..read.clone() };
    let ingest = Router::new()
        .route("/v1/ingest", post(ingest::ingest::<A>))
        .route("/v1/heartbeat", post(ingest::heartbeat::<A>))
        .with_state(Arc::new(ingest));
    let api_state = Arc::new(api);
    let acknowledge = Router::new()
        .route("/v1/alerts/{id}/ack", post(api::alerts::ack))
        .with_state(api_state.clone())
        .route_layer(axum::middleware::from_fn_with_state(admin, crate::auth::require));
    let api = Router::new()
        .route("/v1/devices", get(api::devices))
        .route("/v1/devices/{id}/windows", get(api::device_windows))
        .route("/v1/views", get(api::views))
        .route("/v1/views/{view}/rows", get(api::view_rows))
        .route("/v1/late", get(api::late))
        .route("/v1/aggregates", get(api::aggregates::list))
        .route("/v1/alerts", get(api::alerts::list))
        .route("/v1/alerts/{id}", get(api::alerts::get))
        .with_state(api_state)
        .route_layer(axum::middleware::from_fn_with_state(read, crate::auth::require))
        .merge(acknowledge);
    let ops = Router::new()
        .route("/dashboard", get(api::dashboard))
        .route("/readyz", get(move || readyz(ready_metrics.clone())))
        .route("/", get(index));
    ingest.merge(api).merge(ops).merge(liveness_router(registry))
}

/// `/metrics` and `/healthz`: what every process serves.
pub(crate) fn liveness_router(registry: Arc<Registry>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok\n" })).with_state(registry)
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

/// Ready while the event log takes appends: after an append failed (the
/// disk, the Kafka brokers), 503 until one succeeds again. `/healthz` only
/// says the process answers.
async fn readyz(metrics: Arc<CloudMetrics>) -> (axum::http::StatusCode, &'static str) {
    if metrics.log_available.get() == 1 {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the event log refused the last append; ingest answers 503\n",
        )
    }
}

async fn index() -> &'static str {
    "Kappa IoT cloud node\n\n\
     GET  /dashboard                      the operator's dashboard (fleet, devices, alerts, pipeline health)\n\
     POST /v1/ingest                      edge batches (zstd + CBOR)\n\
     GET  /v1/devices                     devices (rows of api.devices_view)\n\
     GET  /v1/devices/{id}/windows        one device's windows (?from=&to=&limit=&after=&view=)\n\
     GET  /v1/views                       view versions and definitions\n\
     GET  /v1/views/{view}/rows           any view's rows (?key=&from=&to=&limit=&after=)\n\
     GET  /v1/late                        the late-events log (?view=&device=&from=&to=&limit=&after=)\n\
     GET  /v1/aggregates                  edge aggregates (?device=&metric=&window=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts                      alerts (?state=&severity=&device=&rule=&from=&to=&limit=&after=)\n\
     GET  /v1/alerts/{id}                 one alert, its history and webhook deliveries\n\
     POST /v1/alerts/{id}/ack             acknowledge ({\"by\": ..., \"note\": ...})\n\
     POST /v1/heartbeat                   a gateway's heartbeat ({\"gateway\": ..., \"ts_ms\": ...})\n\
     GET  /metrics                        Prometheus metrics\n\
     GET  /healthz                        the process answers\n\
     GET  /readyz                         ready: 503 while the event log refuses appends\n"
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
