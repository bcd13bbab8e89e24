//! Webhook delivery from the outbox.
//!
//! The alert pipeline writes a delivery row for every (webhook, alert,
//! transition) in the same transaction as the alert itself, so a crash
//! between "alert raised" and "webhook called" loses nothing: the row is
//! there on restart. One task per webhook sends its rows in order: a POST of
//! the JSON payload with `Idempotency-Key: {alert id}:{transition}`. A 2xx
//! marks the row delivered. Anything else (an error status, a timeout, a
//! refused connection) is retried with jittered exponential backoff until
//! `max_attempts`, when the row is marked `dead` (the dead-letter record,
//! kept with its last error) and the next row goes. A crash after the
//! receiver accepted but before the row was marked sends it again with the
//! same key: receivers deduplicate on it.
//!
//! On a cluster the outbox is in PostgreSQL ([`StoreAt::Cluster`]) and a
//! target's rows go out only from the process holding its delivery lock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::spec::Severity;
use crate::metrics::CloudMetrics;
pub use crate::store::alerts::Outbox;
use crate::store::alerts::{Attempt, Delivery};
use crate::store::{StoreAt, StoreError};

type SharedOutbox = Arc<Mutex<Box<dyn Outbox>>>;

/// Runs `f` on the outbox on a blocking thread: the stores' clients block.
async fn with_outbox<T: Send + 'static>(
    outbox: &SharedOutbox,
    f: impl FnOnce(&mut dyn Outbox) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = outbox.lock().map_err(|_| StoreError("the outbox lock is poisoned".into()))?;
        f(guard.as_mut())
    })
    .await
    .map_err(|e| StoreError(format!("an outbox call failed: {e}")))?
}

/// One `[[webhooks]]` entry of the cloud config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    /// `http://` or `https://` URL the payload is POSTed to.
    pub url: String,
    /// Alerts below this severity are not sent here.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// Only these rules (default: every rule).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Per-request timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before a delivery is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

fn default_min_severity() -> Severity {
    Severity::Info
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

impl WebhookConfig {
    /// Problems with this entry, each with its key path.
    pub fn problems(&self, path: &str, rule_names: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        if self.name.is_empty() || !self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            out.push(format!("{path}.name: {:?} must be A-Z a-z 0-9 _ -", self.name));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            out.push(format!("{path}.url: {:?} must be an http:// or https:// URL", self.url));
        }
        if self.max_attempts == 0 {
            out.push(format!("{path}.max_attempts: must be at least 1"));
        }
        if self.timeout.is_zero() {
            out.push(format!("{path}.timeout: must be positive"));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            out.push(format!("{path}.backoff_initial, {path}.backoff_max: need 0 < initial <= max"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if !rule_names.contains(r) {
                out.push(format!("{path}.rules[{i}]: no rule named {r:?}"));
            }
        }
        out
    }
}

/// What one attempt did.
#[derive(Debug)]
pub enum Outcome {
    Delivered,
    Failed(String),
}

/// How a target retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Backoff before attempt `attempts + 1`, jittered to 50-100 %.
    pub fn backoff(&self, attempts: u32, jitter: f64) -> Duration {
        kappa_runtime::backoff::jittered(self.backoff_initial, self.backoff_max, attempts.saturating_sub(1), jitter)
    }
}

impl WebhookConfig {
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
        }
    }
}

async fn attempt(client: &reqwest::Client, hook: &WebhookConfig, d: &Delivery) -> Outcome {
    let sent = client
        .post(&hook.url)
        .timeout(hook.timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", d.idempotency_key())
        .header("x-kappa-alert-transition", d.transition.as_str())
        .header("x-kappa-delivery-attempt", (d.attempts + 1).to_string())
        .body(d.payload.clone())
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Outcome::Delivered,
        Ok(resp) => Outcome::Failed(format!("HTTP {}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Outcome::Failed(format!("timed out after {:?}", hook.timeout)),
        // Without the URL: a webhook's address often holds its secret, and
        // the error is stored and served with the alert.
        Err(e) if e.is_connect() => Outcome::Failed(format!("cannot connect: {}", e.without_url())),
        Err(e) => Outcome::Failed(e.without_url().to_string()),
    }
}

/// Delivers `hook`'s outbox rows in order until `cancel` fires.
pub async fn run(
    hook: WebhookConfig,
    outbox: StoreAt,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let client = reqwest::Client::builder().build().map_err(|e| format!("webhook {}: {e}", hook.name))?;
    // The host only: the path or the query often holds the receiver's secret.
    let host = reqwest::Url::parse(&hook.url).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
    tracing::info!(webhook = %hook.name, host, "Webhook delivery started.");
    let policy = hook.policy();
    let name = hook.name.clone();
    deliver_loop(&name, policy, outbox, metrics, cancel, |d| {
        let (client, hook) = (client.clone(), hook.clone());
        async move { attempt(&client, &hook, &d).await }
    })
    .await
}

/// Sends `target`'s outbox rows in order, one at a time, with `send`,
/// recording each attempt, until `cancel` fires.
pub async fn deliver_loop<F, Fut>(
    target: &str,
    policy: RetryPolicy,
    outbox: StoreAt,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
    mut send: F,
) -> Result<(), String>
where
    F: FnMut(Delivery) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    // The store may be away when delivery starts (PostgreSQL restarting):
    // wait for it as for a read that fails, never stop the node over it.
    let mut outage = StoreOutage::default();
    let opened = loop {
        let at = outbox.clone();
        match tokio::task::spawn_blocking(move || at.outbox()).await.map_err(|e| e.to_string())? {
            Ok(store) => break store,
            Err(e) => {
                let (pause, first) = outage.failed();
                if first {
                    tracing::warn!(target, error = %e, "Cannot open the alert outbox; retrying until it answers.");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    };
    let store: SharedOutbox = Arc::new(Mutex::new(opened));
    let result = send_in_order(target, policy, &store, metrics, cancel, &mut send).await;
    // A PostgreSQL client must not be dropped on an async thread.
    tokio::task::spawn_blocking(move || drop(store)).await.map_err(|e| e.to_string())?;
    result
}

/// While the outbox's store is away (PostgreSQL restarting): pauses that
/// double from 100 ms to 5 s, and one warning per outage. (The soak found
/// the reader retrying on every poll during an outage, logging each time.)
#[derive(Debug, Default)]
struct StoreOutage {
    pause: Option<Duration>,
}

impl StoreOutage {
    /// A read or open that failed: how long to wait before the next one, and
    /// whether this failure starts an outage (the one to log).
    fn failed(&mut self) -> (Duration, bool) {
        let (pause, first) = match self.pause {
            None => (Duration::from_millis(100), true),
            Some(p) => ((p * 2).min(Duration::from_secs(5)), false),
        };
        self.pause = Some(pause);
        (pause, first)
    }

    /// A read that worked: whether it ended an outage.
    fn recovered(&mut self) -> bool {
        self.pause.take().is_some()
    }
}

async fn send_in_order<F, Fut>(
    target: &str,
    policy: RetryPolicy,
    store: &SharedOutbox,
    metrics: Arc<CloudMetrics>,
    cancel: CancellationToken,
    send: &mut F,
) -> Result<(), String>
where
    F: FnMut(Delivery) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut rng = crate::now_ms() as u64 | 1;
    let label = |result: &str| [("webhook", target.to_string()), ("result", result.to_string())];
    let mut last_gauge = std::time::Instant::now();
    let mut outage = StoreOutage::default();
    while !cancel.is_cancelled() {
        let wanted = target.to_string();
        let next = match with_outbox(store, move |s| s.next_delivery(&wanted)).await {
            Ok(n) => {
                if outage.recovered() {
                    tracing::info!(target, "The alert outbox is readable again.");
                }
                n
            }
            Err(e) => {
                let (pause, first) = outage.failed();
                if first {
                    tracing::warn!(target, error = %e, "Cannot read the alert outbox; retrying until it answers.");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let Some(d) = next else {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        };
        let wait = d.next_attempt_ms - crate::now_ms();
        if wait > 0 {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(wait.min(1000) as u64)) => continue,
            }
        }
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            o = send(d.clone()) => o,
        };
        let attempts = d.attempts + 1;
        let now = crate::now_ms();
        let attempt = |state, next_attempt_ms, error| Attempt {
            seq: d.seq,
            state,
            attempts,
            next_attempt_ms,
            error,
            now_ms: now,
        };
        let attempt = match outcome {
            Outcome::Delivered => {
                metrics.webhook_deliveries.get_or_create(&label("delivered")).inc();
                attempt("delivered", now, String::new())
            }
            Outcome::Failed(error) if attempts >= policy.max_attempts => {
                metrics.webhook_deliveries.get_or_create(&label("dead_letter")).inc();
                tracing::error!(target, alert = %d.alert_id, transition = %d.transition, attempts, %error,
                    "Alert delivery failed for the last time; dead-lettered.");
                attempt("dead", now, error)
            }
            Outcome::Failed(error) => {
                metrics.webhook_deliveries.get_or_create(&label("failed")).inc();
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let backoff = policy.backoff(attempts, (rng >> 11) as f64 / (1u64 << 53) as f64);
                tracing::warn!(target, alert = %d.alert_id, attempts, %error, retry_in = ?backoff,
                    "Alert delivery failed; will retry.");
                attempt("pending", now + backoff.as_millis() as i64, error)
            }
        };
        let recorded = with_outbox(store, move |s| s.record_attempt(&attempt)).await;
        if let Err(e) = recorded {
            // The row stays pending: it is sent again (same idempotency key).
            tracing::warn!(target, error = %e, "Cannot record a delivery attempt.");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if last_gauge.elapsed() >= Duration::from_secs(5)
            && let Ok(counts) = with_outbox(store, |s| s.delivery_counts()).await
        {
            let pending: u64 = counts.iter().filter(|(_, s, _)| s == "pending").map(|(_, _, n)| n).sum();
            metrics.webhook_pending.set(pending as i64);
            last_gauge = std::time::Instant::now();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (kappa-chaos seed 5, docs/reliability.md): during a
    /// PostgreSQL outage the outbox reader retried on every 100 ms poll and
    /// logged each failure. It backs off to 5 s and warns once per outage.
    #[test]
    fn an_outage_of_the_outbox_backs_off_to_five_seconds_and_warns_once() {
        let mut outage = StoreOutage::default();
        let (pauses, firsts): (Vec<u128>, Vec<bool>) =
            (0..9).map(|_| outage.failed()).map(|(p, first)| (p.as_millis(), first)).unzip();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(firsts.iter().filter(|f| **f).count(), 1, "one warning for the whole outage");
        assert!(firsts[0], "the first failure is the one logged");
        assert!(outage.recovered(), "a read that works ends the outage");
        assert!(!outage.recovered(), "and only once");
        assert_eq!(outage.failed(), (Duration::from_millis(100), true), "the next outage starts over");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let hook: WebhookConfig =
            toml::from_str("name = \"a\"\nurl = \"http://x\"\nbackoff_initial = \"1s\"\nbackoff_max = \"10s\"")
                .unwrap();
        let p = hook.policy();
        assert_eq!(p.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(p.backoff(9, 1.0), Duration::from_secs(10));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
    }
}
