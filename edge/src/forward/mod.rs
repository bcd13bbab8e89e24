//! Store-and-forward: from the log's outbox to the cloud.
//!
//! The forwarder resends the oldest unacknowledged batch first (after a
//! restart, the very batch it was sending), otherwise builds the next one
//! from readings after the last assigned id: as soon as `max_batch_readings`
//! are waiting, or when the oldest has waited `max_batch_age`. The cursor
//! moves only when the cloud answers 2xx, which it does only after the batch
//! is durably in its log. Failures back off with jitter and retry forever; an
//! outage only grows the backlog.
//!
//! With nothing left to forward, the forwarder sends a heartbeat every
//! `heartbeat_interval`: "every reading received up to (now - 1 s) is in
//! the cloud". The second of margin covers readings still on their way from
//! the broker into the log. The cloud's silence alerts use it to tell a quiet
//! device from an offline gateway.

pub mod backoff;
pub mod client;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kappa_common::batch::{self, EdgeBatch};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::backoff::Backoff;
use self::client::{CloudClient, PostOutcome};
use crate::config::ForwardConfig;
use crate::log::{LogError, OutboxEntry, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::now_ms;

/// Runs until `cancel` fires. Transient log errors (busy, full) are retried;
/// returns an error only for a damaged or unusable log.
pub async fn run(
    log: SharedLog,
    cfg: ForwardConfig,
    gateway: String,
    committed: Arc<Notify>,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    let client = CloudClient::new(&cfg.cloud_url, &gateway, cfg.request_timeout)
        .map_err(|e| LogError::Io(format!("cannot build the HTTP client: {e}")))?;
    let mut backoff = Backoff::new(cfg.retry_min, cfg.retry_max);
    loop {
        match forward_loop(&log, &cfg, &gateway, &client, &mut backoff, &committed, &metrics, &cancel).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "The forwarder hit a transient log error; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward_loop(
    log: &SharedLog,
    cfg: &ForwardConfig,
    gateway: &str,
    client: &CloudClient,
    backoff: &mut Backoff,
    committed: &Notify,
    metrics: &EdgeMetrics,
    cancel: &CancellationToken,
) -> Result<(), LogError> {
    let mut last_contact = std::time::Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let entry = match next_batch(log, cfg, committed, cancel).await? {
            Next::Batch(entry) => entry,
            Next::Wait => continue,
            Next::CaughtUp => {
                if !cfg.heartbeat_interval.is_zero() && last_contact.elapsed() >= cfg.heartbeat_interval {
                    match client.heartbeat(now_ms() - HEARTBEAT_MARGIN_MS).await {
                        Ok(()) => {
                            metrics.heartbeats.inc();
                        }
                        Err(e) => {
                            metrics.forward_failures.get_or_create(&[("reason", "heartbeat")]).inc();
                            tracing::debug!(error = %e, "Heartbeat failed.");
                        }
                    }
                    last_contact = std::time::Instant::now();
                }
                continue;
            }
        };
        let readings = log.call(move |l| l.load_batch(&entry)).await?;
        let count = readings.len();
        let body = Bytes::from(batch::encode(&EdgeBatch::new(gateway, entry.batch_id, readings), cfg.zstd_level));
        loop {
            metrics.forward_attempts.inc();
            metrics.forward_bytes.inc_by(body.len() as u64);
            let outcome = tokio::select! {
                o = client.post(entry.batch_id, body.clone()) => o,
                _ = cancel.cancelled() => return Ok(()),
            };
            match outcome {
                PostOutcome::Accepted => {
                    last_contact = std::time::Instant::now();
                    log.call(move |l| l.complete_batch(entry.batch_id)).await?;
                    metrics.batches_forwarded.inc();
                    metrics.readings_forwarded.inc_by(count as u64);
                    metrics.batch_readings.observe(count as f64);
                    backoff.reset();
                    tracing::debug!(
                        batch_id = entry.batch_id,
                        readings = count,
                        bytes = body.len(),
                        "Batch accepted by the cloud."
                    );
                    break;
                }
                PostOutcome::Refused { status, detail } => {
                    let reason = format!("HTTP {status}: {detail}");
                    tracing::error!(batch_id = entry.batch_id, readings = count, %reason, "The cloud refused a batch; it stays in the edge log as a dead letter.");
                    log.call(move |l| l.dead_letter_batch(entry.batch_id, &reason, now_ms())).await?;
                    metrics.forward_failures.get_or_create(&[("reason", "refused")]).inc();
                    metrics.batches_dead_lettered.inc();
                    break;
                }
                PostOutcome::Retry { reason, detail, retry_after } => {
                    metrics.forward_failures.get_or_create(&[("reason", reason)]).inc();
                    let delay = backoff.next_delay().max(retry_after.unwrap_or_default());
                    tracing::warn!(batch_id = entry.batch_id, reason, detail = %detail, retry_in = ?delay, "Forwarding failed; will retry.");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }
}

/// How far behind the gateway's clock a heartbeat claims completeness.
const HEARTBEAT_MARGIN_MS: i64 = 1000;

/// What the forwarder does next.
enum Next {
    Batch(OutboxEntry),
    /// Readings are waiting for their batch to fill or age.
    Wait,
    /// Nothing left to forward (woken by a commit, a timer or cancellation).
    CaughtUp,
}

/// The batch to send next, waiting for readings if there are too few.
async fn next_batch(
    log: &SharedLog,
    cfg: &ForwardConfig,
    committed: &Notify,
    cancel: &CancellationToken,
) -> Result<Next, LogError> {
    if let Some(pending) = log.call(|l| l.outbox()).await?.into_iter().next() {
        return Ok(Next::Batch(pending));
    }
    let max = cfg.max_batch_readings;
    let (waiting, oldest) = log.call(move |l| l.unassigned(max)).await?;
    let wait = match oldest {
        None => cfg.heartbeat_interval.clamp(Duration::from_millis(100), Duration::from_secs(1)),
        Some(_) if waiting >= max => Duration::ZERO,
        Some(oldest) => {
            let age = Duration::from_millis(now_ms().saturating_sub(oldest).max(0) as u64);
            cfg.max_batch_age.saturating_sub(age)
        }
    };
    if oldest.is_some() && wait.is_zero() {
        return Ok(log.call(move |l| l.assign_batch(max, now_ms())).await?.map_or(Next::Wait, Next::Batch));
    }
    tokio::select! {
        _ = committed.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = cancel.cancelled() => {}
    }
    Ok(if oldest.is_none() { Next::CaughtUp } else { Next::Wait })
}
