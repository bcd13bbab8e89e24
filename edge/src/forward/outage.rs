//! An outage of the cloud, as the agent's log tells it: one WARN when the
//! first attempt fails, the retries at DEBUG, one INFO when the cloud
//! accepts a batch again (how long, how many attempts failed, the backlog
//! then), and one INFO when that backlog is sent. A minute-long outage is
//! four lines, not one per retry of every batch in flight.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared by the forwarder's send tasks.
#[derive(Debug, Clone, Default)]
pub(super) struct OutageLog(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// Since when the cloud has been failing, and how many attempts failed.
    down: Option<(Instant, u64)>,
    /// An outage that ended with this backlog, not yet sent: when it ended, how long it lasted.
    draining: Option<(Instant, Duration, i64)>,
}

impl OutageLog {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An attempt failed with `reason` (`detail` says more).
    pub(super) fn failed(&self, batch_id: u64, reason: &str, detail: &str, retry_in: Duration) {
        let mut s = self.state();
        match &mut s.down {
            Some((_, failures)) => {
                *failures += 1;
                tracing::debug!(batch_id, reason, detail, ?retry_in, "Forwarding failed again; will retry.");
            }
            None => {
                s.down = Some((Instant::now(), 1));
                tracing::warn!(
                    batch_id,
                    reason,
                    detail,
                    ?retry_in,
                    "Cannot forward to the cloud; readings wait in the log and go when it answers again (retries are logged at debug)."
                );
            }
        }
    }

    /// A batch was accepted; `backlog` readings are waiting now.
    pub(super) fn accepted(&self, backlog: i64) {
        let mut s = self.state();
        if let Some((since, failures)) = s.down.take() {
            let outage = since.elapsed();
            tracing::info!(
                outage = %humantime::format_duration(round(outage)),
                failed_attempts = failures,
                backlog_readings = backlog,
                "The cloud accepts batches again; sending the backlog."
            );
            s.draining = Some((Instant::now(), outage, backlog));
        }
    }

    /// Nothing is left to send.
    pub(super) fn caught_up(&self) {
        let mut s = self.state();
        if s.down.is_none()
            && let Some((since, outage, backlog)) = s.draining.take()
        {
            tracing::info!(
                backlog_readings = backlog,
                outage = %humantime::format_duration(round(outage)),
                took = %humantime::format_duration(round(since.elapsed())),
                "Sent the backlog of the outage; caught up."
            );
        }
    }
}

/// To the tenth of a second: what a person reads.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}
