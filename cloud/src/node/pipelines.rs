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

/// Test switch (`fault-injection` builds only): a node's cluster pipelines
/// do not restart after a store error, they stop the node (the negative
/// control of the PostgreSQL restart test).
pub const FAULT_NO_PIPELINE_RESTART: &str = "KAPPA_TEST_NO_PIPELINE_RESTART";

/// Makes a pipeline's operators afresh: a pipeline that starts again after
/// a failure restores them from the store.
pub(super) type MakeOps = Box<dyn Fn() -> Vec<Box<dyn Operator>> + Send>;

/// Restores `pipeline` from `store` and runs it until `cancel`. Where the
/// store outlives failures (a cluster's PostgreSQL restarting or
/// unreachable) a failure restores the pipeline again from its last
/// checkpoint and goes on; being fenced by another node that took the
/// pipeline over ends it (and the node).
fn run_pipeline<S: LogSource>(
    store: &StoreAt,
    make_source: impl Fn() -> Result<S, String>,
    pipeline: &str,
    make_ops: MakeOps,
    settings: ProcessorSettings,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let restart = store.outlives_failures()
        && !kappa_runtime::fault::on(
            FAULT_NO_PIPELINE_RESTART,
            "a node's cluster pipelines stop the node on any store error",
        );
    let mut pause = Duration::from_millis(200);
    while !cancel.is_cancelled() {
        let outcome = make_source().and_then(|source| {
            let checkpoints = store.whole_log_pipeline(pipeline).map_err(|e| e.to_string())?;
            let p = Processor::with_operators(
                source,
                checkpoints,
                pipeline.to_string(),
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

/// Runs the operators `make_ops` makes as the pipeline `pipeline` on its
/// own thread; a failure it cannot ride out stops the node.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_operators(
    tasks: &mut Tasks,
    pipeline: &'static str,
    make_ops: MakeOps,
    src: &Sources<'_>,
    store: &StoreAt,
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
            tasks.spawn_thread(name, move || run_pipeline(&store, make, pipeline, make_ops, settings, m, c))
        }
        None => {
            let make = move || log.source().map_err(|e| e.to_string());
            tasks.spawn_thread(name, move || run_pipeline(&store, make, pipeline, make_ops, settings, m, c))
        }
    };
    spawned.map_err(|e| NodeError::Bind(format!("cannot start the {pipeline} pipeline: {e}")))?;
    Ok(())
}
