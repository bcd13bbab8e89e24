//! Named tasks under one cancellation token.
//!
//! A service spawns its parts (async tasks, or blocking loops on their own
//! threads) into [`Tasks`] and then [`Tasks::supervise`]s them: it returns
//! when the token is cancelled (a graceful stop) or when a part ends on its
//! own, which is a failure and cancels the rest. Either way it then waits up
//! to a deadline for every part to finish draining.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What a task reports when it ends.
pub type TaskResult = Result<(), String>;

/// A part of the service ended on its own, or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {task} failed: {detail}")]
pub struct TaskFailed {
    pub task: &'static str,
    pub detail: String,
}

/// A set of named tasks sharing one cancellation token.
#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<(&'static str, TaskResult)>,
    cancel: CancellationToken,
}

impl Tasks {
    pub fn new(cancel: CancellationToken) -> Self {
        Self { set: JoinSet::new(), cancel }
    }

    /// The token every task should stop on.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Spawns an async task.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = TaskResult> + Send + 'static) {
        self.set.spawn(async move { (name, task.await) });
    }

    /// Runs a blocking loop on its own OS thread, supervised like a task.
    pub fn spawn_thread(
        &mut self,
        name: &'static str,
        work: impl FnOnce() -> TaskResult + Send + 'static,
    ) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            let _ = tx.send(work());
        })?;
        self.set.spawn(async move { (name, rx.await.unwrap_or_else(|_| Err("thread panicked".into()))) });
        Ok(())
    }

    /// Waits for a stop (cancellation or the first task to end), then for
    /// every task to finish within `deadline`; aborts what is left after it.
    pub async fn supervise(mut self, deadline: Duration) -> Result<(), TaskFailed> {
        let mut result = Ok(());
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => {}
            joined = self.set.join_next() => {
                // A task that ends while the service is stopping anyway is no failure.
                if !self.cancel.is_cancelled() {
                    let failure = match joined {
                        Some(Ok((task, Ok(())))) => TaskFailed { task, detail: "stopped unexpectedly".into() },
                        Some(Ok((task, Err(detail)))) => TaskFailed { task, detail },
                        Some(Err(e)) => TaskFailed { task: "unknown", detail: e.to_string() },
                        None => TaskFailed { task: "all", detail: "no task was running".into() },
                    };
                    tracing::error!(error = %failure, "A task failed; stopping everything.");
                    result = Err(failure);
                }
            }
        }
        self.cancel.cancel();
        let drain = async {
            while let Some(joined) = self.set.join_next().await {
                if let Ok((task, Err(detail))) = joined {
                    tracing::warn!(task, detail = %detail, "A task failed while stopping.");
                }
            }
        };
        if tokio::time::timeout(deadline, drain).await.is_err() {
            tracing::warn!(remaining = self.set.len(), ?deadline, "Shutdown deadline passed; aborting what is left.");
            self.set.abort_all();
        }
        result
    }
}

/// A supervised service running in the background.
#[derive(Debug)]
pub struct Running {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), TaskFailed>>,
}

impl Tasks {
    /// Supervises the tasks in the background; `service` names it in the logs.
    pub fn run_in_background(self, service: &'static str, deadline: Duration) -> Running {
        let cancel = self.cancel.clone();
        let handle = tokio::spawn(async move {
            let result = self.supervise(deadline).await;
            tracing::info!(service, "Stopped.");
            result
        });
        Running { cancel, handle }
    }
}

impl Running {
    /// Resolves once the service begins stopping (asked to, or because a task failed).
    pub async fn stopping(&self) {
        self.cancel.cancelled().await
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// Waits until every task has stopped; the first failure, if any.
    pub async fn wait(self) -> Result<(), TaskFailed> {
        self.handle.await.map_err(|e| TaskFailed { task: "supervisor", detail: e.to_string() })?
    }

    /// Runs until SIGINT/SIGTERM or a failure, then stops gracefully.
    pub async fn run_until_signal(self) -> Result<(), TaskFailed> {
        tokio::select! {
            _ = crate::signal::shutdown() => tracing::info!("Signal received: draining and stopping."),
            _ = self.stopping() => {}
        }
        self.shutdown();
        self.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancelled_service_drains_and_reports_success() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        let t = tasks.token();
        tasks.spawn("worker", async move {
            t.cancelled().await;
            Ok(())
        });
        cancel.cancel();
        assert_eq!(tasks.supervise(Duration::from_secs(1)).await, Ok(()));
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_is_reported() {
        let mut tasks = Tasks::new(CancellationToken::new());
        let t = tasks.token();
        tasks.spawn("patient", async move {
            t.cancelled().await;
            Ok(())
        });
        tasks.spawn("broken", async { Err("disk on fire".into()) });
        let err = tasks.supervise(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err, TaskFailed { task: "broken", detail: "disk on fire".into() });
    }

    #[tokio::test]
    async fn a_thread_that_returns_early_is_a_failure() {
        let mut tasks = Tasks::new(CancellationToken::new());
        tasks.spawn_thread("loop", || Ok(())).unwrap();
        let err = tasks.supervise(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.detail, "stopped unexpectedly");
    }

    #[tokio::test]
    async fn tasks_that_ignore_the_deadline_are_aborted() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new(cancel.clone());
        tasks.spawn("stubborn", async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        cancel.cancel();
        let started = std::time::Instant::now();
        assert_eq!(tasks.supervise(Duration::from_millis(50)).await, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
