//! The alert and edge-aggregate pipelines of a node: where they read (the
//! archive, then the log), where they keep state (the embedded store or
//! PostgreSQL), and how a cluster pipeline restarts after a store error.

use super::*;

/// Where an operator pipeline reads: the archive (when there is one), then the log.
pub(super) struct Sources<'a> {
    pub(super) archive: Option<&'a Arc<dyn ArchiveStore>>,
    pub(super) skip_damaged: bool,
    pub(super) log: &'a EventLog,
}

/// Where the alert and aggregate pipelines keep their state and output.
#[derive(Debug, Clone)]
pub(super) enum PipelineStore {
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
pub(super) type MakeOps = Box<dyn Fn() -> Vec<Box<dyn Operator>> + Send>;

impl PipelineStore {
    /// Restores `pipeline` from the store and runs it until `cancel`. On a
    /// cluster, a failure that retrying can mend (PostgreSQL restarting or
    /// unreachable) restores the pipeline again from its last checkpoint
    /// and goes on; being fenced by another node that took the pipeline over
    /// ends it (and the node).
    pub(super) fn run<S: LogSource>(
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

    pub(super) fn outbox(&self) -> deliver::OutboxAt {
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
pub(super) fn spawn_operators(
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
