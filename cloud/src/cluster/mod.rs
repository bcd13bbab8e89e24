//! Processor workers: the views computed by a group of workers over the
//! Kafka log into PostgreSQL (docs/cluster.md).
//!
//! Any number of `kappa-cloud worker` processes join one group, and the
//! group decides which partitions each reads: through PostgreSQL
//! ([`membership`], the default) or Kafka's consumer group protocol
//! (`cluster.assignment = "kafka"`). A worker runs the same [`Processor`] a
//! single node runs, over its share, with:
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
//! When the group moves partitions (a worker joins, leaves or dies), each
//! worker that only gains partitions checkpoints what it has; one that
//! loses some to another hands over without (the new owner's claim would
//! refuse it). Then it takes its new share, claims it, restores every
//! partition's state from its last checkpoint and seeks there. Nothing is
//! lost (what was not checkpointed is read again) and nothing is counted
//! twice (state and positions move together).

pub mod membership;
pub mod partitioned;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::partitioned::PartitionedView;
use crate::archive::source::{ArchiveSource, ChainSource};
use crate::config::{Assignment, CloudConfig, ClusterConfig};
use crate::eventlog::kafka::{GroupSource, GroupState, KafkaLog};
use crate::eventlog::{ConsumedRecord, EventLogError, LogSource, Offset, Partition};
use crate::metrics::CloudMetrics;
use crate::processor::{Operator, Processor, ProcessorError};
use crate::store::pg::{PgSettings, PgStore};
use crate::store::{MAIN_PIPELINE, PipelinePlan};

/// TEST ONLY: with this environment variable set, a worker takes a share
/// without restoring its partitions' window state (positions and dedup are
/// still restored). It exists to show that the cluster tests catch a worker
/// whose state does not move with its partitions.
pub const FAULT_SKIP_RESTORE: &str = "KAPPA_TEST_WORKER_SKIP_RESTORE";

/// TEST ONLY: with this environment variable set, a view version added to a
/// running cluster joins the live pipeline instead of replaying the log from
/// its start. It exists to show that the cluster replay test catches a new
/// version that misses the history before it was added.
pub const FAULT_NO_REPLAY: &str = "KAPPA_TEST_WORKER_NO_REPLAY";

/// TEST ONLY: with this environment variable set, a worker fenced out of
/// partitions its group did not move waits for a move that never comes
/// instead of taking its share again (or joining its group again). It
/// exists to show that the fencing tests catch a worker that gives up.
pub const FAULT_FENCED_WAITS: &str = "KAPPA_TEST_WORKER_FENCED_WAITS";

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
    log: KafkaLog,
    /// Each pipeline with the group member that reads its share.
    pipelines: Vec<(PipelinePlan, Seat, GroupSource)>,
    metrics: Arc<CloudMetrics>,
    /// Per pipeline: holds its share, restored (or has none to hold); `/readyz`.
    ready: Vec<Arc<AtomicBool>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pipelines: Vec<&str> = self.pipelines.iter().map(|(p, ..)| p.pipeline.as_str()).collect();
        f.debug_struct("Worker").field("pipelines", &pipelines).finish()
    }
}

/// The consumer group of a pipeline: `cluster.group` for `main`, and a group
/// of its own for each replay, so Kafka spreads every pipeline's partitions
/// over the workers independently.
pub fn group_of(group: &str, pipeline: &str) -> String {
    if pipeline == MAIN_PIPELINE { group.to_string() } else { format!("{group}.{pipeline}") }
}

impl Worker {
    /// Checks the config, plans the pipelines in PostgreSQL (a view version
    /// added since the store was created is replayed by a pipeline of its
    /// own) and joins each pipeline's group.
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
        let replay_new = !kappa_runtime::fault::on(
            FAULT_NO_REPLAY,
            "new view versions start where the live views are and miss the log before",
        );
        let plans = tokio::task::spawn_blocking(move || {
            PgStore::connect(&store_settings, partitions)?.plan_pipelines(&specs, crate::now_ms(), replay_new)
        })
        .await
        .map_err(|e| WorkerError::Config(format!("planning the pipelines: {e}")))??;
        let log = KafkaLog::connect(kafka, partitions).await?;
        let mut pipelines = Vec::new();
        for plan in plans {
            let seat = Seat::take(&cluster, partitions, &plan.pipeline)?;
            let source = seat.source(&log)?;
            pipelines.push((plan, seat, source));
        }
        let ready = pipelines.iter().map(|_| Arc::new(AtomicBool::new(false))).collect();
        Ok(Self { cfg, log, pipelines, metrics, ready })
    }

    /// Runs every pipeline, each in a thread of its own, until `cancel`
    /// fires. `main` failing stops the worker; a replay failing is recorded
    /// (`views list` shows it) and the others go on.
    pub fn run(self, cancel: CancellationToken) -> Result<(), WorkerError> {
        let Self { cfg, log, pipelines, metrics, ready } = self;
        let restore = !kappa_runtime::fault::on(FAULT_SKIP_RESTORE, "moved partitions lose their window state");
        let recover = !kappa_runtime::fault::on(FAULT_FENCED_WAITS, "a fenced worker never takes its partitions back");
        std::thread::scope(|scope| {
            let mut threads = Vec::new();
            for ((plan, seat, source), ready) in pipelines.into_iter().zip(ready) {
                let (cfg, cancel, log) = (&cfg, &cancel, &log);
                // A replay's counters would be taken for the live pipeline's:
                // like a node's replays, it gets a registry of its own.
                let metrics = if plan.building {
                    Arc::new(CloudMetrics::new(&mut prometheus_client::registry::Registry::default()))
                } else {
                    metrics.clone()
                };
                let name = format!("pipeline:{}", plan.pipeline);
                let thread = std::thread::Builder::new().name(name).spawn_scoped(scope, move || {
                    let pipeline = plan.pipeline.clone();
                    let result = Pipeline { cfg, log, plan, seat, metrics, ready: ready.clone(), restore, recover }
                        .run(source, cancel);
                    if result.is_err() {
                        // A failed replay holds nothing: it does not keep the worker unready.
                        ready.store(true, Ordering::Relaxed);
                    }
                    (pipeline, result)
                });
                match thread {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        cancel.cancel();
                        return Err(WorkerError::Config(format!("cannot start a pipeline thread: {e}")));
                    }
                }
            }
            let mut outcome = Ok(());
            for t in threads {
                match t.join() {
                    Ok((pipeline, Err(e))) if pipeline == MAIN_PIPELINE => {
                        cancel.cancel();
                        outcome = Err(e);
                    }
                    Ok((pipeline, Err(e))) => {
                        tracing::error!(pipeline, error = %e, "A replay failed; the other pipelines keep running.")
                    }
                    Ok((_, Ok(()))) => {}
                    Err(_) => {
                        cancel.cancel();
                        outcome = Err(WorkerError::Config("a pipeline thread panicked".into()));
                    }
                }
            }
            outcome
        })
    }
}

/// One pipeline of a worker: its views over the shares its group assigns.
struct Pipeline<'a> {
    cfg: &'a CloudConfig,
    /// To make the source again after a share could not be restored.
    log: &'a KafkaLog,
    plan: PipelinePlan,
    /// Its place in its group.
    seat: Seat,
    metrics: Arc<CloudMetrics>,
    ready: Arc<AtomicBool>,
    restore: bool,
    /// Whether a fenced worker takes its share again when its group does not
    /// move it (off only under `FAULT_FENCED_WAITS`).
    recover: bool,
}

impl Pipeline<'_> {
    /// Takes each share the group assigns, restores it, runs it until the
    /// group moves partitions again, and checkpoints on the way out. A
    /// replay's share reads the archive first, then the log.
    fn run(self, mut source: GroupSource, cancel: &CancellationToken) -> Result<(), WorkerError> {
        let Self { cfg, log, plan, seat, metrics, ready, restore, recover } = self;
        let cluster = cfg.cluster.clone().ok_or_else(|| WorkerError::Config("a worker needs [cluster]".into()))?;
        let settings = cfg.processor_settings();
        let pipeline = plan.pipeline.clone();
        let archive = match (plan.building, cfg.archive.enabled) {
            (true, true) => Some(
                crate::archive::store::open(cfg.archive.url.as_deref(), &cfg.archive_path())
                    .map_err(|e| WorkerError::Config(format!("pipeline {pipeline}: {e}")))?,
            ),
            _ => None,
        };
        while let Some(share) = source.next_assignment(|| cancel.is_cancelled()) {
            tracing::info!(pipeline, partitions = %kappa_runtime::logging::listed(&share), "The group gave this worker its partitions.");
            ready.store(share.is_empty(), Ordering::Relaxed);
            if share.is_empty() {
                continue;
            }
            let built = PgStore::connect(&cluster.store(), cfg.log.partitions).and_then(|mut store| {
                // A worker stopped inside a checkpoint must not hold its
                // partitions' rows from their next owner past its lease.
                store.end_idle_transactions_after(cluster.session_timeout)?;
                store.claim(&pipeline, &share)?;
                Ok(store)
            });
            let store = match built {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(pipeline, error = %e, "Cannot claim the partitions; retrying.");
                    retry_pause(cancel);
                    source.retake();
                    continue;
                }
            };
            let share_source = match &archive {
                None => ShareSource::Log(source),
                Some(a) => match ArchiveSource::open(a.clone(), cfg.archive.skip_damaged) {
                    Ok(arch) => ShareSource::Chain(ChainSource::new(arch.only(&share), source)),
                    Err(e) => {
                        // An object store that does not answer, or a manifest
                        // written as it was listed: try again.
                        tracing::error!(pipeline, error = %e, "Cannot open the archive; retrying.");
                        retry_pause(cancel);
                        source.retake();
                        continue;
                    }
                },
            };
            let ops: Vec<Box<dyn Operator>> = plan
                .views
                .iter()
                .map(|s| Box::new(PartitionedView::new(s.clone(), &share).restoring(restore)) as Box<dyn Operator>)
                .collect();
            let mut processor = match Processor::with_operators(
                share_source,
                store,
                pipeline.clone(),
                ops,
                plan.building,
                settings,
                metrics.clone(),
            ) {
                Ok(p) => p,
                Err(e) => {
                    // PostgreSQL went away, or another worker claimed one of
                    // these partitions since (the group is moving them). The
                    // source went with the failed processor: join again.
                    tracing::warn!(pipeline, error = %e, "Cannot restore the share; joining the group again.");
                    retry_pause(cancel);
                    source = seat.source(log)?;
                    continue;
                }
            };
            ready.store(true, Ordering::Relaxed);
            tracing::info!(pipeline, partitions = %kappa_runtime::logging::listed(&share), "Processing these partitions from their last checkpoint.");
            let outcome = loop {
                if cancel.is_cancelled() {
                    break processor.checkpoint().and_then(|()| processor.sync());
                }
                if let Err(e) = processor.step(Duration::from_millis(100)) {
                    break Err(e);
                }
                let group = processor.source().group();
                if group.loses_partitions() {
                    // Their new owner claims them at once, which would refuse
                    // this checkpoint, and building one takes a worker of a
                    // small budget most of a second: hand over as a crash
                    // would. The new owner, and this worker for what it
                    // keeps, read again from the last checkpoint.
                    tracing::info!(
                        pipeline,
                        "Handing partitions over without a checkpoint; they are read again from the last one."
                    );
                    break Ok(());
                }
                if group.moved() {
                    // Only gained partitions (or Kafka revoked the share):
                    // hand over what is done; refused if a successor already claimed.
                    break processor.checkpoint().and_then(|()| processor.sync());
                }
            };
            source = processor.into_source().into_group();
            if let Err(e) = outcome {
                ready.store(false, Ordering::Relaxed);
                if plan.building && matches!(e, ProcessorError::Log(EventLogError::Inconsistent(_))) {
                    // A damaged archive does not mend by retrying.
                    return fail(&cluster.store(), cfg.log.partitions, &pipeline, e.to_string());
                }
                tracing::warn!(pipeline, error = %e, "The last checkpoint of this share did not commit; its successor reads it again.");
                if cancel.is_cancelled() {
                    break;
                }
                let fenced = e.to_string().contains("fenced:");
                if fenced && !recover {
                    source.wait_for_move(|| cancel.is_cancelled());
                } else if let (true, Some(shared)) = (fenced, &seat.shared) {
                    // Another worker claimed some of these partitions. The
                    // members all compute the split from the same list, so
                    // it was moving them, or it acted on a list of a moment
                    // ago (this worker had stopped, say): let the membership
                    // look twice more (at most a session) to say so, then
                    // take the share it says (claiming them back if they
                    // are still this worker's).
                    let (seen, until) = (shared.looks(), Instant::now() + cluster.session_timeout);
                    source.wait_for_move(|| {
                        cancel.is_cancelled() || shared.looks() >= seen + 2 || Instant::now() >= until
                    });
                } else if fenced {
                    // Another worker claimed some of these partitions: the
                    // group is moving them. Wait for it to say so (at most a
                    // session) rather than claiming them back.
                    let until = Instant::now() + cluster.session_timeout;
                    source.wait_for_move(|| cancel.is_cancelled() || Instant::now() >= until);
                    if !source.moved() && !cancel.is_cancelled() {
                        // The group still says they are ours: it and the other
                        // worker disagree (a coordinator restarted under the
                        // group can leave two members holding one partition,
                        // each claiming it back from the other in turn).
                        // Joining again makes it assign every partition afresh.
                        tracing::warn!(
                            pipeline,
                            "The group still assigns partitions another worker claimed; joining it again."
                        );
                        drop(source);
                        source = seat.source(log)?;
                        continue;
                    }
                } else {
                    retry_pause(cancel);
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

/// A pipeline's place in its group, as `cluster.assignment` says: a member
/// of a Kafka consumer group (each source a member of its own), or a member
/// registered in PostgreSQL whose thread ([`membership`]) hands its shares
/// for as long as the seat lives, to every source made over it.
struct Seat {
    group: String,
    session_timeout: Duration,
    /// Where the PostgreSQL membership hands shares (`None`: Kafka's protocol).
    shared: Option<Arc<GroupState>>,
}

impl Seat {
    fn take(cluster: &ClusterConfig, partitions: u32, pipeline: &str) -> Result<Self, WorkerError> {
        let group = group_of(&cluster.group, pipeline);
        let shared = match cluster.assignment {
            Assignment::Kafka => None,
            Assignment::Postgres => {
                let shared = Arc::new(GroupState::default());
                membership::Membership {
                    settings: cluster.store(),
                    log_partitions: partitions,
                    group: group.clone(),
                    lease: cluster.session_timeout,
                }
                .spawn(Arc::downgrade(&shared))
                .map_err(|e| WorkerError::Config(format!("cannot start the membership thread: {e}")))?;
                Some(shared)
            }
        };
        Ok(Self { group, session_timeout: cluster.session_timeout, shared })
    }

    /// A source in this seat: with Kafka's protocol a new member of the
    /// group; over PostgreSQL the same member, taking its current share.
    fn source(&self, log: &KafkaLog) -> Result<GroupSource, WorkerError> {
        Ok(match &self.shared {
            None => log.group_source(&self.group, self.session_timeout)?,
            Some(shared) => log.handed_source(&self.group, shared.clone())?,
        })
    }
}

/// Records that a replay pipeline failed and why, and returns the failure.
fn fail(store: &PgSettings, partitions: u32, pipeline: &str, detail: String) -> Result<(), WorkerError> {
    if let Err(e) = PgStore::connect(store, partitions).and_then(|mut s| s.fail_pipeline(pipeline, &detail)) {
        tracing::error!(pipeline, error = %e, "Cannot record that the pipeline failed.");
    }
    Err(WorkerError::Config(format!("pipeline {pipeline}: {detail}")))
}

/// What a share reads: the group's partitions of the log or, for a replay,
/// the archive first (what it held when the share was taken), then the log.
enum ShareSource {
    Log(GroupSource),
    Chain(ChainSource<GroupSource>),
}

impl ShareSource {
    fn group(&self) -> &GroupSource {
        match self {
            Self::Log(g) => g,
            Self::Chain(c) => c.log(),
        }
    }

    fn into_group(self) -> GroupSource {
        match self {
            Self::Log(g) => g,
            Self::Chain(c) => c.into_log(),
        }
    }

    fn source(&self) -> &dyn LogSource {
        match self {
            Self::Log(g) => g,
            Self::Chain(c) => c,
        }
    }

    fn source_mut(&mut self) -> &mut dyn LogSource {
        match self {
            Self::Log(g) => g,
            Self::Chain(c) => c,
        }
    }
}

impl std::fmt::Debug for ShareSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Log(g) => g.fmt(f),
            Self::Chain(c) => c.fmt(f),
        }
    }
}

impl LogSource for ShareSource {
    fn assigned(&self) -> Vec<Partition> {
        self.source().assigned()
    }
    fn seek(&mut self, partition: Partition, offset: Offset) {
        self.source_mut().seek(partition, offset);
    }
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        if let Self::Chain(c) = self
            && !c.in_log()
        {
            c.log_mut().serve_group();
        }
        self.source_mut().poll(max, timeout)
    }
    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        self.source_mut().end_offsets()
    }
    fn skipped(&self) -> u64 {
        self.source().skipped()
    }
    fn caught_up(&self, partition: Partition) -> bool {
        self.source().caught_up(partition)
    }
}

/// `kappa-cloud worker`: a worker, with `/metrics`, `/healthz` and
/// `/readyz` (200 while it holds its share, restored, or has none; 503 while
/// it waits for a share or cannot take one) on `http.listen`, until
/// SIGINT/SIGTERM or a failure.
pub async fn run_until_signal(cfg: CloudConfig) -> Result<(), WorkerError> {
    use prometheus_client::registry::Registry;
    let problems = cfg.preflight();
    if !problems.is_empty() {
        return Err(WorkerError::Config(kappa_runtime::config::ConfigError(problems).to_string()));
    }
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
    let auth = Arc::new(crate::auth::Auth::new(&cfg.auth));
    let guard = auth.guards_metrics().then(|| crate::auth::ApiGuard {
        auth: auth.clone(),
        role: crate::auth::Role::Read,
        metrics: metrics.clone(),
        rate: None,
    });
    let http = crate::node::Http { header_timeout: cfg.http.header_read_timeout, tls: None, metrics };
    let router = crate::node::liveness_router(Arc::new(registry), guard).route(
        "/readyz",
        axum::routing::get(move || {
            let ready = ready.iter().all(|r| r.load(Ordering::Relaxed));
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
    cfg.auth.warn_if_exposed(addr);
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
