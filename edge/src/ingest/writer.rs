//! The group-commit writer: the only task that writes readings to the log.
//!
//! It takes the first waiting message, gathers more for at most the commit
//! linger (or until the commit is full), commits them in one transaction and
//! only then releases their acknowledgements, in arrival order. While a commit
//! runs, new messages queue, so under load each fsync carries many readings.
//! A message that arrives after a quiet spell (nothing for a whole linger)
//! does not linger: waiting would most likely gather nothing, so at low load
//! a reading is durable one fsync after it arrives.
//! A failed commit acknowledges nothing: the batch is retried with backoff,
//! and meanwhile the bounded queue pushes back on the sources. A commit that
//! fails for lack of space also wakes housekeeping to make room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Ack, Incoming};
use crate::log::{Entry, LogError, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::now_ms;

/// Group-commit settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    pub linger: Duration,
    pub max_entries: usize,
}

/// Whom the writer wakes.
#[derive(Debug, Clone)]
pub struct Wake {
    /// The forwarder (and the aggregator, when on), after every commit.
    pub committed: Vec<Arc<Notify>>,
    /// Housekeeping, when a commit fails for lack of space.
    pub disk_full: Arc<Notify>,
}

/// Where committed MQTT messages go to be acknowledged.
pub type AckSender = mpsc::UnboundedSender<Vec<rumqttc::Publish>>;

/// Runs the writer until every source has stopped and the queue is drained.
/// `cancel` only interrupts retries of a failing commit.
pub async fn run(
    log: SharedLog,
    mut rx: mpsc::Receiver<Incoming>,
    acks: Option<AckSender>,
    wake: Wake,
    cfg: WriterConfig,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) {
    let mut entries: Vec<Entry> = Vec::with_capacity(cfg.max_entries);
    let mut pending_acks: Vec<Ack> = Vec::with_capacity(cfg.max_entries);
    let mut arrivals: Vec<Instant> = Vec::with_capacity(cfg.max_entries);
    let mut backoff = Duration::from_millis(50);
    let mut last_arrival: Option<Instant> = None;
    loop {
        if entries.is_empty() {
            // Ends when every source has stopped and the queue is empty: a
            // graceful shutdown commits everything the sources handed over.
            let Some(first) = rx.recv().await else { break };
            let quiet = last_arrival.is_none_or(|t| first.received.saturating_duration_since(t) >= cfg.linger);
            entries.push(first.entry);
            pending_acks.push(first.ack);
            arrivals.push(first.received);
            let linger = if quiet { Duration::ZERO } else { cfg.linger };
            gather(&mut rx, &mut entries, &mut pending_acks, &mut arrivals, linger, cfg.max_entries).await;
            last_arrival = arrivals.last().copied();
        }

        let started = Instant::now();
        let batch = std::mem::take(&mut entries);
        let result = log
            .call(move |l| {
                let res = l.append(&batch, now_ms());
                Ok((batch, res))
            })
            .await;
        let (batch, res) = match result {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "The log writer failed; acknowledging nothing and stopping.");
                return;
            }
        };
        match res {
            Ok(out) => {
                backoff = Duration::from_millis(50);
                metrics.log_full.set(0);
                metrics.commits.inc();
                metrics.commit_readings.observe(batch.len() as f64);
                metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                let durable = Instant::now();
                for t in arrivals.drain(..) {
                    metrics.ingest_to_durable_seconds.observe(durable.duration_since(t).as_secs_f64());
                }
                metrics.readings_committed.inc_by(out.inserted);
                metrics.readings_duplicate.inc_by(out.duplicates);
                release(&mut pending_acks, acks.as_ref());
                for n in &wake.committed {
                    n.notify_one();
                }
            }
            Err(e) => {
                let kind = match e {
                    LogError::Full(_) => "full",
                    LogError::Busy(_) => "busy",
                    LogError::Io(_) => "io",
                    LogError::Corrupt(_) => "corrupt",
                    _ => "sqlite",
                };
                metrics.log_write_errors.get_or_create(&[("kind", kind)]).inc();
                if kind == "full" {
                    metrics.log_full.set(1);
                    wake.disk_full.notify_one();
                }
                tracing::error!(error = %e, entries = batch.len(), retry_in = ?backoff, "Log commit failed; nothing acknowledged, retrying.");
                entries = batch;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => {
                        tracing::warn!(entries = entries.len(), "Shutting down with uncommitted entries; none was acknowledged.");
                        return;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sends the acknowledgements a commit earned, in arrival order: device
/// replies to their connections, external PUBACKs to the external source.
fn release(acks: &mut Vec<Ack>, external: Option<&AckSender>) {
    let mut publishes = Vec::new();
    for ack in acks.drain(..) {
        match ack {
            Ack::None => {}
            Ack::Device(to, reply) => to.reply(reply),
            Ack::External(p) => publishes.push(p),
        }
    }
    if let (Some(sender), false) = (external, publishes.is_empty()) {
        // The source may be gone at shutdown; the broker then redelivers, and the log dedups.
        let _ = sender.send(publishes);
    }
}

/// Adds whatever is waiting, then lingers for more until the commit is full or the linger passes.
async fn gather(
    rx: &mut mpsc::Receiver<Incoming>,
    entries: &mut Vec<Entry>,
    acks: &mut Vec<Ack>,
    arrivals: &mut Vec<Instant>,
    linger: Duration,
    max_entries: usize,
) {
    let deadline = tokio::time::Instant::now() + linger;
    while entries.len() < max_entries {
        let next = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) if linger.is_zero() => None,
            Err(mpsc::error::TryRecvError::Empty) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
        };
        let Some(item) = next else { break };
        entries.push(item.entry);
        acks.push(item.ack);
        arrivals.push(item.received);
    }
}
