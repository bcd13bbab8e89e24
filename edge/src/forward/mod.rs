//! Store-and-forward: from the log's outbox to the cloud.
//!
//! Batches go oldest first. The forwarder resends pending outbox batches
//! first (after a restart, the very batches it was sending), otherwise builds
//! the next one from readings after the last assigned id: as soon as
//! `max_batch_readings` are waiting, or when the oldest has waited
//! `max_batch_age`. Up to `max_in_flight` batches (default 1) are on the wire
//! at once, so a high-latency link can still carry a full pipe; each one
//! retries on its own with backoff and jitter, forever (an outage only grows
//! the backlog). Batches in flight together can land in the cloud's log in
//! any order among themselves, which its event-time views see as lateness:
//! the default keeps strict order, and docs/edge.md says how to size
//! `allowed_lateness` before raising it. The
//! cursor moves only past batches the cloud answered 2xx, which it does only
//! once a batch is durably in its log: a later batch completing first does
//! not move it past an earlier one still pending.
//!
//! New batches are built at most `max_readings_per_second` readings per
//! second (a token bucket), so a gateway coming back from a long outage
//! drains its backlog at a bounded rate instead of flooding the link and the
//! cloud. The order stays oldest first, so live readings queue behind the
//! backlog: the cloud computes event-time windows with a watermark per
//! gateway, and readings sent out of event-time order would arrive behind it
//! and count as late. See docs/edge.md.
//!
//! With nothing left to forward, the forwarder sends a heartbeat every
//! `heartbeat_interval`: "every reading received up to (now - 1 s) is in
//! the cloud". The second of margin covers readings still on their way from
//! the broker into the log. The cloud's silence alerts use it to tell a quiet
//! device from an offline gateway.

pub mod client;
pub mod config;
mod limiter;
mod outage;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kappa_common::batch::{self, EdgeBatch};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::client::{CloudClient, PostOutcome, Security};
use self::config::ForwardConfig;
use self::limiter::Limiter;
use self::outage::OutageLog;
use crate::log::{BatchKind, LogError, OutboxEntry, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::now_ms;
use kappa_runtime::backoff::Backoff;

/// Runs until `cancel` fires. Transient log errors (busy, full) are retried;
/// returns an error only for a damaged or unusable log.
pub async fn run(
    log: SharedLog,
    cfg: ForwardConfig,
    gateway: String,
    security: Security,
    committed: Arc<Notify>,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    let client = CloudClient::new(&cfg.cloud_url, &gateway, cfg.request_timeout, &security).map_err(LogError::Io)?;
    let fwd = Forwarder {
        log,
        cfg: Arc::new(cfg),
        gateway: Arc::from(gateway),
        client,
        metrics,
        outage: OutageLog::default(),
    };
    let mut limiter = Limiter::new(fwd.cfg.max_readings_per_second);
    loop {
        match fwd.forward_loop(&mut limiter, &committed, &cancel).await {
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

/// What every send needs; cheap to clone into a task.
#[derive(Debug, Clone)]
struct Forwarder {
    log: SharedLog,
    cfg: Arc<ForwardConfig>,
    gateway: Arc<str>,
    client: CloudClient,
    metrics: Arc<EdgeMetrics>,
    outage: OutageLog,
}

/// How far behind the gateway's clock a heartbeat claims completeness.
const HEARTBEAT_MARGIN_MS: i64 = 1000;

/// What the forwarder does next.
enum Next {
    Batch(OutboxEntry),
    /// Readings are waiting for their batch to fill or age, or for the rate bound.
    Wait(Duration),
    /// Nothing left to build.
    CaughtUp,
}

impl Forwarder {
    async fn forward_loop(
        &self,
        limiter: &mut Limiter,
        committed: &Notify,
        cancel: &CancellationToken,
    ) -> Result<(), LogError> {
        // Dropping the set (on return) aborts the sends; their batches stay in the outbox.
        let mut in_flight: JoinSet<Result<u64, LogError>> = JoinSet::new();
        let mut sending: HashSet<u64> = HashSet::new();
        let mut last_contact = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let mut wait = self.cfg.heartbeat_interval.clamp(Duration::from_millis(100), Duration::from_secs(1));
            let mut caught_up = false;
            while in_flight.len() < self.cfg.max_in_flight {
                match self.next_batch(&sending, limiter).await? {
                    Next::Batch(entry) => {
                        sending.insert(entry.batch_id);
                        let me = self.clone();
                        in_flight.spawn(async move { me.send(entry).await.map(|()| entry.batch_id) });
                    }
                    Next::Wait(d) => {
                        wait = d;
                        break;
                    }
                    Next::CaughtUp => {
                        caught_up = true;
                        break;
                    }
                }
            }
            self.metrics.forward_in_flight.set(in_flight.len() as i64);
            if caught_up && in_flight.is_empty() {
                self.outage.caught_up();
                let hb = self.cfg.heartbeat_interval;
                if !hb.is_zero() && last_contact.elapsed() >= hb {
                    self.heartbeat().await;
                    last_contact = Instant::now();
                }
            }
            tokio::select! {
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let batch_id = done.map_err(|e| LogError::Io(format!("a send task failed: {e}")))??;
                    sending.remove(&batch_id);
                    last_contact = Instant::now();
                }
                _ = committed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }

    /// The batch to send next: a pending one not on the wire yet, else a new
    /// one if enough readings are waiting and the rate bound allows.
    async fn next_batch(&self, sending: &HashSet<u64>, limiter: &mut Limiter) -> Result<Next, LogError> {
        let pending = self.log.call(|l| l.outbox()).await?;
        if let Some(entry) = pending.into_iter().find(|b| !sending.contains(&b.batch_id)) {
            // Backfill is new traffic on the link: it takes the rate bound too.
            if entry.kind == BatchKind::Backfill {
                if let Some(delay) = limiter.delay() {
                    return Ok(Next::Wait(delay));
                }
                limiter.take(entry.count);
            }
            return Ok(Next::Batch(entry));
        }
        let max = self.cfg.max_batch_readings;
        let (waiting, oldest) = self.log.call(move |l| l.unassigned(max)).await?;
        let Some(oldest) = oldest else { return Ok(Next::CaughtUp) };
        if waiting < max {
            let age = Duration::from_millis(now_ms().saturating_sub(oldest).max(0) as u64);
            let left = self.cfg.max_batch_age.saturating_sub(age);
            if !left.is_zero() {
                return Ok(Next::Wait(left));
            }
        }
        if let Some(delay) = limiter.delay() {
            return Ok(Next::Wait(delay));
        }
        let entry = self.log.call(move |l| l.assign_batch(max, now_ms())).await?;
        Ok(match entry {
            Some(entry) => {
                limiter.take(entry.count);
                Next::Batch(entry)
            }
            None => Next::CaughtUp,
        })
    }

    /// Sends one batch until the cloud accepts or refuses it.
    async fn send(&self, entry: OutboxEntry) -> Result<(), LogError> {
        if entry.count == 0 {
            // A range of readings that all stay local (aggregate and hybrid modes): nothing to send.
            return self.log.call(move |l| l.complete_batch(entry.batch_id)).await;
        }
        let (readings, aggregates) =
            self.log.call(move |l| Ok((l.load_batch(&entry)?, l.load_aggregates(&entry)?))).await?;
        let count = readings.len() + aggregates.len();
        // Only the encoded body lives through the retries: the decoded batch
        // (about 1.4 KB a reading) would stay in memory for a whole outage.
        let body = {
            let batch = EdgeBatch::new(&*self.gateway, entry.batch_id, readings)
                .with_aggregates(aggregates)
                .with_format(self.cfg.encoding.format());
            Bytes::from(batch::encode(&batch, self.cfg.zstd_level))
        };
        let mut backoff = Backoff::new(self.cfg.retry_min, self.cfg.retry_max);
        let m = &self.metrics;
        loop {
            m.forward_attempts.inc();
            m.forward_bytes.inc_by(body.len() as u64);
            match self.client.post(entry.batch_id, body.clone(), self.status()).await {
                PostOutcome::Accepted => {
                    self.log.call(move |l| l.complete_batch(entry.batch_id)).await?;
                    m.batches_forwarded.inc();
                    m.readings_forwarded.inc_by(count as u64);
                    m.batch_readings.observe(count as f64);
                    m.batch_bytes.observe(body.len() as f64);
                    self.outage.accepted(m.backlog_readings.get());
                    tracing::debug!(
                        batch_id = entry.batch_id,
                        readings = count,
                        bytes = body.len(),
                        "Batch accepted by the cloud."
                    );
                    return Ok(());
                }
                PostOutcome::Refused { status: 413, detail } if count > 1 => {
                    // Too large for the cloud's limits: halve it and send the halves.
                    let split = self.log.call(move |l| l.split_batch(entry.batch_id)).await?;
                    if let Some((a, b)) = split {
                        m.forward_failures.get_or_create(&[("reason", "too_large")]).inc();
                        m.batches_split.inc();
                        tracing::warn!(batch_id = entry.batch_id, readings = count, halves = %format!("{} {}", a.batch_id, b.batch_id), %detail, "The cloud refused a batch as too large; sending it in two halves.");
                        return Ok(());
                    }
                    let reason = format!("HTTP 413: {detail}");
                    self.dead_letter(entry.batch_id, count, reason).await?;
                    return Ok(());
                }
                PostOutcome::Refused { status, detail } => {
                    let reason = format!("HTTP {status}: {detail}");
                    self.dead_letter(entry.batch_id, count, reason).await?;
                    return Ok(());
                }
                PostOutcome::Retry { reason, detail, retry_after } => {
                    m.forward_failures.get_or_create(&[("reason", reason)]).inc();
                    let delay = backoff.next_delay().max(retry_after.unwrap_or_default());
                    self.outage.failed(entry.batch_id, reason, &detail, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Keeps a refused batch as a dead letter (`kappa-edge log dead-letters`).
    async fn dead_letter(&self, batch_id: u64, count: usize, reason: String) -> Result<(), LogError> {
        tracing::error!(batch_id, readings = count, %reason, "The cloud refused a batch; it stays in the edge log as a dead letter until an operator resends or releases it (kappa-edge log dead-letters).");
        self.log.call(move |l| l.dead_letter_batch(batch_id, &reason, now_ms())).await?;
        self.metrics.forward_failures.get_or_create(&[("reason", "refused")]).inc();
        self.metrics.batches_dead_lettered.inc();
        Ok(())
    }

    /// The backlog as the gauges last saw it, for the cloud's dashboard.
    fn status(&self) -> client::GatewayStatus {
        client::GatewayStatus {
            backlog_readings: self.metrics.backlog_readings.get(),
            oldest_unforwarded_seconds: self.metrics.oldest_unforwarded_age_seconds.get(),
        }
    }

    async fn heartbeat(&self) {
        match self.client.heartbeat(now_ms() - HEARTBEAT_MARGIN_MS, self.status()).await {
            Ok(()) => {
                self.metrics.heartbeats.inc();
            }
            Err(e) => {
                self.metrics.forward_failures.get_or_create(&[("reason", "heartbeat")]).inc();
                tracing::debug!(error = %e, "Heartbeat failed.");
            }
        }
    }
}
