//! Processor workers: the views computed by a Kafka consumer group into
//! PostgreSQL (docs/cluster.md).
//!
//! Any number of `kappa-cloud worker` processes join one consumer group on
//! the log's topic, and Kafka decides which partitions each reads. A worker
//! runs the same [`Processor`] a single node runs, over its share, with:
//!
//! * **state per partition** ([`partitioned::PartitionedView`]): open
//!   windows, dedup state, positions and watermarks belong to one partition,
//!   and windows close by that partition's watermark, so the rows do not
//!   depend on which worker computed which partition;
//! * **checkpoints in PostgreSQL** ([`PgStore`]): rows, state, dedup, late
//!   events and positions of a checkpoint commit in one transaction;
//! * **fencing**: a worker *claims* its partitions when it takes them (their
//!   epoch goes up), and every checkpoint only commits if the epochs are still
//!   the ones it claimed. A worker that was killed, paused or is slow to give
//!   a partition up can never write after its successor restored.
//!
//! When the group moves partitions (a worker joins, leaves or is declared
//! dead after `cluster.session_timeout`), each worker checkpoints what it
//! has (refused if its partitions were already claimed), takes its new share,
//! claims it, restores every partition's state from its last checkpoint and
//! seeks there. Nothing is lost (what was not checkpointed is read again)
//! and nothing is counted twice (state and positions move together).

pub mod partitioned;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::partitioned::PartitionedView;
use crate::config::CloudConfig;
use crate::eventlog::kafka::{GroupSource, KafkaLog};
use crate::metrics::CloudMetrics;
use crate::processor::{Operator, Processor};
use crate::store::MAIN_PIPELINE;
use crate::store::pg::PgStore;
use crate::views::spec::ViewSpec;

/// TEST ONLY: with this environment variable set, a worker takes a share
/// without restoring its partitions' window state (positions and dedup are
/// still restored). It exists to show that the cluster tests catch a worker
/// whose state does not move with its partitions.
pub const FAULT_SKIP_RESTORE: &str = "KAPPA_TEST_WORKER_SKIP_RESTORE";

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] crate::eventlog::EventLogError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A worker's Kafka and PostgreSQL handles, opened.
pub struct Worker {
    cfg: CloudConfig,
    specs: Vec<ViewSpec>,
    source: GroupSource,
    metrics: Arc<CloudMetrics>,
    /// Holds its share, restored (or has none to hold); `/readyz`.
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("views", &self.specs.len()).finish()
    }
}

impl Worker {
    /// Checks the config, registers the views in PostgreSQL and joins the group.
    pub async fn open(cfg: CloudConfig, metrics: Arc<CloudMetrics>) -> Result<Self, WorkerError> {
        let cluster =
            cfg.cluster.clone().ok_or_else(|| WorkerError::Config("a worker needs a [cluster] section".into()))?;
        let kafka = cfg
            .log
            .kafka
            .clone()
            .ok_or_else(|| WorkerError::Config("a worker reads the Kafka log: set [log.kafka]".into()))?;
        let specs = cfg.view_specs().map_err(|e| WorkerError::Config(e.join("\n  ")))?;
        let partitions = cfg.log.partitions;
        let store_settings = cluster.store();
        let registered = specs.clone();
        tokio::task::spawn_blocking(move || {
            PgStore::connect(&store_settings, partitions)?.register_views(&registered, crate::now_ms())
        })
        .await
        .map_err(|e| WorkerError::Config(format!("registering the views: {e}")))??;
        let log = KafkaLog::connect(kafka, partitions).await?;
        let source = log.group_source(&cluster.group, cluster.session_timeout)?;
        Ok(Self { cfg, specs, source, metrics, ready: Arc::new(AtomicBool::new(false)) })
    }

    /// Processes until `cancel` fires: takes each share the group assigns,
    /// restores it, runs it until the group moves partitions again, and
    /// checkpoints on the way out.
    pub fn run(self, cancel: CancellationToken) -> Result<(), WorkerError> {
        let Self { cfg, specs, mut source, metrics, ready } = self;
        let cluster = cfg.cluster.clone().ok_or_else(|| WorkerError::Config("a worker needs [cluster]".into()))?;
        let settings = cfg.processor_settings();
        let restore = std::env::var_os(FAULT_SKIP_RESTORE).is_none();
        if !restore {
            tracing::warn!(
                "{FAULT_SKIP_RESTORE} is set: moved partitions lose their window state. Never use this outside tests."
            );
        }
        while let Some(share) = source.next_assignment(|| cancel.is_cancelled()) {
            tracing::info!(partitions = ?share, "Kafka assigned this worker its partitions.");
            ready.store(share.is_empty(), Ordering::Relaxed);
            if share.is_empty() {
                continue;
            }
            let built = PgStore::connect(&cluster.store(), cfg.log.partitions).and_then(|mut store| {
                store.claim(MAIN_PIPELINE, &share)?;
                Ok(store)
            });
            let store = match built {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot claim the partitions; retrying.");
                    retry_pause(&cancel);
                    source.retake();
                    continue;
                }
            };
            let ops: Vec<Box<dyn Operator>> = specs
                .iter()
                .map(|s| Box::new(PartitionedView::new(s.clone(), &share).restoring(restore)) as Box<dyn Operator>)
                .collect();
            let mut processor = match Processor::with_operators(
                source,
                store,
                MAIN_PIPELINE.to_string(),
                ops,
                false,
                settings,
                metrics.clone(),
            ) {
                Ok(p) => p,
                Err(e) => return Err(WorkerError::Config(format!("cannot restore the partitions: {e}"))),
            };
            ready.store(true, Ordering::Relaxed);
            let outcome = loop {
                if cancel.is_cancelled() {
                    break processor.checkpoint().and_then(|()| processor.sync());
                }
                if let Err(e) = processor.step(Duration::from_millis(100)) {
                    break Err(e);
                }
                if processor.source().moved() {
                    // Hand over what is done; refused if a successor already claimed.
                    break processor.checkpoint().and_then(|()| processor.sync());
                }
            };
            source = processor.into_source();
            if let Err(e) = outcome {
                ready.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "The last checkpoint of this share did not commit; its successor reads it again.");
                if cancel.is_cancelled() {
                    break;
                }
                if e.to_string().contains("fenced:") {
                    // Another worker claimed some of these partitions: the
                    // group is moving them. Wait for it to say so (at most a
                    // session) rather than claiming them back.
                    let until = Instant::now() + cluster.session_timeout;
                    source.wait_for_move(|| cancel.is_cancelled() || Instant::now() >= until);
                } else {
                    retry_pause(&cancel);
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            if !source.moved() {
                // The share did not move but processing failed (store down,
                // fenced without a rebalance): take the same share again.
                source.retake();
            }
        }
        Ok(())
    }
}

/// `kappa-cloud worker`: a worker, with `/metrics`, `/healthz` and
/// `/readyz` (200 while it holds its share, restored, or has none; 503 while
/// it waits for a share or cannot take one) on `http.listen`, until
/// SIGINT/SIGTERM or a failure.
pub async fn run_until_signal(cfg: CloudConfig) -> Result<(), WorkerError> {
    use prometheus_client::registry::Registry;
    let mut registry = Registry::default();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let worker = Worker::open(cfg.clone(), metrics.clone()).await?;
    let ready = worker.ready.clone();
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| WorkerError::Config(format!("cannot listen on {}: {e}", cfg.http.listen)))?;
    let addr = listener.local_addr().map_err(|e| WorkerError::Config(e.to_string()))?;
    let cancel = CancellationToken::new();
    let mut tasks = kappa_runtime::tasks::Tasks::new(cancel.clone());
    let c = cancel.clone();
    tasks
        .spawn_thread("worker", move || worker.run(c).map_err(|e| e.to_string()))
        .map_err(|e| WorkerError::Config(format!("cannot start the worker: {e}")))?;
    let http = crate::node::Http { header_timeout: cfg.http.header_read_timeout, tls: None, metrics };
    let router = crate::node::liveness_router(Arc::new(registry)).route(
        "/readyz",
        axum::routing::get(move || {
            let ready = ready.load(Ordering::Relaxed);
            async move {
                match ready {
                    true => (axum::http::StatusCode::OK, "ready\n"),
                    false => {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for a share of the log\n")
                    }
                }
            }
        }),
    );
    let c = cancel.clone();
    tasks.spawn("http", async move {
        crate::node::serve_http(listener, router, http, c).await;
        Ok(())
    });
    tracing::info!(http = %addr, partitions = cfg.log.partitions, "Worker started.");
    tasks
        .run_in_background("worker", cfg.shutdown_deadline)
        .run_until_signal()
        .await
        .map_err(|e| WorkerError::Config(e.to_string()))
}

fn retry_pause(cancel: &CancellationToken) {
    for _ in 0..10 {
        if cancel.is_cancelled() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
