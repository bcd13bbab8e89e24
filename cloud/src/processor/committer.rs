//! Writes checkpoints on a thread of its own, so the processor keeps
//! processing while SQLite commits (as Flink's asynchronous snapshots do).
//!
//! At most one checkpoint is in flight: the processor prepares the next one
//! only after the previous one committed, so checkpoints are committed in
//! order and each is a consistent cut (the state after exactly the records
//! before its positions). A crash before a commit finishes restarts from the
//! previous checkpoint, as it would if the commit had been synchronous.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{Checkpoint, ProcessorStore, StoreError};

/// A checkpoint to commit, and when the closed windows in it became due.
#[derive(Debug)]
pub struct Job {
    pub checkpoint: Checkpoint,
    pub emit_since: Option<Instant>,
    /// TEST ONLY: commit views and the rest in two transactions.
    pub split: bool,
    /// Event times of the readings this checkpoint makes visible; handed back in [`Done`].
    pub event_ts: Vec<i64>,
}

/// What a commit reports back.
#[derive(Debug)]
pub struct Done {
    pub result: Result<(), StoreError>,
    pub commit: Duration,
    pub rows: usize,
    /// From the windows becoming due to their rows being committed.
    pub emit_latency: Option<Duration>,
    /// The job's event times, and when the commit finished (Unix ms).
    pub event_ts: Vec<i64>,
    pub committed_ms: i64,
}

/// The committer thread and its single in-flight slot.
#[derive(Debug)]
pub struct Committer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub fn start<St: ProcessorStore>(mut store: St) -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel::<Job>(1);
        let (tx, done) = sync_channel::<Done>(1);
        let thread = std::thread::Builder::new().name("checkpoint-commit".into()).spawn(move || {
            while let Ok(mut job) = rx.recv() {
                let started = Instant::now();
                let rows = job.checkpoint.rows_written();
                let result = if job.split {
                    let mut cp = std::mem::take(&mut job.checkpoint);
                    let views = Checkpoint { views: std::mem::take(&mut cp.views), ..Checkpoint::default() };
                    store.checkpoint(&views).and_then(|()| {
                        std::thread::sleep(Duration::from_millis(50));
                        store.checkpoint(&cp)
                    })
                } else {
                    store.checkpoint(&job.checkpoint)
                };
                let report = Done {
                    result,
                    commit: started.elapsed(),
                    rows,
                    emit_latency: job.emit_since.map(|t| t.elapsed()),
                    event_ts: job.event_ts,
                    committed_ms: crate::now_ms(),
                };
                if tx.send(report).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { jobs: Some(jobs), done, in_flight: false, thread: Some(thread) })
    }

    /// Hands a checkpoint over, after waiting for the previous one.
    /// Returns the previous commit's report, if there was one.
    pub fn submit(&mut self, job: Job) -> Result<Option<Done>, StoreError> {
        let previous = self.wait()?;
        let jobs = self.jobs.as_ref().ok_or_else(|| StoreError("the checkpoint committer has stopped".into()))?;
        jobs.send(job).map_err(|_| StoreError("the checkpoint committer has stopped".into()))?;
        self.in_flight = true;
        Ok(previous)
    }

    /// Waits for the in-flight commit, if any; its report.
    pub fn wait(&mut self) -> Result<Option<Done>, StoreError> {
        if !self.in_flight {
            return Ok(None);
        }
        let done = self.done.recv().map_err(|_| StoreError("the checkpoint committer died".into()))?;
        self.in_flight = false;
        done.result.clone()?;
        Ok(Some(done))
    }

    /// The in-flight commit's report if it has finished, without waiting.
    pub fn poll(&mut self) -> Result<Option<Done>, StoreError> {
        if !self.in_flight {
            return Ok(None);
        }
        match self.done.try_recv() {
            Ok(done) => {
                self.in_flight = false;
                done.result.clone()?;
                Ok(Some(done))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(StoreError("the checkpoint committer died".into())),
        }
    }
}

impl Drop for Committer {
    /// Lets the in-flight commit finish, then stops the thread.
    fn drop(&mut self) {
        let _ = self.wait();
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
